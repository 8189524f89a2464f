"""Epsilons of a DP-SGD history computed without fedtune's code: the references every reported epsilon must meet."""

from __future__ import annotations

from collections.abc import Iterable

import dp_accounting

# fedtune's default accountant is Google's PLD; the independent check is Opacus' PRV accountant (Gopi et al.
# 2021: another library, another numerical method for the same privacy curve). They differ by discretisation
# only: PRV's answer sits 0.01 above PLD's on every history measured (epsilon 1 to 50).
PRV_AGREEMENT = 0.02  # relative


def _steps(history: Iterable[Iterable[float]]) -> list[dp_accounting.DpEvent]:
    return [
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), int(n))
        for z, q, n in history
    ]


def google_pld(history: Iterable[Iterable[float]], delta: float) -> float:
    """dp-accounting's PLD, composing every entry of the history separately (fedtune merges equal mechanisms)."""
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    for event in _steps(history):
        acc.compose(event)
    return acc.get_epsilon(delta)


def google_rdp(history: Iterable[Iterable[float]], delta: float) -> float:
    acc = dp_accounting.rdp.RdpAccountant()
    for event in _steps(history):
        acc.compose(event)
    return acc.get_epsilon(delta)


def opacus_prv(history: Iterable[Iterable[float]], delta: float) -> float:
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(float(z), float(q), int(n)) for z, q, n in history]
    return acc.get_epsilon(delta=delta)
