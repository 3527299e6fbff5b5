"""Starting the server: options it refuses, and start errors that say what is wrong and what to do.

Option ranges are checked by calling parse_options() directly, and once through
the script; start errors start pyChat-server.py as a process and read what it
prints on standard error. None of them gets as far as serving anyone.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import SERVER_SCRIPT, import_script

server_module = import_script(SERVER_SCRIPT, "pychat_server")


def start(*options: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run the server with OPTIONS on loopback, expecting it to exit by itself."""
    return subprocess.run([sys.executable, str(SERVER_SCRIPT), "--host", "127.0.0.1", *options],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def only_line(result: subprocess.CompletedProcess) -> str:
    """The last line the server printed; fails if it printed a traceback."""
    assert "Traceback" not in result.stderr, f"a traceback instead of one clear line:\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert lines, "the server exited without saying why"
    return lines[-1]


# -- options -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("--port", "99999"), ("--port", "-1"), ("--port", "65536"), ("--port", "http"), ("--port", "1.5"),
    ("--max-clients", "-1"), ("--max-per-ip", "-3"), ("--max-clients", "many"),
    ("--rate", "-1"), ("--rate", "nan"), ("--rate", "inf"),
    ("--burst", "-1"), ("--burst", "2.5"),
    ("--nick-timeout", "0"), ("--nick-timeout", "-5"), ("--nick-timeout", "nan"), ("--nick-timeout", "inf"),
    ("--nick-timeout", "1e300"),
    ("--idle-timeout", "-1"), ("--idle-timeout", "inf"), ("--idle-timeout", "1e20"),
    ("--keepalive", "0"), ("--keepalive", "100000"), ("--keepalive", "1e9"),
    ("--max-queue", "0"), ("--max-queue", "-1"),
    ("--stall-timeout", "0"), ("--stall-timeout", "nan"), ("--stall-timeout", "1e300"),
    ("--history", "-1"), ("--history", "ten"),
    ("--guess-delay", "-0.1"), ("--guess-delay", "61"), ("--guess-delay", "nan"), ("--guess-delay", "inf"),
])
def test_a_numeric_option_out_of_range_is_refused_by_name_with_its_range(option, value, capsys):
    with pytest.raises(SystemExit) as exit_status:
        server_module.parse_options(["--port", "0", option, value])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_status.value.code == 2, f"{option} {value} was accepted"
    assert f"argument {option}: {value!r} is not a" in line, line
    assert any(word in line for word in (" to ", " or more", " more than ")), f"the range is not named: {line}"


@pytest.mark.parametrize("value", ["99999", "-1"])
def test_the_server_refuses_a_port_out_of_range_in_one_line_without_a_traceback(value):
    result = start("--port", value)
    assert result.returncode == 2, result.stderr
    assert only_line(result).endswith(f"argument --port: {value!r} is not a whole number from 0 to 65535")


@pytest.mark.parametrize("option, value", [
    ("--port", "65535"), ("--max-clients", "0"), ("--rate", "0"), ("--rate", "0.5"), ("--burst", "0"),
    ("--nick-timeout", "0.5"), ("--idle-timeout", "0"), ("--keepalive", "32767"), ("--history", "0"),
    ("--guess-delay", "0"), ("--guess-delay", "60"),
])
def test_numeric_options_at_the_edges_of_their_range_are_accepted(option, value):
    assert getattr(server_module.parse_options([option, value]), option[2:].replace("-", "_")) == float(value)


