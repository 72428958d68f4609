"""Checkpoints: robustkern's own (model, optimiser, scheduler, config, epoch, metrics, RNG states) and loading
weights from the published projects' files (Cohen/SmoothAdv ``{"arch", "state_dict"}`` with a ``1.`` prefix,
MACER ``{"net"}``, CROWN-IBP ``{"state_dict"}``, DataParallel ``module.`` prefixes, bare state dicts).

Every file is read with ``torch.load(weights_only=True)`` (:func:`read_checkpoint`): unpickling arbitrary
objects runs code named by the file, so only tensors and plain containers (dict, list, tuple, str, numbers,
``OrderedDict``, ``Counter``) are accepted. robustkern's checkpoints hold nothing else (the NumPy RNG state is
stored as a tensor and plain values). A file that needs other Python objects (an older robustkern checkpoint
with the NumPy state as an array, a foreign checkpoint pickling its own classes) is refused with the names of
the objects, and loads only with ``trust=True`` (``--trust-checkpoint``), meant for files whose origin the user
trusts."""
from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError

__all__ = ["FORMAT", "save_checkpoint", "read_checkpoint", "load_checkpoint", "extract_state_dict", "load_weights",
           "rng_state", "set_rng_state", "seed_everything"]

FORMAT = "robustkern-checkpoint-v1"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _numpy_state() -> dict:
    """NumPy's global RNG state as a tensor and plain values (loadable with weights_only=True)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_state(state) -> None:
    if isinstance(state, dict):
        state = (state["name"], state["key"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                 state["gauss"])
    np.random.set_state(state)  # a tuple: checkpoints written before the state was stored as a tensor


def rng_state(generator: torch.Generator | None = None) -> dict:
    state = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    random.setstate(state["python"])
    _set_numpy_state(state["numpy"])
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


def _unsafe_globals(path: Path, exc: Exception) -> list[str]:
    """The Python objects (module.name) that kept ``path`` from loading with weights_only=True."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # zip-format files
    except Exception:  # noqa: BLE001 - legacy (pre-1.6) format: read the names from the error instead
        names = []
    return names or re.findall(r"GLOBAL ([\w.]+)", str(exc))


def read_checkpoint(path: str | os.PathLike, trust: bool = False) -> Any:
    """``torch.load(path)`` onto the CPU with ``weights_only=True`` (see the module doc); ``trust=True`` allows
    any pickled object, which can run code from the file. Raises :class:`ConfigError` (one line) for a
    missing, truncated or foreign file and for one that needs objects beyond tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise ConfigError(f"cannot read checkpoint {path}: it is truncated or not a PyTorch checkpoint "
                              f"({_first_line(exc)})") from None
        names = ", ".join(_unsafe_globals(path, exc)) or "unknown"
        raise ConfigError(f"checkpoint {path} holds Python objects beyond tensors and plain containers ({names}); "
                          "loading it would run code named by the file. If you trust its origin, pass "
                          "--trust-checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - zip, pickle and EOF errors of a damaged or foreign file
        raise ConfigError(f"cannot read checkpoint {path}: it is truncated or not a PyTorch checkpoint "
                          f"({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200]


def load_checkpoint(path: str | os.PathLike, trust: bool = False) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (through :func:`read_checkpoint`)."""
    path = Path(path)
    ckpt = read_checkpoint(path, trust)
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
