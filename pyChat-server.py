#!/usr/bin/env python3
"""pyChat server: many people chatting in rooms over a plain line protocol.

The protocol is described in README.md ("Wire protocol"). This file reads top
to bottom: options and limits; the protocol (framing, cleaning text, names,
the events the core produces and the one class that turns them into lines);
a connection's output and the pump that writes to every socket; the
connection handler (one thread per connection); the server object, which
owns people and rooms and every change to them; the context that
slash-commands act through; then the IRC front door (README, "IRC clients"):
reading and writing IRC messages, the IRC protocol object that puts the
core's events in IRC's words, and the IRC connection and its listener; main().

A line becomes a broadcast in two hops: ClientConnection.on_line() (or, from
an IRC client, IrcConnection.irc_privmsg()) hands it to ChatServer.say(),
which renders the event once per audience of the room (PyChatProtocol.encode,
IrcProtocol.encode) and queues the bytes to each member's output.
"""
from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import datetime
import errno
import hmac
import inspect
import itertools
import json
import logging
import math
import os
import re
import select
import selectors
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
import unicodedata
from typing import Any, Callable, Iterable, Iterator, NamedTuple

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
MAX_SECONDS = 1_000_000           # the longest timeout: poll() takes at most about 24 days, in milliseconds
MAX_KEEPALIVE = 32767             # the longest --keepalive: the most Linux takes for TCP_KEEPIDLE
IRC_PORT = None                   # --irc-port: a second port, for IRC clients (None: no IRC)
IRC_PING_INTERVAL = 120.0         # --irc-ping: seconds of silence before an IRC client is sent PING


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
                         help="keep room history in this file (JSON lines) so it survives restarts")
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
    options = parser.parse_args(argv)
    if bool(options.tls_cert) != bool(options.tls_key):
        parser.error("--tls-cert and --tls-key go together")
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


def clean_text(text: str, invisible: re.Pattern = _INVISIBLE) -> str:
    """Make untrusted text safe to show: no control characters or direction overrides (those INVISIBLE
    matches), and one space between words; leading indentation stays (tabs as spaces, up to
    MAX_INDENT), trailing blanks go.

    Linear in the length of TEXT, so it may run on anything a client sends.
    """
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
    """You are now in ROOM (and it is current), with these others. MEMBERS (everyone, with whether they
    run the room) only for a protocol that lists members on entering (IRC's NAMES)."""
    room: str
    others: tuple[str, ...]
    more: int
    members: tuple[tuple[str, bool], ...] = ()


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
        PrivateFrom: lambda e: f"[pm from {e.nick}] {plain(e.text)}",
        PrivateTo: lambda e: f"[pm to {e.nick}] {plain(e.text)}",
        Bye: lambda e: "*** Bye.",
        ShuttingDown: lambda e: "*** Server shutting down.",
        DisconnectedBy: lambda e: f"*** You were disconnected by {e.by}{_because(e.reason)}.",
        Farewell: lambda e: f"!! Disconnected: {e.reason}.",
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
# reads and writes must never overlap); Output.outbox_lock only around changes
# to an outbox, so queueing a line never waits for a send. OutputPump.state_lock
# guards what the pump watches and whether it sleeps. Nothing slow (file
# writes aside, see ChatServer.save_history) happens under ChatServer.lock, and
# no thread holding one of the later locks ever asks for an earlier one.

def wait_until_writable(sock: socket.socket, timeout: float) -> None:
    """Wait until SOCK can take more output, or TIMEOUT runs out."""
    if hasattr(select, "poll"):        # select() cannot watch descriptors above 1023
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLOUT)
        poller.poll(max(0, int(timeout * 1000)))
    else:
        select.select((), (sock,), (), max(0.0, timeout))


class Output:
    """One connection's output and the one way the connection ends.

    Lines are appended to `outbox` by whoever produces them and written by the
    pump. end() is the one way a connection ends: the first reason wins, later
    ones change nothing, and the reading thread is woken to finish. close()
    drains what it can and always closes the socket; after it, everything is a
    no-op.
    """

    def __init__(self, sock: socket.socket, pump: OutputPump, protocol: PyChatProtocol = PYCHAT,
                 name: Callable[[], str] = lambda: "?") -> None:
        self.sock = sock
        self.pump = pump
        self.protocol = protocol
        self.name = name                    # who this is, for the log
        self.io_lock = threading.Lock()
        self.outbox_lock = threading.Lock()
        self.outbox = bytearray()
        self.ready_for_pump = False         # in the pump's line of outputs to write
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
            elif data:
                self.outbox += data
                line_up = not self.ready_for_pump and self.stalled_since is None
                self.ready_for_pump = self.ready_for_pump or line_up
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
                self.outbox.clear()
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
        """Append DATA to each output's outbox, and line up the ones to write.

        This runs for every line and every receiver, so it does as little as it
        can. A receiver whose outbox grows past --max-queue is cut off.
        """
        if not data:
            return
        newly_ready = []
        overflowing = []
        limit = self.max_queue
        for output in outputs:
            with output.outbox_lock:
                if output.refusing:
                    continue
                outbox = output.outbox
                outbox += data
                if len(outbox) > limit:
                    overflowing.append((output, len(outbox)))
                elif not output.ready_for_pump and output.stalled_since is None:
                    # Otherwise the pump has it in line already, or watches until its socket takes more.
                    output.ready_for_pump = True
                    newly_ready.append(output)
        for output, size in overflowing:
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
            while self.ready:
                output = self.ready.popleft()
                try:
                    self.write(output)
                except Exception:       # one broken connection must not silence everyone
                    log.exception("writing to %r failed", output)
                    output.end("could not write to it", drop_output=True)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 1.0
                self.cut_off_stalled()

    def write(self, output: Output) -> None:
        more = output.flush()
        if not more and output not in self.watched:
            return
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
            if self.server.check_secret(self, given, self.server.options.password, "server password"):
                return
            self.output.send(Error("Wrong password."))
        raise Disconnect("wrong password", Farewell(f"{PASSWORD_TRIES} wrong passwords"))

    def ask_nickname(self, lines: Iterator[str | None]) -> None:
        while True:
            self.output.send(Prompt("nickname"))
            wanted = next(lines)
            problem = (f"Nickname is too long (at most {MAX_NICKNAME_LENGTH} characters)."
                       if wanted is None else self.server.sign_in(self, wanted.strip()))
            if problem is None:
                return
            self.output.send(Error(problem))

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
        self.muted = False
        self.ignoring: set[str] = set()         # name keys
        self.last_private_from: int | None = None   # a serial: nothing of a sender who left stays reachable
        self.invited_to: set[str] = set()       # room keys
        self.seen: dict[str, int] = {}          # room key -> history position when they left it
        self.listing = TokenBucket(LISTING_RATE, LISTING_BURST)
        self.signed_in = time.time()
        self.last_spoke = time.monotonic()     # for how long they have been idle
        self.quit_message = False               # they left with /quit and words of their own

    def __repr__(self) -> str:
        return f"{self.nick}@{self.address}"


