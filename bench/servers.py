"""The servers under test: how to start each one on a loopback port, and how to watch it.

Every server is started fresh, listens on 127.0.0.1 only, writes its output to
a log file in a temporary directory, and is killed when the `with` block ends,
whatever happened inside it. Figures about the process (CPU, memory, threads,
open files) come from /proc, so they cost the server nothing.
"""
from __future__ import annotations

import os
import platform
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
PYCHAT_SERVER = REPO / "pyChat-server.py"
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 3.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# No flood control, no connection limits, no history for newcomers, warnings only.
PYCHAT_OPTIONS = {"--rate": "0", "--max-clients": "0", "--max-per-ip": "0", "--history": "0", "-q": None}

NGIRCD_CONFIG = """\
[Global]
Name = bench.pychat.test
Info = pyChat benchmark reference server
Listen = {host}
Ports = {port}
MotdPhrase = bench
{uid_lines}
[Limits]
MaxConnections = 0
MaxConnectionsIP = 0
MaxJoins = 1000
MaxNickLength = 20
PingTimeout = 3600
PongTimeout = 3600
{penalty_line}
[Options]
DNS = no
Ident = no
PAM = no
"""


@dataclass
class ServerKind:
    """One server we know how to run: its protocol and how to start it."""

    name: str
    protocol: str  # "pychat" or "irc"
    install_hint: str
    notes: list[str] = field(default_factory=list)

    def missing(self) -> str | None:
        """Why this server cannot run here, or None when it can."""
        if self.name == "pychat":
            return None if PYCHAT_SERVER.exists() else f"{PYCHAT_SERVER} not found"
        if self.name == "ngircd":
            return None if ngircd_binary() else "ngircd not installed"
        if self.name == "miniircd":
            return None if miniircd_command() else "miniircd not installed"
        return f"unknown server {self.name}"

    def version(self) -> str:
        """What exactly is measured: the program's version, or pyChat's last commit."""
        if self.name == "pychat":
            try:
                log = subprocess.run(["git", "log", "-1", "--format=%h %cd", "--date=format:%Y-%m-%d %H:%M",
                                      "--", PYCHAT_SERVER.name], cwd=REPO, capture_output=True, text=True)
                dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", PYCHAT_SERVER.name],
                                       cwd=REPO, capture_output=True)
            except OSError:
                return "pyChat-server.py (no git here)"
            commit = log.stdout.strip() or "not in git"
            return f"pyChat-server.py {commit}" + (" + uncommitted changes" if dirty.returncode else "")
        if self.name == "ngircd":
            result = subprocess.run([ngircd_binary(), "--version"], capture_output=True, text=True)
            return result.stdout.splitlines()[0].split("-")[0] if result.stdout else "ngircd"
        result = subprocess.run([*miniircd_command(), "--version"], capture_output=True, text=True)
        return f"miniircd {(result.stdout + result.stderr).strip()}"

    def command(self, port: int, workdir: Path) -> list[str]:
        """The command line that starts this server on 127.0.0.1:port."""
        if self.name == "pychat":
            return [sys.executable, str(PYCHAT_SERVER), "--host", HOST, "--port", str(port),
                    *pychat_options(self.notes)]
        if self.name == "ngircd":
            config = workdir / "ngircd.conf"
            config.write_text(ngircd_config(port))
            return [ngircd_binary(), "-n", "-f", str(config)]
        command = [*miniircd_command(), "--ports", str(port), "--listen", HOST, "--verbose"]
        if os.geteuid() == 0:
            command += ["--setuid", "nobody"]
        return command


SERVER_KINDS = {
    "pychat": ServerKind("pychat", "pychat", "it is pyChat-server.py at the top of this repository"),
    "ngircd": ServerKind("ngircd", "irc", "apt-get update && apt-get install -y ngircd"),
    "miniircd": ServerKind("miniircd", "irc", "python3 -m pip install miniircd"),
}


def machine() -> str:
    """Cores, CPU model, Python and kernel of this machine, for the record."""
    model = "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, "
            f"Linux {platform.release()}")


def ngircd_binary() -> str | None:
    """Path of the ngircd executable, if installed."""
    return shutil.which("ngircd") or next(
        (p for p in ("/usr/sbin/ngircd", "/usr/local/sbin/ngircd") if os.access(p, os.X_OK)), None)


def miniircd_command() -> list[str] | None:
    """How to start miniircd with this Python, if it is installed."""
    probe = subprocess.run([sys.executable, "-c", "import miniircd"], capture_output=True)
    if probe.returncode == 0:
        return [sys.executable, "-m", "miniircd"]
    script = shutil.which("miniircd")
    return [sys.executable, script] if script else None


_ngircd_penalty_supported: bool | None = None


