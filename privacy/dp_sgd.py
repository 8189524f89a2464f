"""Attach Opacus DP-SGD to a model, optimizer and loader, continuing a client's accountant history."""

from __future__ import annotations

import warnings

import torch
from torch.utils.data import DataLoader

from fedtune.privacy.accounting import History, opacus_imported_quietly

with opacus_imported_quietly():
    from opacus import PrivacyEngine
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float | list[float],
    history: History,
    grad_sample_mode: str = "hooks",
) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader, PrivacyEngine, DPLossFastGradientClipping | None]:
    """Wrap for DP-SGD with Poisson sampling; `engine.accountant.history` then holds old + new steps.

    A list of norms clips each parameter apart (Opacus' per-layer clipping, in the optimizer's parameter
    order); the noise then scales with the norms' L2 norm. With grad_sample_mode "ghost" (ghost clipping:
    per-sample gradient norms without per-sample gradients) the last element is the loss to train with (it
    runs both backward passes); otherwise it is None.
    """
    with warnings.catch_warnings():
        # Opacus reminds on every construction that secure_mode (torchcsprng) is off; fedtune
        # documents that choice once instead of repeating it per client and round.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        # The engine's accountant only carries the step history: fedtune computes every epsilon itself
        # (privacy.accounting), with accountants Opacus does not have (PLD) as well as those it has.
        engine = PrivacyEngine(accountant="rdp")
    # Start from what this data holder already spent, not from zero (Flower's example builds a
    # fresh engine every round and so reports one round's epsilon as if it were the total).
    engine.accountant.history = list(history)
    model.train()  # Opacus needs train mode at wrap time; from_pretrained returns eval mode
    ghost = {"criterion": torch.nn.CrossEntropyLoss()} if grad_sample_mode == "ghost" else {}
    wrapped = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        clipping="per_layer" if isinstance(max_grad_norm, list) else "flat",
        poisson_sampling=True,
        grad_sample_mode=grad_sample_mode,
        **ghost,
    )
    if ghost:
        dp_model, dp_optimizer, criterion, dp_loader = wrapped
        return dp_model, dp_optimizer, dp_loader, engine, criterion
    dp_model, dp_optimizer, dp_loader = wrapped
    return dp_model, dp_optimizer, dp_loader, engine, None
