"""`python -m loramerge.server.healthcheck [ADDRESS] [SERVICE]`: exit 0 when the server at
ADDRESS (default 127.0.0.1:50051) reports SERVICE (default "": the whole server, engine
included) SERVING on grpc.health.v1, else 1. For container HEALTHCHECKs; Kubernetes uses its
native gRPC probes instead."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 5.0) -> bool:
    """True if `service` at `address` answers SERVING within `timeout` seconds."""
    with grpc.insecure_channel(address) as channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
                .status
            )
        except grpc.RpcError:
            return False
    return bool(status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    address = args[0] if args else "127.0.0.1:50051"
    service = args[1] if len(args) > 1 else ""
    return 0 if check(address, service) else 1


if __name__ == "__main__":
    sys.exit(main())
