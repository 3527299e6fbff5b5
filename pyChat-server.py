#!/usr/bin/env python3
"""pyChat server: many people chatting in rooms over a plain line protocol.

The protocol is described in README.md ("Wire protocol"). This file reads top
to bottom: options and limits; the protocol (framing, cleaning text, names);
the output pump that writes to every socket; the connection handler (one
thread per person); the server object that holds who is where; the context
that slash-commands act through; main().

A line becomes a broadcast in two hops: ClientConnection.on_line() hands it to
ChatServer.say(), which queues it to every member of the room.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import errno
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import secrets
import select
import selectors
import signal
import socket
import socketserver
import ssl
import stat
import sys
import threading
import time
import unicodedata
from typing import Callable, Iterable, Iterator, NamedTuple

try:
    import fcntl
except ImportError:     # Windows: the data directory is not locked against a second server
    fcntl = None

import commands

VERSION = "1.0.0"
log = logging.getLogger("pychat")

# ---------------------------------------------------------------------------
# Options, limits and defaults
# ---------------------------------------------------------------------------

DEFAULT_HOST = "0.0.0.0"          # --host
DEFAULT_PORT = 25000              # --port
MAX_CLIENTS = 1000                # --max-clients (0: no limit)
MAX_PER_IP = 20                   # --max-per-ip (0: no limit)
RATE = 4.0                        # --rate: lines a second a person may send (0: no flood control)
BURST = 20                        # --burst: lines a person may send at once before --rate applies
NICKNAME_TIMEOUT = 30.0           # --nick-timeout: seconds to sign in before being disconnected
IDLE_TIMEOUT = 0.0                # --idle-timeout: seconds of silence before disconnecting (0: never)
KEEPALIVE = 60                    # --keepalive: seconds of quiet before TCP keepalive probes start
MAX_QUEUED_OUTPUT = 256 * 1024    # --max-queue: bytes waiting for a reader before it is cut off
STALL_TIMEOUT = 30.0              # --stall-timeout: seconds a reader may take no data before being cut off
HISTORY_LINES = 20                # --history: lines of a room replayed to a newcomer (0: off)

MAX_LINE_BYTES = 4096             # longest line accepted from a client, without its newline
MAX_NICKNAME_LENGTH = 20
MAX_ROOMS = 500                   # rooms kept at once; empty ones are forgotten first
DEFAULT_ROOM = "lobby"
ANNOUNCE_LIMIT = 200              # rooms bigger than this do not announce every join and leave
QUIT = "quit"                     # the leave reason of someone who said /quit without a message
PASSWORD_TRIES = 3                # wrong server passwords before the connection is closed
MAX_TLS_REFUSALS = 8              # TLS handshakes at once just to say "the server is full"
DRAIN_SECONDS = 1.0               # time allowed to send what is queued to someone who is leaving
SHUTDOWN_SECONDS = 3.0            # time allowed for every connection to close at shutdown
RECEIVE_SIZE = 65536
# Every thread waiting for the interpreter lock wakes up once per interval. With
# thousands of threads runnable at once (everyone leaving together) the default
# 5 ms turns that into a storm; our threads give the lock up at every system
# call anyway, so a longer interval costs no latency.
SWITCH_INTERVAL = 0.05
KERNEL_SEND_BUFFER = 64 * 1024    # the kernel doubles it for its own bookkeeping
OUT_OF_DESCRIPTORS_PAUSE = 0.5    # seconds the accepting thread waits when the process has no file descriptor left
OPERATOR_TRIES = 3                # wrong /op secrets before the connection is closed
ADDRESS_GUESSES = 10              # wrong secrets of any kind from one address (IPv6: /64) before it must wait
GUESS_WINDOW = 600.0              # ... and how long it waits, in seconds since its last wrong guess

# What the data directory (--data-dir) keeps, and its bounds; README, "The data directory".
MAX_RECORD_BYTES = 16 * 1024      # one line of a data file; a longer one is skipped with a log line
MAX_KEY_LENGTH = 400              # a record's key: a name_key(), which NFKD can make longer than the name
MAX_ACCOUNTS = 10000              # registered nicknames
MAX_OPERATORS = 100               # operators made with /oper add
MAX_NAMED_OPERATORS = 100         # ... and more room in the file for names given with --operator
MAX_INVITATIONS = 1000            # one-time codes for --private waiting to be used
INVITATION_SECONDS = 7 * 86400    # how long an invitation code works
MAX_BANS = 1000
MAX_BAN_SECONDS = 3650 * 86400    # the longest ban with a duration; longer is "permanent"
MAX_REASON_LENGTH = 200           # characters of a ban's reason
MAX_ROOM_SETTINGS = 1000          # rooms with a topic or modes kept
MAX_OFFLINE_PER_RECIPIENT = 20    # offline messages waiting for one account
MAX_OFFLINE_PER_SENDER = 10       # offline messages one person may have waiting, for everyone together
MAX_OFFLINE_TOTAL = 2000          # offline messages waiting, for everyone
MAX_MOTD_BYTES = 4096             # of the --motd file that is shown
MAX_MOTD_LINES = 40
COMPACT_SLACK = 64                # a file is rewritten when it holds twice its live records and this many more
COMPACT_SLACK_HISTORY = 1000      # the same, for the history file
DAMAGED_LINES_LOGGED = 20         # damaged lines named in the log, per file
LATEST_TIME_AHEAD = 86400.0       # a time read from disk may be this far ahead of the clock, no further
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1      # 16 MiB and about 50 ms of one core per check
SCRYPT_LENGTH = 32                # bytes of hash kept
SCRYPT_SALT_BYTES = 16            # a new random salt for each account and each password change
MIN_PASSWORD_LENGTH = 8
MAX_IGNORED = 100                 # names an account's /ignore list keeps for messages left while offline
MIN_PASSWORD_DISTINCT = 4         # different characters a password must have
MAX_PASSWORD_BYTES = 256


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the command line; every option has a default that suits a small group."""
    parser = argparse.ArgumentParser(
        description="pyChat server: a chat for the terminal. Clients connect with "
                    "pyChat-client.py or any line-based TCP tool such as nc.")
    parser.add_argument("--version", action="version", version=f"pyChat server {VERSION}")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on; '::' for IPv6 (default: all IPv4 interfaces)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"TCP port; 0 picks a free one and logs it (default: {DEFAULT_PORT})")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (every command)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    limits = parser.add_argument_group("limits (see README, 'Running it on the internet')")
    limits.add_argument("--max-clients", type=int, default=MAX_CLIENTS, metavar="N",
                        help=f"connections allowed at once, 0 for no limit (default: {MAX_CLIENTS})")
    limits.add_argument("--max-per-ip", type=int, default=MAX_PER_IP, metavar="N",
                        help=f"connections allowed from one address, 0 for no limit (default: {MAX_PER_IP})")
    limits.add_argument("--rate", type=float, default=RATE, metavar="LINES",
                        help=f"lines per second one person may send, 0 to turn flood control off "
                             f"(default: {RATE:g})")
    limits.add_argument("--burst", type=int, default=BURST, metavar="LINES",
                        help=f"lines one person may send in a burst before --rate applies (default: {BURST})")
    limits.add_argument("--nick-timeout", type=float, default=NICKNAME_TIMEOUT, metavar="SECONDS",
                        help=f"time a new connection has to sign in (default: {NICKNAME_TIMEOUT:g})")
    limits.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT, metavar="SECONDS",
                        help="disconnect people who send nothing for this long, 0 for never (default: 0)")
    limits.add_argument("--keepalive", type=int, default=KEEPALIVE, metavar="SECONDS",
                        help=f"quiet time before TCP keepalive probes look for vanished peers "
                             f"(default: {KEEPALIVE})")
    limits.add_argument("--max-queue", type=int, default=MAX_QUEUED_OUTPUT, metavar="BYTES",
                        help=f"output waiting for one slow reader before it is disconnected "
                             f"(default: {MAX_QUEUED_OUTPUT})")
    limits.add_argument("--stall-timeout", type=float, default=STALL_TIMEOUT, metavar="SECONDS",
                        help=f"time a reader may accept no data before it is disconnected "
                             f"(default: {STALL_TIMEOUT:g})")
    history = parser.add_argument_group("history")
    history.add_argument("--history", type=int, default=HISTORY_LINES, metavar="N",
                         help=f"lines of a room shown to newcomers, 0 for none (default: {HISTORY_LINES})")
    history.add_argument("--history-file", metavar="PATH",
                         help="keep room history in this file (JSON lines) so it survives restarts; "
                              "with --data-dir, history is kept there instead")
    data = parser.add_argument_group("what lasts (see README, 'The data directory')")
    data.add_argument("--data-dir", metavar="DIR",
                      help="keep accounts, operators, bans, room topics, offline messages and history in DIR "
                           "(created if needed, readable by this user only) so they survive restarts; "
                           "without it they last until the server stops")
    data.add_argument("--operator", action="append", default=[], metavar="NAME",
                      help="the registered account NAME is an operator (repeatable)")
    security = parser.add_argument_group("security")
    security.add_argument("--password", default=os.environ.get("PYCHAT_PASSWORD"),
                          help="password everyone must give to join; prefer the environment "
                               "variable PYCHAT_PASSWORD, which does not show in ps")
    security.add_argument("--op-password", default=os.environ.get("PYCHAT_OP_PASSWORD"),
                          help="secret for /op, which makes someone an operator; prefer the "
                               "environment variable PYCHAT_OP_PASSWORD")
    security.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate (PEM)")
    security.add_argument("--tls-key", metavar="FILE", help="private key for --tls-cert (PEM)")
    options = parser.parse_args(argv)
    if bool(options.tls_cert) != bool(options.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if options.data_dir and options.history_file:
        parser.error("--history-file and --data-dir do not go together: with --data-dir, "
                     "history is kept in DIR/history.jsonl")
    for name in options.operator:
        problem = name_problem(unicodedata.normalize("NFKC", name))
        if problem:
            parser.error(f"--operator {name}: {problem}")
    for name in ("max_clients", "max_per_ip", "rate", "burst", "idle_timeout", "history"):
        if getattr(options, name) < 0:
            parser.error(f"--{name.replace('_', '-')} cannot be negative")
    for name in ("nick_timeout", "keepalive", "max_queue", "stall_timeout"):
        if getattr(options, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be more than 0")
    return options


# ---------------------------------------------------------------------------
# The protocol: framing, cleaning text, names, kinds of line
# ---------------------------------------------------------------------------

class LineReader:
    """Splits a byte stream into lines, never holding more than one line's worth of bytes.

    feed() returns the complete lines it found, as text; a line longer than
    the limit comes out as None, once, and its bytes are dropped as they arrive.
    """

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.partial = bytearray()
        self.discarding = False

    def feed(self, data: bytes) -> list[str | None]:
        lines: list[str | None] = []
        if self.discarding:
            end = data.find(b"\n")
            if end < 0:
                return lines
            data = data[end + 1:]
            self.discarding = False
        self.partial += data
        if b"\n" in data:
            *complete, rest = self.partial.split(b"\n")
            self.partial = bytearray(rest)
            for raw in complete:
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
                lines.append(raw.decode("utf-8", "replace") if len(raw) <= self.max_bytes else None)
        if len(self.partial) > self.max_bytes:
            self.partial.clear()
            self.discarding = True
            lines.append(None)
        return lines


# Control characters move cursors, change colours and clear screens; direction
# overrides make text read differently from what was sent. None of them may
# reach another person's terminal.
_INVISIBLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SPACES = re.compile("[\t\u2028\u2029]")


def clean_text(text: str) -> str:
    """Remove control characters and direction overrides; tabs and line separators become spaces."""
    if not text.isprintable():
        text = _INVISIBLE.sub("", _SPACES.sub(" ", text))
    return text.strip()


RESERVED_NAMES = ("server", "pychat", "system", "admin", "administrator", "operator", "op",
                  "root", "notice", "help", "nobody", "everyone", "all", "you", "me")

# Characters that look alike on a terminal fold to one, so that no one can take
# a name that reads as someone else's. Capitals that look like a different
# Latin letter than their small forms do are folded before casefolding.
_CAPITAL_LOOKALIKES = str.maketrans({
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O",
    "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X", "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H",
    "О": "O", "Р": "P", "С": "C", "Т": "T", "Х": "X", "У": "Y", "Ѕ": "S", "І": "I", "Ј": "J",
})
_LOOKALIKES = str.maketrans({
    "0": "o", "1": "l", "i": "l", "ı": "l", "|": "l", "5": "s", "ɑ": "a", "ɡ": "g",
    # Armenian
    "օ": "o", "ս": "u", "ո": "n", "հ": "h", "ց": "g",
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p",
    "с": "c", "т": "t", "у": "y", "х": "x", "і": "l", "ї": "l", "ј": "j", "ѕ": "s", "һ": "h",
    "ԁ": "d", "ӏ": "l", "ԛ": "q", "ԝ": "w", "ь": "b",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "l", "κ": "k", "μ": "u", "ν": "v", "ο": "o",
    "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ζ": "z", "γ": "y",
})
# Characters that show as nothing: a name made of them, or ending in one, would
# pass for an empty name or for someone else's.
_INVISIBLE_IN_NAMES = re.compile("[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u3164\ufe00-\ufe0f\uffa0"
                                  "\U000e0100-\U000e01ef]")
_SCRIPT_FAMILIES = {"HIRAGANA": "CJK", "KATAKANA": "CJK", "HANGUL": "CJK", "CJK": "CJK"}


def name_key(name: str) -> str:
    """The form two names share when they would look the same: case, accents and look-alikes folded."""
    decomposed = unicodedata.normalize("NFKD", name.translate(_CAPITAL_LOOKALIKES).casefold())
    folded = "".join(ch for ch in decomposed if unicodedata.category(ch)[0] != "M").translate(_LOOKALIKES)
    return folded.replace("rn", "m").replace("vv", "w").replace("_", "-")


def name_problem(name: str, what: str = "Nickname") -> str | None:
    """Why NAME cannot be a nickname or room name, or None when it can."""
    if not name:
        return f"{what} cannot be empty."
    if len(name) > MAX_NICKNAME_LENGTH:
        return f"{what} is too long (at most {MAX_NICKNAME_LENGTH} characters)."
    scripts = set()
    for ch in name:
        if _INVISIBLE_IN_NAMES.match(ch):
            return f"{what} cannot contain the invisible character U+{ord(ch):04X}."
        category = unicodedata.category(ch)
        if category[0] == "L":
            script = unicodedata.name(ch, "UNKNOWN").split()[0]
            scripts.add(_SCRIPT_FAMILIES.get(script, script))
        elif category not in ("Nd", "Mn", "Mc") and ch not in "_-":
            shown = ch if ch.isprintable() else f"U+{ord(ch):04X}"
            return f"{what} cannot contain {shown!r}: use letters, digits, '_' and '-'."
    if unicodedata.category(name[0])[0] != "L":
        return f"{what} must start with a letter."
    if len(scripts) > 1:
        return f"{what} mixes alphabets ({', '.join(sorted(scripts)).lower()}); use one."
    if name_key(name) in _RESERVED_KEYS:
        return f"{what} {name!r} is reserved."
    return None


_RESERVED_KEYS = {name_key(name) for name in RESERVED_NAMES}

PROMPT_NICKNAME = "*** Choose a nickname:"
PROMPT_PASSWORD = "*** Password:"


def same_secret(given: str, secret: str) -> bool:
    """Compare two secrets in a time that does not depend on where they differ."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), secret.encode("utf-8", "replace"))


def notice(text: str) -> str:
    return f"*** {text}"


def reply(text: str) -> str:
    return f"-- {text}"


def error(text: str) -> str:
    return f"!! {text}"


def history_line(when: float, line: str) -> str:
    stamp = datetime.datetime.fromtimestamp(when, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"[history {stamp}] {line}"


class TokenBucket:
    """Flood control: RATE lines a second on average, BURST at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(burst, 1)
        self.tokens = float(self.burst)
        self.updated = time.monotonic()

    def allow(self) -> bool:
        if not self.rate:
            return True
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


# ---------------------------------------------------------------------------
# The output pump
# ---------------------------------------------------------------------------

class OutputPump(threading.Thread):
    """One thread that writes queued output to the sockets.

    The thread that produces a line only appends it to each receiver's outbox,
    so a receiver that stops reading never blocks anyone. Under load many lines
    wait in an outbox by the time the pump reaches it, and go out in one system
    call. A socket that cannot take more is watched until it can.
    """

    def __init__(self, max_queue: int, stall_timeout: float) -> None:
        super().__init__(name="output-pump", daemon=True)
        self.max_queue = max_queue
        self.stall_timeout = stall_timeout
        self.ready: collections.deque[ClientConnection] = collections.deque()
        self.selector = selectors.DefaultSelector()
        self.watched: set[ClientConnection] = set()
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.selector.register(self.wake_reader, selectors.EVENT_READ)
        self.state_lock = threading.Lock()
        self.sleeping = False
        self.running = True

    def queue(self, connections: Iterable[ClientConnection], data: bytes) -> None:
        """Append DATA to the outbox of each connection, and line up the ones to write.

        This runs for every line and every receiver, so it does as little as it
        can. A receiver whose outbox grows past --max-queue is cut off.
        """
        newly_ready = []
        overflowing = []
        limit = self.max_queue
        for connection in connections:
            with connection.outbox_lock:
                if connection.closed or connection.cut_off_reason:
                    continue
                outbox = connection.outbox
                outbox += data
                if len(outbox) > limit:
                    overflowing.append((connection, len(outbox)))
                elif not connection.ready_for_pump and connection.stalled_since is None:
                    # Otherwise the pump has it in line already, or watches until its socket takes more.
                    connection.ready_for_pump = True
                    newly_ready.append(connection)
        for connection, size in overflowing:
            connection.cut_off(f"not reading: {size} bytes waiting")
        if newly_ready:
            self.mark_ready(newly_ready)

    def mark_ready(self, connections: list[ClientConnection]) -> None:
        """Line CONNECTIONS up for writing, waking the pump if it sleeps."""
        self.ready.extend(connections)
        if self.sleeping:
            with self.state_lock:
                if self.sleeping:
                    self.sleeping = False
                    self.wake_writer.send(b"\0")

    def forget(self, connection: ClientConnection) -> None:
        """Stop watching a connection before its socket is closed."""
        with self.state_lock:
            if connection in self.watched:
                self.watched.discard(connection)
                self.selector.unregister(connection.sock)

    def stop(self) -> None:
        self.running = False
        self.wake_writer.send(b"\0")

    def run(self) -> None:
        next_check = time.monotonic() + 1.0
        while self.running:
            with self.state_lock:
                self.sleeping = not self.ready
            for key, _ in self.selector.select(1.0 if self.sleeping else 0):
                if key.fileobj is self.wake_reader:
                    self.wake_reader.recv(4096)
                else:
                    self.ready.append(key.data)     # writable again
            self.sleeping = False
            while self.ready:
                connection = self.ready.popleft()
                try:
                    self.write(connection)
                except Exception:       # one broken connection must not silence everyone
                    log.exception("writing to %r failed", connection)
                    connection.cut_off("could not write to it")
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 1.0
                self.cut_off_stalled()

    def write(self, connection: ClientConnection) -> None:
        more = connection.flush()
        if not more and connection not in self.watched:
            return
        with self.state_lock:
            if more and connection not in self.watched and not connection.closed:
                self.selector.register(connection.sock, selectors.EVENT_WRITE, connection)
                self.watched.add(connection)
            elif not more and connection in self.watched:
                self.watched.discard(connection)
                self.selector.unregister(connection.sock)

    def cut_off_stalled(self) -> None:
        now = time.monotonic()
        with self.state_lock:
            stalled = [c for c in self.watched
                       if c.stalled_since is not None and now - c.stalled_since > self.stall_timeout]
        for connection in stalled:
            connection.cut_off(f"not reading for {self.stall_timeout:g} s")


# ---------------------------------------------------------------------------
# The connection handler: one thread per person
# ---------------------------------------------------------------------------

class Disconnect(Exception):
    """Ends a connection; the message is the reason given to the log and to the room."""


class TooManyGuesses(Exception):
    """An address guessed wrong too often; the message says for how long it must wait."""


class ClientConnection(socketserver.BaseRequestHandler):
    """One person's connection: the socket and its buffers, then the person's place in the chat.

    The socket is non-blocking: this thread waits for input with poll(), and
    output is queued in `outbox` for the pump. Two locks, taken in this order:
    `io_lock` is held around each system call on the socket, so that a TLS
    connection's reads and writes never overlap; `outbox_lock` only around
    changes to the outbox, so that queueing a line never waits for a send.
    """

    server: ChatServer

    def setup(self) -> None:
        self.sock: socket.socket = self.request
        self.address = self.client_address[0]
        self.nick: str | None = None
        self.key: str | None = None
        self.room: Room | None = None
        self.away: str | None = None
        self.operator = False
        self.operator_failures = 0
        self.muted = False
        self.ignoring: set[str] = set()
        self.last_private_from: ClientConnection | None = None
        self.outbox = bytearray()
        self.io_lock = threading.Lock()
        self.outbox_lock = threading.Lock()
        self.ready_for_pump = False
        self.stalled_since: float | None = None
        self.closed = False
        self.cut_off_reason: str | None = None
        self.quit_reason: str | None = None
        self.lines = LineReader()
        self.bucket = TokenBucket(self.server.options.rate, self.server.options.burst)
        self.flood_excess = 0.0
        self.flood_warned = False
        self.connected = self.last_heard = time.monotonic()
        self.server.register(self)
        self.sock.setblocking(False)
        self.input_waiter = InputWaiter(self.sock, self.server.stop_signal)
        try:
            # A fixed kernel buffer: left to itself, Linux grows it to megabytes for a reader that has
            # stopped, and that output would wait out of sight of --max-queue.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, KERNEL_SEND_BUFFER)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            keepalive = self.server.options.keepalive
            interval, probes = max(1, keepalive // 4), 4
            # TCP_USER_TIMEOUT covers what keepalive cannot: a peer that vanished while data was in flight.
            for name, value in (("TCP_KEEPIDLE", keepalive), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", probes),
                                ("TCP_USER_TIMEOUT", (keepalive + interval * probes) * 1000)):
                if hasattr(socket, name):
                    self.sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        except OSError:
            pass    # the peer is already gone; reading will say so

    def __repr__(self) -> str:
        return f"{self.nick or '(signing in)'}@{self.address}"

    # -- the story of a connection -----------------------------------------

    def handle(self) -> None:
        log.info("connection from %s:%s", *self.client_address[:2])
        try:
            if self.server.tls is not None:
                self.start_tls()
            lines = self.read_lines()
            self.send_line(notice(self.server.greeting()))
            if self.server.options.password:
                self.ask_password(lines)
            self.ask_nickname(lines)
            self.bucket = TokenBucket(self.server.options.rate, self.server.options.burst)   # a full burst to start
            for line in lines:
                self.on_line(line)
        except Disconnect as why:
            self.quit_reason = self.quit_reason or str(why)

    def finish(self) -> None:
        self.server.remove(self, self.cut_off_reason or self.quit_reason or "connection lost")
        if self.cut_off_reason is None:
            self.drain()
        with self.io_lock, self.outbox_lock:
            self.closed = True
            self.outbox.clear()
        self.server.pump.forget(self)   # after `closed`, so the pump cannot watch it again
        self.sock.close()

    def ask_password(self, lines: Iterator[str | None]) -> None:
        for _ in range(PASSWORD_TRIES):
            self.send_line(PROMPT_PASSWORD)
            given = next(lines) or ""
            try:
                if self.server.check_secret(self, "server password",
                                            lambda: same_secret(given, self.server.options.password)):
                    return
            except TooManyGuesses as refusal:
                self.send_line(error(f"{refusal}."))
                raise Disconnect("too many wrong passwords from the address") from None
            self.send_line(error("Wrong password."))
        raise Disconnect("wrong password")

    def ask_nickname(self, lines: Iterator[str | None]) -> None:
        while True:
            self.send_line(PROMPT_NICKNAME)
            wanted = next(lines)
            problem = (f"Nickname is too long (at most {MAX_NICKNAME_LENGTH} characters)."
                       if wanted is None else self.server.sign_in(self, wanted.strip()))
            if problem is None:
                return
            self.send_line(error(problem))

    def on_line(self, line: str | None) -> None:
        """One line from a signed-in person: a command, or something to say to the room."""
        if line is None:
            self.send_line(error(f"Line too long (over {MAX_LINE_BYTES} bytes); it was not sent."))
            return
        text = clean_text(line)
        if not text:
            return
        if text.startswith("//"):
            self.server.say(self, text[1:])
        elif text.startswith("/"):
            log.debug("%r: %s", self, text.split(" ", 1)[0])
            self.server.commands.run(Context(self.server, self), text)
            if self.quit_reason:
                raise Disconnect(self.quit_reason)
        else:
            self.server.say(self, text)

    def within_rate(self) -> bool:
        """Flood control: refuse lines over the rate, and disconnect someone who keeps at it."""
        if self.bucket.allow():
            self.flood_warned = False
            return True
        now = time.monotonic()
        # Refused lines drain away at the allowed rate; a pile of them means a flood, not a paste.
        self.flood_excess = max(0.0, self.flood_excess - (now - self.bucket.updated) * self.bucket.rate) + 1
        if self.flood_excess > 2 * self.bucket.burst + 10:
            raise Disconnect("flooding")
        if not self.flood_warned:
            self.flood_warned = True
            self.send_line(error(f"You are sending too fast (limit {self.bucket.rate:g} lines a second); "
                                 "lines are being dropped."))
        return False

    # -- input --------------------------------------------------------------

    def read_lines(self) -> Iterator[str | None]:
        """The lines this person sends, as they come; raises Disconnect on timeouts and closes."""
        options = self.server.options
        while True:
            # Wait first: after a read the socket is nearly always empty, and trying it costs a system call.
            # TLS may hold decrypted bytes that poll() cannot see.
            if not (self.server.tls and self.sock.pending()):
                self.wait_for_input(options.idle_timeout if self.nick else options.nick_timeout)
            try:
                with self.io_lock:
                    data = self.sock.recv(RECEIVE_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue
            except OSError as problem:
                raise Disconnect(f"connection lost ({problem.strerror or problem})") from None
            if not data:
                raise Disconnect("server shutting down" if self.server.stopping else "connection closed")
            self.last_heard = time.monotonic()
            for line in self.lines.feed(data):
                # Every line counts against the rate, whatever it is and whenever it comes.
                if self.within_rate():
                    yield line

    def wait_for_input(self, timeout: float) -> None:
        # Signing in is timed from the connection; afterwards, silence is timed from the last input.
        deadline = None if not timeout else (self.last_heard if self.nick else self.connected) + timeout
        while True:
            if self.server.stopping:
                raise Disconnect("server shutting down")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise Disconnect("timed out" if self.nick else "did not sign in in time")
            if self.input_waiter.wait(remaining):
                return

    def start_tls(self) -> None:
        try:
            self.sock = self.server.tls.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
            while True:
                try:
                    self.sock.do_handshake()
                    return
                except ssl.SSLWantReadError:
                    self.wait_for_input(self.server.options.nick_timeout)    # the sign-in clock
                except ssl.SSLWantWriteError:
                    wait_until_writable(self.sock, 1.0)
        except (ssl.SSLError, OSError) as problem:
            raise Disconnect(f"TLS handshake failed ({problem})") from None

    # -- output -------------------------------------------------------------

    def send_line(self, line: str) -> None:
        self.server.pump.queue((self,), line.encode("utf-8") + b"\n")

    def flush(self) -> bool:
        """Write as much of the outbox as the socket takes now; True if some is left."""
        with self.io_lock:
            with self.outbox_lock:
                self.ready_for_pump = False
                if self.closed or not self.outbox:
                    return False
                pending, self.outbox = self.outbox, bytearray()
            try:
                sent = self.sock.send(pending)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                sent = 0
            except OSError:
                return False        # the reading thread will find the connection gone
            if sent == len(pending) and self.stalled_since is None:
                return False        # the usual case: all of it went, and nothing was waiting before
            with self.outbox_lock:
                if sent < len(pending):
                    # Back in front of whatever was queued during the send.
                    self.outbox[:0] = memoryview(pending)[sent:]
                if sent:
                    self.stalled_since = None
                if self.outbox and self.stalled_since is None:
                    self.stalled_since = time.monotonic()
                return bool(self.outbox)

    def drain(self) -> None:
        """Give queued output a short while to reach someone who is leaving."""
        deadline = time.monotonic() + DRAIN_SECONDS
        while self.flush() and time.monotonic() < deadline:
            wait_until_writable(self.sock, deadline - time.monotonic())

    def disconnect(self, reason: str) -> None:
        """End this connection from another thread, after what is queued has been sent."""
        self.quit_reason = self.quit_reason or reason
        self.wake_reader(socket.SHUT_RD)

    def cut_off(self, reason: str) -> None:
        """End this connection at once, dropping its queued output."""
        with self.outbox_lock:
            if self.cut_off_reason or self.closed:
                return
            self.cut_off_reason = reason
            self.outbox.clear()
        log.warning("cutting off %r: %s", self, reason)
        self.wake_reader(socket.SHUT_RDWR)

    def wake_reader(self, how: int) -> None:
        try:
            # The plain socket method: on a TLS socket the ssl module's shutdown() would also drop
            # the TLS state, which the reading thread may be using at this moment.
            socket.socket.shutdown(self.sock, how)
        except OSError:
            pass


class InputWaiter:
    """Waits for input on a connection's socket, or for the server to stop."""

    def __init__(self, sock: socket.socket, stop_signal: socket.socket) -> None:
        self.sockets = (sock.fileno(), stop_signal.fileno())
        # poll(), not select(), where there is one: select() cannot watch descriptors above 1023.
        self.poller = select.poll() if hasattr(select, "poll") else None
        for fd in self.sockets if self.poller else ():
            self.poller.register(fd, select.POLLIN)

    def wait(self, timeout: float | None) -> bool:
        """True when the socket has input; False when time ran out or the server is stopping."""
        if self.poller is None:
            return self.sockets[0] in select.select(self.sockets, (), (), timeout)[0]
        events = self.poller.poll(None if timeout is None else max(0, int(timeout * 1000)))
        return any(fd == self.sockets[0] for fd, _ in events)


def wait_until_writable(sock: socket.socket, timeout: float) -> None:
    select.select((), (sock,), (), max(0.0, timeout))


# ---------------------------------------------------------------------------
# What lasts: the data directory
# ---------------------------------------------------------------------------
#
# Each kind of record lives in its own file of JSON lines in the data directory
# (--data-dir): accounts, operators, bans, invitations, room settings, offline
# messages and room history. A change is appended to its file; a change that
# someone is told was saved is fsync'ed first. So a kill -9 at any moment
# loses nothing that was confirmed (nor does a power cut, for the fsync'ed
# kinds), and can at worst leave half a line at the end of a file, which the
# next start reports and skips. At start, and whenever a file holds more dead
# lines than live ones, it is rewritten from memory into a temporary file that
# is fsync'ed and renamed over it.
#
# Nothing in a file is trusted: every line is bounded in size, every field is
# checked as if it came from a stranger, and a line that fails a check is
# logged with its file and line number and skipped.
#
# Locks: each store has its own, taken after the server's lock when both are
# held; a store never calls back into the server.

class StorageError(Exception):
    """A data file or directory cannot be used; the message says which and why."""


class StoreFull(Exception):
    """A limit of the data directory was reached; the message is for the person who asked."""


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def open_data_file(path: str, flags: int) -> int:
    """Open PATH for the data directory: never through a symbolic link, never anything but a regular file.

    O_NONBLOCK keeps a FIFO planted at PATH from hanging the open.
    """
    try:
        fd = os.open(path, flags | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0), 0o600)
    except FileNotFoundError:
        raise
    except OSError as problem:
        if problem.errno == errno.ELOOP:
            raise StorageError(f"{path} is a symbolic link; give the path of a regular file") from None
        if problem.errno == errno.ENXIO:
            raise StorageError(f"{path} is not a regular file") from None
        raise StorageError(f"cannot open {path}: {problem.strerror or problem}") from None
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode):
        os.close(fd)
        raise StorageError(f"{path} is not a regular file")
    if status.st_mode & 0o077 and status.st_uid == os.geteuid():
        os.fchmod(fd, 0o600)
    return fd


def fsync_directory(directory: str) -> None:
    """Make a rename or a new file in DIRECTORY survive a power cut."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY | _CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass        # some file systems cannot sync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def write_file_atomically(path: str, data: bytes) -> None:
    """Replace PATH with DATA so that a crash leaves either the old file or the new one, whole.

    The temporary file is PATH.tmp, created exclusively (O_EXCL: an existing
    file or symbolic link there is removed, never written through), readable
    by the server's user only.
    """
    temporary = f"{path}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
    try:
        try:
            fd = os.open(temporary, flags, 0o600)
        except FileExistsError:     # left by a crash, or planted: unlink removes a link, not its target
            os.unlink(temporary)
            fd = os.open(temporary, flags, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as problem:
        raise StorageError(f"cannot write {path}: {problem.strerror or problem}") from None
    fsync_directory(os.path.dirname(path))


def encode_record(record: dict) -> bytes:
    """One line of a data file. Text that cannot be UTF-8 (a lone surrogate) is replaced, never fatal."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False).encode("utf-8", "replace") + b"\n"


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def decode_record(raw: bytes) -> dict:
    """The record on one line of a data file, or ValueError saying what is wrong with it."""
    if not raw.endswith(b"\n"):
        raise ValueError("cut short (the end of a write that did not finish)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    try:
        record = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as problem:
        raise ValueError(f"not JSON ({problem})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    return record


def checked_text(record: dict, field: str, most: int, optional: bool = False) -> str | None:
    """The text in FIELD of a record read from disk, or ValueError: a string, valid Unicode, at most MOST characters."""
    value = record.get(field)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{field!r} is not text")
    if len(value) > most:
        raise ValueError(f"{field!r} is longer than {most} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field!r} holds a lone surrogate, which is not text") from None
    return value


def checked_time(record: dict, field: str, optional: bool = False,
                 ahead: float = LATEST_TIME_AHEAD) -> float | None:
    """A time in FIELD of a record read from disk: seconds since 1970, finite, at most AHEAD seconds from now."""
    value = record.get(field)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field!r} is not a number")
    if not math.isfinite(value) or not 0 <= value <= time.time() + ahead:
        raise ValueError(f"{field!r} is not a time this server could have written ({value!r})")
    return float(value)


class RecordFile:
    """One file of JSON lines in the data directory: read once at start, then appended to and compacted."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.fd: int | None = None
        self.lines = 0                  # lines in the file now, live or dead
        self.skipped = 0

    def read(self, report: bool = True) -> Iterator[tuple[int, dict]]:
        """Each sound record with its line number; damaged lines are logged (with REPORT) and skipped."""
        try:
            fd = open_data_file(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        with os.fdopen(fd, "rb") as file:
            for number in itertools.count(1):
                raw = file.readline(MAX_RECORD_BYTES + 1)
                if not raw:
                    return
                if len(raw) > MAX_RECORD_BYTES:
                    while raw and not raw.endswith(b"\n"):
                        raw = file.readline(RECEIVE_SIZE)
                    if report:
                        self.damaged(number, f"longer than {MAX_RECORD_BYTES} bytes")
                    continue
                if not raw.strip():
                    continue
                try:
                    yield number, decode_record(raw)
                except ValueError as problem:
                    if report:
                        self.damaged(number, str(problem))

    def damaged(self, number: int, why: str) -> None:
        """Say which line of which file was left out, and why."""
        self.skipped += 1
        if self.skipped <= DAMAGED_LINES_LOGGED:
            log.warning("%s line %d: %s; skipped", self.path, number, why)
        elif self.skipped == DAMAGED_LINES_LOGGED + 1:
            log.warning("%s: more damaged lines; only the first %d are named", self.path, DAMAGED_LINES_LOGGED)

    def rewrite(self, records: Iterable[dict]) -> None:
        """Replace the file with exactly RECORDS, atomically, and append to the new file from now on."""
        lines = [encode_record(record) for record in records]
        with self.lock:
            write_file_atomically(self.path, b"".join(lines))
            if self.fd is not None:
                os.close(self.fd)
            self.fd = open_data_file(self.path, os.O_WRONLY | os.O_APPEND)
            self.lines = len(lines)

    def append(self, records: list[dict], durable: bool) -> None:
        """Add RECORDS at the end; with DURABLE, return only once they are on the disk. OSError if not."""
        data = b"".join(encode_record(record) for record in records)
        with self.lock:
            if self.fd is None:
                raise OSError(errno.EBADF, "the file is closed")
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            if durable:
                os.fsync(self.fd)
            self.lines += len(records)

    def close(self) -> None:
        with self.lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


class KeyedStore:
    """Records by key, in memory and, with a file, on disk: every kind the data directory keeps but history.

    The file is a journal of {"key": K, "value": V} and {"key": K, "deleted":
    true} lines; the last line about a key wins. CHECK turns a value read from
    disk into the value kept, or raises ValueError saying what is wrong.
    """

    def __init__(self, file: RecordFile | None, check: Callable[[str, dict], dict], most: int) -> None:
        self.file = file
        self.check = check
        self.most = most
        self.lock = threading.Lock()
        self.records: dict[str, dict] = {}
        if file is not None:
            self._load()

    def _load(self) -> None:
        for number, record in self.file.read():
            key = record.get("key")
            if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
                self.file.damaged(number, "no key, or a key that is not short text")
                continue
            if record.get("deleted") is True:
                self.records.pop(key, None)
                continue
            value = record.get("value")
            try:
                if not isinstance(value, dict):
                    raise ValueError("the value is not a JSON object")
                value = self.check(key, value)
            except ValueError as problem:
                self.file.damaged(number, str(problem))
                continue
            if key not in self.records and len(self.records) >= self.most:
                self.file.damaged(number, f"more than {self.most} records")
                continue
            self.records[key] = value
        self.file.rewrite(self._journal())

    def _journal(self) -> list[dict]:
        return [{"key": key, "value": value} for key, value in self.records.items()]

    def get(self, key: str) -> dict | None:
        with self.lock:
            return self.records.get(key)

    def items(self) -> list[tuple[str, dict]]:
        with self.lock:
            return list(self.records.items())

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def put(self, key: str, value: dict) -> None:
        """Keep VALUE under KEY, on disk before this returns; StoreFull past the limit, StorageError if the disk fails."""
        with self.lock:
            if key not in self.records and len(self.records) >= self.most:
                raise StoreFull(f"the server keeps at most {self.most} of these")
            self._write({"key": key, "value": value})
            self.records[key] = value
            self._compact_if_worth_it()

    def delete(self, key: str) -> bool:
        """Forget KEY, on disk before this returns; False if there was nothing to forget."""
        with self.lock:
            if key not in self.records:
                return False
            self._write({"key": key, "deleted": True})
            del self.records[key]
            self._compact_if_worth_it()
            return True

    def _write(self, record: dict) -> None:
        if self.file is None:
            return
        if len(encode_record(record)) > MAX_RECORD_BYTES:
            raise StoreFull(f"that is more than the {MAX_RECORD_BYTES} bytes a record may take")
        try:
            self.file.append([record], durable=True)
        except OSError as problem:
            log.error("%s: %s", self.file.path, problem.strerror or problem)
            raise StorageError(f"could not save it ({problem.strerror or problem})") from None

    def _compact_if_worth_it(self) -> None:
        if self.file is None or self.file.lines <= 2 * len(self.records) + COMPACT_SLACK:
            return
        try:
            self.file.rewrite(self._journal())
        except StorageError as problem:     # the change itself is on disk already
            log.error("%s", problem)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class HistoryLog:
    """The last lines of each room, appended to a file as they are said and read back at start.

    With a file, it keeps its own copy of each room's last lines (the same
    strings the rooms hold), so that it can compact the file by itself: when
    the file holds twice the lines kept plus COMPACT_SLACK_HISTORY, it is
    rewritten. Rooms are ordered by last use, and only the MAX_ROOMS most
    recently used are kept; the default room always is. A room the server
    forgets is forgotten here too, and in the file by a record saying so.
    Without a file it keeps nothing.
    """

    def __init__(self, file: RecordFile | None, limit: int, keep: str) -> None:
        self.file = file
        self.limit = max(limit, 1)
        self.keep = keep
        self.lock = threading.Lock()
        self.rooms: collections.OrderedDict[str, tuple[str, collections.deque]] = collections.OrderedDict()
        self.kept = 0
        if file is not None:
            self._load()

    def _load(self) -> None:
        # The rooms to keep are the last used, known only at the end of the file: a first reading finds
        # them holding nothing but their keys, and the second keeps their lines and no others.
        recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        for _, record in self.file.read(report=False):
            try:
                room, when, _ = self._entry(record)
            except ValueError:
                continue
            key = name_key(room)
            if when is None:
                recent.pop(key, None)
                continue
            recent[key] = None
            recent.move_to_end(key)
            if len(recent) > MAX_ROOMS:
                del recent[next(k for k in recent if k != self.keep)]
        self.rooms.update((key, ("", collections.deque(maxlen=self.limit))) for key in recent)
        for number, record in self.file.read():
            try:
                room, when, line = self._entry(record)
            except ValueError as problem:
                self.file.damaged(number, str(problem))
                continue
            if name_key(room) not in recent:
                continue
            if when is None:
                lines = self.rooms[name_key(room)][1]
                self.kept -= len(lines)
                lines.clear()
            else:
                self._add(room, when, line, arrange=False)
        if self.file.skipped:
            log.warning("history file %s: skipped %d damaged line(s)", self.file.path, self.file.skipped)
        self.file.rewrite(self._records())
        log.info("history: %d line(s) in %d room(s) from %s", self.kept, len(self.rooms), self.file.path)

    @staticmethod
    def _entry(record: dict) -> tuple[str, float | None, str]:
        """The room, time and line of a history record read from disk, or ValueError; a record that
        forgets its room's lines so far has no time."""
        room = checked_text(record, "room", MAX_NICKNAME_LENGTH)
        if record.get("forget") is True:
            return room, None, ""
        when = checked_time(record, "time")
        line = clean_text(checked_text(record, "line", MAX_LINE_BYTES))
        problem = name_problem(room, "Room name")
        if problem:
            raise ValueError(problem)
        if not line:
            raise ValueError("an empty line")
        return room, when, line

    def _add(self, room: str, when: float, line: str, arrange: bool = True) -> None:
        """Keep a line of ROOM; with ARRANGE, ROOM becomes the last used and the least used may go."""
        key = name_key(room)
        found = self.rooms.get(key)
        if found is None or not found[0]:
            found = self.rooms[key] = (room, found[1] if found else collections.deque(maxlen=self.limit))
        if arrange:
            self.rooms.move_to_end(key)
            if len(self.rooms) > MAX_ROOMS:
                oldest = next(k for k in self.rooms if k != self.keep)
                self.kept -= len(self.rooms.pop(oldest)[1])
        lines = found[1]
        self.kept += len(lines) < lines.maxlen
        lines.append((when, line))

    def _records(self) -> list[dict]:
        return [{"time": when, "room": room, "line": line}
                for room, lines in self.rooms.values() for when, line in lines]

    def rooms_and_lines(self) -> list[tuple[str, list[tuple[float, str]]]]:
        """Every room kept, least recently used first, with its lines."""
        with self.lock:
            return [(room, list(lines)) for room, lines in self.rooms.values()]

    def append(self, room: str, when: float, line: str) -> None:
        """Keep a line just said in ROOM."""
        with self.lock:
            if self.file is not None:
                self._add(room, when, line)
                self._write({"time": when, "room": room, "line": line})

    def forget(self, room: str) -> None:
        """Drop ROOM's lines: the server no longer keeps the room, or it was private and emptied."""
        with self.lock:
            found = self.rooms.pop(name_key(room), None)
            if found is not None and self.file is not None:
                self.kept -= len(found[1])
                self._write({"room": room, "forget": True})

    def _write(self, record: dict) -> None:
        """Append RECORD, compacting when it is time; a file that fails is logged and given up, never fatal."""
        try:
            self.file.append([record], durable=False)
            if self.file.lines > 2 * self.kept + COMPACT_SLACK_HISTORY:
                self.file.rewrite(self._records())
        except (OSError, StorageError) as problem:      # a full disk must not silence the chat
            log.error("history file %s: %s; history is kept in memory only from now on",
                      self.file.path, getattr(problem, "strerror", None) or problem)
            self.file.close()
            self.file = None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# -- accounts, operators, invitations ------------------------------------------

# One hash at a time per core: each takes SCRYPT_MEMORY, and a crowd signing in at once
# must queue for the CPU rather than take the memory of all of them together.
_SCRYPT_SLOTS = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))


