"""Real processes on 127.0.0.1: a TLS coordinator with node authentication and three data-holding clients."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests import attacker
from tests.conftest import TINY_LABELS, write_sentiment_csv

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout)


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log.open("w"), stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    """Stop a process we started, by its PID (fedtune-* stop their own Flower children on SIGTERM)."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def descendants(procs: list[subprocess.Popen]) -> list[psutil.Process]:
    """Every process our processes started (SuperLink, SuperNodes, SuperExecs, Server/ClientApps)."""
    out = []
    for proc in procs:
        try:
            out += psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    return out


def stop_all(started: list[subprocess.Popen]) -> list[str]:
    """Stop what we started, newest first, then kill any of their children still running; name those."""
    spawned = descendants(started)
    for proc in reversed(started):  # all at once: each takes seconds to stop its Flower children
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _, leftovers = psutil.wait_procs(spawned, timeout=20)
    for p in leftovers:
        p.kill()
    return [" ".join(p.cmdline()[:2]) for p in alive(leftovers)]


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            p.cmdline()
            out.append(p)
        except psutil.Error:
            pass
    return out


def write_data(path: Path, n: int, offset: int) -> Path:
    return write_sentiment_csv(path, n, offset=offset)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    from fedtune.coordinator.service_config import read_service_config

    base = tmp_path_factory.mktemp("deploy")
    port = free_port()
    umask = os.umask(0o022)  # a usual login umask: every fedtune process below inherits it
    init = cli(
        "fedtune-coordinator",
        "init",
        "--out",
        str(base / "coord"),
        "--labels",
        ",".join(TINY_LABELS),
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
    )
    assert init.returncode == 0, init.stderr
    toml = base / "coord" / "coordinator.toml"
    cfg = dataclasses.replace(
        read_service_config(toml),
        model=str(tiny_model_dir),
        num_rounds=2,
        min_clients=3,
        batch_size=16,
        max_length=32,
        join_timeout=300,
    )
    toml.write_text(cfg.to_toml())
    for i in range(4):  # node 3 makes a key but is never registered
        assert cli("fedtune-client", "keygen", "--out", str(base / f"node{i}")).returncode == 0
    for i in range(3):
        reg = cli("fedtune-coordinator", "register", str(base / f"node{i}" / "node.pub"), "--config", str(toml))
        assert reg.returncode == 0, reg.stderr

    # --keep-running: after the run, the operator's own foreign app goes to the same, still connected clients.
    coordinator = start(["fedtune-coordinator", "start", "--config", str(toml), "--keep-running"], base / "coordinator.log")
    started: list[subprocess.Popen] = [coordinator]
    ca = base / "coord" / "tls" / "ca.pem"

    def client(i: int, ca_file: Path, log: str) -> list[str]:
        data = write_data(base / f"data{i}.csv", 48, 48 * i)
        return [
            "fedtune-client",
            "start",
            "--coordinator",
            f"127.0.0.1:{port}",
            "--ca",
            str(ca_file),
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
            "1",  # the clients share this host's cores (see --threads)
        ]

    try:
        wait_until_ready(coordinator, base / "coordinator.log")
        # Refusals first, while the coordinator waits for its three clients.
        refused = {
            "unregistered": subprocess.run(
                [str(BIN / "fedtune-client"), *client(3, ca, "x")[1:]], capture_output=True, text=True, timeout=120
            ),
            "wrong-ca": subprocess.run(
                [str(BIN / "fedtune-client"), *client(0, _other_ca(base), "x")[1:]],
                capture_output=True,
                text=True,
                timeout=120,
            ),
        }
        plain_http = _plain_http(port)
        clients = [start(client(i, ca, f"client{i}.log"), base / f"client{i}.log") for i in range(3)]
        started += clients
        # While the operator's run is under way, an outsider holding only ca.pem tries everything it could before.
        run_id = wait_for_line(coordinator, base / "coordinator.log", r"started run (\d+)").group(1)
        operator = base / "coord" / "flwr"
        admitted_before = _admitted(operator)
        attempts = attacker.outsider_attempts(
            attacker.outsider_home(base, f"127.0.0.1:{port}", ca),
            attacker.foreign_app(base, "outsiderapp", base / "markers" / "outsider"),
            base / "node3" / "node.pub",
            run_id,
            next(iter(admitted_before.values())).node_id,
        )
        raw = attacker.raw_requests(f"127.0.0.1:{port}", ca)
        wait_for_line(coordinator, base / "coordinator.log", "keeps serving", timeout=600)
        admitted_after = _admitted(operator)
        # The operator, on the coordinator host, submits an app of its own: every client must refuse it.
        ledgers = {i: (base / f"home{i}" / "ledger.json").read_bytes() for i in range(3)}
        foreign = attacker.flwr(
            operator,
            "run",
            str(attacker.foreign_app(base, "operatorapp", base / "markers" / "operator")),
            "fedtune",
            "--stream",
            timeout=300,
        )
        yield {
            "base": base,
            "cfg": cfg,
            "refused": refused,
            "plain_http": plain_http,
            "attempts": attempts,
            "raw": raw,
            "admitted": (admitted_before, admitted_after),
            "foreign": foreign,
            "ledgers": (ledgers, {i: (base / f"home{i}" / "ledger.json").read_bytes() for i in range(3)}),
            "logs": {p.name: p.read_text() for p in base.glob("*.log")},
        }
    finally:
        leftovers = stop_all(started)
        os.umask(umask)
        assert not leftovers, f"processes left running: {leftovers}"


