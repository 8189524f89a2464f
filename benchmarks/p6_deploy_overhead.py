"""P6: the fixed cost a deployed round adds per client: round wall time minus that client's own training seconds.

Real processes on 127.0.0.1 as the README starts them (a TLS coordinator with node authentication, N data holders),
the bundled MiniLM with LoRA under DP-SGD. `--code DIR` runs the coordinator and clients from another checkout
(e.g. a `git worktree` of an older commit) to measure before/after on the same machine.

    python -m fedtune.benchmarks.p6_deploy_overhead                               # 3 clients x 4 rounds, MiniLM
    python -m fedtune.benchmarks.p6_deploy_overhead --code /tmp/old --label before
    python -m fedtune.benchmarks.p6_deploy_overhead --smoke --model DIR           # tiny model, 2 clients x 2 rounds
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedtune.benchmarks.record import RESULTS, write

BIN = Path(sys.executable).parent
POSITIVE = ["good", "great", "lovely", "happy", "excellent", "nice", "wonderful", "superb"]
NEGATIVE = ["bad", "awful", "sad", "terrible", "horrible", "nasty", "poor", "dreadful"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(n: int, offset: int) -> list[tuple[str, str]]:
    return [(f"a {(POSITIVE if i % 2 else NEGATIVE)[i % 8]} day, number {i}", "positive" if i % 2 else "negative")
            for i in range(offset, offset + n)]  # fmt: skip


def _cli(env: dict[str, str], *args: str) -> None:
    done = subprocess.run([str(BIN / args[0]), *args[1:]], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed: {done.stderr.strip()[-500:]}")


def federate(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """Run one deployed federation and return its results.json."""
    env = os.environ | ({"PYTHONPATH": str(args.code.resolve())} if args.code else {})
    port = _free_port()
    coord = base / "coord"
    _cli(env, "fedtune-coordinator", "init", "--out", str(coord), "--labels", "negative,positive", "--listen", "127.0.0.1",
         "--port", str(port))  # fmt: skip
    toml = coord / "coordinator.toml"
    text = toml.read_text()
    settings = {"model": json.dumps(args.model), "num_rounds": args.rounds, "min_clients": args.clients, "batch_size": 16,
                "max_length": 32, "join_timeout": 900.0, "round_timeout": 900.0}  # fmt: skip
    lines = [ln for ln in text.splitlines() if ln.split("=")[0].strip() not in settings]
    toml.write_text("\n".join(lines + [f"{k} = {v}" for k, v in settings.items()]) + "\n")
    for i in range(args.clients):
        _cli(env, "fedtune-client", "keygen", "--out", str(base / f"node{i}"))
        _cli(env, "fedtune-coordinator", "register", str(base / f"node{i}" / "node.pub"), "--config", str(toml))
    procs = [subprocess.Popen([str(BIN / "fedtune-coordinator"), "start", "--config", str(toml)], env=env,
                              stdout=(base / "coordinator.log").open("w"), stderr=subprocess.STDOUT)]  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while "waiting for" not in (base / "coordinator.log").read_text():
            if procs[0].poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the coordinator did not start: " + (base / "coordinator.log").read_text()[-2000:])
            time.sleep(0.5)
        for i in range(args.clients):
            data = base / f"data{i}.csv"
            with data.open("w", newline="") as f:
                csv.writer(f).writerows([("text", "label"), *_rows(args.rows, args.rows * i)])
            cmd = ["start", "--coordinator", f"127.0.0.1:{port}", "--ca", str(coord / "tls" / "ca.pem"), "--key",
                   str(base / f"node{i}" / "node.key"), "--data", str(data), "--home", str(base / f"home{i}"),
                   "--runtime-port", str(_free_port())]  # fmt: skip
            cmd += ["--threads", str(args.threads)] if args.threads else []
            log = (base / f"client{i}.log").open("w")
            procs.append(subprocess.Popen([str(BIN / "fedtune-client"), *cmd], env=env, stdout=log, stderr=subprocess.STDOUT))
        if procs[0].wait(timeout=3600) != 0:
            raise SystemExit("the run failed: " + (base / "coordinator.log").read_text()[-2000:])
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    (run_dir,) = (coord / "runs").iterdir()
    return json.loads((run_dir / "results.json").read_text())


def fixed_costs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per round: wall seconds, and per client the seconds that were not its own training."""
    rows = []
    for entry in results["rounds"][1:]:
        trained = [c["train-seconds"] for c in entry["clients"].values() if "train-seconds" in c]
        fixed = [entry["seconds"] - t for t in trained]
        rows.append({"round": entry["round"], "round_s": entry["seconds"], "train_s_max": max(trained),
                     "fixed_s_mean": statistics.mean(fixed), "fixed_s_max": max(fixed)})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedtune.benchmarks.p6_deploy_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm", help="model name or folder (default: the bundled MiniLM)")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--rows", type=int, default=64, help="rows per client")
    p.add_argument("--code", type=Path, help="run fedtune from this checkout instead (PYTHONPATH)")
    p.add_argument("--label", default="after", help="name of this measurement in the JSON (before | after)")
    p.add_argument("--smoke", action="store_true", help="2 clients x 2 rounds, 24 rows (use with a tiny --model)")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/p6_deploy_overhead_LABEL.json)")
    p.add_argument("--threads", type=int, default=1,
                   help="each client's --threads: the clients share this host's cores, as separate hosts would not "
                        "(0: torch's default, a thread per core; also for --code checkouts without the flag)")  # fmt: skip
    p.add_argument("--keep", type=Path, help="work in this (new) folder and keep its logs, instead of a temporary one")
    args = p.parse_args(argv)
    if args.smoke:
        args.clients, args.rounds, args.rows = 2, 2, 24
    with tempfile.TemporaryDirectory(prefix="fedtune-p6-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        results = federate(args, work)
        wall = time.perf_counter() - began
    rows = fixed_costs(results)
    steady = [r["fixed_s_mean"] for r in rows[1:]] or [rows[0]["fixed_s_mean"]]
    meta = {"label": args.label, "model": args.model, "clients": args.clients, "rounds": args.rounds, "rows": args.rows,
            "code": str(args.code) if args.code else "this checkout", "wall_s": round(wall, 1),
            "fixed_s_per_client_round_after_round_1": round(statistics.mean(steady), 3)}  # fmt: skip
    write(f"P6 deployment fixed cost per client and round ({args.label})", rows,
          args.out or RESULTS / f"p6_deploy_overhead_{args.label}.json", meta)  # fmt: skip
    print(f"fixed cost per client and round (rounds 2+): {meta['fixed_s_per_client_round_after_round_1']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
