"""Real IRC clients, irssi and WeeChat, on the IRC port, driven in tmux as a person would drive them.

Each client runs in a tmux server of its own (its own socket, no tmux
configuration of the user's), with a fresh home directory that holds only the
settings written here: no autojoin, no reconnecting, no logs, no plugins but
IRC. What the test sees is the client's screen, read with capture-pane; every
wait has a deadline and fails with the screen as it was.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import tempfile
import time
from pathlib import Path

import pytest

from conftest import TIMEOUT, irc_port

SLOW = 15.0         # a real client's round trips, on a machine busy with other tests


def require(program: str) -> str:
    """The path of PROGRAM; skipped without it, unless PYCHAT_REQUIRE_IRC_CLIENTS says CI installed it."""
    path = shutil.which(program)
    if path is None:
        if os.environ.get("PYCHAT_REQUIRE_IRC_CLIENTS"):
            pytest.fail(f"{program} is required here (PYCHAT_REQUIRE_IRC_CLIENTS is set) but not installed")
        pytest.skip(f"{program} is not installed")
    return path


class TmuxSession:
    """One program in a tmux pane of a private tmux server: keys in, screen out."""

    def __init__(self, command: list[str], workdir: Path, columns: int = 160, rows: int = 50) -> None:
        self.tmux = require("tmux")
        # A socket path must stay under about 100 bytes, which a test's own directory may not.
        self.socket_dir = tempfile.mkdtemp(prefix="pychat-tmux-")
        self.socket = os.path.join(self.socket_dir, "socket")
        config = workdir / "tmux.conf"
        # "screen" is in every terminfo database; the history keeps what scrolled off for wait_for.
        config.write_text("set -g default-terminal screen\nset -g history-limit 5000\nset -g status off\n")
        self.run("-f", str(config), "new-session", "-d", "-s", "client", "-x", str(columns), "-y", str(rows),
                 " ".join(_quote(part) for part in command))

    def run(self, *args: str) -> str:
        result = subprocess.run([self.tmux, "-S", self.socket, *args], capture_output=True, text=True,
                                timeout=TIMEOUT)
        assert result.returncode == 0, f"tmux {' '.join(args)} failed: {result.stderr}"
        return result.stdout

    def type(self, text: str) -> None:
        """Type TEXT on an empty input line and press Enter.

        Ctrl-U empties the line first (in irssi and WeeChat alike): a client that switched windows
        while the last line was typed can leave part of it behind, since WeeChat keeps one input
        line per window."""
        self.run("send-keys", "-t", "client", "C-u")
        self.run("send-keys", "-t", "client", "-l", text)
        self.run("send-keys", "-t", "client", "Enter")

    def screen(self) -> str:
        """What the pane shows now, with what scrolled off above it, wrapped rows joined."""
        return self.run("capture-pane", "-p", "-J", "-t", "client", "-S", "-5000")

    def wait_for(self, pattern: str, timeout: float = SLOW) -> re.Match:
        """Wait until a row of the screen matches PATTERN (searched anywhere in the row)."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            for row in screen.splitlines():
                found = re.search(pattern, row)
                if found:
                    return found
            if time.monotonic() > deadline:
                rows = [row for row in screen.splitlines() if row.strip()]
                pytest.fail(f"no row matching {pattern!r} within {timeout} s; screen:\n" + "\n".join(rows[-40:]))
            time.sleep(0.1)

    def switch_until(self, command: str, pattern: str, timeout: float = SLOW) -> None:
        """Type COMMAND (one that shows a window) until the screen shows PATTERN: the window may not
        exist yet when the client has not yet read what creates it."""
        deadline = time.monotonic() + timeout
        while True:
            self.type(command)
            try:
                self.wait_for(pattern, timeout=min(1.5, max(0.1, deadline - time.monotonic())))
                return
            except pytest.fail.Exception:
                if time.monotonic() > deadline:
                    raise

    def close(self) -> None:
        subprocess.run([self.tmux, "-S", self.socket, "kill-server"], capture_output=True, timeout=TIMEOUT)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def _quote(part: str) -> str:
    return "'" + part.replace("'", "'\\''") + "'"


