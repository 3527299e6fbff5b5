"""The server's core in process: a connection's output and its end (over socket pairs), the switchboard's
wake-up, and the server object's tables; then the defects a review found, each over real sockets."""
from __future__ import annotations

import gc
import resource
import socket
import threading
import time
import tracemalloc

import pytest

import commands
from conftest import SERVER_SCRIPT, TIMEOUT, LineClient, import_script, read_until

pychat = import_script(SERVER_SCRIPT, "pychat_server")


def socket_pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(TIMEOUT)
    return ours, theirs


def read_until_all(sock: socket.socket, markers: list[bytes]) -> bytes:
    """Bytes from SOCK until every one of MARKERS has come, in whatever order."""
    data = b""
    for marker in markers:
        if marker not in data:
            data += read_until(sock, marker)
    return data


@pytest.fixture
def switchboard():
    """A switchboard that runs, stopped at the end."""
    running = pychat.Switchboard(max_queue=256 * 1024, stall_timeout=30, workers=pychat.Workers())
    running.start()
    yield running
    running.stop()
    running.join(TIMEOUT)


@pytest.fixture
def idle_switchboard():
    """A switchboard whose thread never runs: what is queued stays queued until a test flushes it."""
    standing = pychat.Switchboard(max_queue=10_000, stall_timeout=30, workers=pychat.Workers())
    yield standing
    standing.selector.close()
    standing.wake_reader.close()
    standing.wake_writer.close()


@pytest.fixture
def chat_server(monkeypatch):
    """A ChatServer object on a loopback port, not serving: its methods are called directly."""

    def make(*args: str):
        options = pychat.parse_options(["--host", "127.0.0.1", "--port", "0", *args])
        server = pychat.ChatServer(options, commands.load_commands())
        made.append(server)
        return server

    made = []
    yield make
    for server in made:
        server.switchboard.stop()
        server.server_close()


# -- Output: one owner for a connection's outbox and its end ---------------------------------------------

def test_output_sends_events_in_order_and_the_first_reason_to_end_wins(switchboard):
    ours, theirs = socket_pair()
    output = pychat.Output(ours, switchboard)
    output.send(pychat.Notice("one"))
    output.send(pychat.Said("lobby", "bob", "two"))
    assert output.end("first reason", pychat.Bye()) is True
    assert output.end("second reason", pychat.Farewell("never sent")) is False
    output.send(pychat.Notice("queued after the end"))
    output.close()
    received = read_until(theirs, b"*** Bye.\n")
    assert received == b"*** one\nbob: two\n*** Bye.\n"
    assert theirs.recv(100) == b"", "the socket was not closed"
    assert output.reason == "first reason"


def test_a_line_queued_in_the_instant_the_connection_ended_never_follows_the_farewell(idle_switchboard):
    ours, theirs = socket_pair()
    output = pychat.Output(ours, idle_switchboard)
    output.send(pychat.Notice("before"))
    output.end("kicked", pychat.Farewell("kicked"))
    # A producer that found the output open just before it ended appends after the check, without a lock.
    output.pending.append(b"bob: a line that lost the race\n")
    output.close()
    assert theirs.recv(4096) == b"*** before\n!! Disconnected: kicked.\n"
    assert theirs.recv(100) == b"", "the socket was not closed"


def test_a_closed_output_is_a_no_op(switchboard):
    ours, theirs = socket_pair()
    output = pychat.Output(ours, switchboard)
    output.close()
    assert output.end("late", pychat.Bye()) is False
    output.send(pychat.Notice("late"))
    output.close()
    assert output.flush() is False
    assert theirs.recv(100) == b""


def test_the_close_happens_even_when_draining_fails(switchboard, monkeypatch):
    ours, theirs = socket_pair()
    output = pychat.Output(ours, switchboard)
    switchboard.watch(output, True)     # as if its socket had not taken everything

    def broken_flush():
        raise RuntimeError("draining failed")

    monkeypatch.setattr(output, "flush", broken_flush)
    output.close()
    assert output.closed and ours.fileno() == -1, "the socket was left open"
    assert output not in switchboard.watched, "the switchboard still watches a closed socket"


