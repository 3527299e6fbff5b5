"""Running the server for a community: the configuration file, reloading without a restart (SIGHUP, /rehash,
REHASH), the log (UTC times, --log-file and logrotate), and the systemd unit in contrib/.

Servers run as processes over loopback sockets; every wait is bounded, and waits on a log line or a reply.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, SERVER_SCRIPT, TIMEOUT, LineClient, IrcClient, irc_port, script_command, shown

OP_SECRET = "operator-secret-1"
UNIT = ROOT / "contrib" / "pychat.service"
EXAMPLE_CONFIG = ROOT / "contrib" / "pychat.ini"
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S")

# A value other than the default for every key a configuration file may hold, as --print-config writes it.
EVERY_KEY = {
    "host": "127.0.0.2", "port": "2600", "log-file": "/srv/chat/pychat.log", "verbose": "yes", "quiet": "yes",
    "max-clients": "7", "max-per-ip": "3", "rate": "2.5", "burst": "5", "nick-timeout": "12.5",
    "idle-timeout": "600.0", "keepalive": "30", "max-queue": "1000", "stall-timeout": "9.0", "guess-delay": "0.5",
    "rooms-per-person": "4", "history": "5", "history-days": "30.0", "history-max-mb": "64.0",
    "data-dir": "/srv/chat/data", "operator": "alice, bob", "private": "yes", "motd": "/srv/chat/motd.txt",
    "tls-cert": "/srv/chat/cert.pem", "tls-key": "/srv/chat/key.pem", "irc-port": "6697", "irc-ping": "60.0",
    "irc-auto-join": "#dev,#ops", "server-name": "chat.example.org", "web-port": "8443",
    "web-origin": "https://chat.example.org,http://localhost:8443", "trust-proxy": "127.0.0.1",
}
SECRETS = {"password": "server-secret-1", "op-password": OP_SECRET}


def run_server(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The server script run to its end (for --print-config and refusals to start)."""
    return subprocess.run(script_command(SERVER_SCRIPT, *args), capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, env=env)


def printed_config(*args: str, env: dict | None = None) -> dict[str, str]:
    """What --print-config says is in effect, by key; keys left unset (commented out) are absent."""
    done = run_server(*args, "--print-config", env=env)
    assert done.returncode == 0, f"--print-config failed with {done.returncode}: {done.stderr}"
    return dict(line.split(" = ", 1) for line in done.stdout.splitlines() if " = " in line and line[0] != "#")


def no_secrets_env() -> dict:
    return {key: value for key, value in os.environ.items() if key not in ("PYCHAT_PASSWORD", "PYCHAT_OP_PASSWORD")}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def operator_env() -> dict:
    return dict(no_secrets_env(), PYCHAT_OP_PASSWORD=OP_SECRET)


def make_operator(client: LineClient) -> None:
    client.send(f"/op {OP_SECRET}")
    assert client.expect("-- |!! ") == "-- You are now an operator.", shown(client.seen)


def rehash(client: LineClient) -> list[str]:
    """/rehash's reply: its lines up to the last, which names the certificate or the message of the day."""
    client.send("/rehash")
    lines = [client.expect("-- |!! ")]
    while not re.match(r"!! |-- (TLS certificate|Message of the day|No message of the day)|-- The reload failed",
                       lines[-1]):
        lines.append(client.recv_line())
    return lines


# ---------------------------------------------------------------------------
# The configuration file
# ---------------------------------------------------------------------------

def test_every_option_can_be_set_in_the_configuration_file(tmp_path):
    config = write(tmp_path / "pychat.ini", "[server]\n" + "".join(f"{k} = {v}\n" for k, v in EVERY_KEY.items()))
    default_keys = {line.lstrip("# ").split(" =")[0] for line in run_server("--print-config").stdout.splitlines()
                    if " =" in line}
    assert default_keys == set(EVERY_KEY), \
        f"the keys of a configuration file and this test's differ: {sorted(default_keys ^ set(EVERY_KEY))}"
    assert printed_config("--config", str(config), env=no_secrets_env()) == EVERY_KEY


