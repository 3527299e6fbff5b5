"""The server facing anyone on the internet: limits, floods, huge lines, dead peers, faults, secrets, impersonation.

Every test runs a real server process and talks to it over real sockets on
loopback. Waits have deadlines; loops have a bound on both count and time.
Pauses that pace a sender (a slow dribbler, a ticking user) are behaviour
under test, never a guess at when the server is done: that is always learnt
from a line it sends or from its log.
"""
from __future__ import annotations

import itertools
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import LineClient, ServerProcess, TIMEOUT, memory_kib, online_line, read_until, reset, seconds_until_closed, shown, wait_until_online, watch_for

NICKNAME_PROMPT = "*** Choose a nickname:"
PASSWORD_PROMPT = "*** Password:"
PASSWORD = "correct horse 42"
OP_PASSWORD = "battery staple 7"
# What no line from the server may contain: C0 controls (the newline is the separator and never part of a
# line), DEL, C1 controls, and direction overrides that reorder text on the screen.
TERMINAL_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


# -- helpers --------------------------------------------------------------------------------------

class ClientFrom(LineClient):
    """A line client whose connection comes from SOURCE, another loopback address (127.0.0.0/8)."""

    def __init__(self, host: str, port: int, source: str) -> None:
        # Not LineClient.__init__: that would open a second connection, from 127.0.0.1.
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT, source_address=(source, 0))
        self.buffer = b""
        self.seen: list[str] = []
        self.nick: str | None = None


class Drain(threading.Thread):
    """Reads a socket as fast as it can, noting when each line matching PATTERN (with one group) arrives."""

    def __init__(self, sock: socket.socket, pattern: bytes = rb"(?!)") -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.pattern = re.compile(pattern, re.MULTILINE)
        self.arrivals: dict[bytes, float] = {}
        self.closed = False
        self.stopping = threading.Event()
        self.changed = threading.Condition()

    def run(self) -> None:
        rest = b""
        self.sock.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError:
                data = b""
            now = time.monotonic()
            if not data:
                with self.changed:
                    self.closed = True
                    self.changed.notify_all()
                return
            data = rest + data
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            found = self.pattern.findall(data, 0, cut)
            if found:
                with self.changed:
                    for key in found:
                        self.arrivals.setdefault(key, now)
                    self.changed.notify_all()

    def arrival(self, key: bytes, timeout: float) -> float | None:
        """When the line with KEY arrived, waiting up to TIMEOUT for it; None if it did not (or the socket closed)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while key not in self.arrivals and not self.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.changed.wait(remaining)
            return self.arrivals.get(key)

    def stop(self) -> None:
        self.stopping.set()
        self.join(2)


def environment(password: str | None, op_password: str | None = None) -> dict[str, str]:
    """This process's environment for a server with these secrets (None: not set)."""
    secrets = {"PYCHAT_PASSWORD": password, "PYCHAT_OP_PASSWORD": op_password}
    env = {name: value for name, value in os.environ.items() if name not in secrets}
    env.update({name: value for name, value in secrets.items() if value is not None})
    return env


# -- connection limits ----------------------------------------------------------------------------

@pytest.mark.parametrize("options, refusal", [
    (("--max-clients", "3", "--max-per-ip", "0"), r"!! The server is full"),
    (("--max-clients", "0", "--max-per-ip", "3"), r"!! Too many connections from your address"),
], ids=["max-clients", "max-per-ip"])
def test_a_newcomer_past_a_connection_limit_gets_one_error_line_and_others_chat_on(
        start_server, connect, options, refusal):
    server = start_server(*options)
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    waiting = connect(server)                   # the third place, taken by someone still at the prompt
    waiting.expect(re.escape(NICKNAME_PROMPT))
    for _ in range(3):
        lines = connect(server).wait_closed()
        assert len(lines) == 1 and re.match(refusal, lines[0]), \
            f"a newcomer past the limit should get one line matching {refusal!r} and be closed; got {lines}"
    bob.send("still here")
    assert alice.expect("bob: ") == "bob: still here", "a refused newcomer disturbed the people already in"
    alice.send("me too")
    assert bob.expect("alice: ") == "alice: me too"
    # A place that is given up goes to the next newcomer.
    waiting.close()
    server.wait_for_log(r"\(signing in\)@127\.0\.0\.1 closed")
    deadline = time.monotonic() + TIMEOUT
    for _ in range(500):                        # the place is counted back a moment after the close is logged
        newcomer = connect(server)
        if not newcomer.recv_line().startswith("!! "):
            break
        newcomer.wait_closed()
        if time.monotonic() > deadline:
            pytest.fail("the place given up by a leaving connection never became free")
    else:
        pytest.fail("the place given up by a leaving connection never became free")
    newcomer.login("carol")


# -- signing in in time -----------------------------------------------------------------------------

