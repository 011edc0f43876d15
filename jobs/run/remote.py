"""Remote submission through Ray Jobs: the driver runs on the cluster, the results land here.

`runjobs submit --address http://HEAD:8265` plans and checks every job here, then submits
one Ray Job whose runtime_env working_dir carries runjobs' own code, the planned jobs
and any CSV data they read. On the cluster, `python -m jobs.run.remote_entry` runs the usual
driver against the cluster and prints each ended job's whole record (logs and model
files included) as one marked line of its output. This side follows that output
through the Jobs API and keeps each record in the local output directory's ledger the
moment it arrives, so what finished is kept even if the cluster goes away later. Only
the Jobs (dashboard) port is needed: reach it through `ray dashboard cluster/gpu.yaml`.

The same marked lines let `runjobs status --address ADDR JOBID` and `runjobs report
--address ADDR JOBID --output DIR` work later from the job's logs (after `--no-wait`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.record.ledger import Ledger, is_ledger_directory
from jobs.record.output import check_usable
from jobs.run.authentication import choose_mode_for
from jobs.run.cluster import ClusterUnreachableError, wait_until_reachable
from jobs.run.driver import CANCEL_POLL_S, RunInterrupted
from jobs.run.progress import LineProgress
from jobs.run.submit import (
    SubmitOutcome,
    SubmitRequest,
    keep_record,
    new_run_id,
    plan_jobs,
    rebuild_report,
    should_run,
)

# Marked lines in the remote driver's output; everything else is its own messages.
PLAN_MARKER = "runjobs-plan "
STARTED_MARKER = "runjobs-started "
RECORD_MARKER = "runjobs-record "
END_MARKER = "runjobs-end "
# A payload longer than LINE_LIMIT goes out as PART lines followed by its marked line
# (the rest): Ray's log stream is a websocket whose messages aiohttp caps at 4 MiB.
PART_MARKER = "runjobs-part "
LINE_LIMIT = 512 * 1024
PLAN_FILE = "runjobs-plan.json"
ENTRYPOINT = f"python -m jobs.run.remote_entry {PLAN_FILE}"
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
# Ray's own INFO lines in a job's log ("2026-11-25 09:50:50,528\tINFO job_manager.py:581 -- ...").
RAY_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO)\s")


class ClusterLostError(ClusterUnreachableError):
    """The cluster stopped answering while a remote run was followed; finished jobs are kept."""


class RemoteRunError(RuntimeError):
    """The remote driver ended without finishing (it crashed, or its Ray job was stopped)."""


class UnknownRemoteJobError(ValueError):
    """No such Ray job, or a Ray job that is not a runjobs run."""


class RemoteRunBusyError(ValueError):
    """The output directory's remote run is still going: submitting again would run its jobs twice."""


def marked_text(marker: str, payload: str) -> str:
    """The lines that carry `payload` under `marker`, newline-terminated, for one write."""
    parts = [payload[start : start + LINE_LIMIT] for start in range(0, len(payload), LINE_LIMIT)] or [""]
    return "".join(f"{PART_MARKER}{part}\n" for part in parts[:-1]) + f"{marker}{parts[-1]}\n"


class MarkedLines:
    """Reassembles marked payloads from a job's log lines: feed lines, get (marker, payload)."""

    MARKERS = (PLAN_MARKER, STARTED_MARKER, RECORD_MARKER, END_MARKER)

    def __init__(self) -> None:
        self.parts: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        """(marker, payload) when `line` ends a marked payload; ("", line) for any other line."""
        if line.startswith(PART_MARKER):
            self.parts.append(line[len(PART_MARKER) :])
            return None
        for marker in self.MARKERS:
            if line.startswith(marker):
                payload = "".join(self.parts) + line[len(marker) :]
                self.parts.clear()
                return marker, payload
        return "", line


def complete_lines(text: str) -> list[str]:
    """A log's lines without a last one still being written (no newline yet)."""
    return text.split("\n")[:-1]


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


@dataclass
class RemoteSubmission:
    job_id: str
    address: str
    output_dir: Path
    jobs: int


