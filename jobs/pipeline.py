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

import contextlib
import dataclasses
import secrets
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from jobs.plan.fields import SpecError
from jobs.plan.optuna_search import STUDY_FILE, SearchSpec, Study, import_optuna, trial_number
from jobs.plan.planning import (
    PlannedJob,
    SubmitRequest,
    TrialPlanner,
    check_request,
    plan_jobs,
    search_of,
    should_run,
    stopping_of,
)
from jobs.record.ledger import Ledger, is_ledger_directory
from jobs.record.output import check_usable
from jobs.record.records import JobOutcome, exit_code_for, finite_only
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
        return RayJobsExecutor(request.address, output_dir, request.max_concurrent, wait, request.keep_warm)
    from jobs.run.ray_cluster import RayClusterExecutor

    return RayClusterExecutor(
        request.address, request.max_concurrent, request.wait_for_nodes, request.keep_warm
    )


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
    search = (request.search or search_of(request)) if planned is None else None
    stopping = stopping_of(request)
    if search is not None:
        trials = plan_search(request, search, wait)
        planned = []
    else:
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
    study = None
    try:
        if search is not None:
            try:
                if request.study_from is not None and not (output_dir / STUDY_FILE).exists():
                    # A remote run's driver continues the study its client shipped.
                    shutil.copyfile(request.study_from, output_dir / STUDY_FILE)
                study = Study(search, output_dir, request.overrides.to_record()).open()
            except BaseException:
                if new_directory is not None:
                    ledger.close()
                    ledger = None
                    new_directory.discard()
                raise
            planned = reconcile(study, ledger, trials)
            ledger.set_meta(search=search.described())
        elif ledger.meta().get("search"):
            ledger.set_meta(search=None)  # a grid run into a search's directory reports as a grid
        if new_directory is None and not (
            _any_to_run(ledger, planned, request.rerun) or (study is not None and study.remaining() > 0)
        ):
            # Every job already has its result: a cron re-run needs no cluster at all.
            return _nothing_to_run(output_dir, ledger, _wanted(planned, ledger, study), progress)
        executor = executor or executor_for(request, output_dir, wait)
        with ExitStack() as connection:
            try:
                session = connection.enter_context(executor.connect())
                resolved = [session.resolve(job) for job in planned]
                for probe in trials.probes if search is not None else []:
                    session.resolve(probe)  # a space this cluster cannot hold is refused now
            except BaseException:
                if new_directory is not None:
                    ledger.close()
                    ledger = None
                    new_directory.discard()
                raise
            run_id = ledger.meta().get("run_id") or new_id
            callbacks = keeping_callbacks(output_dir, ledger, progress, listener, tracker)
            if study is not None:
                callbacks = _in_step_with(study, ledger, callbacks)
            session.recover(ledger.meta(), callbacks)
            ledger.add_jobs([(job.id, job.spec.to_record()) for job in resolved])
            statuses = {job["id"]: job["status"] for job in ledger.summaries()}
            to_run = [job for job in resolved if should_run(statuses[job.id], request.rerun)]
            feed = None
            if study is not None:
                feed = SearchFeed(study, trials, session, ledger, progress, len(to_run), listener)
                callbacks = feed.counting(callbacks)
            summary = _run(
                session, to_run, resolved, run_id, ledger, callbacks, output_dir, progress, feed, stopping
            )
        if summary is None:  # what an earlier remote run finished was all there was to do
            executor.closed()
            return _nothing_to_run(output_dir, ledger, _wanted(planned, ledger, study), progress)
        if isinstance(summary, Detached):
            return RemoteSubmission(summary.job_id, summary.address, output_dir, summary.jobs)
        outcome = _finish(
            output_dir,
            ledger,
            run_id,
            _wanted(planned, ledger, study),
            summary,
            executor,
            progress,
            write_report_files,
            tracker,
        )
        outcome.ran = len(to_run) + (feed.asked if feed is not None else 0)
        return outcome
    finally:
        if study is not None:
            study.close()
        if ledger is not None:
            ledger.close()