@pytest.mark.parametrize("password", [None, PASSWORD], ids=["at-the-nickname-prompt", "at-the-password-prompt"])
def test_a_connection_that_never_signs_in_is_closed_after_the_nickname_timeout(start_server, connect, password):
    server = start_server("--nick-timeout", "0.5", env=environment(password))
    client = connect(server)
    client.expect(re.escape(PASSWORD_PROMPT if password else NICKNAME_PROMPT))
    started = time.monotonic()
    client.wait_closed(timeout=5)
    waited = time.monotonic() - started
    assert 0.35 <= waited <= 3, f"closed after {waited:.2f} s, expected about 0.5 s (--nick-timeout 0.5)"
    server.wait_for_log(r"did not sign in in time")


@pytest.mark.server_options("--nick-timeout", "0.5")
def test_a_connection_dribbling_a_nickname_byte_by_byte_is_still_closed_after_the_timeout(server):
    sock = socket.create_connection((server.host, server.port), timeout=TIMEOUT)
    try:
        read_until(sock, NICKNAME_PROMPT.encode())
        took = seconds_until_closed(sock, b"x" * 100, most=4.5)
    finally:
        sock.close()
    assert took is not None, \
        "a connection sending one byte of its nickname every 0.3 s was never closed (--nick-timeout 0.5)"
    assert took <= 3, f"closed only after {took:.1f} s (--nick-timeout 0.5)"


@pytest.mark.server_options("--max-per-ip", "0", "--nick-timeout", "30")
def test_hundreds_of_connections_that_never_sign_in_do_not_keep_real_users_out(server, connect):
    idle: list[socket.socket] = []
    try:
        for n in range(300):
            sock = socket.create_connection((server.host, server.port), timeout=TIMEOUT)
            idle.append(sock)
            if n % 2:
                sock.sendall(b"half-a-nickna")  # half of them start a nickname and never finish it
        for sock in idle:                      # each one has a thread on the server once it is greeted
            read_until(sock, NICKNAME_PROMPT.encode())
        started = time.monotonic()
        alice = connect(server, "alice")
        bob = connect(server, "bob")
        bob.send("made it")
        assert alice.expect("bob: ", timeout=2) == "bob: made it"
        took = time.monotonic() - started
        assert took < 2, f"with 300 idle connections open, signing in two people and one line took {took:.1f} s"
    finally:
        for sock in idle:
            sock.close()


# -- huge lines and memory --------------------------------------------------------------------------

@pytest.mark.parametrize("signed_in", [False, True], ids=["at-the-nickname-prompt", "signed-in"])
def test_a_10_mib_line_without_newline_is_refused_once_and_server_memory_stays_flat(
        server, connect, signed_in):
    alice = connect(server, "alice")
    streamer = connect(server, "bob" if signed_in else None)
    if not signed_in:
        streamer.expect(re.escape(NICKNAME_PROMPT))
    pid = server.process.pid
    before = peak = memory_kib(pid)
    chunk = b"z" * 65536
    for n in range(160):                        # 10 MiB, one line, no newline
        streamer.send_raw(chunk)
        if n % 8 == 0:
            peak = max(peak, memory_kib(pid))
    streamer.send_raw(b"\n")
    if signed_in:
        streamer.send("after the flood")
        assert alice.expect("bob: ") == "bob: after the flood"
        lines = streamer.lines_until("bob: after the flood")
    else:
        streamer.send("bob")
        lines = streamer.lines_until(r"\*\*\* Welcome, ")
    peak = max(peak, memory_kib(pid))
    refusals = [line for line in lines if line.startswith("!! ")]
    assert len(refusals) == 1 and "too long" in refusals[0], f"expected one 'too long' refusal; got {lines}"
    growth = peak - before
    assert growth < 4096, f"server memory grew by {growth} KiB while reading one 10 MiB line"


# Without history, which --history-max-mb bounds on its own.
@pytest.mark.server_options("--rate", "0", "--history-days", "0")
def test_output_for_a_client_that_never_reads_stays_bounded_in_server_memory(server, connect):
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        stalled.connect((server.host, server.port))
        stalled.sendall(b"sleepy\n")            # signs in, then never reads
        alice = connect(server, "alice")
        talker = connect(server, "talker")
        alice.expect(r"\*\*\* talker joined")
        pid = server.process.pid
        before = peak = memory_kib(pid)
        text = "t" * 4000
        for n in range(3000):                   # 12 MB to the room; the stalled reader may hold only --max-queue
            talker.send(f"{n} {text}")
            if n % 50 == 49:
                alice.expect(f"talker: {n} ")
                talker.expect(f"talker: {n} ")
                peak = max(peak, memory_kib(pid))
        assert any(line.startswith("*** sleepy quit (not reading") for line in alice.seen), \
            "the reader that never reads was not cut off"
        growth = peak - before
        assert growth < 4096, f"server memory grew by {growth} KiB queueing output for a reader that never reads"
    finally:
        stalled.close()


# -- flood control --------------------------------------------------------------------------------

