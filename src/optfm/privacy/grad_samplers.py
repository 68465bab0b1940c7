r"""Opacus per-sample gradient samplers for the ``transformers`` layers Opacus does not cover.

Opacus computes per-sample gradients with one hand-written *grad sampler* per layer type
(``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm``, ...). A trainable layer of any
other type is handed whole to its ``functorch`` fallback, which re-runs the layer's forward under
``vmap(grad)`` for every backward pass: correct, but slower, and without a ghost-clipping norm
sampler. Two layers of the usual causal LMs are missing:

- ``transformers.pytorch_utils.Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` of shape
  ``(in, out)`` (the transpose of ``nn.Linear``). Per sample, with activations ``a`` (B, ..., in)
  and output gradients ``g`` (B, ..., out)::

      ∂W_n = Σ_t a_{n,t}ᵀ g_{n,t}   (in, out)          ∂b_n = Σ_t g_{n,t}

  and, for ghost clipping, the per-sample norm without forming ``∂W_n``:
  ``‖∂W_n‖² = ⟨a_n a_nᵀ, g_n g_nᵀ⟩`` (Frobenius norms are invariant under transposition, so this
  is exactly Opacus's ``nn.Linear`` norm sampler).
- Llama-style RMSNorm (``LlamaRMSNorm`` and its verbatim copies ``MistralRMSNorm``,
  ``Qwen2RMSNorm``, ``Qwen3RMSNorm``): ``y = w ⊙ cast(x̂)`` with
  ``x̂ = float32(x) · rsqrt(mean(float32(x)²) + variance_epsilon)`` and ``cast`` back to the input
  dtype, exactly as the module's forward computes it. Per sample::

      ∂w_n = Σ_t g_{n,t} ⊙ cast(x̂_{n,t})

  (Gemma's RMSNorm, ``x̂ · (1 + w)`` in float32, is a different layer and is not registered.)

With these, a ``LlamaForCausalLM`` or ``GPT2LMHeadModel`` built from its config runs entirely
through Opacus's hooks (no ``functorch`` fallback): its trainable layers are ``nn.Embedding``,
``nn.Linear``, ``nn.LayerNorm`` and the two above; rotary embeddings have no parameters. PEFT LoRA
adapters are ``nn.Linear`` layers and need nothing more.

Registration is lazy and idempotent: :func:`register_transformers_grad_samplers` registers the
samplers of every class whose ``transformers`` module is already imported (a model that uses a
class has necessarily imported its module), so it never imports ``transformers`` itself and works
without it. :func:`optfm.privacy.make_private` and :func:`optfm.privacy.prepare_lm_for_dp` call it;
call it yourself before wrapping a model in Opacus's ``GradSampleModule`` directly.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

__all__ = [
    "compute_conv1d_grad_sample",
    "compute_conv1d_norm_sample",
    "compute_rms_norm_grad_sample",
    "modules_without_grad_sampler",
    "register_rms_norm_grad_sampler",
    "register_transformers_grad_samplers",
    "tied_parameters",
]

# (module, class) pairs whose forward is LlamaRMSNorm's, verbatim (checked in transformers 5.24).
_LLAMA_STYLE_RMS_NORMS = (
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"),
    ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm"),
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm"),
)
_CONV1D = ("transformers.pytorch_utils", "Conv1D")


def compute_conv1d_grad_sample(layer: nn.Module, activations: list[torch.Tensor],
                               backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of ``transformers``' ``Conv1D`` (``y = x W + b``, ``W``: (in, out))."""
    a = activations[0].to(backprops.dtype)
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = torch.einsum("n...i,n...j->nij", a, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = torch.einsum("n...k->nk", backprops)
    return ret


def compute_conv1d_norm_sample(layer: nn.Module, activations: list[torch.Tensor],
                               backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of ``Conv1D`` for ghost clipping: Opacus's ``nn.Linear`` norm
    sampler, which is exact here because ``‖Mᵀ‖_F = ‖M‖_F``. Inputs with several middle
    dimensions (B, ..., in) are flattened to (B, T, in): the per-sample gradient sums over them."""
    from opacus.grad_sample.linear import compute_linear_norm_sample

    a = activations[0]
    if backprops.dim() > 3:
        a = a.reshape(a.shape[0], -1, a.shape[-1])
        backprops = backprops.reshape(backprops.shape[0], -1, backprops.shape[-1])
    return compute_linear_norm_sample(layer, [a], backprops)


def compute_rms_norm_grad_sample(layer: nn.Module, activations: list[torch.Tensor],
                                 backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient of a Llama-style RMSNorm weight, recomputing the normalised input the
    way the module's forward does (float32 statistics, ``variance_epsilon``, cast back)."""
    if not layer.weight.requires_grad:
        return {}
    x = activations[0]
    eps = layer.variance_epsilon if hasattr(layer, "variance_epsilon") else layer.eps
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h.to(x.dtype)
    prod = backprops * h.to(backprops.dtype)
    return {layer.weight: prod.reshape(prod.shape[0], -1, prod.shape[-1]).sum(1)}


def _register(cls: type, grad_sampler: Any, norm_sampler: Any = None) -> bool:
    from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping
    from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler

    done = GradSampleHooks.GRAD_SAMPLERS.get(cls) is grad_sampler and (
        norm_sampler is None or GradSampleHooksFastGradientClipping.NORM_SAMPLERS.get(cls) is norm_sampler)
    if done:
        return False
    register_grad_sampler(cls)(grad_sampler)
    if norm_sampler is not None:
        register_norm_sampler(cls)(norm_sampler)
    return True


def register_rms_norm_grad_sampler(cls: type) -> None:
    """Register :func:`compute_rms_norm_grad_sample` for another RMSNorm class whose forward is
    exactly ``LlamaRMSNorm``'s (a ``weight`` of shape (hidden,), ``variance_epsilon`` or ``eps``,
    statistics in float32, result cast back to the input dtype, then ``weight *``)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    _register(cls, compute_rms_norm_grad_sample)


def _loaded_class(module_name: str, class_name: str) -> type | None:
    mod = sys.modules.get(module_name)
    return getattr(mod, class_name, None) if mod is not None else None


def register_transformers_grad_samplers() -> list[str]:
    """Register the samplers of this module for every ``transformers`` class already imported;
    return the names of the classes registered by this call (empty when all were registered
    before, or ``transformers`` is not imported). Idempotent and cheap: call it any time, and
    again after importing more model classes."""
    new = []
    conv1d = _loaded_class(*_CONV1D)
    if conv1d is not None and _register(conv1d, compute_conv1d_grad_sample, compute_conv1d_norm_sample):
        new.append(conv1d.__name__)
    for module_name, class_name in _LLAMA_STYLE_RMS_NORMS:
        cls = _loaded_class(module_name, class_name)
        if cls is not None and _register(cls, compute_rms_norm_grad_sample):
            new.append(class_name)
    return new


def modules_without_grad_sampler(model: nn.Module) -> list[str]:
    """Names of the modules with trainable parameters of their own that Opacus would hand to its
    ``functorch`` fallback (no grad sampler registered for their type): empty when a model runs
    entirely through Opacus's hooks."""
    from opacus.grad_sample import GradSampleHooks

    register_transformers_grad_samplers()
    out = []
    for name, m in model.named_modules():
        if any(p.requires_grad for p in m.parameters(recurse=False)) \
                and type(m) not in GradSampleHooks.GRAD_SAMPLERS:
            out.append(f"{name or '<root>'} ({type(m).__name__})")
    return out


def tied_parameters(model: nn.Module, *, ghost_only: bool = False) -> dict[str, list[str]]:
    """Trainable tensors that more than one layer owns (tied weights, such as input and output
    embeddings with ``tie_word_embeddings=True``): ``{first name: [every owning layer's name]}``.

    Opacus's hooks mode handles them exactly: it counts the forward uses of each parameter and
    sums the per-sample gradients of all uses before promoting them (checked against per-example
    autograd in the tests). Ghost clipping cannot: each layer's norm sampler yields the per-sample
    norm of its own contribution, and the norm of a sum is not a function of the parts' norms.
    With ``ghost_only=True`` only tensors one of whose owners has a ghost norm sampler are listed
    (those are the ones Opacus refuses at the first forward pass). A single layer called twice
    in one forward pass is not visible here; Opacus refuses it in ghost mode at that pass.
    """
    from opacus.grad_sample import GradSampleHooksFastGradientClipping

    norm_samplers = GradSampleHooksFastGradientClipping.NORM_SAMPLERS
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append((f"{mname}.{pname}" if mname else pname, m))
    out = {}
    for users in owners.values():
        if len(users) > 1 and (not ghost_only or any(type(m) in norm_samplers for _, m in users)):
            out[users[0][0]] = [n for n, _ in users]
    return out
