"""Bad client updates (NaN, huge norm, wrong shape, missing weights) never reach the global model."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedtune.coordinator.strategy import PrivacyTracking, aggregate_train_metrics


@pytest.fixture(autouse=True)
def in_a_run(monkeypatch):
    for attr in ("_run_id", "_node_id", "_task_id"):  # Messages can only be made inside a run
        monkeypatch.setattr(TaskIdentity, attr, 1)


def reply(cid: int, weights: dict[str, torch.Tensor] | None) -> Message:
    """Client `cid`'s train reply, sent from node `cid` (a deployed client's id is its node id)."""
    metrics = {"client-id": cid, "num-examples": 10, "unit-weight": 1, "train-loss": 0.1, "declined": 0, "dp": 0}
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if weights is not None:
        content["arrays"] = ArrayRecord(weights)
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=cid, message_type="train"))


def fedavg_noting_rejections(rejected: dict[int, str]) -> PrivacyTracking:
    """FedAvg behind fedtune's checks, with every rejection noted in `rejected` (client id -> reason)."""
    return PrivacyTracking(
        FedAvg(train_metrics_aggr_fn=aggregate_train_metrics),
        lambda r, reports: None,
        lambda r, phase, cid, why: rejected.__setitem__(cid, why),
        max_update_norm=100.0,
    )


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
    strategy = fedavg_noting_rejections(rejected)
    strategy.current = ArrayRecord(current)
    arrays, _ = strategy.aggregate_train(1, [reply(0, good)] + [reply(cid, w) for cid, w in bad.items()])
    assert torch.allclose(torch.from_numpy(arrays["w"].numpy()), good["w"])  # only client 0 was averaged
    assert "NaN" in rejected[1]
    assert "exceeds the bound" in rejected[2]
    assert "expected (4, 3)" in rejected[3]
    assert "missing ['b']" in rejected[4]
    assert "no weights" in rejected[5]
    assert 0 not in rejected


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_robust_strategies_resist_one_poisoned_update(name: str) -> None:
    from pathlib import Path

    from fedtune.client.model import ModelSpec
    from fedtune.coordinator.config import CoordinatorConfig
    from fedtune.coordinator.strategy import build_strategy

    cfg = CoordinatorConfig(
        labels=("a", "b"), out_dir=Path("unused"), model=ModelSpec(), strategy=name, min_clients=5, num_malicious=1
    )
    strategy = PrivacyTracking(build_strategy(cfg, 5), lambda r, reports: None, max_update_norm=1e9)
    strategy.current = ArrayRecord({"w": torch.zeros(50)})
    torch.manual_seed(0)
    honest = [{"w": 0.1 + 0.01 * torch.randn(50)} for _ in range(4)]
    poisoned = {"w": torch.full((50,), 50.0)}  # finite and within the norm bound: only robust aggregation helps
    arrays, _ = strategy.aggregate_train(1, [reply(i, w) for i, w in enumerate(honest)] + [reply(4, poisoned)])
    assert float(torch.from_numpy(arrays["w"].numpy()).abs().max()) < 0.2, name


def test_eight_bit_updates_are_decoded_before_validation() -> None:
    import numpy as np
    from flwr.app import Array

    from fedtune.privacy.update_codec import quantize

    current = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}
    good = {"w": np.full((4, 3), 0.5, np.float32), "b": np.full(3, 0.25, np.float32)}

    def encoded(cid: int, weights: dict[str, np.ndarray], spoil=lambda codes, scales: None) -> Message:
        codes, scales = quantize(weights, current)
        spoil(codes, scales)
        msg = reply(cid, None)
        msg.content["arrays"] = ArrayRecord({k: Array(v) for k, v in codes.items()})
        msg.content["scales"] = ArrayRecord({k: Array(v) for k, v in scales.items()})
        return msg

    rejected: dict[int, str] = {}
    strategy = fedavg_noting_rejections(rejected)
    strategy.current = ArrayRecord({k: Array(v) for k, v in current.items()})
    replies = [
        encoded(0, good),
        encoded(1, good, lambda codes, scales: scales.__setitem__("w", np.array([np.nan], np.float32))),
        encoded(2, {"w": np.full((4, 3), 1e3, np.float32), "b": good["b"]}),  # decodes fine, then fails the norm bound
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), good["w"], atol=0.5 / 127) and arrays["w"].numpy().dtype == np.float32
    assert np.allclose(arrays["b"].numpy(), good["b"], atol=0.25 / 127)
    assert "8-bit update" in rejected[1] and "NaN or infinite scale" in rejected[1]
    assert "exceeds the bound" in rejected[2]
    assert 0 not in rejected
