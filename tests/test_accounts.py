"""Accounts and moderation that last, with real servers: registering, signing in, operators, bans,
a private server, /whois, the MOTD, /uptime and offline messages."""
from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from conftest import ClientFrom, TIMEOUT, LineClient, database_rows, reset, shown

NICKNAME_PROMPT = "*** Choose a nickname:"
PASSWORD = "correct horse"
HISTORY = re.compile(r"\[offline (\S+) from (\S+)\] (.*)")




def password_prompt(nick: str) -> str:
    return re.escape(f"*** Password for {nick}:")


def register(client: LineClient, password: str = PASSWORD) -> str:
    client.send(f"/register {password}")
    return client.expect(r"-- Registered |!! ", timeout=10)


def operator_code(server, nick: str) -> str:
    """The one-time code the server logged at start for NICK, named by --operator and with no account yet."""
    return server.wait_for_log(rf"--operator {nick} has no account yet: .* invitation code (\S+) ").group(1)


def claim_operator(server, client: LineClient, nick: str = "alice", password: str = PASSWORD) -> LineClient:
    """Sign CLIENT (connected, not signed in) in as NICK, which --operator named: with the code from the
    server's log, then a new password. The account is an operator's."""
    client.expect(re.escape(NICKNAME_PROMPT))
    client.send(nick)
    client.expect(re.escape(f"*** Invitation code for {nick}:"))
    client.send(operator_code(server, nick))
    client.expect(re.escape(f"*** Choose a password for {nick}:"))
    client.send(password)
    lines = client.lines_until(r"\*\*\* You are in #", timeout=10)
    assert "*** You are an operator of this server." in lines, shown(lines)
    client.nick = nick
    return client


def sign_in(client: LineClient, nick: str, password: str = PASSWORD, registered: str | None = None) -> list[str]:
    """Sign in as the registered NICK with PASSWORD; returns the lines from the welcome to entering the lobby."""
    client.expect(re.escape(NICKNAME_PROMPT))
    client.send(nick)
    client.expect(password_prompt(registered or nick))
    client.send(password)
    welcome = client.expect(r"\*\*\* Welcome, |!! ", timeout=10)
    assert welcome.startswith("*** Welcome, "), f"{nick} was not let in: {welcome}"
    client.nick = registered or nick
    return [welcome] + client.lines_until(r"\*\*\* You are in #")


@pytest.fixture
def data(tmp_path):
    return tmp_path / "data"


# -- registering and signing in ----------------------------------------------------------------

def test_a_registered_name_asks_for_its_password_and_the_right_one_lets_its_owner_in(start_server, connect, data):
    server = start_server("--data-dir", str(data))
    alice = connect(server, "alice")
    assert register(alice) == ("-- Registered alice. From now on, signing in as alice (or a name that looks "
                               "like it) asks for this password.")
    alice.send("/quit")
    alice.wait_closed()
    again = connect(server)
    assert sign_in(again, "alice")[0].startswith("*** Welcome, alice!")
    assert PASSWORD not in server.log(), "the password reached the log"


def test_a_lookalike_of_a_registered_name_asks_for_the_same_password(start_server, connect, data):
    server = start_server("--data-dir", str(data))
    register(connect(server, "alice"))
    for spelling in ("ALICE", "аlice", "ａｌｉｃｅ", "alicé"):
        impostor = connect(server)
        impostor.expect(re.escape(NICKNAME_PROMPT))
        impostor.send(spelling)
        assert impostor.expect(r"\*\*\* |!! ") == "*** Password for alice:", f"{spelling!r} was not asked"
        impostor.close()


def test_wrong_passwords_are_refused_a_second_slower_each_and_the_third_closes_the_connection(start_server,
                                                                                              connect, data):
    """The one test of the default --guess-delay (1 s): other tests of wrong secrets use a shorter one."""
    server = start_server("--data-dir", str(data))
    alice = connect(server, "alice")
    register(alice)
    guesser = ClientFrom(server.host, server.port, "127.0.0.2")
    guesser.expect(re.escape(NICKNAME_PROMPT))
    guesser.send("alice")
    for n in range(1, 4):
        guesser.expect(password_prompt("alice"))
        guesser.send(f"guess number {n}")
        sent = time.monotonic()
        refusal = guesser.expect("!! ", timeout=10)
        waited = time.monotonic() - sent
        assert waited >= n - 0.01, f"wrong password {n} was answered after {waited:.2f} s, not {n} s"
        if n < 3:
            assert refusal == "!! Wrong password for alice."
    assert refusal == "!! Disconnected: 3 wrong passwords for alice."
    guesser.wait_closed()
    server.wait_for_log(r"wrong password for alice from \(signing in\)@127\.0\.0\.2")
    assert "guess number" not in server.log()
    alice.send("still here")
    alice.expect("alice: still here")


