"""The benchmark's smoke run (`bench/bench.py --quick`) still works against the real server.

It runs in CI so that the benchmark cannot rot: a few seconds, pyChat only,
small numbers. It proves the generator, the server launcher and the ledger,
not the server's speed.
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


@pytest.mark.parametrize("scenario", ["fanout", "max", "slow"])
def test_quick_benchmark_delivers_every_line_to_pychat_clients(quick_run, scenario):
    completed, results = quick_run
    mine = [r for r in results if r["server"] == "pychat" and r["scenario"] == scenario]
    assert mine, f"no JSON result for pychat {scenario}:\n{completed.stdout[-2000:]}"
    result = mine[0]
    assert "error" not in result, f"{scenario} failed: {result['error']}"
    assert result["lost"] == 0, f"{scenario} lost {result['lost']} deliveries: {result}"
    if scenario != "slow":
        assert result["deliveries"] > 0, f"{scenario} counted no deliveries: {result}"
        assert result["malformed"] == 0, f"{scenario} saw malformed lines: {result}"


def test_quick_benchmark_signs_everyone_in(quick_run):
    completed, results = quick_run
    connect = [r for r in results if r["server"] == "pychat" and r["scenario"] == "connect"]
    assert connect, f"no JSON result for pychat connect:\n{completed.stdout[-2000:]}"
    assert connect[0]["signed_in"] == connect[0]["clients"], f"not everyone signed in: {connect[0]}"
