"""An admin's tools, with real servers at both doors: /accounts, /invitations and /cancel-invitation,
/reset-password, and mutes that last across reconnecting and restarts (/mute, /mutes, /unmute)."""
from __future__ import annotations

import re
import signal
import time

import pytest

from conftest import ClientFrom, TIMEOUT, LineClient, shown, watch_for
from test_accounts import NICKNAME_PROMPT, PASSWORD, claim_operator, password_prompt, register, sign_in
from test_irc import numeric_of, params, sasl

UTC_TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d UTC"
NEW_PASSWORD = "battery staple"


@pytest.fixture
def admin_server(start_server, tmp_path):
    """A factory: a server keeping tmp_path/data, with an IRC port, whose operator is alice; started again
    on the same directory at each call (the one before stopped with SIG, SIGKILL unless told)."""
    running = []

    def start(*more: str, sig: int = signal.SIGKILL):
        if running:
            running[-1].stop(sig)
        running.append(start_server("--data-dir", str(tmp_path / "data"), "--irc-port", "0", "--operator", "alice",
                                    "--guess-delay", "0.05", "--max-per-ip", "0", *more))
        return running[-1]

    return start


def replies(client: LineClient, command: str, last: str) -> list[str]:
    """What CLIENT is answered to COMMAND (replies and errors, not what the rooms say meanwhile), up to the
    line matching LAST."""
    client.send(command)
    return [line for line in client.lines_until(last) if line.startswith(("-- ", "!! "))]


def leave(server, client: LineClient) -> None:
    client.send("/quit")
    client.wait_closed()
    server.wait_for_log(rf"{client.nick}@127\.0\.0\.\d left")


def service_lines(client, command: str, last: str) -> list[str]:
    """The service's notices answering the pyChat command COMMAND sent over IRC, up to one matching LAST."""
    client.send(f"PRIVMSG pyChat :{command}")
    start = len(client.seen)
    client.expect(rf":pyChat!\S+ NOTICE {client.nick} :{last}")
    return [params(line)[-1] for line in client.seen[start:] if re.match(r":pyChat!\S+ NOTICE ", line)]


def irc_operator(server, irc_connect):
    """alice, signed in over IRC to her account, an operator's."""
    alice = irc_connect(server)
    assert numeric_of(sasl(alice, "alice", "alice", PASSWORD)[-1]) == "903"
    alice.expect("001 alice ")
    alice.nick = "alice"
    return alice


# -- /accounts ------------------------------------------------------------------------------------------------

def test_accounts_lists_registered_last_seen_operator_and_banned_and_a_pattern_narrows_it(
        admin_server, connect, irc_connect):
    server = admin_server()
    alice = claim_operator(server, connect(server))
    for nick in ("bob", "bert", "carol"):
        client = connect(server, nick)
        assert register(client).startswith("-- Registered")
        if nick != "carol":
            leave(server, client)
    alice.send("/ban bert 1d spam")
    alice.expect("-- Banned the account bert")
    lines = replies(alice, "/accounts", r"-- carol: ")
    assert lines[0] == "-- 4 accounts:", shown(lines)
    assert re.fullmatch(rf"-- alice: registered {UTC_TIME}, online now, operator", lines[1]), lines[1]
    assert re.fullmatch(rf"-- bert: registered {UTC_TIME}, last seen {UTC_TIME}, banned until {UTC_TIME} "
                        r"\(23h 59m left\)", lines[2]), lines[2]
    assert re.fullmatch(rf"-- bob: registered {UTC_TIME}, last seen {UTC_TIME}", lines[3]), lines[3]
    assert re.fullmatch(rf"-- carol: registered {UTC_TIME}, online now", lines[4]), lines[4]
    assert replies(alice, "/accounts B*", r"-- bob: ")[:2] == ["-- 2 accounts fitting B*:", lines[2]]
    assert replies(alice, "/accounts ?ob", r"-- bob: ") == ["-- 1 account fitting ?ob:", lines[3]]
    assert replies(alice, "/accounts BOB", r"-- bob: ")[0] == "-- 1 account fitting BOB:"
    alice.send("/accounts zed*")
    assert alice.expect("-- ") == "-- No account fits zed*."
    carol = connect(server)
    sign_in(carol, "carol")
    carol.send("/accounts")
    assert carol.expect("!! ") == "!! /accounts: not allowed; only operators may use it."
    # Last seen lasts: after a restart, bob's is what it was; alice's is when she left.
    server = admin_server()
    operator = irc_operator(server, irc_connect)
    again = service_lines(operator, "accounts b*", "bob: ")
    assert again[:3] == ["2 accounts fitting b*:", lines[2][3:], lines[3][3:]], again
    alice_now = service_lines(operator, "accounts alice", "alice: ")[-1]
    assert alice_now == lines[1][3:], "alice is online again, over IRC"


