"""The commands people expect from a chat server, between real clients over real sockets."""
from __future__ import annotations

import json
import os
import re
import signal

import pytest

from conftest import ClientFrom, database_rows, LineClient

OP_SECRET = "correct horse battery staple"


def say_marker(client: LineClient, *readers: LineClient, text: str = "marker") -> None:
    """Have CLIENT say TEXT and wait until every reader has it: whatever they had not seen by then never came."""
    client.send(text)
    for reader in readers:
        reader.expect(re.escape(f"{client.nick}: {text}"))


def first_line_matching(client: LineClient, pattern: str, marker: str) -> str:
    """The first line matching PATTERN or MARKER, whichever comes first."""
    return client.expect(f"{pattern}|{marker}")


# -- /nick -----------------------------------------------------------------------------------

def test_nick_changes_the_name_and_the_room_is_told(chat):
    alice, bob = chat("alice", "bob")
    bob.send("/nick robert")
    for person in (alice, bob):
        assert person.expect(r"\*\*\* bob") == "*** bob is now known as robert"
    bob.send("hi")
    assert alice.expect("robert: ") == "robert: hi"
    alice.send("/online")
    assert alice.expect("-- ") == "-- 2 online: alice (#lobby), robert (#lobby)"


def test_nick_follows_the_sign_in_rules(chat):
    alice, bob = chat("alice", "bob")
    bob.send("/nick ALICE")
    assert bob.recv_line().startswith("!! Nickname 'ALICE' is taken")
    bob.send("/nick bad name")
    assert bob.recv_line() == "!! Too many arguments. Usage: /nick NEW"
    bob.send("/nick server")
    assert bob.recv_line() == "!! Nickname 'server' is reserved."
    bob.send("/nick")
    assert bob.recv_line() == "!! Usage: /nick NEW"


def test_a_name_can_change_case_only(chat):
    (alice,) = chat("alice")
    alice.send("/nick Alice")
    assert alice.recv_line() == "*** alice is now known as Alice"


# -- /msg, /reply ------------------------------------------------------------------------------

def test_a_private_message_is_seen_only_by_the_two(chat):
    alice, bob, carol = chat("alice", "bob", "carol")
    alice.send("/msg bob the cake is in the fridge")
    assert alice.expect(r"\[pm") == "[pm to bob] the cake is in the fridge"
    assert bob.expect(r"\[pm") == "[pm from alice] the cake is in the fridge"
    say_marker(alice, carol)
    assert not any("cake" in line for line in carol.seen)


def test_w_is_msg_and_reply_answers_the_last_sender(chat):
    alice, bob = chat("alice", "bob")
    alice.send("/w bob ping")
    bob.expect(r"\[pm from alice\] ping")
    bob.send("/reply pong")
    assert bob.expect(r"\[pm") == "[pm to alice] pong"
    assert alice.expect(r"\[pm from") == "[pm from bob] pong"


def test_private_message_errors(chat):
    alice, bob = chat("alice", "bob")
    alice.send("/msg nobody hello")
    assert alice.recv_line() == "!! No one called nobody is online. /online lists who is."
    alice.send("/msg bob")
    assert alice.recv_line() == "!! Usage: /msg NICK TEXT..."
    alice.send("/msg alice a note to me")         # a note to oneself: received, and its copy
    assert [alice.recv_line(), alice.recv_line()] == ["[pm from alice] a note to me", "[pm to alice] a note to me"]
    alice.send("/reply anyone?")
    assert alice.recv_line() == "!! No one has sent you a private message yet."


def test_reply_to_someone_who_left(chat):
    alice, bob = chat("alice", "bob")
    bob.send("/msg alice bye")
    alice.expect(r"\[pm from bob\]")
    bob.send("/quit")
    alice.expect(r"\*\*\* bob quit")
    alice.send("/reply come back")
    assert alice.recv_line() == "!! The last person who sent you a private message has left."


# -- /me --------------------------------------------------------------------------------------------

def test_me_is_an_action_line(chat):
    alice, bob = chat("alice", "bob")
    alice.send("/me waves")
    for person in (alice, bob):
        assert person.expect(r"\* ") == "* alice waves"
    alice.send("/me")
    assert alice.recv_line() == "!! Usage: /me TEXT..."


# -- rooms (more in test_rooms.py) ----------------------------------------------------------------

