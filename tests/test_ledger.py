"""The privacy ledger: never over budget, never forgets, atomic under crashes (property-based)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.privacy.accounting import epsilon_spent
from fedtune.privacy.ledger import Ledger, LedgerError, fingerprint_rows

DELTA = 1e-5

round_costs = st.tuples(
    st.floats(min_value=0.5, max_value=3.0),  # noise multiplier
    st.floats(min_value=0.01, max_value=0.5),  # sample rate
    st.integers(min_value=1, max_value=40),  # steps
)


class Crash(Exception):
    pass


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    schedule=st.lists(round_costs, min_size=1, max_size=8),
    budget=st.floats(min_value=0.5, max_value=10.0),
    crash_at=st.sets(st.integers(min_value=0, max_value=7), max_size=3),
    runs=st.integers(min_value=1, max_value=2),
)
def test_ledger_never_exceeds_budget_and_never_forgets(tmp_path: Path, schedule, budget, crash_at, runs, monkeypatch):
    path = tmp_path / f"ledger-{os.urandom(4).hex()}.json"
    trained: list[tuple[float, float, int]] = []
    real_replace = os.replace
    for run in range(runs):  # a "run" reopens the file, like a new federation on the same data
        for i, (z, q, n) in enumerate(schedule):
            ledger = Ledger(path)
            if i in crash_at:  # the process dies while writing: between the temp file and the rename
                monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(Crash()))
            try:
                granted = ledger.reserve(
                    "sha256:x", [(z, q, n)], budget=budget, delta=DELTA, accountant="rdp", run_id=f"run{run}", round_id=i
                ).granted
            except Crash:
                granted = False  # nothing trained: the round's cost was never durably recorded
            finally:
                monkeypatch.setattr(os, "replace", real_replace)
            if granted:
                trained.append((z, q, n))
            recorded = Ledger(path).history("sha256:x")
            assert recorded == trained  # exactly what trained: nothing forgotten, nothing half-written
            assert epsilon_spent(recorded, DELTA, "rdp") <= budget + 1e-9


def test_declined_round_records_nothing_and_says_why(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.json")
    first = ledger.reserve("sha256:a", [(1.0, 0.1, 50)], budget=8.0, delta=DELTA, accountant="rdp", run_id="r", round_id=1)
    assert first.granted and first.epsilon_before == 0
    second = ledger.reserve("sha256:a", [(1.0, 0.1, 500)], budget=8.0, delta=DELTA, accountant="rdp", run_id="r", round_id=2)
    assert not second.granted and second.epsilon_after > 8.0
    assert ledger.history("sha256:a") == [(1.0, 0.1, 50)]
    assert ledger.history("sha256:other") == []
    (summary,) = ledger.summary()
    assert summary["spent"] == pytest.approx(first.epsilon_after) and summary["remaining"] == pytest.approx(
        8.0 - first.epsilon_after
    )


def test_a_ledger_written_under_rdp_keeps_composing_under_the_default_accountant(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.json")
    old = ledger.reserve("sha256:a", [(1.0, 0.1, 50)], budget=8.0, delta=DELTA, accountant="rdp", run_id="old", round_id=1)
    new = ledger.reserve("sha256:a", [(1.0, 0.1, 50)], budget=8.0, delta=DELTA, accountant="pld", run_id="new", round_id=1)
    assert new.granted and ledger.history("sha256:a") == [(1.0, 0.1, 50), (1.0, 0.1, 50)]
    # The old round counts in full, recomputed by the accountant in use: PLD is tighter than RDP on it.
    assert new.epsilon_before == pytest.approx(epsilon_spent([(1.0, 0.1, 50)], DELTA, "pld"))
    assert new.epsilon_before < old.epsilon_after
    assert new.epsilon_after == pytest.approx(epsilon_spent([(1.0, 0.1, 100)], DELTA, "pld"))
    (summary,) = ledger.summary()
    assert summary["accountant"] == "pld" and summary["spent"] == pytest.approx(new.epsilon_after)


def test_corrupt_ledger_refuses_instead_of_starting_from_zero(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    path.write_text("{not json")
    with pytest.raises(LedgerError, match="unreadable"):
        Ledger(path).history("sha256:a")


def test_fingerprint_depends_on_content_only() -> None:
    rows = [("good film", "positive"), ("bad film", "negative")]
    assert fingerprint_rows(rows) == fingerprint_rows(list(rows))
    assert fingerprint_rows(rows) != fingerprint_rows(rows[::-1])
    assert fingerprint_rows(rows) != fingerprint_rows([("good film", "negative"), ("bad film", "negative")])
