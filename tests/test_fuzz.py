"""Fuzzing `runjobs submit`'s input contract with generated flags, spec files and CSV files.

The contract (README, "Exit codes"): bad input gets one line on stderr, `runjobs: error:
...`, and exit 2 before anything starts; never a traceback; no output directory is left
behind; a YAML tag in a spec file is never executed. Each generated input goes through
the CLI in-process with --dry-run (which plans and checks everything without Ray) in a
directory of its own, and `breaches` lists what, if anything, it broke.

The quick tests try a few hundred inputs; RUNJOBS_FUZZ_EXAMPLES=N makes it about N in
all, split over the three kinds as the defaults are. bench/fuzz.py runs the same
strategies for thousands and prints a table (docs/RELIABILITY.md, "Fuzzing"). The slow
test runs a few dozen generated inputs for real, with two epochs, on the suite's Ray.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jobs.plan.fields import BATCH, GPUS, INIT, NAMES, NUMBER, POINTS, SECONDS, SWITCH, WHOLE
from jobs.plan.spec import FIELDS, FRAMEWORKS, PRESETS, VARIANTS
from jobs.plan.sweep import SPEC_KEYS
from tests.helpers import load_strict_json, ray_is_running, run_cli

EXAMPLES_VARIABLE = "RUNJOBS_FUZZ_EXAMPLES"
# Examples per kind in the quick tests; RUNJOBS_FUZZ_EXAMPLES sets their total instead.
DEFAULT_EXAMPLES = {"flags": 200, "spec": 250, "csv": 150}
# Stands for the example's own directory in generated text: tag payloads, data paths.
WORKDIR = "@@WORKDIR@@"
MARKER = "MARKER"  # what a YAML tag's command would create, were it ever run
VALID_CSV = b"size,price\n500,100\n750,150\n1000,200\n"
HUGE_INTEGER = str(10**400)


def examples_for(kind: str) -> int:
    """How many inputs of `kind` to try: the default, or its share of RUNJOBS_FUZZ_EXAMPLES."""
    text = os.environ.get(EXAMPLES_VARIABLE, "").strip()
    if not text:
        return DEFAULT_EXAMPLES[kind]
    return max(1, round(int(text) * DEFAULT_EXAMPLES[kind] / sum(DEFAULT_EXAMPLES.values())))


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# ---------------------------------------------------------------------------------------
# What one input is, how it runs and what it must not do.


@dataclass
class FuzzInput:
    kind: str  # flags, spec or csv
    args: list[str]  # after `runjobs submit`; WORKDIR stands for the example's directory
    files: dict[str, bytes] = field(default_factory=dict)  # written into that directory first
    has_tag: bool = False  # a spec file holding a Python tag that would create MARKER if run
    too_many_jobs: bool = False  # a spec file whose grid or repeat names more jobs than the limit


@dataclass
class Outcome:
    exit_code: int | None  # None: an exception escaped the CLI
    stdout: str = ""
    stderr: str = ""
    escaped: str | None = None  # that exception, as "Type at file:line: message"
    tag_executed: bool = False
    seconds: float = 0.0
    breaches: list[str] = field(default_factory=list)


def try_input(fuzz_input: FuzzInput, dry_run: bool = True) -> Outcome:
    """Run one input through `runjobs submit` in-process, in a fresh directory, and judge it."""
    with tempfile.TemporaryDirectory(prefix="runjobs-fuzz-") as scratch:
        workdir = Path(scratch)
        for name, content in fuzz_input.files.items():
            (workdir / name).write_bytes(content)
        args = [argument.replace(WORKDIR, scratch) for argument in fuzz_input.args]
        output = workdir / "run"
        ray_was_running = ray_is_running()
        started = time.monotonic()
        try:
            result = run_cli(["submit", *args, *(["--dry-run"] if dry_run else [])], output)
            # The directory's name as WORKDIR: outcomes of different examples compare equal.
            outcome = Outcome(
                result.exit_code,
                result.stdout.replace(scratch, WORKDIR),
                result.stderr.replace(scratch, WORKDIR),
            )
        except Exception as error:  # what the contract forbids: the test reports it
            frame = traceback.extract_tb(error.__traceback__)[-1]
            where = f"{Path(frame.filename).name}:{frame.lineno}"
            outcome = Outcome(None, escaped=f"{type(error).__name__} at {where}: {error}"[:500])
        outcome.seconds = time.monotonic() - started
        outcome.tag_executed = any(path.name.startswith(MARKER) for path in workdir.rglob("*"))
        outcome.breaches = breaches(outcome, fuzz_input, workdir, output, dry_run)
        if dry_run and ray_is_running() != ray_was_running:
            outcome.breaches.append("--dry-run started Ray")
    return outcome


def breaches(
    outcome: Outcome, fuzz_input: FuzzInput, workdir: Path, output: Path, dry_run: bool
) -> list[str]:
    """What the outcome broke of the contract; [] when it kept it."""
    found = []
    if outcome.escaped is not None:
        found.append(f"traceback: {outcome.escaped}")
    if outcome.tag_executed:
        found.append("a YAML tag was executed")
    if "Traceback" in outcome.stdout or "Traceback" in outcome.stderr:
        found.append("a traceback was printed")
    allowed = {0, 2} if dry_run else {0, 1, 2}
    if outcome.exit_code is not None and outcome.exit_code not in allowed:
        found.append(f"exit {outcome.exit_code}: {outcome.stderr.strip()[-300:]}")
    if fuzz_input.too_many_jobs and outcome.exit_code == 0:
        found.append("a sweep past the job limit was planned, not refused")
    if outcome.exit_code == 2:
        lines = outcome.stderr.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("runjobs: error: "):
            found.append(f"exit 2 without exactly one 'runjobs: error:' line: {outcome.stderr[:300]!r}")
    leftovers = sorted(
        path.name for path in workdir.iterdir() if path.name not in fuzz_input.files and path != output
    )
    if leftovers:
        found.append(f"left behind: {leftovers}")
    if output.exists() and (dry_run or outcome.exit_code in (2, None)):
        found.append("an output directory was created")
    if outcome.exit_code == 0 and dry_run and "--json" not in fuzz_input.args:
        if "nothing started (--dry-run)" not in outcome.stdout:
            found.append(f"exit 0 without the plan: {outcome.stdout[-300:]!r}")
    if not dry_run and outcome.exit_code in (0, 1):
        try:
            load_strict_json(output / "report.json")
        except (OSError, ValueError, AssertionError) as error:
            found.append(f"exit {outcome.exit_code} without a strict report.json: {error}")
    return found


# ---------------------------------------------------------------------------------------
# Values: valid ones, boundaries, wrong types, odd text.


def one_in(draw, times: int) -> bool:
    """True about once in `times`. Hypothesis favours the simplest choice, 0, so 0 means False."""
    return draw(st.integers(0, times - 1)) == times - 1


# "\udcff" is a byte that is not UTF-8 as Python hands it over from a command line
# (surrogateescape); a lone surrogate such as "\ud800" cannot come from one.
ODD_TEXT = st.sampled_from(
    ["", " ", "\t", "\n", "a\nb", "x\r", "\x00", "a\x00b", "\udcff", "\u202e", "\ufeff", "é", "e\u0301",
     "１２", "٣", "💥", "'", '"', "\\", "--", "-1", "=", ",", ";", "a=b", "NaN", "None", "null", "~",
     "true", "{}", "[]", "%s", "{0}", "$HOME", "../..", "x" * 300]
)  # fmt: skip
JUNK = st.one_of(ODD_TEXT, st.text(max_size=12))
WHOLE_TEXTS = st.one_of(
    st.integers(-3, 6).map(str),
    st.sampled_from(
        ["2147483647", "4294967295", "4294967296", str(2**63), HUGE_INTEGER, "9" * 5000, "1.5", "1e3",
         "0x10", "1_000", " 7 ", "+5", "007", "٣", "１２", "nan", "inf", "-0"]
    ),
)  # fmt: skip
NUMBER_TEXTS = st.one_of(
    st.floats().map(repr),  # with nan, inf, -0.0, subnormals and the largest floats
    st.sampled_from(
        ["0", "-0.0", "1e-320", "1e308", "1e309", "-1e999", "nan", "NaN", "-inf", "Infinity", "0.01", ".5",
         "5.", "1_0", "0x1p-2", "1,5", HUGE_INTEGER, "١.٥", "0.999", "1"]
    ),
)  # fmt: skip
COLUMN_NAMES = st.one_of(
    st.sampled_from(["size", "price", "x0", "x1", "y", "rooms", "", " ", "größe", "名前", 'a"b', "a,b"]),
    st.text(max_size=8),
)
POINT_TEXTS = st.one_of(
    st.lists(st.one_of(st.integers(-5000, 5000).map(str), NUMBER_TEXTS), min_size=1, max_size=3).map(
        ",".join
    ),
    st.sampled_from(["1800", "1800,3", "1;2", "1800;2000", "1,", ";", "", "abc", "1800;;", "1e999", "1 800"]),
)
# Valid sizes stay small, so a valid input plans in milliseconds; sizes past the limit of
# 10^8 values are refused before any array is made.
SYNTHETIC_VALUES = {
    "rows": st.one_of(
        st.integers(2, 200).map(str),
        st.sampled_from(["0", "1", "-1", "1e3", "", "x", str(10**9), str(10**30), HUGE_INTEGER]),
    ),
    "features": st.one_of(
        st.integers(1, 4).map(str), st.sampled_from(["0", "-1", "x", "1.0", str(10**9), HUGE_INTEGER])
    ),
    "noise": NUMBER_TEXTS,
    "seed": WHOLE_TEXTS,
}
SYNTHETIC_ITEMS = st.one_of(
    st.sampled_from(sorted(SYNTHETIC_VALUES)).flatmap(
        lambda key: SYNTHETIC_VALUES[key].map(lambda value: f"{key}={value}")
    ),
    st.sampled_from(["rows", "=3", "bogus=1", "Rows=3", "rows==3", " rows = 3 ", "rows=3=4"]),
)
DATA_TEXTS = st.one_of(
    st.sampled_from(
        ["article", "ARTICLE", "article ", "synthetic", "synthetic:", f"{WORKDIR}/data.csv", WORKDIR,
         f"{WORKDIR}/nowhere.csv", f"{WORKDIR}/{'a' * 300}.csv", f"{WORKDIR}/a\nb.csv", "/dev/null", "~", "-",
         "data\x00.csv", "nowhere.csv", f"{WORKDIR}/data.csv/x"]
    ),
    st.lists(SYNTHETIC_ITEMS, max_size=5).map(lambda items: "synthetic:" + ",".join(items)),
    JUNK,
)  # fmt: skip


def field_texts(name: str) -> st.SearchStrategy[str]:
    """Text for the field `name` as a flag or `--set` gives it: sensible values and boundaries."""
    kind = FIELDS[name].info.kind
    if kind.choices:
        valid = st.sampled_from(kind.choices)
    elif name == "data":
        valid = DATA_TEXTS
    elif kind is WHOLE:
        valid = WHOLE_TEXTS
    elif kind is NUMBER:
        valid = NUMBER_TEXTS
    elif kind is SWITCH:
        valid = st.sampled_from(["true", "false", "yes", "no", "on", "off", "1", "0", "TRUE", "maybe"])
    elif kind is INIT:
        valid = st.one_of(st.sampled_from(["framework", "zeros", "glorot"]), NUMBER_TEXTS)
    elif kind is BATCH:
        valid = st.one_of(st.sampled_from(["full", "none", ""]), WHOLE_TEXTS)
    elif kind is GPUS:
        valid = st.one_of(st.sampled_from(["auto", "none", "0.5"]), NUMBER_TEXTS)
    elif kind is SECONDS:
        valid = st.one_of(st.sampled_from(["none", "30"]), NUMBER_TEXTS)
    elif kind is NAMES:
        valid = st.lists(COLUMN_NAMES, max_size=3).map(",".join)
    elif kind is POINTS:
        valid = POINT_TEXTS
    else:  # text: target, label, and any kind added later
        valid = COLUMN_NAMES
    return valid


# ---------------------------------------------------------------------------------------
# Submit flags.

DEVICE_OPTIONS = ("--variant", "--workers", "--gpus-per-job")
DEVICE_COUNTS = st.one_of(
    st.integers(1, 4).map(str), st.sampled_from(["0", "-1", "2.5", str(2**63), HUGE_INTEGER])
)
ODD_SET_KEYS = st.one_of(
    st.tuples(st.sampled_from(["mxnet", "", "torch.torch", "TORCH"]), st.sampled_from(list(FIELDS))).map(
        ".".join
    ),
    st.sampled_from(["learning_rate", "LR", "batch-size", " lr ", "", ".", "lr.", "Epochs", "__class__"]),
    JUNK,
)
ADDRESSES = st.sampled_from(
    ["auto", "127.0.0.1:6379", "ray://head:10001", "http://head:8265", "https://h:1", "nonsense::x",
     "host:notaport", "127.0.0.1:99999", "myhost", "http://head:x", "[::1]:6379", "[::1", ":6379",
     "host:0", "gcs://h:1", "h:-1", "ho st:1", "ray://", "http://"]
)  # fmt: skip


# Left out of a real run: many epochs, models to export, multi-worker jobs (whose processes
# would take this 2-core machine minutes) and retries of a job that fails every time.
UNSAFE_FIELDS_FOR_REAL_RUNS = {
    "epochs", "variant", "workers", "save_models", "setup_timeout_s", "retries", "retry_exceptions"
}  # fmt: skip


def option_args(junk: bool, real: bool = False) -> st.SearchStrategy[list[str]]:
    """One submit option with its value ([option, value], or [flag]), as a list of arguments.

    Without `junk` the values are the options' own (with their boundaries), so that several
    options together often make a valid request and planning is reached; with it, any text.
    `real` leaves out what a real run on this machine must not be given.
    """
    fields = [name for name in FIELDS if not (real and name in UNSAFE_FIELDS_FOR_REAL_RUNS)]

    def values(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(valid, valid, valid, JUNK) if junk else valid  # junk: one value in four

    def set_value(key: str) -> st.SearchStrategy[str]:
        name = key.strip().replace("-", "_").rpartition(".")[2]
        return values(field_texts(name)) if name in FIELDS else JUNK

    set_keys = st.one_of(
        st.sampled_from(fields), st.tuples(st.sampled_from(FRAMEWORKS), st.sampled_from(fields)).map(".".join)
    )
    if junk:
        set_keys = st.one_of(set_keys, ODD_SET_KEYS)
    set_args = set_keys.flatmap(lambda key: set_value(key).map(lambda value: ["--set", f"{key}={value}"]))
    options = [
        values(st.sampled_from(FRAMEWORKS)).map(lambda value: ["--framework", value]),
        values(st.sampled_from(PRESETS)).map(lambda value: ["--preset", value]),
        set_args,
        set_args,
        values(st.sampled_from(["failed", "all"])).map(lambda value: ["--rerun", value]),
        WHOLE_TEXTS.map(lambda value: ["--max-concurrent", value]),
        st.sampled_from([["--json"], ["--lr=0.5"]]),
    ]
    if not real:
        options += [
            values(st.sampled_from(VARIANTS)).map(lambda value: ["--variant", value]),
            values(ADDRESSES).map(lambda address: ["--address", address]),
            # A multi-device request as one group, so that variant, workers and GPUs meet often.
            st.tuples(st.sampled_from(VARIANTS), DEVICE_COUNTS, values(field_texts("gpus_per_job"))).map(
                lambda request: [word for pair in zip(DEVICE_OPTIONS, request) for word in pair]
            ),
            st.sampled_from([["--no-wait"], ["--epochs=3"]]),
        ]
    for name in fields:  # every job field's own option
        option = FIELDS[name].info.option
        if option is None:
            continue
        if FIELDS[name].info.kind is SWITCH:
            options.append(st.sampled_from([[option], [f"--no-{option.removeprefix('--')}"]]))
        else:
            options.append(values(field_texts(name)).map(lambda value, option=option: [option, value]))
    if junk:
        options += [
            JUNK.map(lambda text: ["--set", text]),
            st.sampled_from([["--bogus"], ["--set"], ["-x", "1"], ["--lr", "1", "2"]]),
        ]
    return st.one_of(*options)


OPTION_ARGS = option_args(junk=True)


def flag_inputs(real: bool = False) -> st.SearchStrategy[FuzzInput]:
    """A few options with their own values (a valid request, often), or up to 8 with junk.

    A real run gets only the former: junk is refused while planning, which the dry runs
    cover, and an option left without its value would take `--output` for its value.
    """
    calm = st.lists(option_args(junk=False, real=real), max_size=4)
    groups = calm if real else st.one_of(calm, st.lists(OPTION_ARGS, max_size=8))
    return groups.map(
        lambda groups: FuzzInput(
            "flags", [argument for group in groups for argument in group], files={"data.csv": VALID_CSV}
        )
    )


# ---------------------------------------------------------------------------------------
# Spec files: YAML built from the real keys and fields and unknown ones, every YAML type,
# anchors and aliases, tags, deep nesting, large grids and bytes that are not UTF-8.

MARKER_PATH = f"{WORKDIR}/{MARKER}"
PYTHON_TAGS = [
    f'!!python/object/apply:os.system ["touch {MARKER_PATH}"]',
    f'!!python/object/apply:subprocess.check_call [["touch", "{MARKER_PATH}"]]',
    f'!!python/object/new:subprocess.Popen [["touch", "{MARKER_PATH}"]]',
    f'!!python/object/apply:os.system {{args: ["touch {MARKER_PATH}"]}}',
    f'!<tag:yaml.org,2002:python/object/apply:os.system> ["touch {MARKER_PATH}"]',
    f"!!python/object/apply:builtins.exec [\"open('{MARKER_PATH}', 'w')\"]",
    "!!python/name:os.system",
    "!!python/module:os",
]
OTHER_TAGS = [
    "!!binary aGVsbG8=", "!!set {a, b}", "!!omap [a: 1, b: 2]", "!!pairs [a: 1]", '!!str 5', '!!int "7"',
    '!!float "nan"', '!!int "x"', '!!bool "yes"', '!!null ""', "!!timestamp 2001-12-14", "!custom x",
    "!!map [1]", "!!seq {a: 1}", "!!float .inf", "!!binary '%%%'",
]  # fmt: skip
YAML_SCALARS = st.one_of(
    st.sampled_from(
        ["0", "-1", "7", "0x1F", "0o17", "017", "1_000", "+5", "0b101", "1:30", HUGE_INTEGER, "9" * 5000,
         "0.01", "1e3", "1.0e+3", ".5", ".inf", "-.inf", ".nan", ".NaN", "1.0e400", "190:20:30.15",
         "true", "false", "yes", "no", "on", "off", "True", "TRUE", "~", "null", "", "''", '""',
         "'it''s'", '"\\x00"', '"\\ud800"', '"a\\nb"', '"\\t"', "2001-12-14", "2017-13-45",
         "2001-12-14t21:59:43.10-05:00", "article", "full", "auto", "none", "tensorflow", "torch", "ddp",
         "synthetic:rows=20", "é", "💥"]
    ),
    st.integers().map(str),
    st.floats().map(repr),
    st.text(max_size=10).map(json.dumps),
    st.text(max_size=10).map(lambda text: json.dumps(text, ensure_ascii=False)),
)  # fmt: skip
# Numbers at and past the edges: float's range, the seed's, Python's digit limit, and the
# YAML 1.1 spellings (sexagesimal, octal, .nan) a reader may not expect.
BOUNDARY_YAML = st.sampled_from(
    [HUGE_INTEGER, f"-{HUGE_INTEGER}", "9" * 5000, "1.0e400", "-1.0e400", ".nan", ".inf", "-.inf", "0", "-1",
     "0.0", "-0.0", "4294967295", "4294967296", str(2**63), "1.0e-320", "1:30", "0o17", "0x1F", "true"]
)  # fmt: skip
WRONG_TYPES = st.sampled_from(
    ["[1]", "[tensorflow, torch]", "{a: 1}", "null", "x", "true", "1.5", "[]", "{}"]
)
PLAUSIBLE_YAML = {
    WHOLE: st.sampled_from(["1", "2", "3"]),
    NUMBER: st.sampled_from(["0.01", "0.1", "0.5", "1", "0.9"]),
    SWITCH: st.sampled_from(["true", "false"]),
    INIT: st.sampled_from(["zeros", "framework", "0.5"]),
    BATCH: st.sampled_from(["2", "full"]),
    GPUS: st.sampled_from(["0", "auto"]),
    SECONDS: st.sampled_from(["100", "none"]),
    NAMES: st.sampled_from(["[size]", "size", "[]"]),
    POINTS: st.sampled_from(["[1800]", "[[1, 2]]", "1800", "[]"]),
}
PLAUSIBLE_DATA = st.sampled_from(
    ["article", "synthetic:rows=20,features=2", "synthetic:rows=5", "nowhere.csv"]
)
JUNK_KEYS = st.sampled_from(
    ["learning_rate", "1", "null", "~", "true", "<<", "''", "[1, 2]", "{a: 1}", '"lr"', "LR", "é", "0.5"]
)
# Fields whose values meet one another while planning (the seed a repeat adds to, the
# variant that picks a framework, the GPUs split over workers): drawn more often.
INTERACTING_FIELDS = [
    "framework",
    "variant",
    "workers",
    "seed",
    "predict",
    "gpus_per_job",
    "lr",
    "batch_size",
]
BIG_GRID_FIELDS = ["seed", "epochs", "retries", "timeout_s", "lr"]


@st.composite
def spec_files(draw) -> FuzzInput:
    """A spec file's bytes, given as `runjobs submit SPEC`, now and then with an option or two."""
    anchors: list[str] = []
    found = {"tag": False, "large grid": False, "large repeat": False}
    # How hostile this document is: 0 mostly plausible values (so that expanding and
    # planning are reached), 2 mostly odd ones.
    hostility = draw(st.integers(0, 2))

    def plausible(name: str) -> str:
        """A value the field takes; now and then one of the wrong type, or a number at an edge."""
        kind = FIELDS[name].info.kind
        surprise = draw(st.integers(0, 9))  # 0, Hypothesis' favourite: no surprise
        if surprise == 8:
            return draw(WRONG_TYPES)
        if surprise == 9:
            return draw(BOUNDARY_YAML)
        if kind.choices:
            return draw(st.sampled_from(kind.choices))
        if name == "data":
            return draw(PLAUSIBLE_DATA)
        return draw(PLAUSIBLE_YAML.get(kind, st.sampled_from(["x", "price", "null"])))

    def key() -> str:
        if one_in(draw, (20, 8, 4)[hostility]):
            return draw(JUNK_KEYS)
        return draw(st.one_of(st.sampled_from(INTERACTING_FIELDS), st.sampled_from(list(FIELDS))))

    def value(depth: int, name: str | None = None) -> str:
        anchor = ""
        if one_in(draw, 10):
            anchor = f"&a{len(anchors)} "
            anchors.append(f"a{len(anchors)}")  # before the content: an alias inside refers to itself
        if name in FIELDS and draw(st.integers(0, 99)) < (85, 45, 15)[hostility]:
            return anchor + plausible(name)
        roll = draw(st.integers(0, 99))
        if roll < 30 and name in FIELDS:
            text = plausible(name)
        elif roll < 42:
            text = draw(BOUNDARY_YAML)
        elif roll < 55:
            text = draw(YAML_SCALARS)
        elif roll < 61:
            return "*" + (draw(st.sampled_from(anchors)) if anchors else "undefined")
        elif roll < 65:
            found["tag"] = True
            text = draw(st.sampled_from(PYTHON_TAGS))
        elif roll < 70:
            text = draw(st.sampled_from(OTHER_TAGS))
        elif roll < 72:
            levels = draw(st.sampled_from([10, 100, 400, 1000, 5000]))
            text = draw(st.sampled_from(["[" * levels + "]" * levels, "{a: " * levels + "1" + "}" * levels]))
        elif depth > 0 and roll < 86:
            text = "[" + ", ".join(value(depth - 1, name) for _ in range(draw(st.integers(0, 4)))) + "]"
        elif depth > 0:
            text = (
                "{" + ", ".join(f"{key()}: {value(depth - 1)}" for _ in range(draw(st.integers(0, 3)))) + "}"
            )
        else:
            text = draw(YAML_SCALARS)
        return anchor + text

    def fields_mapping(depth: int) -> str:
        if one_in(draw, 10):
            return value(depth)  # not a mapping at all
        entries = []
        for _ in range(draw(st.integers(0, 4))):
            name = key()
            entries.append(f"{name}: {value(depth, name)}")
        return "{" + ", ".join(entries) + "}"

    def grid() -> str:
        # A large grid must be refused by counting its jobs, never expanded. A key given twice
        # counts as its last value, as YAML reads it, so each call says whether it is large.
        found["large grid"] = one_in(draw, 10)
        if found["large grid"]:
            size = draw(st.integers(40, 60))
            values = "[" + ", ".join(str(number) for number in range(1, size + 1)) + "]"
            if draw(st.booleans()):
                return "{" + ", ".join(f"{name}: {values}" for name in BIG_GRID_FIELDS[:4]) + "}"
            first, *others = BIG_GRID_FIELDS[:4]
            return "{" + f"{first}: &g {values}, " + ", ".join(f"{name}: *g" for name in others) + "}"
        entries = []
        for _ in range(draw(st.integers(0, 3))):
            name = key()
            if one_in(draw, 10):
                entries.append(f"{name}: {value(1, name)}")  # not a list
            else:
                items = [value(draw(st.integers(0, 1)), name) for _ in range(draw(st.integers(0, 3)))]
                entries.append(f"{name}: [{', '.join(items)}]")
        return "{" + ", ".join(entries) + "}"

    def repeat() -> str:
        found["large repeat"] = False
        roll = draw(st.integers(0, 9))
        if roll < 5:
            return draw(st.sampled_from(["1", "2", "3"]))
        if roll < 7:
            found["large repeat"] = True
            return draw(st.sampled_from([str(10**6), str(10**12), HUGE_INTEGER]))
        if roll < 9:
            return draw(st.sampled_from(["0", "-1", "1.5", "true", "'2'", "null", "[2]", "9" * 5000]))
        return value(1)

    form = draw(st.integers(0, 99))
    if form < 88:
        lines = []
        tops = st.sampled_from([*SPEC_KEYS, *SPEC_KEYS, "unknown"])  # a key may come twice: the last wins
        for top in draw(st.lists(tops, min_size=1, max_size=6)):
            if top == "name":
                name = draw(st.sampled_from(["sweep", "lr-seed"])) if draw(st.booleans()) else value(1)
                lines.append(f"name: {name}")
            elif top == "defaults":
                lines.append(f"defaults: {fields_mapping(2)}")
            elif top == "grid":
                lines.append(f"grid: {grid()}")
            elif top == "jobs":
                jobs = [fields_mapping(1) for _ in range(draw(st.integers(0, 4)))]
                lines.append(f"jobs: [{', '.join(jobs)}]")
            elif top == "repeat":
                lines.append(f"repeat: {repeat()}")
            else:
                lines.append(f"{draw(JUNK_KEYS)}: {value(1)}")
        text = "\n".join(lines) + "\n"
    elif form < 92:
        found["tag"] = True
        text = (
            "%TAG !p! tag:yaml.org,2002:python/\n---\n"
            f'name: !p!object/apply:os.system ["touch {MARKER_PATH}"]\n'
        )
    else:
        text = draw(
            st.sampled_from(
                ["", "\n", "- a\n- b\n", "just text\n", "---\nname: a\n---\nname: b\n",
                 "name: a\n\tdefaults: {}\n", "name: a: b\n", "defaults:\n  epochs: 1\n lr: 2\n", "[1, 2\n",
                 "{name: x}\n", "...\n",
                 "name: x\n" + "#" * 2**20 + "\n", "name: &a [*a]\n", "grid: {seed: &s [1, 2], epochs: *s}\n"]
            )
        )  # fmt: skip
    if one_in(draw, 5):
        text = text.replace("\n", "\r\n")
    content = text.encode("utf-8", "surrogatepass")
    mutation = draw(st.integers(0, 19))  # 0, Hypothesis' favourite, and most others: none
    if mutation == 15:
        content = text.encode("latin-1", "replace") + "# café\n".encode("latin-1")
    elif mutation == 16:
        position = draw(st.integers(0, len(content)))
        content = content[:position] + draw(st.binary(min_size=1, max_size=4)) + content[position:]
    elif mutation == 17:
        content = b"\xef\xbb\xbf" + content  # a UTF-8 byte-order mark
    elif mutation == 18:
        content = text.encode("utf-16", "surrogatepass")
    elif mutation == 19:
        content = content[: draw(st.integers(0, len(content)))]
    name = draw(st.sampled_from(["spec.yaml", "sweep", "spéc.yml", "a b.yaml"]))
    extra = draw(st.lists(OPTION_ARGS, max_size=2)) if one_in(draw, 4) else []
    return FuzzInput(
        "spec",
        [f"{WORKDIR}/{name}", *(argument for group in extra for argument in group)],
        files={name: content},
        has_tag=found["tag"],
        # Unless cut short or given a stray byte: `repeat: 1000000` may have become `repeat: 10`.
        too_many_jobs=form < 88
        and (found["large grid"] or found["large repeat"])
        and mutation not in (16, 19),
    )


