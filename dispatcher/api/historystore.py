"""The delivery history store: the attempts topic folded into an embedded SQLite file.

Like a Kafka Streams state store, the file holds the rows *and* the consumer
position per partition, written in the same transaction: a restart resumes from
the stored position (nothing folded twice, nothing skipped, whatever moment the
process died at), and a new replica with an empty file rebuilds from the topic.

Two tables: ``deliveries`` (one row per delivery, its status taken from its
latest record by time, so records read late or out of order change it only when
they are newer) and ``attempts`` (one row per record, keyed by its position in
the topic, with what the detail page shows). Signature header values are masked
before they are stored: nothing the API keeps lets anyone test a secret offline.

The rest of the API sees :class:`HistoryStore` only (fold, expire, the queries):
a shared engine would implement the same methods (README, "History store").
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import orjson

log = logging.getLogger(__name__)

T = TypeVar("T")

HOUR_MS: Final = 3_600_000
#: Version 2: no index of attempts by delivery (a delivery row lists its attempts'
#: row ids) nor of deliveries by age, and the status index holds unsucceeded
#: deliveries only. A file of another version is rebuilt from the topic (``open``).
SCHEMA_VERSION: Final = "2"
#: A record's position as one integer (its row id): partition in the high bits.
#: 2**40 offsets per partition is a trillion records, far beyond any retention.
_OFFSET_BITS: Final = 40
WRITER_CACHE_KB: Final = 65_536
#: The page cache while a rebuild's indexes are sorted (see build_indexes).
SORT_CACHE_KB: Final = 16_384
PAGE_BYTES: Final = 8192
WAL_KEPT_BYTES: Final = 64 << 20
#: Attempt rows parsed before they are written (within a fold's one transaction):
#: about 2 KB each with the body and headers, so a 20,000-record fold holds 4 MB of
#: them, not 40. (Its delivery rows, small, are held whole, to be written sorted.)
_ROWS_AT_ONCE: Final = 2000
_MASKED: Final = frozenset({"x-bullseye-signature", "webhook-signature"})

_TABLES: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS positions (
    partition INTEGER PRIMARY KEY,
    next_offset INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    webhook_id TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    organization_id TEXT NOT NULL,
    event TEXT NOT NULL,
    session_id TEXT,
    created_ms INTEGER NOT NULL,
    latest_ms INTEGER NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    attempt_ms INTEGER,
    last_status_code INTEGER,
    last_error_class TEXT,
    last_ok INTEGER,
    next_retry_ms INTEGER,
    -- The row ids of its attempts, comma-separated: the detail and retention find
    -- them by id, so no index of attempts by delivery is written per attempt.
    positions TEXT NOT NULL,
    PRIMARY KEY (webhook_id, delivery_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attempts (
    position INTEGER PRIMARY KEY,
    webhook_id TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    stage TEXT NOT NULL,
    duration_ms REAL NOT NULL,
    ok INTEGER NOT NULL,
    status_code INTEGER,
    error_class TEXT NOT NULL,
    error TEXT,
    snippet TEXT,
    next_retry_ms INTEGER,
    dead_lettered INTEGER NOT NULL,
    headers TEXT,
    body TEXT,
    event_timestamp TEXT,
    source TEXT,
    requested_by TEXT
);
"""
# Folding writes every B-tree below at a key led by the webhook, scattered over
# the file: each one costs every attempt folded, so there are as few as the
# queries allow, and a rebuild creates them only once it has caught up (see
# HistoryStore.open). Retention finds old rows through the time index, per webhook.
_INDEXES: Final = {
    "deliveries_by_time": "ON deliveries (webhook_id, created_ms, delivery_id)",
    # Unsucceeded only (most deliveries succeed): a filter on `succeeded` reads the
    # time index, one on another status adds the same condition to use this one.
    "deliveries_by_status": (
        "ON deliveries (webhook_id, status, created_ms, delivery_id) WHERE status <> 'succeeded'"
    ),
    # No index by event: a webhook has few event types, so the time index serves a
    # filter on one at nearly the same cost, without another B-tree to write per attempt.
    "deliveries_by_session": (
        "ON deliveries (webhook_id, session_id, created_ms, delivery_id) "
        "WHERE session_id IS NOT NULL"
    ),
    # Covers the summaries: counts and latencies per webhook and time, no row lookups.
    "attempts_by_time": "ON attempts (webhook_id, at_ms, kind, ok, duration_ms)",
    "attempts_failed": "ON attempts (webhook_id, at_ms) WHERE ok = 0 AND kind = 'attempt'",
}


