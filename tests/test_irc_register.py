"""Making an account from an IRC client or the browser (IRCv3 draft/account-registration): REGISTER and,
where an invitation or a password reset waits for the name, VERIFY with its code. The gate's rules are the
pyChat port's: strong passwords, the budget of accounts per address, a private server's invitations."""
from __future__ import annotations

import re

import pytest

from conftest import ClientFrom
from test_accounts import PASSWORD, claim_operator, register, sign_in
from test_irc import sasl


def fail_or_success(client, command: str) -> list[str]:
    """The parameters of the next FAIL of COMMAND or COMMAND's own answer (SUCCESS, VERIFICATION_REQUIRED)."""
    line = client.expect(rf"(FAIL {command} |{command} )", timeout=10)
    words = line.split(" :", 1)
    fields = words[0].split()
    while fields and fields[0].startswith(("@", ":")):
        fields.pop(0)
    return fields + words[1:]


def connect_unsigned(irc_connect, server, nick: str, source: str | None = None):
    """An IRC client that has said CAP LS 302 and NICK, and waits (registration held by the negotiation)."""
    client = irc_connect(server, source=source)
    client.send("CAP LS 302")
    client.send(f"NICK {nick}")
    offered = client.expect(r"CAP \* LS ").rsplit(" :", 1)[1].split()
    assert "draft/account-registration=before-connect" in offered, offered
    return client


def finish_signing_in(client, nick: str) -> list[str]:
    client.send(f"USER {nick} 0 * :{nick}")
    client.send("CAP END")
    client.nick = nick
    return client.lines_until(rf"001 {re.escape(nick)} ")


@pytest.fixture
def data(tmp_path):
    return tmp_path / "data"


def test_an_irc_client_makes_an_account_before_signing_in_and_it_lasts(start_server, irc_connect, connect, data):
    options = ("--irc-port", "0", "--data-dir", str(data), "--guess-delay", "0.05")
    server = start_server(*options)
    carol = connect_unsigned(irc_connect, server, "carol")
    carol.send("REGISTER * * short")
    assert fail_or_success(carol, "REGISTER")[:3] == ["FAIL", "REGISTER", "WEAK_PASSWORD"]
    carol.send("REGISTER somebody * a long pass phrase 7")
    assert fail_or_success(carol, "REGISTER")[:4] == ["FAIL", "REGISTER", "ACCOUNT_NAME_MUST_BE_NICK", "somebody"]
    carol.send("REGISTER carol")
    carol.expect("461 carol REGISTER ")
    carol.send("REGISTER * * :a long pass phrase 7")
    assert fail_or_success(carol, "REGISTER")[:3] == ["REGISTER", "SUCCESS", "carol"]
    assert "You are now logged in as carol" in carol.expect(r"900 carol carol!\S+ carol ")
    finish_signing_in(carol, "carol")
    carol.send("WHOIS carol")
    assert carol.expect("330 carol carol ").split()[4] == "carol", "signed in to the account"
    carol.send("REGISTER * * :another long phrase 8")
    assert fail_or_success(carol, "REGISTER")[:3] == ["FAIL", "REGISTER", "ALREADY_AUTHENTICATED"]
    carol.send("QUIT")
    carol.wait_closed()
    for restart in range(2):
        server.stop()
        server = start_server(*options)
        again = irc_connect(server)
        assert sasl(again, "carol", "carol", "a long pass phrase 7")[-1].split()[1] == "903", restart
        again.expect("001 carol ")
        pychat = connect(server)
        sign_in(pychat, "carol", "a long pass phrase 7")
    taken = connect_unsigned(irc_connect, server, "carol")
    taken.send("REGISTER * * :a long pass phrase 9")
    assert fail_or_success(taken, "REGISTER")[:4] == ["FAIL", "REGISTER", "ACCOUNT_EXISTS", "carol"]


def test_no_one_takes_the_name_of_someone_signed_in_and_a_name_needs_a_nick(start_server, irc_connect, connect):
    server = start_server("--irc-port", "0")
    connect(server, "rooty")
    grabber = irc_connect(server)
    grabber.send("REGISTER * * :a long pass phrase 7")
    assert fail_or_success(grabber, "REGISTER")[:3] == ["FAIL", "REGISTER", "NEED_NICK"]
    grabber.send("NICK rooty")
    grabber.send("REGISTER * * :a long pass phrase 7")
    assert fail_or_success(grabber, "REGISTER")[:4] == ["FAIL", "REGISTER", "ACCOUNT_EXISTS", "rooty"]
    grabber.send("VERIFY rooty 123456")
    assert fail_or_success(grabber, "VERIFY")[:3] == ["FAIL", "VERIFY", "INVALID_CODE"]


