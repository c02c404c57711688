"""One typed schema for YAML files and command-line overrides.

Configs are plain (nested) dataclasses. :func:`from_dict` builds one from a
mapping, rejecting unknown keys and wrong types with a message that names the
field; :func:`apply_overrides` takes ``section.field=value`` strings (values are
parsed as YAML, so ``fusion.n_queries=64`` and ``llm.path=null`` work);
:func:`load_config` does both on top of a YAML file and then calls the
config's ``validate()``. Training and model configs share this machinery.

The command line is generated from the same schema: :func:`add_config_arguments`
adds one ``--section.field VALUE`` flag per leaf field (help text = the field's
``#`` comment in the dataclass source), and :func:`overrides_from_namespace`
turns the flags the user gave into overrides checked by the field types.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fusion_vlm.errors import ConfigError

T = TypeVar("T")


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` coerced to ``tp`` or raise :class:`ConfigError` naming ``where``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_check_type(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def require(ok: bool, name: str, value, why: str) -> None:
    """Raise :class:`ConfigError` ``"name=value: why"`` unless ``ok`` (for ``validate()`` methods)."""
    if not ok:
        raise ConfigError(f"{name}={value!r}: {why}")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where}: unknown key (valid keys: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _check_type(value, hints[key], where)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Return a dataclass config as plain nested dicts/lists (YAML- and JSON-safe)."""
    out = dataclasses.asdict(cfg)

    def fix(v):
        if isinstance(v, tuple):
            return [fix(x) for x in v]
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v

    return fix(out)


def _split_override(item: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value parsed as YAML)``."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. fusion.n_queries=64")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str] | dict[str, Any] | None) -> dict:
    """Apply overrides to a nested dict and return ``data``: ``a.b.c=value`` strings (values parsed as
    YAML) or a ``{"a.b.c": value}`` mapping of already parsed values (from :func:`overrides_from_namespace`)."""
    items = overrides.items() if isinstance(overrides, dict) else map(_split_override, overrides or [])
    for key, value in items:
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> T:
    """Load ``cls`` from a YAML file (optional) plus overrides, then validate it."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file '{path}' does not exist")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}': top level must be a mapping")
        data = loaded or {}
    data = apply_overrides(data, overrides)
    cfg = from_dict(cls, data)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a dataclass config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- command line from the schema
_DEST = "config_field:"  # namespace attribute prefix of the generated flags (apart from the command's own)


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the ``#`` comment written with it in ``cls``'s source: the trailing one plus the
    comment lines right below it, or, for a field without a trailing comment, the comment lines right above."""
    src = textwrap.dedent(inspect.getsource(cls))
    alone, trailing = {}, {}  # line -> comment text, for comment-only lines and for comments after code
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            (alone if not tok.line[:tok.start[1]].strip() else trailing)[tok.start[0]] = tok.string.lstrip("#")
    body = ast.parse(src).body[0].body
    fields = [(n.target.id, n.lineno, n.end_lineno) for n in body
              if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    untrailed_starts = {s for _, s, e in fields if not any(ln in trailing for ln in range(s, e + 1))}

    def block(line: int, step: int) -> list[int]:
        lines = []
        while line in alone:
            lines.append(line)
            line += step
        return sorted(lines)

    out = {}
    for name, start, end in fields:
        own = [ln for ln in range(start, end + 1) if ln in trailing]
        if own:
            below = block(end + 1, 1)
            if below and below[-1] + 1 in untrailed_starts:  # those lines introduce the next field
                below = []
            texts = [trailing[ln] for ln in own] + [alone[ln] for ln in below]
        else:
            texts = [alone[ln] for ln in block(start - 1, -1)]
        out[name] = " ".join(" ".join(t.split()) for t in texts)
    return out


def config_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, str, type]]:
    """``(dotted path, type, comment, owning dataclass)`` of every leaf field of ``cls``, sections flattened."""
    hints, notes, out = typing.get_type_hints(cls), field_comments(cls), []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += config_fields(tp, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, tp, notes.get(f.name, ""), cls))
    return out


def type_text(tp: Any) -> str:
    """A field type as users write its values: ``int|null``, ``true|false``, ``list[str]``."""
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true|false"
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return "|".join(type_text(a) for a in args)
    if args:
        return f"{typing.get_origin(tp).__name__}[{', '.join(type_text(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def flag_name(path: str) -> str:
    """``optim.warmup_ratio`` -> ``--optim.warmup-ratio``."""
    return "--" + path.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--section.field VALUE`` flag per leaf field of dataclass ``cls``, grouped by section.

    Help = the field's comment, metavar = its type. A flag the user does not give leaves no trace in
    the namespace, so only given flags become overrides (see :func:`overrides_from_namespace`).
    """
    groups: dict[str, Any] = {}
    for path, tp, note, owner in config_fields(cls):
        section = path.rpartition(".")[0]
        if section not in groups:
            doc = (inspect.getdoc(owner) or "").split("\n")[0]
            groups[section] = parser.add_argument_group(f"{section or 'run'} ({owner.__name__})", doc)
        groups[section].add_argument(flag_name(path), dest=_DEST + path, default=argparse.SUPPRESS,
                                     metavar=type_text(tp), help=note.replace("%", "%%"))


def overrides_from_namespace(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """``{"section.field": value}`` for the generated flags given in ``args``: values parsed as YAML (text
    kept as given for a string field) and checked against the field type (ConfigError naming the flag)."""
    given = {k[len(_DEST):]: v for k, v in vars(args).items() if k.startswith(_DEST)}
    if not given:
        return {}
    types_ = {path: tp for path, tp, _, _ in config_fields(cls)}
    out = {}
    for path, raw in given.items():
        flag, tp = flag_name(path), types_[path]
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"{flag} {raw!r}: not a YAML value ({' '.join(str(err).split())})") from None
        accepts_str = tp is str or str in typing.get_args(tp)
        if accepts_str and isinstance(value, (bool, int, float)):  # --output-dir 2024, --checkpoint.resume no
            value = raw
        out[path] = _check_type(value, tp, flag)
    return out


def override_flags(overrides: list[str]) -> list[str]:
    """``["optim.lr=1e-5", ...]`` -> ``["--optim.lr", "1e-5", ...]``: the command-line form of overrides."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-5")
        out += [flag_name(key.strip()), raw]
    return out
