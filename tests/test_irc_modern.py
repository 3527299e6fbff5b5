"""The IRC port as bots, bridges and modern clients use it, spoken raw over real sockets: capabilities
asked for after signing in, message tags and TAGMSG, message ids, WHO with masks and WHOX, account
news, real names, invitations seen by the room, LIST's filters, WHOWAS, notices, MONITOR and bots.

Each test starts a real server with --irc-port 0. To prove that something did
NOT arrive, someone sends a later line and the test checks that it comes first.
"""
from __future__ import annotations

import re
import time

import pytest

from conftest import SERVER_SCRIPT, import_script
from test_irc import sasl

server = import_script(SERVER_SCRIPT, "pychat_server")
ACCOUNT_PASSWORD = "correct horse 42"


@pytest.fixture
def irc_server(start_server):
    return start_server("--irc-port", "0")


def message(line: str) -> server.IrcMessage:
    return server.parse_irc_message(line)


def joined(client, channel: str) -> None:
    client.send(f"JOIN {channel}")
    client.expect(rf"366 \S+ {re.escape(channel)} ")


def register_account(pychat_client) -> None:
    pychat_client.send(f"/register {ACCOUNT_PASSWORD}")
    pychat_client.expect(r"-- Registered ")


# -- capabilities after signing in ----------------------------------------------------------------------

