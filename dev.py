#!/usr/bin/env python3
"""The two commands of the README's quick start, on a machine with only Python 3.11+.

    python3 dev.py demo    # the whole pipeline on embedded defaults (Ctrl-C stops it)
    python3 dev.py test    # install what the tests need, lint, run every test

Both make a virtual environment in .venv (once; again when pyproject.toml changes) and
install the project into it with its test extras. Extra arguments go to the command:
``python3 dev.py test -k replay``, ``python3 dev.py demo --help``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".installed-from"


def ensure_environment() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - says so clearly on an older Python
        sys.exit(f"Python 3.11 or newer is needed; this is {sys.version.split()[0]}")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("installing the project and its test extras into .venv ...", flush=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "-e", f"{ROOT}[test,rocksdb]"], check=True)
    STAMP.write_text(wanted)


def run(args: list[str]) -> int:
    """Run a command to its end. A terminal's Ctrl-C reaches the command as well as this
    process (they share its process group): wait while the command stops what it started,
    then stop too. (`subprocess.run` would kill it a quarter of a second later, before it
    has stopped what it started.)"""
    interrupted = False
    with subprocess.Popen(args, cwd=ROOT) as command:
        while True:
            try:
                code = command.wait()
                break
            except KeyboardInterrupt:
                interrupted = True  # the command has the same Ctrl-C: let it finish
    if interrupted:
        raise KeyboardInterrupt
    return code


def main() -> int:
    command, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("help", [])
    if command not in ("demo", "test"):
        print(__doc__)
        return 2
    ensure_environment()
    if command == "demo":
        demo = [str(BIN / "safety-monitor"), "demo", *rest]
        if os.name == "posix":  # the demo in this process: every signal sent here reaches it
            os.chdir(ROOT)
            os.execv(demo[0], demo)
        return run(demo)
    lint = run([str(BIN / "ruff"), "check", "monitor", "tests", "examples", "benchmarks", "dev.py"])
    tests = run([str(BIN / "python"), "-m", "pytest", *rest])
    return lint or tests


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except subprocess.CalledProcessError as exc:
        sys.exit(f"dev.py: {' '.join(map(str, exc.cmd))} failed with status {exc.returncode}")
