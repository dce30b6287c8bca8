"""Build the Deskbridge bundle and the installers for this OS (``make package``).

Steps, all writing under dist/ (outputs) and build/ (intermediate files):

1. scripts/make_icons.py renders the icons into build/icons.
2. PyInstaller builds the one-folder bundle from installer/deskbridge.spec.
3. The installers for this OS:
   - Linux: deskbridge-VERSION-linux-ARCH.tar.gz and deskbridge_VERSION_ARCH.deb;
   - Windows: Deskbridge-VERSION-setup.exe (NSIS);
   - macOS: Deskbridge-VERSION.dmg, signed and notarized when the
     MACOS_* variables that installer/macos/sign.sh and notarize.sh read are set.

Other commands:

- ``nsis [--payload DIR] [--output FILE]`` compiles the Windows installer on
  any OS; without --payload it uses a placeholder payload, which is how CI
  checks the NSIS script on Linux.
- ``self-test`` runs the bundle's ``--self-test`` with its output captured,
  which also works for the windowed Windows executable, whose output
  otherwise goes nowhere.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALLER = ROOT / "installer"
DIST = ROOT / "dist"
BUILD = ROOT / "build"
ICONS = BUILD / "icons"
SELF_TEST_TIMEOUT_S = 180.0


def project_version() -> str:
    version: str = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    return version


def run(command: list[str], **kwargs: object) -> None:
    print("+ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)  # type: ignore[call-overload]


def bundle_dir() -> Path:
    """Return the bundle folder that the spec writes on this OS."""
    if sys.platform == "darwin":
        return DIST / "Deskbridge.app"
    if sys.platform == "win32":
        return DIST / "Deskbridge"
    return DIST / "deskbridge"


def bundle_executable() -> Path:
    if sys.platform == "darwin":
        return bundle_dir() / "Contents" / "MacOS" / "Deskbridge"
    if sys.platform == "win32":
        return bundle_dir() / "Deskbridge.exe"
    return bundle_dir() / "deskbridge"


def folder_size(path: Path) -> int:
    return sum(item.lstat().st_size for item in path.rglob("*") if item.is_file() or item.is_symlink())


def describe(path: Path) -> str:
    size = folder_size(path) if path.is_dir() else path.stat().st_size
    shown = path.relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
    return f"{shown}: {size / 1e6:.1f} MB ({size / 2**20:.1f} MiB)"


# Bundle -----------------------------------------------------------------------


def make_icons() -> None:
    run([sys.executable, str(ROOT / "scripts" / "make_icons.py"), str(ICONS)])


def build_bundle() -> Path:
    make_icons()
    run([
        sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
        "--distpath", str(DIST), "--workpath", str(BUILD / "pyinstaller"),
        str(INSTALLER / "deskbridge.spec"),
    ])
    if not bundle_executable().is_file():
        raise SystemExit(f"PyInstaller finished but {bundle_executable()} is missing")
    return bundle_dir()


# Linux ------------------------------------------------------------------------


def build_tarball(bundle: Path, version: str) -> Path:
    """Pack the bundle as deskbridge-VERSION/ in a .tar.gz, files sorted and owned by root."""
    machine = platform.machine().lower()
    output = DIST / f"deskbridge-{version}-linux-{machine}.tar.gz"
    top = f"deskbridge-{version}"

    def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(output, "w:gz", compresslevel=9) as archive:
        archive.add(bundle, arcname=top, recursive=False, filter=as_root)
        for path in sorted(bundle.rglob("*")):
            archive.add(path, arcname=f"{top}/{path.relative_to(bundle).as_posix()}", recursive=False, filter=as_root)
    return output


def build_linux(bundle: Path, version: str) -> list[Path]:
    sys.path.insert(0, str(INSTALLER / "linux"))
    from build_deb import build_deb

    return [build_tarball(bundle, version), build_deb(bundle, ICONS, DIST, version)]


# Windows ----------------------------------------------------------------------


def find_makensis() -> str:
    found = shutil.which("makensis")
    if found:
        return found
    for folder in (os.environ.get("ProgramFiles(x86)"), os.environ.get("ProgramFiles")):
        if folder and (Path(folder) / "NSIS" / "makensis.exe").is_file():
            return str(Path(folder) / "NSIS" / "makensis.exe")
    raise SystemExit("makensis not found; install NSIS (Debian: apt-get install nsis; Windows: choco install nsis)")


def make_placeholder_payload(folder: Path) -> Path:
    """Write a stand-in for dist/Deskbridge with the file names the NSIS script installs."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "_internal").mkdir(parents=True)
    for name in ("Deskbridge.exe", "deskbridge-relay.exe"):
        (folder / name).write_text("placeholder for the PyInstaller executable\n", encoding="utf-8")
    (folder / "_internal" / "placeholder.txt").write_text("placeholder for the bundle's libraries\n", encoding="utf-8")
    return folder


