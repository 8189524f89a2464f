"""A real Flower simulation (Ray backend, real Opacus): weights move, epsilon composes and checks out, budgets hold."""

from __future__ import annotations

import json
import pickle
import uuid
from pathlib import Path

import cloudpickle
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from tests.conftest import TINY_LABELS, write_sentiment_csv

SECRET = "zq7secretrow"


class RecordReplies:
    """A Flower client mod that writes down what each task and reply carries, as the reply leaves the client."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, msg, context, call_next):
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        from fedtune.client import wire

        task = wire.Task.from_content(msg.content)
        reply = call_next(msg, context)
        content = reply.content
        summary = {"type": reply.metadata.message_type, "records": {}, "array_bytes": b"", "metrics": {}}
        # Flower objects per message: deployed, each is one signed HTTP call through the Fleet gateway.
        summary["objects"] = (len(get_all_nested_objects(msg)), len(get_all_nested_objects(reply)))
        summary["layout"] = task.layout
        for key, record in content.items():
            summary["records"][key] = type(record).__name__
            if type(record).__name__ == "ArrayRecord":
                summary["arrays"] = {n: (a.dtype, tuple(a.shape)) for n, a in record.items()}
                summary["array_bytes"] += b"".join(a.data for a in record.values())
            else:
                summary["metrics"] = dict(record)
        (self.folder / f"{uuid.uuid4().hex}.pkl").write_bytes(pickle.dumps(summary))
        return reply


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """3 clients x 2 rounds on a tiny BERT; client 2's budget is far smaller than one round."""

    import tests.test_simulation as this_module
    from fedtune.simulations.config import build_config
    from fedtune.simulations.run import simulate

    base = tmp_path_factory.mktemp("sim")
    data = base / "data.csv"
    write_sentiment_csv(data, 360, secret=SECRET)
    replies = base / "replies"
    replies.mkdir()
    cfg = build_config(
        {},
        dict(
            num_clients=3,
            num_rounds=2,
            dataset=str(data),
            labels=TINY_LABELS,
            model=str(tiny_model_dir),
            partitioning="iid",
            learning_rate=0.05,
            batch_size=16,
            epsilon=8.0,
            client_budgets={2: 0.05},
            out=str(base / "run"),
            seed=1,
            ledger=str(base / "ledger.json"),
        ),
    )
    cloudpickle.register_pickle_by_value(this_module)  # Ray workers cannot import the tests package
    results = simulate(cfg, client_mods=[RecordReplies(replies)])
    return cfg, results, base / "run", replies


def test_run_folder_has_results_plots_and_pipeline_loadable_model(run) -> None:
    _, results, out, _ = run
    assert json.loads((out / "results.json").read_text()) == results
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    for r in results["rounds"]:
        assert 0.0 <= r["global"]["accuracy"] <= 1.0 and r["global"]["loss"] > 0
    assert (out / "plots" / "metrics.png").stat().st_size > 1000
    assert (out / "plots" / "epsilon.png").stat().st_size > 1000
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(out / "model"), device="cpu")
    assert classify("good")[0]["label"] in TINY_LABELS


def test_global_weights_changed(run, tiny_model_dir: Path) -> None:
    _, _, out, _ = run
    exported = AutoModelForSequenceClassification.from_pretrained(out / "model")
    initial = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    from fedtune.client.model import ModelSpec, build_model

    start = build_model(ModelSpec(name=str(tiny_model_dir)), TINY_LABELS).merge_and_unload()
    assert not torch.allclose(exported.classifier.weight, start.classifier.weight)
    # LoRA merged into the attention weights: they moved away from the pretrained ones.
    q_end = exported.bert.encoder.layer[0].attention.self.query.weight
    assert not torch.allclose(q_end, initial.bert.encoder.layer[0].attention.self.query.weight)


