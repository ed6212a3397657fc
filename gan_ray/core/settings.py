"""The one way settings are declared and validated: `Settings`, the base of every settings model (`TrainConfig`,
`SweepSettings`, `ServeArgs`), and the flag names and error lines they share.

Each field declares its type (a `Literal` for a choice), its range (`Field(ge=..., gt=...)`) and its help; checks
across fields live in the model's `model_validator`. Values arrive as text (flags, `serve run key=value`), as YAML
or from Tune, and are parsed once, by pydantic, whatever their source; any failure becomes one `UserError` naming
the flag. The CLI builds its flags from the same fields (`gan_ray.cli.flags.add_settings_flags`) and leaves every
check to the model, so a rule is written once.
"""
from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, TypeAdapter, ValidationError, model_validator

from gan_ray.core.errors import UserError


def flag_name(name: str) -> str:
    """The command-line flag of a field: `lr_g` -> `--lr-g`."""
    return "--" + name.replace("_", "-")


def _plain_name(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"must be a plain directory name, got {name!r}")
    return name


# A run's or a sweep's name: one directory under --storage.
RunName = Annotated[str, AfterValidator(_plain_name)]


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def error_line(err: dict[str, Any]) -> str:
    """One pydantic error as our one line, naming the flag: `--lr-g must be positive, got 0`."""
    loc = [str(p) for p in err.get("loc", ()) if not isinstance(p, int)]
    flag = flag_name(loc[0]) if loc else "value"
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "value_error":  # a model's own check: its text is the message (a field's is prefixed by the flag)
        msg = str(ctx.get("error", err["msg"])).removeprefix("Value error, ")
        return f"{flag} {msg}" if loc and flag not in msg else msg
    if kind == "greater_than":
        bound = ctx["gt"]
        return f"{flag} must be {'positive' if bound == 0 else f'greater than {_number(bound)}'}, got {got}"
    if kind == "greater_than_equal":
        bound = ctx["ge"]
        if bound == 0:
            return f"{flag} must not be negative, got {got}"
        if bound == 1 and str(got).lstrip("-").isdigit():
            return f"{flag} must be a positive integer, got {got}"
        return f"{flag} must be at least {_number(bound)}, got {got}"
    if kind in ("less_than", "less_than_equal"):
        bound = ctx.get("lt", ctx.get("le"))
        return f"{flag} must be {'below' if kind == 'less_than' else 'at most'} {_number(bound)}, got {got}"
    if kind == "literal_error":
        return f"unknown {flag} {got!r}; choose one of {ctx['expected'].replace(' or ', ', ').replace(chr(39), '')}"
    if kind == "finite_number":
        return f"{flag} must be a finite number, got {got}"
    if kind == "extra_forbidden":
        return f"unknown key {loc[0]!r}" if loc else "unknown key"
    kinds = {"int": "int", "float": "float", "bool": "true/false", "string": "a string"}
    for prefix, noun in kinds.items():
        if kind.startswith(prefix) or kind == f"{prefix}_type":
            return f"{flag} expects {noun}, got {got!r}"
    return f"{flag}: {err['msg']}"


def validation_message(exc: ValidationError) -> str:
    return error_line(exc.errors()[0])


def _scalar_type(annotation: Any) -> Any:
    """The type inside Optional[...] / Annotated[...]."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        else:
            return annotation


def field_kind(model: type[BaseModel], name: str) -> type:
    """A field's value type: bool, int, float or str (a Literal of strings is str)."""
    kind = _scalar_type(model.model_fields[name].annotation)
    return str if typing.get_origin(kind) is Literal else kind


def field_choices(model: type[BaseModel], name: str) -> tuple | None:
    """The values a Literal field allows, else None."""
    kind = _scalar_type(model.model_fields[name].annotation)
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else None


class Settings(BaseModel):
    """Base of every settings model: unknown keys refused, values parsed from text or YAML by their field's type,
    no NaN or infinity, and every failure one UserError naming the flag."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise UserError(validation_message(exc)) from None

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, values: Any) -> Any:
        """YAML's `epochs: true` is not 1."""
        if isinstance(values, dict):
            for name, value in values.items():
                if isinstance(value, bool) and name in cls.model_fields and field_kind(cls, name) in (int, float):
                    raise ValueError(f"{flag_name(name)} expects {field_kind(cls, name).__name__}, got {value!r}")
        return values

    @classmethod
    def from_mapping(cls, values: dict[str, Any], *, source: str = "config") -> "Settings":
        """From a mapping whose keys may use dashes (YAML, `key=value` arguments); a misspelt key is an error that
        names `source`, not a silent default."""
        norm = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(norm) - set(cls.model_fields))
        if unknown:
            raise UserError(f"unknown key(s) in {source}: {', '.join(unknown)}")
        return cls(**norm)

    @classmethod
    def parse_value(cls, name: str, value: Any) -> Any:
        """One field's value parsed from text (a Tune choice, a flag) by the field's own type and range."""
        field = cls.model_fields[name]
        try:
            kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
            return TypeAdapter(kind).validate_python(value)
        except ValidationError as exc:
            err = dict(exc.errors()[0])
            err["loc"] = (name,)
            raise UserError(error_line(err)) from None
