"""The errors every floor may raise and the web floor turns into HTTP answers. A leaf module:
it imports nothing from the package, so any floor can import it."""
from __future__ import annotations


class InvalidRequest(ValueError):
    """A request that is well-formed JSON but asks for something out of range (HTTP 400)."""


class Overloaded(RuntimeError):
    """The model queue is full (or too many jobs run, or a wait timed out); try again later (503)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Cancelled(Exception):
    """The work was cancelled (`DELETE /jobs/{id}`, or the client of a synchronous request left)."""
