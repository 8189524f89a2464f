"""Privacy accounting: calibrate DP-SGD noise to a budget and compute the epsilon of a training history."""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Iterator

import numpy as np

# One entry per run of identical DP-SGD steps: (noise_multiplier, sample_rate, steps).
# This is exactly Opacus' own accountant history format, so a saved history can be handed
# back to any Opacus accountant and composition continues where it stopped.
History = list[tuple[float, float, int]]

ACCOUNTANTS = ("rdp", "prv")


class PrivacyBudgetError(ValueError):
    """The requested privacy budget cannot be met with the planned training."""


@contextlib.contextmanager
def opacus_imported_quietly() -> Iterator[None]:
    """Import Opacus inside this block: its import calls logging.basicConfig(), which doubles every log line."""
    before = list(logging.root.handlers)
    yield
    for handler in [h for h in logging.root.handlers if h not in before]:
        logging.root.removeHandler(handler)


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")


# Cached: a client asks the same question every round (same data size and plan), and Opacus' search takes
# ~1.5 s at sample rate 1/16 over 48 steps (measured): more than a small client's whole round of training.
# A memo, not state: the answer is a pure function of its numbers (and the installed Opacus), so no result
# depends on what ran before, and there is nothing a caller would ever need to reset.
@functools.lru_cache(maxsize=256)
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """Return the smallest noise multiplier whose `steps` DP-SGD steps spend at most `target_epsilon`."""
    _check_accountant(accountant)
    # Opacus is imported here, not at the top: it pulls in torch (~4 CPU-seconds, ~400 MB), which the CLIs
    # and a client's supervising process (ledger checks, certificates) never need.
    with opacus_imported_quietly():
        from opacus.accountants.utils import get_noise_multiplier
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                )
            )
    except ValueError as err:  # Opacus: "The privacy budget is too low."
        raise PrivacyBudgetError(
            f"no noise level reaches epsilon={target_epsilon} (delta={delta}) over {steps} steps at "
            f"sample rate {sample_rate:.4g}: raise the budget or train fewer rounds/epochs ({err})"
        ) from err


@functools.lru_cache(maxsize=1024)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """Opacus' RDP of one sampled-Gaussian step at each of its default orders (steps compose by multiplication)."""
    # Cached (a pure function of two numbers, like calibrate_noise): the per-order series over fractional orders
    # is pure Python (0.035 s for z=1.1, q=0.05, measured; up to ~0.3 s for others), and a client asks about the
    # same (noise, rate) every round; k steps are then k times this vector, as in Opacus.
    from opacus.accountants.analysis.rdp import compute_rdp
    from opacus.accountants.rdp import RDPAccountant

    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    return tuple(float(r) for r in rdp)


def epsilon_spent(history: History, delta: float, accountant: str = "rdp") -> float:
    """Return epsilon (at `delta`) of the composition of every DP-SGD step in `history`."""
    _check_accountant(accountant)
    if not history:
        return 0.0
    # Composition is commutative, and k steps of one (noise, rate) mechanism then m more of it are k + m steps
    # of it: merging those entries gives the same epsilon, with one accountant evaluation per mechanism instead
    # of one per round.
    merged: dict[tuple[float, float], int] = {}
    for z, q, steps in history:
        merged[float(z), float(q)] = merged.get((float(z), float(q)), 0) + int(steps)
    with opacus_imported_quietly():  # on first use only, as in calibrate_noise
        from opacus.accountants import create_accountant
        from opacus.accountants.analysis.rdp import get_privacy_spent
        from opacus.accountants.rdp import RDPAccountant
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": the bound is valid, only possibly loose.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        if accountant == "rdp":
            # Opacus' RDPAccountant.get_privacy_spent, term for term (same orders, same sum, same conversion).
            rdp = sum(np.array(_rdp_of_one_step(z, q)) * steps for (z, q), steps in merged.items())
            eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
            return float(eps)
        acc = create_accountant(mechanism=accountant)
        acc.history = [(z, q, steps) for (z, q), steps in merged.items()]
        return float(acc.get_epsilon(delta=delta))
