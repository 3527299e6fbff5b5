"""One person, several sessions: an account signed in from several connections (pyChat and IRC) at once is
one member, whose rooms and read positions last, and who is shown exactly what they missed."""
from __future__ import annotations

import re

import pytest

from conftest import LineClient, memory_kib, shown
from test_accounts import PASSWORD, password_prompt, register, sign_in
from test_irc import sasl
from test_rooms import join


@pytest.fixture
def data(tmp_path):
    return tmp_path / "data"


def second_session(connect, server, nick: str = "alice") -> tuple[LineClient, list[str]]:
    """Another connection signed in to NICK's account; it and the lines up to its current room's entry."""
    client = connect(server)
    lines = sign_in(client, nick)
    return client, lines


def quiet(client: LineClient, marker_from: LineClient, text: str) -> list[str]:
    """Everything CLIENT reads until MARKER_FROM's line TEXT arrives: what else it was sent meanwhile."""
    marker_from.send(text)
    return client.lines_until(rf"(#\S+ )?{marker_from.nick}: {re.escape(text)}$")[:-1]


def test_many_sign_ins_at_once_leave_no_password_hash_s_memory_behind(start_server, connect):
    """Each check of a password takes 16 MiB for a moment. Eight sign-ins (fewer than the tries at once that
    one address is allowed), each waiting on a worker thread of its own for its password, then all given
    it at once, must not leave the server 16 MiB bigger for every thread that checked one (the
    allocator's heaps keep what they are given back)."""
    server = start_server()
    for nick in ("alice", "bob"):
        register(connect(server, nick))
    before = memory_kib(server.process.pid)
    waiting = []
    for n in range(8):
        client = connect(server)
        nick = ("alice", "bob")[n % 2]
        client.expect(re.escape("*** Choose a nickname:"))
        client.send(nick)
        client.expect(password_prompt(nick))
        waiting.append(client)
    for client in waiting:
        client.send(PASSWORD)
    for client in waiting:
        assert client.expect(r"\*\*\* Welcome, |!! ", timeout=20).startswith("*** Welcome, ")
    grown = memory_kib(server.process.pid) - before
    assert grown < 40 * 1024, f"the server grew by {grown} KiB after 8 password checks"


def test_a_second_sign_in_is_one_more_session_of_one_person(start_server, connect, data):
    server = start_server("--data-dir", str(data))
    laptop = connect(server, "alice")
    register(laptop)
    bob = connect(server, "bob")
    laptop.expect(r"\*\*\* bob joined #lobby")
    phone, lines = second_session(connect, server)
    assert lines[0] == "*** Welcome, alice! Type /help for the commands.", shown(lines)
    assert lines[-1] == "*** You are in #lobby with bob.", shown(lines)
    laptop.expect(re.escape("*** You are also signed in from pyChat at 127.0.0.1 (2 sessions)."))
    phone.send("said from the phone")
    laptop.expect("alice: said from the phone")
    phone.expect("alice: said from the phone")
    assert quiet(bob, laptop, "said from the laptop") == ["alice: said from the phone"], \
        "bob was told something of the second session"
    bob.send("/whois alice")
    assert bob.expect("-- alice: signed in") and bob.expect("-- alice: connected") == \
        "-- alice: connected with pyChat (2 sessions)"
    bob.expect("-- alice: in #lobby")
    laptop.send("/sessions")
    assert laptop.expect("-- 1: ").endswith("(this one)")
    assert laptop.expect("-- 2: ").startswith("-- 2: pyChat from 127.0.0.1, since ")
    laptop.send("/kick-session 2")
    assert phone.wait_closed()[-1] == "*** You were disconnected by alice: ended from another session."
    # The reply and the news of the end come from different threads, in either order.
    told = {laptop.expect(r"-- Ended |\*\*\* Your session ") for _ in range(2)}
    assert told == {"-- Ended session 2 (pyChat at 127.0.0.1).",
                    "*** Your session from pyChat at 127.0.0.1 ended (ended from session 1); 1 left."}, told
    assert quiet(bob, laptop, "still here") == [], "bob saw the session end as a quit"
    laptop.send("/quit")
    assert bob.expect(r"\*\*\* alice") == "*** alice quit"


