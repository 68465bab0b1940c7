"""Resumable checkpoints in safetensors + JSON (never pickle).

One ``.safetensors`` file holds the tensors of the model, the optimizer state, and the RNG states;
everything that is not a tensor (step, optimizer hyperparameters, LR-scheduler state, Python's RNG
state, user extras) is JSON in the file's metadata. Writing is atomic (temp file + rename), so a
killed process leaves either the previous checkpoint or the new one, never a torn file.

Resuming restores model, optimizer, scheduler, step and the torch/NumPy/Python RNGs (and any named
``torch.Generator``), which makes a resumed run bit-identical to an uninterrupted one on the same
machine.

Optimizer state that is neither a plain tensor nor plain JSON is encoded explicitly (format
version 2; version-1 files still load): nested dicts of tensors (bitsandbytes' 8-bit state wraps
``state1``/``absmax1``/``qmap1``… in one dict), tensor subclasses that flatten into plain tensors
(torchao's ``OptimState8bit``/``OptimState4bit``/``OptimStateFp8``: their ``codes``, ``scale``
and ``qmap`` tensors go to safetensors, their flatten context — signedness, dtype — to JSON) and
GaLore's ``GaLoreProjector`` (its ``ortho_matrix`` and settings). Only the classes in
:data:`_ALLOWED_CLASSES` are rebuilt on load; nothing else is ever imported from a file. Small
tensors inside param groups or scheduler state (torchao keeps ``lr`` as a 0-d tensor) are stored
the same way. Every tensor is stored with its exact bits, so 8-bit states round-trip bit-exactly.
"""

from __future__ import annotations

import contextlib
import importlib
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
_VERSION = 2
_READABLE_VERSIONS = (1, 2)

_ALLOWED_CLASSES = (
    "torchao.optim.subclass_8bit.OptimState8bit",
    "torchao.optim.subclass_4bit.OptimState4bit",
    "torchao.optim.subclass_fp8.OptimStateFp8",
    "galore_torch.galore_projector.GaLoreProjector",
)
"""Qualified names of the non-tensor objects optimizer state may hold, rebuilt on load."""


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


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _allowed_class(name: str) -> type:
    if name not in _ALLOWED_CLASSES:
        raise ValueError(f"checkpoint refers to class {name!r}, which is not one of the classes "
                         f"optfm restores ({', '.join(_ALLOWED_CLASSES)})")
    module, _, cls = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise ImportError(f"the checkpoint holds {cls} state; install the package of {module}") from e


def _is_plain_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and type(v) in (torch.Tensor, torch.nn.Parameter)


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            tuple(t.stride()), t.dtype)


