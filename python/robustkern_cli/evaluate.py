"""Evaluation: clean accuracy; verified accuracy (IBP, CROWN-IBP, CROWN, alpha-CROWN) through robustkern.bounds; PGD-k with
restarts and the APGD cascade through robustkern.attacks. The evaluation parameters are checked when the config
is loaded (:func:`check_eval_params`)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from robustkern.attacks import evaluate_robust, pgd, robust_accuracy
from robustkern.bounds import BoundedModule, margin_spec
from robustkern.bounds.bcp import bcp_bounds
from robustkern.bounds.cap import cap_bounds
from robustkern.bounds.lipschitz import lmt_bounds, upper_norms
from robustkern.models import build_model_for

from .checkpoint import load_weights, read_checkpoint
from .norms import parse_norm
from .data import dataset_info, load_dataset, make_loader
from .errors import ConfigError

__all__ = ["EVALS", "EVAL_DEFAULTS", "clean_metrics", "verified_metrics", "evaluate", "fill_eval_defaults",
           "check_eval_params", "model_from_config", "describe"]


@torch.no_grad()
def clean_metrics(model, loader, device="cpu", progress=False) -> dict:
    """Accuracy and mean cross-entropy on clean inputs, model in eval mode."""
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    for x, y in tqdm(loader, disable=not progress, desc="eval clean", leave=False):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    model.train(was_training)
    return {"acc": correct / max(n, 1), "loss": loss_sum / max(n, 1), "n": n}


def verified_metrics(model, loader, cfg, device="cpu", progress=False, method="IBP",
                     optimize_bound_args: dict | None = None) -> dict:
    """Verified accuracy: the share of examples whose every margin ``f_y - f_j`` has a sound positive lower bound
    over the L-p ball of radius ``eval_params:epsilon`` clipped to [0, 1] (model in eval mode).
    ``optimize_bound_args``: alpha-CROWN's (``robustkern.bounds.alpha_crown``)."""
    ep = cfg["eval_params"]
    eps, norm = float(ep["epsilon"]), parse_norm("eval_params:norm", ep["norm"])
    model.eval()
    bm, verified, correct, n = None, 0, 0, 0
    for x, y in tqdm(loader, disable=not progress, desc=f"eval {method}", leave=False):
        x, y = x.to(device), y.to(device)
        if bm is None:
            bm = BoundedModule(model, x[:1])
        with torch.no_grad():
            logits = model(x)
            C = margin_spec(y, logits.shape[1])
            extra = {"optimize_bound_args": optimize_bound_args} if method == "alpha-CROWN" else {}
            lb, _ = bm.compute_bounds(x, eps, norm=norm, method=method, C=C, x_min=0.0, x_max=1.0,
                                      bound_upper=False, **extra)
        verified += (lb > 0).all(dim=1).sum().item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    return {"acc": correct / max(n, 1), "verified_acc": verified / max(n, 1), "epsilon": eps, "norm": str(ep["norm"]),
            "n": n}


def _clean(model, loader, cfg, device, progress):
    return clean_metrics(model, loader, device, progress)


def _ibp(model, loader, cfg, device, progress):
    return verified_metrics(model, loader, cfg, device, progress, method="IBP")


def _crown_ibp(model, loader, cfg, device, progress):
    return verified_metrics(model, loader, cfg, device, progress, method="CROWN-IBP")


def _crown(model, loader, cfg, device, progress):
    return verified_metrics(model, loader, cfg, device, progress, method="CROWN")


def _alpha_crown(model, loader, cfg, device, progress):
    """alpha-CROWN (Xu et al. 2021) with ``eval_params:method_params`` as auto_LiRPA's ``optimize_bound_args``
    (``iteration``, ``lr_alpha``, ``lr_decay``, ``early_stop_patience``, ...); an example stops once all its
    margins are verified."""
    args = dict(cfg["eval_params"]["method_params"])
    args["stop_criterion_func"] = lambda lb: (lb > 0).all(1)
    out = verified_metrics(model, loader, cfg, device, progress, method="alpha-CROWN", optimize_bound_args=args)
    return {**out, "iteration": args["iteration"]}


