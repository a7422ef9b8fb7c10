"""``demo``: the whole pipeline on embedded defaults, fed the sample ISC.19.29 log.

A local Kafka-compatible broker (unless MONITOR_BROKER is set), a local SMTP server that
keeps each message as an .eml file (unless MONITOR_SMTP_HOST is set), the worker with
its web port, and the log published to the events topic. It prints where to look and
runs until Ctrl-C (or SIGTERM, or SIGHUP), which stops everything it started: the
worker first, while its broker still answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console

from .embedded import LocalMailbox
from .engine.events import Rejection, parse_event
from .publish import publish
from .replay import Unavailable, open_log, read_lines
from .runner import broker_for
from .settings import Settings, host_port


class DemoFailed(Unavailable):
    """The worker stopped, or did not get there in time; the message ends with the last
    lines of its log and where the log is."""


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as MONITOR_* variables, for a child process."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"MONITOR_{name.upper()}"] = str(value).lower() if isinstance(value, bool) \
            else str(value)
    return env


@contextlib.contextmanager
def mailbox_for(settings: Settings) -> Iterator[tuple[Settings, Path | None]]:
    """The settings with an SMTP server: the configured one, else a local mailbox."""
    if settings.smtp_host:
        yield settings, None
        return
    folder = settings.mail_dir / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    with LocalMailbox(folder) as mailbox:
        yield settings.model_copy(update={"smtp_host": mailbox.host, "smtp_port": mailbox.port,
                                          "smtp_tls": "none"}), folder


@contextlib.contextmanager
def worker_process(settings: Settings, log_path: Path) -> Iterator[subprocess.Popen]:
    env = {**os.environ, **settings_env(settings)}
    with log_path.open("wb") as log:  # this run's only: a failure shows its last lines
        process = subprocess.Popen([sys.executable, "-m", "monitor.cli", "worker"], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            except KeyboardInterrupt:  # a second Ctrl-C while it stops: stop it now
                process.kill()
                process.wait()
                raise


@contextlib.contextmanager
def stopped_like_ctrl_c() -> Iterator[None]:
    """SIGTERM and SIGHUP (`kill`, a service manager, a closed terminal) stop the demo as
    Ctrl-C does, stopping what it started; by default they would end this process at
    once and leave its worker running."""
    signals = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_port_free(settings: Settings) -> None:
    """DemoFailed when something already answers on the worker's web port: an earlier
    demo or a worker still running would answer the demo's questions in place of its
    own worker (which could not listen there), and the demo would report on it."""
    host, port = settings.web_host, settings.web_port
    target = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        with socket.create_connection((target, port), timeout=2):
            pass
    except OSError:
        return  # nobody answers: the worker says so itself if it still cannot listen
    raise DemoFailed(f"MONITOR_WEB_PORT {port}: something already answers on "
                     f"{host_port(target, port)} (an earlier demo, or a worker, still "
                     "running?); stop it, or give the demo another port with --web-port")


def get_json(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None


def wait_until(check: Callable[[], object], timeout: float, what: str,
               process: subprocess.Popen, log_path: Path) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DemoFailed(f"the worker stopped while {what}:{_tail(log_path)}\n"
                             f"its log: {log_path}")
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise DemoFailed(f"timed out while {what}:{_tail(log_path)}\nthe worker's log: {log_path}")


def _tail(log_path: Path, lines: int = 5) -> str:
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return " (no log)"
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return "".join(f"\n  {line}" for line in kept) or " (its log is empty)"


def processed(status: object) -> int:
    if not isinstance(status, dict):
        return 0
    return sum(sum(t["events"]["accepted"].values()) + sum(t["events"]["duplicates"].values())
               for t in status.values())


def run_demo(settings: Settings, log_path: Path, exit_when_done: bool) -> int:
    out = Console(highlight=False, soft_wrap=True)
    stream, _raw, _size = open_log(str(log_path))  # gzip or plain, as replay reads it
    with stream:
        lines = [line.rstrip(b"\r\n") for line in read_lines(stream, str(log_path))
                 if line.strip()]
    valid = sum(type(parse_event(line)) is not Rejection for line in lines)
    if not valid:
        raise DemoFailed(f"{log_path}: no valid event in {len(lines)} lines (see "
                         f"`safety-monitor replay {log_path}` for each line's reason)")
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    # here, not in the folder of an embedded broker's run, which goes when the demo ends
    worker_log = settings.state_dir / "worker.log"
    check_port_free(settings)
    with stopped_like_ctrl_c(), broker_for(settings) as settings, \
            mailbox_for(settings) as (settings, mail_dir):
        base = f"http://{settings.web_host}:{settings.web_port}"
        with worker_process(settings, worker_log) as worker:
            out.print(f"worker starting (log: {worker_log}) ...")
            wait_until(lambda: get_json(f"{base}/readyz")[0] == 200, 120, "starting",
                       worker, worker_log)
            sent = asyncio.run(publish(settings.broker, settings.events_topic, lines,
                                       settings.partitions))
            out.print(f"published {sent} events of {log_path} to {settings.events_topic}")
            status = wait_until(lambda: (s := get_json(f"{base}/status")[1]) and
                                processed(s) >= valid and s, 180, "processing the log",
                                worker, worker_log)
            _summary(out, status, base, mail_dir)
            if not exit_when_done:
                out.print("\n[bold]Running. Ctrl-C stops the worker, the broker and the "
                          "mailbox.[/]")
                with contextlib.suppress(KeyboardInterrupt):
                    while worker.poll() is None:
                        time.sleep(1)
            elif mail_dir is not None:
                _wait_for_mail(mail_dir)
    return 0


def _summary(out: Console, status: dict, base: str, mail_dir: Path | None) -> None:
    for trial_id, trial in status.items():
        rules = ", ".join(f"{rule_id} {rule['state']}" for rule_id, rule in
                          trial["rules"].items())
        endpoint = trial["primary_endpoint"]
        out.print(f"[bold]{trial_id}[/]: {trial['subjects']['infused']} subjects infused; "
                  f"in-window AEs {endpoint['ae']}, SAEs {endpoint['sae']}; rules: {rules}")
    out.print(f"status:  {base}/status\nmetrics: {base}/metrics\nhealth:  {base}/healthz, "
              f"{base}/readyz")
    if mail_dir is not None:
        out.print(f"e-mails: {mail_dir} (one .eml file per alert e-mail)")


def _wait_for_mail(mail_dir: Path, quiet_for: float = 5.0) -> None:
    """Give the e-mail agent time to send what the alerts asked for (it is in no hurry:
    the demo's --exit-when-done only stops once the mailbox has been quiet a while)."""
    last, since = -1, time.monotonic()
    while time.monotonic() - since < quiet_for:
        count = len(list(mail_dir.glob("*.eml")))
        if count != last:
            last, since = count, time.monotonic()
        time.sleep(0.5)
