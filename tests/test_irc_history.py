"""History for modern IRC clients, spoken raw over real sockets: batch, labeled-response, draft/chathistory
(every subcommand, both kinds of reference, the limits and the FAIL codes, who may read what) and
draft/read-marker, with message ids and read positions that last across restarts.

Each test starts a real server with --irc-port 0. To prove that something did NOT arrive, the client
sends PING afterwards and the test checks that the PONG comes first.
"""
from __future__ import annotations

import datetime

import re
import signal

import pytest

from conftest import SERVER_SCRIPT, database_rows, import_script
from test_accounts import sign_in
from test_irc import sasl

server = import_script(SERVER_SCRIPT, "pychat_server")
ACCOUNT_PASSWORD = "correct horse 42"
HISTORY = ("batch", "labeled-response", "draft/chathistory", "server-time", "message-tags", "echo-message")
EVERYTHING = HISTORY + ("draft/read-marker", "account-tag")
BEFORE_ALL, AFTER_ALL = "timestamp=2020-01-01T00:00:00.000Z", "timestamp=2262-01-01T00:00:00.000Z"


@pytest.fixture
def irc_server(start_server):
    """A server without flood control: the tests ask many questions quickly."""
    return start_server("--irc-port", "0", "--rate", "0")


def message(line: str) -> server.IrcMessage:
    return server.parse_irc_message(line)


def joined(client, channel: str) -> list[str]:
    client.send(f"JOIN {channel}")
    return client.lines_until(rf"(?:@\S+ )?:\S+ 366 \S+ {re.escape(channel)} ")


def say(client, target: str, text: str) -> server.IrcMessage:
    """TEXT from CLIENT (who asked for echo-message) to TARGET; its echo, with the line's time and msgid."""
    client.send(f"PRIVMSG {target} :{text}")
    return message(client.expect(rf"PRIVMSG {re.escape(target)} :{re.escape(text)}$"))


def nothing_more(client) -> None:
    """Nothing came to CLIENT but what it asked for: the answer to a PING is the next line."""
    client.send("PING :nothing-more")
    line = client.recv_line()
    assert re.match(r"(?:@\S+ )?:\S+ PONG \S+ :?nothing-more$", line), f"unexpected line: {line}"


def history(client, request: str, target: str | None = None) -> list[server.IrcMessage]:
    """The lines of the chathistory batch that answers REQUEST, checked: its start names TARGET (the target
    asked for), every line in it carries the batch's reference and a time and a msgid, and it ends."""
    client.send(request)
    start = message(client.expect(r"BATCH \+"))
    assert start.params[1:] == ["chathistory", target or request.split()[2]], start
    reference = start.params[0][1:]
    assert re.fullmatch(r"[A-Za-z0-9-]+", reference), start
    lines = [message(line) for line in client.lines_until(rf"(?:@\S+ )?:\S+ BATCH -{reference}$")[:-1]]
    for line in lines:
        assert line.tags["batch"] == reference and line.tags["msgid"] and line.tags["time"], line
    return lines


def texts(lines: list[server.IrcMessage]) -> list[str]:
    return [line.params[-1] for line in lines]


def failure(client, request: str) -> list[str]:
    """The parameters of the FAIL that answers REQUEST."""
    client.send(request)
    return message(client.expect(r"FAIL ")).params


def register_account(pychat_client, nick: str) -> None:
    pychat_client.login(nick)
    pychat_client.send(f"/register {ACCOUNT_PASSWORD}")
    pychat_client.expect(r"-- Registered ", timeout=10)
    pychat_client.send("/quit")
    pychat_client.wait_closed()


def signed_in(irc_connect, a_server, account: str, capabilities: tuple[str, ...] = EVERYTHING):
    """An IRC client signed in to ACCOUNT with SASL, with CAPABILITIES, past the lobby's names."""
    client = irc_connect(a_server)
    lines = sasl(client, account, account, ACCOUNT_PASSWORD, capabilities)
    assert any(" 903 " in line for line in lines), lines
    client.expect(r"366 \S+ #lobby ")
    client.nick = account
    return client


