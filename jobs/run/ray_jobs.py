"""The executor for Ray Jobs: the driver runs on the cluster's head, the results land here.

`runjobs submit --address http://HEAD:8265` plans and checks every job here, then submits
one Ray Job whose runtime_env working_dir carries runjobs' own code, the planned jobs,
any CSV data they read and the code of any user model they train (the text planned and
checked here: the cluster needs no copy of the file). On the cluster, `python -m
jobs.run.remote_entry` runs the usual pipeline with the Ray cluster executor and prints
each ended job's whole record as marked lines (jobs/run/remote_protocol.py). This side
follows that output through the Jobs API and hands each record to the pipeline the
moment it arrives, so what finished is kept even if the cluster goes away later. Only
the Jobs (dashboard) port is needed: reach it through `ray dashboard cluster/gpu.yaml`.

The same marked lines let `runjobs status --address ADDR JOBID` and `runjobs report
--address ADDR JOBID --output DIR` work later from the job's logs (after `--no-wait`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jobs.plan.keep_warm import KeepWarm
from jobs.plan.optuna_search import STUDY_FILE
from jobs.plan.planning import PlannedJob
from jobs.plan.stopping_rule import StoppingRule
from jobs.record.records import JobOutcome
from jobs.run.authentication import choose_mode_for
from jobs.run.cluster import ClusterUnreachableError, wait_until_reachable
from jobs.run.driver import CANCEL_POLL_S, RunInterrupted
from jobs.run.executor import Detached, JobFeed, RunCallbacks, RunSummary
from jobs.run.remote_protocol import (
    PLAN_MARKER,
    RECORD_MARKER,
    TRIAL_MARKER,
    Follower,
    MarkedLines,
    complete_lines,
    decode_outcome,
    ended_in,
    plan_from,
)

PLAN_FILE = "runjobs-plan.json"
ENTRYPOINT = f"python -m jobs.run.remote_entry {PLAN_FILE}"
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterLostError(ClusterUnreachableError):
    """The cluster stopped answering while a remote run was followed; finished jobs are kept."""


class RemoteRunError(RuntimeError):
    """The remote driver ended without finishing (it crashed, or its Ray job was stopped)."""


class UnknownRemoteJobError(ValueError):
    """No such Ray job, or a Ray job that is not a runjobs run."""


class RemoteRunBusyError(ValueError):
    """The output directory's remote run is still going: submitting again would run its jobs twice."""


def is_jobs_address(address: str | None) -> bool:
    """An http(s) address is a Ray Jobs (dashboard) server; others go to the GCS or Ray Client."""
    return bool(address) and address.startswith(("http://", "https://"))


def jobs_client(address: str):
    """A Jobs API client for `address`, presenting a token when the cluster wants one."""
    wait_until_reachable(address)
    choose_mode_for(address)
    from ray.job_submission import JobSubmissionClient

    # The SDK's INFO lines (package upload, websocket closed) are not for our users; set
    # after the import, which configures Ray's loggers.
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ClusterUnreachableError(
            f"the Ray Jobs server at {address} refused runjobs: {_first_line(error)}; if the cluster uses "
            "token authentication, give its token in RAY_AUTH_TOKEN or ~/.ray/auth_token"
        ) from None


class RayJobsExecutor:
    def __init__(
        self,
        address: str,
        output_dir: Path,
        max_concurrent: int | None,
        wait: bool = True,
        keep_warm: KeepWarm | None = None,
    ) -> None:
        self.address = address
        self.output_dir = output_dir
        self.max_concurrent = max_concurrent
        self.wait = wait
        self.keep_warm = keep_warm

    @contextmanager
    def connect(self) -> Iterator[RayJobsSession]:
        # Before anything is written: an unreachable or refusing server leaves no directory.
        yield RayJobsSession(jobs_client(self.address), self)

    def closed(self) -> float | None:
        return None  # nothing to close here: the Ray job ends on the cluster


