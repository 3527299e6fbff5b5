"""The client with several sessions of one account (issue 19): rooms entered and left on another
session, read positions (what the person has seen, told to the server with /read; "[read #dev]"
from another session), focus reports, the catch-up at sign-in and /history.

The pure parts are called directly; the client in a pseudo-terminal plays against a scripted server
on a real socket (what the client sends) and against the real server (end to end).
"""
from __future__ import annotations

import datetime
import re

import pytest

from conftest import LineClient
from test_client_accounts import ACCOUNT_VARIABLE, PASSWORD, registered
from test_client_editor import load_client
from test_client_terminal import fake_server, run_client  # noqa: F401 (fixtures)

pychat = load_client()

ALT = "\x1b"
CTRL_U = "\x15"
FOCUS_IN, FOCUS_OUT = "\x1b[I", "\x1b[O"
NOT_SENT_BY_ITSELF = r"(?!/online|/read)"   # a line the person typed, not one the client sends


def follow(rooms, *lines: str, me: str = "alice") -> None:
    for line in lines:
        message = pychat.classify(line)
        rooms.learn(message, pychat.mentions(message, me), me)


def names(keys) -> list[str]:
    return [key.text if key.name == "text" else key.name for key in keys]


# -- the parser and the rooms ------------------------------------------------------------

def test_a_read_marker_is_a_line_kind_of_its_own_naming_a_room_or_a_person():
    assert [(m.kind, m.body) for m in map(pychat.classify, ("[read #dev]", "[read bob]"))] == \
        [("read", "#dev"), ("read", "bob")]
    assert pychat.classify("bob: [read #dev]").kind == "chat"
    assert pychat.classify("[read #dev] and more").kind != "read"


def test_a_room_entered_or_left_on_another_session_changes_my_rooms_but_not_the_current_one():
    rooms = pychat.Rooms()
    follow(rooms, "*** You are in #lobby, alone for now.", "#dev *** You are in #dev with bob, carol.",
           "#ops *** You are in #ops, alone for now.")
    assert (rooms.joined, rooms.current) == (["lobby", "dev", "ops"], "lobby")
    follow(rooms, "#dev *** You left #dev.", "#ops *** You were kicked from #ops by carol.")
    assert (rooms.joined, rooms.current) == (["lobby"], "lobby")
    follow(rooms, "*** You are in #dev with bob.")      # untagged: this session entered it
    assert (rooms.joined, rooms.current) == (["lobby", "dev"], "dev")
    follow(rooms, "*** You left #dev.", "*** Now talking in #lobby.")
    assert (rooms.joined, rooms.current) == (["lobby"], "lobby")


def test_a_read_marker_clears_the_rooms_unread_count_and_its_mention():
    rooms = pychat.Rooms()
    follow(rooms, "*** You are in #dev.", "*** You are in #ops.", "*** You are in #lobby.",
           "#dev bob: alice, look", "#dev bob: two", "#ops carol: three",
           "#dev [history 2026-12-06T18:02:11Z] bob: history is not unread")
    assert rooms.activity() == [("dev", 2, True), ("ops", 1, False)]
    follow(rooms, "[read #DEV]", "[read bob]")
    assert rooms.activity() == [("ops", 1, False)]


# -- who is at the terminal, and what to report read -----------------------------------------

def test_presence_is_typing_in_the_last_five_minutes_until_the_terminal_reports_focus():
    presence = pychat.Presence(now=1000.0)
    assert presence.at_terminal(1299.0) and not presence.at_terminal(1300.0)   # starting counts as typing
    assert presence.typed(2000.0) is True           # back after being away
    assert presence.typed(2001.0) is False
    assert presence.focus_changed(False, 2002.0) is False
    assert not presence.at_terminal(2003.0)         # once reported, the focus decides
    assert presence.typed(2004.0) is False and not presence.at_terminal(2004.0)
    assert presence.focus_changed(True, 2005.0) is True
    assert presence.at_terminal(9999.0)
    assert presence.focus_changed(True, 9999.0) is False


