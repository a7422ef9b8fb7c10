"""The README's main command: the whole pipeline on embedded defaults."""

from __future__ import annotations

import contextlib
import email
import email.policy
import hashlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

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


@pytest.mark.parametrize("stop", ["ctrl-c", "kill"])
def test_the_readme_demo_command_stopped_stops_everything_it_started(tmp_path: Path,
                                                                     stop: str) -> None:
    """`python3 dev.py demo`, stopped as a terminal's Ctrl-C does (SIGINT to the whole
    process group) or as `kill` does (SIGTERM to it alone): the demo, its worker and its
    broker all end, soon, and the demo cleans up after itself."""
    shutil.copy(ROOT / "dev.py", tmp_path / "dev.py")  # dev.py works in its own folder
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    (tmp_path / "pyproject.toml").write_bytes(pyproject)
    venv_bin = tmp_path / ".venv" / "bin"  # this environment, as dev.py's .venv
    venv_bin.mkdir(parents=True)
    (venv_bin / "safety-monitor").symlink_to(Path(sys.executable).parent / "safety-monitor")
    (tmp_path / ".venv" / ".installed-from").write_text(hashlib.sha256(pyproject).hexdigest())
    port = free_port()
    out = tmp_path / "demo.out"
    with out.open("wb") as sink:
        dev = subprocess.Popen([sys.executable, str(tmp_path / "dev.py"), "demo", "--web-port",
                                str(port)], cwd=tmp_path, env=_demo_env(), stdout=sink,
                               stderr=subprocess.STDOUT, start_new_session=True)
    started: list[psutil.Process] = []
    try:
        _wait_until_running(dev, out)
        started = psutil.Process(dev.pid).children(recursive=True)  # its broker and worker
        assert len(started) >= 2, started
        if stop == "ctrl-c":
            os.killpg(dev.pid, signal.SIGINT)
        else:
            dev.terminate()
        assert dev.wait(25) == 0, out.read_text()  # the way a demo ends
        _assert_all_end(started, 10, out)
    finally:
        _kill(dev, started)
    # what the demo does last, once its worker and broker have stopped
    assert not list((tmp_path / ".state").glob("embedded-*")), out.read_text()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nobody left on the port


def test_a_closed_terminal_stops_a_worker_and_its_embedded_broker(tmp_path: Path) -> None:
    """SIGHUP stops `safety-monitor worker` as SIGTERM does: a clean shutdown that stops
    the broker it started, which runs in a session of its own, out of a terminal's reach."""
    port = free_port()
    out = tmp_path / "worker.out"
    with out.open("wb") as sink:
        worker = subprocess.Popen([sys.executable, "-m", "monitor.cli", "worker"], cwd=tmp_path,
                                  env={**_demo_env(), "MONITOR_WEB_PORT": str(port)},
                                  stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while not _answers(f"http://127.0.0.1:{port}/readyz"):
            assert worker.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.3)
        started = psutil.Process(worker.pid).children(recursive=True)  # its broker
        assert started, out.read_text()
        worker.send_signal(signal.SIGHUP)
        assert worker.wait(30) == 0, out.read_text()  # shut down, not killed by the signal
        _assert_all_end(started, 10, out)
    finally:
        _kill(worker, started)
    assert not list((tmp_path / ".state").glob("embedded-*")), out.read_text()


def _demo_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONITOR_")}
    return {**env, "MONITOR_RULES_DIR": str(ROOT / "rules")}


def _wait_until_running(process: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 180
    while "Running." not in out.read_text(errors="replace"):
        assert process.poll() is None, out.read_text(errors="replace")
        assert time.monotonic() < deadline, out.read_text(errors="replace")
        time.sleep(0.5)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _assert_all_end(processes: list[psutil.Process], timeout: float, out: Path) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in processes if _alive(p)]
    assert not left, f"still running: {left}\n{out.read_text(errors='replace')}"


def _kill(process: subprocess.Popen, processes: list[psutil.Process]) -> None:
    process.kill()
    for left in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            left.kill()
    process.wait(10)
