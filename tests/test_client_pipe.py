"""The client with piped standard input, TLS, passwords and connection errors, run as a subprocess."""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import script_command

CLIENT = pathlib.Path(__file__).resolve().parent.parent / "pyChat-client.py"


# -- piped input -----------------------------------------------------------------------

def run_piped(server, text: str, *args: str, host: str | None = None, env: dict | None = None,
              timeout: float = 15) -> subprocess.CompletedProcess:
    """Run the client with TEXT as its standard input; bounded in time."""
    environment = {name: value for name, value in os.environ.items()
                   if name not in ("PYCHAT_PASSWORD", "NO_COLOR")}
    environment.update(env or {})
    return subprocess.run(
        script_command(CLIENT, "--host", host or server.host, "--port", str(server.port), *args),
        input=text.encode(), capture_output=True, timeout=timeout, env=environment)


def test_piped_line_is_sent_and_client_exits_zero(server, connect):
    bob = connect(server, "bob")
    result = run_piped(server, "hi\n", "--nick", "ci")
    assert result.returncode == 0, result.stderr.decode()
    assert bob.expect(r"^ci: ") == "ci: hi"
    output = result.stdout.decode()
    assert re.search(r"^\[\d\d:\d\d:\d\d\] ci: hi$", output, re.MULTILINE), output
    assert "\x1b" not in output


def test_piped_lines_arrive_in_order_including_last_line_without_newline(server, connect):
    bob = connect(server, "bob")
    result = run_piped(server, "one\n二\nthree", "--nick", "ci")
    assert result.returncode == 0, result.stderr.decode()
    assert [bob.expect(r"^ci: ") for _ in range(3)] == ["ci: one", "ci: 二", "ci: three"]


@pytest.mark.server_options("--rate", "20", "--burst", "5")
def test_piped_lines_beyond_the_burst_are_paced_to_the_flood_limit_and_none_is_dropped(server, connect):
    bob = connect(server, "bob")
    result = run_piped(server, "".join(f"line {n}\n" for n in range(25)), "--nick", "ci")
    assert result.returncode == 0, result.stderr.decode()
    assert "!! " not in result.stdout.decode(), "the server refused lines as too fast"
    assert [bob.expect(r"^ci: ") for _ in range(25)] == [f"ci: line {n}" for n in range(25)]


def test_piped_quiet_prints_the_servers_errors_and_nothing_of_the_room(server, connect):
    bob = connect(server, "bob")
    bob.send("bob: the launch code is 0000")
    bob.expect("bob: bob: the launch code")          # said, so the room's history holds it
    result = run_piped(server, "deploy done\n/nosuchcommand\n", "--nick", "ci", "--quiet")
    assert result.returncode == 0, result.stderr.decode()
    assert bob.expect(r"^ci: ") == "ci: deploy done"
    printed = result.stdout.decode().splitlines()
    assert [re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", line) for line in printed] == \
        ["!! Unknown command /nosuchcommand. Type /help for the list."], printed
    assert result.stderr == b""


def test_piped_refused_nick_exits_nonzero_with_the_reason(server):
    result = run_piped(server, "hi\n", "--nick", "admin")
    assert result.returncode != 0
    assert result.stderr.decode().startswith("pyChat: nickname refused: !! ")


def test_piped_without_nick_is_a_usage_error(server):
    result = run_piped(server, "hi\n")
    assert result.returncode == 2
    assert "--nick" in result.stderr.decode()


def test_connection_refused_is_one_line_without_traceback():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run([sys.executable, str(CLIENT), "--host", "127.0.0.1", "--port",
                             str(port), "--nick", "x"], stdin=subprocess.DEVNULL,
                            capture_output=True, timeout=15)
    stderr = result.stderr.decode()
    assert result.returncode == 1
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert "cannot connect to 127.0.0.1" in stderr and "refused" in stderr


def test_unknown_host_is_one_line_without_traceback():
    result = subprocess.run([sys.executable, str(CLIENT), "--host", "no-such-host.invalid",
                             "--nick", "x"], stdin=subprocess.DEVNULL, capture_output=True,
                            timeout=30)
    stderr = result.stderr.decode()
    assert result.returncode == 1
    assert stderr.startswith("pyChat: unknown host no-such-host.invalid") and stderr.count("\n") == 1


# -- password ----------------------------------------------------------------------------

def test_password_from_environment_is_sent_when_asked(start_server):
    server = start_server("--password", "sesame")
    result = run_piped(server, "in\n", "--nick", "ci", env={"PYCHAT_PASSWORD": "sesame"})
    assert result.returncode == 0, result.stderr.decode()
    assert "ci: in" in result.stdout.decode()
    assert "Password" not in result.stdout.decode()


def test_wrong_password_piped_exits_nonzero_with_the_reason(start_server):
    server = start_server("--password", "sesame", "--guess-delay", "0.05")
    result = run_piped(server, "in\n", "--nick", "ci", "--password", "guess")
    assert result.returncode == 1
    assert result.stderr.decode() == "pyChat: password refused: !! Wrong password.\n"


def test_missing_password_piped_exits_nonzero_saying_how_to_give_one(start_server):
    server = start_server("--password", "sesame")
    result = run_piped(server, "in\n", "--nick", "ci")
    assert result.returncode == 1
    assert "PYCHAT_PASSWORD" in result.stderr.decode()


# -- TLS -------------------------------------------------------------------------------

def openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> pathlib.Path:
    """A private CA and a server certificate it signed, for the name "localhost" only."""
    if not shutil.which("openssl"):
        pytest.skip("the openssl command is needed to make test certificates")
    folder = tmp_path_factory.mktemp("tls")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=pyChat test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    openssl("req", *key, "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost", cwd=folder)
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost\n"
                                       "basicConstraints=CA:FALSE\n"
                                       "keyUsage=digitalSignature\n"
                                       "extendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
            cwd=folder)
    return folder


