"""The traffic tab: a table of stream events with filters, a details pane and export.

The agent's sink only appends to the Qt-free ``TrafficHistory``. A QTimer
moves new records into the table at most ten times a second, with one
``beginInsertRows`` per batch, so the table keeps up with a tunnel running at
full speed without slowing it down.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QItemSelection, QModelIndex, QPersistentModelIndex, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QFontDatabase
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from app.core.models import (
    KIND_LABELS,
    TrafficFilter,
    TrafficHistory,
    TrafficRows,
    describe_record,
    export_jsonl,
    hex_dump,
)
from app.core.traffic import Direction, Kind, TrafficRecord

from .tasks import TaskSet

logger = logging.getLogger(__name__)

# Ten batches a second at most, as the view's update budget.
APPLY_INTERVAL_MS = 100
FILTER_SETTLE_MS = 250
COLUMNS = ("Time", "Stream", "Target", "Event", "Direction", "Bytes", "Preview")
TIME_COLUMN, STREAM_COLUMN, TARGET_COLUMN, EVENT_COLUMN, DIRECTION_COLUMN, BYTES_COLUMN, PREVIEW_COLUMN = range(7)
ALL_TARGETS = "All targets"
DIRECTIONS = (("Both directions", None), (Direction.TO_DESKTOP.arrow, Direction.TO_DESKTOP), (Direction.TO_CLOUD.arrow, Direction.TO_CLOUD))
ERROR_COLOUR = QColor("#b42318")
QUIET_COLOUR = QColor("#6e7781")


def format_time(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp)
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


class TrafficTableModel(QAbstractTableModel):
    """Table model over ``TrafficRows``; ``apply_batch`` brings in what the history gained."""

    def __init__(self, history: TrafficHistory, parent: Any = None) -> None:
        super().__init__(parent)
        self.rows = TrafficRows(history)
        self._mono = QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont)

    # QAbstractTableModel -------------------------------------------------------

    def rowCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.rows.rows)

    def columnCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if orientation is Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section]
        return None

    def data(self, index: QModelIndex | QPersistentModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        record = self.rows.rows[index.row()]
        column = index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            return self._display(record, column)
        if role == Qt.ItemDataRole.TextAlignmentRole and column in (STREAM_COLUMN, BYTES_COLUMN):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ForegroundRole:
            if record.kind is Kind.ERROR:
                return ERROR_COLOUR
            if record.kind is not Kind.DATA and column == PREVIEW_COLUMN:
                return QUIET_COLOUR
        if role == Qt.ItemDataRole.FontRole and column == PREVIEW_COLUMN and record.kind is Kind.DATA:
            return self._mono
        if role == Qt.ItemDataRole.ToolTipRole and column == PREVIEW_COLUMN:
            return describe_record(record)
        return None

    @staticmethod
    def _display(record: TrafficRecord, column: int) -> str:
        if column == TIME_COLUMN:
            return format_time(record.time)
        if column == STREAM_COLUMN:
            return "" if record.kind is Kind.SESSION else str(record.stream_id)
        if column == TARGET_COLUMN:
            return record.target
        if column == EVENT_COLUMN:
            return KIND_LABELS[record.kind]
        if column == DIRECTION_COLUMN:
            return record.direction.arrow if record.direction is not None else ""
        if column == BYTES_COLUMN:
            return f"{record.size:,}" if record.kind is Kind.DATA else ""
        return describe_record(record)

    # Batches -------------------------------------------------------------------

    def apply_batch(self) -> int:
        """Bring in the records the history gained since the last batch; return how many rows were added."""
        pending = self.rows.fetch()
        if pending.remove:
            self.beginRemoveRows(QModelIndex(), 0, pending.remove - 1)
            self.rows.remove_front(pending.remove)
            self.endRemoveRows()
        if pending.new:
            first = len(self.rows.rows)
            self.beginInsertRows(QModelIndex(), first, first + len(pending.new) - 1)
            self.rows.append(pending.new)
            self.endInsertRows()
        return len(pending.new)

    def set_filter(self, new_filter: TrafficFilter) -> None:
        self.beginResetModel()
        self.rows.set_filter(new_filter)
        self.endResetModel()

    def resize(self) -> None:
        """Follow a changed history bound."""
        self.beginResetModel()
        self.rows.max_rows = self.rows.history.max_events
        self.rows.rebuild()
        self.endResetModel()

    def clear(self) -> None:
        self.beginResetModel()
        self.rows.history.clear()
        self.rows.clear()
        self.endResetModel()

    def record_at(self, row: int) -> TrafficRecord | None:
        rows = self.rows.rows
        return rows[row] if 0 <= row < len(rows) else None


class DetailsPane(QWidget):
    """Hex dump and text of the selected data chunk."""

    def __init__(self) -> None:
        super().__init__()
        mono = QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont)
        self.heading = QLabel("Select a row to see its bytes.")
        self.heading.setWordWrap(True)
        self.hex_view = QPlainTextEdit()
        self.text_view = QPlainTextEdit()
        for view, name in ((self.hex_view, "Hex dump"), (self.text_view, "Text")):
            view.setReadOnly(True)
            view.setFont(mono)
            view.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
            view.setAccessibleName(name)
        self.text_view.setLineWrapMode(QPlainTextEdit.LineWrapMode.WidgetWidth)
        hex_box = QVBoxLayout()
        hex_box.addWidget(QLabel("Hex"))
        hex_box.addWidget(self.hex_view)
        text_box = QVBoxLayout()
        text_box.addWidget(QLabel("Text (UTF-8)"))
        text_box.addWidget(self.text_view)
        columns = QHBoxLayout()
        columns.addLayout(hex_box, 3)
        columns.addLayout(text_box, 2)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 4, 0, 0)
        layout.addWidget(self.heading)
        layout.addLayout(columns)

    def show_record(self, record: TrafficRecord | None) -> None:
        if record is None:
            self.heading.setText("Select a row to see its bytes.")
            self.hex_view.clear()
            self.text_view.clear()
            return
        where = f"Stream {record.stream_id} to {record.target}"
        if record.kind is not Kind.DATA:
            self.heading.setText(f"{where}: {KIND_LABELS[record.kind].lower()}. {describe_record(record)}")
            self.hex_view.clear()
            self.text_view.clear()
            return
        assert record.direction is not None
        shown = len(record.preview)
        part = f"all {record.size:,} bytes" if shown >= record.size else f"the first {shown:,} of {record.size:,} bytes"
        self.heading.setText(f"{where}, {record.direction.arrow}: showing {part}.")
        self.hex_view.setPlainText(hex_dump(record.preview))
        self.text_view.setPlainText(record.preview.decode("utf-8", "replace"))


class TrafficPanel(QWidget):
    """Filters, the traffic table and the details pane."""

    exported = Signal(str)

    def __init__(self, history: TrafficHistory, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.history = history
        self.tasks = TaskSet()
        self.model = TrafficTableModel(history, self)
        self._known_targets: list[str] = []

        self.filter_edit = QLineEdit()
        self.filter_edit.setPlaceholderText("Filter by text")
        self.filter_edit.setClearButtonEnabled(True)
        self.filter_edit.setAccessibleName("Filter by text")
        self.target_combo = QComboBox()
        self.target_combo.addItem(ALL_TARGETS, None)
        self.target_combo.setAccessibleName("Filter by target")
        self.target_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.direction_combo = QComboBox()
        for label, direction in DIRECTIONS:
            self.direction_combo.addItem(label, direction)
        self.direction_combo.setAccessibleName("Filter by direction")
        self.pause_button = QPushButton("Pause")
        self.pause_button.setCheckable(True)
        self.pause_button.setToolTip("Stop adding rows; events are still recorded and appear on Resume")
        self.follow_box = QCheckBox("Follow")
        self.follow_box.setChecked(True)
        self.follow_box.setToolTip("Scroll to each new row")
        self.clear_button = QPushButton("Clear")
        self.export_button = QPushButton("Export…")
        self.export_button.setToolTip("Save the rows shown as a JSON Lines file")
        self.count_label = QLabel()
        self.count_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        bar = QHBoxLayout()
        bar.addWidget(self.filter_edit, 2)
        bar.addWidget(self.target_combo)
        bar.addWidget(self.direction_combo)
        bar.addWidget(self.pause_button)
        bar.addWidget(self.follow_box)
        bar.addWidget(self.clear_button)
        bar.addWidget(self.export_button)

        self.table = QTableView()
        self.table.setModel(self.model)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setAlternatingRowColors(True)
        self.table.setWordWrap(False)
        self.table.setShowGrid(False)
        self.table.setAccessibleName("Traffic")
        vertical = self.table.verticalHeader()
        vertical.setVisible(False)
        vertical.setSectionResizeMode(QHeaderView.ResizeMode.Fixed)
        vertical.setDefaultSectionSize(self.table.fontMetrics().height() + 8)
        horizontal = self.table.horizontalHeader()
        horizontal.setStretchLastSection(True)
        horizontal.setHighlightSections(False)
        metrics = self.table.fontMetrics()
        widths = {
            TIME_COLUMN: "00:00:00.000__",
            STREAM_COLUMN: "Stream__",
            TARGET_COLUMN: "quotes-feed__",
            EVENT_COLUMN: "Half-close__",
            DIRECTION_COLUMN: "desktop → cloud__",
            BYTES_COLUMN: "1,048,576__",
        }
        for column, sample in widths.items():
            self.table.setColumnWidth(column, metrics.horizontalAdvance(sample) + 12)

        self.details = DetailsPane()
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(self.table)
        splitter.addWidget(self.details)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 1)
        splitter.setChildrenCollapsible(False)

        self.status_label = QLabel()
        self.status_label.setWordWrap(True)
        footer = QHBoxLayout()
        footer.addWidget(self.count_label)
        footer.addStretch(1)
        footer.addWidget(self.status_label)

        layout = QVBoxLayout(self)
        layout.addLayout(bar)
        layout.addWidget(splitter, 1)
        layout.addLayout(footer)

        self.apply_timer = QTimer(self)
        self.apply_timer.setInterval(APPLY_INTERVAL_MS)
        self.apply_timer.timeout.connect(self.apply_batch)
        self.apply_timer.start()
        self._filter_timer = QTimer(self)
        self._filter_timer.setSingleShot(True)
        self._filter_timer.setInterval(FILTER_SETTLE_MS)
        self._filter_timer.timeout.connect(self._apply_filter)

        self.filter_edit.textChanged.connect(lambda _text: self._filter_timer.start())
        self.target_combo.currentIndexChanged.connect(lambda _index: self._apply_filter())
        self.direction_combo.currentIndexChanged.connect(lambda _index: self._apply_filter())
        self.pause_button.toggled.connect(self._pause_toggled)
        self.clear_button.clicked.connect(self.clear)
        self.export_button.clicked.connect(self.choose_export_file)
        self.table.selectionModel().selectionChanged.connect(self._selection_changed)
        self.model.modelReset.connect(lambda: self.details.show_record(None))
        self._update_counts()

    # Batches and counts ----------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self.pause_button.isChecked()

    def apply_batch(self) -> None:
        if not self.paused:
            added = self.model.apply_batch()
            if added and self.follow_box.isChecked():
                self.table.scrollToBottom()
        self._update_targets()
        self._update_counts()

    def _update_counts(self) -> None:
        history = self.history
        text = f"{self.model.rowCount():,} rows shown · {len(history):,} of {history.max_events:,} events kept"
        text += f" · {history.dropped:,} dropped" if history.dropped else " · none dropped"
        if self.paused:
            text += " · paused"
        self.count_label.setText(text)

    def _update_targets(self) -> None:
        targets = sorted(set(self._known_targets) | set(self.history.targets))
        present = [self.target_combo.itemText(index) for index in range(1, self.target_combo.count())]
        for name in targets:
            if name not in present:
                self.target_combo.addItem(name, name)

    def set_known_targets(self, names: list[str]) -> None:
        """Offer these target names in the filter even before they have traffic."""
        self._known_targets = list(names)
        self._update_targets()

    def _pause_toggled(self, paused: bool) -> None:
        self.pause_button.setText("Resume" if paused else "Pause")
        if not paused:
            self.apply_batch()
        self._update_counts()

    # Filters -----------------------------------------------------------------------

    def current_filter(self) -> TrafficFilter:
        return TrafficFilter(
            text=self.filter_edit.text().strip(),
            target=self.target_combo.currentData(),
            direction=self.direction_combo.currentData(),
        )

    def _apply_filter(self) -> None:
        self._filter_timer.stop()
        new_filter = self.current_filter()
        if new_filter != self.model.rows.filter:
            self.model.set_filter(new_filter)
            if self.follow_box.isChecked():
                self.table.scrollToBottom()
            self._update_counts()

    def clear(self) -> None:
        self.model.clear()
        self.status_label.clear()
        self._update_counts()

    def history_resized(self) -> None:
        self.model.resize()
        self._update_counts()

    # Details -------------------------------------------------------------------------

    def _selection_changed(self, selected: QItemSelection, _deselected: QItemSelection) -> None:
        rows = self.table.selectionModel().selectedRows()
        self.details.show_record(self.model.record_at(rows[0].row()) if rows else None)

    # Export ---------------------------------------------------------------------------

    def choose_export_file(self) -> None:
        dialog = QFileDialog(self, "Export traffic", str(Path.home() / "deskbridge-traffic.jsonl"), "JSON Lines (*.jsonl);;All files (*)")
        dialog.setAcceptMode(QFileDialog.AcceptMode.AcceptSave)
        dialog.setDefaultSuffix("jsonl")
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.fileSelected.connect(lambda path: self.tasks.spawn(self.export_to(Path(path)), "traffic export"))
        dialog.open()

    async def export_to(self, path: Path) -> int:
        """Write the rows shown to ``path`` as JSON Lines in a worker thread; return how many."""
        records = list(self.model.rows.rows)
        self.status_label.setText(f"Exporting {len(records):,} rows…")
        try:
            count = await asyncio.to_thread(export_jsonl, records, path)
        except OSError as exc:
            logger.error("exporting traffic to %s failed: %s", path, exc)
            self.status_label.setText(f"Export failed: {exc.strerror or exc}")
            return 0
        logger.info("exported %d traffic rows to %s", count, path)
        self.status_label.setText(f"Exported {count:,} rows to {path}")
        self.exported.emit(str(path))
        return count

    def stop(self) -> None:
        self.apply_timer.stop()
        self._filter_timer.stop()
        self.tasks.cancel()
