"""The deployed ServerApp: the SuperLink starts it with the run configuration `fedtune-coordinator start` submitted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.client.model import ModelSpec
from fedtune.coordinator.app import federate
from fedtune.coordinator.config import CoordinatorConfig


def config_from_run(run_config: dict[str, Any]) -> tuple[CoordinatorConfig, int]:
    """The CoordinatorConfig and the number of clients to wait for, from the run configuration."""
    labels = tuple(x.strip() for x in str(run_config["labels"]).split(",") if x.strip())
    model = ModelSpec(
        name=str(run_config["model"]),
        lora=bool(run_config["lora"]),
        lora_r=int(run_config["lora-r"]),
        max_length=int(run_config["max-length"]),
        pooler=str(run_config["pooler"]),
    )
    cfg = CoordinatorConfig(
        labels=labels,
        out_dir=Path(str(run_config["out-dir"])),
        model=model,
        num_rounds=int(run_config["num-rounds"]),
        strategy=str(run_config["strategy"]),
        fraction_train=float(run_config["fraction-train"]),
        fraction_evaluate=float(run_config["fraction-evaluate"]),
        min_clients=int(run_config["min-clients"]),
        wait_for_clients=int(run_config.get("wait-for-clients", 0)),
        proximal_mu=float(run_config["proximal-mu"]),
        server_learning_rate=float(run_config["server-learning-rate"]),
        round_timeout=float(run_config["round-timeout"]),
        round_retries=int(run_config["round-retries"]),
        resume=bool(run_config["resume"]),
        update_encoding=str(run_config["update-encoding"]),
        join_timeout=float(run_config["join-timeout"]),
        max_update_norm=float(run_config["max-update-norm"]),
        central_dp=bool(run_config["central-dp"]),
        central_noise_multiplier=float(run_config["central-noise-multiplier"]),
        central_clipping_norm=float(run_config["central-clipping-norm"]),
        central_delta=float(run_config["central-delta"]),
        metadata=json.loads(str(run_config.get("metadata", "{}"))),
    )
    return cfg, cfg.min_clients


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, num_clients = config_from_run(dict(context.run_config))
    federate(grid, cfg, num_clients, evaluator=None)
