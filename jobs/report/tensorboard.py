"""TensorBoard event files for every job, and the command that serves them.

The driver writes DIR/tensorboard/JOB/ from each job's recorded per-epoch history, never
the worker: on a cluster a worker's disk is not the user's output directory, and a
report rebuilt from the ledger (`runjobs report DIR`) rebuilds these files too, without
Ray or a framework. Tags name what was measured, not the framework that measured it, so
TensorFlow and torch runs of the same model overlay in one chart.

The files are written with TensorBoard's own record framing and protocol buffers. Its
high-level writers would import a framework into the driver: tensorboardX imports torch
when its package loads, and TensorBoard's EventFileWriter resolves `tf.io.gfile` to the
real TensorFlow whenever TensorFlow is installed (seconds of import). Its RecordWriter
over a plain file, and the generated message classes, import neither.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from jobs.record.output import replace_directory

TENSORBOARD_DIRECTORY = "tensorboard"
EVENT_FILE_PREFIX = "events.out.tfevents"
DEFAULT_PORT = 6006  # TensorBoard's own default
INSTALL_HINT = "pip install tensorboard"  # a dependency of runjobs; missing only from a broken install

# The loss is plotted under a tag that names its units: a standardised run's loss is on
# another scale, and overlaying it with losses in the data's units would mislead.
LOSS_TAGS = {"original": "loss/train", "standardised": "loss/train_standardised"}
DESCRIPTIONS = {
    "loss/train": "Mean squared error of each epoch (the mean over its steps), in the data's units.",
    "loss/train_standardised": "Mean squared error of each epoch (the mean over its steps), "
    "in standardised units (the job trained with normalize).",
    "time/epoch_s": "Seconds each epoch took inside the worker.",
}
# Written once, at the last epoch's step: the job's time split and how good its fit is.
FINAL_TIMINGS = ("startup_s", "setup_s", "train_s", "predict_s")
HPARAM_TYPES = (bool, int, float, str)


class TensorBoardError(ValueError):
    """A directory with nothing for TensorBoard to show."""


def logdir(output_dir: Path) -> Path:
    return Path(output_dir) / TENSORBOARD_DIRECTORY


def write_event_files(report_or_records: Mapping[str, Any] | Iterable[Mapping[str, Any]], output_dir: Path):
    """Write DIR/tensorboard/JOB/ for each job with a per-epoch history; returns those directories.

    Takes a report (its "jobs") or job records. A job's directory is rebuilt whole, in a
    temporary directory swapped in at the end, so writing again replaces the old event
    file instead of adding a second copy; a job of the report without a history (failed
    or cancelled) loses any directory an earlier attempt left.
    """
    jobs = report_or_records["jobs"] if isinstance(report_or_records, Mapping) else report_or_records
    root = logdir(output_dir)
    written = []
    for job in jobs:
        target = root / job["id"]
        events = job_events(job, wall_time_start=time.time())
        if events is None:
            _remove(target)
            continue
        root.mkdir(parents=True, exist_ok=True)
        _replace_directory(target, events)
        written.append(target)
    return written


def job_scalars(job: Mapping[str, Any]) -> tuple[dict[str, list[float | None]], dict[str, float | None]]:
    """A job's scalars: {tag: one value per epoch} and {tag: value} for the last step."""
    history = job.get("history") or {}
    loss = job.get("loss") or {}
    per_epoch: dict[str, list[float | None]] = {}
    if loss.get("history"):
        per_epoch[LOSS_TAGS.get(loss.get("history_units"), "loss/train")] = list(loss["history"])
    weights = history.get("weights") or []
    feature_count = max((len(row) for row in weights if row), default=0)
    for index in range(feature_count):
        tag = "parameters/weight" if feature_count == 1 else f"parameters/weight_{index + 1}"
        per_epoch[tag] = [row[index] if row and index < len(row) else None for row in weights]
    if history.get("bias"):
        per_epoch["parameters/bias"] = list(history["bias"])
    if history.get("epoch_s"):
        per_epoch["time/epoch_s"] = list(history["epoch_s"])

    timings = job.get("timings") or {}
    final = {f"time/{name}": timings.get(name) for name in FINAL_TIMINGS}
    final["result/final_loss"] = loss.get("final")
    final["result/r2_gap"] = loss.get("r2_gap")
    if loss.get("floor_gap") is not None:
        final["result/floor_gap"] = loss["floor_gap"]
    # A model beyond the line: each parameter's norm (its values live in the saved model).
    for layer in (job.get("params") or {}).get("layers") or []:
        final[f"parameters/norm/{layer['name']}"] = layer.get("norm")
    return per_epoch, final


