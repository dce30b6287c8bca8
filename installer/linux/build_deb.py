"""Build the Debian package from the PyInstaller bundle (dist/deskbridge).

Layout of the package:

- /usr/lib/deskbridge/: the bundle (both executables and _internal/);
- /usr/bin/deskbridge and /usr/bin/deskbridge-relay: shell wrappers;
- /usr/share/applications/deskbridge.desktop: the desktop entry;
- /usr/share/icons/hicolor/SIZE/apps/deskbridge.png and scalable/apps/deskbridge.svg;
- /usr/share/doc/deskbridge/copyright.

``Depends`` lists the system libraries the bundle links to, as
dpkg-shlibdeps computes them from every ELF file in the bundle. The
bundle's own copies of Qt, ICU, Python and OpenSSL are skipped. postinst
and postrm refresh the desktop database and icon cache where those tools
exist.

Run by installer/build.py. By hand:
    python installer/linux/build_deb.py BUNDLE_DIR ICONS_DIR OUT_DIR VERSION
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = "deskbridge"
INSTALL_DIR = Path("usr/lib/deskbridge")
HICOLOR_SIZES = (16, 22, 24, 32, 48, 64, 128, 256, 512)
# NOTE: no project mailing list exists yet; set DESKBRIDGE_MAINTAINER to override.
DEFAULT_MAINTAINER = "Deskbridge developers <packaging@deskbridge.dev>"
# Run-time needs that no ELF file shows: the OS trust store for truststore,
# and a Secret Service provider for the OS keyring.
EXTRA_DEPENDS = ["ca-certificates"]
RECOMMENDS = ["gnome-keyring | kwalletmanager | keepassxc"]
DESCRIPTION = """\
Reach a desktop application's socket API from the cloud
 Deskbridge is a desktop agent that lets cloud systems reach an application
 that offers only a local socket API, such as a trading or data terminal.
 It opens one outbound WebSocket to a relay and carries bytes between cloud
 clients and the application, with its allowlist of targets, resumable
 sessions and the sign-in token kept in the OS keyring.
 .
 The package also contains deskbridge-relay, the relay server."""

WRAPPER = """\
#!/bin/sh
exec /{install_dir}/{program} "$@"
"""

MAINTAINER_SCRIPT = """\
#!/bin/sh
# Refresh the menus and icon caches of desktops that do not use dpkg triggers for them.
set -e
case "$1" in
    {actions})
        if command -v update-desktop-database >/dev/null 2>&1; then
            update-desktop-database -q /usr/share/applications || true
        fi
        if command -v gtk-update-icon-cache >/dev/null 2>&1 && [ -f /usr/share/icons/hicolor/index.theme ]; then
            gtk-update-icon-cache -q -t -f /usr/share/icons/hicolor || true
        fi
        ;;
esac
exit 0
"""


def dpkg_architecture() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()


def is_elf(path: Path) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, "rb") as file:
        return file.read(4) == b"\x7fELF"


def shlib_depends(bundle: Path) -> list[str]:
    """Return the Depends entries for the system libraries that the bundle's ELF files link to."""
    elf_files = sorted(path for path in bundle.rglob("*") if is_elf(path))
    library_dirs = sorted({str(path.parent) for path in elf_files})
    with tempfile.TemporaryDirectory(prefix="deskbridge-shlibdeps-") as work:
        # dpkg-shlibdeps reads debian/control from the current folder.
        (Path(work) / "debian").mkdir()
        (Path(work) / "debian" / "control").write_text(f"Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: any\n", encoding="utf-8")
        command = ["dpkg-shlibdeps", "-O", "--ignore-missing-info", "--warnings=0"]
        command += [f"-l{folder}" for folder in library_dirs]
        command += [f"-e{path}" for path in elf_files]
        result = subprocess.run(command, cwd=work, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"dpkg-shlibdeps failed with exit code {result.returncode}:\n{result.stderr}")
    for line in result.stdout.splitlines():
        if line.startswith("shlibs:Depends="):
            return [entry.strip() for entry in line.split("=", 1)[1].split(",") if entry.strip()]
    raise SystemExit(f"dpkg-shlibdeps printed no shlibs:Depends line:\n{result.stdout}{result.stderr}")


