"""The floor for `make bench`: an ext_authz gRPC server that allows every Check, nothing more.

Built like lastguard's own server (grpc.aio, default server options, the same
generated `lastguard.proto.envoy.service.auth.v3` code, one asyncio event loop
in one process), so lastguard / no-op measures what lastguard's own work costs
and nothing else: the gRPC transport, protobuf parsing of the CheckRequest and
the Python event loop are paid by both.

    python scripts/bench_noop.py --listen 127.0.0.1:0

Prints one JSON line `{"grpc": "127.0.0.1:PORT"}` on stdout once it listens
(the same shape as lastguard's "listening" log line), then serves until
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

import grpc

from lastguard.proto.envoy.service.auth.v3 import external_auth_pb2 as pb
from lastguard.proto.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from lastguard.proto.google.rpc import status_pb2

#: Built once: an allow with nothing to add or remove, what a cache hit costs at least.
_ALLOW = pb.CheckResponse(status=status_pb2.Status(code=0), ok_response=pb.OkHttpResponse())


class AllowEverything(pb_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(
        self,
        request: pb.CheckRequest,
        context: grpc.aio.ServicerContext[pb.CheckRequest, pb.CheckResponse],
    ) -> pb.CheckResponse:
        return _ALLOW


async def serve(listen: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_AuthorizationServicer_to_server(AllowEverything(), server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    print(json.dumps({"grpc": f"{listen.rpartition(':')[0]}:{port}"}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="gRPC address (port 0: any)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
