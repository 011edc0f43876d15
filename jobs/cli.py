"""The `runjobs` command line: parses options, prints, and maps errors to exit codes.

Exit codes: 0 every job succeeded (or was stopped by an early-stopping rule); 1 a job
failed or was cancelled; 2 a usage, spec or
data error, an output directory that cannot be used, or a cluster that cannot meet the
request (nothing was started); 3 the cluster cannot be reached; 130 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import click

from jobs.plan.fields import POINTS, SWITCH, parse_point
from jobs.plan.spec import DEFAULT_FRAMEWORKS, FIELDS, FRAMEWORKS, PRESETS, VARIANTS, Overrides, SpecError
from workers.export import FORMAT_PREFERENCE

EXIT_OK = 0
EXIT_JOBS_FAILED = 1
EXIT_USAGE = 2
EXIT_CLUSTER_UNREACHABLE = 3
EXIT_INTERRUPTED = 130


# What str.splitlines() breaks a line at; a terminal breaks at the first two.
LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


def one_line(message: str) -> str:
    """An error message as one line: a break inside it (a path or a CSV column named with
    one) is shown escaped, as `\\n`, so the error stays one line a script can read."""
    return "".join(
        character.encode("unicode_escape").decode() if character in LINE_BREAKS else character
        for character in message
    )


class RunjobsGroup(click.Group):
    """A group whose errors are one line on stderr: `runjobs: error: ...`, no usage dump.

    A bare `runjobs` (no command) is a request for help, not a mistake: it prints the
    group's help on stdout and exits 0, as `git` does.
    """

    # Click 8.2+ raises NoArgsIsHelpError, a UsageError, for a group given no command;
    # 8.1 printed the help itself. The empty tuple of an older Click matches nothing.
    no_command_given = getattr(click.exceptions, "NoArgsIsHelpError", ())

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except self.no_command_given as error:
            click.echo(error.ctx.get_help(), color=error.ctx.color)
            code = EXIT_OK
        except click.UsageError as error:
            hint = f" (see '{error.ctx.command_path} --help')" if error.ctx is not None else ""
            click.echo(f"runjobs: error: {one_line(error.format_message())}{hint}", err=True)
            code = EXIT_USAGE
        except click.ClickException as error:
            click.echo(f"runjobs: error: {one_line(error.format_message())}", err=True)
            code = error.exit_code
        except click.Abort:
            click.echo("runjobs: interrupted", err=True)
            code = EXIT_INTERRUPTED
        code = code if isinstance(code, int) else EXIT_OK
        if standalone_mode:
            sys.exit(code)
        return code


class InputError(click.ClickException):
    """Bad input found before anything started."""

    exit_code = EXIT_USAGE


class ClusterError(click.ClickException):
    """The Ray cluster could not be reached, or went away; a scheduler may retry later."""

    exit_code = EXIT_CLUSTER_UNREACHABLE


@click.group(cls=RunjobsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="runjobs")
def cli() -> None:
    """Run TensorFlow and PyTorch training jobs as Ray tasks and compare them in one report.

    Exit codes: 0 all jobs succeeded (or were stopped early by the spec's rule), 1 a job
    failed or was cancelled, 2 bad input or a
    request the cluster cannot meet (nothing started), 3 the cluster cannot be reached,
    130 interrupted.
    """


def job_field_options(command):
    """The submit options of every job field that declares one (jobs/plan/spec.py, JobSpec).

    Click's own types convert whole numbers and numbers (with its own error message);
    every other value arrives as text and goes through the field's parser, as `--set`
    does. A true-or-false field is a --name/--no-name pair; a field of inputs repeats.
    """
    for declared in reversed(FIELDS.values()):
        info = declared.info
        if info.option is None:
            continue
        name = info.option.removeprefix("--")
        if info.kind is SWITCH:
            command = click.option(
                f"--{name}/--no-{name}", declared.name, default=None, help=declared.help_text
            )(command)
        elif info.kind is POINTS:
            command = click.option(
                info.option, declared.name, multiple=True, metavar=info.kind.metavar,
                callback=_parse_points, help=declared.help_text,
            )(command)  # fmt: skip
        else:
            kind_type = click.Choice(info.kind.choices) if info.kind.choices else info.kind.click_type
            command = click.option(
                info.option, declared.name, type=kind_type, metavar=info.kind.metavar, help=declared.help_text
            )(command)
    return command


def _parse_points(context, parameter, texts) -> tuple[tuple[float, ...], ...]:
    """Each --predict input as numbers; one that is not is bad input (exit 2), as for any option."""
    try:
        return tuple(parse_point(text) for text in texts)
    except SpecError as error:
        raise InputError(str(error)) from None


@cli.command()
@click.argument("spec_file", required=False, type=click.Path(path_type=Path), metavar="[SPEC.yaml]")
@click.option(
    "--framework",
    "frameworks",
    multiple=True,
    type=click.Choice(FRAMEWORKS),
    help=f"Framework to run; repeat for several. Default: {' and '.join(DEFAULT_FRAMEWORKS)}.",
)
@click.option(
    "--preset",
    type=click.Choice(PRESETS),
    help="article: the source article's exact settings (Keras defaults for TensorFlow).",
)
@click.option(
    "--variant",
    "variants",
    multiple=True,
    type=click.Choice(VARIANTS),
    help="single (default); mirrored or multiworker (TensorFlow, tf.distribute); ddp (torch). "
    "Repeatable; each variant runs for the frameworks it belongs to.",
)
@job_field_options
@click.option(
    "--address",
    envvar="RAY_ADDRESS",
    show_envvar=True,
    help="Running Ray cluster: HOST:PORT (its GCS), ray://HOST:10001, auto, or http://HEAD:8265 "
    "(Ray Jobs: the driver runs on the cluster, results come back here). Default: an embedded local Ray.",
)
@click.option(
    "--keep-warm",
    metavar="DURATION",
    help="With a running cluster's --address: keep this run's warm workers, idle, for the next submit "
    "(e.g. 90s, 10m, 1h; 0: end them with the run). Default: 10m for CPU workers; GPU workers end "
    "with the run unless given. `runjobs pool status|stop` shows and ends them.",
)
@click.option(
    "--no-wait",
    is_flag=True,
    help="With an http:// (Ray Jobs) address: print the Ray job id and return; fetch results later "
    "with `runjobs report --address ADDR JOBID --output DIR`.",
)
@click.option("--output", type=click.Path(path_type=Path), help="Output directory. Default runs/<run-id>.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check the jobs, data, output directory and address form; print the jobs; start nothing.",
)
@click.option(
    "--json", "json_output", is_flag=True, help="Print one JSON summary on stdout instead of the table."
)
@click.option(
    "--rerun",
    type=click.Choice(["failed", "all"]),
    help="Into an existing output directory: also re-run failed jobs, or every job.",
)
@click.option("--max-concurrent", type=int, help="Run at most N jobs at once. Default: as resources allow.")
@click.option(
    "--wait-for-nodes",
    type=click.IntRange(min=1),
    metavar="N",
    help="Start once the cluster at --address has N nodes alive (a batch allocation's raylets "
    "joining), waiting up to RUNJOBS_CONNECT_TIMEOUT_S; exit 3 if they do not all join.",
)
@click.option(
    "--mlflow",
    "mlflow_uri",
    is_flag=False,
    flag_value="",
    metavar="[URI]",
    help="Also log each job to MLflow at URI as it ends (bare --mlflow: MLFLOW_TRACKING_URI). "
    "If MLflow cannot be reached the run goes on; log it later with `runjobs export`.",
)
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="[FRAMEWORK.]KEY=VALUE",
    help="Set any job field, e.g. --set epochs=200 or --set torch.lr=0.05; repeatable, applied last. "
    "The fields: " + ", ".join(FIELDS) + " (`runjobs fields` describes each).",
)
def submit(
    spec_file,
    dry_run,
    json_output,
    rerun,
    max_concurrent,
    wait_for_nodes,
    frameworks,
    preset,
    variants,
    address,
    no_wait,
    output,
    assignments,
    keep_warm,
    mlflow_uri,
    **field_values,
) -> None:
    """Train a model with each framework as Ray tasks and print one comparison.

    With no options: the built-in comparison, TensorFlow and PyTorch fitting the
    house-price line on the article's 10 houses, 500 epochs, full batch, Adam lr 0.01,
    both starting from zeros; --model mlp or your own model file trains something else,
    --framework jax adds JAX. Fields are layered: defaults, then --preset, then the
    options, then --set.

    A spec file may also search (sample:, or search: with Optuna) and stop jobs early
    (stopping:); see the README's "Searching and tracking". --mlflow logs each job to
    MLflow as it ends. On a running cluster (--address), warm workers stay for the next
    submit (--keep-warm; `runjobs pool`).

    Writes report.json, .csv, .md and .html to the output directory and exits 0 when
    every job succeeded or was stopped by the spec's stopping rule, 1 when any failed or
    was cancelled, 2 on bad input (nothing
    started), 3 when the cluster cannot be reached or goes away (finished jobs are kept),
    130 when interrupted (with --json, the summary is still printed).
    """
    from jobs.plan.keep_warm import parse_keep_warm
    from jobs.plan.planning import SubmitRequest, plan_jobs

    try:
        overrides = Overrides()
        for name, value in field_values.items():
            if value is None or value == ():
                continue  # not given: the field keeps its default (or the preset's)
            overrides.common[name] = FIELDS[name].parse_text(value) if isinstance(value, str) else value
        for assignment in assignments:
            overrides.add_assignment(assignment)
        request = SubmitRequest(
            tuple(frameworks),
            overrides,
            preset,
            address,
            output,
            tuple(variants),
            spec_file,
            rerun,
            max_concurrent,
            wait_for_nodes,
            keep_warm=parse_keep_warm(keep_warm) if keep_warm is not None else None,
        )
        if keep_warm is not None and not address:
            raise SpecError(
                "--keep-warm keeps workers on a running cluster: give its --address (an embedded "
                "Ray ends with the run, and its workers with it)"
            )
        tracking_uri = _mlflow_uri(mlflow_uri)  # --dry-run checks its form too
        if dry_run:
            from jobs.pipeline import check_destination, plan_search
            from jobs.plan.planning import search_of

            search = search_of(request)
            if search is not None:
                plan_search(request, search)
                check_destination(request)
                _print_search(search, json_output)
                return
            planned = plan_jobs(request)
            check_destination(request)
            _print_plan(planned, json_output, _packing_of(request, planned))
            return
        from jobs.pipeline import RemoteSubmission
        from jobs.pipeline import submit as run_submit
        from jobs.run.progress import for_stream
        from jobs.run.ray_jobs import is_jobs_address

        if no_wait and not is_jobs_address(address):
            raise SpecError("--no-wait needs a Ray Jobs address: --address http://HEAD:8265")
        if wait_for_nodes and (not address or is_jobs_address(address)):
            raise SpecError("--wait-for-nodes needs the address of a running cluster: --address HOST:6379")
        if tracking_uri and no_wait:
            raise SpecError(
                "--mlflow logs each job as it ends, which --no-wait does not wait for; fetch the run with "
                "`runjobs report --address ADDR JOBID --output DIR`, then `runjobs export DIR --mlflow URI`"
            )
        stopped = None
        with _stdout_kept_for_json(json_output), for_stream(sys.stderr) as progress:
            tracker = _mlflow_tracker(tracking_uri, progress)
            try:
                outcome = run_submit(request, progress, wait=not no_wait, tracker=tracker)
            except KeyboardInterrupt as interrupted:
                # A scheduler reading --json gets what was kept even from a stopped run.
                stopped = getattr(interrupted, "outcome", None)
                if not (json_output and stopped is not None):
                    raise
        if stopped is not None:
            from jobs.report.combined import summary

            click.echo(json.dumps(summary(stopped.report, stopped.output_dir, EXIT_INTERRUPTED), indent=2))
            raise click.Abort()  # "runjobs: interrupted", exit 130
        if isinstance(outcome, RemoteSubmission):
            _print_submission(outcome, json_output)
            return
    except (ValueError, RuntimeError) as error:
        _raise_as_user_error(error)

    from jobs.report.combined import render_table, summary

    if json_output:
        click.echo(json.dumps(summary(outcome.report, outcome.output_dir, outcome.exit_code), indent=2))
    else:
        click.echo(render_table(outcome.report), nl=False)
        click.echo(f"report: {outcome.output_dir / 'report.json'} (also report.html, report.csv, report.md)")
        click.echo(f"next: runjobs status {outcome.output_dir} | runjobs list {outcome.output_dir}")
    click.get_current_context().exit(outcome.exit_code)


@contextlib.contextmanager
def _stdout_kept_for_json(json_output: bool):
    """With --json, stdout holds the summary alone: while the run goes, anything else that
    writes to file descriptor 1 (Ray's notices from its raylet and autoscaler, which it
    prints to a driver's stdout; a framework's C++ logging; Ray's own processes, which
    inherit it) goes to stderr. A scheduler parses what is left."""
    if not json_output:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _print_submission(submission, json_output: bool) -> None:
    if json_output:
        click.echo(json.dumps(
            {"ray_job_id": submission.job_id, "address": submission.address,
             "output": str(submission.output_dir), "jobs": submission.jobs}, indent=2))  # fmt: skip
        return
    click.echo(f"submitted Ray job {submission.job_id} ({submission.jobs} job(s)) to {submission.address}")
    click.echo(f"next: runjobs status --address {submission.address} {submission.job_id}")
    click.echo(
        f"      runjobs report --address {submission.address} {submission.job_id} "
        f"--output {submission.output_dir}"
    )


def _print_search(search, json_output: bool) -> None:
    """What --dry-run can say of an adaptive search: its settings and space (trials come as it runs)."""
    space = {
        name: {distribution.kind: list(distribution.arguments)}
        for name, distribution in search.distributions.items()
    }
    if json_output:
        click.echo(
            json.dumps({"search": search.described(), "defaults": search.defaults, "sample": space}, indent=2)
        )
        return
    settings = search.settings
    click.echo(
        f"search {search.name!r}: {settings.algorithm}, {settings.trials} trial(s), "
        f"{settings.parallel} at a time, {settings.direction} {settings.metric}, seed {search.seed}"
    )
    for name, distribution in space.items():
        click.echo(f"  {name}: {json.dumps(distribution)}")
    if search.defaults:
        click.echo(f"  fixed: {json.dumps(search.defaults)}")
    click.echo("its trials are asked for as it runs, each from the results before it")


def _packing_of(request, planned):
    """The packs a run would form, for as many workers as --max-concurrent or this machine's CPUs.

    A run forms them once connected, for the cluster's CPUs: a cluster with more CPUs
    splits a large group into more, smaller packs; which jobs pack never changes.
    """
    from jobs.plan.packing import pack_jobs
    from jobs.plan.planning import stopping_of

    workers = request.max_concurrent or os.cpu_count() or 1
    return pack_jobs(planned, workers, stopping=stopping_of(request) is not None), workers


def _print_plan(planned, json_output: bool, packing_and_workers) -> None:
    from jobs.plan.packing import describe_packs

    packing, workers = packing_and_workers
    pack_of = {member.id: pack.id for pack in packing.packs for member in pack.members}
    if json_output:
        click.echo(
            json.dumps(
                [
                    {
                        "id": job.id,
                        "config": job.spec.to_record(),
                        "pack": pack_of.get(job.id),
                        "alone": packing.alone.get(job.id),
                    }
                    for job in planned
                ],
                indent=2,
            )
        )
        return
    columns = ("framework", "variant", "workers", "epochs", "optimizer", "lr", "batch_size", "seed", "data")
    # The model's columns only when some job trains a model other than the line.
    if any(job.spec.model != "linear" for job in planned):
        columns = (*columns[:1], "model", "hidden", "dtype", *columns[1:])
    # Any other field that differs between the jobs (a sampled beta_1, say) gets a column too.
    records = [job.spec.to_record() for job in planned]
    varying = [
        name
        for name in FIELDS
        if name not in columns and len({json.dumps(record[name], sort_keys=True) for record in records}) > 1
    ]
    columns = (*columns, *varying)

    def shown(record: dict, column: str) -> str:
        value = record[column]
        if column == "hidden":
            return ",".join(map(str, value)) if record["model"] == "mlp" else "-"
        return str(value)

    # Each job's record once (a sweep may hold 100,000 jobs), not once per cell.
    rows = [[job.id, *(shown(record, column) for column in columns)] for job, record in zip(planned, records)]
    _echo_table(["id", *columns], rows)
    packs = packing.packs
    click.echo(
        f"packing for {workers} worker(s): {len(packs)} pack(s) of {len(pack_of)} job(s), "
        f"{len(packing.alone)} job(s) alone"
    )
    for line in describe_packs(packing):
        click.echo(f"  {line}")
    click.echo(f"{len(planned)} job(s); nothing started (--dry-run)")


def _echo_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[index]) for row in [header, *rows]) for index in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


RUN_DIRECTORY = click.Path(path_type=Path, file_okay=False)


JOBS_ADDRESS = click.option(
    "--address",
    metavar="http://HEAD:8265",
    help="A Ray Jobs address: the argument is then the Ray job id that `submit --no-wait` printed.",
)


@cli.command()
@click.argument("directory", metavar="DIRECTORY | RAY_JOB_ID")
@JOBS_ADDRESS
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
def status(directory, address, json_output) -> None:
    """Counts by state, running jobs, elapsed time and an estimate of what is left.

    Reads the run's ledger only; works while the run goes on. With --address, reads a
    remote run's Ray job instead. Exit code 2 when DIRECTORY holds no run (or there is
    no such Ray job), 3 when the address does not answer.
    """
    from jobs.record.status import run_status

    if address:
        from jobs.run.ray_jobs import remote_status

        remote = _input(lambda: remote_status(address, directory))
        if json_output:
            click.echo(json.dumps(remote, indent=2))
            return
        counts = ", ".join(f"{count} {name}" for name, count in remote["counts"].items() if count)
        click.echo(
            f"Ray job {remote['job_id']}: {remote['ray_job_status']}; "
            f"{remote['jobs'] if remote['jobs'] is not None else '?'} job(s): {counts or 'none ended yet'}"
        )
        return
    directory = Path(directory)
    state = _input(lambda: run_status(directory))
    if json_output:
        click.echo(json.dumps(state, indent=2))
        return
    counts = ", ".join(f"{count} {name}" for name, count in state["counts"].items() if count)
    click.echo(f"run {state['run_id']}: {state['jobs']} job(s): {counts or 'none'}")
    click.echo(
        f"elapsed {state['elapsed_s']:.0f}s"
        + (f", about {state['eta_s']:.0f}s left" if state["eta_s"] else "")
    )
    for job_id in state["running"]:
        report = state["progress"].get(job_id)
        click.echo(
            f"running: {job_id}" + (f" (epoch {report[0]:.0f}, loss {report[1]:.6g})" if report else "")
        )


@cli.command(name="list")
@click.argument("directory", type=RUN_DIRECTORY)
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
def list_jobs(directory, json_output) -> None:
    """One line per job: id, state, attempts, convergence, train time."""
    from jobs.record.status import job_rows

    rows = _input(lambda: job_rows(directory))
    if json_output:
        click.echo(json.dumps(rows, indent=2))
        return
    header = ["id", "state", "attempts", "convergence", "train_s"]
    _echo_table(header, [[str(row[key]) if row[key] is not None else "-" for key in header] for row in rows])


@cli.command()
@click.argument("directory", type=RUN_DIRECTORY)
@click.argument("job_id", metavar="JOB")
def show(directory, job_id) -> None:
    """One job's full record (its config, state and results) as JSON."""
    from jobs.record.status import job_detail

    click.echo(json.dumps(_input(lambda: job_detail(directory, job_id)), indent=2))


