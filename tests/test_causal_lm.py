"""A causal LM, federated: a real Flower simulation of a tiny Llama with LoRA under DP-SGD; loss on responses only."""

from __future__ import annotations

import copy
import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from tests.conftest import write_instructions
from tests.test_simulation import RecordReplies


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path):
    """3 clients x 2 rounds of a tiny Llama on prompt/response rows, DP on; client 2's budget is below one round."""
    import cloudpickle

    import tests.test_simulation as recorder_module
    from fedtune.simulations.config import build_config
    from fedtune.simulations.run import simulate

    base = tmp_path_factory.mktemp("lm")
    data = write_instructions(base / "qa.jsonl", 150)
    replies = base / "replies"
    replies.mkdir()
    cfg = build_config(
        {},
        dict(
            num_clients=3,
            num_rounds=2,
            dataset=str(data),
            model=str(tiny_llama_dir),  # task "auto": its config names LlamaForCausalLM
            prompt_column="q",
            response_column="a",
            learning_rate=0.5,
            batch_size=16,
            epsilon=8.0,
            client_budgets={2: 0.05},
            out=str(base / "run"),
            seed=1,
            ledger=str(base / "ledger.json"),
        ),
    )
    cloudpickle.register_pickle_by_value(recorder_module)  # Ray workers cannot import the tests package
    results = simulate(cfg, client_mods=[RecordReplies(replies)])
    recorded = [pickle.loads(p.read_bytes()) for p in replies.glob("*.pkl")]
    return cfg, results, base / "run", [r for r in recorded if r["type"] == "train"]


def test_results_report_perplexity_samples_and_throughput(lm_run) -> None:
    _, results, out, _ = lm_run
    assert json.loads((out / "results.json").read_text()) == results
    assert json.loads((out / "config.json").read_text())["task"] == "causal-lm"
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    for r in results["rounds"]:
        g = r["global"]
        assert g["perplexity"] == pytest.approx(torch.tensor(g["loss"]).exp().item(), rel=1e-6) and g["tokens"] > 0
    pooled = results["rounds"][2]["federated_evaluation"]
    assert pooled["perplexity"] > 1 and pooled["tokens"] > 0  # the clients' local splits, pooled by token
    assert results["baseline"] is None and results["labels"] == []
    assert [s["prompt"] for s in results["samples"]] and all(isinstance(s["completion"], str) for s in results["samples"])
    assert (out / "plots" / "metrics.png").stat().st_size > 1000


def test_global_adapters_changed_and_only_adapters_travel(lm_run, tiny_llama_dir: Path) -> None:
    from fedtune.client.config import ModelSpec
    from fedtune.client.model import build_model, trainable_state
    from fedtune.client.model_source import check_model
    from fedtune.coordinator.checkpoint import load_checkpoint

    _, _, out, replies = lm_run
    model = build_model(check_model(ModelSpec(name=str(tiny_llama_dir))), ())
    start = trainable_state(model)
    adapters = {n for n in start if "lora_" in n}
    assert adapters == set(start)  # nothing but LoRA adapters is trainable: no head, no embeddings
    # ... on every linear projection of attention and MLP (peft's default for Llama would be q and v only)
    assert {n.split(".")[-4] for n in adapters} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    end = load_checkpoint(out).arrays.to_torch_state_dict()
    assert set(end) == adapters
    assert any(not torch.equal(end[n], start[n]) for n in adapters if "lora_B" in n)  # B starts at zero
    trained = [r for r in replies if not r["metrics"]["declined"]]
    assert len(trained) == 4  # clients 0 and 1, two rounds each
    adapter_size = sum(t.numel() for t in start.values())
    base_size = sum(p.numel() for p in model.parameters())
    for r in trained:
        assert r["records"] == {"metrics": "MetricRecord", "arrays": "ArrayRecord"}
        assert set(r["layout"].names) == adapters and r["arrays"]
        assert sum(torch.Size(shape).numel() for _, shape in r["arrays"].values()) == adapter_size  # one flat array
        # float32 adapters and the array's header (numpy's, 128 bytes), not the model
        assert 4 * adapter_size <= len(r["array_bytes"]) <= 4 * adapter_size + 256 < base_size
        assert all(isinstance(v, int | float | list) for v in r["metrics"].values())  # numbers only, no text
        assert "train-tokens" not in r["metrics"]  # how many tokens the sampled rows held is not DP-protected


