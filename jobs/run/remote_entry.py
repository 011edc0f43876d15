"""The driver of a remote run, as a Ray Job's entrypoint: `python -m jobs.run.remote_entry PLAN.json`.

Runs in the job's working_dir (runjobs' code, the plan, the CSV files), connects to the
cluster the Ray Job runs on (Ray sets RAY_ADDRESS for the entrypoint), and runs the
planned jobs with the usual driver into a scratch directory on the head. Every ended
job's whole record goes to stdout as one marked line for the client (jobs/run/ray_jobs.py) to
keep; `ray job stop` (SIGTERM) cancels the running jobs and records them, as Ctrl-C does
locally. A payload too long for one line of Ray's log stream goes out in parts. Exits 0
when every job succeeded, 1 otherwise, 130 when stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from jobs.pipeline import submit
from jobs.plan.keep_warm import KeepWarm
from jobs.plan.optuna_search import SearchSpec
from jobs.plan.planning import PlannedJob, SubmitRequest
from jobs.plan.spec import JobSpec, Overrides
from jobs.plan.stopping_rule import StoppingRule
from jobs.plan.sweep import field_value
from jobs.run.progress import MessagesOnly
from jobs.run.remote_protocol import (
    END_MARKER,
    PLAN_MARKER,
    RECORD_MARKER,
    STARTED_MARKER,
    TRIAL_MARKER,
    encode_outcome,
    marked_text,
)
from workers.data import load_dataset
from workers.models.user import remember_shipped


def emit(marker: str, payload: str) -> None:
    """One write of a marked payload's lines, so another writer cannot land inside them."""
    sys.stdout.write(marked_text(marker, payload))
    sys.stdout.flush()


class ClientForwarder:
    """Sends each start and each ended job (record, output, model files) to the client as marked lines."""

    def started(self, job_id: str) -> None:
        emit(STARTED_MARKER, job_id)

    def ended(self, outcome) -> None:
        emit(RECORD_MARKER, encode_outcome(outcome))

    def trial(self, event: dict) -> None:
        """An adaptive search asked for a trial: the client's study asks for the same one."""
        emit(TRIAL_MARKER, json.dumps(event))


def main(plan_path: str) -> int:
    plan = json.loads(Path(plan_path).read_text())
    emit(PLAN_MARKER, json.dumps(plan))
    datasets = {}
    planned = []
    for job in plan["jobs"]:
        spec = JobSpec.from_record(job["config"])
        if "model_file" in job:  # a user model's code travels in the working_dir, as a CSV does
            remember_shipped(spec.model, job["model_file"], job["model_filename"])
        key = (spec.data, spec.features, spec.target)
        if key not in datasets:
            # A CSV travels in the working_dir; the records keep the path it was given as.
            staged = job.get("data_file") or spec.data
            datasets[key] = dataclasses.replace(
                load_dataset(staged, spec.features, spec.target), source=spec.data
            )
        planned.append(PlannedJob(job["id"], spec, datasets[key]))

    # `ray job stop` sends SIGTERM: the driver's connection turns it into an interrupt,
    # which cancels and records the running jobs like Ctrl-C (jobs/run/cluster.py).
    scratch = Path(tempfile.mkdtemp(prefix=f"runjobs-{plan['run_id']}-"))
    request = SubmitRequest(
        address=os.environ.get("RAY_ADDRESS") or "auto",
        output=scratch / "run",
        run_id=plan["run_id"],  # the client's run id, in the driver's messages too
        rerun="all",
        max_concurrent=plan.get("max_concurrent"),
        keep_warm=KeepWarm(**plan["keep_warm"]) if plan.get("keep_warm") else None,
        stopping=StoppingRule(**plan["stopping"]) if plan.get("stopping") else None,
    )
    search = plan.get("search")
    if search is not None:
        # An adaptive search: this driver asks the study its client shipped for the trials,
        # and runs again the trials that study still has running.
        overrides = search["overrides"]
        request = dataclasses.replace(
            request,
            rerun=None,
            search=SearchSpec.from_record(search["spec"]),
            study_from=Path(search["study"]).resolve(),
            overrides=Overrides(
                {key: field_value(key, value) for key, value in overrides["common"].items()},
                {
                    framework: {key: field_value(key, value) for key, value in values.items()}
                    for framework, values in overrides["per_framework"].items()
                },
            ),
        )
        planned = None
    try:
        # The client shows each job's end from its record: here only the run's messages.
        outcome = submit(
            request, MessagesOnly(), planned=planned, listener=ClientForwarder(), write_report_files=False
        )
    except KeyboardInterrupt:
        print("runjobs: stopped; the running jobs were recorded cancelled", file=sys.stderr, flush=True)
        emit(END_MARKER, json.dumps({"exit_code": 130, "cluster": {}, "driver_timings": {}}))
        return 130
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the client keeps everything
    end = {
        "exit_code": outcome.exit_code,
        "cluster": outcome.report.get("cluster", {}),
        "driver_timings": outcome.report.get("driver", {}).get("timings", {}),
    }
    emit(END_MARKER, json.dumps(end))
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
