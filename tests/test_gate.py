"""Who may come in, and as whom: the same rules at both doors (pyChat's and IRC's) and at every moment.

Real servers, real sockets on loopback. Guessing budgets count every wrong
secret whatever is guessed right in between; an account's password comes
before anything is said of its ban; a ban holds at the moment of signing in,
for connections opened before it as for those opened after.
"""
from __future__ import annotations

import base64
import os
import re

import pytest

from conftest import ClientFrom, IrcClient, irc_port, shown
from test_accounts import claim_operator, register

NICKNAME_PROMPT = "*** Choose a nickname:"
PASSWORD_PROMPT = "*** Password:"
SERVER_PASSWORD = "correct horse 42"
ACCOUNT_PASSWORD = "correct horse"


def environment(password: str) -> dict[str, str]:
    return {**os.environ, "PYCHAT_PASSWORD": password}


# -- guessing ---------------------------------------------------------------------------------------

def test_a_right_password_does_not_wipe_out_the_wrong_guesses_made_around_it(start_server):
    server = start_server("--guess-delay", "0", "--max-per-ip", "0", "--rate", "0",
                          env=environment(SERVER_PASSWORD))
    for guess in range(9):              # one wrong guess fewer than ADDRESS_GUESSES, each then the right one
        client = ClientFrom(server.host, server.port, "127.0.0.2")
        try:
            client.expect(re.escape(PASSWORD_PROMPT))
            client.send(f"wrong guess {guess}")
            assert client.expect("!! ") == "!! Wrong password.", shown(client.seen)
            client.expect(re.escape(PASSWORD_PROMPT))
            client.send(SERVER_PASSWORD)
            assert client.expect(r"\*\*\* |!! ") == NICKNAME_PROMPT, f"guess {guess}: {shown(client.seen)}"
        finally:
            client.close()
    late = ClientFrom(server.host, server.port, "127.0.0.2")
    late.expect(re.escape(PASSWORD_PROMPT))
    late.send("the tenth wrong guess")
    assert late.expect("!! ") == "!! Wrong password.", shown(late.seen)
    late.expect(re.escape(PASSWORD_PROMPT))
    late.send(SERVER_PASSWORD)
    answer = late.expect(r"\*\*\* |!! ")
    assert answer.startswith("!! Disconnected: Too many wrong passwords from your address; try again in "), \
        f"10 wrong guesses with right ones between them were forgiven: {answer!r}"
    other = ClientFrom(server.host, server.port, "127.0.0.3")
    other.expect(re.escape(PASSWORD_PROMPT))
    other.send(SERVER_PASSWORD)
    assert other.expect(r"\*\*\* |!! ") == NICKNAME_PROMPT, "another address was refused too"


# -- bans: after the password, and at the moment of signing in ---------------------------------------

@pytest.fixture
def moderated(start_server, connect, tmp_path):
    """A server with both doors and a data directory, where alice is an operator by account and mallory
    has an account too (registered from 127.0.0.2)."""
    server = start_server("--data-dir", str(tmp_path / "data"), "--operator", "alice", "--irc-port", "0",
                          "--guess-delay", "0", "--max-per-ip", "0")
    alice = claim_operator(server, connect(server))
    mallory = ClientFrom(server.host, server.port, "127.0.0.2")
    mallory.login("mallory")
    register(mallory, ACCOUNT_PASSWORD)
    mallory.send("/quit")
    mallory.wait_closed()
    server.wait_for_log(r"mallory@127\.0\.0\.2 left")
    return server, alice


def sasl_plain(client: IrcClient, account: str, password: str) -> str:
    """Start registering CLIENT with SASL PLAIN as ACCOUNT; returns the answer to the credentials."""
    client.send("CAP LS 302")
    client.send(f"NICK {account}")
    client.send(f"USER {account} 0 * :{account}")
    client.expect(r"CAP \* LS ")
    client.send("CAP REQ :sasl")
    client.expect(r"CAP \S+ ACK :?sasl")
    client.send("AUTHENTICATE PLAIN")
    client.expect(r"AUTHENTICATE \+")
    client.send("AUTHENTICATE " + base64.b64encode(f"\0{account}\0{password}".encode()).decode())
    return client.expect(r"(90[34]|ERROR) ", timeout=10)


def test_the_pychat_door_asks_a_banned_accounts_password_before_saying_anything_of_the_ban(moderated):
    server, alice = moderated
    alice.send("/ban mallory 1h stealing")
    assert alice.expect("-- |!! ") == "-- Banned the account mallory for 1h: stealing."
    guesser = ClientFrom(server.host, server.port, "127.0.0.3")
    guesser.expect(re.escape(NICKNAME_PROMPT))
    guesser.send("mallory")
    assert guesser.expect(r"\*\*\* |!! ") == "*** Password for mallory:", \
        f"the name alone told of the ban: {shown(guesser.seen)}"
    guesser.send("not the password")
    assert guesser.expect(r"\*\*\* |!! ") == "!! Wrong password for mallory.", shown(guesser.seen)
    assert not any("banned" in line or "stealing" in line for line in guesser.seen), shown(guesser.seen)
    guesser.expect(r"\*\*\* Password for mallory:")
    guesser.send(ACCOUNT_PASSWORD)
    lines = guesser.wait_closed()
    assert re.match(r"\*\*\* You were banned by alice until .* UTC \((1h|59m 59s) left\): stealing\.$",
                    lines[-1]), f"the right password did not lead to the ban and its reason: {shown(lines)}"


