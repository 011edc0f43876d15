"""`runjobs submit` as one pipeline over executors: plan, ledger, run, record, report.

    plan (jobs/plan) -> ledger (jobs/record) -> executor.connect() -> session.run(jobs)
      -> each record kept as it arrives (jobs/record/store.py) -> report (jobs/report)

Everything that can be checked without a cluster (the spec, the data, the output
directory, another driver's lock) is checked before connecting, so bad input starts
nothing and leaves nothing behind; connecting comes before the directory is created,
so an unreachable cluster leaves none either. The output directory's ledger is the run's
durable record: a re-run of the same jobs into the same directory runs only what has no
result yet, and when every job has one it needs no cluster at all. The executor decides
only where the jobs run (jobs/run/executor.py): a Ray cluster driven from here, a Ray
Job on a head, or this process.
"""

from __future__ import annotations

import secrets
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from jobs.plan.planning import PlannedJob, SubmitRequest, plan_jobs, should_run
from jobs.record.ledger import Ledger, is_ledger_directory
from jobs.record.output import check_usable
from jobs.record.records import JobOutcome, exit_code_for
from jobs.record.store import keep_record
from jobs.report import combined as reports
from jobs.report.files import rebuild_report, write_report_json, write_reports
from jobs.run.executor import Detached, Executor, RunCallbacks, RunListener
from jobs.run.progress import LineProgress


@dataclass
class SubmitOutcome:
    report: dict[str, Any]
    output_dir: Path
    ran: int = 0  # jobs this call ran (a re-run may run none)

    @property
    def exit_code(self) -> int:
        """0 when every job succeeded, 1 when any did not."""
        return exit_code_for(self.report)


class Tracker(Protocol):
    """Who hears of each job once the ledger has kept it, and of the run's report (an MLflow tracker).

    Called after the ledger, never before: whatever a tracker does (or fails to do), the
    run's results are already safe in its directory.
    """

    def job_kept(self, outcome: JobOutcome, output_dir: Path) -> None: ...

    def run_finished(self, output_dir: Path, report: dict[str, Any]) -> None: ...


@dataclass
class RemoteSubmission:
    """A run handed to a cluster's Ray Jobs without waiting (`--no-wait`)."""

    job_id: str
    address: str
    output_dir: Path
    jobs: int


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def check_destination(request: SubmitRequest) -> None:
    """What `--dry-run` checks besides the jobs: the output directory and the address's form."""
    from jobs.run.cluster import connect_timeout_s, split_address
    from jobs.run.ray_jobs import is_jobs_address

    if request.output is not None:
        if is_ledger_directory(request.output):
            Ledger.open(request.output, for_writing=False).close()  # a newer or broken ledger is refused
        else:
            check_usable(request.output)
    address = request.address
    if address and address != "auto" and not is_jobs_address(address):
        split_address(address)
    if address:
        connect_timeout_s()  # a setting that cannot be read is refused before a run, too


def executor_for(request: SubmitRequest, output_dir: Path, wait: bool = True) -> Executor:
    """The executor the request's address names: Ray Jobs for http(s), else a Ray cluster driven here."""
    from jobs.run.ray_jobs import RayJobsExecutor, is_jobs_address

    if is_jobs_address(request.address):
        return RayJobsExecutor(request.address, output_dir, request.max_concurrent, wait)
    from jobs.run.ray_cluster import RayClusterExecutor

    return RayClusterExecutor(request.address, request.max_concurrent, request.wait_for_nodes)


