"""The round loop: each phase under a deadline, stragglers dropped, short rounds retried, a checkpoint per round.

Flower's `Strategy.start` waits forever for nodes, has one timeout per run and cannot start at round k;
this loop drives the same strategy methods (configure/aggregate train and evaluate) itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

log = logging.getLogger("fedtune.coordinator")


class JoinTimeout(RuntimeError):
    """Too few clients connected before the join deadline."""


class RoundFailed(RuntimeError):
    """Too few clients answered a round, even after retrying it."""


def wait_for_clients(grid: Grid, needed: int, timeout: float) -> int:
    """Block until `needed` clients are connected; Flower's own sampling would wait forever."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < needed:
        if time.monotonic() > deadline:
            raise JoinTimeout(f"only {connected} of {needed} clients connected within {timeout:.0f} s; stopping the run")
        time.sleep(1.0)
    return connected


@dataclass
class Exchange:
    """One phase of a round: the replies that came back, and what happened to the nodes that gave none."""

    replies: list[Message]
    sent: int
    stragglers: list[int] = field(default_factory=list)  # node ids with no reply by the deadline
    failures: dict[int, str] = field(default_factory=dict)  # node id -> the error its reply carried

    @property
    def answered(self) -> int:
        return sum(1 for m in self.replies if not m.has_error())


def exchange(grid: Grid, messages: Iterable[Message], deadline: float) -> Exchange:
    """Send `messages` and collect replies until all came back or `deadline` seconds passed."""
    sent = list(messages)
    replies = _send_and_receive(grid, sent, deadline)
    # Message ids are set when pushed; an error made by the SuperLink itself (node gone) names only the message.
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    out = Exchange(replies, len(sent))
    answered = set()
    for reply in replies:
        node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        answered.add(node)
        if reply.has_error():
            out.failures[node] = f"{reply.error.reason}".strip().splitlines()[-1][:300] or f"error code {reply.error.code}"
    out.stragglers = sorted(set(node_of.values()) - answered)
    return out


# Flower's deployed Grid.send_and_receive polls every 3 s: up to 3 s idle per phase, twice a round. A pull asks
# the SuperLink's database about every reply still awaited: every 0.2 s cost the ServerApp a third of a core
# while 20 clients trained. So the interval grows with what is awaited: 0.1 s for up to 4 replies (0.2 s less
# idle per phase than a fixed 0.5 s), 0.5 s from 20 on.
REPLY_POLL_SECONDS = (0.1, 0.5)
REPLY_POLL_PER_AWAITED = 0.025


def reply_poll_interval(awaited: int) -> float:
    """Seconds between two pulls while `awaited` replies are outstanding."""
    low, high = REPLY_POLL_SECONDS
    return min(high, max(low, REPLY_POLL_PER_AWAITED * awaited))


def _send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """Grid.send_and_receive with a short poll: push, then pull until every reply came or `timeout` passed."""
    waiting = set(grid.push_messages(messages))
    end = time.monotonic() + timeout
    replies: list[Message] = []
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies += got
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if not waiting or time.monotonic() >= end:
            break
        time.sleep(reply_poll_interval(len(waiting)))
    return replies


@dataclass(frozen=True)
class RoundPolicy:
    """Deadlines and minimums of the loop."""

    deadline: float  # seconds each phase (train, evaluate) of a round waits for replies
    min_replies: int  # a training round aggregates only if at least this many clients answered
    min_available: int  # clients that must be connected before a round starts
    join_timeout: float  # how long to wait for them
    retries: int = 1  # a round with too few answers is sent again this many times, then the run stops


class RoundHooks:
    """What the loop reports to; the coordinator's RunRecorder implements these."""

    def phase(self, server_round: int, name: str, outcome: Exchange) -> None: ...
    def train_metrics(self, server_round: int, metrics: MetricRecord | None) -> None: ...
    def evaluate_metrics(self, server_round: int, metrics: MetricRecord | None) -> None: ...
    def round_done(self, server_round: int, arrays: ArrayRecord) -> None: ...


def strategy_chain(strategy: Strategy) -> list[Strategy]:
    """The strategy and every strategy it wraps: fedtune's wrappers keep theirs in `inner`, Flower's DP
    wrappers in `strategy`."""
    chain = []
    while strategy is not None and strategy not in chain:
        chain.append(strategy)
        strategy = getattr(strategy, "inner", None) or getattr(strategy, "strategy", None)
    return chain


def _forget_pending(strategy: Strategy, server_round: int) -> None:
    # Flower's central-DP wrappers record one privacy event per configured round; a retried round
    # configures again, so the first, never-aggregated event must go.
    for s in strategy_chain(strategy):
        pending = getattr(s, "_pending_events", None)
        if isinstance(pending, dict):
            pending.pop(server_round, None)


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    rounds: range,
    policy: RoundPolicy,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    hooks: RoundHooks,
) -> ArrayRecord:
    """Run `rounds` (e.g. range(k + 1, n + 1) when resuming after round k); returns the final global weights."""
    for server_round in rounds:
        for attempt in range(1 + policy.retries):
            wait_for_clients(grid, policy.min_available, policy.join_timeout)
            train = exchange(grid, strategy.configure_train(server_round, arrays, train_config, grid), policy.deadline)
            hooks.phase(server_round, "train", train)
            if train.answered >= policy.min_replies:
                break
            _forget_pending(strategy, server_round)
            log.warning(
                "round %s: %s of %s clients answered within %.0f s (need %s)%s",
                server_round,
                train.answered,
                train.sent,
                policy.deadline,
                policy.min_replies,
                "; retrying" if attempt < policy.retries else "",
            )
        else:
            raise RoundFailed(
                f"round {server_round}: only {train.answered} of {train.sent} clients answered within "
                f"{policy.deadline:.0f} s (need {policy.min_replies}), {1 + policy.retries} attempt(s); "
                f"the run stops after round {server_round - 1} and can be resumed from its checkpoint"
            )
        new_arrays, train_metrics = strategy.aggregate_train(server_round, train.replies)
        if new_arrays is not None:
            arrays = new_arrays
        hooks.train_metrics(server_round, train_metrics)
        evaluate = exchange(grid, strategy.configure_evaluate(server_round, arrays, evaluate_config, grid), policy.deadline)
        hooks.phase(server_round, "evaluate", evaluate)
        hooks.evaluate_metrics(server_round, strategy.aggregate_evaluate(server_round, evaluate.replies))
        hooks.round_done(server_round, arrays)
    return arrays