# -- what is offered ---------------------------------------------------------------------------------

def test_the_capabilities_and_isupport_tokens_of_history_are_offered(irc_server, irc_connect):
    client = irc_connect(irc_server)
    client.send("CAP LS 302")
    offered = message(client.expect(r"CAP \* LS ")).params[-1].split()
    assert {"batch", "labeled-response", "draft/chathistory", "draft/read-marker"} <= set(offered), offered
    assert "draft/event-playback" not in offered
    client.send("NICK alice")
    client.send("USER alice 0 * :alice")
    client.send("CAP END")
    tokens = [token for line in client.lines_until(r"(?:@\S+ )?:\S+ 376 |:\S+ 422 ")
              if " 005 " in line for token in message(line).params[1:-1]]
    assert f"CHATHISTORY={server.IRC_HISTORY_MOST}" in tokens and "MSGREFTYPES=timestamp,msgid" in tokens, tokens


# -- labeled-response -------------------------------------------------------------------------------

def test_a_labeled_command_gets_one_labeled_reply_a_labeled_batch_or_an_ack(irc_server, irc_connect):
    alice = irc_connect(irc_server, "alice", ("batch", "labeled-response"))
    alice.send("@label=one PING :token")
    pong = message(alice.recv_line())
    assert (pong.command, pong.tags, pong.params[-1]) == ("PONG", {"label": "one"}, "token"), pong
    alice.send("@label=none PONG :token")
    ack = message(alice.recv_line())
    assert (ack.command, ack.params, ack.tags) == ("ACK", [], {"label": "none"}), ack
    alice.send("@label=bad NOSUCHCOMMAND")
    unknown = message(alice.recv_line())
    assert (unknown.command, unknown.tags) == ("421", {"label": "bad"}), unknown
    alice.send("@label=several JOIN #dev")
    start = message(alice.recv_line())
    assert (start.command, start.params[1:], start.tags) == ("BATCH", ["labeled-response"], {"label": "several"})
    reference = start.params[0][1:]
    inside = [message(line) for line in alice.lines_until(rf":\S+ BATCH -{reference}$")[:-1]]
    assert [line.command for line in inside] == ["JOIN", "353", "366"], inside
    assert all(line.tags == {"batch": reference} for line in inside), inside
    nothing_more(alice)


def test_a_label_comes_back_on_the_echo_alone_and_never_reaches_the_other_people(irc_server, irc_connect, connect):
    alice = irc_connect(irc_server, "alice", HISTORY)
    bob = irc_connect(irc_server, "bob", HISTORY)
    carol = connect(irc_server, "carol")
    alice.send("@label=L1;+draft/reply=x PRIVMSG #lobby :labeled hello")
    echo = message(alice.expect(r"PRIVMSG #lobby :labeled hello"))
    heard = message(bob.expect(r"PRIVMSG #lobby :labeled hello"))
    assert echo.tags["label"] == "L1" and "label" not in heard.tags, (echo, heard)
    assert echo.tags["msgid"] == heard.tags["msgid"] and echo.tags["time"] == heard.tags["time"]
    carol.expect(r"alice: labeled hello")
    alice.send("@label=L2 PRIVMSG bob :labeled psst")
    assert message(alice.expect(r"PRIVMSG bob :labeled psst")).tags["label"] == "L2"
    assert "label" not in message(bob.expect(r"PRIVMSG bob :labeled psst")).tags
    nothing_more(alice)


def test_a_label_is_ignored_without_batch_and_labeled_response(irc_server, irc_connect):
    alice = irc_connect(irc_server, "alice", ("labeled-response",))
    alice.send("@label=mine PING :token")
    assert not message(alice.expect(r"PONG ")).tags
    bob = irc_connect(irc_server, "bob")
    bob.send("@label=mine PING :token")
    assert not message(bob.expect(r"PONG ")).tags


