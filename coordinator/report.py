"""Record a run as it goes: per-round progress, then results.json, plots and a summary table."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedtune.client import wire
from fedtune.privacy.at_rest import write_atomic


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically and owner-only: a crash leaves the old file or the new one, never half of one."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _record(metrics: Any) -> dict[str, Any]:
    return {k: _plain(v) for k, v in dict(metrics or {}).items()}


def _shown(value: float | None, spec: str) -> str:
    """A recorded number as the summary shows it; "-" where none was recorded (or it was not finite)."""
    return "-" if value is None else format(value, spec)


def score_key(metrics: dict[str, Any]) -> str | None:
    """The headline score of an evaluation: a classifier's accuracy or a causal LM's perplexity."""
    return next((k for k in (wire.ACCURACY, wire.PERPLEXITY) if metrics.get(k) is not None), None)


REJECTED = {"train": "rejected", "evaluate": "rejected_evaluate"}  # phase -> a round's entry of rejected replies


class RunRecorder:
    """Collects what the coordinator learns each round and writes the run folder at the end."""

    def __init__(
        self,
        out_dir: Path,
        num_rounds: int,
        header: dict[str, Any],
        console: Console | None = None,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.header = header
        self.console = console or Console(stderr=True)
        state = state or {}  # a checkpoint's record: the rounds before a resume
        self.rounds: dict[int, dict[str, Any]] = {int(r): e for r, e in state.get("rounds", {}).items()}
        self.names: dict[int, str] = {int(n): c for n, c in state.get("names", {}).items()}  # node id -> client id
        self.started = time.time() - float(state.get("elapsed", 0.0))
        self._last = time.time()
        self.progress = Progress(
            TextColumn("[bold]federated rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        done = sum(1 for r in self.rounds if r > 0)
        self._task = self.progress.add_task("rounds", total=num_rounds, completed=done)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the record, to continue it after a resume."""
        return {
            "rounds": {str(r): e for r, e in self.rounds.items()},
            "names": {str(n): c for n, c in self.names.items()},
            "elapsed": time.time() - self.started,
        }

    def __enter__(self) -> RunRecorder:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _round(self, server_round: int) -> dict[str, Any]:
        return self.rounds.setdefault(server_round, {"round": server_round, "clients": {}})

    def client_reports(self, server_round: int, reports: dict[int, dict[str, float]]) -> None:
        """Sink for the strategy: every replying client's train metrics, privacy included."""
        clients = self._round(server_round)["clients"]  # merged: a retried round adds to what came before
        clients |= {str(cid): _record(r) for cid, r in sorted(reports.items())}
        self._round(server_round)["clients"] = dict(sorted(clients.items(), key=lambda kv: int(kv[0])))

    def name_clients(self, client_ids: dict[int, int]) -> None:
        """Node id -> client id, as the coordinator knows it (never from what a reply says)."""
        self.names |= {node: str(cid) for node, cid in client_ids.items()}

    def _name(self, node: int) -> str:
        return self.names.get(node, str(wire.node_client_id(node)))

    def phase(self, server_round: int, name: str, outcome: Any) -> None:
        """Hook of the round loop: who missed a phase's deadline, whose reply was an error."""
        if not outcome.stragglers and not outcome.failures:
            return
        # Kept by node id, named when results are written (a resumed run's names join the record later).
        entry = self._round(server_round).setdefault("dropped", {}).setdefault(name, {"stragglers": [], "failures": {}})
        entry["stragglers"] += outcome.stragglers
        entry["failures"] |= {str(n): why for n, why in outcome.failures.items()}
        for node in outcome.stragglers:
            self.console.print(f"[yellow]round {server_round} {name}: no reply from {self._name(node)} by the deadline[/]")
        for node, why in outcome.failures.items():
            self.console.print(f"[yellow]round {server_round} {name}: {self._name(node)} failed: {escape(why)}[/]")

    def train_metrics(self, server_round: int, metrics: Any) -> None:
        if metrics is not None:
            self._round(server_round)["train"] = _record(metrics)

    def evaluate_metrics(self, server_round: int, metrics: Any) -> None:
        if metrics is not None:
            self._round(server_round)["federated_evaluation"] = _record(metrics)

    def faults(self) -> list[dict[str, Any]]:
        """Every straggler, failed reply and rejected reply of the run, one row each, by client id."""
        rows = []
        for r in sorted(self.rounds):
            entry = self.rounds[r]
            for phase, d in entry.get("dropped", {}).items():
                rows += [
                    {"round": r, "phase": phase, "client": self._name(n), "fault": "no reply by the deadline"}
                    for n in d["stragglers"]
                ]
                rows += [
                    {"round": r, "phase": phase, "client": self._name(int(n)), "fault": f"error: {why}"}
                    for n, why in d["failures"].items()
                ]
            for phase, key in REJECTED.items():
                rows += [{"round": r, "phase": phase, "client": c, "fault": why} for c, why in entry.get(key, {}).items()]
        return rows

    def rejection(self, server_round: int, phase: str, client: int, reason: str) -> None:
        """Sink for the strategy: a reply kept out of aggregation, and why."""
        self._round(server_round).setdefault(REJECTED[phase], {})[str(client)] = reason
        self.console.print(f"[yellow]round {server_round} {phase}: client {client}: {escape(reason)}[/]")

    def global_evaluation(self, server_round: int, metrics: dict[str, Any]) -> None:
        """Called after each round (and once before the first) with the central evaluation."""
        entry = self._round(server_round)
        entry["global"] = _record(metrics)
        now = time.time()
        entry["seconds"] = round(now - self._last, 3)
        self._last = now
        if server_round == 0:
            return
        reports = {cid: wire.TrainReply.from_metrics(c) for cid, c in entry["clients"].items()}
        eps = [r.privacy.epsilon for r in reports.values() if r.privacy is not None]
        declined = [cid for cid, r in reports.items() if r.declined]
        parts = [f"round {server_round}"]
        if score := score_key(metrics):
            parts.append(f"{score} {metrics[score]:.4f}  loss {metrics[wire.LOSS]:.4f}")
        if eps:
            parts.append(f"epsilon max {max(eps):.3f}")
        if declined:
            parts.append(f"declined: clients {', '.join(declined)}")
        parts.append(f"{entry['seconds']:.1f}s")
        self.progress.console.log(" | ".join(parts))
        self.progress.advance(self._task)

    def clients_summary(self) -> dict[str, dict[str, Any]]:
        """Each client's latest privacy report, rounds trained and rounds declined."""
        out: dict[str, dict[str, Any]] = {}
        for r in sorted(self.rounds):
            for cid, recorded in self.rounds[r]["clients"].items():
                reply = wire.TrainReply.from_metrics(recorded)  # accepted when it came, so it decodes
                c = out.setdefault(cid, {"rounds_trained": [], "rounds_declined": []})
                (c["rounds_declined"] if reply.declined else c["rounds_trained"]).append(r)
                if reply.privacy is not None:
                    c |= privacy_summary(reply.privacy)
        return dict(sorted(out.items(), key=lambda kv: int(kv[0])))

    def finish(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Write results.json and the plots; print the summary; return the results."""
        faults = self.faults()
        rounds = [self.rounds[r] for r in sorted(self.rounds)]
        for entry in rounds:  # node ids -> client ids, now that every client that ever answered is known
            for d in entry.get("dropped", {}).values():
                d["stragglers"] = [self._name(int(n)) for n in d["stragglers"]]
                d["failures"] = {self._name(int(n)): why for n, why in d["failures"].items()}
        final = rounds[-1].get("global", {}) if rounds else {}
        if not final and rounds:  # no central held-out split (deployment): the clients' pooled evaluation
            final = rounds[-1].get("federated_evaluation", {})
        results = {
            **self.header,
            "rounds": rounds,
            "clients": self.clients_summary(),
            "faults": faults,
            "final": final,
            "wall_seconds": round(time.time() - self.started, 2),
            **extra,
        }
        write_json(self.out_dir / "results.json", results)
        write_json(self.out_dir / "privacy.json", privacy_report(results))
        plot_metrics(rounds, self.out_dir / "plots" / "metrics.png")
        plot_epsilon(rounds, self.out_dir / "plots" / "epsilon.png")
        self.print_summary(results)
        return results

    def print_summary(self, results: dict[str, Any]) -> None:
        table = Table(title="global model, held-out split")
        central = any(score_key(r.get("global", {})) for r in results["rounds"])
        if not central:
            table.title = "global model, clients' pooled local evaluation"
        evaluations = [
            (r["round"], r.get("global", {}) if central else r.get("federated_evaluation", {})) for r in results["rounds"]
        ]
        generative = any(score_key(g) == wire.PERPLEXITY for _, g in evaluations)
        for col in ("round", "perplexity", "loss (per token)") if generative else ("round", "accuracy", "macro-F1", "loss"):
            table.add_column(col, justify="right")
        for r, g in evaluations:
            if generative and wire.PERPLEXITY in g:
                table.add_row(str(r), _shown(g[wire.PERPLEXITY], ".3f"), _shown(g.get(wire.LOSS), ".4f"))
            elif wire.ACCURACY in g:
                table.add_row(str(r), *(_shown(g.get(k), ".4f") for k in (wire.ACCURACY, wire.MACRO_F1, wire.LOSS)))
        clients = Table(title="clients: privacy spent (sample-level DP-SGD; details in privacy.json)")
        clients.add_column("client", justify="right", no_wrap=True)
        for col in ("epsilon", "delta", "budget", "acct", "z", "C", "rounds", "declined"):
            clients.add_column(col, justify="right")
        for cid, c in results["clients"].items():
            eps = c.get("epsilon")
            clients.add_row(
                cid,
                f"{eps:.3f}" if eps is not None else "no DP",
                f"{c['delta']:g}" if "delta" in c else "-",
                f"{c['budget_epsilon']:g}" if "budget_epsilon" in c else "-",
                c.get("accountant", "-"),
                f"{c['noise_multiplier']:.3f}" if "noise_multiplier" in c else "-",
                f"{c['max_grad_norm']:g}" if "max_grad_norm" in c else "-",
                str(len(c["rounds_trained"])),
                ", ".join(map(str, c["rounds_declined"])) or "-",
            )
        self.console.print(table)
        for sample in results.get("samples", []):
            self.console.print(
                f"[bold]sample[/] {escape(sample['prompt'])!r} -> {escape(sample['completion'])!r}", highlight=False
            )
        self.console.print(clients)
        if results["faults"]:
            faults = Table(title="faults: kept out of aggregation")
            for col in ("round", "phase", "client", "what happened"):
                faults.add_column(col, overflow="fold")
            for f in results["faults"]:
                faults.add_row(str(f["round"]), f["phase"], f["client"], escape(f["fault"]))
            self.console.print(faults)
        central = results.get("central_dp")
        if central:
            self.console.print(
                f"client-level (central) DP: epsilon {central['epsilon']:.3f} at delta {central['delta']:g} after "
                f"{central['releases']} noisy aggregates (noise multiplier {central['noise_multiplier']}, clipping norm "
                f"{central['clipping_norm']}, noise std {central['noise_std']:.4g}; {central['accountant']})"
            )


def privacy_summary(report: wire.PrivacyReport) -> dict[str, Any]:
    """A client's privacy report as results.json's `clients` table shows it."""
    return {
        "epsilon": report.epsilon,
        "delta": report.delta,
        "budget_epsilon": report.budget_epsilon,
        "accountant": report.accountant,
        "noise_multiplier": report.noise_multiplier,
        "sample_rate": report.sample_rate,
        "steps": report.steps,
        "max_grad_norm": report.max_grad_norm,
        "history": [list(h) for h in report.history],
        "composed_across_runs": report.ledger,
    }


def privacy_report(results: dict[str, Any]) -> dict[str, Any]:
    """Every privacy number of the run with what is needed to recompute it (privacy.json)."""
    clients = {}
    for cid, c in results["clients"].items():
        clients[cid] = {
            "dp": "epsilon" in c,
            "epsilon": c.get("epsilon"),
            "delta": c.get("delta"),
            "accountant": c.get("accountant"),
            "budget_epsilon": c.get("budget_epsilon"),
            "noise_multiplier": c.get("noise_multiplier"),
            "sample_rate": c.get("sample_rate"),
            "steps": c.get("steps"),
            "max_grad_norm": c.get("max_grad_norm"),
            "history": c.get("history", []),  # [noise multiplier, sample rate, steps] in Opacus' accountant format
            "composed_across_runs": bool(c.get("composed_across_runs")),
            "rounds_trained": c["rounds_trained"],
            "rounds_declined": c["rounds_declined"],
        }
    return {
        "sample_level": {"unit": "example", "mechanism": "DP-SGD (Opacus, Poisson sampling)", "clients": clients},
        "client_level": results.get("central_dp"),
        "declined": {cid: c["rounds_declined"] for cid, c in clients.items() if c["rounds_declined"]},
    }


def plot_metrics(rounds: list[dict[str, Any]], path: Path) -> None:
    """Accuracy (a causal LM: perplexity) and loss of the global model per round (central and federated evaluation)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    score = next(
        (k for r in rounds for e in (r.get("global", {}), r.get("federated_evaluation", {})) if (k := score_key(e))),
        wire.ACCURACY,
    )
    for key, label in (("global", "held-out (central)"), ("federated_evaluation", "clients' local splits")):
        pts = [(r["round"], r[key]) for r in rounds if r.get(key, {}).get(score) is not None]
        if pts:
            ax_acc.plot([p[0] for p in pts], [p[1][score] for p in pts], marker="o", label=label)
            ax_loss.plot([p[0] for p in pts], [p[1][wire.LOSS] for p in pts], marker="o", label=label)
    for ax, name in ((ax_acc, score), (ax_loss, "loss")):
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_acc.set_title(f"global model {score}")
    ax_loss.set_title("global model loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_epsilon(rounds: list[dict[str, Any]], path: Path) -> None:
    """Each client's cumulative epsilon per round; declined rounds marked with an x."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    series: dict[str, list[tuple[int, float, bool]]] = {}
    for r in rounds:
        for cid, recorded in r["clients"].items():
            reply = wire.TrainReply.from_metrics(recorded)
            if reply.privacy is not None:
                series.setdefault(cid, []).append((r["round"], reply.privacy.epsilon, reply.declined))
    for cid, pts in sorted(series.items(), key=lambda kv: int(kv[0])):
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=f"client {cid}")
        bad = [p for p in pts if p[2]]
        if bad:
            ax.scatter([p[0] for p in bad], [p[1] for p in bad], marker="x", s=60, color=line.get_color())
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent (cumulative)")
    ax.set_title("privacy spent per client (x = declined)" if series else "no client trained with DP")
    ax.grid(alpha=0.3)
    if series and len(series) <= 20:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
