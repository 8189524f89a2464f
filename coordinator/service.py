"""The coordinator service: its own Flower SuperLink (TLS, node auth, database), registered nodes, and the run it submits."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedtune.client.credentials import CertificateError, key_fingerprint, load_certificate, load_node_public_key
from fedtune.client.processes import stop_process_group
from fedtune.client.supernode import write_secret
from fedtune.client.trusted_app import app_pyproject
from fedtune.coordinator.registry import (
    UNREGISTERED,
    ControlHttpClient,
    RegistryError,
    admit,
    control_client,
    expel,
    reconcile,
    superlink_nodes,
)
from fedtune.coordinator.service_config import ServiceConfig
from fedtune.coordinator.tls import make_ca, make_server_cert
from fedtune.privacy.at_rest import write_atomic

CONNECTION = "fedtune"  # the connection name in this service's own $FLWR_HOME/config.toml
INSECURE_WARNING = "TLS IS OFF (--insecure): model updates cross the network unencrypted and nodes are not authenticated."


class ServiceError(RuntimeError):
    """The service cannot do what was asked; the message says why and what to do."""


def _bin(name: str) -> str:
    # The Flower executables of this environment, never a stray one elsewhere on PATH.
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


def flower_env(cfg: ServiceConfig) -> dict[str, str]:
    """Environment for every Flower process of this service: its own FLWR_HOME, no telemetry."""
    return os.environ | {
        "FLWR_HOME": str(cfg.home / "flwr"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def init_home(cfg: ServiceConfig, force: bool = False) -> list[Path]:
    """Create the CA, the server certificate (SANs = cfg.hosts) and coordinator.toml in cfg.home."""
    toml = cfg.home / "coordinator.toml"
    if toml.exists() and not force:
        raise ServiceError(f"{toml} already exists; use --force to create new certificates and settings")
    ca_pem, ca_key = make_ca(cfg.tls_dir)
    server_pem, server_key = make_server_cert(ca_pem, ca_key, cfg.hosts, cfg.tls_dir)
    cfg.nodes_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(toml, cfg.to_toml())
    return [toml, ca_pem, ca_key, server_pem, server_key]


def register_key(cfg: ServiceConfig, public_key: Path) -> str:
    """Allow a node: keep its public key under nodes/, and have a running SuperLink admit it at once."""
    fingerprint = key_fingerprint(load_node_public_key(public_key))
    target = cfg.nodes_dir / f"{fingerprint.replace(':', '-')}.pub"
    existed = target.exists()
    write_atomic(target, public_key.read_bytes())
    if superlink_running(cfg):
        try:
            with _control(cfg) as client:
                admit(client, target)
        except RegistryError:
            if not existed:
                target.unlink()  # not registered anywhere, so not in fedtune's registry either
            raise
    return fingerprint


def revoke_key(cfg: ServiceConfig, fingerprint: str) -> None:
    """Stop allowing a node; a running SuperLink drops it at once. Flower never re-admits a revoked key."""
    target = cfg.nodes_dir / f"{fingerprint.replace(':', '-')}.pub"
    if not target.exists():
        known = ", ".join(registered(cfg)) or "none"
        raise ServiceError(f"no registered node has fingerprint {fingerprint} (registered: {known})")
    if superlink_running(cfg):
        with _control(cfg) as client:
            node = superlink_nodes(client).get(fingerprint)
            if node is not None and node.status != UNREGISTERED:
                expel(client, node.node_id)
    target.unlink()


def registered(cfg: ServiceConfig) -> list[str]:
    """fedtune's registry: the fingerprints of the keys in nodes/ (a running SuperLink admits exactly these)."""
    return [p.stem.replace("-", ":", 1) for p in sorted(cfg.nodes_dir.glob("*.pub"))]


def _control(cfg: ServiceConfig) -> contextlib.closing[ControlHttpClient]:
    """A Control API client of this service's SuperLink (loopback), closed when the `with` block ends."""
    return contextlib.closing(control_client(cfg.home / "flwr", CONNECTION))


def _flwr(cfg: ServiceConfig, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_bin("flwr"), *args], env=flower_env(cfg), capture_output=True, text=True, timeout=timeout, cwd=cfg.home
    )


def check_tls(cfg: ServiceConfig) -> None:
    for name in ("ca.pem", "server.pem"):
        load_certificate(cfg.tls_dir / name)
    for name in ("ca.key", "server.key"):
        if not (cfg.tls_dir / name).is_file():
            raise CertificateError(f"{cfg.tls_dir / name} does not exist; run `fedtune-coordinator init`")


