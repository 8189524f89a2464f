"""Bad client updates (NaN, huge norm, wrong size or dtype, missing weights) never reach the global model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedtune.client import wire
from fedtune.coordinator.strategy import CheckedStrategy, aggregate_train_metrics


@pytest.fixture(autouse=True)
def in_a_run(monkeypatch):
    for attr in ("_run_id", "_node_id", "_task_id"):  # Messages can only be made inside a run
        monkeypatch.setattr(TaskIdentity, attr, 1)


def task(cid: int) -> Message:
    return Message(RecordDict(), dst_node_id=cid, message_type="train")


def reply(cid: int, weights: dict[str, torch.Tensor] | None, base: dict[str, torch.Tensor] | None = None) -> Message:
    """Client `cid`'s train reply, sent from node `cid` (a deployed client's id is its node id), its weights laid
    flat in the layout of `base` (default: the weights' own)."""
    update = None
    if weights is not None:
        named = {k: v.numpy() for k, v in weights.items()}
        layout = {k: v.numpy() for k, v in (base or weights).items()}
        update = wire.Update(np.concatenate([named[k].reshape(-1) for k in layout if k in named]))
    return wire.TrainReply(cid, num_examples=10, train_loss=0.1, update=update).to_message(reply_to=task(cid))


def fedavg_noting_rejections(rejected: dict[int, str]) -> CheckedStrategy:
    """FedAvg behind fedtune's checks, with every rejection noted in `rejected` (client id -> reason)."""
    return CheckedStrategy(
        FedAvg(train_metrics_aggr_fn=aggregate_train_metrics),
        lambda r, reports: None,
        lambda r, phase, cid, why: rejected.__setitem__(cid, why),
        max_update_norm=100.0,
    )


def test_invalid_updates_are_rejected_with_reasons_and_the_rest_aggregated() -> None:
    current = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
    good = {"w": torch.full((4, 3), 0.5), "b": torch.full((3,), 0.5)}
    flat_good = wire.Update(np.concatenate([good["w"].numpy().ravel(), good["b"].numpy().ravel()]))
    bad = {
        1: reply(1, {"w": torch.full((4, 3), float("nan")), "b": torch.zeros(3)}),
        2: reply(2, {"w": torch.full((4, 3), 1e6), "b": torch.zeros(3)}),
        3: reply(3, {"w": torch.zeros(4, 3)}, base=current),  # b is missing: 12 values where 15 belong
        4: wire.TrainReply(
            4, num_examples=10, train_loss=0.1, update=wire.Update(flat_good.values.astype(np.float64))
        ).to_message(reply_to=task(4)),
        5: reply(5, None),
    }
    extra = reply(6, good)  # a second array beside the weights
    extra.content["arrays"]["notes"] = Array(np.zeros(1, np.float32))
    rejected: dict[int, str] = {}
    strategy = fedavg_noting_rejections(rejected)
    strategy.current = ArrayRecord(current)
    arrays, _ = strategy.aggregate_train(1, [reply(0, good), *bad.values(), extra])
    assert torch.allclose(torch.from_numpy(arrays["w"].numpy()), good["w"])  # only client 0 was averaged
    assert list(arrays) == ["w", "b"] and arrays["w"].shape == (4, 3)  # by name again, as the model holds them
    assert "update rejected: tensor w holds NaN" in rejected[1]
    assert "exceeds the bound" in rejected[2]
    assert "reply rejected: the weights are (12,) float32, expected (15,) float32" in rejected[3]
    assert "expected (15,) float32" in rejected[4] and "float64" in rejected[4]
    assert "no weights" in rejected[5]
    assert "must hold 'weights'" in rejected[6]
    assert 0 not in rejected


def test_received_replies_are_read_not_changed() -> None:
    """Decoding builds new messages for Flower's strategy; what arrived stays as it arrived."""
    current = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
    msg = reply(0, {"w": torch.full((4, 3), 0.5), "b": torch.full((3,), 0.5)})
    before = {name: dict(record) if not isinstance(record, ArrayRecord) else list(record) for name, record in msg.content.items()}
    content_id = id(msg.content)
    strategy = fedavg_noting_rejections({})
    strategy.current = ArrayRecord(current)
    strategy.aggregate_train(1, [msg])
    assert id(msg.content) == content_id
    assert {name: dict(r) if not isinstance(r, ArrayRecord) else list(r) for name, r in msg.content.items()} == before


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_robust_strategies_resist_one_poisoned_update(name: str) -> None:
    from pathlib import Path

    from fedtune.client.model import ModelSpec
    from fedtune.coordinator.config import CoordinatorConfig
    from fedtune.coordinator.strategy import build_strategy

    cfg = CoordinatorConfig(
        labels=("a", "b"), out_dir=Path("unused"), model=ModelSpec(), strategy=name, min_clients=5, num_malicious=1
    )
    strategy = CheckedStrategy(build_strategy(cfg, 5), lambda r, reports: None, max_update_norm=1e9)
    strategy.current = ArrayRecord({"w": torch.zeros(50)})
    torch.manual_seed(0)
    honest = [{"w": 0.1 + 0.01 * torch.randn(50)} for _ in range(4)]
    poisoned = {"w": torch.full((50,), 50.0)}  # finite and within the norm bound: only robust aggregation helps
    arrays, _ = strategy.aggregate_train(1, [reply(i, w) for i, w in enumerate(honest)] + [reply(4, poisoned)])
    assert float(torch.from_numpy(arrays["w"].numpy()).abs().max()) < 0.2, name


def test_eight_bit_updates_are_decoded_before_validation() -> None:
    current = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}
    good = {"w": np.full((4, 3), 0.5, np.float32), "b": np.full(3, 0.25, np.float32)}

    def encoded(cid: int, weights: dict[str, np.ndarray], spoil=lambda update: update) -> Message:
        update = spoil(wire.Update.encode(weights, current, "int8"))
        return wire.TrainReply(cid, num_examples=10, train_loss=0.1, update=update).to_message(reply_to=task(cid))

    def nan_scale(update: wire.Update) -> wire.Update:
        return wire.Update(update.values, np.array([np.nan, update.scales[1]], np.float32))

    rejected: dict[int, str] = {}
    strategy = fedavg_noting_rejections(rejected)
    strategy.current = ArrayRecord({k: Array(v) for k, v in current.items()})
    strategy.encoding = "int8"  # as configure_train records it from the round's task
    replies = [
        encoded(0, good),
        encoded(1, good, nan_scale),
        encoded(2, {"w": np.full((4, 3), 1e3, np.float32), "b": good["b"]}),  # decodes fine, then fails the norm bound
        encoded(3, good, lambda u: wire.Update(u.values, u.scales[:1])),  # one scale for two tensors
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), good["w"], atol=0.5 / 127) and arrays["w"].numpy().dtype == np.float32
    assert np.allclose(arrays["b"].numpy(), good["b"], atol=0.25 / 127)
    assert "8-bit update" in rejected[1] and "NaN or infinite scale" in rejected[1]
    assert "exceeds the bound" in rejected[2]
    assert "the scales are (1,) float32, expected (2,) float32" in rejected[3]
    assert 0 not in rejected