def irssi(workdir: Path, port: int, nick: str, sasl: tuple[str, str] | None = None) -> TmuxSession:
    """irssi signing in as NICK (to the account SASL, a name and a password, if given), with a home of
    its own: no reconnecting, no user mode, no logs, and sending as fast as the server's flood limit allows."""
    home = workdir / "irssi"
    home.mkdir()
    # The network "pychat": its one server, and the account to sign in to.
    account = (f' sasl_mechanism = "PLAIN"; sasl_username = "{sasl[0]}"; sasl_password = "{sasl[1]}";'
               if sasl else "")
    (home / "config").write_text(
        f'chatnets = {{ pychat = {{ type = "IRC";{account} }}; }};\n'
        f'servers = ( {{ address = "127.0.0.1"; port = "{port}"; chatnet = "pychat"; use_tls = "no"; }} );\n'
        'settings = {\n'
        f'  core = {{ real_name = "{nick} in irssi"; user_name = "{nick}"; nick = "{nick}";\n'
        '           settings_autosave = "no"; server_reconnect_time = "-1"; };\n'
        # irssi paces what it sends (5 at once, then one each 2.2 s): here, to the server's own flood limit.
        '  "irc/core" = { usermode = ""; cmds_max_at_once = "20"; cmd_queue_speed = "250msec"; };\n'
        '  "fe-common/core" = { autolog = "no"; };\n'
        # Keys typed quickly are typed, not a paste (which would show Ctrl-U as text).
        '  "fe-text" = { paste_detect_time = "0"; };\n'
        '};\n')
    return TmuxSession([require("irssi"), f"--home={home}", "-c", "pychat", "-n", nick], workdir)


# WeeChat waits 2 s between the messages a person types; the options are named so before WeeChat 4,
# and "anti_flood" (in milliseconds) after.
WEECHAT_PACING = ("anti_flood_prio_high", "anti_flood_prio_low", "anti_flood")


def weechat(workdir: Path, port: int, nick: str, sasl: tuple[str, str] | None = None) -> TmuxSession:
    """WeeChat signing in as NICK (to the account SASL, a name and a password, if given), with a home of
    its own and only its IRC plugin: no reconnecting, no autojoin, no TLS, no pacing (options that this
    version does not have are refused, harmlessly: TLS is 'ssl' before WeeChat 4 and 'tls' after)."""
    account = (["/set irc.server.pychat.sasl_mechanism plain", f"/set irc.server.pychat.sasl_username {sasl[0]}",
                f"/set irc.server.pychat.sasl_password {sasl[1]}"] if sasl else [])
    home = workdir / "weechat"
    commands = "; ".join([
        f"/set irc.server_default.nicks {nick}", f"/set irc.server_default.username {nick}",
        f"/set irc.server_default.realname {nick}_in_WeeChat", "/set irc.server_default.autoreconnect off",
        f"/server add pychat 127.0.0.1/{port}", "/set irc.server.pychat.tls off",
        "/set irc.server.pychat.ssl off", *(f"/set irc.server_default.{name} 0" for name in WEECHAT_PACING),
        "/set weechat.look.paste_max_lines -1",        # lines typed quickly are typed, not a paste to confirm
        *account, "/connect pychat"])
    return TmuxSession([require("weechat"), "--dir", str(home), "--plugins", "irc", "--run-command", commands],
                       workdir)


CLIENTS = {"irssi": irssi, "weechat": weechat}