def submit(
    request: SubmitRequest,
    progress: LineProgress | None = None,
    planned: list[PlannedJob] | None = None,
    executor: Executor | None = None,
    listener: RunListener | None = None,
    write_report_files: bool = True,
    wait: bool = True,
    tracker: Tracker | None = None,
) -> SubmitOutcome | RemoteSubmission:
    """Run the request's jobs that have no result yet; `progress` shows what happens (default: lines).

    `planned` replaces planning from the request (a remote driver gets its jobs planned by
    the client); `listener` hears of each start and each ended job, its output and model
    files included, before it is kept (a remote driver sends them to the client, which
    writes the report files itself, hence `write_report_files`). `wait=False` (Ray Jobs only) returns once
    the run is handed to the cluster. `tracker` hears of each job once it is kept, and of the report.
    """
    progress = progress or LineProgress()
    planned = plan_jobs(request) if planned is None else planned
    new_id = request.run_id or new_run_id()
    output_dir = request.output or Path("runs") / new_id
    new_directory = None
    if is_ledger_directory(output_dir):
        ledger = Ledger.open(output_dir, for_writing=True)  # refuses while another driver runs
    else:
        check_usable(output_dir)
        # The lock is taken before any cluster is touched, so of two drivers started at
        # once on a new directory the second is refused before it starts Ray; if nothing
        # runs after all (an unreachable cluster, a job it cannot hold), the new ledger
        # and any directory made for it are removed again.
        new_directory = NewLedgerDirectory(output_dir)
        ledger = new_directory.open()
    try:
        if new_directory is None and not _any_to_run(ledger, planned, request.rerun):
            # Every job already has its result: a cron re-run needs no cluster at all.
            return _nothing_to_run(output_dir, ledger, planned, progress)
        executor = executor or executor_for(request, output_dir, wait)
        with ExitStack() as connection:
            try:
                session = connection.enter_context(executor.connect())
                resolved = [session.resolve(job) for job in planned]
            except BaseException:
                if new_directory is not None:
                    ledger.close()
                    ledger = None
                    new_directory.discard()
                raise
            run_id = ledger.meta().get("run_id") or new_id
            callbacks = keeping_callbacks(output_dir, ledger, progress, listener, tracker)
            session.recover(ledger.meta(), callbacks)
            ledger.add_jobs([(job.id, job.spec.to_record()) for job in resolved])
            statuses = {job.id: job.status for job in ledger.jobs()}
            to_run = [job for job in resolved if should_run(statuses[job.id], request.rerun)]
            summary = _run(session, to_run, resolved, run_id, ledger, callbacks, output_dir, progress)
        if summary is None:  # what an earlier remote run finished was all there was to do
            executor.closed()
            return _nothing_to_run(output_dir, ledger, planned, progress)
        if isinstance(summary, Detached):
            return RemoteSubmission(summary.job_id, summary.address, output_dir, summary.jobs)
        outcome = _finish(
            output_dir, ledger, run_id, planned, summary, executor, progress, write_report_files, tracker
        )
        outcome.ran = len(to_run)
        return outcome
    finally:
        if ledger is not None:
            ledger.close()


def _run(session, to_run, resolved, run_id, ledger, callbacks, output_dir, progress):
    """Hand the jobs to the connected session; None when there is nothing to run."""
    if not to_run:
        return None
    for job in to_run:
        ledger.mark(job.id, "pending")
    ledger.set_meta(run_id=run_id, started_at=time.time(), cluster=session.cluster, finished_at=None)
    skipped = len(resolved) - len(to_run)
    progress.begin(len(to_run))
    progress.say(
        f"run {run_id}: {len(to_run)} job(s) to run" + (f", {skipped} already done" if skipped else "")
        + f" on {_describe(session.cluster)}; output {output_dir}"
    )  # fmt: skip
    try:
        return session.run(to_run, callbacks, run_id)
    except BaseException:
        # The cluster went away or the driver failed: what finished is kept, and the
        # report files say so before the error is reported.
        rebuild_report(output_dir, ledger, {job.id for job in resolved})
        raise


class NewLedgerDirectory:
    """A run directory this call creates: its ledger, and how to take it back if nothing ran."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.created = [parent for parent in [output_dir, *output_dir.parents] if not parent.exists()]

    def open(self) -> Ledger:
        return Ledger.open(self.output_dir, for_writing=True)

    def discard(self) -> None:
        """Remove the ledger's files, then the directories this call made (deepest first)."""
        for path in self.output_dir.glob("ledger.*"):
            path.unlink(missing_ok=True)
        for directory in self.created:
            try:
                directory.rmdir()
            except OSError:
                break  # something else lives there now: leave it


def _any_to_run(ledger: Ledger, planned: list[PlannedJob], rerun: str | None) -> bool:
    statuses = {job.id: job.status for job in ledger.jobs()}
    return any(should_run(statuses.get(job.id, "pending"), rerun) for job in planned)


def _nothing_to_run(output_dir: Path, ledger: Ledger, planned: list[PlannedJob], progress) -> SubmitOutcome:
    progress.say(f"nothing to run: all {len(planned)} job(s) in {output_dir} already have results")
    report = rebuild_report(output_dir, ledger, {job.id for job in planned})
    return SubmitOutcome(report, output_dir, ran=0)