def submit_remote(
    request: SubmitRequest, progress: LineProgress, wait: bool = True
) -> SubmitOutcome | RemoteSubmission:
    """Plan here, run the driver on the cluster as a Ray Job, and (with wait) keep its results here."""
    address = request.address
    planned = plan_jobs(request)
    run_id = new_run_id()
    output_dir = request.output or Path("runs") / run_id
    existing = is_ledger_directory(output_dir)
    if not existing:
        check_usable(output_dir)
    client = jobs_client(address)  # before anything is written: unreachable leaves no directory
    with Ledger.open(output_dir, for_writing=True) as ledger:
        run_id = ledger.meta().get("run_id") or run_id
        _collect_earlier_remote_run(client, address, output_dir, ledger)
        ledger.add_jobs([(job.id, job.spec.to_record()) for job in planned])
        states = {job.id: job.status for job in ledger.jobs()}
        to_run = [job for job in planned if should_run(states[job.id], request.rerun)]
        wanted = {job.id for job in planned}
        if not to_run:
            progress.say(f"nothing to run: all {len(planned)} job(s) in {output_dir} already have results")
            return SubmitOutcome(rebuild_report(output_dir, ledger, wanted), output_dir, ran=0)
        submission_id = f"runjobs-{run_id}-{secrets.token_hex(3)}"
        with staged(to_run, run_id, request.max_concurrent) as directory:
            job_id = _submit_job(
                client,
                entrypoint=ENTRYPOINT,
                submission_id=submission_id,
                runtime_env={"working_dir": str(directory)},
                metadata={"runjobs_run_id": run_id, "runjobs_jobs": str(len(to_run))},
            )
        for job in to_run:
            ledger.mark(job.id, "pending")
        ledger.set_meta(
            run_id=run_id,
            started_at=time.time(),
            finished_at=None,
            remote={"address": address, "job_id": job_id},
            # Until the remote driver reports the cluster's size at its end.
            cluster={"address": address, "embedded": False},
        )
        progress.say(f"run {run_id}: submitted Ray job {job_id} to {address} with {len(to_run)} job(s)")
        if not wait:
            return RemoteSubmission(job_id, address, output_dir, len(to_run))
        progress.begin(len(to_run))
        follower = Follower(output_dir, ledger, progress)
        try:
            follow(client, job_id, follower, should_stop=ledger.cancel_requested)
        except (KeyboardInterrupt, CancelRequested) as stop:
            # Ctrl-C or `runjobs cancel`: stop the remote driver, which records its running
            # jobs cancelled; keep what it sends until it has ended.
            counts = ledger.counts()
            progress.say(f"interrupted: stopping Ray job {job_id}")
            try:
                client.stop_job(job_id)
                follow(client, job_id, follower)
            except (OSError, RuntimeError, ClusterUnreachableError) as error:
                progress.say(f"could not stop Ray job {job_id}: {_first_line(error)}; `ray job stop` it")
            finally:
                rebuild_report(output_dir, ledger, wanted)
            if isinstance(stop, KeyboardInterrupt):
                raise
            ledger.set_meta(
                cancel_outcome={"at": time.time(), "running": counts["running"], "pending": counts["pending"]}
            )
            raise RunInterrupted(counts["running"], counts["pending"], requested=True) from None
        except ClusterLostError as error:
            rebuild_report(output_dir, ledger, wanted)
            raise ClusterLostError(
                f"{error}; {follower.kept} finished job(s) are kept in {output_dir}; the Ray job may "
                f"still be running: fetch it later with `runjobs report --address {address} {job_id} "
                f"--output {output_dir}`, or submit again to run what is missing"
            ) from None
        return _finish(client, job_id, follower, output_dir, ledger, wanted)


