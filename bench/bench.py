"""Benchmark pyChat against ngircd and miniircd on this machine, side by side.

    python3 bench/bench.py                 # everything, about 10 minutes
    python3 bench/bench.py --quick         # a few seconds, pyChat only (CI)

Each server is started fresh on a free port of 127.0.0.1 for every run and
driven by a load generator of a few processes (see loadgen.py). Results are
printed as tables, then checked against the targets, then printed again as one
JSON line each. See bench/README.md for what every scenario and column means.
"""
from __future__ import annotations

import argparse
import ast
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import servers
from loadgen import FAILED, READY, Swarm, percentile, raise_file_limit
from servers import (SERVER_KINDS, RunningServer, SendCounter, kernel_memory, listen_overflows, machine,
                     memory_map, process_cpu_seconds)

MIB = 1024 * 1024
KIB = 1024
IN_FLIGHT_CONNECTS = 50  # connection attempts signing in at once in `connect` (issue 12)
# Elsewhere sign-in is only the set-up: fewer at once stay under the listen backlogs of
# ngircd (10) and miniircd (5), whose overflows would cost seconds of SYN retries.
IN_FLIGHT_SETUP = 4
SATURATED_PCT = 90.0  # a generator process above this share of a core may be what limits a figure
BUSY_PCT = 5.0  # a server above this share of a core in a quarter second is not idle
GENERATORS = 2  # generator processes: on 2 cores, two share the load and leave room for the server
ASYNC_GENERATOR = Path(__file__).with_name("asyncgen.py")   # the other load shape: one asyncio process


@dataclass
class Plan:
    """How big and how long each scenario is."""

    # Runs per case; each figure is their median. connect and slow run once by
    # default: a 10,000-client run or a stall that must be noticed costs 10-40 s
    # per server, and the whole default run has to stay under five minutes.
    runs: dict = field(default_factory=lambda: {"connect": 1, "fanout": 3, "max": 3, "slow": 1,
                                                "fanout-async": 1, "bigroom": 1, "sessions": 1})
    generators: int = GENERATORS
    connect_sizes: tuple = (2000, 10000)
    connect_timeout_s: float = 15.0
    leave_timeout_s: float = 15.0
    cpu_slice_s: float = 0.25  # after everyone leaves, server CPU is sampled this often...
    quiet_watch_s: float = 3.0  # ...for at least this long...
    idle_window_s: float = 1.0  # ...and until it has been idle this long
    fanout_cases: tuple = ((50, 50), (200, 20))  # (clients, senders)
    fanout_rate: float = 2000.0  # lines per second, all senders together
    traffic_seconds: float = 1.5
    drain_timeout_s: float = 5.0
    max_clients: int = 50
    max_window: int = 4
    slow_before_s: float = 2.0
    slow_with_s: float = 6.0  # at least this long with the stalled client...
    slow_with_max_s: float = 20.0  # ...and on until the server cuts it off, or this long
    slow_rcvbuf: int = 4096
    memory_sample_s: float = 0.25
    history_lines: int = 1_000_000  # lines in the database the history queries are timed on
    # The asyncio generator's runs: long enough that CPU counted in clock ticks is counted finely.
    async_seconds: float = 10.0
    # The big room: members who stay, of whom SENDERS say RATE lines a second in all, while CHURN people
    # join and CHURN leave each second.
    bigroom: tuple = (2000, 20, 20.0, 20)   # (members, senders, rate, churn)
    # People with several sessions each, against as many people with one: (people, sessions each,
    # senders, rate). Every session checks a password (about 50 ms), so the people are few.
    sessions: tuple = (100, 3, 30, 150.0)


QUICK_PLAN = Plan(runs={"connect": 1, "fanout": 1, "max": 1, "slow": 1, "fanout-async": 1, "bigroom": 1,
                        "sessions": 1},
                  connect_sizes=(50,), async_seconds=1.0, bigroom=(40, 4, 20.0, 4), sessions=(4, 3, 2, 40.0),
                  quiet_watch_s=0.25, idle_window_s=0.25, fanout_cases=((10, 10),), fanout_rate=200.0,
                  traffic_seconds=0.5, drain_timeout_s=3.0, max_clients=10,
                  slow_before_s=0.5, slow_with_s=0.75, slow_with_max_s=0.75, history_lines=20_000)

# Figures where any run's bad news must show: summed over runs, not a median.
SUMMED = {"lost", "malformed", "duplicates", "gaps", "failed", "dropped", "expected", "deliveries"}


def median_or_none(values: list):
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def combine(runs: list[dict]) -> dict:
    """One result from several runs: medians, except SUMMED counts and flags (any); text from the last run."""
    combined = {}
    for key in runs[0]:
        values = [run.get(key) for run in runs]
        if isinstance(values[0], dict):
            combined[key] = combine(values)
        elif isinstance(values[0], bool):
            combined[key] = any(values)
        elif isinstance(values[0], (int, float)):
            combined[key] = sum(v for v in values if v is not None) if key in SUMMED else median_or_none(values)
        elif isinstance(values[0], list) and key == "generator_cpu_pct":
            combined[key] = [median_or_none(list(column)) for column in zip(*values)]
        else:
            combined[key] = values[-1]
    return combined


class Measure:
    """Server CPU and every generator process's CPU over a stretch of wall time."""

    def __init__(self, server: RunningServer, swarm: Swarm):
        self.server = server
        self.pids = swarm.pids
        self.wall = time.perf_counter()
        self.server_cpu = server.cpu_seconds()
        self.generator_cpu = [process_cpu_seconds(pid) for pid in self.pids]
        self.sends = SendCounter(server.pid)

    def figures(self) -> dict:
        wall = max(time.perf_counter() - self.wall, 1e-6)
        server_cpu = self.server.cpu_seconds()
        server_s = None if server_cpu is None or self.server_cpu is None else server_cpu - self.server_cpu
        generators = []
        for pid, before in zip(self.pids, self.generator_cpu):
            after = process_cpu_seconds(pid)
            generators.append(None if after is None or before is None else 100 * (after - before) / wall)
        return {
            "server_cpu_s": server_s,
            "server_cpu_pct": None if server_s is None else 100 * server_s / wall,
            "generator_cpu_pct": generators,
            "generator_saturated": any(pct is not None and pct > SATURATED_PCT for pct in generators),
            "server_sends": self.sends.stop(),
        }


