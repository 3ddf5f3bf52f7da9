"""The daemon's identity file — see ``p2p.keyfile`` (shared with the CPM)."""

from p2p.keyfile import SEED_BYTES, create_identity, load_identity

__all__ = ["SEED_BYTES", "create_identity", "load_identity"]
