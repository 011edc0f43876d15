"""TensorBoard event files for every job (or every group of seeds), and the command that serves them.

The driver writes DIR/tensorboard/JOB/ from each job's recorded per-epoch history, never
the worker: on a cluster a worker's disk is not the user's output directory, and a
report rebuilt from the ledger (`runjobs report DIR`) rebuilds these files too, without
Ray or a framework. Tags name what was measured, not the framework that measured it, so
TensorFlow and torch runs of the same model overlay in one chart.

Past MAX_JOB_RUNS jobs, one run per job would be a chart of thousands of lines and a
run selector nobody can use, so the runs are DIR/tensorboard/seed_groups/NAME/ instead:
one per group of jobs that differ only in seed (the report's "seeds grouped" table),
holding per epoch the mean over the group's jobs under the job's own tag, and the
smallest and largest under TAG_min and TAG_max.

The files are written with TensorBoard's record framing and protocol buffers. Its
high-level writers would import a framework into the driver: tensorboardX imports torch
when its package loads, and TensorBoard's EventFileWriter resolves `tf.io.gfile` to the
real TensorFlow whenever TensorFlow is installed (seconds of import). The events of a
step are encoded here rather than built as messages, and each record's CRC32C is
computed with numpy: TensorBoard's fallback CRC is pure Python, a loop over every byte,
and with the messages it took most of the 17 s that 1,000 jobs of 500 epochs cost.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import socket
import struct
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jobs.record.output import replace_directory

TENSORBOARD_DIRECTORY = "tensorboard"
EVENT_FILE_PREFIX = "events.out.tfevents"
DEFAULT_PORT = 6006  # TensorBoard's own default
INSTALL_HINT = "pip install tensorboard"  # a dependency of runjobs; missing only from a broken install

# Up to this many jobs with a history, each job is a run of its own. Past it, a run is a
# group of jobs that differ only in seed (under GROUPS_DIRECTORY); past it in groups too,
# the first this many groups in the report's order are, and LEFT_OUT_FILE names the rest.
# A chart of a couple of hundred lines and TensorBoard's run selector stay readable, and
# that many runs of 100 epochs are written in well under a second.
MAX_JOB_RUNS = 200
GROUPS_DIRECTORY = "seed_groups"
LEFT_OUT_FILE = "left_out.txt"
LEFT_OUT_TAG = "runjobs/left_out"

# The loss is plotted under a tag that names its units: a standardised run's loss is on
# another scale, and overlaying it with losses in the data's units would mislead.
LOSS_TAGS = {"original": "loss/train", "standardised": "loss/train_standardised"}
DESCRIPTIONS = {
    "loss/train": "Mean squared error of each epoch (the mean over its steps), in the data's units.",
    "loss/train_standardised": "Mean squared error of each epoch (the mean over its steps), "
    "in standardised units (the job trained with normalize).",
    "time/epoch_s": "Seconds each epoch took inside the worker.",
}
# A group's run holds, under each job tag, the mean over its jobs, and these two beside it.
SPREAD_SUFFIXES = {"_min": "Smallest", "_max": "Largest"}
# Written once, at the last epoch's step: the job's time split and how good its fit is.
FINAL_TIMINGS = ("startup_s", "setup_s", "train_s", "predict_s")
HPARAM_TYPES = (bool, int, float, str)


class TensorBoardError(ValueError):
    """A directory with nothing for TensorBoard to show."""


def logdir(output_dir: Path) -> Path:
    return Path(output_dir) / TENSORBOARD_DIRECTORY


@dataclass(frozen=True)
class RunHistory:
    """What one run plots: per-epoch series at `epochs` (1-based, one value each, None or NaN where
    missing) and the values written once at the last epoch (finite only)."""

    epochs: list[int]
    per_epoch: dict[str, list[float | None]] | dict[str, np.ndarray]
    final: dict[str, float]


@dataclass(frozen=True)
class SeedGroup:
    """Jobs with a history that differ only in seed, and the name of their run."""

    name: str
    config: dict[str, Any]  # the jobs' config, less seed
    status: str
    jobs: list[Mapping[str, Any]]


def write_event_files(report_or_records: Mapping[str, Any] | Iterable[Mapping[str, Any]], output_dir: Path):
    """Write DIR/tensorboard/JOB/ for each job with a per-epoch history; returns the run directories.

    Takes a report (its "jobs") or job records. A job's directory is rebuilt whole, in a
    temporary directory swapped in at the end, so writing again replaces the old event
    file instead of adding a second copy; a job of the report without a history (failed
    or cancelled) loses any directory an earlier attempt left. Past MAX_JOB_RUNS such jobs
    the runs are groups of seeds instead (write_group_runs).
    """
    if isinstance(report_or_records, Mapping):
        jobs = list(report_or_records["jobs"])
        groups = (report_or_records.get("aggregates") or {}).get("groups")
    else:
        jobs, groups = list(report_or_records), None
    root = logdir(output_dir)
    if sum(map(has_history, jobs)) > MAX_JOB_RUNS:
        return write_group_runs(jobs, groups, root)

    _remove(root / GROUPS_DIRECTORY)  # left by an earlier report of more jobs
    written = []
    for job in jobs:
        target = root / job["id"]
        history = job_history(job)
        if history is None:
            _remove(target)
            continue
        root.mkdir(parents=True, exist_ok=True)
        start = time.time()
        header = _header_events(start, hyperparameters(job), trial_id=job["id"])
        _replace_directory(target, header + run_events(history, start))
        written.append(target)
    return written


def job_scalars(job: Mapping[str, Any]) -> tuple[dict[str, list[float | None]], dict[str, float | None]]:
    """A job's scalars: {tag: one value per recorded epoch} and {tag: value} for the last step.

    A thinned history (workers/entry.py, MAX_HISTORY_EPOCHS) has values only at the
    epochs of the record's `history_epochs`.
    """
    return per_epoch_scalars(job), final_scalars(job)


def per_epoch_scalars(job: Mapping[str, Any]) -> dict[str, list[float | None]]:
    history = job.get("history") or {}
    loss = job.get("loss") or {}
    per_epoch: dict[str, list[float | None]] = {}
    if loss.get("history"):
        per_epoch[_loss_tag(loss)] = list(loss["history"])
    weights = history.get("weights") or []
    feature_count = max(map(len, filter(None, weights)), default=0)
    if all(weights) and set(map(len, weights)) == {feature_count}:
        columns = [list(column) for column in zip(*weights)]  # every weight at every epoch: the usual case
    else:
        columns = [
            [row[index] if row and index < len(row) else None for row in weights]
            for index in range(feature_count)
        ]
    per_epoch.update(zip(_weight_tags(feature_count), columns))
    if history.get("bias"):
        per_epoch["parameters/bias"] = list(history["bias"])
    if history.get("epoch_s"):
        per_epoch["time/epoch_s"] = list(history["epoch_s"])
    return per_epoch


def final_scalars(job: Mapping[str, Any]) -> dict[str, float | None]:
    loss = job.get("loss") or {}
    timings = job.get("timings") or {}
    final = {f"time/{name}": timings.get(name) for name in FINAL_TIMINGS}
    final["result/final_loss"] = loss.get("final")
    final["result/r2_gap"] = loss.get("r2_gap")
    if loss.get("floor_gap") is not None:
        final["result/floor_gap"] = loss["floor_gap"]
    # A model beyond the line: each parameter's norm (its values live in the saved model).
    for layer in (job.get("params") or {}).get("layers") or []:
        final[f"parameters/norm/{layer['name']}"] = layer.get("norm")
    return final


def _loss_tag(loss: Mapping[str, Any]) -> str:
    return LOSS_TAGS.get(loss.get("history_units"), "loss/train")


def _weight_tags(feature_count: int) -> list[str]:
    if feature_count == 1:
        return ["parameters/weight"]
    return [f"parameters/weight_{index + 1}" for index in range(feature_count)]


def has_history(job: Mapping[str, Any]) -> bool:
    """Whether the job has a run (job_history is not None), without copying its series.

    A light record (jobs/report/files.py) has no `history` series but its loss history.
    """
    history = job.get("history") or {}
    return bool(
        (job.get("loss") or {}).get("history")
        or history.get("bias")
        or history.get("epoch_s")
        or any(filter(None, history.get("weights") or []))
    )


def job_history(job: Mapping[str, Any]) -> RunHistory | None:
    """A job's scalars at their epochs, or None when the job recorded no history.

    Each series gets one value per epoch of `history_epochs` (every epoch 1..N without
    it), padded with None where the record holds fewer.
    """
    if not has_history(job):
        return None
    per_epoch = per_epoch_scalars(job)
    count = max(map(len, per_epoch.values()), default=0)
    if count == 0:
        return None
    recorded = job.get("history_epochs")
    epochs = list(recorded) if recorded else list(range(1, count + 1))
    length = len(epochs)
    if set(map(len, per_epoch.values())) != {length}:
        per_epoch = {
            tag: values[:length] if len(values) >= length else values + [None] * (length - len(values))
            for tag, values in per_epoch.items()
        }
    return RunHistory(epochs, per_epoch, _finite_only(final_scalars(job)))


def hyperparameters(job: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """The job's fields that TensorBoard's HParams dashboard can filter on (scalars only)."""
    config = dict(job.get("config") or {})
    config.setdefault("framework", job.get("framework"))
    config.setdefault("variant", job.get("variant"))
    return {key: value for key, value in sorted(config.items()) if isinstance(value, HPARAM_TYPES)}


def run_events(history: RunHistory, wall_time_start: float, grouped: bool = False) -> list[bytes]:
    """The serialised Event messages of a run's scalars, after its header events.

    Each epoch is one step, counted from 0 (epoch 1 is step 0); its wall time is the start
    plus the epoch times so far, so TensorBoard's "relative" axis reads as seconds of
    training. Between the epochs of a thinned history, each kept epoch's time stands for
    the epochs since the one before. A value that is not finite is left out.
    """
    epochs = np.asarray(history.epochs, dtype=np.int64)
    if len(epochs) == 0:
        return []
    series = {tag: np.asarray(values, dtype=np.float64) for tag, values in history.per_epoch.items()}
    seconds = series.get("time/epoch_s", np.zeros(len(epochs)))
    gaps = np.diff(epochs, prepend=0)
    elapsed = np.cumsum(np.where(np.isfinite(seconds), seconds, 0.0) * gaps)
    wall_times = (wall_time_start + elapsed).tolist()
    steps = (epochs - 1).tolist()

    # Each tag's encoded Summary.Value at every step, b"" where its value is not finite;
    # TensorBoard keeps a tag's first metadata, so only its first value carries it.
    columns = []
    for tag, values in series.items():
        finite = np.isfinite(values)
        if not finite.any():
            continue
        packed = _float32_bytes(values)
        plain = _value_prefix(tag, 0)
        column = [plain + packed[4 * index : 4 * index + 4] if ok else b"" for index, ok in enumerate(finite)]
        first = int(finite.argmax())
        metadata = _metadata(tag, grouped)
        column[first] = _value_prefix(tag, len(metadata)) + packed[4 * first : 4 * first + 4] + metadata
        columns.append(column)
    events = []
    for step, wall_time, values in zip(steps, wall_times, zip(*columns)):
        summary = b"".join(values)
        if summary:
            events.append(_summary_event(wall_time, step, summary))
    if history.final:
        packed = _float32_bytes(np.fromiter(history.final.values(), dtype=np.float64))
        final = []
        for index, tag in enumerate(history.final):
            metadata = _metadata(tag, grouped)
            final.append(_value_prefix(tag, len(metadata)) + packed[4 * index : 4 * index + 4] + metadata)
        events.append(_summary_event(wall_times[-1], steps[-1], b"".join(final)))
    return events


def write_group_runs(
    jobs: list[Mapping[str, Any]], report_groups: list[dict[str, Any]] | None, root: Path
) -> list[Path]:
    """DIR/tensorboard/seed_groups/NAME/ for each group of seeds (seed_groups), the first MAX_JOB_RUNS.

    A group's run holds per epoch the mean, smallest and largest value of its jobs at each
    tag (over the jobs with a finite value there), and its final values the same way. The
    whole directory is rebuilt at once; the jobs' own directories, left by an earlier
    report of fewer jobs, are removed. Groups past the limit are named in LEFT_OUT_FILE,
    and a text summary in the first run (TensorBoard's Text tab) says so.
    """
    groups = seed_groups(jobs, report_groups)
    kept, left_out = groups[:MAX_JOB_RUNS], groups[MAX_JOB_RUNS:]
    note = None
    if left_out:
        note = (
            f"{len(left_out)} of {len(groups)} groups of seeds "
            f"({sum(len(group.jobs) for group in left_out)} jobs) have no TensorBoard run: "
            f"it gets the first {MAX_JOB_RUNS} (MAX_JOB_RUNS in jobs/report/tensorboard.py). "
            f"{TENSORBOARD_DIRECTORY}/{GROUPS_DIRECTORY}/{LEFT_OUT_FILE} names them; "
            "report.json holds every job."
        )

    if root.is_dir():
        job_ids = {job["id"] for job in jobs}
        for entry in root.iterdir():
            if entry.name in job_ids:
                _remove(entry)
    root.mkdir(parents=True, exist_ok=True)
    runs = []
    start = time.time()
    for group in kept:
        hparams = {
            **hyperparameters({"config": group.config}),
            "jobs": len(group.jobs),
            "status": group.status,
        }
        header = _header_events(start, hparams, trial_id=group.name)
        if note and not runs:
            header.append(_text_event(start, LEFT_OUT_TAG, note))
        runs.append((group.name, header + run_events(group_history(group.jobs), start, grouped=True)))

    def fill(directory: Path) -> None:
        for name, events in runs:
            (directory / name).mkdir()
            _write_event_file(directory / name, events)
        if note:
            lines = [f"{group.name}: {len(group.jobs)} job(s)" for group in left_out]
            (directory / LEFT_OUT_FILE).write_text("\n".join([note, "", *lines]) + "\n")

    replace_directory(root / GROUPS_DIRECTORY, fill)
    return [root / GROUPS_DIRECTORY / name for name, _ in runs]


def seed_groups(jobs: list[Mapping[str, Any]], report_groups: list[dict[str, Any]] | None) -> list[SeedGroup]:
    """The jobs with a history in groups of seeds, in the order of each group's first job.

    The groups of succeeded jobs are the report's "seeds grouped" (jobs/report/combined.py,
    `aggregate`), computed here when not given. It leaves out the other jobs: settings run
    with one seed are groups of one, and jobs a stopping rule ended are grouped by settings
    among themselves (their run is named `...,stopped`), by the key `aggregate` groups by.
    """
    from jobs.report.combined import aggregate, trained_config

    if report_groups is None:
        report_groups = aggregate(jobs)["groups"]
    group_of = {job_id: index for index, group in enumerate(report_groups) for job_id in group["jobs"]}
    members: dict[Any, list[Mapping[str, Any]]] = {}
    configs: dict[Any, tuple[dict[str, Any], str]] = {}
    for job in jobs:
        if not has_history(job):
            continue
        key = group_of.get(job["id"])
        if key is None:
            config = {name: value for name, value in trained_config(job).items() if name != "seed"}
            key = (job.get("status"), json.dumps(config, sort_keys=True, default=str))
            configs.setdefault(key, (config, str(job.get("status"))))
        else:
            configs.setdefault(key, (report_groups[key]["config"], "succeeded"))
        members.setdefault(key, []).append(job)
    names = group_names(
        [config for config, _ in configs.values()],
        ["" if status == "succeeded" else f",{status}" for _, status in configs.values()],
    )
    return [
        SeedGroup(name, config, status, grouped)
        for name, (config, status), grouped in zip(names, configs.values(), members.values())
    ]


def group_history(jobs: list[Mapping[str, Any]]) -> RunHistory:
    """The mean, smallest and largest of several jobs' scalars, epoch by epoch and at the end."""
    epochs, matrices = _stacked_series(jobs) or _aligned_series([job_history(job) for job in jobs])
    per_epoch: dict[str, np.ndarray] = {}
    for tag, matrix in matrices.items():
        finite = np.isfinite(matrix)
        counts = finite.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_epoch[tag] = np.where(finite, matrix, 0.0).sum(axis=0) / counts  # NaN where none is finite
        per_epoch[f"{tag}_min"] = np.where(counts > 0, np.where(finite, matrix, np.inf).min(axis=0), np.nan)
        per_epoch[f"{tag}_max"] = np.where(counts > 0, np.where(finite, matrix, -np.inf).max(axis=0), np.nan)
    finals = [_finite_only(final_scalars(job)) for job in jobs]
    final: dict[str, float] = {}
    for tag in dict.fromkeys(tag for values in finals for tag in values):
        values = [job_values[tag] for job_values in finals if tag in job_values]
        final.update(
            {tag: math.fsum(values) / len(values), f"{tag}_min": min(values), f"{tag}_max": max(values)}
        )
    return RunHistory(epochs, per_epoch, final)


