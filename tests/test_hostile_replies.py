"""Hostile replies in a real simulation: every malformed reply is its sender's fault, identity comes from the node,
and a claimed example count buys no weight."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from tests.conftest import TINY_LABELS, write_sentiment_csv

HONEST, LIAR = (0, 1), 2  # the liar tells the truth, except that it claims 10**9 examples
CLIENTS = 7
# (round, partition id) -> how that client spoils its train reply; 3-6 misbehave every round.
TRAIN_TRICKS = {
    (1, 3): "no-client-id",
    (1, 4): "no-metrics",
    (1, 5): "wrong-type",
    (1, 6): "impersonate",
    (2, 3): "extra-record",
    (2, 4): "nan",
    (2, 5): "out-of-range",
    (2, 6): "unknown-metric",
}
EVALUATE_TRICKS = {(1, 3): "bad-confusion", (2, 5): "impersonate"}
REASONS = {  # what the fault must say
    "no-client-id": "metrics lack ['client-id']",
    "no-metrics": "no 'metrics' record",
    "wrong-type": "metric 'num-examples' must hold int values, not float",
    "impersonate": "claims client-id 0, but it comes from client",
    "extra-record": "unexpected record 'notes'",
    "nan": "metric 'train-loss' is nan",
    "out-of-range": "metric 'unit-weight' is 1000, outside [1, 1]",
    "unknown-metric": "unknown metrics ['bonus']",
    "bad-confusion": "confusion matrix is not 2x2 counts",
}


def spoil(content: RecordDict, trick: str) -> RecordDict:
    """The reply `content` spoilt in the way `trick` names."""
    metrics = content["metrics"]
    if trick == "no-client-id":
        del metrics["client-id"]
    elif trick == "no-metrics":
        del content["metrics"]
    elif trick == "wrong-type":
        metrics["num-examples"] = float(metrics["num-examples"])
    elif trick == "impersonate":  # client 0's id (and in training, a privacy report that says nothing was spent)
        metrics["client-id"] = 0
        if "epsilon" in metrics:
            metrics["epsilon"] = 0.0
    elif trick == "extra-record":
        content["notes"] = ConfigRecord({"note": "trust me"})
    elif trick == "nan":
        metrics["train-loss"] = float("nan")
    elif trick == "out-of-range":
        metrics["unit-weight"] = 1000
    elif trick == "unknown-metric":
        metrics["bonus"] = 1.0
    elif trick == "bad-confusion":
        metrics["confusion"] = metrics["confusion"] + [0.0]
    return content


class Hostile:
    """A Flower client mod: spoils the replies TRAIN_TRICKS and EVALUATE_TRICKS name, then writes down every reply
    as it leaves the client."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, msg, context, call_next):
        from fedtune.client import wire

        task = wire.Task.from_content(msg.content)
        reply = call_next(msg, context)
        pid, kind, server_round = int(context.node_config["partition-id"]), msg.metadata.message_type, task.server_round
        trick = (TRAIN_TRICKS if kind == "train" else EVALUATE_TRICKS).get((server_round, pid))
        if trick:
            reply.content = spoil(reply.content, trick)
        elif pid == LIAR and kind == "train":
            reply.content["metrics"]["num-examples"] = 10**9
        arrays = reply.content.array_records.get(wire.ARRAYS)
        record = {
            "metrics": dict(reply.content[wire.METRICS]) if wire.METRICS in reply.content else None,
            # The weights travel flat; by name again through the task's layout, as the coordinator reads them.
            "arrays": wire.Update.from_record(arrays, task.layout, task.update_encoding).decode(task.weights)
            if arrays is not None
            else {},
        }
        (self.folder / f"{kind}-{server_round}-{pid}.pkl").write_bytes(pickle.dumps(record))
        return reply


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    import tests.test_hostile_replies as this_module
    from fedtune.simulations.config import build_config
    from fedtune.simulations.run import simulate

    base = tmp_path_factory.mktemp("hostile")
    data = base / "data.csv"
    write_sentiment_csv(data, CLIENTS * 40)
    replies = base / "replies"
    replies.mkdir()
    cfg = build_config(
        {},
        dict(
            num_clients=CLIENTS,
            num_rounds=2,
            dataset=str(data),
            labels=TINY_LABELS,
            model=str(tiny_model_dir),
            partitioning="iid",
            learning_rate=0.05,
            batch_size=8,
            round_timeout=120.0,
            out=str(base / "run"),
        ),
    )
    cloudpickle.register_pickle_by_value(this_module)  # Ray workers cannot import the tests package
    results = simulate(cfg, client_mods=[Hostile(replies)])

    def sent(kind: str, server_round: int, pid: int) -> dict:
        return pickle.loads((replies / f"{kind}-{server_round}-{pid}.pkl").read_bytes())

    return results, base / "run", sent


