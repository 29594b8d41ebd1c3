"""Run configuration: frozen dataclasses loaded from YAML, with `key.sub=value` overrides."""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from .spec.config import SpecConfig
from .spec.steps import StepConfig
from .spec.tbvm import Keywords


@dataclasses.dataclass(frozen=True)
class PairConfig:
    """A draft/target pair and how to run it."""

    target: str
    draft: str | None = None
    dtype: str = "float32"
    draft_devices: int = 1
    target_devices: int = 1
    # How a role with several devices holds its weights: "tensor" (split, `sharding.tensor_parallel_shardings`)
    # or "replicate" (a whole copy on each).
    draft_parallelism: str = "tensor"
    target_parallelism: str = "tensor"
    spec: SpecConfig = SpecConfig()

    def __post_init__(self):
        for key in ("draft_parallelism", "target_parallelism"):
            if getattr(self, key) not in ("tensor", "replicate"):
                raise ValueError(f"{key} must be tensor or replicate, got '{getattr(self, key)}'")


class ConfigError(ValueError):
    """A configuration file or override that does not fit (names the file and key)."""


_NESTED = {"spec": SpecConfig, "steps": StepConfig, "keywords": Keywords}


def _build(cls, data: dict, where: str, nested: dict | None = None):
    """cls(**data) with nested mappings built as their dataclasses; errors name file and key."""
    nested = _NESTED if nested is None else nested
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for key, value in data.items():
        if key in nested and isinstance(value, dict):
            value = _build(nested[key], value, f"{where}.{key}", nested)
        elif str(fields[key].type).split(" |")[0] in ("float", "<class 'float'>") and isinstance(value, (str, int)) \
                and not isinstance(value, bool):
            # YAML 1.1 reads "1e-3" (no dot) as a string; a float field takes it as the number.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: {key} must be a number, got '{value}'") from None
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`spec.alpha=0.9` style overrides on the raw mapping."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value")
        key, value = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _parse_value(value)
    return data


def read_yaml(path: str, overrides: list[str] | None = None) -> dict:
    """A YAML mapping with `a.b=value` overrides applied; errors name the file."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such config file") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    return apply_overrides(data, overrides or [])


def load_config(path: str, overrides: list[str] | None = None) -> PairConfig:
    return _build(PairConfig, read_yaml(path, overrides), path)
