"""The IRC port facing anyone on the internet: the same limits and defences as the pyChat port.

Connection caps shared by both ports, floods, a reader that stops reading,
junk, huge lines, invalid UTF-8 and many connections at once. Every test runs a
real server; waits have deadlines and loops a bound on count and time.
"""
from __future__ import annotations

import re
import socket
import threading
import time

import pytest

from conftest import TIMEOUT, IrcClient, LineClient, irc_port, online_line, talk_until_cut_off, watch_for
from test_hardening import Drain, memory_kib


def raw_irc(server, source: str | None = None) -> socket.socket:
    return socket.create_connection((server.host, irc_port(server)), timeout=TIMEOUT,
                                    source_address=(source, 0) if source else None)


@pytest.mark.parametrize("options, refusal", [
    (("--max-clients", "3", "--max-per-ip", "0"), "The server is full"),
    (("--max-clients", "0", "--max-per-ip", "3"), "Too many connections from your address"),
], ids=["max-clients", "max-per-ip"])
def test_the_connection_limits_count_both_ports_and_an_irc_newcomer_past_them_gets_error(
        start_server, connect, irc_connect, options, refusal):
    server = start_server("--irc-port", "0", *options)
    bob = connect(server, "bob")
    irc_connect(server, "alice")
    connect(server, "carol")
    late = irc_connect(server)
    closing = late.wait_closed()
    assert len(closing) == 1 and closing[0].startswith("ERROR :Closing link: ") and refusal in closing[0], \
        f"expected one ERROR line saying {refusal!r}; got {closing}"
    bob.send("still here")
    bob.expect("bob: still here")


def bystander_delays(bob, alice_reader: Drain, count: int, pause: float, stop: threading.Event,
                     during: str) -> list[float]:
    """Seconds each of COUNT lines bob says, PAUSE apart, takes to reach alice (read by ALICE_READER)."""
    delays = []
    for n in range(count):
        stop.wait(pause)
        sent = time.monotonic()
        bob.sock.sendall(f"ping {n}\n".encode())
        arrived = alice_reader.arrival(str(n).encode(), timeout=3)
        assert arrived is not None, f"bob's line {n} did not reach alice within 3 s during {during}"
        delays.append(arrived - sent)
    return delays


def test_a_client_dribbling_registration_byte_by_byte_is_closed_after_the_sign_in_timeout(start_server):
    server = start_server("--irc-port", "0", "--nick-timeout", "0.5")
    sock = raw_irc(server)
    started = time.monotonic()
    data = b""
    try:
        for byte in b"NICK dribbler\r\nUSER d 0 * :d" * 3:
            sock.sendall(bytes([byte]))
            time.sleep(0.05)
            if time.monotonic() - started > 4:
                break
    except OSError:
        pass
    sock.settimeout(3)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (socket.timeout, OSError):
        pass
    took = time.monotonic() - started
    assert b"ERROR :Closing link" in data and took < 4, f"closed after {took:.1f} s; got {data[-200:]!r}"


@pytest.mark.parametrize("options", [("--rate", "2", "--burst", "5")])
def test_lines_over_the_rate_are_dropped_with_one_notice_and_a_flooder_is_disconnected(
        start_server, connect, irc_connect, options):
    server = start_server("--irc-port", "0", *options)
    bob = connect(server, "bob")
    flooder = irc_connect(server, "flooder")
    bob.expect(re.escape("*** flooder joined #lobby"))
    flooder.send_raw(b"".join(f"PRIVMSG #lobby :line {n}\r\n".encode() for n in range(10)))
    warning = flooder.expect("NOTICE flooder :You are sending too fast")
    assert "lines are being dropped" in warning
    try:
        flooder.send_raw(b"PRIVMSG #lobby :flood\r\n" * 400)
    except OSError:
        pass
    closing = flooder.wait_closed()
    assert any(line.startswith("ERROR :Closing link: flooder (Flooding") for line in closing), closing
    bob.expect(re.escape("*** flooder quit (flooding)"))


