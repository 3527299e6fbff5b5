"""Accounts in the client (issue 10), against a real server with a data directory: a registered
name's password typed hidden or given in $PYCHAT_ACCOUNT_PASSWORD, again by itself on reconnecting,
secret commands kept out of the history and masked on the screen, offline messages shown apart."""
from __future__ import annotations

import datetime
import re
import signal

import pytest

from conftest import LineClient
from test_accounts import operator_code
from test_client_pipe import run_piped
from test_client_terminal import CTRL_C, UP, run_client  # noqa: F401 (fixture)

PASSWORD = "correct horse"
ACCOUNT_VARIABLE = "PYCHAT_ACCOUNT_PASSWORD"


@pytest.fixture
def data(tmp_path):
    return tmp_path / "data"


def registered(server, connect, nick: str = "alice") -> None:
    """Register NICK with PASSWORD from a raw client, which then leaves: the name waits for its owner."""
    owner = connect(server, nick)
    owner.send(f"/register {PASSWORD}")
    assert owner.expect(r"-- Registered |!! ", timeout=10).startswith("-- Registered ")
    owner.send("/quit")
    owner.wait_closed()


def screen_rows(client) -> list[str]:
    return [client.screen.line(row) for row in range(client.screen.rows)]


def assert_password_never_shown(client, *secrets: str) -> None:
    for secret in secrets or (PASSWORD,):
        assert secret.encode() not in client.output, f"{secret!r} reached the screen:\n{client.screen.dump()}"


def test_a_registered_name_asks_for_its_password_hidden_and_up_never_recalls_it(start_server, connect,
                                                                                run_client, data):
    server = start_server("--data-dir", str(data))
    registered(server, connect)
    alice = run_client(server, "--nick", "alice")
    alice.wait_for_input_line("password for alice: ")
    alice.type_hidden(PASSWORD[:7], "password for alice: ")
    alice.type(PASSWORD[7:] + "\r")
    alice.wait_for_input_line("alice #lobby> ")
    alice.type(UP + UP + "x")
    alice.wait_for_input_line("alice #lobby> x")     # the password was not kept: Up had nothing to bring
    assert_password_never_shown(alice)
    assert PASSWORD not in server.log()


def test_a_wrong_password_is_asked_for_again_and_the_right_one_lets_me_in(start_server, connect,
                                                                        run_client, data):
    server = start_server("--data-dir", str(data), "--guess-delay", "0.05")
    registered(server, connect)
    alice = run_client(server, "--nick", "alice", env={ACCOUNT_VARIABLE: "not the password"})
    alice.wait_for_row(r"!! Wrong password for alice\.$", timeout=10)
    alice.wait_for_input_line("password for alice: ")     # the variable was tried once; now I am asked
    alice.type(PASSWORD + "\r")
    alice.wait_for_input_line("alice #lobby> ", timeout=10)
    assert_password_never_shown(alice, PASSWORD, "not the password")


def test_the_password_in_the_environment_signs_in_without_asking(start_server, connect, run_client, data):
    server = start_server("--data-dir", str(data))
    registered(server, connect)
    bob = connect(server, "bob")
    alice = run_client(server, "--nick", "alice", env={ACCOUNT_VARIABLE: PASSWORD})
    alice.wait_for_input_line("alice #lobby> ")
    bob.expect(re.escape("*** alice joined #lobby"))
    assert b"password for" not in alice.output, "the client asked although the variable gave the password"
    assert_password_never_shown(alice)
    assert PASSWORD not in " ".join(alice.process.args)


def signs_in_again_without_asking(start_server, server, alice, data) -> None:
    """Restart SERVER on its port: the client connects again and signs in without asking for the password."""
    asked = alice.output.count(b"password for alice: ")
    server.stop()
    alice.wait_for_row(r"-!- connecting again in")
    start_server("--data-dir", str(data), "--port", str(server.port))
    alice.wait_for_row(r"-!- connected to .* again; signing in as alice$", timeout=15)
    alice.wait_for_input_line("alice #lobby> ", timeout=10)
    assert alice.output.count(b"password for alice: ") == asked, "the password was asked for again"
    assert_password_never_shown(alice)


def test_reconnecting_answers_the_typed_password_again_without_asking(start_server, connect, run_client,
                                                                     data):
    server = start_server("--data-dir", str(data))
    registered(server, connect)
    alice = run_client(server, "--nick", "alice")
    alice.wait_for_input_line("password for alice: ")
    alice.type(PASSWORD + "\r")
    alice.wait_for_input_line("alice #lobby> ")
    signs_in_again_without_asking(start_server, server, alice, data)