def test_an_empty_answer_at_the_password_prompt_goes_back_to_choosing_a_nickname(start_server, connect, data):
    server = start_server("--data-dir", str(data))
    register(connect(server, "alice"))
    guest = connect(server)
    guest.expect(re.escape(NICKNAME_PROMPT))
    guest.send("alice")
    guest.expect(password_prompt("alice"))
    guest.send("")
    guest.expect(re.escape(NICKNAME_PROMPT))
    guest.send("bob")
    guest.expect(re.escape("*** Welcome, bob!"))


def test_a_registered_name_cannot_be_taken_with_nick(start_server, connect, data):
    server = start_server("--data-dir", str(data))
    alice = connect(server, "alice")
    register(alice)
    alice.send("/nick alicia")
    alice.expect(r"\*\*\* alice is now known as alicia")
    bob = connect(server, "bob")
    bob.send("/nick alice")
    assert bob.expect("!! |\\*\\*\\* bob is now") == ("!! alice is registered: sign in as alice with its "
                                                      "password to use it.")
    alice.send("/nick alice")
    alice.expect(r"\*\*\* alicia is now known as alice")


def test_a_weak_or_overlong_password_is_refused_with_the_reason(start_server, connect):
    server = start_server()
    alice = connect(server, "alice")
    for password, why in (("short", "too short"), ("alice123!", "contains your nickname"),
                          ("aaaabbbb", "4 different characters"), ("x" * 300, "too long")):
        refusal = register(alice, password)
        assert refusal.startswith("!! Password too") and why in refusal, refusal


def test_registering_twice_changing_the_password_and_unregistering(start_server, connect, data):
    server = start_server("--data-dir", str(data), "--guess-delay", "0.05")
    alice = connect(server, "alice")
    register(alice, "horse-battery")
    assert register(alice, "another password").startswith("!! You are signed in to the account alice")
    alice.send("/passwd wrong-one staple-paper")
    assert alice.expect("!! |-- ", timeout=10) == "!! Wrong password for alice."
    alice.send("/passwd horse-battery short")
    assert alice.expect("!! |-- ", timeout=10).startswith("!! Password too short")
    alice.send("/passwd horse-battery staple-paper")
    assert alice.expect("!! |-- ", timeout=10) == "-- Password changed."
    alice.send("/unregister horse-battery")
    assert alice.expect("!! |-- ", timeout=10) == "!! Wrong password for alice."
    alice.send("/quit")
    alice.wait_closed()
    again = connect(server)
    sign_in(again, "alice", "staple-paper")
    again.send("/unregister staple-paper")
    assert again.expect("!! |-- ", timeout=10) == "-- alice is no longer registered; anyone may use the name."
    again.send("/quit")
    again.wait_closed()
    connect(server, "alice")        # a guest's name again: no password asked


def test_a_guest_cannot_change_or_give_up_an_account_it_does_not_have(start_server, connect):
    server = start_server()
    bob = connect(server, "bob")
    bob.send("/passwd old-one new-password")
    assert bob.expect("!! ") == "!! You are a guest: /register PASSWORD makes bob your account."
    bob.send("/unregister whatever")
    assert bob.expect("!! ") == "!! You are a guest: /register PASSWORD makes bob your account."


def test_whoever_registers_a_name_given_up_reads_nothing_of_the_old_account(start_server, connect, data):
    """Private conversations, kept rooms and read positions belong to the account, not to its name: the next
    owner of the name is someone else."""
    from test_rooms import join
    server = start_server("--data-dir", str(data))
    bob = connect(server, "bob")
    register(bob, "a long pass phrase 7")
    join(bob, "secret", "sesame")
    alice = connect(server, "alice")
    register(alice)
    join(alice, "secret", "sesame")
    bob.send("/msg alice the plan is at noon")
    bob.expect(re.escape("[pm to alice] the plan is at noon"))
    alice.expect(re.escape("[pm from bob] the plan is at noon"))
    alice.send(f"/unregister {PASSWORD}")
    alice.expect(r"-- alice is no longer registered")
    alice.send("/quit")
    alice.wait_closed()
    mallory = connect(server, "alice")
    assert register(mallory, "mallory's own pass 9").startswith("-- Registered")
    mallory.send("/quit")
    mallory.wait_closed()
    mallory = connect(server)
    sign_in(mallory, "alice", "mallory's own pass 9")
    mallory.send("/history bob")
    mallory.send("/search plan")
    mallory.send("/msg alice marker")
    lines = mallory.lines_until(re.escape("[pm from alice] marker"))
    assert not [line for line in lines if "plan is at noon" in line or "#secret" in line], \
        f"the new owner of the name read what the old account had: {shown(mallory.seen)}"
    bob.send("/history alice")          # and the conversation went with the account, for bob too
    assert "plan is at noon" not in "\n".join(bob.lines_until(r"-- |!! "))