def test_rooms_and_private_messages_are_the_person_s_and_the_current_room_the_session_s(start_server, connect):
    server = start_server()
    laptop = connect(server, "alice")
    register(laptop)
    phone, _ = second_session(connect, server)
    bob = connect(server, "bob")
    join(laptop, "dev")
    assert phone.expect(r"#dev \*\*\* You are in #dev") == "#dev *** You are in #dev, alone for now."
    join(bob, "dev")
    phone.send("still in the lobby")
    assert bob.expect(r"(#\S+ )?alice: still") == "#lobby alice: still in the lobby"
    bob.send("/msg alice psst")
    laptop.expect(re.escape("[pm from bob] psst"))
    phone.expect(re.escape("[pm from bob] psst"))
    phone.send("/msg bob yes?")
    laptop.expect(re.escape("[pm to bob] yes?"))
    bob.expect(re.escape("[pm from alice] yes?"))
    phone.send("/leave dev")
    phone.expect(re.escape("*** You left #dev."))
    assert laptop.lines_until(r"\*\*\* Now talking in")[-2:] == ["*** You left #dev.", "*** Now talking in #lobby."]
    assert bob.expect(r"\*\*\* alice") == "*** alice left #dev"
    phone.send("/nick ally")
    laptop.expect(re.escape("*** alice is now known as ally"))
    bob.expect(re.escape("*** alice is now known as ally"))


def test_an_irc_session_on_the_same_account_sees_the_lines_of_the_pychat_one(start_server, connect, irc_connect):
    server = start_server("--irc-port", "0", "--guess-delay", "0.05")
    laptop = connect(server, "alice")
    register(laptop)
    join(laptop, "dev")
    phone = irc_connect(server)
    lines = sasl(phone, "alice", "alice", PASSWORD)
    assert any(" 903 " in line for line in lines), shown(lines)
    phone.expect(r"366 alice #lobby ")
    phone.expect(r"366 alice #dev ")
    laptop.send("from the laptop")
    phone.expect(r"PRIVMSG #dev :from the laptop")
    phone.send("PRIVMSG #lobby :from weechat")
    laptop.expect("#lobby alice: from weechat")
    phone.send("PRIVMSG bob :nobody")       # bob is offline and a guest: refused, and only to the phone
    phone.expect(r"401 alice bob ")


def test_catch_up_shows_exactly_what_was_missed_across_restarts_and_never_twice(start_server, connect, data):
    options = ("--data-dir", str(data), "--history", "5")
    server = start_server(*options)
    alice = connect(server, "alice")
    register(alice)
    bob = connect(server, "bob")
    register(bob, "a long pass phrase 7")
    join(alice, "dev")
    join(alice, "ops")
    join(bob, "dev")
    alice.send("/quit")
    alice.wait_closed()
    bob.send("/join ops")
    for number in range(3):
        bob.send(f"/msg #dev dev line {number}")
    bob.send("/msg #ops ops line")
    bob.send("/msg alice are you there?")
    bob.expect(r"-- alice is offline")
    server.stop()
    server = start_server(*options)         # the first restart: alice comes back to what she missed
    alice = connect(server)
    lines = sign_in(alice, "alice") + alice.lines_until(r"\*\*\* End of history with bob\.")
    # The rooms come back in the order last used; all but the last come tagged, not current.
    text = "\n".join(re.sub(r"^#\S+ ", "", line) for line in lines)
    assert re.search(r"\*\*\* You are in #dev, alone for now\.\n\*\*\* 3 new in #dev since \S+Z\n"
                     r"\[history \S+\] bob: dev line 0\n\[history \S+\] bob: dev line 1\n"
                     r"\[history \S+\] bob: dev line 2\n\*\*\* End of #dev history\.", text), text
    assert re.search(r"\*\*\* You are in #ops, alone for now\.\n\*\*\* 1 new in #ops since \S+Z\n"
                     r"\[history \S+\] bob: ops line\n\*\*\* End of #ops history\.", text), text
    assert re.search(r"\*\*\* 1 new with bob since \S+Z\n\[history \S+\] \[pm from bob\] are you there\?\n"
                     r"\*\*\* End of history with bob\.", text), text
    assert "new in #lobby" not in text, "the lobby, where nothing was said, showed something new"
    # A client that never says what its person read is taken to have shown all it was sent.
    alice.send("/quit")
    alice.wait_closed()
    server.stop()
    server = start_server(*options)         # the second restart: nothing is shown again
    alice = connect(server)
    lines = sign_in(alice, "alice")
    alice.send("/msg #ops marker")
    lines += alice.lines_until("#ops alice: marker|alice: marker")
    assert not [line for line in lines if "new" in line or line.startswith("[history")], shown(lines)


