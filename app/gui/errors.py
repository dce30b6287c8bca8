"""Uncaught errors: log them and show a dialog instead of dying silently.

``ErrorReporter.install`` replaces ``sys.excepthook`` (which PySide6 also
calls for exceptions in slots), ``threading.excepthook`` and the asyncio
loop's exception handler. Every error is logged with its traceback. The
dialog shows the message and the log folder. It opens with ``show()``, so
the tunnel keeps running behind it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import QMessageBox, QWidget

logger = logging.getLogger("deskbridge.errors")


class ErrorReporter(QObject):
    """Logs uncaught errors and shows one dialog at a time for them."""

    # Emitted from any thread; Qt queues it to the GUI thread.
    error_reported = Signal(str, str)

    def __init__(self, log_dir: Path, parent_widget: QWidget | None = None) -> None:
        super().__init__()
        self.log_dir = log_dir
        self.parent_widget = parent_widget
        self.dialog: QMessageBox | None = None
        self.count = 0
        self._previous: tuple[Any, Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error_reported.connect(self._show, Qt.ConnectionType.QueuedConnection)

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._previous = (sys.excepthook, threading.excepthook)
        self._loop = loop
        sys.excepthook = self._excepthook
        threading.excepthook = self._thread_excepthook
        loop.set_exception_handler(self._loop_handler)

    def uninstall(self) -> None:
        if self._previous is not None:
            sys.excepthook, threading.excepthook = self._previous
            self._previous = None
        if self._loop is not None and not self._loop.is_closed():
            self._loop.set_exception_handler(None)
        self._loop = None

    def _excepthook(self, kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, error, trace)
            return
        self.report("Unexpected error", error, trace)

    def _thread_excepthook(self, args: threading.ExceptHookArgs) -> None:
        if args.exc_value is None or issubclass(args.exc_type, SystemExit):
            return
        name = args.thread.name if args.thread is not None else "a worker thread"
        self.report(f"Unexpected error in {name}", args.exc_value, args.exc_traceback)

    def _loop_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        message = str(context.get("message") or "Unexpected error in the event loop")
        if isinstance(error, BaseException):
            self.report(message, error, error.__traceback__)
        else:
            logger.error("%s: %s", message, {key: value for key, value in context.items() if key != "message"})
            self.count += 1
            self.error_reported.emit(message, "")

    def report(self, title: str, error: BaseException, trace: TracebackType | None) -> None:
        """Log an error with its traceback and ask the GUI thread to show it."""
        logger.error("%s: %s", title, error, exc_info=(type(error), error, trace))
        self.count += 1
        details = "".join(traceback.format_exception(type(error), error, trace))
        self.error_reported.emit(f"{title}: {type(error).__name__}: {error}", details)

    def _show(self, summary: str, details: str) -> None:
        if self.dialog is not None and self.dialog.isVisible():
            self.dialog.setInformativeText(
                f"{self.dialog.informativeText()}\n\nAnother error followed: {summary}"
            )
            return
        dialog = QMessageBox(self.parent_widget)
        dialog.setIcon(QMessageBox.Icon.Critical)
        dialog.setWindowTitle("Deskbridge error")
        dialog.setText("Deskbridge ran into an unexpected error. It keeps running, but something may not work.")
        dialog.setInformativeText(f"{summary}\n\nThe full report is in the log file in {self.log_dir}.")
        if details:
            dialog.setDetailedText(details)
        dialog.setStandardButtons(QMessageBox.StandardButton.Close)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.finished.connect(self._dialog_closed)
        self.dialog = dialog
        dialog.show()

    def _dialog_closed(self, _result: int) -> None:
        self.dialog = None