class Whois(NamedTuple):
    """What may be known of someone, for IRC's WHOIS."""

    nick: str
    rooms: tuple[tuple[str, bool], ...]     # the rooms the asker may see, and whether they run each
    away: str | None
    operator: bool
    signed_in: float                        # a time.time()
    idle: float                             # seconds since they last said something in a room
    protocol: str                           # the name of the protocol they came in with


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
        self.per_address: collections.Counter[str] = collections.Counter()
        self.admitted = 0                                       # connections given a thread
        self.refusing = 0                                       # TLS refusals under way
        self.failures: collections.Counter[str] = collections.Counter()   # wrong secrets, by address
        self.ignorers: dict[str, set[Person]] = {}              # who ignores each name_key(), if anyone
        self.stopping = False
        self.stop_signal, self.stop_trigger = socket.socketpair()
        self.started = time.time()
        self.tls = self.make_tls_context() if options.tls_cert else None
        self.history_file = None
        self.lobby: Room | None = None
        self.lobby = self.room_named(DEFAULT_ROOM)      # everyone's first room, never forgotten
        if options.history_file:
            self.load_history(options.history_file)
        self.pump = OutputPump(options.max_queue, options.stall_timeout)
        super().__init__((options.host, options.port), ClientConnection)
        self.irc = IrcListener(self) if options.irc_port is not None else None
        self.pump.start()

    def make_tls_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.options.tls_cert, self.options.tls_key)
        return context

    # -- admission ------------------------------------------------------------

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        self.admit(request, client_address, ClientConnection)

    def admit(self, request: socket.socket, client_address: tuple, protocol: type[ClientConnection]) -> None:
        """Give a newcomer a thread of its own, speaking PROTOCOL, or turn it away when the server or
        its address is full; the limits count every port alike."""
        address = client_address[0]
        options = self.options
        with self.lock:
            if options.max_clients and self.admitted >= options.max_clients:
                refusal = f"The server is full ({options.max_clients} connections). Try again later."
            elif options.max_per_ip and self.per_address[address] >= options.max_per_ip:
                refusal = f"Too many connections from your address (at most {options.max_per_ip})."
            else:
                self.per_address[address] += 1
                self.admitted += 1
                refusal = None
            # Over TLS the refusal needs a handshake first: a thread, but only a few at a time.
            explain = refusal and (self.tls is None or self.refusing < MAX_TLS_REFUSALS)
            if explain and self.tls is not None:
                self.refusing += 1
        if refusal is None:
            threading.Thread(target=self.process_request_thread, args=(request, client_address, protocol),
                             daemon=True).start()
            return
        log.warning("refused %s: %s", address, refusal)
        if not explain:
            self.shutdown_request(request)
        elif self.tls is None:
            self.refuse(request, protocol.refusal(refusal))
        else:
            threading.Thread(target=self.refuse, args=(request, protocol.refusal(refusal)), daemon=True).start()

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
        try:
            protocol(request, client_address, self)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self.lock:
                self.admitted -= 1
                self.per_address[client_address[0]] -= 1
                if not self.per_address[client_address[0]]:
                    del self.per_address[client_address[0]]

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

    def check_secret(self, connection: ClientConnection | Person, given: str, secret: str, what: str) -> bool:
        """Compare in constant time; every wrong try from an address makes the next answer slower."""
        if hmac.compare_digest(given.encode("utf-8"), secret.encode("utf-8")):
            with self.lock:
                self.failures.pop(connection.address, None)
            return True
        with self.lock:
            if len(self.failures) > 10000:
                self.failures.clear()
            self.failures[connection.address] += 1
            delay = min(self.failures[connection.address], 5)
        log.warning("wrong %s from %r (%d in a row)", what, connection, self.failures[connection.address])
        time.sleep(delay)
        return False

    # -- signing in and out ----------------------------------------------------------

    def sign_in(self, connection: ClientConnection, nick: str) -> str | None:
        """Make CONNECTION a person called NICK in the default room, or say why not.

        Either all of it happens or none: a failure on the way in takes the
        person out again through the same door as leaving.
        """
        nick = normal_name(nick)
        with self.lock:
            problem = self.nickname_problem(nick)
            if problem:
                return problem
            person = Person(nick, connection.output, connection.address, next(self.serials))
            person.output.send(Welcome(nick))
            self.people[person.key] = person
            self.by_serial[person.serial] = person
            try:
                self._enter(person, self.lobby)
            except BaseException:
                self._forget(person)
                raise
            connection.person = person
        log.info("%r signed in", person)
        return None

    def nickname_problem(self, nick: str, claimant: Person | None = None) -> str | None:
        """Why CLAIMANT (or a newcomer) cannot be called NICK (already NFKC-normalised), or None. Lock held."""
        taken = self.people.get(name_key(nick))
        if taken is not None and taken is not claimant:
            return f"Nickname {nick!r} is taken (or looks too much like {taken.nick!r})."
        return name_problem(nick)

    def remove(self, connection: ClientConnection, reason: str) -> None:
        """Take someone out of the chat; everyone who shares a room with them is told, once."""
        person = connection.person
        with self.lock:
            self.connections.discard(connection)
            if person is None or self.people.get(person.key) is not person:
                log.info("%r closed: %s", connection, reason)
                return
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
        log.info("%r left: %s", person, reason)

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
                del self.rooms[min(empty, key=lambda r: r.last_used).key]
            room = self.rooms[key] = Room(name, self.options.history)
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
        # A protocol that lists members gets them all, up to ANNOUNCE_LIMIT: past that, joins and leaves
        # are not announced, so a longer list would not stay true, and every newcomer would pay for it.
        members = (tuple((m.nick, m in room.operators) for m in itertools.islice(room.members, ANNOUNCE_LIMIT))
                   if person.output.protocol.lists_members else ())
        person.output.send(Entered(room.name, tuple(others), len(room.members) - len(others) - 1, members))
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
            raise Refused(f"You are not in #{room_name(name)}.", "not-in-room", room=room_name(name))
        return room

    def _visible_room(self, viewer: Person, name: str) -> Room:
        """The room NAME if it has people and VIEWER may know of it; refused otherwise. Lock held."""
        room = self.rooms.get(name_key(room_name(name)))
        if room is None or not room.members or (room.private and viewer not in room.members
                                                and not viewer.operator):
            raise Refused(f"No one is in #{room_name(name)}. /rooms lists the rooms.", "no-such-room",
                          room=room_name(name))
        return room

    def join(self, person: Person, name: str, password: str | None = None) -> None:
        """Enter the room NAME (creating it), or make it current if PERSON is in it already."""
        name = room_name(name)
        problem = name_problem(name, "Room name")
        if problem:
            raise Refused(problem, "no-such-room", room=name)
        with self.lock:
            room = self.rooms.get(name_key(name))
            if room is not None and room.key in person.rooms:
                if room is person.current:
                    raise Refused(f"You are already in #{room.name}.", "already-in-room", room=room.name)
                self._make_current(person, room)
                person.output.send(NowTalking(room.name))
                return
            limit = self.options.rooms_per_person
            if limit and len(person.rooms) >= limit:
                raise Refused(f"You are in {len(person.rooms)} rooms, the most one may be in; /leave one first.",
                              "too-many-rooms", room=name)
            if room is not None and room.members and not person.operator and room.key not in person.invited_to:
                if room.invite_only:
                    raise Refused(f"#{room.name} is invite-only; one of its operators can /invite you.",
                                  "invite-only", room=room.name)
                if room.password is not None and not hmac.compare_digest(
                        (password or "").encode("utf-8"), room.password.encode("utf-8")):
                    raise Refused(f"#{room.name} needs a key: /join #{room.name} KEY." if password is None
                                  else f"Wrong key for #{room.name}.", "bad-key", room=room.name)
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
                raise Refused(f"{target.nick} is not in #{room.name}.", "they-are-not-in-room", room.name, target.nick)
            if target.operator and not by.operator:
                raise Refused(f"{target.nick} is a server operator; a room operator cannot kick them.",
                              "not-room-operator", room=room.name)
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
                raise Refused(f"{target.nick} is already in #{room.name}.", "they-are-in-room", room.name,
                              target.nick)
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
                    raise Refused(f"{target.nick} is not in #{room.name}.", "they-are-not-in-room", room.name, target.nick)
                if (setting == "op") == (target in room.operators):
                    raise Refused(f"{target.nick} is {'already' if setting == 'op' else 'not'} an operator "
                                  f"of #{room.name}.")
                (room.operators.add if setting == "op" else room.operators.discard)(target)
                shown = target.nick
            else:
                raise Refused(f"There is no setting {setting!r}; there are {', '.join(ROOM_SETTINGS)}.")
            self._to_room(room, ModeChanged(room.name, by.nick, setting, shown))

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
            raise Refused(f"Only operators of #{room.name} may do that.", "not-room-operator",
                          room=room.name)
        if person.muted:
            raise Refused("You are muted; you cannot run a room.")

    @staticmethod
    def _on_off(value: str) -> bool:
        if value not in ("on", "off"):
            raise Refused(f"Say on or off, not {value!r}.")
        return value == "on"

    # -- talking ----------------------------------------------------------------------

    def say(self, person: Person, text: str, name: str | None = None, echo: bool = True) -> None:
        """A chat line from PERSON to the room NAME, or to their current room; with ECHO false, PERSON is
        not sent it back (IRC clients show their own lines themselves)."""
        self._speak(person, Said, text, name, echo)

    def act(self, person: Person, text: str, name: str | None = None, echo: bool = True) -> None:
        """An action line, '* nick waves', to the room NAME or the current one."""
        self._speak(person, Acted, text, name, echo)

    def _speak(self, person: Person, kind: type, text: str, name: str | None, echo: bool = True) -> None:
        with self.lock:
            if person.muted:
                person.output.send(Error("You are muted; the room does not hear you."))
                return
            room = self._member_room(person, name)
            event = kind(room.name, person.nick, text)
            if self.options.history:
                when = time.time()
                self.said += 1
                room.history.append((self.said, when, event))
                if self.history_file:
                    # On disk before anyone sees it, so whatever was seen survives a crash.
                    self.save_history(when, room.name, PYCHAT.line(event))
            person.last_spoke = time.monotonic()
            self._to_room(room, event, skip=None if echo else person, sender=person)

    def send_private(self, person: Person, nick: str, text: str) -> None:
        """TEXT to NICK alone; PERSON gets a copy, and the away message if there is one."""
        with self.lock:
            target = self._find(nick)
            if target is person:
                raise Refused("That is you.")
            if person.key not in target.ignoring:
                target.output.send(PrivateFrom(person.nick, text))
                target.last_private_from = person.serial
            person.output.send(PrivateTo(target.nick, text))
            if target.away:
                person.output.send(Reply(f"{target.nick} is away: {target.away}"))

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
                raise Refused(problem, "nickname-taken", nick=new_nick)
            if new_nick == person.nick:
                raise Refused(f"You are already {new_nick}.", "same-nickname", nick=new_nick)
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
        """Stop (or start again) showing PERSON NICK's lines; returns NICK as they spell it."""
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
        """Make PERSON a server operator if SECRET is the server's operator password."""
        expected = self.options.op_password
        if not expected:
            raise Refused("This server has no operator password, so no one can be an operator.")
        if not self.check_secret(person, secret, expected, "operator password"):
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

    def rooms_of(self, person: Person) -> list[str]:
        """The rooms PERSON is in, in the order joined."""
        with self.lock:
            return [room.name for room in person.rooms.values()]

    def whois(self, viewer: Person, nick: str) -> Whois | None:
        """What VIEWER may know of NICK: the rooms they may see, away, operator, since when, idle; None if
        no one is called that."""
        if len(nick) > MAX_NICKNAME_LENGTH:
            return None             # no one's, and not worth normalising
        with self.lock:
            person = self.people.get(name_key(unicodedata.normalize("NFKC", nick)))
            if person is None:
                return None
            rooms = tuple((room.name, person in room.operators) for room in person.rooms.values()
                          if self._may_see(viewer, room))
            return Whois(person.nick, rooms, person.away, person.operator, person.signed_in,
                         time.monotonic() - person.last_spoke, person.output.protocol.name)

    def look_up(self, nicks: list[str]) -> list[commands.PersonInfo | None]:
        """Each of NICKS (a few) as a PersonInfo if they are online, else None."""
        keys = [name_key(unicodedata.normalize("NFKC", nick)) for nick in nicks
                if len(nick) <= MAX_NICKNAME_LENGTH]        # longer is no one's, and not worth normalising
        with self.lock:
            found = [self.people.get(key) for key in keys]
            return [commands.PersonInfo(p.nick, None, p.away, p.operator, p.muted, False) if p else None
                    for p in found]

    def counts(self) -> tuple[int, int, int, int]:
        """People signed in, how many are operators, connections still signing in, and rooms with people."""
        with self.lock:
            people = len(self.people)
            return (people, sum(p.operator for p in self.people.values()), len(self.connections) - people,
                    sum(1 for room in self.rooms.values() if room.members))

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

    def _to_room(self, room: Room, event: Any, skip: Person | None = None, sender: Person | None = None) -> None:
        """Queue EVENT to everyone in ROOM (but SKIP, and those ignoring SENDER), rendered once per
        audience. Lock held."""
        if sender is None or sender.key not in self.ignorers:
            for (protocol, tagged), outputs in room.audiences.items():
                if skip is not None and skip.output in outputs:
                    outputs = outputs - {skip.output}     # a set difference: no Python work per member
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
            raise Refused(f"No one called {nick} is online. /online lists who is.", "no-such-person",
                          nick=nick)
        return found

    # -- history on disk ---------------------------------------------------------

    def save_history(self, when: float, room: str, line: str) -> None:
        """Append one line of a room's history to the file; a failing disk turns the file off, not the chat."""
        record = json.dumps({"time": when, "room": room, "line": line}, ensure_ascii=False)
        try:
            self.history_file.write(record + "\n")
        except OSError as problem:      # a full disk must not silence the chat
            log.error("history file: %s; history is kept in memory only from now on", problem)
            self.history_file = None

    def load_history(self, path: str) -> None:
        """Load room history from PATH, skipping damaged lines, and rewrite it compactly."""
        kept: dict[str, collections.deque] = {}
        skipped = 0
        limit = self.options.history or 1
        try:
            with open(path, encoding="utf-8", errors="replace") as file:
                for raw in file:
                    try:
                        record = json.loads(raw)
                        entry = (float(record["time"]), clean_text(str(record["line"])))
                        room_name = str(record["room"])
                    except (ValueError, KeyError, TypeError):
                        skipped += 1
                        continue
                    if name_problem(room_name, "Room") is None:
                        kept.setdefault(room_name, collections.deque(maxlen=limit)).append(entry)
        except FileNotFoundError:
            pass
        if skipped:
            log.warning("history file %s: skipped %d damaged line(s)", path, skipped)
        records = []
        for room_name, entries in list(kept.items())[-MAX_ROOMS:]:
            room = self.room_named(room_name)
            for when, line in entries:
                event = PYCHAT.chat_event(room.name, line)
                if event is not None:
                    self.said += 1
                    room.history.append((self.said, when, event))
            records += [json.dumps({"time": when, "room": room_name, "line": line}, ensure_ascii=False)
                        for when, line in entries]
        # Rewriting leaves no half-written line behind for the next append to glue onto.
        temporary = f"{path}.tmp"
        with open(temporary, "w", encoding="utf-8") as file:
            file.write("".join(record + "\n" for record in records))
        os.replace(temporary, path)
        self.history_file = open(path, "a", encoding="utf-8", buffering=1)
        log.info("history: %d line(s) in %d room(s) from %s", len(records), len(kept), path)

    # -- shutting down -------------------------------------------------------------

    def stop(self) -> None:
        """Tell everyone, close every connection, and wait a little for them to go."""
        self.shutdown()
        if self.irc is not None:
            self.irc.shutdown()
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
        if self.irc is not None:
            self.irc.server_close()
        if self.history_file:
            self.history_file.close()


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


