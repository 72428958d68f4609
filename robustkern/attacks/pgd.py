"""Projected gradient descent (PGD) and FGSM attacks (Madry et al. 2018, "Towards Deep Learning Models
Resistant to Adversarial Attacks"; Goodfellow et al. 2015; FGSM with random start: Wong et al. 2020).

PGD maximises a per-example objective ``L(f(x'), y)`` over the ball ``B(x, eps) = {x' : |x' - x|_p <= eps}``
intersected with [0, 1]:

    x_0     = x + u,  u uniform in the L-inf ball, or (L2) a Gaussian direction scaled to radius r ~ U(0, eps)
    x_{k+1} = clip_[0,1]( Pi_B( x_k + alpha * s_k ) ),   s_k = sign(g_k) (L-inf) or g_k / |g_k|_2 (L2)
    g_k     = d/dx' sum_b L(f(x'_b), y_b)  at x_k

Each step is the fused op ``robustkern.ops.pgd_step`` (on CPU its C++ kernel, or its reference function when
there is none, called directly: the loop needs no autograd through the step). Only the input gradient is computed
(``torch.autograd.grad`` w.r.t. the input: no weight gradients are formed or accumulated, parameters'
``requires_grad`` is left alone). With ``restarts = R > 1`` the R random starts are stacked along the batch
and attacked in one forward/backward per step (``batch_restarts=True``); per example the first restart that
succeeds is kept, else the one with the largest objective. ``cuda_graph=True`` captures the whole k-step
loop as a CUDA graph (CUDA tensors only; replayed for later calls with the same shapes, model and settings).

Objectives (maximised): ``ce`` = cross-entropy; ``margin`` = ``max_{j != y} z_j - z_y`` (Carlini-Wagner).
With ``targeted=True``, ``y`` holds the target classes and the objectives are ``-CE(z, t)`` and
``z_t - max_{j != t} z_j``. The functions leave the model's train/eval mode as it is; the torchattacks-style
classes (``PGD``, ``PGDL2``, ``FGSM``) run the model in eval mode and restore each module's mode after.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cuda_graphs import storage_key
from ..ops.attacks import PGD_STEP

__all__ = ["pgd", "fgsm", "attack_objective", "Attack", "PGD", "PGDL2", "FGSM"]

LOSSES = ("ce", "margin")
NORMS = ("linf", "l2")


# ----------------------------------------------------------------------------------------------- checks
def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_budget(fn: str, x: Tensor, y: Tensor, eps, alpha=None, steps: int | None = None, norm: str = "linf",
                 restarts: int = 1, loss: str = "ce") -> None:
    """Raise ValueError/TypeError with a message naming the argument for malformed attack inputs."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError(f"{fn}: x must be a floating-point tensor (B, ...), got "
                        f"{type(x).__name__ if not isinstance(x, Tensor) else (x.dtype, tuple(x.shape))}")
    if not isinstance(y, Tensor) or y.dtype not in (torch.int64, torch.int32) or y.shape != (x.shape[0],):
        raise ValueError(f"{fn}: y must be an integer tensor of shape ({x.shape[0]},), got "
                         f"{y.dtype if isinstance(y, Tensor) else type(y).__name__} "
                         f"{tuple(y.shape) if isinstance(y, Tensor) else ''}")
    if norm not in NORMS:
        raise ValueError(f"{fn}: norm must be one of {NORMS}, got {norm!r}")
    if loss not in LOSSES:
        raise ValueError(f"{fn}: loss must be one of {LOSSES}, got {loss!r}")
    for name, v, strict in (("eps", eps, False), ("alpha", alpha, True)):
        if v is None:
            continue
        if _is_number(v):  # the usual case, checked without making tensors
            if (v <= 0 if strict else v < 0) or not math.isfinite(v):
                raise ValueError(f"{fn}: {name} must be {'> 0' if strict else '>= 0'} and finite, got {v}")
            continue
        t = torch.as_tensor(v)
        if not t.is_floating_point() and not _is_number(v):
            raise TypeError(f"{fn}: {name} must be a float or a tensor, got {type(v).__name__}")
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != x.shape[0]):
            raise ValueError(f"{fn}: {name} must be a float or a ({x.shape[0]},) tensor, got shape {tuple(t.shape)}")
        bad = (t <= 0) if strict else (t < 0)
        if bool(bad.any()) or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{fn}: {name} must be {'> 0' if strict else '>= 0'} and finite, got {v}")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 0):
        raise ValueError(f"{fn}: steps must be an int >= 0, got {steps!r}")
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"{fn}: restarts must be an int >= 1, got {restarts!r}")


