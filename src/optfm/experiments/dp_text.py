"""``dp-text``: DP fine-tuning of a tiny causal LM on E2E-style data-to-text with DP-Adam ±
DOPPLER ± DiSK (specs/privacy.md; DiSK's paper fine-tunes GPT-2 privately on E2E).

Protocol
--------
**Public vs private**, as in real DP fine-tuning: the language model is first pretrained
*non-privately on public data*, then fine-tuned *privately* on the private task.

- Private data: ``make_e2e(n_private_mrs, seed=data_seed)``, split by MR (80/10/10). The private
  training set is its ``train`` split, one (prompt, response) pair per reference
  (:func:`~optfm.data.e2e.to_pairs`); ``n`` = the number of those pairs and δ = 1 / n^1.1.
  Learning rates are selected on its ``validation`` MRs, and every reported number is on its
  ``test`` MRs (never seen in training or selection).
- Public data: ``make_e2e(n_public_mrs, seed=data_seed + 1)``, with any MR that also occurs in the
  private set removed. The base model is pretrained on its **reference sentences**, as standalone
  documents, and (``public_mr_docs``) on its MR strings as separate standalone documents: it knows
  the language of restaurant descriptions and the ``slot[value]`` notation, but has never seen an
  MR paired with a text, nor the prompt separator ``=>``.
- Tokenizer: :func:`optfm.data.build_word_tokenizer` (cased) fitted on the public documents plus
  the public schema (one MR string per closed slot value of ``SLOT_VALUES``, with the slot names,
  the placeholders and the separator); never on private data.
- ``name`` and ``near`` are open-vocabulary slots (invented venue names). A word tokenizer fitted
  on public text cannot spell unseen names (without delexicalisation about 40 % of the private
  references contain an ``[UNK]``), so with ``delexicalise`` (default) both are replaced by the
  placeholders ``XNAME`` / ``XNEAR`` in MRs and references, public and private alike, and put back
  into the generated text before scoring (the classic E2E delexicalisation). Scores are always
  computed against the original references and MRs.

**Model**: a tiny GPT-2 (``arch="gpt2"``: tied embeddings, exact GELU, dropout 0) or Llama
(``arch="llama"``) built from its config class. The pretrained base model is cached under
``$OPTFM_CACHE/dp-text/<arch>-<hash of every setting it depends on>/`` (``save_pretrained``,
safetensors, written atomically), so every arm and every later run reuses it.

**Private fine-tuning** (one arm = method × ε × learning rate × seed): prompt ``"<MR> =>"``,
response = the reference + EOS, loss on response tokens only, each sample's token mean averaged
over samples (:class:`optfm.privacy.CausalLMLoss`, which is what bounds each sample's contribution
by the clip norm). LoRA (``finetune="lora"``: rank ``lora_r`` on every attention and MLP
projection, frozen base) or full fine-tuning (``finetune="full"``), via
:func:`optfm.privacy.prepare_lm_for_dp`; :func:`optfm.privacy.make_private` with Poisson sampling
(expected batch ``batch_size``), clip norm C = ``max_grad_norm``, σ calibrated for
(ε, δ, q = batch_size / n, ``steps``) with the ``accountant``. Methods:

- ``dp-adam``: DP-Adam;
- ``dp-adam-doppler``: DP-Adam + DOPPLER's low-pass filter, preset ``a9b1``;
- ``dp-adam-disk``: DP-Adam + DiSK (κ = 0.7, γ = 0.5; two gradient evaluations per step, through
  ``optimizer.step(closure)``);

and a non-private reference (Adam, ε = ∞: no clipping, no noise, uniformly shuffled batches of
``batch_size``) with the same steps and parametrisation. Each method has its own learning-rate grid
(``dp_adam_lrs``, ``doppler_lrs``, ``disk_lrs``, ``nonprivate_lrs``); per (ε, method) the
learning rate with the best mean validation BLEU over seeds is reported.

**Evaluation**: greedy generation (:func:`optfm.training.lm.generate_greedy`), detokenised (the
word tokenizer decodes with spaces around punctuation) and relexicalised; corpus BLEU (sacrebleu,
all references of each MR), ROUGE-L (best reference per MR), slot error rate (missing slot
values; :mod:`optfm.data.text_metrics`) on the first ``eval_mrs`` MRs of a split (0 = all), and
the NLL (nats per response token, mean over all references of the split). ε spent is the
engine's accountant ε at δ. The base model before fine-tuning (``zero-shot``) is the floor.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from optfm.experiments.base import Arm, Experiment, Outcome, RunContext, pyplot, register
from optfm.experiments.config import ConfigError, ExperimentConfig
from optfm.experiments.stats import mean_se

__all__ = ["METHODS", "DPText", "DPTextConfig", "delexicalise", "delta_for", "detokenize",
           "evaluate", "fine_tune", "load_or_pretrain_base", "make_world", "relexicalise"]

METHODS = ("dp-adam", "dp-adam-doppler", "dp-adam-disk")
LABELS = {"dp-adam": "DP-Adam", "dp-adam-doppler": "DP-Adam + DOPPLER (a9b1)",
          "dp-adam-disk": "DP-Adam + DiSK (κ=0.7, γ=0.5)", "nonprivate": "Adam, non-private",
          "zero-shot": "base model, zero-shot"}
DISK_KAPPA, DISK_GAMMA = 0.7, 0.5
PLACEHOLDERS = {"name": "XNAME", "near": "XNEAR"}
SEPARATOR = "=>"
PROMPT_TEMPLATE = "{mr} " + SEPARATOR
_LORA_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
                 "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"]}
_LR_FIELDS = {"dp-adam": "dp_adam_lrs", "dp-adam-doppler": "doppler_lrs",
              "dp-adam-disk": "disk_lrs", "nonprivate": "nonprivate_lrs"}
_BASE_VERSION = 1  # bump when base-model pretraining changes, to invalidate the cache


@dataclass
class DPTextConfig(ExperimentConfig):
    """Defaults are the ``quick`` profile (learning rates chosen on the validation split in a
    pilot; see docs/results/dp-text.md)."""

    # data
    n_private_mrs: int = 500
    n_public_mrs: int = 1000
    data_seed: int = 0
    delexicalise: bool = True
    public_mr_docs: bool = True
    eval_mrs: int = 0
    max_new_tokens: int = 64
    # model and public pretraining
    arch: Literal["gpt2", "llama"] = "gpt2"
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    pretrain_epochs: int = 4
    pretrain_lr: float = 3e-3
    pretrain_batch_size: int = 32
    # private fine-tuning
    finetune: Literal["lora", "full"] = "lora"
    lora_r: int = 8
    lora_alpha: float = 16.0
    epsilons: tuple[float, ...] = (3.0, 8.0)
    methods: tuple[str, ...] = METHODS
    nonprivate: bool = True
    steps: int = 60
    batch_size: int = 64
    max_grad_norm: float = 1.0
    accountant: Literal["prv", "rdp"] = "prv"
    dp_adam_lrs: tuple[float, ...] = (5e-3,)
    doppler_lrs: tuple[float, ...] = (1.25e-3,)
    disk_lrs: tuple[float, ...] = (5e-3,)
    nonprivate_lrs: tuple[float, ...] = (1e-2,)
    n_seeds: int = 4

    def lrs(self, method: str) -> tuple[float, ...]:
        """The learning-rate grid of ``method`` (a DP method or ``"nonprivate"``)."""
        return getattr(self, _LR_FIELDS[method])

    def validate(self) -> None:
        super().validate()
        for m in self.methods:
            if m not in METHODS:
                raise ConfigError(f"methods: {m!r} is not one of {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods must not repeat, got {self.methods}")
        if not self.methods and not self.nonprivate:
            raise ConfigError("nothing to run: methods is empty and nonprivate is false")
        if self.methods and not self.epsilons:
            raise ConfigError("epsilons must not be empty when methods are given")
        if any(not (math.isfinite(e) and e > 0) for e in self.epsilons):
            raise ConfigError(f"epsilons must be finite and > 0, got {self.epsilons}")
        if len(set(self.epsilons)) != len(self.epsilons):
            raise ConfigError(f"epsilons must not repeat, got {self.epsilons}")
        if self.arch not in ("gpt2", "llama"):
            raise ConfigError(f"arch must be 'gpt2' or 'llama', got {self.arch!r}")
        if self.finetune not in ("lora", "full"):
            raise ConfigError(f"finetune must be 'lora' or 'full', got {self.finetune!r}")
        if self.accountant not in ("prv", "rdp"):
            raise ConfigError(f"accountant must be 'prv' or 'rdp', got {self.accountant!r}")
        for key in ("n_private_mrs", "n_public_mrs"):
            if getattr(self, key) < 20:
                raise ConfigError(f"{key} must be >= 20 (the splits need validation and test "
                                  f"MRs), got {getattr(self, key)}")
        for key in ("max_new_tokens", "hidden", "layers", "heads", "pretrain_epochs",
                    "pretrain_batch_size", "lora_r", "steps", "n_seeds"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.hidden % self.heads:
            raise ConfigError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.batch_size < 16:
            raise ConfigError(f"batch_size (the expected Poisson batch) must be >= 16 so that an "
                              f"empty batch is practically impossible, got {self.batch_size}")
        if self.eval_mrs < 0 or self.data_seed < 0:
            raise ConfigError(f"eval_mrs and data_seed must be >= 0, got {self.eval_mrs} and "
                              f"{self.data_seed}")
        for key in ("pretrain_lr", "max_grad_norm", "lora_alpha"):
            v = getattr(self, key)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{key} must be a finite number > 0, got {v}")
        for method, key in _LR_FIELDS.items():
            lrs = getattr(self, key)
            needed = method in self.methods or (method == "nonprivate" and self.nonprivate)
            if needed and not lrs:
                raise ConfigError(f"{key} must not be empty while {method} runs")
            if any(not (math.isfinite(lr) and lr > 0) for lr in lrs) or len(set(lrs)) != len(lrs):
                raise ConfigError(f"{key} must hold distinct finite numbers > 0, got {lrs}")


# --------------------------------------------------------------------------- text processing
def _sub_value(text: str, value: str, repl: str) -> str:
    return re.sub(r"(?<!\w)" + re.escape(value) + r"(?!\w)", repl, text)


def delexicalise(example):
    """An :class:`~optfm.data.e2e.E2EExample` with ``name`` / ``near`` values replaced by
    ``XNAME`` / ``XNEAR`` in the MR and in every reference (longest value first)."""
    from optfm.data.e2e import E2EExample, format_mr, parse_mr

    slots = parse_mr(example.mr)
    refs = list(example.references)
    for slot in sorted((s for s in PLACEHOLDERS if s in slots), key=lambda s: -len(slots[s])):
        refs = [_sub_value(r, slots[slot], PLACEHOLDERS[slot]) for r in refs]
        slots[slot] = PLACEHOLDERS[slot]
    return E2EExample(format_mr(slots), refs)


def relexicalise(text: str, slots: dict[str, str]) -> str:
    """Put the MR's ``name`` / ``near`` values back in place of the placeholders."""
    for slot, ph in PLACEHOLDERS.items():
        if slot in slots:
            text = text.replace(ph, slots[slot])
    return text