def test_a_target_is_reported_at_most_every_two_seconds_and_only_with_something_new():
    reads = pychat.ReadReports()
    assert reads.next_due() is None
    reads.shown("#dev", True, True)
    assert reads.ready(100.0) == ["#dev"]
    reads.reported("#dev", 100.0)
    reads.shown("#dev", True, True)
    reads.shown("bob", True, True)
    assert reads.ready(101.0) == ["bob"]
    reads.reported("bob", 101.0)
    assert reads.next_due() == 102.0 and reads.ready(101.9) == []
    assert reads.ready(102.0) == ["#dev"]
    reads.reported("#dev", 102.0)
    reads.switched("#dev", True)                    # nothing new since the last report
    reads.shown("#dev", False, True)                # a line of #dev while it is not current: not read...
    assert reads.next_due() is None
    reads.switched("#DEV", True)                    # ...until switching there
    assert reads.ready(200.0) == ["#DEV"]


def test_what_was_shown_while_away_is_read_when_the_person_comes_back_in_the_current_room_and_privately():
    reads = pychat.ReadReports()
    for target in ("#ops", "bob", "#dev"):          # #ops was current when its line came
        reads.shown(target, True, False)
    reads.switched("#dev", False)
    assert reads.next_due() is None
    reads.came_back("#Dev")
    assert sorted(reads.ready(0.0)) == ["#dev", "bob"]
    reads.forget()
    assert reads.next_due() is None


def test_a_line_shown_and_not_read_withdraws_a_report_still_waiting_which_would_take_it_along():
    reads = pychat.ReadReports()
    reads.shown("#dev", True, True)
    reads.reported("#dev", 100.0)
    reads.shown("#dev", True, True)                 # due at 102...
    reads.shown("#dev", True, False)                # ...but this one came while the person was away
    assert reads.next_due() is None
    reads.came_back("#dev")
    assert reads.ready(102.0) == ["#dev"]
    reads.reported("#dev", 102.0)
    reads.shown("#dev", True, True)
    reads.shown("#dev", False, True)                # after switching away: counted unread, not read
    assert reads.next_due() is None


def test_a_room_left_is_reported_no_more():
    reads = pychat.ReadReports()
    reads.shown("#dev", True, True)
    reads.reported("#dev", 100.0)
    reads.shown("#dev", True, True)
    reads.drop("#Dev")
    reads.switched("#dev", True)
    assert reads.next_due() is None


def test_focus_reports_are_keys_never_text_even_split_across_reads():
    decoder = pychat.KeyDecoder()
    assert names(decoder.feed(b"a\x1b[Ib\x1b[O")) == ["a", "focus-in", "b", "focus-out"]
    assert names(decoder.feed(b"\x1b") + decoder.feed(b"[") + decoder.feed(b"I")) == ["focus-in"]
    assert names(decoder.feed(b"\x1bOI\x1b[1;5I")) == []     # keypad and modified keys are not focus


def test_focus_reports_are_on_unless_the_option_or_the_settings_file_says_no(tmp_path):
    nowhere = {"XDG_CONFIG_HOME": str(tmp_path / "nowhere")}
    assert pychat.parse_options([], nowhere).focus_report is True
    assert pychat.parse_options(["--no-focus-report"], nowhere).focus_report is False
    (tmp_path / "pychat").mkdir()
    (tmp_path / "pychat" / "config").write_text("[pychat]\nfocus_report = no\n")
    environment = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert pychat.parse_options([], environment).focus_report is False
    assert pychat.parse_options(["--focus-report"], environment).focus_report is True


# -- rendering the catch-up and history ---------------------------------------------------------

def plain(line: str) -> str:
    now = datetime.datetime(2026, 12, 7, 9, 0, 0)
    return pychat.render(pychat.classify(line), pychat.Painter(colour=False), "alice", now=now).plain


def local(text: str, style: str) -> str:
    return pychat.utc_time(text).astimezone().strftime(style)


def test_the_catch_up_header_and_history_lines_are_shown_in_local_time():
    since = "2026-12-06T18:02:11Z"
    assert plain(f"*** 37 new in #dev since {since}") == \
        f"[09:00:00] *** 37 new in #dev since {local(since, '%Y-%m-%d %H:%M')}"
    assert plain(f"*** 250 new in #dev since {since}; the latest 200 follow (/history #dev for earlier ones).") \
        == f"[09:00:00] *** 250 new in #dev since {local(since, '%Y-%m-%d %H:%M')}; the latest 200 follow " \
           "(/history #dev for earlier ones)."
    assert plain(f"*** 3 new with bob since {since}").endswith(f"with bob since {local(since, '%Y-%m-%d %H:%M')}")
    assert plain(f"#dev [history {since}] * bob waves") == f"[{local(since, '%H:%M:%S')}] #dev * bob waves"


