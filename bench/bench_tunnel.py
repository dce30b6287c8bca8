"""Measure the tunnel against direct TCP: throughput, latency, concurrency, memory.

Run it from the repository root with ``.venv/bin/python bench/bench_tunnel.py``
(or ``make bench``). One run starts four processes on 127.0.0.1, so that they
share the machine's cores as they would in production:

- a server process (this script with ``--serve``) that plays the desktop
  application: an upload sink, a download source and an echo service;
- the relay (``python -m cloud_stub``), exposing the server's target on a TCP port;
- the agent (``python -m app run --headless --password-stdin``), with
  ``DESKBRIDGE_HOME`` in a temporary folder;
- this process, the cloud client, which runs every measurement twice: once
  straight to the server (direct TCP) and once through the relay's port.

It prints each figure, the tunnel's ratio to direct TCP and whether the
target is met, plus the resident memory (VmRSS, VmHWM from /proc) and CPU
time of the relay and the agent. Every loop is bounded in count and time. A
default run takes about 15 s on 2 CPUs and is stopped after RUN_TIMEOUT_S.
With ``--check`` the exit status is 3 when a target is not met. Results are
recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CHUNK = 64 * 1024
ECHO_SIZE = 64
MIB = 1024 * 1024

ACCOUNT = "bench"
PASSWORD = "bench-password-not-secret"
API_KEY = "bench-api-key-not-secret"
DEVICE = "bench-desktop"
TARGET = "bench"

# Modes of the server process: the first byte a client sends picks one.
MODE_UPLOAD = b"U"  # read until EOF, then reply with the byte count (u64)
MODE_DOWNLOAD = b"D"  # followed by a u64 size: send that many bytes, then close
MODE_ECHO = b"E"  # send back every byte received

# Time limits, so that a stuck tunnel ends the run instead of hanging it.
IO_TIMEOUT_S = 60.0
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
MEASURE_TIMEOUT_S = 120.0
# The whole run, from starting the processes to the report.
RUN_TIMEOUT_S = 600
# How often resident memory is sampled while the concurrent connections run.
MEMORY_SAMPLE_S = 0.1
# Connections are opened in batches of this size, with a memory sample after each.
OPEN_BATCH = 50

# Targets (docs/benchmarks.md): ratios of the tunnel to direct TCP, a latency
# bound and a memory bound.
MIN_THROUGHPUT_RATIO = 0.40
MAX_ROUND_TRIP_P50_RATIO = 2.5
MAX_CONCURRENT_TIME_RATIO = 4.0
MAX_CONCURRENT_P99_MS = 20.0
MAX_PROCESS_MIB = 60.0


class BenchError(Exception):
    """A measurement could not complete; the message names the measurement and the reason."""


# The server process ------------------------------------------------------------


class _ServerConnection(asyncio.Protocol):
    """One client connection of the server process; the first byte picks its mode."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.mode = b""
        self.header = bytearray()
        self.received = 0
        self.to_send = 0
        self.paused = False
        self.block = memoryview(os.urandom(CHUNK))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.mode:
            self.mode, data = data[:1], data[1:]
        if self.mode == MODE_ECHO:
            self.transport.write(data)
        elif self.mode == MODE_UPLOAD:
            self.received += len(data)
        elif self.mode == MODE_DOWNLOAD:
            self.header += data
            if len(self.header) >= 8 and not self.to_send:
                self.to_send = int.from_bytes(self.header[:8], "big")
                self._send_more()
        else:
            self.transport.abort()

    def eof_received(self) -> bool:
        assert self.transport is not None
        if self.mode == MODE_UPLOAD:
            self.transport.write(self.received.to_bytes(8, "big"))
        self.transport.close()
        return True

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._send_more()

    def _send_more(self) -> None:
        assert self.transport is not None
        while self.to_send > 0 and not self.paused:
            size = min(CHUNK, self.to_send)
            self.transport.write(self.block[:size])
            self.to_send -= size
        if self.to_send == 0:
            self.transport.close()


