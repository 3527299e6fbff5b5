"""The slash-command registry.

A command is a function in a module of this package, marked with `@command`:

    @command("kick", "[#ROOM] NICK [REASON...]")
    def kick(ctx, room, nick, reason):
        \"\"\"Put NICK out of a room.\"\"\"
        ctx.reply(...)

The decorator only attaches metadata; `load_commands()` imports every module
of a package, collects the marked functions and checks that no two claim the
same name. Nothing else lists the commands, so adding one is adding a file.

The usage string (the arguments, without the command's name) is also the
argument specification. It may hold, in this order:

    [#ROOM]     a room, taken only if the word starts with '#'   /topic [#ROOM] TEXT...
    WORD        one required word          /ignore NICK
    [WORD]      one optional word          /help [COMMAND]
    TEXT...     the rest of the line       /msg NICK TEXT...
    [TEXT...]   the rest of the line, optional   /away [REASON...]

The registry splits the arguments accordingly and calls `handler(ctx, *args)`
with one string per element (None for a missing optional one). Wrong use is
answered from here with the usage, so no command re-implements that check.
A handler refuses a request by raising `CommandError("why")`. All it may
touch is the `Context` it is given; the interface is defined below.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import pkgutil
import re
from typing import Any, Callable, NamedTuple, Optional, Protocol

log = logging.getLogger("pychat.commands")

_MARK = "pychat_command"
_PARAMETER = re.compile(r"^(\[)?(#)?([A-Z][A-Z0-9_-]*)(\.\.\.)?(\])?$")


class CommandError(Exception):
    """A command refused the request; the message is sent to the caller as an error line."""


class CommandLoadError(Exception):
    """A command file is wrong in a way the server must not start with."""


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One element of a usage string."""

    name: str
    optional: bool
    rest_of_line: bool
    room: bool = False          # [#ROOM]: present only if the next word starts with '#'


@dataclasses.dataclass(frozen=True)
class Command:
    """A registered slash-command and everything `/help` says about it."""

    name: str
    handler: Callable[..., Any]
    usage: str
    summary: str
    details: str
    aliases: tuple[str, ...]
    operator: bool
    source: str
    parameters: tuple[Parameter, ...]

    def split_arguments(self, text: str) -> list[str | None]:
        """Split the text after the command name as the usage string says, or raise CommandError."""
        values: list[str | None] = []
        rest = text.strip()
        for parameter in self.parameters:
            if parameter.room:
                if rest.startswith("#"):
                    value, _, rest = rest.partition(" ")
                    rest = rest.lstrip()
                else:
                    value = None
                values.append(value)
                continue
            if parameter.rest_of_line:
                value, rest = rest, ""
            else:
                value, _, rest = rest.partition(" ")
                rest = rest.lstrip()
            if not value and not parameter.optional:
                raise CommandError(f"Usage: {self.usage}")
            values.append(value or None)
        if rest:
            raise CommandError(f"Too many arguments. Usage: {self.usage}")
        return values


def duration_and_reason(duration: str | None, reason: str | None) -> tuple[str | None, str | None]:
    """The DURATION and REASON of /ban and /mute: a first word that is no duration (it does not start with a
    digit, and is not "permanent") begins the reason."""
    if duration is not None and not (duration[0].isdigit() or duration.lower() == "permanent"):
        return None, f"{duration} {reason or ''}".strip()
    return duration, reason