def test_reconnecting_after_register_and_passwd_answers_with_the_new_password(start_server, run_client, data):
    server = start_server("--data-dir", str(data), "--guess-delay", "0.05")
    alice = run_client(server, "--nick", "alice")
    alice.wait_for_input_line("alice #lobby> ")
    alice.type("/register first-secret-1\r")
    alice.wait_for_row(r"-- Registered alice\.", timeout=10)
    alice.type("/passwd first-secret-1 second-secret-2\r")
    alice.wait_for_row(r"-- Password changed\.", timeout=10)
    alice.type("/passwd wrong-old-one third-secret-3\r")         # refused: the password stays the second
    alice.wait_for_row(r"!! Wrong password for alice\.", timeout=10)
    signs_in_again_without_asking(start_server, server, alice, data)
    assert_password_never_shown(alice, "first-secret-1", "second-secret-2", "third-secret-3")


def test_a_session_ended_from_another_device_does_not_come_back_by_itself(start_server, connect, run_client,
                                                                            data):
    server = start_server("--data-dir", str(data))
    registered(server, connect)
    alice = run_client(server, "--nick", "alice", env={ACCOUNT_VARIABLE: PASSWORD})
    alice.wait_for_input_line("alice #lobby> ")
    laptop = LineClient(server.host, server.port)
    try:
        laptop.expect(re.escape("*** Choose a nickname:"))
        laptop.send("alice")
        laptop.expect(re.escape("*** Password for alice:"))
        laptop.send(PASSWORD)
        laptop.expect(r"\*\*\* Welcome, alice!", timeout=10)
        alice.wait_for_row(r"You are also signed in from pyChat at 127\.0\.0\.1 \(2 sessions\)")
        laptop.send("/kick-session 1")
        laptop.expect(re.escape("-- Ended session 1 (pyChat at 127.0.0.1)."))
        assert alice.wait_exit() == 1
        assert any(row.endswith("-!- disconnected: by alice: ended from another session")
                   for row in screen_rows(alice)), alice.screen.dump()
        laptop.send("/online")
        assert laptop.expect(r"-- \d+ online") == "-- 1 online: alice (#lobby)"
    finally:
        laptop.close()


def test_secret_commands_are_masked_kept_from_up_and_listed_masked_when_not_sent(start_server, run_client,
                                                                                 data):
    server = start_server("--data-dir", str(data))
    alice = run_client(server, "--nick", "alice")
    alice.wait_for_input_line("alice #lobby> ")
    alice.type(f"/register {PASSWORD}")
    alice.wait_for_input_line("alice #lobby> /register ******* *****")
    alice.type("\r")
    alice.wait_for_row(r"-- Registered alice\.", timeout=10)
    alice.type("hello\r")
    alice.wait_for_row(r"\] alice: hello$")
    alice.type(UP + UP + "!")
    alice.wait_for_input_line("alice #lobby> hello!")   # Up skipped the /register line
    alice.type(CTRL_C)                                  # clears the line (Up brings it back)
    alice.wait_for_input_line("alice #lobby> ")
    server.stop()
    alice.wait_for_row(r"-!- connecting again in")
    alice.type("/passwd correct horse battery-staple\r")
    alice.wait_for_input_line("offline (1 waiting) alice #lobby> ")
    alice.type("/op letmein")
    alice.wait_for_input_line("offline (1 waiting) alice #lobby> /op *******")
    alice.process.send_signal(signal.SIGTERM)
    assert alice.wait_exit() == 128 + signal.SIGTERM
    rows = screen_rows(alice)
    assert any(row.endswith("-!- not sent: /passwd ********") for row in rows), alice.screen.dump()
    assert any(row.endswith("-!- not sent: /op ********") for row in rows), alice.screen.dump()
    assert_password_never_shown(alice, PASSWORD, "battery-staple", "letmein")


def test_offline_messages_are_shown_apart_with_their_sender_and_when_they_were_left(start_server, connect,
                                                                                   run_client, data):
    server = start_server("--data-dir", str(data))
    registered(server, connect)
    bob = connect(server, "bob")
    before = datetime.datetime.now(datetime.timezone.utc)
    bob.send("/msg alice are you there?")
    bob.expect("-- alice is offline")
    bob.send("/msg alice call me")
    bob.expect("-- alice is offline")
    after = datetime.datetime.now(datetime.timezone.utc)
    alice = run_client(server, "--nick", "alice", env={ACCOUNT_VARIABLE: PASSWORD, "TZ": "UTC"})
    alice.wait_for_row(r"\*\*\* End of messages left for you\.$")
    rows = screen_rows(alice)
    times = {f"{when:%Y-%m-%d %H:%M}" for when in (before, after)}
    pattern = re.compile(r"\[\d\d:\d\d:\d\d\] \[offline from bob, left (\S+ \S+)\] (.*)$")
    left = [pattern.match(row).groups() for row in rows if pattern.match(row)]
    assert [text for _, text in left] == ["are you there?", "call me"], alice.screen.dump()
    assert {when for when, _ in left} <= times, (left, times)
    header = next(number for number, row in enumerate(rows)
                  if row.endswith("*** 2 messages were left for you while you were away:"))
    entered = next(number for number, row in enumerate(rows) if "*** You are in #lobby" in row)
    assert entered < header, alice.screen.dump()
    assert b"\x1b[3;35m[offline from bob, left " in alice.output      # a style of their own
    assert b"\x1b[3;35m*** End of messages left for you." in alice.output
    alice.wait_for_input_line("alice #lobby> ")


