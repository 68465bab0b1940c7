"""Shared pieces of the alignment trainers: TRL-format data, log-probs, generation, the config.

Data follow TRL's column conventions: demonstrations have ``prompt`` and ``completion``;
preferences have ``prompt``, ``chosen`` and ``rejected``. A dataset is a list of dicts or anything
with ``column_names`` that iterates over dict rows (a ``datasets.Dataset``). Missing or misnamed
columns, empty responses and pairs longer than the model's context raise ``ValueError`` naming
the column or parameter.

Generation goes through ``model.generate`` (``sampler="generate"``) or, for tiny models on a
closed response vocabulary, a fixed-length ancestral sampler restricted to ``allowed_token_ids``
(``sampler="fixed"``) whose samples are exactly ``max_new_tokens`` tokens long.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from optfm.training.lm import (
    GeneratedText,
    check_tokenizer_model,
    encode_pairs,
    left_pad_prompts,
    sequence_logprob,
)

__all__ = [
    "DEMO_COLUMNS",
    "PREF_COLUMNS",
    "AlignConfig",
    "AlignTrainer",
    "BudgetReached",
    "batch_logprob",
    "disable_dropout",
    "frozen_copy",
    "generate",
    "rows",
    "stops_at_budget",
]

DEMO_COLUMNS = ("prompt", "completion")
PREF_COLUMNS = ("prompt", "chosen", "rejected")
SAMPLERS = ("generate", "fixed")


def rows(dataset: Any, columns: Sequence[str], name: str) -> list[dict[str, str]]:
    """Validate a TRL-format dataset and return its rows as dicts of the needed columns."""
    if dataset is None:
        raise ValueError(f"{name} is required (a dataset with columns {', '.join(columns)})")
    have = getattr(dataset, "column_names", None)
    data = list(dataset)
    if not data:
        raise ValueError(f"{name} is empty")
    if have is None:
        if not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{name} must be a list of dicts or a datasets.Dataset; found a "
                             f"{type(data[0]).__name__} row")
        have = list(data[0])
    missing = [c for c in columns if c not in have]
    if missing:
        raise ValueError(f"{name} is missing column(s) {', '.join(repr(m) for m in missing)}; it "
                         f"has {', '.join(map(repr, have))} (TRL format: {', '.join(columns)})")
    out = []
    for i, r in enumerate(data):
        row = {}
        for c in columns:
            v = r.get(c) if isinstance(r, dict) else None
            if not isinstance(v, str):
                raise ValueError(f"{name}[{i}][{c!r}] must be a string, got {type(v).__name__}")
            if c != "prompt" and not v.strip():
                raise ValueError(f"{name}[{i}][{c!r}] is an empty response")
            row[c] = v
        out.append(row)
    return out


@dataclass
class AlignConfig:
    """Hyperparameters shared by every alignment trainer (each uses the fields it needs)."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 16
    epochs: int = 1
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | hinge | linear (SPIN/IRFT and DPO)
    max_grad_norm: float | None = 1.0
    # generation of the model's own samples
    sampler: str = "generate"  # generate | fixed
    max_new_tokens: int = 32
    do_sample: bool = True
    temperature: float = 1.0
    # tokenisation
    add_eos: bool = True
    max_length: int | None = None
    max_steps: int | None = None  # stop after this many optimizer steps (a fixed budget)
    disable_dropout: bool = True  # as TRL: policy and reference log-probs comparable, less noise
    seed: int = 0

    def validate(self) -> AlignConfig:
        for name in ("lr", "beta", "temperature"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number > 0, got {v}")
        for name in ("batch_size", "epochs", "max_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.loss_type not in ("sigmoid", "hinge", "linear"):
            raise ValueError(f"loss_type must be sigmoid, hinge or linear, got {self.loss_type!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool)
                                           or not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise ValueError(f"max_steps must be an integer >= 1 or None, got {self.max_steps!r}")
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def disable_dropout(model: nn.Module) -> None:
    """Set ``p = 0`` on every ``nn.Dropout`` in ``model`` (train-mode log-probs then equal
    eval-mode ones, so an implicit reward starts at exactly 0 against a frozen copy)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with ``requires_grad=False`` (a reference / stage model)."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def batch_logprob(model: nn.Module, tokenizer: Any, prompts: Sequence[str],
                  responses: Sequence[str], *, add_eos: bool = True,
                  max_length: int | None = None, grad: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-prob and response length per pair (prompt masked)."""
    device = next(model.parameters()).device
    batch = encode_pairs(tokenizer, prompts, responses, add_eos=add_eos, max_length=max_length,
                         model=model, device=device)
    if grad:
        return sequence_logprob(model, batch)
    with torch.no_grad():
        return sequence_logprob(model, batch)


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *,
             sampler: str = "generate", max_new_tokens: int = 32, do_sample: bool = True,
             temperature: float = 1.0, allowed_token_ids: Sequence[int] | None = None,
             generator: torch.Generator | None = None, batch_size: int = 64) -> list[str]:
    """The model's own responses to ``prompts`` (decoded, special tokens dropped).

    ``sampler="generate"`` uses ``model.generate`` (left padding, stops at EOS).
    ``sampler="fixed"`` samples exactly ``max_new_tokens`` tokens, restricted to
    ``allowed_token_ids`` when given, with ``generator`` for reproducible draws; tokens are
    joined with spaces (word-level vocabularies).

    Each result is a :class:`~optfm.training.lm.GeneratedText`: a string that keeps the sampled
    token ids (with the EOS if the model produced one), so scoring it uses exactly those tokens.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if allowed_token_ids is not None and sampler != "fixed":
        raise ValueError("allowed_token_ids restricts the fixed-length sampler only; use "
                         "sampler='fixed' (model.generate samples from the whole vocabulary)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for b in range(0, len(prompts), batch_size):
            ids, att = left_pad_prompts(tokenizer, prompts[b: b + batch_size])
            width = ids.shape[1]
            ids, att = ids.to(device), att.to(device)
            if sampler == "generate":
                kw = {"do_sample": do_sample, "temperature": temperature} if do_sample else {
                    "do_sample": False}
                gen = model.generate(input_ids=ids, attention_mask=att,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad,
                                     eos_token_id=tokenizer.eos_token_id, **kw)
                for row in gen[:, width:].cpu().tolist():
                    kept = _until_eos(row, tokenizer.eos_token_id, pad)
                    text = tokenizer.decode(kept, skip_special_tokens=True).strip()
                    out.append(GeneratedText(text, kept))
                continue
            new = _fixed_length(model, ids, att, max_new_tokens, do_sample, temperature,
                                allowed_token_ids, generator)
            for row in new.cpu().tolist():
                out.append(GeneratedText(" ".join(tokenizer.convert_ids_to_tokens(row)), row))
    finally:
        model.train(was_training)
    return out


def _until_eos(row: list[int], eos: int | None, pad: int) -> list[int]:
    """The generated ids up to and including the first EOS (``generate`` pads after it)."""
    if eos is not None and eos in row:
        return row[: row.index(eos) + 1]
    if pad != eos:
        while row and row[-1] == pad:
            row = row[:-1]
    return row


def _fixed_length(model, ids, att, n, do_sample, temperature, allowed, generator):
    """Ancestral sampling of exactly ``n`` tokens (left-padded prompts, position ids from mask)."""
    allowed_t = (torch.as_tensor(list(allowed), dtype=torch.long, device=ids.device)
                 if allowed is not None else None)
    new = []
    for _ in range(n):
        pos = (att.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, -1].float()
        if allowed_t is not None:
            logits = logits[:, allowed_t]
        if do_sample:
            probs = torch.softmax(logits / temperature, dim=-1)
            pick = torch.multinomial(probs.cpu(), 1, generator=generator).to(ids.device)
        else:
            pick = logits.argmax(-1, keepdim=True)
        tok = allowed_t[pick] if allowed_t is not None else pick
        new.append(tok)
        ids = torch.cat([ids, tok], dim=1)
        att = torch.cat([att, torch.ones_like(tok)], dim=1)
    return torch.cat(new, dim=1)


class BudgetReached(Exception):
    """Raised by :meth:`AlignTrainer.update` when ``max_steps`` is reached; ``train`` stops."""


def stops_at_budget(train: Callable[..., list]) -> Callable[..., list]:
    """Decorator for ``train`` methods: return the history when the step budget is reached."""
    def wrapper(self, *args, **kwargs):
        try:
            return train(self, *args, **kwargs)
        except BudgetReached:
            return self.history
    wrapper.__doc__, wrapper.__name__ = train.__doc__, train.__name__
    return wrapper


class AlignTrainer:
    """Base class: optimizer, gradient step, per-step log. Subclasses implement ``train``.

    ``allowed_token_ids`` restricts the fixed-length sampler to a closed response vocabulary.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: AlignConfig | None = None, *,
                 optimizer: torch.optim.Optimizer | None = None,
                 callback: Callable[[int, dict], None] | None = None,
                 allowed_token_ids: Sequence[int] | None = None, **overrides: Any) -> None:
        cfg = copy.deepcopy(config) if config is not None else AlignConfig()
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise ValueError(f"unknown AlignConfig field {k!r}")
            setattr(cfg, k, v)
        self.config = cfg.validate()
        check_tokenizer_model(tokenizer, model)
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad or eos token")
        self.model = model
        self.tokenizer = tokenizer
        if cfg.disable_dropout:
            disable_dropout(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = optimizer or torch.optim.AdamW(self.params, lr=cfg.lr,
                                                        weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.callback = callback
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.allowed_token_ids = (None if allowed_token_ids is None
                                  else [int(i) for i in allowed_token_ids])

    def logprob(self, model: nn.Module, prompts: Sequence[str], responses: Sequence[str], *,
                grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_logprob(model, self.tokenizer, prompts, responses,
                             add_eos=self.config.add_eos, max_length=self.config.max_length,
                             grad=grad)

    def sample(self, model: nn.Module, prompts: Sequence[str]) -> list[str]:
        c = self.config
        out = generate(model, self.tokenizer, prompts, sampler=c.sampler,
                       max_new_tokens=c.max_new_tokens, do_sample=c.do_sample,
                       temperature=c.temperature, allowed_token_ids=self.allowed_token_ids,
                       generator=self.generator)
        # an immediate EOS decodes to "" but is still a response: its token ids are kept
        return out

    def batches(self, n: int) -> Iterable[list[int]]:
        """Indices of one shuffled epoch in batches of ``batch_size``."""
        perm = torch.randperm(n, generator=self.generator).tolist()
        for b in range(0, n, self.config.batch_size):
            yield perm[b: b + self.config.batch_size]

    def update(self, loss: torch.Tensor, **log: Any) -> dict[str, Any]:
        """One optimizer step on ``loss``; records ``loss`` and ``log`` (floats)."""
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss ({value}) at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        rec = {"step": self.step, "loss": value,
               **{k: float(v) if torch.is_tensor(v) else v for k, v in log.items()}}
        self.history.append(rec)
        if self.callback is not None:
            self.callback(self.step, rec)
        if self.config.max_steps is not None and self.step >= self.config.max_steps:
            raise BudgetReached
        return rec
