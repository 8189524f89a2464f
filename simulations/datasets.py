"""Where simulated clients' data comes from: the embedded VADER lexicon, a local file or a hub dataset, partitioned."""

from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import datasets
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner, ShardPartitioner

from fedtune.client.data import DataError, infer_labels, load_examples, to_examples

EMBEDDED = "vader"
PARTITIONINGS = ("iid", "dirichlet", "shard")


def vader_examples() -> tuple[datasets.Dataset, tuple[str, ...]]:
    """The VADER sentiment lexicon (7,520 words, emoticons and slang, each rated by 10 people, MIT).

    It ships inside the vaderSentiment wheel, so the default run needs no network. A token whose
    mean rating is above zero is `positive`, below zero `negative` (no entry is rated exactly 0).
    """
    text = (importlib.resources.files("vaderSentiment") / "vader_lexicon.txt").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line.strip()]
    rows = [(token, float(mean)) for token, mean, *_ in rows if float(mean) != 0.0]
    return (
        datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [int(m > 0) for _, m in rows]}),
        ("negative", "positive"),
    )


@dataclass(frozen=True)
class DataSpec:
    """The simulated federation's data: source, columns, held-out share and partitioning."""

    dataset: str = EMBEDDED
    text_column: str = "text"
    label_column: str = "label"
    labels: tuple[str, ...] = ()
    test_fraction: float = 0.15
    test_dataset: str = ""
    partitioning: str = "dirichlet"
    alpha: float = 0.5
    shards_per_client: int = 2
    num_clients: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.partitioning not in PARTITIONINGS:
            raise DataError(f"partitioning must be one of {', '.join(PARTITIONINGS)}, got {self.partitioning!r}")
        if not 0 < self.test_fraction < 1:
            raise DataError(f"test fraction must be in (0, 1), got {self.test_fraction}")
        if self.alpha <= 0:
            raise DataError(f"dirichlet alpha must be > 0, got {self.alpha}")
        if self.num_clients < 1:
            raise DataError(f"number of clients must be >= 1, got {self.num_clients}")


def load_source(spec: DataSpec) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """All examples (columns text, label) and the label names."""
    if spec.dataset == EMBEDDED:
        return vader_examples()
    if Path(spec.dataset).exists() or Path(spec.dataset).suffix.lower() in (
        ".csv",
        ".tsv",
        ".jsonl",
        ".json",
        ".parquet",
    ):
        return load_examples(spec.dataset, spec.labels or None, spec.text_column, spec.label_column)
    try:  # a hub dataset name, for users with internet access
        table = datasets.load_dataset(spec.dataset, split="train")
    except Exception as err:
        raise DataError(
            f"{spec.dataset!r} is neither 'vader', an existing file, nor a loadable Hugging Face hub dataset "
            f"(no internet?): {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    labels = spec.labels or infer_labels(table, spec.label_column, spec.dataset)
    return to_examples(table, labels, spec.text_column, spec.label_column, spec.dataset), labels


@functools.lru_cache(maxsize=2)
def split(spec: DataSpec) -> tuple[datasets.Dataset, datasets.Dataset, tuple[str, ...]]:
    """(clients' pool, coordinator's held-out split, labels), stratified and seeded; cached per process.

    With `test_dataset` the held-out split is that file (a published dev set, say) and the whole source is
    the clients' pool.
    """
    datasets.disable_progress_bars()  # also in Ray workers, whose output reaches the user's terminal
    examples, labels = load_source(spec)
    examples = examples.cast_column("label", datasets.ClassLabel(names=list(labels)))
    if spec.test_dataset:
        held, _ = load_examples(spec.test_dataset, labels, spec.text_column, spec.label_column)
        return examples, held.cast_column("label", examples.features["label"]), labels
    parts = examples.train_test_split(test_size=spec.test_fraction, stratify_by_column="label", seed=spec.seed)
    return parts["train"], parts["test"], labels


def make_partitioner(spec: DataSpec) -> Partitioner:
    """The flwr-datasets partitioner that splits the pool among `num_clients`."""
    if spec.partitioning == "iid":
        return IidPartitioner(num_partitions=spec.num_clients)
    if spec.partitioning == "shard":
        return ShardPartitioner(
            num_partitions=spec.num_clients,
            partition_by="label",
            num_shards_per_partition=spec.shards_per_client,
            seed=spec.seed,
        )
    return DirichletPartitioner(
        num_partitions=spec.num_clients,
        partition_by="label",
        alpha=spec.alpha,
        min_partition_size=10,
        self_balancing=True,
        seed=spec.seed,
    )


@functools.lru_cache(maxsize=2)
def _partitioner(spec: DataSpec) -> Partitioner:
    partitioner = make_partitioner(spec)
    partitioner.dataset = split(spec)[0]
    return partitioner


@dataclass(frozen=True)
class PartitionData:
    """A simulated data holder's local data: partition `partition-id` of the pool (the client's DataFn)."""

    spec: DataSpec

    def __call__(self, node_config: dict) -> datasets.Dataset:
        return _partitioner(self.spec).load_partition(int(node_config["partition-id"]))

    def sizes(self) -> list[int]:
        return [len(_partitioner(self.spec).load_partition(i)) for i in range(self.spec.num_clients)]
