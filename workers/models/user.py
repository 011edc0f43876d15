"""User models: a Python file or an importable module defining `build_<framework>(features, config)`.

A job's `model` names a file (`model: path/to/model.py`, relative to the current
directory, `~` expanded) or an importable module (`model: mymodels.wide`). Its code
goes through three stages, and only the last one runs it:

- `read_source`, where the job is planned: the text, read once, with its sha256 digest
  (part of the job's id). A module is found with `importlib.util.find_spec`, which may
  import its parent packages but never runs the module itself.
- `check`, where the job is planned: the text parsed with `ast` (never executed, no
  framework imported), so a syntax error or a builder missing for a framework the job
  runs on is refused before any job starts, in one line naming the file and the line.
- `build`, on the worker: the text executed in a fresh module compiled under the
  file's own name (tracebacks show the user's file and line), then its builder called
  as `build_<framework>(features, config)`: `features` is the number of input columns,
  `config` a dict of the job's fields a model may use (`dtype`, `seed`, `normalize`)
  and `model_args`, the job's own arguments for the builder.

The text travels with the job (workers.models.UserModelSource, in TrainingJob), so no
worker and no remote driver needs the file: a process that planned the jobs keeps the
text it checked (`planning`), and a remote driver is handed the shipped copy
(`remember_shipped`), so what runs is what was checked and hashed, even if the file is
edited while a sweep runs.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import stat
import sys
import types
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from workers.models import ModelPlan, UserModelSource

# What each framework's builder returns, for messages; a framework not named here is
# still looked for as build_<framework>.
RETURNS = {
    "tensorflow": "a keras.Model",
    "torch": "a torch.nn.Module",
    "jax": "(apply, parameters), apply(parameters, features) giving the outputs",
}
# A model file is a page of Python, copied into every job that runs it: a file past
# this size is almost surely the wrong file.
MAX_SOURCE_BYTES = 4 * 1024 * 1024

# What this process runs for each model (its key: the resolved path, or the module's
# name): the text read while planning, or shipped to a remote driver.
_planned: dict[str, UserModelSource] = {}
# While planning: each model read from disk once, every reader given that text.
_reading: dict[str, UserModelSource] | None = None


class UserModelError(ValueError):
    """A user model cannot be used; one line naming the file (and line) and what to do."""


def builder_name(framework: str) -> str:
    return f"build_{framework}"


def signature(framework: str) -> str:
    return f"{builder_name(framework)}(features, config)"


def builder_config(job: Any) -> dict[str, Any]:
    """The job's fields a builder may read (`build` adds model_args): dtype, seed, normalize.

    `job` is a TrainingJob, or any settings object with dtype and seed (a model rebuilt
    for export has no normalize: False).
    """
    return {"dtype": job.dtype, "seed": job.seed, "normalize": bool(getattr(job, "normalize", False))}


# ---- reading --------------------------------------------------------------------------------


def read_source(model: str) -> UserModelSource:
    """The code of the user model `model` (PATH.py or a module name), without running it.

    In a process that planned the job (or was handed its shipped copy), the text it
    planned with; otherwise the file as it is now.
    """
    key = _key(model)
    if _reading is not None:
        if key not in _reading:
            _reading[key] = _read(model)
        return _reading[key]
    return _planned.get(key) or _read(model)


@contextmanager
def planning() -> Iterator[None]:
    """Plan jobs inside this block: each model is read once, and what was read is what this process runs.

    Every job id, check and worker job of the plan then sees the same text: a file edited
    after planning changes nothing until the jobs are planned again.
    """
    global _reading
    outer, _reading = _reading, {}
    try:
        yield
        read = _reading
        if outer is not None:
            outer.update(read)
        else:
            _planned.update(read)
    finally:
        _reading = outer


def remember_shipped(model: str, staged_file: str | Path, filename: str) -> UserModelSource:
    """On a remote driver: model `model` is the code shipped in `staged_file`, whatever is on disk here.

    `filename` is the file's path on the submitting machine, which tracebacks name. Read
    as bytes, so the text (and its digest, part of the job's id) is exactly what was sent.
    """
    text = Path(staged_file).read_bytes().decode("utf-8")
    source = UserModelSource(model, filename, text, digest_of(text))
    _planned[_key(model)] = source
    return source


def digest_of(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _key(model: str) -> str:
    if _is_path(model):
        return str(Path(model).expanduser().resolve())
    return f"module:{model}"


def _is_path(model: str) -> bool:
    """A path, not a module name: it has a separator or a file's suffix, or names a file here."""
    if model.endswith(".py") or model.startswith(("~", ".")) or "/" in model or "\\" in model:
        return True
    if not all(part.isidentifier() for part in model.split(".")):
        return True
    try:
        return Path(model).is_file()  # a directory of that name is more likely a package
    except OSError:
        return False


def _read(model: str) -> UserModelSource:
    if _is_path(model):
        path = Path(model).expanduser()
        return _read_file(model, path, str(path.resolve()))
    return _read_module(model)


def _read_file(model: str, path: Path, filename: str) -> UserModelSource:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserModelError(
            f"{model}: no such file (looked for {filename}); give the path of a .py file that "
            "defines build_tensorflow and/or build_torch, relative to the current directory, "
            "or an importable module name"
        ) from None
    except OSError as error:
        raise UserModelError(f"{model}: cannot read it ({error.strerror or error})") from None
    if stat.S_ISDIR(mode):
        raise UserModelError(
            f"{model}: is a directory; name the .py file in it that defines the builders, "
            f"e.g. {Path(model) / 'model.py'}"
        )
    if path.suffix != ".py":
        raise UserModelError(
            f"{model}: not a .py file; a user model is Python source: name a PATH.py or an importable module"
        )
    if not stat.S_ISREG(mode):
        raise UserModelError(f"{model}: not a regular file; name the .py file that defines the builders")
    try:
        with path.open("rb") as handle:
            content = handle.read(MAX_SOURCE_BYTES + 1)
    except OSError as error:
        raise UserModelError(f"{model}: cannot read it ({error.strerror or error})") from None
    if len(content) > MAX_SOURCE_BYTES:
        raise UserModelError(
            f"{model}: larger than {MAX_SOURCE_BYTES} bytes; a model file is Python source that defines "
            "the builders: keep data and weights out of it"
        )
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserModelError(
            f"{model}: not UTF-8 text (byte 0x{content[error.start]:02x} at offset {error.start}); "
            "save it as UTF-8"
        ) from None
    return UserModelSource(model, filename, text, digest_of(text))


def _read_module(model: str) -> UserModelSource:
    try:
        found = importlib.util.find_spec(model)  # imports the parent packages, never the module
    except ModuleNotFoundError as error:
        found, missing = None, error.name
    except Exception as error:  # a parent package that fails to import
        raise UserModelError(
            f"model={model}: importing its package failed ({type(error).__name__}: {_first_line(error)}); "
            "fix the package, or give the model's file as PATH.py"
        ) from None
    else:
        missing = model
    if found is None:
        # The runjobs command does not put the current directory on sys.path, as `python -m` does.
        here = Path(*model.split(".")).with_suffix(".py")
        hint = f"; did you mean the file {here}?" if here.is_file() else ""
        raise UserModelError(
            f"model={model}: no such file, and no module {missing} importable here; give a PATH.py "
            f"(relative to the current directory) or a module on sys.path (PYTHONPATH){hint}"
        )
    origin = found.origin
    if not origin or not origin.endswith(".py") or not Path(origin).is_file():
        raise UserModelError(
            f"model={model}: module {model} is not Python source in a file ({origin or 'no file'}); "
            "name a module defined by a .py file, or give a PATH.py"
        )
    return _read_file(model, Path(origin), origin)


# ---- checking, before any job starts ------------------------------------------------------


def check(source: UserModelSource, frameworks_needed: Iterable[str]) -> None:
    """Refuse code that cannot run, without running it: a syntax error, a builder a framework needs missing.

    Parses the text with `ast` only: nothing is executed and no framework is imported.
    """
    tree = parse(source)
    bindings = top_level_bindings(tree)
    if bindings is None:
        return  # `from x import *` may bind anything: the worker's build finds out
    missing = [
        framework for framework in sorted(set(frameworks_needed)) if builder_name(framework) not in bindings
    ]
    if missing:
        wanted = " or ".join(signature(framework) for framework in missing)
        returning = ", ".join(
            f"{builder_name(framework)} returning {RETURNS.get(framework, 'a model')}"
            for framework in missing
        )
        built = [framework for framework in RETURNS if builder_name(framework) in bindings]
        instead = f", or run only {' and '.join(built)} (--framework)" if built else ""
        raise UserModelError(
            f"{source.filename}: no top-level {wanted}, which the {' and '.join(missing)} job(s) need; "
            f"define {returning}{instead}"
        )
    for framework in sorted(set(frameworks_needed)):
        definition = bindings[builder_name(framework)]
        if isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)):
            _check_arguments(source, framework, definition)


