"""`runjobs predict` runs no code a model file carries: SavedModel graphs, .keras configs and ONNX ops.

Each test writes a hostile or foreign model the way an attacker (or another program)
would, with the real libraries, and predicts with it through the CLI. A SavedModel is
read as the dense stack its model.json lists (a linear model without one), a .keras
file only when its config is a Sequential of Dense layers with runjobs' activations.
The tests that import TensorFlow are slow.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli


def saved_model_that_writes_a_file(directory, marker, extra_variable=False):
    import tensorflow as tf

    class Linear(tf.Module):
        def __init__(self):
            super().__init__()
            self.kernel = tf.Variable([[2.0]])
            self.bias = tf.Variable([1.0])
            if extra_variable:
                self.hidden = tf.Variable([0.0, 0.0, 0.0])

        @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32, name="features")])
        def serve(self, features):
            tf.io.write_file(str(marker), "the graph ran")  # what predict must never execute
            return {"prediction": features @ self.kernel + self.bias}

    module = Linear()
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})


def test_a_saved_model_graph_is_never_run_only_its_linear_variables_are_read(tmp_path):
    marker = tmp_path / "written-by-the-graph"
    saved_model_that_writes_a_file(tmp_path / "saved_model", marker)
    result = run_cli(["predict", str(tmp_path / "saved_model"), "--input", "3", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == [{"input": [3.0], "output": 7.0}]
    assert not marker.exists()


def test_a_saved_model_that_is_not_a_linear_model_and_has_no_model_json_is_refused(tmp_path):
    marker = tmp_path / "written-by-the-graph"
    saved_model_that_writes_a_file(tmp_path / "saved_model", marker, extra_variable=True)
    result = run_cli(["predict", str(tmp_path / "saved_model"), "--input", "3"])
    assert result.exit_code == 2
    assert (
        "not a linear model runjobs wrote" in result.stderr
        and "never runs a SavedModel's graph" in result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def write_manifest(directory, **fields):
    """A job directory's model.json as workers/export.py writes it, with `fields` over the defaults."""
    manifest = {
        "framework": "tensorflow",
        "feature_count": 1,
        "features": ["x"],
        "formats": {},
        "not_written": {},
    }
    (directory / "model.json").write_text(json.dumps({**manifest, **fields}))


STACK = [
    {"inputs": 1, "outputs": 2, "activation": "relu"},
    {"inputs": 2, "outputs": 1, "activation": "linear"},
]


@pytest.mark.slow
def test_a_saved_model_stack_is_computed_from_its_variables_in_model_jsons_layers(tmp_path):
    """The variables of a hostile SavedModel, read as model.json's relu stack; its graph never runs."""
    import tensorflow as tf
    from tensorflow.python.trackable.autotrackable import AutoTrackable

    marker = tmp_path / "written-by-the-graph"
    hostile = AutoTrackable()
    # Named as Keras names a model's variables: variables/N, in the model's order.
    hostile.variables = [
        tf.Variable([[1.0, -1.0]]),
        tf.Variable([0.0, 0.5]),
        tf.Variable([[2.0], [3.0]]),
        tf.Variable([0.25]),
    ]

    @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32, name="features")])
    def serve(features):
        tf.io.write_file(str(marker), "the graph ran")
        return features

    hostile.serve = serve
    tf.saved_model.save(hostile, str(tmp_path / "saved_model"), signatures={"serving_default": serve})
    write_manifest(tmp_path, formats={"saved_model": "saved_model"}, layers=STACK)
    result = run_cli(["predict", str(tmp_path), "--input", "3", "--input", "-3", "--json"])
    assert result.exit_code == 0, result.stderr
    # relu([3, -3] + [0, 0.5]) = [3, 0] -> 2 * 3 + 0.25; relu([-3, 3.5]) = [0, 3.5] -> 3 * 3.5 + 0.25
    assert [item["output"] for item in json.loads(result.stdout)] == [6.25, 10.75]
    assert not marker.exists()


