"""P1: DP-SGD overhead: median optimizer-step time and peak memory of DP vs non-DP local training.

Each configuration runs in its own process (clean peak memory): LoRA and full fine-tuning, without DP and
with Opacus' grad-sample modes hooks (fedtune's default), functorch and ghost clipping.

    python -m fedtune.benchmarks.p1_dp_overhead                 # bundled MiniLM, batch 32, 64 tokens
    python -m fedtune.benchmarks.p1_dp_overhead --smoke --model DIR
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODES = ("non-dp", "hooks", "functorch", "ghost")
LABELS = ("negative", "positive")


def sentences(n: int) -> tuple[list[str], list[int]]:
    """n labelled sentences: SST-2's first rows when ../shared/data is there, else generated ones."""
    from fedtune.benchmarks.record import SHARED_DATA

    path = SHARED_DATA / "sst2" / "train.tsv"
    if path.exists():
        rows = [line.split("\t") for line in path.read_text().splitlines()[1 : n + 1]]
        return [r[0] for r in rows], [int(r[1]) for r in rows]
    words = "the film was a good bad great dull moving boring story of an old friend".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(n)]
    return texts, [i % 2 for i in range(n)]


def measure(model_name: str, finetune: str, mode: str, batch_size: int, length: int, steps: int, warmup: int) -> dict[str, Any]:
    """Time `steps` optimizer steps (after `warmup`) of one configuration in this process."""
    import psutil
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from fedtune.client.config import ModelSpec
    from fedtune.client.model import build_model, load_tokenizer
    from fedtune.client.train import forward
    from fedtune.privacy import make_private

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(ModelSpec(name=model_name, lora=finetune == "lora", max_length=length), LABELS).to(device)
    tokenizer = load_tokenizer(model_name)
    texts, labels = sentences(batch_size)
    # Every row padded to `length`: the same batch and sequence length in every configuration.
    batch = dict(tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"))
    batch["labels"] = torch.tensor(labels)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    # Only the loader's sample rate matters to Opacus here: every step uses `batch` above.
    loader = DataLoader(TensorDataset(torch.zeros(batch_size, 1)), batch_size=batch_size)
    criterion = None
    runner = model
    if mode != "non-dp":  # fedtune's own wiring (privacy.make_private), in each of Opacus' modes
        runner, optimizer, _, _, criterion = make_private(
            model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0, history=[], grad_sample_mode=mode
        )
    runner.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if criterion is None:
            loss = forward(runner, batch, device).loss
        else:  # ghost clipping computes the loss itself (two backward passes)
            logits = forward(runner, {k: v for k, v in batch.items() if k != "labels"}, device).logits
            loss = criterion(logits, batch["labels"].to(device))
        loss.backward()
        if mode == "non-dp":
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # as fedtune trains without DP
        optimizer.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = psutil.Process().memory_info().rss
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    row: dict[str, Any] = {
        "finetune": finetune,
        "mode": mode,
        "trainable_params": sum(p.numel() for p in params),
        "median_step_s": statistics.median(times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_warmup_mib": base_rss / 2**20,
    }
    if device.type == "cuda":
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedtune.benchmarks.p1_dp_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm", help="minilm (bundled) or a local model directory")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="2 steps per configuration (keeps the script from rotting)")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/p1_dp_overhead.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup = 2, 1
    if args.child:  # one configuration, in a fresh process; the result is the last line of stdout
        finetune, mode = args.child.split(":")
        print(json.dumps(measure(args.model, finetune, mode, args.batch_size, args.max_length, args.steps, args.warmup)))
        return 0

    from fedtune.benchmarks.record import RESULTS, write

    rows = []
    for finetune in ("lora", "full"):
        for mode in MODES:
            if args.smoke:  # in this process: quick, but the memory figures are not per configuration
                rows.append(measure(args.model, finetune, mode, args.batch_size, args.max_length, args.steps, args.warmup))
                continue
            cmd = [sys.executable, "-m", "fedtune.benchmarks.p1_dp_overhead", "--child", f"{finetune}:{mode}"]
            cmd += ["--model", args.model]
            cmd += ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
            if done.returncode != 0:
                rows.append({"finetune": finetune, "mode": mode, "error": done.stderr.strip().splitlines()[-1][:200]})
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for row in rows:
        base = next(r for r in rows if r["finetune"] == row["finetune"] and r["mode"] == "non-dp")
        if "median_step_s" in row and "median_step_s" in base:
            row["time_vs_non_dp"] = row["median_step_s"] / base["median_step_s"]
            row["rss_vs_non_dp"] = row["peak_rss_mib"] / base["peak_rss_mib"]
    meta = {"model": args.model, "batch_size": args.batch_size, "max_length": args.max_length, "steps": args.steps,
            "warmup": args.warmup, "goal": "DP/non-DP step time <= 1.05 (LoRA), <= 1.3 (full)"}  # fmt: skip
    shown = ["finetune", "mode", "trainable_params", "median_step_s", "time_vs_non_dp", "peak_rss_mib", "peak_gpu_mib", "error"]
    write("P1 DP-SGD overhead", rows, args.out or RESULTS / "p1_dp_overhead.json", meta, columns=shown)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