def write_connection(cfg: ServiceConfig, port: int) -> None:
    """The flwr CLI's connection to this service's SuperLink (on loopback), in this service's own FLWR_HOME."""
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "127.0.0.1:{port}"']
    lines.append("insecure = true" if cfg.insecure else f'root-certificates = "{(cfg.tls_dir / "ca.pem").resolve()}"')
    write_atomic(cfg.home / "flwr" / "config.toml", "\n".join(lines) + "\n")


def _pid_file(cfg: ServiceConfig) -> Path:
    return cfg.state_dir / "superlink.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recorded_pids(cfg: ServiceConfig) -> tuple[int, int | None] | None:
    """(SuperLink PID, PID of the `fedtune-coordinator start` that owns it) from the PID file, if any."""
    try:
        data = json.loads(_pid_file(cfg).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, int):  # an older PID file: the SuperLink's PID only
        return data, None
    try:
        return int(data["superlink"]), (int(data["owner"]) if data.get("owner") else None)
    except (KeyError, TypeError, ValueError):
        return None


def superlink_running(cfg: ServiceConfig) -> bool:
    pids = _recorded_pids(cfg)
    return pids is not None and _alive(pids[0])


def _stop_orphan(cfg: ServiceConfig, echo: Callable[[str], None]) -> None:
    """A SuperLink whose `start` died (kill -9, a crash) keeps running with its ServerApp; stop that group."""
    pids = _recorded_pids(cfg)
    if pids is None or not _alive(pids[0]):
        return
    superlink, owner = pids
    if owner is None or _alive(owner):
        raise ServiceError(f"a SuperLink of this coordinator is already running (PID {superlink}; PID file {_pid_file(cfg)})")
    echo(f"stopping SuperLink PID {superlink} left behind by a coordinator that died (PID {owner})")
    stop_process_group(superlink, grace=15)
    _pid_file(cfg).unlink(missing_ok=True)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(group: subprocess.Popen, proc: subprocess.Popen, host: str, port: int, cfg: ServiceConfig, what: str) -> None:
    """Wait until `proc` (a member of `group`) accepts connections on host:port; stop the whole group if it never does."""
    deadline = time.monotonic() + 60
    while not _port_open(host, port):
        if proc.poll() is not None or group.poll() is not None or time.monotonic() > deadline:
            stop_process(group)
            tail = (cfg.state_dir / "superlink.log").read_text()[-1500:]
            raise ServiceError(f"{what} did not start; its log ends:\n{tail}")
        time.sleep(0.3)