def test_a_private_message_in_history_is_labelled_as_a_live_one_and_wraps_under_its_text():
    painter = pychat.Painter(colour=True)
    message = pychat.classify("[history 2026-12-06T18:02:11Z] [pm from bob] call me " + "soon " * 20)
    rendered = pychat.render(message, painter, "alice")
    assert [(span.text, span.style) for span in rendered.spans[2:4]] == [("[pm from bob]", "private"), (" ", "")]
    rows = pychat.layout(rendered, 60, pychat.Painter(colour=False))
    assert len(rows) > 1 and all(row.startswith(" " * len("[18:02:11] [pm from bob] ")) for row in rows[1:]), rows
    outgoing = pychat.classify("[history 2026-12-06T18:02:11Z] [pm to bob] ok")
    assert plain(outgoing.text).endswith("] [pm to bob] ok")


# -- the client in a terminal, against a scripted server -----------------------------------------

def signed_in_to(fake_server, run_client, *args: str, env: dict | None = None, **options):
    """alice, signed in to her account on the scripted server, in #lobby."""
    alice = run_client(fake_server, "--nick", "alice", *args,
                       env={"PYCHAT_ACCOUNT_PASSWORD": "s3cret-enough", **(env or {})}, **options)
    fake_server.accept()
    fake_server.send("*** pyChat 3.0.0: 1 online.", "*** Choose a nickname:")
    fake_server.expect(r"alice$")
    fake_server.send("*** Password for alice:")
    fake_server.expect(r"s3cret-enough$")
    fake_server.send("*** Welcome, alice! Type /help for the commands.", "*** You are in #lobby, alone for now.")
    alice.wait_for_input_line("alice #lobby> ")
    return alice


def test_a_room_entered_on_another_session_is_added_without_switching(fake_server, run_client):
    alice = signed_in_to(fake_server, run_client)
    fake_server.send("#dev *** You are in #dev with bob, carol.",
                     "#dev [history 2026-12-06T18:02:11Z] bob: earlier", "#dev *** End of #dev history.",
                     "#dev bob: now")
    alice.wait_for_row(r"\] #dev bob: now$")
    alice.wait_for_input_line("[#dev 1] alice #lobby> ")     # the history line is not unread
    alice.type(ALT + "2")
    fake_server.expect(r"/join #dev$")
    fake_server.send("#dev *** You left #dev.", "bob: in the lobby")
    alice.wait_for_row(r"\] bob: in the lobby$")
    alice.wait_for_input_line("alice #lobby> ")
    alice.type(ALT + "2" + "said\r")                          # no second room any more: nothing to switch to
    assert fake_server.expect(NOT_SENT_BY_ITSELF) == "said"


def test_a_read_marker_clears_the_unread_count_and_is_never_shown(fake_server, run_client):
    alice = signed_in_to(fake_server, run_client)
    fake_server.send("*** You are in #dev with bob.", "*** Now talking in #lobby.",
                     "#dev bob: alice, look", "#dev bob: two")
    alice.wait_for_input_line("[#dev 2!] alice #lobby> ")
    fake_server.send("[read #dev]", "[read bob]", "bob: after")
    alice.wait_for_row(r"\] bob: after$")
    alice.wait_for_input_line("alice #lobby> ")
    assert b"[read" not in alice.output


def test_focus_reports_are_consumed_and_only_lines_shown_with_the_focus_are_reported_read(fake_server,
                                                                                          run_client):
    alice = signed_in_to(fake_server, run_client)
    assert "?1004" in alice.screen.modes
    alice.type(FOCUS_IN + "ab" + FOCUS_OUT + FOCUS_IN + "c")
    alice.wait_for_input_line("alice #lobby> abc")
    fake_server.send("bob: seen")
    assert fake_server.expect(r"/read") == "/read #lobby"
    alice.type(FOCUS_OUT + CTRL_U)                      # the cleared line shows the blur was read
    alice.wait_for_input_line("alice #lobby> ")
    fake_server.send("[pm from carol] psst", "bob: unseen")
    alice.wait_for_row(r"\] bob: unseen$")
    alice.type("marker\r")
    assert fake_server.expect(r"(?!/online)") == "marker", "something was reported read while blurred"
    alice.type(FOCUS_IN)                                 # back: what came meanwhile is read now
    assert sorted(fake_server.expect(r"/read") for _ in range(2)) == ["/read #lobby", "/read carol"]
    alice.type("/quit\r")
    fake_server.expect(r"/quit$")
    fake_server.send("*** Bye.")
    fake_server.hang_up()
    assert alice.wait_exit() == 0
    assert "?1004" not in alice.screen.modes


