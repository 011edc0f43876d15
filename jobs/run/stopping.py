"""Early stopping: the rule a spec file sets, and the policy that applies it to reported losses.

    stopping: {rule: median, every: 10, grace: 50, min_jobs: 3}
    stopping: {rule: halving, every: 10, grace: 50, reduction: 3}

(its settings: jobs/plan/stopping_rule.py). With a rule, every single-device job reports
its training loss every `every` epochs (workers/reporting.py); the driver hands each
report to `StoppingPolicy.observe`, which answers with the reason to stop the job, or
None. Both rules judge only from epoch `grace` on, compare a job with the others of its
run (running or ended) at the same epoch, and never stop a job for want of company:

- median (the median stopping rule of Google Vizier, as Ray Tune's MedianStoppingRule):
  a job whose best loss so far is above the median of the other jobs' running average
  loss up to the same epoch is stopped, once `min_jobs` others have got that far.
- halving (asynchronous successive halving, as ASHA without promotion): rungs at
  grace, grace x reduction, grace x reduction^2, ... epochs; a job reaching a rung whose
  loss there is not in the best 1/reduction of the losses at that rung (its own
  included, once `reduction` jobs have reached it) is stopped.

A stopped job is recorded `stopped`, with its partial history and this rule's reason;
it is not a failure. Losses are minimised: lower is better, a non-finite loss is worst.
This module is plain Python: the scheduler and tests use it without Ray.
"""

from __future__ import annotations

import math
import statistics

from jobs.plan.stopping_rule import StoppingRule


def _worst_if_not_finite(loss: float) -> float:
    return loss if math.isfinite(loss) else math.inf


class StoppingPolicy:
    """Applies one rule to a run's reports: `observe` each report, `ended` each job's history.

    Keeps per job only its losses at the reported epochs (every `every` epochs), so its
    memory is the run's reports, not its full histories.
    """

    def __init__(self, rule: StoppingRule) -> None:
        self.rule = rule
        self.losses: dict[str, dict[int, float]] = {}  # job id -> epoch -> loss, at report epochs
        self.rung_losses: dict[int, dict[str, float]] = {}  # rung epoch -> job id -> loss there
        self.judged: dict[str, set[int]] = {}  # job id -> rungs it has been judged at

    def observe(self, job_id: str, epoch: int, loss: float) -> str | None:
        """A running job's loss after `epoch` epochs; the reason to stop it now, or None."""
        self.losses.setdefault(job_id, {})[epoch] = _worst_if_not_finite(loss)
        if epoch < self.rule.grace:
            return None
        if self.rule.rule == "median":
            return self._median(job_id, epoch)
        return self._halving(job_id, epoch)

    def forget(self, job_id: str) -> None:
        """Drop what a job reported: it failed or was cancelled, and a retry starts afresh."""
        self.losses.pop(job_id, None)
        self.judged.pop(job_id, None)
        for at_rung in self.rung_losses.values():
            at_rung.pop(job_id, None)

    def ended(
        self, job_id: str, loss_history: list[float] | None, history_epochs: list[int] | None = None
    ) -> None:
        """A job ended (any status): its per-epoch losses join the comparison base.

        `history_epochs`: the epochs a thinned history holds (a record's, past 100 epochs);
        only the rule's epochs it holds are compared.
        """
        if not loss_history:
            return
        by_epoch = dict(zip(history_epochs or range(1, len(loss_history) + 1), loss_history))
        last = max(by_epoch)
        points = {
            epoch: _worst_if_not_finite(float(by_epoch[epoch]))
            for epoch in range(self.rule.every, last + 1, self.rule.every)
            if epoch in by_epoch
        }
        if points:  # a job with none of the rule's epochs takes no part (the rule reads max(epochs))
            kept = self.losses.setdefault(job_id, {})
            for epoch, loss in points.items():
                kept.setdefault(epoch, loss)
        for rung in self.rule.rungs_up_to(last):
            if rung in by_epoch:
                self.rung_losses.setdefault(rung, {}).setdefault(
                    job_id, _worst_if_not_finite(float(by_epoch[rung]))
                )

    def _median(self, job_id: str, epoch: int) -> str | None:
        own = self.losses[job_id]
        best = min(loss for at, loss in own.items() if at <= epoch)
        averages = []
        for other, losses in self.losses.items():
            if other == job_id or max(losses) < epoch:
                continue  # only jobs that have got as far compare
            upto = [loss for at, loss in losses.items() if at <= epoch]
            if not upto:
                continue  # its reports began later (a job reporting at other epochs)
            averages.append(statistics.fmean(upto) if all(map(math.isfinite, upto)) else math.inf)
        if len(averages) < self.rule.min_jobs:
            return None
        median = statistics.median(averages)
        if best > median:
            return (
                f"median rule: best loss {best:.4g} by epoch {epoch} is above the median {median:.4g} "
                f"of {len(averages)} other job(s)' running average"
            )
        return None

    def _halving(self, job_id: str, epoch: int) -> str | None:
        judged = self.judged.setdefault(job_id, set())
        for rung in self.rule.rungs_up_to(epoch):
            if rung in judged:
                continue
            judged.add(rung)
            loss = self.losses[job_id].get(rung, self.losses[job_id][epoch])
            at_rung = self.rung_losses.setdefault(rung, {})
            at_rung[job_id] = loss
            if len(at_rung) < self.rule.reduction:
                continue
            ranked = sorted(at_rung.values())
            kept = max(len(ranked) // self.rule.reduction, 1)
            cutoff = ranked[kept - 1]
            if loss > cutoff:
                return (
                    f"successive halving: loss {loss:.4g} at epoch {rung} is not in the best "
                    f"1/{self.rule.reduction} of {len(ranked)} job(s) there (cut-off {cutoff:.4g})"
                )
        return None
