"""The pure parts of the IRC front door, called directly: messages, tags, splitting, numerics,
capabilities, formatting codes, registration, the ping clock, and how IrcProtocol renders the core's
events for each set of capabilities (message ids, client tags, accounts, joins, notices, MONITOR)."""
from __future__ import annotations

import random
import time

import pytest

from conftest import SERVER_SCRIPT, import_script

server = import_script(SERVER_SCRIPT, "pychat_server")
Message = server.IrcMessage


# -- reading messages -------------------------------------------------------------------------------

@pytest.mark.parametrize("line, expected", [
    ("NICK alice", Message("NICK", ["alice"])),
    ("nick alice", Message("NICK", ["alice"])),
    ("PRIVMSG #dev :hello there", Message("PRIVMSG", ["#dev", "hello there"])),
    ("PRIVMSG #dev ::-) smile", Message("PRIVMSG", ["#dev", ":-) smile"])),
    ("PRIVMSG #dev :", Message("PRIVMSG", ["#dev", ""])),
    ("USER alice 0 * :Alice Liddell", Message("USER", ["alice", "0", "*", "Alice Liddell"])),
    ("JOIN   #a,#b    key  ", Message("JOIN", ["#a,#b", "key"])),
    (":alice!a@h PRIVMSG bob hi", Message("PRIVMSG", ["bob", "hi"], "alice!a@h")),
    ("@time=2026-12-01T10:00:00.000Z;+draft/x PING :tok",
     Message("PING", ["tok"], None, {"time": "2026-12-01T10:00:00.000Z", "+draft/x": ""})),
    ("001 alice :Welcome", Message("001", ["alice", "Welcome"])),
])
def test_irc_messages_are_read_into_command_and_parameters(line, expected):
    assert server.parse_irc_message(line) == expected


def test_a_sixteenth_parameter_and_beyond_stay_in_the_fifteenth():
    message = server.parse_irc_message("MODE " + " ".join(str(n) for n in range(20)))
    assert len(message.params) == 15
    assert message.params[-1] == "14 15 16 17 18 19"


@pytest.mark.parametrize("line", ["", "   "])
def test_an_empty_line_is_no_message(line):
    assert server.parse_irc_message(line) is None


@pytest.mark.parametrize("line", ["@a=b", ":source", "@a=b :source "])
def test_tags_or_a_source_without_a_command_are_refused(line):
    with pytest.raises(server.IrcLineError, match="command"):
        server.parse_irc_message(line)


def test_the_body_may_be_510_bytes_but_not_511_and_multibyte_characters_count_in_bytes():
    head = "PRIVMSG #dev :"
    assert server.parse_irc_message(head + "x" * (510 - len(head))).params[1] == "x" * (510 - len(head))
    with pytest.raises(server.IrcLineError, match="too long"):
        server.parse_irc_message(head + "x" * (511 - len(head)))
    with pytest.raises(server.IrcLineError, match="too long"):
        server.parse_irc_message(head + "é" * 250)      # 500 bytes of text, 514 in all


def test_tags_have_their_own_8191_byte_budget_beside_the_510_of_the_body():
    body = "PRIVMSG #dev :" + "x" * 496
    tags = "@+a=" + "y" * (8191 - 1 - 4)          # with the space after it: 8191 bytes
    assert server.parse_irc_message(f"{tags} {body}").command == "PRIVMSG"
    with pytest.raises(server.IrcLineError, match="tags"):
        server.parse_irc_message(f"{tags}y {body}")


@pytest.mark.parametrize("raw, value", [
    (r"a\sb", "a b"), (r"semi\:colon", "semi;colon"), (r"back\\slash", "back\\slash"),
    (r"cr\rlf\n", "cr\rlf\n"), (r"unknown\x", "unknownx"), ("trailing\\", "trailing"), ("", ""),
])
def test_tag_values_are_unescaped_as_the_message_tags_specification_says(raw, value):
    assert server.unescape_tag_value(raw) == value


@pytest.mark.parametrize("value", ["plain", "a b;c\\d\r\n", "", "ünïcödé ; \\s"])
def test_tag_values_escape_and_unescape_to_themselves(value):
    escaped = server.escape_tag_value(value)
    assert not set(escaped) & set("; \r\n")
    assert server.unescape_tag_value(escaped) == value


def test_a_middle_parameter_is_always_one_word_so_the_message_reads_back_as_written():
    line = server.format_irc_message("403", ("alice", "#t x", "", "No such channel"), "pychat.server")
    assert server.parse_irc_message(line).params == ["alice", "#t", "*", "No such channel"], line