def test_each_target_of_a_privmsg_costs_a_line_of_the_allowance_and_a_repeated_one_is_sent_once(
        start_server, connect, irc_connect):
    # A burst of 6 that hardly refills: JOIN costs 1, the first PRIVMSG 3 (three rooms, one of them named
    # twice), the second would cost 3 but has 2 left.
    server = start_server("--irc-port", "0", "--rate", "0.01", "--burst", "6")
    bob = connect(server, "bob")
    for room in ("a", "b", "c"):
        bob.send(f"/join {room}")
        bob.expect(rf"\*\*\* You are in #{room}")
    sender = irc_connect(server, "sender")
    sender.send("JOIN #a,#b,#c")
    sender.expect(r"366 sender #c ")
    sender.send("PRIVMSG #a,#b,#A,#c :one")
    sender.send("PRIVMSG #a,#b,#c :two")
    sender.expect("NOTICE sender :You are sending too fast")
    bob.send("marker")              # bob's own line comes back after everything queued to him before it
    said = [line for line in bob.lines_until("bob: marker") if re.match(r"(#\w+ )?sender: (one|two)$", line)]
    assert sorted(said) == sorted(["#a sender: one", "#b sender: one", "sender: one",
                                   "#a sender: two", "#b sender: two"]), \
        f"one line to four targets should cost four lines of the allowance, a repeated target once: {said}"


def test_while_an_irc_user_floods_other_users_lines_arrive_within_a_second(start_server, connect):
    server = start_server("--irc-port", "0")
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    alice_reader, bob_reader = Drain(alice.sock, rb"^bob: ping (\d+)$"), Drain(bob.sock)
    alice_reader.start()
    bob_reader.start()
    stop = threading.Event()

    def flood() -> None:
        deadline = time.monotonic() + 10
        comebacks = 0
        while not stop.is_set() and time.monotonic() < deadline and comebacks < 1000:
            sock = raw_irc(server)
            try:
                sock.sendall(f"NICK flooder{comebacks}\r\nUSER f 0 * :f\r\n".encode()
                             + b"PRIVMSG #lobby :flood flood flood flood flood flood\r\n" * 300)
                while sock.recv(65536):
                    pass
            except OSError:
                pass
            finally:
                sock.close()
            comebacks += 1

    flooding = threading.Thread(target=flood, daemon=True)
    flooding.start()
    try:
        server.wait_for_log(r"flooder\d*@127\.0\.0\.1 signed in")
        delays = bystander_delays(bob, alice_reader, 20, 0.05, stop, "the flood")
        assert flooding.is_alive(), "the flood ended early, so it proved nothing"
        assert max(delays) < 1.0, f"bob's lines took up to {max(delays):.2f} s to reach alice during the flood"
    finally:
        stop.set()
        flooding.join(5)
        alice_reader.stop()
        bob_reader.stop()


def test_an_irc_client_that_stops_reading_is_cut_off_and_everyone_else_carries_on(start_server, connect):
    server = start_server("--irc-port", "0", "--rate", "0", "--max-queue", "65536")
    speaker = connect(server, "speaker")
    listener = connect(server, "listener")
    stalled = IrcClient(server.host, irc_port(server))
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.register("stalled")
    try:
        talk_until_cut_off(server, speaker, listener, "stalled")
    finally:
        stalled.close()


