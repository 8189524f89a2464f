"""The fedtune ServerApp: run the strategy for the configured rounds, evaluate centrally, export the model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.superlink.grid import InMemoryGrid

from fedtune.client import wire
from fedtune.client.causal_lm import generate_samples
from fedtune.client.model import build_model, export_model, load_tokenizer, load_trainable_state, trainable_state
from fedtune.client.settings import to_flat
from fedtune.client.trusted_app import PROTOCOL_VERSION
from fedtune.coordinator.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_settings,
    load_checkpoint,
    restore_strategy_state,
    save_checkpoint,
    strategy_state,
)
from fedtune.coordinator.config import CoordinatorConfig
from fedtune.coordinator.report import RunRecorder, write_json
from fedtune.coordinator.rounds import JoinTimeout, RoundFailed, RoundHooks, RoundPolicy, run_rounds, wait_for_clients
from fedtune.coordinator.strategy import (
    CheckedStrategy,
    UpdateObserver,
    build_strategy,
    client_level_epsilon,
    sampled_per_round,
)

# Central evaluation: given the global model, return metrics such as accuracy, macro-f1 and loss.
Evaluator = Callable[[torch.nn.Module], dict[str, Any]]


# What a resumed run may change: deadlines and how many clients it waits for. Every other setting of the model
# and the coordinator must be the checkpointed run's (a new pooler or learning schedule would train another model).
RESUME_MAY_CHANGE = frozenset({"round_timeout", "round_retries", "join_timeout", "wait_for_clients", "min_clients"})


def resume_settings(cfg: CoordinatorConfig) -> dict[str, Any]:
    """Settings a resumed run must share with the run it continues, as JSON values (a checkpoint stores JSON)."""
    flat = {**to_flat(cfg.model), **to_flat(cfg)}
    kept = {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items() if k not in RESUME_MAY_CHANGE}
    return kept | {"protocol": PROTOCOL_VERSION}  # what a checkpoint's recorded replies speak (client/wire.py)


def simulated_clients(grid: Grid) -> dict[int, int]:
    """Node id -> partition id of a simulation's clients, from the engine's side; {} when deployed.

    Flower's engine (`vce_api._register_nodes`) registers node i for partition i, in order, in the in-memory
    LinkState this grid reads, and `get_node_info` lists nodes in that order. Deployed, a client is its node id.
    """
    if not isinstance(grid, InMemoryGrid):
        return {}
    return {n.node_id: i for i, n in enumerate(grid.state.get_node_info())}


class _Hooks(RoundHooks):
    """Round loop -> recorder, central evaluation and a checkpoint after every round."""

    def __init__(self, recorder: RunRecorder, strategy: Strategy, evaluate: Callable[[int, ArrayRecord], None], cfg) -> None:
        self.recorder, self.strategy, self.evaluate, self.cfg = recorder, strategy, evaluate, cfg
        self.phase = recorder.phase
        self.train_metrics = recorder.train_metrics
        self.evaluate_metrics = recorder.evaluate_metrics

    def round_done(self, server_round: int, arrays: ArrayRecord) -> None:
        self.evaluate(server_round, arrays)
        save_checkpoint(
            self.cfg.out_dir,
            Checkpoint(server_round, arrays, strategy_state(self.strategy), self.recorder.state(), resume_settings(self.cfg)),
        )


def run_federation(
    grid: Grid, cfg: CoordinatorConfig, num_clients: int, evaluator: Evaluator | None, observer: UpdateObserver | None = None
) -> dict[str, Any]:
    """Run every round on `grid` (from the checkpoint when cfg.resume), then write results, plots and the model.

    `evaluator` scores the global model after every round (and before the first); `observer` sees every
    accepted client update."""
    ckpt = load_checkpoint(cfg.out_dir) if cfg.resume else None
    if ckpt is not None:
        check_settings(ckpt.settings, resume_settings(cfg))
    model = build_model(cfg.model, cfg.labels)
    arrays = ckpt.arrays if ckpt else ArrayRecord(trainable_state(model))
    header = {**cfg.metadata, "labels": list(cfg.labels), "strategy": cfg.strategy, "num_rounds": cfg.num_rounds}
    if ckpt is not None:
        header["resumed_after_round"] = ckpt.server_round
    with RunRecorder(cfg.out_dir, cfg.num_rounds, header, state=ckpt.record if ckpt else None) as recorder:

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> None:
            metrics: dict[str, Any] = {}
            if evaluator is not None:
                load_trainable_state(model, arrays.to_torch_state_dict())
                metrics = evaluator(model)
            recorder.global_evaluation(server_round, metrics)

        # Round 1 may wait for more clients than later rounds need (deployment: every known hospital).
        wait_for_clients(grid, num_clients if ckpt else max(num_clients, cfg.wait_for_clients), cfg.join_timeout)
        partitions = simulated_clients(grid)  # once every simulated node is registered
        recorder.name_clients(partitions)
        strategy = CheckedStrategy(
            build_strategy(cfg, num_clients),
            recorder.client_reports,
            recorder.rejection,
            cfg.max_update_norm,
            client_of=lambda node: partitions.get(node, wire.node_client_id(node)),
            num_labels=0 if cfg.model.causal_lm else len(cfg.labels),
            max_length=cfg.model.max_length,
            observe=observer,
        )
        if ckpt is not None:
            restore_strategy_state(strategy, ckpt.strategy_state)
        else:
            evaluate_fn(0, arrays)
        policy = RoundPolicy(
            deadline=cfg.round_timeout,
            min_replies=min(cfg.min_clients, num_clients),
            min_available=num_clients,
            join_timeout=cfg.join_timeout,
            retries=cfg.round_retries,
        )
        arrays = run_rounds(
            grid,
            strategy,
            arrays,
            range((ckpt.server_round if ckpt else 0) + 1, cfg.num_rounds + 1),
            policy,
            train_config=wire.train_config(
                cfg.num_rounds, cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0, cfg.update_encoding
            ),
            evaluate_config=wire.evaluate_config(cfg.num_rounds),
            hooks=_Hooks(recorder, strategy, evaluate_fn, cfg),
        )
    load_trainable_state(model, arrays.to_torch_state_dict())
    extra: dict[str, Any] = {}
    if cfg.sample_prompts:  # before export, which merges the adapters into the model
        device = next(model.parameters()).device  # where the central evaluation ran it (the run's --device)
        tokenizer = load_tokenizer(cfg.model.name)
        extra["samples"] = generate_samples(model, tokenizer, cfg.sample_prompts, device, chat=cfg.sample_chat)
    model_dir = export_model(model.cpu(), load_tokenizer(cfg.model.name), cfg.out_dir / "model")
    extra["model_dir"] = model_dir.name
    if cfg.central_dp:
        releases = sum(1 for r, e in recorder.rounds.items() if r > 0 and e.get("train"))  # rounds that aggregated
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


STOPPED_FILE = "stopped.json"  # why a run stopped early; the CLI that started it shows this sentence


def federate(
    grid: Grid, cfg: CoordinatorConfig, num_clients: int, evaluator: Evaluator | None, observer: UpdateObserver | None = None
) -> dict[str, Any]:
    """run_federation, leaving the reason in the run folder when the run has to stop (in deployment the
    ServerApp's exceptions do not reach `fedtune-coordinator start`: Flower runs it in another process)."""
    (cfg.out_dir / STOPPED_FILE).unlink(missing_ok=True)
    try:
        return run_federation(grid, cfg, num_clients, evaluator, observer)
    except (RoundFailed, JoinTimeout, CheckpointError) as err:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(cfg.out_dir / STOPPED_FILE, {"reason": str(err)})
        raise


def make_server_app(
    cfg: CoordinatorConfig, num_clients: int, evaluator: Evaluator | None = None, observer: UpdateObserver | None = None
) -> ServerApp:
    """A ServerApp that waits for `num_clients` clients and runs the configured federation (`run_federation`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        federate(grid, cfg, num_clients, evaluator, observer)

    return app
