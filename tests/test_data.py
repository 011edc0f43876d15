"""Data sources and the exact reference: no Ray, no framework."""

from __future__ import annotations

import numpy as np
import pytest

from workers.data import (
    MAX_SYNTHETIC_VALUES,
    DataError,
    Dataset,
    SyntheticSpec,
    article_dataset,
    load_dataset,
    parse_synthetic,
    read_csv,
)
from workers.reference import (
    CONVERGED_R2_GAP,
    PLATEAU_TOLERANCE,
    classify_convergence,
    classify_fit,
    fits_noise,
    floor_gap,
    least_squares,
    mean_squared_error,
    r2_gap,
)


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


def test_a_byte_order_mark_is_not_part_of_the_first_column_name(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("size,price\n500,100\n750,150\n".encode("utf-8-sig"))
    dataset = read_csv(path, feature_columns=("size",), target_column="price")
    assert dataset.feature_names == ("size",)
    assert dataset.features[:, 0].tolist() == [500, 750]


def test_the_numbers_a_valid_csv_holds_parse_as_before(tmp_path):
    cells = ["+1.5e3", " 2 ", ".5", "1.", "-0", "007", "1E-2", '"3"', "-4.25e+1"]
    path = tmp_path / "plain.csv"
    path.write_text("x,y\n" + "".join(f"{cell},{index}\n" for index, cell in enumerate(cells)))
    dataset = read_csv(path)
    assert dataset.features[:, 0].tolist() == [float(cell.strip('"')) for cell in cells]
    assert dataset.target.tolist() == list(range(len(cells)))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x7fELF\x02\x01\x01\x00\xff\xfe\x00\x00", "not UTF-8 text"),
        ("size,price\n500,100\n750,\xe9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9)"),
        (b"size,price\n500,100\n750," + b"9" * 131_073 + b"\n", ":3: a cell longer than 131072 characters"),
        (b'size,price\n500,100\n"750,150\n', ":3: not valid CSV (unexpected end of data)"),
        (b'size,price\n"500"0,100\n750,150\n', ":2: not valid CSV"),
        (b"size,price\n500,100\n1_000,150\n", ":3: column 'size' holds '1_000', not a plain number"),
        ("size,price\n500,100\n\u0667\u0665\u0660,150\n".encode(), "not a plain number"),
        (b"size,price\n500,100\n750,infinity\n", "not a finite number"),
    ],
    ids=[
        "binary",
        "latin-1",
        "huge-cell",
        "open-quote",
        "bad-quote",
        "underscore",
        "arabic-digits",
        "infinity",
    ],
)
def test_a_csv_that_is_not_plain_utf8_numbers_is_refused(tmp_path, content, expected):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        read_csv(path)
    assert str(error.value).startswith(str(path))
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_duplicate_column_names_are_refused_since_target_would_be_ambiguous(tmp_path):
    path = tmp_path / "twice.csv"
    path.write_text("x,size,x,y,y\n1,2,3,4,5\n6,7,8,9,10\n")
    with pytest.raises(DataError, match=r"twice.csv:1: the header names 'x', 'y' more than once"):
        read_csv(path, target_column="x")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("seed=-1", "seed=-1: need a whole number >= 0"),
        ("rows=1000000000000,features=1000", f"1000000000000000 values, more than the limit of {10**8}"),
        ("rows=100000001", "limit of 100000000 (rows x features)"),
        ("rows=ten", "rows='ten' is not a whole number"),
    ],
)
def test_synthetic_data_too_large_or_unseedable_is_refused_with_the_limit(text, expected):
    with pytest.raises(DataError) as error:
        parse_synthetic(text)
    assert expected in str(error.value)


def test_synthetic_data_up_to_the_limit_is_accepted():
    assert MAX_SYNTHETIC_VALUES == 10**8
    spec = parse_synthetic(f"rows={MAX_SYNTHETIC_VALUES // 4},features=4")
    assert spec.rows * spec.features == MAX_SYNTHETIC_VALUES


@pytest.mark.parametrize("source", ["article", "synthetic:rows=20", "synthetic"])
def test_csv_columns_named_for_data_that_is_not_a_csv_are_refused(source):
    with pytest.raises(DataError, match="features and target name a CSV's columns"):
        load_dataset(source, feature_columns=("size_sqft",))
    with pytest.raises(DataError, match=f"target=price: .* but the data is {source}"):
        load_dataset(source, target_column="price")


