"""ONNX, the one format every framework may write and none is needed to read.

Not a framework: the registry's ONNX format names this module as its reader, so
`runjobs predict model.onnx` imports onnxruntime and neither TensorFlow nor torch. Each
framework writes ONNX with its own converter (tf2onnx, torch.onnx); the helpers here
keep their opset, their install hint and their way of reporting a missing converter the
same.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from workers.frameworks.base import ModelLoadError, Predictor

# The opset both converters write; onnxruntime 1.17 and later run it.
ONNX_OPSET = 18
ONNX_INSTALL_HINT = "pip install 'runjobs[onnx]'"


def missing_converter(*module_names: str) -> str | None:
    """Why ONNX cannot be written here (the converter modules that are not installed), or None."""
    missing = [name for name in module_names if importlib.util.find_spec(name) is None]
    return f"needs {', '.join(missing)}: {ONNX_INSTALL_HINT}" if missing else None


def one_line(error: BaseException) -> str:
    """An exception as one line for a manifest's `not_written`: its type and first line."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# The ops of a linear model as both converters write it (tf2onnx: MatMul and Add; torch:
# Gemm), and a few a converter may add around them. An ONNX graph is run by onnxruntime,
# whose custom-op domains and contrib ops are native code: only these standard ops load.
LINEAR_MODEL_OPS = frozenset({"MatMul", "Add", "Gemm", "Identity", "Reshape", "Cast", "Flatten", "Constant"})


def check_linear_graph(path: Path) -> None:
    """Refuse an ONNX file whose graph holds anything but a linear model's standard ops."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError and friends without a common base
        raise ModelLoadError(f"{path}: cannot load it as a onnx model ({type(error).__name__})") from None
    if model.functions or any(initializer.data_location == 1 for initializer in model.graph.initializer):
        raise ModelLoadError(f"{path}: ONNX functions and external data are not read by runjobs predict")
    unexpected = sorted(
        {f"{node.domain or 'ai.onnx'}::{node.op_type}" for node in model.graph.node
         if node.domain not in ("", "ai.onnx") or node.op_type not in LINEAR_MODEL_OPS}
    )  # fmt: skip
    if unexpected:
        raise ModelLoadError(
            f"{path}: not a linear model runjobs wrote (ops {', '.join(unexpected)}); runjobs predict runs "
            f"only {', '.join(sorted(LINEAR_MODEL_OPS))}"
        )


def load_model(path: Path, format: str = "onnx") -> Predictor:
    """An .onnx file as a predictor on onnxruntime's CPU provider, once its ops are checked."""
    try:
        import onnxruntime
    except ImportError:
        raise ModelLoadError(f"reading {path} needs onnxruntime: {ONNX_INSTALL_HINT}") from None
    check_linear_graph(path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelLoadError(f"{path}: the ONNX model takes {len(inputs)} inputs; runjobs models take 1")
    dimension = inputs[0].shape[-1] if inputs[0].shape else None
    feature_count = dimension if isinstance(dimension, int) else None

    def predict(features):
        return session.run(None, {inputs[0].name: features})[0]

    return Predictor(feature_count, predict)
