#!/usr/bin/env python3
"""Generate a realistic synthetic event log of ISC.19.29-like trials (JSON lines).

    python examples/generate.py --seed 1929 > examples/isc-19-29/events.jsonl
    python examples/generate.py --trials 2500 --subjects 20 --out big.jsonl.gz

The first trial is ISC.19.29; further trials are SIM.0001, SIM.0002, ... Each subject
is enrolled, infused twice four weeks apart, followed for 12 months with labs at
baseline and months 3, 6 and 12, and has a dozen AEs on average (fever, ascites,
infusion reactions and so on, a few serious, some with follow-up versions), reported a
few days after onset. ISC.19.29 also carries a scripted story in which every kind of
rule in rules/isc-19-29.yaml except dosing-while-halted breaches and resolves: an early
grade 3 infusion reaction later downgraded, two related SAEs of which one is later
re-assessed as not related, a retraction, a late report, a version conflict, two
redelivered messages and two broken lines.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import random
import sys
from collections.abc import Iterator

import orjson

SITE = dt.timezone(dt.timedelta(hours=7))
TRIAL_START = dt.date(2020, 11, 16)

# (verbatim term, MedDRA PT, MedDRA SOC, weight)
TERMS = [
    ("fever", "Pyrexia", "General disorders and administration site conditions", 10),
    ("fatigue", "Fatigue", "General disorders and administration site conditions", 9),
    ("leg swelling", "Oedema peripheral",
     "General disorders and administration site conditions", 6),
    ("chills after infusion", "Chills", "General disorders and administration site conditions", 3),
    ("infusion reaction", "Infusion related reaction",
     "Injury, poisoning and procedural complications", 3),
    ("ascites", "Ascites", "Gastrointestinal disorders", 8),
    ("nausea", "Nausea", "Gastrointestinal disorders", 7),
    ("diarrhoea", "Diarrhoea", "Gastrointestinal disorders", 5),
    ("abdominal pain", "Abdominal pain", "Gastrointestinal disorders", 6),
    ("variceal bleeding", "Oesophageal varices haemorrhage", "Gastrointestinal disorders", 1),
    ("headache", "Headache", "Nervous system disorders", 6),
    ("confusion", "Hepatic encephalopathy", "Nervous system disorders", 2),
    ("itching", "Pruritus", "Skin and subcutaneous tissue disorders", 5),
    ("rash", "Rash", "Skin and subcutaneous tissue disorders", 2),
    ("low platelets", "Thrombocytopenia", "Blood and lymphatic system disorders", 3),
    ("common cold", "Upper respiratory tract infection", "Infections and infestations", 5),
    ("peritonitis", "Spontaneous bacterial peritonitis", "Infections and infestations", 1),
    ("low sodium", "Hyponatraemia", "Metabolism and nutrition disorders", 3),
    ("insomnia", "Insomnia", "Psychiatric disorders", 4),
    ("muscle cramps", "Muscle spasms", "Musculoskeletal and connective tissue disorders", 4),
]
LABS = [("ALT", "U/L", 40, 25, 90), ("AST", "U/L", 40, 30, 110), ("BILI", "mg/dL", 1.2, 0.8, 3.5),
        ("INR", "ratio", 1.1, 1.0, 1.8), ("CREAT", "mg/dL", 1.2, 0.6, 1.4),
        ("SODIUM", "mmol/L", 145, 128, 142), ("ALB", "g/dL", 5.0, 2.6, 3.8)]


class Log:
    """Collects events; numbers event ids; writes them sorted by recorded_at."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id, self.events, self.serial = trial_id, [], 0

    def add(self, kind: str, subject: str, recorded: dt.datetime, **fields) -> dict:
        self.serial += 1
        event = {"type": kind, "trial_id": self.trial_id, "subject_id": subject,
                 "event_id": f"{self.trial_id}-evt-{self.serial:06d}",
                 "recorded_at": recorded.isoformat(), **fields}
        self.events.append(event)
        return event


def at(day: dt.date, rng: random.Random) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(rng.randint(8, 17), rng.choice((0, 15, 30, 45))),
                               tzinfo=SITE)