def test_no_focus_report_leaves_the_terminal_alone_and_typing_counts_as_presence(fake_server, run_client):
    alice = signed_in_to(fake_server, run_client, "--no-focus-report")
    assert b"?1004" not in alice.output
    fake_server.send("bob: seen")                        # just started: the person is there
    assert fake_server.expect(r"/read") == "/read #lobby"


def test_a_guest_reports_nothing_read_until_registered(fake_server, run_client):
    alice = run_client(fake_server, "--nick", "alice")
    fake_server.sign_in("alice")
    fake_server.send("bob: one", "[pm from bob] two")
    alice.wait_for_row(r"\] \[pm from bob\] two$")
    alice.type("/register s3cret-enough\r")
    assert fake_server.expect(r"(?!/online)") == "/register s3cret-enough"
    fake_server.send("-- Registered alice. From now on, signing in as alice asks for this password.", "bob: three")
    assert fake_server.expect(r"(?!/online)") == "/read #lobby"


def test_a_name_whose_password_was_not_given_signs_in_as_a_guest_who_reports_nothing(fake_server, run_client):
    alice = run_client(fake_server, "--nick", "alice")
    fake_server.accept()
    fake_server.send("*** pyChat 3.0.0: 1 online.", "*** Choose a nickname:")
    fake_server.expect(r"alice$")
    fake_server.send("*** Password for alice:")
    alice.wait_for_input_line("password for alice: ")
    alice.type("\r")                                      # no password: back to choosing a name
    assert fake_server.expect(r".*") == ""
    fake_server.send("*** Choose a nickname:")
    alice.wait_for_input_line("nickname: ")
    alice.type("alice2\r")
    fake_server.expect(r"alice2$")
    fake_server.send("*** Welcome, alice2! Type /help for the commands.", "*** You are in #lobby, alone for now.",
                     "bob: hi")
    alice.wait_for_row(r"\] bob: hi$")
    alice.type("marker\r")
    assert fake_server.expect(r"(?!/online)") == "marker"


def test_a_server_without_read_positions_is_asked_once_and_its_refusal_not_shown(fake_server, run_client):
    alice = signed_in_to(fake_server, run_client)
    fake_server.send("bob: one")
    assert fake_server.expect(r"/read") == "/read #lobby"
    fake_server.send("!! Unknown command /read. Type /help for the list.", "[pm from bob] two")
    alice.wait_for_row(r"\] \[pm from bob\] two$")
    alice.type("marker\r")
    assert fake_server.expect(r"(?!/online)") == "marker"
    assert b"Unknown command" not in alice.output


def test_leaving_a_room_withdraws_its_report_still_waiting(fake_server, run_client):
    alice = signed_in_to(fake_server, run_client)
    fake_server.send("*** You are in #dev with bob.", "bob: one")
    assert fake_server.expect(r"/read") == "/read #dev"
    fake_server.send("bob: two")                        # its report waits for 2 s...
    alice.wait_for_row(r"\] bob: two$")
    alice.type("/leave\r")                             # ...and goes with the room
    fake_server.expect(r"/leave$")
    fake_server.send("*** You left #dev.", "*** Now talking in #lobby.", "bob: three")
    assert fake_server.expect(r"/read") == "/read #lobby"
    fake_server.send("bob: four")                       # reported 2 s after #lobby's first, so after #dev's time
    assert fake_server.expect(r"/read") == "/read #lobby"


def test_switching_to_a_room_reads_it(fake_server, run_client):
    alice = signed_in_to(fake_server, run_client)
    fake_server.send("*** You are in #dev with bob.", "*** Now talking in #lobby.", "#dev bob: one")
    alice.wait_for_input_line("[#dev 1] alice #lobby> ")
    alice.type(ALT + "2")
    fake_server.expect(r"/join #dev$")
    fake_server.send("*** Now talking in #dev.")
    assert fake_server.expect(r"/read") == "/read #dev"
    alice.wait_for_input_line("alice #dev> ")


