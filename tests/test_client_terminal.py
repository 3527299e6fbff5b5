"""The client in a real pseudo-terminal against a real server.

A small screen model plays the client's output so the tests can assert on
what a person would see: which row holds what, and where the cursor is.
"""
from __future__ import annotations

import codecs
import datetime
import fcntl
import os
import pathlib
import re
import select
import signal
import socket
import struct
import subprocess
import termios
import time
import unicodedata

import pytest

from conftest import script_command

CLIENT = pathlib.Path(__file__).resolve().parent.parent / "pyChat-client.py"
TIMEOUT = 5.0

LEFT, RIGHT, HOME, END, DELETE = "\x1b[D", "\x1b[C", "\x1b[H", "\x1b[F", "\x1b[3~"
UP, DOWN = "\x1b[A", "\x1b[B"
BACKSPACE, CTRL_A, CTRL_E, CTRL_U, CTRL_K, CTRL_W = "\x7f", "\x01", "\x05", "\x15", "\x0b", "\x17"
CTRL_C, CTRL_D = "\x03", "\x04"


# -- a tiny terminal -------------------------------------------------------------

def cell_width(char: str) -> int:
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


class Screen:
    """rows x cols cells; understands CR, LF, BS and the CSI sequences K, J, A-D, G, H, m, r (a
    scroll region) and the private modes ?N h / l (kept in `modes`)."""

    CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z@])")

    def __init__(self, rows: int, cols: int) -> None:
        self.rows, self.cols = rows, cols
        self.cells = [[" "] * cols for _ in range(rows)]
        self.row = self.col = 0
        self.top, self.bottom = 0, rows - 1    # the scroll region
        self.modes: set[str] = set()
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.unparsed = ""

    def feed(self, data: bytes) -> None:
        text = self.unparsed + self.decoder.decode(data)
        self.unparsed = ""
        index = 0
        while index < len(text):
            char = text[index]
            if char == "\x1b":
                match = self.CSI.match(text, index)
                if not match:
                    if re.fullmatch(r"\x1b(\[[0-9;?]*)?", text[index:]):
                        self.unparsed = text[index:]   # the rest comes in the next read
                        return
                    index += 1
                    continue
                self.control(match.group(1), match.group(2))
                index = match.end()
                continue
            self.put(char)
            index += 1

    def put(self, char: str) -> None:
        if char == "\r":
            self.col = 0
        elif char == "\n":
            self.line_feed()
        elif char == "\b":
            self.col = max(0, self.col - 1)
        elif ord(char) < 32:
            pass
        elif cell_width(char) == 0:
            previous = self.cells[self.row][max(0, self.col - 1)]
            self.cells[self.row][max(0, self.col - 1)] = previous + char
        else:
            width = cell_width(char)
            if self.col + width > self.cols:   # autowrap
                self.col = 0
                self.line_feed()
            self.cells[self.row][self.col] = char
            if width == 2:
                self.cells[self.row][self.col + 1] = ""
            self.col += width

    def line_feed(self) -> None:
        if self.row == self.bottom:
            del self.cells[self.top]
            self.cells.insert(self.bottom, [" "] * self.cols)
        elif self.row < self.rows - 1:
            self.row += 1

    def control(self, parameters: str, final: str) -> None:
        if parameters.startswith("?"):
            if final == "h":
                self.modes.add(parameters)
            elif final == "l":
                self.modes.discard(parameters)
            return
        numbers = [int(part) if part.isdigit() else 0 for part in parameters.split(";")]
        count = max(1, numbers[0])
        if final == "K":
            start = {0: min(self.col, self.cols), 1: 0, 2: 0}[numbers[0]]
            end = self.cols if numbers[0] != 1 else self.col + 1
            self.cells[self.row][start:end] = [" "] * (end - start)
        elif final == "C":
            self.col = min(self.cols - 1, self.col + count)
        elif final == "D":
            self.col = max(0, self.col - count)
        elif final == "G":
            self.col = min(self.cols - 1, count - 1)
        elif final == "A":
            self.row = max(0, self.row - count)
        elif final == "B":
            self.row = min(self.rows - 1, self.row + count)
        elif final == "H":   # a terminal keeps the cursor on the screen, whatever it is told
            self.row = min(max(1, numbers[0]), self.rows) - 1
            self.col = min(max(1, numbers[1]), self.cols) - 1 if len(numbers) > 1 else 0
        elif final == "r":
            self.top = max(1, numbers[0]) - 1
            self.bottom = (numbers[1] if len(numbers) > 1 and numbers[1] else self.rows) - 1
            self.row = self.col = 0
        elif final == "J" and numbers[0] == 2:
            self.cells = [[" "] * self.cols for _ in range(self.rows)]
        elif final == "J":
            self.cells[self.row][self.col:] = [" "] * (self.cols - self.col)
            self.cells[self.row + 1:] = [[" "] * self.cols for _ in range(self.rows - self.row - 1)]

    def line(self, row: int) -> str:
        return "".join(self.cells[row]).rstrip()

    @property
    def cursor_line(self) -> str:
        """The row the cursor is on: the input line."""
        return self.line(self.row)

    @property
    def cursor_text(self) -> str:
        """What is left of the cursor on its row."""
        return "".join(self.cells[self.row][:self.col])

    def dump(self) -> str:
        rows = [f"{number:2} |{self.line(number)}" for number in range(self.rows)]
        return "\n".join(rows) + f"\ncursor at row {self.row}, column {self.col}"


