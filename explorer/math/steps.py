"""Long computations as generators of chunks (see `runtime.jobs`): each `next()` is one chunk of
model work and yields the progress so far; the `return` value is the result."""
from __future__ import annotations

from typing import Any, Callable, Generator, Iterator, Sequence, TypeVar

from ..runtime.jobs import Steps

__all__ = ["Steps", "over_chunks", "scaled"]
T = TypeVar("T")


def over_chunks(chunks: Sequence[T], run: Callable[[T], None]) -> Generator[float, None, None]:
    """Run each chunk, yielding the progress (chunks done / chunks) before each one: the work
    before the first chunk and every chunk become separate pieces of worker time."""
    for done, chunk in enumerate(chunks):
        yield done / len(chunks)
        run(chunk)


def scaled(steps: Iterator[Any], start: float, span: float) -> Generator[float, None, Any]:
    """Run steps, yielding their progress mapped onto [start, start + span]; returns their result."""
    while True:
        try:
            progress = next(steps)
        except StopIteration as stop:
            return stop.value
        yield start + span * float(progress)
