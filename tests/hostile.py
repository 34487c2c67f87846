"""Hostile input, generated with hypothesis: event bytes, subscription records, URLs.

Every event strategy here yields bytes that must NOT be dispatched, each for one
kind of reason (nesting, numbers, text, encoding, types, dates, non-finite
numbers, random bytes). :func:`sample` draws concrete examples for the tests
that publish them to the real broker.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any, TypeVar

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.support import SEED_EVENT

T = TypeVar("T")

#: The max_event_bytes the broker tests run with: deep-nesting poison of 250 kB fits.
MAX_EVENT_BYTES = 300_000

INNER = ("visitor", "company", "session")
REQUIRED = ("event", "timestamp", "organization_id", "session_id", *INNER)


def good_event(session_id: str = "sess_1") -> dict[str, Any]:
    doc = copy.deepcopy(SEED_EVENT)
    doc["session_id"] = session_id
    return doc


def _with_raw(raw_value: str, where: str = "company") -> bytes:
    """A valid event whose inner object ``where`` gets a field with JSON text ``raw_value``."""
    doc = good_event()
    doc[where]["poison"] = "@@POISON@@"
    return json.dumps(doc).encode().replace(b'"@@POISON@@"', raw_value.encode())


# --- event bytes ------------------------------------------------------------------

deep_nesting = st.builds(
    lambda depth, opener, where: _with_raw(
        opener * depth + "1" + ("]" if opener == "[" else "}") * depth, where
    ),
    st.integers(33, 3000),
    st.sampled_from(["[", '{"a":']),
    st.sampled_from(INNER),
)
huge_integer = st.builds(
    lambda digits, sign, where: _with_raw(sign + "9" * digits, where),
    st.integers(4301, 20_000),
    st.sampled_from(["", "-"]),
    st.sampled_from(INNER),
)
non_finite = st.builds(
    _with_raw,
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400", "[1, NaN]"]),
    st.sampled_from(INNER),
)
lone_surrogate = st.builds(
    lambda code, field: _with_raw(json.dumps(f"x{chr(code)}y"), field),
    st.integers(0xD800, 0xDFFF),
    st.sampled_from(INNER),
)
huge_string = st.builds(
    lambda extra, ch: _with_raw(
        json.dumps(ch * (MAX_EVENT_BYTES // len(ch.encode()) + extra), ensure_ascii=False)
    ),
    st.integers(1, 5000),
    st.sampled_from(["x", "é", "\u2603"]),
)


def _break_utf8(junk: bytes, at: int) -> bytes:
    value = json.dumps(good_event()).encode()
    cut = value.index(b'"Jane"') + 2 + at % 3
    return value[:cut] + junk + value[cut:]


invalid_utf8 = st.builds(
    _break_utf8,
    st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"]),
    st.integers(0, 2),
)

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
#: Any JSON value (finite numbers, text without lone surrogates), a few levels deep.
json_values: st.SearchStrategy[Any] = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)


def _wrong_type(field: str, value: Any) -> bytes:
    doc = good_event()
    doc[field] = value
    return json.dumps(doc).encode()


wrong_type = st.one_of(
    st.builds(
        _wrong_type,
        st.sampled_from(INNER),
        json_values.filter(lambda v: not isinstance(v, dict)),
    ),
    st.builds(
        _wrong_type,
        st.sampled_from(["event", "timestamp", "organization_id", "session_id"]),
        json_values.filter(lambda v: not isinstance(v, str)),
    ),
    st.builds(
        lambda field: json.dumps({k: v for k, v in good_event().items() if k != field}).encode(),
        st.sampled_from(REQUIRED),
    ),
    json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
)
odd_date = st.builds(
    lambda ts: _wrong_type("timestamp", ts),
    st.one_of(
        st.sampled_from(
            [
                "0001-01-01T00:00:00+01:00",
                "9999-12-31T23:59:59-01:00",
                "2025-01-15T10:30:00",
                "2025-02-30T10:30:00Z",
                "yesterday",
                "",
            ]
        ),
        # Any time with an offset that pushes it outside year 1..9999 in UTC.
        st.builds(
            lambda minutes, year_end: (
                f"0001-01-01T00:00:00+{minutes // 60:02d}:{minutes % 60:02d}"
                if not year_end
                else f"9999-12-31T23:59:59-{minutes // 60:02d}:{minutes % 60:02d}"
            ),
            st.integers(1, 23 * 60 + 59),
            st.booleans(),
        ),
        st.datetimes(timezones=st.none()).map(lambda d: d.isoformat()),
    ),
)
random_bytes = st.binary(max_size=300).filter(lambda b: not b.strip().startswith(b"{"))

#: Each kind, by name: every one of them yields a message that must be set aside.
POISON_KINDS: dict[str, st.SearchStrategy[bytes]] = {
    "deep_nesting": deep_nesting,
    "huge_integer": huge_integer,
    "non_finite": non_finite,
    "lone_surrogate": lone_surrogate,
    "huge_string": huge_string,
    "invalid_utf8": invalid_utf8,
    "wrong_type": wrong_type,
    "odd_date": odd_date,
    "random_bytes": random_bytes,
}
poison_events = st.one_of(*POISON_KINDS.values())


# --- URLs and subscription records --------------------------------------------------

_hosts = st.one_of(
    st.sampled_from(
        ["example.com", "127.0.0.1", "[::1]", "☃.example", "☃_.example", "xn--n3h.example"]
    ),
    st.sampled_from(["a..b", "-a.com", "EXAMPLE.com", "x" * 64 + ".com", "ex ample.com"]),
    st.text(min_size=0, max_size=12),
    st.from_regex(r"[a-z0-9-]{1,20}(\.[a-z0-9-]{1,20}){0,3}", fullmatch=True),
)
_ports = st.one_of(
    st.just(""),
    st.integers(-5, 70_000).map(lambda p: f":{p}"),
    st.text(max_size=6).map(lambda t: f":{t}"),
)
urls = st.one_of(
    st.builds(
        lambda lead, scheme, host, port, path, trail: f"{lead}{scheme}://{host}{port}{path}{trail}",
        st.sampled_from(["", " ", "\t", "\n"]),
        st.sampled_from(["https", "HTTPS", "Https", "http", "ftp", "javascript"]),
        _hosts,
        _ports,
        st.one_of(st.just("/hook"), st.text(max_size=12).map(lambda t: "/" + t)),
        st.sampled_from(["", " ", "\x00", "\u2028"]),
    ),
    st.text(max_size=40),
)


def subscription_record(webhook_id: str, url: str, organization_id: str = "org_1") -> bytes:
    """A subscriptions-topic value, valid but for what ``url`` holds, as raw JSON."""
    return json.dumps(
        {
            "webhook_id": webhook_id,
            "organization_id": organization_id,
            "url": url,
            "events": ["visitor.identified"],
            "plan": "scale",
            "created_at": "2025-01-15T10:30:00Z",
            "updated_at": "2025-01-15T10:30:00Z",
        }
    ).encode()


def _instant(value: datetime) -> str:
    return value.isoformat()


_times = st.one_of(
    st.datetimes(timezones=st.just(UTC)).map(_instant),
    st.datetimes().map(_instant),
    st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-05:00"]),
    st.text(max_size=30),
)


subscription_fields = st.fixed_dictionaries(
    {
        "webhook_id": st.one_of(st.just("wh_1"), st.text(max_size=10)),
        "organization_id": st.one_of(st.just("org_1"), st.text(max_size=10)),
        "url": urls,
        "events": st.one_of(
            st.just(["visitor.identified"]), st.lists(st.text(max_size=20), max_size=3)
        ),
        "secret": st.one_of(st.none(), st.text(max_size=20)),
        "previous_secrets": st.lists(
            st.fixed_dictionaries(
                {
                    "secret": st.text(min_size=8, max_size=12),
                    "expires_at": _times,
                }
            ),
            max_size=2,
        ),
        "enabled": st.one_of(st.booleans(), json_values),
        "plan": st.one_of(st.just("scale"), st.text(max_size=10)),
        "created_at": _times,
        "updated_at": _times,
    }
)
subscription_records = st.one_of(
    subscription_fields.map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
)


def sample(strategy: st.SearchStrategy[T], count: int) -> list[T]:
    """``count`` varied examples of ``strategy``, for publishing to the real broker.

    Hypothesis tries the simplest example first; it is kept too, being as
    hostile as any.
    """
    found: list[T] = []

    @settings(
        max_examples=count,
        phases=[Phase.generate],
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value: T) -> None:
        found.append(value)

    collect()
    return found[:count]
