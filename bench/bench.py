"""Benchmark pyChat against ngircd and miniircd on this machine, side by side.

    python3 bench/bench.py                 # everything, about 4 minutes
    python3 bench/bench.py --quick         # a few seconds, pyChat only (CI)

Each server is started fresh on a free port of 127.0.0.1 for every run and
driven by this process alone (see loadgen.py). Results are printed as tables,
then checked against the targets, then printed again as one JSON line each.
See bench/README.md for what every scenario and column means.
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field

from loadgen import FAILED, READY, LoadGenerator, Traffic, percentile
from servers import SERVER_KINDS, RunningServer, listen_overflows, machine

MIB = 1024 * 1024
IN_FLIGHT_CONNECTS = 50  # connection attempts signing in at once in `connect` (issue 6)
# Elsewhere sign-in is only the set-up: fewer at once stay under the listen backlogs of
# ngircd (10) and miniircd (5), whose overflows would cost seconds of SYN retries.
IN_FLIGHT_SETUP = 4


@dataclass
class Plan:
    """How big and how long each scenario is."""

    # Runs per case; each figure is their median. connect and slow run once by
    # default: a 5,000-client run or a stall that must be noticed costs 10-40 s
    # per server, and the whole default run has to stay under five minutes.
    runs: dict = field(default_factory=lambda: {"connect": 1, "fanout": 3, "max": 3, "slow": 1})
    connect_sizes: tuple = (500, 2000, 5000)
    connect_timeout_s: float = 15.0
    idle_window_s: float = 1.0
    leave_timeout_s: float = 15.0
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


QUICK_PLAN = Plan(runs={"connect": 1, "fanout": 1, "max": 1, "slow": 1}, connect_sizes=(50,),
                  fanout_cases=((10, 10),), fanout_rate=200.0, traffic_seconds=1.0, drain_timeout_s=3.0, idle_window_s=0.5, max_clients=10,
                  slow_before_s=1.0, slow_with_s=1.5, slow_with_max_s=1.5)

# Figures where any run's bad news must show: summed over runs, not a median.
SUMMED = {"lost", "malformed", "duplicates", "gaps", "failed", "dropped", "expected", "deliveries"}


def median_or_none(values: list):
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def combine(runs: list[dict]) -> dict:
    """One result from several runs: medians, except SUMMED counts; text from the last run."""
    combined = {}
    for key in runs[0]:
        values = [run.get(key) for run in runs]
        if isinstance(values[0], dict):
            combined[key] = combine(values)
        elif isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
            combined[key] = sum(v for v in values if v is not None) if key in SUMMED else median_or_none(values)
        else:
            combined[key] = values[-1]
    return combined


class Measure:
    """Server CPU and this process's own CPU over a stretch of wall time."""

    def __init__(self, server: RunningServer):
        self.server = server
        self.wall = time.perf_counter()
        self.server_cpu = server.cpu_seconds()
        self.own_cpu = time.process_time()

    def percentages(self) -> dict:
        wall = max(time.perf_counter() - self.wall, 1e-6)
        server_cpu = self.server.cpu_seconds()
        return {
            "server_cpu_pct": None if server_cpu is None or self.server_cpu is None
            else 100 * (server_cpu - self.server_cpu) / wall,
            "generator_cpu_pct": 100 * (time.process_time() - self.own_cpu) / wall,
        }


def mib(size: int | None) -> float | None:
    return None if size is None else size / MIB


def per_cpu_second(rate: float, cpu_pct: float | None) -> float | None:
    """Work per second of server CPU: how efficient, as opposed to how fast."""
    return rate / (cpu_pct / 100) if cpu_pct else None


def sign_in_failures(clients: list) -> dict:
    """How many clients never signed in, how many were dropped later, and why (call before closing)."""
    failed = [client for client in clients if not client.signed_in_ns]
    dropped = [client for client in clients if client.signed_in_ns and client.state == FAILED]
    reasons = sorted({client.failure for client in failed + dropped if client.failure})
    return {"failed": len(failed), "dropped": len(dropped), "failure": "; ".join(reasons[:3])}