def test_an_account_an_operator_removes_is_news_to_its_owner_and_to_whoever_shares_a_room(
        admin_server, connect, irc_connect):
    server = admin_server()
    alice = claim_operator(server, connect(server))
    bob = connect(server, "bob")
    assert register(bob).startswith("-- Registered")
    carol = irc_connect(server, "carol", ("account-notify",))     # in the lobby with bob, as every newcomer
    alice.send("/remove-account bob")
    assert alice.expect("-- |!! ") == "-- Removed the account bob."
    assert bob.expect(r"\*\*\* alice removed") == "*** alice removed your account; you are a guest now."
    assert carol.expect(r"ACCOUNT ") == ":bob!~user@pychat ACCOUNT *", "carol's client still thinks bob has it"


# -- /invitations and /cancel-invitation ---------------------------------------------------------------

def test_invitations_show_names_and_expiry_never_codes_and_a_cancelled_one_no_longer_works(
        admin_server, connect, irc_connect):
    server = admin_server("--private")
    alice = claim_operator(server, connect(server))
    codes = {}
    for nick in ("dave", "erin"):
        alice.send(f"/invite-account {nick}")
        codes[nick] = re.match(r"-- Invitation for \S+: (\S+) ", alice.expect("-- Invitation ")).group(1)
    lines = replies(alice, "/invitations", "-- erin: ")
    assert [re.sub(UTC_TIME, "TIME", line) for line in lines] == [
        "-- dave: an account, by alice, until TIME (6d 23h left)",
        "-- erin: an account, by alice, until TIME (6d 23h left)"], lines
    assert not any(code in line for line in lines for code in codes.values())
    alice.send("/cancel-invitation DAVE")
    assert alice.expect("-- |!! ") == "-- Cancelled the invitation for DAVE."
    alice.send("/cancel-invitation dave")
    assert alice.expect("-- |!! ") == "!! No invitation is waiting for dave. /invitations lists them."
    dave = connect(server)
    dave.expect(re.escape(NICKNAME_PROMPT))
    dave.send("dave")
    assert dave.expect("!! ").startswith("!! This server is private"), "the cancelled code was still asked for"
    operator = irc_operator(server, irc_connect)
    assert service_lines(operator, "invitations", "erin: ")[-1].startswith("erin: an account, by alice, until ")
    assert service_lines(operator, "cancel-invitation erin", "Cancelled") == ["Cancelled the invitation for erin."]
    assert service_lines(operator, "invitations", "No invitations") == ["No invitations are waiting."]
    erin = connect(server)
    erin.expect(re.escape(NICKNAME_PROMPT))
    erin.send("erin")
    assert erin.expect("!! ").startswith("!! This server is private")
    erin.close()


# -- /reset-password ----------------------------------------------------------------------------------------

def reset_code(operator: LineClient, nick: str) -> str:
    operator.send(f"/reset-password {nick}")
    line = operator.expect("-- |!! ")
    assert line.startswith(f"-- Password reset for {nick}: "), line
    return line.split()[5]


