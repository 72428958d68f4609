"""Robust-accuracy evaluation: one attack over a data loader (``robust_accuracy``), and an AutoAttack-style
cascade (``evaluate_robust``; Croce & Hein 2020) that runs each attack only on the points every earlier attack
failed on, in AutoAttack's standard order: APGD-CE, then APGD-T (targeted DLR, 9 target classes), each with
100 iterations. FAB-T and Square of the official standard version are not implemented here, so the cascade
gives an upper bound on the official AutoAttack robust accuracy (usually equal to it within a few tenths of
a percent; Croce & Hein 2020, Table 2) and says so in its result.

Robust accuracy = fraction of points classified correctly at the clean input and at the adversarial input
(a point misclassified when clean counts as non-robust and is not attacked).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from .apgd import apgd, apgd_targeted
from .pgd import check_budget

__all__ = ["robust_accuracy", "evaluate_robust", "STANDARD_ATTACKS"]

STANDARD_ATTACKS = ("apgd-ce", "apgd-t")


def _modes(model):
    return [(m, m.training) for m in model.modules()]


def robust_accuracy(model, loader: Iterable, attack: Callable[[Tensor, Tensor], Tensor], device=None,
                    eval_mode: bool = True) -> dict:
    """Clean and robust accuracy of ``model`` on ``loader`` (batches ``(x, y)``) under ``attack(x, y) ->
    x_adv`` (e.g. ``PGD(model, ...)`` or ``lambda x, y: pgd(model, x, y, ...)``). Only points correct when
    clean are attacked. The model runs in eval mode (``eval_mode``) and every module's mode is restored.
    Returns ``{"n", "clean_accuracy", "robust_accuracy", "clean_correct", "robust_correct"}``."""
    if not callable(attack):
        raise TypeError(f"robust_accuracy: attack must be callable (x, y) -> x_adv, got {type(attack).__name__}")
    modes = _modes(model)
    if eval_mode:
        model.eval()
    n = clean = robust = 0
    try:
        for x, y in loader:
            if device is not None:
                x, y = x.to(device), y.to(device)
            with torch.no_grad():
                ok = model(x).argmax(1) == y
            n += y.numel()
            clean += int(ok.sum())
            if not bool(ok.any()):
                continue
            x_adv = attack(x[ok], y[ok])
            with torch.no_grad():
                robust += int((model(x_adv).argmax(1) == y[ok]).sum())
    finally:
        for m, t in modes:
            m.training = t
    return {"n": n, "clean_accuracy": clean / max(n, 1), "robust_accuracy": robust / max(n, 1),
            "clean_correct": clean, "robust_correct": robust}


def evaluate_robust(model, x: Tensor, y: Tensor, eps, norm: str = "linf", attacks=STANDARD_ATTACKS,
                    steps: int = 100, n_target_classes: int = 9, restarts: int = 1, bs: int = 250,
                    seed: int = 0) -> dict:
    """AutoAttack-style cascade on ``(x, y)`` (module docstring). ``attacks``: names from ``apgd-ce``,
    ``apgd-dlr``, ``apgd-t`` (targeted DLR), ``apgd-t-ce``, run in the given order, each on the points still
    robust, in batches of ``bs``. Returns ``{"clean_accuracy", "robust_accuracy", "after": {attack: robust
    accuracy after it}, "x_adv", "robust" (bool per point), "note"}``; the model runs in eval mode."""
    check_budget("evaluate_robust", x, y, eps, None, steps, norm, restarts)
    runners = {
        "apgd-ce": lambda xb, yb, e: apgd(model, xb, yb, e, steps, norm, "ce", restarts, seed=seed),
        "apgd-dlr": lambda xb, yb, e: apgd(model, xb, yb, e, steps, norm, "dlr", restarts, seed=seed),
        "apgd-t": lambda xb, yb, e: apgd_targeted(model, xb, yb, e, steps, norm, "dlr", n_target_classes,
                                                  restarts, seed=seed),
        "apgd-t-ce": lambda xb, yb, e: apgd_targeted(model, xb, yb, e, steps, norm, "ce", n_target_classes,
                                                     restarts, seed=seed),
    }
    unknown = [a for a in attacks if a not in runners]
    if unknown:
        raise ValueError(f"evaluate_robust: unknown attacks {unknown}; known: {sorted(runners)}")
    if not isinstance(bs, int) or bs < 1:
        raise ValueError(f"evaluate_robust: bs must be an int >= 1, got {bs!r}")
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    eps_t = eps_t.expand(x.shape[0]) if eps_t.dim() == 0 else eps_t
    modes = _modes(model)
    model.eval()
    n = max(x.shape[0], 1)
    x = x.detach()
    x_adv = x.clone()
    after = {}
    try:
        with torch.no_grad():
            robust = torch.cat([model(x[i:i + bs]).argmax(1) == y[i:i + bs] for i in range(0, x.shape[0], bs)]) \
                if x.shape[0] else torch.zeros(0, dtype=torch.bool, device=x.device)
        clean = float(robust.sum()) / n
        for name in attacks:
            idx = robust.nonzero().squeeze(1)
            for i in range(0, idx.numel(), bs):
                j = idx[i:i + bs]
                adv = runners[name](x[j], y[j], eps_t[j])
                with torch.no_grad():
                    fooled = model(adv).argmax(1) != y[j]
                x_adv[j[fooled]] = adv[fooled]
                robust[j[fooled]] = False
            after[name] = float(robust.sum()) / n
    finally:
        for m, t in modes:
            m.training = t
    note = ("APGD cascade only (FAB-T and Square not run): an upper bound on the official AutoAttack robust "
            "accuracy")
    return {"clean_accuracy": clean, "robust_accuracy": float(robust.sum()) / n, "after": after,
            "x_adv": x_adv, "robust": robust, "note": note}
