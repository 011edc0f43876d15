"""Data sources for the house-price jobs: the article's houses, a CSV file, or synthetic data.

Every source becomes a `Dataset` of float64 arrays. The driver loads the data once,
validates it before any Ray task starts, and ships the arrays to the workers, so a
worker on another node never needs the CSV file on its own disk.

A CSV is read strictly: UTF-8 (a byte-order mark is dropped), well-formed quoting,
distinct column names, and cells that are plain decimal numbers; anything else is a
DataError naming the file and line, never a guess.
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARTICLE_SIZES_SQFT = tuple(range(500, 2751, 250))
ARTICLE_PRICE_PER_SQFT = 0.2  # thousands of dollars per square foot
ARTICLE_PREDICTION_SQFT = 1800.0

# The most values (rows x features) synthetic data may have: 10^8 float64 values are
# 800 MB of features, held by the driver and shipped to every job through Ray's object
# store. Larger sizes would exhaust memory while planning, before any check could run.
MAX_SYNTHETIC_VALUES = 10**8

# A plain decimal number, as spreadsheets and pandas write them. Python's float() also
# reads `1_000`, digits of other scripts and `infinity`, which a data file should not
# silently mean; a cell that float() reads but this does not is refused.
PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)


class DataError(ValueError):
    """The data source cannot be used; the message says where and what to fix."""


@dataclass(frozen=True)
class Dataset:
    features: np.ndarray  # shape (rows, feature_count), float64
    target: np.ndarray  # shape (rows,), float64
    feature_names: tuple[str, ...]
    target_name: str
    source: str
    # Synthetic data only: the mean squared noise actually drawn, mean(noise**2), which
    # is the loss of the true function on these rows and so the loss a model that learnt
    # the function exactly would reach. None for a CSV and the article's houses.
    noise_floor: float | None = None

    @property
    def rows(self) -> int:
        return int(self.features.shape[0])

    @property
    def feature_count(self) -> int:
        return int(self.features.shape[1])


# The target functions synthetic data can follow, in the order error messages list them.
SYNTHETIC_FUNCTIONS = ("linear", "sine", "quadratic")


@dataclass(frozen=True)
class SyntheticSpec:
    """`synthetic:rows=N,features=K,noise=S,seed=R,function=F`: y = f(X) + noise.

    Drawn from one generator seeded with `seed`, in this order: the features X, uniform
    in [-1, 1], shape (rows, features); the weights w, uniform in [-2, 2], one a feature;
    the bias b, uniform in [-1, 1]; the noise, normal(0, noise), one a row. With
    z = (X @ w) / sqrt(features), the target before noise is

    - linear (the default): f(X) = X @ w + b
    - sine:                 f(X) = sin(pi * z) + b
    - quadratic:            f(X) = z**2 + z + b

    Dividing by sqrt(features) keeps z's spread the same whatever the feature count, so
    sine's wiggles do not multiply as features are added (with one feature |z| <= 2: at
    most two periods across the data). Every function uses the same draws, so one seed
    gives the same features, noise and noise floor whatever the function; linear's
    arrays are exactly those of the versions before `function` existed.
    """

    rows: int = 1000
    features: int = 1
    noise: float = 0.1
    seed: int = 0
    function: str = "linear"

    def __post_init__(self) -> None:
        if self.function not in SYNTHETIC_FUNCTIONS:
            choices = ", ".join(SYNTHETIC_FUNCTIONS)
            raise DataError(f"synthetic function={self.function!r} is not known; use one of {choices}")

    def generate(self) -> Dataset:
        generator = np.random.default_rng(self.seed)
        features = generator.uniform(-1.0, 1.0, size=(self.rows, self.features))
        true_weights = generator.uniform(-2.0, 2.0, size=self.features)
        true_bias = generator.uniform(-1.0, 1.0)
        if self.function == "linear":
            target = features @ true_weights + true_bias
        else:
            direction = features @ true_weights / math.sqrt(self.features)
            if self.function == "sine":
                target = np.sin(np.pi * direction) + true_bias
            else:
                target = direction * direction + direction + true_bias
        noise = generator.normal(0.0, self.noise, size=self.rows)
        target = target + noise
        # A dot product rather than mean(noise**2): no second array as large as the noise.
        noise_floor = float(noise @ noise) / self.rows
        names = tuple(f"x{index}" for index in range(self.features))
        return Dataset(features, target, names, "y", self.describe(), noise_floor)

    def describe(self) -> str:
        text = f"synthetic:rows={self.rows},features={self.features},noise={self.noise},seed={self.seed}"
        # Linear data keeps the description it had before `function` existed: run ids hash it.
        return text if self.function == "linear" else f"{text},function={self.function}"


def article_dataset() -> Dataset:
    sizes = np.array(ARTICLE_SIZES_SQFT, dtype=np.float64)
    prices = sizes * ARTICLE_PRICE_PER_SQFT
    return Dataset(sizes.reshape(-1, 1), prices, ("size_sqft",), "price_thousands", "article")


def parse_synthetic(text: str) -> SyntheticSpec:
    """Parse the part after `synthetic:`, e.g. `rows=1000,features=3,noise=0.1,seed=7,function=sine`."""
    converters = {"rows": int, "features": int, "noise": float, "seed": int, "function": str.strip}
    kinds = {"rows": "whole number", "features": "whole number", "noise": "number", "seed": "whole number"}
    values: dict[str, int | float | str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, separator, raw_value = item.partition("=")
        if not separator or key not in converters:
            raise DataError(
                f"bad synthetic data item {item!r}: use synthetic:rows=N,features=K,noise=S,seed=R,"
                f"function={'|'.join(SYNTHETIC_FUNCTIONS)}"
            )
        try:
            values[key] = converters[key](raw_value)
        except ValueError:
            raise DataError(f"synthetic {key}={raw_value!r} is not a {kinds[key]}") from None
    spec = SyntheticSpec(**values)
    if spec.rows < 2:
        raise DataError(f"synthetic rows={spec.rows}: need at least 2 rows")
    if spec.features < 1:
        raise DataError(f"synthetic features={spec.features}: need at least 1 feature")
    if not math.isfinite(spec.noise) or spec.noise < 0:
        raise DataError(f"synthetic noise={spec.noise}: need a finite number >= 0")
    if spec.seed < 0:
        raise DataError(f"synthetic seed={spec.seed}: need a whole number >= 0")
    if spec.rows * spec.features > MAX_SYNTHETIC_VALUES:
        raise DataError(
            f"synthetic rows={spec.rows},features={spec.features} is {spec.rows * spec.features} values, "
            f"more than the limit of {MAX_SYNTHETIC_VALUES} (rows x features); use fewer rows or features"
        )
    return spec


def read_csv(
    path: str | Path,
    feature_columns: tuple[str, ...] = (),
    target_column: str | None = None,
) -> Dataset:
    """Read a CSV with a header row. The last column is the target unless columns are named."""
    path = Path(path)
    try:
        is_directory, is_file = path.is_dir(), path.is_file()
    except OSError as error:  # a name too long for the file system, say
        raise DataError(f"{path}: {error.strerror or error}; pass an existing CSV to --data") from None
    if is_directory:
        raise DataError(f"{path} is a directory; pass a CSV file to --data")
    if not is_file:
        raise DataError(f"{path}: no such file; pass an existing CSV to --data")
    try:
        # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column's name.
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, strict=True)
            header, columns, rows = _read_table(path, reader, feature_columns, target_column)
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x}); a binary file, or text in "
            "another encoding: save it as a UTF-8 CSV"
        ) from None
    except OSError as error:
        raise DataError(
            f"{path}: cannot read it ({error.strerror or error}); check its permissions"
        ) from None
    target_index, feature_indices = columns
    if len(rows) < 2:
        raise DataError(f"{path}: {len(rows)} data row(s); fitting a line needs at least 2")
    table = np.asarray(rows, dtype=np.float64)
    return Dataset(
        features=table[:, feature_indices],
        target=table[:, target_index],
        feature_names=tuple(header[i] for i in feature_indices),
        target_name=header[target_index],
        source=str(path),
    )


def _read_table(
    path: Path, reader, feature_columns: tuple[str, ...], target_column: str | None
) -> tuple[list[str], tuple[int, list[int]], list[list[float]]]:
    """The header (stripped names), the chosen columns and every data row as numbers.

    The columns are checked as soon as the header is read, before the rows; csv's own
    errors become DataErrors naming the line.
    """
    try:
        header = next(reader, None)
        while header is not None and not any(cell.strip() for cell in header):
            header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: the file is empty; it needs a header row and at least 2 data rows")
        header = [cell.strip() for cell in header]
        repeated = [name for name, count in Counter(header).items() if count > 1]
        if repeated:
            raise DataError(
                f"{path}:{reader.line_num}: the header names {', '.join(map(repr, repeated))} more than "
                "once, so a column cannot be chosen by name; give every column its own name"
            )
        columns = _select_columns(path, header, feature_columns, target_column)
        rows: list[list[float]] = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank lines carry no data
            line = reader.line_num
            if len(row) != len(header):
                raise DataError(f"{path}:{line}: {len(row)} columns where the header has {len(header)}")
            rows.append([_parse_number(path, line, header[i], row[i]) for i in range(len(row))])
    except csv.Error as error:
        if "field larger than field limit" in str(error):
            raise DataError(
                f"{path}:{reader.line_num}: a cell longer than {csv.field_size_limit()} characters; "
                "a CSV for --data holds one number a cell (is it the right file?)"
            ) from None
        raise DataError(
            f"{path}:{reader.line_num}: not valid CSV ({error}); check the quotes on that line: "
            'a quoted cell is closed by " and followed by a comma or the end of the line'
        ) from None
    return header, columns, rows


def _select_columns(
    path: Path, header: list[str], feature_columns: tuple[str, ...], target_column: str | None
) -> tuple[int, list[int]]:
    if len(header) < 2:
        raise DataError(f"{path}:1: the header names {len(header)} column(s); need a feature and a target")
    for name in (*feature_columns, *([target_column] if target_column else [])):
        if name not in header:
            raise DataError(f"{path}:1: no column {name!r}; the columns are {', '.join(header)}")
    target_index = header.index(target_column) if target_column else len(header) - 1
    if feature_columns:
        feature_indices = [header.index(name) for name in feature_columns]
    else:
        feature_indices = [index for index in range(len(header)) if index != target_index]
    if target_index in feature_indices:
        raise DataError(f"{path}: column {header[target_index]!r} is both a feature and the target")
    return target_index, feature_indices


def _parse_number(path: Path, line: int, column: str, cell: str) -> float:
    text = cell.strip()
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{path}:{line}: column {column!r} holds {text!r}, not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{path}:{line}: column {column!r} holds {text!r}, not a finite number")
    if not PLAIN_NUMBER.fullmatch(text):
        raise DataError(
            f"{path}:{line}: column {column!r} holds {text!r}, not a plain number; write it with the "
            "digits 0-9, a point and an optional exponent, e.g. 1000 or 1.5e3"
        )
    return value


def load_dataset(
    source: str, feature_columns: tuple[str, ...] = (), target_column: str | None = None
) -> Dataset:
    """Load `article`, `synthetic:...` or a CSV path.

    `feature_columns` and `target_column` name a CSV's columns; with the article or
    synthetic data they are refused rather than ignored, since the job would not train
    on what they say.
    """
    built_in = source == "article" or source == "synthetic" or source.startswith("synthetic:")
    if built_in and (feature_columns or target_column):
        given = [f"features={','.join(feature_columns)}"] if feature_columns else []
        given += [f"target={target_column}"] if target_column else []
        raise DataError(
            f"{' and '.join(given)}: features and target name a CSV's columns, but the data is {source}; "
            "drop them, or pass --data PATH.csv"
        )
    if source == "article":
        return article_dataset()
    if source.startswith("synthetic:") or source == "synthetic":
        return parse_synthetic(source.partition(":")[2]).generate()
    return read_csv(source, feature_columns, target_column)
