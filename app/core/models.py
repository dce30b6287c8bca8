"""Qt-free models behind the desktop window.

The GUI in ``app.gui`` only displays what these classes compute, so every
rule here runs and is tested without Qt:

- ``TrafficHistory`` is the traffic sink: a bounded list of traffic records
  with a counter of records dropped at the bound, byte totals and rates.
- ``TrafficRows`` is the filtered, bounded list of rows a table shows; it
  reads new records from the history in batches.
- ``TargetHealth`` keeps the latest probe result of each target.
- ``LogBuffer`` and ``BufferHandler`` keep the latest log lines for the log view.
- ``GuiSettings`` is the window's own settings file in the config folder.
- ``describe_status`` and ``notice_for`` turn agent states into display text.
"""

from __future__ import annotations

import collections
import enum
import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .agent import AgentState, AgentStatus
from .config import Target, write_private_json
from .traffic import PREVIEW_BYTES, Direction, Kind, TrafficRecord

DEFAULT_HISTORY_EVENTS = 100_000
MIN_HISTORY_EVENTS = 1_000
MAX_HISTORY_EVENTS = 1_000_000
DEFAULT_LOG_LINES = 5_000
# Rates are averaged over the samples of this many seconds.
RATE_WINDOW_S = 3.0
GUI_SETTINGS_FILE = "gui-settings.json"


# Traffic history --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrafficFilter:
    """A filter for the traffic records a view shows; empty fields match everything.

    ``text`` matches, case-insensitively, the target, the detail, the stream
    id and the payload preview decoded as UTF-8. A ``direction`` matches only
    DATA and HALF_CLOSE records, because the other kinds have no direction.
    """

    text: str = ""
    target: str | None = None
    direction: Direction | None = None

    @property
    def is_empty(self) -> bool:
        return not self.text and self.target is None and self.direction is None

    def matches(self, record: TrafficRecord) -> bool:
        if self.target is not None and record.target != self.target:
            return False
        if self.direction is not None and record.direction is not self.direction:
            return False
        if self.text:
            needle = self.text.casefold()
            haystack = " ".join((
                record.target,
                record.detail,
                str(record.stream_id),
                record.preview.decode("utf-8", "replace"),
            ))
            if needle not in haystack.casefold():
                return False
        return True


class TrafficHistory:
    """The latest traffic records, at most ``max_events`` of them; a ``TrafficSink``.

    ``record`` only appends and adds to counters, so it costs little on the
    event loop. Every record gets a sequence number; readers keep the next
    number they want and call ``read_since``. Records beyond the bound are
    dropped from the front and counted in ``dropped``.
    """

    wants_data = True

    def __init__(self, max_events: int = DEFAULT_HISTORY_EVENTS, clock: Callable[[], float] = time.monotonic) -> None:
        self._records: collections.deque[TrafficRecord] = collections.deque(maxlen=_check_bound(max_events))
        self.total = 0
        self.dropped = 0
        self.bytes_to_desktop = 0
        self.bytes_to_cloud = 0
        self.streams_opened = 0
        self.rates = RateMeter(clock)

    def __repr__(self) -> str:
        return f"<TrafficHistory {len(self._records)}/{self.max_events} dropped={self.dropped}>"

    def __len__(self) -> int:
        return len(self._records)

    @property
    def max_events(self) -> int:
        assert self._records.maxlen is not None
        return self._records.maxlen

    @property
    def first_seq(self) -> int:
        """Sequence number of the oldest record still kept."""
        return self.total - len(self._records)

    @property
    def targets(self) -> list[str]:
        return sorted({record.target for record in self._records})

    def record(self, item: TrafficRecord) -> None:
        if len(self._records) == self._records.maxlen:
            self.dropped += 1
        self._records.append(item)
        self.total += 1
        if item.kind is Kind.DATA:
            if item.direction is Direction.TO_DESKTOP:
                self.bytes_to_desktop += item.size
            else:
                self.bytes_to_cloud += item.size
        elif item.kind is Kind.OPENED:
            self.streams_opened += 1

    def read_since(self, seq: int) -> tuple[list[TrafficRecord], int]:
        """Return the records numbered ``seq`` and later, and how many of those were already dropped."""
        missed = max(0, self.first_seq - seq)
        wanted = min(len(self._records), self.total - max(seq, self.first_seq))
        if wanted <= 0:
            return [], missed
        # The newest records are at the right end, so read them from there.
        newest_first = list(itertools.islice(reversed(self._records), wanted))
        newest_first.reverse()
        return newest_first, missed

    def snapshot(self) -> list[TrafficRecord]:
        return list(self._records)

    def resize(self, max_events: int) -> None:
        """Change the bound; records beyond a smaller bound are dropped and counted."""
        max_events = _check_bound(max_events)
        excess = max(0, len(self._records) - max_events)
        self.dropped += excess
        self._records = collections.deque(itertools.islice(self._records, excess, None), maxlen=max_events)

    def clear(self) -> None:
        """Forget the records and the dropped counter; byte totals and rates stay."""
        self._records.clear()
        self.dropped = 0

    def sample_rates(self) -> Rates:
        return self.rates.sample(self.bytes_to_desktop, self.bytes_to_cloud)


