"""Causal-LM helpers shared by the unlearning and alignment methods.

A (prompt, response) pair is tokenised in two pieces so the boundary is exact: the prompt with the
tokenizer's own special tokens (a BOS where the tokenizer adds one), the response without them,
followed by EOS. ``labels`` copy ``input_ids`` on response tokens and are ``-100`` on the prompt and
on padding, so every loss here is over response tokens only. All functions take any
``transformers`` causal LM (``model(input_ids, attention_mask=...).logits``) and its tokenizer.

- :func:`encode_pairs` - right-padded batch with masked labels (``input_ids``, ``attention_mask``,
  ``labels``).
- :func:`token_logprobs` - per-token log-probabilities of the labels, shape (B, L-1), and the mask.
- :func:`sequence_logprob` - sum over response tokens and the token count per sequence.
- :func:`response_nll` - token-mean negative log-likelihood per sequence (TOFU's per-token
  normalised answer loss).
- :func:`lm_loss` - the usual token-mean cross-entropy over all response tokens of the batch.
- :func:`generate_greedy` - batched greedy continuation with ``model.generate`` (left padding).
- :func:`check_tokenizer_model` - refuse a tokenizer whose ids the model cannot embed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IGNORE_INDEX",
    "GeneratedText",
    "check_tokenizer_model",
    "encode_pairs",
    "generate_greedy",
    "left_pad_prompts",
    "lm_loss",
    "response_nll",
    "sequence_logprob",
    "token_logprobs",
]

IGNORE_INDEX = -100


class GeneratedText(str):
    """A decoded sample that remembers the exact token ids it was decoded from (``token_ids``,
    including a final EOS when the model generated one). :func:`encode_pairs` scores these ids."""

    token_ids: tuple[int, ...]

    def __new__(cls, text: str, token_ids: Sequence[int]) -> GeneratedText:
        obj = super().__new__(cls, text)
        obj.token_ids = tuple(int(t) for t in token_ids)
        return obj


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id; set tokenizer.pad_token")
    return int(pad)


def _context_length(model: nn.Module | None) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_tokenizer_model(tokenizer, model: nn.Module) -> None:
    """Raise ``ValueError`` if the tokenizer can produce ids the model's embedding cannot hold."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        return
    n_tok = len(tokenizer)
    if n_tok > emb.num_embeddings:
        raise ValueError(
            f"tokenizer/model mismatch: the tokenizer has {n_tok} tokens but the model's input "
            f"embedding has {emb.num_embeddings} rows; pass the tokenizer the model was trained with "
            "(or call model.resize_token_embeddings(len(tokenizer)))"
        )


def encode_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
                 max_length: int | None = None, model: nn.Module | None = None,
                 add_eos: bool = True, device: torch.device | str | None = None
                 ) -> dict[str, torch.Tensor]:
    """Tokenise (prompt, response) pairs into a right-padded batch with prompt-masked labels.

    A response that carries ``token_ids`` (a :class:`GeneratedText` from a sampler) is used as
    those exact tokens, with no EOS added: decoding and re-encoding can change the tokens of
    byte-level BPE vocabularies, and a sample keeps its EOS only if the model produced one.
    ``max_length`` defaults to the model's context length when ``model`` is given; a pair longer
    than it raises ``ValueError`` (nothing is silently truncated). Empty responses are refused.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses differ in length ({len(prompts)} vs {len(responses)})")
    if not prompts:
        raise ValueError("encode_pairs needs at least one (prompt, response) pair")
    if max_length is None and model is not None:
        max_length = _context_length(model)
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError("add_eos=True needs tokenizer.eos_token_id")
    rows: list[list[int]] = []
    starts: list[int] = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not isinstance(r, str) or (not r.strip() and not getattr(r, "token_ids", None)):
            raise ValueError(f"response {i} is empty; every pair needs a non-empty response")
        ids_p = list(tokenizer(p, add_special_tokens=True)["input_ids"])
        given = getattr(r, "token_ids", None)
        if given is not None:  # a sampled response: score exactly the tokens that were sampled
            ids_r = [int(t) for t in given]
        else:
            ids_r = list(tokenizer(r, add_special_tokens=False)["input_ids"])
            if add_eos and ids_r:
                ids_r.append(int(eos))
        if not ids_r:
            raise ValueError(f"response {i} ({r!r}) tokenises to no tokens")
        ids = ids_p + ids_r
        if max_length is not None and len(ids) > max_length:
            raise ValueError(
                f"pair {i} has {len(ids)} tokens (prompt {len(ids_p)}), more than max_length="
                f"{max_length} (the model's context); shorten the prompt or raise max_length")
        rows.append(ids)
        starts.append(len(ids_p))
    width = max(len(r) for r in rows)
    pad = _pad_id(tokenizer)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, s) in enumerate(zip(rows, starts)):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = t
        attention[i, : len(ids)] = 1
        labels[i, s: len(ids)] = t[s:]
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label token given its prefix: ``(logp, mask)``, both (B, L-1).

    ``logp`` is 0 where ``mask`` is False (prompt and padding). Uses ``cross_entropy`` on the
    shifted logits, so no (B, L, V) log-softmax copy is kept beyond the logits themselves.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    mask = target != IGNORE_INDEX
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view_as(target)
    return -nll * mask, mask


def sequence_logprob(model: nn.Module, batch: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of response-token log-probs, number of response tokens)`` per sequence, (B,) each."""
    logp, mask = token_logprobs(model, batch)
    return logp.sum(dim=1), mask.sum(dim=1)


def response_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean negative log-likelihood of each response, shape (B,)."""
    total, count = sequence_logprob(model, batch)
    return -total / count.clamp_min(1)


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over every response token of the batch (the Hugging Face convention)."""
    logp, mask = token_logprobs(model, batch)
    n = mask.sum()
    if n == 0:
        raise ValueError("the batch has no response tokens (all labels are -100)")
    return -logp.sum() / n


def left_pad_prompts(tokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of prompts padded on the left (with the pad or EOS id), so
    that generated tokens of every row start in the same column."""
    pad = _pad_id(tokenizer)
    chunk = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    width = max(len(c) for c in chunk)
    ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    att = torch.zeros((len(chunk), width), dtype=torch.long)
    for i, c in enumerate(chunk):
        ids[i, width - len(c):] = torch.tensor(c, dtype=torch.long)
        att[i, width - len(c):] = 1
    return ids, att


@torch.no_grad()
def generate_greedy(model: nn.Module, tokenizer, prompts: Sequence[str], *,
                    max_new_tokens: int = 32, batch_size: int = 32) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded new tokens only, special tokens dropped)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for b in range(0, len(prompts), batch_size):
            ids, att = left_pad_prompts(tokenizer, prompts[b: b + batch_size])
            width = ids.shape[1]
            gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            new = gen[:, width:]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return [s.strip() for s in out]