def _create_indexes(conn: sqlite3.Connection) -> None:
    """The secondary indexes that are missing, each in a transaction of its own."""
    for name, definition in _INDEXES.items():
        conn.execute(f"CREATE INDEX IF NOT EXISTS {name} {definition}")


# The latest record by time sets the status; the latest *attempt* by time sets
# the attempt columns. SQLite evaluates every SET expression on the old row.
_UPSERT: Final = """
INSERT INTO deliveries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (webhook_id, delivery_id) DO UPDATE SET
    positions = positions || ',' || excluded.positions,
    session_id = coalesce(session_id, excluded.session_id),
    created_ms = min(created_ms, excluded.created_ms),
    status = CASE WHEN excluded.latest_ms >= latest_ms THEN excluded.status ELSE status END,
    latest_ms = max(latest_ms, excluded.latest_ms),
    attempts = attempts + excluded.attempts,
    last_status_code = CASE WHEN excluded.attempt_ms >= coalesce(attempt_ms, -1)
        THEN excluded.last_status_code ELSE last_status_code END,
    last_error_class = CASE WHEN excluded.attempt_ms >= coalesce(attempt_ms, -1)
        THEN excluded.last_error_class ELSE last_error_class END,
    last_ok = CASE WHEN excluded.attempt_ms >= coalesce(attempt_ms, -1)
        THEN excluded.last_ok ELSE last_ok END,
    next_retry_ms = CASE WHEN excluded.attempt_ms >= coalesce(attempt_ms, -1)
        THEN excluded.next_retry_ms ELSE next_retry_ms END,
    attempt_ms = CASE WHEN excluded.attempt_ms >= coalesce(attempt_ms, -1)
        THEN excluded.attempt_ms ELSE attempt_ms END
"""
_INSERT_ATTEMPT: Final = f"INSERT OR IGNORE INTO attempts VALUES ({', '.join('?' * 20)})"
_DELIVERY_COLUMNS: Final = (
    "delivery_id, event, session_id, status, created_ms, attempt_ms, attempts, "
    "last_status_code, last_error_class, last_ok, next_retry_ms"
)


def to_ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def from_ms(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, UTC)


def mask_signature(value: str) -> str:
    """``v1,…`` and the last 4 characters of each signature (space-separated entries)."""
    masked = []
    for entry in value.split():
        scheme, comma, signature = entry.rpartition(",")
        masked.append(f"{scheme}{comma}…{signature[-4:]}")
    return " ".join(masked)


def masked_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: mask_signature(v) if k.lower() in _MASKED else v for k, v in headers.items()}


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    delivery_id: str
    event: str
    session_id: str | None
    status: str
    created_ms: int
    attempt_ms: int | None
    attempts: int
    last_status_code: int | None
    last_error_class: str | None
    last_ok: bool | None
    next_retry_ms: int | None


@dataclass(frozen=True, slots=True)
class AttemptRow:
    kind: str
    attempt: int
    at_ms: int
    stage: str
    duration_ms: float
    ok: bool
    status_code: int | None
    error_class: str
    error: str | None
    snippet: str | None
    next_retry_ms: int | None
    dead_lettered: bool
    headers: dict[str, str] | None
    body: str | None
    event_timestamp: str | None
    source: dict[str, Any] | None
    requested_by: str | None


@dataclass(frozen=True, slots=True)
class Filters:
    status: str | None = None
    event: str | None = None
    session_id: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None


def _delivery(row: Sequence[Any]) -> DeliveryRow:
    return DeliveryRow(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        row[6],
        row[7],
        row[8],
        None if row[9] is None else bool(row[9]),
        row[10],
    )


def _time_and_position(row: Sequence[Any]) -> tuple[int, int]:
    """An attempt's time, then its position (a delivery without attempts first)."""
    return (row[13], row[28]) if row[13] is not None else (-1, -1)


def _delivery_key(row: tuple[Any, ...]) -> tuple[str, str]:
    return row[0], row[1]


