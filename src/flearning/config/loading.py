"""The one configuration loader: (profile) < YAML file < command-line options < ``key=value`` overrides,
every problem reported at once as ``source:field: what is wrong``. YAML is read with the core schema
(only ``true``/``false`` are booleans, decimal integers, ``5e-5`` a float) and duplicate keys refused;
relative paths inside a config file resolve against the file's directory.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from flearning.errors import ConfigError, FlearnError, Problem
from flearning.models.loading import HUB_PREFIX
from flearning.resources import SAMPLE_PREFIX


class _CoreSchemaLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's core-schema scalars instead of YAML 1.1's: only
    ``true``/``false`` are booleans (not ``yes``, ``on``, ``off``), integers are plain decimals (no
    ``1_000``, no octal ``010`` = 8), and ``5e-5`` is a float (YAML 1.1 wanted a dot). Anything else
    stays text, which the strict setting types then refuse with a message."""


_IMPLICIT_11 = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
_CoreSchemaLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _IMPLICIT_11]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _pattern, _first in (
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:int", r"^[-+]?[0-9]+$", "-+0123456789"),
    (
        "tag:yaml.org,2002:float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+0123456789.",
    ),
):
    _CoreSchemaLoader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


# YAML 1.1's integer constructor reads a leading 0 as octal; the core schema's integers are decimal
_CoreSchemaLoader.add_constructor(
    "tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node), 10)
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_CoreSchemaLoader)  # noqa: S506 - a SafeLoader subclass


def parse_overrides(pairs: list[str], source: str = "command line") -> tuple[dict[str, Any], list[Problem]]:
    """``a.b=value`` strings into a nested dict; values are parsed as YAML scalars (so ``5e-5``,
    ``true`` and ``[q_proj, v_proj]`` have their natural types)."""
    tree: dict[str, Any] = {}
    problems: list[Problem] = []
    for item in pairs:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(Problem(source, None, item, "expected key=value"))
            continue
        try:
            value = _load_yaml(raw) if raw.strip() else None
        except (yaml.YAMLError, RecursionError) as ex:
            problems.append(Problem(source, None, key, f"cannot parse value {raw!r}: {_yaml_reason(ex)}"))
            continue
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(Problem(source, None, key, f"'{part}' is not a section"))
                break
        else:
            node[parts[-1]] = value
    return tree, problems


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _yaml_reason(ex: BaseException) -> str:
    return "nested too deeply" if isinstance(ex, RecursionError) else str(ex)