@cli.command()
@click.argument("directory", metavar="DIRECTORY | RAY_JOB_ID")
@JOBS_ADDRESS
@click.option("--output", type=click.Path(path_type=Path), help="With --address: where to keep the run.")
def report(directory, address, output) -> None:
    """Rebuild report.json, .csv, .md and .html from the run's ledger; no Ray needed.

    With --address ADDR RAY_JOB_ID --output DIR: fetch a remote run (from `submit
    --no-wait`) into DIR, as far as it has got, and write its report there.
    """
    from jobs.report.combined import render_table
    from jobs.report.files import rebuild_report

    if address:
        from jobs.pipeline import fetch_remote

        if output is None:
            raise InputError("with --address, name the directory to keep the run in: --output DIR")
        fetched, state = _input(lambda: fetch_remote(address, directory, output))
        click.echo(render_table(fetched.report), nl=False)
        click.echo(f"report: {output / 'report.json'} (also report.html, report.csv, report.md)")
        if state not in ("SUCCEEDED", "FAILED", "STOPPED"):
            click.echo(f"Ray job {directory} is {state}: run this again for the rest", err=True)
        click.get_current_context().exit(fetched.exit_code)
    directory = Path(directory)
    rebuilt = _input(lambda: rebuild_report(directory))
    click.echo(render_table(rebuilt), nl=False)
    click.echo(f"report: {directory / 'report.json'} (also report.html, report.csv, report.md)")


