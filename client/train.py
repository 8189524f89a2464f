"""Local training: tokenise once, then one federated round of (DP-)SGD with dynamic padding."""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, PreTrainedTokenizerBase

from fedtune.client.canaries import CanaryPlanter, GradientCanaries
from fedtune.client.causal_lm import IGNORE, encode_lm, row_mean_loss
from fedtune.client.config import ClientConfig
from fedtune.client.model import is_head_parameter
from fedtune.privacy import History, calibrate_noise, epsilon_spent, make_private

Encoded = list[dict[str, list[int] | int]]


def encode(examples: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    """Token ids per example (unpadded; batches are padded to their own longest row): a classifier's rows
    (columns `text`, `label`) or a causal LM's (client/causal_lm.py)."""
    if examples.num_rows == 0:  # e.g. no local evaluation split; fast tokenizers fail on an empty list
        return []
    if "label" not in examples.column_names:
        return encode_lm(examples, tokenizer, max_length)
    enc = tokenizer(list(examples["text"]), truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "labels": label} for i, label in enumerate(list(examples["label"]))]


def make_loader(data: Encoded, tokenizer: PreTrainedTokenizerBase, batch_size: int, shuffle: bool) -> DataLoader:
    if data and isinstance(data[0]["labels"], list):  # a causal LM's labels are per token: padded, never scored
        collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE, return_tensors="pt")
    else:
        collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=collate)


def takes_position_ids(model: torch.nn.Module) -> bool:
    """Whether the Transformer inside `model` (however wrapped) takes position ids."""
    return "position_ids" in inspect.signature(type(_innermost(model)).forward).parameters


def _innermost(model: torch.nn.Module) -> torch.nn.Module:
    # The Transformer inside Opacus' GradSampleModule (`_module`) and peft's PeftModel (`get_base_model`):
    # their own forward takes **kwargs, which would hide whether the Transformer takes position ids.
    while True:
        if isinstance(getattr(model, "_module", None), torch.nn.Module):
            model = model._module  # Opacus has no public getter that leaves the wrapper working (tests/test_library_contracts.py)
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, position_ids: bool | None = None):
    """Run the model with explicit, contiguous position ids (Opacus' BERT fix for full fine-tuning).

    `position_ids`: whether the model takes them (`takes_position_ids`); a loop over batches asks once and
    passes the answer, else it is worked out here."""
    batch = {k: v.to(device) for k, v in batch.items()}
    if takes_position_ids(model) if position_ids is None else position_ids:
        b, length = batch["input_ids"].shape
        batch["position_ids"] = torch.arange(length, device=device).repeat(b, 1)
    return model(**batch)


def length_grouped(batch: dict[str, torch.Tensor], rows_per_pass: int) -> list[dict[str, torch.Tensor]]:
    """Split a padded batch into passes of at most `rows_per_pass` rows of similar length, each cut to its
    own longest row. Measured (benchmarks/padding.py, MiniLM + LoRA, batch 128 of SST-2 rows, ~13 tokens
    each): passes of 32 compute 42% of the padded tokens and make a DP-SGD round 2.6x faster."""
    rows = batch["labels"].shape[0]
    if rows_per_pass <= 0 or rows <= rows_per_pass:
        return [batch]
    mask = batch["attention_mask"]
    order = torch.argsort(mask.sum(1), stable=True)
    passes = []
    for idx in order.split(rows_per_pass):
        keep = mask[idx].any(0)  # the columns some row of this pass uses (left or right padding alike)
        passes.append({k: v[idx][:, keep] if v.dim() == 2 else v[idx] for k, v in batch.items()})
    return passes


@dataclass(frozen=True)
class RoundPlan:
    """What one round of local DP-SGD costs: Opacus' sample rate and step count for this data."""

    sample_rate: float
    steps: int
    noise_multiplier: float

    def as_history(self) -> History:
        return [(self.noise_multiplier, self.sample_rate, self.steps)]


def plan_round(num_examples: int, cfg: ClientConfig, num_rounds: int) -> RoundPlan:
    """Calibrate noise so that `num_rounds` rounds of local training spend the target epsilon."""
    batches = math.ceil(num_examples / cfg.train.batch_size)
    sample_rate, steps = 1.0 / batches, batches * cfg.train.local_epochs  # as Opacus' DPDataLoader does
    noise = calibrate_noise(
        cfg.privacy.target_epsilon, cfg.privacy.delta, sample_rate, steps * num_rounds, cfg.privacy.accountant
    )
    return RoundPlan(sample_rate=sample_rate, steps=steps, noise_multiplier=noise)


def projected_epsilon(history: History, plan: RoundPlan, cfg: ClientConfig) -> float:
    """Epsilon after one more round with `plan`, composed with everything already spent."""
    return epsilon_spent(history + plan.as_history(), cfg.privacy.delta, cfg.privacy.accountant)