def hash_password(password: str, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> bytes:
    """The scrypt hash of PASSWORD with SALT; with the default parameters, tens of milliseconds of one core."""
    with _SCRYPT_SLOTS:
        return hashlib.scrypt(password.encode("utf-8", "replace"), salt=salt, n=n, r=r, p=p,
                              maxmem=2 * 128 * r * n + 1024 * 1024, dklen=SCRYPT_LENGTH)


def password_problem(password: str, nick: str) -> str | None:
    """Why PASSWORD is too weak or too long for NICK's account, or None."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"Password too short: use at least {MIN_PASSWORD_LENGTH} characters."
    if len(password.encode("utf-8", "replace")) > MAX_PASSWORD_BYTES:
        return f"Password too long: at most {MAX_PASSWORD_BYTES} bytes."
    if name_key(nick) in name_key(password):
        return "Password too easy to guess: it contains your nickname."
    if len(set(password)) < MIN_PASSWORD_DISTINCT:
        return f"Password too easy to guess: use at least {MIN_PASSWORD_DISTINCT} different characters."
    return None


def _check_hex(record: dict, field: str, low: int, high: int) -> str:
    value = checked_text(record, field, 2 * high)
    if not re.fullmatch(r"[0-9a-f]+", value) or not 2 * low <= len(value) <= 2 * high or len(value) % 2:
        raise ValueError(f"{field!r} is not {low} to {high} bytes of hexadecimal")
    return value


def _check_integer(record: dict, field: str, low: int, high: int) -> int:
    value = record.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{field!r} is not a whole number from {low} to {high}")
    return value


def _check_name(key: str, record: dict, field: str = "name") -> str:
    """A nickname or room name read from disk: valid, and filed under its own key."""
    name = checked_text(record, field, MAX_NICKNAME_LENGTH)
    problem = name_problem(name) if field != "room" else name_problem(name, "Room name")
    if problem and "reserved" not in problem:
        raise ValueError(problem)
    if name_key(name) != key.split("/")[0]:
        raise ValueError(f"{name!r} is filed under the key of another name ({key!r})")
    return name


class Accounts:
    """Registered nicknames, by name_key(): each with a scrypt hash of its password and its own salt."""

    def __init__(self, store_file: RecordFile | None) -> None:
        self.store = KeyedStore(store_file, self._check, MAX_ACCOUNTS)

    @staticmethod
    def _check(key: str, record: dict) -> dict:
        n = _check_integer(record, "n", 2 ** 10, 2 ** 20)
        if n & (n - 1):
            raise ValueError("'n' is not a power of two")
        ignoring = record.get("ignoring", [])
        if not isinstance(ignoring, list) or len(ignoring) > MAX_IGNORED or not all(
                isinstance(key, str) and 0 < len(key) <= MAX_KEY_LENGTH for key in ignoring):
            raise ValueError(f"'ignoring' is not a list of at most {MAX_IGNORED} names")
        return {"name": _check_name(key, record), "salt": _check_hex(record, "salt", 16, 64),
                "hash": _check_hex(record, "hash", SCRYPT_LENGTH, SCRYPT_LENGTH), "n": n,
                "r": _check_integer(record, "r", 1, 32), "p": _check_integer(record, "p", 1, 16),
                "since": checked_time(record, "since"), "ignoring": ignoring}

    def name(self, nick: str) -> str | None:
        """The registered spelling of NICK's account (any look-alike finds it), or None for a guest's name."""
        record = self.store.get(name_key(nick))
        return record["name"] if record else None

    def names(self) -> list[str]:
        return sorted((record["name"] for _, record in self.store.items()), key=str.casefold)

    def _record(self, nick: str, password: str, since: float | None = None, ignoring: list | None = None) -> dict:
        salt = secrets.token_bytes(SCRYPT_SALT_BYTES)
        return {"name": nick, "salt": salt.hex(), "hash": hash_password(password, salt).hex(),
                "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "since": since or time.time(),
                "ignoring": ignoring or []}

    def register(self, nick: str, password: str) -> None:
        """Reserve NICK (and its look-alikes) for whoever knows PASSWORD; StoreFull if it cannot be."""
        key = name_key(nick)
        if key in self.store:
            raise StoreFull(f"{self.store.get(key)['name']} is registered already.")
        self.store.put(key, self._record(nick, password))

    def verify(self, nick: str, password: str) -> bool:
        """True if PASSWORD is NICK's; the comparison takes the same time wherever the hashes differ."""
        record = self.store.get(name_key(nick))
        if record is None:
            return False
        given = hash_password(password, bytes.fromhex(record["salt"]), record["n"], record["r"], record["p"])
        return hmac.compare_digest(given, bytes.fromhex(record["hash"]))

    def set_password(self, nick: str, password: str) -> None:
        record = self.store.get(name_key(nick))
        self.store.put(name_key(nick), self._record(record["name"], password, record["since"], record["ignoring"]))

    def ignoring(self, nick: str) -> list[str]:
        """The name keys NICK's owner ignores (kept from their last /ignore), [] for a guest's name."""
        record = self.store.get(name_key(nick))
        return list(record["ignoring"]) if record else []

    def set_ignoring(self, nick: str, keys: Iterable[str]) -> None:
        record = self.store.get(name_key(nick))
        if record is not None:
            self.store.put(name_key(nick), dict(record, ignoring=sorted(keys)[:MAX_IGNORED]))

    def remove(self, nick: str) -> bool:
        return self.store.delete(name_key(nick))


class Operators:
    """The names whose accounts are operators: made so with /oper add, or by --operator at a start.

    A name is an operator's only once someone signs in to its account (or
    registers it); --operator names that have no account yet may, on a
    --private server, choose their password at their first sign-in.
    """

    def __init__(self, store_file: RecordFile | None, named_at_start: Iterable[str]) -> None:
        self.store = KeyedStore(store_file, self._check, MAX_OPERATORS + MAX_NAMED_OPERATORS)
        self.named_at_start = {name_key(name): name for name in named_at_start}
        for key, name in self.named_at_start.items():
            if key not in self.store:
                self.store.put(key, {"name": name, "by": "--operator", "since": time.time()})

    @staticmethod
    def _check(key: str, record: dict) -> dict:
        return {"name": _check_name(key, record), "by": checked_text(record, "by", MAX_NICKNAME_LENGTH),
                "since": checked_time(record, "since")}

    def __contains__(self, nick: str) -> bool:
        return name_key(nick) in self.store

    def names(self) -> list[str]:
        return sorted((record["name"] for _, record in self.store.items()), key=str.casefold)

    def add(self, nick: str, by: str) -> None:
        if len(self.store) >= MAX_OPERATORS:
            raise StoreFull(f"There are {MAX_OPERATORS} operators already.")
        self.store.put(name_key(nick), {"name": nick, "by": by, "since": time.time()})

    def remove(self, nick: str) -> bool:
        return self.store.delete(name_key(nick))


class Invitations:
    """One-time codes that let a named person into a --private server to choose their password."""

    def __init__(self, store_file: RecordFile | None) -> None:
        self.store = KeyedStore(store_file, self._check, MAX_INVITATIONS)

    @staticmethod
    def _check(key: str, record: dict) -> dict:
        return {"name": _check_name(key, record), "code": _check_hex(record, "code", 32, 32),
                "by": checked_text(record, "by", MAX_NICKNAME_LENGTH),
                "expires": checked_time(record, "expires", ahead=INVITATION_SECONDS + LATEST_TIME_AHEAD)}

    def create(self, nick: str, by: str) -> str:
        """A new code for NICK, replacing any earlier one; it works once, within INVITATION_SECONDS."""
        code = "-".join(secrets.token_hex(3) for _ in range(3))
        self.store.put(name_key(nick), {"name": nick, "code": hashlib.sha256(code.encode()).hexdigest(),
                                        "by": by, "expires": time.time() + INVITATION_SECONDS})
        return code

    def waiting(self, nick: str) -> bool:
        record = self.store.get(name_key(nick))
        return record is not None and record["expires"] > time.time()

    def check(self, nick: str, code: str) -> bool:
        """True if CODE is NICK's invitation; it works until remove(), which comes once the account is made."""
        record = self.store.get(name_key(nick))
        if record is None or record["expires"] <= time.time():
            return False
        given = hashlib.sha256(code.strip().lower().encode("utf-8", "replace")).hexdigest()
        return hmac.compare_digest(given, record["code"])

    def remove(self, nick: str) -> bool:
        return self.store.delete(name_key(nick))


# -- bans ----------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d{1,7})([smhdw])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float | None:
    """Seconds in a duration such as 30s, 10m, 2h, 7d, 2w or 1h30m; None for 'permanent'. ValueError if neither."""
    word = text.strip().lower()
    if word == "permanent":
        return None
    parts = _DURATION_PART.findall(word)
    if not parts or "".join(number + unit for number, unit in parts) != word:
        raise ValueError(f"{text!r} is not a duration: use a number and s, m, h, d or w (10m, 2h, 7d), "
                         f"or 'permanent'")
    seconds = sum(int(number) * _DURATION_UNITS[unit] for number, unit in parts)
    if not 0 < seconds <= MAX_BAN_SECONDS:
        raise ValueError(f"A duration must be more than 0 and at most {MAX_BAN_SECONDS // 86400} days.")
    return float(seconds)


def describe_duration(seconds: float) -> str:
    """A short human form of a duration: 45s, 12m, 3h 20m, 6d 4h."""
    seconds = max(1, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{value}{unit}" for value, unit in ((days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")) if value]
    return " ".join(parts[:2])


