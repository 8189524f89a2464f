"""What travels between client and coordinator, defined once: names, types and ranges, encoded and checked here.

Both sides build and read messages only through `Task`, `TrainReply` and `EvaluateReply`; a reply that does not
decode raises `WireError`, whose text the coordinator records as the reason it rejected the reply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtune.client.update_codec import ENCODINGS, Layout, Tensors, UpdateCodecError, dequantize, flatten, quantize, unflatten
from fedtune.privacy.accounting import ACCOUNTANTS, DEFAULT_ACCOUNTANT, History

# Records of a message. A task holds ARRAYS and CONFIG, a train reply METRICS and ARRAYS, an evaluate reply METRICS.
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
# Arrays inside ARRAYS: the weights laid flat (see client/update_codec.py); an 8-bit update adds per-tensor scales.
WEIGHTS, SCALES = "weights", "scales"

# Config keys of a task. Flower's strategies set "server-round", and FedProx "proximal-mu", under these names.
SERVER_ROUND, NUM_ROUNDS, PROXIMAL_MU, UPDATE_ENCODING = "server-round", "num-rounds", "proximal-mu", "update-encoding"
# The flat weights' layout: tensor names, their dimensions end to end, each tensor's rank, and dtypes.
WEIGHT_NAMES, WEIGHT_DIMS, WEIGHT_RANKS, WEIGHT_DTYPES = "weight-names", "weight-dims", "weight-ranks", "weight-dtypes"

# Metric keys of the replies.
CLIENT_ID, NUM_EXAMPLES, WEIGHT, DECLINED, DP = "client-id", "num-examples", "unit-weight", "declined", "dp"
TRAIN_LOSS, TRAIN_SECONDS = "train-loss", "train-seconds"
EPSILON, DELTA, BUDGET_EPSILON, STEPS = "epsilon", "delta", "budget-epsilon", "steps"
NOISE, RATE = "noise-multiplier", "sample-rate"  # this round's plan
ACCOUNTANT, MAX_GRAD_NORM, LEDGER = "accountant", "max-grad-norm", "ledger"  # accountant: its index in ACCOUNTANTS
HISTORY = ("history-noise", "history-rate", "history-steps")  # Opacus' (noise, rate, steps), one entry a mechanism
LOSS, ACCURACY, MACRO_F1, PRECISION, RECALL, CONFUSION = "loss", "accuracy", "macro-f1", "precision", "recall", "confusion"
# A causal LM's evaluation: LOSS is the mean negative log-likelihood per scored token, over TOKENS tokens.
# PERPLEXITY (exp of it) and TOKENS_PER_SECOND are the coordinator's figures; they never travel.
TOKENS, PERPLEXITY, TOKENS_PER_SECOND = "tokens", "perplexity", "tokens-per-second"
MAX_ID = 2**53 - 1  # ids and counts stay exact in JSON
MAX_EPSILON = "max-epsilon"  # the coordinator's train metrics of a round: the largest epsilon a client reports


class WireError(ValueError):
    """A message breaks the contract; the text says how (for a reply, its sender's fault)."""


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
# A loss (per example, or per token) beyond 1e4 is no model's: a client claiming 1e308 would overflow pooled figures.
LOSS_VALUE = Metric(float, 0.0, 1e4)
SHARES = Metric(float, 0.0, 1.0, many=True)

COMMON = {CLIENT_ID: COUNT, NUM_EXAMPLES: COUNT, WEIGHT: Metric(int, 1, 1)}  # every client weighs the same
# A DP client's privacy report, trained or declined: enough for anyone to recompute its epsilon.
PRIVACY: dict[str, Metric] = {
    EPSILON: AMOUNT,
    DELTA: SHARE,
    BUDGET_EPSILON: AMOUNT,
    NOISE: AMOUNT,
    RATE: SHARE,
    STEPS: COUNT,
    ACCOUNTANT: Metric(int, 0, len(ACCOUNTANTS) - 1),
    MAX_GRAD_NORM: AMOUNT,
    LEDGER: FLAG,
    HISTORY[0]: Metric(float, many=True),
    HISTORY[1]: SHARES,
    HISTORY[2]: Metric(int, 0, MAX_ID, many=True),
}
TRAIN: dict[str, Metric] = COMMON | {DECLINED: FLAG, DP: FLAG, TRAIN_LOSS: LOSS_VALUE, TRAIN_SECONDS: AMOUNT} | PRIVACY
EVALUATE: dict[str, Metric] = COMMON | {
    LOSS: LOSS_VALUE,
    ACCURACY: SHARE,
    MACRO_F1: SHARE,
    PRECISION: SHARES,
    RECALL: SHARES,
    CONFUSION: Metric(float, 0.0, MAX_ID, many=True),
    TOKENS: COUNT,
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


def _check_missing(metrics: Mapping[str, Any], required: tuple[str, ...] | dict[str, Metric]) -> None:
    missing = [k for k in required if k not in metrics]
    if missing:
        raise WireError(f"metrics lack {missing}")


def _check_metrics(metrics: Mapping[str, Any], specs: Mapping[str, Metric], required: tuple[str, ...]) -> None:
    unknown = sorted(set(metrics) - set(specs))
    if unknown:
        raise WireError(f"unknown metrics {unknown[:3]}")
    _check_missing(metrics, required)
    if problem := next((p for k, v in metrics.items() if (p := _value_problem(k, v, specs[k]))), None):
        raise WireError(problem)


def _check_records(content: RecordDict, allowed: Mapping[str, type]) -> None:
    for name, record in content.items():
        if name not in allowed:
            raise WireError(f"unexpected record '{name}'")
        if not isinstance(record, allowed[name]):
            raise WireError(f"record '{name}' is a {type(record).__name__}, expected a {allowed[name].__name__}")
    if METRICS in allowed and METRICS not in content:
        raise WireError(f"no '{METRICS}' record of metrics")


def _check_identity(metrics: Mapping[str, Any], client_id: int) -> None:
    claimed = metrics[CLIENT_ID]
    if claimed != client_id:
        raise WireError(f"claims client-id {claimed}, but it comes from client {client_id}'s node")


# --- the coordinator's task -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """What the coordinator sends each round, to train or to evaluate: the global weights and the round's settings."""

    server_round: int
    num_rounds: int
    weights: Tensors  # the global model's travelling tensors, by name
    proximal_mu: float = 0.0  # FedProx's proximal term; 0 for other strategies
    update_encoding: str = "float32"  # how the client sends its update back (ENCODINGS)

    @property
    def layout(self) -> Layout:
        return Layout.of(self.weights)

    def to_content(self) -> RecordDict:
        """The task as it travels: the weights as one flat array, their layout in the config."""
        layout = self.layout
        config = ConfigRecord(
            {
                SERVER_ROUND: self.server_round,
                NUM_ROUNDS: self.num_rounds,
                PROXIMAL_MU: float(self.proximal_mu),
                UPDATE_ENCODING: self.update_encoding,
                WEIGHT_NAMES: list(layout.names),
                WEIGHT_DIMS: [d for shape in layout.shapes for d in shape],
                WEIGHT_RANKS: [len(shape) for shape in layout.shapes],
                WEIGHT_DTYPES: list(layout.dtypes),
            }
        )
        return RecordDict({ARRAYS: ArrayRecord({WEIGHTS: Array(flatten(self.weights, layout))}), CONFIG: config})

    @classmethod
    def from_flower(cls, content: RecordDict) -> Task:
        """The task a Flower strategy built (named arrays, the config run_rounds gave it plus the strategy's keys)."""
        config = content[CONFIG]
        return cls(
            server_round=int(config[SERVER_ROUND]),
            num_rounds=int(config[NUM_ROUNDS]),
            weights={name: a.numpy() for name, a in content[ARRAYS].items()},
            proximal_mu=float(config.get(PROXIMAL_MU, 0.0)),  # only FedProx sets it
            update_encoding=str(config.get(UPDATE_ENCODING, ENCODINGS[0])),  # evaluation sends none
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> Task:
        """Decode a task as it arrives; WireError when it breaks the contract."""
        _check_records(content, {ARRAYS: ArrayRecord, CONFIG: ConfigRecord})
        if ARRAYS not in content or CONFIG not in content:
            raise WireError(f"a task needs an '{ARRAYS}' and a '{CONFIG}' record, got {sorted(content)}")
        config, arrays = content[CONFIG], content[ARRAYS]
        try:
            dims, ranks = [int(d) for d in config[WEIGHT_DIMS]], [int(r) for r in config[WEIGHT_RANKS]]
            if sum(ranks) != len(dims):
                raise WireError(f"the layout's ranks {sum(ranks)} and dimensions {len(dims)} disagree")
            ends = np.cumsum([0, *ranks])
            layout = Layout(
                tuple(str(n) for n in config[WEIGHT_NAMES]),
                tuple(tuple(dims[a:b]) for a, b in zip(ends[:-1], ends[1:])),
                tuple(str(d) for d in config[WEIGHT_DTYPES]),
            )
            if set(arrays) != {WEIGHTS}:
                raise WireError(f"a task's arrays must be exactly ['{WEIGHTS}'], got {sorted(arrays)}")
            task = cls(
                server_round=int(config[SERVER_ROUND]),
                num_rounds=int(config[NUM_ROUNDS]),
                weights=unflatten(arrays[WEIGHTS].numpy(), layout),
                proximal_mu=float(config[PROXIMAL_MU]),
                update_encoding=str(config[UPDATE_ENCODING]),
            )
        except KeyError as err:
            raise WireError(f"the task's config lacks {err}") from None
        except (UpdateCodecError, TypeError, ValueError) as err:
            raise WireError(f"the task is malformed: {err}") from None
        if task.update_encoding not in ENCODINGS or task.proximal_mu < 0 or not 1 <= task.server_round <= task.num_rounds:
            raise WireError(f"the task's settings are out of range: round {task.server_round} of {task.num_rounds}, "
                            f"proximal-mu {task.proximal_mu}, update-encoding {task.update_encoding!r}")  # fmt: skip
        return task


def train_config(num_rounds: int, proximal_mu: float, update_encoding: str) -> ConfigRecord:
    """The run's part of every training task's config (Flower's strategy adds the round)."""
    return ConfigRecord({NUM_ROUNDS: num_rounds, PROXIMAL_MU: float(proximal_mu), UPDATE_ENCODING: update_encoding})


def evaluate_config(num_rounds: int) -> ConfigRecord:
    """The run's part of every evaluation task's config (Flower's strategy adds the round)."""
    return ConfigRecord({NUM_ROUNDS: num_rounds})


# --- a client's update ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Update:
    """New weights as they travel: one flat array of floats, or of int8 codes with one float32 scale per tensor."""

    values: np.ndarray
    scales: np.ndarray | None = None  # present for an 8-bit update, one per tensor in the layout's order

    @classmethod
    def encode(cls, weights: Tensors, base: Tensors, encoding: str, seed: int = 0) -> Update:
        """`weights` (named, as the model holds them) in `encoding`; `base` is the task's global model."""
        layout = Layout.of(base)
        if encoding == "float32":
            return cls(flatten(weights, layout))
        codes, scales = quantize(weights, base, seed)
        return cls(flatten(codes, layout, np.dtype(np.int8)), np.array([scales[n][0] for n in layout.names], np.float32))

    def decode(self, base: Tensors) -> Tensors:
        """The new weights by name, in the global model's dtypes; UpdateCodecError when they do not fit `base`."""
        layout = Layout.of(base)
        if self.scales is None:
            return unflatten(self.values, layout)
        codes = unflatten(self.values, layout, cast=False)
        return dequantize(codes, {n: self.scales[i : i + 1] for i, n in enumerate(layout.names)}, base)

    def to_record(self) -> ArrayRecord:
        arrays = {WEIGHTS: Array(self.values)}
        if self.scales is not None:
            arrays[SCALES] = Array(self.scales)
        return ArrayRecord(arrays)

    @classmethod
    def from_record(cls, record: ArrayRecord, layout: Layout, encoding: str) -> Update:
        """Check the arrays' names, shapes and dtypes against the layout the task sent (values are checked later)."""
        if WEIGHTS not in record or not set(record) <= {WEIGHTS, SCALES}:
            raise WireError(f"the '{ARRAYS}' record must hold '{WEIGHTS}' (and '{SCALES}' if 8-bit), got {sorted(record)}")
        values, scales = _ndarray(record, WEIGHTS), _ndarray(record, SCALES) if SCALES in record else None
        if (scales is not None) != (encoding == "int8"):
            raise WireError(
                f"the task asked for a {encoding} update, the reply {'has' if scales is not None else 'lacks'} 8-bit scales"
            )
        expected = np.dtype(np.int8) if scales is not None else layout.dtype
        if values.shape != (layout.size,) or values.dtype != expected:
            raise WireError(f"the weights are {values.shape} {values.dtype}, expected ({layout.size},) {expected}")
        if scales is not None and (scales.shape != (len(layout.names),) or scales.dtype != np.float32):
            raise WireError(f"the scales are {scales.shape} {scales.dtype}, expected ({len(layout.names)},) float32")
        return cls(values, scales)


def _ndarray(record: ArrayRecord, name: str) -> np.ndarray:
    """An array of a received record as numpy; bytes that are not a plain numpy array are the sender's fault."""
    try:
        value = record[name].numpy()
    except Exception as err:  # Flower's deserialisation raises TypeError, ValueError, ... on hostile bytes
        raise WireError(f"array '{name}' does not decode ({type(err).__name__})") from None
    if not isinstance(value, np.ndarray):
        raise WireError(f"array '{name}' is a {type(value).__name__}, not an array")
    return value


# --- replies --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrivacyReport:
    """A DP client's spending over every round so far (over every run, with a ledger), enough to recompute it."""

    epsilon: float
    delta: float
    budget_epsilon: float
    noise_multiplier: float  # this round's plan
    sample_rate: float
    history: History  # Opacus' accountant history: (noise multiplier, sample rate, steps) per mechanism
    accountant: str = DEFAULT_ACCOUNTANT
    max_grad_norm: float = 1.0
    ledger: bool = False  # composed across runs on the same data

    @property
    def steps(self) -> int:
        return sum(int(h[2]) for h in self.history)

    def to_metrics(self) -> dict[str, Any]:
        noise, rate, steps = HISTORY
        return {
            EPSILON: float(self.epsilon),
            DELTA: float(self.delta),
            BUDGET_EPSILON: float(self.budget_epsilon),
            NOISE: float(self.noise_multiplier),
            RATE: float(self.sample_rate),
            STEPS: self.steps,
            ACCOUNTANT: ACCOUNTANTS.index(self.accountant),
            MAX_GRAD_NORM: float(self.max_grad_norm),
            LEDGER: int(self.ledger),
            noise: [float(h[0]) for h in self.history],
            rate: [float(h[1]) for h in self.history],
            steps: [int(h[2]) for h in self.history],
        }

    @classmethod
    def from_metrics(cls, m: Mapping[str, Any]) -> PrivacyReport:
        lengths = [len(m[k]) for k in HISTORY]
        if len(set(lengths)) > 1:
            raise WireError(f"privacy history lists differ in length {lengths}")
        history = [(float(z), float(q), int(n)) for z, q, n in zip(*(m[k] for k in HISTORY))]
        if sum(h[2] for h in history) != m[STEPS]:
            raise WireError(f"metric '{STEPS}' is {m[STEPS]}, but the privacy history holds {sum(h[2] for h in history)} steps")
        return cls(
            epsilon=float(m[EPSILON]),
            delta=float(m[DELTA]),
            budget_epsilon=float(m[BUDGET_EPSILON]),
            noise_multiplier=float(m[NOISE]),
            sample_rate=float(m[RATE]),
            history=history,
            accountant=ACCOUNTANTS[int(m[ACCOUNTANT])],
            max_grad_norm=float(m[MAX_GRAD_NORM]),
            ledger=bool(m[LEDGER]),
        )


@dataclass(frozen=True)
class TrainReply:
    """A client's answer to a training task: trained (an update and its loss) or declined; DP clients add privacy."""

    client_id: int
    declined: bool = False
    num_examples: int = 0
    train_loss: float | None = None  # required unless declined
    train_seconds: float | None = None  # local compute of the round (DP wiring included)
    privacy: PrivacyReport | None = None  # None: trained WITHOUT differential privacy
    update: Update | None = None  # required unless declined

    def metrics(self) -> dict[str, Any]:
        """The metrics as they travel (and as results.json records them)."""
        out: dict[str, Any] = {
            CLIENT_ID: self.client_id,
            NUM_EXAMPLES: self.num_examples,
            WEIGHT: 1,  # every client weighs the same in aggregation
            DECLINED: int(self.declined),
            DP: int(self.privacy is not None),
        }
        if self.train_loss is not None:
            out[TRAIN_LOSS] = float(self.train_loss)
        if self.train_seconds is not None:
            out[TRAIN_SECONDS] = float(self.train_seconds)
        return out | (self.privacy.to_metrics() if self.privacy is not None else {})

    def to_content(self) -> RecordDict:
        """The reply as it travels: its metrics and, unless it declined, its update."""
        content = RecordDict({METRICS: MetricRecord(self.metrics())})
        if self.update is not None:
            content[ARRAYS] = self.update.to_record()
        return content

    def to_message(self, reply_to: Message) -> Message:
        return Message(content=self.to_content(), reply_to=reply_to)

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any], update: Update | None = None) -> TrainReply:
        """A train report as recorded (results.json, a checkpoint) or received; WireError when malformed."""
        _check_metrics(metrics, TRAIN, (CLIENT_ID, NUM_EXAMPLES, WEIGHT, DECLINED, DP))
        if metrics[DP]:
            _check_missing(metrics, PRIVACY)
        if not metrics[DECLINED]:
            _check_missing(metrics, (TRAIN_LOSS,))
        return cls(
            client_id=int(metrics[CLIENT_ID]),
            declined=bool(metrics[DECLINED]),
            num_examples=int(metrics[NUM_EXAMPLES]),
            train_loss=float(metrics[TRAIN_LOSS]) if TRAIN_LOSS in metrics else None,
            train_seconds=float(metrics[TRAIN_SECONDS]) if TRAIN_SECONDS in metrics else None,
            privacy=PrivacyReport.from_metrics(metrics) if metrics[DP] else None,
            update=update,
        )

    @classmethod
    def from_message(cls, msg: Message, client_id: int, layout: Layout, encoding: str = "float32") -> TrainReply:
        """Decode a train reply from client `client_id` (known from its node) to a task of `layout` that asked for
        an `encoding` update; WireError if malformed. Reads the message, never changes it."""
        content = msg.content
        _check_records(content, {METRICS: MetricRecord, ARRAYS: ArrayRecord})
        metrics = dict(content[METRICS])
        _check_metrics(metrics, TRAIN, (CLIENT_ID, NUM_EXAMPLES, WEIGHT, DECLINED, DP))
        _check_identity(metrics, client_id)
        if metrics[DECLINED] and ARRAYS in content:
            raise WireError(f"a declined reply carries weights (an '{ARRAYS}' record)")
        if not metrics[DECLINED] and ARRAYS not in content:
            raise WireError(f"no weights (no '{ARRAYS}' record)")
        update = Update.from_record(content[ARRAYS], layout, encoding) if ARRAYS in content else None
        return cls.from_metrics(metrics, update)


@dataclass(frozen=True)
class EvaluateReply:
    """A client's evaluation of the global model on its local split; scores only when it has one."""

    client_id: int
    num_examples: int = 0
    loss: float | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    precision: list[float] | None = None
    recall: list[float] | None = None
    confusion: list[float] | None = None  # row-major counts, true label by predicted label
    tokens: int | None = None  # a causal LM's scored tokens (its loss is per token)

    @classmethod
    def from_scores(cls, client_id: int, num_examples: int, scores: Mapping[str, Any]) -> EvaluateReply:
        """From client/evaluate.py's scores, which use the metric names above."""
        return cls.from_metrics({CLIENT_ID: client_id, NUM_EXAMPLES: num_examples, WEIGHT: 1, **scores})

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {CLIENT_ID: self.client_id, NUM_EXAMPLES: self.num_examples, WEIGHT: 1}
        scores = {LOSS: self.loss, ACCURACY: self.accuracy, MACRO_F1: self.macro_f1}
        lists = {PRECISION: self.precision, RECALL: self.recall, CONFUSION: self.confusion}
        out |= {k: float(v) for k, v in scores.items() if v is not None}
        out |= {TOKENS: int(self.tokens)} if self.tokens is not None else {}
        return out | {k: [float(x) for x in v] for k, v in lists.items() if v is not None}

    def to_message(self, reply_to: Message) -> Message:
        return Message(content=RecordDict({METRICS: MetricRecord(self.metrics())}), reply_to=reply_to)

    @classmethod
    def from_metrics(cls, m: Mapping[str, Any], num_labels: int | None = None) -> EvaluateReply:
        """`num_labels`: the classifier's (0: a causal LM, which sends a per-token loss; None: as the reply says)."""
        _check_metrics(m, EVALUATE, (CLIENT_ID, NUM_EXAMPLES, WEIGHT))
        generative = num_labels == 0 or (num_labels is None and TOKENS in m)
        if generative:
            if m[NUM_EXAMPLES] > 0:
                _check_missing(m, (LOSS, TOKENS))
                if m[TOKENS] < 1:
                    raise WireError(f"{m[NUM_EXAMPLES]} rows scored, but no token")
            if extra := sorted(k for k in (ACCURACY, MACRO_F1, PRECISION, RECALL, CONFUSION) if k in m):
                raise WireError(f"a causal LM's evaluation has no {extra}")
        elif TOKENS in m:
            raise WireError(f"a classifier's evaluation has no '{TOKENS}'")
        elif m[NUM_EXAMPLES] > 0:
            _check_missing(m, (LOSS, CONFUSION))
            confusion = m[CONFUSION]
            k = num_labels or math.isqrt(len(confusion))
            if len(confusion) != k * k or any(c != int(c) for c in confusion):
                raise WireError(f"confusion matrix is not {k}x{k} counts")
            if sum(confusion) != m[NUM_EXAMPLES]:
                raise WireError(f"confusion matrix counts {sum(confusion):g} examples, the reply claims {m[NUM_EXAMPLES]}")

        def some(key: str) -> Any:
            return m.get(key)  # scores are optional: a client without a local split sends none

        return cls(int(m[CLIENT_ID]), int(m[NUM_EXAMPLES]), some(LOSS), some(ACCURACY), some(MACRO_F1), some(PRECISION),
                   some(RECALL), some(CONFUSION), some(TOKENS))  # fmt: skip

    @classmethod
    def from_message(cls, msg: Message, client_id: int, num_labels: int | None = None) -> EvaluateReply:
        """Decode an evaluate reply from client `client_id`; `num_labels` sizes its confusion matrix. WireError if
        malformed; reads the message, never changes it."""
        _check_records(msg.content, {METRICS: MetricRecord})
        metrics = dict(msg.content[METRICS])
        _check_metrics(metrics, EVALUATE, (CLIENT_ID, NUM_EXAMPLES, WEIGHT))
        _check_identity(metrics, client_id)
        return cls.from_metrics(metrics, num_labels)
