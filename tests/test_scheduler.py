"""The scheduling policy without Ray: events in, decisions out, time from a fake clock.

`FakeRayLayer` plays the driver's part: it carries out each decision as jobs/run/driver.py
does on Ray (a start is reported back as started, a record as kept) and remembers what a
user would see: which jobs ran where, which warm workers lived, and each job's record.
"""

from __future__ import annotations

import pytest

from jobs.plan.spec import JobSpec
from jobs.run.scheduler import (
    Failure,
    Phase,
    Placement,
    PlannedJob,
    Record,
    RetireWarmWorker,
    Run,
    Scheduler,
    Start,
    Stop,
    TrainGang,
)

# What a warm job's worker reports: 2 s to import its framework, a tenth of a second to train.
QUICK_JOB_TIMINGS = {"startup_s": 2.0, "setup_s": 0.01, "train_s": 0.08, "predict_s": 0.01}


def planned(job_id: str, framework: str = "torch", **fields) -> PlannedJob:
    return PlannedJob(job_id, JobSpec(framework, **fields), dataset=None)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeRayLayer:
    def __init__(
        self,
        jobs: list[PlannedJob],
        cpus: int = 2,
        max_concurrent: int | None = None,
        gpus: float = 0.0,
        keeps_idle: bool = False,
    ) -> None:
        self.clock = FakeClock()
        self.cpus = cpus
        self.gpus = gpus
        self.scheduler = Scheduler(
            jobs,
            cluster_cpus=lambda: self.cpus,
            cluster_gpus=lambda: self.gpus,
            clock=self.clock,
            max_concurrent=max_concurrent,
            keeps_idle=keeps_idle,
        )
        self.started: list[Run] = []  # every attempt handed to "Ray", in order
        self.warm_workers: dict[int, str] = {}  # each live warm worker's framework
        self.retired: list[int] = []
        self.stopped: list[str] = []
        self.trained: dict[str, tuple[str, ...]] = {}  # gang -> the addresses it trained with
        self.records: dict[str, Record] = {}
        self.most_running = 0
        self.most_warm_workers = 0

    def carry_out(self, decisions):
        for decision in decisions:
            if isinstance(decision, Start):
                run = decision.run
                if run.placement is Placement.NEW_WARM_WORKER:
                    assert run.warm_worker not in self.warm_workers, "a warm worker was created twice"
                    self.warm_workers[run.warm_worker] = run.job.spec.framework
                elif run.placement is Placement.IDLE_WARM_WORKER:
                    assert self.warm_workers[run.warm_worker] == run.job.spec.framework, (
                        "a worker changed framework"
                    )
                self.scheduler.job_started(run.job.id)
                self.started.append(run)
            elif isinstance(decision, TrainGang):
                self.trained[decision.run.job.id] = decision.addresses
            elif isinstance(decision, Stop):
                self.stopped.append(decision.run.job.id)
            elif isinstance(decision, RetireWarmWorker):
                del self.warm_workers[decision.worker]
                self.retired.append(decision.worker)
            elif isinstance(decision, Record):
                self.records[decision.job.id] = decision
                self.scheduler.recorded(decision.job.id, decision.status)
        self.most_running = max(self.most_running, len(self.scheduler.running))
        self.most_warm_workers = max(self.most_warm_workers, len(self.warm_workers))
        return decisions

    def step(self):
        return self.carry_out(self.scheduler.decide())

    def succeed(self, job_id: str, timings: dict[str, float] = QUICK_JOB_TIMINGS, worker_report=None):
        result = {"timings": dict(timings)}
        if worker_report is not None:
            result["placement"] = {"worker": worker_report}
        return self.carry_out(self.scheduler.job_succeeded(job_id, result))

    def fail(
        self, job_id: str, failure: Failure, error: str = "ActorDiedError: the actor died", rank: int = 0
    ):
        return self.carry_out(self.scheduler.job_failed(job_id, error, failure, rank))

    def report_addresses(self, job_id: str):
        workers = self.scheduler.running[job_id].job.spec.workers
        return self.carry_out(
            self.scheduler.addresses_reported(
                job_id, [f"10.0.0.{rank}:2900{rank}" for rank in range(workers)]
            )
        )

    def running(self) -> list[str]:
        return list(self.scheduler.running)

    def warm_frameworks(self) -> list[str]:
        return sorted(self.warm_workers.values())

    def run_to_the_end(self, timings: dict[str, float] = QUICK_JOB_TIMINGS) -> None:
        """Let every job succeed, the longest-running first, until nothing is left."""
        while self.scheduler.has_work():
            self.step()
            job_id = self.running()[0]
            if self.scheduler.running[job_id].phase is Phase.ADDRESSES:
                self.report_addresses(job_id)
            self.succeed(job_id, timings)
        assert self.scheduler.statuses() == ["succeeded"] * len(self.scheduler.jobs)


