"""report.html: the run's report as one self-contained page, rendered from the report dict.

Plots are plotly figures: an interactive page (hover for a job's numbers, zoom into a
loss curve) is what an ML engineer reaches for, and plotly neither imports a framework
nor needs a plotting backend. The plotly.js bundle is inlined once in the page's head,
so the file opens offline from disk; it makes the page about 5 MB, small beside the
run's ledger and logs. Every figure sits in `<div class="figure" id="...">` (the ids are
FIGURE_IDS) so a browser test can find it.

Like jobs/report/combined.py this is a pure function of recorded results, except that the
"data with learned lines" figure reads the data again through workers/data.py (the
article's houses and synthetic data are rebuilt; a CSV is read if it is still there).
plotly is imported inside render_html, so `runjobs --help` never pays for it. Each
framework's colours per variant, line and names come from the framework registry
(workers/frameworks/), which imports no framework.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

import orjson

from jobs.report import combined as reports
from workers import frameworks

FIGURE_IDS = {
    "loss": "loss-curves",
    "data": "data-fit",
    "model_fit": "model-fit",
    "timings": "timings",
    "sweep": "sweep-gap",
}

# Caps that keep a large sweep's page readable and its file small; a note says what was left out.
MAX_LOSS_PANELS = 12
MAX_POINTS_PER_CURVE = 1000
MAX_DATASETS = 4
# The data points a data panel draws at most: a page of a 10^6-row CSV otherwise weighs
# about 115 MB and takes most of a run's time to write. A larger data set is drawn as a
# uniform random sample (the same one on every rebuild), and the page says so.
MAX_DATA_POINTS = 5000
MAX_FITTED_JOBS = 12
MAX_TIMING_BARS_PER_JOB = 16
MAX_SWEEP_SERIES = 12
MAX_CURVES_PER_PANEL = 16
MAX_UNFOLDED_ROWS = 24

# For a job whose framework or variant has no colour in the registry (a record of an older run).
OTHER_COLOR = "#7f7f7f"
OPTIMUM_COLOR = "#000000"
TIMING_PARTS = (
    ("startup_s", "start-up", "#9ecae1"),
    ("setup_s", "set-up", "#fdae6b"),
    ("train_s", "train", "#31a354"),
    ("predict_s", "predict", "#756bb1"),
)


def render_html(report: dict[str, Any]) -> str:
    """The whole page: summary, comparison table and the figures, with plotly.js inlined once."""
    import plotly.offline

    jobs = report["jobs"]
    body = [
        _header(report),
        _section("Comparison", _comparison_html(report)),
        _figure_section("Loss curves", FIGURE_IDS["loss"], *_loss_figure(jobs)),
        _figure_section(
            "Data, learned lines and the least-squares line", FIGURE_IDS["data"], *_data_figure(jobs)
        ),
        _figure_section("Time per job", FIGURE_IDS["timings"], *_timing_figure(jobs)),
    ]
    if any("fitted" in job for job in jobs):
        body.insert(
            -1,
            _figure_section(
                "Models beyond the line: predictions against the target",
                FIGURE_IDS["model_fit"],
                *_model_fit_figure(jobs),
            ),
        )
    if is_sweep(jobs):
        body.append(
            _figure_section(
                "Gap to the optimum against learning rate", FIGURE_IDS["sweep"], *_sweep_figure(jobs)
            )
        )
    plotly_js = plotly.offline.get_plotlyjs()
    # A literal </script> inside the bundle would end the script element early.
    plotly_js = plotly_js.replace("</script", "<\\/script")
    title = _escape(f"runjobs report {report.get('run_id', '')}")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title}</title>\n<style>{STYLE}</style>\n"
        f'<script type="text/javascript">{plotly_js}</script>\n</head>\n<body>\n'
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def is_sweep(jobs: list[dict[str, Any]]) -> bool:
    """A run is a sweep when its jobs use more than one learning rate or more than one seed."""
    learning_rates = {json.dumps(job["config"].get("lr")) for job in jobs}
    seeds = {json.dumps(job["config"].get("seed")) for job in jobs}
    return len(learning_rates) > 1 or len(seeds) > 1


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1200px;
       padding: 0 16px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 4px; }
h2 { font-size: 1.2em; margin-top: 32px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; }
td.text, th.text { text-align: left; }
td.text { font-family: ui-monospace, monospace; }
.meta { color: #555; margin: 2px 0; }
.note { color: #555; font-size: 0.9em; margin: 4px 0; }
.warning { color: #8a4b00; }
.error { color: #a40000; }
.status-failed, .status-cancelled, .status-diverged { color: #a40000; }
.status-not_converged { color: #8a4b00; }
.figure { border: 1px solid #eee; margin: 8px 0; }
summary { cursor: pointer; margin: 8px 0; color: #333; }
"""


def _escape(value: Any) -> str:
    return html.escape(str(value))


