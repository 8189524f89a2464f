"""Strategies: Flower's FedAvg/FedProx/FedAdam/robust ones, behind the wire: every reply checked, every report kept."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from fedtune.client import wire
from fedtune.client.update_codec import Tensors
from fedtune.coordinator.config import CoordinatorConfig
from fedtune.coordinator.replies import (
    Rejected,
    accept_evaluate,
    accept_train,
    as_travelling,
    evaluation_for_aggregation,
    for_aggregation,
    in_dtypes_of,
    tensors,
)
from fedtune.privacy import epsilon_spent

ClientReport = dict[str, float]  # a train reply's metrics as the client sent them (wire.TrainReply.metrics)
# Called once per round with each replying client's id and its train metrics (epsilon, declined, ...).
ReportSink = Callable[[int, dict[int, ClientReport]], None]
# Called with (round, phase, client id, reason) for every reply kept out of aggregation as invalid.
RejectionSink = Callable[[int, str, int, str], None]
# Called with (round, client id, the global weights sent, the client's new weights) for every accepted update:
# exactly what the coordinator sees of a client (an empirical privacy audit scores it, simulations/audit.py).
UpdateObserver = Callable[[int, int, Tensors, Tensors], None]


def aggregate_train_metrics(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean training loss (CheckedStrategy adds the largest epsilon)."""
    metrics = [r[wire.METRICS] for r in replies]
    weights = np.array([m[weight_key] for m in metrics], dtype=float)
    return MetricRecord({wire.TRAIN_LOSS: float(np.average([m[wire.TRAIN_LOSS] for m in metrics], weights=weights))})


def aggregate_evaluate_metrics(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Pool the clients' confusion matrices, so accuracy and macro-F1 are those of all local examples; a causal
    LM's per-token losses, so perplexity is that of all local tokens."""
    # Pooled over examples (tokens) whatever weight aggregation uses (clients weigh the same in training).
    scored = [r[wire.METRICS] for r in replies if r[wire.METRICS][wire.NUM_EXAMPLES] > 0]
    if lm := [m for m in scored if wire.TOKENS in m and m[wire.TOKENS] > 0]:
        tokens = sum(int(m[wire.TOKENS]) for m in lm)
        loss = sum(m[wire.LOSS] * m[wire.TOKENS] for m in lm) / tokens
        return MetricRecord(
            {
                wire.LOSS: float(loss),
                wire.PERPLEXITY: float(np.exp(min(loss, 700.0))),
                wire.TOKENS: tokens,
                wire.NUM_EXAMPLES: int(sum(m[wire.NUM_EXAMPLES] for m in lm)),
            }
        )
    metrics = [m for m in scored if wire.CONFUSION in m]
    if not metrics:
        return MetricRecord({})
    k = int(round(len(metrics[0][wire.CONFUSION]) ** 0.5))
    confusion = np.sum([np.reshape(m[wire.CONFUSION], (k, k)) for m in metrics], axis=0)
    tp, predicted, actual = np.diag(confusion), confusion.sum(0), confusion.sum(1)
    f1 = np.divide(2 * tp, predicted + actual, out=np.zeros(k), where=(predicted + actual) > 0)
    weights = [m[wire.NUM_EXAMPLES] for m in metrics]
    return MetricRecord(
        {
            wire.LOSS: float(np.average([m[wire.LOSS] for m in metrics], weights=weights)),
            wire.ACCURACY: float(tp.sum() / confusion.sum()),
            wire.MACRO_F1: float(f1.mean()),
            wire.NUM_EXAMPLES: int(confusion.sum()),
        }
    )


def sampled_per_round(cfg: CoordinatorConfig, num_available: int) -> int:
    """How many clients train each round (Flower's own rule: the fraction, at least the minimum)."""
    return max(int(num_available * cfg.fraction_train), min(cfg.min_clients, num_available))


def client_level_epsilon(cfg: CoordinatorConfig, releases: int) -> float:
    """Central DP's epsilon after `releases` noisy aggregates, without amplification by sampling (as Flower)."""
    return epsilon_spent([(cfg.central_noise_multiplier, 1.0, releases)], cfg.central_delta, "rdp")


def build_strategy(cfg: CoordinatorConfig, num_available: int) -> Strategy:
    """The configured Flower strategy; it waits for `num_available` clients before sampling.

    Every client weighs the same (`unit-weight`, which a reply must state as exactly 1), never by the
    example count it claims: that count cannot be checked, and a client claiming 1e9 examples would
    otherwise decide the average alone. Central DP needs equal weights too: Flower's server-side
    fixed-clipping wrapper clips each update to `central_clipping_norm` and adds Gaussian noise with std
    z * C / (clients sampled) to the average, the right sensitivity only if every client weighs the same.
    """
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=min(cfg.min_clients, num_available),
        min_evaluate_nodes=min(cfg.min_clients, num_available) if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=num_available,
        weighted_by_key=wire.WEIGHT,
        train_metrics_aggr_fn=aggregate_train_metrics,
        evaluate_metrics_aggr_fn=aggregate_evaluate_metrics,
    )
    if cfg.central_dp:
        inner: Strategy = FedProx(**common, proximal_mu=cfg.proximal_mu) if cfg.strategy == "fedprox" else FedAvg(**common)
        return DifferentialPrivacyServerSideFixedClipping(
            inner,
            noise_multiplier=cfg.central_noise_multiplier,
            clipping_norm=cfg.central_clipping_norm,
            num_sampled_clients=sampled_per_round(cfg, num_available),
        )
    if cfg.strategy == "fedprox":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    if cfg.strategy == "fedavgm":
        return FedAvgM(**common, server_learning_rate=cfg.server_learning_rate, server_momentum=cfg.server_momentum)
    if cfg.strategy == "fedadam":
        return FedAdam(**common, eta=cfg.server_learning_rate, eta_l=cfg.server_learning_rate)
    # Robust aggregation against poisoned or broken updates (Flower's implementations).
    if cfg.strategy == "fedmedian":
        return FedMedian(**common)
    if cfg.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=cfg.trim_fraction)
    if cfg.strategy == "krum":
        return Krum(**common, num_malicious_nodes=cfg.num_malicious)
    if cfg.strategy == "multikrum":
        keep = max(1, sampled_per_round(cfg, num_available) - cfg.num_malicious)
        return MultiKrum(**common, num_malicious_nodes=cfg.num_malicious, num_nodes_to_select=keep)
    return FedAvg(**common)


