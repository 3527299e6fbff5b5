"""Shared fixtures: a real pyChat server process on an ephemeral loopback port, and raw line clients.

Every wait here has a deadline and fails with what was seen. To prove that a
line did NOT arrive, have someone send a later line and check that it comes
first: that needs no guess about how long to wait.
"""
from __future__ import annotations

import atexit
import importlib.util
import re
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = ROOT / "pyChat-server.py"
TIMEOUT = 5.0
BYTECODE_CACHE = tempfile.mkdtemp(prefix="pychat-test-bytecode-")
atexit.register(shutil.rmtree, BYTECODE_CACHE, ignore_errors=True)


def script_command(script: Path, *args: str) -> list[str]:
    """The command that runs SCRIPT with ARGS as `python3 SCRIPT ARGS` does, without compiling SCRIPT anew
    each time (tests/run_script.py): a third of what starting a server costs.

    Python starts without site-packages (-S), which also shows that the scripts need nothing outside the
    standard library (on Linux: the client's colorama is for Windows), and makes them start sooner.
    """
    return [sys.executable, "-S", str(ROOT / "tests" / "run_script.py"), BYTECODE_CACHE, str(script), *args]


def import_script(path: Path, name: str):
    """Import a script whose file name is not a module name (pyChat-server.py) as module NAME."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def database_rows(data_dir: Path, query: str, parameters: tuple = ()) -> list[tuple]:
    """Rows of the server's database in DATA_DIR (read only, beside a running server or after one)."""
    import sqlite3
    db = sqlite3.connect(f"file:{Path(data_dir) / 'pychat.db'}?mode=ro", uri=True, timeout=5.0)
    try:
        return db.execute(query, parameters).fetchall()
    finally:
        db.close()


def memory_kib(pid: int) -> int:
    """Resident memory of process PID, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def shown(lines: list[str], most: int = 15, width: int = 160) -> str:
    """The last few lines, each cut short, for a failure message that stays readable."""
    cut = [line if len(line) <= width else line[:width] + f"...({len(line)} chars)" for line in lines[-most:]]
    return ("..." if len(lines) > most else "") + repr(cut)


class ServerProcess:
    """A pyChat server started as a separate process; its log is collected as it is written."""

    def __init__(self, args: tuple[str, ...], script: Path = SERVER_SCRIPT, env: dict | None = None) -> None:
        self.command = script_command(script, "--host", "127.0.0.1", "--port", "0", *args)
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, env=env)
        self._log: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._collect_log, daemon=True).start()
        found = self.wait_for_log(r"listening on (\S+):(\d+)", timeout=10)
        self.host, self.port = found.group(1), int(found.group(2))

    def _collect_log(self) -> None:
        for line in self.process.stderr:
            with self._changed:
                self._log.append(line)
                self._changed.notify_all()
        with self._changed:
            self._log.append("")    # end of the log: wake waiters so they can fail at once
            self._changed.notify_all()

    def log(self) -> str:
        """Everything the server has logged so far."""
        with self._changed:
            return "".join(self._log)

    def wait_for_log(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        """Wait until the log matches PATTERN; fail with the log if it does not in time."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = re.search(pattern, "".join(self._log))
                if found:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self._log and self._log[-1] == ""):
                    pytest.fail(f"server log never matched {pattern!r}; log:\n{''.join(self._log)}")
                self._changed.wait(remaining)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the server and wait for it to exit; returns its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"server did not exit within {timeout} s of signal {sig}; log:\n{self.log()}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class LineClient:
    """A raw TCP client that speaks the protocol line by line, as nc would."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None,
                 server_hostname: str = "localhost", source: str | None = None) -> None:
        # SOURCE: the loopback address to connect from (127.0.0.2, ::1...), standing for another person's machine.
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT,
                                             source_address=(source, 0) if source else None)
        if tls is not None:
            try:
                self.sock = tls.wrap_socket(self.sock, server_hostname=server_hostname)
            except BaseException:
                self.sock.close()
                raise
        self.buffer = b""
        self.seen: list[str] = []
        self.nick: str | None = None

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode("utf-8") + b"\n")

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read_more(self, deadline: float, waiting_for: str) -> bytes:
        """Bytes from the socket (b"" once it is closed); fails if none come before DEADLINE."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"{waiting_for} did not come in time; lines so far: {shown(self.seen)}")
            self.sock.settimeout(remaining)
            try:
                return self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                return b""

    def recv_line(self, timeout: float = TIMEOUT) -> str:
        """The next line from the server, without its newline; fails if none comes in time."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            data = self._read_more(deadline, f"a line within {timeout} s")
            if not data:
                pytest.fail(f"server closed the connection; lines so far: {shown(self.seen)}")
            self.buffer += data
        raw, self.buffer = self.buffer.split(b"\n", 1)
        line = raw.decode("utf-8")
        self.seen.append(line)
        return line

    def expect(self, pattern: str, timeout: float = TIMEOUT) -> str:
        """Read lines until one matches the regular expression PATTERN (from its start); return it."""
        deadline = time.monotonic() + timeout
        start = len(self.seen)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no line matching {pattern!r} within {timeout} s; got: {shown(self.seen[start:])}")
            line = self.recv_line(remaining)
            if re.match(pattern, line):
                return line

    def lines_until(self, pattern: str, timeout: float = TIMEOUT) -> list[str]:
        """Every line up to and including the first that matches PATTERN."""
        start = len(self.seen)
        self.expect(pattern, timeout)
        return self.seen[start:]

    def login(self, nick: str) -> str:
        """Sign in as NICK; returns the welcome line once the room has been shown."""
        self.expect(re.escape("*** Choose a nickname:"))
        self.send(nick)
        welcome = self.expect(r"\*\*\* Welcome, |!! ")
        assert welcome.startswith("*** Welcome, "), f"nickname {nick!r} refused: {welcome}"
        self.expect(r"\*\*\* You are in #")
        self.nick = nick
        return welcome

    def wait_closed(self, timeout: float = TIMEOUT) -> list[str]:
        """Read until the server closes the connection; returns the lines read meanwhile."""
        deadline = time.monotonic() + timeout
        start = len(self.seen)
        while data := self._read_more(deadline, f"the server's close within {timeout} s"):
            self.buffer += data
        self.seen += self.buffer.decode("utf-8", "replace").splitlines()
        self.buffer = b""
        return self.seen[start:]

    def close(self) -> None:
        self.sock.close()


class ClientFrom(LineClient):
    """A line client whose connection comes from SOURCE: another loopback address (127.0.0.2, ::1...),
    to stand for another person's machine."""

    def __init__(self, host: str, port: int, source: str) -> None:
        super().__init__(host, port, source=source)


