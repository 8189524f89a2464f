"""What a fedtune run's app package (FAB) must be; a data holder refuses any other, whoever sent it."""

from __future__ import annotations

import io
import json
import tomllib
import zipfile
from typing import Any

# Bump when what travels between client and coordinator changes incompatibly: a client refuses runs of another.
# 2: weights travel as one flat array, metrics and config through client/wire.py; 3: causal LMs;
# 4: the PLD accountant (index 2 of privacy.ACCOUNTANTS)
PROTOCOL_VERSION = 4
PROTOCOL_KEY = "fedtune-protocol"
PUBLISHER = "fedtune"
APP_NAME = "fedtune"
SERVERAPP = "fedtune.coordinator.deploy:app"
CLIENTAPP = "fedtune.client.deploy:app"
# A FAB made by write_pyproject holds its pyproject and Flower's manifest, nothing else: no code can ride along.
ALLOWED_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})


def app_pyproject(run_config: dict[str, Any]) -> str:
    """The only app fedtune's clients accept: a pyproject naming fedtune's installed apps, plus the run config."""
    lines = [
        "[project]",
        f'name = "{APP_NAME}"',
        'version = "1.0.0"',
        'description = "fedtune: federated, differentially private fine-tuning"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        f'publisher = "{PUBLISHER}"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{SERVERAPP}"',
        f'clientapp = "{CLIENTAPP}"',
        "",
        "[tool.flwr.app.config]",
        f"{PROTOCOL_KEY} = {PROTOCOL_VERSION}",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in run_config.items()]
    return "\n".join(lines) + "\n"


def refusal(fab_content: bytes, run_config: dict[str, Any]) -> str | None:
    """Why this app package is not fedtune's own (one sentence), or None when the client may run it."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab_content)) as fab:
            names = set(fab.namelist())
            extra = sorted(names - ALLOWED_FILES)
            if extra:
                return f"the app package carries files of its own ({', '.join(extra[:5])}); fedtune runs only its installed code"
            pyproject = tomllib.loads(fab.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        return f"the app package is not a readable fedtune app ({type(err).__name__})"
    flwr = pyproject.get("tool", {}).get("flwr", {}).get("app", {})
    components = flwr.get("components", {})
    if components.get("clientapp") != CLIENTAPP or components.get("serverapp") != SERVERAPP:
        return f"the app names components {components!r}, not fedtune's ({CLIENTAPP}, {SERVERAPP})"
    if flwr.get("publisher") != PUBLISHER or pyproject.get("project", {}).get("name") != APP_NAME:
        return f"the app is published as {flwr.get('publisher')!r}/{pyproject.get('project', {}).get('name')!r}, not fedtune's"
    if pyproject.get("project", {}).get("dependencies"):
        return "the app asks for dependencies to be installed; fedtune runs only its installed code"
    version = run_config.get(PROTOCOL_KEY)
    if version != PROTOCOL_VERSION:
        return f"the run speaks fedtune protocol {version!r}; this client speaks {PROTOCOL_VERSION} (update one side)"
    return None