# ---------------------------------------------------------------------------
# The IRC protocol: messages, numerics, capabilities, text, registration
# ---------------------------------------------------------------------------
# The IRC port speaks the client protocol of modern.ircdocs.horse with the
# IRCv3 extensions listed in IRC_CAPABILITIES. Everything in this section is
# pure: it reads and writes IRC text and knows nothing about sockets or rooms.

IRC_SERVER_NAME = "pychat.server"       # the source of the server's own messages
IRC_NETWORK = "pyChat"
IRC_SERVICE_NICK = "pyChat"             # /msg pyChat help: pyChat's slash-commands (a reserved name)
IRC_MAX_BODY_BYTES = 510                # a message without its tags and CR LF (RFC 1459: 512 with CR LF)
IRC_MAX_TAG_BYTES = 8191                # the tag section, its '@' and the space after it included (IRCv3)
IRC_MAX_PARAMS = 15
IRC_MAX_USERNAME = 10
IRC_MAX_REALNAME = 50
# Formatting codes (bold, colour, hex colour, reset, monospace, reverse, italic, strike, underline) are
# the IRC clients' business: they pass between IRC users and are taken out for everyone else.
IRC_FORMATTING = "\x02\x03\x04\x0f\x11\x16\x1d\x1e\x1f"
CTCP = "\x01"


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


def escape_tag_value(value: str) -> str:
    return value.translate(_TAG_ESCAPING)


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
    if len(rest.encode("utf-8")) > IRC_MAX_BODY_BYTES:
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


def format_irc_message(command: str, params: Iterable[str] = (), source: str | None = IRC_SERVER_NAME,
                       tags: dict[str, str] | None = None) -> str:
    """One IRC message as text without CR LF; the last parameter is sent as a trailing one when it
    has to be (spaces, a leading ':', empty), so it may hold any text. CR, LF and NUL never go out."""
    parts = []
    if tags:
        parts.append("@" + format_irc_tags(tags))
    if source:
        parts.append(":" + source)
    parts.append(command)
    params = list(params)
    if params:
        *middle, last = params
        parts += middle
        last = last.translate(_IRC_BREAKS)
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


