"""Protocol IDs and limits (normative values; docs/protocol.md quotes them)."""

from __future__ import annotations

CPM_PROTOCOL = "/knexa/cpm/1.0.0"
EXCHANGE_PROTOCOL = "/knexa/exchange/1.0.0"
ADMIN_PROTOCOL = "/knexa/admin/1.0.0"

MAX_FRAME = 4 * 1024 * 1024  # default per-protocol frame cap (bytes)
MAX_FRAME_CPM = 256 * 1024  # CPM control messages are small
MAX_FRAME_ADMIN = 4 * 1024 * 1024  # admin listings can be large
MAX_FRAME_EXCHANGE = 4 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024  # plaintext bytes per KnowledgeChunk (box adds 40 + framing)
