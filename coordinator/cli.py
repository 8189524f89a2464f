"""`fedtune-coordinator`: create certificates, admit data holders' keys, and run the federation service."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from fedtune.client.credentials import CertificateError
from fedtune.client.settings import ConfigError, add_flags, from_flat, parse_labels
from fedtune.coordinator.service_config import FIELDS, ServiceConfig, read_service_config

DEFAULT_CONFIG = Path("coord/coordinator.toml")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune-coordinator", description="Run a fedtune coordinator (Flower SuperLink).")
    sub = p.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create the CA, the server certificate and coordinator.toml")
    init.add_argument("--out", type=Path, default=DEFAULT_CONFIG.parent, help="coordinator folder (default ./coord)")
    init.add_argument(
        "--labels", default="", help="comma-separated label names, in id order (e.g. negative,positive); none for a causal LM"
    )
    init.add_argument(
        "--host",
        action="append",
        default=[],
        help="a DNS name or IP address clients use to reach this host (repeatable; localhost and 127.0.0.1 always included)",
    )
    add_flags(init, [FIELDS["listen"], FIELDS["port"], FIELDS["model"], FIELDS["task"]])
    init.add_argument("--force", action="store_true", help="replace existing certificates and settings")

    for name, help_ in (("register", "allow a node's public key (node.pub)"), ("revoke", "stop allowing a node")):
        cmd = sub.add_parser(name, help=help_)
        cmd.add_argument("key", help="node.pub file" if name == "register" else "the node's fingerprint (SHA256:...)")
        cmd.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="coordinator.toml (default coord/coordinator.toml)")

    nodes = sub.add_parser("nodes", help="list registered nodes")
    nodes.add_argument("--config", type=Path, default=DEFAULT_CONFIG)

    start = sub.add_parser("start", help="start the SuperLink and run the federation")
    start.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="coordinator.toml (default coord/coordinator.toml)")
    # Every setting of coordinator.toml (but the certificate's host names) overrides the file from here.
    add_flags(start, [f for f in FIELDS.values() if f.name != "home"])
    start.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (e.g. coord/runs/20261125-101500) from its last checkpoint",
    )
    start.add_argument("--keep-running", action="store_true", help="keep the SuperLink serving after the run")
    return p


def main(argv: list[str] | None = None) -> int:
    # State at rest is owner-only whatever the caller's umask: keys, database, ledger, checkpoints and logs
    # (this process and all it starts: SuperLink, SuperNode, runtime, ServerApp). See docs/security.md.
    os.umask(0o077)
    args = parser().parse_args(argv)
    console = Console(stderr=True)
    from fedtune.coordinator.registry import RegistryError
    from fedtune.coordinator.service import ServiceError

    # SIGTERM (a service manager, a test) must unwind like Ctrl-C so the SuperLink is stopped with us.
    signal.signal(signal.SIGTERM, _interrupt)

    try:
        return _dispatch(args, console)
    except (ConfigError, CertificateError, ServiceError, RegistryError, OSError) as err:
        # soft_wrap: the error stays one greppable line; escape: messages may hold [brackets]
        console.print(f"[bold red]fedtune-coordinator: error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("fedtune-coordinator: stopped")
        return 130


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    from fedtune.coordinator import service

    if args.command == "init":
        given = from_flat(ServiceConfig, {k: v for k, v in vars(args).items() if k in ("listen", "port", "model", "task")})
        cfg = ServiceConfig(home=args.out.resolve(), labels=parse_labels(args.labels), **given)
        hosts = tuple(dict.fromkeys(["localhost", "127.0.0.1", *args.host]))
        if cfg.listen not in ("0.0.0.0", "::"):
            hosts = tuple(dict.fromkeys([*hosts, cfg.listen]))
        cfg = dataclasses.replace(cfg, hosts=hosts)
        written = service.init_home(cfg, force=args.force)
        console.print(f"wrote {', '.join(str(p) for p in written)}")
        console.print(
            f"Give data holders {cfg.tls_dir / 'ca.pem'} and the address HOST:{cfg.port} (HOST one of {', '.join(hosts)}); "
            f"keep ca.key and server.key here. Edit {written[0]} for rounds, model and strategy."
        )
        return 0
    cfg = read_service_config(args.config, _overrides(args))
    if args.command == "register":
        fingerprint = service.register_key(cfg, Path(args.key))
        console.print(f"registered node {fingerprint}")
    elif args.command == "revoke":
        service.revoke_key(cfg, args.key)
        console.print(f"revoked node {args.key}")
    elif args.command == "nodes":
        for fingerprint in service.registered(cfg):
            print(fingerprint)
    else:
        cfg.check_model()
        if cfg.insecure:
            console.print(Panel(service.INSECURE_WARNING, title="WARNING", style="bold red"))
        echo = lambda line: console.print(line, highlight=False, markup=False)  # noqa: E731
        results = service.run_service(cfg, echo, args.keep_running, resume=args.resume)
        from fedtune.client import wire  # here: flwr is a second of import for every other command

        final = results.get("final") or {}
        console.print(
            f"run {results['run_id']} finished: "
            + (f"accuracy {final[wire.ACCURACY]:.4f}; " if wire.ACCURACY in final else "")
            + (f"perplexity {final[wire.PERPLEXITY]:.3f}; " if wire.PERPLEXITY in final else "")
            + f"results in {results['out_dir']}/results.json, model in {results['out_dir']}/{results.get('model_dir', 'model')}"
        )
    return 0


def _overrides(args: argparse.Namespace) -> dict:
    """The settings given as flags (strings; read_service_config types them as it does the file's)."""
    return {k: v for k, v in vars(args).items() if k in FIELDS and k != "home"}


if __name__ == "__main__":
    sys.exit(main())
