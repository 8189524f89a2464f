"""Compose client and coordinator into a Flower simulation (Ray backend) and run it."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from flwr.clientapp.typing import Mod
from rich.console import Console
from rich.panel import Panel

from fedtune.client.app import make_client_app
from fedtune.client.config import CAUSAL_LM, ClientConfig, ModelSpec, PrivacySpec, TrainSpec
from fedtune.client.evaluate import evaluate
from fedtune.client.model import load_tokenizer
from fedtune.client.model_source import check_model
from fedtune.client.train import encode
from fedtune.coordinator.app import make_server_app, resume_settings
from fedtune.coordinator.checkpoint import CheckpointError, check_settings, load_checkpoint
from fedtune.coordinator.config import CoordinatorConfig
from fedtune.coordinator.rounds import JoinTimeout, RoundFailed
from fedtune.privacy.at_rest import write_atomic
from fedtune.simulations.audit import AUDITED_CLIENT, CanaryAudit, print_audit, write_audit
from fedtune.simulations.config import SimulationConfig, SimulationConfigError, role
from fedtune.simulations.datasets import DataSpec, PartitionData

DP_OFF_WARNING = (
    "DIFFERENTIAL PRIVACY IS OFF (--no-dp). Client updates carry no formal privacy guarantee; "
    "do not use this setting with data that must stay private."
)


class FederationStopped(RuntimeError):
    """The federation stopped before its last round (too few clients answered); the message says why."""


def client_config(cfg: SimulationConfig, labels: tuple[str, ...]) -> ClientConfig:
    """Every simulated data holder's settings (the same for all; budgets may differ, see client_budgets)."""
    return ClientConfig(labels=labels, model=role(ModelSpec, cfg), privacy=role(PrivacySpec, cfg), train=role(TrainSpec, cfg))


def _quiet_libraries(verbose: bool) -> None:
    # Flower logs every message exchange at INFO and warns that run_simulation is deprecated in
    # favour of `flwr run` (which needs a SuperLink process); fedtune shows its own progress instead.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.ERROR)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def ray_environment() -> dict[str, str]:
    """Environment variables that keep Ray on loopback and quiet; Ray reads them at import and start-up."""
    return {
        # Ray's single-host mode (its default on macOS and Windows): the node address is then 127.0.0.1, and
        # Ray binds its gRPC servers to 127.0.0.1 exactly when that is the node address. Measured on Linux
        # (Ray 2.55.1, psutil): without it the GCS, both raylet ports, the driver and every worker listened on
        # *:PORT and the runtime-env agent on the host's address, even with `_node_ip_address="127.0.0.1"`,
        # which Ray's cluster mode maps back to the host's address. The driver also reads it to resolve a
        # --ray-address of 127.0.0.1 (else it dials the host's address, where a loopback cluster is absent).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # Ray's announced default, set now: its driver warns (FutureWarning) on every run until it is set.
        # A client asking for no GPU then keeps the driver's CUDA_VISIBLE_DEVICES instead of an empty one;
        # fedtune asks for GPUs whenever the driver's device is CUDA and tells clients "cpu" otherwise.
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }


def ray_init_args(cfg: SimulationConfig, temp_dir: str) -> dict[str, Any]:
    """Arguments for `ray.init` (Flower passes its backend's `init_args`): an existing cluster or a private one."""
    # The clients' own output (Flower's "Manually terminating ClientAppActor" warning at every run's end,
    # library warnings) only with --verbose; a failing client still shows, in the round's faults.
    quiet = {"logging_level": "INFO" if cfg.verbose else "ERROR", "log_to_driver": cfg.verbose}
    if cfg.ray_address:  # Ray's own clustering; the cluster's operator chose its addresses and dashboard
        return {"address": cfg.ray_address, **quiet}
    return {
        "address": "local",  # a new instance even if RAY_ADDRESS or a `ray start` cluster is around
        "_node_ip_address": "127.0.0.1",
        "include_dashboard": False,  # no web UI, which would let anyone who reaches it run jobs
        # Sessions, logs, sockets and spilled objects go here, not to the shared, world-writable /tmp/ray.
        "_temp_dir": temp_dir,
        **quiet,
    }


