"""``MLAgent``: the real learner behind the ``Agent`` protocol (knexad/agent_api.py).

One agent = one organisation's model: a frozen base (tiny offline family, SmolLM2, or
any HF directory) with LoRA adapters, its private split of the task set, and the
shared transfer and test sets. On first use it fine-tunes LoRA on its private train
split (``StepsConfig.local`` steps). ``teach`` answers transfer prompts, ``learn`` runs
adaptive KD (Eq. 2) on a peer's package, ``evaluate`` measures pass@1 in the sandbox
(``knexad.agent.evaluate.check_programs``), split into the agent's own categories and
the ones it lacks — the latter is where knowledge from a peer shows.

All methods block (the daemon calls them via ``trio.to_thread.run_sync``) and are
serialised by a lock, so a teach request never runs while the model trains.
"""

from __future__ import annotations

import ast
import json
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import structlog
import torch

from knexad.agent import checkpoint, distill, profile, tasks, zoo
from knexad.agent.tasks import DataConfig
from knexad.agent_api import (KnowledgeItem, KnowledgePackage, LearnResult, ProtocolArm,
                              TeachRequest)

log = structlog.get_logger(__name__)

MAX_COMPLETION_CHARS = 2000


@dataclass(frozen=True, slots=True)
class StepsConfig:
    """Training budget. Defaults follow design §9's fast setting (200 local / 150 KD)."""

    local: int = 200  # LoRA fine-tune steps on the private split, on first use
    kd: int = 150  # Eq. 2 steps per learn()
    batch_size: int = 16
    lr: float = 2e-3
    total_rounds: int = 10  # horizon of the α / T schedules
    max_new_tokens: int = 40


# Named training budgets, chosen per daemon by ``[agent] budget`` (knexad/config.py keeps
# the same names so the config validates without importing torch). Only step counts
# differ: the data split, test set and transfer set are identical under every budget, so
# pass@1 numbers from different budgets are measured on the same tasks.
# What a student reports as its validation "loss" before and after a KD round (the
# Feedback's L_pre / L_post, Eq. 3's improvement): ``val_pass`` = the validation error
# rate 1 − pass@1 (greedy, sandboxed, all 12 categories), ``val_loss`` = mean token
# cross-entropy on the reference solutions. Why val_pass is the default: over the tuning
# seed's 88 KD rounds its change tracks the student's later test pass@1 change better
# (Pearson 0.51–0.76 vs 0.45–0.56, benchmarks/reward_alignment.py), and the cross-entropy
# scores the gentle arm as high as the default one although its students gained less.
REWARD_MEASURES: tuple[str, ...] = ("val_pass", "val_loss")
# Items kept for replay (``replay_knowledge``): about two full packages (a package is at
# most the 128-prompt transfer set); the oldest go first.
KEEP_MAX = 256

BUDGETS: dict[str, StepsConfig] = {
    "fast": StepsConfig(local=100, kd=60),  # make demo, benchmarks/round.py
    "standard": StepsConfig(),  # design §9's fast setting; the daemon default
    "thorough": StepsConfig(local=400, kd=300),  # design §9's slower, stronger setting
}


def steps_for_budget(name: str) -> StepsConfig:
    """The ``StepsConfig`` of a named budget (``ValueError`` for an unknown name)."""
    try:
        return BUDGETS[name]
    except KeyError:
        raise ValueError(f"unknown budget {name!r}; known: {', '.join(BUDGETS)}") from None


def _family_name(spec: str) -> str:
    """Family label known before loading: the tiny name, or the directory's model_type."""
    if spec in zoo.TINY_RECIPES:
        return spec
    if spec in ("smollm2", "smollm2-135m-instruct"):
        return "llama"
    cfg = Path(spec).expanduser() / "config.json"
    if cfg.exists():
        return zoo.family_of(json.loads(cfg.read_text()).get("model_type", ""))
    return "other"