def test_secrets_in_the_file_are_used_but_never_printed(tmp_path, start_server, connect):
    config = write(tmp_path / "pychat.ini", "".join(f"{k} = {v}\n" for k, v in SECRETS.items()))
    done = run_server("--config", str(config), "--print-config", env=no_secrets_env())
    assert not any(secret in done.stdout for secret in SECRETS.values()), done.stdout
    assert "# password = (set, not shown" in done.stdout and "# op-password = (set, not shown" in done.stdout
    server = start_server("--config", str(config), env=no_secrets_env())
    client = connect(server)
    client.expect(r"\*\*\* (?i:.*password)")


def test_the_command_line_wins_over_the_file_and_a_repeatable_option_replaces_its_list(tmp_path):
    config = write(tmp_path / "pychat.ini", "max-clients = 7\nrate = 1\noperator = alice, bob\n")
    printed = printed_config("--config", str(config), "--max-clients", "9", "--operator", "carol")
    assert (printed["max-clients"], printed["rate"], printed["operator"]) == ("9", "1.0", "carol"), printed
    assert printed_config("--config", str(config))["operator"] == "alice, bob"


@pytest.mark.parametrize("text, line, wrong", [
    ("max-clients = 7\nrate = 1\nfrobnicate = 3\n", 3, "unknown key 'frobnicate'"),
    ("# limits\nmax-clients = many\n", 2, "max-clients: 'many' is not a whole number of 0 or more"),
    ("irc-port = 70000\n", 1, "irc-port: '70000' is not a whole number from 0 to 65535"),
    ("private = perhaps\n", 1, "private: 'perhaps' is not yes or no"),
    ("[client]\nport = 1\n", 1, "unknown section [client]"),
    ("rate = 1\njust words\n", 2, "not 'key = value'"),
    ("rate = 1\nrate = 2\n", 2, "rate is given already, on line 1"),
    ("backup = /tmp/copy.db\n", 1, "unknown key 'backup' (it is for the command line only)"),
    ("operator = alice, ad min\n", 1, "operator: "),
])
def test_a_mistake_in_the_file_stops_the_start_with_one_line_naming_the_file_and_the_line(tmp_path, text, line,
                                                                                            wrong):
    config = write(tmp_path / "pychat.ini", text)
    done = run_server("--config", str(config))
    assert done.returncode == 2, f"exit status {done.returncode}, expected 2 as for a wrong command line"
    assert done.stderr.count("\n") == 1, f"not one line: {done.stderr!r}"
    assert f"{config}, line {line}: " in done.stderr and wrong in done.stderr, done.stderr


@pytest.mark.parametrize("kind, wrong", [("missing", ": cannot read it: No such file or directory"),
                                         ("directory", ": cannot read it: Is a directory"),
                                         ("not text", ", line 2: not UTF-8 text")])
def test_an_unreadable_file_stops_the_start_with_one_line_naming_it(tmp_path, kind, wrong):
    config = tmp_path / "pychat.ini"
    if kind == "directory":
        config.mkdir()
    elif kind == "not text":
        config.write_bytes(b"\xef\xbb\xbf[server]\nrate = \xff\xfe\n")
    done = run_server("--config", str(config))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, (done.returncode, done.stderr)
    assert f"{config}{wrong}" in done.stderr, done.stderr


def test_a_byte_order_mark_before_the_first_line_is_allowed(tmp_path):
    config = tmp_path / "pychat.ini"
    config.write_bytes(b"\xef\xbb\xbf[server]\nrate = 3\n")
    assert printed_config("--config", str(config))["rate"] == "3.0"


def test_a_combination_the_file_makes_impossible_is_named_with_the_file(tmp_path):
    config = write(tmp_path / "pychat.ini", "tls-cert = /srv/cert.pem\n")
    done = run_server("--config", str(config))
    assert done.returncode == 2 and f"{config}: --tls-cert and --tls-key go together" in done.stderr, done.stderr


def test_print_config_output_used_as_the_file_gives_the_same_configuration(tmp_path):
    env = dict(no_secrets_env(), PYCHAT_PASSWORD=SECRETS["password"])
    options = ["--max-clients", "50", "--rate", "0.5", "--operator", "alice", "--operator", "bob", "--private",
               "--motd", str(tmp_path / "motd.txt"), "--irc-port", "6667", "--history-max-mb", "12", "-v"]
    first = run_server(*options, "--print-config", env=env)
    assert first.returncode == 0 and SECRETS["password"] not in first.stdout, first.stdout
    saved = write(tmp_path / "saved.ini", first.stdout)
    second = run_server("--config", str(saved), "--print-config", env=env)
    assert second.stdout == first.stdout, f"first:\n{first.stdout}\nthen:\n{second.stdout}"
    assert "operator = alice, bob" in second.stdout and "private = yes" in second.stdout