JUNK = [
    b"\x00\x01\x02\x03\r\n", b"@\r\n", b":\r\n", b"@a=b :src\r\n", b"   \r\n", b"\r\n\r\n\r\n",
    b"PRIVMSG\r\n", b"PRIVMSG #lobby\r\n", b"MODE\r\n", b"MODE #lobby +kkkkkkk\r\n", b"MODE #lobby -oooo\r\n",
    b"JOIN ,,,,,,\r\n", b"JOIN #\r\n", b"JOIN #" + b"x" * 300 + b"\r\n", b"KICK # #\r\n", b"NICK :\r\n",
    b"NICK " + "\u0301".encode() * 200 + b"\r\n",
    b"WHOIS " + b"," * 400 + b"\r\n", b"ISON " + b"a " * 200 + b"\r\n", b"USERHOST a b c d e f g h\r\n",
    b"CAP REQ :" + b"x" * 400 + b"\r\n", b"CAP LS 999999999999999999999\r\n", b"PING :" + b"\xff" * 100 + b"\r\n",
    b"PRIVMSG #lobby :\x01\x01\x01\r\n", b"PRIVMSG pyChat :\x01\r\n", b"TOPIC #lobby :\x1b[2J\r\n",
    b"AWAY :\x1b]0;title\x07\r\n", b"MODE " + b" x" * 40 + b"\r\n", b"@" + b"k=v;" * 1000 + b" PING x\r\n",
]


def test_junk_gets_answers_not_tracebacks_and_the_connection_and_room_carry_on(start_server, connect, irc_connect):
    server = start_server("--irc-port", "0", "--rate", "0")
    bob = connect(server, "bob")
    junk = irc_connect(server, "junk")
    for line in JUNK:
        junk.send_raw(line)
    junk.send("PING :after-the-junk")
    junk.expect("PONG .*after-the-junk", timeout=10)
    junk.send("PRIVMSG #lobby :still talking")
    bob.expect("junk: still talking")
    assert not any("\x1b" in line for line in bob.seen), "an escape reached a pyChat user"


def test_a_line_over_the_irc_limit_gets_417_and_a_10_mib_one_leaves_memory_flat(start_server, connect, irc_connect):
    server = start_server("--irc-port", "0", "--rate", "0")
    bob = connect(server, "bob")
    streamer = irc_connect(server, "streamer")
    streamer.send("PRIVMSG #lobby :" + "x" * 600)
    streamer.expect("417 streamer ")
    pid = server.process.pid
    before = peak = memory_kib(pid)
    chunk = b"z" * 65536
    for n in range(160):
        streamer.send_raw(chunk)
        if n % 8 == 0:
            peak = max(peak, memory_kib(pid))
    streamer.send_raw(b"\r\n")
    streamer.send("PRIVMSG #lobby :after the flood")
    bob.expect("streamer: after the flood")
    streamer.send("PING :done")
    answers = streamer.lines_until("PONG .*done")
    assert len([line for line in answers if " 417 " in line]) == 1, f"expected one 417; got {answers}"
    growth = max(peak, memory_kib(pid)) - before
    assert growth < 4096, f"server memory grew by {growth} KiB while reading one 10 MiB line"


def test_invalid_utf8_is_refused_and_counts_at_its_replaced_size(start_server, connect, irc_connect):
    server = start_server("--irc-port", "0")
    bob = connect(server, "bob")
    alice = irc_connect(server, "alice")
    alice.send_raw(b"PRIVMSG #lobby :caf\xe9 \xff\xfe ok\r\n")      # the server says UTF8ONLY: FAIL, not passed on
    assert alice.expect("FAIL ").split()[1:4] == ["FAIL", "PRIVMSG", "INVALID_UTF8"]
    alice.send_raw(b"PRIVMSG #lobby :" + b"\xff" * 300 + b"\r\n")     # 900 bytes once replaced
    alice.expect("417 alice ")
    alice.send("PRIVMSG #lobby :fine again")
    assert bob.expect("alice: ") == "alice: fine again"


def test_hundreds_of_irc_clients_register_at_once_and_chat_goes_on(start_server, connect):
    server = start_server("--irc-port", "0", "--max-per-ip", "0")
    bob = connect(server, "bob")
    count = 150
    clients: list[socket.socket] = []
    try:
        for n in range(count):
            sock = raw_irc(server)
            sock.sendall(f"NICK many{n}\r\nUSER m 0 * :m\r\n".encode())
            clients.append(sock)
        welcomed = 0
        deadline = time.monotonic() + 20
        for n, sock in enumerate(clients):
            data = b""
            while b" 001 " not in data and time.monotonic() < deadline:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            welcomed += b" 001 " in data
        assert welcomed == count, f"only {welcomed} of {count} IRC clients were welcomed"
        bob.send("still quick")
        bob.expect("bob: still quick", timeout=5)
    finally:
        for sock in clients:
            sock.close()
    assert watch_for(bob, r"(?!)", 0.1) is None
    server.wait_for_log(rf"many{count - 1}@127\.0\.0\.1 left", timeout=10)


