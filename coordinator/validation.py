"""Check every decoded client update before aggregation: expected names, shapes, dtypes, finite values, bounded norm."""

from __future__ import annotations

import numpy as np

from fedtune.client.update_codec import Tensors


def expected_layout(tensors: Tensors) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of the global model's travelling weights."""
    return {name: (tuple(a.shape), str(a.dtype)) for name, a in tensors.items()}


def update_problem(update: Tensors, current: Tensors, max_update_norm: float) -> str | None:
    """Why this update must not be aggregated, or None when it is acceptable.

    The wire already fits a reply to the task's layout (client/wire.py); checking names, shapes and dtypes again
    here keeps this check whole for any caller.
    """
    layout, got = expected_layout(current), expected_layout(update)
    if set(got) != set(layout):
        missing, extra = sorted(set(layout) - set(got)), sorted(set(got) - set(layout))
        return f"unexpected tensors (missing {missing[:3]}, extra {extra[:3]})"
    for name, (shape, dtype) in layout.items():
        if got[name] != (shape, dtype):
            return f"tensor {name} is {got[name][0]} {got[name][1]}, expected {shape} {dtype}"
    squared = 0.0
    for name, values in update.items():
        if not np.all(np.isfinite(values)):
            return f"tensor {name} holds NaN or infinite values"
        squared += float(np.sum((values.astype(np.float64) - current[name]) ** 2))
    norm = squared**0.5
    if norm > max_update_norm:
        return f"update norm {norm:.3g} exceeds the bound {max_update_norm:g}"
    return None
