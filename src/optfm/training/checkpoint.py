"""Resumable checkpoints in safetensors + JSON (never pickle).

One ``.safetensors`` file holds the tensors of the model, the optimizer state, and the RNG states;
everything that is not a tensor (step, optimizer hyperparameters, LR-scheduler state, Python's RNG
state, user extras) is JSON in the file's metadata. Writing is atomic (temp file + rename), so a
killed process leaves either the previous checkpoint or the new one, never a torn file.

Resuming restores model, optimizer, scheduler, step and the torch/NumPy/Python RNGs (and any named
``torch.Generator``), which makes a resumed run bit-identical to an uninterrupted one on the same
machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["Checkpoint", "load_checkpoint", "save_checkpoint"]

_FORMAT = "optfm-checkpoint"
_VERSION = 1


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns besides restoring the objects passed to it."""

    step: int
    extra: dict[str, Any] = field(default_factory=dict)


def _json_value(value: Any, where: str) -> Any:
    try:
        json.dumps(value, allow_nan=True)
    except TypeError as e:
        raise TypeError(f"{where} is not JSON-serialisable ({e}); checkpoints store it as JSON") from e
    return value


def _rng_tensors_and_meta() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng/torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng/numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": {"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    return tensors, meta


def _restore_rng(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch_cpu"].cpu())
    cuda = sorted(k for k in tensors if k.startswith("rng/cuda/"))
    if cuda and torch.cuda.is_available():
        for k in cuda:
            i = int(k.rsplit("/", 1)[1])
            if i < torch.cuda.device_count():
                torch.cuda.set_rng_state(tensors[k].cpu(), i)
    n = meta["numpy"]
    keys = tensors["rng/numpy_keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    step: int = 0,
    generators: Mapping[str, torch.Generator] | None = None,
    extra: Mapping[str, Any] | None = None,
    save_rng: bool = True,
) -> Path:
    """Write a resumable checkpoint to ``path`` (a ``.safetensors`` file) atomically.

    Tensors that share storage in the model (tied embeddings) are stored once and restored to
    every name. ``extra`` must be JSON-serialisable.
    """
    path = Path(path)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"format": _FORMAT, "version": _VERSION, "step": step}

    # Model: deduplicate tensors that share storage (safetensors refuses shared tensors).
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[f"model/{name}"] = t.contiguous().cpu()
    meta["model_aliases"] = aliases

    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"optim/{idx}/{k}"] = v.detach().contiguous().cpu()
                else:
                    scalars.setdefault(str(idx), {})[k] = _json_value(v, f"optimizer state {idx}.{k}")
        meta["optimizer"] = {
            "class": type(optimizer).__name__,
            "param_groups": _json_value(sd["param_groups"], "optimizer param_groups"),
            "scalars": scalars,
        }
    if scheduler is not None:
        meta["scheduler"] = _json_value(scheduler.state_dict(), "scheduler state_dict")
    if generators:
        for name, g in generators.items():
            tensors[f"generator/{name}"] = g.get_state()
        meta["generators"] = sorted(generators)
    if save_rng:
        rng_tensors, rng_meta = _rng_tensors_and_meta()
        tensors.update(rng_tensors)
        meta["rng"] = rng_meta
    meta["extra"] = _json_value(dict(extra or {}), "extra")

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"optfm": json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _restore_group_types(saved: list[dict], current: list[dict]) -> list[dict]:
    if len(saved) != len(current):
        raise ValueError(
            f"checkpoint has {len(saved)} optimizer param groups, the optimizer has {len(current)}"
        )
    out = []
    for s, c in zip(saved, current):
        g = dict(s)
        for k, v in g.items():
            if isinstance(c.get(k), tuple) and isinstance(v, list):
                g[k] = tuple(v)
        out.append(g)
    return out


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    restore_rng: bool = True,
    strict: bool = True,
) -> Checkpoint:
    """Restore a checkpoint written by :func:`save_checkpoint` into the given objects.

    Tensors are loaded on CPU and copied into the model/optimizer (so they land on whatever device
    those live on). Returns the step and the ``extra`` dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw_meta = (f.metadata() or {}).get("optfm")
        if raw_meta is None:
            raise ValueError(f"{path} is not an optfm checkpoint (no 'optfm' metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    meta = json.loads(raw_meta)
    if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format {meta.get('format')} v{meta.get('version')}")

    state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    for alias, target in meta.get("model_aliases", {}).items():
        state[alias] = state[target]
    model.load_state_dict(state, strict=strict)

    if optimizer is not None:
        om = meta.get("optimizer")
        if om is None:
            raise ValueError(f"{path} has no optimizer state but an optimizer was given")
        if om["class"] != type(optimizer).__name__:
            raise ValueError(
                f"{path} holds {om['class']} state; cannot load it into {type(optimizer).__name__}"
            )
        opt_state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim/"):
                _, idx, name = k.split("/", 2)
                opt_state.setdefault(int(idx), {})[name] = v
        for idx, d in om["scalars"].items():
            opt_state.setdefault(int(idx), {}).update(d)
        groups = _restore_group_types(om["param_groups"], optimizer.state_dict()["param_groups"])
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    if scheduler is not None:
        if "scheduler" not in meta:
            raise ValueError(f"{path} has no scheduler state but a scheduler was given")
        scheduler.load_state_dict(meta["scheduler"])
    if generators:
        for name, g in generators.items():
            key = f"generator/{name}"
            if key not in tensors:
                raise KeyError(f"{path} has no generator named {name!r} (has {meta.get('generators', [])})")
            g.set_state(tensors[key])
    if restore_rng and "rng" in meta:
        _restore_rng(tensors, meta["rng"])
    return Checkpoint(step=int(meta["step"]), extra=meta.get("extra", {}))