@dataclass(frozen=True)
class RoundOutcome:
    history: History
    mean_loss: float
    steps: int
    tokens: int = 0  # tokens trained on (padding excluded)


def _loss(runner: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, criterion, params, position_ids: bool):
    """The batch loss to call backward() on; None for an empty (Poisson) batch, whose gradients (per-sample
    gradients, under Opacus' hooks) are then set to zero so that the optimizer takes the noise-only step."""
    if criterion is None and batch["labels"].shape[0] == 0:
        # An empty Poisson batch: BERT's and Llama's attention cannot reshape zero rows (transformers 5), so no
        # forward pass; Opacus clips no rows and its step adds the noise the accounting counts.
        for p in params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        return None
    if criterion is None and batch["labels"].dim() == 2:  # a causal LM: each row's mean token loss
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return row_mean_loss(forward(runner, inputs, device, position_ids).logits, batch["labels"].to(device))
    if criterion is None:
        return forward(runner, batch, device, position_ids).loss
    labels = batch["labels"]
    if labels.numel() == 0:
        for p in params:
            p.grad = torch.zeros_like(p)
        return None
    logits = forward(runner, {k: v for k, v in batch.items() if k != "labels"}, device, position_ids).logits
    return criterion(logits, labels.to(device))


def _step(
    runner: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    passes: list[dict[str, torch.Tensor]],
    dp: bool,
    device: torch.device,
    criterion,
    params: list[torch.nn.Parameter],
    max_grad_norm: float,
    position_ids: bool,
    planter: CanaryPlanter | None = None,
) -> tuple[float, int]:
    """One optimizer step on a sampled batch, run as `passes` (one noise draw under DP).

    Returns (summed loss, rows). Under DP the earlier passes go through Opacus' skip-step path (its virtual
    steps): each row is clipped once and the clipped sums carry over to the one noisy step of the batch.
    An audited client's `planter` adds its sampled gradient canaries to the batch (client/canaries.py).
    """
    rows = sum(p["labels"].shape[0] for p in passes)
    canaries = planter.sample() if planter is not None else None
    loss_sum = 0.0
    optimizer.zero_grad(set_to_none=True)
    for i, part in enumerate(passes):
        if dp and i > 0:
            optimizer.zero_grad(set_to_none=True)  # drops the last pass's per-sample gradients, keeps their clipped sum
        loss = _loss(runner, part, device, criterion, params, position_ids)
        # Also for an empty Poisson batch: Opacus then takes the noise-only step the accounting assumes.
        if loss is not None:
            # Opacus scales per-sample gradients itself; without DP, weight each pass's mean by its share
            # of the batch so that the accumulated gradient is the batch mean.
            (loss if dp else loss * part["labels"].shape[0] / max(rows, 1)).backward()
            if n := part["labels"].shape[0]:  # an empty batch's mean loss is NaN
                loss_sum += float(loss.detach()) * n
        if dp:
            if planter is not None and i == len(passes) - 1:
                planter.add_per_sample(canaries)
            optimizer.signal_skip_step(do_skip=i < len(passes) - 1)
            optimizer.step()
    if not dp:  # clip the batch gradient so that the same learning rate is stable without DP
        if planter is not None:
            planter.add_to_mean(canaries, rows)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
    return loss_sum, rows


def clipping_norms(cfg: ClientConfig, head: int, adapters: int) -> float | list[float]:
    """Per-sample clipping: one norm over all trainable weights, or one per tensor (Opacus' per-layer clipping)
    with the head's tensors sharing `head_clip_share` of the norm's square and the adapters' the rest.

    Why: with one clip, the mean-pooled head's per-sample gradient (norm 2.7-4.8 at the start, measured on
    SST-2) dwarfs the LoRA adapters' (0.25-0.51), so clipping leaves the adapters ~10% of the norm while the
    noise covers all 74k weights alike. The norms' L2 norm is still `max_grad_norm`: the same sensitivity,
    the same noise, the same epsilon.
    """
    norm, share = cfg.privacy.max_grad_norm, cfg.privacy.head_clip_share
    if share == 0 or head == 0 or adapters == 0 or not cfg.model.lora:  # ghost clipping (full fine-tuning) is flat only
        return norm
    return [norm * math.sqrt(share / head)] * head + [norm * math.sqrt((1 - share) / adapters)] * adapters


def tensor_clip_norms(cfg: ClientConfig, names: list[str]) -> dict[str, float] | None:
    """Each trainable tensor's own clipping norm, head first then the rest (the optimizer's parameter order),
    or None when one flat norm clips them all (`clipping_norms`)."""
    head = [n for n in names if is_head_parameter(n)]
    rest = [n for n in names if not is_head_parameter(n)]
    norms = clipping_norms(cfg, len(head) if head and rest else 0, len(rest) or len(head))
    return None if isinstance(norms, float) else dict(zip(head + rest, norms, strict=True))


