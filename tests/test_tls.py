"""TLS: a throwaway certificate authority made at test time, the server with --tls-cert/--tls-key, and clients.

Python's ssl module plays the client that verifies (or fails to); the real
pyChat-client.py is tested in piped mode with --tls, --cafile and --insecure.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import LineClient, ROOT, TIMEOUT, reset, seconds_until_closed, talk_until_cut_off, wait_until_online
# start_server is the fixture that also checks every server's log for tracebacks.

CLIENT_SCRIPT = ROOT / "pyChat-client.py"
NICKNAME_PROMPT = "*** Choose a nickname:"
EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_authority(openssl: str, folder: Path, name: str) -> None:
    """A self-signed certificate authority: NAME.pem and NAME.key in FOLDER."""
    subprocess.run([openssl, "req", "-x509", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem",
                    "-days", "2", "-subj", f"/CN=pyChat test {name}",
                    "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
                   cwd=folder, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> SimpleNamespace:
    """A CA, a server certificate it signed for localhost and 127.0.0.1, and a second CA that signed nothing."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a throwaway certificate authority")
    folder = tmp_path_factory.mktemp("tls")
    make_authority(openssl, folder, "ca")
    make_authority(openssl, folder, "stranger-ca")
    (folder / "server.ext").write_text(
        "subjectAltName = DNS:localhost, IP:127.0.0.1\n"
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        "authorityKeyIdentifier = keyid, issuer\n"
        "subjectKeyIdentifier = hash\n")
    for command in (["req", *EC_KEY, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"],
                    ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                     "-out", "server.pem", "-days", "2", "-extfile", "server.ext"]):
        subprocess.run([openssl, *command], cwd=folder, check=True, capture_output=True, timeout=30)
    return SimpleNamespace(ca=folder / "ca.pem", stranger_ca=folder / "stranger-ca.pem",
                           cert=folder / "server.pem", key=folder / "server.key")


@pytest.fixture
def tls_server(start_server, certificates):
    return start_server("--tls-cert", str(certificates.cert), "--tls-key", str(certificates.key))


@pytest.fixture
def tls_connect(connect, certificates):
    """connect() over TLS, trusting the test certificate authority."""
    def open_client(server, nick: str | None = None) -> LineClient:
        return connect(server, nick, tls=ssl.create_default_context(cafile=str(certificates.ca)))

    return open_client


def client_hello(certificates) -> bytes:
    """The first bytes a TLS client sends (its ClientHello), made in memory."""
    context = ssl.create_default_context(cafile=str(certificates.ca))
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def run_client(server, *options: str, stdin: str = "", timeout: float = 15) -> subprocess.CompletedProcess:
    """pyChat-client.py in piped mode against SERVER."""
    return subprocess.run([sys.executable, str(CLIENT_SCRIPT), "--host", "127.0.0.1", "--port", str(server.port),
                           *options], input=stdin, capture_output=True, text=True, timeout=timeout)


# -- the protocol over TLS -----------------------------------------------------------------------

def test_a_verifying_client_signs_in_and_chats_over_tls(tls_server, tls_connect):
    alice = tls_connect(tls_server, "alice")
    bob = tls_connect(tls_server, "bob")
    assert alice.sock.version() in ("TLSv1.2", "TLSv1.3"), alice.sock.version()
    alice.expect(r"\*\*\* bob joined")
    bob.send("hello over tls")
    assert alice.expect("bob: ") == "bob: hello over tls"
    alice.send("/quit")
    assert alice.wait_closed()[-1] == "*** Bye."
    assert bob.expect(r"\*\*\* alice quit") == "*** alice quit"