class _Encoder:
    """Turns a value into JSON, moving every tensor into ``tensors`` under ``prefix/N``; a tensor
    already stored (the same storage, e.g. bitsandbytes' quantisation map shared by every
    parameter) is referenced, not stored twice (safetensors refuses shared tensors)."""

    def __init__(self, tensors: dict[str, torch.Tensor], prefix: str,
                 seen: dict[tuple, str]) -> None:
        self.tensors, self.prefix, self.seen, self.n = tensors, prefix, seen, 0

    def tensor(self, t: torch.Tensor) -> dict[str, str]:
        t = t.detach()
        sk = _storage_key(t)
        if t.numel() > 0 and sk in self.seen:
            return {"__tensor__": self.seen[sk]}
        key = f"{self.prefix}/{self.n}"
        self.n += 1
        ref: dict[str, Any] = {"__tensor__": key}
        if not t.is_contiguous() and t.dim() > 1:
            # Keep the memory order (e.g. GaLore's projection matrix, a column-major slice of an
            # SVD factor): a matmul with a transposed operand takes another kernel path and can
            # round differently, which would break bit-exact resumption.
            order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.size(d)))
            t = t.permute(order)
            ref["permute"] = [order.index(d) for d in range(len(order))]
        self.tensors[key] = t.contiguous().cpu()
        self.seen[sk] = key
        return ref

    def __call__(self, v: Any, where: str) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if _is_plain_tensor(v):
            return self.tensor(v)
        if isinstance(v, torch.dtype):
            return {"__dtype__": str(v).removeprefix("torch.")}
        if isinstance(v, dict):
            if not all(isinstance(k, str) for k in v):
                raise TypeError(f"{where} is a dict with non-string keys")
            return {k: self(x, f"{where}.{k}") for k, x in v.items()}
        if isinstance(v, tuple):
            return {"__tuple__": [self(x, f"{where}[{i}]") for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [self(x, f"{where}[{i}]") for i, x in enumerate(v)]
        name = _qualname(v)
        if name in _ALLOWED_CLASSES and isinstance(v, torch.Tensor):  # flattenable subclass
            attrs, ctx = v.__tensor_flatten__()
            return {"__subclass__": name,
                    "tensors": {a: self(getattr(v, a), f"{where}.{a}") for a in attrs},
                    "ctx": self(tuple(ctx), f"{where}.ctx"),
                    "size": list(v.shape), "stride": list(v.stride())}
        if name in _ALLOWED_CLASSES:
            return {"__object__": name, "attrs": self(dict(vars(v)), f"{where}.attrs")}
        raise TypeError(f"{where} ({type(v).__name__}) is neither a tensor nor JSON-serialisable, "
                        f"and not one of the classes checkpoints encode ({', '.join(_ALLOWED_CLASSES)})")


def _decode(v: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(v, list):
        return [_decode(x, tensors) for x in v]
    if not isinstance(v, dict):
        return v
    if "__tensor__" in v:
        t = tensors[v["__tensor__"]]
        return t.permute(v["permute"]) if "permute" in v else t
    if "__dtype__" in v:
        dtype = getattr(torch, v["__dtype__"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {v['__dtype__']!r} in checkpoint")
        return dtype
    if "__tuple__" in v:
        return tuple(_decode(x, tensors) for x in v["__tuple__"])
    if "__subclass__" in v:
        cls = _allowed_class(v["__subclass__"])
        inner = {a: _decode(x, tensors) for a, x in v["tensors"].items()}
        return cls.__tensor_unflatten__(inner, _decode(v["ctx"], tensors), torch.Size(v["size"]),
                                        tuple(v["stride"]))
    if "__object__" in v:
        cls = _allowed_class(v["__object__"])
        obj = cls.__new__(cls)
        obj.__dict__.update(_decode(v["attrs"], tensors))
        return obj
    return {k: _decode(x, tensors) for k, x in v.items()}


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
        encoded: dict[str, dict[str, Any]] = {}
        shared: dict[tuple, str] = {}
        for idx, st in sd["state"].items():
            for k, v in st.items():
                if _is_plain_tensor(v) and v.is_contiguous() and _storage_key(v) not in shared:
                    tensors[f"optim/{idx}/{k}"] = v.detach().contiguous().cpu()
                    shared[_storage_key(v)] = f"optim/{idx}/{k}"
                    continue
                if not isinstance(v, torch.Tensor):
                    try:
                        json.dumps(v, allow_nan=True)
                        scalars.setdefault(str(idx), {})[k] = v
                        continue
                    except TypeError:  # tensors inside, a GaLore projector, ...
                        pass
                enc = _Encoder(tensors, f"optim_enc/{idx}/{k}", shared)
                encoded.setdefault(str(idx), {})[k] = enc(v, f"optimizer state {idx}.{k}")
        meta["optimizer"] = {
            "class": getattr(optimizer, "checkpoint_class", type(optimizer).__name__),
            "param_groups": _Encoder(tensors, "optim_groups", shared)(sd["param_groups"],
                                                                      "optimizer param_groups"),
            "scalars": scalars,
            "encoded": encoded,
        }
    if scheduler is not None:
        meta["scheduler"] = _Encoder(tensors, "scheduler", {})(scheduler.state_dict(),
                                                               "scheduler state_dict")
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
    if meta.get("format") != _FORMAT or meta.get("version") not in _READABLE_VERSIONS:
        raise ValueError(f"{path}: unsupported checkpoint format {meta.get('format')} v{meta.get('version')}")

    state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    for alias, target in meta.get("model_aliases", {}).items():
        state[alias] = state[target]
    model.load_state_dict(state, strict=strict)

    if optimizer is not None:
        om = meta.get("optimizer")
        if om is None:
            raise ValueError(f"{path} has no optimizer state but an optimizer was given")
        expected = getattr(optimizer, "checkpoint_class", type(optimizer).__name__)
        if om["class"] != expected:
            raise ValueError(f"{path} holds {om['class']} state; cannot load it into {expected}")
        opt_state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim/"):
                _, idx, name = k.split("/", 2)
                opt_state.setdefault(int(idx), {})[name] = v
        for idx, d in om["scalars"].items():
            opt_state.setdefault(int(idx), {}).update(d)
        for idx, d in om.get("encoded", {}).items():
            opt_state.setdefault(int(idx), {}).update(
                {k: _decode(v, tensors) for k, v in d.items()})
        saved_groups = _decode(om["param_groups"], tensors)
        groups = _restore_group_types(saved_groups, optimizer.state_dict()["param_groups"])
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    if scheduler is not None:
        if "scheduler" not in meta:
            raise ValueError(f"{path} has no scheduler state but a scheduler was given")
        scheduler.load_state_dict(_decode(meta["scheduler"], tensors))
    if generators:
        for name, g in generators.items():
            key = f"generator/{name}"
            if key not in tensors:
                raise KeyError(f"{path} has no generator named {name!r} (has {meta.get('generators', [])})")
            g.set_state(tensors[key])
    if restore_rng and "rng" in meta:
        _restore_rng(tensors, meta["rng"])
    return Checkpoint(step=int(meta["step"]), extra=meta.get("extra", {}))