def test_every_epsilon_recomputes_independently_and_the_client_over_budget_declines(lm_run) -> None:
    from tests.independent_accounting import PRV_AGREEMENT, google_pld, opacus_prv

    cfg, results, out, replies = lm_run
    report = json.loads((out / "privacy.json").read_text())
    assert report["declined"] == {"2": [1, 2]}
    assert [r for r in replies if r["metrics"]["declined"] and r["records"] != {"metrics": "MetricRecord"}] == []
    for cid in ("0", "1"):
        per_round = [r["clients"][cid] for r in results["rounds"][1:]]
        for entry in per_round:
            history = list(zip(entry["history-noise"], entry["history-rate"], entry["history-steps"]))
            assert entry["epsilon"] == pytest.approx(google_pld(history, cfg.delta), rel=1e-6)
            assert entry["epsilon"] == pytest.approx(opacus_prv(history, cfg.delta), rel=PRV_AGREEMENT)
        assert per_round[0]["epsilon"] < per_round[1]["epsilon"] <= cfg.epsilon


def test_the_export_generates_text_with_a_plain_pipeline(lm_run) -> None:
    from transformers import pipeline

    _, _, out, _ = lm_run
    generate = pipeline("text-generation", model=str(out / "model"), device="cpu")
    text = generate("what is 1 plus 2", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("what is 1 plus 2") and len(text) > len("what is 1 plus 2")


# --- the loss: response tokens only, one row's gradient independent of the others -------------------------------


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir: Path):
    from fedtune.client.config import ModelSpec
    from fedtune.client.model import build_model, load_tokenizer
    from fedtune.client.model_source import check_model

    spec = check_model(ModelSpec(name=str(tiny_llama_dir)))
    return build_model(spec, ()), load_tokenizer(spec.name)


def _batch(tokenizer, rows: list[tuple[str, str]]):
    import datasets

    from fedtune.client.train import encode, make_loader

    data = encode(datasets.Dataset.from_dict({"prompt": [p for p, _ in rows], "response": [r for _, r in rows]}), tokenizer, 64)
    return data, next(iter(make_loader(data, tokenizer, len(data), shuffle=False)))


ROWS = [("what is 2 plus 3 and why", "2 plus 3 is 5"), ("name a colour", "blue")]


def test_instruction_rows_score_the_response_tokens_only(tiny_lm) -> None:
    from fedtune.client.causal_lm import IGNORE, render_prompt

    _, tokenizer = tiny_lm
    data, _ = _batch(tokenizer, ROWS)
    for (prompt, response), row in zip(ROWS, data):
        head = len(tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"])
        assert row["labels"][:head] == [IGNORE] * head
        assert row["labels"][head:] == row["input_ids"][head:] and IGNORE not in row["labels"][head:]
        assert tokenizer.decode(row["labels"][head:], skip_special_tokens=True).startswith(response)


def test_the_training_loss_ignores_prompt_tokens(tiny_lm) -> None:
    """The loss a round trains on equals the mean, over rows, of each row's mean loss on its response tokens, and
    not the loss over all tokens: changing what the model predicts at prompt positions leaves it unchanged."""
    import torch.nn.functional as F

    from fedtune.client.causal_lm import render_prompt
    from fedtune.client.train import _loss

    model, tokenizer = tiny_lm
    _, batch = _batch(tokenizer, ROWS)
    loss = _loss(model, batch, torch.device("cpu"), None, [], True)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected, everything = [], []
    for i, (prompt, _) in enumerate(ROWS):
        head = len(tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"])
        length = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i]
        expected.append(F.cross_entropy(logits[i, head - 1 : length - 1], ids[head:length]))
        everything.append(F.cross_entropy(logits[i, : length - 1], ids[1:length]))
    assert float(loss) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)
    assert float(loss) != pytest.approx(float(torch.stack(everything).mean()), rel=1e-3)


