"""Faithful plain-PyTorch transcriptions of BCP's training step (sungyoon-lee/bcp @85defee ``BCP.py``) and of an
LMT step built from the same pieces: the independent ground truth that ``robustkern.bounds.bcp`` and
``robustkern.bounds.lipschitz`` are tested and benchmarked against.

* ``power_iteration_linear_reference`` / ``power_iteration_conv_reference``: BCP's ``power_iteration_evl`` and
  ``power_iteration_conv_evl``: ``steps`` rounds of the iteration from a kept iterate ``u`` (random when None),
  stopping early when the iterate moves by less than 1e-5, the estimate ``u^T A v`` computed through every round
  with autograd (the weights' gradient flows through the iteration).
* ``bcp_forward_reference``: ``net_BCP.forward`` on an ``nn.Sequential`` of Conv2d, Linear, ReLU, Flatten and
  BatchNorm2d: the ball (centre ``mu``, radius ``r``) and the box (``ibp_mu``, ``ibp_r``) up to the last layer,
  and the list of kept iterates.
* ``bcp_translation_reference``: ``BCP_translation``, the worst-case logit shifts of every class pair over
  ball and box by ``opt_iter`` rounds of clipping and rescaling (with its ``EPS`` guards).
* ``bcp_loss_reference``: ``BCP_loss`` without its ``bce``/``linfty`` options: the cross-entropy of the
  translated logits and its lower bounds of the margins ``z_y - z_j`` (B, K-1), in class order without ``y``.
* ``lmt_loss_reference``: Tsuzuku et al.'s LMT loss on BCP's pieces: ``L`` the product of the layers' power-
  iteration estimates (each kept iterate advanced ``steps`` rounds), the logits with ``sqrt(2) eps L`` added to
  every non-target logit, cross-entropy.

Deviations, none of which changes a value: tensors are created on the input's device and dtype (the original
calls ``.cuda()``), the random start iterates come from ``generator``, and BCP's NaN-to-zero of the translation
is kept.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["power_iteration_linear_reference", "power_iteration_conv_reference", "bcp_forward_reference",
           "bcp_translation_reference", "bcp_loss_reference", "lmt_loss_reference"]


def power_iteration_linear_reference(W: Tensor, steps: int, u: Tensor | None = None, generator=None):
    """BCP ``power_iteration_evl``: ``(estimate, u)``, ``u`` (out, 1) the output-side iterate."""
    if u is None:
        u = torch.randn((W.shape[0], 1), generator=generator).to(W)
    Wt = W.t()
    for i in range(steps):
        v = Wt.mm(u)
        v = v / v.norm(2)
        u_old = u
        u = W.mm(v)
        u = u / u.norm(2)
        if (u - u_old).norm(2) < 1e-5 or i + 1 == steps:
            break
    return u.t().mm(W).mm(v)[0][0], u


def power_iteration_conv_reference(in_shape: tuple, layer: nn.Conv2d, steps: int, u: Tensor | None = None,
                                   generator=None):
    """BCP ``power_iteration_conv_evl``: ``(estimate, u)``, ``u`` (1, *in_shape) the input-side iterate."""
    tiny = 1e-24
    W = layer.weight
    if u is None:
        u = torch.randn((1,) + tuple(in_shape), generator=generator).to(W)
    bias = torch.zeros_like(layer.bias) if layer.bias is not None else None
    out_pad = 0
    for i in range(steps):
        u1 = F.conv2d(u, W, bias, stride=layer.stride, padding=layer.padding)
        v = u1 / (u1.norm(2) + tiny)
        u_old = u
        v1 = F.conv_transpose2d(v, W, stride=layer.stride, padding=layer.padding, output_padding=out_pad)
        if v1.shape != u.shape:      # the transposed convolution's output size differs: pad by one
            out_pad = 1
            v1 = F.conv_transpose2d(v, W, stride=layer.stride, padding=layer.padding, output_padding=out_pad)
        u = v1 / (v1.norm(2) + tiny)
        if (u - u_old).norm(2) < 1e-5 or i + 1 == steps:
            break
    est = (v * F.conv2d(u, W, bias, stride=layer.stride, padding=layer.padding)).reshape(v.shape[0], -1).sum(1)[0]
    return est, u


def _bn_scale(layer, mu):
    if layer.training:
        mean = mu.mean(0).mean(-1).mean(-1).reshape(1, -1, 1, 1).detach()
        var = ((mu - mean) ** 2).mean(0).mean(-1).mean(-1).reshape(1, -1, 1, 1).detach()
    else:
        mean = layer.running_mean.detach().clone().reshape(1, -1, 1, 1)
        var = layer.running_var.detach().clone().reshape(1, -1, 1, 1)
    return mean, var


def _bn_apply(x, mean, var, weight, bias, eps):
    mult = torch.rsqrt(var + eps) * weight.reshape(1, -1, 1, 1)
    return mult * x + (-mult * mean + bias.reshape(1, -1, 1, 1))


def bcp_forward_reference(model: nn.Sequential, x: Tensor, eps: float, u_list: list | None = None, steps: int = 1,
                          generator=None):
    """``net_BCP.forward``: ``(mu, mu_prev, r_prev, ibp_mu_prev, ibp_r_prev, W, u_list)`` (no input clipping)."""
    b = x.shape[0]
    mu, r = x.clone(), eps * torch.ones(b, dtype=x.dtype, device=x.device)
    ibp_mu, ibp_r = mu, eps * torch.ones_like(x)
    layers = list(model.children())
    depth = len(layers)
    u_list = [None] * depth if u_list is None else u_list
    for i, layer in enumerate(layers):
        if i + 1 == depth:
            out = F.linear(mu, layer.weight, layer.bias)
            ibp_out = F.linear(ibp_mu, layer.weight.abs())
            return out, mu, r, ibp_out, ibp_mu, ibp_r, layer.weight, u_list
        if isinstance(layer, nn.Conv2d):
            conv = (lambda t, w, bias: F.conv2d(t, w, bias, layer.stride, layer.padding))
            in_shape = tuple(mu.shape[1:])
            ibp_mu = conv(ibp_mu, layer.weight, layer.bias)
            ibp_r = conv(ibp_r, layer.weight.abs(), None)
            ub, lb = ibp_mu + ibp_r, ibp_mu - ibp_r
            after = conv(mu, layer.weight, layer.bias)
            p, u = power_iteration_conv_reference(in_shape, layer, steps, u_list[i], generator)
            u_list[i] = u.data
            rows = layer.weight.reshape(layer.weight.shape[0], -1).norm(2, dim=-1)
            r1 = r.reshape(-1, 1, 1, 1) * torch.ones_like(after) * rows.reshape(1, -1, 1, 1)
            ub, lb = torch.min(ub, after + r1), torch.max(lb, after - r1)
            ibp_mu, ibp_r = (ub + lb) / 2, (ub - lb) / 2
            r, mu = r * p, after
        elif isinstance(layer, nn.Linear):
            ibp_mu = F.linear(ibp_mu, layer.weight, layer.bias)
            ibp_r = F.linear(ibp_r, layer.weight.abs())
            ub, lb = ibp_mu + ibp_r, ibp_mu - ibp_r
            after = F.linear(mu, layer.weight, layer.bias)
            p, u = power_iteration_linear_reference(layer.weight, steps, u_list[i], generator)
            u_list[i] = u.data
            r1 = r.reshape(b, 1) * layer.weight.norm(2, dim=-1).reshape(1, -1).repeat(b, 1)
            ub, lb = torch.min(ub, after + r1), torch.max(lb, after - r1)
            ibp_mu, ibp_r = (ub + lb) / 2, (ub - lb) / 2
            r, mu = r * p, after
        elif isinstance(layer, nn.ReLU):
            ub, lb = F.relu(ibp_mu + ibp_r), F.relu(ibp_mu - ibp_r)
            ones = (1,) * (mu.dim() - 1)
            ub = torch.min(ub, F.relu(mu + r.reshape(-1, *ones)))
            lb = torch.max(lb, F.relu(mu - r.reshape(-1, *ones)))
            ibp_mu, ibp_r = (ub + lb) / 2, (ub - lb) / 2
            mu = F.relu(mu)
            u_list[i] = 1
        elif type(layer).__name__ == "Flatten":
            ibp_mu, ibp_r, mu = (t.reshape(t.shape[0], -1) for t in (ibp_mu, ibp_r, mu))
            u_list[i] = 1
        elif isinstance(layer, nn.BatchNorm2d):
            mean, var = _bn_scale(layer, mu)
            after = _bn_apply(mu, mean, var, layer.weight, layer.bias, layer.eps)
            ww = layer.weight * torch.rsqrt(var.reshape(-1) + layer.eps)
            p = ww.abs().max()
            r1 = r.reshape(-1, 1, 1, 1) * ww.reshape(1, -1, 1, 1).abs()
            ibp_mu = _bn_apply(ibp_mu, mean, var, layer.weight, layer.bias, layer.eps)
            ibp_r = _bn_apply(ibp_r, torch.zeros_like(mean), var, layer.weight.abs(), torch.zeros_like(layer.bias),
                              layer.eps)
            ub, lb = torch.min(ibp_mu + ibp_r, after + r1), torch.max(ibp_mu - ibp_r, after - r1)
            ibp_mu, ibp_r = (ub + lb) / 2, (ub - lb) / 2
            u_list[i] = 1
            r, mu = r * p, after
        else:
            raise ValueError(f"bcp_forward_reference: layer {type(layer).__name__} is not in BCP's set")
    raise ValueError("bcp_forward_reference: the model must end with a Linear layer")


def bcp_translation_reference(mu_prev, r_prev, ibp_mu_prev, ibp_r_prev, W, opt_iter: int):
    """``BCP_translation``: (B, K, K) inner products ``(w_i - w_j) . d_ij``, ``d_ij`` the approximate maximiser
    over the ball of radius ``r_prev`` around ``mu_prev`` and the box."""
    EPS = 1e-12
    c, h = W.shape
    b = mu_prev.shape[0]
    opts = dict(dtype=W.dtype, device=W.device)
    all_one = torch.ones(1, c, c, 1, **opts)
    eye = torch.eye(c, c, **opts).reshape(1, c, c, 1)
    off = ((all_one - eye) == 1).to(W.dtype)
    wi_wj = (W.reshape(c, 1, -1).repeat(1, c, 1) - W.repeat(c, 1, 1)).unsqueeze(0)
    wi_wj_rep = wi_wj.repeat(b, 1, 1, 1)
    r_rep = r_prev.reshape(b, 1, 1, 1)
    d = r_rep * F.normalize(wi_wj, p=2, dim=-1)
    norm = off * (r_rep + EPS) + EPS
    mu_rep = mu_prev.reshape(b, 1, 1, h)
    ub = ibp_mu_prev.reshape(b, 1, 1, h) + ibp_r_prev.reshape(b, 1, 1, h) - mu_rep
    lb = ibp_mu_prev.reshape(b, 1, 1, h) - ibp_r_prev.reshape(b, 1, 1, h) - mu_rep
    if ub.min() < 0 or lb.max() > 0:
        ub = ub.clone()
        lb = lb.clone()
        ub[ub < 0] = 0
        lb[lb > 0] = 0
    it = 0
    inner = None
    while it == 0 or (((off * d < lb) | (off * d > ub)).sum() > 0 and it < opt_iter):
        it += 1
        below, above = (d <= lb).to(W.dtype), (d >= ub).to(W.dtype)
        before = off * d * below + off * d * above
        after = off * lb * below + off * ub * above
        n_before = (off * (before + EPS)).norm(2, dim=-1, keepdim=True)
        n_after = (off * (after + EPS)).norm(2, dim=-1, keepdim=True)
        r_before = (torch.clamp(norm.abs() ** 2 - n_before.abs() ** 2, min=0) + EPS + eye).sqrt()
        r_after = (torch.clamp(norm.abs() ** 2 - n_after.abs() ** 2, min=0) + EPS + eye).sqrt()
        ratio = r_after / (r_before + EPS)
        inside = ((d > lb) & (d < ub)).to(W.dtype)
        d = after + ratio * off * d * inside
        inner = (wi_wj_rep * d).sum(-1)
    return inner


def _translated(mu, t, onehot):
    b, c = onehot.shape
    delta = t.bmm(onehot.unsqueeze(2)).reshape(b, c)
    return mu + delta * (1 - onehot)


def _margins(logits: Tensor, y: Tensor) -> Tensor:
    """``z_y - z_j`` for ``j != y`` (B, K-1) from translated logits."""
    K = logits.shape[1]
    keep = torch.arange(K, device=y.device).unsqueeze(0) != y.unsqueeze(1)
    return (logits.gather(1, y.unsqueeze(1)) - logits)[keep].reshape(y.shape[0], K - 1)


def bcp_loss_reference(model: nn.Sequential, x: Tensor, y: Tensor, eps: float, u_list: list | None = None,
                       steps: int = 1, opt_iter: int = 1, generator=None):
    """``BCP_loss``: ``(loss, lb, u_list)``, ``lb`` (B, K-1) the margins' lower bounds it implies."""
    mu, mu_prev, r_prev, _, ibp_mu_prev, ibp_r_prev, W, u_list = bcp_forward_reference(
        model, x, eps, u_list, steps, generator)
    onehot = torch.eye(W.shape[0], dtype=x.dtype, device=x.device).index_select(0, y)
    t = bcp_translation_reference(mu_prev, r_prev, ibp_mu_prev, ibp_r_prev, W, opt_iter)
    t = torch.where(t != t, torch.zeros_like(t), t)
    logits = _translated(mu, t, onehot)
    return F.cross_entropy(logits, y), _margins(logits, y), u_list


