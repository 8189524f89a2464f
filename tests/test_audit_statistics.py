"""The one-run audit's statistics on a mechanism whose epsilon is known exactly: randomised response."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtune.privacy.audit import epsilon_lower_bound, exposure, one_run_audit, p_value


def randomised_response(epsilon: float, included: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each canary's membership bit, told truly with probability e^eps / (1 + e^eps): exactly epsilon-DP."""
    truthful = rng.random(len(included)) < 1 / (1 + math.exp(-epsilon))
    return np.where(truthful, included, ~included)


@pytest.mark.parametrize("epsilon", [1.0, 4.0])
def test_bound_stays_below_the_truth_and_approaches_it(epsilon: float) -> None:
    rng = np.random.default_rng(7)
    medians = []
    for m in (100, 1_000, 10_000, 100_000):
        bounds = []
        for _ in range(40):
            included = rng.random(m) < 0.5
            answers = randomised_response(epsilon, included, rng)
            correct = int((answers == included).sum())  # every canary guessed: the answer is the guess
            bounds.append(epsilon_lower_bound(m, m, correct, delta=0.0))
        # A 95% bound may exceed the truth in 5% of runs, no more: 40 runs with 6 or more over it would
        # happen with probability < 0.05 for a correct bound.
        assert sum(b > epsilon for b in bounds) <= 5, (m, bounds)
        medians.append(float(np.median(bounds)))
    assert all(a < b for a, b in zip(medians, medians[1:], strict=False)), medians  # closer as m grows
    gaps = [epsilon - m for m in medians]
    assert gaps[-1] < 0.05 * epsilon + 0.05, medians  # 100,000 canaries prove nearly all of it...
    assert gaps[0] > 4 * gaps[-1], medians  # ...100 much less


def test_guessing_from_scores_finds_the_best_share_and_pays_for_trying_several() -> None:
    rng = np.random.default_rng(3)
    included = rng.random(1000) < 0.5
    # Scores that separate IN from OUT perfectly: wrong guesses only where k exceeds the IN (or OUT) count.
    perfect = one_run_audit(included + rng.normal(0, 0.01, 1000), included, delta=1e-5)
    assert perfect.correct >= perfect.guesses - abs(int(included.sum()) - 500) * 2
    single = epsilon_lower_bound(1000, perfect.guesses, perfect.correct, 1e-5)  # that k alone, uncorrected for trying five
    assert 4.0 < perfect.epsilon_lower_bound < single
    # Scores that know nothing: no bound.
    assert one_run_audit(rng.normal(size=1000), included, delta=1e-5).epsilon_lower_bound == 0.0


def test_delta_weakens_the_bound_and_p_values_are_monotone() -> None:
    assert epsilon_lower_bound(1000, 200, 190, delta=1e-3) < epsilon_lower_bound(1000, 200, 190, delta=0.0)
    ps = [p_value(1000, 200, 150, eps, 1e-5) for eps in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(ps, ps[1:], strict=False))
    with pytest.raises(ValueError):
        p_value(10, 20, 5, 1.0, 0.0)


def test_exposure_ranks_a_secret_among_candidates() -> None:
    references = np.arange(1023, dtype=float)  # 1,023 candidates never trained on
    bits = exposure(np.array([2000.0, 511.5, -1.0]), references)
    assert bits[0] == pytest.approx(10.0)  # ranked first of 1,024: fully exposed
    assert bits[1] == pytest.approx(1.0)  # in the middle: one bit
    assert bits[2] == pytest.approx(0.0)  # last: nothing
