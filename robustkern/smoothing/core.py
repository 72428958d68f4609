"""Gaussian randomized smoothing: PREDICT and CERTIFY of Cohen, Rosenfeld, Kolter 2019 ("Certified
Adversarial Robustness via Randomized Smoothing"), a drop-in for their ``core.Smooth``, plus a batched
``certify_batch`` that pushes noisy copies of many images through one forward.

The smoothed classifier is ``g(x) = argmax_c P(f(x + eps) = c)``, ``eps ~ N(0, sigma^2 I)`` in pixel space.
CERTIFY draws n0 selection samples, guesses ``c_A`` = their most frequent class, draws n fresh estimation
samples, bounds ``p_A`` from below by the exact one-sided (1 - alpha) Clopper-Pearson bound on their count of
``c_A``, abstains when the bound is below 1/2, and otherwise certifies the L2 radius ``sigma Phi^-1(p_A)``.
With probability >= 1 - alpha it either abstains or returns g(x), g being constant on that ball.

Noise. ``rng="philox"`` (default): the noise of (image key, stream, sample index, element) comes from the
counter-based generator of ``robustkern.ops.smoothing_noise``, keyed by ``seed``, so results do not depend on
``batch_size``, on how images are packed into forwards, or on how processes shard the images (the image key
is the image's dataset index). Selection, estimation and predict samples use different stream ids: no
counter is ever reused, so the three sets are independent. ``rng="torch"``: torch's global generator, drawn
batch by batch exactly as Cohen's ``_sample_noise`` (``randn_like`` on ``x.repeat(batch)``), for bit-exact
comparison with ``robustkern.reference.smoothing.CohenSmooth``.

Options. ``mean``/``std``: the input normalisation, fused into the noise kernel (the base classifier is then
the network *without* its normalisation layer); the noise is still added in pixel space, before it.
``dtype=torch.bfloat16``: the noisy input (computed in fp32) is cast to bf16 and a bf16 copy of the base
classifier runs; the certificate is then for that bf16 classifier f', not for the fp32 model.
``channels_last``: the model (a private copy) and the noisy batches use channels-last memory; ``None``
(default) picks it on the CPU for 4-D images with ``rng="philox"``, where oneDNN's convolutions run faster
on it (the small CNN's 3-channel first convolution about 3x), and not on CUDA nor for ``rng="torch"``; a model
whose forward needs NCHW memory (``x.view(x.size(0), -1)`` after a convolution) is found by one forward of
two images per image shape and then runs in NCHW, so the option never changes which models work. A
``Flatten`` followed by a ``Linear`` inside an ``nn.Sequential`` of that copy then reads the channels-last
activations in place, with the ``Linear``'s columns permuted to (H, W, C) order instead of copying the
activations back to NCHW. Channels-last changes the summation order of convolutions and of that ``Linear``
(logits differ in the last bits, as between any two convolution algorithms); a ``ReLU`` right after a
convolution / ``Linear`` / batch norm of that copy runs in place. ``cuda_graphs``: on CUDA, the
steady-state forward (noise, model, count) of full batches is captured once and replayed. ``compile``:
``True`` runs the full batches of the ``rng="philox"`` loop through a ``torch.compile`` (inductor, frozen
weights) copy of the model, ``"auto"`` (default) does so only on the CPU once the ``Smooth`` has enough work
to amortise compiling, never for small calls such as the tests' (see ``compiled_forward``); the logits then
equal the eager ones up to rounding.
Kernel choice that depends on batch size (cudnn.benchmark, split-K) can make f differ across batch sizes;
pin algorithms for strictly batch-size-independent results.
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..cuda_graphs import storage_key
from ..ops.smoothing import STREAM_ESTIMATION, STREAM_PREDICT, STREAM_SELECTION, smoothing_count, smoothing_noise
from . import statistics
from .compiled_forward import CompiledForward

__all__ = ["Smooth", "certify_batch"]

_RNGS = ("philox", "torch")


def _check_num(name: str, v) -> int:
    if isinstance(v, bool) or int(v) != v or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)


class Smooth:
    """A smoothed classifier (Cohen et al. 2019), compatible with ``core.Smooth``."""

    ABSTAIN = -1

    def __init__(self, base_classifier: torch.nn.Module, num_classes: int, sigma: float, *,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 input_shape: Optional[Sequence[int]] = None, rng: str = "philox",
                 dtype: torch.dtype = torch.float32, channels_last: Optional[bool] = None,
                 cuda_graphs: bool = False, compile="auto",
                 store_noise: bool = False):
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        self.num_classes = _check_num("num_classes", num_classes)
        if rng not in _RNGS:
            raise ValueError(f"rng must be one of {_RNGS}, got {rng!r}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if std is not None and min(float(s) for s in torch.as_tensor(std).reshape(-1)) <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.base_classifier = base_classifier
        self.sigma = float(sigma)
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        self.rng, self.dtype = rng, dtype
        self.channels_last, self.cuda_graphs = channels_last, cuda_graphs
        self.store_noise = store_noise
        self.stored_noise: list = []        # (noisy batch, src, counter) per forward when store_noise
        self._model_cache = None
        self._layout_ok: dict = {}          # image shape -> whether the channels-last copy runs on it
        self._graphs = None
        self._compiled = CompiledForward(compile)

    # ------------------------------------------------------------------------------------------ Cohen's API
    def certify(self, x: Tensor, n0: int, n: int, alpha: float, batch_size: int, *, seed: Optional[int] = None,
                index: int = 0):
        """CERTIFY for one image ``x`` (C, H, W): ``(class, L2 radius)`` or ``(Smooth.ABSTAIN, 0.0)``.
        ``seed``/``index`` key the noise (philox): ``certify(x_i, seed=s, index=i)`` equals row i of
        ``certify_batch(x, seed=s)``."""
        self._check_image(x, batched=False)
        pred, rad = self.certify_batch(x.unsqueeze(0), n0, n, alpha, batch_size, seed=seed, indices=[index])
        return int(pred[0]), float(rad[0])

    def predict(self, x: Tensor, n: int, alpha: float, batch_size: int, *, seed: Optional[int] = None,
                index: int = 0) -> int:
        """PREDICT: the top class of n noisy samples, or ABSTAIN when the two-sided binomial test of the top two
        counts (against p = 1/2) has p-value > alpha."""
        self._check_image(x, batched=False)
        n = _check_num("n", n)
        statistics._check_alpha(alpha)
        counts = self._counts(x.unsqueeze(0), [(STREAM_PREDICT, n)], batch_size, seed, [index])[0, 0]
        counts = counts.cpu().numpy()
        top2 = np.argsort(-counts, kind="stable")[:2]
        c1, c2 = int(counts[top2[0]]), int(counts[top2[1]]) if len(top2) > 1 else 0
        if statistics.binomial_p_value(c1, c2) > alpha:
            return Smooth.ABSTAIN
        return int(top2[0])

    def _sample_noise(self, x: Tensor, num: int, batch_size: int, *, seed: Optional[int] = None,
                      index: int = 0) -> np.ndarray:
        """Per-class vote counts of ``num`` noisy copies of ``x`` (Cohen's helper)."""
        self._check_image(x, batched=False)
        counts = self._counts(x.unsqueeze(0), [(STREAM_ESTIMATION, _check_num("num", num))], batch_size, seed,
                              [index])
        return counts[0, 0].cpu().numpy()

    def _lower_confidence_bound(self, NA: int, N: int, alpha: float) -> float:
        return statistics.lower_confidence_bound(NA, N, alpha)

    # ------------------------------------------------------------------------------------------ batched
    def certify_batch(self, x: Tensor, n0: int, n: int, alpha: float, batch_size: int,
                      seed: Optional[int] = None, indices: Optional[Sequence[int]] = None,
                      return_counts: bool = False):
        """CERTIFY for a batch ``x`` (B, C, H, W), noisy copies of several images sharing each forward of at
        most ``batch_size`` samples. Image i's noise is keyed by ``(seed, indices[i])`` (default ``i``).
        Returns ``(predictions (B,) int64, radii (B,) float64)`` on the CPU (ABSTAIN / 0.0 where abstaining),
        and the (B, 2, K) selection/estimation counts when ``return_counts``."""
        self._check_image(x, batched=True)
        n0, n = _check_num("n0", n0), _check_num("n", n)
        statistics._check_alpha(alpha)
        counts = self._counts(x, [(STREAM_SELECTION, n0), (STREAM_ESTIMATION, n)], batch_size, seed, indices)
        counts = counts.cpu()
        c_a = counts[:, 0].argmax(1)                          # first maximum, as Cohen's .argmax()
        n_a = counts[:, 1].gather(1, c_a[:, None])[:, 0].numpy()
        p_a = np.atleast_1d(statistics.lower_confidence_bound(n_a, n, alpha))
        ok = p_a >= 0.5
        pred = torch.where(torch.from_numpy(ok), c_a, torch.full_like(c_a, Smooth.ABSTAIN))
        rad = torch.from_numpy(np.where(ok, statistics.radius(np.where(ok, p_a, 0.5), self.sigma), 0.0))
        return (pred, rad, counts) if return_counts else (pred, rad)

    # ------------------------------------------------------------------------------------------ engine
    def _check_image(self, x: Tensor, batched: bool) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got {type(x).__name__} "
                            f"{getattr(x, 'dtype', '')}")
        want = (x.dim() - 1) if batched else x.dim()
        shape = tuple(x.shape[1:]) if batched else tuple(x.shape)
        if self.input_shape is not None and shape != self.input_shape:
            raise ValueError(f"image shape {shape} does not match input_shape {self.input_shape}"
                             + (" (certify takes one image (C, H, W); use certify_batch for a batch)"
                                if not batched and shape[1:] == self.input_shape else ""))
        if want < 1 or (batched and x.dim() < 2):
            raise ValueError(f"x must be {'(B, C, ...)' if batched else '(C, ...)'}, got shape {tuple(x.shape)}")
        if self.mean is not None and shape[0] != self.mean.numel() and self.mean.numel() != 1:
            raise ValueError(f"image shape {shape} has {shape[0]} channels but mean/std have "
                             f"{self.mean.numel()}")

    def _use_channels_last(self, batch: Tensor) -> bool:
        if self.channels_last is None:                # rng="torch" replays Cohen's loop: his model as is
            wanted = batch.dim() == 4 and batch.device.type == "cpu" and self.rng == "philox"
        else:
            wanted = bool(self.channels_last) and batch.dim() == 4
        return wanted and self._channels_last_works(batch)

    def _channels_last_works(self, batch: Tensor) -> bool:
        """Whether the channels-last copy runs on images of ``batch``'s shape: a forward that needs NCHW memory
        (``x.view(x.size(0), -1)`` after a convolution, as MACER's LeNet) raises there, and the model then runs
        as it is (NCHW), decided once per image shape by a forward of two images."""
        key = tuple(batch.shape[1:])
        if key not in self._layout_ok:
            probe = batch[:1].detach().expand(2, *key).contiguous(memory_format=torch.channels_last)
            try:
                with torch.inference_mode():
                    self._model(True)(probe.to(self.dtype))
                self._layout_ok[key] = True
            except RuntimeError:
                self._layout_ok[key] = False
        return self._layout_ok[key]

    def _sync_copies(self) -> None:
        """Refresh the private model copies from the user's model, in place (the user may have trained it since
        the last call; captured CUDA graphs keep pointing at the same storages)."""
        if self._model_cache is None or self._model_cache[1] is self.base_classifier:
            return
        copy_m = self._model_cache[1]
        with torch.inference_mode():
            for mine, theirs in zip(list(copy_m.parameters()) + list(copy_m.buffers()),
                                    list(self.base_classifier.parameters()) + list(self.base_classifier.buffers())):
                mine.copy_(theirs)
            for mod in copy_m.modules():
                if isinstance(mod, _ChannelsLastFlattenLinear):
                    mod.refresh()

    def _model(self, channels_last: bool = False):
        key = (channels_last,)
        if self._model_cache is None or self._model_cache[0] != key:
            m = self.base_classifier
            if self.dtype != torch.float32 or channels_last:
                m = copy.deepcopy(m)                  # the user's model is left alone
            if self.dtype != torch.float32:
                m = m.to(self.dtype)
            if channels_last:
                m = _relu_in_place(_fold_flatten_linear(m.to(memory_format=torch.channels_last)))
            self._model_cache = (key, m.eval())
        return self._model_cache[1]

    def _forward(self, batch: Tensor, compiled: bool = False) -> Tensor:
        cl = self._use_channels_last(batch)
        if cl:
            batch = batch.contiguous(memory_format=torch.channels_last)
        try:
            logits = self._compiled(self._model(cl), self.base_classifier, batch) if compiled else None
            if logits is None:
                logits = self._model(cl)(batch)
        except RuntimeError as e:
            raise ValueError(f"the base classifier failed on a batch of shape {tuple(batch.shape)} "
                             f"(is the image shape right?): {e}") from e
        if not isinstance(logits, Tensor) or logits.dim() != 2 or tuple(logits.shape) != (batch.shape[0],
                                                                                          self.num_classes):
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"the base classifier must return ({batch.shape[0]}, num_classes="
                             f"{self.num_classes}) logits, got {got}")
        return logits

    def _counts(self, x: Tensor, streams, batch_size: int, seed, indices) -> Tensor:
        """(B, S, K) int64 vote counts of the S streams ``[(stream id, num samples)]`` for each image."""
        batch_size = _check_num("batch_size", batch_size)
        self.base_classifier.eval()
        with torch.inference_mode():
            self._sync_copies()
            if self.rng == "torch":
                return self._counts_torch(x, streams, batch_size, seed)
            return self._counts_philox(x, streams, batch_size, seed, indices)

    def _norm(self, device):
        if self.mean is None:
            return None, None
        return self.mean.to(device), self.std.to(device)

    def _counts_philox(self, x, streams, batch_size, seed, indices) -> Tensor:
        b, dev = x.shape[0], x.device
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())   # reproducible under torch.manual_seed
        if not 0 <= int(seed) < 2 ** 63:
            raise ValueError(f"seed must be in [0, 2^63), got {seed}")
        keys = torch.arange(b, dtype=torch.int64) if indices is None else torch.as_tensor(indices, dtype=torch.int64)
        if keys.shape != (b,) or (b and (int(keys.min()) < 0 or int(keys.max()) >= 2 ** 32)):
            raise ValueError(f"indices must be {b} integers in [0, 2^32)")
        keys = keys.to(dev)
        nums = [_check_num("number of samples", k) for _, k in streams]
        ids = torch.tensor([s for s, _ in streams], dtype=torch.int64, device=dev)
        bounds = torch.tensor(np.cumsum(nums), dtype=torch.int64, device=dev)
        starts = bounds - torch.tensor(nums, dtype=torch.int64, device=dev)
        per_image, n_streams = int(sum(nums)), len(streams)
        seed_t = torch.tensor([int(seed)], dtype=torch.int64, device=dev)
        mean, std = self._norm(dev)
        xf = x.detach().float().contiguous()
        if self._use_channels_last(xf):
            xf = xf.contiguous(memory_format=torch.channels_last)   # the noise kernel then writes channels-last
        counts = torch.zeros((b * n_streams, self.num_classes), dtype=torch.int64, device=dev)
        total = b * per_image
        compiled = self._compiled.wanted(xf, self.rng, total, total // batch_size)
        if compiled:
            self._compiled.drop_if_stale(self.base_classifier)
        for lo in range(0, total, batch_size):
            g = torch.arange(lo, min(lo + batch_size, total), dtype=torch.int64, device=dev)
            img, r = g // per_image, g % per_image
            s = torch.searchsorted(bounds, r, right=True)
            counter = torch.stack([keys[img], r - starts[s], ids[s]], 1)
            group = img * n_streams + s
            if self.cuda_graphs and dev.type == "cuda" and g.numel() == batch_size:
                counts += self._graph_step(xf, img, counter, group, seed_t, mean, std, b * n_streams)
                continue
            noisy = smoothing_noise(xf, img, counter, seed_t, self.sigma, mean=mean, std=std, out_dtype=self.dtype)
            if self.store_noise:
                self.stored_noise.append((noisy.clone(), img.clone(), counter.clone()))
            counts += smoothing_count(self._forward(noisy, compiled and g.numel() == batch_size), group,
                                      b * n_streams)
        return counts.view(b, n_streams, self.num_classes)

    def _counts_torch(self, x, streams, batch_size, seed) -> Tensor:
        """Cohen's ``_sample_noise`` loop, image by image, stream by stream, batch by batch."""
        if seed is not None:
            torch.manual_seed(int(seed))
        b, dev = x.shape[0], x.device
        mean, std = self._norm(dev)
        counts = torch.zeros((b, len(streams), self.num_classes), dtype=torch.int64, device=dev)
        for i in range(b):
            for j, (_, num) in enumerate(streams):
                for _ in range(math.ceil(num / batch_size)):
                    this = min(batch_size, num)
                    num -= this
                    batch = x[i].repeat((this,) + (1,) * x[i].dim())
                    noise = torch.randn_like(batch, device=batch.device) * self.sigma
                    inp = batch + noise
                    if mean is not None:
                        shape = (1, -1) + (1,) * (inp.dim() - 2)
                        inp = (inp - mean.view(shape)) / std.view(shape)
                    logits = self._forward(inp.to(self.dtype))
                    group = torch.zeros(this, dtype=torch.int64, device=dev)
                    counts[i, j] += smoothing_count(logits, group, 1)[0]
        return counts

    def _graph_step(self, xf, src, counter, group, seed_t, mean, std, n_groups) -> Tensor:
        """One full batch through a captured CUDA graph (noise -> model -> count); recaptured when the images'
        shape, the number of groups or the storage of the model it runs changes (``storage_key``: the
        private copies are refreshed in place, the user's own model may be moved). The graph reads its inputs
        from static buffers."""
        model = self._model(self._use_channels_last(xf))
        key = (tuple(xf.shape), n_groups, src.numel(), storage_key(model))
        st = self._graphs
        if st is None or st["key"] != key:
            st = {"key": key, "x": xf.clone(), "src": src.clone(), "ctr": counter.clone(), "grp": group.clone(),
                  "seed": seed_t.clone()}

            def step():
                noisy = smoothing_noise(st["x"], st["src"], st["ctr"], st["seed"], self.sigma, mean=mean, std=std,
                                        out_dtype=self.dtype)
                return smoothing_count(self._forward(noisy), st["grp"], n_groups)

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()                                   # warm up (autotuning, cuDNN plans)
            torch.cuda.current_stream().wait_stream(side)
            st["graph"] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(st["graph"]):
                st["out"] = step()
            self._graphs = st
        for name, v in (("x", xf), ("src", src), ("ctr", counter), ("grp", group), ("seed", seed_t)):
            st[name].copy_(v)
        st["graph"].replay()
        return st["out"].clone()


def certify_batch(base_classifier: torch.nn.Module, x: Tensor, num_classes: int, sigma: float, n0: int, n: int,
                  alpha: float, batch_size: int, seed: Optional[int] = None,
                  indices: Optional[Sequence[int]] = None, **smooth_kwargs):
    """Functional form of ``Smooth(base_classifier, num_classes, sigma, **smooth_kwargs).certify_batch(...)``."""
    smooth = Smooth(base_classifier, num_classes, sigma, **smooth_kwargs)
    return smooth.certify_batch(x, n0, n, alpha, batch_size, seed=seed, indices=indices)


class _ChannelsLastFlattenLinear(torch.nn.Module):
    """``Linear(Flatten(x))`` for a channels-last (N, C, H, W) ``x`` without the copy back to NCHW: the NHWC
    memory is flattened as it lies, against the weight's columns permuted from (C, H, W) to (H, W, C) order
    (the same products, summed in another order). Other inputs take the plain path."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear
        self._permuted = {}

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.linear.weight, self.linear.bias
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            n, c, h, wd = x.shape
            key = (c, h, wd, w.dtype, w.device)
            if key not in self._permuted:
                self._permuted[key] = self._permute(c, h, wd)
            return torch.nn.functional.linear(x.permute(0, 2, 3, 1).reshape(n, -1), self._permuted[key], b)
        return self.linear(x.flatten(1))

    def _permute(self, c: int, h: int, wd: int) -> Tensor:
        w = self.linear.weight.detach()
        return w.reshape(w.shape[0], c, h, wd).permute(0, 2, 3, 1).reshape(w.shape[0], -1).clone()

    def refresh(self) -> None:
        """Recompute the permuted weights in place after the Linear's weight changed."""
        for (c, h, wd, _, _), t in self._permuted.items():
            t.copy_(self._permute(c, h, wd))


def _fold_flatten_linear(model: torch.nn.Module) -> torch.nn.Module:
    """Replace each ``Flatten(1, -1)`` directly followed by a ``Linear`` inside an ``nn.Sequential`` of
    ``model`` (a private copy, changed in place) by ``_ChannelsLastFlattenLinear``."""
    for seq in [m for m in model.modules() if isinstance(m, torch.nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            fl, lin = seq._modules[a], seq._modules[b]
            if isinstance(fl, torch.nn.Flatten) and fl.start_dim == 1 and fl.end_dim == -1 and \
                    isinstance(lin, torch.nn.Linear):
                seq._modules[a] = torch.nn.Identity()
                seq._modules[b] = _ChannelsLastFlattenLinear(lin)
    return model


def _relu_in_place(model: torch.nn.Module) -> torch.nn.Module:
    """In a private copy: make each ``ReLU`` that directly follows a convolution, a ``Linear`` or a batch norm
    inside an ``nn.Sequential`` work in place (that output is a fresh tensor nothing else reads), saving an
    allocation and a pass over the activations per layer."""
    fresh = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.BatchNorm2d, torch.nn.BatchNorm1d, _ChannelsLastFlattenLinear)
    for seq in [m for m in model.modules() if isinstance(m, torch.nn.Sequential)]:
        children = list(seq.children())
        for prev, cur in zip(children, children[1:]):
            if type(cur) is torch.nn.ReLU and isinstance(prev, fresh):
                cur.inplace = True
    return model