async def serve() -> None:
    """Run the server process until SIGTERM; print its port on the first line."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_ServerConnection, HOST, 0, backlog=512)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()


# Child processes ---------------------------------------------------------------


class Child:
    """A child process whose stdout and stderr go to files in the work folder."""

    def __init__(self, name: str, args: list[str], workdir: Path, env: dict[str, str], stdin_text: str | None = None) -> None:
        self.name = name
        self.stdout_path = workdir / f"{name}.out"
        self.stderr_path = workdir / f"{name}.err"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=REPO_ROOT,
                env=env,
            )
        if stdin_text is not None:
            assert self.process.stdin is not None
            self.process.stdin.write(stdin_text.encode())
            self.process.stdin.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return f"--- {self.name} stdout ---\n{self.stdout_path.read_text(errors='replace')}\n--- {self.name} stderr ---\n{self.stderr_path.read_text(errors='replace')}"

    def wait_for_line(self, pattern: str, *, stream: str = "stdout", timeout: float = START_TIMEOUT_S) -> re.Match[str]:
        """Poll the output file until a line matches ``pattern``; raise BenchError on exit or time-out."""
        path = self.stdout_path if stream == "stdout" else self.stderr_path
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = regex.search(path.read_text(errors="replace"))
            if match:
                return match
            if self.process.poll() is not None:
                raise BenchError(f"{self.name} exited with code {self.process.returncode} before printing {pattern!r}\n{self.output()}")
            time.sleep(0.05)
        raise BenchError(f"{self.name} did not print {pattern!r} within {timeout:.0f} s\n{self.output()}")

    def stop(self) -> None:
        """Send SIGTERM, then SIGKILL if the process is still running after STOP_TIMEOUT_S."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"{self.name} (PID {self.pid}) ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s; killing it", file=sys.stderr)
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)


@dataclass
class Memory:
    rss_mib: float
    hwm_mib: float


def read_memory(pid: int) -> Memory:
    """Return VmRSS and VmHWM of a process from /proc/PID/status."""
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return Memory(values["VmRSS"], values["VmHWM"])


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def read_cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time of a process from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name in brackets may contain spaces; fields follow the last ')'.
        fields = stat.read().rpartition(")")[2].split()
    # utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class TunnelProcesses:
    """The relay and agent of the tunnel under test, and the relay port that reaches the server."""

    relay: Child
    agent: Child
    port: int

    @property
    def pids(self) -> dict[str, int]:
        return {"relay": self.relay.pid, "agent": self.agent.pid}

    def cpu_seconds(self) -> dict[str, float]:
        return {name: read_cpu_seconds(pid) for name, pid in self.pids.items()}

    def memory(self) -> dict[str, Memory]:
        return {name: read_memory(pid) for name, pid in self.pids.items()}