def ngircd_config(port: int) -> str:
    """An ngircd.conf with every connection and flood limit lifted."""
    global _ngircd_penalty_supported
    uid_lines = ""
    if os.geteuid() == 0:
        # ngircd drops root by itself; name an account that exists here.
        nobody = pwd.getpwnam("nobody")
        uid_lines = f"ServerUID = {nobody.pw_uid}\nServerGID = {nobody.pw_gid}\n"
    text = NGIRCD_CONFIG.format(host=HOST, port=port, uid_lines=uid_lines,
                                penalty_line="MaxPenaltyTime = 0")
    if _ngircd_penalty_supported is None:
        # Older ngircd releases do not know MaxPenaltyTime; ask this one.
        with tempfile.NamedTemporaryFile("w", suffix=".conf") as probe:
            probe.write(text)
            probe.flush()
            check = subprocess.run([ngircd_binary(), "--configtest", "-f", probe.name],
                                   capture_output=True, text=True, input="")
        _ngircd_penalty_supported = "MaxPenaltyTime = 0" in check.stdout + check.stderr
        if not _ngircd_penalty_supported:
            SERVER_KINDS["ngircd"].notes.append("this ngircd has no MaxPenaltyTime")
    if not _ngircd_penalty_supported:
        text = text.replace("MaxPenaltyTime = 0", "")
    return text


_pychat_help: str | None = None


def pychat_options(notes: list[str]) -> list[str]:
    """PYCHAT_OPTIONS, less any option this pyChat-server.py does not list in --help (noted)."""
    global _pychat_help
    if _pychat_help is None:
        result = subprocess.run([sys.executable, str(PYCHAT_SERVER), "--help"],
                                capture_output=True, text=True, timeout=30)
        _pychat_help = result.stdout + result.stderr
    options = []
    for name, value in PYCHAT_OPTIONS.items():
        if name in _pychat_help:
            options += [name] if value is None else [name, value]
        elif f"server has no {name}" not in notes:
            notes.append(f"server has no {name}")
    return options


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class RunningServer:
    """A server process started for one run; use it as a context manager."""

    def __init__(self, kind: ServerKind):
        self.kind = kind
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bench-{kind.name}-"))
        self.log_path = self.workdir / "server.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> RunningServer:
        command = self.kind.command(self.port, self.workdir)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, cwd=self.workdir,
                                            start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self) -> None:
        """Return once the server accepts a TCP connection (bounded by READY_TIMEOUT_S)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.kind.name} exited at start: {self.log_tail()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"{self.kind.name} did not accept connections within {READY_TIMEOUT_S} s")

    def stop(self) -> None:
        """Terminate the process (kill it if it lingers) and remove the temporary files."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 5) -> str:
        return " | ".join(self.log_text().strip().splitlines()[-lines:])

    def cpu_seconds(self) -> float | None:
        """User plus system CPU time the server has used so far (None if it died)."""
        return process_cpu_seconds(self.pid)

    def status(self) -> dict[str, int | None]:
        """VmRSS (bytes) and Threads from /proc/PID/status."""
        return process_status(self.pid)

    def open_files(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return 0

    def connection_state(self, client_port: int) -> tuple[str, int]:
        """TCP state and kernel send queue (bytes) of the server's end of the connection from client_port."""
        return tcp_state((HOST, self.port), (HOST, client_port))


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of a process; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name may hold spaces; the fields we want follow its ')'.
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] == "Z":
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_status(pid: int) -> dict[str, int | None]:
    """VmRSS in bytes and Threads; None for both once the process is gone."""
    result = {"rss": None, "threads": None}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    result["rss"] = int(line.split()[1]) * 1024
                elif line.startswith("Threads:"):
                    result["threads"] = int(line.split()[1])
    except OSError:
        pass
    return result


def listen_overflows() -> int:
    """The kernel's ListenOverflows counter (TcpExt), for the whole machine."""
    with open("/proc/net/netstat") as netstat:
        rows = [line.split() for line in netstat if line.startswith("TcpExt:")]
    names, values = rows[0], rows[1]
    return int(values[names.index("ListenOverflows")])


TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
              "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
              "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING"}


def tcp_state(local: tuple[str, int], remote: tuple[str, int]) -> tuple[str, int]:
    """State and send-queue bytes of the IPv4 TCP socket local->remote ("gone", 0 if there is none)."""
    def encode(address: tuple[str, int]) -> str:
        packed = socket.inet_aton(address[0])[::-1].hex().upper()
        return f"{packed}:{address[1]:04X}"

    wanted = (encode(local), encode(remote))
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if (fields[1], fields[2]) == wanted:
                send_queue = int(fields[4].split(":")[0], 16)
                return TCP_STATES.get(fields[3], fields[3]), send_queue
    return "gone", 0
