"""Render the icons in resources/icons from deskbridge.svg with Qt's SVG renderer.

The application icon is the SVG itself. Each connection state gets a copy
with a coloured dot in the lower right corner, written as an SVG and as
PNGs in several sizes, because tray icons on some desktops need bitmaps.

Run: QT_QPA_PLATFORM=offscreen .venv/bin/python scripts/render_icons.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from PySide6.QtCore import QByteArray, Qt
from PySide6.QtGui import QGuiApplication, QImage, QPainter
from PySide6.QtSvg import QSvgRenderer

ICONS = Path(__file__).resolve().parent.parent / "resources" / "icons"
SOURCE = ICONS / "deskbridge.svg"
MARKER = "<!-- STATE-DOT: render_icons.py puts the connection-state dot here -->"
APP_SIZES = (16, 24, 32, 48, 64, 128, 256)
STATE_SIZES = (16, 24, 32, 48, 64)
# Connection state and dot colour; app/gui/icons.py maps window states to these names.
STATE_COLOURS = {
    "connected": "#2ea043",
    "connecting": "#e3a008",
    "disconnected": "#8b949e",
    "error": "#d73a49",
}
DOT = '<circle cx="50" cy="50" r="11" fill="{colour}" stroke="#ffffff" stroke-width="3"/>'


def render_png(svg: str, size: int, path: Path) -> None:
    renderer = QSvgRenderer(QByteArray(svg.encode("utf-8")))
    if not renderer.isValid():
        raise SystemExit(f"Qt cannot parse the SVG for {path.name}")
    image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    renderer.render(painter)
    painter.end()
    if not image.save(str(path)):
        raise SystemExit(f"cannot write {path}")


def main() -> int:
    app = QGuiApplication(sys.argv)
    source = SOURCE.read_text(encoding="utf-8")
    if MARKER not in source:
        raise SystemExit(f"{SOURCE} has no state-dot marker")
    png_dir = ICONS / "png"
    png_dir.mkdir(exist_ok=True)

    for size in APP_SIZES:
        render_png(source, size, png_dir / f"deskbridge-{size}.png")
    for state, colour in STATE_COLOURS.items():
        svg = source.replace(MARKER, DOT.format(colour=colour))
        (ICONS / f"state-{state}.svg").write_text(svg, encoding="utf-8")
        for size in STATE_SIZES:
            render_png(svg, size, png_dir / f"state-{state}-{size}.png")
    print(f"wrote icons to {ICONS}")
    del app
    return 0


if __name__ == "__main__":
    sys.exit(main())
