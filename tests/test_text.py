"""Untrusted text: what the server keeps of a line, how long it may be, and which names it accepts.

Unit tests call the protocol section's pure functions directly; behaviour
tests send through a real server on loopback.
"""
from __future__ import annotations

import contextlib
import itertools
import random
import re
import socket
import time
import unicodedata

import pytest

from conftest import SERVER_SCRIPT, TIMEOUT, LineClient, ServerProcess, import_script, read_until, watch_for

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
        self.pending = b""
        self.errors = 0
        self.warned = False
        # Admitted, or signed in, before the attack starts: each gives a fresh flood allowance.
        read_until(self.sock, b"*** Choose a nickname:")
        if nick:
            self.sock.sendall(f"{nick}\n".encode())
            read_until(self.sock, b"*** You are in #")
        self.sock.setblocking(False)

    def read(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while data := self.sock.recv(65536):
                *lines, self.pending = (self.pending + data).split(b"\n")
                self.warned = self.warned or any(line.startswith(b"!! You are sending too fast") for line in lines)
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
        allowed = 18 + int((now - started) * 3.5)     # just under the flood limit: a burst of 20, then 4 a second
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
    # Every name sent has been refused soon after the last: the server did not fall behind. (Before names
    # were bounded, the work queued here took it half a minute.)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and sum(a.errors for a in attackers) < sent * len(attackers):
        for attacker in attackers:
            attacker.read()
        watch_for(bob, "(?!)", 0.02)
    answered = sum(a.errors for a in attackers)
    for attacker in attackers:
        attacker.sock.close()
    assert sent >= 24, f"only {sent} names were sent per connection: the attack did not run"
    assert not any(a.warned for a in attackers), "the attack went over the flood limit, so lines were dropped"
    assert answered == sent * len(attackers), \
        f"three seconds after the attack, only {answered} of {sent * len(attackers)} names had been refused"
    assert max(latencies) < 1.0, f"bystander latency rose to {max(latencies):.2f} s"


# -- nicknames: the rule, tested against whole classes of Unicode -------------------------------------

def accepted(name: str) -> bool:
    """Whether the server would take NAME, normalised as it does."""
    return server_module.name_problem(server_module.normal_name(name)) is None


@pytest.fixture(scope="module")
def characters() -> list[tuple[str, str, str]]:
    """(character, Unicode name, category) of every assigned letter, mark and number outside the big
    ideograph, Hangul-syllable and private-use blocks (which hold no look-alikes of the kinds tested)."""
    big_blocks = [(0x3400, 0x4DC0), (0x4E00, 0xA000), (0xAC00, 0xD7A4), (0xD800, 0xF900), (0x17000, 0x18D00),
                  (0x1B170, 0x1B300), (0x20000, 0xE0000), (0xF0000, 0x110000)]
    found, start = [], 0
    for end, resume in big_blocks + [(0x110000, 0x110000)]:
        for code in range(start, end):
            ch = chr(code)
            category = unicodedata.category(ch)
            if category[0] in "LMN":
                found.append((ch, unicodedata.name(ch, ""), category))
        start = resume
    return found


def refused_wherever_it_stands(ch: str) -> str | None:
    """Why CH, if the server would keep it, is not refused in some position of a name; None when it always is."""
    for name in (ch, ch * 3, "a" + ch, "ab" + ch + "c"):
        kept = server_module.normal_name(name)
        if ch in kept and server_module.name_problem(kept) is None:
            return f"{name!a} was accepted"
    return None


def test_no_small_capital_is_accepted_in_a_name(characters):
    small_capitals = [ch for ch, name, _ in characters if "SMALL CAPITAL" in name]
    assert len(small_capitals) > 50
    failures = [problem for ch in small_capitals if (problem := refused_wherever_it_stands(ch))]
    assert not failures, failures[:20]


def test_no_modifier_letter_is_accepted_but_those_ordinary_words_use(characters):
    modifiers = [ch for ch, _, category in characters if category == "Lm"]
    assert len(modifiers) > 200
    failures = [problem for ch in modifiers if ch not in "々ゝゞーヽヾๆໆ" and (problem := refused_wherever_it_stands(ch))]
    assert not failures, failures[:20]
    for word in ("佐々木", "スーパー", "いすゞ", "ห้าๆ"):
        assert accepted(word), f"{word} was refused"


def test_no_letter_that_reads_as_punctuation_or_another_letter_is_accepted(characters):
    # What the letter is, not the accent it carries ("A WITH INVERTED BREVE" is an A).
    suspects = [ch for ch, name, category in characters if category[0] == "L" and re.search(
        r"CLICK|GLOTTAL STOP|APOSTROPHE|COLON|COMMA|PRIME|QUOTATION|TONE|STRESS|TURNED|REVERSED|INVERTED|"
        r"^LATIN LETTER |AVAGRAHA", name.split(" WITH ")[0])]
    assert len(suspects) > 100
    failures = [problem for ch in suspects if (problem := refused_wherever_it_stands(ch))]
    assert not failures, failures[:20]


@pytest.mark.parametrize("script", ["LISU", "CHEROKEE", "CANADIAN SYLLABICS", "COPTIC", "RUNIC", "TIFINAGH", "VAI",
                                    "OSAGE", "DESERET", "OLD ITALIC", "GOTHIC", "CARIAN", "LYCIAN", "OGHAM",
                                    "GLAGOLITIC", "BAMUM", "WARANG CITI", "NKO", "ADLAM"])
def test_no_letter_of_a_script_whose_letters_read_as_latin_or_are_unchecked_is_accepted(characters, script):
    letters = [ch for ch, name, _ in characters if name.startswith(script + " ")]
    assert letters, f"no characters of {script} found"
    failures = [problem for ch in letters if (problem := refused_wherever_it_stands(ch))]
    assert not failures, failures[:20]


def test_every_digit_of_every_script_folds_to_the_ascii_digit_and_its_look_alike(characters):
    digits = [ch for ch, _, category in characters if category == "Nd"]
    assert len(digits) > 500
    for ch in digits:
        plain = str(unicodedata.decimal(ch))
        assert server_module.name_key(f"b{ch}b") == server_module.name_key(f"b{plain}b"), \
            f"{unicodedata.name(ch)} does not fold to {plain}"
    assert server_module.name_key("b੦b") == server_module.name_key("bob")


def test_a_digit_of_another_script_beside_latin_letters_is_refused(characters):
    failures = [ch for ch, _, category in characters if category == "Nd" and not "0" <= ch <= "9"
                and server_module.normal_name(f"b{ch}b") != f"b{unicodedata.decimal(ch)}b" and accepted(f"b{ch}b")]
    assert not failures, [unicodedata.name(ch) for ch in failures[:20]]


def test_letters_of_two_scripts_are_refused_in_one_name():
    samples = {"Latin": "a", "Greek": "λ", "Cyrillic": "ж", "Armenian": "ա", "Georgian": "ა", "Hebrew": "ש",
               "Arabic": "ب", "Devanagari": "क", "Thai": "ก", "CJK": "李", "Ethiopic": "ሀ", "Tamil": "க"}
    for first_script, first in samples.items():
        for second_script, second in samples.items():
            if first_script != second_script:
                assert not accepted(first + second), f"{first_script} and {second_script} letters were accepted together"


@pytest.mark.parametrize("name", [
    "alice", "Bob_2", "x-y", "李雷", "佐々木", "田中一郎", "たなか", "ハルカ", "김민준", "Ольга", "Їжак", "Қайрат", "Ђорђе",
    "Ελένη", "Νίκος", "ἀλέξανδρος", "محمد", "أحمد", "ملک۲", "דוד", "שָׁלוֹם", "राहुल", "अर्जुन१", "প্রিয়া", "ਗੁਰਪ੍ਰੀਤ",
    "ગુજરાત", "ଓଡ଼ିଆ", "தமிழ்", "తెలుగు", "ಕನ್ನಡ", "മലയാളം", "සිංහල", "สมชาย", "ສົມ", "བཀྲ", "မောင်", "សុខា", "አበበ",
    "Արամ", "გიორგი", "Łukasz", "Søren", "Þór", "Đorđe", "Nguyễn", "Çağlar", "Şule", "Ærø", "Straße", "Chloë",
    "Mọ́ṣẹ́", "Ñandú", "Ɛsi", "Ŋgoni", "ɓaaba", "Ahmad_99",
])
def test_names_people_write_in_their_own_script_are_accepted(name):
    assert server_module.name_problem(server_module.normal_name(name)) is None


def test_whole_alphabets_are_accepted_letter_by_letter(characters):
    alphabets = {
        "Latin with accents, hooks and strokes": [ch for ch, name, _ in characters
                                                  if re.fullmatch(r"LATIN (SMALL|CAPITAL) LETTER [A-Z]( WITH .*)?", name)
                                                  and server_module.normal_name(ch) == ch],
        "Cyrillic": [chr(c) for c in range(0x410, 0x450)], "Greek": [chr(c) for c in range(0x3b1, 0x3ca)],
        "Hebrew": [chr(c) for c in range(0x5d0, 0x5eb)], "Arabic": [chr(c) for c in range(0x628, 0x64b) if c != 0x640],   # not the tatweel
        "Devanagari": [chr(c) for c in range(0x915, 0x93a)], "Hiragana": [chr(c) for c in range(0x3042, 0x3094)],
        "Katakana": [chr(c) for c in range(0x30a2, 0x30f5)], "Hangul": [chr(c) for c in range(0xac00, 0xd7a4, 97)],
        "CJK": [chr(c) for c in range(0x4e00, 0xa000, 89)], "Thai": [chr(c) for c in range(0xe01, 0xe2f)],
    }
    for alphabet, letters in alphabets.items():
        assert len(letters) > 20, alphabet
        problems = {ch: server_module.name_problem(server_module.normal_name(ch * 2)) for ch in letters}
        refused = {ch: problem for ch, problem in problems.items() if problem and not problem.endswith("is reserved.")}
        assert not refused, f"{alphabet}: refused {list(refused.items())[:5]}"


@pytest.mark.parametrize("a, b", [
    ("łukasz", "lukasz"), ("đorđe", "dorde"), ("søren", "soren"), ("ħal", "hal"), ("ロン", "口ン"), ("ペン", "へン"),
    ("一郎", "ー郎"), ("ab੦", "abo"), ("x٣", "x3"),
])
def test_letters_with_strokes_kana_that_look_like_kanji_and_digits_share_a_key(a, b):
    assert server_module.name_key(a) == server_module.name_key(b)


@pytest.fixture(scope="module")
def holders():
    """One server where alice, bob and tokyo stay signed in for the nickname tests."""
    server = ServerProcess(())
    clients = [LineClient(server.host, server.port) for _ in range(3)]
    try:
        for client, nick in zip(clients, ("alice", "bob", "tokyo")):
            client.login(nick)
        yield server
    finally:
        for client in clients:
            client.close()
        server.kill()


# Each newcomer signs in under a name never used before: the one of the test before may not be given up yet.
_newcomers = itertools.count()


@pytest.mark.parametrize("how", ["at sign-in", "with /nick"])
@pytest.mark.parametrize("name", ["bᴏb", "b੦b", "aǀice", "ꓢꓰꓣꓦꓰꓣ", "ꜱᴇʀᴠᴇʀ", "ᴀᴅᴍɪɴ", "ǃǃ", "ːː", "ʼʼʼ", "ᏚᎬᎡᏙᎬᎡ",
                                  "ᗩᒪIᑕE", "ʙᴏʙ", "ⲦⲞⲔⲨⲞ", "b٥b"])
def test_names_that_read_as_someone_elses_or_as_a_reserved_one_are_refused(holders, how, name):
    client = LineClient(holders.host, holders.port)
    try:
        if how == "at sign-in":
            client.expect(re.escape("*** Choose a nickname:"))
            client.send(name)
            answer = client.recv_line()
        else:
            client.login(f"carol{next(_newcomers)}")
            client.send(f"/nick {name}")
            answer = client.expect(r"!! |\*\*\* carol\d+ is now known as ")
    finally:
        client.close()
    assert answer.startswith("!! "), f"{name!a} was accepted {how}: {answer!a}"


def test_a_name_in_another_script_signs_in_and_chats(holders):
    client = LineClient(holders.host, holders.port)
    try:
        assert client.login("佐々木").startswith("*** Welcome, 佐々木!")
        client.send("/nick Ολγα")
        assert client.expect(r"\*\*\* 佐々木 is now known as ") == "*** 佐々木 is now known as Ολγα"
    finally:
        client.close()


def test_plain_ascii_lines_come_out_as_the_rules_say():
    """Indentation kept (up to MAX_INDENT), one space between words, none at the end: whichever way
    clean_text() takes, the short one for a line with nothing to take out or the whole one."""
    chooser = random.Random(7)
    for _ in range(3000):
        text = "".join(chooser.choice("ab  c.!") for _ in range(chooser.randrange(40)))
        body = text.lstrip(" ")
        indent = min(len(text) - len(body), server_module.MAX_INDENT)
        words = " ".join(body.split())
        assert server_module.clean_text(text) == (" " * indent + words if words else ""), repr(text)
