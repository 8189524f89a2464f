"""Bad client updates (NaN, huge norm, wrong shape, missing weights) never reach the global model."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from coordinator.strategy import PrivacyTracking, aggregate_train_metrics


@pytest.fixture(autouse=True)
def in_a_run(monkeypatch):
    for attr in ("_run_id", "_node_id", "_task_id"):  # Messages can only be made inside a run
        monkeypatch.setattr(TaskIdentity, attr, 1)


def reply(cid: int, weights: dict[str, torch.Tensor] | None) -> Message:
    content = RecordDict({"metrics": MetricRecord({"client-id": cid, "num-examples": 10, "train-loss": 0.1, "declined": 0})})
    if weights is not None:
        content["arrays"] = ArrayRecord(weights)
    return Message(content, dst_node_id=cid + 1, message_type="train")


def test_invalid_updates_are_rejected_with_reasons_and_the_rest_aggregated() -> None:
    current = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
    good = {"w": torch.full((4, 3), 0.5), "b": torch.full((3,), 0.5)}
    bad = {
        1: {"w": torch.full((4, 3), float("nan")), "b": torch.zeros(3)},
        2: {"w": torch.full((4, 3), 1e6), "b": torch.zeros(3)},
        3: {"w": torch.zeros(3, 4), "b": torch.zeros(3)},
        4: {"w": torch.zeros(4, 3)},
        5: None,
    }
    rejected: dict[int, str] = {}
    strategy = PrivacyTracking(
        FedAvg(train_metrics_aggr_fn=aggregate_train_metrics),
        lambda r, reports: None,
        lambda r, cid, why: rejected.__setitem__(cid, why),
        max_update_norm=100.0,
    )
    strategy.current = ArrayRecord(current)
    arrays, _ = strategy.aggregate_train(1, [reply(0, good)] + [reply(cid, w) for cid, w in bad.items()])
    assert torch.allclose(torch.from_numpy(arrays["w"].numpy()), good["w"])  # only client 0 was averaged
    assert "NaN" in rejected[1]
    assert "exceeds the bound" in rejected[2]
    assert "expected (4, 3)" in rejected[3]
    assert "missing ['b']" in rejected[4]
    assert "no weights" in rejected[5]
    assert 0 not in rejected