@pytest.mark.slow
def test_a_saved_model_whose_variables_are_not_model_jsons_layers_is_refused(tmp_path):
    marker = tmp_path / "written-by-the-graph"
    saved_model_that_writes_a_file(tmp_path / "saved_model", marker)  # kernel [1, 1] and bias [1]
    write_manifest(tmp_path, formats={"saved_model": "saved_model"}, layers=STACK)
    result = run_cli(["predict", str(tmp_path / "saved_model"), "--input", "3"])
    assert result.exit_code == 2
    assert "are not the layers model.json beside it lists ([1, 2], [2], [2, 1], [1]" in result.stderr
    assert "never runs a SavedModel's graph" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


@pytest.mark.slow
def test_a_user_models_saved_model_is_refused_naming_its_file_and_what_to_use_instead(tmp_path):
    marker = tmp_path / "written-by-the-graph"
    saved_model_that_writes_a_file(tmp_path / "saved_model", marker)
    (tmp_path / "model.onnx").write_bytes(b"")
    write_manifest(
        tmp_path,
        model="wide.py",
        user_model={"name": "wide.py", "filename": "/home/someone/wide.py", "digest": "0" * 64},
        formats={"saved_model": "saved_model", "onnx": "model.onnx"},
    )
    result = run_cli(["predict", str(tmp_path), "--format", "saved_model", "--input", "3"])
    assert result.exit_code == 2
    assert "the SavedModel of user model /home/someone/wide.py" in result.stderr
    assert f"predict from {tmp_path / 'model.onnx'} instead" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


@pytest.mark.slow
def test_a_keras_dense_stack_with_runjobs_activations_is_read(tmp_path):
    import keras
    import numpy as np

    model = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(4, activation="relu"),
            keras.layers.Dense(1, activation="tanh"),
        ]
    )
    model.save(tmp_path / "model.keras")
    expected = float(np.asarray(model(np.array([[0.75]], dtype=np.float32))).reshape(-1)[0])
    result = run_cli(["predict", str(tmp_path / "model.keras"), "--input", "0.75", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["output"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_a_keras_file_with_a_lambda_layer_is_refused_before_keras_reads_it(tmp_path):
    import keras

    marker = tmp_path / "written-by-the-lambda"

    def payload(values):
        marker.write_text("the lambda ran")
        return values

    model = keras.Sequential([keras.Input((1,)), keras.layers.Lambda(payload), keras.layers.Dense(1)])
    model.save(tmp_path / "model.keras")
    marker.unlink(missing_ok=True)  # building the model called it once
    result = run_cli(["predict", str(tmp_path / "model.keras"), "--input", "3"])
    assert result.exit_code == 2
    assert "not a dense stack runjobs reads (layer Lambda)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["layer", "initializer", "activation"])
def test_a_keras_file_with_a_custom_object_is_refused_before_keras_reads_it(tmp_path, where):
    import keras

    @keras.saving.register_keras_serializable(package="attack")
    class Doubling(keras.layers.Layer):
        def call(self, values):
            return 2 * values

    @keras.saving.register_keras_serializable(package="attack")
    class Ones(keras.initializers.Initializer):
        def __call__(self, shape, dtype=None):
            return keras.ops.ones(shape, dtype=dtype)

    @keras.saving.register_keras_serializable(package="attack")
    def swish_like(values):
        return values * keras.ops.sigmoid(values)

    layers = {
        "layer": [Doubling(), keras.layers.Dense(1)],
        "initializer": [keras.layers.Dense(1, kernel_initializer=Ones())],
        "activation": [keras.layers.Dense(1, activation=swish_like)],
    }[where]
    keras.Sequential([keras.Input((1,)), *layers]).save(tmp_path / "model.keras")
    result = run_cli(["predict", str(tmp_path / "model.keras"), "--input", "3"])
    assert result.exit_code == 2
    expected = {
        "layer": "(layer Doubling)",
        "initializer": "(custom object attack>Ones",
        "activation": "(custom object attack>swish_like",
    }
    assert f"not a dense stack runjobs reads {expected[where]}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_onnx_graph_with_an_op_outside_the_standard_set_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    # A custom domain's op is native code onnxruntime would have to be given; never loaded.
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("Payload", ["y"], ["z"], domain="com.example"),
        ],
        "custom-op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor("w", TensorProto.FLOAT, [1, 1], [2.0])],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), tmp_path / "model.onnx")
    result = run_cli(["predict", str(tmp_path / "model.onnx"), "--input", "3"])
    assert result.exit_code == 2
    assert "com.example::Payload" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