def mib(size: int | None) -> float | None:
    return None if size is None else size / MIB


def per_million(cpu_s: float | None, count: int) -> float | None:
    """Server CPU-seconds per million of something: how efficient, as opposed to how fast."""
    return cpu_s * 1e6 / count if cpu_s is not None and count else None


def per_send(deliveries: int, sends: int | None) -> float | None:
    """Deliveries a send system call of the server's carried: why its CPU per delivery is what it is."""
    return deliveries / sends if sends else None


def sign_in_failures(records: list) -> dict:
    """How many clients never signed in, how many were dropped later, and why."""
    failed = [record for record in records if record.sign_in_s is None]
    dropped = [record for record in records if record.sign_in_s is not None and record.state == FAILED]
    reasons = sorted({record.failure for record in failed + dropped if record.failure})
    return {"failed": len(failed), "dropped": len(dropped), "failure": "; ".join(reasons[:3])}


def memory_per_connection(before: dict, after: dict, kernel_before: int, kernel_after: int,
                          connections: int) -> dict:
    """What each idle connection costs, by kind (KiB): see servers.memory_map.

    The kernel figure is machine-wide (slab and TCP buffers) and covers both
    ends of every connection, the generator's and the server's, so half of it
    is counted; other work on the machine shows in it too.
    """
    if not connections or not before or not after:
        return {}
    per = {kind: (after[kind] - before[kind]) / connections / KIB for kind in ("stacks", "anonymous", "files")}
    per["kernel"] = (kernel_after - kernel_before) / 2 / connections / KIB
    per["stack_size_kib"] = after["stack_size"] / KIB if after["stack_count"] else None
    return per


def watch_leaving(server: RunningServer, files_before: int, plan: Plan, hang_up) -> dict:
    """Everyone hangs up (hang_up()): when has the server closed their sockets, and when is its CPU back near zero?

    Server CPU is sampled every plan.cpu_slice_s; a slice above BUSY_PCT of a
    core is busy. Watching goes on for at least plan.quiet_watch_s and until
    plan.idle_window_s have passed without a busy slice (at most leave_timeout_s).
    """
    left = time.perf_counter()
    sample_at, cpu_at = left, server.cpu_seconds()
    hang_up()
    slices = []  # (seconds since they left, CPU % of one core) per slice
    leave_s, last_busy = None, 0.0
    while server.alive() and cpu_at is not None:
        time.sleep(plan.cpu_slice_s)
        now, cpu = time.perf_counter(), server.cpu_seconds()
        if cpu is None:
            break
        since = now - left
        slices.append((since, 100 * (cpu - cpu_at) / (now - sample_at)))
        sample_at, cpu_at = now, cpu
        if slices[-1][1] > BUSY_PCT:
            last_busy = since
        if leave_s is None and server.open_files() <= files_before:
            leave_s = since
        if since >= plan.leave_timeout_s:
            break
        if leave_s is not None and since >= plan.quiet_watch_s and since - last_busy >= plan.idle_window_s:
            break
    idle = [pct for since, pct in slices if since > (slices[-1][0] - plan.idle_window_s)] if slices else []
    if not slices:  # the server is gone: nothing to say about how it left
        return {"leave_s": None, "all_left": False, "quiet_after_s": None, "idle_cpu_pct": None}
    return {
        "leave_s": leave_s if leave_s is not None else time.perf_counter() - left,
        "all_left": leave_s is not None,
        "quiet_after_s": last_busy,
        "idle_cpu_pct": statistics.mean(idle) if idle else None,
        "cpu_pct_after_leaving": [round(pct, 1) for _, pct in slices],
    }


