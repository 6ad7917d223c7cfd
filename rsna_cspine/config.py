"""Typed run configs: dataclass defaults, overridden by a YAML file, then by ``key=value`` arguments,
then by typed values a program sets (the one loader of every stage, the demo and the phantom generator).

The resolved config is written into every run folder and every checkpoint so that a run can be
repeated exactly. A config class may list renamed keys (``LEGACY_KEYS``: old dotted key → new one) and
retired ones (``RETIRED_KEYS``: dotted key → the value under which dropping it changes nothing, or
:data:`ANY_VALUE` for settings that only mattered while training) and keys that moved to another command
(``MOVED_KEYS``: dotted key → where it went). A YAML file or override that uses an old key is refused with
the new name; a checkpoint's stored config is translated
(:func:`config_from_checkpoint`), so checkpoints written before a rename still load.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rsna_cspine.errors import ConfigError

T = TypeVar("T")

#: ``RETIRED_KEYS`` value: the setting is dropped whatever it was (it only shaped training).
ANY_VALUE = object()


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the field's declared type (tuples, nested dataclasses, optionals)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where) if len(args) == 1 else value
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{where}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, arg, where) for v in value]
    if origin is dict or tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "3e-3" (no dot) as a string; accept it as the number it plainly is.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, str) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build a config dataclass from a mapping; unknown keys are an error, missing keys keep defaults.

    Args:
        cls: the config dataclass.
        data: values to set (nested dataclasses as nested mappings).
        prefix: dotted path used in error messages.
    """
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; known: {sorted(types_)}")
    values = {k: _coerce(v, types_[k], prefix + k) for k, v in data.items()}
    return cls(**values)


def _plain(v: Any) -> Any:
    """YAML-safe python values: dataclasses become mappings, tuples lists, paths strings."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return _plain(dataclasses.asdict(v))
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, Path):
        return str(v)
    return v


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML-safe mapping of a config dataclass (tuples become lists)."""
    return _plain(cfg)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
    section: str | None = None,
) -> T:
    """Typed defaults ← YAML file ← ``key=value`` overrides ← typed ``values``.

    Args:
        cls: the config dataclass whose defaults are the base.
        path: optional YAML file; its keys must exist in ``cls``.
        overrides: optional ``["train.epochs=3", "model.backbone=resnet50"]`` (dotted keys for nested
            sections); values are parsed as YAML scalars.
        values: values set by a program, nested (``{"data": {"root": "/x"}}``) or dotted
            (``{"data.root": "/x"}``); they win over the file and the overrides and are never re-parsed (a
            path stays a path). A top-level None is a command-line flag not given and is left out.
        section: when the YAML's top level has a mapping under this key, read that mapping instead
            (a generator's knobs inside a larger file).
    """
    data: dict[str, Any] = to_dict(cls())
    given: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("config file not found", path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid YAML: {exc}", path) from exc
        if section is not None and isinstance(loaded, dict) and isinstance(loaded.get(section), dict):
            loaded = loaded[section]
        if not isinstance(loaded, dict):
            raise ConfigError("top level must be a mapping", path)
        _merge(given, loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        _set_dotted(given, key.strip(), yaml.safe_load(raw))
    _refuse_legacy_keys(cls, given, path)
    _merge(data, given)
    typed: dict[str, Any] = {}
    for key, value in (values or {}).items():
        if value is not None:  # a flag the user did not give
            _set_dotted(typed, key, value)
    _merge(data, _plain(typed))
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(exc.reason, path) if path is not None and exc.path is None else exc


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        out[f"{prefix}{key}"] = value
    return out


def _refuse_legacy_keys(cls: type, given: dict[str, Any], path: Path | None) -> None:
    """Name the new key of every renamed one a file or override still uses, and every retired one."""
    renamed: dict[str, str | None] = getattr(cls, "LEGACY_KEYS", {})
    retired: dict[str, Any] = getattr(cls, "RETIRED_KEYS", {})
    moved: dict[str, str] = getattr(cls, "MOVED_KEYS", {})
    used = _flatten(given)
    moves = [f"{old!r} is now {new!r}" for old, new in renamed.items() if old in used]
    moves += [f"{old!r} moved to {where}" for old, where in moved.items() if old in used]
    gone = [f"{key!r} is no longer a setting" for key in retired if key in used]
    if moves or gone:
        raise ConfigError("outdated config key(s): " + "; ".join(moves + gone)
                          + " (removed experiment settings are listed in benchmarks/results/evidence.md)", path)


def upgrade_config_dict(cls: type, stored: dict[str, Any]) -> dict[str, Any]:
    """A config mapping written by an older version (a checkpoint's), moved to ``cls``'s current keys.

    Renamed keys (``cls.LEGACY_KEYS``) move to their new place, a key already present in the new place
    wins; retired keys (``cls.RETIRED_KEYS``) are dropped when they hold the value under which dropping
    them changes nothing, and refused otherwise (such a model cannot be rebuilt as it was trained).

    Args:
        cls: the current config dataclass.
        stored: the old mapping (not modified).

    Raises:
        ConfigError: a retired setting with a value the current code cannot reproduce.
    """
    data = copy.deepcopy(stored)
    for old, new in getattr(cls, "LEGACY_KEYS", {}).items():
        found, value = _pop_dotted(data, old)
        if found and new is not None and not _has_dotted(data, new):
            _set_dotted(data, new, value)
    for key in getattr(cls, "MOVED_KEYS", {}):  # settings of another command now: the model is the same
        _pop_dotted(data, key)
    for key, harmless in getattr(cls, "RETIRED_KEYS", {}).items():
        found, value = _pop_dotted(data, key)
        if found and harmless is not ANY_VALUE and value != harmless:
            raise ConfigError(f"{key}={value!r} is no longer supported (retired; see benchmarks/results/evidence.md); "
                              "retrain with the current version")
    hook = getattr(cls, "upgrade_legacy", None)
    return hook(data) if hook is not None else data


def config_from_checkpoint(cls: type[T], stored: dict[str, Any], source: str | Path | None = None) -> T:
    """The typed config a checkpoint carries, written by this version or an older one.

    Args:
        cls: the stage's config dataclass.
        stored: ``checkpoint["config"]``.
        source: the checkpoint file, named in errors.
    """
    try:
        return from_dict(cls, upgrade_config_dict(cls, stored))
    except ConfigError as exc:
        raise ConfigError(f"stored config: {exc.reason}", source) from exc


def _pop_dotted(data: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    *parents, last = dotted.split(".")
    node: Any = data
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and last in node:
        return True, node.pop(last)
    return False, None


def _has_dotted(data: dict[str, Any], dotted: str) -> bool:
    node: Any = data
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (what the run really used)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