@pytest.mark.server_options("--rate", "2", "--burst", "5")
def test_lines_over_the_rate_are_refused_with_one_notice(chat):
    alice, bob = chat("alice", "bob")
    bob.send_raw(b"".join(f"burst {n}\n".encode() for n in range(8)))
    notice = bob.expect("!! ")
    assert "too fast" in notice, f"expected a 'too fast' notice, got {notice!r}"
    # bob's lines were all handled before the notice; a later line from alice shows which got through.
    alice.send("marker")
    said = [line for line in alice.lines_until("alice: marker") if line.startswith("bob: ")]
    assert said == [f"bob: burst {n}" for n in range(5)], "only the burst of 5 should have been said"
    bob.expect("alice: marker")             # so that bob.seen holds every answer to his burst, not just the first
    notices = [line for line in bob.seen if line.startswith("!! ")]
    assert len(notices) == 1, f"three refused lines should get one notice; bob got {notices}"


@pytest.mark.server_options("--rate", "50", "--burst", "2")
def test_refused_lines_drain_away_so_pastes_far_apart_are_never_a_flood(chat):
    """Each paste has more lines than the burst: some are refused, and count towards a flood only until
    they drain away at the rate. Pastes a few tenths of a second apart add up to no flood, however many."""
    alice, bob = chat("alice", "bob")
    for paste in range(6):                  # 6 refused lines a paste; 14 waiting at once would be a flood
        bob.send_raw(b"".join(f"paste {paste} line {n}\n".encode() for n in range(8)))
        alice.expect(f"bob: paste {paste} line 1")
        time.sleep(0.4)                     # the time that drains them: 20 lines at 50 a second
    bob.send("still here")
    assert alice.expect(r"bob: still|\*\*\* bob quit") == "bob: still here", "pastes far apart were a flood"


FLOODS = {
    "chat lines": b"flood\n",
    "commands": b"/online\n",
    "over-long lines": b"x" * 5000 + b"\n",
}


@pytest.mark.server_options("--rate", "2", "--burst", "5")
@pytest.mark.parametrize("kind", FLOODS)
def test_a_user_who_keeps_flooding_is_disconnected_and_the_room_is_told(chat, kind):
    alice, bob = chat("alice", "bob")
    try:
        bob.send_raw(FLOODS[kind] * 300)
    except OSError:
        pass                                   # the server may reset the flooder before taking it all
    assert alice.expect(r"\*\*\* bob quit") == "*** bob quit (flooding)", f"flooding with {kind} was not stopped"
    bob.wait_closed()
    assert online_line(alice) == "-- 1 online: alice (#lobby)"


def test_a_connection_flooding_the_nickname_prompt_is_disconnected(server, connect):
    client = connect(server)
    client.expect(re.escape(NICKNAME_PROMPT))
    try:
        client.send_raw(b"9bad\n" * 1000)
    except OSError:
        pass
    lines = client.wait_closed(timeout=5)
    assert len(lines) < 200, f"the server answered {len(lines)} lines to a flood of bad nicknames"


def stream_one_endless_line(host: str, port: int, stop: threading.Event) -> int:
    """Sign in and send one line that never ends, as fast as the network takes it; returns the MiB sent."""
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    sock.sendall(b"flooder\n")
    sent, chunk = 0, b"z" * 65536
    deadline = time.monotonic() + 10
    try:
        while not stop.is_set() and time.monotonic() < deadline and sent < 1 << 20:   # the clock ends it first
            sock.sendall(chunk)
            sent += 1
    finally:
        sock.close()
    return sent // 16


def flood_chat_lines_and_come_back(host: str, port: int, stop: threading.Event) -> int:
    """Flood chat lines as fast as the network takes them; when cut off, come back under a new name."""
    comebacks = 0
    deadline = time.monotonic() + 10
    while not stop.is_set() and time.monotonic() < deadline and comebacks < 5000:
        sock = socket.create_connection((host, port), timeout=TIMEOUT)
        try:
            sock.sendall(f"flooder{comebacks}\n".encode() + (b"flood " * 30 + b"\n") * 300)
            while sock.recv(65536):            # until the server hangs up on the flood
                pass
        except OSError:
            pass
        finally:
            sock.close()
        comebacks += 1
    return comebacks


