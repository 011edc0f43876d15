"""The combined report: pure functions from job records to report.json, .csv, .md and a table.

Nothing here talks to Ray or imports a framework, so a report can be rebuilt from
recorded results at any time. Numbers that are not finite (a diverged job's NaN) are
written as null: report.json is strict JSON.

Frameworks are compared two by two (`pairs`, in the registry's order: tensorflow, torch,
jax), and all together: `groups` holds every config that several frameworks ran, with
their parity (loss at every epoch, predictions, parameters). A framework added to the
registry is compared with the others without a change here.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from jobs.record.records import finite_only, record_json
from workers import frameworks


def build_report(
    run_id: str,
    cluster: dict[str, Any],
    records: list[dict[str, Any]],
    driver_timings: dict[str, float] | None = None,
    search: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`driver_timings`: connect_s (Ray start or connection), jobs_s, disconnect_s; `search`: an
    adaptive search's settings as the ledger keeps them (jobs/plan/optuna_search.py)."""
    # The records come from the ledger, which keeps them finite (record_json): only what is
    # derived from them here is made so (finite_only over 10,000 histories costs seconds).
    records = [
        {**record, "speed_vs_single": finite_only(speed_vs_single(record, records))} for record in records
    ]
    report = {
        "run_id": run_id,
        "cluster": cluster,
        "driver": {"timings": driver_timings or {}},
        "jobs": records,
        "comparison": compare(records),
        "aggregates": aggregate(records),
        "warnings": warnings(records),
        "summary": {
            "jobs": len(records),
            "succeeded": sum(record["status"] == "succeeded" for record in records),
            "stopped": sum(record["status"] == "stopped" for record in records),
            "failed": sum(record["status"] == "failed" for record in records),
            "cancelled": sum(record["status"] == "cancelled" for record in records),
            # Packed sweeps (jobs/plan/packing.py): how many packs trained how many of the jobs.
            **_pack_counts(records),
        },
    }
    if search is not None:
        report["search"] = search_summary(search, records)
    return {key: value if key == "jobs" else finite_only(value) for key, value in report.items()}


def _pack_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    packs = [((record.get("timings") or {}).get("pack") or {}).get("id") for record in records]
    packed = [pack for pack in packs if pack]
    return {"packs": len(set(packed)), "packed_jobs": len(packed)}


