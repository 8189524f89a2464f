"""A data holder accepts only fedtune's own app package: built by Flower from the pyproject the coordinator writes."""

from __future__ import annotations

import pytest
from flwr.cli.build import build_fab_from_files

from fedtune.client.trusted_app import PROTOCOL_KEY, PROTOCOL_VERSION, app_pyproject, refusal

RUN_CONFIG = {"model": "minilm", "num-rounds": 3}


def fab(files: dict[str, bytes]) -> bytes:
    return build_fab_from_files(files)[0]


def fedtune_fab(**replace: str) -> bytes:
    text = app_pyproject(RUN_CONFIG)
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return fab({"pyproject.toml": text.encode()})


def test_the_coordinators_own_app_is_accepted() -> None:
    assert refusal(fedtune_fab(), {PROTOCOL_KEY: PROTOCOL_VERSION, **RUN_CONFIG}) is None


@pytest.mark.parametrize(
    ("package", "why"),
    [
        (lambda: fab({"pyproject.toml": app_pyproject(RUN_CONFIG).encode(), "client/x.py": b""}), "files of its own"),
        (lambda: fedtune_fab(**{'clientapp = "fedtune.client.deploy:app"': 'clientapp = "evil.client:app"'}), "components"),
        (lambda: fedtune_fab(**{'serverapp = "fedtune.coordinator.deploy:app"': 'serverapp = "evil:app"'}), "components"),
        (lambda: fedtune_fab(**{'publisher = "fedtune"': 'publisher = "outsider"'}), "published as"),
        (lambda: fedtune_fab(**{"dependencies = []": 'dependencies = ["evil==1.0"]'}), "dependencies"),
        (lambda: b"not a zip", "not a readable"),
    ],
)
def test_anything_else_is_refused_with_a_reason(package, why: str) -> None:
    reason = refusal(package(), {PROTOCOL_KEY: PROTOCOL_VERSION, **RUN_CONFIG})
    assert reason is not None and why in reason


@pytest.mark.parametrize("version", [None, PROTOCOL_VERSION + 1, "1"])
def test_another_protocol_version_is_refused(version) -> None:
    config = RUN_CONFIG | ({} if version is None else {PROTOCOL_KEY: version})
    reason = refusal(fedtune_fab(), config)
    assert reason is not None and "protocol" in reason
