"""Make Flower's simulation engine poll only the virtual nodes that have an instruction waiting.

Flower 1.42's engine (`vce_api.add_messages_to_queue`) asks the in-memory LinkState, ten times a second, for
every node's next instruction, and each ask scans every stored instruction. Measured (benchmarks/p3_scale.py,
py-spy): with 5000 virtual clients and 500 sampled, that loop took 90% of the coordinator process and a
whole core, so a round cost more as *total* clients grew. Here each poll first collects the nodes that have
an undelivered instruction (one pass over the store), then asks only for those, in Flower's node order, with
Flower's own `get_message_ins` (which still marks delivery and expires stale instructions).
"""

from __future__ import annotations

import threading
from queue import Queue

from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkState
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

_FLOWER_POLL = vce_api.add_messages_to_queue


def poll_addressed_nodes(state: LinkState, queue: Queue[Message], nodes_mapping: dict, f_stop: threading.Event) -> None:
    """Flower's polling loop, asking only nodes that have an undelivered instruction."""
    if not isinstance(state, InMemoryLinkState):  # the layout read below is the in-memory state's
        return _FLOWER_POLL(state, queue, nodes_mapping, f_stop)
    while not f_stop.is_set():
        with state.lock:
            addressed = {m.metadata.dst_node_id for m in state.message_ins_store.values() if m.metadata.delivered_at == ""}
        if addressed:
            for node_id in nodes_mapping:
                if node_id in addressed:
                    for msg in state.get_message_ins(node_id=node_id, limit=1):
                        queue.put(msg)
        f_stop.wait(0.1)
    return None


def install() -> None:
    """Use `poll_addressed_nodes` in Flower's simulation engine (this process; idempotent)."""
    vce_api.add_messages_to_queue = poll_addressed_nodes