def utc_text(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def ip_of(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a connection comes from, an IPv4 address mapped into IPv6 read as IPv4; None if not one."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def address_bucket(address: str) -> str:
    """What --max-per-ip and wrong-guess counting count by: the address, or for IPv6 its /64 network.

    An IPv6 host is usually given a whole /64, so counting single addresses
    would let it take every place by cycling through them.
    """
    ip = ip_of(address)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip) if ip is not None else address


class Ban(NamedTuple):
    """One ban: of an account (or a guest's nickname), an address or a network."""

    kind: str                   # "account", "address" or "network"
    target: str                 # name_key() of an account, or an address or network as ipaddress spells it
    shown: str                  # the target as people see it: the nickname as spelt
    reason: str | None
    by: str
    since: float
    expires: float | None       # None: until someone lifts it

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.target}"

    def active(self, now: float) -> bool:
        return self.expires is None or self.expires > now

    def how_long(self, now: float) -> str:
        if self.expires is None:
            return "permanently"
        return f"until {utc_text(self.expires)} ({describe_duration(self.expires - now)} left)"

    def refusal(self, now: float) -> str:
        """What the banned person is told."""
        return (f"You are banned from this server {self.how_long(now)}"
                + (f": {self.reason}" if self.reason else "") + ".")


def ban_target(text: str) -> tuple[str, str] | None:
    """('address', ADDRESS) or ('network', NETWORK) if TEXT is one; None if it should be a nickname."""
    if not re.fullmatch(r"[0-9A-Fa-f:.]+(/\d{1,3})?", text) or not re.search(r"[.:]", text):
        return None
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an address or a network (such as 203.0.113.7, "
                         f"203.0.113.0/24 or 2001:db8::/48).") from None
    if network.num_addresses == 1:
        ip = ip_of(str(network.network_address))
        return "address", str(ip)
    if network.prefixlen < (8 if network.version == 4 else 16):
        raise ValueError(f"{text} is too wide a network to ban (at most /8 for IPv4, /16 for IPv6).")
    return "network", str(network)