def test_a_client_that_reports_reading_is_caught_up_from_what_it_read(start_server, connect):
    server = start_server("--history", "5")
    alice = connect(server, "alice")
    register(alice)
    bob = connect(server, "bob")
    bob.send("one")
    alice.expect("bob: one")
    alice.send("/read")
    alice.expect(re.escape("[read #lobby]"))        # every session is told, the one that read too
    bob.send("two")
    alice.expect("bob: two")
    phone, lines = second_session(connect, server)
    lines += phone.lines_until(r"\*\*\* End of #lobby history\.")
    caught_up = [line for line in lines if " new in " in line or line.startswith("[history")]
    assert len(caught_up) == 2 and caught_up[0].startswith("*** 1 new in #lobby since ") and \
        caught_up[1].endswith("] bob: two"), shown(lines)
    phone.send("/read")
    alice.expect(re.escape("[read #lobby]"))
    phone.expect(re.escape("[read #lobby]"))


def test_history_pages_back_from_the_oldest_line_shown(start_server, connect):
    server = start_server("--history", "3")
    bob = connect(server, "bob")
    for number in range(12):
        bob.send(f"line {number}")
    bob.expect("bob: line 11")
    alice = connect(server)
    alice.login("alice")
    alice.expect(r"\*\*\* End of #lobby history\.")
    alice.send("/history 4")
    page = alice.lines_until(r"\*\*\* End of #lobby history\.")
    assert [line.split("] ", 1)[-1] for line in page] == [
        "*** 4 earlier lines of #lobby:", "bob: line 5", "bob: line 6", "bob: line 7", "bob: line 8",
        "*** End of #lobby history."], shown(page)
    alice.send("/history #lobby 10")
    page = alice.lines_until(r"\*\*\* End of #lobby history\.")
    assert page[0] == "*** 5 earlier lines of #lobby:" and page[-2].endswith("bob: line 4"), shown(page)
    alice.send("/history")
    assert alice.expect("-- |!! ") == "-- Nothing earlier is kept."


def test_a_guest_cannot_page_through_an_account_s_private_conversation(start_server, connect):
    server = start_server()
    alice = connect(server, "alice")
    register(alice)
    carol = connect(server, "carol")
    register(carol, "a long pass phrase 7")
    alice.send("/msg carol a secret")
    carol.expect(re.escape("[pm from alice] a secret"))
    alice.send("/quit")
    alice.wait_closed()
    mallory = connect(server, "mallory")
    mallory.send("/history alice")
    assert mallory.expect("-- |!! ") == "-- Nothing earlier is kept for alice."
    mallory.send("/history carol")
    assert mallory.expect("-- |!! ") == "-- Nothing earlier is kept for carol."


def test_an_account_has_at_most_ten_sessions(start_server, connect):
    server = start_server("--max-per-ip", "0")
    first = connect(server, "alice")
    register(first)
    for _ in range(9):
        second_session(connect, server)
    extra = connect(server)
    extra.expect(re.escape("*** Choose a nickname:"))
    extra.send("alice")
    extra.expect(re.escape("*** Password for alice:"))
    extra.send(PASSWORD)
    assert extra.expect("!! ") == ("!! alice is signed in on 10 sessions, the most; /sessions on one of them "
                                   "lists them, and /kick-session ends one.")