def test_the_catch_up_is_shown_in_local_time_not_counted_unread_and_read_when_shown(fake_server, run_client):
    alice = signed_in_to(fake_server, run_client, env={"TZ": "UTC"}, cols=120)
    fake_server.send("*** 2 new in #lobby since 2026-12-06T18:02:11Z",
                     "[history 2026-12-06T18:03:00Z] bob: hi",
                     "[history 2026-12-06T18:04:00Z] * bob waves",
                     "*** End of #lobby history.",
                     "#dev *** You are in #dev with carol.",
                     "#dev *** 250 new in #dev since 2026-12-06T18:00:00Z; the latest 200 follow "
                     "(/history #dev for earlier ones).",
                     "#dev [history 2026-12-06T18:04:30Z] carol: in dev",
                     "*** 1 new with bob since 2026-12-06T18:05:00Z",
                     "[history 2026-12-06T18:05:00Z] [pm from bob] call me",
                     "*** End of history with bob.")
    alice.wait_for_row(r"\*\*\* End of history with bob\.$")
    alice.wait_for_row(r"^\[\d\d:\d\d:\d\d\] \*\*\* 2 new in #lobby since 2026-12-06 18:02$")
    alice.wait_for_row(r"^\[18:03:00\] bob: hi$")
    alice.wait_for_row(r"^\[18:04:00\] \* bob waves$")
    alice.wait_for_row(r"\] #dev \*\*\* 250 new in #dev since 2026-12-06 18:00; the latest 200 follow")
    alice.wait_for_row(r"^\[18:04:30\] #dev carol: in dev$")
    alice.wait_for_row(r"^\[18:05:00\] \[pm from bob\] call me$")
    assert b"\x1b[1;35m[pm from bob]\x1b[0m" in alice.output
    alice.wait_for_input_line("alice #lobby> ")           # no unread count for #dev's history
    assert sorted(fake_server.expect(r"/read") for _ in range(2)) == ["/read #lobby", "/read bob"]


def sign_in_to_account(fake_server, rooms: tuple[str, ...]) -> None:
    """Accept the client, take its nickname and account password, and put it back in ROOMS (the last current),
    then answer the /online it asks on arrival."""
    fake_server.accept()
    fake_server.send("*** pyChat 3.0.0: 1 online.", "*** Choose a nickname:")
    fake_server.expect(r"alice$")
    fake_server.send("*** Password for alice:")
    fake_server.expect(r"s3cret-enough$")
    fake_server.send("*** Welcome, alice! Type /help for the commands.",
                     *(f"*** You are in #{room}, alone for now." for room in rooms))
    fake_server.expect(r"/online$")
    fake_server.send("-- 1 online: alice (#" + rooms[-1] + ")")


@pytest.mark.parametrize("kept, joined", [
    (("lobby", "ops", "dev", "design"), "/join #ops"),  # the server's current room is another session's
    (("lobby", "dev"), None),                           # another session left #ops: it stays left
])
def test_an_account_coming_back_keeps_the_rooms_the_server_kept_and_only_its_current_room(fake_server, run_client,
                                                                                         kept, joined):
    alice = run_client(fake_server, "--nick", "alice", env={"PYCHAT_ACCOUNT_PASSWORD": "s3cret-enough"})
    sign_in_to_account(fake_server, ("lobby", "dev", "ops"))
    alice.wait_for_input_line("alice #ops> ")
    fake_server.hang_up()
    alice.wait_for_row(r"-!- connecting again in 1 s")
    start = len(fake_server.heard)
    sign_in_to_account(fake_server, kept)
    fake_server.send("*** after the reply to /online")
    alice.wait_for_row(r"\*\*\* after the reply to /online$")
    alice.type("said\r")
    assert fake_server.expect(NOT_SENT_BY_ITSELF) == ("said" if joined is None else joined)
    if joined:
        fake_server.send("*** Now talking in #ops.")
        alice.wait_for_input_line("alice #ops> ")
        assert fake_server.expect(NOT_SENT_BY_ITSELF) == "said"
    assert not [line for line in fake_server.heard[start:] if line.startswith(("/leave", "/part"))]


