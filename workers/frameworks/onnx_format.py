"""ONNX, the one format every framework may write and none is needed to read.

Not a framework: the registry's ONNX format names this module as its reader, so
`runjobs predict model.onnx` imports onnxruntime and neither TensorFlow nor torch. Each
framework writes ONNX with its own converter (tf2onnx, torch.onnx); the helpers here
keep their opset, their install hint, their check of what was converted and their way
of reporting a file not written the same.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from workers.frameworks.base import ModelLoadError, Predictor

# The opset both converters write; onnxruntime 1.17 and later run it.
ONNX_OPSET = 18
ONNX_INSTALL_HINT = "pip install 'runjobs[onnx]'"


def write_checked(
    converter: str,
    module_names: tuple[str, ...],
    path: Path,
    convert: Callable[[], None],
    feature_count: int,
    compute: Callable[[np.ndarray], Any],
) -> str | None:
    """Write an ONNX file with `convert`, kept only when onnxruntime computes what `compute` does.

    Returns why the file was not written (the converter's modules missing, its failure, or
    a graph that computes something else), or None. An optional converter's failure never
    loses the job: the caller records the reason in the manifest's `not_written`.
    """
    missing = missing_converter(*module_names)
    if missing:
        return missing
    from workers.export import onnx_mismatch

    try:
        convert()
        mismatch = onnx_mismatch(path, feature_count, compute)
    except Exception as error:  # an optional converter's failure must not lose the job
        return f"{converter} failed: {one_line(error)}"
    if mismatch is not None:
        path.unlink(missing_ok=True)
        return f"{converter} wrote a model that {mismatch}"
    return None


def missing_converter(*module_names: str) -> str | None:
    """Why ONNX cannot be written here (the converter modules that are not installed), or None."""
    missing = [name for name in module_names if importlib.util.find_spec(name) is None]
    return f"needs {', '.join(missing)}: {ONNX_INSTALL_HINT}" if missing else None


def one_line(error: BaseException) -> str:
    """An exception as one line for a manifest's `not_written`: its type and first line."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# An ONNX graph is run by onnxruntime. Its custom-op domains and contrib ops are native
# code; the standard (ai.onnx) operators compute on tensors and reach no file or network,
# so a graph of those alone is read, whatever model it is (an mlp, a user's model).
STANDARD_DOMAINS = ("", "ai.onnx")


def check_standard_graph(path: Path) -> None:
    """Refuse an ONNX file with an op outside ONNX's standard set, in its graph or any subgraph."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError and friends without a common base
        raise ModelLoadError(f"{path}: cannot load it as a onnx model ({type(error).__name__})") from None
    if model.functions or any(initializer.data_location == 1 for initializer in model.graph.initializer):
        raise ModelLoadError(f"{path}: ONNX functions and external data are not read by runjobs predict")
    unexpected = sorted(
        {
            f"{node.domain}::{node.op_type}"
            for node in _nodes(model.graph)
            if node.domain not in STANDARD_DOMAINS
        }
    )
    if unexpected:
        raise ModelLoadError(
            f"{path}: ops outside ONNX's standard set ({', '.join(unexpected)}); runjobs predict runs only "
            "the standard ai.onnx operators"
        )


def _nodes(graph):
    """Every node of `graph` and of the subgraphs its nodes hold (If, Loop and Scan bodies)."""
    import onnx

    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _nodes(subgraph)


def load_model(path: Path, format: str = "onnx") -> Predictor:
    """An .onnx file as a predictor on onnxruntime's CPU provider, once its ops are checked."""
    try:
        import onnxruntime
    except ImportError:
        raise ModelLoadError(f"reading {path} needs onnxruntime: {ONNX_INSTALL_HINT}") from None
    check_standard_graph(path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelLoadError(f"{path}: the ONNX model takes {len(inputs)} inputs; runjobs models take 1")
    dimension = inputs[0].shape[-1] if inputs[0].shape else None
    feature_count = dimension if isinstance(dimension, int) else None

    def predict(features):
        return session.run(None, {inputs[0].name: features})[0]

    return Predictor(feature_count, predict)