def hyperparameters(job: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """The job's fields that TensorBoard's HParams dashboard can filter on (scalars only)."""
    config = dict(job.get("config") or {})
    config.setdefault("framework", job.get("framework"))
    config.setdefault("variant", job.get("variant"))
    return {key: value for key, value in sorted(config.items()) if isinstance(value, HPARAM_TYPES)}


def job_events(job: Mapping[str, Any], wall_time_start: float):
    """The Event messages of one job's file, or None when the job recorded no history.

    Each epoch is one step; its wall time is the start plus the epoch times so far, so
    TensorBoard's "relative" axis reads as seconds of training.
    """
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.plugins.hparams import summary_v2 as hparams_summary

    if not job.get("history"):
        return None
    per_epoch, final = job_scalars(job)
    steps = max((len(values) for values in per_epoch.values()), default=0)
    if steps == 0:
        return None
    epoch_seconds = per_epoch.get("time/epoch_s", [])
    wall_times, elapsed = [], 0.0
    for step in range(steps):
        seconds = epoch_seconds[step] if step < len(epoch_seconds) else None
        elapsed += seconds if _finite(seconds) else 0.0
        wall_times.append(wall_time_start + elapsed)

    events = [event_pb2.Event(wall_time=wall_time_start, step=0, file_version="brain.Event:2")]
    hparams = hyperparameters(job)
    if hparams:
        summary = hparams_summary.hparams_pb(hparams, trial_id=job["id"], start_time_secs=wall_time_start)
        events.append(event_pb2.Event(wall_time=wall_time_start, step=0, summary=summary))

    described: set[str] = set()

    def scalar_value(tag: str, value: float) -> summary_pb2.Summary.Value:
        entry = summary_pb2.Summary.Value(tag=tag, simple_value=value)
        if tag not in described:  # TensorBoard keeps a tag's first metadata
            entry.metadata.plugin_data.plugin_name = "scalars"
            entry.metadata.summary_description = DESCRIPTIONS.get(tag, "")
            described.add(tag)
        return entry

    for step in range(steps):
        values = [
            scalar_value(tag, float(series[step]))
            for tag, series in per_epoch.items()
            if step < len(series) and _finite(series[step])
        ]
        if values:
            events.append(
                event_pb2.Event(
                    wall_time=wall_times[step], step=step, summary=summary_pb2.Summary(value=values)
                )
            )
    final_values = [scalar_value(tag, float(value)) for tag, value in final.items() if _finite(value)]
    if final_values:
        events.append(
            event_pb2.Event(
                wall_time=wall_times[-1], step=steps - 1, summary=summary_pb2.Summary(value=final_values)
            )
        )
    return events


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _replace_directory(target: Path, events) -> None:
    from tensorboard.summary.writer.record_writer import RecordWriter

    def fill(directory: Path) -> None:
        # The file name carries the write time (as TensorBoard's writers do), so a running
        # TensorBoard sees a rebuilt file as new and reloads the job's steps from it.
        event_file = directory / f"{EVENT_FILE_PREFIX}.{int(time.time())}.{socket.gethostname()}.runjobs"
        with event_file.open("wb") as handle:
            records = RecordWriter(handle)
            for event in events:
                records.write(event.SerializeToString())
            handle.flush()
            os.fsync(handle.fileno())

    replace_directory(target, fill)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def event_files(output_dir: Path) -> list[Path]:
    return sorted(logdir(output_dir).glob(f"*/{EVENT_FILE_PREFIX}*"))


def check_has_event_files(output_dir: Path) -> None:
    """Refuse a directory with no event files, saying what to type instead."""
    from jobs.record.ledger import is_ledger_directory

    if event_files(output_dir):
        return
    if not is_ledger_directory(output_dir):
        raise TensorBoardError(
            f"{output_dir} holds no runjobs run (ledger.sqlite); name a run's output directory"
        )
    raise TensorBoardError(
        f"no TensorBoard files in {logdir(output_dir)}: run `runjobs report {output_dir}` to write them"
    )


def command(output_dir: Path, host: str, port: int) -> list[str]:
    """The command a user would type to serve the run's TensorBoard files."""
    return ["tensorboard", "--logdir", str(logdir(output_dir)), "--host", host, "--port", str(port)]


def is_installed() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def serve(output_dir: Path, host: str, port: int) -> None:
    """Replace this process with TensorBoard on the run's files (Ctrl-C stops it).

    Run as `python -m tensorboard.main` with this interpreter, so the TensorBoard of this
    environment serves, whether or not its script is on PATH.
    """
    arguments = [sys.executable, "-m", "tensorboard.main", *command(output_dir, host, port)[1:]]
    os.execv(sys.executable, arguments)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
