"""P8: the empirical privacy audit (`fedtune-simulate --audit`) on the default job: its power without DP, its
bounds under DP at epsilon 8 and 1, and a broken DP-SGD (noise silently divided by 10) that it must expose.

    python -m fedtune.benchmarks.p8_audit                       # the default job (VADER, MiniLM + LoRA), ~10 min on 2 cores
    python -m fedtune.benchmarks.p8_audit --smoke --model DIR   # seconds: a tiny model, 2 clients, 2 rounds
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def weakened_noise(divisor: float) -> Iterator[None]:
    """For tests and this benchmark only: inside, Opacus adds noise with the multiplier divided by `divisor`,
    while its accountant (and so every reported epsilon) still records the multiplier it was given. The silent
    bug a privacy audit exists to catch."""
    from opacus.optimizers import DPOptimizer

    honest = DPOptimizer.add_noise

    def weakened(optimizer) -> None:
        claimed = optimizer.noise_multiplier
        optimizer.noise_multiplier = claimed / divisor
        try:
            honest(optimizer)
        finally:
            optimizer.noise_multiplier = claimed  # what the accountant's step hook reads next

    DPOptimizer.add_noise = weakened
    try:
        yield
    finally:
        DPOptimizer.add_noise = honest


class WeakenedNoise:
    """Client mod: every message handled under `weakened_noise(divisor)` (in the Ray worker that runs it)."""

    def __init__(self, divisor: float) -> None:
        self.divisor = divisor

    def __call__(self, msg, context, call_next):
        with weakened_noise(self.divisor):
            return call_next(msg, context)


SETTINGS: dict[str, tuple[dict[str, Any], float]] = {
    # name: (settings, noise divisor)
    "no DP": ({"dp": False}, 1.0),
    "DP epsilon 8": ({}, 1.0),
    "DP epsilon 1": ({"epsilon": 1.0}, 1.0),
    "DP epsilon 1, noise / 10 (broken)": ({"epsilon": 1.0}, 10.0),
}


def run(name: str, settings: dict[str, Any], divisor: float, base: dict[str, Any], out: Path) -> dict[str, Any]:
    import cloudpickle

    import fedtune.benchmarks.p8_audit as this_module
    from fedtune.simulations.config import build_config
    from fedtune.simulations.run import simulate

    cloudpickle.register_pickle_by_value(this_module)  # Ray workers receive the mod by value
    cfg = build_config({}, base | settings | {"out": str(out)})
    results = simulate(cfg, client_mods=[WeakenedNoise(divisor)] if divisor != 1 else [])
    audit = results["audit"]
    row: dict[str, Any] = {
        "setting": name,
        "claimed_epsilon": audit["claimed"]["epsilon"],
        "accuracy": results["final"].get("accuracy"),
        "wall_s": results["wall_seconds"],
    }
    for view, v in audit["views"].items():
        row[f"{view}_bound"] = v["epsilon_lower_bound"]
        row[f"{view}_correct"] = f"{v['correct']}/{v['guesses']}"
    if "exposure" in audit:
        row["exposure_mean_bits"] = audit["exposure"]["mean_bits"]
    return row


def main(argv: list[str] | None = None) -> int:
    from fedtune.benchmarks.record import RESULTS, write

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a tiny model, 2 clients, 2 rounds, 200 canaries")
    p.add_argument("--model", default="minilm")
    p.add_argument("--canaries", type=int, default=1000)
    p.add_argument("--only", action="append", choices=list(SETTINGS), help="run only this setting (repeatable)")
    p.add_argument("--out", type=Path, default=RESULTS / "p8_audit.json")
    args = p.parse_args(argv)
    base: dict[str, Any] = {"model": args.model, "audit": args.canaries}
    if args.smoke:
        base |= {"num_clients": 2, "num_rounds": 2, "audit": min(args.canaries, 200)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedtune-p8-") as tmp:
        for i, (name, (settings, divisor)) in enumerate(SETTINGS.items()):
            if args.only and name not in args.only:
                continue
            rows.append(run(name, settings, divisor, base, Path(tmp) / str(i)))
    meta = base | {"confidence": 0.95, "note": "each bound must stay at or below the claimed epsilon unless DP is broken"}
    write("P8 privacy audit", rows, args.out, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
