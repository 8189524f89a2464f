"""An outsider on the network and a foreign Flower app: what the deployment tests throw at a live coordinator."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent

# The paths of Flower's Control and Runtime APIs and its docs: the public port must serve none of them.
NON_FLEET_PATHS = [
    "/v1/control/list-runs",
    "/v1/control/start-run",
    "/v1/control/register-node",
    "/v1/runtime/acquire-task",
    "/v1/runtime/pull-messages",
    "/openapi.json",
    "/docs",
    "/health",
    "/v1/fleet/../control/list-runs",
    "/v1/fleet/%2e%2e/control/list-runs",
]


def outsider_home(base: Path, address: str, ca: Path) -> Path:
    """A FLWR_HOME whose connection `attack` points at the coordinator's public address, with only ca.pem."""
    home = base / "outsider-flwr"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "attack"\n\n[superlink.attack]\naddress = "{address}"\nroot-certificates = "{ca}"\n'
    )
    return home


def foreign_app(base: Path, name: str, markers: Path) -> Path:
    """A Flower app of someone else's: its ClientApp would read the node's config and data file and write a marker;
    its ServerApp sends one train message to every node and writes what came back."""
    app = base / name
    pkg = app / name
    pkg.mkdir(parents=True, exist_ok=True)
    markers.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(
        textwrap.dedent(f"""\
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"

        [project]
        name = "{name}"
        version = "1.0.0"
        dependencies = []

        [tool.hatch.build.targets.wheel]
        packages = ["."]

        [tool.flwr.app]
        publisher = "outsider"

        [tool.flwr.app.components]
        serverapp = "{name}.server:app"
        clientapp = "{name}.client:app"

        [tool.flwr.app.config]
        markers = "{markers}"
        """)
    )
    (pkg / "__init__.py").write_text("")
    (pkg / "client.py").write_text(
        textwrap.dedent("""\
        from pathlib import Path
        from flwr.app import Message, RecordDict, ConfigRecord
        from flwr.clientapp import ClientApp

        app = ClientApp()

        @app.train()
        def train(msg, context):
            loot = {k: str(v) for k, v in context.node_config.items()}
            data = Path(str(context.node_config.get("data-path", "")))
            loot["rows"] = data.read_text()[:2000] if data.is_file() else ""
            Path(str(context.run_config["markers"]), f"client-{context.node_id}").write_text(str(loot))
            return Message(RecordDict({"loot": ConfigRecord(loot)}), reply_to=msg)
        """)
    )
    (pkg / "server.py").write_text(
        textwrap.dedent("""\
        from pathlib import Path
        from flwr.app import Message, RecordDict, ConfigRecord
        from flwr.serverapp import ServerApp

        app = ServerApp()

        @app.main()
        def main(grid, context):
            markers = Path(str(context.run_config["markers"]))
            (markers / "server-ran").write_text("ran")
            nodes = list(grid.get_node_ids())
            msgs = [Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train") for n in nodes]
            replies = list(grid.send_and_receive(msgs, timeout=120))
            lines = [r.error.reason if r.has_error() else "content: " + ",".join(r.content.keys()) for r in replies]
            (markers / "server-replies").write_text("\\n".join(lines))
        """)
    )
    return app


def flwr(flwr_home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = os.environ | {"FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def outsider_attempts(
    home: Path, app: Path, outsider_pub: Path, run_id: str, node_id: int
) -> dict[str, subprocess.CompletedProcess]:
    """Everything the issue found an outsider with ca.pem could do, tried against the public port."""
    return {
        "ls": flwr(home, "ls", "attack"),
        "log": flwr(home, "log", run_id, "attack"),
        "stop": flwr(home, "stop", run_id, "attack"),
        "run": flwr(home, "run", str(app), "attack"),
        "supernode register": flwr(home, "supernode", "register", str(outsider_pub), "attack"),
        "supernode unregister": flwr(home, "supernode", "unregister", str(node_id), "attack"),
        "supernode list": flwr(home, "supernode", "list", "attack"),
    }


def raw_requests(address: str, ca: Path) -> dict[str, int]:
    """Status code of a direct request to each non-Fleet path (TLS verified with ca.pem; POST and GET)."""
    out = {}
    with httpx.Client(base_url=f"https://{address}", verify=str(ca), timeout=30) as client:
        for path in NON_FLEET_PATHS:
            for method in ("GET", "POST"):
                out[f"{method} {path}"] = client.request(method, path, content=b"\x00").status_code
    return out


def refused_by_the_gateway(done: subprocess.CompletedProcess) -> bool:
    """The flwr CLI call failed because the public port does not serve the Control API (not for any other reason)."""
    return done.returncode != 0 and "404 Not Found" in done.stdout + done.stderr