def irc_text_messages(command: str, target: str, text: str, source: str, tags: dict[str, str] | None = None,
                      wrap: tuple[str, str] = ("", "")) -> list[str]:
    """PRIVMSG or NOTICE of TEXT to TARGET, as as many messages as IRC's line limit needs: a long
    pyChat line reaches an IRC user in pieces, never cut short. WRAP goes around each piece
    (a CTCP ACTION's markers)."""
    head = format_irc_message(command, (target,), source) + " :"
    before, after = wrap
    room = IRC_MAX_BODY_BYTES - len((head + before + after).encode("utf-8"))
    pieces = split_utf8(text.translate(_IRC_BREAKS), room)
    prefix = "@" + format_irc_tags(tags) + " " if tags else ""
    return [f"{prefix}{head}{before}{piece}{after}" for piece in pieces]


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
    "RPL_TRYAGAIN": ("263", "Please wait a while and try again."),
    "RPL_AWAY": ("301", None),
    "RPL_USERHOST": ("302", None),
    "RPL_ISON": ("303", None),
    "RPL_UNAWAY": ("305", "You are no longer marked as being away"),
    "RPL_NOWAWAY": ("306", "You have been marked as being away"),
    "RPL_WHOISUSER": ("311", None),
    "RPL_WHOISSERVER": ("312", None),
    "RPL_WHOISOPERATOR": ("313", "is an IRC operator"),
    "RPL_ENDOFWHO": ("315", "End of WHO list"),
    "RPL_WHOISIDLE": ("317", "seconds idle, signon time"),
    "RPL_ENDOFWHOIS": ("318", "End of /WHOIS list"),
    "RPL_WHOISCHANNELS": ("319", None),
    "RPL_WHOISSPECIAL": ("320", None),
    "RPL_LISTSTART": ("321", "Users  Name"),
    "RPL_LIST": ("322", None),
    "RPL_LISTEND": ("323", "End of /LIST"),
    "RPL_CHANNELMODEIS": ("324", None),
    "RPL_CREATIONTIME": ("329", None),
    "RPL_NOTOPIC": ("331", "No topic is set"),
    "RPL_TOPIC": ("332", None),
    "RPL_TOPICWHOTIME": ("333", None),
    "RPL_INVITING": ("341", None),
    "RPL_INVITELIST": ("346", None),
    "RPL_ENDOFINVITELIST": ("347", "End of channel invite list"),
    "RPL_EXCEPTLIST": ("348", None),
    "RPL_ENDOFEXCEPTLIST": ("349", "End of channel exception list"),
    "RPL_VERSION": ("351", None),
    "RPL_WHOREPLY": ("352", None),
    "RPL_NAMREPLY": ("353", None),
    "RPL_ENDOFNAMES": ("366", "End of /NAMES list"),
    "RPL_BANLIST": ("367", None),
    "RPL_ENDOFBANLIST": ("368", "End of channel ban list"),
    "RPL_ENDOFWHOWAS": ("369", "End of WHOWAS"),
    "RPL_MOTD": ("372", None),
    "RPL_MOTDSTART": ("375", None),
    "RPL_ENDOFMOTD": ("376", "End of /MOTD command."),
    "RPL_YOUREOPER": ("381", "You are now an IRC operator"),
    "RPL_TIME": ("391", None),
    "ERR_NOSUCHNICK": ("401", "No such nick/channel"),
    "ERR_NOSUCHSERVER": ("402", "No such server"),
    "ERR_NOSUCHCHANNEL": ("403", "No such channel"),
    "ERR_CANNOTSENDTOCHAN": ("404", "Cannot send to channel"),
    "ERR_TOOMANYCHANNELS": ("405", "You have joined too many channels"),
    "ERR_WASNOSUCHNICK": ("406", "There was no such nickname"),
    "ERR_NOORIGIN": ("409", "No origin specified"),
    "ERR_INVALIDCAPCMD": ("410", "Invalid CAP command"),
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
    "ERR_YOUREBANNEDCREEP": ("465", "You are banned from this server"),
    "ERR_CHANNELISFULL": ("471", "Cannot join channel (+l)"),
    "ERR_UNKNOWNMODE": ("472", "is unknown mode char to me"),
    "ERR_INVITEONLYCHAN": ("473", "Cannot join channel (+i)"),
    "ERR_BANNEDFROMCHAN": ("474", "Cannot join channel (+b)"),
    "ERR_BADCHANNELKEY": ("475", "Cannot join channel (+k)"),
    "ERR_BADCHANMASK": ("476", "Bad Channel Mask"),
    "ERR_NOPRIVILEGES": ("481", "Permission Denied- You're not an IRC operator"),
    "ERR_CHANOPRIVSNEEDED": ("482", "You're not channel operator"),
    "ERR_UMODEUNKNOWNFLAG": ("501", "Unknown MODE flag"),
    "ERR_USERSDONTMATCH": ("502", "Can't change mode for other users"),
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
# is honoured everywhere: server-time on every message, echo-message for every PRIVMSG/NOTICE.
IRC_CAPABILITIES: dict[str, str | None] = {
    "away-notify": None,
    "echo-message": None,
    "multi-prefix": None,
    "server-time": None,
}