def _ms_of(value: Any) -> int:
    """Milliseconds since the epoch of an RFC 3339 time (UTC when it names no zone)."""
    if type(value) is not str:
        raise TypeError("not a time")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def _text(doc: dict[str, Any], key: str) -> str:
    value = doc[key]
    if type(value) is not str:
        raise TypeError(key)
    return value


def _optional(doc: dict[str, Any], key: str, kind: type) -> Any:
    value = doc.get(key)
    if value is not None and type(value) is not kind:
        raise TypeError(key)
    return value


#: One record's rows (:func:`fold_rows`): its attempt row and its delivery upsert.
FoldRows = tuple[tuple[Any, ...], tuple[Any, ...]]
#: A record parsed: its partition, its offset, and its rows (None if it did not fit).
Parsed = tuple[int, int, FoldRows | None]


def fold_rows(position: int, value: bytes | None) -> FoldRows:
    """The ``attempts`` row and the ``deliveries`` upsert of one attempt record.

    Reads only the fields the store keeps, checking each one's type (as
    ``schemas/attempt-record.schema.json`` has it): a record that does not fit
    raises ValueError, TypeError or KeyError. Validating the whole record through
    its pydantic model cost as much CPU as SQLite's writes, and a rebuild folds
    millions of them; fields the store does not keep are not looked at.
    """
    doc = orjson.loads(value or b"")
    if type(doc) is not dict:
        raise TypeError("not an object")
    kind = doc.get("kind", "attempt")
    if kind != "attempt" and kind != "resend":
        raise ValueError("kind")
    webhook_id = _text(doc, "webhook_id")
    delivery_id = _text(doc, "delivery_id")
    at_ms = _ms_of(doc["at"])
    attempt = doc["attempt"]
    if type(attempt) is not int or attempt < 0:
        raise ValueError("attempt")
    duration_ms = doc.get("duration_ms", 0.0)
    if type(duration_ms) is int:
        duration_ms = float(duration_ms)
    elif type(duration_ms) is not float or duration_ms < 0:
        raise ValueError("duration_ms")
    ok = doc.get("ok", False)
    dead_lettered = doc.get("dead_lettered", False)
    if type(ok) is not bool or type(dead_lettered) is not bool:
        raise TypeError("ok, dead_lettered")
    status_code = _optional(doc, "status_code", int)
    error_class = doc.get("error_class", "none")
    if type(error_class) is not str:
        raise TypeError("error_class")
    next_retry = doc.get("next_retry_at")
    retry_ms = None if next_retry is None else _ms_of(next_retry)
    body = _optional(doc, "body", str)
    source = doc["source"]
    event_timestamp = doc["event_timestamp"]
    if body is not None:
        _ms_of(event_timestamp)
        if (
            type(source) is not dict
            or type(source.get("topic")) is not str
            or type(source.get("partition")) is not int
            or type(source.get("offset")) is not int
        ):
            raise TypeError("source")
    headers = doc.get("request_headers")
    stored_headers = None
    if headers:
        if type(headers) is not dict:
            raise TypeError("request_headers")
        masked = {}
        for name, header in headers.items():
            if type(header) is not str:
                raise TypeError("request_headers")
            masked[name] = mask_signature(header) if name.lower() in _MASKED else header
        stored_headers = orjson.dumps(masked).decode()
    attempt_row = (
        position,
        webhook_id,
        delivery_id,
        at_ms,
        kind,
        attempt,
        _text(doc, "stage"),
        duration_ms,
        1 if ok else 0,  # ints: sqlite3 binds them directly, a bool through its adapters
        status_code,
        error_class,
        _optional(doc, "error", str),
        _optional(doc, "response_snippet", str),
        retry_ms,
        1 if dead_lettered else 0,
        stored_headers,
        body,
        event_timestamp if body is not None else None,
        orjson.dumps(source).decode() if body is not None else None,
        _optional(doc, "requested_by", str),
    )
    is_attempt = kind == "attempt"
    if not is_attempt:
        status = "pending"
    elif ok:
        status = "succeeded"
    else:
        status = "dead_lettered" if dead_lettered else "failing"
    delivery_row = (
        webhook_id,
        delivery_id,
        _text(doc, "organization_id"),
        _text(doc, "event"),
        _optional(doc, "session_id", str),
        at_ms,
        at_ms,
        status,
        1 if is_attempt else 0,
        at_ms if is_attempt else None,
        status_code if is_attempt else None,
        error_class if is_attempt else None,
        (1 if ok else 0) if is_attempt else None,
        retry_ms if is_attempt else None,
        str(position),
    )
    return attempt_row, delivery_row


