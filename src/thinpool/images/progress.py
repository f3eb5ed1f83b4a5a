"""How long work reports progress, without printing: the caller supplies a ``Progress``.

``Progress.task(description, total)`` starts one task (``total`` in bytes, or
None when unknown) and returns a ``Task``; the work calls ``task.advance(n)``
as bytes pass and ``task.finish()`` at the end.  ``NO_PROGRESS`` ignores
everything.  The command line passes a terminal progress bar.
"""

from __future__ import annotations

from typing import Protocol


class Task(Protocol):
    def advance(self, n: int) -> None: ...

    def finish(self) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> Task: ...


class _NullTask:
    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass


class _NullProgress:
    def task(self, description: str, total: int | None) -> Task:
        return _NullTask()


NO_PROGRESS: Progress = _NullProgress()
