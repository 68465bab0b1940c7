"""DP fine-tuning of tiny ``transformers`` sequence classifiers (BERT and GPT-2, built from their
config classes) through :func:`optfm.privacy.make_private`, with every filter.

Two facts about Opacus + ``transformers`` shape these tests:

* **Position ids must be passed per sample.** Left to themselves, ``BertEmbeddings`` slices its
  ``position_ids`` buffer to shape ``(1, L)`` and ``GPT2Model`` builds ``arange(L).unsqueeze(0)``,
  also ``(1, L)``; the result is broadcast over the batch. Opacus's ``nn.Embedding`` grad sampler
  takes the batch size from the layer's input, so the position-embedding weight gets a per-sample
  gradient of batch size 1 (``(1, max_pos, hidden)``) while every other parameter has ``B``; Opacus
  alone would fail with ``RuntimeError: stack expects each tensor to be equal size``, optfm's
  optimizer stops first with a ``ValueError`` naming the parameter and the remedy. Passing
  ``position_ids=arange(L).expand(B, L)`` gives every sample its own row (the gradients are then
  exactly per-sample, checked below against per-example autograd), so both architectures work
  with the position embeddings trainable. (Freezing ``position_embeddings`` / ``wpe`` would also
  work.) BERT's token-type ids are already expanded to ``(B, L)`` by ``transformers``; GPT-2's
  ``Conv1D`` has no grad sampler in Opacus, but :func:`optfm.privacy.make_private` registers optfm's
  (:mod:`optfm.privacy.grad_samplers`), so it goes through Opacus's hooks like ``nn.Linear``.
* **The model is fine-tuned from public pretraining, with a fresh head.** From its 0.02-std
  initialisation, this tiny BERT does not learn the task reliably under DP noise (measured: at
  ε = 8 over 40 steps with Adam, most seeds collapse to one class): its tanh pooler and 0.02-scale
  classifier make the gradient reaching the encoder tiny next to σC, and Adam turns the noise in
  every coordinate into lr-sized random steps. Non-privately it learns the task in 40 steps (five
  seeds out of five). So, as in real DP fine-tuning, the encoder is first trained non-privately on
  public data, then the classification head is re-initialised and the whole model is fine-tuned
  privately on a disjoint private set. GPT-2 follows the same protocol. The fine-tuning learning
  rate is 1e-3: at 3e-3, DOPPLER's a9b1 (an EMA) on top of Adam's own momentum oscillates on GPT-2
  (final loss 0.002-0.79 across seeds), while 1e-3 gives 0.05-0.09 for every filter and seed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from optfm.models.factories import tiny_sequence_classifier
from optfm.privacy import (
    KalmanFilter,
    LowPassFilter,
    PrivateOptimizer,
    epsilon_for,
    make_private,
)

V, L = 16, 8          # vocabulary, sequence length
MARKER, CLS, PAD = 1, 2, 0
STEPS, BATCH, N_PRIVATE = 40, 64, 1024
EPS, DELTA = 8.0, 1e-5
ARCHS = ["bert", "gpt2"]
HEAD = {"bert": "classifier", "gpt2": "score"}
NO_DROPOUT = {
    "bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
}
POS_EMB = {"bert": "bert.embeddings.position_embeddings.weight", "gpt2": "transformer.wpe.weight"}


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded sequences ``[CLS, t1, ...]`` of length L-3..L over tokens 3..V-1; half get the
    marker token at a random position; label = whether the marker occurs among the real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, L), generator=g)
    want = torch.randint(0, 2, (n,), generator=g).bool()
    pos = torch.randint(1, L, (n,), generator=g)
    ids[torch.arange(n)[want], pos[want]] = MARKER
    ids[:, 0] = CLS
    lengths = torch.randint(L - 3, L + 1, (n,), generator=g)
    mask = torch.arange(L)[None] < lengths[:, None]
    labels = ((ids == MARKER) & mask).any(1).long()
    return ids.masked_fill(~mask, PAD), mask.long(), labels


def _model(arch: str, seed: int):
    torch.manual_seed(seed)
    return tiny_sequence_classifier(arch=arch, vocab_size=V, hidden_size=32, num_layers=1,
                                    num_heads=2, max_position_embeddings=L, pad_token_id=PAD,
                                    **NO_DROPOUT[arch])


def _positions(ids: torch.Tensor) -> torch.Tensor:
    """One row of position ids per sample (see the module docstring)."""
    return torch.arange(ids.shape[1]).expand_as(ids)


def _forward(model, ids, mask, labels):
    return model(input_ids=ids, attention_mask=mask, position_ids=_positions(ids), labels=labels)


@torch.no_grad()
def _evaluate(model, data) -> tuple[float, float]:
    ids, mask, labels = data
    out = _forward(model, ids, mask, labels)
    return out.loss.item(), (out.logits.argmax(-1) == labels).float().mean().item()


@pytest.fixture(scope="module")
def test_set():
    return _data(512, seed=1)


@pytest.fixture(scope="module")
def pretrained(test_set):
    """Encoder weights from non-private training on public data, per architecture (lazy)."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def get(arch: str) -> dict[str, torch.Tensor]:
        if arch not in cache:
            model = _model(arch, seed=0)
            ids, mask, labels = _data(40 * 64, seed=10)
            opt = torch.optim.Adam(model.parameters(), lr=3e-3)
            for i in range(40):
                sl = slice(64 * i, 64 * (i + 1))
                opt.zero_grad()
                _forward(model, ids[sl], mask[sl], labels[sl]).loss.backward()
                opt.step()
            assert _evaluate(model, test_set)[1] >= 0.95  # the public pretraining worked
            cache[arch] = {k: v.detach().clone() for k, v in model.state_dict().items()
                           if not k.startswith(HEAD[arch] + ".")}
        return cache[arch]

    return get


