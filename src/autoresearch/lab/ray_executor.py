"""Trials on a Ray cluster: slots on every node, one Ray task per trial, pinned to its slot's node.

The lab, its ledger and git stay where `run` started (the driver). A task carries the trial's
inputs (train.py, the supervisor's spec, a checkpoint to score) to its node, runs the trial's
supervisor there exactly as on this host (the same sandbox, clock, limits and scorer), and brings
back the supervisor's files (result, train.log, checkpoint). The task's process is the supervisor's
parent, which the supervisor dies with: a cancelled task, a dead worker or node, or a dead driver
(Ray ends a dead driver's tasks) leave nothing of the trial running.

Each node must hold the prepared data. A node that sees the lab's data folder at the same path with
the same manifest (a shared filesystem) uses it. Any other gets it from the lab, once: the lab puts
the folder into Ray's object store, and the node's first task writes it into a cache named by the
manifest's digest (~/.cache/autoresearch/ray-data/) and checks every split against the manifest
before using it.

Slots: one per GPU of each node with GPUs; on a cluster without GPUs, CPU slots spread over the
nodes, sharing each node's CPUs. Each slot's device class is the node's own (its GPU's name, or its
CPU's), so that a cluster of mixed machines compares runs only within a class.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import devices
from . import supervisor as sup
from .executor import SUPERVISOR_LOG, Executor, ExecutorError, Ran, Slot, supervise

INSTALL = "pip install 'autoresearch[ray]'"
CONNECT_SECONDS = 30.0  # an address that does not answer is refused within this
PROBE_SECONDS = 60.0  # for every node to answer what it has
RESULT_MARGIN = 60.0  # past the trial's limit (which the node enforces), the lab gives up on the task as lost
RETURNED = (sup.RESULT_FILE, sup.LOG_FILE, sup.CHECKPOINT_FILE, SUPERVISOR_LOG)


def node_cache() -> Path:
    """Where a node keeps the data the lab shipped it (its own home, as its Ray runs)."""
    return Path.home() / ".cache" / "autoresearch" / "ray-data"


@dataclass
class RaySlot(Slot):
    """A slot on a cluster node: the resources its task asks for, and the node's own device class."""

    num_gpus: int = 0
    num_cpus: float = 1
    node_class: str = ""

    @property
    def device_class(self) -> str:
        return self.node_class


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorError(f"--executor ray needs Ray, which is not installed here: {INSTALL}") from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail within seconds, with the address, where nothing listens (ray.init would retry for minutes)."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=min(10.0, CONNECT_SECONDS)):
            pass
    except (OSError, ValueError) as e:
        raise ExecutorError(f"--address {address}: no Ray cluster answers there ({e}). Start one with `ray start "
                            "--head` on the head node and pass the address it prints (host:port), or `auto` on "
                            "a node of a running cluster.") from None


def manifest_digest(data: Path) -> str:
    return hashlib.sha256((data / "manifest.json").read_bytes()).hexdigest()


def probe(data: str, digest: str) -> dict:
    """On a node: what it is and whether it sees the lab's data."""
    names = [g.name for g in devices.gpus()]
    manifest = Path(data) / "manifest.json"
    sees = manifest.is_file() and hashlib.sha256(manifest.read_bytes()).hexdigest() == digest
    return {"host": socket.gethostname(), "gpu_names": names, "cpus": devices.cpu_count(), "sees_data": sees,
            "cpu_class": devices.device_class("cpu")}


def _node_data(offer: dict) -> Path:
    """On a node: the prepared data, where the lab's path holds it, else the node's copy (made from the
    lab's shipment the first time, and checked against its manifest)."""
    import ray

    lab_path = Path(offer["path"])
    manifest = lab_path / "manifest.json"
    if manifest.is_file() and hashlib.sha256(manifest.read_bytes()).hexdigest() == offer["digest"] \
            and not offer["ship"]:
        return lab_path
    cached = node_cache() / offer["digest"]
    if (cached / "manifest.json").is_file():
        return cached
    files = ray.get(offer["files"])
    cached.parent.mkdir(parents=True, exist_ok=True)
    landing = Path(tempfile.mkdtemp(prefix=".landing-", dir=cached.parent))
    try:
        for name, blob in files.items():
            (landing / name).write_bytes(blob)
        splits = json.loads((landing / "manifest.json").read_text())["splits"]
        for split, entry in splits.items():
            found = hashlib.sha256((landing / f"{split}.bin").read_bytes()).hexdigest()
            if found != entry["sha256"]:
                raise RuntimeError(f"the {split} split the lab shipped arrived damaged (sha256 {found[:12]}, the "
                                   f"manifest says {entry['sha256'][:12]})")
        try:
            landing.rename(cached)
        except OSError:  # another task on this node landed it first
            pass
    finally:
        shutil.rmtree(landing, ignore_errors=True)
    return cached


