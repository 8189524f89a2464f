"""The data holder's privacy ledger: every DP step ever taken on a dataset, on its own disk, written before training."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.privacy.accounting import History, epsilon_spent
from fedtune.privacy.at_rest import write_atomic

UNIT = "example"  # sample-level DP-SGD: one row of the data file is what is protected


class LedgerError(RuntimeError):
    """The ledger file cannot be read or written; the message says which and why."""


def fingerprint_rows(rows: Iterable[tuple[object, ...]]) -> str:
    """A content hash of a dataset (every row's fields, e.g. text and label, in order): the ledger's key for it."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([str(v) for v in row], ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class Reservation:
    """The outcome of asking the ledger for one more round."""

    granted: bool
    history_before: History  # what the dataset had spent before this round
    epsilon_after: float  # what the total would be (granted: now is) with the round
    budget: float
    delta: float
    accountant: str

    @property
    def epsilon_before(self) -> float:
        # Computed on demand: a new mechanism costs an accountant call (up to ~0.3 s);
        # a client's round needs only epsilon_after.
        return epsilon_spent(self.history_before, self.delta, self.accountant)


class Ledger:
    """A JSON file of per-dataset DP histories; each round's cost is recorded before the round trains.

    Recording first means a crash after the write may count a round that never finished (conservative),
    but never forgets one that did. Writes are atomic and owner-only (`privacy/at_rest.py`: temp file, fsync,
    rename) under an exclusive lock.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"version": 1, "datasets": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise LedgerError(f"privacy ledger {self.path} is unreadable ({err}); refusing to train without it") from None
        if not isinstance(data, dict) or "datasets" not in data:
            raise LedgerError(f"privacy ledger {self.path} is not a fedtune ledger; refusing to train without it")
        return data

    def _write(self, data: dict[str, Any]) -> None:
        # Called under `_locked`: the lock orders writers; write_atomic makes each write whole and durable.
        write_atomic(self.path, json.dumps(data, indent=1))

    @staticmethod
    def _key(fingerprint: str, unit: str) -> str:
        return f"{fingerprint}|{unit}"

    def _history(self, data: dict[str, Any], fingerprint: str, unit: str, also: tuple[str, ...]) -> History:
        # `also`: older keys of the same rows (an earlier fedtune keyed a classifier's rows by text and label);
        # each round was written under one key only, so adding them up counts every round once.
        entries = [data["datasets"].get(self._key(k, unit)) for k in (fingerprint, *also)]
        return [tuple(step[:3]) for e in entries if e for step in e["steps"]]  # type: ignore[misc]

    def history(self, fingerprint: str, unit: str = UNIT, also: tuple[str, ...] = ()) -> History:
        """Every (noise multiplier, sample rate, steps) ever recorded for this dataset (and under `also`, its older
        keys), oldest first within each key."""
        return self._history(self.read(), fingerprint, unit, also)

    def spent(self, fingerprint: str, delta: float, accountant: str, unit: str = UNIT, also: tuple[str, ...] = ()) -> float:
        return epsilon_spent(self.history(fingerprint, unit, also), delta, accountant)

    def reserve(
        self,
        fingerprint: str,
        steps: History,
        *,
        budget: float,
        delta: float,
        accountant: str,
        run_id: str,
        round_id: int,
        unit: str = UNIT,
        also: tuple[str, ...] = (),
    ) -> Reservation:
        """Record `steps` for this dataset if the composed epsilon (with what its older keys `also` hold) stays
        within `budget`; else record nothing."""
        with self._locked():
            data = self.read()
            history = self._history(data, fingerprint, unit, also)
            entry = data["datasets"].setdefault(
                self._key(fingerprint, unit), {"fingerprint": fingerprint, "unit": unit, "steps": []}
            )
            after = epsilon_spent(history + list(steps), delta, accountant)  # type: ignore[operator]
            if after > budget:
                return Reservation(False, history, after, budget, delta, accountant)  # type: ignore[arg-type]
            stamp = time.time()
            entry["steps"] += [[float(z), float(q), int(n), run_id, int(round_id), stamp] for z, q, n in steps]
            entry |= {"delta": delta, "accountant": accountant, "budget": budget, "epsilon": after}
            self._write(data)
            return Reservation(True, history, after, budget, delta, accountant)  # type: ignore[arg-type]

    def summary(self) -> list[dict[str, Any]]:
        """Per dataset: spent epsilon, budget, accountant, delta and the epsilon each run added."""
        out = []
        for entry in self.read()["datasets"].values():
            delta, accountant = entry.get("delta", 1e-5), entry.get("accountant", "rdp")
            runs: dict[str, History] = {}
            history: History = []
            per_run = {}
            for z, q, n, run_id, *_ in entry["steps"]:
                before = epsilon_spent(history, delta, accountant)
                history.append((z, q, n))
                runs.setdefault(run_id, []).append((z, q, n))
                per_run[run_id] = per_run.get(run_id, 0.0) + epsilon_spent(history, delta, accountant) - before
            spent = epsilon_spent(history, delta, accountant)
            out.append(
                {
                    "fingerprint": entry["fingerprint"],
                    "unit": entry["unit"],
                    "accountant": accountant,
                    "delta": delta,
                    "budget": entry.get("budget"),
                    "spent": spent,
                    "remaining": None if entry.get("budget") is None else max(entry["budget"] - spent, 0.0),
                    "runs": {r: {"rounds": len(h), "epsilon_added": per_run[r]} for r, h in runs.items()},
                }
            )
        return out
