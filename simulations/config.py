"""The simulation's one configuration object: defaults <- TOML file <- command-line flags, validated once."""

from __future__ import annotations

import dataclasses
import datetime
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.client.config import DEFAULT_MODEL


class SimulationConfigError(ValueError):
    """The simulation configuration is invalid; the message says which setting and why."""


@dataclass(frozen=True)
class SimulationConfig:
    """Every knob of `fedtune-simulate`; field names are the TOML keys (flags use dashes)."""

    # federation
    num_clients: int = 10
    num_rounds: int = 5
    fraction: float = 1.0
    fraction_evaluate: float = 1.0
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01
    trim_fraction: float = 0.2
    num_malicious: int = 0
    max_update_norm: float = 1e4
    update_encoding: str = "float32"
    round_timeout: float = 3600.0
    round_retries: int = 1
    # data
    dataset: str = "vader"
    text_column: str = "text"
    label_column: str = "label"
    labels: tuple[str, ...] = ()
    test_fraction: float = 0.15
    test_dataset: str = ""  # a separate file for the central evaluation; then test_fraction is unused
    partitioning: str = "dirichlet"
    alpha: float = 0.5
    shards_per_client: int = 2
    # model
    model: str = DEFAULT_MODEL
    lora: bool = True
    lora_r: int = 8
    max_length: int = 64
    pooler: str = "auto"
    # privacy
    dp: bool = True
    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    budget_epsilon: float = 0.0  # every client's hard limit; 0 means the target epsilon
    client_budgets: dict[int, float] = field(default_factory=dict)  # client id -> epsilon budget
    ledger: str = ""
    central_dp: bool = False  # user-level DP on the coordinator (DP-FedAvg), on top of DP-SGD
    central_noise_multiplier: float = 1.0
    central_clipping_norm: float = 1.0
    central_delta: float = 1e-5  # a privacy ledger file: epsilon then composes across runs on the same data
    # local training
    optimizer: str = "sgd"
    learning_rate: float = 0.05
    head_learning_rate: float = 2.0
    batch_size: int = 128
    physical_batch_size: int = 32  # rows per length-sorted forward/backward pass (0: one pass per batch)
    local_epochs: int = 1
    lr_schedule: str = "constant"  # or "cosine": both learning rates decay over the rounds
    eval_fraction: float = 0.2  # share of each client's data kept for its local evaluation
    # run
    seed: int = 0
    device: str = "auto"
    out: str = ""
    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    ray_address: str = ""  # an existing Ray cluster (ray.init(address=...)); empty: a private one on loopback
    verbose: bool = False

    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{datetime.datetime.now():%Y%m%d-%H%M%S}")

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["labels"] = list(self.labels)
        data["client_budgets"] = {str(k): v for k, v in self.client_budgets.items()}
        return data


FIELDS = {f.name: f for f in dataclasses.fields(SimulationConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Check a TOML value's type against the field, with a message naming the key."""
    kind = FIELDS[name].type
    try:
        if kind == "bool":
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError
            return value
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError
            return float(value)
        if kind == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
        if kind == "tuple[str, ...]":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return tuple(value)
        if kind == "dict[int, float]":
            if not isinstance(value, dict):
                raise TypeError
            return {int(k): float(v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise SimulationConfigError(f"setting {name!r}: expected {kind}, got {value!r}") from None
    return value


def read_toml(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML file (top level or a [simulation] table), keys checked and typed."""
    path = Path(path)
    if not path.is_file():
        raise SimulationConfigError(f"{path}: config file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SimulationConfigError(f"{path}: not valid TOML: {err}") from None
    data = data.get("simulation", data)
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise SimulationConfigError(f"{path}: unknown setting {key!r}; known settings: {', '.join(sorted(FIELDS))}")
        out[name] = _coerce(name, value)
    return out


def read_run_settings(run_dir: str | Path) -> dict[str, Any]:
    """The settings a run was started with (its config.json), for --resume."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise SimulationConfigError(f"{run_dir} is not a fedtune-simulate run folder (no config.json); nothing to resume")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise SimulationConfigError(f"{path} is unreadable ({err}); cannot resume") from None
    return {k: _coerce(k, v) for k, v in data.items() if k in FIELDS} | {"out": str(run_dir)}


def build_config(file_settings: dict[str, Any], flag_settings: dict[str, Any]) -> SimulationConfig:
    """Merge defaults, file and flags (flags win) and check cross-field constraints."""
    cfg = SimulationConfig(**(file_settings | flag_settings))
    checks = [
        (cfg.num_clients >= 1, f"number of clients must be >= 1, got {cfg.num_clients}"),
        (cfg.num_rounds >= 1, f"number of rounds must be >= 1, got {cfg.num_rounds}"),
        (cfg.round_timeout > 0, f"round timeout must be > 0 seconds, got {cfg.round_timeout}"),
        (cfg.round_retries >= 0, f"round retries must be >= 0, got {cfg.round_retries}"),
        (cfg.cpus_per_client > 0, f"cpus per client must be > 0, got {cfg.cpus_per_client}"),
        (cfg.gpus_per_client >= 0, f"gpus per client must be >= 0, got {cfg.gpus_per_client}"),
        (
            all(0 <= k < cfg.num_clients for k in cfg.client_budgets),
            f"client budgets name clients outside 0..{cfg.num_clients - 1}: {sorted(cfg.client_budgets)}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise SimulationConfigError(message)
    return cfg