def test_server_time_asked_for_after_signing_in_applies_from_the_ack_on_and_not_to_others(
        irc_server, irc_connect, connect):
    alice, carol = irc_connect(irc_server, "alice"), irc_connect(irc_server, "carol")
    bob = connect(irc_server, "bob")
    bob.send("before")
    assert not message(alice.expect(r"PRIVMSG #lobby :before")).tags
    alice.send("CAP REQ :server-time echo-message")
    alice.expect(r"CAP alice ACK :?server-time echo-message")
    bob.send("after")
    tagged = message(alice.expect(r"PRIVMSG #lobby :after"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", tagged.tags["time"]), tagged
    assert not message(carol.expect(r"PRIVMSG #lobby :after")).tags, "carol never asked for server-time"
    alice.send("PRIVMSG #lobby :echoed")
    assert message(alice.expect(r"PRIVMSG #lobby :echoed")).source.startswith("alice!")
    alice.send("CAP REQ :-server-time")
    alice.expect(r"CAP alice ACK :?-server-time")
    bob.send("untagged again")
    assert not message(alice.expect(r"PRIVMSG #lobby :untagged again")).tags
    alice.send("CAP LIST")
    assert message(alice.expect(r"CAP alice LIST")).params[-1].split() == ["echo-message"]


def test_a_capability_change_regroups_the_person_in_every_room_they_are_in(irc_server, irc_connect, connect):
    alice, carol = irc_connect(irc_server, "alice"), irc_connect(irc_server, "carol")
    for client in (alice, carol):
        joined(client, "#dev")
    joined(alice, "#ops")
    bob = connect(irc_server, "bob")
    bob.send("/join #dev")
    bob.expect(r"\*\*\* You are in #dev")
    bob.send("/join #ops")
    bob.expect(r"\*\*\* You are in #ops")
    alice.send("CAP REQ :message-tags")
    alice.expect(r"CAP alice ACK ")
    for room in ("#dev", "#ops"):
        bob.send(f"/msg {room} hello {room}")
        assert "msgid" in message(alice.expect(rf"PRIVMSG {room} :hello {room}")).tags, room
    assert not message(carol.expect(r"PRIVMSG #dev :hello #dev")).tags, "carol's group changed with alice's"
    bob.expect(r"#dev bob: hello #dev")     # and the pyChat user still gets pyChat's lines


def test_an_unknown_capability_asked_for_after_signing_in_is_refused_whole(irc_server, irc_connect):
    alice = irc_connect(irc_server, "alice")
    alice.send("CAP REQ :server-time no-such-thing")
    alice.expect(r"CAP alice NAK :?server-time no-such-thing")
    alice.send("CAP LIST")
    assert message(alice.expect(r"CAP alice LIST")).params[-1] == ""


def test_cap_ls_offers_what_bridges_and_bots_look_for(irc_server, irc_connect):
    alice = irc_connect(irc_server)
    alice.send("CAP LS 302")
    offered = message(alice.expect(r"CAP \* LS ")).params[-1].split()
    assert {"message-tags", "cap-notify", "extended-join", "userhost-in-names", "account-notify",
            "server-time", "echo-message", "away-notify", "multi-prefix", "sasl=PLAIN"} <= set(offered)


# -- message tags -------------------------------------------------------------------------------------------

TAGS = ("message-tags", "echo-message")


def test_typing_reaches_irc_users_who_take_message_tags_and_no_one_else(irc_server, irc_connect, connect):
    alice, bob = irc_connect(irc_server, "alice", TAGS), irc_connect(irc_server, "bob", ("message-tags",))
    carol, dave = irc_connect(irc_server, "carol"), connect(irc_server, "dave")
    alice.send("@+typing=active TAGMSG #lobby")
    got = message(bob.expect(r"TAGMSG #lobby"))
    assert got.source == "alice!~alice@pychat" and got.tags["+typing"] == "active" and got.tags["msgid"]
    assert message(alice.expect(r"TAGMSG #lobby")).tags["msgid"] == got.tags["msgid"], "the echo's id differs"
    alice.send("PRIVMSG #lobby :done typing")
    for client in (carol, bob):
        assert "TAGMSG" not in client.expect(r"(TAGMSG|PRIVMSG) #lobby"), "TAGMSG reached someone without tags"
    assert dave.expect(r"alice: |.*typing") == "alice: done typing", "the pyChat user saw the tags"


def test_client_tags_ride_with_a_message_and_every_receiver_gets_the_same_msgid(irc_server, irc_connect, connect):
    alice, bob = irc_connect(irc_server, "alice", TAGS), irc_connect(irc_server, "bob", ("message-tags",))
    carol, dave = irc_connect(irc_server, "carol"), connect(irc_server, "dave")
    alice.send("@+draft/reply=abc;+example.org/emoji=wave;time=forged;account=forged PRIVMSG #lobby :hi all")
    to_bob, echo = message(bob.expect(r"PRIVMSG #lobby :hi all")), message(alice.expect(r"PRIVMSG #lobby :hi all"))
    assert to_bob.tags["+draft/reply"] == "abc" and to_bob.tags["+example.org/emoji"] == "wave"
    assert "time" not in to_bob.tags and "account" not in to_bob.tags, "a client set the server's own tags"
    assert to_bob.tags["msgid"] == echo.tags["msgid"]
    assert not message(carol.expect(r"PRIVMSG #lobby :hi all")).tags
    assert dave.expect(r"alice: ") == "alice: hi all"
    alice.send("PRIVMSG #lobby :again")
    assert message(bob.expect(r"PRIVMSG #lobby :again")).tags["msgid"] != to_bob.tags["msgid"]


def test_a_private_tagmsg_and_private_tags_reach_the_person_who_takes_them(irc_server, irc_connect):
    alice, bob = irc_connect(irc_server, "alice", TAGS), irc_connect(irc_server, "bob", ("message-tags",))
    carol = irc_connect(irc_server, "carol")
    alice.send("@+typing=active TAGMSG bob")
    got = message(bob.expect(r"TAGMSG bob"))
    assert got.tags["+typing"] == "active" and got.source.startswith("alice!")
    alice.send("@+typing=active TAGMSG carol")
    alice.send("@+draft/react=x PRIVMSG carol :plain for you")
    assert not message(carol.expect(r"(TAGMSG|PRIVMSG) carol")).tags, "carol got tags she never asked for"
    alice.send("@+draft/reply=1 PRIVMSG bob :tagged for you")
    assert message(bob.expect(r"PRIVMSG bob :tagged")).tags["+draft/reply"] == "1"


def test_tagmsg_mistakes_get_their_numerics(irc_server, irc_connect):
    alice = irc_connect(irc_server, "alice", TAGS)
    alice.send("@+typing=active TAGMSG nobody")
    assert " 401 alice nobody " in alice.expect(r"401 ")
    alice.send("@+typing=active TAGMSG #nowhere")
    assert " 403 alice #nowhere " in alice.expect(r"403 ")
    bob = irc_connect(irc_server, "bob")
    bob.send("JOIN #elsewhere")
    bob.expect(r"366 bob #elsewhere ")
    alice.send("@+typing=active TAGMSG #elsewhere")
    assert " 404 alice #elsewhere " in alice.expect(r"404 ")
    alice.send("TAGMSG")
    alice.expect(r"461 alice TAGMSG ")


@pytest.mark.parametrize("mode", ["+m", "+b bob"])
def test_whoever_cannot_talk_in_a_room_cannot_react_or_type_in_it_either(irc_server, irc_connect, mode):
    alice, bob = irc_connect(irc_server, "alice", TAGS), irc_connect(irc_server, "bob", TAGS)
    joined(alice, "#dev")
    joined(bob, "#dev")
    alice.send(f"MODE #dev {mode}")
    bob.expect(rf"MODE #dev {re.escape(mode)}")
    bob.send("@+draft/react=THIS\\sROOM\\sSUCKS TAGMSG #dev")
    assert " 404 bob #dev " in bob.expect(r"404 "), "a reaction from someone who cannot talk was taken"
    alice.send("PRIVMSG #dev :marker")
    lines = alice.lines_until(r"(@\S+ )?:alice!\S+ PRIVMSG #dev :marker")
    assert not [line for line in lines if "TAGMSG" in line], lines


def test_more_tag_data_than_a_client_may_send_is_417_and_nothing_is_sent(irc_server, irc_connect):
    alice, bob = irc_connect(irc_server, "alice", TAGS), irc_connect(irc_server, "bob", ("message-tags",))
    alice.send("@+big=" + "x" * 4090 + " PRIVMSG #lobby :too much")
    assert "4094" in alice.expect(r"417 alice ")
    alice.send("PRIVMSG #lobby :fits")
    assert bob.expect(r"PRIVMSG #lobby :").endswith(":fits"), "the message with too many tags was sent"


def test_history_replays_a_line_with_its_own_id_but_not_its_client_tags(irc_server, irc_connect):
    alice = irc_connect(irc_server, "alice", TAGS)
    joined(alice, "#dev")
    alice.send("@+draft/reply=x1 PRIVMSG #dev :remember me")
    first_id = message(alice.expect(r"PRIVMSG #dev :remember me")).tags["msgid"]
    bob = irc_connect(irc_server, "bob", ("message-tags",))
    bob.send("JOIN #dev")
    assert message(bob.expect(r"PRIVMSG #dev :.*remember me")).tags == {"msgid": first_id}


# -- who is who: WHO, WHOX, accounts ---------------------------------------------------------------------------

def test_who_takes_masks_of_nicknames_and_of_user_and_host(irc_server, irc_connect, connect):
    alice = irc_connect(irc_server, "alice")
    connect(irc_server, "bob"), connect(irc_server, "bert")
    irc_connect(irc_server, "carol")

    def who(mask: str) -> list[str]:
        alice.send(f"WHO {mask}")
        lines = alice.lines_until(rf"315 alice {re.escape(mask)} ")
        return sorted(message(line).params[5] for line in lines if message(line).command == "352")

    assert who("*") == ["alice", "bert", "bob", "carol"]
    assert who("0") == ["alice", "bert", "bob", "carol"]
    assert who("b*") == ["bert", "bob"]
    assert who("B?B") == ["bob"]
    assert who("*!*@pychat") == ["alice", "bert", "bob", "carol"]
    assert who("c*!~carol@*") == ["carol"]
    assert who("*!~a*@*") == ["alice"], "an IRC user has the user name USER gave"
    assert who("*!~user@*") == ["bert", "bob"], "pyChat's users gave none"
    assert who("*.example") == []
    assert who("*!*@elsewhere") == []
    assert who("pychat.server") == ["alice", "bert", "bob", "carol"]
    assert who("nobody*") == []


def test_whox_gives_the_fields_asked_for_in_its_own_order_with_the_token_and_accounts(
        irc_server, irc_connect, connect):
    alice = irc_connect(irc_server, "alice")
    bob = connect(irc_server, "bob")
    register_account(bob)
    alice.send("WHO #lobby %rnacuhft,42")
    lines = alice.lines_until(r"315 alice #lobby ")
    replies = {message(line).params[5]: message(line).params[1:] for line in lines if " 354 " in line}
    assert replies["bob"] == ["42", "#lobby", "~user", "pychat", "bob", "H", "bob", "bob"]
    assert replies["alice"][6] == "0", "a guest's account is 0"
    carol = irc_connect(irc_server, "carol")        # her real name: "carol the tester"
    alice.send("WHO carol %nr")
    assert message(alice.expect(r"354 ")).params[1:] == ["carol", "carol the tester"]
    alice.send("WHO carol")
    assert message(alice.expect(r"352 ")).params[-1] == "0 carol the tester"
    carol.close()
    alice.send("WHO bob %na")
    assert message(alice.expect(r"354 ")).params[1:] == ["bob", "bob"]
    alice.send("WHO #lobby %chtsunfra,152")          # as HexChat asks on joining
    # Read to its end: carol, just gone, may still be listed after bob, and her line is no answer to the next WHO.
    lines = alice.lines_until(r"315 alice #lobby ")
    [bobs] = [line for line in lines if " 354 alice 152 #lobby ~user pychat pychat.server bob " in line]
    assert message(bobs).params[-2:] == ["bob", "bob"]
    alice.send("WHO bob n%tna,7")                    # as Quassel asks: match the nickname only
    assert message(alice.expect(r"354 ")).params[1:] == ["7", "bob", "bob"], "the token was lost"
    alice.send("WHO bob %ni,1234")        # a token of four digits is no token
    assert message(alice.expect(r"354 ")).params[1:] == ["255.255.255.255", "bob"], "an address was shown"


def test_who_of_many_is_paid_for_from_the_list_budget(start_server, irc_connect):
    chat_server = start_server("--irc-port", "0", "--rate", "0")
    alice = irc_connect(chat_server, "alice")
    asked = 2 * server.LISTING_BURST            # each costs one entry at least, and the budget refills slowly
    # All sent at once: with a round trip each, a slow machine answers them no faster than the budget refills.
    alice.send_raw(b"WHO *\r\n" * asked)
    for _ in range(asked):
        if " 263 " in alice.expect(r"(315|263) "):
            break
    else:
        pytest.fail("WHO * was never refused, whatever it cost")


def test_account_news_and_extended_join_and_userhost_in_names(irc_server, irc_connect, connect):
    alice = irc_connect(irc_server, "alice", ("account-notify", "extended-join", "userhost-in-names"))
    bob = connect(irc_server, "bob")
    assert message(alice.expect(r":bob!\S+ JOIN ")).params == ["#lobby", "*", "bob"]
    register_account(bob)
    assert alice.expect(r"ACCOUNT ") == ":bob!~user@pychat ACCOUNT bob"
    bob.send("/join #dev")
    bob.expect(r"\*\*\* You are in #dev")
    alice.send("JOIN #dev")
    lines = alice.lines_until(r"366 alice #dev ")
    own_join = message(next(line for line in lines if " JOIN " in line))
    assert own_join.source == "alice!~alice@pychat" and own_join.params == ["#dev", "*", "alice the tester"]
    names = message(next(line for line in lines if " 353 " in line)).params[-1].split()
    assert sorted(names) == ["@bob!~user@pychat", "alice!~alice@pychat"]
    alice.send("NAMES #dev")
    assert "@bob!~user@pychat" in alice.expect(r"353 alice = #dev ")
    bob.send(f"/unregister {ACCOUNT_PASSWORD}")
    assert alice.expect(r"ACCOUNT ") == ":bob!~user@pychat ACCOUNT *"


def test_a_sasl_account_shows_in_its_own_extended_join(start_server, irc_connect, connect):
    chat_server = start_server("--irc-port", "0")
    register_account(connect(chat_server, "alice"))
    alice = irc_connect(chat_server)
    assert any(" 903 " in line for line in sasl(alice, "alice", "alice", ACCOUNT_PASSWORD, also=("extended-join",),
                                                   realname="Alice"))
    assert message(alice.expect(r":alice!~alice@pychat JOIN #lobby")).params == ["#lobby", "alice", "Alice"]


# -- LIST and WHOWAS --------------------------------------------------------------------------------------------

def test_list_takes_channels_masks_and_people_counts(irc_server, irc_connect):
    alice, bob = irc_connect(irc_server, "alice"), irc_connect(irc_server, "bob")
    for channel in ("#dev", "#devops", "#ops"):
        joined(alice, channel)
    joined(bob, "#dev")

    def listed(argument: str) -> list[str]:
        alice.send(f"LIST {argument}")
        lines = alice.lines_until(r"323 ")
        return sorted(message(line).params[1] for line in lines if " 322 " in line)

    assert listed("") == ["#dev", "#devops", "#lobby", "#ops"]
    assert listed("#dev,#ops") == ["#dev", "#ops"]
    assert listed("#DEV") == ["#dev"]
    assert listed("#dev*") == ["#dev", "#devops"]
    assert listed(">1") == ["#dev", "#lobby"]
    assert listed("<2") == ["#devops", "#ops"]
    assert listed("!#dev*") == ["#lobby", "#ops"]
    assert listed("#nowhere") == []


def test_whowas_remembers_who_left_and_who_renamed_and_shows_no_address(irc_server, irc_connect, connect):
    alice = irc_connect(irc_server, "alice")
    bob = connect(irc_server, "bob")
    register_account(bob)
    bob.send("/quit")
    alice.expect(r":bob!\S+ QUIT")
    carol = irc_connect(irc_server, "carol")
    carol.send("NICK caroline")
    alice.expect(r":carol!\S+ NICK :?caroline")
    alice.send("WHOWAS bob")
    lines = alice.lines_until(r"369 alice bob ")
    assert message(lines[0]).command == "314" and message(lines[0]).params[1:5] == ["bob", "~user", "pychat", "*"]
    assert any(" 330 alice bob bob " in line for line in lines), "the account was not said"
    assert not any("127.0.0.1" in line for line in lines)
    alice.send("WHOWAS CAROL")
    assert message(alice.expect(r"314 ")).params[1::4] == ["carol", "carol the tester"]
    alice.send("WHOWAS nobody")
    alice.expect(r"406 alice nobody ")
    alice.expect(r"369 alice nobody ")


def test_whowas_gives_the_newest_first_and_as_many_as_asked(irc_server, irc_connect):
    alice = irc_connect(irc_server, "alice")
    for n in range(3):
        dave = irc_connect(irc_server, "dave")
        dave.send(f"QUIT :bye {n}")
        alice.expect(r":dave!\S+ QUIT")
        dave.close()
    alice.send("WHOWAS dave 2")
    lines = alice.lines_until(r"369 ")
    assert sum(" 314 " in line for line in lines) == 2


def test_account_tag_names_the_account_of_whoever_speaks(irc_server, irc_connect, connect):
    alice = irc_connect(irc_server, "alice", ("account-tag",))
    bob, carol = connect(irc_server, "bob"), connect(irc_server, "carol")
    register_account(bob)
    bob.send("signed in")
    assert message(alice.expect(r":bob!\S+ PRIVMSG #lobby :signed in")).tags == {"account": "bob"}
    carol.send("a guest")
    assert not message(alice.expect(r":carol!\S+ PRIVMSG #lobby :a guest")).tags



# -- notices ------------------------------------------------------------------------------------------------

def test_a_notice_stays_a_notice_for_irc_users_and_is_a_line_for_pychat_users(irc_server, irc_connect, connect):
    alice, bob = irc_connect(irc_server, "alice", ("echo-message",)), irc_connect(irc_server, "bob")
    dave = connect(irc_server, "dave")
    alice.send("NOTICE #lobby :a bot's answer")
    assert bob.expect(r":alice!\S+ (NOTICE|PRIVMSG) #lobby ").startswith(":alice!~alice@pychat NOTICE #lobby ")
    assert " NOTICE #lobby " in alice.expect(r":alice!\S+ (NOTICE|PRIVMSG) #lobby "), "the echo is no notice"
    assert dave.expect(r"alice: ") == "alice: a bot's answer"
    alice.send("NOTICE bob :just for you")
    assert bob.expect(r":alice!\S+ (NOTICE|PRIVMSG) bob ").startswith(":alice!~alice@pychat NOTICE bob ")


def test_a_notice_is_not_answered_with_an_away_message_nor_kept_for_someone_offline(
        irc_server, irc_connect, connect):
    alice, bob = irc_connect(irc_server, "alice"), irc_connect(irc_server, "bob")
    bob.send("AWAY :lunch")
    bob.expect(r"306 ")

    def answers_to(*lines: str) -> list[str]:
        for line in lines:
            alice.send(line)
        alice.send("PING :sync")
        return [line for line in alice.lines_until(r"PONG ") if re.search(r" (NOTICE|301) alice ", line)]

    answers = answers_to("NOTICE bob :no answer wanted", "PRIVMSG bob :an answer wanted")
    assert len(answers) == 1 and answers[0].split(" ", 1)[1] in ("301 alice bob lunch", "301 alice bob :lunch"), answers
    owner = connect(irc_server, "carol")
    register_account(owner)
    owner.send("/quit")
    owner.wait_closed()
    answers = answers_to("NOTICE carol :keep this?", "PRIVMSG carol :keep this")
    assert len(answers) == 1 and "kept for them" in answers[0], answers
    owner = connect(irc_server)
    owner.send("carol")
    owner.expect(r"\*\*\* Password for carol:")
    owner.send(ACCOUNT_PASSWORD)
    owner.expect(r"\[offline \S+ from alice\] keep this$")
    owner.send("/quit")
    owner.wait_closed()
    assert not any("keep this?" in line for line in owner.seen), "the notice was kept"


def test_someone_who_joins_while_away_is_shown_away_to_away_notify_clients(irc_server, irc_connect, connect):
    alice = irc_connect(irc_server, "alice", ("away-notify",))
    joined(alice, "#dev")
    bob = connect(irc_server, "bob")
    bob.send("/away lunch")
    bob.expect(r"-- |\*\*\* ")
    bob.send("/join #dev")
    alice.expect(r":bob!\S+ JOIN #dev")
    assert alice.recv_line() == ":bob!~user@pychat AWAY lunch"


# -- MONITOR ------------------------------------------------------------------------------------------------

def news(client) -> tuple[str, str]:
    """The next MONITOR news: 730 (online) or 731 (offline), and the names it gives."""
    got = message(client.expect(r"73[01] "))
    return got.command, got.params[-1]


def test_monitor_says_who_is_online_now_and_whenever_they_come_and_go(irc_server, irc_connect, connect):
    alice = irc_connect(irc_server, "alice")
    connect(irc_server, "bob")
    alice.send("MONITOR + bob,Carol,dave")
    assert message(alice.expect(r"730 ")).params == ["alice", "bob!~user@pychat"]
    assert message(alice.expect(r"731 ")).params[-1].split(",") == ["Carol", "dave"]
    carol = connect(irc_server, "carol")
    assert news(alice) == ("730", "carol!~user@pychat")
    carol.send("/nick dave")
    assert news(alice) == ("731", "carol")
    assert news(alice) == ("730", "dave!~user@pychat")
    carol.send("/quit")
    assert news(alice) == ("731", "dave")
    alice.send("MONITOR - carol")
    alice.send("MONITOR L")
    assert message(alice.expect(r"732 ")).params[-1].split(",") == ["bob", "dave"]
    alice.expect(r"733 alice ")
    alice.send("MONITOR S")
    assert news(alice) == ("730", "bob!~user@pychat")
    assert news(alice) == ("731", "dave")
    alice.send("MONITOR C")
    alice.send("MONITOR L")
    assert message(alice.expect(r"73[23] ")).command == "733", "the list was not cleared"


def test_monitor_holds_a_limited_number_of_names(irc_server, irc_connect):
    alice = irc_connect(irc_server, "alice")
    names = [f"n{n}" for n in range(server.WATCH_LIMIT + 2)]
    alice.send("MONITOR + " + ",".join(names[:60]))
    alice.send("MONITOR + " + ",".join(names[60:]))
    full = message(alice.expect(r"734 "))
    assert full.params[1:3] == [str(server.WATCH_LIMIT), f"{names[-2]},{names[-1]}"]
    alice.send("MONITOR")
    alice.expect(r"461 alice MONITOR ")


def test_a_who_mask_made_to_be_slow_is_answered_at_once_and_finds_no_one(irc_server, irc_connect):
    alice = irc_connect(irc_server, "alice")
    for mask in ("*a" * 200 + "*b", "a" * 21 + "*", "?" * 30):
        started = time.monotonic()
        alice.send(f"WHO {mask}")
        lines = alice.lines_until(r"315 ")
        assert not any(" 352 " in line for line in lines) and time.monotonic() - started < 1.0, mask[:20]
    alice.send("WHO " + "*" * 400 + "e")        # stars run together: alice fits
    assert message(alice.expect(r"352 ")).params[5] == "alice"


def test_the_room_sees_an_invitation_with_invite_notify(irc_server, irc_connect, connect):
    alice, carol = irc_connect(irc_server, "alice"), irc_connect(irc_server, "carol", ("invite-notify",))
    dave = irc_connect(irc_server, "dave")
    for client in (alice, carol, dave):
        joined(client, "#dev")
    connect(irc_server, "bob")
    alice.send("INVITE bob #dev")
    alice.expect(r"341 alice bob #dev")
    assert carol.expect(r":alice!\S+ INVITE ") == ":alice!~alice@pychat INVITE bob #dev"
    alice.send("PRIVMSG #dev :after the invitation")
    assert "INVITE" not in dave.expect(r":alice!\S+ (INVITE|PRIVMSG) "), "dave never asked for invite-notify"


# -- bots ---------------------------------------------------------------------------------------------------

def test_a_bot_says_so_with_user_mode_b_and_shows_as_one_in_who_and_whois(irc_server, irc_connect):
    alice, bot = irc_connect(irc_server, "alice", ("message-tags",)), irc_connect(irc_server, "sopel")
    isupport = " ".join(line for line in bot.seen if " 005 " in line)
    assert " BOT=B " in isupport
    bot.send("MODE sopel +B")
    assert message(bot.expect(r":sopel!\S+ MODE sopel")).params == ["sopel", "+B"]
    bot.send("MODE sopel")
    assert message(bot.expect(r"221 ")).params[1] == "+B"
    alice.send("WHO sopel")
    assert message(alice.expect(r"352 ")).params[6] == "HB"
    alice.send("WHOIS sopel")
    assert any(" 335 alice sopel " in line for line in alice.lines_until(r"318 ")), "WHOIS does not say it is a bot"
    bot.send("PRIVMSG #lobby :beep")
    assert "bot" in message(alice.expect(r":sopel!\S+ PRIVMSG #lobby :beep")).tags
    bot.send("MODE sopel -B")
    bot.expect(r":sopel!\S+ MODE sopel")
    alice.send("WHO sopel")
    assert message(alice.expect(r"352 ")).params[6] == "H"
    bot.send("PRIVMSG #lobby :human again")
    assert "bot" not in message(alice.expect(r":sopel!\S+ PRIVMSG #lobby :human")).tags
    bot.send("MODE sopel +x")
    bot.expect(r"501 sopel ")


def test_user_mode_i_hides_from_who_masks_of_those_who_share_no_room(irc_server, irc_connect):
    alice, carol, dave = (irc_connect(irc_server, nick) for nick in ("alice", "carol", "dave"))
    carol.send("MODE carol +i")
    assert message(carol.expect(r":carol!\S+ MODE carol")).params == ["carol", "+i"]
    carol.send("MODE carol")
    assert message(carol.expect(r"221 ")).params[1] == "+i"
    for client in (carol, dave):        # in #dev only; alice stays in #lobby
        joined(client, "#dev")
        client.send("PART #lobby")
        client.expect(r":\S+ PART #lobby")

    def who(client, mask: str) -> list[str]:
        client.send(f"WHO {mask}")
        return sorted(message(line).params[5] for line in client.lines_until(r"315 ") if " 352 " in line)

    assert who(alice, "*") == ["alice", "dave"], "an invisible person showed to someone sharing no room"
    assert who(dave, "*") == ["alice", "carol", "dave"]
    assert who(alice, "carol") == ["carol"], "asked for by name, an invisible person is found"
    alice.send("LUSERS")
    assert "2 users and 1 invisible" in alice.expect(r"251 ")


def test_setname_gives_a_new_real_name_that_setname_clients_are_told_of(irc_server, irc_connect):
    alice, bob = irc_connect(irc_server, "alice", ("setname",)), irc_connect(irc_server, "bob", ("setname",))
    carol = irc_connect(irc_server, "carol")
    alice.send("SETNAME :Alice Liddell")
    for client in (alice, bob):
        assert message(client.expect(r":alice!\S+ SETNAME ")).params == ["Alice Liddell"]
    bob.send("WHO alice %nr")
    assert message(bob.expect(r"354 ")).params[1:] == ["alice", "Alice Liddell"]
    alice.send("SETNAME :" + "x" * 51)
    assert message(alice.expect(r"FAIL ")).params[:2] == ["SETNAME", "INVALID_REALNAME"]
    alice.send("PRIVMSG #lobby :after")
    assert "SETNAME" not in carol.expect(r":alice!\S+ (SETNAME|PRIVMSG) "), "carol never asked for setname"


def test_a_muted_person_keeps_their_real_name(start_server, irc_connect):
    chat_server = start_server("--irc-port", "0", "--op-password", "let me run it 4")
    op = irc_connect(chat_server, "boss")
    alice = irc_connect(chat_server, "alice", ("setname",), source="127.0.0.2")      # muted by her address
    op.send("OPER boss :let me run it 4")
    op.expect(r"381 ")
    op.send("PRIVMSG pyChat :mute alice")
    op.expect(r":pyChat!\S+ NOTICE boss ")
    alice.send("SETNAME :Someone Else")
    assert "muted" in alice.expect(r"(:pyChat!\S+ NOTICE alice|:alice!\S+ SETNAME) ")
