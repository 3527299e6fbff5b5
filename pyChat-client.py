#!/usr/bin/env python3
"""pyChat terminal client.

Connects to a pyChat server and keeps what you are typing on the bottom row
of the terminal: messages scroll by in the rows above it (a scroll region),
each with a timestamp, wrapped at words under the start of their text, and
the input row is drawn again with the cursor where it was. Lines of rooms
other than the current one show their room; the prompt names the current
room and counts unread lines elsewhere. Everything sent is paced to the
server's flood limit; a lost connection is tried again. When standard input
is not a terminal, each input line is sent as a message and the client
leaves at the end of the input.

The file reads top to bottom: options and defaults; the protocol (what kind
of line the server sent, who is online, which rooms I am in); the terminal;
the line editor; rendering; the connection; the loop that ties the server and
the keyboard together; main() with the command line and the settings file.
"""
from __future__ import annotations

import argparse
import codecs
import collections
import configparser
import contextlib
import datetime
import math
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

VERSION = "3.0.0.dev0"
DEFAULT_HOST = "localhost"          # --host
DEFAULT_PORT = 25000                # --port
PASSWORD_ENVIRONMENT = "PYCHAT_PASSWORD"  # default for --password (the server's password)
ACCOUNT_PASSWORD_ENVIRONMENT = "PYCHAT_ACCOUNT_PASSWORD"  # default for --account-password
INVITATION_ENVIRONMENT = "PYCHAT_INVITATION_CODE"         # default for --invitation-code
CONNECT_TIMEOUT = 10.0              # seconds to reach the server (and finish TLS)
GREETING_TIMEOUT = 4.0              # seconds without a word from the server before asking whether it speaks TLS
PIPED_GREETING_TIMEOUT = 10.0       # piped: seconds to wait for a pyChat server's first line, then give up
QUIT_TIMEOUT = 5.0                  # seconds to wait for the server to close after /quit
ESCAPE_TIMEOUT = 0.05               # a lone ESC this old is the Esc key, not a sequence
HISTORY_SIZE = 500                  # sent lines remembered for Up/Down
READ_SIZE = 65536                   # bytes per read from the server or the keyboard
READS_PER_WAKE = 16                 # reads from the server before the keyboard gets a turn
MAX_LINE_BYTES = 16384              # a longer line from the server is dropped as it streams in
OUTGOING_BACKLOG = 1000             # piped lines read ahead of what the flood limit lets us send
PASTE_CONFIRM_LINES = 5             # a paste of more lines than this asks before it is sent
PASTE_LIMIT = 1_000_000             # characters of one paste; more is dropped, and the user told
PASTE_TAB_SIZE = 4                  # a pasted Tab becomes spaces up to the next multiple of this
PASTE_TIMEOUT = 1.0                 # a paste whose end marker has not come in this long is over
QUIT_AGAIN_SECONDS = 2.0            # Ctrl-C on an empty line twice within this leaves
READ_REPORT_INTERVAL = 2.0          # seconds between two /read of one room or conversation
PRESENT_AFTER_TYPING = 300.0        # without focus reports: typed this recently = at the terminal
RECONNECT_DELAYS = (1, 2, 4, 8, 15, 30, 60)   # seconds before each try, the last one repeating

# The commands of a pyChat server of this version, for Tab; names seen in /help replies are added.
STANDARD_COMMANDS = (
    "help", "online", "quit", "nick", "msg", "w", "reply", "me", "join",
    "leave", "part", "rooms", "who", "names", "away", "back", "ignore", "unignore",
    "op", "kick", "mute", "unmute", "topic", "invite", "mode", "disconnect",
    "history", "sessions", "kick-session",
)

# ---------------------------------------------------------------------------
# The protocol: kinds of server lines, sign-in prompts, who is online
# ---------------------------------------------------------------------------

CHAT, ACTION, NOTICE, REPLY, ERROR, PRIVATE, HISTORY, OFFLINE, READ = (
    "chat", "action", "notice", "reply", "error", "private", "history", "offline", "read")

PASSWORD_PROMPT = "*** Password:"
NICKNAME_PROMPT = "*** Choose a nickname:"
# Before the welcome, every "*** ...:" line is a prompt, and all but the nickname one ask for a secret.
SIGN_IN_PROMPT = re.compile(r"\*\*\* (\S.*):$")
ACCOUNT_PROMPT = re.compile(r"\*\*\* (?:Password|Choose a password) for \S+:$")
INVITATION_PROMPT = re.compile(r"\*\*\* Invitation code for \S+:$")
# Lines that carry a secret: never kept for Up/Down, masked wherever the client shows them.
SECRET_COMMANDS = ("/register", "/passwd", "/unregister", "/op")
SECRET_MASK = "********"
# The replies that confirm /register PASSWORD and /passwd OLD NEW: the new password is the account's.
REGISTERED = "-- Registered "       # the reply to /register: from now on, I am signed in to an account
PASSWORD_CONFIRMED = (REGISTERED, "-- Password changed.")
FAREWELL = "*** Bye."
# A line that only an IRC server sends: ":server NOTICE * :...", ":server 451 ...", "PING :...".
IRC_MESSAGE = re.compile(r"(?:@\S+ )?:\S+ (?:[A-Za-z]+|\d{3}) |(?:NOTICE|PING|ERROR) \S")

WELCOME = re.compile(r"\*\*\* Welcome, ([^\s!]+)!")
JOINED = re.compile(r"\*\*\* (\S+) joined #\S+$")
QUIT = re.compile(r"\*\*\* (\S+) quit(?: \(.*\))?$")
RENAMED = re.compile(r"\*\*\* (\S+) is now known as (\S+)$")
ONLINE = re.compile(r"-- \d+ online: (.*)$")
ONLINE_DETAILS = re.compile(r" \([^)]*\)")   # "(#lobby, away)" after a nickname in /online
HELP_ENTRY = re.compile(r"-- /([^\s/]+)")
TOPIC_NOTICE = re.compile(r"\*\*\* (Topic\b|\S+ (set|changed|cleared) the topic\b)")
HISTORY_PREFIX = re.compile(r"\[history (\S+)\] ")
OFFLINE_PREFIX = re.compile(r"\[offline (\S+) from ([^\]\s]+)\] ")
OFFLINE_NOTICE = re.compile(r"\*\*\* (?:\d+ messages? (?:was|were) left for you while you were away:"
                            r"|End of messages left for you\.)$")
# "[read #dev]", "[read bob]": one of my sessions has read everything up to now there; never shown.
READ_MARKER = re.compile(r"\[read (#[^\s\]]+|[^\s\]#]+)\]$")
# The head of a room's or a conversation's catch-up at sign-in; its time is shown in my time zone.
CATCH_UP = re.compile(r"\*\*\* \d+ new (?:in #[^\s,;]+|with [^\s,;]+) since (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")
UNKNOWN_READ_COMMAND = re.compile(r"!! Unknown command /read\b", re.IGNORECASE)   # a server without /read
FLOOD_LIMIT = re.compile(r"Flood limit: (\d{1,6}) lines at once, then (\d{1,6}(?:\.\d{1,6})?) a second")
PRIVATE_PREFIX = re.compile(r"\[pm (from|to) ([^\]\s]+)\] ")
CHAT_PREFIX = re.compile(r"([^\s:]+): ")
HELP_COLUMNS = re.compile(r"(-- /\S.*?)( {2,})(\S.*)$")   # a /help row: usage, padding, summary

# Rooms (see "The rooms wire protocol" in the README). ROOM never holds spaces or commas.
ROOM_TAG = re.compile(r"#([^\s#]+) ")        # a line from a room other than the current one
ENTERED_ROOM = re.compile(r"\*\*\* You are in #([^\s,]+?)(?:,| with |\.?$)")
NOW_TALKING = re.compile(r"\*\*\* Now talking in #([^\s,]+?)\.?$")
LEFT_ROOM = re.compile(r"\*\*\* You left #([^\s,]+?)\.?$")
KICKED_FROM_ROOM = re.compile(r"\*\*\* You were kicked from #([^\s,]+?)(?: by |:|\.?$)")
# The server put me out on purpose (an operator, a ban, a limit I broke, or my account signed in
# elsewhere, which coming back would take from that other connection): no coming back by myself.
PUT_OUT = re.compile(r"\*\*\* You were (?P<how>kicked|disconnected|banned) by (?P<by>.+?)\.?$"
                     r"|!! Disconnected: (?P<why>.+?)\.?$|!! (?P<door>You are banned from this server .+?)\.?$"
                     r"|\*\*\* (?P<elsewhere>You signed in again somewhere else); this connection is closed\.$")
ROOM_MENTION = re.compile(r"(?<![\w#])#([^\s,.:;()!?#]+)")
ROOM_COMMANDS = ("/join", "/leave", "/part", "/who", "/names", "/topic", "/invite", "/rooms")

# C0 and C1 controls (a tab is turned into a space first), line and paragraph
# separators, and the marks that reorder bidirectional text.
UNSAFE_CHARACTERS = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def put_out_reason(line: str) -> str:
    """Why the server put me out on purpose, if this line says it did ("by bob: enough"); else ""."""
    match = PUT_OUT.match(line)
    if not match:
        return ""
    if match["by"]:
        return ("banned " if match["how"] == "banned" else "") + f"by {match['by']}"
    return match["why"] or match["door"] or match["elsewhere"].lower()


def sanitize(line: str) -> str:
    """Remove what could move the cursor, change colours or reorder text."""
    return UNSAFE_CHARACTERS.sub("", line.replace("\t", " "))


def carries_secret(line: str) -> bool:
    """Whether a typed line is a command whose arguments are a secret (/register PASSWORD...).

    A line that starts with a space is said, never a command, so it is no secret.
    """
    return line.startswith("/") and line.split(None, 1)[0].lower() in SECRET_COMMANDS


def masked(line: str) -> str:
    """A typed line as it may be shown: the arguments of a secret command hidden."""
    if not carries_secret(line):
        return line
    words = line.split(None, 1)
    return words[0] + (" " + SECRET_MASK if len(words) > 1 else "")


class Question(NamedTuple):
    """A sign-in prompt: what it asks (for the input row), which given answer fits, and whether it is a secret."""

    label: str       # "nickname", "password", "password for alice", "invitation code for dave"...
    answer: str      # the key of the answer that fits in ChatClient.answers ("" when none can)
    secret: bool


def sign_in_question(line: str) -> Optional[Question]:
    """The question a line before the welcome asks, or None if it is not a prompt."""
    if line == NICKNAME_PROMPT:
        return Question("nickname", "nickname", False)
    match = SIGN_IN_PROMPT.match(line)
    if not match:
        return None
    asked = match.group(1)
    if line == PASSWORD_PROMPT:
        answer = "server password"
    elif ACCOUNT_PROMPT.match(line):
        answer = "account password"
    elif INVITATION_PROMPT.match(line):
        answer = "invitation code"
    else:
        answer = ""
    return Question(asked[:1].lower() + asked[1:], answer, True)


