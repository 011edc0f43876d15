"""Job fields are declared once: the submit options, `--set`, spec-file keys, help and ids follow.

`label` is the field added to show it: one declaration in JobSpec, and it is in
`submit --help`, takes `--label`, `--set label=...` and a spec file's `label:`, and enters
a job's id only when set, so the ids of runs written before it existed do not change.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from jobs.plan.spec import FIELDS
from jobs.plan.sweep import SweepSpec
from tests.helpers import run_cli

FIXTURES = Path(__file__).parent / "fixtures"
OLD_SPEC = FIXTURES / "written-by-0.1.yaml"
OLD_RUN = FIXTURES / "run-written-by-0.1"


def test_every_field_with_an_option_is_in_submit_help_with_its_default():
    shown = run_cli(["submit", "--help"]).stdout
    for declared in FIELDS.values():
        if declared.info.option:
            assert declared.info.option in shown, declared.name
    assert "--label TEXT" in shown and "A name of your own for the job" in shown
    assert "Default: 0.01." in shown  # the default comes from the declaration, not the help text
    listed = json.loads(run_cli(["fields", "--json"]).stdout)
    assert [row["field"] for row in listed] == list(FIELDS)


@pytest.mark.parametrize(
    "how",
    [["--label", "baseline"], ["--set", "label=baseline"], ["--set", "torch.label=baseline"], "spec-file"],
    ids=["option", "set", "set-per-framework", "spec-file"],
)
def test_a_field_is_taken_from_its_option_set_and_spec_files_alike(tmp_path, how):
    if how == "spec-file":
        spec = tmp_path / "labelled.yaml"
        spec.write_text("name: labelled\ndefaults: {label: baseline}\ngrid: {framework: [torch]}\n")
        args = ["submit", str(spec)]
    else:
        args = ["submit", "--framework", "torch", *how]
    planned = run_cli([*args, "--dry-run", "--json"])
    assert planned.exit_code == 0, planned.stderr
    (job,) = json.loads(planned.stdout)
    assert job["config"]["label"] == "baseline"


def test_a_field_left_at_its_default_does_not_change_an_existing_jobs_id(tmp_path):
    with sqlite3.connect(OLD_RUN / "ledger.sqlite") as connection:
        old_ids = [row[0] for row in connection.execute("SELECT id FROM jobs ORDER BY position")]
    assert [job_id for job_id, _ in SweepSpec.load(OLD_SPEC).expand()] == old_ids
    labelled = tmp_path / "labelled.yaml"
    labelled.write_text(OLD_SPEC.read_text().replace("{epochs: 5}", "{epochs: 5, label: again}"))
    new_ids = [job_id for job_id, _ in SweepSpec.load(labelled).expand()]
    assert not set(new_ids) & set(old_ids)  # the same settings under a label are jobs of their own


def test_a_directory_written_by_runjobs_0_1_is_migrated_and_a_rerun_runs_nothing(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    again = run_cli(["submit", str(OLD_SPEC), "--json"], run)  # no Ray: every job has its result
    assert again.exit_code == 0, again.stderr
    assert "nothing to run" in again.stderr
    assert [job["status"] for job in json.loads(again.stdout)["jobs"]] == ["succeeded", "succeeded"]
    with sqlite3.connect(run / "ledger.sqlite") as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == 1
        assert connection.execute("SELECT status FROM jobs").fetchall() == [("succeeded",), ("succeeded",)]
    listed = run_cli(["list", str(run), "--json"])
    assert [row["state"] for row in json.loads(listed.stdout)] == ["succeeded", "succeeded"]


def test_a_ledger_from_a_newer_runjobs_or_not_a_ledger_is_refused_in_one_line(tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(OLD_RUN, newer)
    with sqlite3.connect(newer / "ledger.sqlite") as connection:
        connection.execute("PRAGMA user_version = 99")
    refused = run_cli(["status", str(newer)])
    assert refused.exit_code == 2
    assert "written by a newer runjobs (ledger schema 99" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "ledger.sqlite").write_bytes(b"this is not a database" * 100)
    for args in (["status", str(corrupt)], ["report", str(corrupt)], ["submit", "--output", str(corrupt)]):
        result = run_cli(args)
        assert result.exit_code == 2, (args, result.stderr)
        assert "is not a usable runjobs ledger" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_a_ledger_appears_whole_and_an_empty_database_is_refused_not_misread(tmp_path):
    from jobs.record.ledger import Ledger

    created = tmp_path / "created"
    with Ledger.open(created, for_writing=True):
        # What a reader polling the directory sees while the driver still holds it: the
        # ledger complete, never a database without its tables (a CI failure once).
        with Ledger.open(created, for_writing=False) as reader:
            assert reader.counts()["pending"] == 0
    assert sorted(path.name for path in created.iterdir()) == ["ledger.lock", "ledger.sqlite"]

    empty = tmp_path / "empty"
    empty.mkdir()
    sqlite3.connect(empty / "ledger.sqlite").close()  # a database, but no ledger in it
    for args in (["status", str(empty)], ["list", str(empty)], ["report", str(empty)]):
        result = run_cli(args)
        assert result.exit_code == 2, (args, result.stderr)
        assert "holds no runjobs jobs table" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_a_field_of_the_wrong_type_in_a_spec_file_is_one_line_and_exit_2(tmp_path):
    for body in ("features: {a: 1}", "label: [x]", "normalize: 3", "data: 5"):
        spec = tmp_path / "bad.yaml"
        spec.write_text(f"name: bad\ndefaults: {{{body}}}\n")
        result = run_cli(["submit", str(spec), "--dry-run"])
        assert result.exit_code == 2, (body, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