def test_a_reader_who_is_cut_off_is_told_why_when_its_socket_can_take_it(switchboard):
    ours, theirs = socket_pair()
    output = pychat.Output(ours, switchboard)
    with output.io_lock:
        output.outbox += b"x" * 1000     # output that will never be sent
    output.end("not reading", pychat.Farewell("not reading what the server sends"), drop_output=True)
    output.close()
    assert read_until(theirs, b"\n") == b"!! Disconnected: not reading what the server sends.\n"
    assert theirs.recv(100) == b""


def test_an_output_that_takes_nothing_is_seen_as_stalled(switchboard):
    ours, theirs = socket_pair()
    output = pychat.Output(ours, switchboard)
    with output.io_lock:
        output.outbox += b"y" * (4 * 1024 * 1024)
    assert output.flush() is True, "a 4 MiB outbox went into a socket that is not read"
    assert output.flush() is True
    assert output.stalled_longer_than(0.5, time.monotonic() + 1)
    assert not output.stalled_longer_than(5, time.monotonic())
    output.close()


def test_the_switchboard_never_sleeps_through_a_queued_line(switchboard):
    """Lines queued the moment the switchboard goes to sleep, from several threads, each arrive at once, not when
    the switchboard's sleep runs out."""
    switchboard.sleep_seconds = 10.0
    switchboard.wake_writer.send(b"\0")         # start a sleep of the new length
    pairs = [socket_pair() for _ in range(4)]
    outputs = [pychat.Output(ours, switchboard) for ours, _ in pairs]
    slowest = 0.0
    for n in range(100):
        deadline = time.monotonic() + TIMEOUT
        while True:                         # wait until the switchboard is asleep (or about to be)
            with switchboard.state_lock:
                if switchboard.sleeping:
                    break
            assert time.monotonic() < deadline, "the switchboard never slept"
            time.sleep(0.001)
        started = time.monotonic()
        threads = [threading.Thread(target=switchboard.queue, args=((output,), b"%d\n" % n)) for output in outputs]
        for thread in threads:
            thread.start()
        for _, theirs in pairs:
            assert read_until(theirs, b"%d\n" % n) .endswith(b"%d\n" % n)
        slowest = max(slowest, time.monotonic() - started)
        for thread in threads:
            thread.join()
    assert slowest < 5, f"a queued line waited {slowest:.2f} s for the switchboard to wake"
    for output in outputs:
        output.close()


def test_everything_queued_while_the_switchboard_is_busy_leaves_in_one_write(idle_switchboard):
    ours, theirs = socket_pair()
    output = pychat.Output(ours, idle_switchboard)
    expected = b""
    for n in range(20):
        line = b"bob: line %d\n" % n
        idle_switchboard.queue((output,), line)
        output.send(pychat.Notice(f"personal {n}"))
        expected += line + b"*** personal %d\n" % n
    assert list(idle_switchboard.ready) == [output], "an output was lined up for the switchboard more than once"
    assert output.flush() is False, "lines were left over after one write to a socket with room for them"
    assert read_until(theirs, b"*** personal 19\n") == expected
    output.close()