@cli.command()
@click.argument("directory", type=RUN_DIRECTORY)
@click.option(
    "--mlflow",
    "mlflow_uri",
    is_flag=False,
    flag_value="",
    metavar="[URI]",
    help="The MLflow tracking URI to log to (bare --mlflow: MLFLOW_TRACKING_URI).",
)
def export(directory, mlflow_uri) -> None:
    """Log a run's jobs and report to MLflow from its ledger, as submit --mlflow does.

    One parent run per runjobs run, with the report files; a child run per ended job,
    with its config, loss per epoch, timings, logs and saved model. Running it again adds
    nothing twice: a job logged with the same record is skipped, one run again since
    replaces its child run. Exit code 0 once logged, 2 when DIRECTORY holds no run or
    --mlflow is missing or unusable, 3 when MLflow cannot be reached.
    """
    from jobs.report.mlflow_tracking import MlflowTrackingError, MlflowUnreachableError, export_run, shown

    if mlflow_uri is None:
        raise InputError("name where to log the run: --mlflow URI (a bare --mlflow uses MLFLOW_TRACKING_URI)")
    uri = _mlflow_uri(mlflow_uri)
    try:
        exported = export_run(directory, uri)
    except MlflowUnreachableError as error:
        raise ClusterError(str(error)) from None
    except MlflowTrackingError as error:
        raise InputError(str(error)) from None
    except (ValueError, RuntimeError) as error:
        _raise_as_user_error(error)
    jobs = exported.jobs
    click.echo(
        f"run {exported.run_id} in MLflow at {shown(uri)}, experiment {exported.experiment!r}: "
        f"{jobs['logged']} job(s) logged, {jobs['replaced']} replaced, {jobs['unchanged']} already there"
        + (f"; {exported.without_result} not ended yet" if exported.without_result else "")
    )
    if exported.url:
        click.echo(f"view: {exported.url}")