def connect_run(server: RunningServer, size: int, plan: Plan) -> dict:
    """Sign in `size` clients, then everyone leaves; see README: connect."""
    with Swarm(server.kind.protocol, server.port, plan.generators, server.pid) as swarm:
        files_before = server.open_files()
        rss_before = server.status()["rss"]
        map_before, kernel_before = memory_map(server.pid), kernel_memory()
        overflows_before = listen_overflows()
        measure = Measure(server, swarm)
        records = swarm.connect(size, IN_FLIGHT_CONNECTS, plan.connect_timeout_s)
        usage = measure.figures()
        elapsed = time.perf_counter() - measure.wall
        overflows = listen_overflows() - overflows_before
        status = server.status()
        map_after, kernel_after = memory_map(server.pid), kernel_memory()
        signed_in = sorted(record.sign_in_s for record in records if record.sign_in_s is not None)
        failures = sign_in_failures(records)
        leaving = watch_leaving(server, files_before, plan, swarm.close_clients)
    growth = status["rss"] - rss_before if status["rss"] is not None and rss_before is not None else None
    return {
        "clients": size,
        "signed_in": len(signed_in),
        **failures,
        "seconds": elapsed,
        "sign_in_ms": {name: percentile(signed_in, fraction) * 1000 if signed_in else None
                       for name, fraction in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
        "listen_overflows": overflows,
        "rss_mib": mib(status["rss"]),
        "threads": status["threads"],
        "kib_per_connection": growth / len(signed_in) / KIB if growth is not None and signed_in else None,
        "memory_per_connection_kib": memory_per_connection(map_before, map_after, kernel_before,
                                                           kernel_after, len(signed_in)),
        **leaving,
        **usage,
        "server_cpu_ms_per_sign_in": 1000 * usage["server_cpu_s"] / len(signed_in)
        if signed_in and usage["server_cpu_s"] is not None else None,
    }


def start_traffic(server: RunningServer, swarm: Swarm, clients_count: int, senders_count: int,
                  plan: Plan, rate: float = 0.0, window: int = 0) -> None:
    """Sign clients in and set up (not start) their traffic."""
    records = swarm.connect(clients_count, IN_FLIGHT_SETUP, plan.connect_timeout_s)
    swarm.settle(0.2, 5.0)  # the join notices are out before the clock starts
    ready = [record.ident for record in swarm.records() if record.state == READY]
    if len(ready) < 2 or len(ready) < senders_count:
        raise RuntimeError(f"only {len(ready)} of {clients_count} clients signed in: "
                           f"{sign_in_failures(records)['failure']}")
    swarm.set_traffic(ready[:senders_count], ready, rate=rate, window=window)


def traffic_run(server: RunningServer, clients_count: int, senders_count: int, plan: Plan,
                rate: float = 0.0, window: int = 0) -> dict:
    """Fanout (paced by rate) or max (paced by window): see README."""
    with Swarm(server.kind.protocol, server.port, plan.generators, server.pid) as swarm:
        start_traffic(server, swarm, clients_count, senders_count, plan, rate, window)
        measure = Measure(server, swarm)
        start_us = swarm.start_traffic()
        time.sleep(max(0.0, (start_us - swarm.now_us()) / 1e6 + plan.traffic_seconds))
        end_us = swarm.stop_traffic(plan.drain_timeout_s)
        usage = measure.figures()
        summary = swarm.summary(start_us, end_us)
        status = server.status()
        failures = sign_in_failures(swarm.records())
    return {
        "clients": clients_count,
        "senders": senders_count,
        **failures,
        **summary,
        "rss_mib": mib(status["rss"]),
        **usage,
        "server_cpu_s_per_m": per_million(usage["server_cpu_s"], summary["delivered"]),
        "deliveries_per_send": per_send(summary["delivered"], usage["server_sends"]),
    }


def async_run(server: RunningServer, plan: Plan, clients: int, senders: int, rate: float, churn: int = 0,
              sessions: int = 0) -> dict:
    """A room driven by asyncgen.py, every client in one asyncio process; with CHURN, people come and go;
    with SESSIONS, each of the clients is a person with an account, signed in that many times (see README:
    Two load shapes, The big room, Several sessions)."""
    command = [sys.executable, str(ASYNC_GENERATOR), server.kind.protocol, str(server.port),
               "--server-pid", str(server.pid), "--clients", str(clients), "--senders", str(senders),
               "--rate", str(rate), "--seconds", str(plan.async_seconds), "--churn", str(churn),
               *(("--accounts", "--sessions", str(sessions)) if sessions else ())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=plan.async_seconds + 180)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        raise RuntimeError(f"asyncgen.py failed: {done.stderr.strip()[-300:]}")
    result = json.loads(lines[-1])
    if "error" in result:
        raise RuntimeError(result["error"])
    status = server.status()
    return {
        **result,
        "rss_mib": mib(status["rss"]),
        "generator_saturated": result["generator_cpu_pct"][0] > SATURATED_PCT,
        # Every delivery counts, the joins and leaves of the big room too: they are the work it does.
        "server_cpu_s_per_m": per_million(result["server_cpu_s"], result["all_deliveries"]),
        "deliveries_per_send": per_send(result["all_deliveries"], result["server_sends"]),
    }


def slow_run(server: RunningServer, plan: Plan) -> dict:
    """The 50x50 fanout, then the same with one client that stops reading."""
    clients_count, senders_count = plan.fanout_cases[0]
    with Swarm(server.kind.protocol, server.port, plan.generators, server.pid) as swarm:
        start_traffic(server, swarm, clients_count, senders_count, plan, rate=plan.fanout_rate)
        measure = Measure(server, swarm)
        start_us = swarm.start_traffic()
        time.sleep(max(0.0, (start_us - swarm.now_us()) / 1e6 + plan.slow_before_s))
        before_end = swarm.now_us()
        stalled = swarm.connect(1, 1, 10.0, rcvbuf=plan.slow_rcvbuf, stall=True)[0]
        with_start = swarm.now_us()
        rss_start = server.status()["rss"]
        memory, closed_after, send_queue = [], None, 0
        started = time.perf_counter()
        while True:
            elapsed = time.perf_counter() - started
            if elapsed >= plan.slow_with_max_s or (elapsed >= plan.slow_with_s and closed_after is not None):
                break
            time.sleep(min(plan.memory_sample_s, plan.slow_with_max_s - elapsed))
            rss = server.status()["rss"]
            if rss is not None:
                memory.append(rss)
            if stalled.sign_in_s is None:
                continue  # it never got in: there is nothing to watch
            state, queued = server.connection_state(stalled.local_port)
            if state == "ESTABLISHED":
                send_queue = queued
            elif closed_after is None:
                closed_after = time.perf_counter() - started
        with_end = swarm.stop_traffic(plan.drain_timeout_s)
        usage = measure.figures()
        before = swarm.summary(start_us, before_end)
        during = swarm.summary(with_start, with_end)
        failures = sign_in_failures([record for record in swarm.records() if record.ident != stalled.ident])
    p50_before = before["latency_ms"]["p50"]
    p50_with = during["latency_ms"]["p50"]
    return {
        **failures,
        "stalled_signed_in": stalled.sign_in_s is not None,
        "p50_before_ms": p50_before,
        "p50_with_ms": p50_with,
        "p99_with_ms": during["latency_ms"]["p99"],
        "p50_ratio": p50_with / p50_before if p50_before and p50_with is not None else None,
        "delivered_pct": 100 * during["deliveries"] / during["expected"] if during["expected"] else None,
        "lost": before["lost"] + during["lost"],
        "malformed": during["malformed"],
        "duplicates": during["duplicates"],
        "gaps": during["gaps"],
        "rss_growth_mib": mib(max(memory) - rss_start) if memory and rss_start is not None else None,
        "rss_mib_over_time": [round(sample / MIB, 1) for sample in memory],
        "stalled_closed_after_s": closed_after,
        "stalled_kernel_queue_kib": send_queue / 1024,
        "stalled_log": stalled_reason(server, stalled),
        **usage,
        "server_cpu_s_per_m": per_million(usage["server_cpu_s"], during["delivered"]),
    }


DISCONNECT_WORDS = re.compile(r"cut|clos|disconnect|drop|exceed|sendq|stall|shut|timeout|quit|error",
                              re.IGNORECASE)


def stalled_reason(server: RunningServer, stalled) -> str:
    """The server's first log line about ending the stalled client (found by nickname or port)."""
    needles = (stalled.nick, f":{stalled.local_port}")
    lines = [line for line in server.log_text().splitlines()
             if any(needle in line for needle in needles) and DISCONNECT_WORDS.search(line)]
    return lines[0].strip()[:160] if lines else ""


def cases(scenario: str, plan: Plan) -> list[tuple[str, callable]]:
    """The (case name, one-run function) pairs of a scenario; each function gets a fresh server."""
    if scenario == "connect":
        return [(f"{size} clients", lambda server, size=size: connect_run(server, size, plan))
                for size in plan.connect_sizes]
    if scenario == "fanout":
        return [(f"{clients}x{senders}",
                 lambda server, c=clients, s=senders: traffic_run(server, c, s, plan, rate=plan.fanout_rate))
                for clients, senders in plan.fanout_cases]
    if scenario == "max":
        return [(f"{plan.max_clients}x{plan.max_clients} W={plan.max_window}",
                 lambda server: traffic_run(server, plan.max_clients, plan.max_clients, plan,
                                            window=plan.max_window))]
    if scenario == "slow":
        return [(f"{plan.fanout_cases[0][0]}x{plan.fanout_cases[0][1]} + 1 stalled",
                 lambda server: slow_run(server, plan))]
    if scenario == "fanout-async":
        return [(f"{clients}x{senders}",
                 lambda server, c=clients, s=senders: async_run(server, plan, c, s, plan.fanout_rate))
                for clients, senders in plan.fanout_cases]
    if scenario == "bigroom":
        members, senders, rate, churn = plan.bigroom
        return [(f"{members} members, {churn} in+{churn} out/s, {rate:.0f} lines/s",
                 lambda server: async_run(server, plan, members, senders, rate, churn))]
    if scenario == "sessions":
        people, each, senders, rate = plan.sessions
        return [(f"{people} people x {each} sessions",
                 lambda server: async_run(server, plan, people, senders, rate, sessions=each)),
                (f"{people * each} people", lambda server: async_run(server, plan, people * each, senders, rate,
                                                                     sessions=1))]
    raise ValueError(f"unknown scenario {scenario}")


def run_case(kind, run_once, runs_wanted: int) -> dict:
    """Run one case several times, each on a freshly started server, and combine."""
    runs = []
    for _ in range(runs_wanted):
        try:
            with RunningServer(kind) as server:
                result = run_once(server)
                result["server_died"] = not server.alive()
                if result["server_died"]:
                    result["server_log"] = server.log_tail(1)
        except Exception as error:  # a crashed or hung server is a result, not the end
            result = {"error": f"{type(error).__name__}: {error}"}
        runs.append(result)
        if result.get("server_died"):
            break  # it will die again: spare the time
    usable = [run for run in runs if "error" not in run]
    if not usable:
        return runs[-1]
    combined = combine(usable)
    errors = [run["error"] for run in runs if "error" in run]
    if errors:
        combined["error"] = f"{len(errors)} of {len(runs)} runs failed: {errors[-1]}"
    return combined


def figure(result: dict, path: str):
    """result["a"]["b"] for path "a.b", the whole result for "", or None."""
    value = result
    if not path:
        return result
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def show(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}" if value < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def show_generators(result: dict) -> str:
    """Each generator process's CPU, % of one core; `!` marks one that was saturated."""
    shares = result.get("generator_cpu_pct") or []
    return "/".join("-" if pct is None else f"{pct:.0f}" + ("!" if pct > SATURATED_PCT else "")
                    for pct in shares) or "-"


def show_leave(result: dict) -> str:
    if result.get("leave_s") is None or result.get("all_left"):
        return show(result.get("leave_s"))
    return f">{result['leave_s']:.0f}"


GENERATOR_COLUMN = ("gen CPU%", "generator_cpu_pct", show_generators)
PER_SEND_COLUMN = ("deliv/send", "deliveries_per_send")
CPU_COLUMNS = [("srv CPU%", "server_cpu_pct"), ("srv CPU s/M", "server_cpu_s_per_m"), GENERATOR_COLUMN]

COLUMNS = {
    "connect": [("signed in", "signed_in"), ("of", "clients"), ("time s", "seconds"),
                ("p50 ms", "sign_in_ms.p50"), ("p99 ms", "sign_in_ms.p99"),
                ("max ms", "sign_in_ms.max"), ("overflows", "listen_overflows"),
                ("RSS MiB", "rss_mib"), ("KiB/conn", "kib_per_connection"), ("threads", "threads"),
                ("leave s", "leave_s", show_leave), ("quiet after s", "quiet_after_s"),
                ("idle CPU%", "idle_cpu_pct"), ("srv CPU%", "server_cpu_pct"),
                ("srv ms/sign-in", "server_cpu_ms_per_sign_in"), GENERATOR_COLUMN],
    "fanout": [("deliv/s", "deliveries_per_s"), ("lost", "lost"), ("malformed", "malformed"),
               ("dup", "duplicates"), ("gaps", "gaps"), ("p50 ms", "latency_ms.p50"),
               ("p95 ms", "latency_ms.p95"), ("p99 ms", "latency_ms.p99"),
               ("max ms", "latency_ms.max"), ("RSS MiB", "rss_mib"), *CPU_COLUMNS, PER_SEND_COLUMN],
    "max": [("deliv/s", "deliveries_per_s"), ("lines/s", "lines_per_s"), ("lost", "lost"),
            ("malformed", "malformed"), ("dup", "duplicates"), ("gaps", "gaps"),
            ("p50 ms", "latency_ms.p50"), ("p95 ms", "latency_ms.p95"),
            ("p99 ms", "latency_ms.p99"), ("max ms", "latency_ms.max"), *CPU_COLUMNS, PER_SEND_COLUMN],
    "bigroom": [("lines deliv", "delivered"), ("lost", "lost"), ("malformed", "malformed"),
                ("dup", "duplicates"), ("gaps", "gaps"), ("joins", "joins"), ("told%", "joins_told_pct"),
                ("leaves", "leaves"), ("told%", "leaves_told_pct"), ("all deliv", "all_deliveries"),
                ("p50 ms", "latency_ms.p50"), ("p99 ms", "latency_ms.p99"), ("RSS MiB", "rss_mib"),
                *CPU_COLUMNS, PER_SEND_COLUMN],
    "slow": [("p50 before", "p50_before_ms"), ("p50 with", "p50_with_ms"), ("ratio", "p50_ratio"),
             ("p99 with", "p99_with_ms"), ("delivered%", "delivered_pct"), ("lost", "lost"),
             ("RSS growth MiB", "rss_growth_mib"), ("stalled cut after s", "stalled_closed_after_s"),
             ("its kernel queue KiB", "stalled_kernel_queue_kib"), *CPU_COLUMNS],
}

COLUMNS["fanout-async"] = COLUMNS["fanout"]
COLUMNS["sessions"] = [("connections", "clients"), ("people", "people"), ("lost", "lost"), ("malformed", "malformed"),
                       ("dup", "duplicates"), ("gaps", "gaps"), ("p50 ms", "latency_ms.p50"),
                       ("p99 ms", "latency_ms.p99"), ("RSS growth KiB/conn", "rss_growth_kib_per_connection"),
                       *CPU_COLUMNS, PER_SEND_COLUMN]

# What an idle connection is made of, printed under the connect table.
MEMORY_COLUMNS = [("KiB/conn", "kib_per_connection"), ("stacks", "memory_per_connection_kib.stacks"),
                  ("heap+anon", "memory_per_connection_kib.anonymous"),
                  ("files", "memory_per_connection_kib.files"),
                  ("kernel (approx.)", "memory_per_connection_kib.kernel"),
                  ("stack mapping KiB", "memory_per_connection_kib.stack_size_kib"), ("threads", "threads")]


def print_table(title: str, results: list[dict], columns: list) -> None:
    columns = [("server", "server"), ("case", "case")] + columns
    rows = [[column[0] for column in columns]]
    for result in results:
        if "error" in result and "server_cpu_pct" not in result:
            rows.append([result["server"], result["case"], f"error: {result['error']}"])
            continue
        rows.append([column[2](result) if len(column) > 2 else show(figure(result, column[1]))
                     for column in columns])
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(columns))]
    print(f"\n== {title} ==")
    for row in rows:
        print("  ".join(cell.rjust(widths[i]) if i > 1 else cell.ljust(widths[i])
                        for i, cell in enumerate(row)).rstrip())


