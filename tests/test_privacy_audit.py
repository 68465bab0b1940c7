import math

import numpy as np
import pytest
import torch

from optfm.privacy.audit import GradientCanaries, audit_from_scores, epsilon_lower_bound, p_value


def test_p_value_is_binomial_tail_without_delta():
    from scipy.stats import binom

    q = 1 / (1 + math.exp(-1.0))
    assert p_value(100, 50, 40, 1.0, 0.0) == pytest.approx(binom.sf(39, 50, q))
    assert p_value(100, 50, 0, 1.0, 1e-5) == 1.0
    # delta only ever makes the test more lenient
    assert p_value(1000, 100, 90, 2.0, 1e-3) > p_value(1000, 100, 90, 2.0, 0.0)


def test_epsilon_lower_bound_known_cases():
    # all r guesses right: P[Bin(r, q) = r] = q^r < 0.05  <=>  eps > log(q / (1 - q))
    for r in (50, 100, 200):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(10**6, r, r, 0.0) == pytest.approx(math.log(q / (1 - q)), rel=1e-6)
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0  # chance-level guessing proves nothing
    hi = epsilon_lower_bound(1000, 200, 200, 1e-5)
    assert 4.0 < hi < 4.3  # ~4.17: the most one run with 200 guesses can show


def test_bound_holds_for_randomized_response():
    """Simulate an exactly eps-DP guesser (randomized response): the bound must not exceed eps in
    more than ~5% of trials."""
    rng = np.random.default_rng(0)
    eps, m, k = 2.0, 1000, 100
    q = math.exp(eps) / (1 + math.exp(eps))
    exceed = 0
    for _ in range(200):
        included = rng.random(m) < 0.5
        truthful = rng.random(m) < q
        scores = np.where(truthful == included, 1.0, -1.0) + 1e-6 * rng.random(m)
        if audit_from_scores(scores, included, k_pos=k, k_neg=k, delta=0.0).eps_lower > eps:
            exceed += 1
    assert exceed <= 20


def test_audit_from_scores_counts_guesses():
    included = np.array([True, True, False, False, True, False])
    scores = np.array([5.0, 4.0, -3.0, -2.0, 0.1, 0.0])
    res = audit_from_scores(scores, included, k_pos=2, k_neg=2, delta=0.0)
    assert (res.r, res.v) == (4, 4)
    res = audit_from_scores(-scores, included, k_pos=2, k_neg=2, delta=0.0)
    assert res.v == 0 and res.eps_lower == 0.0
    with pytest.raises(ValueError, match="k_pos"):
        audit_from_scores(scores, included, k_pos=4, k_neg=4, delta=0.0)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(10, 4, 4, 0.0, confidence=1.5)


def test_gradient_canaries_shapes_norms_and_scores():
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(4))]
    can = GradientCanaries(params, 50, C=2.0, sample_rate=0.5, generator=torch.Generator().manual_seed(0))
    assert can.directions.shape == (50, 16)
    assert torch.allclose(can.directions.norm(dim=1), torch.full((50,), 2.0))
    assert 10 < int(can.included.sum()) < 40
    theta0 = [p.detach().clone() for p in params]
    # moving against canary 3's direction makes it the top score
    step = -0.1 * can.directions[3]
    theta_t = [theta0[0] + step[:12].view(3, 4), theta0[1] + step[12:]]
    assert int(can.scores(theta0, theta_t).argmax()) == 3
