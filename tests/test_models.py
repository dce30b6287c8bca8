"""The Qt-free models behind the window: history, rows, rates, health, settings, wording."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading

import pytest

from app.core.agent import AgentState, AgentStatus
from app.core.config import Target
from app.core.logs import LOG_FORMAT
from app.core.models import (
    BufferHandler,
    GuiSettings,
    Health,
    LogBuffer,
    ProblemTracker,
    RateMeter,
    TargetHealth,
    TrafficFilter,
    TrafficHistory,
    TrafficRows,
    ViewState,
    describe_record,
    describe_status,
    export_jsonl,
    format_bytes,
    format_duration,
    hex_dump,
    load_gui_settings,
    notice_for,
    preview_text,
    save_gui_settings,
)
from app.core.traffic import Direction, Kind, TrafficRecord
from tests.processes import REPO_ROOT


def data(stream: int, size: int, direction: Direction = Direction.TO_DESKTOP, target: str = "redis", preview: bytes = b"") -> TrafficRecord:
    return TrafficRecord(1_700_000_000.0, Kind.DATA, stream, target, direction, size, preview or b"x" * min(size, 16))


def opened(stream: int, target: str = "redis") -> TrafficRecord:
    return TrafficRecord(1_700_000_000.0, Kind.OPENED, stream, target)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# TrafficHistory -----------------------------------------------------------------


def test_history_counts_bytes_each_way():
    history = TrafficHistory()
    history.record(opened(1))
    history.record(data(1, 10, Direction.TO_DESKTOP))
    history.record(data(1, 7, Direction.TO_CLOUD))
    history.record(data(1, 5, Direction.TO_DESKTOP))

    assert history.bytes_to_desktop == 15
    assert history.bytes_to_cloud == 7
    assert history.streams_opened == 1
    assert len(history) == 4


def test_history_drops_oldest_at_bound():
    history = TrafficHistory(max_events=1_000)
    for index in range(1_500):
        history.record(data(index, 1))

    assert len(history) == 1_000
    assert history.dropped == 500
    assert history.total == 1_500
    assert history.snapshot()[0].stream_id == 500


def test_history_read_since_reports_missed():
    history = TrafficHistory(max_events=1_000)
    for index in range(1_200):
        history.record(data(index, 1))

    records, missed = history.read_since(0)

    assert missed == 200
    assert [r.stream_id for r in records[:2]] == [200, 201]
    assert len(records) == 1_000


def test_history_read_since_only_new():
    history = TrafficHistory()
    for index in range(5):
        history.record(data(index, 1))

    records, missed = history.read_since(3)

    assert [r.stream_id for r in records] == [3, 4]
    assert missed == 0
    assert history.read_since(5) == ([], 0)


def test_history_resize_counts_dropped():
    history = TrafficHistory(max_events=2_000)
    for index in range(1_500):
        history.record(data(index, 1))

    history.resize(1_000)

    assert len(history) == 1_000
    assert history.dropped == 500
    assert history.snapshot()[0].stream_id == 500


def test_history_rejects_tiny_bound():
    with pytest.raises(ValueError, match="outside"):
        TrafficHistory(max_events=10)


def test_history_clear_keeps_totals():
    history = TrafficHistory(max_events=1_000)
    for index in range(1_100):
        history.record(data(index, 2))

    history.clear()

    assert len(history) == 0
    assert history.dropped == 0
    assert history.bytes_to_desktop == 2_200
    assert history.read_since(history.total) == ([], 0)


# TrafficFilter and TrafficRows -------------------------------------------------------


def test_filter_matches_text_target_direction():
    record = data(7, 5, Direction.TO_CLOUD, "quotes", b"QUOTE AAPL 231.40\n")

    assert TrafficFilter().matches(record)
    assert TrafficFilter(text="aapl").matches(record)
    assert not TrafficFilter(text="msft").matches(record)
    assert TrafficFilter(target="quotes").matches(record)
    assert not TrafficFilter(target="redis").matches(record)
    assert TrafficFilter(direction=Direction.TO_CLOUD).matches(record)
    assert not TrafficFilter(direction=Direction.TO_DESKTOP).matches(record)
    assert TrafficFilter(text="7").matches(record)


def test_filter_direction_skips_lifecycle_events():
    assert not TrafficFilter(direction=Direction.TO_DESKTOP).matches(opened(1))


def test_rows_pull_in_batches():
    history = TrafficHistory()
    rows = TrafficRows(history)
    for index in range(3):
        history.record(data(index, 1))

    first = rows.pull()
    second = rows.pull()
    history.record(data(3, 1))
    third = rows.pull()

    assert (first.remove, len(first.new)) == (0, 3)
    assert not second.changed
    assert (third.remove, len(third.new)) == (0, 1)
    assert [r.stream_id for r in rows.rows] == [0, 1, 2, 3]


def test_rows_trim_front_at_bound():
    history = TrafficHistory(max_events=1_000)
    rows = TrafficRows(history, max_rows=1_000)
    for index in range(800):
        history.record(data(index, 1))
    rows.pull()
    for index in range(800, 1_100):
        history.record(data(index, 1))

    update = rows.pull()

    assert update.remove == 100
    assert len(update.new) == 300
    assert len(rows) == 1_000
    assert rows.rows[0].stream_id == 100


def test_rows_batch_larger_than_bound():
    history = TrafficHistory(max_events=1_000)
    rows = TrafficRows(history, max_rows=1_000)
    for index in range(10):
        history.record(data(index, 1))
    rows.pull()
    for index in range(10, 3_000):
        history.record(data(index, 1))

    update = rows.pull()

    assert update.remove == 10
    assert len(update.new) == 1_000
    assert rows.rows[0].stream_id == 2_000
    assert rows.rows[-1].stream_id == 2_999


def test_rows_filter_applies_to_new_and_old():
    history = TrafficHistory()
    rows = TrafficRows(history)
    history.record(data(1, 1, target="redis"))
    history.record(data(2, 1, target="quotes"))
    rows.pull()

    rows.set_filter(TrafficFilter(target="quotes"))
    history.record(data(3, 1, target="redis"))
    history.record(data(4, 1, target="quotes"))
    rows.pull()

    assert [r.stream_id for r in rows.rows] == [2, 4]


def test_rows_clear_keeps_later_records():
    history = TrafficHistory()
    rows = TrafficRows(history)
    history.record(data(1, 1))
    rows.pull()

    rows.clear()
    history.record(data(2, 1))
    rows.pull()

    assert [r.stream_id for r in rows.rows] == [2]


# Rates ------------------------------------------------------------------------------


def test_rate_meter_averages_window():
    clock = FakeClock()
    meter = RateMeter(clock, window=3.0)
    assert meter.sample(0, 0).to_desktop == 0

    clock.now += 1
    rates = meter.sample(1_000, 500)

    assert rates.to_desktop == pytest.approx(1_000)
    assert rates.to_cloud == pytest.approx(500)


def test_rate_meter_forgets_old_samples():
    clock = FakeClock()
    meter = RateMeter(clock, window=2.0)
    meter.sample(0, 0)
    for second in range(1, 11):
        clock.now += 1
        rates = meter.sample(second * 100, 0)
    clock.now += 1
    rates = meter.sample(1_000, 0)

    assert rates.to_desktop == pytest.approx(0, abs=60)


# Target health -------------------------------------------------------------------------


def test_health_update_reports_changes():
    target = Target("redis", "127.0.0.1", 6379)
    health = TargetHealth([target])

    assert health.statuses["redis"].health is Health.UNKNOWN
    assert health.update("redis", False, "refused", 1.0)
    assert not health.update("redis", False, "refused", 2.0)
    assert health.update("redis", True, "listening", 3.0)
    assert health.statuses["redis"].health is Health.REACHABLE
    assert not health.update("unknown-target", True, "", 4.0)


def test_health_advice_names_target():
    target = Target("quotes", "127.0.0.1", 7497)
    health = TargetHealth([target])
    health.update("quotes", False, "connection refused", 1.0)
    status = health.statuses["quotes"]

    assert status.summary == "Not reachable"
    assert "127.0.0.1:7497" in status.advice
    assert "log in to it" in status.advice


def test_health_keeps_unchanged_targets():
    redis = Target("redis", "127.0.0.1", 6379)
    health = TargetHealth([redis])
    health.update("redis", True, "listening", 1.0)

    health.set_targets([redis, Target("quotes", "127.0.0.1", 7497)])
    kept = health.statuses["redis"].health
    health.set_targets([Target("redis", "127.0.0.1", 6380)])

    assert kept is Health.REACHABLE
    assert health.statuses["redis"].health is Health.UNKNOWN
    assert list(health.statuses) == ["redis"]


# Status wording and notifications ---------------------------------------------------------


def test_describe_waiting_counts_down():
    """The countdown rounds up, so it reads 1 s and never 0 s until the retry starts."""
    status = AgentStatus(AgentState.WAITING, "reconnecting in 4.0 s", retry_at=103.8)

    view = describe_status(status, now=100.0, problem="cannot reach relay: connection refused")

    assert view.state is ViewState.RECONNECTING
    assert view.title == "Reconnecting in 4 s"
    assert view.detail == "cannot reach relay: connection refused"
    assert describe_status(AgentStatus(AgentState.WAITING, retry_at=100.2), now=100.0).title == "Reconnecting in 1 s"


def test_describe_error_wins():
    view = describe_status(AgentStatus(AgentState.CONNECTED), now=0.0, error="keyring locked")

    assert view.state is ViewState.ERROR
    assert view.detail == "keyring locked"


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (AgentState.CONNECTED, ViewState.CONNECTED),
        (AgentState.CONNECTING, ViewState.CONNECTING),
        (AgentState.SIGNED_OUT, ViewState.SIGNED_OUT),
        (AgentState.STOPPED, ViewState.DISCONNECTED),
    ],
)
def test_describe_maps_states(state, expected):
    assert describe_status(AgentStatus(state), now=0.0).state is expected


def test_notice_on_drop_and_return():
    lost = describe_status(AgentStatus(AgentState.WAITING, retry_at=5.0), now=0.0, problem="relay closed")
    back = describe_status(AgentStatus(AgentState.CONNECTED), now=0.0)

    drop = notice_for(ViewState.CONNECTED, lost, was_connected=True)
    again = notice_for(ViewState.RECONNECTING, back, was_connected=True)

    assert drop is not None and drop.title == "Connection lost"
    assert drop.message == "relay closed"
    assert again is not None and again.title == "Connected again"


def test_notice_quiet_at_first_connect():
    connecting = describe_status(AgentStatus(AgentState.CONNECTING), now=0.0)
    connected = describe_status(AgentStatus(AgentState.CONNECTED), now=0.0)
    stopped = describe_status(AgentStatus(AgentState.STOPPED), now=0.0)

    assert notice_for(None, connecting, was_connected=False) is None
    assert notice_for(ViewState.CONNECTING, connected, was_connected=False) is None
    assert notice_for(ViewState.CONNECTED, stopped, was_connected=True) is None


def test_notice_sign_in_needed():
    signed_out = describe_status(AgentStatus(AgentState.SIGNED_OUT, "token revoked"), now=0.0)

    notice = notice_for(ViewState.CONNECTED, signed_out, was_connected=True)

    assert notice is not None
    assert notice.title == "Sign-in needed"
    assert notice.message == "token revoked"


# Log buffer -------------------------------------------------------------------------------


def test_log_buffer_formats_like_file():
    buffer = LogBuffer(max_lines=10)
    handler = BufferHandler(buffer, logging.Formatter(LOG_FORMAT))
    log = logging.getLogger("deskbridge.test-models")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        log.info("hello %s", "world")
        log.debug("detail")
    finally:
        log.removeHandler(handler)

    lines, next_seq = buffer.read_since(0)

    assert next_seq == 2
    assert lines[0].text.endswith("INFO    deskbridge.test-models: hello world")
    assert [line.level for line in lines] == [logging.INFO, logging.DEBUG]
    assert [line.text for line in buffer.lines(logging.INFO)] == [lines[0].text]


def test_log_buffer_bounded_across_threads():
    buffer = LogBuffer(max_lines=100)
    handler = BufferHandler(buffer, logging.Formatter("%(message)s"))

    def write(prefix: str) -> None:
        for index in range(500):
            handler.handle(logging.makeLogRecord({"msg": f"{prefix}{index}", "levelno": logging.INFO}))

    threads = [threading.Thread(target=write, args=(name,)) for name in "abcd"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    lines, next_seq = buffer.read_since(0)
    assert next_seq == 2_000
    assert len(lines) == 100
    assert buffer.read_since(1_990)[0] == lines[-10:]


def test_problem_tracker_keeps_latest_warning():
    tracker = ProblemTracker()
    log = logging.getLogger("deskbridge.test-problem")
    log.addHandler(tracker)
    try:
        log.warning("cannot reach relay %s: %s", "ws://x", "connection refused")
        log.info("not a problem")
    finally:
        log.removeHandler(tracker)

    assert tracker.message == "cannot reach relay ws://x: connection refused"


# Window settings -------------------------------------------------------------------------


def test_gui_settings_round_trip(tmp_path):
    settings = GuiSettings(remember_sign_in=False, start_at_login=True, notifications=False, history_events=5_000)
    path = save_gui_settings(tmp_path, settings)

    loaded = load_gui_settings(tmp_path)

    assert loaded == settings
    assert path.stat().st_mode & 0o777 == 0o600


def test_gui_settings_ignore_invalid(tmp_path):
    (tmp_path / "gui-settings.json").write_text(
        json.dumps({"notifications": "yes", "history_events": 3, "future_option": 1}), encoding="utf-8"
    )

    loaded = load_gui_settings(tmp_path)

    assert loaded.notifications is True
    assert loaded.history_events == 100_000
    assert loaded.to_json()["future_option"] == 1


def test_gui_settings_broken_file(tmp_path, caplog):
    (tmp_path / "gui-settings.json").write_text("{not json", encoding="utf-8")

    assert load_gui_settings(tmp_path) == GuiSettings()
    assert "using default window settings" in caplog.text


# Formatting and export -----------------------------------------------------------------------


def test_hex_dump_columns():
    dump = hex_dump(b"PING\r\n" + bytes(range(12)))

    first, second = dump.splitlines()
    assert first.startswith("00000000  50 49 4e 47 0d 0a 00 01")
    assert first.endswith("PING............")
    assert second.startswith("00000010  0a 0b")


def test_preview_text_escapes_controls():
    assert preview_text(b"+PONG\r\n") == "+PONG\\r\\n"
    assert preview_text(b"plain") == "plain"
    assert preview_text(b"a" * 100, limit=10) == "aaaaaaaaa…"


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (100 * 1024 * 1024, "100.0 MiB"), (3 * 1024**4, "3072.0 GiB")],
)
def test_format_bytes_units(count, text):
    assert format_bytes(count) == text


def test_format_duration_days():
    assert format_duration(59) == "0:00:59"
    assert format_duration(3_723) == "1:02:03"
    assert format_duration(90_061) == "1 d 1:01:01"


def test_describe_record_kinds():
    half = TrafficRecord(0.0, Kind.HALF_CLOSE, 1, "redis", Direction.TO_CLOUD)
    closed = TrafficRecord(0.0, Kind.CLOSED, 1, "redis", bytes_to_desktop=14, bytes_to_cloud=7)
    error = TrafficRecord(0.0, Kind.ERROR, 1, "redis", detail="connection refused")

    assert describe_record(half) == "no more data desktop → cloud"
    assert describe_record(closed) == "14 B cloud → desktop, 7 B desktop → cloud"
    assert describe_record(error).startswith("connection refused (")


def test_export_jsonl_lines(tmp_path):
    records = [opened(1), data(1, 300, Direction.TO_CLOUD, preview=b"+PONG\r\n")]
    path = tmp_path / "traffic.jsonl"

    count = export_jsonl(records, path)

    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert count == 2
    assert lines[0]["kind"] == "opened"
    assert lines[0]["direction"] is None
    assert lines[1]["direction"] == "to_cloud"
    assert lines[1]["bytes"] == 300
    assert bytes.fromhex(lines[1]["preview_hex"]) == b"+PONG\r\n"
    assert lines[1]["preview_complete"] is False
    assert lines[1]["time"].startswith("2023-11-14T22:13:20.000")


# Layering --------------------------------------------------------------------------------------


def test_core_imports_no_qt():
    """The core, its models and the relay must import without Qt or qasync."""
    code = (
        "import sys, pkgutil, importlib, app.core, cloud_stub\n"
        "for package in (app.core, cloud_stub):\n"
        "    for info in pkgutil.iter_modules(package.__path__, package.__name__ + '.'):\n"
        "        if not info.name.endswith('.__main__'):\n"
        "            importlib.import_module(info.name)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('PySide6', 'shiboken6', 'qasync', 'PyQt5', 'PyQt6'))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