def _check_bound(max_events: int) -> int:
    if not MIN_HISTORY_EVENTS <= max_events <= MAX_HISTORY_EVENTS:
        raise ValueError(f"history size {max_events} is outside {MIN_HISTORY_EVENTS} to {MAX_HISTORY_EVENTS} events")
    return max_events


@dataclass(frozen=True, slots=True)
class PendingRows:
    """New rows read from the history: first remove ``remove`` rows from the front, then append ``new``."""

    remove: int
    new: list[TrafficRecord]

    @property
    def changed(self) -> bool:
        return bool(self.remove or self.new)


class TrafficRows:
    """The rows of a traffic table: history records that match a filter, at most ``max_rows``.

    ``fetch`` reads every new record from the history in one batch and returns
    how the rows must change; a Qt model announces each step to its views
    before it calls ``remove_front`` and ``append``. ``pull`` does all three.
    """

    def __init__(self, history: TrafficHistory, max_rows: int | None = None) -> None:
        self.history = history
        self.max_rows = max_rows or history.max_events
        self.filter = TrafficFilter()
        self.rows: list[TrafficRecord] = []
        self._next_seq = history.first_seq

    def __len__(self) -> int:
        return len(self.rows)

    def fetch(self) -> PendingRows:
        new, _missed = self.history.read_since(self._next_seq)
        self._next_seq = self.history.total
        if not self.filter.is_empty:
            new = [record for record in new if self.filter.matches(record)]
        excess = len(self.rows) + len(new) - self.max_rows
        if excess <= 0:
            return PendingRows(0, new)
        remove = min(excess, len(self.rows))
        return PendingRows(remove, new[excess - remove:])

    def remove_front(self, count: int) -> None:
        del self.rows[:count]

    def append(self, records: list[TrafficRecord]) -> None:
        self.rows.extend(records)

    def pull(self) -> PendingRows:
        pending = self.fetch()
        self.remove_front(pending.remove)
        self.append(pending.new)
        return pending

    def set_filter(self, new_filter: TrafficFilter) -> None:
        """Apply a filter to every record the history still keeps."""
        self.filter = new_filter
        self.rebuild()

    def rebuild(self) -> None:
        records = self.history.snapshot()
        if not self.filter.is_empty:
            records = [record for record in records if self.filter.matches(record)]
        self.rows = records[-self.max_rows:]
        self._next_seq = self.history.total

    def clear(self) -> None:
        """Empty the rows; records that arrive later still show."""
        self.rows = []
        self._next_seq = self.history.total


# Rates --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rates:
    """Bytes per second each way, averaged over the last few seconds."""

    to_desktop: float = 0.0
    to_cloud: float = 0.0


