"""The public model factory: build the classifier or causal LM (LoRA or full) and move its trainable weights."""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedtune.client import pooling
from fedtune.client.config import DEFAULT_MODEL, ModelSpec
from fedtune.client.model_source import ModelError, checkpoint_file, resolve_model
from fedtune.client.pooling import MeanPooler, use_mean_pooling

__all__ = [
    "DEFAULT_MODEL",
    "ModelError",
    "ModelSpec",
    "MODELS",
    "ModelStore",
    "build_model",
    "export_model",
    "is_head_parameter",
    "load_tokenizer",
    "load_trainable_state",
    "trainable_state",
]


def _from_pretrained(loader, name: str, **kwargs):
    source = resolve_model(name)
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        where = "local directory" if Path(source).exists() else "Hugging Face hub name (needs internet)"
        raise ModelError(f"cannot load model {name!r} as a {where}: {str(err).splitlines()[0]}") from None


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


def _sentence_transformer_pooling(source: str) -> str | None:
    """The pooling a sentence-transformers checkpoint was trained with ("mean" or "cls"); None if it is not one."""
    if checkpoint_file(source, "config_sentence_transformers.json") is None:
        return None
    config = checkpoint_file(source, "1_Pooling/config.json")
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


def _load_causal_lm(spec: ModelSpec) -> torch.nn.Module:
    """A causal LM with LoRA adapters on every linear projection of attention and MLP (not the output layer)."""
    model = _from_pretrained(AutoModelForCausalLM, spec.name)
    # LoRA on all projections, not only peft's default (attention q and v): the MLP holds most of what a
    # small LM knows about style and vocabulary. SmolLM2-135M, r 8: 2.44M adapter weights, 1.8% of the model.
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0, target_modules="all-linear"
    )
    return get_peft_model(model, lora)


def _load_model(spec: ModelSpec, labels: tuple[str, ...]) -> torch.nn.Module:
    """The initial model, read from disk: the same weights for every party (fixed seed for head and adapters)."""
    with _quiet_transformers(), torch.random.fork_rng():
        torch.manual_seed(0)  # every party builds the same initial head and adapters
        if spec.causal_lm:
            return _load_causal_lm(spec)
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


class ModelStore:
    """Models and tokenizers read from disk once, then handed out: each model as a fresh copy, so no caller
    sees what another trained; each tokenizer as the one loaded (calling it sets truncation and padding per
    call, so its output does not depend on earlier calls; callers must not change its settings).

    Loading from disk dominates a simulated client's fixed cost, so each process that builds models again and
    again (a Ray worker, a data holder's runtime) keeps one store. `reset()` forgets everything: a model folder
    changed on disk, or a benchmark of the uncached pattern (benchmarks/p2_simulation.py).
    """

    def __init__(self, max_models: int = 2, max_tokenizers: int = 4) -> None:
        self.max_models = max_models
        self.max_tokenizers = max_tokenizers
        self._models: dict[tuple[ModelSpec, tuple[str, ...]], torch.nn.Module] = {}
        self._tokenizers: dict[str, PreTrainedTokenizerBase] = {}

    def model(self, spec: ModelSpec, labels: Sequence[str]) -> torch.nn.Module:
        """A fresh classifier for `labels`: a copy of the one loaded, never the loaded one itself."""
        key = (spec, tuple(labels))
        pristine = self._models.pop(key, None)
        self._models[key] = pristine = _load_model(*key) if pristine is None else pristine  # most recently used last
        _keep_newest(self._models, self.max_models)
        return copy.deepcopy(pristine)

    def tokenizer(self, name: str) -> PreTrainedTokenizerBase:
        """The tokenizer that belongs to model `name`."""
        tokenizer = self._tokenizers.pop(name, None)
        self._tokenizers[name] = tokenizer = _load_tokenizer(name) if tokenizer is None else tokenizer
        _keep_newest(self._tokenizers, self.max_tokenizers)
        return tokenizer

    def reset(self) -> None:
        """Forget every model and tokenizer: the next request reads from disk again."""
        self._models.clear()
        self._tokenizers.clear()


def _load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    tokenizer = _from_pretrained(AutoTokenizer, name)
    if tokenizer.pad_token is None:  # many causal LMs have none; padded positions are masked and never scored
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
    tokenizer.padding_side = "right"  # training and scoring pad on the right; generation sets left itself
    return tokenizer


def _keep_newest(entries: dict, size: int) -> None:
    for key in list(entries)[: max(len(entries) - size, 0)]:
        del entries[key]


# This process's store. Flower calls a ClientApp's handlers as plain functions in long-lived worker processes,
# so nothing shorter-lived than the process is there to own the models it keeps; this one object does, and
# `MODELS.reset()` empties it.
MODELS = ModelStore()


def build_model(spec: ModelSpec, labels: Sequence[str], store: ModelStore = MODELS) -> torch.nn.Module:
    """A fresh classifier for `labels`; with LoRA only adapters and the head are trainable."""
    return store.model(spec, labels)


def load_tokenizer(name: str, store: ModelStore = MODELS) -> PreTrainedTokenizerBase:
    """The tokenizer that belongs to a model (read from disk once per store)."""
    return store.tokenizer(name)


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

    A mean-pooled model is saved under its own model type (`pooling.MeanPooledBertConfig`). Where fedtune is
    installed and `fedtune.client` imported, a plain `pipeline(...)` loads it with fedtune's installed classes
    (client/auto_classes.py) and runs no code from the folder. For readers without fedtune, `client/pooling.py`
    is saved beside it and named in the config's `auto_map`: they load it with `trust_remote_code=True`.
    Either way it pools exactly as it was trained.
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
