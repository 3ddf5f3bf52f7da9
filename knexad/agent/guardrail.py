"""The knowledge guardrail: what a teacher refuses to send to a peer.

Knowledge items are teacher completions on shared transfer prompts. Before a package
leaves the daemon, an item is dropped when

* its prompt or completion contains a secret or PII pattern (private keys, cloud and API
  tokens, JWTs, high-entropy values assigned to secret-looking names, e-mail addresses,
  phone numbers, public IPv4 addresses, Luhn-valid card numbers), or
* its completion reproduces long spans of the teacher's private training data: the share
  of its token n-grams found in an index built once from the private texts reaches
  ``max_overlap``.

Placeholders that cannot identify anyone are allowed, so ordinary code about e-mails and
networks still flows: addresses at reserved documentation domains (example.com/.net/.org,
``.example``, ``.test``, ``.invalid``, ``.localhost``), the fictional NANP range 555-0100
to 555-0199, and non-global IPv4 addresses (loopback, private, link-local, documentation
TEST-NETs, 0.0.0.0, broadcast) per :mod:`ipaddress`. Card numbers are flagged when
Luhn-valid with a known issuer prefix, public test numbers included. The full rule list
is in docs/evaluation.md. This module imports no torch: the daemon uses it directly.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import structlog

from knexad.agent_api import KnowledgeItem

log = structlog.get_logger(__name__)

# ---------------------------------------------------------------------------- patterns

_PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_AWS_KEY = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}(?![A-Z0-9])")
_API_TOKENS = re.compile(
    r"(?<![\w-])(?:"
    r"sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"  # OpenAI / Anthropic style
    r"|(?:sk|rk|pk)_live_[A-Za-z0-9]{16,}"  # Stripe live keys
    r"|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}"  # GitHub
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|glpat-[A-Za-z0-9_-]{20,}"  # GitLab
    r")"
)
_JWT = re.compile(r"(?<![\w-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
_SECRET_NAME = r"[A-Za-z0-9_.-]*(?:key|token|secret|passw(?:or)?d|passwd|pwd|credentials?|auth)[A-Za-z0-9_]*"
_ASSIGNED_SECRET = re.compile(
    r"(?i)\b" + _SECRET_NAME + r"""['"]?\s*(?:=|:|=>)\s*[bru]?(['"]?)([A-Za-z0-9+/=_\-.~]{16,})\1"""
)
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@((?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24})(?![\w-])")
_PHONE = re.compile(
    r"(?<![\w.+-])(?:"
    r"\+\d{1,3}[ .-]?\(?\d{1,4}\)?(?:[ .-]\d{2,4}){2,4}"  # international: +CC then groups
    r"|\(\d{3}\)\s?\d{3}[ .-]\d{4}"  # (415) 555-0132
    r"|\d{3}[ .-]\d{3}[ .-]\d{4}"  # 415-555-0132
    r")(?![\w.-]*\d)"
)
_IPV4 = re.compile(r"(?<![\w.])(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?![\w]|\.\d)")
# contiguous 13-19 digits, 4-4-4-x groups, or Amex 4-6-5, one separator kind
_CARD = re.compile(
    r"(?<![\d.-])(?:\d{13,19}|\d{4}(?:[ -]\d{4}){2}[ -]\d{1,7}|\d{4}[ -]\d{6}[ -]\d{5})(?![\d.]|[ -]\d)"
)

_RESERVED_EMAIL_DOMAINS = ("example.com", "example.net", "example.org")
_RESERVED_EMAIL_TLDS = ("example", "test", "invalid", "localhost")
# Generic TLDs accepted besides any two-letter country code. Restricting TLDs keeps code
# like ``x@self.weights`` (matrix product) from reading as an address.
_GENERIC_TLDS = frozenset(
    "com net org edu gov mil int io ai dev app info biz me co name pro tech cloud online "
    "site xyz email mail mobi museum aero jobs travel".split()
)


def _entropy_bits_per_char(s: str) -> float:
    counts = Counter(s)
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _looks_random(value: str) -> bool:
    """Long hex or base64-ish values with high entropy, not words or repeated characters."""
    if len(value) < 16 or value.isalpha() and (value.islower() or value.isupper()):
        return False
    if re.fullmatch(r"[0-9a-fA-F]+", value):
        return len(value) >= 24 and _entropy_bits_per_char(value) >= 3.0
    classes = sum(bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"[0-9]"))
    return classes >= 2 and _entropy_bits_per_char(value) >= 3.5


