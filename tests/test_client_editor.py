"""Unit tests of the client's pure parts: line editor, widths, key decoding, line kinds, rendering."""
from __future__ import annotations

import datetime
import importlib.util
import pathlib
import sys

import pytest

CLIENT_PATH = pathlib.Path(__file__).resolve().parent.parent / "pyChat-client.py"


def load_client():
    """Import pyChat-client.py (its name is not a module name) without running main()."""
    spec = importlib.util.spec_from_file_location("pychat_client", CLIENT_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("pychat_client", module)
    spec.loader.exec_module(module)
    return module


client = load_client()


def editor_with(text: str, cursor: int | None = None):
    editor = client.LineEditor()
    editor.insert(text)
    if cursor is not None:
        editor.cursor = cursor
    return editor


# -- the line editor ---------------------------------------------------------

def test_insert_at_cursor_in_the_middle():
    editor = editor_with("helo", cursor=3)
    editor.insert("l")
    assert (editor.text, editor.cursor) == ("hello", 4)


def test_backspace_deletes_before_cursor_and_stops_at_start():
    editor = editor_with("ab", cursor=1)
    editor.backspace()
    editor.backspace()
    assert (editor.text, editor.cursor) == ("b", 0)


def test_delete_removes_character_under_cursor_and_is_harmless_at_end():
    editor = editor_with("abc", cursor=1)
    editor.delete()
    assert editor.text == "ac"
    editor.end()
    editor.delete()
    assert (editor.text, editor.cursor) == ("ac", 2)


def test_ctrl_u_kills_before_cursor_ctrl_k_kills_after():
    editor = editor_with("hello world", cursor=5)
    editor.kill_to_end()
    assert (editor.text, editor.cursor) == ("hello", 5)
    editor.cursor = 2
    editor.kill_to_start()
    assert (editor.text, editor.cursor) == ("llo", 0)


def test_ctrl_w_kills_previous_word_and_trailing_spaces():
    editor = editor_with("say hello  there", cursor=11)
    editor.kill_word()
    assert (editor.text, editor.cursor) == ("say there", 4)
    editor.kill_word()
    assert (editor.text, editor.cursor) == ("there", 0)


def test_left_right_home_end_stay_inside_line():
    editor = editor_with("abc")
    editor.right()
    assert editor.cursor == 3
    editor.left()
    assert editor.cursor == 2
    editor.home()
    editor.left()
    assert editor.cursor == 0
    editor.end()
    assert editor.cursor == 3


def test_combining_mark_joins_previous_character():
    editor = editor_with("e\u0301t")
    assert editor.characters == ["e\u0301", "t"]
    editor.left()
    editor.backspace()
    assert editor.text == "t"


def test_history_recalls_sent_lines_and_keeps_the_draft():
    editor = client.LineEditor()
    for line in ("first", "second"):
        editor.insert(line)
        assert editor.submit() == line
    editor.insert("draft")
    editor.history_back()
    assert editor.text == "second"
    editor.history_back()
    editor.history_back()
    assert editor.text == "first"
    editor.history_forward()
    assert editor.text == "second"
    editor.history_forward()
    assert (editor.text, editor.cursor) == ("draft", 5)


def test_history_skips_blank_and_repeated_lines_and_secrets():
    editor = client.LineEditor()
    for line in ("same", "same", "  "):
        editor.insert(line)
        editor.submit()
    editor.insert("secret")
    editor.submit(remember=False)
    assert editor.history == ["same"]


def test_history_is_bounded():
    editor = client.LineEditor(history_size=3)
    for number in range(5):
        editor.insert(str(number))
        editor.submit()
    assert editor.history == ["2", "3", "4"]


# -- width and horizontal scroll ---------------------------------------------

@pytest.mark.parametrize("text, width", [
    ("abc", 3), ("漢字", 4), ("e\u0301", 1), ("🙂", 2), ("ｈ", 2), ("é", 1), ("", 0),
])
def test_text_width_counts_terminal_cells(text, width):
    assert client.text_width(text) == width


def test_view_shows_whole_short_line():
    editor = editor_with("hello")
    assert editor.view(20) == ("hello", 5)


def test_view_scrolls_to_keep_cursor_at_end_visible():
    editor = editor_with("abcdefghijklmnopqrstuvwxyz")
    shown, cursor = editor.view(10)
    assert (shown, cursor) == ("rstuvwxyz", 9)


def test_view_scrolls_back_when_cursor_moves_left_of_window():
    editor = editor_with("abcdefghijklmnopqrstuvwxyz")
    editor.view(10)
    editor.home()
    shown, cursor = editor.view(10)
    assert (shown, cursor) == ("abcdefghij", 0)


def test_view_keeps_context_when_cursor_moves_left_past_window():
    editor = editor_with("abcdefghijklmnopqrstuvwxyz")
    editor.view(10)
    editor.cursor = 5
    assert editor.view(10) == ("cdefghijkl", 3)


def test_view_after_home_and_right_starts_at_line_start():
    editor = editor_with("abcdefghijklmnopqrstuvwxyz")
    editor.view(10)
    editor.home()
    for _ in range(3):
        editor.right()
    assert editor.view(10) == ("abcdefghij", 3)


def test_view_keeps_window_while_cursor_moves_inside_it():
    editor = editor_with("abcdefghijklmnopqrstuvwxyz")
    editor.view(10)
    for _ in range(3):
        editor.left()
    assert editor.view(10) == ("rstuvwxyz", 6)


def test_view_of_wide_characters_never_splits_one():
    editor = editor_with("漢字漢字漢字漢字")
    shown, cursor = editor.view(7)
    assert (shown, cursor) == ("字漢字", 6)
    editor.home()
    shown, cursor = editor.view(7)
    assert (shown, cursor) == ("漢字漢", 0)
    assert client.text_width(shown) <= 7


def test_view_fills_window_again_after_deleting_at_end():
    editor = editor_with("abcdefghijklmnopqrstuvwxyz")
    editor.view(10)
    for _ in range(20):
        editor.backspace()
    assert editor.view(10) == ("abcdef", 6)


# -- tab completion ------------------------------------------------------------

COMMANDS = client.STANDARD_COMMANDS


def test_complete_unique_command_adds_space():
    assert client.complete_word("/onl", COMMANDS, []) == ("/online ", [])


def test_complete_ambiguous_command_extends_common_prefix_and_lists_choices():
    completed, choices = client.complete_word("/un", COMMANDS, [])
    assert completed == "/un"
    assert choices == ["/unignore", "/unmute"]
    completed, choices = client.complete_word("/w", COMMANDS, [])
    assert (completed, choices) == ("/w", ["/w", "/who"])


def test_complete_nickname_at_line_start_adds_colon():
    assert client.complete_word("bo", COMMANDS, ["alice", "Bob"]) == ("Bob: ", [])


def test_complete_nickname_later_in_line_adds_space():
    assert client.complete_word("/msg al", COMMANDS, ["alice", "bob"]) == ("/msg alice ", [])
    assert client.complete_word("hi al", COMMANDS, ["alice"]) == ("hi alice ", [])


def test_complete_empty_word_only_lists_nicknames():
    assert client.complete_word("/msg ", COMMANDS, ["bob"]) == ("/msg ", ["bob"])
    assert client.complete_word("", COMMANDS, ["bob", "bobby"]) == ("", ["bob", "bobby"])


def test_complete_without_match_leaves_line_alone():
    assert client.complete_word("zz", COMMANDS, ["alice"]) == ("zz", [])


def test_editor_completion_keeps_text_after_cursor():
    editor = editor_with("al and me", cursor=2)
    assert editor.complete(COMMANDS, ["alice"]) == []
    assert (editor.text, editor.cursor) == ("alice:  and me", 7)


def test_complete_cjk_nickname():
    editor = editor_with("/msg 漢")
    editor.complete(COMMANDS, ["漢字"])
    assert editor.text == "/msg 漢字 "


# -- keys ----------------------------------------------------------------------

def names(keys):
    return [key.text if key.name == "text" else key.name for key in keys]


def test_control_keys_are_named_and_text_is_kept_together():
    decoder = client.KeyDecoder()
    assert names(decoder.feed(b"hi\x7f\x15\x17\x0b\x01\x05\t\r")) == [
        "hi", "backspace", "kill-to-start", "kill-word", "kill-to-end", "home", "end",
        "tab", "enter"]


def test_utf8_split_across_reads_decodes_whole_characters():
    decoder = client.KeyDecoder()
    data = "漢é".encode()
    keys = []
    for byte in data:
        keys += decoder.feed(bytes([byte]))
    assert names(keys) == ["漢", "é"]


def test_escape_sequence_split_across_reads_is_one_key():
    decoder = client.KeyDecoder()
    assert decoder.feed(b"a\x1b") == [client.Key("text", "a")]
    assert decoder.waiting
    assert decoder.feed(b"[") == []
    assert names(decoder.feed(b"Db")) == ["left", "b"]
    assert names(decoder.feed(b"\x1b[3") + decoder.feed(b"~")) == ["delete"]


@pytest.mark.parametrize("sequence, name", [
    (b"\x1b[A", "up"), (b"\x1b[B", "down"), (b"\x1b[C", "right"), (b"\x1b[D", "left"),
    (b"\x1b[H", "home"), (b"\x1b[F", "end"), (b"\x1bOH", "home"), (b"\x1bOF", "end"),
    (b"\x1b[1~", "home"), (b"\x1b[4~", "end"), (b"\x1b[3~", "delete"), (b"\x1b[1;5C", "right"),
])
def test_escape_sequences_name_the_cursor_keys(sequence, name):
    assert names(client.KeyDecoder().feed(sequence)) == [name]


def test_lone_escape_is_the_escape_key_on_flush_and_unknown_sequences_ignored():
    decoder = client.KeyDecoder()
    assert decoder.feed(b"\x1b") == []
    assert decoder.waiting
    assert names(decoder.flush()) == ["escape"]
    assert not decoder.waiting
    assert names(decoder.feed(b"\x1b[15~x\x1bfy")) == ["xy"]


# -- line kinds, roster, sanitising ----------------------------------------------

@pytest.mark.parametrize("line, kind, nick, body", [
    ("*** bob joined #lobby", "notice", "", "bob joined #lobby"),
    ("-- 2 online: alice (#lobby)", "reply", "", "2 online: alice (#lobby)"),
    ("!! Unknown command /fly.", "error", "", "Unknown command /fly."),
    ("* alice waves", "action", "alice", "waves"),
    ("[pm from bob] lunch?", "private", "bob", "lunch?"),
    ("[pm to bob] sure", "private", "bob", "sure"),
    ("alice: hello: there", "chat", "alice", "hello: there"),
    ("alice: *** not a notice", "chat", "alice", "*** not a notice"),
])
def test_classify_line_kinds(line, kind, nick, body):
    message = client.classify(line)
    assert (message.kind, message.nick, message.body) == (kind, nick, body)


def test_classify_history_keeps_original_time_and_line():
    message = client.classify("[history 2026-11-26T17:04:51Z] * bob waves")
    assert message.kind == "history"
    assert message.time == datetime.datetime(2026, 11, 26, 17, 4, 51, tzinfo=datetime.timezone.utc)
    assert (message.said.kind, message.nick, message.body) == ("action", "bob", "waves")


def test_sanitize_removes_controls_and_direction_overrides():
    assert client.sanitize("a\x1b[2Jb\x07c\u202ed\u2066e\x9bf\tg") == "a[2Jbcdef g"


def learn(roster, *lines):
    for line in lines:
        roster.learn(client.classify(line))


def test_roster_follows_welcome_online_joins_quits_and_renames():
    roster = client.Roster()
    learn(roster,
          "*** Welcome, me! Type /help for the commands.",
          "-- 5 online: me (#lobby), alice (#lobby, away), 漢字 (#dev), hidden, frank (away)",
          "*** carol joined #lobby",
          "*** alice quit (gone)",
          "*** 漢字 is now known as kanji",
          "dave: hi",
          "*** eve left #lobby")
    assert roster.others("ME") == ["carol", "dave", "frank", "hidden", "kanji"]


def test_roster_learns_commands_from_help():
    roster = client.Roster()
    learn(roster, "-- /dice [N]  Roll a die", "-- 2 online: a (#x), b (#x)")
    assert "dice" in roster.commands and "help" in roster.commands


def test_mention_of_me_by_someone_else_only():
    assert client.mentions(client.classify("bob: hey Alice, lunch?"), "alice")
    assert not client.mentions(client.classify("bob: malice aforethought"), "alice")
    assert not client.mentions(client.classify("alice: I am alice"), "alice")
    assert not client.mentions(client.classify("*** alice joined #lobby"), "alice")


# -- rendering -------------------------------------------------------------------

NOON = datetime.datetime(2026, 11, 26, 12, 0, 5)


def painted(message, painter, me: str = "me") -> str:
    """The message without its timestamp, painted, on one row."""
    spans, _ = client.render_body(message, painter, me)
    return "".join(painter.paint(span.text, span.style) for span in spans)


def test_render_without_colour_is_plain_with_timestamp():
    painter = client.Painter(colour=False)
    line = client.render(client.classify("bob: hi"), painter, "me", now=NOON)
    assert client.layout(line, 80, painter) == ["[12:00:05] bob: hi"]


def test_render_history_uses_original_time_in_local_zone():
    painter = client.Painter(colour=False)
    message = client.classify("[history 2026-11-26T17:04:51Z] bob: earlier")
    local = message.time.astimezone().strftime("%H:%M:%S")
    assert client.render(message, painter, "me", now=NOON).plain == f"[{local}] bob: earlier"


def test_render_colours_each_kind_differently():
    painter = client.Painter(colour=True)
    lines = ["*** bob joined #lobby", "-- reply", "!! error", "[pm from bob] x",
             "*** Topic of #lobby: plans"]
    rendered = {painted(client.classify(line), painter) for line in lines}
    styles = {text.split("m", 1)[0] for text in rendered}
    assert len(styles) == len(lines)


def test_nick_colour_is_stable_and_ignores_case():
    assert client.nick_colour("Alice") == client.nick_colour("alice")
    assert client.nick_colour("alice") == client.NICK_COLOURS[
        __import__("zlib").crc32(b"alice") % len(client.NICK_COLOURS)]


def test_render_highlights_mention():
    painter = client.Painter(colour=True)
    assert "\x1b[1;7mme\x1b[0m" in painted(client.classify("bob: hi me!"), painter)


# -- the flood limit a greeting announces ------------------------------------------

@pytest.mark.parametrize("greeting, limit", [
    ("*** pyChat 1.0.0: 1 online. Flood limit: 20 lines at once, then 4 a second.", (20, 4.0)),
    ("*** x. Flood limit: 5 lines at once, then 0.5 a second.", (5, 0.5)),
    ("*** x. Flood limit: 20 lines at once, then . a second.", None),
    ("*** x. Flood limit: 20 lines at once, then 0 a second.", None),
    ("*** x. Flood limit: 0 lines at once, then 4 a second.", None),
    ("*** x. Flood limit: 20 lines at once, then 0.000001 a second.", (20, 0.2)),
    ("*** x. Flood limit: 99999999999 lines at once, then 4 a second.", None),
    ("*** no limit announced", None),
])
def test_flood_limit_is_read_defensively(greeting, limit):
    assert client.flood_limit(greeting) == limit


def test_history_time_that_cannot_be_shown_locally_is_shown_as_sent():
    message = client.classify("[history 9999-12-31T23:59:59Z] bob: hi")
    shown = client.render(message, client.Painter(colour=False), "me", now=NOON).plain
    assert shown.endswith("bob: hi") and shown.startswith("[")


# -- wrapping ----------------------------------------------------------------------

def rows_of(line: str, width: int, me: str = "me") -> list[str]:
    painter = client.Painter(colour=False)
    return client.layout(client.render(client.classify(line), painter, me, now=NOON), width, painter)


def test_wrap_breaks_at_words_and_hangs_under_the_text():
    rows = rows_of("bob: " + "lorem ipsum dolor sit amet " * 3, 40)
    assert rows == ["[12:00:05] bob: lorem ipsum dolor sit",
                    "                amet lorem ipsum dolor",
                    "                sit amet lorem ipsum",
                    "                dolor sit amet"]


def test_wrap_cuts_a_word_longer_than_a_row_and_never_splits_a_wide_character():
    rows = rows_of("bob: " + "漢" * 30, 30)
    assert all(client.text_width(row) <= 30 for row in rows), rows
    assert "".join(row.strip() for row in rows).endswith("漢" * 30)
    assert all(row.startswith(" " * 11) for row in rows[1:]), rows


def test_continuation_rows_of_a_line_full_of_spaces_cannot_pass_for_lines_of_their_own():
    fake = "[12:00:09] *** alice quit (Ping timeout)"
    for width in (40, 80, 100):
        for padding in range(1, 120, 7):
            rows = rows_of("mallory: hi" + " " * padding + fake, width)
            assert all(row.startswith(" ") for row in rows[1:]), rows
            assert not any(row.startswith("[12:00:09]") for row in rows), rows


def test_help_rows_wrap_under_their_summary_column_or_give_it_up_when_narrow():
    line = "-- /ignore [NICK]          Stop seeing someone's lines, or list whom you ignore."
    wide = rows_of(line, 60)
    column = wide[0].index("Stop")
    assert len(wide) > 1 and all(row[:column].strip() == "" and row[column] != " " for row in wide[1:]), wide
    narrow = rows_of(line, 30)
    assert narrow[0].startswith("[12:00:05] -- /ignore [NICK]"), narrow
    assert all(len(row) <= 30 for row in narrow) and not any(row.endswith(" l") for row in narrow), narrow
    assert " ".join(row.strip() for row in narrow).endswith("list whom you ignore."), narrow


def test_wrap_keeps_leading_spaces_of_the_first_row():
    assert rows_of("bob:     indented", 80) == ["[12:00:05] bob:     indented"]


# -- nickname colours --------------------------------------------------------------

def xterm_rgb(number: int) -> tuple[int, int, int]:
    levels = (0, 95, 135, 175, 215, 255)
    number -= 16
    return levels[number // 36], levels[number // 6 % 6], levels[number % 6]


def luminance(rgb: tuple[int, int, int]) -> float:
    def linear(channel: int) -> float:
        value = channel / 255
        return value / 12.92 if value <= 0.03928 else ((value + 0.055) / 1.055) ** 2.4
    red, green, blue = (linear(channel) for channel in rgb)
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue


def test_nick_colours_read_on_black_and_on_white_and_keep_away_from_the_line_styles():
    import colorsys
    for code in client.NICK_COLOURS:
        number = int(code.rsplit(";", 1)[1])
        assert 16 <= number < 232, code
        rgb = xterm_rgb(number)
        light = luminance(rgb)
        assert (light + 0.05) / 0.05 >= 3, f"{code} is too dark on black"
        assert 1.05 / (light + 0.05) >= 3, f"{code} is too light on white"
        hue = colorsys.rgb_to_hls(*(channel / 255 for channel in rgb))[0] * 360
        for name, style_hue in (("red errors", 0), ("yellow topics", 60), ("green replies", 120),
                                ("cyan notices", 180), ("magenta private messages", 300)):
            distance = min(abs(hue - style_hue), 360 - abs(hue - style_hue))
            assert distance >= 15, f"{code} looks like the {name}"
    assert len(set(client.NICK_COLOURS)) == len(client.NICK_COLOURS)


def test_people_seen_together_get_different_colours_until_the_palette_runs_out():
    painter = client.Painter(colour=True)
    nicks = [f"user{n}" for n in range(len(client.NICK_COLOURS))]
    assert len({painter.nick_style(nick) for nick in nicks}) == len(nicks)
    assert painter.nick_style("USER3") == painter.nick_style("user3")
    first = client.Painter(colour=True)
    assert first.nick_style("alice") == client.nick_colour("alice")   # alone, the CRC decides


def test_a_colour_is_free_again_when_its_wearer_leaves():
    painter = client.Painter(colour=True)
    worn = {nick: painter.nick_style(nick) for nick in (f"user{n}" for n in range(len(client.NICK_COLOURS)))}
    painter.forget("user5")
    assert painter.nick_style("newcomer") == worn["user5"]


# -- rooms ---------------------------------------------------------------------------

def test_classify_room_tag_keeps_the_room_and_the_line_as_it_would_be():
    message = client.classify("#dev bob: hi #lobby")
    assert (message.room, message.kind, message.nick, message.body, message.text) == \
        ("dev", "chat", "bob", "hi #lobby", "bob: hi #lobby")
    notice = client.classify("#dev *** carol joined #dev")
    assert (notice.room, notice.kind, notice.text) == ("dev", "notice", "*** carol joined #dev")
    assert client.classify("bob: #dev is here").room == ""


def follow(rooms, *lines, me="me"):
    for line in lines:
        message = client.classify(line)
        rooms.learn(message, client.mentions(message, me))


def test_rooms_follow_the_server_and_count_unread_lines_elsewhere():
    rooms = client.Rooms()
    follow(rooms, "*** You are in #lobby, alone for now.", "*** You are in #dev with bob.",
           "*** You are in #ops, alone for now.", "*** Now talking in #lobby.",
           "#dev bob: one", "#dev * bob waves at me", "#dev *** carol joined #dev", "#ops x: me?")
    assert rooms.joined == ["lobby", "dev", "ops"] and rooms.current == "lobby"
    assert rooms.activity() == [("dev", 2, True), ("ops", 1, True)]
    follow(rooms, "*** Now talking in #dev.")
    assert rooms.activity() == [("ops", 1, True)]
    follow(rooms, "*** You left #ops.", "*** You were kicked from #dev by op: spam.",
           "*** Now talking in #lobby.")
    assert (rooms.joined, rooms.current, rooms.activity()) == (["lobby"], "lobby", [])


def test_rooms_cycle_and_number_in_the_order_entered():
    rooms = client.Rooms()
    follow(rooms, "*** You are in #lobby.", "*** You are in #dev.", "*** You are in #ops.")
    assert (rooms.neighbour(1), rooms.neighbour(-1), rooms.numbered(2), rooms.numbered(4)) == \
        ("lobby", "dev", "dev", None)


@pytest.mark.parametrize("before, completed", [
    ("/join #d", "/join #dev "), ("/join d", "/join #dev "), ("/leave #o", "/leave #ops "),
    ("/msg #d", "/msg #dev "), ("/who o", "/who #ops "), ("/msg d", "/msg dave "),
])
def test_complete_room_names_after_room_commands(before, completed):
    assert client.complete_word(before, ["join"], ["dave"], ["dev", "ops"]) == (completed, [])


# -- bracketed paste -----------------------------------------------------------------

def test_bracketed_paste_is_one_key_with_tabs_newlines_and_escapes_as_text():
    decoder = client.KeyDecoder()
    keys = decoder.feed(b"ab\x1b[200~x\ty\r\n\x1b[A\x03z\x1b[20")
    assert keys == [client.Key("text", "ab")] and decoder.pasting and not decoder.waiting
    keys = decoder.feed(b"1~cd")
    assert keys == [client.Key("paste", "x\ty\r\n\x1b[A\x03z"), client.Key("text", "cd")]
    assert not decoder.pasting


def test_a_paste_beyond_the_limit_is_cut_and_the_rest_counted(monkeypatch):
    monkeypatch.setattr(client, "PASTE_LIMIT", 10)
    decoder = client.KeyDecoder()
    assert decoder.feed(b"\x1b[200~" + b"x" * 25 + b"\x1b[201~") == [client.Key("paste", "x" * 10)]
    assert decoder.paste_dropped == 15


# -- the settings file ---------------------------------------------------------------

def write_settings(tmp_path, text: str) -> dict:
    folder = tmp_path / "pychat"
    folder.mkdir(exist_ok=True)
    (folder / "config").write_text(text)
    return {"XDG_CONFIG_HOME": str(tmp_path)}


def test_settings_file_gives_defaults_and_the_command_line_wins(tmp_path):
    environment = write_settings(tmp_path, "[pychat]\nhost = chat.example.org\nport = 6000\n"
                                           "nick = alice\ntls = yes\ncolor = no\nbell = on\n")
    options = client.parse_options([], environment)
    assert (options.host, options.port, options.nick, options.tls, options.color, options.bell) == \
        ("chat.example.org", 6000, "alice", True, False, True)
    options = client.parse_options(["--port", "7000", "--no-tls", "--color", "--nick", "bob"], environment)
    assert (options.host, options.port, options.nick, options.tls, options.color) == \
        ("chat.example.org", 7000, "bob", False, True)


def test_settings_path_follows_xdg_config_home_or_falls_back_to_dot_config(tmp_path, monkeypatch):
    assert client.config_path({"XDG_CONFIG_HOME": "/x"}) == "/x/pychat/config"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert client.config_path({}) == f"{tmp_path}/.config/pychat/config"
    assert client.parse_options([], {"XDG_CONFIG_HOME": str(tmp_path / "none")}).port == 25000


@pytest.mark.parametrize("text, complaint", [
    ("[pychat]\ncolour = no\n", "unknown setting 'colour'"),
    ("[pychat]\ntls = maybe\n", "tls must be yes or no"),
    ("[pychat]\nport = 99999\n", "port: '99999' is not a port number"),
    ("[client]\nhost = x\n", "unknown section [client]"),
    ("host = x\n", "settings file"),
])
def test_a_bad_settings_file_is_one_line_naming_the_file_and_the_setting(tmp_path, capsys, text, complaint):
    environment = write_settings(tmp_path, text)
    with pytest.raises(SystemExit) as stopped:
        client.parse_options([], environment)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert complaint in error and str(tmp_path / "pychat" / "config") in error, error
    assert "Traceback" not in error
