"""User models: a Python file or an importable module with `build_tensorflow`, `build_torch` or `build_jax`.

(Minimal version; the full checks come with the user-model work.)
"""

from __future__ import annotations

import types
from typing import Any

from workers.models import ModelPlan, UserModelSource

BUILDERS = {"tensorflow": "build_tensorflow", "torch": "build_torch", "jax": "build_jax"}


def build(model: ModelPlan, framework: str, config: dict[str, Any]) -> Any:
    """Run the user's code in a fresh module and call its builder for `framework`."""
    assert model.user is not None
    module = types.ModuleType(f"runjobs_user_model_{model.user.digest[:12]}")
    module.__file__ = model.user.filename
    exec(compile(model.user.text, model.user.filename, "exec"), module.__dict__)
    builder = getattr(module, BUILDERS[framework], None)
    if builder is None:
        raise ValueError(f"{model.user.name} defines no {BUILDERS[framework]}(features, config)")
    return builder(model.feature_count, {**config, "model_args": dict(model.arguments)})


def read_source(model: str) -> UserModelSource:
    """The code of a user model named by a path (PATH.py) or an importable module, without running it."""
    import hashlib
    import importlib.util
    from pathlib import Path

    if model.endswith(".py"):
        path = Path(model).expanduser()
        text = path.read_text(encoding="utf-8")
        filename = str(path.resolve())
    else:
        found = importlib.util.find_spec(model)
        if found is None or not found.origin or not found.origin.endswith(".py"):
            raise ValueError(f"model={model!r}: no importable module of Python source by that name")
        text = Path(found.origin).read_text(encoding="utf-8")
        filename = found.origin
    return UserModelSource(model, filename, text, hashlib.sha256(text.encode()).hexdigest())