def _mlflow_uri(given: str | None) -> str | None:
    """The tracking URI of --mlflow [URI] (None when not given); one it cannot be is bad input."""
    if given is None:
        return None
    from jobs.report.mlflow_tracking import MlflowTrackingError, tracking_uri

    try:
        return tracking_uri(given)
    except MlflowTrackingError as error:
        raise InputError(str(error)) from None


def _mlflow_tracker(uri: str | None, progress):
    """submit's MLflow tracker (None without --mlflow); if it gives up, it says so on the run's progress."""
    if uri is None:
        return None
    from jobs.report.mlflow_tracking import MlflowTracker, MlflowTrackingError

    try:
        return MlflowTracker(uri, say=progress.say)
    except MlflowTrackingError as error:
        raise InputError(str(error)) from None


@cli.command()
@click.argument("directory", type=RUN_DIRECTORY)
@click.argument("job_id", metavar="JOB")
@click.option("--stream", type=click.Choice(["both", "stdout", "stderr"]), default="both", show_default=True)
def logs(directory, job_id, stream) -> None:
    """Print a job's kept stdout and stderr (each rank's, for multi-worker jobs; its pack's, when packed).

    Exit code 2 when the job is unknown or kept no output (it has not ended yet, or it
    ended without output: a worker that died, a job cancelled before it started).
    """
    from jobs.record.output import log_paths
    from jobs.record.status import job_detail

    job = _input(lambda: job_detail(directory, job_id))  # an unknown job names the known ones
    suffixes = {"both": (".out", ".err"), "stdout": (".out",), "stderr": (".err",)}[stream]
    pack = ((job["record"] or {}).get("timings") or {}).get("pack") or {}
    # A packed job's output is its pack's, kept once under the pack's name (a JOB.out beside
    # it is an earlier run's, when the job last trained alone).
    paths = [path for path in log_paths(directory, pack.get("id") or job_id) if path.suffix in suffixes]
    if pack.get("id") and paths:
        click.echo(f"{job_id} trained in {pack['id']} with {pack.get('size')} jobs: the pack's output")
    if not paths and job["state"] in ("pending", "running"):
        raise InputError(f"job {job_id} in {directory} is {job['state']}: its output is kept when it ends")
    if not paths:
        raise InputError(
            f"job {job_id} in {directory} ended {job['state']} without kept output (its worker died, or it "
            f"never started); `runjobs show {directory} {job_id}` has its error"
        )
    for path in paths:
        click.echo(f"==> {path} <==")
        click.echo(path.read_text(), nl=False)


