"""Training losses, one per method, in a registry the training loop dispatches on, and the epsilon schedule.

``LOSSES[name](model, x, y, cfg, state) -> (loss, metrics)``: ``cfg`` is the whole config (the method's
parameters are ``cfg["training_params"]["method_params"]``), ``state`` a :class:`StepState` with the epoch,
the step and the scheduled epsilon; ``metrics`` maps names to floats (averaged over the epoch by the loop, the
batch sizes as weights). ``metrics["eps"]`` is special: a method with a perturbation radius reports the radius
it used on this step there (not averaged; the loop logs it as ``eps``), in the units of the method's own
parameter: the scheduled ``training_params:epsilon`` (``state.eps``) for IBP/CROWN-IBP (and for pgd when the
recipe schedules epsilon), ``method_params:epsilon`` for pgd, trades (L-inf or L2 per ``distance``), trades_rs
(L2) and lfr, and for smoothadv the L2 radius on [0, 1] pixels after the warm-up (``method_params:epsilon``'s
units; SmoothAdv's train_pgd.py takes 1/256 units, 64 -> 0.25). Methods without a radius leave it out, so no
misleading 0 is logged. ``METHOD_DEFAULTS[name]`` are the method's parameters, filled into ``method_params``
before command-line overrides, so they are the valid override keys.

Each method's parameters are checked once, when the config is loaded (:func:`check_training_params`, called by
:func:`robustkern_cli.config.check_values`); the losses themselves take them as given. A method that is
registered but not implemented (:data:`NOT_IMPLEMENTED`) raises NotImplementedError from
:func:`training_loss`, before any data is read (``robustkern train`` exits 4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from robustkern.attacks import madry_steps, pgd_at_loss, trades_loss
from robustkern.bounds import BoundedModule, crown_ibp_loss, crown_ibp_slope_loss, linear_eps, smoothed_eps
from robustkern.bounds.bcp import bcp_loss
from robustkern.bounds.cap import cap_loss
from robustkern.bounds.lipschitz import estimated_norms, lmt_loss, power_iteration_for
from robustkern.bounds.slope_training import RELAXATIONS
from robustkern.flatness import input_grad_norm, lfr_loss
from robustkern.smoothing import (consistency_loss, gaussian_augment, macer_loss, smoothadv_loss,
                                  smoothadv_warmup_eps, trades_rs_loss)

from .norms import parse_norm
from .errors import ConfigError

__all__ = ["LOSSES", "METHOD_DEFAULTS", "NOT_IMPLEMENTED", "StepState", "register_loss", "fill_method_defaults",
           "check_training_params", "training_loss", "scheduled_epsilon", "SCHEDULE_TYPES"]

LossFn = Callable[..., tuple]
CheckFn = Callable[[dict, dict], None]
LOSSES: dict[str, LossFn] = {}
METHOD_DEFAULTS: dict[str, dict] = {}
_CHECKS: dict[str, CheckFn] = {}  # method -> check(training_params, method_params), run when a config is loaded
# methods whose recipes are shipped but whose algorithm robustkern does not implement yet: name -> what it is
# (none at present; the mechanism stays for recipes that come before their method)
NOT_IMPLEMENTED: dict[str, str] = {}


@dataclass
class StepState:
    """What a loss may know about where training is. ``eps`` is the training schedule's epsilon
    (:func:`scheduled_epsilon`); methods with their own radius ignore it. ``cache`` persists across steps (not
    checkpointed). ``saved`` holds the objects (with ``state_dict``/``load_state_dict``) a method carries across
    steps that the checkpoint keeps (``loss_state()``); ``restored`` is what a resumed run's checkpoint held, for
    the method to load when it creates them."""
    epoch: int = 0
    batch_idx: int = 0
    steps_per_epoch: int = 1
    eps: float = 0.0
    max_eps: float = 0.0
    cache: dict = field(default_factory=dict)
    saved: dict = field(default_factory=dict)
    restored: dict = field(default_factory=dict)

    def loss_state(self) -> dict:
        """``{name: state_dict}`` of ``saved`` (tensors and plain containers), for the checkpoint."""
        return {name: obj.state_dict() for name, obj in self.saved.items()}


def register_loss(name: str, defaults: dict | None = None, check: CheckFn | None = None):
    """Register ``LOSSES[name]`` with its default parameters and ``check(training_params, method_params)``,
    which raises ConfigError for a value the method cannot take."""
    def deco(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        METHOD_DEFAULTS[name] = dict(defaults or {})
        if check is not None:
            _CHECKS[name] = check
        return fn
    return deco


def training_loss(method: str) -> LossFn:
    """The loss of ``method``; NotImplementedError for a method robustkern does not implement yet."""
    if method in NOT_IMPLEMENTED:
        raise NotImplementedError(_not_implemented_message(method))
    return LOSSES[method]


def _not_implemented_message(method: str) -> str:
    return f"training method '{method}' ({NOT_IMPLEMENTED[method]}) is not implemented in robustkern yet"


def check_training_params(cfg: dict) -> None:
    """Raise ConfigError for an unknown ``training_params:method`` or a method parameter it cannot take."""
    tp = cfg["training_params"]
    method = tp["method"]
    if method not in LOSSES:
        raise ConfigError(f"unknown training method '{method}'; known: {', '.join(sorted(LOSSES))}")
    if tp["schedule_type"] not in SCHEDULE_TYPES:
        raise ConfigError(f"training_params:schedule_type must be one of {', '.join(SCHEDULE_TYPES)}, got "
                          f"'{tp['schedule_type']}'")
    mp = tp.get("method_params", {})
    if method in _CHECKS and all(k in mp for k in METHOD_DEFAULTS[method]):  # once the defaults are filled in
        _CHECKS[method](tp, mp)


def _one_of(mp: dict, key: str, allowed: tuple) -> None:
    if mp[key] not in allowed:
        raise ConfigError(f"training_params:method_params:{key} must be one of "
                          f"{', '.join(repr(a) for a in allowed)}, got {mp[key]!r}")


def _fraction(mp: dict, *keys: str) -> None:
    for key in keys:
        v = mp[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ConfigError(f"training_params:method_params:{key} must be a number in [0, 1], got {v!r}")


def fill_method_defaults(cfg: dict) -> None:
    """Add the chosen training method's default parameters to ``training_params:method_params``."""
    tp = cfg.get("training_params", {})
    for k, v in METHOD_DEFAULTS.get(tp.get("method"), {}).items():
        tp.setdefault("method_params", {}).setdefault(k, v)


