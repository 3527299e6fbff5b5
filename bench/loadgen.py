"""The load generator: many chat clients driven by one single-threaded selector loop.

Every client is a non-blocking socket in one `selectors` loop. Input is read
in large chunks, cut at the last newline, and parsed a whole chunk at a time
with one compiled regular expression and a few C-level passes (bytes.count,
zip, dict, Counter); Python code runs per chunk and per sender in a chunk,
never per byte.

Each chat line carries a token `|SENDER.SEQ.SENT_US|`: the sender's id (which
is also in its nickname `bSENDER`), its own sequence number (1, 2, 3...) and
the send time in microseconds on this process's monotonic clock. A delivery is
the token arriving at a client other than its sender, in a line of the right
shape (pyChat: `bSENDER: TOKEN...`, IRC: `:bSENDER!... PRIVMSG #bench :TOKEN...`).
"""
from __future__ import annotations

import errno
import re
import selectors
import socket
import time
from array import array
from collections import Counter, deque

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
        return b"NICK %s\r\nUSER u 0 * :bench\r\n" % client.nick

    def advance(self, client: Client) -> None:
        client.send(self.pongs(client.inbox))
        if client.stage == 0:
            registered = self.registered.search(client.inbox)
            if registered:
                client.inbox = client.inbox[registered.end():]
                client.stage = 1
                client.send(b"JOIN %s\r\n" % CHANNEL)
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

    def pongs(self, complete: bytes) -> bytes:
        if b"PING " not in complete:
            return b""
        return b"".join(b"PONG %s\r\n" % arg for arg in self.ping.findall(complete))


PROTOCOLS = {"pychat": PyChatProtocol(), "irc": IrcProtocol()}


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
    """All simulated clients of one run, and the loop that drives them."""

    def __init__(self, protocol_name: str, port: int):
        self.protocol = PROTOCOLS[protocol_name]
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.clients: list[Client] = []
        self.signing_in = 0
        self.bytes_received = 0
        self.traffic: Traffic | None = None
        self.epoch_ns = time.perf_counter_ns()

    def now_us(self) -> int:
        return (time.perf_counter_ns() - self.epoch_ns) // 1000

    def connect(self, count: int, in_flight: int, timeout_s: float, rcvbuf: int | None = None,
                stall: bool = False, server_alive=lambda: True) -> list[Client]:
        """Open `count` clients, at most `in_flight` signing in at once; return them all.

        Returns when every one is signed in or has failed, after timeout_s, or
        as soon as server_alive() says the server is gone (the stragglers are
        then marked failed).
        """
        waiting = deque(Client(self, len(self.clients) + i) for i in range(count))
        started = list(waiting)
        self.clients.extend(started)
        deadline = time.monotonic() + timeout_s
        next_check = 0.0
        while (waiting or self.signing_in) and time.monotonic() < deadline:
            if time.monotonic() >= next_check:
                if not server_alive():
                    break
                next_check = time.monotonic() + 0.5
            while waiting and self.signing_in < in_flight:
                self.open(waiting.popleft(), rcvbuf, stall)
            self.tick(0.05)
        for client in started:
            if client.state in (CONNECTING, SIGNING_IN):
                client.fail("sign-in timed out")
            elif client.state == NEW:
                client.state, client.failure = FAILED, "never started"
        return started

    def open(self, client: Client, rcvbuf: int | None, stall: bool) -> None:
        client.sock = sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            # Must precede connect(): the window scale is agreed in the handshake.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        # The generator's own sends must not wait for ACKs (Nagle): its latency is not the server's.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        client.stall_after_sign_in = stall
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

    def step(self, timeout_s: float) -> None:
        """Wait up to timeout_s for socket events and handle all that came."""
        for key, events in self.selector.select(timeout_s):
            client = key.data
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
        if client.state == SIGNING_IN:
            client.inbox += data
            self.protocol.advance(client)
        else:
            self.received(client, data, now_ns)

    def received(self, client: Client, data: bytes, now_ns: int) -> None:
        """Handle the complete lines in inbox + data; keep the partial last line.

        The inbox starts with the newline that ended the previous complete line,
        so every complete line handed on is preceded by a newline: the delivery
        patterns anchor on it, which is faster than a multi-line `^`.
        """
        buffer = client.inbox + data
        cut = buffer.rfind(b"\n")
        if cut <= 0:
            client.inbox = buffer
            return
        complete = buffer[:cut + 1]
        client.inbox = buffer[cut:]
        client.send(self.protocol.pongs(complete))
        if self.traffic is not None and client.receiver_index >= 0:
            self.traffic.receive(client, complete, now_ns)

    def run(self, seconds: float, done=None) -> None:
        """Drive the loop (and the traffic, if any) for `seconds`, or until done() is true."""
        deadline = time.perf_counter() + seconds
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or (done is not None and done()):
                return
            self.tick(remaining)

    def settle(self, quiet_s: float, longest_s: float) -> None:
        """Keep reading until nothing has arrived for quiet_s (at most longest_s)."""
        deadline = time.perf_counter() + longest_s
        while time.perf_counter() < deadline:
            before = self.bytes_received
            self.run(quiet_s)
            if self.bytes_received == before:
                return

    def tick(self, longest_wait_s: float) -> None:
        """Send what the traffic has due, then handle socket events."""
        wait = longest_wait_s
        if self.traffic is not None:
            wait = min(wait, self.traffic.pump())
        self.step(max(wait, 0.0))

    def close_all(self) -> None:
        for client in self.clients:
            if client.sock is not None:
                client.close()
        self.selector.close()


