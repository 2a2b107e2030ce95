"""Typed configs: dataclasses filled from YAML/dicts, with unknown keys and bad types rejected.

Every config class is a plain dataclass; `from_dict` validates, `to_dict` gives the resolved config that runs
save in their record (litgpt-style).

Run configs nest smaller ones (a fine-tuning run holds a `ModelConfig`, a `DecompositionConfig`, a
`PerplexityConfig`), but a run's params stay one flat mapping (`keep: 0.85`, not `decomposition: {keep: 0.85}`):
the flat params are what experiments write, what the CLI's flags set and what the run key hashes. `from_params`
routes each flat name to the nested config that declares it and `to_params` flattens back; a field name is
therefore unique across one config tree (`flat_fields` checks that). A nested field whose metadata says
``{"flat": False}`` is an ordinary value instead (e.g. a resolved training profile).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from deftlab.errors import DeftlabError

T = TypeVar("T")


class ConfigError(DeftlabError):
    pass


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for a in args:
            try:
                return _check_type(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where=where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_check_type(k, kt, where): _check_type(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str | None = None) -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {sorted(unknown)}",
            f"valid keys are {sorted(fields)}",
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _check_type(value, hints[name], f"{where}.{name}")
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> Any:
    """Resolved config as plain data (for manifests, hashing and YAML dumps)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


# --- flat run params <-> nested configs ---------------------------------------------------------------------
def _nested_type(f: dataclasses.Field, hint: Any) -> type | None:
    """The dataclass a field nests (``X`` or ``X | None``), unless its metadata says flat=False."""
    if f.metadata.get("flat", True) is False:
        return None
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def flat_fields(cls: type) -> dict[str, tuple[tuple[str, ...], dataclasses.Field]]:
    """Every flat param name of config class `cls` -> (path of nested field names, the leaf field)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[tuple[str, ...], dataclasses.Field]] = {}
    for f in dataclasses.fields(cls):
        nested = _nested_type(f, hints[f.name])
        items = ({name: ((f.name, *path), leaf) for name, (path, leaf) in flat_fields(nested).items()}
                 if nested else {f.name: ((f.name,), f)})
        for name, item in items.items():
            if name in out:
                raise TypeError(f"{cls.__name__}: param name '{name}' is declared twice in its config tree")
            out[name] = item
    return out


def from_params(cls: type[T], params: dict, where: str | None = None) -> T:
    """Build config `cls` from flat run params (see the module docstring); unknown names are an error."""
    where = where or cls.__name__
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: expected a mapping of params, got {type(params).__name__}")
    names = flat_fields(cls)
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown param(s) {unknown}", f"valid params are {sorted(names)}")
    return _build(cls, params, where)


def _build(cls: type[T], params: dict, where: str) -> T:
    hints = typing.get_type_hints(cls)
    data: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        nested = _nested_type(f, hints[f.name])
        if nested is None:
            if f.name in params:
                data[f.name] = params[f.name]
            continue
        mine = {k: v for k, v in params.items() if k in flat_fields(nested)}
        optional = typing.get_origin(hints[f.name]) in (typing.Union, types.UnionType)
        if mine or not optional:
            data[f.name] = _build(nested, mine, where)
    return from_dict(cls, data, where=where)


def to_params(obj: Any) -> dict:
    """The flat params of a config (the inverse of `from_params`; unset optional nested configs are left out)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if _nested_type(f, hints[f.name]) is not None:
            if value is not None:
                out.update(to_params(value))
        else:
            out[f.name] = to_dict(value)
    return out


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (calling its factory), or dataclasses.MISSING."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"malformed YAML in {path}: {str(e).splitlines()[0]}", "fix the file's syntax") from e
    return data or {}


def replace(obj: T, **changes) -> T:
    """dataclasses.replace that re-validates."""
    new = dataclasses.replace(obj, **changes)
    validate = getattr(new, "validate", None)
    if callable(validate):
        validate()
    return new