def _plot_text(value: Any) -> str:
    """Text for inside a plot: plotly.js reads a few HTML tags in labels, so escape them too."""
    return html.escape(str(value), quote=False)


def _section(title: str, content: str) -> str:
    return f"<section>\n<h2>{_escape(title)}</h2>\n{content}\n</section>"


def _notes(notes: list[str]) -> str:
    return "".join(f'<p class="note">{_escape(note)}</p>\n' for note in notes)


def _figure_section(title: str, figure_id: str, figure: Any, notes: list[str]) -> str:
    """A section with the figure (or, when nothing can be drawn, only the notes saying why)."""
    content = _notes(notes)
    if figure is not None:
        figure_html = figure.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=f"{figure_id}-plot",
            config={"displaylogo": False, "responsive": True},
            default_height=f"{figure.layout.height}px",
        )
        content = f'<div class="figure" id="{figure_id}">{figure_html}</div>\n' + content
    return _section(title, content)


def _header(report: dict[str, Any]) -> str:
    cluster = report.get("cluster") or {}
    summary = report.get("summary") or {}
    driver = (report.get("driver") or {}).get("timings") or {}
    lines = [f"<h1>runjobs report {_escape(report.get('run_id', ''))}</h1>"]
    if cluster:
        lines.append(
            f'<p class="meta">Cluster {_escape(cluster.get("address"))}: '
            f"{_escape(cluster.get('nodes'))} node(s), "
            f"{_escape(_count(cluster.get('cpus')))} CPU(s), {_escape(_count(cluster.get('gpus')))} GPU(s)"
            + (" (embedded)" if cluster.get("embedded") else "")
            + "</p>"
        )
    if summary:
        lines.append(
            f'<p class="meta">{summary.get("jobs", 0)} job(s): {summary.get("succeeded", 0)} succeeded, '
            + (f"{summary['stopped']} stopped early, " if summary.get("stopped") else "")
            + f"{summary.get('failed', 0)} failed, {summary.get('cancelled', 0)} cancelled"
            + (
                f"; {summary['packed_jobs']} of them trained in {summary['packs']} pack(s)"
                if summary.get("packs")
                else ""
            )
            + "</p>"
        )
    if driver:
        parts = [
            f"{label} {_seconds(driver.get(key))}"
            for key, label in (("connect_s", "connect"), ("jobs_s", "jobs"), ("disconnect_s", "disconnect"))
            if driver.get(key) is not None
        ]
        lines.append(f'<p class="meta">Driver: {_escape(", ".join(parts))}</p>')
    lines += [f'<p class="warning">warning: {_escape(message)}</p>' for message in report.get("warnings", [])]
    lines.append(
        '<p class="note">The plots are interactive: hover for values, drag to zoom, '
        "double-click to reset.</p>"
    )
    return "<header>\n" + "\n".join(lines) + "\n</header>"


def _count(value: Any) -> str:
    return "-" if value is None else f"{value:g}"


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{value:.2f} s"


# The comparison section: the same table as report.md, the framework pairs, seed groups, errors.


def _comparison_html(report: dict[str, Any]) -> str:
    header, rows = reports.table_rows(report)
    pairs = report.get("comparison", {}).get("pairs", [])
    groups = report.get("aggregates", {}).get("groups", [])
    parts = []
    # A large sweep's job and pair tables would push every figure pages down: folded, one click
    # away, with the seed groups (a line per setting) shown above them instead.
    parts.append(_foldable(f"{len(report['jobs'])} jobs", _table(header, rows, status_column=1), len(rows)))
    # One table per two frameworks compared (with the built-in ones: TensorFlow and torch).
    by_frameworks = _grouped(pairs, lambda pair: "/".join(reports.pair_frameworks(pair)))
    for framework_pair in by_frameworks.values():
        first, second = reports.pair_frameworks(framework_pair[0])
        parts.append(
            _foldable(
                f"{len(framework_pair)} {_label(first)} / {_label(second)} pairs",
                _table(*_pair_rows(framework_pair, first, second), text_columns=3),
                len(framework_pair),
            )
        )
    if groups:
        grouped = [
            '<p class="note">Repeated seeds, grouped (mean &plusmn; standard deviation):</p>',
            _table(*_group_rows(groups)),
        ]
        parts = grouped + parts if len(rows) > MAX_UNFOLDED_ROWS else parts + grouped
    failed = [job for job in report["jobs"] if job.get("error")]
    parts += [
        f'<p class="error"><code>{_escape(job["id"])}</code> {_escape(job["status"])}: '
        f"{_escape(job['error'])}</p>"
        for job in failed
    ]
    return "\n".join(parts)


def _foldable(summary: str, content: str, rows: int) -> str:
    if rows <= MAX_UNFOLDED_ROWS:
        return content
    return f"<details><summary>{_escape(summary)} (click to show)</summary>\n{content}\n</details>"