class RayJobsSession:
    def __init__(self, client, executor: RayJobsExecutor) -> None:
        self.client = client
        self.address = executor.address
        self.output_dir = executor.output_dir
        self.max_concurrent = executor.max_concurrent
        self.wait = executor.wait
        self.keep_warm = executor.keep_warm
        # Until the remote driver reports the cluster's size at its end.
        self.cluster: dict[str, Any] = {"address": self.address, "embedded": False}

    def resolve(self, job: PlannedJob) -> PlannedJob:
        """As planned: the remote driver resolves what depends on the cluster, on the cluster."""
        return job

    def recover(self, meta: dict[str, Any], callbacks: RunCallbacks) -> None:
        """Before submitting into a directory, keep what its earlier remote run finished.

        Refuses while that run is still going (after --no-wait, or a connection lost
        mid-run): submitting again would run its jobs twice.
        """
        earlier = meta.get("remote")
        if not earlier or earlier.get("address") != self.address:
            return
        job_id = earlier["job_id"]
        try:
            status = _job_status(self.client, job_id)
        except UnknownRemoteJobError:
            return  # the cluster no longer knows it (a new head): nothing to wait for
        if status not in TERMINAL_STATES:
            raise RemoteRunBusyError(
                f"Ray job {job_id} is still running this directory's run ({status}); wait for it with "
                f"`runjobs report --address {self.address} {job_id} --output {self.output_dir}`, or stop "
                f"it with `ray job stop --address {self.address} {job_id}`"
            )
        lines = complete_lines(self.client.get_job_logs(job_id))
        # A job the log shows ended was seen starting when that run was followed: its start,
        # replayed, would count an attempt twice. (A run that ended leaves nothing to do
        # here unless a search goes on, which brings the same directory back to the head.)
        ended = ended_in(lines)

        def on_start(job: str, quiet: bool) -> None:
            if job not in ended:
                callbacks.on_start(job, quiet)

        follower = Follower(on_start, callbacks.on_record, callbacks.say, callbacks.on_trial)
        follower.replay(lines)

    def run(
        self,
        jobs: list[PlannedJob],
        callbacks: RunCallbacks,
        run_id: str,
        feed: JobFeed | None = None,
        stopping: StoppingRule | None = None,
    ) -> RunSummary | Detached:
        # An adaptive search runs on the head, from the study as it is here; its trials and
        # records come back as lines, so this directory's study and ledger keep in step.
        search = feed.remote_plan() if feed is not None else None
        with staged(jobs, run_id, self.max_concurrent, stopping, search, self.keep_warm) as directory:
            job_id = _submit_job(
                self.client,
                entrypoint=ENTRYPOINT,
                submission_id=f"runjobs-{run_id}-{secrets.token_hex(3)}",
                runtime_env={"working_dir": str(directory)},
                metadata={"runjobs_run_id": run_id, "runjobs_jobs": str(len(jobs))},
            )
        callbacks.keep_meta(remote={"address": self.address, "job_id": job_id})
        callbacks.say(f"run {run_id}: submitted Ray job {job_id} to {self.address} with {len(jobs)} job(s)")
        if not self.wait:
            return Detached(job_id, self.address, len(jobs))
        started: set[str] = set()
        ended: set[str] = set()

        def on_start(job: str, quiet: bool) -> None:
            started.add(job)
            callbacks.on_start(job, quiet)

        def on_record(outcome: JobOutcome, quiet: bool) -> None:
            callbacks.on_record(outcome, quiet)
            ended.add(outcome.id)

        follower = Follower(on_start, on_record, callbacks.say, callbacks.on_trial)
        interrupted = None
        try:
            follow(self.client, job_id, follower, should_stop=callbacks.should_stop)
        except (KeyboardInterrupt, CancelRequested) as stop:
            # Ctrl-C or `runjobs cancel`: stop the remote driver, which records its running
            # jobs cancelled; keep what it sends until it has ended.
            running = len(started - ended)
            pending = len(jobs) - len(started | ended)
            callbacks.say(f"interrupted: stopping Ray job {job_id}")
            try:
                self.client.stop_job(job_id)
                follow(self.client, job_id, follower)
            except (OSError, RuntimeError, ClusterUnreachableError) as error:
                callbacks.say(f"could not stop Ray job {job_id}: {_first_line(error)}; `ray job stop` it")
            interrupted = RunInterrupted(running, pending, requested=isinstance(stop, CancelRequested))
        except ClusterLostError as error:
            raise ClusterLostError(
                f"{error}; {follower.kept} finished job(s) are kept in {self.output_dir}; the Ray job may "
                f"still be running: fetch it later with `runjobs report --address {self.address} {job_id} "
                f"--output {self.output_dir}`, or submit again to run what is missing"
            ) from None
        if follower.end is None and interrupted is None:
            info = self.client.get_job_info(job_id)
            raise RemoteRunError(
                f"Ray job {job_id} ended {info.status} before its driver finished: "
                f"{_first_line(info.message or '')}; {follower.kept} finished job(s) are kept in "
                f"{self.output_dir}; see `ray job logs {job_id} --address {self.client.get_address()}`"
            )
        end = follower.end or {}
        return RunSummary(end.get("cluster") or self.cluster, end.get("driver_timings") or {}, interrupted)


