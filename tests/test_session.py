"""The sans-I/O tunnel session, driven as an agent and a relay with no sockets.

``FakeLink`` carries messages between the two sessions in memory. Tests that
need a misbehaving peer inject hand-built frames with ``inject``.
"""

from __future__ import annotations

import random
import struct
from collections import deque
from typing import NamedTuple, get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from app.core import frames
from app.core.errors import LocalProtocolError
from app.core.frames import MAX_DATA_PAYLOAD, CloseCode, Frame, FrameType
from app.core.session import (
    DEFAULT_WINDOW,
    AuthAccepted,
    AuthReceived,
    CreditAvailable,
    DataReceived,
    Event,
    HelloReceived,
    Role,
    Session,
    SessionFailed,
    SessionState,
    StreamClosed,
    StreamEnded,
    StreamOpened,
    StreamOpenFailed,
    StreamOpenRequested,
    StreamReset,
)

EVENT_TYPES = get_args(Event)
UNKNOWN_TYPE = max(FrameType) + 1
MAX_PUMP_ROUNDS = 1000
MiB = 1024 * 1024


class Pumped(NamedTuple):
    """Events each side received during one ``FakeLink.pump``."""

    agent: list[Event]
    relay: list[Event]

    def of(self, link: FakeLink, session: Session) -> list[Event]:
        return self.agent if session is link.agent else self.relay


class FakeLink:
    """Carries messages between an agent and a relay session in memory.

    Messages wait in one queue per direction until delivered, so a test can
    choose how the two directions interleave. Each direction keeps its order,
    as a WebSocket does.
    """

    def __init__(self, agent: Session, relay: Session) -> None:
        self.agent = agent
        self.relay = relay
        # Messages on their way to each session, keyed by the receiver.
        self.queues: dict[Session, deque[bytes]] = {agent: deque(), relay: deque()}
        # Every frame each session sent, keyed by the sender.
        self.sent: dict[Session, list[Frame]] = {agent: [], relay: []}

    def peer(self, session: Session) -> Session:
        return self.relay if session is self.agent else self.agent

    def collect(self) -> None:
        """Move what both sessions queued onto the link."""
        for sender in (self.agent, self.relay):
            for message in sender.data_to_send():
                self.sent[sender].append(frames.decode(message))
                self.queues[self.peer(sender)].append(message)

    def deliver(self, receiver: Session, count: int | None = None) -> list[Event]:
        """Hand up to ``count`` waiting messages (all by default) to ``receiver``."""
        self.collect()
        queue = self.queues[receiver]
        limit = len(queue) if count is None else min(count, len(queue))
        events: list[Event] = []
        for _ in range(limit):
            events.extend(receiver.receive(queue.popleft()))
        return events

    def pump(self) -> Pumped:
        """Deliver in both directions until neither session has anything to send."""
        pumped = Pumped([], [])
        for _ in range(MAX_PUMP_ROUNDS):
            self.collect()
            if not self.queues[self.agent] and not self.queues[self.relay]:
                return pumped
            pumped.relay.extend(self.deliver(self.relay))
            pumped.agent.extend(self.deliver(self.agent))
        raise AssertionError(f"sessions still exchanging messages after {MAX_PUMP_ROUNDS} rounds")


def connect(agent_window: int = DEFAULT_WINDOW, relay_window: int = DEFAULT_WINDOW) -> FakeLink:
    """Return a link whose sessions have exchanged HELLO."""
    agent = Session(Role.AGENT, window=agent_window, info={"device": "laptop"})
    relay = Session(Role.RELAY, window=relay_window, info={"version": "test"})
    link = FakeLink(agent, relay)
    link.pump()
    return link


def open_stream(link: FakeLink, opener: Session | None = None, target: str = "echo") -> int:
    """Open a stream from ``opener`` (the relay by default) and let the peer accept it."""
    opener = opener or link.relay
    stream_id = opener.open_stream(target)
    link.pump()
    link.peer(opener).accept_stream(stream_id)
    link.pump()
    return stream_id


def inject(session: Session, frame_type: int, stream_id: int, payload: bytes = b"") -> list[Event]:
    """Feed ``session`` a hand-built frame, as a misbehaving peer would send it."""
    return session.receive(struct.pack("!BI", frame_type, stream_id) + payload)


def received_data(events: list[Event], stream_id: int) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id)


def data_frames(sent: list[Frame], stream_id: int | None = None) -> list[Frame]:
    return [
        f for f in sent if f.type is FrameType.DATA and (stream_id is None or f.stream_id == stream_id)
    ]


def window_increments(sent: list[Frame], stream_id: int) -> list[int]:
    return [
        frames.parse_window(f.payload)
        for f in sent
        if f.type is FrameType.WINDOW and f.stream_id == stream_id
    ]


def code_reason(code: int, reason: str) -> bytes:
    return struct.pack("!H", code) + reason.encode()