@dataclass
class _State:
    trained: bool = False
    round: int = 0
    step: int = 0
    metrics: list[float] | None = None
    prev_metrics: list[float] | None = None
    per_category: list[float] = field(default_factory=list)
    kd_gain: float = 0.0
    kept: list[list[str]] = field(default_factory=list)  # [prompt, completion] accepted, oldest first


class MLAgent:
    """Frozen base + LoRA agent over the built-in task set (see module docstring)."""

    def __init__(self, model: str = "tiny-qwen2", agent_index: int = 0, n_agents: int = 1,
                 alpha: float = tasks.BUILTIN_ALPHA, seed: int = 0, steps: StepsConfig | None = None,
                 data: DataConfig | None = None, device: torch.device | None = None,
                 verify_knowledge: bool = True, reward_measure: str = "val_pass",
                 replay_knowledge: bool = True) -> None:
        if not 0 <= agent_index < n_agents:
            raise ValueError(f"agent_index {agent_index} outside 0..{n_agents - 1}")
        if reward_measure not in REWARD_MEASURES:
            raise ValueError(f"reward_measure {reward_measure!r} not one of {', '.join(REWARD_MEASURES)}")
        self.spec = model
        self.family = _family_name(model)
        self.agent_index = agent_index
        self.seed = seed
        self.steps = steps or StepsConfig()
        self.data = data or DataConfig()
        self._device = device
        part = tasks.partition_for(n_agents, alpha, seed, self.data)
        self.split = part.agents[agent_index]
        self.transfer = part.transfer
        self._transfer_hash = part.transfer_set_hash()
        self._transfer_by_hash = {tasks.prompt_hash(t.prompt): t for t in self.transfer}
        self._transfer_hashes = set(self._transfer_by_hash)
        # execution-verified distillation: the shared transfer tasks carry public tests
        # (never the held-out test set's); a teacher sends, and a student trains on, only
        # completions that pass them in its own sandbox (docs/agent.md)
        self.verify_knowledge = verify_knowledge
        self.reward_measure = reward_measure
        self.replay_knowledge = replay_knowledge
        self.own_categories = self.split.own_categories()
        self._lock = threading.RLock()
        self._lm: zoo.LoadedModel | None = None
        self._opt: torch.optim.Optimizer | None = None
        self._state = _State()
        # the last evaluate()'s metrics, valid while the weights have not changed since
        # (evaluation is greedy and deterministic, so re-running it would give the same)
        self._eval_cache: dict[str, float] | None = None

    # -- lazy model -----------------------------------------------------------------

    @property
    def _agent_seed(self) -> int:
        return self.seed * 1009 + self.agent_index

    def _ensure_model(self) -> zoo.LoadedModel:
        if self._lm is None:
            self._lm = zoo.load_model(self.spec, seed=self._agent_seed, device=self._device)
            params = [p for p in self._lm.model.parameters() if p.requires_grad]
            self._opt = torch.optim.AdamW(params, lr=self.steps.lr, weight_decay=0.0)
            tok = self._lm.tokenizer
            enc = lambda ts: [distill.encode_pair(tok, t.prompt, t.solution) for t in ts]  # noqa: E731
            self._train_ex = enc(self.split.train)
            self._val_ex = enc(self.split.val)
            self._stop_ids = distill.newline_token_ids(tok)
        return self._lm

    def _ensure_trained(self) -> zoo.LoadedModel:
        lm = self._ensure_model()
        if not self._state.trained:
            t0 = time.perf_counter()
            losses = distill.train_steps(
                lm.model, self._opt, self._train_ex, [], alpha=0.0, steps=self.steps.local,
                batch_size=self.steps.batch_size, pad_id=lm.pad_id, device=lm.device,
                seed=self._agent_seed)
            self._state.trained = True
            self._state.step += len(losses)
            self._eval_cache = None
            log.info("agent.local.done", agent=self.agent_index, family=self.family,
                     steps=len(losses), loss_first=round(losses[0], 4) if losses else None,
                     loss_last=round(losses[-1], 4) if losses else None,
                     duration_ms=int((time.perf_counter() - t0) * 1000))
        return lm

    def _generate(self, prompts: Sequence[str], temperature: float = 0.0, seed: int = 0) -> list[str]:
        lm = self._ensure_trained()
        return distill.generate(lm.model, lm.tokenizer, prompts, device=lm.device,
                                max_new_tokens=self.steps.max_new_tokens, one_line=True,
                                temperature=temperature, seed=seed, stop_ids=self._stop_ids)

    # -- Agent protocol ---------------------------------------------------------------

    def transfer_set_hash(self) -> str:
        return self._transfer_hash

    def profile(self) -> list[float]:
        """32-d profile; runs the first evaluation if none has been made yet."""
        with self._lock:
            if self._state.metrics is None:
                self.evaluate()
            now = profile.PerfMetrics(*self._state.metrics)
            prev = (profile.PerfMetrics(*self._state.prev_metrics)
                    if self._state.prev_metrics is not None else None)
            return profile.build_profile(self.family, now, prev, self.split.histogram())

    def teach(self, request: TeachRequest) -> KnowledgePackage:
        """Completions on the requested transfer prompts: sample 0 greedy, further samples
        (``arm.n_samples`` > 1) at the round's temperature T_t."""
        with self._lock:
            t0 = time.perf_counter()
            ids = [i for i in request.transfer_ids if 0 <= i < len(self.transfer)]
            prompts = [self.transfer[i].prompt for i in ids]
            _, temp = distill.effective_knobs(request.round, request.arm, self.steps.total_rounds)
            items: list[KnowledgeItem] = []
            per_cat = self._state.per_category
            for s in range(max(request.arm.n_samples, 1)):
                outs = self._generate(prompts, temperature=0.0 if s == 0 else temp,
                                      seed=self._agent_seed * 7919 + request.round * 31 + s)
                for i, completion in zip(ids, outs, strict=True):
                    cat = self.transfer[i].category
                    items.append(KnowledgeItem(
                        item_id=f"{i}" if s == 0 else f"{i}.{s}", prompt=self.transfer[i].prompt,
                        completion=completion, category=cat,
                        score=per_cat[cat] if per_cat else 0.0))
            generated = len(items)
            if self.verify_knowledge:
                items = self._passing(items)
            log.info("agent.teach.done", agent=self.agent_index, directive=request.directive_id,
                     round=request.round, items=len(items), generated=generated,
                     duration_ms=int((time.perf_counter() - t0) * 1000))
            return KnowledgePackage(self.family, tuple(items),
                                    {"round": request.round, "directive": request.directive_id,
                                     "transfer_hash": self._transfer_hash,
                                     "n_samples": request.arm.n_samples})

    def accept_item(self, item: KnowledgeItem) -> bool:
        """Student-side check: the prompt is one of *our* transfer prompts and prompt +
        completion parses as Python (parsed only, never executed)."""
        if tasks.prompt_hash(item.prompt) not in self._transfer_hashes:
            return False
        if not item.completion.strip() or len(item.completion) > MAX_COMPLETION_CHARS:
            return False
        try:
            ast.parse(item.prompt + item.completion)
        except SyntaxError:
            return False
        return True

    def _passing(self, items: Sequence[KnowledgeItem]) -> list[KnowledgeItem]:
        """The items whose completion passes its transfer task's public tests in this
        agent's sandbox (an item for a prompt outside our transfer set never passes)."""
        from knexad.agent.evaluate import check_programs

        known = [(it, self._transfer_by_hash.get(tasks.prompt_hash(it.prompt))) for it in items]
        runnable = [(it, task) for it, task in known if task is not None]
        if not runnable:
            return []
        ok = check_programs([task.prompt + it.completion + "\n" + task.test for it, task in runnable])
        return [it for (it, _), passed in zip(runnable, ok, strict=True) if passed]

    def learn(self, package: KnowledgePackage, arm: ProtocolArm) -> LearnResult:
        with self._lock:
            lm = self._ensure_trained()
            round_ = int(package.meta.get("round", self._state.round))
            parsed = [it for it in package.items if self.accept_item(it)]
            accepted = self._passing(parsed) if self.verify_knowledge else parsed
            if self.replay_knowledge:
                self._keep(accepted)
            error_pre = self._val_error() if self.reward_measure == "val_pass" else None
            kd = [distill.encode_pair(lm.tokenizer, it.prompt, it.completion) for it in accepted]
            # a KD round's steps even when nothing was accepted (they are then local steps):
            # the same compute as a LocalOnly round, whatever the teacher sent
            result = distill.distill(
                lm.model, self._opt, local=self._train_ex, kd=kd, val=self._val_ex, arm=arm,
                round_=round_, total_rounds=self.steps.total_rounds,
                steps=self.steps.kd, batch_size=self.steps.batch_size,
                pad_id=lm.pad_id, device=lm.device, seed=self._agent_seed * 13 + round_)
            self._state.step += len(result.step_losses)
            if result.step_losses:
                self._eval_cache = None
            self._state.round = round_ + 1
            loss_pre, loss_post = result.loss_pre, result.loss_post
            if error_pre is not None:
                loss_pre, loss_post = error_pre, self._val_error()
            self._state.kd_gain = profile.kd_gain(loss_pre, loss_post)
            log.info("agent.learn.done", agent=self.agent_index, round=round_,
                     teacher=package.teacher_family, items=len(package.items),
                     items_parsed=len(parsed), items_used=len(accepted), measure=self.reward_measure,
                     loss_pre=round(loss_pre, 4), loss_post=round(loss_post, 4),
                     ce_pre=round(result.loss_pre, 4), ce_post=round(result.loss_post, 4),
                     duration_ms=int(result.seconds * 1000))
            return LearnResult(loss_pre, loss_post, len(accepted), result.seconds, len(result.step_losses))

    def _val_error(self) -> float:
        """1 − pass@1 on the agent's validation split with the current weights: from the
        last evaluation while the weights are unchanged (the profile's, before a KD
        round), else generated and run in the sandbox now (after one)."""
        from knexad.agent.evaluate import check_programs

        if self._eval_cache is not None:
            return 1.0 - self._eval_cache["val_pass@1"]
        val = self.split.val
        outs = self._generate([t.prompt for t in val])
        ok = check_programs([t.prompt + c + "\n" + t.test for t, c in zip(val, outs, strict=True)])
        return 1.0 - sum(ok) / len(ok) if ok else 1.0

    def _keep(self, accepted: list[KnowledgeItem]) -> None:
        """Remember accepted items for ``local_round``'s replay: newest last, a repeated
        (prompt, completion) moved to the end, at most ``KEEP_MAX`` (the oldest go)."""
        new = [[it.prompt, it.completion] for it in accepted]
        kept = [pc for pc in self._state.kept if pc not in new] + new
        self._state.kept = kept[-KEEP_MAX:]

    def local_round(self, steps: int | None = None) -> LearnResult:
        """A LocalOnly round: the same number of steps as a KD round, on private data —
        and, with ``replay_knowledge``, on the items this agent accepted in earlier KD
        rounds as the L_KD term (Eq. 2, the default arm's α): the same compute, but the
        steps rehearse what it was taught instead of overwriting it (docs/agent.md)."""
        with self._lock:
            lm = self._ensure_trained()
            kd = ([distill.encode_pair(lm.tokenizer, p, c) for p, c in self._state.kept]
                  if self.replay_knowledge else [])
            result = distill.distill(
                lm.model, self._opt, local=self._train_ex, kd=kd, val=self._val_ex,
                arm=ProtocolArm(), round_=self._state.round, total_rounds=self.steps.total_rounds,
                steps=self.steps.kd if steps is None else steps, batch_size=self.steps.batch_size,
                pad_id=lm.pad_id, device=lm.device, seed=self._agent_seed * 13 + self._state.round)
            self._state.step += len(result.step_losses)
            if result.step_losses:
                self._eval_cache = None
            self._state.round += 1
            return LearnResult(result.loss_pre, result.loss_post, 0, result.seconds, len(result.step_losses))

    def evaluate(self) -> dict[str, float]:
        """pass@1 (greedy, sandboxed) on the shared held-out **test** set — overall, own
        categories, other categories: what the benchmark reports — and on the agent's
        own **validation** split, plus validation loss, token accuracy and normalised
        perplexity.

        The profile (and the per-category scores a teacher attaches to its items) carries
        only the validation numbers: the CPM picks partners from profiles, so a profile
        built on the test set would let matching select on the very data the federation
        is scored on. The test numbers stay on this machine (``last_evaluation``; the
        daemon logs them per round for the harness).

        When the weights have not changed since the last evaluation (a teacher's round:
        teaching does not train), the previous metrics are returned without generating
        or running anything: evaluation is deterministic, so the numbers are the ones a
        re-run would give, and the profile's deltas (now vs previous) become 0 exactly as
        they would."""
        from knexad.agent.evaluate import check_programs

        with self._lock:
            lm = self._ensure_trained()
            if self._eval_cache is not None and self._state.metrics is not None:
                self._state.prev_metrics = self._state.metrics
                log.info("agent.evaluate.cached", agent=self.agent_index, family=self.family,
                         pass_at_1=round(self._eval_cache["pass@1"], 4))
                return dict(self._eval_cache)
            t0 = time.perf_counter()
            test, val = self.split.test, self.split.val
            tasks_run = list(test) + list(val)
            outs = self._generate([t.prompt for t in tasks_run])
            ok_all = check_programs([t.prompt + c + "\n" + t.test for t, c in zip(tasks_run, outs, strict=True)])
            ok_test, ok_val = ok_all[:len(test)], ok_all[len(test):]
            own = set(self.own_categories)

            def rate(split: Sequence[tasks.Task], ok: Sequence[bool], keep: Callable[[int], bool] | None = None) -> float:
                chosen = [o for o, t in zip(ok, split, strict=True) if keep is None or keep(t.category)]
                return sum(chosen) / len(chosen) if chosen else 0.0

            val_loss = distill.mean_loss(lm.model, self._val_ex, lm.pad_id, lm.device)
            metrics = {
                "pass@1": rate(test, ok_test),
                "pass@1_own": rate(test, ok_test, lambda c: c in own),
                "pass@1_other": rate(test, ok_test, lambda c: c not in own),
                "val_pass@1": rate(val, ok_val),
                "val_pass@1_own": rate(val, ok_val, lambda c: c in own),
                "val_pass@1_other": rate(val, ok_val, lambda c: c not in own),
                "task_score": distill.token_accuracy(lm.model, self._val_ex, lm.pad_id, lm.device),
                "val_loss": val_loss,
                "ppl_norm": profile.normalized_perplexity(val_loss, len(lm.tokenizer)),
                "n_test": float(len(test)),
                "n_val": float(len(val)),
                **{f"pass@1_cat{c}": rate(test, ok_test, lambda k, c=c: k == c) for c in range(tasks.N_CATEGORIES)},
            }
            perf = [metrics["val_pass@1"], metrics["val_pass@1_own"], metrics["val_pass@1_other"],
                    metrics["task_score"], metrics["ppl_norm"], self._state.kd_gain]
            self._state.prev_metrics = self._state.metrics
            self._state.metrics = perf
            self._state.per_category = [rate(val, ok_val, lambda k, c=c: k == c) for c in range(tasks.N_CATEGORIES)]
            self._eval_cache = dict(metrics)
            log.info("agent.evaluate.done", agent=self.agent_index, family=self.family,
                     **{k.replace("@", "_at_"): round(v, 4) for k, v in metrics.items()
                        if "_cat" not in k},
                     duration_ms=int((time.perf_counter() - t0) * 1000))
            return metrics

    def last_evaluation(self) -> dict[str, float] | None:
        """The metrics of the latest evaluation of exactly these weights, without running
        one (and without moving the profile's previous metrics as ``evaluate`` does); None
        when the weights changed since or nothing was evaluated yet."""
        with self._lock:
            return None if self._eval_cache is None else dict(self._eval_cache)

    def save(self, directory: Path) -> None:
        with self._lock:
            lm = self._ensure_model()
            state = {"spec": self.spec, "family": self.family, "agent_index": self.agent_index,
                     "seed": self.seed, "transfer_hash": self._transfer_hash,
                     "steps_config": asdict(self.steps), **asdict(self._state),
                     # metrics of exactly these weights, if evaluated since they last
                     # changed: a restored agent (the harness's final evaluation) reuses them
                     "eval_cache": self._eval_cache}
            checkpoint.save_checkpoint(Path(directory), lm.model, self._opt, state)

    def load(self, directory: Path) -> bool:
        with self._lock:
            lm = self._ensure_model()
            saved = checkpoint.load_checkpoint(Path(directory), lm.model, self._opt)
            if saved is None:
                return False
            if saved.get("spec") != self.spec or saved.get("transfer_hash") != self._transfer_hash:
                raise ValueError("checkpoint belongs to another model spec or task set")
            cache = saved.get("eval_cache")
            self._eval_cache = ({str(k): float(v) for k, v in cache.items()}
                                if isinstance(cache, dict) and "pass@1" in cache else None)
            self._state = _State(trained=bool(saved["trained"]), round=int(saved["round"]),
                                 step=int(saved["step"]), metrics=saved.get("metrics"),
                                 prev_metrics=saved.get("prev_metrics"),
                                 per_category=list(saved.get("per_category", [])),
                                 kd_gain=float(saved.get("kd_gain", 0.0)),
                                 kept=[[str(p), str(c)] for p, c in saved.get("kept", [])])
            return True


