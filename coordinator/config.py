"""The coordinator's settings (rounds, strategy, deadlines, central DP), each defined once, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedtune.client.config import ClientConfig, ConfigError
from fedtune.client.model import ModelSpec
from fedtune.client.settings import check_choices, same, setting
from fedtune.client.update_codec import ENCODINGS

STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum")


class CoordinatorConfigError(ConfigError):
    """A coordinator setting is invalid; the message says which and why."""


@dataclass(frozen=True)
class CoordinatorConfig:
    """How the federation runs; validated on construction."""

    labels: tuple[str, ...] = same(ClientConfig, "labels")
    out_dir: Path  # where results go; chosen by whoever starts the run, not a setting
    model: ModelSpec = field(default_factory=ModelSpec)
    num_rounds: int = setting(5, flag="--rounds", help="federated rounds")
    strategy: str = setting(
        "fedavg",
        choices=STRATEGIES,
        help="aggregation: fedprox uses --proximal-mu, fedadam --server-lr, fedtrimmedavg --trim-fraction, "
        "krum/multikrum --num-malicious",
    )
    fraction_train: float = setting(1.0, flag="--fraction", aliases=("fraction",), help="share of clients trained per round")
    fraction_evaluate: float = setting(1.0, help="share of clients evaluating the global model on their local split")
    min_clients: int = setting(2, help="replies a training round needs to be aggregated (at most the clients there are)")
    wait_for_clients: int = setting(0, help="clients connected before round 1 starts, when more than min_clients")
    proximal_mu: float = setting(0.01, help="FedProx proximal term")
    server_learning_rate: float = setting(
        0.01, flag="--server-lr", help="server learning rate: FedAdam's eta, or FedAvgM's step (1.0: plain FedAvg)"
    )
    server_momentum: float = setting(0.0, help="FedAvgM server momentum")
    round_timeout: float = setting(3600.0, help="seconds each phase (train, evaluate) of a round waits for clients")
    round_retries: int = setting(1, help="times a round too few clients answered is sent again before the run stops")
    join_timeout: float = setting(600.0, help="seconds to wait for enough clients to connect before giving up")
    trim_fraction: float = setting(0.2, help="fedtrimmedavg: share cut from each end per coordinate")
    num_malicious: int = setting(0, help="krum/multikrum: clients assumed Byzantine")
    max_update_norm: float = setting(1e4, help="updates farther than this from the global weights are rejected")
    # User-level (client-level) central DP: clip each client's update, add noise to the aggregate.
    central_dp: bool = setting(False, help="add user-level DP on the coordinator (DP-FedAvg), on top of DP-SGD")
    central_noise_multiplier: float = setting(1.0, flag="--central-noise", help="central DP noise multiplier")
    central_clipping_norm: float = setting(1.0, flag="--central-clip", help="central DP clipping norm of each client's update")
    central_delta: float = setting(1e-5, help="central DP delta (of the client-level guarantee)")
    update_encoding: str = setting(
        "float32", choices=ENCODINGS, help="how clients send updates; int8: 8-bit quantised difference (~4x smaller)"
    )
    resume: bool = False  # continue the run in out_dir from its last checkpoint
    # A causal LM's fixed prompts, completed by the final model into results.json (a simulation takes them from its
    # held-out rows), rendered with the chat template when the run trains on prompt/response rows.
    sample_prompts: tuple[str, ...] = ()
    sample_chat: bool = False
    metadata: dict = field(default_factory=dict)  # extra facts recorded in results.json

    def __post_init__(self) -> None:
        checks = [
            (self.num_rounds >= 1, f"rounds must be >= 1, got {self.num_rounds}"),
            (
                0 < self.fraction_train <= 1,
                f"fraction of clients per round must be in (0, 1], got {self.fraction_train}",
            ),
            (0 <= self.fraction_evaluate <= 1, f"evaluate fraction must be in [0, 1], got {self.fraction_evaluate}"),
            (self.min_clients >= 1, f"min clients must be >= 1, got {self.min_clients}"),
            (self.wait_for_clients >= 0, f"clients to wait for must be >= 0, got {self.wait_for_clients}"),
            (self.proximal_mu >= 0, f"proximal mu must be >= 0, got {self.proximal_mu}"),
            (self.server_learning_rate > 0, f"server learning rate must be > 0, got {self.server_learning_rate}"),
            (0 <= self.server_momentum < 1, f"server momentum must be in [0, 1), got {self.server_momentum}"),
            (self.round_timeout > 0, f"round timeout must be > 0, got {self.round_timeout}"),
            (self.round_retries >= 0, f"round retries must be >= 0, got {self.round_retries}"),
            (self.join_timeout > 0, f"join timeout must be > 0, got {self.join_timeout}"),
            (0 <= self.trim_fraction < 0.5, f"trim fraction must be in [0, 0.5), got {self.trim_fraction}"),
            (self.num_malicious >= 0, f"number of malicious clients must be >= 0, got {self.num_malicious}"),
            (self.max_update_norm > 0, f"max update norm must be > 0, got {self.max_update_norm}"),
            (self.central_noise_multiplier > 0, f"central noise multiplier must be > 0, got {self.central_noise_multiplier}"),
            (self.central_clipping_norm > 0, f"central clipping norm must be > 0, got {self.central_clipping_norm}"),
            (0 < self.central_delta < 1, f"central delta must be in (0, 1), got {self.central_delta}"),
            (not self.central_dp or self.strategy in ("fedavg", "fedprox"), "central DP wraps fedavg or fedprox only"),
        ]
        for ok, message in checks:
            if not ok:
                raise CoordinatorConfigError(message)
        try:
            check_choices(self)
        except ConfigError as err:
            raise CoordinatorConfigError(str(err)) from None