def hello(version: int = frames.PROTOCOL_VERSION, window: int = DEFAULT_WINDOW) -> bytes:
    return frames.encode_hello(version, window, {})


def assert_protocol_error(session: Session, events: list[Event], reason: str) -> None:
    assert events == [SessionFailed(CloseCode.PROTOCOL_ERROR, reason)]
    assert session.state is SessionState.FAILED


def failed_session() -> Session:
    session = Session(Role.AGENT)
    session.receive(b"\x00")
    return session


# HELLO ---------------------------------------------------------------------------


def test_new_session_queues_hello():
    session = Session(Role.AGENT, window=1234, info={"device": "laptop"})
    messages = session.data_to_send()
    frame = frames.decode(messages[0])

    assert len(messages) == 1
    assert frame.type is FrameType.HELLO
    assert frame.stream_id == 0
    assert frames.parse_hello(frame.payload) == (1, 1234, {"device": "laptop"})


def test_hello_exchange_opens_both():
    agent = Session(Role.AGENT, window=1000, info={"device": "laptop"})
    relay = Session(Role.RELAY, window=2000, info={"version": "test"})
    pumped = FakeLink(agent, relay).pump()

    assert pumped.agent == [HelloReceived(1, 2000, {"version": "test"})]
    assert pumped.relay == [HelloReceived(1, 1000, {"device": "laptop"})]
    assert agent.state is SessionState.OPEN
    assert relay.state is SessionState.OPEN
    assert agent.peer_window == 2000
    assert relay.peer_window == 1000
    assert agent.peer_info == {"version": "test"}


def test_version_mismatch_fails_4002():
    agent = Session(Role.AGENT)
    events = agent.receive(hello(version=2))

    assert events == [
        SessionFailed(
            CloseCode.UNSUPPORTED_VERSION,
            "peer speaks tunnel protocol version 2, this side speaks 1; update the older side",
        )
    ]
    assert agent.state is SessionState.FAILED
    assert agent.failure == events[0]


@pytest.mark.parametrize("window", [0, frames.MAX_WINDOW + 1, 2**32 - 1])
def test_hello_window_out_of_range(window):
    events = Session(Role.AGENT).receive(hello(window=window))

    assert events == [
        SessionFailed(CloseCode.PROTOCOL_ERROR, f"HELLO window {window} is outside 1 to 2147483647")
    ]


def test_hello_nonzero_stream_fails():
    events = inject(Session(Role.RELAY), FrameType.HELLO, 1, struct.pack("!HI", 1, 100))

    assert events == [SessionFailed(CloseCode.PROTOCOL_ERROR, "HELLO must use stream id 0")]


def test_hello_deep_json_fails_session():
    payload = struct.pack("!HI", 1, 100) + b"[" * (frames.MAX_CONTROL_PAYLOAD - 6)
    events = inject(Session(Role.AGENT), FrameType.HELLO, 0, payload)

    assert len(events) == 1
    assert isinstance(events[0], SessionFailed)
    assert events[0].close_code == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("window", [0, -1, frames.MAX_WINDOW + 1])
def test_constructor_rejects_bad_window(window):
    with pytest.raises(ValueError, match="window must be between 1 and 2147483647 bytes"):
        Session(Role.AGENT, window=window)


# Opening streams -------------------------------------------------------------------


def test_open_accept_both_sides():
    link = connect()
    stream_id = link.relay.open_stream("echo")
    requested = link.pump()
    link.agent.accept_stream(stream_id)
    accepted = link.pump()

    assert stream_id == 1
    assert requested.agent == [StreamOpenRequested(1, "echo")]
    assert accepted.relay == [StreamOpened(1)]
    assert link.agent.is_active(1)
    assert link.relay.is_active(1)


def test_stream_ids_follow_parity():
    link = connect()

    relay_ids = [link.relay.open_stream("echo") for _ in range(3)]
    agent_ids = [link.agent.open_stream("echo") for _ in range(3)]

    assert relay_ids == [1, 3, 5]
    assert agent_ids == [2, 4, 6]


def test_agent_opens_stream():
    link = connect()
    stream_id = open_stream(link, opener=link.agent, target="cloud")
    link.relay.send_data(stream_id, b"to agent")
    pumped = link.pump()

    assert stream_id == 2
    assert received_data(pumped.agent, 2) == b"to agent"


def test_reject_reports_code_reason():
    link = connect()
    stream_id = link.relay.open_stream("nope")
    link.pump()
    link.agent.reject_stream(stream_id, frames.ErrorCode.UNKNOWN_TARGET, "no target named 'nope'")
    pumped = link.pump()

    assert pumped.relay == [StreamOpenFailed(1, 1, "no target named 'nope'")]
    assert not link.agent.is_active(1)
    assert not link.relay.is_active(1)


def test_data_before_opened_arrives():
    link = connect()
    stream_id = link.relay.open_stream("echo")
    link.relay.send_data(stream_id, b"early")
    pumped = link.pump()

    assert pumped.agent == [StreamOpenRequested(1, "echo"), DataReceived(1, memoryview(b"early"))]