# ---------------------------------------------------------------------------
# Reloading: SIGHUP, /rehash and REHASH
# ---------------------------------------------------------------------------

def test_sighup_applies_new_limits_and_motd_and_nobody_is_disconnected(tmp_path, start_server, connect):
    motd = write(tmp_path / "motd.txt", "Welcome to the old days.\n")
    config = write(tmp_path / "pychat.ini", f"max-per-ip = 3\nmotd = {motd}\n")
    server = start_server("--config", str(config))
    alice, bob = connect(server, "alice"), connect(server, "bob")
    write(motd, "Welcome to the new days.\n")
    write(config, f"max-per-ip = 2\nmotd = {motd}\nrate = 8\n")
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log(r"WARNING reload \(SIGHUP\): Reloaded \S+pychat.ini: changed max-per-ip 3 -> 2; "
                        r"rate 4.0 -> 8.0\. Message of the day: 1 line\(s\) from ")
    third = connect(server)
    assert third.recv_line() == "!! Too many connections from your address (at most 2).", shown(third.seen)
    alice.send("/motd")
    assert alice.expect("-- ") == "-- Welcome to the new days."
    bob.send("still here after the reload")
    alice.expect("bob: still here after the reload")
    assert server.process.poll() is None


def test_a_reload_of_a_broken_file_keeps_the_old_settings_and_says_why(tmp_path, start_server, connect):
    config = write(tmp_path / "pychat.ini", "max-per-ip = 2\n")
    server = start_server("--config", str(config), env=operator_env())
    alice = connect(server, "alice")
    make_operator(alice)
    write(config, "max-per-ip = 5\nmax-clients = two\n")
    assert rehash(alice) == [(f"-- The reload failed; the settings stay as they were: {config}, line 2: "
                                   f"max-clients: 'two' is not a whole number of 0 or more")]
    server.wait_for_log(rf"ERROR reload \(/rehash by alice\) failed; the settings stay as they were: .*line 2")
    connect(server, "bob")
    third = connect(server)
    assert third.recv_line() == "!! Too many connections from your address (at most 2).", shown(third.seen)
    write(config, "max-per-ip = 5\n")
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log(r"reload \(SIGHUP\): Reloaded .*changed max-per-ip 2 -> 5")
    connect(server, "carol")


def test_rehash_is_for_operators_and_says_what_changed_and_what_needs_a_restart(tmp_path, start_server, connect):
    config = write(tmp_path / "pychat.ini", "rate = 4\n")
    server = start_server("--config", str(config), env=operator_env())
    alice = connect(server, "alice")
    assert rehash(alice) == ["!! /rehash: not allowed; only operators may use it."]
    make_operator(alice)
    write(config, "rate = 2\nhistory-days = 10\nidle-timeout = 3600\nstall-timeout = 20\n")
    said = rehash(alice)
    assert said == [f"-- Reloaded {config}: changed rate 4.0 -> 2.0; idle-timeout 0.0 -> 3600.0; "
                    f"stall-timeout 30.0 -> 20.0.",
                        "-- Needs a restart: history-days 365.0 (after a restart: 10.0).",
                        "-- No message of the day."], shown(said)
    server.wait_for_log(r"WARNING reload \(/rehash by alice\): Reloaded .* Needs a restart: history-days")
    assert rehash(alice)[0] == f"-- Reloaded {config}: no option changed."


def test_a_server_without_a_configuration_file_still_reloads(start_server, connect):
    server = start_server(env=operator_env())
    alice = connect(server, "alice")
    make_operator(alice)
    assert rehash(alice) == ["-- Reloaded: no option changed.", "-- No message of the day."]