def print_notes(results: list[dict]) -> None:
    for result in results:
        for key in ("error", "failure", "stalled_log", "server_log"):
            if result.get(key):
                print(f"  {result['server']} {result['case']}: {key.replace('_', ' ')}: {result[key]}")
        if result.get("server_died"):
            print(f"  {result['server']} {result['case']}: the server died during the run")
        if result.get("generator_saturated"):
            print(f"  {result['server']} {result['case']}: generator saturated ({show_generators(result)}% "
                  f"of a core): its figures may be the generator's limit, not the server's")


def print_scenario(scenario: str, results: list[dict]) -> None:
    print_table(scenario, results, COLUMNS[scenario])
    print_notes(results)
    if scenario == "connect":
        print_table("connect: memory per idle connection, KiB", results, MEMORY_COLUMNS)


def find(results: list[dict], scenario: str, server: str, case_prefix: str = ""):
    for result in results:
        if (result["scenario"], result["server"]) == (scenario, server) \
                and result["case"].startswith(case_prefix) and "error" not in result:
            return result
    return None


def saturation(*results) -> str:
    """A warning for the targets whose figures came from a saturated generator."""
    marked = [f"{result['server']} {show_generators(result)}" for result in results
              if result and result.get("generator_saturated")]
    return f"  [generator saturated: {', '.join(marked)}]" if marked else ""


