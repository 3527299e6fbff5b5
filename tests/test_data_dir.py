"""What the server keeps across restarts, with real servers: the data directory and the history file."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from conftest import ClientFrom, SERVER_SCRIPT, TIMEOUT, LineClient, shown

HISTORY_LINE = re.compile(r"\[history (\S+)\] (.*)")


def memory_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def history_of(client: LineClient, marker: str) -> list[str]:
    """The history CLIENT was shown on entering its room: every [history] line before it says MARKER."""
    client.send(marker)
    lines = client.lines_until(re.escape(f"{client.nick}: {marker}"))
    return [HISTORY_LINE.match(line).group(2) for line in lines if HISTORY_LINE.match(line)]


def record(room: str, line: str, when: object = 1_700_000_000) -> str:
    return f'{{"time": {when}, "room": {json.dumps(room)}, "line": {json.dumps(line)}}}\n'


# -- the history file: what a damaged or hostile file cannot do -----------------------------------------

def test_history_times_that_cannot_be_shown_are_skipped_and_newcomers_come_in(start_server, connect, tmp_path):
    path = tmp_path / "history.jsonl"
    bad = ["NaN", "1e300", "-1", "Infinity"]
    path.write_text(record("lobby", "bob: before") + "".join(record("lobby", f"bob: {when}", when) for when in bad)
                    + record("lobby", "bob: after"))
    server = start_server("--history-file", str(path))
    for line in range(2, 2 + len(bad)):
        server.wait_for_log(rf"{re.escape(str(path))} line {line}: (not JSON|'time' is not a time)")
    alice = connect(server, "alice")
    assert history_of(alice, "here") == ["bob: before", "bob: after"]
    carol = connect(server, "carol")
    carol.send("/join dev")
    carol.send("/join lobby")
    carol.expect(r"\*\*\* (You are in|Now talking in) #lobby")


def test_a_lone_surrogate_in_the_history_file_does_not_stop_the_server(start_server, connect, tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text(record("lobby", "bob: fine") + '{"time": 1700000000, "room": "lobby", "line": "bob: \\ud800"}\n')
    server = start_server("--history-file", str(path))
    server.wait_for_log(r"line 2: 'line' holds a lone surrogate")
    assert history_of(connect(server, "alice"), "here") == ["bob: fine"]
    assert "\\ud800" not in path.read_text(encoding="utf-8")


def test_a_history_of_many_rooms_is_read_in_bounded_memory(start_server, connect, tmp_path):
    path = tmp_path / "history.jsonl"
    baseline = start_server()
    idle = memory_kib(baseline.process.pid)
    text = "x" * 2000
    with open(path, "w") as file:
        file.writelines(record(f"room{n}", f"bob: {n} {text}") for n in range(15000))
    server = start_server("--history-file", str(path))
    grown = memory_kib(server.process.pid) - idle
    # Holding all 15,000 rooms would take over 30 MiB; the 500 kept take about 1 MiB.
    assert grown < 15 * 1024, f"the server took {grown // 1024} MiB more than an idle one to read 15,000 rooms"
    alice = connect(server, "alice")
    alice.send("/join room14999")
    assert alice.expect(r"\[history ").endswith("bob: 14999 " + text)


def test_throwaway_rooms_do_not_push_the_lobby_out_of_history_across_a_restart(start_server, connect, tmp_path):
    path = tmp_path / "history.jsonl"
    first = start_server("--history-file", str(path), "--rate", "0")
    alice = connect(first, "alice")
    alice.send("lobby line")
    alice.send("/join dev")
    alice.send("dev line")
    alice.expect("alice: dev line")
    troll = connect(first, "troll")
    for n in range(500):
        troll.send(f"/join spam{n}")
        troll.send("spam")
        troll.send("/leave")
    troll.send("/join dev")
    troll.send("dev again")
    alice.expect("troll: dev again", timeout=30)
    assert first.stop() == 0
    second = start_server("--history-file", str(path))
    newcomer = connect(second, "bob")
    assert history_of(newcomer, "here") == ["alice: lobby line"]
    newcomer.send("/join dev")
    replay = newcomer.lines_until(r"\[history .*dev again")
    assert [HISTORY_LINE.match(line).group(2) for line in replay if HISTORY_LINE.match(line)] == [
        "alice: dev line", "troll: dev again"]


def test_a_symlink_at_the_temporary_path_is_not_followed(start_server, connect, tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text(record("lobby", "bob: hi"))
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, f"{path}.tmp")
    server = start_server("--history-file", str(path))
    assert history_of(connect(server, "alice"), "here") == ["bob: hi"]
    assert victim.read_text() == "precious\n", "the server wrote through a link planted at PATH.tmp"
    assert not path.is_symlink() and stat.S_ISREG(os.lstat(path).st_mode)


@pytest.mark.parametrize("option", ["--history-file", "--data-dir"])
def test_a_fifo_in_place_of_a_data_file_is_refused_with_a_clear_error(tmp_path, option):
    if option == "--history-file":
        fifo = tmp_path / "history.jsonl"
        target = fifo
    else:
        target = tmp_path / "data"
        target.mkdir()
        fifo = target / "accounts.jsonl"
    os.mkfifo(fifo)
    try:
        finished = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--host", "127.0.0.1", "--port", "0",
                                   option, str(target)], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("the server hung on a FIFO instead of refusing it")
    assert finished.returncode == 1
    assert f"{fifo} is not a regular file" in finished.stderr, finished.stderr
    assert "Traceback" not in finished.stderr and "listening" not in finished.stderr


def test_the_history_file_stays_bounded_while_the_server_runs(start_server, connect, tmp_path):
    path = tmp_path / "history.jsonl"
    server = start_server("--history-file", str(path), "--history", "3", "--rate", "0")
    alice = connect(server, "alice")
    said = 2500
    for n in range(said):
        alice.send(f"line {n}")
    alice.expect(f"alice: line {said - 1}$", timeout=30)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 2 * 3 + 1000 + 1, f"{said} lines said, and the file holds {len(lines)} of them"
    assert json.loads(lines[-1])["line"] == f"alice: line {said - 1}"
    server.stop(signal.SIGKILL)
    again = start_server("--history-file", str(path), "--history", "3")
    assert history_of(connect(again, "bob"), "here") == [f"alice: line {n}" for n in range(said - 3, said)]


# -- the data directory -------------------------------------------------------------------------------

def test_the_data_directory_and_its_files_are_private_and_used_by_one_server_at_a_time(start_server, connect,
                                                                                        tmp_path):
    data = tmp_path / "data"
    server = start_server("--data-dir", str(data))
    alice = connect(server, "alice")
    alice.send("kept")
    alice.expect("alice: kept")
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    files = sorted(os.listdir(data))
    assert "history.jsonl" in files and "accounts.jsonl" in files, files
    for name in files:
        assert stat.S_IMODE(os.lstat(data / name).st_mode) == 0o600, f"{name} is readable by others"
    second = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--host", "127.0.0.1", "--port", "0",
                             "--data-dir", str(data)], capture_output=True, text=True, timeout=10)
    assert second.returncode == 1 and "in use by another pyChat server" in second.stderr, second.stderr


def test_history_file_and_data_directory_do_not_go_together(tmp_path):
    finished = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--data-dir", str(tmp_path / "d"),
                               "--history-file", str(tmp_path / "h")], capture_output=True, text=True, timeout=10)
    assert finished.returncode == 2 and "do not go together" in finished.stderr


def test_a_hand_edited_data_file_is_named_with_its_line_and_the_server_starts(start_server, connect, tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "bans.jsonl").write_text('{"key": "address:127.0.0.2", "value": {"kind": "address"}}\n'
                                     "{broken\n" + "[]" * 10000 + "\n")
    server = start_server("--data-dir", str(data))
    for line in (1, 2, 3):
        server.wait_for_log(rf"{re.escape(str(data / 'bans.jsonl'))} line {line}: ")
    connect(server, "alice")


def write_bans(data, *bans: dict) -> None:
    data.mkdir(mode=0o700, exist_ok=True)
    with open(data / "bans.jsonl", "w") as file:
        for ban in bans:
            value = {"shown": ban["target"], "reason": "spam", "by": "alice", "since": time.time(), "expires": None,
                     **ban}
            file.write(json.dumps({"key": f"{value['kind']}:{value['target']}", "value": value}) + "\n")




def test_banned_addresses_and_networks_are_refused_at_the_door_with_the_reason_and_the_expiry(
        start_server, tmp_path):
    data = tmp_path / "data"
    write_bans(data, {"kind": "address", "target": "127.0.0.2", "expires": time.time() + 7200},
               {"kind": "network", "target": "127.0.1.0/24"},
               {"kind": "address", "target": "127.0.0.4", "expires": time.time() - 1})
    server = start_server("--data-dir", str(data))
    for source, expected in (("127.0.0.2", r"!! You are banned from this server until \S+ \S+ UTC "
                                           r"\((1h 59m|2h) left\): spam\.$"),
                             ("127.0.1.9", r"!! You are banned from this server permanently: spam\.$")):
        lines = ClientFrom(server.host, server.port, source).wait_closed()
        assert len(lines) == 1 and re.match(expected, lines[0]), f"from {source}: {lines}"
    server.wait_for_log(r"refused 127\.0\.1\.9: You are banned")
    for source in ("127.0.0.3", "127.0.0.4"):       # not banned; a ban that ended
        client = ClientFrom(server.host, server.port, source)
        client.login(f"guest{source[-1]}")
        client.close()


# -- kill -9 ---------------------------------------------------------------------------------------------

def say_until_killed(server, nick: str, kill_at: int, prefix: str, most: int = 240) -> list[str]:
    """Say MOST lines as fast as the socket takes them, and kill -9 the server once KILL_AT of them are
    confirmed (echoed back), while others are on their way; returns the lines that were confirmed."""
    client = LineClient(server.host, server.port)
    client.login(nick)
    lines = [f"{prefix} {n}" for n in range(most)]

    def send_all() -> None:
        try:
            for text in lines:
                client.send(text)
        except OSError:
            pass

    threading.Thread(target=send_all, daemon=True).start()
    confirmed: list[str] = []
    buffer = b""
    deadline = time.monotonic() + 2 * TIMEOUT
    try:
        while time.monotonic() < deadline:
            client.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = client.sock.recv(65536)
            except socket.timeout:
                break
            except OSError:
                data = b""
            if not data:
                return confirmed
            *complete, buffer = (buffer + data).split(b"\n")
            for raw in complete:
                if raw.decode().startswith(f"{nick}: {prefix} "):
                    confirmed.append(raw.decode())
                    if len(confirmed) == kill_at:
                        server.process.kill()
        pytest.fail(f"the server was not killed after {kill_at} confirmed lines; {len(confirmed)} came")
    finally:
        client.close()
        server.process.wait(TIMEOUT)


def test_a_kill_9_at_random_moments_loses_no_confirmed_line(start_server, tmp_path):
    data = tmp_path / "data"
    seed = random.randrange(10 ** 6)
    moments = random.Random(seed)
    confirmed: list[str] = []
    for round_number in range(4):
        server = start_server("--data-dir", str(data), "--history", "1000", "--rate", "0")
        confirmed += say_until_killed(server, "alice", moments.randrange(5, 200), f"round {round_number}")
    assert len(confirmed) > 20, f"too few lines were confirmed to prove anything ({len(confirmed)})"
    server = start_server("--data-dir", str(data), "--history", "1000")
    client = LineClient(server.host, server.port)
    client.login("bob")
    kept = history_of(client, "checking")
    missing = [line for line in confirmed if line not in kept]
    assert not missing, f"seed {seed}: {len(missing)} confirmed lines lost, such as {shown(missing, 3)}"
    client.close()