# --------------------------------------------------------------------------------------------- eps schedule
SCHEDULE_TYPES = ("linear", "smoothed", "linear_epoch")


def scheduled_epsilon(tp: dict, epoch: int, step: int, steps_per_epoch: int) -> float:
    """``training_params``' epsilon at optimiser step ``step`` of ``epoch`` (both from 0): CROWN-IBP's
    ``EpsilonScheduler`` (huanzhang12/CROWN-IBP train.py, eps_scheduler.py) on robustkern.bounds' ramps.

    Steps count as ``t = epoch * steps_per_epoch + step``. The ramp goes from ``starting_epsilon`` at step
    ``schedule_start * steps_per_epoch`` to ``epsilon`` at step ``(schedule_start + schedule_length - 1) *
    steps_per_epoch`` (CROWN-IBP's ``init_step``/``final_step``): ``"linear"`` by
    :func:`robustkern.bounds.linear_eps`, ``"smoothed"`` by :func:`robustkern.bounds.smoothed_eps` (DeepMind's
    ``x**4`` ramp up to a quarter of the way, then linear), each shifted by ``starting_epsilon``. A ramp of
    length 0 (``schedule_length`` 1) holds ``epsilon`` from the start for ``"linear"``, from the first step after
    ``init_step`` for ``"smoothed"``, as CROWN-IBP's. ``"linear_epoch"``: constant within an epoch, the linear
    ramp over epochs at the epoch's end, ``starting_epsilon + (epsilon - starting_epsilon) * min(1, (epoch -
    schedule_start + 1) / schedule_length)`` (Shaeiri et al.'s IAT curriculum: 0.01 per epoch for 40 epochs).
    """
    init, final = float(tp["starting_epsilon"]), float(tp["epsilon"])
    start, length = int(tp["schedule_start"]), int(tp["schedule_length"])
    if tp["schedule_type"] == "linear_epoch":
        return init + linear_eps(epoch + 1, start, length, final - init)
    ramp = smoothed_eps if tp["schedule_type"] == "smoothed" else linear_eps
    init_step, final_step = start * steps_per_epoch, (start + length - 1) * steps_per_epoch
    return init + ramp(epoch * steps_per_epoch + step, init_step, final_step - init_step, final - init)


