"""IRC's replies about people and rooms, over raw sockets: AWAY's numerics, PART's reason, WHOIS, TOPIC
of a room that is not there, OPER and KILL. Each reply is IRC's; pyChat users keep seeing what they saw.

Each test starts a real server with --irc-port 0. To prove that something did NOT arrive, someone sends
a later line and the test checks that it comes first.
"""
from __future__ import annotations

import re
import time

from conftest import shown
from test_irc import IRC_SERVER, OP_PASSWORD, irc_server, numeric_of, params  # noqa: F401 (irc_server: a fixture)


def test_part_reason_reaches_irc_users_and_pychat_users_see_the_usual_line(irc_server, irc_connect, connect):
    alice, carol = irc_connect(irc_server, "alice"), irc_connect(irc_server, "carol")
    bob = connect(irc_server, "bob")
    for irc in (alice, carol):
        irc.send("JOIN #dev")
        irc.expect(rf"366 {irc.nick} #dev ")
    bob.send("/join #dev")
    carol.expect(r"JOIN #dev")
    alice.send("PART #dev :gone fishing")
    assert params(alice.expect(r"PART "))[1:] == ["gone fishing"], "your own PART has your reason"
    seen = carol.expect(r"PART ")
    assert seen.startswith(":alice!~alice@pychat ") and params(seen) == ["#dev", "gone fishing"], seen
    bob.expect(r"\*\*\* alice left #dev$")
    carol.send("PART #dev")
    assert params(carol.expect(r"PART ")) == ["#dev"], "no reason, no trailing parameter"


def test_a_private_message_to_someone_away_is_answered_with_301_and_pychat_users_keep_their_reply(
        irc_server, irc_connect, connect):
    alice, bob = irc_connect(irc_server, "alice"), irc_connect(irc_server, "bob")
    carol = connect(irc_server, "carol")
    bob.send("AWAY :at lunch")
    assert params(bob.expect(r"306 "))[0] == "bob"
    alice.send("PRIVMSG bob :are you there?")
    line = alice.expect(r"(301|NOTICE) ")
    assert numeric_of(line) == "301" and params(line) == ["alice", "bob", "at lunch"], line
    carol.send("/msg bob are you there?")
    carol.expect(r"-- bob is away: at lunch$")
    bob.send("AWAY")
    bob.expect(r"305 bob ")
    alice.send("PRIVMSG bob :and now?")
    alice.send("PING :after")
    lines = alice.lines_until(r"PONG ")
    assert not any(numeric_of(line) in ("301", "NOTICE") for line in lines), shown(lines)


def test_whois_gives_the_real_name_the_rooms_with_their_prefixes_and_the_away_message(irc_server, irc_connect,
                                                                                       connect):
    alice, bob = irc_connect(irc_server, "alice"), irc_connect(irc_server, "bob")
    connect(irc_server, "carol")
    alice.send("JOIN #dev")
    alice.expect(r"366 alice #dev ")
    alice.send("AWAY :elsewhere")
    alice.expect(r"306 ")
    bob.send("WHOIS alice")
    lines = bob.lines_until(r"318 ")
    replies = {numeric_of(line): params(line) for line in lines if re.fullmatch(r"\d{3}", numeric_of(line))}
    assert replies["311"] == ["bob", "alice", "~alice", "pychat", "*", "alice the tester"], shown(lines)
    assert sorted(replies["319"][2].split()) == ["#lobby", "@#dev"], shown(lines)
    assert replies["312"][:3] == ["bob", "alice", "pychat.server"] and "IRC" in replies["312"][3]
    assert replies["301"] == ["bob", "alice", "elsewhere"]
    assert "313" not in replies and "330" not in replies, "no server operator, no account"
    assert [numeric_of(line) for line in lines][-2:] == ["317", "318"], shown(lines)
    bob.send("WHOIS carol")
    carol = {numeric_of(line): params(line) for line in bob.lines_until(r"318 ")}
    assert carol["311"][-1] == "carol", "someone who gave no real name: the nickname"
    assert "pyChat" in carol["312"][-1]


def test_topic_of_a_room_that_is_not_there_is_403_and_of_one_you_are_not_in_442(irc_server, irc_connect):
    alice, bob = irc_connect(irc_server, "alice"), irc_connect(irc_server, "bob")
    bob.send("JOIN #dev")
    bob.expect(r"366 bob #dev ")
    alice.send("TOPIC #nowhere")
    line = alice.expect(r"(403|442) ")
    assert params(line)[:2] == ["alice", "#nowhere"] and numeric_of(line) == "403", line
    alice.send("TOPIC #dev")
    line = alice.expect(r"(403|442) ")
    assert params(line)[:2] == ["alice", "#dev"] and numeric_of(line) == "442", line