@pytest.fixture
def tls_server(start_server, certificates):
    return start_server("--tls-cert", str(certificates / "server.pem"),
                        "--tls-key", str(certificates / "server.key"))


def test_tls_with_private_ca_verifies_and_chats(tls_server, certificates):
    result = run_piped(tls_server, "secret plans\n", "--nick", "ci", "--tls",
                       "--cafile", str(certificates / "ca.pem"), host="localhost")
    assert result.returncode == 0, result.stderr.decode()
    assert "ci: secret plans" in result.stdout.decode()
    assert result.stderr == b""


def test_tls_refuses_untrusted_certificate_in_one_line(tls_server):
    result = run_piped(tls_server, "hi\n", "--nick", "ci", "--tls", host="localhost")
    stderr = result.stderr.decode()
    assert result.returncode == 1
    assert stderr.startswith("pyChat: cannot trust localhost:") and stderr.count("\n") == 1, stderr


def test_tls_refuses_certificate_for_another_host_name(tls_server, certificates):
    result = run_piped(tls_server, "hi\n", "--nick", "ci", "--cafile",
                       str(certificates / "ca.pem"), host="127.0.0.1")
    stderr = result.stderr.decode()
    assert result.returncode == 1
    assert stderr.startswith("pyChat: cannot trust 127.0.0.1:") and "Traceback" not in stderr, stderr


def test_tls_insecure_connects_with_a_warning(tls_server):
    result = run_piped(tls_server, "hi\n", "--nick", "ci", "--insecure", host="127.0.0.1")
    assert result.returncode == 0, result.stderr.decode()
    assert "warning" in result.stderr.decode() and "ci: hi" in result.stdout.decode()


# -- a server that does not clean its lines ----------------------------------------------

def test_control_characters_from_a_careless_server_are_removed():
    """A hand-played server sends escapes, a bell and a direction override; none is printed."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(10)
        client = subprocess.Popen(
            [sys.executable, str(CLIENT), "--host", "127.0.0.1", "--port",
             str(listener.getsockname()[1]), "--nick", "ci"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            connection, _ = listener.accept()
            with connection, connection.makefile("rwb", buffering=0) as wire:
                connection.settimeout(10)
                wire.write(b"*** Choose a nickname:\n")
                assert wire.readline() == b"ci\n"
                wire.write("*** Welcome, ci!\nevil: \x1b[2J\x1b]0;owned\x07hi\u202egnp.exe\r\n"
                           .encode())
                assert wire.readline() == b"/quit\n"
                wire.write(b"*** Bye.\n")
            output, errors = client.communicate(timeout=10)
        finally:
            client.kill()
            client.wait()
    assert client.returncode == 0, errors.decode()
    shown = output.decode()
    assert re.search(r"\] evil: \[2J\]0;ownedhignp\.exe\n", shown), repr(shown)
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f\u202e]", shown), repr(shown)


# -- the settings file ---------------------------------------------------------------

def test_help_says_where_the_settings_file_is(tmp_path):
    result = subprocess.run([sys.executable, str(CLIENT), "--help"], capture_output=True, timeout=15,
                            env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path)})
    assert result.returncode == 0
    assert str(tmp_path / "pychat" / "config") in " ".join(result.stdout.decode().split())


def test_settings_file_is_used_and_the_command_line_wins(server, connect, tmp_path):
    (tmp_path / "pychat").mkdir()
    (tmp_path / "pychat" / "config").write_text(f"[pychat]\nnick = fromfile\nport = {server.port}\n")
    bob = connect(server, "bob")
    environment = {"XDG_CONFIG_HOME": str(tmp_path)}
    result = run_piped(server, "hello\n", env=environment)
    assert result.returncode == 0, result.stderr.decode()
    assert bob.expect("^fromfile: ") == "fromfile: hello"
    result = run_piped(server, "again\n", "--nick", "fromline", env=environment)
    assert result.returncode == 0, result.stderr.decode()
    assert bob.expect("^fromline: ") == "fromline: again"