@pytest.mark.parametrize("target", ["", "t" * 256, "é" * 128])
def test_open_bad_target_raises(target):
    link = connect()

    with pytest.raises(LocalProtocolError, match="target name must be 1 to 255 bytes of UTF-8"):
        link.relay.open_stream(target)


# Data and flow control -----------------------------------------------------------------


def test_data_both_ways():
    link = connect()
    stream_id = open_stream(link)
    link.relay.send_data(stream_id, b"ping")
    link.agent.send_data(stream_id, b"pong")
    pumped = link.pump()

    assert received_data(pumped.agent, stream_id) == b"ping"
    assert received_data(pumped.relay, stream_id) == b"pong"
    assert link.relay.bytes_sent == 4
    assert link.relay.bytes_received == 4


def test_large_send_split_into_frames():
    link = connect(agent_window=2 * MiB)
    stream_id = open_stream(link)
    payload = random.Random(1).randbytes(MiB)
    credit = link.relay.send_data(stream_id, payload)
    pumped = link.pump()
    sizes = [len(f.payload) for f in data_frames(link.sent[link.relay])]

    assert credit == MiB
    assert sizes == [MAX_DATA_PAYLOAD] * 16
    assert received_data(pumped.agent, stream_id) == payload


def test_one_mib_respects_default_window():
    link = connect()
    stream_id = open_stream(link)
    payload = random.Random(2).randbytes(MiB)
    credit = link.relay.send_data(stream_id, payload)
    first = link.pump()

    assert credit == -512 * 1024
    assert link.relay.backlog_size(stream_id) == 512 * 1024
    assert len(received_data(first.agent, stream_id)) == DEFAULT_WINDOW

    link.agent.consume(stream_id, DEFAULT_WINDOW)
    second = link.pump()
    sizes = [len(f.payload) for f in data_frames(link.sent[link.relay])]

    assert received_data(first.agent + second.agent, stream_id) == payload
    assert max(sizes) == MAX_DATA_PAYLOAD
    assert sum(sizes) == MiB
    assert link.relay.backlog_size(stream_id) == 0


def test_exact_drain_defers_credit_available():
    # The last backlog byte used the last credit, so the stream may send
    # again only after the next WINDOW.
    link = connect(agent_window=1000)
    stream_id = open_stream(link)
    link.relay.send_data(stream_id, b"x" * 2000)
    link.pump()
    link.agent.consume(stream_id, 1000)
    drained = link.pump()
    link.agent.consume(stream_id, 1000)
    granted = link.pump()

    assert link.relay.backlog_size(stream_id) == 0
    assert drained.relay == []
    assert granted.relay == [CreditAvailable(stream_id)]


def test_sender_stops_at_small_window():
    link = connect(agent_window=1000)
    stream_id = open_stream(link)
    credit = link.relay.send_data(stream_id, b"x" * 2500)
    pumped = link.pump()

    assert credit == -1500
    assert len(received_data(pumped.agent, stream_id)) == 1000
    assert link.relay.backlog_size(stream_id) == 1500
    assert link.relay.send_credit(stream_id) == 0


def test_backlog_drains_with_credit_available():
    link = connect(agent_window=1000)
    stream_id = open_stream(link)
    payload = bytes(range(250)) * 10
    link.relay.send_data(stream_id, payload)
    received = received_data(link.pump().agent, stream_id)

    link.agent.consume(stream_id, 1000)
    partial = link.pump()

    assert window_increments(link.sent[link.agent], stream_id) == [1000]
    assert link.relay.backlog_size(stream_id) == 500
    assert partial.relay == []

    link.agent.consume(stream_id, 1000)
    drained = link.pump()
    received += received_data(partial.agent + drained.agent, stream_id)

    assert drained.relay == [CreditAvailable(stream_id)]
    assert link.relay.backlog_size(stream_id) == 0
    assert link.relay.send_credit(stream_id) == 500
    assert received == payload


def test_send_while_backlogged_queues():
    link = connect(agent_window=100)
    stream_id = open_stream(link)
    link.relay.send_data(stream_id, b"a" * 150)
    credit = link.relay.send_data(stream_id, b"b" * 10)
    link.collect()

    assert credit == -60
    assert sum(len(f.payload) for f in data_frames(link.sent[link.relay])) == 100


def test_exact_fill_then_credit_available():
    link = connect(agent_window=1000)
    stream_id = open_stream(link)
    credit = link.relay.send_data(stream_id, b"x" * 1000)
    link.pump()
    link.agent.consume(stream_id, 1)
    pumped = link.pump()

    assert credit == 0
    assert window_increments(link.sent[link.agent], stream_id) == [1]
    assert pumped.relay == [CreditAvailable(stream_id)]