@pytest.fixture
def run_irc_client(tmp_path):
    """A factory: run_irc_client("irssi", port, nick) starts that client in tmux; all are closed at the end."""
    sessions: list[TmuxSession] = []

    def start(kind: str, port: int, nick: str, sasl: tuple[str, str] | None = None) -> TmuxSession:
        workdir = tmp_path / f"{kind}-{nick}"
        workdir.mkdir()
        session = CLIENTS[kind](workdir, port, nick, sasl)
        sessions.append(session)
        return session

    yield start
    for session in sessions:
        session.close()


# How each client shows a line of NICK saying TEXT, and how it switches to a window: a channel's, or
# (with "1") the one with what the server said.
SAYS = {"irssi": r"<.?{nick}> {text}", "weechat": r"{nick} +\| {text}"}
SWITCH = {"irssi": "/window goto {window}", "weechat": "/buffer {window}"}
# Where each shows the notices of pyChat's service: irssi opens a query window for /msg, WeeChat
# shows them with what the server said.
SERVICE_WINDOW = {"irssi": "pyChat", "weechat": "1"}


def has_joined(nick: str, channel: str) -> str:
    """How both show NICK joining CHANNEL: WeeChat, given extended-join, puts the real name before the
    address ('bob (Bob B.) (~user@pychat) has joined #dev'); irssi does not ('bob [~user@pychat] has joined')."""
    return rf"{re.escape(nick)} (\(.*\) )?\S+ has joined {re.escape(channel)}"


class NcUser:
    """Someone on plain nc, on the pyChat port: what they type goes in, what they read is collected."""

    def __init__(self, port: int, nick: str) -> None:
        nc = shutil.which("nc")
        if nc is None:
            if os.environ.get("PYCHAT_REQUIRE_NC"):
                pytest.fail("nc is required here (PYCHAT_REQUIRE_NC is set) but not installed")
            pytest.skip("nc is not installed")
        self.process = subprocess.Popen([nc, "127.0.0.1", str(port)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, bufsize=1)
        self.lines: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._collect, daemon=True).start()
        self.type(nick)
        self.expect(rf"\*\*\* Welcome, {nick}!")

    def _collect(self) -> None:
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    def type(self, text: str) -> None:
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def expect(self, pattern: str, timeout: float = SLOW) -> str:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines:
                    if re.match(pattern, line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"nc never read a line matching {pattern!r}; it read: {self.lines[-15:]}")
                self.changed.wait(remaining)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_real_irc_client_talks_in_two_rooms_with_pychat_and_nc_users(start_server, connect, run_irc_client, kind):
    server = start_server("--irc-port", "0")
    bob = connect(server, "bob")
    bob.send("/join #dev")
    bob.expect(r"\*\*\* You are in #dev")
    bob.send("said before you came")
    bob.expect("bob: said before you came")
    dave = NcUser(server.port, "dave")
    says = lambda nick, text: SAYS[kind].format(nick=nick, text=re.escape(text))
    try:
        client = run_irc_client(kind, irc_port(server), "ircuser")
        dave.expect(r"\*\*\* ircuser joined #lobby")
        # Typing waits for the client to show the channel, since a client may switch to it meanwhile
        # (and WeeChat keeps a half-typed line per window).
        client.switch_until(SWITCH[kind].format(window="#lobby"), has_joined("ircuser", "#lobby"))
        client.type("/join #dev")
        bob.expect(re.escape("*** ircuser joined #dev"))
        client.switch_until(SWITCH[kind].format(window="#dev"), has_joined("ircuser", "#dev"))
        client.wait_for(says("bob", "said before you came"))          # the history of #dev
        client.type("hello dev")
        bob.expect(re.escape("ircuser: hello dev"))
        bob.send("hi irc")
        client.wait_for(says("bob", "hi irc"))
        client.type(SWITCH[kind].format(window="#lobby"))
        client.type("hello lobby")
        dave.expect(re.escape("ircuser: hello lobby"))
        dave.type("hi from nc")
        client.wait_for(says("dave", "hi from nc"))
        client.type("/msg pyChat online")
        client.type(SWITCH[kind].format(window=SERVICE_WINDOW[kind]))
        client.wait_for(r"3 online: bob \(#dev\), dave \(#lobby\), ircuser \(#(dev|lobby)\)")
        client.type("/away lunch")
        bob.expect(re.escape("*** ircuser is away (lunch)"))
        client.type("/away")
        bob.expect(re.escape("*** ircuser is back"))
        client.type(SWITCH[kind].format(window="1"))
        client.type("/whois bob")
        client.wait_for(r"connected with pyChat")
        client.wait_for(r"Welcome to the pyChat IRC network, ircuser!~[\w.-]+@pychat")   # the client's USER
        client.wait_for(r"/msg pyChat help")                            # the message of the day
        client.type("/nick ircuser2")
        bob.expect(re.escape("*** ircuser is now known as ircuser2"))
        dave.expect(re.escape("*** ircuser is now known as ircuser2"))
        client.type("/part #dev")
        bob.expect(re.escape("*** ircuser2 left #dev"))
        client.type("/quit see you")
        dave.expect(re.escape("*** ircuser2 quit (see you)"))
    finally:
        dave.close()