def test_a_password_reset_code_given_at_the_password_prompt_leads_to_a_new_password_once(
        admin_server, connect, irc_connect):
    server = admin_server()
    alice = claim_operator(server, connect(server))
    bob = connect(server, "bob")
    register(bob)
    leave(server, bob)
    alice.send("/reset-password nobody")
    assert alice.expect("!! ") == "!! nobody has no account."
    code = reset_code(alice, "bob")
    assert re.fullmatch(r"[0-9a-f]{6}-[0-9a-f]{6}-[0-9a-f]{6}", code), code
    assert code not in server.log(), "the code reached the log"
    lines = replies(alice, "/invitations", "-- bob: ")
    assert re.fullmatch(rf"-- bob: a new password, by alice, until {UTC_TIME} \(6d 23h left\)", lines[-1])
    # Over IRC the code is not a password: it says how to use it (REGISTER and VERIFY, tests/test_irc_register.py).
    irc = irc_connect(server)
    refused = sasl(irc, "bob", "bob", code)
    assert numeric_of(refused[-1]) == "904" and "VERIFY bob CODE" in params(refused[-1])[-1], refused[-1]
    irc.close()
    # The old password works until the code is used.
    old = connect(server)
    sign_in(old, "bob")
    leave(server, old)
    bob = connect(server)
    bob.expect(re.escape(NICKNAME_PROMPT))
    bob.send("bob")
    bob.expect(password_prompt("bob"))
    bob.send(code)
    assert bob.expect(r"\*\*\* ", timeout=10) == "*** That is the password reset code for bob: choose a new password."
    bob.expect(re.escape("*** Choose a password for bob:"))
    bob.send("short")
    assert bob.expect("!! ").startswith("!! Password too short")
    bob.expect(re.escape("*** Choose a password for bob:"))
    bob.send(NEW_PASSWORD)
    assert bob.expect(r"\*\*\* ", timeout=10) == "*** The password of bob is changed."
    bob.expect(r"\*\*\* Welcome, bob!")
    bob.nick = "bob"
    leave(server, bob)
    for wrong in (PASSWORD, code):
        again = connect(server)
        again.expect(re.escape(NICKNAME_PROMPT))
        again.send("bob")
        again.expect(password_prompt("bob"))
        again.send(wrong)
        assert again.expect("!! ", timeout=10) == "!! Wrong password for bob.", f"{wrong!r} still worked"
        again.close()
    sign_in(connect(server), "bob", NEW_PASSWORD)
    assert replies(alice, "/invitations", "-- No invitations") == ["-- No invitations are waiting."]
    irc = irc_connect(server)
    assert numeric_of(sasl(irc, "bob2", "bob", NEW_PASSWORD)[-1]) == "903"


def test_a_cancelled_password_reset_code_is_a_wrong_password(admin_server, connect):
    server = admin_server()
    alice = claim_operator(server, connect(server))
    register(connect(server, "bob"))
    code = reset_code(alice, "bob")
    alice.send("/cancel-invitation bob")
    assert alice.expect("-- |!! ") == "-- Cancelled the password reset for bob."
    stranger = connect(server)
    stranger.expect(re.escape(NICKNAME_PROMPT))
    stranger.send("bob")
    stranger.expect(password_prompt("bob"))
    stranger.send(code)
    assert stranger.expect("!! ", timeout=10) == "!! Wrong password for bob."


# -- mutes that last ----------------------------------------------------------------------------------------

MUTED = "You are muted; the room does not hear you."


def assert_muted_over_irc(client) -> None:
    client.send("PRIVMSG #lobby :can anyone hear me")
    assert params(client.expect(rf":pyChat!\S+ NOTICE {client.nick} :You are muted;"))[-1] == MUTED