# -- draft/chathistory ------------------------------------------------------------------------------

def test_every_subcommand_by_msgid_and_by_timestamp_gives_the_lines_as_they_were_sent(irc_server, irc_connect):
    alice = irc_connect(irc_server, "alice", HISTORY)
    joined(alice, "#dev")
    sent = [say(alice, "#dev", f"line {n}") for n in range(10)]
    ids = [line.tags["msgid"] for line in sent]
    assert len(set(ids)) == 10

    def asked(request: str) -> list[str]:
        lines = history(alice, request)
        for line in lines:
            live = sent[ids.index(line.tags["msgid"])]
            assert (line.source, line.command, line.params, line.tags["time"]) == (
                live.source, live.command, live.params, live.tags["time"]), (line, live)
        return [line.tags["msgid"] for line in lines]

    def at(n: int) -> str:
        return f"timestamp={sent[n].tags['time']}"

    def times(condition) -> list[str]:
        """The ids of the lines whose time fits CONDITION: lines said in one millisecond share a timestamp."""
        return [line.tags["msgid"] for line in sent if condition(line.tags["time"])]

    t = [line.tags["time"] for line in sent]
    assert asked("CHATHISTORY LATEST #dev * 100") == ids
    assert asked("CHATHISTORY LATEST #dev * 3") == ids[-3:]
    assert asked(f"CHATHISTORY LATEST #dev msgid={ids[4]} 100") == ids[5:]
    assert asked(f"CHATHISTORY LATEST #dev msgid={ids[4]} 2") == ids[-2:]
    assert asked(f"CHATHISTORY LATEST #dev {at(4)} 100") == times(lambda time: time > t[4])
    assert asked(f"CHATHISTORY BEFORE #dev msgid={ids[6]} 100") == ids[:6]
    assert asked(f"CHATHISTORY BEFORE #dev msgid={ids[6]} 2") == ids[4:6]
    assert asked(f"CHATHISTORY BEFORE #dev {at(6)} 100") == times(lambda time: time < t[6])
    assert asked(f"CHATHISTORY AFTER #dev msgid={ids[3]} 100") == ids[4:]
    assert asked(f"CHATHISTORY AFTER #dev msgid={ids[3]} 3") == ids[4:7]
    assert asked(f"CHATHISTORY AFTER #dev {at(3)} 100") == times(lambda time: time > t[3])
    assert asked(f"CHATHISTORY AROUND #dev msgid={ids[7]} 1") == [ids[7]]
    assert asked(f"CHATHISTORY AROUND #dev msgid={ids[7]} 3") == ids[6:9]
    assert ids[7] in asked(f"CHATHISTORY AROUND #dev {at(7)} 3")
    assert asked(f"CHATHISTORY BETWEEN #dev msgid={ids[0]} msgid={ids[-1]} 100") == ids[1:-1]
    assert asked(f"CHATHISTORY BETWEEN #dev msgid={ids[-1]} msgid={ids[0]} 100") == ids[1:-1]
    assert asked(f"CHATHISTORY BETWEEN #dev msgid={ids[0]} msgid={ids[-1]} 3") == ids[1:4]
    assert asked(f"CHATHISTORY BETWEEN #dev msgid={ids[-1]} msgid={ids[0]} 3") == ids[-4:-1]
    assert asked(f"CHATHISTORY BETWEEN #dev {at(0)} {at(9)} 100") == times(lambda time: t[0] < time < t[9])
    assert asked(f"CHATHISTORY BETWEEN #dev {at(9)} msgid={ids[0]} 100") == times(lambda time: time < t[9])[1:]
    assert asked(f"CHATHISTORY BEFORE #dev {BEFORE_ALL} 100") == []
    nothing_more(alice)


