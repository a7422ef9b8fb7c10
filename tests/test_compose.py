"""docker-compose.yml, the Dockerfile, and the Prometheus and Grafana files under deploy/
agree with each other and with what the worker reads and exports.

Docker cannot run where these tests run, so they check consistency instead: images are
pinned, ports and environment variables match the `Settings` the worker reads, the
worker's command exists, every mounted file exists, and every metric name (and label)
that the dashboard queries is one the worker exports.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from monitor.cli import build_parser, run_worker
from monitor.metrics import Metrics, exported_names
from monitor.replay import replay
from monitor.rules_loader import load_rules_dir
from monitor.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DEPLOY = ROOT / "deploy"
PROMETHEUS = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
DATASOURCES = yaml.safe_load(
    (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
PROVIDERS = yaml.safe_load(
    (DEPLOY / "grafana" / "provisioning" / "dashboards" / "safety-monitor.yml").read_text())
DASHBOARD = json.loads((DEPLOY / "grafana" / "dashboards" / "safety-monitor.json").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
# labels Prometheus adds to every scraped series
TARGET_LABELS = {"job", "instance"}


def environment(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def port_mappings(service: str) -> list[tuple[str, int]]:
    """(host part, container port) of each ``ports:`` entry."""
    out = []
    for entry in SERVICES[service].get("ports", []):
        host, _, container = str(entry).rpartition(":")
        out.append((host, int(container.split("/")[0])))
    return out


def host_ports(spec: str) -> range:
    first, _, last = spec.rpartition(":")[2].partition("-")
    return range(int(first), int(last or first) + 1)


def worker_settings(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    """The `Settings` the worker builds from this environment (and nothing else)."""
    for key in list(os.environ):
        if key.startswith("MONITOR_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def dockerfile_env() -> dict[str, str]:
    text = DOCKERFILE.replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in shlex.split(line[4:]))
    return env


def dockerfile_instruction(name: str) -> str:
    lines = [line for line in DOCKERFILE.splitlines() if line.startswith(f"{name} ")]
    assert len(lines) == 1, f"one {name} in the Dockerfile"
    return lines[0][len(name) + 1:]


# --- services and images -----------------------------------------------------------------

def test_the_stack_has_its_five_services() -> None:
    assert set(SERVICES) == {"kafka", "worker", "prometheus", "grafana", "mailpit"}


@pytest.mark.parametrize("service", ["kafka", "prometheus", "grafana", "mailpit"])
def test_images_are_pinned(service: str) -> None:
    image = SERVICES[service]["image"]
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest", image
    expected = {"kafka": "apache/kafka", "prometheus": "prom/prometheus",
                "grafana": "grafana/grafana", "mailpit": "axllent/mailpit"}[service]
    assert name == expected


def test_the_worker_is_built_from_the_repo_dockerfile() -> None:
    build = SERVICES["worker"]["build"]
    context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile",
                                                                        "Dockerfile")
    assert (context / dockerfile).resolve() == ROOT / "Dockerfile"
    assert dockerfile_instruction("FROM") == "python:3.11-slim"
    assert "pip install" in DOCKERFILE


def test_no_two_services_publish_the_same_host_port() -> None:
    taken: list[int] = []
    for service in SERVICES:
        for host, _container in port_mappings(service):
            taken.extend(host_ports(host))
    assert len(taken) == len(set(taken)), taken


def test_every_bind_mount_exists_in_the_repo() -> None:
    for service, body in SERVICES.items():
        for volume in body.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{service}: {source}"
            else:
                assert source in COMPOSE.get("volumes", {}), f"{service}: {source}"


# --- the worker: command, environment, ports ------------------------------------------

def command_argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


@pytest.mark.parametrize("where", ["compose", "dockerfile"])
def test_the_worker_command_exists(where: str) -> None:
    argv = (command_argv(SERVICES["worker"]["command"]) if where == "compose"
            else json.loads(dockerfile_instruction("CMD")))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts
    assert scripts[argv[0]] == "monitor.cli:main"
    args = build_parser().parse_args(argv[1:])
    assert args.run is run_worker


def test_worker_environment_names_are_settings(monkeypatch) -> None:
    fields = set(Settings.model_fields)
    for source, env in (("compose", environment("worker")), ("Dockerfile", dockerfile_env())):
        for key in env:
            if key.startswith("MONITOR_"):
                assert key.removeprefix("MONITOR_").lower() in fields, f"{source}: {key}"
        worker_settings(monkeypatch, {k: v for k, v in env.items()
                                      if k.startswith("MONITOR_")})  # values validate


def test_worker_environment_points_at_the_other_services(monkeypatch) -> None:
    settings = worker_settings(monkeypatch, environment("worker"))
    broker = settings.broker.removeprefix("kafka://")
    advertised = environment("kafka")["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert any(listener.endswith(f"://{broker}") for listener in advertised), broker
    assert broker.split(":")[0] == SERVICES["kafka"].get("hostname", "kafka") == "kafka"
    assert settings.smtp_host in SERVICES
    smtp_bind = environment(settings.smtp_host)["MP_SMTP_BIND_ADDR"]
    assert int(smtp_bind.rpartition(":")[2]) == settings.smtp_port
    assert settings.smtp_tls == "none"  # Mailpit speaks plain SMTP here
    assert settings.web_host == "0.0.0.0"  # reachable from Prometheus's container
    assert settings.rules_dir == Path(dockerfile_env()["MONITOR_RULES_DIR"])
    mounted = {v.split(":")[1]: v.split(":")[0] for v in SERVICES["worker"]["volumes"]}
    assert (ROOT / mounted[str(settings.rules_dir)]).resolve() == ROOT / "rules"


def test_worker_web_port_is_published_and_scraped(monkeypatch) -> None:
    settings = worker_settings(monkeypatch, environment("worker"))
    assert [container for _host, container in port_mappings("worker")] == [settings.web_port]
    assert f"EXPOSE {settings.web_port}" in DOCKERFILE
    replicas = SERVICES["worker"]["deploy"]["replicas"]
    assert replicas >= 2
    host, _ = port_mappings("worker")[0]
    assert len(host_ports(host)) >= replicas, "one host port per replica"
    (job,) = [j for j in PROMETHEUS["scrape_configs"] if j["job_name"] == "safety-monitor"]
    (discovery,) = job["dns_sd_configs"]
    assert discovery["names"] == ["worker"] and discovery["type"] == "A"
    assert discovery["port"] == settings.web_port
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_kafka_runs_in_kraft_mode_with_one_broker() -> None:
    env = environment("kafka")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not any("ZOOKEEPER" in key for key in env)
    listeners = dict(item.split("://") for item in env["KAFKA_LISTENERS"].split(","))
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    voter = env["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    assert voter == f"{env['KAFKA_NODE_ID']}@kafka{listeners[controller]}"
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
                     .split(","))
    assert set(listeners) == set(protocols)
    for listener in env["KAFKA_ADVERTISED_LISTENERS"].split(","):
        name, address = listener.split("://")
        assert address.endswith(listeners[name]), listener  # same port as it listens on
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    published = [host for host, _ in port_mappings("kafka")]
    host_listener = [a for a in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
                     if "localhost" in a]
    assert host_listener and all(h.split(":")[0] in a for h in published
                                 for a in host_listener)


# --- Prometheus, Grafana, Mailpit ------------------------------------------------------

def test_prometheus_reads_the_repo_config() -> None:
    service = SERVICES["prometheus"]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in service["command"])
    mounted = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    source = mounted[flags["config.file"]]
    assert (ROOT / source).resolve() == DEPLOY / "prometheus" / "prometheus.yml"
    assert 9090 in [container for _h, container in port_mappings("prometheus")]


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    service = SERVICES["grafana"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    assert (ROOT / mounted["/etc/grafana/provisioning"]).resolve() == \
        DEPLOY / "grafana" / "provisioning"
    (provider,) = PROVIDERS["providers"]
    folder = provider["options"]["path"]
    assert (ROOT / mounted[folder]).resolve() == DEPLOY / "grafana" / "dashboards"
    home = environment("grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(folder + "/")
    assert (DEPLOY / "grafana" / "dashboards" / home.removeprefix(folder + "/")).exists()
    (datasource,) = DATASOURCES["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert 3000 in [container for _h, container in port_mappings("grafana")]


def test_mailpit_publishes_its_web_inbox() -> None:
    ui = int(environment("mailpit")["MP_UI_BIND_ADDR"].rpartition(":")[2])
    assert ui in [container for _h, container in port_mappings("mailpit")]


# --- the dashboard queries what the worker exports -------------------------------------

def dashboard_panels() -> list[dict]:
    panels = []
    for panel in DASHBOARD["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    assert len(exprs) > 20
    return exprs


@pytest.fixture(scope="module")
def exported() -> tuple[set[str], dict[str, set[str]]]:
    """Every sample name the worker's bundle exports, and the labels of each, after the
    sample log (so that every labelled family has samples)."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    catalog = load_rules_dir(ROOT / "rules")
    log = (ROOT / "examples" / "isc-19-29" / "events.jsonl").read_bytes()
    metrics.observe_replay(replay(log.splitlines(keepends=True), catalog), catalog)
    labels: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return exported_names(registry), labels