def start_tunnel(workdir: Path, server_port: int) -> TunnelProcesses:
    """Start the relay and the agent and wait until the agent's session is up."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    relay = Child(
        "relay",
        [
            sys.executable, "-m", "cloud_stub",
            "--port", "0",
            "--user", f"{ACCOUNT}:{PASSWORD}",
            "--api-key", API_KEY,
            "--expose", f"{ACCOUNT}/{TARGET}=0",
            "--data-dir", str(workdir / "relay-data"),
        ],
        workdir,
        env,
    )
    agent: Child | None = None
    try:
        url = relay.wait_for_line(r"relay ready on (ws://\S+)").group(1)
        port = int(relay.wait_for_line(rf"exposed {ACCOUNT}/{TARGET} on port (\d+)").group(1))
        agent_env = {**env, "DESKBRIDGE_HOME": str(workdir / "agent-home")}
        agent = Child(
            "agent",
            [
                sys.executable, "-m", "app", "run", "--headless", "--password-stdin",
                "--relay", url,
                "--username", ACCOUNT,
                "--device", DEVICE,
                "--target", f"{TARGET}={HOST}:{server_port}",
            ],
            workdir,
            agent_env,
            stdin_text=PASSWORD + "\n",
        )
        agent.wait_for_line(r"connected to \S+ as device", stream="stderr")
    except BaseException:
        if agent is not None:
            agent.stop()
        relay.stop()
        raise
    return TunnelProcesses(relay, agent, port)


# Measurements --------------------------------------------------------------------


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=IO_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    parts = []
    remaining = size
    while remaining:
        part = sock.recv(remaining)
        if not part:
            raise BenchError(f"connection closed with {remaining} of {size} expected bytes missing")
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def measure_upload(port: int, total: int) -> float:
    """Send ``total`` bytes in 64 KiB writes; return MiB/s until the server confirmed the count."""
    block = memoryview(os.urandom(CHUNK))
    deadline = time.monotonic() + MEASURE_TIMEOUT_S
    with _connect(port) as sock:
        sock.sendall(MODE_UPLOAD)
        start = time.perf_counter()
        sent = 0
        while sent < total:
            sock.sendall(block)
            sent += CHUNK
            if time.monotonic() > deadline:
                raise BenchError(f"upload did not finish within {MEASURE_TIMEOUT_S:.0f} s ({sent} bytes sent)")
        sock.shutdown(socket.SHUT_WR)
        counted = int.from_bytes(_receive_exactly(sock, 8), "big")
        elapsed = time.perf_counter() - start
    if counted != sent:
        raise BenchError(f"upload: the server counted {counted} bytes, {sent} were sent")
    return sent / MIB / elapsed


def measure_download(port: int, total: int) -> float:
    """Receive ``total`` bytes that the server sends in 64 KiB writes; return MiB/s."""
    buffer = memoryview(bytearray(4 * CHUNK))
    deadline = time.monotonic() + MEASURE_TIMEOUT_S
    with _connect(port) as sock:
        start = time.perf_counter()
        sock.sendall(MODE_DOWNLOAD + total.to_bytes(8, "big"))
        received = 0
        while size := sock.recv_into(buffer):
            received += size
            if received > total or time.monotonic() > deadline:
                break
        elapsed = time.perf_counter() - start
    if received != total:
        raise BenchError(f"download: received {received} of {total} bytes within {MEASURE_TIMEOUT_S:.0f} s")
    return received / MIB / elapsed


def measure_round_trips(port: int, count: int, warmup: int) -> list[float]:
    """Send 64 bytes and wait for their echo ``count`` times; return each round trip in ms."""
    payload = os.urandom(ECHO_SIZE)
    samples: list[float] = []
    deadline = time.monotonic() + MEASURE_TIMEOUT_S
    with _connect(port) as sock:
        sock.sendall(MODE_ECHO)
        for index in range(warmup + count):
            start = time.perf_counter_ns()
            sock.sendall(payload)
            if _receive_exactly(sock, ECHO_SIZE) != payload:
                raise BenchError("round trip: the echo differs from what was sent")
            if index >= warmup:
                samples.append((time.perf_counter_ns() - start) / 1e6)
            if time.monotonic() > deadline:
                raise BenchError(f"round trips did not finish within {MEASURE_TIMEOUT_S:.0f} s")
    return samples


class _EchoClient(asyncio.Protocol):
    """One of the concurrent connections: sends 64 bytes and waits for the echo."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.expected = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and not self.waiter.done() and len(self.buffer) >= self.expected:
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(BenchError(f"connection closed during a round trip: {exc or 'EOF'}"))

    async def round_trip(self, payload: bytes) -> float:
        """Return the round-trip time in ms."""
        assert self.transport is not None
        self.expected = len(payload)
        self.waiter = asyncio.get_running_loop().create_future()
        start = time.perf_counter_ns()
        self.transport.write(payload)
        if len(self.buffer) < self.expected:
            await self.waiter
        elapsed = (time.perf_counter_ns() - start) / 1e6
        if self.buffer[: self.expected] != payload:
            raise BenchError("concurrent round trip: the echo differs from what was sent")
        del self.buffer[: self.expected]
        return elapsed