def test_consume_batches_grants():
    link = connect(agent_window=1000)
    stream_id = open_stream(link)
    link.relay.send_data(stream_id, b"x" * 600)
    link.pump()

    link.agent.consume(stream_id, 100)
    link.agent.consume(stream_id, 100)
    link.collect()
    before_threshold = window_increments(link.sent[link.agent], stream_id)
    link.agent.consume(stream_id, 50)
    link.collect()

    assert before_threshold == []
    assert window_increments(link.sent[link.agent], stream_id) == [250]


def test_consume_zero_sends_nothing():
    link = connect(agent_window=100)
    stream_id = open_stream(link)
    link.relay.send_data(stream_id, b"x" * 100)
    link.pump()
    link.agent.consume(stream_id, 0)
    pumped = link.pump()

    assert window_increments(link.sent[link.agent], stream_id) == []
    assert pumped.relay == []
    assert link.relay.state is SessionState.OPEN


def test_consume_unknown_stream_ignored():
    link = connect()
    link.agent.consume(99, 1000)

    assert link.agent.data_to_send() == []


# Half-close and close ---------------------------------------------------------------


@pytest.mark.parametrize("first", ["agent", "relay"])
def test_half_close_each_direction(first):
    link = connect()
    stream_id = open_stream(link)
    closer = getattr(link, first)
    other = link.peer(closer)

    assert closer.send_fin(stream_id) == []
    ended = link.pump()
    other.send_data(stream_id, b"still flowing")
    flowing = link.pump()

    assert ended.of(link, other) == [StreamEnded(stream_id)]
    assert received_data(flowing.of(link, closer), stream_id) == b"still flowing"
    assert closer.is_active(stream_id)
    assert other.is_active(stream_id)
    assert not closer.can_send(stream_id)
    assert other.can_send(stream_id)

    closed_locally = other.send_fin(stream_id)
    closed = link.pump()

    assert closed_locally == [StreamClosed(stream_id)]
    assert closed.of(link, closer) == [StreamEnded(stream_id), StreamClosed(stream_id)]
    assert not closer.is_active(stream_id)
    assert not other.is_active(stream_id)


def test_fin_waits_behind_backlog():
    link = connect(agent_window=1000)
    stream_id = open_stream(link)
    link.relay.send_data(stream_id, b"x" * 2500)
    link.relay.send_fin(stream_id)
    first = link.pump()

    assert StreamEnded(stream_id) not in first.agent
    assert not link.relay.can_send(stream_id)

    events = list(first.agent)
    for _ in range(3):
        link.agent.consume(stream_id, 1000)
        events += link.pump().agent
    kinds = [f.type for f in link.sent[link.relay] if f.stream_id == stream_id]

    assert received_data(events, stream_id) == b"x" * 2500
    assert events[-1] == StreamEnded(stream_id)
    assert kinds[-1] is FrameType.FIN
    assert kinds.count(FrameType.FIN) == 1


def test_close_waits_for_backlog():
    link = connect(agent_window=1000)
    stream_id = open_stream(link)
    link.agent.send_fin(stream_id)
    link.relay.send_data(stream_id, b"x" * 1500)
    queued = link.relay.send_fin(stream_id)
    first = link.pump()

    assert queued == []
    assert StreamClosed(stream_id) not in first.relay
    assert link.relay.is_active(stream_id)

    link.agent.consume(stream_id, 1000)
    last = link.pump()

    assert last.relay == [StreamClosed(stream_id)]
    assert last.agent[-2:] == [StreamEnded(stream_id), StreamClosed(stream_id)]


# Reset and ended streams -----------------------------------------------------------------


@pytest.mark.parametrize("resetter", ["agent", "relay"])
def test_reset_both_ways(resetter):
    link = connect()
    stream_id = open_stream(link)
    source = getattr(link, resetter)
    source.reset_stream(stream_id, frames.ErrorCode.CANCELLED, "client went away")
    pumped = link.pump()

    assert pumped.of(link, link.peer(source)) == [StreamReset(stream_id, 5, "client went away")]
    assert pumped.of(link, source) == []
    assert not link.agent.is_active(stream_id)
    assert not link.relay.is_active(stream_id)


def test_reset_unknown_stream_ignored():
    link = connect()
    link.relay.reset_stream(7, frames.ErrorCode.CANCELLED, "nothing")

    assert link.relay.data_to_send() == []


ENDED_STREAM_FRAMES = [
    (FrameType.DATA, b"late"),
    (FrameType.WINDOW, struct.pack("!I", 10)),
    (FrameType.FIN, b""),
    (FrameType.RESET, code_reason(5, "late")),
    (FrameType.OPENED, b""),
    (FrameType.OPEN_FAILED, code_reason(1, "late")),
]


