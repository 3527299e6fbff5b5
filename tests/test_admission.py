"""Who gets in, with real servers: limits that always come back down, running out of descriptors, guessing."""
from __future__ import annotations

import os
import re
import socket
import time

import pytest

from conftest import ClientFrom, TIMEOUT, LineClient, shown

resource = pytest.importorskip("resource")
NICKNAME_PROMPT = "*** Choose a nickname:"
OP_SECRET = "the operators' own secret"




def vm_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def first_line(server) -> str:
    client = LineClient(server.host, server.port)
    try:
        return client.recv_line()
    finally:
        client.close()


def test_connections_whose_thread_cannot_start_give_their_place_back(start_server):
    server = start_server("--max-per-ip", "3")
    assert first_line(server).startswith("*** "), "the server does not serve yet"
    pid = server.process.pid
    # No more address space than now: a new thread can start only on a stack freed by one that ended.
    resource.prlimit(pid, resource.RLIMIT_AS, (vm_size(pid), resource.RLIM_INFINITY))
    tried = [LineClient(server.host, server.port) for _ in range(6)]
    try:
        answers = [client.recv_line() for client in tried]
    finally:
        resource.prlimit(pid, resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        for client in tried:
            client.close()
    refused = [line for line in answers if line.startswith("!! ")]
    assert refused and all(line == "!! The server is out of resources. Try again later." for line in refused), \
        answers
    server.wait_for_log(r"cannot start a thread for 127\.0\.0\.1")
    deadline = time.monotonic() + TIMEOUT
    for _ in range(100):        # a place comes back a moment after its close is logged
        places = [LineClient(server.host, server.port) for _ in range(3)]
        lines = [client.recv_line() for client in places]
        for client in places:
            client.close()
        if all(line.startswith("*** ") for line in lines):
            return
        assert time.monotonic() < deadline, f"places were not given back: {lines}"
    pytest.fail("places were not given back")


def test_out_of_descriptors_the_server_tells_newcomers_logs_once_and_does_not_spin(start_server):
    server = start_server("--max-clients", "0")
    pid = server.process.pid
    inside = LineClient(server.host, server.port)
    inside.login("alice")
    open_now = len(os.listdir(f"/proc/{pid}/fd"))
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_now, hard))
    turned_away = [LineClient(server.host, server.port) for _ in range(3)]
    try:
        for client in turned_away:
            assert client.wait_closed() == ["!! The server is out of resources. Try again later."]
        waiting = socket.create_connection((server.host, server.port))     # stays in the listen queue
        used = cpu_seconds(pid)
        inside.send("still talking")
        inside.expect("alice: still talking")
        time.sleep(1.0)     # measuring CPU use over a second: nothing to wait for
        assert cpu_seconds(pid) - used < 0.3, "the accept loop spins while out of descriptors"
        waiting.close()
        assert len(re.findall("cannot accept connections", server.log())) == 1, server.log()[-2000:]
    finally:
        for client in turned_away:
            client.close()
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    deadline = time.monotonic() + TIMEOUT
    while True:         # the queued newcomer may still be turned away while the limit changes
        client = LineClient(server.host, server.port)
        if client.recv_line().startswith("***"):
            break
        assert time.monotonic() < deadline, "newcomers were still refused once descriptors were free"
        client.close()
    client.expect(re.escape(NICKNAME_PROMPT))
    client.close()
    server.wait_for_log("file descriptors are available again")


def test_three_wrong_operator_passwords_close_the_connection(start_server, connect):
    server = start_server("--op-password", OP_SECRET, "--guess-delay", "0.05")
    guesser = ClientFrom(server.host, server.port, "127.0.0.3")
    guesser.login("guesser")
    for n in range(1, 4):
        guesser.send(f"/op guess{n}")
        refusal = guesser.expect("!! ", timeout=10)
        assert re.match("!! (Wrong operator password|Disconnected: 3 wrong operator passwords)", refusal), refusal
    assert "3" in refusal, f"the third wrong guess did not say it was the last: {refusal}"
    guesser.wait_closed()
    server.wait_for_log(r"guesser@127\.0\.0\.3 left: too many wrong operator passwords")
    assert "guess" not in re.sub(r"guesser", "", server.log())


def test_an_address_that_guessed_wrong_too_often_is_refused_without_a_check(start_server):
    # A wrong guess checked now would wait 5 x 0.3 s: longer than the refusal may take.
    server = start_server("--op-password", OP_SECRET, "--max-per-ip", "0", "--rate", "0", "--guess-delay", "0.3")
    guessers = [ClientFrom(server.host, server.port, "127.0.0.2") for _ in range(10)]
    try:
        for n, guesser in enumerate(guessers):
            guesser.login(f"guesser{n}")
        for guesser in guessers:        # at once, each on its own connection
            guesser.send("/op wrong")
        for guesser in guessers:
            assert guesser.expect("!! ", timeout=10).startswith("!! Wrong operator password")
        late = ClientFrom(server.host, server.port, "127.0.0.2")
        late.login("late")
        late.send(f"/op {OP_SECRET}")        # even the right secret is not checked now
        sent = time.monotonic()
        refusal = late.expect("!! |-- ")
        assert re.match("!! (Disconnected: )?Too many wrong passwords from your address; try again in ", refusal), \
            refusal
        assert time.monotonic() - sent < 1, "the refusal waited like a checked guess"
        late.wait_closed()
        other = ClientFrom(server.host, server.port, "127.0.0.3")
        other.login("other")
        other.send(f"/op {OP_SECRET}")
        assert other.expect("!! |-- ") == "-- You are now an operator.", "another address was refused too"
    finally:
        for guesser in guessers:
            guesser.close()


def test_connections_over_ipv6_are_counted_against_max_per_ip(start_server):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    server = start_server("--host", "::", "--max-per-ip", "2")
    inside = [ClientFrom("::1", server.port, "::1") for _ in range(2)]
    for client in inside:
        client.expect(re.escape(NICKNAME_PROMPT))
    refused = ClientFrom("::1", server.port, "::1").wait_closed()
    assert refused == ["!! Too many connections from your address (at most 2)."], shown(refused)
    other = ClientFrom("127.0.0.1", server.port, "127.0.0.2")       # IPv4, mapped: another address
    other.expect(re.escape(NICKNAME_PROMPT))
    server.wait_for_log(r"connection from ::ffff:127\.0\.0\.2")