def start_superlink(cfg: ServiceConfig, echo: Callable[[str], None] = print) -> subprocess.Popen:
    """Start the SuperLink on loopback, its SuperExec and the public Fleet gateway (one process group);
    return once the public port accepts connections. See docs/security.md for why it is laid out this way."""
    _stop_orphan(cfg, echo)
    public_host = "127.0.0.1" if cfg.listen in ("0.0.0.0", "::") else cfg.listen
    if _port_open(public_host, cfg.port):
        raise ServiceError(f"port {cfg.port} is already in use on this host; set `port` in coordinator.toml")
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    internal = _free_loopback_port()
    write_connection(cfg, internal)
    secret = cfg.state_dir / "superexec.secret"
    write_secret(secret)
    tls = cfg.tls_dir.resolve()
    cmd = [
        _bin("flower-superlink"),
        "--database",
        str(cfg.state_dir / "superlink.db"),  # registered nodes and runs survive a restart
        "--disable-runtime-dependency-installation",  # the app's code is fedtune, installed here
        "--host",
        "127.0.0.1",  # Control and Runtime: this host only; the network reaches the Fleet gateway
        "--port",
        str(internal),
        "--isolation",
        "process",  # the SuperExec below, which must prove the secret to take ServerApp tasks
        "--superexec-auth-secret-file",
        str(secret),
    ]
    if cfg.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(tls / "ca.pem"), "--ssl-certfile", str(tls / "server.pem")]
        cmd += ["--ssl-keyfile", str(tls / "server.key"), "--enable-supernode-auth"]
    log = (cfg.state_dir / "superlink.log").open("a")
    popen = dict(env=flower_env(cfg), stdout=log, stderr=subprocess.STDOUT, cwd=cfg.home)
    # A group of its own (so a terminal's Ctrl-C reaches only us); the SuperExec and the gateway join it, so
    # stopping the group stops all three and the ServerApps the SuperExec started.
    proc = subprocess.Popen(cmd, **popen, process_group=0)
    write_atomic(_pid_file(cfg), json.dumps({"superlink": proc.pid, "owner": os.getpid()}))
    try:
        _wait_for_port(proc, proc, "127.0.0.1", internal, cfg, "the Flower SuperLink")
        tls_args = ["--insecure"] if cfg.insecure else ["--root-certificates", str(tls / "ca.pem")]
        superexec = [_bin("flower-superexec"), "--runtime-api-address", f"127.0.0.1:{internal}", *tls_args]
        superexec += ["--superexec-auth-secret-file", str(secret)]
        superexec_proc = subprocess.Popen(superexec, **popen, process_group=proc.pid)
        gateway = [sys.executable, "-m", "fedtune.coordinator.fleet_gateway", "--host", cfg.listen, "--port", str(cfg.port)]
        if cfg.insecure:
            gateway += ["--insecure", "--upstream", f"http://127.0.0.1:{internal}"]
        else:
            gateway += ["--upstream", f"https://127.0.0.1:{internal}", "--ca", str(tls / "ca.pem")]
            gateway += ["--certfile", str(tls / "server.pem"), "--keyfile", str(tls / "server.key")]
        gateway_proc = subprocess.Popen(gateway, **popen, process_group=proc.pid)
        _wait_for_port(proc, gateway_proc, public_host, cfg.port, cfg, "the Fleet gateway")
        if superexec_proc.poll() is not None:  # a refused SuperExec exits 0 and says so only in the SuperLink's log
            raise ServiceError(f"the SuperExec exited at start; see {cfg.state_dir / 'superlink.log'}")
    except BaseException:
        stop_process(proc)
        _pid_file(cfg).unlink(missing_ok=True)
        raise
    return proc


def stop_process(proc: subprocess.Popen, grace: float = 15) -> None:
    """Stop a process and everything in its group (SuperExec, ServerApp), also when the leader already exited."""
    stop_process_group(proc, grace)


def write_app(cfg: ServiceConfig, out_dir: Path, resume: bool = False) -> Path:
    """The Flower app folder: only the pyproject that fedtune's clients accept (client/trusted_app.py) and the run config."""
    app = cfg.home / "app"
    app.mkdir(parents=True, exist_ok=True)
    write_atomic(app / "pyproject.toml", app_pyproject(cfg.run_config(out_dir, resume)))
    return app


def submit_and_follow(cfg: ServiceConfig, app: Path, echo: Callable[[str], None]) -> tuple[int | None, str]:
    """`flwr run --stream`: follow the ServerApp's log until the run ends; returns (run id, final status)."""
    proc = subprocess.Popen(
        [_bin("flwr"), "run", str(app), CONNECTION, "--stream"],
        env=flower_env(cfg),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cfg.home,
        start_new_session=True,
    )
    run_id = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if run_id is None and (m := re.search(r"started run (\d+)", line)):
                run_id = int(m.group(1))
            echo(line.rstrip("\n"))
        proc.wait()
    finally:
        stop_process(proc)
    if run_id is None:
        return None, "not-started"
    # `flwr run` exits 0 even when the ServerApp failed, and its log stream can end early (measured: under 20
    # clients' pushes the SuperLink's SQLite said "database is locked" to the stream): ask how the run is doing.
    status = run_status(cfg, run_id)
    if not status.startswith("finished"):
        echo(f"the log stream ended while run {run_id} is {status}; waiting for it to finish")
        unanswered = 0  # consecutive failed status queries: the SuperLink is gone, not busy
        while not status.startswith("finished") and unanswered < 10:
            time.sleep(2.0)
            status = run_status(cfg, run_id)
            unanswered = unanswered + 1 if status == "unknown" else 0
    return run_id, status


def run_status(cfg: ServiceConfig, run_id: int) -> str:
    """The SuperLink's status of a run, e.g. "finished:completed" or "running" (with details when it has some)."""
    done = _flwr(cfg, ["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"])
    try:
        run = json.loads(done.stdout)["runs"][0]
        status = str(run.get("status", "unknown"))
        details = str(run.get("status-details", "") or "")
    except (ValueError, KeyError, IndexError, TypeError):
        return "unknown"
    return status + (f": {details}" if details and details != "None" else "")


