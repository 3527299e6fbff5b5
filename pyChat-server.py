#!/usr/bin/env python3
"""pyChat server: many people chatting in rooms over a plain line protocol.

The protocol is described in README.md ("Wire protocol"). This file reads top
to bottom: options and limits; the protocol (framing, cleaning text, names,
the events the core produces and the one class that turns them into lines);
a connection's output and the pump that writes to every socket; the
connection handler (one thread per connection); the server object, which
owns people and rooms and every change to them; the context that
slash-commands act through; main().

A line becomes a broadcast in two hops: ClientConnection.on_line() hands it to
ChatServer.say(), which renders the event once per audience of the room
(PyChatProtocol.encode) and queues the bytes to each member's output.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
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
from typing import Any, Callable, Iterable, Iterator, NamedTuple

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
ROOMS_PER_PERSON = 20             # --rooms-per-person: rooms one person may be in at once (0: no limit)

MAX_LINE_BYTES = 4096             # longest line accepted from a client, without its newline
MAX_NICKNAME_LENGTH = 20
MAX_ROOMS = 500                   # rooms kept at once; empty ones are forgotten first
DEFAULT_ROOM = "lobby"
ROOM_SETTINGS = ("key", "invite-only", "topic", "op", "deop")    # what /mode changes
LISTING_BURST = 500               # entries of lists (/online, /who, /rooms) one person may ask for at once,
LISTING_RATE = 50.0               # and then a second: long lists asked for by hundreds must not slow the chat
ANNOUNCE_LIMIT = 200              # rooms bigger than this do not announce every join and leave
QUIT = "quit"                     # the leave reason of someone who said /quit without a message
PASSWORD_TRIES = 3                # wrong server passwords before the connection is closed
TLS_HANDSHAKE = b"\x16"            # the first byte of every TLS connection: a handshake record
MAX_TLS_REFUSALS = 8              # TLS handshakes at once just to say "the server is full"
DRAIN_SECONDS = 1.0               # time allowed to send what is queued to someone who is leaving
SHUTDOWN_SECONDS = 3.0            # time allowed for every connection to close at shutdown
RECEIVE_SIZE = 65536
# Every thread waiting for the interpreter lock wakes up once per interval. When
# 10,000 people leave at once, all their threads wait together: at the default
# 5 ms the server then burned both cores for 20 s, at 50 ms for 5 to 20 s, at
# 0.5 s it is done in 3 s, which is the leaving itself (bench/README.md). Our
# threads give the lock up at every system call, so the long interval should cost
# no latency: fan-out latency at 0.05 and 0.5 s was within run-to-run noise.
SWITCH_INTERVAL = 0.5
# A connection's thread touches about 12 KiB of its stack. The platform default
# reserves 8 MiB of address space each (80 GiB for 10,000 people, which a system
# that does not overcommit refuses); 512 KiB measured the same for CPU and
# memory at 10,000 sign-ins and leaves, and leaves room for deep C calls (TLS).
THREAD_STACK_SIZE = 512 * 1024    # bytes; 0 keeps the platform default
CLIENTS_WITHOUT_LIMIT = 10_000    # open files are asked for this many connections when --max-clients is 0
SPARE_FILES = 64                  # open files besides the connections: listening socket, logs, wake-ups
KERNEL_SEND_BUFFER = 64 * 1024    # the kernel doubles it for its own bookkeeping
OUT_OF_DESCRIPTORS_PAUSE = 0.5    # seconds the accepting thread waits when the process has no file descriptor left
OPERATOR_TRIES = 3                # wrong /op secrets before the connection is closed
ADDRESS_GUESSES = 10              # wrong secrets of any kind from one address (IPv6: /64) before it must wait
GUESS_WINDOW = 600.0              # ... and how long it waits, in seconds since its last wrong guess

# What the data directory (--data-dir) keeps, and its bounds; README, "The data directory".
MAX_RECORD_BYTES = 16 * 1024      # one line of a data file; a longer one is skipped with a log line
MAX_KEY_LENGTH = 400              # a record's key: a name_key(), which NFKD can make longer than the name
MAX_ACCOUNTS = 10000              # registered nicknames
REGISTRATIONS_PER_ADDRESS = 5     # accounts one address (IPv6: /64) may register ...
REGISTRATION_WINDOW = 3600.0      # ... in this many seconds, so that no one fills the table for others
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

MAX_SECONDS = 1_000_000           # the longest timeout: poll() takes at most about 24 days, in milliseconds
MAX_KEEPALIVE = 32767             # the longest --keepalive: the most Linux takes for TCP_KEEPIDLE


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


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the command line; every option has a default that suits a small group."""
    parser = argparse.ArgumentParser(
        description="pyChat server: a chat for the terminal. Clients connect with "
                    "pyChat-client.py or any line-based TCP tool such as nc.")
    parser.add_argument("--version", action="version", version=f"pyChat server {VERSION}")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on; '::' for IPv6 (default: all IPv4 interfaces)")
    parser.add_argument("--port", type=number(int, 0, 65535), default=DEFAULT_PORT,
                        help=f"TCP port; 0 picks a free one and logs it (default: {DEFAULT_PORT})")
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
    limits.add_argument("--rooms-per-person", type=count, default=ROOMS_PER_PERSON, metavar="N",
                        help=f"rooms one person may be in at once, 0 for no limit (default: {ROOMS_PER_PERSON})")
    history = parser.add_argument_group("history")
    history.add_argument("--history", type=count, default=HISTORY_LINES, metavar="N",
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
    return options


# ---------------------------------------------------------------------------
# The protocol: framing, cleaning text, names, events and the lines they become
# ---------------------------------------------------------------------------

class LineReader:
    """Splits a byte stream into lines, never holding more than one line's worth of bytes.

    feed() returns the complete lines it found, as text; a line longer than
    the limit comes out as None, once, and its bytes are dropped as they arrive.
    The limit holds for the text as it will be sent on: an invalid byte
    becomes U+FFFD, and counts as the three bytes that takes in UTF-8.
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
                lines.append(self.decode(raw))
        if len(self.partial) > self.max_bytes:
            self.partial.clear()
            self.discarding = True
            lines.append(None)
        return lines

    def decode(self, raw: bytes) -> str | None:
        """The text of one line, or None if it is too long once invalid bytes are replaced."""
        if len(raw) > self.max_bytes:
            return None
        text = raw.decode("utf-8", "replace")
        if "\ufffd" in text and len(text.encode("utf-8")) > self.max_bytes:
            return None
        return text


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


def clean_text(text: str) -> str:
    """Make untrusted text safe to show: no control characters or direction overrides, and one space
    between words; leading indentation stays (tabs as spaces, up to MAX_INDENT), trailing blanks go.

    Linear in the length of TEXT, so it may run on anything a client sends.
    """
    if not text.isprintable():
        text = _INVISIBLE.sub("", text)
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


def name_key(name: str) -> str:
    """The form two names share when they would look the same: case, accents, digits and look-alikes folded.

    A name too long to be anyone's gets a key no real name has, without any work.
    """
    if len(name) > MAX_NICKNAME_LENGTH:
        return "\0"
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

class Said(NamedTuple):
    room: str
    nick: str
    text: str


class Acted(NamedTuple):
    room: str
    nick: str
    text: str


class Joined(NamedTuple):
    room: str
    nick: str


class Left(NamedTuple):
    room: str
    nick: str


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
    """A room operator changed a setting of the room (see ROOM_SETTINGS)."""
    room: str
    nick: str
    setting: str
    value: str


class Quit(NamedTuple):
    nick: str
    reason: str | None


class Renamed(NamedTuple):
    old: str
    new: str


class AwayChanged(NamedTuple):
    nick: str
    reason: str | None          # None: back


class Notice(NamedTuple):
    text: str


class Reply(NamedTuple):
    text: str


class Error(NamedTuple):
    text: str


class Prompt(NamedTuple):
    asking_for: str             # "nickname" or "password"


class Welcome(NamedTuple):
    nick: str


class Entered(NamedTuple):
    """You are now in ROOM (and it is current), with these others."""
    room: str
    others: tuple[str, ...]
    more: int


class Topic(NamedTuple):
    room: str
    topic: str


class Replayed(NamedTuple):
    """A line said in a room before you came, with the time it was said."""
    when: float
    line: Said | Acted


class HistoryEnd(NamedTuple):
    room: str


class NowTalking(NamedTuple):
    room: str


class YouLeft(NamedTuple):
    room: str


class YouWereKicked(NamedTuple):
    room: str
    by: str
    reason: str | None


class Invited(NamedTuple):
    room: str
    by: str


class PrivateFrom(NamedTuple):
    nick: str
    text: str


class PrivateTo(NamedTuple):
    nick: str
    text: str


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


class SignedInElsewhere(NamedTuple):
    pass


def _because(reason: str | None) -> str:
    return f": {reason}" if reason else ""


def _mode_words(event: ModeChanged) -> str:
    room = f"#{event.room}"
    words = {
        ("key", "off"): f"removed the key of {room}",
        ("invite-only", "on"): f"made {room} invite-only",
        ("invite-only", "off"): f"opened {room} to everyone",
        ("topic", "operators"): f"let only operators of {room} set its topic",
        ("topic", "everyone"): f"let everyone in {room} set its topic",
    }.get((event.setting, event.value))
    if words is None:
        words = {"key": f"set a key on {room}", "op": f"made {event.value} an operator of {room}",
                 "deop": f"took operator status in {room} from {event.value}"}[event.setting]
    return f"*** {event.nick} {words}"


def _utc(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class PyChatProtocol:
    """pyChat's own line protocol (README, "Wire protocol"): every line the server writes is made here.

    A line of a room other than the receiver's current one is tagged with the
    room: `#dev bob: hi`. Nicknames start with a letter, so no other line
    starts with `#`.
    """

    LINES: dict[type, Callable[[Any], str]] = {
        Said: lambda e: f"{e.nick}: {e.text}",
        Acted: lambda e: f"* {e.nick} {e.text}",
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
        Error: lambda e: f"!! {e.text}",
        Prompt: lambda e: "*** Choose a nickname:" if e.asking_for == "nickname" else "*** Password:",
        Welcome: lambda e: f"*** Welcome, {e.nick}! Type /help for the commands.",
        Entered: lambda e: f"*** You are in #{e.room}" + (
            f" with {', '.join(e.others + ((f'{e.more} more',) if e.more else ()))}." if e.others
            else ", alone for now."),
        Topic: lambda e: f"*** Topic of #{e.room}: {e.topic}",
        Replayed: lambda e: f"[history {_utc(e.when)}] {PyChatProtocol.LINES[type(e.line)](e.line)}",
        HistoryEnd: lambda e: f"*** End of #{e.room} history.",
        NowTalking: lambda e: f"*** Now talking in #{e.room}.",
        YouLeft: lambda e: f"*** You left #{e.room}.",
        YouWereKicked: lambda e: f"*** You were kicked from #{e.room} by {e.by}{_because(e.reason)}.",
        Invited: lambda e: f"*** {e.by} invites you to #{e.room}. Type /join #{e.room} to accept.",
        PrivateFrom: lambda e: f"[pm from {e.nick}] {e.text}",
        PrivateTo: lambda e: f"[pm to {e.nick}] {e.text}",
        Bye: lambda e: "*** Bye.",
        ShuttingDown: lambda e: "*** Server shutting down.",
        DisconnectedBy: lambda e: f"*** You were disconnected by {e.by}{_because(e.reason)}.",
        Farewell: lambda e: f"!! Disconnected: {e.reason}.",
        AccountPrompt: lambda e: {"password": f"*** Password for {e.nick}:",
                                  "code": f"*** Invitation code for {e.nick}:",
                                  "new password": f"*** Choose a password for {e.nick}:"}[e.asking_for],
        OfflinePrivate: lambda e: f"[offline {_utc(e.when)} from {e.nick}] {e.text}",
        Banned: lambda e: f"*** You were banned by {e.by} {e.how_long}{_because(e.reason)}.",
        SignedInElsewhere: lambda e: "*** You signed in again somewhere else; this connection is closed.",
    }

    def line(self, event: Any) -> str:
        """EVENT as a line of text, as it reads in the receiver's current room."""
        return self.LINES[type(event)](event)

    def encode(self, event: Any, tagged: bool = False) -> bytes:
        """EVENT as bytes to send; TAGGED for a room event of a room that is not the receiver's current one."""
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
# Output: a connection's outbox and its end, and the pump that writes them all
# ---------------------------------------------------------------------------
#
# The locks, in the only order in which one may be taken while holding another:
#
#   ChatServer.lock  ->  Output.io_lock  ->  Output.outbox_lock  ->  OutputPump.state_lock
#
# ChatServer.lock guards people and rooms (every Person and Room field); lines
# are queued while it is held, so everyone sees a room's lines in one order.
# Output.io_lock is held around each system call on a socket (a TLS socket's
# reads and writes must never overlap); Output.outbox_lock around taking lines
# out of an output's `pending` and changing its `outbox`, so queueing a line
# never waits for a send. Queueing a line takes no lock at all: it appends to a
# deque, which is safe from any thread (see Output). OutputPump.state_lock
# guards what the pump watches and whether it sleeps. Nothing slow (file
# writes aside, see ChatServer.save_history) happens under ChatServer.lock, and
# no thread holding one of the later locks ever asks for an earlier one.
#
# Chunks that may wait in an output's `pending` before the thread that queues
# one more counts what waits (moving them to `outbox`) and checks --max-queue.
# The pump keeps a reader who reads well near zero, so only a reader who falls
# behind is ever counted; at most this many lines past --max-queue are kept.
PENDING_BEFORE_COUNT = 64

def wait_until_writable(sock: socket.socket, timeout: float) -> None:
    """Wait until SOCK can take more output, or TIMEOUT runs out."""
    if hasattr(select, "poll"):        # select() cannot watch descriptors above 1023
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLOUT)
        poller.poll(max(0, int(timeout * 1000)))
    else:
        select.select((), (sock,), (), max(0.0, timeout))


