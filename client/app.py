"""The Flower ClientApp: take global weights, train locally under DP-SGD, reply with weights and metrics only."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedtune.client import wire
from fedtune.client.canaries import GradientCanaries
from fedtune.client.config import ClientConfig
from fedtune.client.evaluate import evaluate
from fedtune.client.local_data import NODE_DATA, DataFn, LocalData
from fedtune.client.model import build_model, load_tokenizer, load_trainable_state, trainable_state
from fedtune.client.train import RoundOutcome, RoundPlan, plan_round, projected_epsilon, round_lr_scale, train_round
from fedtune.privacy import History, epsilon_spent
from fedtune.privacy.ledger import Ledger

log = logging.getLogger("fedtune.client")

__all__ = ["DataFn", "client_id", "handle_evaluate", "handle_train", "make_client_app"]

_STATE_KEY = "fedtune-privacy"  # Context.state entry holding this node's accountant history


def client_id(context: Context) -> int:
    """The simulation partition id, else the node id: how results name this client (the coordinator checks it)."""
    return int(context.node_config.get("partition-id", wire.node_client_id(context.node_id)))


def load_history(context: Context) -> History:
    """This node's DP-SGD steps so far in this run, in Opacus' accountant format."""
    if _STATE_KEY not in context.state:
        return []
    rec = context.state[_STATE_KEY]
    return list(zip(rec["noise"], rec["rate"], rec["steps"]))


def save_history(context: Context, history: History) -> None:
    context.state[_STATE_KEY] = ConfigRecord(
        {
            "noise": [float(h[0]) for h in history],
            "rate": [float(h[1]) for h in history],
            "steps": [int(h[2]) for h in history],
        }
    )


@dataclass(frozen=True)
class Budget:
    """Whether this round fits the client's epsilon budget, and what it will have spent after it."""

    plan: RoundPlan
    history: History  # spent before this round (this run's, or every run's with a ledger)
    epsilon_after: float
    budget: float

    @property
    def fits(self) -> bool:
        return self.epsilon_after <= self.budget


def check_budget(
    cfg: ClientConfig, data: LocalData, history: History, budget: float, ledger: Ledger | None, task: wire.Task, run_id: str
) -> Budget:
    """Plan the round's noise and project its epsilon; with a ledger, reserve the round's cost there first."""
    plan = plan_round(len(data.train), cfg, task.num_rounds)
    if ledger is None:
        return Budget(plan, history, projected_epsilon(history, plan, cfg), budget)
    # Record the round's cost before training: a crash may then over-count, never under-count.
    # The ledger records nothing when the round would exceed the budget.
    reservation = ledger.reserve(
        data.fingerprint,
        plan.as_history(),
        also=data.older_fingerprints,
        budget=budget,
        delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant,
        run_id=run_id,
        round_id=task.server_round,
    )
    return Budget(plan, history, reservation.epsilon_after, budget)


def privacy_report(cfg: ClientConfig, budget: Budget, history: History, epsilon: float, ledger: bool) -> wire.PrivacyReport:
    return wire.PrivacyReport(
        epsilon=epsilon,
        delta=cfg.privacy.delta,
        budget_epsilon=budget.budget,
        noise_multiplier=budget.plan.noise_multiplier,
        sample_rate=budget.plan.sample_rate,
        history=history,
        accountant=cfg.privacy.accountant,
        max_grad_norm=cfg.privacy.max_grad_norm,
        ledger=ledger,
    )


def train_locally(
    cfg: ClientConfig,
    data: LocalData,
    task: wire.Task,
    plan: RoundPlan | None,
    history: History,
    cid: int,
    canaries: GradientCanaries | None = None,
) -> tuple[dict[str, torch.Tensor], RoundOutcome]:
    """The global model, trained one round on this node's data: (its travelling weights, the round's outcome)."""
    model = build_model(cfg.model, cfg.labels)
    load_trainable_state(model, {name: torch.from_numpy(w) for name, w in task.weights.items()})
    outcome = train_round(
        model,
        data.train,
        load_tokenizer(cfg.model.name),
        cfg,
        plan=plan,
        history=history,
        proximal_mu=task.proximal_mu,
        lr_scale=round_lr_scale(cfg.train.lr_schedule, task.server_round, task.num_rounds),
        seed=cfg.train.seed * 100_003 + cid * 1_009 + task.server_round,
        canaries=canaries,
    )
    return trainable_state(model), outcome


