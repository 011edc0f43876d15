"""Token authentication, decided per cluster from the cluster's own answer.

Ray 2.60 turns token authentication on by default for the clusters it starts, but not
for every cluster: a head started with RAY_AUTH_MODE=disabled (or by an older Ray)
takes no token. A client that presents a token to such a cluster breaks it quietly:
its tasks' workers die at once (ActorDiedError, OwnerDiedError) and nothing says why.
So whether a token exists on this machine (~/.ray/auth_token, left by any `ray start`)
does not decide anything. runjobs asks the cluster first, without a token: a cluster
that answers takes none; one that answers UNAUTHENTICATED (gRPC) or 401 (HTTP) wants
one, and the token this machine has is then tried before anything starts. A token
missing or refused is bad input (exit 2) naming the fix, not an unreachable cluster: a
scheduler must not retry it. RAY_AUTH_MODE set by the user is always respected.
"""

from __future__ import annotations

import os
from pathlib import Path

AUTH_MODE_VARIABLE = "RAY_AUTH_MODE"
TOKEN_VARIABLE = "RAY_AUTH_TOKEN"
TOKEN_PATH_VARIABLE = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_PATH = "~/.ray/auth_token"
PROBE_TIMEOUT_S = 10.0
FIX = (
    f"copy the head's {DEFAULT_TOKEN_PATH} to this machine, or set {TOKEN_VARIABLE} "
    f"(or {TOKEN_PATH_VARIABLE}) to the cluster's token"
)


class AuthenticationError(ValueError):
    """The cluster wants a token this machine does not have, or refuses the one it has."""


def choose_mode_for(address: str) -> str | None:
    """Set RAY_AUTH_MODE for this process from what the cluster at `address` answers.

    `address` is a GCS address (HOST:PORT), ray://HOST:PORT or an http(s) Jobs address.
    Returns the mode chosen ("token" or "disabled"), or None when the user set it.
    """
    if os.environ.get(AUTH_MODE_VARIABLE):
        return None
    if not wants_token(address, token=None):
        _set_mode("disabled")
        return "disabled"
    token, source = local_token()
    if token is None:
        raise AuthenticationError(
            f"the Ray cluster at {address} uses token authentication and this machine has no token; {FIX}"
        )
    if wants_token(address, token=token):
        raise AuthenticationError(f"the Ray cluster at {address} refuses the token from {source}; {FIX}")
    _set_mode("token")
    return "token"


def local_token() -> tuple[str | None, str]:
    """This machine's token and where it came from, in Ray's own order of lookup."""
    if os.environ.get(TOKEN_VARIABLE, "").strip():
        return os.environ[TOKEN_VARIABLE].strip(), TOKEN_VARIABLE
    path = Path(os.environ.get(TOKEN_PATH_VARIABLE) or DEFAULT_TOKEN_PATH).expanduser()
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None, str(path)
    return (text or None), str(path)


def wants_token(address: str, token: str | None) -> bool:
    """Whether the cluster refuses a request carrying `token` (None: no token) for want of one."""
    if address.startswith(("http://", "https://")):
        return _http_wants_token(address, token)
    return _grpc_wants_token(address, token)


def _grpc_wants_token(address: str, token: str | None) -> bool:
    """Ask the GCS (or Ray Client server) for the cluster id: UNAUTHENTICATED means a token is wanted.

    Any other answer, UNIMPLEMENTED from a Ray Client server included, means the request
    got past authentication.
    """
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    target = address.split("://", 1)[-1]
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(target) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=PROBE_TIMEOUT_S, metadata=metadata
            )
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


def _http_wants_token(address: str, token: str | None) -> bool:
    """Ask the Jobs API for its job list: 401 (no token) or 403 (a wrong one) means a token is wanted."""
    import urllib.error
    import urllib.request

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{address.rstrip('/')}/api/jobs/", headers=headers)
    try:
        urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError as error:
        return error.code in (401, 403)
    except OSError:
        return False  # not an answer about tokens: the connection's own checks report it
    return False


def _set_mode(mode: str) -> None:
    os.environ[AUTH_MODE_VARIABLE] = mode
    try:
        from ray._raylet import Config

        Config.initialize("")  # Ray caches its config; make it read RAY_AUTH_MODE again
    except (ImportError, AttributeError):
        pass