class RateMeter:
    """Turns growing byte totals into rates, from samples taken about once a second."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window: float = RATE_WINDOW_S) -> None:
        self._clock = clock
        self._window = window
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()

    def sample(self, to_desktop: int, to_cloud: int) -> Rates:
        now = self._clock()
        self._samples.append((now, to_desktop, to_cloud))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window:
            self._samples.popleft()
        first_time, first_down, first_up = self._samples[0]
        elapsed = now - first_time
        if elapsed <= 0:
            return Rates()
        return Rates(max(0, to_desktop - first_down) / elapsed, max(0, to_cloud - first_up) / elapsed)


# Target health --------------------------------------------------------------------


class Health(enum.Enum):
    UNKNOWN = "unknown"
    REACHABLE = "reachable"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class TargetStatus:
    """The latest probe of one target: is its desktop application listening?"""

    target: Target
    health: Health = Health.UNKNOWN
    detail: str = ""
    checked_at: float | None = None

    @property
    def summary(self) -> str:
        if self.health is Health.REACHABLE:
            return "Reachable"
        if self.health is Health.UNREACHABLE:
            return "Not reachable"
        return "Checking…"

    @property
    def advice(self) -> str:
        if self.health is Health.UNREACHABLE:
            return (
                f"Nothing is listening on {self.target.address}. "
                f"Start the application for {self.target.name!r} and log in to it."
            )
        return ""


class TargetHealth:
    """Probe results for every target in the allowlist."""

    def __init__(self, targets: Iterable[Target] = ()) -> None:
        self.statuses: dict[str, TargetStatus] = {}
        self.set_targets(targets)

    def set_targets(self, targets: Iterable[Target]) -> None:
        """Replace the target list, keeping results of targets whose address did not change."""
        previous = self.statuses
        self.statuses = {}
        for target in targets:
            old = previous.get(target.name)
            self.statuses[target.name] = old if old is not None and old.target == target else TargetStatus(target)

    def update(self, name: str, reachable: bool, detail: str, checked_at: float) -> bool:
        """Store a probe result; return whether the target's health changed."""
        old = self.statuses.get(name)
        if old is None:
            return False
        health = Health.REACHABLE if reachable else Health.UNREACHABLE
        self.statuses[name] = replace(old, health=health, detail=detail, checked_at=checked_at)
        return old.health is not health or old.detail != detail

    def __iter__(self) -> Any:
        return iter(self.statuses.values())


# Connection state as shown to the person --------------------------------------------


class ViewState(enum.Enum):
    SIGNED_OUT = "signed_out"
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class StatusView:
    state: ViewState
    title: str
    detail: str = ""


def describe_status(status: AgentStatus, now: float, problem: str = "", error: str = "") -> StatusView:
    """Word an agent status for the window; ``problem`` is the last connection failure.

    ``error`` is a failure outside the agent that stops it, such as an
    unusable keyring; it wins over the agent's own state.
    """
    if error:
        return StatusView(ViewState.ERROR, "Error", error)
    state = status.state
    if state is AgentState.CONNECTED:
        return StatusView(ViewState.CONNECTED, "Connected")
    if state is AgentState.CONNECTING:
        return StatusView(ViewState.CONNECTING, "Connecting…", problem or status.detail)
    if state is AgentState.WAITING:
        seconds = max(1, math.ceil((status.retry_at or now) - now))
        return StatusView(ViewState.RECONNECTING, f"Reconnecting in {seconds} s", problem or status.detail)
    if state is AgentState.SIGNED_OUT:
        return StatusView(ViewState.SIGNED_OUT, "Signed out", status.detail or "Sign in to connect.")
    return StatusView(ViewState.DISCONNECTED, "Disconnected", status.detail or "Press Connect to connect to the relay.")


@dataclass(frozen=True, slots=True)
class Notice:
    title: str
    message: str


