"""Python memory per idle SSE connection, by allocation site (issue 23).

Runs the server in this process (mock source, fast path, the defaults), opens
N plain SSE connections of one topic from a thread, and compares two
``tracemalloc`` snapshots, before and after: what each idle stream holds,
grouped by the line that allocated it (the last frames of its traceback).
The RSS figure from outside the process is ``fanout.py``'s ``idle`` step;
this one says where it goes.

    python bench/idle_memory.py --connections 1000 --top 30
"""

from __future__ import annotations

import argparse
import gc
import socket
import tracemalloc

import trio

from plasma_trio.app import serve
from plasma_trio.config import Config


def connect(port: int, count: int) -> list[socket.socket]:
    head = b"GET /?eventType=idle HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n"
    out = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(head)
        out.append(sock)
    return out


def where(frame: tracemalloc.Frame) -> str:
    name = frame.filename
    for marker in ("site-packages/", "plasma_trio/", "python3."):
        if marker in name:
            name = name[name.index(marker) :].removeprefix("site-packages/")
            break
    return f"{name}:{frame.lineno}"


async def main(connections: int, top: int, depth: int) -> None:
    config = Config(
        port=0,
        grpc_port=0,
        metrics_port=0,
        pprof_port=0,
        subscriber_mock_interval=3600.0,
        access_log_out="discard",
        error_log_out="discard",
    )
    async with trio.open_nursery() as nursery:
        running = await nursery.start(serve, config)
        warm = await trio.to_thread.run_sync(connect, running.port, 50)
        await trio.sleep(1)
        gc.collect()
        tracemalloc.start(depth)
        before = tracemalloc.take_snapshot()
        held = await trio.to_thread.run_sync(connect, running.port, connections)
        await trio.sleep(2)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        stats = after.compare_to(before, "traceback")
        total = sum(s.size_diff for s in stats)
        print(f"{total / connections:.0f} bytes of Python allocations per idle SSE connection")
        print("| bytes | objects | allocated at (innermost first) |")
        print("|---|---|---|")
        for stat in stats[:top]:
            frames = list(stat.traceback)[-3:]
            chain = " <- ".join(where(f) for f in reversed(frames))
            print(
                f"| {stat.size_diff / connections:.0f} | {stat.count_diff / connections:.1f} "
                f"| {chain} |"
            )
        for sock in warm + held:
            sock.close()
        running.shutdown.set()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--top", type=int, default=30, help="allocation sites shown")
    ap.add_argument("--depth", type=int, default=25, help="traceback frames kept")
    args = ap.parse_args()
    trio.run(main, args.connections, args.top, args.depth)