def _stacked_series(jobs: list[Mapping[str, Any]]) -> tuple[list[int], dict[str, np.ndarray]] | None:
    """Each tag's values as a matrix, a row per job, read straight from the records; None unless
    every job recorded the same epochs and the same series, each a value at every epoch.

    The usual group, read without per_epoch_scalars: its copies of every job's lists cost
    more than all the rest of the group's run (half a second of 10,000 jobs' second).
    """
    recorded = jobs[0].get("history_epochs")
    if any(job.get("history_epochs") != recorded for job in jobs):
        return None
    losses = [job.get("loss") or {} for job in jobs]
    histories = [job.get("history") or {} for job in jobs]
    sources = {
        "loss": [loss.get("history") for loss in losses],
        "weights": [history.get("weights") for history in histories],
        "parameters/bias": [history.get("bias") for history in histories],
        "time/epoch_s": [history.get("epoch_s") for history in histories],
    }
    matrices = {}
    for source, series in sources.items():
        if not any(series):
            continue
        if not all(series):
            return None
        try:
            matrix = np.array(series, dtype=np.float64)
        except (TypeError, ValueError):  # rows of different lengths, or weights missing at an epoch
            return None
        if matrix.ndim != (3 if source == "weights" else 2):
            return None
        if source == "loss":
            if len({_loss_tag(loss) for loss in losses}) > 1:
                return None
            matrices[_loss_tag(losses[0])] = matrix
        elif source == "weights":
            matrices.update(
                (tag, matrix[:, :, index]) for index, tag in enumerate(_weight_tags(matrix.shape[2]))
            )
        else:
            matrices[source] = matrix
    if not matrices:
        return None
    lengths = {matrix.shape[1] for matrix in matrices.values()}
    if len(lengths) > 1 or (recorded and lengths != {len(recorded)}):
        return None
    return list(recorded) if recorded else list(range(1, lengths.pop() + 1)), matrices