def test_rooms_keep_their_talk_to_themselves(chat):
    alice, bob, carol = chat("alice", "bob", "carol")
    bob.send("/join #dev")
    assert bob.expect(r"\*\*\* You are in") == "*** You are in #dev, alone for now."
    carol.send("/join dev")
    assert carol.expect(r"\*\*\* You are in") == "*** You are in #dev with bob."
    assert bob.expect(r"\*\*\* carol") == "*** carol joined #dev"
    carol.send("/me codes")
    assert bob.expect(r"\* ") == "* carol codes"
    bob.send("secret plans")
    assert carol.expect("bob: ") == "bob: secret plans"
    alice.send("lobby talk")
    assert alice.expect(r"\w+: |\* ") == "alice: lobby talk", "nothing said in #dev reached the lobby"
    assert bob.expect(r"#lobby ") == "#lobby alice: lobby talk", "bob is still in #lobby, tagged"


def test_rooms_lists_rooms_and_who_lists_your_room(chat):
    alice, bob, carol = chat("alice", "bob", "carol")
    bob.send("/join dev")
    bob.expect(r"\*\*\* You are in #dev")
    alice.send("/rooms")
    assert alice.lines_until(r"-- #lobby")[-3:] == ["-- 2 rooms:", "-- #dev (1)", "-- #lobby (3, current)"]
    alice.send("/who")
    assert alice.expect("-- ") == "-- 3 in #lobby: alice, bob, carol"
    bob.send("/names")
    assert bob.expect("-- ") == "-- 1 in #dev: bob (operator)"
    alice.send("/online")
    assert alice.expect("-- ") == "-- 3 online: alice (#lobby), bob (#dev), carol (#lobby)"


def test_leave_goes_back_to_the_last_room_and_the_lobby_is_never_left_alone(chat):
    alice, bob = chat("alice", "bob")
    bob.send("/leave")
    assert bob.recv_line() == "!! #lobby is your only room; /quit leaves the chat."
    bob.send("/join dev")
    bob.expect(r"\*\*\* You are in #dev")
    bob.send("/leave")
    assert bob.recv_line() == "*** You left #dev."
    assert bob.recv_line() == "*** Now talking in #lobby."
    bob.send("/leave lobby")
    assert bob.recv_line() == "!! #lobby is your only room; /quit leaves the chat."


def test_room_names_follow_the_nickname_rules(chat):
    (alice,) = chat("alice")
    alice.send("/join bad:room")
    assert alice.recv_line().startswith("!! Room name cannot contain ':'")
    alice.send("/join")
    assert alice.recv_line() == "!! Usage: /join ROOM [KEY]"
    alice.send("/join LOBBY")
    assert alice.recv_line() == "!! You are already in #lobby."


# -- away ---------------------------------------------------------------------------------------------

def test_away_is_shown_and_answers_private_messages(chat):
    alice, bob = chat("alice", "bob")
    bob.send("/away lunch")
    assert bob.recv_line() == "-- You are marked away (lunch). /back when you return."
    assert alice.expect(r"\*\*\* bob") == "*** bob is away (lunch)"
    alice.send("/online")
    assert alice.expect("-- ") == "-- 2 online: alice (#lobby), bob (#lobby, away)"
    alice.send("/msg bob are you there?")
    assert alice.expect(r"\[pm to bob\]")
    assert alice.recv_line() == "-- bob is away: lunch"
    bob.send("/back")
    assert bob.expect("-- ") == "-- Welcome back."
    assert alice.expect(r"\*\*\* bob") == "*** bob is back"
    bob.send("/back")
    assert bob.recv_line() == "!! You are not away."
    alice.send("/who")
    assert alice.expect("-- ") == "-- 2 in #lobby: alice, bob"


# -- ignore ---------------------------------------------------------------------------------------------

def test_ignore_hides_lines_and_private_messages_for_you_only(chat):
    alice, bob, carol = chat("alice", "bob", "carol")
    alice.send("/ignore bob")
    assert alice.recv_line() == "-- You now ignore bob. /unignore to see them again."
    bob.send("spam spam")
    bob.send("/msg alice spam in private")
    bob.send("/me spams")
    assert carol.expect("bob: ") == "bob: spam spam", "others still see bob"
    bob.expect(r"\* bob spams")         # all three handled: whatever alice was sent of them comes before the marker
    say_marker(carol, alice, text="after the spam")
    assert not any("spam" in line for line in alice.seen[:-1])
    alice.send("/ignore")
    assert alice.recv_line() == "-- You ignore: bob"
    alice.send("/unignore bob")
    assert alice.recv_line() == "-- You see bob again."
    bob.send("visible again")
    assert alice.expect("bob: ") == "bob: visible again"


def test_ignore_errors(chat):
    alice, bob = chat("alice", "bob")
    alice.send("/ignore ghost")
    assert alice.recv_line().startswith("!! No one called ghost is online.")
    alice.send("/ignore alice")
    assert alice.recv_line() == "!! You cannot ignore yourself."
    alice.send("/unignore bob")
    assert alice.recv_line() == "!! You are not ignoring bob."
    alice.send("/ignore")
    assert alice.recv_line() == "-- You ignore no one."


