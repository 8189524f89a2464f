"""Length-grouped passes: wall time of one local round (fedtune.client.train.train_round) on real SST-2 rows when each
sampled batch runs as one pass padded to its longest row, versus length-sorted passes of 16, 32 or 64 rows.

The lever behind P2 and P5: SST-2 rows average ~13 tokens, but a batch of 128 pads every row to its longest.

    python -m fedtune.benchmarks.padding                   # 512 SST-2 rows, batch 128, MiniLM + LoRA, DP and non-DP
    python -m fedtune.benchmarks.padding --smoke --model DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

PASSES = (0, 16, 32, 64)  # physical batch sizes; 0 is one pass per sampled batch


def measure(model: str, rows: int, batch_size: int, dp: bool, physical: int, repeats: int) -> dict[str, Any]:
    import datasets
    import torch

    from fedtune.benchmarks.p1_dp_overhead import sentences
    from fedtune.benchmarks.sst2 import LABELS
    from fedtune.client.config import ClientConfig, ModelSpec, PrivacySpec, TrainSpec
    from fedtune.client.model import build_model, load_tokenizer
    from fedtune.client.train import encode, length_grouped, make_loader, plan_round, train_round

    cfg = ClientConfig(
        labels=LABELS,
        model=ModelSpec(name=model, max_length=64),
        privacy=PrivacySpec(enabled=dp),
        train=TrainSpec(batch_size=batch_size, physical_batch_size=physical),
    )
    tokenizer = load_tokenizer(model)
    texts, labels = sentences(rows)
    data = encode(datasets.Dataset.from_dict({"text": texts, "label": labels}), tokenizer, 64)
    padded = computed = 0  # tokens the passes compute over, with and without length grouping
    for batch in make_loader(data, tokenizer, batch_size, shuffle=True):
        padded += batch["input_ids"].numel()
        computed += sum(p["input_ids"].numel() for p in length_grouped(batch, physical))
    times = []
    for i in range(repeats + 1):  # the first round warms up (allocator, Opacus hooks), and is not counted
        net = build_model(cfg.model, LABELS)
        plan = plan_round(len(data), cfg, num_rounds=1) if dp else None
        began = time.perf_counter()
        train_round(net, data, tokenizer, cfg, plan=plan, history=[], seed=i)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - began)
    return {
        "dp": dp,
        "physical_batch_size": physical or "one pass",
        "round_s": min(times),
        "tokens_computed_share": computed / padded,
        "mean_real_tokens_per_row": sum(len(r["input_ids"]) for r in data) / len(data),
    }


def main(argv: list[str] | None = None) -> int:
    from fedtune.benchmarks.record import RESULTS, write

    p = argparse.ArgumentParser(prog="python -m fedtune.benchmarks.padding", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm", help="minilm (bundled) or a local model directory")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="timed rounds per setting (the fastest is reported)")
    p.add_argument("--smoke", action="store_true", help="64 rows, 1 timed round (keeps the script from rotting)")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/padding.json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.rows, args.batch_size, args.repeats = 64, 32, 1
    rows = [measure(args.model, args.rows, args.batch_size, dp, k, args.repeats) for dp in (True, False) for k in PASSES]
    for row in rows:
        base = next(r for r in rows if r["dp"] == row["dp"] and r["physical_batch_size"] == "one pass")
        row["speedup_vs_one_pass"] = base["round_s"] / row["round_s"]
    meta = {"model": args.model, "rows": args.rows, "batch_size": args.batch_size, "lora": True,
            "data": "SST-2 train, first rows (generated sentences when ../shared/data is absent)",
            "round_s": f"fastest of {args.repeats} local rounds (train_round), after a warm-up round"}  # fmt: skip
    write("Length-grouped passes", rows, args.out or RESULTS / "padding.json", meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
