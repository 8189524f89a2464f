"""fedtune's node registry (the keys in nodes/) is the truth: the SuperLink admits exactly those, and says so loudly."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest, UnregisterNodeRequest  # pylint: disable=E0611
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

from fedtune.client.credentials import key_fingerprint, load_node_public_key

UNREGISTERED = "unregistered"  # Flower keeps an unregistered node's row (and its key) for good


class RegistryError(RuntimeError):
    """The SuperLink refused a registration change; the message says what and what to do."""


@dataclass(frozen=True)
class AdmittedNode:
    node_id: int
    status: str  # registered | online | offline | unregistered


def control_client(flwr_home: Path, connection: str) -> ControlHttpClient:
    """A Control API client for this service's own SuperLink on loopback (the connection `write_connection` wrote)."""
    conf = tomllib.loads((flwr_home / "config.toml").read_text())["superlink"][connection]
    insecure = bool(conf.get("insecure", False))
    return ControlHttpClient.from_server_address(
        server_address=conf["address"],
        insecure=insecure,
        root_certificates=None if insecure else Path(conf["root-certificates"]).read_bytes(),
        interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
    )


def superlink_nodes(client: ControlHttpClient) -> dict[str, AdmittedNode]:
    """Every node the SuperLink knows, by the fingerprint of its public key."""
    out = {}
    for info in client.ListNodes(ListNodesRequest()).nodes_info:
        fingerprint = key_fingerprint(serialization.load_pem_public_key(info.public_key))
        out[fingerprint] = AdmittedNode(int(info.node_id), str(info.status))
    return out


def _pem(pub: Path) -> bytes:
    key = load_node_public_key(pub)
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def admit(client: ControlHttpClient, pub: Path) -> int:
    """Register the node whose key is in `pub` (no-op if admitted already); its node id. Loud when Flower refuses."""
    fingerprint = key_fingerprint(load_node_public_key(pub))
    known = superlink_nodes(client).get(fingerprint)
    if known is not None and known.status != UNREGISTERED:
        return known.node_id
    if known is not None:
        raise RegistryError(
            f"the SuperLink unregistered node {fingerprint} earlier and Flower never admits a key again: the data holder "
            "must make a new key (`fedtune-client keygen --force`) and send its node.pub to be registered"
        )
    try:
        node_id = int(client.RegisterNode(RegisterNodeRequest(public_key=_pem(pub))).node_id)
    except Exception as err:  # Flower's error types vary by transport; its message is the one thing to show
        raise RegistryError(f"the SuperLink refused to register node {fingerprint}: {err}") from None
    if not node_id:
        raise RegistryError(f"the SuperLink did not register node {fingerprint}")
    return node_id


def expel(client: ControlHttpClient, node_id: int) -> None:
    try:
        client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))
    except Exception as err:
        raise RegistryError(f"the SuperLink refused to unregister node {node_id}: {err}") from None


def reconcile(client: ControlHttpClient, keys: list[Path], echo: Callable[[str], None]) -> dict[str, int]:
    """Make the SuperLink admit exactly `keys`: register missing ones, unregister (and report) any other node."""
    wanted = {key_fingerprint(load_node_public_key(p)): p for p in keys}
    for fingerprint, node in superlink_nodes(client).items():
        if fingerprint not in wanted and node.status != UNREGISTERED:
            expel(client, node.node_id)
            echo(f"unregistered node {node.node_id} ({fingerprint}): the SuperLink admitted it, but fedtune never registered it")
    return {fingerprint: admit(client, pub) for fingerprint, pub in wanted.items()}