def connect_run(server: RunningServer, size: int, plan: Plan) -> dict:
    """Sign in `size` clients, then everyone leaves; see README: connect."""
    generator = LoadGenerator(server.kind.protocol, server.port)
    files_before = server.open_files()
    overflows_before = listen_overflows()
    measure = Measure(server)
    clients = generator.connect(size, IN_FLIGHT_CONNECTS, plan.connect_timeout_s,
                                server_alive=server.alive)
    usage = measure.percentages()
    elapsed = time.perf_counter() - measure.wall
    status = server.status()
    signed_in = sorted(client.sign_in_seconds for client in clients if client.signed_in_ns)
    overflows = listen_overflows() - overflows_before
    failures = sign_in_failures(clients)
    generator.close_all()
    left = time.perf_counter()
    deadline = left + plan.leave_timeout_s
    while server.alive() and server.open_files() > files_before and time.perf_counter() < deadline:
        time.sleep(0.05)
    leave_s = time.perf_counter() - left
    all_left = server.open_files() <= files_before
    idle = Measure(server)
    time.sleep(plan.idle_window_s)
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
        "leave_s": leave_s,
        "all_left": all_left,
        "idle_cpu_pct": idle.percentages()["server_cpu_pct"],
        "generator_cpu_pct": usage["generator_cpu_pct"],
        "server_cpu_pct": usage["server_cpu_pct"],
    }


def start_traffic(server: RunningServer, clients_count: int, senders_count: int, plan: Plan,
                  rate: float = 0.0, window: int = 0) -> tuple[LoadGenerator, Traffic, list]:
    """Sign clients in and set up (not start) their traffic."""
    generator = LoadGenerator(server.kind.protocol, server.port)
    clients = generator.connect(clients_count, IN_FLIGHT_SETUP, plan.connect_timeout_s,
                                server_alive=server.alive)
    generator.settle(0.2, 5.0)  # the join notices are out before the clock starts
    ready = [client for client in clients if client.state == READY]
    if len(ready) < 2 or not ready[:senders_count]:
        failures = sign_in_failures(clients)
        generator.close_all()
        raise RuntimeError(f"only {len(ready)} of {clients_count} clients signed in: {failures['failure']}")
    traffic = Traffic(generator, ready[:senders_count], ready, rate=rate, window=window)
    generator.traffic = traffic
    return generator, traffic, clients


def traffic_run(server: RunningServer, clients_count: int, senders_count: int, plan: Plan,
                rate: float = 0.0, window: int = 0) -> dict:
    """Fanout (paced by rate) or max (paced by window): see README."""
    generator, traffic, clients = start_traffic(server, clients_count, senders_count, plan,
                                                rate, window)
    try:
        measure = Measure(server)
        traffic.start()
        generator.run(plan.traffic_seconds)
        traffic.stop()
        end_us = generator.now_us()
        generator.run(plan.drain_timeout_s, done=traffic.all_delivered)
        usage = measure.percentages()
        summary = traffic.summary(traffic.start_us, end_us)
        status = server.status()
        failures = sign_in_failures(clients)
    finally:
        generator.close_all()
    return {
        "clients": clients_count,
        "senders": senders_count,
        **failures,
        **summary,
        "malformed": traffic.malformed,
        "duplicates": traffic.duplicates,
        "gaps": traffic.gaps,
        "rss_mib": mib(status["rss"]),
        **usage,
        "deliveries_per_cpu_s": per_cpu_second(summary["deliveries_per_s"], usage["server_cpu_pct"]),
    }