class IrcCapabilities:
    """One connection's capability negotiation (CAP LS, LIST, REQ, END) and what it enabled.

    While `negotiating`, registration waits, as IRCv3 asks: a client that sent
    CAP LS or CAP REQ before registering is registered only after CAP END.
    """

    def __init__(self, offered: dict[str, str | None]) -> None:
        self.offered = offered
        self.enabled: set[str] = set()
        self.version = 0
        self.negotiating = False

    def handle(self, nick: str, params: list[str], registered: bool) -> list[str]:
        """The replies to CAP PARAMS from the client called NICK ('*' until it has one)."""
        if not params:
            return [irc_numeric("ERR_NEEDMOREPARAMS", nick, "CAP")]
        subcommand = params[0].upper()
        if subcommand == "LS":
            if len(params) > 1 and params[1].isdigit():
                self.version = max(self.version, int(params[1]))
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
                    self.enabled.discard(name[1:])
                else:
                    self.enabled.add(name)
            return [format_irc_message("CAP", (nick, "ACK", " ".join(wanted)))]
        if subcommand == "END":
            self.negotiating = False
            return []
        return [irc_numeric("ERR_INVALIDCAPCMD", nick, params[0])]

    def _listing(self, nick: str, subcommand: str, names: list[str]) -> list[str]:
        """CAP LS or LIST replies, over several lines marked with '*' when they do not fit in one."""
        head = len(format_irc_message("CAP", (nick, subcommand, "*", ":")).encode("utf-8"))
        lines: list[list[str]] = [[]]
        for name in names:
            if lines[-1] and head + len(" ".join(lines[-1] + [name]).encode("utf-8")) > IRC_MAX_BODY_BYTES:
                lines.append([])
            lines[-1].append(name)
        continued = ["*"] if self.version >= 302 else []
        return [format_irc_message("CAP", (nick, subcommand, *(continued if n < len(lines) - 1 else []),
                                           " ".join(line)))
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
    moment = datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def irc_username(wanted: str) -> str:
    """The user name shown in NICK!USER@HOST: what the client gave, letters, digits and '_.-' only,
    short, with the '~' that says no ident server vouched for it."""
    kept = "".join(ch for ch in wanted if ch.isascii() and (ch.isalnum() or ch in "_.-"))
    return "~" + (kept[:IRC_MAX_USERNAME - 1] or "user")


class IrcRegistration:
    """What an IRC client says about itself before it is in the chat: PASS, NICK, USER and CAP, in
    any order. handle() returns the replies; `ready` is true once there is enough to sign in with.

    Only the name's own rules are checked here (432); whether it is taken (433)
    is the server's to say when the person signs in.
    """

    def __init__(self, capabilities: IrcCapabilities) -> None:
        self.capabilities = capabilities
        self.password: str | None = None
        self.nick: str | None = None
        self.username: str | None = None
        self.realname = ""

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
            if len(params) < 4 or not params[0]:
                return [irc_numeric("ERR_NEEDMOREPARAMS", self.target, "USER")]
            if self.username is not None:
                return [irc_numeric("ERR_ALREADYREGISTERED", self.target)]
            self.username = irc_username(params[0])
            self.realname = clean_text(params[3])[:IRC_MAX_REALNAME]
            return []
        if command == "PING":
            return [irc_pong(params)]
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


def irc_pong(params: list[str]) -> str:
    if not params or not params[0]:
        return irc_numeric("ERR_NOORIGIN", "*")
    return format_irc_message("PONG", (IRC_SERVER_NAME, params[0]))


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

IRC_USER_HOST = "~user@pychat"      # everyone is NICK!~user@pychat: pyChat never shows an address
IRC_SERVICE_SOURCE = f"{IRC_SERVICE_NICK}!{IRC_SERVICE_NICK}@{IRC_SERVER_NAME}"
IRC_SERVICE_KEY = name_key(IRC_SERVICE_NICK)
IRC_MAX_REASON = 390                # the longest topic, away message, kick or quit reason taken from IRC
IRC_USER_MODES = "o"                # o: an operator of the server (pyChat's /op, IRC's OPER)
IRC_CHANNEL_MODES = "iknot"         # i invite-only, k key, n only members talk (always), o room operator,
                                    # t only operators set the topic
# Capabilities that change the bytes a connection is sent. They are fixed when the person
# signs in, since rooms group their audiences by them (see IrcProtocol).
IRC_RENDERING_CAPABILITIES = frozenset({"away-notify", "echo-message", "server-time"})


def irc_reason(text: str) -> str:
    """A topic, away message or reason from IRC, as the core keeps it: plain text, bounded."""
    return strip_irc_formatting(text)[:IRC_MAX_REASON]


def irc_source(nick: str) -> str:
    return f"{nick}!{IRC_USER_HOST}"


def irc_isupport_tokens(options: argparse.Namespace) -> list[str]:
    """What 005 says about this server: only what is true of it."""
    # CASEMAPPING: names compare as pyChat compares them, ignoring case (ASCII's and more) and look-alikes.
    tokens = [f"AWAYLEN={IRC_MAX_REASON}", "CASEMAPPING=ascii", "CHANMODES=,k,,int",
              f"CHANNELLEN={MAX_NICKNAME_LENGTH + 1}", "CHANTYPES=#", f"KICKLEN={IRC_MAX_REASON}",
              f"NETWORK={IRC_NETWORK}", f"NICKLEN={MAX_NICKNAME_LENGTH}", "PREFIX=(o)@", "SAFELIST",
              "TARGMAX=JOIN:,KICK:1,NAMES:1,NOTICE:4,PART:,PRIVMSG:4,WHOIS:1", f"TOPICLEN={IRC_MAX_REASON}",
              "UTF8ONLY"]
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
    lists_members = True            # Entered carries everyone in the room, for NAMES

    def __init__(self, connection: IrcConnection, capabilities: frozenset[str] = frozenset()) -> None:
        self.connection = connection
        self.capabilities = capabilities & IRC_RENDERING_CAPABILITIES
        self.server_time = "server-time" in capabilities

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IrcProtocol) and other.capabilities == self.capabilities

    def __hash__(self) -> int:
        return hash((IrcProtocol, self.capabilities))

    @property
    def me(self) -> str:
        """The receiver's nickname: events sent to one person alone are sent under the server's lock."""
        return self.connection.nick

    def encode(self, event: Any, tagged: bool = False) -> bytes:
        """EVENT as IRC messages (b"" when IRC has nothing to say of it); TAGGED does not matter to IRC,
        whose every channel message names its channel."""
        lines = self.RENDERERS.get(type(event), IrcProtocol.in_pychats_words)(self, event)
        if not lines:
            return b""
        if self.server_time:
            stamp = f"@time={irc_server_time(event.when if isinstance(event, Replayed) else time.time())} "
            return "".join(f"{stamp}{line}\r\n" for line in lines).encode("utf-8")
        return "".join(f"{line}\r\n" for line in lines).encode("utf-8")

    # -- room events: nothing of the receiver --------------------------------------------

    def said(self, event: Said, prefix: str = "") -> list[str]:
        return irc_text_messages("PRIVMSG", f"#{event.room}", prefix + event.text, irc_source(event.nick))

    def acted(self, event: Acted, prefix: str = "") -> list[str]:
        return irc_text_messages("PRIVMSG", f"#{event.room}", prefix + event.text, irc_source(event.nick),
                                 wrap=(CTCP + "ACTION ", CTCP))

    def joined(self, event: Joined) -> list[str]:
        return [format_irc_message("JOIN", (f"#{event.room}",), irc_source(event.nick))]

    def left(self, event: Left) -> list[str]:
        return [format_irc_message("PART", (f"#{event.room}",), irc_source(event.nick))]

    def kicked(self, event: Kicked) -> list[str]:
        return [format_irc_message("KICK", (f"#{event.room}", event.nick, event.reason or event.by),
                                   irc_source(event.by))]

    def topic_changed(self, event: TopicChanged) -> list[str]:
        return [format_irc_message("TOPIC", (f"#{event.room}", event.topic), irc_source(event.nick))]

    def mode_changed(self, event: ModeChanged) -> list[str]:
        change = {("key", "off"): ("-k", "*"), ("key", "on"): ("+k", "*"), ("invite-only", "on"): ("+i",),
                  ("invite-only", "off"): ("-i",), ("topic", "operators"): ("+t",),
                  ("topic", "everyone"): ("-t",)}.get((event.setting, event.value))
        if change is None:      # op and deop name the person
            change = ("+o" if event.setting == "op" else "-o", event.value)
        return [format_irc_message("MODE", (f"#{event.room}", *change), irc_source(event.nick))]

    # -- about a person, told once to each who shares a room: nothing of the receiver either ---

    def quit(self, event: Quit) -> list[str]:
        return [format_irc_message("QUIT", (f"Quit: {event.reason}" if event.reason else "Quit",),
                                   irc_source(event.nick))]

    def renamed(self, event: Renamed) -> list[str]:
        return [format_irc_message("NICK", (event.new,), irc_source(event.old))]

    def away_changed(self, event: AwayChanged) -> list[str]:
        if "away-notify" not in self.capabilities:
            return []
        return [format_irc_message("AWAY", (event.reason,) if event.reason else (), irc_source(event.nick))]

    # -- to one person: these name the receiver --------------------------------------------------

    def entered(self, event: Entered) -> list[str]:
        channel = f"#{event.room}"
        names = [("@" if operator else "") + nick for nick, operator in event.members]
        return [format_irc_message("JOIN", (channel,), irc_source(self.me)),
                *irc_names_replies(self.me, channel, names)]

    def topic(self, event: Topic) -> list[str]:
        return [irc_numeric("RPL_TOPIC", self.me, f"#{event.room}", text=event.topic)]

    def replayed(self, event: Replayed) -> list[str]:
        prefix = "" if self.server_time else f"[history {_utc(event.when)}] "
        return self.RENDERERS[type(event.line)](self, event.line, prefix)

    def history_end(self, event: HistoryEnd) -> list[str]:
        return [format_irc_message("NOTICE", (f"#{event.room}", f"End of #{event.room} history."))]

    def you_left(self, event: YouLeft) -> list[str]:
        return [format_irc_message("PART", (f"#{event.room}",), irc_source(self.me))]

    def you_were_kicked(self, event: YouWereKicked) -> list[str]:
        return [format_irc_message("KICK", (f"#{event.room}", self.me, event.reason or event.by),
                                   irc_source(event.by))]

    def invited(self, event: Invited) -> list[str]:
        return [format_irc_message("INVITE", (self.me, f"#{event.room}"), irc_source(event.by))]

    def private_from(self, event: PrivateFrom) -> list[str]:
        return irc_text_messages("PRIVMSG", self.me, event.text, irc_source(event.nick))

    def private_to(self, event: PrivateTo) -> list[str]:
        if "echo-message" not in self.capabilities:
            return []
        return irc_text_messages("PRIVMSG", event.nick, event.text, irc_source(self.me))

    def notice(self, event: Notice) -> list[str]:
        return irc_text_messages("NOTICE", self.me, event.text, IRC_SERVER_NAME)

    def reply(self, event: Reply | Error) -> list[str]:
        """Replies and errors come from the commands, so from the service that runs them."""
        return irc_text_messages("NOTICE", self.me, event.text, IRC_SERVICE_SOURCE)

    def welcome(self, event: Welcome) -> list[str]:
        return self.connection.welcome_burst(event.nick)

    def closing(self, event: Bye | ShuttingDown | DisconnectedBy | Farewell) -> list[str]:
        why = {Bye: lambda e: "Quit", ShuttingDown: lambda e: "Server shutting down",
               DisconnectedBy: lambda e: f"Disconnected by {e.by}{_because(e.reason)}",
               Farewell: lambda e: e.reason[:1].upper() + e.reason[1:]}[type(event)](event)
        return [format_irc_message("ERROR", (f"Closing link: {self.me} ({why})",), source=None)]

    def in_pychats_words(self, event: Any) -> list[str]:
        """An event IRC has no words of its own for: pyChat's line for it, as a notice from the server."""
        return irc_text_messages("NOTICE", self.me, PYCHAT.line(event), IRC_SERVER_NAME)

    def nothing(self, event: Any) -> list[str]:
        """Events IRC has no words for: the pyChat prompts, and the current room, which IRC does not have."""
        return []

    RENDERERS: dict[type, Callable[..., list[str]]] = {
        Said: said, Acted: acted, Joined: joined, Left: left, Kicked: kicked, TopicChanged: topic_changed,
        ModeChanged: mode_changed, Quit: quit, Renamed: renamed, AwayChanged: away_changed,
        Entered: entered, Topic: topic, Replayed: replayed, HistoryEnd: history_end, YouLeft: you_left,
        YouWereKicked: you_were_kicked, Invited: invited, PrivateFrom: private_from, PrivateTo: private_to,
        Notice: notice, Reply: reply, Error: reply, Welcome: welcome, Bye: closing, ShuttingDown: closing,
        DisconnectedBy: closing, Farewell: closing, Prompt: nothing, NowTalking: nothing,
    }


