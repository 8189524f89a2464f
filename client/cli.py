"""`fedtune-client`: make this node's key, then join a coordinator with a local data file that never leaves the host."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

if TYPE_CHECKING:
    from fedtune.client.config import ColumnSpec, PrivacySpec, TrainSpec

DP_OFF_WARNING = (
    "DIFFERENTIAL PRIVACY IS OFF (--no-dp). This client's model updates carry no formal privacy guarantee "
    "for the rows in its data file."
)


def _node_settings() -> list:
    """This data holder's own settings, as flags of `start`: data columns, expected labels, privacy, device."""
    from fedtune.client.config import ClientConfig, ColumnSpec, PrivacySpec, TrainSpec
    from fedtune.client.settings import NODE, settings

    return [*settings(ColumnSpec), *settings(ClientConfig), *settings(PrivacySpec), *settings(TrainSpec, NODE)]


def _node_flags(start: argparse.ArgumentParser) -> None:
    from fedtune.client.settings import add_flags

    add_flags(start, _node_settings())


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
    _node_flags(start)
    start.add_argument("--home", type=Path, default=Path.home() / ".fedtune" / "client", help="state and logs folder")
    start.add_argument("--runtime-port", type=int, default=9094, help="local port for Flower's ClientApp runtime")
    start.add_argument("--insecure", action="store_true", help="no TLS (testing only; loudly flagged)")
    start.add_argument("--ledger", type=Path, help="privacy ledger file (default HOME/ledger.json)")

    budget = sub.add_parser("budget", help="show the privacy ledger: epsilon spent per dataset and per run")
    budget.add_argument("--home", type=Path, default=Path.home() / ".fedtune" / "client", help="state folder")
    budget.add_argument("--ledger", type=Path, help="privacy ledger file (default HOME/ledger.json)")
    budget.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def show_budget(args: argparse.Namespace, console: Console) -> int:
    import json

    from rich.table import Table

    from fedtune.privacy.ledger import Ledger

    path = args.ledger or args.home / "ledger.json"
    if not path.exists():
        console.print(f"no privacy ledger at {path} yet: nothing has been spent")
        return 0
    summary = Ledger(path).summary()
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    table = Table(title=f"privacy ledger {path}")
    for col in ("data", "unit", "spent", "budget", "left", "delta", "acct.", "per run: rounds, epsilon added"):
        table.add_column(col, overflow="fold")
    for d in summary:
        runs = "; ".join(f"…{r[-6:]}: {v['rounds']}, +{v['epsilon_added']:.3f}" for r, v in d["runs"].items())
        budget = "-" if d["budget"] is None else f"{d['budget']:g}"
        remaining = "-" if d["remaining"] is None else f"{d['remaining']:.3f}"
        table.add_row(
            d["fingerprint"][7:19], d["unit"], f"{d['spent']:.3f}", budget, remaining, f"{d['delta']:g}", d["accountant"], runs
        )
    console.print(table)
    return 0


def keygen(args: argparse.Namespace, console: Console) -> int:
    from fedtune.client.credentials import key_fingerprint, load_node_public_key, make_node_keys

    if (args.out / "node.key").exists() and not args.force:
        console.print(f"fedtune-client: {args.out / 'node.key'} already exists; keeping it (use --force to replace)")
        return 2
    private, public = make_node_keys(args.out)
    fingerprint = key_fingerprint(load_node_public_key(public))
    console.print(f"wrote {private} (private, keep it here) and {public} ({fingerprint}).")
    console.print(f"Send {public} to the coordinator's operator: `fedtune-coordinator register {public.name}`.")
    return 0


def node_settings(args: argparse.Namespace) -> tuple[PrivacySpec, TrainSpec, ColumnSpec, tuple[str, ...] | None]:
    """This node's privacy, device and columns from `start`'s flags (typed as a TOML file's would be), and the
    labels it expects (None: any)."""
    from fedtune.client.config import ClientConfig, ColumnSpec, PrivacySpec, TrainSpec
    from fedtune.client.settings import NODE, from_flat, key

    given = {key(f): getattr(args, key(f)) for f in _node_settings() if hasattr(args, key(f))}
    return (
        PrivacySpec(**from_flat(PrivacySpec, given)),
        TrainSpec(**from_flat(TrainSpec, given, NODE)),
        ColumnSpec(**from_flat(ColumnSpec, given)),
        from_flat(ClientConfig, given).get("labels") or None,
    )