def ratio_target(results, scenario, case, path, reference, factor, higher_is_better, server="pychat"):
    """SERVER's figure (pyChat's) against factor x the reference server's, or n/a when one is missing."""
    mine, theirs = find(results, scenario, server, case), find(results, scenario, reference, case)
    a = figure(mine, path) if mine else None
    b = figure(theirs, path) if theirs else None
    if a is None or b is None:
        return None, f"{server} {show(a)}, {reference} {show(b)}"
    ratio = a / b if b else float("inf")
    passed = a >= factor * b if higher_is_better else a <= factor * b
    return passed, f"{server} {show(a)}, {reference} {show(b)} ({ratio:.2f}x)" + saturation(mine, theirs)


def absolute_target(results, scenario, case, path, test, describe=show, server="pychat"):
    """SERVER's figure (pyChat's) at path (the whole result for "") against a test."""
    mine = find(results, scenario, server, case)
    value = figure(mine, path) if mine else None
    if value is None:
        return None, f"{server}: no result"
    return bool(test(value)), f"{server} {describe(value)}" + saturation(mine)


CHECKS = ("lost", "malformed", "duplicates", "gaps")


def honesty(result: dict) -> str:
    return ", ".join(f"{key} {show(result.get(key))}" for key in CHECKS)


def flawless(result: dict) -> bool:
    return not any(result.get(key) for key in CHECKS)


