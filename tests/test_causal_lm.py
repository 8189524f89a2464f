"""A causal LM, federated: a real Flower simulation of a tiny Llama with LoRA under DP-SGD; loss on responses only."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant

from tests.conftest import write_instructions
from tests.test_simulation import RecordReplies

SECRET = "zq7secretprompt"


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path):
    """3 clients x 2 rounds of a tiny Llama on prompt/response rows, DP on; client 2's budget is below one round."""
    import cloudpickle

    import tests.test_simulation as recorder_module
    from fedtune.simulations.config import build_config
    from fedtune.simulations.run import simulate

    base = tmp_path_factory.mktemp("lm")
    data = write_instructions(base / "qa.jsonl", 150, secret=SECRET)
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
    assert results["train_tokens_per_second"] > 0
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
        assert SECRET.encode() not in r["array_bytes"]
        assert all(isinstance(v, int | float | list) for v in r["metrics"].values())  # numbers only, no text
        assert r["metrics"]["train-tokens"] > 0


def test_every_epsilon_recomputes_independently_and_the_client_over_budget_declines(lm_run) -> None:
    import dp_accounting

    cfg, results, out, replies = lm_run
    report = json.loads((out / "privacy.json").read_text())
    assert report["declined"] == {"2": [1, 2]}
    assert [r for r in replies if r["metrics"]["declined"] and r["records"] != {"metrics": "MetricRecord"}] == []
    for cid in ("0", "1"):
        per_round = [r["clients"][cid] for r in results["rounds"][1:]]
        for entry in per_round:
            history = list(zip(entry["history-noise"], entry["history-rate"], entry["history-steps"]))
            opacus = RDPAccountant()
            opacus.history = list(history)
            assert entry["epsilon"] == pytest.approx(opacus.get_epsilon(delta=cfg.delta), rel=1e-9)
            google = dp_accounting.rdp.RdpAccountant()
            for z, q, n in history:
                google.compose(
                    dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), n)
                )
            assert entry["epsilon"] == pytest.approx(google.get_epsilon(cfg.delta), rel=0.01)
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


def test_an_empty_poisson_batch_takes_the_noise_only_step(tiny_lm) -> None:
    """Poisson sampling draws empty batches (Llama cannot run one): the step still adds noise and is accounted."""
    import copy

    from fedtune.client.train import _step, make_loader
    from fedtune.privacy import make_private

    model, tokenizer = tiny_lm
    model = copy.deepcopy(model)
    data, batch = _batch(tokenizer, ROWS)
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
    assert all(not torch.equal(a, b) for a, b in zip(before, params))  # noise on every adapter
    assert len(engine.accountant.history) == 1
    runner.cleanup()


def test_a_long_row_keeps_its_response_and_stays_one_example(tiny_lm) -> None:
    from fedtune.client.causal_lm import IGNORE, encode_instructions

    _, tokenizer = tiny_lm
    rows = encode_instructions(["word " * 200], ["the answer is here"], tokenizer, 32)
    assert len(rows) == 1 and len(rows[0]["input_ids"]) == 32
    assert sum(label != IGNORE for label in rows[0]["labels"]) > 0


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
]


@pytest.mark.parametrize("name,args,needle", BAD_LM_INPUT, ids=[c[0] for c in BAD_LM_INPUT])
def test_fedtune_simulate_rejects_bad_causal_lm_input(name, args, needle, tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    from fedtune.simulations.cli import main

    code = main([*args(str(tiny_llama_dir), tmp_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