# Where jobs run.


def test_each_kind_of_job_runs_where_it_must():
    layer = FakeRayLayer(
        [
            planned("torch"),
            planned("torch-gpu", gpus_per_job=1),
            planned("tensorflow-mirrored", "tensorflow", variant="mirrored", workers=2),
            planned("tensorflow-multiworker", "tensorflow", variant="multiworker", workers=2),
        ],
        cpus=8,
        gpus=2,
    )
    layer.step()
    placements = {run.job.id: run.placement for run in layer.started}
    assert placements == {
        "torch-gpu": Placement.NEW_WARM_WORKER,
        "tensorflow-mirrored": Placement.FRESH_PROCESS,
        "tensorflow-multiworker": Placement.GANG,
        "torch": Placement.NEW_WARM_WORKER,
    }
    # Jobs outside the warm pool go first, in the order given.
    assert [run.job.id for run in layer.started][:2] == ["tensorflow-mirrored", "tensorflow-multiworker"]
    # A GPU job's worker is of its own kind: a CPU job never lands on it, nor it on a CPU worker.
    workers = {run.job.id: run.warm_worker for run in layer.started}
    assert workers["torch"] != workers["torch-gpu"]
    assert layer.scheduler.pool.kind_of_worker[workers["torch-gpu"]] == "torch gpu1"


def test_a_gang_trains_only_once_every_worker_has_reported_its_address():
    layer = FakeRayLayer([planned("torch-ddp", variant="ddp", workers=2)])
    layer.step()
    assert layer.scheduler.running["torch-ddp"].phase is Phase.ADDRESSES
    with pytest.raises(RuntimeError, match="cannot succeed while its workers report"):
        layer.succeed("torch-ddp")
    layer.report_addresses("torch-ddp")
    assert layer.trained == {"torch-ddp": ("10.0.0.0:29000", "10.0.0.1:29001")}
    assert layer.scheduler.running["torch-ddp"].phase is Phase.TRAINING
    layer.succeed("torch-ddp")
    assert layer.records["torch-ddp"].status == "succeeded"


# Retries.


def test_a_gang_whose_worker_died_is_retried_while_retries_allow_then_failed_with_its_attempts():
    layer = FakeRayLayer([planned("torch-ddp", variant="ddp", workers=2, retries=1)])
    layer.step()
    retry = layer.fail("torch-ddp", Failure.WORKER_LOST, rank=1)
    # The retry starts at once, as a new gang, and nothing is recorded yet.
    assert [(type(decision), decision.run.attempt) for decision in retry] == [(Start, 2)]
    assert retry[0].run.phase is Phase.ADDRESSES and "torch-ddp" not in layer.records
    layer.fail("torch-ddp", Failure.WORKER_LOST, rank=1)
    record = layer.records["torch-ddp"]
    assert record.status == "failed"
    assert record.error == "ActorDiedError: the actor died (worker rank 1 of 2) (after 2 attempts)"
    assert not layer.scheduler.has_work()


