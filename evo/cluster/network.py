"""Network checks made before Ray is asked to connect: is something listening at the cluster
address, and is it a Ray GCS? ``ray.init`` retries a wrong address for minutes, deaf to
SIGINT/SIGTERM; these fail in one line within ``ray.connect_timeout_s``.

Also the host helpers the dashboard banner uses (loopback or not; a host as a URL writes it).
"""
from __future__ import annotations

import ipaddress
import socket

from evo.core.errors import EvoError


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail in one line when nothing listens at a ``host:port`` (or ``ray://host:port``) cluster
    address: ``ray.init`` itself retries a dead address for minutes. ``auto`` (read from the
    local node's files) is left to Ray."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise EvoError(f"ray.address: nothing answers at {address} within {timeout_s:g} s "
                       f"({exc.strerror or exc}); is the cluster up? (ray.connect_timeout_s)") from None
    if "://" not in address:  # host:port is a GCS; ray:// is Ray Client's server, another service
        check_gcs(address, timeout_s)


def check_gcs(address: str, timeout_s: float) -> None:
    """Ask the server at ``address`` what a Ray GCS answers first (``GetClusterId``, the call
    ``ray.init`` starts with). Something that accepts TCP but is not Ray (a web server, a proxy)
    made ``ray.init`` retry for minutes, deaf to SIGINT/SIGTERM; here it is one line within
    ``ray.connect_timeout_s``. A GCS that refuses the call for want of a token is still Ray."""
    import grpc  # Ray's own RPC library, installed with it

    channel = grpc.insecure_channel(address)
    try:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
        call(b"", timeout=timeout_s)  # an empty GetClusterIdRequest
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return
        why = {grpc.StatusCode.DEADLINE_EXCEEDED: f"no answer within {timeout_s:g} s",
               grpc.StatusCode.UNIMPLEMENTED: "it does not serve Ray's GCS calls"}.get(code, "not a gRPC server")
        raise EvoError(f"ray.address: {address} is not a Ray cluster's GCS ({why}); give the head node's "
                       "GCS address (host:6379 by default, as `ray start --head` prints)") from None
    finally:
        channel.close()


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP, bracketed or not) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