def test_a_rows_loss_does_not_depend_on_the_other_rows(tiny_lm) -> None:
    """Per-sample clipping bounds one row's influence only if its gradient is its own: the batch loss is the mean of
    per-row losses (Hugging Face's one mean over all tokens would weigh rows by the batch's token count)."""
    model, tokenizer = tiny_lm
    _, both = _batch(tokenizer, ROWS)
    from fedtune.client.train import _loss

    cpu = torch.device("cpu")
    singles = [float(_loss(model, _batch(tokenizer, [row])[1], cpu, None, [], True)) for row in ROWS]
    assert float(_loss(model, both, cpu, None, [], True)) == pytest.approx(sum(singles) / 2, rel=1e-5)


@pytest.mark.parametrize("task", ["causal-lm", "classification"])
def test_an_empty_poisson_batch_takes_the_noise_only_step(task: str, tiny_lm, tiny_model_dir: Path) -> None:
    """Poisson sampling draws empty batches, which neither Llama nor BERT can run (transformers 5; it failed a round
    of tests/test_load.py): the step still adds noise and is accounted."""
    import datasets

    from fedtune.client.config import ModelSpec
    from fedtune.client.model import build_model, load_tokenizer
    from fedtune.client.train import _step, encode, make_loader
    from fedtune.privacy import make_private

    if task == "causal-lm":
        model, tokenizer = copy.deepcopy(tiny_lm[0]), tiny_lm[1]
        data, batch = _batch(tokenizer, ROWS)
    else:
        model, tokenizer = build_model(ModelSpec(name=str(tiny_model_dir)), ("a", "b")), load_tokenizer(str(tiny_model_dir))
        data = encode(datasets.Dataset.from_dict({"text": ["good", "bad film"], "label": [0, 1]}), tokenizer, 32)
        batch = next(iter(make_loader(data, tokenizer, 2, shuffle=False)))
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    runner, optimizer, _, engine, _ = make_private(
        model,
        torch.optim.SGD(params, lr=1.0),
        make_loader(data, tokenizer, 2, shuffle=True),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        history=[],
    )
    empty = {k: v[:0] for k, v in batch.items()}
    assert _step(runner, optimizer, [empty], True, torch.device("cpu"), None, params, 1.0, True) == (0.0, 0)
    assert all(not torch.equal(a, b) for a, b in zip(before, params))  # noise on every trainable weight
    assert len(engine.accountant.history) == 1
    runner.cleanup()


def test_a_long_row_keeps_its_response_and_stays_one_example(tiny_lm) -> None:
    from fedtune.client.causal_lm import IGNORE, encode_instructions, render_prompt

    _, tokenizer = tiny_lm
    prompt, response = "start " + "word " * 200 + "finish", "the answer is here"
    (row,) = encode_instructions([prompt], [response], tokenizer, 32)
    head = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    scored = [t for t in row["labels"] if t != IGNORE]
    assert len(row["input_ids"]) == 32 and 0 < len(scored) <= 16  # the response keeps at least half the length
    assert tokenizer.decode(scored).startswith("the answer")  # from its start
    kept = row["input_ids"][: 32 - len(scored)]
    assert kept[:8] == head[:8] and kept[-8:] == head[-8:]  # the template's header and the prompt's end stay


def test_text_rows_score_every_token_and_end_once(tiny_lm) -> None:
    import datasets

    from fedtune.client.causal_lm import encode_instructions
    from fedtune.client.config import ClientConfig, ModelSpec, TrainSpec
    from fedtune.client.train import encode, train_round

    model, tokenizer = tiny_lm
    rows = encode(datasets.Dataset.from_dict({"text": ["a short note", "another note here"] * 8}), tokenizer, 64)
    assert all(r["labels"] == r["input_ids"] and r["input_ids"].count(tokenizer.eos_token_id) == 1 for r in rows)
    spec = ModelSpec(name="unused", task="causal-lm")
    outcome = train_round(
        model, rows, tokenizer, ClientConfig(labels=(), model=spec, train=TrainSpec(batch_size=8)), plan=None, history=[]
    )
    assert outcome.steps == 2 and 0 < outcome.mean_loss < 20 and outcome.tokens == sum(len(r["input_ids"]) for r in rows)
    plain = copy.copy(tokenizer)
    plain.chat_template = None  # no template: the prompt, a newline, the response and an end-of-text token
    (row,) = encode_instructions(["a question"], ["its answer"], plain, 64)
    assert plain.decode([t for t in row["labels"] if t >= 0]) == "its answer [SEP]"


