"""Weights on the wire (client/update_codec.py): one flat array in a known layout; 8-bit updates have small, unbiased
error and per-tensor scales; malformed encodings are refused."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.client.update_codec import Layout, UpdateCodecError, dequantize, flatten, quantize, unflatten


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"lora_A": rng.normal(size=(8, 64)).astype(np.float32), "classifier.bias": rng.normal(size=2).astype(np.float32)}


def test_error_is_at_most_one_step_per_element_and_unbiased() -> None:
    base = _weights(0)
    new = {k: v + np.float32(0.01) * _weights(1)[k] for k, v in base.items()}
    codes, scales = quantize(new, base, seed=3)
    assert all(c.dtype == np.int8 for c in codes.values())
    assert sum(c.nbytes for c in codes.values()) * 4 == sum(v.nbytes for v in new.values())
    decoded = dequantize(codes, scales, base)
    for name in base:
        step = scales[name][0]
        assert np.max(np.abs(decoded[name] - new[name])) <= step * (1 + 1e-4)
        assert decoded[name].dtype == base[name].dtype
    # Stochastic rounding: averaging many encodings of the same update converges to it.
    delta = new["lora_A"] - base["lora_A"]
    mean = np.mean([dequantize(*quantize(new, base, seed=s), base)["lora_A"] - base["lora_A"] for s in range(200)], axis=0)
    single = decoded["lora_A"] - base["lora_A"]
    assert np.linalg.norm(mean - delta) < 0.25 * np.linalg.norm(single - delta)


def test_an_unchanged_tensor_encodes_as_zeros() -> None:
    base = _weights(0)
    codes, scales = quantize(base, base)
    assert all(not c.any() for c in codes.values())
    assert all(np.array_equal(dequantize(codes, scales, base)[k], base[k]) for k in base)


@pytest.mark.parametrize(
    "spoil,needle",
    [
        (lambda c, s: (c | {"lora_A": c["lora_A"].astype(np.int16)}, s), "expected (8, 64) int8"),
        (lambda c, s: (c | {"lora_A": c["lora_A"][:4]}, s), "expected (8, 64) int8"),
        (lambda c, s: (c, s | {"lora_A": np.array([np.nan], dtype=np.float32)}), "NaN or infinite scale"),
        (lambda c, s: ({k: v for k, v in c.items() if k != "lora_A"}, s), "other tensors"),
    ],
    ids=["wrong-dtype", "wrong-shape", "nan-scale", "missing-tensor"],
)
def test_malformed_encodings_are_refused(spoil, needle: str) -> None:
    base = _weights(0)
    codes, scales = spoil(*quantize(_weights(1), base))
    with pytest.raises(UpdateCodecError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        dequantize(codes, scales, base)


def test_weights_travel_flat_and_come_back_by_name() -> None:
    weights = _weights(0)
    layout = Layout.of(weights)
    flat = flatten(weights, layout)
    assert flat.shape == (8 * 64 + 2,) and flat.dtype == np.float32
    back = unflatten(flat, layout)
    assert list(back) == list(weights) and all(np.array_equal(back[k], weights[k]) for k in weights)
    with pytest.raises(UpdateCodecError, match="expected 514"):
        unflatten(flat[:-1], layout)
    with pytest.raises(UpdateCodecError, match="not the layout's"):
        flatten({"lora_A": weights["lora_A"]}, layout)


def test_an_eight_bit_update_keeps_one_scale_per_tensor_on_the_wire() -> None:
    from fedtune.client.wire import Update

    base = _weights(0)
    new = {"lora_A": base["lora_A"] + np.float32(1.0), "classifier.bias": base["classifier.bias"] + np.float32(0.001)}
    update = Update.encode(new, base, "int8", seed=1)
    assert update.values.dtype == np.int8 and update.values.shape == (8 * 64 + 2,)
    assert update.scales is not None and update.scales.shape == (2,)
    np.testing.assert_allclose(update.scales, [1.0 / 127, 0.001 / 127], rtol=1e-3)  # each tensor its own step
    decoded = update.decode(base)
    for name in base:
        np.testing.assert_allclose(decoded[name], new[name], atol=float(update.scales[list(base).index(name)]) * 1.0001)
    assert Update.encode(new, base, "float32").decode(base)["lora_A"].tolist() == new["lora_A"].tolist()
