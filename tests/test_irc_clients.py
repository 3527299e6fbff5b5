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
import tempfile
import time
from pathlib import Path

import pytest

from conftest import LineClient, ServerProcess, TIMEOUT

SLOW = 10.0         # a real client's round trips, on a machine busy with other tests


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
        """Type TEXT and press Enter."""
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

    def close(self) -> None:
        subprocess.run([self.tmux, "-S", self.socket, "kill-server"], capture_output=True, timeout=TIMEOUT)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def _quote(part: str) -> str:
    return "'" + part.replace("'", "'\\''") + "'"


def irssi(workdir: Path, port: int, nick: str) -> TmuxSession:
    """irssi signing in as NICK, with a home of its own: no reconnecting, no user mode, no logs."""
    home = workdir / "irssi"
    home.mkdir()
    (home / "config").write_text(
        'settings = {\n'
        f'  core = {{ real_name = "{nick} in irssi"; user_name = "{nick}"; nick = "{nick}";\n'
        '           settings_autosave = "no"; server_reconnect_time = "-1"; };\n'
        '  "irc/core" = { usermode = ""; };\n'
        '  "fe-common/core" = { autolog = "no"; };\n'
        '};\n')
    return TmuxSession([require("irssi"), f"--home={home}", "-c", "127.0.0.1", "-p", str(port), "-n", nick],
                       workdir)


def weechat(workdir: Path, port: int, nick: str) -> TmuxSession:
    """WeeChat signing in as NICK, with a home of its own and only its IRC plugin: no reconnecting,
    no autojoin, no TLS (the option is 'ssl' before WeeChat 4 and 'tls' after; one of the two
    settings below is refused, harmlessly)."""
    home = workdir / "weechat"
    commands = "; ".join([
        f"/set irc.server_default.nicks {nick}", f"/set irc.server_default.username {nick}",
        f"/set irc.server_default.realname {nick}_in_WeeChat", "/set irc.server_default.autoreconnect off",
        f"/server add pychat 127.0.0.1/{port}", "/set irc.server.pychat.tls off",
        "/set irc.server.pychat.ssl off", "/connect pychat"])
    return TmuxSession([require("weechat"), "--dir", str(home), "--plugins", "irc", "--run-command", commands],
                       workdir)


CLIENTS = {"irssi": irssi, "weechat": weechat}


@pytest.fixture
def irc_server(start_server) -> tuple[ServerProcess, int]:
    """A server with an IRC port; returns it and the IRC port."""
    server = start_server("--irc-port", "0")
    return server, int(server.wait_for_log(r"listening for IRC on \S+:(\d+)").group(1))


@pytest.fixture
def run_irc_client(tmp_path):
    """A factory: run_irc_client("irssi", port, nick) starts that client in tmux; all are closed at the end."""
    sessions: list[TmuxSession] = []

    def start(kind: str, port: int, nick: str) -> TmuxSession:
        workdir = tmp_path / f"{kind}-{nick}"
        workdir.mkdir()
        session = CLIENTS[kind](workdir, port, nick)
        sessions.append(session)
        return session

    yield start
    for session in sessions:
        session.close()


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_real_irc_client_signs_in_and_reads_the_welcome_and_the_message_of_the_day(
        irc_server, run_irc_client, kind):
    server, port = irc_server
    client = run_irc_client(kind, port, "ircuser")
    client.wait_for(r"Welcome to the pyChat IRC network, ircuser!~ircuser@irc")
    client.wait_for(r"/msg pyChat help")
    server.wait_for_log(r"ircuser@127\.0\.0\.1 signed in")
