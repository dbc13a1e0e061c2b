#!/usr/bin/env python3
"""Benchmarks of wsmanager against websockets (the reference) and a raw-TCP ceiling.

Usage::

    python bench_wsmanager.py                     # every scenario but soak, 3 repetitions (~5-10 min)
    python bench_wsmanager.py s1 s2 --repeat 5    # some scenarios
    python bench_wsmanager.py --quick             # smoke run: every scenario about 10x smaller
    python bench_wsmanager.py soak --seconds 60   # stability: fds and RSS of a server under churn
    python bench_wsmanager.py s2 --profile prof/  # also cProfile each wsmanager server process

Needs ``websockets`` and ``picows`` (``pip install -e '.[bench]'``), Linux
(/proc, sched_setaffinity) and nothing but loopback (127.0.0.1).

Implementations
---------------
wsmanager   ``WebSocketManager.listen()`` with a ``WebSocket`` subclass that
            echoes (``self.send(message)``) or broadcasts (``manager.broadcast``).
websockets  ``websockets.asyncio.server.serve`` on the default asyncio loop: the
            reference. ``compression=None`` (wsmanager has no permessage-deflate)
            and ``ping_interval=None`` (wsmanager's heartbeat is off by default).
ceiling     a raw TCP server over ``selectors`` in pure Python that frames
            messages with a 4-byte length prefix instead of WebSocket frames and
            has no handshake: about the best any pure-Python selectors server can
            do. Its "handshake" is a TCP connect plus one 5-byte round trip.

Scenarios
---------
s1     latency: 1 connection, 3,000 sequential round trips of a 32 B text
       message; round trips/s.
s2     small messages: 50 connections each keeping 16 text messages of 64 B in
       flight, 2,000 round trips per connection; messages/s.
s2node S2 with a second load generator: node's ``ws`` with ``bufferutil`` (native
       masking), installed by npm into ~/.cache/wsmanager-bench on first use; only
       when ``node`` and ``npm`` are on PATH. No ceiling (it speaks no WebSocket).
s3     large messages: 4 connections each keeping 2 binary messages of 256 KiB
       in flight, 100 round trips per connection; MB/s of payload echoed back
       (1 MB = 10**6 bytes). Every server accepts 4 MiB messages.
s4     connections: 5,000 idle connections opened 64 at a time; the server's
       RSS growth per connection (VmRSS from /proc/<pid>/status, before and
       after) and handshakes/s. Opened by a lean selectors client (see below).
s5     broadcast: 2,000 clients; one of them sends "go" 100 times, back to
       back, and for each the server broadcasts a 64 B text message to all
       (``manager.broadcast``, ``websockets.broadcast``); deliveries/s until
       all 200,000 have arrived. A server may coalesce broadcasts that come in
       the same loop turn into one write per connection (wsmanager and the
       ceiling queue, then flush; websockets writes every frame at once).
s6     client side (ws4py's documented use): one process opens 2,000 client
       connections one after the other with ``wsmanager.connect()`` +
       ``manager.add()`` (websockets: ``await websockets.asyncio.client.connect()``;
       ceiling: blocking sockets in a selector) against a picows echo server
       (ceiling: the raw server); connections/s and the client's RSS growth
       per connection, measured after one echo on every connection. ws4py
       (when installed, ``bench`` extra) in the same run: ``connect()`` then
       its ``WebSocketManager``, its documented client use. "floor": a raw
       blocking socket per connection (no timeout, no name resolution, no
       socket option) that sends the same opening request (precomputed) and
       reads up to the end of the 101, nothing more, against the same server:
       what any one-by-one blocking client can reach there.
s6c    client side, concurrent: 2,000 ``manager.connect()`` calls in
       a loop, every TCP connect and handshake running in the loop at once,
       timed until all have opened (websockets: 2,000 ``connect()`` tasks
       gathered). ws4py has no non-blocking connect.
codec  in-process, best of 3 runs per repetition: ``FrameParser`` over
       100,000 masked 16 B frames (frames/s) and 64 masked 1 MiB frames (MB/s),
       fed in 64 KiB chunks, against websockets' own parser (``Frame.parse``
       over a ``StreamReader``) with its C ``apply_mask`` and with its
       pure-Python fallback (``websockets.utils.apply_mask``), and against
       wsproto's ``FrameProtocol`` (pure Python); wsmanager as installed (with
       its accelerator when importable: websockets' C ``speedups.apply_mask``,
       else wsaccel) and with its masking forced to pure Python;
       ``apply_mask`` in MB/s on 1 MiB and in ns per call on 64 B; then the
       candidate accelerators alone on 1 MiB and 64 KiB (websockets C,
       wsaccel, numpy XOR by 64-bit words, pure Python).
import ``python -I -S -X importtime -c "import wsmanager"``, cumulative ms,
       against the standard-library modules wsmanager needs (its floor), and
       the self time of the module (its own body, without what it imports);
       with ``--baseline DIR``, that of DIR/wsmanager.py too (e.g. main's), interleaved.
zparams  in-process: zlib at level 6 with a full flush per message (the
       shared compressor of permessage-deflate without context takeover) for
       every window (9-15 bits) and memLevel (1-9): CPU ms per 128 KiB JSON
       message, CPU us per 131 B message, compressed sizes, and the KiB a
       compressor holds (tracemalloc); how the ``mem_level`` default was chosen.
S3 also runs a wsmanager server whose masking is forced to pure Python
("wsmanager-pure") and prints what the pure ``apply_mask`` alone does on the
server's CPU (64 KiB pieces): the bound of a pure-Python S3.

Every figure comes with the CPU shares of both sides; a figure whose load
generator (s6: the echo server) used 90% of a CPU or more is marked ">=": a
lower bound. "per CPU-second" tables divide by the CPU of the side under test.
idle   10,000 idle connections for 10 s: CPU time of the server process
       (wsmanager: its loop thread; the main thread waits on a pipe) over wall
       time, in percent.
z2 z3 z5  S2, S3 and S5 with permessage-deflate on both sides:
       wsmanager with ``compression="deflate"`` against websockets with its
       default compression (12-bit windows, memLevel 5); no ceiling. Same
       payloads as S2/S3/S5 (highly compressible). The load generator is
       picows' websockets-compatible client (``picows.websockets``, which
       negotiates permessage-deflate), one task per message sent.
zmem1k zmem10k  1,000 and 10,000 connections opened like S4 but offering
       ``permessage-deflate; client_max_window_bits`` (as browsers do); the
       server's RSS growth per connection idle, then after one compressed
       message echoed on every connection (the server keeps the client's
       inflate context; its own compressor is shared or per connection,
       depending on the implementation). zmemctx10k: wsmanager alone, with
       ``Deflate(server_no_context_takeover=False, client_no_context_takeover=False)``
       (the server keeps the client's 12-bit inflate context).
z5ctx  Z5 with that setting, wsmanager alone: each broadcast is compressed
       once per connection instead of once for all (the gain of sharing).
scale  ``scale`` (only when named; needs redis-server for its second part):
       publish to 2,000 subscribers, raw sockets in this process, served by
       ``wsmanager.Supervisor`` with 1 and then 2 worker processes
       (SO_REUSEPORT), interleaved per repetition: each worker publishes 500
       messages of 64 B to its subscribers; deliveries/s from the "go" until
       every byte has arrived, and the 2-worker / 1-worker ratio (also per
       CPU-second of the workers). Then the latency a Redis hop adds: two
       chat servers (``python -m wsmanager serve --redis``) and a redis-server
       on loopback; 1,000 messages one at a time sent to server A: the
       arrival back at the sender (local publish) vs. at a client of server B
       (through Redis), p50 and p99 of each and of their difference.
loadcheck  (only when named) ``python -m wsmanager load`` in S2's shape (``--clients 50
       --in-flight 16 --size 64 --text``, 10,000 messages each) against ``python
       -m wsmanager serve``'s /echo, after an S2 trial of wsmanager, per repetition:
       the load process's CPU (all of it, start-up included) against the
       server's over the same run (must be < 1x), and its messages per server
       CPU-second against S2's (must be within 20 %); then the full-size run,
       2,000 clients x 100 messages, its report and both CPUs.
soak   ``soak --seconds N``: one wsmanager server process; 16 client workers
       connect, exchange 1-20 echoed messages of 1 B-70 KB, then close, vanish,
       or have the server close (plus a few half-sent handshakes and protocol
       violations), at most 500 new connections/s, for N seconds. Prints
       connections, messages and errors, and the server's fd count and RSS at
       start, after warm-up and at the end. With N=60 the fd count must come
       back to its start value and RSS stay within a small band after warm-up.

Methodology
-----------
* Every implementation runs in the same invocation, interleaved: for each
  repetition (``--repeat``, default 3) wsmanager, websockets, ceiling, then
  again. Tables show medians; ratios are wsmanager's median divided by the
  other's (for "lower is better" metrics a ratio < 1 favours wsmanager).
* Server and load generator are separate processes, each started fresh for
  every trial (multiprocessing, spawn) and pinned to its own core (server:
  the first allowed CPU, generator: the second) when there are two.
  RLIMIT_NOFILE is raised to its hard limit in every process.
* The load generator is picows (Cython) on asyncio for WebSocket servers, and
  a small asyncio length-prefix client for the ceiling; s4 and idle open
  their connections with a leaner selectors client (a real handshake each,
  101 and Sec-WebSocket-Accept checked) so that the generator does not set
  the pace of handshakes. Next to each result the generator's CPU share (its
  CPU seconds / wall seconds over the timed interval) and the server's are
  printed, each with "+N% waiting": the time it was runnable but had no CPU
  (schedstat), i.e. CPU taken by other processes of the machine. A side
  whose CPU + wait is near 100% was the bottleneck (a starved one if the wait
  is large); a generator at 100% CPU means the generator set the pace.
* Rates depend on how much CPU the machine's other processes leave, so a
  second table divides each rate by the CPU share of the side under test
  (the server; s6: the client): work per CPU-second.
* Every timed interval follows a warm-up (connections open, one round trip
  each). Connections are opened by 64 concurrent workers. All loops are
  bounded in count and in time; each trial has a deadline after which its
  processes are killed. Every process started is stopped (terminated, then
  killed, if it does not exit) before the next trial.

Targets (the "met?" column)
---------------------------
S1 >= 1.3x websockets.  S2 >= 3x websockets and >= 0.5x ceiling.
S3 >= 0.9x websockets (with an accelerator installed).  S4 <= 3 KiB server
RSS per connection and handshakes/s >= 1.5x websockets.  S5 >= 2x websockets.
S6 <= 3 KiB client RSS per connection and connections/s >= 3x websockets and
>= 1.2x ws4py.  FrameParser 16 B >= 1.5x websockets with C speedups.
FrameParser 1 MiB masked >= 1x websockets with C speedups (with an accelerator
installed) and >= 2x websockets pure Python.  Import: <= 15 ms cumulative,
<= 3 ms self time.  Idle: 10k connections use <= 1% of a core.

The exit status is 0 when every trial ran (whether targets are met or not:
read the table), 1 when a trial failed or the soak found a leak or errors.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import collections
import contextlib
import cProfile
import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import pstats
import queue
import random
import resource
import selectors
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import textwrap
import threading
import time
import timeit
import tracemalloc
import traceback
import zlib
from typing import Any, Callable, Dict, List, Optional, Sequence

import wsmanager

try:
    import websockets
    import websockets.frames
    import websockets.streams
    import websockets.utils
    from websockets.asyncio.client import connect as websockets_connect
    from websockets.asyncio.server import broadcast as websockets_broadcast
    from websockets.asyncio.server import serve as websockets_serve
except ImportError:  # reported by main()
    websockets = None

try:
    from picows.websockets.asyncio.client import connect as picows_websockets_connect
except ImportError:  # an older picows: the compressed scenarios report the failure
    picows_websockets_connect = None

try:
    from websockets.speedups import apply_mask as websockets_c_apply_mask
except ImportError:
    websockets_c_apply_mask = None

# What wsmanager masks large payloads with here (looked up the way it does on its first large frame).
_accelerator = wsmanager._find_mask_accelerator()
MASK_ACCELERATOR = (None if _accelerator is None else
                    "websockets C" if _accelerator is websockets_c_apply_mask else "wsaccel")

try:
    import wsproto.frame_protocol as wsproto_frames
except ImportError:
    wsproto_frames = None

try:  # ws4py, the system wsmanager replaces: S6 only (its documented use is the client side)
    import ws4py
    from ws4py.client import WebSocketBaseClient as Ws4pyClient
    from ws4py.manager import WebSocketManager as Ws4pyManager
except ImportError:
    ws4py = None

try:
    import picows
    from picows import WSCloseCode, WSListener, WSMsgType, ws_connect, ws_create_server
except ImportError:  # reported by main()
    picows = None
    WSListener = object

HOST = "127.0.0.1"
BACKLOG = 4096
MAX_MESSAGE = 4 * 2 ** 20  # every server accepts messages this large (S3 sends 256 KiB)
READ_CHUNK = 64 * 1024
BROADCAST_MESSAGE = "b" * 64  # what every server broadcasts in s5
CONNECT_TIMEOUT = 15.0
BEST_OF = 3  # codec: every repetition keeps the best of this many runs (timeit's advice), then medians
IMPLEMENTATIONS = ("wsmanager", "websockets", "ceiling")
# Also run in some scenarios: ws4py (S6), wsmanager with its masking forced to pure Python (S3).
EXTRA_IMPLEMENTATIONS = ("ws4py", "floor", "floor-loop", "connect-only", "wsmanager-pure")
SATURATED = 0.9  # a load generator using this share of a CPU or more limits the figure: a lower bound
# What a browser offers; answered with 12-bit client windows by both servers' defaults.
BROWSER_DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
ZMEM_MESSAGE = ('{"type": "chat", "user": "alice", "room": "general", "text": "hello everyone, '
                'how is the benchmark going today?", "ts": 1700000000}').encode()


###############################################################################
# Parameters ##################################################################
###############################################################################

@dataclasses.dataclass(frozen=True)
class Params:
    """Sizes of every scenario; ``--quick`` divides the counts by about 10."""

    s1_round_trips: int = 3000
    s1_size: int = 32
    s2_connections: int = 50
    s2_in_flight: int = 16
    s2_size: int = 64
    s2_per_connection: int = 2000
    s3_connections: int = 4
    s3_in_flight: int = 2
    s3_size: int = 256 * 1024
    s3_per_connection: int = 100
    s4_connections: int = 5000
    s5_clients: int = 2000
    s5_broadcasts: int = 100
    s6_connections: int = 2000
    codec_small_frames: int = 100_000
    codec_big_frames: int = 64
    idle_connections: int = 10_000
    idle_seconds: float = 10.0
    zmem_small: int = 1000
    zmem_large: int = 10_000
    connect_concurrency: int = 64
    trial_timeout: float = 180.0  # a trial still running then is killed and counted as failed
    soak_seconds: float = 60.0
    soak_workers: int = 16
    soak_rate: float = 500.0  # new connections per second, all workers together
    soak_max_rounds: int = 1_000_000  # per worker: the loop is bounded in count as well as in time
    scale_subscribers: int = 2000
    scale_messages: int = 500  # per worker and round: 2,000 x 500 = 1,000,000 deliveries
    scale_latency_samples: int = 1000
    loadcheck_per_connection: int = 10_000  # S2's shape, 5x as long: the load process's start-up counts too

    def quick(self) -> "Params":
        return dataclasses.replace(
            self, s1_round_trips=300, s2_per_connection=200, s3_per_connection=10, s4_connections=500,
            s5_clients=200, s5_broadcasts=10, s6_connections=200, codec_small_frames=10_000,
            codec_big_frames=8, idle_connections=1000, idle_seconds=2.0, zmem_small=100, zmem_large=1000,
            trial_timeout=60.0, scale_subscribers=200, scale_messages=50, scale_latency_samples=200,
            loadcheck_per_connection=1000)


###############################################################################
# Process plumbing: /proc readings, pinning, children ##########################
###############################################################################

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: Any = "self") -> int:
    """Resident set size of a process (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_and_wait(pid: Any = "self") -> "tuple[float, float]":
    """Seconds a process's threads ran, and spent runnable but waiting for a CPU.

    From /proc/<pid>/task/*/schedstat (ns). The wait is the CPU that other
    processes took: a process with little CPU and a large wait was starved,
    not idle. Without schedstat: CPU from /proc/<pid>/stat, wait unknown (0).
    """
    ran = waited = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
                    fields = stat.read().split()
                ran += int(fields[0])
                waited += int(fields[1])
            except (OSError, ValueError, IndexError):
                pass  # a thread that just ended
    except OSError:
        pass
    if ran:
        return ran / 1e9, waited / 1e9
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, 0.0


def fd_count(pid: Any = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_growth(before: int, after: int, connections: int) -> "tuple[float, str]":
    """RSS growth in KiB per connection, and "before -> after" in MiB."""
    return (after - before) / max(connections, 1) / 1024, f"{before / 2**20:.1f} -> {after / 2**20:.1f}"


def choose_cpus() -> Dict[str, Optional[int]]:
    """Server on the first allowed CPU, load generator on the second (no pinning on one CPU)."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return {"server": None, "generator": None}
    return {"server": allowed[0], "generator": allowed[1]}


CPUS = choose_cpus()


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


_SPAWN = multiprocessing.get_context("spawn")
_children: "set[Child]" = set()


def _child_entry(target: Callable[..., None], conn: Any, cpu: Optional[int], args: tuple) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    raise_fd_limit()
    try:
        target(conn, *args)
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        raise


class Child:
    """A fresh process running ``target(conn, *args)``, with a pipe to talk to it."""

    def __init__(self, target: Callable[..., None], *args: Any, cpu: Optional[int]):
        self.conn, child_conn = _SPAWN.Pipe()
        self.process = _SPAWN.Process(target=_child_entry, args=(target, child_conn, cpu, args), daemon=True)
        self.process.start()
        child_conn.close()
        _children.add(self)

    @property
    def pid(self) -> int:
        return self.process.pid

    def receive(self, kind: str, timeout: float) -> Any:
        """The payload of the next message, which must be of ``kind``."""
        if not self.conn.poll(timeout):
            raise TimeoutError(f"no {kind!r} from process {self.pid} within {timeout:.0f} s")
        try:
            tag, payload = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"process {self.pid} died (exit code {self.process.exitcode})") from None
        if tag == "error":
            raise RuntimeError(f"process {self.pid} failed:\n{payload}")
        if tag != kind:
            raise RuntimeError(f"expected {kind!r} from process {self.pid}, got {tag!r}")
        return payload

    def ask(self, command: str, timeout: float = 10.0) -> Any:
        self.conn.send(command)
        return self.receive(command, timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """Ask it to stop, then terminate, then kill: it is gone when this returns."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send("stop")
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(3)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(3)
        self.conn.close()
        _children.discard(self)


@atexit.register
def _stop_all_children() -> None:
    for child in list(_children):
        child.stop(timeout=2)


def exit_process() -> None:
    """End an asyncio server process at once: the kernel closes its sockets.

    Skips the close handshakes of thousands of connections (and the
    cancellation of their tasks), which no result depends on.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


###############################################################################
# Servers (each in its own process) ############################################
###############################################################################

def server_main(conn: Any, impl: str, mode: str, profile_path: Optional[str] = None) -> None:
    """Serve ``mode`` ("echo", "broadcast" or "soak") with ``impl``; send ("ready", port); obey the pipe."""
    if impl == "wsmanager":
        serve_wsmanager(conn, mode, profile_path)
    elif impl == "wsmanager-pure":
        # The standard-library masking path, accelerator or not.
        wsmanager._large_mask, wsmanager._small_mask = wsmanager._translate_mask, None
        serve_wsmanager(conn, mode, profile_path)
    elif impl == "websockets":
        asyncio.run(serve_websockets(conn, mode))
    elif impl == "picows":
        asyncio.run(serve_picows(conn))
    elif impl == "ceiling":
        serve_ceiling(conn, mode)
    else:
        raise ValueError(impl)


def obey(conn: Any, stats: Callable[[], dict] = dict) -> bool:
    """Read one command of the parent and answer it; False once it says "stop" (or has gone away)."""
    try:
        command = conn.recv()
    except (EOFError, OSError):
        return False
    if command == "stats":
        conn.send(("stats", stats()))
    return command != "stop"


def serve_control(conn: Any, stats: Callable[[], dict] = dict) -> None:
    """Answer the parent's commands until it says "stop" (or goes away)."""
    while obey(conn, stats):
        pass


async def serve_control_async(conn: Any, stats: Callable[[], dict] = dict) -> None:
    """serve_control() for an asyncio server: the pipe is one more reader of the loop."""
    loop = asyncio.get_running_loop()
    stopped = loop.create_future()

    def on_command() -> None:
        if not obey(conn, stats) and not stopped.done():
            stopped.set_result(None)

    loop.add_reader(conn.fileno(), on_command)
    try:
        await stopped
    finally:
        loop.remove_reader(conn.fileno())


async def serve_until_stopped(conn: Any, port: int) -> None:
    """An asyncio server process: send ("ready", port), answer the parent until "stop", then exit at once."""
    conn.send(("ready", port))
    await serve_control_async(conn)
    exit_process()


def split_mode(mode: str) -> "tuple[str, Optional[str]]":
    """"echo+deflate" -> ("echo", "deflate"): what the server does, and its compression."""
    base, _, compression = mode.partition("+")
    return base, compression or None


def serve_wsmanager(conn: Any, mode: str, profile_path: Optional[str]) -> None:
    mode, compression = split_mode(mode)
    settings: Any = compression
    if compression == "deflate-context":  # both sides keep their context (12-bit client window)
        settings = wsmanager.Deflate(server_no_context_takeover=False, client_no_context_takeover=False)
    manager = wsmanager.WebSocketManager(max_message_size=MAX_MESSAGE, compression=settings)
    counts: collections.Counter = collections.Counter()

    class Echo(wsmanager.WebSocket):
        def received_message(self, message):
            self.send(message)

    class Broadcast(wsmanager.WebSocket):
        def received_message(self, message):
            manager.broadcast(BROADCAST_MESSAGE)

    class SoakEcho(wsmanager.WebSocket):
        """Echo that counts, and closes from the server side when asked to."""

        def opened(self):
            counts["opened"] += 1

        def received_message(self, message):
            counts["messages"] += 1
            if message == "close-me":
                self.close(wsmanager.CloseCode.NORMAL, "asked to")
            else:
                self.send(message)

        def closed(self, code, reason):
            counts["closed"] += 1
            counts[f"closed with {code}"] += 1

    factory = {"echo": Echo, "broadcast": Broadcast, "soak": SoakEcho}[mode]
    _, port = manager.listen((HOST, 0), factory, backlog=BACKLOG)

    def stats() -> dict:
        # Internal queues peeked at on purpose (a leak shows there first); "?" if they were renamed.
        internals = {name: len(getattr(manager, f"_{name}", None) or ()) if hasattr(manager, f"_{name}") else "?"
                     for name in ("handshakes", "timers")}
        return dict(counts, live=len(manager), fds=fd_count(), rss=rss_bytes(), **internals)

    if profile_path:
        def run_profiled() -> None:
            profiler = cProfile.Profile()
            profiler.enable()
            try:
                manager.run()
            finally:
                profiler.disable()
                profiler.dump_stats(profile_path)

        thread = threading.Thread(target=run_profiled, name="wsmanager")
        thread.start()
    else:
        manager.start()
    conn.send(("ready", port))
    serve_control(conn, stats)
    manager.stop()
    manager.join(15)
    if profile_path:
        thread.join(15)


async def serve_websockets(conn: Any, mode: str) -> None:
    mode, compression = split_mode(mode)
    # Load generators drop their connections without a close handshake when done: not an error here.
    async def echo(connection):
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in connection:
                await connection.send(message)

    async def broadcast(connection):
        with contextlib.suppress(websockets.ConnectionClosed):
            async for _ in connection:
                websockets_broadcast(connection.server.connections, BROADCAST_MESSAGE)

    handler = {"echo": echo, "broadcast": broadcast}[mode]
    server = await websockets_serve(handler, HOST, 0, compression=compression, ping_interval=None,
                                    max_size=MAX_MESSAGE, backlog=BACKLOG)
    await serve_until_stopped(conn, server.sockets[0].getsockname()[1])


class PicowsEcho(WSListener):
    """The fast echo server of s6 (the side not under test)."""

    def on_ws_frame(self, transport, frame):
        msg_type = frame.msg_type
        if msg_type == WSMsgType.TEXT or msg_type == WSMsgType.BINARY:
            transport.send(msg_type, frame.get_payload_as_bytes())
        elif msg_type == WSMsgType.CLOSE:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()


async def serve_picows(conn: Any) -> None:
    server = await ws_create_server(lambda request: PicowsEcho(), HOST, 0, max_frame_size=MAX_MESSAGE,
                                    backlog=BACKLOG)
    await serve_until_stopped(conn, server.sockets[0].getsockname()[1])


def length_prefixed(message: bytes) -> bytes:
    return len(message).to_bytes(4, "big") + message


def split_frames(inbox: bytearray) -> List[bytearray]:
    """Take the complete length-prefixed messages off the front of ``inbox``; a partial one stays."""
    messages = []
    pos = 0
    end = len(inbox)
    while end - pos >= 4:
        stop = pos + 4 + int.from_bytes(inbox[pos:pos + 4], "big")
        if stop > end:
            break
        messages.append(inbox[pos + 4:stop])
        pos = stop
    del inbox[:pos]
    return messages


class CeilingPeer:
    __slots__ = ("sock", "inbox", "outbox", "writing")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.inbox = bytearray()
        self.outbox: List[bytes] = []
        self.writing = False


def serve_ceiling(conn: Any, mode: str) -> None:
    """Raw TCP over selectors, pure Python: 4-byte length prefix, echo (or broadcast on b"go")."""
    selector = selectors.DefaultSelector()
    listener = socket.create_server((HOST, 0), backlog=BACKLOG)
    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ, "listener")
    selector.register(conn, selectors.EVENT_READ, "control")
    peers: Dict[socket.socket, CeilingPeer] = {}
    dirty: Dict[CeilingPeer, None] = {}  # peers with output, in order
    broadcast_frame = length_prefixed(BROADCAST_MESSAGE.encode())
    broadcasting = mode == "broadcast"

    def drop(peer: CeilingPeer) -> None:
        selector.unregister(peer.sock)
        peer.sock.close()
        del peers[peer.sock]
        dirty.pop(peer, None)

    def on_readable(peer: CeilingPeer) -> None:
        try:
            data = peer.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            drop(peer)
            return
        peer.inbox += data
        for message in split_frames(peer.inbox):
            message = bytes(message)  # an immutable copy of its own, as a server hands its application
            if broadcasting and message == b"go":
                for other in peers.values():
                    other.outbox.append(broadcast_frame)
                    dirty[other] = None
            else:
                peer.outbox.append(length_prefixed(message))
                dirty[peer] = None

    def flush(peer: CeilingPeer) -> None:
        outbox = peer.outbox
        if outbox:
            data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
            outbox.clear()
            try:
                sent = peer.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                drop(peer)
                return
            if sent < len(data):
                outbox.append(data[sent:])
        waiting = bool(outbox)
        if waiting != peer.writing:
            peer.writing = waiting
            events = selectors.EVENT_READ | selectors.EVENT_WRITE if waiting else selectors.EVENT_READ
            selector.modify(peer.sock, events, peer)

    conn.send(("ready", listener.getsockname()[1]))
    running = True
    while running:
        for key, events in selector.select():
            tag = key.data
            if tag == "listener":
                for _ in range(64):
                    try:
                        sock, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    peer = peers[sock] = CeilingPeer(sock)
                    selector.register(sock, selectors.EVENT_READ, peer)
            elif tag == "control":
                running = obey(conn, lambda: {"live": len(peers)})
            else:
                if events & selectors.EVENT_READ and tag.sock in peers:
                    on_readable(tag)
                if events & selectors.EVENT_WRITE and tag.sock in peers:
                    flush(tag)
        while dirty:
            peer = next(iter(dirty))
            del dirty[peer]
            if peer.sock in peers:
                flush(peer)
    for peer in list(peers.values()):
        peer.sock.close()
    listener.close()
    selector.close()


###############################################################################
# Load generator: client connections ##########################################
###############################################################################

def _ignore(data: Any) -> None:
    pass


class Link:
    """A client connection of the load generator; subclasses add ``send``, ``close`` and ``abort``."""

    def __init__(self):
        super().__init__()
        self.transport = None
        self.on_message: Callable[[Any], None] = _ignore  # gets the payload, valid during the call only
        self.disconnected = asyncio.get_running_loop().create_future()  # done when the connection is gone

    def _gone(self) -> None:
        if not self.disconnected.done():
            self.disconnected.set_result(None)


class PicowsLink(Link, WSListener):
    """One picows client connection: the load generator's WebSocket client."""

    def on_ws_connected(self, transport):
        self.transport = transport

    def on_ws_frame(self, transport, frame):
        msg_type = frame.msg_type
        if msg_type == WSMsgType.TEXT or msg_type == WSMsgType.BINARY:
            self.on_message(frame.get_payload_as_memoryview())
        elif msg_type == WSMsgType.CLOSE:
            code = frame.get_close_code()
            transport.send_close(WSCloseCode.OK if code == WSCloseCode.NO_INFO else code)
            transport.disconnect()

    def on_ws_disconnected(self, transport):
        self._gone()

    def send(self, data: bytes, binary: bool = False) -> None:
        self.transport.send(WSMsgType.BINARY if binary else WSMsgType.TEXT, data)

    def close(self) -> None:
        """Start the close handshake; ``disconnected`` completes when it is over."""
        self.transport.send_close(WSCloseCode.OK)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.disconnect(graceful=False)


class RawLink(Link, asyncio.Protocol):
    """One client connection to the ceiling: length-prefixed messages."""

    def __init__(self):
        super().__init__()
        self._inbox = bytearray()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self._inbox += data
        for message in split_frames(self._inbox):
            self.on_message(message)

    def connection_lost(self, exc):
        self._gone()

    def send(self, data: bytes, binary: bool = False) -> None:
        self.transport.write(length_prefixed(data))

    def close(self) -> None:
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def round_trip(link: Any, payload: bytes, binary: bool = False, timeout: float = 10.0) -> bytes:
    """Send one message and return the next one received."""
    future = asyncio.get_running_loop().create_future()
    previous = link.on_message

    def on_message(data: Any) -> None:
        if not future.done():
            future.set_result(bytes(data))

    link.on_message = on_message
    try:
        link.send(payload, binary)
        return await asyncio.wait_for(future, timeout)
    finally:
        link.on_message = previous


class DeflateLink(Link):
    """A picows.websockets client connection with permessage-deflate (the compressed scenarios)."""

    def __init__(self, connection: Any):
        super().__init__()
        self.transport = connection
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.transport:
                self.on_message(message.encode() if isinstance(message, str) else message)
        except Exception:
            pass
        finally:
            self._gone()

    def send(self, data: bytes, binary: bool = False) -> None:
        # Deliberate: one task per message; the same cost against either server.
        asyncio.get_running_loop().create_task(self.transport.send(bytes(data) if binary else data.decode()))

    def close(self) -> None:
        asyncio.get_running_loop().create_task(self.transport.close())

    def abort(self) -> None:
        self._reader.cancel()
        self.close()


async def open_link(impl: str, port: int, compressed: bool = False) -> Any:
    """A client connection to a server of ``impl``, handshake done (with permessage-deflate if ``compressed``)."""
    if compressed:
        connection = await picows_websockets_connect(f"ws://{HOST}:{port}/", compression="deflate",
                                                     max_size=MAX_MESSAGE, ping_interval=None,
                                                     open_timeout=CONNECT_TIMEOUT)
        return DeflateLink(connection)
    if impl == "ceiling":
        _, link = await asyncio.get_running_loop().create_connection(RawLink, HOST, port)
        await round_trip(link, b"hello")  # the ceiling's stand-in for an opening handshake
        return link
    _, link = await ws_connect(PicowsLink, f"ws://{HOST}:{port}/", max_frame_size=MAX_MESSAGE,
                               websocket_handshake_timeout=CONNECT_TIMEOUT)
    return link


async def open_links(impl: str, port: int, count: int, concurrency: int,
                     compressed: bool = False) -> "tuple[list, collections.Counter]":
    """Open ``count`` connections, ``concurrency`` at a time; return them and the errors by type."""
    links: list = []
    errors: collections.Counter = collections.Counter()
    indexes = iter(range(count))  # shared: every index is handed to one worker

    async def worker() -> None:
        for _ in indexes:
            try:
                links.append(await asyncio.wait_for(open_link(impl, port, compressed), CONNECT_TIMEOUT))
            except Exception as exc:
                errors[type(exc).__name__] += 1

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    return links, errors


class Meter:
    """One timed interval: wall time, and the CPU and CPU-wait shares of this process and of the server."""

    def __init__(self, server_pid: Optional[int], generator_pid: Any = "self"):
        self.server_pid = server_pid
        self.generator_pid = generator_pid  # the node generator's pid: its CPU, not this process's

    def _sample(self) -> "tuple[float, float, float, float]":
        server = cpu_and_wait(self.server_pid) if self.server_pid else (0.0, 0.0)
        return (*cpu_and_wait(self.generator_pid), *server)

    def __enter__(self) -> "Meter":
        self._start = self._sample()
        self._wall0 = time.perf_counter()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.wall = time.perf_counter() - self._wall0
        shares = [(end - start) / self.wall for start, end in zip(self._start, self._sample())]
        self.generator_cpu, self.generator_wait, self.server_cpu, self.server_wait = shares

    def result(self, values: Dict[str, float], errors: int = 0, **info: Any) -> dict:
        return {"values": values, "wall": self.wall, "generator_cpu": self.generator_cpu,
                "generator_wait": self.generator_wait, "server_cpu": self.server_cpu,
                "server_wait": self.server_wait, "errors": errors, "info": info}


class Tally:
    """Messages received by all links of a workload, and a future done when all expected arrived."""

    def __init__(self, expected: int):
        self.expected = expected
        self.received = 0
        self.errors = 0
        self.done = asyncio.get_running_loop().create_future()

    def count(self) -> None:
        self.received += 1
        if self.received >= self.expected and not self.done.done():
            self.done.set_result(None)


class EchoPump:
    """Keeps ``in_flight`` messages outstanding on one link until ``quota`` were sent."""

    __slots__ = ("link", "payload", "binary", "quota", "sent", "tally")

    def __init__(self, link: Any, payload: bytes, binary: bool, quota: int, tally: Tally):
        self.link = link
        self.payload = payload
        self.binary = binary
        self.quota = quota
        self.sent = 0
        self.tally = tally
        link.on_message = self.on_message

    def start(self, in_flight: int) -> None:
        for _ in range(min(in_flight, self.quota)):
            self.sent += 1
            self.link.send(self.payload, self.binary)

    def on_message(self, data: Any) -> None:
        if len(data) != len(self.payload):
            self.tally.errors += 1
        if self.sent < self.quota:
            self.sent += 1
            self.link.send(self.payload, self.binary)
        self.tally.count()


def close_links(links: Sequence[Any]) -> None:
    for link in links:
        link.abort()


###############################################################################
# Load generator: workloads (each in the generator process) ####################
###############################################################################

async def workload_s1(impl: str, port: int, server_pid: int, p: Params) -> dict:
    link = await open_link(impl, port)
    payload = b"x" * p.s1_size
    for _ in range(100):
        await round_trip(link, payload)
    tally = Tally(p.s1_round_trips)

    def on_message(data: Any) -> None:
        if len(data) != len(payload):
            tally.errors += 1
        tally.count()
        if tally.received < tally.expected:
            link.send(payload)

    link.on_message = on_message
    with Meter(server_pid) as meter:
        link.send(payload)
        await asyncio.wait_for(tally.done, p.trial_timeout)
    link.abort()
    return meter.result({"rate": tally.received / meter.wall}, tally.errors)


async def pipelined_echo(impl: str, port: int, server_pid: int, p: Params, *, connections: int,
                         in_flight: int, size: int, per_connection: int, binary: bool,
                         compressed: bool = False) -> "tuple[Meter, Tally]":
    links, errors = await open_links(impl, port, connections, p.connect_concurrency, compressed)
    payload = (b"\x00\xff" * size)[:size] if binary else b"m" * size
    await asyncio.gather(*(round_trip(link, payload, binary) for link in links))  # warm-up
    tally = Tally(len(links) * per_connection)
    tally.errors = sum(errors.values())
    pumps = [EchoPump(link, payload, binary, per_connection, tally) for link in links]
    with Meter(server_pid) as meter:
        for pump in pumps:
            pump.start(in_flight)
        await asyncio.wait_for(tally.done, p.trial_timeout)
    close_links(links)
    return meter, tally


async def workload_s2(impl: str, port: int, server_pid: int, p: Params, compressed: bool = False) -> dict:
    meter, tally = await pipelined_echo(impl, port, server_pid, p, connections=p.s2_connections,
                                        in_flight=p.s2_in_flight, size=p.s2_size,
                                        per_connection=p.s2_per_connection, binary=False, compressed=compressed)
    return meter.result({"rate": tally.received / meter.wall}, tally.errors)


# -- a second load generator: node's ws with bufferutil (native masking) -----------

NODE_CACHE = os.path.expanduser("~/.cache/wsmanager-bench")  # npm installs ws + bufferutil here, not in the repo
NODE_S2 = r"""
// S2 for node's ws: N connections, each keeping K text messages in flight, until each got M echoes.
// Prints "ready" once all are open, starts on a line from stdin, prints "done <received> <errors>".
const WebSocket = require("ws");
const [port, connections, inFlight, size, perConnection] = process.argv.slice(2).map(Number);
const payload = "m".repeat(size);
let open = 0, finished = 0, received = 0, errors = 0;
const sockets = [];
for (let i = 0; i < connections; i++) {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/`, { perMessageDeflate: false });
  ws.on("error", () => { errors++; });
  ws.on("open", () => { if (++open === connections) console.log("ready"); });
  sockets.push(ws);
}
process.stdin.once("data", () => {
  for (const ws of sockets) {
    let got = 0, sent = 0;
    ws.on("message", () => {
      received++; got++;
      if (sent < perConnection) { ws.send(payload); sent++; }
      if (got === perConnection && ++finished === connections) {
        console.log(`done ${received} ${errors}`);
        for (const s of sockets) s.terminate();
        process.exit(0);
      }
    });
    for (; sent < Math.min(inFlight, perConnection); sent++) ws.send(payload);
  }
});
"""


def node_generator() -> Optional[str]:
    """The node binary, once ws and bufferutil are installed in NODE_CACHE (npm, first use); None without node."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return None
    modules = os.path.join(NODE_CACHE, "node_modules")
    if not all(os.path.isdir(os.path.join(modules, name)) for name in ("ws", "bufferutil")):
        os.makedirs(NODE_CACHE, exist_ok=True)
        subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", NODE_CACHE, "ws", "bufferutil"],
                       check=True, capture_output=True, timeout=300)
    script = os.path.join(NODE_CACHE, "s2.js")
    with open(script, "w") as out:
        out.write(NODE_S2)
    return node


def workload_s2node(impl: str, port: int, server_pid: int, p: Params) -> dict:
    """S2 with node's ws as the load generator (bufferutil masks natively): the generator's CPU is node's."""
    node = node_generator()
    if node is None:
        raise RuntimeError("node is not on PATH")
    env = dict(os.environ, NODE_PATH=os.path.join(NODE_CACHE, "node_modules"))
    child = subprocess.Popen([node, os.path.join(NODE_CACHE, "s2.js"), str(port), str(p.s2_connections),
                              str(p.s2_in_flight), str(p.s2_size), str(p.s2_per_connection)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("the node generator did not connect")
        with Meter(server_pid, child.pid) as meter:
            child.stdin.write("go\n")
            child.stdin.flush()
            line = child.stdout.readline().split()
        if not line or line[0] != "done":
            raise RuntimeError(f"the node generator failed: {line}")
        received, errors = int(line[1]), int(line[2])
        return meter.result({"rate": received / meter.wall}, errors + p.s2_connections * p.s2_per_connection
                            - received, generator="node ws + bufferutil")
    finally:
        child.kill()
        child.wait(10)


async def workload_s3(impl: str, port: int, server_pid: int, p: Params, compressed: bool = False) -> dict:
    meter, tally = await pipelined_echo(impl, port, server_pid, p, connections=p.s3_connections,
                                        in_flight=p.s3_in_flight, size=p.s3_size,
                                        per_connection=p.s3_per_connection, binary=True, compressed=compressed)
    return meter.result({"rate": tally.received * p.s3_size / meter.wall / 1e6}, tally.errors)


async def workload_z2(impl: str, port: int, server_pid: int, p: Params) -> dict:
    return await workload_s2(impl, port, server_pid, p, compressed=True)


async def workload_z3(impl: str, port: int, server_pid: int, p: Params) -> dict:
    return await workload_s3(impl, port, server_pid, p, compressed=True)


async def workload_z5(impl: str, port: int, server_pid: int, p: Params) -> dict:
    return await workload_s5(impl, port, server_pid, p, compressed=True)


def open_connections(impl: str, port: int, count: int, concurrency: int, timeout: float,
                     extensions: Optional[str] = None) -> "tuple[List[socket.socket], collections.Counter]":
    """Open ``count`` connections with a lean client: non-blocking sockets in a selector.

    Every WebSocket connection sends its own request (a fresh key, built
    beforehand) and checks the 101 and its Sec-WebSocket-Accept; a ceiling
    connection does its 5-byte round trip. ``concurrency`` are in progress at
    a time. Far cheaper per connection than an asyncio client, so that the
    server's handshakes, not the generator, set the pace. Returns the open
    sockets and the errors by kind.
    """
    if impl == "ceiling":
        requests = [length_prefixed(b"hello")] * count
        answers = requests
    else:
        keys = [wsmanager.new_key() for _ in range(count)]
        headers = [("Sec-WebSocket-Extensions", extensions)] if extensions else None
        requests = [wsmanager.encode_request(f"{HOST}:{port}", "/", key, headers=headers) for key in keys]
        answers = [wsmanager.accept_key(key).encode() for key in keys]
    selector = selectors.DefaultSelector()
    opened: List[socket.socket] = []
    errors: collections.Counter = collections.Counter()
    started = in_progress = 0
    deadline = time.monotonic() + timeout

    def finish(sock: socket.socket, error: Optional[str]) -> None:
        nonlocal in_progress
        in_progress -= 1
        selector.unregister(sock)
        if error is None:
            opened.append(sock)
        else:
            errors[error] += 1
            sock.close()

    while (started < count or in_progress) and time.monotonic() < deadline:
        while in_progress < concurrency and started < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect_ex((HOST, port))  # EINPROGRESS; the outcome comes as writability
            selector.register(sock, selectors.EVENT_WRITE, [started, b""])
            started += 1
            in_progress += 1
        for key, _ in selector.select(1.0):
            sock, state = key.fileobj, key.data
            try:
                if not state[1] and key.events == selectors.EVENT_WRITE:
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error:
                        finish(sock, os.strerror(error))
                        continue
                    sock.send(requests[state[0]])  # a few hundred bytes: one send
                    selector.modify(sock, selectors.EVENT_READ, state)
                    continue
                data = sock.recv(4096)
            except OSError as exc:
                finish(sock, type(exc).__name__)
                continue
            if not data:
                finish(sock, "closed during the handshake")
                continue
            state[1] += data
            answer = state[1]
            if impl == "ceiling":
                if len(answer) >= len(answers[state[0]]):
                    finish(sock, None if answer == answers[state[0]] else "wrong echo")
            elif b"\r\n\r\n" in answer:
                accepted = answer.startswith(b"HTTP/1.1 101 ") and answers[state[0]] in answer
                if accepted and extensions and b"permessage-deflate" not in answer:
                    finish(sock, "permessage-deflate declined")
                    continue
                finish(sock, None if accepted else f"refused: {answer[:30]!r}")
    for key in list(selector.get_map().values()):  # past the deadline
        errors["timeout"] += 1
        key.fileobj.close()
    selector.close()
    return opened, errors


def open_idle(impl: str, port: int, server_pid: int, p: Params, count: int, extensions: Optional[str] = None) -> dict:
    """Open ``count`` connections after a warm-up one; the server's RSS before and after."""
    warm, _ = open_connections(impl, port, 1, 1, CONNECT_TIMEOUT, extensions)
    time.sleep(0.2)
    rss_before = rss_bytes(server_pid)
    with Meter(server_pid) as meter:
        socks, errors = open_connections(impl, port, count, p.connect_concurrency, p.trial_timeout, extensions)
    time.sleep(0.5)  # let the server settle: the last handshakes, the 101s in flight
    rss_per_connection, rss_mib = rss_growth(rss_before, rss_bytes(server_pid), len(socks))
    return {"meter": meter, "socks": socks + warm, "opened": len(socks), "errors": errors,
            "rss_per_connection": rss_per_connection, "rss_mib": rss_mib, "rss_before": rss_before}


def close_sockets(socks: Sequence[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def workload_s4(impl: str, port: int, server_pid: int, p: Params) -> dict:
    opened = open_idle(impl, port, server_pid, p, p.s4_connections)
    meter = opened["meter"]
    result = meter.result({"rate": opened["opened"] / meter.wall, "rss": opened["rss_per_connection"]},
                          sum(opened["errors"].values()), errors_by_type=dict(opened["errors"]),
                          rss_mib=opened["rss_mib"])
    close_sockets(opened["socks"])
    return result


def workload_idle(impl: str, port: int, server_pid: int, p: Params) -> dict:
    opened = open_idle(impl, port, server_pid, p, p.idle_connections)
    time.sleep(1.0)
    with Meter(server_pid) as meter:
        time.sleep(p.idle_seconds)
    result = meter.result({"cpu": meter.server_cpu * 100}, sum(opened["errors"].values()),
                          connections=opened["opened"],
                          rss_per_connection_kib=round(opened["rss_per_connection"], 2))
    close_sockets(opened["socks"])
    return result


def compressed_echo_on_each(socks: Sequence[socket.socket], timeout: float) -> int:
    """Send one compressed, masked text message on every socket and read its echo; the errors."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -9)  # 9 bits: within any window a server allows
    payload = (compressor.compress(ZMEM_MESSAGE) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
    errors = 0
    for sock in socks:
        try:
            sock.setblocking(True)
            sock.settimeout(timeout)
            sock.sendall(wsmanager.encode_frame(wsmanager.Opcode.TEXT, payload, mask=True, rsv1=True))
            echo = sock.recv(4096)
            # A compressed echo: RSV1 set, and shorter than the message.
            if len(echo) < 2 or not echo[0] & 0x40 or len(echo) >= len(ZMEM_MESSAGE):
                errors += 1
        except OSError:
            errors += 1
    return errors


def workload_zmem(impl: str, port: int, server_pid: int, p: Params, count: int) -> dict:
    opened = open_idle(impl, port, server_pid, p, count, BROWSER_DEFLATE_OFFER)
    errors = sum(opened["errors"].values())
    with Meter(server_pid) as meter:
        errors += compressed_echo_on_each(opened["socks"], CONNECT_TIMEOUT)
    time.sleep(0.5)
    used, used_mib = rss_growth(opened["rss_before"], rss_bytes(server_pid), opened["opened"])
    result = meter.result({"idle": opened["rss_per_connection"], "used": used}, errors,
                          connections=opened["opened"], rss_idle_mib=opened["rss_mib"], rss_used_mib=used_mib)
    close_sockets(opened["socks"])
    return result


def workload_zmem_small(impl: str, port: int, server_pid: int, p: Params) -> dict:
    return workload_zmem(impl, port, server_pid, p, p.zmem_small)


def workload_zmem_large(impl: str, port: int, server_pid: int, p: Params) -> dict:
    return workload_zmem(impl, port, server_pid, p, p.zmem_large)


async def workload_s5(impl: str, port: int, server_pid: int, p: Params, compressed: bool = False) -> dict:
    links, errors = await open_links(impl, port, p.s5_clients, p.connect_concurrency, compressed)
    size = len(BROADCAST_MESSAGE)

    async def broadcasts(count: int) -> Tally:
        """The first client sends "go" ``count`` times back to back; every client counts what arrives."""
        tally = Tally(len(links) * count)

        def deliver(data: Any) -> None:
            if len(data) != size:
                tally.errors += 1
            tally.count()

        for link in links:
            link.on_message = deliver
        for _ in range(count):
            links[0].send(b"go")
        await asyncio.wait_for(tally.done, p.trial_timeout)
        return tally

    await broadcasts(1)  # warm-up
    with Meter(server_pid) as meter:
        tally = await broadcasts(p.s5_broadcasts)
    close_links(links)
    return meter.result({"rate": tally.received / meter.wall}, tally.errors + sum(errors.values()),
                        clients=len(links))


def s6_result(meter: Meter, opened: int, rss_before: int, rss_after: int, errors: int, echoed: int) -> dict:
    rss_per_connection, rss_mib = rss_growth(rss_before, rss_after, opened)
    return meter.result({"rate": opened / meter.wall, "rss": rss_per_connection},
                        errors + (opened - echoed), echoed=echoed, rss_mib=rss_mib)


def open_one_by_one(open_one: Callable[[], Any], count: int, failures: Any) -> "tuple[list, int]":
    """Call ``open_one`` ``count`` times in a row: the connections it opened, and how often it raised ``failures``."""
    opened = []
    errors = 0
    for _ in range(count):
        try:
            opened.append(open_one())
        except failures:
            errors += 1
    return opened, errors


class EchoTally:
    """Echoes counted by the callbacks of a threaded client library, until ``target`` have come."""

    def __init__(self) -> None:
        self.received = 0
        self.target = 1
        self.enough = threading.Event()

    def count(self) -> None:
        self.received += 1
        if self.received >= self.target:
            self.enough.set()


def measure_threaded_clients(open_client: Callable[[], Any], tally: EchoTally, server_pid: int, p: Params,
                             failures: Any, open_warm: Optional[Callable[[], Any]] = None,
                             run_all: Optional[Callable[[List[Any]], None]] = None) -> dict:
    """S6 for a client library whose connections run in its own manager thread: a warm-up connection
    (``open_warm``, default ``open_client``), then p.s6_connections opened one by one (measured), then
    ``run_all`` on them if given, then one echo each."""
    warm = (open_warm or open_client)()
    warm.send("warm-up")
    tally.enough.wait(CONNECT_TIMEOUT)
    tally.received, tally.target = 0, p.s6_connections
    tally.enough.clear()
    time.sleep(0.2)
    rss_before = rss_bytes()
    with Meter(server_pid) as meter:
        clients, errors = open_one_by_one(open_client, p.s6_connections, failures)
    if run_all is not None:
        run_all(clients)
    tally.target = len(clients)
    for client in clients:
        client.send("hi")
    tally.enough.wait(p.trial_timeout)
    rss_after = rss_bytes()
    return s6_result(meter, len(clients), rss_before, rss_after, errors, tally.received)


def client_s6_wsmanager(port: int, server_pid: int, p: Params, add: bool = True) -> dict:
    """``connect()`` then ``manager.add()``, one by one; without ``add``, the connections are added only
    after the timed interval (the cost of connect() alone)."""
    url = f"ws://{HOST}:{port}/"
    tally = EchoTally()

    class Client(wsmanager.WebSocket):
        def received_message(self, message):
            tally.count()

    def open_client() -> wsmanager.WebSocket:
        client = wsmanager.connect(url, Client, timeout=CONNECT_TIMEOUT)
        manager.add(client)
        return client

    def connect_only() -> wsmanager.WebSocket:
        return wsmanager.connect(url, Client, timeout=CONNECT_TIMEOUT)

    def add_all(clients: List[wsmanager.WebSocket]) -> None:
        for client in clients:
            manager.add(client)

    manager = wsmanager.WebSocketManager()
    manager.start()
    try:
        if not add:
            return measure_threaded_clients(connect_only, tally, server_pid, p, (OSError, wsmanager.HandshakeError),
                                            open_warm=open_client, run_all=add_all)
        return measure_threaded_clients(open_client, tally, server_pid, p, (OSError, wsmanager.HandshakeError))
    finally:
        manager.stop()
        manager.join(15)


async def client_s6_websockets(port: int, server_pid: int, p: Params) -> dict:
    url = f"ws://{HOST}:{port}/"
    options = dict(compression=None, ping_interval=None, open_timeout=CONNECT_TIMEOUT)
    warm = await websockets_connect(url, **options)
    await warm.send("warm-up")
    await warm.recv()
    await asyncio.sleep(0.2)
    rss_before = rss_bytes()
    clients = []
    errors = 0
    with Meter(server_pid) as meter:
        for _ in range(p.s6_connections):
            try:
                clients.append(await websockets_connect(url, **options))
            except Exception:
                errors += 1
    for client in clients:
        await client.send("hi")
    echoes = await asyncio.wait_for(asyncio.gather(*(client.recv() for client in clients)), p.trial_timeout)
    rss_after = rss_bytes()
    for client in clients + [warm]:
        client.transport.abort()
    return s6_result(meter, len(clients), rss_before, rss_after, errors, len(echoes))


def await_echoes(selector: selectors.BaseSelector, expected: int, size: int, p: Params) -> int:
    """Read the sockets registered in ``selector`` (each with a bytearray) until ``expected`` of them have
    sent ``size`` bytes back or closed, within the trial's timeout; return how many did."""
    echoed = 0
    deadline = time.monotonic() + p.trial_timeout
    while echoed < expected and time.monotonic() < deadline:
        for key, _ in selector.select(1.0):
            data = key.fileobj.recv(READ_CHUNK)
            key.data.extend(data)
            if len(key.data) >= size or not data:
                echoed += 1
                selector.unregister(key.fileobj)
    return echoed


def client_s6_ceiling(port: int, server_pid: int, p: Params) -> dict:
    """Blocking connect + one round trip each (the stand-in for a handshake), then a selector holds them."""
    selector = selectors.DefaultSelector()
    hello = length_prefixed(b"hello")

    def open_one() -> socket.socket:
        sock = socket.create_connection((HOST, port), CONNECT_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(hello)
        answer = b""
        while len(answer) < len(hello):
            chunk = sock.recv(len(hello) - len(answer))
            if not chunk:
                raise ConnectionError("closed during the round trip")
            answer += chunk
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, bytearray())
        return sock

    warm = open_one()
    time.sleep(0.2)
    rss_before = rss_bytes()
    with Meter(server_pid) as meter:
        opened, errors = open_one_by_one(open_one, p.s6_connections, OSError)
    socks = [warm] + opened
    for sock in socks:
        sock.sendall(length_prefixed(b"hi"))
    echoed = await_echoes(selector, len(socks), 6, p)
    rss_after = rss_bytes()
    for sock in socks:
        sock.close()
    selector.close()
    return s6_result(meter, len(opened), rss_before, rss_after, errors, echoed - 1)  # the warm one echoed too


def client_s6_floor(port: int, server_pid: int, p: Params, handoff: bool = False) -> dict:
    """The floor of a blocking client: a raw socket per connection sends one precomputed opening request
    (the same bytes wsmanager.connect() sends, one key for all) and reads until the end of the 101, with no
    parsing, no checks and no manager; then a selector holds them for one echo each. Only what the protocol
    needs: no name resolution (an address), no timeout (a timeout makes every connect, send and receive
    a poll() and the call), no socket option (TCP_NODELAY matters for later messages, not for the
    handshake's one write each way). With ``handoff`` ("floor-loop"), each socket is handed to a loop
    thread as wsmanager's add() hands it: registered for its first EVENT_WRITE, which wakes the loop
    thread, which then watches it for reading (and nothing else): the price of a loop thread alone."""
    selector = selectors.DefaultSelector()
    running = True

    def loop() -> None:
        while running:
            for key, _ in selector.select(0.05):
                selector.modify(key.fileobj, selectors.EVENT_READ, key.data)

    request = wsmanager.encode_request(f"{HOST}:{port}", "/", wsmanager.new_key())
    hello = wsmanager.encode_frame(wsmanager.Opcode.TEXT, b"hi", mask=True)

    def open_one() -> socket.socket:
        sock = socket.socket()
        sock.connect((HOST, port))
        sock.sendall(request)
        answer = sock.recv(READ_CHUNK)
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(READ_CHUNK)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            answer += chunk
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_WRITE if handoff else selectors.EVENT_READ, bytearray())
        return sock

    thread = threading.Thread(target=loop)
    if handoff:
        thread.start()
    warm = open_one()
    time.sleep(0.2)
    rss_before = rss_bytes()
    with Meter(server_pid) as meter:
        opened, errors = open_one_by_one(open_one, p.s6_connections, OSError)
    if handoff:
        running = False
        thread.join()
    socks = [warm] + opened
    for key in list(selector.get_map().values()):  # (a last one the loop thread had no turn for)
        selector.modify(key.fileobj, selectors.EVENT_READ, key.data)
    for sock in socks:
        sock.sendall(hello)
    echoed = await_echoes(selector, len(socks), 4, p)  # the 4-byte echo of "hi"
    rss_after = rss_bytes()
    for sock in socks:
        sock.close()
    selector.close()
    return s6_result(meter, len(opened), rss_before, rss_after, errors, echoed - 1)


def client_s6_ws4py(port: int, server_pid: int, p: Params) -> dict:
    """ws4py's documented client use: ``connect()`` (blocking handshake), then its manager runs the connection."""
    url = f"ws://{HOST}:{port}/"
    tally = EchoTally()

    class Client(Ws4pyClient):
        def handshake_ok(self):
            manager.add(self)

        def received_message(self, message):
            tally.count()

    def open_client() -> Any:
        client = Client(url)
        client.sock.settimeout(CONNECT_TIMEOUT)
        client.connect()
        return client

    manager = Ws4pyManager()
    manager.start()
    try:
        return measure_threaded_clients(open_client, tally, server_pid, p, Exception)
    finally:
        manager.close_all()
        manager.stop()
        manager.join()


def client_s6c_wsmanager(port: int, server_pid: int, p: Params) -> dict:
    """``manager.connect()`` in a loop: every handshake runs in the loop, all at once; timed until all opened."""
    url = f"ws://{HOST}:{port}/"
    lock = threading.Lock()
    counts = collections.Counter()
    all_opened, all_echoed = threading.Event(), threading.Event()
    expected = p.s6_connections

    def tally(name: str, event: threading.Event) -> None:
        with lock:
            counts[name] += 1
            if counts[name] + counts["failed"] >= expected:
                event.set()

    class Client(wsmanager.WebSocket):
        def opened(self):
            tally("opened", all_opened)

        def received_message(self, message):
            tally("echoed", all_echoed)

        def connect_failed(self, exc):
            tally("failed", all_opened)
            if counts["echoed"] + counts["failed"] >= expected:
                all_echoed.set()

    manager = wsmanager.WebSocketManager(handshake_timeout=CONNECT_TIMEOUT)
    manager.start()
    try:
        warm = wsmanager.connect(url, wsmanager.WebSocket, timeout=CONNECT_TIMEOUT)  # imports, caches, warms
        manager.add(warm)
        time.sleep(0.2)
        rss_before = rss_bytes()
        with Meter(server_pid) as meter:
            clients = [manager.connect(url, Client) for _ in range(expected)]
            all_opened.wait(p.trial_timeout)
        for client in clients:
            if client.state is wsmanager.State.OPEN:
                client.send("hi")
        all_echoed.wait(p.trial_timeout)
        rss_after = rss_bytes()
        return s6_result(meter, counts["opened"], rss_before, rss_after, counts["failed"], counts["echoed"])
    finally:
        manager.stop()
        manager.join(15)


async def client_s6c_websockets(port: int, server_pid: int, p: Params) -> dict:
    """The same with websockets: every ``connect()`` started as a task at once, timed until all opened."""
    url = f"ws://{HOST}:{port}/"
    options = dict(compression=None, ping_interval=None, open_timeout=CONNECT_TIMEOUT)
    warm = await websockets_connect(url, **options)
    await asyncio.sleep(0.2)
    rss_before = rss_bytes()
    with Meter(server_pid) as meter:
        results = await asyncio.gather(*(websockets_connect(url, **options) for _ in range(p.s6_connections)),
                                       return_exceptions=True)
    clients = [client for client in results if not isinstance(client, BaseException)]
    for client in clients:
        await client.send("hi")
    echoes = await asyncio.wait_for(asyncio.gather(*(client.recv() for client in clients)), p.trial_timeout)
    rss_after = rss_bytes()
    for client in clients + [warm]:
        client.transport.abort()
    return s6_result(meter, len(clients), rss_before, rss_after, len(results) - len(clients), len(echoes))


# -- soak -------------------------------------------------------------------

def payload_pools(rng: random.Random) -> Dict[bool, List[bytes]]:
    """A few payloads of each size, text (ASCII) and binary, made once."""
    pools: Dict[bool, List[bytes]] = {False: [], True: []}
    for size in (1, 60, 700, 5000, 70000):
        for _ in range(4):
            pools[False].append("".join(rng.choices(string.ascii_letters, k=size)).encode())
            pools[True].append(rng.randbytes(size))
    return pools


async def soak_session(port: int, rng: random.Random, roll: float, counts: collections.Counter,
                       pools: Dict[bool, List[bytes]]) -> None:
    link = await asyncio.wait_for(open_link("wsmanager", port), CONNECT_TIMEOUT)
    counts["connections"] += 1
    try:
        for _ in range(rng.randint(1, 20)):
            binary = rng.random() < 0.5
            payload = rng.choice(pools[binary])
            if await round_trip(link, payload, binary) != payload:
                counts["errors"] += 1
                counts["error: echo differs"] += 1
            counts["messages"] += 1
        if roll < 0.16:
            link.abort()  # vanish without a close frame
            counts["client vanished"] += 1
        else:
            if roll < 0.26:
                link.send(b"close-me")  # the server starts the close handshake
                counts["server closed"] += 1
            else:
                link.close()
                counts["client closed"] += 1
            await asyncio.wait_for(link.disconnected, 10)
    finally:
        link.abort()


async def soak_partial_handshake(port: int) -> None:
    """Half a request head, then gone: the server must drop the handshake."""
    _, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def soak_protocol_error(port: int) -> None:
    """A valid handshake, then an unmasked frame: the server must fail the connection with 1002."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(wsmanager.encode_request(f"{HOST}:{port}", "/", wsmanager.new_key()))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"handshake refused: {head[:40]!r}")
        writer.write(b"\x81\x02hi")
        rest = await asyncio.wait_for(reader.read(), 10)  # until the server's EOF
        if rest[:1] != b"\x88" or rest[2:4] != (1002).to_bytes(2, "big"):
            raise RuntimeError(f"expected a 1002 close frame, got {rest[:8]!r}")
    finally:
        writer.close()
        await writer.wait_closed()


async def workload_soak(impl: str, port: int, server_pid: int, p: Params) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + p.soak_seconds
    counts: collections.Counter = collections.Counter()
    pools = payload_pools(random.Random(6455))
    next_start = loop.time()

    async def pace() -> None:
        """At most soak_rate new connections per second, all workers together."""
        nonlocal next_start
        now = loop.time()
        start = max(now, next_start)
        next_start = start + 1 / p.soak_rate
        if start > now:
            await asyncio.sleep(start - now)

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(p.soak_max_rounds):
            await pace()
            if loop.time() >= deadline:
                return
            roll = rng.random()
            try:
                if roll < 0.03:
                    await soak_partial_handshake(port)
                    counts["partial handshakes"] += 1
                elif roll < 0.06:
                    await soak_protocol_error(port)
                    counts["protocol errors provoked"] += 1
                else:
                    await soak_session(port, rng, roll, counts, pools)
            except Exception as exc:
                counts["errors"] += 1
                counts[f"error: {type(exc).__name__}: {exc}"[:100]] += 1

    with Meter(server_pid) as meter:
        await asyncio.gather(*(worker(seed) for seed in range(p.soak_workers)))
    return meter.result({}, counts["errors"], counts=dict(counts))


WORKLOADS = {"s1": workload_s1, "s2": workload_s2, "s2node": workload_s2node, "s3": workload_s3, "s4": workload_s4, "s5": workload_s5,
             "idle": workload_idle, "soak": workload_soak, "z2": workload_z2, "z3": workload_z3, "z5": workload_z5,
             "z5ctx": workload_z5, "zmem1k": workload_zmem_small, "zmem10k": workload_zmem_large, "zmemctx10k": workload_zmem_large}


def generator_main(conn: Any, workload: str, impl: str, port: int, server_pid: int, p: Params) -> None:
    """The load generator process: run one workload, send ("result", dict)."""
    if workload == "s6":
        if impl == "wsmanager":
            result = client_s6_wsmanager(port, server_pid, p)
        elif impl == "websockets":
            result = asyncio.run(client_s6_websockets(port, server_pid, p))
        elif impl == "ws4py":
            result = client_s6_ws4py(port, server_pid, p)
        elif impl == "floor":
            result = client_s6_floor(port, server_pid, p)
        elif impl == "floor-loop":
            result = client_s6_floor(port, server_pid, p, handoff=True)
        elif impl == "connect-only":
            result = client_s6_wsmanager(port, server_pid, p, add=False)
        else:
            result = client_s6_ceiling(port, server_pid, p)
    elif workload == "s6c":
        if impl == "wsmanager":
            result = client_s6c_wsmanager(port, server_pid, p)
        else:
            result = asyncio.run(client_s6c_websockets(port, server_pid, p))
    elif asyncio.iscoroutinefunction(WORKLOADS[workload]):
        result = asyncio.run(WORKLOADS[workload](impl, port, server_pid, p))
    else:
        result = WORKLOADS[workload](impl, port, server_pid, p)
    conn.send(("result", result))


###############################################################################
# Results: metrics, targets, tables ############################################
###############################################################################

@dataclasses.dataclass(frozen=True)
class Target:
    against: str  # "websockets", "ceiling" or "absolute"
    bound: float

    def describe(self, metric: "Metric") -> str:
        if self.against == "absolute":
            return f"{'>=' if metric.higher_is_better else '<='} {self.bound:g} {metric.unit}"
        return f">= {self.bound:g}x {self.against}"

    def met(self, metric: "Metric") -> Optional[bool]:
        if self.against == "absolute":
            value = metric.median("wsmanager")
            if value is None:
                return None
            return value >= self.bound if metric.higher_is_better else value <= self.bound
        ratio = metric.ratio(self.against)
        return None if ratio is None else ratio >= self.bound


@dataclasses.dataclass
class Metric:
    """One row of the final table: samples of each implementation, and targets."""

    label: str
    unit: str
    higher_is_better: bool = True
    targets: Sequence[Target] = ()
    # Table column -> key in samples (the codec rows compare with a websockets variant).
    columns: Dict[str, str] = dataclasses.field(default_factory=lambda: {impl: impl for impl in IMPLEMENTATIONS})
    samples: Dict[str, List[float]] = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    # Sample keys whose figure is a lower bound: the side not under test (the load generator; in s6 the
    # echo server) was saturated (CPU share >= SATURATED), so the side under test may have had more to give.
    lower_bounds: Dict[str, float] = dataclasses.field(default_factory=dict)

    def median(self, column: str) -> Optional[float]:
        values = self.samples.get(self.columns.get(column, ""), [])
        return statistics.median(values) if values else None

    def ratio(self, column: str) -> Optional[float]:
        ours, theirs = self.median("wsmanager"), self.median(column)
        if ours is None or not theirs:
            return None
        return ours / theirs

    def verdict(self) -> str:
        if not self.targets:
            return "-"
        results = [target.met(self) for target in self.targets]
        if None in results:
            return "n/a"
        return "yes" if all(results) else "NO"


def fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fmt_cell(metric: "Metric", column: str) -> str:
    """A median, marked ">=" when it is a lower bound (its load generator was saturated)."""
    key = metric.columns.get(column, "")
    text = fmt(metric.median(column))
    return f">= {text}" if key in metric.lower_bounds and text != "-" else text


def markdown_table(metrics: Sequence[Metric], with_targets: bool = True) -> str:
    header = ["scenario", "wsmanager", "websockets", "ceiling", "ratio vs websockets", "ratio vs ceiling"]
    if with_targets:
        header += ["target", "met?"]
    rows = [header, ["---"] * len(header)]
    for metric in metrics:
        has_ceiling = "ceiling" in metric.columns
        row = [f"{metric.label} ({metric.unit}{'' if metric.higher_is_better else ', lower is better'})",
               fmt_cell(metric, "wsmanager"), fmt_cell(metric, "websockets"),
               fmt_cell(metric, "ceiling") if has_ceiling else "-",
               fmt_ratio(metric.ratio("websockets")), fmt_ratio(metric.ratio("ceiling")) if has_ceiling else "-"]
        if with_targets:
            row += ["; ".join(target.describe(metric) for target in metric.targets) or "-", metric.verdict()]
        rows.append(row)
    table = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    notes = [f"{metric.label}: {key} (generator at {share:.0%} CPU)" for metric in metrics
             for key, share in metric.lower_bounds.items()]
    if notes:
        table += ("\n\n>= marks a lower bound: the load generator (s6: the echo server) was saturated "
                  f"(CPU share >= {SATURATED:.0%}), so the side under test was not: " + "; ".join(notes))
    return table


###############################################################################
# Scenarios (parent side) ######################################################
###############################################################################

@dataclasses.dataclass
class Scenario:
    key: str
    title: str
    mode: str  # what the server does: "echo" or "broadcast"
    metrics: Dict[str, Metric]  # result value name -> row
    servers: Dict[str, str] = dataclasses.field(
        default_factory=lambda: {impl: impl for impl in IMPLEMENTATIONS + EXTRA_IMPLEMENTATIONS})
    implementations: Sequence[str] = IMPLEMENTATIONS  # the compressed scenarios have no ceiling
    shares: Dict[str, Dict[str, List[float]]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(lambda: collections.defaultdict(list)))
    # The "rate" divided by the CPU share of the side under test (the server; in s6 the client):
    # work per CPU-second, which CPU contention from other processes disturbs far less.
    efficiency: Optional[Metric] = None
    efficiency_targets: Sequence[Target] = ()
    # More rows over the same samples (another column compared, e.g. ws4py), printed after the scenario's.
    extra_metrics: List[Metric] = dataclasses.field(default_factory=list)
    # The same for the per-CPU-second table: (label, columns) of rows over the efficiency samples.
    extra_efficiency: List[Metric] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        rate = self.metrics.get("rate")
        if rate is not None:
            self.efficiency = Metric(rate.label, f"{rate.unit} per CPU-second", targets=self.efficiency_targets)

    def cpu_under_test(self, result: dict) -> float:
        return result["generator_cpu"] if self.key in ("s6", "s6c") else result["server_cpu"]

    def cpu_of_load(self, result: dict) -> float:
        """The CPU share of the side that makes the load (s6: the echo server)."""
        return result["server_cpu"] if self.key in ("s6", "s6c") else result["generator_cpu"]


def make_scenarios(p: Params) -> Dict[str, Scenario]:
    ref, ceiling, absolute = "websockets", "ceiling", "absolute"
    compressed = ("wsmanager", "websockets")
    scenarios = {
        "s1": Scenario("s1", f"S1 latency: 1 connection, {p.s1_round_trips:,} sequential round trips of "
                             f"{p.s1_size} B text", "echo",
                       {"rate": Metric("S1 latency", "round trips/s", targets=[Target(ceiling, 0.95)])}),
        "s2": Scenario("s2", f"S2 small messages: {p.s2_connections} connections x {p.s2_in_flight} in flight, "
                             f"{p.s2_size} B text, {p.s2_per_connection:,} round trips each", "echo",
                       {"rate": Metric("S2 small messages", "msg/s", targets=[Target(ref, 3.0)])},
                       efficiency_targets=[Target(ref, 3.0)]),
        "s2node": Scenario("s2node", f"S2 with node's ws + bufferutil as the load generator (when node is on "
                                     f"PATH): {p.s2_connections} connections x {p.s2_in_flight} in flight, "
                                     f"{p.s2_size} B text, {p.s2_per_connection:,} round trips each", "echo",
                           {"rate": Metric("S2 small messages, node generator", "msg/s",
                                           targets=[Target(ref, 3.0)])},
                           efficiency_targets=[Target(ref, 3.0)], implementations=("wsmanager", "websockets")),
        "s3": Scenario("s3", f"S3 large messages: {p.s3_connections} connections x {p.s3_in_flight} in flight, "
                             f"{p.s3_size // 1024} KiB binary, {p.s3_per_connection} round trips each", "echo",
                       {"rate": Metric(f"S3 large messages{f' ({MASK_ACCELERATOR})' if MASK_ACCELERATOR else ''}",
                                       "MB/s", targets=[Target(ref, 0.9)] if MASK_ACCELERATOR else [])},
                       implementations=IMPLEMENTATIONS + ("wsmanager-pure",)),
        "s4": Scenario("s4", f"S4 connections: {p.s4_connections:,} idle connections opened "
                             f"{p.connect_concurrency} at a time", "echo",
                       {"rss": Metric("S4 server RSS per connection", "KiB", higher_is_better=False,
                                      targets=[Target(absolute, 3.0)]),
                        "rate": Metric("S4 handshakes", "handshakes/s", targets=[Target(ref, 2.0)])}),
        "s5": Scenario("s5", f"S5 broadcast: {p.s5_clients:,} clients, {p.s5_broadcasts} broadcasts of "
                             f"{len(BROADCAST_MESSAGE)} B text triggered back to back", "broadcast",
                       {"rate": Metric("S5 broadcast", "deliveries/s", targets=[Target(ref, 2.0)])}),
        "s6": Scenario("s6", f"S6 client side: {p.s6_connections:,} client connections opened one by one "
                             "against a picows echo server (ceiling: the raw server)", "echo",
                       {"rss": Metric("S6 client RSS per connection", "KiB", higher_is_better=False,
                                      targets=[Target(absolute, 3.0)]),
                        "rate": Metric("S6 client connections", "conn/s", targets=[Target(ref, 3.0)])},
                       servers={"wsmanager": "picows", "websockets": "picows", "ceiling": "ceiling", "ws4py": "picows",
                                "floor": "picows", "floor-loop": "picows", "connect-only": "picows"},
                       implementations=IMPLEMENTATIONS + (("ws4py",) if ws4py is not None else ())
                       + ("floor", "floor-loop", "connect-only")),
        "s6c": Scenario("s6c", f"S6c client side, concurrent: {p.s6_connections:,} client connections started in "
                               "a loop, all handshaking at once (wsmanager: manager.connect(); websockets: "
                               "connect() tasks gathered), against a picows echo server", "echo",
                        {"rss": Metric("S6c client RSS per connection", "KiB", higher_is_better=False,
                                       targets=[Target(absolute, 3.0)]),
                         "rate": Metric("S6c concurrent client connections", "conn/s", targets=[Target(ref, 3.0)])},
                        servers={"wsmanager": "picows", "websockets": "picows"},
                        implementations=("wsmanager", "websockets")),
        "idle": Scenario("idle", f"Idle: server CPU with {p.idle_connections:,} idle connections for "
                                 f"{p.idle_seconds:g} s", "echo",
                         {"cpu": Metric("Idle connections, server CPU", "% of wall", higher_is_better=False,
                                        targets=[Target(absolute, 1.0)])}),
        # The same with permessage-deflate on both sides, against websockets' default compression.
        "z2": Scenario("z2", f"Z2 = S2 compressed: {p.s2_connections} connections x {p.s2_in_flight} in flight, "
                             f"{p.s2_size} B text, {p.s2_per_connection:,} round trips each", "echo+deflate",
                       {"rate": Metric("Z2 small messages, deflate", "msg/s")}, implementations=compressed),
        "z3": Scenario("z3", f"Z3 = S3 compressed: {p.s3_connections} connections x {p.s3_in_flight} in flight, "
                             f"{p.s3_size // 1024} KiB binary, {p.s3_per_connection} round trips each",
                       "echo+deflate", {"rate": Metric("Z3 large messages, deflate", "MB/s")},
                       implementations=compressed),
        "z5": Scenario("z5", f"Z5 = S5 compressed: {p.s5_clients:,} clients, {p.s5_broadcasts} broadcasts of "
                             f"{len(BROADCAST_MESSAGE)} B text", "broadcast+deflate",
                       {"rate": Metric("Z5 broadcast, deflate", "deliveries/s")}, implementations=compressed),
        # The gain of compressing a broadcast once: the same with contexts kept, so once per connection.
        "z5ctx": Scenario("z5ctx", f"Z5 with contexts kept (wsmanager only: compressed once per connection): "
                                   f"{p.s5_clients:,} clients, {p.s5_broadcasts} broadcasts", "broadcast+deflate-context",
                          {"rate": Metric("Z5 broadcast, deflate, contexts kept", "deliveries/s")},
                          implementations=("wsmanager",)),
        "zmem1k": zmem_scenario("zmem1k", p.zmem_small),
        "zmem10k": zmem_scenario("zmem10k", p.zmem_large),
        "zmemctx10k": zmem_scenario("zmemctx10k", p.zmem_large, context=True),
    }
    # Rows over the same samples, comparing other columns.
    s3, s6 = scenarios["s3"].metrics["rate"], scenarios["s6"].metrics["rate"]
    scenarios["s3"].extra_metrics += [
        Metric("S3 large messages, pure-Python masking", "MB/s", samples=s3.samples,
               columns={"wsmanager": "wsmanager-pure", "websockets": "websockets", "ceiling": "ceiling"}),
        Metric(f"S3 pure Python against what apply_mask alone allows [websockets column: pure apply_mask on "
               f"{READ_CHUNK // 1024} KiB pieces, on the server's CPU]", "MB/s", samples=s3.samples,
               targets=[Target(ref, 0.8)], columns={"wsmanager": "wsmanager-pure", "websockets": "apply_mask"}),
    ]
    if ws4py is not None:
        scenarios["s6"].extra_metrics += [
            Metric(f"S6 client connections [websockets column: ws4py {ws4py.__version__}]", "conn/s",
                   samples=s6.samples, targets=[Target(ref, 1.2)],
                   columns={"wsmanager": "wsmanager", "websockets": "ws4py"}),
            # What any blocking one-by-one client can reach against this server, in ws4py's terms.
            Metric(f"S6 the floor client [wsmanager column: floor; websockets column: ws4py {ws4py.__version__}]",
                   "conn/s", samples=s6.samples, columns={"wsmanager": "floor", "websockets": "ws4py"}),
            Metric(f"S6 the floor client handing each socket to a loop thread [wsmanager column: floor-loop; "
                   f"websockets column: ws4py {ws4py.__version__}]", "conn/s", samples=s6.samples,
                   columns={"wsmanager": "floor-loop", "websockets": "ws4py"})]
    s6_efficiency = scenarios["s6"].efficiency
    assert s6_efficiency is not None
    scenarios["s6"].extra_efficiency += [
        Metric(f"S6 client connections [websockets column: {other}]", s6_efficiency.unit,
               samples=s6_efficiency.samples, columns={"wsmanager": "wsmanager", "websockets": column})
        for other, column in (("ws4py", "ws4py"), ("the floor client", "floor"),
                              ("wsmanager.connect() alone", "connect-only"))]
    scenarios["s6"].extra_metrics += [
        Metric("S6 client connections [websockets column: the floor client]", "conn/s", samples=s6.samples,
               columns={"wsmanager": "wsmanager", "websockets": "floor"}),
        # The price of handing each connection over to the loop thread (add()), by difference.
        Metric("S6 client connections [websockets column: wsmanager.connect() alone, no add()]", "conn/s",
               samples=s6.samples, columns={"wsmanager": "wsmanager", "websockets": "connect-only"})]
    return scenarios


def zmem_scenario(key: str, count: int, context: bool = False) -> Scenario:
    """Server RSS per connection with deflate; ``context``: wsmanager alone, with contexts kept on both sides."""
    label = "deflate with contexts" if context else "deflate"
    return Scenario(key, f"Memory with permessage-deflate{' (contexts kept)' if context else ''}: {count:,} "
                         f"connections offering {BROWSER_DEFLATE_OFFER!r}, idle then after one compressed message "
                         "each", "echo+deflate-context" if context else "echo+deflate",
                    {"idle": Metric(f"{label}, {count:,} idle connections: server RSS per connection", "KiB",
                                    higher_is_better=False),
                     "used": Metric(f"{label}, {count:,} connections after 1 message: server RSS per connection",
                                    "KiB", higher_is_better=False)},
                    implementations=("wsmanager",) if context else ("wsmanager", "websockets"))


def run_trial(scenario: Scenario, impl: str, p: Params, profile_path: Optional[str]) -> dict:
    """One fresh server process and one fresh generator process; the generator's result."""
    server_impl = scenario.servers[impl]
    server = Child(server_main, server_impl, scenario.mode,
                   profile_path if server_impl.startswith("wsmanager") else None, cpu=CPUS["server"])
    try:
        port = server.receive("ready", 60)
        generator = Child(generator_main, scenario.key, impl, port, server.pid, p, cpu=CPUS["generator"])
        try:
            return generator.receive("result", p.trial_timeout + 60)
        finally:
            generator.stop()
    finally:
        server.stop()


def describe_trial(scenario: Scenario, impl: str, result: dict) -> str:
    values = "  ".join(f"{fmt(result['values'][key])} {metric.unit}" for key, metric in scenario.metrics.items())
    side = "client" if scenario.key in ("s6", "s6c") else "generator"
    text = (f"{values}  | {side} CPU {result['generator_cpu']:.0%} (+{result['generator_wait']:.0%} waiting), "
            f"server CPU {result['server_cpu']:.0%} (+{result['server_wait']:.0%} waiting) | {result['wall']:.2f} s")
    cpu = scenario.cpu_under_test(result)
    if "rate" in result["values"] and cpu > 0.01:
        text += f" | {fmt(result['values']['rate'] / cpu)} per {'client' if side == 'client' else 'server'} CPU-s"
    if result["errors"]:
        text += f" | ERRORS {result['errors']}"
    info = {key: value for key, value in result["info"].items() if value}
    if info:
        text += " | " + ", ".join(f"{key} {value}" for key, value in info.items())
    return text


def print_profile(path: str, top: int = 15) -> None:
    print(f"    cProfile of the wsmanager server ({path}), top {top} by own time:")
    stream = StringIOWithIndent()
    pstats.Stats(path, stream=stream).strip_dirs().sort_stats("tottime").print_stats(top)
    print(stream.getvalue())


class StringIOWithIndent:
    """A minimal text sink for pstats that indents what it is given."""

    def __init__(self):
        self._parts: List[str] = []

    def write(self, text: str) -> None:
        self._parts.append(text)

    def getvalue(self) -> str:
        lines = "".join(self._parts).splitlines()
        return "\n".join("      " + line for line in lines if line.strip())


def run_scenario(scenario: Scenario, p: Params, repeat: int, profile_dir: Optional[str]) -> None:
    print(f"\n## {scenario.title}")
    for rep in range(repeat):
        for impl in scenario.implementations:
            profile_path = None
            if profile_dir and impl == "wsmanager":
                profile_path = os.path.join(profile_dir, f"{scenario.key}-rep{rep + 1}.prof")
            label = f"  {scenario.key} rep {rep + 1}/{repeat}  {impl:<10}"
            try:
                result = run_trial(scenario, impl, p, profile_path)
            except Exception as exc:
                print(f"{label} FAILED: {exc}", flush=True)
                continue
            for key, metric in scenario.metrics.items():
                metric.samples[impl].append(result["values"][key])
            for share in ("generator_cpu", "generator_wait", "server_cpu", "server_wait"):
                scenario.shares[impl][share].append(result[share])
            cpu = scenario.cpu_under_test(result)
            if scenario.efficiency is not None and cpu > 0.01:
                scenario.efficiency.samples[impl].append(result["values"]["rate"] / cpu)
            print(f"{label} {describe_trial(scenario, impl, result)}", flush=True)
            if profile_path and rep == 0 and os.path.exists(profile_path):
                print_profile(profile_path)
        if scenario.key == "s3":
            bound = pure_mask_rate()
            scenario.metrics["rate"].samples["apply_mask"].append(bound)
            print(f"  s3 rep {rep + 1}/{repeat}  pure apply_mask alone on {READ_CHUNK // 1024} KiB pieces, on the "
                  f"server's CPU: {fmt(bound)} MB/s", flush=True)
    for impl, shares in scenario.shares.items():
        load = statistics.median(shares["server_cpu" if scenario.key in ("s6", "s6c") else "generator_cpu"])
        if load >= SATURATED:
            for metric in [*scenario.metrics.values(), *scenario.extra_metrics]:
                metric.lower_bounds[impl] = load
            if scenario.efficiency is not None:
                scenario.efficiency.lower_bounds[impl] = load
    for metric in [*scenario.metrics.values(), *scenario.extra_metrics]:
        medians = ", ".join(f"{impl} {fmt_cell(metric, impl)}" for impl in metric.columns)
        print(f"  median {metric.label} ({metric.unit}): {medians}")


def pure_mask_rate() -> float:
    """MB/s of wsmanager's pure-Python apply_mask on READ_CHUNK pieces, best of BEST_OF, on the server's CPU."""
    saved_affinity = os.sched_getaffinity(0)
    if CPUS["server"] is not None:
        os.sched_setaffinity(0, {CPUS["server"]})
    try:
        data, key, calls = os.urandom(READ_CHUNK), b"\x12\x34\x56\x78", 200
        with wsmanager_pure_masking():
            best = min(timeit.repeat(lambda: wsmanager.apply_mask(data, key), number=calls, repeat=BEST_OF))
        return calls * len(data) / best / 1e6
    finally:
        os.sched_setaffinity(0, saved_affinity)


def share_table(scenarios: Sequence[Scenario]) -> str:
    """Medians of the CPU shares: "generator cpu+wait / server cpu+wait" per implementation."""
    implementations = [impl for impl in IMPLEMENTATIONS + EXTRA_IMPLEMENTATIONS
                       if any(impl in scenario.implementations for scenario in scenarios)]
    rows = [["scenario"] + [f"{impl}: generator / server" for impl in implementations]]
    rows.append(["---"] * len(rows[0]))
    for scenario in scenarios:
        cells = [scenario.key]
        for impl in implementations:
            shares = scenario.shares.get(impl)
            if not shares or not shares["generator_cpu"]:
                cells.append("-")
                continue
            median = {name: statistics.median(values) for name, values in shares.items()}
            cells.append(f"{median['generator_cpu']:.0%}+{median['generator_wait']:.0%} / "
                         f"{median['server_cpu']:.0%}+{median['server_wait']:.0%}")
        rows.append(cells)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


# -- codec (in this process) --------------------------------------------------

@contextlib.contextmanager
def websockets_mask(function: Callable[[bytes, bytes], bytes]):
    """Make websockets' frame parser use ``function`` to unmask (C speedups or the pure-Python fallback)."""
    saved = websockets.frames.apply_mask
    websockets.frames.apply_mask = function
    try:
        yield
    finally:
        websockets.frames.apply_mask = saved


def parse_with_wsmanager(chunks: Sequence[bytes]) -> int:
    parser = wsmanager.FrameParser(expect_masked=True, max_frame_size=MAX_MESSAGE)
    count = 0
    for chunk in chunks:
        count += len(parser.feed(chunk))
    return count


def parse_with_websockets(chunks: Sequence[bytes]) -> int:
    """websockets' own parsing loop: Frame.parse, a generator-based coroutine, over a StreamReader."""
    reader = websockets.streams.StreamReader()
    parse = websockets.frames.Frame.parse
    read_exact = reader.read_exact
    parser = None
    count = 0
    for chunk in chunks:
        reader.feed_data(chunk)
        while True:
            if parser is None:
                parser = parse(read_exact, mask=True, max_size=MAX_MESSAGE, extensions=[])
            try:
                next(parser)  # returns when it needs more bytes
            except StopIteration:
                count += 1
                parser = None
                continue
            break
    return count


def parse_with_wsproto(chunks: Sequence[bytes]) -> int:
    """wsproto's frame layer (pure Python, like websockets' fallback): FrameProtocol over the same chunks."""
    protocol = wsproto_frames.FrameProtocol(client=False, extensions=[])
    count = 0
    for chunk in chunks:
        protocol.receive_bytes(chunk)
        for frame in protocol.received_frames():  # a large frame comes out in pieces
            count += frame.frame_finished
    return count


@contextlib.contextmanager
def wsmanager_pure_masking():
    """wsmanager's standard-library masking, whether or not the accelerator is installed."""
    saved = wsmanager._large_mask, wsmanager._small_mask
    wsmanager._large_mask, wsmanager._small_mask = wsmanager._translate_mask, None
    try:
        yield
    finally:
        wsmanager._large_mask, wsmanager._small_mask = saved


def masked_stream(count: int, size: int) -> List[bytes]:
    """``count`` masked binary frames of ``size`` bytes, cut in 64 KiB chunks as a socket would deliver them."""
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    data = b"".join(wsmanager.encode_frame(wsmanager.Opcode.BINARY, payload, mask=True) for _ in range(count))
    return [data[i:i + READ_CHUNK] for i in range(0, len(data), READ_CHUNK)]


def run_codec(p: Params, repeat: int) -> List[Metric]:
    print("\n## Codec, in-process (pinned to the generator's CPU)")
    c_mask = websockets_c_apply_mask
    pure_mask = websockets.utils.apply_mask
    accelerated = MASK_ACCELERATOR is not None
    wsmanager.apply_mask(bytes(2 ** 20), b"\x00" * 4)  # wsmanager looks for its accelerator now, not when timed
    # wsmanager: as installed (with its accelerator when one is importable); "wsmanager pure-Python": masking forced to
    # the standard-library path, the fair match for websockets' pure-Python fallback and for wsproto.
    variants = {"wsmanager": None, "wsmanager pure-Python": None, "websockets+C": c_mask,
                "websockets pure-Python": pure_mask, "wsproto": None}
    if c_mask is None:
        print("  websockets has no C speedups here: its +C rows are missing")
        del variants["websockets+C"]
    if wsproto_frames is None:
        print("  wsproto is not installed: its rows are missing")
        del variants["wsproto"]
    print(f"  wsmanager masks large payloads with {MASK_ACCELERATOR or 'pure Python (no accelerator installed)'}")
    small = masked_stream(p.codec_small_frames, 16)
    big = masked_stream(p.codec_big_frames, 2 ** 20)
    data_1m = bytes(range(256)) * 4096
    data_64 = bytes(range(64))
    key = b"\x12\x34\x56\x78"
    mask_functions = {"wsmanager": wsmanager.apply_mask, "wsmanager pure-Python": wsmanager.apply_mask,
                      "websockets+C": c_mask, "websockets pure-Python": pure_mask}
    samples = {name: collections.defaultdict(list) for name in ("small", "big", "mask1m", "mask64")}
    mask_1m_calls = max(4, p.codec_big_frames // 4)
    mask_64_calls = max(10_000, p.codec_small_frames // 2)

    def setting(variant: str) -> Any:
        if variant == "wsmanager pure-Python":
            return wsmanager_pure_masking()
        if variant.startswith("websockets"):
            return websockets_mask(variants[variant])
        return contextlib.nullcontext()

    def parse_time(variant: str, chunks: List[bytes], expected: int) -> float:
        """Best of BEST_OF runs: seconds to parse ``chunks`` (which hold ``expected`` frames)."""
        times = []
        parse = {"wsproto": parse_with_wsproto}.get(variant) or (
            parse_with_websockets if variant.startswith("websockets") else parse_with_wsmanager)
        for _ in range(BEST_OF):
            with setting(variant):
                start = time.perf_counter()
                count = parse(chunks)
                times.append(time.perf_counter() - start)
            if count != expected:
                raise AssertionError(f"{variant} parsed {count} frames, not {expected}")
        return min(times)

    def call_time(variant: str, data: bytes, calls: int) -> float:
        """Best of BEST_OF runs: seconds per call."""
        function = mask_functions[variant]
        with setting(variant) if variant.startswith("wsmanager") else contextlib.nullcontext():
            return min(timeit.repeat(lambda: function(data, key), number=calls, repeat=BEST_OF)) / calls

    saved_affinity = os.sched_getaffinity(0)
    if CPUS["generator"] is not None:
        os.sched_setaffinity(0, {CPUS["generator"]})
    try:
        for rep in range(repeat):
            for variant in variants:
                elapsed = parse_time(variant, small, p.codec_small_frames)
                samples["small"][variant].append(p.codec_small_frames / elapsed)
                elapsed = parse_time(variant, big, p.codec_big_frames)
                samples["big"][variant].append(p.codec_big_frames * 2 ** 20 / elapsed / 1e6)
                if variant in mask_functions:
                    samples["mask1m"][variant].append(len(data_1m) / call_time(variant, data_1m, mask_1m_calls) / 1e6)
                    samples["mask64"][variant].append(call_time(variant, data_64, mask_64_calls) * 1e9)
            for variant in variants:
                line = (f"{fmt(samples['small'][variant][-1])} frames/s, {fmt(samples['big'][variant][-1])} MB/s")
                if variant in mask_functions:
                    line += (f", mask 1 MiB {fmt(samples['mask1m'][variant][-1])} MB/s, mask 64 B "
                             f"{fmt(samples['mask64'][variant][-1])} ns")
                print(f"  codec rep {rep + 1}/{repeat}  {variant}: {line}", flush=True)
    finally:
        os.sched_setaffinity(0, saved_affinity)

    ours_c = "wsmanager" + (f" ({MASK_ACCELERATOR})" if accelerated else "")
    pairs = [  # (ours, theirs, label of the comparison)
        ("wsmanager", "websockets+C", f"{ours_c} vs websockets with C speedups"),
        ("wsmanager pure-Python", "websockets pure-Python", "pure Python vs websockets pure Python"),
        ("wsmanager pure-Python", "wsproto", "pure Python vs wsproto"),
    ]

    def rows(name: str, label: str, unit: str, higher: bool,
             targets: Dict[str, Sequence[Target]]) -> List[Metric]:
        """One table row per comparison, all sharing the samples of ``name``."""
        return [Metric(f"{label} [{comparison}]", unit, higher_is_better=higher, targets=targets.get(theirs, ()),
                       samples=samples[name], columns={"wsmanager": ours, "websockets": theirs})
                for ours, theirs, comparison in pairs
                if theirs in variants and (name in ("small", "big") or theirs in mask_functions)]

    ref = [Target("websockets", 1.5)]
    metrics = (rows("small", f"FrameParser {p.codec_small_frames:,} x 16 B masked", "frames/s", True,
                    {"websockets+C": ref})
               + rows("big", f"FrameParser {p.codec_big_frames} x 1 MiB masked", "MB/s", True,
                      {"websockets+C": [Target("websockets", 1.0)] if accelerated else [],
                       "websockets pure-Python": [Target("websockets", 2.0)], "wsproto": [Target("websockets", 1.0)]})
               + rows("mask1m", "apply_mask 1 MiB", "MB/s", True, {})
               + rows("mask64", "apply_mask 64 B", "ns/call", False, {}))
    for metric in metrics:
        print(f"  median {metric.label} ({metric.unit}): wsmanager {fmt(metric.median('wsmanager'))}, "
              f"websockets {fmt(metric.median('websockets'))}")
    mask_candidates(repeat)
    return metrics


def numpy_mask() -> Optional[Callable[[bytes, bytes], bytes]]:
    """A numpy masking function (XOR by 64-bit words, the tail byte by byte), or None without numpy."""
    try:
        import numpy
    except ImportError:
        return None

    def mask(data: bytes, key: bytes) -> bytes:
        out = bytearray(data)
        words = len(out) >> 3
        view = numpy.frombuffer(out, dtype=numpy.uint64, count=words)
        numpy.bitwise_xor(view, numpy.frombuffer(bytes(key) * 2, dtype=numpy.uint64)[0], out=view)
        del view
        for i in range(words * 8, len(out)):
            out[i] ^= key[i & 3]
        return bytes(out)

    return mask


def mask_candidates(repeat: int) -> None:
    """MB/s of each candidate masking function alone on 1 MiB and 64 KiB (best of BEST_OF per repetition)."""
    candidates: Dict[str, Optional[Callable[[bytes, bytes], bytes]]] = {
        "websockets C (speedups.apply_mask)": websockets_c_apply_mask, "numpy (64-bit words)": numpy_mask(),
        "pure Python (wsmanager)": wsmanager._translate_mask}
    try:
        from wsaccel.xormask import XorMaskerSimple
        candidates["wsaccel (XorMaskerSimple)"] = lambda data, key: XorMaskerSimple(key).process(data)
    except ImportError:
        candidates["wsaccel (XorMaskerSimple)"] = None
    key = b"\x12\x34\x56\x78"
    rates: Dict[str, Dict[int, List[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for _ in range(repeat):
        for name, function in candidates.items():
            for size in (2 ** 20, 2 ** 16):
                if function is None:
                    continue
                data = os.urandom(size)
                assert function(data, key) == wsmanager._translate_mask(data, key), name
                calls = max(4, 2 ** 26 // size // 8)
                best = min(timeit.repeat(functools.partial(function, data, key), number=calls, repeat=BEST_OF))
                rates[name][size].append(calls * size / best / 1e6)
    print("\n  Masking candidates alone (MB/s, medians):\n")
    print("  | function | 1 MiB | 64 KiB |\n  | --- | --- | --- |")
    for name in candidates:
        cells = [fmt(statistics.median(rates[name][size])) if rates[name][size] else "not installed"
                 for size in (2 ** 20, 2 ** 16)]
        print(f"  | {name} | {' | '.join(cells)} |")


# -- import time --------------------------------------------------------------

def import_time_ms(code: str, self_of: Optional[str] = None) -> float:
    """Cumulative import time of what ``code`` imports, in ms (``-X importtime``, isolated, no site);
    with ``self_of``, the self time of that module alone (without the modules it imports)."""
    output = subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", "-c", code],
                            capture_output=True, text=True, check=True).stderr
    baseline = set(subprocess_baseline_modules())
    total = 0
    for line in output.splitlines():
        # Only top-level lines (no indent in the name column): nested ones are within their parent's time.
        fields = line.split("|")
        if len(fields) != 3 or not fields[0].startswith("import time:"):
            continue
        if self_of is not None:
            if fields[2].strip() == self_of and not fields[2].startswith("  "):
                return int(fields[0].split(":")[1]) / 1000
        elif not fields[2].startswith("  "):
            name = fields[2].strip()
            if name not in baseline and fields[1].strip().isdigit():
                total += int(fields[1])
    if self_of is not None:
        raise RuntimeError(f"{self_of} was not imported by {code!r}")
    return total / 1000


_BASELINE_MODULES: List[str] = []


def subprocess_baseline_modules() -> List[str]:
    """What the interpreter imports before any -c code runs (its startup), left out of the totals."""
    if not _BASELINE_MODULES:
        output = subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", "-c", "pass"],
                                capture_output=True, text=True, check=True).stderr
        _BASELINE_MODULES.extend(line.split("|")[2].strip() for line in output.splitlines()
                                 if line.count("|") == 2 and line.startswith("import time:")
                                 and not line.split("|")[2].startswith("  "))
    return _BASELINE_MODULES


# The standard-library modules wsmanager cannot do without at import: its floor.
IMPORT_FLOOR = ("__future__, codecs, collections, contextlib, enum, errno, heapq, os, re, selectors, socket, "
                "struct, sys, threading, time, types, typing")


def run_import_time(repeat: int, baseline: Optional[str] = None) -> List[Metric]:
    """``import wsmanager`` against the stdlib modules it needs, interleaved, 7 runs per repetition; and
    wsmanager's self time (its own module body, without the modules it imports), with ``baseline`` (a
    directory holding another wsmanager.py, e.g. main's) the self time of that one too, interleaved."""
    print("\n## Import time: python -I -S -X importtime (no site-packages: no accelerator importable)")
    here = os.path.dirname(os.path.abspath(wsmanager.__file__))
    metric = Metric("import wsmanager, cumulative", "ms", higher_is_better=False,
                    targets=[Target("absolute", 15.0)], columns={"wsmanager": "wsmanager", "ceiling": "floor"})
    own = Metric("import wsmanager, self time of the module", "ms", higher_is_better=False,
                 targets=[Target("absolute", 3.0)], columns={"wsmanager": "self"})
    code = f"import sys; sys.path.insert(0, {here!r}); import wsmanager"
    import_time_ms(code)  # compiles the .pyc if needed
    if baseline is not None:
        against = Metric(f"import wsmanager, self time; ceiling column: {baseline}", "ms", higher_is_better=False,
                         columns={"wsmanager": "self", "ceiling": "baseline"})
        against.samples["self"] = own.samples["self"]
        baseline_code = f"import sys; sys.path.insert(0, {os.path.abspath(baseline)!r}); import wsmanager"
        import_time_ms(baseline_code)
    for rep in range(repeat):
        for _ in range(7):
            metric.samples["wsmanager"].append(import_time_ms(code))
            metric.samples["floor"].append(import_time_ms(f"import {IMPORT_FLOOR}"))
            own.samples["self"].append(import_time_ms(code, self_of="wsmanager"))
            if baseline is not None:
                against.samples["baseline"].append(import_time_ms(baseline_code, self_of="wsmanager"))
        print(f"  import rep {rep + 1}/{repeat}  wsmanager {fmt(statistics.median(metric.samples['wsmanager']))} ms,"
              f" its stdlib floor ({IMPORT_FLOOR}) {fmt(statistics.median(metric.samples['floor']))} ms, "
              f"self {fmt(statistics.median(own.samples['self']))} ms (min {fmt(min(own.samples['self']))})"
              + (f", {baseline}'s self {fmt(statistics.median(against.samples['baseline']))} ms"
                 if baseline is not None else ""), flush=True)
    return [metric, own] + ([against] if baseline is not None else [])


# -- zparams: zlib settings for permessage-deflate ------------------------------

ZPARAMS_WINDOW_BITS = range(9, 16)
ZPARAMS_MEM_LEVELS = range(1, 10)
ZPARAMS_LARGE_SIZE = 128 * 1024


def json_message(size: int) -> bytes:
    """``size`` bytes of a JSON array of records, the kind of message a dashboard pushes (seeded)."""
    rng = random.Random(22)
    words = ["alpha", "beta", "gamma", "delta", "status", "ok", "error", "pending", "eu-west", "us-east"]
    records = []
    length = 2
    while length < size:
        record = json.dumps({"id": len(records), "user": f"user{rng.randrange(10_000)}", "region": rng.choice(words),
                             "state": rng.choice(words), "value": round(rng.uniform(0, 1000), 3),
                             "ts": 1_700_000_000 + rng.randrange(86_400), "tags": rng.sample(words, 3)})
        records.append(record)
        length += len(record) + 2
    return ("[" + ", ".join(records) + "]").encode()[:size]


def zlib_message_cost(wbits: int, mem_level: int, message: bytes, count: int) -> "tuple[float, int]":
    """CPU seconds per message (best of BEST_OF runs of ``count``) and compressed size, compressed as
    wsmanager's shared compressor does by default: level 6, a full flush after each message. CPU time
    of this thread, not wall time: other processes taking the CPU do not count."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -wbits, mem_level)
    size = len(compressor.compress(message) + compressor.flush(zlib.Z_FULL_FLUSH))
    best = math.inf
    for _ in range(BEST_OF):
        start = time.thread_time()
        for _ in range(count):
            compressor.compress(message)
            compressor.flush(zlib.Z_FULL_FLUSH)
        best = min(best, (time.thread_time() - start) / count)
    return best, size


def zlib_memory(wbits: int, mem_level: int, message: bytes) -> int:
    """Bytes a compressor holds after one message: what a connection keeps with its context (tracemalloc)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        compressor = zlib.compressobj(6, zlib.DEFLATED, -wbits, mem_level)
        compressor.compress(message)
        compressor.flush(zlib.Z_SYNC_FLUSH)
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def run_zparams(repeat: int) -> List[Metric]:
    """Time, size and memory of zlib for every window (9-15 bits) and memLevel (1-9), interleaved."""
    small, large = ZMEM_MESSAGE, json_message(ZPARAMS_LARGE_SIZE)
    print(f"\n## zlib settings: level 6, a full flush per message (wsmanager's shared compressor), pinned to the "
          f"generator's CPU; a {len(small)} B chat message and {len(large) // 1024} KiB of JSON records")
    grid = [(wbits, level) for wbits in ZPARAMS_WINDOW_BITS for level in ZPARAMS_MEM_LEVELS]
    times: Dict[str, Dict[Any, List[float]]] = {"small": collections.defaultdict(list),
                                                  "large": collections.defaultdict(list)}
    sizes: Dict[str, Dict[Any, int]] = {"small": {}, "large": {}}
    saved_affinity = os.sched_getaffinity(0)
    if CPUS["generator"] is not None:
        os.sched_setaffinity(0, {CPUS["generator"]})
    try:
        for rep in range(repeat):
            for cell in grid:
                for name, message, count in (("small", small, 2000), ("large", large, 8)):
                    seconds, sizes[name][cell] = zlib_message_cost(*cell, message, count)
                    times[name][cell].append(seconds)
            print(f"  zparams rep {rep + 1}/{repeat} done", flush=True)
    finally:
        os.sched_setaffinity(0, saved_affinity)
    memory = {cell: zlib_memory(*cell, large) for cell in grid}

    def table(title: str, cell_text: Callable[[Any], str]) -> None:
        print(f"\n  {title}\n")
        print("  | window bits | " + " | ".join(f"memLevel {level}" for level in ZPARAMS_MEM_LEVELS) + " |")
        print("  | --- |" + " --- |" * len(ZPARAMS_MEM_LEVELS))
        for wbits in ZPARAMS_WINDOW_BITS:
            print(f"  | {wbits} | " + " | ".join(cell_text((wbits, level)) for level in ZPARAMS_MEM_LEVELS) + " |")

    median = statistics.median
    table(f"CPU ms per {len(large) // 1024} KiB JSON message (medians)", lambda cell: f"{median(times['large'][cell]) * 1e3:.2f}")
    table(f"CPU us per {len(small)} B message (medians)", lambda cell: f"{median(times['small'][cell]) * 1e6:.1f}")
    table(f"compressed size of the {len(large) // 1024} KiB message, % of the original",
          lambda cell: f"{sizes['large'][cell] / len(large):.1%}")
    table(f"compressed size of the {len(small)} B message, bytes", lambda cell: str(sizes["small"][cell]))
    table("KiB a compressor holds (per connection that keeps its context; one per thread when shared)",
          lambda cell: f"{memory[cell] / 1024:.0f}")
    # The default against zlib's own (memLevel 8), per window size, as rows of the results table.
    chosen = wsmanager.Deflate().mem_level
    metrics = []
    for wbits in (9, 12, 15):
        for name, unit, scale in (("large", "ms", 1e3), ("small", "us", 1e6)):
            metric = Metric(f"zlib {wbits}-bit window, {'128 KiB JSON' if name == 'large' else 'small message'} "
                            f"[memLevel {chosen} (default) vs 8]", f"CPU {unit} per message", higher_is_better=False,
                            columns={"wsmanager": "chosen", "websockets": "memLevel 8"})
            metric.samples["chosen"] = [t * scale for t in times[name][(wbits, chosen)]]
            metric.samples["memLevel 8"] = [t * scale for t in times[name][(wbits, 8)]]
            metrics.append(metric)
    return metrics


# -- soak ---------------------------------------------------------------------

def fds_and_rss(pid: int) -> "tuple[int, int]":
    return fd_count(pid), rss_bytes(pid)


def describe_fds_rss(fds_rss: "tuple[int, int]") -> str:
    return f"{fds_rss[0]} fds, RSS {fds_rss[1] / 2**20:.1f} MiB"


def run_soak(p: Params) -> int:
    print(f"## Soak: {p.soak_seconds:.0f} s of churn against one wsmanager server process")
    server = Child(server_main, "wsmanager", "soak", None, cpu=CPUS["server"])
    try:
        port = server.receive("ready", 60)
        pid = server.pid
        time.sleep(0.5)
        start = fds_and_rss(pid)
        print(f"  start:   {describe_fds_rss(start)}")
        warm_up = min(10.0, p.soak_seconds / 5)
        generator = Child(generator_main, "soak", "wsmanager", port, pid, p, cpu=CPUS["generator"])
        samples = []  # (seconds since start, fds, rss) after warm-up
        warm = None
        began = time.monotonic()
        last_print = began
        result = None
        try:
            while time.monotonic() - began < p.soak_seconds + 120:
                if generator.conn.poll(1.0):
                    result = generator.receive("result", 1)
                    break
                elapsed = time.monotonic() - began
                now = fds_and_rss(pid)
                if elapsed >= warm_up:
                    if warm is None:
                        warm = now
                        print(f"  warm-up: {describe_fds_rss(now)} (after {elapsed:.0f} s)")
                    samples.append((elapsed, *now))
                if time.monotonic() - last_print >= 10:
                    last_print = time.monotonic()
                    stats = server.ask("stats")
                    print(f"  {elapsed:5.0f} s: {describe_fds_rss(now)}, "
                          f"opened {stats.get('opened', 0)}, closed {stats.get('closed', 0)}, "
                          f"live {stats['live']}", flush=True)
        finally:
            generator.stop()
        if result is None:
            print("  the client generator did not finish in time")
            return 1
        # The last connections wind down (close handshakes, EOFs): wait for the fd count, bounded.
        settle_deadline = time.monotonic() + wsmanager.DEFAULT_CLOSE_TIMEOUT + 10
        while fd_count(pid) != start[0] and time.monotonic() < settle_deadline:
            time.sleep(0.2)
        end = fds_and_rss(pid)
        stats = server.ask("stats")
    finally:
        server.stop()
    samples.append((time.monotonic() - began, *end))
    counts = result["info"]["counts"]
    print(f"  end:     {describe_fds_rss(end)}")
    print(f"  client side: {counts.get('connections', 0):,} WebSocket connections, "
          f"{counts.get('messages', 0):,} messages echoed, {counts.get('errors', 0)} errors; "
          f"{counts.get('client closed', 0):,} closed by the client, {counts.get('server closed', 0):,} by the "
          f"server, {counts.get('client vanished', 0):,} vanished, {counts.get('partial handshakes', 0):,} "
          f"partial handshakes, {counts.get('protocol errors provoked', 0):,} protocol errors provoked")
    for key, value in sorted(counts.items()):
        if key.startswith("error:"):
            print(f"    {value} x {key}")
    print(f"  server side: opened {stats.get('opened', 0):,}, closed {stats.get('closed', 0):,}, "
          f"messages {stats.get('messages', 0):,}, live {stats['live']}, handshakes {stats['handshakes']}, "
          f"timers pending {stats['timers']}")
    codes = {key: value for key, value in stats.items() if key.startswith("closed with")}
    print("  close codes seen by the server: " + ", ".join(f"{key[12:]}: {value:,}" for key, value in sorted(codes.items())))
    rss_values = [rss for _, _, rss in samples]
    band = max(rss_values) - min(rss_values)
    band_limit = max(4 * 2 ** 20, 0.05 * warm[1]) if warm else 4 * 2 ** 20
    fds_back = end[0] == start[0]
    rss_ok = band <= band_limit
    print(f"  fd count back to its start value ({start[0]}): {'yes' if fds_back else 'NO'} ({end[0]})")
    print(f"  RSS after warm-up: {min(rss_values) / 2**20:.1f}..{max(rss_values) / 2**20:.1f} MiB, band "
          f"{band / 2**20:.2f} MiB (limit {band_limit / 2**20:.1f} MiB): {'ok' if rss_ok else 'TOO WIDE'}")
    return 0 if fds_back and rss_ok and not counts.get("errors") else 1


###############################################################################
# Scaling out: publish with worker processes, and the Redis hop ##############
###############################################################################

SCALE_WORKER = r'''
import sys, wsmanager
workers, port = int(sys.argv[1]), int(sys.argv[2])
rounds = {}

def setup(manager, sock, index):
    class Subscriber(wsmanager.WebSocket):
        def opened(self):
            self.send(f"w{index}")  # tells the client which worker it landed on
            manager.subscribe(self, "bench")

        def received_message(self, message):
            # "go:<round>:<count>:<size>": publish <count> messages to every subscriber of this worker.
            _, round_id, count, size = message.split(":")
            message = "p" * int(size)
            for _ in range(int(count)):
                manager.publish("bench", message)

    manager.listen(sock, Subscriber, backlog=4096)

wsmanager.Supervisor(("127.0.0.1", port), setup, workers=workers, backlog=4096).run()
'''


def _raw_subscriber(port: int) -> "tuple[socket.socket, str]":
    """A WebSocket client socket after its handshake, and the worker it landed on ("w0", "w1"...)."""
    sock = socket.create_connection((HOST, port), CONNECT_TIMEOUT)
    key = wsmanager.new_key()
    sock.sendall(wsmanager.encode_request(f"{HOST}:{port}", "/", key))
    reader = wsmanager.HeadReader()
    result = None
    while result is None:
        data = sock.recv(READ_CHUNK)
        if not data:
            raise ConnectionError("closed during the handshake")
        result = reader.feed(data)
    head, rest = result
    wsmanager.validate_response(wsmanager.parse_response(head), key)
    parser = wsmanager.FrameParser(expect_masked=False)
    frames = parser.feed(rest)
    while not frames:
        frames = parser.feed(sock.recv(READ_CHUNK))
    sock.setblocking(False)
    return sock, frames[0].payload.decode()


def publish_round(socks: Sequence[socket.socket], triggers: Sequence[socket.socket], round_id: int, count: int,
                  size: int, timeout: float = 120.0) -> float:
    """Seconds from the "go" messages until every subscriber has all ``count`` messages of ``size`` B."""
    frame_size = len(wsmanager.encode_frame(wsmanager.Opcode.TEXT, b"p" * size))
    expected = count * frame_size
    remaining = {sock.fileno(): expected for sock in socks}
    by_fd = {sock.fileno(): sock for sock in socks}
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    go = f"go:{round_id}:{count}:{size}".encode()
    started = time.perf_counter()
    for sock in triggers:
        sock.setblocking(True)
        sock.sendall(wsmanager.encode_frame(wsmanager.Opcode.TEXT, go, mask=True))
        sock.setblocking(False)
    deadline = time.monotonic() + timeout
    try:
        while remaining and time.monotonic() < deadline:
            for key, _ in selector.select(1.0):
                fd = key.fd
                try:
                    data = by_fd[fd].recv(1 << 20)
                except BlockingIOError:
                    continue
                if not data:
                    raise ConnectionError("a subscriber was closed by the server")
                left = remaining[fd] - len(data)
                if left <= 0:
                    del remaining[fd]
                    selector.unregister(by_fd[fd])
                else:
                    remaining[fd] = left
    finally:
        selector.close()
    if remaining:
        raise TimeoutError(f"{len(remaining)} subscribers still waiting after {timeout:.0f} s")
    return time.perf_counter() - started


def measure_publish(workers: int, subscribers: int, count: int, size: int) -> dict:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(wsmanager.__file__)))
    server = subprocess.Popen([sys.executable, "-c", SCALE_WORKER, str(workers), str(port)], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    socks: List[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        placed: Dict[str, List[socket.socket]] = collections.defaultdict(list)
        while len(socks) < subscribers:
            try:
                sock, worker = _raw_subscriber(port)
            except (ConnectionRefusedError, ConnectionResetError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # the workers are not all listening yet
                continue
            socks.append(sock)
            placed[worker].append(sock)
        if len(placed) < workers:
            raise RuntimeError(f"connections landed on {len(placed)} of {workers} workers")
        triggers = [group[0] for group in placed.values()]
        # Every worker publishes `count` messages to its share: `count` x `subscribers` deliveries in all.
        publish_round(socks, triggers, 0, max(1, count // 10), size)  # warm-up
        worker_pids = child_pids(server.pid)
        before = [cpu_and_wait(pid) for pid in worker_pids]
        seconds = publish_round(socks, triggers, 1, count, size)
        after = [cpu_and_wait(pid) for pid in worker_pids]
        cpu = sum(a[0] - b[0] for a, b in zip(after, before))
        waited = sum(a[1] - b[1] for a, b in zip(after, before))
        deliveries = count * subscribers
        return {"deliveries/s": deliveries / seconds, "per CPU-second": deliveries / cpu if cpu else 0.0,
                "cpu": cpu / seconds, "wait": waited / seconds,
                "spread": ", ".join(f"{name}: {len(group)}" for name, group in sorted(placed.items()))}
    finally:
        close_sockets(socks)
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def child_pids(pid: int) -> List[int]:
    """The child processes of ``pid`` (the Supervisor's workers)."""
    children: List[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as listing:
            children.extend(int(child) for child in listing.read().split())
    return children


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class _Arrivals(wsmanager.WebSocket):
    """A client that hands each message's arrival time to a queue."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.arrivals: "queue.SimpleQueue[float]" = queue.SimpleQueue()

    def received_message(self, message: Any) -> None:
        self.arrivals.put(time.perf_counter())


def _wait_for_port(port: int, process: "subprocess.Popen[bytes]", timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((HOST, port), 1).close()
            return
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"nothing listens on port {port}") from None
            time.sleep(0.02)


def measure_redis_hop(samples: int) -> Optional[Dict[str, float]]:
    """Two chat servers (``python -m wsmanager serve --redis``) bridged by a redis-server; this process is the
    client of both. A message sent to server A comes back to its sender from A (local) and to a client of
    B through Redis: the difference of the two arrival times is what the hop adds."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        print("  redis-server is not installed: the Redis hop is not measured")
        return None
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(wsmanager.__file__)))
    redis_port, port_a, port_b = free_port(), free_port(), free_port()
    processes = [subprocess.Popen([redis_server, "--port", str(redis_port), "--bind", HOST, "--save", "",
                                   "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    clients = wsmanager.WebSocketManager()
    try:
        _wait_for_port(redis_port, processes[0])
        for port in (port_a, port_b):
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "wsmanager", "serve", "--port", str(port), "--redis",
                 f"redis://{HOST}:{redis_port}"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
            _wait_for_port(port, processes[-1])
        clients.start()
        sender = wsmanager.connect(f"ws://{HOST}:{port_a}/ws", _Arrivals)
        far = wsmanager.connect(f"ws://{HOST}:{port_b}/ws", _Arrivals)
        clients.add(sender)
        clients.add(far)
        deadline = time.monotonic() + 20
        while True:  # until B's subscription is up: a message crosses
            sender.send("warm-up")
            sender.arrivals.get(timeout=10)
            try:
                far.arrivals.get(timeout=0.2)
                break
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError("no message crossed Redis") from None
        time.sleep(0.3)
        while not far.arrivals.empty():
            far.arrivals.get()
        local: List[float] = []
        remote: List[float] = []
        for i in range(samples + 50):
            started = time.perf_counter()
            sender.send("x" * 64)
            local_at = sender.arrivals.get(timeout=10)
            remote_at = far.arrivals.get(timeout=10)
            if i >= 50:  # warm-up
                local.append(local_at - started)
                remote.append(remote_at - started)
            time.sleep(0.001)
    finally:
        clients.stop()
        clients.join(10)
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def quantile(values: List[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6

    added = [hop - direct for hop, direct in zip(remote, local)]
    return {"local p50": quantile(local, 0.5), "local p99": quantile(local, 0.99),
            "via Redis p50": quantile(remote, 0.5), "via Redis p99": quantile(remote, 0.99),
            "hop p50": quantile(added, 0.5), "hop p99": quantile(added, 0.99)}


def run_scale(p: Params, repeat: int) -> int:
    subscribers, count, size = p.scale_subscribers, p.scale_messages, 64
    print(f"## Scale: publish to {subscribers:,} subscribers ({count} messages of {size} B per worker, each worker to "
          f"its share), 1 and 2 worker processes (Supervisor, SO_REUSEPORT), interleaved, {repeat} repetition(s)")
    rates: Dict[int, List[float]] = {1: [], 2: []}
    efficiency: Dict[int, List[float]] = {1: [], 2: []}
    for rep in range(repeat):
        for workers in (1, 2):
            result = measure_publish(workers, subscribers, count, size)
            rates[workers].append(result["deliveries/s"])
            efficiency[workers].append(result["per CPU-second"])
            print(f"  {workers} worker(s), repetition {rep + 1}: {result['deliveries/s']:,.0f} deliveries/s "
                  f"({result['spread']}); workers' CPU {result['cpu']:.0%} + {result['wait']:.0%} waiting "
                  f"(of one core), {result['per CPU-second']:,.0f} deliveries per CPU-second; load average "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    one_cpu, two_cpu = statistics.median(efficiency[1]), statistics.median(efficiency[2])
    print(f"\n| publish to {subscribers:,} subscribers | deliveries/s | per worker CPU-second |\n|---|---|---|")
    print(f"| 1 worker | {one:,.0f} | {one_cpu:,.0f} |\n| 2 workers | {two:,.0f} | {two_cpu:,.0f} |")
    print(f"| scaling ratio (2 / 1) | {two / one:.2f}x | {two_cpu / one_cpu:.2f}x |")
    print(f"\n## Redis hop: {p.scale_latency_samples} messages, one at a time, to a chat server bridged to another "
          f"by Redis: round trip to the sender (local) and arrival at a client of the other server (via Redis), "
          f"microseconds from the send")
    hop = measure_redis_hop(p.scale_latency_samples)
    if hop is not None:
        print("\n| latency (us) | p50 | p99 |\n|---|---|---|")
        for name in ("local", "via Redis", "hop"):
            label = "added by the Redis hop" if name == "hop" else name
            print(f"| {label} | {hop[name + ' p50']:,.0f} | {hop[name + ' p99']:,.0f} |")
    return 0


###############################################################################
# Load check: the load command against the demo, next to S2 (issue 20.5) ######
###############################################################################

def load_command_trial(load_arguments: Sequence[str]) -> dict:
    """``python -m wsmanager load`` against a fresh ``python -m wsmanager serve``'s /echo, each process
    pinned as the benchmark pins its server and generator: the load command's JSON report, with the CPU
    seconds of the whole load process (start-up and report included: its rusage) and of the server over
    the load process's life (its schedstat)."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(wsmanager.__file__)))

    def pinned(cpu: Optional[int]) -> Callable[[], None]:
        return lambda: None if cpu is None else os.sched_setaffinity(0, {cpu})

    server = subprocess.Popen([sys.executable, "-m", "wsmanager", "serve", "--port", str(port)], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=pinned(CPUS["server"]))
    try:
        _wait_for_port(port, server)
        server_before = cpu_and_wait(server.pid)[0]
        load = subprocess.Popen([sys.executable, "-m", "wsmanager", "load", f"ws://{HOST}:{port}/echo", "--json",
                                 *load_arguments], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                preexec_fn=pinned(CPUS["generator"]))
        output = load.stdout.read() if load.stdout else b""
        _, status, usage = os.wait4(load.pid, 0)
        load.returncode = os.waitstatus_to_exitcode(status)
        server_cpu = cpu_and_wait(server.pid)[0] - server_before
    finally:
        server.send_signal(signal.SIGINT)  # a normal stop: 1001 to whatever is left
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    if not output:
        raise RuntimeError(f"the load command printed nothing (exit status {load.returncode})")
    report = json.loads(output)
    report.update(load_cpu=usage.ru_utime + usage.ru_stime, server_cpu=server_cpu, status=load.returncode)
    return report


def run_loadcheck(p: Params, repeat: int) -> int:
    """The load command's two checks, ``repeat`` times: it costs less CPU than the server it loads, and in
    S2's shape its messages per server CPU-second are within 20 % of S2's (picows against the benchmark's
    wsmanager server), S2 run just before; then the full-size run, 2,000 clients x 100 messages."""
    s2 = make_scenarios(p)["s2"]
    shape = ["--clients", str(p.s2_connections), "--in-flight", str(p.s2_in_flight), "--size", str(p.s2_size),
             "--text", "--messages", str(p.loadcheck_per_connection), "--rate", "0"]
    print(f"## Load check: python -m wsmanager load {' '.join(shape)} against python -m wsmanager serve's "
          f"/echo, next to S2 ({p.s2_per_connection:,} round trips per connection), {repeat} repetition(s)\n")
    print("| run | load CPU s | server CPU s | load / server CPU | S2: picows / server CPU | "
          "load msg per server CPU-s | S2 msg per server CPU-s | load / S2 | met? |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    status = 0
    for rep in range(repeat):
        try:
            bench = run_trial(s2, "wsmanager", p, None)
            load = load_command_trial(shape)
        except Exception as exc:
            print(f"| {rep + 1} | FAILED: {exc} ||||||||")
            status = 1
            continue
        bench_rate = bench["values"]["rate"] / bench["server_cpu"]
        load_rate = load["answered"] / load["server_cpu"]
        cpu_ratio, agreement = load["load_cpu"] / load["server_cpu"], load_rate / bench_rate
        met = cpu_ratio < 1 and abs(agreement - 1) <= 0.2 and not load["errors"] and not bench["errors"]
        errors = f" (errors: {load['errors'] or bench['errors']})" if load["errors"] or bench["errors"] else ""
        print(f"| {rep + 1} | {load['load_cpu']:.2f} | {load['server_cpu']:.2f} | {cpu_ratio:.2f}x | "
              f"{bench['generator_cpu'] / bench['server_cpu']:.2f}x | {load_rate:,.0f} | {bench_rate:,.0f} | {agreement:.2f}x | {'yes' if met else 'NO'}{errors} |",
              flush=True)
    full = ["--clients", str(p.s5_clients), "--messages", "100", "--size", "64", "--text"]
    print(f"\n## Full size: python -m wsmanager load ws://.../echo {' '.join(full)} against python -m "
          "wsmanager serve\n")
    try:
        report = load_command_trial(full)
    except Exception as exc:
        print(f"  FAILED: {exc}")
        return 1
    for name in ("connected", "connect_ms", "answered", "round_trip_ms", "messages_per_second", "seconds",
                 "errors"):
        print(f"  {name:<20}{report[name]}")
    print(f"  CPU: load process {report['load_cpu']:.2f} s, server {report['server_cpu']:.2f} s "
          f"({report['load_cpu'] / report['server_cpu']:.2f}x)")
    return status or report["status"]


###############################################################################
# Main #########################################################################
###############################################################################

SCENARIO_ORDER = ("s1", "s2", "s2node", "s3", "s4", "s5", "s6", "s6c", "codec", "import", "idle", "z2", "z3", "z5", "z5ctx", "zmem1k",
                  "zmem10k", "zmemctx10k", "zparams")


###############################################################################
# Charts: results as SVG, for the documentation ###############################
###############################################################################

# Written by hand, with no plotting dependency: a chart is a few rectangles and labels, and the same
# results always give the same bytes (the docs' charts are checked against their results file).
CHART_COLOURS = {"wsmanager": "#2b6cb0", "websockets": "#dd6b20", "ceiling": "#a0aec0"}
CHARTS = {
    # file name -> (title, the rows it shows: metric labels)
    "throughput.svg": ("Messages and connections per second (higher is better)",
                       ("S1 latency", "S2 small messages", "S5 broadcast", "S4 handshakes",
                        "S6c concurrent client connections")),
    "memory.svg": ("Memory per connection, KiB of RSS (lower is better)",
                   ("S4 server RSS per connection", "S6 client RSS per connection",
                    "deflate, 10,000 idle connections: server RSS per connection",
                    "deflate, 10,000 connections after 1 message: server RSS per connection")),
}


def results_document(metrics: Sequence[Metric], machine: str) -> Dict[str, Any]:
    """The medians of a run as a JSON-ready dict: what ``--json`` writes and ``--plot`` reads."""
    rows = [{"label": metric.label, "unit": metric.unit, "higher_is_better": metric.higher_is_better,
             "values": {column: metric.median(column) for column in IMPLEMENTATIONS
                        if column in metric.columns and metric.median(column) is not None},
             "lower_bounds": [column for column in IMPLEMENTATIONS
                              if column in metric.columns and metric.columns[column] in metric.lower_bounds]}
            for metric in metrics]
    return {"machine": machine, "rows": rows}


def _svg_text(x: float, y: float, text: str, anchor: str = "start", size: float = 13, weight: str = "normal",
              colour: str = "#1a202c") -> str:
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" font-weight="{weight}" '
            f'fill="{colour}">{escaped}</text>')


def svg_bar_chart(title: str, rows: Sequence[Dict[str, Any]], machine: str) -> str:
    """Horizontal bars, one group per row, one bar per implementation. Each group is scaled to its
    own largest value (rows have different units); the figure and the ratio to websockets are printed."""
    width, left, right, bar, heading, gap = 860, 110, 230, 18, 22, 16
    footer = textwrap.wrap(machine, 135)
    height = 48 + sum(heading + bar * len(row["values"]) + gap for row in rows) + 16 * len(footer) + 14
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" font-family="system-ui, -apple-system, \'Segoe UI\', sans-serif">',
             f"<title>{title}</title>", f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
             _svg_text(20, 30, title, size=16, weight="600")]
    y = 48.0
    span = width - left - right
    for row in rows:
        values = row["values"]
        largest = max(values.values())
        parts.append(_svg_text(20, y + 15, f'{row["label"]} ({row["unit"]})', size=13, weight="600"))
        y += heading
        reference = values.get("websockets")
        for impl in IMPLEMENTATIONS:
            if impl not in values:
                continue
            value = values[impl]
            length = max(1.0, span * value / largest) if largest else 1.0
            parts.append(_svg_text(left - 8, y + bar - 6, impl, anchor="end", size=12, colour="#4a5568"))
            parts.append(f'<rect x="{left}" y="{y:.1f}" width="{length:.1f}" height="{bar - 4}" '
                         f'fill="{CHART_COLOURS[impl]}"><title>{impl}: {fmt(value)} {row["unit"]}</title></rect>')
            label = ("\u2265 " if impl in row.get("lower_bounds", ()) else "") + fmt(value)
            if impl == "wsmanager" and reference:
                label += f"  ({value / reference:.2f}x websockets)"
            parts.append(_svg_text(left + length + 6, y + bar - 6, label, size=12))
            y += bar
        y += gap
    for number, line in enumerate(footer):
        parts.append(_svg_text(20, y + 4 + 16 * number, line, size=11.5, colour="#4a5568"))
    if any(row.get("lower_bounds") for row in rows):
        parts.append(_svg_text(width - 20, 30, "\u2265: a lower bound (the load generator was saturated)",
                               anchor="end", size=11.5, colour="#4a5568"))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_charts(document: Dict[str, Any], directory: str) -> List[str]:
    """Write the charts of a results document into ``directory``; return the paths written."""
    os.makedirs(directory, exist_ok=True)
    by_label = {row["label"]: row for row in document["rows"] if row["values"]}
    written = []
    for name, (title, labels) in CHARTS.items():
        rows = [by_label[label] for label in labels if label in by_label]
        if not rows:
            continue
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as out:
            out.write(svg_bar_chart(title, rows, document["machine"]))
        written.append(path)
    return written


def machine_description(repeat: int, quick: bool) -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    return (f"{os.cpu_count()} CPUs ({model}), CPython {sys.version.split()[0]}, websockets "
            f"{websockets.version.version if websockets is not None else '-'}, load average "
            f"{os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d')}; medians of {repeat} interleaved "
            f"repetition(s){' (quick: every scenario about 10x smaller)' if quick else ''}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    parser = argparse.ArgumentParser(
        description="Benchmark wsmanager against websockets (reference) and a raw-TCP selectors ceiling. "
                    "Scenarios and methodology are described in this file's docstring.",
        epilog="scenarios: s1 latency, s2 small messages, s3 large messages, s4 connections, s5 broadcast, "
               "s6 client side, codec, idle; z2 z3 z5 (s2 s3 s5 with permessage-deflate), zmem1k zmem10k "
               "z5ctx, zmemctx10k (memory with deflate); zparams (zlib window x memLevel table); soak, scale and loadcheck (only when named).",
        formatter_class=Formatter)
    parser.add_argument("scenarios", nargs="*", metavar="scenario", default=list(SCENARIO_ORDER),
                        help="scenarios to run, in this order; soak runs only when named")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of every implementation, interleaved")
    parser.add_argument("--quick", action="store_true", help="every scenario about 10x smaller (smoke run)")
    parser.add_argument("--seconds", type=float, default=Params.soak_seconds, help="duration of soak")
    parser.add_argument("--baseline", metavar="DIR", default=None,
                        help="import: also the self time of DIR/wsmanager.py (e.g. main's), interleaved")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="cProfile every wsmanager server process into DIR and print its top functions")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="also write the medians and the machine to FILE (what --plot reads)")
    parser.add_argument("--svg", metavar="DIR", default=None,
                        help="also write the results as SVG charts into DIR (throughput.svg, memory.svg)")
    parser.add_argument("--plot", metavar="FILE", default=None,
                        help="run nothing: draw the charts of a --json FILE into the --svg DIR")
    args = parser.parse_args(argv)
    if args.plot and not args.svg:
        parser.error("--plot needs --svg DIR")
    unknown = [name for name in args.scenarios if name not in SCENARIO_ORDER + ("soak", "scale", "loadcheck")]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose among {', '.join(SCENARIO_ORDER)}, soak, "
                     "scale, loadcheck")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.plot:
        import json
        with open(args.plot, encoding="utf-8") as source:
            for path in write_charts(json.load(source), args.svg):
                print("wrote", path)
        return 0
    missing = [name for name, module in (("websockets", websockets), ("picows", picows)) if module is None]
    if missing:
        print(f"missing {', '.join(missing)}: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    raise_fd_limit()
    p = Params(soak_seconds=args.seconds)
    if args.quick:
        p = p.quick()
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    chosen = args.scenarios
    with open(wsmanager.__file__, "rb") as source:
        digest = hashlib.sha1(source.read()).hexdigest()[:12]
    print(f"# wsmanager {wsmanager.__version__} ({wsmanager.__file__}, sha1 {digest}) against websockets "
          f"{websockets.version.version}; load generator picows {getattr(picows, '__version__', '?')}; "
          f"Python {sys.version.split()[0]}")
    print(f"CPUs: server {CPUS['server']}, generator {CPUS['generator']} (of {os.cpu_count()}); "
          f"load average {os.getloadavg()[0]:.2f}; repeat {args.repeat}{'; quick' if args.quick else ''}")
    started = time.monotonic()
    status = 0
    metrics: List[Metric] = []
    scenarios_run: List[Scenario] = []
    scenarios = make_scenarios(p)
    for name in SCENARIO_ORDER:
        if name not in chosen:
            continue
        if name == "codec":
            metrics.extend(run_codec(p, args.repeat))
            continue
        if name == "import":
            metrics.extend(run_import_time(args.repeat, args.baseline))
            continue
        if name == "zparams":
            metrics.extend(run_zparams(args.repeat))
            continue
        if name == "s2node" and node_generator() is None:
            print("\n## s2node skipped: node is not on PATH")
            continue
        scenario = scenarios[name]
        run_scenario(scenario, p, args.repeat, args.profile)
        scenarios_run.append(scenario)
        metrics.extend(scenario.metrics.values())
        metrics.extend(scenario.extra_metrics)
    if metrics:
        print(f"\n## Results: medians of {args.repeat} interleaved repetition(s)"
              f"{' (quick)' if args.quick else ''}, {time.monotonic() - started:.0f} s, "
              f"load average now {os.getloadavg()[0]:.2f}\n")
        print(markdown_table(metrics))
        if scenarios_run:
            print("\nCPU shares over the timed intervals, medians: CPU used + time runnable but waiting for a CPU "
                  "(taken by other processes). s6: the client under test / the echo server.\n")
            print(share_table(scenarios_run))
            efficiency = [metric for scenario in scenarios_run if scenario.efficiency is not None
                          for metric in (scenario.efficiency, *scenario.extra_efficiency)]
            if efficiency:
                print("\nWork per CPU-second of the side under test (the server; s6: the client), medians. "
                      "Less sensitive than the rates above to other processes taking CPU time; a side that\n"
                      "is not saturated batches less, so this understates its capacity:\n")
                print(markdown_table(efficiency))
        if any(metric.verdict() == "n/a" for metric in metrics):
            status = 1  # a trial failed: its row has no median
        if args.json or args.svg:
            document = results_document(metrics, machine_description(args.repeat, args.quick))
            if args.json:
                import json
                with open(args.json, "w", encoding="utf-8") as out:
                    json.dump(document, out, indent=1)
                print("wrote", args.json)
            if args.svg:
                for path in write_charts(document, args.svg):
                    print("wrote", path)
    if "soak" in chosen:
        print()
        status = run_soak(p) or status
    if "scale" in chosen:
        print()
        status = run_scale(p, args.repeat) or status
    if "loadcheck" in chosen:
        print()
        status = run_loadcheck(p, args.repeat) or status
    return status


if __name__ == "__main__":
    sys.exit(main())