# ------------------------------------------------------------------------------------------------- methods
def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


@register_loss("standard")
def standard_loss(model, x, y, cfg, state):
    """Cross-entropy on clean inputs."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    return loss, {"loss": loss.item(), "acc": _accuracy(logits, y)}


@register_loss("gaussian", defaults={"sigma": 0.25})
def gaussian_loss(model, x, y, cfg, state):
    """Cohen et al.'s Gaussian data augmentation: cross-entropy on ``x + N(0, sigma^2)`` (pixel space, no
    clipping; locuslab/smoothing code/train.py), the noise from robustkern.smoothing.gaussian_augment's
    counter-based generator, one seed per step drawn from torch's global generator (replays on resume)."""
    sigma = float(cfg["training_params"]["method_params"]["sigma"])
    logits = model(gaussian_augment(x, sigma, seed=_noise_seed()))
    loss = F.cross_entropy(logits, y)
    return loss, {"loss": loss.item(), "acc": _accuracy(logits, y)}


def _noise_seed() -> int:
    """Seed of the counter-based noise of one loss call (robustkern.smoothing.augment), drawn from torch's
    global generator: the training loop seeds it per run (and per rank) and checkpoints it, so the noise replays
    on resume, and the noise itself comes from the fused counter-based kernel."""
    return int(torch.randint(0, 2 ** 62, (1,)).item())


_IBP_DEFAULTS = {"init_kappa": 1.0, "final_kappa": 0.5, "final_beta": 0.0, "bound_type": "interval"}


def _check_ibp_family(tp, mp):
    _one_of(mp, "bound_type", ("interval", "crown-interval"))
    if tp["method"] == "crown_ibp" and mp["bound_type"] != "crown-interval":
        raise ConfigError(f"training method 'crown_ibp' needs method_params:bound_type=crown-interval, got "
                          f"'{mp['bound_type']}' (use method 'ibp' for pure IBP)")
    _fraction(mp, "init_kappa", "final_kappa", "final_beta")


def _ibp_family(model, x, y, cfg, state):
    """IBP / CROWN-IBP certified training (Gowal et al. 2018; Zhang et al. 2020, CROWN-IBP train.py).

    ``kappa = init_kappa + (final_kappa - init_kappa) * eps / max_eps`` mixes natural and robust CE,
    ``loss = kappa * CE(f(x), y) + (1 - kappa) * robust_CE(lb)``; with ``bound_type = "crown-interval"`` the
    margin lower bound is ``beta * lb_CROWN-IBP + (1 - beta) * lb_IBP``, ``beta = 1 - (1 - final_beta) * eps /
    max_eps`` (CROWN-IBP's defaults: kappa 1 -> 0.5, beta 1 -> 0), by ``robustkern.bounds.crown_ibp_loss``: the
    clean forward runs first and its BatchNorm statistics serve the bounds, IBP runs once, and the bounds are
    not widened for rounding (``sound=False``: training needs no certificate). While eps is 0 the robust term
    is the natural cross-entropy (the two agree at eps 0) and no bounds are computed, as CROWN-IBP switches to
    natural training then.
    """
    tp = cfg["training_params"]
    mp = tp["method_params"]
    eps, max_eps = state.eps, state.max_eps
    frac = eps / max_eps if max_eps > 0 else 1.0
    kappa = mp["init_kappa"] + (mp["final_kappa"] - mp["init_kappa"]) * frac
    beta = 1.0 - (1.0 - mp["final_beta"]) * frac if mp["bound_type"] == "crown-interval" else 0.0

    key = ("bounded", id(model))
    bm = state.cache.get(key)
    if bm is None:
        bm = state.cache[key] = BoundedModule(model, x[:1])
    if eps < torch.finfo(torch.float32).tiny:  # CROWN-IBP trains naturally while eps is 0: no bounds to compute
        logits = bm(x)
        natural = F.cross_entropy(logits, y)
        robust = natural
        verified = _accuracy(logits, y)
        loss = kappa * natural + (1.0 - kappa) * robust
    else:   # one clean forward (its BatchNorm statistics serve the bounds), IBP once, CROWN-IBP when beta > 0
        loss, info = crown_ibp_loss(bm, x, y, eps, beta=beta if beta > 1e-5 else 0.0, kappa=kappa,
                                    norm=float(tp["norm"]), x_min=0.0, x_max=1.0, sound=False)
        logits, natural, robust = info["logits"], info["natural"], info["robust"]
        verified = (info["lb"] > 0).all(dim=1).float().mean().item()
    return loss, {"loss": loss.item(), "acc": _accuracy(logits, y), "natural_ce": natural.item(),
                  "robust_ce": robust.item(), "verified_acc": verified, "eps": eps, "kappa": kappa, "beta": beta}


