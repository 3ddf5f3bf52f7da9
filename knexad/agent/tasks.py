"""Task sets for the ML agent: built-in generator, HumanEval, MBPP; non-IID partitions.

The built-in generator makes one-line Python function-writing tasks in 12 categories
(design §5, §9). Each task is a ``def`` line plus a docstring that names concrete
constants and argument names, a one-line reference body, and three asserts. The
category decides *which operation* the docstring's wording maps to; the names and
constants decide *what to copy*. A model that never saw a category's wording cannot
guess its operation, which is what makes knowledge from a peer measurable.

Categories come in two groups of six that share a parameter signature: the integer
group (argument + int constant ``k``) and the string group (argument + string constant
``c``). The base pre-training corpus (``pretrain_example``) pairs a prompt with the
body of *another* category of the same group, rendered with this prompt's own names
and constants: it teaches "copy the names and constants" without ever showing the
correct wording→operation mapping (design §9, key lesson).

Splits: every agent has private train (Dirichlet(α)-skewed over categories) and a
validation split that spans all categories (the organisation's small benchmark of what
it wants to be good at, so gains on categories it lacks show in L_pre − L_post); the
transfer set and the test set are shared and span all categories. No split shares a
prompt with another: ``assert_disjoint`` checks it by SHA-256 of the normalised prompt.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol.profile import N_CATEGORIES

CATEGORY_NAMES: tuple[str, ...] = (
    "math", "lists", "slicing", "compare", "filter", "aggregate",
    "strings", "count", "dicts", "prefix", "replace", "search",
)
INT_GROUP: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
STR_GROUP: tuple[int, ...] = (6, 7, 8, 9, 10, 11)


@dataclass(frozen=True, slots=True)
class Task:
    """One function-writing task.

    ``prompt`` is the code the model is given (def line + docstring), ``solution`` the
    reference body, ``test`` code that raises if the program is wrong (asserts, or
    HumanEval's ``check`` plus its call). The program executed for evaluation is
    ``prompt + completion + "\\n" + test``.
    """

    task_id: str
    category: int
    prompt: str
    solution: str
    test: str
    entry_point: str


# ---------------------------------------------------------------------------------
# Category templates. ``doc`` and ``body`` are format strings over {a} (argument
# name), {k} (int constant) and {c} (string constant); ``ref`` computes the expected
# value for an input, ``gen`` draws a test input. Kept in one table so the mapping is
# reviewable at a glance.


@dataclass(frozen=True, slots=True)
class _Template:
    doc: str
    body: str
    ref: Callable[[Any, int, str], Any]
    gen: Callable[[random.Random, int, str], Any]


def _rand_word(rng: random.Random, c: str = "") -> str:
    """A short lowercase word that contains ``c`` about half the time (for str tests)."""
    letters = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6)))
    if c and rng.random() < 0.6:
        pos = rng.randint(0, len(letters))
        letters = letters[:pos] + c + letters[pos:]
    if c and rng.random() < 0.3:
        letters = c + letters
    return letters


def _rand_ints(rng: random.Random, k: int) -> list[int]:
    return [rng.randint(0, 2 * k + 5) for _ in range(rng.randint(2, 6))]


def _rand_dict(rng: random.Random, c: str) -> dict[str, int]:
    keys = {_rand_word(rng) for _ in range(rng.randint(1, 3))}
    if rng.random() < 0.7:
        keys.add(c)
    return {key: rng.randint(0, 50) for key in sorted(keys)}


_TEMPLATES: tuple[_Template, ...] = (
    _Template('Return the remainder of {a} divided by {k}.', 'return {a} % {k}',
              lambda x, k, c: x % k, lambda r, k, c: r.randint(0, 500)),
    _Template('Return a new list with every element of {a} multiplied by {k}.',
              'return [v * {k} for v in {a}]',
              lambda x, k, c: [v * k for v in x], lambda r, k, c: _rand_ints(r, k)),
    _Template('Return the first {k} elements of the list {a}.', 'return {a}[:{k}]',
              lambda x, k, c: x[:k],
              lambda r, k, c: [r.randint(0, 9) for _ in range(r.randint(0, k + 3))]),
    _Template('Return True if {a} is greater than {k}, else False.', 'return {a} > {k}',
              lambda x, k, c: x > k, lambda r, k, c: r.randint(0, 2 * k)),
    _Template('Return the elements of {a} that are smaller than {k}.',
              'return [v for v in {a} if v < {k}]',
              lambda x, k, c: [v for v in x if v < k], lambda r, k, c: _rand_ints(r, k)),
    _Template('Return the sum of the numbers in {a} plus {k}.', 'return sum({a}) + {k}',
              lambda x, k, c: sum(x) + k, lambda r, k, c: _rand_ints(r, k)),
    _Template("Return the string {a} with '{c}' appended at the end.", "return {a} + '{c}'",
              lambda x, k, c: x + c, lambda r, k, c: _rand_word(r)),
    _Template("Return how many times '{c}' occurs in the string {a}.",
              "return {a}.count('{c}')",
              lambda x, k, c: x.count(c), lambda r, k, c: _rand_word(r, c)),
    _Template("Return the value stored under key '{c}' in the dict {a}, or None.",
              "return {a}.get('{c}')",
              lambda x, k, c: x.get(c), lambda r, k, c: _rand_dict(r, c)),
    _Template("Return True if the string {a} starts with '{c}'.",
              "return {a}.startswith('{c}')",
              lambda x, k, c: x.startswith(c), lambda r, k, c: _rand_word(r, c)),
    _Template("Return the string {a} with every '{c}' removed.",
              "return {a}.replace('{c}', '')",
              lambda x, k, c: x.replace(c, ""), lambda r, k, c: _rand_word(r, c)),
    _Template("Return the position of the first '{c}' in the string {a}, or -1.",
              "return {a}.find('{c}')",
              lambda x, k, c: x.find(c), lambda r, k, c: _rand_word(r, c)),
)
assert len(_TEMPLATES) == N_CATEGORIES == len(CATEGORY_NAMES)

_ARG_NAMES = ("a", "b", "x", "y", "n", "m", "s", "t", "data", "vals", "items", "seq",
              "text", "word", "nums", "arr")
_FN_HEADS = ("calc", "get", "make", "do", "run", "find", "eval", "proc", "comp", "go",
             "fetch", "build")
_FN_TAILS = ("alpha", "beta", "gamma", "delta", "foo", "bar", "baz", "qux", "zeta",
             "omega", "item", "value", "thing", "core")


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """The parameters a task is rendered from; kept so pre-training can re-render."""

    category: int
    fn: str
    arg: str
    k: int
    c: str

    def body_key(self) -> tuple[int, str, int | str]:
        """Two specs with the same key have the same reference body (a duplicate)."""
        value: int | str = self.k if self.category in INT_GROUP else self.c
        return (self.category, self.arg, value)


def _fmt(template: str, spec: TaskSpec) -> str:
    return template.format(a=spec.arg, k=spec.k, c=spec.c)


def render_prompt(spec: TaskSpec) -> str:
    doc = _fmt(_TEMPLATES[spec.category].doc, spec)
    return f'def {spec.fn}({spec.arg}):\n    """{doc}"""\n'


def render_body(spec: TaskSpec, category: int | None = None) -> str:
    """The one-line body of ``category`` (default: the spec's own) with spec's names."""
    cat = spec.category if category is None else category
    return "    " + _fmt(_TEMPLATES[cat].body, spec) + "\n"


def render_task(spec: TaskSpec, task_id: str, seed: int) -> Task:
    """Render a spec into a Task with three asserts whose expected values are computed
    by the category's reference function (never by executing generated code)."""
    tpl = _TEMPLATES[spec.category]
    rng = random.Random(f"{seed}:{task_id}:tests")
    lines = []
    for _ in range(3):
        x = tpl.gen(rng, spec.k, spec.c)
        lines.append(f"assert {spec.fn}({x!r}) == {tpl.ref(x, spec.k, spec.c)!r}")
    return Task(task_id=task_id, category=spec.category, prompt=render_prompt(spec),
                solution=render_body(spec), test="\n".join(lines) + "\n", entry_point=spec.fn)


def _random_spec(rng: random.Random, category: int) -> TaskSpec:
    fn = f"{rng.choice(_FN_HEADS)}_{rng.choice(_FN_TAILS)}"
    if rng.random() < 0.5:
        fn += str(rng.randint(1, 9))
    clen = 1 if rng.random() < 0.4 else 2
    c = "".join(rng.choice(string.ascii_lowercase) for _ in range(clen))
    return TaskSpec(category, fn, rng.choice(_ARG_NAMES), rng.randint(2, 99), c)


def generate_specs(category: int, count: int, seed: int,
                   exclude: set[tuple[int, str, int | str]] | None = None) -> list[TaskSpec]:
    """``count`` specs of one category with distinct bodies, deterministic by seed."""
    rng = random.Random(f"knexa-tasks:{seed}:{category}")
    seen: set[tuple[int, str, int | str]] = set(exclude or ())
    out: list[TaskSpec] = []
    tries = 0
    while len(out) < count:
        tries += 1
        if tries > 50 * count + 1000:
            raise ValueError(f"category {category}: cannot draw {count} distinct tasks")
        spec = _random_spec(rng, category)
        if spec.body_key() in seen:
            continue
        seen.add(spec.body_key())
        out.append(spec)
    return out


def generate_tasks(per_category: int, seed: int = 0,
                   categories: Sequence[int] = tuple(range(N_CATEGORIES))) -> list[Task]:
    """Thousands of tasks on demand: ``per_category`` distinct tasks for each category."""
    tasks = []
    for cat in categories:
        for i, spec in enumerate(generate_specs(cat, per_category, seed)):
            tasks.append(render_task(spec, f"gen/{seed}/{cat}/{i}", seed))
    return tasks


def partner_category(category: int, rng: random.Random) -> int:
    """Another category of the same parameter group (never the category itself)."""
    group = INT_GROUP if category in INT_GROUP else STR_GROUP
    return rng.choice([c for c in group if c != category])


def pretrain_pair(rng: random.Random) -> tuple[TaskSpec, int]:
    """A random spec and the partner category whose operation its body will use."""
    spec = _random_spec(rng, rng.randrange(N_CATEGORIES))
    return spec, partner_category(spec.category, rng)


def pretrain_example(rng: random.Random) -> tuple[str, str]:
    """(prompt, body) for generic base pre-training: a prompt of a random category with
    the body of *another* category's operation but this prompt's names and constants.
    Teaches syntax and copying, never the wording→operation mapping (design §9)."""
    spec, partner = pretrain_pair(rng)
    return render_prompt(spec), render_body(spec, partner)


# ---------------------------------------------------------------------------------
# Hashing and disjointness


def normalize_prompt(prompt: str) -> str:
    """Whitespace-insensitive form used for overlap checks."""
    return " ".join(prompt.split())


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(normalize_prompt(prompt).encode("utf-8")).hexdigest()


def assert_disjoint(splits: dict[str, Sequence[Task]]) -> None:
    """Raise ``ValueError`` naming the two splits when any prompt appears in both (or
    twice within one split). Compared by SHA-256 of the normalised prompt."""
    owner: dict[str, str] = {}
    for name, tasks in splits.items():
        for task in tasks:
            h = prompt_hash(task.prompt)
            if h in owner:
                raise ValueError(f"overlap: task {task.task_id} of {name!r} "
                                 f"also in {owner[h]!r} (sha256 {h[:12]})")
            owner[h] = name


def transfer_set_hash(transfer: Sequence[Task]) -> str:
    """Hex SHA-256 over the ordered transfer prompts: peers must agree on it."""
    h = hashlib.sha256()
    for task in transfer:
        h.update(prompt_hash(task.prompt).encode("ascii"))
    return h.hexdigest()


# ---------------------------------------------------------------------------------
# Partition


@dataclass(frozen=True, slots=True)
class AgentSplit:
    """One agent's private data plus the shared test set."""

    train: tuple[Task, ...]
    val: tuple[Task, ...]
    test: tuple[Task, ...]
    proportions: tuple[float, ...]

    def histogram(self) -> list[float]:
        """Category histogram of the private train split, normalised to sum 1."""
        counts = np.bincount([t.category for t in self.train], minlength=N_CATEGORIES)
        total = counts.sum()
        return [float(v) / total if total else 0.0 for v in counts]

    def own_categories(self, threshold: float = 0.05) -> tuple[int, ...]:
        """Categories holding ≥ ``threshold`` of the private train split."""
        return tuple(i for i, v in enumerate(self.histogram()) if v >= threshold)


@dataclass(frozen=True, slots=True)
class Partition:
    agents: tuple[AgentSplit, ...]
    transfer: tuple[Task, ...]
    test: tuple[Task, ...]
    meta: dict[str, float | int | str] = field(default_factory=dict)

    def transfer_set_hash(self) -> str:
        return transfer_set_hash(self.transfer)

    def check_disjoint(self) -> None:
        splits: dict[str, Sequence[Task]] = {"transfer": self.transfer, "test": self.test}
        for i, agent in enumerate(self.agents):
            splits[f"agent{i}.train"] = agent.train
            splits[f"agent{i}.val"] = agent.val
        assert_disjoint(splits)


def _alloc(total: int, props: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total``, proportional to ``props`` (largest rest)."""
    raw = props * total
    counts = np.floor(raw).astype(int)
    rest = total - counts.sum()
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


BUILTIN_ALPHA = 0.1  # Dirichlet concentration of a daemon's private split (design §5: non-IID)


@dataclass(frozen=True, slots=True)
class DataConfig:
    """Sizes of the splits; ``owned`` replaces the Dirichlet draw (controlled runs)."""

    n_train: int = 240
    n_val_per_cat: int = 4
    n_test_per_cat: int = 10
    n_transfer: int = 128
    owned: tuple[tuple[int, ...], ...] | None = None


def partition_for(n_agents: int, alpha: float, seed: int, data: DataConfig = DataConfig()) -> Partition:
    """``partition`` with the sizes of ``data``: how an ML agent draws its world, and how
    ``knexad config show`` / ``doctor`` compute its transfer-set hash without torch."""
    return partition(n_agents, alpha, seed, n_train=data.n_train, n_val_per_cat=data.n_val_per_cat,
                     n_test_per_cat=data.n_test_per_cat, n_transfer=data.n_transfer, owned=data.owned)


def partition(n_agents: int, alpha: float = 0.1, seed: int = 0, *, n_train: int = 240,
              n_val_per_cat: int = 4, n_test_per_cat: int = 10, n_transfer: int = 128,
              owned: Sequence[Sequence[int]] | None = None) -> Partition:
    """Dirichlet(α) non-IID split over categories across ``n_agents``.

    Each agent draws category proportions q_i ~ Dir(α·1) (or uniform over ``owned[i]``
    when given, for controlled experiments) and gets ``n_train`` private tasks allocated
    by q_i. Validation (``n_val_per_cat`` per category), the shared transfer set
    (``n_transfer`` mixed round-robin over categories) and the shared test set
    (``n_test_per_cat`` per category) span all categories. Deterministic by seed; every
    split is disjoint from every other (checked before returning).
    """
    if n_agents < 1:
        raise ValueError("n_agents must be ≥ 1")
    if owned is not None and len(owned) != n_agents:
        raise ValueError("owned must list categories for every agent")
    rng = np.random.default_rng(seed)
    props = []
    for i in range(n_agents):
        if owned is not None:
            p = np.zeros(N_CATEGORIES)
            p[list(owned[i])] = 1.0 / len(owned[i])
        else:
            p = rng.dirichlet(np.full(N_CATEGORIES, alpha))
        props.append(p)
    train_counts = [_alloc(n_train, p) for p in props]
    transfer_counts = _alloc(n_transfer, np.full(N_CATEGORIES, 1.0 / N_CATEGORIES))
    need = [int(sum(c[cat] for c in train_counts)) + n_val_per_cat * n_agents
            + n_test_per_cat + int(transfer_counts[cat]) for cat in range(N_CATEGORIES)]
    pools = {cat: generate_specs(cat, need[cat], seed) for cat in range(N_CATEGORIES)}
    cursor = dict.fromkeys(range(N_CATEGORIES), 0)

    def take(cat: int, n: int, tag: str) -> list[Task]:
        start = cursor[cat]
        cursor[cat] += n
        return [render_task(spec, f"{tag}/{cat}/{start + j}", seed)
                for j, spec in enumerate(pools[cat][start:start + n])]

    transfer_by_cat = [take(c, int(transfer_counts[c]), "transfer") for c in range(N_CATEGORIES)]
    transfer = []  # round-robin so any prefix is mixed over categories
    for j in range(max(len(x) for x in transfer_by_cat)):
        transfer.extend(x[j] for x in transfer_by_cat if j < len(x))
    test = tuple(t for c in range(N_CATEGORIES) for t in take(c, n_test_per_cat, "test"))
    agents = []
    for i in range(n_agents):
        train = [t for c in range(N_CATEGORIES) for t in take(c, int(train_counts[i][c]),
                                                                f"a{i}/train")]
        random.Random(f"{seed}:{i}:shuffle").shuffle(train)
        val = [t for c in range(N_CATEGORIES) for t in take(c, n_val_per_cat, f"a{i}/val")]
        agents.append(AgentSplit(tuple(train), tuple(val), test,
                                 tuple(float(v) for v in props[i])))
    part = Partition(tuple(agents), tuple(transfer), test,
                     {"n_agents": n_agents, "alpha": alpha, "seed": seed})
    part.check_disjoint()
    return part