def test_without_a_data_directory_a_registration_says_it_lasts_until_a_restart(start_server, connect):
    server = start_server()
    alice = connect(server, "alice")
    assert register(alice).endswith("This server keeps no data directory: the account lasts until it stops.")


# -- operators by account -------------------------------------------------------------------------

def test_operators_are_accounts_named_at_start_or_made_by_another_and_kept(start_server, connect, data):
    server = start_server("--data-dir", str(data), "--operator", "alice")
    stranger = connect(server)              # whoever comes first does not get the name, nor its rights
    stranger.expect(re.escape(NICKNAME_PROMPT))
    stranger.send("alice")
    stranger.expect(re.escape("*** Invitation code for alice:"))
    stranger.send("")
    stranger.expect(re.escape(NICKNAME_PROMPT))
    alice = claim_operator(server, connect(server))
    bob = connect(server, "bob")
    register(bob)
    alice.send("/oper add bob")
    assert alice.expect("-- |!! ") == "-- bob is now an operator of the server."
    bob.expect(re.escape("*** alice made you an operator of this server."))
    alice.send("/oper")
    assert alice.expect("-- |!! ") == "-- Operators: alice, bob"
    server.stop(signal.SIGKILL)
    again = start_server("--data-dir", str(data), "--operator", "alice")
    bob = connect(again)
    assert "*** You are an operator of this server." in sign_in(bob, "bob")
    bob.send("/oper")
    assert bob.expect("-- |!! ") == "-- Operators: alice, bob"
    again.stop(signal.SIGKILL)
    # Dropped from --operator, alice is no operator of the server any more: one rule, whatever she did.
    again = start_server("--data-dir", str(data))
    bob = connect(again)
    sign_in(bob, "bob")
    bob.send("/oper")
    assert bob.expect("-- |!! ") == "-- Operators: bob"
    bob.send("/oper remove bob")
    assert bob.expect("-- |!! ").startswith("!! bob is the last operator")
    bob.send("/oper add carol")
    assert bob.expect("-- |!! ") == "!! carol is not a registered account."


# -- bans -------------------------------------------------------------------------------------------------

@pytest.fixture
def moderated(start_server, connect, data):
    """A server with a data directory where alice is an operator by account."""
    server = start_server("--data-dir", str(data), "--operator", "alice")
    return server, claim_operator(server, connect(server))


def test_a_banned_guest_is_disconnected_with_the_reason_and_kept_out_under_any_nickname(moderated, connect):
    server, alice = moderated
    troll = ClientFrom(server.host, server.port, "127.0.0.2")
    troll.login("troll")
    alice.expect(r"\*\*\* troll joined")
    alice.send("/ban troll 1h spamming links")
    seen = {alice.expect(r"-- |!! |\*\*\* troll quit") for _ in range(2)}     # in either order
    assert seen == {"-- Banned troll's address 127.0.0.2 for 1h: spamming links. Disconnected troll.",
                    "*** troll quit (banned by alice: spamming links)"}, seen
    lines = troll.wait_closed()
    assert re.match(r"\*\*\* You were banned by alice until .* UTC \((1h|59m 59s) left\): spamming links\.$",
                    lines[-1]), shown(lines)
    back = ClientFrom(server.host, server.port, "127.0.0.2").wait_closed()
    assert len(back) == 1 and back[0].startswith("!! You are banned from this server until "), back
    other = ClientFrom(server.host, server.port, "127.0.0.3")
    other.login("troll2")


