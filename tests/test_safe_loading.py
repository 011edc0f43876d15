"""`runjobs predict` runs no code a model file carries: SavedModel graphs, .keras configs and ONNX ops.

Each test writes a hostile or foreign model the way an attacker (or another program)
would, with the real libraries, and predicts with it through the CLI.
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


def test_a_saved_model_that_is_not_a_linear_model_is_refused(tmp_path):
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


def test_a_keras_file_with_another_layer_is_refused_before_keras_reads_it(tmp_path):
    import keras

    model = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)]
    )
    model.save(tmp_path / "model.keras")
    result = run_cli(["predict", str(tmp_path / "model.keras"), "--input", "3"])
    assert result.exit_code == 2
    assert "not a linear model runjobs wrote" in result.stderr


def test_an_onnx_graph_with_ops_beyond_a_linear_model_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        "not-linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor("w", TensorProto.FLOAT, [1, 1], [2.0])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "model.onnx")
    result = run_cli(["predict", str(tmp_path / "model.onnx"), "--input", "3"])
    assert result.exit_code == 2
    assert "ai.onnx::Relu" in result.stderr and "not a linear model runjobs wrote" in result.stderr