def test_lines_from_several_threads_reach_each_receiver_in_the_order_each_thread_queued_them(switchboard):
    """Queueing takes no lock: four threads queue to the same receivers at once, one of them alternating
    room lines with personal lines to the first receiver. Nothing is lost, doubled or reordered."""
    pairs = [socket_pair() for _ in range(3)]
    outputs = [pychat.Output(ours, switchboard) for ours, _ in pairs]
    count = 3000

    def speak(thread: int) -> None:
        for n in range(count):
            switchboard.queue(outputs, b"t%d %d\n" % (thread, n))
            if thread == 0:
                outputs[0].send(pychat.Notice(f"personal {n}"))

    threads = [threading.Thread(target=speak, args=(thread,)) for thread in range(4)]
    for thread in threads:
        thread.start()
    last_lines = [b"t%d %d\n" % (thread, count - 1) for thread in range(4)]
    received = [read_until_all(theirs, last_lines + [b"*** personal %d\n" % (count - 1)] * (which == 0))
                for which, (_, theirs) in enumerate(pairs)]
    for thread in threads:
        thread.join(TIMEOUT)
    for which, data in enumerate(received):
        lines = data.decode().splitlines()
        for thread in range(4):
            own = [line for line in lines if line.startswith(f"t{thread} ")]
            assert own == [f"t{thread} {n}" for n in range(count)], \
                f"receiver {which} got thread {thread}'s lines lost, doubled or out of order"
        if which == 0:
            mine = [line for line in lines if line.startswith(("t0 ", "*** personal"))]
            assert mine == [text for n in range(count) for text in (f"t0 {n}", f"*** personal {n}")], \
                "a personal line overtook, or fell behind, a room line queued before or after it"
    for output in outputs:
        output.close()


def test_a_reader_who_falls_behind_is_cut_off_soon_after_max_queue(idle_switchboard):
    ours, theirs = socket_pair()
    output = pychat.Output(ours, idle_switchboard)
    line = b"x" * 99 + b"\n"
    for n in range(1000):
        idle_switchboard.queue((output,), line)
        if output.reason:
            break
    assert output.reason and output.reason.startswith("not reading: "), f"never cut off: {output.reason}"
    waiting = int(output.reason.split()[2])
    allowed = idle_switchboard.max_queue + (pychat.PENDING_BEFORE_COUNT + 1) * len(line)
    assert idle_switchboard.max_queue < waiting <= allowed, f"cut off with {waiting} bytes waiting, limit {allowed}"
    assert output.dropped and not output.pending and not output.outbox, "a cut-off reader's output was kept"
    assert read_until(theirs, b"\n") == b"!! Disconnected: not reading what the server sends.\n"
    output.close()


# -- the server object's tables ----------------------------------------------------------------------------

def test_the_default_room_is_never_forgotten_however_it_is_spelt(chat_server, monkeypatch):
    monkeypatch.setattr(pychat, "DEFAULT_ROOM", "Lobby")
    monkeypatch.setattr(pychat, "MAX_ROOMS", 3)
    server = chat_server()
    with server.lock:
        for name in ("one", "two", "three", "four", "five"):
            server.room_named(name)
    assert pychat.name_key("Lobby") in server.rooms, f"the default room was evicted: {sorted(server.rooms)}"


def test_a_failure_on_the_way_in_leaves_no_half_signed_in_person(chat_server, monkeypatch):
    server = chat_server()
    ours, theirs = socket_pair()

    class Newcomer:
        address = "127.0.0.1"
        person = None
        output = pychat.Output(ours, server.switchboard)

    def failing_enter(person, room):
        raise RuntimeError("entering the room failed")

    monkeypatch.setattr(server, "_enter", failing_enter)
    with pytest.raises(RuntimeError):
        server.sign_in(Newcomer, "alice")
    assert not server.people and not server.by_serial, "alice stayed in the tables, half signed in"
    assert Newcomer.person is None
    monkeypatch.undo()
    assert server.sign_in(Newcomer, "alice") is None, "the nickname of the failed sign-in stayed taken"


