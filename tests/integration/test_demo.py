"""The README's main command: the whole pipeline on embedded defaults."""

from __future__ import annotations

import email
import email.policy
import os
import subprocess
import sys
from pathlib import Path

from monitor.embedded import free_port
from tests.integration.workers import ROOT, expected

SAMPLE = ROOT / "examples" / "isc-19-29" / "events.jsonl"


def test_demo_runs_the_live_pipeline_and_mails_each_alert(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONITOR_")}
    run = subprocess.run([sys.executable, "-m", "monitor.cli", "demo", "--exit-when-done",
                          "--web-port", str(port)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, check=False,
                         env={**env, "MONITOR_RULES_DIR": str(ROOT / "rules")})
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"status:  http://127.0.0.1:{port}/status" in run.stdout
    assert "embedded broker (tansu)" in run.stdout
    mails = sorted((tmp_path / ".mail").glob("*/*.eml"))
    _, alerts = expected(SAMPLE.read_bytes().splitlines())
    assert len(mails) == len(alerts) > 0
    subjects = [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)["Subject"]
                for p in mails]
    assert any(s.startswith("[HALT] ISC.19.29: related-sae") for s in subjects), subjects


def test_a_demo_whose_worker_cannot_start_says_why(tmp_path: Path) -> None:
    """The worker's own one-line reason reaches the person, with a log that still
    exists after the demo has cleaned up its embedded broker."""
    import socket

    env = {k: v for k, v in os.environ.items() if not k.startswith("MONITOR_")}
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "monitor.cli", "demo", "--exit-when-done",
                              "--web-port", str(port)], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300, check=False,
                             env={**env, "MONITOR_RULES_DIR": str(ROOT / "rules")})
    assert run.returncode == 1, run.stdout + run.stderr
    assert "error: the worker stopped while starting:" in run.stderr
    assert f"MONITOR_WEB_PORT {port}: cannot listen on 127.0.0.1:{port}" in run.stderr
    assert "Traceback" not in run.stderr
    assert "cannot listen" in (tmp_path / ".state" / "worker.log").read_text()
    # a second run's failure shows its own log, not the first run's reason
    run = subprocess.run([sys.executable, "-m", "monitor.cli", "demo", "--exit-when-done",
                          "--web-port", str(port)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, check=False,
                         env={**env, "MONITOR_RULES_DIR": str(ROOT / "rules"),
                              "MONITOR_BROKER": "kafka://127.0.0.1:1"})
    assert run.returncode == 1, run.stdout + run.stderr
    assert "no broker answers" in run.stderr and "cannot listen" not in run.stderr
