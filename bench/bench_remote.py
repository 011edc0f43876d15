"""Benchmark: the 8-job sweep submitted through Ray Jobs against the driver run directly.

One local head (`ray start --head` with the dashboard) serves both sides, so neither pays
a Ray start. Direct: `runjobs submit examples/lr-seed.yaml --address 127.0.0.1:PORT`, the
driver in this machine's process connected to the GCS. Remote: the same with `--address
http://127.0.0.1:DASHBOARD`, the driver running on the head as a Ray Job and the results
streamed back. Both as fresh processes, alternating order; the difference is what remote
submission costs end to end (packaging and upload, the job's start, the log stream).

    .venv/bin/python bench/bench_remote.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_submit import machine, print_timings, timed  # noqa: E402

RUNJOBS = str(Path(sys.executable).with_name("runjobs"))
RAY = str(Path(sys.executable).with_name("ray"))
SPEC = HERE.parent / "examples" / "lr-seed.yaml"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_head(log_path: Path) -> tuple[subprocess.Popen, str, str]:
    port, dashboard_port = free_port(), free_port()
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    with log_path.open("w") as log:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "true",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
             "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats", "--block"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=environment,
        )  # fmt: skip
    jobs_address = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{jobs_address}/api/version", timeout=5).close()
            break
        except urllib.error.HTTPError:  # it answers (401 without the token): it is up
            break
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                stop(head)
                raise SystemExit(f"the head did not come up:\n{log_path.read_text()}") from None
            time.sleep(0.5)
    return head, f"127.0.0.1:{port}", jobs_address


def submit_command(address: str, output: Path) -> list[str]:
    return [RUNJOBS, "submit", str(SPEC), "--address", address, "--output", str(output)]


def stop(head: subprocess.Popen) -> None:
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    results: dict[str, list[float]] = {"direct (GCS address)": [], "remote (Ray Jobs)": []}
    with tempfile.TemporaryDirectory() as scratch:
        head, gcs_address, jobs_address = start_head(Path(scratch) / "head.log")
        try:
            # One unmeasured run each: the first Ray Job on a head starts its job agent's
            # runtime-env machinery, a one-time cost per cluster.
            for address in (gcs_address, jobs_address):
                timed(submit_command(address, Path(scratch) / f"warm-up-{address[-5:]}"))
            for index in range(rounds):
                sides = [("direct (GCS address)", gcs_address), ("remote (Ray Jobs)", jobs_address)]
                for name, address in sides if index % 2 == 0 else reversed(sides):
                    output = Path(scratch) / f"{index}-{name.split()[0]}"
                    results[name].append(timed(submit_command(address, output)))
                print(f"round {index + 1}/{rounds} done", file=sys.stderr)
        finally:
            stop(head)
    print(f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Rounds: {rounds}, median shown.\n")
    print_timings(results)
    direct = statistics.median(results["direct (GCS address)"])
    remote = statistics.median(results["remote (Ray Jobs)"])
    print(f"\nremote - direct = {remote - direct:+.2f} s ({remote / direct:.2f}x)")


if __name__ == "__main__":
    main()
