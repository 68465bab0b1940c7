"""Alignment trainers on a tiny causal LM with TRL-format data: they learn, and fail loudly."""

from __future__ import annotations

import copy

import pytest
import torch

from optfm.alignment import (
    AIHFRewardTrainer,
    AIHFTrainer,
    DPOTrainer,
    IRFTTrainer,
    RFTTrainer,
    SFTTrainer,
    batch_logprob,
    generate,
)

TOPICS = 4
WORDS = [f"c{i}" for i in range(TOPICS)] + [f"d{i}" for i in range(4)] + [f"t{i}" for i in range(6)]


def _demo(c: int, d: int) -> dict:
    return {"prompt": f"c{c} d{d} d{(d + 1) % 4}", "completion": f"t{c} t{c + 1} t{c} t{c + 2}"}


DEMOS = [_demo(c, d) for c in range(TOPICS) for d in range(4)]
PREFS = [{"prompt": r["prompt"], "chosen": r["completion"],
          "rejected": f"t{(int(r['prompt'][1]) + 3) % 6} t5 t5 t5"} for r in DEMOS]


@pytest.fixture(scope="module")
def lm():
    from optfm.data import build_word_tokenizer
    from optfm.models.factories import tiny_gpt2

    tok = build_word_tokenizer([" ".join(WORDS)])
    torch.manual_seed(0)
    model = tiny_gpt2(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=32,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    return model, tok


def _mean_lp(model, tok, rows, key="completion"):
    lp, _ = batch_logprob(model, tok, [r["prompt"] for r in rows], [r[key] for r in rows],
                          grad=False)
    return lp.mean().item()


def _allowed(tok):
    return tok.convert_tokens_to_ids([f"t{i}" for i in range(6)])


def test_sft_raises_demo_likelihood(lm):
    model, tok = copy.deepcopy(lm[0]), lm[1]
    before = _mean_lp(model, tok, DEMOS)
    hist = SFTTrainer(model, tok, DEMOS, lr=3e-3, epochs=15, batch_size=8).train()
    assert len(hist) == 30
    assert _mean_lp(model, tok, DEMOS) > before + 5


def test_dpo_separates_chosen_from_rejected(lm):
    model, tok = copy.deepcopy(lm[0]), lm[1]
    tr = DPOTrainer(model, tok, PREFS, lr=3e-3, epochs=10, batch_size=8, beta=0.5)
    tr.train()
    assert tr.history[-1]["reward_acc"] == 1.0 and tr.history[-1]["margin"] > 0
    margin = _mean_lp(model, tok, PREFS, "chosen") - _mean_lp(model, tok, PREFS, "rejected")
    assert margin > 3


def test_fixed_length_sampler_is_exact_and_reproducible(lm):
    model, tok = lm
    prompts = [r["prompt"] for r in DEMOS[:5]]
    a = generate(model, tok, prompts, sampler="fixed", max_new_tokens=4,
                 allowed_token_ids=_allowed(tok), generator=torch.Generator().manual_seed(3))
    b = generate(model, tok, prompts, sampler="fixed", max_new_tokens=4,
                 allowed_token_ids=_allowed(tok), generator=torch.Generator().manual_seed(3))
    assert a == b
    assert all(len(s.split()) == 4 and all(w.startswith("t") for w in s.split()) for s in a)
    greedy = generate(model, tok, prompts, sampler="generate", max_new_tokens=4, do_sample=False)
    assert len(greedy) == 5


@pytest.mark.parametrize("regenerate", ["stage", "batch"])
def test_irft_stages_raise_demo_likelihood(lm, regenerate):
    model, tok = copy.deepcopy(lm[0]), lm[1]
    before = _mean_lp(model, tok, DEMOS)
    tr = IRFTTrainer(model, tok, DEMOS, stages=2, regenerate=regenerate, lr=3e-3, epochs=3,
                     batch_size=4, beta=0.5, sampler="fixed", max_new_tokens=4)
    tr.allowed_token_ids = _allowed(tok)
    hist = tr.train()
    assert [h["stage"] for h in hist] == [0, 0, 1, 1] * 3  # 8 demos per stage, batches of 4
    assert _mean_lp(model, tok, DEMOS) > before + 1


def _reward_model(tok):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=32,
                     num_labels=1, pad_token_id=tok.pad_token_id)
    return GPT2ForSequenceClassification(cfg)