def test_screen_model_plays_wide_characters_erase_and_cursor_moves():
    screen = Screen(3, 10)
    screen.feed("漢字abc\r\x1b[Kxy\x1b[1C\x1b[31mz\x1b[0m\r\nnext\x1b[2Db".encode())
    assert [screen.line(0), screen.line(1)] == ["xy z", "nebt"]
    assert (screen.row, screen.col) == (1, 3)
    screen.feed("\r\x1b[K0123456789ab".encode())
    assert [screen.line(1), screen.line(2)] == ["0123456789", "ab"]
    screen.feed(b"\x1b[1A\x1b[3G\x1b[J")
    assert [screen.line(0), screen.line(1), screen.line(2)] == ["xy z", "01", ""]


def test_screen_model_scrolls_only_its_scroll_region():
    screen = Screen(4, 10)
    screen.feed(b"\x1b[?2004h\x1b[1;3r\x1b[4;1Hinput\x1b[1;1Hone\r\ntwo\r\nthree\r\nfour")
    assert [screen.line(row) for row in range(4)] == ["two", "three", "four", "input"]
    assert screen.modes == {"?2004"}
    screen.feed(b"\x1b[r\x1b[?2004l")
    assert (screen.top, screen.bottom, screen.modes) == (0, 3, set())


# -- the client in a pseudo-terminal ------------------------------------------------

