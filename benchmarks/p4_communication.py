"""P4: bytes per client per round: the global model down, the update up, for full fine-tuning, LoRA and 8-bit LoRA.

Sizes are those of Flower's serialised messages (the protobuf gRPC carries, before TLS framing). The LoRA
update is a real one: a round of DP-SGD on SST-2 rows (or generated ones), so the 8-bit error is realistic.

    python -m fedtune.benchmarks.p4_communication
    python -m fedtune.benchmarks.p4_communication --smoke --model DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

LABELS = ("negative", "positive")


def payload_bytes(content: Any) -> int:
    """Serialised size of a message's content (a RecordDict), as Flower puts it on the wire."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).ByteSize()


Weights = dict[str, np.ndarray]


def trained_update(model_name: str, lora: bool, rows: int, max_length: int) -> tuple[Weights, Weights]:
    """(global weights, weights after one round of DP-SGD) as numpy arrays."""
    import datasets

    from fedtune.benchmarks.p1_dp_overhead import sentences
    from fedtune.client.config import ClientConfig, ModelSpec, TrainSpec
    from fedtune.client.model import build_model, load_tokenizer, trainable_state
    from fedtune.client.train import encode, plan_round, train_round

    cfg = ClientConfig(
        labels=LABELS,
        model=ModelSpec(name=model_name, lora=lora, max_length=max_length),
        train=TrainSpec(batch_size=min(64, rows), device="cpu"),
    )
    model = build_model(cfg.model, LABELS)
    before = {k: v.numpy().copy() for k, v in trainable_state(model).items()}
    texts, labels = sentences(rows)
    data = encode(datasets.Dataset.from_dict({"text": texts, "label": labels}), load_tokenizer(model_name), max_length)
    train_round(model, data, load_tokenizer(model_name), cfg, plan=plan_round(rows, cfg, num_rounds=5), history=[])
    return before, {k: v.numpy().copy() for k, v in trainable_state(model).items()}


def measure(model_name: str, rows: int, max_length: int) -> list[dict[str, Any]]:
    from fedtune.client import wire
    from fedtune.client.config import ModelSpec
    from fedtune.client.model import build_model, trainable_state
    from fedtune.client.update_codec import quantize

    # What a DP client reports with its update (its privacy report): small next to any weights.
    privacy = wire.PrivacyReport(
        epsilon=3.2, delta=1e-5, budget_epsilon=8.0, noise_multiplier=1.1, sample_rate=0.1, history=[(1.1, 0.1, 10)]
    )

    def reply(state: Weights, base: Weights, encoding: str) -> Any:
        update = wire.Update.encode(state, base, encoding)
        return wire.TrainReply(3, num_examples=rows, train_loss=0.6, privacy=privacy, update=update).to_content()

    full = {k: v.numpy() for k, v in trainable_state(build_model(ModelSpec(name=model_name, lora=False), LABELS)).items()}
    lora_before, lora_after = trained_update(model_name, True, rows, max_length)
    codes, scales = quantize(lora_after, lora_before)
    decoded = {k: lora_before[k] + codes[k].astype(np.float32) * scales[k][0] for k in codes}
    delta = np.concatenate([(lora_after[k] - lora_before[k]).ravel() for k in codes])
    error = np.concatenate([(decoded[k] - lora_after[k]).ravel() for k in codes])
    # Only the size matters for full fine-tuning (its update would be as large as the model): shapes decide it.
    full_base = {k: np.zeros_like(v) for k, v in full.items()}

    settings = {  # what travels up, in fedtune's wire format (client/wire.py): one flat array, 8-bit adds scales
        "full fine-tuning": (full, reply(full, full_base, "float32")),
        "full, 8-bit": (full, reply(full, full_base, "int8")),
        "LoRA": (lora_after, reply(lora_after, lora_before, "float32")),
        "LoRA, 8-bit": (lora_after, reply(lora_after, lora_before, "int8")),
    }
    rows_out = []
    full_up = payload_bytes(settings["full fine-tuning"][1])
    for name, (state, up) in settings.items():
        # The global model goes down in float32, as a task.
        down = payload_bytes(wire.Task(server_round=1, num_rounds=5, weights=state).to_content())
        up_bytes = payload_bytes(up)
        row = {
            "setting": name,
            "params_sent": int(sum(v.size for v in state.values())),
            "download_bytes": down,
            "upload_bytes": up_bytes,
            "upload_vs_full": up_bytes / full_up,
        }
        if name == "LoRA, 8-bit":
            row["relative_error"] = float(np.linalg.norm(error) / np.linalg.norm(delta))
        rows_out.append(row)
    return rows_out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedtune.benchmarks.p4_communication", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm", help="minilm (bundled) or a local model directory")
    p.add_argument("--rows", type=int, default=256, help="rows of the one DP-SGD round that makes the LoRA update")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--smoke", action="store_true", help="a few rows (keeps the script from rotting)")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/p4_communication.json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.rows = 16
    from fedtune.benchmarks.record import RESULTS, write

    rows = measure(args.model, args.rows, args.max_length)
    meta = {"model": args.model, "rows": args.rows, "max_length": args.max_length,
            "goal": "LoRA upload <= 1% of full; LoRA 8-bit <= 0.3%",
            "relative_error": "||decoded - sent|| / ||sent - global|| over the LoRA update"}  # fmt: skip
    write("P4 communication per client per round", rows, args.out or RESULTS / "p4_communication.json", meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
