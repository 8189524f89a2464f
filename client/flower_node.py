"""Flower's SuperNode, unchanged but for its waits: during a run it asks for work, and hands replies on, promptly.

Flower 1.42's SuperNode loop (`flwr/supernode/start_client_internal.py`) sleeps a fixed 3 s whenever the
SuperLink has no message for it. A round sends each client two messages (train, then evaluate), so every
client waited 1.5 s on average, up to 3 s, before each: about a fifth of P6's fixed cost on loopback
(benchmarks/README.md). Here, after a message has come, the next pulls follow each other within 0.1-0.5 s for
`ACTIVE_WINDOW_S`; once that passes without work, Flower's own 3 s rhythm returns, so idle nodes cost the
coordinator what they always did. Flower then looks for the ClientApp's reply, and for each of its objects, every
0.5 s; `PromptReplies` looks every 10-50 ms instead (0.25 s less per message on average). Everything else is
Flower's code, run through its own entry point.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from typing import Any

from flwr.supernode import start_client_internal
from flwr.supernode.cli import flower_supernode

ACTIVE_WINDOW_S = 120.0  # covers a round's wait for its slowest client between train and evaluate
FIRST_POLL_S = 0.1
MAX_POLL_S = 0.5


class PromptPull:
    """Wraps Flower's `_pull_and_store_message`: keeps asking, with a short backoff, while a run is active."""

    def __init__(self, pull: Callable[..., int | None], clock: Callable[[], float] = time.monotonic) -> None:
        self.pull = pull
        self.clock = clock
        self.active = False  # the previous call brought a message

    def __call__(self, **kwargs: Any) -> int | None:
        deadline = self.clock() + (ACTIVE_WINDOW_S if self.active else 0.0)
        delay = FIRST_POLL_S
        while (run_id := self.pull(**kwargs)) is None and self.clock() < deadline:
            time.sleep(delay)
            delay = min(delay * 1.5, MAX_POLL_S)
        self.active = run_id is not None
        return run_id


REPLY_POLL_S = (0.01, 0.05)  # first and longest wait between looks for the ClientApp's reply


class PromptReplies:
    """The SuperNode's state and object store as `_push_messages` sees them: a reply, or a reply's object, that
    is not there yet is awaited here with short sleeps, so Flower's own 0.5 s sleep never runs."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _await(self, look: Callable[[], Any], ready: Callable[[Any], bool], patience: float) -> Any:
        deadline, delay = time.monotonic() + patience, REPLY_POLL_S[0]
        while not ready(found := look()) and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 1.5, REPLY_POLL_S[1])
        return found

    def get_messages_legacy(self, **kwargs: Any) -> Any:
        # Flower calls this (is_reply=True) only after handing a message to the ClientApp, and then waits for
        # the reply however long it takes; waiting here first changes nothing but the poll interval.
        patience = 3600.0 if kwargs.get("is_reply") else 0.0
        return self._await(lambda: self._store.get_messages_legacy(**kwargs), bool, patience)

    def get(self, object_id: str) -> Any:
        return self._await(lambda: self._store.get(object_id), lambda content: content != b"", 5.0)


def prompt_push(push: Callable[..., None]) -> Callable[..., None]:
    """Flower's `_push_messages`, seeing its state and object store through `PromptReplies`."""

    @functools.wraps(push)
    def wrapped(*, state: Any, object_store: Any, **kwargs: Any) -> None:
        return push(state=PromptReplies(state), object_store=PromptReplies(object_store), **kwargs)

    return wrapped


def main() -> int:
    """`flower-supernode` with `PromptPull` around the message pull (same arguments, same exit codes)."""
    start_client_internal._pull_and_store_message = PromptPull(start_client_internal._pull_and_store_message)
    start_client_internal._push_messages = prompt_push(start_client_internal._push_messages)
    # A message's objects reach the SuperLink just after the message itself; Flower retries an object that is
    # not there yet after 1 s, then 2 s. A 50 ms first retry (the runtime does the same, client/runtime.py).
    start_client_internal.pull_objects = functools.partial(
        start_client_internal.pull_objects, initial_backoff=0.05, backoff_cap=1.0
    )
    return flower_supernode() or 0


if __name__ == "__main__":
    sys.exit(main())