def newline_bombs_coming_back(host: str, port: int, stop: threading.Event) -> int:
    """From 40 connections at once (over 3 addresses, within --max-per-ip), each signed in: 256 KiB of bare
    newlines, as fast as the network takes them; when cut off, come back under a new name. Returns how
    many bombs went off."""
    bomb = b"\n" * (256 * 1024)
    bombs = []

    def bomber(number: int) -> None:
        deadline = time.monotonic() + 30         # the pings end it sooner: 20 lines of up to 1 s
        comebacks = 0
        while not stop.is_set() and time.monotonic() < deadline and comebacks < 1000:
            try:
                with socket.create_connection((host, port), timeout=TIMEOUT,
                                              source_address=(f"127.0.0.{2 + number % 3}", 0)) as sock:
                    sock.sendall(f"bomber{number}x{comebacks}\n".encode())
                    read_until(sock, b"*** You are in #")       # signed in: the switchboard reads it now
                    sock.sendall(bomb)
                    while sock.recv(65536):            # until the server hangs up on the flood
                        pass
            except (OSError, AssertionError):
                pass
            comebacks += 1
        bombs.append(comebacks)

    threads = [threading.Thread(target=bomber, args=(n,), daemon=True) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    return sum(bombs)


def delays_during(server: ServerProcess, connect, flood) -> list[float]:
    """The seconds each of 20 lines from bob took to reach alice while FLOOD ran; fails if one took 3 s,
    if the flood ended before the last line, or if it was too small to prove anything."""
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    alice_reader = Drain(alice.sock, rb"^bob: ping (\d+)$")
    bob_reader = Drain(bob.sock)
    alice_reader.start()
    bob_reader.start()
    stop = threading.Event()
    result: list[int] = []
    flooding = threading.Thread(target=lambda: result.append(flood(server.host, server.port, stop)), daemon=True)
    flooding.start()
    try:
        server.wait_for_log(r"(flooder|bomber)\S*@127\.0\.0\.\d+ signed in")
        delays = []
        for n in range(20):
            stop.wait(0.05)                      # spread the pings over the flood
            sent = time.monotonic()
            bob.sock.sendall(f"ping {n}\n".encode())
            arrived = alice_reader.arrival(str(n).encode(), timeout=3)
            assert arrived is not None, (f"bob's line {n} did not reach alice within 3 s during the flood"
                                         + (" (alice was disconnected)" if alice_reader.closed else ""))
            delays.append(arrived - sent)
        assert flooding.is_alive(), f"the flood ended early, so it proved nothing: {result}"
    finally:
        stop.set()
        flooding.join(5)
        alice_reader.stop()
        bob_reader.stop()
    assert result and result[0] > 1, f"the flood was too small to prove anything ({result})"
    return delays


@pytest.mark.parametrize("flood", [stream_one_endless_line, flood_chat_lines_and_come_back],
                         ids=["one-endless-line", "chat-lines-coming-back-when-cut-off"])
def test_while_one_user_floods_other_users_lines_arrive_within_a_second(server, connect, flood):
    delays = delays_during(server, connect, flood)
    assert max(delays) < 1.0, f"bob's lines took up to {max(delays):.2f} s to reach alice during the flood"


def test_while_40_connections_send_newline_bombs_other_users_lines_arrive_within_a_second(server, connect):
    # Each 64 KiB read of newlines is 65,536 lines; before, every one was split and decoded on the
    # switchboard before flood control looked at any (40 bombers: a median of about 0.9 s here).
    delays = delays_during(server, connect, newline_bombs_coming_back)
    assert max(delays) < 1.0, f"bob's lines took up to {max(delays):.2f} s to reach alice during the bombs"
    assert statistics.median(delays) < 0.3, \
        f"bob's lines took {statistics.median(delays):.2f} s (median) to reach alice during the bombs"


# -- dead peers -------------------------------------------------------------------------------------

@pytest.mark.server_options("--idle-timeout", "0.75")
def test_a_silent_user_is_removed_after_the_idle_timeout_and_the_room_is_told(server, connect):
    bob = connect(server, "bob")
    signed_in = time.monotonic()
    alice = connect(server, "alice")
    for n in range(40):                          # alice keeps talking, so only bob is idle
        alice.send(f"tick {n}")
        quit_line = watch_for(alice, r"\*\*\* bob quit", 0.25)
        if quit_line:
            break
    else:
        pytest.fail("the silent user was never removed (--idle-timeout 0.75)")
    waited = time.monotonic() - signed_in
    assert quit_line == "*** bob quit (timed out)"
    assert 0.6 <= waited <= 4, f"the silent user was removed after {waited:.2f} s (--idle-timeout 0.75)"
    bob.wait_closed()
    assert online_line(alice) == "-- 1 online: alice (#lobby)"


GHOST_CLIENT = textwrap.dedent("""
    import socket, sys, time
    sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    sock.sendall(b"ghost\\n")
    data = b""
    while b"*** You are in #" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            sys.exit("closed before signing in")
        data += chunk
    print("signed in", flush=True)
    time.sleep(60)
""")


def run(*command: str) -> None:
    """Run a setup command (ip ...); fail with what it said if it does not work."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=10)
    if result.returncode:
        pytest.fail(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")


def test_a_client_that_vanishes_without_a_fin_is_removed_within_seconds_by_keepalive(start_server, connect):
    """Two servers at once: on one the vanished client's room stays quiet (keepalive probes find it gone); on
    the other the room talks to it, so data is in flight and probes are not sent (a user timeout finds it)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip) to cut a network link without a FIN; CI has both")
    tag = os.getpid() % 100000
    namespace, outside, inside = f"pychat-ka{tag}", f"pcka{tag}h", f"pcka{tag}n"
    # Link-local addresses exist only on this machine; the subnet varies so parallel runs do not meet.
    subnet = f"169.254.{20 + tag % 200}"
    host_address, ghost_address = f"{subnet}.1", f"{subnet}.2"
    ghosts: list[subprocess.Popen] = []
    try:
        run("ip", "netns", "add", namespace)
        run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        run("ip", "link", "set", inside, "netns", namespace)
        run("ip", "addr", "add", f"{host_address}/30", "dev", outside)
        run("ip", "link", "set", outside, "up")
        run("ip", "netns", "exec", namespace, "ip", "addr", "add", f"{ghost_address}/30", "dev", inside)
        run("ip", "netns", "exec", namespace, "ip", "link", "set", inside, "up")
        rooms = {}
        for case in ("quiet room", "talking room"):
            server = start_server("--host", host_address, "--keepalive", "1")
            alice = connect(server, "alice")
            ghost = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-c", GHOST_CLIENT,
                                      server.host, str(server.port)], stdout=subprocess.PIPE, text=True)
            ghosts.append(ghost)
            ready, _, _ = select.select([ghost.stdout], [], [], 10)
            assert ready and ghost.stdout.readline().strip() == "signed in", \
                f"the client in the namespace did not sign in ({case})"
            alice.expect(r"\*\*\* ghost joined")
            rooms[case] = alice
        # The link goes down on the ghosts' side: nothing they send from now on (FIN, RST) reaches a server.
        run("ip", "netns", "exec", namespace, "ip", "link", "set", inside, "down")
        for ghost in ghosts:
            ghost.kill()
            ghost.wait(5)
        vanished = time.monotonic()
        rooms["talking room"].send("are you there?")
        for case, alice in rooms.items():
            quit_line = watch_for(alice, r"\*\*\* ghost quit", vanished + 12 - time.monotonic())
            assert quit_line is not None, f"{case}: the vanished client was still online after 12 s (--keepalive 1)"
            assert quit_line.startswith("*** ghost quit (connection lost"), f"{case}: {quit_line}"
            assert online_line(alice) == "-- 1 online: alice (#lobby)", case
    finally:
        for ghost in ghosts:
            if ghost.poll() is None:
                ghost.kill()
                ghost.wait(5)
        subprocess.run(["ip", "link", "del", outside], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)