def test_a_warm_job_whose_worker_died_is_retried_first_on_a_new_worker():
    layer = FakeRayLayer([planned(f"torch-{seed}", seed=seed, retries=1) for seed in range(3)], cpus=1)
    layer.step()
    (first,) = layer.started
    assert first.job.id == "torch-0" and first.placement is Placement.NEW_WARM_WORKER
    assert layer.fail("torch-0", Failure.WORKER_LOST) == [RetireWarmWorker(first.warm_worker)]
    layer.step()
    retried = layer.started[-1]
    # The dead worker is replaced, and the retried job goes ahead of the jobs still queued.
    assert (retried.job.id, retried.attempt, retried.placement) == ("torch-0", 2, Placement.NEW_WARM_WORKER)
    assert retried.warm_worker != first.warm_worker
    layer.run_to_the_end()
    assert [run.attempt for run in layer.started] == [1, 2, 1, 1]


@pytest.mark.parametrize(("retry_exceptions", "attempts"), [(False, 1), (True, 2)])
def test_an_exception_in_training_code_is_retried_only_with_retry_exceptions(retry_exceptions, attempts):
    layer = FakeRayLayer([planned("torch", retries=1, retry_exceptions=retry_exceptions)])
    for _ in range(attempts):
        layer.step()
        layer.fail("torch", Failure.TRAINING_RAISED, error="ValueError: loss is nan")
    record = layer.records["torch"]
    assert record.status == "failed"
    assert record.error == "ValueError: loss is nan" + (" (after 2 attempts)" if attempts > 1 else "")
    assert len(layer.started) == attempts


# Deadlines.


def test_a_job_past_its_timeout_is_cancelled_and_its_worker_replaced():
    layer = FakeRayLayer([planned("torch-slow", timeout_s=3), planned("torch-next")], cpus=1)
    layer.step()
    slow_worker = layer.started[0].warm_worker
    layer.clock.advance(2.5)
    assert layer.carry_out(layer.scheduler.check_deadlines()) == []
    assert layer.scheduler.seconds_to_next_deadline() == pytest.approx(0.5)
    layer.clock.advance(0.5)
    layer.carry_out(layer.scheduler.check_deadlines())
    record = layer.records["torch-slow"]
    assert (record.status, record.error) == ("cancelled", "timed out after 3s (timeout_s)")
    assert record.total_s == pytest.approx(3.0)
    assert layer.stopped == ["torch-slow"] and slow_worker in layer.retired
    layer.step()
    assert layer.started[-1].job.id == "torch-next" and layer.started[-1].warm_worker != slow_worker


def test_the_timeout_counts_from_the_start_not_from_the_queue():
    layer = FakeRayLayer([planned("torch-first"), planned("torch-timed", timeout_s=3)], cpus=1)
    layer.step()
    layer.clock.advance(10)
    layer.succeed("torch-first")
    layer.step()
    assert layer.carry_out(layer.scheduler.check_deadlines()) == []
    assert layer.scheduler.seconds_to_next_deadline() == pytest.approx(3.0)


# Cancel (Ctrl-C, SIGTERM or `runjobs cancel`).


def test_cancel_stops_the_running_jobs_and_records_the_never_started_ones():
    jobs = [planned(f"torch-{seed}", seed=seed) for seed in range(4)]
    layer = FakeRayLayer(jobs, max_concurrent=1)
    layer.step()
    layer.succeed("torch-0")
    layer.step()
    assert layer.running() == ["torch-1"]
    cancellation = layer.scheduler.cancel("cancelled: runjobs cancel")
    layer.carry_out(cancellation.decisions)
    assert (cancellation.running, cancellation.pending) == (1, 2)
    assert layer.stopped == ["torch-1"] and not layer.warm_workers
    assert layer.scheduler.statuses() == ["succeeded", "cancelled", "cancelled", "cancelled"]
    assert {layer.records[job.id].error for job in jobs[1:]} == {"cancelled: runjobs cancel"}
    assert not layer.scheduler.has_work() and layer.step() == []


