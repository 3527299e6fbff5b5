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

from conftest import ClientFrom, SERVER_SCRIPT, TIMEOUT, LineClient, database_rows, import_script, memory_kib, shown
from test_accounts import PASSWORD, claim_operator, register, sign_in

module = import_script(SERVER_SCRIPT, "pychat_server")

HISTORY_LINE = re.compile(r"\[history (\S+)\] (.*)")


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


# -- every kind of record, across restarts --------------------------------------------------------------------

KINDS = ("accounts", "operators", "invitations", "bans", "mutes", "rooms", "offline", "messages", "kept_rooms",
         "read_positions")


def kept(data) -> dict:
    """Every record of every kind in DATA's database; an invitation without its code, which a start remakes
    for an --operator name that has no account yet."""
    rows = {kind: sorted(database_rows(data, f"SELECT * FROM {kind}")) for kind in KINDS}
    rows["invitations"] = [row[:2] + row[3:4] + row[5:] for row in rows["invitations"]]
    return rows


def test_a_record_of_every_kind_survives_three_restarts_clean_or_killed(start_server, connect, tmp_path):
    data = tmp_path / "data"
    options = ("--data-dir", str(data), "--operator", "alice", "--operator", "olga", "--guess-delay", "0",
               "--max-per-ip", "0")
    server = start_server(*options)
    alice = claim_operator(server, connect(server))
    bob = connect(server, "bob")
    register(bob)
    alice.send("/oper add bob")
    alice.expect("-- bob is now an operator")
    alice.send("/ban 127.0.0.3 1w spam")
    alice.expect("-- Banned the address 127.0.0.3")
    carol = connect(server, "carol")
    register(carol)
    alice.send("/mute carol 1w shouting")
    alice.expect("-- Muted the account carol")
    alice.send("/reset-password carol")
    alice.expect("-- Password reset for carol")
    alice.send("/topic be nice")
    alice.expect(r"\*\*\* alice set the topic")
    alice.send("/join dev")
    alice.send("/topic ship it")
    alice.expect(r"\*\*\* alice set the topic of #dev")
    alice.send("said in dev")
    alice.expect("alice: said in dev")
    bob.send("/quit")
    bob.wait_closed()
    alice.send("/msg bob while you were out")
    alice.expect("-- bob is offline")
    dave = connect(server, "dave")          # a guest's message to an account waits as an offline message
    dave.send("/msg bob from a guest")
    dave.expect("-- bob is offline")
    dave.send("/quit")
    dave.wait_closed()
    before = kept(data)
    assert all(before[kind] for kind in KINDS), {kind: len(rows) for kind, rows in before.items()}
    for restart in range(3):
        server.stop(signal.SIGKILL if restart != 1 else signal.SIGTERM)
        server = start_server(*options)
        assert kept(data) == before, f"restart {restart + 1} changed what was kept"
    refused = ClientFrom(server.host, server.port, "127.0.0.3").wait_closed()
    assert refused and "spam" in refused[0]
    bob = connect(server)
    lines = sign_in(bob, "bob") + bob.lines_until(re.escape("*** End of messages left for you."), timeout=10)
    assert "*** You are an operator of this server." in lines and "*** Topic of #lobby: be nice" in lines
    assert any(line.endswith("from alice] while you were out") for line in lines), shown(lines)
    bob.send("/join dev")
    joined = bob.lines_until(r"\[history .*said in dev")
    assert "*** Topic of #dev: ship it" in joined, shown(joined)
    bob.send("/mutes")
    assert bob.expect("-- ").startswith("-- account carol by alice, until "), "the mute was not kept"
    bob.send("/invitations")
    assert bob.expect("-- ").startswith("-- carol: a new password, by alice"), "the password reset was not kept"
    assert server.log().count("--operator olga has no account yet") == 1     # this start's own code


# -- backups -----------------------------------------------------------------------------------------------------