def test_epsilon_is_the_composition_over_both_rounds(run) -> None:
    from tests.independent_accounting import google_pld, opacus_prv

    cfg, results, _, _ = run
    for cid in ("0", "1"):
        per_round = [r["clients"][cid] for r in results["rounds"][1:]]
        assert [p["declined"] for p in per_round] == [0, 0]
        z, q, steps = per_round[-1]["noise-multiplier"], per_round[-1]["sample-rate"], int(per_round[-1]["steps"])
        assert steps == 2 * round(1 / q)  # one local epoch per round, both rounds counted
        both = [(z, q, 1)] * steps  # recompute independently, one step at a time
        assert per_round[-1]["epsilon"] == pytest.approx(google_pld(both, cfg.delta), rel=1e-6)
        assert per_round[-1]["epsilon"] == pytest.approx(opacus_prv(both, cfg.delta), rel=0.02)
        assert per_round[0]["epsilon"] == pytest.approx(google_pld(both[: steps // 2], cfg.delta), rel=1e-6)
        assert per_round[0]["epsilon"] < per_round[1]["epsilon"] <= cfg.epsilon
        assert results["clients"][cid]["epsilon"] == per_round[-1]["epsilon"]


def test_client_with_too_small_budget_declines(run) -> None:
    _, results, _, _ = run
    for r in results["rounds"][1:]:
        rep = r["clients"]["2"]
        assert rep["declined"] == 1 and rep["epsilon"] == 0.0 and rep["budget-epsilon"] == 0.05
    assert results["clients"]["2"]["rounds_declined"] == [1, 2]
    assert results["clients"]["2"]["rounds_trained"] == []


def test_only_arrays_and_metrics_leave_a_client(run) -> None:
    _, _, out, replies = run
    summaries = [pickle.loads(p.read_bytes()) for p in replies.glob("*.pkl")]
    assert len(summaries) >= 3 * 2 * 2 - 2  # train + evaluate per client and round (declines included)
    for s in summaries:
        assert set(s["records"].values()) <= {"ArrayRecord", "MetricRecord"}
        for value in s["metrics"].values():
            assert isinstance(value, (int, float, list)) and not isinstance(value, str)
        # The global model goes down as one flat array and a config record; a reply's weights come back as one.
        assert s["objects"][0] == 6  # message, record dict, config, array record, one array, one chunk
        assert all("lora" in n or "classifier" in n for n in s["layout"].names)
        if "arrays" in s:
            assert s["arrays"] == {"weights": ("float32", (s["layout"].size,))}
            assert s["objects"][1] == 6  # message, record dict, metrics, array record, one array, one chunk
        else:
            assert s["objects"][1] == 3  # message, record dict, metrics
        assert SECRET.encode() not in s["array_bytes"]
    # Nothing the run wrote contains a client's raw text.
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.fixture(scope="module")
def second_run(run):
    """The same federation again on the same data and ledger, with a budget that fits 3 of its 4 rounds;
    clients send 8-bit updates and the coordinator adds central DP."""
    import dataclasses

    from fedtune.privacy.accounting import epsilon_spent
    from fedtune.simulations.run import simulate

    cfg, results, out, _ = run
    after = {}
    for cid in ("0", "1"):
        # Opacus merges consecutive steps with the same noise and rate into one history entry.
        rep = results["rounds"][2]["clients"][cid]
        z, q, per_round = rep["history-noise"][-1], rep["history-rate"][-1], sum(rep["history-steps"]) // 2
        after[cid] = [epsilon_spent([(z, q, per_round * k)], cfg.delta) for k in (3, 4)]
    low, high = max(a[0] for a in after.values()), min(a[1] for a in after.values())
    assert low < high
    budget = (low + high) / 2
    cfg2 = dataclasses.replace(
        cfg,
        out=str(out.parent / "run2"),
        budget_epsilon=budget,
        client_budgets={},
        central_dp=True,
        central_noise_multiplier=0.8,
        central_clipping_norm=0.5,
        update_encoding="int8",
    )
    return budget, simulate(cfg2)


def test_second_run_on_the_same_data_starts_from_the_ledger_and_declines_at_the_budget(run, second_run) -> None:
    from fedtune.privacy.ledger import Ledger

    cfg, first, _, _ = run
    budget, second = second_run
    for cid in ("0", "1"):
        r1, r2 = second["rounds"][1]["clients"][cid], second["rounds"][2]["clients"][cid]
        assert r1["declined"] == 0 and r1["epsilon"] > first["clients"][cid]["epsilon"]  # composed with run 1
        assert r2["declined"] == 1 and r2["epsilon"] == pytest.approx(r1["epsilon"])  # nothing more spent
        per_round = sum(first["rounds"][1]["clients"][cid]["history-steps"])
        assert sum(r2["history-steps"]) == 3 * per_round  # two rounds of run 1, one of run 2
    summary = Ledger(cfg.ledger).summary()
    # Client 2 spent nothing in run 1 (its budget was below one round), then two rounds in run 2.
    assert sorted([v["rounds"] for v in e["runs"].values()] for e in summary) == [[2], [2, 1], [2, 1]]
    assert all(e["spent"] <= budget for e in summary)


def test_privacy_report_epsilons_agree_with_independent_accountants(run) -> None:
    from tests.independent_accounting import PRV_AGREEMENT, google_pld, google_rdp, opacus_prv

    _, _, out, _ = run
    report = json.loads((out / "privacy.json").read_text())
    clients = report["sample_level"]["clients"]
    assert report["declined"] == {"2": [1, 2]}
    checked = 0
    for c in clients.values():
        if not c["history"]:
            continue
        assert c["accountant"] == "pld" and c["max_grad_norm"] == 1.0
        assert c["epsilon"] == pytest.approx(google_pld(c["history"], c["delta"]), rel=1e-6)
        # Independent of fedtune's accountant library: Opacus' PRV accountant agrees up to discretisation,
        # and RDP, an upper bound on the same history, is larger.
        assert c["epsilon"] == pytest.approx(opacus_prv(c["history"], c["delta"]), rel=PRV_AGREEMENT)
        assert c["epsilon"] < google_rdp(c["history"], c["delta"])
        checked += 1
    assert checked == 2


def test_central_dp_reports_client_level_epsilon(second_run) -> None:
    import dp_accounting

    _, second = second_run
    central = second["central_dp"]
    assert central["num_sampled_clients"] == 3 and central["releases"] == 2
    assert central["noise_std"] == pytest.approx(0.8 * 0.5 / 3)
    rdp = dp_accounting.rdp.RdpAccountant()
    rdp.compose(dp_accounting.GaussianDpEvent(0.8), 2)
    assert central["epsilon"] == pytest.approx(rdp.get_epsilon(central["delta"]), rel=0.01)


def test_eight_bit_updates_are_decoded_and_aggregated(second_run) -> None:
    _, second = second_run
    assert second["config"]["update_encoding"] == "int8"
    trained = [r for r in second["rounds"][1:] if r.get("train")]
    assert trained and not any(r.get("rejected") for r in second["rounds"])
    # The global model moved: aggregation used the decoded updates (a failed decode would reject them all).
    assert second["rounds"][-1]["global"]["loss"] != second["rounds"][0]["global"]["loss"]


def test_central_dp_noise_std_is_z_times_c_over_sampled_clients(monkeypatch) -> None:
    """Flower's wrapper, as fedtune configures it: aggregate identical updates and measure the noise added."""
    import numpy as np
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # Messages are made inside a run; pretend to be in one
        monkeypatch.setattr(TaskIdentity, attr, 1)

    from fedtune.client.model import ModelSpec
    from fedtune.coordinator.config import CoordinatorConfig
    from fedtune.coordinator.strategy import build_strategy

    cfg = CoordinatorConfig(
        labels=TINY_LABELS,
        out_dir=Path("unused"),
        model=ModelSpec(),
        min_clients=4,
        central_dp=True,
        central_noise_multiplier=0.7,
        central_clipping_norm=2.0,
    )
    strategy = build_strategy(cfg, num_available=4)
    start = torch.zeros(400_000)
    strategy.current_arrays = ArrayRecord({"w": start})  # what configure_train records
    update = start + 0.1  # the same update from every client; each is clipped to norm 2 first
    clipped = 0.1 * min(1.0, 2.0 / float(update.norm()))
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": update.clone()}),
                    "metrics": MetricRecord({"num-examples": 10 * (i + 1), "unit-weight": 1, "train-loss": 0.5}),
                }
            ),
            dst_node_id=i + 1,
            message_type="train",
        )
        for i in range(4)
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    noise = arrays["w"].numpy() - clipped
    assert float(np.std(noise)) == pytest.approx(0.7 * 2.0 / 4, rel=0.01)
    assert abs(float(np.mean(noise))) < 0.01 * clipped + 5 * 0.35 / np.sqrt(noise.size)


def test_flower_engine_polls_only_addressed_nodes() -> None:
    """fedtune replaces Flower 1.42's per-node polling loop; if Flower renames or reshapes it, this fails
    instead of the replacement silently going unused."""
    import inspect

    from flwr.server.superlink.fleet.vce import vce_api

    from fedtune.simulations import dispatch

    flower = inspect.signature(dispatch._FLOWER_POLL)
    assert list(flower.parameters) == ["state", "queue", "nodes_mapping", "f_stop"]
    assert "add_messages_to_queue" in inspect.getsource(vce_api.run_api)  # the name run_api looks up per call
    dispatch.install()
    assert vce_api.add_messages_to_queue is dispatch.poll_addressed_nodes