def test_a_ban_by_account_keeps_its_owner_out_from_any_address_and_expires(moderated, connect):
    server, alice = moderated
    mallory = ClientFrom(server.host, server.port, "127.0.0.2")
    mallory.login("mallory")
    register(mallory)
    alice.send("/ban mallory 2s")
    assert alice.expect("-- |!! ") == "-- Banned the account mallory for 2s. Disconnected mallory."
    mallory.wait_closed()
    again = ClientFrom(server.host, server.port, "127.0.0.3")
    again.expect(re.escape(NICKNAME_PROMPT))
    again.send("mallory")
    again.expect(password_prompt("mallory"))        # the password first: the ban is told only to its owner
    again.send(PASSWORD)
    refusal = again.expect(r"\*\*\* You were banned|\*\*\* Welcome")
    assert refusal.startswith("*** You were banned by alice until "), refusal
    deadline = time.monotonic() + 10
    while True:     # the ban runs out by itself
        client = ClientFrom(server.host, server.port, "127.0.0.4")
        client.expect(re.escape(NICKNAME_PROMPT))
        client.send("mallory")
        client.expect(password_prompt("mallory"))
        client.send(PASSWORD)
        if client.expect(r"\*\*\* You were banned|\*\*\* Welcome").startswith("*** Welcome"):
            break
        assert time.monotonic() < deadline, "the 2 s ban never ran out"
        client.close()
        client.sock = None
        time.sleep(0.2)     # polling a clock: the ban ends at a time, not on an event
    alice.send("/bans")
    assert alice.expect("-- ") == "-- No bans."


def test_a_network_ban_keeps_out_every_address_in_it_and_unban_lets_them_back(moderated, connect):
    server, alice = moderated
    alice.send("/ban 127.0.1.0/24 7d botnet")
    assert alice.expect("-- |!! ") == "-- Banned the network 127.0.1.0/24 for 7d: botnet."
    for source in ("127.0.1.1", "127.0.1.200"):
        lines = ClientFrom(server.host, server.port, source).wait_closed()
        assert lines and re.search(r"\((7d|6d 23h) left\): botnet\.$", lines[0]), lines
    alice.send("/bans")
    assert re.match(r"-- network 127\.0\.1\.0/24 by alice, until .* \((6d 23h|7d) left\): botnet$",
                    alice.expect("-- ")), alice.seen[-1]
    alice.send("/unban 127.0.1.0/24")
    assert alice.expect("-- |!! ") == "-- Lifted the ban on the network 127.0.1.0/24."
    ClientFrom(server.host, server.port, "127.0.1.1").login("welcome-back")


def test_a_ban_that_cannot_be_is_refused_with_the_reason(moderated, connect):
    server, alice = moderated
    connect(server, "bob")
    for command, refusal in (
            ("/ban alice", "!! You cannot ban yourself."),
            ("/ban 127.0.0.1", "!! That would ban you too: you connect from 127.0.0.1."),
            ("/ban 127.0.0.0/8", "!! That would ban you too: you connect from 127.0.0.1."),
            ("/ban bob 10x", "!! '10x' is not a duration"),
            ("/ban 300.1.2.3", "!! '300.1.2.3' is not an address or a network"),
            ("/ban nobody", "!! No one called nobody is online, and no account has that name"),
            ("/unban 192.0.2.1", "!! There is no ban on 192.0.2.1.")):
        alice.send(command)
        answer = alice.expect("!! |-- ")
        assert answer.startswith(refusal), f"{command}: {answer}"


def test_the_last_operator_cannot_be_banned(moderated, connect):
    server, alice = moderated
    bob = ClientFrom(server.host, server.port, "127.0.0.2")
    bob.login("bob")
    register(bob)
    alice.send("/oper add bob")
    alice.expect("-- bob is now")
    bob.send("/ban alice")
    assert bob.expect("!! |-- ") == "!! alice is an operator; /oper remove alice first."


# -- a private server -------------------------------------------------------------------------------------

def test_a_private_server_lets_in_only_accounts_and_people_invited_with_a_one_time_code(start_server, connect,
                                                                                         data):
    server = start_server("--data-dir", str(data), "--private", "--operator", "alice", "--guess-delay", "0.05")
    stranger = connect(server)
    stranger.expect(re.escape(NICKNAME_PROMPT))
    stranger.send("stranger")
    assert stranger.expect("!! ") == ("!! This server is private: only people with an account may sign in. "
                                      "An operator can invite you with /invite-account.")
    alice = connect(server)
    alice.expect(re.escape(NICKNAME_PROMPT))
    alice.send("alice")             # named by --operator: proves it with the code in the log, chooses a password
    alice.expect(re.escape("*** Invitation code for alice:"))
    alice.send(operator_code(server, "alice"))
    alice.expect(re.escape("*** Choose a password for alice:"))
    alice.send(PASSWORD)
    alice.expect(r"\*\*\* Welcome, alice")
    alice.send("/invite-account dave")
    code = re.match(r"-- Invitation for dave: (\S+) \(it works once, for 7 days\)", alice.expect("-- ")).group(1)
    dave = connect(server)
    dave.expect(re.escape(NICKNAME_PROMPT))
    dave.send("dave")
    dave.expect(re.escape("*** Invitation code for dave:"))
    dave.send("not-the-code")
    assert dave.expect("!! ", timeout=10) == "!! Wrong invitation code for dave."
    dave.expect(re.escape("*** Invitation code for dave:"))
    dave.send(code)
    dave.expect(re.escape("*** Choose a password for dave:"))
    dave.send("short")
    assert dave.expect("!! ").startswith("!! Password too short")
    dave.expect(re.escape("*** Choose a password for dave:"))
    dave.send("paper staple 9")
    dave.expect(r"\*\*\* Welcome, dave")
    assert code not in server.log() and "paper staple 9" not in server.log()
    dave.send("/quit")
    dave.wait_closed()
    reuse = connect(server)
    reuse.expect(re.escape(NICKNAME_PROMPT))
    reuse.send("dave")
    reuse.expect(password_prompt("dave"))            # an account now: the code is spent
    reuse.send(code)
    assert reuse.expect("!! ", timeout=10) == "!! Wrong password for dave."
    alice.send("/remove-account dave")
    assert alice.expect("-- |!! ") == "-- Removed the account dave."
    gone = connect(server)
    gone.expect(re.escape(NICKNAME_PROMPT))
    gone.send("dave")
    assert gone.expect("!! ").startswith("!! This server is private")


