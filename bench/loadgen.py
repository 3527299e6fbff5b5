"""The load generator: many chat clients, spread over a few processes, each one a selector loop.

A Swarm starts `processes` worker processes (fork) and deals the clients out
round-robin; it gives orders (connect, settle, set up traffic, start, stop,
report) over a pipe to each, and combines their answers. The processes talk
to each other over socket pairs only for what must be known across them: when
every receiver has a line (the window of the max scenario) and how many lines
each sender sent in all (the drain).

In each process, every client is a non-blocking socket in one `selectors`
loop. Input is read in large chunks, cut at the last newline, and parsed a
whole chunk at a time with one compiled regular expression and a few C-level
passes (bytes.count, zip, dict, Counter); Python code runs per chunk and per
sender in a chunk, never per byte.

Each chat line carries a token `|SENDER.SEQ.SENT_US|`: the sender's id (which
is also in its nickname `bSENDER`), its own sequence number (1, 2, 3...) and
the send time in microseconds on the monotonic clock, counted from an epoch
all the processes share. A delivery is the token arriving at a client other
than its sender, in a line of the right shape (pyChat: `bSENDER: TOKEN...`,
IRC: `:bSENDER!... PRIVMSG #bench :TOKEN...`).
"""
from __future__ import annotations

import errno
import multiprocessing
import re
import resource
import selectors
import socket
import time
import traceback
from array import array
from collections import Counter, deque
from typing import Callable, NamedTuple

HOST = "127.0.0.1"
CHANNEL = b"#bench"
RECV_SIZE = 256 * 1024
MARK = b"|"  # never appears in anything the servers send except our tokens
NEVER_SLOWEST = 1 << 62  # a sequence number no sender reaches
PADDING = b" the quick brown fox jumps over the lazy dog"

NEW, CONNECTING, SIGNING_IN, READY, STALLED, FAILED, CLOSED = (
    "not started", "connecting", "signing in", "ready", "stalled", "failed", "closed")


class PyChatProtocol:
    """pyChat's line protocol (README: Wire protocol)."""

    prompt = b"*** Choose a nickname:"
    welcome = re.compile(rb"^\*\*\* Welcome, [^\n]*\n", re.M)
    refusal = re.compile(rb"^!! ([^\r\n]*)", re.M)
    # The backreference makes the nickname prove it belongs to the token's sender.
    delivery = re.compile(rb"\nb(\d+): \|\1\.(\d+)\.(\d+)\|")
    line_end = PADDING + b"\n"

    def greeting(self, client: Client) -> bytes:
        return b""

    def advance(self, client: Client) -> None:
        """Move a client through sign-in with what it has received so far."""
        if client.stage == 0:
            at = client.inbox.find(self.prompt)
            if at < 0:
                return
            client.inbox = client.inbox[at + len(self.prompt):]
            client.stage = 1
            client.send(client.nick + b"\n")
        welcome = self.welcome.search(client.inbox)
        if welcome:
            client.signed_in(client.inbox[welcome.end():])
            return
        refusal = self.refusal.search(client.inbox)
        if refusal:
            client.fail(refusal.group(1).decode(errors="replace"))

    def say(self, text: bytes) -> bytes:
        return text + b"\n"

    def unframe(self, client: Client, data: bytes) -> bytes:
        return data

    def pongs(self, complete: bytes) -> bytes:
        return b""


class IrcProtocol:
    """Just enough IRC: register, join one channel, PRIVMSG to it, answer PING."""

    registered = re.compile(rb"^:\S+ 001 [^\n]*\n", re.M)
    joined = re.compile(rb"^:\S+ 366 [^\n]*\n", re.M)
    # ERROR, and the numerics that refuse a nickname, a registration or a JOIN
    # (not, say, 422 "MOTD File is missing", which miniircd sends to everyone).
    refusal = re.compile(rb"^(?::\S+ )?((?:ERROR|4(?:0[35]|3[1-7]|5[1-9]|6[1-5]|7[1-7])) [^\r\n]*)", re.M)
    ping = re.compile(rb"^PING ([^\r\n]*)", re.M)
    delivery = re.compile(rb"\n:b(\d+)![^ ]* PRIVMSG #bench :\|\1\.(\d+)\.(\d+)\|")
    line_end = PADDING + b"\r\n"

    def greeting(self, client: Client) -> bytes:
        """What a client sends to sign in: NICK and USER, with its own introduction between them if it has
        one (the commands that make an account or sign in to one)."""
        return b"NICK %s\r\n%sUSER u 0 * :bench\r\n" % (client.nick, getattr(client, "introduction", b""))

    def advance(self, client: Client) -> None:
        client.send(self.pongs(client.inbox))
        if client.stage == 0:
            registered = self.registered.search(client.inbox)
            if registered:
                client.inbox = client.inbox[registered.end():]
                client.stage = 1
                client.send(self.wire(b"JOIN %s\r\n" % CHANNEL))
        if client.stage == 1:
            joined = self.joined.search(client.inbox)
            if joined:
                client.signed_in(client.inbox[joined.end():])
                return
        refusal = self.refusal.search(client.inbox)
        if refusal:
            client.fail(refusal.group(1).decode(errors="replace"))

    def say(self, text: bytes) -> bytes:
        return b"PRIVMSG %s :%s\r\n" % (CHANNEL, text)

    def wire(self, lines: bytes) -> bytes:
        """LINES (each ending in CR LF) as they go to the server."""
        return lines

    def unframe(self, client: Client, data: bytes) -> bytes:
        """What came from the server as lines."""
        return data

    def pongs(self, complete: bytes) -> bytes:
        if b"PING " not in complete:
            return b""
        return b"".join(b"PONG %s\r\n" % arg for arg in self.ping.findall(complete))


