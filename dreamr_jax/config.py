"""Run configuration: frozen dataclasses loaded from YAML, with `key.sub=value` overrides.

Every setting is checked when the file is read, before any model loads: its type (an int where
an int is expected, a number where a float is (an int is taken as the number), a string where a
string is (YAML's unquoted yes / no / on / off read as booleans are refused), true / false where
a flag is, a mapping for a group of settings), then its range (each dataclass's `__post_init__`).
An error names the file and the key's full path as written (`spec.steps.token_budget`) and the
value; an unknown key is named with the keys known there.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from typing import Any, Sequence

import yaml

from .speculative.config import SpeculationConfig
from .validation import SettingError, check_choice, check_range, check_text

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class PairConfig:
    """A draft/target pair and how to run it."""

    target: str
    draft: str | None = None
    dtype: str = "float32"
    draft_devices: int = 1
    target_devices: int = 1
    # How a role with several devices holds its weights: "tensor" (split,
    # `models.qwen_vl.sharding.tensor_parallel_shardings`) or "replicate" (a whole copy on each).
    draft_parallelism: str = "tensor"
    target_parallelism: str = "tensor"
    spec: SpeculationConfig = SpeculationConfig()

    def __post_init__(self):
        check_text("target", self.target)
        check_text("draft", self.draft, optional=True)
        check_choice("dtype", self.dtype, DTYPES)
        for key in ("draft_devices", "target_devices"):
            check_range(key, getattr(self, key), 1, integer=True)
        for key in ("draft_parallelism", "target_parallelism"):
            check_choice(key, getattr(self, key), ("tensor", "replicate"))


class ConfigError(ValueError):
    """A configuration file or override that does not fit (names the file and key)."""


# YAML 1.1 reads a number written without a dot ("1e-3") as a string; a float setting takes it.
_NUMBER = re.compile(r"^[+-]?(\d[\d_]*\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _describe(value) -> str:
    if value is None:
        return "an empty value"
    if isinstance(value, dict):
        return f"a mapping {value!r}"
    if isinstance(value, list):
        return f"a list {value!r}"
    return repr(value)


def _bool_hint(value) -> str:
    return (" (YAML reads unquoted yes / no / on / off / true / false as true or false: quote the text)"
            if isinstance(value, bool) else "")


def _check_type(hint, value, where: str, key: str, default=None):
    """`value` as the setting of type `hint` (a nested dataclass built from its mapping, over
    `default`, the field's default instance, when there is one); a ConfigError naming `key` (the
    full path) when it is not of that type."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None and type(None) in options:
        return None
    kinds = [o for o in options if o is not type(None)]
    kind = kinds[0] if len(kinds) == 1 else None
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping of its settings, got {_describe(value)}")
        return build_config(kind, value, where, prefix=key + ".", base=default if isinstance(default, kind) else None)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {_describe(value)}")
    elif kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be an integer, got {_describe(value)}")
    elif kind is float:
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be a number, got {_describe(value)}")
        value = float(value)
        if value != value:
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {_describe(value)}{_bool_hint(value)}")
    elif kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {_describe(value)}")
    elif kind is tuple:
        if isinstance(value, list):
            value = tuple(value)
        elif not isinstance(value, (tuple, str)):  # a lone string: the class says whether it takes one
            raise ConfigError(f"{where}: {key} must be a list, got {_describe(value)}")
    return value


