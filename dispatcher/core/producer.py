"""An idempotent Kafka producer whose delivery reports resolve asyncio futures.

librdkafka delivers reports from ``poll()``; a small thread keeps polling so the
event loop never blocks, and each report is handed back to the loop.

A send is retried while the error can pass (timeouts, leader changes, an
unreachable broker); an error no retry can fix (a record larger than the topic
takes, a topic the client may not write, a record the broker calls invalid)
fails the send with :class:`ProduceRefused`, counted in
``dispatcher_produce_refused_total``, and the caller decides where the record
ends instead.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any, Final, Protocol

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from dispatcher import metrics
from dispatcher.core.links import ClientLink
from dispatcher.errors import ProduceRefused
from dispatcher.kafka import flush_or_fail, make_producer, make_producer_from, producer_config
from dispatcher.settings import Settings

log = logging.getLogger(__name__)

#: Errors that no retry can fix: the record itself, or the client's rights, are wrong.
PERMANENT: Final = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_REQUIRED_ACKS,
        KafkaError.POLICY_VIOLATION,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError._INVALID_ARG,
    }
)
#: How long records nobody waits for (attempt records, backlog snapshots) gather
#: into batches before they are sent, unless ``linger.ms`` is set in the Kafka
#: settings: the history and the health they feed run this much later.
QUIET_LINGER_MS: Final = 100
#: Of those, the ones that refuse a record for its size.
TOO_LARGE: Final = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})


class RecordSink(Protocol):
    """What the engine asks of a producer (a fake one in the engine's unit tests)."""

    @property
    def failure(self) -> str | None: ...

    async def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None: ...

    def produce_nowait(self, topic: str, value: bytes, key: bytes) -> None: ...

    def close(self, timeout_s: float = 30.0) -> None: ...


class AsyncProducer:
    """``await produce(...)`` returns once the broker acknowledged the record (acks=all)."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self._settings = settings
        #: What the producer last reported about its broker connections (/readyz).
        self.link = ClientLink("the producer")
        self._producer = make_producer(settings, self.link.config())
        #: The producer of records nobody waits for, made on first use.
        self._quiet: Producer | None = None
        self._loop = loop
        self._stop = threading.Event()
        self._failure: str | None = None
        self._thread = threading.Thread(target=self._poll, name="producer-poll", daemon=True)
        self._thread.start()

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> asyncio.Future[None]:
        """Queue a record; the future completes with its delivery report."""
        future: asyncio.Future[None] = self._loop.create_future()

        def report(err: KafkaError | None, _msg: Message) -> None:
            self._loop.call_soon_threadsafe(_settle, future, err)

        while True:
            try:
                self._producer.produce(topic, value, key, headers=list(headers), on_delivery=report)
                return future
            except BufferError:
                # Local queue full: let librdkafka send some, then try again.
                self._producer.poll(0.05)

    def produce_nowait(self, topic: str, value: bytes, key: bytes) -> None:
        """Queue a record nobody waits for; a failure is only logged (on the polling thread).

        For records that describe work rather than carry it (the attempts topic).
        They go through a producer of their own that reports failed records only:
        no future, no hop back to the event loop and no Python call per record
        written, which cost the event loop's thread time on every attempt.
        """
        quiet = self._quiet
        if quiet is None:
            conf = quiet_producer_config(self._settings)
            conf["on_delivery"] = _log_unwritten
            quiet = self._quiet = make_producer_from(conf)
        while True:
            try:
                quiet.produce(topic, value, key)
                return
            except BufferError:
                quiet.poll(0.05)

    async def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        """Produce and wait for the acknowledgement, retrying until it is durable.

        Raises :class:`ProduceRefused` for an error no retry can fix.
        """
        delay = 0.2
        while True:
            try:
                await self.produce(topic, value, key, headers)
                return
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if isinstance(err, KafkaError) and (err.fatal() or err.code() in PERMANENT):
                    metrics.PRODUCE_REFUSED.labels(topic, err.name()).inc()
                    if err.fatal():
                        self._failure = f"the producer failed for good: {err.str()}"
                    raise ProduceRefused(
                        topic, err.code(), err.name(), err.str(), err.code() in TOO_LARGE
                    ) from None
                # Idempotence already retried inside librdkafka; a failure here means
                # message.timeout.ms passed. The offset stays uncommitted meanwhile.
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    @property
    def failure(self) -> str | None:
        """Why delivery reports stopped arriving (the poll thread is gone), or None."""
        if self._failure is None and not self._thread.is_alive() and not self._stop.is_set():
            return "the producer poll thread stopped"
        return self._failure

    def _poll(self) -> None:
        try:
            while not self._stop.is_set():
                self._producer.poll(0.1)
                quiet = self._quiet
                if quiet is not None:
                    quiet.poll(0)
        except Exception as exc:
            metrics.INTERNAL_ERRORS.labels("thread").inc()
            self._failure = f"the producer poll thread died: {exc!r}"
            log.exception("the producer poll thread died")

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush what is queued, then stop the polling thread."""
        try:
            flush_or_fail(self._producer, timeout_s, "retry, dead-letter or invalid-event")
        finally:
            try:
                # Records nobody waits for: what does not get out is logged, never raised.
                left = self._quiet.flush(timeout_s) if self._quiet is not None else 0
                if left:
                    log.warning("%d attempt record(s) not written before closing", left)
            finally:
                self._stop.set()
                self._thread.join(5)


def quiet_producer_config(settings: Settings) -> dict[str, Any]:
    """The producer of records nobody waits for: failures reported only, and batched
    for :data:`QUIET_LINGER_MS` unless the Kafka settings name ``linger.ms``."""
    conf = producer_config(settings)
    conf["delivery.report.only.error"] = True
    if "linger.ms" not in settings.kafka_extra_config:
        # One record per attempt, keyed over every partition: at 5 ms each batch
        # held one or two records, and the broker (and this process's network
        # thread) handled a request for each.
        conf["linger.ms"] = QUIET_LINGER_MS
    return conf


def _log_unwritten(err: KafkaError | None, msg: Message) -> None:
    """The delivery report of a record nobody waits for: called for failures only."""
    if err is not None:
        log.warning("record for %s not written: %s", msg.topic(), err.str())


def _settle(future: asyncio.Future[None], err: KafkaError | None) -> None:
    if future.done():
        return
    if err is None:
        future.set_result(None)
    else:
        future.set_exception(KafkaException(err))
