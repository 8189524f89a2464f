"""`fedtune-simulate --audit N`: plant canaries in one client's data, score them as the coordinator and as anyone
holding the final model would, and bound that client's epsilon from below (privacy/audit.py)."""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from rich.console import Console
from transformers import PreTrainedTokenizerBase

from fedtune.client.canaries import GradientCanaries
from fedtune.client.config import ClientConfig
from fedtune.client.evaluate import row_losses
from fedtune.client.model import build_model, is_head_parameter, load_tokenizer, load_trainable_state, trainable_state
from fedtune.client.train import encode, tensor_clip_norms
from fedtune.coordinator.report import write_json
from fedtune.privacy.audit import CONFIDENCE, GUESS_SHARES, exposure, one_run_audit
from fedtune.simulations.config import SimulationConfigError
from fedtune.simulations.datasets import PartitionData

AUDITED_CLIENT = 0  # whose data holds the canaries: partition 0 exists in every simulation
INPUT_COINS, GRADIENT_COINS = 3, 4  # their random streams' tags (client/canaries.py draws 1 and 2)
AUDIT_FILE = "audit.json"
SECRET_DIGITS = 6  # a causal LM's canary secret: 10^6 candidates, as The Secret Sharer's "my SSN is ..." format
METHOD = (
    "one-run audit (Steinke, Nasr and Jagielski, NeurIPS 2023): each canary included with probability 1/2, "
    f"top-scored guessed IN and bottom-scored OUT (k each, k the best of {len(GUESS_SHARES)} shares of the canaries "
    f"{', '.join(f'{s:g}' for s in GUESS_SHARES)}, Bonferroni-corrected), lower bound at {CONFIDENCE:.0%} confidence"
)
GRADIENT_KIND = (
    "Dirac gradient canaries (client/canaries.py): one coordinate in each trainable tensor of at least half as many "
    "weights as canaries (shared by two canaries where the tensor has fewer)"
)
VIEWS = {
    "coordinator": {
        "threat_model": "the coordinator (or anyone on the wire past TLS), white-box: sees each of the audited "
        "client's updates, round by round, and the global model it was trained from; what local DP-SGD protects",
        "canaries": "gradient",
        "score": "how far each update moved the weights against the canary's gradient (its coordinates, weighed by "
        "their clipping norms per unit learning rate), summed over the client's rounds",
    },
    "final_model": {
        "threat_model": "anyone holding the final global weights, white-box (the initial ones are public)",
        "canaries": "gradient",
        "score": "how far the weights moved against the canary's gradient from the initial to the final global model",
    },
    "final_model_black_box": {
        "threat_model": "anyone who can query the final model for a row's loss, black-box",
        "canaries": "input",
        "score": "the canary row's loss under the initial global model minus under the final one "
        "(a classifier's: centred per label)",
    },
}


@dataclass(frozen=True)
class Canaries:
    """The planted rows (in the data's columns) and which of them the audited client holds."""

    rows: datasets.Dataset
    included: np.ndarray  # bool per canary: the coin flip that put it in the client's data
    kind: str

    @property
    def planted(self) -> datasets.Dataset:
        return self.rows.select(np.flatnonzero(self.included).tolist())


def _pseudo_words(rng: np.random.Generator, count: int, length: int = 6) -> str:
    return " ".join("".join(rng.choice(list(string.ascii_lowercase), length)) for _ in range(count))


