"""Deliveries: one attempt at an endpoint, or the hand-over to the next topic.

A :class:`Delivery` is one (event, subscription) pair for one try. The
:class:`DeliveryRunner` admits it at its endpoint (the webhook: start, queue or
defer), makes the attempt, and on failure writes the delivery record to the next
retry stage or to the dead-letter topic. Each delivery holds a
:class:`~dispatcher.core.work.Ticket` that it finishes only once its result is final
or durably written, so the message's offset may then be committed.

Each endpoint has a lane of its own. Its slots and a short queue hold what it
takes next; once the queue is full, an endpoint that clears it within
``endpoint_queue_wait_s`` is merely busy and the partitions that feed it wait
(backpressure), while a *slow* one (it would take longer) has what does not fit
parked in Kafka: deferred, without spending an attempt, to the retry stage it
would wait in anyway, with reason ``endpoint_slow`` and a due time paced to the
endpoint's own rate, so that it comes back while the queue still has work and
the slots never run dry. A full queue that holds its partitions is judged every
``HOLD_MAX_S``: without an answer since, while others answered, it is slow. An
endpoint not measured yet (no answer to a request sent after its first answer:
the first ones pay for new connections, see ``Endpoint.cold_latency``) keeps a
burst in its queue instead, within the half of the in-flight places that slow
and unmeasured endpoints' lanes (their queues and busy slots) share; one that
finds that half spent is judged (the same verdict) while its burst waits in a
quarter more, so the partitions do not wait for the verdict, and judged slow it
parks what it holds beyond the half. The
partitions go on for every other webhook; the offsets of what waits in a queue
stay uncommitted (a few seconds of the endpoint's work), and what is parked was
durably written first.
A stalled endpoint or an open circuit defers everything, and a delivery
deferred for longer than ``deferral_max_age_s`` is dead-lettered with reason
``endpoint_unavailable``.

A delivery deferred *again* by an open or half-open circuit is paced: it comes
due at least ``1 / circuit_deferrals_per_s`` after the one before it for the
same webhook, in the last retry stage (see
:func:`~dispatcher.core.routing.paced_deferral`), so a dead webhook's backlog is
read back at that rate however large it is (up to the longest retry delay, past
which each record waits that long), instead of all of it once per retry delay.
A first deferral waits the usual delay: by then the circuit has usually been
half-open and judged the endpoint, and a flaky one gets its backlog at its own
pace rather than the pacing's.

A webhook with ``rate_limit_per_s`` goes through the same lane with the limit as
its pace: its deliveries start no faster than this instance's share of the limit
(:mod:`dispatcher.core.ratelimit`); a timer starts the next queued one when the
limit allows; what does not fit in the queue (what the limit starts in
``endpoint_queue_wait_s``) is parked in Kafka with reason ``rate_limited``, due
when its turn comes at the webhook's whole limit (every instance takes its share
of what comes back). Such a queue never holds its partitions, and waiting, in
memory or in Kafka, spends no attempt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from dispatcher import metrics
from dispatcher.core.attempt_log import emit_attempt
from dispatcher.core.backpressure import Backpressure
from dispatcher.core.breaker import BreakerPolicy, State
from dispatcher.core.endpoints import Admission, Endpoint
from dispatcher.core.loop_lag import LoopLag
from dispatcher.core.partitions import PartitionState, Slot, now_ms
from dispatcher.core.producer import RecordSink
from dispatcher.core.routing import NextHop, after_failure, for_deferral, paced_deferral
from dispatcher.core.work import Ticket, Work
from dispatcher.errors import ProduceRefused
from dispatcher.models import Subscription
from dispatcher.outbound.delivery import AttemptResult, build_headers, post
from dispatcher.outbound.sender import Sender
from dispatcher.records import Attempt, DeliveryRecord, Source, record_headers
from dispatcher.settings import Settings
from dispatcher.stages import RetryStage

log = logging.getLogger(__name__)
#: Summary lines name no delivery: they have a logger of their own.
deferral_log = logging.getLogger("dispatcher.deferrals")

#: Dead-letter reason of a delivery deferred past ``deferral_max_age_s``.
ENDPOINT_UNAVAILABLE = "endpoint_unavailable"
#: Dead-letter reason of a retry whose webhook was disabled while it waited.
WEBHOOK_DISABLED = "webhook_disabled"
#: Deferral reason of a delivery parked in Kafka behind a slow endpoint's full queue.
ENDPOINT_SLOW = "endpoint_slow"
#: Deferral reason of a delivery parked in Kafka for its webhook's rate limit.
RATE_LIMITED = "rate_limited"
#: A parked delivery waits at least this long: sooner, it would find the queue as
#: full as it left it, and the hand-over round trip would be spent for nothing.
MIN_PARK_S = 1.0
#: Webhooks with the largest backlogs reported by ``dispatcher_endpoint_backlog``.
BACKLOG_TOP_N = 10
#: How long a full queue may hold the partitions that feed it before it is judged:
#: an endpoint that has not answered once in that time, while others have, is slow,
#: whatever it measured so far. A busy but fast one frees a place within milliseconds.
HOLD_MAX_S = 0.05
#: A measured endpoint is given this many of its average answer times (within
#: ``HOLD_MAX_S`` and ``HOLD_PATIENCE_MAX_S``) before that verdict: one answering in
#: 50 ms with every slot busy can go 50 ms without an answer on a loaded machine, and
#: parking a healthy endpoint's deliveries would delay them a second for nothing.
HOLD_LATENCIES = 4.0
HOLD_PATIENCE_MAX_S = 0.5
#: How long such a verdict lasts; by then its answers measure it.
HELD_FOR_S = 5.0
#: Deferrals are logged as counts per interval, not one line each.
DEFERRAL_LOG_EVERY_S = 10.0


@dataclass(slots=True, eq=False)
class Delivery:
    """One (event, subscription) pair on its way through one attempt or deferral."""

    slot: Slot
    sub: Subscription
    delivery_id: str
    body: bytes
    event: str
    event_time: datetime
    attempts_made: int
    stage: str
    source: Source
    record: DeliveryRecord | None = None
    ticket: Ticket | None = field(default=None)
    #: Admitted as one of a half-open circuit's probes.
    probe: bool = False
    #: Not to be attempted: dead-lettered at once with this reason.
    refused: str | None = None

    @property
    def retry(self) -> bool:
        """It has failed before: a half-open circuit lets it through first."""
        return self.attempts_made > 0


class DeferralLog:
    """Counts deferrals per reason and logs them once per interval."""

    def __init__(self, every_s: float = DEFERRAL_LOG_EVERY_S, webhook_series: int = 0) -> None:
        self.every_s = every_s
        self.webhook_series = webhook_series
        self.counts: Counter[str] = Counter()
        self._since = time.monotonic()

    def note(self, reason: str, d: Delivery) -> None:
        metrics.DEFERRALS.labels(reason).inc()
        metrics.webhook_deferred(d.sub.webhook_id, reason, self.webhook_series)
        self.counts[reason] += 1
        log.debug("deferred (%s)", reason, extra={"delivery_id": d.delivery_id})

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._since < self.every_s:
            return
        if self.counts:
            detail = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
            deferral_log.info(
                "deferred %d deliveries in %.0f s (%s)",
                self.counts.total(),
                now - self._since,
                detail,
            )
        self.counts.clear()
        self._since = now


class DeliveryRunner:
    """Runs deliveries within the per-endpoint limits."""

    def __init__(
        self,
        settings: Settings,
        sender: Sender,
        producer: RecordSink,
        stages: list[RetryStage],
        work: Work,
        backpressure: Backpressure,
        loop_lag: LoopLag,
    ) -> None:
        self.settings = settings
        self.sender = sender
        self.producer = producer
        self.stages = stages
        self.work = work
        self.endpoints: dict[str, Endpoint[Delivery]] = {}
        #: Partitions waiting for endpoints' full queues.
        self.backpressure = backpressure
        #: When any endpoint last answered (monotonic s).
        self._last_answer = 0.0
        #: In-flight places that slow and unmeasured endpoints' lanes hold: what
        #: waits in their queues and what runs in their slots. Counted up as they
        #: queue, recounted on every check (:meth:`check_endpoints`).
        self.slow_queued = 0
        #: Unmeasured endpoints being judged while their burst waits beyond the lanes'
        #: half, and since when (monotonic s; see :meth:`_judging_room`).
        self._judging: dict[str, float] = {}
        #: Webhook ids that ``dispatcher_endpoint_backlog`` reports now.
        self._backlog_shown: set[str] = set()
        #: Every webhook's backlog here as of the last check, zeros left out (the
        #: snapshot the engine writes for the API, :mod:`dispatcher.backlog`).
        self.backlogs: dict[str, int] = {}
        self.deferrals = DeferralLog(webhook_series=settings.metrics_webhook_series)
        self.breaker_policy = BreakerPolicy(
            failure_threshold=settings.circuit_failure_threshold,
            failure_ratio=settings.circuit_failure_ratio,
            window_s=settings.circuit_window_s,
            cooldown_s=settings.circuit_cooldown_s,
            probes=settings.circuit_half_open_probes,
            close_ratio=settings.circuit_close_ratio,
        )
        #: Milliseconds between two deferrals of one webhook coming due.
        self.deferral_spacing_ms = 1000 / settings.circuit_deferrals_per_s
        #: The fraction of each webhook's rate limit this instance takes (its share
        #: of the partitions, set by the engine; see :mod:`dispatcher.core.ratelimit`).
        self.share = 1.0
        self.stopping = False
        #: How late the event loop runs (the engine's tick measures it): while it
        #: lags, every answer is measured late by as much, and no endpoint is judged
        #: slow from its answers.
        self.loop_lag = loop_lag

    def submit(self, d: Delivery) -> None:
        """Start, queue or defer one delivery; its message waits for it."""
        ticket = d.ticket = self.work.open(d.slot, d.delivery_id)
        key = d.sub.webhook_id
        ep = self.endpoints.get(key)
        if ep is None:
            s = self.settings
            ep = Endpoint(
                s.max_in_flight_per_endpoint,
                s.endpoint_queue_size,
                self.breaker_policy,
                queue_wait_s=s.endpoint_queue_wait_s,
                stall_s=s.endpoint_stall_s,
            )
            self.endpoints[key] = ep
        limit = d.sub.rate_limit_per_s
        ep.set_rate_limit(None if limit is None else limit * self.share)
        before = ep.breaker.state
        admission = ep.admit(d, d.retry)
        self._note_circuit(key, before, ep)
        if admission is Admission.START or admission is Admission.PROBE:
            d.probe = admission is Admission.PROBE
            self.work.start(ticket, self._attempt(ep, d))
        elif admission is Admission.QUEUED and ep.rate_limit is not None:
            self._queue_limited(key, ep, d, ticket)
        elif admission is Admission.QUEUED:
            unmeasured = not ep.measured
            if unmeasured and ep.full and (self._lane_room() or self._judging_room(key, ep)):
                # Not measured yet: nothing says whether it is slow. What a burst
                # brings waits here, in the half of the in-flight places kept for
                # such lanes (and, while it is judged, in a quarter more), rather
                # than holding the partitions or going to Kafka.
                self._into_lane(ep)
                return
            wait_s = self._park_for(ep, d)
            if wait_s is not None:
                ep.queue.pop()  # the one just queued: it waits in Kafka instead
                self.work.start(ticket, self._defer(d, ENDPOINT_SLOW, wait_s=wait_s))
                return
            if unmeasured or ep.overloaded():
                self._into_lane(ep)
            if ep.full:
                self._hold(key, d.slot.part)
        else:
            self.work.start(ticket, self._defer(d, admission.value, ep))

    def refuse(self, d: Delivery) -> None:
        """Dead-letter ``d`` without an attempt, with its ``refused`` reason; its message
        waits for the write like for any hand-over."""
        assert d.refused is not None
        ticket = d.ticket = self.work.open(d.slot, d.delivery_id)
        record = d.record or self._new_record(d)
        self.work.start(ticket, self._dead_letter(d, record, d.refused, datetime.now(UTC)))

    def _queue_limited(self, key: str, ep: Endpoint[Delivery], d: Delivery, ticket: Ticket) -> None:
        """``d`` waits for its rate-limited webhook: in the queue, or parked in Kafka.

        Never holds the partitions: waiting for a limit is not backpressure, and the
        other webhooks in them must not wait with it.
        """
        if ep.active < ep.limit or ep.next_start_in() > 0:
            metrics.RATE_LIMIT_WAITS.inc()  # the limit, not only the slots, made it wait
        wait_s = self._park_for(ep, d)
        if wait_s is not None:
            ep.queue.pop()  # the one just queued: it waits in Kafka instead
            assert ep.rate_limit is not None
            # Its own pace, if slower than its limit, is what made it wait.
            limited = ep.service_rate() >= ep.rate_limit.per_s
            self.work.start(
                ticket, self._defer(d, RATE_LIMITED if limited else ENDPOINT_SLOW, wait_s=wait_s)
            )
            return
        self._into_lane(ep)
        self._arm_pacer(key, ep)

    def _arm_pacer(self, key: str, ep: Endpoint[Delivery]) -> None:
        """Start ``ep``'s next queued delivery when its rate limit allows, once."""
        if ep.pacer is None and ep.queue and ep.rate_limit is not None:
            loop = asyncio.get_running_loop()
            ep.pacer = loop.call_later(ep.next_start_in(), self._paced_start, key, ep)

    def _paced_start(self, key: str, ep: Endpoint[Delivery]) -> None:
        ep.pacer = None
        if self.stopping:
            return
        while (nxt := ep.take_next()) is not None:
            if nxt.ticket is not None:
                self.work.start(nxt.ticket, self._attempt(ep, nxt))
        if ep.active < ep.limit:
            # Otherwise a slot's release starts the next one (or arms this again).
            self._arm_pacer(key, ep)

    def _judging_room(self, key: str, ep: Endpoint[Delivery]) -> bool:
        """Whether an unmeasured endpoint whose lane found the lanes' half spent may
        queue one more here while it is judged; starts judging it if not yet.

        The verdict is the hold's (:meth:`_held_too_long`): no answer within
        ``HOLD_MAX_S`` while others answered, and it is slow. Meanwhile its burst
        waits in the lanes' quarter beyond their half, and the partitions go on
        for every other webhook, rather than wait the ``HOLD_MAX_S`` with it; only
        once that quarter is spent too, or the verdict is due, do they wait.
        """
        if ep.overloaded_by_hold() or self.slow_queued >= self.settings.max_in_flight * 3 // 4:
            return False
        now = time.monotonic()
        started = self._judging.get(key)
        if started is None:
            self._judging[key] = now
            _later(self._judged, key, now)
            return True
        return now - started < HOLD_MAX_S

    def _judged(self, key: str, started: float, due: float) -> None:
        """The verdict on an endpoint judged since ``started`` (see :meth:`_judging_room`);
        asked again ``HOLD_MAX_S`` later while this process is too late to give it."""
        if self._judging.get(key) != started:
            return
        ep = self.endpoints.get(key)
        if ep is not None and not self._verdict(key, ep, started, due):
            _later(self._judged, key, started)
            return
        del self._judging[key]

    def _verdict(self, key: str, ep: Endpoint[Delivery], started: float, due: float) -> bool:
        """Slow if it has not answered since ``started`` while another endpoint has:
        then it is not the network or this process that is slow, it is the endpoint.
        What its lane holds beyond the lanes' half is parked, and its partitions go on.

        No verdict (False) while this process is starved: the call, due at ``due``,
        ran more than ``HOLD_MAX_S`` late, or the loop lags (:attr:`loop_lag`).
        """
        # A comparison with the others' answers, but not a fair one on a starved
        # process: an endpoint met cold opens its connections (a TLS handshake, a
        # few turns of the loop each) while the warm ones answer on theirs, and a
        # healthy webhook would be parked for a second or more. Its partitions wait
        # meanwhile, as they do for any busy endpoint while the loop lags.
        if time.monotonic() - due > HOLD_MAX_S or self.loop_lag.lagging:
            return False
        if not ep.answered_since(started) and self._last_answer > started:
            ep.held(HELD_FOR_S)
            self._park_excess(ep)
            self._unblock_if_room(key, ep)
        return True

    def _park_excess(self, ep: Endpoint[Delivery]) -> None:
        """Judged slow: what its lane holds beyond the lanes' half is parked, the newest,
        so that the places it held while it was judged are everyone's again."""
        # Recounted now: the count between two checks only grows.
        self.slow_queued = sum(
            len(e.queue) + e.active for e in self.endpoints.values() if _in_lane(e)
        )
        excess: list[Delivery] = []
        while ep.queue and self.slow_queued > self.settings.max_in_flight // 2:
            excess.append(ep.queue.pop())
            self.slow_queued -= 1
        now = time.monotonic()
        for d in reversed(excess):  # the oldest first: their turns keep the order
            if d.ticket is not None:
                wait_s = max(self._turn_in(ep, d, now), MIN_PARK_S)
                self.work.start(d.ticket, self._defer(d, ENDPOINT_SLOW, wait_s=wait_s))

    def _hold(self, key: str, part: PartitionState) -> None:
        """Make ``part`` wait for endpoint ``key``'s full queue, for ``HOLD_MAX_S`` at most."""
        started = self.backpressure.hold(key, part)
        if started is not None:
            _later(self._held_too_long, key, started)

    def _held_too_long(self, key: str, started: float, due: float) -> None:
        """Judge an endpoint whose full queue held partitions for ``HOLD_MAX_S``.

        It is slow if it has not answered since, while another endpoint has: then
        it is not the network or this process that is slow, it is the endpoint.
        Otherwise the partitions wait on, judged again every ``HOLD_MAX_S``.
        """
        ep = self.endpoints.get(key)
        if ep is None or self.backpressure.since(key) != started:
            return  # the partitions went on meanwhile
        patience = HOLD_MAX_S
        known = ep.known_latency() if ep.measured else None
        if known is not None:
            patience = min(max(patience, HOLD_LATENCIES * known), HOLD_PATIENCE_MAX_S)
        if time.monotonic() - started >= patience:
            self._verdict(key, ep, started, due)
        if self.backpressure.since(key) == started:
            _later(self._held_too_long, key, started)

    def _lag_excuses(self, ep: Endpoint[Delivery]) -> bool:
        """Whether only its answers' durations, measured late while the loop lags,
        could judge ``ep`` slow (see :meth:`_park_for`): then it is busy, not slow."""
        return ep.rate_limit is None and not ep.overloaded_by_hold() and self.loop_lag.lagging

    def _slow(self, ep: Endpoint[Delivery]) -> bool:
        """``ep.slow``, unless the loop's lag excuses it: then its partitions wait."""
        return ep.slow and not self._lag_excuses(ep)

    def _into_lane(self, ep: Endpoint[Delivery]) -> None:
        """Count a delivery just queued at a slow or unmeasured endpoint in the lanes'
        half; the first one since the last recount brings the endpoint's busy slots
        along, once: a queue that empties and fills again between recounts (a busy
        fast endpoint's does, many times a second) must not add its slots each time,
        or the half looked spent within a recount and healthy webhooks waited."""
        self.slow_queued += 1
        if not ep.in_lane:
            ep.in_lane = True
            self.slow_queued += ep.active

    def _lane_room(self) -> bool:
        """Whether slow or unmeasured endpoints' lanes may take one more delivery:
        together they hold at most half the in-flight places.

        Their slots count, not only their queues: a slow endpoint's busy slots hold
        in-flight places as long as its answers take. Counting only the queues, a
        first slow webhook's queue took the whole half, and a second one met then
        (not measured, so its queue is bounded by its size, not parked) took the
        rest with its slots and queue: every other webhook waited for the first
        one's answers. Counted so, the second one's slots and queue fit in the other
        half beside what the first one's slots left there."""
        return self.slow_queued < self.settings.max_in_flight // 2

    def _park_for(self, ep: Endpoint[Delivery], d: Delivery) -> float | None:
        """Seconds ``d``, just queued, should wait in Kafka instead; None to keep it here.

        It is parked when it does not fit in its endpoint's queue and the endpoint
        is slow (the queue holds more than ``endpoint_queue_wait_s`` of its work),
        when slow endpoints' queues already hold half the in-flight places (the
        other half stays for everyone else), or when it is new while deliveries
        parked before it have not had their turn yet and the queue is more than half
        full, so that it goes behind them. One coming back from Kafka takes any room
        in the queue; a new one takes room in a queue that runs low, so the slots
        never wait for the parked ones.

        While the event loop lags (:attr:`loop_lag`) an endpoint is not judged
        slow from its answers' durations: they were measured late, this process is
        the bottleneck, and what was parked would wait a delay stage for nothing.
        The queue holds its partitions as a busy endpoint's does. A rate limit, and
        the verdict of a full queue that held its partitions without an answer while
        others answered (:meth:`_held_too_long`), still park.
        """
        if self._lag_excuses(ep):
            return None
        if not ep.measured and ep.rate_limit is None and not ep.overloaded_by_hold():
            # Not measured yet (its first answers paid for its start, new connections
            # and their handshakes) and no limit to pace it: nothing says it is slow.
            # Parked now, a burst to a fast endpoint would wait in a delay topic
            # behind whatever else waits there (another webhook's rate-limited
            # turns, up to a stage's delay); its partitions wait instead, until its
            # first answers measure it or the hold judges it slow (_held_too_long).
            return None
        returning = d.record is not None and d.record.deferrals > 0
        now = time.monotonic()
        behind = not returning and ep.parked_until > now
        bound = ep.queue_bound()
        # Queued already, so the queue holds ``bound`` and this one is beyond.
        park = (
            (len(ep.queue) > bound and ep.overloaded())
            or (behind and len(ep.queue) > bound / 2)
            or (not returning and not self._lane_room() and ep.overloaded())
        )
        return self._turn_in(ep, d, now) if park else None

    def _turn_in(self, ep: Endpoint[Delivery], d: Delivery, now: float) -> float:
        """Seconds a delivery parked now waits in Kafka: until its turn, after what is
        queued and what was parked before it, less half a queue."""
        bound = ep.queue_bound()
        rate = ep.service_rate()
        if d.sub.rate_limit_per_s is not None:
            # Turns at the webhook's whole limit, not this instance's share: what is
            # parked comes back spread over the retry partitions, to every instance,
            # each of which starts its share of it.
            rate = min(rate, d.sub.rate_limit_per_s)
        if rate == float("inf"):
            return MIN_PARK_S
        # Its turn: after what is queued and what was parked before it. One back too
        # early (the rate was not known yet) joins the end of that line, spaced like
        # the others; sent back all at once, they would find the queue full together.
        turn = max(now + ep.expected_wait(), ep.parked_until) + 1 / rate
        # A rate measured near zero must not keep the endpoint parked for ages.
        turn = ep.parked_until = min(turn, now + self.stages[-1].delay_s)
        # Back while half a queue is still ahead of it, so the slots never wait for it.
        back_in = turn - now - bound / rate / 2
        return max(back_in, MIN_PARK_S)

    async def _attempt(self, ep: Endpoint[Delivery], d: Delivery) -> None:
        result: AttemptResult | None = None
        try:
            result, headers = await self._post(d)
            ep.observe(result.duration_s)
            self._last_answer = time.monotonic()
            outcome = "success" if result.ok else "failure"
            metrics.attempt_counted(d.stage, outcome, result.status_label)
            metrics.attempt_duration(d.stage, result.duration_s)
            hop: NextHop | None = None
            if result.ok:
                latency = (datetime.now(UTC) - d.event_time).total_seconds()
                metrics.END_TO_END_LATENCY.observe(max(latency, 0.0))
                log.debug(
                    "delivered",
                    extra={"delivery_id": d.delivery_id, "attempt": d.attempts_made + 1},
                )
                self._finish(d)
            else:
                hop = await self._after_failure(d, result)
        finally:
            self._release(ep, d, None if result is None else result.ok)
        # Recorded once the breaker has counted the answer: the record says what the
        # circuit became, which the writer's health fold reads.
        emit_attempt(
            self.producer,
            self.settings.attempts_topic,
            d,
            d.attempts_made + 1,
            headers,
            result,
            hop,
            ep.breaker.state,
        )

    async def _post(self, d: Delivery) -> tuple[AttemptResult, dict[str, str]]:
        """One attempt and the headers it sent; an exception nobody foresaw is a failed
        attempt of class ``internal``."""
        started = time.perf_counter()
        headers: dict[str, str] = {}
        try:
            secrets = d.sub.active_secrets(datetime.now(UTC))
            headers = build_headers(d.delivery_id, d.attempts_made + 1, d.body, secrets)
            result = await post(
                self.sender,
                d.sub.url,
                d.body,
                headers,
                self.settings.http_timeout_s,
                self.settings.response_snippet_bytes,
            )
            return result, headers
        except Exception as exc:
            metrics.INTERNAL_ERRORS.labels("attempt").inc()
            log.exception(
                "attempt failed unexpectedly: %s",
                type(exc).__name__,
                extra={"delivery_id": d.delivery_id, "webhook_id": d.sub.webhook_id},
            )
            failed = AttemptResult(
                ok=False,
                duration_s=time.perf_counter() - started,
                error_class="internal",
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
            return failed, headers

    def _release(self, ep: Endpoint[Delivery], d: Delivery, ok: bool | None) -> None:
        key = d.sub.webhook_id
        before = ep.breaker.state
        nxt = ep.release(ok, d.probe, d.retry)
        self._note_circuit(key, before, ep)
        if nxt is not None and nxt.ticket is not None:
            self.work.start(nxt.ticket, self._attempt(ep, nxt))
        if not ep.closed and ep.queue and not self.stopping:
            self._defer_queue(ep, Admission.CIRCUIT_OPEN.value)
        if ep.queue and not self.stopping:
            self._arm_pacer(key, ep)
        self._unblock_if_room(key, ep)
        if ep.idle and ep.breaker.clean and ep.parked_until <= time.monotonic():
            self.endpoints.pop(key, None)

    def _note_circuit(self, key: str, before: State, ep: Endpoint[Delivery]) -> None:
        """One line per change of a circuit's state: rare, and what an operator looks for."""
        state = ep.breaker.state
        if state is not before:
            why = "" if state is State.HALF_OPEN else f": {ep.breaker.verdict}"
            log.info(
                "circuit %s (was %s)%s", state.value, before.value, why, extra={"webhook_id": key}
            )

    def _defer_queue(self, ep: Endpoint[Delivery], reason: str) -> None:
        for waiting in ep.drain_queue():
            if waiting.ticket is not None:
                self.work.start(waiting.ticket, self._defer(waiting, reason, ep))

    def _unblock_if_room(self, key: str, ep: Endpoint[Delivery] | None) -> None:
        """Let partitions waiting for ``key`` go on: its queue has room, or it turned
        slow, and what does not fit is now parked in Kafka instead."""
        if not self.backpressure.holding(key):
            return
        if ep is not None and ep.full and not self._slow(ep):
            return
        self.backpressure.release(key)

    async def _after_failure(self, d: Delivery, result: AttemptResult) -> NextHop:
        now = datetime.now(UTC)
        record = d.record or self._new_record(d)
        record.attempts_made = d.attempts_made + 1
        record.first_failure_at = record.first_failure_at or now
        record.history.append(
            Attempt(
                attempt=record.attempts_made,
                stage=d.stage,
                at=now,
                duration_ms=round(result.duration_s * 1000, 3),
                status_code=result.status_code,
                error_class=result.error_class,
                error=result.error,
                response_snippet=result.snippet,
            )
        )
        hop = after_failure(
            record.attempts_made,
            self.stages,
            now_ms(),
            result.retry_after_s,
            self.settings.max_retry_after_s,
        )
        extra = {"delivery_id": d.delivery_id, "webhook_id": d.sub.webhook_id}
        if hop.stage is None:
            reason = f"all {record.attempts_made} attempts failed"
            await self._dead_letter(d, record, reason, now)
            return hop
        metrics.RETRIES_SCHEDULED.labels(hop.stage.name).inc()
        log.info(
            "attempt %d failed (%s); retry in stage %s",
            record.attempts_made,
            record.last_error(),
            hop.stage.name,
            extra=extra,
        )
        await self._hand_over(d, record, hop.stage.topic, hop.due_ms)
        return hop

    async def _dead_letter(
        self, d: Delivery, record: DeliveryRecord, reason: str, now: datetime
    ) -> None:
        record.dead_lettered_at = now
        record.dead_letter_reason = reason
        metrics.DEAD_LETTERS.labels(d.stage).inc()
        log.warning(
            "dead-lettered after %d attempts: %s %s",
            record.attempts_made,
            reason,
            record.last_error(),
            extra={"delivery_id": d.delivery_id, "webhook_id": d.sub.webhook_id},
        )
        await self._hand_over(d, record, self.settings.dead_letter_topic, now_ms())

    async def _hand_over(
        self, d: Delivery, record: DeliveryRecord, topic: str, due_ms: int
    ) -> None:
        """Write the record to its next topic; the delivery is finished once acknowledged.

        A write refused for good (a topic that takes smaller records, a missing ACL)
        is not retried: the delivery stays unfinished, so its message is read again
        after a restart, and the service turns not ready (``Work.refuse``)
        until an operator has fixed the topic and restarted it.
        """
        try:
            await self.producer.send(
                topic, record.to_json(), d.delivery_id.encode(), record_headers(record, due_ms)
            )
        except ProduceRefused as exc:
            log.error(
                "hand-over refused for good, the delivery stays unfinished: %s",
                exc,
                extra={"delivery_id": d.delivery_id, "webhook_id": d.sub.webhook_id},
            )
            if d.ticket is not None:
                self.work.refuse(d.ticket, f"a write to {topic} was refused: {exc.name}")
            return
        self._finish(d)

    async def _defer(
        self,
        d: Delivery,
        reason: str,
        ep: Endpoint[Delivery] | None = None,
        wait_s: float | None = None,
    ) -> None:
        """Hand ``d`` to the retry path without an attempt.

        It goes to the stage it would wait in anyway, due after that stage's delay
        or, given ``wait_s``, after that long if sooner: a record of a stage is then
        never due later than its delay after it was written, so the head of a
        stage's partition still waits no longer than that delay. ``ep`` given, a
        repeated deferral of an open circuit is paced (:meth:`_deferral_hop`).
        """
        now = datetime.now(UTC)
        record = d.record or self._new_record(d)
        record.first_deferred_at = record.first_deferred_at or now
        since = min(record.first_failure_at or now, record.first_deferred_at)
        if (now - since).total_seconds() > self.settings.deferral_max_age_s:
            await self._dead_letter(d, record, ENDPOINT_UNAVAILABLE, now)
            return
        record.deferrals += 1
        hop = self._deferral_hop(d, reason, ep if record.deferrals > 1 else None)
        at = now_ms()
        assert hop.stage is not None
        due = hop.due_ms if wait_s is None else min(hop.due_ms, at + int(wait_s * 1000))
        self.deferrals.note(reason, d)
        await self._hand_over(d, record, hop.stage.topic, due)

    def _deferral_hop(self, d: Delivery, reason: str, ep: Endpoint[Delivery] | None) -> NextHop:
        """Where a deferral waits; ``ep`` given, an open circuit's come due one per spacing."""
        now = now_ms()
        if ep is None or reason != Admission.CIRCUIT_OPEN.value:
            return for_deferral(d.attempts_made, self.stages, now)
        hop = paced_deferral(d.attempts_made, self.stages, now, ep.deferral_slot)
        # Past the longest delay the slot stops moving: records then wait that long.
        horizon = now + self.stages[-1].delay_s * 1000
        ep.deferral_slot = min(
            max(ep.deferral_slot, hop.due_ms) + self.deferral_spacing_ms, horizon
        )
        return hop

    def _new_record(self, d: Delivery) -> DeliveryRecord:
        return DeliveryRecord(
            delivery_id=d.delivery_id,
            webhook_id=d.sub.webhook_id,
            organization_id=d.sub.organization_id,
            event=d.event,
            event_timestamp=d.event_time,
            body=d.body.decode("utf-8"),
            attempts_made=d.attempts_made,
            source=d.source,
        )

    def _finish(self, d: Delivery) -> None:
        if d.ticket is not None:
            self.work.finish(d.ticket)

    def check_endpoints(self) -> None:
        slow_queued = 0
        backlogs: list[tuple[float, str]] = []
        now = time.monotonic()
        for key, ep in list(self.endpoints.items()):
            if ep.stalled and ep.queue and not self.stopping:
                self._defer_queue(ep, Admission.STALLED.value)
            self._unblock_if_room(key, ep)
            if ep.idle and ep.breaker.clean and ep.parked_until <= now:
                # Its window has slid empty since its last answer; nothing is parked.
                self.endpoints.pop(key, None)
                continue
            ep.in_lane = _in_lane(ep)
            if ep.in_lane:
                slow_queued += len(ep.queue) + ep.active
            backlog = float(len(ep.queue))
            if ep.parked_until > now:
                rate = ep.start_rate()
                if rate != float("inf"):
                    backlog += (ep.parked_until - now) * rate
            if backlog:
                backlogs.append((backlog, key))
        self.slow_queued = slow_queued
        self.backlogs = {key: round(n) for n, key in backlogs if round(n) > 0}
        self._show_backlogs(backlogs)

    def _show_backlogs(self, backlogs: list[tuple[float, str]]) -> None:
        """Report the largest backlogs per webhook: queued here plus parked in Kafka
        (an estimate from the parked deliveries' turns and the endpoint's rate)."""
        top = sorted(backlogs, reverse=True)[:BACKLOG_TOP_N]
        shown = {key for _n, key in top}
        for key in self._backlog_shown - shown:
            metrics.ENDPOINT_BACKLOG.remove(key)
        for n, key in top:
            metrics.ENDPOINT_BACKLOG.labels(key).set(round(n))
        self._backlog_shown = shown

    def abandon_queued(self, states: set[PartitionState]) -> None:
        """Drop deliveries still waiting for an endpoint slot on these partitions.

        They never started; their messages stay unfinished, so whoever reads the
        partition next delivers them.
        """
        if not states:
            return
        for key, ep in list(self.endpoints.items()):
            keep = [d for d in ep.queue if d.slot.part not in states]
            if len(keep) == len(ep.queue):
                continue
            for d in ep.queue:
                if d.slot.part in states and d.ticket is not None:
                    self.work.release(d.ticket)
            ep.queue.clear()
            ep.queue.extend(keep)
            self._unblock_if_room(key, ep)
        self.backpressure.forget(states)


def _later(judge: Callable[[str, float, float], None], key: str, started: float) -> None:
    """Call ``judge(key, started, due)`` in ``HOLD_MAX_S``; ``due`` tells it how late it runs."""
    due = time.monotonic() + HOLD_MAX_S
    asyncio.get_running_loop().call_later(HOLD_MAX_S, judge, key, started, due)


def _in_lane(ep: Endpoint[Delivery]) -> bool:
    """Whether ``ep``'s queue and slots count in the lanes' half: it is slow or not
    measured yet, and something waits for it."""
    return bool(ep.queue) and (not ep.measured or ep.overloaded())