def _attack_norm(ep: dict) -> str:
    """``eval_params:norm`` in robustkern.attacks' words: ``"linf"`` or ``"l2"``."""
    return "l2" if parse_norm("eval_params:norm", ep["norm"]) == 2.0 else "linf"


def _pgd(model, loader, cfg, device, progress):
    """Accuracy under PGD-k with restarts (Madry et al. 2018; the seeds' "PGD^100" column), plus clean."""
    ep = cfg["eval_params"]
    mp = ep["method_params"]
    eps, norm = float(ep["epsilon"]), _attack_norm(ep)

    def attack(x, y):
        return pgd(model, x, y, eps, mp["step_size"], mp["num_steps"], norm=norm, random_start=mp["random_start"],
                   restarts=mp["restarts"])

    res = robust_accuracy(model, loader, attack, device=device)
    return {"acc": res["clean_accuracy"], "pgd_acc": res["robust_accuracy"], "n": res["n"], "epsilon": eps, "norm": norm,
            "steps": mp["num_steps"], "restarts": mp["restarts"]}


def _autoattack(model, loader, cfg, device, progress):
    """APGD-CE then APGD-T, each on the points still robust (AutoAttack's standard order, Croce & Hein 2020;
    without FAB-T and Square, so the accuracy is an upper bound on AutoAttack's)."""
    ep = cfg["eval_params"]
    mp = ep["method_params"]
    xs, ys = zip(*[(x, y) for x, y in loader])
    x, y = torch.cat(xs).to(device), torch.cat(ys).to(device)
    was_training = model.training
    model.eval()
    try:
        res = evaluate_robust(model, x, y, float(ep["epsilon"]), norm=_attack_norm(ep), steps=mp["num_steps"],
                                      bs=ep["batch_size"])
    finally:
        model.train(was_training)
    return {"acc": res["clean_accuracy"], "autoattack_acc": res["robust_accuracy"], "n": len(y),
            "after_each_attack": res["after"], "epsilon": float(ep["epsilon"]), "norm": _attack_norm(ep),
            "note": res["note"]}


def _certified_table(model, loader, cfg, device, progress):
    """The three columns of BCP's README table for ``eval_params:method`` bcp, cap or lmt: clean ("Standard")
    accuracy, accuracy under L2 PGD (``num_steps`` steps of ``step_size``, 0 = epsilon / 4, from the clean point:
    BCP's ``pgd_l2`` with ``niter`` 100, "PGD^100") and the share of test points the method's own certificate
    verifies ("Verification"): BCP's ball-and-box bound (``robustkern.bounds.bcp``), LMT's Lipschitz margin
    (``robustkern.bounds.lipschitz``), CAP's dual bound (``robustkern.bounds.cap``: CROWN with same-slope
    relaxations), all sound (float64, rigorous operator-norm bounds, rounding bounded). Model in eval mode."""
    ep = cfg["eval_params"]
    mp = ep["method_params"]
    method = ep["method"]
    eps, norm = float(ep["epsilon"]), parse_norm("eval_params:norm", ep["norm"])
    model.eval()
    alpha = mp["step_size"] or eps / 4

    def attack(x, y):
        return pgd(model, x, y, eps, alpha, mp["num_steps"], norm=_attack_norm(ep), random_start=mp["random_start"],
                   restarts=mp["restarts"])

    res = robust_accuracy(model, loader, attack, device=device)
    bm, norms, verified, n = None, None, 0, 0
    for x, y in tqdm(loader, disable=not progress, desc=f"eval {method}", leave=False):
        x, y = x.to(device), y.to(device)
        if bm is None:
            bm = BoundedModule(model, x[:1])
            norms = upper_norms(bm) if method in ("bcp", "lmt") else None
        with torch.no_grad():
            correct = model(x).argmax(1) == y
            C = margin_spec(y, bm.num_outputs)
            if method == "bcp":
                lb = bcp_bounds(bm, x, eps, C, norms=norms)
            elif method == "lmt":
                lb = lmt_bounds(bm, x, eps, C, norms=norms, last_layer=mp["last_layer"])
            else:
                lb = cap_bounds(bm, x, eps, C, norm=norm)
        verified += int(((lb > 0).all(dim=1) & correct).sum())
        n += len(y)
    out = {"acc": res["clean_accuracy"], "pgd_acc": res["robust_accuracy"], "verified_acc": verified / max(n, 1),
           "n": n, "epsilon": eps, "norm": _attack_norm(ep), "steps": mp["num_steps"], "step_size": alpha}
    if norms is not None:
        out["operator_norms"] = norms
    return out