def test_a_labeled_chathistory_labels_its_batch_and_an_empty_one_is_still_a_batch(irc_server, irc_connect):
    alice = irc_connect(irc_server, "alice", HISTORY)
    joined(alice, "#dev")
    alice.send("@label=h1 CHATHISTORY LATEST #dev * 10")
    start = message(alice.expect(r"BATCH "))
    assert start.tags == {"label": "h1"} and start.params[1:] == ["chathistory", "#dev"], start
    assert message(alice.recv_line()).params == [f"-{start.params[0][1:]}"]
    nothing_more(alice)


def test_the_limit_is_at_most_the_advertised_one_and_must_be_a_number_above_zero(irc_server, irc_connect, connect):
    alice = irc_connect(irc_server, "alice", HISTORY)
    bob = connect(irc_server, "bob")
    for n in range(server.IRC_HISTORY_MOST + 5):
        bob.send(f"line {n}")
    alice.expect(rf"(?:@\S+ )?:bob\S* PRIVMSG #lobby :line {server.IRC_HISTORY_MOST + 4}$")
    lines = history(alice, "CHATHISTORY LATEST #lobby * 1000")
    assert texts(lines) == [f"line {n}" for n in range(5, server.IRC_HISTORY_MOST + 5)]
    for limit in ("0", "-3", "many"):
        assert failure(alice, f"CHATHISTORY LATEST #lobby * {limit}")[:3] == ["CHATHISTORY", "INVALID_PARAMS",
                                                                             "LATEST"]


def test_wrong_requests_get_the_fail_codes_of_the_specification(irc_server, irc_connect):
    alice = irc_connect(irc_server, "alice", HISTORY)
    assert failure(alice, "CHATHISTORY")[:3] == ["CHATHISTORY", "NEED_MORE_PARAMS", "*"]
    assert failure(alice, "CHATHISTORY FORWARDS #lobby * 10")[:3] == ["CHATHISTORY", "UNKNOWN_COMMAND", "FORWARDS"]
    assert failure(alice, "CHATHISTORY BEFORE #lobby")[:3] == ["CHATHISTORY", "NEED_MORE_PARAMS", "BEFORE"]
    assert failure(alice, "CHATHISTORY BETWEEN #lobby * 10")[:3] == ["CHATHISTORY", "NEED_MORE_PARAMS", "BETWEEN"]
    for request in ("CHATHISTORY BEFORE #lobby * 10", "CHATHISTORY AFTER #lobby msgid=abc 10",
                    "CHATHISTORY AROUND #lobby timestamp=yesterday 10", "CHATHISTORY LATEST #lobby 12345 10",
                    f"CHATHISTORY BEFORE #lobby msgid={10 ** 20} 10",
                    "CHATHISTORY AFTER #lobby timestamp=2026-02-30T00:00:00.000Z 10",
                    f"CHATHISTORY TARGETS msgid=1 {AFTER_ALL} 10"):
        assert failure(alice, request)[:2] == ["CHATHISTORY", "INVALID_PARAMS"], request
    assert failure(alice, "CHATHISTORY LATEST #nowhere * 10")[:4] == ["CHATHISTORY", "INVALID_TARGET", "LATEST",
                                                                     "#nowhere"]
    assert failure(alice, "CHATHISTORY LATEST nobody * 10")[:4] == ["CHATHISTORY", "INVALID_TARGET", "LATEST",
                                                                   "nobody"]
    nothing_more(alice)
    requests = server.LISTING_BURST // server.IRC_HISTORY_COST + 5
    for _ in range(requests):
        alice.send("CHATHISTORY LATEST #lobby * 1")
    refusal = message(alice.expect(r"FAIL ")).params
    assert refusal[:4] == ["CHATHISTORY", "MESSAGE_ERROR", "LATEST", "#lobby"] and "try again" in refusal[-1], refusal


