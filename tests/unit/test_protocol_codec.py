"""Codec: every message round-trips; strict decoding refuses everything else."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings

from protocol import MESSAGE_TYPES, MalformedFrame, UnknownMessage, decode_body, encode_body
from protocol.codec import pack, unpack_strict
from protocol.errors import ERROR_CODES, ConfigError, KnexaError, error_from_code

from .protocol_strategies import message_strategy


@pytest.mark.parametrize("name", sorted(MESSAGE_TYPES))
def test_every_message_round_trips(name: str) -> None:
    cls = MESSAGE_TYPES[name]

    @settings(max_examples=60, deadline=None)
    @given(message_strategy(cls))
    def check(msg) -> None:
        assert decode_body(name, encode_body(msg)) == msg

    check()


def _profile_body(**override) -> bytes:
    body = {"round": 1, "vector": [0.5] * 32, "transfer_hash": "aa"}
    body.update(override)
    return pack(body)


def test_unknown_type_is_typed_error() -> None:
    with pytest.raises(UnknownMessage):
        decode_body("Pickle", _profile_body())


def test_missing_and_extra_fields_rejected() -> None:
    body = msgpack.packb({"round": 1, "vector": []})
    with pytest.raises(MalformedFrame, match="missing"):
        decode_body("Profile", body)
    with pytest.raises(MalformedFrame, match="extra"):
        decode_body("Profile", _profile_body(evil=1))


@pytest.mark.parametrize(
    "override",
    [
        {"round": "1"},
        {"round": True},
        {"round": 1.0},
        {"vector": "abc"},
        {"vector": [1, "x"]},
        {"transfer_hash": b"aa"},
    ],
)
def test_wrong_field_types_rejected(override) -> None:
    with pytest.raises(MalformedFrame):
        decode_body("Profile", _profile_body(**override))


def test_non_finite_float_rejected() -> None:
    with pytest.raises(MalformedFrame, match="non-finite"):
        decode_body("Profile", _profile_body(vector=[float("nan")]))


def test_ext_type_rejected() -> None:
    body = msgpack.packb({"round": msgpack.ExtType(42, b"\x80\x04"), "vector": [], "transfer_hash": ""})
    with pytest.raises(MalformedFrame, match="ext type"):
        decode_body("Profile", body)


def test_msgpack_timestamp_ext_rejected() -> None:
    import datetime

    stamp = msgpack.Timestamp.from_datetime(datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc))
    body = msgpack.packb({"round": stamp, "vector": [], "transfer_hash": ""}, datetime=False)
    with pytest.raises(MalformedFrame):
        decode_body("Profile", body)


def test_non_string_map_keys_rejected() -> None:
    with pytest.raises(MalformedFrame):
        decode_body("Profile", msgpack.packb({1: 2}))


# what pickle.dumps({"round": 1}) produces (protocol 4), written out so no test imports
# pickle: the project has none anywhere
PICKLE_BYTES = b"\x80\x04\x95\x0e\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x05round\x94K\x01s."


def test_pickle_bytes_rejected() -> None:
    hostile = PICKLE_BYTES
    with pytest.raises(MalformedFrame):
        decode_body("Profile", hostile)


def test_trailing_bytes_rejected() -> None:
    with pytest.raises(MalformedFrame):
        decode_body("Profile", _profile_body() + b"\x00")


def test_encode_refuses_foreign_objects() -> None:
    with pytest.raises(UnknownMessage):
        encode_body(object())


def test_field_mismatch_error_names_the_fields() -> None:
    """The Error a peer gets back (and our log line) says which fields were wrong."""
    with pytest.raises(MalformedFrame, match=r"missing=\['transfer_hash'\] extra=\[\]"):
        decode_body("Profile", msgpack.packb({"round": 1, "vector": []}))
    with pytest.raises(MalformedFrame, match=r"missing=\[\] extra=\['evil'\]"):
        decode_body("Profile", _profile_body(evil=1))


@pytest.mark.parametrize("type_name", [["Profile"], {"Profile": 1}, 7, None])
def test_non_string_type_name_is_unknown_message(type_name) -> None:
    with pytest.raises(UnknownMessage):
        decode_body(type_name, _profile_body())


def test_nested_non_string_map_keys_rejected() -> None:
    """Map keys must be str/bytes at every depth, not only in the body's own map."""
    with pytest.raises(MalformedFrame):
        unpack_strict(msgpack.packb([{1: 2}]))
    with pytest.raises(MalformedFrame):
        unpack_strict(msgpack.packb({"meta": {None: 2}}))


@pytest.mark.parametrize("entry", [["col", 1, 2], [1, 2], ["col"], "col", ["col", [1]], ["col", {"a": 1}]])
def test_admin_rows_must_be_column_value_pairs(entry) -> None:
    with pytest.raises(MalformedFrame):
        decode_body("AdminResult", pack({"rows": [[entry]]}))


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_error_frame_code_rebuilds_the_typed_error(code: str) -> None:
    """A client raises exactly the error class the server named, with its message."""
    err = error_from_code(code, "why")
    assert type(err) is ERROR_CODES[code] and err.code == code and str(err) == "why"


def test_unknown_error_code_is_a_plain_knexa_error() -> None:
    err = error_from_code("from-the-future", "why")
    assert type(err) is KnexaError and str(err) == "why"


def test_config_error_names_the_setting() -> None:
    err = ConfigError("cpm.quorum", "must be in (0, 1]")
    assert err.key == "cpm.quorum" and str(err) == "cpm.quorum: must be in (0, 1]"