def test_the_quick_ways_past_str_translate_give_what_it_gives():
    """escape_tag_value() and without_irc_breaks() skip str.translate() for text that needs nothing:
    on random text, with and without the characters that matter, they give what it gives."""
    chooser = random.Random(11)
    for _ in range(3000):
        text = "".join(chooser.choice("ab ;\\\r\n\0\x02é") for _ in range(chooser.randrange(12)))
        assert server.escape_tag_value(text) == text.translate(server._TAG_ESCAPING), repr(text)
        assert server.without_irc_breaks(text) == text.translate(server._IRC_BREAKS), repr(text)


# -- writing messages -------------------------------------------------------------------------------

@pytest.mark.parametrize("params, expected", [
    (("#dev", "hello"), ":pychat.server PRIVMSG #dev hello"),
    (("#dev", "hello there"), ":pychat.server PRIVMSG #dev :hello there"),
    (("#dev", ":-)"), ":pychat.server PRIVMSG #dev ::-)"),
    (("#dev", ""), ":pychat.server PRIVMSG #dev :"),
])
def test_the_last_parameter_is_written_as_a_trailing_one_when_it_has_to_be(params, expected):
    written = server.format_irc_message("PRIVMSG", params)
    assert written == expected
    assert server.parse_irc_message(written).params == list(params)


def test_line_breaks_and_nul_never_leave_in_a_message():
    written = server.format_irc_message("PRIVMSG", ("#dev", "one\r\nQUIT :two\0"), "a!b@c")
    assert written == ":a!b@c PRIVMSG #dev :oneQUIT :two"


def test_tags_are_written_first_and_escaped():
    written = server.format_irc_message("PRIVMSG", ("#dev", "hi"), "a!b@c", {"time": "t 1", "+x": ""})
    assert written == r"@time=t\s1;+x :a!b@c PRIVMSG #dev hi"
    assert server.parse_irc_message(written).tags == {"time": "t 1", "+x": ""}


@pytest.mark.parametrize("text", [
    "word " * 300,
    "x" * 3000,
    "漢字" * 700,
    "😀" * 500 + " end",
    "a" + " " * 1000 + "b",
    "ab" * 10 + "é" * 1000,
])
def test_a_long_line_is_split_into_messages_that_fit_and_together_hold_all_of_it(text):
    text = text.strip()
    messages = server.irc_text_messages("PRIVMSG", "#dev", text, "alice!~alice@pychat")
    assert len(messages) > 1
    pieces = []
    for written in messages:
        assert len(written.encode("utf-8")) <= 510, f"{len(written.encode())} bytes: {written[:60]}..."
        message = server.parse_irc_message(written)
        assert message.command == "PRIVMSG" and message.params[0] == "#dev"
        pieces.append(message.params[1])
    joined = "".join(pieces)
    # Pieces cut at a space lose that one space; nothing else is lost or changed.
    assert joined.replace(" ", "") == text.replace(" ", "")
    assert len(" ".join(pieces)) >= len(text) - text.count("  ")


def test_a_cut_prefers_the_last_space_and_never_splits_a_character():
    pieces = server.split_utf8("aaaa bbbb cccc", 10)
    assert pieces == ["aaaa bbbb", "cccc"]
    pieces = server.split_utf8("ééééé", 5)                # 2 bytes each: a cut at 5 would split one
    assert pieces == ["éé", "éé", "é"]
    assert server.split_utf8("short", 100) == ["short"]


def test_a_relayed_line_is_cut_only_when_it_would_not_fit_and_never_inside_a_character():
    chooser = random.Random(3)
    for _ in range(3000):
        text = "".join(chooser.choice("aé€😀 ") for _ in range(chooser.randrange(200)))
        source = server.irc_source("n" * chooser.randrange(1, 21), "~user")
        target = "#" + "é" * chooser.randrange(1, 21)
        wrap = chooser.choice((("", ""), ("\x01ACTION ", "\x01")))
        cut = server.irc_cut_to_fit("PRIVMSG", target, source, text, wrap)
        head = server.format_irc_message("PRIVMSG", (target,), source) + " :" + wrap[0] + wrap[1]
        assert text.startswith(cut) and len((head + cut).encode("utf-8")) <= server.IRC_MAX_BODY_BYTES
        if len((head + text).encode("utf-8")) <= server.IRC_MAX_BODY_BYTES:
            assert cut == text
        else:
            assert len((head + text[:len(cut) + 1]).encode("utf-8")) > server.IRC_MAX_BODY_BYTES


def test_split_messages_carry_their_tags_on_every_piece():
    messages = server.irc_text_messages("PRIVMSG", "#dev", "y" * 1200, "a!b@c", {"time": "T"})
    assert len(messages) == 3
    assert all(m.startswith("@time=T :a!b@c PRIVMSG #dev :") for m in messages)


# -- numerics ---------------------------------------------------------------------------------------