# -- faults ---------------------------------------------------------------------------------------

def abuse(host: str, port: int, problems: list[str]) -> None:
    """Every rude way to come and go, a few hundred times; what goes wrong on this side lands in PROBLEMS."""
    try:
        for n in range(40):                     # connect and close at once, half of them with a reset
            sock = socket.create_connection((host, port), timeout=TIMEOUT)
            reset(sock) if n % 2 else sock.close()
        for n in range(40):                     # close (or reset) at the nickname prompt, some mid-nickname
            sock = socket.create_connection((host, port), timeout=TIMEOUT)
            read_until(sock, NICKNAME_PROMPT.encode())
            if n % 3 == 0:
                sock.sendall(b"half")
            reset(sock) if n % 2 else sock.close()
        for n in range(20):                     # reset in the middle of a conversation
            sock = socket.create_connection((host, port), timeout=TIMEOUT)
            sock.sendall(f"victim{n}\nhello from victim {n}\n".encode())
            read_until(sock, f"victim{n}: hello from victim {n}\n".encode())
            sock.sendall(b"a line that is never finished")
            reset(sock)
        for n in range(300):                    # rapid connect/close cycles
            sock = socket.create_connection((host, port), timeout=TIMEOUT)
            if n % 3 == 0:
                sock.sendall(f"rapid{n}\n".encode())
            reset(sock) if n % 2 else sock.close()
    except Exception as problem:  # noqa: BLE001 - reported by the test in the main thread
        problems.append(repr(problem))


@pytest.mark.server_options("--rate", "0", "--max-per-ip", "0")
def test_rude_disconnects_leave_no_traceback_no_ghost_and_lose_no_message(server, chat):
    alice, bob = chat("alice", "bob")
    problems: list[str] = []
    rude = threading.Thread(target=abuse, args=(server.host, server.port, problems), daemon=True)
    rude.start()
    deadline = time.monotonic() + 30
    exchanged = 0
    while (rude.is_alive() or exchanged < 20) and exchanged < 5000 and time.monotonic() < deadline:
        alice.send(f"from alice {exchanged}")
        bob.send(f"from bob {exchanged}")
        assert alice.expect("bob: ") == f"bob: from bob {exchanged}", \
            f"alice lost a line from bob: {shown(alice.seen)}"
        assert bob.expect("alice: ") == f"alice: from alice {exchanged}", \
            f"bob lost a line from alice: {shown(bob.seen)}"
        exchanged += 1
    rude.join(5)
    assert not rude.is_alive(), "the rude connections did not finish within 30 s"
    assert not problems, f"the rude connections themselves failed: {problems}"
    wait_until_online(alice, "-- 2 online: alice (#lobby), bob (#lobby)")
    assert "Traceback" not in server.log(), f"a thread died with a traceback:\n{server.log()[-3000:]}"
    assert server.process.poll() is None, "the server died"


