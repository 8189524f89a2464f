"""Real processes on 127.0.0.1: a client dies mid-round, then the coordinator dies, and `start --resume` finishes the run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import TINY_LABELS
from tests.test_deployment import alive, cli, descendants, free_port, start, stop, stop_all, wait_until_ready, write_data

ROUNDS = 3
VICTIM = 2  # the client killed while it trains round 1


def _replied(log: Path) -> bool:
    return "round 1: trained" in log.read_text()


def _kill_tree(proc: subprocess.Popen) -> None:
    """kill -9 a process and everything it started, as a crash of its host would."""
    tree = descendants([proc])
    for p in [psutil.Process(proc.pid), *tree]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)


def _wait(what: str, condition, timeout: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs if p.exists())
            pytest.fail(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.5)


def _training(log: Path) -> bool:
    # The client's runtime says so when a training message arrives.
    return "round 1: training" in log.read_text()


@pytest.fixture(scope="module")
def crashed_and_resumed(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    from fedtune.coordinator.service_config import read_service_config

    base = tmp_path_factory.mktemp("deploy-faults")
    port = free_port()
    assert cli("fedtune-coordinator", "init", "--out", str(base / "coord"), "--labels", ",".join(TINY_LABELS),
               "--listen", "127.0.0.1", "--port", str(port)).returncode == 0  # fmt: skip
    toml = base / "coord" / "coordinator.toml"
    toml.write_text(
        dataclasses.replace(
            read_service_config(toml),
            model=str(tiny_model_dir),
            num_rounds=ROUNDS,
            min_clients=2,  # a round goes on with two of the three clients
            wait_for_clients=3,  # but round 1 starts with all three, so the victim is in it (else a race)
            round_timeout=150,  # the dead client is dropped at the latest after this
            fraction_evaluate=0.0,  # a round is its training: it ends once the survivors' updates are in
            batch_size=16,
            max_length=32,
            join_timeout=300,
        ).to_toml()
    )
    for i in range(3):
        assert cli("fedtune-client", "keygen", "--out", str(base / f"node{i}")).returncode == 0
        assert cli("fedtune-coordinator", "register", str(base / f"node{i}" / "node.pub"), "--config", str(toml)).returncode == 0

    def client(i: int) -> list[str]:
        return ["fedtune-client", "start", "--coordinator", f"127.0.0.1:{port}", "--ca", str(base / "coord" / "tls" / "ca.pem"),
                "--key", str(base / f"node{i}" / "node.key"), "--data", str(write_data(base / f"data{i}.csv", 48, 48 * i)),
                "--home", str(base / f"home{i}"), "--runtime-port", str(free_port()), "--epsilon", "8", "--threads",
                "1"]  # fmt: skip

    logs = [base / "coordinator.log", base / "resumed.log", *(base / f"client{i}.log" for i in range(3))]
    coordinator = start(["fedtune-coordinator", "start", "--config", str(toml)], logs[0])
    started = [coordinator]
    frozen: list[psutil.Process] = []
    try:
        wait_until_ready(coordinator, logs[0])
        clients = [start(client(i), base / f"client{i}.log") for i in range(3)]
        started += clients
        _wait("the victim to train round 1", lambda: _training(base / f"client{VICTIM}.log"), 300, logs)
        _kill_tree(clients[VICTIM])
        survivors = [c for i, c in enumerate(clients) if i != VICTIM]
        _wait("the survivors' round 1 updates", lambda: all(_replied(base / f"client{i}.log") for i in range(3)
              if i != VICTIM), 300, logs)  # fmt: skip
        time.sleep(5)  # their SuperNodes hand the updates on
        # Frozen from here until the resumed coordinator has cleaned up: whatever the dying coordinator queued
        # for round 2 cannot reach them, so each survivor trains rounds 2 and 3 exactly once.
        frozen += [p for c in survivors for p in alive([psutil.Process(c.pid), *descendants([c])])]
        for p in frozen:
            p.suspend()
        (run_dir,) = (base / "coord" / "runs").iterdir()
        latest = run_dir / "checkpoint" / "latest.json"
        _wait("round 1's checkpoint", latest.exists, 400, logs)
        _kill_tree(coordinator)  # the coordinator's host goes down between rounds 1 and 2
        checkpointed = json.loads(latest.read_text())["round"]

        resumed = start(["fedtune-coordinator", "start", "--config", str(toml), "--resume", str(run_dir)], logs[1])
        started.append(resumed)
        _wait("the resumed coordinator", lambda: "waiting for" in logs[1].read_text(), 120, logs)
        for p in frozen:
            p.resume()
        rc = resumed.wait(timeout=600)
        yield {
            "base": base,
            "run_dir": run_dir,
            "checkpointed": checkpointed,
            "rc": rc,
            "logs": {p.name: p.read_text() for p in logs if p.exists()},
        }
    finally:
        for p in alive(frozen):
            p.resume()
        leftovers = stop_all(started)
        assert not leftovers, f"processes left running: {leftovers}"


def test_resumed_run_finishes_every_round_once(crashed_and_resumed) -> None:
    r = crashed_and_resumed
    assert r["rc"] == 0, r["logs"]["resumed.log"][-3000:]
    assert r["checkpointed"] == 1
    assert "resuming after round 1" in r["logs"]["resumed.log"]
    assert "left unfinished by an earlier coordinator" in r["logs"]["resumed.log"]  # the dead run's queue is gone
    results = json.loads((r["run_dir"] / "results.json").read_text())
    assert results["resumed_after_round"] == 1
    assert [x["round"] for x in results["rounds"]] == [0, 1, 2, 3]
    shape = {e["round"]: sorted(e) for e in results["rounds"]}
    assert all(results["rounds"][k].get("train") for k in (1, 2, 3)), (shape, r["logs"]["resumed.log"][-4000:])
    assert (r["run_dir"] / "model" / "config.json").exists()


def test_the_dead_client_is_dropped_from_round_1_and_listed(crashed_and_resumed) -> None:
    results = json.loads((crashed_and_resumed["run_dir"] / "results.json").read_text())
    assert len(results["rounds"][1]["clients"]) == 2
    faults = [f for f in results["faults"] if f["round"] == 1 and f["phase"] == "train"]
    assert len(faults) == 1, results["faults"]
    assert faults[0]["client"] not in results["rounds"][1]["clients"]


def test_survivors_privacy_composes_across_both_runs(crashed_and_resumed) -> None:
    from fedtune.privacy.accounting import epsilon_spent

    r = crashed_and_resumed
    results = json.loads((r["run_dir"] / "results.json").read_text())
    survivors = [i for i in range(3) if i != VICTIM]
    spent = []
    for i in survivors:
        done = cli("fedtune-client", "budget", "--home", str(r["base"] / f"home{i}"), "--json")
        assert done.returncode == 0, done.stderr
        (entry,) = json.loads(done.stdout)
        assert sum(run["rounds"] for run in entry["runs"].values()) == ROUNDS  # one round in the first run, two after
        assert len(entry["runs"]) == 2
        ledger = json.loads((r["base"] / f"home{i}" / "ledger.json").read_text())
        (data,) = ledger["datasets"].values()
        z, q, n = data["steps"][0][:3]
        assert entry["spent"] == pytest.approx(epsilon_spent([(z, q, n)] * ROUNDS, 1e-5), rel=1e-9)
        spent.append(entry["spent"])
    final = results["rounds"][ROUNDS]["clients"]
    assert sorted(c["epsilon"] for c in final.values()) == pytest.approx(sorted(spent), rel=1e-9)


def test_a_superlink_left_by_a_dead_coordinator_is_stopped_on_start(tmp_path: Path) -> None:
    from fedtune.coordinator.service import ServiceError, _pid_file, start_superlink, stop_process
    from fedtune.coordinator.service_config import ServiceConfig

    cfg = ServiceConfig(home=tmp_path, labels=TINY_LABELS, listen="127.0.0.1", port=free_port(), insecure=True)
    cfg.state_dir.mkdir(parents=True)
    dead_owner = subprocess.Popen(["true"])
    dead_owner.wait()
    # Stands in for the orphaned SuperLink: a process group leader whose parent is gone (init reaps it).
    spawn = subprocess.run(["sh", "-c", "setsid sleep 600 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
    leftover = psutil.Process(int(spawn.stdout))
    # `echo $!` can run before the child has called setsid(); the SuperLink it stands in for (Popen with
    # start_new_session) leads its own group from its first instruction, so wait for that here.
    deadline = time.monotonic() + 30
    while os.getpgid(leftover.pid) != leftover.pid:
        assert time.monotonic() < deadline, "the stand-in SuperLink never became a process group leader"
        time.sleep(0.05)
    live_owner = subprocess.Popen(["sleep", "600"])
    superlink = None
    try:
        _pid_file(cfg).write_text(json.dumps({"superlink": leftover.pid, "owner": live_owner.pid}))
        with pytest.raises(ServiceError, match="already running"):
            start_superlink(cfg, echo=lambda _: None)
        assert leftover.is_running()

        _pid_file(cfg).write_text(json.dumps({"superlink": leftover.pid, "owner": dead_owner.pid}))
        said: list[str] = []
        superlink = start_superlink(cfg, echo=said.append)
        assert not psutil.pid_exists(leftover.pid) or leftover.status() == psutil.STATUS_ZOMBIE
        assert "left behind" in said[0], said
        assert json.loads(_pid_file(cfg).read_text()) == {"superlink": superlink.pid, "owner": os.getpid()}
    finally:
        stop(live_owner)
        if leftover.is_running():
            leftover.kill()
        if superlink is not None:
            stop_process(superlink)


def test_resume_refuses_a_folder_it_cannot_continue(tmp_path: Path) -> None:
    init = cli("fedtune-coordinator", "init", "--out", str(tmp_path / "coord"), "--labels", ",".join(TINY_LABELS),
               "--listen", "127.0.0.1", "--port", str(free_port()))  # fmt: skip
    assert init.returncode == 0, init.stderr
    toml = str(tmp_path / "coord" / "coordinator.toml")
    finished = tmp_path / "finished"
    (finished / "checkpoint").mkdir(parents=True)
    (finished / "results.json").write_text("{}")
    for folder, needle in ((tmp_path / "empty", "holds no checkpoint"), (finished, "holds a finished run")):
        folder.mkdir(exist_ok=True)
        done = cli("fedtune-coordinator", "start", "--config", toml, "--resume", str(folder))
        assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "coord" / "state" / "superlink.pid").exists()  # refused before anything started
