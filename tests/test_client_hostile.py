"""The client against a hostile or wrong server, and wrong TLS settings: a clear line, never a
traceback, never unbounded memory (issue 13 points 6 and 7, issue 14 points 18 to 20)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from test_client_pipe import CLIENT, run_piped
from test_client_terminal import fake_server, run_client  # noqa: F401 (fixtures)


def peak_memory_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        found = re.search(r"VmHWM:\s+(\d+) kB", status.read())
    return int(found.group(1)) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc to see memory")
def test_an_endless_line_from_the_server_is_dropped_as_it_streams_in(fake_server, run_client):
    alice = run_client(fake_server, "--nick", "alice")
    fake_server.sign_in("alice")
    alice.wait_for_input_line("alice #lobby> ")
    before = peak_memory_mib(alice.process.pid)
    chunk = b"x" * (1 << 20)
    for _ in range(60):                      # 60 MiB without a newline
        fake_server.sock.sendall(chunk)
    fake_server.send("", "bob: after the flood")
    alice.wait_for_row(r"bob: after the flood$", timeout=20)
    alice.wait_for_row(r"-!- 1 line\(s\) from the server over 16384 bytes dropped")
    grown = peak_memory_mib(alice.process.pid) - before
    assert grown < 10, f"the client grew by {grown:.0f} MiB reading one endless line"


@pytest.mark.parametrize("rate", [".", "0", "0.0"])
def test_a_senseless_flood_limit_in_the_greeting_is_ignored_not_a_crash(fake_server, rate):
    client = subprocess.Popen(
        [sys.executable, str(CLIENT), "--host", fake_server.host, "--port", str(fake_server.port),
         "--nick", "ci"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client.stdin.write("".join(f"line {n}\n" for n in range(30)).encode())
        client.stdin.close()
        fake_server.sign_in("ci", greeting=f"*** x: 1 online. Flood limit: 20 lines at once, then {rate} a second.")
        assert [fake_server.expect("line ") for _ in range(30)] == [f"line {n}" for n in range(30)]
        fake_server.expect("/quit$")
        fake_server.send("*** Bye.")
        fake_server.hang_up()
        client.wait(timeout=10)
        errors = client.stderr.read()
    finally:
        client.kill()
        client.wait()
    assert client.returncode == 0 and b"Traceback" not in errors, errors.decode()


def test_a_history_time_past_what_the_local_zone_can_show_is_no_crash(fake_server, run_client):
    alice = run_client(fake_server, "--nick", "alice", env={"TZ": "UTC-9"})   # nine hours east
    fake_server.sign_in("alice")
    fake_server.send("[history 9999-12-31T23:59:59Z] bob: from the end of time", "bob: now")
    alice.wait_for_row(r"^\[23:59:59\] bob: from the end of time$")
    alice.wait_for_row(r"bob: now$")
    assert alice.process.poll() is None


def test_tls_client_at_a_plain_server_says_so_in_words(server):
    result = run_piped(server, "hi\n", "--nick", "ci", "--tls")
    stderr = result.stderr.decode()
    assert result.returncode == 1
    assert stderr == f"pyChat: {server.host}:{server.port} does not speak TLS: it answered in plain " \
                     "text (try without --tls)\n", stderr


@pytest.mark.parametrize("make, complaint", [
    (lambda folder: folder / "nope.pem", "no such file"),
    (lambda folder: folder, "is a directory, not a certificate file"),
    (lambda folder: (folder / "notes.txt").write_text("not a certificate") and folder / "notes.txt",
     "holds no PEM certificate"),
])
def test_a_wrong_cafile_is_one_line_naming_the_file(shared_server, tmp_path, make, complaint):
    path = make(tmp_path)
    result = run_piped(shared_server, "hi\n", "--nick", "ci", "--cafile", str(path))
    stderr = result.stderr.decode()
    assert result.returncode == 2
    assert stderr.startswith(f"pyChat: --cafile {path}: {complaint}") and stderr.count("\n") == 1, stderr
