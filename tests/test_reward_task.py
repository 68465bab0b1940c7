"""The synthetic alignment task: exact reward, exact KL-optimal policy, demonstrations, preferences."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from optfm.data import Demonstrations, Preferences, RewardTask, make_reward_task


@pytest.fixture(scope="module")
def task() -> RewardTask:
    return make_reward_task()


@pytest.fixture(scope="module")
def tiny() -> RewardTask:
    table = np.array([[1.0, 0.7, -0.5], [0.2, -1.0, 0.9]])
    return RewardTask(reward_table=table, length=3, repeat_penalty=0.6, n_distractors=1,
                      n_distractor_tokens=2)


def _all_responses(t: RewardTask) -> np.ndarray:
    return np.array(list(itertools.product(range(t.vocab), repeat=t.length)), dtype=np.int64)


def _prompt_for(t: RewardTask, topic: int, k: int) -> np.ndarray:
    return t.sample_prompts(k, 0, topics=np.full(k, topic))


def _formula(t: RewardTask, c: int, y: list[int]) -> float:
    gains = sum(t.reward_table[c, a] for a in y)
    repeats = sum(1 for i in range(1, len(y)) if y[i] == y[i - 1])
    return (gains - t.repeat_penalty * repeats) / len(y)


# ------------------------------------------------------------------------------------------
# construction and prompts
# ------------------------------------------------------------------------------------------


def test_default_task_shape_and_determinism(task: RewardTask):
    assert (task.n_topics, task.vocab, task.length, task.prompt_length) == (8, 16, 8, 4)
    assert task.repeat_penalty == 1.0
    np.testing.assert_array_equal(task.reward_table, make_reward_task().reward_table)
    assert not np.array_equal(task.reward_table, make_reward_task(seed=1).reward_table)
    with pytest.raises(ValueError):
        task.reward_table[0, 0] = 1.0  # read-only


def test_prompts(task: RewardTask):
    x = task.sample_prompts(500, 3)
    np.testing.assert_array_equal(x, task.sample_prompts(500, np.random.default_rng(3)))
    assert x.shape == (500, 4) and x.dtype == np.int64
    c = task.topics(x)
    assert set(c.tolist()) == set(range(8))
    assert ((x < 8).sum(1) == 1).all()  # one topic token per prompt, distractors >= 8
    assert x.max() < 16
    assert len(set(np.argmax(x < 8, axis=1).tolist())) == 4  # topic position is shuffled
    fixed = RewardTask(reward_table=task.reward_table, shuffle_prompt=False)
    xf = fixed.sample_prompts(50, 0, topics=np.arange(50) % 8)
    np.testing.assert_array_equal(xf[:, 0], np.arange(50) % 8)
    with pytest.raises(ValueError, match="exactly one topic"):
        task.topics(np.array([[0, 1, 9, 9]]))
    with pytest.raises(ValueError, match="prompt ids"):
        task.topics(np.array([[0, 9, 9, 99]]))


# ------------------------------------------------------------------------------------------
# reward
# ------------------------------------------------------------------------------------------


def test_reward_matches_formula(task: RewardTask):
    seqs = [[0] * 8, [3, 3, 5, 5, 5, 1, 2, 3], [6, 7, 6, 7, 6, 7, 6, 7], list(range(8)),
            [15, 15, 14, 15, 15, 15, 0, 0]]
    topics = [0, 1, 2, 7, 4]
    prompts = np.stack([task.sample_prompts(1, k, topics=[c])[0] for k, c in enumerate(topics)])
    got = task.reward(prompts, np.array(seqs))
    want = [_formula(task, c, y) for c, y in zip(topics, seqs)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # all repeats: (L R[c, a] - λ (L - 1)) / L
    assert task.topic_reward(0, [0] * 8) == pytest.approx(task.reward_table[0, 0] - 7 / 8)
    # broadcasting: one prompt against several responses
    many = task.sample_uniform(10, 0)
    np.testing.assert_allclose(task.reward(prompts[0], many),
                               [_formula(task, 0, y.tolist()) for y in many])


def test_uniform_and_max_reward_by_enumeration(tiny: RewardTask):
    ys = _all_responses(tiny)
    for c in range(tiny.n_topics):
        r = tiny.topic_reward(np.full(len(ys), c), ys)
        assert tiny.uniform_reward()[c] == pytest.approx(r.mean(), abs=1e-12)
        assert tiny.max_reward()[c] == pytest.approx(r.max(), abs=1e-12)
        assert tiny.topic_reward(c, tiny.optimal_response(c)) == pytest.approx(r.max())


def test_default_task_optimum_alternates(task: RewardTask):
    best = task.optimal_response()
    assert not (best[:, 1:] == best[:, :-1]).any()
    np.testing.assert_allclose(task.topic_reward(np.arange(8), best), task.max_reward())
    # "repeat the best token" is clearly worse than the optimum
    greedy = np.repeat(task.reward_table.argmax(1)[:, None], 8, 1)
    greedy_score = task.normalized_score(task.topic_reward(np.arange(8), greedy), np.arange(8))
    assert greedy_score.mean() < 0.6


# ------------------------------------------------------------------------------------------
# the exact KL-regularised optimum
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.05, 0.3, 2.0])
def test_log_prob_is_brute_force_gibbs(tiny: RewardTask, beta: float):
    ys = _all_responses(tiny)
    for c in range(tiny.n_topics):
        x = _prompt_for(tiny, c, len(ys))
        lp = tiny.log_prob(x, ys, beta)
        assert np.exp(lp).sum() == pytest.approx(1.0, abs=1e-12)
        r = tiny.reward(x, ys)
        logits = r / beta  # uniform reference: a constant factor
        want = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
        np.testing.assert_allclose(lp, want, atol=1e-10)
        p = np.exp(want)
        assert tiny.expected_reward(beta)[c] == pytest.approx((p * r).sum(), abs=1e-12)
        kl = (p * (want + tiny.length * math.log(tiny.vocab))).sum()
        assert tiny.kl_from_uniform(beta)[c] == pytest.approx(kl, abs=1e-10)
    pol = tiny.optimal_policy(beta)
    assert pol.shape == (2, 3, 3, 3)
    np.testing.assert_allclose(pol.sum(-1), 1.0)
    np.testing.assert_allclose(pol[:, 0], np.broadcast_to(pol[:, 0, :1], pol[:, 0].shape))


def test_expected_reward_monotone_in_beta_and_limits(task: RewardTask, tiny: RewardTask):
    for t in (task, tiny):
        betas = [10.0, 1.0, 0.3, 0.1, 0.03, 0.01, 1e-3]
        er = np.array([t.expected_reward(b) for b in betas])
        assert (np.diff(er, axis=0) > -1e-12).all()
        np.testing.assert_allclose(t.expected_reward(1e-4), t.max_reward(), atol=1e-6)
        np.testing.assert_allclose(t.expected_reward(1e4), t.uniform_reward(), atol=1e-4)
        np.testing.assert_allclose(t.markov_expected_reward(t.uniform_policy()),
                                   t.uniform_reward(), atol=1e-12)


def test_optimal_policy_beats_alternatives(task: RewardTask):
    beta = 0.1
    # the KL-regularised objective E[r] - β KL is maximised by π*_β ...
    obj_star = task.expected_reward(beta) - beta * task.kl_from_uniform(beta)
    rng = np.random.default_rng(0)
    shape = (8, 8, 16, 16)
    for _ in range(5):
        logits = rng.standard_normal(shape) * 2
        pol = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        pol[:, 0] = pol[:, 0, :1]  # the first position has no previous token
        er = task.markov_expected_reward(pol)
        # KL(π ‖ uniform) of a Markov chain, by the same forward recursion
        marg, kl = pol[:, 0, 0], (pol[:, 0, 0] * np.log(pol[:, 0, 0] * 16)).sum(-1)
        for i in range(1, 8):
            kl = kl + (marg[:, :, None] * pol[:, i] * np.log(pol[:, i] * 16)).sum((-1, -2))
            marg = (marg[:, :, None] * pol[:, i]).sum(1)
        assert (er - beta * kl <= obj_star + 1e-12).all()
    # ... and π*_β at small β has a higher expected reward than uniform, "repeat the best token"
    # and a per-topic unigram of the expert (which ignores the previous token)
    er_star = task.expected_reward(0.02)
    assert (er_star > task.uniform_reward()).all()
    greedy = np.repeat(task.reward_table.argmax(1)[:, None], 8, 1)
    assert (er_star > task.topic_reward(np.arange(8), greedy)).all()
    pol = task.optimal_policy(0.02)
    marg = pol[:, 0, 0]
    unigram = np.broadcast_to(marg[:, None, None, :], pol.shape)
    assert (er_star > task.markov_expected_reward(unigram)).all()
    assert (task.max_reward() >= er_star).all()


def test_sampled_reward_matches_exact(task: RewardTask):
    beta = task.expert_beta(0.65)
    x = task.sample_prompts(4000, 1, topics=np.arange(4000) % 8)
    y = task.sample_policy(x, beta, 2)
    np.testing.assert_array_equal(y, task.sample_policy(x, beta, 2))
    r = task.reward(x, y)
    c = task.topics(x)
    exact = task.expected_reward(beta)[c]
    se = r.std() / math.sqrt(len(r))
    assert abs(r.mean() - exact.mean()) < 4 * se
    # per-token marginals of the samples match the exact first-token distribution
    first = np.bincount(y[c == 0, 0], minlength=16) / (c == 0).sum()
    np.testing.assert_allclose(first, task.optimal_policy(beta, 0)[0, 0], atol=0.05)
    # the exact log-likelihood of expert samples is higher than of uniform responses
    u = task.sample_uniform(len(x), 3)
    assert task.log_prob(x, y, beta).mean() > task.log_prob(x, u, beta).mean()


def test_normalised_score_endpoints(task: RewardTask):
    c = np.arange(8)
    np.testing.assert_allclose(task.normalized_score(task.uniform_reward()), 0.0, atol=1e-12)
    np.testing.assert_allclose(task.normalized_score(task.max_reward()), 1.0, atol=1e-12)
    best = task.optimal_response()
    np.testing.assert_allclose(task.normalized_score(task.topic_reward(c, best), c), 1.0)
    x = task.sample_prompts(8000, 5)
    u = task.sample_uniform(8000, 6)
    s = task.normalized_score(task.reward(x, u), task.topics(x))
    assert abs(s.mean()) < 4 * s.std() / math.sqrt(len(s))
    assert task.expected_score(1e-4).mean() == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------------------
# demonstrations and preferences
# ------------------------------------------------------------------------------------------


def test_demonstrations(task: RewardTask):
    d = task.demonstrations(2000, 7)
    assert isinstance(d, Demonstrations) and len(d) == 2000
    assert task.expected_score(d.beta).mean() == pytest.approx(0.65, abs=1e-6)
    c = task.topics(d.prompts)
    s = task.normalized_score(task.reward(d.prompts, d.responses), c)
    assert abs(s.mean() - 0.65) < 4 * s.std() / math.sqrt(len(s))
    assert not d.is_noise.any()
    again = task.demonstrations(2000, 7)
    np.testing.assert_array_equal(d.responses, again.responses)
    np.testing.assert_array_equal(d.prompts, again.prompts)

    noisy = task.demonstrations(1000, 7, noise=0.3, target_fraction=0.7)
    assert noisy.is_noise.sum() == 300 and noisy.beta < d.beta
    sn = task.normalized_score(task.reward(noisy.prompts, noisy.responses),
                               task.topics(noisy.prompts))
    assert sn[noisy.is_noise].mean() < 0.15 < 0.55 < sn[~noisy.is_noise].mean()

    rows = task.to_trl_demos(d)
    assert len(rows) == 2000 and set(rows[0]) == {"prompt", "completion"}
    assert rows[0]["completion"].startswith(" ")
    np.testing.assert_array_equal(task.parse_response(rows[0]["completion"]), d.responses[0])


def test_expert_beta_bisection(task: RewardTask):
    betas = [task.expert_beta(f) for f in (0.6, 0.65, 0.7, 0.75)]
    assert betas == sorted(betas, reverse=True)
    for f, b in zip((0.6, 0.65, 0.7, 0.75), betas):
        assert task.expected_score(b).mean() == pytest.approx(f, abs=1e-8)
    for bad in (0.0, 1.0, -0.2, 1.5, float("nan")):
        with pytest.raises(ValueError, match="target_fraction"):
            task.expert_beta(bad)


def test_preferences_bradley_terry(task: RewardTask):
    p = task.preferences(2000, 11, temperature=0.05)
    assert isinstance(p, Preferences) and len(p) == 2000
    np.testing.assert_allclose(p.chosen_reward, task.reward(p.prompts, p.chosen))
    np.testing.assert_allclose(p.rejected_reward, task.reward(p.prompts, p.rejected))
    diff = p.chosen_reward - p.rejected_reward
    assert (diff > 0).mean() > 0.85
    # label probabilities are calibrated: compare with the Bradley–Terry expectation
    pb = 1 / (1 + np.exp(-np.abs(diff) / 0.05))
    assert abs((diff > 0).mean() - pb[diff != 0].mean() * (diff != 0).mean()) < 0.03
    assert set(np.unique(p.levels).tolist()) <= {0.0, 0.25, 0.5, 0.75, 0.9}

    hot = task.preferences(4000, 12, temperature=1e3)
    frac = (hot.chosen_reward > hot.rejected_reward).mean()
    assert abs(frac - 0.5) < 0.05
    hard = task.preferences(500, 13, temperature=0.0)
    assert (hard.chosen_reward >= hard.rejected_reward).all()
    np.testing.assert_array_equal(p.chosen, task.preferences(2000, 11, temperature=0.05).chosen)

    expert_only = task.preferences(10, 1, score_levels=[0.65])
    assert (expert_only.levels == 0.65).all()
    opt = task.preferences(4, 1, score_levels=[1.0], temperature=0.0)
    np.testing.assert_allclose(opt.chosen_reward, task.max_reward()[task.topics(opt.prompts)])

    rows = task.to_trl_prefs(p)
    assert set(rows[0]) == {"prompt", "chosen", "rejected"}
    np.testing.assert_array_equal(task.parse_response(rows[5]["chosen"]), p.chosen[5])
    np.testing.assert_array_equal(task.parse_prompt(rows[5]["prompt"]), p.prompts[5])


# ------------------------------------------------------------------------------------------
# strings and tokenizers
# ------------------------------------------------------------------------------------------


def test_string_round_trip(task: RewardTask):
    x = task.sample_prompts(3, 0)
    y = task.sample_uniform(3, 0)
    texts = task.prompt_text(x)
    assert isinstance(texts, list) and len(texts) == 3
    assert task.response_text(np.arange(8)) == "t0 t1 t2 t3 t4 t5 t6 t7"
    for i in range(3):
        np.testing.assert_array_equal(task.parse_prompt(texts[i]), x[i])
        np.testing.assert_array_equal(task.parse_response(task.response_text(y[i])), y[i])
    assert task.prompt_text(np.array([2, 8, 15, 9])) == "c2 d0 d7 d1"
    with pytest.raises(ValueError, match="unknown response words"):
        task.parse_response("t1 t2 t3 t4 t5 t6 t7 t99")
    with pytest.raises(ValueError, match="8 words"):
        task.parse_response("t1 t2")
    with pytest.raises(ValueError, match="unknown prompt words"):
        task.parse_prompt("c1 d0 d1 t3")


def test_tokenizer(task: RewardTask):
    tok = task.build_tokenizer()
    assert len(tok) == 8 + 8 + 16 + 4
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    ids = task.response_token_ids(tok)
    assert ids.shape == (16,) and len(set(ids.tolist())) == 16 and ids.min() >= 4
    y = task.sample_uniform(1, 4)[0]
    enc = tok(task.response_text(y), add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(enc, ids[y])
    pids = task.prompt_token_ids(tok)
    assert not set(pids.tolist()) & set(ids.tolist())
    row = task.to_trl_demos(task.demonstrations(1, 0))[0]
    full = tok(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]
    assert len(full) == 4 + 8 and tok.unk_token_id not in full
    with pytest.raises(ValueError, match="does not know"):
        make_reward_task(vocab=20).response_token_ids(tok)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"length": 0}, "length"), ({"vocab": 1}, "vocab"), ({"n_topics": 0}, "n_topics"),
    ({"repeat_penalty": -1.0}, "repeat_penalty"), ({"repeat_penalty": float("inf")},
                                                   "repeat_penalty"),
    ({"n_distractors": -1}, "n_distractors"), ({"n_distractor_tokens": 0}, "n_distractor_tokens"),
    ({"seed": -3}, "seed"), ({"length": 2.5}, "length"),
])
def test_bad_task_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_reward_task(**kwargs)


def test_no_distractors_and_bad_tables():
    t = make_reward_task(n_distractors=0, n_distractor_tokens=0, length=1)
    x = t.sample_prompts(5, 0)
    assert x.shape == (5, 1) and (x < 8).all()
    assert t.max_reward() == pytest.approx(t.reward_table.max(1))
    with pytest.raises(ValueError, match="reward_table"):
        RewardTask(reward_table=np.zeros((3, 1)))
    with pytest.raises(ValueError, match="reward_table"):
        RewardTask(reward_table=np.array([[0.0, np.nan]]))


def test_bad_call_arguments(task: RewardTask):
    x = task.sample_prompts(2, 0)
    y = task.sample_uniform(2, 0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="beta"):
            task.optimal_policy(bad)
        with pytest.raises(ValueError, match="beta"):
            task.log_prob(x, y, bad)
    with pytest.raises(ValueError, match="beta"):
        task.sample_policy(x, 0.0, 0)
    with pytest.raises(ValueError, match="responses"):
        task.reward(x, y[:, :5])
    with pytest.raises(ValueError, match="response ids"):
        task.reward(x, y + 16)
    with pytest.raises(ValueError, match="responses must be an integer"):
        task.reward(x, y.astype(float))
    with pytest.raises(ValueError, match="noise"):
        task.demonstrations(5, 0, noise=1.5)
    with pytest.raises(ValueError, match="temperature"):
        task.preferences(5, 0, temperature=-0.1)
    with pytest.raises(ValueError, match="score_levels"):
        task.preferences(5, 0, score_levels=[0.5, 1.2])
    with pytest.raises(ValueError, match="rng"):
        task.sample_prompts(3, -1)
    with pytest.raises(ValueError, match="topic"):
        task.optimal_policy(0.1, topic=8)
    with pytest.raises(ValueError, match="policy"):
        task.markov_expected_reward(np.ones((8, 8, 16, 16)))
