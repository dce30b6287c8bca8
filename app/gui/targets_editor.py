"""An editor for the target allowlist with a live probe on every row.

Used by the setup wizard and the settings dialog. Each row has a name, a
host and a port, and shows whether a desktop application listens there; if
none does, it asks the person to start that application and log in to it.
"""

from __future__ import annotations

import asyncio

from PySide6.QtCore import QObject, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QShowEvent, QHideEvent
from PySide6.QtWidgets import (
    QCheckBox,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app.core.config import Target, is_loopback_host
from app.core.errors import ConfigError
from app.core.probe import probe_target

from .icons import dot_icon
from .tasks import TaskSet

PROBE_EVERY_MS = 3_000
# Wait this long after the last keystroke before probing an edited row.
EDIT_SETTLE_MS = 400
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7497


class TargetRow(QObject):
    """The widgets of one target: name, host, port, a remove button and the probe result."""

    changed = Signal()
    remove_requested = Signal(object)

    def __init__(
        self,
        name: str = "",
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        allow_remote: bool = False,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.name_edit = QLineEdit(name)
        self.name_edit.setPlaceholderText("quotes")
        self.name_edit.setAccessibleName("Target name")
        self.host_edit = QLineEdit(host)
        self.host_edit.setPlaceholderText(DEFAULT_HOST)
        self.host_edit.setAccessibleName("Host")
        self.port_spin = QSpinBox()
        self.port_spin.setRange(1, 65535)
        self.port_spin.setValue(port)
        self.port_spin.setAccessibleName("Port")
        self.remove_button = QToolButton()
        self.remove_button.setText("Remove")
        self.remove_button.setToolTip("Remove this target")
        self.status_icon = QLabel()
        self.status_icon.setFixedSize(QSize(16, 16))
        self.status_label = QLabel("Not checked yet")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.remote_box = QCheckBox("This host is another computer: allow Deskbridge to connect to it")
        self.remote_box.setChecked(allow_remote)
        self.status = QWidget()
        status_line = QHBoxLayout()
        status_line.addWidget(self.status_icon, 0, Qt.AlignmentFlag.AlignTop)
        status_line.addWidget(self.status_label, 1)
        status_layout = QVBoxLayout(self.status)
        status_layout.setContentsMargins(0, 0, 0, 6)
        status_layout.setSpacing(2)
        status_layout.addLayout(status_line)
        status_layout.addWidget(self.remote_box)
        self.widgets: tuple[QWidget, ...] = (self.name_edit, self.host_edit, self.port_spin, self.remove_button, self.status)
        self._generation = 0
        self.probe_task: asyncio.Task[None] | None = None

        self.name_edit.textChanged.connect(self._edited)
        self.host_edit.textChanged.connect(self._edited)
        self.port_spin.valueChanged.connect(self._edited)
        self.remote_box.toggled.connect(self._edited)
        self.remove_button.clicked.connect(lambda: self.remove_requested.emit(self))
        self.remote_box.setVisible(not self.is_local)

    @property
    def is_local(self) -> bool:
        return is_loopback_host(self.host_edit.text()) or not self.host_edit.text().strip()

    def stop_probe(self) -> None:
        """Cancel a running probe and ignore its result if it still arrives."""
        self._generation += 1
        if self.probe_task is not None:
            self.probe_task.cancel()

    def _edited(self) -> None:
        self.stop_probe()
        self.remote_box.setVisible(not self.is_local)
        self.set_status(None, "Checking…")
        self.changed.emit()

    def target(self) -> Target:
        """Return the row as a target, or raise ConfigError naming what is wrong."""
        name, host = self.name_edit.text().strip(), self.host_edit.text().strip()
        if not self.is_local and not self.remote_box.isChecked():
            raise ConfigError(
                f"target {name!r} is on another computer ({host}); tick the box under it to allow that, "
                "or use 127.0.0.1 for an application on this computer"
            )
        return Target.create(name, host, self.port_spin.value(), allow_remote=not self.is_local)

    def set_status(self, reachable: bool | None, text: str) -> None:
        if reachable is None:
            kind = "unknown"
        elif reachable:
            kind = "ok"
        else:
            kind = "problem"
        self.status_icon.setPixmap(dot_icon(kind).pixmap(QSize(16, 16)))
        self.status_label.setText(text)

    def delete(self) -> None:
        for widget in self.widgets:
            widget.deleteLater()
        self.deleteLater()

    async def probe(self) -> None:
        """Probe the row's address and show the result, unless the row changed meanwhile."""
        generation = self._generation
        host, port = self.host_edit.text().strip(), self.port_spin.value()
        if not host:
            self.set_status(False, "Enter the host the application listens on, usually 127.0.0.1.")
            return
        name = self.name_edit.text().strip() or "this target"
        if not self.is_local and not self.remote_box.isChecked():
            self.set_status(None, f"{host} is not this computer. Tick the box below to allow Deskbridge to reach it.")
            return
        result = await probe_target(Target(name, host, port))
        # Python 3.11's wait_for can return a result after its task was
        # cancelled, so the generation shows whether the row was stopped or edited meanwhile.
        if generation != self._generation:
            return
        if result.ok:
            self.set_status(True, f"An application is listening on {host}:{port}.")
        else:
            self.set_status(
                False,
                f"Nothing is listening on {host}:{port} ({result.reason or result.message.rstrip('.')}). "
                f"Start the application for {name} and log in to it.",
            )


class TargetsEditor(QWidget):
    """A grid of targets with Add, and live probes while the editor is visible."""

    changed = Signal()

    def __init__(self, targets: list[Target] | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.tasks = TaskSet()
        self.rows: list[TargetRow] = []
        self._next_grid_row = 1
        self.grid = QGridLayout()
        self.grid.setHorizontalSpacing(6)
        self.grid.setVerticalSpacing(2)
        for column, text in enumerate(("Name", "Host", "Port")):
            self.grid.addWidget(QLabel(f"<b>{text}</b>"), 0, column)
        self.grid.setColumnStretch(0, 3)
        self.grid.setColumnStretch(1, 4)
        self.add_button = QPushButton("Add target")
        self.add_button.clicked.connect(lambda: self.add_row())
        buttons = QHBoxLayout()
        buttons.addWidget(self.add_button)
        buttons.addStretch(1)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(self.grid)
        layout.addLayout(buttons)
        layout.addStretch(1)

        self._probe_timer = QTimer(self)
        self._probe_timer.setInterval(PROBE_EVERY_MS)
        self._probe_timer.timeout.connect(self.probe_all)
        self._settle_timer = QTimer(self)
        self._settle_timer.setSingleShot(True)
        self._settle_timer.setInterval(EDIT_SETTLE_MS)
        self._settle_timer.timeout.connect(self.probe_all)

        for target in targets or []:
            self.add_row(target.name, target.host, target.port, target.allow_remote)

    def add_row(self, name: str = "", host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, allow_remote: bool = False) -> TargetRow:
        row = TargetRow(name, host, port, allow_remote, self)
        row.changed.connect(self._row_changed)
        row.remove_requested.connect(self.remove_row)
        self.rows.append(row)
        fields = self._next_grid_row
        self.grid.addWidget(row.name_edit, fields, 0)
        self.grid.addWidget(row.host_edit, fields, 1)
        self.grid.addWidget(row.port_spin, fields, 2)
        self.grid.addWidget(row.remove_button, fields, 3)
        self.grid.addWidget(row.status, fields + 1, 0, 1, 4)
        self._next_grid_row += 2
        row.set_status(None, "Checking…")
        self._row_changed()
        if not name:
            row.name_edit.setFocus()
        return row

    def remove_row(self, row: TargetRow) -> None:
        row.stop_probe()
        self.rows.remove(row)
        for widget in row.widgets:
            self.grid.removeWidget(widget)
        row.delete()
        self.changed.emit()

    def _row_changed(self) -> None:
        self._settle_timer.start()
        self.changed.emit()

    def targets(self) -> dict[str, Target]:
        """Return the targets by name, or raise ConfigError for the first invalid or repeated one."""
        targets: dict[str, Target] = {}
        for row in self.rows:
            target = row.target()
            if target.name in targets:
                raise ConfigError(f"the target name {target.name!r} is used twice; give each target its own name")
            targets[target.name] = target
        if not targets:
            raise ConfigError("add at least one target: the application the cloud may reach")
        return targets

    def probe_all(self) -> None:
        for row in self.rows:
            if row.probe_task is None or row.probe_task.done():
                row.probe_task = self.tasks.spawn(row.probe(), f"probe of target row {row.name_edit.text()!r}")

    def stop(self) -> None:
        """Stop probing; call before the editor goes away."""
        self._probe_timer.stop()
        self._settle_timer.stop()
        for row in self.rows:
            row.stop_probe()
        self.tasks.cancel()

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        self._probe_timer.start()
        self.probe_all()

    def hideEvent(self, event: QHideEvent) -> None:
        super().hideEvent(event)
        self._probe_timer.stop()
        self._settle_timer.stop()


def transparent_scroll_area(editor: TargetsEditor) -> QScrollArea:
    """Put the editor in a frameless scroll area that shows the dialog's own background."""
    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QScrollArea.Shape.NoFrame)
    scroll.setWidget(editor)
    scroll.viewport().setAutoFillBackground(False)
    editor.setAutoFillBackground(False)
    return scroll
