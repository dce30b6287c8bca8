"""Icons from resources/icons: the application icon and one per connection state."""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QColor, QIcon, QPainter, QPixmap

from app.core.models import ViewState

APP_SIZES = (16, 24, 32, 48, 64, 128, 256)
STATE_SIZES = (16, 24, 32, 48, 64)
STATE_ICON_NAMES = {
    ViewState.CONNECTED: "connected",
    ViewState.CONNECTING: "connecting",
    ViewState.RECONNECTING: "connecting",
    ViewState.DISCONNECTED: "disconnected",
    ViewState.SIGNED_OUT: "disconnected",
    ViewState.ERROR: "error",
}


def icon_dir() -> Path:
    """Return the folder with the icon files, in a source tree, an installed wheel or a PyInstaller bundle."""
    bundle = getattr(sys, "_MEIPASS", None)
    candidates = [
        Path(__file__).resolve().parents[2] / "resources" / "icons",
        Path(sys.prefix) / "share" / "deskbridge" / "icons",
    ]
    if bundle:
        candidates.insert(0, Path(bundle) / "resources" / "icons")
    for candidate in candidates:
        if (candidate / "deskbridge.svg").is_file():
            return candidate
    raise FileNotFoundError(f"Deskbridge icons not found; looked in {', '.join(map(str, candidates))}")


def _icon(stem: str, sizes: tuple[int, ...]) -> QIcon:
    folder = icon_dir() / "png"
    icon = QIcon()
    for size in sizes:
        icon.addFile(str(folder / f"{stem}-{size}.png"))
    return icon


@cache
def app_icon() -> QIcon:
    return _icon("deskbridge", APP_SIZES)


@cache
def state_icon(state: ViewState) -> QIcon:
    return _icon(f"state-{STATE_ICON_NAMES[state]}", STATE_SIZES)


DOT_COLOURS = {"ok": "#2ea043", "problem": "#d73a49", "unknown": "#8b949e"}


@cache
def dot_icon(kind: str) -> QIcon:
    """Draw a filled circle for a health state (``ok``, ``problem`` or ``unknown``) at several sizes."""
    icon = QIcon()
    for size in (12, 16, 24, 32):
        pixmap = QPixmap(size, size)
        pixmap.fill(Qt.GlobalColor.transparent)
        painter = QPainter(pixmap)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(QColor(DOT_COLOURS[kind]))
        margin = size / 6
        painter.drawEllipse(QRectF(margin, margin, size - 2 * margin, size - 2 * margin))
        painter.end()
        icon.addPixmap(pixmap)
    return icon
