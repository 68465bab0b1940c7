"""``Unlearner``: unlearn a forget set from any ``transformers`` causal LM with NGDiff or a baseline.

Methods (``UnlearnConfig.method``), all on the same harness and budget — every step draws one
forget batch and one retain batch and back-propagates the two terms separately (see
:mod:`optfm.unlearning.ngdiff`), so each method logs CE_F, CE_R, ‖g_F‖, ‖g_R‖, cos θ and η:

- ``"ngdiff"``: d = g_R/‖g_R‖ − g_F/‖g_F‖ on the LM losses CE_R and CE_F.
- ``"ga"``: minimise −CE_F (the retain batch is only evaluated for the log).
- ``"grad_diff"``: minimise −CE_F + α·CE_R.
- ``"npo"``: NPO on sequence log-prob ratios against a frozen reference + α·CE_R.
- ``"simnpo"``: SimNPO (reference-free) + α·CE_R.

``auto_lr=True`` adapts the lr with :class:`optfm.unlearning.AutoLR` every ``auto_lr_period``
steps on a fresh retain batch (``auto_lr_loss="retain"``) or on the scalarized loss
``CE_R/‖g_R‖ − CE_F/‖g_F‖`` (``"scalarized"``).

The data are (prompt, answer) pairs: tuples, dicts with ``question``/``answer`` or
``prompt``/``completion`` keys, objects with ``question`` and ``answer`` attributes, or plain
strings (a document: the whole text is the "answer", nothing is masked). Losses cover answer
tokens only. LoRA: pass ``lora={"r": 8, "lora_alpha": 16, "target_modules": [...]}`` (or a
``peft.LoraConfig``); only the adapters train, and NPO's reference is the same model with the
adapters disabled (no second copy of the weights).

Failures are loud: overlapping or empty forget/retain sets, a tokenizer the model cannot embed, a
bad config value raise ``ValueError``; a non-finite loss or gradient mid-run raises
:class:`UnlearningDiverged` naming the step and the last good checkpoint (``checkpoint_every``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optfm.training.checkpoint import load_checkpoint, save_checkpoint
from optfm.training.lm import check_tokenizer_model, encode_pairs, lm_loss, sequence_logprob
from optfm.training.metrics import MetricLogger
from optfm.unlearning.auto_lr import AutoLR
from optfm.unlearning.ngdiff import LinearCombination, NGDiff, TwoTaskGradient
from optfm.unlearning.objectives import npo_loss, simnpo_loss

__all__ = ["METHODS", "UnlearnConfig", "Unlearner", "UnlearningDiverged", "as_pairs"]

METHODS = ("ga", "grad_diff", "npo", "simnpo", "ngdiff")
_OPTIMIZERS = ("adamw", "adam", "sgd")
_AUTO_LR_LOSSES = ("retain", "scalarized")


class UnlearningDiverged(FloatingPointError):
    """A loss or gradient became non-finite; ``step`` and ``checkpoint`` (or None) say where."""

    def __init__(self, message: str, *, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class UnlearnConfig:
    """Hyperparameters of one unlearning run (defaults: the spec's NGDiff/NPO/SimNPO values)."""

    method: str = "ngdiff"
    steps: int = 100
    lr: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only
    batch_size: int = 8  # forget batch
    retain_batch_size: int | None = None  # default: batch_size
    grad_accum: int = 1
    alpha: float = 1.0  # retain weight of grad_diff / npo / simnpo
    npo_beta: float = 0.1
    simnpo_beta: float = 4.5
    simnpo_delta: float = 0.125
    auto_lr: bool = False
    auto_lr_period: int = 4
    auto_lr_loss: str = "retain"
    max_grad_norm: float | None = None
    eps: float = 1e-12
    max_length: int | None = None  # default: the model's context length
    prompt_template: str = "{question}"  # e.g. "[INST] {question} [/INST]" for chat models
    seed: int = 0
    checkpoint_every: int | None = None

    def validate(self) -> UnlearnConfig:
        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")

        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(_OPTIMIZERS)}; got {self.optimizer!r}")
        if self.auto_lr_loss not in _AUTO_LR_LOSSES:
            raise ValueError(f"auto_lr_loss must be one of {', '.join(_AUTO_LR_LOSSES)}; "
                             f"got {self.auto_lr_loss!r}")
        for name in ("steps", "batch_size", "grad_accum", "auto_lr_period"):
            positive_int(name)
        if self.retain_batch_size is not None:
            positive_int("retain_batch_size")
        if self.checkpoint_every is not None:
            positive_int("checkpoint_every")
        for name in ("lr", "npo_beta", "simnpo_beta"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number > 0, got {v}")
        for name in ("weight_decay", "momentum", "alpha", "eps"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if "{question}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain '{{question}}', got "
                             f"{self.prompt_template!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pair(item: Any, where: str) -> tuple[str, str]:
    if isinstance(item, str):
        return "", item
    if isinstance(item, tuple | list) and len(item) == 2:
        return str(item[0]), str(item[1])
    if isinstance(item, dict):
        for q, a in (("question", "answer"), ("prompt", "completion"), ("prompt", "response")):
            if q in item and a in item:
                return str(item[q]), str(item[a])
        if "text" in item:
            return "", str(item["text"])
        raise ValueError(f"{where}: a dict item needs 'question'/'answer', 'prompt'/'completion' or "
                         f"'text' keys, got {sorted(item)}")
    if hasattr(item, "question") and hasattr(item, "answer"):
        return str(item.question), str(item.answer)
    raise ValueError(f"{where}: cannot read a (prompt, answer) pair from {type(item).__name__}")


def as_pairs(data: Iterable[Any], name: str, prompt_template: str = "{question}"
             ) -> list[tuple[str, str]]:
    """Normalise a dataset (see module docstring for the accepted item forms) to pairs; prompts
    of QA items are formatted with ``prompt_template`` (documents keep an empty prompt)."""
    pairs = [_pair(x, f"{name}[{i}]") for i, x in enumerate(data)]
    if prompt_template != "{question}":
        pairs = [(prompt_template.replace("{question}", q) if q else q, a) for q, a in pairs]
    if not pairs:
        raise ValueError(f"{name} is empty; unlearning needs at least one example in it")
    for i, (_, a) in enumerate(pairs):
        if not a.strip():
            raise ValueError(f"{name}[{i}] has an empty answer")
    return pairs


class _Sampler:
    """Batches drawn without replacement within an epoch, reshuffled each epoch (seeded)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.gen = n, batch_size, generator
        self._perm: list[int] = []

    def next(self) -> list[int]:
        out: list[int] = []
        for _ in range(min(self.batch_size, self.n)):
            if not self._perm:
                self._perm = torch.randperm(self.n, generator=self.gen).tolist()
            out.append(self._perm.pop())
        return out


def _apply_lora(model: nn.Module, lora: Any) -> nn.Module:
    try:
        import peft
    except ImportError as e:  # pragma: no cover - peft is a dependency
        raise ImportError("lora=... needs the 'peft' package: pip install peft") from e
    if isinstance(lora, dict):
        lora = peft.LoraConfig(task_type="CAUSAL_LM", **lora)
    if not isinstance(lora, peft.LoraConfig):
        raise ValueError(f"lora must be a dict of LoraConfig arguments or a peft.LoraConfig, "
                         f"got {type(lora).__name__}")
    return peft.get_peft_model(model, lora)


class Unlearner:
    """Unlearn ``forget`` from ``model`` while keeping ``retain`` (see module docstring).

    Args:
        model: a ``transformers`` causal LM (``PreTrainedModel``), trained on both sets.
        tokenizer: its tokenizer (checked against the model's embedding size).
        forget, retain: the two datasets (disjoint, non-empty).
        config: :class:`UnlearnConfig` (or keyword overrides via ``**overrides``).
        ref_model: NPO's frozen reference; default: a frozen copy of ``model`` at the start
            (with LoRA: the model with its adapters disabled).
        lora: LoRA adapters via ``peft`` (dict of ``LoraConfig`` arguments or a ``LoraConfig``).
        optimizer: a ready ``torch.optim`` optimizer over the trainable parameters, instead of
            building one from ``config.optimizer``.
        checkpoint_dir: where ``last.safetensors`` goes every ``checkpoint_every`` steps.
        log_path: optional JSONL file for the per-step log (also kept in ``self.history``).
        callback: called as ``callback(step, record)`` after every step.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, forget: Iterable[Any],
                 retain: Iterable[Any], config: UnlearnConfig | None = None, *,
                 ref_model: nn.Module | None = None, lora: Any = None,
                 optimizer: torch.optim.Optimizer | None = None,
                 checkpoint_dir: str | Path | None = None, log_path: str | Path | None = None,
                 callback: Callable[[int, dict], None] | None = None, **overrides: Any) -> None:
        cfg = copy.deepcopy(config) if config is not None else UnlearnConfig()
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise ValueError(f"unknown UnlearnConfig field {k!r}")
            setattr(cfg, k, v)
        self.config = cfg.validate()
        check_tokenizer_model(tokenizer, model)
        self.forget = as_pairs(forget, "forget", cfg.prompt_template)
        self.retain = as_pairs(retain, "retain", cfg.prompt_template)
        overlap = set(self.forget) & set(self.retain)
        if overlap:
            example = next(iter(overlap))
            raise ValueError(f"forget and retain overlap in {len(overlap)} example(s), e.g. "
                             f"{example!r}; they must be disjoint")
        if cfg.checkpoint_every is not None and checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir")
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.lora = lora is not None
        if self.lora:
            if ref_model is not None:
                raise ValueError("with lora the reference is the base model (adapters disabled); "
                                 "do not pass ref_model")
            model = _apply_lora(model, lora)
        self.model = model
        self.ref_model = None
        if cfg.method == "npo" and not self.lora:
            self.ref_model = ref_model if ref_model is not None else copy.deepcopy(model)
            self.ref_model.eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = optimizer if optimizer is not None else self._build_optimizer()
        self.combiner: TwoTaskGradient
        if cfg.method == "ngdiff":
            self.combiner = NGDiff(self.params, eps=cfg.eps)
        else:
            self.combiner = LinearCombination(
                self.params, eps=cfg.eps, forget_weight=1.0,
                retain_weight=0.0 if cfg.method == "ga" else cfg.alpha)
        self.auto_lr = (AutoLR(self.optimizer, period=cfg.auto_lr_period) if cfg.auto_lr else None)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        rbs = cfg.retain_batch_size or cfg.batch_size
        self._forget_sampler = _Sampler(len(self.forget), cfg.batch_size, self.generator)
        self._retain_sampler = _Sampler(len(self.retain), rbs, self.generator)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.last_checkpoint: Path | None = None
        self.log_path = Path(log_path) if log_path is not None else None
        self.callback = callback
        self.history: list[dict[str, Any]] = []
        self.step = 0

    # -- pieces ---------------------------------------------------------------------------------
    def _build_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "sgd":
            return torch.optim.SGD(self.params, lr=c.lr, momentum=c.momentum,
                                   weight_decay=c.weight_decay)
        cls = torch.optim.AdamW if c.optimizer == "adamw" else torch.optim.Adam
        return cls(self.params, lr=c.lr, weight_decay=c.weight_decay)

    def _batch(self, pairs: Sequence[tuple[str, str]], idx: list[int]) -> dict[str, torch.Tensor]:
        return encode_pairs(self.tokenizer, [pairs[i][0] for i in idx], [pairs[i][1] for i in idx],
                            max_length=self.config.max_length, model=self.model, device=self.device)

    def _ref_logprob(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if self.lora:
                with self.model.disable_adapter():
                    return sequence_logprob(self.model, batch)[0]
            return sequence_logprob(self.ref_model, batch)[0]

    def _terms(self, fb: dict, rb: dict) -> tuple[torch.Tensor | None, torch.Tensor, float, float]:
        """(retain term, forget term, CE_R, CE_F) for one micro-batch."""
        c, m = self.config, self.model
        if c.method in ("npo", "simnpo"):
            logp, n = sequence_logprob(m, fb)
            ce_f = float(-logp.detach().sum() / n.sum())
            if c.method == "npo":
                forget = npo_loss(logp, self._ref_logprob(fb), beta=c.npo_beta)
            else:
                forget = simnpo_loss(-logp, n.to(logp.dtype), beta=c.simnpo_beta,
                                     delta=c.simnpo_delta)
        else:
            ce = lm_loss(m, fb)
            ce_f = float(ce.detach())
            forget = ce if c.method == "ngdiff" else -ce
        if c.method == "ga":
            with torch.no_grad():
                ce_r = float(lm_loss(m, rb))
            return None, forget, ce_r, ce_f
        retain = lm_loss(m, rb)
        return retain, forget, float(retain.detach()), ce_f

    def _fitted_loss(self, stats) -> Callable[[], float]:
        rb = self._batch(self.retain, self._retain_sampler.next())
        if self.config.auto_lr_loss == "retain":
            return lambda: float(lm_loss(self.model, rb))
        fb = self._batch(self.forget, self._forget_sampler.next())
        nr = max(stats.retain_grad_norm, self.config.eps)
        nf = max(stats.forget_grad_norm, self.config.eps)
        return lambda: float(lm_loss(self.model, rb)) / nr - float(lm_loss(self.model, fb)) / nf

    def _diverged(self, what: str) -> UnlearningDiverged:
        where = (f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint
                 else "no checkpoint was saved (set checkpoint_every and checkpoint_dir)")
        return UnlearningDiverged(f"unlearning diverged at step {self.step}: {what}; {where}",
                                  step=self.step, checkpoint=self.last_checkpoint)

    def _save(self) -> None:
        assert self.checkpoint_dir is not None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / "last.safetensors"
        extra = {"config": self.config.as_dict(),
                 "auto_lr": self.auto_lr.state_dict() if self.auto_lr else None,
                 "samplers": [self._forget_sampler._perm, self._retain_sampler._perm]}
        save_checkpoint(path, model=self.model, optimizer=self.optimizer, step=self.step,
                        generators={"data": self.generator}, extra=extra)
        self.last_checkpoint = path

    def resume(self, path: str | Path | None = None) -> int:
        """Restore model, optimizer, step, data order and AutoLR from a checkpoint; return step."""
        path = Path(path) if path is not None else (self.checkpoint_dir or Path()) / "last.safetensors"
        ck = load_checkpoint(path, model=self.model, optimizer=self.optimizer,
                             generators={"data": self.generator})
        self.step = ck.step
        extra = ck.extra or {}
        if self.auto_lr is not None and extra.get("auto_lr"):
            self.auto_lr.load_state_dict(extra["auto_lr"])
        perms = extra.get("samplers")
        if perms:
            self._forget_sampler._perm, self._retain_sampler._perm = list(perms[0]), list(perms[1])
        self.last_checkpoint = path
        return self.step

    # -- the loop -------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """One update (``grad_accum`` micro-batches); returns and records the step's log."""
        c = self.config
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        ce_r = ce_f = 0.0
        try:
            for _ in range(c.grad_accum):
                fb = self._batch(self.forget, self._forget_sampler.next())
                rb = self._batch(self.retain, self._retain_sampler.next())
                retain, forget, r, f = self._terms(fb, rb)
                ce_r += r / c.grad_accum
                ce_f += f / c.grad_accum
                if not (math.isfinite(r) and math.isfinite(f)):
                    raise FloatingPointError(f"non-finite loss (CE_R {r}, CE_F {f})")
                scale = 1.0 / c.grad_accum
                self.combiner.accumulate(retain_loss=None if retain is None else retain * scale,
                                         forget_loss=forget * scale)
            stats = self.combiner.direction()
        except FloatingPointError as e:
            self.combiner._reset()
            raise self._diverged(str(e)) from e
        if c.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
        probe = None
        if self.auto_lr is not None and self.auto_lr.should_probe(self.step):
            probe = self.auto_lr.probe(self._fitted_loss(stats))
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.step += 1
        record = {"step": self.step, "ce_f": ce_f, "ce_r": ce_r,
                  "grad_norm_f": stats.forget_grad_norm, "grad_norm_r": stats.retain_grad_norm,
                  "cos_theta": stats.cos_theta, "direction_norm": stats.direction_norm,
                  "forget_objective": stats.forget_loss, "lr": lr}
        if probe is not None:
            record["autolr_fitted_lr"] = probe.fitted_lr if probe.accepted else None
        self.history.append(record)
        if self.callback is not None:
            self.callback(self.step, record)
        return record

    def train(self, steps: int | None = None) -> list[dict[str, Any]]:
        """Run until ``config.steps`` (or ``steps`` more); return the per-step records."""
        target = self.step + steps if steps is not None else self.config.steps
        logger = (MetricLogger(self.log_path, resume_from_step=self.step if self.step else None)
                  if self.log_path is not None else None)
        try:
            while self.step < target:
                rec = self.train_step()
                if logger is not None:
                    logger.log(**rec)
                ce = self.config.checkpoint_every
                if ce is not None and self.step % ce == 0:
                    self._save()
        finally:
            if logger is not None:
                logger.close()
        return self.history

    def unwrap(self) -> nn.Module:
        """The trained model: with LoRA, the adapters merged into the base weights."""
        if self.lora:
            return self.model.merge_and_unload()
        return self.model