def set_window_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def become_session_leader_of_tty() -> None:
    """In the child: make the pty its controlling terminal, so it receives SIGWINCH."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class ClientInPty:
    """pyChat-client.py running in a pseudo-terminal, with a Screen of what it showed."""

    def __init__(self, args: list[str], rows: int = 24, cols: int = 80,
                 env: dict | None = None) -> None:
        self.master, self.slave = os.openpty()
        set_window_size(self.slave, rows, cols)
        self.mode_before = termios.tcgetattr(self.slave)
        self.screen = Screen(rows, cols)
        self.output = bytearray()
        environment = {name: value for name, value in os.environ.items() if name != "NO_COLOR"}
        environment.update(TERM="xterm", **(env or {}))
        self.process = subprocess.Popen(
            script_command(CLIENT, *args), stdin=self.slave, stdout=self.slave,
            stderr=self.slave, preexec_fn=become_session_leader_of_tty, env=environment)

    def read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:
            return False
        self.output += data
        self.screen.feed(data)
        return bool(data)

    def wait_for(self, condition, what: str, timeout: float = TIMEOUT) -> None:
        """Read until condition(screen) holds; fail showing the screen if it never does."""
        deadline = time.monotonic() + timeout
        while not condition(self.screen):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"timed out waiting for {what}; the screen shows:\n{self.screen.dump()}")
            self.read(min(left, 0.2))

    def wait_for_input_line(self, expected: str, timeout: float = TIMEOUT) -> None:
        """Wait until the cursor's row shows `expected`, with the cursor right after it."""
        self.wait_for(lambda screen: screen.cursor_line == expected.rstrip()
                      and screen.cursor_text == expected,
                      f"input line {expected!r} with the cursor at its end", timeout)

    def wait_for_row(self, pattern: str, timeout: float = TIMEOUT) -> int:
        """Wait until a row above the input line matches the regex; returns its number."""
        found = []

        def condition(screen: Screen) -> bool:
            found[:] = [row for row in range(screen.row) if re.search(pattern, screen.line(row))]
            return bool(found)

        self.wait_for(condition, f"a row matching {pattern!r}", timeout)
        return found[-1]

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode("utf-8"))

    def type_hidden(self, keys: str, prompt: str) -> None:
        """Type KEYS at a secret prompt, and wait until the client has drawn its input row again after
        them: nothing of them may be on it (it still shows only PROMPT, the cursor right after it)."""
        drawn = len(self.output)
        self.type(keys)
        self.wait_for(lambda screen: len(self.output) > drawn, "the input row drawn again after the keys")
        self.wait_for_input_line(prompt)
        assert self.screen.cursor_line == prompt.rstrip(), self.screen.dump()

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        """Wait for the client to exit, still reading what it prints."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"client did not exit; the screen shows:\n{self.screen.dump()}")
            self.read(0.05)
        while self.read(0.05):
            pass
        return self.process.returncode

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def run_client():
    """Factory: run_client(server, "--nick", "alice", rows=24, cols=80) -> ClientInPty."""
    started: list[ClientInPty] = []

    def start(server, *args: str, rows: int = 24, cols: int = 80, env: dict | None = None):
        client = ClientInPty(["--host", server.host, "--port", str(server.port), *args],
                             rows, cols, env)
        started.append(client)
        return client

    yield start
    for client in started:
        client.close()


class FakeServer:
    """A real listening socket on 127.0.0.1 (port 0) that plays a server from a script.

    For what the real server cannot be made to do (hostile lines) or does
    not do yet. Tests send it lines to write and wait for the lines the
    client writes, each wait with a deadline.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = self.listener.getsockname()[:2]
        self.sock: socket.socket | None = None
        self.buffer = b""
        self.heard: list[str] = []

    def accept(self, timeout: float = TIMEOUT) -> None:
        self.listener.settimeout(timeout)
        try:
            self.sock, _ = self.listener.accept()
        except socket.timeout:
            pytest.fail(f"the client did not connect within {timeout} s")
        self.buffer = b""

    def send(self, *lines: str) -> None:
        self.sock.sendall("".join(line + "\n" for line in lines).encode("utf-8"))

    def expect(self, pattern: str, timeout: float = TIMEOUT) -> str:
        """The next line from the client that matches pattern (from its start)."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\n", 1)
                line = raw.decode("utf-8")
                self.heard.append(line)
                if re.match(pattern, line):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"the client never sent a line matching {pattern!r}; it sent {self.heard[-10:]}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                pytest.fail(f"the client closed the connection; it sent {self.heard[-10:]}")
            self.buffer += data

    def hang_up(self, timeout: float = TIMEOUT) -> None:
        """Close the connection as a server does: everything sent arrives first (a close with
        unread input would be a reset, which can overtake it)."""
        self.sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    break
            except (socket.timeout, OSError):
                break
        self.sock.close()

    def sign_in(self, nick: str = "alice", greeting: str = "*** pyChat 1.0.0: 1 online.") -> None:
        """Accept the client and take it through the greeting and the nickname to #lobby."""
        self.accept()
        self.send(greeting, "*** Choose a nickname:")
        self.expect(re.escape(nick) + "$")
        self.send(f"*** Welcome, {nick}! Type /help for the commands.",
                  "*** You are in #lobby, alone for now.")

    def close(self) -> None:
        if self.sock:
            self.sock.close()
        self.listener.close()