def take(chunks: collections.deque[bytes], count: int) -> bytes:
    """The first COUNT of CHUNKS, taken off and joined, while other threads may append to them."""
    if count == 1:
        return chunks.popleft()
    # starmap calls popleft COUNT times in C: no Python code runs per chunk.
    return b"".join(itertools.starmap(chunks.popleft, itertools.repeat((), count)))


class Output:
    """One connection's output and the one way the connection ends.

    Lines are appended to `pending` by whoever produces them, from any thread
    and without a lock: a deque's append and popleft are atomic, so appends
    keep their order and none is lost while the pump takes chunks off the
    other end. The pump takes everything pending at once and writes it in one
    system call; what the socket did not take waits in `outbox`, in front of
    anything pending. end() is the one way a connection ends: the first reason
    wins, later ones change nothing, and the reading thread is woken to finish.
    close() drains what it can and always closes the socket; after it,
    everything is a no-op.
    """

    def __init__(self, sock: socket.socket, pump: OutputPump, protocol: PyChatProtocol = PYCHAT,
                 name: Callable[[], str] = lambda: "?") -> None:
        self.sock = sock
        self.pump = pump
        self.protocol = protocol
        self.name = name                    # who this is, for the log
        self.io_lock = threading.Lock()
        self.outbox_lock = threading.Lock()
        self.pending: collections.deque[bytes] = collections.deque()   # queued, not yet taken by the pump
        self.outbox = bytearray()           # taken or counted, not yet sent: older than all of `pending`
        # Neither in the pump's line of outputs to write nor watched until its socket takes more: the
        # next line queued lines it up. The pump sets it before it takes what is pending, so a line
        # queued after that lines the output up again.
        self.idle = True
        self.stalled_since: float | None = None
        self.reason: str | None = None      # why the connection ends, once it does
        self.dropped = False                # ended with its queued output thrown away
        self.closed = False
        self.refusing = False               # ending or closed: nothing more is queued

    def __repr__(self) -> str:
        return self.name()

    def send(self, event: Any) -> None:
        """Queue one event for this connection alone."""
        self.pump.queue((self,), self.protocol.encode(event))

    def end(self, reason: str, farewell: Any = None, drop_output: bool = False) -> bool:
        """End the connection for REASON, telling the person FAREWELL; False if it was ending already.

        Normally what is queued is still sent, farewell last: nothing is queued
        after it. With DROP_OUTPUT (a reader who does not read) the outbox is
        thrown away and the farewell is written only if the socket takes it at once.
        """
        data = b"" if farewell is None else self.protocol.encode(farewell)
        with self.outbox_lock:
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
                line_up, self.idle = self.idle, False
        if drop_output:
            log.warning("cutting off %r: %s", self, reason)
            if data:
                self._try_to_write(data)
        elif data and line_up:
            self.pump.mark_ready([self])
        try:
            # The plain socket method: on a TLS socket the ssl module's shutdown() would also drop the
            # TLS state, which the reading thread may be using at this moment. Shutting the reading side
            # wakes that thread, which then finishes the connection.
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR if drop_output else socket.SHUT_RD)
        except OSError:
            pass
        return True

    def _try_to_write(self, data: bytes) -> None:
        try:
            with self.io_lock:
                self.sock.send(data)
        except (OSError, ValueError):
            pass        # it could not take even this: it will not be told

    def waiting(self) -> int:
        """Move what is pending to the outbox; the bytes that wait to be sent."""
        with self.outbox_lock:
            if self.pending:
                self.outbox += take(self.pending, len(self.pending))
            return len(self.outbox)

    def flush(self) -> bool:
        """Write the outbox and everything pending, as much as the socket takes now, in one system call;
        True if some is left."""
        with self.io_lock:
            with self.outbox_lock:
                self.idle = True
                pending = self.pending
                count = len(pending)
                if self.closed or not (count or self.outbox):
                    return False
                if self.outbox:
                    if count:
                        self.outbox += take(pending, count)
                    data, self.outbox = self.outbox, bytearray()
                else:
                    data = take(pending, count)
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                sent = 0
            except OSError:
                return False        # the reading thread will find the connection gone
            if sent == len(data) and self.stalled_since is None:
                return False        # the usual case: all of it went, and nothing was waiting before
            with self.outbox_lock:
                if sent < len(data):
                    # In front of whatever was counted during the send; the pump watches the socket now.
                    self.outbox[:0] = memoryview(data)[sent:]
                    self.idle = False
                if sent:
                    self.stalled_since = None
                if self.outbox and self.stalled_since is None:
                    self.stalled_since = time.monotonic()
                return bool(self.outbox)

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
            with self.io_lock, self.outbox_lock:
                self.closed = self.refusing = True
                self.idle = False
                self.outbox.clear()
                self.pending.clear()
            try:
                self.pump.forget(self)      # after `closed`, so the pump cannot watch it again
            finally:
                self.sock.close()


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
        self.ready: collections.deque[Output] = collections.deque()
        self.selector = selectors.DefaultSelector()
        self.watched: set[Output] = set()
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.selector.register(self.wake_reader, selectors.EVENT_READ)
        self.state_lock = threading.Lock()
        self.sleeping = False       # the pump waits in select() for more than a moment; state_lock
        self.sleep_seconds = 1.0    # the longest wait: stalled readers are looked for once a second
        self.running = True

    def queue(self, outputs: Iterable[Output], data: bytes) -> None:
        """Append DATA to each output's pending chunks, and line up the ones to write.

        This runs for every line and every receiver, so it does as little as it
        can, and takes no lock. A receiver who has fallen PENDING_BEFORE_COUNT
        lines behind is counted, and cut off past --max-queue.
        """
        newly_ready = []
        behind = []
        for output in outputs:
            if output.refusing:
                continue
            pending = output.pending
            pending.append(data)
            if output.idle:
                output.idle = False
                newly_ready.append(output)
            if len(pending) > PENDING_BEFORE_COUNT:
                behind.append(output)
        for output in behind:
            size = output.waiting()
            if size > self.max_queue:
                output.end(f"not reading: {size} bytes waiting", Farewell("not reading what the server sends"),
                           drop_output=True)
        if newly_ready:
            self.mark_ready(newly_ready)

    def mark_ready(self, outputs: list[Output]) -> None:
        """Line OUTPUTS up for writing, waking the pump if it sleeps."""
        with self.state_lock:
            self.ready.extend(outputs)
            wake, self.sleeping = self.sleeping, False
        if wake:
            self.wake_writer.send(b"\0")

    def forget(self, output: Output) -> None:
        """Stop watching an output before its socket is closed."""
        with self.state_lock:
            if output in self.watched:
                self.watched.discard(output)
                self.selector.unregister(output.sock)

    def stop(self) -> None:
        self.running = False
        self.wake_writer.send(b"\0")

    def run(self) -> None:
        next_check = time.monotonic() + 1.0
        while self.running:
            with self.state_lock:
                # Decided under the lock that mark_ready() takes: a line queued after this sees
                # `sleeping` and rings, so the select() below returns at once.
                self.sleeping = not self.ready
                timeout = self.sleep_seconds if self.sleeping else 0
            events = self.selector.select(timeout)
            with self.state_lock:
                self.sleeping = False
            for key, _ in events:
                if key.fileobj is self.wake_reader:
                    self.wake_reader.recv(4096)
                else:
                    self.ready.append(key.data)     # writable again
            ready, watched = self.ready, self.watched
            while ready:
                output = ready.popleft()
                try:
                    more = output.flush()
                    if more or output in watched:     # the usual case is neither: all of it went at once
                        self.watch(output, more)
                except Exception:       # one broken connection must not silence everyone
                    log.exception("writing to %r failed", output)
                    output.end("could not write to it", drop_output=True)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 1.0
                self.cut_off_stalled()

    def watch(self, output: Output, more: bool) -> None:
        """Watch OUTPUT's socket until it takes more if MORE is waiting for it, and stop watching if not."""
        with self.state_lock:
            if more and output not in self.watched and not output.closed:
                self.selector.register(output.sock, selectors.EVENT_WRITE, output)
                self.watched.add(output)
            elif not more and output in self.watched:
                self.watched.discard(output)
                self.selector.unregister(output.sock)

    def cut_off_stalled(self) -> None:
        now = time.monotonic()
        with self.state_lock:
            stalled = [output for output in self.watched if output.stalled_longer_than(self.stall_timeout, now)]
        for output in stalled:
            output.end(f"not reading for {self.stall_timeout:g} s",
                       Farewell(f"not reading for {self.stall_timeout:g} s"), drop_output=True)


