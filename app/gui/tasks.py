"""Coroutines started from Qt slots, tracked so that shutdown can end every one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

logger = logging.getLogger(__name__)


class TaskSet:
    """Runs coroutines as tasks on the running loop and keeps a reference to each.

    A task that fails goes to the loop's exception handler, which logs it and
    shows the error dialog, so no failure of a button's work goes unseen.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            task.get_loop().call_exception_handler(
                {"message": f"{task.get_name()} failed", "exception": error, "task": task}
            )

    def cancel(self) -> None:
        """Cancel every task still running without waiting; each ends at its next await."""
        for task in self._tasks:
            task.cancel()

    async def cancel_all(self) -> None:
        """Cancel every task still running and wait until each has ended."""
        pending = [task for task in self._tasks if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            logger.debug("cancelled %d window tasks", len(pending))
