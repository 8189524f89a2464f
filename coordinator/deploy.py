"""The deployed ServerApp: the SuperLink starts it with the run configuration `fedtune-coordinator start` submitted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.client.model import ModelSpec
from fedtune.client.settings import RUN, from_flower
from fedtune.coordinator.app import federate
from fedtune.coordinator.config import CoordinatorConfig


def config_from_run(run_config: dict[str, Any]) -> tuple[CoordinatorConfig, int]:
    """The CoordinatorConfig and the number of clients to wait for, from the run configuration."""
    cfg = CoordinatorConfig(
        **from_flower(CoordinatorConfig, run_config, RUN),
        model=ModelSpec(**from_flower(ModelSpec, run_config, RUN)),
        out_dir=Path(str(run_config["out-dir"])),
        resume=bool(run_config.get("resume", False)),
        metadata=json.loads(str(run_config.get("metadata", "{}"))),
    )
    return cfg, cfg.min_clients


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, num_clients = config_from_run(dict(context.run_config))
    federate(grid, cfg, num_clients, evaluator=None)
