"""The client with several sessions of one account (issue 19): rooms entered and left on another
session, read positions (what the person has seen, told to the server with /read; "[read #dev]"
from another session), focus reports, the catch-up at sign-in and /history.

The pure parts are called directly; the client in a pseudo-terminal plays against a scripted server
on a real socket (what the client sends) and against the real server (end to end).
"""
from __future__ import annotations

import datetime

import pytest

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


def test_focus_reports_are_keys_never_text_even_split_across_reads():
    decoder = pychat.KeyDecoder()
    assert names(decoder.feed(b"a\x1b[Ib\x1b[O")) == ["a", "focus-in", "b", "focus-out"]
    assert names(decoder.feed(b"\x1b") + decoder.feed(b"[") + decoder.feed(b"I")) == ["focus-in"]
    assert names(decoder.feed(b"\x1bOI\x1b[1;5I")) == []     # keypad and modified keys are not focus


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

def signed_in_to(fake_server, run_client, *args: str, **options):
    alice = run_client(fake_server, "--nick", "alice", *args, **options)
    fake_server.sign_in("alice")
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
