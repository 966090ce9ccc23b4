"""The torch process group of a Ray Train run, with every listener on the node's own address.

Ray Train's stock torch backend lets ``init_process_group`` create the rendezvous store (a
TCPStore: no authentication), which listens on all interfaces (``*:PORT``). Here rank 0 binds
the store's socket itself, on the address Ray gives its node (127.0.0.1 for the local Ray of
``mvar.cluster.connect``, the node's cluster address on a cluster), and hands it to
``TCPStore(master_listen_fd=...)``; every rank then joins the process group through that store.

Gloo and NCCL open their own sockets on the interface named by ``GLOO_SOCKET_IFNAME`` /
``NCCL_SOCKET_IFNAME``; each worker sets both to ``scaling.socket_ifname`` when the config names
one, else keeps what its environment already says, else picks the interface that holds the node's
address, so neither falls back to whatever the machine's hostname resolves to.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from ray.train.torch import TorchConfig

from mvar.ray_private import TorchBackend, V1WorkerGroup, set_torch_distributed_env_vars

log = logging.getLogger(__name__)

IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_store = None  # rank 0's TCPStore (the server), kept alive as long as the process group


@dataclass
class BoundTorchConfig(TorchConfig):
    """TorchConfig whose process group listens on the node's address only."""

    socket_ifname: str = ""  # interface for gloo / NCCL sockets; '' = the one holding the node's address

    @property
    def backend_cls(self):
        return _BoundTorchBackend


def torch_config(scaling) -> BoundTorchConfig:
    """The backend config of a run's `scaling.*` section (checked here when Ray runs on this machine)."""
    from mvar import cluster
    from mvar.errors import UserError
    name = getattr(scaling, "socket_ifname", "")
    if name and cluster.is_local() and name not in _interfaces():
        raise UserError(f"config key 'scaling.socket_ifname': no interface '{name}' on this machine "
                        f"(it has {', '.join(sorted(_interfaces()))})")
    return BoundTorchConfig(socket_ifname=name)


def _interfaces() -> dict:
    import psutil
    return psutil.net_if_addrs()


def node_address() -> str:
    import ray
    return ray.util.get_node_ip_address()


def interface_of(address: str) -> str | None:
    """Name of the network interface that holds `address` (e.g. 'lo' for 127.0.0.1), or None; else the
    one whose subnet holds it (Linux's `lo` answers all of 127.0.0.0/8 but lists 127.0.0.1 only)."""
    import ipaddress
    ifaces = _interfaces()
    for name, addrs in ifaces.items():
        if any(a.address == address for a in addrs):
            return name
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    for name, addrs in ifaces.items():
        for a in addrs:
            try:
                if a.netmask and ip in ipaddress.ip_network(f"{a.address}/{a.netmask}", strict=False):
                    return name
            except ValueError:  # a link-layer entry, not an IP one
                continue
    return None


def set_socket_ifname(configured: str) -> str:
    """Point gloo and NCCL at one interface of this node; returns the name used ('' when none)."""
    if configured and configured not in _interfaces():
        raise ValueError(f"config key 'scaling.socket_ifname': no interface '{configured}' on node "
                         f"{node_address()} (it has {', '.join(sorted(_interfaces()))})")
    name = configured or os.environ.get("GLOO_SOCKET_IFNAME") or interface_of(node_address()) or ""
    if not name:
        log.warning("no interface holds the node address %s; gloo/NCCL choose their own", node_address())
        return ""
    for var in IFNAME_VARS:
        if configured or not os.environ.get(var):
            os.environ[var] = name
    return name


def open_store(world_size: int, timeout_s: int) -> tuple[str, int]:
    """On rank 0: a TCPStore server on a socket bound to this node's address; returns (address, port)."""
    import torch.distributed as dist
    global _store
    address = node_address()
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((address, 0))
    sock.listen(max(128, world_size))
    port = sock.getsockname()[1]
    # the store owns the descriptor from here on (closes it when destroyed)
    _store = dist.TCPStore(address, port, world_size, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=timeout_s), master_listen_fd=sock.detach())
    return address, port


def join_process_group(backend: str, rank: int, world_size: int, address: str, port: int,
                       timeout_s: int, socket_ifname: str) -> None:
    """On every rank: join the process group through rank 0's store."""
    import torch.distributed as dist
    set_socket_ifname(socket_ifname)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # fail on timeouts, as Ray does
    store = _store if rank == 0 else dist.TCPStore(address, port, world_size, is_master=False,
                                                   timeout=timedelta(seconds=timeout_s))
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def _drop_store() -> None:
    global _store
    _store = None


class _BoundTorchBackend(TorchBackend):
    def on_start(self, worker_group, backend_config: BoundTorchConfig) -> None:
        import ray
        backend = backend_config.backend or (
            "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo")
        n = len(worker_group)
        address, port = worker_group.execute_single(0, open_store, n, backend_config.timeout_s)
        if not isinstance(worker_group, V1WorkerGroup):  # V1 sets them in on_training_start
            worker_group.execute(set_torch_distributed_env_vars)  # LOCAL_RANK, RANK, WORLD_SIZE ...
        ray.get([worker_group.execute_single_async(i, join_process_group, backend, i, n, address, port,
                                                   backend_config.timeout_s, backend_config.socket_ifname)
                 for i in range(n)])

    def on_shutdown(self, worker_group, backend_config) -> None:
        super().on_shutdown(worker_group, backend_config)
        worker_group.execute(_drop_store)