register_loss("ibp", _IBP_DEFAULTS, _check_ibp_family)(_ibp_family)
register_loss("crown_ibp", dict(_IBP_DEFAULTS, bound_type="crown-interval"), _check_ibp_family)(_ibp_family)


def _check_certified_family(tp, mp):
    method = tp["method"]
    if method in ("bcp", "lmt") and parse_norm("training_params:norm", tp["norm"]) != 2.0:
        raise ConfigError(f"training method '{method}' certifies L2 balls: set training_params:norm=2, got "
                          f"{tp['norm']!r}")
    _fraction(mp, "init_kappa", "final_kappa")
    key = "projections" if method == "cap" else "power_iterations"
    if isinstance(mp[key], bool) or not isinstance(mp[key], int) or mp[key] < (0 if method == "cap" else 1):
        raise ConfigError(f"training_params:method_params:{key} must be an integer >= "
                          f"{0 if method == 'cap' else 1}, got {mp[key]!r}")
    if method == "lmt":
        _one_of(mp, "last_layer", ("lipschitz", "pairwise"))


def _certified_family(model, x, y, cfg, state):
    """BCP (Lee et al. 2020), LMT (Tsuzuku et al. 2018) and CAP (Wong & Kolter 2018; Wong et al. 2018)
    certified training on robustkern.bounds' ``bcp_loss``, ``lmt_loss`` and ``cap_loss``:
    ``loss = kappa * CE(f(x), y) + (1 - kappa) * robust_CE(lb)``, ``kappa = init_kappa + (final_kappa -
    init_kappa) * eps / max_eps`` over the scheduled epsilon (BCP's train_mnist.py / train_cifar10.py: kappa 1 -> 0
    with the epsilon ramp; LMT and CAP train on the robust loss alone, kappa 0). BCP and LMT take each layer's
    operator norm from power iteration with ``power_iterations`` steps per training step from iterates kept per
    layer across steps (BCP's ``sniter``; the checkpoint carries the iterates, so a resumed run goes on from
    them); CAP's intermediate bounds are estimated with ``projections`` random directions (0: exact, CROWN
    with same-slope relaxations). While eps is 0 the loss is the natural cross-entropy (BCP's warm-up epochs
    train naturally)."""
    tp = cfg["training_params"]
    mp = tp["method_params"]
    method = tp["method"]
    eps, max_eps = state.eps, state.max_eps
    frac = eps / max_eps if max_eps > 0 else 1.0
    kappa = mp["init_kappa"] + (mp["final_kappa"] - mp["init_kappa"]) * frac
    key = ("bounded", id(model))
    bm = state.cache.get(key)
    if bm is None:
        bm = state.cache[key] = BoundedModule(model, x[:1])
    logits = bm(x)
    natural = F.cross_entropy(logits, y)
    if eps < torch.finfo(torch.float32).tiny:
        return natural, {"loss": natural.item(), "acc": _accuracy(logits, y), "natural_ce": natural.item(),
                         "robust_ce": natural.item(), "verified_acc": _accuracy(logits, y), "eps": eps,
                         "kappa": kappa}
    if method == "cap":
        robust, lb = cap_loss(bm, x, y, eps, norm=parse_norm("training_params:norm", tp["norm"]),
                              projections=int(mp["projections"]))
    else:
        power = state.cache.get(("power", id(model)))
        if power is None:
            power = state.cache[("power", id(model))] = power_iteration_for(bm, seed=int(cfg["seed"]))
            if "power_iterates" in state.restored:
                power.load_state_dict(state.restored["power_iterates"])
            state.saved["power_iterates"] = power
        norms = estimated_norms(bm, power, int(mp["power_iterations"]))
        if method == "bcp":
            robust, lb = bcp_loss(bm, x, y, eps, norms=norms)
        else:
            robust, lb = lmt_loss(bm, x, y, eps, norms=norms, last_layer=mp["last_layer"])
    loss = kappa * natural + (1.0 - kappa) * robust
    return loss, {"loss": loss.item(), "acc": _accuracy(logits, y), "natural_ce": natural.item(),
                  "robust_ce": robust.item(), "verified_acc": (lb > 0).all(dim=1).float().mean().item(), "eps": eps,
                  "kappa": kappa}