# -- start errors -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pem(tmp_path_factory) -> SimpleNamespace:
    """Two self-signed certificates with their keys (one.pem/one.key, two.pem/two.key), and a key behind a
    passphrase."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make throwaway certificates")
    folder = tmp_path_factory.mktemp("pem")
    for name in ("one", "two"):
        subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
                        "-subj", "/CN=localhost"], cwd=folder, check=True, capture_output=True, timeout=30)
    subprocess.run([openssl, "pkey", "-in", "one.key", "-aes256", "-passout", "pass:secret", "-out", "locked.key"],
                   cwd=folder, check=True, capture_output=True, timeout=30)
    (folder / "notes.txt").write_text("not a certificate\n")
    return SimpleNamespace(folder=folder, **{f"{name}_{kind}": str(folder / f"{name}.{kind}")
                                             for name in ("one", "two") for kind in ("pem", "key")},
                           locked=str(folder / "locked.key"), text=str(folder / "notes.txt"))


def cannot_start(*options: str) -> str:
    """Start the server with OPTIONS, expecting it to refuse: returns its one error line."""
    result = start("--port", "0", *options)
    line = only_line(result)
    assert result.returncode == 1, f"the server did not exit with status 1: {result.stderr}"
    assert "cannot start: " in line, line
    assert "listening on" not in result.stderr, result.stderr
    return line.split("cannot start: ", 1)[1]


def test_a_missing_certificate_is_named(pem):
    missing = str(pem.folder / "missing.pem")
    why = cannot_start("--tls-cert", missing, "--tls-key", pem.one_key)
    assert missing in why and "--tls-cert" in why and "does not exist" in why, why


def test_a_missing_key_is_named(pem):
    missing = str(pem.folder / "missing.key")
    why = cannot_start("--tls-cert", pem.one_pem, "--tls-key", missing)
    assert missing in why and "--tls-key" in why and "does not exist" in why, why


def test_a_directory_given_as_the_certificate_is_named(pem):
    why = cannot_start("--tls-cert", str(pem.folder), "--tls-key", pem.one_key)
    assert str(pem.folder) in why and "is a directory" in why, why


def test_a_certificate_and_key_given_the_wrong_way_round_are_called_swapped(pem):
    why = cannot_start("--tls-cert", pem.one_key, "--tls-key", pem.one_pem)
    assert "swapped" in why and pem.one_key in why and pem.one_pem in why, why


def test_a_key_that_does_not_belong_to_the_certificate_is_named_with_it(pem):
    why = cannot_start("--tls-cert", pem.one_pem, "--tls-key", pem.two_key)
    assert "does not belong" in why and pem.one_pem in why and pem.two_key in why, why


def test_a_file_that_is_not_a_certificate_is_named(pem):
    why = cannot_start("--tls-cert", pem.text, "--tls-key", pem.one_key)
    assert pem.text in why and "no PEM certificate" in why, why


def test_a_key_behind_a_passphrase_is_refused_without_asking_for_it(pem):
    why = cannot_start("--tls-cert", pem.one_pem, "--tls-key", pem.locked)
    assert pem.locked in why and "passphrase" in why and "openssl pkey" in why, why


def test_a_port_in_use_is_named_with_its_address_and_what_to_do():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = start("--port", str(port))
    why = only_line(result)
    assert result.returncode == 1, result.stderr
    assert f"127.0.0.1:{port}" in why and "in use" in why and "--port" in why, why


@pytest.mark.parametrize("option", ["--irc-port", "--web-port"])
def test_a_door_s_port_in_use_is_named_by_its_own_option(option):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        why = cannot_start(option, str(port))
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in why and f"another {option} " in why, why


def test_an_address_this_machine_does_not_have_is_named_with_what_to_do():
    result = start("--port", "0", "--host", "192.0.2.1")     # TEST-NET-1: never a local address
    why = only_line(result)
    assert result.returncode == 1, result.stderr
    assert "192.0.2.1:0" in why and "not an address of this machine" in why, why


def test_a_low_port_without_permission_says_which_ports_need_what():
    command = [sys.executable, str(SERVER_SCRIPT), "--host", "127.0.0.1", "--port", "80"]
    setpriv = shutil.which("setpriv")
    if os.geteuid() == 0:
        if setpriv is None:
            pytest.skip("running as root without setpriv, which could take away the right to use low ports")
        command = [setpriv, "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service", *command]
    if int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()) <= 80:
        pytest.skip("this system lets anyone listen on port 80")
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    try:
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    why = only_line(subprocess.CompletedProcess(command, process.returncode, "", stderr))
    assert process.returncode == 1, stderr
    assert "127.0.0.1:80" in why and "permission denied" in why and "1024" in why, why