def test_every_numeric_has_a_three_digit_code_and_no_code_is_used_twice():
    codes = [code for code, _ in server.IRC_NUMERICS.values()]
    assert all(len(code) == 3 and code.isdigit() for code in codes)
    assert len(codes) == len(set(codes))


def test_a_numeric_is_addressed_to_the_client_and_ends_with_its_usual_text_or_a_better_one():
    assert server.irc_numeric("ERR_NOSUCHNICK", "alice", "bob") == \
        ":pychat.server 401 alice bob :No such nick/channel"
    assert server.irc_numeric("ERR_ERRONEUSNICKNAME", "*", "1x", text="Nickname must start with a letter.") == \
        ":pychat.server 432 * 1x :Nickname must start with a letter."
    assert server.irc_numeric("RPL_TOPIC", "alice", "#dev", text="release friday") == \
        ":pychat.server 332 alice #dev :release friday"


# -- capabilities -----------------------------------------------------------------------------------

def parse_all(lines):
    return [server.parse_irc_message(line) for line in lines]


def test_cap_ls_302_lists_every_capability_and_holds_registration_until_cap_end():
    caps = server.IrcCapabilities({"server-time": None, "sasl": "PLAIN"})
    [reply] = parse_all(caps.handle("*", ["LS", "302"], registered=False))
    assert reply.command == "CAP" and reply.params[:2] == ["*", "LS"]
    assert reply.params[-1].split() == ["server-time", "sasl=PLAIN"]
    assert caps.negotiating
    assert caps.handle("*", ["END"], registered=False) == []
    assert not caps.negotiating


def test_cap_ls_without_302_lists_no_values():
    caps = server.IrcCapabilities({"server-time": None, "sasl": "PLAIN"})
    [reply] = parse_all(caps.handle("*", ["LS"], registered=False))
    assert reply.params[-1].split() == ["server-time", "sasl"]


def test_a_long_cap_ls_302_is_continued_over_lines_marked_with_a_star():
    offered = {f"vendor.example/capability-number-{n}": None for n in range(40)}
    caps = server.IrcCapabilities(offered)
    replies = parse_all(caps.handle("*", ["LS", "302"], registered=False))
    assert len(replies) > 1
    assert all(r.params[2] == "*" for r in replies[:-1]) and replies[-1].params[2] != "*"
    assert all(len(line.encode()) <= 510 for line in caps.handle("*", ["LS", "302"], registered=False))
    listed = [name for r in replies for name in r.params[-1].split()]
    assert listed == list(offered)


def test_cap_req_is_all_or_nothing_and_can_take_a_capability_back():
    caps = server.IrcCapabilities(server.IRC_CAPABILITIES)
    [nak] = parse_all(caps.handle("*", ["REQ", "server-time no-such-cap"], registered=False))
    assert nak.params[1:] == ["NAK", "server-time no-such-cap"]
    assert caps.enabled == set()
    [ack] = parse_all(caps.handle("*", ["REQ", "server-time multi-prefix"], registered=False))
    assert ack.params[1:] == ["ACK", "server-time multi-prefix"]
    assert caps.enabled == {"server-time", "multi-prefix"}
    caps.handle("alice", ["REQ", "-multi-prefix"], registered=True)
    assert caps.enabled == {"server-time"}
    [listing] = parse_all(caps.handle("alice", ["LIST"], registered=True))
    assert listing.params[1:] == ["LIST", "server-time"]


def test_cap_after_registration_does_not_hold_anything():
    caps = server.IrcCapabilities(server.IRC_CAPABILITIES)
    caps.handle("alice", ["LS", "302"], registered=True)
    caps.handle("alice", ["REQ", "server-time"], registered=True)
    assert not caps.negotiating


@pytest.mark.parametrize("params, numeric", [([], "461"), (["FLY"], "410")])
def test_wrong_cap_subcommands_get_their_numeric(params, numeric):
    [reply] = parse_all(server.IrcCapabilities({}).handle("*", params, registered=False))
    assert reply.command == numeric


# -- text: formatting codes and controls --------------------------------------------------------------

@pytest.mark.parametrize("irc, plain", [
    ("\x02bold\x02 and \x1ditalic\x1d", "bold and italic"),
    ("\x0304red\x03 \x0304,12red on blue\x03 \x034x", "red red on blue x"),
    ("\x03123 digits after a colour", "3 digits after a colour"),
    ("\x04ff0000hex\x04 \x04FF0000,00ff00both\x0f", "hex both"),
    ("\x1funder\x1f \x1estrike\x1e \x11mono\x11 \x16rev\x16", "under strike mono rev"),
    ("\x1b[31mescape\x07 bell", "[31mescape bell"),
    ("\x03,05 a comma alone is text", ",05 a comma alone is text"),
])
def test_pychat_users_get_irc_text_without_formatting_codes_or_controls(irc, plain):
    assert server.strip_irc_formatting(irc) == plain