class WebSocketProtocol(IrcProtocol):
    """The same IRC over a WebSocket (RFC 6455, as the IRCv3 WebSocket specification puts IRC on it): an
    opening handshake, then one line a message. What comes in is unframed into CR LF lines once per chunk,
    so the rest of the generator (sign-in, deliveries, pongs) reads it as it reads IRC."""

    handshake = (b"GET /socket HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: YmVuY2htYXJrLWNsaWVudA==\r\nSec-WebSocket-Version: 13\r\n"
                 b"Sec-WebSocket-Protocol: text.ircv3.net\r\n\r\n") % HOST.encode()
    MASK = b"\0\0\0\0"      # a client must mask; a key of zeros leaves the payload as it is, at no cost

    def greeting(self, client: Client) -> bytes:
        client.frames = None    # None until the handshake is answered; then the bytes of a partial frame
        return self.handshake

    def advance(self, client: Client) -> None:
        if client.frames is None:
            end = client.inbox.find(b"\r\n\r\n")
            if end < 0:
                return
            if not client.inbox.startswith(b"HTTP/1.1 101 "):
                client.fail(client.inbox.split(b"\r\n", 1)[0].decode(errors="replace"))
                return
            rest, client.inbox, client.frames = client.inbox[end + 4:], b"", b""
            client.send(self.wire(super().greeting(client)))
            client.inbox = self.unframe(client, rest)
        super().advance(client)

    def unframe(self, client: Client, data: bytes) -> bytes:
        """The lines of the whole messages in what came, each ending in CR LF; a partial frame waits."""
        if client.frames is None:
            return data
        buffer = client.frames + data
        lines = []
        at, end = 0, len(buffer)
        while at + 2 <= end:
            size, start = buffer[at + 1] & 0x7F, at + 2
            if size == 126:
                if at + 4 > end:
                    break
                size, start = int.from_bytes(buffer[at + 2:at + 4], "big"), at + 4
            elif size == 127:
                if at + 10 > end:
                    break
                size, start = int.from_bytes(buffer[at + 2:at + 10], "big"), at + 10
            if start + size > end:
                break
            lines.append(buffer[start:start + size])
            at = start + size
        client.frames = buffer[at:]
        return b"\r\n".join(lines) + b"\r\n" if lines else b""

    def wire(self, lines: bytes) -> bytes:
        """IRC lines (each ending in CR LF) as masked text frames, one a line."""
        framed = []
        for line in lines.split(b"\r\n")[:-1]:
            size = len(line)
            head = bytes((0x81, 0x80 | size)) if size < 126 else bytes((0x81, 0xFE)) + size.to_bytes(2, "big")
            framed.append(head + self.MASK + line)
        return b"".join(framed)

    def say(self, text: bytes) -> bytes:
        return self.wire(super().say(text))

    def pongs(self, complete: bytes) -> bytes:
        return self.wire(super().pongs(complete))


PROTOCOLS = {"pychat": PyChatProtocol(), "irc": IrcProtocol(), "websocket": WebSocketProtocol()}


def complete_lines(client, data: bytes) -> bytes:
    """The complete lines in CLIENT's inbox + DATA (b"" if none); the partial last line stays in its inbox.

    The inbox starts with the newline that ended the previous complete line,
    so every complete line handed on is preceded by a newline: the delivery
    patterns anchor on it, which is faster than a multi-line `^`.
    """
    buffer = client.inbox + data
    cut = buffer.rfind(b"\n")
    if cut <= 0:
        client.inbox = buffer
        return b""
    client.inbox = buffer[cut:]
    return buffer[:cut + 1]