def test_irc_rehash_is_for_operators_and_answers_with_numerics_and_notices(tmp_path, start_server):
    config = write(tmp_path / "pychat.ini", "max-clients = 100\n")
    server = start_server("--config", str(config), "--irc-port", "0", env=operator_env())
    client = IrcClient(server.host, irc_port(server))
    try:
        client.register("alice")
        client.send("REHASH")
        client.expect(r"481 alice :Permission Denied")
        client.send(f"OPER alice {OP_SECRET}")
        client.expect(r"381 alice ")
        write(config, "max-clients = 50\n")
        client.send("REHASH")
        client.expect(rf"382 alice {re.escape(str(config))} :?Rehashing")
        assert client.expect(r"NOTICE alice :").endswith(
            f"NOTICE alice :Reloaded {config}: changed max-clients 100 -> 50."), shown(client.seen)
    finally:
        client.close()


def test_operators_named_in_the_file_are_made_and_unmade_by_a_reload(tmp_path, start_server, connect):
    config = write(tmp_path / "pychat.ini", "rate = 0\n")
    server = start_server("--config", str(config))
    alice = connect(server, "alice")
    alice.send("/register correct-horse-9")
    alice.expect(r"-- Registered ", timeout=10)
    write(config, "rate = 0\noperator = alice\n")
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log(r"reload \(SIGHUP\): Reloaded .*changed operator \(none\) -> alice")
    assert rehash(alice)[0] == f"-- Reloaded {config}: no option changed."
    write(config, "rate = 0\n")
    assert rehash(alice)[0] == f"-- Reloaded {config}: changed operator alice -> (none)."
    assert rehash(alice) == ["!! /rehash: not allowed; only operators may use it."]


@pytest.fixture(scope="module")
def two_certificates(tmp_path_factory) -> list[tuple[Path, Path]]:
    """Two self-signed certificates for localhost, each with its key: what a renewal replaces and its successor."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make throwaway certificates")
    folder = tmp_path_factory.mktemp("renewal")
    made = []
    for name in ("old", "new"):
        subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
                        "-subj", f"/CN=localhost {name}"], cwd=folder, check=True, capture_output=True, timeout=30)
        made.append((folder / f"{name}.pem", folder / f"{name}.key"))
    return made


def served_certificate(server) -> tuple[ssl.SSLSocket, bytes]:
    """A new TLS connection to SERVER and the certificate it was given (DER)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    sock = context.wrap_socket(socket.create_connection((server.host, server.port), timeout=TIMEOUT))
    return sock, sock.getpeercert(binary_form=True)


