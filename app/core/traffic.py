"""Traffic records: what happened on each tunnel stream, as plain data.

Every stream produces OPENED first, then DATA and HALF_CLOSE records, and ends
with exactly one CLOSED or ERROR record. The headless agent logs them; the GUI
shows them in its traffic view. Producing a record costs little, and DATA
records are only built when the sink requests them.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import Protocol

# Maximum payload preview a DATA record keeps, in bytes.
PREVIEW_BYTES = 256


class Direction(enum.Enum):
    TO_DESKTOP = "to_desktop"
    TO_CLOUD = "to_cloud"

    @property
    def arrow(self) -> str:
        return "cloud → desktop" if self is Direction.TO_DESKTOP else "desktop → cloud"


class Kind(enum.Enum):
    OPENED = "opened"
    DATA = "data"
    HALF_CLOSE = "half_close"
    CLOSED = "closed"
    ERROR = "error"
    SESSION = "session"


@dataclass(frozen=True, slots=True)
class TrafficRecord:
    time: float
    kind: Kind
    stream_id: int
    target: str
    direction: Direction | None = None
    size: int = 0
    preview: bytes = b""
    detail: str = ""
    bytes_to_desktop: int = 0
    bytes_to_cloud: int = 0


class TrafficSink(Protocol):
    """Receives traffic records; ``wants_data`` tells whether DATA records are built."""

    wants_data: bool

    def record(self, item: TrafficRecord) -> None: ...


def now() -> float:
    return time.time()


class LoggingSink:
    """Logs stream lifecycles (not each chunk) to a logger."""

    wants_data = False

    def __init__(self, log: logging.Logger, prefix: str = "") -> None:
        self._log = log
        self._prefix = prefix

    def record(self, item: TrafficRecord) -> None:
        if item.kind is Kind.OPENED:
            self._log.info("%sstream %d to %r opened", self._prefix, item.stream_id, item.target)
        elif item.kind is Kind.HALF_CLOSE and item.direction is not None:
            self._log.debug("%sstream %d half-closed %s", self._prefix, item.stream_id, item.direction.arrow)
        elif item.kind is Kind.CLOSED:
            self._log.info(
                "%sstream %d to %r closed: %d bytes cloud → desktop, %d bytes desktop → cloud",
                self._prefix, item.stream_id, item.target, item.bytes_to_desktop, item.bytes_to_cloud,
            )
        elif item.kind is Kind.ERROR:
            self._log.warning(
                "%sstream %d to %r ended with an error after %d bytes cloud → desktop, %d bytes desktop → cloud: %s",
                self._prefix, item.stream_id, item.target, item.bytes_to_desktop, item.bytes_to_cloud, item.detail,
            )