def entered_rooms(client: LineClient) -> list[str]:
    """The rooms CLIENT, just signed in, was put in, in order (tagged but the last, which is current): up to
    its own line said as a marker."""
    client.send("here")
    client.lines_until(rf"(#\S+ )?{client.nick}: here$")
    return [match.group(1) for match in (re.match(r"(?:#\S+ )?\*\*\* You are in #(\w+)", line)
                                         for line in client.seen) if match]


def test_kept_rooms_come_back_with_their_key_but_not_those_left_or_kicked_from(start_server, connect, data):
    options = ("--data-dir", str(data))
    server = start_server(*options)
    alice = connect(server, "alice")
    register(alice)
    bob = connect(server, "bob")
    join(bob, "ops")                        # bob runs #ops
    join(alice, "secret", "sesame")         # alice opens #secret with a key
    join(alice, "dev")
    join(alice, "ops")
    alice.send("/leave dev")
    alice.expect(re.escape("*** You left #dev."))
    bob.send("/kick alice enough")
    alice.expect(re.escape("*** You were kicked from #ops by bob: enough."))
    join(bob, "secret", "sesame")
    alice.send("/quit")
    alice.wait_closed()
    alice = connect(server)
    sign_in(alice, "alice")
    assert entered_rooms(alice) == ["lobby", "secret"], shown(alice.seen)
    bob.send("/quit")
    bob.wait_closed()
    for _ in range(2):
        server.stop()
        server = start_server(*options)
        alice = connect(server)
        sign_in(alice, "alice")
        assert entered_rooms(alice) == ["lobby", "secret"], shown(alice.seen)
        carol = connect(server, "carol")
        carol.send("/join #secret")
        assert carol.expect("!! ") == "!! #secret needs a key: /join #secret KEY.", "the kept key was lost"
        carol.close()


def test_a_name_left_by_a_closed_connection_is_free_at_once_for_the_next(start_server, connect):
    """A client that reconnects at once after its connection closed (irctest's next test, a phone changing
    networks) gets its name, even before the server has read the old connection's end."""
    server = start_server("--max-per-ip", "0")
    for attempt in range(20):
        old = connect(server, "again")
        old.close()
        new = connect(server)
        new.expect(re.escape("*** Choose a nickname:"))
        new.send("again")
        assert new.expect(r"\*\*\* Welcome|!! ") == "*** Welcome, again! Type /help for the commands.", attempt
        new.close()


# -- a kept room lets no one back in whom /join would turn away ------------------------------------------------

def leave_signed_in_to_dev(server, connect) -> LineClient:
    """alice (an account) and bob in #dev, which bob opened and runs; alice then quits: #dev is kept for her.
    Returns bob."""
    alice = connect(server, "alice")
    register(alice)
    bob = connect(server, "bob")
    join(bob, "dev")
    join(alice, "dev")
    alice.send("/quit")
    alice.wait_closed()
    bob.expect(r"\*\*\* alice quit")
    return bob


def come_back(server, connect) -> LineClient:
    """alice signs in again; her kept rooms may not all take her, so no one line ends it but the welcome."""
    alice = connect(server)
    alice.expect(re.escape("*** Choose a nickname:"))
    alice.send("alice")
    alice.expect(password_prompt("alice"))
    alice.send(PASSWORD)
    alice.expect(r"\*\*\* Welcome, alice")
    alice.nick = "alice"
    return alice