def make_canaries(count: int, pool: datasets.Dataset, labels: tuple[str, ...], seed: int) -> Canaries:
    """`count` canaries in the pool's columns, each included with probability 1/2 (seeded).

    A classifier's canary is 4 random 6-letter pseudo-words with a random label: out of distribution and
    mislabelled half the time, so only training on it moves its loss (Jagielski et al. 2020; Nasr et al. 2021
    use such input-space canaries). A causal LM's is "my secret code is" and 6 random digits (Carlini et al.
    2019), as a text or as the response to "what is my secret code?".
    """
    rng = np.random.default_rng([seed, INPUT_COINS])
    columns = pool.column_names
    if labels:
        rows = {"text": [_pseudo_words(rng, 4) for _ in range(count)], "label": rng.integers(len(labels), size=count).tolist()}
        kind = "4 random 6-letter pseudo-words with a random label"
    else:
        secrets = [" ".join(rng.choice(list(string.digits), SECRET_DIGITS)) for _ in range(count)]
        kind = f"'my secret code is' and {SECRET_DIGITS} random digits"
        if "prompt" in columns:
            rows = {"prompt": ["what is my secret code?"] * count, "response": [f"my secret code is {s}" for s in secrets]}
        else:
            rows = {"text": [f"my secret code is {s}" for s in secrets]}
    table = datasets.Dataset.from_dict(rows, features=pool.select_columns(list(rows)).features)
    return Canaries(table, rng.random(count) < 0.5, kind)


@dataclass(frozen=True)
class PlantedData:
    """A simulated client's data (the DataFn), with the included canaries added to one client's partition.
    Equal and hashing the same by value, as the client's tokenised-data cache expects of a DataFn."""

    inner: PartitionData
    client: int
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]  # the planted canaries' values, in `columns` order

    def __call__(self, node_config: dict) -> datasets.Dataset:
        data = self.inner(node_config)
        if int(node_config["partition-id"]) != self.client or not self.rows:
            return data
        values = {c: [row[i] for row in self.rows] for i, c in enumerate(self.columns)}
        planted = datasets.Dataset.from_dict(values, features=data.select_columns(list(self.columns)).features)
        return datasets.concatenate_datasets([data, planted])