def start(args: argparse.Namespace, console: Console) -> int:
    import datasets

    from fedtune.client.config import node_config
    from fedtune.client.data import ledger_keys, read_table, table_examples
    from fedtune.client.supernode import NodeSettings, check_files, run_supernode
    from fedtune.privacy.ledger import Ledger

    if args.ca is None and not args.insecure:
        raise ValueError("--ca is required (the coordinator's ca.pem); only --insecure runs without it")
    privacy, train, columns, labels = node_settings(args)
    datasets.disable_progress_bars()  # reading a local file is quick; a bar per split is noise
    table = read_table(args.data)
    # The run decides the task; the file says which it can serve: prompt/response columns, or no label column, are a
    # causal LM's rows (checked as such here, and again when a run asks for them).
    causal_lm = columns.instructions or (not labels and columns.label_column not in table.column_names)
    examples, found = table_examples(table, columns, labels, causal_lm, str(args.data))
    ledger_path = str((args.ledger or args.home / "ledger.json").resolve())
    settings = NodeSettings(
        coordinator=args.coordinator,
        ca=None if args.insecure else args.ca.resolve(),
        key=args.key.resolve(),
        data=args.data.resolve(),
        home=args.home.resolve(),
        runtime_port=args.runtime_port,
        insecure=args.insecure,
        node_config=node_config(privacy, train, columns, str(args.data.resolve()), ledger_path),
    )
    fingerprint = check_files(settings)
    ledger = Ledger(settings.node_config["ledger"])
    data_key, older_keys = ledger_keys(examples, found)
    spent = ledger.spent(data_key, privacy.delta, privacy.accountant, also=older_keys) if privacy.enabled else 0.0
    if privacy.enabled and spent > 0:
        console.print(f"fedtune-client: the ledger says epsilon {spent:.3f} of {privacy.budget:g} is already spent on this data")
    if not privacy.enabled:
        console.print(Panel(DP_OFF_WARNING, title="WARNING", style="bold red"))
    if args.insecure:
        console.print(Panel("TLS IS OFF (--insecure): updates cross the network unencrypted.", style="bold red"))
    console.print(
        f"fedtune-client: {examples.num_rows} examples in {args.data} "
        f"({'causal LM rows' if causal_lm else 'labels ' + ', '.join(found)}) stay on this host; "
        f"node key {fingerprint}; "
        + (f"DP-SGD budget epsilon {privacy.budget} delta {privacy.delta} ({privacy.accountant})" if privacy.enabled else "no DP")
        + f"; joining {args.coordinator}"
    )
    run_supernode(settings, fingerprint, lambda line: console.print(line, highlight=False))
    console.print("fedtune-client: the coordinator ended the session")
    return 0


def main(argv: list[str] | None = None) -> int:
    # State at rest is owner-only whatever the caller's umask: keys, database, ledger, checkpoints and logs
    # (this process and all it starts: SuperLink, SuperNode, runtime, ServerApp). See docs/security.md.
    os.umask(0o077)
    args = parser().parse_args(argv)
    console = Console(stderr=True)
    from fedtune.client.config import ConfigError
    from fedtune.client.credentials import CertificateError
    from fedtune.client.data import DataError
    from fedtune.client.supernode import ClientStartError
    from fedtune.privacy.ledger import LedgerError

    try:
        commands = {"keygen": keygen, "start": start, "budget": show_budget}
        return commands[args.command](args, console)
    except (ConfigError, DataError, CertificateError, ClientStartError, LedgerError, ValueError, OSError) as err:
        # soft_wrap: the error stays one greppable line; escape: messages may hold [brackets]
        console.print(f"[bold red]fedtune-client: error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("fedtune-client: stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
