"""Load: twenty real client processes on loopback (TLS, node authentication), three rounds with a tiny model.

Every client trains in every round. Each client's ClientApp runs in one long-lived runtime (client/runtime.py)
that imports torch once, before it takes any task; when Flower started a ClientApp process per message, twenty
imports at once on a 2-core runner starved Flower's task heartbeats and only a quarter could be sampled.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import TINY_LABELS
from tests.test_deployment import descendants, free_port, start, stop_all, wait_until_ready, write_data

CLIENTS, ROUNDS, ROWS = 20, 3, 24
# At most WINDOW clients start at once: twenty runtimes importing torch at once on 2 cores (60 processes
# starting) starved the SuperLink, whose activation replies timed out, and five SuperNodes gave up (measured).
WINDOW = 5
LIMIT = 900  # seconds the whole federation may take before the test gives up and stops everything


@pytest.fixture(scope="module")
def load_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    from fedtune.client.credentials import make_node_keys
    from fedtune.coordinator.service import init_home, register_key
    from fedtune.coordinator.service_config import ServiceConfig

    base = tmp_path_factory.mktemp("load")
    port = free_port()
    cfg = ServiceConfig(
        home=base / "coord",
        labels=TINY_LABELS,
        listen="127.0.0.1",
        port=port,
        model=str(tiny_model_dir),
        num_rounds=ROUNDS,
        min_clients=CLIENTS,  # every client must answer: an update lost anywhere fails the run
        fraction_train=1.0,
        fraction_evaluate=0.0,  # training only: the load is in the train messages
        batch_size=8,
        max_length=32,
        round_timeout=LIMIT,
        join_timeout=LIMIT,
    )
    init_home(cfg)
    for i in range(CLIENTS):  # the library calls behind `fedtune-client keygen` and `fedtune-coordinator register`
        register_key(cfg, make_node_keys(base / f"node{i}")[1])

    toml = cfg.home / "coordinator.toml"
    coordinator = start(["fedtune-coordinator", "start", "--config", str(toml)], base / "coordinator.log")
    started = [coordinator]
    peak = 0.0
    try:
        wait_until_ready(coordinator, base / "coordinator.log")
        for i in range(CLIENTS):
            data = write_data(base / f"data{i}.csv", ROWS, ROWS * i)
            started.append(
                start(
                    [
                        "fedtune-client",
                        "start",
                        "--coordinator",
                        f"127.0.0.1:{port}",
                        "--ca",
                        str(cfg.tls_dir / "ca.pem"),
                        "--key",
                        str(base / f"node{i}" / "node.key"),
                        "--data",
                        str(data),
                        "--home",
                        str(base / f"home{i}"),
                        "--runtime-port",
                        str(free_port()),
                        "--epsilon",
                        "8",
                        "--threads",
                        "1",  # twenty clients share two cores (see --threads)
                    ],  # fmt: skip
                    base / f"client{i}.log",
                )
            )
            if i >= WINDOW - 1:  # on their own hosts they would not share two cores while importing torch
                _wait_ready([base / f"client{i + 1 - WINDOW}.log"], started)
        began = time.monotonic()
        while coordinator.poll() is None and time.monotonic() - began < LIMIT:
            pss = 0  # proportional set size: shared libraries counted once across the ~60 processes, not per process
            for p in [psutil.Process(s.pid) for s in started if s.poll() is None] + descendants(started):
                try:
                    pss += p.memory_full_info().pss
                except psutil.Error:
                    pass
            peak = max(peak, pss / 2**30)
            time.sleep(5)  # reading ~60 processes' smaps takes ~0.4 CPU-seconds: sampling must not be the load
        yield {
            "cfg": cfg,
            "base": base,
            "rc": coordinator.poll(),
            "seconds": time.monotonic() - began,
            "peak_gib": peak,
            "log": (base / "coordinator.log").read_text(),
        }
    finally:
        leftovers = stop_all(started)
        assert not leftovers, f"processes left running: {leftovers}"


def _wait_ready(logs: list[Path], started: list, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not all("runtime ready" in log.read_text() for log in logs):
        assert all(p.poll() is None for p in started), "a process exited: " + " ".join(p.read_text()[-500:] for p in logs)
        assert time.monotonic() < deadline, "clients not ready: " + " ".join(p.read_text()[-500:] for p in logs)
        time.sleep(1)


def test_twenty_clients_finish_three_rounds_by_themselves(load_run) -> None:
    assert load_run["rc"] == 0, f"coordinator did not finish within {LIMIT} s:\n" + load_run["log"][-3000:]
    print(f"\n{CLIENTS} clients x {ROUNDS} rounds: {load_run['seconds']:.0f} s, peak PSS {load_run['peak_gib']:.2f} GiB")


def test_every_update_is_accounted_for(load_run) -> None:
    from fedtune.privacy.ledger import Ledger

    (run_dir,) = (load_run["cfg"].runs_dir).iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == list(range(ROUNDS + 1))
    assert results["faults"] == []
    for entry in results["rounds"][1:]:
        clients = entry["clients"]
        assert len(clients) == CLIENTS and not any(c["declined"] for c in clients.values())  # all sampled, all trained
        assert all(c["num-examples"] > 0 for c in clients.values())
        assert entry["train"]["max-epsilon"] == pytest.approx(max(c["epsilon"] for c in clients.values()))
    # What the coordinator shows per client (rounds trained, epsilon) is what the data holders' own ledgers hold.
    shown = sorted((len(c["rounds_trained"]), round(c["epsilon"], 9)) for c in results["clients"].values())
    held = []
    for i in range(CLIENTS):
        path = load_run["base"] / f"home{i}" / "ledger.json"
        if path.exists() and (summary := Ledger(path).summary()):
            (entry,) = summary
            held.append((sum(run["rounds"] for run in entry["runs"].values()), round(entry["spent"], 9)))
    assert sorted(held) == shown
    assert sum(n for n, _ in shown) == sum(len(r["clients"]) for r in results["rounds"][1:])
