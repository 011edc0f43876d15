"""The driver of a remote run, as a Ray Job's entrypoint: `python -m jobs.remote_entry PLAN.json`.

Runs in the job's working_dir (runjobs' code, the plan, the CSV files), connects to the
cluster the Ray Job runs on (Ray sets RAY_ADDRESS for the entrypoint), and runs the
planned jobs with the usual driver into a scratch directory on the head. Every ended
job's whole record goes to stdout as one marked line for the client (jobs/remote.py) to
keep; `ray job stop` (SIGTERM) cancels the running jobs and records them, as Ctrl-C does
locally. Exits 0 when every job succeeded, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from jobs.driver import PlannedJob
from jobs.ledger import Ledger
from jobs.progress import LineProgress
from jobs.remote import END_MARKER, PLAN_MARKER, RECORD_MARKER, STARTED_MARKER, encode_record
from jobs.spec import JobSpec
from jobs.submit import SubmitRequest, submit
from workers.data import load_dataset


class ForwardingProgress(LineProgress):
    """The client shows each job's end from its record; here only starts are marked."""

    def started(self, job_id: str) -> None:
        print(f"{STARTED_MARKER}{job_id}", flush=True)

    def ended(self, record) -> None:
        pass


def main(plan_path: str) -> int:
    plan = json.loads(Path(plan_path).read_text())
    print(PLAN_MARKER + json.dumps(plan), flush=True)
    datasets = {}
    planned = []
    for job in plan["jobs"]:
        spec = JobSpec.from_record(job["config"])
        key = (spec.data, spec.features, spec.target)
        if key not in datasets:
            datasets[key] = load_dataset(spec.data, spec.features, spec.target)
        planned.append(PlannedJob(job["id"], spec, datasets[key]))

    def stop(signum, frame):
        raise KeyboardInterrupt

    # `ray job stop` sends SIGTERM: cancel and record like Ctrl-C.
    signal.signal(signal.SIGTERM, stop)
    scratch = Path(tempfile.mkdtemp(prefix=f"runjobs-{plan['run_id']}-"))
    with Ledger.open(scratch / "run", for_writing=True) as ledger:
        ledger.set_meta(run_id=plan["run_id"])  # the client's run id, in the driver's messages too
    request = SubmitRequest(
        address=os.environ.get("RAY_ADDRESS") or "auto",
        output=scratch / "run",
        rerun="all",
        max_concurrent=plan.get("max_concurrent"),
    )
    forward = lambda record: print(RECORD_MARKER + encode_record(record), flush=True)  # noqa: E731
    try:
        outcome = submit(
            request, ForwardingProgress(), planned=planned, forward=forward, write_report_files=False
        )
    except KeyboardInterrupt:
        print("runjobs: stopped; the running jobs were recorded cancelled", file=sys.stderr, flush=True)
        return 130
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the client keeps everything
    end = {
        "exit_code": outcome.exit_code,
        "cluster": outcome.report.get("cluster", {}),
        "driver_timings": outcome.report.get("driver", {}).get("timings", {}),
    }
    print(END_MARKER + json.dumps(end), flush=True)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
