"""The app log tab: Deskbridge's own log lines, live, filterable by level."""

from __future__ import annotations

import logging
from pathlib import Path

from PySide6.QtCore import Qt, QTimer, QUrl
from PySide6.QtGui import QDesktopServices, QFontDatabase
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QPlainTextEdit, QPushButton, QVBoxLayout, QWidget

from app.core.models import LogBuffer

logger = logging.getLogger(__name__)

REFRESH_INTERVAL_MS = 250
LEVELS = (
    ("Debug and above", logging.DEBUG),
    ("Info and above", logging.INFO),
    ("Warnings and errors", logging.WARNING),
    ("Errors only", logging.ERROR),
)


class LogPanel(QWidget):
    """Shows the lines of a ``LogBuffer`` as they arrive, the same lines the log file gets."""

    def __init__(self, buffer: LogBuffer, log_dir: Path, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.buffer = buffer
        self.log_dir = log_dir
        self._next_seq = 0

        self.level_combo = QComboBox()
        for label, level in LEVELS:
            self.level_combo.addItem(label, level)
        self.level_combo.setCurrentIndex(1)
        self.level_combo.setAccessibleName("Minimum level")
        self.open_button = QPushButton("Open log folder")
        self.open_button.setToolTip(str(log_dir))
        self.view = QPlainTextEdit()
        self.view.setReadOnly(True)
        self.view.setLineWrapMode(QPlainTextEdit.LineWrapMode.WidgetWidth)
        self.view.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.view.setMaximumBlockCount(buffer.max_lines)
        self.view.setAccessibleName("App log")
        folder = QLabel(f"Log files: {log_dir}")
        folder.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        bar = QHBoxLayout()
        bar.addWidget(QLabel("Show:"))
        bar.addWidget(self.level_combo)
        bar.addStretch(1)
        bar.addWidget(folder)
        bar.addWidget(self.open_button)
        layout = QVBoxLayout(self)
        layout.addLayout(bar)
        layout.addWidget(self.view, 1)

        self.timer = QTimer(self)
        self.timer.setInterval(REFRESH_INTERVAL_MS)
        self.timer.timeout.connect(self.refresh)
        self.timer.start()
        self.level_combo.currentIndexChanged.connect(lambda _index: self.reload())
        self.open_button.clicked.connect(self.open_folder)
        self.reload()

    @property
    def min_level(self) -> int:
        return int(self.level_combo.currentData())

    def reload(self) -> None:
        """Show every kept line at or above the chosen level."""
        lines, self._next_seq = self.buffer.read_since(0)
        level = self.min_level
        self.view.setPlainText("\n".join(line.text for line in lines if line.level >= level))
        self._scroll_to_end()

    def refresh(self) -> None:
        lines, self._next_seq = self.buffer.read_since(self._next_seq)
        level = self.min_level
        shown = [line.text for line in lines if line.level >= level]
        if not shown:
            return
        scrollbar = self.view.verticalScrollBar()
        at_end = scrollbar.value() >= scrollbar.maximum() - 2
        self.view.appendPlainText("\n".join(shown))
        if at_end:
            self._scroll_to_end()

    def _scroll_to_end(self) -> None:
        scrollbar = self.view.verticalScrollBar()
        scrollbar.setValue(scrollbar.maximum())

    def open_folder(self) -> bool:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        opened = QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.log_dir)))
        if not opened:
            logger.warning("no file manager opened the log folder %s", self.log_dir)
        return opened

    def stop(self) -> None:
        self.timer.stop()
