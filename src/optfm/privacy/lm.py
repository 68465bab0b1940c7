r"""DP fine-tuning of ``transformers`` causal LMs with :func:`optfm.privacy.make_private`.

Three things differ from DP training of a small classifier:

1. **The loss must be a mean of per-sample losses.** Opacus's ``loss_reduction="mean"`` takes
   ``∂L/∂θ`` of a batch loss ``L``, multiplies by the batch size ``B`` and reads off one slice
   per sample: that slice is sample ``i``'s gradient only if ``L = (1/B) Σ_i ℓ_i`` with ``ℓ_i`` a
   function of sample ``i`` alone. The usual causal-LM loss (``model(..., labels=...).loss``) is a
   token mean over the *whole batch*, ``L = Σ_i Σ_t ℓ_it / N_tok``; its slices are
   ``(B n_i / N_tok)`` × sample ``i``'s token-mean gradient, scaled by a factor that depends on the
   other samples' lengths (``N_tok``). Clipping then bounds each slice, but adding or removing
   one sample rescales every other sample's contribution, so the sensitivity is no longer ``C``
   and the accountant's ε does not hold. :func:`causal_lm_per_sample_loss` (and the module
   :class:`CausalLMLoss`) computes each sample's own token mean over its labelled tokens
   (``labels != ignore_index``) and returns their mean over samples; a sample without labelled
   tokens has loss 0 and gradient 0.
2. **Per-sample inputs for position embeddings.** GPT-2 builds ``position_ids`` of shape (1, L)
   and broadcasts them over the batch, so Opacus would give its position-embedding weight a
   per-sample gradient of batch size 1 (see ``tests/test_privacy_transformers.py``).
   :func:`prepare_lm_for_dp` installs a forward pre-hook on the transformer body that, in
   training with gradients enabled and no ``position_ids`` given, passes the model's own default
   ``arange(L)`` expanded to ``(B, L)`` (:func:`per_sample_position_ids`); the values are
   unchanged, only the batch dimension is materialised. Rotary embeddings (Llama) have no
   parameters and need nothing, but the hook is harmless there.
3. **Which parameters are trained decides the memory.** Opacus hooks only trainable layers, so a
   frozen base model costs no per-sample memory: with LoRA (``lora=...``, PEFT) only the adapter
   matrices get per-sample gradients. Per-sample gradients of a token embedding are
   ``B × vocab × hidden``; ``train_embeddings=False`` freezes them (and a tied LM head with them).

Tied embeddings (``tie_word_embeddings=True``): in hooks mode Opacus sums the per-sample
gradients of the input-embedding and LM-head uses of the one tensor exactly (checked against
per-example autograd in ``tests/test_privacy_grad_samplers.py``); ghost clipping cannot, and
``make_private(grad_sample_mode="ghost")`` refuses a trainable tied tensor with a ``ValueError``.

Typical use::

    model = prepare_lm_for_dp(LlamaForCausalLM(cfg), lora={"r": 8, "target_modules": [...]})
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, opt, loader, engine = make_private(model, opt, loader, ..., criterion=CausalLMLoss())
    for ids, mask, labels in loader:
        opt.zero_grad()
        loss = engine.criterion(model(input_ids=ids, attention_mask=mask).logits, labels)
        loss.backward()
        opt.step()
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from optfm.privacy.grad_samplers import (
    modules_without_grad_sampler,
    register_transformers_grad_samplers,
    tied_parameters,
)

__all__ = [
    "IGNORE_INDEX",
    "CausalLMLoss",
    "causal_lm_per_sample_loss",
    "measure_dp_step",
    "per_sample_position_ids",
    "prepare_lm_for_dp",
]

IGNORE_INDEX = -100
_REDUCTIONS = ("mean", "sum", "none")


def causal_lm_per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, *,
                              ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy, averaged over each sample's own labelled tokens, then over
    samples (``reduction="mean"``; ``"sum"`` sums over samples, ``"none"`` returns shape (B,)).

    ``logits`` (B, L, V) and ``labels`` (B, L) are aligned as in ``transformers``
    (``labels = input_ids`` with ``ignore_index`` on padding and on tokens not to train on); the
    shift by one happens here. Half-precision logits are upcast to float32 for the loss.
    See the module docstring for why DP needs this rather than the batch token mean.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, L, V) and labels (B, L), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    target = labels[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=ignore_index, reduction="none")
    count = (target != ignore_index).sum(dim=1).clamp_min(1)
    per_sample = nll.sum(dim=1) / count
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


class CausalLMLoss(nn.Module):
    """:func:`causal_lm_per_sample_loss` as a criterion: ``CausalLMLoss()(logits, labels)``.

    It has the ``reduction`` attribute that Opacus's ghost-clipping criterion wrapper sets to
    ``"none"`` to obtain one loss per sample, so it can be passed as ``criterion`` to
    :func:`optfm.privacy.make_private` in any ``grad_sample_mode``.
    """

    def __init__(self, *, ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
        self.ignore_index = int(ignore_index)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return causal_lm_per_sample_loss(logits, labels, ignore_index=self.ignore_index,
                                         reduction=self.reduction)


def per_sample_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """``arange(L)`` repeated to ``(B, L)``: the default position ids of ``transformers`` models
    without a cache, with one row per sample for Opacus. Contiguous (B·L integers), not an
    ``expand`` view: Opacus 1.6's ghost-clipping embedding norm sampler calls ``.view`` on the
    layer's input, which fails on an expanded tensor."""
    b, length = input_ids.shape[:2]
    return torch.arange(length, device=input_ids.device).expand(b, length).contiguous()