# -- knowing who is who ------------------------------------------------------------------------------------

def test_whois_shows_account_times_rooms_and_away_and_the_address_only_to_operators(moderated, connect):
    server, alice = moderated
    bob = ClientFrom(server.host, server.port, "127.0.0.2")
    bob.login("bob")
    bob.send("/join dev")
    bob.send("/away lunch")
    bob.expect(r"-- You are marked away")     # the join's "*** You are in #dev" comes first
    carol = connect(server, "carol")
    for viewer in (carol, alice):
        viewer.send("/whois bob")
        lines = viewer.lines_until(r"-- bob: (away|connects)" if viewer is carol else "-- bob: connects")
        replies = [line for line in lines if line.startswith("-- bob: ")]
        assert replies[0] == "-- bob: guest"
        assert re.match(r"-- bob: signed in \d{4}-\d\d-\d\d \d\d:\d\d UTC, idle \d+s$", replies[1]), replies
        assert replies[2] == "-- bob: connected with pyChat"
        assert replies[3] == "-- bob: in #lobby, #dev"
        assert replies[4] == "-- bob: away: lunch"
        if viewer is alice:
            assert replies[5] == "-- bob: connects from 127.0.0.2"
        else:
            carol.send("/whois alice")
            assert carol.expect("-- alice: ") == "-- alice: account alice, operator of the server"
    carol.send("marker")
    later = carol.lines_until("carol: marker")
    assert not any("127.0.0.2" in line for line in later + carol.seen), "a guest saw an address"


def test_the_motd_is_shown_after_sign_in_and_read_again_when_the_file_changes(start_server, connect, tmp_path):
    motd = tmp_path / "motd.txt"
    motd.write_text("Welcome to the test server.\nBe kind.\n")
    server = start_server("--motd", str(motd))
    alice = connect(server)
    alice.expect(re.escape(NICKNAME_PROMPT))
    alice.send("alice")
    lines = alice.lines_until(r"\*\*\* You are in")
    assert "*** Welcome to the test server." in lines and "*** Be kind." in lines
    motd.write_text("Maintenance at noon.\n")
    os.utime(motd, (time.time() + 5, time.time() + 5))
    alice.send("/motd")
    assert alice.expect("-- ") == "-- Maintenance at noon."
    motd.unlink()
    alice.send("/motd")
    assert alice.expect("-- ") == "-- This server has no message of the day."


def test_uptime_tells_the_version_age_and_most_people_at_once(chat):
    alice, bob = chat("alice", "bob")
    bob.send("/quit")
    alice.expect(r"\*\*\* bob quit")
    alice.send("/uptime")
    assert re.match(r"-- pyChat \S+, up since \d{4}-\d\d-\d\d \d\d:\d\d UTC \(\d+s\); 1 online in 1 room\(s\) "
                    r"now; at most 2 at once; /search searches the full-text index\.$", alice.expect("-- ")), \
        alice.seen[-1]


# -- offline messages ------------------------------------------------------------------------------------