# ---------------------------------------------------------------------------
# The connection handler: one thread per person
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

    The socket is non-blocking: this thread waits for input with poll(); the
    output and the end of the connection belong to `output`.
    """

    server: ChatServer

    def setup(self) -> None:
        self.sock: socket.socket = self.request
        self.address = self.client_address[0]
        self.person: Person | None = None
        self.output = Output(self.sock, self.server.pump, PYCHAT, name=self.__repr__)
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
        return f"{self.person.nick if self.person else '(signing in)'}@{self.address}"

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
            self.bucket = TokenBucket(self.server.options.rate, self.server.options.burst)   # a full burst to start
            for line in lines:
                self.on_line(line)
                if self.output.reason is not None:      # /quit, or ended from elsewhere
                    return
        except Disconnect as why:
            self.output.end(why.reason, why.farewell)

    def finish(self) -> None:
        try:
            self.server.remove(self, self.output.reason or "connection lost")
        finally:
            self.output.close()

    def ask_password(self, lines: Iterator[str | None]) -> None:
        for _ in range(PASSWORD_TRIES):
            self.output.send(Prompt("password"))
            given = next(lines) or ""
            try:
                if self.server.check_secret(self, "server password",
                                            lambda: same_secret(given, self.server.options.password)):
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
        a nickname (Problem("")). On a --private server a name without an
        account needs an invitation code, and then a new password.
        """
        data, now = self.server.data, time.time()
        registered = data.accounts.name(nick)
        if registered is None:
            return self.accept_invitation(normal_name(nick), lines) if self.server.options.private else None
        ban = data.bans.for_account(registered, now)
        if ban is not None:
            self.output.send(Error(ban.refusal(now)))
            raise Disconnect(f"banned account {registered}")
        if not self.ask_secret(lines, registered, "password", lambda given: data.accounts.verify(registered, given)):
            return Problem("")
        return registered

    def ask_secret(self, lines: Iterator[str | None], nick: str, what: str, is_right: Callable[[str], bool]) -> bool:
        """Ask for NICK's WHAT ("password" or "code") until it is right (True) or the answer is empty (False).

        Wrong answers count as guesses (ChatServer.check_secret); the third closes the connection.
        """
        words = {"password": "password", "code": "invitation code"}[what]
        for tries in range(1, PASSWORD_TRIES + 1):
            self.output.send(AccountPrompt(nick, what))
            given = clean_text(next(lines) or "").strip()     # read as a command's argument would be
            if not given:
                return False
            try:
                if self.server.check_secret(self, f"{words} for {nick}", lambda: is_right(given)):
                    return True
            except TooManyGuesses as refusal:
                raise Disconnect("too many wrong passwords from the address", Farewell(str(refusal))) from None
            if tries < PASSWORD_TRIES:
                self.output.send(Error(f"Wrong {words} for {nick}."))
        raise Disconnect(f"wrong {words} for {nick}", Farewell(f"{PASSWORD_TRIES} wrong {words}s for {nick}"))

    def accept_invitation(self, nick: str, lines: Iterator[str | None]) -> str | Problem:
        """On a --private server: NICK's invitation code, then their new password; returns the new account."""
        data = self.server.data
        named = name_key(nick) in data.operators.named_at_start      # may choose their password at once
        if not named and not data.invitations.waiting(nick):
            return Problem("This server is private: only people with an account may sign in. "
                           "An operator can invite you with /invite-account.")
        if not named and not self.ask_secret(lines, nick, "code", lambda given: data.invitations.check(nick, given)):
            return Problem("")
        while True:
            self.output.send(AccountPrompt(nick, "new password"))
            password = clean_text(next(lines) or "").strip()
            problem = password_problem(password, nick)
            if problem is None:
                break
            self.output.send(Error(problem))
        try:
            data.accounts.register(nick, password)
        except (StoreFull, StorageError) as problem:
            return Problem(str(problem))
        data.invitations.remove(nick)
        log.info("%s registered at their first sign-in, from %s", nick, self.address)
        return nick

    def on_line(self, line: str | None) -> None:
        """One line from a signed-in person: a command, or something to say to their current room."""
        if line is None:
            self.output.send(Error(f"Line too long (over {MAX_LINE_BYTES} bytes); it was not sent."))
            return
        text = clean_text(line)
        if not text:
            return
        if text.startswith("//"):
            self.server.say(self.person, text[1:])
        elif text.startswith("/"):
            log.debug("%r: %s", self, text.split(" ", 1)[0])
            self.server.commands.run(Context(self.server, self.person), text)
        else:
            self.server.say(self.person, text)

    def within_rate(self) -> bool:
        """Flood control: refuse lines over the rate, and disconnect someone who keeps at it."""
        if self.bucket.allow():
            self.flood_warned = False
            return True
        now = time.monotonic()
        # Refused lines drain away at the allowed rate; a pile of them means a flood, not a paste.
        self.flood_excess = max(0.0, self.flood_excess - (now - self.bucket.updated) * self.bucket.rate) + 1
        if self.flood_excess > 2 * self.bucket.burst + 10:
            raise Disconnect("flooding", Farewell(f"flooding (more than {self.bucket.rate:g} lines a second)"))
        if not self.flood_warned:
            self.flood_warned = True
            self.output.send(Error(f"You are sending too fast (limit {self.bucket.rate:g} lines a second); "
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
                self.wait_for_input(options.idle_timeout if self.person else options.nick_timeout)
            try:
                with self.output.io_lock:
                    data = self.sock.recv(RECEIVE_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue
            except OSError as problem:
                raise Disconnect(f"connection lost ({problem.strerror or problem})") from None
            if not data:
                if self.server.stopping:
                    raise Disconnect("server shutting down", ShuttingDown())
                raise Disconnect("connection closed")
            self.last_heard = time.monotonic()
            for line in self.lines.feed(data):
                # Every line counts against the rate, whatever it is and whenever it comes.
                if self.within_rate():
                    yield line

    def wait_for_input(self, timeout: float) -> None:
        # Signing in is timed from the connection; afterwards, silence is timed from the last input.
        deadline = None if not timeout else (self.last_heard if self.person else self.connected) + timeout
        while True:
            if self.server.stopping:
                raise Disconnect("server shutting down", ShuttingDown())
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                if self.person:
                    raise Disconnect("timed out", Farewell(f"idle for {timeout:g} s"))
                raise Disconnect("did not sign in in time", Farewell(f"no nickname within {timeout:g} s"))
            if self.input_waiter.wait(remaining):
                return

    def start_tls(self) -> None:
        """Shake hands; someone who speaks plain text to this port is told, in plain text, how to connect."""
        self.wait_for_input(self.server.options.nick_timeout)       # the sign-in clock
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
                    self.wait_for_input(self.server.options.nick_timeout)    # the sign-in clock
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

    def wait(self, timeout: float | None) -> bool:
        """True when the socket has input; False when time ran out or the server is stopping."""
        if self.poller is None:
            return self.sockets[0] in select.select(self.sockets, (), (), timeout)[0]
        events = self.poller.poll(None if timeout is None else max(0, int(timeout * 1000)))
        return any(fd == self.sockets[0] for fd, _ in events)


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
# The server object: who is here, rooms, and every change to them
# ---------------------------------------------------------------------------

Refused = commands.CommandError     # a request the core turns down; the caller sees the message


class Person:
    """Someone signed in. Changed only by ChatServer's methods, under its lock."""

    def __init__(self, nick: str, output: Output, address: str, serial: int) -> None:
        self.nick = nick
        self.key = name_key(nick)
        self.output = output
        self.address = address
        self.serial = serial                    # unique for the server's life: who "they" are across renames
        self.rooms: dict[str, Room] = {}        # by key, in the order joined
        self.current: Room | None = None        # where plain lines go
        self.away: str | None = None
        self.operator = False
        self.operator_failures = 0              # wrong /op secrets on this connection
        self.account: str | None = None         # the account signed in to (its registered spelling)
        self.since = time.time()                # signed in at
        self.last_spoke = time.monotonic()      # for /whois: last chat, action or private line
        self.muted = False
        self.ignoring: set[str] = set()         # name keys
        self.last_private_from: int | None = None   # a serial: nothing of a sender who left stays reachable
        self.invited_to: set[str] = set()       # room keys
        self.seen: dict[str, int] = {}          # room key -> history position when they left it
        self.listing = TokenBucket(LISTING_RATE, LISTING_BURST)
        self.quit_message = False               # they left with /quit and words of their own

    def __repr__(self) -> str:
        return f"{self.nick}@{self.address}"


class Room:
    """A room: its members (grouped by how lines reach them), settings, operators and last lines."""

    def __init__(self, name: str, history_lines: int) -> None:
        self.name = name
        self.key = name_key(name)
        self.members: set[Person] = set()
        # Members' outputs by (protocol, whether the room is not their current one): a line to the room
        # is rendered once per group, not once per member.
        self.audiences: dict[tuple[PyChatProtocol, bool], set[Output]] = {}
        self.operators: set[Person] = set()
        self.topic: str | None = None
        self.password: str | None = None        # the room's key, for /join ROOM KEY
        self.invite_only = False
        self.topic_by_everyone = False
        self.history: collections.deque[tuple[int, float, Said | Acted]] = collections.deque(
            maxlen=history_lines or 1)
        self.last_used = time.monotonic()

    @property
    def private(self) -> bool:
        return self.invite_only or self.password is not None

    def hear(self, person: Person, current: bool) -> None:
        """Put PERSON's output in the audience for their current room, or for their other rooms."""
        self.audiences.get((person.output.protocol, current), set()).discard(person.output)
        self.audiences.setdefault((person.output.protocol, not current), set()).add(person.output)

    def stop_hearing(self, person: Person) -> None:
        for tagged in (False, True):
            self.audiences.get((person.output.protocol, tagged), set()).discard(person.output)


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
        self.serials = itertools.count(1)
        self.rooms: dict[str, Room] = {}                        # by name_key()
        self.said = 0                                           # lines kept in history so far, all rooms
        self.connections: set[ClientConnection] = set()         # everyone, signed in or not
        self.per_address: collections.Counter[str] = collections.Counter()   # by address_bucket()
        self.admitted = 0                                       # connections given a thread
        self.refusing = 0                                       # TLS refusals under way
        self.failures: dict[str, tuple[int, float]] = {}        # wrong secrets and the last one's time, by bucket
        self.out_of_descriptors = False                         # accept() failed for want of one; logged once
        self.spare_descriptor: int | None = None                # given up to accept a newcomer just to tell them
        self.ignorers: dict[str, set[Person]] = {}              # who ignores each name_key(), if anyone
        self.stopping = False
        self.stop_signal, self.stop_trigger = socket.socketpair()
        self.tls = self.make_tls_context() if options.tls_cert else None
        self.data = DataDirectory(options.data_dir, options.history_file, options.history, options.operator)
        self.motd = MessageOfTheDay(options.motd)
        self.started = time.time()
        self.most_people = 0
        self.registrations: dict[str, list[float]] = {}         # when accounts were registered, by address_bucket()
        self.lobby: Room | None = None
        self.lobby = self.room_named(DEFAULT_ROOM)      # everyone's first room, never forgotten
        for room_name, lines in self.data.history.rooms_and_lines():
            room = self.room_named(room_name)
            for when, line in lines:
                event = PYCHAT.chat_event(room.name, line)
                if event is not None:
                    self.said += 1
                    room.history.append((self.said, when, event))
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
                    newcomer.send(PYCHAT.encode(Error("The server is out of resources. Try again later.")))
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
            request.sendall(PYCHAT.encode(Error(refusal)))
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

    def check_secret(self, connection: ClientConnection | Person, what: str, is_right: Callable[[], bool]) -> bool:
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

    # -- signing in and out ----------------------------------------------------------

    def sign_in(self, connection: ClientConnection, nick: str, account: str | None = None) -> str | None:
        """Make CONNECTION a person called NICK in the default room, or say why not.

        ACCOUNT is the account whose password they gave: its owner takes the
        name over from a connection that still holds it. Either all of it
        happens or none: a failure on the way in takes the person out again
        through the same door as leaving.
        """
        nick = normal_name(nick)
        motd = self.motd.lines()
        ignoring = self.data.accounts.ignoring(account) if account else []
        with self.lock:
            taken = self.people.get(name_key(nick))
            if taken is not None and account is not None and taken.key == name_key(account):
                taken.output.end("signed in again somewhere else", SignedInElsewhere())
                self._leave_chat(taken, "signed in again somewhere else")
                log.info("%r: its owner signed in again from %s", taken, connection.address)
            problem = self.nickname_problem(nick, account=account)
            if problem:
                return problem
            person = Person(nick, connection.output, connection.address, next(self.serials))
            person.account = account
            person.operator = account is not None and account in self.data.operators
            person.output.send(Welcome(nick))
            for line in motd:
                person.output.send(Notice(line))
            if person.operator:
                person.output.send(Notice("You are an operator of this server."))
            self.people[person.key] = person
            self.by_serial[person.serial] = person
            for key in ignoring:
                person.ignoring.add(key)
                self._count_ignorer(key, person, True)
            try:
                self._enter(person, self.lobby)
            except BaseException:
                self._forget(person)
                raise
            connection.person = person
            self.most_people = max(self.most_people, len(self.people))
        log.info("%r signed in%s", person, f" to the account {account}" if account else "")
        if account:
            self.deliver_offline_messages(person)
        return None

    def nickname_problem(self, nick: str, claimant: Person | None = None, account: str | None = None) -> str | None:
        """Why CLAIMANT (or a newcomer signed in to ACCOUNT) cannot be called NICK (already NFKC-normalised),
        or None. Lock held."""
        taken = self.people.get(name_key(nick))
        if taken is not None and taken is not claimant:
            return f"Nickname {nick!r} is taken (or looks too much like {taken.nick!r})."
        problem = name_problem(nick)
        if problem:
            return problem
        registered = self.data.accounts.name(nick)
        account = claimant.account if claimant is not None else account
        if registered is not None and (account is None or name_key(account) != name_key(registered)):
            return f"{registered} is registered: sign in as {registered} with its password to use it."
        return None

    def deliver_offline_messages(self, person: Person) -> None:
        """Show PERSON what was left for their account while they were away, but what came from people they ignore."""
        try:
            messages = self.data.offline.take(person.account)
        except StorageError as problem:
            log.error("offline messages for %s: %s", person.account, problem)
            return
        shown = [m for m in messages if m.sender_key not in person.ignoring]
        if not shown:
            return
        person.output.send(Notice("1 message was left for you while you were away:" if len(shown) == 1
                                  else f"{len(shown)} messages were left for you while you were away:"))
        for message in shown:
            person.output.send(OfflinePrivate(message.when, message.sender, message.text))
        person.output.send(Notice("End of messages left for you."))

    def remove(self, connection: ClientConnection, reason: str) -> None:
        """Take someone out of the chat; everyone who shares a room with them is told, once."""
        person = connection.person
        with self.lock:
            self.connections.discard(connection)
            if person is None or self.people.get(person.key) is not person:
                log.info("%r closed: %s", connection, reason)
                return
            self._leave_chat(person, reason)
        log.info("%r left: %s", person, reason)

    def _leave_chat(self, person: Person, reason: str) -> None:
        """Take PERSON out of the chat; everyone who shares a room with them is told, once. Lock held."""
        receivers = set()
        for room in person.rooms.values():
            if len(room.members) <= ANNOUNCE_LIMIT:
                receivers |= room.members
        receivers.discard(person)
        self._forget(person)
        if not self.stopping:
            # A muted person's own words (their /quit message) are not shown.
            shown = None if reason == QUIT or (person.muted and person.quit_message) else reason
            self._to_people(receivers, Quit(person.nick, shown))

    def _forget(self, person: Person) -> None:
        """Take PERSON out of every room and table, so that nothing of them stays reachable. Lock held."""
        for room in list(person.rooms.values()):
            self._exit(person, room, None, leaving_the_chat=True)
        if self.people.get(person.key) is person:
            del self.people[person.key]
        self.by_serial.pop(person.serial, None)
        for key in person.ignoring:
            self._count_ignorer(key, person, False)
        person.ignoring.clear()

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
                self.data.history.forget(forgotten.name)
            room = self.rooms[key] = Room(name, self.options.history)
            saved = self.data.rooms.load(name)
            if saved is not None:
                room.topic = saved.topic
                room.topic_by_everyone = "topic-by-everyone" in saved.modes
        return room

    def _enter(self, person: Person, room: Room) -> None:
        """Put PERSON in ROOM and make it current: the room is told, they see who is there, the topic and
        what they missed. Lock held."""
        if not room.members and room is not self.lobby:
            room.operators.add(person)          # whoever opens a room runs it
        room.members.add(person)
        person.rooms[room.key] = room
        person.invited_to.discard(room.key)
        room.last_used = time.monotonic()
        self._make_current(person, room)
        if not person.muted and len(room.members) <= ANNOUNCE_LIMIT:
            self._to_room(room, Joined(room.name, person.nick), skip=person)
        others = [m.nick for m in itertools.islice(room.members, 16) if m is not person][:15]
        person.output.send(Entered(room.name, tuple(others), len(room.members) - len(others) - 1))
        if room.topic:
            person.output.send(Topic(room.name, room.topic))
        if self.options.history:
            since = person.seen.pop(room.key, -1)
            missed = [Replayed(when, line) for number, when, line in room.history if number > since]
            for event in missed:
                person.output.send(event)
            if missed:
                person.output.send(HistoryEnd(room.name))

    def _exit(self, person: Person, room: Room, event: Any, leaving_the_chat: bool = False) -> None:
        """Take PERSON out of ROOM, telling the room EVENT (None: nothing). Unless they are leaving the chat,
        they are left with a current room: another of theirs, or the lobby. Lock held."""
        del person.rooms[room.key]
        room.members.discard(person)
        room.operators.discard(person)
        room.stop_hearing(person)
        if not leaving_the_chat:
            person.seen[room.key] = self.said
            while len(person.seen) > MAX_ROOMS:
                del person.seen[next(iter(person.seen))]
        if not room.members and room.private:
            # A private room that empties forgets everything, so the next to open it sees nothing of it.
            room.password, room.invite_only, room.topic = None, False, None
            room.history.clear()
            self.data.history.forget(room.name)
        if event is not None and len(room.members) <= ANNOUNCE_LIMIT:
            self._to_room(room, event)
        if person.current is room:
            person.current = None
            if leaving_the_chat:
                return
            if person.rooms:
                self._make_current(person, list(person.rooms.values())[-1])
                person.output.send(NowTalking(person.current.name))
            else:
                self._enter(person, self.lobby)

    def _make_current(self, person: Person, room: Room) -> None:
        old = person.current
        if old is not None and old is not room:
            old.hear(person, current=False)
        person.current = room
        room.hear(person, current=True)

    def _member_room(self, person: Person, name: str | None) -> Room:
        """The room NAME (or the current one) that PERSON is in; refused otherwise. Lock held."""
        if name is None:
            return person.current
        room = person.rooms.get(name_key(room_name(name)))
        if room is None:
            raise Refused(f"You are not in #{room_name(name)}.")
        return room

    def _visible_room(self, viewer: Person, name: str) -> Room:
        """The room NAME if it has people and VIEWER may know of it; refused otherwise. Lock held."""
        room = self.rooms.get(name_key(room_name(name)))
        if room is None or not room.members or (room.private and viewer not in room.members
                                                and not viewer.operator):
            raise Refused(f"No one is in #{room_name(name)}. /rooms lists the rooms.")
        return room

    def join(self, person: Person, name: str, password: str | None = None) -> None:
        """Enter the room NAME (creating it), or make it current if PERSON is in it already."""
        name = room_name(name)
        problem = name_problem(name, "Room name")
        if problem:
            raise Refused(problem)
        with self.lock:
            room = self.rooms.get(name_key(name))
            if room is not None and room.key in person.rooms:
                if room is person.current:
                    raise Refused(f"You are already in #{room.name}.")
                self._make_current(person, room)
                person.output.send(NowTalking(room.name))
                return
            limit = self.options.rooms_per_person
            if limit and len(person.rooms) >= limit:
                raise Refused(f"You are in {len(person.rooms)} rooms, the most one may be in; /leave one first.")
            if room is not None and room.members and not person.operator and room.key not in person.invited_to:
                if room.invite_only:
                    raise Refused(f"#{room.name} is invite-only; one of its operators can /invite you.")
                if room.password is not None and not hmac.compare_digest(
                        (password or "").encode("utf-8"), room.password.encode("utf-8")):
                    raise Refused(f"#{room.name} needs a key: /join #{room.name} KEY." if password is None
                                  else f"Wrong key for #{room.name}.")
            self._enter(person, room or self.room_named(name))

    def leave(self, person: Person, name: str | None = None) -> None:
        """Leave the room NAME, or the current one; leaving the last one goes back to the lobby."""
        with self.lock:
            room = self._member_room(person, name)
            if len(person.rooms) == 1 and room is self.lobby:
                raise Refused(f"#{room.name} is your only room; /quit leaves the chat.")
            person.output.send(YouLeft(room.name))
            self._exit(person, room, None if person.muted else Left(room.name, person.nick))

    def kick(self, by: Person, nick: str, reason: str | None, name: str | None = None) -> str:
        """Put NICK out of the room NAME (or BY's current one); returns NICK as they spell it."""
        with self.lock:
            room = self._member_room(by, name)
            self._check_runs(by, room)
            target = self._find(nick)
            if target not in room.members:
                raise Refused(f"{target.nick} is not in #{room.name}.")
            if target.operator and not by.operator:
                raise Refused(f"{target.nick} is a server operator; a room operator cannot kick them.")
            if len(target.rooms) == 1 and room is self.lobby:
                raise Refused(f"#{room.name} is {target.nick}'s only room; a server operator can /disconnect them.")
            target.output.send(YouWereKicked(room.name, by.nick, reason))
            self._exit(target, room, Kicked(room.name, target.nick, by.nick, reason))
        log.warning("%r kicked %r from #%s%s", by, target, room.name, f": {reason}" if reason else "")
        return target.nick

    def invite(self, by: Person, nick: str, name: str | None = None) -> str:
        """Let NICK into the room NAME (or BY's current one) past its key and invite-only; they are told."""
        with self.lock:
            room = self._member_room(by, name)
            if by.muted:
                raise Refused("You are muted; you cannot invite anyone.")
            if room.invite_only:
                self._check_runs(by, room)
            target = self._find(nick)
            if target in room.members:
                raise Refused(f"{target.nick} is already in #{room.name}.")
            target.invited_to.add(room.key)
            if by.key not in target.ignoring:
                target.output.send(Invited(room.name, by.nick))
            return target.nick

    def set_topic(self, by: Person, topic: str, name: str | None = None) -> None:
        """Set the topic of the room NAME (or BY's current one); the room is told."""
        with self.lock:
            room = self._member_room(by, name)
            if not room.topic_by_everyone:
                self._check_runs(by, room)
            elif by.muted:
                raise Refused("You are muted; you cannot set the topic.")
            room.topic = topic
            self._to_room(room, TopicChanged(room.name, by.nick, topic))
            saved = self._room_to_save(room)
        self._save_room(*saved)

    def set_mode(self, by: Person, setting: str, value: str, name: str | None = None) -> None:
        """Change one of ROOM_SETTINGS of the room NAME (or BY's current one); the room is told."""
        with self.lock:
            room = self._member_room(by, name)
            self._check_runs(by, room)
            if room is self.lobby and setting in ("key", "invite-only"):
                raise Refused(f"#{room.name} is open to everyone; it cannot be made private.")
            shown = value
            if setting == "key":
                room.password = None if value == "off" else value
                shown = "off" if value == "off" else "on"
            elif setting == "invite-only":
                room.invite_only = self._on_off(value)
            elif setting == "topic":
                if value not in ("operators", "everyone"):
                    raise Refused("Say who may set the topic: /mode topic operators, or /mode topic everyone.")
                room.topic_by_everyone = value == "everyone"
            elif setting in ("op", "deop"):
                target = self._find(value)
                if target not in room.members:
                    raise Refused(f"{target.nick} is not in #{room.name}.")
                if (setting == "op") == (target in room.operators):
                    raise Refused(f"{target.nick} is {'already' if setting == 'op' else 'not'} an operator "
                                  f"of #{room.name}.")
                (room.operators.add if setting == "op" else room.operators.discard)(target)
                shown = target.nick
            else:
                raise Refused(f"There is no setting {setting!r}; there are {', '.join(ROOM_SETTINGS)}.")
            self._to_room(room, ModeChanged(room.name, by.nick, setting, shown))
            saved = self._room_to_save(room)
        self._save_room(*saved)

    def _room_to_save(self, room: Room) -> tuple[str, str | None, list[str]]:
        """What of ROOM outlasts a restart: the topic and who may set it, unless the room is private, since a
        private room forgets everything once it empties, and every room is empty at a start; its lines
        already in the history file are forgotten there. Lock held."""
        if room.private:
            self.data.history.forget(room.name)
            return room.name, None, []
        return room.name, room.topic, ["topic-by-everyone"] if room.topic_by_everyone else []

    def _save_room(self, name: str, topic: str | None, modes: list[str]) -> None:
        try:
            self.data.rooms.save(name, topic, modes)
        except (StoreFull, StorageError) as problem:
            log.error("could not keep the settings of #%s: %s", name, problem)

    def room_settings(self, viewer: Person, name: str | None = None) -> commands.RoomSettings:
        """The settings of the room NAME (or VIEWER's current one)."""
        with self.lock:
            room = self._member_room(viewer, name)
            return commands.RoomSettings(room.name, room.topic, room.password is not None, room.invite_only,
                                         room.topic_by_everyone,
                                         tuple(sorted((p.nick for p in room.operators), key=str.casefold)))

    def _check_runs(self, person: Person, room: Room) -> None:
        """Refuse unless PERSON may run ROOM (an operator of it, or of the server) and is not muted."""
        if not (person.operator or person in room.operators):
            raise Refused(f"Only operators of #{room.name} may do that.")
        if person.muted:
            raise Refused("You are muted; you cannot run a room.")

    @staticmethod
    def _on_off(value: str) -> bool:
        if value not in ("on", "off"):
            raise Refused(f"Say on or off, not {value!r}.")
        return value == "on"

    # -- talking ----------------------------------------------------------------------

    def say(self, person: Person, text: str, name: str | None = None) -> None:
        """A chat line from PERSON to the room NAME, or to their current room."""
        self._speak(person, Said, text, name)

    def act(self, person: Person, text: str, name: str | None = None) -> None:
        """An action line, '* nick waves', to the room NAME or the current one."""
        self._speak(person, Acted, text, name)

    def _speak(self, person: Person, kind: type, text: str, name: str | None) -> None:
        with self.lock:
            if person.muted:
                person.output.send(Error("You are muted; the room does not hear you."))
                return
            room = self._member_room(person, name)
            person.last_spoke = time.monotonic()
            event = kind(room.name, person.nick, text)
            if self.options.history:
                when = time.time()
                self.said += 1
                room.history.append((self.said, when, event))
                if not room.private:
                    # In the file before anyone sees it, so whatever was seen survives a kill -9. A private
                    # room's lines are never written: it forgets them when it empties, as it would at a restart.
                    self.data.history.append(room.name, when, PYCHAT.line(event))
            self._to_room(room, event, sender=person)

    def send_private(self, person: Person, nick: str, text: str) -> None:
        """TEXT to NICK alone; PERSON gets a copy, and the away message if there is one.

        To a registered account that is offline, the message is kept until its next sign-in.
        """
        with self.lock:
            person.last_spoke = time.monotonic()
            target = self.people.get(name_key(normal_name(nick)))
        if target is None:
            self.leave_offline_message(person, nick, text)
            return
        with self.lock:
            if self.people.get(target.key) is not target:
                raise Refused(f"{target.nick} has just left.")
            if target is person:
                raise Refused("That is you.")
            if person.key not in target.ignoring:
                target.output.send(PrivateFrom(person.nick, text))
                target.last_private_from = person.serial
            person.output.send(PrivateTo(target.nick, text))
            if target.away:
                person.output.send(Reply(f"{target.nick} is away: {target.away}"))

    def leave_offline_message(self, person: Person, nick: str, text: str) -> None:
        """Keep TEXT for the offline account NICK, unless its owner ignores PERSON (who is told it was kept
        either way, as an ignored sender online sees their copy)."""
        registered = self.data.accounts.name(normal_name(nick))
        if registered is None:
            raise Refused(f"No one called {nick} is online. /online lists who is.")
        if person.key not in self.data.accounts.ignoring(registered):
            try:
                self.data.offline.leave(person.nick, registered, text)
            except (StoreFull, StorageError) as problem:
                raise Refused(str(problem)) from None
        person.output.send(PrivateTo(registered, text))
        person.output.send(Reply(f"{registered} is offline; the message is kept for them and shown when they "
                                 "next sign in."))

    def last_private_sender(self, person: Person) -> str:
        """The nickname of the last person who sent PERSON a private message, if they are still here."""
        with self.lock:
            if person.last_private_from is None:
                raise Refused("No one has sent you a private message yet.")
            sender = self.by_serial.get(person.last_private_from)
            if sender is None:
                raise Refused("The last person who sent you a private message has left.")
            return sender.nick

    # -- about a person: told once to everyone who shares a room with them ---------------

    def rename(self, person: Person, new_nick: str) -> None:
        """Change PERSON's nickname, by the same rules as signing in."""
        new_nick = normal_name(new_nick)
        with self.lock:
            if person.muted:
                raise Refused("You are muted; you cannot change your nickname.")
            problem = self.nickname_problem(new_nick, person)
            if problem:
                raise Refused(problem)
            if new_nick == person.nick:
                raise Refused(f"You are already {new_nick}.")
            old_nick, old_key, new_key = person.nick, person.key, name_key(new_nick)
            del self.people[old_key]
            person.nick, person.key = new_nick, new_key
            self.people[new_key] = person
            for someone in self.ignorers.pop(old_key, ()):       # an ignore follows the person
                someone.ignoring.discard(old_key)
                someone.ignoring.add(new_key)
                self._count_ignorer(new_key, someone, True)
            self._to_people(self._sharers(person) | {person}, Renamed(old_nick, new_nick))
        log.info("%s@%s is now known as %s", old_nick, person.address, new_nick)

    def set_away(self, person: Person, reason: str | None) -> None:
        """Mark PERSON away with REASON, or back with None; the people who share a room with them are told."""
        with self.lock:
            if reason is None and person.away is None:
                raise Refused("You are not away.")
            person.away = reason
            if not person.muted:
                self._to_people(self._sharers(person), AwayChanged(person.nick, reason))

    def _sharers(self, person: Person) -> set[Person]:
        """Everyone who shares at least one room with PERSON, but PERSON. Lock held."""
        receivers: set[Person] = set()
        for room in person.rooms.values():
            receivers |= room.members
        receivers.discard(person)
        return receivers

    def ignore(self, person: Person, nick: str, ignoring: bool = True) -> str:
        """Stop (or start again) showing PERSON NICK's lines; returns NICK as they spell it.

        An account keeps the list, so that it applies to messages left while its owner is offline.
        """
        with self.lock:
            target = self._find(nick)
            if target is person:
                raise Refused("You cannot ignore yourself.")
            if ignoring and target.key not in person.ignoring:
                person.ignoring.add(target.key)
                self._count_ignorer(target.key, person, True)
            elif not ignoring and target.key in person.ignoring:
                person.ignoring.discard(target.key)
                self._count_ignorer(target.key, person, False)
            elif not ignoring:
                raise Refused(f"You are not ignoring {target.nick}.")
            account, keys = person.account, list(person.ignoring)
        if account:
            try:
                self.data.accounts.set_ignoring(account, keys)
            except (StoreFull, StorageError) as problem:
                log.error("could not keep %s's /ignore list: %s", account, problem)
        return target.nick

    def ignored_by(self, person: Person) -> list[str]:
        """Nicknames PERSON ignores that are online now."""
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

    def become_operator(self, person: Person, secret: str) -> None:
        """Make PERSON a server operator if SECRET is the server's operator password.

        Three wrong tries close the connection; an address that tried too often must wait.
        """
        expected = self.options.op_password
        if not expected:
            raise Refused("This server has no operator password, so no one can be an operator.")
        try:
            right = self.check_secret(person, "operator password", lambda: same_secret(secret, expected))
        except TooManyGuesses as refusal:
            person.output.end("too many wrong operator passwords from the address", Farewell(str(refusal)))
            raise Refused(f"{refusal}. Closing the connection.") from None
        if not right:
            person.operator_failures += 1
            if person.operator_failures >= OPERATOR_TRIES:
                person.output.end("too many wrong operator passwords",
                                  Farewell(f"{OPERATOR_TRIES} wrong operator passwords"))
                raise Refused(f"Wrong operator password, {OPERATOR_TRIES} times: closing the connection.")
            raise Refused("Wrong operator password.")
        with self.lock:
            person.operator = True
        log.warning("%r is now an operator", person)

    def set_muted(self, by: Person, nick: str, muted: bool) -> str:
        """Mute or unmute NICK in every room; returns NICK as they spell it."""
        with self.lock:
            target = self._find(nick)
            if target.muted == muted:
                raise Refused(f"{target.nick} is already {'muted' if muted else 'not muted'}.")
            target.muted = muted
            target.output.send(Notice(f"You were {'muted' if muted else 'unmuted'} by {by.nick}."))
        log.warning("%r %s by %s", target, "muted" if muted else "unmuted", by.nick)
        return target.nick

    def disconnect(self, by: Person, nick: str, reason: str | None) -> str:
        """Close NICK's connection, telling them and their rooms who did it and why."""
        with self.lock:
            target = self._find(nick)
        why = f"disconnected by {by.nick}" + (f": {reason}" if reason else "")
        target.output.end(why, DisconnectedBy(by.nick, reason))
        log.warning("%r %s", target, why)
        return target.nick

    def quit(self, person: Person, message: str | None) -> None:
        """PERSON leaves the chat, with MESSAGE for the rooms; the connection closes once its output is sent."""
        if person.output.end(message or QUIT, Bye()):
            with self.lock:
                person.quit_message = message is not None

    # -- accounts -------------------------------------------------------------------------
    # Hashing a password and writing to the data directory are slow: they happen outside the lock.

    def register_account(self, person: Person, password: str) -> str:
        """Make PERSON's nickname their account, with PASSWORD."""
        if person.account:
            raise Refused(f"You are signed in to the account {person.account} already; "
                          "/passwd OLD NEW changes its password.")
        nick = person.nick
        problem = password_problem(password, nick)
        if problem:
            raise Refused(problem)
        bucket, now = address_bucket(person.address), time.monotonic()
        with self.lock:
            recent = [when for when in self.registrations.get(bucket, ()) if now - when < REGISTRATION_WINDOW]
            if len(recent) >= REGISTRATIONS_PER_ADDRESS:
                raise Refused(f"{REGISTRATIONS_PER_ADDRESS} accounts were registered from your address in the last "
                              f"{REGISTRATION_WINDOW / 3600:g} hour; try again later.")
            if len(self.registrations) > 10000:
                self.registrations = {b: t for b, t in self.registrations.items() if now - t[-1] < REGISTRATION_WINDOW}
            self.registrations[bucket] = recent + [now]      # counted before the slow part, so that tries at once count
        try:
            self.data.accounts.register(nick, password)
        except (StoreFull, StorageError) as problem:
            raise Refused(str(problem)) from None
        with self.lock:
            person.account = nick
            made_operator = not person.operator and nick in self.data.operators
            person.operator = person.operator or made_operator
            keys = list(person.ignoring)
        if keys:
            self.data.accounts.set_ignoring(nick, keys)
        if made_operator:
            person.output.send(Notice("You are an operator of this server."))
        log.info("%r registered", person)
        lasting = "" if self.data.directory else \
            " This server keeps no data directory: the account lasts until it stops."
        return (f"Registered {nick}. From now on, signing in as {nick} (or a name that looks like it) "
                f"asks for this password.{lasting}")

    def _check_own_password(self, person: Person, password: str) -> str:
        """PERSON's account, if PASSWORD is its password; refused (as a wrong guess) otherwise."""
        account = person.account
        if account is None:
            raise Refused(f"You are a guest: /register PASSWORD makes {person.nick} your account.")
        try:
            right = self.check_secret(person, f"password for {account}",
                                      lambda: self.data.accounts.verify(account, password))
        except TooManyGuesses as refusal:
            raise Refused(f"{refusal}.") from None
        if not right:
            raise Refused(f"Wrong password for {account}.")
        return account

    def change_password(self, person: Person, old: str, new: str) -> None:
        if person.account is not None:
            problem = password_problem(new, person.account)
            if problem:
                raise Refused(problem)
        account = self._check_own_password(person, old)
        try:
            self.data.accounts.set_password(account, new)
        except (StoreFull, StorageError) as problem:
            raise Refused(str(problem)) from None
        log.info("%r changed the password of %s", person, account)

    def unregister(self, person: Person, password: str) -> str:
        """Give up PERSON's account; on a --private server that also ends their connection."""
        account = self._check_own_password(person, password)
        was_operator = account in self.data.operators
        if was_operator and len(self.data.operators.names()) == 1:
            raise Refused(f"{account} is the last operator; make another with /oper add first.")
        try:
            self.data.accounts.remove(account)
            self.data.operators.remove(account)
            self.data.offline.forget(account)
        except StorageError as problem:
            raise Refused(str(problem)) from None
        with self.lock:
            person.account = None
            person.operator = person.operator and not was_operator
        log.info("%r gave up the account %s", person, account)
        if self.options.private:
            person.output.end("gave up their account", Farewell("this server is private, and you have no account now"))
        return f"{account} is no longer registered; anyone may use the name."

    def invite_account(self, by: Person, nick: str) -> str:
        """A one-time code that lets NICK into a --private server and choose their password."""
        nick = normal_name(nick)
        if not self.options.private:
            raise Refused("This server is not private: anyone may sign in and /register. (--private changes that.)")
        problem = name_problem(nick)
        if problem:
            raise Refused(problem)
        registered = self.data.accounts.name(nick)
        if registered is not None:
            raise Refused(f"{registered} has an account already.")
        try:
            code = self.data.invitations.create(nick, by.nick)
        except (StoreFull, StorageError) as problem:
            raise Refused(str(problem)) from None
        log.warning("%r invited %s", by, nick)
        return (f"Invitation for {nick}: {code} (it works once, for {INVITATION_SECONDS // 86400} days). "
                f"They sign in as {nick} and give it when asked.")

    def remove_account(self, by: Person, nick: str) -> str:
        """Take NICK's account (or invitation) away; on a --private server they are disconnected."""
        registered = self.data.accounts.name(nick)
        if registered is None:
            if self.data.invitations.remove(nick):
                return f"Removed the invitation for {nick}."
            raise Refused(f"{nick} has no account and no invitation.")
        if registered in self.data.operators:
            raise Refused(f"{registered} is an operator; /oper remove {registered} first.")
        try:
            self.data.accounts.remove(registered)
            self.data.offline.forget(registered)
        except StorageError as problem:
            raise Refused(str(problem)) from None
        with self.lock:
            owners = [p for p in self.people.values() if p.account and name_key(p.account) == name_key(registered)]
            for owner in owners:
                owner.account = None
        for owner in owners:
            if self.options.private:
                owner.output.end(f"account removed by {by.nick}", DisconnectedBy(by.nick, "your account was removed"))
            else:
                owner.output.send(Notice(f"{by.nick} removed your account; you are a guest now."))
        log.warning("%r removed the account %s", by, registered)
        return f"Removed the account {registered}."

    # -- operators by account ---------------------------------------------------------------

    def operator_names(self) -> list[str]:
        return self.data.operators.names()

    def set_operator(self, by: Person, nick: str, operator: bool) -> str:
        """Make the account NICK an operator of the server, or no longer one; whoever is signed in to it is told."""
        registered = self.data.accounts.name(nick)
        if registered is None:
            raise Refused(f"{nick} is not a registered account.")
        operators = self.data.operators
        if operator == (registered in operators):
            raise Refused(f"{registered} is {'already' if operator else 'not'} an operator.")
        if not operator and len(operators.names()) == 1:
            raise Refused(f"{registered} is the last operator; make another with /oper add first.")
        try:
            operators.add(registered, by.nick) if operator else operators.remove(registered)
        except (StoreFull, StorageError) as problem:
            raise Refused(str(problem)) from None
        with self.lock:
            for person in self.people.values():
                if person.account and name_key(person.account) == name_key(registered):
                    person.operator = operator
                    person.output.send(Notice(f"{by.nick} made you an operator of this server." if operator
                                              else f"{by.nick} took away your operator rights."))
        log.warning("%r %s %s", by, "made an operator:" if operator else "took operator rights from", registered)
        return (f"{registered} is now an operator of the server." if operator
                else f"{registered} is no longer an operator of the server.")

    # -- bans ---------------------------------------------------------------------------------

    def ban(self, by: Person, target: str, duration: str | None, reason: str | None) -> str:
        """Ban TARGET (a nickname, an address or a network) for DURATION (None: permanently), disconnecting
        whoever it keeps out."""
        now = time.time()
        try:
            seconds = parse_duration(duration) if duration else None
            found = ban_target(target)
        except ValueError as problem:
            raise Refused(str(problem)) from None
        if reason is not None and len(reason) > MAX_REASON_LENGTH:
            raise Refused(f"The reason is too long (at most {MAX_REASON_LENGTH} characters).")
        with self.lock:
            if found is None:
                kind, value, shown, what = self._ban_of_nick(by, target)
            else:
                (kind, value), shown = found, found[1]
                what = f"the {kind} {value}"
                network = ipaddress.ip_network(value)
                if self._banned_by(network, by):
                    raise Refused(f"That would ban you too: you connect from {ip_of(by.address)}.")
            ban = Ban(kind, value, shown, reason, by.nick, now, None if seconds is None else now + seconds)
            for person in self.people.values():
                if self._bans(ban, person) and person.operator:
                    raise Refused(f"That would ban {person.nick}, an operator of the server.")
        try:
            self.data.bans.add(ban)
        except (StoreFull, StorageError) as problem:
            raise Refused(str(problem)) from None
        with self.lock:
            banned = [person for person in self.people.values() if self._bans(ban, person)]
        how_long = ban.how_long(time.time())
        for person in banned:
            person.output.end(f"banned by {by.nick}" + (f": {reason}" if reason else ""),
                              Banned(by.nick, how_long, reason))
        log.warning("%r banned %s %s%s", by, what, how_long, f": {reason}" if reason else "")
        return (f"Banned {what} " + (f"for {describe_duration(seconds)}" if seconds else "permanently")
                + (f": {reason}" if reason else "") + "."
                + (f" Disconnected {', '.join(p.nick for p in banned)}." if banned else ""))

    def _ban_of_nick(self, by: Person, nick: str) -> tuple[str, str, str, str]:
        """What banning the nickname NICK bans: its account, or the address of the guest using it. Lock held."""
        registered = self.data.accounts.name(normal_name(nick))
        online = self.people.get(name_key(normal_name(nick))) if registered is None else None
        if registered is not None:
            if by.account and name_key(by.account) == name_key(registered) or by.key == name_key(registered):
                raise Refused("You cannot ban yourself.")
            if registered in self.data.operators:
                raise Refused(f"{registered} is an operator; /oper remove {registered} first.")
            return "account", name_key(registered), registered, f"the account {registered}"
        if online is None:
            raise Refused(f"No one called {nick} is online, and no account has that name; "
                          "ban an address or a network instead.")
        if online is by:
            raise Refused("You cannot ban yourself.")
        address = str(ip_of(online.address))
        if ip_of(by.address) == ip_of(online.address):
            raise Refused(f"That would ban you too: you connect from {address}.")
        return "address", address, f"{address} ({online.nick})", f"{online.nick}'s address {address}"

    @staticmethod
    def _banned_by(network: ipaddress.IPv4Network | ipaddress.IPv6Network, person: Person) -> bool:
        ip = ip_of(person.address)
        return ip is not None and ip.version == network.version and ip in network

    def _bans(self, ban: Ban, person: Person) -> bool:
        """Whether BAN keeps PERSON out. Lock held."""
        if ban.kind == "account":
            return person.account is not None and name_key(person.account) == ban.target
        return self._banned_by(ipaddress.ip_network(ban.target), person)

    def unban(self, by: Person, target: str) -> str:
        """Lift the ban on TARGET: an address, a network, an account, or a guest's nickname as /bans shows it."""
        try:
            found = ban_target(target)
        except ValueError as problem:
            raise Refused(str(problem)) from None
        now = time.time()
        if found is not None:
            key = f"{found[0]}:{found[1]}"
        else:
            # An account, or a guest's address, which /bans shows as "ADDRESS (NICK)".
            key = f"account:{name_key(normal_name(target))}"
            if self.data.bans.get(key) is None:
                key = next((ban.key for ban in self.data.bans.all(now)
                            if ban.shown.lower().endswith(f"({target.lower()})")), key)
        try:
            lifted = self.data.bans.remove(key)
        except StorageError as problem:
            raise Refused(str(problem)) from None
        if lifted is None:
            raise Refused(f"There is no ban on {target}. /bans lists them.")
        log.warning("%r lifted the ban on %s %s", by, lifted.kind, lifted.shown)
        return f"Lifted the ban on the {lifted.kind} {lifted.shown}."

    def ban_lines(self) -> list[str]:
        now = time.time()
        try:
            bans = self.data.bans.all(now)
        except StorageError as problem:
            raise Refused(str(problem)) from None
        return [f"{ban.kind} {ban.shown} by {ban.by}, {ban.how_long(now)}" + (f": {ban.reason}" if ban.reason else "")
                for ban in bans]

    # -- knowing who is who ---------------------------------------------------------------------

    def whois(self, viewer: Person, nick: str) -> commands.PersonDetails:
        """What VIEWER may know about NICK; the address only if VIEWER is an operator of the server."""
        with self.lock:
            target = self._find(nick)
            return commands.PersonDetails(
                target.nick, target.account, target.operator, utc_text(target.since),
                describe_duration(time.monotonic() - target.last_spoke),
                tuple(room.name for room in target.rooms.values() if self._may_see(viewer, room)), target.away,
                str(ip_of(target.address) or target.address) if viewer.operator else None)

    def server_details(self) -> commands.ServerDetails:
        with self.lock:
            people, rooms = len(self.people), sum(1 for room in self.rooms.values() if room.members)
        return commands.ServerDetails(VERSION, utc_text(self.started), describe_duration(time.time() - self.started),
                                      people, rooms, self.most_people)

    # -- lists: what commands may know, paid for from each person's listing budget ----------

    def online(self, viewer: Person) -> list[commands.PersonInfo]:
        """Everyone signed in, sorted by nickname; a private room shows only to its members."""
        with self.lock:
            self._charge(viewer, len(self.people), "/online")
            people = [commands.PersonInfo(p.nick, p.current.name if self._may_see(viewer, p.current) else None,
                                          p.away, p.operator, p.muted, False)
                      for p in self.people.values()]
        return sorted(people, key=lambda p: p.nick.casefold())

    def room_members(self, viewer: Person, name: str | None = None) -> tuple[str, list[commands.PersonInfo]]:
        """The room NAME (or VIEWER's current one) and its people, sorted by nickname."""
        with self.lock:
            room = viewer.current if name is None else self._visible_room(viewer, name)
            self._charge(viewer, len(room.members), "/who")
            people = [commands.PersonInfo(p.nick, room.name, p.away, p.operator, p.muted, p in room.operators)
                      for p in room.members]
        return room.name, sorted(people, key=lambda p: p.nick.casefold())

    def room_list(self, viewer: Person) -> list[commands.RoomInfo]:
        """Every room with people in it that VIEWER may know of, sorted by name."""
        with self.lock:
            rooms = [commands.RoomInfo(r.name, len(r.members), r.topic, r.key in viewer.rooms, r is viewer.current,
                                       r.private)
                     for r in self.rooms.values() if r.members and self._may_see(viewer, r)]
            self._charge(viewer, len(rooms), "/rooms")      # finding them is cheap: the table is bounded
        return sorted(rooms, key=lambda r: r.name.casefold())

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
                          f"try again in {max(1, math.ceil(wait))} s.")

    # -- delivery: events to the outputs of their receivers ----------------------------------

    def _to_room(self, room: Room, event: Any, skip: Person | None = None, sender: Person | None = None) -> None:
        """Queue EVENT to everyone in ROOM (but SKIP, and those ignoring SENDER), rendered once per
        audience. Lock held."""
        if skip is None and (sender is None or sender.key not in self.ignorers):
            for (protocol, tagged), outputs in room.audiences.items():
                if outputs:
                    self.pump.queue(outputs, protocol.encode(event, tagged))
            return
        groups: dict[tuple[PyChatProtocol, bool], list[Output]] = {}
        for member in room.members:
            if member is not skip and not (sender is not None and sender.key in member.ignoring):
                groups.setdefault((member.output.protocol, member.current is not room), []).append(member.output)
        for (protocol, tagged), outputs in groups.items():
            self.pump.queue(outputs, protocol.encode(event, tagged))

    def _to_people(self, people: Iterable[Person], event: Any) -> None:
        """Queue EVENT (not a room's) to each of PEOPLE, rendered once per protocol. Lock held."""
        groups: dict[PyChatProtocol, list[Output]] = {}
        for person in people:
            groups.setdefault(person.output.protocol, []).append(person.output)
        for protocol, outputs in groups.items():
            self.pump.queue(outputs, protocol.encode(event))

    def _find(self, nick: str) -> Person:
        """The person called NICK (spelt any look-alike way); the lock is held."""
        found = self.people.get(name_key(normal_name(nick)))
        if found is None:
            raise Refused(f"No one called {nick} is online. /online lists who is.")
        return found

    # -- shutting down -------------------------------------------------------------

    def stop(self) -> None:
        """Tell everyone, close every connection, and wait a little for them to go."""
        self.shutdown()
        with self.lock:
            self.stopping = True
            connections = list(self.connections)
        for connection in connections:
            connection.output.end("server shutting down", ShuttingDown())
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


def room_name(name: str) -> str:
    """A room name as typed (with or without '#'), as the server spells it."""
    return normal_name(name[1:] if name.startswith("#") else name)


# ---------------------------------------------------------------------------
# The context: all a slash-command may see and do
# ---------------------------------------------------------------------------

class Context:
    """The server's commands.Context: who called, and verbs that each delegate to one ChatServer method."""

    def __init__(self, server: ChatServer, caller: Person) -> None:
        self._server = server
        self._caller = caller

    @property
    def nick(self) -> str:
        return self._caller.nick

    @property
    def room(self) -> str:
        return self._caller.current.name

    @property
    def is_operator(self) -> bool:
        return self._caller.operator

    @property
    def away(self) -> str | None:
        return self._caller.away

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
        self._server.set_mode(self._caller, setting, value, room)

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

    def set_muted(self, nick: str, muted: bool) -> str:
        return self._server.set_muted(self._caller, nick, muted)

    def disconnect(self, nick: str, reason: str | None) -> str:
        return self._server.disconnect(self._caller, nick, reason)

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

    def invite_account(self, nick: str) -> str:
        return self._server.invite_account(self._caller, nick)

    def remove_account(self, nick: str) -> str:
        return self._server.remove_account(self._caller, nick)

    def whois(self, nick: str) -> commands.PersonDetails:
        return self._server.whois(self._caller, nick)

    def motd(self) -> list[str]:
        return self._server.motd.lines()

    def server_info(self) -> commands.ServerDetails:
        return self._server.server_details()


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
        try:    # only a privileged process may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            soft = hard = wanted
        except (ValueError, OSError):
            pass
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
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


def listen_problem(problem: OSError, host: str, port: int) -> str:
    """Why the server cannot listen on HOST:PORT, and what to do about it."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(problem, socket.gaierror):
        return (f"--host {host!r} is neither an address of this machine nor a name that resolves "
                f"({problem.strerror}); use an address such as 0.0.0.0 (all IPv4), :: (all IPv6) or 127.0.0.1")
    if problem.errno == errno.EADDRINUSE:
        return (f"cannot listen on {where}: the port is in use by another program (another pyChat server?); "
                f"stop it, or choose another --port (0 picks a free one)")
    if problem.errno == errno.EACCES and 0 < port < 1024:
        return (f"cannot listen on {where}: permission denied, since ports below 1024 need root or the "
                f"CAP_NET_BIND_SERVICE capability; use --port 1024 or higher")
    if problem.errno == errno.EADDRNOTAVAIL:
        return (f"cannot listen on {where}: {host} is not an address of this machine; use one it has "
                f"(ip address lists them), or 0.0.0.0 for all")
    return f"cannot listen on {where}: {problem.strerror or problem}"


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    logging.basicConfig(level=logging.DEBUG if options.verbose else logging.WARNING if options.quiet
                        else logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    raise_file_limit((options.max_clients or CLIENTS_WITHOUT_LIMIT) + SPARE_FILES)
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
    except OSError as problem:
        # A file names itself; otherwise it was listening that failed.
        log.error("cannot start: %s", f"{problem.filename}: {problem.strerror}" if problem.filename
                  else listen_problem(problem, options.host, options.port))
        return 1
    except (commands.CommandLoadError, StorageError, ssl.SSLError) as problem:
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