def detokenize(text: str) -> str:
    """Undo the word tokenizer's spacing (it decodes tokens joined by spaces): no space before
    ``. , ; : ! ?``, none around ``-`` and ``'``, none after ``£``. Exact on the E2E grammar's
    references (checked in the tests)."""
    text = re.sub(r" ([.,;:!?])", r"\1", text)
    text = re.sub(r" ?([-']) ?", r"\1", text)
    return re.sub(r"£ ", "£", text).strip()


def _schema_texts() -> list[str]:
    """The public schema as text: one MR per closed slot value (with the placeholders for the
    open slots) followed by the prompt separator."""
    from optfm.data.e2e import SLOT_VALUES, SLOTS, format_mr

    out = []
    for slot in SLOTS:
        for value in SLOT_VALUES.get(slot, (PLACEHOLDERS.get(slot, slot),)):
            mr = {"name": PLACEHOLDERS["name"], slot: value, "near": PLACEHOLDERS["near"]}
            out.append(format_mr({s: mr[s] for s in SLOTS if s in mr}) + " " + SEPARATOR)
    return out


# --------------------------------------------------------------------------- data (memoised)
_WORLDS: dict[str, dict[str, Any]] = {}
_BASES: dict[str, dict[str, Any]] = {}


def _data_key(config: DPTextConfig) -> str:
    fields = {k: getattr(config, k) for k in (
        "n_private_mrs", "n_public_mrs", "data_seed", "delexicalise", "public_mr_docs")}
    return json.dumps(fields, sort_keys=True)