def test_oper_is_381_and_mode_plus_o_a_wrong_secret_464(irc_server, irc_connect):
    alice = irc_connect(irc_server, "alice")
    alice.send("OPER alice wrong")
    assert params(alice.expect(r"464 "))[0] == "alice"
    alice.send(f"OPER alice :{OP_PASSWORD}")
    alice.expect(r"381 alice ")
    mode = alice.expect(r"MODE ")
    assert mode.startswith(":alice!~alice@pychat ") and params(mode) == ["alice", "+o"], mode


def test_oper_on_a_server_without_an_operator_password_is_491(start_server, irc_connect):
    alice = irc_connect(start_server("--irc-port", "0"), "alice")
    alice.send("OPER alice anything")
    line = alice.expect(r"(491|464|381) ")
    assert numeric_of(line) == "491", line


def test_kill_is_481_for_anyone_but_an_operator_who_disconnects_with_a_reason(irc_server, irc_connect):
    boss, alice, bob = (irc_connect(irc_server, nick) for nick in ("boss", "alice", "bob"))
    alice.send("KILL bob :go away")
    assert params(alice.expect(r"481 "))[0] == "alice"
    boss.send(f"OPER boss :{OP_PASSWORD}")
    boss.expect(r"381 boss ")
    boss.send("KILL nobody :who?")
    assert params(boss.expect(r"401 "))[1] == "nobody"
    boss.send("KILL bob :spamming")
    gone = bob.wait_closed()
    assert any(line.startswith("ERROR ") and "boss" in line and "spamming" in line for line in gone), shown(gone)
    quit_line = alice.expect(r"QUIT ")
    assert quit_line.startswith(":bob!") and "spamming" in quit_line, quit_line


def test_wallops_is_481_for_anyone_but_an_operator_and_reaches_the_operators_alone(irc_server, irc_connect,
                                                                                    connect):
    boss, alice = irc_connect(irc_server, "boss"), irc_connect(irc_server, "alice")
    chief = connect(irc_server, "chief")
    alice.send("WALLOPS :hello operators")
    assert params(alice.expect(r"481 "))[0] == "alice"
    chief.send(f"/op {OP_PASSWORD}")
    chief.expect(r"-- ")
    boss.send(f"OPER boss :{OP_PASSWORD}")
    boss.expect(r"381 boss ")
    boss.send("WALLOPS :server restarts at noon")
    line = boss.expect(r"WALLOPS ")
    assert line.startswith(":boss!~boss@pychat ") and params(line) == ["server restarts at noon"], line
    chief.expect(r"\*\*\* To the operators from boss: server restarts at noon$")
    alice.send("PING :after")
    lines = alice.lines_until(r"PONG ")
    assert not any("WALLOPS" in line for line in lines), shown(lines)


def test_the_topic_comes_with_333_saying_who_set_it_and_when(irc_server, irc_connect):
    alice, bob = irc_connect(irc_server, "alice"), irc_connect(irc_server, "bob")
    alice.send("JOIN #dev")
    alice.expect(r"366 alice #dev ")
    before = int(time.time())
    alice.send("TOPIC #dev :release friday")
    alice.expect(r"TOPIC #dev ")
    bob.send("JOIN #dev")
    assert params(bob.expect(r"332 bob #dev "))[-1] == "release friday"
    who, when = params(bob.expect(r"333 bob #dev "))[2:]
    assert who == "alice!~alice@pychat" and before <= int(when) <= time.time() + 1, (who, when)
    bob.send("TOPIC #dev")
    bob.expect(r"332 bob #dev ")
    assert params(bob.expect(r"333 bob #dev "))[2:] == [who, when]


def test_whois_of_no_one_is_401_then_318(irc_server, irc_connect):
    alice = irc_connect(irc_server, "alice")
    alice.send("WHOIS nobody")
    alice.send("PING :after")
    lines = [line for line in alice.lines_until(r"PONG ") if "PONG" not in line]
    assert [numeric_of(line) for line in lines] == ["401", "318"], shown(lines)
    assert [params(line)[:2] for line in lines] == [["alice", "nobody"]] * 2, shown(lines)
