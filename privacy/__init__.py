"""fedtune's privacy library: DP-SGD accounting and Opacus wiring; imports no other fedtune role."""

from privacy.accounting import (
    ACCOUNTANTS,
    History,
    PrivacyBudgetError,
    calibrate_noise,
    epsilon_spent,
)
from privacy.dp_sgd import make_private

__all__ = [
    "ACCOUNTANTS",
    "History",
    "PrivacyBudgetError",
    "calibrate_noise",
    "epsilon_spent",
    "make_private",
]
