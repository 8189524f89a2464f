"""The deployed ClientApp: its model/training settings come from the run, its data and privacy from this node."""

from __future__ import annotations

import functools
import sys
from typing import Any

import datasets
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.client import wire
from fedtune.client.app import handle_evaluate, handle_train
from fedtune.client.config import ClientConfig, ModelSpec, PrivacySpec, TrainSpec
from fedtune.client.data import load_examples

# The run (chosen by the coordinator) fixes what is trained and how; the node (the data holder's own
# `fedtune-client start` flags) fixes which file is read and how much privacy may be spent.
RUN_KEYS = {
    "model": ("model", "name", str),
    "lora": ("model", "lora", bool),
    "lora-r": ("model", "lora_r", int),
    "max-length": ("model", "max_length", int),
    "pooler": ("model", "pooler", str),
    "optimizer": ("train", "optimizer", str),
    "learning-rate": ("train", "learning_rate", float),
    "head-learning-rate": ("train", "head_learning_rate", float),
    "batch-size": ("train", "batch_size", int),
    "local-epochs": ("train", "local_epochs", int),
    "lr-schedule": ("train", "lr_schedule", str),
    "seed": ("train", "seed", int),
}
NODE_KEYS = {
    "dp": ("privacy", "enabled", bool),
    "epsilon": ("privacy", "target_epsilon", float),
    "delta": ("privacy", "delta", float),
    "budget-epsilon": ("privacy", "budget_epsilon", float),
    "max-grad-norm": ("privacy", "max_grad_norm", float),
    "accountant": ("privacy", "accountant", str),
    "device": ("train", "device", str),
}


def _labels(run_config: dict[str, Any]) -> tuple[str, ...]:
    return tuple(x.strip() for x in str(run_config["labels"]).split(",") if x.strip())


def config_from_context(run_config: dict[str, Any], node_config: dict[str, Any]) -> ClientConfig:
    """This node's ClientConfig: model and training from the run, privacy and device from the node."""
    parts: dict[str, dict[str, Any]] = {"model": {}, "train": {}, "privacy": {}}
    for source, keys in ((run_config, RUN_KEYS), (node_config, NODE_KEYS)):
        for key, (part, name, kind) in keys.items():
            if key in source:
                parts[part][name] = kind(source[key])
    return ClientConfig(
        labels=_labels(run_config),
        model=ModelSpec(**parts["model"]),
        privacy=PrivacySpec(**parts["privacy"]),
        train=TrainSpec(**parts["train"]),
    )


@functools.lru_cache(maxsize=4)
def _read(path: str, labels: tuple[str, ...], text_column: str, label_column: str) -> datasets.Dataset:
    return load_examples(path, labels, text_column, label_column)[0]


@functools.cache
def node_data(labels: tuple[str, ...]):
    """The DataFn of a deployed node: its own file, named in its node config, read on its own host."""

    def data_fn(node_config: dict[str, Any]) -> datasets.Dataset:
        return _read(
            str(node_config["data-path"]),
            labels,
            str(node_config.get("text-column", "text")),
            str(node_config.get("label-column", "label")),
        )

    return data_fn


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = config_from_context(dict(context.run_config), dict(context.node_config))
    server_round = int(msg.content["config"]["server-round"])
    print(f"fedtune-client: round {server_round}: training", file=sys.stderr, flush=True)
    reply = handle_train(msg, context, cfg, node_data(cfg.labels), {})
    _show(reply, server_round)
    return reply


def _show(reply: Message, server_round: int) -> None:
    # The data holder watches its own spending; this goes to `fedtune-client`'s terminal, not to the coordinator.
    m = reply.content[wire.METRICS]
    if m.get(wire.DECLINED):
        text = f"round {server_round}: declined, the round would exceed the budget {m['budget-epsilon']:g}"
    elif wire.EPSILON in m:
        text = (
            f"round {server_round}: trained; epsilon {m[wire.EPSILON]:.3f} of budget {m['budget-epsilon']:g} "
            f"(delta {m['delta']:g})"
        )
    else:
        text = f"round {server_round}: trained WITHOUT differential privacy"
    print(f"fedtune-client: {text}", file=sys.stderr, flush=True)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = config_from_context(dict(context.run_config), dict(context.node_config))
    return handle_evaluate(msg, context, cfg, node_data(cfg.labels))
