"""The Flower ClientApp: take global weights, train locally under DP-SGD, reply with weights and metrics only."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedtune.client import wire
from fedtune.client.config import ClientConfig
from fedtune.client.evaluate import evaluate
from fedtune.client.model import build_model, load_tokenizer, load_trainable_state, trainable_state
from fedtune.client.train import Encoded, encode, plan_round, projected_epsilon, round_lr_scale, train_round
from fedtune.privacy import History, epsilon_spent
from fedtune.privacy.ledger import Ledger, fingerprint_rows
from fedtune.privacy.update_codec import quantize

log = logging.getLogger("fedtune.client")

# Returns this node's own examples (columns `text`, `label`) given its Flower node config.
DataFn = Callable[[dict[str, Any]], datasets.Dataset]

_STATE_KEY = "fedtune-privacy"  # Context.state entry holding this node's accountant history
_ENCODED: dict[tuple, tuple[Encoded, Encoded, str]] = {}  # per-process cache: tokenise a node's data once


def client_id(context: Context) -> int:
    """The simulation partition id, else the node id: how results name this client (the coordinator checks it)."""
    return int(context.node_config.get("partition-id", wire.node_client_id(context.node_id)))


def _local_data(cfg: ClientConfig, data_fn: DataFn, node_config: dict[str, Any]) -> tuple[Encoded, Encoded, str]:
    """(training split, local evaluation split, the dataset's fingerprint), tokenised once per process."""
    key = (data_fn, tuple(sorted(node_config.items())), cfg.model.name, cfg.model.max_length, cfg.train)
    if key not in _ENCODED:
        examples = data_fn(node_config)
        tokenizer = load_tokenizer(cfg.model.name)
        if cfg.train.eval_fraction > 0 and examples.num_rows >= 10:
            split = examples.train_test_split(test_size=cfg.train.eval_fraction, seed=cfg.train.seed)
            train, held = split["train"], split["test"]
        else:
            train, held = examples, examples.select([])
        # Keyed by text and label *name*: the same file gives the same key whatever id order a run uses.
        fingerprint = fingerprint_rows((t, cfg.labels[y]) for t, y in zip(examples["text"], examples["label"]))
        _ENCODED[key] = (
            encode(train, tokenizer, cfg.model.max_length),
            encode(held, tokenizer, cfg.model.max_length),
            fingerprint,
        )
    return _ENCODED[key]


def load_history(context: Context) -> History:
    """This node's DP-SGD steps so far in this run, in Opacus' accountant format."""
    if _STATE_KEY not in context.state:
        return []
    rec = context.state[_STATE_KEY]
    return list(zip(rec["noise"], rec["rate"], rec["steps"]))


def save_history(context: Context, history: History) -> None:
    context.state[_STATE_KEY] = ConfigRecord(
        {
            "noise": [float(h[0]) for h in history],
            "rate": [float(h[1]) for h in history],
            "steps": [int(h[2]) for h in history],
        }
    )


def _history_metrics(history: History) -> dict[str, Any]:
    # The full (noise, rate, steps) history travels so that anyone can recompute the epsilon reported.
    noise, rate, steps = wire.HISTORY
    return {
        "steps": sum(h[2] for h in history),
        noise: [float(h[0]) for h in history],
        rate: [float(h[1]) for h in history],
        steps: [int(h[2]) for h in history],
    }


def _reply(
    msg: Message, metrics: dict[str, Any], arrays: ArrayRecord | None = None, scales: ArrayRecord | None = None
) -> Message:
    content = RecordDict({wire.METRICS: MetricRecord(metrics)})
    if arrays is not None:
        content[wire.ARRAYS] = arrays
    if scales is not None:  # an 8-bit update: see privacy/update_codec.py
        content[wire.SCALES] = scales
    return Message(content=content, reply_to=msg)


def handle_train(
    msg: Message,
    context: Context,
    cfg: ClientConfig,
    data_fn: DataFn,
    budgets: Mapping[int, float],
    ledger_path: str | None = None,
) -> Message:
    """One round: check the budget, train, and reply with trainable weights and aggregate metrics."""
    cid = client_id(context)
    budget = budgets.get(cid, cfg.privacy.budget)
    config = msg.content["config"]
    server_round, num_rounds = int(config["server-round"]), int(config["num-rounds"])
    train, _, fingerprint = _local_data(cfg, data_fn, dict(context.node_config))
    path = context.node_config.get("ledger") or ledger_path
    ledger = Ledger(str(path)) if path and cfg.privacy.enabled else None
    # With a ledger, privacy composes over every run ever made on this data; without, over this run.
    history = ledger.history(fingerprint) if ledger is not None else load_history(context)
    metrics: dict[str, Any] = {
        wire.CLIENT_ID: cid,
        wire.DP: int(cfg.privacy.enabled),
        wire.DECLINED: 0,
        "ledger": int(ledger is not None),
        wire.WEIGHT: 1,  # every client weighs the same in aggregation
        "max-grad-norm": cfg.privacy.max_grad_norm,
        "accountant-prv": int(cfg.privacy.accountant == "prv"),  # metrics hold numbers only: 0 = rdp
    }
    plan = None
    if cfg.privacy.enabled:
        plan = plan_round(len(train), cfg, num_rounds)
        metrics |= {
            "delta": cfg.privacy.delta,
            "noise-multiplier": plan.noise_multiplier,
            "sample-rate": plan.sample_rate,
            "budget-epsilon": budget,
        }
        if ledger is None:
            after = projected_epsilon(history, plan, cfg)
        else:
            # Record the round's cost before training: a crash may then over-count, never under-count.
            # The ledger records nothing when the round would exceed the budget.
            after = ledger.reserve(
                fingerprint,
                plan.as_history(),
                budget=budget,
                delta=cfg.privacy.delta,
                accountant=cfg.privacy.accountant,
                run_id=str(context.run_id),
                round_id=server_round,
            ).epsilon_after
        if after > budget:
            log.warning(
                "client %s declines round %s: epsilon would reach %.3f, over its budget %.3f",
                cid,
                server_round,
                after,
                budget,
            )
            spent = epsilon_spent(history, cfg.privacy.delta, cfg.privacy.accountant)
            declined = {wire.DECLINED: 1, wire.NUM_EXAMPLES: 0, wire.EPSILON: spent}
            return _reply(msg, metrics | declined | _history_metrics(history))
    model = build_model(cfg.model, cfg.labels)
    load_trainable_state(model, msg.content["arrays"].to_torch_state_dict())
    began = time.perf_counter()
    outcome = train_round(
        model,
        train,
        load_tokenizer(cfg.model.name),
        cfg,
        plan=plan,
        history=history,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        lr_scale=round_lr_scale(cfg.train.lr_schedule, server_round, num_rounds),
        seed=cfg.train.seed * 100_003 + cid * 1_009 + server_round,
    )
    save_history(context, outcome.history)
    # train-seconds: local compute of the round (DP wiring included), for the coordinator's efficiency figures.
    metrics |= {wire.NUM_EXAMPLES: len(train), wire.TRAIN_LOSS: outcome.mean_loss, "train-seconds": time.perf_counter() - began}
    if cfg.privacy.enabled:
        # The round spent what was projected: recompute only if it did not (a new mechanism costs an accountant call).
        planned = plan is not None and outcome.history == history + plan.as_history()
        eps = after if planned else epsilon_spent(outcome.history, cfg.privacy.delta, cfg.privacy.accountant)
        metrics |= {wire.EPSILON: eps, **_history_metrics(outcome.history)}
        log.info(
            "client %s round %s: epsilon %.3f of %.3f (delta %g, %s)",
            cid,
            server_round,
            eps,
            budget,
            cfg.privacy.delta,
            cfg.privacy.accountant,
        )
    return _reply(msg, metrics, *_encode(trainable_state(model), msg.content["arrays"], config, seed=cid * 1_009 + server_round))


def _encode(state: dict[str, torch.Tensor], base: ArrayRecord, config: ConfigRecord, seed: int) -> tuple[ArrayRecord, ...]:
    """The weights to send, as the coordinator asked: float32 as they are, or an 8-bit quantised difference."""
    if str(config.get("update-encoding", "float32")) != "int8":
        return (ArrayRecord(state),)
    codes, scales = quantize({k: v.numpy() for k, v in state.items()}, {k: a.numpy() for k, a in base.items()}, seed)
    return ArrayRecord({k: Array(v) for k, v in codes.items()}), ArrayRecord({k: Array(v) for k, v in scales.items()})


def handle_evaluate(msg: Message, context: Context, cfg: ClientConfig, data_fn: DataFn) -> Message:
    """Evaluate the global model on this node's held-back local split; reply with metrics only."""
    _, held, _ = _local_data(cfg, data_fn, dict(context.node_config))
    metrics: dict[str, Any] = {wire.CLIENT_ID: client_id(context), wire.NUM_EXAMPLES: len(held), wire.WEIGHT: 1}
    if held:
        model = build_model(cfg.model, cfg.labels)
        load_trainable_state(model, msg.content["arrays"].to_torch_state_dict())
        metrics |= evaluate(model, held, load_tokenizer(cfg.model.name), 64, cfg.train.torch_device())
    return _reply(msg, metrics)


def make_client_app(
    cfg: ClientConfig,
    data_fn: DataFn,
    budgets: Mapping[int, float] | None = None,
    mods: Sequence[Mod] = (),
    ledger: str | None = None,
) -> ClientApp:
    """The ClientApp for data holders whose examples `data_fn` loads on their own host.

    `budgets` overrides the epsilon budget of individual clients (by client id); `mods` are
    Flower client mods applied to every message; `ledger` is a privacy ledger file shared by the
    simulated data holders (each keyed by its data's fingerprint).
    """
    app = ClientApp(mods=list(mods))
    budgets = dict(budgets or {})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, cfg, data_fn, budgets, ledger)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, cfg, data_fn)

    return app