class Bans:
    """Every ban, with indexes so that the door can look up an address without a scan of the file."""

    def __init__(self, store_file: RecordFile | None) -> None:
        self.store = KeyedStore(store_file, self._check, MAX_BANS)
        self.lock = threading.Lock()
        self._index()

    @staticmethod
    def _check(key: str, record: dict) -> dict:
        kind = record.get("kind")
        target = checked_text(record, "target", MAX_KEY_LENGTH)
        if kind == "account":
            if name_key(target) != target:
                raise ValueError(f"{target!r} is not an account's key")
        elif kind in ("address", "network"):
            try:
                found = ban_target(target)
            except ValueError as problem:
                raise ValueError(str(problem)) from None
            if found != (kind, target):
                raise ValueError(f"{target!r} is not an {kind}")
        else:
            raise ValueError(f"'kind' is not account, address or network ({kind!r})")
        if key != f"{kind}:{target}":
            raise ValueError(f"filed under {key!r}, not under its target")
        return {"kind": kind, "target": target, "shown": checked_text(record, "shown", 64),
                "reason": checked_text(record, "reason", MAX_REASON_LENGTH, optional=True),
                "by": checked_text(record, "by", MAX_NICKNAME_LENGTH), "since": checked_time(record, "since"),
                "expires": checked_time(record, "expires", optional=True, ahead=MAX_BAN_SECONDS + LATEST_TIME_AHEAD)}

    def _index(self) -> None:
        bans = [Ban(**record) for _, record in self.store.items()]
        with self.lock:
            self.by_key = {ban.key: ban for ban in bans}
            self.networks = [(ipaddress.ip_network(ban.target), ban) for ban in bans if ban.kind == "network"]

    def add(self, ban: Ban) -> None:
        self.store.put(ban.key, ban._asdict())
        self._index()

    def get(self, key: str) -> Ban | None:
        with self.lock:
            return self.by_key.get(key)

    def remove(self, key: str) -> Ban | None:
        ban = self.by_key.get(key)
        if ban is not None and self.store.delete(key):
            self._index()
        return ban

    def for_address(self, address: str, now: float) -> Ban | None:
        """The ban that keeps ADDRESS out, if one does; quick, for the accepting thread."""
        ip = ip_of(address)
        if ip is None:
            return None
        with self.lock:
            found = self.by_key.get(f"address:{ip}")
            if found is None or not found.active(now):
                found = next((ban for network, ban in self.networks
                              if ip.version == network.version and ip in network and ban.active(now)), None)
        return found

    def for_account(self, nick: str, now: float) -> Ban | None:
        found = self.by_key.get(f"account:{name_key(nick)}")
        return found if found is not None and found.active(now) else None

    def all(self, now: float) -> list[Ban]:
        """Every ban still in force, soonest to end first; those that ended are dropped."""
        with self.lock:
            bans = list(self.by_key.values())
        ended = [ban.key for ban in bans if not ban.active(now)]
        if ended:
            for key in ended:
                self.store.delete(key)
            self._index()
        return sorted((ban for ban in bans if ban.active(now)),
                      key=lambda ban: (ban.expires is None, ban.expires or 0, ban.shown))