def fetch_remote(address: str, job_id: str, output_dir: Path) -> tuple[SubmitOutcome, str]:
    """Keep a remote run's results from its Ray job's logs in output_dir; return the outcome and job state."""
    client = jobs_client(address)
    status = _job_status(client, job_id)
    lines = complete_lines(client.get_job_logs(job_id))
    plan = _plan_from(lines)
    if plan is None:
        raise UnknownRemoteJobError(
            f"Ray job {job_id} at {address} is not a runjobs run (its logs have no plan); "
            "`ray job list --address ADDRESS` lists the jobs"
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
        follower = Follower(output_dir, ledger, LineProgress())
        follower.replay(lines)
        wanted = {job["id"] for job in plan["jobs"]}
        if follower.end is not None:
            ledger.set_meta(cluster=follower.end["cluster"], driver_timings=follower.end["driver_timings"])
        report = rebuild_report(output_dir, ledger, wanted)
    return SubmitOutcome(report, output_dir, ran=follower.kept), status


def remote_status(address: str, job_id: str) -> dict[str, Any]:
    """A remote run's state from its Ray job: counts by state, read from the job's logs."""
    client = jobs_client(address)
    status = _job_status(client, job_id)
    counts = {"succeeded": 0, "failed": 0, "cancelled": 0}
    total = None
    reader = MarkedLines()
    for line in complete_lines(client.get_job_logs(job_id)):
        marked = reader.feed(line)
        try:
            if marked and marked[0] == PLAN_MARKER:
                total = len(json.loads(marked[1])["jobs"])
            elif marked and marked[0] == RECORD_MARKER:
                counts[json.loads(marked[1])["status"]] += 1
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


class Follower:
    """Applies the remote driver's marked lines to the local ledger, as they arrive."""

    def __init__(self, output_dir: Path, ledger: Ledger, progress: LineProgress) -> None:
        self.output_dir = output_dir
        self.ledger = ledger
        self.progress = progress
        self.partial = ""
        self.reader = MarkedLines()
        self.kept = 0
        self.end: dict[str, Any] | None = None
        self.quiet = False
        self.count_starts = True
        self.ended: set[str] = set()  # jobs whose record is kept: a replayed line is not kept twice

    def chunk(self, text: str) -> None:
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        for line in lines:
            self.line(line)

    def flush(self) -> None:
        if self.partial:
            self.line(self.partial)
            self.partial = ""

    def replay(self, lines: list[str], count_starts: bool = True) -> None:
        """Feed a whole log quietly, from its beginning.

        `count_starts=False` for a log whose start lines were already applied: each one
        counts an attempt in the ledger.
        """
        self.reader = MarkedLines()
        saved = self.quiet, self.count_starts
        self.quiet, self.count_starts = True, count_starts
        try:
            for line in lines:
                self.line(line)
        finally:
            self.quiet, self.count_starts = saved

    def line(self, line: str) -> None:
        marked = self.reader.feed(line.rstrip("\r"))
        if marked is None:
            return
        marker, payload = marked
        try:
            if marker == RECORD_MARKER:
                self._keep(decode_record(payload))
            elif marker == STARTED_MARKER:
                self._started(payload.strip())
            elif marker == END_MARKER:
                self.end = json.loads(payload)
            elif marker == "" and payload.strip() and not RAY_LOG_LINE.match(payload) and not self.quiet:
                self.progress.say(f"cluster: {payload}")
        except (ValueError, KeyError, binascii.Error) as error:
            # A line cut or mixed with another writer's: say so and go on; the job's
            # record can still be fetched from the whole log later.
            self.progress.say(f"skipped an unreadable {marker.strip()} line ({len(payload)} chars): {error}")

    def _keep(self, record: dict[str, Any]) -> None:
        if record["id"] in self.ended:
            return
        keep_record(self.output_dir, self.ledger, record)
        self.ended.add(record["id"])  # only once kept: an interrupt before this keeps it again
        self.kept += 1
        if not self.quiet:
            self.progress.ended(record)

    def _started(self, job_id: str) -> None:
        if job_id in self.ended or not self.count_starts:
            return
        self.ledger.mark(job_id, "running")
        if not self.quiet:
            self.progress.started(job_id)


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


def _plan_from(lines: list[str]) -> dict[str, Any] | None:
    reader = MarkedLines()
    for line in lines:
        marked = reader.feed(line)
        if marked and marked[0] == PLAN_MARKER:
            return json.loads(marked[1])
    return None


def _collect_earlier_remote_run(client, address: str, output_dir: Path, ledger: Ledger) -> None:
    """Before submitting into a directory, keep what its earlier remote run finished.

    Refuses while that run is still going (after --no-wait, or a connection lost
    mid-run): submitting again would run its jobs twice.
    """
    earlier = ledger.meta().get("remote")
    if not earlier or earlier.get("address") != address:
        return
    job_id = earlier["job_id"]
    try:
        status = _job_status(client, job_id)
    except UnknownRemoteJobError:
        return  # the cluster no longer knows it (a new head): nothing to wait for
    if status not in TERMINAL_STATES:
        raise RemoteRunBusyError(
            f"Ray job {job_id} is still running this directory's run ({status}); wait for it with "
            f"`runjobs report --address {address} {job_id} --output {output_dir}`, or stop it with "
            f"`ray job stop --address {address} {job_id}`"
        )
    Follower(output_dir, ledger, LineProgress()).replay(complete_lines(client.get_job_logs(job_id)))


def _finish(
    client, job_id: str, follower: Follower, output_dir: Path, ledger: Ledger, wanted
) -> SubmitOutcome:
    if follower.end is not None:
        ledger.set_meta(
            finished_at=time.time(),
            cluster=follower.end["cluster"],
            driver_timings=follower.end["driver_timings"],
        )
    report = rebuild_report(output_dir, ledger, wanted)
    if follower.end is None:
        info = client.get_job_info(job_id)
        raise RemoteRunError(
            f"Ray job {job_id} ended {info.status} before its driver finished: "
            f"{_first_line(info.message or '')}; "
            f"{follower.kept} finished job(s) are kept in {output_dir}; see `ray job logs {job_id} --address "
            f"{client.get_address()}`"
        )
    return SubmitOutcome(report, output_dir, ran=follower.kept)


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
def staged(planned, run_id: str, max_concurrent: int | None) -> Iterator[Path]:
    """A directory with runjobs' code, the planned jobs and their CSV files: the job's working_dir."""
    import jobs
    import workers

    with tempfile.TemporaryDirectory(prefix="runjobs-stage-") as scratch:
        directory = Path(scratch)
        for package in (jobs, workers):
            source = Path(package.__file__).parent
            shutil.copytree(source, directory / source.name, ignore=shutil.ignore_patterns("__pycache__"))
        copied: dict[str, str] = {}
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
            plan_jobs_list.append(entry)
        plan = {"run_id": run_id, "max_concurrent": max_concurrent, "jobs": plan_jobs_list}
        (directory / PLAN_FILE).write_text(json.dumps(plan))
        yield directory


def encode_record(record: dict[str, Any]) -> str:
    """One line of JSON; model files (bytes) as base64."""
    files = record.get("model_files")
    if files:
        record = {
            **record,
            "model_files": {name: base64.b64encode(data).decode() for name, data in files.items()},
        }
    return json.dumps(record)


def decode_record(text: str) -> dict[str, Any]:
    record = json.loads(text)
    if record.get("model_files"):
        record["model_files"] = {name: base64.b64decode(data) for name, data in record["model_files"].items()}
    return record


def _first_line(error: BaseException | str) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
