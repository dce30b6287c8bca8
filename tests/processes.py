"""Subprocesses for command-line tests: read their output lines and wait for one.

A reader thread per pipe collects lines as they arrive, so a test can wait
for a line with a timeout instead of sleeping. The ``spawn`` fixture stops
every process it started, by PID, when the test ends.
"""

from __future__ import annotations

import re
import signal
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
LINE_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class LineReader:
    """Lines of one text pipe, collected by a background thread."""

    def __init__(self, stream: IO[str], label: str) -> None:
        self.label = label
        self.lines: list[str] = []
        self.closed = False
        self._stream = stream
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._pump, name=f"read {label}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for raw in self._stream:
            with self._condition:
                self.lines.append(raw.rstrip("\r\n"))
                self._condition.notify_all()
        with self._condition:
            self.closed = True
            self._condition.notify_all()

    @property
    def text(self) -> str:
        # The condition's lock is an RLock, so wait_for may read this while holding it.
        with self._condition:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = LINE_TIMEOUT_S, occurrence: int = 1) -> re.Match[str]:
        """Return the match on the line that is the ``occurrence``-th to match ``pattern``.

        Raises AssertionError, with the output so far, when the pipe closes
        or ``timeout`` seconds pass first.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = 0
        seen = 0
        with self._condition:
            while True:
                while index < len(self.lines):
                    match = regex.search(self.lines[index])
                    index += 1
                    if match:
                        seen += 1
                        if seen == occurrence:
                            return match
                if self.closed:
                    raise AssertionError(
                        f"{self.label} closed after {seen} of {occurrence} lines matching {pattern!r}; output:\n{self.text}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{self.label} had {seen} of {occurrence} lines matching {pattern!r} after {timeout:.0f} s; output:\n{self.text}"
                    )
                self._condition.wait(remaining)

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        with self._condition:
            return sum(1 for line in self.lines if regex.search(line))

    def wait_closed(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Wait until every line up to the pipe's end of file is in ``lines``."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"{self.label} stayed open {timeout:.0f} s after the process exited")

    def close(self) -> None:
        """Wait for the pipe's end of file, then close the pipe. Call it after the process exited."""
        self._thread.join(STOP_TIMEOUT_S)
        self._stream.close()


class Child:
    """A subprocess with its stdout and stderr read line by line."""

    def __init__(self, args: Sequence[str], env: dict[str, str], stdin_text: str | None = None) -> None:
        self.args = list(args)
        self.process = subprocess.Popen(
            self.args,
            stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=REPO_ROOT,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        if stdin_text is not None:
            assert self.process.stdin is not None
            self.process.stdin.write(stdin_text)
            self.process.stdin.close()
        assert self.process.stdout is not None and self.process.stderr is not None
        name = " ".join(self.args[:4])
        self.stdout = LineReader(self.process.stdout, f"stdout of {name}")
        self.stderr = LineReader(self.process.stderr, f"stderr of {name}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def send_signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = LINE_TIMEOUT_S) -> int:
        """Wait for the exit and the last output line, then return the exit code.

        Raises AssertionError, with the output, if the process runs longer than ``timeout``.
        """
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.args} did not exit within {timeout:.0f} s; {self.output()}") from None
        self.stdout.wait_closed()
        self.stderr.wait_closed()
        return code

    def output(self) -> str:
        """Return both streams, for assertion messages."""
        return f"stdout:\n{self.stdout.text}\nstderr:\n{self.stderr.text}"

    def close(self) -> None:
        """Kill the process by PID if it still runs, then close its pipes."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(STOP_TIMEOUT_S)
        self.stdout.close()
        self.stderr.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., Child]]:
    """Start subprocesses; each is killed by PID, if still running, when the test ends."""
    children: list[Child] = []

    def start(args: Sequence[str], env: dict[str, str], stdin_text: str | None = None) -> Child:
        child = Child(args, env, stdin_text)
        children.append(child)
        return child

    yield start
    for child in children:
        child.close()


def python_module(module: str, *args: str) -> list[str]:
    """Return the command that runs ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def thread_echo_port() -> Iterator[int]:
    """A TCP echo server on 127.0.0.1, served from threads so synchronous tests can use it."""
    server = _EchoServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(STOP_TIMEOUT_S)