class _ForwardCounter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, *_args) -> None:
        self.calls += 1


def _train(model, opt, loader, steps: int) -> None:
    done = 0
    while done < steps:
        for ids, mask, labels in loader:
            def closure(ids=ids, mask=mask, labels=labels):
                opt.zero_grad()
                loss = _forward(model, ids, mask, labels).loss
                loss.backward()
                return loss
            opt.step(closure)
            done += 1
            if done == steps:
                return


FILTERS = [
    pytest.param(lambda: None, 1, id="dp-sgd"),
    pytest.param(lambda: LowPassFilter.preset("a9b1"), 1, id="doppler-a9b1"),
    pytest.param(lambda: KalmanFilter(0.7, 0.5), 2, id="disk-0.7-0.5"),
    pytest.param(lambda: KalmanFilter.one_evaluation(0.7), 1, id="disk-one-eval-0.7"),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("make_filter", "forwards_per_step"), FILTERS)
def test_dp_finetuning_learns_with_each_filter(arch, make_filter, forwards_per_step, pretrained,
                                               test_set):
    model = _model(arch, seed=1)  # a different head initialisation from the pretraining run
    missing, unexpected = model.load_state_dict(pretrained(arch), strict=False)
    assert not unexpected and missing and all(k.startswith(HEAD[arch] + ".") for k in missing)
    counter = _ForwardCounter(model)
    ids, mask, labels = _data(N_PRIVATE, seed=0)
    loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=BATCH)
    filt = make_filter()
    torch.manual_seed(0)  # Poisson batches and noise come from the global RNG
    model, opt, loader, engine = make_private(
        model, torch.optim.Adam(model.parameters(), lr=1e-3), loader, target_epsilon=EPS,
        target_delta=DELTA, steps=STEPS, max_grad_norm=1.0, filter=filt,
        accountant="rdp")  # RDP calibrates in well under a second (PRV: a few seconds)
    assert isinstance(opt, PrivateOptimizer) and opt.filter is filt
    assert 0.5 < engine.noise_multiplier < 1.0  # really private: σ ≈ 0.7 at q = 1/16

    loss0, _ = _evaluate(model, test_set)
    counter.calls = 0
    _train(model, opt, loader, STEPS)
    assert counter.calls == STEPS * forwards_per_step
    assert engine.steps == STEPS

    eps = engine.epsilon()
    assert 0.0 < eps <= EPS
    assert eps == pytest.approx(EPS, abs=0.1)  # σ was calibrated to spend the budget in STEPS
    assert eps == pytest.approx(epsilon_for(engine.noise_multiplier, 1 / 16, STEPS, DELTA, "rdp"))

    loss1, acc1 = _evaluate(model, test_set)
    assert loss0 > 0.4  # the fresh head starts near chance
    assert loss1 < 0.25 and loss1 < 0.5 * loss0  # measured: 0.05-0.09 over five seeds
    assert acc1 >= 0.95


@pytest.mark.parametrize("arch", ARCHS)
def test_per_sample_gradients_are_exact_with_per_sample_position_ids(arch):
    """Opacus's per-sample gradients (hooks, GPT-2's Conv1D through optfm's registered sampler)
    equal per-example autograd for every parameter, the position embeddings included, with
    padding masks."""
    from opacus import GradSampleModule

    from optfm.privacy import register_transformers_grad_samplers

    model = _model(arch, seed=0)
    register_transformers_grad_samplers()  # transformers is imported now (make_private does this)
    reference = copy.deepcopy(model)
    ids, mask, labels = _data(6, seed=3)
    gsm = GradSampleModule(model)  # loss_reduction="mean": grad_sample is per-example
    _forward(gsm, ids, mask, labels).loss.backward()
    for i in range(len(ids)):
        reference.zero_grad()
        sl = slice(i, i + 1)
        _forward(reference, ids[sl], mask[sl], labels[sl]).loss.backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert p.grad_sample.shape == (len(ids), *p.shape), name
            assert torch.allclose(p.grad_sample[i], q.grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("arch", ARCHS)
def test_broadcast_position_ids_give_a_clear_error(arch):
    """Documents why position ids are passed: with the models' default ``(1, L)`` position ids the
    position-embedding weight gets a batch-1 per-sample gradient; the step refuses with an error
    that names the parameter and the remedy (Opacus alone fails with an opaque stack error)."""
    model = _model(arch, seed=0)
    ids, mask, labels = _data(64, seed=0)
    loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=32)
    model, opt, _, _ = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                                    noise_multiplier=1.0, poisson_sampling=False)
    opt.zero_grad()
    model(input_ids=ids[:32], attention_mask=mask[:32], labels=labels[:32]).loss.backward()
    params = dict(model._module.named_parameters())
    assert params[POS_EMB[arch]].grad_sample.shape[0] == 1
    with pytest.raises(ValueError, match=f"{POS_EMB[arch]} has 1, the others 32.*position_ids"):
        opt.step()
