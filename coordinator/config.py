"""The coordinator's configuration: labels, model, rounds, strategy and where results go."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedtune.client.model import ModelSpec
from fedtune.privacy.update_codec import ENCODINGS

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum")


class CoordinatorConfigError(ValueError):
    """A coordinator setting is invalid; the message says which and why."""


@dataclass(frozen=True)
class CoordinatorConfig:
    """How the federation runs; validated on construction."""

    labels: tuple[str, ...]
    out_dir: Path
    model: ModelSpec = field(default_factory=ModelSpec)
    num_rounds: int = 5
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_clients: int = 2
    wait_for_clients: int = 0  # clients connected before round 1 starts, when more than min_clients
    proximal_mu: float = 0.01  # FedProx only
    server_learning_rate: float = 0.01  # FedAdam only (eta)
    round_timeout: float = 3600.0  # deadline of each phase (train, evaluate) of a round, in seconds
    round_retries: int = 1  # a round that too few clients answered is sent again this often, then the run stops
    join_timeout: float = 600.0  # how long to wait for min_clients to connect before giving up
    trim_fraction: float = 0.2  # fedtrimmedavg: share cut from each end per coordinate
    num_malicious: int = 0  # krum / multikrum: clients assumed Byzantine
    max_update_norm: float = 1e4  # updates farther than this from the global weights are rejected
    # User-level (client-level) central DP: clip each client's update, add noise to the aggregate.
    central_dp: bool = False
    central_noise_multiplier: float = 1.0
    central_clipping_norm: float = 1.0
    central_delta: float = 1e-5
    update_encoding: str = "float32"  # how clients send updates: float32, or int8 (8-bit quantised difference)
    resume: bool = False  # continue the run in out_dir from its last checkpoint
    metadata: dict = field(default_factory=dict)  # extra facts recorded in results.json

    def __post_init__(self) -> None:
        checks = [
            (self.num_rounds >= 1, f"rounds must be >= 1, got {self.num_rounds}"),
            (self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"),
            (
                0 < self.fraction_train <= 1,
                f"fraction of clients per round must be in (0, 1], got {self.fraction_train}",
            ),
            (0 <= self.fraction_evaluate <= 1, f"evaluate fraction must be in [0, 1], got {self.fraction_evaluate}"),
            (self.min_clients >= 1, f"min clients must be >= 1, got {self.min_clients}"),
            (self.wait_for_clients >= 0, f"clients to wait for must be >= 0, got {self.wait_for_clients}"),
            (self.proximal_mu >= 0, f"proximal mu must be >= 0, got {self.proximal_mu}"),
            (self.server_learning_rate > 0, f"server learning rate must be > 0, got {self.server_learning_rate}"),
            (self.round_timeout > 0, f"round timeout must be > 0, got {self.round_timeout}"),
            (self.round_retries >= 0, f"round retries must be >= 0, got {self.round_retries}"),
            (self.join_timeout > 0, f"join timeout must be > 0, got {self.join_timeout}"),
            (0 <= self.trim_fraction < 0.5, f"trim fraction must be in [0, 0.5), got {self.trim_fraction}"),
            (self.num_malicious >= 0, f"number of malicious clients must be >= 0, got {self.num_malicious}"),
            (self.max_update_norm > 0, f"max update norm must be > 0, got {self.max_update_norm}"),
            (self.central_noise_multiplier > 0, f"central noise multiplier must be > 0, got {self.central_noise_multiplier}"),
            (self.central_clipping_norm > 0, f"central clipping norm must be > 0, got {self.central_clipping_norm}"),
            (0 < self.central_delta < 1, f"central delta must be in (0, 1), got {self.central_delta}"),
            (
                self.update_encoding in ENCODINGS,
                f"update encoding must be one of {', '.join(ENCODINGS)}, got {self.update_encoding!r}",
            ),
            (not self.central_dp or self.strategy in ("fedavg", "fedprox"), "central DP wraps fedavg or fedprox only"),
        ]
        for ok, message in checks:
            if not ok:
                raise CoordinatorConfigError(message)