def test_a_constant_target_has_a_finite_gap_the_loss_difference_itself():
    for constant in (0.0, 0.1, 5.0, 1e6):
        dataset = Dataset(np.arange(10.0).reshape(-1, 1), np.full(10, constant), ("x",), "y", "test")
        reference = least_squares(dataset)
        assert r2_gap(dataset, reference.loss + 2.0, reference) == pytest.approx(2.0)
        assert r2_gap(dataset, reference.loss, reference) == 0.0
        exact = classify_convergence(dataset, np.array([0.0]), constant, [1.0, 0.5], reference)
        off_by_one = classify_convergence(dataset, np.array([0.0]), constant + 1.0, [1.0, 0.5], reference)
        assert (exact, off_by_one) == ("converged", "not_converged")
    # A target with variance keeps the R^2 gap: (loss - optimum) / variance.
    dataset = article_dataset()
    reference = least_squares(dataset)
    variance = float(np.var(dataset.target))
    assert r2_gap(dataset, reference.loss + variance * CONVERGED_R2_GAP, reference) == pytest.approx(
        CONVERGED_R2_GAP
    )


def synthetic_draws(rows, features, noise, seed):
    """The draws SyntheticSpec documents, in its order: X, w, b, then the noise."""
    generator = np.random.default_rng(seed)
    x = generator.uniform(-1.0, 1.0, size=(rows, features))
    w = generator.uniform(-2.0, 2.0, size=features)
    b = generator.uniform(-1.0, 1.0)
    return x, w, b, generator.normal(0.0, noise, size=rows)


def true_function(function, x, w, b):
    """The documented target before noise."""
    z = x @ w / np.sqrt(x.shape[1])
    return {"linear": x @ w + b, "sine": np.sin(np.pi * z) + b, "quadratic": z**2 + z + b}[function]


def test_synthetic_linear_data_is_what_it_was_before_functions_existed():
    plain = SyntheticSpec(rows=200, features=3, noise=0.2, seed=5)
    linear = parse_synthetic("rows=200,features=3,noise=0.2,seed=5,function=linear")
    assert linear == plain
    # Run ids hash this string: it must not gain a function for the default.
    assert linear.describe() == "synthetic:rows=200,features=3,noise=0.2,seed=5"
    x, w, b, noise = synthetic_draws(200, 3, 0.2, 5)
    old_target = (x @ w + b) + noise
    for dataset in (plain.generate(), linear.generate()):
        np.testing.assert_array_equal(dataset.features, x)
        np.testing.assert_array_equal(dataset.target, old_target)


@pytest.mark.parametrize("function", ["sine", "quadratic"])
def test_synthetic_sine_and_quadratic_follow_their_formulas_reproducibly(function):
    spec = parse_synthetic(f"rows=300,features=2,noise=0.1,seed=0,function={function}")
    assert spec.function == function
    assert spec.describe() == f"synthetic:rows=300,features=2,noise=0.1,seed=0,function={function}"
    assert parse_synthetic(spec.describe().partition(":")[2]) == spec
    first, second = spec.generate(), load_dataset(spec.describe())
    np.testing.assert_array_equal(first.target, second.target)
    assert first.source == spec.describe()
    x, w, b, noise = synthetic_draws(300, 2, 0.1, 0)
    np.testing.assert_array_equal(first.features, x)
    np.testing.assert_allclose(first.target, true_function(function, x, w, b) + noise, rtol=0, atol=1e-12)
    # Not a line: the best line leaves far more than the noise unexplained (w is not tiny for seed 0).
    assert least_squares(first).loss > 2 * first.noise_floor


@pytest.mark.parametrize("function", ["linear", "sine", "quadratic"])
def test_synthetic_noise_floor_is_the_loss_of_the_true_function_on_the_drawn_rows(function):
    dataset = parse_synthetic(f"rows=500,features=2,noise=0.3,seed=8,function={function}").generate()
    x, w, b, _ = synthetic_draws(500, 2, 0.3, 8)
    residuals = true_function(function, x, w, b) - dataset.target
    assert dataset.noise_floor == pytest.approx(float(np.mean(residuals**2)), rel=1e-9)


def test_synthetic_noise_floor_approaches_the_noise_variance_with_many_rows():
    dataset = parse_synthetic("rows=100000,noise=0.5,seed=2,function=sine").generate()
    assert dataset.noise_floor == pytest.approx(0.25, rel=0.05)


@pytest.mark.parametrize("function", ["linear", "sine", "quadratic"])
def test_synthetic_data_without_noise_has_a_floor_of_zero(function):
    dataset = parse_synthetic(f"rows=50,features=2,noise=0,seed=1,function={function}").generate()
    assert dataset.noise_floor == 0.0
    x, w, b, _ = synthetic_draws(50, 2, 0.0, 1)
    np.testing.assert_allclose(dataset.target, true_function(function, x, w, b), rtol=0, atol=1e-12)
    assert floor_gap(dataset, 0.0) == 0.0


