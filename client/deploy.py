"""The deployed ClientApp: its model/training settings come from the run, its data and privacy from this node."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import datasets
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.client import wire
from fedtune.client.app import handle_evaluate, handle_train
from fedtune.client.config import ClientConfig, ColumnSpec, ModelSpec, PrivacySpec, TrainSpec
from fedtune.client.data import load_data
from fedtune.client.model_source import resolve_task
from fedtune.client.settings import NODE, RUN, coerce, from_flower, key, settings

# The run (chosen by the coordinator) fixes what is trained and how; the node (the data holder's own
# `fedtune-client start` flags) fixes which file is read and how much privacy may be spent. Which is which is
# each setting's scope (client/config.py); the Flower keys are the settings' keys with dashes.
LABELS = next(f for f in settings(ClientConfig) if key(f) == "labels")


def config_from_context(run_config: dict[str, Any], node_config: dict[str, Any]) -> ClientConfig:
    """This node's ClientConfig: model and training from the run, privacy and device from the node."""
    return ClientConfig(
        labels=coerce(LABELS, run_config["labels"]),
        model=resolve_task(ModelSpec(**from_flower(ModelSpec, run_config, RUN))),
        privacy=PrivacySpec(**from_flower(PrivacySpec, node_config, NODE)),
        train=TrainSpec(**from_flower(TrainSpec, run_config, RUN), **from_flower(TrainSpec, node_config, NODE)),
    )


class NodeFiles:
    """The data files this node has read, kept while its runtime lives (it serves many rounds and runs)."""

    KEEP = 4  # files kept; a node normally has one

    def __init__(self) -> None:
        self._read: dict[tuple[str, tuple[str, ...], str, str], datasets.Dataset] = {}

    def read(self, path: str, labels: tuple[str, ...], columns: ColumnSpec, causal_lm: bool) -> datasets.Dataset:
        k = (path, labels, columns, causal_lm)
        if k not in self._read:
            while len(self._read) >= self.KEEP:
                self._read.pop(next(iter(self._read)))
            self._read[k] = load_data(path, columns, labels, causal_lm)[0]
        return self._read[k]

    def reset(self) -> None:
        """Forget every file read; the next round reads its file again."""
        self._read.clear()


@dataclass(frozen=True)
class NodeData:
    """The DataFn of a deployed node: its own file, named in its node config, read on its own host.

    Equal (and hashing the same) by labels and task alone, as the client's tokenised-data cache expects of a DataFn.
    """

    labels: tuple[str, ...]
    files: NodeFiles = field(default_factory=NodeFiles, compare=False, repr=False)
    causal_lm: bool = False

    def __call__(self, node_config: dict[str, Any]) -> datasets.Dataset:
        columns = ColumnSpec(**from_flower(ColumnSpec, node_config, NODE))
        return self.files.read(str(node_config["data-path"]), self.labels, columns, self.causal_lm)


def make_app(files: NodeFiles | None = None) -> ClientApp:
    """fedtune's deployed ClientApp; `files` holds what it reads (a fresh holder unless given)."""
    files = files or NodeFiles()
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = config_from_context(dict(context.run_config), dict(context.node_config))
        server_round = int(msg.content[wire.CONFIG][wire.SERVER_ROUND])
        print(f"fedtune-client: round {server_round}: training", file=sys.stderr, flush=True)
        reply = handle_train(msg, context, cfg, NodeData(cfg.labels, files, cfg.model.causal_lm), {})
        _show(reply, server_round)
        return reply

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg = config_from_context(dict(context.run_config), dict(context.node_config))
        return handle_evaluate(msg, context, cfg, NodeData(cfg.labels, files, cfg.model.causal_lm))

    return client_app


def _show(reply: Message, server_round: int) -> None:
    # The data holder watches its own spending; this goes to `fedtune-client`'s terminal, not to the coordinator.
    r = wire.TrainReply.from_metrics(reply.content[wire.METRICS])
    if r.declined and r.privacy:
        text = f"round {server_round}: declined, the round would exceed the budget {r.privacy.budget_epsilon:g}"
    elif r.privacy:
        text = (
            f"round {server_round}: trained; epsilon {r.privacy.epsilon:.3f} of budget {r.privacy.budget_epsilon:g} "
            f"(delta {r.privacy.delta:g})"
        )
    else:
        text = f"round {server_round}: trained WITHOUT differential privacy"
    print(f"fedtune-client: {text}", file=sys.stderr, flush=True)


app = make_app()  # what Flower and client/runtime.py load: fedtune.client.deploy:app