def test_a_command_still_running_for_someone_who_left_changes_no_room_and_no_table(chat_server):
    """A connection's person may leave the chat (the connection ended, or was ended) while a command of it is
    still running on a worker (an IRC JOIN of many rooms): from then on that command must not put them
    back in a room or a table, not even once their account has signed in again."""
    server = chat_server()

    def connection():
        ours, _ = socket_pair()
        return type("Connection", (), {"address": "127.0.0.1", "person": None, "session": None,
                                       "output": pychat.Output(ours, server.switchboard)})

    old, new = connection(), connection()
    assert server.sign_in(old, "mallory", "mallory") is None
    ghost = old.session
    server.remove(old, "connection lost")
    assert server.sign_in(new, "mallory", "mallory") is None
    owner = new.person
    assert owner is not ghost.person, "a new sign-in after the last session ended made no new person"
    for step in (lambda: server.join(ghost, "dev"), lambda: server.rename(ghost, "ghost"),
                 lambda: server.watch(ghost, ["owner"]), lambda: server.ignore(ghost, "mallory"),
                 lambda: server.say(ghost, "boo"), lambda: server.leave(ghost)):
        with pytest.raises(pychat.Refused):
            step()
    room = server.rooms.get(pychat.name_key("dev"))
    assert room is None or not room.members, f"the old connection's JOIN left a ghost in #dev: {room.members}"
    assert not ghost.person.rooms and server.people == {owner.key: owner}, "the tables were changed"
    assert not server.watchers and not server.ignorers, "the old connection was put back in a table"


# -- over real sockets ---------------------------------------------------------------------------------

def test_a_slow_reader_who_quits_past_descriptor_1023_is_still_closed(start_server, connect):
    """With more than 1,023 descriptors in use, the last output of a leaving slow reader is waited for with
    poll(): select() would fail, and the connection would never be closed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the open-file limit ({hard}) is too low for 1,040 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    # 300 KB go to the speaker and to slow, neither reading while it is sent: past the default --max-queue,
    # which cuts a reader off once enough chunks wait, and how many lines a chunk carries depends on timing.
    server = start_server("--max-clients", "0", "--max-per-ip", "0", "--rate", "0", "--max-queue", "4000000")
    idle = []
    try:
        for _ in range(1040):
            idle.append(socket.create_connection((server.host, server.port), timeout=TIMEOUT))
        for sock in idle:
            read_until(sock, b"Choose a nickname:", timeout=30)
        speaker = connect(server, "speaker")
        slow = LineClient.__new__(LineClient)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(TIMEOUT)
        sock.connect((server.host, server.port))
        slow.sock, slow.buffer, slow.seen, slow.nick = sock, b"", [], None
        slow.login("slow")
        speaker.expect(r"\*\*\* slow joined")
        for n in range(300):
            speaker.send(f"{n} " + "z" * 1000)
        speaker.expect("speaker: 299 ", timeout=15)       # all of it is queued to slow by now
        slow.send("/quit")
        server.wait_for_log(r"slow@127\.0\.0\.1 left: quit", timeout=10)
        assert speaker.expect(r"\*\*\* slow quit") == "*** slow quit"
        slow.wait_closed(timeout=15)        # reads what is left, then the close
        speaker.send("still here")
        assert speaker.expect("speaker: still") == "speaker: still here"
    finally:
        for sock in idle:
            sock.close()


# -- every disconnect says why (for nc users too) ---------------------------------------------------------

def test_no_nickname_in_time_is_told_before_the_close(start_server, connect):
    server = start_server("--nick-timeout", "0.5")
    client = connect(server)
    assert client.wait_closed()[-1] == "!! Disconnected: no nickname within 0.5 s."


def test_idle_is_told_before_the_close(start_server, connect):
    server = start_server("--idle-timeout", "0.5")
    client = connect(server, "sleepy")
    assert client.wait_closed()[-1] == "!! Disconnected: idle for 0.5 s."


def test_flooding_is_told_before_the_close(server, connect):
    client = connect(server, "flooder")
    client.send_raw(b"spam\n" * 200)
    assert client.wait_closed()[-1] == "!! Disconnected: flooding (more than 4 lines a second)."


def test_three_wrong_passwords_are_told_before_the_close(start_server, connect):
    server = start_server("--password", "right", "--guess-delay", "0.05")
    client = connect(server)
    client.send_raw(b"wrong\n" * 3)
    lines = client.wait_closed(timeout=15)
    assert lines[-2:] == ["!! Wrong password.", "!! Disconnected: 3 wrong passwords."], lines


def test_shutting_down_is_told_before_the_close(server, connect):
    client = connect(server, "alice")
    server.stop()
    assert client.wait_closed()[-1] == "*** Server shutting down."


# -- issue 14: what leavers leave behind, and lists that cost -----------------------------------------------

def test_chains_of_leavers_who_sent_private_messages_are_not_kept_alive():
    """Each link opens a room, fills its history, sends the next link a private message and leaves; then
    500 fresh rooms push those rooms out of the table. Nothing of the links may stay reachable: the memory
    Python holds (traced, so that the allocator's own caching does not count) returns to what it was."""
    options = pychat.parse_options(["--host", "127.0.0.1", "--port", "0", "--rate", "0", "--max-per-ip", "0"])
    server = pychat.ChatServer(options, commands.load_commands())
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    host, port = server.server_address[:2]
    text = "m" * 4000
    opened = []

    def chain(links: int, first: int) -> None:
        previous = None
        for n in range(first, first + links):
            link = LineClient(host, port)
            opened.append(link)
            link.login(f"link{n}")
            link.send_raw("".join(f"/join room{n}\n" if i == 0 else f"{i} {text}\n" for i in range(17)).encode())
            link.expect(f"link{n}: 16 ", timeout=10)
            if previous is not None:
                previous.send(f"/msg link{n} hi")
                leave(previous)
            previous = link
        leave(previous)

    def leave(link: LineClient) -> None:
        link.send("/quit")
        link.wait_closed()
        link.close()
        opened.remove(link)         # what the test itself read must not count

    def sweep(first: int) -> None:
        sweeper.send_raw("".join(f"/join sweep{first + n}\n/leave\n" for n in range(500)).encode())
        sweeper.expect(rf"\*\*\* You left #sweep{first + 499}\.", timeout=30)

    def held_by_python() -> int:
        deadline = time.monotonic() + TIMEOUT
        while server.connections and len(server.connections) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)            # the last link's thread is finishing
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        sweeper = LineClient(host, port)
        opened.append(sweeper)
        sweeper.login("sweeper")
        chain(10, 0)
        sweep(0)
        before = held_by_python()
        chain(100, 1000)                   # 100 x 16 x 4 kB: 6.4 MB if the links stayed reachable
        sweep(1000)
        grown = held_by_python() - before
    finally:
        tracemalloc.stop()
        for client in opened:
            client.close()
        server.stop()
    assert grown < 1024 * 1024, f"Python holds {grown / 1e6:.1f} MB more after the leavers left"


