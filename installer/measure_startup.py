"""Measure how long the frozen app takes from launch to its first painted window.

Each run starts the bundle's executable with ``--self-test startup``, which
opens the real window with settings in a temp folder, prints the monotonic
clock when the main window is first painted, and quits. The launch time is
that clock minus the clock just before the process was started; both read
the same system-wide monotonic clock (CLOCK_MONOTONIC on Linux).

On Linux the script starts its own Xvfb, so the xcb platform plugin is
measured as on a desktop; ``--offscreen`` uses Qt's offscreen platform.
``--cold`` (Linux) evicts the bundle's files from the page cache before each
launch with posix_fadvise(DONTNEED), so they are read from disk again. The
system libraries stay cached.

Run: .venv/bin/python installer/measure_startup.py [--runs 5] [--offscreen] [--cold] [EXECUTABLE]
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "window painted at monotonic"
RUN_TIMEOUT_S = 60.0
XVFB_START_TIMEOUT_S = 20.0


@contextmanager
def xvfb() -> Iterator[str]:
    """Start Xvfb on a display number it picks itself (-displayfd) and yield the DISPLAY value."""
    binary = shutil.which("Xvfb")
    if binary is None:
        raise SystemExit("Xvfb is not installed; on Debian or Ubuntu: apt-get install xvfb")
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        [binary, "-displayfd", str(write_end), "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
        pass_fds=(write_end,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    try:
        with os.fdopen(read_end) as pipe:
            ready, _, _ = select.select([pipe], [], [], XVFB_START_TIMEOUT_S)
            number = pipe.readline().strip() if ready else ""
        if not number.isdigit():
            raise SystemExit(f"Xvfb did not report a display number within {XVFB_START_TIMEOUT_S:.0f} s")
        yield f":{number}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def evict_from_page_cache(folder: Path) -> int:
    """Ask the kernel to drop the cached pages of every file under folder; return the number of files."""
    count = 0
    for path in folder.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)
        count += 1
    return count


def measure_once(executable: Path, env: dict[str, str], cold: bool = False) -> float:
    """Return the seconds from starting the executable to its first painted main window."""
    if cold:
        evict_from_page_cache(executable.resolve().parent)
    started = time.monotonic()
    result = subprocess.run(
        [str(executable), "--self-test", "startup"],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    for line in result.stdout.splitlines():
        if line.startswith(MARKER):
            return float(line[len(MARKER):].split()[0]) - started
    raise RuntimeError(f"{executable} printed no '{MARKER}' line (exit code {result.returncode}):\n{result.stdout}{result.stderr}")


def default_executable() -> Path:
    if sys.platform == "darwin":
        return ROOT / "dist" / "Deskbridge.app" / "Contents" / "MacOS" / "Deskbridge"
    if sys.platform == "win32":
        return ROOT / "dist" / "Deskbridge" / "Deskbridge.exe"
    return ROOT / "dist" / "deskbridge" / "deskbridge"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time the frozen app from launch to its first painted window.")
    parser.add_argument("executable", nargs="?", type=Path, default=default_executable(), help="app executable (default: the bundle in dist/)")
    parser.add_argument("--runs", type=int, default=5, help="number of launches (default 5)")
    parser.add_argument("--offscreen", action="store_true", help="use Qt's offscreen platform instead of Xvfb")
    parser.add_argument("--cold", action="store_true", help="evict the bundle's files from the page cache before each launch (Linux)")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    env.pop("QT_QPA_PLATFORM", None)
    times = []
    if args.offscreen or not sys.platform.startswith("linux"):
        if args.offscreen:
            env["QT_QPA_PLATFORM"] = "offscreen"
        times = [measure_once(args.executable, env, args.cold) for _run in range(args.runs)]
    else:
        with xvfb() as display:
            env["DISPLAY"] = display
            env.pop("WAYLAND_DISPLAY", None)
            times = [measure_once(args.executable, env, args.cold) for _run in range(args.runs)]
    if args.offscreen:
        platform_name = "offscreen"
    elif sys.platform.startswith("linux"):
        platform_name = "Xvfb (xcb)"
    else:
        platform_name = "desktop"
    cache = "bundle evicted from the page cache" if args.cold else "page cache warm"
    print(f"launch to first painted window, {platform_name}, {cache}, {args.runs} runs: " + ", ".join(f"{value:.2f}" for value in times) + " s")
    print(f"median {statistics.median(times):.2f} s, max {max(times):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