@cli.command()
@click.argument("directory", type=RUN_DIRECTORY)
@click.option(
    "--wait", "wait_s", type=float, default=60.0, show_default=True, help="Seconds to wait for the driver."
)
@click.option(
    "--json", "json_output", is_flag=True, help="Then print the run's summary, as submit --json does."
)
def cancel(directory, wait_s, json_output) -> None:
    """Stop a running run: its driver cancels the running jobs and records them cancelled.

    Writes a cancel request into the run's ledger, which its driver reads a few times a
    second (no signal is sent: a driver started by cron or a batch script ignores
    Ctrl-C's), then waits for the driver's answer and prints how many running and
    pending jobs it cancelled. A run whose driver has ended without recording its jobs
    (killed outright, its node lost) is closed instead: its running and pending jobs are
    recorded cancelled and its report written, so a re-run runs them again. With --json
    the run's summary follows on stdout (exit_code 130: interrupted). Exit code 0 once
    the run is stopped, 1 when its driver has not answered within --wait, 2 when there is
    nothing to cancel.
    """
    from jobs.record.ledger import (
        CANCEL_OUTCOME,
        Ledger,
        close_abandoned,
        is_ledger_directory,
        request_cancel,
        running_driver,
    )

    if not is_ledger_directory(directory):
        raise InputError(
            f"{directory} holds no runjobs ledger (ledger.sqlite); name a run's output directory"
        )
    pid = running_driver(directory)
    if pid is None:
        with Ledger.open(directory, for_writing=False) as ledger:
            counts = _input(ledger.counts)
            remote = ledger.meta().get("remote")
        if not counts["running"] and not counts["pending"]:
            raise InputError(f"no runjobs driver is running on {directory}; nothing to cancel")
        if remote:
            job, where = remote.get("job_id"), remote.get("address")
            raise InputError(
                f"{directory} follows Ray job {job} on {where}, whose driver runs there; "
                f"stop it with `ray job stop --address {where} {job}`"
            )
        running, pending = _input(lambda: close_abandoned(directory))
        click.echo(
            f"no driver is running on {directory}: recorded its {running} running and {pending} pending "
            f"job(s) cancelled; a re-run runs them again",
            err=json_output,
        )
        _print_cancelled_summary(directory, json_output, write_files=True)
        return
    requested_at = _input(lambda: request_cancel(directory))
    click.echo(f"asked the driver (pid {pid}) to cancel the run in {directory}", err=True)

    def answer() -> dict | None:
        with Ledger.open(directory, for_writing=False) as ledger:
            outcome = ledger.meta().get(CANCEL_OUTCOME)
        return outcome if outcome and outcome.get("at", 0.0) >= requested_at else None

    deadline = time.monotonic() + wait_s
    outcome = None
    while running_driver(directory) is not None and time.monotonic() <= deadline:
        outcome = outcome or answer()
        time.sleep(0.2)
    outcome = outcome or answer()
    if outcome is not None:
        click.echo(
            f"cancelled {outcome['running']} running and {outcome['pending']} pending job(s); "
            f"see runjobs status {directory}",
            err=json_output,
        )
        if running_driver(directory) is not None:
            click.echo(f"the driver is still writing the report after {wait_s:g}s", err=True)
        _print_cancelled_summary(directory, json_output, write_files=False)
        return
    if running_driver(directory) is None:
        click.echo(
            "the driver ended before it read the request: nothing was cancelled; "
            f"see runjobs status {directory}",
            err=json_output,
        )
        _print_cancelled_summary(directory, json_output, write_files=False)
        return
    click.echo(
        f"the driver (pid {pid}) did not answer within {wait_s:g}s; the request stays in the ledger "
        f"and is honoured if it gets to it, or stop it with `kill -TERM {pid}`",
        err=True,
    )
    click.get_current_context().exit(EXIT_JOBS_FAILED)


