"""Data sources for the house-price jobs: the article's houses, a CSV file, or synthetic data.

Every source becomes a `Dataset` of float64 arrays. The driver loads the data once,
validates it before any Ray task starts, and ships the arrays to the workers, so a
worker on another node never needs the CSV file on its own disk.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARTICLE_SIZES_SQFT = tuple(range(500, 2751, 250))
ARTICLE_PRICE_PER_SQFT = 0.2  # thousands of dollars per square foot
ARTICLE_PREDICTION_SQFT = 1800.0


class DataError(ValueError):
    """The data source cannot be used; the message says where and what to fix."""


@dataclass(frozen=True)
class Dataset:
    features: np.ndarray  # shape (rows, feature_count), float64
    target: np.ndarray  # shape (rows,), float64
    feature_names: tuple[str, ...]
    target_name: str
    source: str

    @property
    def rows(self) -> int:
        return int(self.features.shape[0])

    @property
    def feature_count(self) -> int:
        return int(self.features.shape[1])


@dataclass(frozen=True)
class SyntheticSpec:
    """`synthetic:rows=N,features=K,noise=S,seed=R`: y = X @ w + b + noise, with w and b drawn from seed."""

    rows: int = 1000
    features: int = 1
    noise: float = 0.1
    seed: int = 0

    def generate(self) -> Dataset:
        generator = np.random.default_rng(self.seed)
        features = generator.uniform(-1.0, 1.0, size=(self.rows, self.features))
        true_weights = generator.uniform(-2.0, 2.0, size=self.features)
        true_bias = generator.uniform(-1.0, 1.0)
        target = features @ true_weights + true_bias
        target = target + generator.normal(0.0, self.noise, size=self.rows)
        names = tuple(f"x{index}" for index in range(self.features))
        return Dataset(features, target, names, "y", self.describe())

    def describe(self) -> str:
        return f"synthetic:rows={self.rows},features={self.features},noise={self.noise},seed={self.seed}"


def article_dataset() -> Dataset:
    sizes = np.array(ARTICLE_SIZES_SQFT, dtype=np.float64)
    prices = sizes * ARTICLE_PRICE_PER_SQFT
    return Dataset(sizes.reshape(-1, 1), prices, ("size_sqft",), "price_thousands", "article")


def parse_synthetic(text: str) -> SyntheticSpec:
    """Parse the part after `synthetic:`, e.g. `rows=1000,features=3,noise=0.1,seed=7`."""
    converters = {"rows": int, "features": int, "noise": float, "seed": int}
    values: dict[str, int | float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, separator, raw_value = item.partition("=")
        if not separator or key not in converters:
            raise DataError(
                f"bad synthetic data item {item!r}: use synthetic:rows=N,features=K,noise=S,seed=R"
            )
        try:
            values[key] = converters[key](raw_value)
        except ValueError:
            raise DataError(f"synthetic {key}={raw_value!r} is not a {converters[key].__name__}") from None
    spec = SyntheticSpec(**values)
    if spec.rows < 2:
        raise DataError(f"synthetic rows={spec.rows}: need at least 2 rows")
    if spec.features < 1:
        raise DataError(f"synthetic features={spec.features}: need at least 1 feature")
    if not math.isfinite(spec.noise) or spec.noise < 0:
        raise DataError(f"synthetic noise={spec.noise}: need a finite number >= 0")
    return spec


def read_csv(
    path: str | Path,
    feature_columns: tuple[str, ...] = (),
    target_column: str | None = None,
) -> Dataset:
    """Read a CSV with a header row. The last column is the target unless columns are named."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass an existing CSV to --data")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        while header is not None and not any(cell.strip() for cell in header):
            header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: the file is empty; it needs a header row and at least 2 data rows")
        header = [cell.strip() for cell in header]
        target_index, feature_indices = _select_columns(path, header, feature_columns, target_column)
        rows: list[list[float]] = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank lines carry no data
            line = reader.line_num
            if len(row) != len(header):
                raise DataError(f"{path}:{line}: {len(row)} columns where the header has {len(header)}")
            rows.append([_parse_number(path, line, header[i], row[i]) for i in range(len(row))])
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
    try:
        value = float(cell)
    except ValueError:
        raise DataError(f"{path}:{line}: column {column!r} holds {cell.strip()!r}, not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{path}:{line}: column {column!r} holds {cell.strip()!r}, not a finite number")
    return value


def load_dataset(
    source: str, feature_columns: tuple[str, ...] = (), target_column: str | None = None
) -> Dataset:
    """Load `article`, `synthetic:...` or a CSV path."""
    if source == "article":
        return article_dataset()
    if source.startswith("synthetic:") or source == "synthetic":
        return parse_synthetic(source.partition(":")[2]).generate()
    return read_csv(source, feature_columns, target_column)