def test_messages_to_an_offline_account_wait_for_its_next_sign_in_even_across_a_kill_9(start_server, connect,
                                                                                       data):
    server = start_server("--data-dir", str(data))
    alice = connect(server, "alice")
    register(alice)
    alice.send("/quit")
    alice.wait_closed()
    bob = connect(server, "bob")
    bob.send("/msg alice are you there?")
    assert bob.expect(r"-- |!! ") == ("-- alice is offline; the message is kept for them and shown when they "
                                      "next sign in.")
    bob.send("/msg ALICE second one")
    bob.expect("-- alice is offline")
    bob.send("/msg nobody hello")
    assert bob.expect("!! ").startswith("!! No one called nobody is online")
    server.stop(signal.SIGKILL)
    again = start_server("--data-dir", str(data))
    alice = connect(again)
    lines = sign_in(alice, "alice") + alice.lines_until(re.escape("*** End of messages left for you."), timeout=10)
    assert "*** 2 messages were left for you while you were away:" in lines
    kept = [HISTORY.match(line).groups()[1:] for line in lines if HISTORY.match(line)]
    assert kept == [("bob", "are you there?"), ("bob", "second one")]
    alice.send("/quit")
    alice.wait_closed()
    again_alice = connect(again)
    sign_in(again_alice, "alice")
    again_alice.send("here")
    assert not any(HISTORY.match(line) for line in again_alice.lines_until("alice: here")), \
        "offline messages were shown twice"


def test_offline_messages_from_someone_the_recipient_ignores_are_not_shown(start_server, connect, data):
    server = start_server("--data-dir", str(data))
    alice = connect(server, "alice")
    register(alice)
    mallory = connect(server, "mallory")
    alice.send("/ignore mallory")
    alice.expect("-- You now ignore mallory")
    alice.send("/quit")
    alice.wait_closed()
    mallory.send("/msg alice buy my pills")
    assert mallory.expect("-- ").startswith("-- alice is offline")
    bob = connect(server, "bob")
    bob.send("/msg alice lunch?")
    bob.expect("-- alice is offline")
    alice = connect(server)
    lines = sign_in(alice, "alice") + alice.lines_until(re.escape("*** End of messages left for you."), timeout=10)
    assert [HISTORY.match(line).group(2) for line in lines if HISTORY.match(line)] == ["bob"]


def test_offline_messages_are_bounded_per_sender(start_server, connect, data):
    server = start_server("--data-dir", str(data), "--rate", "0")
    alice = connect(server, "alice")
    register(alice)
    alice.send("/quit")
    alice.wait_closed()
    bob = connect(server, "bob")
    for n in range(10):
        bob.send(f"/msg alice note {n}")
        bob.expect("-- alice is offline")
    bob.send("/msg alice one too many")
    assert bob.expect("!! ").startswith("!! You have 10 messages waiting for people already")


# -- kill -9 during registrations and bans ---------------------------------------------------------------------

def test_a_kill_9_at_a_random_moment_keeps_every_confirmed_registration_and_ban(start_server, connect, data):
    seed = random.randrange(10 ** 6)
    moments = random.Random(seed)
    server = start_server("--data-dir", str(data), "--operator", "alice", "--rate", "0")
    alice = claim_operator(server, connect(server))
    confirmed_accounts, confirmed_bans = ["alice"], []
    kill_at = moments.randrange(2, 12)
    for n in range(30):
        if n == kill_at:
            threading.Timer(moments.uniform(0, 0.05), server.process.kill).start()
        try:
            client = LineClient(server.host, server.port)
            client.login(f"user{n}")
            client.send(f"/register password-{n}")
            alice.send(f"/ban 192.0.2.{n} 1d")
            if client.expect(r"-- |!! ", timeout=10).startswith("-- Registered"):
                confirmed_accounts.append(f"user{n}")
            if alice.expect(r"-- |!! ", timeout=10).startswith("-- Banned"):
                confirmed_bans.append(f"192.0.2.{n}")
        except BaseException:       # the kill: the connection closed under us, as the process ends
            try:
                server.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                raise AssertionError("a connection closed, but the server was not killed") from None
            break
    server.process.wait(TIMEOUT)
    assert len(confirmed_accounts) >= 3, f"seed {seed}: too few registrations confirmed to prove anything"
    again = start_server("--data-dir", str(data), "--operator", "alice")
    for name in confirmed_accounts:
        client = connect(again)
        client.expect(re.escape(NICKNAME_PROMPT))
        client.send(name)
        assert client.expect(r"\*\*\* |!! ").startswith(f"*** Password for {name}:"), \
            f"seed {seed}: the confirmed registration of {name} was lost"
        client.close()
    admin = connect(again)
    sign_in(admin, "alice")
    admin.send("/bans")
    listed = admin.lines_until(r"-- (No bans|address 192\.0\.2\.%d )" % int(confirmed_bans[-1].rsplit(".", 1)[1])
                               if confirmed_bans else r"-- No bans")
    for address in confirmed_bans:
        assert any(line.startswith(f"-- address {address} ") for line in listed), \
            f"seed {seed}: the confirmed ban of {address} was lost; /bans said {shown(listed)}"


