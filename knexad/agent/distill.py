"""Adaptive knowledge distillation (Eq. 2) and the token-level plumbing it needs.

L = (1 − α_t)·L_local + α_t·L_KD. ``L_local`` is the student's cross-entropy on a batch of
its private train split; ``L_KD`` is the student's cross-entropy on the teacher's
*text* (transfer prompt + teacher completion), re-tokenised with the student's own
tokenizer, loss on completion tokens only. Text is what crosses the wire because the
families' tokenizers differ (design §4), so teacher logits are not comparable.

Where both sides share a tokenizer *and* teacher logits are at hand in-process (same
family, e.g. a centralised baseline or a self-distillation check) ``soft_kd_loss`` gives
the temperature-softened KL (Hinton et al., scaled by T²). Over the wire the package
carries text only; there the temperature T_t is used by the *teacher* as its sampling
temperature when the arm asks for ``n_samples > 1`` (first sample greedy, the rest
sampled at T_t), so a higher T yields more diverse teacher text. This is documented in
docs/agent.md.

Schedules: α grows 0.2 → 0.5 and T grows 1.5 → 2.5 linearly over ``total_rounds``. A
protocol arm shifts them: α_t = sched_α(t) + (arm.α − 0.4), T_t = sched_T(t) + (arm.T − 2.0)
(0.4 and 2.0 are the default arm, which therefore follows the paper's schedule exactly).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
import torch
import torch.nn.functional as F

from protocol.profile import DEFAULT_ARM, ProtocolArm

log = structlog.get_logger(__name__)


# ---------------------------------------------------------------------------------
# Schedules


def _linear(round_: int, total_rounds: int, start: float, end: float) -> float:
    if total_rounds <= 1:
        return end
    frac = min(max(round_, 0), total_rounds - 1) / (total_rounds - 1)
    return start + (end - start) * frac


def alpha_schedule(round_: int, total_rounds: int = 10) -> float:
    """α_t: 0.2 at the first round, 0.5 from round ``total_rounds - 1`` on."""
    return _linear(round_, total_rounds, 0.2, 0.5)


def temperature_schedule(round_: int, total_rounds: int = 10) -> float:
    """T_t: 1.5 at the first round, 2.5 from round ``total_rounds - 1`` on."""
    return _linear(round_, total_rounds, 1.5, 2.5)


def effective_knobs(round_: int, arm: ProtocolArm, total_rounds: int = 10) -> tuple[float, float]:
    """(α_t, T_t) for this round under ``arm``.

    The schedule is the paper's (α_t, T_t); an arm moves it by its distance from the
    contract's default arm (``protocol.profile.DEFAULT_ARM``), so the default arm gets
    exactly the schedule and the gentle/strong arms a lower/higher one."""
    alpha = alpha_schedule(round_, total_rounds) + (arm.alpha - DEFAULT_ARM.alpha)
    temp = temperature_schedule(round_, total_rounds) + (arm.temperature - DEFAULT_ARM.temperature)
    return min(max(alpha, 0.0), 0.95), max(temp, 0.1)


# ---------------------------------------------------------------------------------
# Encoding and batching


@dataclass(frozen=True, slots=True)
class Example:
    """Token ids of a prompt and of its target completion (loss on the target only)."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]


