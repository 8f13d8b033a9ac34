"""Joining the ranks: where each rank sits (``Topology``), the start-up handshake, the process group.

Every rank first meets the others on a key-value store (``torch.distributed.TCPStore``: rank 0 hosts
it when ``tprun`` spawns the ranks; under torchrun it is the agent's store), reports who it is, and
waits for rank 0's verdict. Rank 0 refuses the launch at once when a rank opened another workspace or
runs another tprun, and when a rank has not arrived within ``--dist-timeout`` it ends the launch
naming the missing ranks, so no rank is left waiting in ``init_process_group`` for a peer that never
comes. Only then do the ranks form the process group (gloo on CPU, NCCL on CUDA) and one sub-group per
pipeline stage for its tensor-parallel collectives.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from formats.errors import TpDeployError
from runtime.model.comm import Comm

_POLL = 0.05


@dataclass(frozen=True)
class Topology:
    """One rank's place: global ``rank`` = stage × tp + tp_rank (``formats.pipeline``)."""

    rank: int
    tp: int
    pp: int
    local_rank: int  # which GPU of its host (torchrun's LOCAL_RANK; the rank itself when tprun spawns)

    @property
    def world(self) -> int:
        return self.tp * self.pp

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.pp - 1

    def peer(self, stage: int) -> int:
        """The rank with this rank's tp_rank in ``stage`` (hidden states go peer to peer)."""
        return stage * self.tp + self.tp_rank

    @property
    def last_leader(self) -> int:
        """The rank that gathers the logits: tp rank 0 of the last stage."""
        return (self.pp - 1) * self.tp


@dataclass(frozen=True)
class Identity:
    """What a rank tells the others when it joins; rank 0 compares every field that must agree."""

    rank: int
    host: str
    address: str
    pid: int
    device: str
    version: str
    manifest: str  # sha256 of the manifest this rank opened
    settings: str  # the engine settings that shape every rank's tensors (dtype, KV format, cache size)


@dataclass(frozen=True)
class Rendezvous:
    host: str
    port: int
    is_master: bool  # host the store in this process (tprun's rank 0), or join an existing one (torchrun)
    prefix: str = "tprun"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_address(host: str) -> str:
    """This host's address as the other ranks see it (the interface that reaches the rendezvous)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 1))  # UDP: nothing is sent; only picks the route
            return s.getsockname()[0]
    except OSError:
        return "unknown"


def open_store(rdzv: Rendezvous, world: int, timeout: timedelta) -> dist.Store:
    try:
        store = dist.TCPStore(rdzv.host, rdzv.port, None if not rdzv.is_master else world, rdzv.is_master,
                              timeout=timeout, wait_for_workers=False)
    except (RuntimeError, OSError) as e:
        raise TpDeployError(f"cannot reach the rendezvous store at {rdzv.host}:{rdzv.port} within "
                            f"{timeout.total_seconds():g} s ({e}); check --rdzv-endpoint / MASTER_ADDR and that "
                            "node 0 is up") from None
    return dist.PrefixStore(rdzv.prefix, store)


def handshake(store: dist.Store, me: Identity, world: int, timeout: timedelta) -> list[Identity]:
    """Every rank's Identity once all agree; raises TpDeployError (on every rank) naming the culprits."""
    store.add(f"hb/{me.rank}", 1)  # the heartbeat key exists before anyone watches it (``liveness``)
    store.set(f"join/{me.rank}", json.dumps(asdict(me)))
    if me.rank == 0:
        verdict = _judge(store, me, world, timeout)
        store.set("verdict", json.dumps(verdict))
        if verdict["error"]:
            _until_read(store, world)
    else:
        try:
            store.wait(["verdict"], timeout + timedelta(seconds=30))  # rank 0 decides within its own timeout
            verdict = json.loads(store.get("verdict"))
            store.add("verdict-read", 1)
        except RuntimeError as e:  # the store (rank 0's, unless torchrun's agent hosts it) is gone or silent
            raise TpDeployError(f"rank {me.rank} on {me.host}: no start-up verdict from rank 0 within "
                                f"{timeout.total_seconds():g} s (--dist-timeout) ({e}); is rank 0 running?") from None
    if verdict["error"]:
        raise TpDeployError(verdict["error"])
    return [Identity(**i) for i in verdict["ranks"]]


