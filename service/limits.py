"""Admission of image requests before a byte of their bodies is read.

Each worker process holds at most ``queue_limit`` image requests per served model, and at most
``receive_budget_bytes`` of their bodies (being received, parsed or decoded). A request reserves
its declared ``Content-Length`` before its body is read; a chunked body reserves as it arrives.
What does not fit is refused at once with 503 and ``Retry-After``: the body is never buffered, so
many clients streaming large bodies cost a bounded amount of memory instead of a killed worker.

Large bodies (over an eighth of the budget) may together hold at most half of it, so that clients
sending ordinary photos still find room while the large ones wait their turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ApiError

RETRY_AFTER_BUSY_SECONDS = 1  # bodies being received free their room within about this time
LARGE_BODY_FRACTION = 8  # a body over budget / 8 is large
LARGE_BODIES_SHARE = 2  # large bodies together hold at most budget / 2


def busy(why: str) -> ApiError:
    return ApiError(503, f"overloaded: {why}", {"Retry-After": str(RETRY_AFTER_BUSY_SECONDS)})


@dataclass
class Reservation:
    """One admitted request's place and the body bytes it holds, until :meth:`release`."""

    admission: Admission
    held: int = 0
    large: bool = False
    released: bool = field(default=False, repr=False)

    def grow(self, more: int) -> None:
        """Hold ``more`` bytes of a body that arrives without a declared length, or raise 503."""
        self.admission._reserve(self, more)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission._free(self)


class Admission:
    """The admission state of one worker (all its image requests share it; one event loop, no locks)."""

    def __init__(self, *, max_requests: int, budget_bytes: int) -> None:
        self.max_requests = max_requests
        self.budget = budget_bytes
        self.large_above = budget_bytes // LARGE_BODY_FRACTION
        self.large_limit = budget_bytes // LARGE_BODIES_SHARE
        self.requests = 0
        self.held = 0  # body bytes reserved by admitted requests
        self.held_large = 0  # of which by large bodies

    def admit(self, declared: int | None) -> Reservation:
        """A place for a request whose body declares ``declared`` bytes (None: not declared), or 503."""
        if self.requests >= self.max_requests:
            raise busy("too many requests in flight")
        reservation = Reservation(self)
        self._reserve(reservation, declared or 0)
        self.requests += 1
        return reservation

    def _reserve(self, reservation: Reservation, more: int) -> None:
        total = reservation.held + more
        large = total > self.large_above
        large_after = self.held_large + (total if large and not reservation.large else more if large else 0)
        if self.held + more > self.budget or (large and large_after > self.large_limit):
            raise busy("too many request bodies being received; retry shortly")
        self.held += more
        if large:
            reservation.large = True
            self.held_large = large_after
        reservation.held = total

    def _free(self, reservation: Reservation) -> None:
        self.requests -= 1
        self.held -= reservation.held
        if reservation.large:
            self.held_large -= reservation.held
