"""``python -m harness`` is ``knexa-harness``."""

from __future__ import annotations

from harness.cli import entry

if __name__ == "__main__":
    entry()
