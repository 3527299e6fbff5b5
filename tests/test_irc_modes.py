"""How a room is run, from both doors: a member limit (+l), moderation with voices (+m, +v), messages from
outside (+n), secrecy (+s), and masks that ban (+b), exempt from bans (+e) and let in past invite-only
(+I). pyChat's /mode and IRC's MODE change the same settings under the same rules, and each door sees
the other's changes in its own words; a lasting room keeps them across restarts.

Each test starts a real server with --irc-port 0. To prove that something did NOT arrive, someone sends
a later line and the test checks that it comes first.
"""
from __future__ import annotations

import re
import sqlite3

from conftest import shown
from test_irc import IRC_SERVER, irc_server, numeric_of, params  # noqa: F401 (irc_server: a fixture)


def irc_join(client, room: str) -> list[str]:
    client.send(f"JOIN {room}")
    return client.lines_until(rf"(366|4\d\d) {client.nick} {re.escape(room)} ")


def pychat_join(client, room: str) -> str:
    client.send(f"/join {room}")
    return client.expect(rf"\*\*\* You are in #{room}\b|!! ")


def test_a_limit_refuses_one_too_many_at_both_doors_and_an_invitation_lets_one_more_in(
        irc_server, irc_connect, connect):
    founder, dave = irc_connect(irc_server, "founder"), irc_connect(irc_server, "dave")
    bob, carol = connect(irc_server, "bob"), connect(irc_server, "carol")
    irc_join(founder, "#dev")
    founder.send("MODE #dev +l 2")
    assert params(founder.expect(r"MODE #dev ")) == ["#dev", "+l", "2"]
    assert pychat_join(bob, "dev").startswith("*** You are in #dev")
    assert pychat_join(carol, "dev") == "!! #dev is full: it takes 2 people; one of its operators can /invite you."
    assert numeric_of(irc_join(dave, "#dev")[-1]) == "471"
    founder.send("INVITE dave #dev")
    founder.expect("341 ")
    assert numeric_of(irc_join(dave, "#dev")[-1]) == "366", "an invitation lets one more in"
    founder.send("MODE #dev +l abc")
    reply = founder.expect(r"(696|MODE) ")
    assert numeric_of(reply) == "696" and params(reply)[1:4] == ["#dev", "l", "abc"], reply
    founder.send("MODE #dev")
    assert params(founder.expect("324 founder #dev "))[2:] == ["+lnt", "2"]
    carol.send("/join ops")
    carol.expect(r"\*\*\* You are in #ops")
    carol.send("/mode limit 0")
    assert carol.expect("!! ").startswith("!! A room's limit is a number of people, 1 to ")
    carol.send("/mode +l 1")
    assert carol.expect(r"\*\*\* carol") == "*** carol set the limit of #ops to 1 people"
    assert numeric_of(irc_join(dave, "#ops")[-1]) == "471"
    carol.send("/mode limit off")
    carol.expect(r"\*\*\* carol removed the limit of #ops")
    assert numeric_of(irc_join(dave, "#ops")[-1]) == "366"


def test_a_moderated_room_hears_only_its_operators_and_the_voiced_from_either_door(irc_server, irc_connect, connect):
    founder, carol = irc_connect(irc_server, "founder"), irc_connect(irc_server, "carol", ("multi-prefix",))
    bob = connect(irc_server, "bob")
    irc_join(founder, "#dev")
    pychat_join(bob, "dev")
    irc_join(carol, "#dev")
    founder.send("MODE #dev +m")
    assert bob.expect(r"\*\*\* founder") == \
        "*** founder made #dev moderated: only its operators and voiced people talk"
    bob.send("hello?")
    assert bob.expect("!! ") == "!! #dev is moderated: only its operators and those they give a voice talk."
    carol.send("PRIVMSG #dev :hello?")
    assert params(carol.expect("404 "))[1] == "#dev"
    founder.send("MODE #dev +vo carol bob")
    assert params(carol.expect(r"MODE #dev ")) == ["#dev", "+vo", "carol", "bob"], "one MODE for both"
    assert bob.expect(r"\*\*\* founder") == "*** founder gave carol a voice in #dev; made bob an operator of #dev"
    carol.send("NAMES #dev")
    assert sorted(params(carol.expect("353 carol "))[-1].split()) == ["+carol", "@bob", "@founder"]
    carol.send("WHO #dev")
    flags = {params(line)[5]: params(line)[6] for line in carol.lines_until("315 ") if numeric_of(line) == "352"}
    assert flags == {"founder": "H@", "bob": "H@", "carol": "H+"}, flags
    carol.send("PRIVMSG #dev :now I may")
    assert bob.expect("carol: ") == "carol: now I may"
    bob.send("/mode devoice carol")
    assert params(founder.expect(r"MODE #dev -")) == ["#dev", "-v", "carol"]
    carol.send("PRIVMSG #dev :and now?")
    carol.expect("404 ")
    bob.send("still heard, as an operator")
    assert params(carol.expect("PRIVMSG #dev "))[-1] == "still heard, as an operator"
    bob.send("/mode -m")
    assert params(founder.expect(r"MODE #dev -m")) == ["#dev", "-m"]
    carol.send("PRIVMSG #dev :everyone again")
    assert bob.expect("carol: ") == "carol: everyone again"