def test_a_rows_gradient_is_its_own_under_opacus(tiny_lm) -> None:
    """Each row's per-sample gradient in a batch of rows of different lengths equals its gradient alone."""
    from opacus import GradSampleModule

    from fedtune.client.train import _loss

    model, tokenizer = tiny_lm
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at zero, which would make every adapter gradient but B's zero
    sampled = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    params = [p for p in sampled.parameters() if p.requires_grad]

    def per_row(rows):
        for p in params:
            p.grad_sample, p.grad = None, None
        _loss(sampled, _batch(tokenizer, rows)[1], torch.device("cpu"), None, params, True).backward()
        return [p.grad_sample.clone() for p in params]

    rows = [*ROWS, ("hi", "hello there friend of mine")]
    together = per_row(rows)
    for i, row in enumerate(rows):
        alone = per_row([row])
        assert all(torch.allclose(t[i], a[0], rtol=1e-4, atol=1e-7) for t, a in zip(together, alone))
    sampled._close()


def test_hostile_evaluations_are_rejected_and_pooling_weighs_tokens() -> None:
    from flwr.app import Message, MetricRecord, RecordDict

    from fedtune.client import wire
    from fedtune.coordinator.replies import Rejected, accept_evaluate
    from fedtune.coordinator.strategy import aggregate_evaluate_metrics

    def reply(**metrics) -> Message:
        base = {wire.CLIENT_ID: 7, wire.NUM_EXAMPLES: 2, wire.WEIGHT: 1}
        return Message(RecordDict({wire.METRICS: MetricRecord(base | metrics)}), dst_node_id=1, message_type="evaluate")

    bad = {
        "no token count": {wire.LOSS: 1.0},
        "no token": {wire.LOSS: 1.0, wire.TOKENS: 0},
        "a classifier's score": {wire.LOSS: 1.0, wire.TOKENS: 5, wire.ACCURACY: 0.5},
        "an overflowing loss": {wire.LOSS: 1e308, wire.TOKENS: 5},
        "more tokens than rows hold": {wire.LOSS: 0.0, wire.TOKENS: 2 * 64 + 1},
    }
    for what, metrics in bad.items():
        with pytest.raises(Rejected):
            accept_evaluate(reply(**metrics), 7, 0, 64)
            pytest.fail(what)
    with pytest.raises(Rejected):  # and a classifier's reply does not carry tokens
        accept_evaluate(reply(**{wire.LOSS: 1.0, wire.TOKENS: 5, wire.CONFUSION: [1.0, 0.0, 0.0, 1.0]}), 7, 2, 64)
    ok = [accept_evaluate(reply(**{wire.LOSS: loss, wire.TOKENS: n}), 7, 0, 64) for loss, n in ((1.0, 100), (3.0, 10))]
    pooled = aggregate_evaluate_metrics([RecordDict({wire.METRICS: MetricRecord(r.metrics())}) for r in ok], wire.WEIGHT)
    assert pooled[wire.LOSS] == pytest.approx((1.0 * 100 + 3.0 * 10) / 110)  # per token, not per client
    assert pooled[wire.PERPLEXITY] == pytest.approx(math.exp(pooled[wire.LOSS])) and pooled[wire.TOKENS] == 110