ACCOUNT_PASSWORD = "a long pass phrase 7"


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_real_irc_client_signs_in_to_an_account_with_sasl(start_server, connect, run_irc_client, tmp_path, kind):
    server = start_server("--irc-port", "0", "--data-dir", str(tmp_path / "data"))
    owner = connect(server, "alice")
    owner.send(f"/register {ACCOUNT_PASSWORD}")
    owner.expect(r"-- Registered ", timeout=10)
    owner.send("/quit")
    owner.wait_closed()
    server.wait_for_log(r"alice@127\.0\.0\.1 left")
    bob = connect(server, "bob")
    client = run_irc_client(kind, irc_port(server), "alice", sasl=("alice", ACCOUNT_PASSWORD))
    bob.expect(re.escape("*** alice joined #lobby"))
    client.switch_until(SWITCH[kind].format(window="1"), r"SASL authentication succe")
    client.type("/whois alice")
    client.wait_for(r"is logged in as|account\W+alice")


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_real_irc_client_and_a_pychat_client_on_one_account_are_one_person(start_server, connect,
                                                                             run_irc_client, kind):
    server = start_server("--irc-port", "0")
    laptop = connect(server, "alice")
    laptop.send(f"/register {ACCOUNT_PASSWORD}")
    laptop.expect(r"-- Registered ", timeout=10)
    laptop.send("/join #dev")
    laptop.expect(r"\*\*\* You are in #dev")
    bob = connect(server, "bob")
    bob.send("/join #dev")
    bob.expect(r"\*\*\* You are in #dev")
    laptop.expect(re.escape("*** bob joined #dev"))
    phone = run_irc_client(kind, irc_port(server), "alice", sasl=("alice", ACCOUNT_PASSWORD))
    laptop.expect(re.escape("*** You are also signed in from IRC at 127.0.0.1 (2 sessions)."), timeout=SLOW)
    says = lambda nick, text: SAYS[kind].format(nick=nick, text=re.escape(text))
    phone.switch_until(SWITCH[kind].format(window="#dev"), r"bob")       # the phone is put in alice's rooms
    laptop.send("from the laptop")
    phone.wait_for(says("alice", "from the laptop"))
    phone.type("from the phone")
    laptop.expect(re.escape("alice: from the phone"))
    bob.expect(re.escape("alice: from the phone"))
    bob.send("/msg alice psst")
    laptop.expect(re.escape("[pm from bob] psst"))
    phone.switch_until(SWITCH[kind].format(window="bob"), r"psst")     # a query window of its own
    phone.type("/quit gone to bed")
    laptop.expect(re.escape("*** Your session from IRC at 127.0.0.1 ended"), timeout=SLOW)
    laptop.send("/quit")
    assert bob.expect(r"\*\*\* alice") == "*** alice quit", "bob saw alice leave more than once"


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_real_irc_client_runs_a_limited_moderated_room_with_a_ban_beside_pychat_users(start_server, connect,
                                                                                         run_irc_client, kind):
    server = start_server("--irc-port", "0")
    client = run_irc_client(kind, irc_port(server), "ircop")
    bob = connect(server, "bob")
    server.wait_for_log(r"ircop@127\.0\.0\.1 signed in", timeout=SLOW)
    client.type("/join #ops")
    client.switch_until(SWITCH[kind].format(window="#ops"), has_joined("ircop", "#ops"))
    bob.send("/join #ops")
    bob.expect(r"\*\*\* You are in #ops")
    client.type("/mode #ops +l 2")
    bob.expect(re.escape("*** ircop set the limit of #ops to 2 people"))
    carol = connect(server, "carol")
    carol.send("/join #ops")
    assert carol.expect("!! ").startswith("!! #ops is full: it takes 2 people")
    client.type("/mode #ops +m")
    bob.expect(re.escape("*** ircop made #ops moderated: only its operators and voiced people talk"))
    bob.send("may I?")
    assert bob.expect("!! ") == "!! #ops is moderated: only its operators and those they give a voice talk."
    client.type("/mode #ops +v bob")
    bob.expect(re.escape("*** ircop gave bob a voice in #ops"))
    bob.send("thank you")
    client.wait_for(SAYS[kind].format(nick="bob", text="thank you"))
    client.type("/mode #ops +b carol")
    bob.expect(re.escape("*** ircop banned carol!*@* from #ops"))
    client.type("/mode #ops -l")
    bob.expect(re.escape("*** ircop removed the limit of #ops"))
    carol.send("/join #ops")
    assert carol.expect("!! ") == "!! You are banned from #ops."
    client.type("/mode #ops -b carol")
    bob.expect(re.escape("*** ircop lifted the ban of carol!*@* from #ops"))
    carol.send("/join #ops")
    carol.expect(r"\*\*\* You are in #ops")
    client.wait_for(has_joined("carol", "#ops"))


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_real_irc_client_runs_a_room_it_opened_and_a_pychat_user_sees_it(start_server, connect, run_irc_client,
                                                                            kind):
    server = start_server("--irc-port", "0")
    client = run_irc_client(kind, irc_port(server), "ircop")
    bob = connect(server, "bob")
    server.wait_for_log(r"ircop@127\.0\.0\.1 signed in", timeout=SLOW)
    client.type("/join #ops")                   # whoever opens a room runs it
    client.switch_until(SWITCH[kind].format(window="#ops"), has_joined("ircop", "#ops"))
    bob.send("/join #ops")
    bob.expect(r"\*\*\* You are in #ops")
    client.wait_for(has_joined("bob", "#ops"))
    client.type("/topic release on friday")
    bob.expect(re.escape("*** ircop set the topic of #ops: release on friday"))
    client.wait_for(r"release on friday")
    client.type("/mode #ops +t")
    bob.expect(re.escape("*** ircop let only operators of #ops set its topic"))
    client.type("/mode #ops +o bob")
    bob.expect(re.escape("*** ircop made bob an operator of #ops"))
    client.type("/mode #ops -o bob")
    bob.expect(re.escape("*** ircop took operator status in #ops from bob"))
    client.type("/mode #ops +i")
    bob.expect(re.escape("*** ircop made #ops invite-only"))
    client.type("/kick bob too noisy")
    bob.expect(re.escape("*** You were kicked from #ops by ircop: too noisy."))
    client.wait_for(r"bob.*(was kicked|has kicked|kicked).*too noisy|ircop has kicked bob.*too noisy")
    bob.send("/join #ops")
    bob.expect(re.escape("!! #ops is invite-only; one of its operators can /invite you."))
