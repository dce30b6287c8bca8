"""Start Deskbridge when the person logs in, the way each OS expects it.

- Windows: a value in ``HKEY_CURRENT_USER\\Software\\Microsoft\\Windows\\CurrentVersion\\Run``.
- macOS: a LaunchAgent property list in ``~/Library/LaunchAgents``.
- Linux and other XDG desktops: a ``.desktop`` file in ``$XDG_CONFIG_HOME/autostart``.

Every call reads or writes a file or the registry, so the GUI runs them in a
worker thread. The entry starts the window minimized to the tray, with the
same ``DESKBRIDGE_HOME`` as the process that created it (not on Windows,
whose Run key cannot set environment variables).
"""

from __future__ import annotations

import os
import plistlib
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from .paths import HOME_ENV

ENTRY_NAME = "Deskbridge"
LAUNCH_AGENT_LABEL = "com.deskbridge.agent"
DESKTOP_FILE = "deskbridge.desktop"
WINDOWS_RUN_KEY = r"Software\Microsoft\Windows\CurrentVersion\Run"


def launch_command() -> list[str]:
    """Return the command that starts the window minimized: the frozen executable or ``python -m app``."""
    if getattr(sys, "frozen", False):
        program = [sys.executable]
    else:
        program = [sys.executable, "-m", "app"]
    return [*program, "run", "--minimized"]


class Autostart(Protocol):
    def is_enabled(self) -> bool: ...

    def enable(self, command: Sequence[str]) -> None: ...

    def disable(self) -> None: ...


class XdgAutostart:
    """An XDG autostart entry (freedesktop.org Desktop Application Autostart Specification)."""

    def __init__(self, config_home: Path, environment: Mapping[str, str] | None = None) -> None:
        self.path = config_home / "autostart" / DESKTOP_FILE
        self._environment = dict(environment or {})

    def __repr__(self) -> str:
        return f"<XdgAutostart {self.path}>"

    def is_enabled(self) -> bool:
        return self.path.is_file()

    def enable(self, command: Sequence[str]) -> None:
        args = list(command)
        if self._environment:
            args = ["env", *(f"{key}={value}" for key, value in self._environment.items()), *args]
        text = "\n".join([
            "[Desktop Entry]",
            "Type=Application",
            f"Name={ENTRY_NAME}",
            "Comment=Reach this desktop's applications from the cloud",
            f"Exec={desktop_exec(args)}",
            "Terminal=false",
            "X-GNOME-Autostart-enabled=true",
            "",
        ])
        _write_atomically(self.path, text.encode("utf-8"))

    def disable(self) -> None:
        self.path.unlink(missing_ok=True)


def desktop_exec(args: Sequence[str]) -> str:
    """Quote arguments for a desktop entry's Exec key.

    The Desktop Entry Specification reserves some characters: an argument
    that contains one goes in double quotes, with ``"``, `````, ``$`` and
    ``\\`` escaped by a backslash. The value's own string escaping then
    doubles every backslash, and a literal ``%`` is written ``%%``.
    """
    reserved = set(" \t\n\"'\\><~|&;$*?#()`")
    quoted = []
    for arg in args:
        arg = arg.replace("%", "%%")
        if arg and not reserved.intersection(arg):
            quoted.append(arg)
            continue
        inner = "".join("\\" + char if char in '"`$\\' else char for char in arg)
        quoted.append('"' + inner + '"')
    return " ".join(quoted).replace("\\", "\\\\")


class LaunchAgent:
    """A per-user launchd agent that runs at login."""

    def __init__(self, home: Path, environment: Mapping[str, str] | None = None) -> None:
        self.path = home / "Library" / "LaunchAgents" / f"{LAUNCH_AGENT_LABEL}.plist"
        self._environment = dict(environment or {})

    def __repr__(self) -> str:
        return f"<LaunchAgent {self.path}>"

    def is_enabled(self) -> bool:
        return self.path.is_file()

    def enable(self, command: Sequence[str]) -> None:
        plist: dict[str, object] = {
            "Label": LAUNCH_AGENT_LABEL,
            "ProgramArguments": list(command),
            "RunAtLoad": True,
            "ProcessType": "Interactive",
        }
        if self._environment:
            plist["EnvironmentVariables"] = self._environment
        _write_atomically(self.path, plistlib.dumps(plist))

    def disable(self) -> None:
        self.path.unlink(missing_ok=True)


class WindowsRunKey:
    """A value under the current user's Run key."""

    def __repr__(self) -> str:
        return f"<WindowsRunKey HKCU\\{WINDOWS_RUN_KEY}\\{ENTRY_NAME}>"

    def is_enabled(self) -> bool:
        # typeshed defines winreg's names only for win32. This check lets mypy
        # skip the lines below when it runs on another OS.
        if sys.platform != "win32":
            raise OSError("the Run key exists only on Windows")
        import winreg

        try:
            with winreg.OpenKey(winreg.HKEY_CURRENT_USER, WINDOWS_RUN_KEY) as key:
                winreg.QueryValueEx(key, ENTRY_NAME)
        except FileNotFoundError:
            return False
        return True

    def enable(self, command: Sequence[str]) -> None:
        if sys.platform != "win32":
            raise OSError("the Run key exists only on Windows")
        import winreg

        with winreg.CreateKey(winreg.HKEY_CURRENT_USER, WINDOWS_RUN_KEY) as key:
            winreg.SetValueEx(key, ENTRY_NAME, 0, winreg.REG_SZ, subprocess.list2cmdline(list(command)))

    def disable(self) -> None:
        if sys.platform != "win32":
            raise OSError("the Run key exists only on Windows")
        import winreg

        try:
            with winreg.OpenKey(winreg.HKEY_CURRENT_USER, WINDOWS_RUN_KEY, 0, winreg.KEY_SET_VALUE) as key:
                winreg.DeleteValue(key, ENTRY_NAME)
        except FileNotFoundError:
            pass


def autostart_for(platform: str | None = None, environ: Mapping[str, str] | None = None) -> Autostart:
    """Return the start-at-login entry for an OS (``sys.platform`` by default)."""
    platform = platform or sys.platform
    environ = os.environ if environ is None else environ
    carried = {HOME_ENV: environ[HOME_ENV]} if environ.get(HOME_ENV) else {}
    home = Path(environ.get("HOME") or Path.home())
    if platform == "win32":
        return WindowsRunKey()
    if platform == "darwin":
        return LaunchAgent(home, carried)
    config_home = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
    return XdgAutostart(config_home, carried)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)
