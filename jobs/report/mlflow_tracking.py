"""Tracking in MLflow: a runjobs run as one parent MLflow run, each of its jobs a child run under it.

`runjobs submit --mlflow URI` logs each job the moment the ledger has kept it
(`MlflowTracker`, the pipeline's Tracker); `runjobs export DIR --mlflow URI` logs a run
directory's records from its ledger (`export_run`). Both write the same layout:

    experiment  runjobs, or $MLFLOW_EXPERIMENT_NAME
      parent    named after the run id, tag runjobs.run_id: the report files, jobs/<status> counts
        child   named after the job id, tags runjobs.job_id and mlflow.parentRunId: the job's
                config as params; the scalars of its TensorBoard file (loss/train per epoch,
                result/final_loss, time/train_s, ...); its record.json, logs/ and model/

Logging again adds nothing twice. A child is tagged, last of all, with a digest of the
record it was made from: a job logged with the same record is skipped; a changed record
(a re-run turned failed into succeeded) gets a new child, and the old one is deleted; a
child left half made (the server went away mid-way) has no digest and is replaced too.

MLflow only ever hears of results the ledger already keeps, so tracking never costs a
run its results: a server that cannot be reached is one line naming `runjobs export`,
and the run goes on without it. By default MLflow's HTTP client retries each request 7
times with exponential backoff and waits up to 120 s for each answer, minutes per
request against a dead server; so runjobs makes its first contact with one retry and a
5 s timeout, and its later calls with two quick retries, unless those variables are set.

mlflow is an optional extra (`pip install 'runjobs[mlflow]'`), imported only when used.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jobs.record.ledger import Ledger, running_driver
from jobs.record.models import MODELS_DIRECTORY
from jobs.record.output import log_paths
from jobs.record.records import STATES, JobOutcome, finite_only
from jobs.report.tensorboard import job_scalars

INSTALL_HINT = "pip install 'runjobs[mlflow]'"
NOT_INSTALLED = f"--mlflow needs MLflow, which is not installed here: {INSTALL_HINT}"
URI_VARIABLE = "MLFLOW_TRACKING_URI"
EXPERIMENT_VARIABLE = "MLFLOW_EXPERIMENT_NAME"  # MLflow's own variable for the experiment's name
DEFAULT_EXPERIMENT = "runjobs"

TAG_RUN_ID = "runjobs.run_id"
TAG_JOB_ID = "runjobs.job_id"
TAG_DIGEST = "runjobs.digest"
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own: its UI nests a child under this run

# The MLflow status of a job's child run, by the job's status; any other status is FINISHED.
RUN_STATUSES = {"succeeded": "FINISHED", "stopped": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}
UNFINISHED = ("pending", "running")
REPORT_FILES = ("report.json", "report.html", "report.csv", "report.md")
# What keep_record (jobs/record/store.py) adds to a record's `model` once the files are
# written: the record a tracker hears of lacks it, the ledger's has it, and both must
# have one digest.
KEPT_MODEL_KEYS = ("path", "formats", "not_written", "error")
# MLflow's limits on a param's and a tag's value (mlflow.utils.validation).
PARAM_LENGTH = 6000
TAG_LENGTH = 5000

# MLflow reads these at every request, so they can be set just around runjobs' calls.
FIRST_CONTACT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
LATER_CALLS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
# set_terminated prints "View run ... at: URL" on stdout, which `submit --json` keeps for its summary.
QUIET = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


class MlflowTrackingError(ValueError):
    """--mlflow cannot be used as given: no URI, one MLflow cannot read, MLflow not installed, a refusal."""


class MlflowUnreachableError(RuntimeError):
    """The tracking server did not answer, or stopped answering."""


def tracking_uri(given: str) -> str:
    """The URI `--mlflow [URI]` names (bare: $MLFLOW_TRACKING_URI), its form checked; nothing is contacted."""
    uri = given or os.environ.get(URI_VARIABLE, "")
    source = f"--mlflow {uri!r}" if given else f"{URI_VARIABLE}={uri!r}"
    if not uri:
        raise MlflowTrackingError(
            f"--mlflow without a URI uses {URI_VARIABLE}, which is not set; give one: --mlflow http://HOST:5000"
        )
    if "://" not in uri and uri != "databricks":
        if given and (Path(uri).suffix in (".yaml", ".yml") or Path(uri).is_file()):
            raise MlflowTrackingError(
                f"--mlflow took {uri!r} as its tracking URI; give one (--mlflow http://HOST:5000), "
                "or put a bare --mlflow after the spec file"
            )
        raise MlflowTrackingError(
            f"{source} is not a tracking URI; give its scheme, e.g. http://HOST:5000 or sqlite:///mlflow.db"
        )
    if not _mlflow_installed():
        raise MlflowTrackingError(NOT_INSTALLED)
    return uri


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_VARIABLE) or DEFAULT_EXPERIMENT


def shown(uri: str) -> str:
    """The URI as printed: a password in it is replaced by ***, since the line may end up in a log."""
    parts = urlsplit(uri)
    if not parts.password:
        return uri
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """Where a browser shows a run: MLflow's UI path on an http(s) tracking server, else None."""
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{shown(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


class MlflowTracker:
    """The pipeline's Tracker for `submit --mlflow`: each job as the ledger keeps it, then the report.

    It never fails the run. The first failure (a server that cannot be reached, or stops
    answering) is one line through `say` naming `runjobs export`, and the tracker makes no
    further call for the rest of the run, so a dead server costs seconds once, not a wait
    per job.
    """

    def __init__(self, uri: str, say: Callable[[str], None] | None = None) -> None:
        self.uri = uri
        self.say = say or _to_stderr
        self.client = _client(uri)  # a URI MLflow has no store for is bad input, refused before the run
        self.run: TrackedRun | None = None
        self.given_up = False

    def job_kept(self, outcome: JobOutcome, output_dir: Path) -> None:
        # Only a model saved with this record: a failed re-run leaves an earlier success's model in place.
        model_dir = output_dir / MODELS_DIRECTORY / outcome.id if outcome.model_files else None
        self._log(output_dir, None, lambda run: run.log_job(outcome.record, output_dir, model_dir))

    def run_finished(self, output_dir: Path, report: dict[str, Any]) -> None:
        statuses = [job["status"] for job in report["jobs"]]
        self._log(output_dir, report["run_id"], lambda run: run.finish(statuses, False, output_dir))

    def _log(self, output_dir: Path, run_id: str | None, action: Callable[[TrackedRun], Any]) -> None:
        if self.given_up:
            return
        try:
            if self.run is None:
                run_id = run_id or _ledger_run_id(output_dir)
                experiment_id = first_contact(self.client)
                with http_settings(LATER_CALLS):
                    self.run = TrackedRun.open(self.client, experiment_id, run_id, output_dir, live=True)
            with http_settings(LATER_CALLS):
                action(self.run)
        except Exception as error:  # whatever went wrong, the run's results are in its ledger already
            self.given_up = True
            self.say(
                f"{describe_failure(error, self.uri)}: results are in {output_dir}; "
                f"log them later with: runjobs export {output_dir} --mlflow {shown(self.uri)}"
            )


@dataclass
class ExportOutcome:
    """What `runjobs export` did: the run it logged, where, and what became of each ended job."""

    run_id: str
    experiment: str
    parent_id: str
    jobs: Counter  # logged, replaced, unchanged
    without_result: int  # jobs not ended (yet): nothing to log
    url: str | None


def export_run(directory: Path, uri: str) -> ExportOutcome:
    """Log a run directory's ended jobs and report files to MLflow at `uri`, as `submit --mlflow` does.

    Reads the ledger only (a run may still be going: its parent stays RUNNING). Raises
    LedgerError for a directory that holds no run, MlflowUnreachableError when the server
    does not answer, MlflowTrackingError when it refuses.
    """
    with Ledger.open(directory, for_writing=False) as ledger:
        meta, jobs = ledger.meta(), ledger.jobs()
    run_id = meta.get("run_id") or directory.name
    ended = [job for job in jobs if job.record is not None and job.status not in UNFINISHED]
    client = _client(uri)
    try:
        experiment_id = first_contact(client)
    except Exception as error:
        failure = _classified(error, uri)
        if isinstance(failure, MlflowUnreachableError):
            raise MlflowUnreachableError(f"{failure}; run this again once it answers") from None
        if isinstance(failure, MlflowTrackingError):
            raise failure from None
        raise
    results: Counter = Counter()
    try:
        with http_settings(LATER_CALLS):
            run = TrackedRun.open(client, experiment_id, run_id, directory, live=False)
            for job in ended:
                results[run.log_job(job.record, directory, _model_directory(job.record, directory))] += 1
            run.finish([job.status for job in jobs], running_driver(directory) is not None, directory)
    except Exception as error:
        failure = _classified(error, uri)
        done = f"{sum(results.values())} of {len(ended)} job(s) were logged before it"
        if isinstance(failure, MlflowUnreachableError):
            raise MlflowUnreachableError(f"{failure}; {done}; run this again for the rest") from None
        if isinstance(failure, MlflowTrackingError):
            raise MlflowTrackingError(f"{failure}; {done}") from None
        raise
    return ExportOutcome(
        run_id,
        experiment_name(),
        run.parent_id,
        results,
        len(jobs) - len(ended),
        run_url(uri, experiment_id, run.parent_id),
    )


class TrackedRun:
    """One runjobs run in MLflow: its parent run and, by job id, the child runs under it."""

    def __init__(self, client, experiment_id: str, parent_id: str, parent_digest: str | None, children):
        self.client = client
        self.experiment_id = experiment_id
        self.parent_id = parent_id
        self.parent_digest = parent_digest
        self.children: dict[str, list[tuple[str, str | None]]] = children  # job id -> [(run id, digest)]

    @classmethod
    def open(cls, client, experiment_id: str, run_id: str, output_dir: Path, live: bool) -> TrackedRun:
        """Find the run's parent by its tag (or make it) and its children; `live`: a driver runs it now."""
        parents = _search(client, experiment_id, f"tags.`{TAG_RUN_ID}` = {_quoted(run_id)}")
        if parents:
            # Two exports racing may each have made one: the first made is the parent.
            parent = min(parents, key=lambda found: (found.info.start_time, found.info.run_id))
            parent_digest = parent.data.tags.get(TAG_DIGEST)
            if live and parent.info.status != "RUNNING":
                client.update_run(parent.info.run_id, status="RUNNING")
                parent_digest = None  # its digest names the old status: finish writes again
        else:
            tags = {TAG_RUN_ID: run_id, "runjobs.output": str(Path(output_dir).resolve())}
            parent = client.create_run(experiment_id, run_name=run_id, tags=tags)
            parent_digest = None
        children: dict[str, list[tuple[str, str | None]]] = {}
        for child in _search(client, experiment_id, f"tags.`{TAG_PARENT}` = {_quoted(parent.info.run_id)}"):
            job_id = child.data.tags.get(TAG_JOB_ID)
            if job_id:
                children.setdefault(job_id, []).append((child.info.run_id, child.data.tags.get(TAG_DIGEST)))
        return cls(client, experiment_id, parent.info.run_id, parent_digest, children)

    def log_job(self, record: dict[str, Any], output_dir: Path, model_dir: Path | None) -> str:
        """Log an ended job as a child run: 'unchanged' when this record is logged already, else
        'logged', or 'replaced' when an earlier child of the job was deleted for it."""
        job_id = record["id"]
        digest = record_digest(record)
        earlier = self.children.get(job_id, [])
        logged = next((run_id for run_id, logged_digest in earlier if logged_digest == digest), None)
        # A new child is whole before an old one goes: the job is never without one.
        kept = logged or self._new_child(record, digest, output_dir, model_dir)
        for run_id, _ in earlier:
            if run_id != kept:
                self.client.delete_run(run_id)  # an older record's child, or a duplicate
        self.children[job_id] = [(kept, digest)]
        if logged:
            return "unchanged"
        return "replaced" if earlier else "logged"

    def finish(self, statuses: list[str], running: bool, output_dir: Path) -> None:
        """The parent's report files, job counts and status; nothing when none of them changed."""
        # Every status, 0 included: a count logged by an earlier export (pending, say) must not stay.
        counts = Counter({**dict.fromkeys((*STATES, *RUN_STATUSES), 0), **Counter(statuses)})
        status = "RUNNING" if running else parent_status(counts)
        files = [output_dir / name for name in REPORT_FILES if (output_dir / name).is_file()]
        digest = _digest(
            {"status": status, "counts": counts, "files": {path.name: _file_digest(path) for path in files}}
        )
        if digest == self.parent_digest:
            return
        now = _now_ms()
        counted = [("total", len(statuses)), *sorted(counts.items())]
        metrics = [_metric(f"jobs/{name}", count, now) for name, count in counted]
        self.client.log_batch(self.parent_id, metrics=metrics)
        for path in files:
            self.client.log_artifact(self.parent_id, str(path))
        if running:
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            self.client.set_terminated(self.parent_id, status)
        self.client.set_tag(self.parent_id, TAG_DIGEST, digest)
        self.parent_digest = digest

    def _new_child(self, record: dict[str, Any], digest: str, output_dir: Path, model_dir: Path | None):
        job_id = record["id"]
        tags = {
            TAG_PARENT: self.parent_id,
            TAG_JOB_ID: job_id,
            "runjobs.framework": str(record.get("framework")),
            "runjobs.variant": str(record.get("variant")),
            "runjobs.status": str(record["status"]),
        }
        if record.get("convergence") is not None:
            tags["runjobs.convergence"] = str(record["convergence"])
        if record.get("error"):
            tags["runjobs.error"] = str(record["error"])[:TAG_LENGTH]
        run_id = self.client.create_run(self.experiment_id, run_name=job_id, tags=tags).info.run_id
        self.client.log_batch(run_id, metrics=job_metrics(record, _now_ms()), params=job_params(record))
        # The whole record, for what params and metrics cannot hold (predictions, placement, versions).
        self.client.log_text(run_id, json.dumps(finite_only(record), indent=2, sort_keys=True), "record.json")
        for path in log_paths(output_dir, job_id):
            self.client.log_artifact(run_id, str(path), "logs")
        if model_dir is not None and model_dir.is_dir():
            self.client.log_artifacts(run_id, str(model_dir), "model")
        self.client.set_terminated(run_id, RUN_STATUSES.get(record["status"], "FINISHED"))
        self.client.set_tag(run_id, TAG_DIGEST, digest)  # last: only a whole child carries it
        return run_id


def job_params(record: dict[str, Any]):
    """The job's config fields as MLflow params: text as it is, anything else as JSON (`[64, 64]`, `true`)."""
    from mlflow.entities import Param

    return [
        Param(_key(name), (value if isinstance(value, str) else json.dumps(value))[:PARAM_LENGTH])
        for name, value in sorted((record.get("config") or {}).items())
    ]


def job_metrics(record: dict[str, Any], timestamp_ms: int):
    """The job's scalars under its TensorBoard tags: per epoch with the epoch as step, the rest at step 0.

    Those are loss/train (loss/train_standardised for --normalize), parameters/* and
    time/epoch_s per epoch; result/final_loss, result/r2_gap or result/floor_gap, and
    every time/*_s of the record's timings once.
    """
    per_epoch, final = job_scalars(record)
    timings = record.get("timings") or {}
    final.update({f"time/{name}": value for name, value in timings.items() if name.endswith("_s")})
    # A thinned history (workers/entry.py, MAX_HISTORY_EPOCHS) has values at these epochs only.
    epochs = record.get("history_epochs")
    metrics = [
        _metric(tag, value, timestamp_ms, epochs[index] - 1 if epochs else index)
        for tag, series in per_epoch.items()
        for index, value in enumerate(series)
        if _finite(value)
    ]
    metrics += [_metric(tag, value, timestamp_ms) for tag, value in final.items() if _finite(value)]
    return metrics


def record_digest(record: dict[str, Any]) -> str:
    """A digest of the record as the ledger keeps it (non-finite numbers as null), less where the
    model's files were kept, so a record heard of at submit and read back at export agree."""
    kept = finite_only(record)
    model = kept.get("model")
    if isinstance(model, dict):
        kept = {**kept, "model": {key: value for key, value in model.items() if key not in KEPT_MODEL_KEYS}}
    return _digest(kept)


def parent_status(counts: Counter) -> str:
    """The parent's MLflow status: FAILED if a job failed, KILLED if one was cancelled or never ended."""
    if counts["failed"]:
        return "FAILED"
    if counts["cancelled"] or any(counts[status] for status in UNFINISHED):
        return "KILLED"
    return "FINISHED"


def first_contact(client) -> str:
    """The experiment's id, made if new: the first call to the server, so made with a short timeout."""
    from mlflow.exceptions import MlflowException

    name = experiment_name()
    with http_settings(FIRST_CONTACT):
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return client.create_experiment(name)
            except MlflowException:
                experiment = client.get_experiment_by_name(name)  # another driver made it just now
                if experiment is None:
                    raise
    if experiment.lifecycle_stage == "deleted":
        raise MlflowTrackingError(
            f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}) or set {EXPERIMENT_VARIABLE} to another name"
        )
    return experiment.experiment_id