def test_irc_users_get_formatting_codes_but_no_other_control_and_no_direction_override():
    said = "\x02bold\x02 \x0304red\x03 \x1b[2J\x07\x00\x7f\x9b \u202eevil\u202c\tend"
    assert server.clean_irc_text(said) == "\x02bold\x02 \x0304red\x03 [2J evil end"


def test_nothing_but_formatting_codes_survives_for_irc_users():
    every_control = "".join(chr(c) for c in [*range(0x20), *range(0x7f, 0xa0)])
    kept = server.clean_irc_text("a" + every_control + "b")
    assert set(kept) - {"a", "b", " "} == set(server.IRC_FORMATTING)


@pytest.mark.parametrize("text, ctcp", [
    ("\x01ACTION waves\x01", ("ACTION", "waves")),
    ("\x01ACTION waves", ("ACTION", "waves")),
    ("\x01version\x01", ("VERSION", "")),
    ("plain", None),
])
def test_ctcp_messages_are_recognised(text, ctcp):
    assert server.parse_ctcp(text) == ctcp


def test_server_time_is_utc_with_milliseconds():
    assert server.irc_server_time(1764583200.25) == "2025-12-01T10:00:00.250Z"
    assert server.irc_message_time(1764583200_999_999) == "2025-12-01T10:00:00.999Z"
    chooser = random.Random(5)
    for _ in range(2000):       # the second's text is remembered: every second, and every millisecond of it
        when = chooser.randrange(0, 4_000_000_000_000) / 1000
        moment = time.gmtime(int(when))
        assert server.irc_server_time(when) == time.strftime("%Y-%m-%dT%H:%M:%S.", moment) + \
            f"{round(when * 1000) % 1000:03d}Z", when


@pytest.mark.parametrize("wanted, shown", [
    ("alice", "~alice"), ("a!l@i ce", "~alice"), ("", "~user"), ("!!!", "~user"),
    ("averyveryverylongname", "~averyvery"), ("ünï", "~n"),
])
def test_user_names_are_cleaned_and_marked_as_unverified(wanted, shown):
    assert server.irc_username(wanted) == shown


# -- registration -------------------------------------------------------------------------------------

def registration():
    return server.IrcRegistration(server.IrcCapabilities(server.IRC_CAPABILITIES))


def feed(reg, *lines):
    replies = []
    for line in lines:
        replies += reg.handle(server.parse_irc_message(line))
    return parse_all(replies)


def test_nick_and_user_in_either_order_make_registration_ready():
    for order in (("NICK alice", "USER al 0 * :Alice L"), ("USER al 0 * :Alice L", "NICK alice")):
        reg = registration()
        assert feed(reg, order[0]) == [] and not reg.ready
        assert feed(reg, order[1]) == [] and reg.ready
        assert (reg.nick, reg.username, reg.realname) == ("alice", "~al", "Alice L")


def test_cap_negotiation_holds_registration_until_cap_end():
    reg = registration()
    feed(reg, "CAP LS 302", "NICK alice", "USER al 0 * :A")
    assert not reg.ready
    [ack] = feed(reg, "CAP REQ :server-time")
    assert ack.params[:2] == ["alice", "ACK"]
    feed(reg, "CAP END")
    assert reg.ready and reg.capabilities.enabled == {"server-time"}


def test_pass_is_kept_for_the_server_to_check():
    reg = registration()
    feed(reg, "PASS :secret words", "NICK alice", "USER a 0 * :A")
    assert reg.password == "secret words"


@pytest.mark.parametrize("line, numeric", [
    ("NICK", "431"), ("NICK :", "431"), ("NICK 1abc", "432"), ("NICK a,b", "432"), ("NICK pyChat", "432"),
    ("NICK " + "a" * 21, "432"), ("NICK ѕerver", "432"), ("USER a 0 *", "461"), ("PASS", "461"),
    ("JOIN #dev", "451"), ("PRIVMSG #dev :hi", "451"), ("PING", "409"),
])
def test_mistakes_while_registering_get_their_numeric_and_no_nickname(line, numeric):
    reg = registration()
    [reply] = feed(reg, line)
    assert reply.command == numeric and reply.params[0] == "*"
    assert reg.nick is None


def test_an_erroneous_nickname_says_what_is_wrong_with_it():
    [reply] = feed(registration(), "NICK 1abc")
    assert reply.params[1:] == ["1abc", "Nickname must start with a letter."]


def test_user_twice_is_refused():
    reg = registration()
    feed(reg, "USER a 0 * :A")
    [reply] = feed(reg, "USER b 0 * :B")
    assert reply.command == "462"
    assert reg.username == "~a"