def stop_stale_runs(cfg: ServiceConfig, echo: Callable[[str], None]) -> list[int]:
    """Stop runs a dead coordinator left unfinished in the SuperLink's database. Stopping a run deletes its
    undelivered instructions, so no client trains (and spends privacy) for a run nobody will aggregate."""
    done = _flwr(cfg, ["ls", CONNECTION, "--format", "json"])
    try:
        runs = json.loads(done.stdout)["runs"]
    except (ValueError, KeyError, TypeError):
        raise ServiceError(f"cannot list the SuperLink's runs: {(done.stdout + done.stderr).strip()[-500:]}") from None
    stale = [int(r["run-id"]) for r in runs if not str(r.get("status", "")).startswith("finished")]
    for run_id in stale:
        stopped = _flwr(cfg, ["stop", str(run_id), CONNECTION])
        if stopped.returncode != 0:
            raise ServiceError(f"cannot stop run {run_id} left by an earlier coordinator: {stopped.stderr.strip()[-500:]}")
        echo(f"stopped run {run_id}, left unfinished by an earlier coordinator; its pending instructions are deleted")
    return stale


def new_run_dir(cfg: ServiceConfig) -> Path:
    out = cfg.runs_dir / f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_resumable(run_dir: Path) -> int:
    """The last checkpointed round of the run in `run_dir`, or a ServiceError saying why it cannot be resumed."""
    latest = run_dir / "checkpoint" / "latest.json"
    if (run_dir / "results.json").exists():
        raise ServiceError(f"{run_dir} holds a finished run (results.json); nothing to resume")
    try:
        return int(json.loads(latest.read_text())["round"])
    except FileNotFoundError:
        raise ServiceError(f"{run_dir} holds no checkpoint ({latest} is missing); nothing to resume") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ServiceError(f"{latest} is unreadable ({err}); cannot resume") from None


def _stopped_reason(out_dir: Path) -> str | None:
    from fedtune.coordinator.app import STOPPED_FILE

    try:
        return str(json.loads((out_dir / STOPPED_FILE).read_text())["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_service(
    cfg: ServiceConfig, echo: Callable[[str], None], keep_running: bool = False, resume: Path | None = None
) -> dict[str, Any]:
    """Start the SuperLink, admit the registered nodes, submit the run (or continue the run folder `resume`
    from its last checkpoint), follow it, then stop (unless asked to stay)."""
    if not cfg.insecure:
        check_tls(cfg)
    after = check_resumable(resume) if resume is not None else None
    superlink = start_superlink(cfg, echo)
    try:
        stop_stale_runs(cfg, echo)
        if not cfg.insecure:  # without TLS there is no node authentication, so no registry to enforce
            with _control(cfg) as client:
                reconcile(client, sorted(cfg.nodes_dir.glob("*.pub")), echo)
        out_dir = resume.resolve() if resume is not None else new_run_dir(cfg)
        echo(
            f"SuperLink PID {superlink.pid} on {cfg.listen}:{cfg.port}; {len(registered(cfg))} registered node(s); "
            f"waiting for {cfg.clients_before_round_1} to connect; "
            + (f"resuming after round {after}; " if after is not None else "")
            + f"results -> {out_dir}"
        )
        run_id, status = submit_and_follow(cfg, write_app(cfg, out_dir, resume is not None), echo)
        results = out_dir / "results.json"
        if not status.startswith("finished:completed") or not results.exists():
            reason = _stopped_reason(out_dir)
            if reason is not None and (out_dir / "checkpoint" / "latest.json").exists():
                resume_hint = f"continue it with `fedtune-coordinator start --resume {out_dir}`"
                raise ServiceError(f"run {run_id} stopped: {reason}; {resume_hint}")
            if reason is not None:
                raise ServiceError(f"run {run_id} stopped: {reason}")
            raise ServiceError(f"run {run_id} did not complete ({status}); SuperLink log: {cfg.state_dir / 'superlink.log'}")
        if keep_running:
            echo("run finished; SuperLink keeps serving (Ctrl-C to stop)")
            superlink.wait()
        return {"run_id": run_id, "status": status, "out_dir": str(out_dir), **json.loads(results.read_text())}
    finally:
        stop_process(superlink)
        _pid_file(cfg).unlink(missing_ok=True)