def test_a_guest_registers_after_signing_in_and_others_see_the_account(start_server, irc_connect):
    server = start_server("--irc-port", "0")
    watcher = irc_connect(server, "watcher", ("account-notify",))
    guest = irc_connect(server, "guest")
    guest.send("REGISTER guest * a long pass phrase 7")     # the words of the password without the ':'
    assert fail_or_success(guest, "REGISTER")[:3] == ["REGISTER", "SUCCESS", "guest"]
    guest.expect("900 guest ")
    watcher.expect(r"ACCOUNT guest$")
    laptop = irc_connect(server)
    assert sasl(laptop, "guest", "guest", "a long pass phrase 7")[-1].split()[1] == "903"
    guest.send("HELP REGISTER")
    assert "VERIFY" in guest.expect("704 guest REGISTER ")


def test_an_invited_person_makes_their_account_from_irc_on_a_private_server(start_server, irc_connect, connect,
                                                                            data):
    server = start_server("--irc-port", "0", "--data-dir", str(data), "--private", "--operator", "alice",
                          "--guess-delay", "0.05")
    alice = claim_operator(server, connect(server))
    alice.send("/invite-account dave")
    code = re.match(r"-- Invitation for dave: (\S+) ", alice.expect("-- ")).group(1)
    stranger = connect_unsigned(irc_connect, server, "stranger")
    stranger.send("REGISTER * * :a long pass phrase 7")
    assert fail_or_success(stranger, "REGISTER")[:4] == ["FAIL", "REGISTER", "BAD_ACCOUNT_NAME", "stranger"]
    stranger.send("USER stranger 0 * :s")
    stranger.send("CAP END")
    assert "private" in stranger.expect("464 ")
    stranger.wait_closed()
    dave = connect_unsigned(irc_connect, server, "dave")
    dave.send("VERIFY dave " + code)
    assert fail_or_success(dave, "VERIFY")[:3] == ["FAIL", "VERIFY", "INVALID_CODE"], "no REGISTER came first"
    dave.send("REGISTER * * dave1234")
    assert fail_or_success(dave, "REGISTER")[:3] == ["FAIL", "REGISTER", "WEAK_PASSWORD"]
    dave.send("REGISTER * * :paper staple 9")
    answer = fail_or_success(dave, "REGISTER")
    assert answer[:3] == ["REGISTER", "VERIFICATION_REQUIRED", "dave"] and "invitation code" in answer[3]
    dave.send("VERIFY dave not-the-code")
    assert fail_or_success(dave, "VERIFY")[:3] == ["FAIL", "VERIFY", "INVALID_CODE"]
    dave.send(f"VERIFY dave {code}")
    assert fail_or_success(dave, "VERIFY")[:3] == ["VERIFY", "SUCCESS", "dave"]
    finish_signing_in(dave, "dave")
    assert code not in server.log() and "paper staple 9" not in server.log()
    alice.send("/whois dave")
    assert alice.expect("-- dave: ") == "-- dave: account dave"
    spent = connect_unsigned(irc_connect, server, "dave", source="127.0.0.2")
    spent.send("REGISTER * * :paper staple 10")
    assert fail_or_success(spent, "REGISTER")[:3] == ["FAIL", "REGISTER", "ACCOUNT_EXISTS"], "the code is used up"
    pychat = connect(server)
    sign_in(pychat, "dave", "paper staple 9")