def test_ignore_follows_a_nick_change(chat):
    alice, bob = chat("alice", "bob")
    alice.send("/ignore bob")
    alice.recv_line()
    bob.send("/nick robert")
    alice.expect(r"\*\*\* bob is now known as robert")
    bob.send("still me")
    bob.expect("robert: still me")
    say_marker(alice, alice, text="check")
    assert not any("still me" in line for line in alice.seen)


# -- operators ---------------------------------------------------------------------------------------------

@pytest.fixture
def op_server(start_server):
    env = dict(os.environ, PYCHAT_OP_PASSWORD=OP_SECRET)
    return start_server("--guess-delay", "0.05", env=env)


def make_operator(client: LineClient) -> None:
    client.send(f"/op {OP_SECRET}")
    assert client.expect("-- |!! ") == "-- You are now an operator."


def test_operator_commands_are_refused_to_others(op_server, connect):
    alice = connect(op_server, "alice")
    connect(op_server, "bob")
    for line in ("/disconnect bob", "/mute bob", "/unmute bob", "/mutes", "/accounts", "/invitations",
                 "/cancel-invitation bob", "/reset-password bob"):
        alice.send(line)
        name = line.split()[0]
        assert alice.expect("!! ") == f"!! {name}: not allowed; only operators may use it."
    for line in ("/kick bob", "/topic hello", "/mode topic everyone"):
        alice.send(line)
        assert alice.expect("!! ") == "!! Only operators of #lobby may do that."


def test_a_wrong_operator_password_is_refused_slowly_and_logged(op_server, connect):
    alice = connect(op_server, "alice")
    alice.send("/op guess")
    assert alice.recv_line(timeout=10) == "!! Wrong operator password."
    op_server.wait_for_log(r"wrong operator password from alice@127\.0\.0\.1 \(1 in a row\)")
    make_operator(alice)
    op_server.wait_for_log(r"alice@127\.0\.0\.1 is now an operator")


def test_op_without_a_configured_password(chat):
    (alice,) = chat("alice")
    alice.send("/op anything")
    assert alice.recv_line() == "!! This server has no operator password, so no one can be an operator."


def test_a_server_operator_can_disconnect_someone_with_a_reason(op_server, connect):
    alice = connect(op_server, "alice")
    bob = connect(op_server, "bob")
    carol = connect(op_server, "carol")
    make_operator(alice)
    alice.send("/disconnect bob enough")
    assert alice.expect("-- ") == "-- Disconnected bob."
    assert bob.wait_closed()[-1] == "*** You were disconnected by alice: enough."
    assert carol.expect(r"\*\*\* bob") == "*** bob quit (disconnected by alice: enough)"
    alice.send("/kill ghost")
    assert alice.expect("!! ").startswith("!! No one called ghost")
    alice.send("/disconnect")
    assert alice.expect("!! ") == "!! Usage: /disconnect NICK [REASON...]"


def test_a_muted_user_cannot_talk_in_rooms_until_unmuted(op_server, connect):
    alice = connect(op_server, "alice")
    bob = ClientFrom(op_server.host, op_server.port, "127.0.0.2")
    bob.login("bob")
    make_operator(alice)
    alice.send("/mute bob")
    assert alice.expect("-- ") == "-- Muted bob's address 127.0.0.2 until /unmute."
    assert bob.expect(r"\*\*\* You were") == "*** You were muted by alice permanently."
    bob.send("can you hear me")
    assert bob.recv_line() == "!! You are muted; the room does not hear you."
    bob.send("/me shouts")
    assert bob.recv_line() == "!! You are muted; the room does not hear you."
    bob.send("/msg alice but this works")
    assert alice.expect(r"\[pm from bob\]") == "[pm from bob] but this works"
    alice.send("/unmute bob")
    assert alice.expect("-- ") == "-- Unmuted the address 127.0.0.2 (bob)."
    assert bob.expect(r"\*\*\* You were") == "*** You were unmuted by alice."
    bob.send("back on air")
    assert alice.expect("bob: ") == "bob: back on air"
    bob.close()


def test_topic_is_announced_and_shown_on_join(op_server, connect):
    alice = connect(op_server, "alice")
    make_operator(alice)
    alice.send("/topic release on friday")
    assert alice.recv_line() == "*** alice set the topic of #lobby: release on friday"
    bob = connect(op_server)
    bob.expect(re.escape("*** Choose a nickname:"))
    bob.send("bob")
    lines = bob.lines_until(r"\*\*\* Topic")
    assert lines[-1] == "*** Topic of #lobby: release on friday"