def parse(source: UserModelSource) -> ast.Module:
    """The text's syntax tree; a syntax error is `FILE:LINE: syntax error: MESSAGE`."""
    try:
        return ast.parse(source.text, filename=source.filename)
    except SyntaxError as error:
        line = f":{error.lineno}" if error.lineno else ""
        raise UserModelError(f"{source.filename}{line}: syntax error: {error.msg}") from None
    except ValueError as error:  # null bytes
        raise UserModelError(f"{source.filename}: not Python source ({_first_line(error)})") from None
    except (RecursionError, MemoryError):
        raise UserModelError(f"{source.filename}: nested too deeply for Python to parse") from None


def top_level_bindings(tree: ast.Module) -> dict[str, ast.AST] | None:
    """Each name the module binds at its top level and the statement that binds it; None after `import *`.

    Statements inside a top-level if, try, with, for or while count (a builder defined
    only when a package is installed is still defined); function and class bodies do not.
    """
    bindings: dict[str, ast.AST] = {}
    statements = list(tree.body)
    while statements:
        statement = statements.pop(0)
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bindings[statement.name] = statement
        elif isinstance(statement, (ast.Import, ast.ImportFrom)):
            for alias in statement.names:
                if alias.name == "*":
                    return None
                bindings[alias.asname or alias.name.split(".")[0]] = statement
        elif isinstance(statement, ast.Assign):
            for target in statement.targets:
                for name in _assigned_names(target):
                    bindings[name] = statement
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            for name in _assigned_names(statement.target):
                bindings[name] = statement
        elif isinstance(statement, (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith)):
            statements[:0] = [*statement.body, *getattr(statement, "orelse", [])]
        elif isinstance(statement, ast.Try) or type(statement).__name__ == "TryStar":
            handlers = [line for handler in statement.handlers for line in handler.body]
            statements[:0] = [*statement.body, *handlers, *statement.orelse, *statement.finalbody]
    return bindings