def utc_time(text: str) -> Optional[datetime.datetime]:
    """A time the server wrote as 2026-11-26T17:04:51Z, or None if it is not one."""
    try:
        when = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    return when.replace(tzinfo=datetime.timezone.utc)


@dataclass
class Message:
    """One server line and what kind it is (see the README's table)."""

    kind: str
    text: str                 # the whole line
    nick: str = ""            # who spoke (chat, action, private, history)
    body: str = ""            # what they said, or the text after the marker (read: "#dev" or "bob")
    outgoing: bool = False    # private: the copy of one you sent
    time: Optional[datetime.datetime] = None  # history: when it was said; offline: when it was left
    said: Optional["Message"] = None  # history: the original chat or action line
    room: str = ""            # the room of a tagged line (one not from the current room)


def classify(line: str) -> Message:
    """Tell what kind of line the server sent, and pick out its parts (text is without a room tag)."""
    match = ROOM_TAG.match(line)
    if match:
        message = classify_untagged(line[match.end():])
        message.room = match.group(1)
        return message
    return classify_untagged(line)


def classify_untagged(line: str) -> Message:
    """The kind and parts of a line that carries no room tag."""
    if line.startswith("[history "):
        match = HISTORY_PREFIX.match(line)
        if match:
            said = classify_untagged(line[match.end():])
            return Message(HISTORY, line, said.nick, said.body, time=utc_time(match.group(1)), said=said)
    if line.startswith("[read "):
        match = READ_MARKER.match(line)
        if match:
            return Message(READ, line, body=match.group(1))
    if line.startswith("[offline "):
        match = OFFLINE_PREFIX.match(line)
        if match:
            return Message(OFFLINE, line, match.group(2), line[match.end():], time=utc_time(match.group(1)))
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


def flood_limit(line: str) -> Optional[tuple[int, float]]:
    """The burst and rate a greeting announces, or None if it announces none that makes sense.

    A server could say anything here; a rate of zero or a burst of zero would
    stall the client, so only positive figures count, kept within reason.
    """
    match = FLOOD_LIMIT.search(line)
    if not match:
        return None
    burst, rate = int(match.group(1)), float(match.group(2))
    if burst < 1 or rate <= 0:
        return None
    return min(burst, 1000), min(max(rate, 0.2), 1000.0)


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
                for nick in ONLINE_DETAILS.sub("", match.group(1)).split(", "):
                    self.add(nick.strip())
            match = HELP_ENTRY.match(line)
            if match:
                self.commands.add(match.group(1).lower())

    def others(self, me: str) -> list[str]:
        """Nicknames online other than me, sorted."""
        return sorted((nick for key, nick in self.nicknames.items() if key != me.casefold()),
                      key=str.casefold)