def plan_search(request: SubmitRequest, search: SearchSpec, wait: bool = True) -> TrialPlanner:
    """An adaptive search's checks before anything starts: its trials' fields, data and options."""
    from jobs.run.ray_jobs import is_jobs_address

    check_request(request)
    if request.frameworks or request.variants or request.preset:
        raise SpecError(
            "with a search spec file, name frameworks and variants in it (defaults: or sample:), "
            "not as options"
        )
    swept = sorted(set(search.distributions) & {*request.overrides.common, *(
        name for values in request.overrides.per_framework.values() for name in values
    )})  # fmt: skip
    if swept:
        raise SpecError(
            f"--set {swept[0]}: the search samples {swept[0]}; a value set here would replace every "
            "trial's draw. Fix it in the spec file's defaults: instead, or leave it to the search"
        )
    if request.rerun is not None:
        raise SpecError(
            f"--rerun {request.rerun}: a search's finished trials are told to its study and stay; "
            "run the search into a new --output directory to start it again"
        )
    if not wait:
        raise SpecError(
            "--no-wait: a search's study is kept in step with its records as they come; "
            "run it without --no-wait (it goes on on the head if this process is stopped)"
        )
    trials = TrialPlanner(search, request.overrides)
    trials.check()
    if is_jobs_address(request.address):
        trials.check_shippable()
    import_optuna()
    return trials


def reconcile(study: Study, ledger: Ledger, trials: TrialPlanner) -> list[PlannedJob]:
    """Bring the study in step with the ledger; the jobs of running trials that have no result yet.

    A running trial whose job has a record (the driver was stopped between keeping it and
    telling the study) is told now; one without (stopped before its job ended, or before
    the job reached the ledger) is planned again with the same id.
    """
    kept = {job.id: job for job in ledger.jobs()}
    to_run = []
    for trial in study.running():
        if set(trial.params) != set(study.spec.distributions):
            # Stopped while Optuna wrote the trial's values one by one: no job ever had
            # them, so the sampler draws the rest now and the trial runs as asked.
            trial = study.complete(trial)
        try:
            job = trials.job(study.fields_of(trial), trial.number)
        except (SpecError, ValueError):
            # Values no job can take, as `take` found before it was stopped: failed, as there.
            study.tell(trial.number, {"status": "failed"})
            continue
        known = kept.get(job.id)
        if known is not None and known.record is not None and study.tell(trial.number, known.record):
            continue
        to_run.append(job)
    return to_run


def _in_step_with(study: Study, ledger: Ledger, callbacks: RunCallbacks) -> RunCallbacks:
    """The callbacks, with the study told each trial's record once the ledger has kept it, and
    with a remote driver's trials (`on_trial`) asked here too, each with its job in the ledger."""
    keep = callbacks.on_record

    def on_record(outcome: JobOutcome, quiet: bool) -> None:
        keep(outcome, quiet)
        number = trial_number(outcome.id)
        if number is not None:
            study.tell(number, outcome.record)

    def on_trial(event: dict[str, Any]) -> None:
        if event.get("event") == "asked":
            study.mirror_asked(event["number"], event["params"])
            ledger.add_jobs([(event["job"]["id"], event["job"]["config"])])
        elif event.get("event") == "told":  # a trial whose values no job could take
            study.mirror_asked(event["number"], event["params"])
            study.tell(event["number"], {"status": "failed"})

    return dataclasses.replace(callbacks, on_record=on_record, on_trial=on_trial)


