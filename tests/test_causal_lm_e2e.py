"""The bundled SmolLM2, federated: 2 clients x 1 round of DP-SGD on a few dozen short rows, exported, generating."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_instructions

pytestmark = pytest.mark.e2e


def test_smollm2_trains_under_dp_and_its_export_generates_with_a_plain_pipeline(tmp_path: Path) -> None:
    from transformers import pipeline

    from fedtune.simulations.cli import main

    out = tmp_path / "run"
    data = write_instructions(tmp_path / "qa.jsonl", 40)
    flags = ["--model", "smollm2", "--dataset", str(data), "--prompt-column", "q", "--response-column", "a"]
    flags += ["--clients", "2", "--rounds", "1", "--batch-size", "8", "--max-length", "48", "--threads", "1"]
    assert main([*flags, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["task"] == "causal-lm" and results["privacy"]["dp"]
    assert all(0 < c["epsilon"] <= 8.0 for c in results["clients"].values()) and len(results["clients"]) == 2
    assert [r["round"] for r in results["rounds"]] == [0, 1]
    assert all(r["global"]["perplexity"] > 1 for r in results["rounds"])
    assert all(s["completion"].strip() for s in results["samples"])  # the final model answers the fixed prompts

    generate = pipeline("text-generation", model=str(out / "model"), device="cpu")
    chat = [{"role": "user", "content": "What is 2 plus 3?"}]
    reply = generate(chat, max_new_tokens=12, do_sample=False)[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and reply["content"].strip()
