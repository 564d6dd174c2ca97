"""A gRPC server the project did not write: grpcio (grpc-core, as the C++,
Ruby and PHP servers use) with the standard health service from PyPI and
lab-app's Echo. Saying "unhealthy" turns its health to NOT_SERVING; saying
"whoami" answers with the caller identity its sidecar passed on (the
x-forwarded-client-cert header, from the mTLS hop), or "none".

  grpc_server.py PORT NAME     prints "listening on 127.0.0.1:PORT" once up
"""
import sys
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lab_echo import decode, encode


def main():
    port, name = int(sys.argv[1]), sys.argv[2]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)

    def say(request, context):
        if request.get(1) == "unhealthy":
            checker.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        if request.get(1) == "whoami":
            meta = dict(context.invocation_metadata())
            return {1: meta.get("x-forwarded-client-cert", "none"), 2: name}
        return {1: request.get(1, ""), 2: name}

    echo = grpc.method_handlers_generic_handler(
        "wayfinder.lab.v1.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(
                say, request_deserializer=decode, response_serializer=encode
            )
        },
    )
    server.add_generic_rpc_handlers((echo,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"listening on 127.0.0.1:{bound}", file=sys.stderr, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
