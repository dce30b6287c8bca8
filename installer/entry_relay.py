"""Entry point of the frozen ``deskbridge-relay`` executable."""

import sys

from cloud_stub.cli import main

sys.exit(main())
