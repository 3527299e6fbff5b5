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
