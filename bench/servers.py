"""The servers under test: how to start each one on a loopback port, and how to watch it.

Every server is started fresh, listens on 127.0.0.1 only, writes its output to
a log file in a temporary directory, and is killed when the `with` block ends,
whatever happened inside it. Figures about the process (CPU, memory, threads,
open files) come from /proc, so they cost the server nothing.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
PYCHAT_SERVER = REPO / "pyChat-server.py"
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 3.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# No flood control, no connection limits, no history for newcomers, warnings only.
# History off (--history-days 0 keeps no line); the kind pychat-history measures it on.
PYCHAT_OPTIONS = {"--rate": "0", "--max-clients": "0", "--max-per-ip": "0", "--history": "0",
                  "--history-days": "0", "-q": None}

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
    """One server we know how to run: its protocol, how to start it, and what exactly it is.

    `start(kind, port, workdir)` returns the command line that makes it serve
    the benchmark's protocol on 127.0.0.1:port; `missing()` says why it cannot
    run here (None when it can); `describe()` names its version.
    """

    name: str
    protocol: str  # the load the generator speaks to it: "pychat", "irc" or "websocket" (IRC over WebSocket)
    install_hint: str
    start: Callable[[ServerKind, int, Path], list[str]]
    missing: Callable[[], str | None]
    describe: Callable[[], str]
    notes: list[str] = field(default_factory=list)
    scenarios: tuple[str, ...] = ()     # the only scenarios it is measured in; () for all

    def command(self, port: int, workdir: Path) -> list[str]:
        return self.start(self, port, workdir)

    def version(self) -> str:
        return self.describe()


def pychat_missing() -> str | None:
    return None if PYCHAT_SERVER.exists() else f"{PYCHAT_SERVER} not found"


def pychat_irc_missing() -> str | None:
    """pyChat's IRC port is measured once the server lists --irc-port in its --help."""
    return pychat_missing() or (None if "--irc-port" in pychat_help() else
                                "this pyChat-server.py has no --irc-port yet")


def pychat_version() -> str:
    """pyChat's last commit, and whether the file has changed since."""
    try:
        log = subprocess.run(["git", "log", "-1", "--format=%h %cd", "--date=format:%Y-%m-%d %H:%M",
                              "--", PYCHAT_SERVER.name], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", PYCHAT_SERVER.name],
                               cwd=REPO, capture_output=True)
    except OSError:
        return "pyChat-server.py (no git here)"
    commit = log.stdout.strip() or "not in git"
    version = f"pyChat-server.py {commit}" + (" + uncommitted changes" if dirty.returncode else "")
    if PYCHAT_CONSTANTS:
        version += " with " + ", ".join(f"{name}={value!r}" for name, value in PYCHAT_CONSTANTS.items())
    return version


def pychat_start(kind: ServerKind, port: int, workdir: Path) -> list[str]:
    return [*pychat_interpreter(), "--host", HOST, "--port", str(port), *pychat_options(kind.notes)]


def pychat_history_start(kind: ServerKind, port: int, workdir: Path) -> list[str]:
    """pyChat keeping every line in its database in a data directory of its own, as a community server
    would (a year of history; none replayed, as for the others)."""
    return [*pychat_start(kind, port, workdir), "--history-days", "365", "--data-dir", str(workdir / "data")]


def pychat_irc_start(kind: ServerKind, port: int, workdir: Path) -> list[str]:
    """pyChat with its IRC port on `port` (the load goes there); its own port is any free one. No room is
    joined for the client at sign-in (--irc-auto-join ""): it joins the one it asks for, as at ngircd."""
    return [*pychat_interpreter(), "--host", HOST, "--port", "0", "--irc-port", str(port),
            *pychat_irc_options(kind.notes)]


def pychat_web_start(kind: ServerKind, port: int, workdir: Path) -> list[str]:
    """pyChat with its web port on `port` (the load goes to its WebSocket); its own port is any free one."""
    return [*pychat_interpreter(), "--host", HOST, "--port", "0", "--web-port", str(port),
            *pychat_irc_options(kind.notes)]


def pychat_irc_options(notes: list[str]) -> list[str]:
    """The options of pyChat under the IRC load: PYCHAT_OPTIONS, and no room joined at sign-in."""
    return pychat_options(notes) + (["--irc-auto-join", ""] if "--irc-auto-join" in pychat_help() else [])