def notice_for(previous: ViewState | None, current: StatusView, *, was_connected: bool) -> Notice | None:
    """Return the desktop notification for a change of state, or None.

    The person hears when the connection drops, when it comes back after a
    drop (``was_connected`` is whether it had been up before) and when a
    sign-in is needed. Starting up and a Disconnect they asked for stay quiet.
    """
    state = current.state
    if state is previous:
        return None
    if previous is ViewState.CONNECTED and state in (ViewState.RECONNECTING, ViewState.CONNECTING, ViewState.ERROR):
        return Notice("Connection lost", current.detail or "Deskbridge lost the connection to the relay and is reconnecting.")
    if state is ViewState.CONNECTED and was_connected:
        return Notice("Connected again", "Deskbridge is connected to the relay again.")
    if state is ViewState.SIGNED_OUT:
        return Notice("Sign-in needed", current.detail or "Sign in to the relay to connect.")
    return None


# App log buffer --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogLine:
    level: int
    text: str


class LogBuffer:
    """The latest formatted log lines; safe to write from any thread."""

    def __init__(self, max_lines: int = DEFAULT_LOG_LINES) -> None:
        self.max_lines = max_lines
        self._lines: collections.deque[LogLine] = collections.deque(maxlen=max_lines)
        self._lock = threading.Lock()
        self.total = 0

    def append(self, line: LogLine) -> None:
        with self._lock:
            self._lines.append(line)
            self.total += 1

    def read_since(self, seq: int) -> tuple[list[LogLine], int]:
        """Return the lines numbered ``seq`` and later, and the number to ask for next time."""
        with self._lock:
            first = self.total - len(self._lines)
            start = max(seq, first)
            lines = list(itertools.islice(self._lines, start - first, None))
            return lines, self.total

    def lines(self, min_level: int = logging.NOTSET) -> list[LogLine]:
        with self._lock:
            return [line for line in self._lines if line.level >= min_level]


class BufferHandler(logging.Handler):
    """A logging handler that feeds a ``LogBuffer`` with the log file's line format."""

    def __init__(self, buffer: LogBuffer, formatter: logging.Formatter) -> None:
        super().__init__(logging.NOTSET)
        self.buffer = buffer
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.buffer.append(LogLine(record.levelno, self.format(record)))
        except Exception:
            self.handleError(record)


class ProblemTracker(logging.Handler):
    """Keeps the message of the latest WARNING or ERROR from the agent's loggers.

    The agent logs why a connection attempt failed, and its status only
    reports when it retries, so the window shows this message as the reason.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.message = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.message = record.getMessage()
        except Exception:
            self.handleError(record)

    def clear(self) -> None:
        self.message = ""


# Window settings ---------------------------------------------------------------------


@dataclass
class GuiSettings:
    """Settings of the desktop window; the agent's own settings are in ``AgentConfig``."""

    remember_sign_in: bool = True
    start_at_login: bool = False
    notifications: bool = True
    history_events: int = DEFAULT_HISTORY_EVENTS
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.extra,
            "remember_sign_in": self.remember_sign_in,
            "start_at_login": self.start_at_login,
            "notifications": self.notifications,
            "history_events": self.history_events,
        }

    @classmethod
    def from_json(cls, data: Any) -> "GuiSettings":
        """Read settings, replacing each missing or invalid value with its default."""
        settings = cls()
        if not isinstance(data, dict):
            return settings
        known = {"remember_sign_in", "start_at_login", "notifications", "history_events"}
        settings.extra = {key: value for key, value in data.items() if key not in known}
        for name in ("remember_sign_in", "start_at_login", "notifications"):
            value = data.get(name)
            if isinstance(value, bool):
                setattr(settings, name, value)
        events = data.get("history_events")
        if isinstance(events, int) and not isinstance(events, bool) and MIN_HISTORY_EVENTS <= events <= MAX_HISTORY_EVENTS:
            settings.history_events = events
        return settings


def load_gui_settings(config_dir: Path) -> GuiSettings:
    """Read the window settings; a missing or unreadable file gives the defaults."""
    path = config_dir / GUI_SETTINGS_FILE
    try:
        return GuiSettings.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return GuiSettings()
    except (OSError, ValueError) as exc:
        logging.getLogger(__name__).warning("cannot read %s (%s); using default window settings", path, exc)
        return GuiSettings()


