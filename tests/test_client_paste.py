"""Pasting and Ctrl-C in the client, in a real pseudo-terminal against a real server.

The terminal's bracketed paste is driven as a terminal does it: the pasted
text between ESC [200~ and ESC [201~.
"""
from __future__ import annotations

import re
import termios

import pytest

from test_client_terminal import CTRL_C, UP, fake_server, run_client, signed_in  # noqa: F401 (fixtures)

PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"


def paste(client, text: str) -> None:
    client.type(PASTE_START + text + PASTE_END)


def test_bracketed_paste_is_on_while_the_client_runs_and_off_after(server, run_client):
    alice = signed_in(run_client, server)
    assert "?2004" in alice.screen.modes
    alice.type(CTRL_C + CTRL_C)
    assert alice.wait_exit() == 0
    assert "?2004" not in alice.screen.modes
    assert termios.tcgetattr(alice.slave) == alice.mode_before


def test_pasted_tabs_are_spaces_not_completion(server, connect, run_client):
    dave = connect(server, "dave2")
    alice = signed_in(run_client, server)
    paste(alice, "col1\tcol2\tcol3")
    alice.wait_for_input_line("alice #lobby> col1    col2    col3")
    alice.type("\r")
    assert re.fullmatch(r"alice: col1 +col2 +col3", dave.expect("^alice: "))
    paste(alice, "d\tx\r")
    assert re.fullmatch(r"alice: d +x", dave.expect("^alice: "))
    paste(alice, "\tindented\r")
    assert re.fullmatch(r"alice: +indented", dave.expect("^alice: "))
    assert b"-!- dave2" not in alice.output


def test_a_paste_of_a_few_lines_sends_each_line_and_keeps_the_unfinished_last_one(server, connect, run_client):
    bob = connect(server, "bob")
    alice = signed_in(run_client, server)
    alice.type("typed ")
    paste(alice, "one\ntwo\r\nthree\nfour")
    alice.wait_for_input_line("alice #lobby> four")
    assert [bob.expect("^alice: ") for _ in range(3)] == ["alice: typed one", "alice: two", "alice: three"]
    alice.type(" and more\r")
    assert bob.expect("^alice: ") == "alice: four and more"


@pytest.mark.server_options("--rate", "20", "--burst", "5")     # 25 lines to pace: 1.25 s
def test_a_long_paste_asks_first_then_arrives_whole_paced_to_the_flood_limit(server, connect, run_client):
    bob = connect(server, "bob")
    alice = signed_in(run_client, server)
    paste(alice, "".join(f"pasted line {n}\n" for n in range(1, 31)))
    alice.wait_for_row(r"-!- you pasted 30 lines: Enter sends them")
    alice.wait_for_input_line("send 30 pasted lines? (Enter/Esc) ")
    sent = len(alice.output)
    alice.type("\r")
    # Looked for in what was drawn, not on the screen when the test gets to look: the count lasts about a
    # second, and a busy machine may hold the test up longer than that.
    waiting = rb"\(\d+ waiting\) (\x1b\[[0-9;]*m)*alice #lobby> "
    alice.wait_for(lambda screen: re.search(waiting, alice.output[sent:]),
                   "the lines waiting for the flood limit, shown on the prompt")
    assert [bob.expect("^alice: ", timeout=15) for _ in range(30)] == \
        [f"alice: pasted line {n}" for n in range(1, 31)]
    alice.wait_for_input_line("alice #lobby> ")
    assert b"sending too fast" not in alice.output


def test_a_long_paste_can_be_cancelled_and_the_typed_line_comes_back(server, connect, run_client):
    bob = connect(server, "bob")
    alice = signed_in(run_client, server)
    alice.type("keep this")
    paste(alice, "".join(f"secret {n}\n" for n in range(8)))
    alice.wait_for_input_line("send 8 pasted lines? (Enter/Esc) ")
    alice.type("\x1b")
    alice.wait_for_row(r"-!- paste of 8 lines cancelled; nothing of it was sent")
    alice.wait_for_input_line("alice #lobby> keep this")
    alice.type("\r")
    assert bob.expect("^alice: ") == "alice: keep this"
    assert not [line for line in bob.seen if "secret" in line]


def test_ctrl_c_clears_a_typed_line_which_up_brings_back(server, connect, run_client):
    bob = connect(server, "bob")
    alice = signed_in(run_client, server)
    alice.type("a line I regret")
    alice.wait_for_input_line("alice #lobby> a line I regret")
    alice.type(CTRL_C)
    alice.wait_for_row(r"-!- line cleared; Up brings it back$")
    alice.wait_for_input_line("alice #lobby> ")
    alice.type(UP)
    alice.wait_for_input_line("alice #lobby> a line I regret")
    alice.type(" after all\r")
    assert bob.expect("^alice: ") == "alice: a line I regret after all"


def test_one_ctrl_c_on_an_empty_line_only_warns_and_two_leave(server, connect, run_client):
    bob = connect(server, "bob")
    alice = signed_in(run_client, server)
    alice.type(CTRL_C)
    alice.wait_for_row(r"-!- press Ctrl-C again within 2 s to leave \(or Ctrl-D, /quit\)")
    alice.type("still here\r")
    assert bob.expect("^alice: ") == "alice: still here"
    alice.type(CTRL_C + CTRL_C)
    assert alice.wait_exit() == 0
    bob.expect(r"^\*\*\* alice quit")


def test_a_pasted_nickname_with_its_newline_answers_the_question(server, run_client):
    client = run_client(server)
    client.wait_for_input_line("nickname: ")
    paste(client, "carol\n")
    client.wait_for_input_line("carol #lobby> ")


def test_more_than_one_pasted_line_at_the_nickname_question_says_what_was_left_out(server, run_client):
    client = run_client(server)
    client.wait_for_input_line("nickname: ")
    paste(client, "carol\nsecond line\n")
    client.wait_for_row(r"-!- the nickname is one line: 1 more pasted line\(s\) left out$")
    client.wait_for_input_line("nickname: carol")
