"""End-to-end: README's main job, as written, on the bundled MiniLM and the embedded VADER data (about 2 min)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def main_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("main-job")
    script = Path(sys.executable).with_name("fedtune-simulate")
    done = subprocess.run([str(script)], cwd=cwd, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (cwd / "runs").iterdir()
    return run_dir


def test_results_hold_dp_rounds_and_every_clients_epsilon(main_job: Path) -> None:
    results = json.loads((main_job / "results.json").read_text())
    assert results["privacy"]["dp"] is True and results["privacy"]["target_epsilon"] == 8.0
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == list(range(6))
    for r in rounds[1:]:
        assert {"accuracy", "loss"} <= set(r["global"])
        assert sorted(r["clients"], key=int) == [str(i) for i in range(10)]
        assert all(0 < c["epsilon"] <= 8.0 + 1e-6 for c in r["clients"].values())


def test_exported_model_beats_majority_baseline_by_ten_points(main_job: Path) -> None:
    from transformers import pipeline

    from simulations.datasets import DataSpec, split

    results = json.loads((main_job / "results.json").read_text())
    _, held_out, labels = split(DataSpec())  # the default job's held-out split (same seed)
    # The bundled MiniLM is mean-pooled: the export carries that pooling as code of its own.
    classify = pipeline("text-classification", model=str(main_job / "model"), device="cpu", trust_remote_code=True)
    predicted = [p["label"] for p in classify(list(held_out["text"]), batch_size=256)]
    truth = [labels[i] for i in held_out["label"]]
    accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    majority = max(truth.count(name) for name in labels) / len(truth)
    assert majority == pytest.approx(results["baseline"]["accuracy"])
    assert accuracy >= majority + 0.10, f"accuracy {accuracy:.3f} vs majority baseline {majority:.3f}"