def save_gui_settings(config_dir: Path, settings: GuiSettings) -> Path:
    """Write the window settings atomically, readable only by the owner, and return the path."""
    return write_private_json(config_dir / GUI_SETTINGS_FILE, settings.to_json())


# Formatting -----------------------------------------------------------------------------


def hex_dump(data: bytes, width: int = 16) -> str:
    """Format bytes as offset, hex and printable ASCII columns, ``width`` bytes a line."""
    lines = []
    for offset in range(0, len(data), width):
        chunk = data[offset:offset + width]
        hex_part = " ".join(f"{byte:02x}" for byte in chunk)
        text_part = "".join(chr(byte) if 0x20 <= byte < 0x7F else "." for byte in chunk)
        lines.append(f"{offset:08x}  {hex_part:<{width * 3 - 1}}  {text_part}")
    return "\n".join(lines)


def preview_text(data: bytes, limit: int = 80) -> str:
    """Return a one-line text preview: UTF-8, with control characters shown as escapes."""
    text = data.decode("utf-8", "replace")
    escaped = text.encode("unicode_escape").decode("ascii", "replace") if not text.isprintable() else text
    return escaped if len(escaped) <= limit else escaped[:limit - 1] + "…"


def format_bytes(count: float) -> str:
    """Format a byte count with binary units: 512 B, 1.5 KiB, 12.0 MiB."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_rate(bytes_per_second: float) -> str:
    return f"{format_bytes(bytes_per_second)}/s"


def format_duration(seconds: float) -> str:
    """Format a duration as H:MM:SS, with days in front when longer than one."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days} d {clock}" if days else clock


KIND_LABELS = {
    Kind.OPENED: "Opened",
    Kind.DATA: "Data",
    Kind.HALF_CLOSE: "Half-close",
    Kind.CLOSED: "Closed",
    Kind.ERROR: "Error",
    Kind.SESSION: "Session",
}


def describe_record(record: TrafficRecord) -> str:
    """Return the preview column's text for a record."""
    if record.kind is Kind.DATA:
        return preview_text(record.preview)
    if record.kind is Kind.HALF_CLOSE and record.direction is not None:
        return f"no more data {record.direction.arrow}"
    if record.kind in (Kind.CLOSED, Kind.ERROR):
        totals = (
            f"{format_bytes(record.bytes_to_desktop)} cloud → desktop, "
            f"{format_bytes(record.bytes_to_cloud)} desktop → cloud"
        )
        return f"{record.detail} ({totals})" if record.detail else totals
    return record.detail


# Export -----------------------------------------------------------------------------------


def record_to_json(record: TrafficRecord) -> dict[str, Any]:
    """Return one traffic record as a JSON object; the payload preview is in hex and as text."""
    item: dict[str, Any] = {
        "time": datetime.fromtimestamp(record.time, timezone.utc).isoformat(timespec="milliseconds"),
        "kind": record.kind.value,
        "stream": record.stream_id,
        "target": record.target,
        "direction": record.direction.value if record.direction is not None else None,
        "bytes": record.size,
    }
    if record.kind is Kind.DATA:
        item["preview_hex"] = record.preview.hex()
        item["preview_text"] = record.preview.decode("utf-8", "replace")
        item["preview_complete"] = len(record.preview) >= record.size
    if record.detail:
        item["detail"] = record.detail
    if record.kind in (Kind.CLOSED, Kind.ERROR):
        item["bytes_to_desktop"] = record.bytes_to_desktop
        item["bytes_to_cloud"] = record.bytes_to_cloud
    return item


def export_jsonl(records: Sequence[TrafficRecord], path: Path) -> int:
    """Write records to ``path`` as JSON Lines, one object a line; return the number written.

    Payload previews hold at most ``PREVIEW_BYTES`` bytes of each chunk.
    """
    with open(path, "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record_to_json(record), ensure_ascii=False))
            file.write("\n")
    return len(records)

