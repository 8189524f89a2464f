"""Local DP-SGD training itself: LoRA and full fine-tuning each take real Opacus steps and spend what was planned."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY_LABELS, sentiment_rows


@pytest.mark.parametrize(
    "lora,batch_size,pooler,head_clip_share",
    [
        (True, 8, "auto", 0),
        (False, 8, "auto", 0),
        (False, 1, "auto", 0),
        (True, 8, "mean", 0),
        (False, 8, "mean", 0),
        (True, 8, "mean", 0.25),
    ],  # fmt: skip
    # batch 1 of 40 rows: Poisson sampling draws many empty batches, each a noise-only step (ghost clipping
    # has no path for them in Opacus; fedtune's does).
    ids=[
        "lora-hooks",
        "full-finetune-ghost",
        "full-finetune-ghost-empty-batches",
        "lora-hooks-mean-pooling",
        "full-finetune-ghost-mean-pooling",
        "lora-hooks-head-clipped-apart",
    ],
)
def test_a_round_of_dp_sgd_changes_every_trainable_weight_and_spends_the_plan(
    lora: bool, batch_size: int, pooler: str, head_clip_share: float, tiny_model_dir: Path
) -> None:
    import datasets
    import torch

    from fedtune.client.config import ClientConfig, ModelSpec, PrivacySpec, TrainSpec
    from fedtune.client.model import build_model, load_tokenizer, trainable_state
    from fedtune.client.train import encode, plan_round, train_round
    from fedtune.privacy import epsilon_spent

    cfg = ClientConfig(
        labels=TINY_LABELS,
        model=ModelSpec(name=str(tiny_model_dir), lora=lora, max_length=32, pooler=pooler),
        privacy=PrivacySpec(head_clip_share=head_clip_share),
        train=TrainSpec(batch_size=batch_size, device="cpu"),
    )
    rows = sentiment_rows(40)
    names = list(TINY_LABELS)
    data = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [names.index(y) for _, y in rows]})
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = build_model(cfg.model, TINY_LABELS)
    before = {k: v.clone() for k, v in trainable_state(model).items()}
    # Without LoRA the position embeddings are trained too: Opacus needs per-example position ids for them.
    assert lora or any("position_embeddings" in k for k in before)
    plan = plan_round(len(data), cfg, num_rounds=2)
    outcome = train_round(model, encode(data, tokenizer, 32), tokenizer, cfg, plan=plan, history=[])
    assert outcome.steps == plan.steps and outcome.history == plan.as_history()
    after = trainable_state(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), sorted(set(before) - set(changed))[:5]
    assert all(torch.isfinite(v).all() for v in after.values())
    assert epsilon_spent(outcome.history * 2, cfg.privacy.delta) == pytest.approx(cfg.privacy.target_epsilon, rel=0.01)


@pytest.mark.parametrize("eval_fraction", [0.2, 0.0], ids=["too-few-rows-to-hold-back", "no-local-evaluation"])
def test_a_data_holder_with_no_local_evaluation_split_trains_and_evaluates(
    eval_fraction: float, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fewer than 10 rows, or eval fraction 0, leave no local evaluation split; encoding it used to crash."""
    import datasets
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedtune.client import wire
    from fedtune.client.app import handle_evaluate, handle_train
    from fedtune.client.config import ClientConfig, ModelSpec, TrainSpec
    from fedtune.client.model import build_model, trainable_state

    cfg = ClientConfig(
        labels=TINY_LABELS,
        model=ModelSpec(name=str(tiny_model_dir), max_length=32),
        train=TrainSpec(batch_size=4, device="cpu", eval_fraction=eval_fraction),
    )
    rows = sentiment_rows(6 if eval_fraction else 20)
    names = list(TINY_LABELS)
    data = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [names.index(y) for _, y in rows]})
    weights = {k: v.numpy() for k, v in trainable_state(build_model(cfg.model, TINY_LABELS)).items()}
    for attr in ("_run_id", "_node_id", "_task_id"):  # Messages can only be made inside a run
        monkeypatch.setattr(TaskIdentity, attr, 1)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    content = wire.Task(server_round=1, num_rounds=1, weights=weights).to_content()
    reply = handle_train(Message(content, dst_node_id=7, message_type="train"), context, cfg, lambda _: data, {})
    assert not reply.has_error()
    assert reply.content["metrics"]["num-examples"] == len(rows)  # every row trains: none is held back
    assert 0 < reply.content["metrics"]["epsilon"] <= cfg.privacy.target_epsilon * 1.01
    reply = handle_evaluate(Message(content, dst_node_id=7, message_type="evaluate"), context, cfg, lambda _: data)
    assert not reply.has_error() and reply.content["metrics"]["num-examples"] == 0