def test_csv_and_article_data_have_no_noise_floor_so_no_floor_gap(tmp_path):
    path = tmp_path / "houses.csv"
    path.write_text("size,price\n500,100\n750,150\n")
    for dataset in (article_dataset(), read_csv(path)):
        assert dataset.noise_floor is None
        assert floor_gap(dataset, 1.0) is None
    assert not fits_noise(None)


def test_an_unknown_synthetic_function_is_refused_listing_the_choices():
    with pytest.raises(DataError) as error:
        parse_synthetic("rows=10,function=cubic")
    message = str(error.value)
    assert "function='cubic'" in message
    assert "linear, sine, quadratic" in message
    assert "\n" not in message
    with pytest.raises(DataError, match="linear, sine, quadratic"):
        SyntheticSpec(function="Sine")


def test_floor_gap_on_synthetic_data_is_the_loss_above_the_floor_over_the_variance():
    dataset = parse_synthetic("rows=400,noise=0.2,seed=6,function=sine").generate()
    variance = float(np.var(dataset.target))
    assert floor_gap(dataset, dataset.noise_floor) == 0.0
    above = floor_gap(dataset, dataset.noise_floor + 0.5 * variance)
    assert above == pytest.approx(0.5)
    below = floor_gap(dataset, dataset.noise_floor - 2 * CONVERGED_R2_GAP * variance)
    assert below == pytest.approx(-2 * CONVERGED_R2_GAP)
    # Below the floor by more than the tolerance: the model learnt the rows' noise.
    assert fits_noise(below)
    assert not fits_noise(above)
    assert not fits_noise(floor_gap(dataset, dataset.noise_floor - 0.5 * CONVERGED_R2_GAP * variance))


def test_floor_gap_of_a_constant_synthetic_like_target_is_the_loss_difference_itself():
    dataset = Dataset(np.arange(10.0).reshape(-1, 1), np.full(10, 3.0), ("x",), "y", "test", 0.25)
    assert floor_gap(dataset, 2.25) == pytest.approx(2.0)
    assert floor_gap(dataset, 0.25) == 0.0


def test_classify_fit_on_synthetic_data_judges_the_final_loss_against_the_noise_floor():
    dataset = parse_synthetic("rows=400,noise=0.2,seed=6,function=quadratic").generate()
    variance = float(np.var(dataset.target))
    near_floor = dataset.noise_floor + 0.5 * CONVERGED_R2_GAP * variance
    far_above = dataset.noise_floor + 0.1 * variance
    # Standardised-unit history, still falling: the floor decides, not the plateau.
    falling = [1.0, 0.5, 0.2, 0.1]
    assert classify_fit(falling, near_floor, dataset) == "converged"
    assert classify_fit(falling, dataset.noise_floor * 0.5, dataset) == "converged"
    flat = [1.0] + [0.3] * 20
    assert classify_fit(flat, far_above, dataset) == "not_converged"
    assert classify_fit([1.0, np.nan, 0.1], near_floor, dataset) == "diverged"
    assert classify_fit(falling, np.inf, dataset) == "diverged"
    assert classify_fit([0.1, 0.5], near_floor, dataset) == "diverged"


def test_classify_fit_without_a_floor_asks_whether_the_loss_stopped_falling_unlike_synthetic_data():
    dataset = article_dataset()
    # 30 epochs: the last tenth is 3 epochs back, where the loss has stopped falling.
    plateaued = [100.0 / (epoch + 1) for epoch in range(26)] + [
        100.0 / 26 * (1 - 1e-4 * i) for i in range(1, 5)
    ]
    assert classify_fit(plateaued, 5.0, dataset) == "converged"
    falling = [100.0 / (epoch + 1) for epoch in range(30)]
    assert classify_fit(falling, 5.0, dataset) == "not_converged"
    # Just inside and just outside the tolerance over one epoch back (fewer than 20 epochs).
    assert classify_fit([2.0, 1.0 + PLATEAU_TOLERANCE / 2, 1.0], 1.0, dataset) == "converged"
    assert classify_fit([2.0, 1.0 + 2 * PLATEAU_TOLERANCE, 1.0], 1.0, dataset) == "not_converged"
    # A loss of exactly zero that stays there has plateaued; one epoch cannot show it.
    assert classify_fit([1.0, 0.0, 0.0], 0.0, dataset) == "converged"
    assert classify_fit([1.0], 1.0, dataset) == "not_converged"
    assert classify_fit([], 1.0, dataset) == "not_converged"
    assert classify_fit([1.0, 2.0, 2.0], 1.0, dataset) == "diverged"
    assert classify_fit([1.0, 0.5, np.inf], 1.0, dataset) == "diverged"
    assert classify_fit([1.0, 0.5, 0.5], np.nan, dataset) == "diverged"
