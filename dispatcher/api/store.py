"""The API's view of the configuration, and its writes to the delivery topics.

Reads come from :class:`~dispatcher.config_state.ConfigView` (read_committed).
Changes of the configuration go through the one writer
(:mod:`dispatcher.config_writer`), never through here; :meth:`Store.write` is for
the delivery topics (a resend's marker and retry record), with the idempotent
producer, and waits until a record on a topic this process follows has been read
back (read-your-writes).
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaError, Producer

from dispatcher.config_state import ConfigView
from dispatcher.errors import KafkaSetupError, WriteTimeout
from dispatcher.kafka import make_producer
from dispatcher.records import Headers
from dispatcher.settings import Settings

log = logging.getLogger(__name__)


class Store(ConfigView):
    """The configuration as this replica reads it; a producer for the delivery topics."""

    name = "webhooks"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._producer: Producer | None = None

    def start(self) -> None:
        super().start()
        self._producer = make_producer(self.settings)

    def stop(self) -> None:
        super().stop()
        if self._producer is not None:
            self._producer.flush(10)

    def write(
        self,
        batch: list[tuple[str, str, bytes | None]],
        headers: Headers | None = None,
        each: list[Headers] | None = None,
    ) -> list[tuple[str, int, int]]:
        """Produce every record, then wait until the reader has applied those it reads.

        ``headers`` go on every record of the batch, or ``each`` gives every record
        its own (used for other topics only).
        Returns where each record was written: (topic, partition, offset).
        """
        assert self._producer is not None, "store not started"
        written: list[tuple[str, int, int]] = []
        errors: list[str] = []

        def report(err: KafkaError | None, msg: object) -> None:
            if err is not None:
                errors.append(err.str())
            else:
                written.append((msg.topic(), msg.partition(), msg.offset()))  # type: ignore[attr-defined]

        for i, (topic, key, value) in enumerate(batch):
            own = each[i] if each is not None else headers
            self._producer.produce(
                topic, value, key.encode(), headers=list(own or []), on_delivery=report
            )
        timeout_s = self.settings.api_write_timeout_s
        left = self._producer.flush(timeout_s)
        if left or errors:
            raise KafkaSetupError(f"write not acknowledged by Kafka: {'; '.join(errors) or left}")
        deadline = time.monotonic() + timeout_s
        for topic, partition, offset in written:
            if topic in self.topics and not self.wait_past(topic, partition, offset, deadline):
                raise WriteTimeout("write acknowledged but not read back in time")
        return written
