"""The data holder's ClientApp runtime: one long-lived process that runs fedtune's installed ClientApp, never a FAB's code.

The SuperNode runs with `--isolation process`: it serves its Runtime API on 127.0.0.1 and waits for an executor.
This process is that executor. Flower's own executor (SuperExec) would start a `flwr-clientapp` per message that
installs the run's app package and imports whatever ClientApp it names; here the package is only inspected
(client/trusted_app.py) and the ClientApp is the one this host installed. Torch, the model, the tokenizer and the
tokenised data stay loaded across rounds and runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from fedtune.client.trusted_app import refusal

log = logging.getLogger("fedtune.client")

# Flower's SuperExec polls every 1 s, and a round waits for this poll once per message. Polling every 0.1 s
# cost 6.6% of a core per idle client (measured, 20 clients on 2 cores), so poll fast right after a task
# (the next message of a round follows soon) and back off to 0.5 s while idle (~1.3% of a core).
POLL_SECONDS = (0.1, 0.5)
# Under the SuperNode's HTTP keep-alive (uvicorn closes a connection idle for 5 s): a beat every 5 s met the close.
HEARTBEAT_SECONDS = 3.0
# A task is handed out before the SuperNode holds all of its message's objects. Flower's flwr-clientapp then
# retries after 1 s, 2 s, ...: 1.2-3.4 s of each message's "pulled" time in runtime.log (measured, P6). A missing
# object is asked for again after 50 ms, doubling up to 0.5 s.
PULL_BACKOFF_SECONDS = (0.05, 0.5)


def _client(address: str, interceptors: list) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None, interceptors=interceptors
    )


class ClientRuntime:
    """Serves one SuperNode's ClientApp tasks with `app`, after checking that each run is fedtune's own app."""

    def __init__(self, address: str, secret: bytes, app: ClientApp, echo: Callable[[str], None]) -> None:
        self.address = address
        self.app = app
        self.echo = echo
        self.acquirer = _client(
            address,
            [
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}),
            ],
        )

    def serve_forever(self) -> None:
        fastest, slowest = POLL_SECONDS
        wait = fastest
        while True:
            try:
                res = self.acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
            except httpx.TransportError:  # the SuperNode is (re)starting
                time.sleep(1.0)
                continue
            if res.HasField("task") and res.token:
                self.run_task(res.token)
                wait = fastest
            else:
                time.sleep(wait)
                wait = min(slowest, wait * 1.5)

    def run_task(self, token: str) -> None:
        """Pull one message with its context and app package, run it (or refuse it), push the reply."""
        client = _task_client(self.address, token)
        stop_heartbeat = threading.Event()
        threading.Thread(target=_heartbeat, args=(client, stop_heartbeat), daemon=True).start()
        context: Context | None = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        began = time.monotonic()
        try:
            message, context, run, fab = pull_task_input(client)
            pulled = time.monotonic()
            reason = refusal(fab.content, dict(context.run_config))
            if reason is not None:
                self.echo(f"fedtune-client: refused run {run.run_id}: {reason}; nothing was read and no privacy was spent")
                reply = Message(
                    Error(code=ErrorCode.INVALID_FAB, reason=f"refused by the data holder: {reason}"), reply_to=message
                )
                details = reason
            else:
                try:
                    reply = self.app(message=message, context=context)
                    status, details = SubStatus.COMPLETED, ""
                except Exception as err:  # a failed round is this round's fault, not the end of the runtime
                    log.exception("the ClientApp raised")
                    reason = f"{type(err).__name__}: {err}"
                    reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
                    details = reason
            ran = time.monotonic()
            try:
                push_reply(self.address, token, reply, context)
            except Exception as err:
                status, details = SubStatus.FAILED, f"the reply could not be pushed: {type(err).__name__}"
                raise
            # The task's timeline, for this log only: where a round's fixed cost goes (benchmarks/p6).
            print(
                f"{message.metadata.message_type} task of run {run.run_id}: pulled {pulled - began:.2f} s, "
                f"ran {ran - pulled:.2f} s, pushed {time.monotonic() - ran:.2f} s (at {time.time():.1f})",
                flush=True,
            )
        except Exception as err:  # the SuperNode went away or the task expired: serve the next one
            log.warning("task failed: %s: %s", type(err).__name__, err)
        finally:
            stop_heartbeat.set()
            client.close()
            finisher = _task_client(self.address, token)  # fresh, as push_reply's (Flower logs its own errors)
            push_task_output(client=finisher, context=context, sub_status=status, details=details)
            finisher.close()


def push_reply(address: str, token: str, reply: Message, context: Context) -> None:
    """Push a task's reply on a fresh connection, once more on a transport error.

    Why: the SuperNode's HTTP server (uvicorn) closes a connection idle for 5 s, and a request sent on it as it
    closes gets no answer (httpx RemoteProtocolError). The task's connection sat idle while the round trained:
    one of the load test's 20 clients lost its round-1 update this way, and the round waited for it in vain.
    """
    for attempt in (1, 2):
        pusher = _task_client(address, token)
        try:
            push_message(pusher, reply, context)
            return
        except httpx.TransportError as err:
            if attempt == 2:
                raise
            log.warning("pushing the reply failed (%s); pushing it again", type(err).__name__)
        finally:
            pusher.close()


def _task_client(address: str, token: str) -> RuntimeHttpClient:
    """A Runtime API client for one task, on its own connections."""
    return _client(address, [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)])


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """Flower's run_clientapp.pull_task_input, with a short backoff for objects not yet at the SuperNode."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("no message came with the task")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    first, cap = PULL_BACKOFF_SECONDS
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=first,
        backoff_cap=cap,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower does: the deflated message lacks it
    return message, context, run, fab


def _heartbeat(client: RuntimeHttpClient, stop: threading.Event) -> None:
    # Flower's HeartbeatSender raises SIGINT in the process when a task expires; this process outlives tasks.
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            if not client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success:
                return
        except httpx.TransportError:  # a connection closed under it (see push_reply): the next beat opens another
            continue
        except httpx.HTTPError:
            return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedtune.client.runtime", description=__doc__.splitlines()[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (127.0.0.1:PORT)")
    p.add_argument("--secret-file", type=Path, required=True, help="the SuperExec secret shared with the SuperNode")
    p.add_argument("--parent-pid", type=int, help="exit when this process (fedtune-client start) exits")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    import datasets

    from fedtune.client.deploy import app  # fedtune's own ClientApp, from this installation

    datasets.disable_progress_bars()  # reading the node's own file is quick; a bar per split is noise in its log

    runtime = ClientRuntime(args.runtime_api_address, args.secret_file.read_bytes(), app, lambda s: print(s, flush=True))
    print("fedtune-client: runtime ready (fedtune's installed ClientApp only)", flush=True)
    try:
        runtime.serve_forever()
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
