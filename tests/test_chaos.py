"""A few rounds of the fault harness (bench/chaos.py), one of each fault, on a real two-node cluster.

Each round SIGKILLs the driver, a warm worker, a ddp rank or the worker node, or sends
`runjobs cancel`, then submits again until the run is complete; the harness fails the
round when a finished result was lost or changed, a job did not end with exactly one
succeeded record equal to the undisturbed run's, an actor or placement group was left,
the ledger failed SQLite's integrity check, or a command printed a traceback.
docs/RELIABILITY.md has a long run's figures.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHAOS = Path(__file__).resolve().parents[1] / "bench" / "chaos.py"


def test_one_round_of_each_fault_loses_nothing_and_leaves_nothing(tmp_path):
    rounds = tmp_path / "rounds.json"
    result = subprocess.run(
        [sys.executable, str(CHAOS), "--rounds", "5", "--json", str(rounds)],
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    import json

    kinds = {entry["kind"]: entry for entry in json.loads(rounds.read_text())}
    assert set(kinds) == {"driver", "warm_worker", "ddp_rank", "node", "cancel"}
    assert all(entry["injected"] for entry in kinds.values()), kinds
