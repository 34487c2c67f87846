"""Where a delivery goes next: a retry stage with a due time, or the dead-letter topic.

Pure decisions over the stage list, so they are unit-tested without Kafka. The
attempt count travels in the record; stages only decide how long to wait.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dispatcher.stages import RetryStage


@dataclass(frozen=True, slots=True)
class NextHop:
    """A retry stage and due time, or ``stage is None`` for the dead-letter topic."""

    stage: RetryStage | None
    due_ms: int


def after_failure(
    attempts_made: int,
    stages: Sequence[RetryStage],
    now_ms: int,
    retry_after_s: float | None = None,
    max_retry_after_s: float = 3600,
) -> NextHop:
    """The hop after attempt number ``attempts_made`` failed.

    Attempt *n* failing sends the delivery to stage *n* (1-based), due after its
    delay. A ``Retry-After`` longer than that delay is honoured (up to
    ``max_retry_after_s``) by waiting that long, in the first stage whose delay is
    at least as long, so that each stage's topic stays ordered by due time.
    """
    if attempts_made > len(stages):
        return NextHop(None, now_ms)
    index = max(attempts_made - 1, 0)
    stage = stages[index]
    wait_s: float = stage.delay_s
    if retry_after_s is not None:
        wanted = min(retry_after_s, max_retry_after_s)
        if wanted > wait_s:
            wait_s = wanted
            later = [s for s in stages[index:] if s.delay_s >= wanted]
            stage = later[0] if later else stages[-1]
    return NextHop(stage, now_ms + int(wait_s * 1000))


def for_deferral(attempts_made: int, stages: Sequence[RetryStage], now_ms: int) -> NextHop:
    """The hop of a delivery deferred without an attempt (busy endpoint, open circuit).

    It waits in the stage it would wait in anyway, and spends no attempt.
    """
    stage = stages[min(max(attempts_made - 1, 0), len(stages) - 1)]
    return NextHop(stage, now_ms + stage.delay_s * 1000)


def paced_deferral(
    attempts_made: int, stages: Sequence[RetryStage], now_ms: int, not_before_ms: float
) -> NextHop:
    """The hop of a deferral that must not come due before ``not_before_ms``.

    It waits in the last stage, whatever the wait: at least as long as
    :func:`for_deferral` would have it wait, at most that stage's delay, so that
    it never comes due after the records written to that stage after it (it would
    hold them back). Always the same stage, so that a second copy of the hop left
    by a crash lands in the partition that knows the first and is skipped there.
    """
    usual = for_deferral(attempts_made, stages, now_ms)
    last = stages[-1]
    return NextHop(last, min(max(usual.due_ms, int(not_before_ms)), now_ms + last.delay_s * 1000))