class SearchFeed:
    """An adaptive search's trials as a run's job feed: asked for while fewer than `parallel` run.

    Each new trial is in the study before its job is in the ledger, and each record is in
    the ledger before the study is told (jobs/plan/optuna_search.py says why). A remote
    driver's `listener` hears of each trial asked, so its client's study keeps in step.
    """

    def __init__(self, study, trials, session, ledger, progress, in_flight: int, listener=None) -> None:
        self.study = study
        self.trials = trials
        self.session = session
        self.ledger = ledger
        self.progress = progress
        self.in_flight = in_flight
        self.listener = listener if hasattr(listener, "trial") else None
        self.asked = 0

    def take(self) -> list[PlannedJob]:
        jobs = []
        while self.in_flight < self.study.spec.settings.parallel and self.study.remaining() > 0:
            trial = self.study.ask()
            try:
                job = self.session.resolve(self.trials.job(self.study.fields_of(trial), trial.number))
            except (SpecError, ValueError) as error:
                # Values a trial drew that no job can take (checked at the ends of each range
                # before the run, so rare): the study learns they fail, and the search goes on.
                self.study.tell(trial.number, {"status": "failed"})
                self.progress.say(f"trial {trial.number}: not run, told failed: {error}")
                if self.listener is not None:
                    self.listener.trial({"event": "told", "number": trial.number, "params": trial.params})
                continue
            self.ledger.add_jobs([(job.id, job.spec.to_record())])
            self.ledger.mark(job.id, "pending")
            if self.listener is not None:
                job_entry = {"id": job.id, "config": job.spec.to_record()}
                self.listener.trial(
                    {"event": "asked", "number": trial.number, "params": trial.params, "job": job_entry}
                )
            self.in_flight += 1
            self.asked += 1
            jobs.append(job)
        return jobs

    def exhausted(self) -> bool:
        return self.study.remaining() == 0

    def remaining(self) -> int:
        return self.study.remaining()

    def counting(self, callbacks: RunCallbacks) -> RunCallbacks:
        """The callbacks, counting each trial's end: another may be asked for."""
        keep = callbacks.on_record

        def on_record(outcome: JobOutcome, quiet: bool) -> None:
            keep(outcome, quiet)
            if trial_number(outcome.id) is not None:
                self.in_flight -= 1

        return dataclasses.replace(callbacks, on_record=on_record)

    def remote_plan(self) -> dict[str, Any]:
        """What a remote driver needs to run this search: its spec, --set and the study so far."""
        return {
            "spec": self.study.spec.to_record(),
            "overrides": self.trials.overrides.to_record(),
            "study": self.study.snapshot(),
        }


def _wanted(planned: list[PlannedJob], ledger: Ledger, study: Study | None) -> set[str]:
    """The jobs the report covers: the planned ones, or every trial of a search."""
    if study is None:
        return {job.id for job in planned}
    return {job.id for job in ledger.jobs() if trial_number(job.id) is not None}


def _run(
    session, to_run, resolved, run_id, ledger, callbacks, output_dir, progress, feed=None, stopping=None
):
    """Hand the jobs to the connected session; None when there is nothing to run."""
    if not to_run and (feed is None or feed.exhausted()):
        return None
    with ledger.batch():  # one commit, not one a job: a 10,000-job sweep starts at once
        for job in to_run:
            ledger.mark(job.id, "pending")
    ledger.set_meta(run_id=run_id, started_at=time.time(), cluster=session.cluster, finished_at=None)
    skipped = len(resolved) - len(to_run)
    if feed is None:
        progress.begin(len(to_run))
        what = f"{len(to_run)} job(s) to run" + (f", {skipped} already done" if skipped else "")
    else:
        remaining = feed.study.remaining()
        progress.begin(len(to_run) + remaining)
        settings = feed.study.spec.settings
        what = (
            f"a search of {settings.trials} trial(s), {len(to_run) + remaining} to run, "
            f"{settings.parallel} at a time, {settings.direction} {settings.metric}"
        )
    if stopping is not None:
        what += f"; stopping rule {stopping.rule}, reports every {stopping.every} epoch(s)"
        ledger.set_meta(stopping=stopping.described())
    progress.say(f"run {run_id}: {what} on {_describe(session.cluster)}; output {output_dir}")
    # Only what this run uses is passed: an executor without searches or stopping rules
    # (a test's) keeps the plain signature.
    extra = {"feed": feed} if feed is not None else {}
    if stopping is not None:
        extra["stopping"] = stopping
    try:
        return session.run(to_run, callbacks, run_id, **extra)
    except BaseException:
        # The cluster went away or the driver failed: what finished is kept, and the
        # report files say so before the error is reported.
        rebuild_report(output_dir, ledger, _wanted(resolved, ledger, feed.study if feed else None))
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
        for pattern in ("ledger.*", f"{STUDY_FILE}*"):
            for path in self.output_dir.glob(pattern):
                path.unlink(missing_ok=True)
        for directory in self.created:
            try:
                directory.rmdir()
            except OSError:
                break  # something else lives there now: leave it


