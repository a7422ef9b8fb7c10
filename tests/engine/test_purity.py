"""The engine is the functional core: no I/O library, no clock, no environment."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[2] / "monitor" / "engine"
SOURCES = sorted(ENGINE.glob("*.py"))

ALLOWED_IMPORTS = {
    "__future__", "bisect", "calendar", "sys", "collections", "dataclasses", "datetime",
    "functools", "hashlib", "itertools", "math", "operator", "re", "statistics", "typing",
    "types", "enum", "copy",
    "contextlib", "contextvars",  # events.reading_stored: a scope, set by records.load
    "msgspec", "orjson", "pydantic", "yaml", "numpy", "scipy",
}
IO_LIBRARIES = ("faust", "aiokafka", "aiosmtplib", "aiosmtpd", "prometheus_client", "aiohttp",
                "rocksdict", "mode", "smtplib", "rich")
FORBIDDEN_CALLS = {"now", "today", "utcnow", "time", "monotonic", "perf_counter", "open",
                   "getenv", "random", "sleep"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_engine_modules_import_only_pure_libraries(path: Path) -> None:
    assert imported_modules(path) <= ALLOWED_IMPORTS


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_engine_modules_read_no_clock_file_or_environment(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            assert name not in FORBIDDEN_CALLS, f"{path.name}:{node.lineno} calls {name}()"
        if isinstance(node, ast.Attribute):
            assert node.attr != "environ", f"{path.name}:{node.lineno} reads os.environ"


def test_importing_the_engine_loads_no_io_library() -> None:
    modules = [f"monitor.engine.{p.stem}" for p in SOURCES if p.stem != "__init__"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            f"print([m for m in {IO_LIBRARIES!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