register_loss("bcp", {"init_kappa": 1.0, "final_kappa": 0.0, "power_iterations": 1},
              _check_certified_family)(_certified_family)
register_loss("lmt", {"init_kappa": 0.0, "final_kappa": 0.0, "power_iterations": 1, "last_layer": "lipschitz"},
              _check_certified_family)(_certified_family)
register_loss("cap", {"init_kappa": 0.0, "final_kappa": 0.0, "projections": 50},
              _check_certified_family)(_certified_family)


def _macer_first_decay(tp) -> int:
    """The epoch of the first LR decay (0: none): the first ``lr_milestones`` entry, or ``lr_step``."""
    if tp["lr_schedule"] == "multistep":
        return int(tp["lr_milestones"][0]) if tp["lr_milestones"] else 0
    return int(tp["lr_step"]) if tp["lr_schedule"] in ("step", "step_after_ramp") else 0


def _check_macer(tp, mp):
    if mp["deferred"] and not _macer_first_decay(tp):
        raise ConfigError("method_params:deferred=true needs an LR decay to wait for: lr_schedule=multistep "
                          "with lr_milestones, or lr_schedule=step with lr_step > 0")


@register_loss("macer", {"sigma": 0.25, "gauss_num": 16, "lbd": 12.0, "gamma": 8.0, "beta": 16.0, "deferred": False},
               _check_macer)
def _macer(model, x, y, cfg, state):
    """MACER (Zhai et al. 2020, RuntianZ/macer): ``(CL + lbd RL) / B`` over ``gauss_num`` noisy copies per image
    in one forward (robustkern.smoothing.macer_loss). ``deferred``: lbd = 0 until the first LR decay (the first
    ``lr_milestones`` entry, or ``lr_step``), jh-jeong/smoothing-consistency ``train_macer.py --deferred``."""
    tp = cfg["training_params"]
    mp = tp["method_params"]
    lbd = float(mp["lbd"])
    if mp["deferred"] and state.epoch < _macer_first_decay(tp):
        lbd = 0.0
    loss, cl, rl = macer_loss(model, x, y, float(mp["sigma"]), int(mp["gauss_num"]), lbd, float(mp["gamma"]),
                              float(mp["beta"]))
    return loss, {"loss": loss.item(), "classification": cl.item(), "robustness": rl.item(), "lbd": lbd}


@register_loss("smoothadv", {"sigma": 0.12, "attack": "PGD", "epsilon": 0.25, "num_steps": 10, "num_noise_vec": 2,
                             "train_multi_noise": True, "warmup": 10},
               lambda tp, mp: _one_of(mp, "attack", ("PGD",)))  # SmoothAdv's DDN attack is not implemented
def _smoothadv(model, x, y, cfg, state):
    """SmoothAdv (Salman et al. 2019, train_pgd.py --adv-training --attack PGD): PGD-L2 on the soft smoothed
    classifier with ``num_noise_vec`` noise draws, epsilon (pixel L2 units) warmed up over ``warmup`` epochs,
    CE on the adversarial noisy copies. One optimizer step per batch: the original's step is on 256/m images."""
    mp = cfg["training_params"]["method_params"]
    eps = smoothadv_warmup_eps(state.epoch, int(mp["warmup"]), float(mp["epsilon"]))
    loss, parts = smoothadv_loss(model, x, y, float(mp["sigma"]), eps, int(mp["num_steps"]), int(mp["num_noise_vec"]),
                                 train_multi_noise=bool(mp["train_multi_noise"]), seed=_noise_seed())
    logits = parts["logits"]  # (B, m, K) with multi-noise, else (B, K)
    copies = logits.shape[1] if logits.dim() == 3 else 1
    acc = _accuracy(logits.reshape(-1, logits.shape[-1]), y.repeat_interleave(copies))
    return loss, {"loss": loss.item(), "acc": acc, "eps": eps}


