"""``replay --jobs N`` (`monitor.shards`): a log's trials over N processes, and the output
byte for byte the output of one process."""

from __future__ import annotations

import gzip
import random
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor import shards
from monitor.cli import main
from monitor.engine.rules import parse_rules
from monitor.replay import LogUnreadable, open_log, parse_as_of, read_lines, replay
from monitor.shards import ShardedTrials, default_jobs, owned_lines, replay_log
from tests.builders import ae, infusion
from tests.engine.test_properties import trial_log

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "isc-19-29" / "events.jsonl"
TEMPLATE = (ROOT / "rules" / "isc-19-29.yaml").read_text()
TRIALS = ["ISC.19.29", *(f"SIM.{n:04d}" for n in range(1, 6))]
# every trial but the last has rules: a trial without any is counted all the same
CATALOG = {t: parse_rules(TEMPLATE.replace("trial_id: ISC.19.29", f"trial_id: {t}"))
           for t in TRIALS[:-1]}


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six trials of eight subjects, one after the other, with two broken lines."""
    path = tmp_path_factory.mktemp("shards") / "events.jsonl"
    subprocess.run([sys.executable, str(ROOT / "examples" / "generate.py"), "--trials", "6",
                    "--subjects", "8", "--seed", "11", "--out", str(path)], check=True)
    return path


def single(path: Path, as_of: str | None = None) -> bytes:
    stream, _raw, _size = open_log(str(path))
    with stream:
        result = replay(read_lines(stream, str(path)), CATALOG,
                        parse_as_of(as_of) if as_of else None)
    return orjson.dumps(result.to_json())


def sharded(path: Path, jobs: int, as_of: str | None = None) -> bytes:
    result = replay_log(str(path), CATALOG, parse_as_of(as_of) if as_of else None, jobs)
    try:
        return orjson.dumps(result.to_json())
    finally:
        result.close()


@pytest.mark.parametrize("jobs", [2, 3, 7])
@pytest.mark.parametrize("as_of", [None, "2021-06-30"])
def test_any_number_of_processes_gives_the_output_of_one(log, jobs, as_of) -> None:
    assert sharded(log, jobs, as_of) == single(log, as_of)


def test_interleaved_trials_a_gzip_log_and_duplicates_give_the_output_of_one(log,
                                                                             tmp_path) -> None:
    lines = log.read_bytes().splitlines(keepends=True)
    lines += random.Random(3).sample(lines, 40)  # again, later: duplicates
    random.Random(5).shuffle(lines)
    shuffled = tmp_path / "shuffled.jsonl.gz"
    shuffled.write_bytes(gzip.compress(b"".join([b"\n", *lines, b"   \n"])))
    assert sharded(shuffled, 2) == single(shuffled)


def test_rejected_lines_of_any_shape_come_back_from_a_child_as_they_are(log,
                                                                         tmp_path) -> None:
    """What a child sends back holds whatever a rejected line carried: numbers out of a
    float's range as ids, non-ASCII text, an offset; the merge gives the output of one."""
    lines = log.read_bytes().splitlines(keepends=True)
    second = next(line for line in reversed(lines) if b"SIM.0005" in line)  # a child's trial
    odd = [b'{"type":"adverse_event","trial_id":"SIM.0005","event_id":1e999}\n',
           b'{"type":"lab_result","trial_id":"SIM.0005","event_id":"\xc3\xa9v\xe2\x82\xac",'
           b'"recorded_at":"2021-03-01T10:00:00+05:30","value":1e999}\n',
           b'{"type":"infusion","trial_id":"SIM.0005","subject_id":-1e999}\n']
    at = lines.index(second)
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b"".join(lines[:at] + odd + lines[at:]))
    assert sharded(path, 2) == single(path)
    assert b"1e999" in single(path)


def test_a_line_the_byte_scan_misreads_sends_the_log_to_one_process(log, tmp_path) -> None:
    lines = log.read_bytes().splitlines(keepends=True)
    sim = next(line for line in lines if b'"trial_id":"SIM.0001"' in line)
    # a valid SIM.0001 event whose first "trial_id" is another trial's, inside an object
    # the contract ignores; and one whose trial_id is written with an escape
    nested = sim.replace(b"{", b'{"note":{"trial_id":"ISC.19.29"},', 1)
    nested = nested.replace(b'"event_id":"', b'"event_id":"nested-', 1)
    escaped = sim.replace(b'"SIM.0001"', b'"SIM\\u002e0001"', 1)
    escaped = escaped.replace(b'"event_id":"', b'"event_id":"escaped-', 1)
    path = tmp_path / "misread.jsonl"
    path.write_bytes(b"".join([*lines[:50], nested, *lines[50:], escaped]))
    result = replay_log(str(path), CATALOG, jobs=2)
    assert not isinstance(result.trials, ShardedTrials)  # replayed again, in one process
    assert orjson.dumps(result.to_json()) == single(path)