def ngircd_start(kind: ServerKind, port: int, workdir: Path) -> list[str]:
    config = workdir / "ngircd.conf"
    config.write_text(ngircd_config(port))
    return [ngircd_binary(), "-n", "-f", str(config)]


def ngircd_version() -> str:
    result = subprocess.run([ngircd_binary(), "--version"], capture_output=True, text=True)
    return result.stdout.splitlines()[0].split("-")[0] if result.stdout else "ngircd"


def miniircd_start(kind: ServerKind, port: int, workdir: Path) -> list[str]:
    command = [*miniircd_command(), "--ports", str(port), "--listen", HOST, "--verbose"]
    if os.geteuid() == 0:
        command += ["--setuid", "nobody"]
    return command


def miniircd_version() -> str:
    result = subprocess.run([*miniircd_command(), "--version"], capture_output=True, text=True)
    return f"miniircd {(result.stdout + result.stderr).strip()}"


WITHOUT_SESSIONS = ("connect", "fanout", "fanout-async", "max", "slow", "bigroom")

SERVER_KINDS = {kind.name: kind for kind in (
    # Several sessions of a person are measured at the IRC and browser doors, where the load signs in
    # to accounts (REGISTER, SASL): not here, nor at the IRC servers, which keep no accounts.
    ServerKind("pychat", "pychat", "it is pyChat-server.py at the top of this repository",
               pychat_start, pychat_missing, pychat_version, scenarios=WITHOUT_SESSIONS),
    ServerKind("ngircd", "irc", "apt-get update && apt-get install -y ngircd",
               ngircd_start, lambda: None if ngircd_binary() else "ngircd not installed", ngircd_version,
               scenarios=WITHOUT_SESSIONS),
    # Not in the big room: select() takes no descriptor past 1,023, and the room has 2,000 people.
    ServerKind("miniircd", "irc", "python3 -m pip install miniircd",
               miniircd_start, lambda: None if miniircd_command() else "miniircd not installed",
               miniircd_version, scenarios=("connect", "fanout", "fanout-async", "max", "slow")),
    # pyChat's own IRC front door, driven with exactly the load ngircd and miniircd get.
    ServerKind("pychat-irc", "irc", "it comes with a pyChat-server.py that has --irc-port",
               pychat_irc_start, pychat_irc_missing, pychat_version),
    # pyChat's browser door: the same IRC load over WebSocket frames, beside pychat-irc.
    ServerKind("pychat-web", "websocket", "it comes with a pyChat-server.py that has --web-port",
               pychat_web_start, lambda: pychat_missing() or (None if "--web-port" in pychat_help()
                                                                else "this pyChat-server.py has no --web-port yet"),
               pychat_version),
    # pyChat with history on, beside pychat (history off), where the cost of keeping lines shows.
    ServerKind("pychat-history", "pychat", "it comes with a pyChat-server.py that has --history-days",
               pychat_history_start, lambda: pychat_missing() or (None if "--history-days" in pychat_help()
                                                                   else "this pyChat-server.py keeps no history"),
               pychat_version, scenarios=("fanout",)),
)}

# Module constants of pyChat-server.py to override for a run (bench.py --pychat-constant),
# to measure what a setting does without editing the server.
PYCHAT_CONSTANTS: dict[str, object] = {}

# Loads pyChat-server.py as a module, overrides its constants, and runs its main().
PYCHAT_LAUNCHER = """\
import ast, importlib.util, sys
path, constants = sys.argv[1], ast.literal_eval(sys.argv[2])
sys.path.insert(0, path.rsplit("/", 1)[0])
spec = importlib.util.spec_from_file_location("pychat_server", path)
server = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(server)
for name, value in constants.items():
    if not hasattr(server, name):
        sys.exit(f"pyChat-server.py has no constant {name}")
    setattr(server, name, value)
sys.exit(server.main(sys.argv[3:]))
"""


def pychat_module():
    """pyChat-server.py imported as a module, for what the benchmark measures without a server running."""
    if "pychat_server" not in sys.modules:
        sys.path.insert(0, str(PYCHAT_SERVER.parent))
        spec = importlib.util.spec_from_file_location("pychat_server", PYCHAT_SERVER)
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["pychat_server"]


def pychat_interpreter() -> list[str]:
    """How to start pyChat-server.py: directly, or through the launcher when constants are overridden."""
    if not PYCHAT_CONSTANTS:
        return [sys.executable, str(PYCHAT_SERVER)]
    return [sys.executable, "-c", PYCHAT_LAUNCHER, str(PYCHAT_SERVER), repr(PYCHAT_CONSTANTS)]


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


