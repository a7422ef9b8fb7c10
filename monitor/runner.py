"""Starting the worker process: the embedded broker when none is configured, the
metrics bundle, the e-mail notifier when SMTP is configured, then faust's Worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .engine.rules import TrialRules
from .replay import Unavailable
from .settings import Settings, broker_servers, host_port

BROKER_CONNECT_TIMEOUT = 5.0  # seconds, for the check that a configured broker answers


class BrokerUnreachable(Unavailable):
    """No broker of MONITOR_BROKER accepts a connection: exit status 1."""


@contextlib.contextmanager
def broker_for(settings: Settings) -> Iterator[Settings]:
    """The settings with a broker: the configured one, else an embedded local one."""
    if settings.broker is not None:
        yield settings
        return
    from .embedded import EmbeddedBroker

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    # the embedded broker keeps its data in memory: table state on disk from an earlier
    # run would not match it, so this run's state lives in a folder of its own
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(
            prefix="embedded-", dir=settings.state_dir) as state_dir:
        print(f"embedded broker (tansu) at {broker.url}; set MONITOR_BROKER for a real one",
              flush=True)
        yield settings.model_copy(update={"broker": broker.url, "broker_is_tansu": True,
                                          "state_dir": Path(state_dir)})


def run_worker_process(settings: Settings, catalog: dict[str, TrialRules],
                       loglevel: str = "warning") -> int:
    from faust.worker import Worker

    if not settings.smtp_host:
        print("no MONITOR_SMTP_HOST: alerts go to the alerts topic, /status and /metrics, "
              "but no e-mail is sent", file=sys.stderr, flush=True)
    check_environment(settings)
    with broker_for(settings) as settings:
        # faust's "buffer full" warning of its producer buffer (100 messages) is no
        # problem: the state rows bypass it (`ConfirmedTable.write`), alerts need not
        logging.getLogger("faust.transport.producer").setLevel(logging.ERROR)
        app = worker_app(settings, catalog)
        worker = Worker(app, loglevel=loglevel, redirect_stdouts=False, quiet=True)
        # faust's startup spinner sets the root logger to DEBUG for good, so every debug
        # call in aiokafka and faust builds a record that no handler prints
        worker.spinner = None
        if hasattr(signal, "SIGHUP"):
            # a closed terminal stops the worker as SIGTERM does, stopping its embedded
            # broker too (which runs in a session of its own, out of the terminal's reach)
            signal.signal(signal.SIGHUP, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
        try:
            worker.execute_from_commandline()
        except SystemExit as exc:
            return int(exc.code or 0)
    return 0


def check_environment(settings: Settings) -> None:
    """What the worker needs from this host, checked before faust starts, so that a
    mistake is one line rather than a traceback: the state folder (created), the web
    port (free), and a configured broker (answers). ValueError names the setting;
    `BrokerUnreachable` when no broker answers."""
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"MONITOR_STATE_DIR {settings.state_dir}: cannot create the "
                         f"folder: {exc.strerror or exc}") from None
    host, port = settings.web_host, settings.web_port
    try:  # as the web server will: the address family of the host (:: is IPv6)
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]  # "": every interface
        with socket.create_server((host, port), family=family):
            pass
    except OSError as exc:
        raise ValueError(f"MONITOR_WEB_PORT {port}: cannot listen on {host_port(host, port)} "
                         f"(MONITOR_WEB_HOST): {exc.strerror or exc}") from None
    if settings.broker is not None:  # else the embedded broker starts next
        check_broker(settings.broker)


def check_broker(url: str) -> None:
    """`BrokerUnreachable` unless a broker of ``url`` accepts a TCP connection."""
    failures = []
    for host, port in broker_servers(url):
        try:
            with socket.create_connection((host, port), BROKER_CONNECT_TIMEOUT):
                return
        except OSError as exc:
            failures.append(f"{host_port(host, port)}: {exc.strerror or exc}")
    raise BrokerUnreachable(f"MONITOR_BROKER: no broker answers ({'; '.join(failures)}); "
                            "is Kafka running and reachable from here?")


def worker_app(settings: Settings, catalog: dict[str, TrialRules]):  # noqa: ANN201
    """The worker's faust app: the stream (whose consumer reads partitions never
    committed from their beginning, see `monitor.faust_ext`), the metrics, and the
    e-mail agent when SMTP is configured."""
    from .stream import build_app

    return build_app(settings, catalog, **_extras(settings, catalog))[0]


def _extras(settings: Settings, catalog: dict[str, TrialRules]) -> dict:
    """The metrics bundle, and the e-mail agent when SMTP is configured."""
    from .metrics import Metrics, new_registry

    metrics = Metrics(new_registry())
    metrics.watch(catalog)
    extras: dict = {"metrics": metrics}
    if settings.smtp_host:
        extras["notifier"] = email_agent(settings, catalog, metrics)
    return extras


def email_agent(settings: Settings, catalog: dict[str, TrialRules], metrics: object):  # noqa: ANN201
    """Adds the agent that e-mails each alert transition once (a notification log in a
    table for rebalances, and a local fsynced file for a crash on this host)."""
    import orjson

    from .faust_ext import (
        Carrier,
        ConfirmedTable,
        OffsetGuard,
        current_event,
        fill_tails,
        mark_acked,
        undelivered,
    )
    from .notify import (
        CombinedLog,
        JsonLinesLog,
        MappingLog,
        Notifier,
        SmtpSender,
        alert_from_payload,
    )
    from .publish import bootstrap
    from .stream import TAIL_CHECK_SECONDS, is_ready

    def add(app, alerts_topic) -> None:  # noqa: ANN001
        # no value_type: faust's JSON gives dicts back; value_type=dict would make it
        # call dict.from_data on every read and changelog record (ValueDecodeError), and
        # a worker restoring this table from its changelog would never become ready
        sent = ConfirmedTable.add_to(app, "notifications", key_type=str,
                                     partitions=settings.partitions)
        log = CombinedLog(JsonLinesLog(settings.state_dir / "notifications.jsonl"),
                          MappingLog(sent))
        notifier = Notifier(catalog, SmtpSender(settings), log,
                            on_outcome=getattr(metrics, "observe_email", None))

        guard = OffsetGuard()  # alerts faust fetched and never delivered: see faust_ext
        servers = bootstrap(settings.broker)
        busy = asyncio.Lock()  # one alert at a time: the agent's, or `email_tails`'s

        async def send(messages: list) -> None:
            for message in messages:
                await notifier.notify(*alert_from_payload(orjson.loads(message.value)))
                # the alert's table entry reaches the broker before this alert is acked
                # and the next one e-mailed: a worker that takes the partition over with
                # no local log then e-mails again at most the one alert whose entry was
                # not yet written when this worker died. (One write in flight at a time
                # also keeps this changelog at one record per produce batch, which tansu
                # needs to report its end offset right: see broker_is_tansu.)
                await sent.written()

        @app.agent(alerts_topic)
        async def email(stream) -> None:  # noqa: ANN001
            async for event in stream.events():
                async with busy:
                    records, missed = await undelivered(guard, app.consumer, servers,
                                                        event.message)
                    await send([*records, event.message])
                    mark_acked(app.consumer, event.message.tp, missed)

        @app.timer(TAIL_CHECK_SECONDS)
        async def email_tails() -> None:
            """E-mail what faust fetched and dropped at the end of a partition of the
            alerts topic: an alert can be the last message on it for days."""
            async def send_records(_partition: object, records: list) -> None:
                for record in records:
                    with current_event(Carrier(record)):  # the log's partition: the alert's
                        await send([record])

            async with busy:
                if is_ready(app):  # not before the notification log is recovered
                    await fill_tails(guard, app.consumer, servers,
                                     alerts_topic.get_topic_name(), send_records)

    return add
