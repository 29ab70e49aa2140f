"""Keep-alive connections spread evenly over a server's workers.

Every worker accepts on one shared socket, and a keep-alive connection stays with the worker that
accepted it, so sixteen clients can end up twelve on one worker and four on the other. Each worker
may use every core (models.cores.plan_serving), so no core idles, but the scheduler shares the
cores between the workers, not between their clients: the twelve then wait three times as long
as the four. Here each worker publishes how many connections it holds in a slot of a small file
that the workers of one server share (named after their parent, BentoML's arbiter), and a worker
holding more than its share (the total over the workers, rounded up) answers the request in hand
with ``Connection: close``. The client opens a new connection, which the worker with room for it
most often accepts (it is the one waiting in ``accept``); until the counts even out, each request
over the share moves one connection. HTTP clients reconnect by themselves after ``Connection:
close`` (it is how servers end keep-alive connections anyway).
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import struct
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SLOT = struct.Struct("<I")  # one worker's open connections + 1 (0: the worker has left)


class ConnectionBoard:
    """The connections each worker of one server holds, one slot per worker (``index`` counts
    from 1, as BentoML numbers its workers)."""

    def __init__(self, path: Path, *, workers: int, index: int) -> None:
        if not 1 <= index <= workers:
            raise ValueError(f"worker {index} of {workers}")
        self.path, self.workers, self.index = path, workers, index
        size = SLOT.size * workers
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.publish(0)  # a slot left by an earlier process of the same number starts again

    @classmethod
    def for_worker(cls, workers: int, index: int | None) -> ConnectionBoard | None:
        """The board of this worker's server, or None where there is nothing to balance (one
        worker, or not a numbered worker) or no file can be made (balancing is then off)."""
        if workers < 2 or index is None or not 1 <= index <= workers:
            return None
        path = Path(tempfile.gettempdir()) / f"backbones-{os.getppid()}-connections"
        try:
            return cls(path, workers=workers, index=index)
        except OSError as e:
            log.warning("connections are not balanced between the workers: %s", e)
            return None

    def publish(self, connections: int) -> None:
        self._store(max(0, connections) + 1)

    def _store(self, value: int) -> None:
        SLOT.pack_into(self._map, SLOT.size * (self.index - 1), value)

    def _slots(self) -> list[int]:
        return [SLOT.unpack_from(self._map, SLOT.size * i)[0] for i in range(self.workers)]

    def counts(self) -> list[int]:
        return [max(0, v - 1) for v in self._slots()]

    def over_share(self, mine: int) -> bool:
        """Whether a worker holding ``mine`` connections holds more than its share."""
        return mine > math.ceil(sum(self.counts()) / self.workers)

    def close(self) -> None:
        """Give up this worker's slot; the last worker out removes the file."""
        self._store(0)
        if not any(self._slots()):
            with contextlib.suppress(OSError):
                self.path.unlink()
        self._map.close()
