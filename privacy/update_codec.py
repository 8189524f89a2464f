"""How a client's update crosses the wire: float32 weights, or an 8-bit quantised difference from the global model.

Quantising happens after DP-SGD has produced the update, so it is post-processing and costs no privacy.
Each tensor's difference is scaled by its own largest magnitude to [-127, 127] and rounded stochastically,
so the rounding error is unbiased and averages out across clients.
"""

from __future__ import annotations

import numpy as np

ENCODINGS = ("float32", "int8")


class UpdateCodecError(ValueError):
    """An encoded update does not match the global model it claims to update."""


Tensors = dict[str, np.ndarray]


def quantize(new: Tensors, base: Tensors, seed: int = 0) -> tuple[Tensors, Tensors]:
    """(int8 difference per tensor, float32 scale per tensor) such that new ~ base + q * scale."""
    rng = np.random.default_rng(seed)
    codes, scales = {}, {}
    for name, weights in new.items():
        delta = weights.astype(np.float32) - base[name].astype(np.float32)
        top = float(np.max(np.abs(delta))) if delta.size else 0.0
        scale = top / 127.0 if top > 0 else 1.0  # NaN or inf stay visible in the scale; the coordinator rejects them
        scaled = delta / np.float32(scale)
        floor = np.floor(scaled)
        rounded = floor + (rng.random(scaled.shape, dtype=np.float32) < (scaled - floor))
        codes[name] = np.clip(rounded, -127, 127).astype(np.int8)
        scales[name] = np.array([scale], dtype=np.float32)
    return codes, scales


def dequantize(codes: Tensors, scales: Tensors, base: Tensors) -> Tensors:
    """The updated weights, in the global model's dtypes; UpdateCodecError when the parts do not fit together."""
    if set(codes) != set(base) or set(scales) != set(base):
        raise UpdateCodecError("the encoded update names other tensors than the global model")
    out = {}
    for name, reference in base.items():
        code, scale = codes[name], scales[name]
        if code.dtype != np.int8 or code.shape != reference.shape or scale.shape != (1,):
            raise UpdateCodecError(f"tensor {name} is encoded as {code.shape} {code.dtype}, expected {reference.shape} int8")
        if not np.isfinite(scale[0]):
            raise UpdateCodecError(f"tensor {name} has a NaN or infinite scale")
        out[name] = (reference.astype(np.float32) + code.astype(np.float32) * scale[0]).astype(reference.dtype)
    return out
