"""Ray under fedtune-simulate: a private temp dir, `--ray-address`, a run on an existing two-node Ray cluster.

The default run's listeners, file modes and output are checked on the README main job (tests/test_main_job.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import stat
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import psutil
import pytest

from tests.conftest import TINY_LABELS, write_sentiment_csv


@dataclasses.dataclass(frozen=True)
class Listener:
    """A listening TCP socket of one process."""

    ip: str
    port: int
    pid: int
    process: str


@dataclasses.dataclass
class Watch:
    """What the process tree showed while it was watched."""

    listeners: set[Listener] = dataclasses.field(default_factory=set)
    cmdlines: dict[int, list[str]] = dataclasses.field(default_factory=dict)


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1, also written as an IPv4-mapped IPv6 address (::ffff:127.0.0.1)."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def process_name(p: psutil.Process) -> str:
    """Ray's title for its workers (ray::ClientAppActor...), else the program's file name."""
    name = p.name()
    return name if name.startswith("ray::") else Path(p.cmdline()[0]).name


def look(root: psutil.Process, watch: Watch) -> None:
    """Add the listening sockets and command lines of `root` and all its descendants to `watch`."""
    try:
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:  # the run has ended
        return
    for p in tree:
        with contextlib.suppress(psutil.Error):  # processes come and go while we look
            watch.cmdlines.setdefault(p.pid, p.cmdline())
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    watch.listeners.add(Listener(c.laddr.ip, c.laddr.port, p.pid, process_name(p)))


@contextlib.contextmanager
def watching(pid: int, every: float = 0.5) -> Iterator[Watch]:
    """Watch the process tree under `pid` from a thread, every `every` seconds, until the block ends."""
    watch, stop = Watch(), threading.Event()
    root = psutil.Process(pid)

    def loop() -> None:
        while not stop.is_set():
            look(root, watch)
            stop.wait(every)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        stop.set()
        thread.join()


def descendants() -> set[int]:
    """The processes this one started, and theirs."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


def stop_all(pids: set[int], grace: float = 15.0) -> list[str]:
    """Wait up to `grace` seconds for `pids` (never this process) to exit, then kill the rest; returns their names."""
    procs = []
    for pid in pids - {os.getpid()}:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(procs, timeout=grace)  # Ray's workers exit a moment after their raylet
    names = []
    for p in alive:
        with contextlib.suppress(psutil.Error):
            names.append(process_name(p))
            p.kill()
    return names


def outside_loopback(watch: Watch) -> list[Listener]:
    return sorted((x for x in watch.listeners if not is_loopback(x.ip)), key=lambda x: (x.process, x.port))


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ray-data") / "data.csv"
    write_sentiment_csv(path, 120)
    return path


def test_ray_temp_dir_is_private_short_and_removed() -> None:
    from fedtune.simulations.run import ray_temp_dir

    with ray_temp_dir() as temp_dir:
        private = Path(temp_dir).parent
        assert stat.S_IMODE(private.stat().st_mode) == 0o700 and private.owner() == Path.home().owner()
        # Ray's longest socket path under it, with a 7-digit pid, stays within Linux's 107 bytes.
        assert len(f"{temp_dir}/session_2026-12-04_20-29-50_323105_1234567/sockets/plasma_store") <= 103
    assert not private.exists()


def test_ray_address_is_a_setting_a_flag_and_a_toml_key(tmp_path: Path) -> None:
    from fedtune.simulations.cli import parser
    from fedtune.simulations.config import build_config, read_toml
    from fedtune.simulations.run import ray_init_args

    flags = vars(parser().parse_args(["--ray-address", "10.0.0.5:6379"]))
    assert build_config({}, flags).ray_address == "10.0.0.5:6379"
    (tmp_path / "run.toml").write_text('ray_address = "127.0.0.1:6379"\n')
    cfg = build_config(read_toml(tmp_path / "run.toml"), {})
    assert ray_init_args(cfg, "unused")["address"] == "127.0.0.1:6379"
    local = ray_init_args(build_config({}, {}), "/tmp/x/ray")
    assert local["address"] == "local" and local["include_dashboard"] is False and local["_temp_dir"] == "/tmp/x/ray"


class RecordNode:
    """A Flower client mod that writes down which Ray node ran each message."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, msg, context, call_next):
        import ray

        (self.folder / uuid.uuid4().hex).write_text(ray.get_runtime_context().get_node_id())
        return call_next(msg, context)


@pytest.fixture(scope="module")
def cluster() -> Iterator:
    """Two Ray nodes (1 CPU each) on 127.0.0.1, started with Ray's own test helper; stopped afterwards."""
    from fedtune.simulations.run import ray_environment, ray_temp_dir

    os.environ.update(ray_environment())  # before Ray is imported, as simulate() does
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    before = descendants()
    with ray_temp_dir() as temp_dir:
        c = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False, "temp_dir": temp_dir})
        try:
            c.add_node(**node, temp_dir=temp_dir)
            c.wait_for_nodes()
            yield c
        finally:
            started = descendants() - before
            c.shutdown()
            assert stop_all(started) == []  # Cluster.shutdown stopped every process of both nodes


def test_simulation_runs_on_an_existing_two_node_ray_cluster(
    cluster, tmp_path: Path, tiny_model_dir: Path, data_csv: Path
) -> None:
    import tests.test_simulation_ray as this_module
    from fedtune.simulations.config import build_config
    from fedtune.simulations.run import simulate

    assert cluster.address.startswith("127.0.0.1:")
    nodes = {n.node_id for n in cluster.list_all_nodes()}
    assert len(nodes) == 2
    visits = tmp_path / "visits"
    visits.mkdir()
    cfg = build_config(
        {},
        dict(
            num_clients=2,
            num_rounds=1,
            dataset=str(data_csv),
            labels=TINY_LABELS,
            model=str(tiny_model_dir),
            partitioning="iid",
            batch_size=16,
            out=str(tmp_path / "run"),
            ray_address=cluster.address,
        ),
    )
    cloudpickle.register_pickle_by_value(this_module)  # Ray workers cannot import the tests package
    with watching(os.getpid()) as watch:  # this process: the driver, and the cluster's nodes it started
        results = simulate(cfg, client_mods=[RecordNode(visits)])
    assert results["rounds"][-1]["round"] == 1
    ran_on = {p.read_text() for p in visits.iterdir()}
    assert ran_on == nodes  # clients ran on both nodes, nowhere else
    assert len({x.pid for x in watch.listeners if x.process == "raylet"}) == 2  # both raylets were watched
    assert any(x.process.startswith("ray::ClientAppActor") for x in watch.listeners)
    assert outside_loopback(watch) == []
