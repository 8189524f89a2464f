"""`fedtune-simulate`: parse flags (and an optional TOML file) into a SimulationConfig and run it."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape

from fedtune.simulations.config import FIELDS, SimulationConfigError, build_config, read_run_settings, read_toml

# flag -> (config field, type, help); every field is also settable in the TOML file.
FLAGS: list[tuple[str, str, Any, str]] = [
    ("--clients", "num_clients", int, "number of simulated clients (default 10)"),
    ("--rounds", "num_rounds", int, "federated rounds (default 5)"),
    ("--fraction", "fraction", float, "fraction of clients sampled per round (default 1.0)"),
    (
        "--fraction-evaluate",
        "fraction_evaluate",
        float,
        "fraction of clients evaluating locally per round (default 1.0)",
    ),
    ("--strategy", "strategy", str, "fedavg | fedprox | fedadam | fedmedian | fedtrimmedavg | krum | multikrum"),
    ("--trim-fraction", "trim_fraction", float, "fedtrimmedavg: share trimmed from each end (default 0.2)"),
    ("--num-malicious", "num_malicious", int, "krum/multikrum: clients assumed malicious (default 0)"),
    ("--max-update-norm", "max_update_norm", float, "reject updates farther than this from the global weights (1e4)"),
    ("--update-encoding", "update_encoding", str, "how clients send updates: float32 (default) or int8 (8-bit, ~4x smaller)"),
    ("--round-timeout", "round_timeout", float, "seconds each phase of a round waits for clients (default 3600)"),
    ("--round-retries", "round_retries", int, "times a round with too few answers is retried before stopping (default 1)"),
    ("--proximal-mu", "proximal_mu", float, "FedProx proximal term (default 0.01)"),
    ("--server-lr", "server_learning_rate", float, "FedAdam server learning rate (default 0.01)"),
    ("--dataset", "dataset", str, "'vader' (embedded), a CSV/TSV/JSONL/Parquet file, or a hub dataset name"),
    ("--text-column", "text_column", str, "text column of a data file (default text)"),
    ("--label-column", "label_column", str, "label column of a data file (default label)"),
    ("--test-fraction", "test_fraction", float, "share held out for central evaluation (default 0.15)"),
    (
        "--test-dataset",
        "test_dataset",
        str,
        "a separate file (same columns and labels) for the central evaluation, e.g. a dev set; "
        "all of --dataset is then shared among the clients",
    ),
    ("--partitioning", "partitioning", str, "iid | dirichlet | shard (default dirichlet)"),
    ("--alpha", "alpha", float, "Dirichlet concentration; smaller is more non-IID (default 0.5)"),
    ("--shards-per-client", "shards_per_client", int, "shards per client for --partitioning shard (default 2)"),
    ("--model", "model", str, "'minilm' (bundled all-MiniLM-L6-v2), a local model directory or a hub name"),
    ("--lora-r", "lora_r", int, "LoRA rank (default 8)"),
    ("--pooler", "pooler", str, "auto | mean | identity | checkpoint: what the head reads (default auto: as trained)"),
    ("--max-length", "max_length", int, "max tokens per example (default 64)"),
    ("--epsilon", "epsilon", float, "target epsilon per client over the whole run (default 8)"),
    ("--delta", "delta", float, "delta (default 1e-5)"),
    ("--max-grad-norm", "max_grad_norm", float, "per-sample clipping norm (default 1.0)"),
    ("--accountant", "accountant", str, "rdp | prv (default rdp)"),
    ("--budget-epsilon", "budget_epsilon", float, "every client's hard epsilon limit (default: the target epsilon)"),
    ("--central-noise", "central_noise_multiplier", float, "central DP noise multiplier (default 1.0)"),
    ("--central-clip", "central_clipping_norm", float, "central DP clipping norm of each client's update (default 1.0)"),
    ("--central-delta", "central_delta", float, "central DP delta (default 1e-5)"),
    ("--ledger", "ledger", str, "privacy ledger file; epsilon then composes across runs on the same data"),
    ("--optimizer", "optimizer", str, "client optimizer: sgd (momentum 0.9) | adamw (default sgd)"),
    ("--lr", "learning_rate", float, "client learning rate for adapters / encoder weights (default 0.05)"),
    ("--head-lr", "head_learning_rate", float, "client learning rate for the classification head (default 2.0)"),
    ("--batch-size", "batch_size", int, "expected batch size, Poisson-sampled under DP (default 128)"),
    (
        "--physical-batch-size",
        "physical_batch_size",
        int,
        "rows per forward/backward pass: each batch runs as length-sorted passes, padded per pass "
        "(default 32; 0: one pass per batch). The same step, less padding; lower it to save memory",
    ),
    ("--local-epochs", "local_epochs", int, "local epochs per round (default 1)"),
    ("--lr-schedule", "lr_schedule", str, "learning rates over the rounds: constant | cosine (default constant)"),
    (
        "--eval-fraction",
        "eval_fraction",
        float,
        "share of each client's data kept for its local evaluation, not trained on (default 0.2)",
    ),
    ("--seed", "seed", int, "seed for splits, initialisation, sampling and noise (default 0)"),
    ("--device", "device", str, "auto | cpu | cuda (default auto)"),
    ("--out", "out", str, "run folder (default runs/<timestamp>)"),
    ("--cpus-per-client", "cpus_per_client", float, "CPU cores reserved per simulated client (default 1)"),
    ("--gpus-per-client", "gpus_per_client", float, "GPU share per simulated client (default 0.5 on CUDA)"),
    (
        "--ray-address",
        "ray_address",
        str,
        "run the clients on this existing Ray cluster (HOST:PORT of its head, as `ray start --head` prints); "
        "default: a private Ray instance on 127.0.0.1 for this run only",
    ),
]


# Settings a resumed run may change: they decide how long it waits, where it runs and what it shows, not what
# it trains (a restarted Ray cluster has a new address).
RESUME_MAY_CHANGE = {"verbose", "round_timeout", "round_retries", "ray_address"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedtune-simulate",
        description="Simulate federated, differentially private fine-tuning of a Transformer on this machine.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", metavar="FILE.toml", help="settings file; flags override it")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run after its last completed round "
        "(only --round-timeout, --round-retries, --ray-address and --verbose may change)",
    )
    for flag, dest, kind, help_ in FLAGS:
        p.add_argument(flag, dest=dest, type=kind, help=help_)
    p.add_argument(
        "--labels",
        dest="labels",
        type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
        help="comma-separated label names in id order (default: inferred from the data)",
    )
    p.add_argument("--full-finetune", dest="lora", action="store_false", help="train all weights instead of LoRA adapters")
    p.add_argument(
        "--central-dp", dest="central_dp", action="store_true", help="add user-level DP on the coordinator (DP-FedAvg)"
    )
    p.add_argument("--no-dp", dest="dp", action="store_false", help="turn differential privacy OFF (flagged in results)")
    p.add_argument(
        "--client-budget",
        dest="client_budgets",
        action="append",
        metavar="ID=EPSILON",
        help="a smaller epsilon budget for one client (repeatable)",
    )
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    return p


def _budgets(items: list[str]) -> dict[int, float]:
    out = {}
    for item in items:
        cid, sep, eps = item.partition("=")
        try:
            out[int(cid)] = float(eps)
        except ValueError:
            raise SimulationConfigError(f"--client-budget expects ID=EPSILON, e.g. 3=0.5; got {item!r}") from None
        if not sep:
            raise SimulationConfigError(f"--client-budget expects ID=EPSILON, e.g. 3=0.5; got {item!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    # Results, checkpoints, ledgers and the exported model are owner-only whatever the caller's umask (this
    # process and Ray's, which it starts). See docs/security.md.
    os.umask(0o077)
    args = vars(parser().parse_args(argv))
    console = Console(stderr=True)
    try:
        from fedtune.client.config import ConfigError
        from fedtune.client.data import DataError
        from fedtune.client.model import ModelError
        from fedtune.coordinator.checkpoint import CheckpointError
        from fedtune.coordinator.config import CoordinatorConfigError
        from fedtune.privacy import PrivacyBudgetError
        from fedtune.simulations.run import FederationStopped, simulate

        resume = args.pop("resume", None)
        if resume is not None:
            # The run continues as it started; only deadlines and how it is shown may change.
            if fixed := sorted(set(args) - RESUME_MAY_CHANGE):
                raise SimulationConfigError(f"--resume continues a run with its own settings; drop: {', '.join(fixed)}")
            file_settings = read_run_settings(resume)
        else:
            file_settings = read_toml(args.pop("config")) if "config" in args else {}
        if "client_budgets" in args:
            args["client_budgets"] = _budgets(args["client_budgets"])
        assert set(args) <= set(FIELDS), set(args) - set(FIELDS)
        cfg = build_config(file_settings, args)
        cfg = dataclasses.replace(cfg, out=str(cfg.run_dir()))  # the default folder's timestamp is taken once
        results = simulate(cfg, console, resume=resume is not None)
    except (
        SimulationConfigError,
        ConfigError,
        DataError,
        ModelError,
        CoordinatorConfigError,
        PrivacyBudgetError,
        CheckpointError,
        FederationStopped,
    ) as err:
        # soft_wrap: the error stays one greppable line; escape: messages may hold [brackets]
        console.print(f"[bold red]fedtune-simulate: error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("fedtune-simulate: interrupted")
        return 130
    final = results.get("final", {})
    console.print(
        f"done in {results['wall_seconds']:.0f}s: accuracy {final.get('accuracy', float('nan')):.4f} "
        f"(majority baseline {results['baseline']['accuracy']:.4f}); results in {cfg.run_dir()}/results.json, "
        f"plots in {cfg.run_dir()}/plots, model in {cfg.run_dir()}/{results['model_dir']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
