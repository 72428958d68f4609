"""Checkpoints: robustkern's own (model, optimiser, scheduler, config, epoch, metrics, RNG states) and loading
weights from the published projects' files (Cohen/SmoothAdv ``{"arch", "state_dict"}`` with a ``1.`` prefix,
MACER ``{"net"}``, CROWN-IBP ``{"state_dict"}``, DataParallel ``module.`` prefixes, bare state dicts)."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "extract_state_dict", "load_weights", "rng_state",
           "set_rng_state", "seed_everything"]

FORMAT = "robustkern-checkpoint-v1"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state(generator: torch.Generator | None = None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"])


def save_checkpoint(path: str | os.PathLike, **content: Any) -> None:
    """Write atomically (temporary file + rename), so an interrupted save never leaves a torn checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **content}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (it holds RNG states, hence weights_only=False:
    only load files you trust)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a robustkern training checkpoint (use it with 'eval --checkpoint')")
    return ckpt


def extract_state_dict(obj: Any) -> dict:
    """The state dict inside a checkpoint of any of the supported layouts, ``module.`` prefixes removed."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "net", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError("checkpoint holds no state dict (looked for keys model, state_dict, net)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def _normalize_first(model: nn.Module) -> bool:
    return isinstance(model, nn.Sequential) and len(model) > 0 and type(model[0]).__name__ == "Normalize"


def load_weights(model: nn.Module, obj: Any) -> None:
    """Load weights into ``model`` from any supported checkpoint layout (see module doc).

    Published checkpoints whose normalisation layer kept no buffers (Cohen's ``NormalizeLayer``) lack
    ``0.mean``/``0.std``; those come from the model. A bare network's weights load into ``model[1]`` when the
    model is ``Sequential(Normalize, net)``.
    """
    sd = extract_state_dict(obj)
    own = model.state_dict()
    if _normalize_first(model):
        norm_keys = [k for k in own if k.startswith("0.") and k[2:] in ("mean", "std")]
        if not any(k.startswith("1.") for k in sd) and len(model) == 2:
            sd = {"1." + k: v for k, v in sd.items()}
        for k in norm_keys:
            sd.setdefault(k, own[k])
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ConfigError("checkpoint does not match the model: "
                          f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                          f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:  # shape mismatches
        raise ConfigError(f"checkpoint does not match the model: {exc}") from None