@dataclass
class ConcurrentResult:
    open_s: float
    total_s: float
    latencies_ms: list[float]
    # Relay and agent memory after each batch of opened connections,
    # the peak while the round trips ran, and the value after closing.
    memory_by_streams: list[tuple[int, dict[str, Memory]]] = field(default_factory=list)
    memory_peak: dict[str, float] = field(default_factory=dict)
    memory_after: dict[str, Memory] = field(default_factory=dict)


async def _concurrent(port: int, connections: int, trips: int, tunnel: TunnelProcesses | None) -> ConcurrentResult:
    loop = asyncio.get_running_loop()
    payload = os.urandom(ECHO_SIZE)
    clients: list[_EchoClient] = []
    result = ConcurrentResult(0.0, 0.0, [])

    async def open_one() -> _EchoClient:
        _transport, client = await loop.create_connection(_EchoClient, HOST, port)
        assert client.transport is not None
        client.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.transport.write(MODE_ECHO)
        # The first round trip proves the stream is open end to end.
        await client.round_trip(payload)
        return client

    started = time.perf_counter()
    while len(clients) < connections:
        batch = min(OPEN_BATCH, connections - len(clients))
        clients += await asyncio.gather(*(open_one() for _ in range(batch)))
        if tunnel is not None:
            result.memory_by_streams.append((len(clients), tunnel.memory()))
    result.open_s = time.perf_counter() - started

    async def run_trips(client: _EchoClient) -> list[float]:
        return [await client.round_trip(payload) for _ in range(trips)]

    async def sample_memory() -> None:
        assert tunnel is not None
        while True:
            for name, memory in tunnel.memory().items():
                result.memory_peak[name] = max(result.memory_peak.get(name, 0.0), memory.rss_mib)
            await asyncio.sleep(MEMORY_SAMPLE_S)

    sampler = asyncio.ensure_future(sample_memory()) if tunnel is not None else None
    started = time.perf_counter()
    try:
        per_client = await asyncio.wait_for(asyncio.gather(*(run_trips(c) for c in clients)), MEASURE_TIMEOUT_S)
    finally:
        result.total_s = time.perf_counter() - started
        if sampler is not None:
            sampler.cancel()
        for client in clients:
            if client.transport is not None:
                client.transport.close()
    result.latencies_ms = [latency for trips_of_one in per_client for latency in trips_of_one]
    if tunnel is not None:
        # Give the relay and the agent time to close their streams and sockets.
        await asyncio.sleep(1.0)
        result.memory_after = tunnel.memory()
    return result


def measure_concurrent(port: int, connections: int, trips: int, tunnel: TunnelProcesses | None = None) -> ConcurrentResult:
    """Open ``connections`` echo connections, then run ``trips`` round trips on each at once."""
    return asyncio.run(_concurrent(port, connections, trips, tunnel))


# Report --------------------------------------------------------------------------


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Row:
    name: str
    unit: str
    direct: float
    tunnel: float
    # The target, as text, and whether it is met; None when the row has no target.
    target: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> float:
        return self.tunnel / self.direct if self.direct else float("inf")


def machine_description() -> dict[str, str]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    with open("/proc/loadavg") as loadavg:
        load = " ".join(loadavg.read().split()[:3])
    return {
        "cpus": str(os.cpu_count()),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "load": load,
    }


