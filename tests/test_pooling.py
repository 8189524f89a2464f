"""What the head reads: mean pooling as sentence-transformers checkpoints were trained, and its export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_LABELS


def _as_sentence_transformer(tiny_model_dir: Path, dest: Path, pooling: str) -> Path:
    """The tiny BERT, marked up as a sentence-transformers checkpoint trained with `pooling` ("mean" or "cls")."""
    shutil.copytree(tiny_model_dir, dest)
    (dest / "config_sentence_transformers.json").write_text("{}")
    (dest / "1_Pooling").mkdir()
    modes = {"pooling_mode_cls_token": pooling == "cls", "pooling_mode_mean_tokens": pooling == "mean"}
    (dest / "1_Pooling" / "config.json").write_text(json.dumps(modes))
    return dest


def test_auto_pooler_follows_how_the_checkpoint_was_trained(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedtune.client.model import ModelSpec, resolve_pooler

    mean = _as_sentence_transformer(tiny_model_dir, tmp_path / "mean", "mean")
    cls = _as_sentence_transformer(tiny_model_dir, tmp_path / "cls", "cls")
    assert resolve_pooler(ModelSpec(name=str(mean))) == "mean"
    assert resolve_pooler(ModelSpec(name=str(cls))) == "identity"
    assert resolve_pooler(ModelSpec(name=str(tiny_model_dir))) == "checkpoint"
    assert resolve_pooler(ModelSpec(name="minilm")) == "mean"  # the bundled all-MiniLM-L6-v2
    assert resolve_pooler(ModelSpec(name=str(mean), pooler="checkpoint")) == "checkpoint"


def test_mean_pooler_averages_real_tokens_only(tiny_model_dir: Path) -> None:
    import torch

    from fedtune.client.model import ModelSpec, build_model, load_tokenizer

    model = build_model(ModelSpec(name=str(tiny_model_dir), lora=False, pooler="mean"), TINY_LABELS).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    texts = ["good", "so very bad and long and dreadful indeed"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.bert(**batch)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
        assert torch.allclose(out.pooler_output, expected, atol=1e-6)
        # The short row, padded to the long one, gets the logits it gets alone: padding is left out.
        alone = model(**tokenizer(texts[:1], return_tensors="pt")).logits
        assert torch.allclose(model(**batch).logits[0], alone[0], atol=1e-5)


def test_mean_pooler_on_an_architecture_without_one_is_a_clear_error(tmp_path: Path) -> None:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from fedtune.client.model import ModelError, ModelSpec, build_model, load_tokenizer

    config = DistilBertConfig(vocab_size=load_tokenizer("minilm").vocab_size, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    DistilBertForSequenceClassification(config).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="pooler 'mean' needs a BERT classifier"):
        build_model(ModelSpec(name=str(tmp_path), pooler="mean"), TINY_LABELS)


TEXTS = ["good", "so very bad and long and dreadful indeed"]

# Run in a fresh interpreter: prints the pipeline's probabilities (in TINY_LABELS order) and every module it
# imported from the model folder or from transformers' copies of remote code (HF_MODULES_CACHE).
_LOAD = """
import json, os, sys
{before}
from transformers import pipeline
folder, modules_cache = os.path.realpath(sys.argv[1]), os.path.realpath(os.environ["HF_MODULES_CACHE"])
labels, texts = json.loads(sys.argv[2]), json.loads(sys.argv[3])
try:
    classify = pipeline("text-classification", model=sys.argv[1], device="cpu"{trust})
except ValueError as err:
    print(json.dumps({{"error": str(err)}}))
    raise SystemExit(0)
rows = [{{p["label"]: p["score"] for p in row}} for row in classify(texts, top_k=None)]
foreign = [
    name for name, module in list(sys.modules.items())
    if name.startswith("transformers_modules.")
    or os.path.realpath(getattr(module, "__file__", None) or "/").startswith((folder + os.sep, modules_cache + os.sep))
]
print(json.dumps({{"probabilities": [[row[label] for label in labels] for row in rows], "foreign": foreign}}))
"""


@pytest.fixture(scope="module")
def mean_pooled_export(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[float]]]:
    """A trained-looking mean-pooled LoRA model, exported; with its probabilities for TEXTS."""
    import torch

    from fedtune.client.model import ModelSpec, build_model, export_model, load_tokenizer

    model = build_model(ModelSpec(name=str(tiny_model_dir), pooler="mean"), TINY_LABELS).eval()
    with torch.no_grad():  # a head that is not the initial one, so the check sees what travels
        for name, param in model.named_parameters():
            if "classifier" in name and param.requires_grad:
                param.add_(torch.randn_like(param))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    with torch.no_grad():
        expected = torch.softmax(model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits, -1)
    out = export_model(model, tokenizer, tmp_path_factory.mktemp("export") / "model")
    return out, expected.tolist()


def _load_in_fresh_python(model_dir: Path, tmp_path: Path, before: str, trust: str) -> dict:
    import os

    modules_cache = tmp_path / "hf-modules"
    env = os.environ | {"HF_MODULES_CACHE": str(modules_cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    code = _LOAD.format(before=before, trust=trust)
    done = subprocess.run(
        [sys.executable, "-c", code, str(model_dir), json.dumps(TINY_LABELS), json.dumps(TEXTS)],
        stdin=subprocess.DEVNULL,  # transformers' "[y/N]" prompt for remote code would fail, not wait
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["modules_cache"] = sorted(p.name for p in modules_cache.rglob("*.py")) if modules_cache.exists() else []
    return result


def test_exported_model_loads_in_a_plain_pipeline_with_no_code_from_its_folder(mean_pooled_export, tmp_path: Path) -> None:
    import torch

    model_dir, expected = mean_pooled_export
    got = _load_in_fresh_python(model_dir, tmp_path, before="import fedtune.client", trust="")
    assert "error" not in got, got.get("error")
    assert torch.allclose(torch.tensor(got["probabilities"]), torch.tensor(expected), atol=1e-5)
    assert got["foreign"] == []  # nothing imported from the folder or from a copy of its pooling.py
    assert got["modules_cache"] == []  # transformers did not even copy the folder's code to run it


def test_exported_model_without_fedtune_needs_trust_remote_code(mean_pooled_export, tmp_path: Path) -> None:
    """The documented fallback: without fedtune the folder's pooling.py is the model's code, and only runs when asked."""
    import torch

    model_dir, expected = mean_pooled_export
    refused = _load_in_fresh_python(model_dir, tmp_path / "refused", before="", trust=", trust_remote_code=False")
    assert "trust_remote_code" in refused["error"]  # rather than silently pooling [CLS]
    trusted = _load_in_fresh_python(model_dir, tmp_path / "trusted", before="", trust=", trust_remote_code=True")
    assert torch.allclose(torch.tensor(trusted["probabilities"]), torch.tensor(expected), atol=1e-5)
    assert trusted["modules_cache"] and trusted["foreign"]  # this time it ran the folder's pooling.py, and the check sees it