def lmt_loss_reference(model: nn.Sequential, x: Tensor, y: Tensor, eps: float, u_list: list | None = None,
                       steps: int = 1, generator=None):
    """LMT's loss with BCP's power iterations: ``(loss, lb, u_list)``; ``L`` the product of the Linear/Conv2d
    layers' estimates (a chain of those and ReLU/Flatten layers, no normalisation)."""
    layers = list(model.children())
    u_list = [None] * len(layers) if u_list is None else u_list
    L = x.new_ones(())
    shape = tuple(x.shape[1:])
    h = x[:1]
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Conv2d):
            p, u_list[i] = power_iteration_conv_reference(shape, layer, steps, u_list[i], generator)
        elif isinstance(layer, nn.Linear):
            p, u_list[i] = power_iteration_linear_reference(layer.weight, steps, u_list[i], generator)
        else:
            p = None
        if p is not None:
            u_list[i] = u_list[i].data
            L = L * p
        with torch.no_grad():
            h = layer(h)
        shape = tuple(h.shape[1:])
    logits = model(x)
    onehot = torch.eye(logits.shape[1], dtype=x.dtype, device=x.device).index_select(0, y)
    shifted = logits + math.sqrt(2.0) * eps * L * (1 - onehot)
    return F.cross_entropy(shifted, y), _margins(shifted, y), u_list