# ---------------------------------------------------------------------------------------
# CSV files: headers and cells clean or hostile, rows of any length, binary garbage.

CLEAN_NUMBERS = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(-1e6, 1e6).map(lambda number: f"{number:e}"),
    st.floats(-1e6, 1e6).map(lambda number: f"{number:.3f}"),
    st.sampled_from(["+1", ".5", "5.", "1E3", "1e+3", "-0", "00012", " 3 ", "\t3", '"3"', '" 4 "']),
)
HOSTILE_CELLS = st.one_of(
    st.sampled_from(
        ["", "1_000", "0x10", "nan", "inf", "-Infinity", "1e999", "١٢", "１２", "1,5", '"1,5"', "3 4", "--1",
         "1e", "e1", ".", "-", "∞", '"3', '3"', '"a""b"', '"a"b', "\x00", "\r", "\n", "a\rb", "'4'"]
    ),
    st.sampled_from([1000, 131_072, 131_073, 200_000]).map(lambda length: "1" * length),
    st.text(max_size=8),
)  # fmt: skip
CLEAN_NAMES = st.sampled_from(["size", "price", "x0", "x1", "y", "rooms", "größe", "名前"])


@st.composite
def csv_files(draw) -> FuzzInput:
    """A CSV file's bytes, given as --data (or --set data=), with and without its columns named."""
    header: list[str] = []
    if one_in(draw, 20):
        content = draw(st.binary(max_size=512))
    else:
        clean = draw(st.booleans())
        columns = draw(st.sampled_from([2, 2, 3, 4, 1, 0, 20]))
        if clean and columns > 8:
            header = [f"x{index}" for index in range(columns)]
        elif clean:
            header = draw(st.lists(CLEAN_NAMES, min_size=columns, max_size=columns, unique=True))
        else:
            header = [draw(st.one_of(COLUMN_NAMES, CLEAN_NAMES)) for _ in range(columns)]
        cells = CLEAN_NUMBERS if clean else st.one_of(CLEAN_NUMBERS, CLEAN_NUMBERS, HOSTILE_CELLS)
        rows = [header]
        for _ in range(draw(st.sampled_from([3, 5, 2, 8, 1, 0]))):
            length = len(header) if clean or not one_in(draw, 5) else draw(st.integers(0, len(header) + 2))
            rows.append([draw(cells) for _ in range(length)])
        if not clean and one_in(draw, 5):
            rows.insert(draw(st.integers(0, len(rows))), [])  # a blank line
        newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
        text = newline.join(",".join(row) for row in rows) + draw(st.sampled_from([newline, ""]))
        if one_in(draw, 5):
            text = "\ufeff" + text  # Excel's byte-order mark
        content = text.encode("utf-8", "surrogatepass")
        mutation = draw(st.integers(0, 9))  # 0, Hypothesis' favourite, and most others: none
        if mutation == 8:
            content = text.encode("latin-1", "replace") + "\n1,café\n".encode("latin-1")
        elif mutation == 9:
            position = draw(st.integers(0, len(content)))
            content = content[:position] + draw(st.binary(min_size=1, max_size=4)) + content[position:]
    name = draw(st.sampled_from(["data.csv", "my data.csv", "données.csv", "data"]))
    path = f"{WORKDIR}/{name}"
    args = draw(st.sampled_from([["--data", path], ["--set", f"data={path}"]]))
    names = st.one_of(st.sampled_from(header), COLUMN_NAMES) if header else COLUMN_NAMES
    if one_in(draw, 4):
        args += ["--set", "features=" + ",".join(draw(st.lists(names, max_size=3)))]
    if one_in(draw, 4):
        args += ["--set", f"target={draw(names)}"]
    if one_in(draw, 4):
        args += ["--predict", draw(POINT_TEXTS)]
    if one_in(draw, 5):
        args += ["--normalize"]
    return FuzzInput("csv", args, files={name: content})