def test_a_room_is_read_by_its_members_alone_and_a_room_with_a_key_keeps_nothing(irc_server, irc_connect, connect):
    bob = connect(irc_server, "bob")
    bob.send("/join #secret sesame")
    bob.expect(r"\*\*\* You are in #secret")
    bob.send("secret words")
    bob.send("/join #open")
    bob.expect(r"\*\*\* You are in #open")
    bob.send("open words")
    bob.expect("bob: open words")
    alice = irc_connect(irc_server, "alice", HISTORY)
    for room in ("#secret", "#open"):
        refusal = failure(alice, f"CHATHISTORY LATEST {room} * 10")
        assert refusal[:4] == ["CHATHISTORY", "INVALID_TARGET", "LATEST", room], refusal
        assert "words" not in refusal[-1]
    joined(alice, "#open")
    assert texts(history(alice, "CHATHISTORY LATEST #open * 10")) == ["open words"]
    alice.send("JOIN #secret sesame")
    alice.expect(r"366 alice #secret ")
    assert history(alice, "CHATHISTORY LATEST #secret * 10") == [], "a room with a key keeps no lines"


def test_a_client_that_fetches_history_gets_no_replay_on_joining_and_the_others_still_do(
        irc_server, irc_connect, connect):
    bob = connect(irc_server, "bob")
    bob.send("/join #dev")
    bob.expect(r"\*\*\* You are in #dev")
    bob.send("said before")
    bob.expect("bob: said before")
    alice = irc_connect(irc_server, "alice", HISTORY)
    assert not [line for line in joined(alice, "#dev") if "PRIVMSG" in line or "NOTICE" in line]
    nothing_more(alice)
    carol = irc_connect(irc_server, "carol", ("server-time",))
    joined(carol, "#dev")
    replay = message(carol.expect(r"PRIVMSG #dev :said before"))
    assert replay.source.startswith("bob!") and replay.tags["time"]
    carol.expect(r"NOTICE #dev :End of #dev history")


def test_actions_and_notices_come_back_as_they_were_sent(irc_server, irc_connect, connect):
    alice = irc_connect(irc_server, "alice", HISTORY)
    bob = connect(irc_server, "bob")
    bob.send("/me waves")
    alice.expect(r"PRIVMSG #lobby :\x01ACTION waves\x01")
    carol = irc_connect(irc_server, "carol")
    carol.send("NOTICE #lobby :a notice")
    alice.expect(r"NOTICE #lobby :a notice")
    lines = history(alice, "CHATHISTORY LATEST #lobby * 2")
    assert [(line.command, line.source.split("!")[0], line.params) for line in lines] == [
        ("PRIVMSG", "bob", ["#lobby", "\x01ACTION waves\x01"]), ("NOTICE", "carol", ["#lobby", "a notice"])]


@pytest.fixture
def accounts_server(start_server, connect, tmp_path):
    """A server with a data directory and the accounts alice and bob."""
    data = tmp_path / "data"
    a_server = start_server("--irc-port", "0", "--data-dir", str(data), "--guess-delay", "0.05", "--rate", "0")
    for nick in ("alice", "bob"):
        register_account(connect(a_server), nick)
    a_server.data = data
    return a_server