def _admitted(flwr_home: Path) -> dict:
    """The nodes the SuperLink admits, asked through the operator's own (loopback) connection."""
    from fedtune.coordinator.registry import control_client, superlink_nodes

    client = control_client(flwr_home, "fedtune")
    try:
        return {fp: node for fp, node in superlink_nodes(client).items() if node.status != "unregistered"}
    finally:
        client.close()


def wait_for_line(proc: subprocess.Popen, log: Path, pattern: str, timeout: float = 300) -> re.Match:
    deadline = time.monotonic() + timeout
    while not (found := re.search(pattern, log.read_text())):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {pattern!r} in {log}: " + log.read_text()[-3000:]
        time.sleep(0.5)
    return found


def wait_until_ready(coordinator: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """The coordinator prints "waiting for N to connect" once its SuperLink is up and its nodes are registered."""
    deadline = time.monotonic() + timeout
    while "waiting for" not in log.read_text():
        assert coordinator.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "coordinator not ready: " + log.read_text()[-3000:]
        time.sleep(0.5)


def _other_ca(base: Path) -> Path:
    from fedtune.coordinator.tls import make_ca

    return make_ca(base / "other-ca")[0]


def _plain_http(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            return f"status {r.status}"
    except (urllib.error.URLError, ConnectionError, OSError) as err:
        return f"refused: {type(err).__name__}: {err}"


def test_two_rounds_complete_with_results_and_model(federation) -> None:
    assert "run finished" in federation["logs"]["coordinator.log"], federation["logs"]["coordinator.log"][-3000:]
    (run_dir,) = (federation["base"] / "coord" / "runs").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    trained = results["rounds"][2]["clients"]
    assert len(trained) == 3
    assert all(0 < c["epsilon"] <= 8 and c["declined"] == 0 for c in trained.values())
    assert results["final"]["accuracy"] >= 0
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(run_dir / "model"), device="cpu")
    assert classify("good")[0]["label"] in TINY_LABELS


def test_each_client_shows_its_epsilon_locally(federation) -> None:
    for i in range(3):
        log = federation["logs"][f"client{i}.log"]
        assert "stay on this host" in log and "epsilon" in log.split("joining", 1)[1], log[-2000:]


def test_state_at_rest_is_owner_only_under_umask_022(federation) -> None:
    base = federation["base"]
    written = [
        p for d in ["coord", *(f"home{i}" for i in range(3)), *(f"node{i}" for i in range(4))] for p in (base / d).rglob("*")
    ]
    assert any(p.name == "ledger.json" for p in written) and any(p.suffix == ".db" for p in written)
    readable = [
        f"{p.relative_to(base)} {stat.filemode(p.lstat().st_mode)}"
        for p in written
        if not p.is_symlink() and p.lstat().st_mode & 0o077
    ]
    assert not readable, f"readable by group or others: {readable}"


def test_client_ledger_on_disk_holds_what_the_coordinator_reports(federation) -> None:
    (run_dir,) = (federation["base"] / "coord" / "runs").iterdir()
    reported = sorted(c["epsilon"] for c in json.loads((run_dir / "results.json").read_text())["clients"].values())
    spent = []
    for i in range(3):
        done = cli("fedtune-client", "budget", "--home", str(federation["base"] / f"home{i}"), "--json")
        assert done.returncode == 0, done.stderr
        (entry,) = json.loads(done.stdout)
        assert entry["budget"] == 8 and entry["accountant"] == "pld" and list(entry["runs"].values())[0]["rounds"] == 2
        spent.append(entry["spent"])
    assert sorted(spent) == pytest.approx(reported)


def test_unregistered_key_is_refused_with_a_clear_message(federation) -> None:
    done = federation["refused"]["unregistered"]
    assert done.returncode == 2
    assert "not registered" in done.stderr and "Traceback" not in done.stderr


def test_wrong_ca_fails_the_tls_handshake_with_a_clear_message(federation) -> None:
    done = federation["refused"]["wrong-ca"]
    assert done.returncode == 2
    assert "TLS handshake" in done.stderr and "not signed by the CA" in done.stderr, done.stderr


def test_plain_http_gets_no_session(federation) -> None:
    assert federation["plain_http"].startswith("refused"), federation["plain_http"]


# --- attacks: an outsider with ca.pem, during the operator's run; then the operator's own foreign app -------------


@pytest.mark.parametrize("attempt", ["ls", "log", "stop", "run", "supernode register", "supernode unregister", "supernode list"])
def test_outsider_with_the_ca_cannot_use_the_control_api(federation, attempt: str) -> None:
    done = federation["attempts"][attempt]
    assert attacker.refused_by_the_gateway(done), f"`flwr {attempt}` not refused:\n{done.stdout}\n{done.stderr}"


def test_public_port_serves_nothing_but_the_fleet_api(federation) -> None:
    served = {request: code for request, code in federation["raw"].items() if code != 404}
    assert not served, served


def test_operator_run_finished_as_if_nothing_happened(federation) -> None:
    (run_dir,) = (federation["base"] / "coord" / "runs").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2] and not results["faults"]


