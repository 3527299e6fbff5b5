"""The README's TLS steps, run as printed: the shell lines under dash (a POSIX shell without
bash's additions), the pyChat lines as the servers and clients of the test."""
from __future__ import annotations

import pathlib
import re
import shlex
import shutil
import ssl
import subprocess

import pytest

from conftest import LineClient
from test_client_pipe import run_piped

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def tls_blocks() -> list[list[str]]:
    """The commands of each sh block in the README's TLS steps, continuation lines joined."""
    text = README.read_text()
    section = text[text.index("**TLS.**"):text.index("`--insecure` connects without checking")]
    blocks = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
        commands, pending = [], ""
        for line in block.splitlines():
            pending += line + "\n"
            if not line.endswith("\\"):
                commands.append(pending)
                pending = ""
        blocks.append(commands)
    assert len(blocks) == 2, "the README's TLS steps should have two sh blocks: localhost, then a CA"
    return blocks


def run_in_posix_shell(commands: list[str], folder: pathlib.Path) -> None:
    shell = shutil.which("dash") or "sh"
    script = "".join(command for command in commands if not command.startswith("python3 "))
    result = subprocess.run([shell, "-eu"], input=script.encode(), cwd=folder, capture_output=True,
                            timeout=120)
    assert result.returncode == 0, f"{shell} failed on the README's lines:\n{script}\n{result.stderr.decode()}"


def pychat_arguments(commands: list[str], script: str, folder: pathlib.Path) -> list[str]:
    """The options of the README's line that runs script, with its file names made absolute."""
    line = next(command for command in commands if command.startswith(f"python3 {script}"))
    words = shlex.split(line, comments=True)[2:]
    return [str(folder / word) if (folder / word).exists() else word for word in words]


@pytest.fixture(autouse=True)
def needs_openssl():
    if not shutil.which("openssl"):
        pytest.skip("the openssl command is needed for the README's TLS steps")


def test_readme_tls_on_your_own_machine_runs_as_printed(start_server, tmp_path):
    commands = tls_blocks()[0]
    run_in_posix_shell(commands, tmp_path)
    server = start_server(*pychat_arguments(commands, "pyChat-server.py", tmp_path))
    result = run_piped(server, "over tls\n", *pychat_arguments(commands, "pyChat-client.py", tmp_path),
                       "--nick", "readme")
    assert result.returncode == 0, result.stderr.decode()
    assert "readme: over tls" in result.stdout.decode() and result.stderr == b""


def test_readme_tls_with_your_own_authority_runs_as_printed(start_server, tmp_path):
    commands = tls_blocks()[1]
    assert not any("<(" in command for command in commands), "bash-only process substitution"
    run_in_posix_shell(commands, tmp_path)
    server = start_server(*pychat_arguments(commands, "pyChat-server.py", tmp_path))
    client_options = pychat_arguments(commands, "pyChat-client.py", tmp_path)
    host = client_options[client_options.index("--host") + 1]
    authority = client_options[client_options.index("--cafile") + 1]
    context = ssl.create_default_context(cafile=authority)
    client = LineClient(server.host, server.port, context, server_hostname=host)
    try:
        client.login("readme")
    finally:
        client.close()
