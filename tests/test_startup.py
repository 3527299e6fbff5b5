"""Starting the server: options it refuses, and start errors that say what is wrong and what to do.

Each test starts pyChat-server.py as a process and reads what it prints on
standard error; none of them gets as far as serving anyone.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import SERVER_SCRIPT


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
])
def test_a_numeric_option_out_of_range_is_refused_by_name_with_its_range(option, value):
    result = start("--port", "0", option, value)
    line = only_line(result)
    assert result.returncode == 2, f"{option} {value} was accepted: {result.stderr}"
    assert f"argument {option}: {value!r} is not a" in line, line
    assert any(word in line for word in (" to ", " or more", " more than ")), f"the range is not named: {line}"


@pytest.mark.parametrize("option, value", [
    ("--port", "65535"), ("--max-clients", "0"), ("--rate", "0"), ("--rate", "0.5"), ("--burst", "0"),
    ("--nick-timeout", "0.5"), ("--idle-timeout", "0"), ("--keepalive", "32767"), ("--history", "0"),
])
def test_numeric_options_at_the_edges_of_their_range_are_accepted(option, value):
    # --version stops the server after the options were read and found good.
    result = start(option, value, "--version")
    assert result.returncode == 0 and "pyChat server" in result.stdout, result.stderr
