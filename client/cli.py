"""`fedtune-client`: make this node's key, then join a coordinator with a local data file that never leaves the host."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.panel import Panel

DP_OFF_WARNING = (
    "DIFFERENTIAL PRIVACY IS OFF (--no-dp). This client's model updates carry no formal privacy guarantee "
    "for the rows in its data file."
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune-client", description="Join a fedtune federation as a data holder.")
    sub = p.add_subparsers(dest="command", required=True)

    keygen = sub.add_parser("keygen", help="create this node's authentication key pair (node.key, node.pub)")
    keygen.add_argument("--out", type=Path, required=True, help="folder for node.key (private, 0600) and node.pub")
    keygen.add_argument("--force", action="store_true", help="replace an existing key pair")

    start = sub.add_parser("start", help="connect to the coordinator and train on --data when asked")
    start.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator's address")
    start.add_argument("--ca", type=Path, help="the coordinator's ca.pem (from its operator)")
    start.add_argument("--key", type=Path, required=True, help="this node's node.key (from `fedtune-client keygen`)")
    start.add_argument("--data", type=Path, required=True, help="local CSV/TSV/JSONL/Parquet file; its rows stay here")
    start.add_argument("--text-column", default="text", help="text column (default text)")
    start.add_argument("--label-column", default="label", help="label column (default label)")
    start.add_argument("--labels", help="comma-separated label names expected in the file (checked before joining)")
    start.add_argument("--epsilon", type=float, default=8.0, help="target epsilon for the run (default 8)")
    start.add_argument("--budget-epsilon", type=float, help="hard limit; rounds that would exceed it are declined")
    start.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
    start.add_argument("--max-grad-norm", type=float, default=1.0, help="per-sample clipping norm (default 1.0)")
    start.add_argument("--accountant", default="rdp", help="rdp | prv (default rdp)")
    start.add_argument("--no-dp", action="store_true", help="turn differential privacy OFF for this client (loud)")
    start.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    start.add_argument("--home", type=Path, default=Path.home() / ".fedtune" / "client", help="state and logs folder")
    start.add_argument("--runtime-port", type=int, default=9094, help="local port for Flower's ClientApp runtime")
    start.add_argument("--insecure", action="store_true", help="no TLS (testing only; loudly flagged)")
    return p


def keygen(args: argparse.Namespace, console: Console) -> int:
    from privacy.certs import key_fingerprint, load_node_public_key, make_node_keys

    if (args.out / "node.key").exists() and not args.force:
        console.print(f"fedtune-client: {args.out / 'node.key'} already exists; keeping it (use --force to replace)")
        return 2
    private, public = make_node_keys(args.out)
    fingerprint = key_fingerprint(load_node_public_key(public))
    console.print(f"wrote {private} (private, keep it here) and {public} ({fingerprint}).")
    console.print(f"Send {public} to the coordinator's operator: `fedtune-coordinator register {public.name}`.")
    return 0


def start(args: argparse.Namespace, console: Console) -> int:
    from client.config import PrivacySpec
    from client.data import load_examples
    from client.supernode import NodeSettings, check_files, run_supernode

    if args.ca is None and not args.insecure:
        raise ValueError("--ca is required (the coordinator's ca.pem); only --insecure runs without it")
    privacy = PrivacySpec(
        enabled=not args.no_dp,
        target_epsilon=args.epsilon,
        delta=args.delta,
        max_grad_norm=args.max_grad_norm,
        accountant=args.accountant,
        budget_epsilon=args.budget_epsilon,
    )
    labels = tuple(x.strip() for x in args.labels.split(",")) if args.labels else None
    examples, found = load_examples(args.data, labels, args.text_column, args.label_column)
    settings = NodeSettings(
        coordinator=args.coordinator,
        ca=None if args.insecure else args.ca.resolve(),
        key=args.key.resolve(),
        data=args.data.resolve(),
        home=args.home.resolve(),
        runtime_port=args.runtime_port,
        insecure=args.insecure,
        node_config={
            "data-path": str(args.data.resolve()),
            "text-column": args.text_column,
            "label-column": args.label_column,
            "dp": privacy.enabled,
            "epsilon": privacy.target_epsilon,
            "budget-epsilon": privacy.budget,
            "delta": privacy.delta,
            "max-grad-norm": privacy.max_grad_norm,
            "accountant": privacy.accountant,
            "device": args.device,
        },
    )
    fingerprint = check_files(settings)
    if args.no_dp:
        console.print(Panel(DP_OFF_WARNING, title="WARNING", style="bold red"))
    if args.insecure:
        console.print(Panel("TLS IS OFF (--insecure): updates cross the network unencrypted.", style="bold red"))
    console.print(
        f"fedtune-client: {examples.num_rows} examples in {args.data} (labels {', '.join(found)}) stay on this host; "
        f"node key {fingerprint}; "
        + (f"DP-SGD budget epsilon {privacy.budget} delta {privacy.delta} ({privacy.accountant})" if privacy.enabled else "no DP")
        + f"; joining {args.coordinator}"
    )
    run_supernode(settings, fingerprint, lambda line: console.print(line, highlight=False))
    console.print("fedtune-client: the coordinator ended the session")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console(stderr=True)
    from client.config import ConfigError
    from client.data import DataError
    from client.supernode import ClientStartError
    from privacy.certs import CertificateError

    try:
        return keygen(args, console) if args.command == "keygen" else start(args, console)
    except (ConfigError, DataError, CertificateError, ClientStartError, ValueError, OSError) as err:
        console.print(f"[bold red]fedtune-client: error:[/] {err}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("fedtune-client: stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
