"""The command registry: usage strings as argument specs, discovery of new files, and load-time errors."""
from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
import textwrap
import uuid

import pytest

import commands
from commands import Command, CommandError, CommandLoadError, load_commands
from conftest import ROOT, SERVER_SCRIPT, LineClient, import_script


def make_package(tmp_path, monkeypatch, files: dict[str, str]) -> str:
    """Write a throwaway command package and return its importable name."""
    name = f"extra_commands_{uuid.uuid4().hex[:8]}"
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    for filename, source in files.items():
        (package / filename).write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


HELLO = '''
    """A greeting, to prove that a new file is a new command."""
    from commands import command


    @command("hello", "[NAME]", aliases=("hi",))
    def hello(ctx, name):
        """Say hello to someone, or to yourself."""
        ctx.reply(f"Hello, {name or ctx.nick}!")
'''


def test_a_new_file_in_a_package_becomes_a_command(tmp_path, monkeypatch):
    table = load_commands(make_package(tmp_path, monkeypatch, {"hello.py": HELLO}))
    found = table.find("hello")
    assert found is not None and table.find("HI") is found
    assert found.usage == "/hello [NAME]" and found.summary == "Say hello to someone, or to yourself."
    assert found.source.endswith("/hello.py")


def test_two_files_claiming_one_name_are_refused_naming_both(tmp_path, monkeypatch):
    clash = HELLO.replace('"hello", "[NAME]", aliases=("hi",)', '"hi"').replace(
        "def hello(ctx, name)", "def hi(ctx, name=None)")
    package = make_package(tmp_path, monkeypatch, {"hello.py": HELLO, "zz_hi.py": clash})
    with pytest.raises(CommandLoadError, match=r"/hi is claimed twice: by .*/hello\.py and by .*/zz_hi\.py"):
        load_commands(package)


@pytest.mark.parametrize("decorator, signature, problem", [
    ('"x", "/x A"', "(ctx, a)", "repeats the command's name"),
    ('"x", "[A] B"', "(ctx, a, b)", "required argument cannot follow an optional"),
    ('"x", "A... B"', "(ctx, a, b)", "only the last argument"),
    ('"x", "lower"', "(ctx, a)", "cannot read 'lower'"),
    ('"x", "A B"', "(ctx, a)", "signature does not match"),
    ('"x", "A [#ROOM]"', "(ctx, a, b)", r"\[#ROOM\] must be optional and come first"),
    ('"x", "#ROOM"', "(ctx, a)", r"\[#ROOM\] must be optional and come first"),
])
def test_a_malformed_command_file_is_refused_at_load_time(tmp_path, monkeypatch, decorator, signature, problem):
    source = f'''
        from commands import command


        @command({decorator})
        def x{signature}:
            """Does nothing."""
    '''
    with pytest.raises(CommandLoadError, match=problem):
        load_commands(make_package(tmp_path, monkeypatch, {"x.py": source}))


def test_a_command_without_a_docstring_is_refused(tmp_path, monkeypatch):
    source = '''
        from commands import command


        @command("x")
        def x(ctx):
            pass
    '''
    with pytest.raises(CommandLoadError, match="no docstring"):
        load_commands(make_package(tmp_path, monkeypatch, {"x.py": source}))


def spec(arguments: str) -> Command:
    from commands import _parse_usage

    return Command(name="t", handler=print, usage=f"/t {arguments}".rstrip(), summary="", details="", aliases=(),
                   operator=False, source="t.py", parameters=_parse_usage("t", arguments, "t.py"))


@pytest.mark.parametrize("usage, text, expected", [
    ("", "", []),
    ("[NAME]", "", [None]),
    ("[NAME]", "  bob  ", ["bob"]),
    ("NICK TEXT...", "bob  hello   there ", ["bob", "hello   there"]),
    ("NICK [REASON...]", "bob", ["bob", None]),
    ("A B", "x y", ["x", "y"]),
    ("[#ROOM] NICK [REASON...]", "bob go away", [None, "bob", "go away"]),
    ("[#ROOM] NICK [REASON...]", "#dev bob go away", ["#dev", "bob", "go away"]),
    ("[#ROOM] [TEXT...]", "#dev", ["#dev", None]),
    ("[#ROOM] [TEXT...]", "", [None, None]),
])
def test_arguments_are_split_as_the_usage_says(usage, text, expected):
    assert spec(usage).split_arguments(text) == expected