# -- shutting down ----------------------------------------------------------------------------------

@pytest.mark.server_options("--rate", "0", "--max-per-ip", "0")
def test_sigterm_with_a_hundred_clients_some_stalled_exits_zero_within_seconds(server, connect):
    stalled: list[socket.socket] = []
    try:
        readers = [connect(server, f"reader{n}") for n in range(84)]
        for n in range(15):                     # signed in, tiny receive buffer, never read
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((server.host, server.port))
            sock.sendall(f"stalled{n}\n".encode())
            stalled.append(sock)
        talker = connect(server, "talker")
        readers[0].expect(r"\*\*\* talker joined", timeout=10)
        text = "q" * 1000
        for n in range(200):                    # about 200 KB queued for each stalled reader
            talker.send(f"{n} {text}")
        talker.expect("talker: 199 ", timeout=10)
        # The readers checked below read, as people do: 200 KB unread may not all fit in the kernel's
        # buffers, and what a reader has not taken when the server exits is lost, the notice last of all.
        for reader in readers[:3]:
            reader.expect("talker: 199 ", timeout=10)
        assert "cutting off stalled" not in server.log(), "the stalled readers were cut off before shutdown"
        started = time.monotonic()
        status = server.stop(timeout=10)
        took = time.monotonic() - started
        assert status == 0, f"the server exited with status {status}"
        assert took < 5, f"the server took {took:.1f} s to shut down"
        for reader in readers[:3] + [talker]:
            assert "*** Server shutting down." in reader.wait_closed(), "a reader was not told of the shutdown"
        assert "Traceback" not in server.log(), server.log()[-3000:]
    finally:
        for sock in stalled:
            sock.close()


def test_sighup_reloads_keeping_everyone_and_sigterm_still_stops_the_server(server, connect):
    alice, bob = connect(server, "alice"), connect(server, "bob")
    alice.expect(r"\*\*\* bob joined")
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log(r"WARNING reload \(SIGHUP\): Reloaded: no option changed")
    bob.send("still here after the hangup")
    alice.expect("bob: still here after the hangup")
    assert server.process.poll() is None, f"the server exited on SIGHUP with {server.process.poll()}"
    assert server.stop() == 0, "SIGTERM after a SIGHUP did not exit with status 0"
    assert "*** Server shutting down." in alice.wait_closed(), "alice was not told of the shutdown"


# -- the server password ------------------------------------------------------------------------

def test_without_a_server_password_there_is_no_password_prompt(start_server, connect):
    server = start_server(env=environment(None))
    client = connect(server)
    assert client.recv_line().startswith("*** pyChat ")
    assert client.recv_line() == NICKNAME_PROMPT


def test_the_right_password_leads_to_the_nickname_prompt(start_server, connect):
    server = start_server(env=environment(PASSWORD))
    client = connect(server)
    assert client.recv_line().startswith("*** pyChat ")
    assert client.recv_line() == PASSWORD_PROMPT
    client.send(PASSWORD)
    assert client.recv_line(timeout=1) == NICKNAME_PROMPT, "the right password did not lead to the nickname prompt"
    client.send("alice")
    assert client.expect(r"\*\*\* Welcome, ").startswith("*** Welcome, alice!")


def test_the_password_and_the_nickname_may_come_in_one_write(start_server, connect):
    server = start_server(env=environment(PASSWORD))
    client = connect(server)
    client.send_raw(f"{PASSWORD}\nalice\n".encode())
    assert client.expect(r"\*\*\* Welcome, |!! ").startswith("*** Welcome, alice!")


def test_a_wrong_password_is_refused_after_a_delay_logged_and_asked_again(start_server, connect):
    server = start_server("--guess-delay", "0.2", env=environment(PASSWORD))
    client = connect(server)
    client.expect(re.escape(PASSWORD_PROMPT))
    client.send("guess-one")
    sent = time.monotonic()
    assert client.recv_line() == "!! Wrong password."
    delay = time.monotonic() - sent
    assert delay >= 0.2, f"a wrong password was answered after only {delay:.2f} s, not --guess-delay's 0.2 s"
    assert client.recv_line() == PASSWORD_PROMPT
    client.send(PASSWORD)
    assert client.recv_line() == NICKNAME_PROMPT
    server.wait_for_log(r"wrong server password from .*127\.0\.0\.1")
    assert "guess-one" not in server.log(), "the guessed password was written to the log"


