"""Untrusted text: what the server keeps of a line, how long it may be, and which names it accepts.

Unit tests call the protocol section's pure functions directly; behaviour
tests send through a real server on loopback.
"""
from __future__ import annotations

import contextlib
import re
import socket
import time

import pytest

from conftest import SERVER_SCRIPT, TIMEOUT, import_script, watch_for

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


# -- normalising is bounded before it starts -----------------------------------------------------------

# About 2,000 combining marks in descending combining class: normalising this
# sorts the marks by insertion, a million steps.
MARKS = "a" + "\u0301" * 1000 + "\u0316" * 1000


def test_a_name_over_the_limit_is_refused_without_being_normalised():
    for name in (MARKS, "a" * 21, "ｂ" * 21, "\ufdfa" * 21):
        assert server_module.normal_name(name) is name, "an over-long name was normalised"
        assert server_module.name_key(name) == "\0", "an over-long name was folded"
        assert "too long" in server_module.name_problem(server_module.normal_name(name))


def test_a_name_that_normalising_makes_too_long_is_refused_for_its_length():
    expanded = server_module.normal_name("\ufdfa\ufdfa")       # each becomes 18 characters
    assert len(expanded) > server_module.MAX_NICKNAME_LENGTH
    assert "too long" in server_module.name_problem(expanded)


def test_the_text_functions_take_time_linear_in_their_input():
    """Doubling the input at most about doubles the time: nothing quadratic runs on untrusted text."""
    import time
    limit = server_module.MAX_LINE_BYTES

    def cost(function, text: str) -> float:
        """The best of five timings of four calls: the least disturbed by other work on the machine."""
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(4):
                function(text)
            timings.append(time.perf_counter() - started)
        return min(timings)

    samples = [MARKS, " \u200b" * 1000, "\t" * 2000, "x " * 1000, "\u3000" * 1300, "a" + "\u0301" * 2000]
    for function in (clean_text, server_module.normal_name, server_module.name_key, server_module.name_problem):
        for sample in samples:
            half, whole = sample[:len(sample) // 2], sample
            assert len(whole.encode()) <= 2 * limit
            small, large = cost(function, half), cost(function, whole)
            assert large < 4 * small + 0.002, \
                f"{function.__name__} took {small * 250:.2f} ms on {len(half)} characters, {large * 250:.2f} ms on {len(whole)}"


class Attacker:
    """A raw connection from ADDRESS that sends without waiting and counts the error lines it gets back."""

    def __init__(self, server, address: str, nick: str | None) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=TIMEOUT,
                                             source_address=(address, 0))
        if nick:
            self.sock.sendall(f"{nick}\n".encode())
        self.sock.setblocking(False)
        self.pending = b""
        self.errors = 0

    def read(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while data := self.sock.recv(65536):
                *lines, self.pending = (self.pending + data).split(b"\n")
                self.errors += sum(line.startswith(b"!! ") for line in lines)

    def send(self, data: bytes) -> None:
        self.sock.setblocking(True)
        self.sock.sendall(data)
        self.sock.setblocking(False)


def test_bystanders_chat_within_a_second_while_54_connections_send_mark_laden_names(server, connect):
    """Issue 14 point 2: 36 connections at the nickname prompt, and 18 signed in using /msg and /nick,
    from three addresses, each sending a 2,000-mark name at the allowed rate for three seconds. Every
    one is refused at once, and a bystander's line reaches the room within a second throughout."""
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    alice.expect(r"\*\*\* bob joined")
    attackers = [Attacker(server, f"127.0.0.{1 + n % 3}", f"mallory{n}" if n % 3 == 0 else None) for n in range(54)]
    attacks = [MARKS.encode() + b"\n", f"/msg {MARKS} hi\n".encode(), f"/nick {MARKS}\n".encode()]
    started = time.monotonic()
    latencies = []
    sent = 0
    for rounds in range(100):            # one round every 0.05 s or more, until three seconds have passed
        now = time.monotonic()
        if now - started > 3.0:
            break
        allowed = 19 + int((now - started) * 4)       # just under the flood limit: a burst of 20, then 4 a second
        for n, attacker in enumerate(attackers):
            attacker.read()
            for line in range(sent, allowed):
                attacker.send(attacks[0] if n % 3 else attacks[1 + line % 2])
        sent = max(sent, allowed)
        if rounds % 5 == 0:               # bob keeps well within his own flood limit
            bob.send(f"ping {rounds}")
            said = time.monotonic()
            alice.expect(f"bob: ping {rounds}$", timeout=1.0)
            latencies.append(time.monotonic() - said)
        watch_for(bob, "(?!)", 0.05)
    # Every name sent has been refused within a second of the last: the server did not fall behind.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and sum(a.errors for a in attackers) < sent * len(attackers):
        for attacker in attackers:
            attacker.read()
        watch_for(bob, "(?!)", 0.02)
    answered = sum(a.errors for a in attackers)
    for attacker in attackers:
        attacker.sock.close()
    assert sent >= 25, f"only {sent} names were sent per connection: the attack did not run"
    assert answered == sent * len(attackers), \
        f"one second after the attack, only {answered} of {sent * len(attackers)} names had been refused"
    assert max(latencies) < 1.0, f"bystander latency rose to {max(latencies):.2f} s"