def test_history_lines_of_another_day_than_the_line_before_them_follow_a_line_naming_the_day(fake_server,
                                                                                              run_client):
    alice = signed_in_to(fake_server, run_client, env={"TZ": "UTC"})
    today = datetime.datetime.now(datetime.timezone.utc)
    earlier = today - datetime.timedelta(days=2)
    fake_server.send(f"[history {earlier:%Y-%m-%dT%H:%M:%SZ}] bob: two days ago",
                     f"[history {earlier:%Y-%m-%dT%H:%M:%SZ}] bob: the same day",
                     f"[history {today:%Y-%m-%dT%H:%M:%SZ}] bob: today", "*** End of #lobby history.",
                     f"[history {today:%Y-%m-%dT%H:%M:%SZ}] [pm from bob] today too",
                     f"[history {earlier:%Y-%m-%dT%H:%M:%SZ}] [pm from bob] back then", "bob: live")
    alice.wait_for_row(r"\] bob: live$")
    rows = [alice.screen.line(row) for row in range(alice.screen.row)]
    start = next(number for number, row in enumerate(rows) if row.endswith("two days ago")) - 1
    then, now = (f"--- {day:%A} {day.day} {day:%B %Y} ---" for day in (earlier, today))
    assert [row[11:] if row.startswith("[") else row for row in rows[start:]] == [
        then, "bob: two days ago", "bob: the same day", now, "bob: today", "*** End of #lobby history.",
        "[pm from bob] today too", then, "[pm from bob] back then", "bob: live"], alice.screen.dump()


# -- against the real server ---------------------------------------------------------------------

@pytest.fixture
def accounts_server(start_server, connect, tmp_path):
    """A factory: a server (with OPTIONS) and a data directory where alice has an account (PASSWORD) and has
    been in #lobby once, so that the server keeps where she is in reading it; she is not signed in."""

    def start(*options: str):
        server = start_server("--data-dir", str(tmp_path / "data"), *options)
        registered(server, connect)
        first = account_session(server, connect)
        first.send("/quit")
        first.wait_closed()
        return server

    return start


def account_session(server, connect, nick: str = "alice") -> LineClient:
    """NICK signed in to their account from a raw client, as nc would: the nickname, then the password."""
    session = connect(server)
    session.expect(re.escape("*** Choose a nickname:"))
    session.send(nick)
    session.expect(re.escape(f"*** Password for {nick}:"))
    session.send(PASSWORD)
    session.expect(rf"\*\*\* Welcome, {nick}!")
    session.nick = nick
    return session


def alice_in_a_terminal(run_client, server, **options):
    alice = run_client(server, "--nick", "alice", env={ACCOUNT_VARIABLE: PASSWORD, **options.pop("env", {})},
                       **options)
    alice.wait_for_input_line("alice #lobby> ")
    return alice


def test_two_clients_on_one_account_see_each_others_lines_and_rooms(accounts_server, connect, run_client):
    server = accounts_server()
    bob = connect(server, "bob")
    laptop = alice_in_a_terminal(run_client, server)
    phone = alice_in_a_terminal(run_client, server)
    laptop.type("hello from the laptop\r")
    phone.wait_for_row(r"\] alice: hello from the laptop$")
    assert bob.expect(r"alice: ") == "alice: hello from the laptop"
    phone.type("/join #dev\r")
    phone.wait_for_input_line("alice #dev> ")
    laptop.wait_for_row(r"\] #dev \*\*\* You are in #dev")
    bob.send("/join #dev")
    bob.expect(r"\*\*\* You are in #dev")
    bob.send("the build is red")
    phone.wait_for_row(r"\] bob: the build is red$")
    laptop.wait_for_input_line("[#dev 1] alice #lobby> ")      # the laptop is in #dev too, and stays in #lobby
    laptop.type(ALT + "2")
    laptop.wait_for_input_line("alice #dev> ")
    laptop.type("on it\r")
    phone.wait_for_row(r"\] alice: on it$")
    assert bob.expect(r"alice: ") == "alice: on it"


def test_the_read_position_moves_when_the_person_is_at_the_terminal(accounts_server, connect, run_client):
    server = accounts_server()
    bob = connect(server, "bob")
    other = account_session(server, connect)          # another session of alice's, as nc would see it
    laptop = alice_in_a_terminal(run_client, server)
    laptop.type(FOCUS_IN)
    bob.send("seen on the laptop")
    laptop.wait_for_row(r"\] bob: seen on the laptop$")
    other.expect(re.escape("[read #lobby]"))
    laptop.type(FOCUS_OUT + "x")
    laptop.wait_for_input_line("alice #lobby> x")
    bob.send("/msg alice psst")
    laptop.wait_for_row(r"\] \[pm from bob\] psst$")
    laptop.type(CTRL_U + "marker\r")
    lines = other.lines_until(r"alice: marker$")
    assert "[read bob]" not in lines, f"a private message was reported read while blurred: {lines}"
    laptop.type(FOCUS_IN)
    other.expect(re.escape("[read bob]"))