@pytest.fixture
def fake_server():
    server = FakeServer()
    yield server
    server.close()


def signed_in(run_client, server, nick: str = "alice", bell: bool = False, **size) -> ClientInPty:
    client = run_client(server, "--nick", nick, *(["--bell"] if bell else []), **size)
    client.wait_for_input_line(f"{nick} #lobby> ")
    return client


# -- the half-typed line survives incoming messages -------------------------------------

def test_incoming_message_is_printed_above_the_half_typed_line(server, connect, run_client):
    bob = connect(server, "bob")
    alice = signed_in(run_client, server)
    alice.type("hello wor")
    alice.wait_for_input_line("alice #lobby> hello wor")
    bob.send("good morning")
    row = alice.wait_for_row(r"^\[\d\d:\d\d:\d\d\] bob: good morning$")
    alice.wait_for_input_line("alice #lobby> hello wor")
    assert row == alice.screen.row - 1, alice.screen.dump()
    alice.type("ld\r")
    assert bob.expect(r"^alice: ") == "alice: hello world"


def test_cjk_half_typed_line_survives_and_is_sent_intact(server, connect, run_client):
    bob = connect(server, "bob")
    alice = signed_in(run_client, server)
    alice.type("你好世")
    alice.wait_for_input_line("alice #lobby> 你好世")
    assert alice.screen.col == len("alice #lobby> ") + 6
    bob.send("こんにちは")
    alice.wait_for_row(r"bob: こんにちは$")
    alice.wait_for_input_line("alice #lobby> 你好世")
    alice.type(f"界{LEFT}{LEFT}{BACKSPACE}🙂\r")
    assert bob.expect(r"^alice: ") == "alice: 你🙂世界"


def test_narrow_terminal_scrolls_long_input_sideways_on_one_row(server, connect, run_client):
    bob = connect(server, "bob")
    alice = signed_in(run_client, server, cols=30)
    text = "the quick brown fox jumps over the lazy dog 0123456789"
    alice.type(text)
    alice.wait_for(lambda screen: screen.cursor_line.endswith("0123456789"), "tail of the input")
    assert len(alice.screen.cursor_line) <= 29, alice.screen.dump()
    assert not any("quick" in alice.screen.line(row) for row in range(alice.screen.rows))
    bob.send("short one")
    row = alice.wait_for_row("bob: short one")
    alice.wait_for(lambda screen: screen.cursor_line.endswith("0123456789"), "input redrawn")
    assert row == alice.screen.row - 1, alice.screen.dump()
    alice.type(HOME)
    alice.wait_for(lambda screen: screen.cursor_line.startswith("alice #lobby> the quick")
                   and screen.col == len("alice #lobby> "), "start of the input after Home")
    alice.type("\r")
    assert bob.expect(r"^alice: ") == f"alice: {text}"


def test_wide_input_in_narrow_terminal_never_splits_a_character(server, connect, run_client):
    bob = connect(server, "bob")
    alice = signed_in(run_client, server, cols=30)
    text = "漢字かな" * 5
    alice.type(text)
    alice.wait_for(lambda screen: screen.cursor_line.endswith("漢字かな"), "tail of wide input")
    assert sum(cell_width(char) for char in alice.screen.cursor_line) <= 29
    alice.type("\r")
    assert bob.expect(r"^alice: ") == f"alice: {text}"