def der(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def test_a_renewed_certificate_goes_to_new_connections_and_connected_people_stay(tmp_path, start_server,
                                                                               two_certificates):
    (old_cert, old_key), (new_cert, new_key) = two_certificates
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    shutil.copy(old_cert, cert)
    shutil.copy(old_key, key)
    config = write(tmp_path / "pychat.ini", f"tls-cert = {cert}\ntls-key = {key}\n")
    server = start_server("--config", str(config))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    alice = LineClient(server.host, server.port, context)
    try:
        alice.login("alice")
        assert alice.sock.getpeercert(binary_form=True) == der(old_cert)
        shutil.copy(new_cert, cert)
        shutil.copy(new_key, key)
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log(rf"reload \(SIGHUP\): .*TLS certificate {re.escape(str(cert))} read again")
        sock, given = served_certificate(server)
        sock.close()
        assert given == der(new_cert), "a new connection was not given the renewed certificate"
        bob = LineClient(server.host, server.port, context)
        try:
            bob.login("bob")
            alice.send("still connected with the old certificate")
            bob.expect("alice: still connected with the old certificate")
        finally:
            bob.close()
        write(key, "-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log(r"ERROR reload \(SIGHUP\) failed; the settings stay as they were: .*privkey.pem")
        sock, given = served_certificate(server)
        sock.close()
        assert given == der(new_cert), "a broken key replaced the certificate in use"
    finally:
        alice.close()


# ---------------------------------------------------------------------------
# The log
# ---------------------------------------------------------------------------

def test_log_lines_are_one_event_each_with_the_time_in_utc_and_its_zone(start_server, connect):
    server = start_server("-v")
    connect(server, "alice").send("/rooms")
    server.wait_for_log(r"DEBUG .*/rooms|DEBUG .*rooms")
    lines = [line for line in server.log().splitlines() if not line.startswith("pyChat ")]
    assert lines and all(LOG_LINE.match(line) for line in lines), shown([l for l in lines if not LOG_LINE.match(l)])
    stamp = time.strptime(lines[0][:20], "%Y-%m-%dT%H:%M:%SZ")
    assert abs(time.mktime(stamp) - time.timezone - time.time()) < 60, f"{lines[0][:20]} is not now in UTC"


def wait_for_file_line(path: Path, pattern: str, timeout: float = TIMEOUT) -> str:
    """The file's text once a line matches PATTERN; fails with the text if none does in time."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if re.search(pattern, text, re.M):
            return text
        time.sleep(0.02)        # polling a file: there is nothing to wait on
    pytest.fail(f"{path} never had a line matching {pattern!r}; it holds:\n{text}")


def test_the_log_file_is_opened_again_at_a_reload_so_logrotate_works(tmp_path, start_server, connect):
    log_file = tmp_path / "pychat.log"
    server = start_server("--log-file", str(log_file))
    wait_for_file_line(log_file, r"INFO in memory \(no --data-dir\)")
    assert "in memory" not in server.log(), "the log went to standard error as well as to --log-file"
    rotated = log_file.rename(tmp_path / "pychat.log.1")
    server.process.send_signal(signal.SIGHUP)
    text = wait_for_file_line(log_file, r"reload \(SIGHUP\): Reloaded")
    assert all(LOG_LINE.match(line) for line in text.splitlines()), text
    connect(server, "alice")
    server.stop()
    wait_for_file_line(log_file, r"INFO stopped$")
    assert "reload" not in rotated.read_text() and "stopped" not in rotated.read_text(), rotated.read_text()


def test_a_log_file_that_cannot_be_opened_stops_the_start_with_one_line(tmp_path):
    done = run_server("--log-file", str(tmp_path / "missing" / "pychat.log"), "--port", "0")
    assert done.returncode == 1, done
    assert done.stderr == f"cannot start: {tmp_path / 'missing' / 'pychat.log'}: No such file or directory\n"


# ---------------------------------------------------------------------------
# Running as a service
# ---------------------------------------------------------------------------

def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_file_passes_systemd_analyze_verify():
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    done = subprocess.run([analyze, "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and UNIT.name not in done.stdout + done.stderr, done.stdout + done.stderr


def test_the_unit_has_a_dedicated_user_its_state_directory_reload_and_hardening():
    settings = unit_settings()
    for key, value in {"User": "pychat", "StateDirectory": "pychat", "ExecReload": "/bin/kill -HUP $MAINPID",
                       "NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ReadWritePaths": "/var/lib/pychat", "AmbientCapabilities": "CAP_NET_BIND_SERVICE"}.items():
        assert settings.get(key) == [value], f"{key}={settings.get(key)}, expected {value}"
    assert "data-dir = /var/lib/pychat" in EXAMPLE_CONFIG.read_text()


def test_the_server_runs_as_the_unit_runs_it_and_a_reload_keeps_it_running(tmp_path, start_server, connect):
    """ExecStart with the example configuration, its paths moved to a temporary directory and its ports to
    free ones (no certificate: TLS has its own test); then ExecReload's SIGHUP, and systemctl stop's SIGTERM."""
    start = shlex.split(unit_settings()["ExecStart"][0])
    assert start[:2] == ["/usr/bin/python3", "/opt/pychat/pyChat-server.py"], start
    options = start[2:]
    config = tmp_path / "pychat.ini"
    options[options.index("--config") + 1] = str(config)
    motd = write(tmp_path / "motd.txt", "Be kind.\n")
    text = EXAMPLE_CONFIG.read_text().replace("/var/lib/pychat", str(tmp_path / "data"))
    text = text.replace("/etc/pychat/motd.txt", str(motd))
    text = re.sub(r"^(port|irc-port) = \d+$", r"\1 = 0", text, flags=re.M)
    text = re.sub(r"^(tls-cert|tls-key) = ", r"# \1 = ", text, flags=re.M)
    write(config, text)
    server = start_server(*options)
    carol = connect(server, "carol")
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log(r"reload \(SIGHUP\): Reloaded .*pychat.ini: no option changed")
    carol.send("/motd")
    assert carol.expect("-- ") == "-- Be kind."
    assert server.stop() == 0, server.log()
    assert (tmp_path / "data" / "pychat.db").exists()
