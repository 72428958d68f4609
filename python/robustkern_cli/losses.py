"""Training losses, one per method, in a registry the training loop dispatches on.

``LOSSES[name](model, x, y, cfg, state) -> (loss, metrics)``: ``cfg`` is the whole config (the method's
parameters are ``cfg["training_params"]["method_params"]``), ``state`` a :class:`StepState` with the epoch,
the step and the scheduled epsilon; ``metrics`` maps names to floats (averaged over the epoch by the loop, the
batch sizes as weights). ``metrics["eps"]`` is special: a method with a perturbation radius reports the radius
it used on this step there (not averaged; the loop logs it as ``eps``), in the units of the method's own
parameter: the scheduled ``training_params:epsilon`` (``state.eps``) for IBP/CROWN-IBP, ``method_params:epsilon``
for pgd, trades (L-inf or L2 per ``distance``), trades_rs (L2) and lfr, and for smoothadv the L2 radius on
[0, 1] pixels after the warm-up (``method_params:epsilon``'s units; SmoothAdv's train_pgd.py takes 1/256
units, 64 -> 0.25). Methods without a radius leave it out, so no misleading 0 is logged.
``METHOD_DEFAULTS[name]`` are the method's parameters, filled into ``method_params``
before command-line overrides, so they are the valid override keys.

Methods whose library part is not in this installation are registered through :func:`placeholder`: calling
them raises :class:`MethodUnavailable` naming the missing module (``robustkern train`` exits 4).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import ConfigError, MethodUnavailable, library_part

__all__ = ["LOSSES", "METHOD_DEFAULTS", "StepState", "EpsilonScheduler", "register_loss", "fill_method_defaults",
           "check_available", "probe_bound_method", "bounded_module"]

LossFn = Callable[..., tuple]
LOSSES: dict[str, LossFn] = {}
METHOD_DEFAULTS: dict[str, dict] = {}
_REQUIRES: dict[str, tuple[str, tuple[str, ...]]] = {}  # method -> (module, attributes) it needs


@dataclass
class StepState:
    """What a loss may know about where training is. ``eps`` is the certified-training schedule's epsilon
    (IBP/CROWN-IBP); methods with their own radius ignore it. ``cache`` persists across steps (not
    checkpointed)."""
    epoch: int = 0
    batch_idx: int = 0
    steps_per_epoch: int = 1
    eps: float = 0.0
    max_eps: float = 0.0
    cache: dict = field(default_factory=dict)


def register_loss(name: str, defaults: dict | None = None, requires: tuple[str, tuple[str, ...]] | None = None):
    def deco(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        METHOD_DEFAULTS[name] = dict(defaults or {})
        if requires:
            _REQUIRES[name] = requires
        return fn
    return deco


def placeholder(name: str, module: str, attrs: tuple[str, ...], what: str, defaults: dict | None = None) -> None:
    """Register a method whose implementation lives in a robustkern library part not wired into the app yet."""

    def missing(model, x, y, cfg, state):
        raise MethodUnavailable(_unavailable_message(name, module, attrs, what))

    missing.placeholder = True  # type: ignore[attr-defined]
    register_loss(name, defaults, (module, attrs))(missing)


def _unavailable_message(name: str, module: str, attrs: tuple[str, ...], what: str) -> str:
    try:
        present = importlib.util.find_spec(module) is not None
    except ImportError:
        present = False
    if not present:
        return (f"training method '{name}' ({what}) needs {module} ({', '.join(attrs)}), which is not available "
                f"in this installation of robustkern yet")
    return (f"training method '{name}' ({what}): {module} is present but this version of the app does not wire "
            f"its {', '.join(attrs)} into training yet (python/robustkern_cli/losses.py)")


def check_available(method: str, cfg: dict | None = None) -> None:
    """Raise ConfigError for an unknown method, MethodUnavailable when its library part is missing (checked
    before any data is loaded, so a run fails in seconds rather than after the first epoch's data loading)."""
    if method not in LOSSES:
        raise ConfigError(f"unknown training method '{method}'; known: {', '.join(sorted(LOSSES))}")
    fn = LOSSES[method]
    if method in _REQUIRES:
        module, attrs = _REQUIRES[method]
        if getattr(fn, "placeholder", False):
            fn(None, None, None, None, None)
        library_part(module, *attrs, purpose=f"training method '{method}'")
    if fn is _ibp_family and cfg is not None:
        bound_type = cfg["training_params"]["method_params"].get("bound_type")
        if method == "crown_ibp" and bound_type != "crown-interval":
            raise ConfigError(f"training method 'crown_ibp' needs method_params:bound_type=crown-interval, got "
                              f"'{bound_type}' (use method 'ibp' for pure IBP)")
        if bound_type == "crown-interval":
            probe_bound_method("CROWN-IBP", f"training method '{method}' with bound_type crown-interval")


def probe_bound_method(method: str, purpose: str) -> None:
    """Raise MethodUnavailable if robustkern.bounds cannot compute ``method`` bounds (on a 4-3 linear map)."""
    bounds = library_part("robustkern.bounds", "BoundedModule", "margin_spec", purpose=purpose)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.zeros(1, 4)
    try:
        bm = bounds.BoundedModule(net, x)
        bm.compute_bounds(x, 0.1, method=method, C=bounds.margin_spec(torch.zeros(1, dtype=torch.long), 3))
    except NotImplementedError as exc:
        raise MethodUnavailable(f"{purpose} needs robustkern.bounds method '{method}': {exc}") from None


def fill_method_defaults(cfg: dict) -> None:
    """Add the chosen training method's default parameters to ``training_params:method_params``."""
    tp = cfg.get("training_params", {})
    for k, v in METHOD_DEFAULTS.get(tp.get("method"), {}).items():
        tp.setdefault("method_params", {}).setdefault(k, v)


# --------------------------------------------------------------------------------------------- eps schedule
class EpsilonScheduler:
    """CROWN-IBP's ``EpsilonScheduler`` (huanzhang12/CROWN-IBP eps_scheduler.py, itself DeepMind's
    ``linear_schedule``/``smooth_schedule``): eps goes from ``init_value`` at step ``init_step`` to
    ``final_value`` at ``final_step``, steps counted as ``epoch * steps_per_epoch + step``.

    ``"linear"``; ``"smoothed"``: a ``x**beta`` ramp up to ``mid_point`` of the way, then linear;
    ``"linear_epoch"``: eps constant within an epoch, ``init + (final-init) * min(1, (epoch-start+1)/length)``
    (Shaeiri et al.'s IAT curriculum: 0.01 per epoch for 40 epochs).
    """

    def __init__(self, schedule_type: str, start_epoch: int, length: int, init_value: float, final_value: float,
                 steps_per_epoch: int, mid_point: float = 0.25, beta: float = 4.0):
        if schedule_type not in ("linear", "smoothed", "linear_epoch"):
            raise ConfigError(f"schedule_type must be linear, smoothed or linear_epoch, got '{schedule_type}'")
        if final_value < init_value:
            raise ConfigError(f"epsilon ({final_value}) must be >= starting_epsilon ({init_value})")
        self.type, self.start, self.length = schedule_type, start_epoch, max(int(length), 1)
        self.init_value, self.final_value = float(init_value), float(final_value)
        self.steps = max(int(steps_per_epoch), 1)
        self.init_step = start_epoch * self.steps
        self.final_step = (start_epoch + self.length - 1) * self.steps
        self.mid_point, self.beta = mid_point, beta

    def get_eps(self, epoch: int, step: int) -> float:
        if self.type == "linear_epoch":
            frac = min(max((epoch - self.start + 1) / self.length, 0.0), 1.0)
            return self.init_value + frac * (self.final_value - self.init_value)
        t = epoch * self.steps + step
        if self.type == "smoothed":
            return self._smooth(t)
        return self._linear(t, self.init_step, self.final_step, self.init_value, self.final_value)

    @staticmethod
    def _linear(t, t0, t1, v0, v1) -> float:
        if t1 == t0:
            return v1
        rate = min(max((t - t0) / (t1 - t0), 0.0), 1.0)
        return v0 + rate * (v1 - v0)

    def _smooth(self, t) -> float:
        t0, t1, v0, v1, beta = self.init_step, self.final_step, self.init_value, self.final_value, self.beta
        mid = int((t1 - t0) * self.mid_point) + t0
        if mid <= t0:
            alpha = 1.0
        else:
            p = (mid - t0) ** (beta - 1.0)
            alpha = (v1 - v0) / ((t1 - mid) * beta * p + (mid - t0) * p)
        mid_value = alpha * (mid - t0) ** beta + v0
        if t <= t0:
            return v0
        if t < mid:
            return v0 + alpha * float(t - t0) ** beta
        return self._linear(t, mid, t1, mid_value, v1)


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
    sm = library_part("robustkern.smoothing", "gaussian_augment", purpose="training method 'gaussian'")
    sigma = float(cfg["training_params"]["method_params"]["sigma"])
    logits = model(sm.gaussian_augment(x, sigma, seed=_noise_seed()))
    loss = F.cross_entropy(logits, y)
    return loss, {"loss": loss.item(), "acc": _accuracy(logits, y)}


def _noise_seed() -> int:
    """Seed of the counter-based noise of one loss call (robustkern.smoothing.augment), drawn from torch's
    global generator: the training loop seeds it per run (and per rank) and checkpoints it, so the noise replays
    on resume, and the noise itself comes from the fused counter-based kernel."""
    return int(torch.randint(0, 2 ** 62, (1,)).item())


_IBP_DEFAULTS = {"init_kappa": 1.0, "final_kappa": 0.5, "final_beta": 0.0, "bound_type": "interval"}


def bounded_module(bounds, model, example, purpose: str):
    """``bounds.BoundedModule(model, example)``; a layer the library cannot bound yet is MethodUnavailable."""
    unsupported = getattr(bounds, "UnsupportedLayerError", None)
    try:
        return bounds.BoundedModule(model, example)
    except Exception as exc:
        if unsupported is not None and isinstance(exc, unsupported):
            raise MethodUnavailable(f"{purpose}: robustkern.bounds cannot bound this model yet: {exc}") from None
        raise


def _ibp_family(model, x, y, cfg, state):
    """IBP / CROWN-IBP certified training (Gowal et al. 2018; Zhang et al. 2020, CROWN-IBP train.py).

    ``kappa = init_kappa + (final_kappa - init_kappa) * eps / max_eps`` mixes natural and robust CE,
    ``loss = kappa * CE(f(x), y) + (1 - kappa) * robust_CE(lb)``; with ``bound_type = "crown-interval"`` the
    margin lower bound is ``beta * lb_CROWN-IBP + (1 - beta) * lb_IBP``, ``beta = 1 - (1 - final_beta) * eps /
    max_eps`` (CROWN-IBP's defaults: kappa 1 -> 0.5, beta 1 -> 0), by ``robustkern.bounds.crown_ibp_loss``: the
    clean forward runs first and its BatchNorm statistics serve the bounds, IBP runs once, and the bounds are
    not widened for rounding (``sound=False``: training needs no certificate). While eps is 0 the robust term is the natural cross-entropy (the
    two agree at eps 0) and no bounds are computed, as CROWN-IBP switches to natural training then.
    """
    bounds = library_part("robustkern.bounds", "BoundedModule", "crown_ibp_loss", purpose="training method 'ibp'")
    tp = cfg["training_params"]
    mp = tp["method_params"]
    bound_type = mp["bound_type"]
    if bound_type not in ("interval", "crown-interval"):
        raise ConfigError(f"method_params:bound_type must be 'interval' or 'crown-interval', got '{bound_type}'")
    eps, max_eps = state.eps, state.max_eps
    frac = eps / max_eps if max_eps > 0 else 1.0
    kappa = mp["init_kappa"] + (mp["final_kappa"] - mp["init_kappa"]) * frac
    beta = 1.0 - (1.0 - mp["final_beta"]) * frac if bound_type == "crown-interval" else 0.0

    key = ("bounded", id(model))
    bm = state.cache.get(key)
    if bm is None:
        bm = state.cache[key] = bounded_module(bounds, model, x[:1], f"training method '{tp['method']}'")
    norm = float(tp["norm"])
    if eps < torch.finfo(torch.float32).tiny:  # CROWN-IBP trains naturally while eps is 0: no bounds to compute
        logits = bm(x)
        natural = F.cross_entropy(logits, y)
        robust = natural
        verified = _accuracy(logits, y)
        loss = kappa * natural + (1.0 - kappa) * robust
    else:   # one clean forward (its BatchNorm statistics serve the bounds), IBP once, CROWN-IBP when beta > 0
        loss, info = bounds.crown_ibp_loss(bm, x, y, eps, beta=beta if beta > 1e-5 else 0.0, kappa=kappa,
                                           norm=norm, x_min=0.0, x_max=1.0, sound=False)
        logits, natural, robust = info["logits"], info["natural"], info["robust"]
        verified = (info["lb"] > 0).all(dim=1).float().mean().item()
    return loss, {"loss": loss.item(), "acc": _accuracy(logits, y), "natural_ce": natural.item(),
                  "robust_ce": robust.item(), "verified_acc": verified, "eps": eps, "kappa": kappa, "beta": beta}


register_loss("ibp", _IBP_DEFAULTS, ("robustkern.bounds", ("BoundedModule", "crown_ibp_loss")))(_ibp_family)
register_loss("crown_ibp", dict(_IBP_DEFAULTS, bound_type="crown-interval"),
              ("robustkern.bounds", ("BoundedModule", "crown_ibp_loss")))(_ibp_family)

# Methods whose algorithms belong to library parts that do not exist yet (DESIGN.md: robustkern/smoothing,
# attacks, flatness). Their recipes in python/configs carry the published parameters.
@register_loss("macer", {"sigma": 0.25, "gauss_num": 16, "lbd": 12.0, "gamma": 8.0, "beta": 16.0, "deferred": False},
               ("robustkern.smoothing", ("macer_loss",)))
def _macer(model, x, y, cfg, state):
    """MACER (Zhai et al. 2020, RuntianZ/macer): ``(CL + lbd RL) / B`` over ``gauss_num`` noisy copies per image
    in one forward (robustkern.smoothing.macer_loss). ``deferred``: lbd = 0 until the first LR decay (the first
    ``lr_milestones`` entry, or ``lr_step``), jh-jeong/smoothing-consistency ``train_macer.py --deferred``."""
    smoothing = library_part("robustkern.smoothing", "macer_loss", purpose="training method 'macer'")
    tp = cfg["training_params"]
    mp = tp["method_params"]
    lbd = float(mp["lbd"])
    if mp["deferred"]:
        milestones = list(tp.get("lr_milestones") or [])
        first_decay = milestones[0] if tp.get("lr_schedule") == "multistep" and milestones else (
            tp.get("lr_step") if tp.get("lr_schedule") in ("step", "step_after_ramp") else 0)
        if not first_decay:
            raise ConfigError("method_params:deferred=true needs an LR decay to wait for: lr_schedule=multistep "
                              "with lr_milestones, or lr_schedule=step with lr_step > 0")
        if state.epoch < int(first_decay):
            lbd = 0.0
    loss, cl, rl = smoothing.macer_loss(model, x, y, float(mp["sigma"]), int(mp["gauss_num"]), lbd,
                                        float(mp["gamma"]), float(mp["beta"]))
    return loss, {"loss": loss.item(), "classification": cl.item(), "robustness": rl.item(), "lbd": lbd}




@register_loss("smoothadv", {"sigma": 0.12, "attack": "PGD", "epsilon": 0.25, "num_steps": 10, "num_noise_vec": 2,
                             "train_multi_noise": True, "warmup": 10},
               ("robustkern.smoothing", ("smoothadv_loss", "smoothadv_warmup_eps")))
def _smoothadv(model, x, y, cfg, state):
    """SmoothAdv (Salman et al. 2019, train_pgd.py --adv-training --attack PGD): PGD-L2 on the soft smoothed
    classifier with ``num_noise_vec`` noise draws, epsilon (pixel L2 units) warmed up over ``warmup`` epochs,
    CE on the adversarial noisy copies. One optimizer step per batch: the original's step is on 256/m images."""
    sm = library_part("robustkern.smoothing", "smoothadv_loss", "smoothadv_warmup_eps",
                      purpose="training method 'smoothadv'")
    mp = cfg["training_params"]["method_params"]
    if mp["attack"] != "PGD":
        raise ConfigError(f"method_params:attack must be 'PGD' (SmoothAdv's DDN attack is not implemented), got "
                          f"'{mp['attack']}'")
    eps = sm.smoothadv_warmup_eps(state.epoch, int(mp["warmup"]), float(mp["epsilon"]))
    loss, parts = sm.smoothadv_loss(model, x, y, float(mp["sigma"]), eps, int(mp["num_steps"]),
                                    int(mp["num_noise_vec"]), train_multi_noise=bool(mp["train_multi_noise"]),
                                    seed=_noise_seed())
    logits = parts["logits"]  # (B, m, K) with multi-noise, else (B, K)
    copies = logits.shape[1] if logits.dim() == 3 else 1
    acc = _accuracy(logits.reshape(-1, logits.shape[-1]), y.repeat_interleave(copies))
    return loss, {"loss": loss.item(), "acc": acc, "eps": eps}


@register_loss("trades_rs", {"sigma": 0.12, "epsilon": 0.435, "num_steps": 10, "beta": 6.0, "distance": "l_2"},
               ("robustkern.smoothing", ("trades_rs_loss",)))
def _trades_rs(model, x, y, cfg, state):
    """TRADES + random smoothing (Blum et al. 2020, trades.py distance='l_2'): one noise draw shared by
    CE(f(x+n), y) and beta * KL(f(x+n) || f(x'+n)) at the L2 PGD maximiser x' (step 2 eps / num_steps)."""
    sm = library_part("robustkern.smoothing", "trades_rs_loss", purpose="training method 'trades_rs'")
    mp = cfg["training_params"]["method_params"]
    if mp["distance"] != "l_2":
        raise ConfigError(f"method_params:distance must be 'l_2' for trades_rs, got '{mp['distance']}'")
    loss, parts = sm.trades_rs_loss(model, x, y, float(mp["sigma"]), float(mp["epsilon"]),
                                    num_steps=int(mp["num_steps"]), beta=float(mp["beta"]),
                                    seed=_noise_seed())
    return loss, {"loss": loss.item(), "acc": _accuracy(parts["logits"], y), "natural_ce": parts["natural"].item(),
                  "robust_kl": parts["robust"].item(), "eps": float(mp["epsilon"])}


@register_loss("consistency", {"sigma": 0.25, "num_noise_vec": 2, "lbd": 20.0, "eta": 0.5},
               ("robustkern.smoothing", ("consistency_loss",)))
def _consistency(model, x, y, cfg, state):
    """Consistency regularisation (Jeong & Shin 2020, train_consistency.py): CE over ``num_noise_vec`` noisy
    copies + lbd * mean KL(p_mean || p_j) + eta * H(p_mean). Defaults: the paper's CIFAR-10 sigma 0.25 recipe
    (m 2, lbd 20, eta 0.5; lbd 10 for sigma 0.5 and 1.0). One optimizer step per batch of 256/m images."""
    sm = library_part("robustkern.smoothing", "consistency_loss", purpose="training method 'consistency'")
    mp = cfg["training_params"]["method_params"]
    loss, parts = sm.consistency_loss(model, x, y, float(mp["sigma"]), int(mp["num_noise_vec"]), float(mp["lbd"]),
                                      float(mp["eta"]), seed=_noise_seed())
    logits = parts["logits"]
    acc = _accuracy(logits.reshape(-1, logits.shape[-1]), y.repeat_interleave(logits.shape[1]))
    return loss, {"loss": loss.item(), "acc": acc, "xent": parts["xent"].item(),
                  "consistency": parts["consistency"].item()}


_PGD_DEFAULTS = {"epsilon": 0.3, "step_size": 0.01, "num_steps": 40, "random_start": True, "steps_rule": "fixed",
                 "norm": "linf"}


@register_loss("pgd", _PGD_DEFAULTS, ("robustkern.attacks", ("pgd_at_loss", "madry_steps")))
def _pgd_at(model, x, y, cfg, state):
    """Madry et al. 2018 PGD adversarial training: cross-entropy at the PGD point of the ball.
    ``steps_rule = "madry"`` sets the steps to ``int(2.5 eps / step_size)`` (Shaeiri et al.'s IAT rule)."""
    attacks = library_part("robustkern.attacks", "pgd_at_loss", "madry_steps", purpose="training method 'pgd'")
    mp = cfg["training_params"]["method_params"]
    if mp["steps_rule"] not in ("fixed", "madry"):
        raise ConfigError(f"method_params:steps_rule must be 'fixed' or 'madry', got '{mp['steps_rule']}'")
    eps, alpha = mp["epsilon"], mp["step_size"]
    steps = mp["num_steps"] if mp["steps_rule"] == "fixed" else attacks.madry_steps(eps, alpha)
    loss = attacks.pgd_at_loss(model, x, y, eps, alpha, steps, norm=mp["norm"], random_start=mp["random_start"])
    return loss, {"loss": loss.item(), "eps": float(eps), "steps": steps}


@register_loss("trades", {"epsilon": 0.031, "step_size": 0.007, "num_steps": 10, "beta": 6.0,
                          "distance": "l_inf"}, ("robustkern.attacks", ("trades_loss",)))
def _trades(model, x, y, cfg, state):
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta KL(f(x) || f(x')) at the inner maximiser x'."""
    attacks = library_part("robustkern.attacks", "trades_loss", purpose="training method 'trades'")
    mp = cfg["training_params"]["method_params"]
    loss = attacks.trades_loss(model, x, y, step_size=mp["step_size"], epsilon=mp["epsilon"],
                               perturb_steps=mp["num_steps"], beta=mp["beta"], distance=mp["distance"])
    return loss, {"loss": loss.item(), "eps": float(mp["epsilon"])}


@register_loss("lfr", {"epsilon": 0.3, "step_size": 0.01, "num_steps": 40, "lambada": 0.02, "norm": "l_inf"},
               ("robustkern.flatness", ("lfr_loss",)))
def _lfr(model, x, y, cfg, state):
    """Local flatness regularisation (Xu et al. 2020): CE(f(x), y) + lambada * mean ||grad_x CE(f(x'))||_1 at
    the point x' of the eps-ball where num_steps sign steps (model in eval mode) made the input-gradient norm
    large (``robustkern.flatness.lfr_loss``; BatchNorm running statistics updated by the clean forward only)."""
    flatness = library_part("robustkern.flatness", "lfr_loss", purpose="training method 'lfr'")
    mp = cfg["training_params"]["method_params"]
    if mp["norm"] not in ("l_inf", "l_2"):
        raise ConfigError(f"method_params:norm must be 'l_inf' or 'l_2', got '{mp['norm']}'")
    loss, natural, grad_norm = flatness.lfr_loss(model, x, y, epsilon=mp["epsilon"], step_size=mp["step_size"],
                                                 perturb_steps=int(mp["num_steps"]), lam=mp["lambada"],
                                                 norm=mp["norm"])
    return loss, {"loss": loss.item(), "natural_ce": natural.item(), "loss_grad": grad_norm.item(),
                  "eps": float(mp["epsilon"])}


@register_loss("grad_norm", {"lam": 0.1, "p": 2, "power": 2, "method": "double_backprop", "h": 0.0},
               ("robustkern.flatness", ("input_grad_norm",)))
def _grad_norm(model, x, y, cfg, state):
    """Input-gradient-norm regularisation: ``CE(f(x), y) + lam * mean_i ||grad_x CE(f(x_i), y_i)||_p ** power``
    (double backpropagation, Drucker & LeCun 1992; Ross & Doshi-Velez 2018 with p = power = 2; Finlay & Oberman
    2021 by finite differences, ``method = "finite_difference"`` with step ``h``, 0 = the library's default).
    The clean loss reuses the forward of ``robustkern.flatness.input_grad_norm``."""
    flatness = library_part("robustkern.flatness", "input_grad_norm", purpose="training method 'grad_norm'")
    mp = cfg["training_params"]["method_params"]
    for key, allowed in (("p", (1, 2)), ("power", (1, 2)), ("method", ("double_backprop", "finite_difference"))):
        if mp[key] not in allowed:
            raise ConfigError(f"method_params:{key} must be one of {allowed}, got {mp[key]!r}")
    if mp["h"] < 0 or (mp["h"] > 0 and mp["method"] != "finite_difference"):
        raise ConfigError(f"method_params:h is the finite-difference step (>= 0, 0 = default), got {mp['h']!r}")
    norms, logits = flatness.input_grad_norm(model, x, y, p=int(mp["p"]), method=mp["method"],
                                             h=float(mp["h"]) or None, return_logits=True)
    natural = F.cross_entropy(logits, y)
    penalty = norms.pow(mp["power"]).mean()
    loss = natural + mp["lam"] * penalty
    return loss, {"loss": loss.item(), "acc": _accuracy(logits, y), "natural_ce": natural.item(),
                  "grad_penalty": penalty.item()}


placeholder("crown_ibp_ours", "robustkern.bounds", ("optimized_slopes",),
            "CROWN-IBP with one-step optimised ReLU slopes, Lee et al. 2021 'Loss Landscape Matters'",
            {"final_kappa": 0.0, "final_beta": 1.0, "slope_init": "uniform", "slope_step": 2.0})
