"""Make the installers' icons from the one source image, resources/icons/deskbridge.svg.

Writes into OUT_DIR (default build/icons):

- ``png/deskbridge-SIZE.png`` for the freedesktop hicolor sizes and the
  bundle formats below, rendered with Qt's SVG renderer;
- ``deskbridge.ico`` (Windows executable and installer), 16 to 256 px;
- ``deskbridge.icns`` (macOS app bundle), 32 to 1024 px;
- ``deskbridge.svg``, a copy of the source, for the hicolor scalable folder.

Pillow writes the .ico and .icns files from the Qt renderings, so each size
is drawn from the vector image, not scaled down from a bitmap.

Run: .venv/bin/python scripts/make_icons.py [OUT_DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "resources" / "icons" / "deskbridge.svg"
HICOLOR_SIZES = (16, 22, 24, 32, 48, 64, 128, 256, 512)
ICO_SIZES = (16, 24, 32, 48, 64, 128, 256)
# Pixel sizes of the PNG entries Pillow writes (ic07 to ic14): 16 to 512 pt at 1x and 2x.
ICNS_SIZES = (32, 64, 128, 256, 512, 1024)
ALL_SIZES = tuple(sorted(set(HICOLOR_SIZES) | set(ICO_SIZES) | set(ICNS_SIZES)))


def render_pngs(out_dir: Path) -> dict[int, Path]:
    """Render the source SVG at every size into out_dir/png and return the paths by size."""
    # Qt needs a platform for QGuiApplication; offscreen works without a screen on every OS.
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QGuiApplication, QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])
    renderer = QSvgRenderer(str(SOURCE))
    if not renderer.isValid():
        raise SystemExit(f"Qt cannot parse {SOURCE}")
    png_dir = out_dir / "png"
    png_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for size in ALL_SIZES:
        image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
        image.fill(Qt.GlobalColor.transparent)
        painter = QPainter(image)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        renderer.render(painter)
        painter.end()
        path = png_dir / f"deskbridge-{size}.png"
        if not image.save(str(path)):
            raise SystemExit(f"writing {path} failed")
        paths[size] = path
    del app
    return paths


def write_ico(pngs: dict[int, Path], path: Path) -> None:
    from PIL import Image

    images = [Image.open(pngs[size]).convert("RGBA") for size in ICO_SIZES]
    largest = images[-1]
    largest.save(path, format="ICO", sizes=[(size, size) for size in ICO_SIZES], append_images=images[:-1])


def write_icns(pngs: dict[int, Path], path: Path) -> None:
    from PIL import Image

    images = [Image.open(pngs[size]).convert("RGBA") for size in ICNS_SIZES]
    largest = images[-1]
    largest.save(path, format="ICNS", append_images=images[:-1])


def check_sizes(path: Path, expected: tuple[int, ...]) -> None:
    """Raise SystemExit unless the icon file at path contains every expected size."""
    from PIL import Image

    with Image.open(path) as icon:
        # ICO lists (width, height); ICNS lists (width, height, scale), where scale 2 is a Retina image.
        found = {entry[0] * (entry[2] if len(entry) > 2 else 1) for entry in icon.info.get("sizes", ())}
    missing = sorted(set(expected) - found)
    if missing:
        raise SystemExit(f"{path} lacks the sizes {missing}; it has {sorted(found)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=ROOT / "build" / "icons", help="output folder (default build/icons)")
    args = parser.parse_args(argv)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    pngs = render_pngs(out_dir)
    write_ico(pngs, out_dir / "deskbridge.ico")
    check_sizes(out_dir / "deskbridge.ico", ICO_SIZES)
    write_icns(pngs, out_dir / "deskbridge.icns")
    check_sizes(out_dir / "deskbridge.icns", ICNS_SIZES)
    shutil.copyfile(SOURCE, out_dir / "deskbridge.svg")
    print(f"wrote {len(pngs)} PNGs, deskbridge.ico and deskbridge.icns to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