def test_registered_nodes_unchanged_by_the_outsider(federation) -> None:
    before, after = federation["admitted"]
    registered = cli("fedtune-coordinator", "nodes", "--config", str(federation["base"] / "coord" / "coordinator.toml"))
    assert set(before) == set(after) == set(registered.stdout.split()) and len(after) == 3
    assert {n.node_id for n in before.values()} == {n.node_id for n in after.values()}


def test_outsider_app_never_ran_anywhere(federation) -> None:
    assert not list((federation["base"] / "markers" / "outsider").iterdir())


def test_every_client_refuses_the_operators_foreign_app(federation) -> None:
    markers = federation["base"] / "markers" / "operator"
    assert not list(markers.glob("client-*")), "a foreign ClientApp ran next to a data holder's rows"
    replies = (markers / "server-replies").read_text().splitlines()  # the operator's own ServerApp did run
    assert len(replies) == 3 and all("refused by the data holder" in r and "carries files of its own" in r for r in replies)
    before, after = federation["ledgers"]
    assert before == after, "privacy was spent on a foreign app"
    for i in range(3):
        assert "refused run" in federation["logs"][f"client{i}.log"], federation["logs"][f"client{i}.log"][-2000:]


NETNS = ("fedtune-test-coord", "fedtune-test-client")
SUBNET = ("10.213.7.1", "10.213.7.2")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: the coordinator's host and a data holder's host."""
    if os.geteuid() != 0 or not Path("/usr/sbin/ip").exists() and not Path("/sbin/ip").exists():
        pytest.skip("network namespaces need root and iproute2 (`ip netns`)")
    try:
        for ns in NETNS:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)  # a previous crash
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", "ftveth0", "netns", NETNS[0], "type", "veth", "peer", "name", "ftveth1", "netns", NETNS[1])
        for ns, dev, addr in ((NETNS[0], "ftveth0", SUBNET[0]), (NETNS[1], "ftveth1", SUBNET[1])):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
    except (subprocess.CalledProcessError, OSError) as err:
        pytest.skip(f"cannot create network namespaces here: {err}")
    yield NETNS
    for ns in NETNS:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)


def test_client_joins_over_a_non_loopback_address(two_hosts, tmp_path: Path, tiny_model_dir: Path) -> None:
    from fedtune.coordinator.service_config import read_service_config

    coord_ns, client_ns = two_hosts
    in_ns = lambda ns, *args: ["ip", "netns", "exec", ns, str(BIN / args[0]), *args[1:]]  # noqa: E731
    port = 9443
    assert (
        cli(
            "fedtune-coordinator",
            "init",
            "--out",
            str(tmp_path / "coord"),
            "--labels",
            ",".join(TINY_LABELS),
            "--listen",
            SUBNET[0],
            "--port",
            str(port),
        ).returncode
        == 0
    )
    toml = tmp_path / "coord" / "coordinator.toml"
    cfg = read_service_config(toml)
    assert SUBNET[0] in cfg.hosts  # the certificate names the address the client dials
    toml.write_text(
        dataclasses.replace(
            cfg, model=str(tiny_model_dir), num_rounds=1, min_clients=1, join_timeout=240, batch_size=16, max_length=32
        ).to_toml()
    )
    assert cli("fedtune-client", "keygen", "--out", str(tmp_path / "node")).returncode == 0
    assert cli("fedtune-coordinator", "register", str(tmp_path / "node" / "node.pub"), "--config", str(toml)).returncode == 0
    data = write_data(tmp_path / "data.csv", 48, 0)
    started = [
        subprocess.Popen(
            in_ns(coord_ns, "fedtune-coordinator", "start", "--config", str(toml)),
            stdout=(tmp_path / "coordinator.log").open("w"),
            stderr=subprocess.STDOUT,
        )
    ]
    try:
        wait_until_ready(started[0], tmp_path / "coordinator.log")
        started.append(
            subprocess.Popen(
                in_ns(
                    client_ns,
                    "fedtune-client",
                    "start",
                    "--coordinator",
                    f"{SUBNET[0]}:{port}",
                    "--ca",
                    str(tmp_path / "coord" / "tls" / "ca.pem"),
                    "--key",
                    str(tmp_path / "node" / "node.key"),
                    "--data",
                    str(data),
                    "--home",
                    str(tmp_path / "home"),
                ),
                stdout=(tmp_path / "client.log").open("w"),
                stderr=subprocess.STDOUT,
            )
        )
        assert started[0].wait(timeout=600) == 0, (tmp_path / "coordinator.log").read_text()[-3000:]
    finally:
        leftovers = stop_all(started)
    (run_dir,) = (tmp_path / "coord" / "runs").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    (report,) = results["rounds"][1]["clients"].values()
    assert report["declined"] == 0 and report["epsilon"] > 0
    assert "round 1: trained" in (tmp_path / "client.log").read_text()
    assert not leftovers


def test_client_supervisor_loads_neither_torch_nor_opacus(tmp_path: Path) -> None:
    # `fedtune-client start` stays alive beside its SuperNode for the whole session; only the ClientApp
    # processes it spawns train. With torch loaded it cost ~4 CPU-seconds to start and ~0.4 GiB for nothing.
    data = write_data(tmp_path / "data.csv", 12, 0)
    probe = (
        "import sys\nfrom fedtune.client.cli import main\n"
        f"rc = main(['start', '--coordinator', '127.0.0.1:1', '--ca', {str(tmp_path / 'ca.pem')!r}, "
        f"'--key', {str(tmp_path / 'node.key')!r}, '--data', {str(data)!r}, '--home', {str(tmp_path / 'home')!r}])\n"
        "print(rc, sorted(m for m in ('torch', 'opacus', 'transformers') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "ca.pem does not exist" in proc.stderr  # it got past loading the data, to the missing certificate
    assert proc.stdout.split() == ["2", "[]"], proc.stdout + proc.stderr
