"""Independent gRPC clients for the tests: grpcio (Google's C core), with stubs
generated from proto/stream.proto by grpcio-tools at test time, and grpclib
with the betterproto2 stub, each run in a thread of its own."""

from __future__ import annotations

import importlib
import queue
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import trio
from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent.parent / "proto"
_modules: tuple[ModuleType, ModuleType] | None = None


def grpcio_stubs() -> tuple[ModuleType, ModuleType]:
    """(stream_pb2, stream_pb2_grpc), generated once per test run."""
    global _modules
    if _modules is None:
        out = tempfile.mkdtemp(prefix="plasma-grpcio-")
        code = protoc.main(
            [
                "protoc",
                f"-I{PROTO_DIR}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                str(PROTO_DIR / "stream.proto"),
            ]
        )
        assert code == 0, "grpcio-tools failed to generate stubs"
        sys.path.insert(0, out)
        _modules = (
            importlib.import_module("stream_pb2"),
            importlib.import_module("stream_pb2_grpc"),
        )
    return _modules


_END = object()


class StreamEnded(Exception):
    """The server ended the stream cleanly (status OK)."""


class GrpcioStream:
    """One bidirectional Events stream over a grpcio channel."""

    def __init__(
        self,
        port: int,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        host: str = "127.0.0.1",
        metadata: list[tuple[str, str]] | None = None,
    ) -> None:
        self.pb2, pb2_grpc = grpcio_stubs()
        target = f"{host}:{port}"
        self.channel = (
            grpc.secure_channel(target, credentials)
            if credentials
            else grpc.insecure_channel(target)
        )
        self._requests: queue.Queue[Any] = queue.Queue()
        self.call = pb2_grpc.StreamServiceStub(self.channel).Events(
            iter(self._requests.get, None), metadata=metadata
        )

    def send(self, *topics: str, force_close: bool = False, last_event_id: str = "") -> None:
        self._requests.put(
            self.pb2.Request(
                events=[self.pb2.EventType(type=t) for t in topics],
                forceClose=force_close,
                lastEventId=last_event_id,
            )
        )

    async def receive(self) -> Any:
        """The next Payload; raises :class:`StreamEnded` at a clean end (status
        OK), grpc.RpcError on another status."""
        payload = await trio.to_thread.run_sync(next, self.call, _END, abandon_on_cancel=True)
        if payload is _END:
            raise StreamEnded
        return payload

    async def rest(self) -> tuple[list[Any], grpc.StatusCode]:
        """Everything until the stream ends, and its status."""

        def drain() -> tuple[list[Any], grpc.StatusCode]:
            got: list[Any] = []
            try:
                got.extend(self.call)
            except grpc.RpcError as exc:
                return got, exc.code()
            return got, self.call.code()

        return await trio.to_thread.run_sync(drain, abandon_on_cancel=True)

    def close(self) -> None:
        self.call.cancel()
        self._requests.put(None)
        self.channel.close()