def test_a_mute_lasts_across_reconnecting_and_restarts_at_both_doors_until_unmute(
        admin_server, connect, irc_connect):
    server = admin_server()
    alice = claim_operator(server, connect(server))
    bob = connect(server, "bob")
    register(bob)
    mallory = ClientFrom(server.host, server.port, "127.0.0.2")        # a guest: muted by address
    mallory.login("mallory")
    alice.send("/mute bob 1d spamming")
    assert alice.expect("-- |!! ") == "-- Muted the account bob for 1d: spamming."
    assert re.fullmatch(rf"\*\*\* You were muted by alice until {UTC_TIME} \(23h 59m left\): spamming\.",
                        bob.expect(r"\*\*\* You were ")), bob.seen[-1]
    alice.send("/mute mallory")
    assert alice.expect("-- |!! ") == "-- Muted mallory's address 127.0.0.2 until /unmute."
    mallory.expect(re.escape("*** You were muted by alice permanently."))
    leave(server, bob)
    bob = connect(server)
    told = [line for line in sign_in(bob, "bob") if line.startswith("*** You are muted")]
    assert len(told) == 1 and re.fullmatch(rf"\*\*\* You are muted until {UTC_TIME} \(23h 59m left\): "
                                           r"spamming\.", told[0]), told
    bob.send("hello?")
    assert bob.expect("!! ") == f"!! {MUTED}"
    mallory.close()
    mallory = ClientFrom(server.host, server.port, "127.0.0.2")
    mallory.login("mal")            # another name, the same address
    mallory.send("hello?")
    assert mallory.expect("!! ") == f"!! {MUTED}"
    mallory.close()
    for restart in range(2):
        server = admin_server(sig=(signal.SIGKILL, signal.SIGTERM)[restart])
        bob_irc = irc_connect(server)
        assert numeric_of(sasl(bob_irc, "bob", "bob", PASSWORD)[-1]) == "903"
        bob_irc.expect("001 bob ")
        bob_irc.nick = "bob"
        notices = bob_irc.lines_until(r".* 366 ")
        assert any("You are muted until" in line for line in notices), shown(notices)
        assert_muted_over_irc(bob_irc)
        guest_irc = irc_connect(server, "mal2", source="127.0.0.2")
        assert_muted_over_irc(guest_irc)
        guest_irc.close()
        bob_irc.close()
    operator = irc_operator(server, irc_connect)
    listed = service_lines(operator, "mutes", "address ")
    assert re.fullmatch(rf"account bob by alice, until {UTC_TIME} \(\S+ \S+ left\): spamming", listed[0]), listed
    assert listed[1] == "address 127.0.0.2 (mallory) by alice, permanently", listed
    listener = connect(server, "listener")
    bob = connect(server)
    sign_in(bob, "bob")
    assert service_lines(operator, "unmute bob", "Unmuted") == ["Unmuted the account bob."]
    bob.expect(re.escape("*** You were unmuted by alice."))
    bob.send("back on air")
    listener.expect("bob: back on air")
    assert service_lines(operator, "unmute mallory", "Unmuted") == ["Unmuted the address 127.0.0.2 (mallory)."]
    assert service_lines(operator, "unmute mallory", "mallory") == ["mallory is not muted. /mutes lists who is."]
    assert service_lines(operator, "mutes", "No one") == ["No one is muted."]
    mallory = ClientFrom(server.host, server.port, "127.0.0.2")
    mallory.login("mallory")
    mallory.send("free at last")
    listener.expect("mallory: free at last")
    mallory.close()


def test_a_mute_with_a_duration_lapses_by_itself(admin_server, connect):
    server = admin_server()
    alice = claim_operator(server, connect(server))
    bob = ClientFrom(server.host, server.port, "127.0.0.2")
    bob.login("bob")
    alice.send("/mute bob 2s")
    assert alice.expect("-- |!! ") == "-- Muted bob's address 127.0.0.2 for 2s."
    bob.send("too soon")
    assert bob.expect("!! ") == f"!! {MUTED}"
    deadline = time.monotonic() + TIMEOUT
    heard = None
    while heard is None and time.monotonic() < deadline:
        bob.send("now?")
        heard = watch_for(alice, "bob: now\\?", 0.5)
    assert heard, "the mute of 2 s did not lapse"
    alice.send("/mutes")
    assert alice.expect("-- ") == "-- No one is muted."
    bob.close()


