"""Reading recipes: YAML, ``section.key=value`` overrides, key and type checks.

``load(recipe, overrides)`` reads a YAML recipe (UTF-8, no key twice, not empty), applies
overrides, checks every key and type (``_build``), then what each field declares beside
itself (ranges, the files it names: ``distill.config.fields``), resolves the timesteps given
as noise levels against the teacher's schedule (``distill.config.noise_levels``), then the combinations
(``distill.config.checks``), and returns a ``Config``; every problem is a ``ConfigError`` that names the key and the recipe file,
raised before any weights load. A recipe in the shape before the method registry gets a
message that says how to write it now (``distill.config.moved``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from distill.config import moved
from distill.config.checks import check_eval, keyed_errors, validate
from distill.config.fields import check_fields
from distill.config.noise_levels import resolve as resolve_noise_levels
from distill.config.schema import Config
from distill.errors import ConfigError
from distill.methods import METHODS
from distill.sections import LoraConfig, NoiseLevel


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if tp is NoiseLevel:
        return "a noise level ({sigma: s} or {logsnr: l})"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to float)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{source}: {key}: expected {_describe(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key, source)
            except ConfigError:
                continue
        raise bad
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if origin is Literal:
        if isinstance(value, bool) and not value and "no" in typing.get_args(tp):
            return "no"  # YAML 1.1 reads a bare `no` (e.g. mixed_precision: no) as false
        if not isinstance(value, bool) and value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{source}: {key}: must be a finite number, got {value!r}")
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if tp is NoiseLevel:
        if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in NoiseLevel.UNITS:
            (unit, number), = value.items()
            return {unit: _coerce(number, float, f"{key}.{unit}", source)}
        raise bad
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(base: Any, data: dict, prefix: str, source: str) -> Any:
    """``base`` (a dataclass instance holding the defaults) updated with ``data``, checked."""
    cls = type(base)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{prefix}{unknown[0]}"
        section = prefix.rstrip(".") or "the top level"
        if "name" in names:  # a registered section: its name says whose keys these are
            section += f" ({base.name})"
        raise ConfigError(f"{source}: {key}: unknown key; {section} takes {', '.join(names)}")
    values = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in data.items():
        default = getattr(base, k)
        if dataclasses.is_dataclass(default):
            v = {} if v is None else v  # a section whose keys are all commented out
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: {prefix}{k}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(default))}, got {v!r}")
            registry = fields[k].metadata.get("registry")
            if registry is not None:
                default = _registered_section(registry, default, v, f"{prefix}{k}", source)
            values[k] = _build(default, v, f"{prefix}{k}.", source)
        else:
            values[k] = _coerce(v, hints[k], f"{prefix}{k}", source)
    return dataclasses.replace(base, **values)


def _registered_section(registry: dict, default: Any, data: dict, key: str, source: str) -> Any:
    """The defaults of the section class ``data["name"]`` picks from ``registry`` (the
    default's own class when it names none)."""
    name = data.get("name", default.name)
    if name not in registry:
        raise ConfigError(f"{source}: {key}.name: unknown {key} {name!r}; choose from {', '.join(registry)}")
    return default if type(default) is registry[name] else registry[name]()


def _set_override(data: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: override {dotted}: {k} is not a section")
        node = child
    node[keys[-1]] = value


def load_eval(overrides: list[str], source: str) -> Config:
    """Defaults with ``eval.*`` / ``data.*`` overrides, only those sections validated: the
    settings of ``distill eval`` on an export or a teacher, which has no recipe."""
    data: dict = {}
    for item in overrides:
        key, raw = item.split("=", 1)
        key = key.strip()
        if key.split(".")[0] not in ("eval", "data"):
            raise ConfigError(f"{source}: {key}: only eval.* and data.* settings apply here")
        _set_override(data, key, yaml.safe_load(raw) if raw.strip() else None, source)
    config = _build(Config(), data, "", source)
    with keyed_errors(source):
        check_fields(config.eval, "eval.", config)
        check_fields(config.data, "data.", config)
        check_eval(config.eval)
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping (two ``train:``
    sections) is an error rather than the last one silently winning."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (first on line {seen[key] + 1}, again on line "
                    f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_recipe(path: Path, source: str) -> dict:
    """A recipe file's mapping: UTF-8 YAML, no key twice, not empty."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{source}: not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); save the recipe "
                          "as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    if data is None:
        raise ConfigError(f"{source}: the recipe is empty (nothing but comments or blank lines); a recipe sets at least "
                          "teacher.path and output_dir (`distill validate --keys` lists every key)")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe is a mapping of sections, got {type(data).__name__}")
    return data


def load(recipe: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a recipe YAML (or only defaults when ``recipe`` is None), apply ``key=value``
    overrides (values parsed as YAML), validate, and return the config."""
    source = str(recipe) if recipe is not None else "<defaults>"
    data: dict = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"{source}: recipe file not found")
        data = read_recipe(path, source)
        moved.check_recipe(data, source)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        moved.check_override(key.strip(), source)
        _set_override(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None, source)
    config = from_dict(data, source)
    with keyed_errors(source):
        check_fields(config)  # ranges beside their fields, and every file the recipe names
        resolve_noise_levels(config)  # before the checks that compare timesteps
    validate(config, source)
    return config


def from_dict(data: dict, source: str) -> Config:
    """A config from a (resolved) recipe mapping, every key checked and every missing one at
    the schema's default, without the checks of files and combinations ``load`` adds: how a
    finished run's ``config.yaml`` is read back, even if its teacher has moved since."""
    moved.check_recipe(data, source)
    config = _build(Config(), data, "", source)
    config.method.resolve()
    return config


def fill_teacher_defaults(config: Config, teacher) -> None:
    """Fill the settings left null for the teacher adapter to choose (written so into
    config.yaml): the target modules of every LoRA section (``teacher.lora_target_modules``)."""
    def fill(section: Any) -> None:
        if isinstance(section, LoraConfig) and section.target_modules is None:
            section.target_modules = list(teacher.lora_target_modules)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                fill(value)

    fill(config)


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def to_flat_dict(config: Config) -> dict:
    """Dotted keys to numbers and strings (lists and null as strings), for TensorBoard's hparams."""
    def flat(tree: dict, prefix: str) -> dict:
        rows = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                rows.update(flat(value, f"{prefix}{key}."))
            else:
                rows[f"{prefix}{key}"] = str(value) if isinstance(value, (list, type(None))) else value
        return rows

    return flat(to_dict(config), "")


def dump(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loadable again with ``load``)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def describe(defaults: Any = None, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(key, help, default) for every field of ``defaults`` (a section; None: the default
    config), for `distill validate --keys`."""
    defaults = Config() if defaults is None else defaults
    rows = []
    for f in dataclasses.fields(defaults):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(value, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", f.metadata.get("help", ""), value))
    return rows


def describe_methods() -> dict[str, list[tuple[str, str, Any]]]:
    """``describe`` of each registered method's section, by name."""
    return {name: describe(section(), "method.") for name, section in METHODS.items()}
