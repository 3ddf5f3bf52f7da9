"""Protocol IDs and limits (normative values; docs/protocol.md quotes them)."""

from __future__ import annotations

CPM_PROTOCOL = "/knexa/cpm/1.0.0"
EXCHANGE_PROTOCOL = "/knexa/exchange/1.0.0"  # every chunk a signed envelope
EXCHANGE_PROTOCOL_1_1 = "/knexa/exchange/1.1.0"  # unsigned boxes, one signed trailer
# A teacher serves every exchange version; a student offers them in this order, so
# multistream-select picks 1.1.0 where both ends have it and 1.0.0 with an older peer.
EXCHANGE_PROTOCOLS = (EXCHANGE_PROTOCOL_1_1, EXCHANGE_PROTOCOL)
ADMIN_PROTOCOL = "/knexa/admin/1.0.0"

MAX_FRAME = 4 * 1024 * 1024  # default per-protocol frame cap (bytes)
MAX_FRAME_CPM = 256 * 1024  # CPM control messages are small
MAX_FRAME_ADMIN = 4 * 1024 * 1024  # admin listings can be large
MAX_FRAME_EXCHANGE = 4 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024  # plaintext bytes per KnowledgeChunk (box adds 40 + framing)
