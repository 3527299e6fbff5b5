"""Rooms: several at once, a current one, private rooms run by their founders, and the room tag on the wire."""
from __future__ import annotations

import os
import re

import pytest

from conftest import ClientFrom, LineClient, RoomReader, shown

OP_SECRET = "rooms operator secret"


def join(client: LineClient, room: str, key: str = "") -> list[str]:
    """/join ROOM and read up to the line that says it is current (and the history's end, if any)."""
    client.send(f"/join {room} {key}".rstrip())
    return client.lines_until(rf"\*\*\* (You are in|Now talking in) #{room}\b|!! ")


def marker(speaker: LineClient, *readers: LineClient, text: str = "marker") -> None:
    """SPEAKER says TEXT in its current room; wait until each reader has it (tagged or not)."""
    speaker.send(text)
    for reader in readers:
        reader.expect(rf"(#\S+ )?{speaker.nick}: {text}$")


@pytest.fixture
def op_server(start_server):
    return start_server("--rate", "0", env=dict(os.environ, PYCHAT_OP_PASSWORD=OP_SECRET))


def make_operator(client: LineClient) -> None:
    client.send(f"/op {OP_SECRET}")
    assert client.expect("-- |!! ") == "-- You are now an operator."


# -- several rooms at once ------------------------------------------------------------------------

def test_one_person_talks_in_three_rooms_and_sees_where_every_line_is_from(chat):
    alice, bob, carol = chat("alice", "bob", "carol")
    assert join(bob, "dev")[-1] == "*** You are in #dev, alone for now."
    assert join(carol, "ops")[-1] == "*** You are in #ops, alone for now."
    assert join(alice, "dev")[-1] == "*** You are in #dev with bob."
    assert join(alice, "ops")[-1] == "*** You are in #ops with carol."
    reader = RoomReader(alice)
    reader.read = len(alice.seen)
    reader.current = "ops"
    bob.send("in dev")
    carol.send("in ops")
    alice.send("/msg #lobby in the lobby")
    seen = {line: room for room, line in (reader.next(), reader.next(), reader.next())}
    assert seen == {"bob: in dev": "dev", "carol: in ops": "ops", "alice: in the lobby": "lobby"}
    assert bob.expect("#lobby alice: ") == "#lobby alice: in the lobby", "bob's copy is tagged: dev is current"
    assert join(alice, "dev")[-1] == "*** Now talking in #dev.", "joining a room you are in only switches"
    alice.send("now in dev")
    assert bob.expect("alice: ") == "alice: now in dev"
    assert carol.expect("#lobby alice: |alice: ") != "alice: now in dev"


def test_a_line_said_while_someone_switches_rooms_is_never_misattributed(start_server, connect):
    server = start_server("--rate", "0")
    alice, dev_speaker, lobby_speaker = (connect(server, nick) for nick in ("alice", "dever", "lobbyer"))
    join(dev_speaker, "dev")
    join(alice, "dev")
    reader = RoomReader(alice)
    reader.read = len(alice.seen)
    reader.current = "dev"
    for n in range(20):     # lines in both rooms, then a switch, while the lines are still on their way
        dev_speaker.send_raw("".join(f"{n * 15 + k}\n" for k in range(15)).encode())
        lobby_speaker.send_raw("".join(f"{n * 15 + k}\n" for k in range(15)).encode())
        alice.send(f"/join {'lobby' if n % 2 == 0 else 'dev'}")
        alice.expect(r"\*\*\* Now talking in")
    lobby_speaker.send("done")
    lines = reader.until("lobby", "lobbyer: done$", timeout=15)
    dev_speaker.send("done")
    lines += reader.until("dev", "dever: done$", timeout=15)
    said = [(room, line) for room, line in lines if re.match(r"(dever|lobbyer): \d+$", line)]
    assert len(said) == 600, f"{len(said)} of 600 lines arrived"
    wrong = [(room, line) for room, line in said if room != ("dev" if line.startswith("dever") else "lobby")]
    assert not wrong, f"lines read in the wrong room: {wrong[:5]}"
    switches = [n for n, (_, line) in enumerate(lines) if line.startswith("*** Now talking in")]
    assert len(switches) == 20, switches
    assert switches[-1] - switches[0] > 40, "the switches did not fall among the lines; the test proved nothing"
    # Which speaker's lines fall on which side of a switch is up to the threads' timing; that lines came
    # both ways shows the switching fell among them.
    assert any(re.match(r"(dever|lobbyer): ", line) for line in alice.seen) and \
        any(re.match(r"#(dev|lobby) (dever|lobbyer): ", line) for line in alice.seen), \
        "no line came both tagged and untagged: the switching proved nothing"


def test_msg_to_a_room_you_are_not_in_is_refused(chat):
    alice, bob = chat("alice", "bob")
    join(bob, "dev")
    alice.send("/msg #dev hello")
    assert alice.recv_line() == "!! You are not in #dev."