def test_three_wrong_passwords_close_the_connection_without_slowing_anyone_else(start_server, connect):
    # The guesses wait 0.5, 1 and 1.5 s; a round trip of alice's may take 0.8 s at most meanwhile, so a
    # wait that held up anyone else would show.
    server = start_server("--guess-delay", "0.5", "--rate", "0", env=environment(PASSWORD))
    guesser = ClientFrom(server.host, server.port, "127.0.0.2")
    try:
        guesser.expect(re.escape(PASSWORD_PROMPT))
        guesser.send_raw(b"guess-1\nguess-2\nguess-3\n" + b"mallory\n")
        # Meanwhile someone who knows the password comes straight in, and talks until the guesser is let go.
        started = time.monotonic()
        alice = connect(server)
        alice.expect(re.escape(PASSWORD_PROMPT))
        alice.send(PASSWORD)
        alice.login("alice")
        took = time.monotonic() - started
        assert took < 1, f"signing in took {took:.1f} s while someone else was guessing"
        for n in range(200):
            alice.send(f"round trip {n}")
            sent = time.monotonic()
            alice.expect(f"alice: round trip {n}$", timeout=5)
            took = time.monotonic() - sent
            assert took < 0.8, f"a line took {took:.1f} s to come back while someone else was guessing"
            readable, _, _ = select.select([guesser.sock], [], [], 0.05)
            if readable:
                data = guesser.sock.recv(65536)
                if not data:
                    break
                guesser.buffer += data
        else:
            pytest.fail(f"the guesser was never let go; it was sent {guesser.buffer!r}")
        lines = guesser.wait_closed(timeout=15)
        assert lines.count("!! Wrong password.") == 3, f"expected three refusals; got {lines}"
        assert NICKNAME_PROMPT not in lines, f"the guesser reached the nickname prompt: {lines}"
        assert online_line(alice) == "-- 1 online: alice (#lobby)"
    finally:
        guesser.close()


def test_passwords_from_the_environment_are_not_on_the_command_line_nor_in_the_log(start_server):
    server = start_server(env=environment(PASSWORD, OP_PASSWORD))
    with open(f"/proc/{server.process.pid}/cmdline", "rb") as cmdline:
        arguments = cmdline.read()
    for secret in (PASSWORD, OP_PASSWORD):
        assert secret.encode() not in arguments, f"{secret!r} shows in the server's command line (ps)"
        assert secret not in server.log(), f"{secret!r} was written to the log"


def test_a_wrong_operator_password_is_refused_after_a_delay_and_logged_without_the_guess(start_server, connect):
    server = start_server("--guess-delay", "0.2", env=environment(None, OP_PASSWORD))
    alice = connect(server, "alice")
    alice.send("/op guess-op")
    sent = time.monotonic()
    refusal = alice.expect("!! |-- ")
    delay = time.monotonic() - sent
    assert refusal.startswith("!! Wrong operator password"), refusal
    assert delay >= 0.2, f"a wrong operator password was answered after only {delay:.2f} s, not 0.2 s"
    server.wait_for_log(r"wrong operator password from .*alice")
    assert "guess-op" not in server.log(), "the guessed operator password was written to the log"
    alice.send("/kick alice")
    assert alice.expect("!! ").startswith("!! "), "a refused operator could still /kick"


# -- impersonation ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nickname_holders():
    """One server for the nickname tests, where alice and tokyo stay signed in throughout."""
    server = ServerProcess(())
    holders = [LineClient(server.host, server.port) for _ in range(2)]
    try:
        holders[0].login("alice")
        holders[1].login("tokyo")
        yield server
    finally:
        for holder in holders:
            holder.close()
        server.kill()


_newcomers = itertools.count()


def ask_for_nickname(server, connect, how: str, name: str) -> str:
    """Ask for NAME at sign-in or, signed in as someone new, with /nick; returns the server's answer."""
    client = connect(server)
    if how == "at sign-in":
        client.expect(re.escape(NICKNAME_PROMPT))
        client.send(name)
        return client.recv_line()
    client.login(f"newcomer{next(_newcomers)}")
    client.send(f"/nick {name}")
    return client.expect(r"!! |\*\*\* newcomer\d+ is now known as ")


HOW = ["at sign-in", "with /nick"]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("victim, lookalike", [
    ("alice", "ａｌｉｃｅ"),        # fullwidth letters
    ("alice", "ALİCE"),            # capital I with a dot
    ("alice", "alicé"),            # a combining accent
    ("alice", "alıce"),            # dotless i
    ("alice", "ɑlice"),            # Latin alpha
    ("tokyo", "токуо"),            # all Cyrillic
    ("tokyo", "τοκγο"),            # all Greek
    ("tokyo", "ΤΟΚΥΟ"),            # all Greek capitals
    ("alice", "alice\u034f"),      # an invisible mark: combining grapheme joiner
    ("alice", "alice\ufe0f"),      # an invisible mark: variation selector
    ("alice", "alice\u17b4"),      # an invisible mark: Khmer inherent vowel
    ("alice", "alice\u180b"),      # an invisible mark: Mongolian variation selector
])
def test_a_nickname_that_looks_like_someone_elses_is_refused(nickname_holders, connect, how, victim, lookalike):
    answer = ask_for_nickname(nickname_holders, connect, how, lookalike)
    assert answer.startswith("!! "), f"{lookalike!a} was accepted {how} while {victim!r} is online: {answer!a}"


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("name", [
    "server", "SERVER", "ｓｅｒｖｅｒ", "*** alice", "***", "-- x", "--", "!! x", "!!", "[pm", "[pm from alice]",
    "[history", "* alice",
    "\u3164", "\u115f", "\u3164\u3164", "\uffa0",     # Hangul fillers: letters that show as nothing
])
def test_a_nickname_that_looks_like_a_server_message_or_like_nothing_is_refused(
        nickname_holders, connect, how, name):
    answer = ask_for_nickname(nickname_holders, connect, how, name)
    assert answer.startswith("!! "), f"nickname {name!a} was accepted {how}: {answer!a}"