def _assigned_names(target: ast.AST) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [name for element in target.elts for name in _assigned_names(element)]
    if isinstance(target, ast.Starred):
        return _assigned_names(target.value)
    return []


def _check_arguments(source: UserModelSource, framework: str, definition: ast.FunctionDef) -> None:
    """A builder defined with `def` must take (features, config) as two positional arguments."""
    arguments = definition.args
    positional = [*arguments.posonlyargs, *arguments.args]
    required = len(positional) - len(arguments.defaults)
    required_keywords = [
        argument.arg
        for argument, default in zip(arguments.kwonlyargs, arguments.kw_defaults)
        if default is None
    ]
    takes_two = arguments.vararg is not None or len(positional) >= 2
    if takes_two and required <= 2 and not required_keywords:
        return
    shown = ", ".join(argument.arg for argument in positional) + (
        ", *, " + ", ".join(required_keywords) if required_keywords else ""
    )
    raise UserModelError(
        f"{source.filename}:{definition.lineno}: {builder_name(framework)}({shown}) cannot be called "
        f"as {signature(framework)}; runjobs passes the number of input columns and a dict"
    )


# ---- building, on the worker --------------------------------------------------------------


def build(model: ModelPlan, framework: str, config: dict[str, Any]) -> Any:
    """Run the user's code in a fresh module and return `build_<framework>(features, config)`.

    `config` is the job's fields (`builder_config`); `model_args` is added from the plan.
    Whatever the code raises, here or in the builder, fails the job with
    `FILE:LINE: build_<framework> raised TYPE: MESSAGE`, the line being the deepest one
    of the user's file in the traceback.
    """
    source = model.user
    if source is None:
        raise ValueError(f"model {model.name} is not a user model")
    name = builder_name(framework)
    module = load(source)
    builder = getattr(module, name, None)
    if not callable(builder):
        returns = RETURNS.get(framework, "a model")
        raise UserModelError(f"{source.filename}: defines no {signature(framework)} returning {returns}")
    arguments = {key: _plain(value) for key, value in model.arguments}
    try:
        return builder(model.feature_count, {**config, "model_args": arguments})
    except Exception as error:
        raise UserModelError(f"{_where(source, error)}: {name} raised {_described(error)}") from error