def test_ping_while_registering_is_answered():
    [pong] = feed(registration(), "PING :12345")
    assert pong.command == "PONG" and pong.params == ["pychat.server", "12345"]


def test_the_realname_is_cleaned_and_bounded():
    reg = registration()
    feed(reg, "USER a 0 * :\x1b[31mAlice\x07 " + "x" * 100)
    assert reg.realname.startswith("[31mAlice x") and len(reg.realname) == 50


# -- the ping clock -------------------------------------------------------------------------------------

def test_a_quiet_client_is_pinged_after_the_interval_and_let_go_after_as_long_again():
    clock = server.IrcPingClock(interval=60, now=1000)
    assert clock.deadline() == 1060
    assert clock.due(1059.9) is None
    assert clock.due(1060) == "ping"
    assert clock.deadline() == 1120
    assert clock.due(1100) is None
    assert clock.due(1120) == "timeout"


def test_anything_heard_puts_the_ping_off():
    clock = server.IrcPingClock(interval=60, now=1000)
    assert clock.due(1060) == "ping"
    clock.heard(1070)
    assert clock.deadline() == 1130
    assert clock.due(1120) is None
    assert clock.due(1130) == "ping"


def test_a_long_action_is_split_with_each_piece_its_own_ctcp_action():
    messages = server.irc_text_messages("PRIVMSG", "#dev", "waves " * 200, "a!b@c", wrap=("\x01ACTION ", "\x01"))
    assert len(messages) > 1
    for written in messages:
        assert len(written.encode()) <= 510
        text = server.parse_irc_message(written).params[1]
        assert text.startswith("\x01ACTION waves") and text.endswith("\x01")


# -- SASL PLAIN -------------------------------------------------------------------------------------------

def plain(authorization: str, account: str, password: str) -> str:
    import base64
    return base64.b64encode(f"{authorization}\0{account}\0{password}".encode()).decode()


def test_sasl_plain_asks_for_the_credentials_and_hands_them_over():
    sasl = server.IrcSasl()
    replies, credentials = sasl.handle("*", "PLAIN")
    assert replies == ["AUTHENTICATE +"] and credentials is None
    assert sasl.handle("*", plain("", "alice", "secret words")) == ([], ("alice", "secret words"))
    sasl.handle("*", "PLAIN")
    assert sasl.handle("*", plain("alice", "alice", "pw")) == ([], ("alice", "pw"))


def test_sasl_credentials_may_come_in_400_byte_pieces():
    sasl = server.IrcSasl()
    sasl.handle("*", "PLAIN")
    encoded = plain("", "alice", "p" * 593)           # 800 bytes of base64: two full pieces, then "+"
    assert len(encoded) == 800
    assert sasl.handle("*", encoded[:400]) == ([], None)
    assert sasl.handle("*", encoded[400:]) == ([], None)
    assert sasl.handle("*", "+") == ([], ("alice", "p" * 593))


@pytest.mark.parametrize("steps, numeric", [
    (["EXTERNAL"], "904"), (["PLAIN", "not base64!"], "904"), (["PLAIN", "*"], "906"),
    (["PLAIN", "x" * 401], "905"), (["PLAIN", plain("bob", "alice", "pw")], "904"),
    (["PLAIN", *(["x" * 400] * 4), "x"], "905"),
])
def test_sasl_mistakes_get_their_numeric(steps, numeric):
    sasl = server.IrcSasl()
    for step in steps:
        replies, credentials = sasl.handle("*", step)
    assert credentials is None
    assert server.parse_irc_message(replies[-1]).command == numeric


def test_a_long_names_list_is_spread_over_353s_that_fit_and_lose_no_one():
    names = [f"@person{n:03d}" if n % 7 == 0 else f"person{n:03d}" for n in range(200)]
    replies = server.irc_names_replies("alice", "#dev", names)
    assert replies[-1] == ":pychat.server 366 alice #dev :End of /NAMES list"
    listed = []
    for reply in replies[:-1]:
        assert len(reply.encode()) <= 510
        message = server.parse_irc_message(reply)
        assert message.command == "353" and message.params[:3] == ["alice", "=", "#dev"]
        listed += message.params[3].split(" ")
    assert listed == names
    assert len(replies) - 1 == 5, "the lines are not as full as they could be"


def test_an_event_irc_has_no_words_for_arrives_as_pychat_says_it_in_a_notice():
    class Unknown(tuple):
        pass

    server.PyChatProtocol.LINES[Unknown] = lambda event: "*** something new happened"
    try:
        class Connection:
            nick = "alice"

        written = server.IrcProtocol(Connection()).encode(Unknown())
    finally:
        del server.PyChatProtocol.LINES[Unknown]
    assert written == b":pychat.server NOTICE alice :*** something new happened\r\n"