@contextlib.contextmanager
def ray_temp_dir() -> Iterator[str]:
    """A folder for one run's Ray session inside an owner-only (0700) one, both removed afterwards."""
    # /tmp, as Ray's default: Ray refuses unix socket paths over 107 bytes (103 on macOS), and its session
    # folder and socket names take about 65 of them; pytest's or macOS' temporary folders can take the rest.
    private = tempfile.mkdtemp(prefix="fedtune-ray-", dir=os.environ.get("RAY_TMPDIR", "/tmp"))
    try:
        # Ray makes every folder it creates, its temp dir included, world-writable (0777, measured); the
        # owner-only parent keeps other local users out of the sessions, logs and sockets all the same.
        yield os.path.join(private, "ray")
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _check_loopback() -> None:
    """Refuse to start a local Ray instance that would listen beyond loopback (Ray imported before fedtune set it up)."""
    import ray

    address = ray.util.get_node_ip_address()  # before ray.init: the address Ray's servers would bind
    if not ipaddress.ip_address(address).is_loopback:
        raise SimulationConfigError(
            f"Ray would listen on {address}: this process imported ray before fedtune set "
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; set it in the environment, or pass --ray-address"
        )


def majority_baseline(held_out: datasets.Dataset, labels: tuple[str, ...]) -> dict[str, Any]:
    """What always answering the most common held-out label scores: the accuracy a classifier must beat."""
    majority, count = Counter(held_out["label"]).most_common(1)[0]
    return {"majority_class": labels[majority], "accuracy": count / len(held_out)}


def sample_prompts(held_out: datasets.Dataset, count: int = 3) -> tuple[str, ...]:
    """Fixed prompts for a causal LM's sample generations: the first held-out rows' prompts, or their texts'
    first line (at most 8 words), which the model continues."""
    rows = held_out.select(range(min(count, held_out.num_rows)))
    if "prompt" in rows.column_names:
        return tuple(rows["prompt"])
    return tuple(" ".join(text.strip().splitlines()[0].split()[:8]) for text in rows["text"])