def test_cancel_records_a_job_whose_record_never_reached_the_ledger():
    layer = FakeRayLayer([planned("torch")])
    layer.step()
    # The interrupt came after the job ended but before its record was kept.
    (lost,) = layer.scheduler.job_succeeded("torch", {"timings": QUICK_JOB_TIMINGS})
    cancellation = layer.scheduler.cancel("cancelled: the run was interrupted")
    layer.carry_out(cancellation.decisions)
    assert isinstance(lost, Record) and (cancellation.running, cancellation.pending) == (0, 1)
    assert layer.scheduler.statuses() == ["cancelled"]


# The warm-worker pool.


def test_two_cpus_and_both_frameworks_pending_start_one_warm_worker_of_each():
    jobs = [
        planned(f"{framework}-{seed}", framework, seed=seed)
        for framework in ("tensorflow", "torch")
        for seed in range(3)
    ]
    layer = FakeRayLayer(jobs, cpus=2)
    layer.step()
    assert layer.warm_frameworks() == ["tensorflow", "torch"]
    assert all(run.placement is Placement.NEW_WARM_WORKER for run in layer.started)
    layer.run_to_the_end()
    # Each framework's jobs ran on its one worker: every import was paid once.
    assert len({run.warm_worker for run in layer.started}) == 2 and layer.most_warm_workers == 2


def test_two_versions_of_a_user_model_never_share_a_warm_worker(tmp_path):
    builder = "def build_torch(features, config):\n    return None  # {}\n"
    first, second = tmp_path / "first.py", tmp_path / "second.py"
    first.write_text(builder.format("first"))
    second.write_text(builder.format("second"))
    jobs = [
        planned(f"{path.stem}-{seed}", model=str(path), seed=seed)
        for path in (first, second)
        for seed in (0, 1)
    ]
    layer = FakeRayLayer(jobs, cpus=4)
    layer.run_to_the_end()
    workers_of = {
        path.stem: {run.warm_worker for run in layer.started if run.job.id.startswith(path.stem)}
        for path in (first, second)
    }
    # A user's code runs inside its worker and may change the process: another file's jobs
    # (or another version's) get workers of their own.
    assert workers_of["first"] and workers_of["second"] and not workers_of["first"] & workers_of["second"]


def test_a_framework_with_nothing_left_to_run_retires_its_idle_workers():
    layer = FakeRayLayer(
        [planned("tensorflow", "tensorflow"), planned("torch-0"), planned("torch-1", seed=1)]
    )
    layer.step()
    assert layer.warm_frameworks() == ["tensorflow", "torch"]
    (tensorflow_worker,) = [run.warm_worker for run in layer.started if run.job.id == "tensorflow"]
    layer.succeed("tensorflow")
    # Its CPU is not kept for TensorFlow; torch's one queued job waits for its own worker.
    assert layer.step() == [RetireWarmWorker(tensorflow_worker)]
    assert layer.warm_frameworks() == ["torch"]


def test_while_a_search_may_ask_for_more_an_idle_worker_waits_for_its_frameworks_next_trial():
    layer = FakeRayLayer([planned("tensorflow", "tensorflow"), planned("torch-0")])
    layer.scheduler.more_to_come = 10  # a search with 10 trials still to ask for
    layer.step()
    layer.succeed("tensorflow")
    layer.succeed("torch-0")
    # Nothing queued, but trials will come: both workers stay rather than import again.
    assert layer.step() == [] and layer.warm_frameworks() == ["tensorflow", "torch"]
    layer.scheduler.add([planned("torch-1", seed=1)])
    (start,) = layer.step()
    assert start.run.placement is Placement.IDLE_WARM_WORKER
    # Two trials at once, one of each framework: each goes to its framework's idle worker.
    layer.succeed("torch-1")
    layer.scheduler.add([planned("tensorflow-1", "tensorflow", seed=1), planned("torch-2", seed=2)])
    assert {run.placement for run in (decision.run for decision in layer.step())} == {
        Placement.IDLE_WARM_WORKER
    }
    layer.succeed("tensorflow-1")
    layer.succeed("torch-2")
    layer.scheduler.more_to_come = 0  # the search has asked for its last trial
    assert {type(decision) for decision in layer.step()} == {RetireWarmWorker}
    assert layer.warm_workers == {}