def _duplicate_keys(text: str, source: str) -> list[Problem]:
    """Every key given twice in one mapping of a YAML document (PyYAML keeps the last one silently), as
    ``file:line N:dotted.key: duplicate key (first given at line M)``."""
    problems: list[Problem] = []

    def walk(node: yaml.Node, prefix: str, seen_nodes: set[int]) -> None:
        if id(node) in seen_nodes:  # an alias of a node already walked
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                name = str(key.value) if isinstance(key, yaml.ScalarNode) else None
                dotted = f"{prefix}.{name}" if prefix and name is not None else name
                if name is not None and name != "<<":
                    line = key.start_mark.line + 1
                    if name in first:
                        problems.append(
                            Problem(
                                source,
                                line,
                                dotted,
                                f"duplicate key (first given at line {first[name]})",
                                "line",
                            )
                        )
                    else:
                        first[name] = line
                walk(value, dotted or prefix, seen_nodes)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{prefix}.{i}" if prefix else str(i), seen_nodes)

    root = yaml.compose(text, Loader=_CoreSchemaLoader)  # noqa: S506 - a SafeLoader subclass
    if root is not None:
        walk(root, "", set())
    return problems


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML config file's top-level mapping (YAML 1.2 core-schema scalars).

    Raises:
        ConfigError: not UTF-8, not valid YAML, not a mapping, or a key given twice in one mapping
            (naming the file, line and key).
        FlearnError: the file cannot be read.
    """
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except OSError as ex:
        raise FlearnError(f"{path}: cannot read config: {ex.strerror or ex}") from ex
    except UnicodeDecodeError as ex:
        raise ConfigError(
            [Problem(str(path), None, None, f"not UTF-8 text (invalid byte at offset {ex.start})")]
        ) from ex
    except ValueError as ex:  # e.g. a NUL byte in the path
        raise FlearnError(f"{path}: cannot read config: {ex}") from ex
    try:
        loaded = _load_yaml(text)
    except (yaml.YAMLError, RecursionError) as ex:
        raise ConfigError([Problem(str(path), None, None, f"not valid YAML: {_yaml_reason(ex)}")]) from ex
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            [Problem(str(path), None, None, f"expected a mapping at the top, got {type(loaded).__name__}")]
        )
    duplicates = _duplicate_keys(text, str(path))
    if duplicates:
        raise ConfigError(duplicates)
    return loaded


def _is_shipped(path: Path) -> bool:
    from flearning.resources import configs_dir

    try:
        return Path(path).resolve().is_relative_to(configs_dir().resolve())
    except OSError:
        return False


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # e.g. a NUL byte, a name too long: not a path of ours
        return False


def _against(base: Path, value: Any, *, model: bool = False) -> Any:
    """``value`` resolved against ``base`` when it is a relative path (not ``sample:NAME``, ``~/…``, a hub
    id ``hf:owner/name``, or, for a model, a name or hub id: a model is a path when it starts with ``./`` or
    ``../`` or names something under ``base``)."""
    if not isinstance(value, str) or not value or value.startswith((SAMPLE_PREFIX, "~", HUB_PREFIX)):
        return value
    if Path(value).is_absolute():
        return value
    if model and not (value.startswith(("./", "../")) or _exists(base / value)):
        return value
    return str(Path(os.path.normpath(base / value)))


def resolve_config_paths(fields: dict[str, Any], path_fields: tuple[str, ...], base: Path) -> dict[str, Any]:
    """A YAML file's relative paths made relative to the file's directory ``base`` (``path_fields``:
    dotted names; ``name.*`` is every value of a mapping). Values of other types are left to the
    validation to report."""
    out = copy.deepcopy(fields)
    for dotted in path_fields:
        *parents, last = dotted.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if last == "*":
            for key in node:
                node[key] = _against(base, node[key])
        elif last in node:
            node[last] = _against(base, node[last], model=dotted == "model")
    return out


def validation_problems(ex: ValidationError, source: str) -> list[Problem]:
    return [
        Problem(source, None, ".".join(str(p) for p in err["loc"]) or None, err["msg"]) for err in ex.errors()
    ]


def build_config(model: type[BaseModel], fields: dict[str, Any], source: str):
    """``model`` from keyword fields (the Python API), every problem at once as a ``ConfigError`` naming
    ``source`` and the field, as ``load_config`` reports a file's."""
    try:
        return model.model_validate(fields)
    except ValidationError as ex:
        raise ConfigError(validation_problems(ex, source)) from ex


def config_source(path: Path | None) -> str:
    """How problems of a configuration name where it came from: its file, else the command line."""
    return str(path) if path else "command line"


def load_config(
    model: type[BaseModel],
    path: Path | None,
    overrides: list[str],
    cli: dict[str, Any] | None = None,
    *,
    profile: str | None = None,
):
    """Build ``model`` (``UpdateConfig``, ``BenchConfig``, ``PrimeOptions``) from (its ``profile``) <
    (YAML file) < (explicit CLI options) < (key=value overrides).

    An override changes one key of a section (``prime.max_epochs=3`` keeps the file's ``prime.lr``); a CLI
    option replaces the whole value (``--data`` replaces the file's datasets). Relative paths inside a YAML
    file (``model.path_fields``) are taken relative to the file's directory, so a config works from any
    directory; options and overrides are the command line's, relative to the current directory. A shipped
    config (``--config demo``) is a template: its ``out`` is relative to the current directory.

    Raises:
        ConfigError: every problem at once (an unknown profile, overrides that do not parse, unknown keys,
            wrong types, values out of range), each as ``source:field: why``.
        FlearnError: the config file cannot be read.
    """
    source = config_source(path)
    fields = read_yaml(path) if path else {}
    path_fields: tuple[str, ...] = getattr(model, "path_fields", ())
    if path and path_fields and not _is_shipped(path):
        fields = resolve_config_paths(fields, path_fields, Path(os.path.abspath(path)).parent)
    fields.update({k: v for k, v in (cli or {}).items() if v is not None})
    extra, problems = parse_overrides(overrides)
    fields = _merge(fields, extra)
    profiles: dict[str, dict[str, Any]] = getattr(model, "profiles", {})
    if profile is not None:
        if profile in profiles:
            fields = _merge(copy.deepcopy(profiles[profile]), fields)
        else:
            problems.append(
                Problem(
                    "command line",
                    None,
                    "--profile",
                    f"unknown profile '{profile}'; choose one of: {', '.join(profiles)}",
                )
            )
    try:
        config = model.model_validate(fields)
    except ValidationError as ex:
        problems += validation_problems(ex, source)
        config = None
    if problems:
        raise ConfigError(problems)
    return config