def test_fedavgm_steps_the_server_learning_rate_times_the_mean_update_with_momentum() -> None:
    from pathlib import Path

    from fedtune.client.model import ModelSpec
    from fedtune.coordinator.config import CoordinatorConfig
    from fedtune.coordinator.strategy import build_strategy

    cfg = CoordinatorConfig(
        labels=("a", "b"), out_dir=Path("unused"), model=ModelSpec(), strategy="fedavgm", min_clients=2,
        server_learning_rate=3.0, server_momentum=0.5,
    )  # fmt: skip
    strategy = CheckedStrategy(build_strategy(cfg, 2), lambda r, reports: None, max_update_norm=1e9)
    start = ArrayRecord({"w": torch.zeros(4)})
    strategy.current = strategy.inner.current_arrays = start  # as configure_train sets both
    arrays, _ = strategy.aggregate_train(1, [reply(0, {"w": torch.full((4,), 0.1)}), reply(1, {"w": torch.full((4,), 0.3)})])
    assert np.allclose(arrays["w"].numpy(), 3.0 * 0.2)  # mean update 0.2, times the server learning rate
    strategy.current = arrays
    arrays, _ = strategy.aggregate_train(2, [reply(0, {"w": torch.full((4,), 0.7)}), reply(1, {"w": torch.full((4,), 0.7)})])
    assert np.allclose(arrays["w"].numpy(), 0.6 + 3.0 * (0.1 + 0.5 * 0.2))  # round 2's update plus half of round 1's


def test_fedavgm_momentum_survives_a_checkpoint() -> None:
    from pathlib import Path

    from fedtune.client.model import ModelSpec
    from fedtune.coordinator.checkpoint import restore_strategy_state, strategy_state
    from fedtune.coordinator.config import CoordinatorConfig
    from fedtune.coordinator.strategy import build_strategy

    cfg = CoordinatorConfig(labels=("a", "b"), out_dir=Path("unused"), model=ModelSpec(), strategy="fedavgm", server_momentum=0.9)
    saved = build_strategy(cfg, 2)
    saved.momentum_vector = [np.full(3, 0.5, np.float32), np.arange(2, dtype=np.float32)]
    resumed = build_strategy(cfg, 2)
    assert resumed.momentum_vector is None
    restore_strategy_state(resumed, strategy_state(saved))
    assert [v.tolist() for v in resumed.momentum_vector] == [[0.5, 0.5, 0.5], [0.0, 1.0]]