def parse_records(records: Iterable[tuple[int, int, bytes | None]]) -> Iterator[Parsed]:
    """Each record (partition, offset, value) with its rows, None for one that does
    not fit: the pure half of folding (:meth:`HistoryStore.write` is the other)."""
    for partition, offset, value in records:
        try:
            rows = fold_rows((partition << _OFFSET_BITS) | offset, value)
        except (ValueError, TypeError, KeyError, AttributeError):
            rows = None
        yield partition, offset, rows


class HistoryStore:
    """One SQLite file: one writer connection (the folding thread), a connection per reader."""

    def __init__(self, path: str, topic: str) -> None:
        self.path = path
        self.topic = topic
        self._writer: sqlite3.Connection | None = None
        #: Retention's search for old rows (see :meth:`expire`), on the writer's thread.
        self._scanner: sqlite3.Connection | None = None
        #: The stored position (next offset) of each partition, as of the last commit.
        self._folded: dict[int, int] = {}
        #: The positions the open transaction reached (stored at its commit).
        self._positions: dict[int, int] = {}
        #: The open transaction's delivery upserts not yet written (see :meth:`flush`).
        self._deliveries: list[tuple[Any, ...]] = []
        #: Retention looks at webhooks in order: those up to this one are done.
        self._expire_after = ""
        self.invalid_records = 0
        #: Whether the secondary indexes exist (False while a rebuild defers them).
        self.indexed = True

    # --- connections ------------------------------------------------------
    def connect(self, readonly: bool = False) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        if readonly:
            conn.execute("PRAGMA query_only = ON")
        return conn

    def open(self) -> dict[int, int]:
        """Open (or create) the file for writing; the stored positions per partition.

        A file made for another topic, or by another schema version, is emptied:
        its rows could not be continued from this topic's positions.
        """
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = self.connect()
        # A new file only (an existing one keeps its size): 8 KB pages made folding
        # cost about 15% less CPU than the default 4 KB (fewer levels, fewer splits in
        # the nine B-trees), at the same disk size.
        conn.execute(f"PRAGMA page_size = {PAGE_BYTES}")
        # WAL: readers never wait for the writer. NORMAL sync: a power loss may drop
        # the last transactions, rows and positions together, so folding resumes
        # consistently from the older position.
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        # Folding touches six B-trees at scattered keys: with SQLite's default 2 MB
        # page cache the rate fell by half past a few hundred thousand attempts.
        conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KB}")
        # A rebuild's large transactions grow the WAL to hundreds of MB (368 MB at
        # 1 M attempts); SQLite reuses the file but keeps its size unless told to
        # cut it back after a checkpoint, which would hold that disk for good.
        conn.execute(f"PRAGMA journal_size_limit = {WAL_KEPT_BYTES}")
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
            # Another layout (tables, indexes): dropped whole, then rebuilt from the
            # topic like a new file, as its rows could not be converted in place any
            # faster than folded again.
            log.warning(
                "history store %s has schema version %s, not %s: rebuilt from the topic",
                self.path,
                meta.get("schema"),
                SCHEMA_VERSION,
            )
            self._drop(conn)
            meta = {}
        conn.executescript(_TABLES)
        if meta and meta.get("topic") != self.topic:
            log.warning("history store %s was for another topic: rebuilt", self.path)
            self._reset(conn)
            meta = {}
        # A file with no rows yet (new, emptied, of another version) is rebuilt from
        # the topic without its secondary indexes, which are created in one sort each
        # once it has caught up (build_indexes): a row at a time, their scattered
        # writes took half of a rebuild's time at 3 M attempts, and sorting them
        # afterwards a tenth of it. Until then the API is not ready, so no query
        # runs without them. A kill in between leaves "deferred" here for the next start.
        # (A file of schema 2 from before this mark has its indexes: "built".)
        self.indexed = bool(meta) and meta.get("indexes", "built") == "built"
        if self.indexed:
            _create_indexes(conn)
        else:
            for name in _INDEXES:
                conn.execute(f"DROP INDEX IF EXISTS {name}")
        conn.execute(
            "INSERT OR REPLACE INTO meta VALUES ('topic', ?), ('schema', ?), ('indexes', ?)",
            (self.topic, SCHEMA_VERSION, "built" if self.indexed else "deferred"),
        )
        self._writer = conn
        # Retention looks at every webhook's oldest rows, pages that folding does not
        # need: read through a connection of their own with SQLite's default 2 MB
        # cache, they stay out of the writer's 64 MB one, which a pass over 10,000
        # webhooks otherwise filled by 27 MB at 1 M attempts right after a restart.
        self._scanner = self.connect(readonly=True)
        self._folded = dict(conn.execute("SELECT partition, next_offset FROM positions").fetchall())
        return dict(self._folded)

    def build_indexes(self) -> None:
        """Create the secondary indexes a rebuild went without (see :meth:`open`).

        One transaction per index, so the WAL holds one index at a time; a kill
        in between leaves the file "deferred", and the next start creates what is
        missing once it has caught up again.
        """
        conn = self._writer
        assert conn is not None, "history store not open"
        if self.indexed:
            return
        began = time.monotonic()
        # SQLite's sorter takes as much memory as the page cache may, beside the
        # cache itself: building the attempts' time index over 10 M attempts took
        # a process with a full 64 MB cache from 88 to 152 MB; at 16 MB the cache
        # gives pages back, the process stayed at 88 MB and the sort took 11.6 s
        # instead of 11.2.
        conn.execute(f"PRAGMA cache_size = -{SORT_CACHE_KB}")
        _create_indexes(conn)
        conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KB}")
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('indexes', 'built')")
        self.indexed = True
        log.info("history store %s: indexes built in %.1f s", self.path, time.monotonic() - began)

    def reset(self) -> None:
        """Forget every row and position (the topic was recreated)."""
        assert self._writer is not None
        self._reset(self._writer)
        self._folded = {}

    @staticmethod
    def _drop(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        for kind, name in conn.execute(
            "SELECT type, name FROM sqlite_schema WHERE type IN ('table', 'index') "
            "AND name NOT LIKE 'sqlite_%' AND sql IS NOT NULL"
        ).fetchall():
            if kind == "table":  # its indexes go with it
                conn.execute(f'DROP TABLE "{name}"')
        conn.execute("COMMIT")
        conn.execute("VACUUM")  # give the old layout's pages back

    @staticmethod
    def _reset(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        for table in ("positions", "deliveries", "attempts", "meta"):
            conn.execute(f"DELETE FROM {table}")
        conn.execute("COMMIT")

    def close(self) -> None:
        if self._scanner is not None:
            self._scanner.close()
            self._scanner = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # --- folding (the one writer) ------------------------------------------
    def fold(self, records: Iterable[tuple[int, int, bytes | None]]) -> dict[int, int]:
        """Apply records (partition, offset, value) and store the positions, atomically.

        Returns the new position (next offset) of each partition touched. A record
        below its partition's stored position was folded already (rows and
        positions are written together) and is skipped.
        """
        self.begin()
        try:
            self.apply(records)
        except BaseException:
            self.rollback()
            raise
        return self.commit()

    def begin(self) -> None:
        """Open a transaction that :meth:`apply` adds to and :meth:`commit` ends.

        One transaction may take several batches: each commit writes every page
        it touched (to the WAL, later to the file), and a batch of thousands of
        records touches pages all over the webhook-keyed indexes, so folding a
        backlog in a few large transactions writes each page a few times instead
        of once per batch.
        """
        assert self._writer is not None, "history store not open"
        self._writer.execute("BEGIN IMMEDIATE")
        self._positions = {}
        self._deliveries = []

    def apply(self, records: Iterable[tuple[int, int, bytes | None]]) -> None:
        """Add records to the open transaction (nothing is visible before commit)."""
        self.write(parse_records(records))
        self.flush()

    def write(self, parsed: Iterable[Parsed]) -> None:
        """Add parsed records (:func:`parse_records`) to the open transaction.

        A record below its partition's position was folded already and is
        skipped; one that did not fit is counted. Attempt rows are inserted now;
        the deliveries' upserts wait for :meth:`flush` (or the commit), to go in
        key order over all the records written since.
        """
        conn = self._writer
        assert conn is not None, "history store not open"
        folded = self._folded
        positions = self._positions
        delivery_rows = self._deliveries
        attempt_rows: list[tuple[Any, ...]] = []
        for partition, offset, rows in parsed:
            if offset < positions.get(partition, folded.get(partition, 0)):
                continue
            positions[partition] = offset + 1
            if rows is None:
                self.invalid_records += 1
                continue
            attempt_rows.append(rows[0])
            delivery_rows.append(rows[1])
            if len(attempt_rows) == _ROWS_AT_ONCE:
                conn.executemany(_INSERT_ATTEMPT, attempt_rows)
                attempt_rows.clear()
        conn.executemany(_INSERT_ATTEMPT, attempt_rows)

    def flush(self) -> None:
        """Upsert the deliveries of the records written since the last flush."""
        conn = self._writer
        assert conn is not None, "history store not open"
        delivery_rows, self._deliveries = self._deliveries, []
        # In key order (a stable sort: one delivery's records keep theirs): the
        # deliveries table and its indexes all lead with the webhook, so the batch
        # goes through each B-tree in one sweep instead of at scattered pages.
        delivery_rows.sort(key=_delivery_key)
        conn.executemany(_UPSERT, delivery_rows)

    def commit(self) -> dict[int, int]:
        """Store the positions with the rows and commit; the positions written."""
        conn = self._writer
        assert conn is not None, "history store not open"
        positions = self._positions
        try:
            self.flush()
            conn.executemany(
                "INSERT OR REPLACE INTO positions VALUES (?, ?)", list(positions.items())
            )
            conn.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise
        self._folded.update(positions)
        self._positions = {}
        return positions

    def rollback(self) -> None:
        """Forget the open transaction's rows and positions."""
        assert self._writer is not None, "history store not open"
        if self._writer.in_transaction:
            self._writer.execute("ROLLBACK")
        self._positions = {}
        self._deliveries = []

    def expire(self, cutoff_ms: int, batch: int = 2000) -> int:
        """Delete up to ``batch`` deliveries last touched before ``cutoff_ms``, with
        their attempts; how many went. Short transactions: folding goes on between.

        Old rows are found webhook by webhook through the time index (a delivery's
        first attempt is no later than its last), resuming where the last call
        stopped: 0 means none was left from there to the last webhook. They are
        searched for outside the write transaction (see :meth:`open`), then deleted
        only if still older than the cutoff when the transaction holds the file.
        """
        conn, scan = self._writer, self._scanner
        assert conn is not None and scan is not None, "history store not open"
        found: list[tuple[str, str]] = []
        while len(found) < batch:
            row = scan.execute(
                "SELECT min(webhook_id) FROM deliveries WHERE webhook_id > ?",
                (self._expire_after,),
            ).fetchone()
            if row[0] is None:  # a pass over every webhook ended: the next starts over
                self._expire_after = ""
                break
            found += scan.execute(
                "SELECT webhook_id, delivery_id FROM deliveries "
                "INDEXED BY deliveries_by_time "
                "WHERE webhook_id = ? AND created_ms < ? AND latest_ms < ? LIMIT ?",
                (row[0], cutoff_ms, cutoff_ms, batch - len(found)),
            ).fetchall()
            if len(found) < batch:  # none left in this webhook (else it is looked at again)
                self._expire_after = row[0]
        if not found:
            return 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            positions: list[tuple[int]] = []
            deleted = 0
            for webhook_id, delivery_id in found:
                # This connection is the only writer, so a row found old is still old
                # here; the condition keeps it so should that ever change.
                gone = conn.execute(
                    "DELETE FROM deliveries WHERE webhook_id = ? AND delivery_id = ? "
                    "AND latest_ms < ? RETURNING positions",
                    (webhook_id, delivery_id, cutoff_ms),
                ).fetchone()
                if gone is not None:
                    deleted += 1
                    positions += [(int(p),) for p in gone[0].split(",")]
            conn.executemany("DELETE FROM attempts WHERE position = ?", positions)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return deleted

    # --- queries (any connection) ------------------------------------------
    @staticmethod
    def deliveries(
        conn: sqlite3.Connection,
        webhook_id: str,
        filters: Filters,
        before: tuple[int, str] | None,
        limit: int,
    ) -> tuple[list[DeliveryRow], bool]:
        """Newest first by first attempt time (then id); the page and whether more follow."""
        where = ["webhook_id = ?"]
        args: list[Any] = [webhook_id]
        if filters.status is not None and filters.status != "succeeded":
            # Implied by the status, written out so that the planner can use the
            # status index (which holds only these rows).
            where.append("status <> 'succeeded'")
        for column, value in (
            ("status", filters.status),
            ("event", filters.event),
            ("session_id", filters.session_id),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if filters.since_ms is not None:
            where.append("created_ms >= ?")
            args.append(filters.since_ms)
        if filters.until_ms is not None:
            where.append("created_ms < ?")
            args.append(filters.until_ms)
        if before is not None:
            where.append("(created_ms, delivery_id) < (?, ?)")
            args.extend(before)
        rows = conn.execute(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE {' AND '.join(where)} "
            "ORDER BY created_ms DESC, delivery_id DESC LIMIT ?",
            (*args, limit + 1),
        ).fetchall()
        return [_delivery(r) for r in rows[:limit]], len(rows) > limit

    @staticmethod
    def delivery(
        conn: sqlite3.Connection, webhook_id: str, delivery_id: str
    ) -> tuple[DeliveryRow, list[AttemptRow]] | None:
        """One delivery and its records, oldest first, in one query."""
        rows = conn.execute(
            f"SELECT {', '.join('d.' + c for c in _DELIVERY_COLUMNS.split(', '))}, "
            "a.kind, a.attempt, a.at_ms, a.stage, a.duration_ms, a.ok, a.status_code, "
            "a.error_class, a.error, a.snippet, a.next_retry_ms, a.dead_lettered, a.headers, "
            "a.body, a.event_timestamp, a.source, a.requested_by, a.position "
            "FROM deliveries d, json_each('[' || d.positions || ']') p "
            "LEFT JOIN attempts a ON a.position = p.value "
            "WHERE d.webhook_id = ? AND d.delivery_id = ?",
            (webhook_id, delivery_id),
        ).fetchall()
        if not rows:
            return None
        # Sorted here, not by an ORDER BY: SQLite's sorter copied the bodies and
        # headers along and took twice the rest of the query's time.
        rows.sort(key=_time_and_position)
        attempts = [
            AttemptRow(
                r[11],
                r[12],
                r[13],
                r[14],
                r[15],
                bool(r[16]),
                r[17],
                r[18],
                r[19],
                r[20],
                r[21],
                bool(r[22]),
                None if r[23] is None else orjson.loads(r[23]),
                r[24],
                r[25],
                None if r[26] is None else orjson.loads(r[26]),
                r[27],
            )
            for r in rows
            if r[11] is not None
        ]
        return _delivery(rows[0]), attempts

    @staticmethod
    def failed_since(
        conn: sqlite3.Connection, webhook_id: str, since_ms: int, limit: int
    ) -> list[tuple[DeliveryRow, AttemptRow | None]]:
        """Failing and dead-lettered deliveries first attempted since ``since_ms``,
        oldest first, each with its latest record carrying the body (None if gone)."""
        rows = conn.execute(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries INDEXED BY deliveries_by_status "
            "WHERE webhook_id = ? AND status IN ('failing', 'dead_lettered') "
            "AND status <> 'succeeded' AND created_ms >= ? "
            "ORDER BY created_ms, delivery_id LIMIT ?",
            (webhook_id, since_ms, limit),
        ).fetchall()
        out: list[tuple[DeliveryRow, AttemptRow | None]] = []
        for row in rows:
            found = HistoryStore.delivery(conn, webhook_id, row[0])
            if found is None:
                continue
            with_body = [a for a in found[1] if a.body is not None]
            out.append((found[0], with_body[-1] if with_body else None))
        return out

    @staticmethod
    def summary(conn: sqlite3.Connection, webhook_id: str, now_ms: int) -> dict[str, Any]:
        """The last 24 h: successes, failures, latency percentiles; the last error."""
        since = now_ms - 24 * HOUR_MS
        counts = dict(
            conn.execute(
                "SELECT ok, count(*) FROM attempts WHERE webhook_id = ? AND at_ms >= ? "
                "AND kind = 'attempt' GROUP BY ok",
                (webhook_id, since),
            ).fetchall()
        )
        durations = [
            d
            for (d,) in conn.execute(
                "SELECT duration_ms FROM attempts WHERE webhook_id = ? AND at_ms >= ? "
                "AND kind = 'attempt' ORDER BY duration_ms",
                (webhook_id, since),
            )
        ]
        err = conn.execute(
            "SELECT at_ms, error_class, status_code, error FROM attempts "
            "INDEXED BY attempts_failed WHERE webhook_id = ? AND ok = 0 AND kind = 'attempt' "
            "ORDER BY at_ms DESC LIMIT 1",
            (webhook_id,),
        ).fetchone()
        last = conn.execute(
            "SELECT ok FROM attempts WHERE webhook_id = ? AND kind = 'attempt' "
            "ORDER BY at_ms DESC LIMIT 1",
            (webhook_id,),
        ).fetchone()
        return {
            "successes_24h": counts.get(1, 0),
            "failures_24h": counts.get(0, 0),
            "latency_ms": {f"p{q}": percentile(durations, q) for q in (50, 90, 99)},
            "last_error": None
            if err is None
            else {
                "at": from_ms(err[0]),
                "error_class": err[1],
                "status_code": err[2],
                "error": err[3],
            },
            "failing_now": last is not None and not last[0],
        }

    @staticmethod
    def hourly(
        conn: sqlite3.Connection, webhook_id: str, since_ms: int, until_ms: int
    ) -> list[dict[str, Any]]:
        """Per hour with attempts: successes, failures and latency percentiles."""
        hours: dict[int, tuple[list[float], list[int]]] = {}
        for at_ms, ok, duration in conn.execute(
            "SELECT at_ms, ok, duration_ms FROM attempts WHERE webhook_id = ? "
            "AND at_ms >= ? AND at_ms < ? AND kind = 'attempt'",
            (webhook_id, since_ms, until_ms),
        ):
            durations, counts = hours.setdefault(at_ms // HOUR_MS, ([], [0, 0]))
            durations.append(duration)
            counts[0 if ok else 1] += 1
        out = []
        for hour in sorted(hours):
            durations, (ok_count, failed) = hours[hour]
            durations.sort()
            out.append(
                {
                    "hour": from_ms(hour * HOUR_MS),
                    "successes": ok_count,
                    "failures": failed,
                    "latency_ms": {f"p{q}": percentile(durations, q) for q in (50, 90, 99)},
                }
            )
        return out

    @staticmethod
    def counts(conn: sqlite3.Connection) -> tuple[int, int]:
        """Deliveries and attempt records held (for tests and the benchmark)."""
        row = conn.execute(
            "SELECT (SELECT count(*) FROM deliveries), (SELECT count(*) FROM attempts)"
        ).fetchone()
        return int(row[0]), int(row[1])


def percentile(sorted_values: list[float], q: int) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))
    return round(sorted_values[index], 3)


class HistoryReads:
    """A small pool of reader threads, each with its own read-only connection.

    Requests wait on it from the event loop; ``/healthz`` and ``/readyz`` never
    use it, so a slow query cannot delay them.
    """

    def __init__(self, store: HistoryStore, threads: int) -> None:
        self.store = store
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="history-read")

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.store.connect(readonly=True)
            with self._lock:
                self._connections.append(conn)
        return conn

    def run(self, query: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``query`` on a reader thread and wait for it (from a worker thread)."""
        return self.pool.submit(lambda: query(self._conn())).result()

    async def call(self, query: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``query`` on a reader thread, awaited from the event loop."""
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, lambda: query(self._conn())
        )

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()


@contextmanager
def opened(path: str, topic: str) -> Iterator[HistoryStore]:
    """A store opened for writing, with its indexes as once caught up, closed after
    (tools and tests: the queries name the indexes they use)."""
    store = HistoryStore(path, topic)
    store.open()
    store.build_indexes()
    try:
        yield store
    finally:
        store.close()
