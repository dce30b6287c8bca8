"""Where Deskbridge keeps its config, data and logs.

``DESKBRIDGE_HOME`` moves all three under one folder (``config``, ``data``
and ``logs``), which keeps tests and portable installs isolated; otherwise
the OS conventions from platformdirs apply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "Deskbridge"
HOME_ENV = "DESKBRIDGE_HOME"


@dataclass(frozen=True, slots=True)
class AppDirs:
    config: Path
    data: Path
    logs: Path

    def create(self) -> "AppDirs":
        for folder in (self.config, self.data, self.logs):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self


def app_dirs() -> AppDirs:
    home = os.environ.get(HOME_ENV)
    if home:
        root = Path(home).expanduser()
        return AppDirs(root / "config", root / "data", root / "logs")
    return AppDirs(
        Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)),
        Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)),
        Path(platformdirs.user_log_dir(APP_NAME, appauthor=False)),
    )