def pychat_help() -> str:
    """pyChat-server.py --help, asked once."""
    global _pychat_help
    if _pychat_help is None:
        result = subprocess.run([sys.executable, str(PYCHAT_SERVER), "--help"],
                                capture_output=True, text=True, timeout=30)
        _pychat_help = result.stdout + result.stderr
    return _pychat_help


def pychat_options(notes: list[str]) -> list[str]:
    """PYCHAT_OPTIONS, less any option this pyChat-server.py does not list in --help (noted)."""
    options = []
    for name, value in PYCHAT_OPTIONS.items():
        if name in pychat_help():
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


MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ (\S+) \S+ \S+ \d+ *(.*)$")


def memory_map(pid: int) -> dict[str, int]:
    """A process's resident memory by kind, from /proc/PID/smaps (bytes; empty once it is gone).

    "stacks": thread stacks, recognised as the anonymous read-write mappings of
    the one size that at least half the threads have (glibc gives each thread
    one, behind a guard page); "anonymous": the heap and every other anonymous
    mapping (Python objects, malloc arenas, buffers); "files": the interpreter,
    libraries and other mapped files. Also "stack_count" and "stack_size".
    """
    mappings = []
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                header = MAPPING.match(line)
                if header:
                    mappings.append([header.group(1), header.group(2), 0, 0])
                elif line.startswith("Size:"):
                    mappings[-1][2] = int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    mappings[-1][3] = int(line.split()[1]) * 1024
        threads = process_status(pid)["threads"] or 1
    except OSError:
        return {}
    if not mappings:  # a zombie: nothing left to count
        return {}
    anonymous = [(size, rss) for perms, path, size, rss in mappings
                 if perms.startswith("rw") and (not path or path == "[heap]")]
    sizes = Counter(size for size, _ in anonymous)
    stack_size, count = sizes.most_common(1)[0] if sizes else (0, 0)
    if count < max(8, threads // 2):
        stack_size, count = 0, 0
    stacks = sum(rss for size, rss in anonymous if size == stack_size)
    return {
        "stacks": stacks,
        "stack_count": count,
        "stack_size": stack_size,
        "anonymous": sum(rss for _, rss in anonymous) - stacks,
        "files": sum(rss for perms, path, size, rss in mappings if path.startswith("/")),
    }


def kernel_memory() -> int:
    """Kernel slab plus TCP buffer memory, machine-wide (bytes): where a socket's kernel side lives."""
    with open("/proc/meminfo") as meminfo:
        slab = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("Slab:"))
    with open("/proc/net/sockstat") as sockstat:
        fields = next(line.split() for line in sockstat if line.startswith("TCP:"))
    pages = int(fields[fields.index("mem") + 1])
    return slab + pages * os.sysconf("SC_PAGE_SIZE")


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


class SendCounter:
    """How many system calls a process makes to send, counted by the kernel's tracepoints through
    `perf stat` from now until stop(): what tells a reader how many deliveries each one carried. The
    servers send with send(), write(), writev() or sendmsg(); all four are counted (a log line is a
    write too, a few in a run). Counting costs the process about as much for every server measured."""

    EVENTS = ",".join(f"syscalls:sys_enter_{call}" for call in ("sendto", "write", "writev", "sendmsg"))
    ATTACH_S = 0.1      # perf counts once it has attached, a moment after it starts

    def __init__(self, pid: int):
        self.output = tempfile.NamedTemporaryFile(prefix="bench-perf-", suffix=".csv")
        perf = shutil.which("perf")
        self.process = None
        if perf is None:
            return
        try:
            self.process = subprocess.Popen([perf, "stat", "-x", ",", "-e", self.EVENTS, "-p", str(pid),
                                             "-o", self.output.name], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
        except OSError:
            self.process = None
            return
        time.sleep(self.ATTACH_S)

    def stop(self) -> int | None:
        """The send calls counted, or None where perf cannot count them here (not installed, no
        permission to trace, no tracepoints in this kernel)."""
        if self.process is None:
            self.output.close()
            return None
        try:
            if self.process.poll() is not None:
                return None
            self.process.send_signal(signal.SIGINT)
            self.process.wait(STOP_TIMEOUT_S)
            counts = [line.split(",")[0] for line in Path(self.output.name).read_text().splitlines()
                      if "syscalls:" in line]
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            return None
        finally:
            self.output.close()
        if len(counts) != 4 or not all(count.isdigit() for count in counts):
            return None
        return sum(map(int, counts))
