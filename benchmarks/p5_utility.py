"""P5: utility on SST-2: dev accuracy of MiniLM + LoRA trained centrally and federated, without and with DP-SGD.

Centralised training is the same code with one data holder that has all the rows; federated training splits
the rows among 10 clients (Dirichlet alpha 0.5 over the labels). Every run passes over the training rows the
same number of times (one local epoch per round), and is evaluated on SST-2's dev set after every round.

    python -m fedtune.benchmarks.p5_utility                # 16000 train rows, 3 epochs/rounds, 5 settings (~40 min, 2 cores)
    python -m fedtune.benchmarks.p5_utility --smoke --model DIR --data FILE --test FILE
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedtune.benchmarks.sst2 import LABELS

# (name, clients, DP, target epsilon)
SETTINGS = (
    ("centralised", 1, False, None),
    ("centralised, DP epsilon 8", 1, True, 8.0),
    ("federated", 10, False, None),
    ("federated, DP epsilon 3", 10, True, 3.0),
    ("federated, DP epsilon 8", 10, True, 8.0),
)

# The settings P5's probes vary, recorded with every row as they were in effect.
LEVERS = ("batch_size", "learning_rate", "head_learning_rate", "lr_schedule", "optimizer", "local_epochs",
          "max_grad_norm", "head_clip_share", "accountant", "strategy", "server_learning_rate", "server_momentum")  # fmt: skip


def run(setting: tuple, args: argparse.Namespace, data: Path, test: Path, out: Path) -> dict[str, Any]:
    from fedtune.simulations.config import build_config
    from fedtune.simulations.run import simulate

    name, clients, dp, epsilon = setting
    cfg = build_config(
        {},
        dict(
            num_clients=clients,
            num_rounds=args.rounds,
            fraction_evaluate=0.0,
            dataset=str(data),
            test_dataset=str(test),
            labels=LABELS,
            model=args.model,
            partitioning="dirichlet",
            alpha=args.alpha,
            eval_fraction=0.0,  # every row trains; the dev set is the evaluation
            dp=dp,
            epsilon=epsilon or 8.0,
            delta=args.delta,
            cpus_per_client=2.0 if clients == 1 else 1.0,  # the single data holder gets both cores
            # Centralised is plain training: a server step on one data holder's update would only rescale it.
            **({"strategy": "fedavg"} if clients == 1 else {}),
            seed=args.seed,
            out=str(out / name.replace(", ", "-").replace(" ", "-")),
        )
        | {
            k: v
            for k, v in dict(
                batch_size=args.batch_size, learning_rate=args.lr, head_learning_rate=args.head_lr, lr_schedule=args.lr_schedule
            ).items()
            if v is not None
        }
        | dict(kv.split("=", 1) for kv in args.set),  # fmt: skip
    )
    began = time.perf_counter()
    results = simulate(cfg)
    curve = [r["global"].get("accuracy") for r in results["rounds"]]
    reports = results["clients"].values()
    return {
        "setting": name,
        "clients": clients,
        "dp": dp,
        "target_epsilon": epsilon,
        "max_client_epsilon": max((c.get("epsilon") or 0.0 for c in reports), default=None) if dp else None,
        "delta": args.delta if dp else None,
        "accountant": next((c.get("accountant") for c in reports if c.get("accountant")), None) if dp else None,
        "dev_accuracy": results["final"]["accuracy"],
        "dev_macro_f1": results["final"].get("macro-f1"),
        "dev_accuracy_by_round": curve,
        "partition_sizes": results["data"]["partition_sizes"],
        "wall_s": time.perf_counter() - began,
        "settings": {name: getattr(cfg, name) for name in LEVERS},
    }


def plot(rows: list[dict[str, Any]], path: Path, majority: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in rows:
        style = "-" if row["clients"] > 1 else "--"
        ax.plot(range(len(row["dev_accuracy_by_round"])), row["dev_accuracy_by_round"], style, marker="o", label=row["setting"])
    ax.axhline(majority, color="grey", lw=0.8, ls=":", label="majority class")
    ax.set_xlabel("round (= epochs over the training rows)")
    ax.set_ylabel("SST-2 dev accuracy")
    ax.set_title("P5: utility of centralised vs federated, with and without DP-SGD")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from fedtune.benchmarks.record import RESULTS, write
    from fedtune.benchmarks.sst2 import SST2, sst2_csv, sst2_present

    p = argparse.ArgumentParser(prog="python -m fedtune.benchmarks.p5_utility", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm", help="minilm (bundled) or a local model directory")
    p.add_argument("--data", type=Path, help="training rows, a text,label CSV (default: the first --rows of SST-2 train)")
    p.add_argument("--test", type=Path, help="evaluation rows, a text,label CSV (default: SST-2 dev)")
    p.add_argument("--rows", type=int, default=16000, help="SST-2 training rows used (default 16000 of 67,349)")
    p.add_argument("--rounds", type=int, default=3, help="rounds = epochs over the training rows (default 3)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, help="expected batch size (default: fedtune's)")
    p.add_argument("--lr", type=float, help="adapters' learning rate (default: fedtune's)")
    p.add_argument("--head-lr", type=float, help="classification head's learning rate (default: fedtune's)")
    p.add_argument("--lr-schedule", help="constant | cosine over the rounds (default: fedtune's)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other fedtune-simulate setting, as in its TOML file (repeatable; a probe's one lever)",
    )
    p.add_argument("--settings", help="comma-separated indices into the settings (default: all five)")
    p.add_argument("--smoke", action="store_true", help="1 round of each setting (keeps the script from rotting)")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/p5_utility.json; the plot beside it)")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds = 1
    settings = [SETTINGS[int(i)] for i in args.settings.split(",")] if args.settings else list(SETTINGS)
    if (args.data is None or args.test is None) and not sst2_present("P5 (or pass --data and --test)"):
        return 0
    out = args.out or RESULTS / "p5_utility.json"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = args.data or sst2_csv("train", work / "train.csv", args.rows)
        test = args.test or sst2_csv("dev", work / "dev.csv")
        rows = [run(s, args, data, test, work) for s in settings]
        import csv

        with test.open(encoding="utf-8") as f:
            labels = [r["label"] for r in csv.DictReader(f)]
        majority = max(labels.count(x) for x in set(labels)) / len(labels)
    reference = next((r["dev_accuracy"] for r in rows if r["setting"] == "centralised"), None)
    for row in rows:
        row["points_below_centralised"] = None if reference is None else 100 * (reference - row["dev_accuracy"])
    meta = {"model": args.model, "train": str(args.data or f"SST-2 train.tsv ({SST2}), first {args.rows} rows"),
            "test": str(args.test or "SST-2 dev.tsv (872 rows)"), "rounds": args.rounds,
            "partitioning": f"dirichlet alpha {args.alpha} over labels (flwr-datasets)",
            "lora": True, "settings": "per row (fedtune's defaults unless a flag or --set changed them)",
            "majority_class_accuracy": majority,
            "goal": "federated epsilon 8 within 2.5 points of centralised non-private"}  # fmt: skip
    write("P5 utility on SST-2", rows, out, meta, columns=[
        "setting", "max_client_epsilon", "dev_accuracy", "dev_macro_f1", "points_below_centralised", "wall_s"])  # fmt: skip
    plot(rows, out.with_suffix(".png"), majority)
    return 0


if __name__ == "__main__":
    sys.exit(main())