@pytest.mark.parametrize("first", [0, 1])
def test_the_as_of_of_trials_ending_at_one_instant_is_the_first_trials(tmp_path, first) -> None:
    # the same instant in two offsets: one process shows the first trial's
    ends = ["2021-06-01T12:00:00+07:00", "2021-06-01T05:00:00+00:00"]
    messages = [infusion("S1", "2021-01-04", trial=TRIALS[n]) for n in (first, 1 - first)]
    messages += [ae("S1", "A", "2021-05-30", trial=TRIALS[n], recorded_at=ends[n])
                 for n in (0, 1)]
    path = tmp_path / "ends.jsonl"
    path.write_bytes(b"".join(orjson.dumps(m) + b"\n" for m in messages))
    assert orjson.loads(sharded(path, 2))["as_of"] == ends[first]
    assert sharded(path, 2) == single(path)


def test_every_line_has_exactly_one_owner_and_a_trial_one_process() -> None:
    lines = [b'{"type":"infusion","trial_id":"A"}\n', b'{"trial_id": "B", "x": 1}\n', b"\n",
             b"not json\n", b'{"trial_id":"A","note":"trial_id"}\n', b'{"trial_id":7}\n',
             b'{"trial_id":"C"}\n', b'{"trial_id" : "B"}', b'{"trial_id":"\n']
    trial_of = {1: "A", 2: "B", 5: "A", 7: "C", 8: "B"}  # line number: trial
    for jobs in (1, 2, 3):
        owners = [{} for _ in range(jobs)]
        numbers = [[n for n, _ in owned_lines([lines[:4], lines[4:]], shard, jobs, owners[shard])]
                   for shard in range(jobs)]
        assert sorted(sum(numbers, [])) == list(range(1, len(lines) + 1))
        assert all(o == owners[0] for o in owners)  # every process sees the same owners
        shard_of = {trial_of[n]: shard for shard, mine in enumerate(numbers) for n in mine
                    if n in trial_of}
        assert all(n in numbers[shard_of[trial]] for n, trial in trial_of.items())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(trial_log(), min_size=1, max_size=4), st.randoms(use_true_random=False),
       st.integers(2, 3))
def test_random_interleaved_trials_give_the_output_of_one(tmp_path, trials, rng, jobs) -> None:
    messages = [{**m, "trial_id": TRIALS[n], "event_id": f"{TRIALS[n]}-{m['event_id']}"}
                for n, log in enumerate(trials) for m in log]
    rng.shuffle(messages)
    path = tmp_path / f"random-{rng.random()}.jsonl"
    path.write_bytes(b"".join(orjson.dumps(m) + b"\n" for m in messages))
    assert sharded(path, jobs) == single(path)


def test_one_process_for_standard_input_or_a_small_log(log, monkeypatch) -> None:
    assert default_jobs("-") == 1
    assert default_jobs(str(log)) == 1
    assert default_jobs(str(log) + ".missing") == 1
    monkeypatch.setattr(shards, "SHARD_FROM_BYTES", 0)
    assert 1 <= default_jobs(str(log)) <= shards.MAX_JOBS


def test_the_children_end_when_the_result_is_closed(log) -> None:
    result = replay_log(str(log), CATALOG, jobs=3)
    children = [child for child, _pipe in result.trials.children]
    assert len(children) == 2 and all(child.is_alive() for child in children)
    result.to_json()
    result.close()
    result.close()
    assert not any(child.is_alive() for child in children)


def test_an_unreadable_log_is_unreadable_with_any_number_of_processes(tmp_path) -> None:
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(gzip.compress(SAMPLE.read_bytes())[:5000])
    with pytest.raises(LogUnreadable, match="cannot be read to the end"):
        replay_log(str(corrupt), CATALOG, jobs=2)


def test_a_child_that_fails_fails_the_replay(log, monkeypatch) -> None:
    replay_shard = shards._replay_shard

    def failing(path, catalog, as_of, shard, jobs, progress=None):  # noqa: ANN001, ANN202
        if shard:
            raise RuntimeError("boom")
        return replay_shard(path, catalog, as_of, shard, jobs, progress)

    monkeypatch.setattr(shards, "_replay_shard", failing)
    with pytest.raises(RuntimeError, match="ended without its part"):
        replay_log(str(log), CATALOG, jobs=2)


def test_the_cli_takes_jobs(capsys) -> None:
    rules = str(ROOT / "rules")
    assert main(["replay", str(SAMPLE), "--rules", rules, "--format", "json"]) == 0
    one = capsys.readouterr().out
    assert main(["replay", str(SAMPLE), "--rules", rules, "--format", "json",
                 "--jobs", "2"]) == 0
    assert capsys.readouterr().out == one
    with pytest.raises(SystemExit) as exit_:
        main(["replay", str(SAMPLE), "--rules", rules, "--jobs", "0"])
    assert exit_.value.code == 2
    assert "not a number of processes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # it used to start them all
        main(["replay", str(SAMPLE), "--rules", rules, "--jobs", "100000"])
    assert exit_.value.code == 2
    assert "'100000' is not a number of processes (1 to 64" in capsys.readouterr().err