def test_a_plain_tcp_client_is_told_in_plain_text_that_the_port_speaks_tls_and_the_server_keeps_serving(
        tls_server, tls_connect):
    silent = socket.create_connection((tls_server.host, tls_server.port), timeout=TIMEOUT)  # never says a word
    plain = LineClient(tls_server.host, tls_server.port)
    try:
        plain.send_raw(b"mallory\nhello in the clear\n")
        received = plain.wait_closed()
        assert received == [f"!! This port speaks TLS, not plain text. Connect with pyChat-client.py --tls "
                            f"--port {tls_server.port}, or openssl s_client -connect HOST:{tls_server.port}."], \
            f"a plain-text client was not told, in one line, that the port speaks TLS: {received}"
        # The server goes on serving TLS users, while the silent plain connection is still open.
        alice = tls_connect(tls_server, "alice")
        bob = tls_connect(tls_server, "bob")
        bob.send("still serving")
        assert alice.expect("bob: ") == "bob: still serving"
        alice.send("/online")
        assert alice.expect("-- ") == "-- 2 online: alice (#lobby), bob (#lobby)", "the plain client got in"
        tls_server.wait_for_log(r"closed: spoke plain text to the TLS port")
    finally:
        silent.close()
        plain.close()


@pytest.mark.parametrize("trust, hostname", [
    ("stranger", "localhost"),       # a certificate authority that did not sign the server's certificate
    ("system", "localhost"),         # only the system's authorities
    ("ca", "chat.example.org"),      # the right authority, but a name the certificate is not for
])
def test_a_client_that_cannot_verify_the_server_fails_and_the_server_keeps_serving(
        tls_server, tls_connect, certificates, trust, hostname):
    if trust == "system":
        context = ssl.create_default_context()
    else:
        context = ssl.create_default_context(cafile=str(certificates.ca if trust == "ca" else certificates.stranger_ca))
    with pytest.raises(ssl.SSLCertVerificationError):
        LineClient(tls_server.host, tls_server.port, context, server_hostname=hostname).close()
    alice = tls_connect(tls_server, "alice")
    alice.send("after the failed handshake")
    assert alice.expect("alice: ") == "alice: after the failed handshake"


def test_a_tls_newcomer_past_the_connection_limit_is_told_the_server_is_full(start_server, tls_connect, certificates):
    server = start_server("--tls-cert", str(certificates.cert), "--tls-key", str(certificates.key),
                          "--max-clients", "1")
    alice = tls_connect(server, "alice")
    try:
        newcomer = LineClient(server.host, server.port, ssl.create_default_context(cafile=str(certificates.ca)))
    except (ssl.SSLError, OSError) as problem:
        pytest.fail(f"a TLS newcomer past --max-clients was closed without a word (handshake: {problem!r})")
    try:
        lines = newcomer.wait_closed()
    finally:
        newcomer.close()
    assert len(lines) == 1 and lines[0].startswith("!! The server is full"), \
        f"a TLS newcomer past --max-clients should get one '!! The server is full' line; got {lines}"
    alice.send("unaffected")
    assert alice.expect("alice: ") == "alice: unaffected"


@pytest.mark.parametrize("dribble", [False, True], ids=["silent", "dribbling-its-client-hello"])
def test_a_connection_that_never_finishes_the_tls_handshake_is_closed_after_the_nickname_timeout(
        start_server, tls_connect, certificates, dribble):
    server = start_server("--tls-cert", str(certificates.cert), "--tls-key", str(certificates.key),
                          "--nick-timeout", "0.5")
    hello = client_hello(certificates)
    sock = socket.create_connection((server.host, server.port), timeout=TIMEOUT)
    try:
        alice = tls_connect(server, "alice")     # the slow handshake holds up no one
        alice.send("not held up")
        assert alice.expect("alice: ") == "alice: not held up"
        took = seconds_until_closed(sock, hello[:-1] if dribble else b"", most=4.5)
    finally:
        sock.close()
    assert took is not None, \
        "a connection that never finished its TLS handshake was never closed (--nick-timeout 0.5)"
    assert took <= 3, f"an unfinished TLS handshake was closed only after {took:.1f} s (--nick-timeout 0.5)"