# -- rooms and offline messages ------------------------------------------------

class SavedRoom(NamedTuple):
    """What outlasts a restart of a room's settings: its topic and its modes."""

    topic: str | None
    modes: tuple[str, ...]


class RoomSettingsStore:
    """Topics and modes of rooms, by the room's name_key(). The rooms core calls load() and save()."""

    def __init__(self, store_file: RecordFile | None) -> None:
        self.store = KeyedStore(store_file, self._check, MAX_ROOM_SETTINGS)

    @staticmethod
    def _check(key: str, record: dict) -> dict:
        modes = record.get("modes", [])
        if not isinstance(modes, list) or len(modes) > 16 or not all(
                isinstance(mode, str) and re.fullmatch(r"[a-z-]{1,20}", mode) for mode in modes):
            raise ValueError("'modes' is not a list of a few short lowercase words")
        return {"name": _check_name(key, record, "room"),
                "topic": checked_text(record, "topic", MAX_LINE_BYTES, optional=True), "modes": modes}

    def load(self, room: str) -> SavedRoom | None:
        """The settings saved for ROOM, or None if there are none."""
        record = self.store.get(name_key(room))
        return SavedRoom(record["topic"], tuple(record["modes"])) if record else None

    def save(self, room: str, topic: str | None, modes: Iterable[str] = ()) -> None:
        """Keep ROOM's topic and modes across restarts; nothing set means nothing kept."""
        modes = sorted(set(modes))
        if topic is None and not modes:
            self.store.delete(name_key(room))
        else:
            self.store.put(name_key(room), {"room": room, "topic": topic, "modes": modes})