def read_remote_run(address: str, job_id: str) -> tuple[str, list[str], dict[str, Any]]:
    """A remote run's Ray job state, its whole log and its plan; UnknownRemoteJobError if it is none."""
    client = jobs_client(address)
    status = _job_status(client, job_id)
    lines = complete_lines(client.get_job_logs(job_id))
    plan = plan_from(lines)
    if plan is None:
        raise UnknownRemoteJobError(
            f"Ray job {job_id} at {address} is not a runjobs run (its logs have no plan); "
            "`ray job list --address ADDRESS` lists the jobs"
        )
    return status, lines, plan


def remote_status(address: str, job_id: str) -> dict[str, Any]:
    """A remote run's state from its Ray job: counts by state, read from the job's logs."""
    client = jobs_client(address)
    status = _job_status(client, job_id)
    counts = {"succeeded": 0, "stopped": 0, "failed": 0, "cancelled": 0}
    total = None
    reader = MarkedLines()
    for line in complete_lines(client.get_job_logs(job_id)):
        marked = reader.feed(line)
        try:
            if marked and marked[0] == PLAN_MARKER:
                total = len(json.loads(marked[1])["jobs"])
            elif marked and marked[0] == TRIAL_MARKER and json.loads(marked[1]).get("job"):
                total = (total or 0) + 1  # a search's jobs are known as its trials are asked
            elif marked and marked[0] == RECORD_MARKER:
                counts[decode_outcome(marked[1]).status] += 1
        except (ValueError, KeyError):
            continue  # an unreadable line: counted by neither
    ended = sum(counts.values())
    return {
        "address": address,
        "job_id": job_id,
        "ray_job_status": status,
        "jobs": total,
        "counts": {**counts, "unfinished": (total - ended) if total is not None else None},
    }


class _KeepFailed(Exception):
    """Keeping a record failed here (a full disk): not the cluster's fault."""


class CancelRequested(Exception):
    """`runjobs cancel` asked the run that this client follows to stop."""


def follow(client, job_id: str, follower: Follower, should_stop: Callable[[], bool] | None = None) -> None:
    """Feed the job's output to `follower` until the job ends; ClusterLostError if the cluster goes.

    `should_stop` is asked a few times a second; CancelRequested once it answers true.
    """

    follower.partial = ""  # a stream followed again starts from the log's beginning
    follower.reader = MarkedLines()

    async def tail() -> None:
        async for text in client.tail_job_logs(job_id):
            try:
                follower.chunk(text)
            except Exception as error:
                raise _KeepFailed() from error
            if follower.end is not None:
                # Everything is here: no need to wait (seconds, as Ray polls the job's
                # state once a second) for the stream to close after the job exits.
                return

    async def watch() -> None:
        while not should_stop():
            await asyncio.sleep(CANCEL_POLL_S)
        raise CancelRequested()

    async def tail_until_stopped() -> None:
        if should_stop is None:
            return await tail()
        tasks = [asyncio.ensure_future(tail()), asyncio.ensure_future(watch())]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        done.pop().result()  # the first to end: its exception (CancelRequested, an error) goes on

    try:
        asyncio.run(tail_until_stopped())
    except (KeyboardInterrupt, CancelRequested):
        raise
    except _KeepFailed as failure:
        raise failure.__cause__ from None
    except Exception as error:  # aiohttp's and Ray's errors alike: ask the server what happened
        try:
            status = _job_status(client, job_id)
        except ClusterUnreachableError:
            raise ClusterLostError(
                f"lost the cluster at {client.get_address()} while following Ray job {job_id} "
                f"({_first_line(error)})"
            ) from None
        if status not in TERMINAL_STATES:
            raise ClusterLostError(
                f"the log stream of Ray job {job_id} broke while it was {status} ({_first_line(error)})"
            ) from None
    follower.flush()
    if follower.end is None:
        # The stream can close a moment before the last lines reach the job's log: read
        # the whole log once more; records already kept are skipped.
        follower.replay(complete_lines(client.get_job_logs(job_id)), count_starts=False)


