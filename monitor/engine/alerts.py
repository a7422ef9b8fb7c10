"""Alert identity and the raise / update / resolve decision (SPEC section 5).

Each rule is ``ok`` or ``breached``. An *episode* starts when the rule becomes breached
(``raised``), gains new evidence while breached (``updated``) and ends when corrections
make it ok again (``resolved``). The alert id ``trial/rule/episode`` is stable: the
ledger entry that numbers episodes is part of the durable state, so no restart,
rebalance or replay numbers the same episode twice, and downstream (e-mail) dedups on
``(alert id, transition, sequence)``.

`decide` is the whole policy: a pure function of the ledger entry and the rule's
result now.
"""

from __future__ import annotations

import datetime as dt
from hashlib import blake2b

import msgspec

from .kinds import EvidenceItem, RuleResult

RAISED, UPDATED, RESOLVED = "raised", "updated", "resolved"


class Episode(msgspec.Struct, array_like=True):
    """When an episode was raised and resolved, on the causing events' ``recorded_at``."""

    number: int
    raised_at: dt.datetime
    resolved_at: dt.datetime | None = None


class LedgerEntry(msgspec.Struct, omit_defaults=True):
    """What the engine remembers of one rule's alerts, durably. Small, whatever the
    trial's size: episodes, and a digest of the evidence at the last decision, not the
    evidence. The evidence keys themselves are derived state (`TrialState.evidence`):
    the rule's trackers give them again after a load, and the digest tells whether they
    are the ones this entry decided on."""

    rule_id: str
    severity: str
    episodes: list[Episode] = []
    breached: bool = False
    value: float = 0
    sequence: int = 0  # transitions so far in the open episode
    evidence_count: int = 0  # evidence keys at the last decision (none when ok)
    evidence_digest: str = ""  # `digest` of those keys
    evidence: tuple[str, ...] | None = None  # read only: a ledger from before the digest

    @property
    def episode(self) -> int:
        return self.episodes[-1].number if self.episodes else 0


class AlertTransition(msgspec.Struct, frozen=True, kw_only=True):
    """One alert transition: the typed decision that e-mail, metrics and topics carry."""

    id: str
    trial_id: str
    rule_id: str
    kind: str
    severity: str
    episode: int
    sequence: int
    transition: str
    event_id: str
    recorded_at: dt.datetime
    value: int | float  # a count is an int, and shows as one
    threshold: int | float
    evidence: tuple[EvidenceItem, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    detail: dict = {}

    @property
    def key(self) -> str:
        """Unique per transition: the dedup key of the notification log."""
        return f"{self.id}#{self.sequence}"

    def to_json(self) -> dict:
        out = msgspec.structs.asdict(self)
        out["recorded_at"] = self.recorded_at.isoformat()
        out["evidence"] = [item.as_dict() for item in self.evidence]
        out["added"], out["removed"] = list(self.added), list(self.removed)
        out["key"] = self.key
        return out


def alert_id(trial_id: str, rule_id: str, episode: int) -> str:
    return f"{trial_id}/{rule_id}/{episode}"


def recorded(ledger: dict[str, LedgerEntry], rule_id: str, episode: int,
             sequence: int) -> bool:
    """Whether a ledger has made the transition (``rule_id``, ``episode``,
    ``sequence``) already: its rule is at that transition or past it."""
    entry = ledger.get(rule_id)
    return entry is not None and (entry.episode, entry.sequence) >= (episode, sequence)


def digest(keys: tuple[str, ...]) -> str:
    """A fixed-size fingerprint of evidence keys (what `LedgerEntry` keeps of them)."""
    return blake2b("\n".join(keys).encode(), digest_size=16).hexdigest() if keys else ""


def known_evidence(entry: LedgerEntry, keys: tuple[str, ...]) -> tuple[str, ...] | None:
    """After a load: the evidence keys the entry decided on, given the keys the rule's
    tracker gives now; None when they are not those (the rules changed since). An
    entry written before the digest holds the keys themselves: they become its digest."""
    if entry.evidence is not None:
        kept, entry.evidence = (entry.evidence if entry.breached else ()), None
        entry.evidence_count, entry.evidence_digest = len(kept), digest(kept)
        return kept
    if not entry.breached:
        return ()
    if len(keys) == entry.evidence_count and digest(keys) == entry.evidence_digest:
        return keys
    return None


def decide(entry: LedgerEntry, result: RuleResult,
           before: tuple[str, ...] | None) -> str | None:
    """raised / updated / resolved, or None when nothing an alert reader cares about
    changed. ``before``: the evidence keys of the last decision (None: unknown)."""
    if result.breached and not entry.breached:
        return RAISED
    if not result.breached and entry.breached:
        return RESOLVED
    if result.breached and (result.evidence_keys != before or result.value != entry.value):
        return UPDATED
    return None


def record(entry: LedgerEntry, result: RuleResult, transition: str | None,
           recorded_at: dt.datetime) -> None:
    """Write the decision into the ledger entry (the engine owns the entry)."""
    if transition == RAISED:
        entry.episodes.append(Episode(entry.episode + 1, recorded_at))
        entry.sequence = 0
    elif transition == RESOLVED:
        entry.episodes[-1].resolved_at = recorded_at
    if transition is not None:
        entry.sequence += 1
    entry.breached = result.breached
    entry.value = result.value
    keys = result.evidence_keys if result.breached else ()
    entry.evidence_count, entry.evidence_digest = len(keys), digest(keys)


def transition_of(trial_id: str, rule, entry: LedgerEntry,  # noqa: ANN001
                  before: tuple[str, ...] | None, result: RuleResult, transition: str,
                  event_id: str, recorded_at: dt.datetime) -> AlertTransition:
    """The alert message for a decision already recorded in ``entry``. ``before`` is
    the evidence keys of the last decision; when they are unknown (None: the rules
    changed since the ledger was written), every key counts as added."""
    keys = result.evidence_keys
    before = before or ()
    now, was = set(keys), set(before)
    return AlertTransition(
        id=alert_id(trial_id, rule.id, entry.episode), trial_id=trial_id, rule_id=rule.id,
        kind=rule.kind, severity=rule.severity, episode=entry.episode,
        sequence=entry.sequence, transition=transition, event_id=event_id,
        recorded_at=recorded_at, value=result.value, threshold=result.threshold,
        evidence=result.evidence,
        added=tuple(k for k in keys if k not in was),
        removed=tuple(k for k in before if k not in now), detail=result.detail)