@pytest.mark.parametrize("how", ["reset", "rejected", "closed"])
@pytest.mark.parametrize(("frame_type", "payload"), ENDED_STREAM_FRAMES)
def test_ended_stream_frames_ignored(how, frame_type, payload):
    link = connect()
    stream_id = link.relay.open_stream("echo")
    link.pump()
    if how == "reset":
        link.agent.accept_stream(stream_id)
        link.agent.reset_stream(stream_id, frames.ErrorCode.CANCELLED, "gone")
    elif how == "rejected":
        link.agent.reject_stream(stream_id, frames.ErrorCode.UNKNOWN_TARGET, "no")
    else:
        link.agent.accept_stream(stream_id)
        link.agent.send_fin(stream_id)
        link.relay.send_fin(stream_id)
    link.pump()

    assert inject(link.agent, frame_type, stream_id, payload) == []
    assert inject(link.relay, frame_type, stream_id, payload) == []
    assert link.agent.state is SessionState.OPEN
    assert link.relay.state is SessionState.OPEN


# Token renewal -------------------------------------------------------------------


def test_auth_renewal_round_trip():
    link = connect()
    link.agent.send_auth("new-access-token")
    presented = link.pump()
    link.relay.send_auth_ok(900)
    confirmed = link.pump()

    assert presented.relay == [AuthReceived("new-access-token")]
    assert confirmed.agent == [AuthAccepted(900)]


@pytest.mark.parametrize(
    ("receiver", "frame_type", "stream_id", "payload", "reason"),
    [
        ("agent", FrameType.AUTH, 0, b"token", "AUTH is sent by the agent only"),
        ("relay", FrameType.AUTH_OK, 0, struct.pack("!I", 60), "AUTH_OK is sent by the relay only"),
        ("relay", FrameType.AUTH, 1, b"token", "AUTH must use stream id 0"),
        ("relay", FrameType.AUTH, 0, b"", "AUTH carries an empty token"),
    ],
)
def test_bad_auth_fails(receiver, frame_type, stream_id, payload, reason):
    link = connect()
    session = getattr(link, receiver)
    events = inject(session, frame_type, stream_id, payload)

    assert_protocol_error(session, events, reason)


def test_auth_from_relay_raises():
    link = connect()

    with pytest.raises(LocalProtocolError, match="only the agent sends AUTH"):
        link.relay.send_auth("token")


def test_auth_ok_from_agent_raises():
    link = connect()

    with pytest.raises(LocalProtocolError, match="only the relay sends AUTH_OK"):
        link.agent.send_auth_ok(60)


# Protocol errors from the peer --------------------------------------------------------------


def test_frame_before_hello_fails():
    session = Session(Role.AGENT)
    events = inject(session, FrameType.OPEN, 1, b"echo")

    assert_protocol_error(session, events, "expected HELLO first, got OPEN")


def test_hello_twice_fails():
    link = connect()
    events = link.agent.receive(hello())

    assert_protocol_error(link.agent, events, "HELLO received twice")


@pytest.mark.parametrize(("role", "stream_id"), [(Role.AGENT, 2), (Role.AGENT, 0), (Role.RELAY, 1)])
def test_open_wrong_parity_fails(role, stream_id):
    link = connect()
    session = link.agent if role is Role.AGENT else link.relay
    events = inject(session, FrameType.OPEN, stream_id, b"echo")

    assert_protocol_error(
        session, events, f"OPEN with stream id {stream_id}, which belongs to this side"
    )


@pytest.mark.parametrize("stream_id", [3, 1])
def test_open_reused_id_fails(stream_id):
    link = connect()
    link.relay.open_stream("echo")
    link.relay.open_stream("echo")
    link.pump()
    events = inject(link.agent, FrameType.OPEN, stream_id, b"echo")

    assert_protocol_error(
        link.agent, events, f"OPEN reuses stream id {stream_id}; ids must increase"
    )


def test_open_bad_target_fails():
    link = connect()
    events = inject(link.agent, FrameType.OPEN, 1, b"\xff")

    assert_protocol_error(link.agent, events, "target name is not valid UTF-8")


def test_data_beyond_window_fails():
    link = connect(agent_window=100)
    stream_id = open_stream(link)
    inject(link.agent, FrameType.DATA, stream_id, b"x" * 60)
    events = inject(link.agent, FrameType.DATA, stream_id, b"x" * 41)

    assert_protocol_error(
        link.agent, events, "DATA of 41 bytes exceeds the remaining window of 40 on stream 1"
    )


def test_data_after_fin_fails():
    link = connect()
    stream_id = open_stream(link)
    inject(link.agent, FrameType.FIN, stream_id)
    events = inject(link.agent, FrameType.DATA, stream_id, b"late")

    assert_protocol_error(link.agent, events, "DATA after FIN on stream 1")


def test_empty_data_fails():
    link = connect()
    stream_id = open_stream(link)
    events = inject(link.agent, FrameType.DATA, stream_id)

    assert_protocol_error(link.agent, events, "empty DATA frame on stream 1")


