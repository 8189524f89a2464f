"""What a client's train and evaluate replies hold: their records and metrics, with types and ranges."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import ArrayRecord, MetricRecord, RecordDict

METRICS, ARRAYS, SCALES = "metrics", "arrays", "scales"  # a reply's records (scales: an 8-bit update's)
CLIENT_ID, NUM_EXAMPLES, DECLINED, WEIGHT = "client-id", "num-examples", "declined", "unit-weight"
DP, TRAIN_LOSS, EPSILON, LOSS, CONFUSION = "dp", "train-loss", "epsilon", "loss", "confusion"
HISTORY = ("history-noise", "history-rate", "history-steps")  # Opacus' (noise, rate, steps), one entry a round
MAX_ID = 2**53 - 1  # ids and counts stay exact in JSON


def node_client_id(node_id: int) -> int:
    """A client's id when nothing else names it: its node id, cut to 53 bits (Flower's are unsigned 64-bit)."""
    return node_id % 2**53


@dataclass(frozen=True)
class Metric:
    """One metric's type and range: finite, low <= value <= high, a single value or a list of them."""

    kind: type[int] | type[float]
    low: float = 0.0
    high: float = math.inf
    many: bool = False


FLAG, COUNT, AMOUNT, SHARE = Metric(int, 0, 1), Metric(int, 0, MAX_ID), Metric(float), Metric(float, 0.0, 1.0)

COMMON = {CLIENT_ID: COUNT, NUM_EXAMPLES: COUNT, WEIGHT: Metric(int, 1, 1)}  # every client weighs the same
TRAIN: dict[str, Metric] = COMMON | {
    DECLINED: FLAG,
    DP: FLAG,
    "ledger": FLAG,
    "accountant-prv": FLAG,
    "max-grad-norm": AMOUNT,
    TRAIN_LOSS: AMOUNT,
    "train-seconds": AMOUNT,
    EPSILON: AMOUNT,
    "delta": SHARE,
    "noise-multiplier": AMOUNT,
    "sample-rate": SHARE,
    "budget-epsilon": AMOUNT,
    "steps": COUNT,
    HISTORY[0]: Metric(float, many=True),
    HISTORY[1]: Metric(float, 0.0, 1.0, many=True),
    HISTORY[2]: Metric(int, 0, MAX_ID, many=True),
}
# A DP client's privacy report, trained or declined: enough for anyone to recompute its epsilon.
PRIVACY = (EPSILON, "delta", "noise-multiplier", "sample-rate", "budget-epsilon", "steps", *HISTORY)
EVALUATE: dict[str, Metric] = COMMON | {
    LOSS: AMOUNT,
    "accuracy": SHARE,
    "macro-f1": SHARE,
    "precision": Metric(float, 0.0, 1.0, many=True),
    "recall": Metric(float, 0.0, 1.0, many=True),
    CONFUSION: Metric(float, 0.0, MAX_ID, many=True),
}


def _value_problem(key: str, value: object, spec: Metric) -> str | None:
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) != spec.many:
        return f"metric '{key}' must be {'a list' if spec.many else 'a single value'}"
    for v in values:
        # bool is an int to Python, not to MetricRecord; a float field may carry an int.
        if isinstance(v, bool) or not isinstance(v, int if spec.kind is int else (int, float)):
            return f"metric '{key}' must hold {spec.kind.__name__} values, not {type(v).__name__}"
        if not math.isfinite(v) or not spec.low <= v <= spec.high:
            return f"metric '{key}' is {v}, outside [{spec.low:g}, {spec.high:g}]"
    return None


def _missing(metrics: MetricRecord, required: tuple[str, ...]) -> str | None:
    missing = [k for k in required if k not in metrics]
    return f"metrics lack {missing}" if missing else None


def _metrics_problem(content: RecordDict, specs: Mapping[str, Metric], required: tuple[str, ...]) -> str | None:
    metrics = content.get(METRICS)
    if not isinstance(metrics, MetricRecord):
        return f"no '{METRICS}' record of metrics"
    unknown = sorted(set(metrics) - set(specs))
    if unknown:
        return f"unknown metrics {unknown[:3]}"
    return _missing(metrics, required) or next((p for k, v in metrics.items() if (p := _value_problem(k, v, specs[k]))), None)


def _records_problem(content: RecordDict, allowed: Mapping[str, type]) -> str | None:
    for name, record in content.items():
        if name not in allowed:
            return f"unexpected record '{name}'"
        if not isinstance(record, allowed[name]):
            return f"record '{name}' is a {type(record).__name__}, expected a {allowed[name].__name__}"
    return None


def _identity_problem(metrics: MetricRecord, client_id: int) -> str | None:
    claimed = metrics[CLIENT_ID]
    return None if claimed == client_id else f"claims client-id {claimed}, but it comes from client {client_id}'s node"


def train_problem(content: RecordDict, client_id: int) -> str | None:
    """Why a train reply from client `client_id` (known from its node) is malformed, or None."""
    problem = _records_problem(content, {METRICS: MetricRecord, ARRAYS: ArrayRecord, SCALES: ArrayRecord})
    problem = problem or _metrics_problem(content, TRAIN, (CLIENT_ID, NUM_EXAMPLES, WEIGHT, DECLINED, DP))
    if problem:
        return problem
    metrics = content[METRICS]
    problem = _identity_problem(metrics, client_id) or (_missing(metrics, PRIVACY) if metrics[DP] else None)
    if problem:
        return problem
    lengths = [len(metrics.get(k, [])) for k in HISTORY]
    if len(set(lengths)) > 1:
        return f"privacy history lists differ in length {lengths}"
    if metrics[DECLINED]:
        return None
    return _missing(metrics, (TRAIN_LOSS,)) or (None if ARRAYS in content else f"no weights (no '{ARRAYS}' record)")


def evaluate_problem(content: RecordDict, client_id: int, num_labels: int | None = None) -> str | None:
    """Why an evaluate reply from client `client_id` is malformed, or None; `num_labels` sizes its confusion matrix."""
    problem = _records_problem(content, {METRICS: MetricRecord})
    problem = problem or _metrics_problem(content, EVALUATE, (CLIENT_ID, NUM_EXAMPLES, WEIGHT))
    if problem:
        return problem
    metrics = content[METRICS]
    if problem := _identity_problem(metrics, client_id):
        return problem
    if metrics[NUM_EXAMPLES] == 0:
        return None
    if problem := _missing(metrics, (LOSS, CONFUSION)):
        return problem
    confusion = metrics[CONFUSION]
    k = num_labels or math.isqrt(len(confusion))
    if len(confusion) != k * k or any(c != int(c) for c in confusion):
        return f"confusion matrix is not {k}x{k} counts"
    if sum(confusion) != metrics[NUM_EXAMPLES]:
        return f"confusion matrix counts {sum(confusion):g} examples, the reply claims {metrics[NUM_EXAMPLES]}"
    return None