def slow_run(server: RunningServer, plan: Plan) -> dict:
    """The 50x50 fanout, then the same with one client that stops reading."""
    clients_count, senders_count = plan.fanout_cases[0]
    generator, traffic, clients = start_traffic(server, clients_count, senders_count, plan,
                                                rate=plan.fanout_rate)
    try:
        measure = Measure(server)
        traffic.start()
        generator.run(plan.slow_before_s)
        before_end = generator.now_us()
        stalled = generator.connect(1, 1, 10.0, rcvbuf=plan.slow_rcvbuf, stall=True)[0]
        with_start = generator.now_us()
        rss_start = server.status()["rss"]
        memory, closed_after, send_queue = [], None, 0
        started = time.perf_counter()
        while True:
            elapsed = time.perf_counter() - started
            if elapsed >= plan.slow_with_max_s or (elapsed >= plan.slow_with_s and closed_after is not None):
                break
            generator.run(min(plan.memory_sample_s, plan.slow_with_max_s - elapsed))
            rss = server.status()["rss"]
            if rss is not None:
                memory.append(rss)
            if not stalled.signed_in_ns:
                continue  # it never got in: there is nothing to watch
            state, queued = server.connection_state(stalled.local_port)
            if state == "ESTABLISHED":
                send_queue = queued
            elif closed_after is None:
                closed_after = time.perf_counter() - started
        traffic.stop()
        with_end = generator.now_us()
        generator.run(plan.drain_timeout_s, done=traffic.all_delivered)
        usage = measure.percentages()
        before = traffic.summary(traffic.start_us, before_end)
        during = traffic.summary(with_start, with_end)
        failures = sign_in_failures(clients)
    finally:
        generator.close_all()
    p50_before = before["latency_ms"]["p50"]
    p50_with = during["latency_ms"]["p50"]
    return {
        **failures,
        "stalled_signed_in": bool(stalled.signed_in_ns),
        "p50_before_ms": p50_before,
        "p50_with_ms": p50_with,
        "p99_with_ms": during["latency_ms"]["p99"],
        "p50_ratio": p50_with / p50_before if p50_before and p50_with is not None else None,
        "delivered_pct": 100 * during["deliveries"] / during["expected"] if during["expected"] else None,
        "lost": before["lost"] + during["lost"],
        "rss_growth_mib": mib(max(memory) - rss_start) if memory and rss_start is not None else None,
        "rss_mib_over_time": [round(sample / MIB, 1) for sample in memory],
        "stalled_closed_after_s": closed_after,
        "stalled_kernel_queue_kib": send_queue / 1024,
        "stalled_log": stalled_reason(server, stalled),
        "malformed": traffic.malformed,
        **usage,
    }


DISCONNECT_WORDS = re.compile(r"cut|clos|disconnect|drop|exceed|sendq|stall|shut|timeout|quit|error",
                              re.IGNORECASE)


def stalled_reason(server: RunningServer, stalled) -> str:
    """The server's first log line about ending the stalled client (found by nickname or port)."""
    needles = (stalled.nick.decode(), f":{stalled.local_port}")
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


COLUMNS = {
    "connect": [("signed in", "signed_in"), ("of", "clients"), ("time s", "seconds"),
                ("p50 ms", "sign_in_ms.p50"), ("p99 ms", "sign_in_ms.p99"),
                ("max ms", "sign_in_ms.max"), ("overflows", "listen_overflows"),
                ("RSS MiB", "rss_mib"), ("threads", "threads"), ("leave s", "leave_s", lambda r: show(r["leave_s"]) if r.get("all_left") else f">{r['leave_s']:.0f}"),
                ("idle CPU%", "idle_cpu_pct"), ("srv CPU%", "server_cpu_pct"),
                ("gen CPU%", "generator_cpu_pct")],
    "fanout": [("deliv/s", "deliveries_per_s"), ("lost", "lost"), ("p50 ms", "latency_ms.p50"),
               ("p95 ms", "latency_ms.p95"), ("p99 ms", "latency_ms.p99"),
               ("max ms", "latency_ms.max"), ("RSS MiB", "rss_mib"),
               ("srv CPU%", "server_cpu_pct"), ("deliv/CPU-s", "deliveries_per_cpu_s"),
               ("gen CPU%", "generator_cpu_pct")],
    "max": [("deliv/s", "deliveries_per_s"), ("lines/s", "lines_per_s"), ("lost", "lost"),
            ("malformed", "malformed"), ("dup", "duplicates"), ("gaps", "gaps"),
            ("p50 ms", "latency_ms.p50"), ("p95 ms", "latency_ms.p95"),
            ("p99 ms", "latency_ms.p99"), ("max ms", "latency_ms.max"),
            ("srv CPU%", "server_cpu_pct"), ("deliv/CPU-s", "deliveries_per_cpu_s"),
            ("gen CPU%", "generator_cpu_pct")],
    "slow": [("p50 before", "p50_before_ms"), ("p50 with", "p50_with_ms"), ("ratio", "p50_ratio"),
             ("p99 with", "p99_with_ms"), ("delivered%", "delivered_pct"), ("lost", "lost"),
             ("RSS growth MiB", "rss_growth_mib"), ("stalled cut after s", "stalled_closed_after_s"),
             ("its kernel queue KiB", "stalled_kernel_queue_kib"), ("gen CPU%", "generator_cpu_pct")],
}


