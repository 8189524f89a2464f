"""The deployed ServerApp: the SuperLink starts it with the run configuration `fedtune-coordinator start` submitted."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import http_grid

from fedtune.client.model import ModelSpec
from fedtune.client.model_source import resolve_task
from fedtune.client.settings import RUN, from_flower
from fedtune.coordinator.app import federate
from fedtune.coordinator.config import CoordinatorConfig


def config_from_run(run_config: dict[str, Any]) -> tuple[CoordinatorConfig, int]:
    """The CoordinatorConfig and the number of clients to wait for, from the run configuration."""
    cfg = CoordinatorConfig(
        **from_flower(CoordinatorConfig, run_config, RUN),
        model=resolve_task(ModelSpec(**from_flower(ModelSpec, run_config, RUN))),
        out_dir=Path(str(run_config["out-dir"])),
        resume=bool(run_config.get("resume", False)),
        metadata=json.loads(str(run_config.get("metadata", "{}"))),
    )
    return cfg, cfg.min_clients


def pull_objects_promptly() -> None:
    """Make the ServerApp's Grid retry a reply's missing objects after 50 ms, not Flower's 1 s.

    A SuperNode sends a reply message, then its objects; the ServerApp, polling every 0.1 s, often asks for the
    objects before they are there and Flower's `pull_objects` then waits 1 s. That was 1.0-1.4 s of each phase
    in P6 (benchmarks/README.md); with 50 ms, P6's fixed cost went from 3.1 s to 2.0 s per client and round.
    The SuperNode gets the same (client/flower_node.py). Runs in the ServerApp's own process, once.
    """
    if not isinstance(http_grid.pull_objects, functools.partial):
        http_grid.pull_objects = functools.partial(http_grid.pull_objects, initial_backoff=0.05, backoff_cap=1.0)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    pull_objects_promptly()
    cfg, num_clients = config_from_run(dict(context.run_config))
    federate(grid, cfg, num_clients, evaluator=None)