def _position_ids_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    if not (module.training and torch.is_grad_enabled()) or kwargs.get("position_ids") is not None:
        return None
    if len(args) > 1 or kwargs.get("past_key_values") is not None:
        return None  # positional arguments beyond input_ids, or a cache: leave the model's default
    x = args[0] if args else kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None:
        return None
    return args, {**kwargs, "position_ids": per_sample_position_ids(x)}


def _transformer_body(model: nn.Module) -> nn.Module:
    """The module that builds position ids (``GPT2Model``, ``LlamaModel``, ...)."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def _lora_config(lora: Any):
    import peft

    if isinstance(lora, peft.LoraConfig):
        return lora
    if isinstance(lora, dict):
        return peft.LoraConfig(**{"task_type": "CAUSAL_LM", **lora})
    raise TypeError(f"lora must be None, a dict of peft.LoraConfig fields or a peft.LoraConfig, got "
                    f"{type(lora).__name__}")


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or type(m).__name__.endswith(
        ("RMSNorm", "LayerNorm"))


def prepare_lm_for_dp(model: nn.Module, *, lora: Any = None, train_norms: bool | None = None,
                      train_embeddings: bool | None = None, per_sample_positions: bool = True,
                      grad_sample_mode: str = "hooks") -> nn.Module:
    """Get a ``transformers`` causal LM ready for :func:`optfm.privacy.make_private`.

    - registers optfm's grad samplers (:func:`register_transformers_grad_samplers`);
    - installs the per-sample ``position_ids`` hook (``per_sample_positions``; see the module
      docstring) on the transformer body;
    - ``lora``: a ``peft.LoraConfig`` or a dict of its fields (``task_type`` defaults to
      ``"CAUSAL_LM"``; ``target_modules`` to PEFT's default for the architecture): wraps the model
      with ``peft.get_peft_model``, which freezes every base weight, and returns the PEFT model;
    - ``train_norms`` / ``train_embeddings``: ``True`` / ``False`` set ``requires_grad`` of every
      normalisation layer / every ``nn.Embedding`` (token and learned position embeddings; a
      tied LM head shares the token-embedding tensor), after the LoRA wrapping; ``None`` leaves
      them as they are (all trainable without LoRA, frozen with LoRA);
    - checks what ``make_private`` would do: with ``grad_sample_mode="ghost"`` a trainable tied
      tensor raises ``ValueError``; a trainable layer without a grad sampler (Opacus would use its
      slower ``functorch`` fallback) gives a warning.

    Returns the model (the PEFT wrapper when ``lora`` is given). Frozen parameters get no
    per-sample gradients: Opacus hooks only layers with trainable parameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if grad_sample_mode not in ("hooks", "functorch", "ghost"):
        raise ValueError(f"grad_sample_mode must be 'hooks', 'functorch' or 'ghost', got {grad_sample_mode!r}")
    for name, v in (("train_norms", train_norms), ("train_embeddings", train_embeddings)):
        if v is not None and not isinstance(v, bool):
            raise TypeError(f"{name} must be None, True or False, got {v!r}")
    register_transformers_grad_samplers()
    if per_sample_positions:
        body = _transformer_body(model)
        if not getattr(body, "_optfm_position_ids_hook", False):
            body.register_forward_pre_hook(_position_ids_hook, with_kwargs=True)
            body._optfm_position_ids_hook = True
    if lora is not None:
        import peft

        with warnings.catch_warnings():  # PEFT reads a transformers-5-deprecated attribute
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                    category=FutureWarning)
            model = peft.get_peft_model(model, _lora_config(lora))
    for m in model.modules():
        flag = train_norms if _is_norm(m) else train_embeddings if isinstance(m, nn.Embedding) else None
        if flag is not None:
            for p in m.parameters(recurse=False):
                p.requires_grad_(flag)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no parameter of the model is trainable")
    if grad_sample_mode == "ghost":
        tied = tied_parameters(model, ghost_only=True)
        if tied:
            name, users = next(iter(tied.items()))
            raise ValueError(f"trainable parameter {name} is tied across {', '.join(users)}, which ghost "
                             "clipping does not support: untie it (tie_word_embeddings=False in the "
                             "config), freeze it (train_embeddings=False) or use grad_sample_mode='hooks'")
    if grad_sample_mode != "functorch":
        missing = modules_without_grad_sampler(model)
        if missing:
            warnings.warn("these trainable layers have no Opacus grad sampler and will go through its "
                          f"slower functorch fallback: {', '.join(missing)}", stacklevel=2)
    return model