def test_fin_twice_fails():
    link = connect()
    stream_id = open_stream(link)
    inject(link.agent, FrameType.FIN, stream_id)
    events = inject(link.agent, FrameType.FIN, stream_id)

    assert_protocol_error(link.agent, events, "FIN received twice on stream 1")


def test_opened_for_peer_stream_fails():
    link = connect()
    stream_id = open_stream(link)
    events = inject(link.agent, FrameType.OPENED, stream_id)

    assert_protocol_error(link.agent, events, "unexpected OPENED for stream 1")


def test_opened_twice_fails():
    link = connect()
    stream_id = open_stream(link)
    events = inject(link.relay, FrameType.OPENED, stream_id)

    assert_protocol_error(link.relay, events, "unexpected OPENED for stream 1")


def test_open_failed_after_opened_fails():
    link = connect()
    stream_id = open_stream(link)
    events = inject(link.relay, FrameType.OPEN_FAILED, stream_id, code_reason(1, "late"))

    assert_protocol_error(link.relay, events, "unexpected OPEN_FAILED for stream 1")


@pytest.mark.parametrize("stream_id", [7, 4])
def test_data_never_opened_fails(stream_id):
    link = connect()
    open_stream(link)
    open_stream(link, opener=link.agent)
    events = inject(link.agent, FrameType.DATA, stream_id, b"x")

    assert_protocol_error(
        link.agent, events, f"DATA for stream {stream_id}, which was never opened"
    )


def test_window_overflow_fails():
    link = connect()
    stream_id = open_stream(link)
    events = inject(link.relay, FrameType.WINDOW, stream_id, struct.pack("!I", frames.MAX_WINDOW))

    assert_protocol_error(link.relay, events, "WINDOW overflows the credit of stream 1")


def test_malformed_frame_fails():
    link = connect()
    events = inject(link.agent, UNKNOWN_TYPE, 1)

    assert_protocol_error(link.agent, events, f"unknown frame type 0x{UNKNOWN_TYPE:02x}")


@pytest.mark.parametrize(
    "message",
    [hello(), frames.encode(FrameType.DATA, 1, b"x"), b"", b"\xff" * 10, frames.encode(FrameType.OPEN, 3, b"echo")],
)
def test_failed_session_ignores_input(message):
    link = connect()
    open_stream(link)
    link.agent.receive(b"\x00")

    assert link.agent.receive(message) == []
    assert link.agent.state is SessionState.FAILED
    assert link.agent.failure == SessionFailed(CloseCode.PROTOCOL_ERROR, "frame of 1 bytes is shorter than the 5-byte header")


def test_local_fail_returns_first_failure():
    link = connect()
    first = link.agent.fail(CloseCode.GOING_AWAY, "shutting down")
    second = link.agent.fail(CloseCode.INTERNAL_ERROR, "again")

    assert first == SessionFailed(CloseCode.GOING_AWAY, "shutting down")
    assert second is first
    assert link.agent.receive(hello()) == []


def test_abort_streams_resets_each():
    link = connect()
    first = open_stream(link)
    second = open_stream(link, opener=link.agent)
    resets = link.relay.abort_streams(frames.ErrorCode.SESSION_CLOSED, "tunnel ended")

    assert resets == [StreamReset(first, 6, "tunnel ended"), StreamReset(second, 6, "tunnel ended")]
    assert link.relay.stream_ids == []


# Local API misuse ------------------------------------------------------------------


def test_open_before_hello_raises():
    with pytest.raises(LocalProtocolError, match="session is AWAITING_HELLO, not OPEN"):
        Session(Role.RELAY).open_stream("echo")


def test_open_after_failure_raises():
    with pytest.raises(LocalProtocolError, match="session is FAILED, not OPEN"):
        failed_session().open_stream("echo")


def test_send_unknown_stream_raises():
    link = connect()

    with pytest.raises(LocalProtocolError, match="stream 1 is not active"):
        link.relay.send_data(1, b"x")


def test_send_after_fin_raises():
    link = connect()
    stream_id = open_stream(link)
    link.relay.send_fin(stream_id)

    with pytest.raises(LocalProtocolError, match="stream 1 already sent FIN"):
        link.relay.send_data(stream_id, b"x")


def test_fin_twice_raises():
    link = connect()
    stream_id = open_stream(link)
    link.relay.send_fin(stream_id)

    with pytest.raises(LocalProtocolError, match="stream 1 already sent FIN"):
        link.relay.send_fin(stream_id)


def test_accept_own_stream_raises():
    link = connect()
    stream_id = link.relay.open_stream("echo")

    with pytest.raises(LocalProtocolError, match="stream 1 is not waiting to be accepted"):
        link.relay.accept_stream(stream_id)


def test_accept_twice_raises():
    link = connect()
    stream_id = open_stream(link)

    with pytest.raises(LocalProtocolError, match="stream 1 is not waiting to be accepted"):
        link.agent.accept_stream(stream_id)