def _print_cancelled_summary(directory: Path, json_output: bool, write_files: bool) -> None:
    """With --json, the run's summary from its ledger (and, for a closed run, its report files)."""
    if not json_output:
        if write_files:
            from jobs.report.files import rebuild_report

            _input(lambda: rebuild_report(directory))
        return
    from jobs.report.combined import summary
    from jobs.report.files import rebuild_report, report_from_ledger

    build = rebuild_report if write_files else report_from_ledger
    report = _input(lambda: build(directory))
    click.echo(json.dumps(summary(report, directory, EXIT_INTERRUPTED), indent=2))


@cli.command()
@click.argument("directory", type=RUN_DIRECTORY)
@click.option("--port", type=click.IntRange(1, 65535), default=6006, show_default=True)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; the default serves this machine only (0.0.0.0 would expose it).",
)
def tensorboard(directory, port, host) -> None:
    """Serve the run's TensorBoard files (DIR/tensorboard, a directory per job) until Ctrl-C.

    Every job's loss, weights, bias and epoch times are written there by submit and by
    `runjobs report DIR`, under the same tags for TensorFlow and torch. Runs TensorBoard
    in the foreground. Exit code 2 when DIRECTORY holds no TensorBoard files or the port
    is taken; 1 when TensorBoard is not installed (the command to type is printed).
    """
    from jobs.report import tensorboard as board

    try:
        board.check_has_event_files(directory)
    except board.TensorBoardError as error:
        raise InputError(str(error)) from None
    typed = " ".join(board.command(directory, host, port))
    if not board.is_installed():
        click.echo(typed)
        click.echo(
            f"TensorBoard is not installed here: {board.INSTALL_HINT}, then run the command above", err=True
        )
        click.get_current_context().exit(EXIT_JOBS_FAILED)
    if not board.port_is_free(host, port):
        raise InputError(f"port {port} on {host} is in use; pass --port with another number")
    click.echo(f"running: {typed}", err=True)
    board.serve(directory, host, port)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--input",
    "input_texts",
    multiple=True,
    required=True,
    metavar="X",
    help="Input to predict, e.g. 1800 (comma-separated for several features); repeatable.",
)
@click.option(
    "--format",
    "model_format",
    type=click.Choice(FORMAT_PREFERENCE),
    help="Which of a job's formats to load. Default: the first available, in this order.",
)
@click.option("--json", "json_output", is_flag=True, help="Print a JSON list of {input, output}.")
@click.option(
    "--trust-code",
    is_flag=True,
    help="Let a user model's state_dict, SavedModel or params.npz load by running its code (the "
    "model file the job trained, checked against its digest) or, for a SavedModel, its graph.",
)
@click.option(
    "--model-code",
    type=click.Path(path_type=Path),
    metavar="PATH.py",
    help="With --trust-code: the user model's code, when it is no longer where it was trained.",
)
def predict(model, input_texts, model_format, json_output, trust_code, model_code) -> None:
    """Load a saved model and print its prediction for each --input.

    MODEL is a job's model directory (DIR/models/JOB, written by runjobs submit
    --save-models) or one model file: .keras, a SavedModel directory, a TorchScript or
    state_dict .pt, .jax_export, params.npz or .onnx. Only the framework the format
    needs is imported, and no pickled object is ever run. A user model's state_dict, SavedModel or params.npz
    needs its code: refused unless --trust-code. Exit code 2 for a bad MODEL, format or
    input.
    """
    from jobs.predict import PredictError, format_point
    from jobs.predict import predict as run_predict

    if model_code is not None and not trust_code:
        raise InputError("--model-code runs a user model's code: add --trust-code to say you trust it")
    try:
        outcome = run_predict(model, list(input_texts), model_format, trust_code, model_code)
    except PredictError as error:
        raise InputError(str(error)) from None
    if json_output:
        click.echo(json.dumps(outcome["predictions"], indent=2))
        return
    click.echo(f"model: {outcome['model']} ({outcome['format']})", err=True)
    for prediction in outcome["predictions"]:
        output = prediction["output"]
        click.echo(f"{format_point(prediction['input'])} -> {'nan' if output is None else f'{output:.6g}'}")


