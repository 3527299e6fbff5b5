#!/usr/bin/env python3
"""pyChat terminal client.

Connects to a pyChat server and keeps what you are typing on the bottom line
of the terminal: when a message arrives, the half-typed line is cleared, the
message is printed above it with a timestamp, and the line is drawn again with
the cursor where it was. When standard input is not a terminal, each input
line is sent as a message and the client leaves at the end of the input.

The file reads top to bottom: options and defaults; the protocol (what kind
of line the server sent, who is online); the terminal; the line editor;
rendering; the loop that ties the server and the keyboard together; main().
"""
from __future__ import annotations

import argparse
import codecs
import collections
import contextlib
import datetime
import os
import re
import selectors
import signal
import socket
import ssl
import sys
import threading
import time
import unicodedata
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, TextIO

try:
    import termios
    import tty
except ImportError:  # Windows: see windows_keyboard_socket()
    termios = None
    tty = None

try:
    import colorama
except ImportError:  # only Windows consoles need it; POSIX terminals speak ANSI
    colorama = None

# ---------------------------------------------------------------------------
# Options and defaults
# ---------------------------------------------------------------------------

VERSION = "1.0.0"
DEFAULT_HOST = "localhost"          # --host
DEFAULT_PORT = 25000                # --port
PASSWORD_ENVIRONMENT = "PYCHAT_PASSWORD"  # default for --password
CONNECT_TIMEOUT = 10.0              # seconds to reach the server (and finish TLS)
QUIT_TIMEOUT = 5.0                  # seconds to wait for the server to close after /quit
ESCAPE_TIMEOUT = 0.05               # a lone ESC this old is the Esc key, not a sequence
HISTORY_SIZE = 500                  # sent lines remembered for Up/Down
READ_SIZE = 65536                   # bytes per read from the server or the keyboard
PIPED_BACKLOG = 1000                # piped lines read ahead of what the flood limit lets us send

# Commands every pyChat server has; names seen in /help replies are added.
STANDARD_COMMANDS = (
    "help", "online", "quit", "nick", "msg", "w", "reply", "me", "join",
    "leave", "rooms", "who", "names", "away", "back", "ignore", "unignore",
    "op", "kick", "mute", "unmute", "topic",
)

# ---------------------------------------------------------------------------
# The protocol: kinds of server lines, sign-in prompts, who is online
# ---------------------------------------------------------------------------

CHAT, ACTION, NOTICE, REPLY, ERROR, PRIVATE, HISTORY = (
    "chat", "action", "notice", "reply", "error", "private", "history")

PASSWORD_PROMPT = "*** Password:"
NICKNAME_PROMPT = "*** Choose a nickname:"
FAREWELL = "*** Bye."

WELCOME = re.compile(r"\*\*\* Welcome, ([^\s!]+)!")
JOINED = re.compile(r"\*\*\* (\S+) joined #\S+$")
QUIT = re.compile(r"\*\*\* (\S+) quit(?: \(.*\))?$")
RENAMED = re.compile(r"\*\*\* (\S+) is now known as (\S+)$")
ONLINE = re.compile(r"-- \d+ online: (.*)$")
ONLINE_ENTRY = re.compile(r"([^\s,()]+) \(#")
HELP_ENTRY = re.compile(r"-- /([^\s/]+)")
TOPIC_NOTICE = re.compile(r"\*\*\* (Topic\b|\S+ (set|changed|cleared) the topic\b)")
HISTORY_PREFIX = re.compile(r"\[history (\S+)\] ")
FLOOD_LIMIT = re.compile(r"Flood limit: (\d+) lines at once, then ([\d.]+) a second")
PRIVATE_PREFIX = re.compile(r"\[pm (from|to) ([^\]\s]+)\] ")
CHAT_PREFIX = re.compile(r"([^\s:]+): ")

# C0 and C1 controls (a tab is turned into a space first), line and paragraph
# separators, and the marks that reorder bidirectional text.
UNSAFE_CHARACTERS = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def sanitize(line: str) -> str:
    """Remove what could move the cursor, change colours or reorder text."""
    return UNSAFE_CHARACTERS.sub("", line.replace("\t", " "))


@dataclass
class Message:
    """One server line and what kind it is (see the README's table)."""

    kind: str
    text: str                 # the whole line
    nick: str = ""            # who spoke (chat, action, private, history)
    body: str = ""            # what they said, or the text after the marker
    outgoing: bool = False    # private: the copy of one you sent
    time: Optional[datetime.datetime] = None  # history: when it was said
    said: Optional["Message"] = None  # history: the original chat or action line


def classify(line: str) -> Message:
    """Tell what kind of line the server sent, and pick out its parts."""
    if line.startswith("[history "):
        match = HISTORY_PREFIX.match(line)
        if match:
            said = classify(line[match.end():])
            try:
                time = datetime.datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%SZ")
            except ValueError:
                time = None
            else:
                time = time.replace(tzinfo=datetime.timezone.utc)
            return Message(HISTORY, line, said.nick, said.body, time=time, said=said)
    for marker, kind in (("*** ", NOTICE), ("-- ", REPLY), ("!! ", ERROR)):
        if line.startswith(marker):
            return Message(kind, line, body=line[len(marker):])
    if line.startswith("* "):
        nick, _, body = line[2:].partition(" ")
        return Message(ACTION, line, nick, body)
    match = PRIVATE_PREFIX.match(line)
    if match:
        return Message(PRIVATE, line, match.group(2), line[match.end():],
                       outgoing=match.group(1) == "to")
    match = CHAT_PREFIX.match(line)
    if match:
        return Message(CHAT, line, match.group(1), line[match.end():])
    return Message(CHAT, line, body=line)


