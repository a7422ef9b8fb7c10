"""Alert e-mails from a real worker (issue #4, the worker side of tests/test_notify_smtp.py).

Real `safety-monitor worker` processes on the session's tansu broker send to a real SMTP
server (`LocalMailbox`: aiosmtpd on loopback, started by the test). What arrives is
compared with the alert transitions `replay` finds in the same log: one e-mail per
transition, to the recipients the rules file names for its severity, never two.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from monitor.alert_email import MESSAGE_ID_DOMAIN, recipients_for
from monitor.embedded import LocalMailbox
from monitor.notify import read_log_lines
from monitor.replay import replay
from monitor.rules_loader import load_rules_dir
from tests.integration.test_stream import generator
from tests.integration.workers import (
    ROOT,
    RULES,
    Topics,
    Worker,
    accepted,
    alerts_on,
    expected,
    read_topic,
    send,
    wait_for,
)

SAMPLE = ROOT / "examples" / "isc-19-29" / "events.jsonl"


def mail_env(mailbox: LocalMailbox) -> dict[str, str]:
    """The worker's SMTP settings: this mailbox, and a short back-off for the tests."""
    return {"MONITOR_SMTP_HOST": mailbox.host, "MONITOR_SMTP_PORT": str(mailbox.port),
            "MONITOR_SMTP_FROM": "safety-monitor@example.org", "MONITOR_SMTP_TIMEOUT": "5",
            "MONITOR_SMTP_RETRY_INITIAL": "0.2", "MONITOR_SMTP_RETRY_MAX": "0.5"}


def key_of(message_id: str) -> str:
    """``ISC.19.29/related-sae/1#2`` back from ``<ISC.19.29=related-sae=1.2@safety-monitor>``
    (the inverse of `monitor.alert_email.message_id`)."""
    local, _, domain = message_id.strip().removeprefix("<").removesuffix(">").rpartition("@")
    assert domain == MESSAGE_ID_DOMAIN, message_id
    trial, rule, number = local.rsplit("=", 2)
    episode, sequence = number.split(".")
    return f"{urllib.parse.unquote(trial)}/{rule}/{episode}#{sequence}"


def received_keys(mailbox: LocalMailbox) -> list[str]:
    """The transition key of every stored message, in arrival order."""
    return [key_of(message["Message-ID"]) for message in mailbox.messages()]


def arrived(mailbox: LocalMailbox, count: int) -> list[str] | None:
    keys = received_keys(mailbox)
    return keys if len(keys) >= count else None


