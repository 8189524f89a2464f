"""The privacy audit (`fedtune-simulate --audit`): real DP-SGD rounds with gradient canaries, scored as the
coordinator scores them; a broken DP-SGD must be exposed, an honest one must not be."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_LABELS, save_bert, sentiment_rows

ROUNDS = 5
CANARIES = 500


@pytest.fixture(scope="module")
def audit_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT with hidden size 128 (random weights). With the suite's hidden-32 one, the data's own drift
    in its few weights hid the canaries: the broken run's bound came out between 0.7 and 1.5 (measured), near
    the claim it must refute; here 2.2."""
    return save_bert(tmp_path_factory.mktemp("bert-128"), 128)


def sentiment_pool():
    import datasets

    rows, names = sentiment_rows(160), list(TINY_LABELS)
    pool = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [names.index(y) for _, y in rows]})
    return pool.cast_column("label", datasets.ClassLabel(names=names))


def audit_rounds(
    model_dir: Path,
    dp: bool,
    epsilon: float,
    noise_divisor: float = 1.0,
    canaries: int = CANARIES,
    causal_lm: bool = False,
    rounds: int = ROUNDS,
    **train: Any,
) -> dict[str, Any]:
    """ROUNDS rounds of the audited client's local training on the global model (no other clients: the
    coordinator's view is each update against the model sent), scored by the simulation's own auditor."""
    import datasets
    import torch

    from fedtune.benchmarks.p8_audit import weakened_noise
    from fedtune.client.config import ClientConfig, ModelSpec, PrivacySpec, TrainSpec
    from fedtune.client.model import build_model, trainable_state
    from fedtune.client.model_source import check_model
    from fedtune.client.train import encode, plan_round, train_round
    from fedtune.privacy import epsilon_spent
    from fedtune.simulations.audit import AUDITED_CLIENT, CanaryAudit

    labels = () if causal_lm else TINY_LABELS
    cfg = ClientConfig(
        labels=labels,
        model=check_model(ModelSpec(name=str(model_dir), max_length=32)),
        privacy=PrivacySpec(enabled=dp, target_epsilon=epsilon),
        train=TrainSpec(**({"batch_size": 64, "device": "cpu"} | train)),
    )
    if causal_lm:
        pool = datasets.Dataset.from_dict({"text": [f"the cat sat on mat number {i}" for i in range(160)]})
    else:
        pool = sentiment_pool()
    audit = CanaryAudit(canaries, pool, cfg, seed=5, device=torch.device("cpu"))
    data = datasets.concatenate_datasets([pool, audit.inputs.planted])
    tokenizer = audit.tokenizer
    encoded = encode(data, tokenizer, 32)
    model = build_model(cfg.model, labels)
    audit.global_model(model)
    history: list = []
    plan = plan_round(len(encoded), cfg, rounds) if dp else None
    with weakened_noise(noise_divisor):
        for r in range(1, rounds + 1):
            sent = {n: t.numpy().copy() for n, t in trainable_state(model).items()}
            outcome = train_round(model, encoded, tokenizer, cfg, plan=plan, history=history, seed=r, canaries=audit.gradient)
            history = outcome.history
            audit.observe(r, AUDITED_CLIENT, sent, {n: t.numpy() for n, t in trainable_state(model).items()})
            audit.global_model(model)
    claimed = {"epsilon": epsilon_spent(history, cfg.privacy.delta), "accountant": "pld"} if dp else {}
    claimed["rounds_trained"] = list(range(1, rounds + 1))  # as results.json's clients table holds it
    return audit.report({"clients": {str(AUDITED_CLIENT): claimed}}, dp, cfg.privacy.delta)


def test_without_dp_the_audit_finds_the_canaries(audit_model_dir: Path) -> None:
    report = audit_rounds(audit_model_dir, dp=False, epsilon=8.0)
    assert report["claimed"]["epsilon"] is None
    # ~250 canaries planted, 5 rounds: nearly every one lands in a batch, and nothing hides it.
    # Measured: 1.96 and 3.39 (at most ~4.6 for 500 canaries, every guess right).
    assert report["views"]["coordinator"]["epsilon_lower_bound"] > 1.5, report["views"]
    assert report["views"]["coordinator"]["updates_seen"] == ROUNDS
    assert report["views"]["final_model"]["epsilon_lower_bound"] > 1.5, report["views"]
    assert report["canaries"]["gradient"]["clip_share"] == 1.0  # nothing clips a row: a canary is spread evenly


@pytest.mark.parametrize("noise_divisor", [1.0, 10.0], ids=["honest", "noise-divided-by-10"])
def test_the_audit_exposes_weakened_noise_and_clears_honest_dp(audit_model_dir: Path, noise_divisor: float) -> None:
    report = audit_rounds(audit_model_dir, dp=True, epsilon=1.0, noise_divisor=noise_divisor)
    claimed = report["claimed"]["epsilon"]
    assert claimed == pytest.approx(1.0, rel=0.01)  # the broken run claims the same: the accountant was not told
    # Per-tensor clipping: the adapters' half of the norm's square and the head weight's quarter (its bias is
    # too small to hold a canary).
    assert report["canaries"]["gradient"]["clip_share"] == pytest.approx(0.75)
    bounds = {view: v["epsilon_lower_bound"] for view, v in report["views"].items()}
    if noise_divisor == 1.0:
        assert all(b <= claimed for b in bounds.values()), bounds
    else:
        assert bounds["coordinator"] > claimed, bounds  # the false claim is exposed