@pytest.mark.parametrize(
    "dp,pooler", [(True, "auto"), (False, "auto"), (True, "mean")], ids=["dp-sgd", "no-dp", "dp-sgd-mean-pooling"]
)
def test_length_grouped_passes_give_the_same_step_as_one_padded_pass(dp: bool, pooler: str, tiny_model_dir: Path) -> None:
    """Splitting each sampled batch into length-sorted passes (less padding) must not change the update:
    under DP, Opacus clips each row and adds noise once per batch either way."""
    import datasets
    import torch

    from fedtune.client.config import ClientConfig, ModelSpec, PrivacySpec, TrainSpec
    from fedtune.client.model import build_model, load_tokenizer, trainable_state
    from fedtune.client.train import encode, length_grouped, plan_round, train_round

    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = sentiment_rows(40)
    names = list(TINY_LABELS)
    texts = [" ".join([t] * (1 + i % 7)) for i, (t, _) in enumerate(rows)]  # 3 to 21 words: real padding
    data = encode(datasets.Dataset.from_dict({"text": texts, "label": [names.index(y) for _, y in rows]}), tokenizer, 64)

    def trained(rows_per_pass: int) -> dict[str, torch.Tensor]:
        cfg = ClientConfig(
            labels=TINY_LABELS,
            model=ModelSpec(name=str(tiny_model_dir), max_length=64, pooler=pooler),
            privacy=PrivacySpec(enabled=dp),
            train=TrainSpec(batch_size=16, physical_batch_size=rows_per_pass, device="cpu"),
        )
        model = build_model(cfg.model, TINY_LABELS)
        for module in model.modules():  # dropout draws differ with the pass shapes; the noise and sampling must not
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        plan = plan_round(len(data), cfg, num_rounds=1) if dp else None
        outcome = train_round(model, data, tokenizer, cfg, plan=plan, history=[], seed=3)
        assert outcome.steps == (plan.steps if dp else 3)
        return trainable_state(model)

    one_pass, grouped = trained(0), trained(4)
    for name, value in one_pass.items():
        torch.testing.assert_close(grouped[name], value, rtol=1e-4, atol=1e-5, msg=name)
    # The passes really are shorter: a batch's rows sorted by length, each pass cut to its own longest row.
    from fedtune.client.train import make_loader

    batch = next(iter(make_loader(data, tokenizer, 16, shuffle=False)))
    parts = length_grouped(batch, 4)
    assert [p["labels"].numel() for p in parts] == [4, 4, 4, 4]
    assert sum(p["input_ids"].numel() for p in parts) < 0.75 * batch["input_ids"].numel()
    assert sorted(torch.cat([p["labels"] for p in parts]).tolist()) == sorted(batch["labels"].tolist())


def test_predictions_come_back_in_the_order_of_the_rows(tiny_model_dir: Path) -> None:
    """Evaluation batches rows by length; what it returns must still line up with the rows given."""
    import datasets
    import torch

    from fedtune.client.config import ModelSpec
    from fedtune.client.evaluate import predict
    from fedtune.client.model import build_model, load_tokenizer
    from fedtune.client.train import encode, forward, make_loader

    tokenizer = load_tokenizer(str(tiny_model_dir))
    texts = [" ".join(["good"] * (1 + (i * 5) % 9)) + f" {i}" for i in range(20)]
    data = encode(datasets.Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(20)]}), tokenizer, 32)
    model = build_model(ModelSpec(name=str(tiny_model_dir)), TINY_LABELS)
    y, p, _ = predict(model, data, tokenizer, 4, torch.device("cpu"))
    assert y.tolist() == [i % 2 for i in range(20)]
    with torch.no_grad():  # one row at a time, in order: no padding, no reordering
        expected = [int(forward(model, b, torch.device("cpu")).logits.argmax(-1)) for b in make_loader(data, tokenizer, 1, False)]
    assert p.tolist() == expected