def test_the_irc_door_checks_the_password_before_the_ban_too(moderated):
    server, alice = moderated
    alice.send("/ban mallory 1h stealing")
    alice.expect("-- Banned ")
    guesser = IrcClient(server.host, irc_port(server), source="127.0.0.3")
    answer = sasl_plain(guesser, "mallory", "not the password")
    assert re.match(r":\S+ 904 ", answer) and "stealing" not in answer, answer
    owner = IrcClient(server.host, irc_port(server), source="127.0.0.4")
    answer = sasl_plain(owner, "mallory", ACCOUNT_PASSWORD)
    assert "stealing" in answer, f"the right password did not lead to the ban and its reason: {answer}"


@pytest.mark.parametrize("door", ["pychat", "irc"])
@pytest.mark.parametrize("ban", ["address", "network", "account"])
def test_a_connection_opened_before_a_ban_is_refused_when_it_signs_in_after_it(moderated, door, ban):
    server, alice = moderated
    if door == "pychat":
        early = ClientFrom(server.host, server.port, "127.0.0.2")
        early.expect(re.escape(NICKNAME_PROMPT))
        if ban == "account":
            early.send("mallory")
            early.expect(r"\*\*\* Password for mallory:")
    else:
        early = IrcClient(server.host, irc_port(server), source="127.0.0.2")
        early.expect("NOTICE ")             # the greeting: the connection is open and waiting
    target = {"address": "127.0.0.2", "network": "127.0.0.2/31", "account": "mallory"}[ban]
    alice.send(f"/ban {target} stealing")
    assert alice.expect("-- |!! ").startswith("-- Banned "), alice.seen[-1]
    lines = []
    if door == "pychat":
        early.send(ACCOUNT_PASSWORD if ban == "account" else "latecomer")
    elif ban == "account":
        lines.append(sasl_plain(early, "mallory", ACCOUNT_PASSWORD))
    else:
        early.send("NICK latecomer")
        early.send("USER latecomer 0 * :late")
    lines += early.wait_closed()
    assert any("banned" in line.lower() and "stealing" in line for line in lines), \
        f"a connection opened before the {ban} ban signed in after it: {shown(lines)}"
    alice.send("/online")
    assert alice.expect("-- ") == "-- 1 online: alice (#lobby, operator)", "the banned connection is among people"


def test_a_new_ban_puts_out_whoever_it_covers_at_either_door(moderated, connect):
    server, alice = moderated
    guest = ClientFrom(server.host, server.port, "127.0.0.5")
    guest.login("guest")
    chatter = IrcClient(server.host, irc_port(server), source="127.0.0.5")
    chatter.register("chatter")
    alice.send("/ban 127.0.0.5 enough")
    assert alice.expect("-- |!! ").startswith("-- Banned the address 127.0.0.5 permanently: enough. Disconnected ")
    assert any(line.startswith("*** You were banned by alice") for line in guest.wait_closed())
    assert any(line.startswith("ERROR :Closing link: chatter (Banned by alice") for line in chatter.wait_closed())


def pychat_outcome(server, name: str, password: str | None) -> str:
    """What the pyChat door does with NAME and PASSWORD (None: none is given), as one word."""
    client = ClientFrom(server.host, server.port, "127.0.0.3")
    client.expect(re.escape(NICKNAME_PROMPT))
    client.send(name)
    first = client.expect(r"\*\*\* |!! ")
    if first.startswith("*** Welcome"):
        return "in as a guest"
    assert first == f"*** Password for {name}:", shown(client.seen)
    if password is None:
        return "asked for the password"
    client.send(password)
    answer = client.expect(r"\*\*\* (Welcome|You were banned)|!! ")
    if answer.startswith("*** Welcome"):
        return "in to the account"
    if answer.startswith("*** You were banned"):
        return "banned"
    assert answer == f"!! Wrong password for {name}.", answer
    return "wrong password"


def irc_outcome(server, name: str, password: str | None) -> str:
    """What the IRC door does with NAME and PASSWORD (None: no SASL), as one word."""
    client = IrcClient(server.host, irc_port(server), source="127.0.0.3")
    if password is None:
        client.send(f"NICK {name}")
        client.send(f"USER {name} 0 * :{name}")
        answer = client.expect(r"(001|433) ")
        return "in as a guest" if " 001 " in answer else "asked for the password"
    answer = sasl_plain(client, name, password)
    if " 904 " in answer:
        return "wrong password"
    if "banned" in answer.lower():
        return "banned"
    client.send("CAP END")
    lines = client.lines_until(r"(:\S+ )?(001|ERROR) ")
    return "in to the account" if " 001 " in lines[-1] else "banned"


@pytest.mark.parametrize("door", [pychat_outcome, irc_outcome], ids=["pychat", "irc"])
def test_both_doors_answer_every_account_state_the_same_way_in_the_same_order(moderated, door):
    server, alice = moderated
    outcomes = [door(server, "newcomer", None), door(server, "mallory", None),
                door(server, "mallory", "not the password"), door(server, "mallory", ACCOUNT_PASSWORD)]
    server.wait_for_log(r"mallory@127\.0\.0\.3 (signed in|left)")
    alice.send("/ban mallory 1h stealing")
    alice.expect("-- Banned ")
    outcomes += [door(server, "mallory", "not the password"), door(server, "mallory", ACCOUNT_PASSWORD)]
    assert outcomes == ["in as a guest", "asked for the password", "wrong password", "in to the account",
                        "wrong password", "banned"]