def _aligned_series(histories: list[RunHistory]) -> tuple[list[int], dict[str, np.ndarray]]:
    """Each tag's values as a matrix, a row per job and NaN where a job has none.

    Where the jobs' epochs differ (a job stopped early), the group has every epoch any of
    them recorded.
    """
    epochs = histories[0].epochs
    columns = None
    if any(history.epochs != epochs for history in histories):
        epochs = sorted({epoch for history in histories for epoch in history.epochs})
        position = {epoch: index for index, epoch in enumerate(epochs)}
        columns = [[position[epoch] for epoch in history.epochs] for history in histories]
    matrices = {}
    for tag in dict.fromkeys(tag for history in histories for tag in history.per_epoch):
        matrix = np.full((len(histories), len(epochs)), np.nan)
        for row, history in enumerate(histories):
            if tag in history.per_epoch:
                where = slice(None) if columns is None else columns[row]
                matrix[row, where] = np.asarray(history.per_epoch[tag], dtype=np.float64)
        matrices[tag] = matrix
    return epochs, matrices


def group_names(configs: list[Mapping[str, Any]], suffixes: list[str] | None = None) -> list[str]:
    """A directory name for each group: its framework (and variant), then each setting whose value
    differs between the groups, as `torch,lr=0.01`, then its suffix; unique, and safe in a path
    on any system."""
    keys = dict.fromkeys(key for config in configs for key in config if key not in ("framework", "variant"))
    varying = [key for key in keys if any(config.get(key) != configs[0].get(key) for config in configs)]
    names, taken = [], set()
    for config, suffix in zip(configs, suffixes or [""] * len(configs)):
        variant = config.get("variant")
        label = f"{config.get('framework')}" + ("" if variant in (None, "single") else f"-{variant}")
        label += "".join(f",{key}={_setting_text(config.get(key))}" for key in varying) + suffix
        name = re.sub(r"[^A-Za-z0-9._+=,-]+", "_", label).strip("._") or "group"
        if len(name) > 150:  # a path component has at most 255 bytes
            name = name[:150]
        unique, copy = name, 2
        while unique in taken:
            unique, copy = f"{name}~{copy}", copy + 1
        taken.add(unique)
        names.append(unique)
    return names


