"""Which offset of a partition may be committed, given work finishing out of order."""

from __future__ import annotations

from collections import deque


class OffsetTracker:
    """Offsets received from one partition, in order, and which of them are finished.

    The committable position is the lowest offset still unfinished, or one past the
    last offset received when all are finished. Only offsets actually received are
    considered, so gaps left by compaction or transaction markers do no harm.
    """

    __slots__ = ("_done", "_last", "_pending")

    def __init__(self) -> None:
        self._pending: deque[int] = deque()
        self._done: set[int] = set()
        self._last: int | None = None

    def received(self, offset: int) -> None:
        """Record an offset handed to the application (they arrive in increasing order)."""
        if self._last is not None and offset <= self._last:
            raise ValueError(f"offset {offset} received after {self._last}")
        self._pending.append(offset)
        self._last = offset

    def finished(self, offset: int) -> bool:
        """Mark an offset finished; True when the committable position moved."""
        if not self._pending or offset < self._pending[0]:
            return False  # already passed, e.g. a duplicate completion
        if offset != self._pending[0]:
            self._done.add(offset)
            return False
        self._pending.popleft()
        while self._pending and self._pending[0] in self._done:
            self._done.discard(self._pending.popleft())
        return True

    @property
    def position(self) -> int | None:
        """The offset to commit (next to read), or None before anything was received."""
        if self._pending:
            return self._pending[0]
        return None if self._last is None else self._last + 1

    @property
    def unfinished(self) -> int:
        return len(self._pending)
