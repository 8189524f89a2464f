"""fedtune's privacy library: DP-SGD accounting and Opacus wiring; imports no other fedtune role."""

import logging

_root_handlers = list(logging.root.handlers)

from privacy.accounting import (  # noqa: E402
    ACCOUNTANTS,
    History,
    PrivacyBudgetError,
    calibrate_noise,
    epsilon_spent,
)
from privacy.dp_sgd import make_private  # noqa: E402

# Opacus calls logging.basicConfig() on import; without undoing it every library's log line prints twice.
for _handler in [h for h in logging.root.handlers if h not in _root_handlers]:
    logging.root.removeHandler(_handler)

__all__ = [
    "ACCOUNTANTS",
    "History",
    "PrivacyBudgetError",
    "calibrate_noise",
    "epsilon_spent",
    "make_private",
]