def watch_for(client: LineClient, pattern: str, timeout: float) -> str | None:
    """The first line matching PATTERN within TIMEOUT, or None if none came and the connection is still open."""
    deadline = time.monotonic() + timeout
    while True:
        while b"\n" in client.buffer:
            raw, client.buffer = client.buffer.split(b"\n", 1)
            line = raw.decode("utf-8")
            client.seen.append(line)
            if re.match(pattern, line):
                return line
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        client.sock.settimeout(remaining)
        try:
            data = client.sock.recv(65536)
        except socket.timeout:
            continue
        assert data, f"server closed {client.nick or 'the connection'} unexpectedly; lines: {shown(client.seen)}"
        client.buffer += data


def read_until(sock: socket.socket, marker: bytes, timeout: float = TIMEOUT) -> bytes:
    """Bytes from a raw socket up to and including MARKER; fails if it does not come in time."""
    deadline = time.monotonic() + timeout
    data = b""
    while marker not in data:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{marker!r} did not come within {timeout} s; got {data[-300:]!r}"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        assert chunk, f"connection closed before {marker!r}; got {data[-300:]!r}"
        data += chunk
    return data


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset (RST) instead of a FIN, as a crashed peer or a middlebox would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def seconds_until_closed(sock: socket.socket, dribble: bytes, most: float) -> float | None:
    """Send DRIBBLE one byte every 0.3 s (then nothing) until the server closes SOCK.

    Returns the seconds that took, or None if SOCK is still open after MOST seconds.
    """
    started = time.monotonic()
    for sent in range(int(most / 0.3) + 1):
        try:
            if sent < len(dribble):
                sock.sendall(dribble[sent:sent + 1])
            readable, _, _ = select.select([sock], [], [], 0.3)
            if readable and not sock.recv(65536):
                return time.monotonic() - started
        except OSError:                          # reset by the server: closed as well
            return time.monotonic() - started
    return None