def test_the_per_person_room_limit(start_server, connect):
    server = start_server("--rooms-per-person", "3")
    alice = connect(server, "alice")
    join(alice, "one")
    join(alice, "two")
    assert join(alice, "three")[-1] == "!! You are in 3 rooms, the most one may be in; /leave one first."


# -- leaving -------------------------------------------------------------------------------------------

def test_leaving_a_room_tells_it_and_the_current_room_moves_to_the_last_joined(chat):
    alice, bob = chat("alice", "bob")
    join(bob, "dev")
    join(alice, "dev")
    join(alice, "ops")
    alice.send("/leave dev")
    assert alice.recv_line() == "*** You left #dev."
    assert bob.expect(r"\*\*\* alice left") == "*** alice left #dev"
    alice.send("/leave")
    assert alice.recv_line() == "*** You left #ops."
    assert alice.recv_line() == "*** Now talking in #lobby."
    alice.send("/part")
    assert alice.recv_line() == "!! #lobby is your only room; /quit leaves the chat."


def test_leaving_the_last_room_goes_back_to_the_lobby(chat):
    alice, bob = chat("alice", "bob")
    join(bob, "dev")
    bob.send("/leave lobby")
    assert bob.recv_line() == "*** You left #lobby."
    assert alice.expect(r"\*\*\* bob left") == "*** bob left #lobby"
    bob.send("/leave")
    assert bob.recv_line() == "*** You left #dev."
    assert bob.recv_line() == "*** You are in #lobby with alice."
    assert alice.expect(r"\*\*\* bob joined") == "*** bob joined #lobby"


# -- history -------------------------------------------------------------------------------------------

HISTORY = re.compile(r"\[history \S+\] (.*)")


def test_history_on_join_ends_with_a_marker_and_on_return_holds_only_what_was_missed(chat):
    alice, bob = chat("alice", "bob")
    join(alice, "dev")
    alice.send("first")
    alice.send("second")
    alice.expect("alice: second")
    lines = join(bob, "dev")
    lines += bob.lines_until(r"\*\*\* End of #dev history\.")
    assert [HISTORY.match(line).group(1) for line in lines if HISTORY.match(line)] == ["alice: first",
                                                                                        "alice: second"]
    bob.send("/leave dev")
    bob.expect(r"\*\*\* You left #dev")
    alice.expect(r"\*\*\* bob left")
    alice.send("while bob was away")
    alice.expect("alice: while bob was away")
    join(bob, "dev")
    replay = bob.lines_until(r"\*\*\* End of #dev history\.")
    assert [HISTORY.match(line).group(1) for line in replay if HISTORY.match(line)] == ["alice: while bob was away"]
    bob.send("/leave dev")
    bob.expect(r"\*\*\* You left #dev")
    join(bob, "dev")
    bob.send("after")
    assert bob.expect(r"\[history|\*\*\* End|bob: after") == "bob: after", "nothing missed, nothing replayed"


# -- private rooms -------------------------------------------------------------------------------------

def test_a_founder_runs_a_keyed_invite_only_room_hidden_from_outsiders(chat):
    alice, bob, carol = chat("alice", "bob", "carol")
    join(alice, "secret")
    alice.send("/mode key hunter2")
    assert alice.expect(r"\*\*\* alice") == "*** alice set a key on #secret"
    assert join(bob, "secret")[-1] == "!! #secret needs a key: /join #secret KEY."
    assert join(bob, "secret", "wrong")[-1] == "!! Wrong key for #secret."
    assert join(bob, "secret", "hunter2")[-1] == "*** You are in #secret with alice."
    alice.send("/mode invite-only on")
    assert alice.expect(r"\*\*\* alice") == "*** alice made #secret invite-only"
    assert join(carol, "secret", "hunter2")[-1] == "!! #secret is invite-only; one of its operators can /invite you."
    carol.send("/rooms")
    assert "-- #secret" not in "\n".join(carol.lines_until(r"-- #lobby")), "a private room was listed"
    carol.send("/who secret")
    assert carol.expect("!! ") == "!! No one is in #secret. /rooms lists the rooms."
    carol.send("/online")
    assert carol.expect("-- ") == "-- 3 online: alice, bob, carol (#lobby)", "private rooms showed in /online"
    bob.send("/invite carol")
    assert bob.expect("!! ") == "!! Only operators of #secret may do that."
    alice.send("/invite carol")
    assert alice.expect("-- ") == "-- Invited carol to #secret."
    assert carol.expect(r"\*\*\* alice") == "*** alice invites you to #secret. Type /join #secret to accept."
    assert join(carol, "secret")[-1] in ("*** You are in #secret with alice, bob.",
                                         "*** You are in #secret with bob, alice.")
    carol.send("/rooms")
    assert "-- #secret (3, current, private)" in carol.lines_until(r"-- #secret")