def _encode(tok, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    from optfm.training.lm import encode_pairs

    return encode_pairs(tok, [p for p, _ in pairs], [r for _, r in pairs])


def make_world(config: DPTextConfig) -> dict[str, Any]:
    """Private and public data, the public tokenizer and the encoded tensors (memoised)."""
    key = _data_key(config)
    if key in _WORLDS:
        return _WORLDS[key]
    from optfm.data import build_word_tokenizer
    from optfm.data.e2e import make_e2e, to_pairs

    private = make_e2e(config.n_private_mrs, seed=config.data_seed)
    public = make_e2e(config.n_public_mrs, seed=config.data_seed + 1)
    pub = public.train + public.validation + public.test
    private_mrs = {ex.mr for ex in private.train + private.validation + private.test}
    shared = private_mrs & {ex.mr for ex in pub}
    if shared:  # checked, not filtered: the public side must not depend on private data
        raise RuntimeError(f"{len(shared)} MR(s) occur in both the public and the private set "
                           f"(e.g. {next(iter(shared))!r}); choose another data_seed")
    lex = delexicalise if config.delexicalise else (lambda ex: ex)
    pub_d = [lex(ex) for ex in pub]
    train_d = [lex(ex) for ex in private.train]
    test, val = list(private.test), list(private.validation)
    test_d, val_d = [lex(ex) for ex in test], [lex(ex) for ex in val]
    pub_docs = [r for ex in pub_d for r in ex.references]
    if config.public_mr_docs:
        pub_docs += [ex.mr for ex in pub_d]
    tok = build_word_tokenizer(pub_docs + _schema_texts(), lowercase=False, model_max_length=1024)
    train_pairs = to_pairs(train_d, PROMPT_TEMPLATE)
    test_pairs = to_pairs(test_d, PROMPT_TEMPLATE)
    val_pairs = to_pairs(val_d, PROMPT_TEMPLATE)
    train = _encode(tok, train_pairs)
    test_enc, val_enc = _encode(tok, test_pairs), _encode(tok, val_pairs)
    resp = train["labels"] != -100
    n_unk = int(((train["input_ids"] == tok.unk_token_id) & train["attention_mask"].bool()).sum())
    # context length from public data only (the longest public MR + reference), with room for
    # generation; every private sequence must fit
    public_len = max(len(tok(PROMPT_TEMPLATE.format(mr=ex.mr))["input_ids"])
                     + len(tok(r)["input_ids"]) + 1 for ex in pub_d for r in ex.references)
    private_len = max(int(d["attention_mask"].sum(1).max()) for d in (train, test_enc, val_enc))
    prompt_len = max(len(tok(PROMPT_TEMPLATE.format(mr=ex.mr))["input_ids"]) for ex in test_d + val_d)
    n_positions = 32 * math.ceil((public_len + config.max_new_tokens) / 32)
    if max(private_len, prompt_len + config.max_new_tokens) > n_positions:
        raise RuntimeError(f"private sequences ({private_len} tokens; prompts {prompt_len} + "
                           f"max_new_tokens {config.max_new_tokens}) exceed the context length "
                           f"{n_positions} sized on public data; raise max_new_tokens")
    world = {
        "tokenizer": tok, "public_docs": pub_docs, "train": train, "n_positions": n_positions,
        "test": test_enc, "test_examples": test, "test_examples_delex": test_d,
        "validation": val_enc, "validation_examples": val, "validation_examples_delex": val_d,
        "n_private_pairs": len(train_pairs), "n_public_docs": len(pub_docs),
        "unk_rate_private": n_unk / int(train["attention_mask"].sum()),
        "response_tokens_mean": float(resp.sum(1).float().mean()),
        "max_private_len": private_len,
    }
    _WORLDS[key] = world
    return world


def delta_for(n: int) -> float:
    """δ = 1 / n^1.1 for n private training pairs."""
    return 1.0 / n**1.1


# --------------------------------------------------------------------------- models
def _new_model(config: DPTextConfig, tok, n_positions: int):
    from optfm.models.factories import tiny_gpt2, tiny_llama

    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    if config.arch == "gpt2":
        return tiny_gpt2(vocab_size=len(tok), n_embd=config.hidden, n_layer=config.layers,
                         n_head=config.heads, n_positions=n_positions, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu", **ids)
    inter = 32 * math.ceil(8 * config.hidden / 3 / 32)
    return tiny_llama(vocab_size=len(tok), hidden_size=config.hidden, intermediate_size=inter,
                      num_hidden_layers=config.layers, num_attention_heads=config.heads,
                      max_position_embeddings=n_positions, **ids)


def _base_key(config: DPTextConfig) -> str:
    """Cache key of the base model: every setting it depends on (public data only)."""
    fields = {k: getattr(config, k) for k in (
        "n_public_mrs", "data_seed", "delexicalise", "public_mr_docs", "max_new_tokens", "arch",
        "hidden", "layers", "heads", "pretrain_epochs", "pretrain_lr", "pretrain_batch_size",
        "seed")}
    blob = json.dumps({"v": _BASE_VERSION, **fields}, sort_keys=True)
    return f"{config.arch}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _batches(n: int, batch_size: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    for b in range(0, n, batch_size):
        yield perm[b: b + batch_size]


def _trim(*tensors: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Drop the all-padding columns on the right (right-padded batch)."""
    width = max(int(mask.sum(1).max()), 1) if len(mask) else 1
    return [t[:, :width] for t in tensors]


def pretrain_base(config: DPTextConfig, world: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Pretrain the base model non-privately on the public documents (AdamW, 5 % warm-up, cosine
    decay, gradient-norm clip 1, per-document token-mean loss)."""
    from optfm.pretraining.recipe import warmup_cosine
    from optfm.privacy import CausalLMLoss
    from optfm.training.progress import progress

    tok = world["tokenizer"]
    torch.manual_seed(config.seed)
    model = _new_model(config, tok, world["n_positions"])
    docs = _encode(tok, [("", d) for d in world["public_docs"]])
    n = len(docs["input_ids"])
    steps_per_epoch = math.ceil(n / config.pretrain_batch_size)
    total = config.pretrain_epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, weight_decay=0.01)
    sched = warmup_cosine(opt, total_steps=total, warmup_steps=max(1, total // 20))
    gen = torch.Generator().manual_seed(config.seed)
    loss_fn = CausalLMLoss()
    model.train()
    losses = []
    t0 = time.perf_counter()
    for _ in progress(range(config.pretrain_epochs), desc="dp-text: public pretraining"):
        tot = 0.0
        for idx in _batches(n, config.pretrain_batch_size, gen):
            ids, mask, labels = _trim(docs["input_ids"][idx], docs["attention_mask"][idx],
                                      docs["labels"][idx], mask=docs["attention_mask"][idx])
            loss = loss_fn(model(input_ids=ids, attention_mask=mask).logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
        losses.append(tot / n)
    return model.eval(), {"epoch_losses": losses, "pretrain_time_s": time.perf_counter() - t0,
                          "n_docs": n, "steps": total}


def load_or_pretrain_base(config: DPTextConfig, world: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The pretrained base model (a fresh copy) and its pretraining record, from
    ``$OPTFM_CACHE/dp-text/<key>/`` when present, else pretrained and saved there atomically."""
    from transformers import AutoModelForCausalLM

    from optfm.data.corpus import cache_dir
    from optfm.training.io import atomic_write_dir, atomic_write_json, read_json

    key = _base_key(config)
    path = cache_dir() / "dp-text" / key
    vocab = world["tokenizer"].get_vocab()
    vocab_hash = hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest()
    if key in _BASES:
        model = _new_model(config, world["tokenizer"], world["n_positions"])
        model.load_state_dict(_BASES[key]["state"])
        return model.eval(), _BASES[key]["meta"]
    if (path / "settings.json").is_file():
        meta = read_json(path / "settings.json")
        if meta.get("vocab_sha256") != vocab_hash:
            raise RuntimeError(f"cached base model {path} was trained with another vocabulary; "
                               "delete that folder")
        model = AutoModelForCausalLM.from_pretrained(path / "model", local_files_only=True,
                                                     use_safetensors=True)
    else:
        model, meta = pretrain_base(config, world)
        meta = {**meta, "vocab_sha256": vocab_hash, "key": key}

        def write(tmp) -> None:
            model.save_pretrained(tmp / "model", safe_serialization=True)
            atomic_write_json(tmp / "settings.json", meta)

        atomic_write_dir(path, write)
    _BASES[key] = {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                   "meta": meta}
    return model.eval(), meta


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _test_nll(model, data: dict[str, torch.Tensor], batch_size: int = 64) -> float:
    from optfm.privacy import causal_lm_per_sample_loss

    model.eval()
    out = []
    for b in range(0, len(data["input_ids"]), batch_size):
        sl = slice(b, b + batch_size)
        ids, mask, labels = _trim(data["input_ids"][sl], data["attention_mask"][sl],
                                  data["labels"][sl], mask=data["attention_mask"][sl])
        logits = model(input_ids=ids, attention_mask=mask).logits
        out.append(causal_lm_per_sample_loss(logits, labels, reduction="none"))
    return float(torch.cat(out).mean())


def evaluate(model, world: dict[str, Any], config: DPTextConfig, split: str = "test"
             ) -> dict[str, Any]:
    """NLL on every reference of ``split`` (``"test"`` or ``"validation"``; key ``test_nll``
    either way); greedy generations for its first ``eval_mrs`` MRs scored with BLEU, ROUGE-L and
    the slot error rate against the original references and MRs."""
    from optfm.data.e2e import parse_mr
    from optfm.data.text_metrics import corpus_bleu, rouge_l, slot_error_rate
    from optfm.training.lm import generate_greedy

    t0 = time.perf_counter()
    tok = world["tokenizer"]
    k = config.eval_mrs or len(world[f"{split}_examples"])
    originals = world[f"{split}_examples"][:k]
    prompts = [PROMPT_TEMPLATE.format(mr=ex.mr) for ex in world[f"{split}_examples_delex"][:k]]
    raw = generate_greedy(model, tok, prompts, max_new_tokens=config.max_new_tokens, batch_size=64)
    hyps = [relexicalise(detokenize(h), parse_mr(ex.mr)) for h, ex in zip(raw, originals)]
    refs = [ex.references for ex in originals]
    return {
        "bleu": corpus_bleu(hyps, refs),
        "rouge_l": rouge_l(hyps, refs),
        "slot_error": slot_error_rate(hyps, [ex.mr for ex in originals]),
        "test_nll": _test_nll(model, world[split]),
        "empty_outputs": sum(not h for h in hyps),
        "samples": [{"mr": ex.mr, "reference": ex.references[0], "output": h}
                    for ex, h in zip(originals[:3], hyps[:3])],
        "eval_time_s": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- fine-tuning
def _make_filter(method: str):
    from optfm.privacy import KalmanFilter, LowPassFilter

    if method == "dp-adam-doppler":
        return LowPassFilter.preset("a9b1")
    if method == "dp-adam-disk":
        return KalmanFilter(DISK_KAPPA, DISK_GAMMA)
    if method == "dp-adam":
        return None
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def _prepare(config: DPTextConfig, model, seed: int):
    from optfm.privacy import prepare_lm_for_dp

    torch.manual_seed(seed)  # LoRA's A matrices
    lora = None
    if config.finetune == "lora":
        lora = {"r": config.lora_r, "lora_alpha": config.lora_alpha, "lora_dropout": 0.0,
                "target_modules": _LORA_TARGETS[config.arch],
                "fan_in_fan_out": config.arch == "gpt2"}
    with warnings.catch_warnings():  # PEFT calls a transformers method deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return prepare_lm_for_dp(model, lora=lora)


def fine_tune(config: DPTextConfig, world: dict[str, Any], base, *, method: str, lr: float,
              epsilon: float | None, seed: int) -> dict[str, Any]:
    """Fine-tune a copy of ``base`` on the private pairs for ``config.steps`` steps: ``method``
    in :data:`METHODS` at (ε, δ = 1/n^1.1) through :func:`optfm.privacy.make_private`, or
    ``"nonprivate"`` (plain Adam, ``epsilon`` ignored). Returns the training record with the
    fine-tuned model (``"model"``, unwrapped from Opacus) and the per-step losses."""
    from torch.utils.data import DataLoader, TensorDataset

    from optfm.privacy import CausalLMLoss, make_private
    from optfm.training import make_generator, seed_everything

    train = world["train"]
    n = world["n_private_pairs"]
    delta = delta_for(n)
    model = _prepare(config, copy.deepcopy(base), seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = CausalLMLoss()
    losses: list[float] = []
    out: dict[str, Any] = {"method": method, "lr": lr, "epsilon_target": epsilon, "seed": seed,
                           "delta": delta, "trainable_params": sum(p.numel() for p in params)}
    seed_everything(seed)  # Poisson sampling draws from torch's global RNG
    t0 = time.perf_counter()
    if method == "nonprivate":
        opt = torch.optim.Adam(params, lr=lr)
        gen = make_generator(seed)
        while len(losses) < config.steps:
            for idx in _batches(n, config.batch_size, gen):
                ids, mask, labels = _trim(train["input_ids"][idx], train["attention_mask"][idx],
                                          train["labels"][idx], mask=train["attention_mask"][idx])
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(input_ids=ids, attention_mask=mask).logits, labels)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                if len(losses) == config.steps:
                    break
        out.update(epsilon_spent=math.inf, noise_multiplier=0.0,
                   sample_rate=config.batch_size / n, steps=len(losses))
        inner = model
    else:
        opt = torch.optim.Adam(params, lr=lr)
        loader = DataLoader(TensorDataset(train["input_ids"], train["attention_mask"],
                                          train["labels"]), batch_size=config.batch_size)
        model, opt, loader, engine = make_private(
            model, opt, loader, target_epsilon=epsilon, target_delta=delta, steps=config.steps,
            max_grad_norm=config.max_grad_norm, filter=_make_filter(method),
            accountant=config.accountant, noise_generator=make_generator(50_000 + seed),
            criterion=loss_fn)
        batch_sizes = []
        while engine.steps < config.steps:
            for ids, mask, labels in loader:
                if len(ids) == 0:
                    raise RuntimeError("Poisson sampling drew an empty batch; raise batch_size")
                ids, mask, labels = _trim(ids, mask, labels, mask=mask)
                batch_sizes.append(len(ids))

                def closure(ids=ids, mask=mask, labels=labels) -> torch.Tensor:
                    opt.zero_grad(set_to_none=True)
                    loss = engine.criterion(model(input_ids=ids, attention_mask=mask).logits,
                                            labels)
                    loss.backward()
                    return loss

                loss = opt.step(closure)  # DiSK evaluates twice; the loss returned is at x_t
                losses.append(float(loss.detach()))
                if engine.steps == config.steps:
                    break
        out.update(epsilon_spent=engine.epsilon(delta), noise_multiplier=engine.noise_multiplier,
                   sample_rate=engine.sample_rate, steps=engine.steps,
                   mean_batch=float(np.mean(batch_sizes)))
        inner = model._module
    out["train_time_s"] = time.perf_counter() - t0
    out["losses"] = losses
    out["model"] = inner.eval()
    return out


def _curve(losses: list[float], points: int = 30) -> list[list[float]]:
    """(step, mean loss) over ``points`` equal windows of the per-step training losses."""
    edges = np.linspace(0, len(losses), min(points, len(losses)) + 1).round().astype(int)
    return [[float((a + b) / 2), float(np.mean(losses[a:b]))]
            for a, b in itertools.pairwise(edges.tolist()) if b > a]


def _scores(model, world: dict[str, Any], config: DPTextConfig) -> dict[str, Any]:
    """Test metrics (top level) and validation metrics (``val_*``) of one model."""
    test = evaluate(model, world, config, "test")
    val = evaluate(model, world, config, "validation")
    return {**test, "val_bleu": val["bleu"], "val_rouge_l": val["rouge_l"],
            "val_slot_error": val["slot_error"], "val_nll": val["test_nll"],
            "eval_time_s": test["eval_time_s"] + val["eval_time_s"]}


# --------------------------------------------------------------------------- the experiment
def _fmt(stats: tuple[float, float], digits: int) -> str:
    return f"{stats[0]:.{digits}f} ± {stats[1]:.{digits}f}"


@register
class DPText(Experiment):
    name = "dp-text"
    description = ("DP fine-tuning of a publicly pretrained tiny GPT-2 on E2E-style data-to-text: "
                   "DP-Adam ± DOPPLER ± DiSK at ε ∈ {3, 8}: BLEU, ROUGE-L, slot error, test NLL.")
    config_cls = DPTextConfig
    minutes = {"smoke": 0.3, "quick": 5.0, "full": 40.0}

    @classmethod
    def profiles(cls) -> dict[str, DPTextConfig]:
        return {
            "smoke": DPTextConfig(n_private_mrs=150, n_public_mrs=300, eval_mrs=12,
                                  max_new_tokens=40, hidden=32, layers=2, heads=2,
                                  pretrain_epochs=3, pretrain_lr=1e-2, epsilons=(8.0,),
                                  methods=("dp-adam-doppler", "dp-adam-disk"), steps=30,
                                  batch_size=32, doppler_lrs=(3e-3,), disk_lrs=(1e-2,),
                                  nonprivate_lrs=(2e-2,), n_seeds=1),
            "quick": DPTextConfig(),
            "full": DPTextConfig(steps=120, n_seeds=5, dp_adam_lrs=(2.5e-3, 5e-3, 1e-2),
                                 doppler_lrs=(6.25e-4, 1.25e-3, 2.5e-3),
                                 disk_lrs=(2.5e-3, 5e-3, 1e-2), nonprivate_lrs=(5e-3, 1e-2, 2e-2)),
        }

    def arms(self, config: DPTextConfig) -> list[Arm]:
        arms = [Arm("zero-shot", {"method": "zero-shot", "epsilon": None, "lr": None,
                                  "seed": config.seed})]
        for i in range(config.n_seeds):
            seed = config.seed + i
            if config.nonprivate:
                arms += [Arm(f"nonprivate-lr{lr:g}-s{seed}",
                             {"method": "nonprivate", "epsilon": None, "lr": lr, "seed": seed})
                         for lr in config.nonprivate_lrs]
            arms += [Arm(f"eps{eps:g}-{m}-lr{lr:g}-s{seed}",
                         {"method": m, "epsilon": eps, "lr": lr, "seed": seed})
                     for eps in config.epsilons for m in config.methods for lr in config.lrs(m)]
        return arms

    def run_arm(self, config: DPTextConfig, arm: Arm, ctx: RunContext) -> dict[str, Any]:
        p = arm.params
        world = make_world(config)
        base, meta = load_or_pretrain_base(config, world)
        info = {"n_private_pairs": world["n_private_pairs"],
                "n_public_docs": world["n_public_docs"], "vocab_size": len(world["tokenizer"]),
                "unk_rate_private": world["unk_rate_private"],
                "pretrain": {k: meta[k] for k in ("epoch_losses", "pretrain_time_s", "steps")}}
        if p["method"] == "zero-shot":
            return {**info, "method": "zero-shot", **_scores(base, world, config)}
        res = fine_tune(config, world, base, method=p["method"], lr=p["lr"],
                        epsilon=p["epsilon"], seed=p["seed"])
        model = res.pop("model")
        losses = res.pop("losses")
        tail = losses[-max(1, len(losses) // 10):]
        return {**info, **res, "loss_curve": _curve(losses), "final_train_loss": float(np.mean(tail)),
                **_scores(model, world, config)}

    def finalize(self, config: DPTextConfig, results: dict[str, dict[str, Any]],
                 ctx: RunContext) -> Outcome:
        groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for a in self.arms(config):
            q = a.params
            groups[(q["method"], q["epsilon"], q["lr"])].append(results[a.key])
        zs = results["zero-shot"]
        settings = ([("nonprivate", None)] if config.nonprivate else []) + [
            (m, e) for e in config.epsilons for m in config.methods]
        # the learning rate of each (method, ε): best mean validation BLEU over seeds
        best: dict[tuple, dict[str, Any]] = {}
        for m, e in settings:
            cands = [(mean_se([r["val_bleu"] for r in groups[(m, e, lr)]])[0], lr)
                     for lr in config.lrs(m)]
            _, lr = max(cands)
            rs = groups[(m, e, lr)]
            best[(m, e)] = {"lr": lr, "rs": rs, **{k: mean_se([r[k] for r in rs]) for k in (
                "bleu", "rouge_l", "slot_error", "test_nll", "val_bleu", "val_nll",
                "train_time_s")}}
        metrics: dict[str, float] = {
            "n_private_pairs": float(zs["n_private_pairs"]),
            "delta": delta_for(zs["n_private_pairs"]),
            "vocab_size": float(zs["vocab_size"]),
            "pretrain_time_s": float(zs["pretrain"]["pretrain_time_s"]),
        }
        cols = [("bleu", "BLEU ↑", 2), ("rouge_l", "ROUGE-L ↑", 3),
                ("slot_error", "slot error ↓", 3), ("test_nll", "test NLL ↓", 3)]
        for k, _, _ in cols:
            metrics[f"{k}_zero_shot"] = float(zs[k])
        table = ["| ε | method | lr | " + " | ".join(c[1] for c in cols)
                 + " | ε spent | σ | train s / seed |",
                 "|---|---|---|" + "---|" * (len(cols) + 3),
                 f"| — | {LABELS['zero-shot']} | — | "
                 + " | ".join(f"{zs[k]:.{d}f}" for k, _, d in cols) + " | 0 | — | — |"]
        for m, e in settings:
            b = best[(m, e)]
            tag = "nonprivate" if e is None else f"eps{e:g}_{m}"
            for k in ("bleu", "rouge_l", "slot_error", "test_nll", "train_time_s"):
                metrics[f"{k}_{tag}"] = b[k][0]
                if k != "train_time_s":
                    metrics[f"{k}_se_{tag}"] = b[k][1]
            metrics[f"lr_{tag}"] = b["lr"]
            if e is None:
                eps_cell, sigma_cell = "∞", "0"
            else:
                spent = max(r["epsilon_spent"] for r in b["rs"])
                metrics[f"epsilon_spent_{tag}"] = spent
                metrics[f"noise_multiplier_eps{e:g}"] = b["rs"][0]["noise_multiplier"]
                eps_cell, sigma_cell = f"{spent:.3f}", f"{b['rs'][0]['noise_multiplier']:.3f}"
            table.append(f"| {'∞' if e is None else f'{e:g}'} | {LABELS[m]} | {b['lr']:g} | "
                         + " | ".join(_fmt(b[k], d) for k, _, d in cols)
                         + f" | {eps_cell} | {sigma_cell} | {b['train_time_s'][0]:.1f} |")

        lr_table: list[str] = []
        if any(len(config.lrs(m)) > 1 for m, _ in settings):
            lr_table = ["## Every learning rate (validation BLEU selects; test shown for reference)",
                        "", "| ε | method | lr | val BLEU | val NLL | test BLEU |",
                        "|---|---|---|---|---|---|"]
            for m, e in settings:
                for lr in config.lrs(m):
                    rs = groups[(m, e, lr)]
                    mark = " **(selected)**" if lr == best[(m, e)]["lr"] else ""
                    lr_table.append(
                        f"| {'∞' if e is None else f'{e:g}'} | {LABELS[m]} | {lr:g}{mark} | "
                        + " | ".join(_fmt(mean_se([r[k] for r in rs]), d)
                                     for k, d in (("val_bleu", 2), ("val_nll", 3), ("bleu", 2)))
                        + " |")

        findings = ["## What the numbers say", ""]
        if config.nonprivate:
            b = best[("nonprivate", None)]
            findings.append(f"- Non-private fine-tuning: BLEU {_fmt(b['bleu'], 2)}, against "
                            f"{zs['bleu']:.2f} for the base model before fine-tuning (zero-shot).")
        for e in config.epsilons:
            if "dp-adam" not in config.methods:
                continue
            ref = best[("dp-adam", e)]
            for m in config.methods:
                if m == "dp-adam":
                    continue
                cur = best[(m, e)]
                by_seed = {r["seed"]: r for r in ref["rs"]}
                parts = []
                for k, label, higher in (("bleu", "BLEU", True), ("test_nll", "test NLL", False)):
                    # paired by seed: same seed = same Poisson batches and noise draws
                    diff, se = mean_se([r[k] - by_seed[r["seed"]][k] for r in cur["rs"]])
                    metrics[f"{k}_diff_eps{e:g}_{m}"] = diff
                    metrics[f"{k}_diff_se_eps{e:g}_{m}"] = se
                    if config.n_seeds < 2:
                        verdict = "one seed: no error bar"
                    elif abs(diff) <= 2 * se:
                        verdict = "within 2 s.e."
                    else:
                        verdict = "better" if (diff > 0) == higher else "worse"
                    parts.append(f"{label} {diff:+.3g} (± {se:.2g}, {verdict})")
                findings.append(f"- ε = {e:g}, {LABELS[m]} − DP-Adam (paired by seed): "
                                + "; ".join(parts) + ".")
        edge = [f"{m} at ε = {'∞' if e is None else f'{e:g}'} (lr {b['lr']:g})"
                for (m, e), b in best.items()
                if len(config.lrs(m)) > 1 and b["lr"] in (min(config.lrs(m)), max(config.lrs(m)))]
        if any(len(config.lrs(m)) > 1 for m, _ in settings):
            findings.append("- Selected learning rate at the edge of its grid: "
                            + (", ".join(edge) if edge else "none."))

        fig = self._plot(config, best, zs, ctx)
        s0 = zs["samples"][0]
        samples = ["## Sample outputs (first test MR, first seed)", "", f"- MR: `{s0['mr']}`",
                   f"- one reference: {s0['reference']}",
                   f"- {LABELS['zero-shot']}: {s0['output'] or '(empty)'}"]
        for m, e in settings:
            r = best[(m, e)]["rs"][0]
            eps_s = "" if e is None else f" (ε = {e:g})"
            samples.append(f"- {LABELS[m]}{eps_s}: {r['samples'][0]['output'] or '(empty)'}")
        first = next(iter(best.values()))["rs"][0]
        q = next((b["rs"][0]["sample_rate"] for (m, e), b in best.items() if e is not None),
                 config.batch_size / zs["n_private_pairs"])
        setting = (
            f"{config.arch} ({config.hidden} hidden, {config.layers} layers, vocabulary "
            f"{zs['vocab_size']}) pretrained on {zs['n_public_docs']} public documents for "
            f"{config.pretrain_epochs} epochs ({zs['pretrain']['pretrain_time_s']:.0f} s, or "
            f"loaded from the cache); private fine-tuning: {config.finetune}"
            + (f" (rank {config.lora_r})" if config.finetune == "lora" else "")
            + f", {first['trainable_params']:,} trainable parameters, on n = "
            f"{zs['n_private_pairs']} private pairs: {config.steps} steps, expected batch "
            f"{config.batch_size} (Poisson rate q = {q:.4f}), "
            f"C = {config.max_grad_norm:g}, δ = 1/n^1.1 = {metrics['delta']:.3g}, "
            f"{config.accountant.upper()} accountant; {config.n_seeds} seed(s), mean ± s.e.; "
            "learning rate per (ε, method) by validation BLEU; BLEU / ROUGE-L / slot error of "
            f"greedy outputs on {config.eval_mrs or 'all'} test MRs, test NLL in nats per "
            "response token.")
        summary = "\n".join([setting, "", *table, "", f"![BLEU vs ε and training loss]({fig})",
                             "", *findings, "", *lr_table, *([""] if lr_table else []), *samples])
        return Outcome(metrics=metrics, summary=summary)

    def _plot(self, config: DPTextConfig, best: dict[tuple, dict[str, Any]], zs: dict[str, Any],
              ctx: RunContext) -> str:
        plt = pyplot()
        eps_list = list(config.epsilons)
        n_panels = 1 + max(len(eps_list), 1)
        fig, axes = plt.subplots(1, n_panels, figsize=(4.4 * n_panels, 3.8), squeeze=False)
        colors = {"dp-adam": "tab:blue", "dp-adam-doppler": "tab:orange",
                  "dp-adam-disk": "tab:green", "nonprivate": "k"}
        ax = axes[0][0]
        for j, m in enumerate(config.methods):
            off = (j - (len(config.methods) - 1) / 2) * 0.08
            st = [best[(m, e)]["bleu"] for e in eps_list]
            ax.errorbar([i + off for i in range(len(eps_list))], [s[0] for s in st],
                        yerr=[s[1] for s in st], marker="o", capsize=3, color=colors[m],
                        label=LABELS[m])
        ticks = [f"{e:g}" for e in eps_list]
        if config.nonprivate:
            mu, se = best[("nonprivate", None)]["bleu"]
            ax.errorbar([len(eps_list)], [mu], yerr=[se], marker="s", capsize=3, color="k",
                        label=LABELS["nonprivate"])
            ticks.append("∞")
        ax.axhline(zs["bleu"], color="grey", ls="--", label=LABELS["zero-shot"])
        ax.set_xticks(range(len(ticks)), ticks)
        ax.set(xlabel="ε", ylabel="test BLEU (mean ± s.e.)", title="BLEU vs privacy budget")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        for ax, e in zip(axes[0][1:], eps_list or [None]):
            keys = [(m, e) for m in config.methods] + (
                [("nonprivate", None)] if config.nonprivate else [])
            for m, ee in keys:
                rs = best[(m, ee)]["rs"]
                curve = np.mean([[c[1] for c in r["loss_curve"]] for r in rs], axis=0)
                ax.plot([c[0] for c in rs[0]["loss_curve"]], curve, color=colors[m],
                        label=f"{LABELS[m]} (lr {best[(m, ee)]['lr']:g})")
            ax.set(xlabel="step", ylabel="training loss (batch mean of per-sample NLL)",
                   title="Training loss" + ("" if e is None else f", ε = {e:g}"))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        return ctx.savefig(fig, "dp-text.png")
