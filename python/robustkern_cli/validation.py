"""Range checks of a config's values, the one place where every value entering through a recipe, an override
or a checkpoint's stored config is judged.

:func:`robustkern_cli.config.load_config` runs :func:`check_values` after the schema check (defaults.json fixes
each key's type; this module fixes what the value may be), so every command (train, eval, certify, bench,
demo) refuses a bad value with one line before it reads data or writes a file: sizes and counts of at least 1,
radii, learning rates and step sizes of at least 0, noise levels above 0, ``starting_epsilon <= epsilon``,
``certify_params:alpha`` in (0, 1), and model normalisation statistics with one value per image channel of the
data set. The per-method parameters (``*:method_params``) are free-form; the keys that mean the same in every
method (``sigma``, ``epsilon``, ``step_size``, ``num_steps``, ``gauss_num``, ``num_noise_vec``) are checked
wherever they appear.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from .config import get_path
from .errors import ConfigError

__all__ = ["RULES", "VALUE_RULES", "METHOD_PARAM_RULES", "check_values"]

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
    "training_params:schedule_start": ">=0", "training_params:schedule_length": ">=0",
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


def check_values(cfg: Mapping) -> None:
    """Raise :class:`ConfigError` naming the first value of ``cfg`` outside its range (see the module doc)."""
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