def test_rft_reward_model_learns_demo_over_samples(lm):
    model, tok = copy.deepcopy(lm[0]), lm[1]
    tr = RFTTrainer(model, tok, DEMOS, _reward_model(tok), lr=1e-3, reward_lr=3e-3, epochs=6,
                    batch_size=8, samples_per_prompt=2, sampler="fixed", max_new_tokens=4)
    tr.allowed_token_ids = _allowed(tok)
    hist = tr.train()
    assert len(hist) == 12
    assert all(k in hist[-1] for k in ("rm_loss", "rm_demo_acc", "reward", "kl"))
    assert hist[-1]["rm_loss"] < hist[0]["rm_loss"]


@pytest.mark.parametrize("form", ["nll", "self_play"])
def test_aihf_forms_learn_from_both_sources(lm, form):
    model, tok = copy.deepcopy(lm[0]), lm[1]
    before = _mean_lp(model, tok, DEMOS)
    tr = AIHFTrainer(model, tok, DEMOS, PREFS, form=form, stages=2 if form == "self_play" else 1,
                     lr=3e-3, epochs=6, batch_size=8, beta=0.5, sampler="fixed", max_new_tokens=4)
    tr.allowed_token_ids = _allowed(tok)
    hist = tr.train()
    assert len(hist) == 12 and "pref_reward_acc" in hist[-1]
    margin = _mean_lp(model, tok, PREFS, "chosen") - _mean_lp(model, tok, PREFS, "rejected")
    assert margin > 3
    assert _mean_lp(model, tok, DEMOS) > before + 2


def test_aihf_explicit_reward_uses_preferences(lm):
    model, tok = copy.deepcopy(lm[0]), lm[1]
    tr = AIHFRewardTrainer(model, tok, DEMOS, PREFS, _reward_model(tok), lr=1e-3, epochs=2,
                           batch_size=8, samples_per_prompt=2, sampler="fixed", max_new_tokens=4)
    tr.allowed_token_ids = _allowed(tok)
    hist = tr.train()
    assert "rm_pref_acc" in hist[-1] and "rm_demo_acc" in hist[-1]


def test_bad_input_names_the_column_or_parameter(lm):
    model, tok = lm
    with pytest.raises(ValueError, match=r"missing column.*'completion'.*TRL"):
        SFTTrainer(model, tok, [{"prompt": "c0", "response": "t1"}])
    with pytest.raises(ValueError, match=r"missing column.*'rejected'"):
        DPOTrainer(model, tok, [{"prompt": "c0", "chosen": "t1", "reject": "t2"}])
    with pytest.raises(ValueError, match=r"demos\[0\]\['completion'\] is an empty response"):
        SFTTrainer(model, tok, [{"prompt": "c0", "completion": "  "}])
    with pytest.raises(ValueError, match="demos is empty"):
        IRFTTrainer(model, tok, [])
    with pytest.raises(ValueError, match="beta"):
        IRFTTrainer(model, tok, DEMOS, beta=0.0)
    with pytest.raises(ValueError, match="stages"):
        IRFTTrainer(model, tok, DEMOS, stages=0)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        RFTTrainer(model, tok, DEMOS, _reward_model(tok), samples_per_prompt=1)
    with pytest.raises(ValueError, match="unknown AlignConfig field"):
        SFTTrainer(model, tok, DEMOS, learning_rate=1.0)
    long = [{"prompt": " ".join(["d1"] * 40), "completion": "t1"}]
    tr = SFTTrainer(model, tok, long)
    with pytest.raises(ValueError, match="more than max_length=32"):
        tr.train()