def test_online_does_not_show_a_private_room_to_outsiders(chat):
    alice, bob = chat("alice", "bob")
    join(alice, "hide")
    alice.send("/mode invite-only on")
    alice.expect(r"\*\*\* alice made")
    bob.send("/online")
    assert bob.expect("-- ") == "-- 2 online: alice, bob (#lobby)"
    alice.send("/online")
    assert alice.expect("-- ") == "-- 2 online: alice (#hide), bob (#lobby)"


def test_a_private_room_forgets_everything_when_its_last_member_leaves(chat):
    alice, bob = chat("alice", "bob")
    join(alice, "vault")
    alice.send("/mode key k")
    alice.send("/mode topic everyone")
    alice.expect(r"\*\*\* alice let everyone in #vault set its topic")
    alice.send("for our eyes only")
    alice.expect("alice: for our eyes only")
    alice.send("/leave vault")
    alice.expect(r"\*\*\* You left #vault")
    lines = join(bob, "vault")
    assert lines[-1] == "*** You are in #vault, alone for now."
    bob.send("/mode")
    assert bob.expect("-- ") == "-- #vault: no key; open to all; topic by operators; operators: bob"
    bob.send("check")
    assert bob.expect(r"\[history|bob: check") == "bob: check", "the old history was replayed"


@pytest.mark.parametrize("setting, refusal", [
    ("invite-only on", "!! #vault is invite-only; one of its operators can /invite you."),
    ("key k2", "!! #vault needs a key: /join #vault KEY."),
])
def test_an_invitation_ends_with_the_room_it_was_for_and_opens_no_later_room_of_that_name(chat, setting, refusal):
    alice, bob, carol = chat("alice", "bob", "carol")
    join(alice, "vault")
    alice.send("/mode invite-only on")
    alice.expect(r"\*\*\* alice made #vault invite-only")
    alice.send("/invite bob")
    bob.expect(r"\*\*\* alice invites you to #vault")
    alice.send("/leave vault")                  # the room empties: the invitation ends with it
    alice.expect(r"\*\*\* You left #vault")
    join(carol, "vault")
    carol.send(f"/mode {setting}")
    carol.expect(r"\*\*\* carol (made|set)")
    assert join(bob, "vault")[-1] == refusal, "an invitation to an earlier #vault opened carol's"
    carol.send("/invite bob")
    bob.expect(r"\*\*\* carol invites you to #vault")
    assert join(bob, "vault")[-1] == "*** You are in #vault with carol.", "carol's own invitation did not work"


def test_opening_a_room_with_a_key_sets_the_key(chat):
    alice, bob = chat("alice", "bob")
    join(alice, "hideout", "hunter2")
    alice.send("/mode")
    lines = alice.lines_until("-- ")
    assert lines == ["*** alice set a key on #hideout",
                     "-- #hideout: key; open to all; topic by operators; operators: alice"], \
        f"the key given when opening the room was not set: {lines}"
    assert join(bob, "hideout")[-1] == "!! #hideout needs a key: /join #hideout KEY."
    assert join(bob, "hideout", "hunter2")[-1] == "*** You are in #hideout with alice."
    alice.send("/join lobby ignored-key")         # alice is in the lobby already: it only becomes current
    alice.expect(r"\*\*\* Now talking in #lobby")


# -- room operators -------------------------------------------------------------------------------------

def test_room_operators_and_their_limits(op_server, connect):
    alice, bob, carol, dave = (connect(op_server, nick) for nick in ("alice", "bob", "carol", "dave"))
    join(alice, "dev")
    join(bob, "dev")
    join(carol, "dev")
    join(dave, "other")
    bob.send("/topic bob's topic")
    assert bob.expect("!! ") == "!! Only operators of #dev may do that."
    bob.send("/kick carol")
    assert bob.expect("!! ") == "!! Only operators of #dev may do that."
    alice.send("/mode op bob")
    assert carol.expect(r"\*\*\* alice") == "*** alice made bob an operator of #dev"
    bob.send("/topic release friday")
    assert carol.expect(r"\*\*\* bob") == "*** bob set the topic of #dev: release friday"
    bob.send("/kick carol too loud")
    assert bob.expect("-- ") == "-- Kicked carol."
    assert carol.expect(r"\*\*\* You were") == "*** You were kicked from #dev by bob: too loud."
    assert carol.recv_line() == "*** Now talking in #lobby."
    assert alice.expect(r"\*\*\* carol was") == "*** carol was kicked from #dev by bob: too loud"
    bob.send("/kick #other dave")
    assert bob.expect("!! ") == "!! You are not in #other."
    join(bob, "other")
    bob.send("/kick dave")
    assert bob.expect("!! ") == "!! Only operators of #other may do that.", "ops of #dev do not run #other"
    bob.send("/mute dave")
    assert bob.expect("!! ") == "!! /mute: not allowed; only operators may use it."
    make_operator(carol)
    join(carol, "dev")
    alice.send("/kick carol")
    assert alice.expect("!! ") == "!! carol is a server operator; a room operator cannot kick them."
    carol.send("/kick #other dave")
    assert carol.expect("!! ") == "!! You are not in #other."
    join(carol, "other")
    carol.send("/kick dave bye")
    assert carol.expect("-- ") == "-- Kicked dave.", "a server operator runs every room"
    alice.send("/mode deop bob")
    assert bob.expect(r"#dev \*\*\* alice") == "#dev *** alice took operator status in #dev from bob"
    alice.send("/mode topic everyone")
    assert alice.expect(r"\*\*\* alice let") == "*** alice let everyone in #dev set its topic"
    bob.send("/topic #dev bob may")
    assert alice.expect(r"\*\*\* bob") == "*** bob set the topic of #dev: bob may"