def handle_train(
    msg: Message,
    context: Context,
    cfg: ClientConfig,
    data_fn: DataFn,
    budgets: Mapping[int, float],
    ledger_path: str | None = None,
    canaries: Mapping[int, GradientCanaries] | None = None,
) -> Message:
    """One round: check the budget, train, and reply with the trained weights and aggregate metrics.

    `canaries`: an audit's gradient canaries, by the client that plants them (a simulation's --audit)."""
    cfg.train.use_threads()
    task = wire.Task.from_content(msg.content)
    cid = client_id(context)
    data = NODE_DATA.get(cfg, data_fn, dict(context.node_config))
    path = context.node_config.get("ledger") or ledger_path
    ledger = Ledger(str(path)) if path and cfg.privacy.enabled else None
    # With a ledger, privacy composes over every run ever made on this data; without, over this run.
    history = ledger.history(data.fingerprint, also=data.older_fingerprints) if ledger is not None else load_history(context)
    budget = None
    if cfg.privacy.enabled:
        limit = budgets.get(cid, cfg.privacy.budget)
        budget = check_budget(cfg, data, history, limit, ledger, task, str(context.run_id))
        if not budget.fits:
            log.warning(
                "client %s declines round %s: epsilon would reach %.3f, over its budget %.3f",
                cid,
                task.server_round,
                budget.epsilon_after,
                limit,
            )
            spent = epsilon_spent(history, cfg.privacy.delta, cfg.privacy.accountant)
            report = privacy_report(cfg, budget, history, spent, ledger is not None)
            return wire.TrainReply(cid, declined=True, privacy=report).to_message(reply_to=msg)
    began = time.perf_counter()
    weights, outcome = train_locally(cfg, data, task, budget.plan if budget else None, history, cid, (canaries or {}).get(cid))
    seconds = time.perf_counter() - began
    save_history(context, outcome.history)
    report = None
    if budget is not None:
        # The round spent what was projected: recompute only if it did not (a new mechanism costs an accountant call).
        planned = outcome.history == history + budget.plan.as_history()
        eps = budget.epsilon_after if planned else epsilon_spent(outcome.history, cfg.privacy.delta, cfg.privacy.accountant)
        report = privacy_report(cfg, budget, outcome.history, eps, ledger is not None)
        log.info(
            "client %s round %s: epsilon %.3f of %.3f (delta %g, %s)",
            cid,
            task.server_round,
            eps,
            budget.budget,
            cfg.privacy.delta,
            cfg.privacy.accountant,
        )
    update = wire.Update.encode(
        {name: w.numpy() for name, w in weights.items()}, task.weights, task.update_encoding, seed=cid * 1_009 + task.server_round
    )
    # train-seconds: local compute of the round (DP wiring included), for the coordinator's efficiency figures.
    if cfg.model.causal_lm:
        # Throughput stays here: how many tokens the sampled rows held is a statistic of the data DP-SGD does not cover.
        log.info("client %s round %s: %.0f tokens/s", cid, task.server_round, outcome.tokens / max(seconds, 1e-9))
    reply = wire.TrainReply(cid, False, len(data.train), outcome.mean_loss, seconds, report, update)
    return reply.to_message(reply_to=msg)


def handle_evaluate(msg: Message, context: Context, cfg: ClientConfig, data_fn: DataFn) -> Message:
    """Evaluate the global model on this node's held-back local split; reply with metrics only."""
    cfg.train.use_threads()
    task = wire.Task.from_content(msg.content)
    held = NODE_DATA.get(cfg, data_fn, dict(context.node_config)).held
    scores: dict[str, Any] = {}
    if held:
        model = build_model(cfg.model, cfg.labels)
        load_trainable_state(model, {name: torch.from_numpy(w) for name, w in task.weights.items()})
        scores = evaluate(model, held, load_tokenizer(cfg.model.name), 64, cfg.train.torch_device())
        # What travels is the wire's scores; the count comes from the split itself, and figures such as
        # perplexity are the coordinator's to derive.
        scores = {k: v for k, v in scores.items() if k in wire.EVALUATE and k != wire.NUM_EXAMPLES}
    return wire.EvaluateReply.from_scores(client_id(context), len(held), scores).to_message(reply_to=msg)


def make_client_app(
    cfg: ClientConfig,
    data_fn: DataFn,
    budgets: Mapping[int, float] | None = None,
    mods: Sequence[Mod] = (),
    ledger: str | None = None,
    canaries: Mapping[int, GradientCanaries] | None = None,
) -> ClientApp:
    """The ClientApp for data holders whose examples `data_fn` loads on their own host.

    `budgets` overrides the epsilon budget of individual clients (by client id); `mods` are
    Flower client mods applied to every message; `ledger` is a privacy ledger file shared by the
    simulated data holders (each keyed by its data's fingerprint); `canaries` are an audit's gradient
    canaries, by the client id that plants them (simulations/audit.py; never set by anything received).
    """
    app = ClientApp(mods=list(mods))
    budgets = dict(budgets or {})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, cfg, data_fn, budgets, ledger, canaries)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, cfg, data_fn)

    return app
