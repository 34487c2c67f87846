"""The subscriptions table: the compacted topic read whole into memory, then followed.

Like Kafka Streams' GlobalKTable: note each partition's end offset at start-up,
read from the beginning until every partition has reached it (only then is the
table *caught up* and may events be dispatched), and keep applying changes
afterwards. One reader thread writes; the event loop only reads, and every read
is a single dict lookup of an immutable tuple, so no lock is needed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from dispatcher import metrics
from dispatcher.errors import ConfigError, KafkaSetupError, SubscriptionError
from dispatcher.kafka import check_topic, describe, make_table_consumer
from dispatcher.models import Subscription, decode_subscription
from dispatcher.settings import Settings

log = logging.getLogger(__name__)

#: While the topic is missing or the broker unreachable: how often to look again,
#: and how often to repeat the warning (logged at once whenever the reason changes).
_REOPEN_EVERY_S = 2.0
_REOPEN_TIMEOUT_S = 5.0
_WAIT_LOG_EVERY_S = 60.0


class SubscriptionTable:
    """Subscriptions by webhook id and by organization, following the topic live."""

    def __init__(
        self,
        settings: Settings,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self._settings = settings
        self._by_id: dict[str, Subscription] = {}
        self._by_org: dict[str, tuple[Subscription, ...]] = {}
        # Written by the reader thread only; ``_by_org`` is rebuilt from it per
        # organization so an update costs the size of one organization.
        self._members: dict[str, dict[str, Subscription]] = {}
        self._caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._waiting_for: str | None = None
        self._on_change = on_change
        self.invalid_records = 0
        #: Webhook ids whose latest record was ignored, with why (``delete`` can clear them).
        self.ignored: dict[str, str] = {}

    # --- reads (any thread) -------------------------------------------------
    def get(self, webhook_id: str) -> Subscription | None:
        return self._by_id.get(webhook_id)

    def for_organization(self, organization_id: str) -> tuple[Subscription, ...]:
        return self._by_org.get(organization_id, ())

    def all(self) -> list[Subscription]:
        return list(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    @property
    def caught_up(self) -> bool:
        return self._caught_up.is_set()

    @property
    def waiting_for(self) -> str | None:
        """Why the table cannot start reading yet (missing topic, no broker), or None."""
        return self._waiting_for

    @property
    def failure(self) -> BaseException | None:
        """The error that stopped the reader thread, if it stopped."""
        return self._error

    # --- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        """Start following the topic in a background thread.

        A missing topic or an unreachable broker is waited for, not fatal: a pod
        started before ``dispatcher topics ensure`` ran stays alive and not ready
        (saying why, see :attr:`waiting_for`) and starts once the topic exists,
        instead of crash-looping.
        """
        self._thread = threading.Thread(
            target=self._open_and_follow, name="subscriptions-table", daemon=True
        )
        self._thread.start()

    def load_once(self, timeout_s: float = 30.0) -> None:
        """Read the topic up to its current end, then stop (for commands)."""
        consumer = self._open()
        self._stop.clear()
        thread = threading.Thread(target=self._run, args=(consumer, False), daemon=True)
        thread.start()
        thread.join(timeout_s)
        if self._error is not None:
            raise KafkaSetupError(
                f"cannot read {self._settings.subscriptions_topic}: {self._error}"
            )
        if not self._caught_up.is_set():
            self._stop.set()
            thread.join(5)
            raise KafkaSetupError(
                f"reading {self._settings.subscriptions_topic} took longer than {timeout_s:.0f} s"
            )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    # --- the reader thread --------------------------------------------------
    def _open_and_follow(self) -> None:
        logged_at = -_WAIT_LOG_EVERY_S
        while not self._stop.is_set():
            try:
                consumer = self._open(_REOPEN_TIMEOUT_S)
            except KafkaSetupError as exc:
                reason = str(exc)
                now = time.monotonic()
                if reason != self._waiting_for or now - logged_at >= _WAIT_LOG_EVERY_S:
                    log.warning("subscriptions table waiting: %s", reason)
                    logged_at = now
                self._waiting_for = reason
                self._stop.wait(_REOPEN_EVERY_S)
                continue
            except ConfigError as exc:  # a setting to fix: one line, no traceback
                log.error("subscriptions table reader could not start: %s", exc)
                self._error = exc
                return
            except Exception as exc:
                log.exception("subscriptions table reader could not start")
                self._error = exc
                return
            if self._waiting_for is not None:
                log.info("subscriptions topic %s available", self._settings.subscriptions_topic)
                self._waiting_for = None
            self._run(consumer, True)
            return

    def _open(self, timeout_s: float = 15.0) -> Consumer:
        topic = self._settings.subscriptions_topic
        consumer = make_table_consumer(self._settings)
        try:
            tmeta = check_topic(consumer, self._settings, topic, timeout_s)
        except KafkaSetupError:
            consumer.close()
            raise
        partitions = sorted(tmeta.partitions)
        self._pending_ends: dict[int, int] = {}
        try:
            for p in partitions:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=timeout_s
                )
                if high > low:
                    self._pending_ends[p] = high
        except KafkaException as exc:
            consumer.close()
            raise KafkaSetupError(
                f"cannot read the end offsets of {topic}: {describe(exc)}"
            ) from None
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        if not self._pending_ends:
            self._mark_caught_up()
        return consumer

    def _mark_caught_up(self) -> None:
        if not self._caught_up.is_set():
            log.info("subscriptions table caught up", extra={"subscriptions": len(self._by_id)})
            self._caught_up.set()

    def _run(self, consumer: Consumer, follow: bool) -> None:
        try:
            while not self._stop.is_set():
                if not follow and self._caught_up.is_set():
                    return
                # poll() returns with the first record; consume() would wait out its whole
                # timeout for a full batch, delaying every change by a fifth of a second.
                first = consumer.poll(0.2)
                if first is None:
                    continue
                for msg in (first, *consumer.consume(499, timeout=0)):
                    self._handle(msg)
        except Exception as exc:  # surfaced through readiness
            log.exception("subscriptions table reader stopped")
            self._error = exc
        finally:
            consumer.close()

    def _handle(self, msg: object) -> None:
        err = msg.error()  # type: ignore[attr-defined]
        partition: int = msg.partition()  # type: ignore[attr-defined]
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                self._reached(partition, msg.offset())  # type: ignore[attr-defined]
                return
            log.warning("subscriptions topic error: %s", err)
            return
        self._apply(msg.key(), msg.value())  # type: ignore[attr-defined]
        self._reached(partition, msg.offset() + 1)  # type: ignore[attr-defined]

    def _reached(self, partition: int, position: int) -> None:
        end = self._pending_ends.get(partition)
        if end is not None and position >= end:
            del self._pending_ends[partition]
            if not self._pending_ends:
                self._mark_caught_up()

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            self._ignore("no_key", "subscription record without a key ignored")
            return
        webhook_id = key.decode("utf-8", "replace")
        sub: Subscription | None = None
        if value is not None:
            try:
                sub = decode_subscription(key, value)
            except SubscriptionError as exc:
                self._ignore_record(webhook_id, str(exc))
                return
            except Exception as exc:  # whatever a record holds, the reader keeps going
                self._ignore_record(webhook_id, f"{type(exc).__name__}: {exc}")
                return
        self.ignored.pop(webhook_id, None)
        # Replace in place (never pop then add) so a concurrent reader never sees
        # a live subscription missing for an instant.
        old = self._by_id.get(webhook_id)
        if sub is not None:
            self._by_id[webhook_id] = sub
        else:
            self._by_id.pop(webhook_id, None)
        if old is not None and (sub is None or old.organization_id != sub.organization_id):
            self._members.get(old.organization_id, {}).pop(webhook_id, None)
            self._reindex(old.organization_id)
        if sub is not None:
            self._members.setdefault(sub.organization_id, {})[webhook_id] = sub
            self._reindex(sub.organization_id)
        if self._on_change is not None:
            self._on_change(len(self._by_id))

    def _ignore_record(self, webhook_id: str, why: str) -> None:
        self.ignored[webhook_id] = why
        self._ignore("invalid", f"subscription record {webhook_id!r} ignored: {why}")

    def _ignore(self, reason: str, message: str) -> None:
        """A record that would fail in the hot path: count it, say why, keep what was there.

        A subscription whose new version is unusable keeps its last good version,
        so one bad write never silently stops an endpoint that worked.
        """
        self.invalid_records += 1
        metrics.INVALID_SUBSCRIPTIONS.labels(reason).inc()
        log.warning("%s", message[:1000].encode("utf-8", "backslashreplace").decode())

    def _reindex(self, organization_id: str) -> None:
        members = self._members.get(organization_id)
        if members:
            self._by_org[organization_id] = tuple(members.values())
        else:
            self._members.pop(organization_id, None)
            self._by_org.pop(organization_id, None)
