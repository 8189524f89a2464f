"""The coordinator service's one configuration file (coordinator.toml): where it listens and what run it submits."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.coordinator.config import STRATEGIES, CoordinatorConfigError

DEFAULT_PORT = 9443


@dataclass(frozen=True)
class ServiceConfig:
    """Everything `fedtune-coordinator start` needs; paths are relative to the folder holding the file."""

    home: Path  # the folder `init` made: TLS files, registered nodes, SuperLink database, runs
    labels: tuple[str, ...]
    listen: str = "0.0.0.0"  # SuperLink's address for data holders; 127.0.0.1 for a single-host trial
    port: int = DEFAULT_PORT
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1")  # names clients use; they are in the certificate
    insecure: bool = False
    # the run
    model: str = "minilm"
    lora: bool = True
    lora_r: int = 8
    max_length: int = 64
    pooler: str = "auto"
    num_rounds: int = 5
    strategy: str = "fedavg"
    min_clients: int = 2
    wait_for_clients: int = 0  # clients connected before round 1 starts (0: min_clients); later rounds need min_clients
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01
    round_timeout: float = 3600.0  # seconds each phase of a round waits; clients that miss it are dropped
    round_retries: int = 1  # a round too few clients answered is sent again this often, then the run stops
    join_timeout: float = 600.0
    max_update_norm: float = 1e4
    update_encoding: str = "float32"  # or "int8": clients send 8-bit quantised differences (about 4x fewer bytes)
    central_dp: bool = False  # user-level DP-FedAvg on top of the clients' DP-SGD
    central_noise_multiplier: float = 1.0
    central_clipping_norm: float = 1.0
    central_delta: float = 1e-5
    # clients' local training (the same for every client; privacy is each data holder's own setting)
    optimizer: str = "sgd"
    learning_rate: float = 0.05
    head_learning_rate: float = 2.0
    batch_size: int = 128
    local_epochs: int = 1
    lr_schedule: str = "constant"  # or "cosine": both learning rates decay over the rounds
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [
            (len(self.labels) >= 2, f"labels: need at least two label names, got {list(self.labels)}"),
            (1 <= self.port <= 65535, f"port must be in 1..65535, got {self.port}"),
            (self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"),
            (self.min_clients >= 1, f"min_clients must be >= 1, got {self.min_clients}"),
            (
                self.wait_for_clients == 0 or self.wait_for_clients >= self.min_clients,
                f"wait_for_clients must be 0 (= min_clients) or >= min_clients ({self.min_clients}), got {self.wait_for_clients}",
            ),
            (self.num_rounds >= 1, f"num_rounds must be >= 1, got {self.num_rounds}"),
            (
                self.lr_schedule in ("constant", "cosine"),  # as the clients' TrainSpec checks, but before any joins
                f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}",
            ),
            (self.round_timeout > 0, f"round_timeout must be > 0 seconds, got {self.round_timeout}"),
            (self.round_retries >= 0, f"round_retries must be >= 0, got {self.round_retries}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CoordinatorConfigError(message)

    @property
    def clients_before_round_1(self) -> int:
        return self.wait_for_clients or self.min_clients

    # Where `init` puts things.
    @property
    def tls_dir(self) -> Path:
        return self.home / "tls"

    @property
    def nodes_dir(self) -> Path:
        return self.home / "nodes"

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    def run_config(self, out_dir: Path, resume: bool = False) -> dict[str, Any]:
        """The Flower run configuration the ServerApp and every ClientApp read (see */deploy.py);
        `resume` continues the run in out_dir from its last checkpoint."""
        return {
            "labels": ",".join(self.labels),
            "out-dir": str(out_dir.resolve()),
            "model": self.model,
            "lora": self.lora,
            "lora-r": self.lora_r,
            "max-length": self.max_length,
            "pooler": self.pooler,
            "num-rounds": self.num_rounds,
            "strategy": self.strategy,
            "min-clients": self.min_clients,
            "wait-for-clients": self.clients_before_round_1,
            "fraction-train": self.fraction_train,
            "fraction-evaluate": self.fraction_evaluate,
            "proximal-mu": self.proximal_mu,
            "server-learning-rate": self.server_learning_rate,
            "round-timeout": self.round_timeout,
            "round-retries": self.round_retries,
            "resume": resume,
            "join-timeout": self.join_timeout,
            "max-update-norm": self.max_update_norm,
            "update-encoding": self.update_encoding,
            "central-dp": self.central_dp,
            "central-noise-multiplier": self.central_noise_multiplier,
            "central-clipping-norm": self.central_clipping_norm,
            "central-delta": self.central_delta,
            "optimizer": self.optimizer,
            "learning-rate": self.learning_rate,
            "head-learning-rate": self.head_learning_rate,
            "batch-size": self.batch_size,
            "local-epochs": self.local_epochs,
            "lr-schedule": self.lr_schedule,
            "seed": self.seed,
            "metadata": json.dumps({"service": {"port": self.port, "insecure": self.insecure}}),
        }

    def to_toml(self) -> str:
        lines = ["# fedtune coordinator settings (written by `fedtune-coordinator init`; edit freely)"]
        for f in dataclasses.fields(self):
            if f.name in ("home", "extra"):
                continue
            value = getattr(self, f.name)
            lines.append(f"{f.name} = {json.dumps(list(value) if isinstance(value, tuple) else value)}")
        return "\n".join(lines) + "\n"


FIELDS = {f.name: f for f in dataclasses.fields(ServiceConfig)}


def read_service_config(path: Path, overrides: dict[str, Any] | None = None) -> ServiceConfig:
    """Read coordinator.toml (then apply command-line overrides), with errors that name the key."""
    if not path.is_file():
        raise CoordinatorConfigError(f"{path} does not exist; create it with `fedtune-coordinator init`")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise CoordinatorConfigError(f"{path} is not valid TOML: {err}") from None
    data |= overrides or {}
    unknown = sorted(set(data) - set(FIELDS) - {"home"})
    if unknown:
        raise CoordinatorConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name, value in data.items():
        default = FIELDS[name].default
        if isinstance(default, tuple) or name == "labels":
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise CoordinatorConfigError(f"{path}: {name} must be a list of strings")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise CoordinatorConfigError(f"{path}: {name} must be true or false, got {value!r}")
        elif isinstance(default, int | float) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise CoordinatorConfigError(f"{path}: {name} must be a number, got {value!r}")
            value = type(default)(value) if isinstance(default, float) or float(value).is_integer() else value
        elif isinstance(default, str) and not isinstance(value, str):
            raise CoordinatorConfigError(f"{path}: {name} must be a string, got {value!r}")
        values[name] = value
    if "labels" not in values:
        raise CoordinatorConfigError(f'{path}: labels is required, e.g. labels = ["negative", "positive"]')
    return ServiceConfig(home=path.parent.resolve(), **values)
