"""Privacy accounting: calibration meets the target, and epsilons agree with Google's dp-accounting."""

from __future__ import annotations

import dp_accounting
import pytest

from fedtune.privacy import PrivacyBudgetError, calibrate_noise, epsilon_spent


def _google_rdp_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(event)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("target,q,steps", [(8.0, 0.2, 25), (3.0, 0.05, 100), (1.0, 0.01, 500)])
def test_calibrated_noise_spends_at_most_the_target(target: float, q: float, steps: int) -> None:
    z = calibrate_noise(target, 1e-5, q, steps)
    eps = epsilon_spent([(z, q, steps)], 1e-5)
    assert target * 0.98 <= eps <= target
    assert eps == pytest.approx(_google_rdp_epsilon(z, q, steps, 1e-5), rel=0.01)


def test_composition_across_rounds_equals_one_long_history() -> None:
    z, q = 1.1, 0.1
    rounds = [(z, q, 10)] * 3
    assert epsilon_spent(rounds, 1e-5) == pytest.approx(epsilon_spent([(z, q, 30)], 1e-5), rel=1e-12)
    assert epsilon_spent([], 1e-5) == 0.0
    assert epsilon_spent(rounds[:1], 1e-5) < epsilon_spent(rounds[:2], 1e-5) < epsilon_spent(rounds, 1e-5)


def test_prv_accountant_is_available_and_tighter() -> None:
    history = [(1.0, 0.05, 100)]
    assert epsilon_spent(history, 1e-5, "prv") < epsilon_spent(history, 1e-5, "rdp")


def test_unreachable_budget_is_a_clear_error() -> None:
    with pytest.raises(PrivacyBudgetError, match="no noise level reaches epsilon=1e-06"):
        calibrate_noise(1e-6, 1e-5, 1.0, 10_000)
    with pytest.raises(ValueError, match="unknown accountant 'gdp2'"):
        epsilon_spent([(1.0, 0.1, 1)], 1e-5, "gdp2")


def test_a_mixed_history_agrees_with_google_composing_every_round() -> None:
    # epsilon_spent merges rounds of the same mechanism; Google's accountant composes each round separately.
    history = [(1.1, 0.1, 10), (0.9, 0.05, 40), (1.1, 0.1, 10), (0.9, 0.05, 20), (1.1, 0.1, 5)]
    acc = dp_accounting.rdp.RdpAccountant()
    for z, q, steps in history:
        acc.compose(
            dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
        )
    assert epsilon_spent(history, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=0.01)
