"""The agent's settings file and the target allowlist.

The file is JSON in the config folder, written atomically and readable only
by its owner. It contains the relay URL, the account and device names and the
allowlist of targets, and never a password or token.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

CONFIG_FILE = "config.json"
TARGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
# Device names travel in an HTTP header, so they are ASCII.
DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}\Z")


def validate_device_name(name: str) -> str:
    """Return ``name`` if it is a valid device name, or raise ConfigError."""
    if not DEVICE_NAME.match(name) or name != name.strip():
        raise ConfigError(
            f"invalid device name {name!r}: use 1 to 64 ASCII letters, digits, spaces, '.', '_' or '-', "
            "starting with a letter or digit and not ending with a space"
        )
    return name


def validate_seconds(value: float, what: str, *, allow_zero: bool = False) -> float:
    """Return a finite, positive number of seconds (or 0 if allowed), or raise ConfigError."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        low = "0 or more" if allow_zero else "a positive number"
        raise ConfigError(f"{what} must be {low} of seconds, not {value}")
    return value


@dataclass(frozen=True, slots=True)
class Target:
    """An allowlisted desktop application: the cloud names it, and only this side stores the address.

    Targets are on this computer (loopback) unless ``allow_remote`` records
    the person's explicit consent to reach another host.
    """

    name: str
    host: str
    port: int
    allow_remote: bool = False

    @property
    def is_loopback_host(self) -> bool:
        return is_loopback_host(self.host)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def parse(cls, spec: str) -> "Target":
        """Parse ``NAME=HOST:PORT`` (IPv6 hosts in brackets: ``NAME=[::1]:7497``)."""
        name, sep, address = spec.partition("=")
        if not sep:
            raise ConfigError(f"invalid target {spec!r}: expected NAME=HOST:PORT, for example quotes=127.0.0.1:7497")
        host, port = parse_host_port(address, f"target {name!r}")
        return cls.create(name.strip(), host, port)

    @classmethod
    def create(cls, name: str, host: str, port: int, allow_remote: bool = False) -> "Target":
        if not TARGET_NAME.match(name):
            raise ConfigError(
                f"invalid target name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        if not host:
            raise ConfigError(f"target {name!r} needs a host")
        if not 1 <= port <= 65535:
            raise ConfigError(f"target {name!r}: port {port} is outside 1 to 65535")
        return cls(name, host, port, allow_remote)


def is_loopback_host(host: str) -> bool:
    """Tell whether ``host`` names this computer: ``localhost`` or a loopback address."""
    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def parse_host_port(address: str, what: str) -> tuple[str, int]:
    address = address.strip()
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"invalid address {address!r} for {what}: expected [IPV6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep:
            raise ConfigError(f"invalid address {address!r} for {what}: expected HOST:PORT")
        if ":" in host:
            raise ConfigError(f"invalid address {address!r} for {what}: put an IPv6 host in brackets, [::1]:PORT")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"invalid port {port_text!r} for {what}: expected a number from 1 to 65535") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"invalid port {port} for {what}: expected a number from 1 to 65535")
    return host, port


def validate_relay_url(url: str) -> str:
    """Return the relay URL without a trailing slash, or raise ConfigError."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ConfigError(f"invalid relay URL {url!r}: it must start with ws:// or wss://")
    if not parts.hostname:
        raise ConfigError(f"invalid relay URL {url!r}: it names no host")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"invalid relay URL {url!r}: the port is not a number from 0 to 65535") from None
    if parts.query or parts.fragment or parts.username:
        raise ConfigError(f"invalid relay URL {url!r}: leave out query, fragment and user name")
    return url


def default_device_name() -> str:
    name = re.sub(r"[^A-Za-z0-9 ._-]", "-", socket.gethostname())[:64].strip(" .-_")
    return name or "desktop"


@dataclass
class AgentConfig:
    relay_url: str = ""
    account: str = ""
    device: str = field(default_factory=default_device_name)
    targets: dict[str, Target] = field(default_factory=dict)
    # Heartbeat and resumption, in seconds.
    ping_interval: float = 15.0
    ping_timeout: float = 10.0
    grace: float = 120.0
    # Network: "system", "none" or "manual" proxy; the proxy password lives
    # in the OS keyring, never here.
    proxy_mode: str = "system"
    proxy_url: str = ""
    proxy_username: str = ""
    ca_file: str = ""
    pin_sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "relay_url": self.relay_url,
            "account": self.account,
            "device": self.device,
            "ping_interval": self.ping_interval,
            "ping_timeout": self.ping_timeout,
            "grace": self.grace,
            "proxy_mode": self.proxy_mode,
            "proxy_url": self.proxy_url,
            "proxy_username": self.proxy_username,
            "ca_file": self.ca_file,
            "pin_sha256": self.pin_sha256,
            "targets": [
                {"name": t.name, "host": t.host, "port": t.port, "allow_remote": t.allow_remote} for t in self.targets.values()
            ],
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> "AgentConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        config = cls()
        config.relay_url = str(data.get("relay_url", ""))
        config.account = str(data.get("account", ""))
        config.device = str(data.get("device") or default_device_name())
        try:
            validate_device_name(config.device)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}; change it there or pass --device") from None
        for name in ("ping_interval", "ping_timeout", "grace"):
            if name in data:
                try:
                    value = float(data[name])
                except (TypeError, ValueError):
                    raise ConfigError(f"{source}: '{name}' must be a number of seconds") from None
                setattr(config, name, validate_seconds(value, f"{source}: '{name}'", allow_zero=name == "grace"))
        for name in ("proxy_mode", "proxy_url", "proxy_username", "ca_file", "pin_sha256"):
            if name in data:
                if not isinstance(data[name], str):
                    raise ConfigError(f"{source}: '{name}' must be a string")
                setattr(config, name, data[name])
        if config.proxy_mode not in ("system", "none", "manual"):
            raise ConfigError(f"{source}: 'proxy_mode' must be system, none or manual, not {config.proxy_mode!r}")
        raw_targets = data.get("targets", [])
        if not isinstance(raw_targets, list):
            raise ConfigError(f"{source}: 'targets' must be a list")
        for item in raw_targets:
            try:
                target = Target.create(
                    str(item["name"]), str(item["host"]), int(item["port"]), bool(item.get("allow_remote", False))
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"{source}: invalid target entry {item!r}: {exc}") from None
            config.targets[target.name] = target
        return config


def config_path(config_dir: Path) -> Path:
    return config_dir / CONFIG_FILE


def load_config(config_dir: Path) -> AgentConfig:
    path = config_path(config_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return AgentConfig()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); fix or delete it") from None
    return AgentConfig.from_json(data, str(path))


def write_private_json(path: Path, data: Any) -> Path:
    """Write JSON atomically (a temporary file, then rename) with mode 0600; return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=2)
            file.write("\n")
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def save_config(config_dir: Path, config: AgentConfig) -> Path:
    """Write the config atomically with mode 0600 and return its path."""
    return write_private_json(config_path(config_dir), config.to_json())