class Traffic:
    """Who sends what and when, and the ledger of every delivery.

    Two ways to pace the senders:
    - rate: `rate` lines per second in total, round-robin over the senders;
    - window: each sender keeps at most `window` of its own lines in flight,
      a line being in flight until every other measured client has received it.

    The ledger works a chunk at a time: per chunk, one regex pass, a few
    C-level passes over its columns, and Python code only per sender present.
    """

    def __init__(self, generator: LoadGenerator, senders: list[Client], receivers: list[Client],
                 rate: float = 0.0, window: int = 0):
        self.generator = generator
        self.say = generator.protocol.say
        self.delivery = generator.protocol.delivery
        self.line_end = generator.protocol.line_end
        self.senders = senders
        self.sender_by_ident = {client.ident: client for client in senders}
        self.rate = rate
        self.window = window
        self.fanout = len(receivers) - 1  # every line goes to all receivers but its sender
        for index, client in enumerate(receivers):
            client.receiver_index = index
        ids = max(client.ident for client in generator.clients) + 1
        # progress[sender][receiver_index]: the last sequence number that receiver
        # has from that sender; a sender's own column is never its minimum.
        self.progress = [[0] * len(receivers) for _ in range(ids)]
        for client in receivers:
            self.progress[client.ident][client.receiver_index] = NEVER_SLOWEST
        self.completed = [0] * ids  # per sender: every other receiver has up to this one
        self.slowest = [self.fanout] * ids  # per sender: receivers still at `completed`
        self.sent = [0] * ids
        self.ready_senders = set(self.sender_by_ident)
        self.message_times: list[int] = []  # send time of every line, microseconds
        self.batches: list[tuple[int, array]] = []  # (receive time, send times) per chunk
        self.delivered = 0
        self.malformed = 0
        self.duplicates = 0
        self.gaps = 0
        self.sending = False
        self.start_us = 0
        self.total_sent = 0

    def start(self) -> None:
        self.sending = True
        self.start_us = self.generator.now_us()

    def stop(self) -> None:
        self.sending = False

    def all_delivered(self) -> bool:
        return self.delivered >= self.total_sent * self.fanout

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
        if not self.sending:
            return 0.05
        if self.window:
            for ident in self.ready_senders:
                room = self.window - (self.sent[ident] - self.completed[ident])
                if room > 0:
                    self.send(self.sender_by_ident[ident], room)
            self.ready_senders.clear()
            return 0.05
        elapsed = (self.generator.now_us() - self.start_us) / 1e6
        due = int(elapsed * self.rate) + 1
        senders = self.senders
        while self.total_sent < due:
            self.send(senders[self.total_sent % len(senders)], 1)
        return (due / self.rate) - elapsed

    def receive(self, client: Client, complete: bytes, now_ns: int) -> None:
        """Account for every token in these complete lines received by client."""
        matches = self.delivery.findall(complete)
        tokens = complete.count(MARK) >> 1
        if tokens:
            well_formed = min(len(matches), complete.count(self.line_end))
            if well_formed != tokens:
                self.malformed += tokens - well_formed
        if not matches:
            return
        senders, seqs, sent_times = zip(*matches)
        me = b"%d" % client.ident
        if me in senders:  # pyChat echoes a line to its sender; that is no delivery
            matches = [match for match in matches if match[0] != me]
            if not matches:
                return
            senders, seqs, sent_times = zip(*matches)
        self.delivered += len(matches)
        self.batches.append(((now_ns - self.generator.epoch_ns) // 1000, array("q", map(int, sent_times))))
        index = client.receiver_index
        last_seqs = dict(zip(senders, seqs))  # the last value per key wins: the highest
        counts = Counter(senders) if len(last_seqs) > 1 else {senders[0]: len(senders)}
        for sender_text, last_text in last_seqs.items():
            sender = int(sender_text)
            last = int(last_text)
            row = self.progress[sender]
            previous = row[index]
            if last - previous != counts[sender_text]:
                last = self.check_order(sender_text, previous, matches)
            row[index] = last
            if previous == self.completed[sender]:
                self.slowest[sender] -= 1
                if not self.slowest[sender]:
                    low = min(row)
                    self.completed[sender] = low
                    self.slowest[sender] = row.count(low)
                    self.ready_senders.add(sender)

    def check_order(self, sender_text: bytes, previous: int, matches: list) -> int:
        """Count duplicates and gaps in one sender's lines of a chunk; return its last sequence number."""
        for match in matches:
            if match[0] != sender_text:
                continue
            seq = int(match[1])
            if seq <= previous:
                self.duplicates += 1
                continue
            if seq != previous + 1:
                self.gaps += 1
            previous = seq
        return previous

    def summary(self, start_us: int, end_us: int) -> dict:
        """Deliveries, losses and latency for the lines sent in [start_us, end_us)."""
        latencies = []
        for received, sent_times in self.batches:
            if start_us <= min(sent_times) and max(sent_times) < end_us:
                latencies += map(received.__sub__, sent_times)
            else:
                latencies += [received - sent for sent in sent_times if start_us <= sent < end_us]
        latencies.sort()
        lines = sum(1 for sent in self.message_times if start_us <= sent < end_us)
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
        }


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
