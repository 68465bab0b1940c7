"""A synthetic alignment task with an exact ground truth (specs/alignment.md, ``optfm run alignment``).

Task
----
A prompt ``x`` holds one *topic* token ``c`` (``C = n_topics`` topics, words ``c0 .. c{C-1}``) and
``n_distractors`` distractor tokens drawn uniformly, with replacement, from a pool of
``n_distractor_tokens`` words ``d0 .. d{D-1}``; the distractors carry no information. With
``shuffle_prompt=True`` (the default) the topic sits at a uniformly random position of the prompt,
so a model has to find it by identity; otherwise it comes first. In integer form a prompt is a row
of ``P = 1 + n_distractors`` ids in the *prompt vocabulary*: topics are ``0 .. C-1``, distractors
``C .. C+D-1``. A response ``y`` is ``L = length`` tokens from a *response vocabulary* of
``V = vocab`` ids ``0 .. V-1`` (words ``t0 .. t{V-1}``).

Ground-truth reward (``reward``), with ``R = reward_table`` of shape ``(C, V)`` and
``λ = repeat_penalty``::

    r*(x, y) = (1/L) [ Σ_{i=1..L} R[c, y_i]  −  λ · #{i >= 2 : y_i = y_{i-1}} ]

``make_reward_task`` draws ``R[c, v] ~ N(0, 1)`` i.i.d. from ``numpy.random.default_rng(seed)`` and
uses ``λ = 1``. Each topic then has a clear best token, but the gap between its best and its
second-best token (mean 0.48, median 0.37 for 16 tokens; above 1 for about 12 % of topics) is
usually below λ, so "repeat the best token" is not optimal: the optimum alternates the best token
with the second best (all 8 topics at ``seed=0``; "repeat the best" scores 0.47 there), and a
policy that ignores the previous token (a per-topic unigram) is penalised for the repeats it
makes.

Exact KL-regularised optimum
----------------------------
With the uniform reference ``π_ref(a) = 1/V`` per token and ``β > 0``, the optimal policy of
``max_π E_π[r*] − β KL(π ‖ π_ref)`` is ``π*_β(y|x) ∝ π_ref(y) exp(r*(x, y)/β)``. Write the reward
as a sum of per-step terms (positions ``i = 0 .. L-1`` in the code)::

    q_0(a)       = R[c, a] / L
    q_i(prev, a) = (R[c, a] − λ [a = prev]) / L          (i >= 1, prev = y_{i-1})

Soft values, computed backwards (``_soft_dp``)::

    W_L(prev)    = 0
    W_i(prev)    = β log Σ_a π_ref(a) exp((q_i(prev, a) + W_{i+1}(a)) / β)     (i = L-1 .. 1)
    W_0          = β log Σ_a π_ref(a) exp((q_0(a) + W_1(a)) / β)  =  β log Z
    π*(a | prev, i) = π_ref(a) exp((q_i(prev, a) + W_{i+1}(a) − W_i(prev)) / β)

so ``π*_β`` is a Markov chain over ``(position, previous token)`` and ancestral sampling
(``sample_policy``) draws from it exactly; ``log_prob`` is the exact sequence log-likelihood.
``expected_reward`` propagates the token marginals forwards (no sampling);
``kl_from_uniform = (E[r*] − W_0) / β``. As ``β → 0`` the policy concentrates on the maximiser,
which ``max_reward`` / ``optimal_response`` find exactly by Viterbi (max-sum) dynamic programming;
as ``β → ∞`` it tends to the uniform policy, whose expected reward is closed-form
(``uniform_reward = mean_a R[c, a] − λ (L − 1) / (L V)``).

Normalised score (per prompt, i.e. per topic; average over prompts for a summary)::

    score(x, r) = (r − E_uniform[r* | c]) / (max_y r*(x, y) − E_uniform[r* | c])

is 0 in expectation for the uniform policy and 1 for the optimum. Note that ``β`` is measured in
units of the *sequence* reward (which carries the 1/L); on the default task the expert at a
normalised score of 0.65 has ``β ≈ 0.074``.

Data
----
``demonstrations``: prompts with responses from the expert ``π*_β``, ``β`` chosen by bisection
(on ``log β``; the score is monotone in ``β``) so that the expert's exact expected normalised
score, averaged over topics, equals ``target_fraction`` (spec: 60–75 % of the maximum); a
fraction ``noise`` of the rows (exactly ``round(noise · n)``, at random positions) get uniformly
random responses instead. ``preferences``: for every prompt two responses, each drawn
independently from one of a ladder of policies whose expected normalised scores are
``score_levels`` (0 = the uniform policy, 1 = the Viterbi optimum, anything between = ``π*_β`` at
that score), chosen uniformly at random per response, so the pairs span small and large quality
gaps; labelled by Bradley–Terry on ``r*``: ``P(y1 ≻ y2) = σ((r*(y1) − r*(y2)) / temperature)``
(``temperature = 0`` gives hard labels, ties broken by a fair coin).

String forms (for ``transformers``): ``prompt_text`` ("c3 d1 d5 d0"), ``response_text``
("t1 t4 ..."), ``parse_response``; ``build_tokenizer`` gives a word-level tokenizer over exactly
these words plus ``[PAD] [UNK] [BOS] [EOS]``, and ``response_token_ids`` the tokenizer ids of
``t0 .. t{V-1}`` in order (to restrict a sampler to the response vocabulary). In the TRL dicts
(``to_trl_demos``, ``to_trl_prefs``) completions start with a space so that ``prompt + completion``
splits into the same words.

Randomness only through the ``rng`` argument (a ``numpy.random.Generator`` or an integer seed):
the same arguments give the same data. numpy only; no torch and no tokenization at import time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "Demonstrations",
    "Preferences",
    "RewardTask",
    "make_reward_task",
]

RngLike = np.random.Generator | int
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
_BETA_BRACKET = (1e-6, 1e6)


# --------------------------------------------------------------------------------------------
# Data containers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Demonstrations:
    """Expert demonstrations: ``prompts`` (n, P) and ``responses`` (n, L) integer arrays.

    ``beta`` is the expert's KL coefficient, ``target_fraction`` the expected normalised score it
    was chosen for, and ``is_noise`` (n,) marks rows whose response is uniformly random.
    """

    prompts: IntArray
    responses: IntArray
    beta: float
    target_fraction: float
    is_noise: npt.NDArray[np.bool_]

    def __len__(self) -> int:
        return int(self.prompts.shape[0])


@dataclass(frozen=True, eq=False)
class Preferences:
    """Preference pairs: ``prompts`` (n, P), ``chosen`` and ``rejected`` (n, L) integer arrays.

    ``chosen_reward`` / ``rejected_reward`` are the ground-truth rewards ``r*``; ``levels`` (n, 2)
    the score levels of the policies that drew (chosen, rejected); ``temperature`` the
    Bradley–Terry temperature of the labels.
    """

    prompts: IntArray
    chosen: IntArray
    rejected: IntArray
    chosen_reward: FloatArray
    rejected_reward: FloatArray
    levels: FloatArray
    temperature: float

    def __len__(self) -> int:
        return int(self.prompts.shape[0])


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RewardTask:
    """The synthetic task: a reward table ``R`` (C, V) plus the prompt/response format.

    Build the default one with :func:`make_reward_task`; construct directly to use a hand-made
    table (e.g. a tiny task in tests). See the module docstring for the equations.

    Args:
        reward_table: ``R[c, v]``, the reward of response token ``v`` under topic ``c``, (C, V)
            finite floats with C >= 1 and V >= 2.
        length: response length L, >= 1.
        repeat_penalty: λ >= 0, subtracted (before the 1/L) once per adjacent repeat.
        n_distractors: distractor tokens per prompt, >= 0.
        n_distractor_tokens: size of the distractor pool, >= 1 (0 allowed without distractors).
        shuffle_prompt: put the topic at a uniformly random prompt position (else first).
        seed: provenance only (the seed ``make_reward_task`` drew the table with).
    """

    reward_table: FloatArray
    length: int = 8
    repeat_penalty: float = 1.0
    n_distractors: int = 3
    n_distractor_tokens: int = 8
    shuffle_prompt: bool = True
    seed: int | None = None
    _beta_cache: dict[float, float] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        table = np.array(self.reward_table, dtype=np.float64)
        if table.ndim != 2 or table.shape[0] < 1 or table.shape[1] < 2:
            raise ValueError("reward_table must be a 2-D array (n_topics >= 1, vocab >= 2), got "
                             f"shape {table.shape}")
        if not np.all(np.isfinite(table)):
            raise ValueError("reward_table must be finite")
        table.setflags(write=False)
        object.__setattr__(self, "reward_table", table)
        object.__setattr__(self, "length", _check_int("length", self.length, 1))
        object.__setattr__(self, "n_distractors", _check_int("n_distractors", self.n_distractors, 0))
        lo = 1 if self.n_distractors > 0 else 0
        object.__setattr__(self, "n_distractor_tokens",
                           _check_int("n_distractor_tokens", self.n_distractor_tokens, lo))
        lam = _check_float("repeat_penalty", self.repeat_penalty)
        if lam < 0:
            raise ValueError(f"repeat_penalty must be >= 0, got {self.repeat_penalty}")
        object.__setattr__(self, "repeat_penalty", lam)
        if not isinstance(self.shuffle_prompt, (bool, np.bool_)):
            raise ValueError(f"shuffle_prompt must be a bool, got {self.shuffle_prompt!r}")

    # ---- sizes and vocabularies ------------------------------------------------------------

    @property
    def n_topics(self) -> int:
        """C, the number of topics."""
        return int(self.reward_table.shape[0])

    @property
    def vocab(self) -> int:
        """V, the size of the response vocabulary."""
        return int(self.reward_table.shape[1])

    @property
    def prompt_length(self) -> int:
        """P = 1 + n_distractors."""
        return 1 + self.n_distractors

    @property
    def topic_words(self) -> list[str]:
        return [f"c{i}" for i in range(self.n_topics)]

    @property
    def distractor_words(self) -> list[str]:
        return [f"d{i}" for i in range(self.n_distractor_tokens)]

    @property
    def prompt_words(self) -> list[str]:
        """Words of the prompt vocabulary, indexed by prompt id (topics, then distractors)."""
        return self.topic_words + self.distractor_words

    @property
    def response_words(self) -> list[str]:
        """Words of the response vocabulary, indexed by response id."""
        return [f"t{i}" for i in range(self.vocab)]

    # ---- prompts -----------------------------------------------------------------------------

    def sample_prompts(self, n: int, rng: RngLike, *, topics: npt.ArrayLike | None = None
                       ) -> IntArray:
        """``n`` prompts, (n, P) ids in the prompt vocabulary.

        Topics are uniform over ``0 .. C-1`` unless ``topics`` (n,) fixes them; distractors are
        uniform with replacement over the pool; the topic's position is uniform when
        ``shuffle_prompt`` (else 0).
        """
        n = _check_int("n", n, 0)
        gen = _as_rng(rng)
        if topics is None:
            top = gen.integers(self.n_topics, size=n)
        else:
            top = self._check_topics(topics)
            if top.shape != (n,):
                raise ValueError(f"topics must have shape ({n},), got {top.shape}")
        prompts = np.empty((n, self.prompt_length), dtype=np.int64)
        prompts[:, 0] = top
        if self.n_distractors:
            prompts[:, 1:] = self.n_topics + gen.integers(
                self.n_distractor_tokens, size=(n, self.n_distractors))
        if self.shuffle_prompt and self.n_distractors:
            pos = gen.integers(self.prompt_length, size=n)
            rows = np.arange(n)
            prompts[rows, 0], prompts[rows, pos] = prompts[rows, pos], prompts[rows, 0].copy()
        return prompts

    def topics(self, prompts: npt.ArrayLike) -> IntArray:
        """The topic of every prompt: (..., P) prompt ids -> (...) topic ids."""
        x = np.asarray(prompts)
        if x.ndim < 1 or x.shape[-1] != self.prompt_length:
            raise ValueError(f"prompts must have shape (..., {self.prompt_length}), got {x.shape}")
        x = _as_int_array("prompts", x)
        n_prompt_vocab = self.n_topics + self.n_distractor_tokens
        if x.size and (x.min() < 0 or x.max() >= n_prompt_vocab):
            raise ValueError(f"prompt ids must be in [0, {n_prompt_vocab}), got values in "
                             f"[{x.min()}, {x.max()}]")
        is_topic = x < self.n_topics
        if not np.all(is_topic.sum(-1) == 1):
            raise ValueError("every prompt must hold exactly one topic token")
        return np.where(is_topic, x, 0).sum(-1).astype(np.int64)

    # ---- ground-truth reward -----------------------------------------------------------------

    def reward(self, prompts: npt.ArrayLike, responses: npt.ArrayLike) -> FloatArray:
        """Exact ``r*(x, y)`` for prompts (..., P) and responses (..., L) -> (...)."""
        return self.topic_reward(self.topics(prompts), responses)

    def topic_reward(self, topics: npt.ArrayLike, responses: npt.ArrayLike) -> FloatArray:
        """``r*`` from topic ids (...) instead of prompts (broadcast against responses (..., L))."""
        c = self._check_topics(topics)
        y = self._check_responses(responses)
        gains = self.reward_table[c[..., None], y].sum(-1)
        repeats = (y[..., 1:] == y[..., :-1]).sum(-1)
        return (gains - self.repeat_penalty * repeats) / self.length

    def uniform_reward(self) -> FloatArray:
        """Exact expected reward of the uniform policy, per topic (C,)."""
        lam, n, v = self.repeat_penalty, self.length, self.vocab
        return self.reward_table.mean(1) - lam * (n - 1) / (n * v)

    def max_reward(self) -> FloatArray:
        """Exact ``max_y r*(x, y)`` per topic (C,) (Viterbi; the β -> 0 limit)."""
        return self._viterbi()[0]

    def optimal_response(self, topic: int | None = None) -> IntArray:
        """A maximiser of ``r*`` for every topic (C, L), or for one topic (L,)."""
        best = self._viterbi()[1]
        return best if topic is None else best[self._check_topic(topic)]

    def normalized_score(self, rewards: npt.ArrayLike, topics: npt.ArrayLike | None = None
                         ) -> FloatArray:
        """``(r − E_uniform[r* | c]) / (max r* − E_uniform[r* | c])`` elementwise.

        ``rewards`` with ``topics`` of the same shape (per prompt), or ``rewards`` of shape (C,)
        (per topic, e.g. ``expected_reward(beta)``) when ``topics`` is None. Average the result
        over prompts (or topics) for a summary.
        """
        r = np.asarray(rewards, dtype=np.float64)
        if topics is None:
            if r.shape != (self.n_topics,):
                raise ValueError(f"without topics, rewards must have shape ({self.n_topics},) "
                                 f"(one per topic), got {r.shape}")
            c = np.arange(self.n_topics)
        else:
            c = self._check_topics(topics)
        lo, hi = self.uniform_reward()[c], self.max_reward()[c]
        return (r - lo) / (hi - lo)

    # ---- the exact KL-regularised optimum ------------------------------------------------------

    def optimal_log_policy(self, beta: float, topic: int | None = None) -> FloatArray:
        """``log π*_β(a | prev, i)``: (C, L, V, V) indexed ``[c, i, prev, a]``, or (L, V, V).

        At position 0 there is no previous token: ``[c, 0, prev]`` is the same for every prev.
        """
        logpol = self._soft_dp(beta)[0]
        return logpol if topic is None else logpol[self._check_topic(topic)]

    def optimal_policy(self, beta: float, topic: int | None = None) -> FloatArray:
        """``π*_β(a | prev, i)`` (probabilities); see :meth:`optimal_log_policy`."""
        return np.exp(self.optimal_log_policy(beta, topic))

    def log_prob(self, prompts: npt.ArrayLike, responses: npt.ArrayLike, beta: float
                 ) -> FloatArray:
        """Exact ``log π*_β(y | x)`` for prompts (..., P) and responses (..., L) -> (...)."""
        return self.markov_log_prob(self.optimal_log_policy(beta), prompts, responses)

    def sample_policy(self, prompts: npt.ArrayLike, beta: float, rng: RngLike) -> IntArray:
        """One response per prompt from ``π*_β`` (ancestral sampling): (..., P) -> (..., L).

        For several responses per prompt, repeat the prompts (``np.repeat(prompts, k, 0)``).
        """
        return self.sample_markov(self.optimal_policy(beta), prompts, rng)

    def expected_reward(self, beta: float) -> FloatArray:
        """Exact ``E_{π*_β}[r*]`` per topic (C,), by forward recursion (no sampling)."""
        return self.markov_expected_reward(self.optimal_policy(beta))

    def expected_score(self, beta: float) -> FloatArray:
        """Exact expected normalised score of ``π*_β`` per topic (C,); ``.mean()`` averages."""
        return self.normalized_score(self.expected_reward(beta))

    def kl_from_uniform(self, beta: float) -> FloatArray:
        """Exact ``KL(π*_β ‖ π_ref)`` per topic (C,) in nats: ``(E[r*] − β log Z) / β``."""
        beta = _check_beta(beta)
        logpol, soft_value = self._soft_dp(beta)
        return (self.markov_expected_reward(np.exp(logpol)) - soft_value) / beta

    def expert_beta(self, target_fraction: float = 0.65) -> float:
        """The ``β`` whose expected normalised score (mean over topics) is ``target_fraction``.

        Found by bisection on ``log β`` in ``[1e-6, 1e6]`` (the score is decreasing in ``β``).
        """
        t = _check_float("target_fraction", target_fraction)
        if not 0.0 < t < 1.0:
            raise ValueError(f"target_fraction must be in (0, 1), got {target_fraction}")
        if t in self._beta_cache:
            return self._beta_cache[t]
        lo, hi = math.log(_BETA_BRACKET[0]), math.log(_BETA_BRACKET[1])
        score_lo = float(self.expected_score(math.exp(lo)).mean())
        score_hi = float(self.expected_score(math.exp(hi)).mean())
        if not score_hi < t < score_lo:
            raise ValueError(f"target_fraction {t} is outside the reachable scores "
                             f"({score_hi:.6f}, {score_lo:.6f}) for beta in {_BETA_BRACKET}")
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if float(self.expected_score(math.exp(mid)).mean()) > t:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-12:
                break
        beta = math.exp(0.5 * (lo + hi))
        self._beta_cache[t] = beta
        return beta

    # ---- general Markov policies (the expert, the uniform policy, hand-made tables) ---------------

    def markov_expected_reward(self, policy: npt.ArrayLike) -> FloatArray:
        """Exact ``E[r*]`` per topic (C,) of a Markov policy ``policy[c, i, prev, a]`` (C, L, V, V).

        Row ``[c, 0, 0]`` is the distribution of the first token.
        """
        p = self._check_markov(policy)
        r = self.reward_table / self.length
        marginal = p[:, 0, 0, :]
        total = (marginal * r).sum(-1)
        pair = self._pair_reward()
        for i in range(1, self.length):
            joint = marginal[:, :, None] * p[:, i]
            total = total + (joint * pair).sum((-1, -2))
            marginal = joint.sum(1)
        return total

    def markov_log_prob(self, log_policy: npt.ArrayLike, prompts: npt.ArrayLike,
                        responses: npt.ArrayLike) -> FloatArray:
        """``log π(y | x)`` for a Markov policy given as log-probabilities (C, L, V, V)."""
        lp = np.asarray(log_policy, dtype=np.float64)
        shape = (self.n_topics, self.length, self.vocab, self.vocab)
        if lp.shape != shape:
            raise ValueError(f"log_policy must have shape {shape}, got {lp.shape}")
        c = self.topics(prompts)
        y = self._check_responses(responses)
        c, y = np.broadcast_arrays(c[..., None], y)
        prev = np.concatenate([np.zeros_like(y[..., :1]), y[..., :-1]], -1)
        pos = np.broadcast_to(np.arange(self.length), y.shape)
        return lp[c, pos, prev, y].sum(-1)

    def sample_markov(self, policy: npt.ArrayLike, prompts: npt.ArrayLike, rng: RngLike
                      ) -> IntArray:
        """One response per prompt (..., P) -> (..., L) from a Markov policy (C, L, V, V)."""
        p = self._check_markov(policy)
        c = self.topics(prompts)
        gen = _as_rng(rng)
        flat = c.reshape(-1)
        n = flat.shape[0]
        out = np.empty((n, self.length), dtype=np.int64)
        prev = np.zeros(n, dtype=np.int64)
        cdf = np.cumsum(p, -1)
        for i in range(self.length):
            rows = cdf[flat, i, prev]
            u = gen.random(n)[:, None] * rows[:, -1:]
            tok = np.minimum((rows <= u).sum(-1), self.vocab - 1)
            out[:, i] = tok
            prev = tok
        return out.reshape((*c.shape, self.length))

    def uniform_policy(self) -> FloatArray:
        """The uniform reference as Markov tables (C, L, V, V)."""
        return np.full((self.n_topics, self.length, self.vocab, self.vocab), 1.0 / self.vocab)

    def sample_uniform(self, shape: int | tuple[int, ...], rng: RngLike) -> IntArray:
        """Uniformly random responses of shape (*shape, L)."""
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        return _as_rng(rng).integers(self.vocab, size=(*shape, self.length)).astype(np.int64)

    def sample_level(self, prompts: npt.ArrayLike, level: float, rng: RngLike) -> IntArray:
        """Responses from the policy at expected normalised score ``level`` in [0, 1].

        0: uniform; 1: the Viterbi optimum (deterministic); between: ``π*_β`` with
        ``β = expert_beta(level)``.
        """
        level = _check_float("level", level)
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"score level must be in [0, 1], got {level}")
        c = self.topics(prompts)
        if level == 0.0:
            return self.sample_uniform(c.shape, rng)
        if level == 1.0:
            return self.optimal_response()[c]
        return self.sample_policy(prompts, self.expert_beta(level), rng)

    # ---- data sets -----------------------------------------------------------------------------

    def demonstrations(self, n: int, rng: RngLike, *, target_fraction: float = 0.65,
                       noise: float = 0.0, beta: float | None = None) -> Demonstrations:
        """``n`` expert demonstrations (prompt, response) from ``π*_β``.

        ``β = expert_beta(target_fraction)`` unless ``beta`` is given; a fraction ``noise`` in
        [0, 1] of the rows (exactly ``round(noise · n)``) get uniformly random responses.
        """
        n = _check_int("n", n, 0)
        noise = _check_float("noise", noise)
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        if beta is None:
            beta = self.expert_beta(target_fraction)
            fraction = float(target_fraction)
        else:
            beta = _check_beta(beta)
            fraction = float(self.expected_score(beta).mean())
        gen = _as_rng(rng)
        prompts = self.sample_prompts(n, gen)
        responses = self.sample_policy(prompts, beta, gen)
        is_noise = np.zeros(n, dtype=bool)
        n_noise = round(noise * n)
        if n_noise:
            idx = gen.choice(n, size=n_noise, replace=False)
            is_noise[idx] = True
            responses[idx] = self.sample_uniform(n_noise, gen)
        return Demonstrations(prompts=prompts, responses=responses, beta=float(beta),
                              target_fraction=fraction, is_noise=is_noise)

    def preferences(self, n: int, rng: RngLike, *, temperature: float = 0.1,
                    score_levels: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 0.9)) -> Preferences:
        """``n`` Bradley–Terry-labelled pairs (one fresh prompt each).

        Each of the two responses comes from the policy at a score level drawn uniformly from
        ``score_levels`` (see :meth:`sample_level`); the first is chosen with probability
        ``σ((r*(y1) − r*(y2)) / temperature)`` (``temperature = 0``: the better one; ties by a
        coin flip).
        """
        n = _check_int("n", n, 0)
        temperature = _check_float("temperature", temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        levels = np.array([_check_float("score_levels", s) for s in score_levels])
        if levels.size == 0 or np.any((levels < 0) | (levels > 1)):
            raise ValueError(f"score_levels must be a non-empty list of values in [0, 1], got "
                             f"{list(score_levels)}")
        gen = _as_rng(rng)
        prompts = self.sample_prompts(n, gen)
        pick = gen.integers(levels.size, size=(n, 2))
        pair = np.empty((n, 2, self.length), dtype=np.int64)
        for k, level in enumerate(levels):
            for j in range(2):
                rows = np.flatnonzero(pick[:, j] == k)
                if rows.size:
                    pair[rows, j] = self.sample_level(prompts[rows], float(level), gen)
        rewards = self.reward(prompts[:, None, :], pair)
        diff = rewards[:, 0] - rewards[:, 1]
        u = gen.random(n)
        if temperature > 0:
            first = u < _sigmoid(diff / temperature)
        else:
            first = np.where(diff == 0, u < 0.5, diff > 0)
        ci = np.where(first, 0, 1)
        rows = np.arange(n)
        return Preferences(
            prompts=prompts, chosen=pair[rows, ci], rejected=pair[rows, 1 - ci],
            chosen_reward=rewards[rows, ci], rejected_reward=rewards[rows, 1 - ci],
            levels=np.stack([levels[pick[rows, ci]], levels[pick[rows, 1 - ci]]], -1),
            temperature=temperature)

    # ---- strings and tokenizers ------------------------------------------------------------------

    def prompt_text(self, prompts: npt.ArrayLike) -> str | list[str]:
        """"c3 d1 d5 d0" for one prompt (P,), a list of strings for (n, P)."""
        x = np.asarray(prompts)
        self.topics(x)
        words = self.prompt_words
        return _texts(x, words, "prompts")

    def response_text(self, responses: npt.ArrayLike) -> str | list[str]:
        """"t1 t4 ..." for one response (L,), a list of strings for (n, L)."""
        y = self._check_responses(responses)
        return _texts(y, self.response_words, "responses")

    def parse_response(self, text: str) -> IntArray:
        """Response ids (L,) from "t1 t4 ..." (whitespace-separated; unknown words or a wrong
        length raise ``ValueError``)."""
        return self._parse(text, self.response_words, self.length, "response")

    def parse_prompt(self, text: str) -> IntArray:
        """Prompt ids (P,) from "c3 d1 d5 d0"."""
        x = self._parse(text, self.prompt_words, self.prompt_length, "prompt")
        self.topics(x)
        return x

    def build_tokenizer(self, *, model_max_length: int = 64) -> Any:
        """A word-level ``PreTrainedTokenizerFast`` over exactly the task's words plus
        ``[PAD] [UNK] [BOS] [EOS]`` (ids 0..3); see :func:`optfm.data.build_word_tokenizer`."""
        from optfm.data.tokenizers import build_word_tokenizer

        words = self.prompt_words + self.response_words
        tok = build_word_tokenizer([" ".join(words)], special_tokens=_SPECIAL_TOKENS,
                                   model_max_length=model_max_length)
        if len(tok) != len(words) + len(_SPECIAL_TOKENS):
            raise RuntimeError(f"tokenizer has {len(tok)} tokens, expected "
                               f"{len(words) + len(_SPECIAL_TOKENS)}")
        return tok

    def response_token_ids(self, tokenizer: Any) -> IntArray:
        """Tokenizer ids of ``t0 .. t{V-1}`` in order (V,): ``ids[v]`` is response token ``v``."""
        return self._word_ids(tokenizer, self.response_words)

    def prompt_token_ids(self, tokenizer: Any) -> IntArray:
        """Tokenizer ids of the prompt words (topics, then distractors), in prompt-id order."""
        return self._word_ids(tokenizer, self.prompt_words)

    def to_trl_demos(self, demos: Demonstrations) -> list[dict[str, str]]:
        """TRL prompt-completion rows ``{"prompt", "completion"}`` (completion starts with a
        space)."""
        prompts = _as_list(self.prompt_text(demos.prompts))
        completions = _as_list(self.response_text(demos.responses))
        return [{"prompt": p, "completion": " " + c} for p, c in zip(prompts, completions)]

    def to_trl_prefs(self, prefs: Preferences) -> list[dict[str, str]]:
        """TRL preference rows ``{"prompt", "chosen", "rejected"}`` (responses start with a
        space)."""
        prompts = _as_list(self.prompt_text(prefs.prompts))
        chosen = _as_list(self.response_text(prefs.chosen))
        rejected = _as_list(self.response_text(prefs.rejected))
        return [{"prompt": p, "chosen": " " + c, "rejected": " " + r}
                for p, c, r in zip(prompts, chosen, rejected)]

    # ---- internals -------------------------------------------------------------------------------

    def _pair_reward(self) -> FloatArray:
        """``q_i(prev, a)`` for i >= 1: (C, V_prev, V_a)."""
        eye = np.eye(self.vocab)
        return (self.reward_table[:, None, :] - self.repeat_penalty * eye) / self.length

    def _soft_dp(self, beta: float) -> tuple[FloatArray, FloatArray]:
        """Backward soft DP: (log-policy (C, L, V, V), soft value ``W_0 = β log Z`` (C,))."""
        beta = _check_beta(beta)
        c, n, v = self.n_topics, self.length, self.vocab
        log_ref = -math.log(v)
        pair = self._pair_reward()
        logpol = np.empty((c, n, v, v))
        w_next = np.zeros((c, v))  # W_{i+1}(a), a = the token at position i
        for i in range(n - 1, 0, -1):
            logits = (pair + w_next[:, None, :]) / beta + log_ref
            w = beta * _logsumexp(logits)
            logpol[:, i] = logits - (w / beta)[..., None]
            w_next = w
        logits0 = (self.reward_table / n + w_next) / beta + log_ref
        w0 = beta * _logsumexp(logits0)
        logpol[:, 0] = (logits0 - (w0 / beta)[..., None])[:, None, :]
        return logpol, w0

    def _viterbi(self) -> tuple[FloatArray, IntArray]:
        """Max-sum DP: (max reward (C,), an argmax response (C, L); ties to the lowest id)."""
        c, n = self.n_topics, self.length
        pair = self._pair_reward()
        w_next = np.zeros((c, self.vocab))
        choice = np.zeros((c, n, self.vocab), dtype=np.int64)  # best a given prev at position i
        for i in range(n - 1, 0, -1):
            total = pair + w_next[:, None, :]
            choice[:, i] = total.argmax(-1)
            w_next = total.max(-1)
        total0 = self.reward_table / n + w_next
        best = np.empty((c, n), dtype=np.int64)
        best[:, 0] = total0.argmax(-1)
        rows = np.arange(c)
        for i in range(1, n):
            best[:, i] = choice[rows, i, best[:, i - 1]]
        return total0.max(-1), best

    def _check_topic(self, topic: int) -> int:
        return _check_int("topic", topic, 0, self.n_topics - 1)

    def _check_topics(self, topics: npt.ArrayLike) -> IntArray:
        c = _as_int_array("topics", np.asarray(topics))
        if c.size and (c.min() < 0 or c.max() >= self.n_topics):
            raise ValueError(f"topics must be in [0, {self.n_topics}), got values in "
                             f"[{c.min()}, {c.max()}]")
        return c

    def _check_responses(self, responses: npt.ArrayLike) -> IntArray:
        y = np.asarray(responses)
        if y.ndim < 1 or y.shape[-1] != self.length:
            raise ValueError(f"responses must have shape (..., {self.length}), got {y.shape}")
        y = _as_int_array("responses", y)
        if y.size and (y.min() < 0 or y.max() >= self.vocab):
            raise ValueError(f"response ids must be in [0, {self.vocab}), got values in "
                             f"[{y.min()}, {y.max()}]")
        return y

    def _check_markov(self, policy: npt.ArrayLike) -> FloatArray:
        p = np.asarray(policy, dtype=np.float64)
        shape = (self.n_topics, self.length, self.vocab, self.vocab)
        if p.shape != shape:
            raise ValueError(f"policy must have shape {shape} ([topic, position, prev, token]), "
                             f"got {p.shape}")
        if np.any(p < 0) or not np.allclose(p.sum(-1), 1.0, atol=1e-6):
            raise ValueError("policy rows must be probability distributions (>= 0, sum 1)")
        return p

    def _parse(self, text: str, words: list[str], length: int, what: str) -> IntArray:
        if not isinstance(text, str):
            raise ValueError(f"{what} text must be a string, got {type(text).__name__}")
        index = {w: i for i, w in enumerate(words)}
        parts = text.split()
        unknown = [w for w in parts if w not in index]
        if unknown:
            raise ValueError(f"unknown {what} words {unknown[:5]} in {text!r}")
        if len(parts) != length:
            raise ValueError(f"a {what} has {length} words, got {len(parts)} in {text!r}")
        return np.array([index[w] for w in parts], dtype=np.int64)

    @staticmethod
    def _word_ids(tokenizer: Any, words: list[str]) -> IntArray:
        ids = tokenizer.convert_tokens_to_ids(words)
        unk = tokenizer.unk_token_id
        missing = [w for w, i in zip(words, ids) if i is None or i == unk]
        if missing:
            raise ValueError(f"the tokenizer does not know the words {missing[:5]}; build it with "
                             "RewardTask.build_tokenizer")
        return np.asarray(ids, dtype=np.int64)


def make_reward_task(*, n_topics: int = 8, n_distractors: int = 3, n_distractor_tokens: int = 8,
                     vocab: int = 16, length: int = 8, repeat_penalty: float = 1.0,
                     shuffle_prompt: bool = True, seed: int = 0) -> RewardTask:
    """The default task of specs/alignment.md: ``R[c, v] ~ N(0, 1)`` from ``default_rng(seed)``.

    With λ = 1 and 16 tokens the best-minus-second-best gap per topic (≈ 0.5) is below λ, so the
    optimum alternates tokens instead of repeating the best one (see the module docstring).
    """
    n_topics = _check_int("n_topics", n_topics, 1)
    vocab = _check_int("vocab", vocab, 2)
    seed = _check_int("seed", seed, 0)
    table = np.random.default_rng(seed).standard_normal((n_topics, vocab))
    return RewardTask(reward_table=table, length=length, repeat_penalty=repeat_penalty,
                      n_distractors=n_distractors, n_distractor_tokens=n_distractor_tokens,
                      shuffle_prompt=shuffle_prompt, seed=seed)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _as_rng(rng: RngLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) and rng >= 0:
        return np.random.default_rng(int(rng))
    raise ValueError(f"rng must be a numpy.random.Generator or a non-negative integer seed, "
                     f"got {rng!r}")


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return int(value)


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _check_beta(beta: Any) -> float:
    b = _check_float("beta", beta)
    if b <= 0:
        raise ValueError(f"beta must be > 0 (the KL coefficient), got {beta}")
    return b


def _as_int_array(name: str, x: np.ndarray) -> IntArray:
    if x.dtype == bool or not (np.issubdtype(x.dtype, np.integer) or x.size == 0):
        raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")
    return x.astype(np.int64, copy=False)


def _logsumexp(x: FloatArray) -> FloatArray:
    m = x.max(-1)
    return m + np.log(np.exp(x - m[..., None]).sum(-1))


def _sigmoid(z: FloatArray) -> FloatArray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _texts(ids: np.ndarray, words: list[str], name: str) -> str | list[str]:
    if ids.ndim == 1:
        return " ".join(words[int(i)] for i in ids)
    if ids.ndim == 2:
        return [" ".join(words[int(i)] for i in row) for row in ids]
    raise ValueError(f"{name} must be 1-D (one) or 2-D (a batch), got shape {ids.shape}")


def _as_list(text: str | list[str]) -> list[str]:
    return [text] if isinstance(text, str) else text