def test_a_private_conversation_is_for_its_two_accounts_and_a_guests_only_while_they_are_here(
        accounts_server, irc_connect, connect):
    alice = signed_in(irc_connect, accounts_server, "alice")
    bob = connect(accounts_server)
    sign_in(bob, "bob", ACCOUNT_PASSWORD)
    bob.send("/msg alice psst alice")
    alice.expect(r"PRIVMSG alice :psst alice")
    answer = say(alice, "bob", "hi bob")
    bob.expect(r"\[pm from alice\] hi bob")
    lines = history(alice, "CHATHISTORY LATEST bob * 10")
    assert [(line.source.split("!")[0], line.params) for line in lines] == [
        ("bob", ["alice", "psst alice"]), ("alice", ["bob", "hi bob"])]
    assert lines[1].tags["msgid"] == answer.tags["msgid"] and lines[1].tags["account"] == "alice"
    bob.send("/quit")
    bob.wait_closed()
    assert texts(history(alice, "CHATHISTORY LATEST BOB * 10")) == ["psst alice", "hi bob"], "bob is offline"

    guest = irc_connect(accounts_server, "mallory", HISTORY)
    for name in ("alice", "bob"):
        assert history(guest, f"CHATHISTORY LATEST {name} * 10") == [], f"a guest read {name}'s conversation"
    say(guest, "alice", "from a guest")
    assert texts(history(alice, "CHATHISTORY LATEST mallory * 10")) == ["from a guest"]
    guest.send("QUIT")
    guest.wait_closed()
    accounts_server.wait_for_log(r"mallory@\S+ left")
    assert failure(alice, "CHATHISTORY LATEST mallory * 10")[:2] == ["CHATHISTORY", "INVALID_TARGET"]
    again = irc_connect(accounts_server, "mallory", HISTORY)
    assert history(again, "CHATHISTORY LATEST alice * 10") == [], "another guest of the same name read it"
    assert not database_rows(accounts_server.data, "SELECT text FROM messages WHERE text = 'from a guest'")


def test_targets_lists_the_conversations_with_lines_in_a_time_span_oldest_first(accounts_server, irc_connect):
    alice = signed_in(irc_connect, accounts_server, "alice")
    bob = signed_in(irc_connect, accounts_server, "bob")
    joined(alice, "#dev")
    joined(bob, "#dev")
    joined(alice, "#ops")
    times = {}
    for target in ("#dev", "bob", "#ops", "#lobby"):
        times[target] = say(alice, target, f"to {target}").tags["time"]

    def targets(request: str) -> list[tuple[str, str]]:
        alice.send(request)
        start = message(alice.expect(r"BATCH \+"))
        assert start.params[1:] == ["draft/chathistory-targets"], start
        lines = alice.lines_until(rf":\S+ BATCH -{start.params[0][1:]}$")[:-1]
        return [tuple(message(line).params[1:]) for line in lines]

    assert targets(f"CHATHISTORY TARGETS {BEFORE_ALL} {AFTER_ALL} 10") == list(times.items())
    assert targets(f"CHATHISTORY TARGETS {BEFORE_ALL} {AFTER_ALL} 2") == list(times.items())[:2]
    assert targets(f"CHATHISTORY TARGETS {AFTER_ALL} {BEFORE_ALL} 2") == list(times.items())[:1:-1]
    later = [target for target, time in times.items() if time > times["#dev"]]
    assert [name for name, _ in targets(f"CHATHISTORY TARGETS timestamp={times['#dev']} {AFTER_ALL} 10")] == later
    say(bob, "#dev", "bob in dev")
    assert "#dev" not in [name for name, _ in targets(f"CHATHISTORY TARGETS {BEFORE_ALL} timestamp={times['#ops']} "
                                                        "10")], "#dev's latest line is later"
    bob.send(f"CHATHISTORY TARGETS {BEFORE_ALL} {AFTER_ALL} 10")
    names = [message(line).params[1] for line in bob.lines_until(r":\S+ BATCH -") if " CHATHISTORY " in line]
    assert names == ["alice", "#lobby", "#dev"], "#ops is not bob's, and #dev's latest line is now the last"


def test_message_ids_and_times_are_the_same_live_and_after_two_restarts(start_server, irc_connect, tmp_path):
    options = ("--irc-port", "0", "--data-dir", str(tmp_path / "data"), "--rate", "0")
    a_server = start_server(*options)
    alice = irc_connect(a_server, "alice", HISTORY)
    live = [say(alice, "#lobby", f"kept {n}") for n in range(3)]
    for restart in range(2):
        a_server.stop(signal.SIGKILL if restart else signal.SIGTERM)
        a_server = start_server(*options)
        alice = irc_connect(a_server, "alice", HISTORY)
        kept = history(alice, "CHATHISTORY LATEST #lobby * 10")
        assert [(line.tags["msgid"], line.tags["time"], line.params) for line in kept] == [
            (line.tags["msgid"], line.tags["time"], line.params) for line in live], f"after restart {restart + 1}"
        after = history(alice, f"CHATHISTORY AFTER #lobby msgid={live[0].tags['msgid']} 10")
        assert texts(after) == ["kept 1", "kept 2"]


