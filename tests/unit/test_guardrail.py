"""Guardrail: each rule drops what it should and keeps its near miss."""

from __future__ import annotations

import random

import pytest
from structlog.testing import capture_logs

from knexad.agent.guardrail import (
    GuardrailIndex,
    GuardrailReport,
    PrivateIndex,
    build_index,
    filter_items,
    luhn_valid,
    scan_text,
)
from knexad.agent_api import KnowledgeItem

PROMPT = 'def double(xs):\n    """Double every element."""\n'


def _item(completion: str, item_id: str = "i", prompt: str = PROMPT) -> KnowledgeItem:
    return KnowledgeItem(item_id=item_id, prompt=prompt, completion=completion)


# (reason, positive text, near-miss text that must be kept)
CASES = [
    (
        "secret.private_key",
        "KEY = '''-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----'''",
        "PUB = '''-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkq\n-----END PUBLIC KEY-----'''",
    ),
    ("secret.private_key", "-----BEGIN OPENSSH PRIVATE KEY-----", "-----BEGIN CERTIFICATE-----"),
    ("secret.aws_access_key", "aws_id = 'AKIAIOSFODNN7EXAMPLE'", "prefix = 'AKIA1234'"),
    ("secret.api_token", "client = OpenAI(api_key='sk-proj-4fGh7Jk9LmN2pQ5rStUvWx')", "x = 'sk-short'"),
    ("secret.api_token", "tok = 'ghp_" + "a1B2c3D4e5" * 4 + "'", "name = 'ghp_readme'"),
    ("secret.api_token", "SLACK = 'xoxb-1234567890-abcdefghij'", "s = 'xox-b'"),
    (
        "secret.jwt",
        "t = 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U'",
        "header = 'eyJhbGciOiJIUzI1NiJ9'",
    ),
    (
        "secret.assigned_value",
        'db_password = "Zx9f3Kq7Lp2Wm8Rt4Vn6"',
        'password = input("password: ")',
    ),
    ("secret.assigned_value", "API_KEY=3f9a1c7e5b2d4a6f8e0c1b3d5a7f9e2c", 'secret = "aaaaaaaaaaaaaaaaaaaaaaaa"'),
    ("secret.assigned_value", "{'auth_token': 'q8WzR2xT5vB9nM4kL7jH'}", "token = tokenizer.encode_batch_sequence"),
    ("pii.email", "contact = 'jane.doe@acme-corp.com'", "contact = 'jane.doe@example.com'"),
    ("pii.email", "send('bob@mail.co.uk')", "y = x@self.weights"),
    ("pii.email", "to = 'ops@company.io'", "@property\ndef name(self):"),
    ("pii.phone", "call('+44 20 7946 0958')", "call('+1 415-555-0132')"),  # 555-01xx is fictional
    ("pii.phone", "phone = '(212) 867-5309'", "n = 2128675309"),
    ("pii.phone", "phone = '212-867-5309'", "date = '2023-01-15'"),
    ("pii.ipv4", "HOST = '8.8.4.4'", "HOST = '127.0.0.1'"),
    ("pii.ipv4", "connect('93.184.216.34')", "lan = '192.168.1.20'; doc = '203.0.113.7'"),
    ("pii.ipv4", "ip = '52.94.236.248'", "bad = '256.300.1.1'"),
    ("pii.credit_card", "card = '4111 1111 1111 1111'", "card = '4111 1111 1111 1112'"),  # Luhn fails
    ("pii.credit_card", "pan = 5555555555554444", "n = 1234567812345670"),  # valid Luhn, no issuer
    ("pii.credit_card", "amex = '3782-822463-10005'", "x = 3.782822463100050"),
]


@pytest.mark.parametrize(("reason", "positive", "near_miss"), CASES)
def test_rule_positive_and_near_miss(reason: str, positive: str, near_miss: str) -> None:
    assert scan_text(positive) == reason
    assert scan_text(near_miss) is None


@pytest.mark.parametrize(("reason", "positive", "near_miss"), CASES)
def test_rules_apply_to_prompt_and_completion(reason: str, positive: str, near_miss: str) -> None:
    items = [
        _item(positive, "in-completion"),
        _item("return xs", "in-prompt", prompt=PROMPT + "# " + positive + "\n"),
        _item(near_miss, "near-miss"),
    ]
    report = filter_items(items)
    assert [i.item_id for i in report.kept] == ["near-miss"]
    assert report.dropped == (("in-completion", reason), ("in-prompt", reason))


def test_luhn() -> None:
    assert luhn_valid("79927398713")
    assert not luhn_valid("79927398710")
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111121")
    assert not luhn_valid("12a4")
    assert not luhn_valid("")