# ---------------------------------------------------------------------------------
# The effect that justifies the system (tests/unit/test_kd_effect.py, docs/agent.md)


def kd_effect(student: str = "tiny-gpt2", teacher: str = "tiny-gpt2",
              a_cats: Sequence[int] = (0, 1, 2, 3, 4, 5),
              b_cats: Sequence[int] = (6, 7, 8, 9, 10, 11), *, local: int = 300, kd: int = 150,
              seed: int = 0, same_teacher: bool = True, n_train: int = 240,
              n_test_per_cat: int = 10, kd_alpha: float | None = None,
              workdir: Path | None = None) -> dict[str, float]:
    """Student holds categories A, teacher holds B. Compares pass@1 on B of
    (1) the LocalOnly twin (same student + ``kd`` more private-data steps),
    (2) the student after one KD round from the complementary teacher, and
    (3) optionally the student after KD from a same-category (A) teacher.
    The student's local fine-tune is done once and restored from a checkpoint for each
    arm, so every arm starts from identical weights. ``kd_alpha``: the effective α of this
    (round-0) KD round; None = the paper schedule's 0.2."""
    t0 = time.perf_counter()
    data = DataConfig(n_train=n_train, n_test_per_cat=n_test_per_cat,
                      owned=(tuple(a_cats), tuple(b_cats), tuple(a_cats)))
    cfg = StepsConfig(local=local, kd=kd)

    def make(i: int, spec: str) -> MLAgent:
        return MLAgent(spec, i, 3, seed=seed, steps=cfg, data=data)

    def on(metrics: dict[str, float], cats: Sequence[int]) -> float:
        return sum(metrics[f"pass@1_cat{c}"] for c in cats) / len(cats)

    ids = tuple(range(data.n_transfer))
    arm = ProtocolArm() if kd_alpha is None else ProtocolArm(
        alpha=ProtocolArm().alpha + kd_alpha - distill.alpha_schedule(0, cfg.total_rounds))
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        base = make(0, student)
        m0 = base.evaluate()  # triggers the local fine-tune
        base.save(Path(tmp) / "student")
        out.update(student_A_before=on(m0, a_cats), student_B_before=on(m0, b_cats))

        def twin() -> MLAgent:
            agent = make(0, student)
            agent.load(Path(tmp) / "student")
            return agent

        t = make(1, teacher)
        mt = t.evaluate()
        out.update(teacher_B=on(mt, b_cats))
        kd_student = twin()
        res = kd_student.learn(t.teach(TeachRequest("kd-effect", 0, ids, arm)), arm)
        mk = kd_student.evaluate()
        out.update(kd_A=on(mk, a_cats), kd_B=on(mk, b_cats), kd_loss_pre=res.loss_pre,
                   kd_loss_post=res.loss_post, kd_items_used=float(res.items_used))
        local_twin = base  # already trained; one more round on private data only
        lres = local_twin.local_round()
        ml = local_twin.evaluate()
        out.update(local_A=on(ml, a_cats), local_B=on(ml, b_cats),
                   local_loss_pre=lres.loss_pre, local_loss_post=lres.loss_post)
        if same_teacher:
            st = make(2, teacher)
            same_student = twin()
            same_student.learn(st.teach(TeachRequest("kd-same", 0, ids, arm)), arm)
            ms = same_student.evaluate()
            out.update(same_A=on(ms, a_cats), same_B=on(ms, b_cats))
    out["seconds"] = time.perf_counter() - t0
    log.info("agent.kd_effect.done", student=student, teacher=teacher,
             **{k: round(v, 4) for k, v in out.items()})
    return out


