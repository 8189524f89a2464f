"""The coordinator service's one configuration file (coordinator.toml): where it listens and what run it submits."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.client.config import ConfigError, ModelSpec, TrainSpec
from fedtune.client.model_source import ModelError, check_model, resolve_task
from fedtune.client.settings import (
    RUN,
    SERVICE,
    check_keys,
    compose,
    from_flat,
    key,
    load_toml,
    setting,
    settings,
    to_flower,
)
from fedtune.coordinator.config import CoordinatorConfig, CoordinatorConfigError

DEFAULT_PORT = 9443


@dataclass(frozen=True)
class ServiceSpec:
    """Settings only the service has: where its one public port listens, and which names it answers to."""

    listen: str = setting("0.0.0.0", scope=SERVICE, help="address the public port binds; 127.0.0.1 for a single-host trial")
    port: int = setting(DEFAULT_PORT, scope=SERVICE, help="the one port clients connect to")
    hosts: tuple[str, ...] = setting(
        ("localhost", "127.0.0.1"), scope=SERVICE, cli=False, help="names clients use; they are in the certificate"
    )
    insecure: bool = setting(False, scope=SERVICE, help="no TLS and no node authentication (testing only; loud)")


# What coordinator.toml holds: the service's own settings, the coordinator's, and the run settings every client
# receives (model and local training; privacy and device are each data holder's own).
ROLES: tuple[type, ...] = (ServiceSpec, CoordinatorConfig, ModelSpec, TrainSpec)


class _Methods:
    """What `fedtune-coordinator start` needs besides the settings; paths are relative to the folder holding the file."""

    __slots__ = ()

    def __post_init__(self) -> None:
        s: Any = self
        try:  # settles "auto" from the checkpoint's config; `start` checks the model itself (check_model)
            causal_lm = resolve_task(ModelSpec(**from_flat(ModelSpec, self.settings(), RUN))).causal_lm
        except ConfigError as err:
            raise CoordinatorConfigError(str(err)) from None
        checks = [
            (
                causal_lm or len(s.labels) >= 2,
                f'labels: a classifier needs two or more label names (labels = ["negative", "positive"]), got {list(s.labels)}',
            ),
            (not causal_lm or not s.labels, f"labels: a causal LM ({s.model}) has none, got {list(s.labels)}"),
            (1 <= s.port <= 65535, f"port must be in 1..65535, got {s.port}"),
            (
                s.wait_for_clients == 0 or s.wait_for_clients >= s.min_clients,
                f"wait_for_clients must be 0 (= min_clients) or >= min_clients ({s.min_clients}), got {s.wait_for_clients}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise CoordinatorConfigError(message)
        try:  # each role checks its own settings, before any client joins
            for cls in (ModelSpec, TrainSpec):
                cls(**from_flat(cls, self.settings(), RUN))
            CoordinatorConfig(**from_flat(CoordinatorConfig, self.settings()), out_dir=s.home)
        except CoordinatorConfigError:
            raise
        except ConfigError as err:
            raise CoordinatorConfigError(str(err)) from None

    def check_model(self) -> None:
        """The model suits the run (a causal LM for task causal-lm; rows fit its context), before anyone joins;
        this converts a GGUF model once, so `start` does it, not every command that reads the file."""
        try:
            check_model(ModelSpec(**from_flat(ModelSpec, self.settings(), RUN)))
        except ModelError as err:
            raise CoordinatorConfigError(str(err)) from None

    def settings(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in settings(type(self))}

    @property
    def clients_before_round_1(self) -> int:
        s: Any = self
        return s.wait_for_clients or s.min_clients

    # Where `init` puts things.
    @property
    def tls_dir(self) -> Path:
        return self.home / "tls"  # type: ignore[attr-defined]

    @property
    def nodes_dir(self) -> Path:
        return self.home / "nodes"  # type: ignore[attr-defined]

    @property
    def state_dir(self) -> Path:
        return self.home / "state"  # type: ignore[attr-defined]

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"  # type: ignore[attr-defined]

    def run_config(self, out_dir: Path, resume: bool = False) -> dict[str, Any]:
        """The Flower run configuration the ServerApp and every ClientApp read (see */deploy.py): every run
        setting under its Flower key; `resume` continues the run in out_dir from its last checkpoint."""
        s: Any = self
        return to_flower(self, RUN) | {
            # "auto" resolved here, once: a client resolving it from its own copy of the model could disagree
            "task": resolve_task(ModelSpec(**from_flat(ModelSpec, self.settings(), RUN))).task,
            "wait-for-clients": self.clients_before_round_1,
            "out-dir": str(out_dir.resolve()),
            "resume": resume,
            "metadata": json.dumps({"service": {"port": s.port, "insecure": s.insecure}}),
        }

    def to_toml(self) -> str:
        lines = ["# fedtune coordinator settings (written by `fedtune-coordinator init`; edit freely)"]
        for f in settings(type(self)):
            value = getattr(self, f.name)
            lines.append(f"# {f.metadata['help']}" + (f" ({', '.join(f.metadata['choices'])})" if f.metadata["choices"] else ""))
            lines.append(f"{key(f)} = {json.dumps(list(value) if isinstance(value, tuple) else value)}")
        return "\n".join(lines) + "\n"


_HOME = ("home", "Path", dataclasses.field())  # the folder `init` made: TLS files, registered nodes, database, runs
ServiceConfig = dataclasses.make_dataclass(
    "ServiceConfig",
    [_HOME, *compose(*ROLES, first=("labels",), scopes=(RUN, SERVICE))],
    bases=(_Methods,),
    frozen=True,
)
ServiceConfig.__module__ = __name__  # pickle finds it here
ServiceConfig.__doc__ = "Everything `fedtune-coordinator start` needs: the settings of " + ", ".join(r.__name__ for r in ROLES)

FIELDS = {f.name: f for f in dataclasses.fields(ServiceConfig)}


def read_service_config(path: Path, overrides: dict[str, Any] | None = None) -> Any:
    """Read coordinator.toml (then apply command-line overrides), with errors that name the file and the key."""
    data = load_toml(path, CoordinatorConfigError, "create it with `fedtune-coordinator init`")
    data |= overrides or {}
    check_keys(data, ServiceConfig, str(path), CoordinatorConfigError)
    data.setdefault("labels", [])  # a causal LM's run has none; a classifier's is refused without them
    try:
        values = from_flat(ServiceConfig, data)
    except ConfigError as err:
        raise CoordinatorConfigError(f"{path}: {err}") from None
    return ServiceConfig(home=path.parent.resolve(), **values)
