"""fedtune's node registry is the truth: a real SuperLink (loopback, TLS) admits exactly the keys in nodes/."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.client.credentials import key_fingerprint, load_node_public_key, make_node_keys
from fedtune.coordinator.registry import RegistryError, admit, control_client, expel, reconcile, superlink_nodes
from fedtune.coordinator.service import (
    CONNECTION,
    ServiceConfig,
    init_home,
    register_key,
    registered,
    start_superlink,
    stop_process,
)

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def superlink(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("registry")
    cfg = ServiceConfig(home=home / "coord", labels=("a", "b"), listen="127.0.0.1", port=_free_port())
    init_home(cfg)
    keys = {name: make_node_keys(home / name)[1] for name in ("holder", "stray", "late")}
    group = start_superlink(cfg, echo=lambda _: None)
    client = control_client(cfg.home / "flwr", CONNECTION)
    try:
        yield cfg, keys, client
    finally:
        client.close()
        stop_process(group)


def fp(pub: Path) -> str:
    return key_fingerprint(load_node_public_key(pub))


def test_start_removes_and_reports_a_registration_fedtune_did_not_make(superlink) -> None:
    cfg, keys, client = superlink
    admit(client, keys["stray"])  # e.g. left in the SuperLink's database by hand or by an older version
    said: list[str] = []
    reconcile(client, [keys["holder"]], said.append)
    admitted = {f for f, node in superlink_nodes(client).items() if node.status != "unregistered"}
    assert admitted == {fp(keys["holder"])}
    assert len(said) == 1 and fp(keys["stray"]) in said[0] and "never registered it" in said[0]


def test_flower_never_readmits_a_removed_key_and_fedtune_says_so(superlink) -> None:
    cfg, keys, client = superlink
    node = admit(client, keys["late"])
    expel(client, node)
    with pytest.raises(RegistryError, match="never admits a key again"):
        admit(client, keys["late"])
    # The CLI: one sentence, exit 2, and the key is not in fedtune's registry either.
    done = subprocess.run(
        [str(BIN / "fedtune-coordinator"), "register", str(keys["late"]), "--config", str(cfg.home / "coordinator.toml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "never admits a key again" in done.stderr and "Traceback" not in done.stderr
    assert fp(keys["late"]) not in registered(cfg)


def test_register_while_running_is_admitted_at_once(superlink) -> None:
    cfg, keys, client = superlink
    register_key(cfg, keys["holder"])
    assert fp(keys["holder"]) in registered(cfg)
    assert superlink_nodes(client)[fp(keys["holder"])].status != "unregistered"
