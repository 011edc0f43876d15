"""cluster/slurm-sweep.sbatch under a real one-node Slurm that this module starts.

Debian's slurm-wlm and munge (installed with apt-get where missing, as the Chromium
fixture does; skipped where that cannot be done) run as this module's own child
processes: munged on a socket and key of its own, slurmctld and slurmd in the foreground
with a slurm.conf in a temporary directory, on free ports. Every Slurm command gets
SLURM_CONF pointing at it, and jobs go in with `sbatch` as a user submits them. At the
end the daemons are ended by the handles that started them, after every job is gone.

What a user of the script would notice: a cancelled allocation records its running jobs
cancelled and leaves a --json summary, and a re-submission (or a requeue after the
driver is killed) runs only what had not finished; the first job runs within 10 s of
the allocation's start; on several nodes nothing is submitted before every raylet has
joined, and a node that never joins ends the job with exit 3.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from tests.helpers import RayNode, free_port, ledger_states, load_strict_json

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parents[1]
SCRIPT = REPOSITORY / "cluster" / "slurm-sweep.sbatch"
VENV = Path(sys.executable).parent.parent  # not resolved: the venv, not the interpreter it links to
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scancel", "scontrol", "squeue", "sinfo")
# Each torch job trains for about 3 s here: a cancel lands while one runs.
# packing off: these tests cancel and kill between one job finished and the next running.
SWEEP = (
    "name: slurm\ndefaults: {{framework: torch, epochs: 30000, packing: off}}\ngrid: {{seed: [{seeds}]}}\n"
)


def find_command(name: str) -> str | None:
    """A command on PATH, or in the sbin directories a non-login root PATH may lack."""
    return shutil.which(name) or next(
        (str(path) for path in (Path("/usr/sbin") / name, Path("/sbin") / name) if path.exists()), None
    )


def install_slurm() -> None:
    """Debian's slurm-wlm and munge, installed where missing; skips the module where that fails."""
    if all(find_command(name) for name in DAEMONS + CLIENTS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no Slurm, and not root with apt-get to install Debian's slurm-wlm and munge")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    started = time.monotonic()
    for command in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"],
    ):
        result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900)
        if result.returncode != 0:
            pytest.skip(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")
    print(f"installed slurm-wlm and munge in {time.monotonic() - started:.0f}s")
    missing = [name for name in DAEMONS + CLIENTS if not find_command(name)]
    if missing:
        pytest.skip(f"apt-get installed slurm-wlm and munge but {', '.join(missing)} cannot be found")


class SlurmCluster:
    """munged, slurmctld and slurmd for one node named localhost, all in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.conf = directory / "slurm.conf"
        self.environment = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: list[subprocess.Popen] = []
        self.job_ids: list[str] = []

    def start(self) -> None:
        directory = self.directory
        munge = directory / "munge"
        munge.mkdir(mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.socket = munge / "munge.socket"
        for name in ("state", "spool"):
            (directory / name).mkdir()
        cpus = len(os.sched_getaffinity(0))
        self.conf.write_text(
            f"""\
ClusterName=runjobs-test
SlurmctldHost=localhost
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={directory}/state
SlurmdSpoolDir={directory}/spool
SlurmctldPidFile={directory}/slurmctld.pid
SlurmdPidFile={directory}/slurmd.pid
SlurmctldLogFile={directory}/slurmctld.log
SlurmdLogFile={directory}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=30
NodeName=localhost NodeHostname=localhost CPUs={cpus} RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
        )
        self._start(
            find_command("munged"), "--foreground", "--force", f"--socket={self.socket}",
            f"--key-file={key}", f"--log-file={munge}/munged.log", f"--pid-file={munge}/munged.pid",
            f"--seed-file={munge}/munged.seed",
        )  # fmt: skip
        wait_until(self.socket.exists, 15, "munged never made its socket")
        self._start(find_command("slurmctld"), "-D", "-i")
        self._start(find_command("slurmd"), "-D", "-N", "localhost")
        wait_until(lambda: self.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle", 60, self.describe)

    def _start(self, *command: str) -> None:
        log = (self.directory / f"{Path(command[0]).name}.out").open("w")
        self.daemons.append(
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.environment)
        )
        log.close()

    def describe(self) -> str:
        """The daemons' own output, for a failure message."""
        return "Slurm did not come up:\n" + "\n".join(
            path.read_text()[-2000:] for path in sorted(self.directory.glob("*.out"))
        )

    def run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, env=self.environment, timeout=60)

    def sbatch(self, log: Path, *arguments: str, environment: dict | None = None) -> str:
        """Submit the script as a user does, from the repository; returns the job id."""
        result = subprocess.run(
            ["sbatch", "--parsable", f"--output={log}", f"--chdir={REPOSITORY}", str(SCRIPT), *arguments],
            capture_output=True, text=True, timeout=60,
            env={**self.environment, "RUNJOBS_VENV": str(VENV), **(environment or {})},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        job_id = result.stdout.strip().split(";")[0]
        self.job_ids.append(job_id)
        return job_id

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job`'s fields (JobState, ExitCode, StartTime, Restarts, ...)."""
        result = self.run("scontrol", "show", "job", "-o", job_id)
        assert result.returncode == 0, result.stderr
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def in_queue(self, job_id: str) -> bool:
        return bool(self.run("squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip())

    def wait_until_ended(self, job_id: str, limit_s: float = 180) -> dict[str, str]:
        wait_until(lambda: not self.in_queue(job_id), limit_s, f"job {job_id} did not end")
        return self.job(job_id)

    def processes_of(self, job_ids: list[str]) -> list[int]:
        """Pids still running for these jobs (their environment names the job and this cluster)."""
        wanted = {f"SLURM_JOB_ID={job_id}".encode() for job_id in job_ids}
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                variables = set((entry / "environ").read_bytes().split(b"\0"))
            except OSError:
                continue
            if f"SLURM_CONF={self.conf}".encode() in variables and variables & wanted:
                found.append(int(entry.name))
        return found

    def assert_nothing_left(self, *job_ids: str) -> None:
        """Every process of these jobs (the script, Ray's head and workers, the driver) has ended."""
        deadline = time.monotonic() + 15
        while (left := self.processes_of(list(job_ids))) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"still running after job(s) {job_ids} ended: {describe_processes(left)}"

    def stop(self) -> None:
        """Cancel what is left, then end the daemons by their handles; kill any job process left by pid."""
        queued = self.run("squeue", "-h", "-o", "%i").stdout.split()
        if queued:
            self.run("scancel", *queued)
            deadline = time.monotonic() + 60
            while self.run("squeue", "-h", "-o", "%i").stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for daemon in reversed(self.daemons):
            if daemon.poll() is None:
                daemon.terminate()
                try:
                    daemon.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
        for pid in self.processes_of(self.job_ids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def describe_processes(pids: list[int]) -> str:
    lines = []
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        lines.append(f"{pid} {command[:120]}")
    return "; ".join(lines)


def wait_until(predicate, limit_s: float, message, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(interval_s)


@pytest.fixture(scope="module")
def slurm():
    install_slurm()
    if os.geteuid() != 0:
        pytest.skip("a one-node Slurm here needs root: slurmd launches the jobs")
    # Short, under /tmp: munge's socket path must fit in a Unix socket's 107 characters.
    directory = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    cluster = SlurmCluster(directory)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


@dataclass(frozen=True)
class LedgerRow:
    status: str
    attempts: int
    updated_at: float


def ledger(output: Path) -> dict[str, LedgerRow]:
    """Each job's status, attempts and last change, read as any SQLite client would; {} before it exists."""
    path = output / "ledger.sqlite"
    if not path.exists():
        return {}
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        rows = connection.execute(
            "SELECT id, status, attempts, updated_at FROM jobs ORDER BY position"
        ).fetchall()
    except sqlite3.OperationalError:  # the schema is being created
        return {}
    finally:
        connection.close()
    return {job_id: LedgerRow(status, attempts, updated_at) for job_id, status, attempts, updated_at in rows}


def statuses(output: Path) -> list[str]:
    return [row.status for row in ledger(output).values()]


def write_sweep(directory: Path, jobs: int) -> Path:
    path = directory / "sweep.yaml"
    path.write_text(SWEEP.format(seeds=", ".join(str(seed) for seed in range(jobs))))
    return path


def wait_for_one_finished_and_one_running(output: Path, log: Path) -> dict[str, LedgerRow]:
    wait_until(
        lambda: "succeeded" in statuses(output) and "running" in statuses(output),
        180,
        lambda: f"no job finished while another ran:\n{read(log)}",
        interval_s=0.1,
    )
    return ledger(output)


def read(log: Path) -> str:
    """A job's log so far ('' before Slurm has created it)."""
    return log.read_text() if log.exists() else ""


def summary_of(output: Path) -> dict:
    return load_strict_json(Path(f"{output}.summary.json"))


def test_scancel_records_the_running_jobs_cancelled_and_a_resubmission_runs_only_the_rest(slurm, tmp_path):
    spec = write_sweep(tmp_path, jobs=6)
    output = tmp_path / "run"
    first_log = tmp_path / "first.log"
    first = slurm.sbatch(first_log, str(spec), str(output), "--max-concurrent", "1")
    before = wait_for_one_finished_and_one_running(output, first_log)
    slurm.run("scancel", first)
    state = slurm.wait_until_ended(first)

    assert state["JobState"] == "CANCELLED", state
    cancelled = ledger(output)
    for job_id, row in before.items():
        if row.status == "running":
            assert cancelled[job_id].status == "cancelled", first_log.read_text()
    assert not {"running", "pending"} & set(statuses(output)), cancelled
    summary = summary_of(output)  # the --json summary of a cancelled run
    assert summary["exit_code"] == 130
    assert {job["id"]: job["status"] for job in summary["jobs"]} == {
        job_id: row.status for job_id, row in cancelled.items()
    }
    assert summary["counts"]["cancelled"] >= 1
    slurm.assert_nothing_left(first)

    second_log = tmp_path / "second.log"
    second = slurm.sbatch(second_log, str(spec), str(output), "--max-concurrent", "1")
    state = slurm.wait_until_ended(second)

    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), second_log.read_text()
    finished = {job_id for job_id, row in cancelled.items() if row.status == "succeeded"}
    assert f"{6 - len(finished)} job(s) to run, {len(finished)} already done" in second_log.read_text()
    final = ledger(output)
    assert [row.status for row in final.values()] == ["succeeded"] * 6
    for job_id in finished:
        assert final[job_id] == cancelled[job_id], f"{job_id} ran again"
    for job_id in set(final) - finished:
        # One more attempt each, the one that succeeded: no job ran twice in the second allocation.
        assert final[job_id].attempts == cancelled[job_id].attempts + 1
    assert summary_of(output)["exit_code"] == 0 and summary_of(output)["counts"]["succeeded"] == 6
    slurm.assert_nothing_left(second)


def test_term_to_the_batch_script_alone_cancels_the_run_through_its_ledger(slurm, tmp_path):
    # What the time limit's warning does (#SBATCH --signal=B:TERM@120): only the batch
    # script gets TERM. It asks the driver through the ledger (`runjobs cancel`), so Ray
    # stays up while the driver cancels and records its jobs.
    spec = write_sweep(tmp_path, jobs=3)
    output = tmp_path / "run"
    log = tmp_path / "job.log"
    job = slurm.sbatch(log, str(spec), str(output), "--max-concurrent", "1")
    before = wait_for_one_finished_and_one_running(output, log)
    slurm.run("scancel", "--batch", "--signal=TERM", job)
    state = slurm.wait_until_ended(job)

    text = log.read_text()
    assert (state["JobState"], state["ExitCode"]) == ("FAILED", "130:0"), text
    assert "cancelled by runjobs cancel: 1 running and 1 pending job(s) recorded cancelled" in text
    after = ledger(output)
    assert sorted(row.status for row in after.values()) == ["cancelled", "cancelled", "succeeded"]
    assert [job_id for job_id, row in after.items() if row.status == "succeeded"] == [
        job_id for job_id, row in before.items() if row.status == "succeeded"
    ]
    assert summary_of(output)["exit_code"] == 130
    slurm.assert_nothing_left(job)


def test_the_first_job_runs_within_10_seconds_of_the_allocation_start(slurm, tmp_path):
    output = tmp_path / "run"
    log = tmp_path / "job.log"
    (tmp_path / "one.yaml").write_text("name: one\ndefaults: {framework: torch, epochs: 200}\n")
    submitted = time.time()
    job = slurm.sbatch(log, str(tmp_path / "one.yaml"), str(output))
    ledger_seen = running_seen = None
    deadline = time.monotonic() + 120
    while running_seen is None and time.monotonic() < deadline:
        if ledger_seen is None and (output / "ledger.sqlite").exists():
            ledger_seen = time.time()
        if set(statuses(output)) & {"running", "succeeded", "failed"}:
            running_seen = time.time()
        time.sleep(0.05)
    state = slurm.wait_until_ended(job)

    assert running_seen is not None and state["JobState"] == "COMPLETED", log.read_text()
    # StartTime has whole seconds, rounded down: the figures below are at most 1 s high.
    started = datetime.strptime(state["StartTime"], "%Y-%m-%dT%H:%M:%S").timestamp()
    print(
        f"allocation start to ledger {ledger_seen - started:.1f}s, to the first job running "
        f"{running_seen - started:.1f}s (sbatch to first job running {running_seen - submitted:.1f}s)"
    )
    assert running_seen - started < 10, log.read_text()
    slurm.assert_nothing_left(job)


def test_a_requeue_after_the_driver_is_killed_runs_only_what_had_not_finished(slurm, tmp_path):
    spec = write_sweep(tmp_path, jobs=4)
    output = tmp_path / "run"
    log = tmp_path / "job.log"
    job = slurm.sbatch(log, str(spec), str(output), "--max-concurrent", "1")
    before = wait_for_one_finished_and_one_running(output, log)
    # A preemption as hard as it gets: the driver dies at once, recording nothing, and
    # Slurm ends the allocation and queues it again.
    driver = int(re.search(r"driver started \(pid (\d+)\)", log.read_text()).group(1))
    os.kill(driver, signal.SIGKILL)
    requeue = slurm.run("scontrol", "requeue", job)
    assert requeue.returncode == 0, requeue.stderr
    # Slurm holds a requeued job for a while (BeginTime); let it start at once.
    wait_until(lambda: slurm.job(job)["JobState"] == "PENDING", 60, lambda: f"not requeued: {slurm.job(job)}")
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    state = slurm.wait_until_ended(job)

    text = log.read_text()  # both attempts: the script appends (--open-mode=append)
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1"), text
    assert "(restart 1)" in text
    final = ledger(output)
    assert [row.status for row in final.values()] == ["succeeded"] * 4
    for job_id, row in before.items():
        if row.status == "succeeded":
            assert final[job_id] == row, f"{job_id} ran again"
        elif row.status == "running":
            assert final[job_id].attempts == 2  # killed with the driver, then run again
        else:
            assert final[job_id].attempts == 1
    assert summary_of(output)["exit_code"] == 0
    slurm.assert_nothing_left(job)


def test_on_several_nodes_nothing_is_submitted_before_every_raylet_has_joined(slurm, tmp_path):
    # Slurm cannot give this machine two nodes: the script is told to wait for two Ray
    # nodes, and the second is a raylet this test starts late, as a slow node would join.
    token = secrets.token_hex(32)
    output = tmp_path / "run"
    log = tmp_path / "job.log"
    (tmp_path / "one.yaml").write_text("name: one\ndefaults: {framework: torch, epochs: 200}\n")
    job = slurm.sbatch(
        log, str(tmp_path / "one.yaml"), str(output),
        environment={"RUNJOBS_RAY_NODES": "2", "RAY_AUTH_TOKEN": token, "RAY_PORT": str(free_port())},
    )  # fmt: skip
    wait_until(lambda: "driver started" in read(log), 120, lambda: read(log))
    address = re.search(r"starting the Ray head at (\S+)", log.read_text()).group(1)
    time.sleep(4)
    # The driver waits (--wait-for-nodes): its directory may hold the planned jobs, none started.
    started = ledger_states(output) if (output / "ledger.sqlite").exists() else []
    assert set(started) <= {"pending"}, "a job started with one of two nodes"
    temp_dir = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")
    try:
        arguments = ["--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1"]
        late = RayNode(
            tmp_path / "late-node.log",
            [*arguments, "--temp-dir", temp_dir],
            "Ray runtime started",
            # No drain on TERM at the end: the head it would report to is gone by then.
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
        )
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    late.temp_dir = temp_dir  # removed when it stops
    try:
        state = slurm.wait_until_ended(job)
    finally:
        late.stop()

    text = log.read_text()
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert load_strict_json(output / "report.json")["cluster"]["nodes"] == 2
    slurm.assert_nothing_left(job)


def test_a_node_that_never_joins_ends_the_job_with_exit_3_before_any_job_starts(slurm, tmp_path):
    output = tmp_path / "run"
    log = tmp_path / "job.log"
    (tmp_path / "one.yaml").write_text("name: one\ndefaults: {framework: torch, epochs: 200}\n")
    job = slurm.sbatch(
        log, str(tmp_path / "one.yaml"), str(output),
        # Time for the head to come up (about 4 s here), not for a second node.
        environment={"RUNJOBS_RAY_NODES": "2", "RUNJOBS_RAY_WAIT_S": "15"},
    )  # fmt: skip
    state = slurm.wait_until_ended(job)

    text = log.read_text()
    assert (state["JobState"], state["ExitCode"]) == ("FAILED", "3:0"), text
    assert "1 of 2 node(s) joined the cluster" in text
    assert not Path(f"{output}.summary.json").exists()
    started = ledger_states(output) if (output / "ledger.sqlite").exists() else []
    assert set(started) <= {"pending"}, "no job may start with one of two nodes"
    slurm.assert_nothing_left(job)