class OfflineMessage(NamedTuple):
    sender: str
    sender_key: str
    when: float
    text: str


class OfflineMessages:
    """Private messages kept for accounts that are offline, until they next sign in.

    One record a message, under RECIPIENT_KEY/NUMBER; bounded per recipient,
    per sender and in total.
    """

    def __init__(self, store_file: RecordFile | None) -> None:
        self.store = KeyedStore(store_file, self._check, MAX_OFFLINE_TOTAL)
        self.lock = threading.Lock()
        self.numbers = itertools.count(int(time.time() * 1000))

    @staticmethod
    def _check(key: str, record: dict) -> dict:
        recipient, slash, number = key.partition("/")
        if not slash or not number.isdigit():
            raise ValueError(f"{key!r} is not RECIPIENT/NUMBER")
        sender = checked_text(record, "from", MAX_NICKNAME_LENGTH)
        return {"to": _check_name(key, record, "to"), "from": sender,
                "from_key": checked_text(record, "from_key", MAX_KEY_LENGTH),
                "time": checked_time(record, "time"), "text": clean_text(checked_text(record, "text", MAX_LINE_BYTES))}

    def leave(self, sender: str, recipient: str, text: str) -> None:
        """Keep TEXT for RECIPIENT; StoreFull (saying which limit) if it cannot be kept."""
        recipient_key, sender_key = name_key(recipient), name_key(sender)
        with self.lock:
            waiting = self.store.items()
            if sum(key.startswith(recipient_key + "/") for key, _ in waiting) >= MAX_OFFLINE_PER_RECIPIENT:
                raise StoreFull(f"{recipient} has {MAX_OFFLINE_PER_RECIPIENT} messages waiting already; "
                                "no more can be kept.")
            if sum(record["from_key"] == sender_key for _, record in waiting) >= MAX_OFFLINE_PER_SENDER:
                raise StoreFull(f"You have {MAX_OFFLINE_PER_SENDER} messages waiting for people already; "
                                "no more can be kept until they are read.")
            try:
                self.store.put(f"{recipient_key}/{next(self.numbers)}",
                               {"to": recipient, "from": sender, "from_key": sender_key, "time": time.time(),
                                "text": text})
            except StoreFull:
                raise StoreFull("The server holds as many offline messages as it can; try later.") from None

    def take(self, recipient: str) -> list[OfflineMessage]:
        """Every message kept for RECIPIENT, oldest first; they are no longer kept."""
        prefix = name_key(recipient) + "/"
        with self.lock:
            found = sorted(((key, record) for key, record in self.store.items() if key.startswith(prefix)),
                           key=lambda item: (item[1]["time"], int(item[0].rpartition("/")[2])))
            for key, _ in found:
                self.store.delete(key)
        return [OfflineMessage(record["from"], record["from_key"], record["time"], record["text"])
                for _, record in found]

    def forget(self, recipient: str) -> None:
        self.take(recipient)


# -- the message of the day ------------------------------------------------------

