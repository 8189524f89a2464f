"""P3: scale: peak memory of the whole process tree and time per round as the federation grows from 100 to 5000
virtual clients (10% sampled per round, 10 SST-2 rows each, MiniLM + LoRA, DP), plus 5000 clients with the
same 100 sampled as at 1000, which separates the cost of sampled clients from the cost of total clients.

    python -m fedtune.benchmarks.p3_scale                  # 100, 1000, 5000 clients (10%) and 5000 (2%), 2 rounds each
    python -m fedtune.benchmarks.p3_scale --smoke --model DIR --data FILE
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from fedtune.benchmarks.sst2 import LABELS

SCALES = ((100, 0.1), (1000, 0.1), (5000, 0.1), (5000, 0.02))  # (total clients, fraction sampled per round)


def tree_memory(root: psutil.Process) -> tuple[float, float, dict[str, float]]:
    """(PSS, RSS, PSS by process name) in MiB over `root` and its descendants (Ray's GCS, raylet, workers).
    PSS counts a shared page once across the tree (torch's libraries, the model every worker maps); RSS per process."""
    pss = rss = 0.0
    by_name: dict[str, float] = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            info, name = p.memory_full_info(), p.name()
        except psutil.Error:  # a worker that just exited
            continue
        pss, rss = pss + info.pss / 2**20, rss + info.rss / 2**20
        name = "driver (coordinator, simulation engine)" if p.pid == root.pid else name
        by_name[name] = by_name.get(name, 0.0) + info.pss / 2**20
    return pss, rss, by_name


def one(
    clients: int, fraction: float, rows_per_client: int, rounds: int, model: str, data: Path, test: Path, out: Path
) -> dict[str, Any]:
    """One federation, in this process (the parent measures its tree)."""
    from fedtune.simulations.config import build_config
    from fedtune.simulations.run import simulate

    cfg = build_config(
        {},
        dict(
            num_clients=clients,
            num_rounds=rounds,
            fraction=fraction,
            fraction_evaluate=0.0,
            dataset=str(data),
            test_dataset=str(test),
            labels=LABELS,
            model=model,
            partitioning="iid",
            eval_fraction=0.0,  # 10 rows: every one trains
            out=str(out),
        ),  # fmt: skip
    )
    results = simulate(cfg)
    trained = [r for r in results["rounds"][1:]]
    per_round = [r["seconds"] for r in trained]
    updates = [sum(1 for c in r["clients"].values() if not c.get("declined")) for r in trained]
    return {
        "clients": clients,
        "sampled_per_round": updates[-1],
        "rows_per_client": rows_per_client,
        "round_s": per_round,
        "steady_round_s": per_round[-1],  # the last round: workers started, caches warm
        "steady_s_per_sampled_client": per_round[-1] / max(updates[-1], 1),
        "mean_train_s": sum(c.get("train-seconds", 0.0) for r in trained for c in r["clients"].values()) / max(sum(updates), 1),
        "wall_s": results["wall_seconds"],
        "final_accuracy": results["final"].get("accuracy"),
    }


def measure(clients: int, fraction: float, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run `one` in a child process and sample its process tree's memory every half second."""
    data = work / f"train-{clients}.csv"
    if args.data is None:
        from fedtune.benchmarks.sst2 import sst2_csv

        sst2_csv("train", data, clients * args.rows_per_client)
    else:
        data = args.data
    row_file = work / f"row-{clients}-{fraction}.json"
    cmd = [sys.executable, "-m", "fedtune.benchmarks.p3_scale", "--one", str(clients), str(fraction), "--json", str(row_file),
           "--model", args.model, "--rounds", str(args.rounds), "--rows-per-client", str(args.rows_per_client),
           "--data", str(data), "--test", str(args.test), "--work", str(work / f"run-{clients}-{fraction}")]  # fmt: skip
    began = time.perf_counter()
    child = subprocess.Popen(cmd)
    root = psutil.Process(child.pid)
    peak_pss = peak_rss = 0.0
    at_peak: dict[str, float] = {}
    while child.poll() is None:
        pss, rss, by_name = tree_memory(root)
        if pss > peak_pss:
            peak_pss, at_peak = pss, by_name
        peak_rss = max(peak_rss, rss)
        time.sleep(0.5)
    if child.returncode != 0:
        raise SystemExit(f"P3: the run with {clients} clients failed (exit {child.returncode}); see its output above")
    row = json.loads(row_file.read_text())
    at_peak = {k: round(v, 1) for k, v in sorted(at_peak.items(), key=lambda kv: -kv[1])}
    return row | {"peak_pss_mib": peak_pss, "peak_rss_sum_mib": peak_rss, "pss_at_peak_by_process_mib": at_peak,
                  "process_wall_s": time.perf_counter() - began}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from fedtune.benchmarks.record import RESULTS, write
    from fedtune.benchmarks.sst2 import SST2, sst2_csv, sst2_present

    p = argparse.ArgumentParser(prog="python -m fedtune.benchmarks.p3_scale", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm", help="minilm (bundled) or a local model directory")
    p.add_argument("--data", type=Path, help="a text,label CSV for the clients (default: SST-2 train rows)")
    p.add_argument("--test", type=Path, help="a text,label CSV for the central evaluation (default: SST-2 dev)")
    p.add_argument("--rows-per-client", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--scales", default=",".join(f"{c}:{f}" for c, f in SCALES), help="CLIENTS:FRACTION,...")
    p.add_argument("--smoke", action="store_true", help="10 and 20 clients, 1 round (keeps the script from rotting)")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/p3_scale.json)")
    p.add_argument("--one", nargs=2, metavar=("CLIENTS", "FRACTION"), help=argparse.SUPPRESS)  # child process
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        row = one(
            int(args.one[0]), float(args.one[1]), args.rows_per_client, args.rounds, args.model, args.data, args.test, args.work
        )
        args.json.write_text(json.dumps(row))
        return 0
    scales = [(int(c), float(f)) for c, f in (s.split(":") for s in args.scales.split(","))]
    if args.smoke:
        scales, args.rounds = [(10, 0.5), (20, 0.25)], 1
    if (args.data is None or args.test is None) and not sst2_present("P3 (or pass --data and --test)"):
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.test is None:
            args.test = sst2_csv("dev", work / "dev.csv")
        rows = [measure(c, f, args, work) for c, f in scales]
    meta = {"model": args.model, "data": str(args.data or f"SST-2 train ({SST2}), {args.rows_per_client} rows per client"),
            "central_evaluation": str(args.test), "rounds": args.rounds, "dp": True, "lora": True,
            "memory": "peak over the run of the summed PSS (and RSS) of the benchmark's child process and all its descendants",
            "goal": "peak <= 4 GB at 1000 clients; per-round cost grows with sampled clients, not total clients"}  # fmt: skip
    write("P3 scale", rows, args.out or RESULTS / "p3_scale.json", meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