@pytest.mark.parametrize("line", [
    "JOIN #dev key1,key2",          # more keys than channels
    "JOIN #dev,#ops k1,k2,k3,k4",
    "WHOWAS somebody \u00b2",        # digits that are not 0-9: str.isdigit() says yes, int() says no
    "LIST >\u00b2",
    "CAP LS \u00b3\u00b2",
])
def test_odd_lists_and_numbers_in_irc_commands_get_answers_not_a_server_error(start_server, connect, irc_connect,
                                                                             line):
    server = start_server("--irc-port", "0")
    bob = connect(server, "bob")
    odd = irc_connect(server, "odd")
    odd.send(line)
    odd.send("PING :still-here")
    odd.expect("PONG .*still-here")
    odd.send("PRIVMSG #lobby :still talking")
    bob.expect("odd: still talking")
    assert not any(re.match(r"ERROR ", seen) for seen in odd.seen), f"{line!r} closed the link: {odd.seen[-5:]}"


def test_a_who_pattern_is_paid_for_by_everyone_it_searches_and_chat_goes_on_meanwhile(start_server, connect,
                                                                                      irc_connect):
    server = start_server("--irc-port", "0", "--max-per-ip", "0")
    crowd: list[socket.socket] = []
    try:
        for n in range(150):                # signed in, never reading: what they are sent waits in the kernel
            sock = socket.create_connection((server.host, server.port), timeout=TIMEOUT)
            sock.sendall(f"crowd{n}\n".encode())
            crowd.append(sock)
        alice, bob = connect(server, "alice"), connect(server, "bob")
        deadline = time.monotonic() + 10
        while not online_line(bob).startswith("-- 152 online"):
            assert time.monotonic() < deadline, f"the crowd did not sign in: {bob.seen[-1][:80]}"
        searchers = [irc_connect(server, f"searcher{n}") for n in range(4)]
        # A pattern that fits no one, matched against the 156 people online: three such searches spend most
        # of the 500 entries one may list at once.
        for searcher in searchers:
            searcher.send_raw(b"WHO zzz*\r\n" * 8)
        for searcher in searchers:
            answers = [searcher.expect(r"(315|263) ") for _ in range(8)]
            done = [answer for answer in answers if " 315 " in answer]
            assert len(done) <= 4, (f"{len(done)} searches of 156 people in a row were let through, "
                                    f"as if they cost only what they found: {answers}")
        alice_reader, bob_reader = Drain(alice.sock, rb"^bob: ping (\d+)$"), Drain(bob.sock)
        alice_reader.start()
        bob_reader.start()
        stop = threading.Event()

        def search() -> None:           # each searcher at 3 a second, within the flood limit
            while not stop.wait(0.33):
                for searcher in searchers:
                    searcher.send_raw(b"WHO *zz*\r\n")

        searching = threading.Thread(target=search, daemon=True)
        searching.start()
        try:
            delays = bystander_delays(bob, alice_reader, 12, 0.15, stop, "the searches")
            assert max(delays) < 1.0, f"bob's lines took up to {max(delays):.2f} s to reach alice during the searches"
        finally:
            stop.set()
            searching.join(5)
            alice_reader.stop()
            bob_reader.stop()
    finally:
        for sock in crowd:
            sock.close()


# -- what one command may be answered, and to how many ------------------------------------------------------

