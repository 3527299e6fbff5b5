"""The client's screen in a real pseudo-terminal: word wrapping, the /help table, and the input
row that stays on the bottom row (after Ctrl-L and resizes too)."""
from __future__ import annotations

import re

from test_client_terminal import Screen, cell_width, fake_server, run_client, set_window_size, signed_in  # noqa: F401

CTRL_L = "\x0c"
WORDS = ("the build is green and the release notes are written, so I will tag it after "
         "lunch unless someone shouts; 漢字 and emoji 🙂 are fine too, see the wiki page")


def rows_of(client) -> list[str]:
    return [client.screen.line(row) for row in range(client.screen.rows)]


def message_rows(client, first_pattern: str) -> list[str]:
    """The rows of the message whose first row matches first_pattern: it and its indented continuations."""
    rows = rows_of(client)
    start = max(number for number, row in enumerate(rows) if re.search(first_pattern, row))
    taken = [rows[start]]
    for row in rows[start + 1:client.screen.rows - 1]:
        if not row.startswith(" "):
            break
        taken.append(row)
    return taken


def cells(text: str) -> int:
    return sum(cell_width(char) for char in text)


def check_wrapped(rows: list[str], width: int, text: str, indent: int) -> None:
    assert len(rows) > 1, rows
    assert all(cells(row) <= width for row in rows), rows
    assert all(row.startswith(" " * indent) and row[indent] != " " for row in rows[1:]), rows
    assert " ".join(row.strip() for row in rows).endswith(text), rows   # no word was cut


def test_long_lines_wrap_at_words_under_the_text_at_40_and_100_columns(server, connect, run_client):
    bob = connect(server, "bob")
    for width in (40, 100):
        alice = signed_in(run_client, server, f"alice{width}", cols=width)
        bob.send(WORDS + f" {width}")
        alice.wait_for_row(rf"page {width}$")
        check_wrapped(message_rows(alice, r"\] bob: the build"), width, WORDS + f" {width}",
                      len("[00:00:00] bob: "))


def test_help_fits_the_width_with_summaries_wrapped_under_their_column(server, connect, run_client):
    bob = connect(server, "bob")
    bob.send("/help")
    help_lines = bob.lines_until(r"(?!-- /)")
    alice = signed_in(run_client, server, rows=300, cols=40)
    alice.type("/help\r")
    alice.wait_for_row(re.escape(help_lines[-1][:20]))
    rows = rows_of(alice)
    assert all(len(row) <= 40 for row in rows), alice.screen.dump()
    flowing = " ".join(" ".join(row.split()) for row in rows)
    for line in help_lines:
        assert " ".join(line.split()) in flowing, f"{line!r} was cut:\n{alice.screen.dump()}"
    ignore_rows = message_rows(alice, r"-- /ignore")
    assert not any(re.search(r" [a-z]$", row) for row in ignore_rows), ignore_rows


def test_a_line_full_of_spaces_cannot_make_a_row_that_passes_for_another_line(fake_server, run_client):
    fake = "[12:00:09] *** alice quit (Ping timeout)"
    alice = run_client(fake_server, "--nick", "alice", "--no-color", cols=80)
    fake_server.sign_in("alice")
    for padding in (69, 70, 55, 140):
        fake_server.send("mallory: hi" + " " * padding + fake + f" {padding}")
        alice.wait_for_row(rf"Ping timeout\) {padding}$")
    rows = rows_of(alice)
    assert not any(row.startswith(fake[:10]) for row in rows), alice.screen.dump()
    assert sum(1 for row in rows if row.lstrip().startswith(fake[:10])) == 4, alice.screen.dump()


def test_input_row_is_the_bottom_row_from_the_start_after_ctrl_l_and_after_a_resize(server, connect, run_client):
    bob = connect(server, "bob")
    alice = signed_in(run_client, server, rows=24, cols=80)
    assert alice.screen.row == 23, alice.screen.dump()
    alice.type("draft")
    bob.send("one")
    alice.wait_for_row("bob: one$")
    alice.wait_for_input_line("alice #lobby> draft")
    assert alice.screen.row == 23 and alice.screen.line(22).endswith("bob: one"), alice.screen.dump()
    alice.screen = Screen(24, 80)     # forget what was seen: Ctrl-L must draw it all again
    alice.type(CTRL_L)
    alice.wait_for(lambda screen: screen.row == 23 and screen.cursor_text == "alice #lobby> draft"
                   and screen.line(22).endswith("bob: one"), "the screen drawn again after Ctrl-L")
    assert any("Welcome, alice!" in row for row in rows_of(alice)), alice.screen.dump()
    set_window_size(alice.slave, 16, 30)
    alice.screen = Screen(16, 30)
    alice.wait_for(lambda screen: screen.row == 15 and screen.cursor_text == "alice #lobby> draft"
                   and screen.line(14).endswith("bob: one"),
                   "the screen drawn again for 16 rows: the input row at the bottom, the last line above it")
    bob.send(WORDS + " end")
    alice.wait_for_row(r" end$")
    alice.wait_for_input_line("alice #lobby> draft")
    assert alice.screen.row == 15, alice.screen.dump()
    rows = message_rows(alice, r"\] bob: the")
    assert all(cells(row) <= 30 for row in rows) and all(row.startswith(" " * 11) for row in rows[1:]), rows
