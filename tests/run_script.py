"""Run a Python script as `python3 SCRIPT ARGS...` does, keeping its compiled code for the next run.

Usage: python3 tests/run_script.py CACHE_DIR SCRIPT ARGS...

Python compiles the script it is given anew every time it starts: for
pyChat-server.py that is about a third of the 0.3 s a server takes to be
listening, and the tests start hundreds of servers and clients. Here the
script is imported as __main__ through the import system instead, which keeps
the compiled code (under CACHE_DIR, never in the worktree) and compiles again
only when the source changes. The rest is as for `python3 SCRIPT`: the same
sys.argv, the script's folder first on sys.path, __name__ == "__main__".
The tests that show the scripts run as the README prints them start them
the plain way.
"""
import importlib.util
import os
import sys

cache, script, *arguments = sys.argv[1:]
sys.argv = [script, *arguments]
sys.path[0] = os.path.dirname(os.path.realpath(script))
sys.dont_write_bytecode = False          # PYTHONDONTWRITEBYTECODE keeps the worktree clean; CACHE_DIR is elsewhere
sys.pycache_prefix = cache
spec = importlib.util.spec_from_file_location("__main__", script)
main = importlib.util.module_from_spec(spec)
sys.modules["__main__"] = main
spec.loader.exec_module(main)