def stalled_outcome(result: dict) -> str:
    after = result.get("stalled_closed_after_s")
    cut = f"cut off after {after:.1f} s" if after is not None else "still connected at the end"
    return f"{cut}; log: {result.get('stalled_log') or 'nothing'}"


def memory_makeup(result: dict) -> str:
    parts = result.get("memory_per_connection_kib") or {}
    return (f"{result['server']} {show(result.get('kib_per_connection'))} KiB: stacks {show(parts.get('stacks'))}, "
            f"heap and other anonymous {show(parts.get('anonymous'))}, "
            f"kernel (not in RSS) ~{show(parts.get('kernel'))}")


def targets(results: list[dict], plan: Plan) -> list[tuple[str, bool | str | None, str]]:
    """Every target from issue 12: (what, passed, None when not measured or "info", the figures)."""
    largest = f"{max(plan.connect_sizes)} clients"
    rows = []
    for clients, senders in plan.fanout_cases:
        case = f"{clients}x{senders}"
        rows += [
            (f"fanout {case}: server CPU per delivery with history on <= 1.1x off",
             *ratio_target(results, "fanout", case, "server_cpu_s_per_m", "pychat", 1.1, False,
                           server="pychat-history")),
            (f"fanout {case}: server CPU per delivery over WebSocket <= 1.3x IRC",
             *ratio_target(results, "fanout", case, "server_cpu_s_per_m", "pychat-irc", 1.3, False,
                           server="pychat-web")),
        ]
    rows += shape_targets(results, plan)
    rows += [
        ("max: deliveries/s >= 0.9x ngircd",
         *ratio_target(results, "max", "", "deliveries_per_s", "ngircd", 0.9, True)),
        ("max: p50 latency <= 2x ngircd",
         *ratio_target(results, "max", "", "latency_ms.p50", "ngircd", 2.0, False)),
        ("max: nothing lost, malformed, duplicated or out of order",
         *absolute_target(results, "max", "", "", flawless, honesty)),
        ("max: pychat-irc server CPU per delivery <= ngircd's",
         *ratio_target(results, "max", "", "server_cpu_s_per_m", "ngircd", 1.0, False, server="pychat-irc")),
        (f"connect {largest}: no sign-in failed",
         *absolute_target(results, "connect", largest, "failed", lambda v: v == 0)),
        (f"connect {largest}: zero listen overflows",
         *absolute_target(results, "connect", largest, "listen_overflows", lambda v: v == 0)),
        (f"connect {largest}: sign-in p99 < 100 ms",
         *absolute_target(results, "connect", largest, "sign_in_ms.p99", lambda v: v < 100)),
        (f"connect {largest}: server RSS < 300 MiB",
         *absolute_target(results, "connect", largest, "rss_mib", lambda v: v < 300)),
        (f"connect {largest}: server CPU near zero within 2 s after all leave",
         *absolute_target(results, "connect", largest, "quiet_after_s", lambda v: v <= 2.0,
                          lambda v: f"last busy quarter second ended {v:.2f} s after they left")),
        ("slow: others' p50 within 1.5x of without",
         *absolute_target(results, "slow", "", "p50_ratio", lambda v: v <= 1.5)),
        ("slow: 100% delivered to the others",
         *absolute_target(results, "slow", "", "delivered_pct", lambda v: v >= 100)),
        ("slow: server memory growth < 10 MiB",
         *absolute_target(results, "slow", "", "rss_growth_mib", lambda v: v < 10)),
        ("slow: stalled client disconnected, reason logged",
         *absolute_target(results, "slow", "", "", lambda r: r.get("stalled_closed_after_s") is not None
                          and r.get("stalled_log"), stalled_outcome)),
    ]
    rows += door_targets(results, largest)
    rows += bigroom_targets(results)
    rows += sessions_targets(results, plan)
    return rows


DOORS = ("pychat", "pychat-irc", "pychat-web")


def shape_targets(results: list[dict], plan: Plan) -> list[tuple[str, bool | str | None, str]]:
    """Issue 24's targets under both load shapes (fanout: loadgen's processes; fanout-async: asyncgen's
    one asyncio process): at every door, CPU per delivery and p99 at most ngircd's, every line delivered
    in order once; and how ngircd's own cost moves between the shapes."""
    rows = []
    for scenario in ("fanout", "fanout-async"):
        for clients, senders in plan.fanout_cases:
            case = f"{clients}x{senders}"
            for door in DOORS:
                if find(results, scenario, door, case) is None:
                    continue
                rows += [
                    (f"{scenario} {case}: {door} server CPU per delivery <= ngircd's",
                     *ratio_target(results, scenario, case, "server_cpu_s_per_m", "ngircd", 1.0, False,
                                   server=door)),
                    (f"{scenario} {case}: {door} p99 <= ngircd's",
                     *ratio_target(results, scenario, case, "latency_ms.p99", "ngircd", 1.0, False, server=door)),
                    (f"{scenario} {case}: {door} nothing lost, malformed, duplicated or out of order",
                     *absolute_target(results, scenario, case, "", flawless, honesty, server=door)),
                ]
    for clients, senders in plan.fanout_cases:
        case = f"{clients}x{senders}"
        for server in ("ngircd", *DOORS):
            selector, asyncio_shape = find(results, "fanout", server, case), find(results, "fanout-async", server, case)
            if selector and asyncio_shape:
                moved, before = asyncio_shape["server_cpu_s_per_m"], selector["server_cpu_s_per_m"]
                rows.append((f"fanout-async {case}: {server} CPU per delivery, asyncio shape against selector "
                             f"shape", "info", f"{show(moved)} against {show(before)} s/M"
                             + (f" ({moved / before:.2f}x)" if moved and before else "")))
    return rows