def write_file(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)


def copy_bundle(bundle: Path, target: Path) -> None:
    shutil.copytree(bundle, target, symlinks=True)
    # Debian policy: folders and programs 0755, everything else, shared libraries included, 0644.
    programs = {target / "deskbridge", target / "deskbridge-relay"}
    for path in [target, *target.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod(0o755 if path.is_dir() or path in programs else 0o644)


def install_icons(icons: Path, root: Path) -> None:
    hicolor = root / "usr/share/icons/hicolor"
    for size in HICOLOR_SIZES:
        target = hicolor / f"{size}x{size}" / "apps" / f"{PACKAGE}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(icons / "png" / f"deskbridge-{size}.png", target)
        target.chmod(0o644)
    scalable = hicolor / "scalable" / "apps" / f"{PACKAGE}.svg"
    scalable.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(icons / "deskbridge.svg", scalable)
    scalable.chmod(0o644)


def write_md5sums(root: Path) -> None:
    lines = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if relative.parts[0] == "DEBIAN" or path.is_symlink() or not path.is_file():
            continue
        digest = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
        lines.append(f"{digest}  {relative.as_posix()}\n")
    write_file(root / "DEBIAN" / "md5sums", "".join(lines))


def installed_size_kib(root: Path) -> int:
    total = 0
    for path in root.rglob("*"):
        if path.relative_to(root).parts[0] == "DEBIAN":
            continue
        total += path.lstat().st_size if path.is_symlink() or path.is_file() else 0
    return (total + 1023) // 1024


def build_deb(bundle: Path, icons: Path, out_dir: Path, version: str) -> Path:
    """Build deskbridge_VERSION_ARCH.deb in out_dir from the bundle folder and the icons folder."""
    bundle = bundle.resolve()  # dpkg-shlibdeps runs in a temp folder
    if not (bundle / "deskbridge").is_file():
        raise SystemExit(f"{bundle} has no deskbridge executable; build the bundle first")
    architecture = dpkg_architecture()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="deskbridge-deb-") as work:
        root = Path(work) / "root"
        copy_bundle(bundle, root / INSTALL_DIR)
        for program in ("deskbridge", "deskbridge-relay"):
            write_file(root / "usr/bin" / program, WRAPPER.format(install_dir=INSTALL_DIR.as_posix(), program=program), 0o755)
        desktop_entry = (HERE / "deskbridge.desktop").read_text(encoding="utf-8")
        write_file(root / "usr/share/applications/deskbridge.desktop", desktop_entry)
        install_icons(icons, root)
        write_file(root / f"usr/share/doc/{PACKAGE}/copyright", (HERE / "copyright").read_text(encoding="utf-8"))

        depends = shlib_depends(bundle) + EXTRA_DEPENDS
        control = "\n".join([
            f"Package: {PACKAGE}",
            f"Version: {version}",
            f"Architecture: {architecture}",
            f"Maintainer: {os.environ.get('DESKBRIDGE_MAINTAINER', DEFAULT_MAINTAINER)}",
            f"Installed-Size: {installed_size_kib(root)}",
            f"Depends: {', '.join(depends)}",
            f"Recommends: {', '.join(RECOMMENDS)}",
            "Section: net",
            "Priority: optional",
            f"Description: {DESCRIPTION}",
            "",
        ])
        write_file(root / "DEBIAN" / "control", control)
        write_file(root / "DEBIAN" / "postinst", MAINTAINER_SCRIPT.format(actions="configure"), 0o755)
        write_file(root / "DEBIAN" / "postrm", MAINTAINER_SCRIPT.format(actions="remove|purge"), 0o755)
        write_md5sums(root)

        output = out_dir / f"{PACKAGE}_{version}_{architecture}.deb"
        # --root-owner-group makes every file root:root without fakeroot.
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(output)], check=True, stdout=subprocess.DEVNULL)
    return output


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: build_deb.py BUNDLE_DIR ICONS_DIR OUT_DIR VERSION", file=sys.stderr)
        return 2
    output = build_deb(Path(argv[0]), Path(argv[1]), Path(argv[2]), argv[3])
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
