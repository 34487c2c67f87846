"""Delivery bodies written by orjson mean exactly what the standard library wrote."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher import jsonio

VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()  # past 64 bits too
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def ordered(data: bytes) -> Any:
    """Parsed with objects as lists of pairs, so that key order counts too."""
    return json.loads(data, object_pairs_hook=list)


@given(st.dictionaries(st.text(), VALUES, max_size=6))
def test_a_body_means_what_the_standard_library_wrote(doc: dict[str, Any]) -> None:
    raw = json.dumps(doc).encode()
    before = json.dumps(json.loads(raw), ensure_ascii=False, separators=(",", ":")).encode()
    after = jsonio.dumps(jsonio.loads(raw))
    assert ordered(after) == ordered(before)
    assert b"NaN" not in after or b"NaN" in raw  # inside a string only


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_not_json(constant: str) -> None:
    with pytest.raises(jsonio.JSONError, match=constant.lstrip("-")):
        jsonio.loads(f'{{"score": {constant}}}'.encode())


def test_integers_past_64_bits_keep_every_digit() -> None:
    raw = b'{"big":123456789012345678901234567890,"small":-9223372036854775808}'
    assert jsonio.dumps(jsonio.loads(raw)) == raw
    # Just below -2**63: nineteen digits, which orjson would read as a float.
    below = b'{"n":-9223372036854775809}'
    assert jsonio.loads(below) == {"n": -9223372036854775809}
    assert jsonio.dumps(jsonio.loads(below)) == below


def test_a_lone_surrogate_cannot_be_written_back() -> None:
    with pytest.raises(jsonio.JSONError, match="surrogate"):
        jsonio.dumps(jsonio.loads(b'{"a":"\\ud800"}'))


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a":}', b"\xff\xfe", b"[1,]"])
def test_broken_input_is_a_json_error(raw: bytes) -> None:
    with pytest.raises(jsonio.JSONError):
        jsonio.loads(raw)
