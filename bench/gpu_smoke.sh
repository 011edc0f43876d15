#!/usr/bin/env bash
# GPU smoke test: on a machine with NVIDIA GPUs, run every framework and variant once on
# real devices, then check what a user relies on: each job succeeded on a GPU (no CPU
# fallback), saw exactly the GPUs Ray assigned it (CUDA_VISIBLE_DEVICES), single-device jobs
# of one framework shared at most one warm worker per GPU, and every framework learned the
# same line (the report's parity check).
#
#   bench/gpu_smoke.sh [--address HOST:PORT]     # default: an embedded local Ray on this machine
#
# Exits 0 when every check holds, 1 naming the first that fails, 2 when there is no GPU.
# Runs in a few minutes; the output directory is printed, and kept.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
runjobs="${RUNJOBS:-$here/.venv/bin/runjobs}"
python="${PYTHON:-$here/.venv/bin/python}"

if ! command -v nvidia-smi >/dev/null || ! gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); then
    echo "gpu_smoke: no NVIDIA GPU here (nvidia-smi finds none); run it on a GPU node" >&2
    exit 2
fi
workers=$(( gpus >= 2 ? 2 : 1 ))
output="$(mktemp -d -t runjobs-gpu-smoke-XXXXXX)"
echo "gpu_smoke: $gpus GPU(s); jobs with $workers device(s) for the multi-device variants; output $output"

cat > "$output/sweep.yaml" <<YAML
# Four single-device jobs per framework from a shared start (warm workers, parity), then
# each multi-device variant once.
name: gpu-smoke
defaults: {epochs: 200, init: shared}
grid: {framework: [tensorflow, torch, jax], seed: [0, 1, 2, 3]}
jobs:
  - {framework: tensorflow, variant: mirrored, workers: $workers}
  - {framework: tensorflow, variant: multiworker, workers: $workers}
  - {framework: torch, variant: ddp, workers: $workers}
YAML

"$runjobs" submit "$output/sweep.yaml" --output "$output/run" "$@"

"$python" - "$output/run/report.json" "$gpus" <<'PYTHON'
import json
import sys
from collections import defaultdict

report = json.load(open(sys.argv[1]))
gpus = int(sys.argv[2])
failures = []
processes = defaultdict(set)
for job in report["jobs"]:
    placement = job.get("placement") or {}
    where = f"{job['id']}: "
    if job["status"] != "succeeded":
        failures.append(where + f"{job['status']} ({job.get('error')})")
        continue
    if placement.get("cpu_fallback") or placement.get("device") == "cpu":
        failures.append(where + f"trained on {placement.get('device')}, not a GPU")
    for worker in placement.get("workers") or [placement]:
        visible = (worker.get("cuda_visible_devices") or placement.get("cuda_visible_devices") or "").split(",")
        if sorted(visible) != sorted(worker.get("gpu_ids") or []):
            failures.append(where + f"CUDA_VISIBLE_DEVICES {visible} is not Ray's assignment {worker.get('gpu_ids')}")
    if job["config"]["variant"] == "single":
        processes[job["framework"]].add(placement.get("pid"))
for framework, pids in processes.items():
    if len(pids) > gpus:
        failures.append(f"{framework}: {len(pids)} worker processes for single-device jobs on {gpus} GPU(s)")
for group in (report.get("comparison") or {}).get("groups") or []:
    if (group.get("parity") or {}).get("agree") is False:
        failures.append(f"frameworks disagree from a shared start: {group['jobs']}")
if failures:
    print("gpu_smoke: FAILED\n  " + "\n  ".join(failures), file=sys.stderr)
    sys.exit(1)
print(f"gpu_smoke: every check holds ({len(report['jobs'])} jobs on {gpus} GPU(s))")
PYTHON
