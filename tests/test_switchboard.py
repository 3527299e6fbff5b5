"""The switchboard: one thread reads every signed-in connection and handles its chat lines; commands run
on a thread of the connection's own, in order with everything else it sent."""
from __future__ import annotations

import re
import time

import pytest
from pathlib import Path

from conftest import TIMEOUT, LineClient
from test_tls import certificates, tls_connect, tls_server  # noqa: F401  (fixtures)


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no Threads line")


def test_people_signed_in_need_no_thread_each(start_server, connect):
    server = start_server("--max-per-ip", "0", "--rate", "0")
    clients = [connect(server, f"p{n}") for n in range(60)]
    clients[0].expect(re.escape("*** p59 joined #lobby"))
    clients[59].send("still here")
    clients[0].expect("^p59: still here$")
    threads = threads_of(server.process.pid)
    # The main thread, two accepting threads at most, the switchboard, and a sign-in or two finishing.
    assert threads <= 8, f"{threads} threads for 60 people signed in"


@pytest.mark.server_options("--op-password", "right secret")
def test_a_slow_command_holds_up_no_one_else(server, chat):
    alice, bob, carol = chat("alice", "bob", "carol")
    started = time.monotonic()
    alice.send("/op wrong secret")                  # a wrong guess is answered only after a pause
    bob.send("hello while alice waits")
    carol.expect("^bob: hello while alice waits$", timeout=TIMEOUT)
    bob_arrived = time.monotonic() - started
    answer = alice.expect("^!! ", timeout=TIMEOUT)
    assert answer == "!! Wrong operator password.", answer
    alice_answered = time.monotonic() - started
    assert alice_answered >= 0.9, f"the wrong guess was answered after {alice_answered:.2f} s, without its pause"
    assert bob_arrived < 0.5, f"bob's line took {bob_arrived:.2f} s while alice's command waited"


def test_a_line_held_to_go_out_with_others_still_goes_within_moments(start_server, connect):
    # Each line is sent the moment the one before comes back: a room of 40 written to a moment ago holds
    # its next line (40 x 60 us), to leave with whatever follows. Nothing else happens here, so only the
    # end of the hold sends it; were it to wait for the switchboard's next look at its clocks (once a
    # second), ten lines would take seconds.
    server = start_server("--rate", "0", "--max-per-ip", "0")
    alice = connect(server, "alice")
    others = [connect(server, f"p{n}") for n in range(39)]
    alice.expect(re.escape("*** p38 joined #lobby"))
    started = time.monotonic()
    for n in range(10):
        alice.send(f"line {n}")
        alice.expect(f"^alice: line {n}$")
    took = time.monotonic() - started
    assert took < 2.0, f"ten lines, each held a moment, took {took:.2f} s to come back"
    assert others[-1].lines_until("^alice: line 9$")[-10:] == [f"alice: line {n}" for n in range(10)]


def test_lines_sent_with_a_command_keep_their_order_and_their_room(server, chat):
    alice, bob, carol = chat("alice", "bob", "carol")
    carol.send("/join dev")
    carol.expect(re.escape("*** You are in #dev"))
    alice.send_raw(b"/join dev\nfirst\n/me second\nthird\n")
    lines = carol.lines_until("^alice: third$")
    said = [line for line in lines if "alice" in line]
    assert said == ["*** alice joined #dev", "alice: first", "* alice second", "alice: third"], said
    bob.send("marker")
    seen = bob.lines_until("^bob: marker$")
    assert not [line for line in seen if "first" in line or "third" in line], \
        f"a line alice sent after /join dev reached the lobby: {seen}"


def test_lines_sent_together_with_the_nickname_are_said_once_signed_in(server, connect):
    bob = connect(server, "bob")
    alice = connect(server)
    alice.expect(re.escape("*** Choose a nickname:"))
    alice.send_raw(b"alice\nhello from the first packet\n/me waves from it too\n")
    bob.expect("^alice: hello from the first packet$")
    bob.expect(r"^\* alice waves from it too$")


def test_lines_that_arrive_in_one_tls_record_with_the_nickname_are_all_read(tls_server, tls_connect):
    bob = tls_connect(tls_server, "bob")
    alice = tls_connect(tls_server)
    alice.expect(re.escape("*** Choose a nickname:"))
    # One write over TLS is one record: the server decrypts all of it at once, and a poll() on the socket
    # would never say that the lines after the nickname are there.
    alice.send_raw(b"alice\none\ntwo\nthree\n")
    for word in ("one", "two", "three"):
        bob.expect(f"^alice: {word}$")


def test_commands_and_chat_lines_sent_together_by_many_are_all_answered_and_said(start_server, connect):
    server = start_server("--max-per-ip", "0")
    talkers = [connect(server, f"t{n}") for n in range(5)]
    listener = connect(server, "listener")
    for n, talker in enumerate(talkers):
        talker.send_raw(f"/who\nline from t{n}\n".encode())
    for talker in talkers:
        talker.expect(r"^-- \d+ in #lobby: ")
    # Each one's command runs on its own thread, so their lines may come in any order, but all of them come.
    said = {listener.expect(r"^t\d: line from t\d$") for _ in talkers}
    assert said == {f"t{n}: line from t{n}" for n in range(5)}, said


def test_someone_who_leaves_during_their_command_is_let_go(start_server, connect):
    server = start_server("--op-password", "right secret")
    bob = connect(server, "bob")
    alice = connect(server, "alice")
    bob.expect(re.escape("*** alice joined #lobby"))
    alice.send("/op wrong secret")
    alice.close()                                   # gone before the answer comes
    bob.expect(re.escape("*** alice quit"), timeout=TIMEOUT)
    newcomer = LineClient(server.host, server.port)
    try:
        newcomer.login("alice")                     # the name is free again
    finally:
        newcomer.close()


def test_an_irc_clients_messages_around_a_command_keep_their_order(start_server, connect, irc_connect):
    server = start_server("--irc-port", "0")
    bob = connect(server, "bob")
    alice = irc_connect(server, "alice")
    bob.expect(re.escape("*** alice joined #lobby"))
    alice.sock.sendall(b"PRIVMSG #lobby :before\r\nWHOIS bob\r\nPRIVMSG #lobby :after\r\nPING :token\r\n")
    alice.expect(r"311 alice bob ")
    alice.expect(r"PONG \S+ :?token$")
    assert [bob.expect(r"^alice: "), bob.expect(r"^alice: ")] == ["alice: before", "alice: after"]