class Rooms:
    """The rooms I am in, which one is current, unread lines in the others, and room names seen.

    The current room changes only when the server says so ("You are in",
    "Now talking in"), never when /join is sent: lines already on their way
    belong to the room that was current when the server queued them. The
    same lines tagged with their room ("#dev *** You are in #dev ...") come
    when another session of my account enters or leaves a room: the room is
    added or removed, and my current room stays.
    """

    def __init__(self) -> None:
        self.joined: list[str] = []        # as the server spells them, in the order I entered
        self.current = ""
        self.unread: dict[str, int] = {}   # casefolded room -> chat and action lines not seen there
        self.mentioned: set[str] = set()   # casefolded rooms where someone named me
        self.seen: dict[str, str] = {}     # every room name met, for Tab: casefolded -> as written
        self.keys: dict[str, str] = {}     # keys given with /join, to come back after a reconnect

    def _index(self, room: str) -> int:
        keys = [name.casefold() for name in self.joined]
        return keys.index(room.casefold()) if room.casefold() in keys else -1

    def __contains__(self, room: str) -> bool:
        """Whether I am in room."""
        return self._index(room) >= 0

    def enter(self, room: str) -> None:
        """The server made room current (adding it to mine if I was not in it)."""
        self.add(room)
        self.current = room
        self.read(room)

    def add(self, room: str) -> None:
        """I am in room too (another session of mine entered it); the current room stays."""
        if self._index(room) < 0:
            self.joined.append(room)
        self.see(room)

    def read(self, room: str) -> None:
        """Everything in room has been seen, here or on another session of mine."""
        self.unread.pop(room.casefold(), None)
        self.mentioned.discard(room.casefold())

    def leave(self, room: str) -> None:
        """I am no longer in room."""
        index = self._index(room)
        if index >= 0:
            del self.joined[index]
        self.unread.pop(room.casefold(), None)
        self.mentioned.discard(room.casefold())
        self.keys.pop(room.casefold(), None)

    def see(self, room: str) -> None:
        """Remember a room name for Tab completion."""
        self.seen.setdefault(room.casefold(), room)

    def learn(self, message: Message, mentioned: bool, me: str = "") -> bool:
        """Follow one server line; returns whether the current room or the activity changed.

        My own lines in another room (said with /msg #ROOM) are not unread.
        """
        if message.kind == READ:
            if message.body.startswith("#"):
                self.read(message.body[1:])
                return True
            return False
        if message.room:
            self.see(message.room)
            if (message.kind in (CHAT, ACTION) and message.room.casefold() != self.current.casefold()
                    and message.nick.casefold() != me.casefold()):
                key = message.room.casefold()
                self.unread[key] = self.unread.get(key, 0) + 1
                if mentioned:
                    self.mentioned.add(key)
                return True
            if message.kind == NOTICE:   # another session of mine entered or left a room
                entered = ENTERED_ROOM.match(message.text)
                if entered:
                    self.add(entered.group(1))
                    return True
                return self._left(message.text)
            return False
        if message.kind not in (NOTICE, REPLY):
            return False
        for room in ROOM_MENTION.findall(message.text):
            self.see(room)
        for pattern in (ENTERED_ROOM, NOW_TALKING):
            match = pattern.match(message.text)
            if match:
                self.enter(match.group(1))
                return True
        return self._left(message.text)

    def _left(self, line: str) -> bool:
        """Follow "You left #ROOM" and "You were kicked from #ROOM"; whether it was one of them."""
        for pattern in (LEFT_ROOM, KICKED_FROM_ROOM):
            match = pattern.match(line)
            if match:
                self.leave(match.group(1))
                return True
        return False

    def neighbour(self, step: int) -> Optional[str]:
        """The room step places after the current one in my list, going round; None if I am in one."""
        if len(self.joined) < 2:
            return None
        index = max(self._index(self.current), 0)
        return self.joined[(index + step) % len(self.joined)]

    def numbered(self, number: int) -> Optional[str]:
        """My room number `number` (from 1), as Alt-1..9 pick them."""
        return self.joined[number - 1] if 0 < number <= len(self.joined) else None

    def activity(self) -> list[tuple[str, int, bool]]:
        """(room, unread lines, mentioned) for each of my rooms with unread lines, in my order."""
        return [(room, self.unread[room.casefold()], room.casefold() in self.mentioned)
                for room in self.joined if self.unread.get(room.casefold())]

    def names(self) -> list[str]:
        """Every room name known, mine first, for Tab completion."""
        mine = {room.casefold() for room in self.joined}
        return self.joined + sorted((name for key, name in self.seen.items() if key not in mine),
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


class Presence:
    """Whether the person is at the terminal, for what counts as read.

    Where the terminal reports focus (it has sent one report), they are
    while it has the focus; where it never does, while they typed something
    in the last PRESENT_AFTER_TYPING seconds (starting the client counts).
    """

    def __init__(self, now: float) -> None:
        self.focus: Optional[bool] = None   # None until the terminal reports it
        self.typed_at = now

    def at_terminal(self, now: float) -> bool:
        """Whether the person is at the terminal now."""
        if self.focus is not None:
            return self.focus
        return now - self.typed_at < PRESENT_AFTER_TYPING

    def typed(self, now: float) -> bool:
        """A key was pressed; returns whether that brought the person back."""
        back = self.focus is None and not self.at_terminal(now)
        self.typed_at = now
        return back

    def focus_changed(self, focus: bool, now: float) -> bool:
        """The terminal gained or lost the focus; returns whether that brought the person back."""
        back = focus and not self.at_terminal(now)
        self.focus = focus
        return back


class ReadReports:
    """Which rooms and conversations to report as read (/read #ROOM, /read NICK), and when.

    A target is reported when one of its lines is shown to a person at the
    terminal (a line of the current room, a private message) or when it
    becomes the current room, and only if something of it was shown since
    its last report; at most once per READ_REPORT_INTERVAL. What was shown
    while the person was away is reported when they come back (the current
    room and private conversations; another room is read by switching to it).
    The server reads a target up to its newest line, so a line shown and not
    read (while away, or in a room that is no longer current) withdraws a
    report still waiting, which would take that line with it.
    Targets are kept casefolded: "#dev" and "#Dev" are one.
    """

    def __init__(self) -> None:
        self.news: set[str] = set()          # targets with lines shown since their last report
        self.due: dict[str, str] = {}        # to report as soon as the interval allows: key -> as written
        self.away: dict[str, str] = {}       # read-worthy while the person was away
        self.sent_at: dict[str, float] = {}  # key -> when it was last reported

    def shown(self, target: str, reads_it: bool, present: bool) -> None:
        """A line of target was shown; reads_it: a line of the current room or a private message."""
        key = target.casefold()
        self.news.add(key)
        if reads_it and present:
            self.due[key] = target
            return
        self.due.pop(key, None)
        if reads_it:
            self.away[key] = target

    def switched(self, room: str, present: bool) -> None:
        """room ("#dev") became current: switching to a room reads it."""
        key = room.casefold()
        if key in self.news:
            (self.due if present else self.away)[key] = room

    def came_back(self, current_room: str) -> None:
        """The person is at the terminal again: what was shown meanwhile in the current room
        and in private conversations is read."""
        for key, target in self.away.items():
            if key == current_room.casefold() or not key.startswith("#"):
                self.due[key] = target
        self.away.clear()

    def _allowed_at(self, key: str) -> float:
        return self.sent_at.get(key, -math.inf) + READ_REPORT_INTERVAL

    def next_due(self) -> Optional[float]:
        """When the soonest due report may go (monotonic seconds), or None if none is due."""
        return min((self._allowed_at(key) for key in self.due), default=None)

    def ready(self, now: float) -> list[str]:
        """The targets whose report may go now, as written."""
        return [target for key, target in self.due.items() if now >= self._allowed_at(key)]

    def reported(self, target: str, now: float) -> None:
        """A report of target went to the server."""
        key = target.casefold()
        self.due.pop(key, None)
        self.away.pop(key, None)
        self.news.discard(key)
        self.sent_at[key] = now

    def drop(self, target: str) -> None:
        """Report nothing more of target: I left that room (the server would refuse the report)."""
        key = target.casefold()
        self.due.pop(key, None)
        self.away.pop(key, None)
        self.news.discard(key)

    def forget(self) -> None:
        """The connection is gone: a new one has read positions of its own to start from."""
        self.news.clear()
        self.due.clear()
        self.away.clear()
        self.sent_at.clear()


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
    """One key press: an editing key by name, or text to insert, or a paste."""

    name: str
    text: str = ""


CONTROL_KEYS = {
    "\r": "enter", "\n": "enter", "\t": "tab", "\x7f": "backspace", "\x08": "backspace",
    "\x01": "home", "\x05": "end", "\x02": "left", "\x06": "right",
    "\x10": "previous-room", "\x0e": "next-room", "\x04": "ctrl-d", "\x03": "ctrl-c",
    "\x0b": "kill-to-end", "\x15": "kill-to-start", "\x17": "kill-word", "\x0c": "refresh",
}
# The final character of ESC [ ... or ESC O sequences; "~" ones go by number.
SEQUENCE_KEYS = {"A": "up", "B": "down", "C": "right", "D": "left", "H": "home", "F": "end"}
TILDE_KEYS = {"1": "home", "7": "home", "4": "end", "8": "end", "3": "delete"}
ESC = "\x1b"
# Bracketed paste: the terminal wraps pasted text in these, so it is text, not keys.
PASTE_ON, PASTE_OFF = "\x1b[?2004h", "\x1b[?2004l"
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"
# Focus reporting: the terminal then sends ESC [ I when it gains the focus and ESC [ O when it loses it.
FOCUS_ON, FOCUS_OFF = "\x1b[?1004h", "\x1b[?1004l"
FOCUS_KEYS = {"I": "focus-in", "O": "focus-out"}


class KeyDecoder:
    """Turns keyboard bytes into keys.

    A read may end anywhere: inside a UTF-8 character, an escape sequence or
    a paste. The rest waits for the next read; a lone ESC is the Esc key
    once flush() is called after ESCAPE_TIMEOUT without more input. Pasted
    text comes out whole as one Key("paste", text), up to PASTE_LIMIT
    characters (the rest is counted in `paste_dropped`). The terminal's
    focus reports are keys too ("focus-in", "focus-out"), never text.
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._paste: Optional[list[str]] = None   # the paste so far, while inside one
        self._pasted = 0
        self.paste_dropped = 0

    @property
    def waiting(self) -> bool:
        """Whether an unfinished escape sequence is held back (not a paste: that waits for its end)."""
        return bool(self._pending) and self._paste is None

    @property
    def pasting(self) -> bool:
        """Whether a paste has started and not ended yet."""
        return self._paste is not None

    def feed(self, data: bytes) -> list[Key]:
        """Keys completed by these bytes."""
        return self._parse(self._pending + self._utf8.decode(data))

    def flush(self) -> list[Key]:
        """Give up waiting: the held-back ESC was the Esc key; a paste that never ended ends now."""
        if self._paste is not None:
            self._add_to_paste(self._pending)
            self._pending = ""
            return [self._end_paste()]
        rest, self._pending = self._pending[1:], ""
        return [Key("escape")] + self._parse(rest)

    def _add_to_paste(self, chars: str) -> None:
        room = max(0, PASTE_LIMIT - self._pasted)
        self._paste.append(chars[:room])
        self._pasted += min(room, len(chars))
        self.paste_dropped += max(0, len(chars) - room)

    def _end_paste(self) -> Key:
        text = "".join(self._paste)
        self._paste, self._pasted = None, 0
        return Key("paste", text)

    def _parse(self, chars: str) -> list[Key]:
        keys: list[Key] = []
        text: list[str] = []

        def end_text() -> None:
            if text:
                keys.append(Key("text", "".join(text)))
                text.clear()

        def emit(key: Key) -> None:
            end_text()
            keys.append(key)

        self._pending = ""
        index = 0
        while index < len(chars):
            if self._paste is not None:
                end = chars.find(PASTE_END, index)
                if end < 0:
                    # Keep a tail that could be the start of the end marker.
                    keep = next((n for n in range(len(PASTE_END) - 1, 0, -1)
                                 if chars.endswith(PASTE_END[:n])), 0)
                    self._add_to_paste(chars[index:len(chars) - keep])
                    self._pending = chars[len(chars) - keep:]
                    break
                self._add_to_paste(chars[index:end])
                emit(self._end_paste())
                index = end + len(PASTE_END)
                continue
            char = chars[index]
            if char == ESC:
                if chars.startswith(PASTE_START, index):
                    end_text()
                    self._paste = []
                    index += len(PASTE_START)
                    continue
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
        end_text()
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
        return 2, f"alt-{kind}" if kind in "123456789" else ""   # Alt+key: only Alt-digit is bound
    end = start + 2
    while end < len(chars) and "\x20" <= chars[end] <= "\x3f":
        end += 1
    if end >= len(chars):
        return 0, ""
    final, parameters = chars[end], chars[start + 2:end]
    if final == "~":
        return end + 1 - start, TILDE_KEYS.get(parameters.split(";")[0], "")
    if not parameters and final in FOCUS_KEYS:
        return end + 1 - start, FOCUS_KEYS[final]
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

    def remember(self, line: str) -> None:
        """Add a line to the history (not a blank one, nor the last one again, nor one with a secret)."""
        if line.strip() and not carries_secret(line) and (not self.history or self.history[-1] != line):
            self.history.append(line)
            del self.history[:-self.history_size]
        self._recalled = len(self.history)
        self._draft = ""

    def submit(self, remember: bool = True) -> str:
        """Enter: empty the line and return it, remembering it in history unless told not to."""
        line = self.text
        if remember:
            self.remember(line)
        self._recalled = len(self.history)
        self._draft = ""
        self.set_text("")
        self.scroll = 0
        return line

    def complete(self, commands: Iterable[str], nicknames: Iterable[str],
                 rooms: Iterable[str] = ()) -> list[str]:
        """Tab: complete the word before the cursor; returns the choices when there are several."""
        before = "".join(self.characters[:self.cursor])
        after = "".join(self.characters[self.cursor:])
        completed, choices = complete_word(before, commands, nicknames, rooms)
        self.set_text(completed + after, len(split_characters(completed)))
        return choices

    def shown_characters(self) -> list[str]:
        """The characters as drawn: after a secret command (/register, /passwd...), a * for each but spaces."""
        if not carries_secret(self.text):
            return self.characters
        command = len(split_characters(self.text.split(None, 1)[0]))
        return self.characters[:command] + [char if char.isspace() else "*"
                                            for char in self.characters[command:]]

    def view(self, columns: int) -> tuple[str, int]:
        """What fits in `columns` cells, and the cursor's cell in it.

        The line never wraps: it scrolls sideways just enough to keep the
        cursor in view, and one cell is always left for the cursor.
        """
        columns = max(columns, 2)
        characters = self.shown_characters()
        widths = [text_width(char) for char in characters]
        if self.cursor < self.scroll:   # left of the window: jump back, keeping some context
            self.scroll = self.cursor
            while self.scroll > 0 and sum(widths[self.scroll - 1:self.cursor]) <= columns // 3:
                self.scroll -= 1
        while sum(widths[self.scroll:self.cursor]) > columns - 1:
            self.scroll += 1
        while self.scroll > 0 and sum(widths[self.scroll - 1:]) <= columns - 1:
            self.scroll -= 1
        shown, used = [], 0
        for char, width in zip(characters[self.scroll:], widths[self.scroll:]):
            if used + width > columns:
                break
            shown.append(char)
            used += width
        return "".join(shown), sum(widths[self.scroll:self.cursor])


def complete_word(before: str, commands: Iterable[str], nicknames: Iterable[str],
                  rooms: Iterable[str] = ()) -> tuple[str, list[str]]:
    """Complete the last word of `before`: a /command, a #room, or a nickname.

    The first word is a command when it starts with "/"; a word that starts
    with "#", or the word after /join, /leave, /who and the like, is a room
    (rooms are given without their "#"); anything else is a nickname. One
    match is completed, followed by ": " for a nickname that starts the line
    (as IRC clients do) and " " otherwise. Several matches are completed as
    far as they agree and returned as choices. An empty word is left alone:
    its choices are every name that could be meant.
    """
    start = before.rfind(" ") + 1
    word, earlier = before[start:], before[:start].split()
    line_start = not earlier
    if line_start and word.startswith("/"):
        candidates, suffix = sorted({"/" + name for name in commands}), " "
    elif word.startswith("#") or (len(earlier) == 1 and earlier[0].lower() in ROOM_COMMANDS):
        candidates, suffix = sorted({"#" + room for room in rooms}, key=str.casefold), " "
        if word and not word.startswith("#"):
            word = "#" + word
            before = before[:start] + word
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
# Rendering: timestamps, colours, word wrapping, the screen
# ---------------------------------------------------------------------------

STYLES = {
    "time": "2", "notice": "36", "topic": "1;33", "reply": "32", "error": "1;31",
    "private": "1;35", "action": "3", "history": "2", "mention": "1;7", "local": "33",
    "prompt": "1", "room": "1;4", "activity": "1", "offline": "3;35",
}
# Nickname colours, from the terminal's 256-colour palette: each has a contrast of at least
# 3:1 on a black and on a white background, and none is near the hue of a style above
# (cyan notices, green replies, red errors, magenta private messages, yellow topics).
NICK_COLOURS = tuple(f"38;5;{number}" for number in
                     (166, 130, 94, 64, 29, 25, 33, 69, 62, 98, 135, 168, 162))
LOCAL_MARKER = "-!- "   # lines from the client itself, not from the server
STAMP_WIDTH = len("[00:00:00] ")


class Span(NamedTuple):
    """A piece of a shown line, all in one style (a name in STYLES, an SGR code, or "")."""

    text: str
    style: str = ""


class Rendered(NamedTuple):
    """A line as it will be shown: its spans, and the column its continuation rows start at.

    `narrow` is the same line laid out for a terminal too narrow for `indent`
    (a /help row gives up its table column), or None.
    """

    spans: list[Span]
    indent: int
    narrow: Optional["Rendered"] = None

    @property
    def plain(self) -> str:
        """The line without styles or wrapping."""
        return "".join(span.text for span in self.spans)


class Painter:
    """Styles as ANSI codes, or none when colour is off; gives each nickname its colour.

    A nickname's colour comes from a CRC of it, so it is the same in every
    run; when that colour is already worn by someone else seen in this
    session, the next free one is taken instead, so two people rarely share one.
    """

    def __init__(self, colour: bool) -> None:
        self.colour = colour
        self.worn: dict[str, str] = {}    # casefolded nickname -> its colour in this session

    def paint(self, text: str, style: str) -> str:
        """text in a style from STYLES, or an SGR code."""
        if not self.colour or not text or not style:
            return text
        return f"\x1b[{STYLES.get(style, style)}m{text}\x1b[0m"

    def nick_style(self, nick: str) -> str:
        """The colour of nick (the same for every case of it)."""
        key = nick.casefold()
        if key not in self.worn:
            taken = set(self.worn.values())
            first = NICK_COLOURS.index(nick_colour(nick))
            order = NICK_COLOURS[first:] + NICK_COLOURS[:first]
            self.worn[key] = next((colour for colour in order if colour not in taken), order[0])
        return self.worn[key]

    def forget(self, nick: str) -> None:
        """nick has gone: its colour is free for someone else."""
        self.worn.pop(nick.casefold(), None)


def nick_colour(nick: str) -> str:
    """The colour a nickname has when no one else is seen: a CRC of it, not Python's per-run hash()."""
    return NICK_COLOURS[zlib.crc32(nick.casefold().encode("utf-8")) % len(NICK_COLOURS)]


def local_time(when: datetime.datetime) -> datetime.datetime:
    """when in the local time zone, or as it is when that cannot be shown (year 9999 east of UTC)."""
    try:
        return when.astimezone()
    except (OverflowError, ValueError, OSError):
        return when


def render(message: Message, painter: Painter, me: str,
           now: Optional[datetime.datetime] = None) -> Rendered:
    """The line as shown: [HH:MM:SS], the room if it is not the current one, then the message."""
    when = now or datetime.datetime.now()
    if message.kind == HISTORY and message.time:
        when = local_time(message.time)
    head = [Span(when.strftime("[%H:%M:%S]"), "time"), Span(" ")]
    if message.room:
        head += [Span("#" + message.room, "room"), Span(" ")]
    width = sum(text_width(span.text) for span in head)
    body, offset = render_body(message, painter, me)
    narrow = None
    help_row = HELP_COLUMNS.match(message.text) if message.kind == REPLY else None
    if help_row:   # a /help row: the summary wraps under its column, or under the usage if narrow
        usage, padding, summary = help_row.groups()
        body = [Span(usage + padding + summary, "reply")]
        narrow = Rendered(head + [Span(usage + "  " + summary, "reply")], width + 3)
        offset = text_width(usage + padding)
    return Rendered(head + body, width + offset, narrow)


def render_body(message: Message, painter: Painter, me: str) -> tuple[list[Span], int]:
    """The message without its timestamp, and the column its text starts at."""
    kind, text = message.kind, message.text
    if kind == HISTORY:
        said = message.said or classify_untagged(text)
        if said.kind == PRIVATE:   # a private message of a catch-up: labelled as a live one
            label = private_label(said)
            return [Span(label, "private"), Span(" "), Span(said.body, "history")], text_width(label) + 1
        return [Span(said.text, "history")], said_offset(said)
    if kind == OFFLINE:   # apart from live private messages: who left it, and when (in my time zone)
        left = f", left {local_time(message.time):%Y-%m-%d %H:%M}" if message.time else ""
        label = f"[offline from {message.nick}{left}] "
        return [Span(label, "offline"), Span(message.body, "offline")], text_width(label)
    if kind == NOTICE:
        if OFFLINE_NOTICE.match(text):
            return [Span(text, "offline")], 4
        catch_up = CATCH_UP.match(text)
        when = utc_time(catch_up.group(1)) if catch_up else None
        if when:   # "*** 37 new in #dev since 2026-12-06 19:02 ...", in my time zone
            text = text[:catch_up.start(1)] + f"{local_time(when):%Y-%m-%d %H:%M}" + text[catch_up.end(1):]
        return [Span(text, "topic" if TOPIC_NOTICE.match(text) else "notice")], 4
    if kind in (REPLY, ERROR):
        return [Span(text, kind)], 3
    said = highlight(message.body, me if mentions(message, me) else "", kind)
    if kind == ACTION:
        spans = [Span("* ", "action"), Span(message.nick, painter.nick_style(message.nick)), Span(" ")]
    elif kind == PRIVATE:
        spans = [Span(private_label(message), "private"), Span(" ")]
    elif message.nick:
        spans = [Span(message.nick, painter.nick_style(message.nick)), Span(": ")]
    else:
        spans = []
    return spans + said, sum(text_width(span.text) for span in spans)


def private_label(message: Message) -> str:
    """"[pm from bob]" or "[pm to bob]"."""
    return f"[pm {'to' if message.outgoing else 'from'} {message.nick}]"


def said_offset(message: Message) -> int:
    """Where the text starts in a chat or action line (for the indent of a history line)."""
    if message.kind == ACTION:
        return text_width(f"* {message.nick} ")
    if message.kind == CHAT and message.nick:
        return text_width(message.nick) + 2
    return 0


def highlight(body: str, me: str, kind: str) -> list[Span]:
    """body in the style of its kind, with each mention of `me` (if any) standing out."""
    style = "action" if kind == ACTION else ""
    if not me:
        return [Span(body, style)]
    pieces = mention_pattern(me).split(body)
    names = mention_pattern(me).findall(body)
    spans = [Span(pieces[0], style)]
    for name, piece in zip(names, pieces[1:]):
        spans += [Span(name, "mention"), Span(piece, style)]
    return [span for span in spans if span.text]


def render_local(text: str, now: Optional[datetime.datetime] = None) -> Rendered:
    """A line from the client itself (completions, warnings), timestamped like the rest."""
    stamp = (now or datetime.datetime.now()).strftime("[%H:%M:%S]")
    return Rendered([Span(stamp, "time"), Span(" "), Span(LOCAL_MARKER + text, "local")],
                    STAMP_WIDTH + len(LOCAL_MARKER))


def history_day(message: Message) -> Optional[datetime.date]:
    """The day a history line was said, in my time zone; None for other lines."""
    if message.kind == HISTORY and message.time:
        return local_time(message.time).date()
    return None


def render_day(day: datetime.date) -> Rendered:
    """The line before history lines of another day than the line before them."""
    return Rendered([Span(f"--- {day:%A} {day.day} {day:%B %Y} ---", "time")], 4)


def wrap(spans: list[Span], width: int, indent: int) -> list[list[Span]]:
    """Break a line into rows of at most width cells, at spaces where it can.

    Every row after the first starts `indent` cells in (the caller adds the
    spaces), so a continuation can never be taken for a line of its own.
    Spaces where a row breaks are dropped; a word longer than a row is cut.
    """
    cells = [(char, span.style) for span in spans for char in split_characters(span.text)]
    rows: list[list[tuple[str, str]]] = [[]]
    used, capacity = 0, width
    index = 0
    while index < len(cells):
        space = cells[index][0] == " "
        end = index
        while end < len(cells) and (cells[end][0] == " ") == space:
            end += 1
        token, index = cells[index:end], end
        token_width = sum(char_width(char) for char, _ in token)
        if space:
            if used + token_width <= capacity and (used or len(rows) == 1):
                rows[-1] += token
                used += token_width
            elif used:
                rows.append([])
                used, capacity = 0, width - indent
            continue
        if used and used + token_width > capacity and token_width <= width - indent:
            rows.append([])
            used, capacity = 0, width - indent
        for cell in token:
            cell_width = char_width(cell[0])
            if used and used + cell_width > capacity:
                rows.append([])
                used, capacity = 0, width - indent
            rows[-1].append(cell)
            used += cell_width
    result = []
    for row in rows:
        while row and row[-1][0] == " ":
            row.pop()
        spans_of_row: list[Span] = []
        for char, style in row:
            if spans_of_row and spans_of_row[-1].style == style:
                spans_of_row[-1] = Span(spans_of_row[-1].text + char, style)
            else:
                spans_of_row.append(Span(char, style))
        result.append(spans_of_row)
    return result


def layout(rendered: Rendered, width: int, painter: Painter) -> list[str]:
    """The rows a line takes on a terminal `width` cells wide, painted.

    The continuation rows hang under the start of the text (after the
    nickname, or under the /help summary column) when that leaves room
    enough to read; else under the end of the timestamp; else two cells in.
    """
    width = max(width, 8)
    least_text = min(20, width // 2)
    if rendered.narrow and rendered.indent > width - least_text:
        rendered = rendered.narrow
    indent = next(column for column in (rendered.indent, STAMP_WIDTH, 2)
                  if 0 < column <= width - least_text or column == 2)
    rows = wrap(rendered.spans, width, indent)
    return [(" " * indent if number else "") + "".join(painter.paint(span.text, span.style) for span in row)
            for number, row in enumerate(rows)]


class TerminalDisplay:
    """The screen of an interactive session: messages scroll up, the input stays on the bottom row.

    The rows above the bottom one are a scroll region, so a message printed
    at its foot moves only them up; the input row never moves. The last
    RECENT_LINES lines are kept, so that Ctrl-L and a resize can draw them
    again, wrapped for the new width.
    """

    RECENT_LINES = 500

    def __init__(self, out: TextIO, editor: LineEditor, painter: Painter, focus_report: bool = True) -> None:
        self.out = out
        self.editor = editor
        self.painter = painter
        # Turned on at start, off at close: bracketed paste, and focus reports unless --no-focus-report.
        self.modes_on = PASTE_ON + (FOCUS_ON if focus_report else "")
        self.modes_off = PASTE_OFF + (FOCUS_OFF if focus_report else "")
        self.prompts: list[list[Span]] = [[Span("> ")]]
        self.secret = False       # typing a password: show nothing of it
        self.recent: collections.deque[Rendered] = collections.deque(maxlen=self.RECENT_LINES)
        self.rows, self.cols = self.size()

    def size(self) -> tuple[int, int]:
        """The terminal's rows and columns now (it may have been resized)."""
        try:
            size = os.get_terminal_size(self.out.fileno())
            return max(size.lines, 2), max(size.columns, 2)
        except (OSError, ValueError):
            return 24, 80

    def start(self) -> None:
        """Take the screen: bracketed paste (and focus reports) on, the scroll region above the input row."""
        self.out.write(self.modes_on)
        self._set_region()
        self.out.write(f"\x1b[{self.rows - 1};1H")
        self.redraw()

    def _set_region(self) -> None:
        self.rows, self.cols = self.size()
        self.out.write(f"\x1b[1;{self.rows - 1}r")

    def set_prompt(self, prompts: list[list[Span]], secret: bool = False, draw: bool = True) -> None:
        """Change the text before the input line (the first of prompts that fits), and redraw."""
        self.prompts, self.secret = prompts or [[Span("> ")]], secret
        if draw:
            self.redraw()

    def show(self, rendered: Rendered, bell: bool = False) -> None:
        """Print a line at the foot of the scroll region, then draw the input row again."""
        self.recent.append(rendered)
        rows = layout(rendered, self.cols, self.painter)
        self.out.write(f"\x1b[{self.rows - 1};1H" + "".join("\n\r\x1b[K" + row for row in rows)
                       + ("\a" if bell else ""))
        self.redraw()

    def repaint(self) -> None:
        """Ctrl-L and resizes: clear the screen and draw the recent lines and the input row again."""
        self._set_region()
        rows: list[str] = []
        for rendered in reversed(self.recent):
            rows[:0] = layout(rendered, self.cols, self.painter)
            if len(rows) >= self.rows - 1:
                break
        rows = rows[-(self.rows - 1):]
        top = self.rows - len(rows)
        self.out.write("\x1b[2J" + "".join(f"\x1b[{top + number};1H{row}"
                                           for number, row in enumerate(rows)))
        self.redraw()

    def redraw(self) -> None:
        """Draw the prompt and the visible part of the input on the bottom row, cursor in place."""
        columns = self.cols
        prompt = next((spans for spans in self.prompts
                       if sum(text_width(span.text) for span in spans) <= columns // 2),
                      [Span("> ")])
        prompt_width = sum(text_width(span.text) for span in prompt)
        room = columns - prompt_width - 1   # the last column stays empty: no wrap
        shown, cursor = ("", 0) if self.secret else self.editor.view(room)
        painted = "".join(self.painter.paint(span.text, span.style or "prompt") for span in prompt)
        self.out.write(f"\x1b[{self.rows};1H\x1b[K" + painted + shown
                       + f"\x1b[{self.rows};{prompt_width + cursor + 1}H")
        self.out.flush()

    def close(self) -> None:
        """Give the screen back: no scroll region, no bracketed paste nor focus reports, the cursor on an
        empty bottom row."""
        self.out.write(f"\x1b[r\x1b[{self.rows};1H\x1b[K" + self.modes_off)
        self.out.flush()


class PlainDisplay:
    """Output when input is piped: one line per message, no input line to redraw."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def set_prompt(self, prompts: list[list[Span]], secret: bool = False, draw: bool = True) -> None:
        """There is no input line to label."""

    def show(self, rendered: Rendered, bell: bool = False) -> None:
        """Print the line."""
        self.out.write(rendered.plain + "\n")
        self.out.flush()

    def redraw(self) -> None:
        """There is no input line to draw."""


# ---------------------------------------------------------------------------
# The connection and the loop
# ---------------------------------------------------------------------------

class ConnectError(Exception):
    """The server could not be reached; the message says why, in one line."""


class OptionError(Exception):
    """An option or setting cannot be used; the message says which and why, in one line."""


def tls_context(cafile: Optional[str], insecure: bool) -> ssl.SSLContext:
    """The TLS settings for a connection: the system's authorities, or the one in cafile as it is now."""
    context = ssl.create_default_context()
    if cafile:
        try:
            context.load_verify_locations(cafile=cafile)
        except FileNotFoundError:
            raise OptionError(f"--cafile {cafile}: no such file") from None
        except IsADirectoryError:
            raise OptionError(f"--cafile {cafile}: is a directory, not a certificate file") from None
        except PermissionError:
            raise OptionError(f"--cafile {cafile}: cannot be read (permission denied)") from None
        except (ssl.SSLError, ValueError, OSError):
            raise OptionError(f"--cafile {cafile}: holds no PEM certificate "
                              "(it should start with -----BEGIN CERTIFICATE-----)") from None
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# What OpenSSL says when the other end answers a TLS hello with something else.
NOT_TLS_REASONS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                   "HTTP_REQUEST", "UNKNOWN_PROTOCOL")


def connect(host: str, port: int, tls: Optional[ssl.SSLContext]) -> socket.socket:
    """Open the connection (over TLS when given its settings), as a non-blocking socket."""
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except socket.gaierror as error:
        raise ConnectError(f"unknown host {host}: {error.strerror}") from None
    except OSError as error:
        raise ConnectError(f"cannot connect to {host}:{port}: "
                           f"{error.strerror or error or 'timed out'}") from None
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError as error:
            sock.close()
            raise ConnectError(f"cannot trust {host}:{port}: {error.verify_message} "
                               "(see --cafile and --insecure)") from None
        except ssl.SSLError as error:
            sock.close()
            if error.reason in NOT_TLS_REASONS:
                raise ConnectError(f"{host}:{port} does not speak TLS: it answered in plain "
                                   "text (try without --tls)") from None
            raise ConnectError(f"TLS with {host}:{port} failed: {error.reason or error}") from None
        except OSError as error:
            sock.close()
            raise ConnectError(f"TLS with {host}:{port} failed: "
                               f"{error.strerror or error or 'the server closed the connection'}") from None
    sock.setblocking(False)
    return sock


def speaks_tls(host: str, port: int) -> bool:
    """Whether host:port answers a TLS hello as a TLS server does (on a connection of its own).

    Only the handshake counts, so the certificate is not checked; a server
    that refuses the hello with a TLS alert speaks TLS too.
    """
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=GREETING_TIMEOUT) as sock:
            probe.wrap_socket(sock, server_hostname=host).close()
    except ssl.SSLError as error:
        return "ALERT" in (error.reason or "")
    except OSError:
        return False
    return True


WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Connection:
    """The server socket and its buffers: lines out, lines in.

    A line from the server is at most MAX_LINE_BYTES: a longer one is dropped
    as it streams in, never held whole, and counted in `dropped`.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbox = bytearray()   # the start of a line whose newline has not come yet
        self.outbox = bytearray()
        self.closed = False
        self.more = False          # receive() stopped before the socket was empty
        self.discarding = False    # inside a line that is too long: drop up to its newline
        self.dropped = 0           # lines dropped as too long, not yet reported

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
        lines: list[bytes] = []
        self.more = False
        for _ in range(READS_PER_WAKE):
            try:
                data = self.sock.recv(READ_SIZE)
            except WOULD_BLOCK:
                break
            except OSError:
                data = b""
            if not data:
                self.closed = True
                if self.inbox and not self.discarding:
                    lines.append(bytes(self.inbox))
                self.inbox.clear()
                break
            self._split(data, lines)
        else:
            self.more = True
        return [line.decode("utf-8", "replace").rstrip("\r") for line in lines]

    def _split(self, data: bytes, lines: list[bytes]) -> None:
        start = 0
        while True:
            newline = data.find(b"\n", start)
            piece = data[start:] if newline < 0 else data[start:newline]
            if self.discarding:
                self.discarding = newline < 0
            elif len(self.inbox) + len(piece) > MAX_LINE_BYTES:
                self.inbox.clear()
                self.dropped += 1
                self.discarding = newline < 0
            elif newline < 0:
                self.inbox += piece
            else:
                lines.append(bytes(self.inbox + piece))
                self.inbox.clear()
            if newline < 0:
                return
            start = newline + 1

    def close(self) -> None:
        """Close the socket."""
        with contextlib.suppress(OSError):
            self.sock.close()


QUIT_COMMANDS = ("/quit", "/exit", "/bye")
# Where a sign-in answer can be given instead of typed: the option, and the variable it defaults to.
ANSWER_SOURCES = {
    "server password": ("--password", PASSWORD_ENVIRONMENT),
    "account password": ("--account-password", ACCOUNT_PASSWORD_ENVIRONMENT),
    "invitation code": ("--invitation-code", INVITATION_ENVIRONMENT),
}
# Prompts where an empty answer is an answer: the server goes back to asking for a nickname. (At the
# server password's prompt it would count as a wrong guess, so there an empty line is not sent.)
EMPTY_ANSWER_GOES_BACK = ("account password", "invitation code")


class PendingPaste(NamedTuple):
    """A paste of many lines, waiting for the user to say whether to send it."""

    lines: list[str]          # what would be sent
    typed: str                # the input line before the paste, given back on cancel
    typed_cursor: int
    rest: str                 # the input line after the paste (its last, unfinished line)
    rest_cursor: int


class ChatClient:
    """Ties the server, the keyboard (or piped input) and the screen together in one selectors loop.

    Everything sent after signing in goes through one queue, paced to the
    flood limit the server announced, so no typed, pasted or piped line is
    dropped as too fast. In a terminal, a lost connection is tried again
    with a growing delay; on return the client signs in with the same name
    and goes back to the rooms it was in, the current one last.
    """

    def __init__(self, connection: Connection, display: TerminalDisplay | PlainDisplay,
                 editor: LineEditor, painter: Painter, *,
                 interactive: bool, nick: Optional[str], password: Optional[str],
                 bell: bool, account_password: Optional[str] = None,
                 invitation_code: Optional[str] = None, keyboard: Optional[socket.socket] = None,
                 reconnect: Optional[Callable[[], socket.socket]] = None,
                 probe_tls: Optional[Callable[[], bool]] = None,
                 where: str = "the server", tls: bool = False, quiet: bool = False) -> None:
        self.connection: Optional[Connection] = connection
        self.display = display
        self.editor = editor
        self.painter = painter
        self.interactive = interactive
        # What answers the sign-in prompts without asking, by Question.answer; each goes once per
        # connection (a wrong one is asked for again), from `unused`. An account password typed at
        # its prompt joins them once it let me in, so that signing in again needs no one.
        self.answers: dict[str, Optional[str]] = {
            "nickname": nick, "server password": password,
            "account password": account_password, "invitation code": invitation_code}
        self.unused: dict[str, Optional[str]] = {}
        self.typed_answers: dict[str, str] = {}   # typed at this connection's prompts, by Question.answer
        self.new_account_password: Optional[str] = None   # sent with /register or /passwd, not yet confirmed
        self.bell = bell
        self.keyboard = keyboard          # the Windows seam, else standard input is read
        self.reconnect = reconnect        # opens a new socket to the same server, or None
        self.probe_tls = probe_tls        # whether the server's port speaks TLS, asked on a connection of its own
        self.where = where                # host:port, for messages
        self.tls = tls
        self.quiet = quiet                # show the server's errors only (piped, for a CI log)
        self.keys = KeyDecoder()
        self.keys_read_at = 0.0
        self.roster = Roster()
        self.rooms = Rooms()
        self.presence = Presence(time.monotonic())
        self.reads = ReadReports()
        self.reporting = interactive      # tell the server what the person has read (/read), for an account
        self.read_reported = False        # a /read went on this connection
        self.me = ""                      # my nickname once the server has welcomed me
        self.history_day: Optional[datetime.date] = None   # of the last line shown, if it was history
        self.online = False               # signed in on the present connection
        self.answering: Optional[Question] = None   # what the server asks, while it waits for my answer
        self.refusal = ""                 # the last error line while signing in
        self.asked_online = False         # /online sent on arrival; its reply is not shown
        self.heard = False                # the server has sent a line on this connection
        self.greeting_deadline = 0.0      # when to ask what a silent server is; 0 once heard or asked
        self.piped_greeting_deadline = 0.0   # piped: when a server that has not greeted is given up on
        self.put_out = ""                 # why the server put me out: then I do not come back
        self.outgoing: collections.deque[str] = collections.deque()   # to send, paced
        self.pacer: Optional[Pacer] = None   # the server's flood limit, from its greeting
        self.pending_paste: Optional[PendingPaste] = None
        self.quit_armed_until = 0.0       # a Ctrl-C on an empty line before this leaves
        self.piped_input = bytearray()
        self.piped_ended = False
        self.leaving = False              # /quit sent or Ctrl-D pressed: the server will close
        self.leave_deadline = 0.0
        self.rejoin: Optional[list[str]] = None    # my rooms when the connection was lost, current last
        self.rejoin_due = False           # signed in again: go back once the first room is entered
        self.account = False              # signed in to an account: the server keeps its rooms and what it read
        self.retries = 0
        self.retry_at = 0.0               # when to try to connect again; 0 when not waiting
        self.finished_work: collections.deque[tuple[Callable[[object], None], object]] = collections.deque()
        self.wake_reader, self.wake_writer = socket.socketpair()   # a thread's work is done
        self.exit_code: Optional[int] = None
        self.selector = selectors.SelectSelector() if os.name == "nt" else selectors.PollSelector()
        self.input_registered = False

    # -- the loop ----------------------------------------------------------

    def run(self) -> int:
        """Run until the server closes or the user leaves; returns the exit status."""
        signals = self._watch_signals() if self.interactive else None
        self.selector.register(self.wake_reader, selectors.EVENT_READ, self._on_work_done)
        self._attach(self.connection)
        if self.interactive:
            self._register_input()
        try:
            while self.exit_code is None:
                if self.connection:
                    mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.connection.outbox else 0)
                    self.selector.modify(self.connection.sock, mask, self._on_server)
                for key, events_mask in self.selector.select(self._timeout()):
                    if self.exit_code is None:
                        key.data(events_mask)
                if self.connection and self.connection.more and self.exit_code is None:
                    self._on_server(selectors.EVENT_READ)
                if self.exit_code is None:
                    self._on_time()
        finally:
            if signals:
                signals()
            self.selector.close()
            if self.connection:
                self.connection.close()
            self.wake_reader.close()
            self.wake_writer.close()
        return self.exit_code

    def _deadlines(self) -> Iterator[float]:
        if self.keys.waiting:
            yield self.keys_read_at + ESCAPE_TIMEOUT
        if self.keys.pasting:
            yield self.keys_read_at + PASTE_TIMEOUT
        if self.outgoing and self.online and self.pacer:
            yield time.monotonic() + self.pacer.wait()
        if self.leaving:
            yield self.leave_deadline
        if self.greeting_deadline and self.connection:
            yield self.greeting_deadline
        if self.piped_greeting_deadline and self.connection:
            yield self.piped_greeting_deadline
        if self.retry_at:
            yield self.retry_at
        due = self.reads.next_due() if self.reporting and self.online and not self.leaving else None
        if due is not None:
            yield max(due, time.monotonic() + (self.pacer.wait() if self.pacer else 0.0))

    def _timeout(self) -> Optional[float]:
        if self.connection and self.connection.more:
            return 0
        soonest = min(self._deadlines(), default=None)
        return None if soonest is None else max(0.0, soonest - time.monotonic())

    def _on_time(self) -> None:
        """What is due whether or not anything arrived: held keys, paced lines, timeouts, retries."""
        now = time.monotonic()
        if self.keys.waiting and now >= self.keys_read_at + ESCAPE_TIMEOUT:
            self._on_keys(self.keys.flush())
        if self.keys.pasting and now >= self.keys_read_at + PASTE_TIMEOUT:
            self._on_keys(self.keys.flush())
        self._send_queued()
        if self.leaving and self.exit_code is None and now > self.leave_deadline:
            self._finish("the server did not close the connection after /quit",
                         0 if self.interactive else 1)
        if self.greeting_deadline and self.connection and now >= self.greeting_deadline:
            self.greeting_deadline = 0
            self._on_no_greeting()
        if self.piped_greeting_deadline and self.connection and now >= self.piped_greeting_deadline:
            self._finish(f"no pyChat greeting from {self.where} within {PIPED_GREETING_TIMEOUT:g} s: "
                         "is it a pyChat server? (see --host, --port and --tls)", 1)
        if self.retry_at and now >= self.retry_at:
            self._try_again()

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
                    self.display.repaint()
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

    def _say(self, text: str) -> None:
        """A line from the client itself: on the screen, or on standard error when piped."""
        if self.interactive:
            self.display.show(render_local(text))
        else:
            print(f"pyChat: {text}", file=sys.stderr, flush=True)

    def _finish(self, reason: str, code: int) -> None:
        """Stop the loop; a reason is shown unless the user simply left, and so is what was not sent."""
        if reason:
            self._say(reason)
        if self.interactive:
            unsent = list(self.outgoing) + ([self.editor.text] if self.editor.text.strip()
                                            and not self.answering else [])
            if self.pending_paste:
                unsent += self.pending_paste.lines
            for line in unsent[:5]:
                self._say("not sent: " + masked(line))
            if len(unsent) > 5:
                self._say(f"not sent: {len(unsent) - 5} more lines")
        self.exit_code = code

    # -- the connection ----------------------------------------------------

    def _attach(self, connection: Connection) -> None:
        """Start talking on a new connection: the server will greet and ask who I am."""
        self.connection = connection
        self.selector.register(connection.sock, selectors.EVENT_READ, self._on_server)
        self.online = False
        self.answering, self.refusal = None, ""
        self.unused = dict(self.answers)
        self.typed_answers = {}
        self.pacer = None
        self.asked_online = False
        self.leaving = False
        self.heard = False
        self.reporting, self.read_reported = self.interactive, False
        self.account = False
        self.greeting_deadline = time.monotonic() + GREETING_TIMEOUT
        # In a terminal, the person waiting sees the hint and can leave; a CI job would hang.
        self.piped_greeting_deadline = 0.0 if self.interactive else time.monotonic() + PIPED_GREETING_TIMEOUT

    def _on_no_greeting(self) -> None:
        """The server has said nothing for GREETING_TIMEOUT: if its port speaks TLS, say so and leave.

        A TLS server waits for the client's hello, and the plain client for a
        greeting, so each would wait for the other until the server's sign-in
        timeout; a hello on a connection of its own asks without disturbing this one.
        """
        connection = self.connection

        def answered(tls: object) -> None:
            if self.connection is not connection or self.heard:
                return
            if tls is True:
                self._finish(f"{self.where} speaks TLS: add --tls (and --cafile FILE if its certificate "
                             "is your own)", 1)
            elif self.interactive:
                self._say(f"no greeting from {self.where} after {GREETING_TIMEOUT:g} s; "
                          "is it a pyChat port? (see --port)")

        if self.tls or self.probe_tls is None:
            answered(False)
        else:
            self._in_background("probe", self.probe_tls, answered)

    def _lost(self, why: str) -> None:
        """The connection ended: leave, or (in a terminal, once signed in) wait and try again."""
        connection, self.connection = self.connection, None
        self.selector.unregister(connection.sock)
        connection.close()
        if self.leaving:
            self.exit_code = 0
            return
        if not self.interactive or not self.me or self.put_out or self.reconnect is None:
            self._finish("disconnected: " + (self.put_out or why), 1)
            return
        if self.online or self.rejoin is None:
            self.rejoin = [room for room in self.rooms.joined
                           if room.casefold() != self.rooms.current.casefold()] + [self.rooms.current]
        self.online = False
        self.reads.forget()
        self._say(f"disconnected: {why}")
        self._wait_to_retry()

    def _wait_to_retry(self) -> None:
        delay = RECONNECT_DELAYS[min(self.retries, len(RECONNECT_DELAYS) - 1)]
        self.retries += 1
        self.retry_at = time.monotonic() + delay
        self._say(f"connecting again in {delay} s (Ctrl-C twice, Ctrl-D or /quit leaves; "
                  "what you type is kept)")
        self._update_prompt()

    def _in_background(self, name: str, work: Callable[[], object], then: Callable[[object], None]) -> None:
        """Run work() in a thread, so that keys still work while it takes its time; then the loop
        calls then() with what it returned, or with the exception it raised."""

        def run() -> None:
            try:
                result = work()
            except Exception as error:   # anything at all: the loop must hear back
                result = error
            self.finished_work.append((then, result))
            with contextlib.suppress(OSError):
                self.wake_writer.send(b".")

        threading.Thread(target=run, name=name, daemon=True).start()

    def _on_work_done(self, _mask: int) -> None:
        self.wake_reader.recv(64)
        while self.finished_work and self.exit_code is None:
            then, result = self.finished_work.popleft()
            then(result)

    def _try_again(self) -> None:
        """Connect again, in the background."""
        self.retry_at = 0.0
        self._in_background("connect", self.reconnect, self._on_attempt_done)

    def _on_attempt_done(self, result: object) -> None:
        if isinstance(result, Exception):
            # These two say why in words (an OptionError: a --cafile being replaced, say).
            words = isinstance(result, (ConnectError, OptionError))
            self._say(str(result) if words else f"cannot connect: {result}")
            self._wait_to_retry()
            return
        self.answers["nickname"] = self.me
        self.rooms.joined, self.rooms.current = [], ""
        self._attach(Connection(result))
        self._say(f"connected to {self.where} again; signing in as {self.me}")

    # -- the server --------------------------------------------------------

    def _on_server(self, mask: int) -> None:
        connection = self.connection
        if mask & selectors.EVENT_WRITE:
            connection.flush()
        if mask & selectors.EVENT_READ:
            for line in connection.receive():
                self.on_server_line(line)
                if self.exit_code is not None or self.connection is not connection:
                    return
            if connection.dropped:
                self._say(f"{connection.dropped} line(s) from the server over {MAX_LINE_BYTES} bytes "
                          "dropped")
                connection.dropped = 0
        if connection.closed and self.connection is connection:
            why = self.put_out or (self.refusal if self.refusal and not self.online
                                   else "the server closed the connection")
            self._lost(why)

    def on_server_line(self, raw: str) -> None:
        """Handle one line from the server: sign-in prompts, then messages to show."""
        self.heard = True
        self.greeting_deadline = 0
        if not self.online and IRC_MESSAGE.match(raw):
            self._finish(f"{self.where} is an IRC port: use an IRC client there, or the server's "
                         "pyChat port with this client", 1)
            return
        line = sanitize(raw)
        message = classify(line)
        if message.kind in (NOTICE, REPLY, ERROR):   # a pyChat server's line (a banner of another kind is not)
            self.piped_greeting_deadline = 0.0
        self.roster.learn(message)
        if message.kind == NOTICE:
            gone = QUIT.match(message.text) or RENAMED.match(message.text)
            if gone:
                self.painter.forget(gone.group(1))
        limit = flood_limit(line) if not self.online else None
        if limit:
            self.pacer = Pacer(*limit)
        if self.asked_online and ONLINE.match(line):
            self.asked_online = False
            if self.rejoin_due:   # the reply comes after what the server sends at sign-in: my rooms are back
                self._go_back_to_rooms()
            return
        question = sign_in_question(line.rstrip()) if not self.online else None
        if question:
            if question.answer in ("nickname", "account password"):   # the last name asked for is who I am
                self.account = question.answer == "account password"
            self._answer(question)
            return
        if not self.online:
            welcome = WELCOME.match(line)
            if welcome:
                self._signed_in(welcome.group(1))
            elif message.kind == ERROR:
                self.refusal = line
        else:
            renamed = RENAMED.match(line)
            if renamed and renamed.group(1).casefold() == self.me.casefold():
                self.me = renamed.group(2)
                self._update_prompt(draw=False)
            if line.startswith(REGISTERED):
                self.account = True
            if line.startswith(PASSWORD_CONFIRMED) and self.new_account_password:
                self.answers["account password"], self.new_account_password = self.new_account_password, None
        self.put_out = put_out_reason(line) or self.put_out
        mentioned = mentions(message, self.me)
        current_before, rooms_before = self.rooms.current, list(self.rooms.joined)
        if self.rooms.learn(message, mentioned, self.me) or message.room:
            if self.rejoin_due and self.rooms.current and not self.account:
                self._go_back_to_rooms()
            self._update_prompt(draw=False)
            for room in rooms_before:
                if room not in self.rooms:
                    self.reads.drop("#" + room)
        if line == FAREWELL:
            self.leaving = True
            self.leave_deadline = time.monotonic() + QUIT_TIMEOUT
        if message.kind == READ:
            return
        if self.read_reported and message.kind == ERROR and UNKNOWN_READ_COMMAND.match(line):
            self.reporting = False   # a server that keeps no read positions
            return
        if self.quiet and message.kind != ERROR:
            return
        ring = self.bell and (mentioned or (message.kind == PRIVATE and not message.outgoing))
        if self.interactive:   # the clock time of a history line of another day is not enough
            day = history_day(message)
            if day and day != (self.history_day or datetime.date.today()):
                self.display.show(render_day(day))
            self.history_day = day
        self.display.show(render(message, self.painter, self.me), bell=ring)
        if self.reporting and self.online and self.account:   # a guest's reading is not kept
            self._note_shown(message, current_before)

    def _note_shown(self, message: Message, current_before: str) -> None:
        """Note what the person was just shown, for the read positions (see ReadReports)."""
        present = self.presence.at_terminal(time.monotonic())
        current = self.rooms.current
        if current and current.casefold() != current_before.casefold():
            self.reads.switched("#" + current, present)
        said = message.said if message.kind == HISTORY and message.said else message
        if said.kind == PRIVATE:
            self.reads.shown(said.nick, True, present)
        elif said.kind in (CHAT, ACTION) and said.nick and (message.room or current):
            self.reads.shown("#" + (message.room or current), not message.room, present)

    def _report_reads(self) -> None:
        """Tell the server which rooms and conversations the person has read: after the lines
        they typed, and within the flood limit."""
        if not (self.reporting and self.online and self.connection) or self.leaving or self.outgoing:
            return
        now = time.monotonic()
        for target in self.reads.ready(now):
            if self.pacer and not self.pacer.take():
                return
            self.reads.reported(target, now)
            self.read_reported = True
            self._send_now(f"/read {target}")

    def _answer(self, question: Question) -> None:
        """The server asks a sign-in question: answer from the options (once), else ask the user."""
        given = self.unused.pop(question.answer, None)
        if given:
            self._send_now(given)
            return
        if not self.interactive:
            if self.refusal:
                reason = f"{question.label} refused: {self.refusal}"
            elif question.answer in ANSWER_SOURCES:
                option, variable = ANSWER_SOURCES[question.answer]
                reason = f"the server asks for the {question.label} ({option} or ${variable})"
            elif question.secret:
                reason = f"the server asks for the {question.label}, which only a terminal can answer"
            else:
                reason = "no nickname"
            self._finish(reason, 1)
            return
        self.answering = question
        self._update_prompt()

    def _signed_in(self, nick: str) -> None:
        self.me = nick
        self.online = True
        self.answering = None
        self.answers.update(self.typed_answers)
        self.answers.pop("invitation code", None)   # it worked once, and it works only once
        self.retries = 0
        self.rejoin_due = self.rejoin is not None
        if self.interactive:   # learn who was already here, for Tab completion
            self.outgoing.appendleft("/online")
            self.asked_online = True
        self._send_queued()
        self._update_prompt()
        self._register_input()

    def _go_back_to_rooms(self) -> None:
        """After signing in again: join the rooms I was in (with their keys), the current one last.

        An account's rooms are the server's to keep: it has put me back in them by the time it
        answers /online, without those another session of mine left meanwhile (joining them would
        take that back, and leaving one would leave it on every session). So for an account, only
        the current room is made what it was, if it is still mine.
        """
        home = self.rooms.current   # where the server put me on signing in
        wanted = [room for room in self.rejoin or [] if room]
        self.rejoin, self.rejoin_due = None, False
        if self.account:
            if wanted and wanted[-1] in self.rooms and wanted[-1].casefold() != home.casefold():
                self.outgoing.appendleft(f"/join #{wanted[-1]}")
            return
        lines = []
        for number, room in enumerate(wanted, 1):
            if room.casefold() != home.casefold() or number == len(wanted) > 1:
                key = self.rooms.keys.get(room.casefold())
                lines.append(f"/join #{room}" + (f" {key}" if key else ""))
        if home.casefold() not in {room.casefold() for room in wanted}:
            lines.append(f"/leave #{home}")
        self.outgoing.extendleft(reversed(lines))

    def _send_queued(self) -> None:
        """Send queued lines as fast as the server's flood limit allows; show how many wait."""
        waiting = len(self.outgoing)
        while self.outgoing and self.online and self.connection and not self.leaving:
            if self.rejoin_due and (self.asked_online or not self.account) and self.outgoing[0] != "/online":
                break   # signed in again, not yet back in my rooms: what was typed meanwhile was meant for them
            if self.pacer is not None and not self.pacer.take():
                break
            self._send_now(self.outgoing.popleft())
        self._report_reads()
        if not self.interactive:
            # Read no further ahead than the backlog: a long file is not loaded whole.
            if len(self.outgoing) > OUTGOING_BACKLOG:
                self._unregister_input()
            elif not self.piped_ended:
                self._register_input()
            if self.piped_ended and not self.outgoing and self.online:
                self._leave()
        elif len(self.outgoing) != waiting:
            self._update_prompt()

    def _send_now(self, line: str) -> None:
        words = line.split()
        if words and words[0].lower() in QUIT_COMMANDS and self.online:
            self.leaving = True
            self.leave_deadline = time.monotonic() + QUIT_TIMEOUT
        if len(words) >= 3 and words[0].lower() == "/join":
            self.rooms.keys[words[1].lstrip("#").casefold()] = words[2]
        if words and words[0].lower() in ("/leave", "/part"):   # a report after this would be refused
            self.reads.drop(words[1] if len(words) > 1 and words[1].startswith("#") else "#" + self.rooms.current)
        if self.online and len(words) >= 2 and words[0].lower() == "/register":
            self.new_account_password = line.split(None, 1)[1]
        elif self.online and len(words) == 3 and words[0].lower() == "/passwd":
            self.new_account_password = words[2]
        if self.connection:
            self.connection.send_line(line)

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
            self.keys_read_at = time.monotonic()
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
        self.outgoing.extend(text for text in (line.decode("utf-8", "replace").rstrip("\r")
                                               for line in lines) if text.strip())
        self._send_queued()

    def _leave(self) -> None:
        """Say /quit (after what waits to be sent) and wait for the server to close the connection."""
        if not self.online:   # signing in or offline: "/quit" would be taken for a nickname or password
            self.exit_code = 0
        elif not self.leaving and not any(line.split()[0].lower() in QUIT_COMMANDS
                                          for line in self.outgoing):
            self.outgoing.append("/quit")
            self._send_queued()

    def send_typed(self, line: str) -> None:
        """Send a line the user typed: the answer to a sign-in question, or a message or command."""
        if not line.strip() and not (self.answering and self.answering.answer in EMPTY_ANSWER_GOES_BACK):
            return
        if self.answering:
            if self.answering.answer and line:
                self.typed_answers[self.answering.answer] = line
            self.answering = None
            self._send_now(line)
        elif not self.online and line.split()[0].lower() in QUIT_COMMANDS:
            self.exit_code = 0
        else:
            self.outgoing.append(line)
            self._send_queued()

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
            if self.exit_code is not None:
                return
            if self._attend(key):
                continue
            if self.pending_paste:
                if key.name == "enter":
                    self._paste_answered(True)
                elif key.name in ("escape", "ctrl-c"):
                    self._paste_answered(False)
            elif key.name == "text":
                editor.insert(key.text)
            elif key.name == "paste":
                self._on_paste(key.text)
            elif key.name in actions:
                actions[key.name]()
            elif key.name == "enter":
                self.send_typed(editor.submit(remember=not self.answering))
            elif key.name == "tab" and not self.answering:
                choices = editor.complete(self.roster.commands, self.roster.others(self.me),
                                          self.rooms.names())
                if choices:
                    self._say("  ".join(choices))
            elif key.name == "ctrl-d":
                if editor.characters:
                    editor.delete()
                else:
                    self._leave()
            elif key.name == "ctrl-c":
                self._on_ctrl_c()
            elif key.name == "refresh":
                self.display.repaint()
            elif key.name in ("next-room", "previous-room"):
                self._switch_to(self.rooms.neighbour(1 if key.name == "next-room" else -1))
            elif key.name.startswith("alt-"):
                self._switch_to(self.rooms.numbered(int(key.name[4:])))
        if self.exit_code is None:
            self._update_prompt()

    def _attend(self, key: Key) -> bool:
        """Follow whether the person is at the terminal; returns whether the key was a focus report."""
        now = time.monotonic()
        focus_report = key.name in ("focus-in", "focus-out")
        if (self.presence.focus_changed(key.name == "focus-in", now) if focus_report
                else self.presence.typed(now)):
            self.reads.came_back("#" + self.rooms.current)   # what was shown meanwhile is read now
        return focus_report

    def _on_ctrl_c(self) -> None:
        """Ctrl-C clears a typed line (Up brings it back); on an empty line, twice within 2 s leaves."""
        if self.editor.text:
            remembered = not self.answering and not carries_secret(self.editor.text)
            self.editor.submit(remember=not self.answering)
            if remembered:
                self._say("line cleared; Up brings it back")
        elif self.leaving or not self.online or time.monotonic() < self.quit_armed_until:
            if self.online and not self.leaving:
                self._send_now("/quit")
            else:
                self._finish("", 0)
        else:
            self.quit_armed_until = time.monotonic() + QUIT_AGAIN_SECONDS
            self._say(f"press Ctrl-C again within {QUIT_AGAIN_SECONDS:g} s to leave (or Ctrl-D, /quit)")

    def _switch_to(self, room: Optional[str]) -> None:
        """Ask the server to make room current; the prompt changes when it says it did."""
        if room and self.online and room.casefold() != self.rooms.current.casefold():
            self.outgoing.append(f"/join #{room}")
            self._send_queued()

    def _on_paste(self, text: str) -> None:
        """Pasted text is text: Tabs become spaces, each newline ends a line to send."""
        if self.keys.paste_dropped:
            self._say(f"the paste was longer than {PASTE_LIMIT} characters; "
                      f"its last {self.keys.paste_dropped} were left out")
            self.keys.paste_dropped = 0
        pieces = [sanitize(piece.expandtabs(PASTE_TAB_SIZE))
                  for piece in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
        if len(pieces) == 1:
            self.editor.insert(pieces[0])
            return
        if self.answering:   # one line answers the question; a newline after it is Enter
            self.editor.insert(pieces[0])
            more = sum(1 for piece in pieces[1:] if piece.strip())
            if more:
                self._say(f"the {self.answering.label} is one line: {more} more pasted line(s) left out")
            else:
                self.send_typed(self.editor.submit(remember=False))
            return
        before = "".join(self.editor.characters[:self.editor.cursor])
        after = "".join(self.editor.characters[self.editor.cursor:])
        lines = [line for line in [before + pieces[0]] + pieces[1:-1] if line.strip()]
        paste = PendingPaste(lines, self.editor.text, self.editor.cursor, pieces[-1] + after,
                             len(split_characters(pieces[-1])))
        if len(lines) <= PASTE_CONFIRM_LINES:
            self.pending_paste = paste
            self._paste_answered(True)
            return
        self.pending_paste = paste
        self.editor.set_text("")
        seconds = 0.0
        if self.pacer:
            seconds = max(0.0, len(lines) + len(self.outgoing) - self.pacer.tokens) / self.pacer.rate
        self._say(f"you pasted {len(lines)} lines: Enter sends them"
                  + (f" (over about {seconds:.0f} s, the server's flood limit)" if seconds >= 1 else "")
                  + ", Esc or Ctrl-C cancels")

    def _paste_answered(self, send: bool) -> None:
        paste, self.pending_paste = self.pending_paste, None
        if send:
            for line in paste.lines:
                self.editor.remember(line)
            self.editor.set_text(paste.rest, paste.rest_cursor)
            self.outgoing.extend(paste.lines)
            self._send_queued()
        else:
            self.editor.set_text(paste.typed, paste.typed_cursor)
            if len(paste.lines) > PASTE_CONFIRM_LINES:
                self._say(f"paste of {len(paste.lines)} lines cancelled; nothing of it was sent")

    # -- the prompt --------------------------------------------------------

    def _update_prompt(self, draw: bool = True) -> None:
        """The input row's label: room activity, lines waiting, who and where I am."""
        if self.pending_paste:
            count = len(self.pending_paste.lines)
            prompts = [[Span(f"send {count} pasted lines? (Enter/Esc) ")], [Span(f"send {count}? ")]]
        elif self.answering:
            label = self.answering.label
            short = "password" if "password" in label else label.split()[0]
            prompts = [[Span(f"{label}: ")], [Span(f"{short}: ")]]
        else:
            prompts = [self._prompt(nick, long_activity, long_waiting)
                       for nick, long_activity, long_waiting in ((self.me, True, True), ("", True, True),
                                                                 ("", False, True), ("", False, False))]
            prompts.append([Span(f"#{self.rooms.current}> " if self.rooms.current else "> ")])
        if isinstance(self.display, TerminalDisplay):
            self.display.set_prompt(prompts, secret=bool(self.answering and self.answering.secret), draw=draw)

    def _prompt(self, nick: str, long_activity: bool, long_waiting: bool) -> list[Span]:
        spans = []
        if self.me and not self.online:
            spans.append(Span("offline ", "error"))
        activity = self.rooms.activity()
        if activity:
            if long_activity:
                text = " ".join(f"#{room} {count}{'!' if mentioned else ''}"
                                for room, count, mentioned in activity)
            else:
                text = f"{len(activity)}{'!' if any(m for _, _, m in activity) else ''}"
            spans.append(Span(f"[{text}] ", "activity"))
        if self.outgoing:
            spans.append(Span(f"({len(self.outgoing)} waiting) " if long_waiting
                              else f"({len(self.outgoing)}) ", "local"))
        name = " ".join(part for part in (nick, "#" + self.rooms.current if self.rooms.current else "")
                        if part)
        spans.append(Span(name + "> " if name else "> ", "prompt"))
        return spans


# ---------------------------------------------------------------------------
# main()
# ---------------------------------------------------------------------------

def port_number(text: str) -> int:
    """A TCP port from the command line."""
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return int(text)


CONFIG_SECTION = "pychat"
CONFIG_TEXT_SETTINGS = ("host", "nick", "cafile")
CONFIG_YES_NO_SETTINGS = ("tls", "insecure", "color", "bell", "focus_report")


def config_path(environment: dict[str, str]) -> str:
    """Where the settings file is: $XDG_CONFIG_HOME/pychat/config, or ~/.config/pychat/config."""
    base = environment.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "pychat", "config")


def load_settings(path: str) -> dict[str, object]:
    """The settings in the file at path (none if there is no file), as option defaults.

    The file is an INI file with one [pychat] section; a setting that is not
    known, or a value that does not fit, is an error that names it.
    """
    parser = configparser.ConfigParser(interpolation=None, default_section="no default section")
    try:
        with open(path, encoding="utf-8") as file:
            parser.read_file(file)
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, configparser.Error) as error:
        message = getattr(error, "message", None) or getattr(error, "strerror", None) or str(error)
        raise OptionError(f"settings file {path}: {' '.join(str(message).split())}") from None
    others = [name for name in parser.sections() if name != CONFIG_SECTION]
    if others:
        raise OptionError(f"settings file {path}: unknown section [{others[0]}] "
                          f"(the settings go in [{CONFIG_SECTION}])")
    settings: dict[str, object] = {}
    if not parser.has_section(CONFIG_SECTION):
        return settings
    known = CONFIG_TEXT_SETTINGS + CONFIG_YES_NO_SETTINGS + ("port",)
    for name, value in parser.items(CONFIG_SECTION):
        if name not in known:
            raise OptionError(f"settings file {path}: unknown setting {name!r} "
                              f"(known: {', '.join(known)})")
        if name == "port":
            try:
                settings[name] = port_number(value)
            except argparse.ArgumentTypeError as error:
                raise OptionError(f"settings file {path}: port: {error}") from None
        elif name in CONFIG_YES_NO_SETTINGS:
            try:
                settings[name] = parser.getboolean(CONFIG_SECTION, name)
            except ValueError:
                raise OptionError(f"settings file {path}: {name} must be yes or no, "
                                  f"not {value!r}") from None
        else:
            settings[name] = value
    return settings


