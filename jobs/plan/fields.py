"""How a job field is declared: once, with its type, default, parser, choices and help.

`JobSpec` (jobs/plan/spec.py) declares each field with `job_field(...)`; everything that
reads a field's value from a person is generated from that declaration: the submit
command's option (when the field has one), `--set key=value`, the keys of a spec file,
and the help text with its default. Adding a field is one edit in JobSpec.

A `Kind` is how a field's value is written: its parser for text (a flag, `--set`, a
YAML string) and for YAML's own values (a YAML number for a float field, a list for the
features). This module is plain Python: it imports no Ray and no framework.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Fields of runjobs 0.1 always enter a sweep job's id; a field added since enters it
# only when set to something other than its default, so adding a field never changes
# the id of an existing job (and a cron re-run into an old directory runs nothing).
IN_ID_ALWAYS = "always"
IN_ID_UNLESS_DEFAULT = "unless default"
IN_ID_NEVER = "never"  # changes what a job keeps, not what it trains (save_models)


def settings_mapping(where: str, name: str, value: Any, keys: tuple[str, ...], usage: str) -> dict:
    """A spec file's settings mapping (`search:`, `stopping:`), refused in one line when it is not
    a mapping or has a key outside `keys`."""
    if not isinstance(value, dict):
        raise SpecError(f"{where}: {name} is a mapping, {usage}")
    unknown = sorted(set(map(str, value)) - set(keys))
    if unknown:
        raise SpecError(f"{where}: unknown {name} key {unknown[0]!r}; the keys are {', '.join(keys)}")
    return value


class SpecError(ValueError):
    """A job field has a value runjobs cannot use; the message names the field and the fix."""


@dataclass(frozen=True)
class Kind:
    """How one kind of field value is read from text and from a YAML document."""

    name: str
    parse_text: Callable[[str], Any]
    # A YAML value that is not a string (a number, a list): to the field's type, or
    # left as it is for JobSpec's validation to judge.
    from_document: Callable[[Any], Any] = lambda value: value
    metavar: str = "TEXT"
    click_type: Any = None  # a click type for the option; None: text parsed with parse_text
    choices: tuple[str, ...] = ()  # the only values a choice field takes


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SpecError(f"{text!r}: use true or false")


def parse_point(text: str) -> tuple[float, ...]:
    """`1800` or, for several features, `1800,3`."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise SpecError(f"predict {text!r}: give numbers separated by commas, e.g. 1800 or 1800,3") from None


def _optional(parse: Callable[[str], Any], none_words: tuple[str, ...]) -> Callable[[str], Any]:
    return lambda text: None if text.strip().lower() in none_words else parse(text)