def test_every_event_the_core_has_today_has_irc_words_of_its_own():
    missing = set(server.PyChatProtocol.LINES) - set(server.IrcProtocol.RENDERERS)
    assert not missing, f"events IRC users would get only as notices: {sorted(e.__name__ for e in missing)}"


# -- what modern clients, bots and bridges rely on ------------------------------------------------------

class Receiver:
    """What IrcProtocol asks of its connection: the receiver's nickname, person, account and real name."""

    def __init__(self, nick: str = "alice", account: str | None = None, realname: str = "") -> None:
        self.nick, self.person, self.account, self.realname = nick, None, account, realname

    @staticmethod
    def username_of(nick: str) -> str:
        return "~user"


def rendered(event, *capabilities: str, receiver: Receiver | None = None) -> list[server.IrcMessage]:
    written = server.IrcProtocol(receiver or Receiver(), frozenset(capabilities)).encode(event)
    return [server.parse_irc_message(line) for line in written.decode().split("\r\n") if line]


@pytest.mark.parametrize("pattern, text, fits", [
    ("*", "", True), ("*", "alice", True), ("a*", "alice", True), ("*e", "alice", True), ("a?ice", "alice", True),
    ("a?ice", "alce", False), ("*li*", "alice", True), ("*x*", "alice", False), ("alic", "alice", False),
    ("alice*", "alice", True), ("**a**", "a", True), ("?", "", False),
])
def test_masks_fit_with_star_and_question_mark(pattern, text, fits):
    assert server.fits_pattern(pattern, text) is fits


def test_a_mask_of_many_stars_is_checked_in_no_time():
    pattern = "*a" * 200 + "*b"
    started = time.monotonic()
    assert not server.fits_pattern(pattern, "a" * 500)
    assert time.monotonic() - started < 0.5, "the mask took exponential time"


def test_only_client_tags_with_well_formed_keys_are_passed_on_and_their_values_cleaned():
    tags = {"+typing": "active", "+draft/reply": "x1", "+example.org/emoji": "w\x1b[2Jave", "time": "forged",
            "msgid": "forged", "+bad key": "1", "+": "no name", "+a/b/c": "two slashes"}
    assert server.irc_client_tags(tags) == (("+typing", "active"), ("+draft/reply", "x1"),
                                           ("+example.org/emoji", "w[2Jave"))
    assert server.irc_client_tags(None) == ()


def test_more_client_tag_data_than_4094_bytes_is_refused_with_417():
    assert server.irc_client_tags({"+a": "x" * (4094 - 3)})       # '+a=' and the value: 4094 bytes
    with pytest.raises(server.IrcLineError) as refused:
        server.irc_client_tags({"+a": "x" * (4094 - 2)})
    assert refused.value.numeric == "ERR_INPUTTOOLONG"


def test_a_chat_line_carries_its_id_and_client_tags_only_to_those_who_take_message_tags():
    said = server.Said("dev", "bob", "hello", "abc-7", (("+draft/reply", "abc-3"),))
    [tagged] = rendered(said, "message-tags")
    assert tagged.tags == {"+draft/reply": "abc-3", "msgid": "abc-7"}
    assert tagged.command == "PRIVMSG" and tagged.params == ["#dev", "hello"]
    [plain] = rendered(said, "server-time")
    assert list(plain.tags) == ["time"]
    [bare] = rendered(said)
    assert bare.tags is None


def test_every_piece_of_a_long_line_has_an_id_of_its_own():
    said = server.Said("dev", "bob", "word " * 300, "abc-7")
    ids = [message.tags["msgid"] for message in rendered(said, "message-tags")]
    assert len(ids) > 1 and ids[0] == "abc-7" and len(set(ids)) == len(ids)


def test_a_replayed_line_keeps_its_id_and_its_time():
    replayed = server.Replayed(1_700_000_000.0, server.Said("dev", "bob", "old", "abc-1"))
    [line] = rendered(replayed, "message-tags", "server-time")
    assert line.tags == {"time": "2023-11-14T22:13:20.000Z", "msgid": "abc-1"}
    assert line.params == ["#dev", "old"]


def test_tagmsg_goes_only_to_those_who_take_message_tags_and_pychat_has_no_words_for_it():
    event = server.TagMessage("dev", "bob", "#dev", "abc-9", (("+typing", "active"),))
    [line] = rendered(event, "message-tags")
    assert (line.command, line.params, line.source) == ("TAGMSG", ["#dev"], "bob!~user@pychat")
    assert line.tags == {"+typing": "active", "msgid": "abc-9"}
    assert rendered(event, "server-time", "echo-message") == []
    assert server.PYCHAT.encode(event) == b"" and server.PYCHAT.encode(event, tagged=True) == b""


