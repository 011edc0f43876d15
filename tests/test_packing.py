"""Packed sweeps end to end: planned, trained on Ray, recorded one job each, and the same as unpacked.

The worker's arithmetic is checked against each job alone in tests/test_packed_training.py;
here the whole path runs: `--dry-run` lists the packs, a sweep runs packed and then with
`packing: off` into another directory and every job's numbers agree, a diverging member
is its own record beside converged ones, and a driver SIGKILLed or cancelled while a
pack trains leaves every job to finish exactly once on the re-run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest

from jobs.plan.packing import MAX_PACK_JOBS, pack_jobs
from jobs.plan.planning import SubmitRequest, plan_jobs
from jobs.record.ledger import Ledger
from tests.helpers import RUNJOBS, run_cli, started_like_a_scheduler

MODELS = ["model: linear", "model: mlp, hidden: [8], activation: tanh"]
# Torch and JAX x the line and an mlp x float32 and float64 x 2 learning rates x 2 seeds.
SWEEP = (
    "defaults:\n  epochs: 60\n  batch_size: 16\n  predict: [[0.5, -1.0]]\n"
    '  data: "synthetic:rows=64,features=2,noise=0.1,seed=1,function=linear"\njobs:\n'
    + "".join(
        f"  - {{framework: {framework}, {model}, dtype: {dtype}, lr: {lr}, seed: {seed}}}\n"
        for framework in ("torch", "jax")
        for model in MODELS
        for dtype in ("float32", "float64")
        for lr in (0.01, 0.03)
        for seed in (0, 1)
    )
)
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


def write(tmp_path, text: str, name: str = "sweep.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_dry_run_lists_the_packs_and_why_other_jobs_train_alone(tmp_path):
    spec = write(
        tmp_path,
        SWEEP + "  - {framework: torch, loop: article}\n  - {framework: torch, variant: ddp, workers: 2}\n",
    )
    shown = run_cli(["submit", str(spec), "--dry-run", "--max-concurrent", "1"], tmp_path / "run")
    assert shown.exit_code == 0, shown.stderr
    assert "packing for 1 worker(s): 8 pack(s) of 32 job(s), 2 job(s) alone" in shown.stdout
    assert "job(s) train alone (loop=article trains with each framework's stock optimizer" in shown.stdout
    assert "(the ddp variant spreads one job over several devices)" in shown.stdout
    listed = json.loads(run_cli(["submit", str(spec), "--dry-run", "--json"], tmp_path / "run").stdout)
    packs = {job["pack"] for job in listed if job["pack"]}
    assert len([job for job in listed if job["pack"]]) == 32 and len(packs) >= 8
    off = run_cli(["submit", str(spec), "--dry-run", "--set", "packing=off"], tmp_path / "run")
    assert "0 pack(s) of 0 job(s), 34 job(s) alone" in off.stdout and "(packing: off)" in off.stdout
    assert not (tmp_path / "run").exists()


def test_packs_hold_only_jobs_that_differ_in_what_is_vectorised_and_fit_their_limit(tmp_path):
    spec = write(
        tmp_path, "defaults: {framework: torch}\ngrid: {lr: [0.01, 0.02], seed: [0, 1, 2], epochs: [5, 6]}\n"
    )
    packing = pack_jobs(plan_jobs(SubmitRequest(spec_file=spec)), workers=1)
    assert sorted(len(pack.members) for pack in packing.packs) == [6, 6]  # epochs split them
    for pack in packing.packs:
        assert len({member.spec.epochs for member in pack.members}) == 1
    # A group larger than a pack holds, or than one worker's share, is split.
    many = write(
        tmp_path, "defaults: {framework: torch}\ngrid: {seed: " + str(list(range(1200))) + "}\n", "many.yaml"
    )
    planned = plan_jobs(SubmitRequest(spec_file=many))
    assert [len(pack.members) for pack in pack_jobs(planned, workers=1).packs] == [MAX_PACK_JOBS, 200]
    assert [len(pack.members) for pack in pack_jobs(planned, workers=4).packs] == [300] * 4


def jobs_by_id(report: dict) -> dict[str, dict]:
    return {job["id"]: job for job in report["jobs"]}


@pytest.mark.slow
def test_a_packed_sweep_records_every_job_as_the_unpacked_sweep_does(ray_session, tmp_path):
    spec = write(tmp_path, SWEEP)
    packed = run_cli(["submit", str(spec)], tmp_path / "packed")
    assert packed.exit_code == 0, packed.stderr
    assert "packed 32 of 32 job(s) into" in packed.stderr
    alone = run_cli(["submit", str(spec), "--set", "packing=off"], tmp_path / "alone")
    assert alone.exit_code == 0, alone.stderr
    assert "job(s) into" not in alone.stderr
    assert packed.report()["summary"]["packed_jobs"] == 32 and alone.report()["summary"]["packs"] == 0
    packed_jobs, alone_jobs = jobs_by_id(packed.report()), jobs_by_id(alone.report())
    assert packed_jobs.keys() == alone_jobs.keys() and len(packed_jobs) == 32  # packing leaves ids alone
    for job_id, job in packed_jobs.items():
        other = alone_jobs[job_id]
        assert job["status"] == other["status"] == "succeeded"
        assert job["convergence"] == other["convergence"]
        tolerance = TOLERANCE[job["config"]["dtype"]]
        history, other_history = job["loss"]["history"], other["loss"]["history"]
        np.testing.assert_allclose(history, other_history, rtol=tolerance, atol=tolerance / 10)
        assert job["loss"]["final"] == pytest.approx(other["loss"]["final"], rel=tolerance)
        output, other_output = job["predictions"][0]["output"], other["predictions"][0]["output"]
        assert output == pytest.approx(other_output, rel=tolerance, abs=tolerance / 10)
        pack = job["timings"]["pack"]
        assert pack["size"] >= 2 and pack["vectorised"] and pack["share"] == pytest.approx(1 / pack["size"])
        assert job["timings"]["train_s"] == pytest.approx(pack["train_s"] / pack["size"])
        assert "pack" not in other["timings"]
    # The pack's output is kept once, under its own name, and `runjobs logs` finds it for each member.
    assert any(path.name.startswith("pack-") for path in (tmp_path / "packed" / "logs").iterdir())
    job_id, job = next(iter(packed_jobs.items()))
    shown = run_cli(["logs", str(tmp_path / "packed"), job_id])
    assert shown.exit_code == 0, shown.stderr
    assert f"trained in {job['timings']['pack']['id']}" in shown.stdout and "trained together" in shown.stdout


@pytest.mark.slow
def test_a_diverging_member_is_its_own_record_beside_converged_pack_mates(ray_session, tmp_path):
    spec = write(
        tmp_path,
        "defaults: {framework: torch, optimizer: sgd, epochs: 200}\n"
        "grid: {lr: [0.0000001, 100.0, 0.0000002]}\n",
    )
    result = run_cli(["submit", str(spec), "--max-concurrent", "1"], tmp_path / "run")  # one pack
    assert result.exit_code == 0, result.stderr
    jobs = sorted(result.report()["jobs"], key=lambda job: job["config"]["lr"])
    assert {job["timings"]["pack"]["id"] for job in jobs} == {jobs[0]["timings"]["pack"]["id"]}
    assert [job["status"] for job in jobs] == ["succeeded"] * 3
    assert jobs[2]["convergence"] == "diverged"
    assert jobs[0]["convergence"] != "diverged" and jobs[1]["convergence"] != "diverged"
    assert all(np.isfinite(jobs[index]["loss"]["final"]) for index in (0, 1))


LONG_PACK = (
    "defaults: {framework: torch, epochs: 4000, batch_size: 4}\ngrid: {lr: [0.01, 0.02], seed: [0, 1, 2]}\n"
)


def statuses(output) -> dict[str, tuple[str, int]]:
    with Ledger.open(output, for_writing=False) as ledger:
        return {job.id: (job.status, job.attempts) for job in ledger.jobs()}


def wait_until_running(output, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while not (output / "ledger.sqlite").exists() or "running" not in {
        status for status, _ in statuses(output).values()
    }:
        assert time.monotonic() < deadline, "the pack never started"
        time.sleep(0.2)
    time.sleep(2)  # well into the pack's training


@pytest.mark.slow
def test_a_driver_killed_inside_a_pack_is_rerun_to_every_job_succeeding_exactly_once(tmp_path):
    spec = write(tmp_path, LONG_PACK)
    output = tmp_path / "run"
    command = [RUNJOBS, "submit", str(spec), "--output", str(output), "--max-concurrent", "1"]
    driver = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_until_running(output)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    before = statuses(output)
    assert len(before) == 6 and all(status == "running" for status, _ in before.values())
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "packed 6 of 6 job(s) into 1 pack(s)" in rerun.stderr
    after = statuses(output)
    assert {status for status, _ in after.values()} == {"succeeded"} and len(after) == 6


@pytest.mark.slow
def test_a_cancelled_pack_records_every_member_and_a_rerun_finishes_them(tmp_path):
    spec = write(tmp_path, LONG_PACK)
    output = tmp_path / "run"
    args = ["submit", str(spec), "--output", str(output), "--max-concurrent", "1"]
    with started_like_a_scheduler(args) as driver:
        wait_until_running(output)
        cancelled = subprocess.run(
            [RUNJOBS, "cancel", str(output)], capture_output=True, text=True, timeout=120
        )
        assert cancelled.returncode == 0, cancelled.stderr
        driver.wait(timeout=120)
    assert {status for status, _ in statuses(output).values()} == {"cancelled"}
    rerun = subprocess.run([RUNJOBS, *args], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert {status for status, _ in statuses(output).values()} == {"succeeded"}


def test_a_long_jobs_record_keeps_its_history_at_the_epochs_it_names():
    import time as clock

    from jobs.plan.spec import make_spec
    from workers.data import load_dataset
    from workers.entry import MAX_HISTORY_EPOCHS, run_job

    dataset = load_dataset("article")
    long = run_job(make_spec({"framework": "torch", "epochs": 150}).for_worker(), dataset, clock.time())
    epochs = long["history_epochs"]
    assert len(epochs) == MAX_HISTORY_EPOCHS and epochs[0] == 1 and epochs[-1] == 150
    assert epochs == sorted(set(epochs))
    for series in (long["loss"]["history"], long["history"]["epoch_s"], long["history"]["weights"]):
        assert len(series) == MAX_HISTORY_EPOCHS
    # The last kept value is the last epoch's: the final parameters, in the data's units.
    assert long["history"]["weights"][-1] == pytest.approx(long["params"]["weights"], rel=1e-9)
    short = run_job(make_spec({"framework": "torch", "epochs": 60}).for_worker(), dataset, clock.time())
    assert "history_epochs" not in short and len(short["loss"]["history"]) == 60


@pytest.mark.slow
def test_a_pack_past_its_timeout_records_every_member_timed_out(ray_session, tmp_path):
    spec = write(tmp_path, LONG_PACK.replace("epochs: 4000", "epochs: 100000, timeout_s: 3"))
    result = run_cli(["submit", str(spec), "--max-concurrent", "1"], tmp_path / "run")
    assert result.exit_code == 1, result.stderr
    jobs = result.report()["jobs"]
    assert len(jobs) == 6 and {job["status"] for job in jobs} == {"cancelled"}
    assert all(job["error"] == "timed out after 3s (timeout_s)" for job in jobs)


@pytest.mark.slow
def test_a_packed_sweep_saves_every_members_model(ray_session, tmp_path):
    spec = write(
        tmp_path, "defaults: {framework: torch, epochs: 100, save_models: true}\ngrid: {lr: [0.01, 0.02]}\n"
    )
    result = run_cli(["submit", str(spec), "--max-concurrent", "1"], tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    jobs = result.report()["jobs"]
    assert {job["timings"]["pack"]["size"] for job in jobs} == {2}
    for job in jobs:
        shown = run_cli(
            ["predict", str(tmp_path / "run" / "models" / job["id"]), "--input", "1800", "--json"]
        )
        assert shown.exit_code == 0, shown.stderr
        assert json.loads(shown.stdout)[0]["output"] == pytest.approx(
            job["predictions"][0]["output"], rel=1e-5
        )


def test_packing_off_in_a_spec_file_is_the_word_yaml_reads_as_false(tmp_path):
    spec = write(tmp_path, "defaults: {framework: torch, packing: off}\ngrid: {seed: [0, 1, 2]}\n")
    shown = run_cli(["submit", str(spec), "--dry-run"], tmp_path / "run")
    assert shown.exit_code == 0, shown.stderr
    assert "0 pack(s) of 0 job(s), 3 job(s) alone" in shown.stdout and "(packing: off)" in shown.stdout
    refused = run_cli(
        ["submit", str(write(tmp_path, "defaults: {packing: sometimes}\n", "bad.yaml")), "--dry-run"]
    )
    assert refused.exit_code == 2 and "packing='sometimes': choose one of auto, off" in refused.stderr