def _setting_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join(_setting_text(item) for item in value)  # hidden [64, 64] reads 64x64
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return str(value)


def _text_event(wall_time: float, tag: str, text: str) -> bytes:
    from tensorboard.compat.proto import event_pb2
    from tensorboard.plugins.text.summary_v2 import text_pb

    return event_pb2.Event(wall_time=wall_time, step=0, summary=text_pb(tag, text)).SerializeToString()


def _header_events(wall_time_start: float, hparams: dict[str, Any], trial_id: str) -> list[bytes]:
    from tensorboard.compat.proto import event_pb2
    from tensorboard.plugins.hparams import summary_v2 as hparams_summary

    events = [event_pb2.Event(wall_time=wall_time_start, step=0, file_version="brain.Event:2")]
    if hparams:
        summary = hparams_summary.hparams_pb(hparams, trial_id=trial_id, start_time_secs=wall_time_start)
        events.append(event_pb2.Event(wall_time=wall_time_start, step=0, summary=summary))
    return [event.SerializeToString() for event in events]


# The protocol buffer encoding of the three messages a scalar needs (tensorboard/compat/proto):
# Event {double wall_time = 1; int64 step = 2; Summary summary = 5}, Summary {repeated Value
# value = 1}, Value {string tag = 1; float simple_value = 2; SummaryMetadata metadata = 9}.
# https://protobuf.dev/programming-guides/encoding/