def search_summary(search: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """An adaptive search's settings and its best trial, from the records alone.

    The best is the succeeded job with the best value of the metric (the first, on a tie),
    which is the study's best trial: the study is told exactly these values.
    """
    from jobs.plan.optuna_search import metric_value, trial_number

    scored = []
    for record in records:
        value = metric_value(record, search["metric"]) if record.get("status") == "succeeded" else None
        if value is not None:
            scored.append(
                (value if search["direction"] == "minimize" else -value, trial_number(record["id"]), record)
            )
    best = None
    if scored:
        _, number, record = min(scored, key=lambda item: (item[0], item[1]))
        best = {
            "trial": number,
            "job": record["id"],
            "value": metric_value(record, search["metric"]),
            "fields": {name: record["config"].get(name) for name in search.get("fields", [])},
        }
    return {**search, "finished": len(scored), "best": best}


def summary(report: dict[str, Any], output_dir, exit_code: int) -> dict[str, Any]:
    """The machine-readable end of a submit (`--json`): counts, exit code and each job's state."""
    return {
        "run_id": report["run_id"],
        "output": str(output_dir),
        "exit_code": exit_code,
        "counts": report["summary"],
        "jobs": [
            {
                "id": job["id"],
                "status": job["status"],
                "convergence": job["convergence"],
                "error": job["error"],
            }
            for job in report["jobs"]
        ],
        "warnings": report.get("warnings", []),
        # An adaptive search's settings and best trial, for a script that reads only this.
        **({"search": report["search"]} if report.get("search") else {}),
    }


# Fields that may differ between a multi-device job and its single-device twin.
DISTRIBUTION_FIELDS = (
    "variant", "workers", "gpus_per_job", "placement", "setup_timeout_s", "loop",
    "timeout_s", "retries", "retry_exceptions",
)  # fmt: skip


def single_twin(record: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The succeeded single-device job that trained the same config as this variant job.

    Not one trained in a pack: its train_s is its share of the pack's, not a time of its own.
    """

    def training_fields(job: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in trained_config(job).items() if key not in DISTRIBUTION_FIELDS}

    if record["variant"] == "single":
        return None
    return next(
        (
            job
            for job in records
            if job["variant"] == "single"
            and job["status"] == "succeeded"
            and not (job.get("timings") or {}).get("pack")
            and training_fields(job) == training_fields(record)
        ),
        None,
    )


def speed_vs_single(record: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How a variant job's train time and parameters compare with its single-device twin's."""
    twin = single_twin(record, records)
    if twin is None or record["status"] != "succeeded":
        return None
    return {
        "job": twin["id"],
        "train_time_ratio": _ratio(record["timings"]["train_s"], twin["timings"]["train_s"]),
        "max_param_difference": _param_difference(record["params"], twin["params"]),
    }


def warnings(records: list[dict[str, Any]]) -> list[str]:
    """Plain sentences about results a reader should not miss."""
    messages = []
    for record in records:
        speed = speed_vs_single(record, records)
        if speed and speed["train_time_ratio"] is not None and speed["train_time_ratio"] > 1:
            messages.append(
                f"{record['id']} ({record['variant']}, {record['workers']} workers) trained "
                f"{speed['train_time_ratio']:.1f}x slower than its single-device twin {speed['job']}: "
                "for a model this small, synchronising gradients costs more than the arithmetic it splits"
            )
    return messages


def _ratio(value: Any, reference: Any) -> float | None:
    return value / reference if _finite(value) and _finite(reference) and reference > 0 else None


def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated seeds grouped: mean and standard deviation per (framework, variant, hyperparameters).

    A group is every succeeded job whose config differs only in `seed`; groups of one job
    are left out. `pairs` compares the groups of two frameworks (tensorflow and torch) with the
    same settings.
    """
    import statistics

    def spread(values: list[float]) -> dict[str, float | None]:
        finite = [value for value in values if _finite(value)]
        if not finite:
            return {"mean": None, "std": None}
        return {"mean": statistics.fmean(finite), "std": statistics.stdev(finite) if len(finite) > 1 else 0.0}

    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record["status"] == "succeeded":
            key = json.dumps({k: v for k, v in trained_config(record).items() if k != "seed"}, sort_keys=True)
            grouped.setdefault(key, []).append(record)
    groups = []
    for key, jobs in grouped.items():
        if len(jobs) < 2:
            continue
        config = json.loads(key)
        linear = all("weights" in job["params"] for job in jobs)
        weight_count = len(jobs[0]["params"]["weights"]) if linear else 0
        groups.append(
            {
                "framework": config["framework"],
                "variant": config["variant"],
                "config": config,
                "jobs": [job["id"] for job in jobs],
                "seeds": [job["config"]["seed"] for job in jobs],
                "weights": [
                    spread([job["params"]["weights"][i] for job in jobs]) for i in range(weight_count)
                ],
                "bias": spread([job["params"]["bias"] for job in jobs]) if linear else None,
                "final_loss": spread([job["loss"]["final"] for job in jobs]),
                "r2_gap": spread([job["loss"]["r2_gap"] for job in jobs]),
                "floor_gap": spread([job["loss"].get("floor_gap") for job in jobs]),
                "train_s": spread([job["timings"]["train_s"] for job in jobs]),
                "convergence": {
                    state: sum(job["convergence"] == state for job in jobs)
                    for state in ("converged", "not_converged", "diverged")
                },
            }
        )
    pairs = []
    for first, second in framework_pairs(groups):
        for first_group in (group for group in groups if group["framework"] == first):
            settings = {k: v for k, v in first_group["config"].items() if k != "framework"}
            for second_group in (group for group in groups if group["framework"] == second):
                if {k: v for k, v in second_group["config"].items() if k != "framework"} == settings:
                    pairs.append(
                        {
                            "groups": {first: first_group["jobs"], second: second_group["jobs"]},
                            "train_time_ratio": _ratio(
                                first_group["train_s"]["mean"], second_group["train_s"]["mean"]
                            ),
                            "r2_gap_mean": {
                                first: first_group["r2_gap"]["mean"],
                                second: second_group["r2_gap"]["mean"],
                            },
                        }
                    )
    return {"groups": groups, "pairs": pairs}


def framework_pairs(items: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Every two frameworks among `items` (records or groups), in the registry's order.

    A framework a record names but the registry no longer lists (an older run) comes
    after the registered ones, so its record is still compared.
    """
    return list(itertools.combinations(frameworks_in_order(items), 2))


def frameworks_in_order(items: list[dict[str, Any]]) -> list[str]:
    """The frameworks `items` name, in the registry's order; unregistered ones (an older run) last."""
    present = list(dict.fromkeys(item["framework"] for item in items))
    ordered = [name for name in frameworks.names() if name in present]
    return ordered + [name for name in present if name not in ordered]


def compare(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Pair each job of a framework with the job of the same config of each later framework.

    With the built-in frameworks: each TensorFlow job beside the torch job of the same
    config. When the run holds exactly one job of each of two frameworks but their
    configs differ (the article preset), they are still paired, with `same_config`
    false and the differing fields listed; the parameter difference is then not a
    parity measure and is omitted.
    """
    pairs = []
    for first, second in framework_pairs(records):
        first_jobs = [record for record in records if record["framework"] == first]
        unpaired = [record for record in records if record["framework"] == second]
        for first_job in first_jobs:
            partner = next((job for job in unpaired if _same_config(first_job, job)), None)
            if partner is None and len(first_jobs) == 1 and len(unpaired) == 1:
                partner = unpaired[0]
            if partner is not None:
                unpaired.remove(partner)
                pairs.append(_pair(first_job, partner))
    return {"pairs": pairs, "groups": framework_groups(records)}


# How closely frameworks that ran the same config from a shared start must agree, epoch by
# epoch in the loss and on the predictions (relative), to be reported as agreeing. In
# float64 runjobs' own update rules agree to about 1e-15; float32 rounding alone drifts
# about 1e-5 over a few hundred epochs.
PARITY_TOLERANCE = {"float64": 1e-8, "float32": 1e-3}


def framework_groups(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every set of jobs of different frameworks that trained the same config: the general comparison.

    For each config run by two or more frameworks (all succeeded): each framework's loss,
    train time and predictions, the fastest, and parity: the largest relative difference
    between any two frameworks' loss at any epoch, in the predictions and in the
    parameters (when recorded). From a shared start (init=shared) under runjobs' own
    update rules the frameworks should agree: `agree` says whether they did, within
    PARITY_TOLERANCE for the dtype. From each framework's own start, or with stock
    optimizers, `agree` is None: there is no reason they should.
    """
    by_config: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        key = json.dumps(_comparable_config(record), sort_keys=True, default=str)
        by_config.setdefault(key, []).append(record)
    groups = []
    for jobs in by_config.values():
        ordered = frameworks_in_order(jobs)
        if len(ordered) < 2:
            continue
        chosen = {name: next(job for job in jobs if job["framework"] == name) for name in ordered}
        succeeded = all(job["status"] == "succeeded" for job in chosen.values())
        group: dict[str, Any] = {
            "jobs": {name: job["id"] for name, job in chosen.items()},
            "model": chosen[ordered[0]]["config"].get("model", "linear"),
            "frameworks": {name: _side(job) for name, job in chosen.items()},
            "fastest": None,
            "parity": None,
        }
        if succeeded:
            train = {name: job["timings"]["train_s"] for name, job in chosen.items()}
            group["fastest"] = min(train, key=lambda name: train[name])
            group["parity"] = _parity(list(chosen.values()))
        groups.append(group)
    return groups


def _parity(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    config = jobs[0]["config"]
    dtype = config.get("dtype", "float32")
    rules = sorted({(job.get("model") or {}).get("update_rule") or "" for job in jobs})
    histories = [job["loss"]["history"] for job in jobs]
    predictions = [[item["output"] for item in job["predictions"]] for job in jobs]
    parameters = [parameter_values(job["params"]) for job in jobs]
    loss = _max_relative_spread(histories)
    outputs = _max_relative_spread(predictions)
    values = None if any(item is None for item in parameters) else _max_relative_spread(parameters)
    layouts = {job["framework"]: _layout(job["params"]) for job in jobs}
    same_layout = len({json.dumps(layout) for layout in layouts.values()}) == 1
    comparable = (
        config.get("init") == "shared" and all(rule.startswith("runjobs ") for rule in rules) and same_layout
    )
    tolerance = PARITY_TOLERANCE.get(dtype, 1e-3)
    agree = None
    if comparable:
        measured = [value for value in (loss, outputs) if value is not None]
        agree = bool(measured) and all(value <= tolerance for value in measured)
    return {
        "loss_history_max_relative": loss,
        "predictions_max_relative": outputs,
        "parameters_max_relative": values,
        "dtype": dtype,
        "tolerance": tolerance,
        "shared_start": config.get("init") == "shared",
        "update_rules": rules,
        # Different layouts (a user model built differently in two frameworks) drew different
        # shared starts: not the same model, so no parity verdict.
        "layouts": None if same_layout else layouts,
        "agree": agree,
    }


def _layout(params: dict[str, Any]) -> list[list[int]]:
    """A job's parameter shapes in order (the linear model's: [K, 1] and [1])."""
    if "weights" in params:
        return [[len(params["weights"]), 1], [1]]
    return [list(layer["shape"]) for layer in params.get("layers") or []]


def _max_relative_spread(series: list[list[Any]]) -> float | None:
    """The largest |a - b| / max(|a|, |b|) between any two series at any position; None if not comparable."""
    if not series or any(len(item) != len(series[0]) for item in series):
        return None
    try:
        values = np.asarray(series, dtype=np.float64)  # None (a non-finite value, kept as null) is nan
    except (TypeError, ValueError):
        return None
    if values.size == 0:
        return 0.0
    if not np.isfinite(values).all():
        return None
    low, high = values.min(axis=0), values.max(axis=0)
    scale = np.maximum(np.maximum(np.abs(low), np.abs(high)), 1e-300)
    return float(np.max((high - low) / scale))


def _comparable_config(record: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in trained_config(record).items() if key != "framework"}


def trained_config(record: dict[str, Any]) -> dict[str, Any]:
    """The job's config, and for a user model the digest of its code: the config holds only the
    file's path, and two versions of one file are different models."""
    digest = (record.get("model") or {}).get("digest")
    return {**record["config"], "model_digest": digest} if digest else record["config"]


def _same_config(first: dict[str, Any], second: dict[str, Any]) -> bool:
    return _comparable_config(first) == _comparable_config(second)


def _pair(first_job: dict[str, Any], second_job: dict[str, Any]) -> dict[str, Any]:
    """Two jobs of two frameworks side by side; the ratio is first/second, in the registry's order."""
    first_config, second_config = _comparable_config(first_job), _comparable_config(second_job)
    differing = sorted(key for key in first_config if first_config[key] != second_config.get(key))
    first, second = first_job["framework"], second_job["framework"]
    sides = {first: first_job, second: second_job}
    both_succeeded = all(job["status"] == "succeeded" for job in sides.values())
    pair: dict[str, Any] = {
        "jobs": {name: job["id"] for name, job in sides.items()},
        "same_config": not differing,
        "differing_fields": differing,
        "frameworks": {name: _side(job) for name, job in sides.items()},
        "train_time_ratio": None,
        "faster": None,
        "max_param_difference": None,
    }
    if both_succeeded:
        first_train = first_job["timings"]["train_s"]
        second_train = second_job["timings"]["train_s"]
        if second_train > 0:
            pair["train_time_ratio"] = {f"{first}/{second}": first_train / second_train}
        pair["faster"] = first if first_train < second_train else second
        if not differing:
            pair["max_param_difference"] = _param_difference(first_job["params"], second_job["params"])
    return pair


def _side(job: dict[str, Any]) -> dict[str, Any]:
    side: dict[str, Any] = {"status": job["status"], "error": job["error"]}
    if job["status"] != "succeeded":
        return side
    params, reference = job["params"], job["reference"]
    side["convergence"] = job["convergence"]
    if "weights" in params:
        side.update(
            weights=params["weights"],
            bias=params["bias"],
            gap_to_optimum={
                "weights_max_abs": _max_abs_difference(params["weights"], reference["weights"]),
                "bias_abs": _abs_difference(params["bias"], reference["bias"]),
                "loss": _difference(job["loss"]["final"], reference["loss"]),
                "r2": job["loss"]["r2_gap"],
            },
        )
    else:
        side.update(model=job.get("model"), parameter_count=params.get("count"))
    if job["loss"].get("floor_gap") is not None:
        side["gap_to_floor"] = {"r2": job["loss"]["floor_gap"], "fits_noise": job["loss"].get("fits_noise")}
    side.update(
        final_loss=job["loss"]["final"],
        predictions=[prediction["output"] for prediction in job["predictions"]],
        startup_s=job["timings"]["startup_s"],
        setup_s=job["timings"]["setup_s"],
        train_s=job["timings"]["train_s"],
        device=job["placement"]["device"],
        initial_parameters=job["config"]["init"],
    )
    return side


def parameter_values(params: dict[str, Any] | None) -> list[Any] | None:
    """Every recorded parameter value, flattened: [w..., b] for the linear model, the layers'
    values for a larger one, None when the record holds only their summary (too many values)."""
    if not params:
        return None
    if "weights" in params:
        return [*params["weights"], params["bias"]]
    layers = params.get("layers") or []
    if not layers or any("values" not in layer for layer in layers):
        return None
    flat: list[Any] = []
    for layer in layers:
        flat.extend(_flatten(layer["values"]))
    return flat


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [item for part in value for item in _flatten(part)]
    return [value]


def _param_difference(first: dict[str, Any], second: dict[str, Any]) -> dict[str, float | None] | None:
    values_first, values_second = parameter_values(first), parameter_values(second)
    if values_first is None or values_second is None or len(values_first) != len(values_second):
        return None
    absolute = _max_abs_difference(values_first, values_second)
    relative = max(
        (
            abs(a - b) / max(abs(a), abs(b), 1e-12)
            for a, b in zip(values_first, values_second)
            if _finite(a) and _finite(b)
        ),
        default=None,
    )
    return {"absolute": absolute, "relative": relative}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _difference(value: Any, reference: Any) -> float | None:
    return value - reference if _finite(value) and _finite(reference) else None


def _abs_difference(value: Any, reference: Any) -> float | None:
    difference = _difference(value, reference)
    return None if difference is None else abs(difference)


def _max_abs_difference(values: list[Any], references: list[Any]) -> float | None:
    differences = [_abs_difference(value, reference) for value, reference in zip(values, references)]
    return None if any(item is None for item in differences) else max(differences, default=0.0)


# ---- rendering ---------------------------------------------------------------------------

CSV_COLUMNS = (
    "id", "framework", "variant", "workers", "status", "convergence", "weights", "bias",
    "reference_weights", "reference_bias", "final_loss", "reference_loss", "r2_gap",
    "model", "parameter_count", "floor_gap", "predictions", "queued_s", "startup_s", "setup_s",
    "train_s", "epoch_s_median", "predict_s", "total_s", "device", "gpu_ids", "hostname", "error",
)  # fmt: skip


def to_json(report: dict[str, Any]) -> str:
    """The report as JSON text (json_parts, joined)."""
    return "".join(json_parts(report))


def json_parts(
    report: dict[str, Any], whole_records: Iterable[tuple[str, bytes]] | None = None
) -> Iterator[str]:
    """The report as JSON, in parts: indented to its jobs, each job on one line.

    json.dumps with an indent runs the pure-Python encoder (and puts every value of every
    history on a line of its own): about ten times slower, and three times larger, at
    10,000 jobs. Each job compact on its own line (orjson: non-finite floats as null)
    reads as well and greps by id.

    `whole_records`: (id, each job's whole record as the ledger keeps it, compact JSON), in the
    report's job order, when the report's own are light (jobs/report/files.py): written as
    they are, with the report's `speed_vs_single` added.
    """
    whole = iter(whole_records) if whole_records is not None else None
    separator = "{\n"
    for key, value in report.items():
        yield f"{separator}  {json.dumps(key)}: "
        separator = ",\n"
        if key == "jobs" and value:
            for index, job in enumerate(value):
                text = record_json(job) if whole is None else _with_speed(next(whole), job)
                yield ("[\n    " if index == 0 else ",\n    ") + text.decode()
            yield "\n  ]"
        else:
            yield record_json(value, indent=True).decode().replace("\n", "\n  ")
    yield "\n}\n" if separator == ",\n" else "{}\n"


def _with_speed(whole: tuple[str, bytes], job: dict[str, Any]) -> bytes:
    """A whole record's JSON with the report's speed_vs_single for it added, as build_report adds it."""
    job_id, record = whole
    if job_id != job["id"]:
        raise RuntimeError(f"report.json: the ledger's next record is {job_id}'s, not {job['id']}'s")
    return record.rstrip()[:-1] + b',"speed_vs_single":' + record_json(job.get("speed_vs_single")) + b"}"


def to_csv(report: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for job in report["jobs"]:
        params = job["params"] or {}
        reference = job["reference"] or {}
        loss = job["loss"] or {}
        timings = job["timings"] or {}
        placement = job["placement"] or {}
        writer.writerow(
            {
                "id": job["id"],
                "framework": job["framework"],
                "variant": job["variant"],
                "workers": job["workers"],
                "status": job["status"],
                "convergence": job["convergence"],
                "weights": _joined(params.get("weights")),
                "bias": params.get("bias"),
                "reference_weights": _joined(reference.get("weights")),
                "reference_bias": reference.get("bias"),
                "final_loss": loss.get("final"),
                "reference_loss": reference.get("loss"),
                "r2_gap": loss.get("r2_gap"),
                "model": (job.get("model") or {}).get("name") or job["config"].get("model", "linear"),
                "parameter_count": (job.get("model") or {}).get("parameters"),
                "floor_gap": loss.get("floor_gap"),
                "predictions": _joined([prediction["output"] for prediction in job["predictions"]]),
                **{
                    key: timings.get(key)
                    for key in (
                        "queued_s",
                        "startup_s",
                        "setup_s",
                        "train_s",
                        "epoch_s_median",
                        "predict_s",
                        "total_s",
                    )
                },  # fmt: skip
                "device": placement.get("device"),
                "gpu_ids": _joined(placement.get("gpu_ids")),
                "hostname": placement.get("hostname"),
                "error": job["error"],
            }
        )
    return buffer.getvalue()


def _joined(values: list[Any] | None) -> str:
    return ";".join("" if value is None else repr(value) for value in values or [])


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.6g}"


def _small(value: Any) -> str:
    return "-" if value is None else ("0" if value == 0 else f"{value:.1e}")


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _first_weight(weights: list[Any]) -> str:
    """The first weight; a trailing + says there are more (see report.json)."""
    return _number(weights[0]) + ("+" if len(weights) > 1 else "")


def _floor_gap_text(loss: dict[str, Any]) -> str:
    gap = loss.get("floor_gap")
    return "-" if gap is None else f"{_small(gap)} floor"


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The comparison table: one row per job, then the least-squares optimum."""
    jobs = report["jobs"]
    first_input = next((job["predictions"][0]["input"] for job in jobs if job["predictions"]), None)
    predict_header = "predict" if first_input is None else f"y({','.join(f'{x:g}' for x in first_input)})"
    header = ["job", "result", "w", "b", "R2 gap", predict_header, "startup", "train"]
    rows = []
    for job in jobs:
        if job["status"] not in ("succeeded", "stopped") or not job.get("params"):
            rows.append([job["id"], job["status"], "-", "-", "-", "-", "-", "-"])
            continue
        params = job["params"]
        linear = "weights" in params
        stopped = job.get("stopped") or {}
        rows.append(
            [
                job["id"],
                # A stopped job's values are those of the epochs it trained.
                f"stopped at {stopped.get('epochs')}" if job["status"] == "stopped" else job["convergence"],
                # A larger model: its name and size in place of w and b, its gap to the
                # noise floor (marked "floor") in place of the gap to the optimum.
                _first_weight(params["weights"]) if linear else (job.get("model") or {}).get("name", "?"),
                _number(params["bias"]) if linear else f"{params.get('count', '?')} params",
                _small(job["loss"]["r2_gap"]) if linear else _floor_gap_text(job["loss"]),
                _number(job["predictions"][0]["output"] if job["predictions"] else None),
                _seconds(job["timings"]["startup_s"]),
                _seconds(job["timings"]["train_s"]),
            ]
        )
    reference_job = next((job for job in jobs if job["reference"]), None)
    if reference_job is not None:
        reference = reference_job["reference"]
        reference_prediction = None
        if reference_job["predictions"]:
            point = reference_job["predictions"][0]["input"]
            reference_prediction = sum(w * x for w, x in zip(reference["weights"], point)) + reference["bias"]
        rows.append(
            [
                "optimum", "least squares", _first_weight(reference["weights"]),
                _number(reference["bias"]), "0", _number(reference_prediction), "", "",
            ]
        )  # fmt: skip
    return header, rows


def render_table(report: dict[str, Any]) -> str:
    """A plain-text table that fits 80 columns, and a sentence per framework pair."""
    header, rows = table_rows(report)
    widths = [max(len(row[index]) for row in [header, *rows]) for index in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.extend(_pair_sentences(report))
    lines.extend(f"{job['id']} {job['status']}: {job['error']}" for job in report["jobs"] if job["error"])
    lines.extend(f"warning: {message}" for message in report.get("warnings", []))
    lines.extend(_search_lines(report.get("search")))
    groups = report.get("aggregates", {}).get("groups", [])
    if groups:
        lines.append("")
        lines.extend(_aggregate_lines(groups))
    return "\n".join(lines) + "\n"


def _search_lines(search: dict[str, Any] | None) -> list[str]:
    """The search's best trial in a sentence: what it found, and the values that found it."""
    if not search:
        return []
    best = search.get("best")
    if best is None:
        return [f"search: no trial of {search['trials']} has a {search['metric']} yet"]
    values = ", ".join(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
                       for name, value in best["fields"].items())  # fmt: skip
    return [
        f"search: best of {search['finished']} finished trial(s) is trial {best['trial']} ({best['job']}), "
        f"{search['metric']} {best['value']:.6g}, with {values}"
    ]


def _aggregate_lines(groups: list[dict[str, Any]]) -> list[str]:
    """Repeated seeds, one row a group: what differs between groups, then mean +- std."""
    varying = sorted(
        {key for group in groups for key in group["config"] if key not in ("framework", "variant")}
        - {
            key
            for key in groups[0]["config"]
            if all(g["config"].get(key) == groups[0]["config"][key] for g in groups)
        }
    )

    def label(group: dict[str, Any]) -> str:
        name = group["framework"] + ("" if group["variant"] == "single" else f"-{group['variant']}")
        return " ".join([name, *(f"{key}={group['config'][key]}" for key in varying)])

    def plus_minus(value: dict[str, Any], digits: str = ".4g") -> str:
        if value["mean"] is None:
            return "-"
        return f"{value['mean']:{digits}}+-{value['std']:.1g}"

    header = ["seeds grouped", "n", "w mean+-std", "R2 gap", "train s"]
    rows = [
        [label(group), str(len(group["jobs"])),
         plus_minus(group["weights"][0]) if group["weights"] else "-",
         plus_minus(group["r2_gap"], ".1e"), plus_minus(group["train_s"], ".3f")]
        for group in groups
    ]  # fmt: skip
    widths = [max(len(row[index]) for row in [header, *rows]) for index in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]
    ]


def pair_frameworks(pair: dict[str, Any]) -> tuple[str, str]:
    """The two frameworks of a comparison pair, in the order its ratio divides them."""
    first, second = pair["jobs"]
    return first, second


def _pair_sentences(report: dict[str, Any]) -> list[str]:
    sentences = []
    for pair in report["comparison"]["pairs"]:
        names = pair["jobs"]
        first, second = pair_frameworks(pair)
        if pair["train_time_ratio"] is None:
            sentences.append(f"{names[first]} vs {names[second]}: not compared (a job did not succeed)")
            continue
        ratio = pair["train_time_ratio"][f"{first}/{second}"]
        sentence = f"{names[first]} vs {names[second]}: train time ratio {first}/{second} {ratio:.2f}"
        if pair["same_config"]:
            sentence += "; same config"
            if pair["max_param_difference"] is not None:
                relative = pair["max_param_difference"]["relative"]
                sentence += f", parameters differ by {_small(relative)} (relative)"
            if pair["frameworks"][first].get("initial_parameters") == "framework":
                sentence += ", from each framework's own initialisation"
        else:
            sentence += f"; configs differ in {', '.join(pair['differing_fields'])}"
        sentences.append(sentence)
    for group in report["comparison"].get("groups", []):
        sentence = _parity_sentence(group)
        if sentence:
            sentences.append(sentence)
    for job in report["jobs"]:
        if job["status"] == "succeeded" and (job.get("loss") or {}).get("fits_noise"):
            sentences.append(
                f"{job['id']}: loss below the noise floor (gap {_small(job['loss']['floor_gap'])}): "
                "the model fit the noise of these rows, not only the function"
            )
    return sentences


def _parity_sentence(group: dict[str, Any]) -> str | None:
    """One sentence on whether the frameworks of a config agree; None when there is nothing to say."""
    parity = group["parity"]
    names = list(group["jobs"])
    if parity is None:
        return None
    label = " vs ".join(group["jobs"][name] for name in names)
    loss = parity["loss_history_max_relative"]
    measured = f"loss differs by at most {_small(loss)} (relative) at any epoch" if loss is not None else ""
    if parity.get("layouts"):
        shown = "; ".join(
            f"{name} {' '.join('x'.join(map(str, shape)) for shape in layout)}"
            for name, layout in parity["layouts"].items()
        )
        return f"{label}: not comparable, the parameter layouts differ ({shown})"
    if parity["agree"] is None:
        if len(names) < 3:
            return None  # two frameworks without a shared start: the pair sentence says it all
        return f"{label}: {measured}; not a parity test (no shared start, or stock optimizers)"
    verdict = "agree" if parity["agree"] else "DISAGREE"
    return (
        f"{label}: frameworks {verdict} within {parity['tolerance']:g} ({parity['dtype']}, shared start): "
        f"{measured}, predictions by {_small(parity['predictions_max_relative'])}"
    )


def describe_cluster(cluster: dict[str, Any]) -> str:
    """One sentence on where the run ran; a remote run cut short may know only the address."""
    if "nodes" not in cluster:
        return f"Cluster `{cluster.get('address', 'unknown')}` (its size was not reported)."
    return (
        f"Cluster `{cluster['address']}`: {cluster['nodes']} node(s), {cluster['cpus']:g} CPU(s), "
        f"{cluster['gpus']:g} GPU(s)."
    )


def to_markdown(report: dict[str, Any]) -> str:
    header, rows = table_rows(report)
    lines = [f"# runjobs report {report['run_id']}", ""]
    lines.append(describe_cluster(report["cluster"]))
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", *[f"- {sentence}" for sentence in _pair_sentences(report)]]
    lines += [f"- warning: {message}" for message in report.get("warnings", [])]
    failed = [job for job in report["jobs"] if job["error"]]
    if failed:
        lines += ["", "## Failed jobs", ""]
        lines += [f"- `{job['id']}`: {job['error']}" for job in failed]
    lines += ["", "## Jobs", ""]
    for job in report["jobs"]:
        placement = job["placement"] or {}
        timings = job["timings"] or {}
        lines.append(
            f"- `{job['id']}` ({job['framework']}, {job['variant']}): {job['status']}"
            + (f", device `{placement.get('device')}` on {placement.get('hostname')}" if placement else "")
            + (
                f"; start-up {_seconds(timings.get('startup_s'))}, "
                f"set-up {_seconds(timings.get('setup_s'))}, "
                f"train {_seconds(timings.get('train_s'))}, total {_seconds(timings.get('total_s'))}"
                if timings.get("train_s") is not None
                else ""
            )
        )
    return "\n".join(lines) + "\n"
