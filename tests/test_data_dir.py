"""What the server keeps across restarts, with real servers: the data directory's database, its upgrade from
2.0's files, backups and checks, a full disk, and kill -9."""
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

from conftest import ClientFrom, SERVER_SCRIPT, TIMEOUT, LineClient, database_rows, shown

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


# -- the database: what a damaged or hostile directory cannot do ------------------------------------------

def run_server(*args: str) -> subprocess.CompletedProcess:
    """Run the server to its end (a refusal to start, --backup, --check), bounded in time."""
    try:
        return subprocess.run([sys.executable, str(SERVER_SCRIPT), "--host", "127.0.0.1", "--port", "0", *args],
                              capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not finish: {args}")


def test_the_data_directory_and_its_files_are_private_and_used_by_one_server_at_a_time(start_server, connect,
                                                                                        tmp_path):
    data = tmp_path / "data"
    server = start_server("--data-dir", str(data))
    alice = connect(server, "alice")
    alice.send("kept")
    alice.expect("alice: kept")
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    files = sorted(os.listdir(data))
    assert "pychat.db" in files and "lock" in files, files
    for name in files:
        assert stat.S_IMODE(os.lstat(data / name).st_mode) == 0o600, f"{name} is readable by others"
    second = run_server("--data-dir", str(data))
    assert second.returncode == 1 and "in use by another pyChat server" in second.stderr, second.stderr


def test_the_history_file_option_is_gone_and_says_what_to_use_instead(tmp_path):
    finished = run_server("--history-file", str(tmp_path / "h"))
    assert finished.returncode == 2 and "--history-file is gone" in finished.stderr and "--data-dir" in finished.stderr
    assert "gone" in run_server("--help").stdout.split("--history-file PATH", 2)[2][:120]


@pytest.mark.parametrize("planted", ["symlink", "fifo", "fifo for 2.0"])
def test_a_link_or_fifo_in_place_of_a_data_file_is_refused_with_a_clear_error(tmp_path, planted):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    if planted == "symlink":
        os.symlink(victim, data / "pychat.db")
        expected = "is a symbolic link"
    else:
        os.mkfifo(data / ("pychat.db" if planted == "fifo" else "accounts.jsonl"))
        expected = "is not a regular file"
    finished = run_server("--data-dir", str(data))
    assert finished.returncode == 1 and expected in finished.stderr, finished.stderr
    assert "Traceback" not in finished.stderr and "listening" not in finished.stderr
    assert victim.read_text() == "precious\n"


def test_a_damaged_database_stops_the_start_with_one_line_and_check_names_what_is_wrong(start_server, connect,
                                                                                        tmp_path):
    data = tmp_path / "data"
    server = start_server("--data-dir", str(data))
    connect(server, "alice").send("a line")
    assert server.stop() == 0
    assert run_server("--data-dir", str(data), "--check").returncode == 0
    path = data / "pychat.db"
    raw = bytearray(path.read_bytes())
    raw[4096:8192] = b"\xee" * 4096             # a page of the file overwritten
    path.write_bytes(bytes(raw))
    finished = run_server("--data-dir", str(data))
    assert finished.returncode == 1 and "cannot start: " in finished.stderr and "--check" in finished.stderr
    assert "Traceback" not in finished.stderr, finished.stderr
    checked = run_server("--data-dir", str(data), "--check")
    assert checked.returncode == 1 and "pychat.db: " in checked.stdout and "no problem" not in checked.stdout


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
