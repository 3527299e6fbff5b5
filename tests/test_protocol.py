"""The pure parts of the protocol, called directly: framing, cleaning text, and the rules for names."""
from __future__ import annotations

import unicodedata

import pytest

from conftest import SERVER_SCRIPT, import_script

server = import_script(SERVER_SCRIPT, "pychat_server")


def test_line_reader_joins_pieces_and_splits_batches():
    reader = server.LineReader(max_bytes=10)
    assert reader.feed(b"ab") == []
    assert reader.feed(b"c\r\nde\nf") == ["abc", "de"]
    assert reader.feed(b"\n") == ["f"]


def test_line_reader_reports_an_overlong_line_once_and_holds_no_more_than_the_limit():
    reader = server.LineReader(max_bytes=10)
    assert reader.feed(b"x" * 11) == [None]
    assert reader.feed(b"x" * 100000) == []
    assert len(reader.partial) == 0
    assert reader.feed(b"xx\nok\n") == ["ok"]
    assert reader.feed(b"y" * 11 + b"\n") == [None]


def test_line_reader_takes_at_most_the_lines_it_is_told_and_drops_the_rest_unsplit():
    reader = server.LineReader(max_bytes=10)
    assert reader.feed(b"one\ntwo\n\n\n\nhalf", most=2) == ["one", "two"]
    assert reader.dropped == 3 and reader.partial == b"half", "the lines past MOST were not dropped whole"
    assert reader.feed(b"\n" * 65536, most=0) == [] and reader.dropped == 65536
    assert reader.feed(b" done\n", most=5) == [" done"] and reader.dropped == 0
    assert reader.feed(b"a\nb\n") == ["a", "b"], "without MOST every line comes out"


def test_line_reader_replaces_invalid_utf8():
    assert server.LineReader().feed(b"\xff ok\n") == ["\ufffd ok"]


@pytest.mark.parametrize("dirty, clean", [
    ("plain text", "plain text"),
    ("\x1b[31mred\x1b[0m", "[31mred[0m"),
    ("bell\x07 nul\x00 del\x7f c1\x9b", "bell nul del c1"),
    ("tab\there", "tab here"),
    ("\u202eevil\u202c \u2066isolate\u2069", "evil isolate"),
    ("line\u2028separator", "line separator"),
    ("  padded  ", "  padded"),
    ("emoji 👍🏽 and 👨‍👩‍👧 stay", "emoji 👍🏽 and 👨‍👩‍👧 stay"),
])
def test_clean_text_removes_what_could_act_on_a_terminal(dirty, clean):
    assert server.clean_text(dirty) == clean


@pytest.mark.parametrize("a, b", [
    ("alice", "ALICE"), ("alice", "a1ice"), ("alice", "aIice"), ("alice", "аӏісе"),
    ("bob", "b0b"), ("José", "jose"), ("modern", "rnodern"), ("ｂｏｂ", "bob"), ("a_b", "a-b"),
])
def test_names_that_look_alike_share_a_key(a, b):
    assert server.name_key(unicodedata.normalize("NFKC", a)) == server.name_key(unicodedata.normalize("NFKC", b))


@pytest.mark.parametrize("name", ["alice", "Bob_2", "李雷", "Ольга", "Ελένη", "x-y", "たなか"])
def test_good_names_pass(name):
    assert server.name_problem(name) is None


@pytest.mark.parametrize("name", ["", "a b", "a:b", "1abc", "_abc", "x" * 21, "root", "ad\u200bmin", "a\x1bb"])
def test_bad_names_have_a_reason(name):
    assert server.name_problem(name)


def test_token_bucket_allows_a_burst_then_the_rate():
    bucket = server.TokenBucket(rate=1.0, burst=3)
    assert [bucket.allow() for _ in range(4)] == [True, True, True, False]
    bucket.updated -= 1.0       # as if a second had passed
    assert bucket.allow() and not bucket.allow()


def test_no_rate_means_no_flood_control():
    bucket = server.TokenBucket(rate=0, burst=1)
    assert all(bucket.allow() for _ in range(1000))