def committed_offsets(broker: str, topics: Topics, topic: str) -> dict[int, int | None]:
    """The workers' committed offset of each partition of ``topic`` (no group join)."""
    async def run() -> dict[int, int | None]:
        consumer = AIOKafkaConsumer(bootstrap_servers=broker.removeprefix("kafka://"),
                                    group_id=topics.env["MONITOR_APP_ID"],
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            return {n: await consumer.committed(TopicPartition(topic, n)) for n in range(4)}
        finally:
            await consumer.stop()

    return asyncio.run(run())


def through_the_alerts(broker: str, topics: Topics) -> bool:
    """The workers have committed every record now on the alerts topic. faust commits
    an alert's offset only after the e-mail agent finished with it (e-mail sent and
    logged, or skipped), so no e-mail for these records can follow."""
    ends: dict[int, int] = {}
    for record in read_topic(broker, topics.alerts):
        ends[record.partition] = max(ends.get(record.partition, 0), record.offset + 1)
    committed = committed_offsets(broker, topics, topics.alerts)
    return all((committed[partition] or 0) >= end for partition, end in ends.items())


def all_emailed(mailbox: LocalMailbox, broker: str, topics: Topics, count: int,
                timeout: float) -> list[str]:
    """Wait for ``count`` e-mails and until the workers are through the alerts topic,
    so that an e-mail sent twice would be there too. The keys received."""
    wait_for(lambda: arrived(mailbox, count), timeout, f"{count} e-mails", step=0.2)
    wait_for(lambda: through_the_alerts(broker, topics), timeout,
             "the e-mail agent through the alerts topic")
    return received_keys(mailbox)


def twice(keys: list[str]) -> dict[str, int]:
    return {key: n for key, n in Counter(keys).items() if n > 1}


def emails_by_outcome(worker: Worker) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {s.labels["outcome"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "safety_emails_total"}


def logged(state_dir: Path) -> list[dict]:
    """The worker's local notification log (JSON lines, fsynced after each e-mail)."""
    return [{"key": key, **info}
            for key, info in read_log_lines(state_dir / "notifications.jsonl")]


def test_each_alert_transition_is_one_email(kafka_broker: str, smtp_server: LocalMailbox,
                                            tmp_path: Path) -> None:
    """The sample log: one e-mail per alert transition (key read back from the
    Message-ID), to the rules file's recipients for its severity, in order within an
    episode, each recorded once in the worker's notification log."""
    lines = SAMPLE.read_bytes().splitlines()
    _, alerts = expected(lines)
    by_key = {a["key"]: a for a in alerts}
    catalog = load_rules_dir(RULES)
    topics, state = Topics(), tmp_path / "state"
    worker = Worker(kafka_broker, topics, state, **mail_env(smtp_server)).start()
    try:
        worker.wait_ready()
        assert send(kafka_broker, topics.events, lines) == len(lines)
        keys = all_emailed(smtp_server, kafka_broker, topics, len(alerts), 90)
        assert not twice(keys), f"e-mailed more than once: {twice(keys)}"
        assert sorted(keys) == sorted(by_key), diagnosis(
            kafka_broker, topics, smtp_server, sorted(by_key), [worker], lines, RULES)
        for message in smtp_server.messages():
            alert = by_key[key_of(message["Message-ID"])]
            assert message["X-Safety-Monitor-Alert"] == alert["key"]
            assert message["X-Safety-Monitor-Severity"] == alert["severity"]
            assert message["From"] == "safety-monitor@example.org"
            want = recipients_for(catalog[alert["trial_id"]], alert["severity"])
            assert message["X-RcptTo"].split(", ") == list(want)
            assert alert["rule_id"] in message["Subject"]
        for alert_id in {a["id"] for a in alerts}:  # an episode's messages in order
            sequences = [int(k.rsplit("#", 1)[1]) for k in keys if k.startswith(alert_id + "#")]
            assert sequences == sorted(sequences), (alert_id, sequences)
        assert emails_by_outcome(worker)["sent"] == len(alerts)
        log = logged(state)
        assert sorted(e["key"] for e in log) == sorted(by_key)
        assert {e["outcome"] for e in log} == {"sent"}
    finally:
        worker.stop()


def test_smtp_outage_loses_nothing_and_sends_once(kafka_broker: str, smtp_server: LocalMailbox,
                                                  tmp_path: Path) -> None:
    """The server is down when the worker starts, comes up, goes down mid-run, comes
    up again: each time the alerts wait, and every one arrives exactly once."""
    lines = SAMPLE.read_bytes().splitlines()
    half = len(lines) // 2
    topics = Topics()
    smtp_server.stop()
    worker = Worker(kafka_broker, topics, tmp_path / "state", **mail_env(smtp_server)).start()
    try:
        worker.wait_ready()
        before = 0
        for part, so_far in ((lines[:half], lines[:half]), (lines[half:], lines)):
            want = len(expected(so_far)[1])
            assert want > before  # each half raises alerts of its own
            retries = emails_by_outcome(worker)["retried"]
            send(kafka_broker, topics.events, part)
            wait_for(lambda w=want: len(alerts_on(kafka_broker, topics.alerts)) >= w, 60,
                     "the alerts decided")
            wait_for(lambda r=retries: emails_by_outcome(worker)["retried"] >= r + 3, 30,
                     "the worker retrying")
            assert len(received_keys(smtp_server)) == before  # the server is down: waiting
            smtp_server.start()
            wait_for(lambda w=want: arrived(smtp_server, w), 60, f"{want} e-mails", step=0.2)
            smtp_server.stop()
            before = want
        smtp_server.start()
        keys = all_emailed(smtp_server, kafka_broker, topics, before, 60)
        want = sorted(a["key"] for a in expected(lines)[1])
        assert not twice(keys), f"e-mailed more than once: {twice(keys)}"
        assert sorted(keys) == want, diagnosis(kafka_broker, topics, smtp_server, want,
                                               [worker], lines, RULES)
        outcomes = emails_by_outcome(worker)
        assert outcomes["sent"] == len(keys) and outcomes["failed_permanent"] == 0
    finally:
        worker.stop()


def many_trials(folder: Path, trials: int) -> Path:
    """A rules folder with the ISC.19.29 rules for the generator's SIM trials too, so
    that a generated log raises many alerts."""
    folder.mkdir()
    text = (RULES / "isc-19-29.yaml").read_text()
    (folder / "isc-19-29.yaml").write_text(text)
    for n in range(1, trials):
        trial = f"SIM.{n:04d}"
        (folder / f"{trial}.yaml").write_text(text.replace("trial_id: ISC.19.29",
                                                           f"trial_id: {trial}"))
    return folder


def generated_alerts(rules: Path, lines: list[bytes]) -> list[str]:
    now = dt.datetime.now(dt.UTC)
    return sorted(a.key for a in replay(lines, load_rules_dir(rules), as_of=now).alerts)


def changelog_keys(broker: str, topics: Topics) -> set[str]:
    """The keys on the changelog of the workers' ``notifications`` table: what a worker
    with no local notification log learns was e-mailed already."""
    topic = f"{topics.env['MONITOR_APP_ID']}-notifications-changelog"
    return {orjson.loads(m.key) for m in read_topic(broker, topic)}  # keys are JSON


def differences(worker: dict, replayed: dict) -> dict:
    """The parts of one trial's report that differ; for a rule, each field that differs
    as (worker, replay), cut short."""
    out: dict = {part: "differs" for part in ("subjects", "adverse_events", "events")
                 if worker.get(part) != replayed[part]}
    rules = worker.get("rules", {})
    for rule_id, rule in replayed["rules"].items():
        mine = rules.get(rule_id, {})
        if mine != rule:
            out[rule_id] = {name: (str(mine.get(name))[:120], str(value)[:120])
                            for name, value in rule.items() if mine.get(name) != value}
    return out


def diagnosis(broker: str, topics: Topics, mailbox: LocalMailbox, want: list[str],
              workers: list[Worker], lines: list[bytes], rules: Path) -> str:
    """Why the e-mails differ from replay's transitions. The engine's side: the alerts
    topic itself lacks some of replay's transitions or has keys replay does not (decided
    or numbered differently; then how the workers' /status differs from replay). The
    e-mail side: the alerts topic is right, but some of it was never e-mailed."""
    received, wanted = received_keys(mailbox), set(want)
    on_topic = {a["key"] for a in alerts_on(broker, topics.alerts)}
    not_decided, not_in_replay = sorted(wanted - on_topic), sorted(on_topic - wanted)
    now = dt.datetime.now(dt.UTC)
    report = orjson.loads(orjson.dumps(
        replay(lines, load_rules_dir(rules), as_of=now).trials.report(now)))
    status = {trial: body for worker in workers for trial, body in worker.status().items()}
    differs = {trial: differences(status.get(trial, {}), report[trial])
               for trial in sorted({key.split("/")[0] for key in not_decided + not_in_replay})}
    side = ("ENGINE SIDE: the alerts topic differs from replay" if not_decided or not_in_replay
            else "E-MAIL SIDE: the alerts topic has replay's transitions")
    return (f"{side}; e-mails missing: {sorted(wanted - set(received))[:6]}, e-mails not "
            f"in replay: {sorted(set(received) - wanted)[:6]}, e-mailed twice: "
            f"{twice(received)}; alerts topic: {len(not_decided)} of replay's transitions "
            f"missing {not_decided[:6]}, {len(not_in_replay)} keys replay does not have "
            f"{not_in_replay[:6]}, {len(on_topic - set(received))} never e-mailed "
            f"{sorted(on_topic - set(received))[:6]}; the workers stepped "
            f"{accepted(status)} of {len(lines)} events; their /status differs from replay "
            f"in {differs}")


@dataclass
class Killed:
    """A worker killed with SIGKILL while it was e-mailing, and what it left."""

    rules: Path
    lines: list[bytes]
    want: list[str]  # every transition replay finds in the log
    topics: Topics
    env: dict[str, str]
    received: list[str]  # e-mails the server had accepted
    logged: set[str]  # keys in the worker's local notification log
    on_changelog: set[str]  # keys of its notifications table that reached the broker
    committed: dict[int, int | None]  # its committed offsets on the alerts topic
    alerts: list  # the alerts topic's records

    def emailed_after_commit(self, known: set[str]) -> list[tuple[int, int, str]]:
        """(partition, offset, key) of the records past the committed offsets whose key
        is in ``known``: a restarted worker that knows ``known`` reads each again and
        skips it."""
        past = {(r.partition, r.offset): orjson.loads(r.value)["key"] for r in self.alerts
                if r.offset >= (self.committed[r.partition] or 0)}  # once each
        return sorted((*at, key) for at, key in past.items() if key in known)


def kill_mid_sending(broker: str, mailbox: LocalMailbox, tmp_path: Path) -> Killed:
    """A worker e-mails the alerts of a generated log (6 trials) and is killed with
    SIGKILL after 30 e-mails, while it goes on sending, stepping events and writing
    its tables; often before it has committed an offset on every partition."""
    rules = many_trials(tmp_path / "rules", trials=6)
    lines = list(generator().lines(6, 20, 7, bad_lines=0))
    want = generated_alerts(rules, lines)
    assert len(want) >= 130
    topics, state = Topics(), tmp_path / "state"
    env = {**mail_env(mailbox), "MONITOR_RULES_DIR": str(rules)}
    worker = Worker(broker, topics, state, **env).start()
    try:
        worker.wait_ready()
        send(broker, topics.events, lines)
        wait_for(lambda: len(mailbox.message_files()) >= 30, 90, "30 e-mails", step=0.05)
    finally:
        worker.kill()
    killed = Killed(rules, lines, want, topics, env, received_keys(mailbox),
                    {entry["key"] for entry in logged(state)}, changelog_keys(broker, topics),
                    committed_offsets(broker, topics, topics.alerts),
                    read_topic(broker, topics.alerts))
    print(f"killed after {len(killed.received)} of {len(want)} e-mails; accepted, not "
          f"logged: {sorted(set(killed.received) - killed.logged)}; not on the changelog: "
          f"{sorted(set(killed.received) - killed.on_changelog)}; committed offsets: "
          f"{killed.committed}")
    assert len(killed.received) < len(want)  # killed while it was still sending
    assert not twice(killed.received)
    # one e-mail at a time, and its log line and table write are done before the next:
    # at most one accepted e-mail is missing from each (SMTP cannot close that window)
    assert len(set(killed.received) - killed.logged) <= 1
    assert len(set(killed.received) - killed.on_changelog) <= 1
    return killed


def restart_and_check(killed: Killed, second: Worker, broker: str, mailbox: LocalMailbox,
                      known: set[str]) -> None:
    """``second`` (started on the killed worker's topics) e-mails every transition;
    none twice but the one in the window above, when ``known`` (what ``second`` can
    know was sent) lacks it; and it skips every alert it reads again that was sent."""
    def why() -> str:
        return diagnosis(broker, killed.topics, mailbox, killed.want, [second],
                         killed.lines, killed.rules)

    second.wait_ready(90)
    try:
        keys = all_emailed(mailbox, broker, killed.topics, len(killed.want), 90)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {why()}") from None
    outcomes = emails_by_outcome(second)
    print(f"after the restart: {outcomes}")
    assert set(twice(keys)) <= set(killed.received) - known, \
        f"e-mailed more than once: {twice(keys)}"
    assert sorted(set(keys)) == killed.want, why()
    assert outcomes["failed_permanent"] == 0
    again = killed.emailed_after_commit(known)
    assert outcomes["skipped_duplicate"] >= len(again), \
        f"read again and skipped: {outcomes}; past the commits {killed.committed}: {again}"


def test_sigkill_then_restart_sends_no_email_twice(kafka_broker: str,
                                                    smtp_server: LocalMailbox,
                                                    tmp_path: Path) -> None:
    """kill -9 while e-mails go out, restart on the same state dir: every transition
    arrives, and none twice, but for the one e-mail the server may have accepted in the
    instant between its 250 reply and the fsynced log line (SMTP cannot close that
    window; the e-mail then repeats its Message-ID, so mail clients fold it)."""
    killed = kill_mid_sending(kafka_broker, smtp_server, tmp_path)
    second = Worker(kafka_broker, killed.topics, tmp_path / "state", **killed.env).start()
    try:
        restart_and_check(killed, second, kafka_broker, smtp_server,
                          killed.logged | killed.on_changelog)
        log = [entry["key"] for entry in logged(second.state_dir)]  # both workers'
        assert set(twice(log)) <= set(killed.received) - killed.logged
        assert sorted(set(log)) == killed.want
    finally:
        second.stop()


def test_sigkill_then_another_host_sends_no_email_twice(kafka_broker: str,
                                                        smtp_server: LocalMailbox,
                                                        tmp_path: Path) -> None:
    """kill -9 while e-mails go out, and a worker with no local state (another host)
    takes over: it learns what was sent from the ``notifications`` table's changelog
    alone, which has every e-mail but, at most, the last one accepted."""
    killed = kill_mid_sending(kafka_broker, smtp_server, tmp_path)
    second = Worker(kafka_broker, killed.topics, tmp_path / "other-host",
                    **killed.env).start()
    try:
        restart_and_check(killed, second, kafka_broker, smtp_server, killed.on_changelog)
        log = [entry["key"] for entry in logged(second.state_dir)]  # the second's only
        assert not twice(log)
        assert set(killed.want) - set(killed.received) <= set(log)
        assert set(log) <= set(killed.want) - killed.on_changelog
    finally:
        second.stop()


def test_a_worker_joining_mid_sending_sends_no_email_twice(kafka_broker: str,
                                                           smtp_server: LocalMailbox,
                                                           tmp_path: Path) -> None:
    """A second worker joins while the first e-mails the alerts of half the log: the
    partitions are split between them (a rebalance: the first finishes the e-mail in
    progress and commits, the second reads the notifications table of the partitions
    it gets from their changelog); then the other half. Every transition arrives, and
    none twice: in a rebalance nobody is killed, so not even one."""
    rules = many_trials(tmp_path / "rules", trials=6)
    lines = list(generator().lines(6, 20, 7, bad_lines=0))
    half = len(lines) // 2
    early, want = len(generated_alerts(rules, lines[:half])), generated_alerts(rules, lines)
    assert early >= 50 and len(want) >= early + 50
    topics = Topics()
    env = {**mail_env(smtp_server), "MONITOR_RULES_DIR": str(rules)}
    workers = [Worker(kafka_broker, topics, tmp_path / "state-1", **env).start()]
    try:
        workers[0].wait_ready()
        send(kafka_broker, topics.events, lines[:half])
        wait_for(lambda: len(smtp_server.message_files()) >= 20, 90, "20 e-mails", step=0.05)
        workers.append(Worker(kafka_broker, topics, tmp_path / "state-2", **env).start())
        workers[1].wait_ready(90)
        send(kafka_broker, topics.events, lines[half:])
        def why() -> str:
            return diagnosis(kafka_broker, topics, smtp_server, want, workers, lines, rules)

        try:
            keys = all_emailed(smtp_server, kafka_broker, topics, len(want), 120)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {why()}") from None
        outcomes = [emails_by_outcome(worker) for worker in workers]
        print(f"e-mails by worker: {outcomes}")
        assert not twice(keys), f"e-mailed more than once: {twice(keys)}"
        assert sorted(keys) == want, why()
        assert all(o["sent"] > 0 and o["failed_permanent"] == 0 for o in outcomes)
        logs = [entry["key"] for w in workers for entry in logged(w.state_dir)]
        assert sorted(logs) == want  # each e-mail in the log of the worker that sent it
    finally:
        for worker in workers:
            worker.stop()
