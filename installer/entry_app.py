"""Entry point of the frozen ``deskbridge`` (Deskbridge.exe, Deskbridge.app) executable."""

import sys

from app.cli import main

sys.exit(main())
