"""A node's own examples, split and tokenised once per process, kept for the next round in a bounded cache."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import datasets

from fedtune.client.config import ClientConfig
from fedtune.client.data import ledger_keys
from fedtune.client.model import load_tokenizer
from fedtune.client.train import Encoded, encode

# Returns this node's own examples (columns `text` and `label`; a causal LM's `text`, or `prompt` and `response`)
# given its Flower node config.
DataFn = Callable[[dict[str, Any]], datasets.Dataset]


@dataclass(frozen=True)
class LocalData:
    """A node's training split, its held-back local evaluation split, and its data's fingerprint (ledger key)."""

    train: Encoded
    held: Encoded
    fingerprint: str
    older_fingerprints: tuple[str, ...] = ()  # the same rows' keys in ledgers an earlier fedtune wrote


def prepare(cfg: ClientConfig, data_fn: DataFn, node_config: dict[str, Any]) -> LocalData:
    """Load, split and tokenise a node's examples."""
    examples = data_fn(node_config)
    tokenizer = load_tokenizer(cfg.model.name)
    if cfg.train.eval_fraction > 0 and examples.num_rows >= 10:
        split = examples.train_test_split(test_size=cfg.train.eval_fraction, seed=cfg.train.seed)
        train, held = split["train"], split["test"]
    else:
        train, held = examples, examples.select([])
    fingerprint, older = ledger_keys(examples, cfg.labels)
    train_rows, held_rows = encode(train, tokenizer, cfg.model.max_length), encode(held, tokenizer, cfg.model.max_length)
    return LocalData(train_rows, held_rows, fingerprint, older)


class LocalDataCache:
    """Each node's LocalData, least recently used dropped first once `max_nodes` are held."""

    def __init__(self, max_nodes: int) -> None:
        self.max_nodes = max_nodes
        self._entries: OrderedDict[Hashable, LocalData] = OrderedDict()
        self._lock = threading.Lock()  # Flower may run a process's messages on several threads

    def get(self, cfg: ClientConfig, data_fn: DataFn, node_config: dict[str, Any]) -> LocalData:
        key = (data_fn, tuple(sorted(node_config.items())), cfg.model.name, cfg.model.max_length, cfg.train, cfg.labels)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        data = prepare(cfg, data_fn, node_config)
        with self._lock:
            self._entries[key] = data
            while len(self._entries) > self.max_nodes:
                self._entries.popitem(last=False)
        return data

    def reset(self) -> None:
        """Forget every node's data: the next round tokenises again (benchmarks measure that cost this way)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


# One per process, because Flower hands a simulation's ClientApp to its Ray workers anew for every message: only
# process state outlives a message. A worker serves every simulated node in turn (P2: 100 clients on 2 workers, 50
# each), so it holds 256 nodes; a deployed client process holds one.
NODE_DATA = LocalDataCache(max_nodes=256)