CLEAN = [
    "    return [x * 2 for x in xs]\n",
    "    return sorted(set(xs), key=lambda v: (-v, str(v)))\n",
    "    total = 0\n    for k, v in d.items():\n        total += v\n    return total\n",
    "    return a @ b.T\n",
    "    return '.'.join(str(int(p)) for p in ip.split('.'))\n",
    "    return hashlib.sha256(s.encode()).hexdigest()\n",
    "    return 12345678901234567890 % n\n",
    "    return version >= (3, 11, 7)\n",
]


def test_clean_code_is_never_dropped() -> None:
    items = [_item(c, f"c{i}") for i, c in enumerate(CLEAN)]
    report = filter_items(items, private_texts=["def unrelated():\n    return 42\n" * 5])
    assert report.dropped == ()
    assert report.kept == tuple(items)


PRIVATE = [
    "def merge_intervals(intervals):\n"
    "    intervals = sorted(intervals, key=lambda iv: iv[0])\n"
    "    merged = [list(intervals[0])]\n"
    "    for start, end in intervals[1:]:\n"
    "        if start <= merged[-1][1]:\n"
    "            merged[-1][1] = max(merged[-1][1], end)\n"
    "        else:\n"
    "            merged.append([start, end])\n"
    "    return merged\n",
    "def count_vowels(text):\n    return sum(1 for ch in text.lower() if ch in 'aeiou')\n",
]


def test_overlap_with_private_data_is_dropped() -> None:
    leaked = PRIVATE[0].split("\n", 1)[1]  # the body, verbatim
    # same task, independently written: shares short idioms but no long span
    independent = (
        "    out = []\n"
        "    for a, b in sorted(intervals):\n"
        "        if out and a <= out[-1][1]:\n"
        "            out[-1][1] = max(out[-1][1], b)\n"
        "        else:\n"
        "            out.append([a, b])\n"
        "    return out\n"
    )
    items = [_item(leaked, "leak"), _item(independent, "own"), _item("    return []\n", "short")]
    with capture_logs() as logs:
        report = filter_items(items, private_texts=PRIVATE)
    assert report.dropped == (("leak", "overlap.private_data"),)
    assert [i.item_id for i in report.kept] == ["own", "short"]
    event = [e for e in logs if e["event"] == "guardrail.dropped"]
    assert event and event[0]["reasons"] == {"overlap.private_data": 1}
    assert event[0]["n_dropped"] == 1 and event[0]["n_kept"] == 2


def test_overlap_threshold_is_a_fraction_of_the_completion() -> None:
    index = build_index(PRIVATE, ngram=8)
    body = PRIVATE[0]
    fresh = " ".join(f"v{i} = {i} * {i} + {i}" for i in range(13))  # about as many new tokens
    half = body + "\n" + fresh
    assert index.overlap(body) == pytest.approx(1.0)
    assert 0.3 < index.overlap(half) < 0.7
    assert index.overlap(fresh) == 0.0
    mixed = [_item(half, "half")]
    assert filter_items(mixed, index=index, max_overlap=0.2).dropped == (("half", "overlap.private_data"),)
    assert filter_items(mixed, index=index, max_overlap=0.9).dropped == ()


def test_index_is_reusable_compact_and_whitespace_insensitive() -> None:
    rng = random.Random(0)
    words = [f"w{rng.randrange(5000)}" for _ in range(50_000)]
    corpus = [" ".join(words[i : i + 500]) for i in range(0, len(words), 500)]
    index = PrivateIndex(corpus, ngram=12)
    assert GuardrailIndex is PrivateIndex
    assert 0 < len(index) <= 50_000 and index.nbytes == 8 * len(index)
    reformatted = "\n\t".join(words[1000:1100])  # same tokens, different whitespace
    assert index.overlap(reformatted) == pytest.approx(1.0)
    for _ in range(3):  # reuse across packages gives the same answer
        report = filter_items([_item(reformatted, "r"), _item("return 1", "k")], index=index)
        assert report.dropped == (("r", "overlap.private_data"),)


def test_char_ngrams() -> None:
    index = build_index(["the quick brown fox jumps over the lazy dog"], ngram=10, unit="char")
    assert index.overlap("the  quick brown\nfox jumps") == pytest.approx(1.0)
    assert index.overlap("completely different sentence") == 0.0


def test_secrets_are_never_logged() -> None:
    secret = "sk-proj-4fGh7Jk9LmN2pQ5rStUvWx"
    with capture_logs() as logs:
        report = filter_items([_item(f"key = '{secret}'", "s")])
    assert report.reason_counts() == {"secret.api_token": 1}
    assert logs and secret not in repr(logs)


def test_report_and_argument_checks() -> None:
    report = filter_items([])
    assert report == GuardrailReport(kept=(), dropped=())
    with pytest.raises(ValueError):
        filter_items([], max_overlap=0.0)
    with pytest.raises(ValueError):
        filter_items([], private_texts=["x"], index=build_index(["x"]))
    with pytest.raises(ValueError):
        PrivateIndex([], ngram=0)