class CheckedStrategy(Strategy):
    """A Flower strategy behind fedtune's wire (client/wire.py). Tasks go out as one flat array; every reply is
    untrusted input, decoded and checked (coordinator/replies.py), and reaches the strategy as a new message only
    if it is well formed, trained, and its update passes coordinator/validation.py. Each well-formed reply's
    report is recorded under the client its node is (`sink`); each rejected one, with its reason (`rejections`).
    """

    def __init__(
        self,
        inner: Strategy,
        sink: ReportSink,
        rejections: RejectionSink | None = None,
        max_update_norm: float = 1e4,
        client_of: Callable[[int], int] = wire.node_client_id,
        num_labels: int | None = None,
        max_length: int | None = None,
        observe: UpdateObserver | None = None,
    ) -> None:
        self.inner = inner
        self.sink = sink
        self.rejections = rejections or (lambda r, phase, cid, why: None)
        self.max_update_norm = max_update_norm
        # Who sent a reply is its authenticated source node, never what the reply says about itself.
        self.client_of = client_of
        self.num_labels = num_labels
        self.max_length = max_length  # tokens per row: bounds what a causal LM's evaluation may claim
        self.observe = observe
        self.current: ArrayRecord | None = None  # the global model of the round in progress
        self.encoding = "float32"  # the update encoding the round's task asked for

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.current = arrays  # what every update must match
        self.encoding = str(config.get(wire.UPDATE_ENCODING, "float32"))  # and how it must be encoded
        return as_travelling(self.inner.configure_train(server_round, arrays, config, grid))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.current is None:
            raise RuntimeError("aggregate_train before configure_train: no global model to check the updates against")
        base = tensors(self.current)
        kept: list[Message] = []
        reports: dict[int, wire.TrainReply] = {}
        for msg in replies:
            if msg.has_error():
                kept.append(msg)  # Flower counts it; the round loop lists it among the failures
                continue
            cid = self.client_of(msg.metadata.src_node_id)
            try:
                reply, weights = accept_train(msg, cid, base, self.max_update_norm, self.encoding)
            except Rejected as rejected:
                if rejected.reply is not None:  # well formed: its report is the client's own, though its update is not used
                    reports[cid] = rejected.reply
                self.rejections(server_round, "train", cid, str(rejected))
                continue
            reports[cid] = reply
            if weights is not None:  # a declined client sends none; averaging it in would drag the model back
                kept.append(for_aggregation(msg, reply, weights))
                if self.observe is not None:
                    self.observe(server_round, cid, base, weights)
        self.sink(server_round, {cid: reply.metrics() for cid, reply in reports.items()})
        trained = [self.client_of(m.metadata.src_node_id) for m in kept if not m.has_error()]
        if not trained:
            return None, None  # nobody trained: keep the current global model
        arrays, metrics = self.inner.aggregate_train(server_round, kept)
        if arrays is not None:
            arrays = in_dtypes_of(arrays, self.current)
        eps = [reports[cid].privacy.epsilon for cid in trained if reports[cid].privacy is not None]
        if metrics is not None and eps:
            metrics[wire.MAX_EPSILON] = float(max(eps))
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return as_travelling(self.inner.configure_evaluate(server_round, arrays, config, grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        kept: list[Message] = []
        for msg in replies:
            if msg.has_error():
                kept.append(msg)
                continue
            cid = self.client_of(msg.metadata.src_node_id)
            try:
                reply = accept_evaluate(msg, cid, self.num_labels, self.max_length)
            except Rejected as rejected:
                self.rejections(server_round, "evaluate", cid, str(rejected))
                continue
            if reply.num_examples > 0:  # a client without a local split has nothing to pool
                kept.append(evaluation_for_aggregation(msg, reply))
        return self.inner.aggregate_evaluate(server_round, kept)