def _any_to_run(ledger: Ledger, planned: list[PlannedJob], rerun: str | None) -> bool:
    statuses = {job["id"]: job["status"] for job in ledger.summaries()}
    return any(should_run(statuses.get(job.id, "pending"), rerun) for job in planned)


def _nothing_to_run(output_dir: Path, ledger: Ledger, wanted: set[str], progress) -> SubmitOutcome:
    progress.say(f"nothing to run: all {len(wanted)} job(s) in {output_dir} already have results")
    report = rebuild_report(output_dir, ledger, wanted)
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

    # A pack's records are kept in one ledger transaction; the tracker (HTTP to MLflow)
    # hears of them once it is committed, so the ledger is never held while it talks.
    held_for_tracker: list[JobOutcome] = []

    def on_record(outcome: JobOutcome, quiet: bool) -> None:
        if listener is not None:
            listener.ended(outcome)
        keep_record(output_dir, ledger, outcome)
        if tracker is not None:
            if ledger.batching:
                held_for_tracker.append(outcome)
            else:
                tracker.job_kept(outcome, output_dir)
        if not quiet:
            progress.ended(outcome.record)

    @contextlib.contextmanager
    def together():
        try:
            with ledger.batch():
                yield
        finally:
            while held_for_tracker:
                tracker.job_kept(held_for_tracker.pop(0), output_dir)

    def on_progress(latest: dict[str, list[float]]) -> None:
        ledger.set_meta(progress=finite_only(latest))  # for `runjobs status` while the run goes on
        progress.reported(latest)

    def on_pack(pack, outcomes: list[JobOutcome]) -> None:
        progress.pack_ended(pack.id, [outcome.record for outcome in outcomes])

    return RunCallbacks(
        on_start,
        on_record,
        ledger.cancel_requested,
        progress.say,
        ledger.set_meta,
        on_progress,
        together=together,
        on_pack=on_pack,
    )


def _finish(
    output_dir, ledger, run_id, wanted, summary, executor, progress, write_report_files, tracker=None
) -> SubmitOutcome:
    """The run's end: its timings and cluster in the ledger, the report files, the interrupt if any."""
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
    ledger.set_meta(finished_at=time.time(), cluster=summary.cluster, driver_timings=timings, progress={})
    # Light records (no per-epoch series): report.json and TensorBoard read whole ones from the ledger.
    records = [record for record in ledger.records(light=True) if record["id"] in wanted]
    report = reports.build_report(run_id, summary.cluster, records, timings, ledger.meta().get("search"))
    if write_report_files:
        write_reports(output_dir, report, ledger)
    # Ray shuts down while the reports are written (jobs/run/cluster.py, BackgroundShutdown);
    # its time reaches report.json, written again once it is known.
    disconnect_s = executor.closed()
    if disconnect_s is not None:
        timings["disconnect_s"] = disconnect_s
        report["driver"]["timings"]["disconnect_s"] = disconnect_s
        ledger.set_meta(driver_timings=timings)
        if write_report_files:
            write_report_json(output_dir, report, ledger)
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
    if plan.get("search"):
        # Its trials' jobs reach a ledger only beside the study they were asked of.
        raise SpecError(
            f"Ray job {job_id} is an adaptive search: once it has ended, run the same `runjobs submit "
            f"SPEC --address {address} --output DIR` again into its directory, which brings its trials "
            "and records home into the study and the ledger together"
        )
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
