#!/usr/bin/env python3
"""pyChat server: many people chatting in rooms over a plain line protocol.

The protocol is described in README.md ("Wire protocol"). This file reads top
to bottom: options and limits, the configuration file that may give them
(--config) and the log; the protocol (framing, cleaning text, names,
the events the core produces and the one class that turns them into lines);
a connection's output and the switchboard, the one thread that reads every
signed-in connection and writes to every socket; the connection handler; what lasts across restarts
(Storage, the one owner of an SQLite database: accounts, operators, bans, room
settings, offline messages, history); the server object, which owns people and rooms and every
change to them; the context that
slash-commands act through; then the IRC front door (README, "IRC clients"):
reading and writing IRC messages, the IRC protocol object that puts the
core's events in IRC's words, and the IRC connection and its listener; the
browser door (README, "Browser"): the web client's files over HTTP, and IRC
over WebSocket through that same IRC connection; main(),
which stops on SIGTERM and reloads on SIGHUP (ChatServer.reload, which /rehash
and IRC's REHASH call too).

A line becomes a broadcast in two hops: the switchboard reads it and
ClientConnection.on_line() (or, from an IRC client, IrcConnection.on_line()
and irc_privmsg()) hands it to ChatServer.say(), which renders the event once
per audience of the room (PyChatProtocol.encode, IrcProtocol.encode) and
queues the bytes to each member's output, which the switchboard writes.

Threads: a connection signs in on a worker thread of its own; from then on
the one switchboard thread reads it and writes to it, and each command it
sends runs on a worker (Workers, Switchboard). Two more threads accept
connections, one per port.
"""
from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import datetime
import errno
import functools
import hashlib
import hmac
import http
import inspect
import ipaddress
import itertools
import json
import logging
import math
import operator
import os
import queue
import re
import secrets
import select
import selectors
import signal
import socket
import socketserver
import sqlite3
import ssl
import stat
import struct
import sys
import threading
import time
import types
import unicodedata
from typing import Any, Callable, Iterable, Iterator, NamedTuple

try:
    import fcntl
    import termios
except ImportError:     # Windows: the data directory is not locked against a second server
    fcntl = termios = None

import commands

VERSION = "3.0.0.dev0"
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
ROOMS_PER_PERSON = 20             # --rooms-per-person: rooms one person may be in at once (0: no limit)

MAX_LINE_BYTES = 4096             # longest line accepted from a client, without its newline
MAX_NICKNAME_LENGTH = 20
MAX_ROOMS = 500                   # rooms kept at once; empty ones are forgotten first
DEFAULT_ROOM = "lobby"
ROOM_SETTINGS = ("key", "invite-only", "topic", "op", "deop", "voice", "devoice", "limit", "moderated",
                 "outside-messages", "secret", "ban", "unban", "exempt", "unexempt", "invite-mask",
                 "uninvite-mask")     # what /mode changes
ROOM_MASK_LISTS = ("ban", "exempt", "invite-mask")     # /mode's lists of NICK!USER@HOST masks, and each's undoing
MAX_ROOM_MASKS = 100              # masks in each list of a room
MAX_ROOM_LIMIT = 100_000          # the highest /mode limit
PERSON_HOST = "pychat"            # the host of everyone's NICK!USER@HOST: pyChat never shows an address
ANONYMOUS_USER = "~user"          # the USER of someone who gave none (pyChat's own clients)
LISTING_BURST = 500               # entries of lists (/online, /who, /rooms) one person may ask for at once,
LISTING_RATE = 50.0               # and then a second: long lists asked for by hundreds must not slow the chat
SEARCH_COST = 100                 # entries of lists one /search costs: a search reads far more than a list
ANNOUNCE_LIMIT = 200              # rooms bigger than this do not announce every join and leave
WHOWAS_KEPT = 200                 # names given up lately (by leaving or renaming), for IRC's WHOWAS
WATCH_LIMIT = 100                 # names one person may watch coming and going (IRC's MONITOR)
QUIT = "quit"                     # the leave reason of someone who said /quit without a message
PASSWORD_TRIES = 3                # wrong server passwords before the connection is closed
TLS_HANDSHAKE = b"\x16"            # the first byte of every TLS connection: a handshake record
MAX_TLS_REFUSALS = 8              # TLS handshakes at once just to say "the server is full"
DRAIN_SECONDS = 1.0               # time allowed to send what is queued to someone who is leaving
SHUTDOWN_SECONDS = 3.0            # time allowed for every connection to close at shutdown
ACCEPT_POLL_SECONDS = 0.1         # how soon an accepting thread notices that the server stops
RECEIVE_SIZE = 65536
# How long a thread may keep the interpreter lock while another waits for it.
# The switchboard does all the chatting on one thread, so it must get the lock
# back quickly from a thread running a long command or a sign-in: Python's
# default, 5 ms. (With a thread per connection, 10,000 people leaving at once
# needed 0.5 s here; the switchboard now does that leaving alone, in about a
# second, at any interval: bench/README.md.)
SWITCH_INTERVAL = 0.005
# Threads are for signing in and for commands, a few at a time. A thread touches
# about 12 KiB of its stack; the platform default reserves 8 MiB of address
# space for each, which a system that does not overcommit may refuse when many
# sign in at once. 512 KiB leaves room for deep C calls (TLS).
THREAD_STACK_SIZE = 512 * 1024    # bytes; 0 keeps the platform default
IDLE_WORKERS = 16                 # finished worker threads kept waiting for the next sign-in or command
CLIENTS_WITHOUT_LIMIT = 10_000    # open files are asked for this many connections when --max-clients is 0
SPARE_FILES = 64                  # open files besides the connections: listening socket, logs, wake-ups
KERNEL_SEND_BUFFER = 64 * 1024    # the kernel doubles it for its own bookkeeping
# Each line leaves at once rather than waiting, under Nagle's algorithm, for the
# peer to acknowledge the one before (up to its delayed-ACK time, 40 ms here).
# Without it the bench measured 10-12% less CPU per delivery in fan-out, but a
# worse p99, and with everyone sending, 58% fewer deliveries a second at three
# times the median latency (bench/README.md).
TCP_NO_DELAY = True
# A room whose lines were written out a moment ago holds its next ones until
# this many seconds for each session that hears it have gone by since (at
# most MAX_HOLD_SECONDS), so that they leave together: one system call per
# receiver for all of them instead of one per line, as Nagle's algorithm would
# do, but bounded by our clock rather than the peer's acknowledgement. Writing
# to a room costs a send a receiver, a few microseconds each (a person signed
# in from three devices is three), so a hold that grows with them keeps the
# switchboard's time on even the busiest room to a small share: a tenth at
# most, whatever its size. A room quiet for that long has its line written at
# once, so at light load no line waits, and a room of a few people hardly ever
# waits. The cap is reached at 1,700 sessions: 0.1 s is about when people
# start to notice a delay, and below the p99 of ngircd in the bench's room of
# 2,000 (bench/README.md).
HOLD_PER_RECEIVER = 60e-6
MAX_HOLD_SECONDS = 0.1
# With history kept, a busy room holds its lines at least this long, since they are also written to the
# database together, before they are sent: a transaction costs about 75 us of CPU on the bench's machine
# (about 13 system calls), and at 2,000 lines a second 6 ms makes a dozen lines of one (bench/README.md).
HISTORY_HOLD_SECONDS = 0.006
OUT_OF_DESCRIPTORS_PAUSE = 0.5    # seconds the accepting thread waits when the process has no file descriptor left
OPERATOR_TRIES = 3                # wrong /op secrets before the connection is closed
ADDRESS_GUESSES = 10              # wrong secrets of any kind from one address (IPv6: /64) before it must wait
GUESS_WINDOW = 600.0              # ... and how long it waits, in seconds since its last wrong guess
GUESS_DELAY = 1.0                 # --guess-delay: seconds the answer to a wrong secret waits, once per wrong one
GUESS_DELAY_STEPS = 5             # ... in a row from the address: 1, 2, 3, 4, then 5 times it at most
MAX_GUESS_DELAY = 60.0            # the longest --guess-delay

# What the data directory (--data-dir) keeps, and its bounds; README, "The data directory".
MAX_ACCOUNTS = 10000              # registered nicknames
REGISTRATIONS_PER_ADDRESS = 5     # accounts one address (IPv6: /64) may register ...
REGISTRATION_WINDOW = 3600.0      # ... in this many seconds, so that no one fills the table for others
MAX_OPERATORS = 100               # operators made with /oper add
MAX_INVITATIONS = 1000            # one-time codes for --private waiting to be used
INVITATION_SECONDS = 7 * 86400    # how long an invitation code works
MAX_BANS = 1000
MAX_MUTES = 1000
ACCOUNTS_LISTED = 200             # lines /accounts shows at most; a pattern narrows the list
MAX_BAN_SECONDS = 3650 * 86400    # the longest ban with a duration; longer is "permanent"
MAX_REASON_LENGTH = 200           # characters of a ban's reason
MAX_ROOM_SETTINGS = 1000          # rooms with a topic or modes kept
MAX_KEPT_ROOMS = 50               # rooms an account is put back in at sign-in, the ones used last
MAX_SESSIONS = 10                 # connections signed in to one account at once
CATCH_UP_LINES = 200              # lines a room or conversation shows at sign-in, the newest of those unread
HISTORY_PAGE = 50                 # lines /history shows unless asked for another number ...
MAX_HISTORY_PAGE = 500            # ... and at most
MAX_OFFLINE_PER_RECIPIENT = 20    # offline messages waiting for one account
MAX_OFFLINE_PER_SENDER = 10       # offline messages one person may have waiting, for everyone together
MAX_OFFLINE_TOTAL = 2000          # offline messages waiting, for everyone
MAX_MOTD_BYTES = 4096             # of the --motd file that is shown
MAX_MOTD_LINES = 40
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1      # 16 MiB and about 50 ms of one core per check
SCRYPT_LENGTH = 32                # bytes of hash kept
SCRYPT_SALT_BYTES = 16            # a new random salt for each account and each password change
MIN_PASSWORD_LENGTH = 8
MAX_IGNORED = 100                 # names an account's /ignore list keeps for messages left while offline
MIN_PASSWORD_DISTINCT = 4         # different characters a password must have
MAX_PASSWORD_BYTES = 256

MAX_SECONDS = 1_000_000           # the longest timeout: poll() takes at most about 24 days, in milliseconds
MAX_KEEPALIVE = 32767             # the longest --keepalive: the most Linux takes for TCP_KEEPIDLE
IRC_PORT = None                   # --irc-port: a second port, for IRC clients (None: no IRC)
IRC_PING_INTERVAL = 120.0         # --irc-ping: seconds of silence before an IRC client is sent PING
IRC_AUTO_JOIN = "#lobby"          # --irc-auto-join: the rooms an IRC client is put in at sign-in ("": none)
SERVER_NAME = "pychat.server"     # --server-name, when this machine's host name is not a valid server name
WEB_PORT = None                   # --web-port: a port for browsers, the web client and IRC over WebSocket (None: off)
WEB_ORIGIN = None                 # --web-origin: the pages allowed to open /socket (None: the request's own Host)
TRUST_PROXY = None                # --trust-proxy: the reverse proxy whose X-Forwarded-For is believed (None: none)
# A server name is a host name with at least one dot, which is how clients tell it from a nickname.
_WEB_ORIGIN = re.compile(r"https?://(?:[a-z0-9.-]+|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?\Z")
_SERVER_NAME = re.compile(r"(?=.{3,63}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                          r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+\Z")


def number(kind: type, low: float, high: float | None = None, above: bool = False):
    """An argparse type: a finite KIND (int or float) of at least LOW (more than LOW if ABOVE), at most HIGH."""
    def shown(bound: float) -> str:
        return f"{bound:.0f}" if bound == int(bound) else f"{bound:g}"

    if above:
        bounds = f"more than {shown(low)}" + (f" and at most {shown(high)}" if high is not None else "")
    else:
        bounds = f"from {shown(low)} to {shown(high)}" if high is not None else f"of {shown(low)} or more"
    wanted = f"{'a whole number' if kind is int else 'a number'} {bounds}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is not None and math.isfinite(value) and (value > low if above else value >= low) \
                and (high is None or value <= high):
            return value
        raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
    parse.__name__ = kind.__name__          # argparse names the type in some messages
    return parse


def server_name(name: str) -> str:
    """An argparse type: a server name for --server-name (letters, digits and '-', in parts joined by dots)."""
    if not _SERVER_NAME.match(name):
        raise argparse.ArgumentTypeError(f"{name!r} is not a server name (a host name with a dot, such as "
                                         f"chat.example.org, at most 63 characters)")
    return name


def default_server_name() -> str:
    """--server-name's default: this machine's host name where it is a valid server name, else SERVER_NAME."""
    name = socket.gethostname()
    return name if _SERVER_NAME.match(name) else SERVER_NAME


def room_list(text: str) -> str:
    """An argparse type: rooms separated by commas, each with or without '#', as '#one,#two' ('' for none)."""
    names = [room_name(name.strip()) for name in text.split(",") if name.strip()]
    for name in names:
        problem = name_problem(name, "Room name")
        if problem:
            raise argparse.ArgumentTypeError(f"{name}: {problem}")
    return ",".join(f"#{name}" for name in dict.fromkeys(names))


def operator_name(name: str) -> str:
    """An argparse type: a name that could be a nickname, for --operator."""
    problem = name_problem(unicodedata.normalize("NFKC", name))
    if problem:
        raise argparse.ArgumentTypeError(f"{name}: {problem}")
    return name


def web_origins(text: str) -> str:
    """An argparse type: origins separated by commas (scheme://host[:port], no path), or * for any."""
    origins = [origin.strip().lower().rstrip("/") for origin in text.split(",") if origin.strip()]
    for origin in origins:
        if origin != "*" and not _WEB_ORIGIN.match(origin):
            raise argparse.ArgumentTypeError(f"{origin!r} is not an origin such as https://chat.example.org "
                                             f"or http://localhost:8080 (or * for any)")
    if not origins:
        raise argparse.ArgumentTypeError("give at least one origin, or * for any")
    return ",".join(origins)


def proxy_address(text: str) -> str:
    """An argparse type: one IP address, for --trust-proxy."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address (such as 127.0.0.1 or ::1)") from None


def option_parser() -> argparse.ArgumentParser:
    """The command line's options; every option has a default that suits a small group."""
    parser = argparse.ArgumentParser(
        description="pyChat server: a chat for the terminal. Clients connect with "
                    "pyChat-client.py or any line-based TCP tool such as nc.")
    parser.add_argument("--version", action="version", version=f"pyChat server {VERSION}")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on; '::' for IPv6 (default: all IPv4 interfaces)")
    parser.add_argument("--port", type=number(int, 0, 65535), default=DEFAULT_PORT,
                        help=f"TCP port; 0 picks a free one and logs it (default: {DEFAULT_PORT})")
    parser.add_argument("--config", metavar="FILE",
                        help="read options from FILE, an INI file whose keys are the long option names "
                             "(README, 'The configuration file'); options given here win; SIGHUP reads it again")
    parser.add_argument("--print-config", action="store_true",
                        help="print the configuration in effect as a file for --config (secrets left out), then exit")
    parser.add_argument("--log-file", metavar="PATH",
                        help="log to PATH instead of standard error; SIGHUP opens it again (for logrotate)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (every command)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    count, seconds = number(int, 0), number(float, 0, MAX_SECONDS)
    positive_seconds = number(float, 0, MAX_SECONDS, above=True)
    limits = parser.add_argument_group("limits (see README, 'Running it on the internet')")
    limits.add_argument("--max-clients", type=count, default=MAX_CLIENTS, metavar="N",
                        help=f"connections allowed at once, 0 for no limit (default: {MAX_CLIENTS})")
    limits.add_argument("--max-per-ip", type=count, default=MAX_PER_IP, metavar="N",
                        help=f"connections allowed from one address, 0 for no limit (default: {MAX_PER_IP})")
    limits.add_argument("--rate", type=number(float, 0), default=RATE, metavar="LINES",
                        help=f"lines per second one person may send, 0 to turn flood control off "
                             f"(default: {RATE:g})")
    limits.add_argument("--burst", type=count, default=BURST, metavar="LINES",
                        help=f"lines one person may send in a burst before --rate applies (default: {BURST})")
    limits.add_argument("--nick-timeout", type=positive_seconds, default=NICKNAME_TIMEOUT, metavar="SECONDS",
                        help=f"time a new connection has to sign in (default: {NICKNAME_TIMEOUT:g})")
    limits.add_argument("--idle-timeout", type=seconds, default=IDLE_TIMEOUT, metavar="SECONDS",
                        help="disconnect people who send nothing for this long, 0 for never (default: 0)")
    limits.add_argument("--keepalive", type=number(int, 1, MAX_KEEPALIVE), default=KEEPALIVE, metavar="SECONDS",
                        help=f"quiet time before TCP keepalive probes look for vanished peers "
                             f"(default: {KEEPALIVE})")
    limits.add_argument("--max-queue", type=number(int, 0, above=True), default=MAX_QUEUED_OUTPUT, metavar="BYTES",
                        help=f"output waiting for one slow reader before it is disconnected "
                             f"(default: {MAX_QUEUED_OUTPUT})")
    limits.add_argument("--stall-timeout", type=positive_seconds, default=STALL_TIMEOUT, metavar="SECONDS",
                        help=f"time a reader may accept no data before it is disconnected "
                             f"(default: {STALL_TIMEOUT:g})")
    limits.add_argument("--guess-delay", type=number(float, 0, MAX_GUESS_DELAY), default=GUESS_DELAY,
                        metavar="SECONDS",
                        help=f"wait before answering a wrong password, operator secret or invitation code; "
                             f"each wrong one in a row from an address waits this much longer, up to "
                             f"{GUESS_DELAY_STEPS} times it, 0 for no wait (default: {GUESS_DELAY:g})")
    limits.add_argument("--rooms-per-person", type=count, default=ROOMS_PER_PERSON, metavar="N",
                        help=f"rooms one person may be in at once, 0 for no limit (default: {ROOMS_PER_PERSON})")
    history = parser.add_argument_group("history")
    history.add_argument("--history", type=count, default=HISTORY_LINES, metavar="N",
                         help=f"lines of a room shown to newcomers, 0 for none (default: {HISTORY_LINES})")
    history.add_argument("--history-days", type=number(float, 0, 100 * 365), default=HISTORY_DAYS, metavar="DAYS",
                         help=f"days chat lines are kept (and can be searched and paged back to), 0 to keep "
                              f"none (default: {HISTORY_DAYS})")
    history.add_argument("--history-max-mb", type=number(float, 0), default=None, metavar="MB",
                         help=f"size of the database past which the oldest chat lines go (default: "
                              f"{HISTORY_MAX_MB} with --data-dir, {HISTORY_MAX_MB_IN_MEMORY} in memory without)")
    history.add_argument("--history-file", metavar="PATH",
                         help="gone: history is kept in the database of --data-dir (README, 'The data directory')")
    data = parser.add_argument_group("what lasts (see README, 'The data directory')")
    data.add_argument("--data-dir", metavar="DIR",
                      help="keep accounts, operators, bans, room topics, offline messages and history in "
                           "DIR/pychat.db, an SQLite database (DIR is created if needed, readable by this user "
                           "only), so they survive restarts; without it they last until the server stops")
    data.add_argument("--backup", metavar="FILE",
                      help="with --data-dir: copy the database to the new file FILE, consistently, even while "
                           "a server runs on it, then exit")
    data.add_argument("--check", action="store_true",
                      help="with --data-dir: check the database (PRAGMA integrity_check and every account), "
                           "say what is wrong, then exit (1 if anything is)")
    data.add_argument("--operator", action="append", type=operator_name, metavar="NAME",
                      help="make the account NAME an operator of the server, as /oper add does (repeatable)")
    data.add_argument("--private", action="store_true",
                      help="only accounts may sign in; operators let people in with /invite-account")
    data.add_argument("--motd", metavar="FILE",
                      help="show FILE after sign-in and on /motd (read again whenever it changes)")
    security = parser.add_argument_group("security")
    security.add_argument("--password", default=os.environ.get("PYCHAT_PASSWORD"),
                          help="password everyone must give to join; prefer the environment "
                               "variable PYCHAT_PASSWORD, which does not show in ps")
    security.add_argument("--op-password", default=os.environ.get("PYCHAT_OP_PASSWORD"),
                          help="secret for /op, which makes someone an operator; prefer the "
                               "environment variable PYCHAT_OP_PASSWORD")
    security.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate (PEM)")
    security.add_argument("--tls-key", metavar="FILE", help="private key for --tls-cert (PEM)")
    irc = parser.add_argument_group("IRC (see README, 'IRC clients')")
    irc.add_argument("--irc-port", type=number(int, 0, 65535), default=IRC_PORT, metavar="PORT",
                     help="also let IRC clients in on this port, TLS too with --tls-cert; 0 picks a free "
                          "one and logs it (default: no IRC)")
    irc.add_argument("--irc-ping", type=positive_seconds, default=IRC_PING_INTERVAL, metavar="SECONDS",
                     help=f"silence before an IRC client is sent PING; as long again without an answer "
                          f"disconnects it (default: {IRC_PING_INTERVAL:g})")
    irc.add_argument("--irc-auto-join", type=room_list, default=IRC_AUTO_JOIN, metavar="ROOMS",
                     help=f"rooms (comma-separated) an IRC client is put in when it signs in; \"\" for none, "
                          f"as a plain IRC server does (default: {IRC_AUTO_JOIN})")
    irc.add_argument("--server-name", type=server_name, default=default_server_name(), metavar="NAME",
                     help=f"the server's name in IRC messages (prefixes, 004, PONG) (default: this machine's "
                          f"host name if it has a dot, else {SERVER_NAME})")
    web = parser.add_argument_group("browsers (see README, 'Browser')")
    web.add_argument("--web-port", type=number(int, 0, 65535), default=WEB_PORT, metavar="PORT",
                     help="also serve the web client and IRC over WebSocket (/socket) on this port, HTTPS with "
                          "--tls-cert; 0 picks a free one and logs it (default: no web port)")
    web.add_argument("--web-origin", type=web_origins, default=WEB_ORIGIN, metavar="ORIGINS",
                     help="the pages (comma-separated, such as https://chat.example.org) whose scripts may open "
                          "/socket, or * for any (default: a page from the host the browser asked for)")
    web.add_argument("--trust-proxy", type=proxy_address, default=TRUST_PROXY, metavar="ADDRESS",
                     help="the address of a reverse proxy in front of --web-port: from it alone, the person's "
                          "address is taken from X-Forwarded-For, for bans and --max-per-ip (default: none)")
    return parser


class OptionsError(Exception):
    """A configuration that cannot be used: the message names the file and the line where there is one."""


# Options that do something once rather than configure the server, and so have no place in the file.
NOT_IN_CONFIG = ("help", "version", "config", "print_config", "backup", "check", "history_file")
SECRET_OPTIONS = ("password", "op_password")
YES = ("yes", "true", "on", "1")
NO = ("no", "false", "off", "0")


def config_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The options a configuration file may set, by their key (the long option name without its dashes)."""
    return {action.option_strings[-1][2:]: action for action in parser._actions
            if action.dest not in NOT_IN_CONFIG and action.option_strings}


def read_config(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The options the file at PATH sets, by their dest, checked by the same argparse types as the command line.

    The file is `key = value` lines, where the keys are the long option names; an optional [server]
    header; whole-line comments starting with # or ;. A repeatable option takes a list separated by
    commas, a switch takes yes or no. Raises OptionsError naming the file and the line.
    """
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as problem:
        raise OptionsError(f"{path}: cannot read it: {problem.strerror}") from None
    try:
        text = data.decode("utf-8-sig")         # -sig: the byte-order mark some editors write
    except UnicodeDecodeError as problem:
        line = data[:problem.start].count(b"\n") + 1
        raise OptionsError(f"{path}, line {line}: not UTF-8 text") from None
    actions = config_actions(parser)
    values: dict[str, Any] = {}
    seen: dict[str, int] = {}
    for line_number, text_line in enumerate(text.splitlines(), 1):
        where = f"{path}, line {line_number}"
        line = text_line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            if line != "[server]":
                raise OptionsError(f"{where}: unknown section {line} (the only section is [server])")
            continue
        key, equals, value = (part.strip() for part in line.partition("="))
        if not equals or not key:
            raise OptionsError(f"{where}: not 'key = value': {line!r}")
        action = actions.get(key.lower())
        if action is None:
            hint = " (it is for the command line only)" if key.lower().replace("-", "_") in NOT_IN_CONFIG else ""
            raise OptionsError(f"{where}: unknown key {key!r}{hint}")
        if key.lower() in seen:
            raise OptionsError(f"{where}: {key} is given already, on line {seen[key.lower()]}")
        seen[key.lower()] = line_number
        try:
            values[action.dest] = config_value(action, value)
        except (argparse.ArgumentTypeError, ValueError) as problem:
            raise OptionsError(f"{where}: {key}: {problem}") from None
    return values


def config_value(action: argparse.Action, text: str) -> Any:
    """TEXT from a configuration file as the value of ACTION's option, through the option's own type."""
    if isinstance(action, argparse._StoreTrueAction):
        if text.lower() not in YES + NO:
            raise ValueError(f"{text!r} is not yes or no")
        return text.lower() in YES
    convert = action.type or str
    if isinstance(action, argparse._AppendAction):
        return [convert(item.strip()) for item in text.split(",") if item.strip()]
    return convert(text)


def config_text(options: argparse.Namespace) -> str:
    """OPTIONS as a configuration file that gives them back; secrets are left out, with a word on where to put them."""
    lines = [f"# pyChat {VERSION}: the configuration in effect (python3 pyChat-server.py --print-config)", "[server]"]
    for key, action in config_actions(option_parser()).items():
        value = getattr(options, action.dest)
        if action.dest in SECRET_OPTIONS:
            if value:
                lines.append(f"# {key} = (set, not shown: write it here in a file of mode 0600, or give it with "
                             f"PYCHAT_{action.dest.upper()})")
            continue
        if value is None:
            lines.append(f"# {key} =")
        elif isinstance(value, bool):
            lines.append(f"{key} = {'yes' if value else 'no'}")
        elif isinstance(value, list):
            lines.append(f"{key} = {', '.join(value)}" if value else f"# {key} =")
        else:
            lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def read_options(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line over the --config file; raises OptionsError for a file or a combination that cannot be
    used (argparse itself exits for a wrong command line)."""
    parser = option_parser()
    options = parser.parse_args(argv)
    if options.config:
        file_values = read_config(parser, options.config)
        operators = file_values.pop("operator", None)
        parser.set_defaults(**file_values)
        options = parser.parse_args(argv)
        if options.operator is None:        # a repeatable option given on the command line replaces the file's
            options.operator = operators
    options.operator = options.operator or []
    problem = options_problem(options)
    if problem:
        raise OptionsError(f"{options.config}: {problem}" if options.config else problem)
    return options


def options_problem(options: argparse.Namespace) -> str | None:
    """What is wrong with a combination of options, if anything."""
    if bool(options.tls_cert) != bool(options.tls_key):
        return "--tls-cert and --tls-key go together"
    if options.history_file:
        return ("--history-file is gone: history is kept in the database of --data-dir DIR "
                "(a 2.0 history file in DIR is imported at the first start)")
    if (options.backup or options.check) and not options.data_dir:
        return "--backup and --check need --data-dir DIR"
    return None


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    """The options in effect, or an exit with status 2 and one line that says what is wrong, as argparse does."""
    try:
        return read_options(argv)
    except OptionsError as problem:
        parser = option_parser()
        parser.exit(2, f"{parser.prog}: error: {problem}\n")


# What a reload (SIGHUP, /rehash) cannot change while the server runs: they keep their value until a restart.
# Everything else applies at once, to new connections for what is settled when one comes in (TLS, --rate).
RESTART_OPTIONS = ("host", "port", "irc_port", "web_port", "server_name", "data_dir", "history_days", "history_max_mb",
                   "history")


def shown_option(dest: str, value: Any) -> str:
    """An option's value in a report of what a reload changed: a secret only as set or not."""
    if dest in SECRET_OPTIONS:
        return "(set)" if value else "(none)"
    if isinstance(value, list):
        return ", ".join(value) or "(none)"
    return "(none)" if value is None else str(value)


class LogFormat(logging.Formatter):
    """One event a line, its time in UTC with the zone written: 2026-12-06T23:40:01Z WARNING what happened."""

    converter = time.gmtime
    # What a stranger may put in an event (a request's target, a name) must not reach an operator's terminal
    # as a control sequence: every control character but CR and LF is written as an escape, \x1b.
    _CONTROL = re.compile("[\x00-\x09\x0b\x0c\x0e-\x1f\x7f-\x9f]")

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%SZ")

    def format(self, record: logging.LogRecord) -> str:
        # A traceback, or a name with a newline in it, must not look like other events to whoever reads the log.
        text = super().format(record).replace("\r", " ").replace("\n", " | ")
        return self._CONTROL.sub(lambda control: f"\\x{ord(control.group()):02x}", text)


def logging_handler(options: argparse.Namespace) -> logging.Handler:
    """Where OPTIONS send the log: --log-file, opened anew (for logrotate: the file at PATH now), or standard error."""
    handler = (logging.FileHandler(options.log_file, encoding="utf-8") if options.log_file
               else logging.StreamHandler(sys.stderr))
    handler.setFormatter(LogFormat())
    return handler


def use_logging_handler(handler: logging.Handler, options: argparse.Namespace) -> None:
    """Log through HANDLER from now on, at the level OPTIONS give (-v, -q), and close the one before."""
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if options.verbose else logging.WARNING if options.quiet else logging.INFO)
    for before in root.handlers[:-1]:
        root.removeHandler(before)
        before.close()


# ---------------------------------------------------------------------------
# The protocol: framing, cleaning text, names, events and the lines they become
# ---------------------------------------------------------------------------

class NotUtf8(str):
    """A line that was not valid UTF-8, its invalid bytes read as U+FFFD: the pyChat port takes it so,
    the IRC port (which promises UTF8ONLY) refuses it."""


class LineReader:
    """Splits a byte stream into lines, never holding more than one line's worth of bytes.

    feed() returns the complete lines it found, as text; a line longer than
    the limit comes out as None, once, and its bytes are dropped as they arrive.
    The limit holds for the text as it will be sent on: an invalid byte
    becomes U+FFFD, and counts as the three bytes that takes in UTF-8; such
    a line comes out as NotUtf8.

    A reader may be told to take MOST lines of what is fed at most: the
    complete lines after those are dropped without being split or decoded
    (64 KiB of bare newlines is 65,536 lines), and counted in `dropped`.
    """

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.partial = bytearray()
        self.discarding = False
        self.dropped = 0                # complete lines the last feed() left out, past its MOST

    def feed(self, data: bytes, most: int = -1) -> list[str | None]:
        """The complete lines in what came so far with DATA, MOST of them at most (-1: all)."""
        lines: list[str | None] = []
        self.dropped = 0
        if self.discarding:
            end = data.find(b"\n")
            if end < 0:
                return lines
            data = data[end + 1:]
            self.discarding = False
        self.partial += data
        if b"\n" in data:
            *complete, rest = self.partial.split(b"\n", most)
            if len(complete) == most and b"\n" in rest:
                end = rest.rfind(b"\n") + 1
                self.dropped = rest.count(b"\n", 0, end)
                rest = rest[end:]
            self.partial = bytearray(rest)
            for raw in complete:
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
                lines.append(decode_line(raw, self.max_bytes))
        if len(self.partial) > self.max_bytes:
            self.partial.clear()
            self.discarding = True
            lines.append(None)
        return lines


def decode_line(raw: bytes, max_bytes: int) -> str | None:
    """The text of one line a client sent, invalid bytes replaced (NotUtf8), or None if it is over
    MAX_BYTES once they are."""
    if len(raw) > max_bytes:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = NotUtf8(raw.decode("utf-8", "replace"))
    return None if len(text.encode("utf-8")) > max_bytes else text


# Control characters move cursors, change colours and clear screens; direction
# overrides make text read differently from what was sent. None of them may
# reach another person's terminal.
_INVISIBLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# What shows as blank space (tabs, Unicode spaces, line separators, the braille
# blank, Hangul fillers), and what shows as nothing at all (zero-width spaces
# and joiners, soft hyphen, variation selectors, tags).
_BLANKS = ("\t \u00a0\u1680" + "".join(map(chr, range(0x2000, 0x200b)))
           + "\u2028\u2029\u202f\u205f\u3000\u2800\u115f\u1160\u3164\uffa0")
_BLANK = re.escape(_BLANKS)
_NOTHING = ("\u00ad\u034f\u17b4\u17b5\u180b-\u180f\u200b-\u200d\u2060-\u2064\ufe00-\ufe0f\ufeff"
            "\U000e0000-\U000e007f\U000e0100-\U000e01ef")
_SHOWS_AS_NOTHING = re.compile(f"[{_NOTHING}]")
_INDENT = re.compile(f"[{_BLANK}{_NOTHING}]+")
# Two blanks or more in a row (with nothing-characters between them, or not).
# Pasted code keeps its indentation, but inside a line a run of spaces serves
# only to push text to the start of the next row on someone's terminal, where
# it would pass for a line of its own.
_BLANK_RUN = re.compile(f"[{_BLANK}](?:[{_NOTHING}]*[{_BLANK}])+[{_NOTHING}]*")
_TO_SPACE = str.maketrans("\t\u2028\u2029", "   ")
TAB_WIDTH = 4                     # columns of indentation a leading tab stands for
MAX_INDENT = 32                   # leading spaces kept at most


def clean_text(text: str, invisible: re.Pattern = _INVISIBLE) -> str:
    """Make untrusted text safe to show: no control characters or direction overrides (those INVISIBLE
    matches), and one space between words; leading indentation stays (tabs as spaces, up to
    MAX_INDENT), trailing blanks go.

    Linear in the length of TEXT, so it may run on anything a client sends.
    """
    if text.isascii() and text.isprintable() and "  " not in text and text[:1] != " " and text[-1:] != " ":
        return text         # most lines, at every door: nothing to take out (the rules below, for ASCII)
    if not text.isprintable():
        text = invisible.sub("", text)
    indent = 0
    leading = _INDENT.match(text)
    if leading:
        for ch in leading.group():
            if ch == "\t":
                indent += TAB_WIDTH - indent % TAB_WIDTH
            elif not _SHOWS_AS_NOTHING.match(ch):
                indent += 2 if unicodedata.east_asian_width(ch) in "WF" else 1
            if indent >= MAX_INDENT:
                break
        text = text[leading.end():]
    text = _BLANK_RUN.sub(" ", text).translate(_TO_SPACE).rstrip(_BLANKS)
    indent = min(indent, MAX_INDENT)
    if leading and indent > len(leading.group()):
        # Tabs made the line longer: it must still fit the line limit.
        indent = max(0, min(indent, MAX_LINE_BYTES - len(text.encode("utf-8"))))
    return " " * indent + text if text else ""


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
# Kana and ideographs that are drawn alike.
_LOOKALIKES_CJK = str.maketrans("ロカエタトハニーヘᅳ", "口力工夕卜八二一へ一")
# Characters that show as nothing: a name made of them, or ending in one, would
# pass for an empty name or for someone else's.
_INVISIBLE_IN_NAMES = re.compile("[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u3164\ufe00-\ufe0f\uffa0"
                                  "\U000e0100-\U000e01ef]")

# The nickname rule, from Unicode's own data (the names and categories of
# characters in unicodedata), so that it covers whole classes, not examples.
# A name uses the letters of one of these scripts, by the first word of each
# letter's Unicode name. Left out: scripts whose letters read as Latin, Greek
# or Cyrillic capitals (Lisu, Cherokee, Canadian syllabics, Coptic, Runic,
# Tifinagh, Vai, Osage...), historic scripts, and symbols of every kind.
_NAME_SCRIPTS = {
    **{word: word.title() for word in (
        "LATIN", "GREEK", "CYRILLIC", "ARMENIAN", "GEORGIAN", "HEBREW", "ARABIC", "SYRIAC", "THAANA",
        "DEVANAGARI", "BENGALI", "GURMUKHI", "GUJARATI", "ORIYA", "TAMIL", "TELUGU", "KANNADA", "MALAYALAM",
        "SINHALA", "THAI", "LAO", "TIBETAN", "MYANMAR", "KHMER", "ETHIOPIC", "MONGOLIAN")},
    "ARABIC-INDIC": "Arabic", "EXTENDED ARABIC-INDIC": "Arabic",
    # Japanese mixes kanji and kana, and Korean may mix hangul and hanja: one family.
    **{word: "CJK" for word in ("CJK", "HIRAGANA", "KATAKANA", "KATAKANA-HIRAGANA", "IDEOGRAPHIC", "HANGUL",
                                "BOPOMOFO")},
}
# Within Latin, Greek and Cyrillic, the letters of living alphabets, with any
# accent or hook; not small capitals, turned, reversed or IPA-only letters,
# nor the clicks and glottal stops that read as punctuation (ǃ ǀ ʔ).
_LATIN_LETTER = re.compile(r"LATIN (?:SMALL|CAPITAL) (?:LETTER|LIGATURE) (?:[A-Z]|AE|OE|SHARP S|ETH|THORN|ENG|"
                           r"SCHWA|OPEN E|OPEN O|EZH|ESH|KRA|DOTLESS I|DOTLESS J|GAMMA|UPSILON)(?: WITH .*)?")
_GREEK_LETTER = re.compile(r"GREEK (?:SMALL|CAPITAL) LETTER (?:ALPHA|BETA|GAMMA|DELTA|EPSILON|ZETA|ETA|THETA|IOTA|"
                           r"KAPPA|LAMDA|MU|NU|XI|OMICRON|PI|RHO|SIGMA|FINAL SIGMA|TAU|UPSILON|PHI|CHI|PSI|OMEGA)"
                           r"(?: WITH .*)?")
# In any script, letters drawn as another letter turned over or mirrored, and
# the glottal stops and clicks that read as ? and !.
_MISLEADING_LETTER = re.compile(r"\b(?:TURNED|REVERSED|INVERTED|GLOTTAL STOP|CLICK)\b")
_CYRILLIC_LETTER = re.compile(r"CYRILLIC (?:SMALL|CAPITAL) LETTER ")
_CYRILLIC_END = 0x0530            # past here: Old Church Slavonic and other historic letters
# In the other scripts, what Unicode names a letter, syllable or character
# (Thai, Lao), or Khmer's independent vowels; not signs and marks such as
# Devanagari's avagraha (ऽ), which reads as an S.
_OTHER_LETTER = re.compile(r"[A-Z-]+ (?:(?:SMALL |CAPITAL )?LETTER|SYLLABLE|CHARACTER|INDEPENDENT VOWEL) ")
# Modifier letters read as punctuation (ʼ ː ˈ) or as part of another letter
# (ᵃ ʰ); these few are part of ordinary words: 々 ゝ ゞ ー ヽ ヾ, Thai ๆ, Lao ໆ.
_WORD_MODIFIERS = "\u3005\u309d\u309e\u30fc\u30fd\u30fe\u0e46\u0ec6"
MAX_MARKS = 3                     # combining marks on one letter (Hebrew points need three)


@functools.lru_cache(maxsize=4096)
def _name_character(ch: str) -> tuple[str | None, str | None]:
    """(the script CH counts for, or None for one every script may use; why it cannot be in a name, or None)."""
    if ch in "_-" or "0" <= ch <= "9":
        return None, None
    if _INVISIBLE_IN_NAMES.match(ch):
        return None, f"the invisible character U+{ord(ch):04X}"
    category = unicodedata.category(ch)
    shown = repr(ch if ch.isprintable() else f"U+{ord(ch):04X}")
    unicode_name = unicodedata.name(ch, "")
    if "SMALL CAPITAL" in unicode_name:
        return None, f"the small capital {shown}, which reads as a capital letter"
    if category == "Nd":
        script = _NAME_SCRIPTS.get(unicode_name.split(" DIGIT ")[0])
        return script, None if script else f"the digit {shown}"
    if category[0] == "M":
        if category == "Me":
            return None, f"the enclosing mark {shown}"
        first = unicode_name.split(" ")[0]
        if first == "COMBINING":
            return None, None
        script = _NAME_SCRIPTS.get(first)
        return script, None if script else f"the mark {shown}"
    if category[0] != "L":
        return None, f"{shown}"
    if category == "Lm" and ch not in _WORD_MODIFIERS:
        return None, f"the modifier letter {shown}, which reads as punctuation or as part of a letter"
    script = _NAME_SCRIPTS.get(unicode_name.split(" ")[0])
    if _MISLEADING_LETTER.search(unicode_name.split(" WITH ")[0]):
        allowed = False
    elif script == "Latin":
        allowed = bool(_LATIN_LETTER.fullmatch(unicode_name))
    elif script == "Greek":
        allowed = bool(_GREEK_LETTER.fullmatch(unicode_name))
    elif script == "Cyrillic":
        allowed = bool(_CYRILLIC_LETTER.match(unicode_name)) and ord(ch) < _CYRILLIC_END
    else:
        allowed = script == "CJK" or category == "Lm" or (script is not None and _OTHER_LETTER.match(unicode_name))
    if not allowed:
        return None, f"{shown} ({unicode_name.lower() or 'unnamed'})"
    return script, None


def _plain_letter(ch: str) -> str:
    """CH without what a glance would miss: any script's digit as 0-9, a letter WITH a stroke or hook as the letter."""
    if ch < "\x80":
        return ch
    digit = unicodedata.decimal(ch, None)
    if digit is not None:
        return str(digit)
    unicode_name = unicodedata.name(ch, "")
    if " WITH " in unicode_name:
        try:
            return unicodedata.lookup(unicode_name.split(" WITH ")[0])
        except KeyError:
            pass
    return ch


def normal_name(name: str) -> str:
    """NAME as the server keeps it (NFKC: fullwidth and styled letters become plain ones).

    A name longer than any name can be comes back as it is: it will be refused for
    its length, and normalising it first would take time that grows with the square
    of its length (combining marks are sorted by insertion). Cheap enough to call
    under a lock, but better called outside it.
    """
    return name if len(name) > MAX_NICKNAME_LENGTH else unicodedata.normalize("NFKC", name)


@functools.lru_cache(maxsize=4096)     # a sign-in asks for the same name's key several times
def name_key(name: str) -> str:
    """The form two names share when they would look the same: case, accents, digits and look-alikes folded.

    A name too long to be anyone's gets a key no real name has, without any work.
    """
    if len(name) > MAX_NICKNAME_LENGTH:
        return "\0"
    if name.isascii():      # nothing to decompose: no accents, marks, other scripts' digits or letters
        folded = name.translate(_CAPITAL_LOOKALIKES).casefold().translate(_LOOKALIKES)
    else:
        plain = "".join(map(_plain_letter, name)).translate(_CAPITAL_LOOKALIKES).casefold()
        decomposed = unicodedata.normalize("NFKD", plain)
        folded = "".join(ch for ch in decomposed if unicodedata.category(ch)[0] != "M")
        folded = folded.translate(_LOOKALIKES).translate(_LOOKALIKES_CJK)
    return folded.replace("rn", "m").replace("vv", "w").replace("_", "-")


def name_problem(name: str, what: str = "Nickname") -> str | None:
    """Why NAME (as normal_name() gives it) cannot be a nickname or room name, or None when it can.

    The rule: 1 to 20 characters; letters of one script, digits of that script
    or 0-9, '_' and '-'; starting with a letter; not like a reserved name.
    """
    if not name:
        return f"{what} cannot be empty."
    if len(name) > MAX_NICKNAME_LENGTH:
        return f"{what} is too long (at most {MAX_NICKNAME_LENGTH} characters)."
    if _PLAIN_NAME.fullmatch(name):     # most names, checked without a look at each character's script
        return f"{what} {name!r} is reserved." if name_key(name) in _RESERVED_KEYS else None
    scripts = set()
    marks = 0
    for ch in name:
        script, problem = _name_character(ch)
        if problem:
            return f"{what} cannot contain {problem}: use letters of one alphabet, digits, '_' and '-'."
        marks = marks + 1 if unicodedata.category(ch)[0] == "M" else 0
        if marks > MAX_MARKS:
            return f"{what} has more than {MAX_MARKS} marks on one letter."
        if script:
            scripts.add(script)
    first = unicodedata.category(name[0])
    if first[0] != "L" or first == "Lm":
        return f"{what} must start with a letter."
    if len(scripts) > 1:
        return f"{what} mixes alphabets ({', '.join(sorted(scripts))}); use one."
    if name_key(name) in _RESERVED_KEYS:
        return f"{what} {name!r} is reserved."
    return None


_RESERVED_KEYS = {name_key(name) for name in RESERVED_NAMES}
_PLAIN_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")    # Latin letters, digits, '_' and '-': fine by every rule

def same_secret(given: str, secret: str) -> bool:
    """Compare two secrets in a time that does not depend on where they differ."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), secret.encode("utf-8", "replace"))


class TokenBucket:
    """Flood control: RATE a second on average, BURST at once (of lines, or of whatever allow() is given)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(burst, 1)
        self.tokens = float(self.burst)
        self.updated = time.monotonic()

    def allow(self, cost: int = 1) -> bool:
        """Spend COST (at most the burst) if there is that much; False, spending nothing, if not."""
        if not self.rate:
            return True
        cost = min(cost, self.burst)
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


# -- what happened: the core's events ----------------------------------------------
# The core (ChatServer) says what happened with these; a protocol object turns
# each into its own words. An event that has a `room` belongs to that room.
#
# A chat line has an id, the same for every receiver (IRC's msgid), and may carry
# client tags: what the sender's client attached for other clients of its kind
# (IRC's client-only tags, such as +draft/reply). The core passes them on as they
# are; a protocol that has no use for them leaves them out. It names the account
# of its sender, if they are signed in to one (IRC's account-tag).
ClientTags = tuple[tuple[str, str], ...]


class Said(NamedTuple):
    room: str
    nick: str
    text: str
    line_id: str = ""
    client_tags: ClientTags = ()
    account: str | None = None
    notice: bool = False        # IRC's NOTICE: a line no program should answer (pyChat shows it as any other)
    bot: bool = False           # from someone who says they are a program


class Acted(NamedTuple):
    room: str
    nick: str
    text: str
    line_id: str = ""
    client_tags: ClientTags = ()
    account: str | None = None
    bot: bool = False


class TagMessage(NamedTuple):
    """Client tags alone, with no text (IRC's TAGMSG: someone is typing, a reaction...), from NICK to TARGET
    (a nickname, or #ROOM); ROOM is None for one sent to a person."""
    room: str | None
    nick: str
    target: str
    line_id: str
    client_tags: ClientTags
    account: str | None = None
    bot: bool = False


class Joined(NamedTuple):
    room: str
    nick: str
    account: str | None = None
    realname: str = ""          # what an IRC client gave as the person's real name; "" for others
    away: str | None = None     # their away message, if they come in away


class Left(NamedTuple):
    room: str
    nick: str
    reason: str | None = None       # IRC's PART message; pyChat's lines do not show it


class Kicked(NamedTuple):
    room: str
    nick: str
    by: str
    reason: str | None


class TopicChanged(NamedTuple):
    room: str
    nick: str
    topic: str


class ModeChanged(NamedTuple):
    """A room operator changed settings of the room (see ROOM_SETTINGS), each a (setting, value), in order.
    A key is shown as 'on', never itself."""
    room: str
    nick: str
    changes: tuple[tuple[str, str], ...]


class Quit(NamedTuple):
    nick: str
    reason: str | None


class Renamed(NamedTuple):
    old: str
    new: str


class AwayChanged(NamedTuple):
    nick: str
    reason: str | None          # None: back


class RealnameChanged(NamedTuple):
    """NICK gave a new real name (IRC's SETNAME)."""
    nick: str
    realname: str


class AccountChanged(NamedTuple):
    """NICK registered an account (ACCOUNT, their nickname) or gave it up (None)."""
    nick: str
    account: str | None


class CameOnline(NamedTuple):
    """NICK, whom you watch for, signed in or took that name."""
    nick: str


class OperatorsMessage(NamedTuple):
    """A message from an operator of the server to all of them (IRC's WALLOPS)."""
    nick: str
    text: str


class WentOffline(NamedTuple):
    """NICK, whom you watch for, left or took another name."""
    nick: str


class Notice(NamedTuple):
    text: str


class Reply(NamedTuple):
    text: str


class TheyAreAway(NamedTuple):
    """Told to someone who sent a private message to a person who is away."""
    nick: str
    reason: str


class Error(NamedTuple):
    text: str


class Prompt(NamedTuple):
    asking_for: str             # "nickname" or "password"


class Welcome(NamedTuple):
    nick: str
    motd: tuple[str, ...] = ()      # the lines of --motd, if any


class Entered(NamedTuple):
    """You are now in ROOM (and it is current), with these others. MEMBERS (everyone's nickname) and RANKS
    (each room operator and voiced member: nickname, whether an operator, whether voiced) only for a
    protocol that lists members on entering (IRC's NAMES)."""
    room: str
    others: tuple[str, ...]
    more: int
    members: tuple[str, ...] = ()
    secret: bool = False
    ranks: tuple[tuple[str, bool, bool], ...] = ()


class Topic(NamedTuple):
    room: str
    topic: str
    by: str | None = None           # who set it and when (a time.time()), if it was set since the server started
    when: float = 0.0


class Replayed(NamedTuple):
    """A line said before you came (in a room, or to you or by you in private), with the time it was said."""
    when: float
    line: Said | Acted | PrivateFrom | PrivateTo

    @property
    def room(self) -> str | None:
        return getattr(self.line, "room", None)


class NewSince(NamedTuple):
    """The header of what you have not read of a ROOM or of your private conversation with NICK: COUNT lines
    since SINCE (a time.time()), of which the newest SHOWN follow; HISTORY shows the others."""
    count: int
    since: float
    shown: int
    history: str
    room: str | None = None
    nick: str | None = None


class HistoryPage(NamedTuple):
    """The header of COUNT earlier lines of ROOM, or of your private conversation with NICK (/history)."""
    count: int
    room: str | None = None
    nick: str | None = None


class ReadUpTo(NamedTuple):
    """Where you have read up to in NAME ('#room', or the nickname of a private conversation): the id of
    the last line read there."""
    name: str
    message_id: int


class HistoryEnd(NamedTuple):
    room: str | None
    nick: str | None = None         # of a private conversation


class NowTalking(NamedTuple):
    room: str


class YouLeft(NamedTuple):
    room: str
    reason: str | None = None


class YouWereKicked(NamedTuple):
    room: str
    by: str
    reason: str | None


class Invited(NamedTuple):
    room: str
    by: str


class InvitedSomeone(NamedTuple):
    """BY invited NICK to ROOM: news for the room's members."""
    room: str
    by: str
    nick: str


class PrivateFrom(NamedTuple):
    nick: str
    text: str
    line_id: str = ""
    client_tags: ClientTags = ()
    account: str | None = None
    notice: bool = False
    bot: bool = False


class PrivateTo(NamedTuple):
    """Your copy of a private message to NICK (ACCOUNT is yours, as a chat line names its sender's), sent
    from this session or, ELSEWHERE, from another of yours."""
    nick: str
    text: str
    line_id: str = ""
    client_tags: ClientTags = ()
    account: str | None = None
    notice: bool = False
    bot: bool = False
    elsewhere: bool = False


class Bye(NamedTuple):
    pass


class ShuttingDown(NamedTuple):
    pass


class DisconnectedBy(NamedTuple):
    by: str
    reason: str | None


class Farewell(NamedTuple):
    """The server closes the connection because of something the person did (or did not do)."""
    reason: str


class AccountPrompt(NamedTuple):
    """Asking a newcomer for a secret of the account NICK: "password", "code" (an invitation) or "new password"."""
    nick: str
    asking_for: str


class OfflinePrivate(NamedTuple):
    """A private message left for you while you were offline."""
    when: float
    nick: str
    text: str


class Banned(NamedTuple):
    by: str
    how_long: str               # "permanently", or "until 2026-12-01 14:00 UTC (2h left)"
    reason: str | None


def _because(reason: str | None) -> str:
    return f": {reason}" if reason else ""


def _mode_words(event: ModeChanged) -> str:
    return f"*** {event.nick} " + "; ".join(_setting_words(f"#{event.room}", *change) for change in event.changes)


def _setting_words(room: str, setting: str, value: str) -> str:
    words = {
        ("key", "off"): f"removed the key of {room}",
        ("invite-only", "on"): f"made {room} invite-only",
        ("invite-only", "off"): f"opened {room} to everyone",
        ("topic", "operators"): f"let only operators of {room} set its topic",
        ("topic", "everyone"): f"let everyone in {room} set its topic",
        ("limit", "off"): f"removed the limit of {room}",
        ("moderated", "on"): f"made {room} moderated: only its operators and voiced people talk",
        ("moderated", "off"): f"let everyone in {room} talk",
        ("secret", "on"): f"made {room} secret",
        ("secret", "off"): f"made {room} no longer secret",
        ("outside-messages", "on"): f"let people outside {room} talk in it",
        ("outside-messages", "off"): f"let only people in {room} talk in it",
    }.get((setting, value))
    if words is None:
        words = {"key": f"set a key on {room}", "op": f"made {value} an operator of {room}",
                 "deop": f"took operator status in {room} from {value}", "limit": f"set the limit of {room} to {value} people",
                 "voice": f"gave {value} a voice in {room}", "devoice": f"took {value}'s voice in {room}",
                 "ban": f"banned {value} from {room}", "unban": f"lifted the ban of {value} from {room}",
                 "exempt": f"exempted {value} from the bans of {room}",
                 "unexempt": f"took {value} off the exceptions of {room}",
                 "invite-mask": f"let {value} into {room} without an invitation",
                 "uninvite-mask": f"took {value} off those let into {room} without an invitation"}[setting]
    return words


def plain(text: str) -> str:
    """Text as pyChat and nc users read it: what IRC users say may hold IRC's formatting codes, and
    nothing else that is not printable."""
    return text if text.isprintable() else strip_irc_formatting(text)


def _utc(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class PyChatProtocol:
    """pyChat's own line protocol (README, "Wire protocol"): every line the server writes is made here.

    A line of a room other than the receiver's current one is tagged with the
    room: `#dev bob: hi`. Nicknames start with a letter, so no other line
    starts with `#`.
    """

    name = "pyChat"
    lists_members = False
    help_command = "/help"          # how its people ask for pyChat's commands
    has_current_room = True         # plain lines go to a current room, so its people are always in one

    LINES: dict[type, Callable[[Any], str]] = {
        Said: lambda e: f"{e.nick}: {plain(e.text)}",
        Acted: lambda e: f"* {e.nick} {plain(e.text)}",
        Joined: lambda e: f"*** {e.nick} joined #{e.room}",
        Left: lambda e: f"*** {e.nick} left #{e.room}",
        Kicked: lambda e: f"*** {e.nick} was kicked from #{e.room} by {e.by}{_because(e.reason)}",
        TopicChanged: lambda e: f"*** {e.nick} set the topic of #{e.room}: {e.topic}",
        ModeChanged: _mode_words,
        Quit: lambda e: f"*** {e.nick} quit" + (f" ({e.reason})" if e.reason else ""),
        Renamed: lambda e: f"*** {e.old} is now known as {e.new}",
        AwayChanged: lambda e: f"*** {e.nick} is away ({e.reason})" if e.reason else f"*** {e.nick} is back",
        Notice: lambda e: f"*** {e.text}",
        Reply: lambda e: f"-- {e.text}",
        TheyAreAway: lambda e: f"-- {e.nick} is away: {e.reason}",
        OperatorsMessage: lambda e: f"*** To the operators from {e.nick}: {plain(e.text)}",
        Error: lambda e: f"!! {e.text}",
        Prompt: lambda e: "*** Choose a nickname:" if e.asking_for == "nickname" else "*** Password:",
        Welcome: lambda e: "\n".join((f"*** Welcome, {e.nick}! Type /help for the commands.",
                                      *(f"*** {line}" for line in e.motd))),
        Entered: lambda e: f"*** You are in #{e.room}" + (
            f" with {', '.join(e.others + ((f'{e.more} more',) if e.more else ()))}." if e.others
            else ", alone for now."),
        Topic: lambda e: f"*** Topic of #{e.room}: {e.topic}",
        Replayed: lambda e: f"[history {_utc(e.when)}] {PyChatProtocol.LINES[type(e.line)](e.line)}",
        HistoryEnd: lambda e: f"*** End of #{e.room} history." if e.room else f"*** End of history with {e.nick}.",
        NewSince: lambda e: f"*** {e.count} new " + (f"in #{e.room}" if e.room else f"with {e.nick}") + \
            f" since {_utc(e.since)}" + (f"; the latest {e.shown} follow ({e.history} for earlier ones)."
                                         if e.shown < e.count else ""),
        HistoryPage: lambda e: f"*** {e.count} earlier line{'s' * (e.count != 1)} " + \
            (f"of #{e.room}:" if e.room else f"with {e.nick}:"),
        ReadUpTo: lambda e: f"[read {e.name}]",
        NowTalking: lambda e: f"*** Now talking in #{e.room}.",
        YouLeft: lambda e: f"*** You left #{e.room}.",
        YouWereKicked: lambda e: f"*** You were kicked from #{e.room} by {e.by}{_because(e.reason)}.",
        Invited: lambda e: f"*** {e.by} invites you to #{e.room}. Type /join #{e.room} to accept.",
        PrivateFrom: lambda e: f"[pm from {e.nick}] {plain(e.text)}",
        PrivateTo: lambda e: f"[pm to {e.nick}] {plain(e.text)}",
        Bye: lambda e: "*** Bye.",
        ShuttingDown: lambda e: "*** Server shutting down.",
        DisconnectedBy: lambda e: f"*** You were disconnected by {e.by}{_because(e.reason)}.",
        Farewell: lambda e: f"!! Disconnected: {e.reason}.",
        AccountPrompt: lambda e: {"password": f"*** Password for {e.nick}:",
                                  "code": f"*** Invitation code for {e.nick}:",
                                  "new password": f"*** Choose a password for {e.nick}:"}[e.asking_for],
        OfflinePrivate: lambda e: f"[offline {_utc(e.when)} from {e.nick}] {e.text}",
        Banned: lambda e: f"*** You were banned by {e.by} {e.how_long}{_because(e.reason)}.",
    }

    # Events pyChat's lines have no words for: client tags with no text, accounts changing (the person
    # is told in a reply; the others have no need to know), the comings and goings of watched names,
    # invitations seen by the room (IRC's invite-notify; the invited person is told with Invited), and real
    # names, which pyChat does not show.
    UNSAID = frozenset({TagMessage, AccountChanged, CameOnline, WentOffline, InvitedSomeone, RealnameChanged})

    def line(self, event: Any) -> str:
        """EVENT as a line of text, as it reads in the receiver's current room."""
        return self.LINES[type(event)](event)

    def encode(self, event: Any, tagged: bool = False) -> bytes:
        """EVENT as bytes to send; TAGGED for a room event of a room that is not the receiver's current one."""
        if type(event) in self.UNSAID:
            return b""
        text = self.LINES[type(event)](event)
        if tagged:
            text = f"#{event.room} {text}"
        return text.encode("utf-8") + b"\n"

    @staticmethod
    def chat_event(room: str, line: str) -> Said | Acted | None:
        """Read a chat or action line back into its event (for lines kept in the history file)."""
        if line.startswith("* "):
            nick, _, text = line[2:].partition(" ")
            return Acted(room, nick, text) if nick and text else None
        nick, separator, text = line.partition(": ")
        return Said(room, nick, text) if separator and nick and " " not in nick else None


PYCHAT = PyChatProtocol()


# ---------------------------------------------------------------------------
# Output: a connection's outbox and its end, and the switchboard that reads and writes
# ---------------------------------------------------------------------------
#
# The locks, in the only order in which one may be taken while holding another:
#
#   ChatServer.lock  ->  Output.io_lock  ->  Switchboard.state_lock
#   ChatServer.lock  ->  Gate.lock             (connections and guesses counted; the gate takes no other lock)
#   ChatServer.lock  ->  Storage.lock          (Storage takes no other lock)
#   ChatServer.reloading  ->  ChatServer.lock  (one reload at a time, which takes the others as above)
#   Workers.lock, MessageOfTheDay.lock         (each guards its own object alone, and is held with no other)
#
# _SCRYPT_SLOTS is a semaphore, not a lock: it bounds the password hashes under way at once.
#
# ChatServer.lock guards people and rooms (every Person and Room field); lines
# are queued while it is held, so everyone sees a room's lines in one order.
# Output.io_lock is held around each system call on a socket (a TLS socket's
# reads and writes must never overlap), and around taking lines out of an
# output's `pending` and changing its `outbox`. Sockets are non-blocking, so it
# is never held for long. Queueing a line takes no lock at all: it appends to a
# deque, which is safe from any thread (see Output). Switchboard.state_lock
# guards what the switchboard waits for and whether it sleeps. Nothing slow
# happens under ChatServer.lock, and no thread holding one of the later locks
# ever asks for an earlier one. Under it the storage is asked only quick
# things: a message id, a chat line added to the batch the switchboard writes
# before it sends, a lookup by key (which first writes that batch, without
# waiting for the disk). Changes that wait for the disk, and the storage's
# slow work (retention, the search index, checkpoints), run outside it.
#
# Chunks that may wait in an output's `pending` before the thread that queues
# one more counts what waits (moving them to `outbox`) and checks --max-queue.
# The switchboard keeps a reader who reads well near zero, so only a reader who
# falls behind is ever counted; at most this many chunks past --max-queue are kept.
PENDING_BEFORE_COUNT = 64

PENDING_OF = operator.attrgetter("pending")
NICK_OF = operator.attrgetter("nick")


def append_to_each(outputs: Iterable[Output], data: bytes) -> None:
    """Append DATA to the pending chunks of each of OUTPUTS, with no Python code run per output."""
    collections.deque(map(list.append, map(PENDING_OF, outputs), itertools.repeat(data)), maxlen=0)


def wait_until_writable(sock: socket.socket, timeout: float) -> None:
    """Wait until SOCK can take more output, or TIMEOUT runs out."""
    if hasattr(select, "poll"):        # select() cannot watch descriptors above 1023
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLOUT)
        poller.poll(max(0, int(timeout * 1000)))
    else:
        select.select((), (sock,), (), max(0.0, timeout))


TCP_STILL_OPEN = (1, 8)                 # TCP_INFO's states ESTABLISHED and CLOSE_WAIT: what is sent may arrive
ACKNOWLEDGED_POLL = 0.01                # seconds between looks at what the other end has not acknowledged yet


def acknowledged(sock: socket.socket, deadline: float) -> bool:
    """Whether the other end's TCP has acknowledged everything written to SOCK, waiting until DEADLINE (a
    time.monotonic()). A socket the kernel has taken bytes for may still lose them: the other end may have
    closed, and answers them with a reset. True where the system cannot tell (not Linux)."""
    if termios is None or not hasattr(termios, "TIOCOUTQ") or not hasattr(socket, "TCP_INFO"):
        return True
    try:
        while True:
            unacknowledged = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
            if state not in TCP_STILL_OPEN or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                return False
            if not unacknowledged:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(ACKNOWLEDGED_POLL)
    except (OSError, ValueError):
        return False


def take(chunks: list[bytes], count: int) -> bytes:
    """The first COUNT of CHUNKS, taken off and joined, while other threads may append to them: each
    step is one operation on the list, which the others' appends cannot come between."""
    if count == 1:
        return chunks.pop(0)
    data = b"".join(chunks[:count])
    del chunks[:count]
    return data


class Output:
    """One connection's output and the one way the connection ends.

    Lines are appended to `pending` by whoever produces them, from any thread
    and without a lock: a deque's append and popleft are atomic, so appends
    keep their order and none is lost while the switchboard takes chunks off
    the other end. It takes everything pending at once and writes it in one
    system call; what the socket did not take waits in `outbox`, in front of
    anything pending. end() is the one way a connection ends: the first reason
    wins, later ones change nothing, and whoever reads the connection (its
    sign-in thread, or the switchboard) sees the end and finishes it.
    close() drains what it can and always closes the socket; after it,
    everything is a no-op.
    """

    def __init__(self, sock: socket.socket, switchboard: Switchboard, protocol: PyChatProtocol = PYCHAT,
                 name: Callable[[], str] = lambda: "?", reader: ClientConnection | None = None) -> None:
        self.sock = sock
        self.switchboard = switchboard
        self.protocol = protocol
        self.name = name                    # who this is, for the log
        self.io_lock = threading.Lock()
        # Queued, not yet taken to be written. A list, not a deque: an idle connection's empty list costs
        # 56 bytes, a deque 0.7 KiB, and appending to the end and taking from the front are both safe.
        self.pending: list[bytes] = []
        self.outbox = bytearray()           # taken or counted, not yet sent: older than all of `pending`
        # Neither in the switchboard's line of outputs to write nor watched until its socket takes more:
        # the next line queued lines it up. The switchboard sets it before it takes what is pending, so a line
        # queued after that lines the output up again. (Lines the switchboard appends itself, it writes itself,
        # with no lining up: Switchboard.queue.)
        self.idle = True
        self.stalled_since: float | None = None
        self.reason: str | None = None      # why the connection ends, once it does
        self.dropped = False                # ended with its queued output thrown away
        # The farewell while it waits in `pending`; b"" once taken. A producer that saw the output open an
        # instant before it ended may still append a line: whatever comes after the farewell is dropped.
        self.last_words: bytes | None = None
        self.closed = False
        self.broken = False                 # a write failed: the socket is gone, whatever it took before
        self.refusing = False               # ending or closed: nothing more is queued
        self.reader = reader                # the connection, once the switchboard reads it
        self.owner: int | None = None       # the thread that signs the connection in, while it does
        self.reading = False                # the switchboard reads the socket now; its state_lock
        self.listening = 0                  # the selector events the switchboard waits for; its state_lock

    def __repr__(self) -> str:
        return self.name()

    def send(self, event: Any, tagged: bool = False) -> None:
        """Queue one event for this connection alone; TAGGED for a room's that is not its current one."""
        self.send_bytes(self.protocol.encode(event, tagged))

    def send_bytes(self, data: bytes) -> None:
        """Queue DATA for this connection alone.

        While a connection signs in, its own thread writes what it queues
        itself, before it waits for the next answer (ClientConnection.read_lines):
        that saves waking the switchboard for each of the lines of a sign-in.
        """
        if self.owner == threading.get_ident():
            if data and not self.refusing:
                self.pending.append(data)
                self.idle = False       # lined up by no one: the owner writes it
        else:
            self.switchboard.queue((self,), data)

    def peer_closed(self) -> bool:
        """The other end has closed the connection, though no one has read the end yet: a connection left
        behind whose name a newcomer may take at once."""
        if self.reason is not None:
            return True
        try:
            with self.io_lock:      # the raw socket: a TLS one's closing record is not data to peek at
                return socket.socket.recv(self.sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def end(self, reason: str, farewell: Any = None, drop_output: bool = False) -> bool:
        """End the connection for REASON, telling the person FAREWELL; False if it was ending already.

        Normally what is queued is still sent, farewell last: nothing is queued
        after it. With DROP_OUTPUT (a reader who does not read) the outbox is
        thrown away and the farewell is written only if the socket takes it at once.
        """
        data = b"" if farewell is None else self.protocol.encode(farewell)
        with self.io_lock:
            if self.reason is not None or self.closed:
                return False
            self.reason = reason
            self.refusing = True
            if drop_output:
                self.dropped = True
                self.outbox.clear()
                self.pending.clear()
            elif data:
                self.pending.append(data)
                self.last_words = data
                line_up, self.idle = self.idle, False
        if drop_output:
            log.warning("cutting off %r: %s", self, reason)
            if data:
                with contextlib.suppress(OSError, ValueError), self.io_lock:
                    self.sock.send(data)        # only if the socket takes it at once: else they are not told
        elif data and line_up:
            self.switchboard.mark_ready([self])
        with contextlib.suppress(OSError):
            # The plain socket method: on a TLS socket the ssl module's shutdown() would also drop the
            # TLS state, which its reader may be using at this moment. Shutting the reading side wakes
            # whoever reads it (its sign-in thread or the switchboard), which then finishes the connection.
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR if drop_output else socket.SHUT_RD)
        return True

    def waiting(self) -> int:
        """Move what is pending to the outbox; the bytes that wait to be sent."""
        with self.io_lock:
            if self.pending:
                self.outbox += self._take_pending()
            return len(self.outbox)

    def _take_pending(self) -> bytes:
        """Everything pending, taken off, up to the farewell if there is one; io_lock held."""
        if self.last_words is None:
            return take(self.pending, len(self.pending))
        taken = []
        while self.pending and self.last_words:
            chunk = self.pending.pop(0)
            taken.append(chunk)
            if chunk is self.last_words:
                self.last_words = b""
        if not self.last_words:
            self.pending.clear()
        return b"".join(taken)

    def flush(self) -> bool:
        """Write the outbox and everything pending, as much as the socket takes now, in one system call;
        True if some is left.

        This runs for every receiver of every line, so the usual case (nothing
        waited from before, and the socket takes it all) is the short path.
        """
        with self.io_lock:
            self.idle = True        # before taking: a line queued from now on lines the output up again
            pending = self.pending
            if self.outbox or self.closed or self.last_words is not None:
                return self._flush_behind()
            count = len(pending)
            if not count:
                return False
            data = take(pending, count)
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                sent = 0
            except OSError:
                self.broken = True
                return False        # whoever reads the connection will find it gone
            if sent == len(data):
                return False
            # The socket took only part: the rest waits, and the switchboard watches the socket now.
            self.outbox[:] = memoryview(data)[sent:]
            self.idle = False
            self.stalled_since = time.monotonic()
            return True

    def write_at_once(self, data: bytes) -> bool:
        """(switchboard) Send DATA now, if nothing waits to go before it; False if it must be queued instead."""
        if self.pending:
            return False
        with self.io_lock:
            if self.outbox or self.closed:
                return False
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return False
            except OSError:
                return True         # whoever reads the connection will find it gone
            if sent < len(data):
                # The rest waits, and the switchboard (this thread) watches the socket from its next flush.
                self.outbox[:] = memoryview(data)[sent:]
                self.stalled_since = time.monotonic()
                self.idle = False
                self.switchboard.ready.append(self)
        return True

    def _flush_behind(self) -> bool:
        """flush() when output waited from before, or the connection is ending; io_lock held."""
        if self.closed:
            return False
        if self.pending:
            self.outbox += self._take_pending()
        if not self.outbox:
            return False
        data, self.outbox = self.outbox, bytearray()
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except OSError:
            self.broken = True
            return False
        if sent < len(data):
            self.outbox[:0] = memoryview(data)[sent:]
            self.idle = False
        if sent:
            self.stalled_since = None
        if self.outbox and self.stalled_since is None:
            self.stalled_since = time.monotonic()
        return bool(self.outbox)

    def write_all(self, seconds: float) -> bool:
        """(the thread that signs the connection in) Write everything queued, waiting up to SECONDS for the
        other end to acknowledge it; True only if it did, with no write failing."""
        deadline = time.monotonic() + seconds
        while self.flush():
            if time.monotonic() >= deadline:
                return False
            wait_until_writable(self.sock, deadline - time.monotonic())
        return not self.broken and not self.closed and acknowledged(self.sock, deadline)

    def stalled_longer_than(self, seconds: float, now: float) -> bool:
        """True if the socket has taken nothing for SECONDS while output waited."""
        return self.stalled_since is not None and now - self.stalled_since > seconds

    def close(self) -> None:
        """Send what is queued (for a short while, unless dropped), then close the socket, whatever happens."""
        if self.closed:
            return
        try:
            if not self.dropped:
                deadline = time.monotonic() + DRAIN_SECONDS
                while self.flush() and time.monotonic() < deadline:
                    wait_until_writable(self.sock, deadline - time.monotonic())
        except Exception:
            log.exception("sending the last output to %r failed", self)
        finally:
            with self.io_lock:
                self.closed = self.refusing = True
                self.idle = False
                self.outbox.clear()
                self.pending.clear()
            try:
                self.switchboard.forget(self)   # after `closed`, so the switchboard cannot watch it again
            finally:
                self.sock.close()


class Workers:
    """Threads for work that may wait: signing a newcomer in, running a command, draining a last output.

    A task goes to an idle worker if there is one, and otherwise to a new
    thread, so a slow task (a password check, a pause after a wrong guess)
    never holds up another. Up to IDLE_WORKERS finished workers wait for the next
    task instead of ending: starting a thread costs more than most tasks.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle = 0                   # workers waiting in tasks.get(), or about to; lock
        self.tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    def run(self, task: Callable[[], None]) -> None:
        """Run TASK on a worker; raises RuntimeError (or MemoryError) when no thread can start."""
        with self.lock:
            if self.idle:
                self.idle -= 1
                self.tasks.put(task)
                return
        threading.Thread(target=self._work, args=([task],), daemon=True).start()

    def _work(self, first: list[Callable[[], None]]) -> None:
        # Taken out of the list: a thread's arguments live as long as it does, and the task may hold a
        # connection that has long left.
        task = first.pop()
        while True:
            try:
                task()
            except Exception:       # a task that fails must not take the worker with it
                log.exception("a task on a worker thread failed")
            task = None             # nothing of the last task stays reachable while this one waits
            with self.lock:
                if self.idle >= IDLE_WORKERS:
                    return
                self.idle += 1
            task = self.tasks.get()


class Switchboard(threading.Thread):
    """The one thread that reads what signed-in people send and writes every connection's output.

    A connection signs in on a worker thread, where prompts may wait for
    answers and passwords take time to check; then it is handed to the
    switchboard (adopt()). Chat lines are handled here as they are read. Any
    other line, a command, goes with whatever that connection sent after it to
    a worker thread, and the switchboard stops reading that connection until
    the worker is done: a slow command holds no one else up, and a person's
    lines keep their order.

    Lines are queued to outputs from any thread without a lock (see Output).
    Once per pass, after everything that was readable has been read, each
    output with lines waiting is written in one system call: under load the
    lines for one receiver leave together, and at light load each leaves at
    once (in a quiet pass, as it is queued: see queue()). A socket that cannot take more is watched until it can, and cut off
    if it takes nothing for --stall-timeout.
    """

    def __init__(self, max_queue: int, stall_timeout: float, workers: Workers) -> None:
        super().__init__(name="switchboard", daemon=True)
        self.set_limits(max_queue, stall_timeout)
        self.workers = workers              # where commands run
        self.ready: collections.deque[Output] = collections.deque()     # outputs with lines to write
        self.arrivals: collections.deque[ClientConnection] = collections.deque()  # to read from now on
        self.readers: set[ClientConnection] = set()     # the connections read here; this thread only
        self.selector = selectors.DefaultSelector()
        self.watched: set[Output] = set()       # waiting until their sockets take more
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.selector.register(self.wake_reader, selectors.EVENT_READ)
        self.state_lock = threading.Lock()
        self.sleeping = False       # the switchboard waits in select() for more than a moment; state_lock
        self.sleep_seconds = 1.0    # the longest wait: stalled readers and idle clocks are looked at once a second
        self.quiet = False          # this pass of the switchboard handles one event; this thread only
        self.now = time.monotonic()         # when this pass began; this thread only
        # Receivers of lines appended here, to write at the end of this pass; this thread only.
        self.written: list[tuple[Output, ...]] = []
        # Receivers of lines held, with when and the room (see HOLD_PER_RECEIVER); the first release due;
        # when each room's lines were last written; this thread only.
        self.held: list[tuple[float, str, tuple[Output, ...]]] = []
        self.release_at = math.inf
        self.room_written: dict[str, float] = {}
        self.running = True
        # Called before chat lines are written to anyone (ChatServer sets it: Storage.commit_lines), so that
        # they are in the database before anyone sees them.
        self.before_writing: Callable[[], None] = lambda: None
        self.least_hold = 0.0       # the shortest hold of a busy room (HISTORY_HOLD_SECONDS with history kept)
        # The replies to a command that must go out together (IRC's labeled-response), by the thread that runs
        # it: what that thread queues for the output is kept in the list instead. Changed by that thread only.
        self.gathering: dict[int, tuple[Output, list[bytes]]] = {}

    def set_limits(self, max_queue: int, stall_timeout: float) -> None:
        """--max-queue and --stall-timeout, from the start or a reload; each is read whole, by any thread."""
        self.max_queue = max_queue
        self.stall_timeout = stall_timeout

    def queue(self, outputs: Iterable[Output], data: bytes, room: Room | None = None, reply: bool = True) -> None:
        """Append DATA to each output's pending chunks, and see that they are written; ROOM is the room
        whose line it is. Not a REPLY (a message someone sent themselves, delivered as if from someone
        else), it is never gathered among the replies to the command that sent it.

        This runs for every line and every receiver, and takes no lock. On the
        switchboard, the line of a room written to a moment ago waits for the
        rest of the room's hold (HOLD_PER_RECEIVER); in a quiet pass (one
        connection had something to say), any other line is sent at once to
        each receiver with nothing waiting: there is nothing for it to go out
        with. Otherwise the receivers are written at the end of the pass.
        Appending to them all happens in C (append_to_each), so that a busy
        room's line costs little Python per receiver.
        """
        if not data:
            return
        if self.gathering and reply:
            outputs = self._gather(outputs, data)
        if threading.get_ident() != self.ident:
            self._line_up(outputs, data)
            return
        if room is not None:
            written = self.room_written.get(room.key, 0.0)
            release = written + min(MAX_HOLD_SECONDS, max(self.least_hold, room.receivers * HOLD_PER_RECEIVER))
            # Written in an earlier pass, a moment ago? (A line's other audiences, and the room's other
            # lines in this pass, go with the first.)
            if written < self.now < release:
                outputs = tuple(outputs)
                append_to_each(outputs, data)
                self.held.append((release, room.key, outputs))
                self.release_at = min(self.release_at, release)
                return
            self.room_written[room.key] = self.now
        if self.quiet:
            self.before_writing()
            self._line_up(outputs, data, at_once=True)
        else:
            outputs = tuple(outputs)
            append_to_each(outputs, data)
            self.written.append(outputs)

    @contextlib.contextmanager
    def gathered(self, output: Output) -> Iterator[list[bytes]]:
        """Keep what this thread queues for OUTPUT in the list it gives, instead of sending it: the replies
        to one command, whatever part of the server makes them, for the caller to send as one answer."""
        replies: list[bytes] = []
        thread = threading.get_ident()
        self.gathering[thread] = (output, replies)
        try:
            yield replies
        finally:
            del self.gathering[thread]

    def _gather(self, outputs: Iterable[Output], data: bytes) -> Iterable[Output]:
        """OUTPUTS but the one whose replies this thread gathers, if it is among them (DATA then goes to
        its list). Only while a command's replies are gathered: the usual line costs one test."""
        gathering = self.gathering.get(threading.get_ident())
        if gathering is None:
            return outputs
        output, replies = gathering
        if output not in outputs:
            return outputs
        replies.append(data)
        return [other for other in outputs if other is not output]

    def _line_up(self, outputs: Iterable[Output], data: bytes, at_once: bool = False) -> None:
        """queue() from another thread, or AT_ONCE in a quiet pass: each output in turn.

        A receiver who has fallen PENDING_BEFORE_COUNT lines behind is counted,
        and cut off past --max-queue.
        """
        newly_ready = []
        behind = []
        for output in outputs:
            if output.refusing:
                continue
            if at_once and output.idle and output.write_at_once(data):
                continue
            pending = output.pending
            pending.append(data)
            if output.idle:
                output.idle = False
                newly_ready.append(output)
            if len(pending) > PENDING_BEFORE_COUNT:
                behind.append(output)
        for output in behind:
            self.check_size(output)
        if newly_ready:
            self.mark_ready(newly_ready)

    def check_size(self, output: Output) -> None:
        """Cut OUTPUT off if more than --max-queue bytes wait for it."""
        size = output.waiting()
        if size > self.max_queue:
            output.end(f"not reading: {size} bytes waiting", Farewell("not reading what the server sends"),
                       drop_output=True)

    def mark_ready(self, outputs: list[Output]) -> None:
        """Line OUTPUTS up for writing, waking the switchboard if it sleeps."""
        with self.state_lock:
            self.ready.extend(outputs)
            wake, self.sleeping = self.sleeping, False
        if wake:
            self.wake_writer.send(b"\0")

    def adopt(self, connection: ClientConnection) -> None:
        """Read CONNECTION here from now on (again, after a worker ran its commands)."""
        with self.state_lock:
            self.arrivals.append(connection)
            wake, self.sleeping = self.sleeping, False
        if wake:
            self.wake_writer.send(b"\0")

    def forget(self, output: Output) -> None:
        """Stop watching an output before its socket is closed."""
        with self.state_lock:
            self.watched.discard(output)
            output.reading = False
            self._listen(output)

    def stop(self) -> None:
        self.running = False
        self.wake_writer.send(b"\0")

    def run(self) -> None:
        next_check = time.monotonic() + 1.0
        while self.running:
            with self.state_lock:
                # Decided under the lock that mark_ready() and adopt() take: whatever comes after this
                # sees `sleeping` and rings, so the select() below returns at once.
                self.sleeping = not (self.ready or self.arrivals or self.written)
                timeout = self.sleep_seconds if self.sleeping else 0
            if timeout and self.held:
                timeout = min(timeout, max(0.0, self.release_at - time.monotonic()))
            events = self.selector.select(timeout)
            with self.state_lock:
                self.sleeping = False
            self.now = now = time.monotonic()
            ready = self.ready
            self.quiet = len(events) == 1 and not ready
            for key, mask in events:
                output = key.data
                if output is None:
                    self.wake_reader.recv(4096)
                    continue
                if mask & selectors.EVENT_WRITE:
                    ready.append(output)                # writable again
                if mask & selectors.EVENT_READ and output.reading:
                    try:
                        self.run_lines(output.reader, output.reader.on_readable)
                    except Exception:   # one broken connection must not silence everyone
                        self.broke(output, "reading from")
            self.quiet = False
            arrivals = self.arrivals
            while arrivals:
                connection = arrivals.popleft()
                try:
                    self.welcome(connection)
                except Exception:
                    self.broke(connection.output, "starting to read")
            if now >= self.release_at or self.written or ready:
                self.before_writing()       # only then: lines held for a room are committed together
            if now >= self.release_at:
                self.release_held(now)
            if self.written:
                self.write_out(set().union(*self.written))
                self.written = []
            while ready:
                self.write(ready.popleft())
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 1.0
                self.room_written = {room: when for room, when in self.room_written.items()
                                     if when > now - MAX_HOLD_SECONDS}
                try:
                    self.cut_off_stalled()
                    self.check_clocks()
                except Exception:
                    log.exception("checking the connections' clocks failed")

    def broke(self, output: Output, what: str) -> None:
        """Something unexpected failed for one connection: log it, end that connection, and carry on."""
        log.exception("%s %r failed", what, output)
        output.end("server error", Farewell("a server error (it was logged)"), drop_output=True)
        if output.reader is not None and output.reader.adopted:
            try:
                self.finish(output.reader)
            except Exception:
                log.exception("letting %r go failed", output)

    # -- reading ---------------------------------------------------------------

    def welcome(self, connection: ClientConnection) -> None:
        """Start (or go back to) reading CONNECTION: first what it sent while it signed in or ran a command."""
        if connection.output.reason is not None:
            self.finish(connection)
            return
        self.readers.add(connection)
        if not self.run_lines(connection, connection.take_unread_lines):
            return
        with self.state_lock:
            connection.output.reading = True
            self._listen(connection.output)
        if connection.has_buffered_input():
            self.run_lines(connection, connection.on_readable)

    def run_lines(self, connection: ClientConnection, step: Callable[[], None]) -> bool:
        """Run STEP, which reads or handles CONNECTION's lines; a command it left goes to a worker, and
        the end of the connection is finished here. True if the switchboard goes on reading it."""
        try:
            step()
        except Disconnect as why:
            connection.output.end(why.reason, why.farewell)
        except Exception:       # one broken connection must not silence everyone
            log.exception("reading from %r failed", connection)
            connection.output.end("server error", Farewell("a server error (it was logged)"))
        if connection.output.reason is not None:
            self.finish(connection)
            return False
        if connection.command is not None:
            self.hand_over(connection)
            return False
        return True

    def hand_over(self, connection: ClientConnection) -> None:
        """Stop reading CONNECTION while a worker runs its command and what came after; it comes back
        through adopt()."""
        with self.state_lock:
            connection.output.reading = False
            self._listen(connection.output)
        try:
            self.workers.run(connection.run_waiting_command)
        except (RuntimeError, MemoryError) as problem:      # out of threads or memory
            log.error("cannot start a thread for %r: %s", connection, problem)
            connection.command, connection.unread = None, ()
            connection.output.send(Error("The server is out of resources: your command was not run. "
                                         "Try again later."))
            self.welcome(connection)

    def finish(self, connection: ClientConnection) -> None:
        """The connection has ended: stop reading it and let it go."""
        self.readers.discard(connection)
        connection.leave()

    def check_clocks(self) -> None:
        """Let go of connections that stayed silent too long, and ping the IRC clients that are quiet."""
        now = time.monotonic()
        # Not someone whose command runs now: they are not idle, and their person must stay until it ends.
        for connection in [c for c in self.readers if c.output.reading and c.clock_is_due(now)]:
            self.run_lines(connection, functools.partial(connection.check_clock, now))

    # -- writing ---------------------------------------------------------------

    def release_held(self, now: float) -> None:
        """Add the receivers of the held lines whose time has come to those written in this pass."""
        waiting = []
        for held in self.held:
            release, room, outputs = held
            if release <= now:
                self.room_written[room] = now
                self.written.append(outputs)
            else:
                waiting.append(held)
        self.held = waiting
        self.release_at = min((release for release, _, _ in waiting), default=math.inf)

    def write_out(self, outputs: Iterable[Output]) -> None:
        """Write each of OUTPUTS, which lines were appended to on this thread; one whose socket is full
        only has what waits for it counted."""
        watched = self.watched
        for output in outputs:
            if output in watched:
                self.check_size(output)
            else:
                self.write(output)

    def write(self, output: Output) -> None:
        """Write what waits for OUTPUT, as much as its socket takes; watch the socket while some is left."""
        try:
            more = output.flush()
            if more or output in self.watched:     # the usual case is neither: all of it went at once
                self.watch(output, more)
            if more:
                self.check_size(output)
        except Exception:       # one broken connection must not silence everyone
            log.exception("writing to %r failed", output)
            output.end("could not write to it", drop_output=True)

    def watch(self, output: Output, more: bool) -> None:
        """Watch OUTPUT's socket until it takes more if MORE is waiting for it, and stop watching if not."""
        with self.state_lock:
            if more and output not in self.watched and not output.closed:
                self.watched.add(output)
                self._listen(output)
            elif not more and output in self.watched:
                self.watched.discard(output)
                self._listen(output)

    def _listen(self, output: Output) -> None:
        """Make the selector wait for what OUTPUT's socket is read or watched for; state_lock held."""
        events = ((selectors.EVENT_READ if output.reading else 0)
                  | (selectors.EVENT_WRITE if output in self.watched else 0))
        if events == output.listening:
            return
        if not output.listening:
            self.selector.register(output.sock, events, output)
        elif not events:
            self.selector.unregister(output.sock)
        else:
            self.selector.modify(output.sock, events, output)
        output.listening = events

    def cut_off_stalled(self) -> None:
        now = time.monotonic()
        with self.state_lock:
            stalled = [output for output in self.watched if output.stalled_longer_than(self.stall_timeout, now)]
        why = f"not reading for {self.stall_timeout:g} s"
        for output in stalled:
            output.end(why, Farewell(why), drop_output=True)


# ---------------------------------------------------------------------------
# The connection handler: signing in on a worker thread, then read by the switchboard
# ---------------------------------------------------------------------------

class TooManyGuesses(Exception):
    """An address guessed wrong too often; the message says for how long it must wait."""


class Problem(str):
    """Why a sign-in step refused; the empty Problem means going back to the nickname prompt quietly."""


class Disconnect(Exception):
    """Ends a connection: REASON for the log and the rooms, FAREWELL (an event) for the person."""

    def __init__(self, reason: str, farewell: Any = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.farewell = farewell


class ClientConnection(socketserver.BaseRequestHandler):
    """One connection: reading its lines (the nickname prompt, then chatting) and handing them to the server.

    It signs in on a worker thread (see Workers), which waits for input with
    poll(); then the switchboard reads it (adopt()), handles its chat lines,
    and hands its other lines, in order, to a worker (run_waiting_command()).
    The socket is non-blocking; the output and the end of the connection
    belong to `output`.
    """

    server: ChatServer
    # At most 30 attributes on any kind of connection, counting the handler's own three (request,
    # client_address, server), or Python gives each instance a dict of its own: 1.5 KiB more for each
    # idle person. What only signing in needs lives in the sign-in's own objects (IrcRegistration).

    def setup(self) -> None:
        self.sock: socket.socket = self.request
        self.address = self.client_address[0]
        self.person: Person | None = None       # who it is signed in as ...
        self.session: Session | None = None     # ... and as which of their sessions
        self.output = Output(self.sock, self.server.switchboard, PYCHAT, name=self.__repr__, reader=self)
        self.output.owner = threading.get_ident()
        self.lines = LineReader()
        # Read, not yet handled: a deque while there are any, so that an idle connection keeps none (0.7 KiB).
        self.unread: collections.deque[str | None] | tuple = ()
        self.command: str | None = None     # a command left for a worker; what came after it is still unread
        self.adopted = False                # signed in: the switchboard reads it
        self.left = False
        self.bucket = TokenBucket(self.server.options.rate, self.server.options.burst)
        self.flood_excess = 0.0
        self.flood_warned = False
        self.flooded = False                # flood control cut it off; it ends once the lines it took are handled
        # When it connected, was last heard from, and last sent a line (IRC's PING and PONG do not count).
        self.connected = self.last_heard = self.last_active = time.monotonic()
        self.server.register(self)
        self.sock.setblocking(False)
        self.input_waiter = InputWaiter(self.sock, self.server.stop_signal)
        with contextlib.suppress(OSError):      # the peer is already gone; reading will say so
            # A fixed kernel buffer: left to itself, Linux grows it to megabytes for a reader that has
            # stopped, and that output would wait out of sight of --max-queue.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, KERNEL_SEND_BUFFER)
            if TCP_NO_DELAY:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            keepalive = self.server.options.keepalive
            interval, probes = max(1, keepalive // 4), 4
            # TCP_USER_TIMEOUT covers what keepalive cannot: a peer that vanished while data was in flight.
            for name, value in (("TCP_KEEPIDLE", keepalive), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", probes),
                                ("TCP_USER_TIMEOUT", (keepalive + interval * probes) * 1000)):
                if hasattr(socket, name):
                    self.sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)

    def __repr__(self) -> str:
        return f"{self.person.nick if self.person else '(signing in)'}@{self.address}"

    @staticmethod
    def refusal(reason: str) -> bytes:
        """What a newcomer turned away at the door reads before the connection closes."""
        return PYCHAT.encode(Error(reason))

    # -- the story of a connection -----------------------------------------

    def handle(self) -> None:
        log.info("connection from %s:%s", *self.client_address[:2])
        try:
            if self.server.tls is not None:
                self.start_tls()
            lines = self.read_lines()
            self.output.send(Notice(self.server.greeting()))
            if self.server.options.password:
                self.ask_password(lines)
            self.ask_nickname(lines)
            self.hand_to_switchboard()
        except Disconnect as why:
            self.output.end(why.reason, why.farewell)

    def hand_to_switchboard(self) -> None:
        """Signed in: from now on the switchboard reads this connection, and this thread is free."""
        self.bucket = TokenBucket(self.server.options.rate, self.server.options.burst)   # a full burst to start
        self.input_waiter = None
        self.output.owner = None
        self.write_own_output()
        self.adopted = True
        self.server.switchboard.adopt(self)

    def write_own_output(self) -> None:
        """(sign-in thread) Write what waits; what the socket does not take now, the switchboard writes."""
        self.server.storage.commit_lines()
        if self.output.flush():
            self.server.switchboard.mark_ready([self.output])

    def finish(self) -> None:
        if not self.adopted:
            self.leave()

    def leave(self) -> None:
        """Reading is over (on the sign-in thread, or the switchboard): take the person out, send what is
        left, close the socket, and give back what admission counted."""
        if self.left:
            return
        self.left = True
        try:
            self.server.remove(self, self.output.reason or "connection lost")
        finally:
            try:
                self.server.storage.commit_lines()
                if self.adopted and self.output.flush():
                    # Some of it waits for the socket: not on the switchboard, which waits for no one.
                    self.server.workers.run(self.output.close)
                else:
                    self.output.close()
            except (RuntimeError, MemoryError):
                self.output.end("out of threads", drop_output=True)
                self.output.close()
            finally:
                self.server.gate.release(self.address)

    def ask_password(self, lines: Iterator[str | None]) -> None:
        for _ in range(PASSWORD_TRIES):
            self.output.send(Prompt("password"))
            given = next(lines) or ""
            try:
                if self.server.gate.server_password_is(self, given):
                    return
            except TooManyGuesses as refusal:
                raise Disconnect("too many wrong passwords from the address", Farewell(str(refusal))) from None
            self.output.send(Error("Wrong password."))
        raise Disconnect("wrong password", Farewell(f"{PASSWORD_TRIES} wrong passwords"))

    def ask_nickname(self, lines: Iterator[str | None]) -> None:
        while True:
            self.output.send(Prompt("nickname"))
            wanted = next(lines)
            if wanted is None:
                problem = f"Nickname is too long (at most {MAX_NICKNAME_LENGTH} characters)."
            else:
                account = self.prove_name(wanted.strip(), lines)
                problem = account if isinstance(account, Problem) else self.server.sign_in(
                    self, account or wanted.strip(), account)
            if problem is None:
                return
            if problem:
                self.output.send(Error(problem))

    def prove_name(self, nick: str, lines: Iterator[str | None]) -> str | Problem | None:
        """The account NICK belongs to, once its password is given; None for a guest's name.

        A registered name (or a look-alike of one) asks for its password: three
        wrong ones close the connection, an empty answer goes back to choosing
        a nickname (Problem("")). The code of a password reset (/reset-password),
        given there instead, leads to choosing a new password. A name with an
        invitation waiting (on a --private server, any name without an
        account) needs its invitation code, and then a new password.
        """
        gate = self.server.gate
        registered = gate.account_of(nick)
        if registered is None:
            return self.accept_invitation(normal_name(nick), lines) if gate.needs_invitation(nick) else None
        proved: list[str] = []          # what the right answer was: "password", or a reset's "code"

        def check(given: str) -> bool:
            found = gate.check_account(self, registered, given)
            proved[:] = found[1:] if found else []
            return found is not None

        if not self.ask_secret(lines, registered, "password", check):
            return Problem("")
        return self.reset_password(registered, lines) if proved == ["code"] else registered

    def ask_secret(self, lines: Iterator[str | None], nick: str, what: str, check: Callable[[str], bool]) -> bool:
        """Ask for NICK's WHAT ("password" or "code") until it is right (True) or the answer is empty (False).

        CHECK says whether an answer is right, counting the wrong ones as guesses
        (Gate.check_secret); the third closes the connection.
        """
        words = {"password": "password", "code": "invitation code"}[what]
        for tries in range(1, PASSWORD_TRIES + 1):
            self.output.send(AccountPrompt(nick, what))
            given = clean_text(next(lines) or "").strip()     # read as a command's argument would be
            if not given:
                return False
            try:
                if check(given):
                    return True
            except TooManyGuesses as refusal:
                raise Disconnect("too many wrong passwords from the address", Farewell(str(refusal))) from None
            if tries < PASSWORD_TRIES:
                self.output.send(Error(f"Wrong {words} for {nick}."))
        raise Disconnect(f"wrong {words} for {nick}", Farewell(f"{PASSWORD_TRIES} wrong {words}s for {nick}"))

    def accept_invitation(self, nick: str, lines: Iterator[str | None]) -> str | Problem:
        """On a --private server: NICK's invitation code, then their new password; returns the new account."""
        gate = self.server.gate
        if not gate.invitation_waiting(nick):
            return Problem("This server is private: only people with an account may sign in. "
                           "An operator can invite you with /invite-account.")
        if not self.ask_secret(lines, nick, "code", lambda given: gate.check_invitation(self, nick, given)):
            return Problem("")
        password = self.choose_password(nick, lines)
        if isinstance(password, Problem):
            return password
        try:
            gate.register_invited(nick, password, self.address)
        except (StoreFull, StorageError) as problem:
            return Problem(str(problem))
        return nick

    def reset_password(self, account: str, lines: Iterator[str | None]) -> str | Problem:
        """The password reset code of ACCOUNT was given at its password prompt: a new password, and in."""
        self.output.send(Notice(f"That is the password reset code for {account}: choose a new password."))
        password = self.choose_password(account, lines)
        if isinstance(password, Problem):
            return password
        try:
            self.server.gate.reset_password(account, password, self.address)
        except (Refused, StorageError) as problem:
            return Problem(str(problem))
        self.output.send(Notice(f"The password of {account} is changed."))
        return account

    def choose_password(self, nick: str, lines: Iterator[str | None]) -> str | Problem:
        """A new password for NICK's account, asked until it is strong enough; an empty answer goes back to
        choosing a nickname (Problem(""): the code that led here still holds)."""
        while True:
            self.output.send(AccountPrompt(nick, "new password"))
            password = clean_text(next(lines) or "").strip()
            if not password:
                return Problem("")
            problem = password_problem(password, nick)
            if problem is None:
                return password
            self.output.send(Error(problem))

    def on_line(self, line: str | None, on_switchboard: bool = False) -> bool:
        """One line from a signed-in person: a command, or something to say to their current room.

        On the switchboard only what waits for nothing is done: a command is
        left (False) for a worker.
        """
        self.last_active = self.last_heard
        if line is None:
            self.output.send(Error(f"Line too long (over {MAX_LINE_BYTES} bytes); it was not sent."))
            return True
        text = clean_text(line)
        if not text:
            return True
        if text.startswith("/") and not text.startswith("//"):
            if on_switchboard:
                return False
            log.debug("%r: %s", self, text.split(" ", 1)[0])
            self.server.commands.run(Context(self.server, self.session), text)
            return True
        try:
            self.server.say(self.session, text[1:] if text.startswith("//") else text)
        except Refused as refusal:          # a moderated room, or one that bans them
            self.output.send(Error(str(refusal)))
        return True

    # -- read by the switchboard ------------------------------------------------

    def on_readable(self) -> None:
        """(switchboard) Read what came and handle it; raises Disconnect when the connection is over."""
        while True:
            if self.output.reason is not None:      # ended from elsewhere
                raise Disconnect(self.output.reason)
            if not self.receive():
                return
            self.take_unread_lines()
            if self.command is not None or not self.has_buffered_input():
                return

    def take_unread_lines(self, on_switchboard: bool = True) -> None:
        """Handle what was read, in order. On the switchboard, a command stops it: the command waits in
        `command`, and what came after it stays unread, for a worker (run_waiting_command())."""
        unread = self.unread
        while unread and self.output.reason is None:
            line = unread.popleft()
            if (self.is_keepalive(line) or self.within_rate()) and not self.on_line(line, on_switchboard):
                self.command = line
                return
        if not unread:
            self.unread = ()
            self.end_if_flooded()

    def run_waiting_command(self) -> None:
        """(a worker) Run the command the switchboard left and handle what came after it, then give the
        connection back."""
        try:
            command, self.command = self.command, None
            self.on_line(command)
            self.take_unread_lines(on_switchboard=False)
        except Disconnect as why:
            self.output.end(why.reason, why.farewell)
        except Exception:
            log.exception("handling a line from %r failed", self)
            self.output.end("server error", Farewell("a server error (it was logged)"))
        finally:
            self.server.switchboard.adopt(self)

    def has_buffered_input(self) -> bool:
        """True if input was read off the socket but not yet given to us (TLS decrypts whole records)."""
        return self.server.tls is not None and self.sock.pending() > 0

    def clock_is_due(self, now: float) -> bool:
        """(switchboard, once a second) True if check_clock() has something to do."""
        timeout = self.server.options.idle_timeout
        return bool(timeout) and now - self.last_heard >= timeout

    def check_clock(self, now: float) -> None:
        """(switchboard) Let go of someone silent for --idle-timeout."""
        if self.clock_is_due(now):
            raise Disconnect("timed out", Farewell(f"idle for {self.server.options.idle_timeout:g} s"))

    @staticmethod
    def is_keepalive(line: str | None) -> bool:
        """Whether LINE only says the connection is alive; pyChat's own protocol has no such line."""
        return False

    def within_rate(self) -> bool:
        """Flood control: refuse lines over the rate, and disconnect someone who keeps at it."""
        bucket = self.bucket
        if self.flood_excess:
            # Refused lines drain away at the allowed rate, over the time since the bucket last filled (before
            # allow() moves it on to now); a pile of them means a flood, not a paste.
            self.flood_excess = max(0.0, self.flood_excess - (time.monotonic() - bucket.updated) * bucket.rate)
        if bucket.allow():
            self.flood_warned = False
            return True
        self.flood_excess += 1
        if self.flood_excess > self.flood_margin():
            self.flooded = True
            self.end_if_flooded()
        if not self.flood_warned:
            self.flood_warned = True
            self.output.send(Error(f"You are sending too fast (limit {self.bucket.rate:g} lines a second); "
                                   "lines are being dropped."))
        return False

    def end_if_flooded(self) -> None:
        """Raise Disconnect if this connection flooded: refused lines piled up past the flood margin, or one
        read held more lines than flood control would have taken (lines_allowed()). In that case the
        lines it took are handled first, and this is called when they are."""
        if self.flooded:
            raise Disconnect("flooding", Farewell(f"flooding (more than {self.bucket.rate:g} lines a second)"))

    def flood_margin(self) -> float:
        """How many refused lines, draining away at the rate, make a flood rather than a paste."""
        return 2 * self.bucket.burst + 10

    def lines_allowed(self) -> int:
        """How many lines flood control would take from this connection now before cutting it off: the
        allowed ones, then the refused ones up to the flood margin; -1 without flood control. Lines that
        come at once past these are not even split (LineReader): the switchboard's work for one
        connection is bounded by what that connection is allowed."""
        bucket = self.bucket
        if not bucket.rate:
            return -1
        drained = (time.monotonic() - bucket.updated) * bucket.rate
        tokens = min(bucket.burst, bucket.tokens + drained)
        excess = max(0.0, self.flood_excess - drained)
        return int(tokens) + int(max(0.0, self.flood_margin() - excess)) + 1

    # -- input --------------------------------------------------------------

    def read_lines(self) -> Iterator[str | None]:
        """(sign-in thread) The lines this person sends, as they come; raises Disconnect on timeouts and
        closes. What was read and not yet taken when they sign in stays in `unread` for the switchboard."""
        while True:
            while self.unread:
                line = self.unread.popleft()
                # Every line counts against the rate, whatever it is and whenever it comes, but keepalives.
                if self.is_keepalive(line) or self.within_rate():
                    yield line
            self.write_own_output()
            # Wait first: after a read the socket is nearly always empty, and trying it costs a system call.
            if not self.has_buffered_input():
                self.wait_for_input()
            self.receive()

    def receive(self) -> bool:
        """Read what has come into `unread`; False if nothing had.

        Raises Disconnect when the connection is lost or closed, or sent far more
        lines than flood control lets through (see lines_allowed()).
        """
        self.end_if_flooded()
        try:
            with self.output.io_lock:
                data = self.sock.recv(RECEIVE_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except OSError as problem:
            raise Disconnect(f"connection lost ({problem.strerror or problem})") from None
        if not data:
            if self.server.stopping:
                raise Disconnect("server shutting down", ShuttingDown())
            raise Disconnect("connection closed")
        self.last_heard = time.monotonic()
        lines = self.lines.feed(data, self.lines_allowed())
        self.flooded = self.flooded or self.lines.dropped > 0
        if self.unread:
            self.unread.extend(lines)
        elif lines:
            self.unread = collections.deque(lines)
        return True

    def wait_for_input(self) -> None:
        """(sign-in thread) Wait for input; signing in is timed from the connection (--nick-timeout)."""
        timeout = self.server.options.nick_timeout
        deadline = self.connected + timeout
        while True:
            if self.server.stopping:
                raise Disconnect("server shutting down", ShuttingDown())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Disconnect("did not sign in in time", Farewell(f"no nickname within {timeout:g} s"))
            if self.input_waiter.wait(remaining):
                return

    def start_tls(self) -> None:
        """Shake hands; someone who speaks plain text to this port is told, in plain text, how to connect."""
        self.wait_for_input()
        try:
            first = self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            first = TLS_HANDSHAKE               # nothing after all: let the handshake wait for it
        except OSError as problem:
            raise Disconnect(f"connection lost ({problem.strerror or problem})") from None
        if not first:
            raise Disconnect("connection closed")
        if first != TLS_HANDSHAKE:
            with contextlib.suppress(OSError):
                self.sock.recv(RECEIVE_SIZE)    # read what was said, so that closing does not reset the answer
            port = self.server.server_address[1]
            self.output.send(Error(f"This port speaks TLS, not plain text. Connect with "
                                   f"pyChat-client.py --tls --port {port}, or openssl s_client -connect HOST:{port}."))
            raise Disconnect("spoke plain text to the TLS port")
        try:
            self.sock = self.server.tls.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
            self.output.sock = self.sock
            while True:
                try:
                    self.sock.do_handshake()
                    return
                except ssl.SSLWantReadError:
                    self.wait_for_input()
                except ssl.SSLWantWriteError:
                    wait_until_writable(self.sock, 1.0)
        except (ssl.SSLError, OSError) as problem:
            raise Disconnect(f"TLS handshake failed ({problem})") from None


class InputWaiter:
    """Waits for input on a connection's socket, or for the server to stop."""

    def __init__(self, sock: socket.socket, stop_signal: socket.socket) -> None:
        self.sockets = (sock.fileno(), stop_signal.fileno())
        # poll(), not select(), where there is one: select() cannot watch descriptors above 1023.
        self.poller = select.poll() if hasattr(select, "poll") else None
        for fd in self.sockets if self.poller else ():
            self.poller.register(fd, select.POLLIN)

    def wait(self, timeout: float) -> bool:
        """True when the socket has input; False when TIMEOUT ran out or the server is stopping."""
        if self.poller is None:
            return self.sockets[0] in select.select(self.sockets, (), (), timeout)[0]
        events = self.poller.poll(max(0, int(timeout * 1000)))
        return any(fd == self.sockets[0] for fd, _ in events)


# ---------------------------------------------------------------------------
# What lasts: one SQLite database
# ---------------------------------------------------------------------------
#
# Everything the server keeps across restarts is in one SQLite database:
# DIR/pychat.db with --data-dir, or a database in memory without it, through
# the same code. Storage is the only code that runs SQL; everyone else asks it
# through its named methods.
#
# The promises: a change someone is told was saved (an account, a ban, an
# invitation...) is committed, and the write-ahead log that holds it fsync'ed,
# before they are told, so a kill -9 or a power cut loses nothing confirmed;
# the fsync waits outside the lock, so a slow disk never stalls the chat. A
# chat line is committed to the write-ahead log before anyone is sent it,
# without waiting for the disk: a kill -9 loses none, a power cut may lose the
# last moments of chat. A line that cannot be written (a full disk) is kept in
# memory, retried every second, and logged.
#
# Nothing in the file is trusted: PRAGMA quick_check runs at every start (and
# integrity_check with --check), and every value read is checked before use.
#
# Slow work runs on the storage's own thread (Storage.maintain) in small
# batches: retention by age and size, the search index, checkpoints.
#
# Locks: Storage.lock is taken after the server's lock when both are held;
# Storage never calls back into the server.

SCHEMA_VERSION = 3
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE accounts (key TEXT PRIMARY KEY, name TEXT NOT NULL, salt BLOB NOT NULL, hash BLOB NOT NULL,
    n INTEGER NOT NULL, r INTEGER NOT NULL, p INTEGER NOT NULL, since REAL NOT NULL,
    ignoring TEXT NOT NULL DEFAULT '', last_seen REAL);
CREATE TABLE operators (key TEXT PRIMARY KEY, name TEXT NOT NULL, by TEXT NOT NULL, since REAL NOT NULL);
CREATE TABLE invitations (key TEXT PRIMARY KEY, name TEXT NOT NULL, code TEXT NOT NULL, by TEXT NOT NULL,
    expires REAL NOT NULL, purpose TEXT NOT NULL DEFAULT 'account');
CREATE TABLE bans (key TEXT PRIMARY KEY, kind TEXT NOT NULL, target TEXT NOT NULL, shown TEXT NOT NULL,
    reason TEXT, by TEXT NOT NULL, since REAL NOT NULL, expires REAL);
CREATE TABLE mutes (key TEXT PRIMARY KEY, kind TEXT NOT NULL, target TEXT NOT NULL, shown TEXT NOT NULL,
    reason TEXT, by TEXT NOT NULL, since REAL NOT NULL, expires REAL);
CREATE TABLE rooms (key TEXT PRIMARY KEY, name TEXT NOT NULL, topic TEXT, modes TEXT NOT NULL DEFAULT '');
CREATE TABLE offline (id INTEGER PRIMARY KEY, recipient TEXT NOT NULL, name TEXT NOT NULL, sender TEXT NOT NULL,
    sender_id TEXT NOT NULL, time REAL NOT NULL, text TEXT NOT NULL);
CREATE INDEX offline_by_recipient ON offline (recipient, id);
CREATE TABLE messages (id INTEGER PRIMARY KEY, time INTEGER NOT NULL, target TEXT NOT NULL, nick TEXT NOT NULL,
    account TEXT, kind INTEGER NOT NULL, text TEXT NOT NULL);
CREATE INDEX messages_by_target ON messages (target, id);
"""
# What each version of the schema adds to the one before: a new database runs SCHEMA and then every upgrade,
# an older one the upgrades it has not had, each in the transaction that writes its number.
SCHEMA_UPGRADES = {
    2: """
CREATE TABLE kept_rooms (account TEXT NOT NULL, room TEXT NOT NULL, name TEXT NOT NULL, password TEXT,
    used REAL NOT NULL, PRIMARY KEY (account, room)) WITHOUT ROWID;
CREATE TABLE read_positions (account TEXT NOT NULL, target TEXT NOT NULL, id INTEGER NOT NULL,
    PRIMARY KEY (account, target)) WITHOUT ROWID;
""",
    3: """
CREATE TABLE room_masks (room TEXT NOT NULL, list TEXT NOT NULL, mask TEXT NOT NULL, by TEXT NOT NULL,
    since REAL NOT NULL, PRIMARY KEY (room, list, mask));
""",
}
# A message's id is the moment it was said in microseconds since 1970 (one more than the last id when two
# lines fall in the same microsecond, or the clock goes back): unique, growing, and a time is an id too, so
# the primary key serves "since a time" and retention by age, with no index of its own.
# A message's target: '#' and a room's name_key(); '@' and the two accounts' keys of a private conversation,
# sorted, with a newline between; '~' and the same where one of the two is a guest ("guest/" and the
# serial of their connection: Person.identity), kept only while that guest is online.
# An account's last_seen: when its owner last signed in or out (NULL: not since it came from pyChat 2.0).
# An invitation's purpose (INVITATION_PURPOSES): 'account', a code to make the account NAME and choose its
# password; 'password', a code to choose a new password for the account NAME (/reset-password). Only a
# SHA-256 of each code is kept.
# A mute has a ban's shape (Ban): of an account, or of a guest's address.
# An account's kept rooms: the rooms its owner is in, on every device, with the key that let them in and
# when each was last current (the one used last is current again at the next sign-in).
# A lasting room's masks (ROOM_MASK_LISTS: its bans, exceptions, invitation masks), by the room's name_key().
# An account's read positions: per room or private conversation (a message target), the id of the last line
# its owner has read; it only grows. A row is also how a private conversation is known to be theirs: the
# first line to an account writes one just below that line, so that it shows as new.
# Which lines hold a word, and no more (no positions, no sizes: /search finds words, newest first, and
# ranks nothing): a third cheaper to keep up to date than FTS5's default, and a quarter smaller.
SEARCH_INDEX = ("CREATE VIRTUAL TABLE IF NOT EXISTS messages_text USING fts5(text, content='messages', "
                "content_rowid='id', detail=none, columnsize=0)")
TABLES = ("meta", "accounts", "operators", "invitations", "bans", "mutes", "rooms", "offline", "messages",
          "kept_rooms", "read_positions", "room_masks")
INVITATION_PURPOSES = ("account", "password")
MESSAGE_KINDS = ("line", "action", "notice")      # a message's kind is its place here
DATABASE_FILE = "pychat.db"
HISTORY_DAYS = 365.0              # --history-days: days chat lines are kept (0: none are kept)
HISTORY_MAX_MB = 1024             # --history-max-mb: the database's size past which the oldest lines go
HISTORY_MAX_MB_IN_MEMORY = 16     # ... its default without --data-dir, where the database is in memory
MAINTENANCE_SECONDS = 1.0         # how often the storage's thread looks for work
RETENTION_BATCH = 2000            # lines removed at once: a short hold of the storage lock
SEARCH_INDEX_BATCH = 5000         # lines added to the search index at once
SEARCH_MERGE_PAGES = 500          # pages of the search index merged after each batch of lines removed
UNSAVED_LINES = 10_000            # chat lines that could not be written, kept in memory for another try
SEARCH_RESULTS = 20               # lines /search shows at most
SEARCH_SCAN_LINES = 200_000       # lines the search without an index looks through, the newest first
SEARCH_PAGE = 500                 # lines the search without an index reads at once
PRIVATE_TARGETS = ("@", "~")
NO_POSITIONS: Any = types.MappingProxyType({})    # a guest's read positions: none, and none may be written
NOTHING: frozenset[Any] = frozenset()      # the one empty frozenset (Python makes a new one each time asked)


class StorageError(Exception):
    """The database cannot be used, or a change could not be saved; the message says which and why."""


class StoreFull(Exception):
    """A limit of what the server keeps was reached; the message is for the person who asked."""


class StoredMessage(NamedTuple):
    """A chat line as the database keeps it."""

    id: int
    when: float                 # a time.time()
    target: str                 # see SCHEMA
    nick: str
    account: str | None
    kind: str                   # one of MESSAGE_KINDS
    text: str


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


def read_before(message_id: int) -> int:
    """A read position just before the line MESSAGE_ID, and before its millisecond too: IRC's read markers
    name times to the millisecond, and a client takes a line of the marker's own millisecond as read."""
    return message_id - message_id % 1000 - 1


def room_target(room: str) -> str:
    """The target of a room's messages in the database."""
    return "#" + name_key(room)


def private_target(one: str, other: str, guest: bool) -> str:
    """The target of a private conversation between the identities ONE and OTHER (see SCHEMA)."""
    return ("~" if guest else "@") + "\n".join(sorted((one, other)))


def may_read(target: str, identity: str) -> bool:
    """Whether the person known as IDENTITY (an account's key, or a guest's) may read TARGET's lines."""
    return target.startswith("#") or (target[:1] in PRIVATE_TARGETS and identity in target[1:].split("\n"))


def _why(problem: BaseException) -> str:
    return str(problem) or type(problem).__name__


def _checked_row(row: tuple, *kinds: type | tuple[type, ...]) -> tuple:
    """ROW as read from the database, or ValueError if a value is not of its kind: nothing read is trusted."""
    if len(row) != len(kinds) or not all(isinstance(value, kind) for value, kind in zip(row, kinds)):
        raise ValueError(f"a row holds values of the wrong kinds: {row!r:.200}")
    return row


# -- passwords ------------------------------------------------------------------------

# One hash at a time per core: each takes SCRYPT_MEMORY, and a crowd signing in at once
# must queue for the CPU rather than take the memory of all of them together.
_SCRYPT_SLOTS = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))


# glibc's malloc serves a block as large as a hash's (16 MiB) from a mapping of its own, unmapped when
# freed, until the first such block is freed: from then on it keeps blocks up to that size in its heaps,
# one heap a thread. Every worker that checked a password would keep 16 MiB: 60 sign-ins to accounts
# grew the server by 290 MiB. A fixed threshold keeps large blocks in mappings of their own, given back
# when freed; it costs a hash about 4,000 page faults, a few percent of its time.
M_MMAP_THRESHOLD = -3                   # mallopt()'s parameter number, from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1024 * 1024


def give_large_blocks_back() -> None:
    """Make freed large blocks go back to the system (see M_MMAP_THRESHOLD); elsewhere than glibc, where
    the allocator does its own thing, nothing."""
    try:
        import ctypes       # here: a Python built without it still serves
        mallopt = ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError):
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


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


@functools.lru_cache(maxsize=4096)     # asked on every arrival and leaving, mostly for the same few addresses
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


class AccountRecord(NamedTuple):
    """An account as /accounts lists it."""

    name: str
    since: float                # registered at, a time.time()
    last_seen: float | None     # when its owner last signed in or out; None if not known


class WaitingInvitation(NamedTuple):
    """An invitation that still works, as /invitations lists it: never its code, which is not kept."""

    name: str
    purpose: str                # one of INVITATION_PURPOSES
    by: str
    expires: float


class SavedRoom(NamedTuple):
    """What outlasts a restart of a room's settings: its topic and its modes."""

    topic: str | None
    modes: tuple[str, ...]


class KeptRoom(NamedTuple):
    """A room an account's owner is in, kept for their next sign-in."""

    name: str
    password: str | None                    # the key that let them in, for a room that has one


class OfflineMessage(NamedTuple):
    """A private message kept for an account that was offline, until it has been shown."""

    sender: str
    sender_key: str
    when: float
    text: str
    number: int = 0                         # where it is kept, until it has been shown


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
        fd = None
        try:
            fd = os.open(self.path, os.O_RDONLY | _CLOEXEC | getattr(os, "O_NONBLOCK", 0))
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                self._complain(f"the message of the day {self.path} is not a regular file")
                return []
            data = os.read(fd, MAX_MOTD_BYTES + 1)
        except OSError as problem:
            self._complain(f"cannot read the message of the day {self.path}: {problem.strerror}")
            return []
        finally:
            if fd is not None:
                os.close(fd)
        if len(data) > MAX_MOTD_BYTES:
            log.warning("message of the day %s: only its first %d bytes are shown", self.path, MAX_MOTD_BYTES)
        self.complained = False
        lines = (clean_text(line) for line in data[:MAX_MOTD_BYTES].decode("utf-8", "replace").splitlines())
        return [line for line in lines if line][:MAX_MOTD_LINES]

    def forget(self) -> None:
        """Read the file again at the next look, even if it seems unchanged."""
        with self.lock:
            self.version = None
            self.complained = False

    def _complain(self, problem: str) -> None:
        if not self.complained:
            self.complained = True
            log.warning("%s", problem)


# -- upgrading from pyChat 2.0's files of JSON lines ----------------------------------
# pyChat 2.0 kept a journal of JSON lines per kind in the data directory: a
# record {"key": K, "value": V} or {"key": K, "deleted": true}, the last word
# about a key winning; history.jsonl held {"time", "room", "line"} and
# {"room", "forget": true}. The first start of this version reads them all
# into the database in one transaction and renames each to NAME.imported.

MAX_RECORD_BYTES = 16 * 1024      # one line of a 2.0 data file; a longer one is skipped with a log line
LATEST_TIME_AHEAD = 86400.0       # a time read from a 2.0 file may be this far ahead of the clock, no further


def _version_2_records(path: str) -> Iterator[tuple[int, dict]]:
    """Each sound record of a 2.0 file with its line number; damaged lines are logged and skipped."""
    try:
        fd = open_data_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    with os.fdopen(fd, "rb") as file:
        for number, raw in enumerate(iter(lambda: file.readline(MAX_RECORD_BYTES + 1), b""), 1):
            try:
                if len(raw) > MAX_RECORD_BYTES:
                    while raw and not raw.endswith(b"\n"):
                        raw = file.readline(RECEIVE_SIZE)
                    raise ValueError(f"longer than {MAX_RECORD_BYTES} bytes")
                if not raw.strip():
                    continue
                if not raw.endswith(b"\n"):
                    raise ValueError("cut short (the end of a write that did not finish)")
                record = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, RecursionError) as problem:
                log.warning("%s line %d: %s; skipped", path, number, _why(problem)[:200])
                continue
            yield number, record


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")     # NaN and Infinity, which JSON does not have


def _text(record: dict, field: str, most: int, optional: bool = False) -> str | None:
    value = record.get(field)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > most:
        raise ValueError(f"{field!r} is not text of at most {most} characters")
    value.encode("utf-8")       # a lone surrogate is not text: UnicodeEncodeError is a ValueError
    return value


def _time(record: dict, field: str, optional: bool = False, ahead: float = LATEST_TIME_AHEAD) -> float | None:
    value = record.get(field)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= time.time() + ahead:
        raise ValueError(f"{field!r} is not a time this server could have written ({value!r:.40})")
    return float(value)


def _whole(record: dict, field: str, low: int, high: int) -> int:
    value = record.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{field!r} is not a whole number from {low} to {high}")
    return value


def _hex(record: dict, field: str, low: int, high: int) -> bytes:
    value = _text(record, field, 2 * high)
    if not re.fullmatch(r"(?:[0-9a-f]{2})+", value) or not low <= len(value) // 2 <= high:
        raise ValueError(f"{field!r} is not {low} to {high} bytes of hexadecimal")
    return bytes.fromhex(value)


def _name(key: str, record: dict, field: str = "name") -> str:
    name = _text(record, field, MAX_NICKNAME_LENGTH)
    problem = name_problem(name, "Room name" if field == "room" else "Nickname")
    if problem and "reserved" not in problem:
        raise ValueError(problem)
    if name_key(name) != key.split("/")[0]:
        raise ValueError(f"{name!r} is filed under the key of another name ({key!r})")
    return name


def _account_row(key: str, v: dict) -> tuple:
    n = _whole(v, "n", 2 ** 10, 2 ** 20)
    if n & (n - 1):
        raise ValueError("'n' is not a power of two")
    ignoring = v.get("ignoring", [])
    if not isinstance(ignoring, list) or len(ignoring) > MAX_IGNORED or not all(
            isinstance(k, str) and 0 < len(k) <= MAX_NICKNAME_LENGTH * 4 and "\n" not in k for k in ignoring):
        raise ValueError(f"'ignoring' is not a list of at most {MAX_IGNORED} names")
    return ("INSERT INTO accounts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
            (key, _name(key, v), _hex(v, "salt", 16, 64), _hex(v, "hash", SCRYPT_LENGTH, SCRYPT_LENGTH), n,
             _whole(v, "r", 1, 32), _whole(v, "p", 1, 16), _time(v, "since"), "\n".join(ignoring)))


def _operator_row(key: str, v: dict) -> tuple:
    return ("INSERT INTO operators VALUES (?, ?, ?, ?)",
            (key, _name(key, v), _text(v, "by", MAX_NICKNAME_LENGTH), _time(v, "since")))


def _invitation_row(key: str, v: dict) -> tuple:
    return ("INSERT INTO invitations VALUES (?, ?, ?, ?, ?, 'account')",
            (key, _name(key, v), _hex(v, "code", 32, 32).hex(), _text(v, "by", MAX_NICKNAME_LENGTH),
             _time(v, "expires", ahead=INVITATION_SECONDS + LATEST_TIME_AHEAD)))


def _ban_row(key: str, v: dict) -> tuple:
    kind, target = v.get("kind"), _text(v, "target", 400)
    if kind == "account" and name_key(target) != target or kind in ("address", "network") and \
            ban_target(target) != (kind, target) or kind not in ("account", "address", "network"):
        raise ValueError(f"{target!r} is not the target of a ban of kind {kind!r:.20}")
    if key != f"{kind}:{target}":
        raise ValueError(f"filed under {key!r}, not under its target")
    return ("INSERT INTO bans VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, kind, target, _text(v, "shown", 64), _text(v, "reason", MAX_REASON_LENGTH, optional=True),
             _text(v, "by", MAX_NICKNAME_LENGTH), _time(v, "since"),
             _time(v, "expires", optional=True, ahead=MAX_BAN_SECONDS + LATEST_TIME_AHEAD)))


def _room_row(key: str, v: dict) -> tuple:
    modes = v.get("modes", [])
    if not isinstance(modes, list) or len(modes) > 16 or not all(
            isinstance(mode, str) and re.fullmatch(r"[a-z-]{1,20}", mode) for mode in modes):
        raise ValueError("'modes' is not a list of a few short lowercase words")
    # 2.0 read its rooms' name from "room" and, once it had rewritten the file, found "name": either is taken.
    name = _name(key, v, "room" if "room" in v else "name")
    return ("INSERT INTO rooms VALUES (?, ?, ?, ?)",
            (key, name, _text(v, "topic", MAX_LINE_BYTES, optional=True), " ".join(sorted(set(modes)))))


def _offline_row(key: str, v: dict) -> tuple:
    recipient, slash, number = key.partition("/")
    if not slash or not number.isdigit():
        raise ValueError(f"{key!r} is not RECIPIENT/NUMBER")
    sender = _text(v, "from", MAX_NICKNAME_LENGTH)
    return ("INSERT INTO offline (recipient, name, sender, sender_id, time, text) VALUES (?, ?, ?, ?, ?, ?)",
            (recipient, _name(key, v, "to"), sender, "account:" + _text(v, "from_key", 400),
             _time(v, "time"), clean_text(_text(v, "text", MAX_LINE_BYTES))))


VERSION_2_KINDS = {"accounts.jsonl": _account_row, "operators.jsonl": _operator_row,
                   "invitations.jsonl": _invitation_row, "bans.jsonl": _ban_row, "rooms.jsonl": _room_row,
                   "offline.jsonl": _offline_row}
VERSION_2_FILES = (*VERSION_2_KINDS, "history.jsonl")


def version_2_changes(directory: str) -> tuple[list[tuple[str, tuple]], dict[str, int]]:
    """The statements that put a 2.0 data directory's records in the database, and a count per file."""
    statements: list[tuple[str, tuple]] = []
    counts: dict[str, int] = {}
    for file_name, row in VERSION_2_KINDS.items():
        path = os.path.join(directory, file_name)
        latest: dict[str, tuple[int, dict | None]] = {}
        for number, record in _version_2_records(path):
            key = record.get("key")
            if not isinstance(key, str) or not key or len(key) > 400:
                log.warning("%s line %d: no key, or a key that is not short text; skipped", path, number)
            elif record.get("deleted") is True:
                latest[key] = (number, None)
            elif isinstance(record.get("value"), dict):
                latest[key] = (number, record["value"])
            else:
                log.warning("%s line %d: the value is not a JSON object; skipped", path, number)
        counts[file_name] = 0
        for key, (number, value) in latest.items():
            if value is None:
                continue
            try:
                statements.append(row(key, value))
                counts[file_name] += 1
            except (ValueError, KeyError) as problem:
                log.warning("%s line %d: %s; skipped", path, number, _why(problem)[:200])
    path = os.path.join(directory, "history.jsonl")
    lines: list[tuple] = []
    for number, record in _version_2_records(path):
        try:
            room = _text(record, "room", MAX_NICKNAME_LENGTH)
            if record.get("forget") is True:
                lines = [line for line in lines if line[1] != room_target(room)]
                continue
            when, said = _time(record, "time"), clean_text(_text(record, "line", MAX_LINE_BYTES))
            problem = name_problem(room, "Room name")
            event = None if problem else PYCHAT.chat_event(room, said)
            if event is None:
                raise ValueError(problem or "not a chat line")
        except ValueError as problem:
            log.warning("%s line %d: %s; skipped", path, number, _why(problem)[:200])
            continue
        lines.append((int(when * 1000), room_target(room), event.nick, None,
                      MESSAGE_KINDS.index("action" if isinstance(event, Acted) else "line"), event.text))
    number = 0
    for line in lines:
        number = max(number + 1, line[0] * 1000)      # the id of a line is its time (see SCHEMA)
        statements.append(("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)", (number, *line)))
    counts["history.jsonl"] = len(lines)
    return statements, counts


# -- the storage ----------------------------------------------------------------------------

class Storage:
    """The one owner of what lasts: every SQL statement of the server is in this class.

    Without a directory the database is in memory and lasts as long as the
    server. Bans are also held in memory (they are few, and the door asks about
    every newcomer); everything else is asked of the database when needed.
    """

    def __init__(self, directory: str | None, history_days: float = HISTORY_DAYS,
                 history_max_mb: float | None = None, operators: Iterable[str] = (), full_text: bool = True) -> None:
        self.directory = directory
        self.lock = threading.RLock()
        self.lock_fd: int | None = None
        self.history_days = history_days
        in_memory_default = HISTORY_MAX_MB if directory else HISTORY_MAX_MB_IN_MEMORY
        self.history_bytes = int((in_memory_default if history_max_mb is None else history_max_mb) * 1024 * 1024)
        self.unsaved: collections.deque[tuple] = collections.deque(maxlen=UNSAVED_LINES)
        self.batch: list[tuple] = []            # chat lines said, written by the next commit_lines()
        # Small changes no one is told were saved (when an account was last seen, rooms kept, read positions),
        # written with the next chat lines, in their transaction: by what they change, the latest of each.
        self.deferred: dict[tuple, tuple[str, tuple]] = {}
        self.unsaved_lost = 0                     # lines given up because even memory for them ran out
        self.stopped = threading.Event()
        self.maintenance: threading.Thread | None = None
        self.log_fd: int | None = None          # the write-ahead log, to fsync after a confirmed change
        if directory:
            self.path = os.path.join(directory, DATABASE_FILE)
            new = not os.path.lexists(self.path)
            self._prepare(directory)
        else:
            self.path, new = ":memory:", False
        try:
            self.db = self._open(self.path)
            if directory:
                self.log_fd = open_data_file(self.path + "-wal", os.O_RDWR | os.O_CREAT)
            self.full_text = full_text and self._search_index()
            self._check_database()
            if new:
                self._import_version_2()
            elif any(os.path.lexists(os.path.join(directory or "", name)) for name in VERSION_2_FILES):
                log.warning("%s: pyChat 2.0's files of JSON lines beside the database are left alone; they "
                            "were imported when the database was made", directory)
            self.name_operators(operators)
            # The bans and mutes, as the database holds them, also in memory: every connection and every
            # sign-in asks for them, and they change seldom (only through _keep_rule() and _lift_rule()).
            self.rules_by_key: dict[str, dict[str, Ban]] = {}
            self.networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Ban]] = []
            for table in ("bans", "mutes"):
                self._load_rules(table)
            self.newest_id = self._first_message_id() - 1
            if self._query("SELECT 1 FROM messages WHERE target >= '~' AND target < '\x7f' LIMIT 1"):
                self._forget_where("target >= '~' AND target < '\x7f'", ())     # guests' conversations
        except sqlite3.Error as problem:
            self.close()
            raise StorageError(f"{self.path}: {_why(problem)}; run --check, or restore a backup "
                               f"(README, 'The data directory')") from None
        except BaseException:
            self.close()
            raise

    def _import_version_2(self) -> None:
        """Bring a 2.0 data directory's files into the new database in one transaction, and rename them
        NAME.imported; if that fails, the directory is left as it was (the new database goes) and the
        start stops, saying why."""
        present = [name for name in VERSION_2_FILES if os.path.lexists(os.path.join(self.directory, name))]
        if not present:
            return
        renamed: list[str] = []
        try:
            statements, counts = version_2_changes(self.directory)
            self._change(*statements)
            for name in present:
                os.replace(os.path.join(self.directory, name), os.path.join(self.directory, name + ".imported"))
                renamed.append(name)
        except (StorageError, OSError) as problem:
            for name in renamed:
                with contextlib.suppress(OSError):
                    os.replace(os.path.join(self.directory, name + ".imported"), os.path.join(self.directory, name))
            self.db.close()
            self.db = None
            os.close(self.log_fd)
            self.log_fd = None
            for name in (DATABASE_FILE, DATABASE_FILE + "-wal", DATABASE_FILE + "-shm"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.directory, name))
            raise StorageError(f"cannot import pyChat 2.0's files in {self.directory} "
                               f"({getattr(problem, 'strerror', None) or problem}); "
                               f"the directory is as it was") from None
        log.info("imported pyChat 2.0's files in %s: %s; they are kept as NAME.imported", self.directory,
                 ", ".join(f"{count} from {name}" for name, count in counts.items()))

    # -- opening ------------------------------------------------------------------

    def _prepare(self, directory: str) -> None:
        """Make DIRECTORY (readable by this user only) and lock it against a second server."""
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
        # The database and SQLite's -wal and -shm files beside it: regular files of this user only.
        for name in (DATABASE_FILE, DATABASE_FILE + "-wal", DATABASE_FILE + "-shm"):
            try:
                os.close(open_data_file(os.path.join(directory, name),
                                        os.O_RDWR | (os.O_CREAT if name == DATABASE_FILE else 0)))
            except FileNotFoundError:
                pass

    @staticmethod
    def _open(path: str) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        db.execute("PRAGMA foreign_keys=OFF")
        if path != ":memory:":
            if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise sqlite3.OperationalError("the database cannot use a write-ahead log")
            # Checkpoints run on the storage's own thread, never on the switchboard's insert.
            db.execute("PRAGMA wal_autocheckpoint=0")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA trusted_schema=OFF")
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            db.executescript("BEGIN;" + SCHEMA + "".join(SCHEMA_UPGRADES.values()) +
                             "INSERT INTO meta VALUES ('schema', '%d'); COMMIT;" % SCHEMA_VERSION)
            db.execute("INSERT INTO meta VALUES ('written by', ?)", (VERSION,))
            return db
        Storage._upgrade(db, tables)
        problem = Storage._schema_problem(db)
        if problem:
            raise sqlite3.DatabaseError(problem)
        # Written only when it changes: a start writes nothing it need not, so that it can start on a full disk.
        if db.execute("SELECT value FROM meta WHERE key='written by'").fetchone() != (VERSION,):
            db.execute("INSERT OR REPLACE INTO meta VALUES ('written by', ?)", (VERSION,))
        return db

    @staticmethod
    def _upgrade(db: sqlite3.Connection, tables: set[str]) -> None:
        """Bring an older database's schema up to SCHEMA_VERSION, one upgrade to a transaction."""
        row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() if "meta" in tables else None
        if row is None or not str(row[0]).isdigit():
            return          # _schema_problem() says what is wrong
        for version in range(int(row[0]) + 1, SCHEMA_VERSION + 1):
            db.executescript("BEGIN;" + SCHEMA_UPGRADES[version] +
                             "UPDATE meta SET value='%d' WHERE key='schema'; COMMIT;" % version)
            log.info("the database's schema is now version %d", version)

    @staticmethod
    def _schema_problem(db: sqlite3.Connection) -> str | None:
        """Why DB is not a database this server can use, or None."""
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = [table for table in TABLES if table not in tables]
        if missing:
            return f"not a pyChat database, or a damaged one (no table {missing[0]})"
        row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None or not str(row[0]).isdigit():
            return "the database does not say which version of pyChat wrote it"
        if int(row[0]) > SCHEMA_VERSION:
            return (f"the database was written by a newer pyChat (schema {row[0]}; this one reads up to "
                    f"{SCHEMA_VERSION})")
        return None

    def _search_index(self) -> bool:
        """Make the full-text index if this Python's SQLite has FTS5; False if it has not."""
        try:
            self.db.execute(SEARCH_INDEX)
        except sqlite3.OperationalError:
            return False
        return True

    def _check_database(self) -> None:
        problems = [row[0] for row in self.db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("the database is damaged: " + "; ".join(map(str, problems[:5])))

    def _first_message_id(self) -> int:
        """The next message id: above every id given before, even those retention removed, and above this
        moment in microseconds, so that a database in memory never gives an id twice either."""
        newest = self.db.execute("SELECT max(id) FROM messages").fetchone()[0] or 0
        floor = self.db.execute("SELECT value FROM meta WHERE key='removed up to'").fetchone()
        floor = int(floor[0]) if floor and str(floor[0]).isdigit() else 0
        return max(int(newest), floor, int(time.time() * 1_000_000)) + 1

    # -- confirmed changes ---------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction, under the lock, after the chat lines said before it: committed at the end of
        the block, rolled back if anything in it fails (the sqlite3.Error goes on to the caller)."""
        with self.lock:
            self._commit_lines()
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise

    def _change(self, *statements: tuple[str, tuple]) -> None:
        """Run STATEMENTS as one transaction, on the disk before this returns; StorageError if it is not.

        The transaction is committed under the lock without waiting for the
        disk, and the write-ahead log that holds it is fsync'ed after, outside
        the lock: a slow disk holds up this change alone, never the chat lines,
        whose commits need the lock. (What synchronous=FULL would do, under it.)
        """
        try:
            with self._transaction() as db:
                for sql, parameters in statements:
                    db.execute(sql, parameters)
            if self.log_fd is not None:
                os.fsync(self.log_fd)
        except (sqlite3.Error, OSError) as problem:
            why = getattr(problem, "strerror", None) or _why(problem)
            log.error("%s: a change could not be saved: %s", self.path, why)
            raise StorageError(f"It could not be saved ({why}); try again later.") from None

    def _query(self, sql: str, parameters: tuple = ()) -> list[tuple]:
        with self.lock:
            self._commit_lines()        # what was said is there to be read
            try:
                return self.db.execute(sql, parameters).fetchall()
            except sqlite3.Error as problem:
                log.error("%s: %s", self.path, _why(problem))
                raise StorageError(f"The server's database cannot be read ({_why(problem)}).") from None

    def _sound_rows(self, what: str, sql: str, parameters: tuple, kinds: tuple,
                    check: Callable[..., None] | None = None) -> list[tuple]:
        """The rows SQL finds, each of KINDS (_checked_row) and passed by CHECK (a ValueError if not): a damaged
        row is logged as WHAT and left out, for nothing read is trusted."""
        found = []
        for row in self._query(sql, parameters):
            try:
                row = _checked_row(row, *kinds)
                if check is not None:
                    check(*row)
            except ValueError as problem:
                log.warning("%s: %s is damaged (%s); it is left out", self.path, what, problem)
                continue
            found.append(row)
        return found

    # -- accounts -------------------------------------------------------------------

    def _account(self, key: str) -> tuple | None:
        """The row of the account KEY, checked, or None (with a log line if the row is damaged)."""
        rows = self._query("SELECT name, salt, hash, n, r, p, since, ignoring FROM accounts WHERE key=?", (key,))
        if not rows:
            return None
        try:
            name, salt, hash_, n, r, p, since, ignoring = _checked_row(
                rows[0], str, bytes, bytes, int, int, int, (int, float), str)
            if name_key(name) != key or n < 2 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16 \
                    or len(hash_) != SCRYPT_LENGTH or not 16 <= len(salt) <= 64 or n > 2 ** 20:
                raise ValueError("its name, hash or scrypt parameters are not ones this server writes")
        except ValueError as problem:
            log.warning("%s: the account %r is damaged (%s); it is left out", self.path, key, problem)
            return None
        return name, salt, hash_, n, r, p, float(since), [k for k in ignoring.split("\n") if k][:MAX_IGNORED]

    def account_name(self, nick: str) -> str | None:
        """The registered spelling of NICK's account (any look-alike finds it), or None for a guest's name."""
        row = self._account(name_key(nick))
        return row[0] if row else None

    def account_names(self) -> list[str]:
        return sorted((name for name, in self._query("SELECT name FROM accounts")), key=str.casefold)

    @staticmethod
    def _hashed(password: str) -> tuple[bytes, bytes]:
        salt = secrets.token_bytes(SCRYPT_SALT_BYTES)
        return salt, hash_password(password, salt)

    def register(self, nick: str, password: str) -> None:
        """Reserve NICK (and its look-alikes) for whoever knows PASSWORD; StoreFull if it cannot be."""
        key = name_key(nick)
        salt, hashed = self._hashed(password)       # tens of milliseconds: outside the lock
        registered = self.account_name(nick)
        if registered is not None:
            raise StoreFull(f"{registered} is registered already.")
        if self._query("SELECT count(*) FROM accounts")[0][0] >= MAX_ACCOUNTS:
            raise StoreFull(f"the server keeps at most {MAX_ACCOUNTS} accounts")
        try:
            self._change(("INSERT INTO accounts VALUES (?, ?, ?, ?, ?, ?, ?, ?, '', ?)",
                          (key, nick, salt, hashed, SCRYPT_N, SCRYPT_R, SCRYPT_P, time.time(), time.time())))
        except StorageError:
            if self.account_name(nick) is not None:     # registered by someone else in the meantime
                raise StoreFull(f"{nick} is registered already.") from None
            raise

    def verify_password(self, nick: str, password: str) -> bool:
        """True if PASSWORD is NICK's; the comparison takes the same time wherever the hashes differ."""
        row = self._account(name_key(nick))
        if row is None:
            return False
        _, salt, hashed, n, r, p, _, _ = row
        return hmac.compare_digest(hash_password(password, salt, n, r, p), hashed)

    def _new_password(self, nick: str, password: str) -> tuple[str, tuple]:
        """The statement that gives NICK's account PASSWORD (hashed here, outside the lock)."""
        salt, hashed = self._hashed(password)
        return ("UPDATE accounts SET salt=?, hash=?, n=?, r=?, p=? WHERE key=?",
                (salt, hashed, SCRYPT_N, SCRYPT_R, SCRYPT_P, name_key(nick)))

    def set_password(self, nick: str, password: str) -> None:
        self._change(self._new_password(nick, password))

    def reset_password(self, nick: str, password: str) -> None:
        """Give NICK's account PASSWORD, and let its password reset code go, in one transaction."""
        self._change(self._new_password(nick, password),
                     ("DELETE FROM invitations WHERE key=? AND purpose='password'", (name_key(nick),)))

    def saw(self, nick: str) -> None:
        """Note that the owner of the account NICK signed in or out now. Written with the next chat lines, in
        their transaction and without waiting for the disk: signing in and out costs no transaction of its own."""
        key = name_key(nick)
        self._defer(("seen", key), "UPDATE accounts SET last_seen=? WHERE key=?", (time.time(), key))

    def _defer(self, what: tuple, sql: str, parameters: tuple) -> None:
        """Run SQL with the next chat lines (see self.deferred), in place of what was deferred for WHAT."""
        with self.lock:
            self.deferred.pop(what, None)       # the newest goes last, after any other it depends on
            self.deferred[what] = (sql, parameters)

    def accounts(self) -> list[AccountRecord]:
        """Every account: its name, when it was registered and last seen; sorted by name."""
        rows = self._sound_rows("an account", "SELECT name, since, last_seen FROM accounts", (),
                                (str, (int, float), (int, float, type(None))))
        found = [AccountRecord(name, float(since), None if seen is None else float(seen))
                 for name, since, seen in rows]
        return sorted(found, key=lambda account: account.name.casefold())

    def ignoring(self, nick: str) -> list[str]:
        """The name keys NICK's owner ignores (kept from their last /ignore), [] for a guest's name."""
        row = self._account(name_key(nick))
        return row[7] if row else []

    def set_ignoring(self, nick: str, keys: Iterable[str]) -> None:
        kept = [key for key in sorted(keys) if key and "\n" not in key][:MAX_IGNORED]
        self._change(("UPDATE accounts SET ignoring=? WHERE key=?", ("\n".join(kept), name_key(nick))))

    def remove_account(self, nick: str) -> None:
        """Forget NICK's account, and with it its operator's rights, its invitation, what was left for it, its
        kept rooms and read positions, and its private conversations: whoever registers the name next is
        someone else, and may read none of it (a conversation is known by its two accounts' keys)."""
        key = name_key(nick)
        with self.lock:
            for target, in self._query("SELECT DISTINCT target FROM messages WHERE target >= '@' AND target < 'A'"):
                if key in target[1:].split("\n"):
                    self._forget_where("target=?", (target,))
        self._change(("DELETE FROM accounts WHERE key=?", (key,)), ("DELETE FROM operators WHERE key=?", (key,)),
                     ("DELETE FROM invitations WHERE key=?", (key,)), ("DELETE FROM offline WHERE recipient=?", (key,)),
                     ("DELETE FROM kept_rooms WHERE account=?", (key,)),
                     ("DELETE FROM read_positions WHERE account=?", (key,)))

    # -- operators ------------------------------------------------------------------

    def name_operators(self, names: Iterable[str]) -> None:
        """The --operator list is now NAMES (at the start, and at a reload of the configuration).

        One rule for --operator: a name is an operator's while it is named, and one dropped from the list
        loses what the list gave it (an operator made with /oper add stays one until /oper remove).
        """
        with self.lock:
            self.named_operators = {name_key(name): name for name in names}
            for key, in self._query("SELECT key FROM operators WHERE by='--operator'"):
                if key not in self.named_operators:
                    self._change(("DELETE FROM operators WHERE key=?", (key,)))
            for key, name in self.named_operators.items():
                if not self._query("SELECT 1 FROM operators WHERE key=?", (key,)):
                    self._change(("INSERT INTO operators VALUES (?, ?, '--operator', ?)", (key, name, time.time())))

    def unclaimed_operators(self) -> list[str]:
        """The names --operator gives that have no account yet."""
        return [name for name in self.named_operators.values() if self.account_name(name) is None]

    def is_operator(self, nick: str) -> bool:
        return bool(self._query("SELECT 1 FROM operators WHERE key=?", (name_key(nick),)))

    def operator_names(self) -> list[str]:
        return sorted((name for name, in self._query("SELECT name FROM operators")), key=str.casefold)

    def add_operator(self, nick: str, by: str) -> None:
        if self._query("SELECT count(*) FROM operators WHERE by != '--operator'")[0][0] >= MAX_OPERATORS:
            raise StoreFull(f"There are {MAX_OPERATORS} operators already.")
        self._change(("INSERT OR REPLACE INTO operators VALUES (?, ?, ?, ?)", (name_key(nick), nick, by, time.time())))

    def remove_operator(self, nick: str) -> None:
        self._change(("DELETE FROM operators WHERE key=?", (name_key(nick),)))

    # -- invitations ------------------------------------------------------------------

    def invite(self, nick: str, by: str, purpose: str = "account") -> str:
        """A new code for NICK, replacing any earlier one; it works once, within INVITATION_SECONDS. PURPOSE (see
        SCHEMA): "account" to make the account NICK, "password" to choose a new password for it."""
        if self._query("SELECT count(*) FROM invitations WHERE expires > ?", (time.time(),))[0][0] >= MAX_INVITATIONS:
            raise StoreFull(f"There are {MAX_INVITATIONS} invitations waiting already.")
        code = "-".join(secrets.token_hex(3) for _ in range(3))
        self._change(("DELETE FROM invitations WHERE expires <= ?", (time.time(),)),
                     ("INSERT OR REPLACE INTO invitations VALUES (?, ?, ?, ?, ?, ?)",
                      (name_key(nick), nick, hashlib.sha256(code.encode()).hexdigest(), by,
                       time.time() + INVITATION_SECONDS, purpose)))
        return code

    def _invitation_code(self, nick: str, purpose: str) -> str | None:
        rows = self._query("SELECT code, expires FROM invitations WHERE key=? AND purpose=?", (name_key(nick), purpose))
        if not rows or not isinstance(rows[0][0], str) or not isinstance(rows[0][1], (int, float)):
            return None
        return rows[0][0] if rows[0][1] > time.time() else None

    def invitation_waiting(self, nick: str, purpose: str = "account") -> bool:
        return self._invitation_code(nick, purpose) is not None

    def invitation_matches(self, nick: str, code: str, purpose: str = "account") -> bool:
        """True if CODE is NICK's invitation for PURPOSE; it works until it is used (remove_invitation(),
        reset_password()), for INVITATION_SECONDS at most."""
        kept = self._invitation_code(nick, purpose)
        given = hashlib.sha256(code.strip().lower().encode("utf-8", "replace")).hexdigest()
        return kept is not None and hmac.compare_digest(given, kept)

    def remove_invitation(self, nick: str) -> str | None:
        """Let NICK's invitation go; its purpose, or None if there was none."""
        rows = self._query("SELECT purpose FROM invitations WHERE key=?", (name_key(nick),))
        if rows:
            self._change(("DELETE FROM invitations WHERE key=?", (name_key(nick),)))
        return str(rows[0][0]) if rows else None

    def invitations(self, now: float) -> list[WaitingInvitation]:
        """Every invitation that still works, soonest to end first (without its code, which is not kept)."""
        def check(name: str, purpose: str, by: str, expires: float) -> None:
            if purpose not in INVITATION_PURPOSES:
                raise ValueError(f"{purpose!r:.20} is not the purpose of an invitation")

        rows = self._sound_rows("an invitation", "SELECT name, purpose, by, expires FROM invitations "
                                "WHERE expires > ? ORDER BY expires", (now,), (str, str, str, (int, float)), check)
        return [WaitingInvitation(name, purpose, by, float(expires)) for name, purpose, by, expires in rows]

    # -- bans and mutes ---------------------------------------------------------------
    # Two tables of one shape (Ban). Bans are also held in memory: the door asks about every newcomer.

    def _rules(self, table: str, where: str = "", parameters: tuple = ()) -> list[Ban]:
        """The bans or mutes (TABLE) kept, WHERE asks, checked; a damaged one is logged and left out."""
        def check(key: str, kind: str, target: str, *_: Any) -> None:
            if kind == "account" and name_key(target) != target:
                raise ValueError(f"{target!r} is not an account's key")
            if kind in ("address", "network") and ban_target(target) != (kind, target):
                raise ValueError(f"{target!r} is not an {kind}")
            if kind not in ("account", "address", "network") or key != f"{kind}:{target}":
                raise ValueError(f"{key!r} is not a {table[:-1]} this server writes")

        rows = self._sound_rows(f"a {table[:-1]}", f"SELECT key, kind, target, shown, reason, by, since, expires "
                                f"FROM {table} {where}", parameters,
                                (str, str, str, str, (str, type(None)), str, (int, float), (int, float, type(None))),
                                check)
        return [Ban(kind, target, shown, reason, by, float(since), None if expires is None else float(expires))
                for _, kind, target, shown, reason, by, since, expires in rows]

    def _load_rules(self, table: str) -> None:
        rules = self._rules(table)
        self.rules_by_key[table] = {rule.key: rule for rule in rules}
        if table == "bans":
            self.networks = [(ipaddress.ip_network(ban.target), ban) for ban in rules if ban.kind == "network"]

    def _keep_rule(self, table: str, rule: Ban, most: int) -> None:
        """Keep RULE in TABLE (replacing one of the same target), on the disk before this returns."""
        with self.lock:     # the count and the insert at once
            if not self._query(f"SELECT 1 FROM {table} WHERE key=?", (rule.key,)) and \
                    self._query(f"SELECT count(*) FROM {table}")[0][0] >= most:
                raise StoreFull(f"the server keeps at most {most} {table}")
            self._change((f"INSERT OR REPLACE INTO {table} VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (rule.key, *rule)))
            self._load_rules(table)

    def _lift_rule(self, table: str, key: str) -> Ban | None:
        """Lift the ban or mute KEY; the one lifted, or None if there was none."""
        with self.lock:
            found = self._rules(table, "WHERE key=?", (key,))
            if found:
                self._change((f"DELETE FROM {table} WHERE key=?", (key,)))
                self._load_rules(table)
        return found[0] if found else None

    def _rules_in_force(self, table: str, now: float) -> list[Ban]:
        """Every ban or mute still in force, soonest to end first; those that ended are dropped."""
        rules = self._rules(table)
        if any(not rule.active(now) for rule in rules):
            with contextlib.suppress(StorageError):
                self._change((f"DELETE FROM {table} WHERE expires IS NOT NULL AND expires <= ?", (now,)))
                with self.lock:
                    self._load_rules(table)
        return sorted((rule for rule in rules if rule.active(now)),
                      key=lambda rule: (rule.expires is None, rule.expires or 0, rule.shown))

    def ban(self, ban: Ban) -> None:
        self._keep_rule("bans", ban, MAX_BANS)

    def lift_ban(self, key: str) -> Ban | None:
        return self._lift_rule("bans", key)

    def bans(self, now: float) -> list[Ban]:
        return self._rules_in_force("bans", now)

    def ban_for_address(self, address: str, now: float) -> Ban | None:
        """The ban that keeps ADDRESS out, if one does; quick, for the accepting thread."""
        ip = ip_of(address)
        if ip is None:
            return None
        found = self.rules_by_key["bans"].get(f"address:{ip}")
        if found is None or not found.active(now):
            found = next((ban for network, ban in self.networks
                          if ip.version == network.version and ip in network and ban.active(now)), None)
        return found

    def ban_for_account(self, nick: str, now: float) -> Ban | None:
        found = self.rules_by_key["bans"].get(f"account:{name_key(nick)}")
        return found if found is not None and found.active(now) else None

    def mute(self, mute: Ban) -> None:
        self._keep_rule("mutes", mute, MAX_MUTES)

    def lift_mute(self, key: str) -> Ban | None:
        return self._lift_rule("mutes", key)

    def mutes(self, now: float) -> list[Ban]:
        return self._rules_in_force("mutes", now)

    def mute_for(self, account: str | None, address: str, now: float) -> Ban | None:
        """The mute in force for the account ACCOUNT (None: a guest) or the ADDRESS, the longer if both are;
        two lookups in memory, quick enough under the server's lock."""
        mutes = self.rules_by_key["mutes"]
        if not mutes:
            return None
        keys = (f"address:{ip_of(address) or address}", f"account:{name_key(account)}" if account else "")
        found = [mute for mute in map(mutes.get, keys) if mute is not None and mute.active(now)]
        return max(found, key=lambda mute: math.inf if mute.expires is None else mute.expires, default=None)

    # -- rooms and offline messages ---------------------------------------------------

    def room_settings(self, room: str) -> SavedRoom | None:
        """The settings saved for ROOM, or None if there are none."""
        rows = self._query("SELECT name, topic, modes FROM rooms WHERE key=?", (name_key(room),))
        if not rows:
            return None
        try:
            _, topic, modes = _checked_row(rows[0], str, (str, type(None)), str)
        except ValueError as problem:
            log.warning("%s: the settings of #%s are damaged (%s); they are left out", self.path, room, problem)
            return None
        return SavedRoom(None if topic is None else clean_text(topic)[:MAX_LINE_BYTES],
                         tuple(mode for mode in modes.split() if re.fullmatch(r"[a-z0-9-]{1,20}", mode)))

    def room_masks(self, room: str) -> list[tuple[str, RoomMask]]:
        """The masks kept in ROOM's lists: (the list's name, the mask), the oldest first."""
        rows = self._sound_rows(f"a mask of #{room}", "SELECT list, mask, by, since FROM room_masks WHERE room=? "
                                "ORDER BY since", (name_key(room),), (str, str, str, (int, float)))
        return [(list_name, RoomMask(clean_text(mask)[:MAX_LINE_BYTES], by, since))
                for list_name, mask, by, since in rows]

    def save_room_settings(self, room: str, topic: str | None, modes: Iterable[str] = (),
                           masks: Iterable[tuple[str, RoomMask]] = ()) -> None:
        """Keep ROOM's topic, modes and the MASKS of its lists (the list's name, the mask) across restarts;
        nothing set means nothing kept."""
        modes, masks = sorted(set(modes)), list(masks)
        key = name_key(room)
        masks_kept = [("DELETE FROM room_masks WHERE room=?", (key,)),
                      *(("INSERT OR REPLACE INTO room_masks VALUES (?, ?, ?, ?, ?)",
                         (key, list_name, mask.mask, mask.by, mask.when)) for list_name, mask in masks)]
        if topic is None and not modes and not masks:
            self._change(("DELETE FROM rooms WHERE key=?", (key,)), *masks_kept)
            return
        if not self._query("SELECT 1 FROM rooms WHERE key=?", (key,)) and \
                self._query("SELECT count(*) FROM rooms")[0][0] >= MAX_ROOM_SETTINGS:
            raise StoreFull(f"the server keeps the settings of at most {MAX_ROOM_SETTINGS} rooms")
        self._change(("INSERT OR REPLACE INTO rooms VALUES (?, ?, ?, ?)", (key, room, topic, " ".join(modes))),
                     *masks_kept)

    # -- what an account is in, and what it has read ------------------------------------

    def kept_rooms(self, account: str) -> list[KeptRoom]:
        """The rooms ACCOUNT's owner is in, the one used last at the end."""
        rows = self._sound_rows(f"a kept room of {account}", "SELECT name, password FROM kept_rooms WHERE account=? "
                                "ORDER BY used, name", (name_key(account),), (str, (str, type(None))))
        found = [KeptRoom(name, password) for name, password in rows if not name_problem(name, "Room name")]
        return found[-MAX_KEPT_ROOMS:]

    def keep_room(self, account: str, room: str, password: str | None) -> None:
        """Keep ROOM among ACCOUNT's rooms (with the key that let its owner in), as the one used last."""
        key = name_key(account)
        self._defer(("room", key, name_key(room)), "INSERT OR REPLACE INTO kept_rooms VALUES (?, ?, ?, ?, ?)",
                    (key, name_key(room), room, password, time.time()))

    def drop_room(self, account: str, room: str) -> None:
        """ACCOUNT's owner left ROOM, on every device."""
        key = name_key(account)
        self._defer(("room", key, name_key(room)), "DELETE FROM kept_rooms WHERE account=? AND room=?",
                    (key, name_key(room)))

    def read_positions(self, account: str) -> dict[str, int]:
        """ACCOUNT's read positions: message target -> the id of the last line read there."""
        rows = self._query("SELECT target, id FROM read_positions WHERE account=?", (name_key(account),))
        return {target: number for target, number in rows if isinstance(target, str) and isinstance(number, int)}

    def mark_read(self, account: str, target: str, message_id: int, only_if_new: bool = False) -> None:
        """ACCOUNT's owner has read TARGET up to MESSAGE_ID: the position moves forward, never back.
        ONLY_IF_NEW writes it only where there is none yet (a conversation's first line)."""
        key = name_key(account)
        what = ("read-start" if only_if_new else "read", key, target)
        with self.lock:
            waiting = self.deferred.get(what)
            if waiting is not None:     # not yet written: the first start, the furthest position
                message_id = waiting[1][2] if only_if_new else max(message_id, waiting[1][2])
            if only_if_new:
                self._defer(what, "INSERT OR IGNORE INTO read_positions VALUES (?, ?, ?)", (key, target, message_id))
            else:
                self._defer(what, "INSERT INTO read_positions VALUES (?, ?, ?) ON CONFLICT (account, target) "
                            "DO UPDATE SET id=max(id, excluded.id)", (key, target, message_id))

    def latest_ids(self, targets: Iterable[str]) -> dict[str, int]:
        """The id of the latest line of each of TARGETS that has lines: a look-up in the index each."""
        latest = {}
        for target in targets:
            last = self._query("SELECT max(id) FROM messages WHERE target=?", (target,))[0][0]
            if isinstance(last, int):
                latest[target] = last
        return latest

    def guest_conversations(self, identity: str) -> list[str]:
        """The private conversations with a guest that IDENTITY is one of the two of (their lines last only
        while the guest is here, so there are few)."""
        rows = self._query("SELECT DISTINCT target FROM messages WHERE target >= '~' AND target < '\x7f' "
                           "AND instr(char(10) || substr(target, 2) || char(10), ?) > 0", (f"\n{identity}\n",))
        return [row[0] for row in rows if isinstance(row[0], str)]

    def count_after(self, target: str, after: int) -> int:
        """How many lines of TARGET came after the id AFTER."""
        return self._query("SELECT count(*) FROM messages WHERE target=? AND id>?", (target, after))[0][0]

    def leave_offline(self, sender: str, sender_id: str, recipient: str, text: str) -> None:
        """Keep TEXT from SENDER (counted by SENDER_ID: their account or address, never their nickname, which
        they could change) for the account RECIPIENT; StoreFull, saying which limit, if it cannot be kept."""
        key = name_key(recipient)
        with self.lock:     # the counts and the insert at once, so that no one slips past a limit
            if self._query("SELECT count(*) FROM offline WHERE recipient=?", (key,))[0][0] >= MAX_OFFLINE_PER_RECIPIENT:
                raise StoreFull(f"{recipient} has {MAX_OFFLINE_PER_RECIPIENT} messages waiting already; "
                                "no more can be kept.")
            if self._query("SELECT count(*) FROM offline WHERE sender_id=?", (sender_id,))[0][0] >= MAX_OFFLINE_PER_SENDER:
                raise StoreFull(f"You have {MAX_OFFLINE_PER_SENDER} messages waiting for people already; "
                                "no more can be kept until they are read.")
            if self._query("SELECT count(*) FROM offline")[0][0] >= MAX_OFFLINE_TOTAL:
                raise StoreFull("The server holds as many offline messages as it can; try later.")
            self._change(("INSERT INTO offline (recipient, name, sender, sender_id, time, text) VALUES (?, ?, ?, ?, ?, ?)",
                          (key, recipient, sender, sender_id, time.time(), text)))

    def offline_waiting(self, recipient: str) -> list[OfflineMessage]:
        """Every message kept for RECIPIENT, oldest first; they stay kept until remove_offline()."""
        rows = self._sound_rows("an offline message", "SELECT id, sender, time, text FROM offline WHERE recipient=? "
                                "ORDER BY id", (name_key(recipient),), (int, str, (int, float), str))
        return [OfflineMessage(sender, name_key(sender), float(when), clean_text(text), number)
                for number, sender, when, text in rows]

    def remove_offline(self, messages: Iterable[OfflineMessage]) -> None:
        numbers = [message.number for message in messages]
        if numbers:
            self._change(*(("DELETE FROM offline WHERE id=?", (number,)) for number in numbers))

    # -- chat lines -------------------------------------------------------------------

    @property
    def keeps_history(self) -> bool:
        return self.history_days > 0

    def next_message_id(self) -> int:
        """A new message id (see SCHEMA): never given before by this database, larger than every one before."""
        with self.lock:
            self.newest_id = number = max(self.newest_id + 1, int(time.time() * 1_000_000))
        return number

    def add_message(self, message_id: int, when: float, target: str, nick: str, account: str | None, kind: str,
                    text: str) -> None:
        """Keep a chat line just said, before anyone is sent it. A line that cannot be written now is kept
        for another try (maintain()), never given up at the first failure."""
        if not self.keeps_history:
            return
        row = (message_id, int(when * 1000), target, nick, account, MESSAGE_KINDS.index(kind), text)
        with self.lock:
            (self._keep_unsaved if self.unsaved else self.batch.append)(row)

    def commit_lines(self) -> None:
        """Write the chat lines said since the last time, in one transaction: called before anyone is sent
        them, once for all the lines of a pass of the switchboard, so that a busy room does not cost a
        transaction a line."""
        if self.batch or self.deferred:
            with self.lock:
                self._commit_lines()

    def _commit_lines(self) -> None:
        """commit_lines(), lock held; every other use of the database begins with it."""
        if not self.batch and not self.deferred:
            return
        rows, self.batch = self.batch, []
        deferred, self.deferred = self.deferred, {}
        try:
            with self._transaction() as db:
                db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                for sql, parameters in deferred.values():
                    db.execute(sql, parameters)
        except sqlite3.Error as problem:
            for what, change in deferred.items():      # tried again with the next lines
                self.deferred.setdefault(what, change)
            if rows:        # kept for another try (maintain())
                log.error("%s: chat lines cannot be written (%s); they are kept in memory and tried again "
                          "every %g s", self.path, _why(problem), MAINTENANCE_SECONDS)
                for row in rows:
                    self._keep_unsaved(row)

    def add_messages(self, messages: Iterable[StoredMessage]) -> None:
        """Keep many lines at once, in one transaction (lines said elsewhere and brought in, a generated
        history for the benchmark); StorageError if they cannot be."""
        self._change(*(("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (m.id, int(m.when * 1000), m.target, m.nick, m.account, MESSAGE_KINDS.index(m.kind), m.text))
                       for m in messages))

    def _keep_unsaved(self, row: tuple) -> None:
        if len(self.unsaved) == self.unsaved.maxlen:
            self.unsaved_lost += 1
        self.unsaved.append(row)

    def _save_unsaved(self) -> None:
        """Try again to write the lines that could not be written. Lock held."""
        if not self.unsaved:
            return
        rows = list(self.unsaved)
        try:
            with self._transaction() as db:
                db.executemany("INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.Error:
            return
        self.unsaved.clear()
        log.warning("%s: %d chat line(s) written after all%s", self.path, len(rows),
                    f"; {self.unsaved_lost} more could not be kept" if self.unsaved_lost else "")
        self.unsaved_lost = 0

    def forget_target(self, target: str) -> None:
        """Forget every line of TARGET: a guest's private conversation, once the guest has left."""
        with self.lock:
            self._forget_where("target=?", (target,))
            self.unsaved = collections.deque((row for row in self.unsaved if row[2] != target), UNSAVED_LINES)

    def _forget_where(self, where: str, parameters: tuple) -> None:
        try:
            with self._transaction() as db:
                rows = db.execute(f"SELECT id, text FROM messages WHERE {where}", parameters).fetchall()
                self._drop_from_search_index(rows)
                db.execute(f"DELETE FROM messages WHERE {where}", parameters)
                self._removed_up_to(max((row[0] for row in rows), default=0))
        except sqlite3.Error as problem:
            log.error("%s: could not forget a conversation: %s", self.path, _why(problem))

    def _messages(self, where: str, parameters: tuple, newest_first: bool, limit: int) -> list[StoredMessage]:
        rows = self._query(f"SELECT id, time, target, nick, account, kind, text FROM messages WHERE {where} "
                           f"ORDER BY id {'DESC' if newest_first else 'ASC'} LIMIT ?",
                           (*parameters, max(0, limit)))
        found = []
        for row in rows:
            try:
                number, when, target, nick, account, kind, text = _checked_row(
                    row, int, int, str, str, (str, type(None)), int, str)
                found.append(StoredMessage(number, when / 1000, target, nick, account, MESSAGE_KINDS[kind], text))
            except (ValueError, IndexError) as problem:
                log.warning("%s: a chat line is damaged (%s); it is left out", self.path, problem)
        return found[::-1] if newest_first else found

    def latest_messages(self, target: str, limit: int, after: int = 0) -> list[StoredMessage]:
        """The last LIMIT lines of TARGET (of those after the id AFTER), oldest first."""
        return self._messages("target=? AND id>?", (target, after), True, limit)

    def messages_before(self, target: str, before: int, limit: int) -> list[StoredMessage]:
        """The LIMIT lines of TARGET just before the id BEFORE, oldest first."""
        return self._messages("target=? AND id<?", (target, before), True, limit)

    def messages_after(self, target: str, after: int, limit: int) -> list[StoredMessage]:
        """The LIMIT lines of TARGET just after the id AFTER, oldest first."""
        return self._messages("target=? AND id>?", (target, after), False, limit)

    def messages_between(self, target: str, start: int, end: int, limit: int) -> list[StoredMessage]:
        """Up to LIMIT lines of TARGET with ids strictly between START and END, from START's side, oldest first."""
        if start <= end:
            return self._messages("target=? AND id>? AND id<?", (target, start, end), False, limit)
        return self._messages("target=? AND id<? AND id>?", (target, start, end), True, limit)

    def messages_around(self, target: str, around: int, limit: int) -> list[StoredMessage]:
        """About LIMIT lines of TARGET centred on the id AROUND (itself included), oldest first."""
        before = self._messages("target=? AND id<?", (target, around), True, limit // 2)
        return before + self._messages("target=? AND id>=?", (target, around), False, limit - len(before))

    @staticmethod
    def message_id_at(when: float) -> int:
        """The id of a line said at WHEN (a time.time()): ranges by time are ranges by id."""
        return int(when * 1_000_000)

    def targets_since(self, when: float, limit: int) -> list[tuple[str, float]]:
        """The targets with lines said since WHEN, each with the time of its latest line, newest first."""
        rows = self._query("SELECT target, max(id) FROM messages WHERE id >= ? GROUP BY target "
                           "ORDER BY max(id) DESC LIMIT ?", (self.message_id_at(when), limit))
        return [(target, last / 1_000_000) for target, last in rows
                if isinstance(target, str) and isinstance(last, int)]

    def search(self, words: str, identity: str, limit: int = SEARCH_RESULTS,
               target: str | None = None) -> list[StoredMessage]:
        """The newest lines, up to LIMIT, that hold every word of WORDS and that IDENTITY may read (in TARGET
        alone if given), newest last. With FTS5 the whole history is searched; without, the newest
        SEARCH_SCAN_LINES lines."""
        # Words as the index cuts them: "e-mail" and "parse_config" are two words each. A term the index
        # would cut in two is a phrase, which an index without positions cannot look for.
        terms = re.findall(r"[^\W_]+", words)[:16]
        if not terms:
            return []
        found: list[StoredMessage] = []
        readable = (lambda m: may_read(m.target, identity) and (target is None or m.target == target))
        with self.lock:
            self._index_for_search(None)       # the newest lines too
        if self.full_text:
            query = " ".join('"' + term.replace('"', '""') + '"' for term in terms)
            rows = self._query("SELECT rowid FROM messages_text WHERE messages_text MATCH ? ORDER BY rowid DESC "
                               "LIMIT ?", (query, SEARCH_SCAN_LINES))
            for start in range(0, len(rows), 500):
                numbers = [row[0] for row in rows[start:start + 500]]
                batch = self._messages(f"id IN ({','.join('?' * len(numbers))})", tuple(numbers), True, len(numbers))
                found.extend(m for m in reversed(batch) if readable(m))
                if len(found) >= limit:
                    break
        else:
            lowered = [term.casefold() for term in terms]
            below = self.newest_id + 1
            for _ in range(SEARCH_SCAN_LINES // SEARCH_PAGE):
                batch = self._messages("id<?", (below,), True, SEARCH_PAGE)
                found.extend(m for m in reversed(batch)
                             if readable(m) and all(term in m.text.casefold() for term in lowered))
                if len(batch) < SEARCH_PAGE or len(found) >= limit:
                    break
                below = batch[0].id
        return found[:limit][::-1]

    # -- the storage's own thread: retention, the search index, checkpoints ------------

    def start_maintenance(self) -> None:
        self.maintenance = threading.Thread(target=self._maintain_until_stopped, name="storage", daemon=True)
        self.maintenance.start()

    def _maintain_until_stopped(self) -> None:
        while not self.stopped.wait(MAINTENANCE_SECONDS):
            try:
                self.maintain()
            except Exception:       # never the end of the storage's thread
                log.exception("%s: maintenance failed", self.path)

    def maintain(self, now: float | None = None) -> None:
        """One round of slow work, in batches that each hold the lock briefly."""
        with self.lock:
            self._save_unsaved()
        while self.full_text:
            with self.lock:
                if not self._index_for_search(SEARCH_INDEX_BATCH):
                    break
        self._remove_old_lines(time.time() if now is None else now)
        if self.path != ":memory:":
            try:
                checkpoint = sqlite3.connect(self.path, timeout=0.1)
                try:
                    checkpoint.execute("PRAGMA wal_checkpoint(PASSIVE)")
                finally:
                    checkpoint.close()
            except sqlite3.Error as problem:
                log.debug("%s: checkpoint: %s", self.path, _why(problem))

    def _remove_old_lines(self, now: float) -> None:
        """Remove the lines past --history-days, then, if the database is larger than --history-max-mb, as many
        of the oldest as the excess is worth: in batches that each hold the lock briefly."""
        too_old = self.message_id_at(now - self.history_days * 86400)
        removed = batch = self._remove_lines("id < ?", (too_old,), RETENTION_BATCH)
        while batch == RETENTION_BATCH:
            batch = self._remove_lines("id < ?", (too_old,), RETENTION_BATCH)
            removed += batch
        while True:
            # The search index gives the room of removed lines back only as its segments merge: the size is
            # measured again only once they have, or it would not show what was freed.
            while removed and self._merge_search_index():
                pass
            excess = self._lines_over_size()
            removed = batch = 0
            while removed < excess:
                batch = self._remove_lines("1", (), min(excess - removed, RETENTION_BATCH))
                if not batch:
                    break
                removed += batch
            if not removed:
                return

    def _removed_up_to(self, message_id: int) -> None:
        """Remember that lines up to MESSAGE_ID were removed, so that no id up to it is ever given again, even
        after a restart with the clock behind. In a transaction."""
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('removed up to', max(?, coalesce((SELECT "
                        "CAST(value AS INTEGER) FROM meta WHERE key='removed up to'), 0)))", (message_id,))

    def _lines_over_size(self) -> int:
        """How many lines past --history-max-mb the database holds, at the average size of a line so far."""
        with self.lock:
            try:
                size = self._size()
                if size <= self.history_bytes:
                    return 0
                count = self.db.execute("SELECT count(*) FROM messages").fetchone()[0]
            except sqlite3.Error as problem:
                log.error("%s: old lines could not be removed: %s", self.path, _why(problem))
                return 0
        return math.ceil((size - self.history_bytes) / (size / count)) if count else 0

    def _remove_lines(self, where: str, parameters: tuple, most: int) -> int:
        """Remove the oldest lines, up to MOST, of those WHERE says; how many were removed."""
        with self.lock:
            self._commit_lines()
            try:
                rows = self.db.execute(f"SELECT id, text FROM messages WHERE {where} ORDER BY id LIMIT ?",
                                       (*parameters, most)).fetchall()
                if not rows:
                    return 0
                with self._transaction() as db:
                    self._drop_from_search_index(rows)
                    db.executemany("DELETE FROM messages WHERE id=?", ((row[0],) for row in rows))
                    self._removed_up_to(rows[-1][0])
            except sqlite3.Error as problem:
                log.error("%s: old lines could not be removed: %s", self.path, _why(problem))
                return 0
        return len(rows)

    def _size(self) -> int:
        """Bytes of the database in use. Lock held."""
        pages = self.db.execute("PRAGMA page_count").fetchone()[0] - self.db.execute("PRAGMA freelist_count").fetchone()[0]
        return pages * self.db.execute("PRAGMA page_size").fetchone()[0]

    def _indexed_up_to(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key='searchable up to'").fetchone()
        return int(row[0]) if row and str(row[0]).isdigit() else 0

    def _index_for_search(self, batch: int | None) -> bool:
        """Add up to BATCH lines (None: all) not yet in the search index; True if some were. Lock held."""
        if not self.full_text:
            return False
        self._commit_lines()
        try:
            done = self._indexed_up_to()
            rows = self.db.execute("SELECT id, text FROM messages WHERE id > ? ORDER BY id LIMIT ?",
                                   (done, -1 if batch is None else batch)).fetchall()
            if not rows:
                return False
            with self._transaction() as db:
                db.executemany("INSERT INTO messages_text (rowid, text) VALUES (?, ?)", rows)
                db.execute("INSERT OR REPLACE INTO meta VALUES ('searchable up to', ?)", (str(rows[-1][0]),))
        except sqlite3.Error as problem:
            log.error("%s: the search index could not be brought up to date: %s", self.path, _why(problem))
            return False
        return True

    def _drop_from_search_index(self, rows: list[tuple[int, str]]) -> None:
        """Take lines about to be removed out of the search index. Lock held."""
        if not self.full_text:
            return
        done = self._indexed_up_to()
        self.db.executemany("INSERT INTO messages_text (messages_text, rowid, text) VALUES ('delete', ?, ?)",
                            [row for row in rows if row[0] <= done])

    def _merge_search_index(self) -> bool:
        """Merge a bounded part of the search index's segments; True if there may be more to merge. A removed
        line is only marked as gone in the index: merging gives its room back, without which retention by
        size would find the database as large after each round, and go on removing lines."""
        if not self.full_text:
            return False
        with self.lock:
            before = self.db.total_changes
            try:
                with self._transaction() as db:
                    db.execute("INSERT INTO messages_text (messages_text, rank) VALUES ('merge', ?)",
                               (-SEARCH_MERGE_PAGES,))
            except sqlite3.Error as problem:
                log.error("%s: the search index could not be merged: %s", self.path, _why(problem))
                return False
            return self.db.total_changes - before > 1

    # -- operations ---------------------------------------------------------------------

    @staticmethod
    def back_up(directory: str, path: str) -> None:
        """Copy the database in DIRECTORY to PATH (a new file), consistently, even while a server writes to it."""
        if os.path.lexists(path):
            raise StorageError(f"{path} exists already; give the name of a new file")
        source_path = os.path.join(directory, DATABASE_FILE)
        if not os.path.isfile(source_path):
            raise StorageError(f"{directory} holds no database ({DATABASE_FILE})")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600))
            source, copy = sqlite3.connect(source_path, timeout=10.0), sqlite3.connect(path)
            try:
                # In one step, on one snapshot: the server's writes go on meanwhile (a write-ahead log), while a
                # copy in steps starts again whenever the server writes between two, and a busy one always does.
                source.backup(copy)
                copy.execute("PRAGMA journal_mode=DELETE")
            finally:
                source.close()
                copy.close()
        except (OSError, sqlite3.Error) as problem:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise StorageError(f"cannot back up to {path}: {getattr(problem, 'strerror', None) or _why(problem)}") \
                from None

    @classmethod
    def problems(cls, directory: str) -> list[str]:
        """Everything wrong with the database in DIRECTORY: what integrity_check finds, and rows whose values
        are not of the kinds this server writes. Read only: it can run beside a server."""
        path = os.path.join(directory, DATABASE_FILE)
        if not os.path.isfile(path):
            return [f"{directory} holds no database ({DATABASE_FILE})"]
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
            try:
                found = [str(row[0]) for row in db.execute("PRAGMA integrity_check")]
                found = [] if found == ["ok"] else found
                found += [problem for problem in [cls._schema_problem(db)] if problem and not found]
                if not found:
                    for table, wrong in cls.WRONG_KINDS.items():
                        count = db.execute(f"SELECT count(*) FROM {table} WHERE {wrong}").fetchone()[0]
                        if count:
                            found.append(f"{count} row(s) of {table} hold values of the wrong kinds")
            finally:
                db.close()
        except sqlite3.Error as problem:
            found = [_why(problem)]
        return found

    # What no row of a table written by this server holds.
    WRONG_KINDS = {
        "accounts": "typeof(name)!='text' OR typeof(salt)!='blob' OR typeof(hash)!='blob' OR typeof(n)!='integer' "
                    "OR typeof(r)!='integer' OR typeof(p)!='integer' OR typeof(ignoring)!='text' OR n < 2 "
                    "OR (n & (n - 1)) != 0 OR r NOT BETWEEN 1 AND 32 OR p NOT BETWEEN 1 AND 16 "
                    "OR typeof(since) NOT IN ('integer', 'real') OR typeof(last_seen) NOT IN ('integer', 'real', 'null')",
        "operators": "typeof(name)!='text' OR typeof(by)!='text' OR typeof(since) NOT IN ('integer', 'real')",
        "invitations": "typeof(code)!='text' OR typeof(expires) NOT IN ('integer', 'real') "
                       f"OR purpose NOT IN {INVITATION_PURPOSES}",
        "bans": "typeof(kind)!='text' OR typeof(target)!='text' OR key != kind || ':' || target",
        "mutes": "typeof(kind)!='text' OR typeof(target)!='text' OR key != kind || ':' || target",
        "messages": "typeof(time)!='integer' OR typeof(target)!='text' OR typeof(nick)!='text' "
                    "OR typeof(kind)!='integer' OR typeof(text)!='text'",
        "offline": "typeof(sender)!='text' OR typeof(time) NOT IN ('integer', 'real') OR typeof(text)!='text'",
        "kept_rooms": "typeof(name)!='text' OR typeof(password) NOT IN ('text', 'null')",
        "read_positions": "typeof(target)!='text' OR typeof(id)!='integer'",
        "room_masks": "typeof(mask)!='text' OR typeof(by)!='text' OR typeof(since) NOT IN ('integer', 'real')",
    }

    def describe(self) -> str:
        """What is kept, for the log at start."""
        counts = {table: self._query(f"SELECT count(*) FROM {table}")[0][0]
                  for table in ("accounts", "bans", "mutes", "offline", "messages")}
        return (f"{counts['accounts']} account(s), {counts['bans']} ban(s), {counts['mutes']} mute(s), "
                f"{counts['offline']} offline message(s), {counts['messages']} chat line(s); search "
                f"{'with the full-text index (FTS5)' if self.full_text else 'by scanning the newest lines'}")

    def close(self) -> None:
        """Write what is left and let go of the database and the directory's lock."""
        self.stopped.set()
        if self.maintenance is not None and self.maintenance is not threading.current_thread():
            self.maintenance.join(5.0)
        db = getattr(self, "db", None)
        if db is not None:
            with self.lock:
                with contextlib.suppress(sqlite3.Error):
                    self._commit_lines()
                    self._save_unsaved()
                    if self.path != ":memory:":
                        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                db.close()
            self.db = None
        for fd in (self.log_fd, self.lock_fd):
            if fd is not None:
                os.close(fd)
        self.log_fd = self.lock_fd = None


# ---------------------------------------------------------------------------
# The gate: who may come in, and as whom
# ---------------------------------------------------------------------------

class Gate:
    """Who may connect, and who may sign in as whom, at every door: bans of addresses and the limits on
    connections when one comes in (counted here for every port), the server password, names that are
    registered or kept for someone invited, an account's password (or its reset code), invitations, bans
    at the moment of signing in, and the budgets that limit guessing. The doors keep only their dialogue
    (prompts, SASL's framing, numerics, HTTP), and ask here; this is the only caller of the storage for
    those records at the door and at sign-in.

    Its lock guards its counts alone (connections, wrong guesses), and comes after the chat lock (see Output).
    """

    def __init__(self, storage: Storage, options: Callable[[], argparse.Namespace]) -> None:
        self.storage = storage
        self.options = options                                  # the options in force (a reload changes them)
        self.lock = threading.Lock()
        self.failures: dict[str, tuple[int, float]] = {}        # wrong secrets and the last one's time, by bucket
        self.per_address: collections.Counter[str] = collections.Counter()     # connections, by address_bucket()
        self.admitted = 0                                       # connections given a thread
        self.registrations: dict[str, list[float]] = {}         # when accounts were registered, by address_bucket()

    # -- the door: who may connect at all

    def admit(self, address: str, instead_of: str | None = None) -> Refused | None:
        """Count a newcomer from ADDRESS in, or say why it may not come in (kind "banned" or "full"): a ban of
        the address, the server full (--max-clients), the address full (--max-per-ip). INSTEAD_OF is the
        address it was counted under until now (a trusted proxy's), whose count moves to ADDRESS. Every
        count taken is given back with release()."""
        now = time.time()
        ban = self.storage.ban_for_address(address, now)
        options = self.options()
        bucket = address_bucket(address)
        moving = instead_of is not None
        with self.lock:
            if ban is not None:
                return Refused(ban.refusal(now), "banned")
            if options.max_clients and not moving and self.admitted >= options.max_clients:
                return Refused(f"The server is full ({options.max_clients} connections). Try again later.", "full")
            if options.max_per_ip and self.per_address[bucket] >= options.max_per_ip and \
                    not (moving and address_bucket(instead_of) == bucket):
                return Refused(f"Too many connections from your address (at most {options.max_per_ip}).", "full")
            self.per_address[bucket] += 1
            if moving:
                self._uncount(address_bucket(instead_of))
            else:
                self.admitted += 1
        return None

    def release(self, address: str) -> None:
        """Give back what admit() counted for a connection from ADDRESS, which has ended."""
        with self.lock:
            self.admitted -= 1
            self._uncount(address_bucket(address))

    def _uncount(self, bucket: str) -> None:
        self.per_address[bucket] -= 1
        if not self.per_address[bucket]:
            del self.per_address[bucket]

    # -- secrets, within the limits on guessing

    def check_secret(self, connection: ClientConnection | Session, what: str, is_right: Callable[[], bool]) -> bool:
        """Run IS_RIGHT, a check of a secret someone gave, within the limits on guessing.

        Every wrong try from an address (IPv6: its /64) makes the next answer
        slower by --guess-delay, up to GUESS_DELAY_STEPS times it (five
        seconds by default); after ADDRESS_GUESSES of them the address
        must wait GUESS_WINDOW before trying again (TooManyGuesses). A try is
        counted before it is checked, so guesses sent at once over many
        connections are counted too; a right one is then taken off the count,
        and only it: a right password (the guesser's own, say) must not wipe
        out the wrong ones made around it.
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
                counted, counted_last = self.failures.get(bucket, (1, now))
                if counted <= 1:
                    self.failures.pop(bucket, None)
                else:   # its own count undone, with the time of the last wrong one if no try came since
                    self.failures[bucket] = (counted - 1, last if counted_last == now else counted_last)
            return True
        log.warning("wrong %s from %r (%d in a row)", what, connection, wrong + 1)
        time.sleep(self.options().guess_delay * min(wrong + 1, GUESS_DELAY_STEPS))
        return False

    def check_account(self, connection: ClientConnection | Session, name: str, secret: str) -> tuple[str, str] | None:
        """The account NAME signs in to and what SECRET is to it: its "password", or the "code" of a password
        reset waiting for it (/reset-password); None if neither (a wrong guess, also when there is no such
        account).

        The one order for every door: the password first, within the limits on
        guessing (check_secret), and only then the ban (refuse_banned), so that
        a ban and its reason are told only to whoever knows the password.
        """
        account = self.storage.account_name(name)
        proved: list[str] = []

        def is_right() -> bool:
            if account is not None and self.storage.verify_password(account, secret):
                proved.append("password")
            elif account is not None and self.storage.invitation_matches(account, secret, "password"):
                proved.append("code")
            return bool(proved)

        if not self.check_secret(connection, f"password for {account or name}", is_right):
            return None
        self.refuse_banned(connection, account)
        return account, proved[0]

    def refuse_banned(self, connection: ClientConnection | Session, account: str | None) -> None:
        """Raise Disconnect, with the ban's words for the person, if a ban keeps out CONNECTION's address (or
        a network it is in) or ACCOUNT."""
        now = time.time()
        ban = self.storage.ban_for_address(connection.address, now) or \
            (self.storage.ban_for_account(account, now) if account else None)
        if ban is not None:
            raise Disconnect(f"banned ({ban.kind} {ban.shown})", Banned(ban.by, ban.how_long(now), ban.reason))

    def server_password_is(self, connection: ClientConnection, given: str) -> bool:
        """Whether GIVEN is the server's password (--password), counted as a guess if not."""
        return self.check_secret(connection, "server password", lambda: same_secret(given, self.options().password))

    # -- names

    def account_of(self, nick: str) -> str | None:
        """The registered spelling of the account NICK (or a look-alike) names; None for a guest's name."""
        return self.storage.account_name(nick)

    def name_problem(self, nick: str, account: str | None) -> str | None:
        """Why someone signed in to ACCOUNT (None: a guest) may not be called NICK because of whose name it
        is: a registered account's, or one kept for someone invited. The one rule for every door, at sign-in
        and at every change of nickname."""
        registered = self.storage.account_name(nick)
        if registered is not None and (account is None or name_key(account) != name_key(registered)):
            return f"{registered} is registered: sign in as {registered} with its password to use it."
        if registered is None and self.storage.invitation_waiting(nick):
            return f"{nick} is kept for someone invited: sign in as {nick} with the invitation code."
        return None

    def needs_invitation(self, nick: str) -> bool:
        """NICK is no account's, and only an invitation code lets it in: on a --private server, or a name
        with an invitation waiting."""
        return self.storage.account_name(nick) is None and (
            self.options().private or self.storage.invitation_waiting(nick))

    # -- invitations and password resets

    def check_invitation(self, connection: ClientConnection, nick: str, code: str) -> bool:
        """Whether CODE is NICK's invitation code, counted as a guess if not; False if none waits for NICK."""
        return self.storage.invitation_waiting(nick) and self.check_secret(
            connection, f"invitation code for {nick}", lambda: self.storage.invitation_matches(nick, code))

    def invitation_waiting(self, nick: str) -> bool:
        return self.storage.invitation_waiting(nick)

    def register(self, nick: str, password: str, address: str) -> None:
        """Make the account NICK with PASSWORD for someone at ADDRESS; Refused if the password is weak, the
        address registered its share of accounts lately, or the name cannot be had."""
        problem = password_problem(password, nick)
        if problem:
            raise Refused(problem, "weak-password")
        bucket, now = address_bucket(address), time.monotonic()
        with self.lock:
            recent = [when for when in self.registrations.get(bucket, ()) if now - when < REGISTRATION_WINDOW]
            if len(recent) >= REGISTRATIONS_PER_ADDRESS:
                raise Refused(f"{REGISTRATIONS_PER_ADDRESS} accounts were registered from your address in the last "
                              f"{REGISTRATION_WINDOW / 3600:g} hour; try again later.", "too-many-accounts")
            if len(self.registrations) > 10000:
                self.registrations = {b: t for b, t in self.registrations.items() if now - t[-1] < REGISTRATION_WINDOW}
            self.registrations[bucket] = recent + [now]      # counted before the slow part, so that tries at once count
        try:
            self.storage.register(nick, password)
        except (StoreFull, StorageError) as problem:
            raise Refused(str(problem), "name-taken") from None
        log.info("%s registered, from %s", nick, address)

    def register_invited(self, nick: str, password: str, address: str) -> None:
        """Make the account NICK, whose invitation code was given, with PASSWORD; the code is used up."""
        self.storage.register(nick, password)
        self.storage.remove_invitation(nick)
        log.info("%s registered at their first sign-in, from %s", nick, address)

    def code_waiting(self, nick: str) -> str | None:
        """What a code given for NICK would do: "account" (an invitation, to make the account NICK) or
        "password" (a reset, to choose a new password for NICK's account); None if no code waits for it."""
        account = self.storage.account_name(nick)
        if account is None:
            return "account" if self.storage.invitation_waiting(nick) else None
        return "password" if self.storage.invitation_waiting(account, "password") else None

    def redeem(self, connection: ClientConnection, nick: str, code: str, password: str) -> str | None:
        """CODE, the invitation or password reset waiting for NICK, makes NICK's account with PASSWORD or gives
        it PASSWORD: the account, or None if CODE is not the code (a guess counted; TooManyGuesses past
        the budget). Refused if the password is weak, or the code stopped working meanwhile. The one
        way in for a door that takes a code, a password and a name at once (IRC's VERIFY)."""
        purpose = self.code_waiting(nick)
        if purpose is None:
            return None
        account = self.storage.account_name(nick) or nick
        problem = password_problem(password, account)
        if problem:
            raise Refused(problem, "weak-password")
        what = "invitation code" if purpose == "account" else "password reset code"
        if not self.check_secret(connection, f"{what} for {account}",
                                 lambda: self.storage.invitation_matches(account, code, purpose)):
            return None
        try:
            if purpose == "account":
                self.register_invited(account, password, connection.address)
            else:
                self.reset_password(account, password, connection.address)
        except (StoreFull, StorageError) as problem:
            raise Refused(str(problem)) from None
        self.refuse_banned(connection, account)
        return account

    def reset_password(self, account: str, password: str, address: str) -> None:
        """Give ACCOUNT the new PASSWORD, its reset code having been given; Refused if the code was taken back
        meanwhile."""
        if not self.storage.invitation_waiting(account, "password"):
            raise Refused(f"The password reset code for {account} no longer works; ask an operator for another.")
        self.storage.reset_password(account, password)
        log.warning("%s chose a new password with a reset code, from %s", account, address)


# ---------------------------------------------------------------------------
# The server object: who is here, rooms, and every change to them
# ---------------------------------------------------------------------------

class Refused(commands.CommandError):
    """A request the core turns down. The message is for the person; KIND says which refusal it is,
    and ROOM and NICK what it is about, for protocols that have a code for each (IRC's numerics)."""

    def __init__(self, message: str, kind: str | None = None, room: str | None = None,
                 nick: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.room = room
        self.nick = nick


@contextlib.contextmanager
def refused_on(*problems: type[Exception]) -> Iterator[None]:
    """Turn any of PROBLEMS raised in the block into a Refused with the same message: each says what went
    wrong in words for the person who asked (a limit of what is kept, the database, a duration)."""
    try:
        yield
    except problems as problem:
        raise Refused(str(problem)) from None


class Person:
    """Someone in the chat: a guest, or the owner of an account, on one or more Sessions. Changed only by
    ChatServer's methods, under its lock."""

    __slots__ = ("nick", "key", "serial", "sessions", "rooms", "last_room", "away", "operator", "account", "realname",
                 "username", "since", "last_spoke", "mute", "ignoring", "last_private_from", "invited_to", "seen", "read",
                 "last_private", "listing", "quit_message", "watching", "bot", "invisible", "conversations")

    def __init__(self, nick: str, serial: int) -> None:
        self.nick = nick
        self.key = name_key(nick)
        self.serial = serial                    # unique for the server's life: who "they" are across renames
        self.sessions: list[Session] = []       # the connections they are signed in on, the first first
        self.rooms: dict[str, Room] = {}        # by key, in the order joined
        self.last_room: Room | None = None      # the room they last made current, on any session
        self.away: str | None = None
        self.operator = False
        self.account: str | None = None         # the account signed in to (its registered spelling)
        self.realname = ""                      # the real name an IRC client gave (USER); "" from pyChat's
        self.username = ANONYMOUS_USER          # the user name of NICK!USER@HOST: an IRC client's (USER), cleaned
        self.since = time.time()                # came online at
        self.last_spoke = time.monotonic()      # for /whois: last chat, action or private line
        self.mute: Ban | None = None            # the mute of their account or address, if one holds for them
        # Sets that are nearly always empty are frozensets, replaced on a change, starting as NOTHING: an
        # empty set costs 216 bytes a person, a shared empty frozenset nothing.
        self.ignoring: frozenset[str] = NOTHING     # name keys
        self.last_private_from: int | None = None   # a serial: nothing of a sender who left stays reachable
        self.invited_to: dict[str, int] = {}    # room key -> the Room.life the invitation is for
        self.seen: dict[str, int] = {}          # a guest's rooms left: room key -> the id of the last line then
        # An account's read positions (message target -> message id), and the last private line of each of
        # its conversations while online; a guest has neither (and so costs no dict for them).
        self.read: dict[str, int] = NO_POSITIONS
        self.last_private: dict[str, int] = NO_POSITIONS
        self.listing = TokenBucket(LISTING_RATE, LISTING_BURST)
        self.quit_message = False               # they left with /quit and words of their own
        self.watching: dict[str, str] = {}      # name keys watched for coming and going -> the name as asked
        self.bot = False                        # they say they are a program (IRC's user mode +B)
        self.invisible = False                  # left out of WHO masks by those who share no room (IRC's +i)
        self.conversations: frozenset[str] = NOTHING    # a guest's private conversations kept while here

    @property
    def muted(self) -> bool:
        """A mute holds for them: it lapses by itself when its time is up."""
        return self.mute is not None and self.mute.active(time.time())

    @property
    def mask(self) -> str:
        """NICK!USER@HOST, which a room's bans and exceptions are matched against."""
        return f"{self.nick}!{self.username}@{PERSON_HOST}"

    @property
    def away_shown(self) -> str | None:
        """Their away message as others are shown it: none while they are muted, whose words no one sees."""
        return None if self.muted else self.away

    @property
    def identity(self) -> str:
        """Who they are to the database: their account's key, or for a guest one for this connection alone."""
        return name_key(self.account) if self.account else f"guest/{self.serial}"

    @property
    def address(self) -> str:
        """The address of their first session, for the log."""
        return self.sessions[0].address if self.sessions else "-"

    @property
    def outputs(self) -> list[Output]:
        return [session.output for session in self.sessions]

    def __repr__(self) -> str:
        return f"{self.nick}@{self.address}"


class Session:
    """One connection signed in as a person: where lines to it go, and, in a protocol with one, its current
    room. Changed only by ChatServer's methods, under its lock."""

    __slots__ = ("person", "output", "address", "number", "since", "current", "operator_failures",
                 "reports_reading", "oldest_shown")

    def __init__(self, person: Person, output: Output, address: str, number: int) -> None:
        self.person = person
        self.output = output                    # its reader is the connection, whose door knows when it spoke
        self.address = address
        self.number = number                    # its number among its person's, for /sessions and /kick-session
        self.since = time.time()
        self.current: Room | None = None        # where plain lines go
        self.operator_failures = 0              # wrong /op secrets on this connection
        self.reports_reading = False            # it has said what its person read (/read, IRC's MARKREAD)
        self.oldest_shown: dict[str, int] | None = None     # message target -> the id /history shows lines before

    def shown_from(self, target: str, number: int) -> None:
        """It has been shown TARGET's lines from the id NUMBER on: /history pages back from there."""
        if self.oldest_shown is None:
            self.oldest_shown = {}
        self.oldest_shown[target] = number

    def __repr__(self) -> str:
        return f"{self.person.nick}@{self.address}"


class Whois(NamedTuple):
    """What may be known of someone online, for /whois and IRC's WHOIS."""

    nick: str
    account: str | None                     # None for a guest
    rooms: tuple[tuple[str, bool], ...]     # the rooms the asker may see, and whether they run each
    away: str | None
    operator: bool
    since: float                            # when they signed in, a time.time()
    idle: float                             # seconds since they last said something
    protocol: str                           # the name of the protocol they came in with
    address: str | None                     # for operators of the server only
    bot: bool = False                       # they say they are a program
    realname: str = ""                      # IRC's real name, if they gave one
    username: str = ANONYMOUS_USER          # the USER of their NICK!USER@HOST


class Departed(NamedTuple):
    """A name someone gave up lately, by leaving or by renaming, for IRC's WHOWAS. No address is kept."""

    nick: str
    key: str                                # name_key(nick)
    account: str | None
    realname: str
    when: float                             # a time.time()
    username: str = ANONYMOUS_USER


class WhoEntry(NamedTuple):
    """One person as a WHO list shows them."""

    nick: str
    room: str | None                        # the room asked about, or the first of theirs the asker may see
    account: str | None
    realname: str
    away: bool
    operator: bool
    room_operator: bool
    idle: float                             # seconds since they last said something
    bot: bool
    voiced: bool = False                    # they have a voice in the room
    username: str = ANONYMOUS_USER


# /mode's settings by the letter IRC gives each, which /mode takes too (/mode +m, /mode +l 50): the setting and
# its value when the letter is added, and when it is taken away. A value of None is the word that follows the
# letters; a list's letter (b, e, I) with no word after it asks for the list.
ROOM_MODE_LETTERS: dict[str, tuple[tuple[str, str | None], tuple[str, str | None]]] = {
    "b": (("ban", None), ("unban", None)),
    "e": (("exempt", None), ("unexempt", None)),
    "I": (("invite-mask", None), ("uninvite-mask", None)),
    "i": (("invite-only", "on"), ("invite-only", "off")),
    "k": (("key", None), ("key", "off")),
    "l": (("limit", None), ("limit", "off")),
    "m": (("moderated", "on"), ("moderated", "off")),
    "n": (("outside-messages", "off"), ("outside-messages", "on")),
    "o": (("op", None), ("deop", None)),
    "s": (("secret", "on"), ("secret", "off")),
    "t": (("topic", "operators"), ("topic", "everyone")),
    "v": (("voice", None), ("devoice", None)),
}


class ModeWord(NamedTuple):
    """One letter of '+mv-l bob' read as a setting: the letter with its sign, the setting (None for a
    letter no setting has) and its value (None: the word it needs is missing, or a list is asked for)."""

    letter: str
    setting: str | None
    value: str | None


def read_mode_letters(letters: str, words: list[str]) -> list[ModeWord]:
    """LETTERS ('+mv-l') and the WORDS after them as settings, in order, as IRC's MODE reads them: a
    letter that needs a word takes the next one; -k takes one if there is one (and ignores it)."""
    found, adding, words = [], True, list(words)
    for letter in letters:
        if letter in "+-":
            adding = letter == "+"
            continue
        sign = "+" if adding else "-"
        if letter not in ROOM_MODE_LETTERS:
            found.append(ModeWord(sign + letter, None, None))
            continue
        setting, value = ROOM_MODE_LETTERS[letter][0 if adding else 1]
        if value is None:
            value = words.pop(0) if words else None
        elif letter == "k" and words:
            words.pop(0)
        found.append(ModeWord(sign + letter, setting, value))
    return found


def mask_of(text: str) -> str:
    """A room's ban or exception mask as NICK!USER@HOST: 'bob' is 'bob!*@*', 'bob@x' is '*!bob@x', as IRC
    servers complete them."""
    if "!" not in text and "@" not in text:
        return f"{text}!*@*"
    nick, _, rest = text.rpartition("!") if "!" in text else ("*", "", text)
    user, _, host = rest.partition("@") if "@" in rest else (rest, "", "*")
    return f"{nick or '*'}!{user or '*'}@{host or '*'}"


class RoomMask(NamedTuple):
    """A mask in one of a room's lists (ROOM_MASK_LISTS): who put it there, and when."""

    mask: str
    by: str
    when: float                     # a time.time()


class Room:
    """A room: its members (grouped by how lines reach them), settings, operators and last lines."""

    # Numbers each life of a room, from its opening until it empties, for every room: an invitation holds
    # to the life it was made in (Person.invited_to). Drawn under the server's lock.
    lives = itertools.count(1)

    def __init__(self, name: str) -> None:
        self.name = name
        self.key = name_key(name)
        self.life = next(Room.lives)
        self.members: set[Person] = set()
        # Members' sessions' outputs by (protocol, whether the room is not the session's current one): a line
        # to the room is rendered once per group, not once per member.
        self.audiences: dict[tuple[PyChatProtocol, bool], set[Output]] = {}
        self.operators: set[Person] = set()
        self.voiced: set[Person] = set()
        self.last_line = 0                      # the id of the last line said here (0: none since the start)
        self.opened = time.time()               # when its first member of this life came in
        self.last_used = time.monotonic()
        self.forget_settings()

    def forget_settings(self) -> None:
        """Give the room the settings it starts with: when it is made, and when it empties if private, so
        that it forgets everything and the next to open it sees nothing of it."""
        self.topic: str | None = None
        self.topic_set: tuple[str, float] | None = None     # who set the topic and when, since the server started
        self.password: str | None = None        # the room's key, for /join ROOM KEY
        self.invite_only = False
        self.topic_by_everyone = False
        self.secret = False                     # hidden from those outside it, as a room with a key is
        self.limit: int | None = None           # the most members it takes
        self.moderated = False                  # only its operators and voiced members talk
        self.outside_messages = False           # people not in it may talk in it (IRC's -n)
        self.masks: dict[str, dict[str, RoomMask]] = {name: {} for name in ROOM_MASK_LISTS}   # by casefolded mask

    @property
    def private(self) -> bool:
        return self.invite_only or self.password is not None or self.secret

    def fits(self, person: Person, list_name: str) -> bool:
        """Whether PERSON fits a mask of the room's list LIST_NAME (ROOM_MASK_LISTS)."""
        masks = self.masks[list_name]
        if not masks:
            return False
        mask = person.mask.casefold()
        return any(fits_pattern(pattern, mask) for pattern in masks)

    def banned(self, person: Person) -> bool:
        """PERSON fits a ban of the room and no exception."""
        return self.fits(person, "ban") and not self.fits(person, "exempt")

    def hear(self, session: Session, current: bool) -> None:
        """Put SESSION's output in the audience for its current room, or for its other rooms."""
        self._leave_audience(session.output, current)
        self.audiences.setdefault((session.output.protocol, not current), set()).add(session.output)

    @property
    def receivers(self) -> int:
        """The outputs in all its audiences: what writing to the room costs. Counted in C, with no Python
        code between the audiences' lengths, so the switchboard may ask while another thread changes them."""
        return sum(map(len, self.audiences.values()))

    def stop_hearing(self, session: Session) -> None:
        for tagged in (False, True):
            self._leave_audience(session.output, tagged)

    def _leave_audience(self, output: Output, tagged: bool) -> None:
        # The protocol object in an audience's key is one member's, and an IRC one holds its connection,
        # which must not outlive the session: when the key holds the leaver's own object, it is made again
        # from a member who stays. An audience that empties goes.
        protocol = output.protocol
        key = (protocol, tagged)
        outputs = self.audiences.get(key)
        if outputs is None or output not in outputs:
            return
        outputs.discard(output)
        if not outputs:
            del self.audiences[key]
        elif next(held for held, _ in self.audiences if (held, _) == key) is protocol:
            # set.pop() resumes where the last one stopped; next(iter()) would scan the set from its
            # start, once per leaver: 10,000 people leaving a room took seconds.
            stays = outputs.pop()
            outputs.add(stays)
            del self.audiences[key]
            self.audiences[(stays.protocol, tagged)] = outputs


class ChatServer(socketserver.ThreadingTCPServer):
    """The listening socket, and everything shared between connections, behind one lock.

    Every change to people and rooms is one of the public methods below; each
    says what happened with events (see the protocol section), which each
    receiver's protocol turns into its own words. Entering a room is _enter()
    and leaving one is _exit(), whatever the reason.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 4096         # the kernel caps this at net.core.somaxconn

    def __init__(self, options: argparse.Namespace, command_table: commands.CommandTable) -> None:
        self.options = options
        self.commands = command_table
        self.address_family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
        self.lock = threading.Lock()                            # first in the lock order (see Output)
        self.people: dict[str, Person] = {}                     # signed in, by name_key()
        self.by_serial: dict[int, Person] = {}                  # the same people, by Person.serial
        self.by_account: dict[str, Person] = {}                 # those signed in to an account, by its key
        self.serials = itertools.count(1)
        self.rooms: dict[str, Room] = {}                        # by name_key()
        self.connections: set[ClientConnection] = set()         # everyone, signed in or not
        self.refusing = 0                                       # TLS refusals under way
        self.bans_made = 0                                      # bans made since the start (see sign_in)
        self.out_of_descriptors = False                         # accept() failed for want of one; logged once
        self.spare_descriptor: int | None = None                # given up to accept a newcomer just to tell them
        self.ignorers: dict[str, set[Person]] = {}              # who ignores each name_key(), if anyone
        self.watchers: dict[str, set[Person]] = {}              # who watches for each name_key(), if anyone
        self.stopping = False
        self.stop_signal, self.stop_trigger = socket.socketpair()
        self.tls = self.make_tls_context(options) if options.tls_cert else None
        self.storage = Storage(options.data_dir, options.history_days, options.history_max_mb, options.operator)
        self.motd = MessageOfTheDay(options.motd)
        self.gate = Gate(self.storage, lambda: self.options)
        IrcServerName.name = options.server_name
        self.started = time.time()
        self.most_people = 0
        self.departed: collections.deque[Departed] = collections.deque(maxlen=WHOWAS_KEPT)   # newest last
        self.lobby: Room | None = None
        self.lobby = self.room_named(DEFAULT_ROOM)      # everyone's first room, never forgotten
        log.info("%s: %s", options.data_dir or "in memory (no --data-dir)", self.storage.describe())
        self.keep_unclaimed_operators(self.storage.unclaimed_operators())
        # What reload() reads again: main() gives its command line and --config file; by default, the same options.
        self.read_options: Callable[[], argparse.Namespace] = lambda: argparse.Namespace(**vars(options))
        self.reloading = threading.Lock()               # one reload at a time (the lock order: see Output)
        self.spare_descriptor = os.open(os.devnull, os.O_RDONLY | _CLOEXEC)
        self.workers = Workers()
        self.switchboard = Switchboard(options.max_queue, options.stall_timeout, self.workers)
        self.switchboard.before_writing = self.storage.commit_lines
        self.switchboard.least_hold = HISTORY_HOLD_SECONDS if self.storage.keeps_history else 0.0
        super().__init__((options.host, options.port), ClientConnection)
        self.irc: DoorListener | None = None
        self.web: DoorListener | None = None
        try:
            if options.irc_port is not None:
                self.irc = DoorListener(self, "--irc-port", options.irc_port, IrcConnection)
            if options.web_port is not None:
                self.web = DoorListener(self, "--web-port", options.web_port, WebConnection)
        except DoorUnavailable:
            for listening in (self, self.irc):
                if listening is not None:
                    listening.server_close()
            raise
        self.switchboard.start()
        self.storage.start_maintenance()

    @staticmethod
    def make_tls_context(options: argparse.Namespace) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(options.tls_cert, options.tls_key)
        return context

    def keep_unclaimed_operators(self, names: list[str]) -> None:
        """Keep each name --operator gives that has no account yet for its owner, who proves to be them with a
        code only the log shows, instead of letting whoever signs in as the name first take it. A new code at
        every start (and reload that names it) until it is used."""
        for name in names:
            code = self.storage.invite(name, "--operator")
            log.warning("--operator %s has no account yet: the name is kept for whoever signs in as %s with "
                        "the invitation code %s (it works once, for %d days) and chooses a password",
                        name, name, code, INVITATION_SECONDS // 86400)

    # -- reloading ------------------------------------------------------------

    def reload(self, asked_by: str) -> list[str]:
        """Read the configuration file (if there is one), the TLS certificate and key and the message of the day
        again, and apply what can change while the server runs; returns what changed and what needs a restart,
        or why nothing did. The one reload, for SIGHUP, /rehash and REHASH; nobody is disconnected.

        Everything that can fail (the file, the certificate, the log file) is read before anything changes.
        """
        with self.reloading:
            old = self.options
            try:
                new = self.read_options()
                toggled = bool(new.tls_cert) != bool(old.tls_cert)
                problem = new.tls_cert and not toggled and tls_files_problem(new.tls_cert, new.tls_key)
                if problem:
                    raise OptionsError(problem)
                tls = self.make_tls_context(new) if new.tls_cert and not toggled else self.tls
                log_handler = logging_handler(new)
            except (OptionsError, OSError, ssl.SSLError, SystemExit) as problem:
                # SystemExit: argparse refusing the command line, which it took at the start; never expected.
                why = f"{problem.filename}: {problem.strerror}" if getattr(problem, "filename", None) else problem
                log.error("reload (%s) failed; the settings stay as they were: %s", asked_by, why)
                return [f"The reload failed; the settings stay as they were: {why}"]
            changed, later = [], []
            for key, action in config_actions(option_parser()).items():
                before, after = getattr(old, action.dest), getattr(new, action.dest)
                if before == after:
                    continue
                if action.dest in RESTART_OPTIONS or (toggled and action.dest in ("tls_cert", "tls_key")):
                    later.append(f"{key} {shown_option(action.dest, before)} (after a restart: "
                                 f"{shown_option(action.dest, after)})")
                    setattr(new, action.dest, before)
                else:
                    changed.append(f"{key} {shown_option(action.dest, before)} -> {shown_option(action.dest, after)}")
            with self.lock:
                self.options = new
                self.tls = tls
            self.switchboard.set_limits(new.max_queue, new.stall_timeout)
            use_logging_handler(log_handler, new)
            renamed = set(map(name_key, old.operator)) ^ set(map(name_key, new.operator))
            if renamed:
                self.storage.name_operators(new.operator)
                self.keep_unclaimed_operators([name for name in self.storage.unclaimed_operators()
                                               if name_key(name) in renamed])
                operators = {name_key(name): self.storage.is_operator(name) for name in old.operator + new.operator
                             if name_key(name) in renamed}
                with self.lock:
                    for person in self.people.values():
                        if person.account and name_key(person.account) in operators:
                            person.operator = operators[name_key(person.account)]
            if new.motd != old.motd:
                self.motd = MessageOfTheDay(new.motd)
            self.motd.forget()
            motd = len(self.motd.lines())
            report = [f"Reloaded{' ' + new.config if new.config else ''}: "
                      + (f"changed {'; '.join(changed)}." if changed else "no option changed."),
                      *([f"Needs a restart: {'; '.join(later)}."] if later else []),
                      (f"TLS certificate {new.tls_cert} read again for new connections. " if tls is not None else "")
                      + (f"Message of the day: {motd} line(s) from {new.motd}." if new.motd
                         else "No message of the day.")]
            log.warning("reload (%s): %s", asked_by, " ".join(report))
            return report

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
            with contextlib.suppress(OSError):
                newcomer, _ = self.socket.accept()
                newcomer.setblocking(False)
                try:
                    newcomer.send(PYCHAT.encode(Error("The server is out of resources. Try again later.")))
                finally:
                    newcomer.close()
                told = True
            with contextlib.suppress(OSError):
                self.spare_descriptor = os.open(os.devnull, os.O_RDONLY | _CLOEXEC)
        if not told:
            time.sleep(OUT_OF_DESCRIPTORS_PAUSE)

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        self.admit(request, client_address, ClientConnection)

    def admit(self, request: socket.socket, client_address: tuple, protocol: type[ClientConnection]) -> None:
        """Give a newcomer a thread of its own to sign in, speaking PROTOCOL, or turn it away when it is banned, or the
        server or its address is full; the limits count every port alike.

        Every count the gate takes here is given back (Gate.release), on every path.
        """
        address = client_address[0]
        refused = self.gate.admit(address)
        refusal = str(refused) if refused is not None else None
        if refused is None:
            try:
                self.workers.run(functools.partial(self.process_request_thread, request, client_address, protocol))
                return
            except (RuntimeError, MemoryError, OSError) as problem:    # out of threads, memory or processes
                self.gate.release(address)
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
            self.refuse(request, protocol.refusal(refusal))
        else:
            try:
                self.workers.run(functools.partial(self.refuse, request, protocol.refusal(refusal)))
            except (RuntimeError, MemoryError):
                with self.lock:
                    self.refusing -= 1
                self.shutdown_request(request)

    def refuse(self, request: socket.socket, refusal: bytes) -> None:
        """Tell a newcomer why it cannot come in, and close the connection."""
        try:
            if self.tls is not None:
                request.settimeout(2.0)
                request = self.tls.wrap_socket(request, server_side=True)
            request.sendall(refusal)
        except (OSError, ssl.SSLError):
            pass
        finally:
            self.shutdown_request(request)
            if self.tls is not None:
                with self.lock:
                    self.refusing -= 1

    def process_request_thread(self, request: socket.socket, client_address: tuple,
                               protocol: type[ClientConnection]) -> None:
        """Sign a newcomer in on this thread; the switchboard reads them after that. The connection gives
        back what admit() counted when it leaves (ClientConnection.leave)."""
        try:
            protocol(request, client_address, self)
        except Exception:
            self.handle_error(request, client_address)

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

    # -- signing in and out ----------------------------------------------------------

    def sign_in(self, connection: ClientConnection, nick: str, account: str | None = None,
                realname: str = "", username: str = ANONYMOUS_USER) -> str | None:
        """Make CONNECTION a session of someone called NICK (with the REALNAME and USERNAME an IRC client gave),
        or say why not. Signed in to an ACCOUNT whose owner is online already, it is one more session of theirs,
        put in their rooms; otherwise a new person, put back in the account's kept rooms. A protocol with a
        current room is always in one: the lobby if nothing else. Every room shows what was said in it
        since its last line the person read (catch_up).

        Either all of it happens or none: a failure on the way in takes the
        session out again through the same door as leaving.

        Bans are looked at here, at the moment of signing in, whichever door and
        however long ago the connection was opened (raises Disconnect). A ban
        made meanwhile either finds the person among people (ban()) or moved
        `bans_made`, and is then looked for again, under the lock.
        """
        nick = normal_name(nick)
        motd = self.motd.lines()
        ignoring = self.storage.ignoring(account) if account else []
        kept = self.storage.kept_rooms(account) if account else []
        read = self.storage.read_positions(account) if account else None
        bans_seen = self.bans_made
        self.gate.refuse_banned(connection, account)
        with self.lock:
            if self.bans_made != bans_seen:
                self.gate.refuse_banned(connection, account)
            person = self.by_account.get(name_key(account)) if account else None
            if person is not None and len(person.sessions) >= MAX_SESSIONS:
                return (f"{person.nick} is signed in on {MAX_SESSIONS} sessions, the most; /sessions on one of "
                        "them lists them, and /kick-session ends one.")
            if person is not None and realname and not person.realname:
                person.realname = realname      # the first session to give one (pyChat's clients give none)
            if person is not None and person.username == ANONYMOUS_USER:
                person.username = username      # likewise
            if person is None:
                self._let_go_of_closed(self.people.get(name_key(nick)))
                problem = self.nickname_problem(nick, account=account)
                if problem:
                    return problem
                person = Person(nick, next(self.serials))
                person.account = account
                person.realname = realname
                person.username = username
                person.operator = account is not None and self.storage.is_operator(account)
                if read is not None:
                    person.read, person.last_private = read, {}
            session = Session(person, connection.output, connection.address,
                              max((s.number for s in person.sessions), default=0) + 1)
            connection.person, connection.session = person, session      # who the protocol now speaks to
            try:
                self._open_session(session, motd, ignoring, kept)
            except BaseException:
                self._close_session(session, "could not sign in")
                connection.person = connection.session = None
                raise
        log.info("%r signed in%s%s", session, f" to the account {account}" if account else "",
                 f" (session {session.number})" if session.number > 1 else "")
        if account:
            self.storage.saw(account)
            self.deliver_offline_messages(session)
        return None

    def _open_session(self, session: Session, motd: list[str], ignoring: list[str], kept: list[KeptRoom]) -> None:
        """Let SESSION in: as its person's first (they come online, in the rooms KEPT for their account), or
        as one more (shown the rooms they are in). Lock held."""
        person = session.person
        first = not person.sessions
        person.sessions.append(session)
        session.output.send(Welcome(person.nick, tuple(motd)))
        if person.operator:
            session.output.send(Notice("You are an operator of this server."))
        person.mute = self._mute_of(person, time.time())      # this session's address may be muted too
        if person.mute is not None:
            session.output.send(Notice(f"You are muted {person.mute.how_long(time.time())}"
                                       f"{_because(person.mute.reason)}."))
        if not first:
            others = [s for s in person.sessions if s is not session]
            self._to_sessions(others, Notice(f"You are also signed in from {session.output.protocol.name} at "
                                             f"{session.address} ({len(person.sessions)} sessions)."))
            rooms = sorted(person.rooms.values(), key=lambda room: room is person.last_room)
            for room in rooms:
                self._show_room(session, room, current=room is rooms[-1])
            self._settle(session)
            self._catch_up_private(session)
            return
        self.people[person.key] = person
        self.by_serial[person.serial] = person
        if person.account:
            self.by_account[name_key(person.account)] = person
        for key in ignoring:
            person.ignoring |= {key}
            self._count_ignorer(key, person, True)
        for room in kept:
            self._enter_kept(session, room, current=room is kept[-1])
        self._settle(session)
        self._catch_up_private(session)
        self.most_people = max(self.most_people, len(self.people))
        self._to_people(self.watchers.get(person.key, ()), CameOnline(person.nick))

    def _let_go_of_closed(self, person: Person | None) -> None:
        """Take PERSON out of the chat now if every connection of theirs has closed, though the switchboard has
        not read that yet: a newcomer who wants their name (a client reconnecting at once) finds it free.
        Lock held."""
        if person is None or not all(session.output.peer_closed() for session in person.sessions):
            return
        for session in list(person.sessions):
            session.output.end("connection closed")
            self._close_session(session, "connection closed")

    def _settle(self, session: Session) -> None:
        """Give SESSION, just signed in, a current room if its protocol needs one and it has none yet: the
        last of its person's rooms, or the lobby. Lock held."""
        if session.current is not None or not session.output.protocol.has_current_room:
            return
        if session.person.rooms:
            self._make_current(session, list(session.person.rooms.values())[-1])
            session.output.send(NowTalking(session.current.name))
        else:
            self._enter(session, self.lobby)

    def _enter_kept(self, session: Session, kept: KeptRoom, current: bool) -> None:
        """Put SESSION's person back in a room kept for their account, if they may still be there (current
        for SESSION if CURRENT). Lock held."""
        try:
            room = self.rooms.get(name_key(kept.name)) or self.room_named(kept.name)
        except Refused as refusal:
            session.output.send(Notice(f"#{kept.name}: {refusal}"))
            return
        refusal = self._entry_refusal(session.person, room, kept.password)
        if refusal is not None:         # banned, or no longer let in, since they were last here
            session.output.send(Notice(f"#{room.name} has a new key: /join #{room.name} KEY to go back."
                                       if refusal.kind == "bad-key" else str(refusal)))
            self.storage.drop_room(session.person.account, room.name)
            return
        if not room.members and kept.password and room is not self.lobby:
            room.password = kept.password       # they open it again as they left it
        self._enter(session, room, current)

    def nickname_problem(self, nick: str, claimant: Person | None = None, account: str | None = None) -> str | None:
        """Why CLAIMANT (or a newcomer signed in to ACCOUNT) cannot be called NICK (already NFKC-normalised),
        or None. Lock held."""
        taken = self.people.get(name_key(nick))
        if taken is not None and taken is not claimant:
            return f"Nickname {nick!r} is taken (or looks too much like {taken.nick!r})."
        return name_problem(nick) or self.gate.name_problem(nick, claimant.account if claimant is not None
                                                            else account)

    def deliver_offline_messages(self, session: Session) -> None:
        """Show SESSION what guests left for its person's account while they were away, but what came from
        people they ignore. (What other accounts said to them is in their conversations: _catch_up_private.)

        They stay kept until the socket has taken them all, so that a kill -9 in
        between, a connection that fails, or one too slow to take them within
        --stall-timeout loses none: the next sign-in shows them again. Called on
        the thread that signs SESSION in, which writes its own output and may
        wait for it.
        """
        person, output = session.person, session.output
        try:
            self.storage.commit_lines()
            messages = self.storage.offline_waiting(person.account)
        except StorageError as problem:
            log.error("offline messages for %s: %s", person.account, problem)
            return
        shown = [m for m in messages if m.sender_key not in person.ignoring]
        if shown:
            output.send(Notice("1 message was left for you while you were away:" if len(shown) == 1
                               else f"{len(shown)} messages were left for you while you were away:"))
            for message in shown:
                output.send(OfflinePrivate(message.when, message.sender, message.text))
            output.send(Notice("End of messages left for you."))
            if not output.write_all(self.options.stall_timeout):
                self.switchboard.mark_ready([output])     # what is left still goes; they stay kept
                return
        try:
            self.storage.remove_offline(messages)
        except StorageError as problem:
            log.error("offline messages for %s: %s", person.account, problem)

    def remove(self, connection: ClientConnection, reason: str) -> None:
        """A connection ended: its session ends, and with the last one its person leaves the chat; everyone
        who shares a room with them is told, once."""
        session = connection.session
        with self.lock:
            self.connections.discard(connection)
            if session is None or session not in session.person.sessions:
                log.info("%r closed: %s", connection, reason)
                return
            self._close_session(session, reason)
        log.info("%r left: %s", session, reason)

    def _close_session(self, session: Session, reason: str) -> None:
        """SESSION is over: it hears nothing more; its person's other sessions are told, or, if it was the
        last, the person leaves the chat. Lock held."""
        person = session.person
        if session not in person.sessions:
            return
        for room in person.rooms.values():
            room.stop_hearing(session)
        person.sessions.remove(session)
        if person.account and not session.reports_reading:
            self._read_all_shown(person)
        if person.sessions:
            self._to_sessions(person.sessions, Notice(
                f"Your session from {session.output.protocol.name} at {session.address} ended ({reason}); "
                f"{len(person.sessions)} left."))
        elif self.by_serial.get(person.serial) is person:
            self._leave_chat(person, reason)

    def _read_all_shown(self, person: Person) -> None:
        """PERSON has read all they were shown, in every room and conversation: said of a session that never
        says what its person read (a client from before read positions, nc, IRC without read markers),
        whose screen is taken to have shown everything. Lock held."""
        for room in person.rooms.values():
            if self._last_line_of(room):
                self._mark_read(person, room_target(room.name), room.last_line)
        for target, number in person.last_private.items():
            self._mark_read(person, target, number)

    def _leave_chat(self, person: Person, reason: str) -> None:
        """Take PERSON out of the chat; everyone who shares a room with them is told, once. Lock held."""
        receivers = set().union(*(room.members for room in person.rooms.values()
                                  if len(room.members) <= ANNOUNCE_LIMIT)) - {person}
        if not self.stopping:
            # A muted person's own words (their /quit message) are not shown. Told while they are still
            # here, so that IRC's rendering finds their NICK!USER@HOST.
            shown = None if reason == QUIT or (person.muted and person.quit_message) else reason
            self._to_people(receivers, Quit(person.nick, shown))
        self._forget(person)
        self._to_people(self.watchers.get(person.key, ()), WentOffline(person.nick))
        self.departed.append(Departed(person.nick, person.key, person.account, person.realname, time.time(),
                                      person.username))
        if person.account:
            self.storage.saw(person.account)

    def _forget(self, person: Person) -> None:
        """Take PERSON out of every room and table, so that nothing of them stays reachable. Lock held."""
        for room in list(person.rooms.values()):
            self._exit(person, room, None, leaving_the_chat=True)
        if self.people.get(person.key) is person:
            del self.people[person.key]
        self.by_serial.pop(person.serial, None)
        if person.account and self.by_account.get(name_key(person.account)) is person:
            del self.by_account[name_key(person.account)]
        for key in person.ignoring:
            self._count_ignorer(key, person, False)
        person.ignoring = NOTHING
        self._stop_watching(person, list(person.watching))
        for conversation in person.conversations:
            self.storage.forget_target(conversation)
        person.conversations = NOTHING

    # -- rooms: the one way in and the one way out -----------------------------------

    def room_named(self, name: str) -> Room:
        """The room called NAME, created if needed; the caller holds the lock or runs before serving."""
        key = name_key(name)
        room = self.rooms.get(key)
        if room is None:
            if len(self.rooms) >= MAX_ROOMS:
                empty = [r for r in self.rooms.values() if not r.members and r is not self.lobby]
                if not empty:
                    raise Refused("Too many rooms; join one of those in /rooms.")
                forgotten = min(empty, key=lambda r: r.last_used)
                del self.rooms[forgotten.key]
            room = self.rooms[key] = Room(name)
            saved = self.storage.room_settings(name)
            if saved is not None:
                room.topic = saved.topic
                room.topic_by_everyone = "topic-by-everyone" in saved.modes
                room.moderated = "moderated" in saved.modes
                room.outside_messages = "outside-messages" in saved.modes
                room.limit = next((int(mode[6:]) for mode in saved.modes if re.fullmatch(r"limit-[1-9][0-9]{0,5}", mode)
                                   and int(mode[6:]) <= MAX_ROOM_LIMIT), None)
                for list_name, mask in self.storage.room_masks(name):
                    if list_name in room.masks:
                        room.masks[list_name][mask.mask.casefold()] = mask
        return room

    def _present(self, person: Person) -> None:
        """Refuse anything more for PERSON once they were taken out of the chat (they left, or their account
        was removed), so that a command still running for them cannot put them back in a room or a
        table: they would stay there, a member no one sees leave. Lock held."""
        if self.by_serial.get(person.serial) is not person:
            raise Refused("You are no longer in the chat.")

    def _enter(self, session: Session, room: Room, current: bool = True) -> None:
        """Put SESSION's person in ROOM, current for SESSION (unless not CURRENT): the room is told; every
        session of theirs sees who is there, the topic and what they have not read. Lock held."""
        person = session.person
        self._present(person)
        if not room.members:
            room.opened = time.time()
            if room is not self.lobby:
                room.operators.add(person)      # whoever opens a room runs it
        room.members.add(person)
        person.rooms[room.key] = room
        person.invited_to.pop(room.key, None)
        room.last_used = time.monotonic()
        if not person.muted and len(room.members) <= ANNOUNCE_LIMIT:
            self._to_room(room, Joined(room.name, person.nick, person.account, person.realname, person.away),
                          skip=person)
        for other in person.sessions:
            if other is not session:
                self._show_room(other, room, current=False)
        self._show_room(session, room, current)
        if person.account:
            self.storage.keep_room(person.account, room.name, room.password)
            if room_target(room.name) not in person.read:
                self._read_until_now(person, room)

    def _show_room(self, session: Session, room: Room, current: bool) -> None:
        """Show SESSION that its person is in ROOM (made current for it if CURRENT; otherwise its lines come
        tagged): who is there, the topic, and what they have not read. Lock held."""
        if current:
            self._make_current(session, room)
        else:
            room.hear(session, current=False)
        person = session.person
        others = [m.nick for m in itertools.islice(room.members, 16) if m is not person][:15]
        # A protocol that lists members gets them all, up to ANNOUNCE_LIMIT: past that, joins and leaves
        # are not announced, so a longer list would not stay true, and every newcomer would pay for it.
        # The few with a rank apart from the many names: most of a newcomer's cost in a big room was a
        # tuple a member.
        members, ranks = (), ()
        if session.output.protocol.lists_members:
            operators, voiced = room.operators, room.voiced
            members = tuple(map(NICK_OF, itertools.islice(room.members, ANNOUNCE_LIMIT)))
            ranks = tuple([(m.nick, m in operators, m in voiced) for m in operators | voiced])
        events: list[Any] = [Entered(room.name, tuple(others), len(room.members) - len(others) - 1, members,
                                     room.secret, ranks)]
        if room.topic:
            events.append(Topic(room.name, room.topic, *(room.topic_set or ())))
        events += self._catch_up_room(session, room)
        for event in events:
            session.output.send(event, tagged=not current)

    def _catch_up_room(self, session: Session, room: Room) -> list[Any]:
        """What SESSION is shown of ROOM's past as it enters it: for an account, the lines after its read
        position (the newest CATCH_UP_LINES, with a header saying how many and since when); for a
        guest, the last --history lines, or those since they left it. Lock held."""
        person, target = session.person, room_target(room.name)
        if not self.storage.keeps_history or room.private or not self.options.history:
            return []
        position = person.read.get(target) if person.account else None
        if position is None:
            since = person.seen.pop(room.key, 0)
            fetched = self.storage.latest_messages(target, self.options.history, after=since)
            lines, events = self._heeded(person, fetched), []
        else:
            fetched, lines, events = self._unread(person, target, position, f"#{room.name}", room=room.name)
        # /history pages back from here: from the first line fetched, or from the room's newest line (which
        # after a restart is in the database only).
        session.shown_from(target, fetched[0].id if fetched else self._last_line_of(room) + 1)
        if not lines:
            return []
        return events + [Replayed(m.when, chat_event(room.name, m)) for m in lines] + [HistoryEnd(room.name)]

    def _unread(self, person: Person, target: str, position: int, shown_as: str,
                **where: str) -> tuple[list[StoredMessage], list[StoredMessage], list[Any]]:
        """The newest CATCH_UP_LINES lines of TARGET after POSITION; those of them PERSON heeds; and the header
        that says how many there are (SHOWN_AS, WHERE: a room or a nick for NewSince). Lock held."""
        count = self.storage.count_after(target, position)
        if not count:
            return [], [], []
        fetched = self.storage.latest_messages(target, CATCH_UP_LINES, after=position)
        lines = self._heeded(person, fetched)
        if not lines:
            return fetched, [], []
        return fetched, lines, [NewSince(count=count - (len(fetched) - len(lines)), since=position / 1_000_000,
                                         shown=len(lines), history=f"/history {shown_as}", **where)]

    @staticmethod
    def _heeded(person: Person, lines: list[StoredMessage]) -> list[StoredMessage]:
        """LINES but those of people PERSON ignores: what /ignore hides live stays hidden when caught up."""
        if not person.ignoring:
            return lines
        return [m for m in lines if name_key(m.nick) not in person.ignoring]

    def _catch_up_private(self, session: Session) -> None:
        """Show SESSION, signed in to an account, the lines of its person's private conversations after their
        read positions, a conversation at a time. Lock held."""
        person = session.person
        if not person.account or not self.storage.keeps_history:
            return
        own = name_key(person.account)
        for target, position in sorted(person.read.items(), key=lambda item: item[1]):
            if not target.startswith("@"):
                continue
            other_key = next((key for key in target[1:].split("\n") if key != own), own)
            other = self.storage.account_name(other_key) or other_key
            fetched, lines, header = self._unread(person, target, position, other, nick=other)
            if not lines:
                continue
            for event in header + [Replayed(m.when, self._private_event(m, person, other)) for m in lines]:
                session.output.send(event)
            session.output.send(HistoryEnd(None, other))
            session.shown_from(target, fetched[0].id)
            person.last_private[target] = max(person.last_private.get(target, 0), fetched[-1].id)

    @staticmethod
    def _private_event(message: StoredMessage, person: Person, other: str) -> PrivateFrom | PrivateTo:
        """A kept line of PERSON's private conversation with OTHER, as PERSON sees it."""
        notice = message.kind == "notice"
        if name_key(message.account or message.nick) == name_key(person.account or person.nick):
            return PrivateTo(other, message.text, str(message.id), (), message.account, notice)
        return PrivateFrom(message.nick, message.text, str(message.id), (), message.account, notice)

    def _last_line_of(self, room: Room) -> int:
        """The id of ROOM's newest line, from the database for a room no one has spoken in since the start."""
        if not room.last_line and self.storage.keeps_history:
            newest = self.storage.latest_messages(room_target(room.name), 1)
            room.last_line = newest[0].id if newest else 0
        return room.last_line

    def _exit(self, person: Person, room: Room, event: Any, leaving_the_chat: bool = False) -> None:
        """Take PERSON out of ROOM, telling the room EVENT (None: nothing). Unless they are leaving the chat,
        each of their sessions that was in it is left with a current room: another of theirs, or the
        lobby. Lock held."""
        del person.rooms[room.key]
        room.members.discard(person)
        room.operators.discard(person)
        room.voiced.discard(person)
        for session in person.sessions:
            room.stop_hearing(session)
        if person.last_room is room:
            person.last_room = None
        if not leaving_the_chat:
            if person.account:
                self.storage.drop_room(person.account, room.name)
            else:
                person.seen[room.key] = room.last_line or self._last_line_of(room)
                while len(person.seen) > MAX_ROOMS:
                    del person.seen[next(iter(person.seen))]
        if not room.members:
            room.life = next(Room.lives)        # its invitations end with it
        if not room.members and room.private:
            room.forget_settings()
        if event is not None and len(room.members) <= ANNOUNCE_LIMIT:
            self._to_room(room, event)
        if leaving_the_chat:
            return
        for session in person.sessions:
            if session.current is not room:
                continue
            session.current = None
            if person.rooms:
                self._make_current(session, list(person.rooms.values())[-1])
                session.output.send(NowTalking(session.current.name))
            elif session.output.protocol.has_current_room:
                self._enter(session, self.lobby)

    def _make_current(self, session: Session, room: Room) -> None:
        old = session.current
        if old is not None and old is not room:
            old.hear(session, current=False)
        session.current = room
        room.hear(session, current=True)
        person = session.person
        if person.last_room is not room:
            person.last_room = room
            if person.account:
                self.storage.keep_room(person.account, room.name, room.password)

    def _member_room(self, session: Session, name: str | None) -> Room:
        """The room NAME (or SESSION's current one) that its person is in; refused otherwise. Lock held."""
        person = session.person
        self._present(person)
        if name is None:
            return self._current_room(session)
        key = name_key(room_name(name))
        room = person.rooms.get(key)
        if room is None:
            # The same words either way; IRC tells a room that is not there (or not for them to know of) apart.
            other = self.rooms.get(key)
            there = other is not None and bool(other.members) and (not other.private or person.operator)
            raise Refused(f"You are not in #{room_name(name)}.", "not-in-room" if there else "no-such-room",
                          room=room_name(name))
        return room

    @staticmethod
    def _current_room(session: Session) -> Room:
        """SESSION's current room; refused for one in none (only IRC sessions may be). Lock held."""
        if session.current is None:
            raise Refused("You are in no room: name one, or join one first.")
        return session.current

    def _visible_room(self, viewer: Person, name: str) -> Room:
        """The room NAME if it has people and VIEWER may know of it; refused otherwise. Lock held."""
        room = self.rooms.get(name_key(room_name(name)))
        if not self._may_see(viewer, room) or not room.members:
            raise Refused(f"No one is in #{room_name(name)}. /rooms lists the rooms.", "no-such-room",
                          room=room_name(name))
        return room

    def join(self, session: Session, name: str, password: str | None = None) -> None:
        """Enter the room NAME (creating it), or make it current if PERSON is in it already.

        PASSWORD is the key a private room needs; whoever opens a room with one
        (no one is in it) sets it as the room's key, as IRC does, and runs the room.
        """
        person = session.person
        name = room_name(name)
        problem = name_problem(name, "Room name")
        if problem:
            raise Refused(problem, "no-such-room", room=name)
        with self.lock:
            room = self.rooms.get(name_key(name))
            if room is not None and room.key in person.rooms:
                if room is session.current:
                    raise Refused(f"You are already in #{room.name}.", "already-in-room", room=room.name)
                self._make_current(session, room)
                session.output.send(NowTalking(room.name))
                return
            limit = self.options.rooms_per_person
            if limit and len(person.rooms) >= limit:
                raise Refused(f"You are in {len(person.rooms)} rooms, the most one may be in; /leave one first.",
                              "too-many-rooms", room=name)
            room = room or self.room_named(name)     # a lasting room's bans hold while it is empty too
            refusal = self._entry_refusal(person, room, password)
            if refusal is not None:
                raise refusal
            opening = not room.members
            self._enter(session, room)
            if not opening or password is None:
                return
            if room is self.lobby:
                session.output.send(Error(f"#{room.name} is open to everyone; it cannot have a key."))
                return
            room.password = password
            self._to_room(room, ModeChanged(room.name, person.nick, (("key", "on"),)))
            saved = self._room_to_save(room)
        self._save_room(*saved)

    @staticmethod
    def _entry_refusal(person: Person, room: Room, password: str | None) -> Refused | None:
        """Why PERSON may not come into ROOM with the key PASSWORD, or None: the one rule for /join and for a
        room kept for their account at sign-in. Lock held."""
        if not person.operator and room.banned(person):
            return Refused(f"You are banned from #{room.name}.", "banned-from-room", room=room.name)
        if not room.members or person.operator or person.invited_to.get(room.key) == room.life:
            return None
        if room.invite_only and not room.fits(person, "invite-mask"):
            return Refused(f"#{room.name} is invite-only; one of its operators can /invite you.", "invite-only",
                           room=room.name)
        if room.limit is not None and len(room.members) >= room.limit:
            return Refused(f"#{room.name} is full: it takes {room.limit} people; one of its operators can /invite "
                           f"you.", "room-full", room=room.name)
        if room.password is not None and not same_secret(password or "", room.password):
            return Refused(f"#{room.name} needs a key: /join #{room.name} KEY." if password is None
                           else f"Wrong key for #{room.name}.", "bad-key", room=room.name)
        return None

    def leave(self, session: Session, name: str | None = None, reason: str | None = None) -> None:
        """Leave the room NAME, or the current one, saying REASON to IRC users; leaving the last one goes back
        to the lobby."""
        person = session.person
        with self.lock:
            room = self._member_room(session, name)
            if self._must_stay_in(person, room):
                raise Refused(f"#{room.name} is your only room; /quit leaves the chat.")
            self._to_sessions(person.sessions, YouLeft(room.name, reason))
            self._exit(person, room, None if person.muted else Left(room.name, person.nick, reason))

    def kick(self, session: Session, nick: str, reason: str | None, name: str | None = None) -> str:
        """Put NICK out of the room NAME (or BY's current one); returns NICK as they spell it."""
        by = session.person
        with self.lock:
            room = self._member_room(session, name)
            self._check_runs(by, room)
            target = self._find(nick, room)
            if target.operator and not by.operator:
                raise Refused(f"{target.nick} is a server operator; a room operator cannot kick them.",
                              "not-room-operator", room=room.name)
            if self._must_stay_in(target, room):
                raise Refused(f"#{room.name} is {target.nick}'s only room; a server operator can /disconnect them.")
            self._to_sessions(target.sessions, YouWereKicked(room.name, by.nick, reason))
            self._exit(target, room, Kicked(room.name, target.nick, by.nick, reason))
        log.warning("%r kicked %r from #%s%s", by, target, room.name, _because(reason))
        return target.nick

    def invite(self, session: Session, nick: str, name: str | None = None) -> str:
        """Let NICK into the room NAME (or BY's current one) past its key and invite-only; they are told."""
        by = session.person
        with self.lock:
            room = self._member_room(session, name)
            if by.muted:
                raise Refused("You are muted; you cannot invite anyone.")
            if room.invite_only:
                self._check_runs(by, room)
            target = self._find(nick)
            if target in room.members:
                raise Refused(f"{target.nick} is already in #{room.name}.", "they-are-in-room", room.name,
                              target.nick)
            target.invited_to[room.key] = room.life
            if by.key not in target.ignoring:
                self._to_people([target], Invited(room.name, by.nick))
            self._to_room(room, InvitedSomeone(room.name, by.nick, target.nick), skip=by)
            return target.nick

    def set_topic(self, session: Session, topic: str, name: str | None = None) -> None:
        """Set the topic of the room NAME (or BY's current one); the room is told."""
        by = session.person
        with self.lock:
            room = self._member_room(session, name)
            if not room.topic_by_everyone:
                self._check_runs(by, room)
            elif by.muted:
                raise Refused("You are muted; you cannot set the topic.")
            else:       # a topic is words in front of the room: whoever may not talk in it may not set it
                self._room_to_speak_in(session, room.name)
            room.topic, room.topic_set = topic, (by.nick, time.time())
            self._to_room(room, TopicChanged(room.name, by.nick, topic))
            saved = self._room_to_save(room)
        self._save_room(*saved)

    def set_room_modes(self, session: Session, changes: list[tuple[str, str]],
                       name: str | None = None) -> list[Refused | None]:
        """Make CHANGES, each one of ROOM_SETTINGS and its value, to the room NAME (or SESSION's current one),
        in order; the room is told of those made in one event. Returns, for each change, why it was refused,
        or None. Both doors' /mode and MODE come here: the rules are these."""
        by = session.person
        with self.lock:
            room = self._member_room(session, name)
            self._check_runs(by, room)
            made, refusals = [], []
            for setting, value in changes:
                try:
                    made.append(self._change_setting(by, room, setting, value))
                    refusals.append(None)
                except Refused as refusal:
                    refusals.append(refusal)
            if not made:
                return refusals
            self._to_room(room, ModeChanged(room.name, by.nick, tuple(made)))
            saved = self._room_to_save(room)
        self._save_room(*saved)
        return refusals

    def _change_setting(self, by: Person, room: Room, setting: str, value: str) -> tuple[str, str]:
        """Change one setting of ROOM; returns it as the room is told of it. Lock held."""
        if room is self.lobby and setting in ("key", "invite-only", "secret", "limit") and value != "off":
            raise Refused(f"#{room.name} is open to everyone; it cannot be made private." if setting != "limit"
                          else f"#{room.name} is open to everyone; it takes everyone.")
        if setting == "key":
            if value != "off" and (not value or " " in value):
                raise Refused("A key is one word.", "invalid-mode-value", room=room.name)
            room.password = None if value == "off" else value
            return setting, "off" if value == "off" else "on"
        if setting in ("invite-only", "moderated", "secret", "outside-messages"):
            if value not in ("on", "off"):
                raise Refused(f"Say on or off, not {value!r}.")
            setattr(room, setting.replace("-", "_"), value == "on")
        elif setting == "topic":
            if value not in ("operators", "everyone"):
                raise Refused("Say who may set the topic: /mode topic operators, or /mode topic everyone.")
            room.topic_by_everyone = value == "everyone"
        elif setting == "limit":
            limit = int(value) if value.isascii() and value.isdigit() else 0
            if value != "off" and not 0 < limit <= MAX_ROOM_LIMIT:
                raise Refused(f"A room's limit is a number of people, 1 to {MAX_ROOM_LIMIT}, or off; not {value!r}.",
                              "invalid-mode-value", room=room.name)
            room.limit = None if value == "off" else limit
            value = "off" if value == "off" else str(limit)
        elif setting in ("op", "deop", "voice", "devoice"):
            target = self._find(value, room)
            adding = setting in ("op", "voice")
            group, what = (room.operators, "an operator") if setting in ("op", "deop") else (room.voiced, "voiced")
            if adding == (target in group):
                raise Refused(f"{target.nick} is {'already' if adding else 'not'} {what} in #{room.name}.")
            (group.add if adding else group.discard)(target)
            value = target.nick
        elif setting.removeprefix("un") in ROOM_MASK_LISTS:
            value = self._change_mask(by, room, setting, value)
        else:
            raise Refused(f"There is no setting {setting!r}; there are {', '.join(ROOM_SETTINGS)}.")
        return setting, value

    @staticmethod
    def _change_mask(by: Person, room: Room, setting: str, text: str) -> str:
        """Put a mask in one of ROOM's lists, or take it out (SETTING 'unban'...); returns the mask. Lock held."""
        list_name = setting.removeprefix("un")
        masks = room.masks[list_name]
        mask = mask_of(clean_text(text).replace(" ", ""))
        if not text or len(mask) > 2 * MAX_NICKNAME_LENGTH + 20:
            raise Refused("A mask is NICK!USER@HOST, with * for any letters and ? for one: bob!*@*.",
                          "invalid-mode-value", room=room.name)
        if setting == list_name:
            if mask.casefold() in masks:
                raise Refused(f"{mask} is in the {list_name} list of #{room.name} already.")
            if len(masks) >= MAX_ROOM_MASKS:
                raise Refused(f"The {list_name} list of #{room.name} is full ({MAX_ROOM_MASKS} masks).",
                              "mask-list-full", room=room.name)
            masks[mask.casefold()] = RoomMask(mask, by.nick, time.time())
        elif masks.pop(mask.casefold(), None) is None:
            raise Refused(f"{mask} is not in the {list_name} list of #{room.name}.")
        return mask

    def _room_to_save(self, room: Room) -> tuple[str, str | None, list[str], list[tuple[str, RoomMask]]]:
        """What of ROOM outlasts a restart: the topic, the settings but the key, invite-only and secret (those
        make it private) and its lists, unless the room is private, since a private room forgets everything
        once it empties, and every room is empty at a start. (What was said in it while it was public stays
        kept: it was public.) Lock held."""
        if room.private:
            return room.name, None, [], []
        modes = ["topic-by-everyone"] * room.topic_by_everyone + ["moderated"] * room.moderated + \
            ["outside-messages"] * room.outside_messages + ([f"limit-{room.limit}"] if room.limit else [])
        masks = [(list_name, mask) for list_name, masks in room.masks.items() for mask in masks.values()]
        return room.name, room.topic, modes, masks

    def _save_room(self, name: str, topic: str | None, modes: list[str], masks: list[tuple[str, RoomMask]]) -> None:
        try:
            self.storage.save_room_settings(name, topic, modes, masks)
        except (StoreFull, StorageError) as problem:
            log.error("could not keep the settings of #%s: %s", name, problem)

    def room_settings(self, session: Session, name: str | None = None) -> commands.RoomSettings:
        """The settings of the room NAME (or SESSION's current one)."""
        with self.lock:
            room = self._member_room(session, name)
            by_name = functools.partial(sorted, key=str.casefold)
            lists = {list_name: tuple(commands.MaskInfo(m.mask, m.by, m.when) for m in masks.values())
                     for list_name, masks in room.masks.items()}
            return commands.RoomSettings(
                room.name, room.topic, room.password is not None, room.invite_only, room.topic_by_everyone,
                tuple(by_name(p.nick for p in room.operators)), *(room.topic_set or ()),
                secret=room.secret, limit=room.limit, moderated=room.moderated,
                outside_messages=room.outside_messages, voiced=tuple(by_name(p.nick for p in room.voiced)),
                bans=lists["ban"], exempts=lists["exempt"], invite_masks=lists["invite-mask"], opened=room.opened)

    def _check_runs(self, person: Person, room: Room) -> None:
        """Refuse unless PERSON may run ROOM (an operator of it, or of the server) and is not muted."""
        if not (person.operator or person in room.operators):
            raise Refused(f"Only operators of #{room.name} may do that.", "not-room-operator",
                          room=room.name)
        if person.muted:
            raise Refused("You are muted; you cannot run a room.")

    # -- talking ----------------------------------------------------------------------

    def say(self, session: Session, text: str, name: str | None = None, echo: bool = True,
            client_tags: ClientTags = (), notice: bool = False) -> None:
        """A chat line from PERSON to the room NAME, or to their current room; with ECHO false, PERSON is
        not sent it back (IRC clients show their own lines themselves). CLIENT_TAGS go along with it; a
        NOTICE is a line that programs must not answer."""
        self._speak(session, Said, text, name, echo, client_tags, **({"notice": True} if notice else {}))

    def act(self, session: Session, text: str, name: str | None = None, echo: bool = True,
            client_tags: ClientTags = ()) -> None:
        """An action line, '* nick waves', to the room NAME or the current one."""
        self._speak(session, Acted, text, name, echo, client_tags)

    def _next_line_id(self) -> str:
        """A new id for a chat line, the same for all who get the line and in history, for ever. Lock held."""
        return str(self.storage.next_message_id())

    def _speak(self, session: Session, kind: type, text: str, name: str | None, echo: bool = True,
               client_tags: ClientTags = (), **more: Any) -> None:
        person = session.person
        with self.lock:
            if person.muted:
                session.output.send(Error("You are muted; the room does not hear you."))
                return
            room = self._room_to_speak_in(session, name)
            person.last_spoke = time.monotonic()
            number, when = self.storage.next_message_id(), time.time()
            event = kind(room.name, person.nick, text, str(number), client_tags, person.account,
                         bot=person.bot, **more)
            room.last_line = number
            if person.account:
                self._mark_read(person, room_target(room.name), number)     # one answers what one has read
            if not room.private:
                # In the database before anyone sees it, so whatever was seen survives a kill -9. A private
                # room's lines are never written: it forgets them when it empties, as it would at a restart.
                self.storage.add_message(number, when, room_target(room.name), person.nick, person.account,
                                         "notice" if more.get("notice") else "action" if kind is Acted else "line",
                                         text)
            self._to_room(room, event, skip=None if echo else session, sender=person)
            if echo and person not in room.members:
                session.output.send(event)

    def _room_to_speak_in(self, session: Session, name: str | None) -> Room:
        """The room NAME (or SESSION's current one) if its person may talk in it: they are in it, or it lets
        people outside it talk; and it is not moderated, or they are not banned from it, unless they run the
        room or have a voice in it. Refused otherwise. Lock held."""
        person = session.person
        try:
            room = self._member_room(session, name)
        except Refused as refusal:
            room = self.rooms.get(name_key(room_name(name))) if name is not None else None
            if room is None or not room.outside_messages or not self._may_see(person, room) or not room.members:
                raise refusal from None
        if person.operator or person in room.operators or person in room.voiced:
            return room
        if room.banned(person):
            raise Refused(f"You are banned from #{room.name}; you cannot talk in it.", "cannot-send", room=room.name)
        if room.moderated:
            raise Refused(f"#{room.name} is moderated: only its operators and those they give a voice talk.",
                          "cannot-send", room=room.name)
        return room

    def send_tags(self, session: Session, target: str, client_tags: ClientTags, echo: bool = False) -> None:
        """CLIENT_TAGS with no text (someone is typing, a reaction) to the room TARGET ('#ROOM') or the person
        TARGET; PERSON gets them back only with ECHO. Nothing is kept: not in the history, not for
        someone offline. A muted person's are dropped, as their typing would be."""
        person = session.person
        with self.lock:
            if target.startswith("#"):
                room = self._room_to_speak_in(session, target)     # as a line to the room: reactions are words
                if not person.muted:
                    event = TagMessage(room.name, person.nick, f"#{room.name}", self._next_line_id(), client_tags,
                                       person.account, person.bot)
                    self._to_room(room, event, skip=None if echo else session, sender=person)
                return
            found = self._find(target)
            if person.muted:
                return
            event = TagMessage(None, person.nick, found.nick, self._next_line_id(), client_tags, person.account,
                               person.bot)
            if person.key not in found.ignoring:
                self._to_sessions(found.sessions, event, reply=found is not person)
            if echo:
                session.output.send(event)

    def send_private(self, session: Session, nick: str, text: str, client_tags: ClientTags = (),
                     notice: bool = False) -> None:
        """TEXT to NICK alone, on every session of theirs; SESSION gets a copy (its person's other sessions
        too), and the away message if there is one.

        To a registered account that is offline, the message is kept for its
        next sign-in. A NOTICE (which no program answers) is neither kept nor
        answered with the away message.
        """
        person = session.person
        with self.lock:
            person.last_spoke = time.monotonic()
            target = self.people.get(name_key(normal_name(nick)))
        if target is None:
            if notice:
                raise Refused(f"No one called {nick} is online.", "no-such-person", nick=nick)
            self.leave_offline_message(session, nick, text)
            return
        with self.lock:
            if self.people.get(target.key) is not target:
                raise Refused(f"{target.nick} has just left.")
            guest = person.account is None or target.account is None
            conversation = private_target(person.identity, target.identity, guest)
            for someone in (person, target):
                if someone.account is None:
                    someone.conversations |= {conversation}
            heeded = person.key not in target.ignoring
            # A line to someone who ignores its sender is kept no more than one left for them offline is:
            # it would come back at their next sign-in.
            line_id = "" if not heeded else self._keep_private(person, conversation, text, notice,
                                                               target.account if target is not person else None)
            if heeded and target.account and person.account and target is not person:
                target.read.setdefault(conversation, read_before(int(line_id)))     # as _keep_private wrote it
            if heeded:
                # A note to oneself reaches every session as a message from someone, not as a reply.
                self._to_sessions(target.sessions, PrivateFrom(person.nick, text, line_id, client_tags,
                                                               person.account, notice, person.bot),
                                  reply=target is not person)
                if target is not person:
                    target.last_private_from = person.serial
                if target.account:
                    target.last_private[conversation] = int(line_id)
            self._private_copies(session, PrivateTo(target.nick, text, line_id, client_tags, person.account, notice,
                                                    person.bot))
            if target.away_shown and not notice:
                session.output.send(TheyAreAway(target.nick, target.away_shown))

    def _keep_private(self, person: Person, conversation: str, text: str, notice: bool, to_account: str | None) -> str:
        """Keep a private line from PERSON in CONVERSATION (to the account TO_ACCOUNT, or a guest); its id.
        The receiver has not read it, and, if it is the first of the conversation they were sent, it is
        where their read position starts. Lock held."""
        number = self.storage.next_message_id()
        self.storage.add_message(number, time.time(), conversation, person.nick, person.account,
                                 "notice" if notice else "line", text)
        if person.account:
            person.last_private[conversation] = number
            self._mark_read(person, conversation, number)
        if to_account and person.account:
            self.storage.mark_read(to_account, conversation, read_before(number), only_if_new=True)
        return str(number)

    def _private_copies(self, session: Session, copy: PrivateTo) -> None:
        """SESSION's copy of a private line it sent, and one for each other session of its person, which shows
        it as sent even where the client shows only what it sent itself (IRC without echo-message)."""
        session.output.send(copy)
        self._to_sessions([s for s in session.person.sessions if s is not session], copy._replace(elsewhere=True))

    def leave_offline_message(self, session: Session, nick: str, text: str) -> None:
        """Keep TEXT for the offline account NICK, unless its owner ignores the sender (who is told it was
        kept either way, as an ignored sender online sees their copy). From another account it is a line of
        their conversation, shown at the next sign-in with the others (_catch_up_private); from a guest,
        or without history, an offline message within its quotas."""
        person = session.person
        registered = self.storage.account_name(normal_name(nick))
        if registered is None:
            raise Refused(f"No one called {nick} is online. /online lists who is.", "no-such-person", nick=nick)
        if person.account and self.storage.keeps_history:
            conversation = private_target(person.identity, name_key(registered), False)
            with self.lock:
                if person.key in self.storage.ignoring(registered):
                    line_id = ""
                else:
                    line_id = self._keep_private(person, conversation, text, False, registered)
                self._private_copies(session, PrivateTo(registered, text, line_id, (), person.account))
        else:
            if person.key not in self.storage.ignoring(registered):
                with refused_on(StoreFull, StorageError):
                    sender = f"account:{name_key(person.account)}" if person.account else \
                        f"address:{address_bucket(session.address)}"
                    self.storage.leave_offline(person.nick, sender, registered, text)
            session.output.send(PrivateTo(registered, text))
        session.output.send(Reply(f"{registered} is offline; the message is kept for them and shown when they "
                                  "next sign in."))

    # -- what a person has read ---------------------------------------------------------

    def mark_read(self, session: Session, name: str | None = None, line_id: int | None = None) -> None:
        """SESSION's person has read NAME ('#room' or a nickname; SESSION's current room if None) up to the
        line LINE_ID (never later than now) or, without one, all that was said there. A read position only
        moves forward: when it moves, every session of theirs is told where it is; SESSION is told anyway.
        An account's is kept; a guest's lasts while they are here."""
        person = session.person
        if name is None:
            with self.lock:
                name = f"#{self._current_room(session).name}"
        target, shown = self.conversation(person, name)
        with self.lock:
            session.reports_reading = True
            if line_id is not None:
                number = min(line_id, Storage.message_id_at(time.time()))
            elif target.startswith("#"):
                room = self.rooms.get(target[1:])
                number = self._last_line_of(room) if room is not None else 0
            else:
                number = person.last_private.get(target, 0)
                if not number and self.storage.keeps_history:
                    latest = self.storage.latest_messages(target, 1)
                    number = latest[0].id if latest else 0
            moved = bool(number) and self._mark_read(person, target, number)
            position = person.read.get(target)
            if position:
                self._to_sessions(person.sessions if moved else [session], ReadUpTo(shown, position))

    def _read_until_now(self, person: Person, room: Room) -> None:
        """PERSON, who has just come into ROOM (or made it their account's), has read it until now: only what
        is said from now on is new to them; what they were shown of its past is history. Lock held."""
        self._mark_read(person, room_target(room.name),
                        max(self._last_line_of(room), self.storage.message_id_at(time.time())))

    def _mark_read(self, person: Person, target: str, number: int) -> bool:
        """Move PERSON's read position in TARGET forward to the line NUMBER; False if it was there already.
        An account's is written (with the next chat lines); a guest's is kept only while they are here.
        Lock held."""
        if target in person.read and number <= person.read[target]:
            return False
        if person.read is NO_POSITIONS:
            person.read = {}
        person.read[target] = number
        if person.account:
            self.storage.mark_read(person.account, target, number)
        return True

    def history(self, session: Session, name: str | None = None, count: int = HISTORY_PAGE) -> int:
        """Show SESSION the COUNT lines of the room NAME (its current one if None), or of its person's private
        conversation with the nick NAME, before the oldest it has been shown; how many there were."""
        person = session.person
        count = max(1, min(count, MAX_HISTORY_PAGE))
        if name is not None and not name.startswith("#"):
            target, shown = self.conversation(person, name)
        with self.lock:
            if name is None or name.startswith("#"):
                room = self._member_room(session, name)
                if room.private:
                    raise Refused(f"#{room.name} is private: what is said in it is not kept.")
                target, where = room_target(room.name), {"room": room.name}
                tagged = room is not session.current
            else:
                where, tagged = {"nick": shown}, False
            before = (session.oldest_shown or {}).get(target, self.storage.newest_id + 1)
            lines = self.storage.messages_before(target, before, count) if self.storage.keeps_history else []
            if not lines:
                return 0
            session.shown_from(target, lines[0].id)
            other = where.get("nick")
            events = [Replayed(m.when, chat_event(room.name, m) if other is None else
                               self._private_event(m, person, other)) for m in lines]
            for event in [HistoryPage(len(lines), **where), *events, HistoryEnd(where.get("room"), other)]:
                session.output.send(event, tagged)
            return len(lines)

    def last_private_sender(self, session: Session) -> str:
        """The nickname of the last person who sent PERSON a private message, if they are still here."""
        person = session.person
        with self.lock:
            if person.last_private_from is None:
                raise Refused("No one has sent you a private message yet.")
            sender = self.by_serial.get(person.last_private_from)
            if sender is None:
                raise Refused("The last person who sent you a private message has left.")
            return sender.nick

    # -- about a person: told once to everyone who shares a room with them ---------------

    def rename(self, session: Session, new_nick: str) -> None:
        """Change PERSON's nickname, by the same rules as signing in."""
        person = session.person
        new_nick = normal_name(new_nick)
        with self.lock:
            self._present(person)
            if person.muted:
                raise Refused("You are muted; you cannot change your nickname.")
            problem = self.nickname_problem(new_nick, person)
            if problem:
                raise Refused(problem, "nickname-taken", nick=new_nick)
            if new_nick == person.nick:
                raise Refused(f"You are already {new_nick}.", "same-nickname", nick=new_nick)
            old_nick, old_key, new_key = person.nick, person.key, name_key(new_nick)
            self.departed.append(Departed(old_nick, old_key, person.account, person.realname, time.time(),
                                          person.username))
            del self.people[old_key]
            person.nick, person.key = new_nick, new_key
            self.people[new_key] = person
            for someone in self.ignorers.pop(old_key, ()):       # an ignore follows the person
                someone.ignoring = someone.ignoring - {old_key} | {new_key}
                self._count_ignorer(new_key, someone, True)
            self._to_people(self._with_sharers(person), Renamed(old_nick, new_nick))
            if new_key != old_key:      # a new spelling of the same name neither leaves nor comes
                self._to_people(self.watchers.get(old_key, ()), WentOffline(old_nick))
                self._to_people(self.watchers.get(new_key, ()), CameOnline(new_nick))
        log.info("%s@%s is now known as %s", old_nick, person.address, new_nick)

    def set_realname(self, session: Session, realname: str) -> None:
        """Give PERSON a new real name; those who share a room with them are told. Not while muted: it is
        their own words."""
        person = session.person
        with self.lock:
            if person.muted:
                raise Refused("You are muted; you cannot change your real name.")
            person.realname = realname
            self._to_people(self._with_sharers(person), RealnameChanged(person.nick, realname))

    def set_modes(self, session: Session, bot: bool | None = None, invisible: bool | None = None) -> None:
        """Mark PERSON as a program (a bot or a bridge), or not; as invisible to searches by those who share
        no room with them, or not. None leaves a mode as it is."""
        person = session.person
        with self.lock:
            person.bot = person.bot if bot is None else bot
            person.invisible = person.invisible if invisible is None else invisible

    def message_operators(self, session: Session, text: str) -> None:
        """TEXT from PERSON, an operator of the server, to every operator of it (PERSON too)."""
        person = session.person
        with self.lock:
            self._present(person)
            if not person.operator:
                raise Refused("Only operators of the server may do that.", "not-server-operator")
            self._to_people([p for p in self.people.values() if p.operator], OperatorsMessage(person.nick, text))

    def set_away(self, session: Session, reason: str | None) -> None:
        """Mark PERSON away with REASON, or back with None; the people who share a room with them are told."""
        person = session.person
        with self.lock:
            if reason is None and person.away is None:
                raise Refused("You are not away.")
            person.away = reason
            if not person.muted:
                self._to_people(self._with_sharers(person) - {person}, AwayChanged(person.nick, reason))

    def change_protocol(self, session: Session, protocol: PyChatProtocol, first: bytes = b"") -> None:
        """Render what SESSION is sent with PROTOCOL from now on (an IRC client enabled a capability), after
        FIRST, which says so. Every room regroups them, so that no line to them is rendered the old way
        once FIRST is queued."""
        person = session.person
        with self.lock:
            session.output.send_bytes(first)
            for room in person.rooms.values():
                room.stop_hearing(session)
            session.output.protocol = protocol
            for room in person.rooms.values():
                room.hear(session, current=room is session.current)

    @staticmethod
    def _end_sessions(sessions: Iterable[Session], why: str, farewell: Any) -> None:
        """End each of SESSIONS for WHY, telling it FAREWELL."""
        for session in list(sessions):
            session.output.end(why, farewell)

    @staticmethod
    def _with_sharers(person: Person) -> set[Person]:
        """PERSON and everyone who shares at least one room with them. Lock held."""
        return {person}.union(*(room.members for room in person.rooms.values()))

    def watch(self, session: Session, nicks: list[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
        """Tell PERSON from now on whenever each of NICKS signs in or leaves (IRC's MONITOR), up to WATCH_LIMIT
        names. Returns each name now watched with who has it (their nickname, or None when no one
        does), and the names past the limit, which are not watched."""
        person = session.person
        watched, refused = [], []
        with self.lock:
            self._present(person)
            for nick in nicks:
                if len(nick) > MAX_NICKNAME_LENGTH:
                    continue            # no one's, and not worth normalising
                key = name_key(normal_name(nick))
                if key not in person.watching and len(person.watching) >= WATCH_LIMIT:
                    refused.append(nick)
                    continue
                person.watching.setdefault(key, nick)
                self.watchers.setdefault(key, set()).add(person)
                found = self.people.get(key)
                watched.append((nick, found.nick if found else None))
        return watched, refused

    def stop_watching(self, session: Session, nicks: list[str] | None = None) -> None:
        """Stop watching NICKS, or every name PERSON watches."""
        person = session.person
        with self.lock:
            keys = (list(person.watching) if nicks is None else
                    [name_key(normal_name(nick)) for nick in nicks if len(nick) <= MAX_NICKNAME_LENGTH])
            self._stop_watching(person, keys)

    def _stop_watching(self, person: Person, keys: list[str]) -> None:
        """Lock held."""
        for key in keys:
            if person.watching.pop(key, None) is not None:
                watchers = self.watchers[key]
                watchers.discard(person)
                if not watchers:
                    del self.watchers[key]

    def watched(self, session: Session) -> list[tuple[str, str | None]]:
        """The names PERSON watches, as asked, each with who has it now (or None)."""
        person = session.person
        with self.lock:
            return [(asked, self.people[key].nick if key in self.people else None)
                    for key, asked in person.watching.items()]

    def ignore(self, session: Session, nick: str, ignoring: bool = True) -> str:
        """Stop (or start again) showing PERSON NICK's lines; returns NICK as they spell it.

        An account keeps the list, so that it applies to messages left while its owner is offline.
        """
        person = session.person
        with self.lock:
            self._present(person)
            target = self._find(nick)
            if target is person:
                raise Refused("You cannot ignore yourself.")
            if ignoring and target.key not in person.ignoring:
                person.ignoring |= {target.key}
                self._count_ignorer(target.key, person, True)
            elif not ignoring and target.key in person.ignoring:
                person.ignoring -= {target.key}
                self._count_ignorer(target.key, person, False)
            elif not ignoring:
                raise Refused(f"You are not ignoring {target.nick}.")
            account, keys = person.account, list(person.ignoring)
        if account:
            try:
                self.storage.set_ignoring(account, keys)
            except (StoreFull, StorageError) as problem:
                log.error("could not keep %s's /ignore list: %s", account, problem)
        return target.nick

    def ignored_by(self, session: Session) -> list[str]:
        """Nicknames PERSON ignores that are online now."""
        person = session.person
        with self.lock:
            return sorted((self.people[key].nick for key in person.ignoring if key in self.people),
                          key=str.casefold)

    def _count_ignorer(self, key: str, ignorer: Person, ignoring: bool) -> None:
        """Keep who ignores KEY, so that lines from everyone else skip the check and a rename costs only
        its ignorers. Lock held."""
        if ignoring:
            self.ignorers.setdefault(key, set()).add(ignorer)
        elif key in self.ignorers:
            self.ignorers[key].discard(ignorer)
            if not self.ignorers[key]:
                del self.ignorers[key]

    # -- operators of the server -----------------------------------------------------------

    def become_operator(self, session: Session, secret: str) -> None:
        """Make PERSON a server operator if SECRET is the server's operator password.

        Three wrong tries close the connection; an address that tried too often must wait.
        """
        person = session.person
        expected = self.options.op_password
        if not expected:
            raise Refused("This server has no operator password, so no one can be an operator.")
        try:
            right = self.gate.check_secret(session, "operator password", lambda: same_secret(secret, expected))
        except TooManyGuesses as refusal:
            session.output.end("too many wrong operator passwords from the address", Farewell(str(refusal)))
            raise Refused(f"{refusal}. Closing the connection.") from None
        if not right:
            session.operator_failures += 1
            if session.operator_failures >= OPERATOR_TRIES:
                session.output.end("too many wrong operator passwords",
                                   Farewell(f"{OPERATOR_TRIES} wrong operator passwords"))
                raise Refused(f"Wrong operator password, {OPERATOR_TRIES} times: closing the connection.")
            raise Refused("Wrong operator password.")
        with self.lock:
            person.operator = True
        log.warning("%r is now an operator", person)

    def disconnect(self, session: Session, nick: str, reason: str | None) -> str:
        """Close NICK's connection, telling them and their rooms who did it and why."""
        by = session.person
        with self.lock:
            target = self._find(nick)
        why = f"disconnected by {by.nick}" + _because(reason)
        self._end_sessions(target.sessions, why, DisconnectedBy(by.nick, reason))
        log.warning("%r %s", target, why)
        return target.nick

    def quit(self, session: Session, message: str | None) -> None:
        """SESSION's connection closes once its output is sent; with the last of its person's, they leave the
        chat, with MESSAGE for the rooms."""
        person = session.person
        if session.output.end(message or QUIT, Bye()):
            with self.lock:
                person.quit_message = message is not None

    # -- accounts -------------------------------------------------------------------------
    # Hashing a password and writing to the data directory are slow: they happen outside the lock.

    def register_account(self, session: Session, password: str) -> str:
        """Make PERSON's nickname their account, with PASSWORD."""
        person = session.person
        if person.account:
            raise Refused(f"You are signed in to the account {person.account} already; "
                          "/passwd OLD NEW changes its password.")
        nick = person.nick
        self.gate.register(nick, password, session.address)
        with self.lock:
            person.account = nick
            person.read, person.last_private = {}, {}
            self.by_account[name_key(nick)] = person
            for room in sorted(person.rooms.values(), key=lambda room: room is person.last_room):
                self.storage.keep_room(nick, room.name, room.password)     # their rooms are the account's
                self._read_until_now(person, room)
            person.mute = self.storage.mute_for(nick, session.address, time.time())
            made_operator = not person.operator and self.storage.is_operator(nick)
            person.operator = person.operator or made_operator
            keys = list(person.ignoring)
            self._to_people(self._with_sharers(person), AccountChanged(person.nick, nick))
        if keys:
            self.storage.set_ignoring(nick, keys)
        if made_operator:
            session.output.send(Notice("You are an operator of this server."))
        lasting = "" if self.storage.directory else \
            " This server keeps no data directory: the account lasts until it stops."
        return (f"Registered {nick}. From now on, signing in as {nick} (or a name that looks like it) "
                f"asks for this password.{lasting}")

    def _check_own_password(self, session: Session, password: str) -> str:
        """SESSION's person's account, if PASSWORD is its password; refused (as a wrong guess) otherwise."""
        person = session.person
        account = person.account
        if account is None:
            raise Refused(f"You are a guest: /register PASSWORD makes {person.nick} your account.")
        try:
            right = self.gate.check_secret(session, f"password for {account}",
                                      lambda: self.storage.verify_password(account, password))
        except TooManyGuesses as refusal:
            raise Refused(f"{refusal}.") from None
        if not right:
            raise Refused(f"Wrong password for {account}.")
        return account

    def change_password(self, session: Session, old: str, new: str) -> None:
        person = session.person
        if person.account is not None:
            problem = password_problem(new, person.account)
            if problem:
                raise Refused(problem)
        account = self._check_own_password(session, old)
        with refused_on(StoreFull, StorageError):
            self.storage.set_password(account, new)
        log.info("%r changed the password of %s", person, account)

    def unregister(self, session: Session, password: str) -> str:
        """Give up PERSON's account; on a --private server that also ends their connection."""
        person = session.person
        account = self._check_own_password(session, password)
        was_operator = self.storage.is_operator(account)
        if was_operator and len(self.storage.operator_names()) == 1:
            raise Refused(f"{account} is the last operator; make another with /oper add first.")
        with refused_on(StorageError):
            self.storage.remove_account(account)
        with self.lock:
            self.by_account.pop(name_key(account), None)
            person.account = None
            person.read, person.last_private = NO_POSITIONS, NO_POSITIONS     # a guest's: none
            person.operator = person.operator and not was_operator
            self._to_people(self._with_sharers(person), AccountChanged(person.nick, None))
        log.info("%r gave up the account %s", person, account)
        if self.options.private:
            self._end_sessions(person.sessions, "gave up their account",
                               Farewell("this server is private, and you have no account now"))
        return f"{account} is no longer registered; anyone may use the name."

    def invite_account(self, session: Session, nick: str) -> str:
        """A one-time code that lets NICK into a --private server and choose their password."""
        by = session.person
        nick = normal_name(nick)
        if not self.options.private:
            raise Refused("This server is not private: anyone may sign in and /register. (--private changes that.)")
        problem = name_problem(nick)
        if problem:
            raise Refused(problem)
        registered = self.storage.account_name(nick)
        if registered is not None:
            raise Refused(f"{registered} has an account already.")
        with refused_on(StoreFull, StorageError):
            code = self.storage.invite(nick, by.nick)
        log.warning("%r invited %s", by, nick)
        return (f"Invitation for {nick}: {code} (it works once, for {INVITATION_SECONDS // 86400} days). "
                f"They sign in as {nick} and give it when asked.")

    def remove_account(self, session: Session, nick: str) -> str:
        """Take NICK's account (or invitation) away; on a --private server they are disconnected."""
        by = session.person
        registered = self.storage.account_name(nick)
        if registered is None:
            if self.storage.remove_invitation(nick):
                return f"Removed the invitation for {nick}."
            raise Refused(f"{nick} has no account and no invitation.")
        if self.storage.is_operator(registered):
            raise Refused(f"{registered} is an operator; /oper remove {registered} first.")
        with refused_on(StorageError):
            self.storage.remove_account(registered)
        with self.lock:
            owner = self.by_account.pop(name_key(registered), None)
            if owner is not None:
                owner.account = None
                owner.read, owner.last_private = NO_POSITIONS, NO_POSITIONS
                if not self.options.private:
                    self._to_people([owner], Notice(f"{by.nick} removed your account; you are a guest now."))
                    self._to_people(self._with_sharers(owner), AccountChanged(owner.nick, None))
        if owner is not None and self.options.private:
            self._end_sessions(owner.sessions, f"account removed by {by.nick}",
                               DisconnectedBy(by.nick, "your account was removed"))
        log.warning("%r removed the account %s", by, registered)
        return f"Removed the account {registered}."

    # -- operators by account ---------------------------------------------------------------

    def operator_names(self) -> list[str]:
        return self.storage.operator_names()

    def set_operator(self, session: Session, nick: str, operator: bool) -> str:
        """Make the account NICK an operator of the server, or no longer one; whoever is signed in to it is told."""
        by = session.person
        registered = self.storage.account_name(nick)
        if registered is None:
            raise Refused(f"{nick} is not a registered account.")
        if operator == self.storage.is_operator(registered):
            raise Refused(f"{registered} is {'already' if operator else 'not'} an operator.")
        if not operator and len(self.storage.operator_names()) == 1:
            raise Refused(f"{registered} is the last operator; make another with /oper add first.")
        with refused_on(StoreFull, StorageError):
            if operator:
                self.storage.add_operator(registered, by.nick)
            else:
                self.storage.remove_operator(registered)
        with self.lock:
            person = self.by_account.get(name_key(registered))
            if person is not None:
                person.operator = operator
                self._to_people([person], Notice(f"{by.nick} made you an operator of this server." if operator
                                                 else f"{by.nick} took away your operator rights."))
        log.warning("%r %s %s", by, "made an operator:" if operator else "took operator rights from", registered)
        return (f"{registered} is now an operator of the server." if operator
                else f"{registered} is no longer an operator of the server.")

    # -- bans ---------------------------------------------------------------------------------

    # Bans and mutes are rules of one shape (Ban) on an account, an address or a network, kept by the
    # storage; what a nickname names, durations and reasons are read here once for both.

    @staticmethod
    def _rule_seconds(duration: str | None, reason: str | None) -> float | None:
        """The seconds of a ban's or mute's DURATION (None: until lifted), once its REASON is checked too."""
        with refused_on(ValueError):
            seconds = parse_duration(duration) if duration else None
        if reason is not None and len(reason) > MAX_REASON_LENGTH:
            raise Refused(f"The reason is too long (at most {MAX_REASON_LENGTH} characters).")
        return seconds

    def ban(self, session: Session, target: str, duration: str | None, reason: str | None) -> str:
        """Ban TARGET (a nickname, an address or a network) for DURATION (None: permanently), disconnecting
        whoever it keeps out."""
        by = session.person
        now = time.time()
        seconds = self._rule_seconds(duration, reason)
        with refused_on(ValueError):
            found = ban_target(target)
        with self.lock:
            if found is None:
                kind, value, shown, what = self._rule_of_nick(session, target, "ban")
            else:
                (kind, value), shown = found, found[1]
                what = f"the {kind} {value}"
                network = ipaddress.ip_network(value)
                if self._banned_by(network, session.address):
                    raise Refused(f"That would ban you too: you connect from {ip_of(session.address)}.")
            ban = Ban(kind, value, shown, reason, by.nick, now, None if seconds is None else now + seconds)
            self._spare_operators(ban, "ban")
        with refused_on(StoreFull, StorageError):
            self.storage.ban(ban)
        with self.lock:
            self.bans_made += 1
            banned = [person for person in self.people.values() if self._applies(ban, person)]
            ended = [s for person in banned for s in person.sessions if self._applies(ban, person, s.address)]
        how_long = ban.how_long(time.time())
        self._end_sessions(ended, f"banned by {by.nick}" + _because(reason),
                           Banned(by.nick, how_long, reason))
        log.warning("%r banned %s %s%s", by, what, how_long, _because(reason))
        return (f"Banned {what} " + (f"for {describe_duration(seconds)}" if seconds else "permanently")
                + _because(reason) + "."
                + (f" Disconnected {', '.join(p.nick for p in banned)}." if banned else ""))

    def _rule_of_nick(self, session: Session, nick: str, verb: str) -> tuple[str, str, str, str]:
        """What banning or muting (VERB) the nickname NICK holds for: its account, or the address of the guest
        using it; as (kind, target, shown, words for the reply). Lock held."""
        by = session.person
        registered = self.storage.account_name(normal_name(nick))
        online = self.people.get(name_key(normal_name(nick))) if registered is None else None
        if registered is not None:
            if by.account and name_key(by.account) == name_key(registered) or by.key == name_key(registered):
                raise Refused(f"You cannot {verb} yourself.")
            if self.storage.is_operator(registered):
                raise Refused(f"{registered} is an operator; /oper remove {registered} first.")
            return "account", name_key(registered), registered, f"the account {registered}"
        if online is None:
            raise Refused(f"No one called {nick} is online, and no account has that name"
                          + ("; ban an address or a network instead." if verb == "ban" else "."))
        if online is by:
            raise Refused(f"You cannot {verb} yourself.")
        address = str(ip_of(online.address))
        if ip_of(session.address) == ip_of(online.address):
            raise Refused(f"That would {verb} you too: you connect from {address}.")
        return "address", address, f"{address} ({online.nick})", f"{online.nick}'s address {address}"

    def _spare_operators(self, rule: Ban, verb: str) -> None:
        """Refuse a ban or mute (VERB) that would hold for an operator of the server online. Lock held."""
        for person in self.people.values():
            if self._applies(rule, person) and person.operator:
                raise Refused(f"That would {verb} {person.nick}, an operator of the server.")

    @staticmethod
    def _banned_by(network: ipaddress.IPv4Network | ipaddress.IPv6Network, address: str) -> bool:
        ip = ip_of(address)
        return ip is not None and ip.version == network.version and ip in network

    def _mute_of(self, person: Person, now: float) -> Ban | None:
        """The mute in force for PERSON: of their account, or of the address of any session of theirs (the one
        that lasts longest, if several), as mute() finds whom a new one holds for. Lock held."""
        found = [self.storage.mute_for(person.account, session.address, now) for session in person.sessions]
        return max((mute for mute in found if mute is not None),
                   key=lambda mute: math.inf if mute.expires is None else mute.expires, default=None)

    def _applies(self, rule: Ban, person: Person, address: str | None = None) -> bool:
        """Whether the ban or mute RULE holds for PERSON: for their account, or for one of their sessions'
        addresses (ADDRESS alone, if given). Lock held."""
        if rule.kind == "account":
            return person.account is not None and name_key(person.account) == rule.target
        network = ipaddress.ip_network(rule.target)
        return any(self._banned_by(network, a) for a in ([address] if address else
                                                           [s.address for s in person.sessions]))

    @staticmethod
    def _rule_key(target: str, rules: list[Ban]) -> str:
        """The key of the ban or mute TARGET names: an address, a network, an account, or a guest's nickname
        as /bans and /mutes show it ("ADDRESS (NICK)")."""
        with refused_on(ValueError):
            found = ban_target(target)
        if found is not None:
            return f"{found[0]}:{found[1]}"
        key = f"account:{name_key(normal_name(target))}"
        if any(rule.key == key for rule in rules):
            return key
        return next((rule.key for rule in rules if rule.shown.lower().endswith(f"({target.lower()})")), key)

    @staticmethod
    def _rule_lines(rules: list[Ban]) -> list[str]:
        now = time.time()
        return [f"{rule.kind} {rule.shown} by {rule.by}, {rule.how_long(now)}" + _because(rule.reason)
                for rule in rules]

    def unban(self, session: Session, target: str) -> str:
        """Lift the ban on TARGET: an address, a network, an account, or a guest's nickname as /bans shows it."""
        by = session.person
        with refused_on(StorageError):
            lifted = self.storage.lift_ban(self._rule_key(target, self.storage.bans(time.time())))
        if lifted is None:
            raise Refused(f"There is no ban on {target}. /bans lists them.")
        log.warning("%r lifted the ban on %s %s", by, lifted.kind, lifted.shown)
        return f"Lifted the ban on the {lifted.kind} {lifted.shown}."

    def ban_lines(self) -> list[str]:
        with refused_on(StorageError):
            return self._rule_lines(self.storage.bans(time.time()))

    # -- mutes: a person who reads but puts no words in front of others ------------------------------
    # A mute lasts like a ban and holds at every door: sign_in() looks for one, mute() and unmute() change
    # those online it holds for, and Person.muted lets it lapse when its time is up.

    def mute(self, session: Session, nick: str, duration: str | None, reason: str | None) -> str:
        """Mute NICK's account (a guest: their address) for DURATION (None: until /unmute)."""
        by = session.person
        now = time.time()
        seconds = self._rule_seconds(duration, reason)
        with self.lock:
            kind, value, shown, what = self._rule_of_nick(session, nick, "mute")
            mute = Ban(kind, value, shown, reason, by.nick, now, None if seconds is None else now + seconds)
            self._spare_operators(mute, "mute")
        with refused_on(StoreFull, StorageError):
            self.storage.mute(mute)
        with self.lock:
            muted = [person for person in self.people.values() if self._applies(mute, person)]
            for person in muted:
                person.mute = mute
            self._to_people(muted, Notice(f"You were muted by {by.nick} {mute.how_long(time.time())}"
                                          f"{_because(reason)}."))
        log.warning("%r muted %s %s%s", by, what, mute.how_long(now), _because(reason))
        return (f"Muted {what} " + (f"for {describe_duration(seconds)}" if seconds else "until /unmute")
                + _because(reason) + ".")

    def unmute(self, session: Session, target: str) -> str:
        """Lift the mute on TARGET: an account, or a guest's nickname or address as /mutes shows it."""
        by = session.person
        now = time.time()
        with refused_on(StorageError):
            lifted = self.storage.lift_mute(self._rule_key(target, self.storage.mutes(now)))
        if lifted is None:
            raise Refused(f"{target} is not muted. /mutes lists who is.")
        with self.lock:
            for person in self.people.values():
                if self._applies(lifted, person):
                    person.mute = self._mute_of(person, now)
                    if person.mute is None:
                        self._to_people([person], Notice(f"You were unmuted by {by.nick}."))
        log.warning("%r lifted the mute on %s %s", by, lifted.kind, lifted.shown)
        return f"Unmuted the {lifted.kind} {lifted.shown}."

    def mute_lines(self) -> list[str]:
        with refused_on(StorageError):
            return self._rule_lines(self.storage.mutes(time.time()))

    # -- an admin's lists: accounts and invitations ------------------------------------------------

    def account_list(self, session: Session, pattern: str | None) -> tuple[list[commands.AccountInfo], int]:
        """The accounts whose name fits PATTERN (a name, or * for any letters and ? for one), at most
        ACCOUNTS_LISTED of them, and how many fit in all."""
        viewer = session.person
        now = time.time()
        accounts = self.storage.accounts()
        if pattern is not None:
            wanted = re.sub(r"\*+", "*", pattern.casefold())
            if any(wild in wanted for wild in "*?"):
                accounts = [a for a in accounts if fits_pattern(wanted, a.name.casefold())]
            else:
                accounts = [a for a in accounts if name_key(a.name) == name_key(normal_name(pattern))]
        shown = accounts[:ACCOUNTS_LISTED]
        operators = {name_key(name) for name in self.storage.operator_names()}
        bans = {ban.target: ban for ban in self.storage.bans(now) if ban.kind == "account"}
        with self.lock:
            self._charge(viewer, len(shown), "/accounts")
            online = {name_key(p.account) for p in self.people.values() if p.account}
        return [commands.AccountInfo(
            a.name, utc_text(a.since), utc_text(a.last_seen) if a.last_seen else None, name_key(a.name) in online,
            name_key(a.name) in operators,
            bans[name_key(a.name)].how_long(now) if name_key(a.name) in bans else None) for a in shown], len(accounts)

    def invitation_list(self) -> list[commands.InvitationInfo]:
        now = time.time()
        return [commands.InvitationInfo(i.name, i.purpose == "password", i.by, utc_text(i.expires),
                                        describe_duration(i.expires - now)) for i in self.storage.invitations(now)]

    def cancel_invitation(self, session: Session, nick: str) -> str:
        """Let NICK's invitation, or the password reset waiting for their account, go unused."""
        by = session.person
        with refused_on(StorageError):
            purpose = self.storage.remove_invitation(normal_name(nick))
        if purpose is None:
            raise Refused(f"No invitation is waiting for {nick}. /invitations lists them.")
        what = "password reset" if purpose == "password" else "invitation"
        log.warning("%r cancelled the %s for %s", by, what, nick)
        return f"Cancelled the {what} for {nick}."

    def reset_password(self, session: Session, nick: str) -> str:
        """A one-time code that lets the owner of the account NICK choose a new password when they next sign
        in; their password works as before until then."""
        by = session.person
        registered = self.storage.account_name(nick)
        if registered is None:
            raise Refused(f"{nick} has no account.")
        with refused_on(StoreFull, StorageError):
            code = self.storage.invite(registered, by.nick, "password")
        log.warning("%r made a password reset code for %s", by, registered)
        return (f"Password reset for {registered}: {code} (it works once, for {INVITATION_SECONDS // 86400} days). "
                f"They sign in as {registered} with the pyChat client or nc and give it at the password prompt, "
                f"then choose a new password; their old password works until then.")

    # -- knowing who is who ---------------------------------------------------------------------

    def whois(self, session: Session, nick: str) -> commands.PersonDetails:
        """What VIEWER may know about NICK, for /whois; the address only if VIEWER is an operator of the server."""
        found = self.person_details(session, nick)
        if found is None:
            raise Refused(f"No one called {nick} is online. /online lists who is.", "no-such-person", nick=nick)
        return commands.PersonDetails(found.nick, found.account, found.operator, utc_text(found.since),
                                      describe_duration(found.idle), tuple(room for room, _ in found.rooms),
                                      found.away, found.address, found.protocol)

    def server_details(self) -> commands.ServerDetails:
        with self.lock:
            people, rooms = len(self.people), sum(1 for room in self.rooms.values() if room.members)
        return commands.ServerDetails(VERSION, utc_text(self.started), describe_duration(time.time() - self.started),
                                      people, rooms, self.most_people,
                                      "the full-text index" if self.storage.full_text else
                                      f"the newest {SEARCH_SCAN_LINES:,} lines")

    def search(self, session: Session, words: str, name: str | None = None) -> list[commands.FoundLine]:
        """The latest lines holding every word of WORDS that VIEWER may read, in the room NAME or everywhere."""
        viewer = session.person
        with self.lock:
            self._charge(viewer, SEARCH_COST, "/search")
            identity = viewer.identity
        target = room_target(room_name(name)) if name else None
        found = self.storage.search(words, identity, SEARCH_RESULTS, target)
        with self.lock:
            return [commands.FoundLine(utc_text(m.when), "#" + self._shown_room(m.target) if m.target.startswith("#")
                                       else "private", m.nick, m.text, m.kind == "action") for m in found]

    def _shown_room(self, target: str) -> str:
        """The name of the room of TARGET as people spell it, if the server knows it; its key otherwise. Lock
        held."""
        room = self.rooms.get(target[1:])
        return room.name if room is not None else target[1:]

    # -- history and read positions, by conversation: what IRC's CHATHISTORY and MARKREAD ask -----------

    def conversation(self, viewer: Person, name: str, cost: int = 0) -> tuple[str, str]:
        """The message target of NAME ('#room', or a nickname) and its name as the server spells it, if VIEWER
        may read its lines; refused otherwise. A room's lines are for its members; a private conversation is
        for its two people: an account's from any connection, a guest's while the guest is here (README, "who
        can read what"). COST entries of the listing budget are paid for reading it."""
        with self.lock:
            self._present(viewer)
            if cost:
                self._charge(viewer, cost, "History")
            if name.startswith("#"):
                room = viewer.rooms.get(name_key(room_name(name)))
                if room is None:
                    raise Refused(f"You are not in #{room_name(name)}.", "no-such-room", room=room_name(name))
                return room_target(room.name), f"#{room.name}"
            found = self.people.get(name_key(normal_name(name)))
            if found is viewer:
                raise Refused("That is you.", "no-such-person", nick=name)
            if found is not None:
                return (private_target(viewer.identity, found.identity,
                                       viewer.account is None or found.account is None), found.nick)
        registered = self.storage.account_name(normal_name(name))
        if registered is None or name_key(registered) == viewer.identity:
            raise Refused(f"No one called {name} is online. /online lists who is.", "no-such-person", nick=name)
        return private_target(viewer.identity, name_key(registered), viewer.account is None), registered

    def conversations(self, viewer: Person, after: int, before: int, limit: int, newest_first: bool = False,
                      cost: int = 0) -> list[tuple[str, int]]:
        """VIEWER's rooms and private conversations whose latest line has an id between AFTER and BEFORE (both
        left out), each with that id: the LIMIT oldest, oldest first (NEWEST_FIRST: the newest, newest first).
        Rooms are named '#room', conversations by the other person's name; a guest who left is left out.
        COST entries of the listing budget are paid for it."""
        with self.lock:
            self._present(viewer)
            if cost:
                self._charge(viewer, cost, "History")
            rooms = {room_target(room.name): f"#{room.name}" for room in viewer.rooms.values()}
            identity, account = viewer.identity, viewer.account
        # An account's conversations with other accounts are those it has a read position in: the first line
        # of one writes it (send_private).
        kept = [target for target in self.storage.read_positions(account)
                if target.startswith("@") and may_read(target, identity)] if account else []
        latest = self.storage.latest_ids([*rooms, *kept, *self.storage.guest_conversations(identity)])
        chosen = sorted(((last, target) for target, last in latest.items() if after < last < before),
                        reverse=newest_first)[:max(0, limit)]
        found = []
        for last, target in chosen:
            if target in rooms:
                found.append((rooms[target], last))
                continue
            other = [part for part in target[1:].split("\n") if part != identity][:1]
            if not other:
                continue
            if other[0].startswith("guest/"):
                serial = other[0].removeprefix("guest/")
                with self.lock:
                    guest = self.by_serial.get(int(serial)) if serial.isascii() and serial.isdigit() else None
                name = guest.nick if guest is not None and guest.account is None else None
            else:
                name = self.storage.account_name(other[0])
            if name is not None:
                found.append((name, last))
        return found

    @staticmethod
    def read_position(person: Person, target: str) -> int | None:
        """The id of the last line PERSON has read in TARGET (a message target), or None. Asks nothing of
        the storage (an account's positions are read at sign-in), so it may be asked under the lock."""
        return person.read.get(target)

    # -- lists: what commands may know, paid for from each person's listing budget ----------

    def online(self, session: Session) -> list[commands.PersonInfo]:
        """Everyone signed in, sorted by nickname; a private room shows only to its members."""
        viewer = session.person
        with self.lock:
            self._charge(viewer, len(self.people), "/online")
            people = [commands.PersonInfo(p.nick, p.last_room.name if self._may_see(viewer, p.last_room) else None,
                                          p.away_shown, p.operator, p.muted, False)
                      for p in self.people.values()]
        return sorted(people, key=lambda p: p.nick.casefold())

    def room_members(self, session: Session, name: str | None = None) -> tuple[str, list[commands.PersonInfo]]:
        """The room NAME (or VIEWER's current one) and its people, sorted by nickname."""
        viewer = session.person
        with self.lock:
            room = self._current_room(session) if name is None else self._visible_room(viewer, name)
            self._charge(viewer, len(room.members), "/who")
            people = [commands.PersonInfo(p.nick, room.name, p.away_shown, p.operator, p.muted, p in room.operators,
                                          p in room.voiced) for p in room.members]
        return room.name, sorted(people, key=lambda p: p.nick.casefold())

    def room_list(self, session: Session) -> list[commands.RoomInfo]:
        """Every room with people in it that VIEWER may know of, sorted by name."""
        viewer = session.person
        with self.lock:
            rooms = [commands.RoomInfo(r.name, len(r.members), r.topic, r.key in viewer.rooms, r is session.current,
                                       r.private)
                     for r in self.rooms.values() if r.members and self._may_see(viewer, r)]
            self._charge(viewer, len(rooms), "/rooms")      # finding them is cheap: the table is bounded
        return sorted(rooms, key=lambda r: r.name.casefold())

    def is_here(self, nick: str) -> bool:
        """Whether someone is signed in as NICK (or a look-alike)."""
        return name_key(normal_name(nick)) in self.people

    def username_of(self, nick: str) -> str:
        """The user name of NICK!USER@HOST of whoever is called NICK ('~user' for someone who gave none, or no
        one: a line from history by someone gone is theirs too). Asked by IRC's renderings of events, under
        the lock, and of history, without it: one read of a dict."""
        person = self.people.get(name_key(nick))
        return person.username if person is not None else ANONYMOUS_USER

    def rooms_of(self, session: Session) -> list[str]:
        """The rooms PERSON is in, in the order joined."""
        person = session.person
        with self.lock:
            return [room.name for room in person.rooms.values()]

    def person_details(self, session: Session, nick: str) -> Whois | None:
        """What VIEWER may know of NICK (the rooms they may see; the address only if VIEWER is an operator
        of the server), or None if no one is called that."""
        viewer = session.person
        if len(nick) > MAX_NICKNAME_LENGTH:
            return None             # no one's, and not worth normalising
        with self.lock:
            person = self.people.get(name_key(normal_name(nick)))
            if person is None:
                return None
            rooms = tuple((room.name, person in room.operators) for room in person.rooms.values()
                          if self._may_see(viewer, room))
            address = str(ip_of(person.address) or person.address) if viewer.operator else None
            return Whois(person.nick, person.account, rooms, person.away_shown, person.operator, person.since,
                         time.monotonic() - person.last_spoke, self._protocols(person), address, person.bot,
                         person.realname, person.username)

    @staticmethod
    def _protocols(person: Person) -> str:
        """How PERSON is connected, as others may know it: the protocols, and how many sessions."""
        names = sorted({session.output.protocol.name for session in person.sessions})
        count = len(person.sessions)
        return ", ".join(names) + (f" ({count} sessions)" if count > 1 else "")

    def sessions(self, session: Session) -> list[commands.SessionInfo]:
        """SESSION's person's sessions, by number: how each is connected, since when, and idle how long."""
        now = time.monotonic()
        with self.lock:
            return [commands.SessionInfo(s.number, s.output.protocol.name, s.address, utc_text(s.since),
                                         describe_duration(now - s.output.reader.last_active), s is session)
                    for s in session.person.sessions]

    def end_session(self, session: Session, number: int) -> str:
        """End the session NUMBER of SESSION's person (a stale connection on another device)."""
        with self.lock:
            ending = next((s for s in session.person.sessions if s.number == number), None)
        if ending is None:
            raise Refused(f"You have no session {number}; /sessions lists them.")
        if ending is session:
            raise Refused("That is this session; /quit ends it.")
        ending.output.end(f"ended from session {session.number}", DisconnectedBy(session.person.nick,
                                                                               "ended from another session"))
        return f"Ended session {number} ({ending.output.protocol.name} at {ending.address})."

    def who(self, session: Session, mask: str) -> list[WhoEntry]:
        """The people of the room '#ROOM', or those whose nickname fits MASK (a nickname, or a pattern in
        which * stands for any letters and ? for one), as VIEWER may know them, sorted by nickname. A
        pattern leaves out the invisible who share no room with VIEWER; a nickname finds them. A pattern is
        paid for by the people it is matched against, not by the few it finds: the search is the cost."""
        viewer = session.person
        if mask.startswith("#"):
            with self.lock:
                room = self._visible_room(viewer, mask)
                self._charge(viewer, len(room.members), "WHO")
                found = [self._who_entry(p, room) for p in room.members]
        elif not any(wild in mask for wild in "*?"):
            if len(mask) > MAX_NICKNAME_LENGTH:
                return []               # no one's, and not worth normalising
            key = name_key(normal_name(mask))
            with self.lock:
                person = self.people.get(key)
                found = [self._who_entry(person, self._first_visible_room(viewer, person))] if person else []
        else:
            pattern = re.sub(r"\*+", "*", mask.casefold())
            if len(pattern.replace("*", "")) > MAX_NICKNAME_LENGTH:
                return []               # more letters than any nickname has
            with self.lock:
                self._charge(viewer, len(self.people), "WHO with a pattern (matched against everyone online)")
                everyone = list(self.people.values())
            # Matched outside the lock, which a mask against thousands of names would hold too long.
            fitting = [p for p in everyone if fits_pattern(pattern, p.nick.casefold())]
            with self.lock:
                people = [p for p in fitting if self.people.get(p.key) is p         # still here
                          and (not p.invisible or p is viewer or viewer.operator
                               or not viewer.rooms.keys().isdisjoint(p.rooms))]
                found = [self._who_entry(p, self._first_visible_room(viewer, p)) for p in people]
        return sorted(found, key=lambda entry: entry.nick.casefold())

    def _first_visible_room(self, viewer: Person, person: Person) -> Room | None:
        return next((room for room in person.rooms.values() if self._may_see(viewer, room)), None)

    @staticmethod
    def _who_entry(person: Person, room: Room | None) -> WhoEntry:
        return WhoEntry(person.nick, room.name if room else None, person.account, person.realname,
                        person.away_shown is not None,
                        person.operator, room is not None and person in room.operators,
                        time.monotonic() - person.last_spoke, person.bot, room is not None and person in room.voiced,
                        person.username)

    def whowas(self, nick: str, most: int = 0) -> list[Departed]:
        """Who went by NICK lately (or by a look-alike of it), newest first; at most MOST of them (0: all kept)."""
        if len(nick) > MAX_NICKNAME_LENGTH:
            return []
        key = name_key(normal_name(nick))
        with self.lock:
            found = [gone for gone in reversed(self.departed) if gone.key == key]
        return found[:most] if most > 0 else found

    def look_up(self, nicks: list[str]) -> list[commands.PersonInfo | None]:
        """Each of NICKS (a few) as a PersonInfo if they are online, else None."""
        keys = [name_key(normal_name(nick)) for nick in nicks
                if len(nick) <= MAX_NICKNAME_LENGTH]        # longer is no one's, and not worth normalising
        with self.lock:
            found = [self.people.get(key) for key in keys]
            return [commands.PersonInfo(p.nick, None, p.away_shown, p.operator, p.muted, False) if p else None
                    for p in found]

    def counts(self) -> tuple[int, int, int, int, int]:
        """People signed in, how many are operators, connections still signing in, rooms with people, and
        how many of the people are invisible."""
        with self.lock:
            people = len(self.people)
            return (people, sum(p.operator for p in self.people.values()), len(self.connections) - people,
                    sum(1 for room in self.rooms.values() if room.members),
                    sum(p.invisible for p in self.people.values()))

    @staticmethod
    def _may_see(viewer: Person, room: Room | None) -> bool:
        return room is not None and (not room.private or viewer.operator or room.key in viewer.rooms)

    @staticmethod
    def _charge(person: Person, entries: int, what: str) -> None:
        """Lists cost what they hold: each person may list LISTING_BURST entries at once, then LISTING_RATE
        a second, so that hundreds asking for long lists cannot slow the chat. Lock held."""
        if not person.listing.allow(max(entries, 1)):
            wait = (min(entries, LISTING_BURST) - person.listing.tokens) / LISTING_RATE
            raise Refused(f"{what} lists {entries} entries, more than you may ask for now; "
                          f"try again in {max(1, math.ceil(wait))} s.", "try-again")

    # -- delivery: events to the outputs of their receivers ----------------------------------

    def _to_room(self, room: Room, event: Any, skip: Person | Session | None = None,
                 sender: Person | None = None) -> None:
        """Queue EVENT to everyone in ROOM (but SKIP, a person or one session of theirs, and those ignoring
        SENDER), rendered once per audience. Lock held."""
        skipped = () if skip is None else [skip.output] if isinstance(skip, Session) else skip.outputs
        if sender is None or sender.key not in self.ignorers:
            for (protocol, tagged), outputs in room.audiences.items():
                if skipped and not outputs.isdisjoint(skipped):
                    outputs = outputs.difference(skipped)     # a set difference: no Python work per member
                if outputs:
                    self.switchboard.queue(outputs, protocol.encode(event, tagged), room)
            return
        groups: dict[tuple[PyChatProtocol, bool], list[Output]] = {}
        for member in room.members:
            if not (sender is not None and sender.key in member.ignoring):
                for session in member.sessions:
                    if session.output not in skipped:
                        groups.setdefault((session.output.protocol, session.current is not room),
                                          []).append(session.output)
        for (protocol, tagged), outputs in groups.items():
            self.switchboard.queue(outputs, protocol.encode(event, tagged), room)

    def _to_people(self, people: Iterable[Person], event: Any) -> None:
        """Queue EVENT (not a room's) to every session of each of PEOPLE. Lock held."""
        self._to_sessions([session for person in people for session in person.sessions], event)

    def _to_sessions(self, sessions: Iterable[Session], event: Any, room: Room | None = None,
                     reply: bool = True) -> None:
        """Queue EVENT to each of SESSIONS, rendered once per protocol; an event of ROOM is tagged for those
        whose current room it is not (see Switchboard.queue for REPLY). Lock held."""
        groups: dict[tuple[PyChatProtocol, bool], list[Output]] = {}
        for session in sessions:
            tagged = room is not None and session.current is not room
            groups.setdefault((session.output.protocol, tagged), []).append(session.output)
        for (protocol, tagged), outputs in groups.items():
            self.switchboard.queue(outputs, protocol.encode(event, tagged), reply=reply)

    def _must_stay_in(self, person: Person, room: Room) -> bool:
        """ROOM is the lobby and PERSON's only room, and a session of theirs has a protocol that must always
        have a current room: they may not leave it, nor be kicked out of it. Lock held."""
        return len(person.rooms) == 1 and room is self.lobby and any(
            session.output.protocol.has_current_room for session in person.sessions)

    def _find(self, nick: str, room: Room | None = None) -> Person:
        """The person called NICK (spelt any look-alike way), who must be in ROOM if given; the lock is held."""
        found = self.people.get(name_key(normal_name(nick)))
        if found is None:
            raise Refused(f"No one called {nick} is online. /online lists who is.", "no-such-person",
                          nick=nick)
        if room is not None and found not in room.members:
            raise Refused(f"{found.nick} is not in #{room.name}.", "they-are-not-in-room", room.name, found.nick)
        return found

    # -- shutting down -------------------------------------------------------------

    def stop(self) -> None:
        """Tell everyone, close every connection, and wait a little for them to go."""
        doors = [door for door in (self.irc, self.web) if door is not None]
        self.shutdown()
        for door in doors:
            door.shutdown()
        with self.lock:
            self.stopping = True
            connections = list(self.connections)
        for connection in connections:
            connection.output.end("server shutting down", ShuttingDown())
        self.stop_trigger.send(b"\0")
        deadline = time.monotonic() + SHUTDOWN_SECONDS
        while time.monotonic() < deadline:
            with self.lock:
                # Taken out is not yet told: the farewell is written just after, and the process must
                # not end in between.
                if not self.connections and all(connection.output.closed for connection in connections):
                    break
            time.sleep(0.01)
        self.switchboard.stop()
        self.server_close()
        for door in doors:
            door.server_close()
        self.storage.close()


def fits_pattern(pattern: str, text: str) -> bool:
    """Whether TEXT fits PATTERN, in which * stands for any characters and ? for one; in time proportional
    to their lengths multiplied, however many stars (a regular expression could take exponential time)."""
    p = t = 0
    star, resume = -1, 0            # the last star seen, and where in TEXT its match ends for now
    while t < len(text):
        if p < len(pattern) and pattern[p] == "*":
            star, resume = p, t
            p += 1
        elif p < len(pattern) and pattern[p] in ("?", text[t]):
            p, t = p + 1, t + 1
        elif star >= 0:             # let the last star take one more character, and try again after it
            resume += 1
            p, t = star + 1, resume
        else:
            return False
    return pattern[p:].strip("*") == ""


def chat_event(room: str, message: StoredMessage) -> Said | Acted:
    """The event a line of ROOM kept in the database was when it was said."""
    if message.kind == "action":
        return Acted(room, message.nick, message.text, str(message.id), (), message.account)
    return Said(room, message.nick, message.text, str(message.id), (), message.account,
                notice=message.kind == "notice")


def room_name(name: str) -> str:
    """A room name as typed (with or without '#'), as the server spells it."""
    return normal_name(name[1:] if name.startswith("#") else name)


# ---------------------------------------------------------------------------
# The context: all a slash-command may see and do
# ---------------------------------------------------------------------------

class Context:
    """The server's commands.Context: who called, and verbs that each delegate to one ChatServer method."""

    def __init__(self, server: ChatServer, caller: Session) -> None:
        self._server = server
        self._caller = caller

    @property
    def nick(self) -> str:
        return self._caller.person.nick

    @property
    def room(self) -> str:
        """The caller's current room, '' if they are in none (only IRC users may be)."""
        current = self._caller.current
        return current.name if current is not None else ""

    @property
    def help_command(self) -> str:
        """How the caller asks for the commands, in their client: /help, or /msg pyChat help on IRC."""
        return self._caller.output.protocol.help_command

    @property
    def is_operator(self) -> bool:
        return self._caller.person.operator

    @property
    def away(self) -> str | None:
        return self._caller.person.away

    @property
    def command_table(self) -> commands.CommandTable:
        return self._server.commands

    def reply(self, text: str) -> None:
        self._caller.output.send(Reply(text))

    def error(self, text: str) -> None:
        self._caller.output.send(Error(text))

    def say(self, text: str, room: str | None = None) -> None:
        self._server.say(self._caller, text, room)

    def act(self, text: str, room: str | None = None) -> None:
        self._server.act(self._caller, text, room)

    def send_private(self, nick: str, text: str) -> None:
        self._server.send_private(self._caller, nick, text)

    def last_private_sender(self) -> str:
        return self._server.last_private_sender(self._caller)

    def join(self, room: str, key: str | None = None) -> None:
        self._server.join(self._caller, room, key)

    def leave(self, room: str | None = None) -> None:
        self._server.leave(self._caller, room)

    def invite(self, nick: str, room: str | None = None) -> str:
        return self._server.invite(self._caller, nick, room)

    def kick(self, nick: str, reason: str | None, room: str | None = None) -> str:
        return self._server.kick(self._caller, nick, reason, room)

    def set_topic(self, text: str, room: str | None = None) -> None:
        self._server.set_topic(self._caller, text, room)

    def set_mode(self, setting: str, value: str, room: str | None = None) -> None:
        refusal = self._server.set_room_modes(self._caller, [(setting, value)], room)[0]
        if refusal is not None:
            raise refusal

    def set_modes(self, changes: list[tuple[str, str]], room: str | None = None) -> list[str]:
        """Several settings at once; what was refused, and why."""
        return [str(refusal) for refusal in self._server.set_room_modes(self._caller, changes, room) if refusal]

    def mode_letters(self, letters: str, words: list[str]) -> list[tuple[str, str | None]]:
        """IRC's letters ('+mv bob') as /mode's settings and values; a value None is a word missing."""
        found = read_mode_letters(letters, words)
        unknown = [word.letter for word in found if word.setting is None]
        if unknown:
            raise Refused(f"There is no mode {unknown[0]}; /help mode lists them.")
        return [(word.setting, word.value) for word in found]

    def room_settings(self, room: str | None = None) -> commands.RoomSettings:
        return self._server.room_settings(self._caller, room)

    def rename(self, new_nick: str) -> None:
        self._server.rename(self._caller, new_nick)

    def set_away(self, reason: str | None) -> None:
        self._server.set_away(self._caller, reason)

    def ignore(self, nick: str, ignoring: bool = True) -> str:
        return self._server.ignore(self._caller, nick, ignoring)

    def ignored(self) -> list[str]:
        return self._server.ignored_by(self._caller)

    def become_operator(self, secret: str) -> None:
        self._server.become_operator(self._caller, secret)

    def quit(self, message: str | None = None) -> None:
        self._server.quit(self._caller, message)

    def disconnect(self, nick: str, reason: str | None) -> str:
        return self._server.disconnect(self._caller, nick, reason)

    def reload(self) -> list[str]:
        return self._server.reload(f"/rehash by {self._caller.person.nick}")

    def online(self) -> list[commands.PersonInfo]:
        return self._server.online(self._caller)

    def room_members(self, room: str | None = None) -> tuple[str, list[commands.PersonInfo]]:
        return self._server.room_members(self._caller, room)

    def rooms(self) -> list[commands.RoomInfo]:
        return self._server.room_list(self._caller)

    # -- accounts and moderation

    def register(self, password: str) -> str:
        return self._server.register_account(self._caller, password)

    def change_password(self, old: str, new: str) -> None:
        self._server.change_password(self._caller, old, new)

    def unregister(self, password: str) -> str:
        return self._server.unregister(self._caller, password)

    def operators(self) -> list[str]:
        return self._server.operator_names()

    def set_operator(self, nick: str, operator: bool) -> str:
        return self._server.set_operator(self._caller, nick, operator)

    def ban(self, target: str, duration: str | None, reason: str | None) -> str:
        return self._server.ban(self._caller, target, duration, reason)

    def unban(self, target: str) -> str:
        return self._server.unban(self._caller, target)

    def bans(self) -> list[str]:
        return self._server.ban_lines()

    def mute(self, nick: str, duration: str | None, reason: str | None) -> str:
        return self._server.mute(self._caller, nick, duration, reason)

    def unmute(self, target: str) -> str:
        return self._server.unmute(self._caller, target)

    def mutes(self) -> list[str]:
        return self._server.mute_lines()

    def invite_account(self, nick: str) -> str:
        return self._server.invite_account(self._caller, nick)

    def accounts(self, pattern: str | None = None) -> tuple[list[commands.AccountInfo], int]:
        return self._server.account_list(self._caller, pattern)

    def invitations(self) -> list[commands.InvitationInfo]:
        return self._server.invitation_list()

    def cancel_invitation(self, nick: str) -> str:
        return self._server.cancel_invitation(self._caller, nick)

    def reset_password(self, nick: str) -> str:
        return self._server.reset_password(self._caller, nick)

    def remove_account(self, nick: str) -> str:
        return self._server.remove_account(self._caller, nick)

    def whois(self, nick: str) -> commands.PersonDetails:
        return self._server.whois(self._caller, nick)

    def search(self, words: str, room: str | None = None) -> list[commands.FoundLine]:
        return self._server.search(self._caller, words, room)

    def history(self, target: str | None = None, count: int | None = None) -> int:
        return self._server.history(self._caller, target, HISTORY_PAGE if count is None else count)

    def mark_read(self, target: str | None = None) -> None:
        self._server.mark_read(self._caller, target)

    def sessions(self) -> list[commands.SessionInfo]:
        return self._server.sessions(self._caller)

    def end_session(self, number: int) -> str:
        return self._server.end_session(self._caller, number)

    def motd(self) -> list[str]:
        return self._server.motd.lines()

    def server_info(self) -> commands.ServerDetails:
        return self._server.server_details()


# ---------------------------------------------------------------------------
# The IRC protocol: messages, numerics, capabilities, text, registration
# ---------------------------------------------------------------------------
# The IRC port speaks the client protocol of modern.ircdocs.horse with the
# IRCv3 extensions listed in IRC_CAPABILITIES. Everything in this section is
# pure: it reads and writes IRC text and knows nothing about sockets or rooms.



class IrcServerName:
    """The IRC door's name for itself (--server-name): the source of the server's own messages, the name in
    004, PONG, WHO and WHOIS. One value, set by ChatServer when it starts and read everywhere through
    irc_server_name(), so that the pure formatting below needs no server to ask."""
    name = SERVER_NAME


def irc_server_name() -> str:
    return IrcServerName.name


IRC_FROM_SERVER: Any = object()         # format_irc_message's default source: irc_server_name(), at the time
IRC_NETWORK = "pyChat"
IRC_SERVICE_NICK = "pyChat"             # /msg pyChat help: pyChat's slash-commands (a reserved name)
IRC_MAX_BODY_BYTES = 510                # a message without its tags and CR LF (RFC 1459: 512 with CR LF)
IRC_MAX_TAG_BYTES = 8191                # the tag section, its '@' and the space after it included (IRCv3)
IRC_MAX_PARAMS = 15
IRC_MAX_TARGETS = 4                     # of one PRIVMSG, NOTICE or TAGMSG (005's TARGMAX)
IRC_HISTORY_MOST = 100                  # lines (or conversations) of one CHATHISTORY reply (005's CHATHISTORY)
IRC_HISTORY_COST = 10                   # entries of the listing budget one CHATHISTORY request costs
IRC_MAX_LABEL_BYTES = 64                # of a labeled-response label
IRC_MAX_USERNAME = 10
IRC_MAX_REALNAME = 50
# Formatting codes (bold, colour, hex colour, reset, monospace, reverse, italic, strike, underline) are
# the IRC clients' business: they pass between IRC users and are taken out for everyone else.
IRC_FORMATTING = "\x02\x03\x04\x0f\x11\x16\x1d\x1e\x1f"
CTCP = "\x01"
CTCP_ACTION = (CTCP + "ACTION ", CTCP)  # what goes around the text of a CTCP ACTION (/me)


class IrcMessage(NamedTuple):
    """One IRC message: COMMAND (upper case, or three digits) and its parameters, the last of them
    the one that may hold spaces; a source and tags when the sender gave them."""

    command: str
    params: list[str]
    source: str | None = None
    tags: dict[str, str] | None = None


class IrcLineError(ValueError):
    """A line that is not an IRC message we can take: the numeric that says so, and why."""

    def __init__(self, numeric: str, why: str) -> None:
        super().__init__(why)
        self.numeric = numeric


_TAG_ESCAPES = {";": "\\:", " ": "\\s", "\\": "\\\\", "\r": "\\r", "\n": "\\n"}
_TAG_ESCAPING = str.maketrans(_TAG_ESCAPES)
_TAG_UNESCAPES = {escaped[1]: raw for raw, escaped in _TAG_ESCAPES.items()}


_TAG_NEEDS_ESCAPING = re.compile(r"[; \\\r\n]")


def escape_tag_value(value: str) -> str:
    # str.translate() looks at every character in Python's slow way: most values (times, ids) need nothing.
    return value.translate(_TAG_ESCAPING) if _TAG_NEEDS_ESCAPING.search(value) else value


def unescape_tag_value(value: str) -> str:
    """A tag value as the sender meant it: known escapes undone, a lone backslash before anything
    else dropped (as the message-tags specification says)."""
    if "\\" not in value:
        return value
    out, pieces = [], iter(value)
    for ch in pieces:
        if ch == "\\":
            following = next(pieces, "")
            out.append(_TAG_UNESCAPES.get(following, following))
        else:
            out.append(ch)
    return "".join(out)


def parse_irc_tags(text: str) -> dict[str, str]:
    tags = {}
    for item in text.split(";"):
        key, _, value = item.partition("=")
        if key:
            tags[key] = unescape_tag_value(value)
    return tags


def format_irc_tags(tags: dict[str, str]) -> str:
    return ";".join(f"{key}={escape_tag_value(value)}" if value else key for key, value in tags.items())


def parse_irc_message(line: str) -> IrcMessage | None:
    """Read one line from an IRC client (without CR LF); None for an empty line (IRC ignores those).

    Raises IrcLineError for a line over IRC's limits or without a command.
    """
    rest = line
    tags = None
    if rest.startswith("@"):
        tag_text, _, rest = rest.partition(" ")
        if len(tag_text.encode("utf-8")) + 1 > IRC_MAX_TAG_BYTES:
            raise IrcLineError("ERR_INPUTTOOLONG", "Input line was too long (its tags are over 8191 bytes)")
        tags = parse_irc_tags(tag_text[1:])
        rest = rest.lstrip(" ")
    if len(rest) * 4 > IRC_MAX_BODY_BYTES and len(rest.encode("utf-8")) > IRC_MAX_BODY_BYTES:
        raise IrcLineError("ERR_INPUTTOOLONG",
                           f"Input line was too long (over {IRC_MAX_BODY_BYTES} bytes besides tags)")
    source = None
    if rest.startswith(":"):
        source, _, rest = rest[1:].partition(" ")
        rest = rest.lstrip(" ")
    command, _, rest = rest.partition(" ")
    if not command:
        if tags is None and source is None:
            return None
        raise IrcLineError("ERR_UNKNOWNCOMMAND", "A message needs a command")
    params: list[str] = []
    while rest:
        rest = rest.lstrip(" ")
        if rest.startswith(":") or (rest and len(params) == IRC_MAX_PARAMS - 1):
            params.append(rest[1:] if rest.startswith(":") else rest)
            break
        if rest:
            param, _, rest = rest.partition(" ")
            params.append(param)
    return IrcMessage(command.upper(), params, source, tags)


_IRC_BREAKS = str.maketrans("", "", "\r\n\0")


def without_irc_breaks(text: str) -> str:
    """TEXT without CR, LF and NUL, which would end or break an IRC message. A printable text has none,
    known in C: str.translate() costs more than the rest of rendering a line."""
    return text if text.isprintable() else text.translate(_IRC_BREAKS)


def format_irc_message(command: str, params: Iterable[str] = (), source: str | None = IRC_FROM_SERVER,
                       tags: dict[str, str] | None = None) -> str:
    """One IRC message as text without CR LF; the last parameter is sent as a trailing one when it
    has to be (spaces, a leading ':', empty), so it may hold any text. CR, LF and NUL never go out."""
    parts = []
    if tags:
        parts.append("@" + format_irc_tags(tags))
    if source is IRC_FROM_SERVER:
        source = irc_server_name()
    if source:
        parts.append(":" + source)
    parts.append(command)
    params = list(params)
    if params:
        *middle, last = params
        # A middle parameter is one word: a name echoed as a client typed it ("#t x") is cut at its first space.
        parts += [param if param and " " not in param else param.partition(" ")[0] or "*" for param in middle]
        last = without_irc_breaks(last)
        parts.append(":" + last if not last or " " in last or last.startswith(":") else last)
    return " ".join(parts)


def split_utf8(text: str, limit: int) -> list[str]:
    """TEXT in pieces of at most LIMIT bytes of UTF-8 each, never inside a character.

    A piece ends at the last space that leaves it at least half full, and that
    space is left out; otherwise it is cut between two characters and nothing
    is left out. Joined with spaces where they were cut at spaces, the pieces
    are the text again.
    """
    encoded = text.encode("utf-8")
    limit = max(limit, 4)       # room for the widest character, so every piece holds something
    pieces = []
    while len(encoded) > limit:
        cut = limit
        while encoded[cut] & 0xC0 == 0x80:      # a continuation byte: inside a character
            cut -= 1
        space = encoded.rfind(b" ", limit // 2, cut + 1)
        if space > 0:
            pieces.append(encoded[:space].decode("utf-8"))
            encoded = encoded[space + 1:]
        else:
            pieces.append(encoded[:cut].decode("utf-8"))
            encoded = encoded[cut:]
    pieces.append(encoded.decode("utf-8"))
    return pieces


def join_in_lines(items: list[str], room: int, separator: str = " ") -> list[str]:
    """ITEMS joined with SEPARATOR (one ASCII character, in none of them) into as few lines of at most ROOM
    bytes of UTF-8 as they fill, in order; an item longer than a line goes alone. No items, no lines."""
    # Cut the whole list at separators, in bytes: an ASCII separator never occurs inside another character's
    # UTF-8, and this is one search per line, not a step per item, for the up to 200 names every newcomer gets.
    cut_at = separator.encode("ascii")
    rest = separator.join(items).encode("utf-8")
    lines = []
    while len(rest) > room:
        cut = rest.rfind(cut_at, 0, room + 1)
        if cut <= 0:                # one item longer than a line: it goes alone
            cut = rest.find(cut_at)
            if cut < 0:
                break
        lines.append(rest[:cut].decode("utf-8"))
        rest = rest[cut + 1:]
    if rest:
        lines.append(rest.decode("utf-8"))
    return lines


def irc_text_messages(command: str, target: str, text: str, source: str, tags: dict[str, str] | None = None,
                      wrap: tuple[str, str] = ("", "")) -> list[str]:
    """PRIVMSG or NOTICE of TEXT to TARGET, as as many messages as IRC's line limit needs: a long
    pyChat line reaches an IRC user in pieces, never cut short. WRAP goes around each piece
    (a CTCP ACTION's markers)."""
    head = format_irc_message(command, (target,), source) + " :"
    before, after = wrap
    room = IRC_MAX_BODY_BYTES - len((head + before + after).encode("utf-8"))
    pieces = split_utf8(without_irc_breaks(text), room)
    prefix = "@" + format_irc_tags(tags) + " " if tags else ""
    return [f"{prefix}{head}{before}{piece}{after}" for piece in pieces]


def irc_within_limit(line: str) -> str:
    """LINE (a message without CR LF) cut, at the end of a character, to IRC's 510 bytes besides its tags.
    Chat lines go out in pieces that fit (irc_text_messages); what else the server says of others (a topic,
    a reason, an away message set at the pyChat port, which takes 4,096 bytes) is cut, as IRC servers cut
    what is longer than their limits."""
    if len(line) <= IRC_MAX_BODY_BYTES // 4:
        return line         # fits even at four bytes a character: nearly every line, known without encoding it
    tags, body = line.partition(" ")[::2] if line.startswith("@") else ("", line)
    encoded = body.encode("utf-8")
    if len(encoded) <= IRC_MAX_BODY_BYTES:
        return line
    return (tags + " " if tags else "") + encoded[:IRC_MAX_BODY_BYTES].decode("utf-8", "ignore")


def irc_cut_to_fit(command: str, target: str, source: str, text: str, wrap: tuple[str, str] = ("", "")) -> str:
    """TEXT cut short, at the end of a character, so that COMMAND (PRIVMSG or NOTICE) from SOURCE relaying it
    to TARGET is one message within IRC's line limit, as IRC servers cut what their clients send: a line
    at the limit from a client does not fit once the server puts its sender's NICK!USER@HOST before it.
    WRAP goes around the text (a CTCP ACTION's markers)."""
    if 4 * (len(text) + len(source) + len(target) + len(wrap[0]) + len(wrap[1])) + len(command) + 5 \
            <= IRC_MAX_BODY_BYTES:
        return text         # fits even at four bytes a character: most lines, known without encoding them
    head = format_irc_message(command, (target,), source) + " :" + wrap[0] + wrap[1]
    room = IRC_MAX_BODY_BYTES - len(head.encode("utf-8"))
    encoded = text.encode("utf-8")
    return text if len(encoded) <= room else encoded[:max(room, 0)].decode("utf-8", "ignore")


# The numerics the server sends: name -> (code, the usual closing text, or None when the
# parameters are all there is). A caller may give a more helpful text than the usual one.
IRC_NUMERICS: dict[str, tuple[str, str | None]] = {
    "RPL_WELCOME": ("001", None),
    "RPL_YOURHOST": ("002", None),
    "RPL_CREATED": ("003", None),
    "RPL_MYINFO": ("004", None),
    "RPL_ISUPPORT": ("005", "are supported by this server"),
    "RPL_UMODEIS": ("221", None),
    "RPL_LUSERCLIENT": ("251", None),
    "RPL_LUSEROP": ("252", "operator(s) online"),
    "RPL_LUSERUNKNOWN": ("253", "unknown connection(s)"),
    "RPL_LUSERCHANNELS": ("254", "channels formed"),
    "RPL_LUSERME": ("255", None),
    "RPL_LOCALUSERS": ("265", None),
    "RPL_GLOBALUSERS": ("266", None),
    "RPL_TRYAGAIN": ("263", "Please wait a while and try again."),
    "RPL_AWAY": ("301", None),
    "RPL_USERHOST": ("302", None),
    "RPL_ISON": ("303", None),
    "RPL_UNAWAY": ("305", "You are no longer marked as being away"),
    "RPL_NOWAWAY": ("306", "You have been marked as being away"),
    "RPL_WHOISUSER": ("311", None),
    "RPL_WHOISBOT": ("335", None),
    "RPL_WHOWASUSER": ("314", None),
    "RPL_WHOISSERVER": ("312", None),
    "RPL_WHOISOPERATOR": ("313", "is an IRC operator"),
    "RPL_ENDOFWHO": ("315", "End of WHO list"),
    "RPL_WHOISIDLE": ("317", "seconds idle, signon time"),
    "RPL_ENDOFWHOIS": ("318", "End of /WHOIS list"),
    "RPL_WHOISCHANNELS": ("319", None),
    "RPL_LISTSTART": ("321", "Users  Name"),
    "RPL_LIST": ("322", None),
    "RPL_LISTEND": ("323", "End of /LIST"),
    "RPL_CHANNELMODEIS": ("324", None),
    "RPL_CREATIONTIME": ("329", None),
    "RPL_WHOISACCOUNT": ("330", "is logged in as"),
    "RPL_NOTOPIC": ("331", "No topic is set"),
    "RPL_TOPIC": ("332", None),
    "RPL_TOPICWHOTIME": ("333", None),
    "RPL_WHOISACTUALLY": ("338", "is connecting from"),
    "RPL_INVITING": ("341", None),
    "RPL_INVITELIST": ("346", None),
    "RPL_ENDOFINVITELIST": ("347", "End of channel invite list"),
    "RPL_EXCEPTLIST": ("348", None),
    "RPL_ENDOFEXCEPTLIST": ("349", "End of channel exception list"),
    "RPL_VERSION": ("351", None),
    "RPL_WHOREPLY": ("352", None),
    "RPL_WHOSPCRPL": ("354", None),
    "RPL_NAMREPLY": ("353", None),
    "RPL_ENDOFNAMES": ("366", "End of /NAMES list"),
    "RPL_BANLIST": ("367", None),
    "RPL_ENDOFBANLIST": ("368", "End of channel ban list"),
    "RPL_ENDOFWHOWAS": ("369", "End of WHOWAS"),
    "RPL_MOTD": ("372", None),
    "RPL_MOTDSTART": ("375", None),
    "RPL_ENDOFMOTD": ("376", "End of /MOTD command."),
    "RPL_YOUREOPER": ("381", "You are now an IRC operator"),
    "RPL_REHASHING": ("382", "Rehashing"),
    "RPL_TIME": ("391", None),
    "RPL_INFO": ("371", None),
    "RPL_ENDOFINFO": ("374", "End of INFO list"),
    "ERR_HELPNOTFOUND": ("524", "No help available on this topic"),
    "RPL_HELPSTART": ("704", None),
    "RPL_HELPTXT": ("705", None),
    "RPL_ENDOFHELP": ("706", None),
    "ERR_NOSUCHNICK": ("401", "No such nick/channel"),
    "ERR_NOSUCHCHANNEL": ("403", "No such channel"),
    "ERR_CANNOTSENDTOCHAN": ("404", "Cannot send to channel"),
    "ERR_TOOMANYCHANNELS": ("405", "You have joined too many channels"),
    "ERR_WASNOSUCHNICK": ("406", "There was no such nickname"),
    "ERR_NOORIGIN": ("409", "No origin specified"),
    "ERR_INVALIDCAPCMD": ("410", "Invalid CAP command"),
    "ERR_TOOMANYTARGETS": ("407", "Too many targets: the rest were not sent to"),
    "ERR_NORECIPIENT": ("411", "No recipient given"),
    "ERR_NOTEXTTOSEND": ("412", "No text to send"),
    "ERR_INPUTTOOLONG": ("417", "Input line was too long"),
    "ERR_UNKNOWNCOMMAND": ("421", "Unknown command"),
    "ERR_NOMOTD": ("422", "MOTD File is missing"),
    "ERR_NONICKNAMEGIVEN": ("431", "No nickname given"),
    "ERR_ERRONEUSNICKNAME": ("432", "Erroneous nickname"),
    "ERR_NICKNAMEINUSE": ("433", "Nickname is already in use"),
    "ERR_USERNOTINCHANNEL": ("441", "They aren't on that channel"),
    "ERR_NOTONCHANNEL": ("442", "You're not on that channel"),
    "ERR_USERONCHANNEL": ("443", "is already on channel"),
    "ERR_NOTREGISTERED": ("451", "You have not registered"),
    "ERR_NEEDMOREPARAMS": ("461", "Not enough parameters"),
    "ERR_ALREADYREGISTERED": ("462", "You may not reregister"),
    "ERR_PASSWDMISMATCH": ("464", "Password incorrect"),
    "ERR_CHANNELISFULL": ("471", "Cannot join channel (+l)"),
    "ERR_UNKNOWNMODE": ("472", "is unknown mode char to me"),
    "ERR_INVITEONLYCHAN": ("473", "Cannot join channel (+i)"),
    "ERR_BANNEDFROMCHAN": ("474", "Cannot join channel (+b)"),
    "ERR_BADCHANNELKEY": ("475", "Cannot join channel (+k)"),
    "ERR_NOPRIVILEGES": ("481", "Permission Denied- You're not an IRC operator"),
    "ERR_NOOPERHOST": ("491", "No O-lines for your host"),
    "ERR_CHANOPRIVSNEEDED": ("482", "You're not channel operator"),
    "ERR_UMODEUNKNOWNFLAG": ("501", "Unknown MODE flag"),
    "ERR_INVALIDMODEPARAM": ("696", None),
    "ERR_USERSDONTMATCH": ("502", "Can't change mode for other users"),
    "RPL_MONONLINE": ("730", None),
    "RPL_MONOFFLINE": ("731", None),
    "RPL_MONLIST": ("732", None),
    "RPL_ENDOFMONLIST": ("733", "End of MONITOR list"),
    "ERR_MONLISTFULL": ("734", "Monitor list is full."),
    "RPL_LOGGEDIN": ("900", None),
    "RPL_SASLSUCCESS": ("903", "SASL authentication successful"),
    "ERR_SASLFAIL": ("904", "SASL authentication failed"),
    "ERR_SASLTOOLONG": ("905", "SASL message too long"),
    "ERR_SASLABORTED": ("906", "SASL authentication aborted"),
    "ERR_SASLALREADY": ("907", "You have already authenticated using SASL"),
    "RPL_SASLMECHS": ("908", "are available SASL mechanisms"),
}


def irc_numeric(name: str, target: str, *params: str, text: str | None = None) -> str:
    """The numeric NAME to TARGET (a nickname, or '*' before there is one), with PARAMS and a closing
    text: TEXT if given, else the usual one of the table."""
    code, usual = IRC_NUMERICS[name]
    closing = text if text is not None else usual
    return format_irc_message(code, (target, *params) + ((closing,) if closing is not None else ()))


# Capabilities offered, with their values for CAP LS 302. A cheap one is offered only when it
# is honoured everywhere: server-time on every message, echo-message for every PRIVMSG/NOTICE/TAGMSG.
# cap-notify promises CAP NEW and DEL when the offer changes; this server's never does.
IRC_CAPABILITIES: dict[str, str | None] = {
    "account-notify": None,
    "account-tag": None,
    "away-notify": None,
    "cap-notify": None,
    "echo-message": None,
    "extended-join": None,
    "invite-notify": None,
    "message-tags": None,
    "multi-prefix": None,
    "sasl": "PLAIN",
    "server-time": None,
    "setname": None,
    "userhost-in-names": None,
    "batch": None,
    "labeled-response": None,
    "draft/chathistory": None,
    "draft/read-marker": None,
    "draft/account-registration": "before-connect",
}
IRC_MAX_CLIENT_TAG_BYTES = 4094         # of tag data a client may send, without the '@' and the space (IRCv3)
_CLIENT_TAG_KEY = re.compile(r"\+(?:[A-Za-z0-9.-]+/)?[A-Za-z0-9-]+")
_TAG_VALUE_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")


def irc_number(text: str) -> int | None:
    """TEXT as a whole number if it is written in ASCII digits, else None (str.isdigit() also takes
    '²', which int() refuses)."""
    return int(text) if text.isascii() and text.isdigit() else None


def irc_client_tags(tags: dict[str, str] | None) -> ClientTags:
    """The client-only tags ('+' keys: +typing, +draft/reply...) of a message from a client, to pass on
    to other clients; its other tags are the server's to give, and are dropped. Control characters
    are taken out of the values. Raises IrcLineError when the client sent more tag data than IRC lets it."""
    if not tags:
        return ()
    if len(format_irc_tags(tags).encode("utf-8")) > IRC_MAX_CLIENT_TAG_BYTES:
        raise IrcLineError("ERR_INPUTTOOLONG", f"Input line was too long (its tags are over "
                                               f"{IRC_MAX_CLIENT_TAG_BYTES} bytes)")
    return tuple((key, _TAG_VALUE_CONTROLS.sub("", value)) for key, value in tags.items()
                 if _CLIENT_TAG_KEY.fullmatch(key))


class IrcCapabilities:
    """One connection's capability negotiation (CAP LS, LIST, REQ, END) and what it enabled.

    While `negotiating`, registration waits, as IRCv3 asks: a client that sent
    CAP LS or CAP REQ before registering is registered only after CAP END.
    """

    def __init__(self, offered: dict[str, str | None]) -> None:
        self.offered = offered
        self.enabled: frozenset[str] = NOTHING      # replaced on a change: most clients never make one
        self.version = 0
        self.negotiating = False

    def handle(self, nick: str, params: list[str], registered: bool) -> list[str]:
        """The replies to CAP PARAMS from the client called NICK ('*' until it has one)."""
        if not params:
            return [irc_numeric("ERR_NEEDMOREPARAMS", nick, "CAP")]
        subcommand = params[0].upper()
        if subcommand == "LS":
            version = irc_number(params[1]) if len(params) > 1 else None
            if version is not None:
                self.version = max(self.version, version)
            self.negotiating = not registered
            offered = [name if value is None or self.version < 302 else f"{name}={value}"
                       for name, value in self.offered.items()]
            return self._listing(nick, "LS", offered)
        if subcommand == "LIST":
            return self._listing(nick, "LIST", sorted(self.enabled))
        if subcommand == "REQ":
            self.negotiating = not registered
            wanted = (params[1] if len(params) > 1 else "").split()
            names = [name.removeprefix("-") for name in wanted]
            if not wanted or any(name not in self.offered for name in names):
                return [format_irc_message("CAP", (nick, "NAK", " ".join(wanted)))]
            for name in wanted:
                if name.startswith("-"):
                    self.enabled -= {name[1:]}
                else:
                    self.enabled |= {name}
            return [format_irc_message("CAP", (nick, "ACK", " ".join(wanted)))]
        if subcommand == "END":
            self.negotiating = False
            return []
        return [irc_numeric("ERR_INVALIDCAPCMD", nick, params[0])]

    def _listing(self, nick: str, subcommand: str, names: list[str]) -> list[str]:
        """CAP LS or LIST replies, over several lines marked with '*' when they do not fit in one."""
        head = len(format_irc_message("CAP", (nick, subcommand, "*", ":")).encode("utf-8"))
        lines = join_in_lines(names, IRC_MAX_BODY_BYTES - head) or [""]
        continued = ["*"] if self.version >= 302 else []
        return [format_irc_message("CAP", (nick, subcommand, *(continued if n < len(lines) - 1 else []), line))
                for n, line in enumerate(lines)]


# Control characters other than IRC's formatting codes, and direction overrides: removed from
# what IRC users say, as clean_text does for everyone else. Tabs become spaces first.
_INVISIBLE_ON_IRC = re.compile("[\x00\x01\x05-\x08\x0a-\x0e\x10\x12-\x15\x17-\x1c\x7f-\x9f"
                               "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_IRC_FORMATTING_CODES = re.compile("\x03(?:[0-9]{1,2}(?:,[0-9]{1,2})?)?"
                                   "|\x04(?:[0-9a-fA-F]{6}(?:,[0-9a-fA-F]{6})?)?"
                                   "|[\x02\x0f\x11\x16\x1d\x1e\x1f]")


def clean_irc_text(text: str) -> str:
    """What an IRC user said, for other IRC users: formatting codes kept, every other control
    character and direction override removed, as clean_text does."""
    return clean_text(text, _INVISIBLE_ON_IRC)


def strip_irc_formatting(text: str) -> str:
    """IRC text without its formatting codes (a colour's numbers too), for pyChat and nc users."""
    return clean_text(_IRC_FORMATTING_CODES.sub("", text))


def parse_ctcp(text: str) -> tuple[str, str] | None:
    """('ACTION', 'waves') for '\\x01ACTION waves\\x01', or None when TEXT is not a CTCP message."""
    if not text.startswith(CTCP):
        return None
    body = text[1:].removesuffix(CTCP)
    command, _, argument = body.partition(" ")
    return command.upper(), argument


def irc_server_time(when: float) -> str:
    """The server-time tag's value: UTC with milliseconds."""
    return irc_message_time(round(when * 1_000_000))


def irc_message_time(message_id: int) -> str:
    """The server-time of the line MESSAGE_ID, whose id is when it was said (see SCHEMA): the same in its
    time tag when it is said and in every history reply, to the millisecond."""
    seconds, microseconds = divmod(message_id, 1_000_000)
    return f"{_irc_second(seconds)}{microseconds // 1000:03d}Z"


@functools.lru_cache(maxsize=256)       # a busy room's lines share their second: formatting it costs more
def _irc_second(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.")


_IRC_TIMESTAMP = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?Z")


def irc_parse_time(text: str) -> int | None:
    """A server-time as IRCv3 writes it (2019-01-04T14:33:26.123Z) in milliseconds since 1970; None if
    TEXT is not one."""
    found = _IRC_TIMESTAMP.fullmatch(text)
    if found is None:
        return None
    *parts, fraction = found.groups()
    try:
        moment = datetime.datetime(*map(int, parts), tzinfo=datetime.timezone.utc)
    except ValueError:
        return None
    return int(moment.timestamp()) * 1000 + int((fraction or "0").ljust(6, "0")[:3])


IRC_LARGEST_ID = 1 << 62                # above every message id, for a range with no end


class IrcMessageReference(NamedTuple):
    """Where a CHATHISTORY or MARKREAD reference points, as message ids: a line's msgid, or a timestamp,
    which stands for every line said in its millisecond."""

    after: int                  # the lines after it have ids above this
    before: int                 # the lines before it have ids below this
    at: int                     # the first id it may be

    @classmethod
    def parse(cls, text: str) -> IrcMessageReference | None:
        """msgid=ID or timestamp=TIME; None for anything else. A msgid of a piece of a long line (ID-2)
        points at the line."""
        kind, _, value = text.partition("=")
        if kind == "msgid":
            number = irc_number(value.partition("-")[0])
            # No id is that large (SQLite's integers end at 2**63).
            return None if number is None or number >= IRC_LARGEST_ID else cls(number, number, number)
        if kind == "timestamp":
            when = irc_parse_time(value)
            return None if when is None else cls(when * 1000 + 999, when * 1000, when * 1000)
        return None


def irc_with_tags(line: str, tags: dict[str, str]) -> str:
    """LINE (without CR LF) with TAGS added in front of those it has."""
    if not tags:
        return line
    if line.startswith("@"):
        own, _, rest = line.partition(" ")
        return f"@{format_irc_tags(tags)};{own[1:]} {rest}"
    return f"@{format_irc_tags(tags)} {line}"


def irc_tag_of(line: str, key: str) -> str | None:
    """The value of the tag KEY of LINE, or None when it has none."""
    return parse_irc_tags(line[1:].partition(" ")[0]).get(key) if line.startswith("@") else None


def irc_labeled_reply(label: str, replies: list[bytes], batch: str) -> list[str]:
    """The REPLIES to a command sent with LABEL, as labeled-response says: one line labeled, a single batch
    with its start labeled, several lines in a labeled-response batch (called BATCH), none an ACK."""
    lines = [line for chunk in replies for line in chunk.decode("utf-8").split("\r\n") if line]
    if not lines:
        return [format_irc_message("ACK", (), tags={"label": label})]
    outside = [irc_tag_of(line, "batch") is None for line in lines]     # not in a batch of their own
    try:
        first, last = parse_irc_message(lines[0]), parse_irc_message(lines[-1])
    except IrcLineError:        # longer than a client's line may be, so no BATCH line: not one batch
        first = last = IrcMessage("", [""])
    one_batch = (sum(outside) == 2 and first.command == last.command == "BATCH"
                 and first.params[0].startswith("+") and last.params[:1] == ["-" + first.params[0][1:]])
    if len(lines) == 1 or one_batch:
        return [irc_with_tags(lines[0], {"label": label}), *lines[1:]]
    return [format_irc_message("BATCH", (f"+{batch}", "labeled-response"), tags={"label": label}),
            *(irc_with_tags(line, {"batch": batch}) if alone else line for line, alone in zip(lines, outside)),
            format_irc_message("BATCH", (f"-{batch}",))]


def irc_username(wanted: str) -> str:
    """The user name shown in NICK!USER@HOST: what the client gave, letters, digits and '_.-' only,
    short, with the '~' that says no ident server vouched for it."""
    kept = "".join(ch for ch in wanted if ch.isascii() and (ch.isalnum() or ch in "_.-"))
    return "~" + (kept[:IRC_MAX_USERNAME - 1] or "user")


class IrcRegistration:
    """What an IRC client says about itself before it is in the chat: PASS, NICK, USER and CAP, in
    any order. handle() returns the replies; `ready` is true once there is enough to sign in with.
    It also holds what signing in to an account needs for a while (SASL's exchange, a REGISTER
    waiting for its VERIFY), so that a connection signed in keeps none of it.

    Only the name's own rules are checked here (432); whether it is taken (433)
    is the server's to say when the person signs in.
    """

    def __init__(self, capabilities: IrcCapabilities) -> None:
        self.capabilities = capabilities
        self.password: str | None = None
        self.nick: str | None = None
        self.username: str | None = None
        self.realname = ""
        self.sasl = IrcSasl()                   # AUTHENTICATE's exchange
        self.verifying: tuple[str, str] | None = None   # the nickname and password a REGISTER waits to VERIFY

    @property
    def ready(self) -> bool:
        return bool(self.nick and self.username) and not self.capabilities.negotiating

    @property
    def target(self) -> str:
        """How numerics address the client: its nickname, or '*' while it has none."""
        return self.nick or "*"

    def handle(self, message: IrcMessage) -> list[str]:
        command, params = message.command, message.params
        if command == "CAP":
            return self.capabilities.handle(self.target, params, registered=False)
        if command == "PASS":
            if not params:
                return [irc_numeric("ERR_NEEDMOREPARAMS", self.target, "PASS")]
            self.password = params[0]
            return []
        if command == "NICK":
            if not params or not params[0]:
                return [irc_numeric("ERR_NONICKNAMEGIVEN", self.target)]
            wanted = params[0]
            problem = irc_nickname_problem(wanted)
            if problem:
                return [irc_numeric("ERR_ERRONEUSNICKNAME", self.target, wanted, text=problem)]
            self.nick = unicodedata.normalize("NFKC", wanted)
            return []
        if command == "USER":
            if len(params) < 4 or not params[0] or not params[3]:
                return [irc_numeric("ERR_NEEDMOREPARAMS", self.target, "USER")]
            if self.username is not None:
                return [irc_numeric("ERR_ALREADYREGISTERED", self.target)]
            self.username = irc_username(params[0])
            self.realname = clean_text(params[3])[:IRC_MAX_REALNAME]
            return []
        if command == "PING":
            return [irc_pong(self.target, params)]
        if command == "PONG":
            return []
        return [irc_numeric("ERR_NOTREGISTERED", self.target)]


class IrcSasl:
    """SASL PLAIN over AUTHENTICATE (IRCv3 sasl-3.1): what to answer, and the credentials once the
    client has sent them all. Checking them is the accounts' business, not this class's.

    The client names the mechanism, the server answers '+', the client sends
    base64 of 'authzid NUL authcid NUL password' in pieces of 400 bytes (a
    shorter piece, or '+', ends it); '*' aborts.
    """

    MECHANISMS = ("PLAIN",)
    PIECE = 400
    MOST = 4 * 400                  # more than any account name and password need

    def __init__(self) -> None:
        self.mechanism: str | None = None
        self.received = ""

    def handle(self, nick: str, argument: str) -> tuple[list[str], tuple[str, str] | None]:
        """The replies to AUTHENTICATE ARGUMENT, and (account, password) when they are complete."""
        if argument == "*":
            self.__init__()
            return [irc_numeric("ERR_SASLABORTED", nick)], None
        if self.mechanism is None:
            if argument.upper() not in self.MECHANISMS:
                return [irc_numeric("RPL_SASLMECHS", nick, ",".join(self.MECHANISMS)),
                        irc_numeric("ERR_SASLFAIL", nick)], None
            self.mechanism = argument.upper()
            return [format_irc_message("AUTHENTICATE", ("+",), source=None)], None
        if len(argument) > self.PIECE or len(self.received) + len(argument) > self.MOST:
            self.__init__()
            return [irc_numeric("ERR_SASLTOOLONG", nick)], None
        if argument != "+":
            self.received += argument
        if len(argument) == self.PIECE:
            return [], None                 # more to come
        received, self.mechanism, self.received = self.received, None, ""
        try:
            authorization, account, password = base64.b64decode(received, validate=True).decode("utf-8").split("\0")
        except (ValueError, UnicodeDecodeError):
            return [irc_numeric("ERR_SASLFAIL", nick)], None
        if authorization and authorization != account:
            return [irc_numeric("ERR_SASLFAIL", nick, text="SASL authentication failed: "
                                                           "one may only sign in as oneself")], None
        return [], (account, password)


def irc_nickname_problem(wanted: str) -> str | None:
    """Why WANTED cannot be anyone's nickname, by pyChat's rules, or None when it can."""
    if len(wanted) > MAX_NICKNAME_LENGTH:      # before normalising, which costs more the longer the name
        return f"Nickname is too long (at most {MAX_NICKNAME_LENGTH} characters)."
    return name_problem(unicodedata.normalize("NFKC", wanted))


def irc_pong(nick: str, params: list[str]) -> str:
    """The answer to PING from NICK ('*' before there is one): PONG with the server's name and the token."""
    if not params or not params[0]:
        return irc_numeric("ERR_NOORIGIN", nick)
    return format_irc_message("PONG", (irc_server_name(), params[0]))


class IrcPingClock:
    """When to PING a quiet IRC client, and when to give up on one that does not answer.

    Anything the client sends shows it is there. After INTERVAL seconds of
    silence the server sends PING; after INTERVAL more without a word, the
    connection ends with "Ping timeout".
    """

    def __init__(self, interval: float, now: float) -> None:
        self.interval = interval
        self.last_heard = now
        self.ping_sent_at: float | None = None

    def heard(self, now: float) -> None:
        self.last_heard = now
        self.ping_sent_at = None

    def deadline(self) -> float:
        """When next to act if nothing is heard before then."""
        return (self.last_heard if self.ping_sent_at is None else self.ping_sent_at) + self.interval

    def due(self, now: float) -> str | None:
        """'ping' when a PING should go out now, 'timeout' when the client should be let go, else None."""
        if now < self.deadline():
            return None
        if self.ping_sent_at is None:
            self.ping_sent_at = now
            return "ping"
        return "timeout"


# ---------------------------------------------------------------------------
# The IRC protocol object: the core's events in IRC's words
# ---------------------------------------------------------------------------

IRC_HOST = PERSON_HOST              # everyone is NICK!USER@pychat: pyChat never shows an address
IRC_SERVICE_KEY = name_key(IRC_SERVICE_NICK)
IRC_MAX_REASON = 390                # the longest topic, away message, kick or quit reason taken from IRC
IRC_USER_MODES = "Bio"              # B: a bot, i: invisible to WHO masks (both set by the person),
                                    # o: an operator of the server (/op, OPER)
IRC_CHANNEL_MODES = "Ibeiklmnostv"  # pyChat's room settings (ROOM_MODE_LETTERS)
IRC_CHANNEL_MODES_WITH_WORDS = "Ibeklov"
# Capabilities that change the bytes a connection is sent. Rooms group their audiences by them (see
# IrcProtocol), so a change to them once the person is in goes through ChatServer.change_protocol.
IRC_RENDERING_CAPABILITIES = frozenset({"account-notify", "account-tag", "away-notify", "echo-message", "extended-join",
                                        "invite-notify", "message-tags", "multi-prefix", "server-time", "setname",
                                        "userhost-in-names", "draft/chathistory", "draft/read-marker"})
IRC_RENDERING_SETS: dict[frozenset[str], frozenset[str]] = {}   # each set of them in use, kept once (at most 2**n)
IRC_CHAT_EVENTS = (Said, Acted, PrivateFrom, PrivateTo, TagMessage)     # with a line id and client tags


def irc_motd_replies(nick: str, motd: list[str]) -> list[str]:
    """The admin's --motd as 375, 372 a line and 376; 422 when there is none."""
    if not motd:
        return [irc_numeric("ERR_NOMOTD", nick)]
    return [irc_numeric("RPL_MOTDSTART", nick, text=f"- {irc_server_name()} Message of the day - "),
            *(irc_numeric("RPL_MOTD", nick, text=f"- {line}") for line in motd),
            irc_numeric("RPL_ENDOFMOTD", nick)]


@functools.lru_cache(maxsize=4)
def irc_welcome_after_001(server_name: str, started: float, tokens: tuple[str, ...],
                          motd: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """002 to 005, the message of the day and the service's notice: the same for everyone but the
    nickname, so made once (for these arguments), each line cut where the nickname goes."""
    version = f"pyChat-{VERSION}"
    created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
    mark = "\x01"             # in no server name, and before any text a line holds
    lines = [irc_numeric("RPL_YOURHOST", mark, text=f"Your host is {server_name}, running version {version}"),
             irc_numeric("RPL_CREATED", mark, text=f"This server was created {created}"),
             # The channel modes, then those that take a word: a mask, the key, the limit, who.
             irc_numeric("RPL_MYINFO", mark, server_name, version, IRC_USER_MODES, IRC_CHANNEL_MODES,
                         IRC_CHANNEL_MODES_WITH_WORDS),
             *(irc_numeric("RPL_ISUPPORT", mark, *tokens[n:n + 12]) for n in range(0, len(tokens), 12)),
             *irc_motd_replies(mark, list(motd)),
             format_irc_message("NOTICE", (mark, f"pyChat's own commands: /msg {IRC_SERVICE_NICK} help"))]
    return tuple((before, after) for before, _, after in (line.partition(mark) for line in lines))


def irc_help_replies(nick: str, subject: str, commands: Iterable[str]) -> list[str]:
    """HELP SUBJECT: 704, a 705 a line and 706 about one of COMMANDS (IRC's, as this server takes them), or
    the list of them without a subject; 524 for anything else. pyChat's own commands are /msg pyChat help."""
    subject = subject.upper()
    if not subject:
        topic, lines = "index", [f"Commands: {' '.join(sorted(commands))}", "HELP COMMAND tells more of one.",
                                 f"pyChat's own commands: /msg {IRC_SERVICE_NICK} help"]
    elif subject in commands:
        topic, lines = subject, [IRC_HELP.get(subject, f"{subject}: as modern.ircdocs.horse describes it.")]
    else:
        return [irc_numeric("ERR_HELPNOTFOUND", nick, subject)]
    return [irc_numeric("RPL_HELPSTART", nick, topic, text=lines[0]),
            *(irc_numeric("RPL_HELPTXT", nick, topic, text=line) for line in lines[1:]),
            irc_numeric("RPL_ENDOFHELP", nick, topic, text="End of /HELP")]


# What HELP says of IRC's commands; the others read as modern.ircdocs.horse describes them.
IRC_HELP = {
    "PRIVMSG": "PRIVMSG <target>[,<target>] :<text>: say TEXT in a channel (#room) or to a person.",
    "NOTICE": "NOTICE <target> :<text>: like PRIVMSG, never answered automatically.",
    "JOIN": "JOIN <#room>[,<#room>] [<key>]: join rooms (a room that does not exist is made).",
    "PART": "PART <#room> [:<reason>]: leave a room.",
    "TOPIC": "TOPIC <#room> [:<topic>]: show or set a room's topic.",
    "NAMES": "NAMES <#room>: who is in a room.",
    "LIST": "LIST: the rooms, with how many are in each and their topics.",
    "WHO": "WHO <mask>: who fits MASK (a #room, a nickname, or a pattern with * and ?).",
    "WHOIS": "WHOIS <nick>: about someone.",
    "NICK": "NICK <nick>: change your nickname.",
    "MOTD": "MOTD: the message of the day.",
    "LUSERS": "LUSERS: how many are here.",
    "TIME": "TIME: the server's time.",
    "INFO": "INFO: about this server.",
    "HELP": "HELP [<command>]: this help.",
    "QUIT": "QUIT [:<reason>]: leave.",
    "CHATHISTORY": "CHATHISTORY LATEST <target> <*|msgid=ID|timestamp=TIME> <limit> (BEFORE, AFTER, AROUND, BETWEEN, "
                   "TARGETS): what was said, by range (draft/chathistory).",
    "MARKREAD": "MARKREAD <target> [timestamp=TIME]: where you have read up to (draft/read-marker).",
    "REGISTER": "REGISTER * * <password>: make your nickname an account (draft/account-registration); where an "
                "invitation or password reset waits for it, VERIFY <nick> <code> follows.",
    "VERIFY": "VERIFY <nick> <code>: the invitation or password reset code a REGISTER asked for.",
}


def irc_reason(text: str) -> str:
    """A topic, away message or reason from IRC, as the core keeps it: plain text, bounded."""
    return strip_irc_formatting(text)[:IRC_MAX_REASON]


def irc_source(nick: str, user: str = ANONYMOUS_USER) -> str:
    return f"{nick}!{user}@{IRC_HOST}"


def irc_service_source() -> str:
    """The source of what pyChat's service says: pyChat!pyChat@ the server's name."""
    return f"{IRC_SERVICE_NICK}!{IRC_SERVICE_NICK}@{irc_server_name()}"


def irc_isupport_tokens(options: argparse.Namespace) -> list[str]:
    """What 005 says about this server: only what is true of it."""
    # CASEMAPPING: names compare as pyChat compares them, ignoring case (ASCII's and more) and look-alikes.
    tokens = [f"AWAYLEN={IRC_MAX_REASON}", "CASEMAPPING=ascii", "CHANMODES=beI,k,l,imnst",
              f"CHANNELLEN={MAX_NICKNAME_LENGTH + 1}", "CHANTYPES=#", f"KICKLEN={IRC_MAX_REASON}",
              f"NETWORK={IRC_NETWORK}", f"NICKLEN={MAX_NICKNAME_LENGTH}", "PREFIX=(ov)@+", "SAFELIST",
              "EXCEPTS=e", "INVEX=I", f"MAXLIST=b:{MAX_ROOM_MASKS},e:{MAX_ROOM_MASKS},I:{MAX_ROOM_MASKS}",
              f"TARGMAX=JOIN:,KICK:1,NAMES:1,NOTICE:{IRC_MAX_TARGETS},PART:,PRIVMSG:{IRC_MAX_TARGETS},"
              f"TAGMSG:{IRC_MAX_TARGETS},WHOIS:1",
              f"TOPICLEN={IRC_MAX_REASON}", "UTF8ONLY", "ELIST=MNU", "WHOX", f"MONITOR={WATCH_LIMIT}", "BOT=B",
              f"NAMELEN={IRC_MAX_REALNAME}", f"CHATHISTORY={IRC_HISTORY_MOST}", "MSGREFTYPES=timestamp,msgid"]
    if options.rooms_per_person:
        tokens.append(f"CHANLIMIT=#:{options.rooms_per_person}")
    return sorted(tokens)


class IrcProtocol:
    """IRC's words for the core's events, for one IRC connection.

    A room's line is rendered once for each group of its audience that gets
    the same bytes (see Room.audiences, keyed by protocol object). Two IRC
    protocol objects with the same rendering capabilities are equal, so every
    IRC connection with those capabilities is in one group, and the room's
    events are rendered by whichever of their objects the room holds: those
    renderings use nothing of the receiver. Events sent to one person alone
    (numerics, your own JOIN, private messages) name the receiver, and are
    rendered by that person's own object.
    """

    name = "IRC"
    opcode: int | None = None       # a WebSocket's, for WebSocketIrcProtocol: its objects are equal by it too
    lists_members = True            # Entered carries everyone in the room, for NAMES
    help_command = f"/msg {IRC_SERVICE_NICK} help"     # an IRC client's own /help is its client's help
    has_current_room = False        # every line names its channel: an IRC user may be in none

    def __init__(self, connection: IrcConnection, capabilities: frozenset[str] = frozenset()) -> None:
        self.connection = connection
        rendering = capabilities & IRC_RENDERING_CAPABILITIES
        self.capabilities = IRC_RENDERING_SETS.setdefault(rendering, rendering)     # one copy for everyone
        self.hash = hash((self.opcode, self.capabilities))     # asked for every receiver of a line
        self.server_time = "server-time" in capabilities
        self.message_tags = "message-tags" in capabilities

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, IrcProtocol) and other.opcode == self.opcode
                and other.capabilities == self.capabilities)

    def __hash__(self) -> int:
        return self.hash

    @property
    def me(self) -> str:
        """The receiver's nickname: events sent to one person alone are sent under the server's lock."""
        return self.connection.nick

    def source(self, nick: str) -> str:
        """NICK!USER@HOST of someone online (events are rendered under the server's lock)."""
        return irc_source(nick, self.connection.username_of(nick))

    def encode(self, event: Any, tagged: bool = False) -> bytes:
        """EVENT as IRC messages (b"" when IRC has nothing to say of it); TAGGED does not matter to IRC,
        whose every channel message names its channel."""
        lines = self.RENDERERS.get(type(event), IrcProtocol.in_pychats_words)(self, event)
        if not lines:
            return b""
        tags = {}
        chat = event.line if isinstance(event, Replayed) else event
        said = isinstance(chat, IRC_CHAT_EVENTS)
        if self.server_time:
            # A chat line's time is its id's, so that it reads the same live and in every history reply.
            tags["time"] = (irc_message_time(int(chat.line_id)) if said and chat.line_id.isdigit() else
                            irc_server_time(event.when if isinstance(event, (Replayed, OfflinePrivate))
                                            else time.time()))
        line_id = ""
        if said:
            if chat.account and "account-tag" in self.capabilities:
                tags["account"] = chat.account
            if self.message_tags:
                tags.update(chat.client_tags)
                if chat.bot:
                    tags["bot"] = ""
                line_id = chat.line_id
        if not line_id:
            return "".join(self._tagged(line, tags) for line in lines).encode("utf-8")
        # A long line goes out in pieces: each has an id of its own, the same for every receiver.
        return "".join(self._tagged(line, {**tags, "msgid": line_id + (f"-{n}" if n else "")})
                       for n, line in enumerate(lines)).encode("utf-8")

    @staticmethod
    def _tagged(line: str, tags: dict[str, str]) -> str:
        line = irc_within_limit(line)
        return f"@{format_irc_tags(tags)} {line}\r\n" if tags else f"{line}\r\n"

    # -- room events: nothing of the receiver --------------------------------------------

    def said(self, event: Said, prefix: str = "") -> list[str]:
        return irc_text_messages("NOTICE" if event.notice else "PRIVMSG", f"#{event.room}", prefix + event.text,
                                 self.source(event.nick))

    def acted(self, event: Acted, prefix: str = "") -> list[str]:
        return irc_text_messages("PRIVMSG", f"#{event.room}", prefix + event.text, self.source(event.nick),
                                 wrap=CTCP_ACTION)

    def joined(self, event: Joined) -> list[str]:
        """JOIN, and AWAY after it for someone who comes in away (to those who asked for away-notify)."""
        lines = [self._join(event.room, event.nick, event.account, event.realname)]
        if event.away:
            lines += self.away_changed(AwayChanged(event.nick, event.away))
        return lines

    def _join(self, room: str, nick: str, account: str | None, realname: str) -> str:
        """JOIN; with extended-join, with the account ('*' for none) and the real name (the nickname for
        someone who gave none)."""
        extended = (account or "*", realname or nick) if "extended-join" in self.capabilities else ()
        return format_irc_message("JOIN", (f"#{room}", *extended), self.source(nick))

    def tag_message(self, event: TagMessage) -> list[str]:
        """TAGMSG, only to those who take message tags; its tags are put on by encode()."""
        if not self.message_tags:
            return []
        return [format_irc_message("TAGMSG", (event.target,), self.source(event.nick))]

    def left(self, event: Left) -> list[str]:
        return [format_irc_message("PART", (f"#{event.room}", *((event.reason,) if event.reason else ())),
                                   self.source(event.nick))]

    def kicked(self, event: Kicked) -> list[str]:
        return [format_irc_message("KICK", (f"#{event.room}", event.nick, event.reason or event.by),
                                   self.source(event.by))]

    def topic_changed(self, event: TopicChanged) -> list[str]:
        return [format_irc_message("TOPIC", (f"#{event.room}", event.topic), self.source(event.nick))]

    def mode_changed(self, event: ModeChanged) -> list[str]:
        """One MODE for all the changes: '+mv-l bob'."""
        letters, words, sign = "", [], ""
        for setting, value in event.changes:
            letter, word = irc_mode_letter(setting, value)
            if letter[0] != sign:
                sign = letter[0]
                letters += sign
            letters += letter[1]
            words += [word] if word is not None else []
        return [format_irc_message("MODE", (f"#{event.room}", letters, *words), self.source(event.nick))]

    # -- about a person, told once to each who shares a room: nothing of the receiver either ---

    def quit(self, event: Quit) -> list[str]:
        return [format_irc_message("QUIT", (f"Quit: {event.reason}" if event.reason else "Quit",),
                                   self.source(event.nick))]

    def renamed(self, event: Renamed) -> list[str]:
        return [format_irc_message("NICK", (event.new,), irc_source(event.old, self.connection.username_of(event.new)))]

    def away_changed(self, event: AwayChanged) -> list[str]:
        if "away-notify" not in self.capabilities:
            return []
        return [format_irc_message("AWAY", (event.reason,) if event.reason else (), self.source(event.nick))]

    def operators_message(self, event: OperatorsMessage) -> list[str]:
        return [format_irc_message("WALLOPS", (event.text,), self.source(event.nick))]

    def realname_changed(self, event: RealnameChanged) -> list[str]:
        if "setname" not in self.capabilities:
            return []
        return [format_irc_message("SETNAME", (event.realname,), self.source(event.nick))]

    def invited_someone(self, event: InvitedSomeone) -> list[str]:
        if "invite-notify" not in self.capabilities:
            return []
        return [format_irc_message("INVITE", (event.nick, f"#{event.room}"), self.source(event.by))]

    def came_online(self, event: CameOnline) -> list[str]:
        return [irc_numeric("RPL_MONONLINE", self.me, text=self.source(event.nick))]

    def went_offline(self, event: WentOffline) -> list[str]:
        return [irc_numeric("RPL_MONOFFLINE", self.me, text=event.nick)]

    def account_changed(self, event: AccountChanged) -> list[str]:
        if "account-notify" not in self.capabilities:
            return []
        return [format_irc_message("ACCOUNT", (event.account or "*",), self.source(event.nick))]

    # -- to one person: these name the receiver --------------------------------------------------

    def entered(self, event: Entered) -> list[str]:
        channel = f"#{event.room}"
        names = self.names_in_names(event.members, event.ranks)
        person = self.connection.person         # None while signing in: their account is the one of SASL
        account, realname = (person.account, person.realname) if person else (self.connection.account,
                                                                              self.connection.realname)
        replies = [self._join(event.room, self.me, account, realname),
                   *irc_names_replies(self.me, channel, names, event.secret)]
        if "draft/read-marker" in self.capabilities:     # before the end of NAMES, as the specification says
            position = self.connection.server.read_position(person, room_target(event.room)) if person else None
            replies.insert(-1, self.read_marker(channel, position))
        return replies

    @staticmethod
    def read_marker(name: str, position: int | None) -> str:
        """MARKREAD NAME with the time of the line read up to, or '*' when there is none."""
        return format_irc_message("MARKREAD", (name, f"timestamp={irc_message_time(position)}" if position else "*"))

    def read_up_to(self, event: ReadUpTo) -> list[str]:
        return [self.read_marker(event.name, event.message_id)] if "draft/read-marker" in self.capabilities else []

    def names_in_names(self, members: Iterable[str], ranks: Iterable[tuple[str, bool, bool]]) -> list[str]:
        """The entries of a NAMES list for the nicknames MEMBERS, given RANKS (nickname, whether a room
        operator, whether voiced: those with neither may be left out): each nickname, after '@' for a room
        operator and '+' for a voice (both with multi-prefix); with userhost-in-names, the whole
        NICK!USER@HOST."""
        multi = "multi-prefix" in self.capabilities
        prefixes = {nick: irc_prefix(operator, voiced, multi) for nick, operator, voiced in ranks}
        if "userhost-in-names" in self.capabilities:
            return [prefixes.get(nick, "") + self.source(nick) for nick in members]
        return [prefixes[nick] + nick if nick in prefixes else nick for nick in members]

    def topic(self, event: Topic) -> list[str]:
        return irc_topic_replies(self.me, event.room, event.topic, event.by and self.source(event.by), event.when)

    def replayed(self, event: Replayed) -> list[str]:
        """What was said before you came; nothing for a client that asked for draft/chathistory, which
        fetches what it wants."""
        if "draft/chathistory" in self.capabilities:
            return []
        prefix = "" if self.server_time else f"[history {_utc(event.when)}] "
        return self.RENDERERS[type(event.line)](self, event.line, prefix)

    def history_notice(self, event: NewSince | HistoryPage | HistoryEnd) -> list[str]:
        """The lines around history shown without a batch: a notice to the channel, or to you for a private
        conversation, in pyChat's words; nothing for a client that asked for draft/chathistory."""
        if "draft/chathistory" in self.capabilities:
            return []
        return [format_irc_message("NOTICE", (f"#{event.room}" if event.room else self.me, PYCHAT.line(event)[4:]))]

    def you_left(self, event: YouLeft) -> list[str]:
        return self.left(Left(event.room, self.me, event.reason))

    def they_are_away(self, event: TheyAreAway) -> list[str]:
        return [irc_numeric("RPL_AWAY", self.me, event.nick, text=event.reason)]

    def you_were_kicked(self, event: YouWereKicked) -> list[str]:
        return self.kicked(Kicked(event.room, self.me, event.by, event.reason))

    def invited(self, event: Invited) -> list[str]:
        return [format_irc_message("INVITE", (self.me, f"#{event.room}"), self.source(event.by))]

    def private_from(self, event: PrivateFrom, prefix: str = "") -> list[str]:
        return irc_text_messages("NOTICE" if event.notice else "PRIVMSG", self.me, prefix + event.text,
                                 self.source(event.nick))

    def offline_private(self, event: OfflinePrivate) -> list[str]:
        """A message left for you while you were away, from its sender, at its time (or saying when)."""
        prefix = "" if self.server_time else f"[offline {_utc(event.when)}] "
        return irc_text_messages("PRIVMSG", self.me, prefix + event.text, self.source(event.nick))

    def private_to(self, event: PrivateTo, prefix: str = "") -> list[str]:
        """Your own private line: its echo, and, whether the client asked for echoes or not, one sent from
        another of your sessions or replayed (prefix)."""
        if "echo-message" not in self.capabilities and not event.elsewhere and not prefix:
            return []
        return irc_text_messages("NOTICE" if event.notice else "PRIVMSG", event.nick, prefix + event.text,
                                 self.source(self.me))

    def notice(self, event: Notice) -> list[str]:
        return irc_text_messages("NOTICE", self.me, event.text, irc_server_name())

    def reply(self, event: Reply | Error) -> list[str]:
        """Replies and errors come from the commands, so from the service that runs them."""
        return irc_text_messages("NOTICE", self.me, event.text, irc_service_source())

    def welcome(self, event: Welcome) -> list[str]:
        return self.connection.welcome_burst(event.nick, list(event.motd))

    def closing(self, event: Any) -> list[str]:
        """Bye, ShuttingDown, DisconnectedBy, Banned or Farewell: ERROR, with why."""
        why = {Bye: lambda e: "Quit", ShuttingDown: lambda e: "Server shutting down",
               DisconnectedBy: lambda e: f"Disconnected by {e.by}{_because(e.reason)}",
               Banned: lambda e: f"Banned by {e.by} {e.how_long}{_because(e.reason)}",
               Farewell: lambda e: e.reason[:1].upper() + e.reason[1:]}[type(event)](event)
        return [format_irc_message("ERROR", (f"Closing link: {self.me} ({why})",), source=None)]

    def in_pychats_words(self, event: Any) -> list[str]:
        """An event IRC has no words of its own for: pyChat's line for it, as a notice from the server."""
        return irc_text_messages("NOTICE", self.me, PYCHAT.line(event), irc_server_name())

    def nothing(self, event: Any) -> list[str]:
        """Events IRC has no words for: pyChat's prompts (IRC clients sign in with NICK, PASS and SASL),
        and the current room, which IRC does not have."""
        return []

    RENDERERS: dict[type, Callable[..., list[str]]] = {
        Said: said, Acted: acted, Joined: joined, Left: left, Kicked: kicked, TopicChanged: topic_changed,
        ModeChanged: mode_changed, Quit: quit, Renamed: renamed, AwayChanged: away_changed,
        Entered: entered, Topic: topic, Replayed: replayed, HistoryEnd: history_notice, YouLeft: you_left,
        YouWereKicked: you_were_kicked, Invited: invited, PrivateFrom: private_from, PrivateTo: private_to,
        Notice: notice, Reply: reply, Error: reply, Welcome: welcome, Bye: closing, ShuttingDown: closing,
        DisconnectedBy: closing, Banned: closing, Farewell: closing,
        OfflinePrivate: offline_private, Prompt: nothing, AccountPrompt: nothing, NowTalking: nothing,
        NewSince: history_notice, HistoryPage: history_notice,
        TheyAreAway: they_are_away, OperatorsMessage: operators_message, TagMessage: tag_message,
        AccountChanged: account_changed, CameOnline: came_online, WentOffline: went_offline,
        InvitedSomeone: invited_someone, RealnameChanged: realname_changed, ReadUpTo: read_up_to,
    }


def irc_prefix(operator: bool, voiced: bool, multi_prefix: bool) -> str:
    """@ for a room operator, + for a voice; both (multi-prefix), or the higher."""
    if multi_prefix:
        return "@" * operator + "+" * voiced
    return "@" if operator else "+" if voiced else ""


def irc_mode_letter(setting: str, value: str) -> tuple[str, str | None]:
    """The letter with its sign, and the word after it (or None), of one change of a room's settings. The
    key itself is never shown."""
    for letter, sides in ROOM_MODE_LETTERS.items():
        for sign, (named, fixed) in zip("+-", sides):
            if named == setting and fixed == value:
                return sign + letter, None
    for letter, sides in ROOM_MODE_LETTERS.items():
        for sign, (named, fixed) in zip("+-", sides):
            if named == setting and fixed is None:
                return sign + letter, "*" if setting == "key" else value
    raise ValueError(f"no letter for {setting} {value}")


def irc_channel_modes(settings: commands.RoomSettings) -> list[str]:
    """A room's modes as 324 gives them: '+iklnt', then the limit (the key is not shown)."""
    flags = [("i", settings.invite_only), ("k", settings.has_key), ("l", settings.limit is not None),
             ("m", settings.moderated), ("n", not settings.outside_messages), ("s", settings.secret),
             ("t", not settings.topic_by_everyone)]
    words = ["*"] * settings.has_key + [str(settings.limit)] * (settings.limit is not None)
    return ["+" + "".join(letter for letter, on in flags if on), *words]


WHOX_FIELDS = "tcuihsnfdlaor"           # WHOX's fields, in the order a 354 gives them
LIST_FILTERS = 20                       # of one LIST, so that matching stays cheap against many rooms


def irc_whox_fields(argument: str) -> tuple[str, str]:
    """WHO's '%FIELDS[,TOKEN]': the letters known, in WHOX's order, and the token (1 to 3 digits; if it is
    not, t is dropped)."""
    letters, _, token = argument[1:].partition(",")
    if not (token.isdigit() and len(token) <= 3):
        letters, token = letters.replace("t", ""), ""
    return "".join(letter for letter in WHOX_FIELDS if letter in letters), token


def irc_list_wanted(argument: str) -> Callable[[commands.RoomInfo], bool] | None:
    """LIST's filter: channels or masks (#dev, #dev*) of which a room must fit one, !MASK that it must not
    fit, and >N or <N people (the first LIST_FILTERS of them); None when there is none."""
    masks, unwanted, counts = [], [], []
    for item in [item for item in argument.casefold().split(",") if item][:LIST_FILTERS]:
        if item[0] in "<>" and irc_number(item[1:]) is not None:
            counts.append((item[0], irc_number(item[1:])))
        elif item.startswith("!"):
            unwanted.append(item[1:])
        else:
            masks.append(item)
    if not (masks or unwanted or counts):
        return None

    def wanted(room: commands.RoomInfo) -> bool:
        name = f"#{room.name.casefold()}"
        return ((not masks or any(fits_pattern(mask, name) for mask in masks))
                and not any(fits_pattern(mask, name) for mask in unwanted)
                and all(room.people > n if sign == ">" else room.people < n for sign, n in counts))
    return wanted


def irc_comma_lists(name: str, me: str, items: list[str], *params: str) -> list[str]:
    """The numeric NAME with ITEMS as a comma-separated closing text, over as many messages as they need."""
    room = IRC_MAX_BODY_BYTES - len(irc_numeric(name, me, *params, text="").encode("utf-8"))
    return [irc_numeric(name, me, *params, text=line) for line in join_in_lines(items, room, ",")]


def irc_topic_replies(me: str, room: str, topic: str, by: str | None, when: float) -> list[str]:
    """332 with the topic of ROOM, and 333 with who set it (BY: their NICK!USER@HOST) and when, if known."""
    lines = [irc_numeric("RPL_TOPIC", me, f"#{room}", text=topic)]
    if by:
        lines.append(irc_numeric("RPL_TOPICWHOTIME", me, f"#{room}", by, str(int(when))))
    return lines


def irc_names_replies(me: str, channel: str, names: list[str], secret: bool = False) -> list[str]:
    """353 (as many as the names need) and 366 for CHANNEL; a secret one is marked '@', others '='."""
    symbol = "@" if secret else "="
    room = IRC_MAX_BODY_BYTES - len(irc_numeric("RPL_NAMREPLY", me, symbol, channel, text="").encode("utf-8"))
    return [*(irc_numeric("RPL_NAMREPLY", me, symbol, channel, text=line) for line in join_in_lines(names, room)),
            irc_numeric("RPL_ENDOFNAMES", me, channel)]


# ---------------------------------------------------------------------------
# The IRC connection and its listener
# ---------------------------------------------------------------------------

# What a refusal of the core is in IRC's numerics, and what the numeric names: the person, the room,
# or both. The text is always the core's own. A refusal IRC has no numeric for is a notice.
IRC_REFUSALS = {
    "no-such-person": ("ERR_NOSUCHNICK", "nick"), "no-such-room": ("ERR_NOSUCHCHANNEL", "room"),
    "not-in-room": ("ERR_NOTONCHANNEL", "room"), "too-many-rooms": ("ERR_TOOMANYCHANNELS", "room"),
    "invite-only": ("ERR_INVITEONLYCHAN", "room"), "bad-key": ("ERR_BADCHANNELKEY", "room"),
    "not-room-operator": ("ERR_CHANOPRIVSNEEDED", "room"), "cannot-send": ("ERR_CANNOTSENDTOCHAN", "room"),
    "they-are-not-in-room": ("ERR_USERNOTINCHANNEL", "both"), "they-are-in-room": ("ERR_USERONCHANNEL", "both"),
    "try-again": ("RPL_TRYAGAIN", "command"), "not-server-operator": ("ERR_NOPRIVILEGES", "nothing"),
    "banned-from-room": ("ERR_BANNEDFROMCHAN", "room"), "room-full": ("ERR_CHANNELISFULL", "room"),
}


class IrcCommand(NamedTuple):
    """A command of IRC's: its handler, the parameters without which the answer is 461, and how many it
    reads (IRC lets a client send more; they are ignored)."""

    handler: Callable[..., None]
    needs: int
    takes: int


def irc_command(handler: Callable[..., None], needs: int = 0) -> IrcCommand:
    parameters = list(inspect.signature(handler).parameters.values())[1:]
    takes = IRC_MAX_PARAMS if any(p.kind is p.VAR_POSITIONAL for p in parameters) else len(parameters)
    return IrcCommand(handler, needs, takes)


class IrcConnection(ClientConnection):
    """One IRC client: the socket, buffers and limits of every connection, with IRC's registration and
    commands. What it reads becomes calls on the core; what the core says comes back through its
    IrcProtocol."""

    tags_given: dict[str, str] | None = None     # the tags of the message being handled
    # The references of the batches sent: drawn for every connection from one count, so that a
    # connection needs no counter of its own (an idle one's memory is most of what 10,000 cost).
    batch_numbers = itertools.count(1)
    protocol_class: type[IrcProtocol] = IrcProtocol     # how its lines are written (WebConnection frames them)

    def setup(self) -> None:
        super().setup()
        self.lines = LineReader(IRC_MAX_TAG_BYTES + IRC_MAX_BODY_BYTES)
        self.capabilities = IrcCapabilities(IRC_CAPABILITIES)
        self.account: str | None = None
        self.output.protocol = self.protocol_class(self)
        self.signing_in_as: str | None = None
        self.realname = ""
        self.username = ANONYMOUS_USER
        self.ping_clock = IrcPingClock(self.server.options.irc_ping, self.connected)
        self.last_active = self.connected       # the last message other than PING and PONG

    @property
    def nick(self) -> str:
        """Who numerics are addressed to: the person's nickname, or '*' before there is one."""
        return self.person.nick if self.person else self.signing_in_as or "*"

    def username_of(self, nick: str) -> str:
        """(for IrcProtocol) The USER of someone's NICK!USER@HOST; this connection's own while it signs in."""
        if self.person is None and nick == self.signing_in_as:
            return self.username
        return self.server.username_of(nick)

    def handle(self) -> None:
        log.info("%s connection from %s:%s", self.protocol_class.name, *self.client_address[:2])
        try:
            self.start()
            self.send_irc(format_irc_message("NOTICE", ("*", f"*** {self.server.greeting()}")))
            self.register(self.read_messages())
            self.hand_to_switchboard()
        except Disconnect as why:
            self.output.end(why.reason, why.farewell)

    def start(self) -> None:
        """What comes before IRC on this connection: TLS, if the port speaks it."""
        if self.server.tls is not None:
            self.start_tls()

    @staticmethod
    def refusal(reason: str) -> bytes:
        return (format_irc_message("ERROR", (f"Closing link: {reason}",), source=None) + "\r\n").encode("utf-8")

    # -- input ----------------------------------------------------------------

    def read_messages(self) -> Iterator[IrcMessage]:
        """(sign-in thread) The messages this client sends, as they come."""
        for line in self.read_lines():
            message = self.message_of(line)
            if message is not None:
                yield message

    @staticmethod
    def is_keepalive(line: str | None) -> bool:
        """PING and PONG pass flood control uncounted and are never dropped: a client that waits for its
        PONG before it goes on (irctest, a bouncer checking the link) would otherwise wait for ever once
        its other lines spent its allowance, and the answer is one short line. A client that floods with
        them still meets the cap on lines taken from one read (lines_allowed())."""
        if line is None:
            return False
        words = line.split(" ", 3)
        while words and words[0].startswith(("@", ":")):
            words.pop(0)
        return bool(words) and words[0].upper() in ("PING", "PONG")

    def message_of(self, line: str | None) -> IrcMessage | None:
        """The message LINE holds; a line that holds none is answered here (None)."""
        self.ping_clock.heard(self.last_heard)
        if line is None:
            self.send_irc(irc_numeric("ERR_INPUTTOOLONG", self.nick))
            return None
        try:
            message = parse_irc_message(line)
        except IrcLineError as problem:
            params = ("*",) if problem.numeric == "ERR_UNKNOWNCOMMAND" else ()
            self.send_irc(irc_numeric(problem.numeric, self.nick, *params, text=str(problem)))
            return None
        if message is not None and isinstance(line, NotUtf8):
            self.fail(message.command, "INVALID_UTF8", "Messages must be UTF-8: this one was dropped")
            return None
        if message is not None and message.command not in ("PING", "PONG"):
            self.last_active = self.last_heard
        return message

    def on_line(self, line: str | None, on_switchboard: bool = False) -> bool:
        """One line from a signed-in client. On the switchboard only what waits for nothing is done (PING,
        PONG and messages to channels); anything else is left (False) for a worker."""
        message = self.message_of(line)
        if message is None:
            return True
        if on_switchboard and not (message.command in ("PING", "PONG") or (
                message.command in ("PRIVMSG", "NOTICE") and message.params
                and all(target.startswith("#") for target in message.params[0].split(",")))):
            return False
        self.on_message(message)
        return True

    def clock_is_due(self, now: float) -> bool:
        timeout = self.server.options.idle_timeout
        return now >= self.ping_clock.deadline() or bool(timeout) and now >= self.last_active + timeout

    def check_clock(self, now: float) -> None:
        """(switchboard) PING a quiet client and let go of one that does not answer.

        --idle-timeout counts from the last message other than PING and PONG:
        answering pings is not saying anything.
        """
        timeout = self.server.options.idle_timeout
        if timeout and now >= self.last_active + timeout:
            raise Disconnect("timed out", Farewell(f"nothing said for {timeout:g} s"))
        due = self.ping_clock.due(now)
        if due == "ping":
            self.send_irc(format_irc_message("PING", (irc_server_name(),)))
        elif due == "timeout":
            why = f"Ping timeout: {now - self.ping_clock.last_heard:.0f} seconds"
            raise Disconnect(why, Farewell(why))

    # -- registration ---------------------------------------------------------------

    def register(self, messages: Iterator[IrcMessage]) -> None:
        """Read PASS, NICK, USER, CAP and AUTHENTICATE until the client can sign in; the core then
        welcomes it.

        A registered name is signed in to with SASL PLAIN (the account's name and
        password); the person then has the account's name, whatever NICK said.
        Anyone else takes a name nobody registered, as on the pyChat port; on a
        --private server only accounts come in.
        """
        registration = IrcRegistration(self.capabilities)
        password_checked = not self.server.options.password

        def check_server_password() -> None:
            nonlocal password_checked
            if not password_checked:
                self.prove(registration.target, "server password",
                           lambda: same_secret(registration.password or "", self.server.options.password))
                password_checked = True

        for message in messages:
            if message.command == "QUIT":
                raise Disconnect("quit before signing in", Bye())
            if message.command in ("AUTHENTICATE", "REGISTER", "VERIFY"):
                # The server password comes first, as at the pyChat port: no one who lacks it may try an
                # account's password, or make an account, which lasts.
                if not password_checked and registration.password is None:
                    self.send_irc(irc_numeric("ERR_SASLFAIL" if message.command == "AUTHENTICATE" else
                                              "ERR_PASSWDMISMATCH", registration.target, text=(
                                                  f"This server has a password: give it (PASS) before "
                                                  f"{message.command}")))
                    continue
                check_server_password()
                if message.command == "AUTHENTICATE":
                    self.authenticate(registration, message.params[0] if message.params else "")
                else:
                    self.account_registration(message.command, message.params, registration.nick, registration)
                continue
            self.send_irc(*registration.handle(message))
            if not registration.ready:
                continue
            check_server_password()
            nick, problem = self.name_for(registration.nick)
            if problem is None:
                self.realname, self.username = registration.realname, registration.username
                self.signing_in_as = nick
                self.output.protocol = self.protocol_class(self, frozenset(self.capabilities.enabled))
                problem = self.server.sign_in(self, nick, self.account, registration.realname, registration.username)
                if problem is None:
                    if self.server.options.irc_auto_join and not self.person.rooms:
                        self.irc_join(self.server.options.irc_auto_join)
                    return
                self.signing_in_as = None
            self.send_irc(irc_numeric("ERR_NICKNAMEINUSE", "*", registration.nick, text=problem))
            registration.nick = None

    def name_for(self, wanted: str) -> tuple[str, str | None]:
        """The nickname to sign in with, or why WANTED cannot be had."""
        if self.account is not None:
            return self.account, None
        registered = self.server.gate.account_of(wanted)
        if registered is not None:
            return wanted, (f"{registered} is a registered name: sign in to it with SASL (PLAIN, the account's "
                            f"name and password), or choose another nickname.")
        if self.server.options.private:
            self.send_irc(irc_numeric("ERR_PASSWDMISMATCH", "*", text=(
                "This server is private: sign in to your account with SASL (PLAIN), or make the account you "
                "were invited to with REGISTER * * PASSWORD and VERIFY NICK CODE.")))
            raise Disconnect("private server, no account", Farewell("this server is private"))
        return wanted, None

    def authenticate(self, registration: IrcRegistration, argument: str) -> None:
        """AUTHENTICATE, while signing in: SASL PLAIN against the server's accounts, under the limits on
        guessing."""
        nick = registration.target
        if self.account is not None:
            self.send_irc(irc_numeric("ERR_SASLALREADY", nick))
            return
        replies, credentials = registration.sasl.handle(nick, argument)
        self.send_irc(*replies)
        if credentials is None:
            return
        try:
            proved = self.server.gate.check_account(self, credentials[0], credentials[1])
        except TooManyGuesses as refusal:
            self.send_irc(irc_numeric("ERR_SASLFAIL", nick, text=str(refusal)))
            raise Disconnect("too many wrong passwords from the address", Farewell(str(refusal))) from None
        if proved is None:
            self.send_irc(irc_numeric("ERR_SASLFAIL", nick))
            return
        account, what = proved
        if what == "code":
            self.send_irc(irc_numeric("ERR_SASLFAIL", nick, text=(
                f"That is the password reset code for {account}: choose a new password with "
                f"REGISTER {account} * NEW-PASSWORD, then VERIFY {account} CODE")))
            return
        self.account = account
        # The nickname they will have is the account's, whatever NICK said (and '*' before any NICK).
        self.send_irc(irc_numeric("RPL_LOGGEDIN", nick, irc_source(account), account,
                                  text=f"You are now logged in as {account}"),
                      irc_numeric("RPL_SASLSUCCESS", nick))

    # REGISTER's and VERIFY's FAIL codes for the gate's refusals (Refused.kind).
    REGISTRATION_FAILURES = {"weak-password": "WEAK_PASSWORD", "name-taken": "ACCOUNT_EXISTS",
                             "too-many-accounts": "TEMPORARILY_UNAVAILABLE"}

    def account_registration(self, command: str, params: list[str] | tuple[str, ...], nick: str | None,
                             registration: IrcRegistration | None = None) -> None:
        """REGISTER <account> <email|*> <password> and VERIFY <account> <code> (draft/account-registration):
        make the account of one's nickname, and be signed in to it, before signing in or after.

        The account is the nickname (`*` stands for it); no e-mail is taken.
        Where a code waits for the name (an invitation, which a --private
        server needs for every new account, or a password reset), REGISTER
        gives the password and is answered VERIFICATION_REQUIRED, and VERIFY
        gives the code, counted as a guess like any secret (REGISTRATION, the
        client's sign-in under way, keeps what waits for it). Signed in,
        REGISTER is pyChat's /register.
        """
        if len(params) < (3 if command == "REGISTER" else 2):
            usage = "REGISTER * * PASSWORD" if command == "REGISTER" else "VERIFY NICK CODE"
            self.send_irc(irc_numeric("ERR_NEEDMOREPARAMS", nick or "*", command, text=f"Say {usage}"))
            return
        if self.account is not None or (self.person is not None and self.person.account):
            self.fail(command, "ALREADY_AUTHENTICATED", self.account or self.person.account,
                      "You are signed in to an account")
            return
        if not nick:
            self.fail(command, "NEED_NICK", "*", "Choose a nickname first (NICK): the account is named after it")
            return
        wanted = nick if params[0] == "*" else params[0]
        if name_key(normal_name(wanted)) != name_key(nick):
            self.fail(command, "ACCOUNT_NAME_MUST_BE_NICK", wanted, f"An account is named after its nickname: "
                                                                    f"REGISTER * * PASSWORD makes the account {nick}")
            return
        gate = self.server.gate
        if command == "VERIFY":
            self.verify_code(registration, nick, params[1])
            return
        password = " ".join(params[2:])     # a password of several words, sent without the ':' it needs
        waiting = gate.code_waiting(nick) if registration is not None else None
        if waiting is not None:
            problem = password_problem(password, gate.account_of(nick) or nick)
            if problem:
                self.fail(command, "WEAK_PASSWORD", nick, problem)
                return
            registration.verifying = (nick, password)
            what = "invitation code" if waiting == "account" else "password reset code"
            self.send_irc(format_irc_message("REGISTER", ("VERIFICATION_REQUIRED", nick,
                                                          f"Give the {what} for {nick}: VERIFY {nick} CODE")))
            return
        registered = gate.account_of(nick)
        if registered is not None:
            self.fail(command, "ACCOUNT_EXISTS", nick, f"{registered} is registered: sign in to it with SASL")
            return
        try:
            if self.person is not None:
                self.server.register_account(self.session, password)
            elif self.server.options.private:
                self.fail(command, "BAD_ACCOUNT_NAME", nick, "This server is private: only someone an operator "
                                                             "invited (/invite-account) may make an account")
                return
            elif self.server.is_here(nick):
                self.fail(command, "ACCOUNT_EXISTS", nick, f"{nick} is someone else's nickname now")
                return
            else:
                gate.register(nick, password, self.address)
                self.account = nick
        except Refused as refusal:
            self.fail(command, self.REGISTRATION_FAILURES.get(refusal.kind, "TEMPORARILY_UNAVAILABLE"), nick,
                      str(refusal))
            return
        self.signed_in_to(command, nick, "registered")

    def verify_code(self, registration: IrcRegistration | None, nick: str, code: str) -> None:
        """VERIFY: the code of the registration REGISTER began; a wrong one is a guess, counted."""
        waiting = registration.verifying if registration is not None else None
        if waiting is None or name_key(waiting[0]) != name_key(nick):
            self.fail("VERIFY", "INVALID_CODE", nick,
                      f"No registration of {nick} waits for a code: send REGISTER first")
            return
        try:
            account = self.server.gate.redeem(self, waiting[0], code, waiting[1])
        except TooManyGuesses as refusal:
            self.fail("VERIFY", "INVALID_CODE", nick, str(refusal))
            raise Disconnect("too many wrong codes from the address", Farewell(str(refusal))) from None
        except Refused as refusal:
            self.fail("VERIFY", self.REGISTRATION_FAILURES.get(refusal.kind, "TEMPORARILY_UNAVAILABLE"), nick,
                      str(refusal))
            return
        if account is None:
            self.fail("VERIFY", "INVALID_CODE", nick, f"Wrong code for {nick}")
            return
        registration.verifying = None
        self.account = account
        self.signed_in_to("VERIFY", account, "ready: its password is the one given")

    def signed_in_to(self, command: str, account: str, what: str) -> None:
        """COMMAND made ACCOUNT (or gave it its password): say so, and that the connection is signed in to it."""
        self.send_irc(format_irc_message(command, ("SUCCESS", account, f"The account {account} is {what}; "
                                                                       f"you are signed in to it")))
        self.send_irc(irc_numeric("RPL_LOGGEDIN", self.nick if self.person else account,
                                  irc_source(account, self.username),
                                  account, text=f"You are now logged in as {account}"))

    def prove(self, nick: str, what: str, is_right: Callable[[], bool]) -> None:
        """Check a secret the client gave, under the limits on guessing; a wrong one ends the connection."""
        try:
            if self.server.gate.check_secret(self, what, is_right):
                return
        except TooManyGuesses as refusal:
            self.send_irc(irc_numeric("ERR_PASSWDMISMATCH", nick, text=str(refusal)))
            raise Disconnect("too many wrong passwords from the address", Farewell(str(refusal))) from None
        self.send_irc(irc_numeric("ERR_PASSWDMISMATCH", nick))
        raise Disconnect(f"wrong {what}", Farewell(f"wrong {what}"))

    def welcome_burst(self, nick: str, motd: list[str]) -> list[str]:
        """001 to 005 and the message of the day MOTD: what a client waits for before it does anything.
        (Rendered under the chat lock, so without LUSERS, which asks the server for its counts.)"""
        rest = irc_welcome_after_001(irc_server_name(), self.server.started,
                                     tuple(irc_isupport_tokens(self.server.options)), tuple(motd))
        return [irc_numeric("RPL_WELCOME", nick,
                            text=f"Welcome to the {IRC_NETWORK} IRC network, {irc_source(nick, self.username)}"),
                *(before + nick + after for before, after in rest)]

    # -- commands -----------------------------------------------------------------

    def on_message(self, message: IrcMessage) -> None:
        """One message from a signed-in client: where IRC becomes calls on the core. The replies to one
        with a label (labeled-response), whatever part of the server sends them, are gathered and sent
        labeled, as one answer."""
        label = (message.tags or {}).get("label")
        if not (label and {"labeled-response", "batch"} <= self.capabilities.enabled
                and len(label.encode("utf-8")) <= IRC_MAX_LABEL_BYTES):
            self.dispatch(message)
            return
        replies: list[bytes] = []
        try:
            with self.server.switchboard.gathered(self.output) as replies:
                self.dispatch(message)
        finally:
            self.send_irc(*irc_labeled_reply(label, list(map(self.irc_wire_lines, replies)), self.next_batch()))

    def next_batch(self) -> str:
        """A new batch reference: no two batches share one."""
        return f"b{next(IrcConnection.batch_numbers)}"

    def dispatch(self, message: IrcMessage) -> None:
        """MESSAGE to the handler of its command, with the replies for a wrong one."""
        command = self.COMMANDS.get(message.command)
        log.debug("%r: %s", self, message.command)
        if command is None:
            if self.server.commands.find(message.command.lower()) is not None:
                # irssi sends commands it does not know as they are: /online reaches pyChat's /online.
                self.run_command(f"/{message.command.lower()} {' '.join(message.params)}")
            else:
                self.send_irc(irc_numeric("ERR_UNKNOWNCOMMAND", self.nick, message.command))
            return
        if len(message.params) < command.needs:
            self.send_irc(irc_numeric("ERR_NEEDMOREPARAMS", self.nick, message.command))
            return
        self.tags_given = message.tags       # for PRIVMSG, NOTICE and TAGMSG, which pass on client tags
        try:
            command.handler(self, *message.params[:command.takes])
        except Refused as refusal:
            self.refused(refusal, message.command)
        except IrcLineError as problem:
            self.send_irc(irc_numeric(problem.numeric, self.nick, text=str(problem)))

    def refused(self, refusal: Refused, command: str) -> None:
        """The core said no: the numeric for why, with the core's own words; a notice when IRC has none."""
        numeric, names = IRC_REFUSALS.get(refusal.kind, (None, None))
        if numeric is None:
            self.send_irc(format_irc_message("NOTICE", (self.nick, str(refusal)), irc_service_source()))
            return
        room = f"#{refusal.room}" if refusal.room else "*"
        params = {"nick": (refusal.nick or "*",), "room": (room,), "both": (refusal.nick or "*", room),
                  "command": (command,), "nothing": ()}[names]
        self.send_irc(irc_numeric(numeric, self.nick, *params, text=str(refusal)))

    def run_command(self, line: str) -> None:
        """A pyChat slash-command, as if typed in pyChat's client; its replies come from the service."""
        self.server.commands.run(Context(self.server, self.session), clean_text(line))

    def irc_privmsg(self, targets: str = "", text: str = "", notice: bool = False) -> None:
        """PRIVMSG (and NOTICE) to channels, people and the service; NOTICE is never answered with an error."""
        if not targets:
            if not notice:
                self.send_irc(irc_numeric("ERR_NORECIPIENT", self.nick, text="No recipient given (PRIVMSG)"))
            return
        if not text.strip():        # spaces alone are no text: nothing would be said
            if not notice:
                self.send_irc(irc_numeric("ERR_NOTEXTTOSEND", self.nick))
            return
        client_tags = irc_client_tags(self.tags_given)
        for target in self.each_target(targets, "NOTICE" if notice else "PRIVMSG"):
            try:
                self.deliver(target, text, notice, client_tags)
            except Refused as refusal:
                if not notice:
                    self.cannot_send(refusal, "PRIVMSG")

    def each_target(self, targets: str, command: str) -> Iterator[str]:
        """The targets of a PRIVMSG, NOTICE or TAGMSG (COMMAND), each once however it is spelt, the first
        IRC_MAX_TARGETS of them: past those, 407 (but to a NOTICE, which is never answered). Each after the
        first costs a line of the flood allowance, as it would sent alone: a line to four rooms is four lines;
        past the allowance the rest are dropped."""
        if "," not in targets:
            yield targets           # nearly every line: one target, nothing to compare it with
            return
        seen: set[str] = set()
        for target in targets.split(","):
            # A name too long to be anyone's is refused by deliver(), not worth normalising here.
            key = target if len(target) > MAX_NICKNAME_LENGTH + 1 else name_key(normal_name(target))
            if key in seen:
                continue
            if len(seen) == IRC_MAX_TARGETS:
                if command != "NOTICE":
                    self.send_irc(irc_numeric("ERR_TOOMANYTARGETS", self.nick, target[:MAX_NICKNAME_LENGTH + 1]))
                return
            if seen and not self.within_rate():
                return
            seen.add(key)
            yield target

    def cannot_send(self, refusal: Refused, command: str) -> None:
        # Not in the channel: IRC's word is that you cannot send to it.
        kind = "cannot-send" if refusal.kind == "not-in-room" else refusal.kind
        self.refused(Refused(str(refusal), kind, refusal.room, refusal.nick), command)

    def deliver(self, target: str, text: str, notice: bool, client_tags: ClientTags = ()) -> None:
        person = self.person
        self.check_target(target)
        ctcp = parse_ctcp(text)
        if not target.startswith("#") and name_key(target) == IRC_SERVICE_KEY:
            if ctcp is not None:
                self.answer_ctcp(*ctcp)
            elif not notice:
                self.run_command(text if text.startswith("/") else f"/{text}")
            return
        if ctcp is not None and ctcp[0] != "ACTION":
            if not notice:              # a CTCP reply is a NOTICE, and nothing answers a notice
                self.send_irc(format_irc_message("NOTICE", (self.nick, f"pyChat passes on no CTCP {ctcp[0]}; "
                                                             "only ACTION (/me)."), irc_service_source()))
            return
        words = clean_irc_text(ctcp[1] if ctcp else text)
        # One message in, one message out: cut to what can be relayed, as the receivers will see it.
        wrap = (CTCP_ACTION if target.startswith("#") else (f"* {person.nick} ", "")) if ctcp else ("", "")
        words = irc_cut_to_fit("NOTICE" if notice else "PRIVMSG", target, irc_source(person.nick, person.username),
                               words, wrap)
        if not words:
            return
        echo = "echo-message" in self.capabilities.enabled
        if target.startswith("#") and ctcp:
            self.server.act(self.session, words, target, echo=echo, client_tags=client_tags)
        elif target.startswith("#"):
            self.server.say(self.session, words, target, echo=echo, client_tags=client_tags, notice=notice)
        elif ctcp:
            self.server.send_private(self.session, target, f"* {person.nick} {words}", client_tags)
        else:
            self.server.send_private(self.session, target, words, client_tags, notice)

    @staticmethod
    def check_target(target: str) -> None:
        if len(target) > MAX_NICKNAME_LENGTH + 1:       # no name is that long: not worth normalising
            raise Refused(f"No one is called {target[:30]}...", "no-such-person", nick=target[:30])

    def irc_tagmsg(self, targets: str) -> None:
        """TAGMSG: client tags alone (typing, reactions), to channels and people who take message tags."""
        client_tags = irc_client_tags(self.tags_given)
        if not client_tags:
            return              # nothing a client could show
        echo = "echo-message" in self.capabilities.enabled
        for target in self.each_target(targets, "TAGMSG"):
            if not target.startswith("#") and name_key(target) == IRC_SERVICE_KEY:
                continue        # the service does not type back
            try:
                self.check_target(target)
                self.server.send_tags(self.session, target, client_tags, echo)
            except Refused as refusal:
                self.cannot_send(refusal, "TAGMSG")

    def answer_ctcp(self, command: str, argument: str) -> None:
        answers = {"VERSION": f"pyChat {VERSION}", "PING": argument,
                   "TIME": time.strftime("%a %b %d %H:%M:%S %Y UTC", time.gmtime())}
        if command in answers:
            self.send_irc(format_irc_message("NOTICE", (self.nick, f"{CTCP}{command} {answers[command]}{CTCP}"),
                                             irc_service_source()))

    def irc_notice(self, targets: str = "", text: str = "") -> None:
        self.irc_privmsg(targets, text, notice=True)

    def irc_join(self, channels: str, keys: str = "") -> None:
        if channels == "0":
            self.leave_every_room()
            return
        names = channels.split(",")
        # Keys past the last channel are for no channel: dropped, as other servers do.
        for channel, key in itertools.zip_longest(names, keys.split(",")[:len(names)] if keys else ()):
            if not channel.startswith("#"):
                self.send_irc(irc_numeric("ERR_NOSUCHCHANNEL", self.nick, channel,
                                          text="Channel names start with #"))
                continue
            try:
                self.server.join(self.session, channel, key or None)
            except Refused as refusal:
                if refusal.kind != "already-in-room":     # IRC says nothing to a JOIN of a channel you are in
                    self.refused(refusal, "JOIN")

    def leave_every_room(self) -> None:
        for room in self.server.rooms_of(self.session):
            try:
                self.server.leave(self.session, room)
            except Refused:
                pass            # a room left meanwhile, by another command of theirs

    def irc_part(self, channels: str, reason: str = "") -> None:
        for channel in channels.split(","):
            try:
                self.server.leave(self.session, channel, irc_reason(reason) or None)
            except Refused as refusal:
                self.refused(refusal, "PART")

    def irc_topic(self, channel: str, topic: str | None = None) -> None:
        if topic is None:
            settings = self.server.room_settings(self.session, channel)
            if settings.topic:
                setter = settings.topic_by and self.output.protocol.source(settings.topic_by)
                self.send_irc(*irc_topic_replies(self.nick, settings.name, settings.topic, setter,
                                                 settings.topic_when))
            else:
                self.send_irc(irc_numeric("RPL_NOTOPIC", self.nick, f"#{settings.name}"))
        else:
            self.server.set_topic(self.session, irc_reason(topic), channel)

    def irc_names(self, channels: str = "") -> None:
        for channel in channels.split(",")[:1] if channels else ():
            try:
                room, people = self.server.room_members(self.session, channel)
            except Refused as refusal:
                if refusal.kind == "try-again":
                    raise
                self.send_irc(irc_numeric("RPL_ENDOFNAMES", self.nick, channel))
                continue
            names = self.output.protocol.names_in_names([p.nick for p in people],
                                                        [(p.nick, p.room_operator, p.voiced) for p in people])
            try:
                secret = self.server.room_settings(self.session, room).secret
            except Refused:
                secret = False      # not a member: a secret room would not have been listed
            self.send_irc(*irc_names_replies(self.nick, f"#{room}", names, secret))
        if not channels:
            self.send_irc(irc_numeric("RPL_ENDOFNAMES", self.nick, "*"))

    def irc_list(self, channels: str = "", *ignored: str) -> None:
        wanted = irc_list_wanted(channels)
        self.send_irc(irc_numeric("RPL_LISTSTART", self.nick, "Channel"),
                      *(irc_numeric("RPL_LIST", self.nick, f"#{room.name}", str(room.people), text=room.topic or "")
                        for room in self.server.room_list(self.session) if wanted is None or wanted(room)),
                      irc_numeric("RPL_LISTEND", self.nick))

    def irc_who(self, mask: str = "*", fields: str = "", *ignored: str) -> None:
        """WHO #CHANNEL, WHO NICK, or WHO with a mask (of nicknames, NICK!USER@HOST, or a host or server);
        with WHOX's %FIELDS[,TOKEN], the fields asked for, as 354."""
        try:
            found = self.who_fits(mask)
        except Refused as refusal:
            if refusal.kind == "try-again":
                raise
            found = []          # a channel not there, or not for you to see: an empty list
        # WHOX: '%FIELDS,TOKEN', perhaps after letters saying what to match ('n%...': the nickname), which
        # is all this server matches.
        whox = irc_whox_fields(fields[fields.index("%"):]) if "%" in fields else None
        self.send_irc(*(self.who_reply(entry) if whox is None else self.whox_reply(entry, *whox) for entry in found),
                      irc_numeric("RPL_ENDOFWHO", self.nick, mask))

    def who_fits(self, mask: str) -> list[WhoEntry]:
        """Who fits MASK: everyone's host is pychat on this server, so a mask of a host either fits all of
        them or none; a user part is matched against each one's."""
        if mask.startswith("#"):
            return self.server.who(self.session, mask)
        pattern, user = mask.casefold(), "*"
        if pattern in ("", "0"):
            pattern = "*"
        if "!" in pattern or "@" in pattern:
            nick, _, rest = pattern.partition("!") if "!" in pattern else ("*", "", pattern)
            user, _, host = rest.rpartition("@") if "@" in rest else (rest, "", "*")
            if not fits_pattern(host or "*", IRC_HOST):
                return []
            pattern = nick or "*"
        elif "." in pattern:        # no nickname has a dot: a host or the server
            if not any(fits_pattern(pattern, name) for name in (IRC_HOST, irc_server_name())):
                return []
            pattern = "*"
        found = self.server.who(self.session, pattern)
        return found if user in ("", "*") else [entry for entry in found
                                                if fits_pattern(user, entry.username.casefold())]

    def who_reply(self, entry: WhoEntry) -> str:
        """352: the channel, user, host, server, nick, flags, and hops 0 before the real name (or the nick)."""
        return irc_numeric("RPL_WHOREPLY", self.nick, f"#{entry.room}" if entry.room else "*", entry.username, IRC_HOST,
                           irc_server_name(), entry.nick, self.who_flags(entry), text=f"0 {entry.realname or entry.nick}")

    def who_flags(self, entry: WhoEntry) -> str:
        """H(ere) or G(one), * for a server operator, B for a bot, @ for a room operator, + for a voice."""
        return ("G" if entry.away else "H") + ("*" if entry.operator else "") + ("B" if entry.bot else "") + \
            irc_prefix(entry.room_operator, entry.voiced, "multi-prefix" in self.capabilities.enabled)

    def whox_reply(self, entry: WhoEntry, letters: str, token: str) -> str:
        """354 with the fields LETTERS asks for, in WHOX's own order whatever the order asked; the
        address is never shown."""
        values = {"t": token, "c": f"#{entry.room}" if entry.room else "*", "u": entry.username,
                  "i": "255.255.255.255", "h": IRC_HOST, "s": irc_server_name(), "n": entry.nick,
                  "f": self.who_flags(entry), "d": "0", "l": str(int(entry.idle)), "a": entry.account or "0",
                  "o": "n/a", "r": entry.realname or entry.nick}
        return irc_numeric("RPL_WHOSPCRPL", self.nick, *(values[letter] for letter in letters))

    def irc_whois(self, *targets: str) -> None:
        nick = targets[-1].split(",")[0]
        found = self.server.person_details(self.session, nick)
        if found is None:       # the end of the list follows the error, as it follows the list
            self.send_irc(irc_numeric("ERR_NOSUCHNICK", self.nick, nick),
                          irc_numeric("RPL_ENDOFWHOIS", self.nick, nick))
            return
        me, them = self.nick, found.nick
        lines = [irc_numeric("RPL_WHOISUSER", me, them, found.username, IRC_HOST, "*", text=found.realname or them)]
        if found.rooms:
            rooms = " ".join(("@" if operator else "") + f"#{room}" for room, operator in found.rooms)
            lines.append(irc_numeric("RPL_WHOISCHANNELS", me, them, text=rooms))
        lines.append(irc_numeric("RPL_WHOISSERVER", me, them, irc_server_name(),
                                 text=f"pyChat {VERSION}, connected with {found.protocol}"))
        if found.away:
            lines.append(irc_numeric("RPL_AWAY", me, them, text=found.away))
        if found.operator:
            lines.append(irc_numeric("RPL_WHOISOPERATOR", me, them))
        if found.bot:
            lines.append(irc_numeric("RPL_WHOISBOT", me, them, text=f"is a bot on {IRC_NETWORK}"))
        if found.account:
            lines.append(irc_numeric("RPL_WHOISACCOUNT", me, them, found.account))
        if found.address:
            lines.append(irc_numeric("RPL_WHOISACTUALLY", me, them, found.address))
        lines += [irc_numeric("RPL_WHOISIDLE", me, them, str(int(found.idle)), str(int(found.since))),
                  irc_numeric("RPL_ENDOFWHOIS", me, them)]
        self.send_irc(*lines)

    def irc_whowas(self, nicks: str, count: str = "", *ignored: str) -> None:
        """Who had the nickname lately (they left, or took another), newest first; COUNT of them at most."""
        nick = nicks.split(",")[0]
        gone = self.server.whowas(nick, irc_number(count) or 0)
        if not gone:
            self.send_irc(irc_numeric("ERR_WASNOSUCHNICK", self.nick, nick))
        for them in gone:
            self.send_irc(irc_numeric("RPL_WHOWASUSER", self.nick, them.nick, them.username, IRC_HOST, "*",
                                      text=them.realname or them.nick))
            if them.account:
                self.send_irc(irc_numeric("RPL_WHOISACCOUNT", self.nick, them.nick, them.account,
                                          text="was logged in as"))
            self.send_irc(irc_numeric("RPL_WHOISSERVER", self.nick, them.nick, irc_server_name(),
                                      text=time.strftime("%a %b %d %H:%M:%S %Y UTC", time.gmtime(them.when))))
        self.send_irc(irc_numeric("RPL_ENDOFWHOWAS", self.nick, nick))

    def irc_away(self, reason: str = "") -> None:
        reason = irc_reason(reason)
        try:
            self.server.set_away(self.session, reason or None)
        except Refused:
            pass            # back when not away: IRC says 305 all the same
        self.send_irc(irc_numeric("RPL_NOWAWAY" if reason else "RPL_UNAWAY", self.nick))

    def irc_nick(self, wanted: str) -> None:
        if not wanted:
            self.send_irc(irc_numeric("ERR_NONICKNAMEGIVEN", self.nick))
            return
        problem = irc_nickname_problem(wanted)
        if problem:
            self.send_irc(irc_numeric("ERR_ERRONEUSNICKNAME", self.nick, wanted, text=problem))
            return
        try:
            self.server.rename(self.session, wanted)
        except Refused as refusal:
            if refusal.kind == "nickname-taken":
                self.send_irc(irc_numeric("ERR_NICKNAMEINUSE", self.nick, wanted, text=str(refusal)))
            elif refusal.kind != "same-nickname":       # IRC says nothing to a NICK of the name you have
                raise

    def irc_kick(self, channel: str, nicks: str, reason: str = "") -> None:
        nick = nicks.split(",")[0]
        self.server.kick(self.session, nick, irc_reason(reason) or None, channel)

    def irc_invite(self, nick: str, channel: str) -> None:
        invited = self.server.invite(self.session, nick, channel)
        self.send_irc(irc_numeric("RPL_INVITING", self.nick, invited, channel))

    def irc_mode(self, target: str, changes: str = "", *arguments: str) -> None:
        if not target.startswith("#"):
            self.user_mode(target, changes)
        elif not changes:
            settings = self.server.room_settings(self.session, target)
            channel = f"#{settings.name}"
            self.send_irc(irc_numeric("RPL_CHANNELMODEIS", self.nick, channel, *irc_channel_modes(settings)))
            self.send_irc(irc_numeric("RPL_CREATIONTIME", self.nick, channel, str(int(settings.opened))))
        else:
            self.channel_modes(target, changes, list(arguments))

    def channel_modes(self, channel: str, changes: str, arguments: list[str]) -> None:
        """The letters of one MODE message, read as pyChat's /mode reads them, made at once: one MODE
        back for all that were made; a list's letter alone shows the list."""
        wanted = []
        for word in read_mode_letters(changes, arguments):
            if word.setting is None:
                self.send_irc(irc_numeric("ERR_UNKNOWNMODE", self.nick, word.letter[1]))
            elif word.value is None and word.setting.removeprefix("un") in ROOM_MASK_LISTS:
                self.send_mask_list(channel, word.letter[1])
            elif word.value is None:
                self.send_irc(irc_numeric("ERR_NEEDMOREPARAMS", self.nick, "MODE"))
            else:
                wanted.append(word)
        if not wanted:
            return
        refusals = self.server.set_room_modes(self.session, [(word.setting, word.value) for word in wanted], channel)
        for word, refusal in zip(wanted, refusals):
            if refusal is not None and refusal.kind == "invalid-mode-value":
                # The word as given when it can be one parameter; a key is never shown.
                shown = word.value if word.value and word.letter[1] != "k" and " " not in word.value \
                    and not word.value.startswith(":") else "*"
                self.send_irc(irc_numeric("ERR_INVALIDMODEPARAM", self.nick, f"#{refusal.room}", word.letter[1],
                                          shown, text=str(refusal)))
            elif refusal is not None:
                self.refused(refusal, "MODE")

    def send_mask_list(self, channel: str, letter: str) -> None:
        """367 and 368 for the bans, 348 and 349 for the exceptions, 346 and 347 for the invitation masks."""
        settings = self.server.room_settings(self.session, channel)
        masks, entry, end = {"b": (settings.bans, "RPL_BANLIST", "RPL_ENDOFBANLIST"),
                             "e": (settings.exempts, "RPL_EXCEPTLIST", "RPL_ENDOFEXCEPTLIST"),
                             "I": (settings.invite_masks, "RPL_INVITELIST", "RPL_ENDOFINVITELIST")}[letter]
        self.send_irc(*(irc_numeric(entry, self.nick, f"#{settings.name}", mask.mask, mask.by, str(int(mask.when)))
                        for mask in masks),
                      irc_numeric(end, self.nick, f"#{settings.name}"))

    def user_mode(self, target: str, changes: str) -> None:
        """MODE NICK: your modes; MODE NICK +B, +i (or -): say you are a bot, hide from WHO masks of those
        who share no room with you. Operators are made with OPER."""
        if name_key(target) != self.person.key:
            self.send_irc(irc_numeric("ERR_USERSDONTMATCH", self.nick))
            return
        adding, modes = True, {}
        for letter in changes:
            if letter in "+-":
                adding = letter == "+"
            elif letter in "Bi":
                modes["bot" if letter == "B" else "invisible"] = adding
            else:
                self.send_irc(irc_numeric("ERR_UMODEUNKNOWNFLAG", self.nick,
                                          text=f"Unknown MODE flag {letter}: the user modes to set are B (a bot) "
                                               f"and i (invisible); /msg {IRC_SERVICE_NICK} op SECRET makes you "
                                               "an operator"))
                return
        if modes:
            self.server.set_modes(self.session, **modes)
            self.send_irc(format_irc_message("MODE", (self.nick, changes), irc_source(self.nick, self.username)))
        else:
            person = self.person
            self.send_irc(irc_numeric("RPL_UMODEIS", self.nick,
                                      "+" + "B" * person.bot + "i" * person.invisible + "o" * person.operator))

    def irc_oper(self, name: str, secret: str) -> None:
        """OPER NAME SECRET: the secret is the server's --op-password, whatever the name; 491 when there is
        none, 464 for a wrong one; 381 and MODE +o when it is right."""
        if not self.server.options.op_password:
            self.send_irc(irc_numeric("ERR_NOOPERHOST", self.nick,
                                      text="This server has no operator password, so no one can be an operator"))
            return
        try:
            self.server.become_operator(self.session, secret)
        except Refused as refusal:
            self.send_irc(irc_numeric("ERR_PASSWDMISMATCH", self.nick, text=str(refusal)))
            return
        self.send_irc(irc_numeric("RPL_YOUREOPER", self.nick),
                      format_irc_message("MODE", (self.nick, "+o"), irc_source(self.nick, self.username)))

    def irc_wallops(self, text: str) -> None:
        """WALLOPS TEXT: from an operator of the server to all of them; 481 for anyone else."""
        words = clean_irc_text(text)
        if words:
            self.server.message_operators(self.session, words)

    def irc_kill(self, nick: str, reason: str = "") -> None:
        """KILL NICK [REASON]: an operator of the server disconnects someone, as /disconnect does."""
        if not self.person.operator:
            self.send_irc(irc_numeric("ERR_NOPRIVILEGES", self.nick))
            return
        self.server.disconnect(self.session, nick, irc_reason(reason) or None)

    def irc_rehash(self, *ignored: str) -> None:
        """REHASH: the reload of /rehash and SIGHUP, for server operators; what changed comes as notices."""
        if not self.person.operator:
            self.send_irc(irc_numeric("ERR_NOPRIVILEGES", self.nick))
            return
        self.send_irc(irc_numeric("RPL_REHASHING", self.nick, self.server.options.config or "(no --config file)"))
        for line in self.server.reload(f"REHASH by {self.nick}"):
            self.send_irc(format_irc_message("NOTICE", (self.nick, line), irc_service_source()))

    def irc_ison(self, *nicks: str) -> None:
        wanted = " ".join(nicks).split()[:50]
        found = self.server.look_up(wanted)
        self.send_irc(irc_numeric("RPL_ISON", self.nick, text=" ".join(p.nick for p in found if p)))

    def irc_userhost(self, *nicks: str) -> None:
        found = [p for p in self.server.look_up(list(nicks[:5])) if p]
        source = self.output.protocol.source
        replies = [f"{p.nick}{'*' if p.operator else ''}={'-' if p.away else '+'}{source(p.nick).partition('!')[2]}"
                   for p in found]
        self.send_irc(irc_numeric("RPL_USERHOST", self.nick, text=" ".join(replies)))

    def irc_lusers(self, *ignored: str) -> None:
        """251 to 255, 265 and 266: how many are here (one server, so its own counts are the network's)."""
        people, operators, signing_in, rooms, invisible = self.server.counts()
        most = max(self.server.most_people, people)
        nick = self.nick
        self.send_irc(irc_numeric("RPL_LUSERCLIENT", nick, text=f"There are {people - invisible} users and "
                                                                f"{invisible} invisible on 1 servers"),
                      irc_numeric("RPL_LUSEROP", nick, str(operators)),
                      irc_numeric("RPL_LUSERUNKNOWN", nick, str(signing_in)),
                      irc_numeric("RPL_LUSERCHANNELS", nick, str(rooms)),
                      irc_numeric("RPL_LUSERME", nick, text=f"I have {people} clients and 0 servers"),
                      irc_numeric("RPL_LOCALUSERS", nick, str(people), str(most),
                                  text=f"Current local users {people}, max {most}"),
                      irc_numeric("RPL_GLOBALUSERS", nick, str(people), str(most),
                                  text=f"Current global users {people}, max {most}"))

    def irc_motd(self, *ignored: str) -> None:
        self.send_irc(*irc_motd_replies(self.nick, self.server.motd.lines()))

    def irc_help(self, subject: str = "") -> None:
        self.send_irc(*irc_help_replies(self.nick, subject, self.COMMANDS))

    def irc_info(self, *ignored: str) -> None:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.server.started))
        for line in (f"pyChat {VERSION}: a chat server for the terminal, with this IRC door.",
                     f"Running since {started}.", f"pyChat's own commands: /msg {IRC_SERVICE_NICK} help"):
            self.send_irc(irc_numeric("RPL_INFO", self.nick, text=line))
        self.send_irc(irc_numeric("RPL_ENDOFINFO", self.nick))

    def irc_version(self, *ignored: str) -> None:
        self.send_irc(irc_numeric("RPL_VERSION", self.nick, f"pyChat-{VERSION}", irc_server_name(),
                                  text="an IRC front door to pyChat"))

    def irc_time(self, *ignored: str) -> None:
        self.send_irc(irc_numeric("RPL_TIME", self.nick, irc_server_name(),
                                  text=time.strftime("%A %B %d %Y -- %H:%M:%S UTC", time.gmtime())))

    def irc_ping(self, token: str = "") -> None:
        self.send_irc(irc_pong(self.nick, [token]))

    def irc_pong(self, *ignored: str) -> None:
        pass                    # what counts is that something came: read_messages told the ping clock

    def irc_cap(self, *params: str) -> None:
        before = self.capabilities.enabled & IRC_RENDERING_CAPABILITIES
        replies = self.capabilities.handle(self.nick, list(params), registered=True)
        enabled = frozenset(self.capabilities.enabled)
        if enabled & IRC_RENDERING_CAPABILITIES != before:
            # They shape every line this connection is sent, and rooms group their audiences by them.
            acknowledged = b"".join(map(self.irc_bytes, replies))
            self.server.change_protocol(self.session, self.protocol_class(self, enabled), first=acknowledged)
            return
        self.send_irc(*replies)

    def irc_setname(self, realname: str) -> None:
        """SETNAME: a new real name, cleaned as USER's is; FAIL (IRCv3's standard reply) for one too long."""
        cleaned = clean_text(realname)
        if not cleaned or len(cleaned) > IRC_MAX_REALNAME:
            self.fail("SETNAME", "INVALID_REALNAME", f"A real name has 1 to {IRC_MAX_REALNAME} characters")
            return
        self.server.set_realname(self.session, cleaned)

    def irc_monitor(self, action: str, targets: str = "") -> None:
        """MONITOR + NICKS, - NICKS, C (clear), L (list), S (status): news of names signing in and leaving."""
        action, nicks = action.upper(), [nick for nick in targets.split(",") if nick]
        if action in ("+", "-") and not nicks:
            self.send_irc(irc_numeric("ERR_NEEDMOREPARAMS", self.nick, "MONITOR"))
        elif action == "+":
            watched, refused = self.server.watch(self.session, nicks)
            self.send_status(watched)
            if refused:
                self.send_irc(irc_numeric("ERR_MONLISTFULL", self.nick, str(WATCH_LIMIT), ",".join(refused)))
        elif action in ("-", "C"):
            self.server.stop_watching(self.session, nicks if action == "-" else None)
        elif action == "L":
            names = [asked for asked, _ in self.server.watched(self.session)]
            self.send_irc(*irc_comma_lists("RPL_MONLIST", self.nick, names), irc_numeric("RPL_ENDOFMONLIST", self.nick))
        elif action == "S":
            self.send_status(self.server.watched(self.session))

    def send_status(self, watched: list[tuple[str, str | None]]) -> None:
        """730 for the names someone has now, 731 for the others."""
        online = [self.output.protocol.source(nick) for _, nick in watched if nick is not None]
        offline = [asked for asked, nick in watched if nick is None]
        self.send_irc(*irc_comma_lists("RPL_MONONLINE", self.nick, online),
                      *irc_comma_lists("RPL_MONOFFLINE", self.nick, offline))

    # -- history: draft/chathistory and draft/read-marker ----------------------------------

    # What each CHATHISTORY subcommand takes after its name: the target, the references, the limit.
    HISTORY_PARAMETERS = {"LATEST": 3, "BEFORE": 3, "AFTER": 3, "AROUND": 3, "BETWEEN": 4, "TARGETS": 3}

    def irc_chathistory(self, *params: str) -> None:
        """CHATHISTORY LATEST|BEFORE|AFTER|AROUND TARGET REFERENCE LIMIT, BETWEEN TARGET REFERENCE REFERENCE
        LIMIT, TARGETS TIMESTAMP TIMESTAMP LIMIT: the lines of a conversation the asker may read, by range
        (references are msgid=ID, timestamp=TIME, or '*' for LATEST), or the conversations with lines
        between two times, each in a batch (draft/chathistory)."""
        subcommand = params[0].upper() if params else "*"
        wanted = self.HISTORY_PARAMETERS.get(subcommand)
        if not params or (wanted is not None and len(params) - 1 < wanted):
            self.fail("CHATHISTORY", "NEED_MORE_PARAMS", subcommand, "Missing parameters")
            return
        if wanted is None:
            self.fail("CHATHISTORY", "UNKNOWN_COMMAND", params[0], "Unknown command")
            return
        *arguments, limit_text = params[1:wanted + 1]
        limit = irc_number(limit_text)
        if not limit:
            self.fail("CHATHISTORY", "INVALID_PARAMS", subcommand, limit_text, "The limit must be a number above 0")
            return
        limit = min(limit, IRC_HISTORY_MOST)
        if subcommand == "TARGETS":
            self.history_targets(arguments, limit)
            return
        target, *texts = arguments
        if subcommand == "LATEST" and texts == ["*"]:
            references = []
        else:
            references = [IrcMessageReference.parse(text) for text in texts]
            if None in references:
                self.fail("CHATHISTORY", "INVALID_PARAMS", subcommand, " ".join(texts),
                          "A message reference is msgid=ID or timestamp=YYYY-MM-DDThh:mm:ss.sssZ")
                return
        try:
            conversation, shown = self.server.conversation(self.person, target, IRC_HISTORY_COST)
        except Refused as refusal:
            self.fail("CHATHISTORY", "MESSAGE_ERROR" if refusal.kind == "try-again" else "INVALID_TARGET",
                      subcommand, target, str(refusal))
            return
        try:
            lines = self.history_lines(subcommand, conversation, references, limit)
        except StorageError as problem:
            self.fail("CHATHISTORY", "MESSAGE_ERROR", subcommand, target, str(problem))
            return
        self.send_batch(("chathistory", target),
                        [line for message in lines for line in self.history_line(message, conversation, shown)])

    def send_batch(self, kind: tuple[str, ...], lines: list[str]) -> None:
        """LINES in a batch of KIND (its type and parameters) for a client that took batches, else as they are."""
        if "batch" not in self.capabilities.enabled:
            self.send_irc(*lines)
            return
        batch = self.next_batch()
        self.send_irc(format_irc_message("BATCH", (f"+{batch}", *kind)),
                      *(irc_with_tags(line, {"batch": batch}) for line in lines),
                      format_irc_message("BATCH", (f"-{batch}",)))

    def history_lines(self, subcommand: str, conversation: str, references: list[IrcMessageReference],
                      limit: int) -> list[StoredMessage]:
        """The lines of CONVERSATION that SUBCOMMAND asks for with REFERENCES, oldest first; each range
        leaves out the lines it starts and ends at."""
        storage = self.server.storage
        if subcommand == "LATEST":
            if not references:
                return storage.latest_messages(conversation, limit)
            return storage.messages_between(conversation, IRC_LARGEST_ID, references[0].after, limit)
        if subcommand == "BEFORE":
            return storage.messages_before(conversation, references[0].before, limit)
        if subcommand == "AFTER":
            return storage.messages_after(conversation, references[0].after, limit)
        if subcommand == "AROUND":
            return storage.messages_around(conversation, references[0].at, limit)
        start, end = references
        if start.at <= end.at:
            return storage.messages_between(conversation, start.after, end.before, limit)
        return storage.messages_between(conversation, start.before, end.after, limit)

    def history_line(self, message: StoredMessage, conversation: str, shown: str) -> list[str]:
        """MESSAGE of CONVERSATION (called SHOWN) as it was sent, with its time, msgid and (with account-tag)
        account: a PRIVMSG, a NOTICE, or an ACTION."""
        to = shown if conversation.startswith("#") or self.sent_by_me(message, conversation) else self.nick
        tags = {"time": irc_message_time(message.id)}
        if message.account and "account-tag" in self.capabilities.enabled:
            tags["account"] = message.account
        wrap = CTCP_ACTION if message.kind == "action" else ("", "")
        pieces = irc_text_messages("NOTICE" if message.kind == "notice" else "PRIVMSG", to, message.text,
                                   self.output.protocol.source(message.nick), wrap=wrap)
        return [irc_with_tags(piece, {**tags, "msgid": f"{message.id}" + (f"-{n}" if n else "")})
                for n, piece in enumerate(pieces)]

    def sent_by_me(self, message: StoredMessage, conversation: str) -> bool:
        """Whether this person said MESSAGE of the private CONVERSATION: by its account, and as a guest's line
        has none, by its nickname in a conversation of two guests."""
        mine = self.person.account
        if message.account is not None or mine is not None:
            return message.account is not None and mine is not None and name_key(message.account) == name_key(mine)
        two_guests = all(part.startswith("guest/") for part in conversation[1:].split("\n"))
        return not two_guests or name_key(message.nick) == self.person.key

    def history_targets(self, texts: list[str], limit: int) -> None:
        """CHATHISTORY TARGETS: the conversations whose latest line was said between two times, each with that
        time, in a draft/chathistory-targets batch (the oldest first, or with the later time first, the newest)."""
        references = [IrcMessageReference.parse(text) if text.startswith("timestamp=") else None for text in texts]
        if None in references:
            self.fail("CHATHISTORY", "INVALID_PARAMS", "TARGETS", " ".join(texts),
                      "TARGETS takes two timestamp=YYYY-MM-DDThh:mm:ss.sssZ")
            return
        start, end = references
        try:
            if start.at <= end.at:
                found = self.server.conversations(self.person, start.after, end.before, limit, cost=IRC_HISTORY_COST)
            else:
                found = self.server.conversations(self.person, end.after, start.before, limit, newest_first=True,
                                                  cost=IRC_HISTORY_COST)
        except (Refused, StorageError) as problem:
            self.fail("CHATHISTORY", "MESSAGE_ERROR", "TARGETS", "*", str(problem))
            return
        self.send_batch(("draft/chathistory-targets",),
                        [format_irc_message("CHATHISTORY", ("TARGETS", name, irc_message_time(last)))
                         for name, last in found])

    def irc_markread(self, target: str = "", timestamp: str = "", *ignored: str) -> None:
        """MARKREAD TARGET: where this person has read up to in TARGET; MARKREAD TARGET timestamp=TIME: they
        have read up to TIME (draft/read-marker). The position only moves forward; the answer says where it
        is, and '*' where there is none (or TARGET is no conversation of theirs)."""
        if not target:
            self.fail("MARKREAD", "NEED_MORE_PARAMS", "Missing parameters")
            return
        if not timestamp:
            try:
                conversation, _ = self.server.conversation(self.person, target)
                position = self.server.read_position(self.person, conversation)
            except Refused:
                position = None         # no conversation of theirs
            self.send_irc(IrcProtocol.read_marker(target, position))
            return
        reference = IrcMessageReference.parse(timestamp) if timestamp.startswith("timestamp=") else None
        if reference is None:
            self.fail("MARKREAD", "INVALID_PARAMS", target, timestamp,
                      "The read position is timestamp=YYYY-MM-DDThh:mm:ss.sssZ")
            return
        try:
            self.server.mark_read(self.session, target, reference.after)
        except Refused as refusal:
            self.fail("MARKREAD", "INVALID_PARAMS", target, str(refusal))
        except StorageError as problem:
            self.fail("MARKREAD", "INTERNAL_ERROR", target, str(problem))

    def irc_register(self, *params: str) -> None:
        self.account_registration("REGISTER", params, self.nick)

    def irc_verify(self, *params: str) -> None:
        self.account_registration("VERIFY", params, self.nick)

    def irc_quit(self, message: str = "") -> None:
        self.server.quit(self.session, irc_reason(message) or None)

    def irc_authenticate(self, *ignored: str) -> None:
        self.send_irc(irc_numeric("ERR_SASLALREADY" if self.account else "ERR_ALREADYREGISTERED", self.nick,
                                  text=None if self.account else "SASL is for signing in: you are in already"))

    def irc_registered_already(self, *ignored: str) -> None:
        self.send_irc(irc_numeric("ERR_ALREADYREGISTERED", self.nick))

    # Each command's handler, and how many parameters it cannot do without.
    COMMANDS: dict[str, IrcCommand] = {name: irc_command(handler, needs) for name, handler, needs in (
        ("PRIVMSG", irc_privmsg, 0), ("NOTICE", irc_notice, 0), ("TAGMSG", irc_tagmsg, 1),
        ("JOIN", irc_join, 1), ("PART", irc_part, 1),
        ("TOPIC", irc_topic, 1), ("NAMES", irc_names, 0), ("LIST", irc_list, 0), ("WHO", irc_who, 0),
        ("WHOIS", irc_whois, 1), ("WHOWAS", irc_whowas, 1), ("AWAY", irc_away, 0), ("NICK", irc_nick, 1),
        ("KICK", irc_kick, 2), ("INVITE", irc_invite, 2), ("MODE", irc_mode, 1), ("OPER", irc_oper, 2),
        ("REHASH", irc_rehash, 0), ("KILL", irc_kill, 1), ("WALLOPS", irc_wallops, 1),
        ("ISON", irc_ison, 1), ("USERHOST", irc_userhost, 1), ("LUSERS", irc_lusers, 0), ("MOTD", irc_motd, 0),
        ("VERSION", irc_version, 0), ("TIME", irc_time, 0), ("PING", irc_ping, 0), ("PONG", irc_pong, 0),
        ("HELP", irc_help, 0), ("HELPOP", irc_help, 0), ("INFO", irc_info, 0),
        ("CAP", irc_cap, 1), ("MONITOR", irc_monitor, 1), ("SETNAME", irc_setname, 1), ("QUIT", irc_quit, 0),
        ("CHATHISTORY", irc_chathistory, 0), ("MARKREAD", irc_markread, 0),
        ("REGISTER", irc_register, 0), ("VERIFY", irc_verify, 0),
        ("USER", irc_registered_already, 0),
        ("AUTHENTICATE", irc_authenticate, 0),
        ("PASS", irc_registered_already, 0),
    )}

    # -- output ---------------------------------------------------------------

    def fail(self, command: str, code: str, *words: str) -> None:
        """IRCv3's standard reply FAIL to COMMAND: CODE, then its parameters and the text, the last of WORDS."""
        self.send_irc(format_irc_message("FAIL", (command, code, *words)))

    def send_irc(self, *lines: str) -> None:
        """IRC messages for this connection alone."""
        for line in lines:
            self.output.send_bytes(self.irc_bytes(irc_within_limit(line)))

    @staticmethod
    def irc_bytes(line: str) -> bytes:
        """One IRC message as it goes on the wire."""
        return line.encode("utf-8") + b"\r\n"

    @staticmethod
    def irc_wire_lines(data: bytes) -> bytes:
        """What was made for the wire (irc_bytes, the protocol's encode), as IRC lines ending in CR LF."""
        return data


class DoorListener(socketserver.TCPServer):
    """A port of its own for a door other than pyChat's (IRC, the browser's): its newcomers are admitted by
    the chat server under the same limits as everyone else's, and speak the door's protocol."""

    allow_reuse_address = True
    request_queue_size = 4096

    def __init__(self, chat: ChatServer, option: str, port: int, door: type[ClientConnection]) -> None:
        self.chat = chat
        self.door = door
        self.address_family = chat.address_family
        try:
            super().__init__((chat.options.host, port), door)
        except OSError as problem:
            raise DoorUnavailable(problem, option, port) from None

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        self.chat.admit(request, client_address, self.door)


class DoorUnavailable(Exception):
    """A door's port (OPTION) cannot be listened on: the server does not start, and says which and why."""

    def __init__(self, problem: OSError, option: str, port: int) -> None:
        super().__init__(str(problem))
        self.problem, self.option, self.port = problem, option, port


# ---------------------------------------------------------------------------
# The browser door: HTTP and WebSocket
# ---------------------------------------------------------------------------
#
# --web-port serves, on one port, the web client's few files from the folder web/ beside this script, and
# IRC over WebSocket at /socket (RFC 6455, with IRCv3's subprotocols text.ircv3.net and binary.ircv3.net).
# A WebSocket is a transport, not a protocol of its own: WebConnection is an IrcConnection whose bytes in are
# split into lines by WebSocketReader instead of LineReader, and whose lines out are framed by
# WebSocketIrcProtocol; the parser, the limits, flood control, the sign-in clock, bans and caps at the door and
# the switchboard are the IRC door's. What is HTTP's own is read first, on the sign-in thread: the request,
# its limits and the Origin check; a request for a file is answered and the connection closed.

WEB_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
WEB_SOCKET_PATH = "/socket"
WEB_MAX_HEAD_BYTES = 8192          # an HTTP request's line and headers, together
WEB_MAX_HEADERS = 64
WEB_HEAD_SECONDS = 10.0            # to send the whole request, from the connection (--nick-timeout if shorter)
WEB_LINGER_SECONDS = 0.5          # reading the rest of a refused request before closing, at most ...
WEB_LINGER_READS = 16             # ... and this many reads
WEB_MAX_FILE_BYTES = 1 << 20       # the web client's files are small; a bigger one in web/ is not served
# The files of web/ that are served, by their ending; nothing else in the folder (no subfolder, no dot file).
WEB_FILE_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                  ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                  ".ico": "image/x-icon", ".webmanifest": "application/manifest+json",
                  ".txt": "text/plain; charset=utf-8"}
_WEB_FILE_NAME = re.compile(r"/([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*)\Z")
_HTTP_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_HTTP_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")     # no control character but a tab in a header's value
_HTTP_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?\Z")
WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"     # RFC 6455, 1.3
WEBSOCKET_SUBPROTOCOLS = {"text.ircv3.net": 0x1, "binary.ircv3.net": 0x2}   # and the opcode each sends in
WS_CONTINUATION, WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
# A message is one IRC line: its CR LF, which a client may add, is taken off.
WEBSOCKET_MAX_MESSAGE = IRC_MAX_TAG_BYTES + IRC_MAX_BODY_BYTES + 2
WEBSOCKET_MAX_FRAGMENTS = 64       # frames of one message: a message that never ends is cut off here
# The close codes this side sends (RFC 6455, 7.4.1).
WS_NORMAL, WS_GOING_AWAY, WS_PROTOCOL_ERROR, WS_NOT_UTF8, WS_POLICY, WS_TOO_BIG = 1000, 1001, 1002, 1007, 1008, 1009
# Codes a client may send in its close frame (7.4.1 and 7.4.2: not 1005, 1006 and 1015, which say no code was sent).
_WS_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}) \
    | frozenset(range(3000, 5000))
# The page's own rules: nothing from another site, no inline script or style, no framing by another page.
WEB_SECURITY_HEADERS = (("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
                        ("X-Frame-Options", "DENY"), ("Cross-Origin-Resource-Policy", "same-origin"))


def web_page_policy(host: str) -> str:
    """The Content-Security-Policy of the web client's files served to HOST (the request's Host)."""
    return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src 'self' ws://{host} wss://{host}; manifest-src 'self'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'")


class HttpError(Exception):
    """A request that is answered with STATUS and WHY, and the connection closed."""

    def __init__(self, status: int, why: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(why)
        self.status = status
        self.headers = headers


class HttpRequest(NamedTuple):
    """An HTTP request's line and headers (names in lower case; repeated ones joined with commas)."""

    method: str
    target: str
    headers: dict[str, str]

    def tokens(self, name: str) -> list[str]:
        """The comma-separated values of header NAME, in lower case."""
        return [token.strip().lower() for token in self.headers.get(name, "").split(",") if token.strip()]


def parse_http_head(head: bytes) -> HttpRequest:
    """The request in HEAD (its line and headers, without the blank line); HttpError for one this door refuses.

    Strict where leniency would let two readers disagree: an ASCII request line and header names, no control
    character in a value, no folded or malformed header lines, one Host, HTTP/1.1 (or 1.0). A value may hold
    other bytes (RFC 9110's obs-text), read as Latin-1: a browser sends the UTF-8 cookies that another
    application on the same host set, and a page must not be refused for them.
    """
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    if not request_line.isascii():
        raise HttpError(400, "the request line is not ASCII")
    parts = request_line.split(" ")
    if len(parts) != 3 or not _HTTP_TOKEN.match(parts[0]) or not parts[1] or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(400, "not an HTTP/1.1 request line")
    if len(header_lines) > WEB_MAX_HEADERS:
        raise HttpError(431, f"more than {WEB_MAX_HEADERS} headers")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon or not _HTTP_TOKEN.match(name) or _HTTP_CONTROL.search(value):
            raise HttpError(400, "a malformed header line")
        name, value = name.lower(), value.strip(" \t")
        if name in headers:
            if name == "host":
                raise HttpError(400, "more than one Host")
            headers[name] += ", " + value
        else:
            headers[name] = value
    if not _HTTP_HOST.match(headers.get("host", "")):
        raise HttpError(400, "no valid Host header")
    return HttpRequest(parts[0], parts[1], headers)


def http_response(status: int, headers: Iterable[tuple[str, str]] = (), body: bytes = b"",
                  head_only: bool = False) -> bytes:
    """An HTTP/1.1 response that closes the connection; HEAD_ONLY leaves the body out (its length stays). A 304
    has no length (RFC 9110, 8.6: one would have to be the file's)."""
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", *(f"{name}: {value}" for name, value in headers)]
    if status != 101:
        lines += [*([f"Content-Length: {len(body)}"] if status != 304 else []), "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (b"" if head_only else body)


def http_error_response(error: HttpError, head_only: bool = False) -> bytes:
    """The plain-text answer to a refused request."""
    return http_response(error.status, (*error.headers, ("Content-Type", "text/plain; charset=utf-8"),
                                        *WEB_SECURITY_HEADERS), f"{error}\n".encode("utf-8"), head_only)


def web_file(request: HttpRequest, folder: str = WEB_FOLDER) -> bytes:
    """The answer to a GET or HEAD of one of the web client's files: 200, or 304 when the browser's copy is
    current; HttpError 404 for anything that is not a file served from FOLDER."""
    path = request.target.split("?", 1)[0]
    name = _WEB_FILE_NAME.match("/index.html" if path == "/" else path)
    kind = WEB_FILE_TYPES.get(os.path.splitext(name.group(1))[1]) if name else None
    if kind is None:
        raise HttpError(404, "not found")
    try:
        # O_NOFOLLOW: a link put in the folder does not lead out of it.
        fd = os.open(os.path.join(folder, name.group(1)), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | _CLOEXEC)
    except OSError:
        raise HttpError(404, "not found") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > WEB_MAX_FILE_BYTES:
            raise HttpError(404, "not found")
        body = file.read(WEB_MAX_FILE_BYTES)
    tag = f'"{info.st_size:x}-{info.st_mtime_ns:x}"'
    # no-cache: the browser keeps the file but asks each time whether it changed (a 304 when not), so that a
    # new version of the client is never mixed with an old one.
    headers = (("Content-Type", kind), ("Cache-Control", "no-cache"), ("ETag", tag),
               ("Content-Security-Policy", web_page_policy(request.headers["host"])), *WEB_SECURITY_HEADERS)
    if tag in request.tokens("if-none-match"):
        return http_response(304, headers[1:])
    return http_response(200, headers, body, head_only=request.method == "HEAD")


def origin_allowed(origin: str | None, host: str, allowed: str | None) -> bool:
    """Whether a page from ORIGIN may open the socket: one of ALLOWED (--web-origin), or without it a page of
    HOST, the host the browser asked for. No Origin at all is a program, not a page: it may."""
    if origin is None:
        return True
    origin = origin.lower().rstrip("/")
    if allowed is not None:
        return "*" in allowed.split(",") or origin in allowed.split(",")
    return origin in (f"http://{host.lower()}", f"https://{host.lower()}")


def forwarded_address(request: HttpRequest) -> str | None:
    """The address the trusted proxy put last in X-Forwarded-For: the one it got the request from."""
    forwarded = request.headers.get("x-forwarded-for", "").split(",")[-1].strip()
    address = ip_of(forwarded.removeprefix("[").removesuffix("]"))
    return str(address) if address is not None else None


def websocket_accept(key: str) -> str:
    """Sec-WebSocket-Accept for the client's Sec-WebSocket-Key (RFC 6455, 4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode("ascii")).digest()).decode("ascii")


def websocket_handshake(request: HttpRequest) -> tuple[bytes, int]:
    """The 101 answer to an opening handshake, and the opcode the connection's messages go in; HttpError
    if it is not one."""
    if request.method != "GET":
        raise HttpError(405, "the socket is opened with GET", (("Allow", "GET"),))
    if "websocket" not in request.tokens("upgrade") or "upgrade" not in request.tokens("connection"):
        raise HttpError(426, "this is a WebSocket: ask for an Upgrade to websocket", (("Upgrade", "websocket"),))
    if request.headers.get("sec-websocket-version") != "13":
        raise HttpError(426, "WebSocket version 13 only", (("Sec-WebSocket-Version", "13"),))
    key = request.headers.get("sec-websocket-key", "")
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        valid_key = False
    if not valid_key:
        raise HttpError(400, "no valid Sec-WebSocket-Key")
    # The first subprotocol of the client's that we speak; none asked for (as gamja does) is text.
    chosen = next((name for name in request.tokens("sec-websocket-protocol") if name in WEBSOCKET_SUBPROTOCOLS), None)
    headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", websocket_accept(key))]
    if chosen:
        headers.append(("Sec-WebSocket-Protocol", chosen))
    return http_response(101, headers), WEBSOCKET_SUBPROTOCOLS.get(chosen, WS_TEXT)


def websocket_frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame (what a server sends)."""
    size = len(payload)
    if size < 126:
        return bytes((0x80 | opcode, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, size) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, size) + payload


def websocket_close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with CODE and REASON (cut to the 123 bytes a control frame leaves it)."""
    return websocket_frame(WS_CLOSE, struct.pack("!H", code) + reason.encode("utf-8")[:123].decode(
        "utf-8", "ignore").encode("utf-8"))


def websocket_messages(data: bytes, opcode: int) -> bytes:
    """IRC lines (each ending in CR LF) as WebSocket messages, one line each, without the CR LF."""
    if not data:
        return b""
    return b"".join([websocket_frame(opcode, line) for line in data.split(b"\r\n")[:-1]])


def websocket_payloads(data: bytes) -> Iterator[bytes]:
    """The payloads of the messages in DATA, whole frames this side made (websocket_messages); the inverse
    of that for what is gathered before it is sent (labeled-response)."""
    at = 0
    while at < len(data):
        opcode, size = data[at] & 0x0F, data[at + 1] & 0x7F
        start = at + (2 if size < 126 else 4 if size == 126 else 10)     # 126 and 127: a longer length follows
        if size >= 126:
            size = int.from_bytes(data[at + 2:start], "big")
        if opcode in (WS_TEXT, WS_BINARY):
            yield data[start:start + size]
        at = start + size


def unmask(payload: bytes, key: bytes) -> bytes:
    """A client frame's payload, its masking KEY taken off (RFC 6455, 5.3), in C rather than a byte at a time."""
    size = len(payload)
    if not size:
        return b""
    mask = int.from_bytes((key * (size // 4 + 1))[:size], "big")
    return (int.from_bytes(payload, "big") ^ mask).to_bytes(size, "big")


class WebSocketClose(NamedTuple):
    """The event of a WebSocket closed by this side for a reason of the transport's own: a close frame alone."""

    code: int
    reason: str


def websocket_failure(code: int, reason: str) -> Disconnect:
    """The end of a connection whose client broke RFC 6455 or a limit: the reason for the log, the close frame."""
    return Disconnect(f"WebSocket: {reason}", WebSocketClose(code, reason))


class WebSocketReader:
    """Splits what a WebSocket client sends into IRC lines: what LineReader is to a plain IRC connection.

    feed() returns the lines of the complete messages in DATA (a line too long, None, ends the connection
    with 1009 instead); pings are answered through ANSWER; every frame of a message but its last passes
    through ALLOW_FRAME, the connection's flood control, and so do the lines (pings and pongs do not). It
    holds one frame's header and one message at most. A client that breaks the protocol or a limit ends
    the connection (Disconnect, with the close code). So does the client's close frame, but the lines that
    came before it in the same read are its last words: feed() returns them, and keeps the end in `closed`
    for the connection to raise once it has handled them. As LineReader, it takes MOST frames of what is
    fed at most: past them the client floods, and `dropped` says so.
    """

    def __init__(self, answer: Callable[[bytes], None], allow_frame: Callable[[], bool]) -> None:
        self.answer = answer
        self.allow_frame = allow_frame
        self.buffer = bytearray()
        self.message = bytearray()          # the fragments of the message under way
        self.message_opcode: int | None = None
        self.fragments = 0
        self.dropped = 0
        self.closed: Disconnect | None = None     # the client's close, after lines still to be handled

    def feed(self, data: bytes, most: int = -1) -> list[str | None]:
        """The lines of the messages completed by DATA, up to a close frame (Disconnect at once if none
        came before it)."""
        self.buffer += data
        self.dropped = 0
        lines: list[str | None] = []
        frames = 0
        while True:
            frame = self._next_frame()
            if frame is None:
                return lines
            frames += 1
            if frames == most and len(self.buffer) >= 2:
                self.dropped = 1            # more frames at once than flood control would take
                self.buffer.clear()
            if frame[1] == WS_CLOSE:
                self.closed = self._closed(frame[2])
                self.buffer.clear()         # nothing a client sends after its close frame counts
                if not lines:
                    raise self.closed
                return lines
            line = self._take(*frame)
            if line is not None:
                lines.append(line)

    def _next_frame(self) -> tuple[bool, int, bytes] | None:
        """The next whole frame in the buffer, as (final, opcode, unmasked payload), taken off it; None until
        one has come. Headers are checked as soon as they are in, before any payload is waited for."""
        buffer = self.buffer
        if len(buffer) < 2:
            return None
        first, second = buffer[0], buffer[1]
        final, opcode, size = bool(first & 0x80), first & 0x0F, second & 0x7F
        if first & 0x70:
            raise websocket_failure(WS_PROTOCOL_ERROR, "reserved bits set (no extension was agreed)")
        if opcode not in (WS_CONTINUATION, WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG):
            raise websocket_failure(WS_PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if not second & 0x80:
            raise websocket_failure(WS_PROTOCOL_ERROR, "a client's frames must be masked")
        if opcode >= WS_CLOSE and (size > 125 or not final):
            raise websocket_failure(WS_PROTOCOL_ERROR, "a control frame must be whole and at most 125 bytes")
        start = 2 if size < 126 else 4 if size == 126 else 10      # 126 and 127: a longer length follows
        if len(buffer) < start:
            return None
        if start > 2:
            size = int.from_bytes(buffer[2:start], "big")
        if opcode < WS_CLOSE and len(self.message) + size > WEBSOCKET_MAX_MESSAGE:
            raise websocket_failure(WS_TOO_BIG, f"a message longer than {WEBSOCKET_MAX_MESSAGE} bytes (one IRC line)")
        end = start + 4 + size
        if len(buffer) < end:
            return None
        payload = unmask(bytes(buffer[start + 4:end]), bytes(buffer[start:start + 4]))
        del buffer[:end]
        return final, opcode, payload

    def _take(self, final: bool, opcode: int, payload: bytes) -> str | None:
        """Act on one frame other than a close; the line it completes, if it does."""
        if opcode in (WS_PING, WS_PONG):
            # Keepalives, as IRC's PING is: answered whatever the rate, within the frames one read may hold.
            if opcode == WS_PING:
                self.answer(websocket_frame(WS_PONG, payload))
            return None
        if (opcode == WS_CONTINUATION) == (self.message_opcode is None):
            raise websocket_failure(WS_PROTOCOL_ERROR, "a continuation frame with no message to continue"
                                    if opcode == WS_CONTINUATION else "a new message inside a fragmented one")
        if opcode != WS_CONTINUATION:
            self.message_opcode = opcode
        self.message += payload
        if not final:
            self.fragments += 1
            if self.fragments >= WEBSOCKET_MAX_FRAGMENTS:
                raise websocket_failure(WS_POLICY, f"a message in more than {WEBSOCKET_MAX_FRAGMENTS} frames")
            self.allow_frame()
            return None
        raw, opcode = bytes(self.message), self.message_opcode
        self.message.clear()
        self.message_opcode, self.fragments = None, 0
        if raw.endswith(b"\n"):
            raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        if b"\r" in raw or b"\n" in raw:
            raise websocket_failure(WS_PROTOCOL_ERROR, "one IRC line per message")
        if opcode == WS_TEXT:
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise websocket_failure(WS_NOT_UTF8, "a text message that is not UTF-8") from None
        return decode_line(raw, WEBSOCKET_MAX_MESSAGE)     # a binary message: invalid bytes replaced

    @staticmethod
    def _closed(payload: bytes) -> Disconnect:
        """The client closes: the end of the connection, whose close frame answers with the client's code."""
        if not payload:
            return Disconnect("WebSocket closed by the client", WebSocketClose(WS_NORMAL, ""))
        code = int.from_bytes(payload[:2], "big")
        if len(payload) == 1 or code not in _WS_CLOSE_CODES:
            return websocket_failure(WS_PROTOCOL_ERROR, "an invalid close code")
        try:
            payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            return websocket_failure(WS_NOT_UTF8, "a close reason that is not UTF-8")
        # Its reason is not passed on: the room would show it as a quit message, which a muted person may not give.
        return Disconnect(f"WebSocket closed by the client ({code})", WebSocketClose(code, ""))


# Why a connection ended, in a close code, for each event IRC answers with ERROR (which says it in words).
WEBSOCKET_CLOSE_CODES = {event: {Bye: WS_NORMAL, ShuttingDown: WS_GOING_AWAY}.get(event, WS_POLICY)
                         for event, render in IrcProtocol.RENDERERS.items() if render is IrcProtocol.closing}


class WebSocketIrcProtocol(IrcProtocol):
    """IRC's words for the core's events, each line a WebSocket message of the connection's opcode.

    Rooms render a line once per group of receivers with equal protocol objects (see IrcProtocol): these
    are equal to each other, by opcode and capabilities, and never to a plain IRC connection's, so the
    framing is done once per group too, not once per receiver.
    """

    name = "web"

    def __init__(self, connection: WebConnection, capabilities: frozenset[str] = frozenset()) -> None:
        self.opcode = connection.message_opcode
        super().__init__(connection, capabilities)

    def encode(self, event: Any, tagged: bool = False) -> bytes:
        if isinstance(event, WebSocketClose):
            return websocket_close_frame(event.code, event.reason)
        data = websocket_messages(super().encode(event, tagged), self.opcode)
        code = WEBSOCKET_CLOSE_CODES.get(type(event))
        if code is None:
            return data
        # The close frame says why in the ERROR's words: a browser gives a page the reason, not a line it missed.
        return data + websocket_close_frame(code, self.closing(event)[0].partition(" :")[2])


class HttpPhase:
    """The protocol of a web connection until its WebSocket opens: what a request is answered is written
    whole by WebConnection. The one error the core may say before then is start_tls()'s to plain text
    spoken to a TLS port: here, plain HTTP to the HTTPS port, which is told so in HTTP."""

    name = "HTTP"

    @staticmethod
    def encode(event: Any, tagged: bool = False) -> bytes:
        if isinstance(event, Error):
            return http_error_response(HttpError(400, "This port speaks HTTPS, not plain HTTP: use an https:// "
                                                      "address (or wss:// for the socket)."))
        return b""


class WebConnection(IrcConnection):
    """One connection to --web-port: an HTTP request for a file of the web client, answered and closed, or
    the opening handshake of a WebSocket at /socket, after which it is an IRC connection like any other,
    reading WebSocket frames (WebSocketReader) and writing them (WebSocketIrcProtocol)."""

    protocol_class = WebSocketIrcProtocol
    message_opcode = WS_TEXT

    def setup(self) -> None:
        super().setup()
        self.output.protocol = HttpPhase()

    @staticmethod
    def refusal(reason: str) -> bytes:
        """A newcomer turned away at the door (banned, server or address full) before its request was read."""
        return http_error_response(HttpError(503, reason))

    def start(self) -> None:
        """TLS if the server has it, then the HTTP request: a file is served and the connection ends
        (Disconnect); a WebSocket handshake is answered, and IRC begins."""
        super().start()
        request = None
        try:
            head, early = self.read_head()
            request = parse_http_head(head)
            self.take_forwarded_address(request)
            if request.target.split("?", 1)[0] == WEB_SOCKET_PATH:
                self.open_websocket(request, early)
                return
            if request.method not in ("GET", "HEAD"):
                raise HttpError(405, "only GET and HEAD", (("Allow", "GET, HEAD"),))
            self.output.send_bytes(web_file(request))
            reason = f"served {request.method} {request.target[:100]}"
        except HttpError as error:
            self.output.send_bytes(http_error_response(error, head_only=request is not None
                                                       and request.method == "HEAD"))
            self.write_own_output()
            self.discard_input()
            reason = f"HTTP {error.status}: {error}"
        raise Disconnect(reason)

    def discard_input(self) -> None:
        """Read what is left of a refused request, a little while: a socket closed with input unread is reset,
        and a reset may destroy the answer before the client has read it."""
        deadline = time.monotonic() + WEB_LINGER_SECONDS
        for _ in range(WEB_LINGER_READS):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.input_waiter.wait(min(remaining, 0.1)):
                return
            try:
                with self.output.io_lock:
                    if not self.sock.recv(RECEIVE_SIZE):
                        return
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue
            except OSError:
                return

    def read_head(self) -> tuple[bytes, bytes]:
        """The request's line and headers, within WEB_MAX_HEAD_BYTES and WEB_HEAD_SECONDS of the connection,
        and what came after them, which no client should send before it is answered."""
        allowed = min(WEB_HEAD_SECONDS, self.server.options.nick_timeout)
        deadline = self.connected + allowed
        data = bytearray()
        while True:
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                return bytes(data[:end]), bytes(data[end + 4:])
            if len(data) > WEB_MAX_HEAD_BYTES:
                raise HttpError(431, f"the request's headers are over {WEB_MAX_HEAD_BYTES} bytes")
            remaining = deadline - time.monotonic()
            if self.server.stopping:
                raise Disconnect("server shutting down")
            if remaining <= 0:
                raise HttpError(408, f"the request did not come within {allowed:g} s")
            if not self.has_buffered_input() and not self.input_waiter.wait(remaining):
                continue
            try:
                with self.output.io_lock:
                    chunk = self.sock.recv(WEB_MAX_HEAD_BYTES + 4 - len(data) + 1)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue
            except OSError as problem:
                raise Disconnect(f"connection lost ({problem.strerror or problem})") from None
            if not chunk:
                raise Disconnect("connection closed")
            data += chunk

    def take_forwarded_address(self, request: HttpRequest) -> None:
        """From the trusted proxy (--trust-proxy), the person is at the address of X-Forwarded-For: admit them
        under it, as the door admits everyone (bans, --max-per-ip), and count them there instead of the proxy."""
        proxy = self.server.options.trust_proxy
        if proxy is None or ip_of(self.address) != ip_of(proxy):
            return
        address = forwarded_address(request)
        if address is None:
            raise HttpError(400, "no address in X-Forwarded-For from the proxy")
        refusal = self.server.gate.admit(address, instead_of=self.address)
        if refusal is not None:
            log.warning("refused %s (through %s): %s", address, self.address, refusal)
            raise HttpError(403 if refusal.kind == "banned" else 503, str(refusal))
        self.address = address

    def open_websocket(self, request: HttpRequest, early: bytes) -> None:
        """Answer the opening handshake, after the Origin check; from now on lines are WebSocket messages.
        EARLY is what the client sent after its request."""
        if not origin_allowed(request.headers.get("origin"), request.headers["host"], self.server.options.web_origin):
            raise HttpError(403, "a page from this origin may not open the socket (--web-origin)")
        answer, opcode = websocket_handshake(request)
        if opcode != self.message_opcode:       # a binary client's own; a text one keeps the class's
            self.message_opcode = opcode
        self.output.send_bytes(answer)
        self.output.protocol = self.protocol_class(self)
        if early:
            # RFC 6455 (4.1): a client waits for the answer before it sends a frame. Taken, such frames would
            # wait unread until the client sent more, which it would not, waiting for an answer to them.
            raise websocket_failure(WS_PROTOCOL_ERROR, "frames sent before the handshake was answered")
        self.lines = WebSocketReader(self.output.send_bytes, self.within_rate)
        log.info("WebSocket from %s (%s)", self.address, "binary" if self.message_opcode == WS_BINARY else "text")

    def client_closed(self) -> Disconnect | None:
        """The client's close frame, read after lines not all handled yet; None if it has not come."""
        return self.lines.closed if isinstance(self.lines, WebSocketReader) else None

    def end_if_flooded(self) -> None:
        """As for any connection, and then the client's close, which waited for the lines before it."""
        super().end_if_flooded()
        closed = self.client_closed()
        if closed is not None:
            raise closed

    def has_buffered_input(self) -> bool:
        # A close frame read with lines before it is input still to act on: no one waits for the socket, which
        # the client keeps open for our close frame.
        return self.client_closed() is not None or super().has_buffered_input()

    def irc_bytes(self, line: str) -> bytes:
        return websocket_frame(self.message_opcode, line.encode("utf-8"))

    @staticmethod
    def irc_wire_lines(data: bytes) -> bytes:
        return b"".join(payload + b"\r\n" for payload in websocket_payloads(data))


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
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):      # only a privileged process may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            soft = hard = wanted
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("open-file limit is %d, below the %d that %d connections need; "
                    "raise it with ulimit -n", soft, wanted, wanted - SPARE_FILES)


def tls_files_problem(cert: str, key: str) -> str | None:
    """What is wrong with the TLS certificate and key, in words that say which file and what to do; None if nothing."""
    contents = {}
    for path, what, option in ((cert, "certificate", "--tls-cert"), (key, "key", "--tls-key")):
        where = f"the TLS {what} file {path} ({option})"
        try:
            with open(path, "rb") as file:
                contents[what] = file.read(1 << 20)
        except FileNotFoundError:
            return f"{where} does not exist; give the path of the PEM file"
        except IsADirectoryError:
            return f"{where} is a directory; give the path of the PEM file in it"
        except PermissionError:
            return f"{where} cannot be read (permission denied); let this user read it"
        except OSError as problem:
            return f"{where} cannot be read ({problem.strerror or problem})"
    has_certificate = b"-----BEGIN CERTIFICATE-----" in contents["certificate"]
    has_key = b"PRIVATE KEY-----" in contents["key"]
    if not has_certificate and not has_key and b"PRIVATE KEY-----" in contents["certificate"] \
            and b"-----BEGIN CERTIFICATE-----" in contents["key"]:
        return f"--tls-cert and --tls-key are swapped: {cert} holds a private key and {key} a certificate"
    if not has_certificate:
        return f"the TLS certificate file {cert} (--tls-cert) holds no PEM certificate (no BEGIN CERTIFICATE line)"
    if not has_key:
        return f"the TLS key file {key} (--tls-key) holds no PEM private key (no BEGIN ... PRIVATE KEY line)"
    if b"ENCRYPTED" in contents["key"]:
        return (f"the TLS key file {key} (--tls-key) is protected by a passphrase, which the server cannot ask "
                f"for; decrypt it with: openssl pkey -in {key} -out server-plain.key")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as problem:
        if "KEY_VALUES_MISMATCH" in str(problem):
            return (f"the key in {key} (--tls-key) does not belong to the certificate in {cert} (--tls-cert); "
                    f"give the key the certificate was made for")
        return f"cannot use {cert} and {key} for TLS ({problem.reason or problem}); check that both are PEM files"
    return None


def listen_problem(problem: OSError, host: str, port: int, option: str = "--port") -> str:
    """Why the server cannot listen on HOST:PORT, which OPTION gave, and what to do about it."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(problem, socket.gaierror):
        return (f"--host {host!r} is neither an address of this machine nor a name that resolves "
                f"({problem.strerror}); use an address such as 0.0.0.0 (all IPv4), :: (all IPv6) or 127.0.0.1")
    if problem.errno == errno.EADDRINUSE:
        return (f"cannot listen on {where}: the port is in use by another program (another pyChat server?); "
                f"stop it, or choose another {option} (0 picks a free one)")
    if problem.errno == errno.EACCES and 0 < port < 1024:
        return (f"cannot listen on {where}: permission denied, since ports below 1024 need root or the "
                f"CAP_NET_BIND_SERVICE capability; use {option} 1024 or higher")
    if problem.errno == errno.EADDRNOTAVAIL:
        return (f"cannot listen on {where}: {host} is not an address of this machine; use one it has "
                f"(ip address lists them), or 0.0.0.0 for all")
    return f"cannot listen on {where}: {problem.strerror or problem}"


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    if options.print_config:
        sys.stdout.write(config_text(options))
        return 0
    try:
        use_logging_handler(logging_handler(options), options)
    except OSError as problem:
        print(f"cannot start: {problem.filename}: {problem.strerror}", file=sys.stderr)
        return 1
    if options.backup:
        try:
            Storage.back_up(options.data_dir, options.backup)
        except StorageError as problem:
            log.error("%s", problem)
            return 1
        print(f"copied {os.path.join(options.data_dir, DATABASE_FILE)} to {options.backup}")
        return 0
    if options.check:
        database = os.path.join(options.data_dir, DATABASE_FILE)
        problems = Storage.problems(options.data_dir)
        for problem in problems or ["no problem found"]:
            print(f"{database}: {problem}")
        return 1 if problems else 0
    raise_file_limit((options.max_clients or CLIENTS_WITHOUT_LIMIT) + SPARE_FILES)
    give_large_blocks_back()
    sys.setswitchinterval(SWITCH_INTERVAL)
    if THREAD_STACK_SIZE:
        threading.stack_size(THREAD_STACK_SIZE)
    problem = options.tls_cert and tls_files_problem(options.tls_cert, options.tls_key)
    if problem:
        log.error("cannot start: %s", problem)
        return 1
    try:
        command_table = commands.load_commands()
        server = ChatServer(options, command_table)
        server.read_options = functools.partial(read_options, argv)
    except DoorUnavailable as door:
        log.error("cannot start: %s", listen_problem(door.problem, options.host, door.port, door.option))
        return 1
    except OSError as problem:
        # A file names itself; otherwise it was listening on the pyChat port that failed.
        log.error("cannot start: %s", f"{problem.filename}: {problem.strerror}" if problem.filename
                  else listen_problem(problem, options.host, options.port))
        return 1
    except (commands.CommandLoadError, StorageError, ssl.SSLError) as problem:
        log.error("cannot start: %s", problem)
        return 1
    # Before anyone is served or told the port: a SIGTERM from then on is a clean shutdown that says so.
    # A SIGHUP (systemctl reload, logrotate, or the terminal the server was started from closing, as at the
    # end of an SSH session) reloads: by default it would kill the process at once, with no word to anyone.
    # The handlers only note the signal; the main loop below acts on it, outside the signal handler.
    signalled = threading.Event()
    received: collections.deque[int] = collections.deque()
    stop_signals = (signal.SIGINT, signal.SIGTERM)

    def note_signal(number: int, frame: Any) -> None:
        received.append(number)
        signalled.set()

    for signal_number in stop_signals + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()):
        signal.signal(signal_number, note_signal)
    host, port = server.server_address[:2]
    # Printed even with -q: scripts and tests started with --port 0 read the port from it.
    print(f"pyChat {VERSION} listening on {host}:{port}", file=sys.stderr, flush=True)
    if server.irc is not None:
        irc_host, irc_port = server.irc.server_address[:2]
        print(f"pyChat {VERSION} listening for IRC on {irc_host}:{irc_port}", file=sys.stderr, flush=True)
    if server.web is not None:
        web_host, web_port = server.web.server_address[:2]
        scheme = "https" if server.tls else "http"
        print(f"pyChat {VERSION} listening for browsers on {scheme}://{web_host}:{web_port}/", file=sys.stderr,
              flush=True)
    for listener, name in ((server.irc, "accept-irc"), (server.web, "accept-web"), (server, "accept")):
        if listener is not None:
            threading.Thread(target=listener.serve_forever, args=(ACCEPT_POLL_SECONDS,), name=name,
                             daemon=True).start()
    while not any(number in stop_signals for number in received):
        signalled.wait(1.0)
        signalled.clear()
        while received and received[0] not in stop_signals:
            received.popleft()
            server.reload("SIGHUP")
    log.info("shutting down")
    server.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