def _until_read(store: dist.Store, world: int, wait: float = 10.0) -> None:
    """Keep a refusing rank 0 (and the store it may host) up until the ranks that joined have read why."""
    joined = sum(store.check([f"join/{r}"]) for r in range(1, world))
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and store.add("verdict-read", 0) < joined:
        time.sleep(_POLL)


def _judge(store: dist.Store, me: Identity, world: int, timeout: timedelta) -> dict:
    deadline = time.monotonic() + timeout.total_seconds()
    keys = [f"join/{r}" for r in range(world)]
    while not all(store.check([k]) for k in keys):
        if time.monotonic() >= deadline:
            missing = [r for r, k in enumerate(keys) if not store.check([k])]
            return {"error": f"ranks {missing} did not join within {timeout.total_seconds():g} s (--dist-timeout) "
                             f"of {world}; start every node (torchrun --node-rank ...) or check that their "
                             "processes can reach the rendezvous", "ranks": []}
        time.sleep(_POLL)
    ranks = [Identity(**json.loads(store.get(k))) for k in keys]
    problems = [p for p in (_mismatch(me, other) for other in ranks[1:]) if p]
    problems += [p for p in [_shared_gpu(ranks)] if p]
    return {"error": "; ".join(problems) + "; every rank must run the same tprun on the same workspace with the "
                     "same settings" if problems else None, "ranks": [asdict(r) for r in ranks]}


def _mismatch(ref: Identity, other: Identity) -> str | None:
    where = f"rank {other.rank} on {other.host} ({other.address})"
    if other.manifest != ref.manifest:
        return f"{where} opened a workspace with a different manifest ({other.manifest[:12]}… vs rank 0's {ref.manifest[:12]}…)"
    if other.version != ref.version:
        return f"{where} runs tprun {other.version}, rank 0 runs {ref.version}"
    if other.settings != ref.settings:
        return f"{where} was started with other engine settings ({other.settings} vs rank 0's {ref.settings})"
    return None


def _shared_gpu(ranks: list[Identity]) -> str | None:
    """Two ranks on one GPU would share its memory and halve the KV cache each planned for."""
    seen: dict[tuple[str, str], int] = {}
    for r in ranks:
        if r.device.startswith("cuda"):
            key = (r.host, r.device)
            if key in seen:
                return (f"ranks {seen[key]} and {r.rank} both use {r.device} on {r.host}; give each rank its own GPU "
                        "(torchrun --nproc-per-node = GPUs per node, CUDA_VISIBLE_DEVICES)")
            seen[key] = r.rank
    return None


def init_process_group(topo: Topology, store: dist.Store | None, device: torch.device,
                       timeout: timedelta) -> Comm:
    """The world group (every op bounded by ``timeout``) and this stage's tensor-parallel group."""
    if topo.world == 1:
        return Comm(0, 1, device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=topo.rank, world_size=topo.world,
                            timeout=timeout)
    group = None
    for stage in range(topo.pp):  # every rank creates every group, in the same order
        ranks = [stage * topo.tp + t for t in range(topo.tp)]
        g = dist.new_group(ranks, timeout=timeout) if topo.pp > 1 else dist.group.WORLD
        if stage == topo.stage:
            group = g
    return Comm(topo.tp_rank, topo.tp, device, group, leader=topo.stage * topo.tp)


def env_rank() -> tuple[int, int, int] | None:
    """(rank, world, local rank) when launched by torchrun (or srun with the same variables), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def loopback_warning(rdzv: Rendezvous) -> str | None:
    """A loopback rendezvous with several nodes works only when every "node" is this machine."""
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))  # torchrun: --nnodes
    if nodes > 1 and (rdzv.host in ("localhost", "::1") or rdzv.host.startswith("127.")):
        return (f"the rendezvous {rdzv.host}:{rdzv.port} is a loopback address but torchrun runs {nodes} nodes: "
                "ranks on other machines cannot reach it; pass --rdzv-endpoint with node 0's network address")
    return None


def env_rendezvous() -> Rendezvous:
    """The store torchrun set up: the agent's own (all ranks are clients), or rank 0 hosts it."""
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    run = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    rank = int(os.environ["RANK"])
    return Rendezvous(host, port, is_master=not agent and rank == 0, prefix=f"tprun/{run}/{attempt}")