def test_classifier_and_causal_lm_on_the_same_texts_spend_one_budget(tmp_path: Path) -> None:
    import datasets

    from fedtune.client.data import ledger_keys
    from fedtune.privacy.ledger import Ledger, fingerprint_rows

    texts = ["first row", "second row"]
    labelled, _ = ledger_keys(datasets.Dataset.from_dict({"text": texts, "label": [0, 1]}), ("neg", "pos"))
    plain, older = ledger_keys(datasets.Dataset.from_dict({"text": texts}), ())
    assert labelled == plain and older == ()
    _, (legacy,) = ledger_keys(datasets.Dataset.from_dict({"text": texts, "label": [0, 1]}), ("neg", "pos"))
    assert legacy == fingerprint_rows([("first row", "neg"), ("second row", "pos")])  # what ledgers held before
    ledger = Ledger(tmp_path / "ledger.json")
    ledger.reserve(legacy, [(1.0, 0.1, 50)], budget=100, delta=1e-5, accountant="rdp", run_id="old", round_id=1)
    ledger.reserve(plain, [(1.0, 0.1, 50)], budget=100, delta=1e-5, accountant="rdp", run_id="new", round_id=1, also=(legacy,))
    assert ledger.history(plain, also=(legacy,)) == [(1.0, 0.1, 50)] * 2
    spent = ledger.spent(plain, 1e-5, "rdp", also=(legacy,))
    refused = ledger.reserve(
        plain, [(1.0, 0.1, 50)], budget=spent + 0.01, delta=1e-5, accountant="rdp", run_id="x", round_id=2, also=(legacy,)
    )
    assert not refused.granted  # the older key's rounds count against the budget


def test_an_unwritable_model_cache_is_one_sentence(tmp_path: Path, monkeypatch, capsys) -> None:
    from fedtune.simulations.cli import main

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("FEDTUNE_CACHE", "/dev/null/cache")
    assert main(["--model", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "set FEDTUNE_CACHE to a writable folder" in err and "Traceback" not in err


# --- bad input: one sentence, exit 2, no run folder ----------------------------------------------------------------


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


QA = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(12)]


def lm(rows: list[dict] = QA, *flags: str, columns: tuple[str, ...] = ("--prompt-column", "q", "--response-column", "a")):
    """Arguments for a run of the tiny Llama on `rows` (prompt/response columns q and a unless `columns` says else)."""
    return lambda model, tmp: ["--model", model, "--dataset", _jsonl(tmp / "x.jsonl", rows), *columns, *flags]


def _junk_gguf(tmp: Path) -> str:
    (tmp / "m.gguf").write_bytes(b"GGUF, not really")
    return str(tmp / "m.gguf")


BAD_LM_INPUT = [
    ("no text column", lm(columns=()), "a causal LM reads one text column"),
    ("prompt column missing", lm(columns=("--prompt-column", "question", "--response-column", "a")), "no column 'question'"),
    ("only a prompt column", lm(columns=("--prompt-column", "q")), "needs both a prompt and a response column"),
    ("empty row", lm([{"text": "a"}, {"text": " "}], columns=()), "row 2: column 'text' is empty"),
    ("prompt without response", lm([*QA, {"q": "why", "a": ""}]), "row 13: a prompt without a response"),
    ("classifier as causal LM", lambda d, t: ["--model", "minilm", "--task", "causal-lm"], "is not a causal language model"),
    ("unreadable GGUF", lambda d, t: ["--model", _junk_gguf(t)], "cannot read"),
    ("max length beyond context", lm(QA, "--max-length", "1000"), "beyond the context"),
    ("full fine-tuning", lm(QA, "--full-finetune"), "LoRA adapters only"),
    ("label partitioning", lm(QA, "--partitioning", "dirichlet"), "a causal LM's rows have none"),
    ("labels for a causal LM", lm(QA, "--labels", "a,b"), "--labels asks for a classifier"),
]


@pytest.mark.parametrize("name,args,needle", BAD_LM_INPUT, ids=[c[0] for c in BAD_LM_INPUT])
def test_fedtune_simulate_rejects_bad_causal_lm_input(name, args, needle, tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    from fedtune.simulations.cli import main

    code = main([*args(str(tiny_llama_dir), tmp_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