@pytest.mark.parametrize("mode, made, told", [
    ("ban alice", "*** bob banned alice!*@* from #dev", "*** You are banned from #dev."),
    ("invite-only on", "*** bob made #dev invite-only", "*** #dev is invite-only; one of its operators can /invite you."),
    ("limit 1", "*** bob set the limit of #dev to 1", "*** #dev is full: it takes 1 people; one of its operators can "
                                                       "/invite you."),
])
def test_a_room_kept_for_an_account_is_not_entered_past_a_rule_made_while_its_owner_was_away(
        start_server, connect, tmp_path, mode, made, told):
    server = start_server("--data-dir", str(tmp_path / "data"))
    bob = leave_signed_in_to_dev(server, connect)
    bob.send(f"/mode {mode}")
    bob.expect(re.escape(made))
    alice = come_back(server, connect)
    assert entered_rooms(alice) == ["lobby"], f"alice was put back in #dev: {shown(alice.seen)}"
    assert told in alice.seen, shown(alice.seen)
    alice.send("/quit")
    alice.wait_closed()
    alice = come_back(server, connect)      # and the room is no longer kept for her
    assert entered_rooms(alice) == ["lobby"] and told not in alice.seen and entered_rooms(alice) == ["lobby"], shown(alice.seen)


def test_after_a_restart_an_account_banned_from_a_kept_room_neither_opens_nor_runs_it(start_server, connect, tmp_path):
    options = ("--data-dir", str(tmp_path / "data"))
    server = start_server(*options)
    bob = leave_signed_in_to_dev(server, connect)
    bob.send("/mode ban alice")
    bob.expect(re.escape("*** bob banned alice!*@* from #dev"))     # a public room's ban lasts across restarts
    server.stop()
    server = start_server(*options)
    alice = come_back(server, connect)
    assert entered_rooms(alice) == ["lobby"], f"alice reopened #dev, whose ban outlasted it: {shown(alice.seen)}"
    alice.send("/mode unban alice!*@* #dev")
    assert alice.expect(r"(#\S+ )?(\*\*\* alice lifted|!! )").startswith("!! "), shown(alice.seen)


# -- what /ignore hides live stays hidden when caught up -----------------------------------------------------

def signed_in_again(server, connect) -> list[str]:
    """alice on another device: every line she is shown up to her own marker."""
    phone = connect(server)
    lines = sign_in(phone, "alice")
    phone.send("/msg alice marker")
    return lines + phone.lines_until(re.escape("[pm from alice] marker"))


@pytest.mark.parametrize("bob_has_an_account", [True, False])
def test_lines_of_someone_ignored_are_not_caught_up_on_another_device_or_at_the_next_sign_in(
        start_server, connect, tmp_path, bob_has_an_account):
    server = start_server("--data-dir", str(tmp_path / "data"))
    alice = connect(server, "alice")
    register(alice)
    bob = connect(server, "bob")
    if bob_has_an_account:
        register(bob, "a long pass phrase 7")
    alice.send("/ignore bob")
    alice.expect("-- You now ignore bob")
    bob.send("/msg alice buy my stuff")
    bob.expect(re.escape("[pm to alice] buy my stuff"))
    bob.send("buy my stuff in the lobby")
    bob.expect("bob: buy my stuff in the lobby")
    lines = signed_in_again(server, connect)
    assert not [line for line in lines if "buy my stuff" in line], f"alice's other device: {shown(lines)}"
    alice.send("/quit")
    alice.wait_closed()
    lines = signed_in_again(server, connect)
    assert not [line for line in lines if "buy my stuff" in line], f"alice's next sign-in: {shown(lines)}"


# -- /history pages back after a restart ---------------------------------------------------------------------

@pytest.mark.parametrize("room", ["dev", "lobby"])
def test_history_pages_back_after_a_restart_where_nothing_was_new(start_server, connect, tmp_path, room):
    options = ("--data-dir", str(tmp_path / "data"))
    server = start_server(*options)
    alice = connect(server, "alice")
    register(alice)
    join(alice, room)
    for number in range(3):
        alice.send(f"line {number}")
    alice.expect("alice: line 2")
    alice.send("/quit")
    alice.wait_closed()
    server.stop()
    server = start_server(*options)
    alice = connect(server)
    lines = sign_in(alice, "alice")
    assert not [line for line in lines if " new in #" in line], shown(lines)       # she had read it all
    alice.send(f"/history #{room}")
    answer = alice.expect(r"(#\S+ )?(\*\*\* \d+ earlier lines|-- |!! )")
    assert f"earlier lines of #{room}" in answer, f"/history found none of the 3 kept lines: {answer!r}"