def test_every_round_completes(hostile_run) -> None:
    results, _, _ = hostile_run
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    for r in results["rounds"][1:]:
        assert r["train"] and r["federated_evaluation"] and math.isfinite(r["global"]["loss"])


def test_each_malformed_reply_is_a_fault_with_its_reason(hostile_run) -> None:
    results, _, _ = hostile_run
    faults = {(f["round"], f["phase"], int(f["client"])): f["fault"] for f in results["faults"]}
    expected = {(r, "train", pid): trick for (r, pid), trick in TRAIN_TRICKS.items()}
    expected |= {(r, "evaluate", pid): trick for (r, pid), trick in EVALUATE_TRICKS.items()}
    assert set(faults) == set(expected), results["faults"]  # the liar and the honest clients are not faulted
    for key, trick in expected.items():
        assert faults[key].startswith("reply rejected: ") and REASONS[trick] in faults[key], (key, faults[key])
    assert "comes from client 6's node" in faults[(1, "train", 6)]


def test_every_privacy_report_is_its_senders_own(hostile_run) -> None:
    results, _, sent = hostile_run
    for r in (1, 2):
        clients = results["rounds"][r]["clients"]
        assert set(clients) == {str(pid) for pid in (*HONEST, LIAR)}  # malformed replies report nothing
        for pid in (*HONEST, LIAR):
            assert clients[str(pid)] == sent("train", r, pid)["metrics"], (r, pid)
    # Client 6 claimed client 0's id and a zero epsilon in round 1: client 0's report is still its own.
    assert results["rounds"][1]["clients"]["0"]["epsilon"] > 0
    assert results["clients"]["0"]["rounds_trained"] == [1, 2]


def test_a_claimed_example_count_buys_no_weight(hostile_run) -> None:
    """Every accepted update weighs the same: the global model is the plain mean of the honest and the liar's
    updates, far from the average the liar's 10**9 examples would have bought."""
    _, out, sent = hostile_run
    for r in (1, 2):
        updates = [sent("train", r, pid) for pid in (*HONEST, LIAR)]
        claimed = np.array([u["metrics"]["num-examples"] for u in updates], dtype=float)
        assert claimed[-1] == 10**9 and claimed[:-1].max() < 100
        with np.load(out / "checkpoint" / f"round-{r:04d}" / "weights.npz") as saved:
            global_model = {k: saved[k] for k in saved.files}
        assert set(global_model) == set(updates[0]["arrays"])
        gap_to_claimed = 0.0
        for name, value in global_model.items():
            stack = np.stack([u["arrays"][name].astype(np.float64) for u in updates])
            np.testing.assert_allclose(value, stack.mean(axis=0), rtol=1e-5, atol=1e-6, err_msg=f"round {r} {name}")
            gap_to_claimed = max(gap_to_claimed, float(np.abs(value - np.average(stack, axis=0, weights=claimed)).max()))
        assert gap_to_claimed > 1e-3  # the rule matters: weighting by claims would have given another model


def test_simulated_clients_are_the_partitions_flowers_engine_gave_their_nodes() -> None:
    """The coordinator names simulated clients from the engine's registration order; if Flower changes how its
    engine registers nodes, this fails instead of clients being misnamed."""
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    from fedtune.coordinator.app import simulated_clients

    # The engine and the ServerApp's grid share one in-memory state, as in flwr.simulation.run_simulation.
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    engine = _register_nodes(num_nodes=12, state_factory=factory)
    assert simulated_clients(InMemoryGrid(state_factory=factory)) == engine
    assert sorted(engine.values()) == list(range(12))