class MessageOfTheDay:
    """The lines of the --motd file, read again whenever the file changes (its time, size or inode).

    Bounded (MAX_MOTD_BYTES, MAX_MOTD_LINES) and cleaned like chat text; a
    file that is missing or not a regular file is logged once and shows as
    no message.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.version: tuple | None = None
        self.text: list[str] = []
        self.complained = False

    def lines(self) -> list[str]:
        if not self.path:
            return []
        try:
            status = os.stat(self.path)
            version = (status.st_mtime_ns, status.st_size, status.st_ino)
        except OSError as problem:
            self._complain(f"cannot read the message of the day {self.path}: {problem.strerror}")
            return []
        with self.lock:
            if version != self.version:
                self.text, self.version = self._read(), version
            return list(self.text)

    def _read(self) -> list[str]:
        try:
            fd = os.open(self.path, os.O_RDONLY | _CLOEXEC | getattr(os, "O_NONBLOCK", 0))
        except OSError as problem:
            self._complain(f"cannot read the message of the day {self.path}: {problem.strerror}")
            return []
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                self._complain(f"the message of the day {self.path} is not a regular file")
                return []
            data = os.read(fd, MAX_MOTD_BYTES + 1)
        except OSError as problem:
            self._complain(f"cannot read the message of the day {self.path}: {problem.strerror}")
            return []
        finally:
            os.close(fd)
        if len(data) > MAX_MOTD_BYTES:
            log.warning("message of the day %s: only its first %d bytes are shown", self.path, MAX_MOTD_BYTES)
        self.complained = False
        lines = (clean_text(line) for line in data[:MAX_MOTD_BYTES].decode("utf-8", "replace").splitlines())
        return [line for line in lines if line][:MAX_MOTD_LINES]

    def _complain(self, problem: str) -> None:
        if not self.complained:
            self.complained = True
            log.warning("%s", problem)


# -- the directory --------------------------------------------------------------

class DataDirectory:
    """Everything the server keeps across restarts: one file per kind in --data-dir, or memory only without it.

    Files: accounts.jsonl, operators.jsonl, invitations.jsonl, bans.jsonl,
    rooms.jsonl, offline.jsonl, history.jsonl; and `lock`, which keeps a second
    server from using the same directory.
    """

    def __init__(self, directory: str | None, history_file: str | None, history_limit: int,
                 operators: Iterable[str] = ()) -> None:
        self.directory = directory
        self.lock_fd: int | None = None
        if directory:
            self._prepare(directory)

        def file(name: str) -> RecordFile | None:
            return RecordFile(os.path.join(directory, name)) if directory else None

        self.accounts = Accounts(file("accounts.jsonl"))
        self.operators = Operators(file("operators.jsonl"), operators)
        self.invitations = Invitations(file("invitations.jsonl"))
        self.bans = Bans(file("bans.jsonl"))
        self.rooms = RoomSettingsStore(file("rooms.jsonl"))
        self.offline = OfflineMessages(file("offline.jsonl"))
        history_path = os.path.join(directory, "history.jsonl") if directory else history_file
        self.history = HistoryLog(RecordFile(history_path) if history_path else None, history_limit,
                                  name_key(DEFAULT_ROOM))
        if directory:
            log.info("data directory %s: %d account(s), %d ban(s), %d offline message(s)", directory,
                     len(self.accounts.store), len(self.bans.store), len(self.offline.store))

    def _prepare(self, directory: str) -> None:
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            status = os.stat(directory)
        except OSError as problem:
            raise StorageError(f"cannot use {directory} as the data directory: {problem.strerror}") from None
        if not stat.S_ISDIR(status.st_mode):
            raise StorageError(f"{directory} is not a directory")
        if status.st_mode & 0o077 and status.st_uid == os.geteuid():
            os.chmod(directory, 0o700)
        self.lock_fd = open_data_file(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT)
        if fcntl is not None:
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise StorageError(f"{directory} is in use by another pyChat server") from None

    def close(self) -> None:
        for store in (self.accounts.store, self.operators.store, self.invitations.store, self.bans.store,
                      self.rooms.store, self.offline.store, self.history):
            store.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


# ---------------------------------------------------------------------------
# The server object: who is here, rooms, and every broadcast
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Room:
    """A room: who is in it, its topic, and its last lines."""

    name: str
    members: set[ClientConnection] = dataclasses.field(default_factory=set)
    topic: str | None = None
    history: collections.deque[tuple[float, str]] = dataclasses.field(default_factory=collections.deque)
    last_used: float = dataclasses.field(default_factory=time.monotonic)


class Person(NamedTuple):
    """What commands may know about someone: a snapshot, not a live object."""

    nick: str
    room: str
    away: str | None
    operator: bool
    muted: bool


class RoomSummary(NamedTuple):
    """What commands may know about a room."""

    name: str
    people: int
    topic: str | None


class ChatServer(socketserver.ThreadingTCPServer):
    """The listening socket, and everything shared between connections, behind one lock."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 4096         # the kernel caps this at net.core.somaxconn

    def __init__(self, options: argparse.Namespace, command_table: commands.CommandTable) -> None:
        self.options = options
        self.commands = command_table
        self.address_family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
        self.lock = threading.Lock()
        self.people: dict[str, ClientConnection] = {}           # signed in, by name_key()
        self.rooms: dict[str, Room] = {}                        # by name_key()
        self.connections: set[ClientConnection] = set()         # everyone, signed in or not
        self.per_address: collections.Counter[str] = collections.Counter()   # by address_bucket()
        self.admitted = 0                                       # connections given a thread
        self.refusing = 0                                       # TLS refusals under way
        self.failures: dict[str, tuple[int, float]] = {}        # wrong secrets and the last one's time, by bucket
        self.out_of_descriptors = False                         # accept() failed for want of one; logged once
        self.spare_descriptor: int | None = None                # given up to accept a newcomer just to tell them
        self.ignored: collections.Counter[str] = collections.Counter()    # how many ignore each name_key()
        self.stopping = False
        self.stop_signal, self.stop_trigger = socket.socketpair()
        self.tls = self.make_tls_context() if options.tls_cert else None
        self.data = DataDirectory(options.data_dir, options.history_file, options.history, options.operator)
        for room_name, lines in self.data.history.rooms_and_lines():
            self.room_named(room_name).history.extend(lines)
        self.room_named(DEFAULT_ROOM)
        self.spare_descriptor = os.open(os.devnull, os.O_RDONLY | _CLOEXEC)
        self.pump = OutputPump(options.max_queue, options.stall_timeout)
        super().__init__((options.host, options.port), ClientConnection)
        self.pump.start()

    def make_tls_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.options.tls_cert, self.options.tls_key)
        return context

    # -- admission ------------------------------------------------------------

    def get_request(self) -> tuple[socket.socket, tuple]:
        """Accept a newcomer. Out of file descriptors, tell them so with the spare one, and log it once."""
        try:
            request = super().get_request()
        except OSError as problem:
            if problem.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self.turn_away_for_want_of_descriptors(problem)
            raise
        if self.out_of_descriptors:
            self.out_of_descriptors = False
            log.warning("file descriptors are available again; newcomers are let in")
        return request

    def turn_away_for_want_of_descriptors(self, problem: OSError) -> None:
        """Without a descriptor the newcomer stays in the listen queue and accept() fails at once, again and
        again: free the spare descriptor to take the newcomer and tell them, or wait a little."""
        if not self.out_of_descriptors:
            self.out_of_descriptors = True
            log.error("cannot accept connections: %s; newcomers are told to try again later "
                      "(raise the open-file limit with ulimit -n, or lower --max-clients)", problem.strerror)
        told = False
        if self.spare_descriptor is not None:
            os.close(self.spare_descriptor)
            self.spare_descriptor = None
            try:
                newcomer, _ = self.socket.accept()
                newcomer.setblocking(False)
                try:
                    newcomer.send(f"{error('The server is out of resources. Try again later.')}\n".encode())
                finally:
                    newcomer.close()
                told = True
            except OSError:
                pass
            try:
                self.spare_descriptor = os.open(os.devnull, os.O_RDONLY | _CLOEXEC)
            except OSError:
                pass
        if not told:
            time.sleep(OUT_OF_DESCRIPTORS_PAUSE)

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        """Give a newcomer a thread of its own, or turn it away when it is banned, or the server or its address is full.

        Every count taken here is given back in release(), on every path.
        """
        address, bucket = client_address[0], address_bucket(client_address[0])
        options = self.options
        now = time.time()
        ban = self.data.bans.for_address(address, now)
        with self.lock:
            if ban is not None:
                refusal = ban.refusal(now)
            elif options.max_clients and self.admitted >= options.max_clients:
                refusal = f"The server is full ({options.max_clients} connections). Try again later."
            elif options.max_per_ip and self.per_address[bucket] >= options.max_per_ip:
                refusal = f"Too many connections from your address (at most {options.max_per_ip})."
            else:
                self.per_address[bucket] += 1
                self.admitted += 1
                refusal = None
        if refusal is None:
            try:
                super().process_request(request, client_address)
                return
            except (RuntimeError, MemoryError, OSError) as problem:    # out of threads, memory or processes
                self.release(bucket)
                log.error("cannot start a thread for %s: %s", address, problem)
                refusal = "The server is out of resources. Try again later."
        with self.lock:
            # Over TLS the refusal needs a handshake first: a thread, but only a few at a time.
            explain = self.tls is None or self.refusing < MAX_TLS_REFUSALS
            if explain and self.tls is not None:
                self.refusing += 1
        log.warning("refused %s: %s", address, refusal)
        if not explain:
            self.shutdown_request(request)
        elif self.tls is None:
            self.refuse(request, refusal)
        else:
            try:
                threading.Thread(target=self.refuse, args=(request, refusal), daemon=True).start()
            except (RuntimeError, MemoryError):
                with self.lock:
                    self.refusing -= 1
                self.shutdown_request(request)

    def refuse(self, request: socket.socket, refusal: str) -> None:
        """Tell a newcomer why it cannot come in, and close the connection."""
        try:
            if self.tls is not None:
                request.settimeout(2.0)
                request = self.tls.wrap_socket(request, server_side=True)
            request.sendall(f"{error(refusal)}\n".encode())
        except (OSError, ssl.SSLError):
            pass
        finally:
            self.shutdown_request(request)
            if self.tls is not None:
                with self.lock:
                    self.refusing -= 1

    def process_request_thread(self, request: socket.socket, client_address: tuple) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.release(address_bucket(client_address[0]))

    def release(self, bucket: str) -> None:
        """Give back what process_request() counted for a newcomer from BUCKET."""
        with self.lock:
            self.admitted -= 1
            self.per_address[bucket] -= 1
            if not self.per_address[bucket]:
                del self.per_address[bucket]

    def handle_error(self, request: socket.socket, client_address: tuple) -> None:
        log.exception("connection from %s failed", client_address[0])

    def register(self, connection: ClientConnection) -> None:
        with self.lock:
            self.connections.add(connection)

    def greeting(self) -> str:
        """The first line a newcomer reads: who is here, and the flood limit for clients that pace themselves."""
        with self.lock:
            greeting = f"pyChat {VERSION}: {len(self.people)} online."
        if self.options.rate:
            greeting += (f" Flood limit: {self.options.burst} lines at once, "
                         f"then {self.options.rate:g} a second.")
        return greeting

    def check_secret(self, connection: ClientConnection, what: str, is_right: Callable[[], bool]) -> bool:
        """Run IS_RIGHT, a check of a secret someone gave, within the limits on guessing.

        Every wrong try from an address (IPv6: its /64) makes the next answer
        slower, up to five seconds; after ADDRESS_GUESSES of them the address
        must wait GUESS_WINDOW before trying again (TooManyGuesses). A try is
        counted before it is checked, so guesses sent at once over many
        connections are counted too.
        """
        bucket = address_bucket(connection.address)
        now = time.monotonic()
        with self.lock:
            wrong, last = self.failures.get(bucket, (0, 0.0))
            if now - last >= GUESS_WINDOW:
                wrong = 0
            if wrong >= ADDRESS_GUESSES:
                wait = GUESS_WINDOW - (now - last)
            else:
                wait = 0.0
                if len(self.failures) > 10000:
                    self.failures = {b: f for b, f in self.failures.items() if now - f[1] < GUESS_WINDOW}
                self.failures[bucket] = (wrong + 1, now)
        if wait:
            log.warning("refused a try at the %s from %r: %d wrong in a row", what, connection, wrong)
            raise TooManyGuesses(f"Too many wrong passwords from your address; try again in "
                                 f"{describe_duration(wait)}")
        if is_right():
            with self.lock:
                self.failures.pop(bucket, None)
            return True
        log.warning("wrong %s from %r (%d in a row)", what, connection, wrong + 1)
        time.sleep(min(wrong + 1, 5))
        return False

    # -- people and rooms -------------------------------------------------------

    def sign_in(self, connection: ClientConnection, nick: str) -> str | None:
        """Give CONNECTION the nickname and put it in the default room, or say why not."""
        nick = unicodedata.normalize("NFKC", nick)
        with self.lock:
            problem = self.nickname_problem(nick, connection)
            if problem:
                return problem
            connection.nick, connection.key = nick, name_key(nick)
            self.people[connection.key] = connection
            connection.send_line(notice(f"Welcome, {nick}! Type /help for the commands."))
            self._enter(connection, self.rooms[name_key(DEFAULT_ROOM)])
        log.info("%r signed in", connection)
        return None

    def nickname_problem(self, nick: str, claimant: ClientConnection) -> str | None:
        """Why CLAIMANT cannot be called NICK (already NFKC-normalised), or None. Lock held."""
        taken = self.people.get(name_key(nick))
        if taken is not None and taken is not claimant:
            return f"Nickname {nick!r} is taken (or looks too much like {taken.nick!r})."
        return name_problem(nick)

    def remove(self, connection: ClientConnection, reason: str) -> None:
        """Take someone out of the chat and tell their room."""
        with self.lock:
            self.connections.discard(connection)
            if connection.key is None or self.people.get(connection.key) is not connection:
                log.info("%r closed: %s", connection, reason)
                return
            del self.people[connection.key]
            for key in connection.ignoring:
                self.count_ignore(key, -1)
            room = connection.room
            room.members.discard(connection)
            if not self.stopping:
                self._announce(room, notice(f"{connection.nick} quit" if reason == QUIT
                                            else f"{connection.nick} quit ({reason})"))
        log.info("%r left: %s", connection, reason)

    def room_named(self, name: str) -> Room:
        """The room called NAME, created if needed; the caller holds the lock or runs before serving."""
        key = name_key(name)
        room = self.rooms.get(key)
        if room is None:
            if len(self.rooms) >= MAX_ROOMS:
                empty = [r for r in self.rooms.values() if not r.members and name_key(r.name) != DEFAULT_ROOM]
                if not empty:
                    raise commands.CommandError("Too many rooms; join one of those in /rooms.")
                forgotten = min(empty, key=lambda r: r.last_used)
                del self.rooms[name_key(forgotten.name)]
                self.data.history.forget(forgotten.name)
            settings = self.data.rooms.load(name)
            room = self.rooms[key] = Room(name, topic=settings.topic if settings else None,
                                          history=collections.deque(maxlen=self.options.history or 1))
        return room

    def _enter(self, connection: ClientConnection, room: Room) -> None:
        """Put someone in a room: tell the room, show them who is there, the topic and recent lines."""
        connection.room = room
        room.members.add(connection)
        room.last_used = time.monotonic()
        self._announce(room, notice(f"{connection.nick} joined #{room.name}"), skip=connection)
        others = [m.nick for m in itertools.islice(room.members, 16) if m is not connection][:15]
        if len(room.members) > len(others) + 1:
            others.append(f"{len(room.members) - len(others) - 1} more")
        company = f" with {', '.join(others)}" if others else ", alone for now"
        connection.send_line(notice(f"You are in #{room.name}{company}."))
        if room.topic:
            connection.send_line(notice(f"Topic of #{room.name}: {room.topic}"))
        if self.options.history:
            for when, line in room.history:
                connection.send_line(history_line(when, line))

    def _announce(self, room: Room, line: str, skip: ClientConnection | None = None) -> None:
        """A join or leave notice; rooms too big for them to be news do without."""
        if len(room.members) <= ANNOUNCE_LIMIT:
            self._to_room(room, line, skip)

    def _to_room(self, room: Room, line: str, skip: ClientConnection | None = None,
                 sender: ClientConnection | None = None) -> None:
        """Queue LINE to everyone in ROOM (but SKIP, and those ignoring SENDER). Lock held."""
        receivers = room.members
        if skip is not None or (sender is not None and sender.key in self.ignored):
            receivers = [member for member in receivers if member is not skip
                         and not (sender and sender.key in member.ignoring)]
        self.pump.queue(receivers, line.encode("utf-8") + b"\n")

    def count_ignore(self, key: str, change: int) -> None:
        """Keep count of how many people ignore KEY, so that lines from everyone else skip the check."""
        self.ignored[key] += change
        if self.ignored[key] <= 0:
            del self.ignored[key]

    def say(self, connection: ClientConnection, text: str) -> None:
        """A chat line from CONNECTION to its room."""
        self._speak(connection, f"{connection.nick}: {text}")

    def act(self, connection: ClientConnection, text: str) -> None:
        """An action line, '* nick waves', to the room."""
        self._speak(connection, f"* {connection.nick} {text}")

    def _speak(self, connection: ClientConnection, line: str) -> None:
        with self.lock:
            if connection.muted:
                connection.send_line(error("You are muted; the room does not hear you."))
                return
            room = connection.room
            if self.options.history:
                when = time.time()
                room.history.append((when, line))
                # In the file before anyone sees it, so whatever was seen survives a kill -9.
                self.data.history.append(room.name, when, line)
            self._to_room(room, line, sender=connection)

    # -- shutting down -------------------------------------------------------------

    def stop(self) -> None:
        """Tell everyone, close every connection, and wait a little for them to go."""
        self.shutdown()
        with self.lock:
            self.stopping = True
            for connection in self.connections:
                connection.send_line(notice("Server shutting down."))
        self.stop_trigger.send(b"\0")
        deadline = time.monotonic() + SHUTDOWN_SECONDS
        while time.monotonic() < deadline:
            with self.lock:
                if not self.connections:
                    break
            time.sleep(0.05)
        self.pump.stop()
        self.server_close()
        self.data.close()