def test_account_news_goes_to_those_who_asked_for_it():
    [line] = rendered(server.AccountChanged("bob", "bob"), "account-notify")
    assert (line.source, line.command, line.params) == ("bob!~user@pychat", "ACCOUNT", ["bob"])
    [line] = rendered(server.AccountChanged("bob", None), "account-notify")
    assert line.params == ["*"]
    assert rendered(server.AccountChanged("bob", "bob")) == []
    assert server.PYCHAT.encode(server.AccountChanged("bob", "bob")) == b""


def test_extended_join_names_the_account_and_userhost_in_names_the_whole_mask():
    [join] = rendered(server.Joined("dev", "bob", "bob", "Bob Builder"), "extended-join")
    assert join.params == ["#dev", "bob", "Bob Builder"]
    [join] = rendered(server.Joined("dev", "bob"), "extended-join")
    assert join.params == ["#dev", "*", "bob"]
    [join] = rendered(server.Joined("dev", "bob", "bob"))
    assert join.params == ["#dev"]
    entered = server.Entered("dev", ("bob",), 0, ("alice", "bob", "carol"),
                             ranks=(("bob", True, False), ("carol", True, True)))
    own_join, names, _ = rendered(entered, "userhost-in-names", "extended-join",
                                  receiver=Receiver("alice", "alice", "Alice L."))
    assert own_join.params == ["#dev", "alice", "Alice L."]
    assert names.params[-1] == "alice!~user@pychat @bob!~user@pychat @carol!~user@pychat"
    _, names, _ = rendered(entered)
    assert names.params[-1] == "alice @bob @carol"
    _, names, _ = rendered(entered, "multi-prefix")
    assert names.params[-1] == "alice @bob @+carol"


def test_protocols_differ_by_every_capability_that_changes_what_is_sent():
    receiver = Receiver()
    plain = server.IrcProtocol(receiver)
    for capability in sorted(server.IRC_RENDERING_CAPABILITIES):
        assert server.IrcProtocol(receiver, frozenset({capability})) != plain, capability
    assert server.IrcProtocol(receiver, frozenset({"sasl", "cap-notify"})) == plain


@pytest.mark.parametrize("argument, letters, token", [
    ("%tcnuhraf,42", "tcuhnfar", "42"), ("%na", "na", ""), ("%tn,1234", "n", ""), ("%tn", "n", ""),
    ("%zzn", "n", ""), ("%", "", ""),
])
def test_whox_fields_come_in_whox_order_with_a_token_of_up_to_three_digits(argument, letters, token):
    assert server.irc_whox_fields(argument) == (letters, token)


@pytest.mark.parametrize("argument, kept", [
    ("", None), ("#dev", ["dev"]), ("#DEV,#ops", ["dev", "ops"]), ("#dev*", ["dev", "devops"]),
    (">1", ["dev", "lobby"]), ("<2", ["devops", "ops"]), ("!#dev*", ["lobby", "ops"]),
    ("#dev*,>1", ["dev"]), (">x", []),
])
def test_list_filters_by_channel_mask_negated_mask_and_people(argument, kept):
    rooms = [server.commands.RoomInfo(name, people, None, False, False, False)
             for name, people in (("dev", 2), ("devops", 1), ("lobby", 5), ("ops", 1))]
    wanted = server.irc_list_wanted(argument)
    assert (wanted if wanted is None else [room.name for room in rooms if wanted(room)]) == kept


def test_isupport_says_which_who_and_list_forms_are_understood():
    tokens = server.irc_isupport_tokens(server.parse_options(["--irc-port", "0"]))
    assert "WHOX" in tokens and "ELIST=MNU" in tokens
    assert any(token.startswith("TARGMAX=") and "TAGMSG:4" in token for token in tokens)


def test_account_tag_names_the_senders_account_to_those_who_asked_for_it():
    said = server.Said("dev", "bob", "hello", "abc-7", (), "bob")
    [line] = rendered(said, "account-tag")
    assert line.tags == {"account": "bob"}
    [line] = rendered(server.Said("dev", "carol", "hello", "abc-8"), "account-tag")
    assert line.tags is None, "a guest has no account to name"
    [line] = rendered(server.PrivateFrom("bob", "psst", "abc-9", (), "bob"), "account-tag", "message-tags")
    assert line.tags == {"account": "bob", "msgid": "abc-9"}


def test_a_notice_is_rendered_as_a_notice_to_irc_users_and_as_a_line_to_pychat_users():
    said = server.Said("dev", "bot", "an answer", notice=True)
    [line] = rendered(said)
    assert (line.command, line.params) == ("NOTICE", ["#dev", "an answer"])
    assert server.PYCHAT.encode(said) == server.PYCHAT.encode(server.Said("dev", "bot", "an answer"))
    [line] = rendered(server.PrivateFrom("bot", "psst", notice=True))
    assert (line.command, line.params) == ("NOTICE", ["alice", "psst"])
    [line] = rendered(server.PrivateTo("bob", "psst", notice=True), "echo-message")
    assert (line.command, line.source) == ("NOTICE", "alice!~user@pychat")


