"""Malformed configuration, certificates, keys and flags: each ends with one clear sentence and exit status 2."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from fedtune.client.cli import main as client_main
from fedtune.coordinator.cli import main as coordinator_main
from fedtune.simulations.cli import main as simulate_main

Setup = Callable[[Path], list[str]]


def toml(text: str) -> Setup:
    def setup(tmp: Path) -> list[str]:
        (tmp / "run.toml").write_text(text)
        return ["--config", str(tmp / "run.toml")]

    return setup


def flags(*args: str) -> Setup:
    return lambda tmp: list(args)


SIMULATE: list[tuple[str, Setup, str]] = [
    ("config file missing", lambda tmp: ["--config", str(tmp / "nope.toml")], "nope.toml"),
    ("config not TOML", toml("num_clients = = 3"), "TOML"),
    ("config unknown key", toml("num_clientz = 3"), "num_clientz"),
    ("config wrong type", toml('num_clients = "ten"'), "num_clients"),
    ("config zero rounds", toml("num_rounds = 0"), "rounds"),
    ("config fraction above 1", toml("fraction = 1.5"), "fraction"),
    ("config bad partitioning", toml('partitioning = "random"'), "partitioning"),
    ("config bad strategy", toml('strategy = "fedsgd"'), "strategy"),
    ("config budget for unknown client", toml("[client_budgets]\n42 = 1.0"), "client budgets"),
    ("config epsilon zero", toml("epsilon = 0"), "epsilon"),
    ("flag client budget format", flags("--client-budget", "3:1.0"), "ID=EPSILON"),
    ("flag accountant", flags("--accountant", "moments"), "accountant"),
    ("flag optimizer", flags("--optimizer", "lbfgs"), "optimizer"),
    ("flag lr schedule", flags("--lr-schedule", "step"), "lr_schedule must be one of constant, cosine"),
    ("flag negative learning rate", flags("--lr", "-1"), "learning rate"),
    ("flag pooler", flags("--pooler", "max"), "pooler"),
    ("flag delta above 1", flags("--delta", "2"), "delta"),
    ("flag model directory missing", flags("--model", "/nonexistent/model-dir"), "cannot load model"),
    ("flag dirichlet alpha", flags("--alpha", "0"), "alpha"),
    ("flag test dataset missing", flags("--test-dataset", "/nonexistent/dev.csv"), "dev.csv"),
    ("flag audit with too few canaries", flags("--audit", "5"), "--audit needs at least 10 canaries"),
    ("flag audit not a number", flags("--audit", "many"), "'audit': expected a whole number"),
    ("flag audit of full fine-tuning under DP", flags("--audit", "--full-finetune"), "--audit needs LoRA under DP"),
    ("flag audit with a shared ledger", flags("--audit", "--ledger", "l.json"), "drop --ledger"),
]


@pytest.mark.parametrize("name,setup,needle", SIMULATE, ids=[c[0] for c in SIMULATE])
def test_fedtune_simulate_rejects(name: str, setup: Setup, needle: str, tmp_path: Path, capsys) -> None:
    code = simulate_main([*setup(tmp_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.fixture
def coord(tmp_path: Path, capsys) -> Path:
    assert coordinator_main(["init", "--out", str(tmp_path / "coord"), "--labels", "neg,pos", "--listen", "127.0.0.1"]) == 0
    capsys.readouterr()
    return tmp_path / "coord"


def _node_key(tmp: Path, capsys) -> Path:
    assert client_main(["keygen", "--out", str(tmp / "me")]) == 0
    capsys.readouterr()
    return tmp / "me" / "node.key"


COORDINATOR: list[tuple[str, Callable[[Path, Path], list[str]], str]] = [
    ("start without config", lambda c, t: ["start", "--config", str(t / "missing.toml")], "does not exist"),
    ("init twice", lambda c, t: ["init", "--out", str(c), "--labels", "a,b"], "already exists"),
    (
        "register missing key",
        lambda c, t: ["register", str(t / "none.pub"), "--config", str(c / "coordinator.toml")],
        "does not exist",
    ),
    (
        "register non-key",
        lambda c, t: ["register", str(c / "tls" / "ca.pem"), "--config", str(c / "coordinator.toml")],
        "not an OpenSSH public key",
    ),
    ("revoke unknown", lambda c, t: ["revoke", "SHA256:0000", "--config", str(c / "coordinator.toml")], "no registered node"),
]


@pytest.mark.parametrize("name,args,needle", COORDINATOR, ids=[c[0] for c in COORDINATOR])
def test_fedtune_coordinator_rejects(name, args, needle, coord: Path, tmp_path: Path, capsys) -> None:
    code = coordinator_main(args(coord, tmp_path))
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err.replace("\n", " ") and "Traceback" not in err


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize(
    "name,edit,needle",
    [
        ("config not TOML", lambda c: (c / "coordinator.toml").write_text("labels = [\n"), "not valid TOML"),
        ("config unknown setting", lambda c: (c / "coordinator.toml").open("a").write("roundz = 3\n"), "roundz"),
        (
            "config without labels",
            lambda c: (c / "coordinator.toml").write_text("num_rounds = 2\n"),
            "a classifier needs two or more label names",
        ),
        (
            "config lr schedule",
            lambda c: _replace(c / "coordinator.toml", 'lr_schedule = "constant"', 'lr_schedule = "step"'),
            "lr_schedule must be one of constant, cosine",
        ),
        ("server certificate corrupt", lambda c: (c / "tls" / "server.pem").write_text("garbage"), "not a PEM certificate"),
    ],
)
def test_fedtune_coordinator_start_checks_before_starting(name, edit, needle, coord: Path, capsys) -> None:
    edit(coord)
    code = coordinator_main(["start", "--config", str(coord / "coordinator.toml")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err.replace("\n", " ") and "Traceback" not in err
    assert not (coord / "state" / "superlink.pid").exists()  # nothing was started


def _client_start(tmp: Path, key: Path, ca: Path, data: Path, *extra: str) -> list[str]:
    return [
        "start",
        "--coordinator",
        "127.0.0.1:1",
        "--ca",
        str(ca),
        "--key",
        str(key),
        "--data",
        str(data),
        "--home",
        str(tmp / "home"),
        *extra,
    ]


@pytest.mark.parametrize(
    "name,prepare,needle",
    [
        ("CA missing", lambda t, k, ca, d: _client_start(t, k, t / "none.pem", d), "does not exist"),
        ("CA not PEM", lambda t, k, ca, d: _client_start(t, k, d, d), "not a PEM certificate"),
        ("key not OpenSSH", lambda t, k, ca, d: _client_start(t, ca, ca, d), "not an OpenSSH private key"),
        ("key readable by others", lambda t, k, ca, d: (os.chmod(k, 0o644), _client_start(t, k, ca, d))[1], "chmod 600"),
        ("data file missing", lambda t, k, ca, d: _client_start(t, k, ca, t / "none.csv"), "none.csv"),
        (
            "no CA without --insecure",
            lambda t, k, ca, d: _client_start(t, k, ca, d)[:3] + _client_start(t, k, ca, d)[5:],
            "--ca is required",
        ),
        ("label not in the run's set", lambda t, k, ca, d: _client_start(t, k, ca, d, "--labels", "x,y"), "label"),
        ("keygen over an existing key", lambda t, k, ca, d: ["keygen", "--out", str(k.parent)], "already exists"),
        (
            "budget with corrupt ledger",
            lambda t, k, ca, d: (
                (t / "home").mkdir(),
                (t / "home" / "ledger.json").write_text("{"),
                ["budget", "--home", str(t / "home")],
            )[2],
            "unreadable",
        ),
        ("negative budget", lambda t, k, ca, d: _client_start(t, k, ca, d, "--budget-epsilon", "-1"), "budget epsilon"),
    ],
)
def test_fedtune_client_rejects(name, prepare, needle, coord: Path, tmp_path: Path, capsys) -> None:
    key = _node_key(tmp_path, capsys)
    data = tmp_path / "data.csv"
    data.write_text("text,label\ngood,pos\nbad,neg\n")
    code = client_main(prepare(tmp_path, key, coord / "tls" / "ca.pem", data))
    out = capsys.readouterr()
    err = out.err + out.out
    assert code == 2, err
    assert needle in err.replace("\n", " ") and "Traceback" not in err