def run_on_node(inputs: dict[str, bytes], checkpoint, offer: dict, limit: float) -> dict:
    """On a node: the trial's supervisor, in a folder of its own, and its files back."""
    import ray

    work = Path(tempfile.mkdtemp(prefix="autoresearch-trial-"))
    try:
        for name, blob in inputs.items():
            (work / name).write_bytes(blob)
        spec = json.loads((work / sup.SPEC_FILE).read_text())
        data = _node_data(offer)
        spec["trainer"] = str(work / "train.py")
        spec["data"] = str(data)
        spec["hidden"] = sorted({*spec["hidden"], str(data), str(node_cache()), str(Path.home())})
        if checkpoint is not None:
            (work / "scored.pt").write_bytes(ray.get(checkpoint))
            spec["checkpoint"] = str(work / "scored.pt")
        if spec["device"] == "cuda":
            spec["gpus"] = [int(i) for i in ray.get_gpu_ids()]
        (work / sup.SPEC_FILE).write_text(json.dumps(spec))
        ran = supervise(work, limit)
        files = {name: (work / name).read_bytes() for name in RETURNED if (work / name).is_file()}
        return {"returncode": ran.returncode, "timed_out": ran.timed_out, "files": files,
                "placement": {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                              "gpus": spec["gpus"], "ray_gpu_ids": [str(i) for i in ray.get_gpu_ids()]}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


class RayExecutor(Executor):
    """Runs each trial as a Ray task on the node of its slot. `address` is a running cluster's
    (host:port, or `auto`), or None to start a cluster inside this process with `init`'s resources
    (ray.init's num_cpus and num_gpus: logical GPUs, for trying the scheduling on a machine without
    any). `ship_data` ships the data to every node, even one that sees the lab's folder."""

    name = "ray"

    def __init__(self, data: Path, address: str | None = "auto", *, init: dict | None = None, ship_data: bool = False):
        self.ray = ray = _import_ray()
        self.data = Path(data)
        if address is not None:
            _check_reachable(address)
        try:
            ray.init(address=address or "local", logging_level="ERROR", log_to_driver=False, include_dashboard=False,
                     **(init or {}))
        except ConnectionError as e:
            raise ExecutorError(f"--address {address}: {str(e).rstrip('.')}. Start a cluster with `ray start "
                                "--head`, or pass its address (host:port).") from None
        self.digest = manifest_digest(self.data)
        self._remote = ray.remote(max_retries=0)(run_on_node)
        self._nodes: dict[str, dict] = {}
        self._probe(ship_data)
        self.offer = {"path": str(self.data), "digest": self.digest, "ship": ship_data, "files": None}
        if ship_data or not all(node["sees_data"] for node in self._nodes.values()):
            self.offer["files"] = ray.put({p.name: p.read_bytes() for p in sorted(self.data.iterdir()) if p.is_file()})

    def _probe(self, ship_data: bool) -> None:
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        alive = [n for n in ray.nodes() if n.get("Alive")]
        asked = {n["NodeID"]: ray.remote(num_cpus=0)(probe).options(
                     scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                     str(self.data), self.digest) for n in alive}
        for node in alive:
            try:
                found = ray.get(asked[node["NodeID"]], timeout=PROBE_SECONDS)
            except Exception as e:  # noqa: BLE001 - a node that cannot run our code is named, with the fix
                raise ExecutorError(f"Ray node {node.get('NodeManagerHostname', node['NodeID'][:8])} could not run the "
                                    f"lab's code ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                                    "Every node needs this autoresearch installed, in the Python Ray runs.") from None
            self._nodes[node["NodeID"]] = {**found, "resources": node.get("Resources", {})}

    def slots(self, parallel: int | None = None, gpus_per_trial: int = 1) -> list[Slot]:
        k = gpus_per_trial
        gpu_slots, cpu_nodes = [], []
        for node_id, node in sorted(self._nodes.items(), key=lambda kv: kv[1]["host"]):
            gpus = int(node["resources"].get("GPU", 0))
            cpus = max(1, int(node["resources"].get("CPU", node["cpus"])))
            for _ in range(gpus // k):  # k GPUs of one node a slot, which Ray assigns
                if node["gpu_names"]:
                    gpu_slots.append(RaySlot("cuda", None, None, ranks=k, node=node_id, host=node["host"], num_gpus=k,
                                             num_cpus=max(1, cpus * k // gpus),
                                             node_class=devices.device_class("cuda", node["gpu_names"][:k])))
                else:  # GPUs Ray was told of that the driver does not list (logical ones): scheduled as such
                    threads = max(1, cpus * k // gpus)
                    gpu_slots.append(RaySlot("cpu", None, threads, node=node_id, host=node["host"], num_gpus=k,
                                             num_cpus=threads, node_class=_cpu_class(node, threads)))
            if not gpus:
                cpu_nodes.append((node_id, node, cpus))
        if gpu_slots:
            n = len(gpu_slots) if parallel is None else parallel
            if not 1 <= n <= len(gpu_slots):
                raise ExecutorError(f"--parallel {n}: the Ray cluster's {len(self._nodes)} node(s) have room for "
                                    f"{len(gpu_slots)} trial(s) of {k} GPU(s) at once; ask for 1 to {len(gpu_slots)}.")
            return gpu_slots[:n]
        if k > 1:
            raise ExecutorError(f"--gpus-per-trial {k}: the Ray cluster has no GPU; a trial on several GPUs needs them.")
        total = sum(cpus for _, _, cpus in cpu_nodes)
        n = len(cpu_nodes) if parallel is None else parallel
        if not 1 <= n <= total:
            raise ExecutorError(f"--parallel {n}: the Ray cluster has no GPU and {total} CPU(s) on {len(cpu_nodes)} "
                                f"node(s); each CPU slot needs at least one, so ask for 1 to {total}.")
        per_node = [0] * len(cpu_nodes)
        for k in range(n):  # spread over the nodes, as evenly as their CPUs allow
            i = max(range(len(cpu_nodes)), key=lambda j: cpu_nodes[j][2] / (per_node[j] + 1))
            per_node[i] += 1
        found = []
        for (node_id, node, cpus), count in zip(cpu_nodes, per_node):
            threads = max(1, cpus // count) if count else 0
            found += [RaySlot("cpu", None, threads, node=node_id, host=node["host"], num_cpus=threads,
                              node_class=_cpu_class(node, threads)) for _ in range(count)]
        return found

    def run(self, trial_dir: Path, slot: Slot, limit: float, stop: threading.Event | None = None) -> Ran:
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        started = time.monotonic()
        inputs = {name: (trial_dir / name).read_bytes() for name in ("train.py", sup.SPEC_FILE)}
        spec = json.loads(inputs[sup.SPEC_FILE])
        checkpoint = ray.put(Path(spec["checkpoint"]).read_bytes()) if spec.get("checkpoint") else None
        task = self._remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(slot.node, soft=False),
                                    num_gpus=slot.num_gpus, num_cpus=slot.num_cpus).remote(
            inputs, checkpoint, self.offer, limit)
        ended = None
        try:
            while True:
                done, _ = ray.wait([task], timeout=0.2)
                if done:
                    break
                if stop is not None and stop.is_set():
                    ended = "stopped"
                elif time.monotonic() - started > limit + RESULT_MARGIN:
                    ended = "timed out"
                if ended:
                    ray.cancel(task, force=True)
                    break
        except BaseException:
            ray.cancel(task, force=True)
            raise
        seconds = time.monotonic() - started
        if ended:
            return Ran(None, timed_out=ended == "timed out", seconds=seconds)
        try:
            answer = ray.get(task)
        except ray.exceptions.RayTaskError as e:  # our code failed on the node: the trial has no result
            (trial_dir / SUPERVISOR_LOG).write_text(str(e))
            return Ran(None, seconds=seconds)
        except ray.exceptions.RayError as e:  # the worker, its node or the object store went away
            return Ran(None, lost=f"{type(e).__name__} on {slot.host or slot.node} ({_first_line(e)})",
                       seconds=seconds)
        for name in RETURNED:
            (trial_dir / name).unlink(missing_ok=True)
        for name, blob in answer["files"].items():
            (trial_dir / name).write_bytes(blob)
        return Ran(answer["returncode"], timed_out=answer["timed_out"], seconds=seconds,
                   placement=answer["placement"])

    def alive(self, slot: Slot) -> bool:
        return any(n["NodeID"] == slot.node and n.get("Alive") for n in self.ray.nodes())

    def close(self) -> None:
        if self.ray.is_initialized():
            self.ray.shutdown()


def _cpu_class(node: dict, threads: int) -> str:
    """A node's CPU class, with the threads a slot there gets (the node said its name)."""
    name = node["cpu_class"].rsplit(" (", 1)[0]
    return f"{name} ({threads} threads)"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