def talk_until_cut_off(server: ServerProcess, speaker: LineClient, listener: LineClient, stalled_nick: str) -> None:
    """SPEAKER says 1 kB lines, each reaching LISTENER and SPEAKER within a second, until the server
    cuts off STALLED_NICK, a signed-in client that never reads; fails if it never does."""
    text = "x" * 1000
    for n in range(5000):                 # up to 5 MB: far more than a stalled socket can hold
        speaker.send(f"{n} {text}")
        assert listener.expect(f"{speaker.nick}: {n} ", timeout=1)
        speaker.expect(f"{speaker.nick}: {n} ", timeout=1)
        if any(line.startswith(f"*** {stalled_nick} quit") for line in listener.seen):
            break
    server.wait_for_log(rf"cutting off {stalled_nick}@127\.0\.0\.1: not reading")
    assert [line for line in listener.seen if line.startswith(f"*** {stalled_nick} quit (not reading")], \
        f"the room was not told {stalled_nick} was cut off; lines: {shown(listener.seen)}"


def online_line(client: LineClient) -> str:
    client.send("/online")
    return client.expect(r"-- \d+ online")


def wait_until_online(client: LineClient, expected: str, timeout: float = TIMEOUT) -> None:
    """Ask /online until it says EXPECTED (people who left are removed a moment after their socket closes)."""
    deadline = time.monotonic() + timeout
    for _ in range(200):
        reply = online_line(client)
        if reply == expected:
            return
        if time.monotonic() > deadline:
            break
        watch_for(client, "(?!)", 0.05)     # let the server catch up, reading whatever comes meanwhile
    pytest.fail(f"/online still says {reply!r}, expected {expected!r}")


@pytest.fixture
def start_server():
    """A factory: start_server(*options) starts a server process.

    All are stopped at the end, and a test fails if one of its servers logged a
    traceback, unless it said it expected one.
    """
    started: list[ServerProcess] = []

    def start(*args: str, script: Path = SERVER_SCRIPT, env: dict | None = None,
              traceback_expected: bool = False) -> ServerProcess:
        server = ServerProcess(tuple(args), script=script, env=env)
        server.traceback_expected = traceback_expected
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()
    for server in started:
        assert server.traceback_expected or "Traceback" not in server.log(), \
            f"a server thread died with a traceback:\n{server.log()[-3000:]}"


@pytest.fixture
def server(start_server, request) -> ServerProcess:
    """A server with the default options, or those of a @pytest.mark.server_options(...) marker."""
    marker = request.node.get_closest_marker("server_options")
    return start_server(*(marker.args if marker else ()))


def wait_until_nobody_is_online(server: ServerProcess, timeout: float = TIMEOUT) -> None:
    """Wait until SERVER's greeting says that no one is signed in: those a test signed in have left
    (their sockets are closed at its end, and the server takes them out a moment later)."""
    deadline = time.monotonic() + timeout
    for _ in range(1000):
        probe = LineClient(server.host, server.port)
        try:
            greeting = probe.recv_line()
        finally:
            probe.close()
        if ": 0 online." in greeting:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)        # polling: the server says nothing to anyone when the last person is gone
    pytest.fail(f"people signed in by the test before were still online after {timeout} s: {greeting!r}")


@pytest.fixture(scope="module")
def module_servers():
    """A factory: module_servers(*options) is the server with OPTIONS that the module's tests share,
    started at the first call; each call waits until the people of the test before have left.

    For tests that change nothing on the server but who is signed in (parametrized cases above all,
    which would each start a server of their own): no operators, rooms or settings left behind, a
    wrong guess or two at most (ten from one address lock it out), and what comes after signing in
    read with expect(), since the lobby's history grows. Stopped at the module's end, which fails if
    a server logged a traceback.
    """
    servers: dict[tuple[str, ...], ServerProcess] = {}

    def shared(*options: str) -> ServerProcess:
        if options not in servers:
            servers[options] = ServerProcess(options)
        else:
            wait_until_nobody_is_online(servers[options])
        return servers[options]

    yield shared
    for server in servers.values():
        server.kill()
    for server in servers.values():
        assert "Traceback" not in server.log(), f"a server thread died with a traceback:\n{server.log()[-3000:]}"


@pytest.fixture
def shared_server(module_servers) -> ServerProcess:
    """The module's shared server with the default options (see module_servers)."""
    return module_servers()


@pytest.fixture
def connect():
    """A factory: connect(server, nick=None, tls=None) opens a raw client (over TLS with an SSLContext),
    signed in as NICK if given."""
    opened: list[LineClient] = []

    def open_client(server: ServerProcess, nick: str | None = None, tls: ssl.SSLContext | None = None) -> LineClient:
        client = LineClient(server.host, server.port, tls)
        opened.append(client)
        if nick is not None:
            client.login(nick)
        return client

    yield open_client
    for client in opened:
        client.close()