def deliveries_in(protocol, complete: bytes, me: bytes) -> tuple[list[tuple[bytes, bytes, bytes]], int]:
    """The deliveries (sender, sequence number, send time) in these complete lines, but the echo of ME's
    own (pyChat echoes a line to its sender; that is no delivery); and how many tokens came in no
    well-formed line."""
    matches = protocol.delivery.findall(complete)
    tokens = complete.count(MARK) >> 1
    malformed = tokens - min(len(matches), complete.count(protocol.line_end)) if tokens else 0
    if matches and me in next(zip(*matches)):
        matches = [match for match in matches if match[0] != me]
    return matches, malformed


def newest_of_each(senders: tuple[bytes, ...], seqs: tuple[bytes, ...]) -> tuple[dict, dict]:
    """Per sender in a chunk, the newest sequence number (the last value per key wins: the highest) and
    how many lines came, in C: Python runs per sender, not per line."""
    newest = dict(zip(senders, seqs))
    return newest, (Counter(senders) if len(newest) > 1 else {senders[0]: len(senders)})


def check_order(matches: list, sender: bytes, previous: int) -> tuple[int, int, int]:
    """One sender's lines in a chunk, after PREVIOUS: its last sequence number, the duplicates, the gaps.
    Only for a chunk whose count does not add up: the usual one needs no line looked at."""
    duplicates = gaps = 0
    for match in matches:
        if match[0] != sender:
            continue
        seq = int(match[1])
        if seq <= previous:
            duplicates += 1
            continue
        if seq != previous + 1:
            gaps += 1
        previous = seq
    return previous, duplicates, gaps


class Client:
    """One simulated user: a socket, its buffers, and where it is in sign-in."""

    def __init__(self, generator: LoadGenerator, ident: int):
        self.generator = generator
        self.ident = ident
        self.nick = b"b%d" % ident
        self.sock: socket.socket | None = None
        self.local_port = 0
        self.state = NEW
        self.stage = 0
        self.inbox = b""  # received bytes not yet parsed: a partial line, or sign-in text
        self.outbox = bytearray()  # bytes the kernel would not take yet
        self.started_ns = 0
        self.signed_in_ns = 0
        self.failure = ""
        self.receiver_index = -1  # its column in Traffic.progress, if it is measured
        self.rcvbuf: int | None = None  # SO_RCVBUF to set before connecting
        self.stall_after_sign_in = False

    @property
    def sign_in_seconds(self) -> float:
        return (self.signed_in_ns - self.started_ns) / 1e9

    def send(self, data: bytes) -> None:
        """Send now what the kernel takes; keep the rest until the socket is writable."""
        if not data or self.state in (FAILED, CLOSED):
            return
        if self.outbox:
            self.outbox += data
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self.fail(f"send: {error.strerror}")
            return
        if sent < len(data):
            self.outbox += data[sent:]
            self.generator.want_write(self, True)

    def signed_in(self, leftover: bytes) -> None:
        self.signed_in_ns = time.perf_counter_ns()
        self.inbox = b"\n"
        self.generator.signing_in -= 1
        if self.stall_after_sign_in:
            self.state = STALLED
            self.generator.selector.unregister(self.sock)
            return
        self.state = READY
        if leftover:
            self.generator.received(self, leftover, self.signed_in_ns)

    def fail(self, reason: str) -> None:
        if self.state in (FAILED, CLOSED):
            return
        if self.state in (CONNECTING, SIGNING_IN):
            self.generator.signing_in -= 1
        self.failure = reason
        self.state = FAILED
        self.generator.forget(self)

    def close(self) -> None:
        if self.state not in (FAILED, CLOSED):
            if self.state in (CONNECTING, SIGNING_IN):
                self.generator.signing_in -= 1
            self.state = CLOSED
            self.generator.forget(self)