def encode_pair(tokenizer, prompt: str, completion: str, max_len: int = 256) -> Example:
    """Tokenise prompt and completion *separately* so the boundary matches generation
    (where the model is fed exactly the prompt's ids). Truncates the prompt from the
    left if the pair is longer than ``max_len``."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t = tokenizer(completion, add_special_tokens=False)["input_ids"]
    t = t[: max_len // 2]
    p = p[-(max_len - len(t)):]
    return Example(tuple(p), tuple(t))


def collate(examples: Sequence[Example], pad_id: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels); labels −100 off the target."""
    width = max(len(e.prompt_ids) + len(e.target_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        seq = list(e.prompt_ids) + list(e.target_ids)
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(e.prompt_ids): len(seq)] = torch.tensor(e.target_ids)
    return ids.to(device), mask.to(device), labels.to(device)


def lm_loss(model, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
            reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the next token on target positions (mean, or per-token sum)."""
    ids, mask, labels = batch
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    tgt = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                           ignore_index=-100, reduction=reduction)


def soft_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)) averaged over masked positions.

    Only meaningful when both models share a tokenizer (same vocabulary indices)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError("soft KD needs identical vocabularies (same tokenizer)")
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    m = mask.float()
    return (kl * m).sum() / m.sum().clamp(min=1.0) * t * t


@torch.no_grad()
def mean_loss(model, examples: Sequence[Example], pad_id: int, device: torch.device,
              batch_size: int = 64) -> float:
    """Mean per-token CE over the targets of ``examples`` (validation loss, L_pre/L_post)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i: i + batch_size], pad_id, device)
        total += float(lm_loss(model, batch, reduction="sum"))
        count += int((batch[2][:, 1:] != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def token_accuracy(model, examples: Sequence[Example], pad_id: int, device: torch.device,
                   batch_size: int = 64) -> float:
    """Share of target tokens the model predicts exactly (teacher-forced): task score."""
    was_training = model.training
    model.eval()
    hit, count = 0, 0
    for i in range(0, len(examples), batch_size):
        ids, mask, labels = collate(examples[i: i + batch_size], pad_id, device)
        pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
        tgt = labels[:, 1:]
        sel = tgt != -100
        hit += int((pred[sel] == tgt[sel]).sum())
        count += int(sel.sum())
    model.train(was_training)
    return hit / max(count, 1)


# ---------------------------------------------------------------------------------
# Generation (teacher side and evaluation)


def newline_token_ids(tokenizer) -> list[int]:
    """Ids of every token whose text contains a newline: generation of one-line bodies
    stops at the first of them."""
    ids = []
    for i in range(len(tokenizer)):
        if "\n" in tokenizer.decode([i]):
            ids.append(i)
    return ids


def truncate_completion(text: str, one_line: bool) -> str:
    """Cut generated text to the function body: the first line for one-line tasks, or
    up to the next top-level statement for multi-line (HumanEval-style) tasks."""
    if one_line:
        return text.split("\n", 1)[0] + "\n"
    for stop in ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "):
        pos = text.find(stop)
        if pos != -1:
            text = text[:pos]
    return text.rstrip() + "\n"


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, device: torch.device,
             max_new_tokens: int = 40, one_line: bool = True, temperature: float = 0.0,
             seed: int = 0, batch_size: int = 64, stop_ids: Sequence[int] | None = None) -> list[str]:
    """Completions for ``prompts``; greedy when ``temperature`` is 0, else sampled.

    Prompts are bucketed by token length so no batch needs padding: absolute-position
    models (gpt2) would otherwise see shifted positions under left padding."""
    was_training = model.training
    model.eval()
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    buckets: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        buckets.setdefault(len(ids), []).append(i)
    out: list[str] = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = list(stop_ids) if stop_ids else None
    if eos is None and tokenizer.eos_token_id is not None:
        eos = [tokenizer.eos_token_id]
    torch.manual_seed(seed)
    for length in sorted(buckets):
        idx = buckets[length]
        for j in range(0, len(idx), batch_size):
            chunk = idx[j: j + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk], device=device)
            kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens,
                      "pad_token_id": pad_id, "eos_token_id": eos}
            if temperature > 0:
                kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            for row, i in enumerate(chunk):
                text = tokenizer.decode(gen[row, length:], skip_special_tokens=True)
                out[i] = truncate_completion(text, one_line)
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------
# Training


@dataclass(frozen=True, slots=True)
class DistillResult:
    loss_pre: float
    loss_post: float
    step_losses: tuple[float, ...]
    alpha: float
    temperature: float
    seconds: float


def train_steps(model, optimizer, local: Sequence[Example], kd: Sequence[Example], *,
                alpha: float, steps: int, batch_size: int, pad_id: int, device: torch.device,
                seed: int, max_grad_norm: float = 1.0) -> list[float]:
    """``steps`` optimisation steps of Eq. 2. Each step draws one local batch and (when
    ``kd`` is non-empty and α > 0) one batch of teacher text; α = 0 or no KD data is the
    LocalOnly update. Returns the combined loss per step."""
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        use_kd = bool(kd) and alpha > 0
        loss = torch.zeros((), device=device)
        if local and (not use_kd or alpha < 1):
            batch = collate(rng.sample(list(local), min(batch_size, len(local))), pad_id, device)
            loss = loss + (1.0 - alpha if use_kd else 1.0) * lm_loss(model, batch)
        if use_kd:
            batch = collate(rng.sample(list(kd), min(batch_size, len(kd))), pad_id, device)
            loss = loss + alpha * lm_loss(model, batch)
        if not loss.requires_grad:
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
    return losses


def distill(model, optimizer, *, local: Sequence[Example], kd: Sequence[Example],
            val: Sequence[Example], arm: ProtocolArm, round_: int, total_rounds: int,
            steps: int, batch_size: int, pad_id: int, device: torch.device,
            seed: int) -> DistillResult:
    """One student-side KD round: L_pre on validation, ``steps`` of Eq. 2, L_post."""
    t0 = time.perf_counter()
    alpha, temp = effective_knobs(round_, arm, total_rounds)
    pre = mean_loss(model, val, pad_id, device)
    losses = train_steps(model, optimizer, local, kd, alpha=alpha, steps=steps,
                         batch_size=batch_size, pad_id=pad_id, device=device, seed=seed)
    post = mean_loss(model, val, pad_id, device)
    seconds = time.perf_counter() - t0
    log.info("agent.distill.done", round=round_, alpha=round(alpha, 3), items=len(kd),
             steps=len(losses), loss_pre=round(pre, 4), loss_post=round(post, 4),
             duration_ms=int(seconds * 1000))
    return DistillResult(pre, post, tuple(losses), alpha, temp, seconds)
