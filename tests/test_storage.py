"""The storage, called directly: the database, accounts, bans, rooms, offline messages, history, search,
retention, the 2.0 import, backups and checks; and durations and ban targets."""
from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import stat
import threading
import time

import pytest

from conftest import SERVER_SCRIPT, database_rows, import_script

server = import_script(SERVER_SCRIPT, "pychat_server")
PASSWORD = "correct horse"


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def open_storage(tmp_path):
    """Open a Storage on a data directory (tmp_path/data unless told), closed at the end of the test."""
    opened = []

    def open_it(directory=None, **options):
        storage = server.Storage(str(directory or tmp_path / "data"), **options)
        opened.append(storage)
        return storage

    yield open_it
    for storage in opened:
        storage.close()


def reopen(storage, **options):
    storage.close()
    return server.Storage(storage.directory, **options)


def said(storage, target: str, text: str, when: float | None = None, nick: str = "alice") -> int:
    """Keep a line as the server does when someone says it: its id, then the line, committed before anyone
    would be sent it. A line said at WHEN, in the past, has the id of its time."""
    number = storage.next_message_id() if when is None else server.Storage.message_id_at(when)
    storage.add_message(number, time.time() if when is None else when, target, nick, None, "line", text)
    storage.commit_lines()
    return number


# -- the database -------------------------------------------------------------------------------

def test_the_directory_and_its_files_are_private_and_locked_against_a_second_server(open_storage, tmp_path):
    data = tmp_path / "data"
    storage = open_storage(data)
    storage.register("alice", PASSWORD)
    assert mode(data) == 0o700
    assert {"pychat.db", "lock"} <= set(os.listdir(data))
    for name in os.listdir(data):
        assert mode(data / name) & 0o077 == 0, (name, oct(mode(data / name)))
    with pytest.raises(server.StorageError, match="in use by another pyChat server"):
        server.Storage(str(data))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not ours", "newer"])
