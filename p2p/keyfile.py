"""Key files for both binaries: one 32-byte Ed25519 seed, used for libp2p *and* envelopes.

Why one key: the envelope signer must equal the Noise-authenticated peer
(docs/protocol.md §4), which only holds if the host key and the signing key are the same.
The seed is stored raw (32 bytes) with mode 0600; a key file that group or others can
read is refused (``ConfigError('identity', …)`` → exit 3) rather than silently used,
because a leaked key lets anyone impersonate the organisation to the CPM and its peers.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from protocol.envelope import Identity
from protocol.errors import ConfigError

SEED_BYTES = 32


def create_identity(path: Path) -> Identity:
    """Generate a fresh seed and write it with mode 0600 (never overwrites)."""
    path = Path(path)
    seed = os.urandom(SEED_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError("identity", f"{path} already exists; refusing to overwrite a key") from None
    try:
        os.write(fd, seed)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)  # umask may have narrowed it further; make it exact
    return Identity(seed)


def load_identity(path: Path, *, key: str = "identity", init_hint: str = "knexad init") -> Identity:
    """Read the seed, refusing unsafe permissions or a wrong size.

    ``key`` names the setting in the ``ConfigError`` (exit 3); ``init_hint`` is the
    command that creates the file.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(key, f"{path} not found (run `{init_hint}`)") from None
    except OSError as exc:
        raise ConfigError(key, f"cannot read key file {path}: {exc}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            key,
            f"{path} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):o}); run `chmod 600 {path}`",
        )
    try:
        seed = path.read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read key file {path}: {exc}") from None
    if len(seed) != SEED_BYTES:
        raise ConfigError(key, f"{path} must hold a {SEED_BYTES}-byte Ed25519 seed, found {len(seed)} bytes")
    return Identity(seed)
