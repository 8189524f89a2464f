"""fedtune installs under one namespace: `fedtune.client` imports anywhere, `client` nowhere, and ruff bans it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).parent / "ruff"


def test_outside_the_repository_fedtune_packages_import_and_the_old_names_do_not(tmp_path: Path) -> None:
    probe = (
        "import importlib.util, fedtune.client, fedtune.coordinator, fedtune.privacy, fedtune.simulations\n"
        "import fedtune.benchmarks\n"
        "print([n for n in ('client', 'coordinator', 'privacy', 'simulations') if importlib.util.find_spec(n)])\n"
        "import benchmarks; print(benchmarks.__file__)\n"  # Opacus' own top-level package, not fedtune's
    )
    # As installed: no PYTHONPATH (Ray, started by other tests in this process, adds the repository to it).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    old_names, opacus_benchmarks = done.stdout.splitlines()
    assert old_names == "[]"
    assert not opacus_benchmarks.startswith(str(REPO / "benchmarks"))


def test_ruff_passes_on_the_repository_and_refuses_an_old_top_level_import(tmp_path: Path) -> None:
    clean = subprocess.run([str(RUFF), "check", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stdout
    probe = tmp_path / "probe.py"
    probe.write_text("from client.app import handle_train\nimport coordinator\n\nprint(handle_train, coordinator)\n")
    banned = subprocess.run(
        [str(RUFF), "check", "--config", str(REPO / "pyproject.toml"), "--no-cache", str(probe)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert banned.returncode == 1
    assert banned.stdout.count("TID251") == 2, banned.stdout