def test_a_damaged_or_foreign_database_is_a_clear_line_never_a_traceback(open_storage, tmp_path, damage):
    data = tmp_path / "data"
    storage = open_storage(data)
    storage.register("alice", PASSWORD)
    storage.close()
    path = data / "pychat.db"
    if damage == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    elif damage == "truncated":
        raw = path.read_bytes()
        path.write_bytes(raw[:len(raw) // 3] + b"\0" * 100 + raw[len(raw) // 3 + 100:])
    elif damage == "not ours":
        path.unlink()
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE something (x)")
        db.close()
    else:
        db = sqlite3.connect(path)
        db.execute("UPDATE meta SET value='99' WHERE key='schema'")
        db.commit()
        db.close()
    try:
        reopened = server.Storage(str(data))
    except server.StorageError as problem:
        assert str(data) in str(problem) and "Traceback" not in str(problem)
        assert server.Storage.problems(str(data)) != []
    else:       # damage SQLite does not see at once must still not take the server down
        reopened.close()
        assert damage == "truncated"


def test_rows_edited_by_hand_are_left_out_with_a_log_line(open_storage, caplog):
    storage = open_storage()
    storage.register("alice", PASSWORD)
    storage.register("bob", PASSWORD)
    storage.ban(make_ban("address", "192.0.2.7"))
    with storage.lock:
        storage.db.execute("UPDATE accounts SET n=1000 WHERE key='bob'")
        storage.db.execute("INSERT INTO bans VALUES ('address:x', 'address', 'x', 'x', NULL, 'a', 1, NULL)")
        storage.db.execute("INSERT INTO mutes VALUES ('account:Bob', 'account', 'Bob', 'b', NULL, 'a', 1, NULL)")
    with caplog.at_level(logging.WARNING, logger="pychat"):
        storage = reopen(storage)
        assert storage.account_name("bob") is None and not storage.verify_password("bob", PASSWORD)
        assert storage.account_name("alice") == "alice"
        assert [ban.key for ban in storage.bans(time.time())] == ["address:192.0.2.7"]
        assert storage.mutes(time.time()) == []
    assert "the account 'bob' is damaged" in caplog.text and "a ban is damaged" in caplog.text
    assert "a mute is damaged" in caplog.text
    storage.close()
    assert any("accounts" in problem or "bans" in problem for problem in server.Storage.problems(storage.directory))


@pytest.mark.parametrize("table, damage", [
    ("accounts", "UPDATE accounts SET since='yesterday'"),
    ("operators", "INSERT INTO operators VALUES ('x', 'x', 'x', 'soon')"),
    ("offline", "INSERT INTO offline (recipient, name, sender, sender_id, time, text) VALUES ('x', 'x', 'y', 'y', "
                "'now', 'hi')"),
    ("kept_rooms", "INSERT INTO kept_rooms VALUES ('alice', 'dev', 'dev', X'00', 1)"),
    ("read_positions", "INSERT INTO read_positions VALUES ('alice', '#dev', 'last')"),
    ("room_masks", "INSERT INTO room_masks VALUES ('dev', 'ban', 'x!*@*', 'bob', 'then')"),
])
def test_check_names_a_row_the_server_would_leave_out_as_damaged(open_storage, table, damage):
    storage = open_storage()
    storage.register("alice", PASSWORD)
    with storage.lock:
        storage.db.execute(damage)
    storage.close()
    assert f"1 row(s) of {table} hold values of the wrong kinds" in server.Storage.problems(storage.directory)


def test_without_a_directory_the_same_code_keeps_everything_in_memory_and_writes_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = server.Storage(None)
    try:
        storage.register("alice", PASSWORD)
        said(storage, "#lobby", "hello")
        assert storage.verify_password("alice", PASSWORD)
        assert [m.text for m in storage.latest_messages("#lobby", 10)] == ["hello"]
        assert os.listdir(tmp_path) == []
    finally:
        storage.close()


# -- accounts, operators, invitations ------------------------------------------------------------

def test_a_password_check_takes_tens_of_milliseconds_and_only_the_right_one_passes(open_storage, tmp_path):
    storage = open_storage()
    storage.register("alice", PASSWORD)
    started = time.perf_counter()
    assert storage.verify_password("alice", PASSWORD)
    took = time.perf_counter() - started
    assert not storage.verify_password("alice", "correct horsf")
    assert not storage.verify_password("bob", PASSWORD)
    assert 0.01 < took < 2, f"one scrypt check took {took * 1000:.0f} ms"
    storage.close()
    assert PASSWORD.encode() not in (tmp_path / "data" / "pychat.db").read_bytes()


def test_accounts_are_found_by_any_lookalike_each_with_its_own_salt_across_a_reopen(open_storage):
    storage = open_storage()
    storage.register("alice", "same password")
    storage.register("bob", "same password")
    assert storage.account_name("аlice") == "alice" and storage.account_name("ALICE") == "alice"
    with pytest.raises(server.StoreFull):
        storage.register("Alice", "another one")
    with storage.lock:
        salts = storage.db.execute("SELECT count(DISTINCT salt), count(DISTINCT hash) FROM accounts").fetchone()
    assert salts == (2, 2)
    storage.set_password("alice", "new password")
    storage = reopen(storage)
    try:
        assert storage.verify_password("alice", "new password") and not storage.verify_password("alice", "same password")
        assert storage.account_names() == ["alice", "bob"]
        storage.remove_account("alice")
        assert storage.account_name("alice") is None
    finally:
        storage.close()


def test_an_account_keeps_its_ignore_list_through_a_password_change(open_storage):
    storage = open_storage()
    storage.register("alice", PASSWORD)
    storage.set_ignoring("alice", ["troll", "mallory"])
    storage.set_password("alice", "another horse")
    storage = reopen(storage)
    try:
        assert storage.ignoring("ALICE") == ["mallory", "troll"] and storage.ignoring("bob") == []
    finally:
        storage.close()


def test_an_invitation_code_works_for_its_name_until_it_is_used(open_storage):
    storage = open_storage()
    code = storage.invite("dave", by="alice")
    assert storage.invitation_waiting("dave") and not storage.invitation_waiting("erin")
    assert not storage.invitation_matches("erin", code)
    assert not storage.invitation_matches("dave", code + "x")
    assert storage.invitation_matches("dave", f" {code.upper()} ")
    assert storage.remove_invitation("dave")
    assert not storage.invitation_matches("dave", code) and not storage.invitation_waiting("dave")


def test_a_password_reset_code_is_an_invitation_of_its_own_purpose_used_once_with_the_new_password(open_storage):
    storage = open_storage()
    storage.register("bob", PASSWORD)
    code = storage.invite("bob", by="alice", purpose="password")
    invitation = storage.invite("dave", by="alice")
    assert storage.invitation_matches("bob", code, "password") and not storage.invitation_matches("bob", code)
    assert not storage.invitation_waiting("bob"), "a reset is no invitation to make an account"
    assert not storage.invitation_matches("dave", invitation, "password")
    assert [(i.name, i.purpose, i.by) for i in storage.invitations(time.time())] == [
        ("bob", "password", "alice"), ("dave", "account", "alice")]
    storage.reset_password("bob", "new password")
    assert storage.verify_password("bob", "new password") and not storage.verify_password("bob", PASSWORD)
    assert not storage.invitation_matches("bob", code, "password"), "the code worked twice"
    assert storage.remove_invitation("dave") == "account" and storage.remove_invitation("dave") is None
    assert storage.invitations(time.time()) == []


def test_last_seen_is_written_with_the_next_chat_lines_and_lasts(open_storage):
    storage = open_storage()
    storage.register("alice", PASSWORD)
    registered = storage.accounts()[0]
    assert registered.last_seen == pytest.approx(registered.since, abs=1)
    with storage.lock:
        storage.db.execute("UPDATE accounts SET last_seen=NULL")
    storage.saw("ALICE")
    assert storage.deferred and storage.accounts()[0].last_seen is not None, "a read did not write it first"
    storage.saw("alice")
    said(storage, "#lobby", "hello")
    assert not storage.deferred, "the chat lines' commit did not take it along"
    seen = storage.accounts()[0].last_seen
    storage = reopen(storage)
    try:
        assert [tuple(a) for a in storage.accounts()] == [("alice", registered.since, seen)]
    finally:
        storage.close()


def test_kept_rooms_and_read_positions_last_across_two_restarts_and_positions_never_go_back(open_storage):
    storage = open_storage()
    storage.keep_room("alice", "dev", None)
    storage.keep_room("alice", "ops", "sesame")
    storage.keep_room("ALICE", "dev", None)         # used last: current at the next sign-in
    storage.keep_room("bob", "lobby", None)
    storage.mark_read("alice", "#dev", 500)
    storage.mark_read("alice", "#dev", 300)         # an older report, from a slower device
    storage.mark_read("alice", "@alice\nbob", 40, only_if_new=True)
    storage.mark_read("alice", "@alice\nbob", 10, only_if_new=True)
    for _ in range(2):
        storage = reopen(storage)
        assert storage.kept_rooms("alice") == [("ops", "sesame"), ("dev", None)]
        assert storage.read_positions("Alice") == {"#dev": 500, "@alice\nbob": 40}
    storage.drop_room("alice", "OPS")
    storage.mark_read("alice", "@alice\nbob", 60)
    storage = reopen(storage)
    try:
        assert storage.kept_rooms("alice") == [("dev", None)] and storage.kept_rooms("bob") == [("lobby", None)]
        assert storage.read_positions("alice")["@alice\nbob"] == 60
    finally:
        storage.close()


def test_a_database_of_schema_1_is_upgraded_in_place_and_keeps_what_it_held(open_storage, tmp_path):
    storage = open_storage()
    storage.register("alice", PASSWORD)
    number = said(storage, "#lobby", "before the upgrade")
    with storage.lock:
        storage.db.executescript("BEGIN; DROP TABLE kept_rooms; DROP TABLE read_positions; DROP TABLE room_masks; "
                                 "UPDATE meta SET value='1' WHERE key='schema'; COMMIT;")
    storage = reopen(storage)
    try:
        assert storage.verify_password("alice", PASSWORD)
        assert [m.id for m in storage.latest_messages("#lobby", 5)] == [number]
        storage.keep_room("alice", "dev", None)
        assert storage.kept_rooms("alice") == [("dev", None)]
        assert database_rows(tmp_path / "data", "SELECT value FROM meta WHERE key='schema'") == [
            (str(server.SCHEMA_VERSION),)]
    finally:
        storage.close()


def test_operators_named_at_start_are_operators_while_named_and_those_added_until_removed(open_storage):
    storage = open_storage(operators=["Alice"])
    storage.add_operator("bob", by="Alice")
    assert storage.is_operator("alice") and storage.is_operator("BOB") and not storage.is_operator("carol")
    storage = reopen(storage, operators=["Alice"])
    assert storage.operator_names() == ["Alice", "bob"] and storage.unclaimed_operators() == ["Alice"]
    storage = reopen(storage)
    try:
        assert storage.operator_names() == ["bob"], "a name dropped from --operator kept its rights"
        storage.remove_operator("bob")
        assert storage.operator_names() == []
    finally:
        storage.close()


# -- bans -------------------------------------------------------------------------------------------

def make_ban(kind: str, target: str, expires: float | None = None) -> object:
    return server.Ban(kind, target, target, "spam", "alice", time.time(), expires)


def test_bans_match_addresses_networks_and_accounts_until_they_expire(open_storage):
    storage = open_storage()
    now = time.time()
    storage.ban(make_ban("address", "192.0.2.7"))
    storage.ban(make_ban("network", "198.51.100.0/24", now + 60))
    storage.ban(make_ban("network", "2001:db8::/48"))
    storage.ban(make_ban("account", "troll", now + 1))
    assert storage.ban_for_address("192.0.2.7", now).target == "192.0.2.7"
    assert storage.ban_for_address("::ffff:192.0.2.7", now) is not None
    assert storage.ban_for_address("192.0.2.8", now) is None
    assert storage.ban_for_address("198.51.100.200", now).target == "198.51.100.0/24"
    assert storage.ban_for_address("198.51.100.200", now + 61) is None
    assert storage.ban_for_address("2001:db8:0:ffff::1", now) is not None
    assert storage.ban_for_address("2001:db9::1", now) is None
    assert storage.ban_for_account("TROLL", now) is not None and storage.ban_for_account("troll", now + 2) is None
    assert len(storage.bans(now + 2)) == 3, "the expired ban was still listed"
    storage = reopen(storage)
    try:
        assert sorted(ban.key for ban in storage.bans(now)) == ["address:192.0.2.7", "network:198.51.100.0/24",
                                                               "network:2001:db8::/48"]
        assert storage.lift_ban("address:192.0.2.7") is not None
        assert storage.ban_for_address("192.0.2.7", now) is None
    finally:
        storage.close()


def test_mutes_of_accounts_and_addresses_last_until_lifted_or_ended_and_the_longer_holds(open_storage):
    storage = open_storage()
    now = time.time()
    storage.mute(make_ban("account", "troll", now + 60))
    storage.mute(make_ban("address", "192.0.2.7", now + 1))
    storage.ban(make_ban("address", "192.0.2.9"))
    assert storage.mute_for("TROLL", "203.0.113.1", now).target == "troll"
    assert storage.mute_for(None, "::ffff:192.0.2.7", now).target == "192.0.2.7"
    assert storage.mute_for("troll", "192.0.2.7", now).target == "troll", "the longer mute does not hold"
    assert storage.mute_for(None, "192.0.2.7", now + 2) is None and storage.mute_for(None, "192.0.2.9", now) is None
    assert storage.ban_for_address("192.0.2.7", now) is None, "a mute kept someone out"
    assert [mute.key for mute in storage.mutes(now + 2)] == ["account:troll"], "the ended mute was still listed"
    storage = reopen(storage)
    try:
        assert [mute.key for mute in storage.mutes(now)] == ["account:troll"]
        assert storage.lift_mute("account:troll").target == "troll" and storage.lift_mute("account:troll") is None
        assert storage.mute_for("troll", "192.0.2.7", now) is None
    finally:
        storage.close()


# -- rooms and offline messages -------------------------------------------------------------------------

def test_room_settings_are_saved_and_forgotten_when_nothing_is_set(open_storage):
    storage = open_storage()
    storage.save_room_settings("Dev", "release friday", ["topic-by-everyone"])
    storage = reopen(storage)
    assert storage.room_settings("dev") == ("release friday", ("topic-by-everyone",))
    storage.save_room_settings("Dev", None, [])
    storage = reopen(storage)
    try:
        assert storage.room_settings("dev") is None
    finally:
        storage.close()


def test_offline_messages_are_bounded_per_recipient_and_per_sender_whatever_the_sender_s_name(open_storage):
    storage = open_storage()
    for n in range(server.MAX_OFFLINE_PER_SENDER):
        # One sender who renames between messages is still one sender.
        storage.leave_offline(f"bob{n}", "address:192.0.2.7", "alice", f"message {n}")
    with pytest.raises(server.StoreFull) as refusal:
        storage.leave_offline("bobby", "address:192.0.2.7", "carol", "one too many")
    assert "You have" in str(refusal.value)
    for n in range(server.MAX_OFFLINE_PER_RECIPIENT - server.MAX_OFFLINE_PER_SENDER):
        storage.leave_offline(f"guest{n}", f"address:192.0.2.{100 + n}", "alice", "hi")
    with pytest.raises(server.StoreFull) as refusal:
        storage.leave_offline("dave", "account:dave", "alice", "full")
    assert "alice has" in str(refusal.value)
    storage = reopen(storage)
    try:
        waiting = storage.offline_waiting("ALICE")
        assert [m.text for m in waiting[:3]] == ["message 0", "message 1", "message 2"] and len(waiting) == 20
        storage.remove_offline(waiting)
        assert storage.offline_waiting("alice") == []
    finally:
        storage.close()


# -- chat lines: ids, ranges, private conversations -----------------------------------------------------

def test_message_ids_grow_across_restarts_even_after_retention_removed_every_line(open_storage):
    storage = open_storage(history_days=1)
    first = said(storage, "#lobby", "old", when=time.time() - 3 * 86400)
    storage.maintain()
    assert storage.latest_messages("#lobby", 10) == []
    storage = reopen(storage, history_days=1)
    try:
        assert said(storage, "#lobby", "new") > first
    finally:
        storage.close()


def test_message_ids_grow_across_restarts_even_after_a_conversation_with_the_newest_lines_is_forgotten(
        open_storage, monkeypatch):
    clock = [1_800_000_000.0]
    monkeypatch.setattr(server.time, "time", lambda: clock[0])
    storage = open_storage()
    said(storage, "#lobby", "hello")
    clock[0] += 5.0
    conversation = server.private_target("alice", "guest/7", True)
    given = said(storage, conversation, "hi alice")
    storage.forget_target(conversation)         # the guest left
    clock[0] -= 3.0                             # and the server starts again with its clock 3 s behind,
    for _ in range(2):                          # twice
        storage = reopen(storage)
        try:
            again = said(storage, "#lobby", "again")
            assert again > given, "an id was given twice"
            given = again
        finally:
            storage.close()


def test_history_is_read_by_range_before_after_around_and_between_ids(open_storage):
    storage = open_storage()
    numbers = [said(storage, "#dev", f"line {n}") for n in range(30)]
    said(storage, "#ops", "elsewhere")
    text = lambda found: [m.text for m in found]
    assert text(storage.latest_messages("#dev", 3)) == ["line 27", "line 28", "line 29"]
    assert text(storage.messages_before("#dev", numbers[10], 3)) == ["line 7", "line 8", "line 9"]
    assert text(storage.messages_after("#dev", numbers[10], 2)) == ["line 11", "line 12"]
    assert text(storage.messages_around("#dev", numbers[10], 4)) == ["line 8", "line 9", "line 10", "line 11"]
    assert text(storage.messages_between("#dev", numbers[2], numbers[6], 10)) == ["line 3", "line 4", "line 5"]
    assert text(storage.messages_between("#dev", numbers[6], numbers[2], 2)) == ["line 4", "line 5"]
    assert storage.message_id_at(time.time() + 60) > numbers[-1] > numbers[0] > storage.message_id_at(time.time() - 60)
    assert text(storage.messages_before("#dev", storage.message_id_at(time.time() + 60), 1)) == ["line 29"]
    assert [target for target, _ in storage.targets_since(time.time() - 60, 10)] == ["#ops", "#dev"]
    storage = reopen(storage)
    try:
        assert [m.id for m in storage.latest_messages("#dev", 30)] == numbers
    finally:
        storage.close()


def test_a_query_for_lines_before_an_id_in_a_room_of_a_million_uses_the_index(open_storage):
    storage = open_storage(full_text=False)
    base = storage.next_message_id()
    with storage.lock:
        storage.db.execute("BEGIN")
        storage.db.executemany("INSERT INTO messages VALUES (?, ?, ?, 'alice', NULL, 0, 'hi')",
                               ((base + n, 1_700_000_000_000 + n, "#big" if n % 10 else "#small")
                                for n in range(1_000_000)))
        storage.db.execute("COMMIT")
        statements = []
        storage.db.set_trace_callback(statements.append)
    started = time.perf_counter()
    found = storage.messages_before("#big", base + 500_000, 100)
    took = time.perf_counter() - started
    with storage.lock:
        storage.db.set_trace_callback(None)
        plan = " ".join(str(row) for row in storage.db.execute("EXPLAIN QUERY PLAN " + statements[-1]))
    assert len(found) == 100 and found[-1].id == base + 499_999 and found[0].id < found[-1].id
    # One search of the index by room and id, and no sort: the index gives the order.
    assert "SEARCH messages USING INDEX messages_by_target (target=? AND id<?)" in plan, plan
    assert "SCAN" not in plan and "TEMP B-TREE" not in plan, plan
    print(f"100 lines before an id in a room of 900,000: {took * 1000:.2f} ms")


def test_a_guest_s_private_conversations_are_forgotten_at_the_next_start(open_storage):
    storage = open_storage()
    guest = server.private_target("alice", "guest/7", guest=True)
    kept = server.private_target("bob", "alice", guest=False)
    said(storage, guest, "to the guest")
    said(storage, kept, "between accounts")
    assert server.may_read(kept, "alice") and server.may_read(kept, "bob") and not server.may_read(kept, "carol")
    assert server.may_read("#lobby", "guest/9") and not server.may_read(guest, "guest/8")
    storage = reopen(storage)
    try:
        assert storage.latest_messages(guest, 10) == []
        assert [m.text for m in storage.latest_messages(kept, 10)] == ["between accounts"]
    finally:
        storage.close()


# -- search ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("full_text", [True, False], ids=["fts5", "scan"])
def test_search_finds_every_word_in_what_the_asker_may_read_newest_last(open_storage, full_text):
    storage = open_storage(full_text=full_text)
    assert storage.full_text is full_text
    said(storage, "#dev", "the release is on Friday", when=time.time() - 30 * 86400)
    said(storage, "#dev", "friday it is: RELEASE")
    said(storage, "#dev", "a release, some day")
    said(storage, server.private_target("alice", "bob", False), "the secret release friday")
    said(storage, "#ops", 'release "quoted" friday AND OR NEAR(')
    found = storage.search("release friday", identity="carol")
    assert [m.text for m in found] == ["the release is on Friday", "friday it is: RELEASE",
                                       'release "quoted" friday AND OR NEAR(']
    assert "the secret release friday" in [m.text for m in storage.search("release friday", identity="bob")]
    assert [m.target for m in storage.search("friday", identity="carol", target="#ops")] == ["#ops"]
    assert storage.search('NEAR( "', identity="carol") != [] and storage.search("   ", identity="carol") == []
    said(storage, "#dev", "call parse_config before start")       # the index cuts words at '_' too
    assert [m.text for m in storage.search("parse_config", identity="carol")] == ["call parse_config before start"]


# -- retention ----------------------------------------------------------------------------------------------

def test_retention_removes_lines_past_the_days_in_batches_and_keeps_the_rest(open_storage):
    storage = open_storage(history_days=7)
    now = time.time()
    old = now - 10 * 86400
    storage.add_messages(server.StoredMessage(server.Storage.message_id_at(old) + n, old, "#lobby", "alice", None,
                                              "line", f"old {n}") for n in range(2 * server.RETENTION_BATCH + 5))
    for n in range(3):
        said(storage, "#lobby", f"recent {n}", when=now - 86400 + n)
    too_old = (server.Storage.message_id_at(now - 7 * 86400),)
    assert storage._remove_lines("id < ?", too_old, server.RETENTION_BATCH) == server.RETENTION_BATCH, "a batch"
    storage.maintain(now)
    assert [m.text for m in storage.latest_messages("#lobby", 500)] == ["recent 0", "recent 1", "recent 2"]
    assert storage.search("old", identity="alice") == [] and len(storage.search("recent", identity="x")) == 3


def test_retention_by_size_removes_the_oldest_lines_until_the_database_fits(open_storage):
    storage = open_storage(history_max_mb=1)
    with storage.lock:
        base = storage.next_message_id()
        storage.db.executemany("INSERT INTO messages VALUES (?, ?, '#lobby', 'alice', NULL, 0, ?)",
                               ((base + n, int(time.time() * 1000), f"{n:08d} " + "x" * 400) for n in range(8000)))
    storage.maintain()
    with storage.lock:
        assert storage._size() <= 1024 * 1024
    kept = storage.latest_messages("#lobby", 5)
    assert kept and kept[-1].text.startswith("00007999")
    assert storage.messages_after("#lobby", 0, 1)[0].id > base, "the oldest went first"


@pytest.mark.parametrize("full_text", [True, False])
def test_a_lower_history_max_mb_keeps_the_newest_lines_that_fit_with_or_without_the_search_index(
        open_storage, tmp_path, full_text):
    """Lines removed from the search index give their room back only as its segments merge: measured before
    they have, the database would seem as large after each batch, and every line would go."""
    storage = open_storage(tmp_path / "data", history_max_mb=100, full_text=full_text)
    chooser = random.Random(1)
    words = [f"w{n}" for n in range(3000)]
    for _ in range(40):                 # a server that has run a while, its index brought up to date each second
        for _ in range(1000):
            storage.add_message(storage.next_message_id(), time.time(), "#lobby", "alice", None, "line",
                                " ".join(chooser.choice(words) for _ in range(12)))
        storage.commit_lines()
        storage.maintain()
    storage.close()
    storage = open_storage(tmp_path / "data", history_max_mb=2, full_text=full_text)    # about a third of it
    storage.maintain()
    with storage.lock:
        size, kept = storage._size(), storage.db.execute("SELECT count(*) FROM messages").fetchone()[0]
    assert size <= 2 * 1024 * 1024 and kept > 10_000, f"{kept} lines kept in {size} bytes"


def test_history_days_zero_keeps_no_line(open_storage):
    storage = open_storage(history_days=0)
    said(storage, "#lobby", "gone")
    assert storage.latest_messages("#lobby", 10) == []


# -- writing when the disk fails ------------------------------------------------------------------------------

def test_a_line_that_cannot_be_written_is_kept_and_written_once_it_can_be(open_storage, caplog):
    storage = open_storage()
    with storage.lock:
        storage.db.execute("CREATE TRIGGER refuse BEFORE INSERT ON messages BEGIN "
                           "SELECT RAISE(FAIL, 'database or disk is full'); END")
    with caplog.at_level(logging.ERROR, logger="pychat"):
        lost = [said(storage, "#lobby", f"while full {n}") for n in range(3)]
    assert "chat lines cannot be written" in caplog.text
    storage.maintain()
    assert storage.latest_messages("#lobby", 10) == [], "still failing: still waiting"
    with storage.lock:
        storage.db.execute("DROP TRIGGER refuse")
    storage.maintain()
    assert [m.id for m in storage.latest_messages("#lobby", 10)] == lost
    storage = reopen(storage)
    try:
        assert [m.text for m in storage.latest_messages("#lobby", 10)] == [f"while full {n}" for n in range(3)]
    finally:
        storage.close()


def test_a_confirmed_change_that_fails_says_so_and_changes_nothing(open_storage):
    storage = open_storage()
    with storage.lock:
        storage.db.execute("CREATE TRIGGER refuse BEFORE INSERT ON accounts BEGIN "
                           "SELECT RAISE(FAIL, 'database or disk is full'); END")
    with pytest.raises(server.StorageError, match="could not be saved"):
        storage.register("alice", PASSWORD)
    assert storage.account_name("alice") is None


# -- upgrading from 2.0's files -----------------------------------------------------------------------------

def version_2_directory(data) -> dict:
    """A data directory as pyChat 2.0 wrote it, with the damage a crash or a hand can leave."""
    data.mkdir(mode=0o700)
    (data / "lock").touch(mode=0o600)
    key = server.name_key
    salt = os.urandom(16)
    account = {"name": "alice", "salt": salt.hex(), "hash": server.hash_password(PASSWORD, salt).hex(),
               "n": 2 ** 14, "r": 8, "p": 1, "since": 1_700_000_000.0, "ignoring": ["troll"]}
    now = time.time()
    files = {
        "accounts.jsonl": [{"key": key("alice"), "value": account},
                           {"key": "bob", "value": dict(account, name="bob")},
                           {"key": "bob", "deleted": True},
                           {"key": "carol", "value": dict(account, name="carol", n=1000)}],
        "operators.jsonl": [{"key": key("alice"), "value": {"name": "alice", "by": "--operator", "since": 1.0}}],
        "invitations.jsonl": [{"key": "dave", "value": {"name": "dave", "code": "ab" * 32, "by": "alice",
                                                        "expires": now + 3600}}],
        "bans.jsonl": [{"key": "address:192.0.2.7", "value": {"kind": "address", "target": "192.0.2.7",
                                                              "shown": "192.0.2.7", "reason": "spam", "by": "alice",
                                                              "since": 1.0, "expires": None}},
                       {"key": "address:x", "value": {"kind": "address"}}],
        # 2.0 wrote "room" at first and "name" once it had rewritten the file: both are read.
        "rooms.jsonl": [{"key": "lobby", "value": {"room": "lobby", "topic": "be nice", "modes": []}},
                        {"key": "dev", "value": {"name": "dev", "topic": "ship it", "modes": ["topic-by-everyone"]}}],
        "offline.jsonl": [{"key": key("alice") + "/1", "value": {"to": "alice", "from": "bob", "from_key": "bob",
                                                       "time": 1_700_000_000.0, "text": "call me"}}],
        "history.jsonl": [{"time": 1_700_000_000.0, "room": "lobby", "line": "alice: first"},
                          {"time": 1_700_000_001.0, "room": "secret", "line": "alice: the plan"},
                          {"room": "secret", "forget": True},
                          {"time": 1_700_000_002.0, "room": "lobby", "line": "* bob waves"}],
    }
    for name, records in files.items():
        with open(data / name, "w", encoding="utf-8") as file:
            file.writelines(json.dumps(record) + "\n" for record in records)
    with open(data / "history.jsonl", "ab") as file:
        file.write(b'\xff\xfe not utf-8\n{"time": 1, "room": "lobby", "li')     # a crash's half line
    return files


def test_a_2_0_directory_is_imported_whole_once_and_its_files_kept_aside(open_storage, tmp_path, caplog):
    data = tmp_path / "data"
    files = version_2_directory(data)
    with caplog.at_level(logging.INFO, logger="pychat"):
        storage = open_storage(data, operators=["alice"])
    assert "1 from accounts.jsonl" in caplog.text and "2 from history.jsonl" in caplog.text
    assert "history.jsonl line 5: " in caplog.text and "accounts.jsonl line 4: " in caplog.text
    for name in files:
        assert not (data / name).exists() and (data / f"{name}.imported").exists()
    for restart in range(3):
        storage = reopen(storage, operators=["alice"])
        assert storage.account_names() == ["alice"] and storage.verify_password("alice", PASSWORD)
        assert storage.ignoring("alice") == ["troll"] and storage.operator_names() == ["alice"]
        assert storage.invitation_waiting("dave") and storage.ban_for_address("192.0.2.7", time.time())
        assert storage.room_settings("lobby").topic == "be nice"
        assert storage.room_settings("dev") == ("ship it", ("topic-by-everyone",))
        assert [m.text for m in storage.offline_waiting("alice")] == ["call me"]
        lines = storage.latest_messages("#lobby", 10)
        assert [(m.nick, m.kind, m.text) for m in lines] == [("alice", "line", "first"), ("bob", "action", "waves")]
        assert storage.latest_messages("#secret", 10) == []
    storage.close()


def test_an_import_that_fails_leaves_the_directory_as_it_was_and_says_why(tmp_path):
    data = tmp_path / "data"
    version_2_directory(data)
    (data / "rooms.jsonl").unlink()
    (data / "rooms.jsonl").mkdir()      # not a file: the import cannot read it
    before = sorted(os.listdir(data))
    with pytest.raises(server.StorageError, match="cannot import pyChat 2.0's files .* the directory is as it was"):
        server.Storage(str(data))
    assert sorted(os.listdir(data)) == before


# -- backups and checks ---------------------------------------------------------------------------------------

def test_a_backup_made_while_lines_are_written_is_whole_and_opens(open_storage, tmp_path):
    storage = open_storage()
    storage.register("alice", PASSWORD)
    stop = threading.Event()

    def keep_talking() -> None:
        for n in range(100_000):
            if stop.is_set():
                return
            said(storage, "#lobby", f"line {n}")

    talker = threading.Thread(target=keep_talking)
    talker.start()
    try:
        while len(storage.latest_messages("#lobby", 500)) < 500:
            time.sleep(0.01)
        server.Storage.back_up(storage.directory, str(tmp_path / "copy.db"))
    finally:
        stop.set()
        talker.join(10)
    restored = tmp_path / "restored"
    restored.mkdir()
    os.replace(tmp_path / "copy.db", restored / "pychat.db")
    assert server.Storage.problems(str(restored)) == []
    copy = open_storage(restored)
    assert copy.verify_password("alice", PASSWORD)
    texts = [m.text for m in copy.latest_messages("#lobby", 500)]
    assert len(texts) == 500 and texts == [f"line {int(texts[0].split()[1]) + n}" for n in range(500)]
    with pytest.raises(server.StorageError, match="exists already"):
        server.Storage.back_up(storage.directory, str(restored / "pychat.db"))



def test_a_backup_of_a_large_database_finishes_while_lines_are_written_all_the_time(open_storage, tmp_path):
    """An online backup copied in steps starts again whenever the database is written between two: one of a
    busy server's never ended. It is one step, on one snapshot."""
    storage = open_storage(full_text=False)
    storage.add_messages(server.StoredMessage(storage.next_message_id(), time.time(), "#lobby", "al", None, "line",
                                              "x" * 200) for _ in range(100_000))      # some 25 MB
    stop = threading.Event()

    def keep_talking() -> None:
        while not stop.wait(0.002):
            said(storage, "#lobby", "hi")

    talker = threading.Thread(target=keep_talking)
    talker.start()
    copied = threading.Thread(target=server.Storage.back_up, args=(storage.directory, str(tmp_path / "copy.db")),
                              daemon=True)
    try:
        copied.start()
        copied.join(20)
        assert not copied.is_alive(), "the backup was still copying after 20 s"
    finally:
        stop.set()
        talker.join(10)


# -- passwords, durations and ban targets ----------------------------------------------------------------

@pytest.mark.parametrize("password, why", [
    ("short", "too short"), ("x" * 300, "too long"), ("xxalicexx", "contains your nickname"),
    ("ALICE2024", "contains your nickname"), ("aaaaaaaaaa", "different characters"),
])
def test_weak_or_overlong_passwords_are_refused_with_a_reason(password, why):
    problem = server.password_problem(password, "alice")
    assert problem is not None and why in problem, problem
    assert server.password_problem("correct horse", "alice") is None


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


def test_a_ban_refusal_says_why_and_until_when():
    now = time.time()
    line = make_ban("address", "192.0.2.7", now + 7200).refusal(now)
    assert line.startswith("You are banned from this server until ") and "(2h left)" in line and "spam" in line
    assert "permanently" in make_ban("address", "192.0.2.7").refusal(now)