DISGUISES = [
    b"hi\r*** carol joined #lobby\n",
    b"hi\n*** carol joined #lobby\n",          # two lines in one write: two chat lines from bob
    b"*** alice joined #lobby\n",
    b"-- 3 online: alice (#lobby)\n",
    b"!! Wrong password.\n",
    b"[pm from carol] psst\n",
    b"* carol waves\n",
    "hi\u0085*** carol quit\n".encode(),       # NEL
    "hi\u2028*** carol quit\n".encode(),       # line separator
    "hi\u2029*** carol quit\n".encode(),       # paragraph separator
    b"\x1b[1A\x1b[2K\r*** carol quit\n",        # cursor up, erase line, carriage return
    b"\x1b]0;window title\x07text\n",           # OSC
    b"\x9b2J a raw 8-bit CSI byte\n",
    "\u009b2J a C1 CSI character\n".encode(),
    b"hi\x0b\x0c\x08\x08\x08*** x\n",          # vertical tab, form feed, backspaces
    b"\r\r\r*** carol joined #lobby\r\n",
    b"\x00\x7f*** x\n",
    "\u202e*** carol\u202c quit\n".encode(),   # right-to-left override
    b"hi\xc0\x8a*** carol quit\n",               # an overlong encoding of a newline
    b"hi\xed\xa0\x80\xe0\x80\x8a*** x\n",        # a UTF-16 surrogate, another overlong newline
    b"\xc2\x1b[2J\n",                            # half a character, then ESC
]


@pytest.mark.server_options("--rate", "0")
def test_whatever_a_user_sends_others_receive_one_line_starting_with_their_nickname(chat):
    alice, bob = chat("alice", "bob")
    for n, disguise in enumerate(DISGUISES):
        bob.send_raw(disguise)
        bob.send(f"end {n}")
        received = alice.lines_until(f"bob: end {n}$")[:-1]
        assert len(received) == disguise.count(b"\n"), f"{disguise!r} arrived as {received}"
        for line in received:
            assert line.startswith("bob: "), f"{disguise!r} arrived as a line not from bob: {line!r}"
            assert not TERMINAL_CONTROL.search(line), f"{disguise!r} arrived with control characters: {line!r}"


@pytest.mark.server_options("--rate", "0")
def test_no_control_character_from_a_user_reaches_another_screen(chat):
    alice, bob = chat("alice", "bob")
    for n, disguise in enumerate(DISGUISES):
        bob.send_raw(disguise)
    bob.send_raw("/quit \x1b[31mred\x07\u202egone\r\n".encode())
    alice.expect(r"\*\*\* bob quit")
    for line in alice.seen:
        assert not TERMINAL_CONTROL.search(line), f"alice received control characters: {line!r}"


def test_text_relayed_by_commands_keeps_its_sender_and_loses_its_control_characters(start_server, connect):
    server = start_server("--rate", "0", env=environment(None, OP_PASSWORD))
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    alice.expect(r"\*\*\* bob joined")
    bob.send(f"/op {OP_PASSWORD}")
    assert bob.expect("-- |!! ") == "-- You are now an operator."
    relayed = ("* bob ", "[pm from bob] ", "*** bob set the topic of #lobby: ", "[pm to bob] ping",
               "-- bob is away: ", "*** bob is away (", "*** bob is back")
    inline = [disguise.rstrip(b"\n") for disguise in DISGUISES if disguise.count(b"\n") == 1]
    for n, disguise in enumerate(inline):
        start = len(alice.seen)
        for command in (b"/me ", b"/msg alice ", b"/topic ", b"/away "):
            bob.send_raw(command + disguise + b"\n")
        bob.expect(r"-- You are marked away")    # every command above has been handled
        alice.send("/msg bob ping")
        alice.expect(r"-- bob is away: ")
        bob.send("/back")
        bob.send(f"end {n}")
        alice.expect(f"bob: end {n}$")
        received = alice.seen[start:-1]
        assert len(received) == 7, f"{disguise!r} relayed by /me, /msg, /topic and /away arrived as {received}"
        for line in received:
            assert line.startswith(relayed), f"{disguise!r} relayed by a command arrived as {line!r}"
            assert not TERMINAL_CONTROL.search(line), f"{disguise!r} arrived with control characters: {line!r}"
    bob.send_raw(b"/quit " + inline[-1] + b"\n")
    farewell = alice.expect(r"\*\*\* bob quit")
    assert not TERMINAL_CONTROL.search(farewell), f"the quit message kept control characters: {farewell!r}"