@contextmanager
def http_settings(settings: dict[str, str]) -> Iterator[None]:
    """MLflow's HTTP settings for the calls inside, except those the user has set; restored after.

    Not nested: an inner block would keep the outer block's values.
    """
    added = {name: value for name, value in {**settings, **QUIET}.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def describe_failure(error: BaseException, uri: str) -> str:
    """One line: why MLflow at `uri` could not be used."""
    failure = _classified(error, uri)
    if isinstance(failure, (MlflowUnreachableError, MlflowTrackingError)):
        return str(failure)
    return f"logging to MLflow at {shown(uri)} failed ({type(error).__name__}: {_flattened(error)})"


def _classified(error: BaseException, uri: str) -> BaseException:
    """The error as runjobs tells it: unreachable (no answer), refused (an answer saying no), or as it was."""
    if isinstance(error, (MlflowUnreachableError, MlflowTrackingError)):
        return error
    cause = _unreachable_cause(error)
    if cause is not None:
        return MlflowUnreachableError(f"MLflow at {shown(uri)} is unreachable ({cause})")
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return MlflowTrackingError(
            f"MLflow at {shown(uri)} refused a request ({_flattened(error)}); check that the URI is an "
            "MLflow tracking server and that its credentials let you write (MLFLOW_TRACKING_USERNAME, ...)"
        )
    return error


def _unreachable_cause(error: BaseException) -> str | None:
    """Why nothing answered, in a few words; None when something did answer (a refusal is not this).

    MLflow wraps the requests error it got in an MlflowException, raised inside its
    `except`, so the requests and socket errors are on the exception's context chain.
    """
    import requests

    chain, seen = [], error
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(isinstance(link, ConnectionRefusedError) for link in chain):
        return "connection refused"
    if any(isinstance(link, (requests.exceptions.Timeout, TimeoutError)) for link in chain):
        return "no answer in time"
    statuses = re.search(r"too many (\d{3}) error responses", " ".join(str(link) for link in chain))
    if statuses:
        return f"it answers HTTP {statuses.group(1)}"
    if any(isinstance(link, (requests.exceptions.ConnectionError, ConnectionError)) for link in chain):
        reason = re.search(r"\[Errno -?\d+\] ([^'\")]+)", " ".join(str(link) for link in chain))
        return reason.group(1).strip().lower() if reason else "the connection failed"
    return None


def _client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise MlflowTrackingError(NOT_INSTALLED) from None
    try:
        return MlflowClient(tracking_uri=uri)
    except Exception as error:  # MLflow's own error for a URI it has no store for
        raise MlflowTrackingError(
            f"MLflow cannot use the tracking URI {shown(uri)} ({_flattened(error)}); "
            "give an http(s):// server or a database URI"
        ) from None


def _search(client, experiment_id: str, filter_string: str) -> list:
    """Every active run the filter finds, page by page (a sweep may have more than a page of jobs)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _model_directory(record: dict[str, Any], directory: Path) -> Path | None:
    """The saved model's files the record names (DIR/models/JOB), or None."""
    path = (record.get("model") or {}).get("path")
    return directory / path if path else None


def _ledger_run_id(output_dir: Path) -> str:
    with Ledger.open(output_dir, for_writing=False) as ledger:
        return ledger.meta().get("run_id") or output_dir.name


def _metric(key: str, value: float, timestamp_ms: int, step: int = 0):
    from mlflow.entities import Metric

    return Metric(_key(key), float(value), timestamp_ms, step)


def _key(name: str) -> str:
    """A name MLflow takes as a metric or param key: letters, digits and _ - . / space only."""
    return re.sub(r"[^\w\-./ ]", "_", name)


def _quoted(value: str) -> str:
    if "'" in value:
        raise MlflowTrackingError(f"{value!r} holds a quote, which an MLflow search cannot match")
    return f"'{value}'"


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, allow_nan=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _flattened(error: BaseException) -> str:
    """The error's message on one line, at most 160 characters (a server's HTML error page is long)."""
    text = " ".join(str(error).split())
    return text[:160] + ("..." if len(text) > 160 else "")


def _mlflow_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("mlflow") is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or without a spec
        return False


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