# -- what lasts, all together ---------------------------------------------------------------------------

def test_after_a_kill_9_the_server_knows_every_account_operator_ban_topic_and_offline_message(
        start_server, connect, data):
    """The README's story: alice registers and runs the server, bans a troll, sets a topic; bob leaves
    her a message; kill -9; everything is still there."""
    server = start_server("--data-dir", str(data), "--operator", "alice")
    alice = claim_operator(server, connect(server))
    troll = ClientFrom(server.host, server.port, "127.0.0.2")
    troll.login("troll")
    alice.send("/ban troll 1d trolling")
    alice.expect("-- Banned troll's address")
    alice.send("/topic welcome, be nice")
    alice.expect(r"\*\*\* alice set the topic of #lobby: welcome, be nice")
    alice.send("/quit")
    alice.wait_closed()
    bob = connect(server, "bob")
    bob.send("/msg alice see you tomorrow")
    bob.expect("-- alice is offline")
    server.stop(signal.SIGKILL)

    again = start_server("--data-dir", str(data), "--operator", "alice")
    for spelling in ("alice", "аlice"):
        impostor = connect(again)
        impostor.expect(re.escape(NICKNAME_PROMPT))
        impostor.send(spelling)
        impostor.expect(password_prompt("alice"))
        impostor.close()
    refused = ClientFrom(again.host, again.port, "127.0.0.2").wait_closed()
    assert refused and refused[0].startswith("!! You are banned from this server") and "trolling" in refused[0]
    alice = connect(again)
    lines = sign_in(alice, "alice") + alice.lines_until(re.escape("*** End of messages left for you."), timeout=10)
    assert "*** You are an operator of this server." in lines
    assert "*** Topic of #lobby: welcome, be nice" in lines
    assert [HISTORY.match(line).groups()[1:] for line in lines if HISTORY.match(line)] == [
        ("bob", "see you tomorrow")]


def test_a_private_room_s_lines_never_reach_the_database(start_server, connect, data):
    server = start_server("--data-dir", str(data))
    alice = connect(server, "alice")
    alice.send("/join secret")
    alice.send("before it was private")
    alice.expect("alice: before it was private")
    alice.send("/mode invite-only on")
    alice.expect(r"\*\*\* alice made #secret invite-only")
    alice.send("the plan")
    alice.expect("alice: the plan")
    alice.send("/join lobby")
    alice.send("in the lobby")
    alice.expect("alice: in the lobby")
    server.stop(signal.SIGKILL)
    kept = [text for text, in database_rows(data, "SELECT text FROM messages")]
    assert "the plan" not in kept and "in the lobby" in kept and "before it was private" in kept, kept
    again = start_server("--data-dir", str(data))
    bob = connect(again, "bob")
    bob.send("/join secret")
    bob.expect(r"\*\*\* You are in #secret")
    bob.send("anyone?")
    lines = bob.lines_until("bob: anyone?")
    # What was said while the room was public stays public; what was said while it was private, never.
    assert [line for line in lines if line.startswith("[history")] == [
        line for line in lines if "before it was private" in line], shown(lines)


def test_one_address_cannot_register_accounts_without_end(start_server, connect):
    server = start_server("--rate", "0", "--max-per-ip", "0")
    clients = [ClientFrom(server.host, server.port, "127.0.0.2") for _ in range(6)]
    answers = []
    for n, client in enumerate(clients):
        client.login(f"sock{n}")
        answers.append(register(client))
    assert all(answer.startswith("-- Registered") for answer in answers[:5]), answers
    assert answers[5] == ("!! 5 accounts were registered from your address in the last 1 hour; "
                          "try again later."), answers[5]
    other = ClientFrom(server.host, server.port, "127.0.0.3")
    other.login("someone")
    assert register(other).startswith("-- Registered"), "another address was refused too"
    for client in clients + [other]:
        client.close()


def test_bans_hold_for_ipv6_addresses_too(start_server, connect, data):
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    server = start_server("--host", "::", "--data-dir", str(data), "--operator", "alice")
    alice = claim_operator(server, ClientFrom("127.0.0.1", server.port, "127.0.0.1"))
    troll = ClientFrom("::1", server.port, "::1")
    troll.login("troll6")
    alice.send("/ban troll6 10m")
    assert alice.expect("-- Banned|!! ").startswith("-- Banned troll6's address ::1 for 10m."), alice.seen[-1]
    troll.wait_closed()
    again = ClientFrom("::1", server.port, "::1").wait_closed()
    assert len(again) == 1 and again[0].startswith("!! You are banned from this server until "), again
    alice.close()