def build_config(cls, data: dict, where: str, prefix: str = "", base=None):
    """cls(**data) with every value checked against its field's type (`_check_type`) and nested
    mappings built as the dataclasses their fields name; errors name `where` (the file) and the
    key's full path (`prefix` + key).

    A nested mapping changes its field's default key by key: the keys it leaves out keep the
    values of the parent's default instance (`base`), so a trainer whose default engine settings
    differ from the engine's own keeps them under a partial `spec:` section. A key the class
    lists in `MOVED_KEYS` ({old key: (where the setting lives now, what it is)}) is refused with
    its new place."""
    if not isinstance(data, dict):
        what = f"{prefix[:-1]} must be" if prefix else "the file must hold"
        raise ConfigError(f"{where}: {what} a mapping of settings, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    moved = {k: v for k, v in getattr(cls, "MOVED_KEYS", {}).items() if k in data}
    if moved:
        raise ConfigError(f"{where}: " + "; ".join(
            f"{prefix}{k} is no longer a setting here: it is {prefix}{new} ({why})" for k, (new, why) in moved.items()))
    unknown = [k for k in data if k not in fields]
    if unknown:
        names = ", ".join(f"{prefix}{k}" for k in unknown)
        known = f"known keys{' of ' + prefix[:-1] if prefix else ''}: {', '.join(sorted(fields))}"
        raise ConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {names} ({known})")
    hints = typing.get_type_hints(cls)
    defaults = ({name: getattr(base, name) for name in fields} if base is not None else
                {name: f.default for name, f in fields.items() if f.default is not dataclasses.MISSING})
    kwargs = {key: _check_type(hints[key], value, where, prefix + key, defaults.get(key))
              for key, value in data.items()}
    if base is not None:
        kwargs = {**{name: getattr(base, name) for name in fields}, **kwargs}
    missing = [name for name, f in fields.items() if name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing setting{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(prefix + m for m in missing)}")
    try:
        return cls(**kwargs)
    except SettingError as e:
        raise ConfigError(f"{where}: {prefix}{e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {prefix[:-1] + ': ' if prefix else ''}{e}") from None



def _parse_value(text: str, key: str = "") -> Any:
    """An override's value as YAML reads it (`5` an int, `0.5` a float, `true` a flag, `[a, b]` a list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}={text}: the value is not valid YAML ({e})") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`spec.alpha=0.9` style overrides on the raw mapping (checked, like the file, when it is built)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}': '{key}' is not a key (names joined by dots, e.g. spec.alpha)")
        node = data
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                group = ".".join(parts[: i + 1])
                raise ConfigError(f"override '{item}': {group} is a single setting ({_describe(node)}), not a group "
                                  f"of settings, so it has no key {parts[i + 1]}")
        node[parts[-1]] = _parse_value(value, key)
    return data


def read_yaml(path: str, overrides: list[str] | None = None) -> dict:
    """A YAML mapping with `a.b=value` overrides applied; errors name the file."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such config file") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the file must hold a mapping of settings, got {_describe(data)}")
    return apply_overrides(data, overrides or [])


def resolve_input_paths(cfg, path: str, keys: Sequence[str]):
    """`cfg` with the relative input paths under `keys` resolved: against the config file's folder
    when the path exists there (a config that travels with its files), else against the working
    directory when it exists there (the shipped configs name repository paths and run from the
    repository root); a path that exists in neither place is an error naming the key and both
    locations, before any model loads. Hub ids ('org/name') and 'asset:' names pass unchanged."""
    from .hub import looks_like_local_path

    changes = {}
    for key in keys:
        value = getattr(cfg, key)
        if not isinstance(value, str) or not value or value.startswith("asset:"):
            continue
        value = os.path.expanduser(value)
        if os.path.isabs(value):
            if not os.path.exists(value):
                raise ConfigError(f"{path}: {key}: {value!r} does not exist")
            continue
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), value)
        if os.path.exists(beside):
            changes[key] = beside
        elif not os.path.exists(value) and looks_like_local_path(value):
            raise ConfigError(f"{path}: {key}: {value!r} exists neither beside the config ({beside}) nor in the "
                              f"working directory ({os.path.abspath(value)})")
    return dataclasses.replace(cfg, **changes) if changes else cfg


def read_config(cls, path: str, overrides: list[str] | None = None, input_paths: Sequence[str] = ()):
    """A `cls` config dataclass from the YAML file at `path` with `a.b=value` overrides: every
    setting checked (`build_config`), then the relative input paths under `input_paths`
    resolved (`resolve_input_paths`), before anything loads."""
    return resolve_input_paths(build_config(cls, read_yaml(path, overrides), path), path, input_paths)


def load_config(path: str, overrides: list[str] | None = None) -> PairConfig:
    return read_config(PairConfig, path, overrides, ("target", "draft"))