def luhn_valid(digits: str) -> bool:
    """Luhn mod-10 checksum over a string of digits (card numbers carry one)."""
    if not digits.isdigit() or len(digits) < 2:
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_issuer_prefix(digits: str) -> bool:
    n = len(digits)
    two, four, six = int(digits[:2]), int(digits[:4]), int(digits[:6])
    return (
        (digits[0] == "4" and n in (13, 16, 19))  # Visa
        or (51 <= two <= 55 or 2221 <= four <= 2720) and n == 16  # Mastercard
        or two in (34, 37) and n == 15  # American Express
        or (digits.startswith("6011") or two == 65 or 644 <= int(digits[:3]) <= 649
            or 622126 <= six <= 622925) and 16 <= n <= 19  # Discover
        or 3528 <= four <= 3589 and 16 <= n <= 19  # JCB
        or two in (36, 38, 39) and 14 <= n <= 19 or 300 <= int(digits[:3]) <= 305 and n >= 14  # Diners
        or two == 62 and 16 <= n <= 19  # UnionPay
    )


def _has_email(text: str) -> bool:
    for m in _EMAIL.finditer(text):
        domain = m.group(1).lower()
        tld = domain.rsplit(".", 1)[-1]
        if domain in _RESERVED_EMAIL_DOMAINS or domain.endswith(tuple("." + d for d in _RESERVED_EMAIL_DOMAINS)):
            continue
        if tld in _RESERVED_EMAIL_TLDS:
            continue
        if len(tld) == 2 or tld in _GENERIC_TLDS:
            return True
    return False


def _has_phone(text: str) -> bool:
    for m in _PHONE.finditer(text):
        digits = re.sub(r"\D", "", m.group(0))
        if not 10 <= len(digits) <= 15:
            continue
        if re.search(r"555[ .-]?01\d\d$", m.group(0)):  # fictional NANP numbers
            continue
        return True
    return False


def _has_public_ipv4(text: str) -> bool:
    for m in _IPV4.finditer(text):
        if any(len(g) > 1 and g[0] == "0" for g in m.groups()):
            continue  # "01.02.03.04" is not how addresses are written (dates, versions)
        try:
            addr = ipaddress.IPv4Address(m.group(0))
        except ipaddress.AddressValueError:
            continue
        if addr.is_global:
            return True
    return False


def _has_card(text: str) -> bool:
    for m in _CARD.finditer(text):
        raw = m.group(0)
        digits = raw.replace(" ", "").replace("-", "")
        if not 13 <= len(digits) <= 19 or len(set(re.findall(r"[ -]", raw))) > 1:
            continue  # mixed separators: not a card as people write it
        if _card_issuer_prefix(digits) and luhn_valid(digits):
            return True
    return False


def _has_assigned_secret(text: str) -> bool:
    return any(_looks_random(m.group(2)) for m in _ASSIGNED_SECRET.finditer(text))


# Checked in this order; the first match names the reason. Stable reason codes.
_TEXT_RULES: tuple[tuple[str, Callable[[str], object]], ...] = (
    ("secret.private_key", _PRIVATE_KEY.search),
    ("secret.aws_access_key", _AWS_KEY.search),
    ("secret.api_token", _API_TOKENS.search),
    ("secret.jwt", _JWT.search),
    ("secret.assigned_value", _has_assigned_secret),
    ("pii.email", _has_email),
    ("pii.credit_card", _has_card),
    ("pii.phone", _has_phone),
    ("pii.ipv4", _has_public_ipv4),
)


def scan_text(text: str) -> str | None:
    """The reason code of the first secret/PII rule that ``text`` violates, else None."""
    for reason, rule in _TEXT_RULES:
        if rule(text):
            return reason
    return None


# ------------------------------------------------------------------ private-data index

_WORD_TOKEN = re.compile(r"\w+|[^\w\s]")
_BASE = np.uint64(1_000_003)


