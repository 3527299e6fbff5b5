"""Rooms in the client (issue 9): the prompt names the current room, lines from other rooms show
theirs, unread activity beside the prompt, keys that switch, Tab for room names, and coming back
to every room after a reconnect. A scripted server on a real socket plays the rooms protocol."""
from __future__ import annotations

import pytest

from conftest import SERVER_SCRIPT
from test_client_terminal import fake_server, run_client, signed_in  # noqa: F401 (fixtures)

ALT = "\x1b"
CTRL_N, CTRL_P, CTRL_U = "\x0e", "\x10", "\x15"


def in_three_rooms(fake_server, run_client, **size):
    """alice, signed in to the scripted server, in #lobby, #dev and #ops, with #lobby current."""
    alice = run_client(fake_server, "--nick", "alice", **size)
    fake_server.sign_in("alice")
    fake_server.send("*** You are in #dev with bob.", "*** You are in #ops, alone for now.",
                     "*** Now talking in #lobby.")
    alice.wait_for_input_line("alice #lobby> ")
    return alice


def test_lines_from_other_rooms_show_their_room_styled_and_count_as_unread(fake_server, run_client):
    alice = in_three_rooms(fake_server, run_client)
    fake_server.send("#dev bob: build is red", "#dev * bob sighs", "#ops carol: alice, can you look?",
                     "#dev *** dave joined #dev", "bob: in the lobby")
    alice.wait_for_row(r"\] bob: in the lobby$")
    alice.wait_for_row(r"\] #dev bob: build is red$")
    alice.wait_for_row(r"\] #dev \* bob sighs$")
    alice.wait_for_row(r"\] #ops carol: alice, can you look\?$")
    alice.wait_for_row(r"\] #dev \*\*\* dave joined #dev$")
    assert b"\x1b[1;4m#dev\x1b[0m" in alice.output       # the room stands apart from the line
    alice.wait_for_input_line("[#dev 2 #ops 1!] alice #lobby> ")


def test_switching_keys_send_join_and_the_prompt_follows_only_the_server(fake_server, run_client):
    alice = in_three_rooms(fake_server, run_client)
    fake_server.send("#dev bob: one", "#ops carol: two")
    alice.wait_for_input_line("[#dev 1 #ops 1] alice #lobby> ")
    alice.type(ALT + "2")
    fake_server.expect(r"/join #dev$")
    fake_server.send("bob: still the lobby, in flight")
    alice.wait_for_row(r"\] bob: still the lobby, in flight$")
    alice.wait_for_input_line("[#dev 1 #ops 1] alice #lobby> ")     # not yet: the server has not said
    fake_server.send("*** Now talking in #dev.")
    alice.wait_for_input_line("[#ops 1] alice #dev> ")
    alice.type(CTRL_N)
    fake_server.expect(r"/join #ops$")
    fake_server.send("*** Now talking in #ops.")
    alice.wait_for_input_line("alice #ops> ")
    alice.type(CTRL_P)
    fake_server.expect(r"/join #dev$")
    alice.type(CTRL_N + CTRL_N)      # from #ops (the server has not moved me): #lobby, twice
    fake_server.expect(r"/join #lobby$")
    fake_server.expect(r"/join #lobby$")
    alice.type(ALT + "9")            # no ninth room: nothing is sent
    alice.type("said in ops\r")
    assert fake_server.expect(r"(?!/online)") == "said in ops"


def test_tab_completes_room_names_after_room_commands(fake_server, run_client):
    alice = in_three_rooms(fake_server, run_client)
    fake_server.send("-- 4 rooms: #lobby (2), #dev (2), #ops (1), #design (3)")
    alice.wait_for_row(r"#design \(3\)")
    alice.type("/join #o\t")
    alice.wait_for_input_line("alice #lobby> /join #ops ")
    alice.type("\x15/leave de")
    alice.type("\t")
    alice.wait_for_input_line("alice #lobby> /leave #de")
    alice.wait_for_row(r"-!- #design  #dev$")
    alice.type("v\t")
    alice.wait_for_input_line("alice #lobby> /leave #dev ")
    alice.type("\x15/msg #d\t")
    alice.wait_for_input_line("alice #lobby> /msg #de")


def test_prompt_and_activity_fit_30_columns_with_wide_room_names(fake_server, run_client):
    alice = run_client(fake_server, "--nick", "alice", cols=30)
    fake_server.sign_in("alice")
    fake_server.send("*** You are in #開発 with 太郎.", "*** You are in #ops, alone for now.",
                     "*** Now talking in #lobby.", "#開発 太郎: 漢字", "#ops x: alice?")
    alice.wait_for(lambda screen: screen.cursor_line == "[2!] #lobby>",
                   "the prompt naming the room, with the activity in short")
    alice.type("漢字")
    alice.wait_for_input_line("[2!] #lobby> 漢字")
    rows = [alice.screen.line(row) for row in range(alice.screen.rows)]
    assert any(row.startswith("[") and row.endswith("#開発 太郎: 漢字") for row in rows), alice.screen.dump()
    alice.type(ALT + "2")
    fake_server.expect(r"/join #開発$")
    fake_server.send("*** Now talking in #開発.")
    alice.wait_for_input_line("[1!] #開発> 漢字")


