"""report.html: rendered from the report dict, and drawn by a real headless Chromium.

The quick tests render hand-built reports (escaping, a failed job, sweeps, data that is
gone). The slow test runs a real sweep, opens its report.html in Chromium (installed
from Debian's packages where missing) and checks that every figure holds a drawn plot.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from jobs.record.records import empty_record
from jobs.report import combined as reports
from jobs.report.html import FIGURE_IDS, render_html
from tests.helpers import run_cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def succeeded_record(job_id: str, framework: str, **config_changes) -> dict:
    """A finished single-feature job on the article data, as entry.py records one."""
    config = {
        "framework": framework, "variant": "single", "workers": 1, "epochs": 3, "optimizer": "adam",
        "lr": 0.01, "seed": 0, "batch_size": 10, "init": "zeros", "data": "article", "features": [],
        "target": None, "normalize": False, "predict": [[1800.0]],
    }  # fmt: skip
    config.update(config_changes)
    record = empty_record(job_id, config, "succeeded", None)
    record.update(
        convergence="converged",
        params={"weights": [0.199], "bias": 0.5},
        reference={"weights": [0.2], "bias": 0.0, "loss": 0.0},
        loss={"final": 0.01, "r2_gap": 2e-6, "history_units": "original", "history": [900.0, 30.0, 0.01]},
        history={"epoch_s": [0.01] * 3, "weights": [[0.1], [0.19], [0.199]], "bias": [0.1, 0.3, 0.5]},
        predictions=[{"input": [1800.0], "output": 358.7}],
        timings={"queued_s": 0.1, "startup_s": 2.0, "setup_s": 0.5, "train_s": 0.2, "predict_s": 0.01,
                 "epoch_s_median": 0.01, "total_s": 3.0},
        placement={"device": "cpu", "hostname": "test"},
        data={"source": config["data"], "rows": 10, "features": ["size_sqft"], "target": "price_thousands"},
    )  # fmt: skip
    return record


def failed_record(job_id: str, framework: str, error: str) -> dict:
    record = succeeded_record("unused", framework)
    return empty_record(job_id, record["config"], "failed", error)


def built(records: list[dict], run_id: str = "run-1") -> dict:
    cluster = {"address": "local", "embedded": True, "nodes": 1, "cpus": 2.0, "gpus": 0.0}
    return reports.build_report(run_id, cluster, records, {"connect_s": 1.0, "jobs_s": 2.0})


def test_text_from_the_report_is_escaped():
    hostile = '<script>alert("job")</script>'
    page = render_html(
        built(
            [succeeded_record("tensorflow-1", "tensorflow"), failed_record("torch-1", "torch", hostile)],
            run_id="<img src=x onerror=alert(1)>",
        )
    )
    assert "&lt;script&gt;alert(&quot;job&quot;)&lt;/script&gt;" in page
    assert hostile not in page
    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_the_page_is_self_contained_with_plotly_inlined_once():
    import plotly.offline

    page = render_html(built([succeeded_record("tensorflow-1", "tensorflow")]))
    bundle_start = plotly.offline.get_plotlyjs()[:200]
    assert page.count(bundle_start) == 1
    before_bundle, _, rest = page.partition(bundle_start)
    body = rest.partition("</head>")[2]
    for part in (before_bundle, body):  # the bundle itself mentions script tags and its CDN
        assert "<script src" not in part and "<link" not in part and "cdn.plot.ly" not in part
    for figure_id in ("loss-curves", "data-fit", "timings"):
        assert f'<div class="figure" id="{figure_id}">' in page


def test_a_failed_job_without_history_is_listed_and_the_others_are_drawn():
    page = render_html(
        built(
            [
                succeeded_record("tensorflow-1", "tensorflow"),
                failed_record("torch-1", "torch", "RuntimeError: worker died"),
            ]
        )
    )
    assert "RuntimeError: worker died" in page
    assert "No loss history (the job did not finish training): torch-1." in page
    assert "Not timed (the job did not finish): torch-1." in page
    assert '<div class="figure" id="loss-curves">' in page
    assert '"tensorflow-1' in page  # the finished job's traces are in the figure data


def test_a_run_where_every_job_failed_still_renders():
    page = render_html(built([failed_record("torch-1", "torch", "ValueError: bad")]))
    assert "ValueError: bad" in page
    assert 'class="figure"' not in page
    assert "No job learned parameters" in page


def test_each_framework_and_variant_draws_as_the_registry_says_and_pairs_in_one_table():
    page = render_html(
        built(
            [
                succeeded_record("tensorflow-1", "tensorflow"),
                succeeded_record("torch-1", "torch"),
                succeeded_record("torch-ddp", "torch", variant="ddp", workers=2),
            ]
        )
    )
    # A wide solid TensorFlow line under thin dashed torch lines, each variant in its colour.
    assert '"line":{"color":"#ff7f0e","width":4}' in page
    assert '"line":{"color":"#1f77b4","dash":"dash","width":2}' in page
    assert '"line":{"color":"#9467bd","dash":"dash","width":2}' in page
    assert '<th class="text">tensorflow job</th><th class="text">torch job</th>' in page
    assert "<th>train time tf/torch</th>" in page


def test_the_sweep_section_appears_only_for_sweeps():
    comparison = built([succeeded_record("tensorflow-1", "tensorflow"), succeeded_record("torch-1", "torch")])
    assert f'id="{FIGURE_IDS["sweep"]}"' not in render_html(comparison)
    sweep = built(
        [
            succeeded_record(f"{framework}-{lr}-{seed}", framework, lr=lr, seed=seed)
            for framework in ("tensorflow", "torch")
            for lr in (0.01, 0.1)
            for seed in (0, 1)
        ]
    )
    page = render_html(sweep)
    assert f'<div class="figure" id="{FIGURE_IDS["sweep"]}">' in page
    assert "bars span the smallest to the largest gap" in page


def test_a_large_sweep_folds_its_tables_and_caps_its_curves():
    records = [
        succeeded_record(f"{framework}-{lr}-{seed}", framework, lr=lr, seed=seed)
        for framework in ("tensorflow", "torch")
        for lr in (0.001, 0.01, 0.1)
        for seed in range(10)
    ]
    page = render_html(built(records))
    assert "60 jobs (click to show)" in page
    assert "30 training configs: the seeds of a config share a panel." in page
    assert "3 panel(s) hold more than 16 jobs: 16 are drawn" in page
    assert "60 jobs: bars are the mean per framework and variant." in page


def test_a_csv_that_is_gone_draws_the_lines_without_points(tmp_path):
    missing = tmp_path / "houses.csv"
    page = render_html(built([succeeded_record("torch-1", "torch", data=str(missing))]))
    assert f'<div class="figure" id="{FIGURE_IDS["data"]}">' in page
    assert f"The lines for {missing} are drawn without its points" in page


def test_large_data_draws_a_sample_of_its_points_and_says_so():
    data = "synthetic:rows=1000000,features=1,noise=0.1,seed=3"
    record = succeeded_record("torch-1", "torch", data=data)
    record["data"]["rows"] = 1_000_000
    small = render_html(built([succeeded_record("torch-1", "torch")]))
    page = render_html(built([record]))
    assert "5,000 of its 1,000,000 rows are drawn, a uniform random sample" in page
    assert "(1000000 rows)" in page  # the title keeps the job's own count
    # The page stays within a few hundred kB of one drawn from 10 points, not 100 MB.
    assert len(page) - len(small) < 400_000


def test_several_features_are_drawn_as_predicted_against_actual():
    record = succeeded_record("torch-1", "torch", data="synthetic:rows=50,features=3,noise=0.1,seed=1")
    record["params"] = {"weights": [1.0, -0.5, 0.3], "bias": 0.2}
    record["reference"] = {"weights": [1.1, -0.4, 0.3], "bias": 0.1, "loss": 0.01}
    page = render_html(built([record]))
    assert "has 3 features: each job&#x27;s prediction is plotted against the target" in page
    assert f'<div class="figure" id="{FIGURE_IDS["data"]}">' in page


# The browser test.


@pytest.fixture(scope="session")
def chromium(tmp_path_factory) -> str:
    """A headless-capable Chromium; installed from Debian's `chromium` package where missing."""
    found = next((shutil.which(name) for name in BROWSER_NAMES if shutil.which(name)), None)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no chromium, and not root with apt-get to install Debian's chromium package")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    started = time.monotonic()
    for command in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
    ):
        result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900)
        if result.returncode != 0:
            pytest.skip(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")
    print(f"installed chromium in {time.monotonic() - started:.0f}s")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get installed chromium but no chromium command is on PATH")
    return found


def headless(chromium: str, profile: Path, *arguments: str) -> subprocess.CompletedProcess:
    """One headless Chromium run; root needs --no-sandbox, and its own profile avoids a shared lock."""
    return subprocess.run(
        [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
         f"--user-data-dir={profile}", "--virtual-time-budget=15000", *arguments],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


class DrawnPlots(HTMLParser):
    """Per figure container: plotly's SVG roots and the drawn marks (line, point and bar paths)."""

    VOID = {"meta", "br", "img", "input", "link", "hr", "col", "area", "base", "source", "wbr"}
    TRACE_LAYERS = {"scatterlayer", "barlayer"}

    def __init__(self):
        super().__init__()
        self.stack: list[tuple[str, set[str], str | None]] = []
        self.svgs: Counter = Counter()
        self.marks: Counter = Counter()

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        classes = set((attributes.get("class") or "").split())
        figure = attributes.get("id") if tag == "div" and "figure" in classes else None
        if tag not in self.VOID:
            self.stack.append((tag, classes, figure))
        current = next((name for _, _, name in reversed(self.stack) if name), None)
        if current is None:
            return
        if tag == "svg" and "main-svg" in classes:
            self.svgs[current] += 1
        in_trace_layer = any(layer_classes & self.TRACE_LAYERS for _, layer_classes, _ in self.stack)
        if tag == "path" and in_trace_layer and (attributes.get("d") or "").startswith("M"):
            self.marks[current] += 1

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        for index in range(len(self.stack) - 1, -1, -1):
            if self.stack[index][0] == tag:
                del self.stack[index:]
                return


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.fixture(scope="module")
def sweep_run(ray_session, tmp_path_factory):
    """A real 8-job sweep (2 frameworks x 2 learning rates x 2 seeds) and one mlp, quick enough."""
    directory = tmp_path_factory.mktemp("html")
    spec = directory / "sweep.yaml"
    # The mlp job draws the figure of models beyond the line.
    spec.write_text(
        (EXAMPLES / "lr-seed.yaml").read_text()
        + "jobs:\n  - {framework: torch, model: mlp, hidden: [4], init: shared}\n"
    )
    result = run_cli(["submit", str(spec), "--set", "epochs=150"], directory / "run")
    assert result.exit_code == 0, result.stderr
    return result


@pytest.mark.slow
def test_chromium_draws_every_figure_of_a_real_sweeps_report(sweep_run, chromium, tmp_path):
    page = sweep_run.output_dir / "report.html"
    assert "report.html" in sweep_run.stdout
    job_count = len(sweep_run.report()["jobs"])

    started = time.monotonic()
    dump = headless(chromium, tmp_path / "profile", "--dump-dom", page.as_uri())
    assert dump.returncode == 0, dump.stderr[-2000:]
    parsed = DrawnPlots()
    parsed.feed(dump.stdout)
    print(f"chromium --dump-dom took {time.monotonic() - started:.1f}s")
    # Each figure is a plotly SVG with at least one drawn mark per job (a loss curve, a
    # learned line, a stacked bar), and the sweep plot a line per framework.
    minimum_marks = {
        "loss": job_count, "data": job_count + 10, "model_fit": 2, "timings": job_count, "sweep": 2,
    }  # fmt: skip
    for name, figure_id in FIGURE_IDS.items():
        assert parsed.svgs[figure_id] >= 1, f"#{figure_id} holds no plotly SVG"
        assert parsed.marks[figure_id] >= minimum_marks[name], (
            f"#{figure_id} has {parsed.marks[figure_id]} drawn marks, expected at least {minimum_marks[name]}"
        )
    for job in sweep_run.report()["jobs"]:
        assert f">{job['id']}</td>" in dump.stdout, "every job is a row of the comparison table"

    screenshot = tmp_path / "report.png"
    shot = headless(
        chromium, tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1280,2400", page.as_uri()
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert png_size(screenshot) == (1280, 2400)
    # A blank page compresses to a few kilobytes; one with tables and plots does not.
    assert screenshot.stat().st_size > 60_000


@pytest.mark.slow
def test_runjobs_report_writes_report_html_again_without_ray(sweep_run):
    page = sweep_run.output_dir / "report.html"
    page.unlink()
    result = run_cli(["report", str(sweep_run.output_dir)])
    assert result.exit_code == 0, result.stderr
    assert "report.html" in result.stdout
    text = page.read_text(encoding="utf-8")
    assert all(f'<div class="figure" id="{figure_id}">' in text for figure_id in FIGURE_IDS.values())