EVALS = {
    "clean": _clean,
    "ibp": _ibp,
    "crown_ibp": _crown_ibp,
    "crown": _crown,
    "alpha_crown": _alpha_crown,
    "pgd": _pgd,
    "autoattack": _autoattack,
    "bcp": _certified_table,
    "cap": _certified_table,
    "lmt": _certified_table,
}
_TABLE_DEFAULTS = {"num_steps": 100, "step_size": 0.0, "restarts": 1, "random_start": False}
EVAL_DEFAULTS = {
    "pgd": {"num_steps": 40, "step_size": 0.01, "restarts": 1, "random_start": True},
    "autoattack": {"version": "standard", "num_steps": 100},
    "alpha_crown": {"iteration": 20, "lr_alpha": 0.5, "lr_decay": 0.98, "early_stop_patience": 10},
    "bcp": dict(_TABLE_DEFAULTS),
    "cap": dict(_TABLE_DEFAULTS),
    "lmt": dict(_TABLE_DEFAULTS, last_layer="lipschitz"),
}
_VERIFIED = {"ibp": "IBP", "crown_ibp": "CROWN-IBP", "crown": "CROWN", "alpha_crown": "alpha-CROWN"}


def fill_eval_defaults(cfg: dict) -> None:
    ep = cfg.get("eval_params", {})
    for k, v in EVAL_DEFAULTS.get(ep.get("method"), {}).items():
        ep.setdefault("method_params", {}).setdefault(k, v)


def check_eval_params(cfg: dict) -> None:
    """Raise ConfigError for an unknown ``eval_params:method`` (called when the config is loaded)."""
    ep = cfg["eval_params"]
    method = ep["method"]
    if method not in EVALS:
        raise ConfigError(f"unknown evaluation method '{method}'; known: {', '.join(sorted(EVALS))}")
    if method in ("bcp", "lmt") and parse_norm("eval_params:norm", ep["norm"]) != 2.0:
        raise ConfigError(f"evaluation method '{method}' verifies L2 balls: set eval_params:norm=2, got "
                          f"{ep['norm']!r}")
    mp = ep.get("method_params", {})
    if method == "lmt" and mp.get("last_layer", "lipschitz") not in ("lipschitz", "pairwise"):
        raise ConfigError(f"eval_params:method_params:last_layer must be 'lipschitz' or 'pairwise', got "
                          f"{mp['last_layer']!r}")
    if method == "alpha_crown":
        from robustkern.bounds.alpha_crown import check_optimize_bound_args
        args = ep.get("method_params", {})
        if "stop_criterion_func" in args or "loss_reduction_func" in args:
            raise ConfigError("eval_params:method_params: stop_criterion_func and loss_reduction_func are functions, "
                              "not config values")
        try:
            check_optimize_bound_args(args)
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise ConfigError(f"eval_params:method_params (alpha-CROWN's optimize_bound_args): {exc}") from None


