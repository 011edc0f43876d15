"""The architecture's rules, checked: stages import only backwards, and the CLI stays light.

docs/ARCHITECTURE.md draws the flow plan -> run -> record -> report; these tests keep
the code to it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside functions."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def test_no_module_of_the_run_or_record_stage_imports_the_report_stage():
    offenders = {
        str(path.relative_to(JOBS.parent)): sorted(
            module for module in imported_modules(path) if module.startswith("jobs.report")
        )
        for stage in ("plan", "run", "record")
        for path in (JOBS / stage).glob("*.py")
    }
    assert {path: modules for path, modules in offenders.items() if modules} == {}


def test_the_control_plane_is_a_few_modules_over_its_stage_packages():
    modules = sorted(path.name for path in JOBS.glob("*.py") if path.name != "__init__.py")
    packages = sorted(path.name for path in JOBS.iterdir() if (path / "__init__.py").is_file())
    assert packages == ["plan", "record", "report", "run"]
    assert len(modules) <= 4, modules


def test_help_status_and_report_import_no_framework_and_no_ray():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from jobs.cli import cli\n"
        "for args in (['--help'], ['submit', '--help'], ['status', '--help'], ['fields']):\n"
        "    assert CliRunner().invoke(cli, args).exit_code == 0, args\n"
        "heavy = {'ray', 'tensorflow', 'torch', 'keras', 'jax'}\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
