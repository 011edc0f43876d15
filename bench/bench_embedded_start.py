"""Benchmark: where an embedded `runjobs submit` spends its time before the first job and after the last.

Runs `runjobs submit [SPEC]` as fresh processes on the embedded local Ray (no --address),
with a timestamp tracer loaded through PYTHONPATH (a generated sitecustomize.py, so no
project file changes): it marks the driver's CLI imports, planning, ledger, `import ray`,
ray.init's parts (GCS, dashboard head, autoscaler monitor, raylet spawn, waiting for the
raylet to register, the driver's connect), each warm worker's framework import and job,
report writing, the background ray.shutdown and process exit. The same tracer sees every
Ray worker, since they inherit the environment. Prints each phase's median over the runs;
with --compare, the runs of two checkouts alternate (the machine's load drifts).

    .venv/bin/python bench/bench_embedded_start.py [--runs 3] [--spec examples/lr-seed.yaml]
        [--repo DIR] [--compare DIR] [--events]

--repo/--compare: checkouts to run (default: this one), e.g. a `git worktree` with a change.
Keep other load off the machine: on 2 cores every phase is CPU-bound.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAUNCH = "import sys; from jobs.cli import main; sys.argv[0] = 'runjobs'; main()"

# The tracer: written to a temporary directory as sitecustomize.py; the driver and every Ray
# worker load it (PYTHONPATH), so no project file changes. JSON lines to $RJTRACE.
TRACER = r"""
# Timestamp tracer for runjobs' embedded start/stop: loaded via PYTHONPATH in the driver
# and in every Ray worker (they inherit the env). Writes JSON lines to $RJTRACE.
import os
import sys
import time

