"""Data sources and the exact reference: no Ray, no framework."""

from __future__ import annotations

import numpy as np
import pytest

from workers.data import DataError, article_dataset, load_dataset, parse_synthetic, read_csv
from workers.reference import classify_convergence, least_squares, mean_squared_error


def numpy_least_squares(dataset):
    design = np.column_stack([dataset.features, np.ones(dataset.rows)])
    solution, *_ = np.linalg.lstsq(design, dataset.target, rcond=None)
    return solution[:-1], solution[-1]


def test_article_data_is_the_ten_houses_priced_at_point_two_per_square_foot():
    dataset = article_dataset()
    assert dataset.features[:, 0].tolist() == [500, 750, 1000, 1250, 1500, 1750, 2000, 2250, 2500, 2750]
    assert dataset.target.tolist() == pytest.approx([100, 150, 200, 250, 300, 350, 400, 450, 500, 550])


def test_reference_on_the_article_data_is_price_equals_point_two_size():
    reference = least_squares(article_dataset())
    assert reference.weights == pytest.approx([0.2], abs=1e-12)
    assert reference.bias == pytest.approx(0.0, abs=1e-9)
    assert reference.loss == pytest.approx(0.0, abs=1e-18)


def test_reference_equals_numpy_least_squares_on_synthetic_data_with_several_features():
    dataset = load_dataset("synthetic:rows=500,features=4,noise=0.3,seed=11")
    weights, bias = numpy_least_squares(dataset)
    reference = least_squares(dataset)
    np.testing.assert_allclose(reference.weights, weights, rtol=1e-10)
    assert reference.bias == pytest.approx(bias, rel=1e-10)
    assert reference.loss == pytest.approx(mean_squared_error(dataset, weights, bias), rel=1e-10)


def test_reference_equals_numpy_least_squares_on_a_csv_file(tmp_path):
    path = tmp_path / "houses.csv"
    path.write_text(
        "size,rooms,age,price\n800,2,30,150\n1200,3,12,231\n1500,3,5,290\n2100,4,20,380\n2600,5,2,505\n"
    )
    dataset = read_csv(path)
    assert dataset.feature_names == ("size", "rooms", "age")
    assert dataset.target_name == "price"
    weights, bias = numpy_least_squares(dataset)
    reference = least_squares(dataset)
    np.testing.assert_allclose(reference.weights, weights, rtol=1e-9)
    assert reference.bias == pytest.approx(bias, rel=1e-9)


def test_csv_columns_can_be_named(tmp_path):
    path = tmp_path / "houses.csv"
    path.write_text("price,size,note\n100,500,1\n150,750,2\n200,1000,3\n")
    dataset = read_csv(path, feature_columns=("size",), target_column="price")
    assert dataset.features[:, 0].tolist() == [500, 750, 1000]
    assert dataset.target.tolist() == [100, 150, 200]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "empty"),
        ("size,price\n", "0 data row(s)"),
        ("size,price\n500,100\n", "1 data row(s)"),
        ("size,price\n500,100\n750,lots\n", ":3: column 'price' holds 'lots', not a number"),
        ("size,price\n500,100\n750\n", ":3: 1 columns where the header has 2"),
        ("size\n500\n750\n", "need a feature and a target"),
    ],
)
def test_bad_csv_files_are_refused_naming_the_file_and_line(tmp_path, content, expected):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError) as error:
        read_csv(path)
    assert str(path) in str(error.value)
    assert expected in str(error.value)


def test_a_missing_csv_file_is_refused(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(str(tmp_path / "missing.csv"))


def test_an_unknown_csv_column_lists_the_columns(tmp_path):
    path = tmp_path / "houses.csv"
    path.write_text("size,price\n500,100\n750,150\n")
    with pytest.raises(DataError, match="no column 'cost'; the columns are size, price"):
        read_csv(path, target_column="cost")


def test_synthetic_spec_parses_and_is_reproducible():
    spec = parse_synthetic("rows=50,features=3,noise=0.5,seed=4")
    assert (spec.rows, spec.features, spec.noise, spec.seed) == (50, 3, 0.5, 4)
    first, second = spec.generate(), spec.generate()
    assert first.features.shape == (50, 3)
    np.testing.assert_array_equal(first.target, second.target)


@pytest.mark.parametrize("text", ["rows=1", "features=0", "noise=-1", "rows=ten", "colour=red", "rows"])
def test_bad_synthetic_specs_are_refused(text):
    with pytest.raises(DataError):
        parse_synthetic(text)


def test_convergence_rule_tells_converged_not_converged_and_diverged_apart():
    dataset = article_dataset()
    reference = least_squares(dataset)
    falling = [1000.0, 10.0]
    assert classify_convergence(dataset, np.array([0.2001]), 0.0, falling, reference) == "converged"
    assert classify_convergence(dataset, np.array([-0.98]), 0.0, falling, reference) == "not_converged"
    assert classify_convergence(dataset, np.array([np.nan]), 0.0, falling, reference) == "diverged"
    assert classify_convergence(dataset, np.array([0.2]), 0.0, [10.0, np.inf], reference) == "diverged"
    assert classify_convergence(dataset, np.array([0.3]), 0.0, [10.0, 50.0], reference) == "diverged"
