"""fedtune's privacy library: DP-SGD accounting and Opacus wiring; imports no other fedtune role."""

from __future__ import annotations

from typing import Any

from fedtune.privacy.accounting import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    History,
    PrivacyBudgetError,
    calibrate_noise,
    epsilon_spent,
)


def __getattr__(name: str) -> Any:
    # make_private needs torch and Opacus; loading them on first use keeps `import privacy` light for the
    # CLIs and certificate/ledger work (PEP 562 module attribute).
    if name == "make_private":
        from fedtune.privacy.dp_sgd import make_private

        return make_private
    raise AttributeError(f"module 'fedtune.privacy' has no attribute {name!r}")


__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "History",
    "PrivacyBudgetError",
    "calibrate_noise",
    "epsilon_spent",
    "make_private",
]