def _summary_event(wall_time: float, step: int, summary: bytes) -> bytes:
    return (
        b"\x09"
        + struct.pack("<d", wall_time)
        + b"\x10"
        + _varint(step)
        + b"\x2a"
        + _varint(len(summary))
        + summary
    )


@functools.lru_cache(maxsize=4096)
def _metadata(tag: str, grouped: bool) -> bytes:
    """A Summary.Value's metadata field alone: the scalars plugin and the tag's description."""
    from tensorboard.compat.proto import summary_pb2

    value = summary_pb2.Summary.Value()
    value.metadata.plugin_data.plugin_name = "scalars"
    value.metadata.summary_description = _description(tag, grouped)
    return value.SerializeToString()


def _description(tag: str, grouped: bool) -> str:
    if not grouped:
        return DESCRIPTIONS.get(tag, "")
    for suffix, word in SPREAD_SUFFIXES.items():
        measured = tag.removesuffix(suffix)
        if measured != tag and measured in DESCRIPTIONS:
            return f"{word} over the group's jobs (seeds) of: {DESCRIPTIONS[measured]}"
    return f"Mean over the group's jobs (seeds) of: {DESCRIPTIONS[tag]}" if tag in DESCRIPTIONS else ""


@functools.lru_cache(maxsize=4096)
def _value_prefix(tag: str, metadata_length: int) -> bytes:
    """A Summary's value field up to its float: field 1 and its length, the tag, simple_value's key.

    The float's 4 bytes follow, then the metadata field of `metadata_length` bytes if any.
    """
    encoded = tag.encode()
    tag_field = b"\x0a" + _varint(len(encoded)) + encoded
    return b"\x0a" + _varint(len(tag_field) + 5 + metadata_length) + tag_field + b"\x15"


