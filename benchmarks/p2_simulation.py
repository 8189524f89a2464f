"""P2: simulation efficiency: the share of wall time spent in client training, and client updates per second,
for fedtune's workers (model, tokenizer and tokenised partitions cached per worker) and for the naive pattern
of Flower's Hugging Face and Opacus examples (load the model, tokenise and build a PrivacyEngine in every call,
and train each batch as one pass padded to its longest row).

    python -m fedtune.benchmarks.p2_simulation                     # 100 clients x 2 rounds, SST-2 rows, MiniLM + LoRA, DP
    python -m fedtune.benchmarks.p2_simulation --smoke --model DIR --data FILE
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedtune.benchmarks.sst2 import LABELS


class Timing:
    """Client mod: the handler's own wall time per training message; `naive` first drops every per-worker cache,
    so each call loads the model and tokenizer and tokenises its partition again, as the examples do."""

    def __init__(self, naive: bool, log: Path) -> None:
        self.naive = naive
        self.log = log  # one "round seconds" line per trained update; the reply carries only what the wire defines

    def __call__(self, msg, context, call_next):
        if msg.metadata.message_type != "train":
            return call_next(msg, context)
        from fedtune.client import wire

        if self.naive:
            from fedtune.client.local_data import NODE_DATA
            from fedtune.client.model import MODELS

            NODE_DATA.reset()
            MODELS.reset()
        began = time.perf_counter()
        reply = call_next(msg, context)
        if not reply.has_error() and not reply.content[wire.METRICS][wire.DECLINED]:
            server_round = int(msg.content[wire.CONFIG][wire.SERVER_ROUND])
            with open(self.log, "a") as f:  # one short O_APPEND write: workers never interleave within a line
                f.write(f"{server_round} {time.perf_counter() - began}\n")
        return reply


def run(pattern: str, data: Path, model: str, clients: int, rounds: int, cpus: float, out: Path) -> dict[str, Any]:
    import cloudpickle

    import fedtune.benchmarks.p2_simulation as this_module
    from fedtune.simulations.config import build_config
    from fedtune.simulations.run import simulate

    cloudpickle.register_pickle_by_value(this_module)  # Ray workers receive the mod by value
    cfg = build_config(
        {},
        dict(
            num_clients=clients,
            num_rounds=rounds,
            dataset=str(data),
            labels=LABELS,
            model=model,
            partitioning="iid",
            cpus_per_client=cpus,
            # The examples pad each batch to its longest row in one pass (DataCollatorWithPadding).
            **({"physical_batch_size": 0} if pattern == "naive" else {}),
            fraction_evaluate=0.0,
            out=str(out / pattern),
        ),  # fmt: skip
    )
    began = time.perf_counter()
    log = out / f"{pattern}-handler-seconds.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    results = simulate(cfg, client_mods=[Timing(naive=pattern == "naive", log=log)])
    wall = time.perf_counter() - began
    reports = [c for r in results["rounds"][1:] for c in r["clients"].values() if not c.get("declined")]
    federation = sum(r["seconds"] for r in results["rounds"][1:])  # the rounds themselves, without start-up
    concurrency = min(clients, max(1, int(len(os.sched_getaffinity(0)) // cpus)))
    train = sum(c["train-seconds"] for c in reports)
    handler = sum(float(s) for r, s in (line.split() for line in log.read_text().splitlines()) if int(r) > 1)
    return {
        "pattern": pattern,
        "client_updates": len(reports),
        "wall_s": wall,
        "rounds_s": federation,
        "updates_per_s": len(reports) / federation,
        "train_share_of_rounds": train / (federation * concurrency),
        "train_share_of_handler": train / handler,
        "mean_handler_s": handler / len(reports),
        "mean_train_s": train / len(reports),
        "concurrency": concurrency,
        "final_accuracy": results["final"].get("accuracy"),
    }


def main(argv: list[str] | None = None) -> int:
    from fedtune.benchmarks.record import RESULTS, write
    from fedtune.benchmarks.sst2 import sst2_csv, sst2_present

    p = argparse.ArgumentParser(prog="python -m fedtune.benchmarks.p2_simulation", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm", help="minilm (bundled) or a local model directory")
    p.add_argument("--data", type=Path, help="a text,label CSV (default: the first --rows rows of SST-2 train)")
    p.add_argument("--rows", type=int, default=6000)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cpus-per-client", type=float, default=1.0)
    p.add_argument("--smoke", action="store_true", help="4 clients, 1 round (keeps the script from rotting)")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/p2_simulation.json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.clients, args.rounds = 4, 1
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            if not sst2_present("P2 (or pass --data FILE.csv)"):
                return 0
            data = sst2_csv("train", Path(tmp) / "sst2.csv", args.rows)
        rows = [run(pattern, data, args.model, args.clients, args.rounds, args.cpus_per_client, Path(tmp))
                for pattern in ("fedtune", "naive")]  # fmt: skip
    rows[0]["speedup_vs_naive"] = rows[0]["updates_per_s"] / rows[1]["updates_per_s"]
    meta = {"model": args.model, "data": str(args.data or f"SST-2 train, first {args.rows} rows"), "clients": args.clients,
            "rounds": args.rounds, "cpus_per_client": args.cpus_per_client, "dp": True, "lora": True,
            "train_share_of_rounds": "sum of clients' train_round seconds / (rounds' wall seconds x concurrent workers)",
            "goal": ">= 90% of wall time in training; >= 3x the naive pattern's updates per second"}  # fmt: skip
    write("P2 simulation efficiency", rows, args.out or RESULTS / "p2_simulation.json", meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