def test_operator_commands_are_marked_in_help(chat):
    (alice,) = chat("alice")
    alice.send("/help")
    lines = alice.lines_until("-- Type /help COMMAND")
    for name in ("disconnect", "mute", "unmute", "mutes", "accounts", "invitations", "cancel-invitation",
                 "reset-password"):
        assert any(line.startswith(f"-- /{name} ") and line.endswith("(operators)") for line in lines), name
    assert not any(line.startswith(("-- /msg ", "-- /kick ")) and line.endswith("(operators)") for line in lines)
    alice.send("/help disconnect")
    assert alice.lines_until("-- Only operators")[-1] == "-- Only operators may use it (see /op)."


def test_help_command_shows_the_longer_description(chat):
    (alice,) = chat("alice")
    alice.send("/help msg")
    assert alice.recv_line() == ("-- /msg NICK TEXT...  Send a private message that only NICK sees; "
                                 "/msg #ROOM TEXT says TEXT in a room of yours.")
    assert alice.recv_line() == "-- Also: /w, /tell"
    assert alice.recv_line().startswith("-- You get a copy marked [pm to NICK]")


# -- history ----------------------------------------------------------------------------------------------

HISTORY_LINE = re.compile(r"\[history (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)\] (.*)")


def history_seen_by_newcomer(server, connect, nick: str, until: str) -> list[str]:
    newcomer = connect(server)
    newcomer.expect(re.escape("*** Choose a nickname:"))
    newcomer.send(nick)
    return [HISTORY_LINE.match(line).group(2) for line in newcomer.lines_until(until)
            if HISTORY_LINE.match(line)]


def test_a_newcomer_sees_the_last_lines_with_their_times(start_server, connect):
    server = start_server("--history", "3", "--rate", "0")
    alice = connect(server, "alice")
    for n in range(5):
        alice.send(f"line {n}")
    alice.send("/me is done")
    alice.expect(r"\* alice is done")
    newcomer = connect(server)
    newcomer.expect(re.escape("*** Choose a nickname:"))
    newcomer.send("bob")
    lines = newcomer.lines_until(r"\[history .*\* alice is done")
    replay = [line for line in lines if line.startswith("[history")]
    assert [HISTORY_LINE.match(line).group(2) for line in replay] == ["alice: line 3", "alice: line 4",
                                                                       "* alice is done"]


def test_history_is_per_room_and_can_be_turned_off(start_server, connect):
    server = start_server("--history", "0")
    alice = connect(server, "alice")
    alice.send("not kept")
    alice.expect("alice: not kept")
    bob = connect(server)
    bob.expect(re.escape("*** Choose a nickname:"))
    bob.send("bob")
    bob.expect(r"\*\*\* You are in")
    bob.send("after")
    assert bob.expect(r"alice: |bob: |\[history") == "bob: after"


def test_history_survives_restarts_and_kill_9_with_its_message_ids(start_server, connect, tmp_path):
    data = tmp_path / "data"
    first = start_server("--data-dir", str(data), "--history", "5")
    alice = connect(first, "alice")
    alice.send("before the restart")
    alice.send("/join dev")
    alice.send("in dev")
    alice.expect("alice: in dev")
    assert first.stop() == 0

    second = start_server("--data-dir", str(data), "--history", "5")
    alice = connect(second, "alice")
    alice.send("before the crash")
    alice.expect("alice: before the crash")
    second.stop(signal.SIGKILL)
    ids = dict(database_rows(data, "SELECT text, id FROM messages"))

    for restart in range(3):        # every record survives any number of restarts, clean or not
        third = start_server("--data-dir", str(data), "--history", "5")
        assert history_seen_by_newcomer(third, connect, f"bob{restart}", r"\[history .*before the crash") == [
            "alice: before the restart", "alice: before the crash"]
        carol = connect(third, f"carol{restart}")
        carol.send("/join dev")
        replay = carol.lines_until(r"\[history .*in dev")
        assert HISTORY_LINE.match(replay[-1]).group(2) == "alice: in dev"
        third.stop(signal.SIGKILL if restart % 2 else signal.SIGTERM)
        assert dict(database_rows(data, "SELECT text, id FROM messages WHERE nick='alice'")) == ids


def test_ignore_holds_when_the_ignored_one_comes_back_and_ends_with_the_ignorer(chat, server, connect):
    alice, bob, carol = chat("alice", "bob", "carol")
    alice.send("/ignore bob")
    alice.expect("-- You now ignore bob")
    bob.send("/quit")
    alice.expect(r"\*\*\* bob quit")
    bob = connect(server, "bob")
    bob.send("back again")
    carol.expect("bob: back again")
    say_marker(carol, alice, text="after bob's return")
    assert not any("back again" in line for line in alice.seen)
    alice.send("/quit")
    carol.expect(r"\*\*\* alice quit")
    bob.send("heard by all")
    assert carol.expect("bob: ") == "bob: heard by all"
