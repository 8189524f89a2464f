"""The fedtune ServerApp: run the strategy for the configured rounds, evaluate centrally, export the model."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from client.model import build_model, export_model, load_tokenizer, load_trainable_state, trainable_state
from coordinator.config import CoordinatorConfig
from coordinator.report import RunRecorder
from coordinator.strategy import PrivacyTracking, build_strategy, client_level_epsilon, sampled_per_round

# Central evaluation: given the global model, return metrics such as accuracy, macro-f1 and loss.
Evaluator = Callable[[torch.nn.Module], dict[str, Any]]


def _metric_record(metrics: dict[str, Any]) -> MetricRecord:
    return MetricRecord({k: v for k, v in metrics.items() if isinstance(v, (int, float, list))})


class JoinTimeout(RuntimeError):
    """Too few clients connected before the join deadline."""


def wait_for_clients(grid: Grid, needed: int, timeout: float) -> int:
    """Block until `needed` clients are connected; Flower's own sampling would wait forever."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < needed:
        if time.monotonic() > deadline:
            raise JoinTimeout(f"only {connected} of {needed} clients connected within {timeout:.0f} s; stopping the run")
        time.sleep(1.0)
    return connected


def run_federation(grid: Grid, cfg: CoordinatorConfig, num_clients: int, evaluator: Evaluator | None) -> dict[str, Any]:
    """Run every round on `grid`, then write results.json, plots and the exported model."""
    wait_for_clients(grid, num_clients, cfg.join_timeout)
    model = build_model(cfg.model, cfg.labels)
    initial = ArrayRecord(trainable_state(model))
    header = {**cfg.metadata, "labels": list(cfg.labels), "strategy": cfg.strategy, "num_rounds": cfg.num_rounds}
    with RunRecorder(cfg.out_dir, cfg.num_rounds, header) as recorder:

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            metrics: dict[str, Any] = {}
            if evaluator is not None:
                load_trainable_state(model, arrays.to_torch_state_dict())
                metrics = evaluator(model)
            recorder.global_evaluation(server_round, metrics)
            return _metric_record(metrics) if metrics else None

        strategy = PrivacyTracking(
            build_strategy(cfg, num_clients), recorder.client_reports, recorder.rejection, cfg.max_update_norm
        )
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.num_rounds,
            timeout=cfg.round_timeout,
            train_config=ConfigRecord(
                {"num-rounds": cfg.num_rounds, "proximal-mu": cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0}
            ),
            evaluate_config=ConfigRecord({"num-rounds": cfg.num_rounds}),
            evaluate_fn=evaluate_fn,
        )
    recorder.merge_flower_history(result.train_metrics_clientapp, result.evaluate_metrics_clientapp)
    final = result.arrays if len(result.arrays) else initial  # empty when no round aggregated anything
    load_trainable_state(model, final.to_torch_state_dict())
    model_dir = export_model(model.cpu(), load_tokenizer(cfg.model.name), cfg.out_dir / "model")
    extra: dict[str, Any] = {"model_dir": model_dir.name}
    if cfg.central_dp:
        releases = sum(1 for r in result.train_metrics_clientapp.values() if r)  # rounds that aggregated
        sampled = sampled_per_round(cfg, num_clients)
        extra["central_dp"] = {
            "mechanism": "DP-FedAvg, server-side fixed clipping (Flower), equal client weights",
            "noise_multiplier": cfg.central_noise_multiplier,
            "clipping_norm": cfg.central_clipping_norm,
            "num_sampled_clients": sampled,
            "noise_std": cfg.central_noise_multiplier * cfg.central_clipping_norm / sampled,
            "delta": cfg.central_delta,
            "releases": releases,
            "epsilon": client_level_epsilon(cfg, releases),
            "accountant": "Opacus RDP, no amplification by client sampling",
        }
    return recorder.finish(extra)


def make_server_app(cfg: CoordinatorConfig, num_clients: int, evaluator: Evaluator | None = None) -> ServerApp:
    """A ServerApp that waits for `num_clients` clients and runs the configured federation."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, num_clients, evaluator)

    return app
