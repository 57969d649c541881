"""Long computations as generators of chunks (see `runtime.jobs`): each `next()` is one chunk of
model work and yields the progress so far; the `return` value is the result."""
from __future__ import annotations

from typing import Any, Callable, Generator, Iterator, Sequence, TypeVar

from ..runtime.jobs import Steps, in_turns

__all__ = ["Steps", "in_turns", "over_chunks", "scaled"]
T = TypeVar("T")


def over_chunks(chunks: Sequence[T], run: Callable[[T], Steps]) -> Generator[float, None, None]:
    """Run each chunk's steps, yielding the progress before each chunk (chunks done / chunks) and
    inside it: the work before the first chunk and every chunk become separate pieces of worker
    time, and a chunk that yields (a long row, `replay.run_rows`) leaves the worker meanwhile."""
    for done, chunk in enumerate(chunks):
        yield done / len(chunks)
        yield from scaled(run(chunk), done / len(chunks), 1 / len(chunks))


def scaled(steps: Iterator[Any], start: float, span: float) -> Generator[float, None, Any]:
    """Run steps, yielding their progress mapped onto [start, start + span]; returns their result."""
    while True:
        try:
            progress = next(steps)
        except StopIteration as stop:
            return stop.value
        yield start + span * float(progress)
