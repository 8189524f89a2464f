"""Empirical privacy audits: a one-run lower bound on epsilon from canary guesses, and a secret's exposure."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

CONFIDENCE = 0.95
# The guesses tried, as shares of the canaries guessed on each side (top k IN, bottom k OUT). Each is tested at
# 1 - (1 - CONFIDENCE) / 5 (Bonferroni), so the best of them still holds at CONFIDENCE.
GUESS_SHARES = (0.01, 0.03, 0.1, 0.25, 0.5)
MAX_EPSILON = 50.0  # no audit of <= 10^4 canaries can show more (its best p-value at 50 is below 1e-17)


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability of `correct` or more right guesses out of `guesses` if the mechanism is (epsilon, delta)-DP.

    Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023), their main
    theorem and the p-value code of their appendix: `canaries` each included independently with probability
    1/2, `guesses` of them guessed (the rest abstained on). Under epsilon-DP the right guesses are dominated by
    Binomial(guesses, e^eps / (1 + e^eps)); delta adds at most
    2 * canaries * delta * max_i P[correct - i <= Bin < correct] / i.
    """
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # how often epsilon-DP randomised response answers truly
    beta = float(stats.binom.sf(correct - 1, guesses, q))
    alpha = 0.0
    if delta > 0 and correct > 0:
        i = np.arange(1, correct + 1)
        alpha = float(np.max(np.cumsum(stats.binom.pmf(correct - i, guesses, q)) / i))
    return min(1.0, beta + alpha * delta * 2 * canaries)


def epsilon_lower_bound(canaries: int, guesses: int, correct: int, delta: float, confidence: float = CONFIDENCE) -> float:
    """The largest epsilon that `correct` right guesses out of `guesses` refute at `confidence`; 0 if none."""
    alpha = 1.0 - confidence

    def excess(eps: float) -> float:  # decreasing in epsilon: more privacy loss makes the guesses likelier
        return alpha - p_value(canaries, guesses, correct, eps, delta)

    if excess(0.0) <= 0:
        return 0.0
    if excess(MAX_EPSILON) > 0:
        return MAX_EPSILON
    return float(optimize.brentq(excess, 0.0, MAX_EPSILON, xtol=1e-6))


@dataclass(frozen=True)
class OneRunAudit:
    """One view's audit: how many canaries, how many were guessed (each side), how many right, and the bound."""

    canaries: int
    guessed_in: int
    guessed_out: int
    correct: int
    epsilon_lower_bound: float
    delta: float
    confidence: float

    @property
    def guesses(self) -> int:
        return self.guessed_in + self.guessed_out


def one_run_audit(
    scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = CONFIDENCE, shares=GUESS_SHARES
) -> OneRunAudit:
    """Guess IN for the top-scored canaries and OUT for the bottom-scored (k each, for every k of `shares`),
    and keep the k whose bound is highest, every k tested at the Bonferroni-corrected confidence."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"scores and inclusions must be two vectors of one length, got {scores.shape} and {included.shape}")
    m = len(scores)
    each = 1.0 - (1.0 - confidence) / len(shares)
    order = np.argsort(-scores, kind="stable")  # highest score (most likely IN) first
    best: OneRunAudit | None = None
    for k in sorted({max(1, int(share * m)) for share in shares if 2 * max(1, int(share * m)) <= m}):
        correct = int(included[order[:k]].sum() + (~included[order[m - k :]]).sum())
        bound = epsilon_lower_bound(m, 2 * k, correct, delta, each)
        audit = OneRunAudit(m, k, k, correct, bound, delta, confidence)
        if best is None or bound > best.epsilon_lower_bound:
            best = audit
    if best is None:
        raise ValueError(f"an audit needs at least 2 canaries, got {m}")
    return best


def exposure(secret_scores: np.ndarray, reference_scores: np.ndarray) -> np.ndarray:
    """Each secret's exposure in bits (Carlini et al., "The Secret Sharer", USENIX Security 2019):
    log2(candidates) - log2(rank), its rank among itself and `reference_scores` (candidates never trained on,
    drawn as the secrets were); higher scores rank first. At most log2(1 + references); ~1.44 on average
    for a secret the model never saw."""
    secret_scores, reference = np.asarray(secret_scores, dtype=float), np.sort(np.asarray(reference_scores, dtype=float))
    beaten_by = len(reference) - np.searchsorted(reference, secret_scores, side="right")  # references scored higher
    return np.log2(len(reference) + 1) - np.log2(1 + beaten_by)
