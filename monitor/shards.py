"""``replay --jobs N``: one log's trials replayed by N processes, the output unchanged.

Trials are independent, so a log can be split by trial. Each process (this one and
N - 1 forked children) reads the whole log and keeps the lines of its trials: a byte
scan takes the ``trial_id`` value out of each line, and the trials go to the processes
in turn, in the order the log first names them. Every process sees the same lines in
the same order, so all agree on who owns which line without talking to each other.
Each process replays its lines (numbered as in the whole log) through `replay`'s own
loop; then its counts, alerts and rejected lines come back here and are merged in line
order, and the children keep their trials until the report asks them for their part.
A child's part travels as JSON (msgspec, typed): under half the time pickling its alerts
costs, and the parent waits for it at the end.

The scan does not parse JSON. A line it reads wrong (an escaped ``trial_id``, a nested
object that holds the key first) could put some of a trial's events in another process;
so each process checks at the end that every trial it holds is one the scan gave it,
and if any is not, the whole log is replayed again in one process. The output is the
same as `replay` of the whole log in one process, byte for byte (the tests hold it to
that). Standard input, a platform without ``fork``, e-mail and live metrics (they read
every trial's state as it changes) replay in one process.
"""

from __future__ import annotations

import datetime as dt
import gc
import heapq
import multiprocessing
import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection
from typing import BinaryIO

import msgspec

from .engine.alerts import AlertTransition
from .engine.rules import TrialRules
from .engine.trials import Trials
from .replay import (
    LogUnreadable,
    ReplayResult,
    collection_paused,
    open_log,
    read_chunks,
    read_lines,
    replay,
    replay_numbered,
)

SHARD_FROM_BYTES = 64 * 2**20  # a smaller log replays in a few seconds: one process
MAX_JOBS = 2  # by default: each process adds its own interpreter (~130 MB) to the memory
_KEY = b'"trial_id"'

Progress = Callable[[Iterator[bytes], BinaryIO, int | None], Iterator[bytes]]


def default_jobs(path: str) -> int:
    """One process per core, up to `MAX_JOBS`, for a log file of `SHARD_FROM_BYTES` or
    more; one for a smaller log or standard input. (A log of one trial gains nothing:
    the other processes only read it.)"""
    if path == "-" or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    try:
        size = os.stat(path).st_size
    except OSError:
        return 1  # open_log says why
    if size < SHARD_FROM_BYTES:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, MAX_JOBS))


def replay_log(path: str, catalog: dict[str, TrialRules], as_of: dt.datetime | None = None,
               jobs: int | None = None, progress: Progress | None = None,
               on_alert: Callable[[AlertTransition], None] | None = None,
               trials: Trials | None = None) -> ReplayResult:
    """`replay` of the log at ``path`` (gzip or plain, ``-`` for stdin) over ``jobs``
    processes (default: `default_jobs`); call the result's ``close()`` once done with its
    report. ``progress`` wraps this process's lines. ``on_alert`` and ``trials`` (see
    `replay`) need every trial in this process: with either, one process replays."""
    jobs = default_jobs(path) if jobs is None else jobs
    if (jobs <= 1 or path == "-" or on_alert is not None or trials is not None
            or "fork" not in multiprocessing.get_all_start_methods()):
        stream, raw, size = open_log(path)
        with stream:
            lines = read_lines(stream, path)
            return replay(progress(lines, raw, size) if progress else lines, catalog, as_of,
                          on_alert, trials)
    with collection_paused():  # taking the children's alerts in would scan our trials
        return _replay_sharded(path, catalog, as_of, jobs, progress)


def _replay_sharded(path: str, catalog: dict[str, TrialRules], as_of: dt.datetime | None,
                    jobs: int, progress: Progress | None) -> ReplayResult:
    fork = multiprocessing.get_context("fork")
    children: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        for shard in range(1, jobs):
            ours, theirs = fork.Pipe()
            child = fork.Process(target=_child, args=(theirs, path, catalog, as_of, shard, jobs),
                                 daemon=True, name=f"replay-shard-{shard}")
            child.start()
            theirs.close()
            children.append((child, ours))
        parts = [_replay_shard(path, catalog, as_of, 0, jobs, progress)]
        parts += [_received(pipe) for _child_process, pipe in children]
    except BaseException:
        _stop(children)
        raise
    if any(part is None for part in parts):  # the byte scan misread some line's trial
        _stop(children)
        return replay_log(path, catalog, as_of, 1, progress)
    return _merged(parts, children, as_of)


def _replay_shard(path: str, catalog: dict[str, TrialRules], as_of: dt.datetime | None,
                  shard: int, jobs: int, progress: Progress | None = None) -> ReplayResult | None:
    """This process's part of the log, or None when it holds a trial that is not its own
    (a line the scan misread)."""
    owners: dict[bytes | None, int] = {}
    stream, raw, size = open_log(path)
    with stream:
        if progress is None:
            chunks = read_chunks(stream, path)
        else:  # a line at a time, through the progress bar
            chunks = ([line] for line in progress(read_lines(stream, path), raw, size))
        result = replay_numbered(owned_lines(chunks, shard, jobs, owners), catalog, as_of)
    if any(owners.get(trial_id.encode()) != shard for trial_id in result.trials.trials):
        return None
    return result


