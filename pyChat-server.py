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
import contextlib
import dataclasses
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
from typing import Iterable, Iterator, NamedTuple

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
TLS_HANDSHAKE = b"\x16"            # the first byte of every TLS connection: a handshake record
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
# The protocol: framing, cleaning text, names, kinds of line
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

PROMPT_NICKNAME = "*** Choose a nickname:"
PROMPT_PASSWORD = "*** Password:"


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
            if self.server.check_secret(self, given, self.server.options.password, "server password"):
                return
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
            self.send_line(error(f"This port speaks TLS, not plain text. Connect with "
                                 f"pyChat-client.py --tls --port {port}, or openssl s_client -connect HOST:{port}."))
            raise Disconnect("spoke plain text to the TLS port")
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
        self.per_address: collections.Counter[str] = collections.Counter()
        self.admitted = 0                                       # connections given a thread
        self.refusing = 0                                       # TLS refusals under way
        self.failures: collections.Counter[str] = collections.Counter()   # wrong secrets, by address
        self.ignored: collections.Counter[str] = collections.Counter()    # how many ignore each name_key()
        self.stopping = False
        self.stop_signal, self.stop_trigger = socket.socketpair()
        self.tls = self.make_tls_context() if options.tls_cert else None
        self.history_file = None
        if options.history_file:
            self.load_history(options.history_file)
        self.room_named(DEFAULT_ROOM)
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

    def check_secret(self, connection: ClientConnection, given: str, secret: str, what: str) -> bool:
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

    # -- people and rooms -------------------------------------------------------

    def sign_in(self, connection: ClientConnection, nick: str) -> str | None:
        """Give CONNECTION the nickname and put it in the default room, or say why not."""
        nick = normal_name(nick)
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
                del self.rooms[name_key(min(empty, key=lambda r: r.last_used).name)]
            room = self.rooms[key] = Room(name, history=collections.deque(maxlen=self.options.history or 1))
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
                if self.history_file:
                    # On disk before anyone sees it, so whatever was seen survives a crash.
                    record = json.dumps({"time": when, "room": room.name, "line": line}, ensure_ascii=False)
                    try:
                        self.history_file.write(record + "\n")
                    except OSError as problem:      # a full disk must not silence the chat
                        log.error("history file: %s; history is kept in memory only from now on", problem)
                        self.history_file = None
            self._to_room(room, line, sender=connection)

    # -- history on disk ---------------------------------------------------------

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
            room.history.extend(entries)
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
        if self.history_file:
            self.history_file.close()


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
        new_nick = normal_name(new_nick)
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
        room_name = normal_name(room_name.removeprefix("#"))
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
        """Make the caller an operator if SECRET is the server's operator password."""
        expected = self._server.options.op_password
        if not expected:
            raise commands.CommandError("This server has no operator password, so no one can be an operator.")
        if not self._server.check_secret(self._caller, secret, expected, "operator password"):
            raise commands.CommandError("Wrong operator password.")
        self._caller.operator = True
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
        found = self._server.people.get(name_key(normal_name(nick)))
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
    raise_file_limit(options.max_clients + 64 if options.max_clients else 0)
    sys.setswitchinterval(SWITCH_INTERVAL)
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