class PrivateIndex:
    """Hashed n-grams of the teacher's private training texts, built once per agent.

    Tokens are code-aware words (identifiers, numbers, single punctuation marks) or, with
    ``unit="char"``, characters of the whitespace-collapsed text. Each token maps to a
    64-bit BLAKE2b hash; an n-gram is a polynomial rolling hash of its tokens mod 2^64,
    computed with numpy. The index is a sorted, de-duplicated ``uint64`` array: 8 bytes
    per distinct n-gram (a 1 M-token corpus costs ~8 MB), lookups by binary search.
    """

    def __init__(
        self, private_texts: Iterable[str], ngram: int = 12, unit: Literal["word", "char"] = "word"
    ) -> None:
        if ngram < 1:
            raise ValueError("ngram must be >= 1")
        if unit not in ("word", "char"):
            raise ValueError("unit must be 'word' or 'char'")
        self.ngram = ngram
        self.unit = unit
        self._token_hash: dict[str, int] = {}
        parts = [self._ngram_hashes(t) for t in private_texts]
        parts = [p for p in parts if p.size]
        self._hashes = np.unique(np.concatenate(parts)) if parts else np.empty(0, np.uint64)

    def __len__(self) -> int:
        return int(self._hashes.size)

    @property
    def nbytes(self) -> int:
        return int(self._hashes.nbytes)

    def _tokens(self, text: str) -> list[str]:
        if self.unit == "char":
            return list(" ".join(text.split()))
        return _WORD_TOKEN.findall(text)

    def _ngram_hashes(self, text: str) -> np.ndarray:
        toks = self._tokens(text)
        n = self.ngram
        if len(toks) < n:
            return np.empty(0, np.uint64)
        cache = self._token_hash
        ids = np.empty(len(toks), np.uint64)
        for i, tok in enumerate(toks):
            h = cache.get(tok)
            if h is None:
                h = int.from_bytes(hashlib.blake2b(tok.encode(), digest_size=8).digest(), "little")
                cache[tok] = h
            ids[i] = h
        m = len(toks) - n + 1
        acc = np.zeros(m, np.uint64)
        with np.errstate(over="ignore"):
            for j in range(n):
                acc = acc * _BASE + ids[j : j + m]
        return acc

    def overlap(self, text: str) -> float:
        """Share of ``text``'s n-grams present in the private corpus (0 when too short)."""
        grams = self._ngram_hashes(text)
        if grams.size == 0 or self._hashes.size == 0:
            return 0.0
        pos = np.searchsorted(self._hashes, grams)
        pos[pos == self._hashes.size] = 0
        return float(np.mean(self._hashes[pos] == grams))


GuardrailIndex = PrivateIndex


def build_index(
    private_texts: Iterable[str], ngram: int = 12, unit: Literal["word", "char"] = "word"
) -> PrivateIndex:
    """Build the reusable private-data index (do it once per agent, not per package)."""
    return PrivateIndex(private_texts, ngram=ngram, unit=unit)


# --------------------------------------------------------------------------- filtering


@dataclass(frozen=True, slots=True)
class GuardrailReport:
    """Items allowed out, and (item_id, reason code) for each item held back."""

    kept: tuple[KnowledgeItem, ...]
    dropped: tuple[tuple[str, str], ...]

    def reason_counts(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason in self.dropped))


def filter_items(
    items: Sequence[KnowledgeItem],
    private_texts: Sequence[str] = (),
    ngram: int = 12,
    max_overlap: float = 0.5,
    index: PrivateIndex | None = None,
) -> GuardrailReport:
    """Split ``items`` into those that may leave the daemon and those dropped, with why.

    Pass a prebuilt ``index`` (from :func:`build_index`) to avoid re-indexing the private
    texts for every package (its own ``ngram`` then applies); otherwise one is built from
    ``private_texts``. The overlap rule checks completions only: prompts come from the
    shared transfer set.
    """
    if not 0.0 < max_overlap <= 1.0:
        raise ValueError("max_overlap must be in (0, 1]")
    if index is None and private_texts:
        index = PrivateIndex(private_texts, ngram=ngram)
    elif index is not None and private_texts:
        raise ValueError("pass either private_texts or a prebuilt index, not both")
    kept: list[KnowledgeItem] = []
    dropped: list[tuple[str, str]] = []
    for item in items:
        reason = scan_text(item.prompt) or scan_text(item.completion)
        if reason is None and index is not None and index.overlap(item.completion) >= max_overlap:
            reason = "overlap.private_data"
        if reason is None:
            kept.append(item)
        else:
            dropped.append((item.item_id, reason))
    report = GuardrailReport(kept=tuple(kept), dropped=tuple(dropped))
    if dropped:
        log.info(
            "guardrail.dropped",
            n_items=len(items),
            n_kept=len(kept),
            n_dropped=len(dropped),
            reasons=report.reason_counts(),
        )
    return report