def add_months(day: dt.date, months: int) -> dt.date:
    index = day.year * 12 + day.month - 1 + months
    return dt.date(index // 12, index % 12 + 1, min(day.day, 28))


def subject_ids(trial_id: str, n: int) -> list[str]:
    prefix = "ISC" if trial_id == "ISC.19.29" else trial_id.replace(".", "")
    return [f"{prefix}-{i:03d}" for i in range(1, n + 1)]


def first_infusions(n: int, rng: random.Random) -> list[dt.date]:
    span = 640 if n > 1 else 1
    return [TRIAL_START + dt.timedelta(days=round(i * span / max(n - 1, 1)) + rng.randint(0, 6))
            for i in range(n)]


def enrol(log: Log, subject: str, first: dt.date, rng: random.Random) -> None:
    log.add("subject_status", subject, at(first - dt.timedelta(days=14), rng),
            status="enrolled", effective_on=(first - dt.timedelta(days=14)).isoformat())
    for dose in (1, 2):
        day = first + dt.timedelta(days=28 * (dose - 1))
        log.add("infusion", subject, at(day, rng), infused_at=at(day, rng).isoformat(),
                dose_number=dose, cells_per_kg=1.0e6)
    for month in (0, 3, 6, 12):
        labs_day = add_months(first, month) - dt.timedelta(days=1 if month == 0 else 0)
        for test, unit, uln, low, high in LABS:
            log.add("lab_result", subject, at(labs_day + dt.timedelta(days=1), rng), test=test,
                    value=round(rng.uniform(low, high), 2), unit=unit, uln=uln,
                    collected_at=at(labs_day, rng).isoformat())


def background_aes(log: Log, subject: str, first: dt.date, related_saes: bool,
                   rng: random.Random) -> None:
    terms, weights = TERMS, [t[3] for t in TERMS]
    for number in range(1, max(1, round(rng.gauss(12, 4))) + 1):
        term, pt, soc, _ = rng.choices(terms, weights)[0]
        onset = first + dt.timedelta(days=rng.randint(-10, 380))
        grade = rng.choices((1, 2, 3, 4), (60, 28, 10, 2))[0]
        serious = grade >= 3 and rng.random() < 0.3
        relatedness = rng.choices(("not_related", "unlikely", "possible", "probable", None),
                                  (50, 25, 15, 5, 5))[0]
        if serious and not related_saes:
            relatedness = rng.choice(("not_related", "unlikely"))
        ae = {"ae_id": f"{subject}-AE-{number:03d}", "version": 1, "term": term,
              "meddra_pt": pt, "meddra_soc": soc, "onset": onset.isoformat(), "grade": grade,
              "serious": serious, "expected": rng.random() < 0.7, "outcome": "recovering"}
        if serious:
            ae["serious_criteria"] = ["hospitalization"]
        if relatedness:
            ae["relatedness"] = relatedness
        log.add("adverse_event", subject, at(onset + dt.timedelta(days=rng.randint(1, 20)), rng),
                **ae)
        if rng.random() < 0.08:  # a follow-up: resolved, sometimes regraded
            resolved = onset + dt.timedelta(days=rng.randint(3, 30))
            log.add("adverse_event", subject, at(resolved + dt.timedelta(days=2), rng),
                    **{**ae, "version": 2, "resolved": resolved.isoformat(),
                       "outcome": "recovered", "grade": max(1, grade - rng.randint(0, 1))})


def complete(log: Log, subject: str, first: dt.date, rng: random.Random) -> None:
    end = add_months(first, 12)
    log.add("subject_status", subject, at(end + dt.timedelta(days=3), rng), status="completed",
            effective_on=end.isoformat())


def isc_story(log: Log, subjects: list[str], firsts: list[dt.date], rng: random.Random) -> None:
    """The scripted part of ISC.19.29 (see the module docstring)."""
    s = dict(zip(subjects, firsts, strict=True))
    a, b, c = subjects[3], subjects[-2], subjects[-1]  # e.g. ISC-004, ISC-019, ISC-020
    react = {"ae_id": f"{a}-AE-901", "version": 1, "term": "infusion reaction",
             "meddra_pt": "Infusion related reaction",
             "meddra_soc": "Injury, poisoning and procedural complications",
             "onset": (s[a] + dt.timedelta(days=1)).isoformat(), "grade": 3, "serious": False,
             "relatedness": "probable", "expected": True, "outcome": "recovering"}
    log.add("adverse_event", a, at(s[a] + dt.timedelta(days=2), rng), **react)
    log.add("adverse_event", a, at(s[a] + dt.timedelta(days=9), rng),
            **{**react, "version": 2, "grade": 2, "outcome": "recovered",
               "resolved": (s[a] + dt.timedelta(days=4)).isoformat()})
    last_dose = max(firsts) + dt.timedelta(days=28)
    sae_b = {"ae_id": f"{b}-AE-902", "version": 1, "term": "peritonitis",
             "meddra_pt": "Spontaneous bacterial peritonitis",
             "meddra_soc": "Infections and infestations",
             "onset": (last_dose + dt.timedelta(days=20)).isoformat(), "grade": 3,
             "serious": True, "serious_criteria": ["hospitalization"],
             "relatedness": "possible", "expected": False, "outcome": "recovering"}
    b_seen = at(last_dose + dt.timedelta(days=22), rng)
    log.add("adverse_event", b, b_seen, **sae_b)
    log.add("regulatory_report", b, b_seen + dt.timedelta(days=10), ae_id=sae_b["ae_id"],
            submitted_at=(b_seen + dt.timedelta(days=10)).isoformat())
    sae_c = {**sae_b, "ae_id": f"{c}-AE-903", "term": "confusion",
             "meddra_pt": "Hepatic encephalopathy", "meddra_soc": "Nervous system disorders",
             "onset": (last_dose + dt.timedelta(days=35)).isoformat(), "relatedness": "probable"}
    c_seen = at(last_dose + dt.timedelta(days=36), rng)
    log.add("adverse_event", c, c_seen, **sae_c)  # second subject: related-sae breaches
    log.add("regulatory_report", c, c_seen + dt.timedelta(days=6), ae_id=sae_c["ae_id"],
            submitted_at=(c_seen + dt.timedelta(days=6)).isoformat())
    log.add("adverse_event", b, at(last_dose + dt.timedelta(days=60), rng),  # re-assessed
            **{**sae_b, "version": 2, "relatedness": "not_related", "outcome": "recovered",
               "resolved": (last_dose + dt.timedelta(days=40)).isoformat()})
    isc_corrections(log, subjects, s, rng)


def isc_corrections(log: Log, subjects: list[str], s: dict, rng: random.Random) -> None:
    d, e, f = subjects[1], subjects[5], subjects[8]
    wrong = {"ae_id": f"{d}-AE-904", "version": 1, "term": "headache", "meddra_pt": "Headache",
             "meddra_soc": "Nervous system disorders",
             "onset": (s[d] + dt.timedelta(days=40)).isoformat(), "grade": 1, "serious": False,
             "relatedness": "unlikely"}
    log.add("adverse_event", d, at(s[d] + dt.timedelta(days=41), rng), **wrong)
    log.add("adverse_event", d, at(s[d] + dt.timedelta(days=50), rng),
            **{**wrong, "version": 2, "retracted": True})  # entered in error
    late = {"ae_id": f"{e}-AE-905", "version": 1, "term": "itching", "meddra_pt": "Pruritus",
            "meddra_soc": "Skin and subcutaneous tissue disorders", "onset":
            (s[e] + dt.timedelta(days=30)).isoformat()[:7], "grade": 1, "serious": False}
    log.add("adverse_event", e, at(s[e] + dt.timedelta(days=200), rng), **late)  # late, partial
    twin = {**late, "ae_id": f"{f}-AE-906", "onset": str(s[f].year), "grade": 2,
            "relatedness": "not_related"}
    log.add("adverse_event", f, at(s[f] + dt.timedelta(days=20), rng), **twin)
    log.add("adverse_event", f, at(s[f] + dt.timedelta(days=21), rng),
            **{**twin, "grade": 1})  # same version again: a conflict; the later one wins
    log.add("subject_status", subjects[14], at(s[subjects[14]] + dt.timedelta(days=150), rng),
            status="withdrawn", effective_on=(s[subjects[14]] + dt.timedelta(days=149)).isoformat())


def trial_events(trial_id: str, n_subjects: int, rng: random.Random) -> list[dict]:
    log = Log(trial_id)
    subjects = subject_ids(trial_id, n_subjects)
    firsts = first_infusions(n_subjects, rng)
    story = trial_id == "ISC.19.29" and n_subjects >= 16
    for subject, first in zip(subjects, firsts, strict=True):
        enrol(log, subject, first, rng)
        background_aes(log, subject, first, related_saes=not story, rng=rng)
        if not story or subject != subjects[14]:
            complete(log, subject, first, rng)
    if story:
        isc_story(log, subjects, firsts, rng)
    log.events.sort(key=lambda e: (e["recorded_at"], e["event_id"]))
    return log.events


def lines(trials: int, subjects: int, seed: int, bad_lines: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    for index in range(trials):
        trial_id = "ISC.19.29" if index == 0 else f"SIM.{index:04d}"
        events = trial_events(trial_id, subjects, rng)
        for position, event in enumerate(events):
            yield orjson.dumps(event)
            if index == 0 and position in (len(events) // 3, 2 * len(events) // 3):
                yield orjson.dumps(event)  # redelivered: the same event_id again
            if index == 0 and position == len(events) // 2:
                yield from broken(event, bad_lines)


def broken(sample: dict, count: int) -> Iterator[bytes]:
    ids = {k: sample[k] for k in ("trial_id", "subject_id", "recorded_at")}
    samples = [orjson.dumps({"type": "adverse_event", **ids, "event_id": "typo-grade-7",
                             "ae_id": "typo-AE", "version": 1, "term": "fever",
                             "onset": sample["recorded_at"][:10], "grade": 7, "serious": False}),
               orjson.dumps(sample)[:60]]  # a line cut short
    yield from samples[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--subjects", type=int, default=20, help="per trial")
    parser.add_argument("--seed", type=int, default=1929)
    parser.add_argument("--bad-lines", type=int, default=2, choices=(0, 1, 2))
    parser.add_argument("--out", help="file to write (.gz compresses); default stdout")
    args = parser.parse_args()
    if not args.out:
        out = sys.stdout.buffer
    elif args.out.endswith(".gz"):
        out = gzip.open(args.out, "wb", compresslevel=3)  # noqa: SIM115 - closed below
    else:
        out = open(args.out, "wb")  # noqa: SIM115 - closed below
    with out:
        for line in lines(args.trials, args.subjects, args.seed, args.bad_lines):
            out.write(line + b"\n")


if __name__ == "__main__":
    main()
