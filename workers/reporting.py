"""The channel between a training job and whoever decides whether it goes on.

A job with a stopping rule (`TrainingJob.report_every`) trains in chunks of that many
epochs and, after each, reports its loss to a `TrainingMonitor`, which answers whether to
stop now. The decision is not the job's: the control plane reads every job's reports
from a `StoppingBoard` (one Ray actor for a run, or a plain object in one process),
compares them under its rule, and marks the jobs to stop. A job holds a `BoardMonitor`,
its end of that board.

`ReportSchedule` is what the framework modules share: where the chunks fall, and the
report after each. Without a monitor or `report_every` it is one chunk, the whole run,
so a compiled loop runs exactly as it does without early stopping.

Ray is imported only when a monitor talks to a board that is an actor, so the control
plane and the quick tests can use this module without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class TrainingMonitor(Protocol):
    """Hears a job's loss every few epochs and answers whether the job should stop."""

    def report(self, epochs_done: int, loss: float) -> bool:
        """`loss` is the mean loss of epoch `epochs_done` (counted from 1); True means stop now."""
        ...


class StoppingBoard:
    """The reports of a run's jobs and the jobs told to stop; usable as it is or as a Ray actor.

    Jobs call `report`; the control plane calls `drain` to collect what arrived, decides,
    and calls `stop` for the jobs that should end and `forget` for jobs that have ended.
    As a Ray actor (`ray.remote(StoppingBoard)`) its methods run one at a time, so it
    needs no lock; in one process it is called from one thread.
    """

    def __init__(self) -> None:
        self._reports: list[tuple[str, int, float]] = []
        self._stopping: set[str] = set()

    def report(self, job_id: str, epochs_done: int, loss: float) -> bool:
        """Keep the job's report; True when the job has been told to stop."""
        self._reports.append((job_id, int(epochs_done), float(loss)))
        return job_id in self._stopping

    def drain(self) -> list[tuple[str, int, float]]:
        """The reports received since the last drain, in the order they arrived: (job id, epochs, loss)."""
        reports, self._reports = self._reports, []
        return reports

    def stop(self, job_ids: list[str]) -> None:
        """Each of these jobs is answered True at its next report."""
        self._stopping.update(job_ids)

    def forget(self, job_id: str) -> None:
        """Drop an ended job's stop mark, so a retry or a later job of that id starts unmarked."""
        self._stopping.discard(job_id)


class BoardMonitor:
    """A job's end of a StoppingBoard: reports under the job's id, to the board or to its Ray actor.

    Picklable (a job id and a board, or an actor handle, which Ray pickles), so it can be
    handed to a Ray task or actor method with the job.
    """

    def __init__(self, board: Any, job_id: str) -> None:
        self.board = board  # a StoppingBoard in this process, or a Ray ActorHandle to one
        self.job_id = job_id

    def report(self, epochs_done: int, loss: float) -> bool:
        if isinstance(self.board, StoppingBoard):
            return self.board.report(self.job_id, epochs_done, loss)
        import ray
        from ray.exceptions import RayError

        try:
            return bool(ray.get(self.board.report.remote(self.job_id, epochs_done, loss)))
        except RayError:
            # The board is lost (its node died): nobody can judge this job any more, so it
            # trains to its end rather than fail for want of an answer.
            self.board = StoppingBoard()
            return False


@dataclass
class ReportSchedule:
    """Where a training loop pauses to report, and whether it was told to stop.

    With a monitor and `report_every`, the epochs go in chunks of `report_every` (the last
    one may be shorter) and the loop reports after each chunk, the last one too, so the
    monitor also hears the final loss. Otherwise there is one chunk, the whole run, and
    nothing is reported.
    """

    epochs: int
    report_every: int | None = None
    monitor: TrainingMonitor | None = None
    # The epochs trained when the monitor said stop before the last one; None otherwise.
    stopped_at_epoch: int | None = None

    def __post_init__(self) -> None:
        if self.report_every is not None and self.report_every < 1:
            raise ValueError(f"report_every={self.report_every}: need a whole number of epochs >= 1, or None")

    @classmethod
    def for_job(cls, spec: Any, monitor: TrainingMonitor | None) -> ReportSchedule:
        """The schedule of a job (its `epochs` and `report_every`) with this monitor, or none to report to."""
        return cls(spec.epochs, spec.report_every, monitor)

    @property
    def reports(self) -> bool:
        return self.monitor is not None and self.report_every is not None

    def chunks(self) -> list[tuple[int, int]]:
        """The runs of epochs to train in turn, each as (first, last): epochs first .. last - 1, from 0."""
        if not self.reports:
            return [(0, self.epochs)]
        ends = [*range(self.report_every, self.epochs, self.report_every), self.epochs]
        return list(zip([0, *ends[:-1]], ends))

    def stop_after(self, epochs_done: int, loss: Any) -> bool:
        """Report the chunk that ended at `epochs_done` with its last epoch's loss; True: stop here.

        `loss` may be a scalar array or tensor: it is read (for torch on a GPU, a device
        sync) only when there is a monitor to report to. Only a stop before the last epoch
        counts: at the end the job has nothing left to skip, and it ends as a whole run.
        """
        if not self.reports:
            return False
        if self.monitor.report(epochs_done, float(loss)) and epochs_done < self.epochs:
            self.stopped_at_epoch = epochs_done
            return True
        return False