# A head whose dashboard answers before its job agent is up (just after `ray up` or
# `ray start`) refuses submissions for a few seconds with this message.
AGENT_NOT_READY = "No available agent to submit job"
AGENT_WAIT_S = 60.0


def _submit_job(client, **fields) -> str:
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(**fields)
        except RuntimeError as error:
            if AGENT_NOT_READY not in str(error) or time.monotonic() > deadline:
                raise ClusterUnreachableError(
                    f"the Ray Jobs server at {client.get_address()} did not take the run: "
                    f"{_first_line(error)}"
                ) from None
            time.sleep(1.0)


def _job_status(client, job_id: str) -> str:
    try:
        return str(client.get_job_status(job_id).value)
    except RuntimeError as error:
        if "does not exist" in str(error) or "404" in str(error):
            raise UnknownRemoteJobError(
                f"no Ray job {job_id} at {client.get_address()}; `ray job list --address "
                f"{client.get_address()}` lists the jobs"
            ) from None
        raise ClusterUnreachableError(_first_line(error)) from None
    except Exception as error:  # requests' connection errors
        raise ClusterUnreachableError(
            f"{client.get_address()} does not answer ({_first_line(error)})"
        ) from None


@contextmanager
def staged(
    planned,
    run_id: str,
    max_concurrent: int | None,
    stopping: StoppingRule | None = None,
    search: dict[str, Any] | None = None,
    keep_warm: KeepWarm | None = None,
) -> Iterator[Path]:
    """The job's working_dir: runjobs' code, the planned jobs, their CSV files and user models' code."""
    import jobs
    import workers
    from workers import models

    with tempfile.TemporaryDirectory(prefix="runjobs-stage-") as scratch:
        directory = Path(scratch)
        for package in (jobs, workers):
            source = Path(package.__file__).parent
            shutil.copytree(source, directory / source.name, ignore=shutil.ignore_patterns("__pycache__"))
        copied: dict[str, str] = {}
        shipped_models: dict[str, str] = {}
        plan_jobs_list = []
        for job in planned:
            entry = {"id": job.id, "config": job.spec.to_record()}
            data = job.spec.data
            # The same test as workers/data.load_dataset: anything else is a CSV path.
            if not (data == "article" or data == "synthetic" or data.startswith("synthetic:")):
                source = str(Path(data).resolve())
                if source not in copied:
                    copied[source] = f"data/{len(copied)}-{Path(source).name}"
                    (directory / "data").mkdir(exist_ok=True)
                    shutil.copyfile(source, directory / copied[source])
                entry["data_file"] = copied[source]  # the config keeps the user's path
            if not models.is_built_in(job.spec.model):
                # The text this process planned and checked (and hashed into the id), not the
                # file as it is now; the remote driver hands it to its workers.
                model = models.read_user_model(job.spec.model)
                if model.digest not in shipped_models:
                    # Not an importable name (a hyphen): the remote driver's cwd is on sys.path.
                    shipped_models[model.digest] = (
                        f"model-files/{len(shipped_models)}-{Path(model.filename).name}"
                    )
                    (directory / "model-files").mkdir(exist_ok=True)
                    (directory / shipped_models[model.digest]).write_bytes(model.text.encode("utf-8"))
                entry["model_file"] = shipped_models[model.digest]  # the config keeps the user's name
                entry["model_filename"] = model.filename  # what tracebacks name
            plan_jobs_list.append(entry)
        plan = {"run_id": run_id, "max_concurrent": max_concurrent, "jobs": plan_jobs_list}
        if keep_warm is not None:  # the head's driver keeps its warm workers this long
            plan["keep_warm"] = dataclasses.asdict(keep_warm)
        if stopping is not None:  # the head's driver applies the rule
            plan["stopping"] = dataclasses.asdict(stopping)
        if search is not None:  # the head's driver asks the shipped study for the trials
            (directory / STUDY_FILE).write_bytes(search["study"])
            plan["search"] = {"spec": search["spec"], "overrides": search["overrides"], "study": STUDY_FILE}
        (directory / PLAN_FILE).write_text(json.dumps(plan))
        yield directory


def _first_line(error: BaseException | str) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