def test_reject_accepted_stream_raises():
    link = connect()
    stream_id = open_stream(link)

    with pytest.raises(LocalProtocolError, match="stream 1 is not waiting to be accepted"):
        link.agent.reject_stream(stream_id, 1, "too late")


# Arbitrary peer input ----------------------------------------------------------------


def build_frame(type_value: int, stream_id: int, payload: bytes) -> bytes:
    return struct.pack("!BI", type_value, stream_id) + payload


payloads = st.one_of(
    st.binary(max_size=24),
    st.builds(
        lambda version, window, meta: struct.pack("!HI", version, window) + meta,
        st.sampled_from([0, 1, 2]),
        st.sampled_from([0, 1, 100, frames.MAX_WINDOW, 2**32 - 1]),
        st.sampled_from([b"", b"{}", b'{"targets": ["echo"]}', b"[", b"\xff", b"[]"]),
    ),
    st.builds(code_reason, st.integers(0, 65535), st.text(max_size=12)),
    st.integers(0, 2**32 - 1).map(lambda n: struct.pack("!I", n)),
    st.sampled_from([b"echo", b"\xff", b"t" * 256]),
    st.sampled_from([1, 99, 100, 101, MAX_DATA_PAYLOAD, MAX_DATA_PAYLOAD + 1]).map(lambda n: b"d" * n),
)
structured_frames = st.builds(
    build_frame,
    st.integers(0, UNKNOWN_TYPE),
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 2**32 - 1]),
    payloads,
)
peer_messages = st.lists(st.one_of(st.binary(max_size=12), structured_frames), max_size=30)


@settings(max_examples=400, deadline=None)
@given(
    role=st.sampled_from(list(Role)),
    hello_first=st.booleans(),
    local_streams=st.integers(0, 2),
    messages=peer_messages,
)
def test_arbitrary_messages_never_raise(role, hello_first, local_streams, messages):
    session = Session(role, window=100)
    if hello_first:
        session.receive(hello(window=100))
        for _ in range(local_streams):
            session.open_stream("echo")

    failures = 0
    for message in messages:
        failed_before = session.state is SessionState.FAILED
        events = session.receive(message)
        for event in events:
            assert isinstance(event, EVENT_TYPES)
            # Drive the session deeper, as an owner would.
            if isinstance(event, StreamOpenRequested):
                session.accept_stream(event.stream_id)
            elif isinstance(event, DataReceived):
                session.consume(event.stream_id, len(event.data))
        failures += sum(isinstance(event, SessionFailed) for event in events)

        if failed_before:
            assert events == []
        if failures:
            assert session.state is SessionState.FAILED
        assert failures <= 1


# Random traffic through the fake link ----------------------------------------------------------

# Stream content comes from this noise, starting at the stream's current
# offset, so a lost, repeated or reordered chunk shows up as a mismatch.
NOISE_SIZE = 1 << 18
NOISE = random.Random(3).randbytes(NOISE_SIZE) * 2
WINDOWS = [16, 1000, 70_000, DEFAULT_WINDOW]
MAX_SETTLE_ROUNDS = 10_000


