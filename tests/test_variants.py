"""Multi-device variants on a real 2-CPU Ray: tf.distribute and DDP learn what one device learns."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.helpers import kill_actor_once_training, ledger_state, run_cli, start_cli_in_background

pytestmark = pytest.mark.slow

ALL_VARIANTS = [
    "--variant",
    "single",
    "--variant",
    "mirrored",
    "--variant",
    "multiworker",
    "--variant",
    "ddp",
]


def by_id(report):
    return {job["id"]: job for job in report["jobs"]}


def parameters(job):
    return [*job["params"]["weights"], job["params"]["bias"]]


def assert_same_parameters(job, twin):
    for value, expected in zip(parameters(job), parameters(twin)):
        assert value == pytest.approx(expected, rel=1e-4), (job["id"], twin["id"])


def assert_nothing_left_allocated():
    import ray

    named = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)]
    assert not [name for name in named if name.startswith("runjobs:")], named
    groups = ray.util.placement_group_table().values()
    assert all(group["state"] == "REMOVED" for group in groups if group["name"].startswith("runjobs:"))


@pytest.fixture(scope="module")
def variants_run(ray_session, tmp_path_factory):
    """Every variant and its single-device twin, full batch, in one run."""
    return run_cli(
        ["submit", *ALL_VARIANTS, "--workers", "2", "--epochs", "200"], tmp_path_factory.mktemp("v") / "run"
    )


def test_every_variant_learns_what_its_single_device_twin_learns(variants_run):
    assert variants_run.exit_code == 0, variants_run.stderr
    jobs = by_id(variants_run.report())
    assert set(jobs) == {"tensorflow", "tensorflow-mirrored", "tensorflow-multiworker", "torch", "torch-ddp"}
    for variant in ("tensorflow-mirrored", "tensorflow-multiworker"):
        assert_same_parameters(jobs[variant], jobs["tensorflow"])
    assert_same_parameters(jobs["torch-ddp"], jobs["torch"])


def test_variant_records_carry_world_size_strategy_backend_and_rank_times(variants_run):
    jobs = by_id(variants_run.report())
    assert jobs["tensorflow-mirrored"]["strategy"] == "MirroredStrategy"
    assert len(jobs["tensorflow-mirrored"]["placement"]["devices"]) == 2
    assert jobs["tensorflow-multiworker"]["strategy"] == "MultiWorkerMirroredStrategy"
    assert jobs["torch-ddp"]["backend"] == "gloo"
    for job_id in ("tensorflow-mirrored", "tensorflow-multiworker", "torch-ddp"):
        job = jobs[job_id]
        assert job["world_size"] == 2 and job["workers"] == 2
        assert job["timings"]["setup_s"] > 0
        speed = job["speed_vs_single"]
        assert speed["job"] == job_id.split("-")[0]
        assert speed["train_time_ratio"] == pytest.approx(
            job["timings"]["train_s"] / jobs[speed["job"]]["timings"]["train_s"]
        )
    for job_id in ("tensorflow-multiworker", "torch-ddp"):
        assert len(jobs[job_id]["timings"]["rank_train_s"]) == 2
        assert len(jobs[job_id]["placement"]["workers"]) == 2
    assert jobs["torch"]["speed_vs_single"] is None


def test_a_variant_slower_than_its_twin_is_warned_about(variants_run):
    report = variants_run.report()
    slower = [
        job["id"] for job in report["jobs"] if (job["speed_vs_single"] or {}).get("train_time_ratio", 0) > 1
    ]
    assert slower, "on a 2-parameter model the distributed variants are expected to be slower"
    for job_id in slower:
        assert any(message.startswith(f"{job_id} (") for message in report["warnings"])
        assert f"warning: {job_id} (" in variants_run.stdout


def test_every_rank_keeps_its_output(variants_run):
    kept = {path.name for path in (variants_run.output_dir / "logs").iterdir()}
    for job_id in ("torch-ddp", "tensorflow-multiworker"):
        assert {
            f"{job_id}.rank0.out",
            f"{job_id}.rank1.out",
            f"{job_id}.rank0.err",
            f"{job_id}.rank1.err",
        } <= kept
    rank1 = (variants_run.output_dir / "logs" / "torch-ddp.rank1.out").read_text()
    assert "runjobs: torch ddp job, rank 1 of 2" in rank1


def test_nothing_stays_allocated_after_a_run(variants_run):
    assert_nothing_left_allocated()


def test_the_batch_size_is_global_and_split_over_the_workers(ray_session, tmp_path):
    # --batch-size 4 on 10 rows: 3 steps an epoch of 4, 4 and 2 rows, each worker taking
    # half of every global batch; the same shuffled order as the single-device job.
    result = run_cli(
        ["submit", "--variant", "single", "--variant", "mirrored", "--variant", "ddp", "--workers", "2",
         "--batch-size", "4", "--epochs", "40"],
        tmp_path / "run",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    jobs = by_id(result.report())
    assert jobs["torch-ddp"]["config"]["batch_size"] == 4
    assert_same_parameters(jobs["torch-ddp"], jobs["torch"])
    assert_same_parameters(jobs["tensorflow-mirrored"], jobs["tensorflow"])


def test_a_killed_worker_fails_its_job_not_the_run_and_frees_its_devices(ray_session, tmp_path):
    output = tmp_path / "run"
    # Long enough for rank 1 to be killed mid-training; the torch single job runs beside it.
    args = ["submit", "--framework", "torch", "--variant", "single", "--variant", "ddp", "--workers", "2",
            "--epochs", "30000", "--set", "setup_timeout_s=20"]  # fmt: skip
    runner, results = start_cli_in_background(args, output)
    kill_actor_once_training("runjobs:torch-ddp:rank1", settle_s=5)
    killed_at = time.monotonic()
    while ledger_state(output, "torch-ddp") != "failed":
        assert time.monotonic() - killed_at < 20, "the job was not failed within its collective timeout"
        time.sleep(0.1)
    runner.join(timeout=300)
    assert not runner.is_alive()

    result = results["run"]
    assert result.exit_code == 1
    jobs = by_id(result.report())
    assert jobs["torch-ddp"]["status"] == "failed"
    assert "ActorDiedError" in jobs["torch-ddp"]["error"] or "died" in jobs["torch-ddp"]["error"]
    assert jobs["torch"]["status"] == "succeeded"
    assert_nothing_left_allocated()


def test_a_job_larger_than_the_cluster_is_refused_before_anything_starts(ray_session, tmp_path):
    result = run_cli(["submit", "--variant", "ddp", "--workers", "3"], tmp_path / "run")
    assert result.exit_code == 2
    assert "a 3-worker ddp job needs 3 CPU(s), one a worker" in result.stderr
    assert "has 2" in result.stderr and "--workers 2 or fewer" in result.stderr
    assert not result.output_dir.exists()


def test_a_peer_that_never_arrives_fails_the_rank_within_the_timeout(tmp_path):
    # Rank 0 of a 2-rank ddp job whose rank 1 never starts: joining the process group
    # must give up after setup_timeout_s with an error, not hang. Run in a fresh process
    # so this test process never imports torch.
    program = """
import sys, time
from jobs.plan.spec import JobSpec
from workers.data import article_dataset
from workers.distributed import WorkerContext, reserve_address
spec = JobSpec("torch", variant="ddp", workers=2, epochs=5, batch_size=10, setup_timeout_s=3)
context = WorkerContext(0, 2, (reserve_address(), "127.0.0.1:1"), setup_timeout_s=3)
started = time.monotonic()
try:
    from workers.entry import run_job
    run_job(spec, article_dataset(), time.time(), context)
except Exception as error:
    print(f"FAILED after {time.monotonic() - started:.1f}s: {type(error).__name__}: {error}")
    sys.exit(0)
print("no error")
"""
    finished = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert "FAILED after" in finished.stdout, finished.stdout + finished.stderr
    seconds = float(finished.stdout.split("FAILED after ")[1].split("s:")[0])
    assert seconds < 3 + 15, "the rank must give up soon after its set-up timeout"
