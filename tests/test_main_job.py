"""End-to-end: README's main job, as written, on the bundled MiniLM and the embedded VADER data (about 2 min);
while it runs, every socket of its process tree is watched (Ray must stay on loopback)."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_simulation_ray import Watch, outside_loopback, stop_all, watching

pytestmark = pytest.mark.e2e


@dataclasses.dataclass
class MainJob:
    run_dir: Path
    output: str
    watch: Watch  # every listening socket and command line of the run's process tree, sampled every 0.5 s
    leftovers: list[str]


@pytest.fixture(scope="module")
def main_job(tmp_path_factory: pytest.TempPathFactory) -> MainJob:
    """`fedtune-simulate` with no arguments, as a user with a usual umask (022) and no Ray settings runs it."""
    cwd = tmp_path_factory.mktemp("main-job")
    script = Path(sys.executable).with_name("fedtune-simulate")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # the CLI must set up Ray itself
    proc = subprocess.Popen(
        [str(script)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=lambda: os.umask(0o022),
    )
    watch = Watch()
    try:
        with watching(proc.pid) as watch:
            output, _ = proc.communicate(timeout=900)
    finally:
        proc.kill()
        leftovers = stop_all(set(watch.cmdlines))  # also when the run failed or hung
    assert proc.returncode == 0, output[-3000:]
    (run_dir,) = (cwd / "runs").iterdir()
    return MainJob(run_dir, output, watch, leftovers)


def test_default_run_listens_on_loopback_only_keeps_its_files_private_and_prints_no_warning(main_job: MainJob) -> None:
    """Ray has no authentication: with its defaults, GCS, raylet, driver and workers listen on every interface."""
    seen = {x.process.split(".")[0] for x in main_job.watch.listeners}
    assert {"gcs_server", "raylet", "ray::ClientAppActor"} <= seen, seen  # the watch saw the servers while up
    assert outside_loopback(main_job.watch) == []
    gcs = next(c for c in main_job.watch.cmdlines.values() if Path(c[0]).name == "gcs_server")
    log_dir = Path(next(a.split("=", 1)[1] for a in gcs if a.startswith("--log_dir=")))
    private = next(p for p in log_dir.parents if p.name.startswith("fedtune-ray-"))  # not the shared /tmp/ray
    assert not private.exists()  # removed after the run
    assert all("--disable-frontend" in c for c in main_job.watch.cmdlines.values() if any("dashboard.py" in a for a in c))
    assert "Warning" not in main_job.output and "WARNING" not in main_job.output, main_job.output[-3000:]
    assert main_job.leftovers == []  # Ray stopped every process it started
    written = list(main_job.run_dir.rglob("*"))
    assert any(p.name == "results.json" for p in written) and any(p.name == "model.safetensors" for p in written)
    readable = [f"{p.name} {stat.filemode(p.stat().st_mode)}" for p in written if p.stat().st_mode & 0o077]
    assert not readable, f"readable by group or others: {readable}"


def test_results_hold_dp_rounds_and_every_clients_epsilon(main_job: MainJob) -> None:
    results = json.loads((main_job.run_dir / "results.json").read_text())
    assert results["privacy"]["dp"] is True and results["privacy"]["target_epsilon"] == 8.0
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == list(range(6))
    for r in rounds[1:]:
        assert {"accuracy", "loss"} <= set(r["global"])
        assert sorted(r["clients"], key=int) == [str(i) for i in range(10)]
        assert all(0 < c["epsilon"] <= 8.0 + 1e-6 for c in r["clients"].values())


def test_exported_model_beats_majority_baseline_by_ten_points(main_job: MainJob) -> None:
    from transformers import pipeline

    from fedtune.simulations.datasets import DataSpec, split

    results = json.loads((main_job.run_dir / "results.json").read_text())
    _, held_out, labels = split(DataSpec())  # the default job's held-out split (same seed)
    # The bundled MiniLM is mean-pooled: with fedtune imported (above), its registered classes load the export, and
    # no code from the model folder runs (trust_remote_code=True would run the folder's fallback instead).
    classify = pipeline("text-classification", model=str(main_job.run_dir / "model"), device="cpu")
    predicted = [p["label"] for p in classify(list(held_out["text"]), batch_size=256)]
    truth = [labels[i] for i in held_out["label"]]
    accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    majority = max(truth.count(name) for name in labels) / len(truth)
    assert majority == pytest.approx(results["baseline"]["accuracy"])
    assert accuracy >= majority + 0.10, f"accuracy {accuracy:.3f} vs majority baseline {majority:.3f}"