def test_hundreds_asking_for_online_cannot_slow_the_chat(start_server, connect):
    server = start_server("--max-per-ip", "0", "--max-clients", "0")
    crowd = [socket.create_connection((server.host, server.port), timeout=TIMEOUT) for _ in range(300)]
    try:
        for n, sock in enumerate(crowd):
            sock.sendall(f"crowd{n}\n".encode())
        alice, bob = connect(server, "alice"), connect(server, "bob")
        for sock in crowd:
            read_until(sock, b"*** You are in #lobby", timeout=30)
            sock.setblocking(False)
        refused = 0
        first = slowest = 0.0
        for n in range(20):
            for sock in crowd:
                try:
                    sock.sendall(b"/online\n/online\n")
                except BlockingIOError:
                    pass
            started = time.monotonic()
            alice.send(f"ping {n}")
            bob.expect(f"alice: ping {n}$", timeout=10)
            # In the first round everyone is still within their allowance, so 300 lists of 300 are made
            # (on 300 workers) while alice speaks; from then on the budget holds them back.
            if n == 0:
                first = time.monotonic() - started
            else:
                slowest = max(slowest, time.monotonic() - started)
            try:
                while True:
                    data = crowd[n].recv(65536)
                    refused += data.count(b"!! /online lists")
                    if not data:
                        break
            except BlockingIOError:
                pass
        assert first < 3.0, f"a chat line took {first:.2f} s while 300 people asked for /online the first time"
        assert slowest < 1.0, f"a chat line took {slowest:.2f} s while 300 people kept asking for /online"
        assert refused, "no /online was refused: the listing budget did not apply"
        alice.send("/online")
        assert alice.expect("-- |!! ").startswith("-- 302 online: "), "a person who asks rarely is answered"
    finally:
        for sock in crowd:
            sock.close()


