"""How weights cross the wire: one flat array in a layout both sides know, as float32 or an 8-bit difference.

A Flower message costs one object per record, per Array and per 5 MB chunk of an Array, and deployed, each
object is one signed HTTP call through the Fleet gateway: 26 LoRA tensors cost 56 objects a reply (~2 s),
one flat array costs 6. Aggregation is elementwise (FedAvg, FedProx, FedAdam, median, trimmed mean, Krum's
distances, central DP's clipping norm), so it gives the same result on the named tensors either way.

Quantising happens after DP-SGD has produced the update, so it is post-processing and costs no privacy.
Each tensor's difference is scaled by its own largest magnitude to [-127, 127] and rounded stochastically,
so the rounding error is unbiased and averages out across clients; its scales travel as one float32 array.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

ENCODINGS = ("float32", "int8")

Tensors = dict[str, np.ndarray]


class UpdateCodecError(ValueError):
    """Weights do not fit the layout, or an encoded update does not match the global model it claims to update."""


@dataclass(frozen=True)
class Layout:
    """The travelling tensors' names, shapes and dtypes, in the order they are laid end to end."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, tensors: Mapping[str, np.ndarray]) -> Layout:
        shapes = tuple(tuple(int(d) for d in t.shape) for t in tensors.values())
        return cls(tuple(tensors), shapes, tuple(str(t.dtype) for t in tensors.values()))

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.shapes) == len(self.dtypes):
            raise UpdateCodecError("a layout needs one shape and one dtype per name")
        if len(set(self.names)) != len(self.names):
            raise UpdateCodecError("a layout names a tensor twice")
        if any(d < 0 for shape in self.shapes for d in shape):
            raise UpdateCodecError("a layout has a negative dimension")
        if any(np.dtype(d).kind != "f" for d in self.dtypes):
            raise UpdateCodecError(f"only floating-point weights travel, not {sorted(set(self.dtypes))}")

    @property
    def sizes(self) -> list[int]:
        return [math.prod(shape) for shape in self.shapes]

    @property
    def size(self) -> int:
        return sum(self.sizes)

    @property
    def dtype(self) -> np.dtype:
        """The flat array's dtype: one that holds every tensor's values exactly (float32 for fedtune's models)."""
        return np.result_type(*self.dtypes) if self.dtypes else np.dtype(np.float32)


def flatten(tensors: Mapping[str, np.ndarray], layout: Layout, dtype: np.dtype | None = None) -> np.ndarray:
    """The tensors laid end to end in `layout`'s order, as one 1-D array of `dtype` (the layout's by default)."""
    if set(tensors) != set(layout.names):
        raise UpdateCodecError(f"the tensors are not the layout's: {sorted(set(tensors) ^ set(layout.names))[:3]}")
    parts = [np.asarray(tensors[name]).reshape(-1) for name in layout.names]
    dtype = layout.dtype if dtype is None else dtype
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def unflatten(flat: np.ndarray, layout: Layout, cast: bool = True) -> Tensors:
    """The named tensors of a flat array (views, or cast to the layout's dtypes when `cast`)."""
    if flat.ndim != 1 or flat.size != layout.size:
        raise UpdateCodecError(f"the weights hold {flat.size} values in shape {flat.shape}, expected {layout.size} in one row")
    out, start = {}, 0
    for name, shape, size, dtype in zip(layout.names, layout.shapes, layout.sizes, layout.dtypes):
        part = flat[start : start + size].reshape(shape)
        out[name] = part.astype(dtype, copy=False) if cast else part
        start += size
    return out


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