def sessions_targets(results: list[dict], plan: Plan) -> list[tuple[str, bool | str | None, str]]:
    """Issue 24's several sessions: people signed in several times each cost no more than as many people
    signed in once, in memory and in CPU per delivery, at the doors where they can sign in to accounts."""
    people, each = plan.sessions[:2]
    rows = []
    for door in DOORS:
        several = find(results, "sessions", door, f"{people} people x")
        single = find(results, "sessions", door, f"{people * each} people")
        if several is None or single is None:
            continue
        for what, path in (("server memory per connection", "rss_growth_kib_per_connection"),
                           ("server CPU per delivery", "server_cpu_s_per_m")):
            a, b = several.get(path), single.get(path)
            if a is None or b is None:
                rows.append((f"sessions: {door} {what}, {people} x {each} sessions <= {people * each} people", None,
                             f"{show(a)} against {show(b)}"))
                continue
            rows.append((f"sessions: {door} {what}, {people} x {each} sessions <= {people * each} people",
                         a <= b, f"{show(a)} against {show(b)}" + (f" ({a / b:.2f}x)" if b else "")
                         + saturation(several, single)))
        rows.append((f"sessions: {door} every line delivered to every session, in order, once",
                     *absolute_target(results, "sessions", f"{people} people x", "", flawless, honesty, server=door)))
    return rows


def told(result: dict) -> str:
    return (f"joins {show(result.get('joins_told_pct'))}% of {result.get('joins')}, "
            f"leaves {show(result.get('leaves_told_pct'))}% of {result.get('leaves')}")


def bigroom_targets(results: list[dict]) -> list[tuple[str, bool | str | None, str]]:
    """Issue 24's big room: every line and every join and leave delivered to everyone there, p99 and CPU
    per delivery (joins and leaves included) at most ngircd's."""
    rows = []
    for door in DOORS:
        if find(results, "bigroom", door) is None:
            continue
        rows += [
            (f"bigroom: {door} every line delivered in order once",
             *absolute_target(results, "bigroom", "", "", flawless, honesty, server=door)),
            (f"bigroom: {door} every join and leave told to everyone there",
             *absolute_target(results, "bigroom", "", "", lambda r: r.get("joins_told_pct") == 100
                              and r.get("leaves_told_pct") == 100, told, server=door)),
            (f"bigroom: {door} p99 <= ngircd's",
             *ratio_target(results, "bigroom", "", "latency_ms.p99", "ngircd", 1.0, False, server=door)),
            (f"bigroom: {door} server CPU per delivery <= ngircd's",
             *ratio_target(results, "bigroom", "", "server_cpu_s_per_m", "ngircd", 1.0, False, server=door)),
        ]
    return rows


def door_targets(results: list[dict], largest: str) -> list[tuple[str, bool | str | None, str]]:
    """Issue 24's targets for the doors pyChat was measured at: every door holds 10,000 idle people in
    under 100 MiB, and the IRC and browser doors sign them in as the pyChat port does, within 1.2 times
    its CPU a sign-in."""
    rows = []
    for door in DOORS:
        if find(results, "connect", door, largest) is None:
            continue
        # Only a full house counts: fewer people signed in weigh less.
        rows.append((f"connect {largest}: {door} server RSS < 100 MiB, everyone signed in",
                     *absolute_target(results, "connect", largest, "",
                                      lambda r: r["failed"] == 0 and r["rss_mib"] < 100,
                                      lambda r: f"{show(r['rss_mib'])} MiB, {r['signed_in']:,} signed in",
                                      server=door)))
        if door != "pychat":
            rows += [
                (f"connect {largest}: {door}: no sign-in failed",
                 *absolute_target(results, "connect", largest, "failed", lambda v: v == 0, server=door)),
                (f"connect {largest}: {door}: sign-in p99 < 100 ms",
                 *absolute_target(results, "connect", largest, "sign_in_ms.p99", lambda v: v < 100, server=door)),
                (f"connect {largest}: {door}: server quiet within 2 s after all leave",
                 *absolute_target(results, "connect", largest, "quiet_after_s", lambda v: v <= 2.0,
                                  lambda v: f"last busy quarter second ended {v:.2f} s after they left",
                                  server=door)),
                (f"connect {largest}: {door}: CPU per sign-in <= 1.2x the pyChat port's",
                 *ratio_target(results, "connect", largest, "server_cpu_ms_per_sign_in", "pychat", 1.2, False,
                               server=door)),
            ]
        named = "" if door == "pychat" else f"{door}: "
        rows.append((f"connect {largest}: {named}memory per idle connection", "info",
                     memory_makeup(find(results, "connect", door, largest))))
    return rows


def print_targets(rows) -> None:
    print("\n== targets (pyChat) ==")
    width = max(len(name) for name, _, _ in rows)
    for name, passed, figures in rows:
        verdict = {None: "n/a ", True: "PASS", False: "FAIL", "info": "info"}[passed]
        print(f"{verdict}  {name.ljust(width)}  {figures}")