@pytest.mark.parametrize("usage, text, message", [
    ("NICK", "", "Usage: /t NICK"),
    ("NICK TEXT...", "bob", "Usage: /t NICK TEXT..."),
    ("", "extra", "Too many arguments. Usage: /t"),
    ("A", "x y", "Too many arguments. Usage: /t A"),
    ("[#ROOM] NICK", "#dev", "Usage: /t [#ROOM] NICK"),
])
def test_wrong_arguments_are_refused_with_the_usage(usage, text, message):
    with pytest.raises(CommandError, match=re.escape(message)):
        spec(usage).split_arguments(text)


# -- end to end: a copy of the server with one more file in commands/ ------------------------------

@pytest.fixture
def server_copy(tmp_path):
    """A copy of the server script and its commands/ folder, to add files to."""
    copy = tmp_path / "pychat"
    copy.mkdir()
    shutil.copy(ROOT / "pyChat-server.py", copy)
    shutil.copytree(ROOT / "commands", copy / "commands", ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_dropping_a_file_into_commands_adds_a_working_listed_command(server_copy, start_server):
    (server_copy / "commands" / "hello.py").write_text(textwrap.dedent(HELLO))
    server = start_server(script=server_copy / "pyChat-server.py")
    client = LineClient(server.host, server.port)
    client.login("alice")
    client.send("/help")
    listing = client.lines_until(r"-- Type /help COMMAND")
    assert any(line.startswith("-- /hello [NAME]") and line.endswith("Say hello to someone, or to yourself.")
               for line in listing), listing
    client.send("/hello")
    assert client.recv_line() == "-- Hello, alice!"
    client.send("/hi bob")
    assert client.recv_line() == "-- Hello, bob!"
    client.send("/hello bob carol")
    assert client.recv_line() == "!! Too many arguments. Usage: /hello [NAME]"
    client.close()


def test_a_command_that_crashes_reports_an_error_and_the_connection_lives_on(server_copy, start_server):
    (server_copy / "commands" / "boom.py").write_text(textwrap.dedent('''
        """A broken command."""
        from commands import command


        @command("boom")
        def boom(ctx):
            """Fail."""
            raise RuntimeError("kaboom")
    '''))
    server = start_server(script=server_copy / "pyChat-server.py", traceback_expected=True)
    client = LineClient(server.host, server.port)
    client.login("alice")
    client.send("/boom")
    assert client.recv_line() == "!! /boom failed because of an error in the server; it has been logged."
    server.wait_for_log(r"(?s)/boom from alice failed.*RuntimeError: kaboom")
    client.send("still alive")
    assert client.recv_line() == "alice: still alive"
    client.close()


def test_the_server_refuses_to_start_with_clashing_command_files(server_copy):
    (server_copy / "commands" / "zz_online.py").write_text(textwrap.dedent('''
        from commands import command


        @command("online")
        def online_again(ctx):
            """Clash."""
    '''))
    result = subprocess.run([sys.executable, str(server_copy / "pyChat-server.py"), "--port", "0"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "/online is claimed twice: by commands/online.py and by commands/zz_online.py" in result.stderr


def test_the_readme_example_command_works_as_printed(server_copy, start_server):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Adding a command", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    (server_copy / "commands" / "roll.py").write_text(example)
    server = start_server(script=server_copy / "pyChat-server.py")
    client = LineClient(server.host, server.port)
    client.login("alice")
    client.send("/roll 20")
    line = client.recv_line()
    assert line.startswith("* alice rolls a 20-sided die: ") and 1 <= int(line.rsplit(" ", 1)[1]) <= 20
    client.send("/dice many")
    assert client.recv_line() == "!! SIDES must be a number, as in /roll 20."
    client.send("/help roll")
    assert client.recv_line().startswith("-- /roll [SIDES]  Roll a die")
    client.close()


def test_the_servers_context_has_every_verb_of_the_context_interface_with_its_parameters():
    server_context = import_script(SERVER_SCRIPT, "pychat_server").Context
    interface = commands.Context
    verbs = [name for name, value in vars(interface).items() if inspect.isfunction(value) and not name.startswith("_")]
    assert len(verbs) > 20, verbs
    for name in verbs:
        assert hasattr(server_context, name), f"the server's Context has no {name}()"
        wanted = list(inspect.signature(getattr(interface, name)).parameters)
        given = list(inspect.signature(getattr(server_context, name)).parameters)
        assert given == wanted, f"{name}: the interface takes {wanted}, the server's Context {given}"
    for name in interface.__annotations__:
        assert isinstance(getattr(server_context, name, None), property), f"the server's Context has no .{name}"