# -- draft/read-marker ------------------------------------------------------------------------------

def test_an_accounts_read_marker_only_moves_forward_and_lasts_across_a_restart(accounts_server, start_server,
                                                                               irc_connect):
    alice = signed_in(irc_connect, accounts_server, "alice")
    lines = joined(alice, "#dev")
    commands = [message(line).command for line in lines]
    assert commands[-2:] == ["MARKREAD", "366"] and message(lines[-2]).params == ["#dev", "*"], lines
    line = say(alice, "#dev", "read me")
    alice.send(f"MARKREAD #dev timestamp={line.tags['time']}")
    assert message(alice.expect(r"MARKREAD ")).params == ["#dev", f"timestamp={line.tags['time']}"]
    alice.send("MARKREAD #dev timestamp=2021-01-01T00:00:00.000Z")
    assert message(alice.expect(r"MARKREAD ")).params == ["#dev", f"timestamp={line.tags['time']}"], "it went back"
    alice.send("MARKREAD bob timestamp=2022-02-02T02:02:02.222Z")
    alice.expect(r"MARKREAD bob timestamp=2022-02-02T02:02:02.222Z")

    accounts_server.stop()      # a read position is written with the next chat lines, or at the end
    rows = dict(database_rows(accounts_server.data, "SELECT target, id FROM read_positions WHERE account=?",
                              (server.name_key("alice"),)))
    conversation = server.private_target(server.name_key("alice"), server.name_key("bob"), False)
    assert rows[server.room_target("dev")] // 1000 == int(line.tags["msgid"]) // 1000, rows
    assert server.irc_message_time(rows[conversation]) == "2022-02-02T02:02:02.222Z", rows
    again = start_server("--irc-port", "0", "--data-dir", str(accounts_server.data), "--guess-delay", "0.05",
                         "--rate", "0")
    alice = signed_in(irc_connect, again, "alice")
    assert message(joined(alice, "#dev")[-2]).params == ["#dev", f"timestamp={line.tags['time']}"]
    alice.send("MARKREAD bob")
    assert message(alice.expect(r"MARKREAD ")).params == ["bob", "timestamp=2022-02-02T02:02:02.222Z"]


def test_a_guests_read_marker_lasts_while_they_are_here_and_is_never_written(accounts_server, irc_connect):
    guest = irc_connect(accounts_server, "mallory", ("draft/read-marker",))
    guest.send("MARKREAD #lobby")
    assert message(guest.expect(r"MARKREAD ")).params == ["#lobby", "*"]
    guest.send("MARKREAD #lobby timestamp=2023-03-03T03:03:03.333Z")
    assert message(guest.expect(r"MARKREAD ")).params == ["#lobby", "timestamp=2023-03-03T03:03:03.333Z"]
    guest.send("MARKREAD #lobby")
    assert message(guest.expect(r"MARKREAD ")).params == ["#lobby", "timestamp=2023-03-03T03:03:03.333Z"]
    marked = int(datetime.datetime(2023, 3, 3, 3, 3, 3, 333000, datetime.timezone.utc).timestamp() * 1_000_000)
    assert not database_rows(accounts_server.data, "SELECT * FROM read_positions WHERE id=?", (marked,))
    guest.send("QUIT")
    guest.wait_closed()
    accounts_server.wait_for_log(r"mallory@\S+ left")
    again = irc_connect(accounts_server, "mallory", ("draft/read-marker",))
    again.send("MARKREAD #lobby")
    assert message(again.expect(r"MARKREAD ")).params == ["#lobby", "*"]


