"""Gradient canaries for a privacy audit: virtual rows whose per-sample gradient is fixed, planted by an audited client."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Each canary's gradient, per coordinate, under DP-SGD before clipping: far above any clipping norm fedtune
# accepts, so that what reaches the update is exactly what clipping lets through (a client that failed to clip
# would show it). Without DP a canary's gradient has the clipping norm (a row as large as DP-SGD would allow):
# at 100 its rows would swamp the batch, which nothing clips, and the run would train on canaries alone.
CANARY_VALUE = 100.0
COORDINATES, SAMPLING = 1, 2  # random streams of their own, apart from the coins (simulations/audit.py)


@dataclass(frozen=True)
class GradientCanaries:
    """Dirac canaries (Steinke, Nasr and Jagielski 2023; Nasr et al. 2023, "Tight Auditing of Differentially
    Private Machine Learning"): canary i's gradient is CANARY_VALUE at one coordinate of every trainable tensor
    of at least count/2 elements, zero elsewhere; in a tensor of fewer than `count` elements two canaries share
    a coordinate (more crosstalk, still fair: the classifier head's weight, 768 elements in MiniLM's, holds a
    quarter of the clipping norm's square). The included ones join each DP-SGD step's batch as real rows do,
    each with the step's sample rate."""

    seed: int
    included: tuple[bool, ...]

    @property
    def count(self) -> int:
        return len(self.included)

    def coordinates(self, shapes: dict[str, int]) -> dict[str, np.ndarray]:
        """Tensor name -> each canary's flat coordinate in it, for tensors of `shapes` (name -> size) that fit."""
        return {
            name: np.resize(np.random.default_rng([self.seed, COORDINATES, i]).permutation(size), self.count)
            for i, (name, size) in enumerate(sorted(shapes.items()))
            if 2 * size >= self.count
        }


class CanaryPlanter:
    """One round's planting: which included canaries each step samples, and their rows in the step's gradients."""

    def __init__(
        self,
        canaries: GradientCanaries,
        named: Sequence[tuple[str, torch.nn.Parameter]],
        sample_rate: float,
        seed: int,
        norm: float | None = None,
    ):
        """`norm`: without DP, each canary's gradient norm (None: CANARY_VALUE per coordinate, for DP-SGD to clip)."""
        self.named = list(named)
        self.coordinates = canaries.coordinates({n: p.numel() for n, p in self.named})
        self.value = CANARY_VALUE if norm is None else norm / max(len(self.coordinates), 1) ** 0.5
        self.planted = np.flatnonzero(np.asarray(canaries.included, dtype=bool))
        self.sample_rate = sample_rate
        self.rng = np.random.default_rng([canaries.seed, SAMPLING, seed])

    def sample(self) -> np.ndarray:
        """The included canaries in this step's batch: each independently with the sample rate (Poisson)."""
        return self.planted[self.rng.random(len(self.planted)) < self.sample_rate]

    def _rows(self, name: str, p: torch.nn.Parameter, sampled: np.ndarray) -> torch.Tensor:
        rows = torch.zeros((len(sampled), p.numel()), device=p.device, dtype=p.dtype)
        if name in self.coordinates and len(sampled):
            rows[torch.arange(len(sampled)), torch.as_tensor(self.coordinates[name][sampled], device=p.device)] = self.value
        return rows.view(len(sampled), *p.shape)

    def add_per_sample(self, sampled: np.ndarray) -> None:
        """DP-SGD: append the sampled canaries' rows to every parameter's per-sample gradients (Opacus' hooks
        computed the real rows'), before the optimizer clips, sums and noises them."""
        for name, p in self.named:
            p.grad_sample = torch.cat([p.grad_sample, self._rows(name, p, sampled)])

    def add_to_mean(self, sampled: np.ndarray, rows: int) -> None:
        """Without DP: make the batch's mean gradient over `rows` real rows the mean over those and the canaries."""
        if not len(sampled):
            return
        total = rows + len(sampled)
        for name, p in self.named:
            if p.grad is not None:
                p.grad.mul_(rows / total)
                if name in self.coordinates:  # a sum over the canaries, never a row per canary (full fine-tuning)
                    index = torch.as_tensor(self.coordinates[name][sampled], device=p.device)
                    p.grad.view(-1).index_add_(
                        0, index, torch.full((len(sampled),), self.value / total, device=p.device, dtype=p.grad.dtype)
                    )