def history_queries(lines: int, queries: int = 200) -> dict:
    """Time the history queries on a database of LINES chat lines, nine in ten in one room, made with
    pyChat's own Storage in a directory of its own: what /history and IRC's CHATHISTORY ask of it."""
    storage_module = servers.pychat_module()
    with tempfile.TemporaryDirectory(prefix="bench-history-") as directory:
        storage = storage_module.Storage(directory, full_text=False)
        try:
            started = time.perf_counter()
            first = storage.next_message_id()
            for start in range(0, lines, 100_000):
                storage.add_messages(storage_module.StoredMessage(
                    first + n, 1_700_000_000 + n / 1000, "#big" if n % 10 else "#small", "alice", None, "line",
                    f"line {n} of the generated history") for n in range(start, min(lines, start + 100_000)))
            made_s = time.perf_counter() - started
            chooser = random.Random(1)
            timings = {"before_ms": [], "latest_ms": [], "after_ms": []}
            for _ in range(queries):
                ref = first + chooser.randrange(lines)
                for name, query in (("before_ms", lambda: storage.messages_before("#big", ref, 100)),
                                    ("after_ms", lambda: storage.messages_after("#big", ref, 100)),
                                    ("latest_ms", lambda: storage.latest_messages("#big", 100))):
                    started = time.perf_counter()
                    query()
                    timings[name].append((time.perf_counter() - started) * 1000)
        finally:
            storage.close()
    return {"lines": lines, "made_s": made_s,
            **{name: {"p50": percentile(sorted(values), 0.5), "p99": percentile(sorted(values), 0.99)}
               for name, values in timings.items()}}


def print_history(figures: dict) -> None:
    print(f"\nhistory: queries for 100 lines of a room on a database of {figures['lines']:,} lines "
          f"(made in {figures['made_s']:.1f} s)")
    for name in ("before_ms", "after_ms", "latest_ms"):
        print(f"  {name[:-3]:>7}: p50 {figures[name]['p50']:.3f} ms, p99 {figures[name]['p99']:.3f} ms")


def parse_constant(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    if not name.isidentifier() or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a Python literal") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", default=None,
                        help=f"comma-separated, from {','.join(SERVER_KINDS)} (default: all that are "
                             "installed; --quick: pychat)")
    parser.add_argument("--scenarios", default="connect,fanout,fanout-async,max,slow,bigroom,sessions,history",
                        help="comma-separated, from connect,fanout,fanout-async,max,slow,bigroom,sessions,"
                             "history (default: all)")
    parser.add_argument("--runs", type=int, default=None,
                        help="runs per case, the median is shown (default: 3 for fanout and max, 1 for connect and slow)")
    parser.add_argument("--generators", type=int, default=GENERATORS, metavar="N",
                        help=f"load generator processes the clients are spread over (default {GENERATORS})")
    parser.add_argument("--pychat-constant", type=parse_constant, action="append", default=[],
                        metavar="NAME=VALUE",
                        help="override a constant of pyChat-server.py for this run, e.g. SWITCH_INTERVAL=0.005")
    parser.add_argument("--traffic-seconds", type=float, default=None, metavar="S",
                        help="how long each fanout and max run sends (default 1.5; longer runs measure CPU "
                             "in more clock ticks)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds, small sizes")
    parser.add_argument("--json", metavar="FILE", help="also write all results to FILE as a JSON list")
    args = parser.parse_args(argv)
    args.servers = (args.servers or ("pychat" if args.quick else ",".join(SERVER_KINDS))).split(",")
    args.scenarios = args.scenarios.split(",")
    for name in args.servers:
        if name not in SERVER_KINDS:
            parser.error(f"unknown server {name!r}")
    for name in args.scenarios:
        if name not in COLUMNS and name != "history":
            parser.error(f"unknown scenario {name!r}")
    if args.generators < 1:
        parser.error("--generators must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK_PLAN if args.quick else Plan()
    plan.generators = args.generators
    if args.traffic_seconds:
        plan.traffic_seconds = args.traffic_seconds
    if args.runs:
        plan.runs = {scenario: args.runs for scenario in plan.runs}
    servers.PYCHAT_CONSTANTS.update(args.pychat_constant)
    raise_file_limit()  # the generator processes and the servers inherit it
    kinds = []
    for name in args.servers:
        kind = SERVER_KINDS[name]
        why = kind.missing()
        if why:
            print(f"skipping {name}: {why}; to install: {kind.install_hint}", file=sys.stderr)
        else:
            kinds.append(kind)
    if not kinds:
        print("no server to benchmark", file=sys.stderr)
        return 1
    print(f"machine: {machine()}; {plan.generators} load generator processes")
    versions = {kind.name: kind.version() for kind in kinds}
    for name, version in versions.items():
        print(f"{name}: {version}")
    started = time.perf_counter()
    results = []
    for scenario in (name for name in args.scenarios if name in COLUMNS):
        scenario_results = []
        for case, run_once in cases(scenario, plan):
            for kind in kinds:
                if kind.scenarios and scenario not in kind.scenarios:
                    continue
                print(f"[{time.perf_counter() - started:5.0f} s] {scenario} {case}: {kind.name}",
                      file=sys.stderr, flush=True)
                runs = plan.runs[scenario]
                result = {"scenario": scenario, "case": case, "server": kind.name,
                          "version": versions[kind.name], "runs": runs, "generators": plan.generators,
                          **run_case(kind, run_once, runs)}
                if kind.notes:
                    result["notes"] = list(kind.notes)
                scenario_results.append(result)
        print_scenario(scenario, scenario_results)
        results += scenario_results
    rows = [row for row in targets(results, plan) if row[0].split()[0].rstrip(":") in args.scenarios]
    if "history" in args.scenarios:
        figures = history_queries(plan.history_lines)
        print_history(figures)
        results.append({"scenario": "history", "case": f"{plan.history_lines:,} lines", "server": "pychat",
                        "version": versions.get("pychat", "pyChat-server.py"), **figures})
        rows.append((f"history: 100 lines before an id in a room of {plan.history_lines:,}, p99 < 5 ms",
                     figures["before_ms"]["p99"] < 5, f"p99 {figures['before_ms']['p99']:.2f} ms"))
    print_targets(rows)
    print(f"\n{len(results)} results in {time.perf_counter() - started:.0f} s; one JSON line each:")
    for result in results:
        print(json.dumps(result, sort_keys=True))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