# ---------------------------------------------------------------------------
# The context: all a slash-command may see and do
# ---------------------------------------------------------------------------

class Context:
    """What a command is given: who called, and verbs that act through the server.

    Commands never touch sockets, locks or the server's tables; every verb here
    takes the server's lock itself. A verb that cannot do what was asked raises
    commands.CommandError, which the caller sees as an error line.
    """

    def __init__(self, server: ChatServer, caller: ClientConnection) -> None:
        self._server = server
        self._caller = caller

    @property
    def nick(self) -> str:
        return self._caller.nick

    @property
    def room(self) -> str:
        return self._caller.room.name

    @property
    def is_operator(self) -> bool:
        return self._caller.operator

    @property
    def default_room(self) -> str:
        return DEFAULT_ROOM

    @property
    def command_table(self) -> commands.CommandTable:
        return self._server.commands

    def reply(self, text: str) -> None:
        """Send the caller a reply line."""
        self._caller.send_line(reply(text))

    def error(self, text: str) -> None:
        """Send the caller an error line."""
        self._caller.send_line(error(text))

    def online(self) -> list[Person]:
        """Everyone signed in, sorted by nickname."""
        with self._server.lock:
            people = [self._person(c) for c in self._server.people.values()]
        return sorted(people, key=lambda p: p.nick.casefold())

    def room_members(self) -> list[Person]:
        """Everyone in the caller's room, sorted by nickname."""
        with self._server.lock:
            people = [self._person(c) for c in self._caller.room.members]
        return sorted(people, key=lambda p: p.nick.casefold())

    def rooms(self) -> list[RoomSummary]:
        """Every room that has people in it, sorted by name."""
        with self._server.lock:
            rooms = [RoomSummary(r.name, len(r.members), r.topic) for r in self._server.rooms.values() if r.members]
        return sorted(rooms, key=lambda r: r.name.casefold())

    def act(self, text: str) -> None:
        """Say an action line to the caller's room: '* nick TEXT'."""
        self._server.act(self._caller, text)

    def send_private(self, nick: str, text: str) -> None:
        """Send TEXT to NICK alone; the caller gets a copy, and the away message if there is one."""
        caller = self._caller
        with self._server.lock:
            target = self._find(nick)
            if target is caller:
                raise commands.CommandError("That is you.")
            if caller.key not in target.ignoring:
                target.send_line(f"[pm from {caller.nick}] {text}")
                target.last_private_from = caller
            caller.send_line(f"[pm to {target.nick}] {text}")
            if target.away:
                caller.send_line(reply(f"{target.nick} is away: {target.away}"))

    def last_private_sender(self) -> str:
        """The nickname of the last person who sent the caller a private message and is still here."""
        with self._server.lock:
            sender = self._caller.last_private_from
            if sender is None:
                raise commands.CommandError("No one has sent you a private message yet.")
            if self._server.people.get(sender.key) is not sender:
                raise commands.CommandError(f"{sender.nick} has left.")
            return sender.nick

    def rename(self, new_nick: str) -> None:
        """Change the caller's nickname, by the same rules as signing in; the room is told."""
        caller = self._caller
        new_nick = unicodedata.normalize("NFKC", new_nick)
        with self._server.lock:
            problem = self._server.nickname_problem(new_nick, caller)
            if problem:
                raise commands.CommandError(problem)
            people, new_key = self._server.people, name_key(new_nick)
            if new_nick == caller.nick:
                raise commands.CommandError(f"You are already {new_nick}.")
            old_nick, old_key = caller.nick, caller.key
            del people[old_key]
            caller.nick, caller.key = new_nick, new_key
            people[new_key] = caller
            if old_key in self._server.ignored:
                for person in people.values():
                    if old_key in person.ignoring:
                        person.ignoring.discard(old_key)
                        person.ignoring.add(new_key)
                self._server.count_ignore(new_key, self._server.ignored.pop(old_key))
            self._server._to_room(caller.room, notice(f"{old_nick} is now known as {new_nick}"))
        log.info("%s@%s is now known as %s", old_nick, caller.address, new_nick)

    def join(self, room_name: str) -> None:
        """Move the caller to ROOM, creating it if needed; both rooms are told."""
        room_name = unicodedata.normalize("NFKC", room_name.removeprefix("#"))
        problem = name_problem(room_name, "Room name")
        if problem:
            raise commands.CommandError(problem)
        caller = self._caller
        with self._server.lock:
            room = self._server.room_named(room_name)
            if room is caller.room:
                raise commands.CommandError(f"You are already in #{room.name}.")
            old = caller.room
            old.members.discard(caller)
            self._server._announce(old, notice(f"{caller.nick} left #{old.name}"))
            self._server._enter(caller, room)

    def set_away(self, reason: str | None) -> None:
        """Mark the caller away with REASON, or back with None."""
        self._caller.away = reason

    @property
    def away(self) -> str | None:
        return self._caller.away

    def ignored(self) -> list[str]:
        """Nicknames the caller ignores that are online now."""
        with self._server.lock:
            return sorted(p.nick for k, p in self._server.people.items() if k in self._caller.ignoring)

    def ignore(self, nick: str, ignoring: bool = True) -> str:
        """Stop (or start again) showing the caller NICK's lines; returns NICK as they spell it."""
        with self._server.lock:
            target = self._find(nick)
            if target is self._caller:
                raise commands.CommandError("You cannot ignore yourself.")
            if ignoring and target.key not in self._caller.ignoring:
                self._caller.ignoring.add(target.key)
                self._server.count_ignore(target.key, +1)
            elif not ignoring and target.key in self._caller.ignoring:
                self._caller.ignoring.discard(target.key)
                self._server.count_ignore(target.key, -1)
            elif not ignoring:
                raise commands.CommandError(f"You are not ignoring {target.nick}.")
            return target.nick

    def become_operator(self, secret: str) -> None:
        """Make the caller an operator if SECRET is the server's operator password.

        Three wrong tries close the connection; an address that tried too often must wait.
        """
        caller = self._caller
        expected = self._server.options.op_password
        if not expected:
            raise commands.CommandError("This server has no operator password, so no one can be an operator.")
        try:
            right = self._server.check_secret(caller, "operator password", lambda: same_secret(secret, expected))
        except TooManyGuesses as refusal:
            caller.disconnect("too many wrong operator passwords from the address")
            raise commands.CommandError(f"{refusal}. Closing the connection.") from None
        if not right:
            caller.operator_failures += 1
            if caller.operator_failures >= OPERATOR_TRIES:
                caller.disconnect("too many wrong operator passwords")
                raise commands.CommandError(f"Wrong operator password, {OPERATOR_TRIES} times: "
                                            "closing the connection.")
            raise commands.CommandError("Wrong operator password.")
        caller.operator = True
        log.warning("%r is now an operator", self._caller)

    def kick(self, nick: str, reason: str | None) -> str:
        """Disconnect NICK, telling them and their room why; returns NICK as they spell it."""
        with self._server.lock:
            target = self._find(nick)
        why = f"kicked by {self.nick}" + (f": {reason}" if reason else "")
        target.send_line(notice(f"You were {why}."))
        target.disconnect(why)
        log.warning("%r %s", target, why)
        return target.nick

    def set_muted(self, nick: str, muted: bool) -> str:
        """Mute or unmute NICK in every room; returns NICK as they spell it."""
        with self._server.lock:
            target = self._find(nick)
            if target.muted == muted:
                raise commands.CommandError(f"{target.nick} is already {'muted' if muted else 'not muted'}.")
            target.muted = muted
            target.send_line(notice(f"You were {'muted' if muted else 'unmuted'} by {self.nick}."))
        log.warning("%r %s by %s", target, "muted" if muted else "unmuted", self.nick)
        return target.nick

    def set_topic(self, topic: str) -> None:
        """Set the topic of the caller's room; the room is told."""
        with self._server.lock:
            room = self._caller.room
            room.topic = topic
            self._server._to_room(room, notice(f"{self.nick} set the topic of #{room.name}: {topic}"))

    def quit(self, message: str | None = None) -> None:
        """Say goodbye and close the caller's connection once its output is sent."""
        self._caller.send_line(notice("Bye."))
        self._caller.disconnect(message or QUIT)

    def _find(self, nick: str) -> ClientConnection:
        """The connection of NICK (spelt any look-alike way); the lock is held."""
        found = self._server.people.get(name_key(unicodedata.normalize("NFKC", nick)))
        if found is None:
            raise commands.CommandError(f"No one called {nick} is online. /online lists who is.")
        return found

    @staticmethod
    def _person(connection: ClientConnection) -> Person:
        return Person(connection.nick, connection.room.name, connection.away, connection.operator,
                      connection.muted)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def raise_file_limit(wanted: int) -> None:
    """Allow as many open sockets as the system lets us, and say so if it is fewer than wanted."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("open-file limit is %d, below the %d that --max-clients needs; "
                    "raise it with ulimit -n", soft, wanted)


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    logging.basicConfig(level=logging.DEBUG if options.verbose else logging.WARNING if options.quiet
                        else logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    raise_file_limit(options.max_clients + 64 if options.max_clients else 0)
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        command_table = commands.load_commands()
        server = ChatServer(options, command_table)
    except (commands.CommandLoadError, StorageError, OSError, ssl.SSLError) as problem:
        log.error("cannot start: %s", problem)
        return 1
    host, port = server.server_address[:2]
    # Printed even with -q: scripts and tests started with --port 0 read the port from it.
    print(f"pyChat {VERSION} listening on {host}:{port}", file=sys.stderr, flush=True)

    stop_requested = threading.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda number, frame: stop_requested.set())
    serving = threading.Thread(target=server.serve_forever, name="accept", daemon=True)
    serving.start()
    while not stop_requested.wait(1.0):
        pass
    log.info("shutting down")
    server.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