# -- the gate, and catch-up, without a server running ---------------------------------------------------

def test_the_gate_checks_a_password_before_the_ban_and_counts_every_wrong_guess():
    storage = pychat.Storage(None)
    options = pychat.parse_options(["--guess-delay", "0"])
    gate = pychat.Gate(storage, lambda: options)
    storage.register("alice", "correct horse")
    try:
        someone = type("Connection", (), {"address": "127.0.0.2"})
        assert gate.check_account(someone, "ALICE", "correct horse") == ("alice", "password")
        assert gate.name_problem("aIice", None) == ("alice is registered: sign in as alice with its password to "
                                                    "use it.")
        assert gate.name_problem("Alice", "alice") is None and not gate.needs_invitation("alice")
        storage.ban(pychat.Ban("account", pychat.name_key("alice"), "alice", "spam", "olga", time.time(), None))
        assert gate.check_account(someone, "alice", "wrong one") is None, "a wrong password heard of the ban"
        with pytest.raises(pychat.Disconnect) as banned:
            gate.check_account(someone, "alice", "correct horse")
        assert "banned" in banned.value.reason
        for _ in range(pychat.ADDRESS_GUESSES - 1):
            assert gate.check_account(someone, "nobody", "guess") is None
        with pytest.raises(pychat.TooManyGuesses):
            gate.check_account(someone, "alice", "correct horse")
        assert not gate.needs_invitation("bob")
        options.private = True
        assert gate.needs_invitation("bob") and not gate.needs_invitation("alice")
    finally:
        storage.close()


def test_catch_up_shows_the_newest_unread_lines_with_how_many_and_never_moves_a_position_back(chat_server):
    server = chat_server("--history", "5")
    server.storage.register("alice", "correct horse")

    def connection():
        ours, _ = socket_pair()
        output = pychat.Output(ours, server.switchboard)
        output.owner = threading.get_ident()        # what it is sent waits in output.pending, read below
        return type("Connection", (), {"address": "127.0.0.1", "person": None, "session": None, "output": output})

    def lines(connection) -> list[str]:
        return b"".join(connection.output.pending).decode().splitlines()

    bob, alice = connection(), connection()
    assert server.sign_in(bob, "bob") is None and server.sign_in(alice, "alice", "alice") is None
    server.say(bob.session, "read before leaving")
    server.remove(alice, "gone")        # a session that never said what it read read all it was shown
    for number in range(pychat.CATCH_UP_LINES + 5):
        server.say(bob.session, f"line {number}")
    again = connection()
    assert server.sign_in(again, "alice", "alice") is None
    shown = lines(again)
    header = next(line for line in shown if " new in #lobby" in line)
    assert header.startswith(f"*** {pychat.CATCH_UP_LINES + 5} new in #lobby since ") and header.endswith(
        f"; the latest {pychat.CATCH_UP_LINES} follow (/history #lobby for earlier ones)."), header
    history = [line for line in shown if line.startswith("[history ")]
    assert len(history) == pychat.CATCH_UP_LINES and history[0].endswith("bob: line 5") and \
        history[-1].endswith(f"bob: line {pychat.CATCH_UP_LINES + 4}"), history[:2]
    person, target = again.person, pychat.room_target("lobby")
    newest = person.read[target]
    server.mark_read(again.session)
    assert person.read[target] > newest
    server.mark_read(again.session, "#lobby", line_id=newest)
    assert person.read[target] > newest, "a read position went back"
