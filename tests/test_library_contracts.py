"""fedtune's few uses of private library internals, pinned: each test fails when the installed library drops
the name or changes what it means, instead of fedtune silently doing nothing (or the wrong thing)."""

from __future__ import annotations

import ast
import inspect
import textwrap
from types import SimpleNamespace

import pytest


@pytest.fixture
def in_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are made inside a run; pretend to be in one (as tests/test_hostile_replies.py does)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _calls(function, name: str) -> list[ast.Call]:
    """Every call of `name` (a plain name) in `function`'s source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name]


# coordinator/rounds.py, `_forget_pending`: a retried round drops the privacy event its first try configured.
def test_flower_dp_wrapper_keeps_one_pending_event_per_configured_round(in_a_run: None) -> None:
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod

    from fedtune.coordinator.rounds import _forget_pending

    config = PrivacyConfig(
        target_delta=1e-5,
        population_size=2,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    )
    accountant = SimpleNamespace(config=config)  # only its config is read while configuring
    strategy = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(min_train_nodes=2, min_available_nodes=2),
        noise_multiplier=1.0,
        clipping_norm=1.0,
        num_sampled_clients=2,
        accountant=accountant,
    )
    grid = SimpleNamespace(get_node_ids=lambda: [1, 2])

    def configure(server_round: int) -> None:
        strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)

    assert strategy._pending_events == {}  # the name rounds.py reads: a dict, keyed by server round
    configure(1)
    assert list(strategy._pending_events) == [1]
    with pytest.raises(ValueError, match="already has a pending privacy event"):
        configure(1)  # what a retried round would hit without fedtune's forgetting
    _forget_pending(strategy, 1)
    assert strategy._pending_events == {}
    configure(1)  # the retry configures again


# client/flower_node.py: `PromptPull` replaces the SuperNode's message pull, found by its module-global name.
def test_supernode_loop_calls_the_message_pull_by_its_module_global_name_with_keywords_only() -> None:
    from flwr.supernode import start_client_internal as module

    calls = _calls(module.start_client_internal, "_pull_and_store_message")
    assert calls, "the SuperNode loop no longer calls _pull_and_store_message; client/flower_node.py would do nothing"
    assert all(not call.args for call in calls)  # PromptPull.__call__ takes keyword arguments only
    signature = inspect.signature(module._pull_and_store_message)
    assert signature.return_annotation in ("int | None", int | None)  # a run id when a message came, else None
    parameters = signature.parameters.values()
    assert all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in parameters)


# client/flower_node.py: a shorter first retry for objects that reach the SuperLink just after their message.
def test_supernode_pulls_objects_through_its_module_global_pull_objects_with_backoff_settings() -> None:
    from flwr.supernode import start_client_internal as module

    assert _calls(module._pull_and_store_message, "pull_objects"), "the SuperNode no longer pulls through pull_objects"
    parameters = inspect.signature(module.pull_objects).parameters
    for name in ("initial_backoff", "backoff_cap"):
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY


# client/flower_node.py: `prompt_push` hands `_push_messages` a state and an object store that await replies.
def test_supernode_pushes_replies_through_the_two_lookups_prompt_replies_speeds_up() -> None:
    from flwr.supernode import start_client_internal as module

    calls = _calls(module.start_client_internal, "_push_messages")
    assert calls and all(not call.args for call in calls), "the SuperNode loop no longer calls _push_messages by keyword"
    assert {k.arg for call in calls for k in call.keywords} >= {"state", "object_store"}
    source = inspect.getsource(module._push_messages)
    # The two waits PromptReplies replaces: the reply itself, then each of its objects' content.
    assert "state.get_messages_legacy(is_reply=True)" in source
    assert 'object_store.get(tree.object_id)) == b""' in source


# coordinator/deploy.py: `pull_objects_promptly` shortens the ServerApp's first retry for a reply's objects.
def test_serverapp_grid_pulls_reply_objects_through_its_module_global_pull_objects() -> None:
    from flwr.superlink.grid import http_grid

    assert _calls(http_grid.HttpGrid.pull_messages, "pull_objects"), "the Grid no longer pulls through pull_objects"
    parameters = inspect.signature(http_grid.pull_objects).parameters
    for name in ("initial_backoff", "backoff_cap"):
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY


# client/runtime.py: a pulled message gets the id of its object tree, written where Flower itself writes it.
def test_flower_message_id_is_read_from_the_metadata_dict_entry_fedtune_writes(in_a_run: None) -> None:
    from flwr.app import Message, RecordDict

    message = Message(RecordDict(), dst_node_id=1, message_type="train")
    message.metadata.__dict__["_message_id"] = "tree-object-id"
    assert message.metadata.message_id == "tree-object-id"


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the input needs no gradient here
# client/train.py: `_innermost` looks through Opacus' wrapper (`_module`); `cleanup` lets the model train again.
def test_opacus_wrapper_holds_the_model_as_module_and_cleanup_leaves_it_trainable_again() -> None:
    import torch
    from opacus import GradSampleModule

    model = torch.nn.Linear(3, 2)
    for _ in range(2):  # two rounds on the same model, as a client's runtime does
        wrapped = GradSampleModule(model)
        assert wrapped._module is model
        wrapped(torch.randn(4, 3)).sum().backward()
        assert model.weight.grad_sample.shape == (4, 2, 3)  # per-sample gradients: the hooks ran
        wrapped.cleanup()
        assert not hasattr(model.weight, "grad_sample")
        model(torch.randn(4, 3)).sum().backward()
        assert not hasattr(model.weight, "grad_sample")  # no hook left behind on the plain model