@cli.group()
def pool() -> None:
    """Show or end the warm workers kept on a running cluster between submits.

    On a cluster runjobs did not start (submit --address), a run's warm workers stay
    after it, idle, for --keep-warm (10 minutes for CPU workers by default), and the
    next submit of the same runjobs code reuses them. Exit codes: 2 bad input, 3 the
    cluster cannot be reached.
    """


POOL_ADDRESS = click.option(
    "--address",
    envvar="RAY_ADDRESS",
    show_envvar=True,
    required=True,
    help="The running cluster: HOST:PORT (its GCS), ray://HOST:10001 or auto.",
)


@pool.command(name="status")
@POOL_ADDRESS
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
def pool_status(address, json_output) -> None:
    """The kept warm workers: kind, state, jobs run, idle time, time left, code version."""
    from jobs.run import warm_pool

    rows = _with_pool(address, warm_pool.describe)
    if json_output:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no warm workers kept on {address}")
        return
    table = []
    for row in rows:
        ends = row.get("ends_in_s")
        table.append(
            [
                row.get("kind", "?"),
                row.get("state", "?"),
                str(row.get("jobs", "?")),
                f"{row['idle_s']:.0f}s" if row.get("idle_s") is not None else "",
                f"{ends:.0f}s" if ends is not None else ("after its run" if "pid" in row else ""),
                str(row.get("pid", "")),
                ",".join(row.get("gpu_ids") or []) or "-",
                row.get("code", "?") + ("" if row.get("current_code", True) else " (other code)"),
            ]
        )
    _echo_table(["kind", "state", "jobs", "idle", "ends in", "pid", "gpus", "code"], table)