class CanaryAudit:
    """Plants both kinds of canaries in the audited client's data and scores them as the run goes: the gradient
    canaries on each of its updates (the coordinator's view) and in the final global model, the input canaries
    by their loss under the initial and the final global model (what a black-box user of the model can do)."""

    def __init__(self, count: int, pool: datasets.Dataset, cfg: ClientConfig, seed: int, device: torch.device):
        self.cfg = cfg
        coins = np.random.default_rng([seed, GRADIENT_COINS]).random(count) < 0.5
        self.gradient = GradientCanaries(seed=seed, included=tuple(bool(c) for c in coins))
        self.model = build_model(cfg.model, cfg.labels)  # the auditor's copy, for scoring the input canaries
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.coordinates = self.gradient.coordinates({n: p.numel() for n, p in named})
        if not self.coordinates:  # refused before any input canary is made and tokenised
            largest = max(p.numel() for _, p in named)
            raise SimulationConfigError(
                f"--audit {count}: no trainable tensor has room for the gradient canaries (the largest holds "
                f"{largest} weights; at most {2 * largest} canaries)"
            )
        self.inputs = make_canaries(count, pool, cfg.labels, seed)
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(cfg.model.name)
        self.encoded = encode(self.inputs.rows, self.tokenizer, cfg.model.max_length)
        self.device = device
        # Without DP nothing clips per row: a canary is spread evenly (client/canaries.py), as under one flat norm.
        norms = tensor_clip_norms(cfg, [n for n, _ in named]) if cfg.privacy.enabled else None
        # The share of the clipping norm's square a canary fills: all of it under one flat norm; under per-tensor
        # norms, the squares of the tensors it has a coordinate in.
        share = 1.0 if norms is None else sum(norms[n] ** 2 for n in self.coordinates) / cfg.privacy.max_grad_norm**2
        self.clip_share = share
        norms = norms or {}
        # What clipping lets a canary move each tensor's coordinate by, per unit of noise or drift there: the
        # tensor's own clipping norm (all alike under one flat norm) times its learning rate.
        self.signal = {
            n: norms.get(n, 1.0) * (cfg.train.head_learning_rate if is_head_parameter(n) else cfg.train.learning_rate)
            for n in self.coordinates
        }
        self.coordinator_scores = np.zeros(count)
        self.updates_seen = 0
        self.first: dict[str, np.ndarray] | None = None  # the initial global model (round 0)
        self.last: dict[str, np.ndarray] | None = None  # the latest global model

    def data_fn(self, inner: PartitionData) -> PlantedData:
        """The clients' data with the included input canaries in the audited client's."""
        planted = self.inputs.planted
        columns = tuple(planted.column_names)
        return PlantedData(inner, AUDITED_CLIENT, columns, tuple(zip(*(planted[c] for c in columns), strict=True)))

    def _descent(self, before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> np.ndarray:
        """How far the weights moved against each gradient canary: a matched filter over its coordinates, each
        tensor's move weighed by the canary's signal there over the tensor's own spread of moves (robust: the
        median absolute deviation, which the canaries' few coordinates barely shift)."""
        total = np.zeros(len(self.gradient.included))
        for name, signal in self.signal.items():
            moved = (before[name] - after[name]).ravel().astype(np.float64)
            spread = 1.4826 * np.median(np.abs(moved - np.median(moved))) + 1e-12
            total += signal * moved[self.coordinates[name]] / spread**2
        return total

    def observe(self, server_round: int, client: int, sent: dict[str, np.ndarray], returned: dict[str, np.ndarray]) -> None:
        """The coordinator's view: each update of the audited client, against the global model it was sent."""
        if client == AUDITED_CLIENT:
            self.coordinator_scores += self._descent(sent, returned)
            self.updates_seen += 1

    def global_model(self, model: torch.nn.Module) -> None:
        """Every global model the coordinator evaluates, the initial one first: the final model's view."""
        state = {n: t.numpy().copy() for n, t in trainable_state(model).items()}
        self.first = self.first if self.first is not None else state
        self.last = state

    def _losses(self, state: dict[str, np.ndarray]) -> np.ndarray:
        load_trainable_state(self.model, {n: torch.from_numpy(w) for n, w in state.items()})
        return row_losses(self.model, self.encoded, self.tokenizer, 64, self.device)

    def _centred(self, scores: np.ndarray) -> np.ndarray:
        # A classifier's canaries move with their label as the head learns the data's balance, IN or OUT alike:
        # centring each label's scores on its median removes that shared drift and keeps what training on the
        # canary itself did. Labels were drawn independently of inclusion, so this is fair post-processing.
        if not self.cfg.labels:
            return scores
        labels = np.asarray(self.inputs.rows["label"])
        out = scores.copy()
        for label in np.unique(labels):
            out[labels == label] -= np.median(scores[labels == label])
        return out

    def report(self, results: dict[str, Any], dp: bool, delta: float) -> dict[str, Any]:
        """audit.json's content: the canaries, each view's guesses and bound, and the accountant's claim."""
        client = results.get("clients", {}).get(str(AUDITED_CLIENT), {})
        if not dp:
            note = "DP is off: no epsilon is claimed (infinite)"
        elif not client.get("rounds_trained"):
            declined = client.get("rounds_declined", [])
            note = (
                f"client {AUDITED_CLIENT} trained in no round"
                + (f" (declined {declined})" if declined else "")
                + ": nothing to audit"
            )
        else:
            note = "the audited client's epsilon for this run, as its accountant reports it"
        claimed = {
            "epsilon": client.get("epsilon") if dp and client.get("rounds_trained") else None,
            "delta": delta if dp else None,
            "accountant": client.get("accountant") if dp else None,
            "note": note,
        }
        gradient_in = np.asarray(self.gradient.included)
        scored: dict[str, tuple[np.ndarray, np.ndarray]] = {"coordinator": (self.coordinator_scores, gradient_in)}
        if self.first is not None and self.last is not None:
            scored["final_model"] = (self._descent(self.first, self.last), gradient_in)
            final_losses = self._losses(self.last)
            scored["final_model_black_box"] = (self._centred(self._losses(self.first) - final_losses), self.inputs.included)
        views: dict[str, Any] = {}
        # Every view tests five guess counts: all of them corrected together, so that the bounds hold at once.
        each = 1.0 - (1.0 - CONFIDENCE) / len(scored)
        for name, (scores, included) in scored.items():
            audit = one_run_audit(scores, included, delta, each)
            views[name] = VIEWS[name] | {
                "guessed_in": audit.guessed_in,
                "guessed_out": audit.guessed_out,
                "guesses": audit.guesses,
                "correct": audit.correct,
                "accuracy": audit.correct / audit.guesses,
                "epsilon_lower_bound": audit.epsilon_lower_bound,
            }
        views["coordinator"]["updates_seen"] = self.updates_seen
        out: dict[str, Any] = {
            "method": METHOD,
            "confidence": CONFIDENCE,
            "confidence_note": f"all {len(scored)} views' bounds hold at once: each view is tested at {each:.4f}, "
            f"its {len(GUESS_SHARES)} guess counts at {1 - (1 - each) / len(GUESS_SHARES):.4f}",
            "audited_client": AUDITED_CLIENT,
            "canaries": {
                "gradient": {
                    "count": len(gradient_in),
                    "included": int(gradient_in.sum()),
                    "kind": GRADIENT_KIND,
                    "tensors": len(self.coordinates),
                    "clip_share": self.clip_share,
                },
                "input": {
                    "count": len(self.inputs.included),
                    "included": int(self.inputs.included.sum()),
                    "kind": self.inputs.kind,
                },
            },
            "claimed": claimed,
            "views": views,
            "per_canary": {
                name: {"included": inc.astype(int).tolist(), "score": [round(float(v), 6) for v in sc]}
                for name, (sc, inc) in scored.items()
            },
        }
        if not self.cfg.labels and self.last is not None:
            included = self.inputs.included
            final = -final_losses  # the final model's log-likelihood per token: higher is more exposed
            bits = exposure(final[included], final[~included])
            out["exposure"] = {
                "method": "Carlini et al., The Secret Sharer (USENIX Security 2019): log2(candidates) - log2(rank) "
                "of each planted secret among itself and the secrets never planted, by the final model's loss",
                "candidates": int((~included).sum()) + 1,
                "max_bits": float(np.log2((~included).sum() + 1)),
                "unexposed_mean_bits": chance_exposure(int((~included).sum()) + 1),
                "mean_bits": float(bits.mean()) if len(bits) else None,
                "max_observed_bits": float(bits.max()) if len(bits) else None,
            }
        return out


def chance_exposure(candidates: int) -> float:
    """A secret's mean exposure when its rank among `candidates` is uniform (never trained on): log2(n) - log2(n!)/n."""
    return float(np.log2(candidates) - math.lgamma(candidates + 1) / (candidates * math.log(2)))


def write_audit(out_dir: Path, audit: dict[str, Any]) -> Path:
    path = out_dir / AUDIT_FILE
    write_json(path, audit)
    return path


def print_audit(audit: dict[str, Any], console: Console) -> None:
    claimed = audit["claimed"]
    claim = (
        f"accountant epsilon {claimed['epsilon']:.3f} (delta {claimed['delta']:g}, {claimed['accountant']})"
        if claimed["epsilon"] is not None
        else claimed["note"]
    )
    console.print(
        f"audit of client {audit['audited_client']} ({claim}); bounds hold together at {audit['confidence']:.0%}; "
        f"details in {AUDIT_FILE}:"
    )
    for name, view in audit["views"].items():
        over = claimed["epsilon"] is not None and view["epsilon_lower_bound"] > claimed["epsilon"]
        console.print(
            f"  {name.replace('_', ' ')}: {view['correct']} of {view['guesses']} guesses right -> epsilon >= "
            f"{view['epsilon_lower_bound']:.3f}" + (" [bold red]EXCEEDS THE CLAIM: the privacy claim is false[/]" if over else "")
        )
    if "exposure" in audit and audit["exposure"]["mean_bits"] is not None:
        e = audit["exposure"]
        console.print(
            f"  exposure of planted secrets: mean {e['mean_bits']:.2f} bits, max {e['max_observed_bits']:.2f} "
            f"(unexposed ~{e['unexposed_mean_bits']:.2f}, at most {e['max_bits']:.2f})"
        )