def test_markread_answers_wrong_requests_as_the_specification_says(irc_server, irc_connect):
    alice = irc_connect(irc_server, "alice", ("draft/read-marker",))
    alice.send("MARKREAD")
    assert message(alice.expect(r"FAIL ")).params[:2] == ["MARKREAD", "NEED_MORE_PARAMS"]
    for wrong in ("*", "timestamp=not-a-time", "msgid=123"):
        alice.send(f"MARKREAD #lobby {wrong}")
        assert message(alice.expect(r"FAIL ")).params[:2] == ["MARKREAD", "INVALID_PARAMS"], wrong
    alice.send("MARKREAD #elsewhere timestamp=2023-03-03T03:03:03.333Z")
    assert message(alice.expect(r"FAIL ")).params[:3] == ["MARKREAD", "INVALID_PARAMS", "#elsewhere"]
    alice.send("MARKREAD #elsewhere")
    assert message(alice.expect(r"MARKREAD ")).params == ["#elsewhere", "*"]
    nothing_more(alice)


def test_a_phone_catches_up_with_what_was_said_since_it_last_read_and_nothing_else(accounts_server, irc_connect,
                                                                                   connect):
    bob = connect(accounts_server)
    sign_in(bob, "bob", ACCOUNT_PASSWORD)
    bob.send("/join #dev")
    bob.expect(r"\*\*\* You are in #dev")
    phone = signed_in(irc_connect, accounts_server, "alice")
    joined(phone, "#dev")
    for n in range(3):
        bob.send(f"#dev line {n}")
    phone.expect(r"PRIVMSG #dev :#dev line 2")
    bob.send("/msg alice are you there?")
    phone.expect(r"PRIVMSG alice :are you there\?")
    phone.send(f"CHATHISTORY TARGETS {BEFORE_ALL} {AFTER_ALL} 10")
    names = [message(line).params[1] for line in phone.lines_until(r":\S+ BATCH -") if " CHATHISTORY " in line]
    assert names == ["#dev", "bob"], names
    for name in names:
        last = history(phone, f"CHATHISTORY LATEST {name} * 10")[-1]
        phone.send(f"MARKREAD {name} timestamp={last.tags['time']}")
        phone.expect(rf"MARKREAD {name} timestamp=")
    phone.send("QUIT")
    phone.wait_closed()
    accounts_server.wait_for_log(r"alice@\S+ left")
    bob.send("#dev said while alice was away")
    bob.expect("bob: #dev said while alice was away")

    phone = signed_in(irc_connect, accounts_server, "alice")
    marker = message(joined(phone, "#dev")[-2])
    assert marker.command == "MARKREAD" and marker.params[1].startswith("timestamp="), marker
    nothing_more(phone)
    assert texts(history(phone, f"CHATHISTORY AFTER #dev {marker.params[1]} 100")) == [
        "#dev said while alice was away"]
    phone.send("MARKREAD bob")
    read = message(phone.expect(r"MARKREAD bob ")).params[1]
    assert history(phone, f"CHATHISTORY AFTER bob {read} 100") == [], "nothing new from bob"
    # A second session of the account (a tablet, and the laptop's pyChat client) sees the marker move.
    tablet = signed_in(irc_connect, accounts_server, "alice")
    tablet.expect(r"366 alice #dev ")
    laptop = connect(accounts_server)
    sign_in(laptop, "alice", ACCOUNT_PASSWORD)
    newest = history(phone, "CHATHISTORY LATEST #dev * 1")[-1]
    phone.send(f"MARKREAD #dev timestamp={newest.tags['time']}")
    assert message(phone.expect(r"MARKREAD #dev ")).params[1] == f"timestamp={newest.tags['time']}"
    assert message(tablet.expect(r"MARKREAD #dev ")).params[1] == f"timestamp={newest.tags['time']}"
    laptop.expect(re.escape("[read #dev]"))