def measure_dp_step(model_factory: Callable[[], nn.Module], grad_sample_mode: str = "hooks", *,
                    lora: Any = None, train_embeddings: bool | None = None, batch_size: int = 16,
                    seq_len: int = 32, seed: int = 0) -> dict[str, float]:
    """Peak tensor memory and time of one DP-Adam step of a causal LM from ``model_factory``
    (σ = 1, C = 1, no Poisson sampling, random tokens, loss :class:`CausalLMLoss`), after one
    warm-up step. Returns ``{"peak_bytes", "activation_bytes", "gradient_bytes", "step_time_s",
    "trainable_params"}``; peak bytes come from :func:`optfm.training.memory.peak_tensor_bytes`
    (torch's memory profiler; CPU), and are ``nan`` where it is unavailable. ``step_time_s`` is
    timed without the profiler."""
    from torch.utils.data import DataLoader, TensorDataset

    from optfm.privacy.engine import make_private
    from optfm.training.memory import peak_tensor_bytes

    torch.manual_seed(seed)
    model = prepare_lm_for_dp(model_factory(), lora=lora, train_embeddings=train_embeddings,
                              grad_sample_mode=grad_sample_mode)
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    mask = torch.ones_like(ids)
    loader = DataLoader(TensorDataset(ids, mask, ids.clone()), batch_size=batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(Secure RNG|Optimal order).*")
        model, opt, loader, engine = make_private(
            model, torch.optim.Adam(params, lr=1e-3), loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False, grad_sample_mode=grad_sample_mode, criterion=CausalLMLoss(),
            accountant="rdp")
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = engine.criterion(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids)
        loss.backward()
        opt.step()

    step()  # warm-up: optimizer state, lazily created buffers
    t0 = time.perf_counter()
    step()
    elapsed = time.perf_counter() - t0
    prof = peak_tensor_bytes(step)
    nan = float("nan")
    cats = prof["by_category"] if prof else {}
    return {"peak_bytes": float(prof["peak_bytes"]) if prof else nan,
            "activation_bytes": float(cats.get("activation", nan)),
            "gradient_bytes": float(cats.get("gradient", nan)),
            "step_time_s": elapsed,
            "trainable_params": float(sum(p.numel() for p in params))}