def test_the_catch_up_shows_what_was_missed_in_local_time_and_once_read_no_session_shows_it_again(
        accounts_server, connect, run_client):
    server = accounts_server()
    registered(server, connect, "bob")
    bob = account_session(server, connect, "bob")
    first = account_session(server, connect)
    first.send("/read #lobby")             # a session that says what it read: its leaving reads nothing more
    first.send("/online")
    first.expect(r"-- \d+ online")
    bob.send("while you were away")
    bob.send("/msg alice call me")
    first.expect(re.escape("[pm from bob] call me"))
    first.send("/quit")
    first.wait_closed()
    laptop = alice_in_a_terminal(run_client, server, env={"TZ": "UTC"}, cols=120)
    laptop.wait_for_row(r"\] \*\*\* 1 new in #lobby since \d{4}-\d\d-\d\d \d\d:\d\d$")
    laptop.wait_for_row(r"^\[\d\d:\d\d:\d\d\] bob: while you were away$")
    laptop.wait_for_row(r"\] \*\*\* End of #lobby history\.$")
    laptop.wait_for_row(r"\] \*\*\* 1 new with bob since \d{4}-\d\d-\d\d \d\d:\d\d$")
    laptop.wait_for_row(r"^\[\d\d:\d\d:\d\d\] \[pm from bob\] call me$")
    laptop.wait_for_row(r"\] \*\*\* End of history with bob\.$")
    laptop.type("read them\r")                                # after the /read the catch-up brought about
    bob.expect(r"alice: read them$")
    again = account_session(server, connect)                  # so a new session is not shown them again
    again.send("/online")
    lines = again.lines_until(r"-- \d+ online")
    assert not [line for line in lines if " new " in line or "away" in line or "call me" in line], lines


def test_history_pages_back_and_is_shown_in_local_time(start_server, connect, run_client, tmp_path):
    server = start_server("--data-dir", str(tmp_path / "data"), "--history", "2")
    bob = connect(server, "bob")
    for number in range(1, 4):
        bob.send(f"line {number}")
        bob.expect(f"bob: line {number}")
    carol = run_client(server, "--nick", "carol")
    carol.wait_for_row(r"\] \*\*\* End of #lobby history\.$")
    carol.type("/history #lobby 5\r")
    carol.wait_for_row(r"\] \*\*\* 1 earlier line of #lobby:$")
    carol.wait_for(lambda screen: screen.line(screen.row - 1).endswith("*** End of #lobby history.")
                   and "earlier line" in screen.line(screen.row - 3), "the page and its end")
    rows = [carol.screen.line(row) for row in range(carol.screen.row)]
    page = rows[next(n for n, row in enumerate(rows) if row.endswith("1 earlier line of #lobby:")):]
    assert [row[11:] for row in page[1:3]] == ["bob: line 1", "*** End of #lobby history."], carol.screen.dump()
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\]", page[1][:10]), carol.screen.dump()
    assert b"\x1b[2mbob: line 1" in carol.output                # dimmed, as history


def test_after_a_server_restart_an_account_is_back_in_its_kept_rooms_with_its_own_current_room(
        start_server, connect, run_client, tmp_path):
    data = str(tmp_path / "data")
    server = start_server("--data-dir", data)
    registered(server, connect)
    laptop = alice_in_a_terminal(run_client, server)
    for room in ("dev", "ops"):
        laptop.type(f"/join #{room}\r")
        laptop.wait_for_input_line(f"alice #{room}> ")
    laptop.type(ALT + "2")
    laptop.wait_for_input_line("alice #dev> ")
    server.stop()
    laptop.wait_for_row(r"-!- connecting again in 1 s")
    again = start_server("--data-dir", data, "--port", str(server.port))
    bob = connect(again, "bob")
    bob.send("/join #ops")
    bob.expect(r"\*\*\* (alice joined #ops$|You are in #ops with (.*, )?alice\b)", timeout=15)
    laptop.wait_for_input_line("alice #dev> ", timeout=15)
    bob.send("anyone?")
    laptop.wait_for_row(r"\] #ops bob: anyone\?$")
    laptop.wait_for_input_line("[#ops 1] alice #dev> ")