def check_labels(fn: str, y: Tensor, num_classes: int, what: str = "label") -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{fn}: {what}s must lie in [0, {num_classes - 1}] (the model has {num_classes} "
                         f"outputs), got values in [{int(y.min())}, {int(y.max())}]")


def _per_row(v, x: Tensor) -> Tensor:
    t = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return (t.expand(x.shape[0]) if t.dim() == 0 else t).contiguous()


def _rows(v: Tensor, ndim: int) -> Tensor:
    return v.reshape((-1,) + (1,) * (ndim - 1))


# ----------------------------------------------------------------------------------------------- objectives
def attack_objective(logits: Tensor, y: Tensor, loss: str = "ce", targeted: bool = False) -> Tensor:
    """Per-example objective the attack maximises (module docstring)."""
    if loss == "ce":
        ce = F.cross_entropy(logits, y, reduction="none")
        return -ce if targeted else ce
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return z_y - others if targeted else others - z_y


def _success(logits: Tensor, y: Tensor, targeted: bool) -> Tensor:
    pred = logits.argmax(1)
    return pred == y if targeted else pred != y


def random_start_point(x: Tensor, eps: Tensor, norm: str) -> Tensor:
    """A uniform point of the L-inf ball, or (L2) a Gaussian direction at radius ``r ~ U(0, eps)``, in [0, 1]."""
    e = _rows(eps, x.dim())
    if norm == "linf":  # clamp(x + (2u - 1) e, 0, 1), in place on u's buffer (the same roundings)
        return torch.rand_like(x).mul_(2).sub_(1).mul_(e).add_(x).clamp_(0, 1)
    d = torch.randn_like(x)
    n = _rows(torch.linalg.vector_norm(d.reshape(x.shape[0], -1), dim=1), x.dim()).clamp_min(1e-12)
    r = torch.rand_like(n)
    return (x + d / n * r * e).clamp(0, 1)


# ----------------------------------------------------------------------------------------------- the loop
def _objective_sum(logits: Tensor, y: Tensor, loss: str, targeted: bool) -> Tensor:
    """``attack_objective(...).sum()``; for CE as one ``reduction="sum"`` call, which has the same input
    gradient bit for bit (NLL's backward writes ``-1`` at the label either way) without the per-example
    losses and the extra ``sum`` node (tests/test_attacks_cpp.py checks the attack is unchanged)."""
    if loss == "ce":
        total = F.cross_entropy(logits, y, reduction="sum")
        return -total if targeted else total
    return attack_objective(logits, y, loss, targeted).sum()


def _steps(model, x, y, adv, eps, alpha, steps, norm, loss, targeted, check=True):
    step = PGD_STEP      # the op itself: the inputs were checked once above, the loop only calls it
    eps, alpha = eps.detach(), alpha.detach()
    for i in range(steps):
        adv = adv.detach().requires_grad_(True)
        logits = model(adv)
        if check and i == 0:
            check_labels("pgd", y, logits.shape[1], "target" if targeted else "label")
        grad, = torch.autograd.grad(_objective_sum(logits, y, loss, targeted), adv)
        adv = step(adv.detach(), grad, x, eps, alpha, norm)
    return adv.detach()


_GRAPHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _GraphedLoop:
    """The k-step loop captured once as a CUDA graph on static buffers; ``run`` copies inputs in and replays."""

    def __init__(self, model, x, y, adv, eps, alpha, steps, norm, loss, targeted):
        self.bufs = [t.clone() for t in (x, y, adv, eps, alpha)]
        args = (steps, norm, loss, targeted)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (cuDNN/cuBLAS workspaces, lazy init)
            bx, by, badv, be, ba = self.bufs
            _steps(model, bx, by, badv, be, ba, *args)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            bx, by, badv, be, ba = self.bufs
            self.out = _steps(model, bx, by, badv, be, ba, *args, check=False)

    def run(self, *tensors):
        for buf, t in zip(self.bufs, tensors):
            buf.copy_(t)
        self.graph.replay()
        return self.out.clone()