def with_bob_in_t(server, alice: IrcClient, connect) -> LineClient:
    """bob, at the pyChat port, in #t with alice, an IRC user."""
    bob = connect(server, "bob")
    bob.send("/join #t")
    bob.expect(r"\*\*\* (You are in|Now talking in) #t")
    alice.send("JOIN #t")
    alice.expect(r"366 alice #t ")
    return bob


def test_a_labeled_command_whose_reply_is_longer_than_a_clients_line_is_answered_labeled(start_server, irc_connect,
                                                                                          connect):
    """The server's own replies may be longer than what a client may send (a topic set at the pyChat port, a
    refusal quoting a long name): gathering them for a label must not read them as a client's."""
    server = start_server("--irc-port", "0", "--rate", "0")
    alice = irc_connect(server, "alice", ("batch", "labeled-response"))
    alice.send("@label=p1 PART #" + "a" * 300)
    assert "label=p1" in alice.expect(r"@\S*label=p1"), "the refusal of a long name was not answered"
    bob = with_bob_in_t(server, alice, connect)
    bob.send("/topic " + "release on friday " * 100)
    alice.expect(r"TOPIC #t ")
    alice.send("@label=q1 TOPIC #t")
    assert "label=q1" in alice.expect(r"@\S*label=q1"), "a long topic asked for with a label ended the connection"


def test_past_four_targets_a_privmsg_is_answered_407_and_the_same_name_twice_is_one_target(start_server,
                                                                                          irc_connect):
    server = start_server("--irc-port", "0", "--rate", "0")
    alice, erin = irc_connect(server, "alice"), irc_connect(server, "erin")
    alice.send("PRIVMSG bob,bob,BOB,carol,erin :hello erin")
    assert erin.expect(r":alice!\S+ PRIVMSG erin ").endswith(":hello erin"), "a name said three times was three"
    alice.send("PRIVMSG a1,a2,a3,erin,zed :hello again")
    assert " 407 alice zed " in alice.expect(r"407 "), "the fifth target went unsent and unsaid"
    assert erin.expect(r":alice!\S+ PRIVMSG erin ").endswith(":hello again")
    alice.send("NOTICE a1,a2,a3,a4,zed :quiet")         # a NOTICE is answered with nothing
    alice.send("PING :end")
    assert not [line for line in alice.lines_until(r"PONG ") if " 407 " in line]


def test_what_the_pychat_port_takes_longer_than_an_irc_line_reaches_irc_users_cut_to_one(start_server, irc_connect,
                                                                                        connect):
    """A topic or an away message of up to 4,096 bytes at the pyChat port is one IRC line of at most 512 bytes,
    cut at the end of a character, as IRC servers cut what is longer than their limits."""
    server = start_server("--irc-port", "0", "--rate", "0")
    alice = irc_connect(server, "alice")
    bob = with_bob_in_t(server, alice, connect)
    bob.send("/topic " + "réunion vendredi " * 200)
    lines = [alice.expect(r":bob!\S+ TOPIC #t ")]
    bob.send("/away " + "é" * 380)          # within AWAYLEN's 390 characters, and 760 bytes
    bob.expect("-- You are marked away")
    alice.send("TOPIC #t")
    lines.append(alice.expect(r"\S+ 332 alice #t "))
    alice.send("PRIVMSG bob :hello")
    lines.append(alice.expect(r"\S+ 301 alice bob "))
    for line in lines:
        assert len(line.encode("utf-8")) + 2 <= 512, f"{len(line.encode('utf-8')) + 2} bytes: {line[:60]}..."
    assert "\ufffd" not in "".join(lines), "a character was cut in two"


def test_an_empty_nick_is_431_and_a_line_of_spaces_is_412_after_signing_in(start_server, irc_connect):
    server = start_server("--irc-port", "0")
    alice = irc_connect(server, "alice")
    alice.send("NICK :")
    assert " 431 alice " in alice.expect(r"\S+ 4\d\d ")
    alice.send("PRIVMSG #lobby :   ")
    assert " 412 alice " in alice.expect(r"\S+ 4\d\d ")