def print_table(scenario: str, results: list[dict]) -> None:
    columns = [("server", "server"), ("case", "case")] + COLUMNS[scenario]
    rows = [[column[0] for column in columns]]
    for result in results:
        if "error" in result and "server_cpu_pct" not in result:
            rows.append([result["server"], result["case"], f"error: {result['error']}"])
            continue
        rows.append([column[2](result) if len(column) > 2 else show(figure(result, column[1]))
                     for column in columns])
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(columns))]
    print(f"\n== {scenario} ==")
    for row in rows:
        print("  ".join(cell.rjust(widths[i]) if i > 1 else cell.ljust(widths[i])
                        for i, cell in enumerate(row)).rstrip())
    for result in results:
        for key in ("error", "failure", "stalled_log", "server_log"):
            if result.get(key):
                print(f"  {result['server']} {result['case']}: {key.replace('_', ' ')}: {result[key]}")
        if result.get("server_died"):
            print(f"  {result['server']} {result['case']}: the server died during the run")


def find(results: list[dict], scenario: str, server: str, case_prefix: str = ""):
    for result in results:
        if (result["scenario"], result["server"]) == (scenario, server) \
                and result["case"].startswith(case_prefix) and "error" not in result:
            return result
    return None


def ratio_target(results, scenario, case, path, reference, factor, higher_is_better):
    """pyChat's figure against factor x the reference server's, or n/a when one is missing."""
    mine, theirs = find(results, scenario, "pychat", case), find(results, scenario, reference, case)
    a = figure(mine, path) if mine else None
    b = figure(theirs, path) if theirs else None
    if a is None or b is None:
        return None, f"pychat {show(a)}, {reference} {show(b)}"
    ratio = a / b if b else float("inf")
    passed = a >= factor * b if higher_is_better else a <= factor * b
    return passed, f"pychat {show(a)}, {reference} {show(b)} ({ratio:.2f}x)"


def absolute_target(results, scenario, case, path, test, describe=show):
    """pyChat's figure at path (the whole result for "") against a test."""
    mine = find(results, scenario, "pychat", case)
    value = figure(mine, path) if mine else None
    if value is None:
        return None, "pychat: no result"
    return bool(test(value)), f"pychat {describe(value)}"


def honesty(result: dict) -> str:
    return ", ".join(f"{key} {show(result.get(key))}" for key in ("lost", "malformed", "duplicates", "gaps"))


def stalled_outcome(result: dict) -> str:
    after = result.get("stalled_closed_after_s")
    cut = f"cut off after {after:.1f} s" if after is not None else "still connected at the end"
    return f"{cut}; log: {result.get('stalled_log') or 'nothing'}"