STRATEGIES = {"flags": flag_inputs(), "spec": spec_files(), "csv": csv_files()}


# ---------------------------------------------------------------------------------------
# The tests.


def assert_kept(fuzz_input: FuzzInput, outcome: Outcome) -> None:
    event(f"exit {outcome.exit_code}")  # --hypothesis-show-statistics counts them
    assert not outcome.breaches, (
        f"runjobs submit {' '.join(map(repr, fuzz_input.args))}\nfiles: {fuzz_input.files!r:.2000}\n"
        + "\n".join(outcome.breaches)
    )


@fuzz_settings(examples_for("flags"))
@given(fuzz_input=STRATEGIES["flags"])
def test_generated_submit_flags_keep_the_input_contract(fuzz_input):
    assert_kept(fuzz_input, try_input(fuzz_input))


@fuzz_settings(examples_for("spec"))
@given(fuzz_input=STRATEGIES["spec"])
def test_generated_spec_files_keep_the_input_contract_and_run_no_tag(fuzz_input):
    assert_kept(fuzz_input, try_input(fuzz_input))


@fuzz_settings(examples_for("csv"))
@given(fuzz_input=STRATEGIES["csv"])
def test_generated_csv_files_keep_the_input_contract(fuzz_input):
    assert_kept(fuzz_input, try_input(fuzz_input))


# A real run of a generated input: flags and CSV files, without the options that would
# take this 2-core machine minutes (UNSAFE_FIELDS_FOR_REAL_RUNS), with two epochs set last.
REAL_RUN_INPUTS = st.one_of(flag_inputs(real=True), csv_files())


@pytest.mark.slow
@fuzz_settings(24)
@given(fuzz_input=REAL_RUN_INPUTS)
def test_generated_inputs_run_for_real_end_in_0_1_or_2_and_never_a_traceback(ray_session, fuzz_input):
    real = FuzzInput(fuzz_input.kind, [*fuzz_input.args, "--set", "epochs=2"], fuzz_input.files)
    assert_kept(real, try_input(real, dry_run=False))