def test_replies_with_different_optional_metrics_aggregate_together(monkeypatch) -> None:
    """A DP and a no-DP client in one round, and an evaluator without a local split: well formed, so aggregated
    (Flower's strategies refuse replies whose metric keys differ; fedtune passes on only what they use)."""
    from flwr.app import Array, ArrayRecord, Message
    from flwr.supercore.task_identity import TaskIdentity

    from fedtune.client import wire
    from fedtune.client.model import ModelSpec
    from fedtune.coordinator.config import CoordinatorConfig
    from fedtune.coordinator.strategy import CheckedStrategy, build_strategy

    for attr in ("_run_id", "_node_id", "_task_id"):  # Messages are made inside a run; pretend to be in one
        monkeypatch.setattr(TaskIdentity, attr, 1)

    def reply(node: int, kind: str, answer: wire.TrainReply | wire.EvaluateReply) -> Message:
        return answer.to_message(reply_to=Message(RecordDict(), dst_node_id=node, message_type=kind))

    cfg = CoordinatorConfig(labels=TINY_LABELS, out_dir=Path("unused"), model=ModelSpec(), min_clients=2)
    reports, rejected = {}, []
    strategy = CheckedStrategy(build_strategy(cfg, 2), lambda r, rep: reports.update(rep), lambda *a: rejected.append(a))
    strategy.current = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    privacy = wire.PrivacyReport(
        epsilon=1.5, delta=1e-5, budget_epsilon=8.0, noise_multiplier=1.0, sample_rate=0.2, history=[(1.0, 0.2, 5)]
    )
    dp = wire.TrainReply(1, num_examples=5, train_loss=0.5, privacy=privacy, update=wire.Update(np.full(3, 1.0, np.float32)))
    no_dp = wire.TrainReply(2, num_examples=500, train_loss=0.5, update=wire.Update(np.full(3, 3.0, np.float32)))
    arrays, metrics = strategy.aggregate_train(1, [reply(1, "train", dp), reply(2, "train", no_dp)])
    assert not rejected and set(reports) == {1, 2} and reports[1]["epsilon"] == 1.5
    assert reports[1] == dp.metrics() and wire.TrainReply.from_metrics(reports[1]).privacy == privacy  # round trip
    np.testing.assert_allclose(arrays["w"].numpy(), 2.0)  # equal weights, whatever the counts
    assert metrics[wire.MAX_EPSILON] == 1.5
    evaluated = wire.EvaluateReply(1, num_examples=4, loss=0.3, accuracy=0.75, confusion=[2.0, 1.0, 0.0, 1.0])
    pooled = strategy.aggregate_evaluate(1, [reply(1, "evaluate", evaluated), reply(2, "evaluate", wire.EvaluateReply(2))])
    assert not rejected and pooled["accuracy"] == 0.75 and pooled["num-examples"] == 4


def _npz_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, w=np.zeros(3, np.float32))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("spoil_arrays", "reason"),
    [
        (lambda a: a.__setattr__("data", b"\x80\x04 not an array"), "array 'weights' does not decode"),
        (lambda a: a.__setattr__("stype", "torch.pickle"), "array 'weights' does not decode"),
        (lambda a: a.__setattr__("data", _npz_bytes()), "array 'weights' is a NpzFile, not an array"),
        (lambda a: None, "the task asked for a float32 update, the reply has 8-bit scales"),
    ],
    ids=["garbage-bytes", "foreign-serialisation", "a-zip-of-arrays", "8-bit-unasked"],
)
def test_an_undecodable_update_is_rejected_not_a_crash(monkeypatch, spoil_arrays, reason: str) -> None:
    """Array bytes are the sender's too: whatever Flower's deserialisation makes of them, the reply is rejected
    with a reason and the round goes on."""
    from flwr.app import Array, ArrayRecord, Message
    from flwr.supercore.task_identity import TaskIdentity

    from fedtune.client import wire
    from fedtune.client.model import ModelSpec
    from fedtune.coordinator.config import CoordinatorConfig
    from fedtune.coordinator.strategy import CheckedStrategy, build_strategy

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    cfg = CoordinatorConfig(labels=TINY_LABELS, out_dir=Path("unused"), model=ModelSpec(), min_clients=1)
    reports, rejected = {}, []
    strategy = CheckedStrategy(build_strategy(cfg, 1), lambda r, rep: reports.update(rep), lambda *a: rejected.append(a))
    strategy.current = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    update = wire.Update(np.zeros(3, np.int8), np.ones(1, np.float32))  # 8-bit: scales travel too
    answer = wire.TrainReply(1, num_examples=5, train_loss=0.5, update=update)
    msg = answer.to_message(reply_to=Message(RecordDict(), dst_node_id=1, message_type="train"))
    if reason.startswith("array"):
        del msg.content[wire.ARRAYS][wire.SCALES]
        spoil_arrays(msg.content[wire.ARRAYS][wire.WEIGHTS])
    arrays, _ = strategy.aggregate_train(1, [msg])
    assert arrays is None  # nobody's update was used: the global model stays
    ((server_round, phase, cid, why),) = rejected
    assert (server_round, phase, cid) == (1, "train", 1) and why.startswith("reply rejected: ") and reason in why, why
    assert reports == {}  # a reply that does not decode reports nothing, as every malformed reply