@pytest.fixture
def chat(server, connect):
    """Sign in several people on one server: alice, bob = chat("alice", "bob")."""

    def sign_in(*nicks: str) -> list[LineClient]:
        clients = [connect(server, nick) for nick in nicks]
        # Everyone has seen everyone arrive once the last arrival has been announced to the first.
        if len(clients) > 1:
            clients[0].expect(re.escape(f"*** {nicks[-1]} joined #lobby"))
        return clients

    return sign_in


ROOM_TAG = re.compile(r"#(\S+) (.*)$")
ENTERED = re.compile(r"\*\*\* (?:You are in|Now talking in) #([^\s,.]+)")


class RoomReader:
    """Reads a client's lines as an nc user would: every line gets its room, from its tag, or else from the
    last `*** You are in #ROOM` / `*** Now talking in #ROOM.` read (the wire protocol's rule)."""

    def __init__(self, client: LineClient, current: str = "lobby") -> None:
        self.client = client
        self.current = current
        self.read = 0

    def next(self, timeout: float = TIMEOUT) -> tuple[str, str]:
        """The next line as (room, line without its tag); lines that change the current room say so first."""
        if self.read == len(self.client.seen):
            self.client.recv_line(timeout)
        line = self.client.seen[self.read]
        self.read += 1
        tagged = ROOM_TAG.match(line)
        if tagged:
            return tagged.group(1), tagged.group(2)
        entered = ENTERED.match(line)
        if entered:
            self.current = entered.group(1)
        return self.current, line

    def until(self, room: str, pattern: str, timeout: float = TIMEOUT) -> list[tuple[str, str]]:
        """Every (room, line) up to the first line of ROOM matching PATTERN."""
        deadline = time.monotonic() + timeout
        lines = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no line of #{room} matching {pattern!r}; got {shown([f'{r}| {l}' for r, l in lines])}")
            where, line = self.next(remaining)
            lines.append((where, line))
            if where == room and re.match(pattern, line):
                return lines


# -- IRC ----------------------------------------------------------------------------------------------

def irc_port(server: ServerProcess) -> int:
    """The IRC port of a server started with --irc-port 0."""
    return int(server.wait_for_log(r"listening for IRC on \S+:(\d+)").group(1))


class IrcClient(LineClient):
    """A raw IRC client over a socket: messages end in CR LF, and lines are read without them.
    SOURCE is the loopback address to connect from (127.0.0.2 stands for someone else's address)."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None, source: str | None = None) -> None:
        super().__init__(host, port, tls, source=source)

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode("utf-8") + b"\r\n")

    def recv_line(self, timeout: float = TIMEOUT) -> str:
        line = super().recv_line(timeout).removesuffix("\r")
        self.seen[-1] = line
        return line

    def expect(self, pattern: str, timeout: float = TIMEOUT) -> str:
        """Read messages until one matches PATTERN, searched after any tags and source; return the whole line."""
        return super().expect(r"(?:@\S+ )?(?::\S+ )?" + pattern, timeout)

    def register(self, nick: str, capabilities: tuple[str, ...] = (), password: str | None = None) -> list[str]:
        """Sign in as NICK, asking for CAPABILITIES; returns what came up to the end of the lobby's names."""
        start = len(self.seen)
        if capabilities:
            self.send("CAP LS 302")
        if password is not None:
            self.send(f"PASS :{password}")
        self.send(f"NICK {nick}")
        self.send(f"USER {nick} 0 * :{nick} the tester")
        if capabilities:
            self.expect(r"CAP \* LS ")
            self.send(f"CAP REQ :{' '.join(capabilities)}")
            self.expect(r"CAP \S+ ACK ")
            self.send("CAP END")
        self.expect(rf"001 {re.escape(nick)} ")
        self.expect(r"366 \S+ #lobby ")
        self.nick = nick
        return self.seen[start:]


@pytest.fixture
def irc_connect():
    """A factory: irc_connect(server, nick=None, capabilities=()) opens a raw IRC client to SERVER's IRC
    port, registered as NICK if given."""
    opened: list[IrcClient] = []

    def open_client(server: ServerProcess, nick: str | None = None, capabilities: tuple[str, ...] = (),
                    source: str | None = None, tls: ssl.SSLContext | None = None) -> IrcClient:
        client = IrcClient(server.host, irc_port(server), tls, source)
        opened.append(client)
        if nick is not None:
            client.register(nick, capabilities)
        return client

    yield open_client
    for client in opened:
        client.close()