def test_a_causal_lm_is_audited_with_secret_canaries_and_their_exposure(tiny_llama_dir: Path) -> None:
    report = audit_rounds(tiny_llama_dir, dp=False, epsilon=8.0, canaries=100, causal_lm=True, rounds=3, batch_size=16)
    assert report["canaries"]["input"]["kind"].startswith("'my secret code is'")
    exposure = report["exposure"]
    planted = report["canaries"]["input"]["included"]
    assert exposure["candidates"] == 100 - planted + 1
    assert 0 <= exposure["mean_bits"] <= exposure["max_observed_bits"] <= exposure["max_bits"]
    assert 1.3 < exposure["unexposed_mean_bits"] < 1.45  # chance, for ~50 candidates
    # The tiny random Llama barely memorises a secret (its exposure stays near chance: 1.2-1.9 bits measured
    # over six settings), but its updates carry the gradient canaries as plainly as a classifier's: 50 of 50
    # guesses right, 2.10 measured (the most 100 canaries can show; 1.0 allows five wrong).
    assert report["views"]["coordinator"]["epsilon_lower_bound"] > 1.0, report["views"]


def test_fedtune_simulate_audit_exposes_weakened_noise_end_to_end(tmp_path: Path, audit_model_dir: Path) -> None:
    """The real simulation engine (Ray workers, the coordinator's checks): the audited client's noise is silently
    divided by 10 in its worker; the audit's report and summary say the claim is false."""
    import io
    import json

    import cloudpickle
    from rich.console import Console

    import fedtune.benchmarks.p8_audit as sabotage
    from fedtune.simulations.config import build_config
    from fedtune.simulations.run import simulate
    from tests.conftest import write_sentiment_csv

    cfg = build_config(
        {},
        dict(
            num_clients=2,
            num_rounds=ROUNDS,
            dataset=str(write_sentiment_csv(tmp_path / "data.csv", 320)),
            labels=TINY_LABELS,
            model=str(audit_model_dir),
            partitioning="iid",
            batch_size=64,
            epsilon=1.0,
            audit=CANARIES,
            device="cpu",  # the numbers below are the CPU's
            out=str(tmp_path / "run"),
            seed=1,
        ),
    )
    cloudpickle.register_pickle_by_value(sabotage)  # Ray workers receive the mod by value
    shown = io.StringIO()
    results = simulate(cfg, Console(file=shown, width=200), client_mods=[sabotage.WeakenedNoise(10)])
    report = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert report == results["audit"]
    assert report["claimed"]["epsilon"] == pytest.approx(1.0, rel=0.01) == results["clients"]["0"]["epsilon"]
    assert report["canaries"]["gradient"]["count"] == report["canaries"]["input"]["count"] == CANARIES
    coordinator = report["views"]["coordinator"]
    # Measured 1.91 (96 of 100 guesses right); 88 of 100 would still give 1.18.
    assert coordinator["updates_seen"] == ROUNDS and coordinator["epsilon_lower_bound"] > 1.0, report["views"]
    assert len(report["per_canary"]["coordinator"]["score"]) == CANARIES
    assert "EXCEEDS THE CLAIM" in shown.getvalue()
    # Every planted canary is trained on: no client keeps rows for its local evaluation in an audit.
    assert json.loads((tmp_path / "run" / "config.json").read_text())["eval_fraction"] == 0.0


def test_more_canaries_than_any_tensor_holds_is_refused_in_one_sentence(tiny_model_dir: Path) -> None:
    import torch

    from fedtune.client.config import ClientConfig, ModelSpec
    from fedtune.simulations.audit import CanaryAudit
    from fedtune.simulations.config import SimulationConfigError

    cfg = ClientConfig(labels=TINY_LABELS, model=ModelSpec(name=str(tiny_model_dir)))
    with pytest.raises(SimulationConfigError, match=r"--audit 100000: no trainable tensor has room .* at most 512 canaries"):
        CanaryAudit(100_000, sentiment_pool(), cfg, seed=0, device=torch.device("cpu"))


def test_a_bare_audit_flag_plants_1000_canaries_and_an_audit_is_never_resumed(tmp_path: Path, capsys) -> None:
    import json

    from fedtune.simulations.cli import main, parser
    from fedtune.simulations.config import build_config, read_flags

    assert build_config({}, read_flags(vars(parser().parse_args(["--audit"])))).audit == 1000
    assert build_config({}, {}).audit == 0  # no audit unless asked
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"audit": 200}))
    assert main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "an audited run cannot be resumed" in err and "Traceback" not in err