def test_a_server_operator_may_join_a_private_room(op_server, connect):
    alice, bob = connect(op_server, "alice"), connect(op_server, "bob")
    join(alice, "locked")
    alice.send("/mode invite-only on")
    alice.expect(r"\*\*\* alice made")
    make_operator(bob)
    assert join(bob, "locked")[-1] == "*** You are in #locked with alice."


def test_the_lobby_cannot_be_made_private(op_server, connect):
    alice = connect(op_server, "alice")
    make_operator(alice)
    alice.send("/mode key x")
    assert alice.expect("!! ") == "!! #lobby is open to everyone; it cannot be made private."


# -- about a person: once per receiver -----------------------------------------------------------------

def test_nick_away_and_quit_are_told_once_to_someone_who_shares_two_rooms(chat):
    alice, bob, carol = chat("alice", "bob", "carol")
    for room in ("dev", "ops"):
        join(alice, room)
        join(bob, room)
    bob.send("/nick robert")
    bob.send("/away lunch")
    bob.send("/back")
    bob.send("/quit gone")
    alice.expect(r"\*\*\* robert quit")
    carol.expect(r"\*\*\* robert quit")
    for reader in (alice, carol):
        about = [line for line in reader.seen if re.match(r"(#\S+ )?\*\*\* (bob|robert) (is |quit)", line)]
        assert about == ["*** bob is now known as robert", "*** robert is away (lunch)", "*** robert is back",
                         "*** robert quit (gone)"], about


# -- muted ----------------------------------------------------------------------------------------------

def test_a_muted_person_can_put_no_words_in_front_of_others(op_server, connect):
    alice = connect(op_server, "alice")
    bob = ClientFrom(op_server.host, op_server.port, "127.0.0.2")      # a guest, muted by their address
    bob.login("bob")
    make_operator(alice)
    join(bob, "shop")
    alice.send("/mute bob")
    bob.expect(r"\*\*\* You were muted")
    bob.send("/nick BUY_CHEAP_PILLS")
    assert bob.expect("!! ") == "!! You are muted; you cannot change your nickname."
    join(bob, "BUY_PILLS_NOW")
    bob.send("/leave shop")
    bob.send("/away BUY PILLS")
    bob.send("/topic BUY PILLS")
    assert bob.expect("!! ") == "!! You are muted; you cannot run a room."
    bob.send("/invite alice")
    assert bob.expect("!! ") == "!! You are muted; you cannot invite anyone."
    bob.send("/msg #lobby BUY PILLS")
    assert bob.expect("!! ") == "!! You are muted; the room does not hear you."
    bob.send("/msg alice a private word still works")
    alice.expect(r"\[pm from bob\]")
    bob.send("/quit BUY PILLS")
    assert alice.expect(r"\*\*\* bob") == "*** bob quit"
    assert not [line for line in alice.seen if "PILLS" in line], alice.seen
    bob.close()


@pytest.mark.parametrize("mode, made", [("ban bob", r"\*\*\* alice banned bob"), ("moderated on", r"\*\*\* alice made")])
def test_whoever_cannot_talk_in_a_room_cannot_set_its_topic_either_when_everyone_may(chat, mode, made):
    alice, bob = chat("alice", "bob")
    join(alice, "dev")
    join(bob, "dev")
    alice.send("/mode topic everyone")
    bob.expect(r"\*\*\* alice let everyone")
    alice.send(f"/mode {mode}")
    bob.expect(made)
    bob.send("/topic THIS ROOM IS DEAD, come to spam.example")
    assert bob.expect(r"(#\S+ )?(\*\*\* bob |!! )").startswith("!! "), f"bob set the topic: {shown(bob.seen)}"
    alice.send("/topic")
    assert "spam.example" not in alice.expect(r"-- |\*\*\* ")
