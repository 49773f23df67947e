"""The floor for `make bench`: an ext_authz server that allows every Check, nothing more.

Built like lastguard's own server (grpc.aio, default server options, the same
generated `lastguard.proto.envoy.service.auth.v3` code, one asyncio event loop
in one process), so lastguard / no-op measures what lastguard's own work costs
and nothing else: the gRPC transport, protobuf parsing of the CheckRequest and
the Python event loop are paid by both.

With `--http-listen` it also answers Envoy's HTTP ext_authz protocol, the floor
of lastguard's HTTP mode: an asyncio protocol that frames and parses each request
with lastguard's own `http_wire.parse_head` and answers a constant 200.

    python scripts/bench_noop.py --listen 127.0.0.1:0 [--http-listen 127.0.0.1:0]

Prints one JSON line `{"grpc": "127.0.0.1:PORT", "http": ...}` on stdout once it
listens (the same shape as lastguard's "listening" log line), then serves until
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
from lastguard.sidecar import http_wire

#: Built once: an allow with nothing to add or remove, what a cache hit costs at least.
_ALLOW = pb.CheckResponse(status=status_pb2.Status(code=0), ok_response=pb.OkHttpResponse())


class AllowEverything(pb_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(
        self,
        request: pb.CheckRequest,
        context: grpc.aio.ServicerContext[pb.CheckRequest, pb.CheckResponse],
    ) -> pb.CheckResponse:
        return _ALLOW


_HTTP_ALLOW = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


class AllowEverythingHttp(asyncio.Protocol):
    """Frames and parses each request the way lastguard does (`http_wire`), answers 200."""

    def __init__(self) -> None:
        self.framer = http_wire.Framer()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.framer.feed(data)
        while self.transport is not None:
            raw = self.framer.next_head()
            if raw is None:
                return
            head = http_wire.parse_head(raw)
            self.framer.skip_body(head.body_length)
            self.transport.write(_HTTP_ALLOW)


async def serve(listen: str, http_listen: str | None) -> None:
    server = grpc.aio.server()
    pb_grpc.add_AuthorizationServicer_to_server(AllowEverything(), server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    listening = {"grpc": f"{listen.rpartition(':')[0]}:{port}"}
    if http_listen:
        host, _, wanted = http_listen.rpartition(":")
        http = await asyncio.get_running_loop().create_server(
            AllowEverythingHttp, host, int(wanted), backlog=1024
        )
        listening["http"] = f"{host}:{http.sockets[0].getsockname()[1]}"
    print(json.dumps(listening), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="gRPC address (port 0: any)")
    parser.add_argument("--http-listen", default=None, help="also serve HTTP ext_authz here")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen, args.http_listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