def _inf_past_float(value: Any) -> Any:
    """A YAML integer past float's range as inf, as float() reads the same digits as text; else the value.

    Validation then refuses it as not finite, where float() of it would raise OverflowError.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    return value


def _float_from_document(value: Any) -> Any:
    value = _inf_past_float(value)
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _points_from_document(value: Any) -> Any:
    # Whole numbers stay whole (a sweep job's id hashes them as written); only those past
    # float's range change, to inf.
    if isinstance(value, list):
        return tuple(
            tuple(map(_inf_past_float, item)) if isinstance(item, list) else (_inf_past_float(item),)
            for item in value
        )
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ((_inf_past_float(value),),)
    return value


def _names_from_document(value: Any) -> Any:
    return tuple(str(item) for item in value) if isinstance(value, list) else value


def _number_as_text(value: Any) -> Any:
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


WHOLE = Kind("whole number", int, metavar="N", click_type=int)
NUMBER = Kind("number", float, _float_from_document, metavar="X", click_type=float)
SWITCH = Kind("true or false", parse_bool, metavar="BOOL")
TEXT = Kind("text", str)
OPTIONAL_TEXT = Kind("text", _optional(str, ("",)))
# `init` is a keyword or a number; a YAML number is kept as its text.
INIT = Kind("framework, zeros, shared or a number", str, _number_as_text, metavar="INIT")
BATCH = Kind("whole number or full", _optional(int, ("full", "none", "")), metavar="N|full")
GPUS = Kind("number or auto", _optional(float, ("auto", "none", "")), _float_from_document, metavar="X|auto")
SECONDS = Kind("number of seconds or none", _optional(float, ("none", "")), _float_from_document, metavar="S")
NAMES = Kind(
    "comma-separated names",
    lambda text: tuple(part.strip() for part in text.split(",") if part.strip()),
    _names_from_document,
    metavar="A,B",
)
POINTS = Kind(
    "inputs (1800, or 1800,3 for two features; ';' between inputs)",
    lambda text: tuple(parse_point(point) for point in text.split(";") if point.strip()),
    _points_from_document,
    metavar="X",
)


def _sizes_from_document(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    return value


def _parse_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise SpecError(
            f"{text!r}: give layer sizes as whole numbers separated by commas, e.g. 64,64"
        ) from None


def _mapping_from_document(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((str(key), _frozen(item)) for key, item in value.items()))
    return value


def _frozen(value: Any) -> Any:
    """A YAML value as a hashable one: lists become tuples (a job spec is frozen)."""
    if isinstance(value, list):
        return tuple(_frozen(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((str(key), _frozen(item)) for key, item in value.items()))
    return value


def _parse_mapping(text: str) -> Any:
    """`{width: 3, depth: 2}` (YAML flow style, as in a spec file); `{}` or empty for none."""
    import yaml

    if not text.strip():
        return ()
    try:
        value = yaml.safe_load(text if text.strip().startswith("{") else "{" + text + "}")
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise SpecError(f"{text!r}: give a mapping such as {{width: 3, depth: 2}}")
    return _mapping_from_document(value)


SIZES = Kind("comma-separated layer sizes", _parse_sizes, _sizes_from_document, metavar="N,N")
MAPPING = Kind("mapping ({key: value, ...})", _parse_mapping, _mapping_from_document, metavar="{K: V}")


def choice(*choices: str) -> Kind:
    return Kind(f"one of {', '.join(choices)}", str, metavar="|".join(choices), choices=choices)


@dataclass(frozen=True)
class FieldInfo:
    """What JobSpec declares about a field beyond its name, type and default."""

    kind: Kind
    help: str
    option: str | None = None  # the submit option (e.g. "--lr"); None: --set and spec files only
    default_text: str | None = None  # the default as the help shows it, when not the value itself
    in_id: str = IN_ID_ALWAYS


def job_field(default: Any, kind: Kind, help: str, **info: Any) -> Any:
    """A JobSpec field: its default and, as metadata, everything else the generated interfaces need."""
    return dataclasses.field(default=default, metadata={"job": FieldInfo(kind, help, **info)})


@dataclass(frozen=True)
class DeclaredField:
    name: str
    default: Any
    info: FieldInfo

    @property
    def help_text(self) -> str:
        default = self.info.default_text or _show(self.default)
        return f"{self.info.help} Default: {default}."

    def parse_text(self, text: str) -> Any:
        """The value of `--set name=text` (or a flag, or a YAML string) as the field's type."""
        try:
            return self.info.kind.parse_text(text.strip())
        except SpecError as error:
            raise SpecError(f"{self.name}={text!r}: {_after_value(error)}") from None
        except ValueError:
            raise SpecError(f"{self.name}={text!r}: give a {self.info.kind.name}") from None

    def from_document(self, value: Any) -> Any:
        """A spec file's value (text, a number, a list) as the field's type."""
        if isinstance(value, str):
            return self.parse_text(value)
        return self.info.kind.from_document(value)

    def enters_id(self, value: Any) -> bool:
        if self.info.in_id == IN_ID_NEVER:
            return False
        if self.info.in_id == IN_ID_ALWAYS:
            return True
        # A record holds a mapping field as a JSON object: its default () is {} there.
        return value != ({} if self.info.kind is MAPPING else _comparable(self.default))


def declared_fields(spec_class) -> tuple[DeclaredField, ...]:
    """Every field of `spec_class` (a dataclass of job_field()s), in declaration order."""
    return tuple(
        DeclaredField(
            item.name,
            None if item.default is dataclasses.MISSING else item.default,
            item.metadata.get("job") or FieldInfo(TEXT, ""),
        )
        for item in dataclasses.fields(spec_class)
    )


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return str(value)


def _comparable(value: Any) -> Any:
    """A default as it looks in a job's record (tuples become lists)."""
    if isinstance(value, tuple):
        return [_comparable(item) for item in value]
    return value


def _after_value(error: SpecError) -> str:
    """A parser's message without the value it repeats."""
    text = str(error)
    return text.split(": ", 1)[1] if ": " in text else text
