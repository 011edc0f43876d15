"""Packing: single-device jobs that differ only in what can be vectorised train together, as one program.

A sweep of small models is mostly machinery: each job's training takes a fraction of a
second and its start, its messages and its record take as long again. Jobs that share
framework, model, data, dtype, optimizer, batch size, epochs and the way parameters
start, and differ only in `lr`, `beta_1`, `beta_2`, `epsilon`, `seed` or the initial
value, are grouped into packs; a warm worker trains a pack as one vectorised program
(each framework's `train_pack`: torch.func, batched TensorFlow variables, jax.vmap), and
every member still comes back as its own job: its own id, record, parameters, history
and verdict. A member learns what it learns alone (its own hyperparameters, start and
shuffle order; nothing is reduced across members), so which jobs share its pack does not
change its numbers, and a re-run packs whatever is left.

A pack is a `PlannedJob` whose `members` are its jobs: the scheduler places, times out,
retries and cancels it as one job (it holds one job's CPU or GPU share, `timeout_s`
covers the whole pack, and `--max-concurrent` counts it once), and the driver records
every member from its result (jobs/run/driver.py).

`packing: off` (a job field) keeps a job out of every pack; `--dry-run` lists the packs
and why each other job trains alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass

from jobs.plan.planning import PlannedJob
from jobs.plan.spec import JobSpec
from workers import frameworks, models

# The fields a pack's members may differ in: each becomes a vector inside the program.
VECTORISED = ("lr", "beta_1", "beta_2", "epsilon", "seed", "init")
# Fields that name or file a job without changing what it trains.
NOT_TRAINING = ("label", "packing")
# At most this many jobs a pack: a pack's records come back in one message and are kept in
# one ledger transaction, and a pack that fails or is cancelled takes this many jobs with it.
MAX_PACK_JOBS = 1000
# A user's model may be any size; its packs stay smaller.
MAX_USER_MODEL_PACK_JOBS = 256
# What a pack's arrays may take on its device: parameters, gradients, Adam's two moments,
# activations and histories, for every member (an estimate: see pack_memory_bytes).
PACK_MEMORY_BYTES = 1 << 30


def why_alone(spec: JobSpec, stopping: bool = False) -> str | None:
    """Why a job cannot join a pack; None when it can."""
    if spec.packing == "off":
        return "packing: off"
    if spec.variant != "single":
        return f"the {spec.variant} variant spreads one job over several devices"
    if spec.loop != "fast":
        return "loop=article trains with each framework's stock optimizer, one job at a time"
    if stopping:
        return "a stopping rule judges each job by its own reports"
    kind = "built-in" if models.is_built_in(spec.model) else "user"
    if kind not in frameworks.describe(spec.framework).packs:
        return f"{spec.framework} cannot vectorise a user's model across jobs"
    return None


def pack_key(spec: JobSpec) -> str:
    """What a pack's members share: every field but the vectorised ones, and how parameters start."""
    record = spec.to_record()
    for name in (*VECTORISED, *NOT_TRAINING):
        record.pop(name)
    start = spec.init if spec.init in ("framework", "shared") else "value"
    return repr((sorted(record.items()), start))


def pack_memory_bytes(spec: JobSpec, feature_count: int, rows: int) -> int:
    """A member's share of a pack's memory: four copies of its parameters, its activations, its histories."""
    if models.is_built_in(spec.model):
        layers = models.dense_stack(spec.model, feature_count, tuple(spec.hidden), spec.activation).layers
        if spec.model == "linear":
            layers = layers[-1:]
        parameters = sum(layer.inputs * layer.outputs + layer.outputs for layer in layers)
        activations = sum(layer.outputs for layer in layers) + feature_count
    else:  # unknown until built: a generous guess
        parameters, activations = 100_000, 1_000
    batch = min(spec.batch_size or rows, rows)
    values = 4 * parameters + 3 * batch * activations + spec.epochs * (2 + feature_count)
    return values * (8 if spec.dtype == "float64" else 4)


def largest_pack(spec: JobSpec, feature_count: int, rows: int) -> int:
    """The most jobs one pack of `spec`'s kind holds: by count, and by what fits in memory."""
    limit = MAX_PACK_JOBS if models.is_built_in(spec.model) else MAX_USER_MODEL_PACK_JOBS
    return max(1, min(limit, PACK_MEMORY_BYTES // pack_memory_bytes(spec, feature_count, rows)))


@dataclass(frozen=True)
class Packing:
    """The units a run schedules (packs and jobs alone), and why each job alone is alone."""

    units: list[PlannedJob]
    alone: dict[str, str]  # job id -> why it trains alone

    @property
    def packs(self) -> list[PlannedJob]:
        return [unit for unit in self.units if unit.members]


def pack_jobs(jobs: list[PlannedJob], workers: int, stopping: bool = False) -> Packing:
    """Group `jobs` into packs, in order, each no larger than fits; `workers` packs share a group at least.

    A group of packable jobs splits into at least `workers` packs (the CPUs, or
    --max-concurrent, that can train them at once), so a sweep of one kind still uses
    every worker. A group of one job runs alone, as today.
    """
    groups: dict[str, list[PlannedJob]] = defaultdict(list)
    alone: dict[str, str] = {}
    for job in jobs:
        reason = why_alone(job.spec, stopping)
        if reason is None:
            groups[pack_key(job.spec)].append(job)
        else:
            alone[job.id] = reason
    packed: dict[str, PlannedJob] = {}  # first member's id -> its pack
    for group in groups.values():
        if len(group) == 1:
            alone[group[0].id] = "no other job shares its settings"
            continue
        first = group[0]
        limit = largest_pack(first.spec, first.dataset.feature_count, first.dataset.rows)
        size = min(limit, max(2, math.ceil(len(group) / max(workers, 1))))
        for start in range(0, len(group), size):
            members = tuple(group[start : start + size])
            if len(members) == 1:
                alone[members[0].id] = "the last of its settings, after full packs"
                continue
            packed[members[0].id] = make_pack(members)
    units = []
    for job in jobs:
        if job.id in alone:
            units.append(job)
        elif job.id in packed:
            units.append(packed[job.id])
    return Packing(units, alone)


def make_pack(members: tuple[PlannedJob, ...]) -> PlannedJob:
    """One pack of `members`: its id names its framework and the members it holds."""
    digest = hashlib.sha256("\n".join(member.id for member in members).encode()).hexdigest()[:10]
    first = members[0]
    return dataclasses.replace(first, id=f"pack-{first.spec.framework}-{digest}", members=members)


def describe_packs(packing: Packing) -> list[str]:
    """What --dry-run says of packing: each pack, and the jobs alone grouped by why."""
    lines = []
    for pack in packing.packs:
        members = pack.members
        shown = ", ".join(member.id for member in members[:3]) + (", ..." if len(members) > 3 else "")
        lines.append(f"{pack.id}: {len(members)} jobs ({pack.spec.framework}, {pack.spec.model}): {shown}")
    reasons: dict[str, list[str]] = defaultdict(list)
    for job_id, reason in packing.alone.items():
        reasons[reason].append(job_id)
    for reason, job_ids in reasons.items():
        shown = ", ".join(job_ids[:3]) + (", ..." if len(job_ids) > 3 else "")
        lines.append(f"{len(job_ids)} job(s) train alone ({reason}): {shown}")
    return lines