def test_a_backup_of_a_busy_server_is_whole_and_starts_a_server_of_its_own(start_server, connect, tmp_path):
    data = tmp_path / "data"
    server = start_server("--data-dir", str(data), "--rate", "0")
    alice = connect(server, "alice")
    register(alice)
    talking = threading.Event()

    def talk() -> None:
        for n in range(100_000):
            if talking.is_set():
                return
            alice.send(f"line {n}")
            if n % 100 == 99:
                alice.expect(f"alice: line {n}$", timeout=10)

    talker = threading.Thread(target=talk)
    talker.start()
    try:
        copy = tmp_path / "copy.db"
        backup = run_server("--data-dir", str(data), "--backup", str(copy))
    finally:
        talking.set()
        talker.join(20)
    assert backup.returncode == 0 and f"copied {data / 'pychat.db'} to {copy}" in backup.stdout, backup.stderr
    assert stat.S_IMODE(os.stat(copy).st_mode) == 0o600
    restored = tmp_path / "restored"
    restored.mkdir(mode=0o700)
    os.replace(copy, restored / "pychat.db")
    assert run_server("--data-dir", str(restored), "--check").returncode == 0
    again = start_server("--data-dir", str(restored), "--history", "3")
    bob = connect(again)
    bob.expect(re.escape("*** Choose a nickname:"))
    bob.send("bob")
    bob.send("here")
    replay = [HISTORY_LINE.match(line).group(2) for line in bob.lines_until("bob: here") if HISTORY_LINE.match(line)]
    numbers = [int(line.rsplit(" ", 1)[1]) for line in replay]
    assert len(numbers) == 3 and numbers == list(range(numbers[0], numbers[0] + 3)), replay
    assert "*** Password for alice:" in sign_in_prompt(again, connect, "alice"), "the account was not copied"
    assert run_server("--data-dir", str(data), "--backup", str(restored / "pychat.db")).returncode == 1


def sign_in_prompt(server, connect, nick: str) -> list[str]:
    client = connect(server)
    client.expect(re.escape("*** Choose a nickname:"))
    client.send(nick)
    return [client.expect(r"\*\*\* |!! ")]


# -- upgrading from 2.0 -------------------------------------------------------------------------------------------

def test_a_2_0_data_directory_keeps_its_people_their_bans_topics_messages_and_a_month_of_history(
        start_server, connect, tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    salt = os.urandom(16)
    month_ago = time.time() - 30 * 86400
    records = {
        "accounts.jsonl": [{"key": module.name_key("alice"), "value": {
            "name": "alice", "salt": salt.hex(), "hash": module.hash_password(PASSWORD, salt).hex(), "n": 2 ** 14,
            "r": 8, "p": 1, "since": month_ago, "ignoring": []}}],
        "rooms.jsonl": [{"key": "lobby", "value": {"room": "lobby", "topic": "welcome back", "modes": []}}],
        "offline.jsonl": [{"key": module.name_key("alice") + "/1", "value": {
            "to": "alice", "from": "bob", "from_key": "bob", "time": month_ago, "text": "did you see it?"}}],
        "history.jsonl": [{"time": month_ago, "room": "lobby", "line": "bob: the migration plan is ready"},
                          {"time": month_ago + 1, "room": "lobby", "line": "* bob ships it"}],
    }
    for name, lines in records.items():
        (data / name).write_text("".join(json.dumps(line) + "\n" for line in lines) + "{damaged\n")
    write_bans(data, {"kind": "network", "target": "127.0.1.0/24"})
    server = start_server("--data-dir", str(data))
    server.wait_for_log(r"imported pyChat 2\.0's files in .*1 from accounts\.jsonl.*2 from history\.jsonl")
    assert sorted(os.listdir(data)) == sorted(["lock", "pychat.db", "pychat.db-shm", "pychat.db-wal"]
                                              + [f"{name}.imported" for name in [*records, "bans.jsonl"]])
    assert ClientFrom(server.host, server.port, "127.0.1.7").wait_closed()[0].startswith("!! You are banned")
    alice = connect(server)
    lines = sign_in(alice, "alice") + alice.lines_until(re.escape("*** End of messages left for you."), timeout=10)
    assert "*** Topic of #lobby: welcome back" in lines and any("did you see it?" in line for line in lines)
    alice.send("/search migration")
    found = alice.expect("-- ")
    day = time.strftime("%Y-%m-%d", time.gmtime(month_ago))
    assert found.startswith(f"-- [{day} ") and found.endswith("#lobby <bob> the migration plan is ready"), found


# -- a full disk, a read-only directory -----------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A file system of 2 MiB of its own (tmpfs), mounted for the test: root only."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)],
                             capture_output=True, text=True, timeout=10)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=10)


