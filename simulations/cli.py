"""`fedtune-simulate`: parse flags (and an optional TOML file) into a SimulationConfig and run it."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from rich.console import Console
from rich.markup import escape

from fedtune.client.settings import add_flags
from fedtune.simulations.config import (
    FIELDS,
    SimulationConfig,
    SimulationConfigError,
    build_config,
    read_flags,
    read_run_settings,
    read_toml,
)

# Settings a resumed run may change: they decide how long it waits, where it runs and what it shows, not what
# it trains (a restarted Ray cluster has a new address).
RESUME_MAY_CHANGE = {"verbose", "round_timeout", "round_retries", "ray_address"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedtune-simulate",
        description="Simulate federated, differentially private fine-tuning of a Transformer on this machine. "
        "Every setting is also a key of the --config file (its flag without dashes, e.g. lr_schedule).",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", metavar="FILE.toml", help="settings file; flags override it")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run after its last completed round "
        "(only --round-timeout, --round-retries, --ray-address and --verbose may change)",
    )
    add_flags(p, dataclasses.fields(SimulationConfig))
    return p


def main(argv: list[str] | None = None) -> int:
    # Results, checkpoints, ledgers and the exported model are owner-only whatever the caller's umask (this
    # process and Ray's, which it starts). See docs/security.md.
    os.umask(0o077)
    args = vars(parser().parse_args(argv))
    console = Console(stderr=True)
    try:
        from fedtune.client.config import ConfigError
        from fedtune.client.data import DataError
        from fedtune.client.model import ModelError
        from fedtune.coordinator.checkpoint import CheckpointError
        from fedtune.privacy import PrivacyBudgetError
        from fedtune.simulations.run import FederationStopped, simulate

        resume = args.pop("resume", None)
        config = args.pop("config", None)
        flag_settings = read_flags(args)
        assert set(flag_settings) <= set(FIELDS), set(flag_settings) - set(FIELDS)
        if resume is not None:
            # The run continues as it started; only deadlines and how it is shown may change.
            if fixed := sorted(set(flag_settings) - RESUME_MAY_CHANGE) + (["config"] if config else []):
                raise SimulationConfigError(f"--resume continues a run with its own settings; drop: {', '.join(fixed)}")
            file_settings = read_run_settings(resume)
        else:
            file_settings = read_toml(config) if config is not None else {}
        cfg = build_config(file_settings, flag_settings)
        cfg = dataclasses.replace(cfg, out=str(cfg.run_dir()))  # the default folder's timestamp is taken once
        results = simulate(cfg, console, resume=resume is not None)
    except (
        ConfigError,  # SimulationConfigError and CoordinatorConfigError are ConfigErrors
        DataError,
        ModelError,
        PrivacyBudgetError,
        CheckpointError,
        FederationStopped,
    ) as err:
        # soft_wrap: the error stays one greppable line; escape: messages may hold [brackets]
        console.print(f"[bold red]fedtune-simulate: error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("fedtune-simulate: interrupted")
        return 130
    from fedtune.client import wire  # here, as the engine's own imports: `--help` stays quick

    final = results.get("final", {})
    if results.get("baseline") is None:  # a causal LM: against the pretrained model (round 0)
        before = results["rounds"][0].get("global", {}) if results["rounds"] else {}
        score = (
            f"perplexity {final.get(wire.PERPLEXITY, float('nan')):.3f} "
            f"(pretrained {before.get(wire.PERPLEXITY, float('nan')):.3f})"
        )
    else:
        score = f"accuracy {final.get(wire.ACCURACY, float('nan')):.4f} (majority baseline {results['baseline']['accuracy']:.4f})"
    console.print(
        f"done in {results['wall_seconds']:.0f}s: {score}; results in {cfg.run_dir()}/results.json, "
        f"plots in {cfg.run_dir()}/plots, model in {cfg.run_dir()}/{results['model_dir']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