def test_the_cosine_schedule_scales_both_learning_rates_by_the_round(tiny_model_dir: Path, monkeypatch) -> None:
    """Round 2 of 3 under "cosine" trains exactly as a constant schedule with both rates at 0.75x."""
    import datasets
    import numpy as np
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedtune.client import wire
    from fedtune.client.app import handle_train
    from fedtune.client.config import ClientConfig, ModelSpec, PrivacySpec, TrainSpec
    from fedtune.client.model import build_model, trainable_state
    from fedtune.client.train import round_lr_scale

    assert [round_lr_scale("cosine", r, 3) for r in (1, 2, 3)] == pytest.approx([1.0, 0.75, 0.25])
    assert round_lr_scale("constant", 3, 3) == 1.0
    rows = sentiment_rows(20)
    names = list(TINY_LABELS)
    data = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [names.index(y) for _, y in rows]})
    model = ModelSpec(name=str(tiny_model_dir), max_length=32)
    weights = {k: v.numpy() for k, v in trainable_state(build_model(model, TINY_LABELS)).items()}
    for attr in ("_run_id", "_node_id", "_task_id"):  # Messages can only be made inside a run
        monkeypatch.setattr(TaskIdentity, attr, 1)

    def trained(**train: object) -> dict[str, np.ndarray]:
        cfg = ClientConfig(labels=TINY_LABELS, model=model, privacy=PrivacySpec(enabled=False),
                           train=TrainSpec(batch_size=4, device="cpu", **train))  # fmt: skip
        context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
        content = wire.Task(server_round=2, num_rounds=3, weights=weights).to_content()
        reply = handle_train(Message(content, dst_node_id=7, message_type="train"), context, cfg, lambda _: data, {})
        return {k: v.numpy() for k, v in reply.content["arrays"].items()}

    scheduled, constant = trained(lr_schedule="cosine"), trained()
    default = TrainSpec()
    scaled = trained(learning_rate=default.learning_rate * 0.75, head_learning_rate=default.head_learning_rate * 0.75)
    for name, value in scaled.items():
        np.testing.assert_allclose(scheduled[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    assert any(not np.allclose(scheduled[k], constant[k]) for k in constant)


def test_the_head_and_the_adapters_are_clipped_apart_with_the_same_total_norm(tiny_model_dir: Path) -> None:
    import warnings

    import datasets
    import torch

    from fedtune.client.config import ClientConfig, ModelSpec, PrivacySpec, TrainSpec
    from fedtune.client.model import build_model, is_head_parameter, load_tokenizer
    from fedtune.client.train import _step, clipping_norms, encode, make_loader
    from fedtune.privacy import make_private

    def one_noiseless_step(share: float) -> tuple[dict[str, float], dict[str, float], float]:
        cfg = ClientConfig(
            labels=TINY_LABELS,
            model=ModelSpec(name=str(tiny_model_dir), max_length=32, pooler="mean"),
            privacy=PrivacySpec(head_clip_share=share, max_grad_norm=0.5),
            train=TrainSpec(device="cpu"),
        )
        torch.manual_seed(0)
        model = build_model(cfg.model, TINY_LABELS)
        tokenizer = load_tokenizer(str(tiny_model_dir))
        data = encode(datasets.Dataset.from_dict({"text": ["a good film", "bad"], "label": [1, 0]}), tokenizer, 32)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        head = [(n, p) for n, p in named if is_head_parameter(n)]
        rest = [(n, p) for n, p in named if not is_head_parameter(n)]
        norms = clipping_norms(cfg, len(head), len(rest))
        params = [p for _, p in head + rest]
        optimizer = torch.optim.SGD([{"params": [p for _, p in head]}, {"params": [p for _, p in rest]}], lr=1.0)
        loader = make_loader(data, tokenizer, 2, shuffle=False)
        runner, optimizer, _, _, _ = make_private(model, optimizer, loader, noise_multiplier=0.0, max_grad_norm=norms, history=[])
        before = {n: p.detach().clone() for n, p in head + rest}
        with warnings.catch_warnings():  # frozen embeddings under LoRA: no hooked input requires grad
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            _step(runner, optimizer, [next(iter(loader))], True, torch.device("cpu"), None, params, 0.5, True)
        # lr 1, no noise, two rows, expected batch 2: each tensor moved by the mean of its two clipped gradients.
        moved = {n: float((p.detach() - before[n]).norm()) for n, p in head + rest}
        bound = dict(zip([n for n, _ in head + rest], norms)) if isinstance(norms, list) else {}
        total = optimizer.max_grad_norm
        runner.cleanup()
        return moved, bound, total

    flat, no_bounds, flat_total = one_noiseless_step(0.0)
    apart, bounds, apart_total = one_noiseless_step(0.01)
    assert no_bounds == {} and flat_total == pytest.approx(0.5)
    assert apart_total == pytest.approx(0.5)  # the noise scales with this: the same sensitivity as one flat clip
    assert sum(b**2 for b in bounds.values()) == pytest.approx(0.25)
    assert all(apart[n] <= bounds[n] * (1 + 1e-4) for n in bounds)  # no tensor exceeds its own norm
    heads = [n for n in bounds if is_head_parameter(n)]
    assert heads and sum(apart[n] ** 2 for n in heads) < 0.01 * 0.25 * (1 + 1e-3)  # 1% of the norm's square
    # With one flat clip the head, whose gradient is the largest, takes more of the step than 1%.
    assert sum(flat[n] ** 2 for n in heads) > sum(apart[n] ** 2 for n in heads)