def test_a_stalled_tls_reader_does_not_delay_others_and_is_cut_off(start_server, tls_connect, certificates):
    server = start_server("--tls-cert", str(certificates.cert), "--tls-key", str(certificates.key),
                          "--max-queue", "65536", "--rate", "0")
    plain = socket.socket()
    plain.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    plain.connect((server.host, server.port))
    stalled = ssl.create_default_context(cafile=str(certificates.ca)).wrap_socket(plain, server_hostname="localhost")
    try:
        stalled.sendall(b"sleepy\n")            # signs in, then never reads again
        alice = tls_connect(server, "alice")
        bob = tls_connect(server, "bob")
        alice.expect(r"\*\*\* bob joined")
        talk_until_cut_off(server, bob, alice, "sleepy")
    finally:
        stalled.close()


def test_tls_connections_cut_at_every_stage_leave_no_traceback_and_no_ghost(tls_server, tls_connect, certificates):
    alice = tls_connect(tls_server, "alice")
    bob = tls_connect(tls_server, "bob")
    hello = client_hello(certificates)
    context = ssl.create_default_context(cafile=str(certificates.ca))
    for n in range(100):
        stage = n % 5
        if stage >= 3:                          # signed in, then gone mid-conversation
            client = LineClient(tls_server.host, tls_server.port, context)
            client.login(f"cut{n}")
            client.send_raw(b"half a line")
            sock = client.sock
            if stage == 4:                      # after a forged record that cannot decrypt
                garbage = socket.socket(fileno=os.dup(sock.fileno()))
                garbage.sendall(b"\x17\x03\x03\x00\x20" + os.urandom(32))
                garbage.close()
        else:                                   # before, during, or right after the ClientHello
            sock = socket.create_connection((tls_server.host, tls_server.port), timeout=TIMEOUT)
            sock.sendall((b"", hello[:len(hello) // 2], hello)[stage])
        reset(sock) if n % 2 else sock.close()
        if n % 10 == 9:                         # the others chat on throughout
            bob.send(f"still here {n}")
            assert alice.expect("bob: ") == f"bob: still here {n}"
    wait_until_online(alice, "-- 2 online: alice (#lobby), bob (#lobby)")
    assert "Traceback" not in tls_server.log(), tls_server.log()[-3000:]


# -- the real client -----------------------------------------------------------------------------

def test_the_client_with_cafile_delivers_piped_lines_over_tls(tls_server, tls_connect, certificates):
    alice = tls_connect(tls_server, "alice")
    result = run_client(tls_server, "--tls", "--cafile", str(certificates.ca), "--nick", "tlsuser", stdin="hi\n")
    assert result.returncode == 0, f"the client failed: {result.stderr}"
    assert alice.expect("tlsuser: ") == "tlsuser: hi"
    assert alice.expect(r"\*\*\* tlsuser quit").startswith("*** tlsuser quit")


def test_the_client_with_insecure_warns_and_still_connects(tls_server, tls_connect):
    alice = tls_connect(tls_server, "alice")
    result = run_client(tls_server, "--insecure", "--nick", "riskyuser", stdin="hi anyway\n")
    assert result.returncode == 0, f"the client failed: {result.stderr}"
    assert re.search(r"warning.*insecure|insecure.*not (checked|verified)", result.stderr, re.IGNORECASE), \
        f"--insecure gave no warning; stderr: {result.stderr!r}"
    assert alice.expect("riskyuser: ") == "riskyuser: hi anyway"


def test_the_client_without_cafile_fails_verification_with_one_clear_line(tls_server, tls_connect):
    alice = tls_connect(tls_server, "alice")
    result = run_client(tls_server, "--tls", "--nick", "trusting", stdin="should not arrive\n")
    assert result.returncode != 0, "the client connected to a server whose certificate it cannot verify"
    complaint = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(complaint) == 1, f"expected one line on stderr, got: {result.stderr!r}"
    assert re.search(r"certificate|verif", complaint[0], re.IGNORECASE), complaint[0]
    assert "Traceback" not in result.stderr
    alice.send("/online")
    assert alice.expect("-- ") == "-- 1 online: alice (#lobby)", "the unverified client got in"
