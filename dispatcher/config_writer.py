"""The one writer of the configuration topics, enforced by Kafka.

A transactional producer with one fixed ``transactional.id``
(:func:`dispatcher.kafka.writer_producer_config`). Taking the role is
``init_transactions`` (which aborts whatever an earlier holder left open and
fences it: its next commit fails) followed by reading the configuration to its
end; only then is a change decided. Changes are applied one at a time, each
decided against the state then in force and written as one transaction.

What an error means to the caller:

* :class:`~dispatcher.errors.Refusal` (from the decision): nothing written.
* :class:`NotApplied`: Kafka refused or could not take the change, and it was
  aborted: nothing of it is or will become visible.
* :class:`OutcomeUnknown`: the commit was sent and no answer came, and the
  writer could not read back whether it took effect. Reading the webhook (or
  retrying a create with the same ``Idempotency-Key``) shows the real outcome
  once Kafka is back.

A writer that finds itself fenced (the command line took the role for one
change, or another process started as the writer) takes the role back for its
next change, reading to the end first, so no change is decided from a stale view.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from pydantic import ValidationError

from dispatcher import metrics
from dispatcher.config_state import ConfigView
from dispatcher.errors import Fenced, KafkaSetupError, NotApplied, OutcomeUnknown, Unanswered
from dispatcher.kafka import (
    Outgoing,
    close_aside,
    describe,
    make_producer_from,
    writer_producer_config,
)
from dispatcher.models import Subscription
from dispatcher.settings import Settings
from dispatcher.webhook_health import manual_disable

log = logging.getLogger(__name__)

T = TypeVar("T")
#: A decision: the records of one change (none: nothing to write) and the answer.
Decide = Callable[[], tuple[list[Outgoing], T]]
Position = tuple[str, int, int]

_FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}


class ConfigWriter:
    """Applies changes to the configuration topics, one at a time, each in one transaction."""

    def __init__(self, settings: Settings, view: ConfigView) -> None:
        self.settings = settings
        self.view = view
        self._lock = threading.Lock()
        self._producer: Producer | None = None
        self.takeovers = 0

    # --- the role ------------------------------------------------------------------
    def take_role(self) -> None:
        """Fence any earlier holder, then read the configuration to its end."""
        with self._lock:
            self._take_role(time.monotonic() + self.settings.api_write_timeout_s)

    def _take_role(self, deadline: float) -> None:
        self._drop()
        producer = make_producer_from(writer_producer_config(self.settings))
        # Held from here, so that a failure below closes it (the next try makes another).
        self._producer = producer
        try:
            producer.init_transactions(max(deadline - time.monotonic(), 1.0))
        except KafkaException as exc:
            self._drop()
            raise KafkaSetupError(f"cannot take the writer role: {describe(exc)}") from None
        if not self.view.wait_until_end(deadline):
            self._drop()
            raise KafkaSetupError("took the writer role but could not read to the end in time")
        self.takeovers += 1
        log.info("holding the configuration writer role (%s)", self.settings.config_writer_id)

    def _drop(self) -> threading.Thread | None:
        """Forget the producer (its open transaction is aborted by the next holder)."""
        producer, self._producer = self._producer, None
        if producer is None:
            return None
        # A fenced or failed producer may refuse to purge; closing it is what matters.
        with contextlib.suppress(KafkaException):
            producer.purge(in_queue=True, in_flight=True)
        # close() aborts an open transaction and may wait for Kafka: not under the lock.
        return close_aside(producer, "writer-close")

    def close(self) -> None:
        """Give the role up; waits a little for the producer to close cleanly."""
        with self._lock:
            closing = self._drop()
        if closing is not None:
            closing.join(5.0)

    # --- changes -----------------------------------------------------------------------
    def apply(self, decide: Decide[T]) -> tuple[T, list[Position]]:
        """Decide against the state in force and commit the records as one transaction.

        Returns the decision's answer and where its records were written (the API's
        replicas wait to have read past them before answering: read-your-writes).
        """
        with self._lock:
            deadline = time.monotonic() + self.settings.api_write_timeout_s
            for attempt in (1, 2):
                if self._producer is None:
                    self._take_role(deadline)
                records, answer = decide()
                if not records:
                    return answer, []
                notices = self._manual_disables(records)
                records = records + notices
                try:
                    written = self._commit(records, deadline)
                except Fenced:
                    # Fenced before the commit: the new holder aborted our transaction,
                    # so nothing was applied; decide again from the state then in force.
                    log.warning("the writer role was taken by another process; taking it back")
                    self._drop()
                    if attempt == 2:
                        raise NotApplied("the writer role moved during the change") from None
                    continue
                except Unanswered:
                    written = self._read_back(records, deadline)
                    self._count(notices)
                    return answer, written
                self._count(notices)
                self._wait_read_back(written, deadline)
                return answer, written
        raise AssertionError("unreachable")

    def _manual_disables(self, records: list[Outgoing]) -> list[Outgoing]:
        """The ``webhook.disabled`` (reason ``manual``) of each enabled webhook a change
        disables, and its health record, to commit in the same transaction as the change.

        Decided here, from the records about to be written, because every change of
        the subscriptions topic passes this writer (the API's routes, the command line,
        a change that sets ``enabled`` among other fields): none can forget the event,
        and the event cannot be committed without the change or the change without it.
        A webhook already disabled gives none, nor does one created disabled; the
        writer's own disables (reason ``failing``) get theirs from the health fold.
        """
        extra: list[Outgoing] = []
        for record in records:
            if record.topic != self.settings.subscriptions_topic or record.value is None:
                continue
            try:
                after = Subscription.model_validate_json(record.value)
            except ValidationError:
                continue  # not a webhook the dispatchers load: nothing to disable
            before = self.view.subscription(after.webhook_id)
            if (
                before is None
                or not before.enabled
                or after.enabled
                or after.disabled_reason != "manual"
            ):
                continue
            at = after.disabled_at or after.updated_at
            notice, health = manual_disable(
                after.webhook_id, after.organization_id, at, self.view.health.get(after.webhook_id)
            )
            key = after.webhook_id.encode()
            if health is not None:
                extra.append(Outgoing(self.settings.health_topic, health.to_json(), key))
            extra.append(Outgoing(self.settings.notifications_topic, notice.to_json(), key))
        return extra

    def _count(self, notices: list[Outgoing]) -> None:
        """Counted once committed (the health fold counts its own events)."""
        for record in notices:
            if record.topic == self.settings.notifications_topic:
                metrics.NOTIFICATIONS.labels("webhook.disabled").inc()
                log.info(
                    "webhook.disabled sent (manual)",
                    extra={"webhook_id": (record.key or b"").decode()},
                )

    def _commit(self, records: list[Outgoing], deadline: float) -> list[Position]:
        producer = self._producer
        assert producer is not None
        written: list[Position] = []
        failed: list[KafkaError] = []

        def report(err: KafkaError | None, msg: Message) -> None:
            # Only kept here: librdkafka may call this with a fatal error pending, when
            # calling back into the client fails.
            if err is not None:
                failed.append(err)
            else:
                written.append((msg.topic(), msg.partition(), msg.offset()))  # type: ignore[arg-type]

        try:
            producer.begin_transaction()
            for record in records:
                producer.produce(
                    record.topic,
                    record.value,
                    record.key,
                    headers=record.headers,
                    on_delivery=report,
                )
            left = producer.flush(max(deadline - time.monotonic(), 0.1))
            if any(e.code() in _FENCED for e in failed):
                raise Fenced()
            if left or failed:
                why = "; ".join(e.str() for e in failed) or f"{left} record(s) left"
                self._abort(f"not acknowledged: {why}")
            producer.commit_transaction(max(deadline - time.monotonic(), 0.1))
        except (KafkaException, SystemError) as exc:
            err = _kafka_error(exc)
            if err is None:
                raise
            if err.code() in _FENCED:
                raise Fenced() from None
            if err.txn_requires_abort():
                self._abort(err.str())
            # A fatal error, or a commit that timed out: the outcome is known only by
            # reading back (KAFKA-20785: a fatal INVALID_TXN_STATE with nothing committed).
            log.warning("commit of a configuration change unanswered: %s", err.str())
            raise Unanswered() from None
        return written

    def _abort(self, why: str) -> None:
        assert self._producer is not None
        try:
            self._producer.abort_transaction(5.0)
        except KafkaException as exc:
            # Could not even abort: the next holder's init_transactions will.
            log.warning("abort failed (%s); dropping the producer", describe(exc))
            self._drop()
        raise NotApplied(f"Kafka did not take the change, which was aborted: {why}")

    def _read_back(self, records: list[Outgoing], deadline: float) -> list[Position]:
        """After an unanswered commit: take the role again (which ends our transaction one
        way or the other) and see whether the change is in force."""
        self._drop()
        try:
            self._take_role(max(deadline, time.monotonic() + 5.0))
        except KafkaSetupError as exc:
            raise OutcomeUnknown(
                f"the commit was sent but not confirmed, and cannot be read back now ({exc})"
            ) from None
        # Records of topics the view does not read (notifications) were in the same
        # transaction as those it does: these say for all.
        if all(self.view.holds(r) for r in records if r.topic in self.view.topics):
            return []
        raise NotApplied("the commit was not confirmed, and reading back shows it did not apply")

    def _wait_read_back(self, written: list[Position], deadline: float) -> None:
        for topic, partition, offset in written:
            if topic in self.view.topics and not self.view.wait_past(
                topic, partition, offset, deadline + 5.0
            ):
                # Committed, so the change stands; but the next one must not be decided
                # before the view shows it: take the role again (reading to the end) first.
                log.warning("a committed change was not read back in time")
                self._drop()
                return


def _kafka_error(exc: BaseException) -> KafkaError | None:
    """The Kafka error behind ``exc``. A fatal error can surface from ``flush`` as a
    SystemError (a delivery callback run while the error was pending), caused by it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KafkaException) and seen.args and isinstance(seen.args[0], KafkaError):
            return seen.args[0]
        seen = seen.__cause__ or seen.__context__
    return None