def owned_lines(chunks: Iterable[list[bytes]], shard: int, jobs: int,
                owners: dict[bytes | None, int]) -> Iterator[tuple[int, bytes]]:
    """The (number, line) pairs of the lines whose trial ``shard`` of ``jobs`` owns. A
    trial's owner is the next process in turn when the log first names it; ``owners``
    collects the owner of every ``trial_id`` value seen (the same in every process)."""
    # `last`: the previous line's `"trial_id": "…"` bytes, found at `at`. A line of the
    # same trial usually has it at the same place (a log often holds a trial's lines
    # together, and a message type's fields in one order): one comparison, else a search
    number, last, at, owner = 0, None, 0, 0
    for chunk in chunks:
        for raw in chunk:
            number += 1
            if last is None or not raw.startswith(last, at) and (at := raw.find(last)) < 0:
                at = raw.find(_KEY)
                if at < 0:
                    last, key = None, None
                else:  # the string after the key: "trial_id": "ISC.19.29"
                    start = raw.find(b'"', at + len(_KEY)) + 1
                    end = raw.find(b'"', start) if start else -1
                    last, key = (raw[at:end + 1], raw[start:end]) if end >= 0 else (None, None)
                owner = owners.get(key)
                if owner is None:
                    owner = owners[key] = len(owners) % jobs
            if owner == shard:
                yield number, raw


# --- the children ---------------------------------------------------------------------

def _child(pipe: Connection, path: str, catalog: dict[str, TrialRules],
           as_of: dt.datetime | None, shard: int, jobs: int) -> None:
    """Replay this shard, send what the merge needs, then answer report requests (an
    as-of instant each) until the parent closes the pipe."""
    gc.disable()  # as in `replay`, and for the report too: this process ends after it
    try:
        try:
            result = _replay_shard(path, catalog, as_of, shard, jobs)
        except LogUnreadable as exc:
            pipe.send(("unreadable", str(exc)))
            return
        if result is None:
            pipe.send(("misread", None))
            return
        pipe.send(("done", _encode_part(_summary(result))))
        while True:
            pipe.send(result.trials.report(pipe.recv()))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the parent is done (or stopped, and says why)


class Part(msgspec.Struct, array_like=True, gc=False):
    """What a child sends back once its lines are replayed: what the merge needs."""

    read: int
    accepted: int
    duplicates: int
    after_as_of: int
    alerts: list[tuple[int, AlertTransition]]  # (line, alert)
    rejected: list[dict]
    last_recorded_at: list[tuple[int, dt.datetime]]


_encode_part = msgspec.json.Encoder().encode
_decode_part = msgspec.json.Decoder(Part).decode


def _summary(result: ReplayResult) -> Part:
    return Part(result.read, result.accepted, result.duplicates, result.after_as_of,
                list(zip(result.alert_lines, result.alerts, strict=True)), result.rejected,
                _last_recorded(result))


def _last_recorded(result: ReplayResult) -> list[tuple[int, dt.datetime]]:
    """Each trial's latest recorded_at, with the line of the trial's first event."""
    return [(result.first_lines[trial_id], trial.counts.last_recorded_at)
            for trial_id, trial in result.trials.trials.items()
            if trial.counts.last_recorded_at is not None]


def _received(pipe: Connection) -> Part | None:
    try:
        what, body = pipe.recv()
    except EOFError:
        raise RuntimeError("a replay process ended without its part of the log") from None
    if what == "unreadable":
        raise LogUnreadable(body)
    return _decode_part(body) if what == "done" else None


def _stop(children: list[tuple[multiprocessing.process.BaseProcess, Connection]]) -> None:
    for child, pipe in children:
        pipe.close()
        child.terminate()
        child.join()


# --- merging --------------------------------------------------------------------------

def _merged(parts: list, children: list, as_of: dt.datetime | None) -> ReplayResult:
    """One result from this process's `ReplayResult` and the children's summaries:
    counts added, alerts and rejected lines in line order (one process has all of a
    line's alerts, in order)."""
    local, summaries = parts[0], parts[1:]
    # `Trials.last_recorded_at` in one process: the first trial (in the order of their
    # first events) whose latest is the latest, which shows as_of with its UTC offset
    times = sorted(_last_recorded(local) + [t for s in summaries for t in s.last_recorded_at])
    last = max((time for _line, time in times), default=None)
    result = ReplayResult(ShardedTrials(local.trials, children, last), as_of)
    result.read = local.read + sum(s.read for s in summaries)
    result.accepted = local.accepted + sum(s.accepted for s in summaries)
    result.duplicates = local.duplicates + sum(s.duplicates for s in summaries)
    result.after_as_of = local.after_as_of + sum(s.after_as_of for s in summaries)
    streams = [list(zip(local.alert_lines, local.alerts, strict=True))]
    streams += [s.alerts for s in summaries]
    for line, alert in heapq.merge(*streams, key=lambda pair: pair[0]):
        result.alert_lines.append(line)
        result.alerts.append(alert)
    result.rejected = list(heapq.merge(local.rejected, *(s.rejected for s in summaries),
                                       key=lambda item: item["line"]))
    return result


class ShardedTrials:
    """The trials of a replay over several processes: this process's `Trials`, and the
    children that hold the rest until `close`. Offers what the report reads."""

    def __init__(self, local: Trials, children: list, last_recorded_at: dt.datetime | None):
        self.local, self.children, self._last = local, children, last_recorded_at
        self._finalizer = weakref.finalize(self, _stop, children)

    def report(self, as_of: dt.datetime) -> dict[str, dict]:
        """`Trials.report` over every process: the ``trials`` part of the replay JSON."""
        for _child, pipe in self.children:
            pipe.send(as_of)  # the children build theirs meanwhile
        parts = [self.local.report(as_of)] + [pipe.recv() for _child, pipe in self.children]
        merged = {trial_id: body for part in parts for trial_id, body in part.items()}
        return {trial_id: merged[trial_id] for trial_id in sorted(merged)}

    def last_recorded_at(self) -> dt.datetime | None:
        return self._last

    def close(self) -> None:
        """End the children (they hold their trials until now)."""
        self._finalizer()