def simulate(
    cfg: SimulationConfig, console: Console | None = None, client_mods: Sequence[Mod] = (), resume: bool = False
) -> dict[str, Any]:
    """Run the federation described by `cfg`; returns the results written to its run folder.

    `client_mods` are Flower client mods wrapped around every client's message handling; with
    `resume`, the run in `cfg.out` continues after its last checkpoint.
    """
    os.environ.update(ray_environment())  # before Ray is imported: it reads some of them only then
    from flwr.simulation import run_simulation  # heavy import (Ray); only when a run starts

    from fedtune.simulations import dispatch

    dispatch.install()  # rounds then cost what the sampled clients cost, not what all clients do

    console = console or Console(stderr=True)
    _quiet_libraries(cfg.verbose)
    task = check_model(role(ModelSpec, cfg)).task  # "auto" settled once, for every party
    if cfg.task == "auto" and task == CAUSAL_LM and cfg.labels:
        raise SimulationConfigError(
            f"model {cfg.model!r} is a causal language model, but --labels asks for a classifier: add --task "
            "classification to train one on it, or drop --labels to fine-tune it as a generative model"
        )
    cfg = dataclasses.replace(cfg, task=task)
    if cfg.audit and resume:
        raise SimulationConfigError(
            "an audited run cannot be resumed: its canary scores lived in the stopped process; start the audit anew"
        )
    if cfg.audit:
        # Every planted canary is trained on (none kept for the local evaluation, whose metrics DP-SGD does not
        # cover: docs/security.md); the audit measures what DP-SGD promises.
        cfg = dataclasses.replace(cfg, eval_fraction=0.0)
    causal_lm = role(ModelSpec, cfg).causal_lm
    data_fn = PartitionData(role(DataSpec, cfg), causal_lm)  # loads here once; Ray's workers get the loaded copy
    pool, held_out, labels = data_fn.split()  # fails here, before any worker starts, on bad data
    sizes = data_fn.sizes()
    ccfg = client_config(cfg, labels)
    out_dir = cfg.run_dir()
    if not resume and ((out_dir / "results.json").exists() or (out_dir / "checkpoint").exists()):
        raise SimulationConfigError(f"{out_dir} already holds a run; continue it with --resume {out_dir} or choose another --out")
    # Each simulated data holder keeps its accountant state on "its own disk": the shared ledger file the
    # user named (composing across runs), else one in the run folder (composing across this run's resumes).
    ledger = str(Path(cfg.ledger or out_dir / "client-ledger.json").resolve())
    if not cfg.dp:
        console.print(Panel(DP_OFF_WARNING, title="WARNING", style="bold red"))
    tokenizer = load_tokenizer(cfg.model)
    held_encoded = encode(held_out, tokenizer, cfg.max_length)
    metadata = {
        "config": cfg.to_json(),
        "privacy": {
            "dp": cfg.dp,
            "accountant": cfg.accountant if cfg.dp else None,
            "target_epsilon": cfg.epsilon if cfg.dp else None,
            "delta": cfg.delta if cfg.dp else None,
            "max_grad_norm": cfg.max_grad_norm if cfg.dp else None,
            "budget_epsilon": (cfg.budget_epsilon or cfg.epsilon) if cfg.dp else None,
            "ledger": ledger,
            "ledger_scope": "shared across runs" if cfg.ledger else "this run folder",
            **({} if cfg.dp else {"warning": DP_OFF_WARNING}),
        },
        "data": {
            "dataset": cfg.dataset,
            "pool_examples": len(pool),
            "held_out_examples": len(held_out),
            "held_out_source": cfg.test_dataset
            or f"{cfg.test_fraction:g} of the dataset, {'at random' if causal_lm else 'stratified'}",
            "partitioning": role(DataSpec, cfg).partitioning_for(causal_lm),
            "partition_sizes": sizes,
        },
        "baseline": None if causal_lm else majority_baseline(held_out, labels),
    }
    if causal_lm:
        metadata["privacy"]["unit"] = "one row (a text, or a prompt and its response), never split"
    console.print(
        f"fedtune: {cfg.num_clients} clients x {cfg.num_rounds} rounds, {metadata['data']['partitioning']} split "
        f"({min(sizes)}-{max(sizes)} examples each), model {cfg.model} ({'causal LM, ' if causal_lm else ''}"
        f"{'LoRA' if cfg.lora else 'full'}), "
        + (f"DP-SGD epsilon {cfg.epsilon} delta {cfg.delta} ({cfg.accountant})" if cfg.dp else "[bold red]no DP[/]")
        + f" -> {out_dir}"
    )
    coord = role(
        CoordinatorConfig,
        cfg,
        labels=labels,
        out_dir=out_dir,
        model=ccfg.model,
        resume=resume,
        metadata=metadata,
        sample_prompts=sample_prompts(held_out) if causal_lm else (),
        sample_chat="prompt" in held_out.column_names,
    )
    device = ccfg.train.torch_device()
    audit = CanaryAudit(cfg.audit, pool, ccfg, cfg.seed, device) if cfg.audit else None  # may refuse the count
    if audit is not None:
        console.print(
            f"audit: {sum(audit.gradient.included)} of {cfg.audit} gradient canaries and {int(audit.inputs.included.sum())} "
            f"of {cfg.audit} input canaries ({audit.inputs.kind}) planted in client {AUDITED_CLIENT}'s data; "
            "no client keeps a local evaluation split (--eval-fraction 0)"
        )
    if resume:  # fail here, before any worker starts, when the run cannot continue
        ckpt = load_checkpoint(out_dir)
        check_settings(ckpt.settings, resume_settings(coord))
        console.print(f"resuming {out_dir} after round {ckpt.server_round} of {cfg.num_rounds}")
    else:  # written only once every setting is known to be valid: a refused run leaves no folder behind
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / "config.json", json.dumps(cfg.to_json(), indent=1) + "\n")

    def evaluator(model: torch.nn.Module) -> dict[str, Any]:
        if audit is not None:
            audit.global_model(model)
        return evaluate(model, held_encoded, tokenizer, 64, device)

    server_app = make_server_app(coord, cfg.num_clients, evaluator, audit.observe if audit else None)
    client_app = make_client_app(
        ccfg,
        audit.data_fn(data_fn) if audit else data_fn,
        cfg.client_budgets,
        client_mods,
        ledger,
        {AUDITED_CLIENT: audit.gradient} if audit else None,
    )
    gpus = cfg.gpus_per_client if cfg.gpus_per_client > 0 else (0.5 if device.type == "cuda" else 0.0)
    if not cfg.ray_address:
        _check_loopback()
    try:
        with ray_temp_dir() as temp_dir:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=cfg.num_clients,
                backend_config={
                    "client_resources": {"num_cpus": cfg.cpus_per_client, "num_gpus": gpus},
                    "init_args": ray_init_args(cfg, temp_dir),
                },
                verbose_logging=cfg.verbose,
            )
    except (RoundFailed, JoinTimeout, CheckpointError) as err:  # Flower re-raises the ServerApp's exception here
        raise FederationStopped(str(err)) from None
    results_path = out_dir / "results.json"
    if not results_path.exists():
        raise RuntimeError(f"the simulation ended without writing {results_path}; rerun with --verbose for Flower's logs")
    results = json.loads(results_path.read_text())
    if audit is not None:
        report = audit.report(results, cfg.dp, cfg.delta)
        write_audit(out_dir, report)
        print_audit(report, console)
        results["audit"] = report
    return results
