"""The README's main command: the whole pipeline on embedded defaults."""

from __future__ import annotations

import email
import email.policy
import http.server
import os
import socket
import subprocess
import sys
import threading
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
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONITOR_")}
    with socket.socket() as taken:  # bound, not listening: the demo's own check passes
        taken.bind(("127.0.0.1", 0))
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


def test_a_demo_does_not_report_on_a_process_already_on_its_port(tmp_path: Path) -> None:
    """An earlier demo or worker still answering on the web port would answer the
    demo's questions in place of its own worker (which could not listen there)."""

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready) as other:
        port = other.server_address[1]
        threading.Thread(target=other.serve_forever, daemon=True).start()
        run = subprocess.run([sys.executable, "-m", "monitor.cli", "demo", "--exit-when-done",
                              "--web-port", str(port)], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120, check=False, env=_demo_env())
        other.shutdown()
    assert run.returncode == 1, run.stdout + run.stderr
    assert (f"error: MONITOR_WEB_PORT {port}: something already answers on 127.0.0.1:{port}"
            in run.stderr), run.stderr
    assert "--web-port" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / ".state" / "worker.log").exists()  # no worker was started


def _demo_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONITOR_")}
    return {**env, "MONITOR_RULES_DIR": str(ROOT / "rules")}

