"""The data directory's pieces, called directly: files, records, stores, history, accounts, bans, durations."""
from __future__ import annotations

import datetime
import json
import logging
import os
import stat
import threading
import time
import tracemalloc

import pytest

from conftest import SERVER_SCRIPT, import_script

server = import_script(SERVER_SCRIPT, "pychat_server")


def write_lines(path, *lines: str | bytes) -> None:
    with open(path, "wb") as file:
        for line in lines:
            file.write(line if isinstance(line, bytes) else line.encode("utf-8"))


def history_record(room: str, line: str, when: float = 1_700_000_000.0) -> str:
    return json.dumps({"time": when, "room": room, "line": line}) + "\n"


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- files ---------------------------------------------------------------------------------------

def test_an_atomic_write_does_not_follow_a_symlink_planted_at_the_temporary_path(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "history.jsonl"
    os.symlink(victim, f"{target}.tmp")
    server.write_file_atomically(str(target), b"new\n")
    assert victim.read_text() == "precious", "the write went through the planted link"
    assert not target.is_symlink() and target.read_bytes() == b"new\n"
    assert mode(target) == 0o600
    assert not os.path.lexists(f"{target}.tmp")


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_anything_but_a_regular_file_is_refused_at_once_with_a_clear_error(tmp_path, kind):
    path = tmp_path / "history.jsonl"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        (tmp_path / "real").write_text("")
        os.symlink(tmp_path / "real", path)
    outcome: list = []
    reader = threading.Thread(target=lambda: outcome.append(pytest.raises(
        server.StorageError, lambda: list(server.RecordFile(str(path)).read()))), daemon=True)
    reader.start()
    reader.join(5)
    assert outcome, f"reading a {kind} hung"
    message = str(outcome[0].value)
    assert str(path) in message and ("not a regular file" in message or "symbolic link" in message), message


def test_an_existing_file_readable_by_others_is_made_private(tmp_path):
    path = tmp_path / "accounts.jsonl"
    path.write_text("")
    os.chmod(path, 0o644)
    os.close(server.open_data_file(str(path), os.O_RDONLY))
    assert mode(path) == 0o600


def test_damaged_lines_are_named_by_file_and_line_and_the_rest_is_read(tmp_path, caplog):
    path = tmp_path / "bans.jsonl"
    write_lines(path, '{"key": "a", "value": {}}\n', "not json\n", "[1, 2]\n", b"\xff\xfe\n",
                '{"time": NaN}\n', "x" * (server.MAX_RECORD_BYTES + 10) + "\n", '{"key": "b", "value": {}}\n',
                '{"key": "c", "val')
    with caplog.at_level(logging.WARNING, logger="pychat"):
        records = list(server.RecordFile(str(path)).read())
    assert [number for number, _ in records] == [1, 7]
    for line, why in ((2, "not JSON"), (3, "not a JSON object"), (4, "not UTF-8"), (5, "not JSON (NaN is not a number)"),
                      (6, "longer than"), (8, "cut short")):
        assert f"{path} line {line}: {why}" in caplog.text, f"line {line} was not reported as {why!r}"


def test_a_damaged_file_is_never_a_traceback_however_it_is_damaged(tmp_path):
    path = tmp_path / "accounts.jsonl"
    write_lines(path, "[" * 100000 + "\n", '{"key": 5, "value": 1}\n', '{"key": "k", "value": []}\n',
                '{"key": "k", "value": {"name": 1}}\n', "1" * 5000 + "\n", '{"key": "\\ud800", "value": {}}\n')
    accounts = server.Accounts(server.RecordFile(str(path)))
    assert len(accounts.store) == 0


# -- the keyed store ----------------------------------------------------------------------------

def plain(key: str, value: dict) -> dict:
    if not isinstance(value.get("n"), int):
        raise ValueError("'n' is not a number")
    return value


def test_a_store_keeps_its_last_word_about_each_key_across_a_reopen(tmp_path):
    path = str(tmp_path / "store.jsonl")
    store = server.KeyedStore(server.RecordFile(path), plain, most=10)
    store.put("a", {"n": 1})
    store.put("b", {"n": 2})
    store.put("a", {"n": 3})
    assert store.delete("b") and not store.delete("b")
    store.close()
    again = server.KeyedStore(server.RecordFile(path), plain, most=10)
    assert again.items() == [("a", {"n": 3})]
    assert len(open(path).readlines()) == 1, "the file was not compacted at start"
    assert mode(path) == 0o600


def test_a_store_refuses_records_past_its_limit_and_a_file_that_holds_more_is_cut_to_it(tmp_path, caplog):
    path = str(tmp_path / "store.jsonl")
    store = server.KeyedStore(server.RecordFile(path), plain, most=3)
    for key in "abc":
        store.put(key, {"n": 0})
    with pytest.raises(server.StoreFull):
        store.put("d", {"n": 0})
    store.put("a", {"n": 1})            # changing a record is not adding one
    with open(path, "a") as file:
        file.write(json.dumps({"key": "e", "value": {"n": 0}}) + "\n")
    with caplog.at_level(logging.WARNING, logger="pychat"):
        again = server.KeyedStore(server.RecordFile(path), plain, most=3)
    assert sorted(key for key, _ in again.items()) == ["a", "b", "c"]
    assert f"{path} line 5: more than 3 records" in caplog.text


def test_a_store_file_stays_bounded_however_often_its_records_change(tmp_path):
    path = str(tmp_path / "store.jsonl")
    store = server.KeyedStore(server.RecordFile(path), plain, most=10)
    for n in range(400):
        store.put(f"k{n % 5}", {"n": n})
        if n % 7 == 0:
            store.delete(f"k{n % 5}")
    lines = len(open(path).readlines())
    assert lines <= 2 * len(store) + server.COMPACT_SLACK + 1, f"{lines} lines for {len(store)} records"
    reopened = server.KeyedStore(server.RecordFile(path), plain, most=10)
    assert reopened.items() == store.items()


def test_a_record_too_big_to_keep_is_refused_not_written(tmp_path):
    store = server.KeyedStore(server.RecordFile(str(tmp_path / "s.jsonl")), plain, most=10)
    with pytest.raises(server.StoreFull):
        store.put("a", {"n": 1, "text": "x" * server.MAX_RECORD_BYTES})
    assert "a" not in store


# -- history ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("when", ["NaN", "Infinity", "-Infinity", "1e300", "-5", '"noon"', "true"])
def test_a_history_record_with_an_impossible_time_is_skipped(tmp_path, when, caplog):
    path = tmp_path / "history.jsonl"
    write_lines(path, history_record("lobby", "bob: kept"),
                f'{{"time": {when}, "room": "lobby", "line": "bob: bad"}}\n')
    with caplog.at_level(logging.WARNING, logger="pychat"):
        history = server.HistoryLog(server.RecordFile(str(path)), limit=20, keep="lobby")
    assert history.rooms_and_lines() == [("lobby", [(1_700_000_000.0, "bob: kept")])]
    assert f"{path} line 2:" in caplog.text
    for _, lines in history.rooms_and_lines():
        for when_kept, _ in lines:      # every time kept can be shown as a date
            datetime.datetime.fromtimestamp(when_kept, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_history_record_with_a_lone_surrogate_is_skipped_and_the_file_rewritten(tmp_path):
    path = tmp_path / "history.jsonl"
    write_lines(path, '{"time": 1700000000, "room": "lobby", "line": "bob: \\ud800"}\n',
                '{"time": 1700000000, "room": "\\udc00", "line": "bob: x"}\n', history_record("lobby", "bob: ok"))
    history = server.HistoryLog(server.RecordFile(str(path)), limit=20, keep="lobby")
    assert [line for _, lines in history.rooms_and_lines() for _, line in lines] == ["bob: ok"]
    assert path.read_text(encoding="utf-8") == history_record("lobby", "bob: ok")


def test_reading_a_history_of_many_rooms_holds_only_the_rooms_it_keeps(tmp_path):
    path = tmp_path / "history.jsonl"
    rooms = 10 * server.MAX_ROOMS
    with open(path, "w") as file:
        file.writelines(history_record(f"r{n}", "bob: " + "x" * 40) for n in range(rooms))
    tracemalloc.start()
    try:
        history = server.HistoryLog(server.RecordFile(str(path)), limit=20, keep="lobby")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    kept = history.rooms_and_lines()
    assert len(kept) == server.MAX_ROOMS
    assert kept[-1][0] == f"r{rooms - 1}"
    # Holding every room would take over 5 MiB here (5,000 rooms of a deque each).
    assert peak < 2 * 2 ** 20, f"reading took {peak / 2 ** 20:.1f} MiB at its peak"


def test_the_rooms_kept_are_the_last_used_and_the_default_room_always(tmp_path):
    path = tmp_path / "history.jsonl"
    with open(path, "w") as file:
        file.write(history_record("lobby", "alice: lobby line"))
        file.write(history_record("dev", "alice: first dev line"))
        file.writelines(history_record(f"spam{n}", "troll: x") for n in range(server.MAX_ROOMS))
        file.write(history_record("dev", "alice: last dev line"))
    history = server.HistoryLog(server.RecordFile(str(path)), limit=20, keep="lobby")
    kept = dict(history.rooms_and_lines())
    assert len(kept) == server.MAX_ROOMS
    assert [line for _, line in kept["lobby"]] == ["alice: lobby line"]
    assert [line for _, line in kept["dev"]] == ["alice: first dev line", "alice: last dev line"]
    assert "spam0" not in kept and "spam1" not in kept


def test_the_history_file_stays_bounded_while_lines_are_said(tmp_path):
    path = tmp_path / "history.jsonl"
    history = server.HistoryLog(server.RecordFile(str(path)), limit=5, keep="lobby")
    for n in range(5000):
        history.append("lobby" if n % 2 else "dev", time.time(), f"bob: {n}")
    lines = path.read_text().splitlines()
    assert len(lines) <= 2 * 10 + server.COMPACT_SLACK_HISTORY + 1, f"the file has {len(lines)} lines"
    reread = server.HistoryLog(server.RecordFile(str(path)), limit=5, keep="lobby")
    assert reread.rooms_and_lines() == history.rooms_and_lines()
    assert [line for _, line in dict(reread.rooms_and_lines())["lobby"]] == [f"bob: {n}" for n in
                                                                           range(4991, 5000, 2)]


# -- accounts and passwords --------------------------------------------------------------------------

def test_a_password_check_takes_tens_of_milliseconds_and_only_the_right_one_passes(tmp_path):
    accounts = server.Accounts(server.RecordFile(str(tmp_path / "accounts.jsonl")))
    accounts.register("alice", "correct horse")
    started = time.perf_counter()
    assert accounts.verify("alice", "correct horse")
    took = time.perf_counter() - started
    assert not accounts.verify("alice", "correct horsf")
    assert not accounts.verify("bob", "correct horse")
    assert 0.01 < took < 2, f"one scrypt check took {took * 1000:.0f} ms"
    record = json.loads(open(tmp_path / "accounts.jsonl").read().splitlines()[-1])["value"]
    assert "correct horse" not in json.dumps(record)
    assert (record["n"], record["r"], record["p"]) == (2 ** 14, 8, 1) and len(bytes.fromhex(record["salt"])) == 16


def test_accounts_are_found_by_any_lookalike_and_each_has_its_own_salt(tmp_path):
    path = str(tmp_path / "accounts.jsonl")
    accounts = server.Accounts(server.RecordFile(path))
    accounts.register("alice", "same password")
    accounts.register("bob", "same password")
    assert accounts.name("аlice") == "alice" and accounts.name("ALICE") == "alice"
    with pytest.raises(server.StoreFull):
        accounts.register("Alice", "another one")
    salts = {record["salt"] for _, record in accounts.store.items()}
    hashes = {record["hash"] for _, record in accounts.store.items()}
    assert len(salts) == 2 and len(hashes) == 2
    accounts.set_password("alice", "new password")
    reopened = server.Accounts(server.RecordFile(path))
    assert reopened.verify("alice", "new password") and not reopened.verify("alice", "same password")
    assert reopened.remove("alice") and reopened.name("alice") is None


@pytest.mark.parametrize("password, why", [
    ("short", "too short"), ("x" * 300, "too long"), ("xxalicexx", "contains your nickname"),
    ("ALICE2024", "contains your nickname"), ("aaaaaaaaaa", "different characters"),
])
def test_weak_or_overlong_passwords_are_refused_with_a_reason(password, why):
    problem = server.password_problem(password, "alice")
    assert problem is not None and why in problem, problem
    assert server.password_problem("correct horse", "alice") is None


def test_an_account_record_edited_by_hand_is_refused_with_its_line(tmp_path, caplog):
    path = tmp_path / "accounts.jsonl"
    good = server.Accounts(server.RecordFile(str(path)))
    good.register("alice", "correct horse")
    good.store.close()
    record = json.loads(path.read_text())
    bad = [dict(record, key="bob"), {"key": "carol", "value": dict(record["value"], name="carol", n=1000)},
           {"key": "dave", "value": dict(record["value"], name="dave", salt="zz")}]
    with open(path, "a") as file:
        file.writelines(json.dumps(line) + "\n" for line in bad)
    with caplog.at_level(logging.WARNING, logger="pychat"):
        accounts = server.Accounts(server.RecordFile(str(path)))
    assert accounts.names() == ["alice"]
    for line, why in ((2, "'alice' is filed under the key of another name"), (3, "'n' is not"), (4, "'salt' is not")):
        assert f"line {line}: {why}" in caplog.text


def test_an_invitation_code_works_for_its_name_until_it_is_used(tmp_path):
    invitations = server.Invitations(server.RecordFile(str(tmp_path / "invitations.jsonl")))
    code = invitations.create("dave", by="alice")
    assert invitations.waiting("dave") and not invitations.waiting("erin")
    assert not invitations.check("erin", code)
    assert not invitations.check("dave", code + "x")
    assert invitations.check("dave", f" {code.upper()} ")
    assert invitations.remove("dave")
    assert not invitations.check("dave", code) and not invitations.waiting("dave")


# -- bans ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("10m", 600), ("2h", 7200), ("7d", 604800), ("1w", 604800), ("1h30m", 5400), ("45s", 45),
    ("permanent", None), ("PERMANENT", None),
])
def test_durations_parse(text, seconds):
    assert server.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["10", "m", "10x", "1h 30m", "0m", "-5m", "99999999d", "10m5", "1.5h", "²m"])
