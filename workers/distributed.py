"""Where a worker stands in its job: rank, world size, and how to reach its peers.

This is the one module that knows rank, world size, the torch master address and
TF_CONFIG. The driver builds a `WorkerContext` per worker from the addresses the
workers reported, and trainers receive it as a plain typed object; they branch on
`world_size` only where the model is wrapped and unwrapped.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    # "host:port" of every worker, rank order; rank 0's is the torch master's address.
    peer_addresses: tuple[str, ...] = ()
    setup_timeout_s: float = 60.0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def master_address(self) -> str:
        return self.peer_addresses[0].rsplit(":", 1)[0]

    @property
    def master_port(self) -> int:
        return int(self.peer_addresses[0].rsplit(":", 1)[1])

    def tf_config(self) -> str:
        """TF_CONFIG for MultiWorkerMirroredStrategy: every worker's address and this one's index."""
        return json.dumps(
            {"cluster": {"worker": list(self.peer_addresses)}, "task": {"type": "worker", "index": self.rank}}
        )


SINGLE_WORKER = WorkerContext()


def reserve_address() -> str:
    """This node's address and a port free on it, for peers to reach this worker.

    The port is found by binding port 0 and releasing it, as Ray Train does; the short
    window in which another process could take it is accepted for a free choice of port.
    """
    import ray

    host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return f"{host}:{port}"
