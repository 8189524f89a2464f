"""Checkpoints after every round (global weights, strategy state, the run's record), written atomically."""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

from fedtune.coordinator.rounds import strategy_chain
from fedtune.privacy.at_rest import fsync_dir, write_atomic

# Strategy attributes that carry state from round to round: the server optimiser's moments of the
# FedOpt family (FedAdam: m_t, v_t, dicts by array name) and FedAvgM's momentum (a list in the arrays' order).
# FedAvg, FedProx and the robust strategies keep none.
STATE_ATTRS = ("m_t", "v_t", "momentum_vector")
LISTS = ("momentum_vector",)  # kept as {"0": ..., "1": ...} and restored as a list
KEEP = 2  # checkpoints kept; older ones are removed once a newer one is complete


class CheckpointError(RuntimeError):
    """A run cannot be resumed from its folder; the message says why."""


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to continue a run after `server_round`."""

    server_round: int
    arrays: ArrayRecord
    strategy_state: dict[str, dict[str, np.ndarray]]
    record: dict[str, Any]  # the RunRecorder's state: every round so far, with each client's privacy report
    settings: dict[str, Any]  # what a resumed run must share with this one


def strategy_state(strategy: Strategy) -> dict[str, dict[str, np.ndarray]]:
    """The strategy's round-to-round state (see STATE_ATTRS), as plain arrays."""
    out = {}
    for s in strategy_chain(strategy):
        for attr in STATE_ATTRS:
            value = getattr(s, attr, None)
            if value:
                items = enumerate(value) if attr in LISTS else value.items()
                out[attr] = {str(k): np.asarray(v) for k, v in items}
    return out


def restore_strategy_state(strategy: Strategy, state: dict[str, dict[str, np.ndarray]]) -> None:
    for s in strategy_chain(strategy):
        for attr, value in state.items():
            if hasattr(s, attr):
                setattr(s, attr, [value[str(i)] for i in range(len(value))] if attr in LISTS else dict(value))


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write checkpoint/round-NNNN/ in full, then point checkpoint/latest.json at it (the atomic step)."""
    root = Path(run_dir) / "checkpoint"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{ckpt.server_round:04d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # Weights by tensor name, as the global model holds them (they travel flat, see client/update_codec.py).
    weights = {name: arr.numpy() for name, arr in ckpt.arrays.items()}
    write_atomic(tmp / "weights.npz", _npz(weights))
    # npz keys are file names inside a zip: join attribute and tensor name with "::", never "/".
    moments = {f"{attr}::{k}": v for attr, d in ckpt.strategy_state.items() for k, v in d.items()}
    write_atomic(tmp / "strategy.npz", _npz(moments))
    state = {"round": ckpt.server_round, "order": list(weights), "record": ckpt.record, "settings": ckpt.settings}
    write_atomic(tmp / "state.json", json.dumps(state, allow_nan=False))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(root)  # the folder's rename survives a power cut before the pointer names it
    write_atomic(root / "latest.json", json.dumps({"round": ckpt.server_round, "dir": final.name}))
    for old in sorted(root.glob("round-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """The latest complete checkpoint of the run in `run_dir`."""
    root = Path(run_dir) / "checkpoint"
    if not (root / "latest.json").is_file():
        raise CheckpointError(f"{run_dir} holds no checkpoint (no {root / 'latest.json'}); nothing to resume")
    try:
        latest = json.loads((root / "latest.json").read_text())
        folder = root / latest["dir"]
        state = json.loads((folder / "state.json").read_text())
        with np.load(folder / "weights.npz") as npz:
            arrays = ArrayRecord({name: Array(np.array(npz[name])) for name in state["order"]})
        moments: dict[str, dict[str, np.ndarray]] = {}
        with np.load(folder / "strategy.npz") as npz:
            for key in npz.files:
                attr, name = key.split("::", 1)
                moments.setdefault(attr, {})[name] = np.array(npz[key])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"the checkpoint in {root} is unreadable ({err}); cannot resume") from None
    return Checkpoint(int(state["round"]), arrays, moments, state["record"], state["settings"])


def check_settings(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A resumed run must train the same model the same way; name the first setting that differs (a setting the
    checkpointed run did not record, such as the wire protocol before version 2, differs too)."""
    for key in [*saved, *(k for k in current if k not in saved)]:
        if current.get(key) != saved.get(key):
            raise CheckpointError(
                f"cannot resume: setting {key!r} was {saved.get(key)!r} in the checkpointed run but is {current.get(key)!r} now"
            )
