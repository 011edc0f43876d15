"""Fuzzing `runjobs submit`: tests/test_fuzz.py's strategies for thousands of generated inputs.

Each input (submit flags, a spec file or a CSV file) runs through the CLI in-process with
--dry-run in a fresh directory, and is judged as the quick tests judge it (exit 0 or 2,
one `runjobs: error:` line on exit 2, no traceback, no directory left behind, no YAML tag
executed, Ray not started). Unlike the tests it goes on past a broken input, counts
everything and prints a Markdown table, then each distinct breach with one input that
showed it.

    .venv/bin/python bench/fuzz.py [--examples 10000] [--seed 0] [--json FILE]

The examples are split over the three kinds as the quick tests split theirs. Exits 1 when
any input broke the contract. docs/RELIABILITY.md ("Fuzzing") keeps a long run's table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402

from tests.test_fuzz import DEFAULT_EXAMPLES, STRATEGIES, FuzzInput, Outcome, try_input  # noqa: E402

KIND_NAMES = {"flags": "submit flags", "spec": "spec files", "csv": "CSV files"}


@dataclass
class Tally:
    """What the inputs of one kind did."""

    tried: int = 0
    exits: Counter = field(default_factory=Counter)  # exit code -> inputs; None: an escaped exception
    tracebacks: int = 0
    broken: int = 0  # inputs that broke the contract in any way
    with_tag: int = 0
    tags_executed: int = 0
    too_many_jobs: int = 0
    slowest_s: float = 0.0
    breaches: dict[str, tuple[int, list[str]]] = field(default_factory=dict)  # kind of breach -> count, args

    def add(self, fuzz_input: FuzzInput, outcome: Outcome) -> None:
        self.tried += 1
        self.exits[outcome.exit_code] += 1
        self.tracebacks += outcome.escaped is not None or "Traceback" in outcome.stderr + outcome.stdout
        self.broken += bool(outcome.breaches)
        self.with_tag += fuzz_input.has_tag
        self.tags_executed += outcome.tag_executed
        self.too_many_jobs += fuzz_input.too_many_jobs
        self.slowest_s = max(self.slowest_s, outcome.seconds)
        for breach in outcome.breaches:
            # A traceback is known by where it was raised; any other breach by its start.
            key = breach.split(": ", 2)[1] if breach.startswith("traceback: ") else breach[:120]
            count, example = self.breaches.get(key, (0, fuzz_input.args))
            self.breaches[key] = (count + 1, example)

    def merge(self, other: Tally) -> None:
        self.tried += other.tried
        self.exits.update(other.exits)
        self.tracebacks += other.tracebacks
        self.broken += other.broken
        self.with_tag += other.with_tag
        self.tags_executed += other.tags_executed
        self.too_many_jobs += other.too_many_jobs
        self.slowest_s = max(self.slowest_s, other.slowest_s)


def split(examples: int) -> dict[str, int]:
    """`examples` over the kinds in the quick tests' proportions, summing to exactly `examples`."""
    total = sum(DEFAULT_EXAMPLES.values())
    shares = {kind: examples * count // total for kind, count in DEFAULT_EXAMPLES.items()}
    shares[next(iter(shares))] += examples - sum(shares.values())
    return shares


def fuzz_kind(kind: str, examples: int, seed: int, tally: Tally) -> None:
    """Generate `examples` inputs of `kind` (no replay, no shrinking) and tally each one's outcome."""

    @hypothesis_seed(seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(STRATEGIES[kind])
    def one(fuzz_input: FuzzInput) -> None:
        tally.add(fuzz_input, try_input(fuzz_input))

    one()


def table(tallies: dict[str, Tally]) -> str:
    columns = ["input", "tried", "exit 0", "exit 2", "other exits", "tracebacks", "contract broken",
               "with a Python YAML tag", "YAML tags executed", "sweeps past the job limit",
               "slowest (ms)"]  # fmt: skip
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]

    def row(name: str, tally: Tally, spec: bool) -> str:
        other = sum(count for code, count in tally.exits.items() if code not in (0, 2))
        cells = [name, tally.tried, tally.exits[0], tally.exits[2], other, tally.tracebacks, tally.broken,
                 tally.with_tag if spec else "-", tally.tags_executed, tally.too_many_jobs if spec else "-",
                 f"{tally.slowest_s * 1000:.0f}"]  # fmt: skip
        return "| " + " | ".join(map(str, cells)) + " |"

    total = Tally()
    for kind, tally in tallies.items():
        rows.append(row(KIND_NAMES[kind], tally, spec=kind == "spec"))
        total.merge(tally)
    rows.append(row("all", total, spec=True))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="inputs in all (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis' seed, for a repeatable run")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    arguments = parser.parse_args()
    tallies = {kind: Tally() for kind in DEFAULT_EXAMPLES}
    seconds = {}
    for kind, examples in split(arguments.examples).items():
        started = time.monotonic()
        fuzz_kind(kind, examples, arguments.seed, tallies[kind])
        seconds[kind] = time.monotonic() - started
        print(f"{KIND_NAMES[kind]}: {tallies[kind].tried} inputs in {seconds[kind]:.0f}s", file=sys.stderr)
    print(table(tallies))
    print(f"\n{sum(seconds.values()):.0f}s in all, seed {arguments.seed}.")
    breaches = [(kind, key, count, example) for kind, tally in tallies.items()
                for key, (count, example) in tally.breaches.items()]  # fmt: skip
    if breaches:
        print("\nBreaches (kind, count, what, one input):")
        for kind, key, count, example in breaches:
            print(f"- {kind}, {count}x: {key}\n    runjobs submit {' '.join(map(repr, example))[:400]}")
    if arguments.json:
        arguments.json.write_text(
            json.dumps(
                {kind: {"tried": tally.tried, "exits": {str(code): n for code, n in tally.exits.items()},
                        "tracebacks": tally.tracebacks, "broken": tally.broken, "with_tag": tally.with_tag,
                        "tags_executed": tally.tags_executed, "too_many_jobs": tally.too_many_jobs,
                        "slowest_s": round(tally.slowest_s, 2), "seconds": round(seconds[kind], 1),
                        "breaches": {key: count for key, (count, _) in tally.breaches.items()}}
                 for kind, tally in tallies.items()},
                indent=2,
            )
        )  # fmt: skip
    sys.exit(1 if breaches else 0)


if __name__ == "__main__":
    main()