class Pacer:
    """Keeps piped lines within the server's flood limit, so that none of them is dropped."""

    def __init__(self, burst: int, rate: float) -> None:
        # A little under the limit: the server's clock and ours do not tick together.
        self.burst = max(1, burst - 1)
        self.rate = rate * 0.9
        self.tokens = float(self.burst)
        self.updated = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self) -> bool:
        """Use up one line's allowance, if there is one now."""
        self._refill()
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def wait(self) -> float:
        """Seconds until the next line may go."""
        self._refill()
        return max(0.0, (1 - self.tokens) / self.rate)


class Roster:
    """Who is online and which commands exist, learnt from the lines that go by."""

    def __init__(self) -> None:
        self.nicknames: dict[str, str] = {}   # casefolded -> as written
        self.commands: set[str] = set(STANDARD_COMMANDS)

    def add(self, nick: str) -> None:
        """Remember that nick is online."""
        if nick:
            self.nicknames[nick.casefold()] = nick

    def remove(self, nick: str) -> None:
        """Forget nick."""
        self.nicknames.pop(nick.casefold(), None)

    def learn(self, message: Message) -> None:
        """Update the roster from one server line."""
        line = message.text
        if message.kind in (CHAT, ACTION) or (message.kind == PRIVATE and not message.outgoing):
            self.add(message.nick)
        elif message.kind == NOTICE:
            for pattern in (WELCOME, JOINED):
                match = pattern.match(line)
                if match:
                    self.add(match.group(1))
            match = QUIT.match(line)
            if match:
                self.remove(match.group(1))
            match = RENAMED.match(line)
            if match:
                self.remove(match.group(1))
                self.add(match.group(2))
        elif message.kind == REPLY:
            match = ONLINE.match(line)
            if match:
                self.nicknames.clear()
                for nick in ONLINE_ENTRY.findall(match.group(1)):
                    self.add(nick)
            match = HELP_ENTRY.match(line)
            if match:
                self.commands.add(match.group(1).lower())

    def others(self, me: str) -> list[str]:
        """Nicknames online other than me, sorted."""
        return sorted((nick for key, nick in self.nicknames.items() if key != me.casefold()),
                      key=str.casefold)


def mentions(message: Message, me: str) -> bool:
    """Whether someone else's chat, action or private message names me."""
    if not me or message.kind not in (CHAT, ACTION, PRIVATE) or message.outgoing:
        return False
    if message.nick.casefold() == me.casefold():
        return False
    return mention_pattern(me).search(message.body) is not None


def mention_pattern(me: str) -> re.Pattern:
    """My nickname as a whole word, ignoring case."""
    return re.compile(r"(?<![\w-])" + re.escape(me) + r"(?![\w-])", re.IGNORECASE)


# ---------------------------------------------------------------------------
# The terminal
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def keyboard_mode(fd: int) -> Iterator[None]:
    """Let keys through one at a time, without echo or signals; restore on the way out.

    Ctrl-C, Ctrl-Z and Ctrl-S reach the client as keys, so it can leave
    cleanly. Output processing stays on: "\\n" still starts a new line.
    """
    if termios is None:
        yield
        return
    saved = termios.tcgetattr(fd)
    mode = termios.tcgetattr(fd)
    mode[tty.IFLAG] &= ~(termios.ICRNL | termios.INLCR | termios.IGNCR | termios.IXON)
    mode[tty.LFLAG] &= ~(termios.ECHO | termios.ICANON | termios.ISIG | termios.IEXTEN)
    mode[tty.CC][termios.VMIN] = 1
    mode[tty.CC][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSAFLUSH, mode)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


class Key(NamedTuple):
    """One key press: an editing key by name, or text to insert."""

    name: str
    text: str = ""


CONTROL_KEYS = {
    "\r": "enter", "\n": "enter", "\t": "tab", "\x7f": "backspace", "\x08": "backspace",
    "\x01": "home", "\x05": "end", "\x02": "left", "\x06": "right",
    "\x10": "up", "\x0e": "down", "\x04": "ctrl-d", "\x03": "ctrl-c",
    "\x0b": "kill-to-end", "\x15": "kill-to-start", "\x17": "kill-word", "\x0c": "refresh",
}
# The final character of ESC [ ... or ESC O sequences; "~" ones go by number.
SEQUENCE_KEYS = {"A": "up", "B": "down", "C": "right", "D": "left", "H": "home", "F": "end"}
TILDE_KEYS = {"1": "home", "7": "home", "4": "end", "8": "end", "3": "delete"}
ESC = "\x1b"


