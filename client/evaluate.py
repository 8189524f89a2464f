"""Evaluate on encoded examples: a classifier's loss, accuracy, macro-F1, P/R and confusion matrix; a causal LM's
perplexity; each row's own loss."""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedtune.client import wire
from fedtune.client.causal_lm import evaluate_lm, token_losses
from fedtune.client.train import Encoded, forward, make_loader


@torch.no_grad()
def predict(
    model: torch.nn.Module, data: Encoded, tokenizer: PreTrainedTokenizerBase, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray, float]:
    """Labels, predictions (both in the order of `data`) and mean cross-entropy loss over `data`."""
    model.to(device).eval()
    # Batches of rows of similar length pad little (as training's length-grouped passes do).
    order = sorted(range(len(data)), key=lambda i: len(data[i]["input_ids"]))
    labels, preds, loss_sum = [], [], 0.0
    for batch in make_loader([data[i] for i in order], tokenizer, batch_size, shuffle=False):
        out = forward(model, batch, device)
        loss_sum += float(out.loss) * batch["labels"].numel()
        labels.append(batch["labels"].numpy())
        preds.append(out.logits.argmax(-1).cpu().numpy())
    unsort = np.argsort(order)
    y, p = np.concatenate(labels)[unsort], np.concatenate(preds)[unsort]
    return y, p, loss_sum / len(y)


@torch.no_grad()
def row_losses(
    model: torch.nn.Module, data: Encoded, tokenizer: PreTrainedTokenizerBase, batch_size: int, device: torch.device
) -> np.ndarray:
    """Each row's loss, in the order of `data`: a classifier's cross-entropy of the row's label, a causal LM's
    mean loss over the row's scored tokens."""
    model.to(device).eval()
    order = sorted(range(len(data)), key=lambda i: len(data[i]["input_ids"]))
    losses = []
    for batch in make_loader([data[i] for i in order], tokenizer, batch_size, shuffle=False):
        labels = batch.pop("labels").to(device)
        logits = forward(model, batch, device).logits
        if labels.dim() == 2:  # a causal LM's labels are per token
            summed, counts = token_losses(logits, labels)
            losses.append((summed / counts.clamp(min=1)).cpu().numpy())
        else:
            losses.append(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none").cpu().numpy())
    return np.concatenate(losses)[np.argsort(order)] if losses else np.zeros(0)


def classification_metrics(y: np.ndarray, p: np.ndarray, num_labels: int) -> dict[str, float | list[float]]:
    """Accuracy, macro-F1, per-class precision/recall and the confusion matrix (row-major counts)."""
    # Imported on first use: sklearn is 2.4 s of the client runtime's 11.5 s start (2 cores), and a runtime
    # asked only to train never needs it.
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    ids = list(range(num_labels))
    precision, recall, _, _ = precision_recall_fscore_support(y, p, labels=ids, zero_division=0)
    return {
        wire.ACCURACY: float(accuracy_score(y, p)),
        wire.MACRO_F1: float(f1_score(y, p, labels=ids, average="macro", zero_division=0)),
        wire.PRECISION: [float(v) for v in precision],
        wire.RECALL: [float(v) for v in recall],
        wire.CONFUSION: [float(v) for v in confusion_matrix(y, p, labels=ids).ravel()],
    }


def evaluate(
    model: torch.nn.Module, data: Encoded, tokenizer: PreTrainedTokenizerBase, batch_size: int, device: torch.device
) -> dict[str, float | list[float]]:
    """All evaluation metrics plus the loss and the number of examples (the wire's evaluation scores)."""
    if data and isinstance(data[0]["labels"], list):
        # A causal LM's logits are rows x tokens x vocabulary (49k for SmolLM2): 64 rows of 64 tokens would be 0.8 GB.
        return evaluate_lm(model, data, tokenizer, min(batch_size, 16), device)
    y, p, loss = predict(model, data, tokenizer, batch_size, device)
    num_labels = getattr(getattr(model, "config", None), "num_labels", int(max(y.max(), p.max()) + 1))
    return {wire.LOSS: loss, wire.NUM_EXAMPLES: len(y), **classification_metrics(y, p, num_labels)}