def test_someone_who_joins_away_is_said_to_be_away_to_those_who_asked_for_away_notify():
    event = server.Joined("dev", "bob", None, "", "lunch")
    join, away = rendered(event, "away-notify")
    assert join.command == "JOIN" and (away.command, away.params, away.source) == ("AWAY", ["lunch"],
                                                                                     "bob!~user@pychat")
    assert [line.command for line in rendered(event)] == ["JOIN"]
    assert [line.command for line in rendered(server.Joined("dev", "bob"), "away-notify")] == ["JOIN"]


def test_comma_lists_are_spread_over_messages_that_fit_and_lose_no_one():
    items = [f"someone{n:03d}!~user@pychat" for n in range(100)]
    lines = server.irc_comma_lists("RPL_MONONLINE", "alice", items)
    assert all(len(line.encode()) <= 510 for line in lines)
    assert [item for line in lines for item in server.parse_irc_message(line).params[-1].split(",")] == items
    assert len(lines) == 5, "the lines are not as full as they could be"     # 20 of 24 bytes in each
    assert server.irc_comma_lists("RPL_MONONLINE", "alice", []) == []


def test_watched_names_coming_and_going_are_730_and_731_and_nothing_to_pychat_users():
    [online] = rendered(server.CameOnline("bob"))
    assert (online.command, online.params) == ("730", ["alice", "bob!~user@pychat"])
    [offline] = rendered(server.WentOffline("bob"))
    assert (offline.command, offline.params) == ("731", ["alice", "bob"])
    assert server.PYCHAT.encode(server.CameOnline("bob")) == b"" == server.PYCHAT.encode(server.WentOffline("bob"))


def test_a_list_takes_its_first_twenty_filters_only():
    rooms = [server.commands.RoomInfo(f"r{n}", 1, None, False, False, False) for n in range(30)]
    wanted = server.irc_list_wanted(",".join(f"#r{n}" for n in range(30)))
    assert [room.name for room in rooms if wanted(room)] == [f"r{n}" for n in range(server.LIST_FILTERS)]


def test_an_invitation_is_news_for_the_rooms_invite_notify_clients_only():
    event = server.InvitedSomeone("dev", "alice", "bob")
    [line] = rendered(event, "invite-notify")
    assert (line.source, line.command, line.params) == ("alice!~user@pychat", "INVITE", ["bob", "#dev"])
    assert rendered(event) == [] and server.PYCHAT.encode(event) == b""


def test_a_room_regroups_someone_whose_capabilities_change_and_keeps_no_empty_audience():
    class Output:
        def __init__(self, capabilities: frozenset) -> None:
            self.protocol = server.IrcProtocol(Receiver(), capabilities)

    def session(nick: str, serial: int) -> server.Session:
        return server.Session(server.Person(nick, serial), Output(frozenset()), f"127.0.0.{serial}", 1)

    room = server.Room("dev")
    alice, bob = session("alice", 1), session("bob", 2)
    for one in (alice, bob):
        room.hear(one, current=True)
    assert list(room.audiences.values()) == [{alice.output, bob.output}]
    room.stop_hearing(alice)
    alice.output.protocol = server.IrcProtocol(Receiver(), frozenset({"message-tags"}))
    room.hear(alice, current=False)
    assert room.audiences == {(bob.output.protocol, False): {bob.output},
                              (alice.output.protocol, True): {alice.output}}
    carol = session("carol", 3)
    room.hear(carol, current=True)
    room.stop_hearing(bob)          # the first of the group, whose protocol object is in its key
    [(protocol, _)] = [key for key, outputs in room.audiences.items() if carol.output in outputs]
    assert protocol is carol.output.protocol, "the audience's key still holds the connection of someone gone"
    room.stop_hearing(alice)
    room.stop_hearing(carol)
    assert room.audiences == {}, "an emptied audience kept its key, and the connection in it"


def test_a_bots_lines_carry_the_bot_tag_to_those_who_take_message_tags():
    said = server.Said("dev", "sopel", "beep", "abc-1", bot=True)
    [line] = rendered(said, "message-tags")
    assert line.tags == {"bot": "", "msgid": "abc-1"}
    [line] = rendered(said)
    assert line.tags is None


def test_a_new_real_name_is_told_to_setname_clients_only():
    event = server.RealnameChanged("alice", "Alice Liddell")
    [line] = rendered(event, "setname")
    assert (line.source, line.command, line.params) == ("alice!~user@pychat", "SETNAME", ["Alice Liddell"])
    assert rendered(event) == [] and server.PYCHAT.encode(event) == b""
