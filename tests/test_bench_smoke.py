"""The benchmark's smoke run (`bench/bench.py --quick`) still works against the real server.

It runs in CI so that the benchmark cannot rot: a few seconds, pyChat only,
small numbers, the clients spread over two generator processes as in a full
run. It proves the generator, the server launcher and the ledger, not the
server's speed. The ledger's checks are also fed broken input directly, to
prove that each of them can fail.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench.py"
SMOKE_TIMEOUT_S = 60
sys.path.insert(0, str(BENCH.parent))

import asyncgen  # noqa: E402  (bench/ is not a package)
from loadgen import PADDING, PROTOCOLS, LoadGenerator, Traffic  # noqa: E402


def run_quick_benchmark() -> tuple[subprocess.CompletedProcess, list[dict]]:
    completed = subprocess.run([sys.executable, str(BENCH), "--quick"], cwd=ROOT, capture_output=True,
                               text=True, timeout=SMOKE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    results = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    return completed, results


@pytest.fixture(scope="module")
def quick_run():
    if not (ROOT / "pyChat-server.py").exists():
        pytest.skip("pyChat-server.py is not there yet")
    return run_quick_benchmark()


def test_quick_benchmark_exits_cleanly(quick_run):
    completed, _ = quick_run
    assert completed.returncode == 0, f"bench.py --quick exited {completed.returncode}:\n{completed.stderr[-2000:]}"


@pytest.mark.parametrize("scenario", ["fanout", "max", "slow", "fanout-async", "bigroom"])
def test_quick_benchmark_delivers_every_line_to_pychat_clients(quick_run, scenario):
    completed, results = quick_run
    mine = [r for r in results if r["server"] == "pychat" and r["scenario"] == scenario]
    assert mine, f"no JSON result for pychat {scenario}:\n{completed.stdout[-2000:]}"
    result = mine[0]
    assert "error" not in result, f"{scenario} failed: {result['error']}"
    assert result["lost"] == 0, f"{scenario} lost {result['lost']} deliveries: {result}"
    for check in ("malformed", "duplicates", "gaps"):
        assert result[check] == 0, f"{scenario}: {check} {result[check]}: {result}"
    if scenario != "slow":
        assert result["deliveries"] > 0, f"{scenario} counted no deliveries: {result}"
    # Counted in clock ticks of 10 ms: the smoke run's 100 lines may cost less than one, and 0.0 is a figure.
    assert result.get("server_cpu_s_per_m") is not None, f"{scenario} has no server CPU per million deliveries: {result}"
    shares = result["generator_cpu_pct"]
    processes = 1 if scenario in ("fanout-async", "bigroom") else 2     # asyncgen.py is one process
    assert len(shares) == processes and all(share is not None for share in shares), \
        f"{scenario}: expected the CPU of {processes} generator processes, got {shares}"


def test_quick_benchmark_tells_everyone_in_the_big_room_who_came_and_went(quick_run):
    completed, results = quick_run
    big_room = [r for r in results if r["server"] == "pychat" and r["scenario"] == "bigroom"]
    assert big_room, f"no JSON result for pychat bigroom:\n{completed.stdout[-2000:]}"
    result = big_room[0]
    assert result["joins"] > 0 and result["leaves"] > 0, result
    assert result["joins_told_pct"] == 100 and result["leaves_told_pct"] == 100, result
    assert result["all_deliveries"] > result["delivered"], result


def test_the_websocket_load_reaches_every_browser_door_client():
    completed = subprocess.run([sys.executable, str(BENCH), "--quick", "--servers", "pychat-web", "--scenarios",
                                "fanout"], cwd=ROOT, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S,
                               stdin=subprocess.DEVNULL)
    results = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    assert completed.returncode == 0 and results, f"bench.py exited {completed.returncode}:\n{completed.stderr[-2000:]}"
    result = results[0]
    assert result["server"] == "pychat-web" and result["failed"] == 0, result
    assert result["deliveries"] == result["expected"] > 0, result
    for check in ("lost", "malformed", "duplicates", "gaps"):
        assert result[check] == 0, f"{check} {result[check]}: {result}"


def test_every_session_of_a_person_gets_every_line_in_the_sessions_scenario():
    completed = subprocess.run([sys.executable, str(BENCH), "--quick", "--servers", "pychat-irc", "--scenarios",
                                "sessions"], cwd=ROOT, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S,
                               stdin=subprocess.DEVNULL)
    results = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    assert completed.returncode == 0 and len(results) == 2, \
        f"bench.py exited {completed.returncode}:\n{completed.stderr[-2000:]}{completed.stdout[-2000:]}"
    several, single = results
    assert (several["people"], several["clients"]) == (4, 12) and (single["people"], single["clients"]) == (12, 12)
    for result in results:
        assert "error" not in result and result["failed"] == 0, result
        assert result["delivered"] == result["expected"] > 0, result
        for check in ("lost", "malformed", "duplicates", "gaps"):
            assert result[check] == 0, f"{check} {result[check]}: {result}"
        assert result["rss_growth_kib_per_connection"] is not None, result


def test_quick_benchmark_signs_everyone_in(quick_run):
    completed, results = quick_run
    connect = [r for r in results if r["server"] == "pychat" and r["scenario"] == "connect"]
    assert connect, f"no JSON result for pychat connect:\n{completed.stdout[-2000:]}"
    assert connect[0]["signed_in"] == connect[0]["clients"], f"not everyone signed in: {connect[0]}"


def test_quick_benchmark_prints_the_targets_and_the_memory_per_connection(quick_run):
    completed, _ = quick_run
    assert "== targets (pyChat) ==" in completed.stdout, completed.stdout[-2000:]
    assert "connect 50 clients: memory per idle connection" in completed.stdout, completed.stdout[-2000:]
    assert "PASS  fanout 10x10: pychat nothing lost, malformed, duplicated or out of order" in completed.stdout, \
        completed.stdout[-2000:]


def ledger_for_one_receiver() -> tuple[Traffic, object]:
    """A Traffic with senders 0 and 1 and receivers 0, 1, 2 in one process, no sockets; and receiver 2."""
    generator = LoadGenerator("pychat", 0, 0)
    generator.add_clients([0, 1, 2], 1, None, False)
    traffic = Traffic(generator, 0, senders=[0, 1], receivers_by_process=[[0, 1, 2]],
                      owner={0: 0, 1: 0}, links={})
    return traffic, generator.clients[2]


def chat(*tokens: tuple[int, int]) -> bytes:
    """pyChat lines as receivers see them, each `bSENDER: |SENDER.SEQ.TIME| PADDING`."""
    return b"".join(b"\nb%d: |%d.%d.0|%s" % (sender, sender, seq, PADDING) for sender, seq in tokens) + b"\n"


def test_ledger_counts_in_order_lines_as_deliveries_and_nothing_else():
    traffic, receiver = ledger_for_one_receiver()
    traffic.receive(receiver, chat((0, 1), (1, 1), (0, 2)), 0)
    traffic.receive(receiver, chat((1, 2)), 0)
    assert (traffic.delivered, traffic.duplicates, traffic.gaps, traffic.malformed) == (4, 0, 0, 0)


def test_ledger_counts_duplicates_gaps_and_malformed_lines():
    traffic, receiver = ledger_for_one_receiver()
    traffic.receive(receiver, chat((0, 1), (0, 1)), 0)
    assert traffic.duplicates == 1, "a repeated sequence number is a duplicate"
    traffic.receive(receiver, chat((0, 3)), 0)
    assert traffic.gaps == 1, "a skipped sequence number is a gap"
    traffic.receive(receiver, b"\nb1: |0.4.0|" + PADDING + b"\n", 0)
    assert traffic.malformed == 1, "a token under another sender's nickname is malformed"
    traffic.receive(receiver, b"\nb1: |1.1.0| cut short\n", 0)
    assert traffic.malformed == 2, "a line whose padding does not end it is malformed"


def async_ledger(protocol: str = "pychat", sibling: bool = False) -> asyncgen.Ledger:
    """asyncgen's ledger of receiver 2 (or of another session of person 2: SIBLING), in a run of the big
    room (no sockets)."""
    run = asyncgen.Run.__new__(asyncgen.Run)
    run.churn = 1
    run.protocol = PROTOCOLS[protocol]
    kind = "pychat" if protocol == "pychat" else "irc"
    run.joins, run.leaves = asyncgen.JOINS[kind], asyncgen.LEAVES[kind]
    member = asyncgen.Member.__new__(asyncgen.Member)
    member.ident = 2
    return asyncgen.Ledger(run, member, sibling=sibling)


def test_the_asyncio_ledger_counts_deliveries_and_every_fault_but_not_the_echo():
    ledger = async_ledger()
    ledger.receive(chat((0, 1), (1, 1), (2, 1), (0, 2)), 1000)
    assert (ledger.delivered, ledger.duplicates, ledger.gaps, ledger.malformed) == (3, 0, 0, 0), \
        "its own line's echo is no delivery"
    ledger.receive(chat((0, 2)), 1000)
    assert ledger.duplicates == 1, "a repeated sequence number is a duplicate"
    ledger.receive(chat((1, 3)), 1000)
    assert ledger.gaps == 1, "a skipped sequence number is a gap"
    ledger.receive(b"\nb1: |0.3.0|" + PADDING + b"\n", 1000)
    assert ledger.malformed == 1, "a token under another sender's nickname is malformed"
    assert list(ledger.latencies) == [1000] * 5, "every line received is timed, as in loadgen"


@pytest.mark.parametrize("protocol, came, went", [
    ("pychat", b"\n*** c7 joined #lobby\n", b"\n*** c7 quit\n"),
    ("irc", b"\n:c7!u@h JOIN #bench\r\n", b"\n:c7!u@h QUIT :Quit: bye\r\n"),
])
def test_the_asyncio_ledger_hears_who_came_and_went(protocol, came, went):
    ledger = async_ledger(protocol)
    ledger.receive(came + b"\n*** b7 joined #lobby\n", 0)
    ledger.receive(went, 0)
    assert (list(ledger.joins), list(ledger.leaves)) == ([7], [7])


def test_another_session_of_the_sender_counts_its_lines_as_deliveries():
    ledger = async_ledger("irc", sibling=True)
    ledger.receive(b"\n:b2!u@h PRIVMSG #bench :|2.1.0|" + PADDING + b"\r\n", 0)
    assert ledger.delivered == 1, "a line said from the phone is delivered to the laptop"