def step_seconds(spec: str = "tiny-qwen2", steps: int = 5, threads: int = 1) -> float:
    """Wall seconds per local LoRA step (batch 16) of a fresh agent on ``threads`` torch
    threads, after one warm-up step: the measurement behind ``zoo.configure_cpu_threads``
    (``python -m benchmarks.round --probe-threads`` runs several of these at once)."""
    agent = MLAgent(spec, 0, 4, seed=0, steps=StepsConfig(local=0))
    lm = agent._ensure_model()
    torch.set_num_threads(threads)

    def run(n: int) -> None:
        distill.train_steps(lm.model, agent._opt, agent._train_ex, [], alpha=0.0, steps=n,
                            batch_size=agent.steps.batch_size, pad_id=lm.pad_id, device=lm.device, seed=0)

    run(1)
    t0 = time.perf_counter()
    run(steps)
    return (time.perf_counter() - t0) / steps


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m knexad.agent.ml_agent``: run ``kd_effect`` and print JSON."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m knexad.agent.ml_agent",
                                 description="KD effect: student on A, teacher on B.")
    ap.add_argument("--student", default="tiny-gpt2")
    ap.add_argument("--teacher", default="tiny-gpt2")
    ap.add_argument("--a", default="0,1,2,3,4,5", help="student categories")
    ap.add_argument("--b", default="6,7,8,9,10,11", help="teacher categories")
    ap.add_argument("--local", type=int, default=300)
    ap.add_argument("--kd", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kd-alpha", type=float, default=None,
                    help="effective α of the KD round (default: schedule, 0.2 at round 0)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-same", action="store_true", help="skip the same-category teacher arm")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cats = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    result = kd_effect(args.student, args.teacher, cats(args.a), cats(args.b), local=args.local,
                       kd=args.kd, seed=args.seed, same_teacher=not args.no_same,
                       kd_alpha=args.kd_alpha)
    print(json.dumps({k: round(v, 4) for k, v in result.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