def test_a_reconnect_goes_back_to_every_room_with_its_key_and_the_same_current_room(fake_server, run_client):
    alice = in_three_rooms(fake_server, run_client)
    alice.type("/join #vault sesame\r")
    fake_server.expect(r"/join #vault sesame$")
    fake_server.send("*** You are in #vault, alone for now.", "*** Now talking in #dev.")
    alice.wait_for_input_line("alice #dev> ")
    alice.type("half typed")
    fake_server.hang_up()
    alice.wait_for_row(r"-!- connecting again in 1 s")
    fake_server.sign_in("alice")
    assert [fake_server.expect(r"/join ") for _ in range(3)] == \
        ["/join #ops", "/join #vault sesame", "/join #dev"]
    fake_server.send("*** You are in #ops.", "*** You are in #vault.", "*** You are in #dev with bob.")
    alice.wait_for_input_line("alice #dev> half typed")
    alice.type("\r")
    assert fake_server.expect(r"(?!/)") == "half typed"


def test_a_reconnect_leaves_the_default_room_again_if_i_had_left_it(fake_server, run_client):
    alice = in_three_rooms(fake_server, run_client)
    fake_server.send("*** You left #lobby.", "*** Now talking in #ops.")
    alice.wait_for_input_line("alice #ops> ")
    fake_server.hang_up()
    fake_server.sign_in("alice")
    lines = [fake_server.expect(r"/(join|leave) ") for _ in range(3)]
    assert lines == ["/join #dev", "/join #ops", "/leave #lobby"], lines


def test_a_line_typed_while_offline_is_said_once_the_client_is_back_in_its_room(fake_server, run_client):
    """The server puts a guest who signs in again in #lobby: a line typed in #dev while offline waits for the
    client to go back to #dev, or #lobby would hear it."""
    alice = in_three_rooms(fake_server, run_client)
    fake_server.send("*** Now talking in #dev.")
    alice.wait_for_input_line("alice #dev> ")
    fake_server.hang_up()
    alice.wait_for_row(r"-!- connecting again in 1 s")
    alice.type("meant for dev\r")
    alice.wait_for_input_line("offline (1 waiting) alice #dev> ")
    fake_server.sign_in("alice")
    sent = []
    while "meant for dev" not in sent and len(sent) < 10:
        sent.append(fake_server.expect(r".*"))
    assert "/join #dev" in sent[:sent.index("meant for dev")], f"said before going back to #dev: {sent}"


# -- against the real server ------------------------------------------------------------

@pytest.mark.skipif("Now talking in" not in SERVER_SCRIPT.read_text(encoding="utf-8"),
                    reason="this server keeps everyone in one room at a time")
def test_one_client_in_three_rooms_talks_in_each_and_sees_where_every_line_is_from(server, connect, run_client):
    bob = connect(server, "bob")
    carol = connect(server, "carol")
    carol.send("/join #dev")
    carol.expect(r"\*\*\* You are in #dev")
    dave = connect(server, "dave")
    dave.send("/join #ops")
    dave.expect(r"\*\*\* You are in #ops")
    alice = signed_in(run_client, server)
    alice.type("/join #dev\r")
    alice.wait_for_input_line("alice #dev> ")
    alice.type("/join #ops\r")
    alice.wait_for_input_line("alice #ops> ")
    alice.type(ALT + "1")
    alice.wait_for_input_line("alice #lobby> ")

    alice.type("hi lobby\r")
    assert bob.expect("^alice: ") == "alice: hi lobby"
    carol.send("the build is red")
    dave.send("alice: can you look at ops?")
    alice.wait_for_row(r"\] #dev carol: the build is red$")
    alice.wait_for_row(r"\] #ops dave: alice: can you look at ops\?$")
    alice.wait_for_input_line("[#dev 1 #ops 1!] alice #lobby> ")

    alice.type(ALT + "2")
    alice.wait_for_input_line("[#ops 1!] alice #dev> ")
    alice.type("on it\r")
    assert carol.expect("^alice: ") == "alice: on it"
    bob.send("lunch?")
    alice.wait_for_row(r"\] #lobby bob: lunch\?$")

    alice.type(CTRL_N)
    alice.wait_for_input_line("[#lobby 1] alice #ops> ")
    alice.type("looking\r")
    assert dave.expect("^alice: ") == "alice: looking"
    alice.type("/msg #lobby yes, lunch\r")
    assert bob.expect("^alice: ") == "alice: yes, lunch"
    alice.wait_for_row(r"\] #lobby alice: yes, lunch$")
    alice.wait_for_input_line("[#lobby 1] alice #ops> ")     # my own line is not unread
    assert not [line for line in bob.seen if line.startswith("#")], "bob, in one room only, saw a room tag"


@pytest.mark.skipif("Now talking in" not in SERVER_SCRIPT.read_text(encoding="utf-8"),
                    reason="this server keeps everyone in one room at a time")
def test_after_a_server_restart_the_client_is_back_in_its_rooms_with_the_same_current_one(
        start_server, connect, run_client):
    server = start_server()
    alice = signed_in(run_client, server)
    for room in ("dev", "ops"):
        alice.type(f"/join #{room}\r")
        alice.wait_for_input_line(f"alice #{room}> ")
    alice.type(ALT + "2")
    alice.wait_for_input_line("alice #dev> ")
    alice.type("draft")
    server.stop()
    alice.wait_for_row(r"-!- connecting again in 1 s")
    again = start_server("--port", str(server.port))
    carol = connect(again, "carol")
    carol.send("/join #ops")
    carol.expect(r"\*\*\* (alice joined #ops$|You are in #ops with (.*, )?alice\b)", timeout=15)
    alice.wait_for_input_line("alice #dev> draft", timeout=15)
    alice.type(CTRL_U + "/who\r")
    alice.wait_for_row(r"-- .*\balice\b")
    carol.send("anyone?")
    alice.wait_for_row(r"\] #ops carol: anyone\?$")
    alice.wait_for_input_line("[#ops 1] alice #dev> ")