@register_loss("trades_rs", {"sigma": 0.12, "epsilon": 0.435, "num_steps": 10, "beta": 6.0, "distance": "l_2"},
               lambda tp, mp: _one_of(mp, "distance", ("l_2",)))
def _trades_rs(model, x, y, cfg, state):
    """TRADES + random smoothing (Blum et al. 2020, trades.py distance='l_2'): one noise draw shared by
    CE(f(x+n), y) and beta * KL(f(x+n) || f(x'+n)) at the L2 PGD maximiser x' (step 2 eps / num_steps)."""
    mp = cfg["training_params"]["method_params"]
    loss, parts = trades_rs_loss(model, x, y, float(mp["sigma"]), float(mp["epsilon"]), num_steps=int(mp["num_steps"]),
                                 beta=float(mp["beta"]), seed=_noise_seed())
    return loss, {"loss": loss.item(), "acc": _accuracy(parts["logits"], y), "natural_ce": parts["natural"].item(),
                  "robust_kl": parts["robust"].item(), "eps": float(mp["epsilon"])}


@register_loss("consistency", {"sigma": 0.25, "num_noise_vec": 2, "lbd": 20.0, "eta": 0.5})
def _consistency(model, x, y, cfg, state):
    """Consistency regularisation (Jeong & Shin 2020, train_consistency.py): CE over ``num_noise_vec`` noisy
    copies + lbd * mean KL(p_mean || p_j) + eta * H(p_mean). Defaults: the paper's CIFAR-10 sigma 0.25 recipe
    (m 2, lbd 20, eta 0.5; lbd 10 for sigma 0.5 and 1.0). One optimizer step per batch of 256/m images."""
    mp = cfg["training_params"]["method_params"]
    loss, parts = consistency_loss(model, x, y, float(mp["sigma"]), int(mp["num_noise_vec"]), float(mp["lbd"]),
                                   float(mp["eta"]), seed=_noise_seed())
    logits = parts["logits"]
    acc = _accuracy(logits.reshape(-1, logits.shape[-1]), y.repeat_interleave(logits.shape[1]))
    return loss, {"loss": loss.item(), "acc": acc, "xent": parts["xent"].item(),
                  "consistency": parts["consistency"].item()}


def _check_pgd(tp, mp):
    _one_of(mp, "steps_rule", ("fixed", "madry"))
    _one_of(mp, "norm", ("linf", "l2"))
    if tp["epsilon"] > 0 and mp["epsilon"] != tp["epsilon"]:
        raise ConfigError(f"training method 'pgd' with an epsilon schedule (training_params:epsilon "
                          f"{tp['epsilon']:g}) trains at the scheduled radius: set method_params:epsilon to the "
                          f"same value (it is {mp['epsilon']:g}), or training_params:epsilon=0 for a fixed radius")


@register_loss("pgd", {"epsilon": 0.3, "step_size": 0.01, "num_steps": 40, "random_start": True, "steps_rule": "fixed",
                       "norm": "linf"}, _check_pgd)
def _pgd_at(model, x, y, cfg, state):
    """Madry et al. 2018 PGD adversarial training: cross-entropy at the PGD point of the ball of radius
    ``method_params:epsilon``, or, when the recipe schedules epsilon (``training_params:epsilon > 0``), of the
    scheduled radius (Shaeiri et al.'s IAT: ``schedule_type`` linear_epoch). ``steps_rule = "madry"`` sets the
    steps to ``int(2.5 eps / step_size)`` of the radius used (Shaeiri et al.'s rule)."""
    mp = cfg["training_params"]["method_params"]
    eps, alpha = (state.eps if state.max_eps > 0 else float(mp["epsilon"])), mp["step_size"]
    steps = mp["num_steps"] if mp["steps_rule"] == "fixed" else madry_steps(eps, alpha)
    loss = pgd_at_loss(model, x, y, eps, alpha, steps, norm=mp["norm"], random_start=mp["random_start"])
    return loss, {"loss": loss.item(), "eps": float(eps), "steps": steps}


@register_loss("trades", {"epsilon": 0.031, "step_size": 0.007, "num_steps": 10, "beta": 6.0, "distance": "l_inf"},
               lambda tp, mp: _one_of(mp, "distance", ("l_inf", "l_2")))
