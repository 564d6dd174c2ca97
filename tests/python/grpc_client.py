"""A gRPC client the project did not write: grpcio (grpc-core) and its
health stub from PyPI. Used by tests/tests/grpc_interop.rs.

  grpc_client.py TARGET check [SERVICE]   print the health status
  grpc_client.py TARGET say MESSAGE       print the instance that answered
  grpc_client.py TARGET watch SERVICE N   print each status as it streams in, N of them
"""
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lab_echo import decode, encode


def main():
    target, command = sys.argv[1], sys.argv[2]
    channel = grpc.insecure_channel(target)
    health = health_pb2_grpc.HealthStub(channel)
    if command == "check":
        service = sys.argv[3] if len(sys.argv) > 3 else ""
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    elif command == "say":
        say = channel.unary_unary(
            "/wayfinder.lab.v1.Echo/Say",
            request_serializer=lambda fields: encode(fields),
            response_deserializer=decode,
        )
        reply = say({1: sys.argv[3]}, timeout=10)
        print(f"{reply.get(1, '')} {reply.get(2, '')}")
    elif command == "watch":
        service, want = sys.argv[3], int(sys.argv[4])
        stream = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=30)
        for n, reply in enumerate(stream, 1):
            print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status), flush=True)
            if n == want:
                stream.cancel()
                break
    else:
        sys.exit(f"unknown command {command!r}")


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as e:
        sys.exit(f"rpc failed: {e.code()} {e.details()}")
