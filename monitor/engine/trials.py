"""Every trial one process holds: routes each parsed message to its trial's ``step``.

Both the stream worker and replay drive this one class, so they cannot disagree.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from .events import Event, Rejection
from .report import trial_report
from .rules import TrialRules
from .state import Changes, TrialState, new_trial, step


class Trials:
    def __init__(self, catalog: Mapping[str, TrialRules]) -> None:
        self.catalog = dict(catalog)
        self.trials: dict[str, TrialState] = {}

    def trial(self, trial_id: str) -> TrialState:
        trial = self.trials.get(trial_id)
        if trial is None:
            trial = self.trials[trial_id] = new_trial(trial_id, self.catalog.get(trial_id))
        return trial

    def apply(self, event: Event) -> Changes:
        trial = self.trials.get(event.trial_id) or self.trial(event.trial_id)
        return step(trial, event)[1]

    def report(self, as_of: dt.datetime) -> dict[str, dict]:
        """The ``trials`` part of the replay JSON, trials in id order."""
        return {tid: trial_report(self.trials[tid], as_of) for tid in sorted(self.trials)}

    def last_recorded_at(self) -> dt.datetime | None:
        times = [t.counts.last_recorded_at for t in self.trials.values()
                 if t.counts.last_recorded_at is not None]
        return max(times, default=None)


def is_rejection(parsed: Event | Rejection) -> bool:
    return type(parsed) is Rejection
