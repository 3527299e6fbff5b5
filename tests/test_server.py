"""The server over real sockets: framing, signing in, talking, commands, limits and shutdown."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, SERVER_SCRIPT, talk_until_cut_off


# -- framing -------------------------------------------------------------------

def test_greeting_asks_for_a_nickname(server, connect):
    client = connect(server)
    assert client.recv_line().startswith("*** pyChat ")
    assert client.recv_line() == "*** Choose a nickname:"


def test_a_line_split_across_many_writes_arrives_whole(chat):
    alice, bob = chat("alice", "bob")
    bob.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # "é" is split between its two bytes, and pauses make the pieces separate segments.
    for piece in (b"hel", b"lo w\xc3", b"\xa9", b"rld", b"\n"):
        bob.send_raw(piece)
        time.sleep(0.02)
    assert alice.expect("bob: ") == "bob: hello wérld"


@pytest.mark.server_options("--rate", "0")
def test_many_lines_in_one_write_all_arrive_in_order(chat):
    alice, bob = chat("alice", "bob")
    bob.send_raw(b"".join(f"line {n}\n".encode() for n in range(100)))
    assert [alice.expect("bob: ") for _ in range(100)] == [f"bob: line {n}" for n in range(100)]


def test_crlf_line_endings_are_accepted(chat):
    alice, bob = chat("alice", "bob")
    bob.send_raw(b"windows line\r\n")
    assert alice.expect("bob: ") == "bob: windows line"


# -- nicknames -------------------------------------------------------------------

@pytest.mark.parametrize("bad, why", [
    ("two words", "cannot contain ' '"),
    ("a:b", "cannot contain ':'"),
    ("\x1b[31mred", "cannot contain 'U\\+001B'"),
    ("9lives", "must start with a letter"),
    ("x" * 21, "too long"),
    ("server", "reserved"),
    ("Admin", "reserved"),
    ("*star", "cannot contain '\\*'"),
    ("pаypal", "mixes alphabets"),          # Cyrillic "а" among Latin letters
])
def test_bad_nicknames_are_refused_with_a_reason_and_asked_again(shared_server, connect, bad, why):
    client = connect(shared_server)
    client.expect(re.escape("*** Choose a nickname:"))
    client.send(bad)
    refusal = client.recv_line()
    assert refusal.startswith("!! ") and re.search(why, refusal), refusal
    assert client.recv_line() == "*** Choose a nickname:"
    client.send("goodname")
    assert client.expect(r"\*\*\* Welcome, ").startswith("*** Welcome, goodname!")


@pytest.mark.parametrize("lookalike", ["ALICE", "Alice", "aIice", "a1ice", "аӏісе"])   # the last all Cyrillic
def test_a_nickname_taken_in_any_case_or_lookalike_spelling_is_refused(connect, shared_server, lookalike):
    connect(shared_server, "alice")
    client = connect(shared_server)
    client.expect(re.escape("*** Choose a nickname:"))
    client.send(lookalike)
    assert re.match(r"!! Nickname .* is taken", client.recv_line())
    assert client.recv_line() == "*** Choose a nickname:"


def test_unicode_nicknames_of_one_script_are_welcome(chat):
    (zhang,) = chat("张伟")
    zhang.send("你好")
    assert zhang.expect("张伟: ") == "张伟: 你好"


# -- arriving, talking, leaving ------------------------------------------------------

def test_everyone_else_is_told_when_someone_joins_and_leaves(chat, server, connect):
    alice, bob = chat("alice", "bob")
    carol = connect(server, "carol")
    assert alice.expect(r"\*\*\* carol") == "*** carol joined #lobby"
    assert bob.expect(r"\*\*\* carol") == "*** carol joined #lobby"
    carol.close()
    assert alice.expect(r"\*\*\* carol") == "*** carol quit (connection closed)"
    assert bob.expect(r"\*\*\* carol") == "*** carol quit (connection closed)"


def test_the_newcomer_is_welcomed_and_told_who_is_there(chat, server, connect):
    chat("alice")
    bob = connect(server)
    bob.expect(re.escape("*** Choose a nickname:"))
    bob.send("bob")
    assert bob.recv_line() == "*** Welcome, bob! Type /help for the commands."
    assert bob.recv_line() == "*** You are in #lobby with alice."


def test_a_chat_line_reaches_everyone_including_the_sender(chat):
    alice, bob, carol = chat("alice", "bob", "carol")
    bob.send("hello, everyone")
    for person in (alice, bob, carol):
        assert person.expect("bob: ") == "bob: hello, everyone"


@pytest.mark.server_options("--rate", "0")
def test_everyone_sees_the_same_order_of_lines(chat):
    people = chat("alice", "bob", "carol")
    for n in range(40):
        for person in people:
            person.send(f"{person.nick} {n}")
    sequences = [[p.expect(r"\w+: ") for _ in range(120)] for p in people]
    assert sequences[0] == sequences[1] == sequences[2]
    for person in people:
        own = [line for line in sequences[0] if line.startswith(person.nick)]
        assert own == [f"{person.nick}: {person.nick} {n}" for n in range(40)]


def test_control_characters_never_reach_another_terminal(chat):
    alice, bob = chat("alice", "bob")
    bob.send_raw(b"\x1b[2Jclear\x07 bell\x00 nul\rreturn \xc2\x9bc1 \xe2\x80\xaereversed\xe2\x80\xac\ttab\n")
    line = alice.expect("bob: ")
    assert line == "bob: [2Jclear bell nulreturn c1 reversed tab"
    assert not re.search("[\x00-\x1f\x7f-\x9f\u202a-\u202e]", line)


def test_a_line_that_is_only_control_characters_is_not_sent(chat):
    alice, bob = chat("alice", "bob")
    bob.send_raw(b"\x1b\x07\x00\n")
    bob.send("after")
    assert alice.expect("bob: ") == "bob: after"


def test_invalid_utf8_is_replaced_not_fatal(chat):
    alice, bob = chat("alice", "bob")
    bob.send_raw(b"caf\xff\xfe\n")
    assert alice.expect("bob: ") == "bob: caf\ufffd\ufffd"
    bob.send("still here")
    assert alice.expect("bob: ") == "bob: still here"


def test_a_line_over_4096_bytes_is_refused_and_the_connection_goes_on(chat):
    alice, bob = chat("alice", "bob")
    bob.send("x" * 4097)
    assert bob.expect("!! ").startswith("!! Line too long")
    bob.send("y" * 4096)
    assert alice.expect("bob: ") == "bob: " + "y" * 4096


def test_a_huge_line_without_newline_is_refused_once_and_discarded(chat):
    alice, bob = chat("alice", "bob")
    bob.send_raw(b"z" * (1024 * 1024))
    assert bob.expect("!! ").startswith("!! Line too long")
    bob.send_raw(b"z" * 1000 + b"\nafter the flood\n")
    assert alice.expect("bob: ") == "bob: after the flood"


def test_a_line_starting_with_a_double_slash_is_said_with_one_slash(chat):
    alice, bob = chat("alice", "bob")
    bob.send("//shrug")
    assert alice.expect("bob: ") == "bob: /shrug"


# -- commands -------------------------------------------------------------------------

def test_help_lists_every_registered_command_with_its_help(chat):
    from commands import load_commands

    (alice,) = chat("alice")
    alice.send("/help")
    lines = alice.lines_until(r"-- Type /help COMMAND")
    registered = load_commands().all()
    assert len(registered) >= 3
    for cmd in registered:
        assert any(line.startswith(f"-- {cmd.usage}") and line.rstrip().endswith(cmd.summary)
                   or line.rstrip().endswith(f"{cmd.summary}  (operators)") for line in lines), (cmd.name, lines)
    usages = [line[3:].split("  ")[0] for line in lines[:-1]]
    assert usages == sorted(usages), "commands are listed in order"


def test_help_about_one_command_shows_its_usage_and_aliases(chat):
    (alice,) = chat("alice")
    alice.send("/help /quit")
    assert alice.recv_line().startswith("-- /quit [MESSAGE...]  Leave the chat")
    assert alice.recv_line() == "-- Also: /exit, /bye"
    alice.send("/help nosuch")
    assert alice.recv_line() == "!! There is no /nosuch. Type /help for the list."


def test_online_lists_everyone_with_their_room(chat):
    alice, bob = chat("alice", "bob")
    alice.send("/online")
    assert alice.expect("-- ") == "-- 2 online: alice (#lobby), bob (#lobby)"


def test_quit_says_goodbye_closes_and_tells_the_others(chat):
    alice, bob = chat("alice", "bob")
    bob.send("/quit see you tomorrow")
    assert bob.wait_closed()[-1] == "*** Bye."
    assert alice.expect(r"\*\*\* bob") == "*** bob quit (see you tomorrow)"
    alice.send("/online")
    assert alice.expect("-- ") == "-- 1 online: alice (#lobby)"


def test_lines_after_quit_in_the_same_write_are_not_said(chat):
    alice, bob = chat("alice", "bob")
    bob.send_raw(b"before\n/quit\nafter\n")
    assert alice.expect("bob: ") == "bob: before"
    assert alice.recv_line() == "*** bob quit", "a line after /quit was said"


def test_an_unknown_command_points_to_help(chat):
    (alice,) = chat("alice")
    alice.send("/fly away")
    assert alice.recv_line() == "!! Unknown command /fly. Type /help for the list."


def test_wrong_use_of_a_command_is_answered_with_its_usage(chat):
    (alice,) = chat("alice")
    alice.send("/online everyone")
    assert alice.recv_line() == "!! Too many arguments. Usage: /online"


# -- slow readers, limits, shutdown ---------------------------------------------------------

def test_a_stalled_reader_does_not_delay_others_and_is_cut_off(start_server, connect):
    server = start_server("--max-queue", "65536", "--rate", "0")
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect((server.host, server.port))
    stalled.sendall(b"sleepy\n")          # signs in, then never reads again
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    alice.expect(r"\*\*\* bob joined")
    talk_until_cut_off(server, bob, alice, "sleepy")
    stalled.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_tells_everyone_closes_and_exits_zero(start_server, connect, sig):
    server = start_server()
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    half = connect(server)                # still at the nickname prompt
    half.expect(re.escape("*** Choose a nickname:"))
    alice.expect(r"\*\*\* bob joined")
    started = time.monotonic()
    assert server.stop(sig) == 0
    assert time.monotonic() - started < 5
    for client in (alice, bob, half):
        assert "*** Server shutting down." in client.wait_closed()
    assert "Traceback" not in server.log()


def test_shutdown_is_quick_even_with_a_stalled_reader(start_server, connect):
    server = start_server("--rate", "0")
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect((server.host, server.port))
    stalled.sendall(b"sleepy\n")
    alice = connect(server, "alice")
    for n in range(150):                  # about 150 kB queued for sleepy: stalled, not yet cut off
        alice.send(f"{n} " + "y" * 1000)
        alice.expect(f"alice: {n} ")
    assert "cutting off" not in server.log()
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 5
    stalled.close()


# -- the scripts themselves -------------------------------------------------------------------

def test_server_help_explains_every_option():
    result = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--help"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0
    for option in ("--host", "--port", "--max-clients", "--max-per-ip", "--rate", "--burst", "--history",
                   "--history-file", "--password", "--op-password", "--tls-cert", "--tls-key",
                   "--nick-timeout", "--idle-timeout", "--max-queue", "--guess-delay", "-v", "-q", "--version"):
        assert option in result.stdout, option


def test_server_version():
    result = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--version"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0 and re.match(r"pyChat server \d+\.\d+", result.stdout)


def test_scripts_are_executable():
    for name in ("pyChat-server.py", "pyChat-client.py"):
        assert os.access(ROOT / name, os.X_OK), name


def test_a_port_in_use_gives_one_clear_line(server):
    result = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--host", "127.0.0.1",
                             "--port", str(server.port)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "Traceback" not in result.stderr


# -- nc as a client -----------------------------------------------------------------------------

def test_nc_is_a_working_client(server, connect):
    nc = shutil.which("nc")
    if nc is None:
        if os.environ.get("PYCHAT_REQUIRE_NC"):
            pytest.fail("nc is required here (PYCHAT_REQUIRE_NC is set) but not installed")
        pytest.skip("nc is not installed")
    alice = connect(server, "alice")
    with subprocess.Popen([nc, server.host, str(server.port)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as session:
        try:
            session.stdin.write("ncuser\nhello from nc\n")
            session.stdin.flush()
            assert alice.expect("ncuser: ") == "ncuser: hello from nc"
            alice.send("hello nc")
            alice.expect("alice: hello nc")     # queued to everyone, nc included, before /quit is read
            session.stdin.write("/quit\n")
            session.stdin.flush()
            output, _ = session.communicate(timeout=10)
        finally:
            session.kill()
    assert "*** Choose a nickname:" in output
    assert "*** Welcome, ncuser!" in output
    assert "alice: hello nc" in output
    assert output.rstrip().endswith("*** Bye.")