def test_a_password_reset_code_gives_a_new_password_from_irc(start_server, irc_connect, connect, data):
    server = start_server("--irc-port", "0", "--data-dir", str(data), "--operator", "alice", "--guess-delay", "0.05")
    alice = claim_operator(server, connect(server))
    bob = ClientFrom(server.host, server.port, "127.0.0.2")
    bob.login("bob")
    assert register(bob).startswith("-- Registered")
    bob.send("/quit")
    alice.send("/reset-password bob")
    code = re.match(r"-- Password reset for bob: (\S+) ", alice.expect("-- ")).group(1)
    forgetful = irc_connect(server)
    lines = sasl(forgetful, "bob", "bob", code)
    assert "REGISTER bob * NEW-PASSWORD" in lines[-1] and " 904 " in lines[-1], lines
    forgetful.close()
    client = connect_unsigned(irc_connect, server, "bob")
    client.send("REGISTER * * :a brand new phrase 3")
    answer = fail_or_success(client, "REGISTER")
    assert answer[:3] == ["REGISTER", "VERIFICATION_REQUIRED", "bob"] and "password reset code" in answer[3]
    client.send(f"VERIFY bob {code}")
    assert fail_or_success(client, "VERIFY")[:3] == ["VERIFY", "SUCCESS", "bob"]
    finish_signing_in(client, "bob")
    server.stop()
    server = start_server("--irc-port", "0", "--data-dir", str(data), "--guess-delay", "0.05")
    old = connect(server)
    old.expect(re.escape("*** Choose a nickname:"))
    old.send("bob")
    old.expect(re.escape("*** Password for bob:"))
    old.send(PASSWORD)
    assert old.expect("!! ", timeout=10) == "!! Wrong password for bob."
    again = irc_connect(server)
    assert sasl(again, "bob", "bob", "a brand new phrase 3")[-1].split()[1] == "903"


def test_the_budget_of_accounts_per_address_is_the_same_at_both_doors(start_server, irc_connect, data):
    server = start_server("--irc-port", "0", "--data-dir", str(data))
    for n in range(5):
        if n % 2:
            client = ClientFrom(server.host, server.port, "127.0.0.2")
            client.login(f"user{n}")
            assert register(client, "a long pass phrase 7").startswith("-- Registered"), n
        else:
            client = connect_unsigned(irc_connect, server, f"user{n}", source="127.0.0.2")
            client.send("REGISTER * * :a long pass phrase 7")
            assert fail_or_success(client, "REGISTER")[:2] == ["REGISTER", "SUCCESS"], n
    sixth = connect_unsigned(irc_connect, server, "user5", source="127.0.0.2")
    sixth.send("REGISTER * * :a long pass phrase 7")
    answer = fail_or_success(sixth, "REGISTER")
    assert answer[:3] == ["FAIL", "REGISTER", "TEMPORARILY_UNAVAILABLE"] and "5 accounts" in answer[-1], answer
    elsewhere = connect_unsigned(irc_connect, server, "user6", source="127.0.0.3")
    elsewhere.send("REGISTER * * :a long pass phrase 7")
    assert fail_or_success(elsewhere, "REGISTER")[:2] == ["REGISTER", "SUCCESS"]


def test_only_someone_who_gave_the_server_password_makes_an_account(start_server, irc_connect, connect, data):
    server = start_server("--irc-port", "0", "--data-dir", str(data), "--password", "sesame", "--guess-delay", "0")
    stranger = connect_unsigned(irc_connect, server, "stranger")
    stranger.send("REGISTER * * :a long pass phrase 7")
    assert "PASS" in stranger.expect("464 stranger ")
    stranger.send("PASS wrong")
    stranger.send("REGISTER * * :a long pass phrase 7")
    stranger.expect("464 ")
    stranger.wait_closed()
    member = connect_unsigned(irc_connect, server, "member")
    member.send("PASS sesame")
    member.send("REGISTER * * :a long pass phrase 7")
    assert fail_or_success(member, "REGISTER")[:3] == ["REGISTER", "SUCCESS", "member"]
    finish_signing_in(member, "member")
    again = connect_unsigned(irc_connect, server, "stranger")
    again.send("PASS sesame")
    again.send("REGISTER * * :a long pass phrase 8")
    assert fail_or_success(again, "REGISTER")[:3] == ["REGISTER", "SUCCESS", "stranger"], \
        "the refused tries made no account"


def test_on_a_server_with_a_password_sasl_waits_for_it_as_the_pychat_port_does(start_server, tmp_path, irc_connect):
    """No one who lacks the server password may try an account's password: 904 until PASS is given."""
    server = start_server("--irc-port", "0", "--password", "letmein-server-7", "--data-dir", str(tmp_path / "d"))
    owner = irc_connect(server)
    owner.send("PASS :letmein-server-7")
    owner.send("NICK alice")
    owner.send(f"REGISTER * * :{PASSWORD}")
    owner.expect(r"REGISTER SUCCESS alice ")
    stranger = irc_connect(server)                      # never sends PASS
    stranger.send("CAP REQ :sasl")
    stranger.expect(r"CAP \S+ ACK ")
    stranger.send("AUTHENTICATE PLAIN")
    answer = stranger.expect(r"(AUTHENTICATE|904|903) ")
    assert " 904 " in answer and "PASS" in answer, answer