class TunnelTraffic(RuleBasedStateMachine):
    """Random opens, sends, grants and FINs in both directions on several streams.

    Keys of the form ``(side, stream_id)`` name one direction of a stream:
    ``side`` is the session that sends in that direction.
    """

    @initialize(agent_window=st.sampled_from(WINDOWS), relay_window=st.sampled_from(WINDOWS))
    def connect(self, agent_window, relay_window):
        self.link = connect(agent_window, relay_window)
        self.sides = {"agent": self.link.agent, "relay": self.link.relay}
        self.windows = {"agent": agent_window, "relay": relay_window}
        self.streams: list[int] = []
        self.expected: dict[tuple[str, int], bytearray] = {}
        self.received: dict[tuple[str, int], bytearray] = {}
        self.unconsumed: dict[tuple[str, int], int] = {}
        self.fin_sent: set[tuple[str, int]] = set()
        self.ended: set[tuple[str, int]] = set()
        self.closed: set[tuple[str, int]] = set()
        # WINDOW increments each sender has received, per stream.
        self.granted: dict[tuple[str, int], int] = {}
        self.sent_index = {"agent": 0, "relay": 0}

    def other(self, side: str) -> str:
        return "relay" if side == "agent" else "agent"

    def handle(self, side: str, events: list[Event]) -> None:
        """Record events that ``side`` received and act on them as an owner would."""
        session = self.sides[side]
        for event in events:
            assert not isinstance(event, (SessionFailed, StreamReset, StreamOpenFailed)), event
            if isinstance(event, StreamOpenRequested):
                session.accept_stream(event.stream_id)
            elif isinstance(event, DataReceived):
                key = (self.other(side), event.stream_id)
                self.received[key] += event.data
                self.unconsumed[key] += len(event.data)
                assert self.unconsumed[key] <= self.windows[side]
            elif isinstance(event, StreamEnded):
                key = (self.other(side), event.stream_id)
                assert key in self.fin_sent
                # FIN comes after every byte sent before it.
                assert self.received[key] == self.expected[key]
                self.ended.add(key)
            elif isinstance(event, StreamClosed):
                self.closed.add((side, event.stream_id))
            elif isinstance(event, CreditAvailable):
                assert session.backlog_size(event.stream_id) == 0
                assert session.send_credit(event.stream_id) > 0

    def check_sent_frames(self) -> None:
        """Check the size of every DATA frame sent since the last call."""
        for side, session in self.sides.items():
            sent = self.link.sent[session]
            for frame in sent[self.sent_index[side] :]:
                if frame.type is FrameType.DATA:
                    assert 0 < len(frame.payload) <= MAX_DATA_PAYLOAD
            self.sent_index[side] = len(sent)

    def deliver_to(self, side: str, count: int | None) -> None:
        session = self.sides[side]
        self.link.collect()
        self.check_sent_frames()
        queue = self.link.queues[session]
        limit = len(queue) if count is None else min(count, len(queue))
        for _ in range(limit):
            message = queue.popleft()
            frame = frames.decode(message)
            if frame.type is FrameType.WINDOW:
                key = (side, frame.stream_id)
                self.granted[key] = self.granted.get(key, 0) + frames.parse_window(frame.payload)
            self.handle(side, session.receive(message))

    def stream_key(self, data: st.DataObject) -> tuple[str, int]:
        side = data.draw(st.sampled_from(["agent", "relay"]))
        return side, data.draw(st.sampled_from(self.streams))

    @rule(side=st.sampled_from(["agent", "relay"]))
    def open(self, side):
        stream_id = self.sides[side].open_stream("echo")
        self.streams.append(stream_id)
        for key in ((side, stream_id), (self.other(side), stream_id)):
            self.expected[key] = bytearray()
            self.received[key] = bytearray()
            self.unconsumed[key] = 0

    @precondition(lambda self: self.streams)
    @rule(data=st.data(), size=st.integers(1, 140_000))
    def send(self, data, size):
        side, stream_id = self.stream_key(data)
        session = self.sides[side]
        if not session.can_send(stream_id):
            return
        # Keep the frame count per send bounded for tiny windows.
        size = min(size, 50 * self.windows[self.other(side)])
        expected = self.expected[(side, stream_id)]
        offset = len(expected) % NOISE_SIZE
        chunk = NOISE[offset : offset + size]
        session.send_data(stream_id, chunk)
        expected += chunk

    @precondition(lambda self: self.streams)
    @rule(data=st.data(), share=st.floats(0, 1))
    def consume(self, data, share):
        side, stream_id = self.stream_key(data)
        key = (self.other(side), stream_id)
        size = int(self.unconsumed[key] * share)
        self.unconsumed[key] -= size
        self.sides[side].consume(stream_id, size)

    @precondition(lambda self: self.streams)
    @rule(data=st.data())
    def fin(self, data):
        side, stream_id = self.stream_key(data)
        session = self.sides[side]
        if not session.can_send(stream_id):
            return
        self.fin_sent.add((side, stream_id))
        self.handle(side, session.send_fin(stream_id))

    @rule(side=st.sampled_from(["agent", "relay"]), count=st.one_of(st.none(), st.integers(1, 5)))
    def deliver(self, side, count):
        self.deliver_to(side, count)

    @invariant()
    def credit_never_exceeded(self):
        if not hasattr(self, "link"):
            return
        self.link.collect()
        self.check_sent_frames()
        for side, session in self.sides.items():
            assert session.state is SessionState.OPEN
            peer_window = self.windows[self.other(side)]
            for stream_id in self.streams:
                sent = sum(len(f.payload) for f in data_frames(self.link.sent[session], stream_id))
                assert sent <= peer_window + self.granted.get((side, stream_id), 0)

    def teardown(self):
        if not hasattr(self, "link"):
            return
        for _ in range(MAX_SETTLE_ROUNDS):
            for side in ("agent", "relay"):
                self.deliver_to(side, None)
                for stream_id in self.streams:
                    key = (self.other(side), stream_id)
                    size, self.unconsumed[key] = self.unconsumed[key], 0
                    self.sides[side].consume(stream_id, size)
            self.link.collect()
            if not any(self.link.queues.values()):
                break
        else:
            raise AssertionError(f"traffic did not settle within {MAX_SETTLE_ROUNDS} rounds")

        for key, expected in self.expected.items():
            assert self.received[key] == expected, f"bytes of {key} differ"
        for side, stream_id in self.fin_sent:
            assert (side, stream_id) in self.ended
        for stream_id in self.streams:
            both_fins = all((side, stream_id) in self.fin_sent for side in self.sides)
            for side, session in self.sides.items():
                assert ((side, stream_id) in self.closed) == both_fins
                assert session.is_active(stream_id) != both_fins


TunnelTraffic.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
TestTunnelTraffic = TunnelTraffic.TestCase
