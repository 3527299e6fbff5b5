"""The client finding its server again after the server's certificate was made anew (issue 22 point 22)."""
from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

from test_client_terminal import run_client  # noqa: F401 (fixture)


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
