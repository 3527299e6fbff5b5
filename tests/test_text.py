"""Untrusted text: what the server keeps of a line, how long it may be, and which names it accepts.

Unit tests call the protocol section's pure functions directly; behaviour
tests send through a real server on loopback.
"""
from __future__ import annotations

import re

import pytest

from conftest import SERVER_SCRIPT, import_script

server_module = import_script(SERVER_SCRIPT, "pychat_server")
clean_text = server_module.clean_text


# -- spaces: indentation stays, runs inside a line go --------------------------------------------------

@pytest.mark.parametrize("sent, kept", [
    ("    indented line three", "    indented line three"),
    ("\tdef f():", "    def f():"),
    ("\t\treturn 1", "        return 1"),
    ("  \tmixed", "    mixed"),                          # a tab goes to the next multiple of 4
    ("trailing   \t ", "trailing"),
    ("   ", ""),
    ("\t\t", ""),
    ("\u3000\u3000", ""),
    ("a  b", "a b"),
    ("a\tb", "a b"),
    ("col1\tcol2\t\tcol3", "col1 col2 col3"),
    ("hi" + " " * 70 + "[12:00:00] *** alice quit (Ping timeout)", "hi [12:00:00] *** alice quit (Ping timeout)"),
    ("hi" + "\u00a0" * 70 + "x", "hi x"),              # no-break spaces
    ("hi" + "\u2800" * 70 + "x", "hi x"),              # braille blanks
    ("hi" + "\u3000" * 40 + "x", "hi x"),              # ideographic spaces
    ("hi" + " \u200b" * 40 + "x", "hi x"),             # spaces kept apart by zero-width spaces
    ("hi \ufe0f \u034f \u2060 x", "hi x"),             # ... or by other characters that show as nothing
    ("one\u00a0space stays", "one\u00a0space stays"),
    ("漢字\u3000です", "漢字\u3000です"),
    ("emoji 👍🏽 and 👨\u200d👩\u200d👧 keep their joiners", "emoji 👍🏽 and 👨\u200d👩\u200d👧 keep their joiners"),
    ("✔\ufe0f", "✔\ufe0f"),
])
def test_clean_text_keeps_indentation_and_collapses_runs_of_blanks_inside_a_line(sent, kept):
    assert clean_text(sent) == kept


def test_leading_indentation_is_capped_so_it_cannot_push_text_onto_the_next_row():
    assert clean_text(" " * 200 + "x") == " " * server_module.MAX_INDENT + "x"
    assert clean_text("\t" * 50 + "x") == " " * server_module.MAX_INDENT + "x"
    assert clean_text("\u200b" * 50 + "  x") == "  x"


def test_no_run_of_blanks_of_any_kind_survives_inside_a_line():
    blanks = server_module._BLANKS
    for first in blanks:
        for second in blanks:
            cleaned = clean_text(f"a{first}{second}b")
            assert cleaned == "a b", f"U+{ord(first):04X} U+{ord(second):04X} became {cleaned!r}"


@pytest.mark.server_options("--rate", "0")
def test_indentation_reaches_others_and_wrap_padding_does_not(chat):
    alice, bob = chat("alice", "bob")
    for sent, received in [
            (b"    indented line three\n", "bob:     indented line three"),
            (b"\tdef f():\n", "bob:     def f():"),
            (b"  \t  \n", None),                           # a line of only blanks says nothing
            (b"hi" + b" " * 70 + b"[12:00:00] *** alice quit (Ping timeout)   \n",
             "bob: hi [12:00:00] *** alice quit (Ping timeout)"),
            ("/me waves" + "\u3000" * 60 + "[pm from carol] psst\n".encode().decode(),
             "* bob waves [pm from carol] psst"),
            (b"    /shrug\n", "bob:     /shrug"),          # indented, so text, not a command
    ]:
        bob.send_raw(sent if isinstance(sent, bytes) else sent.encode())
        bob.send("end")
        lines = alice.lines_until("bob: end$")[:-1]
        assert lines == ([received] if received else []), f"{sent!r} arrived as {lines}"


# -- the line limit holds for what is sent on ---------------------------------------------------------

def test_invalid_bytes_count_as_the_replacement_characters_they_become():
    reader = server_module.LineReader(max_bytes=9)
    assert reader.feed(b"\xff\xfe\xfd\n") == ["\ufffd" * 3]           # 9 bytes once replaced
    assert reader.feed(b"\xff\xfe\xfd\xfc\n") == [None]               # 12 bytes once replaced
    assert reader.feed(b"ok\n") == ["ok"]


def test_no_line_the_reader_accepts_grows_past_the_limit_once_cleaned():
    limit = server_module.MAX_LINE_BYTES
    for raw in (b"\xff" * limit, b"\xff" * (limit // 3), b"\t" * 8 + b"x" * (limit - 8), b"\t" + b"x" * (limit - 1),
                "\u3000".encode() * (limit // 3), b"\xc3" * limit, b"\xe2\x82" * (limit // 2)):
        for line in server_module.LineReader().feed(raw + b"\n"):
            if line is not None:
                assert len(clean_text(line).encode()) <= limit, f"{raw[:12]!r}... grew past {limit} bytes"


@pytest.mark.server_options("--rate", "0")
def test_a_line_of_invalid_bytes_that_would_triple_past_the_limit_is_refused_and_not_sent(chat):
    alice, bob = chat("alice", "bob")
    bob.send_raw(b"\xff" * 4096 + b"\n")
    assert bob.expect("!! ").startswith("!! Line too long (over 4096 bytes)")
    bob.send_raw(b"\xff" * 1365 + b"\n")          # 4095 bytes once replaced: fits
    bob.send("end")
    lines = alice.lines_until("bob: end$")
    assert lines == ["bob: " + "\ufffd" * 1365, "bob: end"], f"alice received {[len(x) for x in lines]} chars"
