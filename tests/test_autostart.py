"""Start-at-login entries: the XDG desktop file and the macOS LaunchAgent, written to temp dirs."""

from __future__ import annotations

import configparser
import plistlib
import shlex
import sys

from app.core.autostart import LaunchAgent, WindowsRunKey, XdgAutostart, autostart_for, desktop_exec, launch_command


def test_xdg_entry_written_and_removed(tmp_path):
    entry = XdgAutostart(tmp_path / "config", {"DESKBRIDGE_HOME": "/home/a b/db"})
    assert not entry.is_enabled()

    entry.enable(["/usr/bin/python3", "-m", "app", "run", "--minimized"])

    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(entry.path, encoding="utf-8")
    section = parser["Desktop Entry"]
    assert entry.is_enabled()
    assert entry.path == tmp_path / "config" / "autostart" / "deskbridge.desktop"
    assert section["Type"] == "Application"
    assert shlex.split(section["Exec"]) == ["env", "DESKBRIDGE_HOME=/home/a b/db", "/usr/bin/python3", "-m", "app", "run", "--minimized"]

    entry.disable()
    entry.disable()
    assert not entry.is_enabled()


def test_desktop_exec_escapes():
    assert desktop_exec(["/opt/deskbridge", "run"]) == "/opt/deskbridge run"
    assert desktop_exec(["/a b/c"]) == '"/a b/c"'
    assert desktop_exec(['say "$x"']) == '"say \\\\"\\\\$x\\\\""'
    assert desktop_exec(["100%"]) == "100%%"


def test_launch_agent_plist(tmp_path):
    agent = LaunchAgent(tmp_path, {"DESKBRIDGE_HOME": "/tmp/db"})

    agent.enable(["/Applications/Deskbridge.app/Contents/MacOS/Deskbridge", "run", "--minimized"])

    plist = plistlib.loads(agent.path.read_bytes())
    assert agent.path == tmp_path / "Library" / "LaunchAgents" / "com.deskbridge.agent.plist"
    assert plist["Label"] == "com.deskbridge.agent"
    assert plist["ProgramArguments"][-2:] == ["run", "--minimized"]
    assert plist["RunAtLoad"] is True
    assert plist["EnvironmentVariables"] == {"DESKBRIDGE_HOME": "/tmp/db"}
    agent.disable()
    assert not agent.is_enabled()


def test_autostart_for_each_platform(tmp_path):
    environ = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}

    linux = autostart_for("linux", environ)
    mac = autostart_for("darwin", environ)
    windows = autostart_for("win32", environ)

    assert isinstance(linux, XdgAutostart)
    assert linux.path.parent == tmp_path / "xdg" / "autostart"
    assert isinstance(mac, LaunchAgent)
    assert mac.path.is_relative_to(tmp_path)
    assert isinstance(windows, WindowsRunKey)


def test_launch_command_runs_module():
    command = launch_command()

    assert command[0] == sys.executable
    assert command[1:] == ["-m", "app", "run", "--minimized"]