def test_a_gang_waiting_for_its_cpus_keeps_the_pool_small_and_gets_them_as_idle_workers_retire():
    jobs = [
        planned("torch-ddp", variant="ddp", workers=2),
        *(
            planned(f"{framework}-{seed}", framework, seed=seed)
            for framework in ("tensorflow", "torch")
            for seed in range(2)
        ),
    ]
    layer = FakeRayLayer(jobs, cpus=2)
    layer.step()
    # The gang holds (or waits for) both CPUs: one warm worker at a time, not one per framework.
    assert layer.started[0].placement is Placement.GANG and layer.warm_frameworks() == ["tensorflow"]
    for job_id in ("tensorflow-0", "tensorflow-1", "torch-0", "torch-1"):
        layer.succeed(job_id)
        layer.step()
    assert layer.most_warm_workers == 1
    # Every warm job is done: no idle warm worker keeps a CPU the gang is waiting for.
    assert layer.warm_workers == {} and layer.running() == ["torch-ddp"]
    assert layer.scheduler.running["torch-ddp"].phase is Phase.ADDRESSES


def test_idle_warm_workers_beyond_the_cluster_cpus_are_retired():
    layer = FakeRayLayer([planned(f"torch-{seed}", seed=seed) for seed in range(8)], cpus=4)
    layer.step()
    assert layer.warm_frameworks() == ["torch"] * 4
    layer.cpus = 2  # a node left the cluster
    layer.succeed("torch-0")
    layer.succeed("torch-1")
    decisions = layer.step()
    assert [type(decision) for decision in decisions] == [RetireWarmWorker, RetireWarmWorker]
    assert len(layer.warm_workers) == 2


@pytest.mark.parametrize(
    ("train_s", "replaced"),
    [(0.08, False), (5.0, True)],
    ids=["queue-shorter-than-a-start-up", "queue-longer-than-a-start-up"],
)
def test_after_the_first_job_a_worker_is_added_only_while_the_queue_outlasts_its_start_up(train_s, replaced):
    layer = FakeRayLayer([planned(f"torch-{seed}", seed=seed) for seed in range(5)], cpus=2)
    layer.step()
    assert len(layer.warm_workers) == 2  # before any job has ended, imports run in parallel
    layer.succeed("torch-0", {"startup_s": 2.0, "train_s": train_s})
    layer.fail("torch-1", Failure.TRAINING_RAISED, error="ValueError: loss is nan")
    layer.step()
    # torch-1's worker is ended; with 2 jobs queued, is a new one worth its 2 s import?
    assert (len(layer.warm_workers) == 2) == replaced


# --max-concurrent.


@pytest.mark.parametrize("max_concurrent", [1, 2])
def test_max_concurrent_caps_the_running_jobs_and_the_warm_workers(max_concurrent):
    jobs = [
        planned("tensorflow-mirrored", "tensorflow", variant="mirrored", workers=2),
        *(
            planned(f"{framework}-{seed}", framework, seed=seed)
            for framework in ("tensorflow", "torch")
            for seed in range(3)
        ),
    ]
    layer = FakeRayLayer(jobs, cpus=8, max_concurrent=max_concurrent)
    layer.step()
    assert layer.started[0].job.id == "tensorflow-mirrored"
    layer.run_to_the_end()
    assert layer.most_running == max_concurrent
    assert layer.most_warm_workers <= max_concurrent


def test_without_max_concurrent_every_cpu_gets_a_job():
    jobs = [
        planned(f"{framework}-{seed}", framework, seed=seed)
        for framework in ("tensorflow", "torch")
        for seed in range(3)
    ]
    layer = FakeRayLayer(jobs, cpus=4)
    layer.step()
    assert len(layer.running()) == 4 and len(layer.warm_workers) == 4


# Warm GPU workers.