def round_lr_scale(schedule: str, server_round: int, num_rounds: int) -> float:
    """The factor on both learning rates in round `server_round` (1-based) of `num_rounds`."""
    if schedule == "cosine":
        # A function of the round counter alone, so a resumed run continues the schedule where it stopped.
        return 0.5 * (1.0 + math.cos(math.pi * (server_round - 1) / num_rounds))
    return 1.0


def train_round(
    model: torch.nn.Module,
    data: Encoded,
    tokenizer: PreTrainedTokenizerBase,
    cfg: ClientConfig,
    *,
    plan: RoundPlan | None,
    history: History,
    proximal_mu: float = 0.0,
    lr_scale: float = 1.0,
    seed: int = 0,
    canaries: GradientCanaries | None = None,
) -> RoundOutcome:
    """Train `model` in place for the configured local epochs; DP-SGD when `plan` is given.

    `lr_scale` multiplies both learning rates (the round's place in the run's schedule, `round_lr_scale`);
    `canaries` are an audit's gradient canaries, planted in every step's batch (simulations/audit.py).
    """
    torch.manual_seed(seed)
    device = cfg.train.torch_device()
    model.to(device).train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    anchor_of = {id(p): p.detach().clone() for p in params}  # the global weights, for FedProx
    groups = [
        {"params": [p for n, p in named if is_head_parameter(n)], "lr": cfg.train.head_learning_rate * lr_scale},
        {"params": [p for n, p in named if not is_head_parameter(n)], "lr": cfg.train.learning_rate * lr_scale},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.train.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    else:
        optimizer = torch.optim.SGD(groups, momentum=0.9)
    loader = make_loader(data, tokenizer, cfg.train.batch_size, shuffle=True)
    runner, engine, criterion = model, None, None
    norms = tensor_clip_norms(cfg, [n for n, _ in named])  # in the optimizer's order: the head's group first
    if plan is not None:
        runner, optimizer, loader, engine, criterion = make_private(
            model,
            optimizer,
            loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=cfg.privacy.max_grad_norm if norms is None else list(norms.values()),
            history=history,
            # Measured (benchmarks/p1_dp_overhead.py, MiniLM): for LoRA, Opacus' hooks cost 1.01x a
            # non-DP step and ghost clipping 1.4x; for full fine-tuning hooks cost 3.2x and 5.8 GB, ghost
            # clipping 1.8x and 1.8 GB (it never materialises per-sample gradients of the embeddings).
            grad_sample_mode="hooks" if cfg.model.lora else "ghost",
        )
    planter = None
    if canaries is not None:
        if criterion is not None:
            raise ValueError("gradient canaries need per-sample gradients (LoRA); full fine-tuning uses ghost clipping")
        rate = plan.sample_rate if plan is not None else 1.0 / max(len(loader), 1)
        planter = CanaryPlanter(canaries, named, rate, seed, None if plan is not None else cfg.privacy.max_grad_norm)
    # Ghost clipping runs its own two backward passes per loss, so it takes a batch in one pass.
    rows_per_pass = cfg.train.physical_batch_size if criterion is None else 0
    position_ids = takes_position_ids(model)  # once per round, not once per batch
    total_loss, seen, steps, tokens = 0.0, 0, 0, 0
    with warnings.catch_warnings():
        # Expected with frozen embeddings (LoRA): PyTorch notes that no hooked input requires grad.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        dp = plan is not None
        for _ in range(cfg.train.local_epochs):
            for batch in loader:
                passes = length_grouped(batch, rows_per_pass)
                loss_sum, rows = _step(
                    runner, optimizer, passes, dp, device, criterion, params, cfg.privacy.max_grad_norm, position_ids, planter
                )
                total_loss, seen, steps = total_loss + loss_sum, seen + rows, steps + 1
                tokens += int(batch["attention_mask"].sum())
                if proximal_mu > 0:
                    # FedProx as a decoupled proximal step: a gradient term in the loss would be
                    # invisible to Opacus' per-sample gradients, and this step only uses public weights.
                    with torch.no_grad():
                        for group in optimizer.param_groups:
                            for p in group["params"]:
                                p.sub_(group["lr"] * proximal_mu * (p - anchor_of[id(p)]))
    if engine is not None:
        runner.cleanup()  # drop Opacus' hooks and per-sample attributes so the same model trains again next round
    new_history = list(engine.accountant.history) if engine is not None else list(history)
    return RoundOutcome(history=new_history, mean_loss=total_loss / max(seen, 1), steps=steps, tokens=tokens)
