"""What IRC's documents (modern.ircdocs.horse, the RFCs, IRCv3) and the irctest suite expect of a server,
spoken raw over real sockets: the server's name, the auto-joined rooms, the message of the day, LUSERS,
TIME, INFO, HELP, PING and input that is not UTF-8.

Each test starts a real server with --irc-port 0. To prove that something did
NOT arrive, the client sends PING and checks what came before its PONG.
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import SERVER_SCRIPT, IrcClient, import_script, shown

server = import_script(SERVER_SCRIPT, "pychat_server_conformance")
PLAIN_IRC = ("--irc-port", "0", "--irc-auto-join", "")      # as the README recommends for a plain IRC server


def params(line: str) -> list[str]:
    return server.parse_irc_message(line).params


def command_of(line: str) -> str:
    return server.parse_irc_message(line).command


def register(client: IrcClient, nick: str, realname: str = "the tester") -> list[str]:
    """Sign in as NICK on a server that joins no room; what came up to the end of the welcome burst."""
    start = len(client.seen)
    client.send(f"NICK {nick}")
    client.send(f"USER {nick} 0 * :{realname}")
    client.expect(rf"001 {nick} ")
    client.nick = nick
    return client.seen[start:] + until_pong(client)


def until_pong(client: IrcClient, token: str = "sync") -> list[str]:
    """Every line up to the answer to a PING sent now: what the server had to say before it."""
    client.send(f"PING {token}")
    return client.lines_until(rf"PONG \S+ :?{token}$")


# -- --irc-auto-join ------------------------------------------------------------------------------------

def test_an_empty_auto_join_puts_an_irc_user_in_no_channel(start_server, irc_connect):
    running = start_server(*PLAIN_IRC)
    alice = irc_connect(running)
    lines = register(alice, "alice")
    assert not [line for line in lines if command_of(line) in ("JOIN", "353")], f"joined something: {shown(lines)}"
    alice.send("JOIN #dev")
    alice.expect(r"366 alice #dev ")
    alice.send("PART #dev")
    alice.expect(r"^:alice!\S+ PART #dev")
    lines = until_pong(alice)
    assert not [line for line in lines if " JOIN " in line], f"put back in a channel: {shown(lines)}"


def test_auto_join_puts_an_irc_user_in_each_room_it_lists(start_server, irc_connect):
    running = start_server("--irc-port", "0", "--irc-auto-join", "dev, #ops")
    alice = irc_connect(running)
    lines = register(alice, "alice")
    joined = [params(line)[0] for line in lines if command_of(line) == "JOIN"]
    assert joined == ["#dev", "#ops"], shown(lines)


def test_auto_join_and_server_name_are_options_of_the_configuration_file(tmp_path):
    options = server.read_options(["--server-name", "chat.example.org", "--irc-auto-join", ""])
    text = server.config_text(options)
    assert "server-name = chat.example.org\n" in text and "irc-auto-join = \n" in text, text
    config = tmp_path / "pychat.ini"
    config.write_text(text)
    again = server.read_options(["--config", str(config)])
    assert (again.server_name, again.irc_auto_join) == ("chat.example.org", "")
    assert server.read_options([]).irc_auto_join == "#lobby"


@pytest.mark.parametrize("option, value", [("--server-name", "nodot"), ("--server-name", "bad name.org"),
                                           ("--irc-auto-join", "#not a room")])
def test_a_wrong_server_name_or_room_list_is_refused_at_start(option, value):
    done = subprocess.run([sys.executable, str(SERVER_SCRIPT), option, value, "--print-config"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and option in done.stderr, (done.returncode, done.stderr)


# -- --server-name --------------------------------------------------------------------------------------

def test_the_server_name_is_in_every_prefix_in_004_pong_and_time(start_server, irc_connect):
    running = start_server(*PLAIN_IRC, "--server-name", "chat.example.org")
    alice = irc_connect(running)
    lines = register(alice, "alice")
    own = [line for line in lines if not line.startswith(":alice!")]
    assert all(line.startswith(":chat.example.org ") for line in own), shown(own)
    myinfo = params(next(line for line in lines if command_of(line) == "004"))
    assert myinfo[1] == "chat.example.org" and all(re.fullmatch("[a-zA-Z]+", mode) for mode in myinfo[3:]), myinfo
    alice.send("PING abc")
    assert alice.expect("PONG ") == ":chat.example.org PONG chat.example.org abc"
    alice.send("TIME")
    assert params(alice.expect("391 alice "))[1] == "chat.example.org"


def test_ping_without_a_token_gets_409_addressed_to_the_nick(start_server, irc_connect):
    alice = irc_connect(start_server(*PLAIN_IRC))
    register(alice, "alice")
    alice.send("PING")
    alice.expect("409 alice ")
    alice.send("PING :")
    alice.expect("409 alice ")


# -- the message of the day, LUSERS, INFO, HELP ---------------------------------------------------------

def test_the_admins_motd_is_sent_at_registration_and_on_motd(start_server, irc_connect, tmp_path):
    motd = tmp_path / "motd.txt"
    motd.write_text("Welcome to the test server.\nBe kind.\n")
    alice = irc_connect(start_server(*PLAIN_IRC, "--motd", str(motd)))
    for lines in (register(alice, "alice"), (alice.send("MOTD"), alice.lines_until("376 alice "))[1]):
        numerics = [command_of(line) for line in lines]
        assert "375" in numerics and "376" in numerics, shown(lines)
        assert [params(line)[-1] for line in lines if command_of(line) == "372"] == \
            ["- Welcome to the test server.", "- Be kind."], shown(lines)


def test_without_a_motd_registration_and_motd_get_422(start_server, irc_connect):
    alice = irc_connect(start_server(*PLAIN_IRC))
    lines = register(alice, "alice")
    assert "422" in [command_of(line) for line in lines] and "375" not in [command_of(line) for line in lines]
    alice.send("MOTD")
    alice.expect("422 alice ")


def test_lusers_counts_people_and_connections_still_signing_in(start_server, irc_connect):
    running = start_server(*PLAIN_IRC, "--max-per-ip", "0")
    alice = irc_connect(running)
    register(alice, "alice")
    unregistered = irc_connect(running)
    unregistered.send("NICK later")
    until_pong(unregistered)
    alice.send("LUSERS")
    lines = alice.lines_until("266 alice ")
    by_numeric = {command_of(line): params(line) for line in lines}
    assert re.search(r"There are 1 users and 0 invisible on 1 servers", by_numeric["251"][-1]), shown(lines)
    assert by_numeric["253"][1] == "1" and by_numeric["254"][1] == "0", shown(lines)
    assert re.search(r"I have 1 clients and 0 servers", by_numeric["255"][-1]), shown(lines)
    assert by_numeric["265"][1:3] == ["1", "1"] and by_numeric["266"][1:3] == ["1", "1"], shown(lines)


def test_info_is_371_lines_ended_by_374(start_server, irc_connect):
    alice = irc_connect(start_server(*PLAIN_IRC))
    register(alice, "alice")
    alice.send("INFO")
    lines = alice.lines_until("374 alice ")
    assert [command_of(line) for line in lines][:-1] == ["371"] * (len(lines) - 1) and len(lines) > 1, shown(lines)


def test_help_answers_with_704_705_706_or_524_and_the_service_still_lists_pychats_commands(start_server,
                                                                                          irc_connect):
    alice = irc_connect(start_server(*PLAIN_IRC))
    register(alice, "alice")
    for line, subject in (("HELP", "index"), ("HELP privmsg", "PRIVMSG"), ("HELPOP JOIN", "JOIN")):
        alice.send(line)
        lines = alice.lines_until("706 alice ")
        assert command_of(lines[0]) == "704" and all(params(line)[1] == subject for line in lines), shown(lines)
        assert all(command_of(line) == "705" for line in lines[1:-1]), shown(lines)
    alice.send("HELP NOSUCHTHING")
    assert params(alice.expect("524 alice "))[1] == "NOSUCHTHING"
    alice.send("PRIVMSG pyChat :help")
    lines = alice.lines_until(r"NOTICE alice :Type /msg pyChat help COMMAND")
    assert any("/online" in line for line in lines), shown(lines)


def test_irc_users_are_told_to_msg_the_service_for_help_not_to_type_slash_help(start_server, irc_connect):
    alice = irc_connect(start_server(*PLAIN_IRC))
    lines = register(alice, "alice")
    assert any("/msg pyChat help" in line for line in lines), shown(lines)
    alice.send("PRIVMSG pyChat :/nosuchcommand")
    reply = alice.expect("NOTICE alice ")
    assert "/msg pyChat help" in reply and "Type /help" not in reply, reply


# -- what a client sends wrong --------------------------------------------------------------------------

def test_a_line_that_is_not_utf8_gets_fail_invalid_utf8_and_goes_nowhere(start_server, irc_connect):
    running = start_server(*PLAIN_IRC)
    alice, bob = irc_connect(running), irc_connect(running)
    register(alice, "alice")
    register(bob, "bob")
    alice.send_raw(b"PRIVMSG bob :hi\xaa\r\n")
    assert params(alice.expect("FAIL "))[:2] == ["PRIVMSG", "INVALID_UTF8"]
    alice.send("PRIVMSG bob :fine")
    assert params(bob.expect("PRIVMSG bob "))[-1] == "fine"


def test_a_realname_that_is_not_utf8_is_refused_before_registration(start_server, irc_connect):
    alice = irc_connect(start_server(*PLAIN_IRC))
    alice.send("NICK alice")
    alice.send_raw(b"USER alice 0 * :i\xe8rc\xe9\r\n")
    assert params(alice.expect("FAIL "))[:2] == ["USER", "INVALID_UTF8"]


def test_user_with_an_empty_realname_gets_461(start_server, irc_connect):
    alice = irc_connect(start_server(*PLAIN_IRC))
    alice.send("NICK alice")
    alice.send("USER alice 0 * :")
    assert params(alice.expect("461 "))[1] == "USER"


# -- lines at the length limit, user names, keepalives ---------------------------------------------------------

def received(client: IrcClient, pattern: str) -> bytes:
    """The next line matching PATTERN as its bytes with CR LF, as the server wrote it."""
    return (client.expect(pattern) + "\r\n").encode("utf-8")


@pytest.mark.parametrize("payload", ["a" * 496, "a" * 492 + "😃", "é" * 248], ids=["ascii", "emoji", "accents"])
def test_a_line_at_the_limit_reaches_irc_users_as_one_message_cut_at_a_character(start_server, irc_connect, payload):
    running = start_server(*PLAIN_IRC)
    alice, bob = irc_connect(running), irc_connect(running)
    register(alice, "alice")
    register(bob, "bob")
    for client in (alice, bob):
        client.send("JOIN #dev")
        client.expect(rf"366 {client.nick} #dev ")
    for target, reader in (("bob", bob), ("#dev", bob)):
        line = f"PRIVMSG {target} :{payload}"
        assert len(line.encode("utf-8")) <= 510
        alice.send(line)
        relayed = received(reader, rf"PRIVMSG {re.escape(target)} ")
        assert len(relayed) <= 512, relayed
        text = params(relayed.decode("utf-8").removesuffix("\r\n"))[-1]
        assert payload.startswith(text) and len(text.encode("utf-8")) > 450, text
        after = until_pong(reader, "cut")
        assert not any(" PRIVMSG " in seen for seen in after), f"a second piece came: {shown(after)}"


def test_a_long_line_from_pychat_still_reaches_irc_users_whole_in_pieces(start_server, irc_connect, connect):
    running = start_server(*PLAIN_IRC)
    bob = irc_connect(running)
    register(bob, "bob")
    bob.send("JOIN #lobby")
    bob.expect("366 bob #lobby ")
    alice = connect(running, "alice")
    words = " ".join(f"word{n}" for n in range(200))
    alice.send(words)
    pieces = []
    while " ".join(pieces) != words:
        pieces.append(params(bob.expect("PRIVMSG #lobby "))[-1])
        assert len(pieces) < 5 and words.startswith(" ".join(pieces)), pieces


def test_the_user_name_of_user_shows_cleaned_in_prefixes_who_whois_and_whowas(start_server, irc_connect):
    running = start_server(*PLAIN_IRC)
    alice, bob = irc_connect(running), irc_connect(running)
    register(bob, "bob")
    alice.send("NICK alice")
    alice.send("USER a!l*i-c.e_long 0 * :Alice")
    welcome = alice.expect("001 alice ")
    assert welcome.endswith("alice!~ali-c.e_l@pychat"), welcome
    alice.nick = "alice"
    bob.send("JOIN #dev")
    bob.expect("366 bob #dev ")
    alice.send("JOIN #dev")
    assert bob.expect("JOIN #dev").startswith(":alice!~ali-c.e_l@pychat JOIN")
    bob.send("WHO alice")
    assert params(bob.expect("352 bob "))[2:4] == ["~ali-c.e_l", "pychat"]
    bob.send("WHOIS alice")
    assert params(bob.expect("311 bob "))[2:4] == ["~ali-c.e_l", "pychat"]
    bob.send("WHO *!~bob@*")
    assert [params(line)[5] for line in bob.lines_until("315 ") if command_of(line) == "352"] == ["bob"]
    alice.send("NICK alicia")           # a name given up by renaming is remembered with the user name too
    bob.expect("NICK :?alicia")
    bob.send("WHOWAS alice")
    assert params(bob.expect("314 bob "))[2:4] == ["~ali-c.e_l", "pychat"]
    bob.expect("369 bob alice ")
    alice.send("QUIT :bye")
    assert bob.expect("QUIT ").startswith(":alicia!~ali-c.e_l@pychat QUIT")
    bob.send("WHOWAS alicia")
    assert params(bob.expect("314 bob "))[2:4] == ["~ali-c.e_l", "pychat"]


def test_ping_is_answered_however_fast_other_lines_come(start_server, irc_connect):
    running = start_server(*PLAIN_IRC, "--rate", "1", "--burst", "3")
    alice = irc_connect(running)
    register(alice, "alice")
    for n in range(6):
        alice.send(f"PRIVMSG alice :flood {n}")
        alice.send(f"PING :token{n}")
    for n in range(6):
        alice.expect(rf"PONG \S+ :?token{n}$")