@pool.command(name="stop")
@POOL_ADDRESS
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
def pool_stop(address, json_output) -> None:
    """End the kept warm workers; one a running submit holds ends when that run is over."""
    from jobs.run import warm_pool

    ended = _with_pool(address, warm_pool.stop)
    if json_output:
        click.echo(json.dumps(ended, indent=2))
        return
    held = ended["ending_after_their_run"]
    click.echo(
        f"ended {ended['ended']} warm worker(s) on {address}"
        + (f"; {held} held by a running submit end when it is over" if held else "")
    )


def _with_pool(address: str, action):
    """`action()` while connected to the cluster at `address` (a Ray Jobs address is refused)."""
    from jobs.run import cluster as clusters
    from jobs.run.ray_jobs import is_jobs_address

    def connected_action():
        if is_jobs_address(address):
            raise SpecError(
                f"{address} is a Ray Jobs address; `runjobs pool` talks to the cluster itself: give its "
                "GCS address (HOST:6379), ray://HOST:10001 or auto"
            )
        with clusters.connected(address) as cluster:
            if not cluster.shared:
                raise SpecError("runjobs pool needs a running cluster's --address")
            return action()

    return _input(connected_action)


@cli.command()
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
def fields(json_output) -> None:
    """Every job field: its option (if any), the values it takes, its default and what it does.

    Any field can be given with `submit --set FIELD=VALUE` and as a key of a spec file.
    """
    rows = [
        {"field": declared.name, "option": declared.info.option, "values": declared.info.kind.name,
         "help": declared.help_text}
        for declared in FIELDS.values()
    ]  # fmt: skip
    if json_output:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        option = f" ({row['option']})" if row["option"] else ""
        click.echo(f"{row['field']}{option}: {row['values']}. {row['help']}")


def _input(action):
    """Run `action`, turning a user-facing error into a one-line exit 2."""
    try:
        return action()
    except (ValueError, RuntimeError) as error:
        _raise_as_user_error(error)


def _raise_as_user_error(error: Exception):
    """Re-raise a user-facing error as its one-line exit (2 input, 3 cluster); anything else as it is."""
    from jobs.run.cluster import ClusterUnreachableError
    from jobs.run.ray_jobs import RemoteRunError

    if isinstance(error, ClusterUnreachableError):
        raise ClusterError(str(error)) from None
    if isinstance(error, RemoteRunError):
        raise click.ClickException(str(error)) from None  # exit 1: the run did not finish
    if _is_input_error(error):
        raise InputError(str(error)) from None
    raise error


def _is_input_error(error: Exception) -> bool:
    from jobs.record.ledger import LedgerError
    from jobs.record.output import OutputError
    from jobs.run.authentication import AuthenticationError
    from jobs.run.cluster import ConnectionSettingError, ResourceRequestError
    from jobs.run.ray_jobs import RemoteRunBusyError, UnknownRemoteJobError
    from workers.data import DataError

    return isinstance(
        error,
        (
            SpecError,
            DataError,
            AuthenticationError,
            OutputError,
            LedgerError,
            ResourceRequestError,
            ConnectionSettingError,
            UnknownRemoteJobError,
            RemoteRunBusyError,
        ),
    )


def main() -> None:
    import logging
    import threading

    code = cli.main(standalone_mode=False)
    ray = sys.modules.get("ray")
    others = [thread for thread in threading.enumerate() if thread is not threading.main_thread()]
    if (ray is not None and ray.is_initialized()) or any(not thread.daemon for thread in others):
        # Ray's own exit handler must still shut it down, or a thread (Ray's shutdown after
        # an interrupt, a tracker's upload) must still finish.
        sys.exit(code)
    # Skip the interpreter's teardown (~0.3-0.5 s with Ray, gRPC and numpy loaded): every
    # file is closed and Ray is shut down by now; the logs and standard streams are flushed.
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code if isinstance(code, int) else EXIT_OK)