def test_a_private_server_invitation_code_and_new_password_are_typed_hidden(start_server, run_client, data):
    server = start_server("--data-dir", str(data), "--private", "--operator", "owner")
    code = invited(server, "dave")
    dave = run_client(server, "--nick", "dave")
    dave.wait_for_input_line("invitation code for dave: ")
    dave.type_hidden(code[:6], "invitation code for dave: ")
    dave.type(code[6:] + "\r")
    dave.wait_for_input_line("choose a password for dave: ", timeout=10)
    dave.type_hidden("paper ", "choose a password for dave: ")
    dave.type("staple 9\r")
    dave.wait_for_input_line("dave #lobby> ", timeout=10)
    assert_password_never_shown(dave, code, "paper staple 9")


def test_an_empty_answer_at_the_password_prompt_goes_back_to_choosing_a_nickname(start_server, connect,
                                                                                 run_client, data):
    server = start_server("--data-dir", str(data))
    registered(server, connect)
    alice = run_client(server, "--nick", "alice")
    alice.wait_for_input_line("password for alice: ")
    alice.type("\r")
    alice.wait_for_input_line("nickname: ")
    alice.type("bob\r")
    alice.wait_for_input_line("bob #lobby> ", timeout=10)
    assert PASSWORD not in server.log() and "wrong password" not in server.log().lower(), server.log()


def invited(server, nick: str) -> str:
    """On a --private server whose operator is owner: sign owner in, invite NICK; returns the code."""
    owner = LineClient(server.host, server.port)
    try:
        owner.expect(re.escape("*** Choose a nickname:"))
        owner.send("owner")
        owner.expect(re.escape("*** Invitation code for owner:"))
        owner.send(operator_code(server, "owner"))
        owner.expect(re.escape("*** Choose a password for owner:"))
        owner.send(PASSWORD)
        owner.expect(r"\*\*\* Welcome, owner", timeout=10)
        owner.send(f"/invite-account {nick}")
        return re.match(rf"-- Invitation for {nick}: (\S+) ", owner.expect("-- ")).group(1)
    finally:
        owner.close()


def test_an_empty_answer_at_the_invitation_code_prompt_goes_back_to_choosing_a_nickname(start_server,
                                                                                       run_client, data):
    server = start_server("--data-dir", str(data), "--private", "--operator", "owner")
    code = invited(server, "dave")
    dave = run_client(server, "--nick", "dave")
    dave.wait_for_input_line("invitation code for dave: ")
    dave.type("\r")
    dave.wait_for_input_line("nickname: ")
    dave.type("dave\r")                     # the code is still good: it was not used up, nor guessed
    dave.wait_for_input_line("invitation code for dave: ")
    dave.type(code + "\r")
    dave.wait_for_input_line("choose a password for dave: ", timeout=10)
    assert_password_never_shown(dave, code)


def test_piped_the_account_password_comes_from_the_environment_or_the_client_says_how(start_server, connect,
                                                                                    data):
    server = start_server("--data-dir", str(data), "--guess-delay", "0.05")
    registered(server, connect)
    bob = connect(server, "bob")
    result = run_piped(server, "deploy done\n", "--nick", "alice", env={ACCOUNT_VARIABLE: PASSWORD})
    assert result.returncode == 0, result.stderr.decode()
    assert bob.expect(r"alice: ") == "alice: deploy done"
    assert PASSWORD not in result.stdout.decode()
    missing = run_piped(server, "deploy done\n", "--nick", "alice")
    assert missing.returncode == 1
    assert missing.stderr.decode() == ("pyChat: the server asks for the password for alice "
                                       f"(--account-password or ${ACCOUNT_VARIABLE})\n")
    wrong = run_piped(server, "deploy done\n", "--nick", "alice", env={ACCOUNT_VARIABLE: "not it at all"})
    assert wrong.returncode == 1
    assert wrong.stderr.decode() == "pyChat: password for alice refused: !! Wrong password for alice.\n"
