"""Logging set-up shared by the agent, the relay and the demo.

Levels: DEBUG is per-frame and per-chunk detail; INFO is a session or stream
starting or ending; WARNING is a failure Deskbridge recovers from on its own
(a lost connection, a refused target); ERROR needs the person to act (signed
out, bad configuration).
"""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LOG_FILE_BYTES = 5 * 1024 * 1024
LOG_FILE_COUNT = 5


def configure_logging(level: str = "INFO", log_dir: Path | None = None, file_name: str = "deskbridge.log") -> Path | None:
    """Send log records to stderr and, if ``log_dir`` is given, to a rotating file."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    formatter = logging.Formatter(LOG_FORMAT)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stream = logging.StreamHandler()
    stream.setFormatter(formatter)
    root.addHandler(stream)
    path = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = log_dir / file_name
        file_handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_COUNT, encoding="utf-8"
        )
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    # websockets logs every connection at INFO; ours already do.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, root.level))
    return path