def build_nsis(payload: Path, output: Path, version: str) -> Path:
    numbers = [int(part) for part in re.findall(r"\d+", version)[:4]]
    version4 = ".".join(str(number) for number in numbers + [0] * (4 - len(numbers)))
    if not (ICONS / "deskbridge.ico").is_file():
        make_icons()
    output.parent.mkdir(parents=True, exist_ok=True)
    # makensis resolves relative paths from the script's folder, so every path is absolute.
    run([
        find_makensis(), "-V2", "-WX",
        f"-DVERSION={version}", f"-DVERSION4={version4}",
        f"-DPAYLOAD={payload.resolve()}", f"-DICON={(ICONS / 'deskbridge.ico').resolve()}",
        f"-DOUTFILE={output.resolve()}",
        str(INSTALLER / "windows" / "deskbridge.nsi"),
    ])
    return output


# macOS ------------------------------------------------------------------------


def build_macos(bundle: Path, version: str) -> list[Path]:
    dmg = DIST / f"Deskbridge-{version}.dmg"
    macos = INSTALLER / "macos"
    run(["bash", str(macos / "sign.sh"), str(bundle)])
    run(["bash", str(macos / "make_dmg.sh"), str(bundle), str(dmg)])
    run(["bash", str(macos / "sign.sh"), str(dmg)])
    run(["bash", str(macos / "notarize.sh"), str(dmg)])
    return [dmg]


# Commands ---------------------------------------------------------------------


def command_all(_args: argparse.Namespace) -> int:
    version = project_version()
    bundle = build_bundle()
    if sys.platform.startswith("linux"):
        outputs = build_linux(bundle, version)
    elif sys.platform == "win32":
        outputs = [build_nsis(bundle, DIST / f"Deskbridge-{version}-setup.exe", version)]
    elif sys.platform == "darwin":
        outputs = build_macos(bundle, version)
    else:
        raise SystemExit(f"no installer for {sys.platform}; the bundle is in {bundle}")
    print("built:")
    for path in [bundle, *outputs]:
        print(f"  {describe(path)}")
    return 0


def command_nsis(args: argparse.Namespace) -> int:
    version = project_version()
    payload = args.payload or make_placeholder_payload(BUILD / "nsis-placeholder")
    output = args.output or DIST / f"Deskbridge-{version}-setup{'' if args.payload else '-placeholder'}.exe"
    print(f"built: {describe(build_nsis(payload, output, version))}")
    return 0


def command_self_test(args: argparse.Namespace) -> int:
    executable = args.executable or bundle_executable()
    if not executable.is_file():
        raise SystemExit(f"{executable} not found; build the bundle first with make package")
    command = [str(executable), "--self-test", *([args.check] if args.check else [])]
    print("+ " + " ".join(command), flush=True)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=SELF_TEST_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        print(f"the self-test did not finish within {SELF_TEST_TIMEOUT_S:.0f} s", file=sys.stderr)
        return 1
    print(result.stdout, end="")
    print(result.stderr, end="", file=sys.stderr)
    if result.returncode != 0:
        print(f"the self-test exited with code {result.returncode}", file=sys.stderr)
    return result.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the Deskbridge bundle and installers for this OS.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("all", help="icons, bundle and this OS's installers (the default)")
    nsis = commands.add_parser("nsis", help="compile the Windows installer, on any OS")
    nsis.add_argument("--payload", type=Path, help="bundle folder to install (default: a placeholder payload)")
    nsis.add_argument("--output", type=Path, help="installer file to write (default in dist/)")
    self_test = commands.add_parser("self-test", help="run the built bundle's --self-test and show its output")
    self_test.add_argument("--executable", type=Path, help="executable to test (default: the bundle in dist/)")
    self_test.add_argument("--check", choices=["qt", "keyring", "tls", "relay"], help="run only this check")
    args = parser.parse_args(argv)
    handlers = {"all": command_all, None: command_all, "nsis": command_nsis, "self-test": command_self_test}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
