"""Where simulated clients' data comes from: the embedded VADER lexicon, a local file or a hub dataset, partitioned."""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner, ShardPartitioner

from fedtune.client.config import ClientConfig, ColumnSpec, TrainSpec
from fedtune.client.data import DataError, load_data, table_examples
from fedtune.client.settings import check_choices, same, setting

EMBEDDED = "vader"
PARTITIONINGS = ("auto", "iid", "dirichlet", "shard")  # auto: dirichlet over labels; iid for a causal LM (no labels)


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

    dataset: str = setting(EMBEDDED, help="'vader' (embedded), a CSV/TSV/JSONL/Parquet file, or a hub dataset name")
    text_column: str = same(ColumnSpec, "text_column")
    label_column: str = same(ColumnSpec, "label_column")
    prompt_column: str = same(ColumnSpec, "prompt_column")
    response_column: str = same(ColumnSpec, "response_column")
    labels: tuple[str, ...] = same(ClientConfig, "labels", default=())  # (): inferred from the data
    test_fraction: float = setting(0.15, help="stratified share held out for central evaluation")
    test_dataset: str = setting(
        "",
        help="a separate file (same columns and labels) for the central evaluation, e.g. a dev set; "
        "all of --dataset is then shared among the clients",
    )
    partitioning: str = setting(
        "auto", choices=PARTITIONINGS, help="how the pool is split among clients (auto: dirichlet; iid for a causal LM)"
    )
    alpha: float = setting(0.5, help="Dirichlet concentration; smaller is more non-IID")
    shards_per_client: int = setting(2, help="shards per client for --partitioning shard")
    num_clients: int = setting(10, flag="--clients", help="number of simulated clients")
    seed: int = same(TrainSpec, "seed")

    def __post_init__(self) -> None:
        try:
            check_choices(self)
        except ValueError as err:
            raise DataError(str(err)) from None
        if not 0 < self.test_fraction < 1:
            raise DataError(f"test fraction must be in (0, 1), got {self.test_fraction}")
        if self.alpha <= 0:
            raise DataError(f"dirichlet alpha must be > 0, got {self.alpha}")
        if self.num_clients < 1:
            raise DataError(f"number of clients must be >= 1, got {self.num_clients}")

    @property
    def columns(self) -> ColumnSpec:
        return ColumnSpec(self.text_column, self.label_column, self.prompt_column, self.response_column)

    def partitioning_for(self, causal_lm: bool) -> str:
        """The partitioning used: "auto" is dirichlet over labels, iid for a causal LM, whose rows have none."""
        if causal_lm and self.partitioning in ("dirichlet", "shard"):
            raise DataError(f"--partitioning {self.partitioning} splits by label; a causal LM's rows have none (use iid)")
        if self.partitioning == "auto":
            return "iid" if causal_lm else "dirichlet"
        return self.partitioning


def load_source(spec: DataSpec, causal_lm: bool = False) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """All examples (columns text, label; a causal LM's text, or prompt and response) and the label names."""
    if spec.dataset == EMBEDDED:
        examples, labels = vader_examples()
        return (examples.remove_columns("label"), ()) if causal_lm else (examples, labels)
    if Path(spec.dataset).exists() or Path(spec.dataset).suffix.lower() in (
        ".csv",
        ".tsv",
        ".jsonl",
        ".json",
        ".parquet",
    ):
        return load_data(spec.dataset, spec.columns, spec.labels or None, causal_lm)
    try:  # a hub dataset name, for users with internet access
        table = datasets.load_dataset(spec.dataset, split="train")
    except Exception as err:
        raise DataError(
            f"{spec.dataset!r} is neither 'vader', an existing file, nor a loadable Hugging Face hub dataset "
            f"(no internet?): {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    return table_examples(table, spec.columns, spec.labels or None, causal_lm, spec.dataset)


def split(spec: DataSpec, causal_lm: bool = False) -> tuple[datasets.Dataset, datasets.Dataset, tuple[str, ...]]:
    """(clients' pool, coordinator's held-out split, labels), stratified and seeded.

    With `test_dataset` the held-out split is that file (a published dev set, say) and the whole source is
    the clients' pool.
    """
    datasets.disable_progress_bars()  # also in Ray workers, whose output reaches the user's terminal
    examples, labels = load_source(spec, causal_lm)
    if causal_lm:  # no labels to stratify by
        if spec.test_dataset:
            return examples, load_data(spec.test_dataset, spec.columns, None, True)[0], ()
        if examples.num_rows < 2:
            raise DataError(f"{spec.dataset}: {examples.num_rows} row; need at least 2 (one held out)")
        parts = examples.train_test_split(test_size=spec.test_fraction, seed=spec.seed)
        return parts["train"], parts["test"], ()
    examples = examples.cast_column("label", datasets.ClassLabel(names=list(labels)))
    if spec.test_dataset:
        held, _ = load_data(spec.test_dataset, spec.columns, labels)
        return examples, held.cast_column("label", examples.features["label"]), labels
    parts = examples.train_test_split(test_size=spec.test_fraction, stratify_by_column="label", seed=spec.seed)
    return parts["train"], parts["test"], labels


def make_partitioner(spec: DataSpec, causal_lm: bool = False) -> Partitioner:
    """The flwr-datasets partitioner that splits the pool among `num_clients`."""
    partitioning = spec.partitioning_for(causal_lm)
    if partitioning == "iid":
        return IidPartitioner(num_partitions=spec.num_clients)
    if partitioning == "shard":
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


class _Loaded:
    """What a PartitionData has loaded so far; empty until asked, emptied by `reset`."""

    def __init__(self) -> None:
        self.split: tuple[datasets.Dataset, datasets.Dataset, tuple[str, ...]] | None = None
        self.partitioner: Partitioner | None = None


@dataclass(frozen=True)
class PartitionData:
    """A simulated data holder's local data: partition `partition-id` of the pool (the client's DataFn).

    It loads the source once and keeps it (and the partitioning) itself: the copy Flower ships to each Ray
    worker carries what the driver loaded, so workers never read the source again, and two runs in one
    process share nothing. Equal (and hashing the same) by spec alone, as the client's tokenised-data cache
    expects of a DataFn.
    """

    spec: DataSpec
    causal_lm: bool = False  # rows of text (or prompt and response) for a causal LM, not labelled rows
    loaded: _Loaded = field(default_factory=_Loaded, compare=False, repr=False)

    def split(self) -> tuple[datasets.Dataset, datasets.Dataset, tuple[str, ...]]:
        if self.loaded.split is None:
            self.loaded.split = split(self.spec, self.causal_lm)
        return self.loaded.split

    def partitioner(self) -> Partitioner:
        if self.loaded.partitioner is None:
            partitioner = make_partitioner(self.spec, self.causal_lm)
            partitioner.dataset = self.split()[0]
            self.loaded.partitioner = partitioner
        return self.loaded.partitioner

    def reset(self) -> None:
        """Forget what was loaded; the next call reads the source again."""
        self.loaded.split = None
        self.loaded.partitioner = None

    def __call__(self, node_config: dict) -> datasets.Dataset:
        return self.partitioner().load_partition(int(node_config["partition-id"]))

    def sizes(self) -> list[int]:
        return [len(self.partitioner().load_partition(i)) for i in range(self.spec.num_clients)]
