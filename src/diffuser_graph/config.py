"""YAML configs validated by pydantic, with dotted command-line overrides.

``load_config("configs/spectral.yaml", SpectralConfig, ["seq_lens=[512,1024]", "seed=3"])``
reads the YAML, applies each ``key.path=value`` override (the value is parsed as YAML) and
validates the result. Any problem raises :class:`ConfigError` naming the key path and what is
allowed, before any work starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any, TypeVar

import pydantic
import yaml

from .io import DataError, read_text

Model = TypeVar("Model", bound=pydantic.BaseModel)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key path."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"model.hops=3"`` -> ``(["model", "hops"], 3)``; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} must look like key.path=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from err
    return key.split("."), value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """A copy of ``data`` with each ``key.path=value`` override set (missing levels created)."""
    data = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(path[:depth + 1])} is not a "
                                  f"section (it holds {child!r})")
            node = child
        node[path[-1]] = value
    return data


def describe_validation_error(err: pydantic.ValidationError) -> str:
    """One line per problem: ``key.path: message (got value)``."""
    lines = []
    for problem in err.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        got = problem.get("input")
        shown = "" if problem["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {where}: {problem['msg']}{shown}")
    return "\n".join(lines)


def validate_config(data: Any, model: type[Model], source: str = "config") -> Model:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values at the top level, "
                          f"got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as err:
        raise ConfigError(f"{source} is invalid:\n{describe_validation_error(err)}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    would silently keep the last one, e.g. the second of two ``model:`` sections)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {first_line[key]})",
                    key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | os.PathLike, what: str = "config file") -> Any:
    """The YAML document in ``path`` (UTF-8, no duplicate keys; an empty file is ``{}``).
    Every problem raises :class:`ConfigError` naming the file and, where known, the line."""
    try:
        text = read_text(path)
    except DataError as err:
        raise ConfigError(f"{what} {err}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{what} {where}: not valid YAML: {problem}") from None


def load_config(path: str | os.PathLike, model: type[Model],
                overrides: Iterable[str] = ()) -> Model:
    """Read YAML at ``path``, apply dotted ``overrides`` and validate against ``model``."""
    data = load_yaml(path)
    overrides = list(overrides)
    source = str(path) + (f" with overrides {overrides}" if overrides else "")
    return validate_config(apply_overrides(data, overrides) if isinstance(data, dict) else data,
                           model, source)


def dump_config(config: pydantic.BaseModel) -> str:
    """The fully resolved config as YAML (what a run folder keeps)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