def test_one_gpu_jobs_share_at_most_as_many_warm_workers_as_there_are_gpus():
    jobs = [planned(f"{framework}-{index}", framework, gpus_per_job=1, seed=index)
            for framework in ("torch", "tensorflow") for index in range(8)]  # fmt: skip
    layer = FakeRayLayer(jobs, cpus=8, gpus=2)
    gpus_held = []

    def held():
        gpus_held.append(len(layer.warm_workers))

    while layer.scheduler.has_work():
        layer.step()
        held()
        layer.succeed(layer.running()[0])
    assert layer.scheduler.statuses() == ["succeeded"] * 16
    assert max(gpus_held) <= 2, "never more one-GPU workers than GPUs"
    per_framework: dict[str, set[int]] = {}
    for run in layer.started:
        per_framework.setdefault(run.job.spec.framework, set()).add(run.warm_worker)
    assert all(len(workers) <= 2 for workers in per_framework.values()), per_framework


def test_a_gpu_worker_whose_framework_holds_too_much_device_memory_is_replaced():
    layer = FakeRayLayer([planned(f"tensorflow-{index}", "tensorflow", gpus_per_job=1, seed=index)
                          for index in range(3)], cpus=4, gpus=1)  # fmt: skip
    gib = 2**30
    layer.step()
    first = layer.started[0].warm_worker
    # A stand-in for the worker's memory probe: 3 GiB held of a 16 GiB GPU, under the bound.
    layer.succeed(
        layer.running()[0],
        worker_report={"device_ok": True, "device_memory": {"in_use": 3 * gib, "total": 16 * gib}},
    )
    layer.step()
    assert layer.started[1].warm_worker == first, "under the bound: the worker takes the next job"
    # 9 GiB of 16 is past half of its share: replaced before the next job.
    decisions = layer.succeed(
        layer.running()[0],
        worker_report={"device_ok": True, "device_memory": {"in_use": 9 * gib, "total": 16 * gib}},
    )
    assert RetireWarmWorker(first) in decisions
    layer.step()
    assert layer.started[2].warm_worker != first
    assert layer.started[2].placement is Placement.NEW_WARM_WORKER


def test_a_gpu_worker_whose_device_failed_its_check_is_replaced():
    layer = FakeRayLayer([planned(f"torch-{index}", gpus_per_job=0.5, seed=index) for index in range(2)],
                         cpus=1, gpus=1)  # fmt: skip
    layer.step()
    first = layer.started[0].warm_worker
    layer.succeed(
        layer.running()[0],
        worker_report={"device_ok": False, "device_error": "CUDA error: an illegal memory access"},
    )
    layer.step()
    assert layer.started[1].warm_worker != first


# A pool that outlives the run (jobs/run/warm_pool.py).


def test_a_kept_pool_keeps_idle_workers_until_a_job_needs_their_cpus():
    layer = FakeRayLayer([planned("torch-ddp", variant="ddp", workers=2)], cpus=2, keeps_idle=True)
    adopted = [layer.scheduler.adopt("tensorflow"), layer.scheduler.adopt("torch")]
    for worker, kind in zip(adopted, ["tensorflow", "torch"]):
        layer.warm_workers[worker] = kind
    decisions = layer.step()
    # The gang waits for both CPUs: both idle workers give theirs back.
    assert (
        sorted(decision.worker for decision in decisions if isinstance(decision, RetireWarmWorker)) == adopted
    )


def test_a_kept_pool_keeps_an_idle_worker_of_a_framework_with_nothing_left():
    layer = FakeRayLayer([planned("torch-1"), planned("tensorflow-1", "tensorflow")], cpus=4, keeps_idle=True)
    layer.step()
    layer.succeed("torch-1")
    layer.step()
    assert "torch" in layer.warm_frameworks(), "kept for the next run, not ended"
    layer.succeed("tensorflow-1")
    assert layer.warm_frameworks() == ["tensorflow", "torch"]


