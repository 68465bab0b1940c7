"""``optfm bench alignment``: rows on a tiny model, components that add up to the IRFT stage, and
that the timed trainers compute exactly what the library's IRFT and SFT trainers compute (one
stage = generation with the frozen stage model, then per batch two no-grad reference passes with
that same model and the policy passes + step).

Ratios are not compared with a target (the benchmark has none; timings are noisy on shared CI
machines); they must be finite and positive.
"""

import math

import pytest
import torch

from optfm.alignment import IRFTTrainer, SFTTrainer
from optfm.bench import alignment as ba
from optfm.bench import get_benchmark

TINY = {"n_embd": 16, "n_layer": 1, "n_head": 2}
N_DEMOS, BATCH = 64, 16


@pytest.fixture(scope="module")
def setup():
    return ba.make_setup(N_DEMOS, BATCH)


@pytest.fixture(scope="module")
def rows():
    return {r.name: r for r in ba.bench_alignment(repeats=1, sizes=(TINY,), n_demos=N_DEMOS,
                                                  batch=BATCH)}


def _names(model_kwargs):
    label = ba.model_label(model_kwargs)
    return [ba.ROW_TOTAL.format(model=label, n=N_DEMOS, batch=BATCH),
            ba.ROW_GENERATION.format(model=label), ba.ROW_REFERENCE.format(model=label),
            ba.ROW_POLICY.format(model=label), ba.ROW_SAMPLER.format(n=N_DEMOS, model=label)]


def test_registered_and_every_row_present_positive_finite(rows):
    assert get_benchmark("alignment")[1] is ba.bench_alignment
    names = _names(TINY)
    assert list(rows) == names
    for r in rows.values():
        assert r.benchmark == "alignment" and r.unit == "s" and r.target is None and r.ok is None
        assert r.measured > 0 and r.baseline > 0
        assert math.isfinite(r.ratio) and r.ratio > 0
    assert "torch threads" in rows[names[0]].note and "torch threads" in rows[names[4]].note


def test_components_are_fractions_of_the_same_sft_epoch_and_add_up_to_the_stage(rows):
    total, *parts, _ = (rows[n] for n in _names(TINY))
    assert all(p.baseline == total.baseline for p in parts)  # each against the same SFT epoch
    s = sum(p.measured for p in parts)
    assert 0.5 * total.measured <= s <= 1.2 * total.measured
    assert sum(p.ratio for p in parts) == pytest.approx(s / total.baseline)
    assert total.ratio > 1  # an IRFT stage does strictly more than an SFT epoch on the same data


def test_setup_is_the_experiments(setup):
    from optfm.experiments.alignment import AlignmentExperimentConfig, _align_config

    exp = AlignmentExperimentConfig()
    policy = {"n_embd": exp.n_embd, "n_layer": exp.n_layer, "n_head": exp.n_head}
    assert policy == ba.MODEL_KWARGS
    ours, theirs = ba.make_config(exp.batch_size), _align_config(exp, 0, epochs=1)
    cost = ("batch_size", "sampler", "max_new_tokens", "do_sample", "temperature", "add_eos",
            "max_length", "max_grad_norm", "loss_type", "epochs")  # what changes a step's work
    assert {k: getattr(ours, k) for k in cost} == {k: getattr(theirs, k) for k in cost}
    assert len(setup.demos) == N_DEMOS and setup.steps == N_DEMOS // BATCH
    assert setup.tokenizer.convert_ids_to_tokens(setup.allowed_token_ids) == [
        f"t{v}" for v in range(16)]


def _train(trainer):
    torch.manual_seed(0)  # GPT-2's dropout (0.1, active in train mode) draws from the global RNG
    return trainer.train()


class _Recording(ba.TimedIRFT):
    """Records which model generated what and which model the no-grad passes used."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.samples, self.ref_models = [], []

    def sample(self, model, prompts):
        out = super().sample(model, prompts)
        self.samples.append((model, list(prompts), out))
        return out

    def logprob(self, model, prompts, responses, *, grad=True):
        if not grad:
            self.ref_models.append(model)
        return super().logprob(model, prompts, responses, grad=grad)


def test_timed_irft_stage_is_one_irft_epoch_exactly(setup):
    tok, demos, cfg = setup.tokenizer, setup.demos, setup.config
    timed = _Recording(ba.build_model(TINY, setup), tok, demos, cfg, stages=1,
                       allowed_token_ids=setup.allowed_token_ids)
    plain = IRFTTrainer(ba.build_model(TINY, setup), tok, demos, cfg, stages=1,
                        allowed_token_ids=setup.allowed_token_ids)
    h_timed, h_plain = _train(timed), _train(plain)
    # the timers change nothing: the same steps, losses and weights, bit for bit
    assert h_timed == h_plain and len(h_timed) == setup.steps
    for p, q in zip(timed.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # what was timed: one generation over every prompt with the frozen stage model ...
    assert timed.clock.calls == {"generation": 1, "reference": 2 * setup.steps,
                                 "policy": 3 * setup.steps}
    (stage, prompts, out), = timed.samples
    assert stage is not timed.model and not any(p.requires_grad for p in stage.parameters())
    assert sorted(prompts) == sorted(setup.prompts)
    words = {f"t{v}" for v in range(16)}
    assert all(len(s.split()) == cfg.max_new_tokens and set(s.split()) <= words for s in out)
    # ... whose log-probs are the reference of both no-grad passes
    assert all(m is stage for m in timed.ref_models)
    assert all(v >= 0 for v in timed.clock.seconds.values())


def test_timed_sft_epoch_is_one_sft_epoch_exactly(setup):
    tok, demos, cfg = setup.tokenizer, setup.demos, setup.config
    timed = ba.TimedSFT(ba.build_model(TINY, setup), tok, demos, cfg)
    plain = SFTTrainer(ba.build_model(TINY, setup), tok, demos, cfg)
    assert _train(timed) == _train(plain)
    for p, q in zip(timed.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert timed.clock.calls == {"forward": setup.steps, "step": setup.steps}


def test_bad_arguments():
    with pytest.raises(ValueError, match="sizes"):
        ba.bench_alignment(1, sizes=())
    with pytest.raises(ValueError, match="repeats"):
        ba.bench_alignment(0, sizes=(TINY,))