def _float32_bytes(values: np.ndarray) -> bytes:
    with np.errstate(over="ignore"):  # a finite double beyond float32 is inf, as protobuf makes it
        return values.astype("<f4").tobytes()


@functools.lru_cache(maxsize=65536)  # steps and lengths repeat from run to run
def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # an int64 below zero is its two's complement
    encoded = bytearray()
    while value > 0x7F:
        encoded.append((value & 0x7F) | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


# TFRecord framing (tensorboard/summary/writer/record_writer.py): the length as a uint64,
# its masked CRC32C, the data, the data's masked CRC32C. CRC32C is linear, so a record's
# CRC is a constant for its length XOR one table entry per byte, chosen by the byte and its
# distance from the record's end: every record's CRC is a few numpy operations.
CRC32C_POLYNOMIAL = 0x82F63B78  # Castagnoli, bit-reversed
CRC_MASK_DELTA = 0xA282EAD8
# Records longer than this (a large hyperparameter set) take TensorBoard's pure-Python CRC:
# the table has 256 entries per byte of length.
CRC_TABLE_BYTES = 4096


@functools.cache  # a power of two from 256 to CRC_TABLE_BYTES: five at most
def _crc_tables(length: int) -> tuple[np.ndarray, np.ndarray]:
    """(entry of byte b at distance d from the end, flattened at d * 256 + b; the CRC of n zero bytes)."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(CRC32C_POLYNOMIAL), table >> 1)
    by_distance = np.empty((length, 256), dtype=np.uint32)
    by_distance[0] = table
    for distance in range(1, length):
        previous = by_distance[distance - 1]
        by_distance[distance] = table[previous & 0xFF] ^ (previous >> 8)
    zeros = np.empty(length + 1, dtype=np.uint32)
    entries, register = table.tolist(), 0xFFFFFFFF
    for count in range(length + 1):
        zeros[count] = register ^ 0xFFFFFFFF
        register = entries[register & 0xFF] ^ (register >> 8)
    return by_distance.ravel(), zeros


def masked_crc32c(payloads: list[bytes]) -> list[int]:
    """The masked CRC32C of each payload, as TFRecord frames carry them."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as one_crc

    lengths = np.fromiter(map(len, payloads), dtype=np.int64, count=len(payloads))
    tabled = (lengths > 0) & (lengths <= CRC_TABLE_BYTES)
    if not tabled.all():
        crcs = [0] * len(payloads)
        for index in np.flatnonzero(~tabled).tolist():
            crcs[index] = one_crc(payloads[index])
        for index, crc in zip(np.flatnonzero(tabled).tolist(), masked_crc32c_tabled(payloads, tabled)):
            crcs[index] = crc
        return crcs
    return masked_crc32c_tabled(payloads, tabled)


def masked_crc32c_tabled(payloads: list[bytes], chosen: np.ndarray) -> list[int]:
    """masked_crc32c of the payloads where `chosen`, each of 1 to CRC_TABLE_BYTES bytes."""
    if not chosen.any():
        return []
    picked = payloads if chosen.all() else [payload for payload, ok in zip(payloads, chosen) if ok]
    lengths = np.fromiter(map(len, picked), dtype=np.int64, count=len(picked))
    data = np.frombuffer(b"".join(picked), dtype=np.uint8)
    ends = np.cumsum(lengths)
    distance = np.repeat(ends - 1, lengths) - np.arange(int(ends[-1]))
    rows = 1 << max(8, int(lengths.max() - 1).bit_length())  # few table sizes, each built once
    by_distance, zeros = _crc_tables(rows)
    crc = np.bitwise_xor.reduceat(by_distance[distance * 256 + data], ends - lengths) ^ zeros[lengths]
    return (((crc >> 15) | (crc << 17)) + np.uint32(CRC_MASK_DELTA)).tolist()


def framed_records(events: list[bytes]) -> bytes:
    """The bytes of an event file holding these serialised events, framed as TFRecords."""
    pieces = []
    for event, event_crc in zip(events, masked_crc32c(events)):
        pieces += (_length_header(len(event)), event, struct.pack("<I", event_crc))
    return b"".join(pieces)


@functools.lru_cache(maxsize=65536)
def _length_header(length: int) -> bytes:
    """A record's length as a uint64 and that's masked CRC32C: the same for every record of a length."""
    header = struct.pack("<Q", length)
    return header + struct.pack("<I", masked_crc32c([header])[0])


def _finite_only(values: Mapping[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in values.items() if _finite(value)}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _write_event_file(directory: Path, events: list[bytes]) -> None:
    # The file name carries the write time (as TensorBoard's writers do), so a running
    # TensorBoard sees a rebuilt file as new and reloads the run's steps from it.
    event_file = directory / f"{EVENT_FILE_PREFIX}.{int(time.time())}.{socket.gethostname()}.runjobs"
    with event_file.open("wb") as handle:
        handle.write(framed_records(events))
        handle.flush()
        os.fsync(handle.fileno())


def _replace_directory(target: Path, events: list[bytes]) -> None:
    replace_directory(target, lambda directory: _write_event_file(directory, events))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def event_files(output_dir: Path) -> list[Path]:
    root = logdir(output_dir)
    return sorted(
        [*root.glob(f"*/{EVENT_FILE_PREFIX}*"), *root.glob(f"{GROUPS_DIRECTORY}/*/{EVENT_FILE_PREFIX}*")]
    )


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