def test_a_mute_that_cannot_be_is_refused_with_the_reason(admin_server, connect):
    server = admin_server()
    alice = claim_operator(server, connect(server))
    carol = connect(server, "carol")         # a guest from alice's own address
    for line, refusal in (("/mute alice", "You cannot mute yourself."),
                          ("/mute carol", "That would mute you too: you connect from 127.0.0.1."),
                          ("/mute nobody", "No one called nobody is online, and no account has that name."),
                          ("/mute carol soon", "That would mute you too: you connect from 127.0.0.1."),
                          ("/mute carol 0s", "A duration must be more than 0"),
                          ("/mute carol 1d " + "x" * 201, "The reason is too long"),
                          ("/unmute carol", "carol is not muted. /mutes lists who is."),
                          ("/mute", "Usage: /mute NICK [DURATION] [REASON...]")):
        alice.send(line)
        assert alice.expect("!! ").startswith(f"!! {refusal}"), (line, alice.seen[-1])
    carol.send("/mute alice")
    assert carol.expect("!! ") == "!! /mute: not allowed; only operators may use it."


def muted_guest(server, alice: LineClient) -> ClientFrom:
    """mallory, a guest from 127.0.0.2, whom alice (an operator) mutes: the mute is of her address."""
    mallory = ClientFrom(server.host, server.port, "127.0.0.2")
    mallory.login("mallory")
    alice.send("/mute mallory")
    mallory.expect(re.escape("*** You were muted by alice permanently."))
    return mallory


def test_an_address_mute_holds_for_a_session_an_account_opens_from_that_address_later(admin_server, connect):
    server = admin_server()
    alice = claim_operator(server, connect(server))
    mallory = muted_guest(server, alice)
    mallory.close()
    bob = connect(server, "bob")                        # from 127.0.0.1, which is not muted
    register(bob)
    phone = ClientFrom(server.host, server.port, "127.0.0.2")      # bob's second device, at the muted address
    told = [line for line in sign_in(phone, "bob") if line.startswith("*** You are muted")]
    assert told == ["*** You are muted permanently."], shown(phone.seen)
    phone.send("said from the muted address")
    assert phone.expect("!! ") == f"!! {MUTED}"
    alice.send("marker")
    assert "bob: said from the muted address" not in alice.lines_until("alice: marker")
    phone.close()


def test_the_away_message_of_a_muted_person_is_shown_to_no_one(admin_server, connect, irc_connect):
    server = admin_server()
    alice = claim_operator(server, connect(server))
    mallory = muted_guest(server, alice)
    mallory.send("/away BUY CHEAP PILLS at spam.example")
    mallory.expect(r"-- You are marked away")
    bob = connect(server, "bob")
    bob.send("/msg mallory hello")
    bob.send("/whois mallory")
    bob.send("/online")
    bob.send("/who")
    bob.send("/msg bob marker")
    lines = bob.lines_until(re.escape("[pm from bob] marker"))
    carol = irc_connect(server, "carol")
    for command in ("PRIVMSG mallory :hello", "WHOIS mallory", "WHO #lobby", "USERHOST mallory"):
        carol.send(command)
    carol.send("PRIVMSG carol :marker")
    lines += carol.lines_until(r":carol!\S+ PRIVMSG carol :marker")
    assert not [line for line in lines if "PILLS" in line], f"a muted person's words were shown: {shown(lines)}"
    assert not [line for line in lines if re.search(r" 352 carol #lobby \S+ \S+ \S+ mallory G", line)], shown(lines)
    mallory.close()