def test_messages_from_outside_are_a_setting_that_starts_off(irc_server, irc_connect, connect):
    founder, outsider = irc_connect(irc_server, "founder"), irc_connect(irc_server, "outsider")
    bob = connect(irc_server, "bob")
    irc_join(founder, "#dev")
    founder.send("MODE #dev")
    assert params(founder.expect("324 founder #dev "))[2] == "+nt", "+n holds from the start"
    outsider.send("PRIVMSG #dev :knock knock")
    assert numeric_of(outsider.expect(r"(404|PRIVMSG) ")) == "404"
    bob.send("/msg #dev knock knock")
    assert bob.expect("!! ") == "!! You are not in #dev."
    founder.send("MODE #dev -n")
    founder.expect(r"MODE #dev -n")
    outsider.send("PRIVMSG #dev :knock knock")
    assert founder.expect("PRIVMSG #dev ").startswith(":outsider!~outsider@pychat PRIVMSG #dev :knock knock")
    bob.send("/msg #dev who is there?")
    assert params(founder.expect("PRIVMSG #dev "))[-1] == "who is there?"
    pychat_join(bob, "dev")
    founder.send("MODE #dev +o bob")
    bob.expect(r"\*\*\* founder made bob")
    bob.send("/mode")
    assert bob.expect("-- #dev: ") == \
        "-- #dev: no key; open to all; topic by operators; operators: bob, founder; outside messages on"
    bob.send("/mode outside-messages off")
    founder.expect(r"MODE #dev \+n")
    outsider.send("PRIVMSG #dev :again")
    assert numeric_of(outsider.expect(r"(404|PRIVMSG) ")) == "404"


def test_a_secret_room_is_hidden_from_everyone_outside_it(irc_server, irc_connect, connect):
    alice, carol = connect(irc_server, "alice"), connect(irc_server, "carol")
    bob, dave = irc_connect(irc_server, "bob"), irc_connect(irc_server, "dave")
    pychat_join(alice, "hide")
    irc_join(dave, "#hide")
    alice.send("/mode secret on")
    assert params(dave.expect(r"MODE #hide ")) == ["#hide", "+s"]
    bob.send("LIST")
    assert not any("#hide" in line for line in bob.lines_until("323 ")), "LIST showed a secret room"
    bob.send("NAMES #hide")
    assert numeric_of(bob.expect("(353|366) ")) == "366"
    bob.send("WHOIS alice")
    assert not any("#hide" in line for line in bob.lines_until("318 ")), "WHOIS showed a secret room"
    carol.send("/rooms")
    assert "#hide" not in "\n".join(carol.lines_until("-- #lobby"))
    dave.send("NAMES #hide")
    assert params(dave.expect("353 dave "))[1] == "@", "a secret room's NAMES are marked @"
    assert numeric_of(irc_join(bob, "#hide")[-1]) == "366", "secret is not invite-only"
    dave.send("MODE #hide -s")
    assert numeric_of(dave.expect("(482|MODE) ")) == "482", "only the room's operators change it"
    alice.send("/mode secret off")
    alice.expect(r"\*\*\* alice made #hide no longer secret$")
    bob.send("LIST")
    assert any("#hide" in line for line in bob.lines_until("323 "))