class KeyDecoder:
    """Turns keyboard bytes into keys.

    A read may end anywhere: inside a UTF-8 character or an escape sequence.
    The rest waits for the next read; a lone ESC is the Esc key once
    flush() is called after ESCAPE_TIMEOUT without more input.
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    @property
    def waiting(self) -> bool:
        """Whether an unfinished escape sequence is held back."""
        return bool(self._pending)

    def feed(self, data: bytes) -> list[Key]:
        """Keys completed by these bytes."""
        return self._parse(self._pending + self._utf8.decode(data))

    def flush(self) -> list[Key]:
        """Give up waiting: the held-back ESC was the Esc key, which does nothing."""
        rest, self._pending = self._pending[1:], ""
        return self._parse(rest)

    def _parse(self, chars: str) -> list[Key]:
        keys: list[Key] = []
        text: list[str] = []

        def emit(key: Key) -> None:
            if text:
                keys.append(Key("text", "".join(text)))
                text.clear()
            keys.append(key)

        self._pending = ""
        index = 0
        while index < len(chars):
            char = chars[index]
            if char == ESC:
                length, name = escape_sequence(chars, index)
                if length == 0:
                    self._pending = chars[index:]
                    break
                if name:
                    emit(Key(name))
                index += length
            elif char in CONTROL_KEYS:
                emit(Key(CONTROL_KEYS[char]))
                index += 1
            else:
                if not UNSAFE_CHARACTERS.match(char):
                    text.append(char)
                index += 1
        if text:
            keys.append(Key("text", "".join(text)))
        return keys


def escape_sequence(chars: str, start: int) -> tuple[int, str]:
    """Length and key name of the escape sequence at start; length 0 if it is unfinished."""
    if start + 1 >= len(chars):
        return 0, ""
    kind = chars[start + 1]
    if kind == ESC:
        return 1, ""
    if kind == "O":
        if start + 2 >= len(chars):
            return 0, ""
        return 3, SEQUENCE_KEYS.get(chars[start + 2], "")
    if kind != "[":
        return 2, ""   # Alt+key: nothing bound
    end = start + 2
    while end < len(chars) and "\x20" <= chars[end] <= "\x3f":
        end += 1
    if end >= len(chars):
        return 0, ""
    final, parameters = chars[end], chars[start + 2:end]
    if final == "~":
        return end + 1 - start, TILDE_KEYS.get(parameters.split(";")[0], "")
    return end + 1 - start, SEQUENCE_KEYS.get(final, "")


def windows_keyboard_socket(console: bool) -> socket.socket:
    """Windows seam: select() there watches only sockets, not the console or a pipe.

    A daemon thread reads the console with msvcrt.getwch() (arrow and other
    special keys turned into the ANSI sequences KeyDecoder knows), or the
    piped standard input, and writes the bytes into a socketpair; the loop
    selects on the other end as if it were the keyboard.
    """
    import msvcrt

    special = {"H": "\x1b[A", "P": "\x1b[B", "M": "\x1b[C", "K": "\x1b[D",
               "G": "\x1b[H", "O": "\x1b[F", "S": "\x1b[3~"}
    loop_end, thread_end = socket.socketpair()

    def forward() -> None:
        with thread_end:
            with contextlib.suppress(OSError):
                while True:
                    if console:
                        char = msvcrt.getwch()
                        if char in ("\x00", "\xe0"):
                            char = special.get(msvcrt.getwch(), "")
                        chunk = char.encode("utf-8")
                    else:
                        chunk = sys.stdin.buffer.read1(READ_SIZE)
                        if not chunk:
                            return
                    thread_end.sendall(chunk)

    threading.Thread(target=forward, name="keyboard", daemon=True).start()
    return loop_end


# ---------------------------------------------------------------------------
# The line editor: a list of characters and a cursor, no I/O
# ---------------------------------------------------------------------------

def char_width(char: str) -> int:
    """Terminal cells taken by one character: 2 for wide CJK and emoji, 0 for combining marks."""
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def text_width(text: str) -> int:
    """Terminal cells taken by text."""
    return sum(char_width(char) for char in text)


def split_characters(text: str) -> list[str]:
    """Split text into what the cursor steps over: each character with its combining marks."""
    characters: list[str] = []
    for char in text:
        if characters and char_width(char) == 0:
            characters[-1] += char
        else:
            characters.append(char)
    return characters


class LineEditor:
    """The line being typed: characters, a cursor, a horizontal scroll, and history.

    Pure logic: keys come in as method calls, the screen asks view() what to show.
    """

    def __init__(self, history_size: int = HISTORY_SIZE) -> None:
        self.characters: list[str] = []
        self.cursor = 0          # index into characters
        self.scroll = 0          # index of the first character shown
        self.history: list[str] = []
        self.history_size = history_size
        self._recalled = 0       # index into history; len(history) means the new line
        self._draft = ""         # the new line, kept while browsing history

    @property
    def text(self) -> str:
        """The whole line."""
        return "".join(self.characters)

    def set_text(self, text: str, cursor: Optional[int] = None) -> None:
        """Replace the line; the cursor goes to the end unless told."""
        self.characters = split_characters(text)
        self.cursor = len(self.characters) if cursor is None else cursor

    def insert(self, text: str) -> None:
        """Type text at the cursor; combining marks join the character before them."""
        for char in text:
            if self.cursor > 0 and char_width(char) == 0:
                self.characters[self.cursor - 1] += char
            else:
                self.characters.insert(self.cursor, char)
                self.cursor += 1

    def backspace(self) -> None:
        """Delete the character before the cursor."""
        if self.cursor > 0:
            self.cursor -= 1
            del self.characters[self.cursor]

    def delete(self) -> None:
        """Delete the character under the cursor."""
        del self.characters[self.cursor:self.cursor + 1]

    def kill_to_start(self) -> None:
        """Ctrl-U: delete everything before the cursor."""
        del self.characters[:self.cursor]
        self.cursor = 0

    def kill_to_end(self) -> None:
        """Ctrl-K: delete from the cursor to the end."""
        del self.characters[self.cursor:]

    def kill_word(self) -> None:
        """Ctrl-W: delete the word before the cursor and the spaces after it."""
        start = self.cursor
        while start > 0 and self.characters[start - 1].isspace():
            start -= 1
        while start > 0 and not self.characters[start - 1].isspace():
            start -= 1
        del self.characters[start:self.cursor]
        self.cursor = start

    def left(self) -> None:
        """Move the cursor one character left."""
        self.cursor = max(0, self.cursor - 1)

    def right(self) -> None:
        """Move the cursor one character right."""
        self.cursor = min(len(self.characters), self.cursor + 1)

    def home(self) -> None:
        """Move the cursor to the start of the line."""
        self.cursor = 0

    def end(self) -> None:
        """Move the cursor to the end of the line."""
        self.cursor = len(self.characters)

    def history_back(self) -> None:
        """Up: show the sent line before the one shown."""
        if self._recalled == 0:
            return
        if self._recalled == len(self.history):
            self._draft = self.text
        self._recalled -= 1
        self.set_text(self.history[self._recalled])

    def history_forward(self) -> None:
        """Down: show the next sent line, then the line that was being typed."""
        if self._recalled == len(self.history):
            return
        self._recalled += 1
        self.set_text(self.history[self._recalled] if self._recalled < len(self.history)
                      else self._draft)

    def submit(self, remember: bool = True) -> str:
        """Enter: empty the line and return it, remembering it in history unless told not to."""
        line = self.text
        if remember and line.strip() and (not self.history or self.history[-1] != line):
            self.history.append(line)
            del self.history[:-self.history_size]
        self._recalled = len(self.history)
        self._draft = ""
        self.set_text("")
        self.scroll = 0
        return line

    def complete(self, commands: Iterable[str], nicknames: Iterable[str]) -> list[str]:
        """Tab: complete the word before the cursor; returns the choices when there are several."""
        before = "".join(self.characters[:self.cursor])
        after = "".join(self.characters[self.cursor:])
        completed, choices = complete_word(before, commands, nicknames)
        self.set_text(completed + after, len(split_characters(completed)))
        return choices

    def view(self, columns: int) -> tuple[str, int]:
        """What fits in `columns` cells, and the cursor's cell in it.

        The line never wraps: it scrolls sideways just enough to keep the
        cursor in view, and one cell is always left for the cursor.
        """
        columns = max(columns, 2)
        widths = [text_width(char) for char in self.characters]
        if self.cursor < self.scroll:   # left of the window: jump back, keeping some context
            self.scroll = self.cursor
            while self.scroll > 0 and sum(widths[self.scroll - 1:self.cursor]) <= columns // 3:
                self.scroll -= 1
        while sum(widths[self.scroll:self.cursor]) > columns - 1:
            self.scroll += 1
        while self.scroll > 0 and sum(widths[self.scroll - 1:]) <= columns - 1:
            self.scroll -= 1
        shown, used = [], 0
        for char, width in zip(self.characters[self.scroll:], widths[self.scroll:]):
            if used + width > columns:
                break
            shown.append(char)
            used += width
        return "".join(shown), sum(widths[self.scroll:self.cursor])


def complete_word(before: str, commands: Iterable[str], nicknames: Iterable[str]
                  ) -> tuple[str, list[str]]:
    """Complete the last word of `before`: a /command as the first word, else a nickname.

    One match is completed, followed by ": " for a nickname that starts the
    line (as IRC clients do) and " " otherwise. Several matches are completed
    as far as they agree and returned as choices. An empty word is left
    alone: its choices are every nickname.
    """
    start = before.rfind(" ") + 1
    word, line_start = before[start:], not before[:start].strip()
    if line_start and word.startswith("/"):
        candidates, suffix = sorted({"/" + name for name in commands}), " "
    else:
        candidates, suffix = sorted(set(nicknames), key=str.casefold), (": " if line_start else " ")
    matches = [name for name in candidates if name.casefold().startswith(word.casefold())]
    if not word:   # nothing typed yet: only show who could be meant
        return before, matches
    if len(matches) == 1:
        return before[:start] + matches[0] + suffix, []
    if not matches:
        return before, []
    agreed = len(word)
    shortest = min(len(name) for name in matches)
    while agreed < shortest and len({name[:agreed + 1].casefold() for name in matches}) == 1:
        agreed += 1
    if agreed > len(word):
        word = matches[0][:agreed]
    return before[:start] + word, matches


# ---------------------------------------------------------------------------
# Rendering: timestamps, colours, the bottom line
# ---------------------------------------------------------------------------

STYLES = {
    "time": "2", "notice": "36", "topic": "1;33", "reply": "32", "error": "1;31",
    "private": "1;35", "action": "3", "history": "2", "mention": "1;7", "local": "33",
    "prompt": "1",
}
NICK_COLOURS = ("31", "32", "33", "34", "35", "36", "91", "92", "93", "94", "95", "96")
LOCAL_MARKER = "-!- "   # lines from the client itself, not from the server


class Painter:
    """Wraps text in ANSI colour codes, or leaves it alone when colour is off."""

    def __init__(self, colour: bool) -> None:
        self.colour = colour

    def paint(self, text: str, style: str) -> str:
        """text in a style from STYLES, or an SGR code."""
        if not self.colour or not text:
            return text
        return f"\x1b[{STYLES.get(style, style)}m{text}\x1b[0m"

    def nick(self, nick: str) -> str:
        """nick in its own colour, the same in every run and for every case of it."""
        return self.paint(nick, nick_colour(nick))


def nick_colour(nick: str) -> str:
    """The SGR colour code of a nickname (a CRC of it, not Python's per-run hash())."""
    return NICK_COLOURS[zlib.crc32(nick.casefold().encode("utf-8")) % len(NICK_COLOURS)]


def render(message: Message, painter: Painter, me: str,
           now: Optional[datetime.datetime] = None) -> str:
    """The line as shown: [HH:MM:SS], then the message in the style of its kind."""
    when = now or datetime.datetime.now()
    if message.kind == HISTORY and message.time:
        when = message.time.astimezone()
    stamp = painter.paint(when.strftime("[%H:%M:%S]"), "time")
    return f"{stamp} {render_body(message, painter, me)}"


def render_body(message: Message, painter: Painter, me: str) -> str:
    """The message without its timestamp."""
    kind, text = message.kind, message.text
    if kind == HISTORY:
        return painter.paint(message.said.text if message.said else text, "history")
    if kind == NOTICE:
        return painter.paint(text, "topic" if TOPIC_NOTICE.match(text) else "notice")
    if kind in (REPLY, ERROR):
        return painter.paint(text, kind)
    said = highlight(message.body, painter, me if mentions(message, me) else "", kind)
    if kind == ACTION:
        return painter.paint("* ", "action") + painter.nick(message.nick) + " " + said
    if kind == PRIVATE:
        tag = f"[pm {'to' if message.outgoing else 'from'} {message.nick}]"
        return painter.paint(tag, "private") + " " + said
    if message.nick:
        return painter.nick(message.nick) + ": " + said
    return said


def highlight(body: str, painter: Painter, me: str, kind: str) -> str:
    """body in the style of its kind, with each mention of `me` (if any) standing out."""
    style = "action" if kind == ACTION else ""
    if not me:
        return painter.paint(body, style) if style else body
    pieces = mention_pattern(me).split(body)
    names = mention_pattern(me).findall(body)
    out = [painter.paint(pieces[0], style) if style else pieces[0]]
    for name, piece in zip(names, pieces[1:]):
        out.append(painter.paint(name, "mention"))
        out.append(painter.paint(piece, style) if style else piece)
    return "".join(out)


def render_local(text: str, painter: Painter) -> str:
    """A line from the client itself (completions, warnings), timestamped like the rest."""
    stamp = painter.paint(datetime.datetime.now().strftime("[%H:%M:%S]"), "time")
    return f"{stamp} {painter.paint(LOCAL_MARKER + text, 'local')}"


class TerminalDisplay:
    """The screen of an interactive session: messages scroll up, the input stays on the bottom row."""

    def __init__(self, out: TextIO, editor: LineEditor, painter: Painter) -> None:
        self.out = out
        self.editor = editor
        self.painter = painter
        self.prompt = "> "
        self.secret = False       # typing a password: show nothing of it
        self.drawn_cursor = 0     # the cursor's column when the input line was last drawn

    def columns(self) -> int:
        """The terminal's width now (it may have been resized)."""
        try:
            return os.get_terminal_size(self.out.fileno()).columns
        except (OSError, ValueError):
            return 80

    def set_prompt(self, prompt: str, secret: bool = False) -> None:
        """Change the text before the input line, and redraw."""
        self.prompt, self.secret = prompt, secret
        self.redraw()

    def show(self, line: str, bell: bool = False) -> None:
        """Print a line above the input line, then draw the input line again."""
        self.out.write("\r\x1b[J" + line + "\r\n" + ("\a" if bell else ""))
        self.redraw()

    def resized(self) -> None:
        """SIGWINCH: draw the input line again for the new width.

        Most terminals (tmux, VTE, iTerm2, Windows Terminal) re-wrap a row that
        no longer fits, so after a shrink the old input line may span several
        rows with the cursor on a lower one: go up to the first before drawing.
        """
        rows_above = self.drawn_cursor // self.columns()
        if rows_above:
            self.out.write(f"\x1b[{rows_above}A")
        self.redraw()

    def redraw(self) -> None:
        """Draw the prompt and the visible part of the input, and put the cursor back."""
        columns = self.columns()
        prompt = self.prompt if text_width(self.prompt) <= columns // 2 else "> "
        room = columns - text_width(prompt) - 1   # the last column stays empty: no wrap
        shown, cursor = ("", 0) if self.secret else self.editor.view(room)
        column = text_width(prompt) + cursor
        self.out.write("\r\x1b[J" + self.painter.paint(prompt, "prompt") + shown + "\r"
                       + (f"\x1b[{column}C" if column else ""))
        self.out.flush()
        self.drawn_cursor = column

    def clear_screen(self) -> None:
        """Ctrl-L: clear the screen and start again at the top."""
        self.out.write("\x1b[H\x1b[2J")
        self.redraw()

    def close(self) -> None:
        """Remove the input line, leaving the cursor at the start of an empty row."""
        self.out.write("\r\x1b[J")
        self.out.flush()


class PlainDisplay:
    """Output when input is piped: one line per message, no input line to redraw."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def set_prompt(self, prompt: str, secret: bool = False) -> None:
        """There is no input line to label."""

    def show(self, line: str, bell: bool = False) -> None:
        """Print the line."""
        self.out.write(line + "\n")
        self.out.flush()


# ---------------------------------------------------------------------------
# The connection and the loop
# ---------------------------------------------------------------------------

class ConnectError(Exception):
    """The server could not be reached; the message says why, in one line."""


def connect(host: str, port: int, tls: bool, cafile: Optional[str], insecure: bool
            ) -> socket.socket:
    """Open the connection (TLS verified unless insecure), as a non-blocking socket."""
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except socket.gaierror as error:
        raise ConnectError(f"unknown host {host}: {error.strerror}") from None
    except OSError as error:
        raise ConnectError(f"cannot connect to {host}:{port}: "
                           f"{error.strerror or error or 'timed out'}") from None
    if tls:
        context = ssl.create_default_context(cafile=cafile)
        if insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            sock = context.wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError as error:
            sock.close()
            raise ConnectError(f"cannot trust {host}:{port}: {error.verify_message} "
                               "(see --cafile and --insecure)") from None
        except (ssl.SSLError, OSError) as error:
            sock.close()
            raise ConnectError(f"TLS with {host}:{port} failed: {error}") from None
    sock.setblocking(False)
    return sock


WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Connection:
    """The server socket and its buffers: lines out, lines in."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.closed = False

    def send_line(self, line: str) -> None:
        """Queue a line for the server and send what the socket takes now."""
        self.outbox += line.encode("utf-8") + b"\n"
        self.flush()

    def flush(self) -> None:
        """Send as much of the queue as the socket takes without waiting."""
        while self.outbox and not self.closed:
            try:
                sent = self.sock.send(self.outbox)
            except WOULD_BLOCK:
                return
            except OSError:
                self.closed = True
                return
            del self.outbox[:sent]

    def receive(self) -> list[str]:
        """The complete lines that have arrived; sets closed when the server has hung up."""
        while True:
            try:
                data = self.sock.recv(READ_SIZE)
            except WOULD_BLOCK:
                break
            except OSError:
                data = b""
            if not data:
                self.closed = True
                break
            self.inbox += data
        *lines, rest = self.inbox.split(b"\n")
        self.inbox = bytearray(rest)
        if self.closed and rest:
            lines.append(rest)
        return [line.decode("utf-8", "replace").rstrip("\r") for line in lines]

    def close(self) -> None:
        """Close the socket."""
        with contextlib.suppress(OSError):
            self.sock.close()


class ChatClient:
    """Ties the server, the keyboard (or piped input) and the screen together in one selectors loop."""

    def __init__(self, connection: Connection, display: TerminalDisplay | PlainDisplay,
                 editor: LineEditor, painter: Painter, *,
                 interactive: bool, nick: Optional[str], password: Optional[str],
                 bell: bool, keyboard: Optional[socket.socket] = None) -> None:
        self.connection = connection
        self.display = display
        self.editor = editor
        self.painter = painter
        self.interactive = interactive
        self.nick_to_send = nick
        self.password_to_send = password
        self.bell = bell
        self.keyboard = keyboard          # the Windows seam, else standard input is read
        self.keys = KeyDecoder()
        self.roster = Roster()
        self.me = ""                      # my nickname once the server has welcomed me
        self.answering = ""               # "password" or "nickname" while the server asks
        self.refusal = ""                 # the last error line while signing in
        self.asked_online = False         # /online sent on arrival; its reply is not shown
        self.piped_input = bytearray()
        self.piped_lines: collections.deque[str] = collections.deque()   # read, not yet sent
        self.piped_ended = False
        self.pacer: Optional[Pacer] = None   # the server's flood limit, from its greeting
        self.leaving = False              # /quit sent or Ctrl-D pressed: the server will close
        self.leave_deadline = 0.0
        self.exit_code: Optional[int] = None
        self.selector = selectors.SelectSelector() if os.name == "nt" else selectors.PollSelector()
        self.input_registered = False

    # -- the loop ----------------------------------------------------------

    def run(self) -> int:
        """Run until the server closes or the user leaves; returns the exit status."""
        signals = self._watch_signals() if self.interactive else None
        self.selector.register(self.connection.sock, selectors.EVENT_READ, self._on_server)
        if self.interactive:
            self._register_input()
        try:
            while self.exit_code is None:
                mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.connection.outbox else 0)
                self.selector.modify(self.connection.sock, mask, self._on_server)
                events = self.selector.select(self._timeout())
                if not events and self.keys.waiting:
                    self._on_keys(self.keys.flush())
                for key, events_mask in events:
                    key.data(events_mask)
                if self.piped_lines and self.exit_code is None:
                    self._send_piped()
                if self.leaving and self.exit_code is None and time.monotonic() > self.leave_deadline:
                    self._finish("the server did not close the connection after /quit",
                                 0 if self.interactive else 1)
        finally:
            if signals:
                signals()
            self.selector.close()
            self.connection.close()
        return self.exit_code

    def _timeout(self) -> Optional[float]:
        if self.keys.waiting:
            return ESCAPE_TIMEOUT
        if self.piped_lines and self.pacer:
            return self.pacer.wait()
        if self.leaving:
            return max(0.0, self.leave_deadline - time.monotonic())
        return None

    def _register_input(self) -> None:
        if not self.input_registered:
            source = self.keyboard if self.keyboard is not None else sys.stdin.fileno()
            self.selector.register(source, selectors.EVENT_READ, self._on_input)
            self.input_registered = True

    def _unregister_input(self) -> None:
        if self.input_registered:
            source = self.keyboard if self.keyboard is not None else sys.stdin.fileno()
            self.selector.unregister(source)
            self.input_registered = False

    def _watch_signals(self) -> Callable[[], None]:
        """Turn SIGWINCH, SIGTERM and SIGHUP into bytes on a pipe the loop watches."""
        if not hasattr(signal, "SIGWINCH"):
            return lambda: None
        reader, writer = os.pipe()
        os.set_blocking(writer, False)
        os.set_blocking(reader, False)
        watched = (signal.SIGWINCH, signal.SIGTERM, signal.SIGHUP)
        previous = {number: signal.signal(number, lambda *_: None) for number in watched}
        previous_fd = signal.set_wakeup_fd(writer)

        def on_signal(_mask: int) -> None:
            for number in os.read(reader, 64):
                if number == signal.SIGWINCH:
                    self.display.resized()
                else:
                    self._finish(f"stopped by signal {signal.Signals(number).name}", 128 + number)

        self.selector.register(reader, selectors.EVENT_READ, on_signal)

        def restore() -> None:
            signal.set_wakeup_fd(previous_fd)
            for number, handler in previous.items():
                signal.signal(number, handler)
            os.close(reader)
            os.close(writer)

        return restore

    def _finish(self, reason: str, code: int) -> None:
        """Stop the loop; a reason is shown unless the user simply left."""
        if reason:
            if self.interactive:
                self.display.show(render_local(reason, self.painter))
                if self.editor.text.strip() and not self.answering:
                    self.display.show(render_local("not sent: " + self.editor.text, self.painter))
            else:
                print(f"pyChat: {reason}", file=sys.stderr, flush=True)
        self.exit_code = code

    # -- the server --------------------------------------------------------

    def _on_server(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self.connection.flush()
        if mask & selectors.EVENT_READ:
            for line in self.connection.receive():
                self.on_server_line(line)
                if self.exit_code is not None:
                    return
            if self.connection.closed:
                if self.leaving:
                    self.exit_code = 0
                else:
                    why = self.refusal if self.refusal and not self.me else "the server closed the connection"
                    self._finish("disconnected: " + why, 1)

    def on_server_line(self, raw: str) -> None:
        """Handle one line from the server: sign-in prompts, then messages to show."""
        line = sanitize(raw)
        message = classify(line)
        self.roster.learn(message)
        limit = FLOOD_LIMIT.search(line) if not self.me else None
        if limit:
            self.pacer = Pacer(int(limit.group(1)), float(limit.group(2)))
        if self.asked_online and ONLINE.match(line):
            self.asked_online = False
            return
        if line.rstrip() == PASSWORD_PROMPT:
            self._answer("password")
            return
        if line.rstrip() == NICKNAME_PROMPT:
            self._answer("nickname")
            return
        if not self.me:
            welcome = WELCOME.match(line)
            if welcome:
                self._signed_in(welcome.group(1))
            elif message.kind == ERROR:
                self.refusal = line
        else:
            renamed = RENAMED.match(line)
            if renamed and renamed.group(1).casefold() == self.me.casefold():
                self.me = renamed.group(2)
                self.display.set_prompt(self.me + "> ")
        if line == FAREWELL:
            self.leaving = True
            self.leave_deadline = time.monotonic() + QUIT_TIMEOUT
        ring = self.bell and (mentions(message, self.me)
                              or (message.kind == PRIVATE and not message.outgoing))
        self.display.show(render(message, self.painter, self.me), bell=ring)

    def _answer(self, question: str) -> None:
        """The server asks for the password or a nickname: answer from the options, else ask."""
        given = self.password_to_send if question == "password" else self.nick_to_send
        if given:
            self.connection.send_line(given)
            if question == "password":
                self.password_to_send = None
            else:
                self.nick_to_send = None
            return
        if not self.interactive:
            if question == "password":
                reason = (f"password refused: {self.refusal}" if self.refusal
                          else "the server wants a password (--password or $PYCHAT_PASSWORD)")
            else:
                reason = f"nickname refused: {self.refusal}" if self.refusal else "no nickname"
            self._finish(reason, 1)
            return
        self.answering = question
        self.display.set_prompt(f"{question}: ", secret=question == "password")

    def _signed_in(self, nick: str) -> None:
        self.me = nick
        if self.interactive:   # learn who was already here, for Tab completion
            self.connection.send_line("/online")
            self.asked_online = True
        self.answering = ""
        self.display.set_prompt(nick + "> ")
        self._register_input()

    # -- the keyboard or piped input ---------------------------------------

    def _on_input(self, _mask: int) -> None:
        try:
            if self.keyboard is not None:
                data = self.keyboard.recv(READ_SIZE)
            else:
                data = os.read(sys.stdin.fileno(), READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            self._unregister_input()
        if self.interactive:
            if not data:
                self._leave()
                return
            self._on_keys(self.keys.feed(data))
        else:
            self._on_piped(data)

    def _on_piped(self, data: bytes) -> None:
        """Queue each complete input line to be sent; the end of input means /quit once all are sent."""
        self.piped_input += data
        *lines, rest = self.piped_input.split(b"\n")
        if not data:
            lines.append(rest)
            rest = b""
            self.piped_ended = True
        self.piped_input = bytearray(rest)
        self.piped_lines.extend(text for text in (line.decode("utf-8", "replace").rstrip("\r") for line in lines)
                                if text.strip())
        self._send_piped()

    def _send_piped(self) -> None:
        """Send queued piped lines as fast as the server's flood limit allows."""
        while self.piped_lines and (self.pacer is None or self.pacer.take()):
            self.send_typed(self.piped_lines.popleft())
        # Read no further ahead than a screenful of lines: a long file is not loaded whole.
        if len(self.piped_lines) > PIPED_BACKLOG:
            self._unregister_input()
        elif not self.piped_ended:
            self._register_input()
        if self.piped_ended and not self.piped_lines:
            self._leave()

    def _leave(self) -> None:
        """Say /quit (once) and wait for the server to close the connection."""
        if not self.me:   # still signing in: "/quit" would be taken for a nickname or password
            self.exit_code = 0
        elif not self.leaving:
            self.connection.send_line("/quit")
            self.leaving = True
            self.leave_deadline = time.monotonic() + QUIT_TIMEOUT

    def send_typed(self, line: str) -> None:
        """Send a line the user typed: the answer to a sign-in question, or a message or command."""
        if not line.strip():
            return
        if self.answering:
            self.answering = ""
            self.display.set_prompt("> ")
        elif line.split()[0].lower() == "/quit":
            self.leaving = True
            self.leave_deadline = time.monotonic() + QUIT_TIMEOUT
        self.connection.send_line(line)

    def _on_keys(self, keys: list[Key]) -> None:
        editor = self.editor
        actions = {
            "backspace": editor.backspace, "delete": editor.delete,
            "kill-to-start": editor.kill_to_start, "kill-to-end": editor.kill_to_end,
            "kill-word": editor.kill_word, "left": editor.left, "right": editor.right,
            "home": editor.home, "end": editor.end,
            "up": editor.history_back, "down": editor.history_forward,
        }
        for key in keys:
            if key.name == "text":
                editor.insert(key.text)
            elif key.name in actions:
                actions[key.name]()
            elif key.name == "enter":
                self.send_typed(editor.submit(remember=not self.answering))
            elif key.name == "tab" and not self.answering:
                choices = editor.complete(self.roster.commands, self.roster.others(self.me))
                if choices:
                    self.display.show(render_local("  ".join(choices), self.painter))
            elif key.name == "ctrl-d":
                if editor.characters:
                    editor.delete()
                else:
                    self._leave()
            elif key.name == "ctrl-c":
                if self.leaving:
                    self.exit_code = 0
                    return
                self._leave()
            elif key.name == "refresh":
                self.display.clear_screen()
        self.display.redraw()


# ---------------------------------------------------------------------------
# main()
# ---------------------------------------------------------------------------

def port_number(text: str) -> int:
    """A TCP port from the command line."""
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def parse_options(argv: Optional[list[str]]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="pyChat-client.py",
        description="Terminal client for a pyChat server. With standard input from a "
                    "pipe or a file, each line is sent as a message, then the client leaves.")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"server to connect to (default: {DEFAULT_HOST})")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help=f"server port (default: {DEFAULT_PORT})")
    parser.add_argument("--nick",
                        help="nickname to sign in with, instead of being asked; required "
                             "when standard input is not a terminal")
    parser.add_argument("--password", default=os.environ.get(PASSWORD_ENVIRONMENT) or None,
                        help="server password, sent when the server asks for one (default: "
                             f"${PASSWORD_ENVIRONMENT}, which keeps it out of the process list)")
    parser.add_argument("--no-color", action="store_true",
                        help="no colours (also when $NO_COLOR is set to anything)")
    parser.add_argument("--bell", action="store_true",
                        help="ring the terminal bell when someone mentions your nickname "
                             "or sends you a private message")
    parser.add_argument("--tls", action="store_true",
                        help="use TLS, checking the server's certificate and host name")
    parser.add_argument("--cafile", metavar="FILE",
                        help="trust the certificate authority in FILE (PEM) for TLS; implies --tls")
    parser.add_argument("--insecure", action="store_true",
                        help="TLS without checking the certificate (anyone in between can read "
                             "the chat); implies --tls")
    parser.add_argument("--version", action="version", version=f"pyChat client {VERSION}")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the client; returns the exit status."""
    options = parse_options(argv)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if not interactive and not options.nick:
        print("pyChat: --nick is needed when not run in a terminal", file=sys.stderr)
        return 2
    colour = (sys.stdout.isatty() and not options.no_color
              and not os.environ.get("NO_COLOR"))
    if os.name == "nt" and colorama is not None:
        # The input line is drawn with ANSI cursor moves, with or without colour.
        if hasattr(colorama, "just_fix_windows_console"):
            colorama.just_fix_windows_console()
        else:
            colorama.init()
    with contextlib.suppress(AttributeError):
        sys.stdout.reconfigure(errors="replace")
    tls = options.tls or options.insecure or bool(options.cafile)
    if options.insecure:
        print("pyChat: warning: --insecure: the server's certificate is not checked",
              file=sys.stderr)
    try:
        sock = connect(options.host, options.port, tls, options.cafile, options.insecure)
    except ConnectError as error:
        print(f"pyChat: {error}", file=sys.stderr)
        return 1
    painter = Painter(colour)
    editor = LineEditor()
    display = TerminalDisplay(sys.stdout, editor, painter) if interactive else PlainDisplay(sys.stdout)
    keyboard = windows_keyboard_socket(interactive) if os.name == "nt" else None
    client = ChatClient(Connection(sock), display, editor, painter, interactive=interactive,
                        nick=options.nick, password=options.password, bell=options.bell,
                        keyboard=keyboard)
    if not interactive:
        return client.run()
    with keyboard_mode(sys.stdin.fileno()):
        try:
            display.redraw()
            return client.run()
        finally:
            display.close()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
