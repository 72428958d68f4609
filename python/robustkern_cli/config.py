"""JSON experiment configs: defaults, ``"base"`` inheritance, validation and ``section:key=value`` overrides.

A config is a JSON object with sections (``model``, ``data``, ``training_params``, ``eval_params``,
``certify_params``, ``output``) plus a few top-level scalars (``name``, ``seed``). ``python/configs/defaults.json``
lies under every config and is its schema: a key that defaults.json does not have is an error, and a value must
have the type of the default (an int is accepted where a float is expected; ``null`` defaults accept anything).
The free-form dictionaries listed in :data:`FREE_FORM` (model keyword arguments, per-method parameters) are
exempt from the schema; their valid keys are the ones present after the method's defaults are filled in.

A recipe may extend another with ``"base": "other.json"`` (resolved next to the recipe, then in the config
directory); the chain is merged dictionary by dictionary, the extending file winning. Keys starting with ``_``
(``_source``, ``_comment``) are documentation and never validated.

Overrides follow CROWN-IBP's command-line syntax, ``section:key=value`` and nested
``training_params:method_params:bound_type=interval``; the value is parsed according to the type of the value
already in the config (bool: true/false/1/0/yes/no; int; float, also ``8/255``; str verbatim; list: JSON or
comma-separated). Overriding a key that does not exist is an error naming the key and the valid ones.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import ConfigError
from .norms import parse_norm

__all__ = [
    "CONFIG_DIR", "FREE_FORM", "resolve_config_path", "list_configs", "read_config_file", "load_config",
    "parse_override", "apply_overrides", "validate", "get_path", "check_values",
]

DEFAULTS_NAME = "defaults.json"


def _config_dir() -> Path:
    """The recipes installed as the data package ``robustkern_cli.configs`` (setup.py maps python/configs
    there), else python/configs of a source checkout. Recipes elsewhere are given by path (``--config FILE``)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "configs", here.parent / "configs"):
        if (cand / DEFAULTS_NAME).is_file():
            return cand
    return here.parent / "configs"


CONFIG_DIR = _config_dir()
FREE_FORM = frozenset({
    ("model", "kwargs"),
    ("training_params", "method_params"),
    ("eval_params", "method_params"),
    ("certify_params", "method_params"),
})