def _table(
    header: list[str], rows: list[list[str]], status_column: int | None = None, text_columns: int = 1
) -> str:
    """An HTML table; the first `text_columns` columns are names, left-aligned, the rest numbers."""
    text_class = ' class="text"'
    head = "".join(
        f"<th{text_class if index < text_columns else ''}>{_escape(cell)}</th>"
        for index, cell in enumerate(header)
    )
    body = []
    for row in rows:
        cells = []
        for index, cell in enumerate(row):
            classes = [f"status-{cell}"] if index == status_column and cell else []
            classes += ["text"] if index < text_columns else []
            css = f' class="{_escape(" ".join(classes))}"' if classes else ""
            cells.append(f"<td{css}>{_escape(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def _pair_rows(pairs: list[dict[str, Any]], first: str, second: str) -> tuple[list[str], list[list[str]]]:
    """The pairs of two frameworks, `first` and `second`, a row each."""
    header = [
        f"{first} job",
        f"{second} job",
        "same config",
        f"train time {_abbreviation(first)}/{_abbreviation(second)}",
        "faster",
        "max param diff (rel)",
    ]
    rows = []
    for pair in pairs:
        ratio = (pair.get("train_time_ratio") or {}).get(f"{first}/{second}")
        difference = (pair.get("max_param_difference") or {}).get("relative")
        same = "yes" if pair["same_config"] else "no: " + ", ".join(pair.get("differing_fields", []))
        rows.append(
            [
                pair["jobs"][first],
                pair["jobs"][second],
                same,
                "-" if ratio is None else f"{ratio:.2f}",
                pair.get("faster") or "-",
                "-" if difference is None else "0" if difference == 0 else f"{difference:.1e}",
            ]
        )
    return header, rows


def _label(framework: str) -> str:
    """The framework's name in prose ("TensorFlow"), or its record name when it is not registered."""
    display = frameworks.display(framework)
    return display.label if display is not None else framework


def _abbreviation(framework: str) -> str:
    display = frameworks.display(framework)
    return display.abbreviation if display is not None else framework


def _group_rows(groups: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    varying = _varying_fields([group["config"] for group in groups], exclude=("framework", "variant", "seed"))

    def plus_minus(value: dict[str, Any], digits: str) -> str:
        return "-" if value["mean"] is None else f"{value['mean']:{digits}} ± {value['std']:.1g}"

    header = ["group", "seeds", "w mean", "R2 gap", "train s", "converged"]
    rows = [
        [
            " ".join([_job_kind(group), *(f"{key}={group['config'].get(key)}" for key in varying)]),
            _seed_list(group["seeds"]),
            plus_minus(group["weights"][0], ".4g") if group["weights"] else "-",
            plus_minus(group["r2_gap"], ".1e"),
            plus_minus(group["train_s"], ".3f"),
            f"{group['convergence'].get('converged', 0)}/{len(group['jobs'])}",
        ]
        for group in groups
    ]
    return header, rows


def _seed_list(seeds: list[Any]) -> str:
    if len(seeds) <= 6:
        return ",".join(str(seed) for seed in seeds)
    return f"{len(seeds)}: {seeds[0]}, {seeds[1]}, ... {seeds[-1]}"


# Helpers shared by the figures.


def _job_kind(job: dict[str, Any]) -> str:
    """framework, or framework-variant for a multi-device job."""
    variant = job.get("variant", "single")
    return job["framework"] + ("" if variant == "single" else f"-{variant}")


def _color(job: dict[str, Any]) -> str:
    display = frameworks.display(job["framework"])
    if display is None:
        return OTHER_COLOR
    return display.colors.get(job.get("variant", "single"), OTHER_COLOR)


def _line(job: dict[str, Any]) -> dict[str, Any]:
    """The job's line: its variant's colour, its framework's width and dash (the registry's `Display`).

    Frameworks that learned the same thing draw on top of each other: a wide solid
    TensorFlow line under a thin dashed torch line keeps both visible.
    """
    display = frameworks.display(job["framework"])
    if display is None:
        return {"color": OTHER_COLOR, "width": 2, "dash": "dot"}
    line: dict[str, Any] = {"color": _color(job), "width": display.line_width}
    if display.line_dash is not None:
        line["dash"] = display.line_dash
    return line


def _varying_fields(configs: list[dict[str, Any]], exclude: tuple[str, ...] = ()) -> list[str]:
    """The config fields whose values differ between the given configs, in a stable order."""
    keys = sorted({key for config in configs for key in config} - set(exclude))
    varying = []
    for key in keys:
        first = _comparable(configs[0].get(key)) if configs else None
        if any(_comparable(config.get(key)) != first for config in configs[1:]):
            varying.append(key)
    return varying


def _comparable(value: Any) -> Any:
    """A config value as equality should see it: 1, 1.0 and true apart, lists by their JSON."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return type(value), value
    if isinstance(value, (list, tuple)):
        return tuple(_comparable(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((str(key), _comparable(item)) for key, item in value.items()))
    return repr(value)


def _training_key(job: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    """What a job trained, apart from the framework and how it was spread over devices."""
    ignored = {"framework", *reports.DISTRIBUTION_FIELDS, *ignore}
    kept = {key: value for key, value in job["config"].items() if key not in ignored}
    return orjson.dumps(kept, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()


def _grouped(jobs: list[dict[str, Any]], key: Any) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        groups.setdefault(key(job), []).append(job)
    return groups


def _balanced(jobs: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most `limit` jobs, taken in turn from each framework and variant, so none is crowded out."""
    by_kind = list(_grouped(jobs, _job_kind).values())
    chosen: list[dict[str, Any]] = []
    for turn in range(max(len(members) for members in by_kind) if by_kind else 0):
        chosen += [members[turn] for members in by_kind if turn < len(members)]
    chosen = chosen[:limit]
    return [job for job in jobs if any(job is picked for picked in chosen)]


def _settings(config: dict[str, Any]) -> str:
    """The training settings of a config in a few words, for a panel every job shares."""
    return (
        f"{config.get('optimizer')} lr={config.get('lr')}, {config.get('epochs')} epochs, "
        f"batch {config.get('batch_size')}" + (", normalised" if config.get("normalize") else "")
    )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _thinned(values: list[Any], epochs: list[int] | None = None) -> tuple[list[int], list[Any]]:
    """Epoch numbers (from 1) and values, at most MAX_POINTS_PER_CURVE of them, always with the last.

    `epochs`: the record's `history_epochs`, when its history holds only those epochs.
    """
    step = max(1, math.ceil(len(values) / MAX_POINTS_PER_CURVE))
    indices = list(range(0, len(values), step))
    if indices and indices[-1] != len(values) - 1:
        indices.append(len(values) - 1)
    return [epochs[index] if epochs else index + 1 for index in indices], [values[index] for index in indices]


def _grid(count: int) -> tuple[int, int]:
    columns = 1 if count == 1 else 2 if count <= 4 else 3
    return math.ceil(count / columns), columns


def _base_layout(figure: Any, height: int) -> None:
    figure.update_layout(
        template="plotly_white",
        height=height,
        margin={"l": 70, "r": 20, "t": 60, "b": 50},
        # On the right, where a legend cannot cover subplot titles.
        legend={"orientation": "v", "x": 1.02, "xanchor": "left", "y": 1, "yanchor": "top"},
        hoverlabel={"namelength": -1},
    )


# Loss curves: one panel per training config; frameworks and variants of that config overlaid.


def _loss_figure(jobs: list[dict[str, Any]]) -> tuple[Any, list[str]]:
    from plotly.subplots import make_subplots

    notes = []
    with_history = [job for job in jobs if (job.get("loss") or {}).get("history")]
    without = [job["id"] for job in jobs if not (job.get("loss") or {}).get("history")]
    if without:
        notes.append(f"No loss history (the job did not finish training): {', '.join(without)}.")
    if not with_history:
        return None, notes or ["No job recorded a loss history."]
    panels = _grouped(with_history, _training_key)
    if len(panels) > MAX_LOSS_PANELS:
        # Too many configs for a panel each: one panel per config apart from the seed.
        notes.append(f"{len(panels)} training configs: the seeds of a config share a panel.")
        panels = _grouped(with_history, lambda job: _training_key(job, ignore=("seed",)))
    keys = list(panels)
    if len(keys) > MAX_LOSS_PANELS:
        notes.append(
            f"{len(keys)} panels; the first {MAX_LOSS_PANELS} are drawn, the rest are in report.json."
        )
        keys = keys[:MAX_LOSS_PANELS]
    crowded = [key for key in keys if len(panels[key]) > MAX_CURVES_PER_PANEL]
    if crowded:
        notes.append(
            f"{len(crowded)} panel(s) hold more than {MAX_CURVES_PER_PANEL} jobs: "
            f"{MAX_CURVES_PER_PANEL} are drawn, shared evenly between frameworks and variants."
        )
    varying = _varying_fields([json.loads(key) for key in panels])
    titles = []
    for key in keys:
        config = json.loads(key)
        label = " ".join(f"{name}={config.get(name)}" for name in varying) or _settings(config)
        units = {job["loss"].get("history_units", "original") for job in panels[key]}
        if units == {"standardised"}:
            label += " (standardised units)"
        titles.append(_plot_text(label))
    rows, columns = _grid(len(keys))
    figure = make_subplots(
        rows=rows, cols=columns, subplot_titles=titles, horizontal_spacing=0.07,
        vertical_spacing=min(0.12, 0.5 / rows),
    )  # fmt: skip
    shown_in_legend = set()
    for index, key in enumerate(keys):
        row, column = index // columns + 1, index % columns + 1
        for job in _balanced(panels[key], MAX_CURVES_PER_PANEL):
            epochs, losses = _thinned(job["loss"]["history"], job.get("history_epochs"))
            kind = _job_kind(job)
            figure.add_trace(
                {
                    "type": "scatter",
                    "mode": "lines",
                    "x": epochs,
                    "y": losses,
                    "name": _plot_text(kind),
                    "legendgroup": kind,
                    "showlegend": kind not in shown_in_legend,
                    "line": _line(job),
                    "hovertemplate": _plot_text(job["id"]) + "<br>epoch %{x}<br>loss %{y:.4g}<extra></extra>",
                },
                row=row,
                col=column,
            )
            shown_in_legend.add(kind)
    figure.update_yaxes(type="log", exponentformat="power")
    figure.update_xaxes(title_text="epoch", row=rows)
    figure.update_yaxes(title_text="loss (MSE)", col=1)
    _base_layout(figure, height=140 + 300 * rows)
    notes.append(
        "Mean squared error per epoch, log scale; jobs that trained the same config are in one panel "
        "(frameworks and variants overlaid). Loss is in the units training saw."
    )
    return figure, notes


# The data with each learned line and the least-squares line.


def _data_figure(jobs: list[dict[str, Any]]) -> tuple[Any, list[str]]:
    from plotly.subplots import make_subplots

    from workers.data import DataError, load_dataset

    fitted = [job for job in jobs if job.get("params") and job.get("reference")]
    # A model beyond the line has no w and b to draw; its loss curve is in the figure above.
    beyond = [job for job in fitted if "weights" not in job["params"]]
    fitted = [job for job in fitted if "weights" in job["params"]]
    leading = []
    if beyond:
        names = sorted({job["config"].get("model", "?") for job in beyond})
        leading.append(
            f"{len(beyond)} job(s) of model {', '.join(names)}: no line to draw; "
            "their loss curves are overlaid above."
        )
    if not fitted:
        return None, leading or ["No job learned parameters, so there is no line to draw."]
    by_data: dict[str, list[dict[str, Any]]] = {}
    for job in fitted:
        config = job["config"]
        key = json.dumps([config.get("data"), list(config.get("features") or []), config.get("target")])
        by_data.setdefault(key, []).append(job)
    notes = leading
    keys = list(by_data)
    if len(keys) > MAX_DATASETS:
        notes.append(f"{len(keys)} data sets; the first {MAX_DATASETS} are drawn.")
        keys = keys[:MAX_DATASETS]
    panels = []
    for key in keys:
        source, features, target = json.loads(key)
        try:
            dataset = load_dataset(source, tuple(features), target)
        except (DataError, OSError) as error:
            dataset = None
            notes.append(f"Data {source} could not be read again: {error}")
        if dataset is not None and dataset.rows > MAX_DATA_POINTS:
            notes.append(
                f"Data {source}: {MAX_DATA_POINTS:,} of its {dataset.rows:,} rows are drawn, a uniform "
                "random sample; the lines, losses and parameters are the jobs' own, over all rows."
            )
            dataset = _sample(dataset, MAX_DATA_POINTS)
        panels.append((source, dataset, by_data[key]))
    drawable = []
    for panel in panels:
        if _feature_count(panel) == 1 or panel[1] is not None:
            drawable.append(panel)
        else:
            notes.append(
                f"Data {panel[0]} has several features and is gone: predicted against actual is not drawn."
            )
    if not drawable:
        return None, notes
    # One feature: the lines, and under them each line's difference from the least-squares line,
    # which shows the jobs apart where the lines themselves coincide at the data's scale.
    titles, heights = [], []
    for source, dataset, panel_jobs in drawable:
        titles.append(_plot_text(_data_title(source, dataset, panel_jobs)))
        heights.append(420)
        if _feature_count((source, dataset, panel_jobs)) == 1:
            titles.append("learned line minus the least-squares line")
            heights.append(220)
    figure = make_subplots(
        rows=len(titles), cols=1, subplot_titles=titles, row_heights=heights,
        vertical_spacing=min(0.1, 0.3 / len(titles)),
    )  # fmt: skip
    row = 1
    for panel in drawable:
        if _feature_count(panel) == 1:
            notes += _draw_lines(figure, row, *panel)
            row += 2
        else:
            notes += _draw_predicted_against_actual(figure, row, *panel)
            row += 1
    _base_layout(figure, height=120 + sum(heights))
    return figure, notes


def _sample(dataset: Any, count: int) -> Any:
    """`count` rows of `dataset` chosen uniformly at random, in their order, the same every time."""
    import dataclasses

    import numpy as np

    chosen = np.sort(np.random.default_rng(0).choice(dataset.rows, size=count, replace=False))
    return dataclasses.replace(dataset, features=dataset.features[chosen], target=dataset.target[chosen])


def _feature_count(panel: tuple[str, Any, list[dict[str, Any]]]) -> int:
    return len(panel[2][0]["params"]["weights"])


def _data_title(source: str, dataset: Any, jobs: list[dict[str, Any]]) -> str:
    # The job's own count: a drawn data set may be a sample of it.
    rows = (jobs[0].get("data") or {}).get("rows") or (dataset.rows if dataset is not None else None)
    return f"data {source}" + (f" ({rows} rows)" if rows is not None else "")


def _capped(jobs: list[dict[str, Any]], notes: list[str], what: str) -> list[dict[str, Any]]:
    if len(jobs) > MAX_FITTED_JOBS:
        notes.append(
            f"{len(jobs)} jobs; the {what} of {MAX_FITTED_JOBS} are drawn, "
            "shared evenly between frameworks and variants."
        )
    return _balanced(jobs, MAX_FITTED_JOBS)


def _draw_lines(figure: Any, row: int, source: str, dataset: Any, jobs: list[dict[str, Any]]) -> list[str]:
    """One feature: the points, the least-squares line and each job's learned line in `row`;
    each learned line's difference from the least-squares line in the row below."""
    notes: list[str] = []
    reference = jobs[0]["reference"]
    if dataset is not None:
        low, high = float(dataset.features[:, 0].min()), float(dataset.features[:, 0].max())
        x_title, y_title = dataset.feature_names[0], dataset.target_name
    else:
        inputs = [prediction["input"][0] for job in jobs for prediction in job.get("predictions", [])]
        low, high = min([0.0, *inputs]), max([1.0, *(value * 1.25 for value in inputs)])
        names = jobs[0].get("data") or {}
        x_title = (names.get("features") or ["x"])[0]
        y_title = names.get("target") or "y"
        notes.append(f"The lines for {source} are drawn without its points, which could not be read.")
    span = [low, high]
    optimum_weight, optimum_bias = reference["weights"][0], reference["bias"]

    def line(weight: float, bias: float) -> list[float | None]:
        if not (_finite(weight) and _finite(bias)):
            return [None, None]
        return [weight * x + bias for x in span]

    for job in _capped(jobs, notes, "learned lines"):
        weight, bias = job["params"]["weights"][0], job["params"]["bias"]
        name = _plot_text(f"{job['id']} ({job.get('convergence')})")
        hover = _plot_text(f"{job['id']}: w={_g(weight)} b={_g(bias)}")
        figure.add_trace(
            {
                "type": "scatter", "mode": "lines", "x": span, "y": line(weight, bias), "name": name,
                "legendgroup": job["id"], "line": _line(job),
                "hovertemplate": hover + "<br>x %{x:.4g}<br>y %{y:.4g}<extra></extra>",
            },
            row=row, col=1,
        )  # fmt: skip
        difference = (
            line(weight - optimum_weight, bias - optimum_bias) if _finite(optimum_weight) else [None] * 2
        )
        figure.add_trace(
            {
                "type": "scatter", "mode": "lines", "x": span, "y": difference, "name": name,
                "legendgroup": job["id"], "showlegend": False, "line": _line(job),
                "hovertemplate": hover + "<br>x %{x:.4g}<br>difference %{y:.4g}<extra></extra>",
            },
            row=row + 1, col=1,
        )  # fmt: skip
    figure.add_trace(
        {
            "type": "scatter", "mode": "lines", "x": span, "y": line(optimum_weight, optimum_bias),
            "name": "least squares", "line": {"color": OPTIMUM_COLOR, "width": 1.5, "dash": "dot"},
            "hovertemplate": _plot_text(f"least squares: w={_g(optimum_weight)} b={_g(optimum_bias)}")
            + "<extra></extra>",
        },
        row=row, col=1,
    )  # fmt: skip
    if dataset is not None:
        # Drawn last, so the points sit on top of the lines.
        figure.add_trace(
            {
                "type": "scatter", "mode": "markers", "name": "data",
                "x": [float(value) for value in dataset.features[:, 0]],
                "y": [float(value) for value in dataset.target],
                "marker": {"color": "#444", "size": 8, "opacity": 0.8},
            },
            row=row, col=1,
        )  # fmt: skip
    figure.update_xaxes(title_text=_plot_text(x_title), row=row + 1, col=1)
    figure.update_yaxes(title_text=_plot_text(y_title), row=row, col=1)
    figure.update_yaxes(title_text=_plot_text(f"difference in {y_title}"), row=row + 1, col=1)
    figure.update_xaxes(matches=f"x{'' if row == 1 else row}", row=row + 1, col=1)
    return notes


def _draw_predicted_against_actual(
    figure: Any, row: int, source: str, dataset: Any, jobs: list[dict[str, Any]]
) -> list[str]:
    """Several features: a line cannot be drawn, so each job's prediction is plotted against the target."""
    import numpy as np

    notes = [
        f"{source} has {dataset.feature_count} features: each job's prediction is plotted against the target."
    ]
    actual = [float(value) for value in dataset.target]

    def predicted(weights: list[float], bias: float) -> list[float | None]:
        if not all(_finite(value) for value in [*weights, bias]):
            return [None] * len(actual)
        return [float(value) for value in dataset.features @ np.asarray(weights, dtype=np.float64) + bias]

    reference = jobs[0]["reference"]
    for job in _capped(jobs, notes, "predictions"):
        figure.add_trace(
            {
                "type": "scatter", "mode": "markers", "x": actual,
                "y": predicted(job["params"]["weights"], job["params"]["bias"]),
                "name": _plot_text(f"{job['id']} ({job.get('convergence')})"),
                "marker": {"color": _color(job), "size": 5, "opacity": 0.6},
            },
            row=row, col=1,
        )  # fmt: skip
    figure.add_trace(
        {
            "type": "scatter", "mode": "markers", "x": actual,
            "y": predicted(reference["weights"], reference["bias"]), "name": "least squares",
            "marker": {"color": OPTIMUM_COLOR, "size": 4, "symbol": "x"},
        },
        row=row, col=1,
    )  # fmt: skip
    low, high = min(actual), max(actual)
    figure.add_trace(
        {
            "type": "scatter", "mode": "lines", "x": [low, high], "y": [low, high],
            "name": "predicted = actual", "line": {"color": "#999", "dash": "dot"},
        },
        row=row, col=1,
    )  # fmt: skip
    figure.update_xaxes(title_text=_plot_text(f"actual {dataset.target_name}"), row=row, col=1)
    figure.update_yaxes(title_text=_plot_text(f"predicted {dataset.target_name}"), row=row, col=1)
    return notes


def _g(value: Any) -> str:
    return f"{value:.6g}" if _finite(value) else "nan"


# Timing: stacked start-up, set-up, train and predict per job (or per framework and variant).


def _timing_figure(jobs: list[dict[str, Any]]) -> tuple[Any, list[str]]:
    import plotly.graph_objects as go

    timed = [job for job in jobs if (job.get("timings") or {}).get("train_s") is not None]
    notes = []
    untimed = [job["id"] for job in jobs if (job.get("timings") or {}).get("train_s") is None]
    if untimed:
        notes.append(f"Not timed (the job did not finish): {', '.join(untimed)}.")
    if not timed:
        return None, notes
    if len(timed) <= MAX_TIMING_BARS_PER_JOB:
        labels = [job["id"] for job in timed]
        bars = [[job["timings"].get(key) for job in timed] for key, _, _ in TIMING_PARTS]
    else:
        kinds: dict[str, list[dict[str, Any]]] = {}
        for job in timed:
            kinds.setdefault(_job_kind(job), []).append(job)
        labels = [f"{kind} (mean of {len(members)})" for kind, members in kinds.items()]
        bars = [
            [_mean([job["timings"].get(key) for job in members]) for members in kinds.values()]
            for key, _, _ in TIMING_PARTS
        ]
        notes.append(f"{len(timed)} jobs: bars are the mean per framework and variant.")
    figure = go.Figure()
    for (_, label, color), values in zip(TIMING_PARTS, bars):
        figure.add_trace(
            go.Bar(
                y=[_plot_text(name) for name in labels], x=values, name=label, orientation="h",
                marker={"color": color}, hovertemplate="%{y}<br>" + label + " %{x:.3f} s<extra></extra>",
            )
        )  # fmt: skip
    figure.update_layout(barmode="stack", legend={"traceorder": "normal"})
    figure.update_xaxes(title_text="seconds")
    figure.update_yaxes(autorange="reversed")
    _base_layout(figure, height=160 + 34 * len(labels))
    notes.append(
        "Start-up is a new worker process's start and the framework's import (a reused Ray worker pays "
        "almost nothing); set-up builds the model and optimizer; queueing is left out."
    )
    return figure, notes


def _model_fit_figure(jobs: list[dict[str, Any]]) -> tuple[Any, list[str]]:
    """Models without w and b: each job's recorded outputs on a sample of the rows, against the data.

    One feature: the data's points and each job's outputs as a curve over x. Several: each
    job's prediction against the target, with the diagonal.
    """
    from plotly.subplots import make_subplots

    from workers.data import DataError, load_dataset

    fitted = [job for job in jobs if job.get("status") == "succeeded" and job.get("fitted")]
    notes: list[str] = []
    by_data: dict[str, list[dict[str, Any]]] = {}
    for job in fitted:
        config = job["config"]
        key = json.dumps([config.get("data"), list(config.get("features") or []), config.get("target")])
        by_data.setdefault(key, []).append(job)
    keys = list(by_data)[:MAX_DATASETS]
    panels = []
    for key in keys:
        source, features, target = json.loads(key)
        try:
            panels.append((source, load_dataset(source, tuple(features), target), by_data[key]))
        except (DataError, OSError) as error:
            notes.append(f"Data {source} could not be read again, so its fits are not drawn: {error}")
    if not panels:
        return None, notes
    figure = make_subplots(
        rows=len(panels), cols=1, subplot_titles=[_plot_text(f"data {panel[0]}") for panel in panels],
        vertical_spacing=min(0.12, 0.4 / len(panels)),
    )  # fmt: skip
    for row, (_, dataset, panel_jobs) in enumerate(panels, start=1):
        one_feature = dataset.feature_count == 1
        sample_rows = sorted({row_index for job in panel_jobs for row_index in job["fitted"]["rows"]})
        # The data itself (one feature), or the line where a prediction equals the target.
        actual = [float(value) for value in dataset.target[sample_rows]]
        figure.add_trace(
            {
                "type": "scatter", "mode": "markers" if one_feature else "lines",
                "name": "data" if one_feature else "predicted = actual",
                "x": [float(value) for value in dataset.features[sample_rows, 0]] if one_feature else actual,
                "y": actual,
                "marker": {"color": "#444", "size": 4, "opacity": 0.5},
                "line": {"color": "#999", "dash": "dot"},
            },
            row=row, col=1,
        )  # fmt: skip
        for job in _capped(panel_jobs, notes, "fits"):
            rows = job["fitted"]["rows"]
            outputs = job["fitted"]["outputs"]
            if one_feature:
                order = sorted(range(len(rows)), key=lambda index: dataset.features[rows[index], 0])
                x_values = [float(dataset.features[rows[index], 0]) for index in order]
                y_values = [outputs[index] for index in order]
                trace = {"type": "scatter", "mode": "lines", "line": _line(job)}
            else:
                x_values = [float(dataset.target[index]) for index in rows]
                y_values = outputs
                trace = {"type": "scatter", "mode": "markers", "marker": {"color": _color(job), "size": 4}}
            trace.update(x=x_values, y=y_values, name=_plot_text(f"{job['id']} ({job.get('convergence')})"))
            figure.add_trace(trace, row=row, col=1)
        x_title = dataset.feature_names[0] if one_feature else f"actual {dataset.target_name}"
        figure.update_xaxes(title_text=_plot_text(x_title), row=row, col=1)
        figure.update_yaxes(title_text=_plot_text(dataset.target_name), row=row, col=1)
    _base_layout(figure, height=120 + 420 * len(panels))
    notes.append(
        "Each job's outputs on up to 500 of the data's rows, spread evenly, as the job recorded them."
    )
    return figure, notes


def _mean(values: list[Any]) -> float | None:
    finite = [value for value in values if _finite(value)]
    return sum(finite) / len(finite) if finite else None


# Sweeps: the R2 gap against the learning rate, mean over seeds with the min-max spread.


def _sweep_figure(jobs: list[dict[str, Any]]) -> tuple[Any, list[str]]:
    import plotly.graph_objects as go

    notes = []
    series: dict[str, dict[float, list[float]]] = {}
    labels: dict[str, tuple[str, dict[str, Any]]] = {}
    left_out = 0
    ignored = ("lr", "seed")
    varying = _varying_fields([job["config"] for job in jobs], exclude=(*ignored, "framework", "variant"))
    for job in jobs:
        gap = (job.get("loss") or {}).get("r2_gap")
        lr = job["config"].get("lr")
        if job["status"] != "succeeded" or not _finite(gap) or gap <= 0 or not _finite(lr):
            left_out += 1
            continue
        key = json.dumps({k: v for k, v in job["config"].items() if k not in ignored}, sort_keys=True)
        series.setdefault(key, {}).setdefault(float(lr), []).append(gap)
        labels[key] = (
            " ".join([_job_kind(job), *(f"{name}={job['config'].get(name)}" for name in varying)]),
            job,
        )
    if left_out:
        notes.append(
            f"{left_out} job(s) not drawn: failed, diverged, or a gap of 0 that a log scale cannot show."
        )
    if not series:
        return None, notes
    keys = list(series)
    if len(keys) > MAX_SWEEP_SERIES:
        notes.append(f"{len(keys)} series; the first {MAX_SWEEP_SERIES} are drawn.")
        keys = keys[:MAX_SWEEP_SERIES]
    figure = go.Figure()
    for key in keys:
        label, job = labels[key]
        learning_rates = sorted(series[key])
        gaps = [series[key][lr] for lr in learning_rates]
        means = [sum(values) / len(values) for values in gaps]
        figure.add_trace(
            go.Scatter(
                x=learning_rates, y=means, mode="lines+markers", name=_plot_text(label),
                line={"color": _color(job)}, marker={"size": 8},
                error_y={
                    "type": "data", "symmetric": False,
                    "array": [max(values) - mean for values, mean in zip(gaps, means)],
                    "arrayminus": [mean - min(values) for values, mean in zip(gaps, means)],
                },
                customdata=[len(values) for values in gaps],
                hovertemplate=_plot_text(label)
                + "<br>lr %{x:g}<br>mean gap %{y:.3g} over %{customdata} seed(s)<extra></extra>",
            )
        )  # fmt: skip
    all_rates = {lr for key in keys for lr in series[key]}
    figure.update_xaxes(title_text="learning rate", type="log" if len(all_rates) > 1 else "linear")
    figure.update_yaxes(title_text="R² gap to the least-squares optimum", type="log", exponentformat="power")
    _base_layout(figure, height=480)
    notes.append("Points are the mean over seeds; bars span the smallest to the largest gap of those seeds.")
    return figure, notes