def test_a_ban_keeps_out_and_silences_and_an_exception_or_invitation_mask_lets_in(irc_server, irc_connect, connect):
    founder, troll, dave = (irc_connect(irc_server, nick) for nick in ("founder", "troll", "dave"))
    bob, carol = connect(irc_server, "bob"), connect(irc_server, "carol")
    irc_join(founder, "#dev")
    pychat_join(bob, "dev")
    irc_join(troll, "#dev")
    founder.send("MODE #dev +b troll")
    assert params(founder.expect(r"MODE #dev ")) == ["#dev", "+b", "troll!*@*"], "a nick alone is NICK!*@*"
    assert bob.expect(r"\*\*\* founder") == "*** founder banned troll!*@* from #dev"
    troll.send("PRIVMSG #dev :still here")
    assert params(troll.expect("404 "))[1] == "#dev", "a member who is banned cannot talk"
    troll.send("PART #dev")
    troll.expect("PART #dev")
    assert numeric_of(irc_join(troll, "#dev")[-1]) == "474"
    founder.send("MODE #dev +b")
    lines = founder.lines_until("368 ")
    [entry] = [params(line) for line in lines if numeric_of(line) == "367"]
    assert entry[1:4] == ["#dev", "troll!*@*", "founder"] and entry[4].isdigit(), shown(lines)
    founder.send("MODE #dev +e *!~troll@*")
    founder.expect(r"MODE #dev \+e")
    assert numeric_of(irc_join(troll, "#dev")[-1]) == "366", "an exception lifts the ban"
    founder.send("MODE #dev +o bob")
    bob.expect(r"\*\*\* founder made bob")
    bob.send("/mode ban carol!~user@*")
    founder.expect(r"MODE #dev \+b carol!~user@\*")
    assert pychat_join(carol, "dev") == "!! You are banned from #dev."
    bob.send("/mode +b")
    assert sorted(bob.lines_until(r"-- #dev ban carol"))[-2:] == [
        "-- #dev ban carol!~user@* (by bob)", "-- #dev ban troll!*@* (by founder)"]
    bob.send("/mode unban carol!~user@*")
    founder.expect(r"MODE #dev -b carol!~user@\*")
    assert pychat_join(carol, "dev").startswith("*** You are in #dev")
    founder.send("MODE #dev +iI dave!*@*")
    assert params(founder.expect(r"MODE #dev ")) == ["#dev", "+iI", "dave!*@*"]
    assert numeric_of(irc_join(dave, "#dev")[-1]) == "366", "an invitation mask lets in past invite-only"
    founder.send("MODE #dev I")
    assert params(founder.expect("346 "))[1:3] == ["#dev", "dave!*@*"]
    founder.expect("347 ")


def test_a_lasting_rooms_settings_and_masks_outlast_two_restarts(start_server, irc_connect, connect, tmp_path):
    options = (*IRC_SERVER, "--data-dir", str(tmp_path / "data"))
    chat_server = start_server(*options)
    alice = connect(chat_server, "alice")
    pychat_join(alice, "dev")
    for change in ("+l 50", "moderated on", "outside-messages on", "ban troll", "exempt *!~friend@*"):
        alice.send(f"/mode {change}")
        alice.expect(r"\*\*\* alice ")
    settings = "-- #dev: no key; open to all; topic by operators; operators: alice; limit 50; " \
               "moderated, voiced: none; outside messages on; 1 ban mask; 1 exempt mask"
    alice.send("/mode")
    assert alice.expect("-- #dev") == settings
    for restart in range(2):
        chat_server.stop()
        chat_server = start_server(*options)
        troll = irc_connect(chat_server, "troll")
        assert numeric_of(irc_join(troll, "#dev")[-1]) == "474", f"restart {restart + 1} lost the ban"
        alice = connect(chat_server, "alice")
        pychat_join(alice, "dev")
        alice.send("/mode")
        assert alice.expect("-- #dev") == settings, f"restart {restart + 1} lost settings"
    alice.send("/mode secret on")             # a private room keeps nothing once it empties
    alice.expect(r"\*\*\* alice made #dev secret")
    chat_server.stop()
    chat_server = start_server(*options)
    alice = connect(chat_server, "alice")
    pychat_join(alice, "dev")
    alice.send("/mode")
    assert alice.expect("-- #dev") == "-- #dev: no key; open to all; topic by operators; operators: alice"


def test_a_database_from_before_room_masks_gains_their_table(start_server, connect, tmp_path):
    data = tmp_path / "data"
    chat_server = start_server("--data-dir", str(data))
    connect(chat_server, "alice")
    chat_server.stop()
    with sqlite3.connect(data / "pychat.db") as db:       # as schema 2 was
        db.execute("DROP TABLE room_masks")
        db.execute("UPDATE meta SET value='2' WHERE key='schema'")
    chat_server = start_server("--data-dir", str(data))
    alice = connect(chat_server, "alice")
    pychat_join(alice, "dev")
    alice.send("/mode ban troll")
    alice.expect(r"\*\*\* alice banned troll!\*@\* from #dev")
    chat_server.stop()
    with sqlite3.connect(data / "pychat.db") as db:
        assert db.execute("SELECT room, list, mask, by FROM room_masks").fetchall() == [
            ("dev", "ban", "troll!*@*", "alice")]


def test_help_mode_explains_every_setting_and_its_letter(irc_server, connect):
    alice = connect(irc_server, "alice")
    alice.send("/help mode")
    text = "\n".join(alice.lines_until(r"-- .*forgets its settings when it empties"))
    for setting in ("key", "invite-only", "topic", "op", "deop", "limit", "moderated", "voice", "devoice",
                    "outside-messages", "secret", "ban", "unban", "exempt", "unexempt", "invite-mask",
                    "uninvite-mask", "+l 50", "+b"):
        assert f"/mode {setting}" in text, f"/help mode does not say /mode {setting}"