def parse_options(argv: Optional[list[str]], environment: Optional[dict[str, str]] = None
                  ) -> argparse.Namespace:
    """The command line, over the settings file."""
    environment = os.environ if environment is None else environment
    path = config_path(environment)
    parser = argparse.ArgumentParser(
        prog="pyChat-client.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Terminal client for a pyChat server. With standard input from a\n"
                    "pipe or a file, each line is sent as a message, then the client leaves.",
        epilog=f"settings file (read when it exists; options given here win):\n  {path}\n"
               f"an INI file with a [{CONFIG_SECTION}] section holding any of host, port, nick, tls,\n"
               "cafile, insecure, color, bell and focus_report, as in \"port = 25000\" or \"tls = yes\".")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"server to connect to (default: {DEFAULT_HOST})")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help=f"server port (default: {DEFAULT_PORT})")
    parser.add_argument("--nick",
                        help="nickname to sign in with, instead of being asked; required "
                             "when standard input is not a terminal")
    parser.add_argument("--password", default=environment.get(PASSWORD_ENVIRONMENT) or None,
                        help="server password, sent when the server asks for one (default: "
                             f"${PASSWORD_ENVIRONMENT}, which keeps it out of the process list)")
    parser.add_argument("--account-password", metavar="PASSWORD",
                        default=environment.get(ACCOUNT_PASSWORD_ENVIRONMENT) or None,
                        help="password of the registered nickname you sign in with (or choose for a "
                             f"new account), sent when the server asks (default: "
                             f"${ACCOUNT_PASSWORD_ENVIRONMENT}; else it is asked for, hidden)")
    parser.add_argument("--invitation-code", metavar="CODE",
                        default=environment.get(INVITATION_ENVIRONMENT) or None,
                        help="one-time code an operator gave you to sign in to a private server "
                             f"(default: ${INVITATION_ENVIRONMENT})")
    parser.add_argument("--quiet", action="store_true",
                        help="with standard input from a pipe or a file: print nothing but errors "
                             "(not the room's history, nor what others say)")
    parser.add_argument("--color", action=argparse.BooleanOptionalAction,
                        help="colours (on in a terminal unless $NO_COLOR is set)")
    parser.add_argument("--bell", action=argparse.BooleanOptionalAction, default=False,
                        help="ring the terminal bell when someone mentions your nickname "
                             "or sends you a private message")
    parser.add_argument("--tls", action=argparse.BooleanOptionalAction, default=False,
                        help="use TLS, checking the server's certificate and host name")
    parser.add_argument("--cafile", metavar="FILE",
                        help="trust the certificate authority in FILE (PEM) for TLS; implies --tls")
    parser.add_argument("--insecure", action=argparse.BooleanOptionalAction, default=False,
                        help="TLS without checking the certificate (anyone in between can read "
                             "the chat); implies --tls")
    parser.add_argument("--focus-report", action=argparse.BooleanOptionalAction, default=True,
                        help="ask the terminal to say when it gains and loses the focus, so that what "
                             "arrives while you are in another window is not reported to the server as "
                             "read; --no-focus-report for a terminal that misbehaves (then you count as "
                             "present for 5 minutes after a key)")
    parser.add_argument("--version", action="version", version=f"pyChat client {VERSION}")
    try:
        parser.set_defaults(**load_settings(path))
    except OptionError as error:
        parser.error(str(error))
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the client; returns the exit status."""
    options = parse_options(argv)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if not interactive and not options.nick:
        print("pyChat: --nick is needed when not run in a terminal", file=sys.stderr)
        return 2
    colour = sys.stdout.isatty() and (options.color if options.color is not None
                                      else not os.environ.get("NO_COLOR"))
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

    def open_socket() -> socket.socket:
        # The TLS settings are read for each connection: a --cafile replaced since the last one (a
        # server's regenerated self-signed certificate, given again at the same path) is trusted.
        return connect(options.host, options.port,
                       tls_context(options.cafile, options.insecure) if tls else None)

    try:
        sock = open_socket()
    except OptionError as error:
        print(f"pyChat: {error}", file=sys.stderr)
        return 2
    except ConnectError as error:
        print(f"pyChat: {error}", file=sys.stderr)
        return 1
    painter = Painter(colour)
    editor = LineEditor()
    display = (TerminalDisplay(sys.stdout, editor, painter, options.focus_report) if interactive
               else PlainDisplay(sys.stdout))
    keyboard = windows_keyboard_socket(interactive) if os.name == "nt" else None
    client = ChatClient(Connection(sock), display, editor, painter, interactive=interactive,
                        nick=options.nick, password=options.password, bell=options.bell,
                        account_password=options.account_password,
                        invitation_code=options.invitation_code,
                        keyboard=keyboard, reconnect=open_socket,
                        probe_tls=lambda: speaks_tls(options.host, options.port),
                        where=f"{options.host}:{options.port}", tls=tls,
                        quiet=options.quiet and not interactive)
    if not interactive:
        return client.run()
    with keyboard_mode(sys.stdin.fileno()):
        try:
            display.start()
            return client.run()
        finally:
            display.close()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