def fill(path) -> None:
    """Write PATH until the file system is full."""
    with open(path, "wb", buffering=0) as file:     # unbuffered: closing it never writes what did not fit
        try:
            for _ in range(10_000):
                file.write(b"\0" * 65536)
        except OSError:
            return
    pytest.fail(f"{path} never filled its file system")


def test_a_full_disk_refuses_changes_with_a_line_keeps_the_chat_and_writes_its_lines_once_there_is_room(
        small_disk, start_server, connect):
    data = small_disk / "data"
    server = start_server("--data-dir", str(data), "--rate", "0", "--history", "3")
    alice = connect(server, "alice")
    register(alice)
    bob = connect(server, "bob")
    fill(small_disk / "filler")
    said = [f"while full {n} " + "x" * 1000 for n in range(300)]
    for n, text in enumerate(said):
        alice.send(text)
        if n % 50 == 49:
            bob.expect(re.escape(f"alice: {text}"), timeout=10)     # the chat goes on
    server.wait_for_log(r"chat lines cannot be written \(database or disk is full\)")
    bob.send(f"/register {PASSWORD}")
    assert bob.expect("-- |!! ", timeout=10) == "!! It could not be saved (database or disk is full); try again later."
    server.wait_for_log(r"a change could not be saved: database or disk is full")
    os.unlink(small_disk / "filler")
    server.wait_for_log(r"\d+ chat line\(s\) written after all", timeout=10)
    server.stop(signal.SIGKILL)
    again = start_server("--data-dir", str(data), "--history", "3")
    carol = connect(again, "carol")
    carol.send("here")
    replay = [HISTORY_LINE.match(line).group(2) for line in carol.lines_until("carol: here") if HISTORY_LINE.match(line)]
    assert replay == [f"alice: {text}" for text in said[-3:]]
    assert "*** Password for alice:" in sign_in_prompt(again, connect, "alice")
    assert sign_in_prompt(again, connect, "bob")[0].startswith("*** Welcome, bob"), "a refused registration was kept"


def test_a_read_only_data_directory_stops_the_start_with_one_line(small_disk, start_server, connect):
    data = small_disk / "data"
    server = start_server("--data-dir", str(data))
    connect(server, "alice")
    assert server.stop() == 0
    remounted = subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True, text=True,
                               timeout=10)
    assert remounted.returncode == 0, remounted.stderr
    finished = run_server("--data-dir", str(data))
    assert finished.returncode == 1 and "cannot start: " in finished.stderr and "Read-only" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_a_server_killed_on_a_full_disk_starts_again_on_it_with_everything_confirmed(small_disk, start_server,
                                                                                     connect):
    data = small_disk / "data"
    server = start_server("--data-dir", str(data))
    alice = connect(server, "alice")
    register(alice)
    alice.send("/join dev")
    alice.send("/topic kept through it all")
    alice.expect(r"\*\*\* alice set the topic")
    deadline = time.monotonic() + TIMEOUT       # the topic is announced, then saved
    while not database_rows(data, "SELECT topic FROM rooms WHERE key='dev'") and time.monotonic() < deadline:
        time.sleep(0.01)
    fill(small_disk / "filler")
    server.stop(signal.SIGKILL)
    again = start_server("--data-dir", str(data))       # nothing is rewritten at start: a full disk is no matter
    assert "*** Password for alice:" in sign_in_prompt(again, connect, "alice")
    bob = connect(again, "bob")
    bob.send("/join dev")
    bob.expect(re.escape("*** Topic of #dev: kept through it all"))
