"""Strategies: Flower's FedAvg/FedProx/FedAdam, wrapped to track every client's privacy report."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from coordinator.config import CoordinatorConfig
from coordinator.validation import update_problem
from privacy import epsilon_spent
from privacy.update_codec import UpdateCodecError, dequantize

ClientReport = dict[str, float]
# Called once per round with each replying client's id and its train metrics (epsilon, declined, ...).
ReportSink = Callable[[int, dict[int, ClientReport]], None]
# Called with (round, client id, reason) for every update kept out of aggregation as invalid.
RejectionSink = Callable[[int, int, str], None]


def aggregate_train_metrics(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean training loss, and the largest epsilon any client has reached."""
    metrics = [r["metrics"] for r in replies]
    weights = np.array([m[weight_key] for m in metrics], dtype=float)
    out = {"train-loss": float(np.average([m["train-loss"] for m in metrics], weights=weights))}
    eps = [m["epsilon"] for m in metrics if "epsilon" in m]
    return MetricRecord(out | ({"max-epsilon": float(max(eps))} if eps else {}))


def aggregate_evaluate_metrics(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Pool the clients' confusion matrices, so accuracy and macro-F1 are those of all local examples."""
    # Pooled over examples whatever weight aggregation uses (central DP weighs clients equally).
    metrics = [r["metrics"] for r in replies if r["metrics"]["num-examples"] > 0 and "confusion" in r["metrics"]]
    if not metrics:
        return MetricRecord({})
    k = int(round(len(metrics[0]["confusion"]) ** 0.5))
    confusion = np.sum([np.reshape(m["confusion"], (k, k)) for m in metrics], axis=0)
    tp, predicted, actual = np.diag(confusion), confusion.sum(0), confusion.sum(1)
    f1 = np.divide(2 * tp, predicted + actual, out=np.zeros(k), where=(predicted + actual) > 0)
    weights = [m["num-examples"] for m in metrics]
    return MetricRecord(
        {
            "loss": float(np.average([m["loss"] for m in metrics], weights=weights)),
            "accuracy": float(tp.sum() / confusion.sum()),
            "macro-f1": float(f1.mean()),
            "num-examples": int(confusion.sum()),
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

    With central DP, Flower's server-side fixed-clipping wrapper clips each update to
    `central_clipping_norm` and adds Gaussian noise with std z * C / (clients sampled) to the average,
    which is only the right sensitivity if every client weighs the same: so clients are weighted
    equally ("unit-weight") instead of by example count.
    """
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=min(cfg.min_clients, num_available),
        min_evaluate_nodes=min(cfg.min_clients, num_available) if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=num_available,
        train_metrics_aggr_fn=aggregate_train_metrics,
        evaluate_metrics_aggr_fn=aggregate_evaluate_metrics,
    )
    if cfg.central_dp:
        common["weighted_by_key"] = "unit-weight"
        inner: Strategy = FedProx(**common, proximal_mu=cfg.proximal_mu) if cfg.strategy == "fedprox" else FedAvg(**common)
        return DifferentialPrivacyServerSideFixedClipping(
            inner,
            noise_multiplier=cfg.central_noise_multiplier,
            clipping_norm=cfg.central_clipping_norm,
            num_sampled_clients=sampled_per_round(cfg, num_available),
        )
    if cfg.strategy == "fedprox":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
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


class PrivacyTracking(Strategy):
    """Wraps a strategy: records each client's privacy report, and keeps declined clients and invalid
    updates (see coordinator/validation.py) out of aggregation."""

    def __init__(
        self, inner: Strategy, sink: ReportSink, rejections: RejectionSink | None = None, max_update_norm: float = 1e4
    ) -> None:
        self.inner = inner
        self.sink = sink
        self.rejections = rejections or (lambda r, cid, why: None)
        self.max_update_norm = max_update_norm
        self.current: ArrayRecord | None = None

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.current = arrays  # what every update must match
        return self.inner.configure_train(server_round, arrays, config, grid)

    def _valid(self, server_round: int, msg: Message) -> bool:
        if msg.has_error() or msg.content["metrics"].get("declined", 0) or self.current is None:
            return True  # errors are Flower's to count; declined replies are dropped separately
        cid = int(msg.content["metrics"].get("client-id", msg.metadata.src_node_id))
        arrays, problem = self._decoded(msg)
        if problem is None:
            problem = "no weights in the reply" if arrays is None else update_problem(arrays, self.current, self.max_update_norm)
        if problem:
            self.rejections(server_round, cid, problem)
        return problem is None

    def _decoded(self, msg: Message) -> tuple[ArrayRecord | None, str | None]:
        """The reply's weights as float tensors: an 8-bit update is decoded here, in place, because Flower's
        strategies expect exactly one ArrayRecord of weights per reply."""
        records = msg.content.array_records
        arrays = records.get("arrays")
        if arrays is None or "scales" not in records or self.current is None:
            return arrays, None
        scales = records["scales"]
        del msg.content["scales"]
        try:
            weights = dequantize(
                {k: a.numpy() for k, a in arrays.items()},
                {k: a.numpy() for k, a in scales.items()},
                {k: a.numpy() for k, a in self.current.items()},
            )
        except UpdateCodecError as err:
            return None, f"8-bit update: {err}"
        msg.content["arrays"] = decoded = ArrayRecord({k: Array(v) for k, v in weights.items()})
        return decoded, None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        self.sink(server_round, {int(m.content["metrics"]["client-id"]): dict(m.content["metrics"]) for m in ok})
        # A declined client sends no weights; averaging it in would drag the model back.
        kept = [m for m in replies if m.has_error() or not m.content["metrics"].get("declined", 0)]
        kept = [m for m in kept if self._valid(server_round, m)]
        if not any(not m.has_error() for m in kept):
            return None, None  # nobody trained: keep the current global model
        arrays, metrics = self.inner.aggregate_train(server_round, kept)
        if arrays is not None and self.current is not None:
            # Server optimisers (FedAdam) compute in float64; the global model keeps its own dtypes,
            # or every later update would fail validation.
            arrays = ArrayRecord(
                {k: Array(a.numpy().astype(self.current[k].numpy().dtype, copy=False)) for k, a in arrays.items()}
            )
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