def _trades(model, x, y, cfg, state):
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta KL(f(x) || f(x')) at the inner maximiser x'."""
    mp = cfg["training_params"]["method_params"]
    loss = trades_loss(model, x, y, step_size=mp["step_size"], epsilon=mp["epsilon"], perturb_steps=mp["num_steps"],
                       beta=mp["beta"], distance=mp["distance"])
    return loss, {"loss": loss.item(), "eps": float(mp["epsilon"])}


@register_loss("lfr", {"epsilon": 0.3, "step_size": 0.01, "num_steps": 40, "lambada": 0.02, "norm": "l_inf"},
               lambda tp, mp: _one_of(mp, "norm", ("l_inf", "l_2")))
def _lfr(model, x, y, cfg, state):
    """Local flatness regularisation (Xu et al. 2020): CE(f(x), y) + lambada * mean ||grad_x CE(f(x'))||_1 at
    the point x' of the eps-ball where num_steps sign steps (model in eval mode) made the input-gradient norm
    large (``robustkern.flatness.lfr_loss``; BatchNorm running statistics updated by the clean forward only)."""
    mp = cfg["training_params"]["method_params"]
    loss, natural, grad_norm = lfr_loss(model, x, y, epsilon=mp["epsilon"], step_size=mp["step_size"],
                                        perturb_steps=int(mp["num_steps"]), lam=mp["lambada"], norm=mp["norm"])
    return loss, {"loss": loss.item(), "natural_ce": natural.item(), "loss_grad": grad_norm.item(),
                  "eps": float(mp["epsilon"])}


def _check_grad_norm(tp, mp):
    for key, allowed in (("p", (1, 2)), ("power", (1, 2)), ("method", ("double_backprop", "finite_difference"))):
        _one_of(mp, key, allowed)
    if mp["h"] < 0 or (mp["h"] > 0 and mp["method"] != "finite_difference"):
        raise ConfigError(f"training_params:method_params:h is the finite-difference step (>= 0, 0 = default, "
                          f"method finite_difference only), got {mp['h']!r}")


@register_loss("grad_norm", {"lam": 0.1, "p": 2, "power": 2, "method": "double_backprop", "h": 0.0},
               _check_grad_norm)
def _grad_norm(model, x, y, cfg, state):
    """Input-gradient-norm regularisation: ``CE(f(x), y) + lam * mean_i ||grad_x CE(f(x_i), y_i)||_p ** power``
    (double backpropagation, Drucker & LeCun 1992; Ross & Doshi-Velez 2018 with p = power = 2; Finlay & Oberman
    2021 by finite differences, ``method = "finite_difference"`` with step ``h``, 0 = the library's default).
    The clean loss reuses the forward of ``robustkern.flatness.input_grad_norm``."""
    mp = cfg["training_params"]["method_params"]
    norms, logits = input_grad_norm(model, x, y, p=int(mp["p"]), method=mp["method"], h=float(mp["h"]) or None,
                                    return_logits=True)
    natural = F.cross_entropy(logits, y)
    penalty = norms.pow(mp["power"]).mean()
    loss = natural + mp["lam"] * penalty
    return loss, {"loss": loss.item(), "acc": _accuracy(logits, y), "natural_ce": natural.item(),
                  "grad_penalty": penalty.item()}


_LLM_FROZEN = {"10": 13, "20": 12, "30": 11, "40": 10, "50": 9, "60": 8, "70": 7, "80": 6, "90": 5, "100": 4,
               "110": 3, "120": 2, "130": 1, "140": 0}
_LLM_DEFAULTS = {"init_kappa": 0.0, "final_kappa": 0.0, "final_beta": 1.0, "relaxation": "ours", "slope_steps": 1,
                 "slope_step": 2.0, "bound_type": "crown-interval", "frozen_dict": dict(_LLM_FROZEN),
                 "bounded_input": False}


def _check_llm(tp, mp):
    _one_of(mp, "relaxation", RELAXATIONS)
    _one_of(mp, "bound_type", ("crown-interval", "crown-interval-frozen"))
    _fraction(mp, "init_kappa", "final_kappa", "final_beta")
    steps = mp["slope_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"training_params:method_params:slope_steps must be an integer >= 0, got {steps!r}")
    step = mp["slope_step"]
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0:
        raise ConfigError(f"training_params:method_params:slope_step must be a number > 0, got {step!r}")
    if not isinstance(mp["bounded_input"], bool):
        raise ConfigError(f"training_params:method_params:bounded_input must be true or false, got "
                          f"{mp['bounded_input']!r}")
    fd = mp["frozen_dict"]
    ok = isinstance(fd, dict) and fd and all(str(k).isdigit() and isinstance(v, int) and not isinstance(v, bool)
                                             and v >= 0 for k, v in fd.items())
    if not ok:
        raise ConfigError(f"training_params:method_params:frozen_dict must map epochs (\"10\") to layer counts "
                          f"(integers >= 0), got {fd!r}")


def frozen_layers(frozen_dict: dict, epoch: int) -> int:
    """Loss Landscape Matters' ``frozen`` for ``epoch`` (from 0): the value of the largest epoch key <= epoch; before
    the first key, its value (the original starts at 13, the first value of its schedule)."""
    keys = sorted(int(k) for k in frozen_dict)
    chosen = keys[0]
    for k in keys:
        if epoch >= k:
            chosen = k
    return int(frozen_dict[str(chosen)])


@register_loss("crown_ibp_ours", _LLM_DEFAULTS, _check_llm)
def _crown_ibp_ours(model, x, y, cfg, state):
    """CROWN-IBP with optimised ReLU slopes (Lee et al. 2021 "Loss Landscape Matters", sungyoon-lee/
    LossLandscapeMatters train.py ``Train_calloss_ours``; ``robustkern.bounds.crown_ibp_slope_loss``): each unstable
    ReLU's lower slope starts uniform in [0, 1] and takes ``slope_steps`` signed-gradient steps of ``slope_step`` on
    the robust loss (1 of 2: the paper's method; 7 of 0.1: its multistep variant), then the loss with those slopes is
    back-propagated to the weights. ``relaxation``: "ours", or the paper's comparisons "uniform", "binary" (random
    slopes), "adaptive" (plain CROWN-IBP), "same-slope", "zero-lb", "one-lb". ``bound_type``
    "crown-interval-frozen": the backward pass through the last ``frozen + 1`` layers only, ``frozen`` from
    ``frozen_dict`` by epoch. kappa and beta ramp with eps as in ``crown_ibp`` (the recipes: kappa 0, beta 1).
    ``bounded_input`` false (the original's setting): the eps box is not clipped to [0, 1] in training. While eps is
    0 the step is natural training, as in the original."""
    tp = cfg["training_params"]
    mp = tp["method_params"]
    eps, max_eps = state.eps, state.max_eps
    frac = eps / max_eps if max_eps > 0 else 1.0
    kappa = mp["init_kappa"] + (mp["final_kappa"] - mp["init_kappa"]) * frac
    beta = 1.0 - (1.0 - mp["final_beta"]) * frac
    key = ("bounded", id(model))
    bm = state.cache.get(key)
    if bm is None:
        bm = state.cache[key] = BoundedModule(model, x[:1])
    frozen = frozen_layers(mp["frozen_dict"], state.epoch) if mp["bound_type"] == "crown-interval-frozen" else None
    if eps < torch.finfo(torch.float32).tiny:     # natural training while eps is 0, as the original
        logits = bm(x)
        loss = natural = robust = F.cross_entropy(logits, y)
        verified = _accuracy(logits, y)
    else:
        lo, hi = (0.0, 1.0) if mp["bounded_input"] else (-math.inf, math.inf)
        loss, info = crown_ibp_slope_loss(bm, x, y, eps, relaxation=mp["relaxation"], steps=int(mp["slope_steps"]),
                                          step_size=float(mp["slope_step"]), beta=beta if beta >= 1e-5 else 0.0,
                                          kappa=kappa, frozen=frozen, norm=float(tp["norm"]), x_min=lo, x_max=hi)
        logits, natural, robust = info["logits"], info["natural"], info["robust"]
        verified = (info["lb"] > 0).all(dim=1).float().mean().item()
    metrics = {"loss": loss.item(), "acc": _accuracy(logits, y), "natural_ce": natural.item(),
               "robust_ce": robust.item(), "verified_acc": verified, "eps": eps, "kappa": kappa, "beta": beta}
    if frozen is not None:
        metrics["frozen"] = float(frozen)
    return loss, metrics