def command(name: str, usage: str = "", *, aliases: tuple[str, ...] | list[str] = (),
            operator: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a function as the slash-command /NAME taking the arguments USAGE; its docstring is its help."""

    def mark(handler: Callable[..., Any]) -> Callable[..., Any]:
        setattr(handler, _MARK, {"name": name, "usage": usage, "aliases": tuple(aliases), "operator": operator})
        return handler

    return mark


def _parse_usage(name: str, usage: str, source: str) -> tuple[Parameter, ...]:
    words = usage.split()
    if words and words[0].lower() == f"/{name}":
        raise CommandLoadError(f"{source}: /{name}: usage {usage!r} repeats the command's name; "
                               "give only its arguments")
    parameters: list[Parameter] = []
    for word in words:
        match = _PARAMETER.match(word)
        if not match or bool(match.group(1)) != bool(match.group(5)) or (
                match.group(2) and not (match.group(1) and not match.group(4) and not parameters)):
            raise CommandLoadError(f"{source}: /{name}: cannot read {word!r} in usage {usage!r}"
                                   + (" ([#ROOM] must be optional and come first)" if match and match.group(2)
                                      else ""))
        parameter = Parameter(match.group(3), bool(match.group(1)), bool(match.group(4)), bool(match.group(2)))
        if parameters and parameters[-1].rest_of_line:
            raise CommandLoadError(f"{source}: /{name}: only the last argument may take the rest of the line")
        if parameters and parameters[-1].optional and not parameters[-1].room and not parameter.optional:
            raise CommandLoadError(f"{source}: /{name}: a required argument cannot follow an optional one")
        parameters.append(parameter)
    return tuple(parameters)


def _make_command(handler: Callable[..., Any], source: str) -> Command:
    meta = getattr(handler, _MARK)
    name = meta["name"]
    doc = inspect.getdoc(handler)
    if not doc:
        raise CommandLoadError(f"{source}: /{name} has no docstring; its first line is the /help text")
    summary, _, details = doc.partition("\n")
    parameters = _parse_usage(name, meta["usage"], source)
    try:
        inspect.signature(handler).bind(None, *(None for _ in parameters))
    except TypeError:
        raise CommandLoadError(
            f"{source}: /{name} takes ctx plus {len(parameters)} argument(s) by its usage "
            f"{meta['usage']!r}, but the function's signature does not match") from None
    usage = f"/{name} {meta['usage']}".rstrip()
    return Command(name=name, handler=handler, usage=usage, summary=summary.strip(),
                   details=details.strip(), aliases=meta["aliases"], operator=meta["operator"],
                   source=source, parameters=parameters)


class PersonInfo(NamedTuple):
    """What a command may know about someone: a snapshot, not a live object."""

    nick: str
    room: Optional[str]         # their current room; None when it is a private room you are not in
    away: Optional[str]
    operator: bool              # an operator of the server
    muted: bool
    room_operator: bool         # an operator of the room it was listed for (by room_members)
    voiced: bool = False        # has a voice in the room it was listed for (by room_members)


class RoomInfo(NamedTuple):
    """What a command may know about a room."""

    name: str
    people: int
    topic: Optional[str]
    yours: bool                 # the caller is in it
    current: bool               # it is the caller's current room
    private: bool               # it has a key or is invite-only


class MaskInfo(NamedTuple):
    """A NICK!USER@HOST mask in one of a room's lists (its bans, exceptions, invitation masks)."""

    mask: str
    by: str                     # who put it there
    when: float                 # and when, a time.time()


class RoomSettings(NamedTuple):
    """A room's settings, for /mode."""

    name: str
    topic: Optional[str]
    has_key: bool
    invite_only: bool
    topic_by_everyone: bool
    operators: tuple[str, ...]
    topic_by: Optional[str] = None         # who set the topic and when (a time.time()), if known
    topic_when: float = 0.0
    secret: bool = False                    # hidden from those outside it
    limit: Optional[int] = None             # the most people it takes
    moderated: bool = False                 # only its operators and voiced people talk
    outside_messages: bool = False          # people not in it may talk in it
    voiced: tuple[str, ...] = ()
    bans: tuple[MaskInfo, ...] = ()         # who may not come in or talk (NICK!USER@HOST masks)
    exempts: tuple[MaskInfo, ...] = ()      # who the bans do not hold for
    invite_masks: tuple[MaskInfo, ...] = ()     # who may come in while it is invite-only
    opened: float = 0.0                     # when its first member of the moment came in, a time.time()


class PersonDetails(NamedTuple):
    """What /whois shows about someone online."""

    nick: str
    account: Optional[str]      # the account they signed in to; None for a guest
    operator: bool              # an operator of the server
    since: str                  # when they signed in, as "2026-12-01 11:05 UTC"
    idle: str                   # how long since they last said anything, as "3m 10s"
    rooms: tuple[str, ...]      # their rooms that the caller may know of
    away: Optional[str]
    address: Optional[str]      # where they connect from: for operators of the server only
    connected: str = ""         # how: the protocols of their sessions, and how many there are


class SessionInfo(NamedTuple):
    """One of your sessions (connections signed in to your account), as /sessions lists them."""

    number: int                 # what /kick-session takes
    protocol: str               # "pyChat" or "IRC"
    address: str
    since: str                  # as "2026-12-01 11:05 UTC"
    idle: str                   # since it last sent a line, as "3m 10s"
    this: bool                  # the session that asked


class ServerDetails(NamedTuple):
    """What /uptime shows."""

    version: str
    started: str                # as "2026-12-01 09:00 UTC"
    up: str                     # for how long, as "2h 5m"
    people: int
    rooms: int                  # rooms with people in them
    most_people: int            # the most signed in at once since the start
    search: str                 # how /search searches: "the full-text index" or "the newest N lines"


class AccountInfo(NamedTuple):
    """An account, as /accounts lists it."""

    name: str
    registered: str             # as "2026-12-01 11:05 UTC"
    last_seen: Optional[str]    # when its owner last signed in or out, or None if not known
    online: bool                # its owner is signed in now
    operator: bool              # an operator of the server
    banned: Optional[str]       # how long the account is banned for ("until ... (2h left)"), or None


class InvitationInfo(NamedTuple):
    """A one-time code waiting to be used, as /invitations lists it (never the code itself)."""

    name: str
    new_password: bool          # a password reset for an account (/reset-password), not an invitation to make one
    by: str
    expires: str                # as "2026-12-01 11:05 UTC"
    left: str                   # as "6d 23h"


class FoundLine(NamedTuple):
    """A line /search found."""

    when: str                   # as "2026-12-01 11:05 UTC"
    where: str                  # "#dev", or "private" for a private conversation
    nick: str
    text: str
    action: bool                # said with /me


class Context(Protocol):
    """All a command can see and do. The server gives each command call one of these.

    Every verb takes the server's lock itself and acts through the server;
    one that cannot do what was asked raises CommandError, which the caller
    sees as an error line. ROOM arguments take a name with or without '#';
    None means the caller's current room.
    """

    nick: str                   # the caller's nickname
    room: str                   # the caller's current room
    is_operator: bool           # the caller is an operator of the server
    away: Optional[str]         # the caller's away reason, or None
    command_table: CommandTable

    # -- answering the caller
    def reply(self, text: str) -> None: ...
    def error(self, text: str) -> None: ...

    # -- talking
    def say(self, text: str, room: Optional[str] = None) -> None: ...
    def act(self, text: str, room: Optional[str] = None) -> None: ...
    def send_private(self, nick: str, text: str) -> None: ...
    def last_private_sender(self) -> str: ...

    # -- rooms
    def join(self, room: str, key: Optional[str] = None) -> None: ...
    def leave(self, room: Optional[str] = None) -> None: ...
    def invite(self, nick: str, room: Optional[str] = None) -> str: ...
    def kick(self, nick: str, reason: Optional[str], room: Optional[str] = None) -> str: ...
    def set_topic(self, text: str, room: Optional[str] = None) -> None: ...
    def set_mode(self, setting: str, value: str, room: Optional[str] = None) -> None: ...
    def set_modes(self, changes: list[tuple[str, str]], room: Optional[str] = None) -> list[str]: ...
    def mode_letters(self, letters: str, words: list[str]) -> list[tuple[str, Optional[str]]]: ...
    def room_settings(self, room: Optional[str] = None) -> RoomSettings: ...

    # -- about the caller
    def rename(self, new_nick: str) -> None: ...
    def set_away(self, reason: Optional[str]) -> None: ...
    def ignore(self, nick: str, ignoring: bool = True) -> str: ...
    def ignored(self) -> list[str]: ...
    def become_operator(self, secret: str) -> None: ...
    def quit(self, message: Optional[str] = None) -> None: ...

    # -- server operators
    def disconnect(self, nick: str, reason: Optional[str]) -> str: ...
    def reload(self) -> list[str]: ...

    # -- lists (each costs its length from the caller's listing budget)
    def online(self) -> list[PersonInfo]: ...
    def room_members(self, room: Optional[str] = None) -> tuple[str, list[PersonInfo]]: ...
    def rooms(self) -> list[RoomInfo]: ...
    def search(self, words: str, room: Optional[str] = None) -> list[FoundLine]: ...
    def history(self, target: Optional[str] = None, count: Optional[int] = None) -> int: ...
    def mark_read(self, target: Optional[str] = None) -> None: ...
    def sessions(self) -> list[SessionInfo]: ...
    def end_session(self, number: int) -> str: ...

    # -- accounts (the caller's own)
    def register(self, password: str) -> str: ...
    def change_password(self, old: str, new: str) -> None: ...
    def unregister(self, password: str) -> str: ...

    # -- moderation (server operators; each returns the reply to show)
    def operators(self) -> list[str]: ...
    def set_operator(self, nick: str, operator: bool) -> str: ...
    def ban(self, target: str, duration: Optional[str], reason: Optional[str]) -> str: ...
    def unban(self, target: str) -> str: ...
    def bans(self) -> list[str]: ...
    def mute(self, nick: str, duration: Optional[str], reason: Optional[str]) -> str: ...
    def unmute(self, target: str) -> str: ...
    def mutes(self) -> list[str]: ...
    def invite_account(self, nick: str) -> str: ...
    def remove_account(self, nick: str) -> str: ...
    def accounts(self, pattern: Optional[str] = None) -> tuple[list[AccountInfo], int]: ...
    def invitations(self) -> list[InvitationInfo]: ...
    def cancel_invitation(self, nick: str) -> str: ...
    def reset_password(self, nick: str) -> str: ...

    # -- knowing who is who
    def whois(self, nick: str) -> PersonDetails: ...
    def motd(self) -> list[str]: ...
    def server_info(self) -> ServerDetails: ...


class CommandTable:
    """Every loaded command, found by name or alias, and the one place that runs them."""

    def __init__(self) -> None:
        self._by_name: dict[str, Command] = {}

    def add(self, new: Command) -> None:
        """Register a command, refusing a name or alias that another command already claims."""
        for word in (new.name, *new.aliases):
            taken = self._by_name.get(word.lower())
            if taken is not None:
                raise CommandLoadError(f"/{word} is claimed twice: by {taken.source} "
                                       f"and by {new.source}")
            self._by_name[word.lower()] = new

    def find(self, name: str) -> Command | None:
        """The command called NAME (or with that alias), if there is one."""
        return self._by_name.get(name.lower())

    def all(self) -> list[Command]:
        """Every command once, sorted by name."""
        return sorted({id(c): c for c in self._by_name.values()}.values(), key=lambda c: c.name)

    def help_lines(self) -> list[str]:
        """One aligned line per command: its usage and its one-line help; operator commands marked."""
        commands = self.all()
        width = max((len(c.usage) for c in commands), default=0)
        return [f"{c.usage.ljust(width)}  {c.summary}{'  (operators)' if c.operator else ''}"
                for c in commands]

    def run(self, ctx: Any, line: str) -> None:
        """Run the command line `/NAME ARGS` for ctx, reporting every failure to ctx as an error."""
        name, _, text = line[1:].partition(" ")
        found = self.find(name)
        if found is None:
            ctx.error(f"Unknown command /{name}. Type {ctx.help_command} for the list.")
            return
        if found.operator and not ctx.is_operator:
            ctx.error(f"/{found.name}: not allowed; only operators may use it.")
            return
        try:
            found.handler(ctx, *found.split_arguments(text))
        except CommandError as refusal:
            ctx.error(str(refusal))
        except Exception:
            log.exception("/%s from %s failed (%s)", found.name, getattr(ctx, "nick", "?"), found.source)
            ctx.error(f"/{found.name} failed because of an error in the server; it has been logged.")


def load_commands(package: str = __name__) -> CommandTable:
    """Import every module of PACKAGE and register each function marked with @command."""
    table = CommandTable()
    root = importlib.import_module(package)
    for module_info in sorted(pkgutil.iter_modules(root.__path__), key=lambda m: m.name):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{module_info.name}")
        source = f"{package.replace('.', '/')}/{module_info.name}.py"
        for value in vars(module).values():
            if callable(value) and hasattr(value, _MARK) and value.__module__ == module.__name__:
                table.add(_make_command(value, source))
    return table
