"""The coordinator's end of the wire: tasks out in the wire format, each untrusted reply decoded and checked."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedtune.client import wire
from fedtune.client.update_codec import Layout, Tensors, UpdateCodecError
from fedtune.coordinator.validation import update_problem


class Rejected(ValueError):
    """A reply kept out of aggregation; the text is the reason recorded for its client. `reply` is set when the
    reply itself was well formed and only its update failed: its privacy report is still the client's own."""

    def __init__(self, reason: str, reply: wire.TrainReply | None = None) -> None:
        super().__init__(reason)
        self.reply = reply


def as_travelling(messages: Iterable[Message]) -> list[Message]:
    """Flower's task messages (named arrays) as they travel (one flat array, its layout in the config).

    Flower's strategies give every message of a round the same content, so it is encoded once.
    """
    out, encoded = list(messages), {}
    for msg in out:
        key = id(msg.content)
        if key not in encoded:
            encoded[key] = wire.Task.from_flower(msg.content).to_content()
        msg.content = encoded[key]  # our own outgoing message, not a received one
    return out


def accept_train(
    msg: Message, client_id: int, base: Tensors, max_update_norm: float, encoding: str = "float32"
) -> tuple[wire.TrainReply, Tensors | None]:
    """The decoded reply and, unless it declined, its new weights by name; Rejected when either must not be used."""
    try:
        reply = wire.TrainReply.from_message(msg, client_id, Layout.of(base), encoding)
    except wire.WireError as err:
        raise Rejected(f"reply rejected: {err}") from None
    except Exception as err:  # a reply is untrusted input: whatever it breaks is its sender's fault, never a crash
        raise Rejected(f"reply rejected: undecodable ({type(err).__name__})") from None
    if reply.update is None:
        return reply, None
    try:
        weights = reply.update.decode(base)
    except UpdateCodecError as err:
        raise Rejected(f"update rejected: 8-bit update: {err}", reply) from None
    if problem := update_problem(weights, base, max_update_norm):
        raise Rejected(f"update rejected: {problem}", reply)
    return reply, weights


def accept_evaluate(
    msg: Message, client_id: int, num_labels: int | None, max_tokens_per_example: int | None = None
) -> wire.EvaluateReply:
    """The decoded evaluation; Rejected when malformed, or when a causal LM's reply claims more scored tokens than
    its rows can hold (`max_tokens_per_example`: the run's max length), which would outweigh every honest client."""
    try:
        reply = wire.EvaluateReply.from_message(msg, client_id, num_labels)
    except wire.WireError as err:
        raise Rejected(f"reply rejected: {err}") from None
    except Exception as err:  # as for training: the sender's fault, never a crash
        raise Rejected(f"reply rejected: undecodable ({type(err).__name__})") from None
    if max_tokens_per_example and reply.tokens is not None and reply.tokens > reply.num_examples * max_tokens_per_example:
        raise Rejected(
            f"reply rejected: {reply.tokens} tokens scored in {reply.num_examples} rows of at most {max_tokens_per_example}"
        )
    return reply


def for_aggregation(msg: Message, reply: wire.TrainReply, weights: Tensors) -> Message:
    """A new message for Flower's strategy: named weights and only the metrics aggregation uses.

    Flower's strategies want the same metric keys in every reply, and one ArrayRecord of weights per reply.
    """
    metrics = {wire.WEIGHT: 1, wire.NUM_EXAMPLES: reply.num_examples, wire.TRAIN_LOSS: float(reply.train_loss or 0.0)}
    arrays = ArrayRecord({k: Array(v) for k, v in weights.items()})
    return Message(RecordDict({wire.ARRAYS: arrays, wire.METRICS: MetricRecord(metrics)}), metadata=msg.metadata)


def evaluation_for_aggregation(msg: Message, reply: wire.EvaluateReply) -> Message:
    """A scored evaluation's metrics that pooling uses: a classifier's confusion matrix, a causal LM's token count."""
    pooled = {wire.CONFUSION: reply.confusion} if reply.tokens is None else {wire.TOKENS: reply.tokens}
    metrics = {wire.WEIGHT: 1, wire.NUM_EXAMPLES: reply.num_examples, wire.LOSS: reply.loss, **pooled}
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), metadata=msg.metadata)


def in_dtypes_of(arrays: ArrayRecord, like: ArrayRecord) -> ArrayRecord:
    """`arrays` in `like`'s dtypes: server optimisers (FedAdam) compute in float64, but the global model keeps its
    own dtypes, or every later update would fail validation."""
    return ArrayRecord({k: Array(a.numpy().astype(like[k].numpy().dtype, copy=False)) for k, a in arrays.items()})


def tensors(arrays: ArrayRecord) -> Tensors:
    return {name: np.asarray(a.numpy()) for name, a in arrays.items()}
