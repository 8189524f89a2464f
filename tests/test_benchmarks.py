"""Smoke runs of the benchmarks (seconds each, tiny model): they keep working, and their JSON has every figure."""

from __future__ import annotations

import json
from pathlib import Path


def test_p1_dp_overhead_smoke(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedtune.benchmarks.p1_dp_overhead import MODES, main

    out = tmp_path / "p1.json"
    assert main(["--smoke", "--model", str(tiny_model_dir), "--batch-size", "8", "--max-length", "16", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["finetune"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(f, m) for f in ("lora", "full") for m in MODES}
    for (_, mode), row in rows.items():
        assert row["median_step_s"] > 0 and row["peak_rss_mib"] > 0
        assert (row["time_vs_non_dp"] == 1.0) == (mode == "non-dp")
    assert rows[("lora", "hooks")]["trainable_params"] < rows[("full", "hooks")]["trainable_params"]
    assert result["machine"]["cores"] >= 1 and result["meta"]["batch_size"] == 8


def test_p4_communication_smoke(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedtune.benchmarks.p4_communication import main

    out = tmp_path / "p4.json"
    assert main(["--smoke", "--model", str(tiny_model_dir), "--max-length", "16", "--out", str(out)]) == 0
    rows = {r["setting"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["full fine-tuning"]["upload_vs_full"] == 1.0
    # Bytes follow what is sent: 8-bit codes are a quarter of float32, LoRA a small part of the model.
    assert rows["full, 8-bit"]["upload_bytes"] < 0.26 * rows["full fine-tuning"]["upload_bytes"]
    assert rows["LoRA, 8-bit"]["upload_bytes"] < rows["LoRA"]["upload_bytes"] < 0.01 * rows["full fine-tuning"]["upload_bytes"]
    assert rows["LoRA"]["download_bytes"] >= 4 * rows["LoRA"]["params_sent"]
    assert 0 < rows["LoRA, 8-bit"]["relative_error"] < 0.05