class LoadGenerator:
    """One process's clients and the selector loop that drives them."""

    def __init__(self, protocol_name: str, port: int, epoch_ns: int):
        self.protocol = PROTOCOLS[protocol_name]
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.clients: dict[int, Client] = {}
        self.waiting: deque[Client] = deque()  # added, not yet opened
        self.in_flight = 1  # sign-ins at once
        self.signing_in = 0
        self.bytes_received = 0
        self.traffic: Traffic | None = None
        self.epoch_ns = epoch_ns  # shared by every process of a Swarm: tokens carry times against it

    def now_us(self) -> int:
        return (time.perf_counter_ns() - self.epoch_ns) // 1000

    def add_clients(self, idents: list[int], in_flight: int, rcvbuf: int | None, stall: bool) -> list[Client]:
        """Line up new clients; the loop opens them, at most in_flight signing in at once."""
        clients = [Client(self, ident) for ident in idents]
        for client in clients:
            client.rcvbuf = rcvbuf
            client.stall_after_sign_in = stall
            self.clients[client.ident] = client
        self.waiting.extend(clients)
        self.in_flight = max(1, in_flight)
        return clients

    def connecting(self) -> bool:
        """Whether some added client is not yet signed in (nor failed)."""
        return bool(self.waiting or self.signing_in)

    def give_up(self, clients: list[Client]) -> None:
        """Mark those of clients still on their way in as failed."""
        for client in clients:
            if client.state in (CONNECTING, SIGNING_IN):
                client.fail("sign-in timed out")
            elif client.state == NEW:
                client.state, client.failure = FAILED, "never started"
        self.waiting = deque(client for client in self.waiting if client.state == NEW)

    def open(self, client: Client) -> None:
        client.sock = sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if client.rcvbuf:
            # Must precede connect(): the window scale is agreed in the handshake.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, client.rcvbuf)
        # The generator's own sends must not wait for ACKs (Nagle): its latency is not the server's.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        client.state = CONNECTING
        client.started_ns = time.perf_counter_ns()
        self.signing_in += 1
        code = sock.connect_ex((HOST, self.port))
        client.local_port = sock.getsockname()[1]
        if code not in (0, errno.EINPROGRESS):
            client.fail(f"connect: {errno.errorcode.get(code, code)}")
            return
        self.selector.register(sock, selectors.EVENT_WRITE, client)

    def want_write(self, client: Client, wanted: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if wanted else 0)
        self.selector.modify(client.sock, events, client)

    def forget(self, client: Client) -> None:
        if client.sock is None:
            return
        try:
            self.selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()

    def tick(self, longest_wait_s: float) -> None:
        """Open waiting clients, send what the traffic has due, then handle socket events."""
        while self.waiting and self.signing_in < self.in_flight:
            self.open(self.waiting.popleft())
        wait = longest_wait_s
        if self.traffic is not None:
            wait = min(wait, self.traffic.pump())
        self.step(max(wait, 0.0))

    def step(self, timeout_s: float) -> None:
        """Wait up to timeout_s for socket events and handle all that came.

        A registered object that is not a Client is a callable taking the events
        (the process's orders, a link to another generator process).
        """
        for key, events in self.selector.select(timeout_s):
            client = key.data
            if type(client) is not Client:
                client(events)
                continue
            if events & selectors.EVENT_WRITE:
                self.writable(client)
            if events & selectors.EVENT_READ and client.state in (SIGNING_IN, READY):
                self.readable(client)

    def writable(self, client: Client) -> None:
        if client.state == CONNECTING:
            code = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                client.fail(f"connect: {errno.errorcode.get(code, code)}")
                return
            client.state = SIGNING_IN
            self.selector.modify(client.sock, selectors.EVENT_READ, client)
            client.send(self.protocol.greeting(client))
            return
        try:
            sent = client.sock.send(client.outbox)
        except BlockingIOError:
            return
        except OSError as error:
            client.fail(f"send: {error.strerror}")
            return
        del client.outbox[:sent]
        if not client.outbox and client.state in (SIGNING_IN, READY):
            self.want_write(client, False)

    def readable(self, client: Client) -> None:
        try:
            data = client.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as error:
            client.fail(f"recv: {error.strerror}")
            return
        if not data:
            client.fail("closed by the server")
            return
        now_ns = time.perf_counter_ns()
        self.bytes_received += len(data)
        data = self.protocol.unframe(client, data)
        if client.state == SIGNING_IN:
            client.inbox += data
            self.protocol.advance(client)
        else:
            self.received(client, data, now_ns)

    def received(self, client: Client, data: bytes, now_ns: int) -> None:
        """Handle the complete lines in inbox + data (see complete_lines)."""
        complete = complete_lines(client, data)
        if not complete:
            return
        client.send(self.protocol.pongs(complete))
        if self.traffic is not None and client.receiver_index >= 0:
            self.traffic.receive(client, complete, now_ns)

    def close_all(self) -> None:
        for client in self.clients.values():
            if client.sock is not None:
                client.close()
        self.waiting.clear()
        self.traffic = None


