"""One frozen settings object, built at the entry point and passed down.

Every setting comes from the environment with the prefix ``MONITOR_`` (and from ``--``
options where a person would type them). Nothing else in the package reads
``os.environ``. Tests build ``Settings(...)`` directly.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MONITOR_", frozen=True, extra="ignore")

    broker: str | None = Field(None, description="Kafka URL, e.g. kafka://host:9092 (several: "
                                                 "kafka://a:9092;b:9092); unset = start an "
                                                 "embedded local broker")
    rules_dir: Path = Field(Path("rules"), description="folder of one YAML rules file per trial")
    web_port: int = Field(6066, ge=1, le=65535, description="port of /status, /metrics, "
                                                             "/healthz and /readyz")
    web_host: str = Field("127.0.0.1", description="address the web port binds to")
    state_dir: Path = Field(Path(".state"), description="where the worker keeps its local "
                                                        "table store")
    app_id: str = Field("safety-monitor", min_length=1,
                        description="consumer group and changelog prefix")
    events_topic: str = "safety.events"
    dead_letter_topic: str = "safety.events.dead"
    alerts_topic: str = "safety.alerts"
    partitions: int = Field(4, ge=1, description="partitions of the topics the worker creates")
    store: str = Field("rocksdb://", description="faust table store: rocksdb:// or memory://")
    session_timeout: float = Field(10.0, gt=0, description="seconds before a dead worker's "
                                                           "partitions move to another")
    heartbeat_interval: float = Field(1.0, gt=0)
    batch_size: int = Field(1000, ge=1, description="events the worker steps before it "
                                                    "writes its table once")
    batch_within: float = Field(0.2, gt=0, description="seconds to wait for a batch to fill")
    broker_is_tansu: bool = Field(False, description="the broker is tansu (dev and tests): "
                                  "end each batch's table writes with a row in a produce batch "
                                  "of its own, because tansu reports a partition's end offset "
                                  "as its last produce batch's first offset + 1")
    smtp_host: str | None = Field(None, description="SMTP server; unset = embedded local "
                                                    "mailbox in the demo, no e-mail otherwise")
    smtp_port: int = Field(25, ge=1, le=65535)
    smtp_tls: Literal["none", "starttls", "tls"] = "none"
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    smtp_from: str = "safety-monitor@localhost"
    smtp_timeout: float = Field(30.0, gt=0, description="seconds for each SMTP command")
    smtp_ca_file: Path | None = Field(None, description="CA bundle (PEM) that signs the SMTP "
                                                        "server's certificate, for a private "
                                                        "relay; unset = the system's CAs")
    smtp_retry_initial: float = Field(1.0, gt=0, description="first back-off ceiling (s) after "
                                                             "a transient SMTP failure")
    smtp_retry_max: float = Field(300.0, gt=0, description="largest back-off ceiling (s); "
                                                           "attempts go on until delivered")
    mail_dir: Path = Field(Path(".mail"), description="where the embedded mailbox keeps .eml "
                                                      "files")

    @field_validator("broker")
    @classmethod
    def _kafka_url(cls, value: str | None) -> str | None:
        value = value.strip() if value is not None else None
        if not value:
            return None
        if value[:8].lower() == "kafka://":  # faust reads the scheme in any case
            value = "kafka://" + value[8:]
        if not value.startswith("kafka://"):
            raise ValueError(f"{value!r} is not a kafka:// URL (e.g. kafka://localhost:9092)")
        try:
            servers = broker_servers(value)
        except ValueError:  # a port that is no number, or out of range
            servers = []
        if not servers or not all(host for host, _port in servers):
            raise ValueError(f"{value!r} names no broker as host:port "
                             "(e.g. kafka://localhost:9092)")
        return value

    @field_validator("smtp_from")
    @classmethod
    def _mailbox(cls, value: str) -> str:
        if not re.fullmatch(r"[^@\s<>\"]+@[^@\s<>\"]+", value):
            raise ValueError(f"{value!r} is not an e-mail address (e.g. "
                             "safety-monitor@example.org, no display name)")
        return value

    @field_validator("smtp_ca_file")
    @classmethod
    def _ca_bundle(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # not read without TLS (a shared env file may name it anyway); an invalid
        # smtp_tls is missing from info.data: check the file too, so both errors show
        if value is None or info.data.get("smtp_tls", "tls") == "none":
            return value
        try:  # here, once, rather than at every delivery attempt, retried for ever
            ssl.create_default_context(cafile=str(value))
        except OSError as exc:  # ssl.SSLError too: a file that holds no PEM certificate
            raise ValueError(f"{str(value)!r} is not a readable PEM bundle of CA "
                             f"certificates: {exc.strerror or exc}") from None
        return value

    @field_validator("store")
    @classmethod
    def _table_store(cls, value: str) -> str:
        if value not in ("rocksdb://", "memory://"):
            raise ValueError(f"{value!r} is not a table store: rocksdb:// (durable, the "
                             "default) or memory:// (tests)")
        return value


def settings_problems(exc: ValidationError) -> list[str]:
    """One line per invalid setting, naming its environment variable (a secret's value is
    not shown)."""
    lines = []
    for error in exc.errors(include_url=False):
        name = "_".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        field = Settings.model_fields.get(name)
        secret = field is not None and "SecretStr" in str(field.annotation)
        shown = not secret and "input" in error and error["type"] != "value_error"
        given = f" (got {error['input']!r})" if shown else ""  # a value error names it
        lines.append(f"MONITOR_{name.upper()}: {message}{given}")
    return lines


def broker_servers(url: str) -> list[tuple[str, int]]:
    """(host, port) of each broker of a ``kafka://`` URL, as faust reads it: several
    with ``;`` or ``,`` between them, each with or without its own ``kafka://``; 9092
    when no port; an IPv6 host without its brackets. ValueError for a bad port."""
    servers = []
    for part in url.replace(",", ";").split(";"):
        part = part.strip()
        split = urlsplit(part if "://" in part else f"kafka://{part}")
        servers.append((split.hostname or "", split.port or 9092))
    return servers


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets (as Kafka clients write a server)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