GRAPHS_PER_MODEL = 4   # captured loops kept per model (each holds a CUDA graph and its memory pool)


def graph_key(model, x: Tensor, steps: int, norm: str, loss: str, targeted: bool) -> tuple:
    """What a captured loop depends on besides the values copied into its static buffers: the shapes and
    settings, the train/eval mode, and where every parameter and buffer lives (a graph reads the addresses it
    was captured with: in-place updates such as ``optimizer.step()`` or ``load_state_dict`` are seen by a
    replay, but a model moved or re-created by ``.to()``/``.half()`` gets a new capture, not stale memory)."""
    return (tuple(x.shape), x.dtype, x.device, steps, norm, loss, targeted, model.training,
            storage_key(model))


def _loop(model, x, y, adv, eps, alpha, steps, norm, loss, targeted, cuda_graph):
    if not (cuda_graph and x.is_cuda and steps > 0):
        return _steps(model, x, y, adv, eps, alpha, steps, norm, loss, targeted)
    key = graph_key(model, x, steps, norm, loss, targeted)
    cache = _GRAPHS.setdefault(model, {})
    if key not in cache:
        while len(cache) >= GRAPHS_PER_MODEL:   # oldest capture first (dicts keep insertion order)
            del cache[next(iter(cache))]
        cache[key] = _GraphedLoop(model, x, y, adv, eps, alpha, steps, norm, loss, targeted)
    return cache[key].run(x, y, adv, eps, alpha)


def _select(obj: Tensor, succ: Tensor, restarts: int, b: int) -> Tensor:
    """Index (restart) per example: the first successful restart, else the largest objective."""
    score = torch.where(succ, torch.full_like(obj, math.inf), obj).reshape(restarts, b)
    return score.argmax(0)


@torch.no_grad()
def _evaluate(model, adv, y, loss, targeted):
    z = model(adv)
    check_labels("pgd", y, z.shape[1], "target" if targeted else "label")
    return attack_objective(z, y, loss, targeted), _success(z, y, targeted)


def pgd(model, x: Tensor, y: Tensor, eps, alpha, steps: int, norm: str = "linf", random_start: bool = True,
        restarts: int = 1, loss: str = "ce", targeted: bool = False, *, batch_restarts: bool = True,
        cuda_graph: bool = False) -> Tensor:
    """PGD (module docstring). ``x`` (B, ...) in [0, 1]; ``y`` (B,) labels (targets when ``targeted``);
    ``eps >= 0``, ``alpha > 0`` floats or (B,) tensors; ``steps >= 0``. Returns adversarial examples inside
    the ``norm`` ball of radius ``eps`` around ``x`` and inside [0, 1] (detached)."""
    check_budget("pgd", x, y, eps, alpha, steps, norm, restarts, loss)
    x = x.detach()
    b = x.shape[0]
    if b == 0:
        return x.clone()
    eps_t, alpha_t = _per_row(eps, x), _per_row(alpha, x)
    if restarts == 1:
        start = random_start_point(x, eps_t, norm) if random_start else x.clone()
        return _loop(model, x, y, start, eps_t, alpha_t, steps, norm, loss, targeted, cuda_graph)
    if batch_restarts:
        rep = (restarts,) + (1,) * (x.dim() - 1)
        xr, yr = x.repeat(rep), y.repeat(restarts)
        er, ar = eps_t.repeat(restarts), alpha_t.repeat(restarts)
        start = random_start_point(xr, er, norm) if random_start else xr.clone()
        advs = _loop(model, xr, yr, start, er, ar, steps, norm, loss, targeted, cuda_graph)
        obj, succ = _evaluate(model, advs, yr, loss, targeted)
    else:
        runs = []
        for _ in range(restarts):
            start = random_start_point(x, eps_t, norm) if random_start else x.clone()
            runs.append(_loop(model, x, y, start, eps_t, alpha_t, steps, norm, loss, targeted, cuda_graph))
        advs = torch.cat(runs)
        obj, succ = _evaluate(model, advs, y.repeat(restarts), loss, targeted)
    pick = _select(obj, succ, restarts, b)
    return advs.reshape((restarts, b) + x.shape[1:])[pick, torch.arange(b, device=x.device)]


