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
import hmac
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
        self.per_address: collections.Counter[str] = collections.Counter()
        self.admitted = 0                                       # connections given a thread
        self.refusing = 0                                       # TLS refusals under way
        self.failures: collections.Counter[str] = collections.Counter()   # wrong secrets, by address
        self.ignorers: dict[str, set[Person]] = {}              # who ignores each name_key(), if anyone
        self.stopping = False
        self.stop_signal, self.stop_trigger = socket.socketpair()
        self.tls = self.make_tls_context() if options.tls_cert else None
        self.history_file = None
        self.lobby: Room | None = None
        self.lobby = self.room_named(DEFAULT_ROOM)      # everyone's first room, never forgotten
        if options.history_file:
            self.load_history(options.history_file)
        self.pump = OutputPump(options.max_queue, options.stall_timeout)
        super().__init__((options.host, options.port), ClientConnection)
        self.pump.start()

    def make_tls_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.options.tls_cert, self.options.tls_key)
        return context

    # -- admission ------------------------------------------------------------

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        """Give a newcomer a thread of its own, or turn it away when the server or its address is full."""
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
            super().process_request(request, client_address)
            return
        log.warning("refused %s: %s", address, refusal)
        if not explain:
            self.shutdown_request(request)
        elif self.tls is None:
            self.refuse(request, refusal)
        else:
            threading.Thread(target=self.refuse, args=(request, refusal), daemon=True).start()

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
            event = kind(room.name, person.nick, text)
            if self.options.history:
                when = time.time()
                self.said += 1
                room.history.append((self.said, when, event))
                if self.history_file:
                    # On disk before anyone sees it, so whatever was seen survives a crash.
                    self.save_history(when, room.name, PYCHAT.line(event))
            self._to_room(room, event, sender=person)

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