METRIC = re.compile(r"\b(safety_[a-z0-9_]+)\s*(?:\{([^}]*)\})?")
MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def test_every_metric_the_dashboard_queries_is_exported(exported) -> None:
    names, _labels = exported
    used = {m.group(1) for expr in dashboard_exprs() for m in METRIC.finditer(expr)}
    used |= {m.group(1) for var in DASHBOARD["templating"]["list"]
             for m in METRIC.finditer(var.get("definition", ""))}
    assert used, "the dashboard queries safety_* metrics"
    assert not used - names, f"not exported: {sorted(used - names)}"


def test_every_label_the_dashboard_uses_exists(exported) -> None:
    _names, labels = exported
    for expr in dashboard_exprs():
        known = set(TARGET_LABELS) | {"le"}
        for match in METRIC.finditer(expr):
            metric_labels = labels.get(match.group(1), set()) | TARGET_LABELS
            known |= metric_labels
            for label in MATCHER.findall(match.group(2) or ""):
                assert label in metric_labels, f"{match.group(1)} has no label {label}"
        for group in GROUPING.findall(expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in known, f"{expr}: no metric here has label {label}"


def test_the_dashboard_has_the_rows_the_issue_asks_for() -> None:
    rows = [p["title"].lower() for p in DASHBOARD["panels"] if p["type"] == "row"]
    for words in (("subjects", "state"), ("adverse events",), ("rules",),
                  ("alerts", "e-mails"), ("dead letters",), ("throughput", "latency", "lag")):
        assert any(all(w in row for w in words) for row in rows), words
    (trial,) = [v for v in DASHBOARD["templating"]["list"] if v["name"] == "trial"]
    assert trial["multi"] and trial["includeAll"]
    state_exprs = [e for e in dashboard_exprs() if re.search(r"safety_(subjects|rule_|in_window)",
                                                             e)]
    assert all('trial=~"$trial"' in e for e in state_exprs)


def test_the_dashboard_uses_the_provisioned_datasource() -> None:
    (datasource,) = DATASOURCES["datasources"]
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        sources = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
        assert all(s == {"type": "prometheus", "uid": datasource["uid"]} for s in sources), \
            panel["title"]
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids))
