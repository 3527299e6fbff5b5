"""The client finding out what it connected to: a TLS port without --tls, an IRC port, a service that
never greets (issue 22 point 20); and finding its server again after the server's certificate was made
anew (point 22)."""
from __future__ import annotations

import pathlib
import re
import shutil
import socket
import subprocess
import time
from types import SimpleNamespace

import pytest

from conftest import irc_port
from test_client_pipe import certificates, run_piped, tls_server  # noqa: F401 (fixtures)
from test_client_terminal import run_client  # noqa: F401 (fixture)

GREETING_TIMEOUT = 4.0          # the client's: a silent server is asked whether it speaks TLS after this
PIPED_GREETING_TIMEOUT = 10.0   # the client's: piped, a server that has not greeted is given up after this
NICKNAME_TIMEOUT = 30.0         # the server's: what the client waited for before


def screen_text(client) -> str:
    """What the client's screen shows, its rows joined (a wrapped line reads whole), spaces collapsed."""
    return " ".join(" ".join(client.screen.line(row) for row in range(client.screen.rows)).split())


# -- a TLS port without --tls --------------------------------------------------------

def test_piped_plain_client_at_a_tls_port_is_told_to_add_tls_and_exits_nonzero(tls_server):
    started = time.monotonic()
    result = run_piped(tls_server, "deploy done\n", "--nick", "ci")
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr.decode()
    assert result.stderr.decode() == (f"pyChat: {tls_server.host}:{tls_server.port} speaks TLS: add --tls "
                                      "(and --cafile FILE if its certificate is your own)\n")
    assert GREETING_TIMEOUT <= took < NICKNAME_TIMEOUT / 3, f"told after {took:.1f} s"


def test_plain_client_in_a_terminal_at_a_tls_port_says_to_add_tls_and_leaves(tls_server, run_client):
    alice = run_client(tls_server, "--nick", "alice")
    assert alice.wait_exit(timeout=GREETING_TIMEOUT + 5) == 1
    assert f"-!- {tls_server.host}:{tls_server.port} speaks TLS: add --tls (and --cafile FILE if its " \
           "certificate is your own)" in screen_text(alice), alice.screen.dump()


# -- the IRC port --------------------------------------------------------------------

@pytest.fixture
def irc_door(start_server):
    """The IRC port of a server, as a host and port the client can be pointed at."""
    server = start_server("--irc-port", "0")
    return SimpleNamespace(host=server.host, port=irc_port(server))


def test_piped_client_at_the_irc_port_is_told_so_at_once_and_exits_nonzero(irc_door):
    started = time.monotonic()
    result = run_piped(irc_door, "deploy done\n", "--nick", "ci")
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr.decode()
    assert result.stderr.decode() == (f"pyChat: {irc_door.host}:{irc_door.port} is an IRC port: use an IRC "
                                      "client there, or the server's pyChat port with this client\n")
    assert result.stdout == b"", "the IRC server's line was shown as if it were chat"
    assert took < GREETING_TIMEOUT, f"told after {took:.1f} s"


def test_client_in_a_terminal_at_the_irc_port_says_so_and_leaves(irc_door, run_client):
    alice = run_client(irc_door, "--nick", "alice")
    assert alice.wait_exit() == 1
    assert f"-!- {irc_door.host}:{irc_door.port} is an IRC port: use an IRC client there, or the server's " \
           "pyChat port with this client" in screen_text(alice), alice.screen.dump()
    assert ":pychat.server" not in screen_text(alice), alice.screen.dump()


# -- a service that never greets ----------------------------------------------------

def test_piped_client_at_a_silent_service_gives_up_with_one_line(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as silent:      # connections wait in its backlog, unanswered
        service = SimpleNamespace(host="127.0.0.1", port=silent.getsockname()[1])
        started = time.monotonic()
        result = run_piped(service, "deploy done\n", "--nick", "ci", timeout=PIPED_GREETING_TIMEOUT + 10)
        took = time.monotonic() - started
    assert result.returncode == 1, result.stderr.decode()
    assert result.stderr.decode() == (f"pyChat: no pyChat greeting from 127.0.0.1:{service.port} within "
                                      f"{PIPED_GREETING_TIMEOUT:g} s: is it a pyChat server? "
                                      "(see --host, --port and --tls)\n")
    assert PIPED_GREETING_TIMEOUT <= took < PIPED_GREETING_TIMEOUT + 5, f"gave up after {took:.1f} s"


# -- a certificate made anew ----------------------------------------------------------


def self_signed_localhost(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A new key and a certificate for localhost that is its own authority, as the README makes one;
    written over the old ones at the same paths. Returns (certificate, key)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make test certificates")
    certificate, key = folder / "localhost.pem", folder / "localhost.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(certificate)], check=True, capture_output=True, timeout=30)
    return certificate, key


def test_a_reconnecting_client_trusts_the_servers_new_certificate_given_at_the_same_path(start_server, run_client,
                                                                                       tmp_path):
    certificate, key = self_signed_localhost(tmp_path)
    server = start_server("--tls-cert", str(certificate), "--tls-key", str(key))
    alice = run_client(server, "--nick", "alice", "--host", "localhost", "--cafile", str(certificate))
    alice.wait_for_input_line("alice #lobby> ")
    old = certificate.read_bytes()
    self_signed_localhost(tmp_path)               # the running server keeps the old one until it restarts
    assert certificate.read_bytes() != old
    server.stop()
    alice.wait_for_row(r"-!- connecting again in")
    start_server("--tls-cert", str(certificate), "--tls-key", str(key), "--port", str(server.port))
    alice.wait_for_row(r"-!- connected to localhost:\d+ again; signing in as alice$", timeout=15)
    alice.wait_for_input_line("alice #lobby> ", timeout=10)
    assert b"cannot trust" not in alice.output, alice.screen.dump()


def test_a_cafile_missing_while_the_client_reconnects_is_said_and_tried_again(start_server, run_client, tmp_path):
    certificate, key = self_signed_localhost(tmp_path)
    server = start_server("--tls-cert", str(certificate), "--tls-key", str(key))
    alice = run_client(server, "--nick", "alice", "--host", "localhost", "--cafile", str(certificate),
                       cols=250)                  # wide enough for the file's path on one row
    alice.wait_for_input_line("alice #lobby> ")
    certificate.unlink()                          # being made anew, as a script might do it
    server.stop()
    alice.wait_for_row(rf"-!- --cafile {re.escape(str(certificate))}: no such file", timeout=10)
    self_signed_localhost(tmp_path)
    start_server("--tls-cert", str(certificate), "--tls-key", str(key), "--port", str(server.port))
    alice.wait_for_row(r"-!- connected to localhost:\d+ again; signing in as alice$", timeout=15)
    alice.wait_for_input_line("alice #lobby> ", timeout=10)
    assert alice.process.poll() is None
