"""External benchmarks load offline into Task, and their reference programs pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knexad.agent.evaluate import check_programs
from knexad.agent.external_tasks import (
    CATEGORY_NAMES,
    MbppFormatError,
    categorize,
    humaneval_data_path,
    load_humaneval,
    load_mbpp,
)


def _program(task, completion: str | None = None) -> str:
    return task.prompt + (task.solution if completion is None else completion) + "\n" + task.test


def test_humaneval_loads_all_tasks_from_the_installed_package() -> None:
    assert humaneval_data_path().name == "HumanEval.jsonl.gz"
    tasks = load_humaneval()
    assert len(tasks) == 164
    assert len({t.task_id for t in tasks}) == 164
    first = tasks[0]
    assert first.task_id == "HumanEval/0" and first.entry_point == "has_close_elements"
    assert first.test.rstrip().endswith("check(has_close_elements)")
    assert all(t.prompt.rstrip().endswith('"""') or "def " in t.prompt for t in tasks)
    assert all(-1 <= t.category < len(CATEGORY_NAMES) for t in tasks)
    assert len({t.category for t in tasks}) >= 10  # the keyword rule spreads the tasks
    assert [t.category for t in load_humaneval()] == [t.category for t in tasks]  # deterministic


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail() -> None:
    tasks = load_humaneval()[::16]  # 11 tasks spread over the set
    progs = [_program(t) for t in tasks] + [_program(t, "    return None\n") for t in tasks[:3]]
    res = check_programs(progs, timeout_s=10.0)
    assert res[: len(tasks)] == [True] * len(tasks)
    assert res[len(tasks) :] == [False, False, False]


def test_categorize_rules() -> None:
    assert CATEGORY_NAMES[categorize("Return the list sorted.", "sort_third")] == "sorting"
    assert CATEGORY_NAMES[categorize("Return true if a given number is prime.")] == "number_theory"
    assert CATEGORY_NAMES[categorize("Decode a string encoded with encode_cyclic.")] == "encoding"
    assert CATEGORY_NAMES[categorize("Reverse the words of a sentence.")] == "strings"
    assert CATEGORY_NAMES[categorize("Nothing to see.\n>>> f('string')")] != "strings"  # examples ignored
    assert categorize("Zzz qqq.") == -1


MBPP_ROWS = [
    {  # helper + import before the tested function, CRLF line endings
        "task_id": 11,
        "text": "Write a python function to remove first and last occurrence of a given character.",
        "code": "import re\r\ndef _strip(s):\r\n    return s\r\ndef remove_Occ(s,ch): \r\n"
        "    s = _strip(s)\r\n    for i in range(len(s)): \r\n        if (s[i] == ch): \r\n"
        "            s = s[0 : i] + s[i + 1:] \r\n            break\r\n"
        "    for i in range(len(s) - 1,-1,-1):  \r\n        if (s[i] == ch): \r\n"
        "            s = s[0 : i] + s[i + 1:] \r\n            break\r\n    return s ",
        "test_list": [
            'assert remove_Occ("hello","l") == "heo"',
            'assert remove_Occ("abcda","a") == "bcd"',
        ],
        "test_setup_code": "",
    },
    {  # one-line function, tab indentation elsewhere does not matter
        "task_id": 12,
        "text": 'Write a function to "square" a number.',
        "code": "def square(x): return x * x",
        "test_list": ["assert square(3) == 9", "assert square(-2) == 4"],
    },
    {  # setup code used by the tests; tab-indented body
        "task_id": 13,
        "text": "Write a function to add a constant.",
        "code": "def add_k(x):\n\tk = 2\n\treturn x + k",
        "test_list": ["assert add_k(BASE) == 12"],
        "test_setup_code": "BASE = 10",
    },
]


def test_mbpp_loader_builds_runnable_tasks(tmp_path: Path) -> None:
    path = tmp_path / "mbpp.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in MBPP_ROWS) + "\n\n")
    tasks = load_mbpp(path)
    assert [t.task_id for t in tasks] == ["MBPP/11", "MBPP/12", "MBPP/13"]
    assert [t.entry_point for t in tasks] == ["remove_Occ", "square", "add_k"]
    t0 = tasks[0]
    assert t0.prompt.startswith("import re\n")
    assert "def remove_Occ(s,ch):" in t0.prompt
    assert '"""Write a python function to remove first and last occurrence' in t0.prompt
    assert "\r" not in t0.prompt + t0.solution + t0.test
    assert t0.solution.lstrip().startswith("s = _strip(s)")
    assert tasks[2].test.startswith("BASE = 10\n")
    res = check_programs([_program(t) for t in tasks] + [_program(tasks[1], "    return x\n")])
    assert res == [True, True, True, False]


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"task_id": 9, "text": "t", "code": "x = 1", "test_list": ["assert x"]}), "no top-level function"),
        (json.dumps({"task_id": 9, "text": "t", "code": "def f(:", "test_list": ["assert f()"]}), "cannot parse"),
        (json.dumps({"task_id": 9, "text": "t", "code": "def f(): pass", "test_list": []}), "test_list"),
        (json.dumps({"text": "t", "code": "def f(): pass", "test_list": ["f()"]}), "task_id"),
        (json.dumps(["not", "an", "object"]), "JSON object"),
    ],
)
def test_mbpp_malformed_line_names_the_line(tmp_path: Path, bad_line: str, reason: str) -> None:
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps(MBPP_ROWS[1]) + "\n\n" + bad_line + "\n")
    with pytest.raises(MbppFormatError) as info:
        load_mbpp(path)
    assert isinstance(info.value, ValueError)
    assert info.value.line_no == 3
    assert f"{path}:3:" in str(info.value) and reason in str(info.value)