def test_max_steps_is_a_fixed_budget(lm):
    model, tok = copy.deepcopy(lm[0]), lm[1]
    hist = SFTTrainer(model, tok, DEMOS, epochs=50, batch_size=4, max_steps=7).train()
    assert len(hist) == 7
    tr = IRFTTrainer(model, tok, DEMOS, stages=2, epochs=50, batch_size=4, max_steps=5,
                     sampler="fixed", max_new_tokens=4, allowed_token_ids=_allowed(tok))
    assert len(tr.train()) == 5
    with pytest.raises(ValueError, match="max_steps"):
        SFTTrainer(model, tok, DEMOS, max_steps=0)


def test_samples_are_scored_on_the_sampled_tokens(lm):
    from optfm.training.lm import GeneratedText, encode_pairs

    model, tok = lm
    ids = tok.convert_tokens_to_ids(["t3", "t4", "[EOS]"])
    fake = GeneratedText("t1 t2", ids)  # text and ids disagree: the ids win, no EOS appended
    batch = encode_pairs(tok, ["c0 d1 d2"], [fake])
    assert batch["labels"][0][batch["labels"][0] != -100].tolist() == ids
    # model.generate samples keep their EOS (if any) and are re-scored exactly
    out = generate(model, tok, [r["prompt"] for r in DEMOS[:4]], sampler="generate",
                   max_new_tokens=3, do_sample=True)
    for g in out:
        assert isinstance(g, GeneratedText) and 1 <= len(g.token_ids) <= 3
    with pytest.raises(ValueError, match="allowed_token_ids restricts the fixed-length sampler"):
        generate(model, tok, ["c0"], sampler="generate", allowed_token_ids=_allowed(tok))


def test_dropout_is_off_so_implicit_rewards_start_at_zero(lm):
    from optfm.alignment import frozen_copy

    model, tok = copy.deepcopy(lm[0]), lm[1]
    model.config.resid_pdrop = 0.1
    tr = DPOTrainer(model, tok, PREFS)
    ref = frozen_copy(model)
    model.train()
    a = batch_logprob(model, tok, ["c0 d1 d2"] * 4, ["t0 t1 t0 t2"] * 4)[0]
    b = batch_logprob(ref, tok, ["c0 d1 d2"] * 4, ["t0 t1 t0 t2"] * 4, grad=False)[0]
    assert torch.allclose(a, b)
    assert tr.config.disable_dropout


def test_reward_model_pad_id_must_match(lm):
    from optfm.alignment import sequence_reward

    tok = lm[1]
    rm = _reward_model(tok)
    r = sequence_reward(rm, tok, ["c0 d1", "c1 d2 d3"], ["t1", "t2 t3"])
    assert r.shape == (2,)
    rm.config.pad_token_id = tok.eos_token_id
    with pytest.raises(ValueError, match="pad_token_id"):
        sequence_reward(rm, tok, ["c0 d1"], ["t1"])


def test_rlhf_reward_warmup_fits_the_reward_model_first(lm):
    model, tok = copy.deepcopy(lm[0]), lm[1]
    tr = RFTTrainer(model, tok, DEMOS, _reward_model(tok), prefs=PREFS, w_demo=0.0, w_pref=1.0,
                    reward_warmup_steps=20, reward_lr=3e-3, max_steps=2, batch_size=8,
                    samples_per_prompt=2, sampler="fixed", max_new_tokens=4,
                    allowed_token_ids=_allowed(tok))
    hist = tr.train()
    assert len(tr.reward_warmup_log) == 20 and len(hist) == 2
    assert tr.reward_warmup_log[-1]["rm_pref_acc"] == 1.0
    assert tr.reward_warmup_log[-1]["rm_loss"] < tr.reward_warmup_log[0]["rm_loss"]