def model_from_config(cfg: dict, checkpoint: str | Path | dict | None = None, trust: bool = False) -> torch.nn.Module:
    """Build the configured zoo model (robustkern.models) for the configured data set, optionally loading weights
    from ``checkpoint`` (a file, read by :func:`robustkern_cli.checkpoint.read_checkpoint` with ``trust``, or its
    already loaded content). A model the config's ``model`` section cannot build is a ConfigError."""
    info = dataset_info(cfg["data"]["dataset"])
    try:
        model = build_model_for(cfg["model"]["name"], cfg["model"]["kwargs"], info.shape, info.num_classes)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model:name={cfg['model']['name']} with model:kwargs {cfg['model']['kwargs']}: "
                          f"{exc}") from None
    if isinstance(checkpoint, dict):
        load_weights(model, checkpoint)
    elif checkpoint:
        load_weights(model, read_checkpoint(checkpoint, trust))
    return model


def evaluate(cfg: dict, checkpoint: str | Path | None = None, *, data_dir=None, download=False, device="cpu",
             progress=False, trust_checkpoint: bool = False) -> dict:
    """Run ``eval_params:method`` on the test split; returns the metrics (and what was evaluated)."""
    ep = cfg["eval_params"]
    method = ep["method"]
    checkpoint = checkpoint or ep["checkpoint"] or None
    model = model_from_config(cfg, checkpoint, trust_checkpoint).to(device)
    ds = load_dataset(cfg["data"]["dataset"], "test", data_dir or cfg["data"]["data_dir"] or None, download,
                      limit=ep["num_examples"])
    loader = make_loader(ds, ep["batch_size"])
    t0 = time.perf_counter()
    metrics = EVALS[method](model, loader, cfg, device, progress)
    return {"method": method, "checkpoint": str(checkpoint) if checkpoint else None,
            "dataset": cfg["data"]["dataset"], "model": cfg["model"]["name"], **metrics,
            "seconds": round(time.perf_counter() - t0, 3)}


def describe(res: dict) -> str:
    """One readable line for the result of :func:`evaluate`."""
    norm = "L2" if str(res.get("norm", "inf")).lower() in ("2", "2.0", "l2", "l_2") else "L-inf"
    radius = f"at {norm} epsilon {res.get('epsilon', 0):g}"
    method = res["method"]
    if method in _VERIFIED:
        head = f"{_VERIFIED[method]}-verified accuracy {res['verified_acc']:.3f} {radius}, "
    elif method == "pgd":
        restarts = res["restarts"]
        head = f"PGD-{res['steps']} accuracy {res['pgd_acc']:.3f} {radius} ({restarts} restart" \
               f"{'s' if restarts != 1 else ''}), "
    elif method in ("bcp", "cap", "lmt"):
        head = f"Standard {res['acc']:.4f} | PGD^{res['steps']} {res['pgd_acc']:.4f} | Verification " \
               f"({method.upper()}) {res['verified_acc']:.4f} {radius}, "
        return f"{head}on {res['n']} {res['dataset']} test images; model {res['model']}" \
               f"{', checkpoint ' + res['checkpoint'] if res.get('checkpoint') else ''}; {res['seconds']:.1f} s"
    elif method == "autoattack":
        head = f"APGD-CE + APGD-T accuracy {res['autoattack_acc']:.3f} {radius} (an upper bound), "
    else:
        head = ""
    clean = f"clean accuracy {res['acc']:.3f}" + (f" (loss {res['loss']:.4f})" if "loss" in res else "")
    source = f", checkpoint {res['checkpoint']}" if res.get("checkpoint") else ""
    return f"{head}{clean} on {res['n']} {res['dataset']} test images; model {res['model']}{source}; " \
           f"{res['seconds']:.1f} s"


def fill_all_defaults(cfg: dict) -> None:
    """The defaults of the config's training method and of its evaluation (what every command loads with)."""
    from .losses import fill_method_defaults
    fill_method_defaults(cfg)
    fill_eval_defaults(cfg)