@contextmanager
def phase(title: str) -> Iterator[None]:
    print(f"... {title}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    yield
    print(f"    done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="deskbridge-bench-"))
    children: list[Child] = []
    try:
        server = Child("server", [sys.executable, str(Path(__file__).resolve()), "--serve"], workdir, dict(os.environ))
        children.append(server)
        server_port = int(server.wait_for_line(r"listening on (\d+)").group(1))
        tunnel = start_tunnel(workdir, server_port)
        children += [tunnel.relay, tunnel.agent]
        time.sleep(1.0)
        memory_idle = tunnel.memory()
        return measure_all(args, server_port, tunnel, memory_idle)
    except BenchError:
        for child in children:
            print(child.output(), file=sys.stderr)
        raise
    finally:
        for child in reversed(children):
            child.stop()
        if args.keep:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _timed_cpu(tunnel: TunnelProcesses, action: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    before = tunnel.cpu_seconds()
    value = action()
    after = tunnel.cpu_seconds()
    return value, {name: after[name] - before[name] for name in before}


def measure_all(args: argparse.Namespace, server_port: int, tunnel: TunnelProcesses, memory_idle: dict[str, Memory]) -> dict[str, Any]:
    total = args.mib * MIB
    rows: list[Row] = []
    cpu: dict[str, dict[str, float]] = {}

    for name, measure in (("upload", measure_upload), ("download", measure_download)):
        with phase(f"{name}: {args.mib} MiB, best of {args.repeat}, direct and tunnel in turn"):
            # Alternating the paths spreads a slow spell of a shared machine
            # over both instead of one.
            direct_rates: list[float] = []
            tunnel_rates: list[float] = []
            cpu[name] = {"relay": 0.0, "agent": 0.0}
            for _ in range(args.repeat):
                direct_rates.append(measure(server_port, total))
                rate, seconds = _timed_cpu(tunnel, lambda: measure(tunnel.port, total))
                tunnel_rates.append(rate)
                for process, value in seconds.items():
                    cpu[name][process] += value
            direct, through = max(direct_rates), max(tunnel_rates)
        ratio = through / direct
        rows.append(Row(f"{name} (one stream, 64 KiB writes)", "MiB/s", direct, through, f">= {MIN_THROUGHPUT_RATIO:.2f}x", ratio >= MIN_THROUGHPUT_RATIO))

    with phase(f"round trips: {args.trips} of 64 bytes on one connection"):
        direct_trips = measure_round_trips(server_port, args.trips, args.warmup)
        tunnel_trips, cpu["round trips"] = _timed_cpu(tunnel, lambda: measure_round_trips(tunnel.port, args.trips, args.warmup))
    p50_direct, p50_tunnel = statistics.median(direct_trips), statistics.median(tunnel_trips)
    rows.append(Row("64-byte round trip p50", "ms", p50_direct, p50_tunnel, f"<= {MAX_ROUND_TRIP_P50_RATIO:.1f}x", p50_tunnel <= MAX_ROUND_TRIP_P50_RATIO * p50_direct))
    rows.append(Row("64-byte round trip p99", "ms", percentile(direct_trips, 0.99), percentile(tunnel_trips, 0.99)))

    label = f"{args.connections} connections x {args.concurrent_trips} round trips"
    with phase(label):
        direct_many = measure_concurrent(server_port, args.connections, args.concurrent_trips)
        tunnel_many, cpu["concurrent"] = _timed_cpu(tunnel, lambda: measure_concurrent(tunnel.port, args.connections, args.concurrent_trips, tunnel))
    rows.append(Row(f"{label}: total time", "s", direct_many.total_s, tunnel_many.total_s, f"<= {MAX_CONCURRENT_TIME_RATIO:.0f}x", tunnel_many.total_s <= MAX_CONCURRENT_TIME_RATIO * direct_many.total_s))
    tunnel_p99 = percentile(tunnel_many.latencies_ms, 0.99)
    rows.append(Row(f"{label}: round trip p99", "ms", percentile(direct_many.latencies_ms, 0.99), tunnel_p99, f"< {MAX_CONCURRENT_P99_MS:.0f} ms", tunnel_p99 < MAX_CONCURRENT_P99_MS))
    rows.append(Row(f"{label}: round trip p50", "ms", statistics.median(direct_many.latencies_ms), statistics.median(tunnel_many.latencies_ms)))
    rows.append(Row(f"opening {args.connections} connections (batches of {OPEN_BATCH})", "s", direct_many.open_s, tunnel_many.open_s))

    final = tunnel.memory()
    return {
        "machine": machine_description(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "rows": rows,
        "memory_idle": memory_idle,
        "memory_by_streams": tunnel_many.memory_by_streams,
        "memory_peak": tunnel_many.memory_peak,
        "memory_after": tunnel_many.memory_after,
        "memory_final": final,
        "cpu": cpu,
    }


def print_report(result: dict[str, Any]) -> bool:
    """Print the results; return whether every target is met."""
    machine = result["machine"]
    print(f"machine: {machine['cpus']} CPUs, {machine['cpu_model']}, Python {machine['python']}, Linux {machine['kernel']}, {machine['date']}")
    print(f"load average (1, 5, 15 min) when the run ended: {machine['load']}")
    print(f"command: {result['command']}")
    print()
    print(f"{'measure':<56} {'unit':>5} {'direct':>10} {'tunnel':>10} {'ratio':>7}  target")
    all_met = True
    for row in result["rows"]:
        target = ""
        if row.met is not None:
            target = f"{row.target} {'met' if row.met else 'NOT MET'}"
        print(f"{row.name:<56} {row.unit:>5} {row.direct:>10.3f} {row.tunnel:>10.3f} {row.ratio:>6.2f}x  {target}")
        all_met = all_met and row.met is not False

    print()
    print(f"resident memory (VmRSS, MiB; target < {MAX_PROCESS_MIB:.0f} MiB per process)")
    print(f"{'when':<44} {'relay':>8} {'agent':>8}")

    def memory_line(when: str, values: dict[str, float]) -> None:
        print(f"{when:<44} {values['relay']:>8.1f} {values['agent']:>8.1f}")

    memory_line("idle, agent connected", {k: v.rss_mib for k, v in result["memory_idle"].items()})
    for streams, memory in result["memory_by_streams"]:
        memory_line(f"{streams} streams open", {k: v.rss_mib for k, v in memory.items()})
    memory_line("peak while the round trips ran", result["memory_peak"])
    memory_line("1 s after closing every connection", {k: v.rss_mib for k, v in result["memory_after"].items()})
    hwm = {k: v.hwm_mib for k, v in result["memory_final"].items()}
    memory_line("high-water mark of the whole run (VmHWM)", hwm)
    memory_met = all(value < MAX_PROCESS_MIB for value in hwm.values())
    print(f"every process under {MAX_PROCESS_MIB:.0f} MiB for the whole run: {'met' if memory_met else 'NOT MET'}")

    print()
    print("CPU time of the tunnel processes per measurement (s, user + system)")
    for name, seconds in result["cpu"].items():
        print(f"{name:<44} {seconds['relay']:>8.2f} {seconds['agent']:>8.2f}")
    return all_met and memory_met


def _json_default(value: object) -> object:
    if isinstance(value, (Row, Memory)):
        return {**value.__dict__, **({"ratio": value.ratio} if isinstance(value, Row) else {})}
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _run_timed_out(signum: int, frame: object) -> None:
    raise BenchError(f"the run took longer than {RUN_TIMEOUT_S} s; stopping it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Measure the Deskbridge tunnel against direct TCP on this machine.")
    parser.add_argument("--mib", type=int, default=512, help="MiB per throughput measurement (default 512)")
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs per direction and path; the best counts (default 3)")
    parser.add_argument("--trips", type=int, default=5000, help="64-byte round trips on one connection (default 5000)")
    parser.add_argument("--warmup", type=int, default=200, help="round trips before the measured ones (default 200)")
    parser.add_argument("--connections", type=int, default=200, help="concurrent connections (default 200)")
    parser.add_argument("--concurrent-trips", type=int, default=200, help="round trips per concurrent connection (default 200)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results to FILE as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder with the process logs")
    parser.add_argument("--check", action="store_true", help="exit with status 3 when a target is not met")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return parser


def main() -> int:
    args = build_parser().parse_args()
    if args.serve:
        asyncio.run(serve())
        return 0
    if min(args.mib, args.repeat, args.trips, args.connections, args.concurrent_trips) < 1 or args.warmup < 0:
        print("bench_tunnel: sizes and counts must be at least 1 (--warmup at least 0)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGALRM, _run_timed_out)
    signal.alarm(RUN_TIMEOUT_S)
    try:
        result = run(args)
    except BenchError as exc:
        print(f"bench_tunnel: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
    all_met = print_report(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, default=_json_default, indent=2))
    if args.check and not all_met:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