def test_resize_redraws_input_for_new_width_without_a_key_press(server, run_client):
    alice = signed_in(run_client, server)
    alice.type("x" * 40 + "END")
    alice.wait_for_input_line("alice #lobby> " + "x" * 40 + "END")
    set_window_size(alice.slave, 24, 20)   # the client gets SIGWINCH
    alice.screen = Screen(24, 20)          # the model of the new, narrower terminal
    alice.wait_for(lambda screen: screen.cursor_line.endswith("xxEND")
                   and len(screen.cursor_line) <= 19, "input redrawn at 20 columns")


# -- editing ---------------------------------------------------------------------------

@pytest.mark.parametrize("keys, sent", [
    (f"hello world{CTRL_W}there", "hello there"),
    (f"hello world{LEFT * 5}{CTRL_K}you", "hello you"),
    (f"junk{CTRL_U}clean", "clean"),
    (f"bc{HOME}a{END}d", "abcd"),
    (f"bc{CTRL_A}a{CTRL_E}d", "abcd"),
    (f"abxc{LEFT}{BACKSPACE}", "abc"),
    (f"abxc{LEFT}{LEFT}{DELETE}{RIGHT}!", "abc!"),
    (f"ab{CTRL_A}{CTRL_D}", "b"),
])
def test_editing_keys_change_the_line_that_is_sent(shared_server, connect, run_client, keys, sent):
    bob = connect(shared_server, "bob")
    alice = signed_in(run_client, shared_server)
    alice.type(keys + "\r")
    assert bob.expect(r"^alice: ") == f"alice: {sent}"


def test_history_recalls_sent_lines_with_up_and_down(server, connect, run_client):
    bob = connect(server, "bob")
    alice = signed_in(run_client, server)
    alice.type("first\r")
    bob.expect("^alice: first$")
    alice.type("second\r")
    bob.expect("^alice: second$")
    alice.type("draft")
    alice.type(UP + UP)
    alice.wait_for_input_line("alice #lobby> first")
    alice.type(DOWN)
    alice.wait_for_input_line("alice #lobby> second")
    alice.type(DOWN)
    alice.wait_for_input_line("alice #lobby> draft")
    alice.type(UP + UP + " again\r")
    assert bob.expect(r"^alice: ") == "alice: first again"


def test_tab_completes_a_command(server, run_client):
    alice = signed_in(run_client, server)
    alice.type("/onl\t")
    alice.wait_for_input_line("alice #lobby> /online ")


def test_tab_completes_a_nickname_seen_joining(server, connect, run_client):
    alice = signed_in(run_client, server)
    bob = connect(server, "bob")
    alice.wait_for_row(r"\*\*\* bob joined")
    alice.type("bo\t")
    alice.wait_for_input_line("alice #lobby> bob: ")
    alice.type("lunch?\r")
    assert bob.expect(r"^alice: ") == "alice: bob: lunch?"


def test_tab_completes_a_nickname_that_was_online_before_me(server, connect, run_client):
    bob = connect(server, "bob")
    alice = signed_in(run_client, server)
    alice.type("/msg b")
    # The client learns who is here from a reply it cannot be seen waiting for:
    # press Tab until it completes (once completed, another Tab changes nothing).
    deadline = time.monotonic() + TIMEOUT
    while alice.screen.cursor_line != "alice #lobby> /msg bob":
        if time.monotonic() > deadline:
            pytest.fail(f"Tab never completed the nickname; the screen shows:\n{alice.screen.dump()}")
        alice.type("\t")
        alice.read(0.3)
    alice.wait_for_input_line("alice #lobby> /msg bob ")
    alice.type("psst\r")
    assert bob.expect(r"^\[pm from alice\] ") == "[pm from alice] psst"
    assert b"online:" not in alice.output   # the roster was learnt quietly


# -- signing in ------------------------------------------------------------------------