def irc_names_replies(me: str, channel: str, names: list[str]) -> list[str]:
    """353 (as many as the names need) and 366 for CHANNEL."""
    room = IRC_MAX_BODY_BYTES - len(irc_numeric("RPL_NAMREPLY", me, "=", channel, text="").encode("utf-8"))
    lines, line, size = [], [], 0
    for name in names:
        width = len(name.encode("utf-8")) + bool(line)      # and the space before it
        if line and size + width > room:
            lines.append(line)
            line, size, width = [], 0, width - 1
        line.append(name)
        size += width
    if line:
        lines.append(line)
    return [*(irc_numeric("RPL_NAMREPLY", me, "=", channel, text=" ".join(line)) for line in lines),
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
    "try-again": ("RPL_TRYAGAIN", "command"),
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

    def setup(self) -> None:
        super().setup()
        self.lines = LineReader(IRC_MAX_TAG_BYTES + IRC_MAX_BODY_BYTES)
        self.capabilities = IrcCapabilities(IRC_CAPABILITIES)
        self.output.protocol = IrcProtocol(self)
        self.signing_in_as: str | None = None
        self.realname = ""
        self.ping_clock = IrcPingClock(self.server.options.irc_ping, self.connected)
        self.last_active = self.connected       # the last message other than PING and PONG

    @property
    def nick(self) -> str:
        """Who numerics are addressed to: the person's nickname, or '*' before there is one."""
        return self.person.nick if self.person else self.signing_in_as or "*"

    def handle(self) -> None:
        log.info("IRC connection from %s:%s", *self.client_address[:2])
        try:
            if self.server.tls is not None:
                self.start_tls()
            self.send_irc(format_irc_message("NOTICE", ("*", f"*** {self.server.greeting()}")))
            messages = self.read_messages()
            self.register(messages)
            self.bucket = TokenBucket(self.server.options.rate, self.server.options.burst)  # a full burst to start
            for message in messages:
                self.on_message(message)
                if self.output.reason is not None:      # QUIT, or ended from elsewhere
                    return
        except Disconnect as why:
            self.output.end(why.reason, why.farewell)

    @staticmethod
    def refusal(reason: str) -> bytes:
        return (format_irc_message("ERROR", (f"Closing link: {reason}",), source=None) + "\r\n").encode("utf-8")

    # -- input ----------------------------------------------------------------

    def read_messages(self) -> Iterator[IrcMessage]:
        """The messages this client sends, as they come; a line that is no message is answered here."""
        for line in self.read_lines():
            self.ping_clock.heard(self.last_heard)
            if line is None:
                self.send_irc(irc_numeric("ERR_INPUTTOOLONG", self.nick))
                continue
            try:
                message = parse_irc_message(line)
            except IrcLineError as problem:
                params = ("*",) if problem.numeric == "ERR_UNKNOWNCOMMAND" else ()
                self.send_irc(irc_numeric(problem.numeric, self.nick, *params, text=str(problem)))
                continue
            if message is None:
                continue
            if message.command not in ("PING", "PONG"):
                self.last_active = self.last_heard
            yield message

    def wait_for_input(self, timeout: float) -> None:
        """Wait for input; once signed in, PING a quiet client and let go of one that does not answer.

        --idle-timeout counts from the last message other than PING and PONG:
        answering pings is not saying anything.
        """
        if not self.person:
            super().wait_for_input(timeout)
            return
        while True:
            if self.server.stopping:
                raise Disconnect("server shutting down", ShuttingDown())
            deadline = self.ping_clock.deadline()
            if timeout:
                deadline = min(deadline, self.last_active + timeout)
            if self.input_waiter.wait(max(0.0, deadline - time.monotonic())):
                return
            if timeout and time.monotonic() >= self.last_active + timeout:
                raise Disconnect("timed out", Farewell(f"nothing said for {timeout:g} s"))
            due = self.ping_clock.due(time.monotonic())
            if due == "ping":
                self.send_irc(format_irc_message("PING", (IRC_SERVER_NAME,)))
            elif due == "timeout":
                why = f"Ping timeout: {time.monotonic() - self.ping_clock.last_heard:.0f} seconds"
                raise Disconnect(why, Farewell(why))

    # -- registration ---------------------------------------------------------------

    def register(self, messages: Iterator[IrcMessage]) -> None:
        """Read PASS, NICK, USER and CAP until the client can sign in; the core then welcomes it."""
        registration = IrcRegistration(self.capabilities)
        for message in messages:
            if message.command == "QUIT":
                raise Disconnect("quit before signing in", Bye())
            for reply in registration.handle(message):
                self.send_irc(reply)
            if not registration.ready:
                continue
            password = self.server.options.password
            if password and not self.server.check_secret(self, registration.password or "", password,
                                                         "server password"):
                self.send_irc(irc_numeric("ERR_PASSWDMISMATCH", registration.target))
                raise Disconnect("wrong password", Farewell("wrong password"))
            self.realname = registration.realname
            self.signing_in_as = registration.nick
            self.output.protocol = IrcProtocol(self, frozenset(self.capabilities.enabled))
            problem = self.server.sign_in(self, registration.nick)
            if problem is None:
                return
            self.signing_in_as = None
            self.send_irc(irc_numeric("ERR_NICKNAMEINUSE", "*", registration.nick, text=problem))
            registration.nick = None

    def welcome_burst(self, nick: str) -> list[str]:
        """001 to 005 and the message of the day: what a client waits for before it does anything."""
        version = f"pyChat-{VERSION}"
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.server.started))
        tokens = irc_isupport_tokens(self.server.options)
        return [irc_numeric("RPL_WELCOME", nick,
                            text=f"Welcome to the {IRC_NETWORK} IRC network, {irc_source(nick)}"),
                irc_numeric("RPL_YOURHOST", nick,
                            text=f"Your host is {IRC_SERVER_NAME}, running version {version}"),
                irc_numeric("RPL_CREATED", nick, text=f"This server was created {started}"),
                # The modes that take a parameter: k (the key) and o (who).
                irc_numeric("RPL_MYINFO", nick, IRC_SERVER_NAME, version, IRC_USER_MODES, IRC_CHANNEL_MODES,
                            "ko"),
                *(irc_numeric("RPL_ISUPPORT", nick, *tokens[n:n + 12]) for n in range(0, len(tokens), 12)),
                *self.motd(nick)]

    def motd(self, nick: str) -> list[str]:
        flood = (f"Flood limit: {self.server.options.burst} lines at once, then {self.server.options.rate:g} "
                 f"a second." if self.server.options.rate else "")
        lines = [f"pyChat {VERSION}, where IRC and pyChat clients meet. {flood}".strip(),
                 "Rooms are channels: everyone starts in #lobby; /join #dev makes or joins #dev.",
                 f"pyChat's own commands: /msg {IRC_SERVICE_NICK} help"]
        return [irc_numeric("RPL_MOTDSTART", nick, text=f"- {IRC_SERVER_NAME} Message of the day - "),
                *(irc_numeric("RPL_MOTD", nick, text=f"- {line}") for line in lines),
                irc_numeric("RPL_ENDOFMOTD", nick)]

    # -- commands -----------------------------------------------------------------

    def on_message(self, message: IrcMessage) -> None:
        """One message from a signed-in client: where IRC becomes calls on the core."""
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
        try:
            command.handler(self, *message.params[:command.takes])
        except Refused as refusal:
            self.refused(refusal, message.command)

    def refused(self, refusal: Refused, command: str) -> None:
        """The core said no: the numeric for why, with the core's own words; a notice when IRC has none."""
        numeric, names = IRC_REFUSALS.get(refusal.kind, (None, None))
        if numeric is None:
            self.send_irc(format_irc_message("NOTICE", (self.nick, str(refusal)), IRC_SERVICE_SOURCE))
            return
        room = f"#{refusal.room}" if refusal.room else "*"
        params = {"nick": (refusal.nick or "*",), "room": (room,), "both": (refusal.nick or "*", room),
                  "command": (command,)}[names]
        self.send_irc(irc_numeric(numeric, self.nick, *params, text=str(refusal)))

    def run_command(self, line: str) -> None:
        """A pyChat slash-command, as if typed in pyChat's client; its replies come from the service."""
        self.server.commands.run(Context(self.server, self.person), clean_text(line))

    def irc_privmsg(self, targets: str = "", text: str = "", notice: bool = False) -> None:
        """PRIVMSG (and NOTICE) to channels, people and the service; NOTICE is never answered with an error."""
        if not targets:
            if not notice:
                self.send_irc(irc_numeric("ERR_NORECIPIENT", self.nick, text="No recipient given (PRIVMSG)"))
            return
        if not text:
            if not notice:
                self.send_irc(irc_numeric("ERR_NOTEXTTOSEND", self.nick))
            return
        for target in targets.split(",")[:4]:
            try:
                self.deliver(target, text, notice)
            except Refused as refusal:
                if not notice:
                    # Not in the channel: IRC's word is that you cannot send to it.
                    kind = "cannot-send" if refusal.kind == "not-in-room" else refusal.kind
                    self.refused(Refused(str(refusal), kind, refusal.room, refusal.nick), "PRIVMSG")

    def deliver(self, target: str, text: str, notice: bool) -> None:
        person = self.person
        if len(target) > MAX_NICKNAME_LENGTH + 1:       # no name is that long: not worth normalising
            raise Refused(f"No one is called {target[:30]}...", "no-such-person", nick=target[:30])
        ctcp = parse_ctcp(text)
        if not target.startswith("#") and name_key(target) == IRC_SERVICE_KEY:
            if ctcp is not None:
                self.answer_ctcp(*ctcp)
            elif not notice:
                self.run_command(text if text.startswith("/") else f"/{text}")
            return
        if ctcp is not None and ctcp[0] != "ACTION":
            self.send_irc(format_irc_message("NOTICE", (self.nick, f"pyChat passes on no CTCP {ctcp[0]}; "
                                                         "only ACTION (/me)."), IRC_SERVICE_SOURCE))
            return
        words = clean_irc_text(ctcp[1] if ctcp else text)
        if not words:
            return
        echo = "echo-message" in self.capabilities.enabled
        if target.startswith("#"):
            (self.server.act if ctcp else self.server.say)(person, words, target, echo=echo)
        elif ctcp:
            self.server.send_private(person, target, f"* {person.nick} {words}")
        else:
            self.server.send_private(person, target, words)

    def answer_ctcp(self, command: str, argument: str) -> None:
        answers = {"VERSION": f"pyChat {VERSION}", "PING": argument,
                   "TIME": time.strftime("%a %b %d %H:%M:%S %Y UTC", time.gmtime())}
        if command in answers:
            self.send_irc(format_irc_message("NOTICE", (self.nick, f"{CTCP}{command} {answers[command]}{CTCP}"),
                                             IRC_SERVICE_SOURCE))

    def irc_notice(self, targets: str = "", text: str = "") -> None:
        self.irc_privmsg(targets, text, notice=True)

    def irc_join(self, channels: str, keys: str = "") -> None:
        if channels == "0":
            self.leave_every_room()
            return
        for channel, key in itertools.zip_longest(channels.split(","), keys.split(",") if keys else ()):
            if not channel.startswith("#"):
                self.send_irc(irc_numeric("ERR_NOSUCHCHANNEL", self.nick, channel,
                                          text="Channel names start with #"))
                continue
            try:
                self.server.join(self.person, channel, key or None)
            except Refused as refusal:
                if refusal.kind != "already-in-room":     # IRC says nothing to a JOIN of a channel you are in
                    self.refused(refusal, "JOIN")

    def leave_every_room(self) -> None:
        for room in self.server.rooms_of(self.person):
            try:
                self.server.leave(self.person, room)
            except Refused:
                pass            # the lobby, when it is the last: no one is in no room

    def irc_part(self, channels: str, reason: str = "") -> None:
        for channel in channels.split(","):
            try:
                self.server.leave(self.person, channel)
            except Refused as refusal:
                self.refused(refusal, "PART")

    def irc_topic(self, channel: str, topic: str | None = None) -> None:
        if topic is None:
            settings = self.server.room_settings(self.person, channel)
            if settings.topic:
                self.send_irc(irc_numeric("RPL_TOPIC", self.nick, f"#{settings.name}", text=settings.topic))
            else:
                self.send_irc(irc_numeric("RPL_NOTOPIC", self.nick, f"#{settings.name}"))
        else:
            self.server.set_topic(self.person, irc_reason(topic), channel)

    def irc_names(self, channels: str = "") -> None:
        for channel in channels.split(",")[:1] if channels else ():
            try:
                room, people = self.server.room_members(self.person, channel)
            except Refused as refusal:
                if refusal.kind == "try-again":
                    raise
                self.send_irc(irc_numeric("RPL_ENDOFNAMES", self.nick, channel))
                continue
            for line in irc_names_replies(self.nick, f"#{room}", [("@" if p.room_operator else "") + p.nick
                                                            for p in people]):
                self.send_irc(line)
        if not channels:
            self.send_irc(irc_numeric("RPL_ENDOFNAMES", self.nick, "*"))

    def irc_list(self, *ignored: str) -> None:
        rooms = self.server.room_list(self.person)
        self.send_irc(irc_numeric("RPL_LISTSTART", self.nick, "Channel"))
        for room in rooms:
            self.send_irc(irc_numeric("RPL_LIST", self.nick, f"#{room.name}", str(room.people),
                                      text=room.topic or ""))
        self.send_irc(irc_numeric("RPL_LISTEND", self.nick))

    def irc_who(self, mask: str = "*", *ignored: str) -> None:
        if mask.startswith("#"):
            try:
                room, people = self.server.room_members(self.person, mask)
            except Refused as refusal:
                if refusal.kind == "try-again":
                    raise
                people, room = [], None
            for p in people:
                self.send_irc(self.who_reply(f"#{room}", p.nick, p.away, p.operator, p.room_operator))
        else:
            found = self.server.whois(self.person, mask) if mask != "*" else None
            if found is not None:
                channel = f"#{found.rooms[0][0]}" if found.rooms else "*"
                self.send_irc(self.who_reply(channel, found.nick, found.away, found.operator, False))
        self.send_irc(irc_numeric("RPL_ENDOFWHO", self.nick, mask))

    def who_reply(self, channel: str, nick: str, away: str | None, operator: bool, room_operator: bool) -> str:
        """352: H(ere) or G(one), * for a server operator, @ for a room operator; hops 0, the nick as real name."""
        flags = ("G" if away else "H") + ("*" if operator else "") + ("@" if room_operator else "")
        return irc_numeric("RPL_WHOREPLY", self.nick, channel, "~user", "pychat", IRC_SERVER_NAME, nick, flags,
                           text=f"0 {nick}")

    def irc_whois(self, *targets: str) -> None:
        nick = targets[-1].split(",")[0]
        found = self.server.whois(self.person, nick)
        if found is None:
            self.send_irc(irc_numeric("ERR_NOSUCHNICK", self.nick, nick))
            return
        me, them = self.nick, found.nick
        lines = [irc_numeric("RPL_WHOISUSER", me, them, "~user", "pychat", "*",
                             text=f"connected with {found.protocol}")]
        if found.rooms:
            rooms = " ".join(("@" if operator else "") + f"#{room}" for room, operator in found.rooms)
            lines.append(irc_numeric("RPL_WHOISCHANNELS", me, them, text=rooms))
        lines.append(irc_numeric("RPL_WHOISSERVER", me, them, IRC_SERVER_NAME, text=f"pyChat {VERSION}"))
        if found.away:
            lines.append(irc_numeric("RPL_AWAY", me, them, text=found.away))
        if found.operator:
            lines.append(irc_numeric("RPL_WHOISOPERATOR", me, them))
        lines += [irc_numeric("RPL_WHOISIDLE", me, them, str(int(found.idle)), str(int(found.signed_in))),
                  irc_numeric("RPL_ENDOFWHOIS", me, them)]
        for line in lines:
            self.send_irc(line)

    def irc_whowas(self, nick: str, *ignored: str) -> None:
        self.send_irc(irc_numeric("ERR_WASNOSUCHNICK", self.nick, nick))
        self.send_irc(irc_numeric("RPL_ENDOFWHOWAS", self.nick, nick))

    def irc_away(self, reason: str = "") -> None:
        reason = irc_reason(reason)
        try:
            self.server.set_away(self.person, reason or None)
        except Refused:
            pass            # back when not away: IRC says 305 all the same
        self.send_irc(irc_numeric("RPL_NOWAWAY" if reason else "RPL_UNAWAY", self.nick))

    def irc_nick(self, wanted: str) -> None:
        problem = irc_nickname_problem(wanted)
        if problem:
            self.send_irc(irc_numeric("ERR_ERRONEUSNICKNAME", self.nick, wanted, text=problem))
            return
        try:
            self.server.rename(self.person, wanted)
        except Refused as refusal:
            if refusal.kind == "nickname-taken":
                self.send_irc(irc_numeric("ERR_NICKNAMEINUSE", self.nick, wanted, text=str(refusal)))
            elif refusal.kind != "same-nickname":       # IRC says nothing to a NICK of the name you have
                raise

    def irc_kick(self, channel: str, nicks: str, reason: str = "") -> None:
        nick = nicks.split(",")[0]
        self.server.kick(self.person, nick, irc_reason(reason) or None, channel)

    def irc_invite(self, nick: str, channel: str) -> None:
        invited = self.server.invite(self.person, nick, channel)
        self.send_irc(irc_numeric("RPL_INVITING", self.nick, invited, channel))

    def irc_mode(self, target: str, changes: str = "", *arguments: str) -> None:
        if not target.startswith("#"):
            self.user_mode(target, changes)
        elif not changes:
            room = self.server.room_settings(self.person, target)
            modes = "+n" + "i" * room.invite_only + "k" * room.has_key + "t" * (not room.topic_by_everyone)
            self.send_irc(irc_numeric("RPL_CHANNELMODEIS", self.nick, f"#{room.name}", modes,
                                      *(["*"] if room.has_key else [])))     # the key itself is not shown
        elif changes.lstrip("+-") in ("b", "e", "I"):
            end = {"b": "RPL_ENDOFBANLIST", "e": "RPL_ENDOFEXCEPTLIST", "I": "RPL_ENDOFINVITELIST"}
            self.send_irc(irc_numeric(end[changes.lstrip("+-")], self.nick, target))
        else:
            self.channel_modes(target, changes, list(arguments))

    def channel_modes(self, channel: str, changes: str, arguments: list[str]) -> None:
        """+k KEY, -k, +i, -i, +t, -t, +o NICK, -o NICK, in any number, as one MODE message gives them."""
        adding = True
        for letter in changes:
            if letter in "+-":
                adding = letter == "+"
                continue
            if letter in "ko" and not (letter == "k" and not adding) and not arguments:
                self.send_irc(irc_numeric("ERR_NEEDMOREPARAMS", self.nick, "MODE"))
                return
            argument = arguments.pop(0) if letter == "o" or (letter == "k" and (adding or arguments)) else None
            setting = {"k": ("key", argument if adding else "off"),
                       "i": ("invite-only", "on" if adding else "off"),
                       "t": ("topic", "operators" if adding else "everyone"),
                       "o": ("op" if adding else "deop", argument)}.get(letter)
            if letter == "n":
                continue        # every room hears only its members: +n always holds
            if setting is None:
                self.send_irc(irc_numeric("ERR_UNKNOWNMODE", self.nick, letter))
                continue
            try:
                self.server.set_mode(self.person, *setting, channel)
            except Refused as refusal:
                self.refused(refusal, "MODE")

    def user_mode(self, target: str, changes: str) -> None:
        if name_key(target) != self.person.key:
            self.send_irc(irc_numeric("ERR_USERSDONTMATCH", self.nick))
        elif changes.strip("+-"):
            self.send_irc(irc_numeric("ERR_UMODEUNKNOWNFLAG", self.nick,
                                      text="Unknown MODE flag: pyChat has no user modes to set; "
                                           f"/msg {IRC_SERVICE_NICK} op SECRET makes you an operator"))
        else:
            self.send_irc(irc_numeric("RPL_UMODEIS", self.nick, "+o" if self.person.operator else "+"))

    def irc_oper(self, name: str, secret: str) -> None:
        try:
            self.server.become_operator(self.person, secret)
        except Refused as refusal:
            self.send_irc(irc_numeric("ERR_PASSWDMISMATCH", self.nick, text=str(refusal)))
            return
        self.send_irc(irc_numeric("RPL_YOUREOPER", self.nick))

    def irc_ison(self, *nicks: str) -> None:
        wanted = " ".join(nicks).split()[:50]
        found = self.server.look_up(wanted)
        self.send_irc(irc_numeric("RPL_ISON", self.nick, text=" ".join(p.nick for p in found if p)))

    def irc_userhost(self, *nicks: str) -> None:
        found = [p for p in self.server.look_up(list(nicks[:5])) if p]
        replies = [f"{p.nick}{'*' if p.operator else ''}={'-' if p.away else '+'}{IRC_USER_HOST}" for p in found]
        self.send_irc(irc_numeric("RPL_USERHOST", self.nick, text=" ".join(replies)))

    def irc_lusers(self, *ignored: str) -> None:
        people, operators, signing_in, rooms = self.server.counts()
        me = self.nick
        for line in (irc_numeric("RPL_LUSERCLIENT", me,
                                 text=f"There are {people} users and 0 invisible on 1 servers"),
                     irc_numeric("RPL_LUSEROP", me, str(operators)),
                     irc_numeric("RPL_LUSERUNKNOWN", me, str(signing_in)),
                     irc_numeric("RPL_LUSERCHANNELS", me, str(rooms)),
                     irc_numeric("RPL_LUSERME", me, text=f"I have {people + signing_in} clients and 0 servers")):
            self.send_irc(line)

    def irc_motd(self, *ignored: str) -> None:
        for line in self.motd(self.nick):
            self.send_irc(line)

    def irc_version(self, *ignored: str) -> None:
        self.send_irc(irc_numeric("RPL_VERSION", self.nick, f"pyChat-{VERSION}", IRC_SERVER_NAME,
                                  text="an IRC front door to pyChat"))

    def irc_time(self, *ignored: str) -> None:
        self.send_irc(irc_numeric("RPL_TIME", self.nick, IRC_SERVER_NAME,
                                  text=time.strftime("%A %B %d %Y -- %H:%M:%S UTC", time.gmtime())))

    def irc_ping(self, token: str = "") -> None:
        self.send_irc(irc_pong([token]))

    def irc_pong(self, *ignored: str) -> None:
        pass                    # what counts is that something came: read_messages told the ping clock

    def irc_cap(self, *params: str) -> None:
        changes = [name.lstrip("-") for name in (params[1] if len(params) > 1 else "").split()]
        if params and params[0].upper() == "REQ" and IRC_RENDERING_CAPABILITIES & set(changes):
            # They shape the bytes of every line to this connection, and are fixed once it has signed in.
            self.send_irc(format_irc_message("CAP", (self.nick, "NAK", params[1])))
            return
        for reply in self.capabilities.handle(self.nick, list(params), registered=True):
            self.send_irc(reply)

    def irc_quit(self, message: str = "") -> None:
        self.server.quit(self.person, irc_reason(message) or None)

    def irc_registered_already(self, *ignored: str) -> None:
        self.send_irc(irc_numeric("ERR_ALREADYREGISTERED", self.nick))

    # Each command's handler, and how many parameters it cannot do without.
    COMMANDS: dict[str, IrcCommand] = {name: irc_command(handler, needs) for name, handler, needs in (
        ("PRIVMSG", irc_privmsg, 0), ("NOTICE", irc_notice, 0), ("JOIN", irc_join, 1), ("PART", irc_part, 1),
        ("TOPIC", irc_topic, 1), ("NAMES", irc_names, 0), ("LIST", irc_list, 0), ("WHO", irc_who, 0),
        ("WHOIS", irc_whois, 1), ("WHOWAS", irc_whowas, 1), ("AWAY", irc_away, 0), ("NICK", irc_nick, 1),
        ("KICK", irc_kick, 2), ("INVITE", irc_invite, 2), ("MODE", irc_mode, 1), ("OPER", irc_oper, 2),
        ("ISON", irc_ison, 1), ("USERHOST", irc_userhost, 1), ("LUSERS", irc_lusers, 0), ("MOTD", irc_motd, 0),
        ("VERSION", irc_version, 0), ("TIME", irc_time, 0), ("PING", irc_ping, 0), ("PONG", irc_pong, 0),
        ("CAP", irc_cap, 1), ("QUIT", irc_quit, 0), ("USER", irc_registered_already, 0),
        ("PASS", irc_registered_already, 0),
    )}

    # -- output ---------------------------------------------------------------

    def send_irc(self, line: str) -> None:
        """One IRC message for this connection alone, from this connection's own thread."""
        self.server.pump.queue((self.output,), line.encode("utf-8") + b"\r\n")


class IrcListener(socketserver.TCPServer):
    """The IRC port. Its newcomers are admitted by the chat server under the same limits as
    everyone else's, and speak IRC."""

    allow_reuse_address = True
    request_queue_size = 4096

    def __init__(self, chat: ChatServer) -> None:
        self.chat = chat
        self.address_family = chat.address_family
        super().__init__((chat.options.host, chat.options.irc_port), IrcConnection)

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        self.chat.admit(request, client_address, IrcConnection)


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
    except (commands.CommandLoadError, ssl.SSLError) as problem:
        log.error("cannot start: %s", problem)
        return 1
    host, port = server.server_address[:2]
    # Printed even with -q: scripts and tests started with --port 0 read the port from it.
    print(f"pyChat {VERSION} listening on {host}:{port}", file=sys.stderr, flush=True)
    if server.irc is not None:
        irc_host, irc_port = server.irc.server_address[:2]
        print(f"pyChat {VERSION} listening for IRC on {irc_host}:{irc_port}", file=sys.stderr, flush=True)
        threading.Thread(target=server.irc.serve_forever, name="accept-irc", daemon=True).start()

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