def keeping_callbacks(
    output_dir: Path,
    ledger: Ledger,
    progress: LineProgress,
    listener: RunListener | None = None,
    tracker: Tracker | None = None,
) -> RunCallbacks:
    """Callbacks that keep each start and record in the run's ledger and show them on `progress`."""

    def on_start(job_id: str, quiet: bool) -> None:
        if listener is not None:
            listener.started(job_id)
        ledger.mark(job_id, "running")
        if not quiet:
            progress.started(job_id)

    def on_record(outcome: JobOutcome, quiet: bool) -> None:
        if listener is not None:
            listener.ended(outcome)
        keep_record(output_dir, ledger, outcome)
        if tracker is not None:
            tracker.job_kept(outcome, output_dir)
        if not quiet:
            progress.ended(outcome.record)

    return RunCallbacks(on_start, on_record, ledger.cancel_requested, progress.say, ledger.set_meta)


def _finish(
    output_dir, ledger, run_id, planned, summary, executor, progress, write_report_files, tracker=None
) -> SubmitOutcome:
    """The run's end: its timings and cluster in the ledger, the report files, the interrupt if any."""
    wanted = {job.id for job in planned}
    interrupted = summary.interrupted
    if interrupted is not None and interrupted.requested:
        # `runjobs cancel` waits for this answer: what its request cancelled.
        ledger.set_meta(
            cancel_outcome={"at": time.time(), "running": interrupted.running, "pending": interrupted.pending}
        )
        progress.say(
            f"cancelled by runjobs cancel: {interrupted.running} running and "
            f"{interrupted.pending} pending job(s) recorded cancelled"
        )
    timings = dict(summary.timings)
    ledger.set_meta(finished_at=time.time(), cluster=summary.cluster, driver_timings=timings)
    records = [record for record in ledger.records() if record["id"] in wanted]
    report = reports.build_report(run_id, summary.cluster, records, timings)
    if write_report_files:
        write_reports(output_dir, report)
    # Ray shuts down while the reports are written (jobs/run/cluster.py, BackgroundShutdown);
    # its time reaches report.json, written again once it is known.
    disconnect_s = executor.closed()
    if disconnect_s is not None:
        timings["disconnect_s"] = disconnect_s
        report["driver"]["timings"]["disconnect_s"] = disconnect_s
        ledger.set_meta(driver_timings=timings)
        if write_report_files:
            write_report_json(output_dir, report)
    if tracker is not None:
        tracker.run_finished(output_dir, report)
    if interrupted is not None:
        progress.say(f"interrupted: finished jobs are kept in {output_dir}")
        interrupted.outcome = SubmitOutcome(report, output_dir)  # what the CLI's --json prints
        raise interrupted
    return SubmitOutcome(report, output_dir)


def fetch_remote(address: str, job_id: str, output_dir: Path) -> tuple[SubmitOutcome, str]:
    """Keep a remote run's results from its Ray job's logs in output_dir; return the outcome and job state."""
    from jobs.run.ray_jobs import read_remote_run
    from jobs.run.remote_protocol import Follower

    status, lines, plan = read_remote_run(address, job_id)
    if not is_ledger_directory(output_dir):
        check_usable(output_dir)
    with Ledger.open(output_dir, for_writing=True) as ledger:
        if not ledger.meta().get("run_id"):
            ledger.set_meta(
                run_id=plan["run_id"],
                remote={"address": address, "job_id": job_id},
                cluster={"address": address, "embedded": False},
            )
        ledger.add_jobs([(job["id"], job["config"]) for job in plan["jobs"]])
        callbacks = keeping_callbacks(output_dir, ledger, LineProgress())
        follower = Follower(callbacks.on_start, callbacks.on_record, callbacks.say)
        follower.replay(lines)
        if follower.end is not None:
            ledger.set_meta(cluster=follower.end["cluster"], driver_timings=follower.end["driver_timings"])
        report = rebuild_report(output_dir, ledger, {job["id"] for job in plan["jobs"]})
    return SubmitOutcome(report, output_dir, ran=follower.kept), status


def _describe(cluster: dict[str, Any]) -> str:
    if "nodes" not in cluster:
        return str(cluster.get("address"))
    return (
        f"{cluster['address']} ({cluster['nodes']} node(s), {cluster['cpus']:g} CPU, {cluster['gpus']:g} GPU)"
    )