def load(source: UserModelSource) -> types.ModuleType:
    """The user's code executed in a new module named after its digest; what it raises names its line."""
    module_name = f"runjobs_user_model_{source.digest[:16]}"
    module = types.ModuleType(module_name)
    module.__file__ = source.filename
    # Registered while it runs, as an import would: dataclasses, pickle and typing look
    # a class's module up in sys.modules.
    sys.modules[module_name] = module
    try:
        code = compile(source.text, source.filename, "exec")
        exec(code, module.__dict__)
    except SyntaxError as error:  # checked when planned, but a worker's Python may be older
        sys.modules.pop(module_name, None)
        raise UserModelError(f"{source.filename}:{error.lineno}: syntax error: {error.msg}") from None
    except Exception as error:
        sys.modules.pop(module_name, None)
        raise UserModelError(
            f"{_where(source, error)}: running the model file raised {_described(error)}"
        ) from error
    return module


def wrong_return(source: UserModelSource, framework: str, got: Any, expected: str) -> TypeError:
    """The error for a builder that returned something else than its framework's model (to raise)."""
    line = _definition_line(source, builder_name(framework))
    where = f"{source.filename}:{line}" if line else source.filename
    return TypeError(
        f"{where}: {builder_name(framework)} returned {type(got).__module__}.{type(got).__qualname__}, "
        f"not {expected}; return {RETURNS.get(framework, expected)}"
    )


def check_output_shape(source: UserModelSource, framework: str, shape: Iterable[int], rows: int) -> None:
    """Refuse a model whose output on `rows` rows is not one value per row: (rows,) or (rows, 1).

    The trainers reshape outputs to [-1, 1], which would otherwise hide a [rows, 3] output
    (or train on it without a word when a batch has one row).
    """
    shape = tuple(int(size) for size in shape)
    if shape in ((rows,), (rows, 1)):
        return
    shown = "(" + ", ".join(str(size) for size in shape) + ("," if len(shape) == 1 else "") + ")"
    raise ValueError(
        f"{source.filename}: {builder_name(framework)}'s model returns shape {shown} for {rows} rows; "
        f"runjobs trains one output per row, shape ({rows}, 1) or ({rows},)"
    )


def _where(source: UserModelSource, error: BaseException) -> str:
    """FILE:LINE of the deepest frame of the user's file in the error's traceback (FILE alone if none)."""
    line = None
    frame = error.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_filename == source.filename:
            line = frame.tb_lineno
        frame = frame.tb_next
    if line is None and isinstance(error, SyntaxError) and error.filename == source.filename:
        line = error.lineno  # a syntax error in code the builder compiles
    return f"{source.filename}:{line}" if line else source.filename


def _definition_line(source: UserModelSource, name: str) -> int | None:
    try:
        bindings = top_level_bindings(ast.parse(source.text))
    except (SyntaxError, ValueError, RecursionError):
        return None
    statement = (bindings or {}).get(name)
    return getattr(statement, "lineno", None)


def _described(error: BaseException) -> str:
    message = _first_line(error)
    return f"{type(error).__name__}: {message}" if message != type(error).__name__ else message


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _plain(value: Any) -> Any:
    """A model_args value as the user wrote it: lists, not the spec's tuples."""
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value