def test_nick_option_signs_in_without_asking(server, connect, run_client):
    bob = connect(server, "bob")
    alice = signed_in(run_client, server)
    alice.wait_for_row(r"Welcome, alice!")
    bob.expect(r"^\*\*\* alice joined")


def test_without_nick_the_nickname_is_typed_on_the_input_line(server, run_client):
    client = run_client(server)
    client.wait_for_input_line("nickname: ")
    client.type("carol\r")
    client.wait_for_input_line("carol #lobby> ")


def test_refused_nick_on_a_terminal_asks_again(server, run_client):
    client = run_client(server, "--nick", "admin")
    client.wait_for_row(r"!! ")
    client.wait_for_input_line("nickname: ")
    client.type("dave\r")
    client.wait_for_input_line("dave #lobby> ")


# -- leaving ---------------------------------------------------------------------------

def test_server_restart_signs_in_again_and_keeps_the_half_typed_line(start_server, connect, run_client):
    server = start_server()
    alice = signed_in(run_client, server)
    alice.type("half a tho")
    alice.wait_for_input_line("alice #lobby> half a tho")
    server.stop()
    alice.wait_for_row(r"-!- disconnected: ")
    alice.wait_for_row(r"-!- connecting again in 1 s \(Ctrl-C twice, Ctrl-D or /quit leaves")
    alice.wait_for_input_line("offline alice #lobby> half a tho")
    alice.wait_for_row(rf"-!- cannot connect to {server.host}:{server.port}: ")
    alice.wait_for_row(r"-!- connecting again in 2 s")      # the delay grows while no one answers
    again = start_server("--port", str(server.port))
    alice.wait_for_row(rf"-!- connected to {server.host}:{server.port} again; signing in as alice",
                       timeout=15)
    alice.wait_for_input_line("alice #lobby> half a tho")
    bob = connect(again, "bob")
    alice.type("ught\r")
    assert bob.expect(r"^alice: ") == "alice: half a thought"
    assert alice.process.poll() is None


def test_leaving_while_waiting_to_connect_again_exits_at_once_showing_what_was_not_sent(server, run_client):
    alice = signed_in(run_client, server)
    alice.type("half a tho")
    alice.wait_for_input_line("alice #lobby> half a tho")
    server.stop()
    alice.wait_for_row(r"-!- connecting again in")
    alice.type("ught\r")
    alice.wait_for_input_line("offline (1 waiting) alice #lobby> ")
    alice.type(CTRL_C)
    assert alice.wait_exit() == 0
    assert termios.tcgetattr(alice.slave) == alice.mode_before
    rows = [alice.screen.line(row) for row in range(alice.screen.rows)]
    assert any(row.endswith("-!- not sent: half a thought") for row in rows), alice.screen.dump()


def test_put_out_by_an_operator_the_client_does_not_come_back(start_server, connect, run_client):
    server = start_server("--op-password", "letmein")
    bob = connect(server, "bob")
    alice = signed_in(run_client, server)
    bob.send("/op letmein")
    bob.send("/help disconnect")      # a server with rooms disconnects with /disconnect, an older one with /kick
    command = "/kick" if bob.expect(r"-- /disconnect|!! .*disconnect").startswith("!! ") else "/disconnect"
    bob.send(f"{command} alice enough")
    assert alice.wait_exit() == 1
    rows = [alice.screen.line(row) for row in range(alice.screen.rows)]
    assert any(re.search(r"-!- disconnected: by bob: enough$", row) for row in rows), alice.screen.dump()
    assert not any("connecting again" in row for row in rows), alice.screen.dump()


def test_put_out_for_a_reason_the_client_says_it_and_does_not_come_back(fake_server, run_client):
    alice = run_client(fake_server, "--nick", "alice")
    fake_server.sign_in("alice")
    alice.wait_for_input_line("alice #lobby> ")
    fake_server.send("!! Disconnected: sending too fast.")
    fake_server.hang_up()
    assert alice.wait_exit() == 1
    rows = [alice.screen.line(row) for row in range(alice.screen.rows)]
    assert any(row.endswith("-!- disconnected: sending too fast") for row in rows), alice.screen.dump()


