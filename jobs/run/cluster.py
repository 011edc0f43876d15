"""Connecting to Ray: an embedded local instance, or a running cluster by address.

`--address` (or RAY_ADDRESS) names a running cluster: `HOST:PORT` for its GCS (as
`ray start --head` prints), `ray://HOST:10001` for Ray Client, or `auto` for the
cluster started on this machine. Without either, runjobs starts an embedded local Ray
and shuts it down afterwards. Whether to present a token is the cluster's answer, not
this machine's files (jobs/run/authentication.py): a cluster with token authentication
needs its token (on the head's machine Ray reads ~/.ray/auth_token; elsewhere copy that
file there or set RAY_AUTH_TOKEN), a cluster without it gets none.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

from jobs.run.authentication import choose_mode_for

# How long to keep trying a cluster's port before giving up on it (a head that is
# still starting takes a few seconds to listen); RUNJOBS_CONNECT_TIMEOUT_S overrides it.
REACH_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_VARIABLE = "RUNJOBS_CONNECT_TIMEOUT_S"


class ClusterUnreachableError(RuntimeError):
    """No Ray cluster answers at the given address."""


class ResourceRequestError(ValueError):
    """The jobs ask for more than the cluster has."""


class ConnectionSettingError(ValueError):
    """An address or connection setting that cannot be read: bad input (exit 2), not a cluster to retry."""


@dataclass(frozen=True)
class ClusterInfo:
    address: str
    embedded: bool
    nodes: int
    cpus: float
    gpus: float
    largest_node_gpus: float
    # A running cluster this run connected to by address (not embedded, not a caller's own
    # connection): warm workers may outlive the run there (jobs/run/warm_pool.py).
    shared: bool = False

    def to_record(self) -> dict:
        return {
            "address": self.address,
            "embedded": self.embedded,
            "nodes": self.nodes,
            "cpus": self.cpus,
            "gpus": self.gpus,
        }


class BackgroundShutdown:
    """Ray's shutdown, run on a thread while the caller writes its reports.

    `ray.shutdown()` of an embedded Ray takes about 1.4 s here, 1 s of it waiting for the
    autoscaler monitor to exit after SIGTERM (ray/_private/node.py gives each process a
    second before SIGKILL). Nothing after the jobs needs Ray, so the caller overlaps it
    with its own work and waits for it at the end: nothing is left running.
    """

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.seconds: float | None = None

    def start(self) -> None:
        import ray

        def shut_down() -> None:
            started = time.perf_counter()
            ray.shutdown()
            self.seconds = time.perf_counter() - started

        self.thread = threading.Thread(target=shut_down, name="runjobs-ray-shutdown")
        self.thread.start()

    def wait(self) -> float | None:
        """Until Ray is down; how long its shutdown took (None when this run shut nothing down)."""
        if self.thread is not None:
            self.thread.join()
        return self.seconds


@contextmanager
def connected(
    address: str | None, shutdown: BackgroundShutdown | None = None, wait_for_nodes: int | None = None
) -> Iterator[ClusterInfo]:
    """Connect for the duration of the block; shut down only what this call started.

    With `shutdown`, the shutdown starts on a thread as the block ends; the caller waits.
    With `wait_for_nodes`, the block starts once the cluster has that many nodes alive.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "auto" and not address.startswith(("http://", "https://")):
        split_address(address)  # a malformed address is bad input even where Ray is already connected
    already = sys.modules.get("ray")
    if already is not None and already.is_initialized():
        # A caller (a test session, a notebook) already owns a connection: use it as is.
        yield describe_cluster(embedded=False)
        return
    if address:
        if address.startswith(("http://", "https://")):
            raise ClusterUnreachableError(
                f"{address} is a Ray Jobs (dashboard) address; pass the cluster's GCS address "
                "(HOST:6379), ray://HOST:10001 or auto"
            )
        if address != "auto":
            wait_until_reachable(address)
    import ray

    if address:
        gcs_address = address if address != "auto" else _local_cluster_address()
        if gcs_address is not None:
            choose_mode_for(gcs_address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ClusterUnreachableError(
                f"cannot connect to the Ray cluster at {address}: {_first_line(error)}; if the cluster "
                "uses token authentication, give its token in RAY_AUTH_TOKEN or ~/.ray/auth_token"
            ) from None
    else:
        # Workers' output goes to Ray's log files; the driver prints its own summary.
        # ERROR keeps Ray's notice that a local instance uses token auth off every run.
        # address="local" starts a new instance even where `ray start` left one running
        # (a bare ray.init() would join that one instead).
        with _lean_local_node():
            ray.init(
                address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR
            )
    previous_handler = _stop_on_sigterm()
    failed = True
    try:
        if wait_for_nodes:
            wait_for_alive_nodes(address or "local", wait_for_nodes, connect_timeout_s())
        yield describe_cluster(embedded=not address, shared=bool(address))
        failed = False
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        # After an error, shut down at once: the caller will not wait for a thread.
        if shutdown is not None and not failed:
            shutdown.start()
        else:
            ray.shutdown()


@contextmanager
def _lean_local_node() -> Iterator[None]:
    """Start the embedded node with only what a run uses: no API server (dashboard head),
    no autoscaler monitor, no log monitor, and its dashboard agent on a free port.

    An embedded run reads none of the API server's endpoints (dashboard, Jobs, state API),
    yet ray.init waits for its URL (about 1.4 s here) before it starts the raylet, and its
    import of Ray competes with the agents' for the CPU: without it an embedded run starts
    about 3 s sooner on 2 cores. A one-node embedded Ray never autoscales, and with
    log_to_driver=False nothing reads what the log monitor publishes; the monitor alone
    also holds ray.shutdown() for its 1 s SIGTERM grace. The dashboard agent's HTTP port
    (52365 by default) is taken when another Ray runs on this machine, and the agent then
    retries for about 3.4 s before the raylet registers. ray.init has no option for any of
    this, so Ray's RayParams and Node are adjusted for this one call; a Ray without these
    internals starts its usual processes.
    """
    try:
        from ray._private.node import Node
        from ray._private.parameter import RayParams
    except ImportError:
        yield
        return
    original_parameters = RayParams.__init__
    original_api_server = getattr(Node, "start_api_server", None)

    def lean_parameters(self, *args, **kwargs):
        original_parameters(self, *args, **kwargs)
        self.no_monitor = True
        self.include_log_monitor = False
        self.dashboard_agent_listen_port = 0

    def no_api_server(self, *args, **kwargs):
        self._webui_url = None

    RayParams.__init__ = lean_parameters
    if original_api_server is not None:
        Node.start_api_server = no_api_server
    try:
        yield
    finally:
        RayParams.__init__ = original_parameters
        if original_api_server is not None:
            Node.start_api_server = original_api_server


def _stop_on_sigterm():
    """Make SIGTERM (Slurm's scancel, `ray job stop`, a container's stop) stop the run like Ctrl-C.

    ray.init installs a SIGTERM handler that calls sys.exit, which would skip recording
    the running jobs as cancelled. Returns the handler it replaced, or None off the main
    thread (where signals cannot be handled).
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _local_cluster_address() -> str | None:
    """The GCS address `auto` stands for (the last `ray start` here), or None when none is found."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address("auto")
    except Exception:  # no cluster found, in one of several ways: ray.init says which
        return None


def wait_until_reachable(address: str, timeout_s: float | None = None) -> None:
    """Fail fast, with the address in the message, when nothing listens there."""
    if timeout_s is None:
        timeout_s = connect_timeout_s()
    host, port = split_address(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise ClusterUnreachableError(
                    f"no Ray cluster answers at {address} ({error.strerror or error}); "
                    "start one with `ray start --head` or check --address / RAY_ADDRESS"
                ) from None
            time.sleep(0.5)


def connect_timeout_s() -> float:
    """Seconds to keep trying an address: RUNJOBS_CONNECT_TIMEOUT_S, or REACH_TIMEOUT_S when unset."""
    text = os.environ.get(CONNECT_TIMEOUT_VARIABLE, "").strip()
    if not text:
        return REACH_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConnectionSettingError(
            f"{CONNECT_TIMEOUT_VARIABLE}={text!r}: give a number of seconds > 0, e.g. 30 "
            f"(unset it for the default, {REACH_TIMEOUT_S:g})"
        )
    return seconds


def split_address(address: str) -> tuple[str, int]:
    """HOST and PORT of `address`; one that cannot be read is a ConnectionSettingError (bad input)."""
    text = address if "://" in address else f"gcs://{address}"
    try:
        parts = urlsplit(text)
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number, or out of range
        host = port = None
    if not host or not port:
        raise ConnectionSettingError(
            f"cannot read {address!r} as a Ray address; use HOST:PORT, ray://HOST:PORT, "
            "http://HEAD:8265 or auto"
        )
    return host, port


def wait_for_alive_nodes(address: str, wanted: int, timeout_s: float) -> None:
    """Return once `wanted` nodes are alive; ClusterUnreachableError (exit 3) after `timeout_s`.

    A batch allocation starts its head first and its other nodes' raylets as their steps
    start: submitting before they join would pack every job onto the nodes already there.
    """
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        alive = [node for node in ray.nodes() if node.get("Alive")]
        if len(alive) >= wanted:
            return
        if time.monotonic() >= deadline:
            joined = ", ".join(sorted(node.get("NodeManagerAddress", "?") for node in alive)) or "none"
            raise ClusterUnreachableError(
                f"{len(alive)} of {wanted} node(s) joined the cluster at {address} within {timeout_s:g}s "
                f"(alive: {joined}); check the missing nodes' `ray start`, "
                f"or raise {CONNECT_TIMEOUT_VARIABLE}"
            )
        time.sleep(0.25)


def describe_cluster(embedded: bool, shared: bool = False) -> ClusterInfo:
    import ray

    alive = [node for node in ray.nodes() if node.get("Alive")]
    resources = ray.cluster_resources()
    return ClusterInfo(
        address=ray.get_runtime_context().gcs_address,
        embedded=embedded,
        nodes=len(alive),
        cpus=float(resources.get("CPU", 0.0)),
        gpus=float(resources.get("GPU", 0.0)),
        largest_node_gpus=max((float(node["Resources"].get("GPU", 0.0)) for node in alive), default=0.0),
        shared=shared,
    )


def check_fits(spec, cluster: ClusterInfo) -> None:
    """Refuse, before anything starts, a job no placement on the cluster can hold.

    A single or mirrored job is one task, so its GPUs must be on one node. A multiworker
    or ddp job takes one CPU and gpus_per_job / workers GPUs per worker, anywhere.
    """
    gpus = spec.gpus_per_job or 0.0
    where = (
        f"the cluster at {cluster.address} "
        f"({cluster.nodes} node(s), {cluster.cpus:g} CPU, {cluster.gpus:g} GPU)"
    )
    if spec.runs_one_task:
        if gpus > cluster.largest_node_gpus:
            raise ResourceRequestError(
                f"each {spec.variant} job asks for {gpus:g} GPU(s) on one node but the largest node of "
                f"{where} has {cluster.largest_node_gpus:g}; pass --gpus-per-job "
                f"{cluster.largest_node_gpus:g} or fewer"
            )
        return
    if spec.workers > cluster.cpus:
        raise ResourceRequestError(
            f"a {spec.workers}-worker {spec.variant} job needs {spec.workers} CPU(s), one a worker, but "
            f"{where} has {cluster.cpus:g}; pass --workers {int(cluster.cpus)} or fewer"
        )
    if gpus > cluster.gpus:
        raise ResourceRequestError(
            f"a {spec.workers}-worker {spec.variant} job asks for {gpus:g} GPU(s) but {where} has "
            f"{cluster.gpus:g}; pass fewer --workers or --gpus-per-job"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