def test_an_operator_name_without_an_account_is_kept_for_the_code_in_the_log_at_both_doors(start_server, connect,
                                                                                            irc_connect, data):
    server = start_server("--data-dir", str(data), "--operator", "alice", "--irc-port", "0", "--guess-delay", "0")
    code = operator_code(server, "alice")
    irc = irc_connect(server)
    irc.send("NICK alice")
    irc.send("USER alice 0 * :someone")
    refusal = irc.expect(r":\S+ 433 ")
    assert "kept for someone invited" in refusal, refusal
    stranger = connect(server)
    stranger.expect(re.escape(NICKNAME_PROMPT))
    stranger.send("alice")
    stranger.expect(re.escape("*** Invitation code for alice:"))
    stranger.send("not-the-code")
    assert stranger.expect("!! ") == "!! Wrong invitation code for alice."
    stranger.expect(re.escape("*** Invitation code for alice:"))
    stranger.send(code)
    stranger.expect(re.escape("*** Choose a password for alice:"))
    stranger.send("")                       # changed their mind: back to choosing a nickname, the code unspent
    stranger.expect(re.escape(NICKNAME_PROMPT))
    stranger.close()
    claim_operator(server, connect(server))
    assert code not in server.log().split("invitation code", 1)[1].split("\n", 1)[1], "the code was logged again"


def leave_messages(server, connect, recipient: str, texts: list[str], senders: tuple[str, ...] = ("bob",)) -> None:
    """Leave TEXTS for the offline account RECIPIENT, from guests each at an address of their own."""
    for n, sender in enumerate(senders):
        client = ClientFrom(server.host, server.port, f"127.0.0.{2 + n}")
        client.login(sender)
        for text in texts[n::len(senders)]:
            client.send(f"/msg {recipient} {text}")
            assert client.expect(r"-- |!! ").startswith(f"-- {recipient} is offline"), client.seen[-1]
        client.close()


def away_account(start_server, connect, data, nick: str = "alice"):
    """A server with a data directory, where NICK has an account and is offline."""
    server = start_server("--data-dir", str(data), "--max-per-ip", "0")
    client = connect(server, nick)
    register(client)
    client.send("/quit")
    client.wait_closed()
    return server


def test_offline_messages_stay_kept_when_the_connection_fails_before_they_are_written(start_server, connect,
                                                                                      data):
    server = away_account(start_server, connect, data)
    leave_messages(server, connect, "alice", ["are you there?"])
    gone = LineClient(server.host, server.port)
    gone.expect(re.escape(NICKNAME_PROMPT))
    gone.send("alice")
    gone.expect(password_prompt("alice"))
    gone.send(PASSWORD)
    time.sleep(0.01)            # the password is being checked (tens of milliseconds of scrypt) ...
    reset(gone.sock)            # ... when the connection fails: what the server writes next is never read
    server.wait_for_log(r"alice@127\.0\.0\.1 (left|closed)")
    alice = connect(server)
    lines = sign_in(alice, "alice") + alice.lines_until(re.escape("*** End of messages left for you."), timeout=10)
    assert ("bob", "are you there?") in [HISTORY.match(line).groups()[1:] for line in lines if HISTORY.match(line)]


def test_offline_messages_to_a_slow_reader_are_all_shown_once_and_then_no_longer_kept(start_server, connect,
                                                                                      data):
    server = away_account(start_server, connect, data)
    texts = [f"{n} " + "x" * 3900 for n in range(20)]
    leave_messages(server, connect, "alice", texts, ("bob", "carol"))
    talker = connect(server, "talker")
    for text in texts:          # the lobby's history, shown first: with the messages, more than sockets hold
        talker.send(text)
    talker.expect(f"talker: {texts[-1]}")
    talker.close()
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect((server.host, server.port))
    slow.sendall(b"alice\n" + PASSWORD.encode() + b"\n")
    received = b""
    deadline = time.monotonic() + 20
    time.sleep(0.5)             # the slow link: nothing read for a while, then everything
    while b"End of messages left for you." not in received and time.monotonic() < deadline:
        slow.settimeout(deadline - time.monotonic())
        received += slow.recv(1024)
    assert received.count(b"[offline ") == 20, received[-300:]
    slow.sendall(b"/quit\n")
    slow.close()
    server.wait_for_log(r"alice@127\.0\.0\.1 left")
    again = connect(server)
    sign_in(again, "alice")
    again.send("here")
    assert not any(HISTORY.match(line) for line in again.lines_until("alice: here")), \
        "offline messages that were all shown were shown again"
