"""One window per user and Deskbridge home: a second launch brings the first one forward.

The first instance listens on a QLocalServer whose name comes from the user
name and the config folder, so instances with different ``DESKBRIDGE_HOME``
folders run side by side. A later launch connects, sends one line and exits.
"""

from __future__ import annotations

import getpass
import hashlib
import logging

from PySide6.QtCore import QObject, Signal
from PySide6.QtNetwork import QAbstractSocket, QLocalServer, QLocalSocket

from app.core.paths import AppDirs

logger = logging.getLogger(__name__)

SHOW_MESSAGE = b"show\n"
CONNECT_TIMEOUT_MS = 1_000


def instance_key(dirs: AppDirs) -> str:
    """Return the local server name for this user and config folder."""
    folder = str(dirs.config.expanduser().resolve())
    digest = hashlib.sha256(f"{getpass.getuser()}\0{folder}".encode()).hexdigest()[:16]
    return f"deskbridge-{digest}"


def notify_running(key: str) -> bool:
    """Ask a running instance to show its window; return whether one accepted the request.

    This blocks for up to a second and runs before the event loop starts.
    """
    socket = QLocalSocket()
    socket.connectToServer(key)
    if not socket.waitForConnected(CONNECT_TIMEOUT_MS):
        return False
    socket.write(SHOW_MESSAGE)
    socket.flush()
    socket.waitForBytesWritten(CONNECT_TIMEOUT_MS)
    socket.disconnectFromServer()
    if socket.state() != QLocalSocket.LocalSocketState.UnconnectedState:
        socket.waitForDisconnected(CONNECT_TIMEOUT_MS)
    return True


class InstanceServer(QObject):
    """Listens for later launches and emits ``show_requested`` for each."""

    show_requested = Signal()

    def __init__(self, key: str, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.key = key
        self.server = QLocalServer(self)
        self.server.setSocketOptions(QLocalServer.SocketOption.UserAccessOption)
        self.server.newConnection.connect(self._accept)

    def listen(self) -> bool:
        """Start listening; a name left over from a crashed instance is removed first."""
        if self.server.listen(self.key):
            return True
        if self.server.serverError() == QAbstractSocket.SocketError.AddressInUseError:
            QLocalServer.removeServer(self.key)
            if self.server.listen(self.key):
                return True
        logger.warning("cannot listen for later launches on %s: %s", self.key, self.server.errorString())
        return False

    def _accept(self) -> None:
        while self.server.hasPendingConnections():
            connection = self.server.nextPendingConnection()
            connection.readyRead.connect(lambda connection=connection: self._read(connection))
            connection.disconnected.connect(connection.deleteLater)
            if connection.bytesAvailable():
                self._read(connection)

    def _read(self, connection: QLocalSocket) -> None:
        data = bytes(connection.readAll().data())
        if SHOW_MESSAGE.strip() in data:
            logger.info("another launch asked this instance to show its window")
            self.show_requested.emit()

    def close(self) -> None:
        self.server.close()