def test_a_duration_that_does_not_parse_says_how_to_write_one(text):
    with pytest.raises(ValueError) as refusal:
        server.parse_duration(text)
    assert "duration" in str(refusal.value).lower()


def test_durations_read_back_briefly():
    assert [server.describe_duration(s) for s in (45, 600, 5400, 90061, 0.2)] == ["45s", "10m", "1h 30m",
                                                                                 "1d 1h", "1s"]


@pytest.mark.parametrize("text, found", [
    ("203.0.113.7", ("address", "203.0.113.7")),
    ("203.0.113.0/24", ("network", "203.0.113.0/24")),
    ("203.0.113.9/24", ("network", "203.0.113.0/24")),
    ("2001:db8::/48", ("network", "2001:db8::/48")),
    ("2001:DB8::1", ("address", "2001:db8::1")),
    ("::ffff:203.0.113.7", ("address", "203.0.113.7")),
    ("10.0.0.1/32", ("address", "10.0.0.1")),
    ("alice", None), ("bob-2", None),
])
def test_ban_targets_are_read_as_addresses_networks_or_nicknames(text, found):
    assert server.ban_target(text) == found


@pytest.mark.parametrize("text", ["300.1.2.3", "1.2.3.4/33", "2001:db8::/200", "10.0.0.0/4", "::/0"])
def test_a_target_that_looks_like_an_address_but_is_not_one_is_refused(text):
    with pytest.raises(ValueError):
        server.ban_target(text)


