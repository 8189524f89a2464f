"""Every setting is defined once and reaches the simulation and the deployed coordinator and client alike."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from fedtune.client.config import ClientConfig, ColumnSpec, ModelSpec, PrivacySpec, TrainSpec, node_config
from fedtune.client.settings import NODE, RUN, defined_in, flag, key, parse_labels, settings
from fedtune.coordinator.config import CoordinatorConfig
from fedtune.coordinator.service_config import ServiceConfig, ServiceSpec, read_service_config
from fedtune.simulations.config import SimulationConfig, SimulationRun, build_config, read_flags, read_toml, role
from fedtune.simulations.datasets import DataSpec

# Every role's own settings; SimulationConfig and ServiceConfig only compose them.
ROLES = (ModelSpec, PrivacySpec, TrainSpec, ColumnSpec, ClientConfig, CoordinatorConfig, DataSpec, SimulationRun, ServiceSpec)
# The roles both a simulation and a deployment play (the rest belong to one of them only).
SHARED = (ModelSpec, PrivacySpec, TrainSpec, ColumnSpec, CoordinatorConfig)
LABELS = ("neg", "pos")

# A valid value that is not the default, for settings where "default + something" is not valid.
OTHER: dict[str, Any] = {
    "labels": ("x", "y", "z"),
    "strategy": "fedprox",
    "pooler": "mean",
    "optimizer": "adamw",
    "accountant": "prv",
    "lr_schedule": "cosine",
    "update_encoding": "int8",
    "partitioning": "iid",
    "task": "classification",
    "device": "cpu",
    "model": "./my-model-dir",  # a path: a bare name would be looked up on the hub (slow offline)
    "wait_for_clients": 3,  # >= min_clients
    "audit": 50,  # >= 10 canaries
    "budget_epsilon": 4.0,
    "client_budgets": {1: 0.5},
    "hosts": ("example.org",),
    "listen": "127.0.0.1",
}


def _other(f: dataclasses.Field) -> Any:
    name = key(f)
    if name in OTHER:
        return OTHER[name]
    default = f.default
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default / 2 if default else 0.5
    if isinstance(default, str):
        return default + "x"
    raise AssertionError(f"no other value for {name}")


def _as_flag(f: dataclasses.Field, value: Any) -> list[str]:
    if isinstance(value, bool):
        return [flag(f)]
    if isinstance(value, tuple):
        return [flag(f), ",".join(value)]
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in (flag(f), f"{k}={v}")]
    return [flag(f), str(value)]


def _as_toml(name: str, value: Any) -> str:
    if isinstance(value, dict):
        return f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in value.items())
    return f"{name} = {json.dumps(list(value) if isinstance(value, tuple) else value)}\n"


def _cases(*roles: type) -> list[tuple[type, dataclasses.Field]]:
    return [(cls, f) for cls in roles for f in settings(cls) if defined_in(f, cls).endswith(f"{cls.__qualname__}.{f.name}")]


def _id(case: tuple[type, dataclasses.Field]) -> str:
    return f"{case[0].__name__}.{case[1].name}"


def test_every_setting_has_exactly_one_definition() -> None:
    owners: dict[str, set[str]] = {}
    for cls in ROLES:
        for f in settings(cls):
            owners.setdefault(key(f), set()).add(defined_in(f, cls))
    assert {k: v for k, v in owners.items() if len(v) > 1} == {}
    # The composed configurations hold exactly the roles' settings, nothing of their own.
    for composed in (SimulationConfig, ServiceConfig):
        for f in settings(composed):
            assert f.metadata["help"], f.name
            assert owners[f.name] == {defined_in(f, composed)}, f.name
    assert set(owners) - {f.name for f in settings(SimulationConfig)} == {"listen", "port", "hosts", "insecure"}
    every_run_setting = {key(f) for cls in (CoordinatorConfig, ModelSpec, TrainSpec) for f in settings(cls, RUN)}
    assert every_run_setting <= {f.name for f in settings(ServiceConfig)}


def _sim_use(cls: type, f: dataclasses.Field, cfg: Any) -> Any:
    """Where a simulation reads the setting: the role objects simulations/run.py builds from its config."""
    if cls in (ModelSpec, PrivacySpec, TrainSpec):
        from fedtune.simulations.run import client_config

        part = {ModelSpec: "model", PrivacySpec: "privacy", TrainSpec: "train"}[cls]
        return getattr(getattr(client_config(cfg, LABELS), part), f.name)
    if cls is CoordinatorConfig:
        return getattr(role(CoordinatorConfig, cfg, out_dir=Path("unused")), f.name)
    if cls in (DataSpec, ColumnSpec, ClientConfig):
        return getattr(role(DataSpec, cfg), key(f))
    return getattr(cfg, key(f))


SIM_CASES = _cases(*ROLES[:-1])


@pytest.mark.parametrize("case", SIM_CASES, ids=[_id(c) for c in SIM_CASES])
def test_a_setting_reaches_the_simulation_from_a_flag_and_from_toml(case, tmp_path: Path) -> None:
    from fedtune.simulations.cli import parser

    cls, f = case
    value = _other(f)
    base = {"min_clients": "3"} if key(f) == "wait_for_clients" else {}
    args = vars(parser().parse_args(_as_flag(f, value)))
    by_flag = build_config({}, read_flags(args | base))
    (tmp_path / "run.toml").write_text("min_clients = 3\n" * bool(base) + _as_toml(key(f), value))
    by_file = build_config(read_toml(tmp_path / "run.toml"), {})
    for cfg in (by_flag, by_file):
        assert getattr(cfg, key(f)) == value
        assert _sim_use(cls, f, cfg) == value
    assert value != getattr(build_config({}, {}), key(f))


@pytest.fixture
def coordinator_toml(tmp_path: Path) -> Path:
    path = tmp_path / "coord" / "coordinator.toml"
    path.parent.mkdir()
    path.write_text(ServiceConfig(home=path.parent, labels=LABELS).to_toml())
    return path


def _deployed(service: Any, node: dict[str, Any]) -> tuple[CoordinatorConfig, ClientConfig]:
    """What the deployed ServerApp and a deployed ClientApp build from the run config `service` submits."""
    from fedtune.client.deploy import config_from_context
    from fedtune.coordinator.deploy import config_from_run

    run_config = service.run_config(Path("out"))
    assert all(isinstance(v, bool | int | float | str) for v in run_config.values())  # Flower's value types
    return config_from_run(run_config)[0], config_from_context(run_config, node)


def _deployed_use(cls: type, f: dataclasses.Field, coord: CoordinatorConfig, client: ClientConfig) -> Any:
    if cls is CoordinatorConfig:
        return getattr(coord, f.name)
    if cls is ClientConfig:
        assert coord.labels == client.labels
        return client.labels
    part = {ModelSpec: "model", TrainSpec: "train"}[cls]
    if cls is ModelSpec:
        assert coord.model == client.model  # the coordinator builds the same model
    return getattr(getattr(client, part), f.name)


RUN_CASES = [(cls, f) for cls, f in _cases(CoordinatorConfig, ModelSpec, TrainSpec, ClientConfig) if f.metadata["scope"] == RUN]


@pytest.mark.parametrize("case", RUN_CASES, ids=[_id(c) for c in RUN_CASES])
def test_a_run_setting_reaches_the_deployed_coordinator_and_client(case, coordinator_toml: Path) -> None:
    from fedtune.coordinator.cli import _overrides, parser

    cls, f = case
    value = _other(f)
    extra = "min_clients = 3\n" if key(f) == "wait_for_clients" else ""
    replaced = (f"{key(f)} =", "min_clients =" if extra else f"{key(f)} =")
    lines = [line for line in coordinator_toml.read_text().splitlines() if not line.startswith(replaced)]
    coordinator_toml.write_text("\n".join(lines) + "\n" + extra + _as_toml(key(f), value))
    by_file = read_service_config(coordinator_toml)
    coordinator_toml.write_text("\n".join(lines) + "\n" + extra)
    args = parser().parse_args(["start", "--config", str(coordinator_toml), *_as_flag(f, value)])
    by_flag = read_service_config(coordinator_toml, _overrides(args))
    for service in (by_file, by_flag):
        coord, client = _deployed(service, {})
        assert _deployed_use(cls, f, coord, client) == value


NODE_CASES = [(cls, f) for cls, f in _cases(PrivacySpec, TrainSpec, ColumnSpec) if f.metadata["scope"] == NODE]


@pytest.mark.parametrize("case", NODE_CASES, ids=[_id(c) for c in NODE_CASES])
def test_a_node_setting_reaches_the_deployed_client(case, tmp_path: Path) -> None:
    from fedtune.client.cli import node_settings, parser
    from fedtune.client.deploy import NodeData

    cls, f = case
    value = _other(f)
    common = ["start", "--coordinator", "h:1", "--key", "k", "--data", str(tmp_path / "d.csv")]
    privacy, train, columns, _ = node_settings(parser().parse_args([*common, *_as_flag(f, value)]))
    node = node_config(privacy, train, columns, str(tmp_path / "d.csv"), str(tmp_path / "ledger.json"))
    assert all(isinstance(v, bool | int | float | str) for v in node.values())  # Flower's value types
    service = ServiceConfig(home=tmp_path, labels=LABELS)
    _, client = _deployed(service, node)
    if cls is ColumnSpec:  # read where it is used: the node's own file
        cols = {"text_column": "text", "label_column": "label"} | {f.name: value}
        (tmp_path / "d.csv").write_text(f"{cols['text_column']},{cols['label_column']}\ngood,pos\nbad,neg\n")
        assert list(NodeData(LABELS)(node)["text"]) == ["good", "bad"]
    else:
        assert getattr(getattr(client, {PrivacySpec: "privacy", TrainSpec: "train"}[cls]), f.name) == value


def test_every_shared_setting_is_tested_on_both_sides() -> None:
    shared = {_id(c) for c in _cases(*SHARED)}
    assert shared <= {_id(c) for c in SIM_CASES}
    assert shared <= {_id(c) for c in RUN_CASES + NODE_CASES}


def test_defaults_agree_and_labels_parse_once() -> None:
    assert ModelSpec().max_length == build_config({}, {}).max_length == 64  # what the main job trained with
    assert parse_labels("a, b,c,") == ("a", "b", "c")
    assert parse_labels(",") == ()


def test_loaded_data_belongs_to_its_owner(tmp_path: Path) -> None:
    """No cache outlives its owner: results do not depend on what ran before in the same process."""
    from fedtune.client.deploy import NodeData, NodeFiles
    from fedtune.simulations.datasets import PartitionData

    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood,pos\nbad,neg\n")
    node = {"data-path": str(path)}
    files = NodeFiles()
    assert len(NodeData(LABELS, files)(node)) == 2
    path.write_text("text,label\ngood,pos\nbad,neg\nfine,pos\n")
    assert len(NodeData(LABELS, files)(node)) == 2  # kept while its owner lives
    assert len(NodeData(LABELS)(node)) == 3  # another owner reads afresh
    files.reset()
    assert len(NodeData(LABELS, files)(node)) == 3
    rows = "".join(f"row {i},{'pos' if i % 2 else 'neg'}\n" for i in range(40))
    path.write_text("text,label\n" + rows)
    spec = DataSpec(dataset=str(path), labels=LABELS, num_clients=2, partitioning="iid")
    data = PartitionData(spec)
    sizes = data.sizes()
    path.write_text("text,label\n" + rows * 2)
    assert data.sizes() == sizes and PartitionData(spec).sizes() != sizes
    data.reset()
    assert data.sizes() != sizes


def test_a_run_cannot_set_a_data_holders_privacy() -> None:
    """Privacy is the node's alone: every PrivacySpec setting is node-scoped, and a run config naming them (an
    operator asking for epsilon 1000 and no DP) changes nothing in the ClientConfig a deployed client builds."""
    from fedtune.client.deploy import config_from_context
    from fedtune.client.settings import NODE, flower_key, settings

    assert {f.metadata["scope"] for f in settings(PrivacySpec)} == {NODE}
    greedy_run = {"labels": ",".join(LABELS)} | {flower_key(f): _other(f) for f in settings(PrivacySpec)}
    assert config_from_context(greedy_run, {}).privacy == PrivacySpec()
