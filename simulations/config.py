"""The simulation's one configuration object: every role's settings, flat; defaults <- TOML file <- flags, validated once."""

from __future__ import annotations

import dataclasses
import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fedtune.client.config import ConfigError, ModelSpec, PrivacySpec, TrainSpec
from fedtune.client.settings import check_keys, coerce, compose, from_flat, key, load_toml, setting, settings
from fedtune.coordinator.config import CoordinatorConfig
from fedtune.simulations.datasets import DataSpec

T = TypeVar("T")

# 1000 canaries: the most a one-run audit can show grows with their number (every guess right: epsilon >= 3.7 with
# 200, 5.3 with 1000), while ~500 planted rows already double the audited client's share of the default data.
AUDIT_CANARIES = 1000
MIN_CANARIES = 10


class SimulationConfigError(ConfigError):
    """The simulation configuration is invalid; the message says which setting and why."""


@dataclass(frozen=True)
class SimulationRun:
    """Settings only a simulation has: where it runs and writes, and the simulated data holders' ledger."""

    client_budgets: dict[int, float] = setting(
        {}, flag="--client-budget", metavar="ID=EPSILON", help="a smaller epsilon budget for one client (repeatable)"
    )
    ledger: str = setting("", help="privacy ledger file; epsilon then composes across runs on the same data")
    out: str = setting("", help="run folder (default runs/<timestamp>)")
    cpus_per_client: float = setting(1.0, help="CPU cores reserved per simulated client")
    gpus_per_client: float = setting(0.0, help="GPU share per simulated client (0: 0.5 on CUDA, else none)")
    ray_address: str = setting(
        "",
        help="run the clients on this existing Ray cluster (HOST:PORT of its head, as `ray start --head` prints); "
        "default: a private Ray instance on 127.0.0.1 for this run only",
    )
    verbose: bool = setting(False, help="show Flower's and Ray's logs")
    audit: int = setting(
        0,
        const=AUDIT_CANARIES,
        help=f"plant N canaries in client 0's data (a bare --audit: {AUDIT_CANARIES}) and bound its epsilon from below "
        "empirically; writes audit.json (0: no audit)",
    )


# Every role a simulation plays, in the order --help lists their settings.
ROLES: tuple[type, ...] = (DataSpec, CoordinatorConfig, ModelSpec, PrivacySpec, TrainSpec, SimulationRun)


class _Methods:
    __slots__ = ()

    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{datetime.datetime.now():%Y%m%d-%H%M%S}")  # type: ignore[attr-defined]

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        data["labels"] = list(data["labels"])
        data["client_budgets"] = {str(k): v for k, v in data["client_budgets"].items()}
        return data


# Every knob of `fedtune-simulate`, one field per setting of ROLES, named by its key (the TOML key; flags use
# dashes). Nothing is defined here: a setting added to a role is a field here, a flag and a TOML key.
SimulationConfig = dataclasses.make_dataclass("SimulationConfig", compose(*ROLES), bases=(_Methods,), frozen=True)
SimulationConfig.__module__ = __name__  # pickle finds it here
SimulationConfig.__doc__ = "Every knob of `fedtune-simulate`: the settings of " + ", ".join(r.__name__ for r in ROLES) + "."

FIELDS = {f.name: f for f in dataclasses.fields(SimulationConfig)}


def role(cls: type[T], cfg: Any, **given: Any) -> T:
    """One role's settings object, from the simulation's settings of the same keys (plus what `given` fixes)."""
    return cls(**({f.name: getattr(cfg, key(f)) for f in settings(cls)} | given))


def _typed(where: str, data: dict[str, Any]) -> dict[str, Any]:
    data = {k.replace("-", "_"): v for k, v in data.items()}
    check_keys(data, SimulationConfig, where, SimulationConfigError)
    try:
        return from_flat(SimulationConfig, data)
    except ConfigError as err:
        raise SimulationConfigError(f"{where}: {err}") from None


def _coerce(name: str, value: Any) -> Any:
    try:
        return coerce(FIELDS[name], value)
    except ConfigError as err:
        raise SimulationConfigError(str(err)) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML file (top level or a [simulation] table), keys checked and typed."""
    path = Path(path)
    data = load_toml(path, SimulationConfigError, "give an existing settings file to --config")
    return _typed(str(path), data.get("simulation", data))


def read_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """Settings from parsed flags (strings, or lists for repeatable ones), typed by the same coercer as TOML."""
    return _typed("command line", flags)


def read_run_settings(run_dir: str | Path) -> dict[str, Any]:
    """The settings a run was started with (its config.json), for --resume."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise SimulationConfigError(f"{run_dir} is not a fedtune-simulate run folder (no config.json); nothing to resume")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise SimulationConfigError(f"{path} is unreadable ({err}); cannot resume") from None
    data = {k: v for k, v in data.items() if k in FIELDS or k == "fraction"}  # "fraction": older runs' name
    if data.get("budget_epsilon") is None:
        data.pop("budget_epsilon", None)
    return _typed(str(path), data) | {"out": str(run_dir)}


def build_config(file_settings: dict[str, Any], flag_settings: dict[str, Any]) -> Any:
    """Merge defaults, file and flags (flags win); every role then validates its own settings."""
    aliases = {a: f.name for f in FIELDS.values() for a in f.metadata["aliases"]}
    given = {aliases.get(k, k): v for k, v in (file_settings | flag_settings).items()}  # older names still work
    # Strings and lists (raw flags, from callers that skipped read_flags) are typed as a TOML file's would be.
    given = {k: _coerce(k, v) if isinstance(v, str | list) and k in FIELDS else v for k, v in given.items()}
    try:
        cfg = SimulationConfig(**given)
        for cls in ROLES[:-1]:
            role(cls, cfg, **({"out_dir": Path(cfg.out or ".")} if cls is CoordinatorConfig else {}))
    except TypeError as err:  # a key that is no setting, from a caller that skipped read_toml / read_flags
        raise SimulationConfigError(str(err)) from None
    checks = [
        (cfg.cpus_per_client > 0, f"cpus per client must be > 0, got {cfg.cpus_per_client}"),
        (cfg.gpus_per_client >= 0, f"gpus per client must be >= 0, got {cfg.gpus_per_client}"),
        (
            all(0 <= k < cfg.num_clients for k in cfg.client_budgets),
            f"client budgets name clients outside 0..{cfg.num_clients - 1}: {sorted(cfg.client_budgets)}",
        ),
        (
            cfg.audit == 0 or cfg.audit >= MIN_CANARIES,
            f"--audit needs at least {MIN_CANARIES} canaries (or 0 for no audit), got {cfg.audit}",
        ),
        (
            not (cfg.audit and cfg.dp and not cfg.lora),
            "--audit needs LoRA under DP: its gradient canaries join Opacus' per-sample gradients, which full "
            "fine-tuning never forms (ghost clipping); drop --full-finetune",
        ),
        (
            not (cfg.audit and cfg.ledger),
            "--audit compares this run's epsilon with what it can show; a shared --ledger would add earlier runs' "
            "spending to the claim: drop --ledger",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise SimulationConfigError(message)
    return cfg