def fgsm(model, x: Tensor, y: Tensor, eps, alpha=None, random_start: bool = False, norm: str = "linf",
         loss: str = "ce", targeted: bool = False) -> Tensor:
    """FGSM (Goodfellow et al. 2015): one projected step; with ``random_start`` the "fast" FGSM of Wong et al.
    2020 (uniform start, default step ``1.25 eps``). Without a random start the default step is ``eps``."""
    if alpha is None:
        e = torch.as_tensor(eps)
        alpha = (1.25 if random_start else 1.0) * (e if e.dim() else float(e))
        if bool((torch.as_tensor(alpha) == 0).all()):  # eps = 0: a zero step leaves x unchanged
            check_budget("fgsm", x, y, eps, None, 1, norm, 1, loss)
            return x.detach().clone()
    check_budget("fgsm", x, y, eps, alpha, 1, norm, 1, loss)
    return pgd(model, x, y, eps, alpha, 1, norm, random_start, 1, loss, targeted)


# ----------------------------------------------------------------------------------------------- classes
class Attack:
    """torchattacks-style base: ``atk = PGD(model, ...); adv = atk(images, labels)``. The model runs in eval
    mode during the attack (``set_model_training_mode(True)`` keeps its mode) and every module's mode is
    restored afterwards. ``set_mode_targeted_by_label()`` makes ``labels`` the target classes."""

    def __init__(self, model):
        self.model = model
        self.model_training = False
        self.targeted = False

    def set_model_training_mode(self, model_training: bool = False):
        self.model_training = model_training
        return self

    def set_mode_targeted_by_label(self):
        self.targeted = True
        return self

    def set_mode_default(self):
        self.targeted = False
        return self

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        modes = [(m, m.training) for m in self.model.modules()]
        if not self.model_training:
            self.model.eval()
        try:
            return self.forward(images, labels)
        finally:
            for m, t in modes:
                m.training = t

    def __repr__(self):
        keys = ", ".join(f"{k}={v}" for k, v in vars(self).items() if k != "model")
        return f"{type(self).__name__}({keys})"


class PGD(Attack):
    """L-inf PGD with torchattacks' signature and defaults (``eps=8/255, alpha=2/255, steps=10``)."""
    norm = "linf"

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True, *, restarts=1,
                 loss="ce", cuda_graph=False):
        super().__init__(model)
        self.eps, self.alpha, self.steps, self.random_start = eps, alpha, steps, random_start
        self.restarts, self.loss, self.cuda_graph = restarts, loss, cuda_graph

    def forward(self, images, labels):
        return pgd(self.model, images, labels, self.eps, self.alpha, self.steps, self.norm, self.random_start,
                   self.restarts, self.loss, self.targeted, cuda_graph=self.cuda_graph)


class PGDL2(PGD):
    """L2 PGD with torchattacks' signature and defaults (``eps=1.0, alpha=0.2, steps=10``)."""
    norm = "l2"

    def __init__(self, model, eps=1.0, alpha=0.2, steps=10, random_start=True, **kw):
        super().__init__(model, eps, alpha, steps, random_start, **kw)


class FGSM(Attack):
    """FGSM (``random_start=True``: Wong et al.'s fast FGSM with step ``alpha``, default ``1.25 eps``)."""

    def __init__(self, model, eps=8 / 255, alpha=None, random_start=False, norm="linf"):
        super().__init__(model)
        self.eps, self.alpha, self.random_start, self.norm = eps, alpha, random_start, norm

    def forward(self, images, labels):
        return fgsm(self.model, images, labels, self.eps, self.alpha, self.random_start, self.norm,
                    targeted=self.targeted)