def test_a_kept_pool_gives_an_idle_worker_to_a_framework_with_none():
    layer = FakeRayLayer([planned("tensorflow-1", "tensorflow")], cpus=1, keeps_idle=True)
    worker = layer.scheduler.adopt("torch")
    layer.warm_workers[worker] = "torch"
    layer.step()
    assert layer.retired == [worker]
    assert layer.started[0].placement is Placement.NEW_WARM_WORKER


def test_a_kept_pool_gives_idle_cpu_workers_cpus_to_gpu_jobs():
    layer = FakeRayLayer([planned("torch-gpu", gpus_per_job=1)], cpus=2, gpus=2, keeps_idle=True)
    adopted = [layer.scheduler.adopt("tensorflow"), layer.scheduler.adopt("torch")]
    for worker, kind in zip(adopted, ["tensorflow", "torch"]):
        layer.warm_workers[worker] = kind
    layer.step()
    assert sorted(layer.retired) == sorted(adopted), "idle workers with nothing queued give up their CPUs"
    assert layer.running() == ["torch-gpu"]


def test_a_kept_pool_retires_an_idle_worker_while_another_kind_has_jobs_queued():
    # Two runs on one cluster, each keeping an idle worker of a finished framework while its
    # other framework's new worker waited for a CPU, would wait for each other for ever.
    jobs = [planned("tensorflow-1", "tensorflow"), planned("torch-1"), planned("torch-2", seed=1)]
    layer = FakeRayLayer(jobs, cpus=2, keeps_idle=True)
    layer.step()
    tensorflow_worker = next(
        run.warm_worker for run in layer.started if run.job.spec.framework == "tensorflow"
    )
    layer.succeed("tensorflow-1")
    layer.step()
    assert tensorflow_worker in layer.retired, "its CPU goes to the queued torch job"
    layer.run_to_the_end()
    assert layer.warm_frameworks() == ["torch"], "once nothing waits, an idle worker is kept for the next run"


def test_a_pack_is_one_job_to_the_policy_and_every_member_has_a_status():
    """A pack (jobs/plan/packing.py) runs and is cancelled as one job; each member is recorded."""
    members = tuple(planned(f"torch-{index}", seed=index) for index in range(3))
    pack = PlannedJob("pack-torch-1", members[0].spec, None, members=members)
    alone = planned("tensorflow", framework="tensorflow")
    scheduler = Scheduler([pack, alone], cluster_cpus=lambda: 2, clock=FakeClock())
    starts = [decision for decision in scheduler.decide() if isinstance(decision, Start)]
    assert sorted(start.run.job.id for start in starts) == ["pack-torch-1", "tensorflow"]
    for start in starts:
        scheduler.job_started(start.run.job.id)
    (record,) = [d for d in scheduler.job_succeeded("pack-torch-1", {}) if isinstance(d, Record)]
    assert record.job is pack and record.status == "succeeded"
    for member in members:  # the driver keeps each member's own record
        scheduler.recorded(member.id, "succeeded")
    scheduler.recorded(members[1].id, "succeeded")  # an interrupted delivery, kept again: harmless
    cancellation = scheduler.cancel("cancelled: test")
    assert (cancellation.running, cancellation.pending) == (1, 0)
    scheduler.recorded("tensorflow", "cancelled")
    assert scheduler.statuses() == ["succeeded", "succeeded", "succeeded", "cancelled"]


def test_a_pack_cancelled_while_it_runs_counts_every_member():
    members = tuple(planned(f"torch-{index}", seed=index) for index in range(4))
    pack = PlannedJob("pack-torch-2", members[0].spec, None, members=members)
    scheduler = Scheduler([pack], cluster_cpus=lambda: 2, clock=FakeClock())
    (start,) = scheduler.decide()
    scheduler.job_started(start.run.job.id)
    cancellation = scheduler.cancel("cancelled: test")
    assert (cancellation.running, cancellation.pending) == (4, 0)
    (record,) = [d for d in cancellation.decisions if isinstance(d, Record)]
    assert record.job is pack and record.status == "cancelled"