_PATH = os.environ.get("RJTRACE")
if _PATH:
    import atexit
    import functools
    import importlib.abc
    import importlib.util
    import json

    _T0 = time.time()
    _PID = os.getpid()
    _ROLE = "worker" if any("default_worker" in a for a in sys.argv) else (
        "driver"
        if (sys.argv[:1] == ["-c"] or sys.argv[0].endswith(("runjobs", "expert.py", "ray_tune_sweep.py")))
        else "other:" + os.path.basename(sys.argv[0] if sys.argv else "")[-30:]
    )

    def emit(ev, **extra):
        line = json.dumps({"pid": _PID, "role": _ROLE, "t": time.time(), "ev": ev, **extra})
        fd = os.open(_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    try:
        with open(f"/proc/{_PID}/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            btime = time.time() - float(f.read().split()[0])
        _CREATED = btime + start_ticks / os.sysconf("SC_CLK_TCK")
    except Exception:
        _CREATED = None
    emit("site", created=_CREATED)

    def wrap(obj, name, label=None):
        original = getattr(obj, name, None)
        if original is None or getattr(original, "_rjtraced", False):
            return
        label = label or f"{getattr(obj, '__name__', obj)}.{name}"

        @functools.wraps(original)
        def traced(*args, **kwargs):
            emit(label + ":begin")
            try:
                return original(*args, **kwargs)
            finally:
                emit(label + ":end")

        traced._rjtraced = True
        setattr(obj, name, traced)

    def wrap_cm(obj, name, label):
        # A contextmanager function: mark entering (yield reached) and leaving.
        original = getattr(obj, name)
        import contextlib

        @contextlib.contextmanager
        def traced(*args, **kwargs):
            emit(label + ":begin")
            with original(*args, **kwargs) as value:
                emit(label + ":entered")
                try:
                    yield value
                finally:
                    emit(label + ":leaving")
            emit(label + ":end")

        setattr(obj, name, traced)

    def patch_node(m):
        for n in ("__init__", "start_reaper_process", "start_head_processes", "start_gcs_server",
                  "_write_cluster_info_to_kv", "start_monitor", "start_api_server", "start_ray_processes",
                  "start_log_monitor", "start_raylet", "get_resource_and_label_spec", "kill_all_processes"):
            wrap(m.Node, n, "Node." + n)

    def patch_worker(m):
        wrap(m, "init", "ray.init")
        wrap(m, "connect", "ray.connect")
        wrap(m, "shutdown", "ray.shutdown")

    def patch_pipeline(m):
        for n in ("plan_jobs", "_run", "_finish", "write_reports", "write_report_json", "executor_for"):
            wrap(m, n, "pipeline." + n)
        wrap(m.NewLedgerDirectory, "open", "pipeline.ledger_open")
        original = m.keeping_callbacks

        def keeping(*a, **k):
            cb = original(*a, **k)
            s, r = cb.on_start, cb.on_record

            def on_start(job_id, quiet):
                emit("job_start", job=job_id)
                return s(job_id, quiet)

            def on_record(outcome, quiet):
                emit("job_record", job=outcome.id)
                r(outcome, quiet)
                emit("job_kept", job=outcome.id)

            import dataclasses
            return dataclasses.replace(cb, on_start=on_start, on_record=on_record)

        m.keeping_callbacks = keeping

    def patch_cluster(m):
        wrap_cm(m, "connected", "connected")
        wrap(m, "describe_cluster", "describe_cluster")
        wrap(m.BackgroundShutdown, "start", "bg_shutdown.start")
        wrap(m.BackgroundShutdown, "wait", "bg_shutdown.wait")

    def patch_driver(m):
        wrap(m.Driver, "__init__", "Driver.__init__")
        wrap(m.Driver, "run", "Driver.run")
        wrap(m.Driver, "_start", "Driver._start")
        wrap(m.Driver, "_collect", "Driver._collect")

    def patch_cli(m):
        original = m.main

        def main(*a, **k):
            emit("cli.main:begin")
            try:
                return original(*a, **k)
            except SystemExit:
                emit("cli.main:end")
                atexit.register(lambda: emit("atexit:first"))
                raise

        m.main = main

    def patch_actor(m):
        wrap(m.WarmWorker, "run", "WarmWorker.run")


    def patch_frameworks(m):
        wrap(m, "get", "frameworks.get")

    POST = {
        "ray._private.node": patch_node,
        "ray._private.worker": patch_worker,
        "jobs.pipeline": patch_pipeline,
        "jobs.run.cluster": patch_cluster,
        "jobs.run.driver": patch_driver,
        "jobs.cli": patch_cli,
        "workers.worker_actor": patch_actor,
        "workers.frameworks": patch_frameworks,
    }
    TIMED = {"ray", "tensorflow", "torch", "numpy", "pandas", "pyarrow", "jobs.cli", "jobs.pipeline",
             "workers.entry", "jobs.run.driver", "click", "rich", "psutil", "yaml", "plotly",
             "jobs.report.files", "jobs.report.combined", "ray.tune", "jax", "optuna", "sklearn",
             "tensorboard"}

    class Finder(importlib.abc.MetaPathFinder):
        busy = set()

        def find_spec(self, name, path=None, target=None):
            if (name not in POST and name not in TIMED) or name in self.busy:
                return None
            self.busy.add(name)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                self.busy.discard(name)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            loader = spec.loader
            exec_module = loader.exec_module

            class Loader(importlib.abc.Loader):
                def __getattr__(self, attr):
                    return getattr(loader, attr)

                def create_module(self, s):
                    return loader.create_module(s)

                def exec_module(self, module):
                    emit("import:" + name + ":begin")
                    try:
                        exec_module(module)
                    finally:
                        emit("import:" + name + ":end")
                    if name in POST:
                        POST[name](module)

            spec.loader = Loader()
            return spec

    sys.meta_path.insert(0, Finder())
    atexit.register(lambda: emit("atexit:last"))
"""


def run_once(
    repo: Path, spec: str | None, work: Path, tracer_dir: Path, number: int
) -> tuple[list[dict], float, float]:
    import os

    trace = work / f"trace-{number}.jsonl"
    output = work / f"run-{number}"
    env = dict(os.environ, RJTRACE=str(trace), PYTHONPATH=f"{repo}{os.pathsep}{tracer_dir}")
    command = [sys.executable, "-c", LAUNCH, "submit", *([spec] if spec else []), "--output", str(output)]
    started = time.time()
    done = subprocess.run(
        command, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    ended = time.time()
    if done.returncode != 0:
        raise SystemExit(f"runjobs submit failed ({done.returncode}):\n{done.stderr[-2000:]}")
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    return events, started, ended


def phases(events: list[dict], started: float, ended: float) -> dict[str, float]:
    driver = [e for e in events if e["role"] == "driver"]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for e in driver:
        first.setdefault(e["ev"], e["t"])
        last[e["ev"]] = e["t"]

    def span(begin: str, end: str, a=first, b=first) -> float:
        return b[end] - a[begin] if begin in a and end in b else float("nan")

    workers = [e for e in events if e["role"] == "worker"]
    runs_begin = sorted(e["t"] for e in workers if e["ev"] == "WarmWorker.run:begin")
    imports: dict[str, list[float]] = {}
    opened: dict[tuple[int, str], float] = {}
    for e in workers:
        for name in ("tensorflow", "torch", "jax"):
            if e["ev"] == f"import:{name}:begin":
                opened[(e["pid"], name)] = e["t"]
            elif e["ev"] == f"import:{name}:end" and (e["pid"], name) in opened:
                imports.setdefault(name, []).append(e["t"] - opened.pop((e["pid"], name)))
    out = {
        "python start (spawn -> site)": first["site"] - started,
        "CLI imports": span("site", "cli.main:begin"),
        "pipeline imports + checks": span("cli.main:begin", "pipeline.plan_jobs:begin"),
        "planning": span("pipeline.plan_jobs:begin", "pipeline.plan_jobs:end"),
        "ledger open": span("pipeline.ledger_open:begin", "pipeline.ledger_open:end"),
        "import ray": span("import:ray:begin", "import:ray:end"),
        "ray.init total": span("ray.init:begin", "ray.init:end"),
        "  GCS start": span("Node.start_gcs_server:begin", "Node.start_gcs_server:end"),
        "  autoscaler monitor spawn": span("Node.start_monitor:begin", "Node.start_monitor:end"),
        "  dashboard head (wait for URL)": span("Node.start_api_server:begin", "Node.start_api_server:end"),
        "  raylet (+log monitor) spawn": span(
            "Node.start_ray_processes:begin", "Node.start_ray_processes:end"
        ),
        "  wait for raylet to register": span("Node.start_ray_processes:end", "Node.__init__:end"),
        "  driver connect (workers prestart)": span("ray.connect:begin", "ray.connect:end"),
        "ray.init end -> first job dispatched": span("ray.init:end", "job_start"),
        "first dispatch -> first job in a worker": (runs_begin[0] - first["Driver._start:begin"])
        if runs_begin
        else float("nan"),
        "first job start -> first record": span("job_start", "job_record"),
        "first job start -> last record": span("job_start", "job_record", first, last),
        "last record -> _finish": span("job_kept", "pipeline._finish:begin", last, first),
        "write reports (shutdown overlapped)": span(
            "pipeline.write_reports:begin", "pipeline.write_reports:end"
        ),
        "ray.shutdown (background thread)": span("ray.shutdown:begin", "ray.shutdown:end"),
        "wait for shutdown after reports": span("bg_shutdown.wait:begin", "bg_shutdown.wait:end"),
        "report.json rewrite": span("pipeline.write_report_json:begin", "pipeline.write_report_json:end"),
        "exit (_finish end -> process gone)": ended - first.get("pipeline._finish:end", float("nan")),
        "before first job start (spawn -> job_start)": first["job_start"] - started,
        "after last record (-> process gone)": ended - last["job_record"],
        "wall": ended - started,
    }
    for name, seconds in imports.items():
        out[f"worker import {name} (max)"] = max(seconds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--spec", default=None, help="a spec file (default: the built-in comparison)")
    parser.add_argument("--repo", type=Path, default=HERE.parent)
    parser.add_argument("--compare", type=Path, default=None, help="a second checkout, run alternately")
    parser.add_argument("--events", action="store_true", help="print the last run's driver events too")
    args = parser.parse_args()
    repos = [args.repo.resolve()] + ([args.compare.resolve()] if args.compare else [])
    results: dict[Path, list[dict[str, float]]] = {repo: [] for repo in repos}
    with tempfile.TemporaryDirectory(prefix="bench-embedded-") as scratch:
        work = Path(scratch)
        tracer_dir = work / "tracer"
        tracer_dir.mkdir()
        (tracer_dir / "sitecustomize.py").write_text(TRACER)
        number = 0
        for round_number in range(args.runs):
            for repo in repos:
                number += 1
                spec = (
                    str((args.repo / args.spec).resolve())
                    if args.spec and not Path(args.spec).is_absolute()
                    else args.spec
                )
                events, started, ended = run_once(repo, spec, work, tracer_dir, number)
                results[repo].append(phases(events, started, ended))
                print(
                    f"round {round_number + 1} {repo}: wall {ended - started:.2f}s",
                    file=sys.stderr,
                    flush=True,
                )
                if args.events:
                    for e in events:
                        if e["role"] == "driver" or "WarmWorker" in e["ev"] or "import:t" in e["ev"]:
                            when = e["t"] - started
                            print(f"{when:8.3f} {e['pid']:>7} {e['role']:<8} {e['ev']} {e.get('job', '')}")
    names = list(results[repos[0]][0])
    header = (
        "| phase | " + " | ".join(f"{repo.name} (median of {len(results[repo])})" for repo in repos) + " |"
    )
    print(header)
    print("|" + "---|" * (len(repos) + 1))
    for name in names:
        cells = []
        for repo in repos:
            values = [run[name] for run in results[repo] if name in run and run[name] == run[name]]
            cells.append(f"{statistics.median(values):.2f}s" if values else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