def test_ipv6_addresses_are_counted_per_64_and_mapped_ipv4_as_ipv4():
    bucket = server.address_bucket
    assert bucket("2001:db8:1:2::1") == bucket("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert bucket("2001:db8:1:3::1") != bucket("2001:db8:1:2::1")
    assert bucket("::ffff:127.0.0.2") == bucket("127.0.0.2") == "127.0.0.2"
    assert bucket("fe80::1%eth0") == "fe80::/64"


def make_ban(kind: str, target: str, expires: float | None = None) -> object:
    return server.Ban(kind, target, target, "spam", "alice", time.time(), expires)


def test_bans_match_addresses_networks_and_accounts_until_they_expire(tmp_path):
    path = str(tmp_path / "bans.jsonl")
    bans = server.Bans(server.RecordFile(path))
    now = time.time()
    bans.add(make_ban("address", "192.0.2.7"))
    bans.add(make_ban("network", "198.51.100.0/24", now + 60))
    bans.add(make_ban("network", "2001:db8::/48"))
    bans.add(make_ban("account", "troll", now + 1))
    assert bans.for_address("192.0.2.7", now).target == "192.0.2.7"
    assert bans.for_address("::ffff:192.0.2.7", now) is not None
    assert bans.for_address("192.0.2.8", now) is None
    assert bans.for_address("198.51.100.200", now).target == "198.51.100.0/24"
    assert bans.for_address("198.51.100.200", now + 61) is None
    assert bans.for_address("2001:db8:0:ffff::1", now) is not None
    assert bans.for_address("2001:db9::1", now) is None
    assert bans.for_account("TROLL", now) is not None and bans.for_account("troll", now + 2) is None
    assert len(bans.all(now + 2)) == 3, "the expired ban was still listed"
    reopened = server.Bans(server.RecordFile(path))
    assert sorted(ban.key for ban in reopened.all(now)) == ["address:192.0.2.7", "network:198.51.100.0/24",
                                                           "network:2001:db8::/48"]
    assert reopened.remove("address:192.0.2.7") is not None
    assert reopened.for_address("192.0.2.7", now) is None


def test_a_ban_refusal_says_why_and_until_when():
    now = time.time()
    line = make_ban("address", "192.0.2.7", now + 7200).refusal(now)
    assert line.startswith("You are banned from this server until ") and "(2h left)" in line and "spam" in line
    assert "permanently" in make_ban("address", "192.0.2.7").refusal(now)


# -- rooms and offline messages -------------------------------------------------------------------------

def test_room_settings_are_saved_and_forgotten_when_nothing_is_set(tmp_path):
    path = str(tmp_path / "rooms.jsonl")
    rooms = server.RoomSettingsStore(server.RecordFile(path))
    rooms.save("Dev", "release friday", ["invite-only"])
    assert server.RoomSettingsStore(server.RecordFile(path)).load("dev") == ("release friday", ("invite-only",))
    rooms.save("Dev", None, [])
    assert server.RoomSettingsStore(server.RecordFile(path)).load("dev") is None


def test_offline_messages_are_bounded_per_recipient_and_per_sender_and_delivered_once(tmp_path):
    path = str(tmp_path / "offline.jsonl")
    offline = server.OfflineMessages(server.RecordFile(path))
    for n in range(server.MAX_OFFLINE_PER_SENDER):
        offline.leave("bob", "alice", f"message {n}")
    with pytest.raises(server.StoreFull) as refusal:
        offline.leave("bob", "carol", "one too many")
    assert "You have" in str(refusal.value)
    for n in range(server.MAX_OFFLINE_PER_RECIPIENT - server.MAX_OFFLINE_PER_SENDER):
        offline.leave(f"guest{n}", "alice", "hi")
    with pytest.raises(server.StoreFull) as refusal:
        offline.leave("dave", "alice", "full")
    assert "alice has" in str(refusal.value)
    taken = server.OfflineMessages(server.RecordFile(path)).take("ALICE")
    assert [m.text for m in taken[:3]] == ["message 0", "message 1", "message 2"] and len(taken) == 20
    assert server.OfflineMessages(server.RecordFile(path)).take("alice") == []


def test_operators_named_at_start_are_kept_like_those_added_and_can_be_removed(tmp_path):
    path = str(tmp_path / "operators.jsonl")
    operators = server.Operators(server.RecordFile(path), ["Alice"])
    operators.add("bob", by="Alice")
    assert "alice" in operators and "BOB" in operators and "carol" not in operators
    again = server.Operators(server.RecordFile(path), [])
    assert again.names() == ["Alice", "bob"]
    assert again.remove("alice") and again.names() == ["bob"]


def test_an_account_keeps_its_ignore_list_through_a_password_change(tmp_path):
    path = str(tmp_path / "accounts.jsonl")
    accounts = server.Accounts(server.RecordFile(path))
    accounts.register("alice", "correct horse")
    accounts.set_ignoring("alice", ["mallory", "troll"])
    accounts.set_password("alice", "another horse")
    assert server.Accounts(server.RecordFile(path)).ignoring("ALICE") == ["mallory", "troll"]
    assert accounts.ignoring("bob") == []


def test_a_forgotten_room_stays_forgotten_across_a_reopen_and_without_a_file_nothing_is_kept(tmp_path):
    path = tmp_path / "history.jsonl"
    history = server.HistoryLog(server.RecordFile(str(path)), limit=5, keep="lobby")
    history.append("secret", 1_700_000_000.0, "alice: the plan")
    history.append("lobby", 1_700_000_001.0, "alice: hi")
    history.forget("secret")
    history.append("secret", 1_700_000_002.0, "bob: new start")
    history.close()
    reread = server.HistoryLog(server.RecordFile(str(path)), limit=5, keep="lobby")
    assert dict(reread.rooms_and_lines()) == {"lobby": [(1_700_000_001.0, "alice: hi")],
                                              "secret": [(1_700_000_002.0, "bob: new start")]}
    assert "the plan" not in path.read_text()
    memory_only = server.HistoryLog(None, limit=5, keep="lobby")
    memory_only.append("lobby", 1_700_000_000.0, "alice: hi")
    assert memory_only.rooms_and_lines() == []
