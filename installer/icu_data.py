"""Shrink the ICU data library that PySide6 ships on Linux (libicudata.so.NN, 32 MB).

Qt 6 Core calls ICU only for case mapping, collation (ucol_*), codecs
(ucnv_*) and time zones (ucal_*). ``nm -D --undefined-only libQt6Core.so.6``
lists these calls, and ``test_packaging.py`` checks that the list has no
other ICU family. The data categories that none of these calls read are
dropped: break iterators, transliteration, spelled-out numbers, units, and
the display names of currencies, languages and regions. Collation, codecs,
time zones and the locale data stay.

The data is one ICU "common data" package (format ``CmnD``) stored in the
library as the symbol ``icudtNN_dat``. This module cuts it out of the ELF
file, writes a package without the dropped items, and links a new library
with the same soname that holds it, so ICU finds the data as before.

Run by installer/deskbridge.spec. By hand:
    python installer/icu_data.py SOURCE_LIB OUT_DIR
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

# Item folders inside the package (for example icudt73l/brkitr/...) that Qt never reads.
UNUSED_CATEGORIES = frozenset({"brkitr", "translit", "rbnf", "unit", "curr", "lang", "region"})
ITEM_ALIGNMENT = 16
# ICU's pkgdata and icupkg fill the gaps between items with this byte.
PADDING = b"\xaa"
TOC_ENTRY = struct.Struct("<II")


class IcuDataError(Exception):
    """The library or its data package has a layout this module does not handle."""


def read_symbol(library: Path) -> tuple[str, bytes]:
    """Return the name and bytes of the icudtNN_dat symbol, found with readelf."""
    symbols = subprocess.run(["readelf", "-sW", str(library)], capture_output=True, text=True, check=True).stdout
    match = re.search(r"^\s*\d+:\s+([0-9a-f]+)\s+(0x[0-9a-f]+|\d+)\s+OBJECT\s+GLOBAL\s+\S+\s+(\d+)\s+(icudt\d+_dat)\s*$", symbols, re.M)
    if match is None:
        raise IcuDataError(f"{library} has no icudtNN_dat symbol")
    address, size, section_index, name = int(match.group(1), 16), int(match.group(2), 0), int(match.group(3)), match.group(4)
    sections = subprocess.run(["readelf", "-SW", str(library)], capture_output=True, text=True, check=True).stdout
    section = re.search(rf"^\s*\[\s*{section_index}\]\s+\S+\s+\S+\s+([0-9a-f]+)\s+([0-9a-f]+)", sections, re.M)
    if section is None:
        raise IcuDataError(f"section {section_index} of {library} not found")
    section_address, section_offset = int(section.group(1), 16), int(section.group(2), 16)
    offset = section_offset + address - section_address
    with open(library, "rb") as file:
        file.seek(offset)
        data = file.read(size)
    return name, data


def split_package(package: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Return the header and the (name, bytes) items of a CmnD common data package."""
    header_size, magic1, magic2 = struct.unpack_from("<HBB", package, 0)
    if (magic1, magic2) != (0xDA, 0x27) or package[12:16] != b"CmnD":
        raise IcuDataError("the data is not an ICU common data package (magic or format differs)")
    if package[8] != 0:
        raise IcuDataError("only little-endian ICU data is handled")
    toc = header_size
    (count,) = struct.unpack_from("<I", package, toc)
    entries = [TOC_ENTRY.unpack_from(package, toc + 4 + TOC_ENTRY.size * index) for index in range(count)]
    items = []
    for index, (name_offset, data_offset) in enumerate(entries):
        name_end = package.index(b"\0", toc + name_offset)
        name = package[toc + name_offset:name_end].decode("ascii")
        data_end = entries[index + 1][1] if index + 1 < count else len(package) - toc
        items.append((name, package[toc + data_offset:toc + data_end]))
    return package[:header_size], items


def join_package(header: bytes, items: list[tuple[str, bytes]]) -> bytes:
    """Build a CmnD package; ICU looks items up by binary search, so they are sorted by name."""
    items = sorted(items, key=lambda item: item[0].encode("ascii"))
    names = bytearray()
    name_offsets = []
    table_size = 4 + TOC_ENTRY.size * len(items)
    for name, _data in items:
        name_offsets.append(table_size + len(names))
        names += name.encode("ascii") + b"\0"
    body = bytearray(names)
    data_offsets = []
    for _name, data in items:
        padding = -(table_size + len(body)) % ITEM_ALIGNMENT
        body += PADDING * padding
        data_offsets.append(table_size + len(body))
        body += data
    table = struct.pack("<I", len(items)) + b"".join(TOC_ENTRY.pack(n, d) for n, d in zip(name_offsets, data_offsets))
    return header + table + bytes(body)


def is_unused(name: str) -> bool:
    parts = name.split("/")
    return len(parts) > 2 and parts[1] in UNUSED_CATEGORIES


def link_library(symbol: str, package: bytes, soname: str, out_dir: Path) -> Path:
    """Link a shared library that exports `symbol` with the package's bytes and no other code."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise IcuDataError("no C compiler (cc or gcc) found to link the smaller ICU data library; install gcc")
    data_path = out_dir / f"{symbol}.bin"
    data_path.write_bytes(package)
    assembly = out_dir / f"{symbol}.S"
    assembly.write_text(
        "\n".join([
            '    .section .rodata',
            f'    .globl {symbol}',
            f'    .type {symbol}, @object',
            f'    .balign {ITEM_ALIGNMENT}',
            f'{symbol}:',
            f'    .incbin "{data_path}"',
            f'    .size {symbol}, . - {symbol}',
            '    .section .note.GNU-stack,"",@progbits',
            '',
        ]),
        encoding="ascii",
    )
    library = out_dir / soname
    subprocess.run([compiler, "-shared", "-nostdlib", f"-Wl,-soname,{soname}", "-o", str(library), str(assembly)], check=True)
    return library


def trim_library(source: Path, out_dir: Path) -> tuple[Path, int, int]:
    """Write a smaller copy of the ICU data library to out_dir; return its path and the package sizes before and after."""
    out_dir.mkdir(parents=True, exist_ok=True)
    symbol, package = read_symbol(source)
    header, items = split_package(package)
    # The writer must reproduce ICU's own package byte for byte before it writes a smaller one.
    if join_package(header, items) != package:
        raise IcuDataError(f"rebuilding the ICU data of {source} without changes gives different bytes")
    kept = [item for item in items if not is_unused(item[0])]
    smaller = join_package(header, kept)
    # Round trip: the rebuilt package must list exactly the kept items with the same bytes.
    if split_package(smaller)[1] != sorted(kept, key=lambda item: item[0].encode("ascii")):
        raise IcuDataError("the rebuilt ICU data package does not read back the same items")
    library = link_library(symbol, smaller, source.name, out_dir)
    if read_symbol(library)[1][:len(smaller)] != smaller:
        raise IcuDataError(f"{library} does not hold the package that was written")
    return library, len(package), len(smaller)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: icu_data.py SOURCE_LIB OUT_DIR", file=sys.stderr)
        return 2
    library, before, after = trim_library(Path(argv[0]), Path(argv[1]))
    print(f"wrote {library}: ICU data {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