def resolve_config_path(name: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """A config given as a path, a path relative to ``relative_to``, or a recipe name in :data:`CONFIG_DIR`."""
    p = Path(name)
    candidates = [p]
    if relative_to is not None and not p.is_absolute():
        candidates.insert(0, relative_to / p)
    if not p.is_absolute():
        candidates += [CONFIG_DIR / p, CONFIG_DIR / (p.name + ".json")]
    for c in candidates:
        if c.is_file():
            return c
    names = ", ".join(list_configs()) or "(none)"
    raise ConfigError(f"config '{name}' not found (looked at {', '.join(str(c) for c in candidates)}); "
                      f"shipped recipes: {names}")


def list_configs() -> list[str]:
    """Names of the recipes shipped in :data:`CONFIG_DIR` (without ``.json``)."""
    if not CONFIG_DIR.is_dir():
        return []
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json") if p.name != DEFAULTS_NAME)


def _merge(base: dict, top: Mapping) -> dict:
    """Recursive dictionary merge; ``top`` wins. Returns ``base`` (modified)."""
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def read_config_file(path: str | os.PathLike, _chain: tuple = ()) -> dict:
    """Read one JSON config and the ``"base"`` files it extends (merged, without defaults.json)."""
    path = Path(path).resolve()
    if path in _chain:
        raise ConfigError("config 'base' chain loops: " + " -> ".join(str(p) for p in _chain + (path,)))
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a JSON object, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file name, got {base!r}")
    merged = read_config_file(resolve_config_path(base, relative_to=path.parent), _chain + (path,))
    return _merge(merged, data)


def _type_name(v: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "section"}.get(
        type(v), type(v).__name__)


def _type_ok(value: Any, default: Any) -> bool:
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _unknown_key(path: Sequence[str], valid: Iterable[str]) -> ConfigError:
    valid = sorted(k for k in valid if not k.startswith("_"))
    key = path[-1]
    where = ":".join(path[:-1]) or "the top level"
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{':'.join(path)}'{hint}; valid keys in {where}: {', '.join(valid)}")


def validate(cfg: Mapping, schema: Mapping, _path: tuple = ()) -> None:
    """Check that every key of ``cfg`` exists in ``schema`` with a compatible type (see module doc)."""
    for k, v in cfg.items():
        path = _path + (k,)
        if k.startswith("_"):
            continue
        if k not in schema:
            raise _unknown_key(path, schema.keys())
        default = schema[k]
        if path in FREE_FORM:
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{':'.join(path)}' must be a JSON object, got {_type_name(v)}")
            continue
        if not _type_ok(v, default):
            raise ConfigError(f"config key '{':'.join(path)}' must be of type {_type_name(default)}, "
                              f"got {v!r} ({_type_name(v)})")
        if isinstance(default, dict) and default:
            validate(v, default, path)


def parse_override(text: str) -> tuple[tuple[str, ...], str]:
    """``"a:b:c=value"`` -> ``(("a", "b", "c"), "value")``."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section:key=value")
    key, value = text.split("=", 1)
    path = tuple(p.strip() for p in key.strip().split(":"))
    if not all(path):
        raise ConfigError(f"override '{text}' has an empty key component")
    return path, value


def _parse_float(s: str) -> float:
    s = s.strip()
    if "/" in s:
        num, den = s.split("/", 1)
        return float(num) / float(den)
    return float(s)


def _coerce(raw: str, current: Any, path: Sequence[str]) -> Any:
    name = ":".join(path)
    s = raw.strip()
    if isinstance(current, dict):
        raise ConfigError(f"'{name}' is a section; override its keys one by one ({name}:<key>=...)")
    try:
        if isinstance(current, bool):
            low = s.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if isinstance(current, int):
            return int(s)
        if isinstance(current, float):
            return _parse_float(s)
        if isinstance(current, str):
            return raw
        if isinstance(current, list):
            if s.startswith("["):
                value = json.loads(s)
            elif s == "":
                value = []
            else:
                value = [_json_or_str(part.strip()) for part in s.split(",")]
            if not isinstance(value, list):
                raise ValueError
            return value
        return _json_or_str(s)  # current value is null: take JSON if it parses, else the string
    except (ValueError, json.JSONDecodeError):
        shown = repr(current) if len(repr(current)) <= 60 else repr(current)[:57] + "..."
        raise ConfigError(f"cannot set '{name}' to {raw!r}: expected {_type_name(current)} "
                          f"(current value {shown})") from None


def _json_or_str(s: str) -> Any:
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def apply_overrides(cfg: dict, overrides: Iterable[str],
                    fill_defaults: Callable[[dict], None] | None = None) -> dict:
    """Apply ``section:key=value`` overrides in place and return ``cfg``.

    Overrides of a ``method`` key are applied first, then ``fill_defaults(cfg)`` (which adds the chosen
    method's default parameters), then the rest, so that ``training_params:method=ibp
    training_params:method_params:final_kappa=0`` works in either order.
    """
    parsed = [parse_override(o) for o in overrides]
    first = [p for p in parsed if p[0][-1] == "method"]
    rest = [p for p in parsed if p[0][-1] != "method"]
    for path, raw in first:
        _set(cfg, path, raw)
    if fill_defaults is not None:
        fill_defaults(cfg)
    for path, raw in rest:
        _set(cfg, path, raw)
    return cfg


def _set(cfg: dict, path: tuple[str, ...], raw: str) -> None:
    node = cfg
    for i, k in enumerate(path[:-1]):
        if not isinstance(node, dict) or k not in node:
            raise _unknown_key(path[: i + 1], node.keys() if isinstance(node, dict) else ())
        node = node[k]
        if not isinstance(node, dict):
            raise ConfigError(f"'{':'.join(path[: i + 1])}' is a value ({node!r}), not a section")
    key = path[-1]
    if key not in node:
        raise _unknown_key(path, node.keys())
    node[key] = _coerce(raw, node[key], path)


def get_path(cfg: Mapping, dotted: str, default: Any = None) -> Any:
    """``get_path(cfg, "training_params:method_params:bound_type")``; ``default`` when absent."""
    node: Any = cfg
    for k in dotted.split(":"):
        if not isinstance(node, Mapping) or k not in node:
            return default
        node = node[k]
    return node


# ------------------------------------------------------------------------------------------------ value ranges
# Range checks of a config's values, the one place where every value entering through a recipe, an override or a
# checkpoint's stored config is judged: load_config runs check_values after the schema check (defaults.json fixes
# each key's type; these rules fix what the value may be), so every command refuses a bad value with one line before
# it reads data or writes a file: sizes and counts of at least 1, radii, learning rates and step sizes of at least 0,
# noise levels above 0, starting_epsilon <= epsilon, certify_params:alpha in (0, 1), and model normalisation
# statistics with one value per image channel of the data set, names chosen from a fixed set (optimiser, LR
# schedule, epsilon schedule, augmentation, norms, methods). The per-method parameters (*:method_params) are
# free-form; the keys that mean the same in every method (sigma, epsilon, step_size, num_steps, gauss_num,
# num_noise_vec) are checked wherever they appear, the others by their method (robustkern_cli.losses,
# robustkern_cli.evaluate). The code that uses a value takes it as checked here.
# rule name -> (test, what the value must be)
RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    ">=0": (lambda v: v >= 0, "a number >= 0"),
    ">0": (lambda v: v > 0, "a number > 0"),
    ">=1": (lambda v: v >= 1, "an integer >= 1"),
    ">=-1": (lambda v: v >= -1, "an integer >= -1 (-1 = no limit)"),
    "(0,1)": (lambda v: 0 < v < 1, "a number strictly between 0 and 1"),
}
VALUE_RULES: dict[str, str] = {
    "data:batch_size": ">=1", "data:test_batch_size": ">=1", "data:num_train": ">=0", "data:num_test": ">=0",
    "data:num_workers": ">=0",
    "training_params:epochs": ">=0", "training_params:lr": ">0", "training_params:momentum": ">=0",
    "training_params:weight_decay": ">=0", "training_params:lr_step": ">=0", "training_params:lr_gamma": ">0",
    "training_params:grad_clip": ">=0", "training_params:batch_multiplier": ">=1",
    "training_params:epsilon": ">=0", "training_params:starting_epsilon": ">=0",
    "training_params:schedule_start": ">=0", "training_params:schedule_length": ">=1",
    "training_params:eval_every": ">=0",
    "eval_params:epsilon": ">=0", "eval_params:batch_size": ">=1", "eval_params:num_examples": ">=0",
    "certify_params:sigma": ">0", "certify_params:N0": ">=1", "certify_params:N": ">=1",
    "certify_params:alpha": "(0,1)", "certify_params:batch": ">=1", "certify_params:skip": ">=1",
    "certify_params:start": ">=0", "certify_params:max": ">=-1", "certify_params:linf_dim": ">=0",
}
METHOD_PARAM_RULES: dict[str, str] = {
    "sigma": ">0", "epsilon": ">=0", "step_size": ">=0", "num_steps": ">=0", "gauss_num": ">=1",
    "num_noise_vec": ">=1",
}


def _check(path: str, value: Any, rule: str) -> None:
    test, what = RULES[rule]
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or not test(value):
        raise ConfigError(f"{path} must be {what}, got {value!r}")


def _check_normalisation(cfg: Mapping) -> None:
    """``model:kwargs:mean``/``std`` (a recipe's normalisation) must have one value per image channel."""
    from .data import dataset_info
    info = dataset_info(cfg["data"]["dataset"])
    kwargs = cfg["model"]["kwargs"]
    channels = info.shape[0]
    for key in ("mean", "std"):
        if kwargs.get(key) is None:
            continue
        values = list(kwargs[key]) if isinstance(kwargs[key], (list, tuple)) else [kwargs[key]]
        if len(values) != channels:
            raise ConfigError(
                f"model:kwargs:{key} has {len(values)} values but {info.name} images have {channels} "
                f"channel{'s' if channels != 1 else ''}: set model:kwargs:mean={list(info.mean)} and "
                f"model:kwargs:std={list(info.std)} (the data set's statistics)")
        for v in values:
            _check(f"model:kwargs:{key}", v, ">0" if key == "std" else ">=0")


def _check_choices(cfg: Mapping) -> None:
    """The values that name one of a fixed set (optimiser, LR schedule, augmentation, gradient sync, norms) and
    the parameters of the training, evaluation and certification methods."""
    from .data import AUGMENTATIONS
    from .distributed import GradientSync
    from .evaluate import check_eval_params
    from .losses import check_training_params
    from .train import LR_SCHEDULES, OPTIMIZERS
    for path, allowed in (("data:augment", AUGMENTATIONS), ("training_params:optimizer", OPTIMIZERS),
                          ("training_params:lr_schedule", LR_SCHEDULES), ("training_params:grad_sync",
                                                                          GradientSync.MODES)):
        value = get_path(cfg, path)
        if value not in allowed:
            raise ConfigError(f"{path} must be one of {', '.join(allowed)}, got {value!r}")
    tp = cfg["training_params"]
    if tp["lr_schedule"] in ("step", "step_after_ramp") and tp["lr_step"] <= 0:
        raise ConfigError(f"training_params:lr_schedule={tp['lr_schedule']} needs training_params:lr_step > 0")
    parse_norm("training_params:norm", tp["norm"])
    parse_norm("eval_params:norm", cfg["eval_params"]["norm"])
    check_training_params(cfg)
    check_eval_params(cfg)


def check_values(cfg: Mapping) -> None:
    """Raise :class:`ConfigError` naming the first value of ``cfg`` outside its range or choices (see the module
    doc)."""
    for path, rule in VALUE_RULES.items():
        value = get_path(cfg, path)
        if value is not None:
            _check(path, value, rule)
    tp = cfg.get("training_params", {})
    if tp.get("starting_epsilon", 0) > tp.get("epsilon", 0):
        raise ConfigError(f"training_params:starting_epsilon ({tp['starting_epsilon']}) must not exceed "
                          f"training_params:epsilon ({tp['epsilon']}): the schedule ramps up to epsilon")
    for section in ("training_params", "eval_params", "certify_params"):
        for key, value in (get_path(cfg, f"{section}:method_params") or {}).items():
            if key in METHOD_PARAM_RULES:
                _check(f"{section}:method_params:{key}", value, METHOD_PARAM_RULES[key])
    _check_normalisation(cfg)
    _check_choices(cfg)


def load_defaults() -> dict:
    return read_config_file(CONFIG_DIR / DEFAULTS_NAME)


def load_config(name: str | os.PathLike | None, overrides: Iterable[str] = (),
                fill_defaults: Callable[[dict], None] | None = None, base_cfg: Mapping | None = None) -> dict:
    """defaults.json <- ``name`` (with its ``base`` chain) <- overrides, validated: keys and types against
    defaults.json, then the values' ranges (:func:`check_values`).

    ``name`` may be ``None`` when ``base_cfg`` (e.g. the config stored in a checkpoint) is given; then the
    overrides apply to ``base_cfg``. ``fill_defaults`` adds per-method parameter defaults (see
    :func:`apply_overrides`).
    """
    schema = load_defaults()
    cfg = copy.deepcopy(schema) if base_cfg is None else _merge(copy.deepcopy(schema), base_cfg)
    if name is not None:
        path = resolve_config_path(name)
        recipe = read_config_file(path)
        validate(recipe, schema)
        _merge(cfg, recipe)
        if not cfg.get("name"):
            cfg["name"] = path.stem
    validate(cfg, schema)
    if fill_defaults is not None:
        fill_defaults(cfg)
    apply_overrides(cfg, overrides, fill_defaults)
    validate(cfg, schema)
    check_values(cfg)
    return cfg