@pytest.mark.parametrize("keys", [CTRL_D, CTRL_C + CTRL_C, "/quit\r"])
def test_leaving_exits_zero_and_restores_terminal(shared_server, run_client, keys):
    alice = signed_in(run_client, shared_server)
    alice.type(keys)
    assert alice.wait_exit() == 0
    assert termios.tcgetattr(alice.slave) == alice.mode_before


def test_ctrl_d_while_asked_for_a_nickname_leaves_at_once(server, run_client):
    client = run_client(server)
    client.wait_for_input_line("nickname: ")
    client.type(CTRL_D)
    assert client.wait_exit(timeout=2) == 0
    assert termios.tcgetattr(client.slave) == client.mode_before


def test_no_color_option_and_environment_turn_colours_off(server, run_client):
    for args, env in ((["--no-color"], None), ([], {"NO_COLOR": "1"})):
        client = run_client(server, "--nick", f"plain{len(args)}", *args, env=env)
        client.wait_for_row("Welcome")
        client.type(CTRL_D)
        client.wait_exit()
        assert not re.search(rb"\x1b\[[0-9;]*m", client.output), bytes(client.output)


def test_colours_are_on_in_a_terminal_by_default(server, run_client):
    alice = signed_in(run_client, server)
    alice.wait_for_row("Welcome")
    assert re.search(rb"\x1b\[[0-9;]*m", alice.output)


def test_password_typed_on_the_terminal_is_not_shown(start_server, run_client):
    server = start_server("--password", "sesame")
    client = run_client(server, "--nick", "erin")
    client.wait_for_input_line("password: ")
    client.type_hidden("sesa", "password: ")
    client.type("me\r")
    client.wait_for_input_line("erin #lobby> ")
    assert b"sesa" not in client.output


def test_bell_rings_when_someone_mentions_me(server, connect, run_client):
    bob = connect(server, "bob")
    alice = signed_in(run_client, server, "alice", bell=True)
    bob.send("nothing for anyone")
    alice.wait_for_row("bob: nothing for anyone")
    assert b"\a" not in alice.output
    bob.send("hey Alice, look")
    alice.wait_for_row("bob: hey Alice, look")
    assert b"\a" in alice.output


def test_history_replay_shows_time_in_local_zone_without_the_prefix(server, connect, run_client):
    bob = connect(server, "bob")
    bob.send("said before alice came")
    bob.expect("^bob: said before")
    alice = run_client(server, "--nick", "alice", env={"TZ": "UTC-9"})   # nine hours east
    row = alice.wait_for_row(r"bob: said before alice came$")
    shown = re.fullmatch(r"\[(\d\d):(\d\d):(\d\d)\] bob: said before alice came",
                         alice.screen.line(row))
    assert shown, alice.screen.dump()
    tokyo = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=9)
    seconds = int(shown[1]) * 3600 + int(shown[2]) * 60 + int(shown[3])
    expected = tokyo.hour * 3600 + tokyo.minute * 60 + tokyo.second
    assert min((expected - seconds) % 86400, (seconds - expected) % 86400) <= 10
    assert b"[history" not in alice.output
    assert b"\x1b[2mbob: said before" in alice.output   # dimmed


def test_sigterm_restores_terminal_and_exits_with_signal_status(server, run_client):
    alice = signed_in(run_client, server)
    alice.type("typing")
    alice.wait_for_input_line("alice #lobby> typing")
    alice.process.send_signal(signal.SIGTERM)
    assert alice.wait_exit() == 128 + signal.SIGTERM
    assert termios.tcgetattr(alice.slave) == alice.mode_before


def test_prompt_follows_my_new_nickname(server, run_client):
    alice = signed_in(run_client, server)
    alice.type("/nick alicia\r")
    alice.wait_for_input_line("alicia #lobby> ")
