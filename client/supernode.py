"""Run a Flower SuperNode for this data holder: check its files first, then translate Flower's failures into sentences."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.client.credentials import key_fingerprint, load_certificate, load_node_private_key
from fedtune.client.processes import stop_process_group
from fedtune.privacy.at_rest import write_atomic

# Flower prints these when a SuperNode cannot join (exit code 305); the data holder gets one sentence instead.
_FAILURES: tuple[tuple[str, str], ...] = (
    (
        "CERTIFICATE_VERIFY_FAILED",
        "TLS handshake with the coordinator failed: its certificate is not signed by the CA in {ca} "
        "(ask the operator for the coordinator's ca.pem)",
    ),
    ("WRONG_VERSION_NUMBER", "TLS handshake with the coordinator failed: {address} does not speak TLS"),
    (
        "Failed to activate SuperNode",
        "the coordinator refused this node: its key ({fingerprint}) is not registered; send {pub} to the "
        "operator and ask them to run `fedtune-coordinator register`",
    ),
    ("UNAUTHENTICATED", "the coordinator refused this node's key ({fingerprint}); is it registered?"),
    ("Connection refused", "cannot reach the coordinator at {address} (is it running, and is the port open?)"),
    ("Name or service not known", "cannot resolve the coordinator's host name in {address}"),
)


class ClientStartError(RuntimeError):
    """The client could not start or join; the message says why and what to do."""


@dataclass(frozen=True)
class NodeSettings:
    """What `fedtune-client start` was told: where the coordinator is, which keys, which data, which budget."""

    coordinator: str
    ca: Path | None  # None only with insecure=True
    key: Path
    data: Path
    home: Path
    node_config: dict[str, Any]
    runtime_port: int = 9094
    insecure: bool = False
    max_retries: int | None = None  # None: keep retrying while the coordinator is down (TLS/auth failures end at once)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: quotes and backslashes escaped
    return repr(value)


def node_config_arg(values: dict[str, Any]) -> str:
    """Flower's --node-config syntax: space-separated key=value with TOML values."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


STOP_GRACE_S = 5.0  # what the SuperNode and the runtime get to finish after SIGTERM, before SIGKILL
RUNTIME_SECRET = "runtime.secret"  # shared by the SuperNode and fedtune.client.runtime; without it a local user could take tasks


def runtime_command(settings: NodeSettings) -> list[str]:
    """The long-lived process that runs this node's ClientApp (client/runtime.py)."""
    return [
        sys.executable,
        "-m",
        "fedtune.client.runtime",
        "--runtime-api-address",
        f"127.0.0.1:{settings.runtime_port}",
        "--secret-file",
        str(settings.home / RUNTIME_SECRET),
        "--parent-pid",
        str(os.getpid()),
    ]


def write_secret(path: Path) -> None:
    """A fresh random secret, readable by this user only."""
    write_atomic(path, secrets.token_bytes(32))


def check_files(settings: NodeSettings) -> str:
    """Validate the CA and key before connecting; returns the key's fingerprint."""
    if settings.ca is not None:
        load_certificate(settings.ca)
    key = load_node_private_key(settings.key)
    return key_fingerprint(key.public_key())


def supernode_command(settings: NodeSettings) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "fedtune.client.flower_node",  # Flower's SuperNode, polling promptly during a run (see that module)
        "--superlink",
        settings.coordinator,
        "--node-config",
        node_config_arg(settings.node_config),
        "--port",
        str(settings.runtime_port),
        # No Flower executor here: fedtune.client.runtime serves the Runtime API with fedtune's installed ClientApp.
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(settings.home / RUNTIME_SECRET),
    ]
    if settings.max_retries is not None:
        cmd += ["--max-retries", str(settings.max_retries)]
    # Flower authenticates nodes only over TLS; an --insecure trial (coordinator --insecure too) runs without it.
    cmd += (
        ["--insecure"]
        if settings.insecure
        else ["--root-certificates", str(settings.ca), "--auth-supernode-private-key", str(settings.key)]
    )
    return cmd


def explain(log_text: str, settings: NodeSettings, fingerprint: str) -> str | None:
    """One sentence for a known Flower failure in the SuperNode's log, else None."""
    for needle, sentence in _FAILURES:
        if needle in log_text:
            return sentence.format(
                ca=settings.ca,
                address=settings.coordinator,
                fingerprint=fingerprint,
                pub=settings.key.with_suffix(".pub"),
            )
    return None


def run_supernode(settings: NodeSettings, fingerprint: str, echo: Callable[[str], None]) -> int:
    """Run the SuperNode and this node's ClientApp runtime until the SuperNode exits (or we are stopped).

    Their full logs go to HOME/supernode.log and HOME/runtime.log."""
    settings.home.mkdir(parents=True, exist_ok=True)
    write_secret(settings.home / RUNTIME_SECRET)
    env = os.environ | {
        "FLWR_HOME": str(settings.home / "flwr"),  # this node's own Flower state, apart from any other install
        "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    # Each in its own process group: stopping one group stops everything it started.
    popen = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc = subprocess.Popen(supernode_command(settings), **popen)
    runtime = subprocess.Popen(runtime_command(settings), **popen)

    def stop(signum: int, _frame: Any) -> None:
        stop_process_group(runtime, STOP_GRACE_S)
        stop_process_group(proc, STOP_GRACE_S)
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    lines: list[str] = []
    readers = [
        threading.Thread(target=_follow, args=(p, settings.home / name, buf, echo), daemon=True)
        for p, name, buf in ((proc, "supernode.log", lines), (runtime, "runtime.log", []))
    ]
    for reader in readers:
        reader.start()
    try:
        while (rc := proc.poll()) is None:
            if runtime.poll() is not None:
                raise ClientStartError(
                    f"the ClientApp runtime exited with status {runtime.returncode}; see {settings.home / 'runtime.log'}"
                )
            time.sleep(0.5)
    finally:
        stop_process_group(runtime, STOP_GRACE_S)
        stop_process_group(proc, STOP_GRACE_S)
        for reader in readers:
            reader.join(timeout=10)
        for s, handler in previous.items():
            signal.signal(s, handler)
    if rc != 0:
        reason = explain("".join(lines), settings, fingerprint)
        raise ClientStartError(reason or f"the Flower SuperNode exited with status {rc}; see {settings.home / 'supernode.log'}")
    return rc


def _follow(proc: subprocess.Popen, log_path: Path, lines: list[str], echo: Callable[[str], None]) -> None:
    with log_path.open("w", encoding="utf-8") as log:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            lines.append(line)
            del lines[:-200]
            for note in _interesting(line):
                echo(note)


def _interesting(line: str) -> list[str]:
    # The runtime prints "fedtune-client: ..." lines (client/runtime.py, client/deploy.py); pass those through.
    text = line.strip()
    return [text] if text.startswith("fedtune-client:") else []