def targets(results: list[dict], plan: Plan) -> list[tuple[str, bool | None, str]]:
    """Every target from issue 6: (what, passed or None when not measured, the figures)."""
    fanout = [f"{c}x{s}" for c, s in plan.fanout_cases]
    largest = f"{max(plan.connect_sizes)} clients"
    rows = [
        ("max: deliveries/s >= 0.9x ngircd",
         *ratio_target(results, "max", "", "deliveries_per_s", "ngircd", 0.9, True)),
        ("max: deliveries/s >= 3x miniircd",
         *ratio_target(results, "max", "", "deliveries_per_s", "miniircd", 3.0, True)),
        ("max: p50 latency <= 2x ngircd",
         *ratio_target(results, "max", "", "latency_ms.p50", "ngircd", 2.0, False)),
        ("max: nothing lost, malformed, duplicated or out of order",
         *absolute_target(results, "max", "", "", lambda r: not any(
             r.get(k) for k in ("lost", "malformed", "duplicates", "gaps")), honesty)),
    ]
    for case in fanout:
        rows += [
            (f"fanout {case}: nothing lost", *absolute_target(results, "fanout", case, "lost", lambda v: v == 0)),
            (f"fanout {case}: p99 <= ngircd's",
             *ratio_target(results, "fanout", case, "latency_ms.p99", "ngircd", 1.0, False)),
        ]
    rows += [
        ("slow: others' p50 within 1.5x of without",
         *absolute_target(results, "slow", "", "p50_ratio", lambda v: v <= 1.5)),
        ("slow: 100% delivered to the others",
         *absolute_target(results, "slow", "", "delivered_pct", lambda v: v >= 100)),
        ("slow: server memory growth < 10 MiB",
         *absolute_target(results, "slow", "", "rss_growth_mib", lambda v: v < 10)),
        ("slow: stalled client disconnected, reason logged",
         *absolute_target(results, "slow", "", "", lambda r: r.get("stalled_closed_after_s") is not None
                          and r.get("stalled_log"), stalled_outcome)),
        (f"connect {largest}: no sign-in failed",
         *absolute_target(results, "connect", largest, "failed", lambda v: v == 0)),
        (f"connect {largest}: zero listen overflows",
         *absolute_target(results, "connect", largest, "listen_overflows", lambda v: v == 0)),
        (f"connect {largest}: sign-in p99 < 100 ms",
         *absolute_target(results, "connect", largest, "sign_in_ms.p99", lambda v: v < 100)),
        (f"connect {largest}: server RSS < 250 MiB",
         *absolute_target(results, "connect", largest, "rss_mib", lambda v: v < 250)),
        (f"connect {largest}: idle CPU after all leave < 1%",
         *absolute_target(results, "connect", largest, "idle_cpu_pct", lambda v: v < 1)),
    ]
    return rows


def print_targets(rows) -> None:
    print("\n== targets (pyChat) ==")
    width = max(len(name) for name, _, _ in rows)
    for name, passed, figures in rows:
        verdict = "n/a " if passed is None else ("PASS" if passed else "FAIL")
        print(f"{verdict}  {name.ljust(width)}  {figures}")


def raise_file_limit() -> None:
    """Let this process (and the servers it starts) open as many sockets as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", default=None,
                        help="comma-separated, from pychat,ngircd,miniircd (default: all; --quick: pychat)")
    parser.add_argument("--scenarios", default="connect,fanout,max,slow",
                        help="comma-separated, from connect,fanout,max,slow (default: all)")
    parser.add_argument("--runs", type=int, default=None,
                        help="runs per case, the median is shown (default: 3 for fanout and max, 1 for connect and slow)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds, small sizes")
    parser.add_argument("--json", metavar="FILE", help="also write all results to FILE as a JSON list")
    args = parser.parse_args(argv)
    args.servers = (args.servers or ("pychat" if args.quick else "pychat,ngircd,miniircd")).split(",")
    args.scenarios = args.scenarios.split(",")
    for name in args.servers:
        if name not in SERVER_KINDS:
            parser.error(f"unknown server {name!r}")
    for name in args.scenarios:
        if name not in COLUMNS:
            parser.error(f"unknown scenario {name!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK_PLAN if args.quick else Plan()
    if args.runs:
        plan.runs = {scenario: args.runs for scenario in plan.runs}
    raise_file_limit()
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
    print(f"machine: {machine()}")
    versions = {kind.name: kind.version() for kind in kinds}
    for name, version in versions.items():
        print(f"{name}: {version}")
    started = time.perf_counter()
    results = []
    for scenario in args.scenarios:
        scenario_results = []
        for case, run_once in cases(scenario, plan):
            for kind in kinds:
                print(f"[{time.perf_counter() - started:5.0f} s] {scenario} {case}: {kind.name}",
                      file=sys.stderr, flush=True)
                runs = plan.runs[scenario]
                result = {"scenario": scenario, "case": case, "server": kind.name,
                          "version": versions[kind.name], "runs": runs,
                          **run_case(kind, run_once, runs)}
                if kind.notes:
                    result["notes"] = list(kind.notes)
                scenario_results.append(result)
        print_table(scenario, scenario_results)
        results += scenario_results
    print_targets([row for row in targets(results, plan) if row[0].split()[0].rstrip(":") in args.scenarios])
    print(f"\n{len(results)} results in {time.perf_counter() - started:.0f} s; one JSON line each:")
    for result in results:
        print(json.dumps(result, sort_keys=True))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
