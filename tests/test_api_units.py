"""Pure parts of the API: keys, the history store, idempotency, the docs page."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from datetime import UTC, datetime, timedelta
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dispatcher.api import cursors, docs_page
from dispatcher.api.auth import KeyEntry, KeyRing, hash_key, load_keys, new_key
from dispatcher.api.historystore import (
    DeliveryRow,
    Filters,
    HistoryStore,
    mask_signature,
    opened,
    to_ms,
)
from dispatcher.api.idempotency import webhook_id_for
from dispatcher.api.models import SECRET_PATTERN, URL_PATTERN, DeliveryPage, DeliverySummary
from dispatcher.api.pages import page_json, summary_fields
from dispatcher.api.problems import Problem
from dispatcher.attempts import AttemptRecord
from dispatcher.config_state import answer_key
from dispatcher.errors import ConfigError
from dispatcher.manage import check_secret
from dispatcher.models import TEXT_PATTERN, check_text
from dispatcher.outbound.urls import normalize_url
from dispatcher.settings import Settings
from tests.api_support import HISTORY_INDEXES, history_indexes

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


def test_keys_are_matched_by_hash_and_named() -> None:
    admin, viewer = new_key(), new_key()
    ring = KeyRing(
        [
            KeyEntry(name="admin", sha256=hash_key(admin), access="read-write"),
            KeyEntry(name="viewer", sha256=hash_key(viewer), access="read"),
        ]
    )
    assert ring.identify(f"Bearer {admin}").name == "admin"  # type: ignore[union-attr]
    assert ring.identify(f"Bearer {viewer}").can_write is False  # type: ignore[union-attr]
    # The scheme is case-insensitive and may be followed by several spaces (RFC 9110).
    for spelling in ("bearer", "BEARER", "bEaReR"):
        assert ring.identify(f"{spelling} {admin}").name == "admin"  # type: ignore[union-attr]
    assert ring.identify(f"Bearer   {admin}").name == "admin"  # type: ignore[union-attr]
    for bad in (None, "", admin, f"Basic {admin}", f"Bearer {admin}x", f"Bearer {admin.upper()}"):
        assert ring.identify(bad) is None


@given(st.text(max_size=300))
def test_any_authorization_header_is_refused_or_known(header: str) -> None:
    ring = KeyRing([KeyEntry(name="k", sha256=hash_key("secret-key"), access="read")])
    known = re.fullmatch(r"(?i:bearer) +secret-key", header)
    assert ring.identify(header) is None or known


def test_keys_from_a_file_and_bad_entries(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([{"name": "a", "sha256": "0" * 64, "access": "read"}]))
    settings = Settings(
        api_keys=[{"name": "b", "sha256": "1" * 64, "access": "read-write"}],
        api_keys_file=str(path),
    )
    assert [k.name for k in load_keys(settings)] == ["b", "a"]
    with pytest.raises(ConfigError, match="sha256"):
        load_keys(Settings(api_keys=[{"name": "b", "sha256": "short", "access": "read"}]))
    with pytest.raises(ConfigError, match="distinct"):
        load_keys(
            Settings(
                api_keys_file=str(path),
                api_keys=[{"name": "a", "sha256": "2" * 64, "access": "read"}],
            )
        )
    path.write_text("{")
    with pytest.raises(ConfigError, match="DISPATCHER_API_KEYS_FILE"):
        load_keys(Settings(api_keys_file=str(path)))


def record(delivery: str, attempt: int, ok: bool, at: datetime, **extra: object) -> AttemptRecord:
    return AttemptRecord.model_validate(
        {
            "delivery_id": delivery,
            "webhook_id": "wh_1",
            "organization_id": "org_1",
            "event": "visitor.identified",
            "session_id": f"sess_{delivery}",
            "event_timestamp": at,
            "source": {"topic": "in", "partition": 0, "offset": 1},
            "attempt": attempt,
            "stage": "input",
            "at": at,
            "duration_ms": 10.0 * attempt,
            "ok": ok,
            "status_code": 200 if ok else 500,
            "error_class": "none" if ok else "http",
            **extra,
        }
    )


def fold(store: HistoryStore, *records: tuple[AttemptRecord, int]) -> None:
    """Fold records at the given offsets of partition 0."""
    store.fold([(0, offset, r.to_json()) for r, offset in records])


def test_history_store_orders_by_time_and_takes_status_from_the_latest(tmp_path: Path) -> None:
    with opened(str(tmp_path / "h.db"), "attempts") as store:
        conn = store.connect(readonly=True)
        # Read out of time order: d2 first, d0 last.
        for n, offset in ((2, 0), (1, 1), (0, 2)):
            fold(store, (record(f"d{n}", 1, True, NOW + timedelta(minutes=n)), offset))
        page, more = HistoryStore.deliveries(conn, "wh_1", Filters(), None, 10)
        assert [d.delivery_id for d in page] == ["d2", "d1", "d0"] and not more
        # A late record older than the newest changes nothing; a newer one does.
        later = NOW + timedelta(minutes=5)
        fold(store, (record("d1", 3, False, later, dead_lettered=True), 3))
        fold(store, (record("d1", 2, False, NOW + timedelta(minutes=4)), 4))
        row, attempts = HistoryStore.delivery(conn, "wh_1", "d1")  # type: ignore[misc]
        assert row.status == "dead_lettered" and row.attempts == 3
        assert [a.attempt for a in attempts] == [1, 2, 3]
        dead = HistoryStore.deliveries(conn, "wh_1", Filters(status="dead_lettered"), None, 10)
        assert [d.delivery_id for d in dead[0]] == ["d1"]
        fold(store, (record("d1", 0, False, later + timedelta(minutes=1), kind="resend"), 5))
        assert HistoryStore.delivery(conn, "wh_1", "d1")[0].status == "pending"  # type: ignore[index]
        # Cursor: the key of the last row; the next page starts after it.
        first, more = HistoryStore.deliveries(conn, "wh_1", Filters(), None, 1)
        assert more
        key = (first[0].created_ms, first[0].delivery_id)
        rest, more = HistoryStore.deliveries(conn, "wh_1", Filters(), key, 5)
        assert [d.delivery_id for d in rest] == ["d1", "d0"] and not more
        found = HistoryStore.deliveries(conn, "wh_1", Filters(session_id="sess_d0"), None, 5)
        assert [d.delivery_id for d in found[0]] == ["d0"]
        window = Filters(since_ms=to_ms(NOW + timedelta(minutes=1)), until_ms=to_ms(later))
        assert [
            d.delivery_id for d in HistoryStore.deliveries(conn, "wh_1", window, None, 5)[0]
        ] == [
            "d2",
            "d1",
        ]
        other = Filters(event="order.created")
        assert HistoryStore.deliveries(conn, "wh_1", other, None, 5) == ([], False)
        # The same position again is not folded twice.
        fold(store, (record("d0", 1, True, NOW), 2))
        assert HistoryStore.delivery(conn, "wh_1", "d0")[0].attempts == 1  # type: ignore[index]
        conn.close()


def test_a_rebuild_creates_its_indexes_once_caught_up_even_across_a_restart(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "h.db")
    store = HistoryStore(path, "attempts")
    store.open()
    assert not store.indexed
    fold(store, (record("d0", 1, True, NOW), 0))
    store.close()
    # Stopped before it caught up: the next start goes on without them.
    assert history_indexes(path) == set()
    store.open()
    assert not store.indexed
    fold(store, (record("d1", 1, False, NOW), 1))
    store.build_indexes()  # caught up
    assert store.indexed
    store.close()
    assert history_indexes(path) == HISTORY_INDEXES
    store.open()
    try:
        assert store.indexed
        conn = store.connect(readonly=True)
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT delivery_id FROM deliveries "
            "WHERE webhook_id = 'wh_1' AND session_id = 'sess_d1'"
        ).fetchall()
        assert "deliveries_by_session" in str(plan)
        assert HistoryStore.counts(conn) == (2, 2)
        conn.close()
        store.reset()  # the topic was recreated: a rebuild again
    finally:
        store.close()
    store.open()
    assert not store.indexed
    store.close()
    assert history_indexes(path) == set()


def test_history_store_resumes_from_its_positions(tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    with opened(path, "attempts") as store:
        fold(store, (record("d0", 1, True, NOW), 7))
    store = HistoryStore(path, "attempts")
    assert store.open() == {0: 8}
    store.close()
    # A file made for another topic is rebuilt, never continued.
    store = HistoryStore(path, "other")
    assert store.open() == {}
    store.close()


def test_history_store_skips_records_that_do_not_fit_and_keeps_the_rest(
    tmp_path: Path,
) -> None:
    good = record(
        "d1",
        1,
        True,
        NOW,
        body='{"a":1}',
        request_headers={"Webhook-Signature": "v1,abcdefgh1234", "X-Other": "kept"},
    )
    doc = json.loads(good.to_json())
    misfits = [
        b"not json",
        b"[1, 2]",
        json.dumps({**doc, "at": "yesterday"}).encode(),
        json.dumps({**doc, "attempt": -1}).encode(),
        json.dumps({**doc, "ok": "yes"}).encode(),
        json.dumps({**doc, "source": {"topic": "in"}}).encode(),
        json.dumps({k: v for k, v in doc.items() if k != "webhook_id"}).encode(),
        None,
    ]
    with opened(str(tmp_path / "h.db"), "attempts") as store:
        conn = store.connect(readonly=True)
        batch = [(0, n, value) for n, value in enumerate(misfits)]
        assert store.fold([*batch, (0, len(misfits), good.to_json())]) == {0: len(misfits) + 1}
        assert store.invalid_records == len(misfits)
        assert HistoryStore.counts(conn) == (1, 1)
        row, attempts = HistoryStore.delivery(conn, "wh_1", "d1")  # type: ignore[misc]
        assert row.status == "succeeded" and attempts[0].body == '{"a":1}'
        assert attempts[0].headers == {"Webhook-Signature": "v1,…1234", "X-Other": "kept"}
        assert attempts[0].source == {"topic": "in", "partition": 0, "offset": 1}
        assert datetime.fromisoformat(attempts[0].event_timestamp or "") == NOW
        conn.close()


def test_summary_counts_the_last_24_hours(tmp_path: Path) -> None:
    with opened(str(tmp_path / "h.db"), "attempts") as store:
        conn = store.connect(readonly=True)
        fold(store, (record("old", 1, False, NOW - timedelta(hours=30)), 0))
        for n in range(4):
            fold(store, (record(f"d{n}", 1, n != 0, NOW - timedelta(minutes=4 - n)), n + 1))
        fold(store, (record("d0", 2, False, NOW), 9))
        summary = HistoryStore.summary(conn, "wh_1", to_ms(NOW))
        assert summary["successes_24h"] == 3 and summary["failures_24h"] == 2
        assert summary["failing_now"] is True
        assert summary["latency_ms"] == {"p50": 10.0, "p90": 20.0, "p99": 20.0}
        hours = HistoryStore.hourly(conn, "wh_1", to_ms(NOW) - 48 * 3_600_000, to_ms(NOW) + 1)
        assert [(h["successes"], h["failures"]) for h in hours] == [(0, 1), (3, 1), (0, 1)]
        conn.close()


def test_retention_deletes_deliveries_and_their_attempts(tmp_path: Path) -> None:
    with opened(str(tmp_path / "h.db"), "attempts") as store:
        conn = store.connect(readonly=True)
        fold(store, (record("old", 1, True, NOW - timedelta(days=20)), 0))
        fold(store, (record("new", 1, True, NOW), 1))
        assert store.expire(to_ms(NOW - timedelta(days=14))) == 1
        assert HistoryStore.counts(conn) == (1, 1)
        conn.close()


def test_retention_search_leaves_no_read_open_that_would_hold_the_wal(tmp_path: Path) -> None:
    # Retention searches through a connection of its own: a read left open there
    # would keep every checkpoint from reaching the WAL's end, and the WAL growing.
    with opened(str(tmp_path / "h.db"), "attempts") as store:
        for n in range(3):
            fold(
                store,
                (record(f"old{n}", 1, True, NOW - timedelta(days=20), webhook_id=f"wh_{n}"), n),
            )
        fold(store, (record("new", 1, True, NOW), 3))
        assert store.expire(to_ms(NOW - timedelta(days=14)), batch=2) == 2
        assert store.expire(to_ms(NOW - timedelta(days=14)), batch=2) == 1
        assert store.expire(to_ms(NOW - timedelta(days=14)), batch=2) == 0
        writer = store._writer
        assert writer is not None
        busy, _, _ = writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
        assert (tmp_path / "h.db-wal").stat().st_size == 0
        assert HistoryStore.counts(writer) == (1, 1)


def test_retention_goes_webhook_by_webhook_in_batches_and_keeps_recent_deliveries(
    tmp_path: Path,
) -> None:
    cutoff = NOW - timedelta(days=14)
    old = NOW - timedelta(days=20)
    records = []
    for hook in range(5):
        for n in range(3):  # old, each with two attempts
            records += [
                record(f"o{hook}{n}", 1, False, old, webhook_id=f"wh_{hook}"),
                record(f"o{hook}{n}", 2, True, old + timedelta(minutes=5), webhook_id=f"wh_{hook}"),
            ]
        records.append(record(f"n{hook}", 1, True, NOW, webhook_id=f"wh_{hook}"))
    # First attempted before the cutoff, last after it: kept.
    records += [
        record("straddles", 1, False, cutoff - timedelta(hours=1), webhook_id="wh_2"),
        record("straddles", 2, True, cutoff + timedelta(hours=1), webhook_id="wh_2"),
    ]
    with opened(str(tmp_path / "h.db"), "attempts") as store:
        conn = store.connect(readonly=True)
        fold(store, *((r, offset) for offset, r in enumerate(records)))
        gone = []
        while (n := store.expire(to_ms(cutoff), batch=4)) > 0:
            assert n <= 4
            gone.append(n)
        assert sum(gone) == 15
        assert HistoryStore.counts(conn) == (6, 7)
        for hook in range(5):
            page, _ = HistoryStore.deliveries(conn, f"wh_{hook}", Filters(), None, 10)
            kept = {d.delivery_id for d in page}
            assert kept == ({f"n{hook}", "straddles"} if hook == 2 else {f"n{hook}"})
        row, attempts = HistoryStore.delivery(conn, "wh_2", "straddles")  # type: ignore[misc]
        assert row.attempts == 2 and [a.attempt for a in attempts] == [1, 2]
        conn.close()


def test_a_file_of_the_earlier_schema_is_rebuilt(tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('topic', 'attempts'), ('schema', '1');"
        "CREATE TABLE positions (partition INTEGER PRIMARY KEY, next_offset INTEGER NOT NULL);"
        "INSERT INTO positions VALUES (0, 5);"
        "CREATE TABLE attempts (position INTEGER PRIMARY KEY, webhook_id TEXT, delivery_id TEXT);"
        "CREATE INDEX attempts_of_delivery ON attempts (webhook_id, delivery_id);"
    )
    conn.close()
    store = HistoryStore(path, "attempts")
    assert store.open() == {}  # nothing continued from the old positions
    fold(store, (record("d0", 1, True, NOW), 0))
    store.close()
    store = HistoryStore(path, "attempts")
    assert store.open() == {0: 1}
    store.build_indexes()  # caught up
    conn = store.connect(readonly=True)
    names = {n for (n,) in conn.execute("SELECT name FROM sqlite_schema")}
    assert "attempts_of_delivery" not in names and "deliveries_by_status" in names
    assert HistoryStore.counts(conn) == (1, 1)
    conn.close()
    store.close()


def test_a_status_filter_other_than_succeeded_reads_the_status_index(tmp_path: Path) -> None:
    with opened(str(tmp_path / "h.db"), "attempts") as store:
        conn = store.connect(readonly=True)
        seen: list[str] = []
        conn.set_trace_callback(seen.append)
        HistoryStore.deliveries(conn, "wh_1", Filters(status="failing"), None, 10)
        conn.set_trace_callback(None)
        plan = " ".join(str(r) for r in conn.execute(f"EXPLAIN QUERY PLAN {seen[-1]}"))
        assert "deliveries_by_status" in plan
        conn.close()


def test_signatures_are_masked() -> None:
    assert mask_signature("v1,abcdefgh v1,ijklmnop") == "v1,…efgh v1,…mnop"
    assert mask_signature("0123456789abcdef") == "…cdef"


def test_idempotency_ids_and_answer_keys() -> None:
    assert webhook_id_for("o", "k", "1") == webhook_id_for("o", "k", "1")
    assert webhook_id_for("o", "k", "1") != webhook_id_for("o", "k2", "1")
    assert answer_key("o", "k", "1") == answer_key("o", "k", "1")
    # The parts are separated: moving a character between them is another key.
    assert answer_key("o", "k1", "") != answer_key("o", "k", "1")


def test_event_catalog_is_configuration(tmp_path: Path) -> None:
    from dispatcher.catalog import load_catalog

    default = load_catalog(Settings())
    assert [e.name for e in default] == ["visitor.identified"]
    assert "session_id" in default[0].schema_["required"]
    (tmp_path / "order.schema.json").write_text('{"type": "object"}')
    (tmp_path / "catalog.json").write_text(
        json.dumps(
            [
                {
                    "name": "order.created",
                    "description": "An order was placed.",
                    "schema_file": "order.schema.json",
                    "input_topic": "orders",
                }
            ]
        )
    )
    loaded = load_catalog(Settings(event_catalog_file=str(tmp_path / "catalog.json")))
    assert [(e.name, e.input_topic, e.schema_) for e in loaded] == [
        ("order.created", "orders", {"type": "object"})
    ]
    (tmp_path / "catalog.json").write_text('[{"name": "Bad Name"}]')
    with pytest.raises(ConfigError, match="DISPATCHER_EVENT_CATALOG_FILE"):
        load_catalog(Settings(event_catalog_file=str(tmp_path / "catalog.json")))


def test_a_record_without_description_is_what_earlier_versions_wrote() -> None:
    from dispatcher.models import Subscription

    sub = Subscription(
        webhook_id="wh_1",
        organization_id="org_1",
        url="https://hooks.example.com/x",
        events=("visitor.identified",),
        plan="scale",
        created_at=NOW,
        updated_at=NOW,
    )
    assert "description" not in json.loads(sub.to_json())
    described = sub.model_copy(update={"description": "CRM"})
    assert json.loads(described.to_json())["description"] == "CRM"
    assert Subscription.model_validate_json(described.to_json()) == described


@given(st.text(max_size=80), st.text(max_size=80))
def test_docs_page_escapes_whatever_the_document_says(summary: str, field: str) -> None:
    # Text in the document never becomes markup of the page.
    document = {
        "info": {"title": "<b>API</b>", "version": "1", "description": summary},
        "paths": {
            "/v1/things/{id}": {
                "get": {
                    "summary": summary,
                    "parameters": [{"name": field, "in": "path", "schema": {"type": "string"}}],
                    "responses": {
                        "200": {
                            "description": summary,
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Thing"}
                                }
                            },
                        }
                    },
                }
            }
        },
        "components": {"schemas": {"Thing": {"properties": {field: {"type": "integer"}}}}},
    }
    html = docs_page.render(document)
    assert "<b>API</b>" not in html and "&lt;b&gt;API&lt;/b&gt;" in html
    assert f"<strong>{escape(summary)}</strong>" in html
    assert f"<code>{escape(field)}</code>" in html
    assert html.count("<h3") == 2  # the route and the schema, nothing injected
    assert '<a href="#schema-Thing">Thing</a>' in html


def test_docs_page_names_schemas_as_the_document_does() -> None:
    name = docs_page.schema_name
    assert name({"$ref": "#/components/schemas/Webhook"}) == "Webhook"
    assert name({"type": "array", "items": {"$ref": "#/x/Webhook"}}) == "list of Webhook"
    assert name({"anyOf": [{"type": "string"}, {"type": "null"}]}) == "string | null"
    assert name({"type": "string", "format": "date-time"}) == "string (date-time)"
    assert name({"enum": ["read", "read-write"]}) == "'read' | 'read-write'"
    assert name(None) == "any"


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.text(min_size=1, max_size=100))
def test_cursor_gives_back_its_key(number: int, key: str) -> None:
    made = cursors.encode(number, key)
    assert re.fullmatch(cursors.PATTERN, made) and len(made) >= cursors.MIN_LENGTH
    assert cursors.decode(made) == (number, key.encode().decode("utf-8", "replace"))


@given(st.from_regex(cursors.PATTERN, fullmatch=True).filter(lambda c: len(c) >= 12))
def test_every_cursor_of_the_documented_form_is_a_position(cursor: str) -> None:
    number, key = cursors.decode(cursor)
    assert isinstance(number, int) and key


def test_a_cursor_of_another_form_is_a_422_on_the_cursor() -> None:
    for bad in ("AAAAAAAAAAAAA", "short", "é" * 12):
        with pytest.raises(Problem) as refused:
            cursors.decode(bad)
        assert refused.value.status == 422
        assert refused.value.errors is not None and refused.value.errors[0].path == "query.cursor"


@settings(max_examples=300, deadline=None)
@given(st.from_regex(URL_PATTERN, fullmatch=True))
def test_every_url_the_document_allows_reads_alike_to_both_parsers(url: str) -> None:
    """A URL valid under the document is never refused for its form (only, at create
    time, for where it points, or for a host over 253 characters)."""
    assume(len(urlsplit(url).hostname or "") <= 253)
    assert normalize_url(url) == url


@given(st.from_regex(TEXT_PATTERN, fullmatch=True), st.from_regex(SECRET_PATTERN, fullmatch=True))
def test_text_and_secrets_the_document_allows_are_accepted(text: str, secret: str) -> None:
    check_text(text)
    if len(secret) >= 24:
        check_secret(secret)


def test_probes_answer_from_memory_before_the_app_runs() -> None:
    from dispatcher.api.app import Probes
    from dispatcher.core.health import Health

    reached: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    probes = Probes(app, Health(lambda: (False, "waiting for topic x")))

    def call(method: str, path: str) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path}
        asyncio.run(probes(scope, None, send))  # type: ignore[arg-type]
        return sent

    alive, ready = call("GET", "/healthz"), call("GET", "/readyz")
    assert (alive[0]["status"], alive[1]["body"]) == (200, b"ok\n")
    assert (ready[0]["status"], ready[1]["body"]) == (503, b"waiting for topic x\n")
    assert dict(ready[0]["headers"])[b"content-length"] == b"20"
    assert reached == []
    assert call("POST", "/healthz") == [] and call("GET", "/v1/x") == []
    assert reached == ["/healthz", "/v1/x"]


@given(
    st.lists(
        st.builds(
            DeliveryRow,
            delivery_id=st.from_regex(r"[A-Za-z0-9_\-]{1,20}", fullmatch=True),
            event=st.text(max_size=20),
            session_id=st.none() | st.text(max_size=20),
            status=st.sampled_from(["pending", "succeeded", "failing", "dead_lettered"]),
            created_ms=st.integers(0, 4_000_000_000_000),
            attempt_ms=st.none() | st.integers(0, 4_000_000_000_000),
            attempts=st.integers(0, 100),
            last_status_code=st.none() | st.integers(100, 599),
            last_error_class=st.none() | st.sampled_from(["http", "timeout"]),
            last_ok=st.none() | st.booleans(),
            next_retry_ms=st.none() | st.integers(0, 4_000_000_000_000),
        ),
        max_size=5,
    ),
    st.none() | st.text(max_size=10),
)
def test_a_page_of_deliveries_is_the_bytes_of_its_response_model(
    rows: list[DeliveryRow], cursor: str | None
) -> None:
    model = DeliveryPage(
        data=[DeliverySummary(**summary_fields(r)) for r in rows], next_cursor=cursor
    )
    assert page_json(rows, cursor) == model.model_dump_json().encode()