class PeerLink:
    """A socket to another generator process of the same Swarm.

    Carries two kinds of news, one line each, latest value per sender only:
    `C SENDER SEQ` (every receiver of mine has that sender's lines up to SEQ;
    the window needs it) and `F SENDER COUNT` (that sender sent COUNT lines in
    all; the drain needs it).
    """

    def __init__(self, generator: LoadGenerator, peer: int, sock: socket.socket):
        self.generator = generator
        self.peer = peer
        self.sock = sock
        sock.setblocking(False)
        self.inbox = b""
        self.outbox = bytearray()
        self.news: dict[tuple[bytes, int], int] = {}
        generator.selector.register(sock, selectors.EVENT_READ, self.on_events)

    def tell(self, kind: bytes, sender: int, value: int) -> None:
        self.news[(kind, sender)] = value

    def flush(self) -> None:
        """Send the news gathered since the last flush (the loop calls this after every tick)."""
        if self.news:
            self.outbox += b"".join(b"%s %d %d\n" % (kind, sender, value)
                                    for (kind, sender), value in self.news.items())
            self.news.clear()
        if not self.outbox:
            return
        try:
            sent = self.sock.send(self.outbox)
        except BlockingIOError:
            sent = 0
        del self.outbox[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbox else 0)
        self.generator.selector.modify(self.sock, events, self.on_events)

    def on_events(self, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self.flush()
        if not events & selectors.EVENT_READ:
            return
        data = self.sock.recv(RECV_SIZE)
        if not data:
            self.generator.selector.unregister(self.sock)
            return
        lines = (self.inbox + data).split(b"\n")
        self.inbox = lines.pop()
        traffic = self.generator.traffic
        if traffic is None:
            return
        for line in lines:
            kind, sender, value = line.split()
            traffic.peer_news(self.peer, kind, int(sender), int(value))


class Traffic:
    """Who sends what and when, and the ledger of every delivery, in one generator process.

    Senders and receivers may be spread over several processes; each process
    sends for its own senders and keeps the ledger of its own receivers. Two
    ways to pace the senders:
    - rate: `rate` lines per second in total, round-robin over the senders
      (each process takes its share of the rate for its share of the senders);
    - window: each sender keeps at most `window` of its own lines in flight,
      a line being in flight until every other receiver, in every process, has
      it (the processes tell each other over their PeerLinks).

    The ledger works a chunk at a time: per chunk, one regex pass, a few
    C-level passes over its columns, and Python code only per sender present.
    """

    def __init__(self, generator: LoadGenerator, me: int, senders: list[int],
                 receivers_by_process: list[list[int]], owner: dict[int, int],
                 links: dict[int, PeerLink], rate: float = 0.0, window: int = 0):
        self.generator = generator
        self.protocol = generator.protocol
        self.say = generator.protocol.say
        self.me = me
        self.links = links
        self.owner = owner
        self.all_senders = senders
        self.senders = [generator.clients[ident] for ident in senders if owner[ident] == me]
        self.sender_by_ident = {client.ident: client for client in self.senders}
        self.rate = rate * len(self.senders) / len(senders)
        self.window = window
        self.fanout = sum(map(len, receivers_by_process)) - 1  # every line goes to all receivers but its sender
        receivers = [generator.clients[ident] for ident in receivers_by_process[me]]
        for index, client in enumerate(receivers):
            client.receiver_index = index
        ids = max(senders) + 1
        # progress[sender][receiver_index]: the last sequence number that receiver
        # has from that sender; a sender's own column is never its minimum.
        self.progress = [[0] * len(receivers) for _ in range(ids)]
        for client in receivers:
            if client.ident < ids:
                self.progress[client.ident][client.receiver_index] = NEVER_SLOWEST
        # Per sender and process: every receiver of that process has up to this one
        # (NEVER_SLOWEST when that process has no receiver but the sender itself).
        self.known = [[0] * ids for _ in receivers_by_process]
        for process, idents in enumerate(receivers_by_process):
            members = set(idents)
            for sender in senders:
                if not members - {sender}:
                    self.known[process][sender] = NEVER_SLOWEST
        self.completed = self.known[me]  # this process's own entry, kept up to date here
        # Per sender: how many of my receivers are still at `completed`.
        self.slowest = [sum(1 for value in row if value != NEVER_SLOWEST) for row in self.progress]
        self.final_sent: dict[int, int] = {}
        self.sent = [0] * ids
        self.ready_senders = set(self.sender_by_ident)
        self.message_times: list[int] = []  # send time of every line of my senders, microseconds
        self.batches: list[tuple[int, array]] = []  # (receive time, send times) per chunk
        self.delivered = 0
        self.malformed = 0
        self.duplicates = 0
        self.gaps = 0
        self.sending = False
        self.start_us = 0
        self.stop_us = 0
        self.total_sent = 0

    def start(self, start_us: int) -> None:
        """Begin sending at start_us (on the shared clock), so that every process starts together."""
        self.start_us = start_us
        self.sending = True

    def stop(self) -> None:
        """Stop sending, and tell the other processes how many lines my senders sent."""
        self.sending = False
        self.stop_us = self.generator.now_us()
        for ident in self.sender_by_ident:
            self.final_sent[ident] = self.sent[ident]
            for link in self.links.values():
                link.tell(b"F", ident, self.sent[ident])

    def all_delivered(self) -> bool:
        """Whether every receiver of this process has every line of every sender (known once stopped)."""
        if len(self.final_sent) < len(self.all_senders):
            return False
        completed = self.completed
        return all(completed[sender] >= count for sender, count in self.final_sent.items())

    def peer_news(self, peer: int, kind: bytes, sender: int, value: int) -> None:
        if kind == b"F":
            self.final_sent[sender] = value
        else:
            self.known[peer][sender] = value
            self.ready_senders.add(sender)

    def send(self, sender: Client, count: int) -> None:
        now = self.generator.now_us()
        ident = sender.ident
        first = self.sent[ident] + 1
        self.sent[ident] += count
        sender.send(b"".join(self.say(b"|%d.%d.%d|%s" % (ident, seq, now, PADDING))
                             for seq in range(first, first + count)))
        self.message_times.extend([now] * count)
        self.total_sent += count

    def pump(self) -> float:
        """Send whatever is due now; return how long the loop may sleep before the next send."""
        if not self.sending or not self.senders:
            return 0.05
        now_us = self.generator.now_us()
        if now_us < self.start_us:
            return (self.start_us - now_us) / 1e6
        if self.window:
            for ident in self.ready_senders:
                completed = min(known[ident] for known in self.known)
                room = self.window - (self.sent[ident] - completed)
                if room > 0:
                    self.send(self.sender_by_ident[ident], room)
            self.ready_senders.clear()
            return 0.05
        elapsed = (now_us - self.start_us) / 1e6
        due = int(elapsed * self.rate) + 1
        senders = self.senders
        while self.total_sent < due:
            self.send(senders[self.total_sent % len(senders)], 1)
        return (due / self.rate) - elapsed

    def receive(self, client: Client, complete: bytes, now_ns: int) -> None:
        """Account for every token in these complete lines received by client."""
        matches, malformed = deliveries_in(self.protocol, complete, b"%d" % client.ident)
        self.malformed += malformed
        if not matches:
            return
        senders, seqs, sent_times = zip(*matches)
        self.delivered += len(matches)
        self.batches.append(((now_ns - self.generator.epoch_ns) // 1000, array("q", map(int, sent_times))))
        index = client.receiver_index
        newest, counts = newest_of_each(senders, seqs)
        for sender_text, last_text in newest.items():
            sender = int(sender_text)
            last = int(last_text)
            row = self.progress[sender]
            previous = row[index]
            if last - previous != counts[sender_text]:
                last, duplicates, gaps = check_order(matches, sender_text, previous)
                self.duplicates += duplicates
                self.gaps += gaps
            row[index] = last
            if previous == self.completed[sender]:
                self.slowest[sender] -= 1
                if not self.slowest[sender]:
                    low = min(row)
                    self.completed[sender] = low
                    self.slowest[sender] = row.count(low)
                    self.completed_changed(sender, low)

    def completed_changed(self, sender: int, completed: int) -> None:
        """My receivers all have sender's lines up to completed: free its window (wherever it is)."""
        owner = self.owner[sender]
        if owner == self.me:
            self.ready_senders.add(sender)
        elif self.window:
            self.links[owner].tell(b"C", sender, completed)

    def ledger(self, start_us: int, end_us: int) -> dict:
        """This process's share of the summary of the lines sent in [start_us, end_us)."""
        latencies = array("q")
        for received, sent_times in self.batches:
            if start_us <= min(sent_times) and max(sent_times) < end_us:
                latencies.extend(map(received.__sub__, sent_times))
            else:
                latencies.extend(received - sent for sent in sent_times if start_us <= sent < end_us)
        return {
            "latencies_us": latencies,
            "lines_sent": sum(1 for sent in self.message_times if start_us <= sent < end_us),
            "delivered": self.delivered,
            "malformed": self.malformed,
            "duplicates": self.duplicates,
            "gaps": self.gaps,
        }


class ClientRecord(NamedTuple):
    """What the Swarm's owner learns about one client."""

    ident: int
    nick: str
    local_port: int
    state: str
    failure: str
    sign_in_s: float | None  # None: it never signed in

    @classmethod
    def of(cls, client: Client) -> ClientRecord:
        return cls(client.ident, client.nick.decode(), client.local_port, client.state, client.failure,
                   client.sign_in_seconds if client.signed_in_ns else None)


class Task(NamedTuple):
    """An order a worker is carrying out: its reply is sent once done() or at the deadline."""

    done: Callable[[], bool]
    deadline: float
    finish: Callable[[], object]


class Worker:
    """One generator process: its clients, its share of the traffic, and its orders from the Swarm."""

    def __init__(self, index: int, orders, links: dict[int, socket.socket], protocol_name: str,
                 port: int, epoch_ns: int, server_pid: int):
        self.index = index
        self.orders = orders
        self.generator = LoadGenerator(protocol_name, port, epoch_ns)
        self.links = {peer: PeerLink(self.generator, peer, sock) for peer, sock in links.items()}
        self.server_pid = server_pid
        self.task: Task | None = None
        self.serving = True
        self.next_server_check = 0.0
        self.server_gone = False
        self.generator.selector.register(orders, selectors.EVENT_READ, self.on_order)

    def serve(self) -> None:
        while self.serving:
            self.generator.tick(0.05)
            for link in self.links.values():
                link.flush()
            task = self.task
            if task is not None and (time.monotonic() >= task.deadline or task.done()):
                self.task = None
                self.reply(task.finish())

    def reply(self, value) -> None:
        self.orders.send(("ok", value))

    def on_order(self, events: int) -> None:
        try:
            name, arguments = self.orders.recv()
        except EOFError:  # the Swarm's owner is gone
            self.serving = False
            return
        try:
            result = getattr(self, f"order_{name}")(**arguments)
        except Exception:  # reported to the owner, who raises it
            self.orders.send(("error", traceback.format_exc()))
            return
        if result is not PENDING:
            self.reply(result)

    def server_alive(self) -> bool:
        if time.monotonic() >= self.next_server_check:
            self.next_server_check = time.monotonic() + 0.5
            self.server_gone = process_gone(self.server_pid)
        return not self.server_gone

    def order_connect(self, idents: list[int], in_flight: int, timeout_s: float,
                      rcvbuf: int | None = None, stall: bool = False):
        """Sign these clients in; reply with their records once all are in or failed, or at timeout_s."""
        clients = self.generator.add_clients(idents, in_flight, rcvbuf, stall)

        def finish() -> list[ClientRecord]:
            self.generator.give_up(clients)
            return [ClientRecord.of(client) for client in clients]

        done = lambda: not self.generator.connecting() or not self.server_alive()
        self.task = Task(done, time.monotonic() + timeout_s, finish)
        return PENDING

    def order_settle(self, quiet_s: float, longest_s: float):
        """Reply once nothing has arrived for quiet_s (at most longest_s)."""
        last = [self.generator.bytes_received, time.monotonic()]

        def quiet() -> bool:
            if self.generator.bytes_received != last[0]:
                last[:] = [self.generator.bytes_received, time.monotonic()]
            return time.monotonic() - last[1] >= quiet_s

        self.task = Task(quiet, time.monotonic() + longest_s, lambda: None)
        return PENDING

    def order_traffic(self, **setup) -> None:
        self.generator.traffic = Traffic(self.generator, self.index, links=self.links, **setup)

    def order_start(self, start_us: int) -> None:
        self.generator.traffic.start(start_us)

    def order_stop(self, drain_timeout_s: float):
        """Stop sending; reply with the stop time once my receivers have every line, or at the timeout."""
        traffic = self.generator.traffic
        traffic.stop()
        self.task = Task(traffic.all_delivered, time.monotonic() + drain_timeout_s, lambda: traffic.stop_us)
        return PENDING

    def order_ledger(self, start_us: int, end_us: int) -> dict:
        return self.generator.traffic.ledger(start_us, end_us)

    def order_records(self) -> list[ClientRecord]:
        return [ClientRecord.of(client) for client in self.generator.clients.values()]

    def order_close(self) -> None:
        self.generator.close_all()

    def order_exit(self) -> None:
        self.generator.close_all()
        self.serving = False


PENDING = object()  # an order's reply comes later, when its Task is done


def run_worker(index: int, orders, inherited: list, pairs: dict, *settings) -> None:
    """The body of a generator process."""
    for connection in inherited:  # other workers' order pipes, copied by fork: not ours
        connection.close()
    links = {}
    for (first, second), (a, b) in pairs.items():
        if first == index:
            links[second] = a
            b.close()
        elif second == index:
            links[first] = b
            a.close()
        else:
            a.close()
            b.close()
    raise_file_limit()
    Worker(index, orders, links, *settings).serve()


def raise_file_limit() -> None:
    """Let this process open as many sockets as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class Swarm:
    """The whole load generator: `processes` worker processes, each with a share of the clients.

    Clients are dealt round-robin over the processes by their ident (0, 1, 2...).
    Every order goes to every process concerned, and the answers are combined
    here; use it as a context manager so that the processes always end.
    """

    ORDER_MARGIN_S = 30.0  # beyond an order's own timeout, before a silent process is an error

    def __init__(self, protocol_name: str, port: int, processes: int, server_pid: int):
        context = multiprocessing.get_context("fork")
        self.epoch_ns = time.perf_counter_ns()
        self.size = max(1, processes)
        pairs = {(i, j): socket.socketpair() for i in range(self.size) for j in range(i + 1, self.size)}
        self.orders = []
        self.processes = []
        for index in range(self.size):
            mine, theirs = context.Pipe()
            process = context.Process(target=run_worker, name=f"loadgen-{index}", daemon=True,
                                      args=(index, theirs, list(self.orders), pairs, protocol_name,
                                            port, self.epoch_ns, server_pid))
            process.start()
            theirs.close()
            self.orders.append(mine)
            self.processes.append(process)
        for a, b in pairs.values():
            a.close()
            b.close()
        self.next_ident = 0
        self.owner: dict[int, int] = {}
        self.fanout = 0

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def now_us(self) -> int:
        return (time.perf_counter_ns() - self.epoch_ns) // 1000

    def ask(self, orders: dict[int, tuple[str, dict]], timeout_s: float = 10.0) -> dict[int, object]:
        """Give each process in orders its order; return their answers by process."""
        for index, order in orders.items():
            self.orders[index].send(order)
        deadline = time.monotonic() + timeout_s + self.ORDER_MARGIN_S
        answers = {}
        for index in orders:
            if not self.orders[index].poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"generator process {index} did not answer {orders[index][0]}")
            status, value = self.orders[index].recv()
            if status == "error":
                raise RuntimeError(f"generator process {index} failed: {value}")
            answers[index] = value
        return answers

    def ask_all(self, name: str, timeout_s: float = 10.0, **arguments) -> list:
        return list(self.ask({index: (name, arguments) for index in range(self.size)}, timeout_s).values())

    def connect(self, count: int, in_flight: int, timeout_s: float, rcvbuf: int | None = None,
                stall: bool = False) -> list[ClientRecord]:
        """Sign in count new clients, at most in_flight at once in all; return their records.

        Returns when every one is signed in or has failed, after timeout_s, or
        as soon as the server is gone (the stragglers are then marked failed).
        """
        idents = list(range(self.next_ident, self.next_ident + count))
        self.next_ident += count
        orders = {}
        for index in range(self.size):
            share = [ident for ident in idents if ident % self.size == index]
            if share:
                self.owner.update(dict.fromkeys(share, index))
                flight = in_flight // self.size + (index < in_flight % self.size)
                orders[index] = ("connect", {"idents": share, "in_flight": flight, "timeout_s": timeout_s,
                                             "rcvbuf": rcvbuf, "stall": stall})
        answers = self.ask(orders, timeout_s)
        return sorted((record for records in answers.values() for record in records), key=lambda r: r.ident)

    def settle(self, quiet_s: float, longest_s: float) -> None:
        """Return once no process has received anything for quiet_s (at most longest_s)."""
        self.ask_all("settle", longest_s, quiet_s=quiet_s, longest_s=longest_s)

    def set_traffic(self, senders: list[int], receivers: list[int], rate: float = 0.0, window: int = 0) -> None:
        """Set up (not start) traffic from senders to receivers (idents of signed-in clients)."""
        receivers_by_process = [[ident for ident in receivers if self.owner[ident] == index]
                                for index in range(self.size)]
        self.fanout = len(receivers) - 1
        self.ask_all("traffic", senders=senders, receivers_by_process=receivers_by_process,
                     owner={ident: self.owner[ident] for ident in senders}, rate=rate, window=window)

    def start_traffic(self) -> int:
        """Start every process's senders at one moment a little ahead; return it (shared clock, µs)."""
        start_us = self.now_us() + 20_000
        self.ask_all("start", start_us=start_us)
        return start_us

    def stop_traffic(self, drain_timeout_s: float) -> int:
        """Stop sending, wait until everything sent has arrived (at most drain_timeout_s); return the stop time."""
        return min(self.ask_all("stop", drain_timeout_s, drain_timeout_s=drain_timeout_s))

    def summary(self, start_us: int, end_us: int) -> dict:
        """Deliveries, losses, latency and the checks on every line, for the lines sent in [start_us, end_us)."""
        ledgers = self.ask_all("ledger", start_us=start_us, end_us=end_us)
        latencies = sorted(latency for ledger in ledgers for latency in ledger["latencies_us"])
        lines = sum(ledger["lines_sent"] for ledger in ledgers)
        expected = lines * self.fanout
        seconds = max(end_us - start_us, 1) / 1e6
        return {
            "lines_sent": lines,
            "deliveries": len(latencies),
            "expected": expected,
            "lost": expected - len(latencies),
            "deliveries_per_s": len(latencies) / seconds,
            "lines_per_s": lines / seconds,
            "latency_ms": latency_profile(latencies),
            **{key: sum(ledger[key] for ledger in ledgers)
               for key in ("delivered", "malformed", "duplicates", "gaps")},
        }

    def records(self) -> list[ClientRecord]:
        return sorted((record for records in self.ask_all("records") for record in records),
                      key=lambda r: r.ident)

    def close_clients(self) -> None:
        self.ask_all("close")

    def shutdown(self) -> None:
        """End every process (asked first, then killed if it lingers)."""
        for index, process in enumerate(self.processes):
            if process.is_alive():
                try:
                    self.orders[index].send(("exit", {}))
                except OSError:
                    pass
        for process in self.processes:
            process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join()
        for orders in self.orders:
            orders.close()


def percentile(sorted_values: list, fraction: float):
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def latency_profile(sorted_us: list[int]) -> dict:
    """p50/p95/p99/max in milliseconds from sorted microsecond latencies."""
    if not sorted_us:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    return {name: percentile(sorted_us, fraction) / 1000
            for name, fraction in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))}
