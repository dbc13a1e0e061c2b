"""wsmanager: thousands of WebSocket connections in one thread.

A single file with no dependencies but the Python standard library (3.9+):
a strict RFC 6455 frame codec, the opening handshakes of both sides, and a
manager loop over :mod:`selectors` that runs server and client connections,
plain or TLS, in one thread. Copy ``wsmanager.py`` into your tree, or
install it from a clone (``pip install .``; not on PyPI yet).

An echo server and a client, in one manager::

    import threading
    import wsmanager

    class Echo(wsmanager.WebSocket):
        def received_message(self, message):
            self.send(message)

    class Hello(wsmanager.WebSocket):
        def opened(self):
            self.send("hello")

        def received_message(self, message):
            print(message)  # hello
            answered.set()

    answered = threading.Event()
    with wsmanager.WebSocketManager() as manager:
        host, port = manager.listen(("127.0.0.1", 0), Echo)
        manager.add(wsmanager.connect(f"ws://{host}:{port}/", Hello))
        answered.wait(5)

Layers, bottom up, each usable alone, and the file's chapters in that order
(a reader meets each thing before what uses it): the codec
(:class:`FrameParser`, :func:`encode_frame`, :class:`MessageAssembler`, close
payloads), the handshake (pure functions over bytes), permessage-deflate
(:class:`Deflate`, its negotiation, :class:`PerMessageDeflate`), the
connection (:class:`WebSocket`), the client (:func:`connect`, and the opening
that :meth:`WebSocketManager.connect` shares with it) and the manager
(:class:`WebSocketManager`). On top, the integrations:
:meth:`WebSocketManager.wsgi_app` shares the port of a WSGI application
(wsgiref with :class:`WSGIRequestHandler`, gunicorn, Flask, CherryPy); and for
more than one core or host: topics (``manager.publish``), a Redis pub/sub
bridge (:class:`RedisBridge`) and worker processes (:class:`Supervisor`).
Last, the command line (``main()``): run ``python -m wsmanager --help`` for
the demo chat server and client.

Internal classes, one job each: ``_Protocol`` is a connection's protocol with
no I/O (its state, the close handshake, its output and the flow control over
it; :class:`WebSocket` does its I/O), ``_Receiver`` its receive path (parser,
assembler, inflation, partial UTF-8 check), ``_Setting`` one per-connection
setting (instance, then class, then manager); ``_Loop`` is the selector loop a
manager owns and the one API everything registered in it uses (``_Handler``
is what it calls, ``_Flushable`` what its flush queue takes), ``_Owner`` what
listeners, handshakes and reconnections use of their manager, ``_Life`` and
``_LIFE`` the manager's life and its transitions, ``_Topics`` the manager's
topics and the bridge attached to them; ``_Listener`` holds a listening
socket and the server's handshake policy (``accept(request) -> Response``);
``_ServerHandshake`` reads one server connection's request head before its
101, ``_ClientHandshake`` connects, handshakes and reads the 101 of one
:meth:`WebSocketManager.connect` in the loop (both are a ``_Handshake``: a
deadline and a TLS handshake), with the request and the check of the answer
that ``_ClientOpening`` shares with :func:`connect` (and ``_ProxyTunnel``, the
CONNECT through an HTTP proxy); ``_Redial`` is one reconnecting client of
:meth:`WebSocketManager.connect`; ``_WSGIHandOff`` is the WSGI application of
:meth:`WebSocketManager.wsgi_app` and ``_Placeholder`` what it leaves the
host in place of the socket it takes; ``_RedisConnection`` and
``_RespParser`` are the bridge's socket and its RESP reader.
"""

from __future__ import annotations  # annotations are not evaluated: typing costs nothing at import

__version__ = "0.1.0"
__license__ = "MIT"

__all__ = [
    # constants and enums
    "Opcode", "CloseCode", "State", "DEFAULT_MAX_FRAME_SIZE", "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_BUFFERED", "MAX_HEAD_SIZE", "MAX_HEADER_LINES", "MAX_TOPIC_LENGTH",
    # exceptions
    "WebSocketError", "ProtocolError", "HandshakeError", "InvalidURL", "ConnectionClosed", "BufferFull",
    "ManagerStopped",
    # codec
    "Frame", "Close", "apply_mask", "encode_frame", "FrameParser", "MessageAssembler",
    "encode_close", "parse_close", "Deflate", "DeflateParams", "PerMessageDeflate",
    # handshake
    "Headers", "Request", "Response", "HeadReader", "accept_key", "new_key",
    "encode_request", "parse_request", "validate_request", "encode_switching_protocols", "encode_response",
    "parse_response", "validate_response", "parse_extensions", "negotiate_deflate", "encode_deflate_offer",
    "parse_deflate_response",
    # connection and manager
    "WebSocket", "WebSocketManager", "connect", "Reconnect", "MAX_REDIRECTS",
    # integrations
    "WSGIRequestHandler",
    # scaling out: Redis bridge and worker processes
    "RedisBridge", "Supervisor",
]

import codecs
import collections
import contextlib
import enum
import errno
import heapq
import os
import re
import selectors
import socket
import struct
import sys
import threading
import time
import types
from typing import (TYPE_CHECKING, Any, Callable, Deque, Dict, FrozenSet, Iterable, Iterator, List,
                    NoReturn, Optional, Protocol, Sequence, Set, Tuple, TypeVar, Union, cast, overload)

if TYPE_CHECKING:
    from typing import NamedTuple as _NamedTuple
    _LazyPattern = re.compile
    import base64
    import hashlib
    import logging
    import signal
    import ssl
    import urllib.parse
    import zlib
else:
    def _lazy_module(name: str) -> types.ModuleType:
        """A stand-in for module ``name`` that imports it on first use: no cost at import.

        Deliberate: these modules are most of what ``import wsmanager`` would
        cost (``ssl`` and ``logging`` above all), and many programs never
        touch TLS, compression, signals or a log line. Each attribute is
        fetched from the real module once and kept in the stand-in, whose
        ``__getattr__`` (PEP 562) runs only for a missing one: later uses cost
        a plain module attribute look-up, and the global naming the stand-in
        never changes.
        """
        stand_in = types.ModuleType(name)

        def __getattr__(attribute: str) -> Any:
            __import__(name)
            value = getattr(sys.modules[name.partition(".")[0]], attribute)
            setattr(stand_in, attribute, value)
            return value

        stand_in.__getattr__ = __getattr__
        return stand_in

    base64, hashlib, logging, signal, ssl, zlib = map(
        _lazy_module, ("base64", "hashlib", "logging", "signal", "ssl", "zlib"))
    urllib = _lazy_module("urllib.parse")

    class _NamedTupleType(type):
        """The class statement of a ``typing.NamedTuple``, at a third of its cost at import.

        Deliberate: typing.NamedTuple checks each field's annotation at run time, a compile()
        each (annotations are strings here), and mypy checks them anyway. The class made is the
        one typing makes: collections.namedtuple's, with the statement's docstring, methods
        and annotations.
        """

        def __new__(cls, name: str, bases: Tuple[type, ...], namespace: Dict[str, Any]) -> Any:
            fields = namespace.get("__annotations__", {})
            defaults = [namespace[field] for field in fields if field in namespace]
            record = collections.namedtuple(name, fields, defaults=defaults, module=namespace["__module__"])
            record.__annotations__ = record.__new__.__annotations__ = fields
            for key in namespace.keys() - fields.keys() - {"__annotations__", "__module__"}:
                setattr(record, key, namespace[key])
            return record

    _NamedTuple = type.__new__(_NamedTupleType, "NamedTuple", (), {})

    class _LazyPattern:
        """``re.compile(pattern)``, compiled on first use: a handshake's patterns cost 0.3 ms at import.

        The compiled pattern's methods are kept here once fetched: a plain attribute look-up from then on.
        """

        def __init__(self, pattern: Union[str, bytes]):
            self.pattern = pattern

        def __getattr__(self, attribute: str) -> Any:
            value = getattr(re.compile(self.pattern), attribute)
            setattr(self, attribute, value)
            return value


def _tls_step(sock: Any) -> int:
    """One step of a non-blocking TLS handshake: 0 once it is complete, else the selector event
    it waits for. A failed handshake raises (``ssl.SSLError``, ``OSError``)."""
    try:
        sock.do_handshake()
    except ssl.SSLWantReadError:
        return selectors.EVENT_READ
    except ssl.SSLWantWriteError:
        return selectors.EVENT_WRITE
    return 0


def _is_tls(sock: Any) -> bool:
    """Whether ``sock`` is an ``ssl.SSLSocket``, without importing ``ssl`` (none exists before it is)."""
    # getattr: while another thread imports ssl, sys.modules holds it half made, without SSLSocket.
    ssl_socket = getattr(sys.modules.get("ssl"), "SSLSocket", None)
    return ssl_socket is not None and isinstance(sock, ssl_socket)


def _would_block() -> Tuple[type[BaseException], ...]:
    """What a non-blocking socket (plain or TLS) raises when it cannot go on now: try again at the next event.

    For ``except _would_block():``, which calls it only once something was raised. ssl's two are
    there once ssl is imported (wsmanager imports it lazily, and no TLS socket exists before);
    until then BlockingIOError stands in for them.
    """
    module = sys.modules.get("ssl")  # getattr: ssl may be half made (another thread importing it)
    return (BlockingIOError, InterruptedError, getattr(module, "SSLWantReadError", BlockingIOError),
            getattr(module, "SSLWantWriteError", BlockingIOError))


class _Logger:
    """``logging.getLogger("wsmanager")``, made on the first log call (``logging`` is imported lazily).

    Its methods are the real logger's, kept here once fetched (a plain attribute look-up from
    then on); its data (``level``, ``handlers``) is read from the real logger on each use.
    """

    def __getattr__(self, attribute: str) -> Any:
        value = getattr(logging.getLogger("wsmanager"), attribute)
        if callable(value):
            setattr(self, attribute, value)
        return value


logger = cast("logging.Logger", _Logger())


###############################################################################
# Constants and enums #########################################################
###############################################################################

class Opcode(enum.IntEnum):
    """Frame opcodes of RFC 6455, section 5.2."""

    CONTINUATION = 0
    TEXT = 1
    BINARY = 2
    CLOSE = 8
    PING = 9
    PONG = 10


class CloseCode(enum.IntEnum):
    """Close status codes of RFC 6455, section 7.4, and the IANA registry."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005  # local only: a close frame without a code
    ABNORMAL = 1006  # local only: no close frame at all
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015  # local only


class State(enum.IntEnum):
    """Life of a connection, from the opening handshake to the closed socket."""

    CONNECTING = 0
    OPEN = 1
    CLOSING = 2  # our close frame is queued; the peer's has not arrived yet
    CLOSED = 3  # close frames exchanged (or the connection failed); the socket winds down


# Deliberate: plain globals for the hot paths, where an enum member lookup costs ~5x as much.
_CONNECTING, _OPEN, _CLOSING, _CLOSED = State
_CONTINUATION, _TEXT, _BINARY = Opcode.CONTINUATION, Opcode.TEXT, Opcode.BINARY
_CLOSE, _PING, _PONG = Opcode.CLOSE, Opcode.PING, Opcode.PONG

# What send() and the codec take as binary data (typing.Buffer is 3.12+).
_BytesLike = Union[bytes, bytearray, memoryview]

# The defaults of the limits (each documented where it is set), and the I/O bounds all chapters share.
DEFAULT_MAX_FRAME_SIZE = 2 ** 20
DEFAULT_MAX_MESSAGE_SIZE = 2 ** 20
DEFAULT_MAX_BUFFERED = 4 * 2 ** 20
DEFAULT_CLOSE_TIMEOUT = 5.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_BRIDGE_MAX_PENDING = 8 * 2 ** 20  # bytes of PUBLISH commands waiting for the Redis socket
DEFAULT_BRIDGE_MAX_MESSAGE = 64 * 2 ** 20  # largest reply the bridge reads from Redis
READ_SIZE = 64 * 1024  # bytes read per readiness event: bounds what one peer gets per loop turn
WRITES_PER_FLUSH = 16  # socket writes per connection per loop turn, so one fast reader cannot hog the loop


###############################################################################
# Exceptions ##################################################################
###############################################################################

class WebSocketError(Exception):
    """Base of every error wsmanager raises on purpose."""


class ProtocolError(WebSocketError):
    """The peer broke RFC 6455; ``code`` is the close code to answer with."""

    def __init__(self, code: int, reason: str = ""):
        super().__init__(f"{reason} (close code {code})" if reason else f"close code {code}")
        self.code = code
        self.reason = reason


class HandshakeError(WebSocketError):
    """An opening handshake failed.

    On the server side ``status`` is the HTTP status to answer with and
    ``headers`` the extra headers to send. On the client side ``status`` and
    ``headers`` are what the server sent (``None`` and ``[]`` when its
    response was malformed or missing), and ``response`` the parsed
    :class:`Response` (its ``headers`` a case-insensitive :class:`Headers`).
    """

    def __init__(self, message: str, status: Optional[int] = 400,
                 headers: Sequence[Tuple[str, str]] = (), response: "Optional[Response]" = None):
        super().__init__(message)
        self.status = status
        self.headers = list(headers)
        self.response = response


class InvalidURL(WebSocketError, ValueError):
    """:func:`connect` was given a URL it cannot use (not ``ws://`` or ``wss://``, no host, a bad port)."""


class ConnectionClosed(WebSocketError):
    """The connection is closing or closed: nothing more can be sent.

    ``code`` and ``reason`` are what :meth:`WebSocket.closed` gets (or will
    get) once they are known: the peer's close frame, the code the
    connection was failed with, or 1006. Both are ``None`` while our close
    frame waits for the peer's answer.
    """

    def __init__(self, message: str, code: Optional[int] = None, reason: Optional[str] = None):
        super().__init__(message)
        self.code = code
        self.reason = reason


class BufferFull(WebSocketError):
    """:meth:`WebSocket.send` could not queue a message without waiting, and must not wait.

    Raised in the loop thread (a callback) or for a connection no loop
    runs, when more than twice ``max_buffered`` is already queued: the
    message is not queued and the connection stays open. Send again from
    :meth:`WebSocket.drained`, which runs once the backlog is down to a
    quarter of ``max_buffered``.
    """


class ManagerStopped(WebSocketError, RuntimeError):
    """The manager is stopping or has stopped: it takes no new connection, listener or bridge.

    Also a :class:`RuntimeError`, which it was before it had a class of its own.
    """


###############################################################################
# Codec: masking, frames, close payloads, UTF-8 ###############################
###############################################################################

class Frame(_NamedTuple):
    """One WebSocket frame, payload unmasked."""

    opcode: Opcode
    payload: bytes
    fin: bool = True
    rsv1: bool = False
    rsv2: bool = False
    rsv3: bool = False


class Close(_NamedTuple):
    """A parsed close frame: ``code`` is 1005 when the frame carried none."""

    code: int
    reason: str


def _xor_tables() -> List[bytes]:
    """One table per key byte ``k`` for bytes.translate, ``tables[k][i] == i ^ k``: 64 KiB."""
    # Built by doubling, one C translate() per table (a generator over 65,536 bytes would cost
    # ms at import): the tables of k and k | bit differ by the XOR with ``bit``, itself a table
    # made by one big-int XOR of the identity with ``bit`` in every byte.
    identity = bytes(range(256))
    number, ones = int.from_bytes(identity, "big"), int.from_bytes(b"\x01" * 256, "big")
    tables = [identity]
    for bit in (1, 2, 4, 8, 16, 32, 64, 128):
        swap = (number ^ ones * bit).to_bytes(256, "big")
        tables += [table.translate(swap) for table in tables]
    return tables


_XOR_TABLES = _xor_tables()
_TRANSLATE_THRESHOLD = 512  # below it one big-int XOR is faster; above, four strided translates


def _translate_mask(data: _BytesLike, key: Union[bytes, bytearray]) -> bytes:
    """apply_mask of a large payload on the standard library alone."""
    # Deliberate: each of the four byte lanes is translated through its XOR table in C, in
    # place in one bytearray copy (strided slices of a bytearray are much faster than of bytes).
    out = bytearray(data)
    tables = _XOR_TABLES
    out[0::4] = out[0::4].translate(tables[key[0]])
    out[1::4] = out[1::4].translate(tables[key[1]])
    out[2::4] = out[2::4].translate(tables[key[2]])
    out[3::4] = out[3::4].translate(tables[key[3]])
    return bytes(out)


def _find_mask_accelerator() -> Optional[Callable[[_BytesLike, Union[bytes, bytearray]], bytes]]:
    """The fastest C masking function installed, or ``None``: websockets' ``speedups.apply_mask``
    (about 30 GB/s on 1 MiB), else wsaccel's ``XorMaskerSimple`` (about 2 GB/s, a byte loop)."""
    try:
        from websockets.speedups import apply_mask as c_apply_mask  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        pass
    else:
        return cast("Callable[[_BytesLike, Union[bytes, bytearray]], bytes]", c_apply_mask)
    try:
        from wsaccel.xormask import XorMaskerSimple  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None

    def wsaccel_mask(data: _BytesLike, key: Union[bytes, bytearray]) -> bytes:
        return cast(bytes, XorMaskerSimple(bytes(key)).process(data))

    return wsaccel_mask


def _first_large_mask(data: _BytesLike, key: Union[bytes, bytearray]) -> bytes:
    """_large_mask until the first large payload: looks for an accelerator once, then puts the
    function that masks from now on in its own place."""
    global _large_mask, _small_mask
    try:
        accelerator = _find_mask_accelerator()
    except OSError:
        # Out of descriptors (EMFILE): no module can be imported now, as each is a file to open.
        # This payload is masked in pure Python (the same bytes), and the next one looks again.
        return _translate_mask(data, key)
    _small_mask = accelerator  # in C, a small payload costs a fifth of the big-int XOR too
    _large_mask = accelerator or _translate_mask
    return _large_mask(data, key)


# How payloads of _TRANSLATE_THRESHOLD bytes and more are masked. Looked up on the first one, not
# at import (the look-up imports a package: about 12 ms for websockets), so a program that never
# masks a large payload pays nothing; the ``speedups`` extra installs the accelerator. On the
# standard library alone it is _translate_mask, the same code as with no accelerator at all.
_large_mask: Callable[[_BytesLike, Union[bytes, bytearray]], bytes] = _first_large_mask
# Smaller payloads: the accelerator once the first large payload found one, else None (pure Python).
_small_mask: Optional[Callable[[_BytesLike, Union[bytes, bytearray]], bytes]] = None


def apply_mask(data: _BytesLike, key: Union[bytes, bytearray]) -> bytes:
    """XOR ``data`` with the 4-byte ``key`` repeated (RFC 6455 5.3); masking and unmasking alike.

    Runs in C when websockets' ``speedups`` or ``wsaccel`` is installed
    (the ``speedups`` extra installs websockets): looked for on the first payload of
    512 bytes or more, and used for every payload from then on. Else, and
    until then for smaller payloads, in pure Python.
    """
    n = len(data)
    if n >= _TRANSLATE_THRESHOLD:
        return _large_mask(data, key)
    small_mask = _small_mask
    if small_mask is not None:
        return small_mask(data, key)
    if not n:
        return b""
    # Deliberate: one arbitrary-precision XOR runs in C over the whole payload.
    repeated = (key * ((n + 3) >> 2))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")).to_bytes(n, "little")


_get_ident = threading.get_ident
_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack
_mask_keys = b""


def _random_mask_key() -> bytes:
    # os.urandom costs a system call; drawing 4 KiB at a time keeps the keys
    # from the OS entropy source (RFC 6455 5.3) at a fraction of the cost.
    global _mask_keys
    keys = _mask_keys
    if not keys:
        keys = os.urandom(4096)
    _mask_keys = keys[4:]
    return keys[:4]


def _byte_view(payload: Any) -> Union[bytes, memoryview]:
    """The bytes of any bytes-like object, as a flat view of unsigned bytes (or a copy).

    ``len()`` of a memoryview with wider items, an ``array('d')`` or a numpy
    array counts items, not bytes: framing must count ``nbytes``. A view that
    is not C-contiguous is copied in C order (what ``bytes(obj)`` would give).
    Raises :class:`TypeError` for an object that is not bytes-like.
    """
    view = memoryview(payload)
    if not view.c_contiguous:
        return view.tobytes()
    if view.format != "B" or view.ndim != 1:
        return view.cast("B")
    return view


def encode_frame(opcode: int, payload: _BytesLike, *, fin: bool = True,
                 mask: Union[bool, bytes] = False, rsv1: bool = False) -> bytes:
    """Serialize one frame.

    ``payload`` is any bytes-like object; its bytes (``nbytes``, not its item
    count) are sent. ``mask=True`` draws a fresh random key (clients must
    mask, RFC 6455 5.3); ``mask=b"abcd"`` uses the given key. Raises
    :class:`ValueError` for an unknown opcode or a control frame that is
    fragmented or over 125 bytes, :class:`TypeError` for a payload that is
    not bytes-like.
    """
    if type(payload) is not bytes and type(payload) is not bytearray:  # deliberate: exact types first
        payload = _byte_view(payload)
    n = len(payload)
    if n < 126 and fin and not mask and not rsv1 and 0 <= opcode <= 2:
        return _SHORT_HEADERS[opcode][n] + payload  # deliberate: the common server frame, one concat
    if opcode not in _OPCODES_BY_VALUE:
        raise ValueError(f"unknown opcode {opcode}")
    if opcode >= 8 and (n > 125 or not fin):
        raise ValueError("control frames must be final and carry at most 125 bytes")
    first = opcode | (0x80 if fin else 0) | (0x40 if rsv1 else 0)
    if not mask:
        if n < 126:
            return bytes((first, n)) + payload
        if n < 65536:
            return _pack_short(first, 126, n) + payload
        return _pack_long(first, 127, n) + payload
    key = _random_mask_key() if mask is True else bytes(mask)
    if len(key) != 4:
        raise ValueError("a mask key is 4 bytes")
    if n < 126:
        header = bytes((first, 0x80 | n))
    elif n < 65536:
        header = _pack_short(first, 0xFE, n)
    else:
        header = _pack_long(first, 0xFF, n)
    return header + key + apply_mask(payload, key)


_OPCODES_BY_VALUE = {op.value: op for op in Opcode}
# Final, unmasked data frames under 126 bytes: their 2-byte header, precomputed per opcode and length.
_SHORT_HEADERS = [[bytes((0x80 | opcode, n)) for n in range(126)] for opcode in range(3)]
_OPCODE_LIST = [_OPCODES_BY_VALUE.get(value) for value in range(16)]
# First header byte -> is it acceptable (no RSV bit, known opcode)? One lookup on the hot path.
_GOOD_FIRST_BYTE = [not (b & 0x70) and _OPCODE_LIST[b & 0x0F] is not None for b in range(256)]
# The same once permessage-deflate is negotiated. RFC 7692 6: RSV1 marks the first frame of a
# compressed message, so it is valid on TEXT and BINARY only, never on a continuation or control frame.
_GOOD_FIRST_BYTE_RSV1 = [good or (b & 0x70 == 0x40 and b & 0x0F in (1, 2)) for b, good in enumerate(_GOOD_FIRST_BYTE)]
_new_frame = tuple.__new__  # deliberate: skips NamedTuple.__new__'s argument handling


def _first_byte_error(first: int, allow_rsv1: bool = False) -> ProtocolError:
    rsv = first & 0x70
    if rsv and not (allow_rsv1 and rsv == 0x40):
        return ProtocolError(CloseCode.PROTOCOL_ERROR, "reserved bits set without a negotiated extension")
    if _OPCODE_LIST[first & 0x0F] is None:  # with RSV1 negotiated too: the opcode is the fault
        return ProtocolError(CloseCode.PROTOCOL_ERROR, f"reserved opcode {first & 0x0F}")
    return ProtocolError(CloseCode.PROTOCOL_ERROR, "RSV1 set on a continuation or control frame")


class FrameParser:
    """Incremental, sans-I/O frame parser: bytes in, :class:`Frame` objects out.

    ``feed()`` accepts any split of the stream, down to one byte at a time,
    and does work linear in the bytes fed. Frame-level violations raise
    :class:`ProtocolError` with code 1002, or 1009 for a frame declared
    larger than ``max_frame_size`` (raised as soon as its header is read,
    before any of its payload is buffered). When complete frames precede a
    violation in the same input, they are returned first and the error is
    raised by the next call (``feed(b"")`` will do); ``error`` holds it.

    RSV1 is accepted only with ``allow_rsv1`` (permessage-deflate was
    negotiated), and then only on TEXT and BINARY frames; ``Frame.rsv1``
    reports it. RSV2 and RSV3 are always 1002.
    """

    __slots__ = ("expect_masked", "max_frame_size", "allow_rsv1", "error", "_buffer", "_peeked")

    def __init__(self, *, expect_masked: bool, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 allow_rsv1: bool = False):
        self.expect_masked = expect_masked
        self.max_frame_size = max_frame_size
        self.allow_rsv1 = allow_rsv1
        self.error: Optional[ProtocolError] = None
        self._buffer = bytearray()  # the incomplete frame at the end of the input, if any
        self._peeked = 0  # payload bytes of that frame already handed out by read_partial()

    def feed(self, data: Union[bytes, bytearray]) -> List[Frame]:
        """Parse ``data`` and return the frames it completes, in order."""
        if self.error is not None:
            raise self.error
        buffer = self._buffer
        if buffer:
            buffer += data  # amortized O(len(data)): a frame arriving in pieces is never re-copied whole
            data = buffer
        frames: List[Frame] = []
        pos = 0
        end = len(data)
        expect_masked = 0x80 if self.expect_masked else 0
        good_first_byte = _GOOD_FIRST_BYTE_RSV1 if self.allow_rsv1 else _GOOD_FIRST_BYTE
        try:
            while end - pos >= 2:
                first = data[pos]
                second = data[pos + 1]
                if not good_first_byte[first]:
                    raise _first_byte_error(first, self.allow_rsv1)
                opcode = first & 0x0F
                length = second & 0x7F
                if opcode >= 8 and (length > 125 or not first & 0x80):
                    raise ProtocolError(CloseCode.PROTOCOL_ERROR, "control frame fragmented or over 125 bytes")
                if second & 0x80 != expect_masked:
                    raise ProtocolError(CloseCode.PROTOCOL_ERROR,
                                        "unmasked frame from a client" if expect_masked else "masked frame from a server")
                start = pos + 2
                if length >= 126:
                    if length == 126:
                        if end - start < 2:
                            break
                        length = (data[start] << 8) | data[start + 1]
                        start += 2
                        # RFC 6455 5.2: "the minimal number of bytes MUST be used to encode the length".
                        if length < 126:
                            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "length not minimally encoded")
                    else:
                        if end - start < 8:
                            break
                        length = int.from_bytes(data[start:start + 8], "big")
                        start += 8
                        if length >> 63:
                            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "64-bit length with the top bit set")
                        if length < 65536:
                            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "length not minimally encoded")
                if length > self.max_frame_size:
                    raise ProtocolError(CloseCode.MESSAGE_TOO_BIG,
                                        f"frame of {length} bytes exceeds the limit of {self.max_frame_size}")
                if expect_masked:
                    stop = start + 4 + length
                    if stop > end:
                        break
                    key = data[start:start + 4]
                    if length >= _TRANSLATE_THRESHOLD:
                        # Deliberate: a view, not a slice: one copy of a large payload less (apply_mask
                        # copies anyway). Released on return, before the buffer is trimmed below.
                        payload = apply_mask(memoryview(data)[start + 4:stop], key)
                    else:
                        payload = apply_mask(data[start + 4:stop], key) if length else b""
                else:
                    stop = start + length
                    if stop > end:
                        break
                    if type(data) is bytes:
                        payload = data[start:stop]
                    elif length >= _TRANSLATE_THRESHOLD:
                        # Deliberate: bytes of a view copy a large payload once (of a slice: twice).
                        payload = bytes(memoryview(data)[start:stop])
                    else:
                        payload = bytes(data[start:stop])
                frames.append(_new_frame(Frame, (_OPCODE_LIST[opcode], payload, first >= 0x80,
                                                 first & 0x40 != 0, False, False)))
                pos = stop
        except ProtocolError as exc:
            self.error = exc
            self._buffer = bytearray()
            if frames:
                return frames
            raise
        if pos:
            self._peeked = 0
        if data is buffer:
            del buffer[:pos]  # CPython drops a bytearray's head without moving the rest
        elif pos < end:
            self._buffer = bytearray(data[pos:])
        return frames

    def pending(self) -> Optional[Tuple[Opcode, int]]:
        """``(opcode, declared payload length)`` of a frame whose header is read but not all its payload."""
        buf = self._buffer
        if self._header_length(buf) is None:
            return None
        length = buf[1] & 0x7F
        if length == 126:
            length = (buf[2] << 8) | buf[3]
        elif length == 127:
            length = int.from_bytes(buf[2:10], "big")
        return _OPCODES_BY_VALUE[buf[0] & 0x0F], length

    def pending_rsv1(self) -> bool:
        """Whether the frame reported by :meth:`pending` has RSV1 set (it starts a compressed message)."""
        buf = self._buffer
        return len(buf) >= 2 and buf[0] & 0x40 != 0

    def read_partial(self) -> bytes:
        """Unmasked payload bytes of the pending frame that arrived since the last call.

        This lets a caller validate a large text frame while it arrives
        (failing fast on bad UTF-8); the frame itself still comes out of
        ``feed()`` whole once complete.
        """
        buf = self._buffer
        header = self._header_length(buf)
        if header is None:
            return b""
        start = header + self._peeked
        chunk: Union[bytes, bytearray] = buf[start:]
        self._peeked += len(chunk)
        if self.expect_masked and chunk:
            rotation = (start - header) & 3
            key = buf[header - 4:header]
            chunk = apply_mask(chunk, key[rotation:] + key[:rotation])
        return bytes(chunk)

    def _header_length(self, buf: bytearray) -> Optional[int]:
        if len(buf) < 2:
            return None
        length = buf[1] & 0x7F
        header = 2 + (4 if self.expect_masked else 0) + (2 if length == 126 else 8 if length == 127 else 0)
        return header if len(buf) >= header else None


_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


def _feed_utf8(decoder: Any, data: bytes, final: bool) -> None:
    """Feed the next piece of a text message to its incremental ``decoder``: 1007 as soon as
    the bytes so far can no longer be the start of UTF-8 (fail fast)."""
    try:
        decoder.decode(data, final)
    except UnicodeDecodeError:
        raise ProtocolError(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message") from None
    # CPython's incremental decoder rejects every invalid prefix at once except
    # ED A0..BF, the start of a UTF-16 surrogate: catch that one here to fail fast.
    pending = decoder.getstate()[0]
    if not final and len(pending) >= 2 and pending[0] == 0xED and pending[1] >= 0xA0:
        raise ProtocolError(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message")


class MessageAssembler:
    """Sans-I/O message assembly: frames in, messages and control frames out.

    ``receive(frame)`` returns a complete message (``str`` for text,
    ``bytes`` for binary), a :class:`Close` for a close frame, the
    :class:`Frame` itself for a ping or pong, or ``None`` while a fragmented
    message is still open. It enforces fragmentation order (1002), UTF-8
    validity of text and close reasons, fragment by fragment (1007), and
    ``max_message_size`` (1009). Fragments are not limited in number.

    With ``deflate`` (a :class:`PerMessageDeflate`), a message whose first
    frame has RSV1 is inflated as it arrives: ``max_message_size`` and the
    UTF-8 check apply to the inflated data, and invalid compressed data is
    1007. Without it, RSV1 is 1002.
    """

    __slots__ = ("max_message_size", "deflate", "_opcode", "_compressed", "_buffer", "_decoder", "_peek_decoder")

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 deflate: "Optional[PerMessageDeflate]" = None):
        self.max_message_size = max_message_size
        self.deflate = deflate
        self._compressed = False  # the open fragmented message is compressed
        self._opcode: Optional[int] = None  # TEXT or BINARY while a fragmented message is open
        # One buffer, not a list of fragments: memory stays proportional to the message size
        # however many (even empty) fragments a peer sends.
        self._buffer = bytearray()
        self._decoder: Any = None
        self._peek_decoder: Any = None

    def receive(self, frame: Frame) -> Union[str, bytes, Close, Frame, None]:
        """Take one frame; return what it completes, or ``None``."""
        opcode = frame.opcode
        payload = frame.payload
        self._peek_decoder = None
        if opcode >= 8:
            if opcode == _CLOSE:
                return parse_close(payload)
            return frame
        if opcode:
            if self._opcode is not None:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "new message started inside a fragmented message")
            if frame.rsv1:
                payload = self._inflate(frame)
                self._compressed = not frame.fin
            if frame.fin:
                if len(payload) > self.max_message_size:
                    raise self._too_big(len(payload))
                if opcode == _TEXT:
                    try:
                        return payload.decode()
                    except UnicodeDecodeError:
                        raise ProtocolError(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message") from None
                return payload
            self._opcode = opcode
            self._decoder = _Utf8Decoder() if opcode == _TEXT else None
        elif self._opcode is None:
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "continuation frame without a message to continue")
        elif self._compressed:
            payload = self._inflate(frame)
            self._compressed = not frame.fin
        buffer = self._buffer
        size = len(buffer) + len(payload)
        if size > self.max_message_size:
            raise self._too_big(size)
        decoder = self._decoder
        if decoder is not None:  # validated fragment by fragment; decoded once, whole, at the end
            _feed_utf8(decoder, payload, frame.fin)
        buffer += payload
        if not frame.fin:
            return None
        self._buffer = bytearray()
        self._opcode = self._decoder = None
        return buffer.decode() if decoder is not None else bytes(buffer)

    def _inflate(self, frame: Frame) -> bytes:
        # A frame of a compressed message (RFC 7692 6.2): inflated at most up to the limit,
        # so a small frame that would inflate to gigabytes fails with 1009 having held 1 byte
        # more than max_message_size, at most.
        if self.deflate is None:
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "reserved bits set without a negotiated extension")
        return self.deflate.decompress(frame.payload, frame.fin, self.max_message_size - len(self._buffer))

    def check_pending(self, opcode: int, length: int, compressed: bool = False) -> bool:
        """Check a frame announced by :meth:`FrameParser.pending` before its payload arrives.

        Raises 1009 at once when it would take the message over the limit,
        1002 when it breaks fragmentation order. Returns whether the frame
        carries text, whose partial payload :meth:`receive_partial` validates.
        ``compressed`` (:meth:`FrameParser.pending_rsv1`) says the frame
        starts a compressed message: its size and text are checked as it
        inflates instead.
        """
        if opcode >= 8:
            return False
        if opcode:
            if self._opcode is not None:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "new message started inside a fragmented message")
            if compressed:
                return False
            size = length
        elif self._opcode is None:
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "continuation frame without a message to continue")
        elif self._compressed:
            return False
        else:
            size = len(self._buffer) + length
            opcode = self._opcode
        if size > self.max_message_size:
            raise self._too_big(size)
        return opcode == _TEXT

    def receive_partial(self, chunk: bytes, *, starts_message: bool) -> None:
        """Validate the next piece of a text frame that is still arriving (fail fast on bad UTF-8)."""
        decoder = self._peek_decoder
        if decoder is None:
            decoder = self._peek_decoder = _Utf8Decoder()
            if not starts_message and self._decoder is not None:
                decoder.setstate(self._decoder.getstate())
        _feed_utf8(decoder, chunk, False)

    def _too_big(self, size: int) -> ProtocolError:
        return ProtocolError(CloseCode.MESSAGE_TOO_BIG,
                             f"message of {size} bytes exceeds the limit of {self.max_message_size}")


class _Receiver:
    """The receive path of one endpoint, sans I/O: bytes in, messages and control frames out.

    :class:`FrameParser`, :class:`MessageAssembler`, then the UTF-8 check of
    a text frame still arriving, wired once for :class:`WebSocket` and the
    tests. ``feed(data)`` lazily yields ``(frame, result)`` for each frame,
    ``result`` being what :meth:`MessageAssembler.receive` returns: a
    setting changed by the consumer applies from the next frame, and a
    consumer that stops (a close frame) processes nothing after. A
    violation raises :class:`ProtocolError` after every valid frame before it.
    """

    __slots__ = ("parser", "assembler")

    def __init__(self, *, expect_masked: bool, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 deflate: "Optional[PerMessageDeflate]" = None):
        self.parser = FrameParser(expect_masked=expect_masked, max_frame_size=max_frame_size,
                                  allow_rsv1=deflate is not None)
        self.assembler = MessageAssembler(max_message_size=max_message_size, deflate=deflate)

    def feed(self, data: Union[bytes, bytearray]) -> Iterator[Tuple[Frame, Union[str, bytes, Close, Frame, None]]]:
        parser = self.parser
        receive = self.assembler.receive
        for frame in parser.feed(data):
            yield frame, receive(frame)
        if parser.error is not None:
            raise parser.error
        pending = parser.pending()
        if pending is not None:
            assembler = self.assembler
            if assembler.check_pending(*pending, parser.pending_rsv1()):
                assembler.receive_partial(parser.read_partial(), starts_message=pending[0] == _TEXT)


# A set makes `code in ...` fast. RFC 6455 7.4.2: 1004-1006 and 1015 must never be sent.
VALID_CLOSE_CODES = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015)) | frozenset(range(3000, 5000))


def encode_close(code: int, reason: str = "") -> bytes:
    """Close frame payload: 2-byte code and UTF-8 reason (at most 123 bytes).

    Raises :class:`ValueError` for a code that may not be sent (1005, 1006,
    1015 and anything outside 1000-1003, 1007-1014, 3000-4999).
    """
    if code not in VALID_CLOSE_CODES:
        raise ValueError(f"close code {code} may not be sent")
    data = reason.encode()
    if len(data) > 123:
        raise ValueError("a close reason is at most 123 bytes of UTF-8")
    return code.to_bytes(2, "big") + data


def parse_close(payload: bytes) -> Close:
    """The :class:`Close` of a close frame payload; ``Close(1005, "")`` when empty.

    Raises :class:`ProtocolError` 1002 for a 1-byte payload or an invalid
    code, 1007 for a reason that is not UTF-8.
    """
    if not payload:
        return Close(CloseCode.NO_STATUS, "")
    if len(payload) == 1:
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, "close frame payload of 1 byte")
    code = (payload[0] << 8) | payload[1]
    # RFC 6455 7.4.1: codes a peer may not send, and unassigned ones, fail the connection.
    if code not in VALID_CLOSE_CODES:
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise ProtocolError(CloseCode.INVALID_DATA, "invalid UTF-8 in the close reason") from None
    return Close(code, reason)


###############################################################################
# Handshake: pure functions over bytes ########################################
###############################################################################

class Headers:
    """Case-insensitive HTTP header fields that keep their order and repeats."""

    __slots__ = ("_items", "_index")

    def __init__(self, items: Iterable[Tuple[str, str]] = ()):
        self._items: List[Tuple[str, str]] = []
        self._index: Dict[str, List[str]] = {}
        for name, value in items:
            self.add(name, value)

    def add(self, name: str, value: str) -> None:
        """Append a field, after any of the same name (order and repeats are kept)."""
        self._items.append((name, value))
        self._index.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """The field's value; repeated fields are joined with ", " (RFC 7230 3.2.2)."""
        values = self._index.get(name.lower())
        return ", ".join(values) if values else default

    def get_all(self, name: str) -> List[str]:
        """Every value of the field, in order (``[]`` when absent): ``headers.get_all("Cookie")``."""
        return list(self._index.get(name.lower(), ()))

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index

    def __iter__(self) -> Iterator[Tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


class Request(_NamedTuple):
    """A parsed HTTP request head."""

    method: str
    path: str
    version: Tuple[int, int]
    headers: Headers

    @property
    def is_upgrade(self) -> bool:
        """Whether it asks for a WebSocket (Upgrade: websocket)."""
        return "websocket" in _tokens(self.headers.get("Upgrade"))

    @property
    def subprotocols(self) -> List[str]:
        """Subprotocols the client offers, in its order."""
        return _token_list(self.headers.get("Sec-WebSocket-Protocol"))

    @property
    def origin(self) -> Optional[str]:
        """The Origin header (a browser sends it), or ``None``."""
        return self.headers.get("Origin")


class Response(_NamedTuple):
    """An HTTP response: parsed by a client, or sent by a server.

    A ``handshake`` hook of :meth:`WebSocketManager.listen` may return one
    to answer with plain HTTP instead of upgrading, e.g. ``Response(403)``.
    """

    status: int
    headers: Union[Headers, Sequence[Tuple[str, str]]] = ()
    body: bytes = b""
    reason: str = ""


def _token_list(value: Optional[str]) -> List[str]:
    return [token for token in (part.strip() for part in value.split(","))if token] if value else []


def _tokens(value: Optional[str]) -> Set[str]:
    if value and "," not in value:  # deliberate: one token (Upgrade: websocket) without the list machinery
        token = value.strip()
        return {token.lower()} if token else set()
    return {token.lower() for token in _token_list(value)}


# RFC 6455 1.3: the GUID concatenated to Sec-WebSocket-Key.
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(key: Union[str, bytes]) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2 step 5.4)."""
    if isinstance(key, str):
        key = key.encode("ascii")
    return base64.b64encode(hashlib.sha1(key + _ACCEPT_GUID).digest()).decode("ascii")


def new_key() -> str:
    """A fresh Sec-WebSocket-Key: base64 of 16 random bytes."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


_TOKEN = _LazyPattern(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_FORBIDDEN_IN_VALUE = _LazyPattern(r"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 6455 4.2.1: Sec-WebSocket-Key is the base64 of 16 bytes: 22 characters and "==".
_KEY = _LazyPattern(r"[A-Za-z0-9+/]{22}==\Z")
# RFC 7231 6.5.15: a 426 names the protocol to upgrade to.
_UPGRADE_REQUIRED = (("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13"))


def _header_lines(headers: Iterable[Tuple[str, str]]) -> str:
    lines = []
    for name, value in headers:
        if not _TOKEN.match(name) or _FORBIDDEN_IN_VALUE.search(value):
            raise ValueError(f"invalid header field {name!r}: {value!r}")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)


# RFC 7230 3.5: a recipient MAY accept a bare LF as a line terminator.
_BLANK_LINE = _LazyPattern(rb"\n\r?\n")


# Bounds of a request or response head (HeadReader): bytes, and header lines.
MAX_HEAD_SIZE = 16 * 1024
MAX_HEADER_LINES = 100


class HeadReader:
    """Collects an HTTP head incrementally, bounded in size and lines.

    ``feed(data)`` returns ``None`` until the blank line that ends the head
    has arrived, then ``(head, rest)``: ``rest`` is what followed the head in
    the same input (the first WebSocket bytes) and must not be lost. Raises
    :class:`HandshakeError` 431 past ``max_size`` bytes or ``max_lines``
    header lines, and 400 at once for a TLS handshake record (a ``wss://``
    client at a plain port) rather than waiting for a blank line that never
    comes. Work is linear in the bytes fed.
    """

    __slots__ = ("max_size", "max_lines", "_buffer", "_scanned", "_lines")

    def __init__(self, max_size: int = MAX_HEAD_SIZE, max_lines: int = MAX_HEADER_LINES):
        self.max_size = max_size
        self.max_lines = max_lines
        self._buffer = bytearray()
        self._scanned = 0
        self._lines = 0

    def feed(self, data: bytes) -> Optional[Tuple[bytes, bytes]]:
        """Take the next bytes; return ``(head, rest)`` once the blank line has arrived, else ``None``.

        Raises :class:`HandshakeError` with status 431 past ``max_size`` bytes or ``max_lines``
        lines, 400 for a TLS record. ``rest`` is what came after the head (the first frames).
        """
        buf = self._buffer
        if not buf and data[:1] == b"\x16":
            # A TLS record (content type 22, handshake) can never start an HTTP head: fail now, so
            # that the client learns at once (is the server speaking TLS?) and not at our timeout.
            raise HandshakeError("TLS handshake on a plain connection", 400)
        buf += data
        blank_line = _BLANK_LINE.search(buf, max(0, self._scanned - 2))
        end = blank_line.end() if blank_line else len(buf)
        self._lines += buf.count(b"\n", self._scanned, end)
        self._scanned = end
        # The request line and the blank line are not header lines.
        if end > self.max_size or self._lines > self.max_lines + (2 if blank_line else 1):
            raise HandshakeError("request head too large", 431)
        if not blank_line:
            return None
        return bytes(buf[:end]), bytes(buf[end:])


def _parse_head(head: bytes) -> Tuple[str, Headers]:
    lines = head.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if lines and lines[-1] in (b"", b"\r"):
        lines.pop()
    if not lines:
        raise HandshakeError("empty head", 400)
    start = lines[0].rstrip(b"\r").decode("latin-1")
    headers = Headers()
    items, index = headers._items, headers._index  # deliberate: Headers.add() inlined
    for raw in lines[1:]:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        name, sep, value = line.partition(b":")
        name_text = name.decode("latin-1")
        # RFC 7230 3.2.4: no whitespace before the colon; obsolete line folding is rejected.
        if not sep or not _TOKEN.match(name_text):
            raise HandshakeError(f"malformed header line {line[:60]!r}", 400)
        value_text = value.strip(b" \t").decode("latin-1")
        if _FORBIDDEN_IN_VALUE.search(value_text):
            raise HandshakeError(f"invalid character in header {name_text}", 400)
        items.append((name_text, value_text))
        index.setdefault(name_text.lower(), []).append(value_text)
    return start, headers


_HTTP_VERSION = _LazyPattern(r"HTTP/(\d)\.(\d)\Z")


def parse_request(head: bytes) -> Request:
    """Parse a request head (as returned by :class:`HeadReader`); syntax only.

    The request target is a path (origin-form) or an absolute URI
    (``GET http://host/chat?x=1``), of which ``path`` keeps the path and
    query. Raises :class:`HandshakeError` 400 when malformed, 505 for a version
    other than HTTP/1.x with x >= 1.
    """
    start, headers = _parse_head(head)
    parts = start.split(" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]):
        raise HandshakeError(f"malformed request line {start[:80]!r}", 400)
    method, path, version_text = parts
    match = _HTTP_VERSION.match(version_text)
    if not match:
        raise HandshakeError(f"malformed HTTP version {version_text[:20]!r}", 400)
    version = (int(match.group(1)), int(match.group(2)))
    if version < (1, 1) or version[0] > 1:
        raise HandshakeError(f"HTTP/{version[0]}.{version[1]} cannot upgrade to WebSocket", 505)
    if not path.startswith("/"):
        path = _origin_form(path)
    return Request(method, path, version, headers)


_ABSOLUTE_FORM_SCHEMES = frozenset({"http", "https", "ws", "wss"})


def _origin_form(target: str) -> str:
    # RFC 7230 5.3.2: "a server MUST accept the absolute-form in requests" (RFC 6455 4.1 allows
    # an absolute http(s) URI). Its path and query are the resource; the Host header is still
    # required and checked as for any request. Authority-form and asterisk-form stay 400.
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in _ABSOLUTE_FORM_SCHEMES:
        raise HandshakeError("request target must be a path or an absolute URI", 400)
    authority, slash, path = rest.partition("/")
    authority = authority.partition("?")[0]
    if not authority or "#" in target or "@" in authority:
        raise HandshakeError("malformed absolute request target", 400)
    return "/" + path if slash else "/" + rest[len(authority):]  # no path: "/" and the query, if any


def validate_request(request: Request) -> str:
    """Check a WebSocket upgrade request (RFC 6455 4.2.1); return its key.

    Raises :class:`HandshakeError` with the status to answer: 405 for a
    method other than GET, 426 without ``Upgrade: websocket`` and
    ``Connection: upgrade`` or for a version other than 13, 400 for a
    missing Host or a bad key.
    """
    headers = request.headers
    if request.method != "GET":
        raise HandshakeError(f"method {request.method} not allowed", 405, [("Allow", "GET")])
    if not request.is_upgrade or "upgrade" not in _tokens(headers.get("Connection")):
        raise HandshakeError("not a WebSocket upgrade request", 426, _UPGRADE_REQUIRED)
    if headers.get("Sec-WebSocket-Version") != "13":
        raise HandshakeError("unsupported Sec-WebSocket-Version", 426, _UPGRADE_REQUIRED)
    if not headers.get("Host"):
        raise HandshakeError("missing Host header", 400)
    key = headers.get("Sec-WebSocket-Key") or ""
    if not _KEY.match(key):
        raise HandshakeError("invalid Sec-WebSocket-Key", 400)
    return key


def encode_switching_protocols(key: str, subprotocol: Optional[str] = None,
                   headers: Iterable[Tuple[str, str]] = ()) -> bytes:
    """The 101 Switching Protocols response for a validated request's key."""
    return _encode_switch([*_switch_fields(key, subprotocol), *headers])


def _switch_fields(key: str, subprotocol: Optional[str]) -> List[Tuple[str, str]]:
    fields = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept_key(key))]
    if subprotocol:
        fields.append(("Sec-WebSocket-Protocol", subprotocol))
    return fields


def _encode_switch(fields: Iterable[Tuple[str, str]]) -> bytes:
    return f"HTTP/1.1 101 Switching Protocols\r\n{_header_lines(fields)}\r\n".encode("latin-1")


_REASON_PHRASES = {
    101: "Switching Protocols", 200: "OK", 204: "No Content", 301: "Moved Permanently", 302: "Found",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    426: "Upgrade Required", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


def _status_text(status: int, reason: str = "") -> str:
    return f"{status} {reason or _REASON_PHRASES.get(status, 'Unknown')}"


def encode_response(response: Response) -> bytes:
    """Serialize a plain HTTP response (errors, or a page) that ends the connection."""
    fields = list(response.headers)
    status, body = _complete_response(response, fields)
    fields.append(("Connection", "close"))
    return f"HTTP/1.1 {status}\r\n{_header_lines(fields)}\r\n".encode("latin-1") + body


def _complete_response(response: Response, fields: List[Tuple[str, str]]) -> Tuple[str, bytes]:
    """``response``'s status ("404 Not Found") and body (the status, for an error without one);
    adds the Content-Type and Content-Length that ``fields`` lack."""
    status = _status_text(response.status, response.reason)
    body = response.body
    if not body and response.status >= 400:
        body = f"{status}\n".encode()
    names = {name.lower() for name, _ in fields}
    if "content-type" not in names:
        fields.append(("Content-Type", "text/plain; charset=utf-8"))
    if "content-length" not in names:
        fields.append(("Content-Length", str(len(body))))
    return status, body


def encode_request(host: str, path: str, key: str, *, subprotocols: Optional[Sequence[str]] = None,
                  headers: Optional[Iterable[Tuple[str, str]]] = None, origin: Optional[str] = None) -> bytes:
    """A client's opening handshake (RFC 6455 4.1). ``host`` is the Host header value."""
    if not path.startswith("/") or _FORBIDDEN_IN_VALUE.search(path) or " " in path:
        raise ValueError(f"invalid request path {path!r}")
    fields = [("Host", host), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
              ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", "13")]
    if subprotocols:
        fields.append(("Sec-WebSocket-Protocol", ", ".join(subprotocols)))
    if origin is not None:
        fields.append(("Origin", origin))
    fields.extend(headers or ())
    return f"GET {path} HTTP/1.1\r\n{_header_lines(fields)}\r\n".encode("latin-1")


def parse_response(head: bytes) -> Response:
    """Parse a response head; raises :class:`HandshakeError` (status None) when malformed."""
    try:
        start, headers = _parse_head(head)
    except HandshakeError as exc:
        raise HandshakeError(f"malformed response: {exc}", None) from None
    version, _, rest = start.partition(" ")
    status_text, _, reason = rest.partition(" ")
    # isascii(): str.isdigit() is also true of superscript digits, which int() refuses.
    status_ok = len(status_text) == 3 and status_text.isascii() and status_text.isdigit()
    if not _HTTP_VERSION.match(version) or not status_ok:
        raise HandshakeError(f"malformed status line {start[:80]!r}", None)
    return Response(int(status_text), headers, b"", reason)


def validate_response(response: Response, key: str, subprotocols: Optional[Sequence[str]] = None,
                      compression: Union[None, str, Deflate] = None) -> Optional[str]:
    """Check a server's answer to our handshake (RFC 6455 4.1); return the subprotocol it chose.

    ``compression`` is what the request offered (see :func:`encode_deflate_offer`):
    an extension in the answer is accepted only if it is that one, with
    parameters RFC 7692 allows (:func:`parse_deflate_response`). Raises
    :class:`HandshakeError` whose ``status`` and ``headers`` are the server's.
    """
    status = response.status
    headers = response.headers
    if not isinstance(headers, Headers):
        headers = Headers(headers)

    def fail(message: str) -> HandshakeError:
        return HandshakeError(message, status, list(headers), response=response)

    if status != 101:
        raise fail(f"server answered {status} {response.reason}".rstrip())
    if "websocket" not in _tokens(headers.get("Upgrade")) or "upgrade" not in _tokens(headers.get("Connection")):
        raise fail("response lacks Upgrade: websocket / Connection: upgrade")
    if headers.get("Sec-WebSocket-Accept") != accept_key(key):
        raise fail("wrong Sec-WebSocket-Accept")
    extensions = headers.get("Sec-WebSocket-Extensions")
    if extensions:
        settings = _deflate_settings(compression)
        if settings is None:
            raise fail("server chose an extension that was not offered")
        try:
            parse_deflate_response(extensions, settings)
        except ValueError as exc:
            raise fail(str(exc)) from None
    chosen = headers.get("Sec-WebSocket-Protocol")
    if chosen is not None and chosen not in (subprotocols or ()):
        raise fail(f"server chose subprotocol {chosen!r} that was not offered")
    return chosen


###############################################################################
# permessage-deflate (RFC 7692): settings, negotiation, compression ###########
###############################################################################

# RFC 7692 7.2.1: a message is compressed with a sync flush, and these 4 bytes that end it are
# removed before sending; the receiver appends them again before inflating (7.2.2).
_DEFLATE_TAIL = b"\x00\x00\xff\xff"


class Deflate(_NamedTuple):
    """Settings of permessage-deflate (RFC 7692), for ``compression=`` in either role.

    ``compression="deflate"`` means ``Deflate()``. The four negotiation
    parameters keep their RFC 7692 7.1 meaning in both roles: a server
    answers with them (asking the client to comply where the RFC lets it),
    a client offers them. The defaults keep no zlib object on any
    connection between messages, so memory per connection stays a few KiB:

    - ``server_no_context_takeover=True``: the server compresses each
      message on its own, with a compressor shared by all its connections,
      so one compressed broadcast frame is valid for every connection;
    - ``client_no_context_takeover=True``: the same for the client, so the
      server frees its inflater after each message (a client of ours then
      shares its compressor too). Set both to ``False`` for better ratios on
      streams of small similar messages, at about 10 KiB (12-bit windows)
      to 300 KiB (15 bits, as a compressor) per connection that has sent or
      received one;
    - ``server_max_window_bits`` / ``client_max_window_bits``: the LZ77
      window of each side, 9..15 (zlib cannot compress with 8). The client
      window defaults to 12 bits (when the client offers
      ``client_max_window_bits``, as browsers do), which bounds the
      inflater a server keeps per client if contexts are kept.

    ``level`` (0-9) and ``mem_level`` (1-9) go to :func:`zlib.compressobj`.
    ``mem_level`` is 5 (as in websockets), not zlib's 8: measured by
    ``bench_wsmanager.py zparams`` for windows of 9 to 15 bits, it compresses
    JSON to within 0.4 points of 8's size, small messages 20 % faster,
    128 KiB messages 2.7x faster with 9-bit windows and 15 % faster with
    12-bit ones (12 % slower with 15-bit ones), and a compressor that keeps
    its context holds 112 KiB less.
    """

    server_no_context_takeover: bool = True
    client_no_context_takeover: bool = True
    server_max_window_bits: int = 15
    client_max_window_bits: int = 12
    level: int = 6
    mem_level: int = 5


class DeflateParams(_NamedTuple):
    """What a permessage-deflate negotiation agreed on (window bits are 8..15)."""

    server_no_context_takeover: bool = False
    client_no_context_takeover: bool = False
    server_max_window_bits: int = 15
    client_max_window_bits: int = 15


def _deflate_settings(compression: Union[None, str, Deflate]) -> Optional[Deflate]:
    """Check a ``compression=`` argument; ``None`` when compression is off."""
    if compression is None:
        return None
    if isinstance(compression, str):
        if compression != "deflate":
            raise ValueError(f"unknown compression {compression!r}: None or 'deflate'")
        return Deflate()
    if not isinstance(compression, Deflate):
        raise TypeError(f"compression must be None, 'deflate' or a Deflate, not {type(compression).__name__}")
    for name in ("server_max_window_bits", "client_max_window_bits"):
        if not 9 <= getattr(compression, name) <= 15:
            raise ValueError(f"{name} must be between 9 and 15 (zlib cannot compress with 8)")
    if not 0 <= compression.level <= 9 or not 1 <= compression.mem_level <= 9:
        raise ValueError("level must be between 0 and 9 and mem_level between 1 and 9")
    return compression


# Sec-WebSocket-Extensions and permessage-deflate negotiation (RFC 7692 7.1) ---

_EXTENSION_PARAM = _LazyPattern(r'\s*([^\s=;"]+)\s*(?:=\s*(?:"([^"]*)"|([^\s";]*)))?\s*\Z')
# RFC 7692 7.1.2: 8..15, decimal, no leading zero.
_WINDOW_BITS = {str(bits): bits for bits in range(8, 16)}
_DEFLATE_PARAMS = ("server_no_context_takeover", "client_no_context_takeover", "server_max_window_bits",
                   "client_max_window_bits")


def _parse_extension(element: str) -> Tuple[str, List[Tuple[str, Optional[str]]]]:
    name, *raw_params = element.split(";")
    name = name.strip()
    if not _TOKEN.match(name):
        raise ValueError(f"malformed extension {element.strip()[:60]!r}")
    params: List[Tuple[str, Optional[str]]] = []
    for raw in raw_params:
        match = _EXTENSION_PARAM.match(raw)
        param, quoted, plain = match.groups() if match else ("", None, None)
        value = quoted if quoted is not None else plain
        # RFC 6455 9.1: a quoted value must still be a token once unquoted.
        if not _TOKEN.match(param) or (value is not None and not _TOKEN.match(value)):
            raise ValueError(f"malformed extension parameter {raw.strip()[:60]!r}")
        params.append((param, value))
    return name, params


def parse_extensions(value: Optional[str]) -> List[Tuple[str, List[Tuple[str, Optional[str]]]]]:
    """Parse a Sec-WebSocket-Extensions value (RFC 6455 9.1) into ``[(name, [(param, value or None)])]``.

    Raises :class:`ValueError` when it is malformed.
    """
    if not value:
        return []
    # Commas inside quotes would only appear in a malformed value: they make one of the pieces fail.
    return [_parse_extension(element) for element in value.split(",") if element.strip()]


def _deflate_request_params(params: Sequence[Tuple[str, Optional[str]]]) -> Dict[str, Any]:
    """Parameters of one permessage-deflate offer or answer, checked; ValueError when invalid."""
    found: Dict[str, Any] = {}
    for name, value in params:
        if name not in _DEFLATE_PARAMS:
            raise ValueError(f"unknown permessage-deflate parameter {name!r}")
        if name in found:
            raise ValueError(f"permessage-deflate parameter {name} repeated")
        if name.endswith("_no_context_takeover"):
            if value is not None:
                raise ValueError(f"{name} takes no value")
            found[name] = True
        elif value is None:
            if name == "server_max_window_bits":
                raise ValueError("server_max_window_bits needs a value")
            found[name] = True  # client_max_window_bits without a value: "the server may set it"
        elif value in _WINDOW_BITS:
            found[name] = _WINDOW_BITS[value]
        else:
            raise ValueError(f"invalid {name} {value!r}: 8..15")
    return found


def _format_deflate(params: Sequence[Tuple[str, Any]]) -> str:
    parts = (name if value is True else f"{name}={value}" for name, value in params)
    return "; ".join(["permessage-deflate", *parts])


def negotiate_deflate(offers: Optional[str],
                      settings: Union[str, Deflate] = "deflate") -> Tuple[Optional[str], Optional[DeflateParams]]:
    """The server side of RFC 7692 negotiation, a pure function.

    ``offers`` is the request's Sec-WebSocket-Extensions value. Returns the
    Sec-WebSocket-Extensions value to answer with and the agreed
    :class:`DeflateParams`, or ``(None, None)`` when no offer is acceptable.
    Offers are tried in the client's order; the first acceptable
    permessage-deflate offer wins. A malformed or conflicting offer (unknown
    or repeated parameter, bad value) is declined, as is one asking the
    server for a window of 8 bits (zlib cannot compress with it), and other
    extensions are ignored: the handshake goes on without them.
    """
    deflate = _deflate_settings(settings)
    if deflate is None or not offers:
        return None, None
    for element in offers.split(","):
        if not element.strip():
            continue
        try:
            name, params = _parse_extension(element)
            if name != "permessage-deflate":
                continue
            offer = _deflate_request_params(params)
        except ValueError:
            continue  # RFC 7692 5: the server declines an offer it does not understand
        answer: List[Tuple[str, Any]] = []
        # RFC 7692 7.1.1.1: a server that accepts server_no_context_takeover must answer it;
        # it may also answer it unasked.
        server_no_context = deflate.server_no_context_takeover or "server_no_context_takeover" in offer
        if server_no_context:
            answer.append(("server_no_context_takeover", True))
        # 7.1.1.2: the server may ask the client for no context takeover, offered or not.
        client_no_context = deflate.client_no_context_takeover or "client_no_context_takeover" in offer
        if client_no_context:
            answer.append(("client_no_context_takeover", True))
        # 7.1.2.1: the client's limit binds the server's compressor, which cannot use 8 bits.
        server_bits = min(offer.get("server_max_window_bits", 15), deflate.server_max_window_bits)
        if server_bits < 9:
            continue
        if server_bits < 15 or "server_max_window_bits" in offer:
            answer.append(("server_max_window_bits", server_bits))
        # 7.1.2.2: the server may limit the client's window only if the offer has the parameter.
        client_bits = 15
        if "client_max_window_bits" in offer:
            offered = offer["client_max_window_bits"]
            client_bits = min(15 if offered is True else offered, deflate.client_max_window_bits)
            answer.append(("client_max_window_bits", client_bits))
        return _format_deflate(answer), DeflateParams(server_no_context, client_no_context, server_bits, client_bits)
    return None, None


def encode_deflate_offer(settings: Union[str, Deflate] = "deflate") -> str:
    """The Sec-WebSocket-Extensions value a client sends to offer permessage-deflate.

    It always carries ``client_max_window_bits`` (so the server may limit
    the client's window), with a value when the settings limit it.
    """
    deflate = _deflate_settings(settings)
    if deflate is None:
        raise ValueError("compression is off: nothing to offer")
    params: List[Tuple[str, Any]] = []
    if deflate.server_no_context_takeover:
        params.append(("server_no_context_takeover", True))
    if deflate.client_no_context_takeover:
        params.append(("client_no_context_takeover", True))
    if deflate.server_max_window_bits < 15:
        params.append(("server_max_window_bits", deflate.server_max_window_bits))
    client_bits = deflate.client_max_window_bits
    params.append(("client_max_window_bits", client_bits if client_bits < 15 else True))
    return _format_deflate(params)


def parse_deflate_response(value: Optional[str], settings: Union[str, Deflate] = "deflate") -> Optional[DeflateParams]:
    """The client side of RFC 7692 negotiation: check the server's answer to :func:`encode_deflate_offer`.

    Returns the agreed :class:`DeflateParams`, or ``None`` when the server
    declined (no Sec-WebSocket-Extensions). Raises :class:`ValueError` when
    the answer is malformed or not allowed by the offer; the client must
    then fail the handshake (RFC 7692 5). A ``client_max_window_bits``
    above the one offered is allowed: the client keeps its own window.
    """
    deflate = _deflate_settings(settings)
    if deflate is None:
        raise ValueError("compression is off: no answer can be accepted")
    extensions = parse_extensions(value)
    if not extensions:
        return None
    if len(extensions) > 1 or extensions[0][0] != "permessage-deflate":
        raise ValueError(f"server chose extensions that were not offered: {str(value)[:100]!r}")
    answer = _deflate_request_params(extensions[0][1])
    if answer.get("client_max_window_bits") is True:
        raise ValueError("client_max_window_bits needs a value in a response")
    # RFC 7692 7.1.1.1: a server accepting an offer with server_no_context_takeover must answer it.
    server_no_context = "server_no_context_takeover" in answer
    if deflate.server_no_context_takeover and not server_no_context:
        raise ValueError("the server did not agree to server_no_context_takeover")
    client_no_context = deflate.client_no_context_takeover or "client_no_context_takeover" in answer
    server_bits = answer.get("server_max_window_bits", 15)
    if deflate.server_max_window_bits < 15 and server_bits > deflate.server_max_window_bits:
        raise ValueError(f"server_max_window_bits {server_bits} exceeds the {deflate.server_max_window_bits} offered")
    # RFC 7692 7.1.2.2: with a value in the offer, "even if the server doesn't include the
    # client_max_window_bits extension parameter in the corresponding extension negotiation response
    # with a value greater than the one in the extension negotiation offer or if the server doesn't
    # include the extension parameter at all, the client is not going to use an LZ77 sliding window
    # size greater than the size specified by the value in the extension negotiation offer". So a larger
    # answer (Autobahn's cases 13.4 and 13.6, older servers) is no violation: that server inflates with
    # a window at least as large as ours, and we keep compressing with the window we offered. A smaller
    # answer binds the client (same clause), down to 8 bits (see _new_compressor).
    client_bits = min(answer.get("client_max_window_bits", 15), deflate.client_max_window_bits)
    return DeflateParams(server_no_context, client_no_context, server_bits, client_bits)


# Compression ---------------------------------------------------------------

# Compressors of messages sent without context takeover, one per thread and setting: each
# message ends with a full flush, which resets the compressor, so its output never refers
# to an earlier message and the same compressor serves every connection of that thread.
_thread_compressors = threading.local()


def _new_compressor(wbits: int, level: int, mem_level: int) -> Any:
    """A raw deflate compressor whose output refers back at most ``2 ** wbits`` bytes (9..15, or 8)."""
    if wbits == 8:
        # zlib cannot make a 256-byte window (it refuses 8 for raw deflate); a server may still ask a
        # client for one (RFC 7692 7.1.2.2, Autobahn's cases 13.3, 13.5 and 13.7). Z_RLE only refers
        # back one byte: valid within any window, and runs still compress.
        return zlib.compressobj(level, zlib.DEFLATED, -9, mem_level, zlib.Z_RLE)
    return zlib.compressobj(level, zlib.DEFLATED, -wbits, mem_level)


def _shared_compressor(key: Tuple[int, int, int]) -> Any:
    try:
        compressors = _thread_compressors.compressors
    except AttributeError:
        compressors = _thread_compressors.compressors = {}
    compressor = compressors.get(key)
    if compressor is None:
        compressor = compressors[key] = _new_compressor(*key)
    return compressor


class PerMessageDeflate:
    """Sans-I/O permessage-deflate state of one connection: compresses what it sends,
    inflates what it receives (RFC 7692 7.2).

    zlib objects are made on first use and, where no context is kept,
    dropped after each message: an idle connection holds none. Without
    context takeover on the sending side, messages are compressed by a
    compressor shared per thread (see :class:`Deflate`). ``lock`` orders
    compress-and-queue when the sending context is kept.
    """

    __slots__ = ("params", "client", "send_key", "lock", "_send_wbits", "_level", "_mem_level",
                 "_recv_wbits", "_recv_keep", "_compressor", "_decompressor")

    def __init__(self, params: DeflateParams, *, client: bool, level: int = 6, mem_level: int = 5):
        self.params = params
        self.client = client
        if client:
            send_keep = not params.client_no_context_takeover
            self._send_wbits = params.client_max_window_bits
            self._recv_keep = not params.server_no_context_takeover
            self._recv_wbits = params.server_max_window_bits
        else:
            send_keep = not params.server_no_context_takeover
            self._send_wbits = params.server_max_window_bits
            self._recv_keep = not params.client_no_context_takeover
            self._recv_wbits = params.client_max_window_bits
        self._level = level
        self._mem_level = mem_level
        # Messages that share this key compress to the same bytes: a broadcast compresses once.
        self.send_key: Optional[Tuple[int, int, int]] = None if send_keep else (self._send_wbits, level, mem_level)
        self.lock: Optional[threading.Lock] = threading.Lock() if send_keep else None
        self._compressor: Any = None
        self._decompressor: Any = None

    def compress(self, data: _BytesLike) -> bytes:
        """The payload of a compressed message (sent with RSV1 on its first frame)."""
        key = self.send_key
        if key is not None:
            compressor = _shared_compressor(key)
            try:
                compressed: bytes = compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)
            except BaseException:
                del _thread_compressors.compressors[key]  # half used: its next output would be wrong
                raise
        else:
            compressor = self._compressor
            if compressor is None:
                compressor = self._compressor = _new_compressor(self._send_wbits, self._level, self._mem_level)
            compressed = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
        return compressed[:-4]  # RFC 7692 7.2.1: remove the 00 00 ff ff tail

    def compress_fragments(self, chunks: Sequence[_BytesLike]) -> List[bytes]:
        """Payloads of one compressed message sent in several frames, one per chunk."""
        key = self.send_key
        compressor = _shared_compressor(key) if key is not None else self._compressor
        if compressor is None:
            compressor = self._compressor = _new_compressor(self._send_wbits, self._level, self._mem_level)
        try:
            # A sync flush per fragment: each frame carries whole deflate blocks. compress() ends the message.
            payloads = [compressor.compress(chunk) + compressor.flush(zlib.Z_SYNC_FLUSH) for chunk in chunks[:-1]]
        except BaseException:
            if key is not None:
                del _thread_compressors.compressors[key]
            raise
        payloads.append(self.compress(chunks[-1]))
        return payloads

    def decompress(self, data: bytes, final: bool, max_length: int) -> bytes:
        """Inflate one frame's payload; at most ``max_length + 1`` bytes come out.

        More than ``max_length`` means the message is over its limit (the
        rest is never inflated). Invalid compressed data raises
        :class:`ProtocolError` 1007.
        """
        decompressor = self._decompressor
        if decompressor is None:
            decompressor = self._decompressor = zlib.decompressobj(-self._recv_wbits)
        try:
            # Deliberate: max_length bounds the output; max_length=0 would mean no bound.
            if not final:
                out: bytes = decompressor.decompress(data, max_length + 1)
            elif len(data) < 2048:
                out = decompressor.decompress(data + _DEFLATE_TAIL, max_length + 1)  # one call beats a copy here
            else:
                # Large: the tail goes in a second call rather than copying the payload to append it.
                out = decompressor.decompress(data, max_length + 1)
                if len(out) <= max_length:
                    out += decompressor.decompress(_DEFLATE_TAIL, max_length + 1 - len(out))
        except zlib.error as exc:
            # RFC 7692 does not name a code: 1007 says the payload was not what the message claims.
            raise ProtocolError(CloseCode.INVALID_DATA, f"invalid compressed data: {exc}") from None
        # The peer may end its deflate stream (a BFINAL block, RFC 7692 7.2.3.3): anything after it
        # but our tail is garbage, and the next message starts a new stream.
        if decompressor.eof and decompressor.unused_data not in (b"", _DEFLATE_TAIL):
            raise ProtocolError(CloseCode.INVALID_DATA, "data after the end of the compressed stream")
        if final and (decompressor.eof or not self._recv_keep):
            self._decompressor = None
        return out


###############################################################################
# WebSocket: one connection ###################################################
###############################################################################

# h11-style transition table: (state, event) -> next state, the only way _Protocol.state changes.
# An event missing for a state is ignored (e.g. a second close() while closing). After
# CLOSED comes one more stage, not a state: *finalized* (socket closed, closed() called;
# the ``terminated`` property), reached by the "drop" event from any state.
_TRANSITIONS = {
    (State.CONNECTING, "open"): State.OPEN,  # running in a manager: opened() is next
    (State.CONNECTING, "send_close"): State.CLOSING,  # close() before add(): sent once running
    (State.CONNECTING, "fail"): State.CLOSED,
    (State.OPEN, "send_close"): State.CLOSING,  # close(): our close frame queued, waiting for the peer's
    (State.OPEN, "receive_close"): State.CLOSED,  # peer closed first: echo queued
    (State.OPEN, "fail"): State.CLOSED,  # protocol violation / internal error: error close queued
    (State.CLOSING, "receive_close"): State.CLOSED,  # close handshake complete
    (State.CLOSING, "fail"): State.CLOSED,
    # No close handshake (or no more of it): a slow consumer, a lost socket, a timeout, terminate().
    **{(state, "drop"): State.CLOSED for state in State},
}

_MAX_TIMED_PINGS = 16  # pings per connection whose send time is kept for `latency`
COALESCE_SIZE = 64 * 1024  # small frames queued back to back share one buffer (and one send) up to this

# What _Protocol.send() tells its driver (ints: tested on every send).
_QUEUED = 0  # queued behind output the driver already knows of
_FLUSH = 1  # queued into an empty buffer: the driver must flush
_FULL = 2  # not queued: the backlog was over the limit given
_REFUSED = 3  # not queued: the connection no longer sends (closing or closed)


class _Protocol:
    """One connection's protocol with no I/O: bytes in -> events, actions -> bytes out.

    Everything that makes up a connection's state lives here, in the shape
    of websockets' ``Protocol`` and wsproto's ``WSConnection``: ``state``
    (changed only through ``_TRANSITIONS``), the close handshake
    (``received_close``: the peer's close frame; ``failure``: the code and
    reason we failed or dropped the connection with), the receive path
    (a ``_Receiver``: ``parser`` and ``assembler``, made by :meth:`start`
    once the limits are known), permessage-deflate (``deflate``) and the
    output: ``out``, the encoded frames waiting for the socket, and their
    flow-control accounting. Actions make bytes: :meth:`send_message` and
    :meth:`send_fragments` frame (mask, compress) a message, :meth:`send`
    queues frames, :meth:`close` and :meth:`fail` queue a close frame; a
    received ping queues its pong. :class:`WebSocket` drives it: it writes
    ``out`` to its socket, feeds what it reads to :meth:`receive`, and keeps
    the socket, the selector events, the timers and the callbacks.

    Flow control: ``buffered`` counts the bytes in ``out``. ``over`` is set
    when a send takes it past ``max_buffered`` (the high-water mark) and
    cleared, by :meth:`flush_ended`, once writes bring it down to a quarter
    of ``max_buffered`` (the low-water mark): that moment is ``drained()``.
    ``over`` is not a connection state: output may be backed up in any state.

    Threads: :meth:`start`, :meth:`receive` and the driver's writes
    (:meth:`written`, :meth:`flush_ended`, under ``lock``) belong to one
    thread, the loop's; every other method takes ``lock`` and may be called
    from any thread.

    Private, not in ``__all__``: its interface carries the loop driver's
    contract (the lock held around writes, the status codes of :meth:`send`),
    not an API to freeze; the sans-I/O layers offered to other I/O are the
    codec and the handshake functions.
    """

    __slots__ = ("client", "state", "lock", "receiver", "parser", "assembler", "deflate", "out", "buffered",
                 "max_buffered", "over", "received_close", "failure")

    def __init__(self, *, client: bool, max_buffered: int = DEFAULT_MAX_BUFFERED):
        self.client = client  # masks what it sends, expects unmasked frames
        self.state = _CONNECTING
        self.lock = threading.Lock()
        self.receiver: Optional[_Receiver] = None  # the receive path: its parser and assembler, as
        self.parser: Optional[FrameParser] = None  # ... the driver changes their limits (from the next frame)
        self.assembler: Optional[MessageAssembler] = None
        self.deflate: Optional[PerMessageDeflate] = None  # set before start() when permessage-deflate was agreed
        self.out: List[_BytesLike] = []  # encoded frames waiting for the socket, in send() order
        self.buffered = 0
        self.max_buffered = max_buffered
        self.over = False
        self.received_close: Optional[Close] = None
        self.failure: Optional[Tuple[int, str]] = None

    def start(self, max_frame_size: int, max_message_size: int) -> None:
        """Make the receive path with these limits (the driver may change them later on
        ``parser`` and ``assembler``: they apply from the next frame)."""
        receiver = self.receiver = _Receiver(expect_masked=not self.client, max_frame_size=max_frame_size,
                                             max_message_size=max_message_size, deflate=self.deflate)
        self.parser, self.assembler = receiver.parser, receiver.assembler

    def open(self) -> State:
        """The connection runs: CONNECTING -> OPEN (a close() before it leaves it CLOSING); the new state."""
        with self.lock:
            if self.state is _CONNECTING:
                self.state = _TRANSITIONS[(_CONNECTING, "open")]
            return self.state

    # Output ------------------------------------------------------------------

    def send(self, data: _BytesLike, limit: Optional[int] = None) -> int:
        """Queue encoded frames, unless the backlog is over ``limit`` (``None``: no limit).

        Returns ``_FLUSH`` (queued into an empty buffer: flush), ``_QUEUED``,
        ``_FULL`` or ``_REFUSED`` (closing or closed).
        """
        with self.lock:
            if self.state > _OPEN:
                return _REFUSED
            backlog = self.buffered
            if limit is not None and backlog > limit:
                return _FULL
            out = self.out
            size = len(data)
            status = _QUEUED
            if not out:
                out.append(data)
                status = _FLUSH
            else:
                # Small frames share a buffer: thousands of tiny frames (a pong flood) would
                # otherwise cost an object each, far more memory than max_buffered says.
                last = out[-1]
                fits = len(last) + size <= COALESCE_SIZE
                if fits and type(last) is bytearray:
                    last += data
                elif fits and type(last) is bytes:
                    out[-1] = bytearray(last) + data
                else:
                    if type(last) is bytearray:
                        # Full: kept as exact bytes, without the up to 1/8 a growing bytearray
                        # holds in reserve, so that max_buffered is what the backlog costs.
                        out[-1] = bytes(last)
                    out.append(data)
            self.buffered = backlog = backlog + size
            if backlog > self.max_buffered:
                self.over = True
            return status

    def send_first(self, data: bytes) -> None:
        """Queue ``data`` before everything else (the server's 101, before the connection runs)."""
        with self.lock:
            self.out.insert(0, data)
            self.buffered += len(data)

    def send_message(self, opcode: int, payload: _BytesLike, cache: Optional[Dict[Any, bytes]] = None,
                     limit: Optional[int] = None) -> int:
        """Frame (mask, compress) one whole message and queue it, as :meth:`send` does.

        ``cache`` (one dict per broadcast, by compression key) shares the bytes between connections.
        """
        deflate = self.deflate
        client = self.client
        if deflate is None:
            key: Any = None
        elif deflate.lock is not None:
            with deflate.lock:  # compressed in queue order: the peer inflates with the same context
                return self.send(encode_frame(opcode, deflate.compress(payload), mask=client, rsv1=True), limit)
        else:
            key = deflate.send_key
        if client:  # a fresh mask per frame: nothing to share
            cache = None
        data = cache.get(key) if cache is not None else None
        if data is None:
            if deflate is not None:
                payload = deflate.compress(payload)
            data = encode_frame(opcode, payload, mask=client, rsv1=deflate is not None)
            if cache is not None:
                cache[key] = data
        return self.send(data, limit)

    def send_fragments(self, chunks: Iterable[Any]) -> int:
        """Frame an iterable of chunks (all ``str`` or all bytes-like) as one fragmented message
        and queue it (``_QUEUED`` for no chunk at all), as :meth:`send` does.

        Encoded up front and queued as one piece, so that no other message can slip between
        the fragments of this one.
        """
        opcode: Optional[Opcode] = None
        payloads: List[_BytesLike] = []
        for chunk in chunks:
            chunk_opcode, payload = _data_frame(chunk)
            if opcode is None:
                opcode = chunk_opcode
            elif chunk_opcode is not opcode:
                raise TypeError("fragments of one message must be all str or all bytes-like")
            payloads.append(payload)
        if opcode is None:
            return _QUEUED
        deflate = self.deflate
        lock = deflate.lock if deflate is not None else None
        with lock or contextlib.nullcontext():  # compressed in queue order, as in send_message()
            frames = payloads if deflate is None else deflate.compress_fragments(payloads)
            last = len(frames) - 1
            # RFC 7692 6.1: RSV1 on the first frame of a compressed message only.
            data = b"".join(encode_frame(_CONTINUATION if i else opcode, payload, fin=i == last, mask=self.client,
                                         rsv1=deflate is not None and not i) for i, payload in enumerate(frames))
            return self.send(data)

    def _append_close(self, payload: bytes) -> None:
        # Under self.lock. A close frame is let past max_buffered so the handshake can finish.
        data = encode_frame(_CLOSE, payload, mask=self.client)
        self.out.append(data)
        self.buffered += len(data)

    def written(self, count: int) -> bool:
        """``count`` bytes of ``out[0]`` went to the socket (the driver holds ``lock``); whether all of it did."""
        self.buffered -= count
        out = self.out
        data = out[0]
        if count < len(data):
            # A view, not a copy: the rest of a large frame is not copied per partial write.
            out[0] = memoryview(data)[count:]
            return False
        del out[0]
        return True

    def flush_ended(self) -> Tuple[bool, bool]:
        """After the driver's writes (under ``lock``): whether output still waits, and whether
        the backlog, having passed ``max_buffered``, is now down to the low-water mark (drained)."""
        if self.over and self.buffered <= self.max_buffered >> 2:
            self.over = False
            return bool(self.out), True
        return bool(self.out), False

    # The close handshake ---------------------------------------------------------

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> bool:
        """Queue our close frame after what is queued (OPEN or CONNECTING -> CLOSING); False once closing."""
        payload = encode_close(code, reason)  # invalid arguments raise, whatever the state
        with self.lock:
            state = self.state
            if state > _OPEN:
                return False
            # Queued and marked at once, so a send() after close() fails in any thread.
            self._append_close(payload)
            self.state = _TRANSITIONS[(state, "send_close")]
            return True

    def receive_close(self, close: Close) -> bool:
        """The peer's close frame arrived: echo it unless ours went first; -> CLOSED. False if already CLOSED."""
        with self.lock:
            state = self.state
            if state is _CLOSED:
                return False
            self.received_close = close
            if state <= _OPEN:
                # RFC 6455 5.5.1: "the endpoint MUST send a Close frame in response ...
                # typically echoing the status code it received." No code, no code back.
                self._append_close(b"" if close.code == CloseCode.NO_STATUS else close.code.to_bytes(2, "big"))
            self.state = _TRANSITIONS[(state, "receive_close")]
            return True

    def fail(self, code: int, reason: str) -> bool:
        """Fail the connection (RFC 6455 7.1.7): an error close frame after what is queued, -> CLOSED.
        False if already CLOSED."""
        with self.lock:
            state = self.state
            if state is _CLOSED:
                return False
            self.failure = (code, reason)
            if state <= _OPEN:
                # Cut at 123 bytes without splitting a character: the reason must stay UTF-8.
                cut = reason.encode()[:123].decode(errors="ignore")
                self._append_close(encode_close(code, cut))
            self.state = _TRANSITIONS[(state, "fail")]
            return True

    def abort(self, reason: str) -> None:
        """Stop at once, with no close frame (a slow consumer): -> CLOSED, ``closed()`` gets 1006 and ``reason``."""
        with self.lock:
            self.state = _TRANSITIONS[(self.state, "drop")]
            self.failure = (CloseCode.ABNORMAL, reason)

    def end(self, reason: str) -> Tuple[int, str]:
        """The socket is gone: -> CLOSED, output discarded; the code and reason ``closed()`` gets."""
        with self.lock:
            self.state = _TRANSITIONS[(self.state, "drop")]
            self.out.clear()
            self.buffered = 0
            self.over = False
        return self.outcome() or (CloseCode.ABNORMAL, reason)

    def outcome(self) -> Optional[Tuple[int, str]]:
        """The close code and reason known so far (ours alone decides nothing), or ``None``."""
        return self.failure or self.received_close

    # Input -----------------------------------------------------------------------

    def receive(self, data: Union[bytes, bytearray]) -> Iterator[Union[str, bytes, Frame, Close]]:
        """Feed bytes read from the socket; lazily yield what they complete, in order.

        A message (``str`` for text, ``bytes`` for binary); a ping or pong
        :class:`Frame` (a ping is answered: its pong is queued first); last, a
        :class:`Close`: the peer's close frame (its echo queued), or the close
        we failed the connection with on a violation (every valid message
        before it is yielded first). Lazily: what the consumer does with one
        event (a send, a close, a setting) comes before the next, and nothing
        after a close frame or a failure is processed (RFC 6455 5.5.1).
        """
        receiver = self.receiver
        assert receiver is not None  # made by start()
        try:
            for frame, message in receiver.feed(data):
                kind = type(message)
                if kind is str or kind is bytes:
                    yield message  # type: ignore[misc]
                elif message is None:
                    continue
                elif kind is Close:
                    if self.receive_close(message):  # type: ignore[arg-type]
                        yield message
                    return
                else:
                    if frame.opcode == _PING:
                        # RFC 6455 5.5.2: answer a ping with a pong carrying the same payload. 5.5.3:
                        # "an endpoint MAY elect to send a Pong frame for only the most recently
                        # processed Ping frame": none while the backlog is over max_buffered.
                        self.send(encode_frame(_PONG, frame.payload, mask=self.client), self.max_buffered)
                    yield frame
                if self.state is _CLOSED:
                    return  # failed by the consumer meanwhile (an error in a callback)
        except ProtocolError as exc:
            if self.fail(exc.code, exc.reason):
                yield Close(exc.code, exc.reason)

def _cancel(timer: Optional[List[Any]]) -> None:
    """Cancel a timer of :meth:`_Loop.call_later` (``None``: none pending); returns ``None``."""
    if timer is not None:
        timer[2] = None


def _bracket(host: str) -> str:
    """A host as it stands before ``:port`` (in a URL, a Host header, a log line): IPv6 in brackets."""
    return f"[{host}]" if ":" in host else host


def _connect_error(exc: OSError, address: Any) -> OSError:
    """``exc`` from a TCP connect, again (same type and errno), naming the address: the socket module's
    "[Errno 111] Connection refused" says nothing of where to."""
    where = f"{_bracket(str(address[0]))}:{address[1]}" if isinstance(address, tuple) else str(address)
    try:
        if exc.errno is not None and exc.strerror:
            return type(exc)(exc.errno, f"{exc.strerror} ({where})")
        return type(exc)(f"{exc} ({where})")
    except Exception:  # an OSError subclass with a constructor of its own: as it was
        return exc


def _data_frame(message: Any) -> Tuple[Opcode, _BytesLike]:
    if isinstance(message, str):
        return _TEXT, message.encode()
    if isinstance(message, (bytes, bytearray)):
        return _BINARY, message
    try:
        return _BINARY, _byte_view(message)  # any bytes-like object: array, memoryview, numpy ...
    except TypeError:
        raise TypeError(f"cannot send {type(message).__name__}: str, bytes-like or an iterable of them") from None


def _is_bytes_like(message: Any) -> bool:
    try:
        memoryview(message)
    except TypeError:
        return False
    return True


# Per-connection settings (see WebSocket for their precedence). A connection's slot "_" + name holds
# its own value (None: none) until it runs, then the value in force.
_CONNECTION_SETTINGS = ("max_message_size", "max_frame_size", "max_buffered", "close_timeout")


def _check_setting(name: str, value: Any) -> Any:
    """``value`` if it is a valid value of setting ``name`` (or ``None``: the default); else raise."""
    if type(value) is int and value >= 0 or value is None:  # deliberate: the common case (bytes, whole seconds) first
        return value
    seconds = name == "close_timeout"
    if isinstance(value, bool) or not isinstance(value, (int, float) if seconds else int):
        unit = "a number of seconds" if seconds else "an int (bytes)"
        raise TypeError(f"{name} must be {unit}, not {type(value).__name__}")
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"{name} must be >= 0, not {value!r}")
    return value


class _Setting:
    """A per-connection setting: the connection's slot if set, else ``default``, the class attribute."""

    __slots__ = ("name", "default")

    def __init__(self, name: str, default: Any = None):
        self.name = name
        self.default = _check_setting(name, default)

    def __get__(self, websocket: Optional["WebSocket"], owner: Any = None) -> Any:
        value = None if websocket is None else getattr(websocket, "_" + self.name)  # (a slot set in __new__)
        return self.default if value is None else value

    def __set__(self, websocket: "WebSocket", value: Any) -> None:
        websocket._set_setting(self.name, _check_setting(self.name, value))


def _queue_to_all(websockets: Iterable["WebSocket"], opcode: int, payload: _BytesLike) -> int:
    """Queue one message to many connections (publish, broadcast); return how many took it.

    The fan-out rule: a connection that already has more than its
    ``max_buffered`` queued is dropped as a slow consumer (1006), never
    waited for: one slow reader must not stall the others. Deliberate: the
    frame is encoded once and shared through one cache per call (see
    :meth:`_Protocol.send_message`).
    """
    frame = encode_frame(opcode, payload)
    shared: Dict[Any, bytes] = {None: frame}
    count = 0
    for websocket in websockets:
        protocol = websocket._protocol
        limit = protocol.max_buffered
        if protocol.deflate is None and not protocol.client:  # deliberate: the common case inline
            status = protocol.send(frame, limit)
        else:
            status = protocol.send_message(opcode, payload, shared, limit)
        if status == _QUEUED:
            count += 1
        elif status == _FLUSH:
            count += 1
            loop = websocket._loop  # deliberate: WebSocket._schedule_flush() inlined
            if loop is not None:
                loop.schedule_flush(websocket)
        elif status == _FULL:
            websocket._drop(f"slow consumer: more than {limit} bytes left unread (max_buffered)")
    return count


_Self = TypeVar("_Self", bound="WebSocket")  # WebSocket.__new__'s class


class WebSocket:
    """One WebSocket connection, server or client side: the I/O around its protocol.

    Subclass it and override the callbacks :meth:`opened`,
    :meth:`received_message`, :meth:`ponged`, :meth:`drained` and
    :meth:`closed`; they run in the manager's loop thread. The actions
    :meth:`send`, :meth:`ping`, :meth:`close` and :meth:`terminate` may be
    called from any thread.

    Instances are made by :meth:`WebSocketManager.listen`, :func:`connect`
    and :meth:`WebSocketManager.accept`, and run once given to
    :meth:`WebSocketManager.add`.

    The settings ``max_message_size``, ``max_frame_size``, ``max_buffered``
    and ``close_timeout`` may be set per connection: on the instance (in
    ``__init__``, before or after ``super().__init__()``, or later), or as
    class attributes of a subclass (inherited by its subclasses). The value
    in force is the instance's, else the class's, else the manager's; with
    no ``max_frame_size`` from any of the three, frames may be as large as
    the connection's ``max_message_size``. It is resolved when the connection
    starts running and kept if it moves to another manager. Until then,
    reading a setting gives the instance's or the class's value (``None``
    for neither), and sends are bounded by that ``max_buffered``, else the
    manager's. Set while the connection runs, a value is in force from its
    next frame, message or send, and ``None`` goes back to the class's or
    the manager's value (:class:`RuntimeError` out of a manager). An invalid
    value raises :class:`TypeError` or :class:`ValueError` when set (for a
    class attribute, when the class is made).

    The names the library uses internally (those starting with ``_`` that
    this class defines) are reserved: a subclass that defines one raises
    :class:`TypeError` when it is made, instead of breaking its connections.
    """

    if TYPE_CHECKING:  # plain attributes to type checkers; _Setting descriptors at run time
        max_message_size: Optional[int]
        max_frame_size: Optional[int]
        max_buffered: Optional[int]
        close_timeout: Optional[float]
    else:
        max_message_size, max_frame_size, max_buffered, close_timeout = map(_Setting, _CONNECTION_SETTINGS)
    _max_message_size: Optional[int]  # their slots (see _CONNECTION_SETTINGS)
    _max_frame_size: Optional[int]
    _max_buffered: Optional[int]
    _close_timeout: Optional[float]

    #: The WSGI environ of a connection accepted through :meth:`WebSocketManager.wsgi_app`, set before
    #: :meth:`opened`: a copy without the server's I/O (``wsgi.input``, ``wsgi.errors``,
    #: ``wsgi.file_wrapper``, ``wsgi.early_hints``, the server's socket, and any value that is a
    #: socket, file or stream).
    #: ``None`` for every other connection (:meth:`~WebSocketManager.listen`,
    #: :meth:`~WebSocketManager.accept`, clients): their request is in :attr:`path`,
    #: :attr:`request_headers` and :attr:`peer_address`. A class attribute, so that it costs
    #: those connections nothing.
    environ: Optional[Dict[str, Any]] = None

    #: Seconds between the last answered ping (:meth:`ping` or the heartbeat's) and its pong; 0.0 before.
    #: Client features are class defaults too: an instance gets a value of its own only once used.
    latency: float = 0.0
    #: How a :meth:`WebSocketManager.connect` client reconnects (``reconnect=``), ``None`` when it does
    #: not. Set it to ``None`` (in any callback too) and this connection, once it ends, is not replaced;
    #: :meth:`close` and :meth:`terminate` do that.
    reconnect: "Optional[Reconnect]" = None
    #: How many connections of this reconnecting client opened before this one: 0 on the first.
    reconnects: int = 0
    _pings: Optional[Dict[bytes, float]] = None  # payload -> when sent, of the pings not answered yet
    _redial: "Optional[_Redial]" = None  # the reconnecting client this connection belongs to

    # The connection's state is its _protocol's (state, close handshake, output, flow control).
    # What else a connection holds is about its I/O, not protocol states: _finalized (the socket is
    # closed and closed() called: the ``terminated`` property), _events (the selector events asked
    # for, 0 until _run() registers it and from _unbind(): EVENT_READ is left out while the output is
    # backed up), _shut_down (our side of the socket shut after the last close frame), _room (where
    # threads wait for the backlog to drain), the timers, the settings, and the client's
    # _pings (ping payload -> when sent, for ``latency``) and _redial (its reconnecting client).
    __slots__ = (
        "sock", "client", "peer_address", "path", "_request_headers", "_response_headers", "subprotocol",
        "close_code", "close_reason", "_max_buffered", "_max_message_size", "_max_frame_size", "_close_timeout",
        "_protocol", "_room", "_events", "_manager", "_loop", "_fd", "_extra", "_finalized", "_timer", "_listener",
        "_last_seen", "_ping_sent", "_shut_down", "_tls", "_heartbeat_timer", "_frame_size_follows",
        "__dict__", "__weakref__",
    )

    def __init__(self, sock: socket.socket, *, client: bool = False, path: str = "/",
                 request_headers: Union[Headers, bytes, None] = None,
                 response_headers: Union[Headers, bytes, None] = None,
                 subprotocol: Optional[str] = None, peer_address: Any = None, extra_data: bytes = b""):
        self.sock = sock
        self.client = client
        self.peer_address = peer_address
        self.path = path
        # Kept as the raw head and parsed on first access: parsed headers cost a few KiB per
        # connection, most of an idle connection's memory, and most applications never look.
        self._request_headers = request_headers if request_headers is not None else Headers()
        self._response_headers = response_headers
        self.subprotocol = subprotocol
        self.close_code: Optional[int] = None
        self.close_reason: Optional[str] = None
        self._manager: "Optional[WebSocketManager]" = None
        self._loop: Optional[_Loop] = None  # its manager's, while it has one
        self._protocol = _Protocol(client=client, max_buffered=self._provisional_max_buffered())
        self._room: Optional[threading.Condition] = None  # made by the first thread that waits
        self._events = 0  # 0: not registered in a manager's selector (before _run(), after _unbind())
        self._fd = sock.fileno()
        self._extra = extra_data  # bytes read along with the handshake: the first frames
        self._finalized = False
        self._timer: Any = None  # the close/linger deadline
        self._listener: Any = None
        self._last_seen = 0.0
        self._ping_sent = 0.0  # when the heartbeat ping went out; 0 when none is outstanding
        self._shut_down = False
        self._tls = _is_tls(sock)
        self._heartbeat_timer: Any = None  # the one pending heartbeat check of this connection
        self._frame_size_follows = False  # its max_frame_size is its max_message_size, as it changes (_in_force)

    def __new__(cls: "type[_Self]", *args: Any, **kwargs: Any) -> "_Self":
        # Deliberate: the setting slots exist (None) before any __init__ runs, so that a subclass may
        # set one first and reading them needs no getattr() default (a raised AttributeError each).
        self = object.__new__(cls)
        self._max_message_size = self._max_frame_size = self._max_buffered = self._close_timeout = None
        return self

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A method or attribute named like one of the library's internals would silently replace
        # it (a user's _run or _fail breaks every connection): refused when the class is made.
        clashes = sorted(name for name in cls.__dict__ if name in _RESERVED_NAMES)
        if clashes:
            raise TypeError(f"{cls.__qualname__} defines {', '.join(clashes)}: wsmanager.WebSocket uses "
                            f"{'this name' if len(clashes) == 1 else 'these names'} internally; rename "
                            f"{'it' if len(clashes) == 1 else 'them'}")
        # ``max_message_size = 16 * 2**20`` in a subclass body: checked now, the class's default.
        for name in _CONNECTION_SETTINGS:
            if name in cls.__dict__:
                setattr(cls, name, _Setting(name, cls.__dict__[name]))

    # Callbacks ---------------------------------------------------------------

    def opened(self) -> None:
        """Called once, in the loop thread, before any message is delivered."""

    def received_message(self, message: Union[str, bytes]) -> None:
        """Called in the loop thread for each complete message: ``str`` for text, ``bytes`` for binary.

        It must not block: no other connection is served while it runs.
        """

    def ponged(self, payload: bytes) -> None:
        """Called in the loop thread for each pong received, with its payload."""

    def drained(self) -> None:
        """Called each time the output, having backed up past ``max_buffered``, is down to a
        quarter of it (see :attr:`buffered_amount`): the moment to send more when streaming.
        In the loop thread."""

    def connect_failed(self, exc: BaseException) -> None:
        """Called instead of :meth:`opened` and :meth:`closed` when :meth:`WebSocketManager.connect`
        could not open the connection: ``exc`` says why (see there). The socket is closed.
        In the loop thread."""

    def closed(self, code: int, reason: str) -> None:
        """Called exactly once when the connection is over and its socket closed.

        ``code`` is the peer's close code (1005 if its close frame had
        none), the code we failed the connection with, or 1006 when no close
        frame was exchanged (peer vanished, timeout, slow consumer, stop).
        In the loop thread; the last callback the connection gets.
        """

    # Actions -----------------------------------------------------------------

    def send(self, message: Union[str, bytes, bytearray, memoryview, Iterable[Union[str, bytes]]],
             timeout: Optional[float] = None) -> None:
        """Queue a message: ``str`` as text, bytes-like as binary, an iterable of
        chunks (all ``str`` or all bytes-like) as one fragmented message.
        With permessage-deflate negotiated, every message is compressed.

        A message of any size is queued at once while at most ``max_buffered``
        bytes wait for the socket. Past that (the peer reads slower than we
        send), a thread other than the loop's waits until the backlog is down
        to a quarter of ``max_buffered``, then queues; after ``timeout``
        seconds (``None``: no limit) it raises :class:`TimeoutError`, the
        message not queued and the connection still open. Where nothing
        could wake a wait (in the loop thread, that is a callback, or for a
        connection no running manager runs) the message is still queued up
        to twice ``max_buffered``, beyond which this raises
        :class:`BufferFull`: send again from :meth:`drained`.

        Raises :class:`ConnectionClosed` once closing (also while waiting).
        """
        protocol = self._protocol
        if protocol.buffered > protocol.max_buffered:  # deliberate: an unlocked peek, one test on the hot path
            self._make_room(timeout, "cannot send")
        # Deliberate: an uncompressed whole message, the common case, is framed here, as
        # _Protocol.send_message() would, one call less per send.
        if protocol.deflate is None and isinstance(message, str):
            status = protocol.send(encode_frame(_TEXT, message.encode(), mask=self.client))
        elif protocol.deflate is None and (isinstance(message, (bytes, bytearray, memoryview))
                                           or _is_bytes_like(message)):
            # encode_frame() sends any bytes-like object as its bytes (nbytes, not its item count).
            status = protocol.send(encode_frame(_BINARY, cast(_BytesLike, message), mask=self.client))
        elif isinstance(message, (str, bytes, bytearray, memoryview)) or _is_bytes_like(message):
            status = protocol.send_message(*_data_frame(message))
        else:
            status = protocol.send_fragments(message)
        if status:  # deliberate: _QUEUED (0), most sends of a burst, costs this one test
            if status == _FLUSH:  # (inlined: the first send after each flush)
                loop = self._loop
                if loop is not None:
                    loop.schedule_flush(self)
            else:  # _REFUSED: with no limit given, never _FULL
                raise self._closed_error("cannot send")

    def _enable_deflate(self, params: Optional[DeflateParams], settings: Optional[Deflate]) -> None:
        # Before add(): the parser and assembler made by _run() take it from here. None: not agreed on.
        if params is not None and settings is not None:
            self._protocol.deflate = PerMessageDeflate(params, client=self.client, level=settings.level,
                                                       mem_level=settings.mem_level)

    def ping(self, payload: _BytesLike = b"") -> None:
        """Queue a ping (a bytes-like payload of at most 125 bytes); the pong comes to :meth:`ponged`
        and its round trip to :attr:`latency`. Paused or refused like :meth:`send` when the output is
        backed up. Any thread. Raises :class:`ValueError` for a longer payload and
        :class:`ConnectionClosed` once closing."""
        data = encode_frame(_PING, payload, mask=self.client)
        protocol = self._protocol
        if protocol.buffered > protocol.max_buffered:
            self._make_room(None, "cannot ping")
        self._ping_timed(bytes(payload))
        status = protocol.send(data)
        if status == _FLUSH:
            self._schedule_flush()
        elif status == _REFUSED:
            raise self._closed_error("cannot ping")

    def _ping_timed(self, payload: bytes) -> None:
        # Any thread. A ping sent again with the same payload is timed from the later one.
        with self._protocol.lock:
            pings = self._pings
            if pings is None:
                pings = self._pings = {}
            pings.pop(payload, None)
            pings[payload] = time.monotonic()
            if len(pings) > _MAX_TIMED_PINGS:  # bounded: unanswered pings are forgotten oldest first
                del pings[next(iter(pings))]

    def _pong_timed(self, payload: bytes) -> None:
        # As websockets does: a pong answers the ping with its payload and every ping sent before that one.
        pings = self._pings
        if not pings or payload not in pings:
            return  # unsolicited
        now = time.monotonic()
        with self._protocol.lock:
            for sent_payload in list(pings):
                sent = pings.pop(sent_payload)
                if sent_payload == payload:
                    self.latency = now - sent
                    break

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the close handshake: everything queued before goes out first,
        then the close frame; the socket closes when the peer answers or
        after ``close_timeout``. Does nothing once closing. A reconnecting
        client closed by us is not reconnected. Any thread. Raises
        :class:`ValueError` for a code that may not be sent (1005, 1006, 1015,
        out of range) or a reason longer than 123 bytes in UTF-8."""
        closing = self._protocol.close(code, reason)  # (invalid arguments raise here, in any state)
        if self.reconnect is not None:
            self.reconnect = None
        if not closing:
            return
        self._wake_senders()
        self._schedule_flush()
        self._call_threadsafe(self._arm_close_timer)

    def terminate(self) -> None:
        """Close the socket now, without a close handshake (``closed()`` gets 1006); not reconnected.
        Any thread."""
        if self.reconnect is not None:
            self.reconnect = None
        self._call_threadsafe(self._finalize, "terminated")

    def _closed_error(self, action: str) -> ConnectionClosed:
        # What closed() gets, as far as it is known yet: our own close frame alone decides nothing.
        code, reason = self._protocol.outcome() or (self.close_code, self.close_reason)
        detail = f": {code} {reason}".rstrip() if code is not None else ""
        return ConnectionClosed(f"{action}: connection is {self.state.name}{detail}", code, reason)

    # State -------------------------------------------------------------------

    @property
    def state(self) -> State:
        """Where the connection is in its life: see :class:`State`."""
        return self._protocol.state

    @property
    def request_headers(self) -> Headers:
        """Headers of the opening request (for a client: the ones it sent)."""
        headers = self._request_headers
        if isinstance(headers, bytes):
            headers = self._request_headers = _parse_head(headers)[1]
        return headers

    @property
    def response_headers(self) -> Optional[Headers]:
        """Headers of the server's 101 response (client side only, else ``None``)."""
        headers = self._response_headers
        if isinstance(headers, bytes):
            headers = self._response_headers = _parse_head(headers)[1]
        return headers

    @property
    def compression(self) -> Optional[DeflateParams]:
        """What permessage-deflate negotiation agreed on, or ``None`` when messages go uncompressed."""
        deflate = self._protocol.deflate
        return deflate.params if deflate is not None else None

    @property
    def terminated(self) -> bool:
        """Whether the connection is over and its socket closed."""
        return self._finalized

    @property
    def manager(self) -> "Optional[WebSocketManager]":
        """The manager running this connection, or ``None`` (not added yet, removed, or over)."""
        return self._manager

    @property
    def buffered_amount(self) -> int:
        """Bytes queued but not yet written to the socket (frames as sent: headers, masks, compression).

        As the browser's ``bufferedAmount``: past ``max_buffered`` sends from
        other threads wait (see :meth:`send`), and :meth:`drained` runs when
        it is down to a quarter of ``max_buffered``. The server's 101 counts
        while it waits; 0 once the connection is over.
        """
        return self._protocol.buffered

    def fileno(self) -> int:
        return self._fd

    def __repr__(self) -> str:
        return f"<{self._describe()} {self.state.name}>"

    def _describe(self) -> str:
        # For the log: formatted now, not when a handler gets to it (the state would have moved on).
        role = "client" if self.client else "server"
        return f"{type(self).__name__} {role} {self.peer_address!r} {self.path!r}"

    # Internals: any thread -----------------------------------------------------

    def _make_room(self, timeout: Optional[float], action: str) -> None:
        """A send found more than ``max_buffered`` queued: wait for the drain, or refuse beyond the hard bound.

        A thread waits only when a running loop will drain the output and
        wake it (websockets' ``drain()``, uWebSockets' backpressure); the
        loop thread, or any thread while no loop runs the connection, never
        waits: nothing would end the wait (never a deadlock).
        """
        protocol = self._protocol
        manager = self._manager
        in_loop = manager is not None and manager._loop.in_loop()
        if (manager is not None and not in_loop and manager._life is not _Life.CLOSED
                and (manager._thread is not None or manager._loop.thread_id is not None)):  # a loop runs it, or will
            deadline = None if timeout is None else time.monotonic() + timeout
            with protocol.lock:
                room = self._room
                if room is None:
                    room = self._room = threading.Condition(protocol.lock)
                while protocol.over and protocol.state <= _OPEN and self._manager is manager:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(f"{action}: {protocol.buffered} bytes still queued after {timeout:g} s "
                                           f"(max_buffered {protocol.max_buffered}); the message was not queued")
                    room.wait(remaining)
            if self._manager is manager and protocol.state <= _OPEN:
                return
            # Closed, or remove()d while waiting (no loop drains it now): as without a loop.
        if protocol.state > _OPEN:
            raise self._closed_error(action)
        bound = 2 * protocol.max_buffered
        if protocol.buffered > bound:
            where = "in the loop thread" if in_loop else "with no running manager"
            raise BufferFull(f"{action}: {protocol.buffered} bytes queued {where}, more than twice max_buffered "
                             f"({bound}); the message was not queued: send again from drained()")

    def _wake_senders(self) -> None:
        # Threads waiting in _make_room() look again: drained, closed, or out of the manager.
        room = self._room
        if room is not None:
            with self._protocol.lock:
                room.notify_all()

    def _schedule_flush(self) -> None:
        loop = self._loop
        if loop is not None:
            loop.schedule_flush(self)

    def _drop(self, reason: str) -> None:
        # A slow consumer of a fan-out: no more output from now, the socket closed in the loop.
        self._protocol.abort(reason)
        self._call_threadsafe(self._finalize)

    def _call_threadsafe(self, function: Callable[..., Any], *args: Any) -> None:
        # In the loop thread when running, else right here (no loop to race with).
        loop = self._loop
        if loop is None:
            function(*args)
        else:
            loop.call_threadsafe(function, *args)

    def _provisional_max_buffered(self) -> int:
        # What bounds the sends before the connection runs: its max_buffered as resolved now, else the default.
        value, manager = self.max_buffered, self._manager
        if value is None:
            value = manager.max_buffered if manager is not None else DEFAULT_MAX_BUFFERED
        return value

    # The manager's side: loop thread only ---------------------------------------
    #
    # The manager calls, of a connection's private half, only: _bind() and _unbind()
    # (joining and leaving it), _run() (its loop turn to start), the handler interface
    # (_on_read, _on_write, _finalize), _flush() (the flush queue), _closed_error() (add()'s
    # refusal), _enable_deflate() (what a handshake agreed), _take_response() and _take_socket() (a loop
    # client handshake's outcome and new sockets), _describe() (log lines) and, from the listener that made it,
    # _queue_reply(). A connection uses of its manager: _life, _thread and _frame_size_follows (read
    # only), _forget(), _count_end() (a stop's summary line), _client_handshake() (a close() before
    # manager.connect() opened) and its default settings (public attributes); of the manager's loop
    # (_loop, from _bind() to _unbind()), the loop API (see _Loop).

    def _bind(self, manager: "WebSocketManager") -> None:
        """Belong to ``manager`` (under its lock, or in its loop)."""
        self._manager = manager
        self._loop = manager._loop
        protocol = self._protocol
        if protocol.parser is None:  # not running yet: sends are bounded by the manager's default now
            protocol.max_buffered = self._provisional_max_buffered()

    def _unbind(self) -> None:
        """Leave the manager (remove()): nothing of the connection is lost but its timers."""
        with self._protocol.lock:
            self._manager = self._loop = None
            self._events = 0
        self._release()
        self._wake_senders()  # a thread waiting for the drain: no loop drains it now

    def _release(self) -> None:
        # What running took: the timers, and a place in the listener's count.
        _cancel(self._timer)
        _cancel(self._heartbeat_timer)
        self._timer = self._heartbeat_timer = None
        listener = self._listener
        if listener is not None:
            listener._unclaim()
            self._listener = None

    def _take_response(self, head: bytes, rest: bytes, subprotocol: Optional[str],
                       deflate: Optional[DeflateParams], settings: Optional[Deflate]) -> None:
        """What the blocking connect() gives the factory, known to a loop client handshake only now."""
        self._response_headers = head
        self.subprotocol = subprotocol
        self._extra = rest
        self._enable_deflate(deflate, settings)

    def _take_socket(self, sock: socket.socket, peer_address: Any = None, path: Optional[str] = None,
                     request_head: Optional[bytes] = None) -> None:
        """A loop client handshake's new socket, before the connection opens: TLS started on it, or a redirect's."""
        self.sock = sock
        self._fd = sock.fileno()
        self._tls = _is_tls(sock)
        if peer_address is not None:
            self.peer_address = peer_address
        if path is not None:
            self.path = path
        if request_head is not None:
            self._request_headers = request_head

    def _queue_reply(self, reply: bytes, listener: "_Listener") -> None:
        """Queue the server's 101 before anything else, before the connection runs; ``listener`` counts it."""
        self._listener = listener
        self._protocol.send_first(reply)

    def _run(self, manager: "WebSocketManager") -> None:
        """Start (or, moved from another manager, resume) running in ``manager``'s loop."""
        if self._finalized or self._manager is not manager or self._events:
            return  # closed, remove()d, or already running here (a repeat add() queued twice)
        loop = manager._loop
        protocol = self._protocol
        first_time = protocol.parser is None
        if first_time:
            for name in _CONNECTION_SETTINGS:  # from now on each slot holds the value in force
                setattr(self, "_" + name, self._in_force(name, getattr(self, "_" + name)))
            protocol.max_buffered = cast(int, self._max_buffered)
            protocol.start(cast(int, self._max_frame_size), cast(int, self._max_message_size))
            self._last_seen = loop.now
        sock = self.sock
        if sock.gettimeout() != 0.0:  # deliberate: a server handshake's socket is already non-blocking (2 syscalls)
            sock.setblocking(False)
        loop.set_events(sock, selectors.EVENT_READ, self)
        self._events = selectors.EVENT_READ
        if first_time:
            protocol.open()
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s opened", self._describe())
            try:
                self.opened()
            except Exception as exc:
                self._callback_failed("opened", exc)
        if protocol.state > _OPEN:
            # A close() before add(), or moved while closing (_unbind() dropped the deadline): the close
            # deadline starts now (a close in opened() has started it already).
            self._arm_close_timer()
        if protocol.out:  # queued before it ran (or while out of a manager): a racing send may schedule it too
            loop.schedule_flush(self)
        if manager.heartbeat and protocol.state is _OPEN:
            self._heartbeat_timer = loop.call_later(manager.heartbeat, self._heartbeat)
        extra = self._extra
        if extra and protocol.state < _CLOSED:
            self._extra = b""
            self._receive(extra)
        if self._tls and not self._finalized and cast("ssl.SSLSocket", sock).pending():
            loop.read_again(self)

    def _heartbeat(self) -> None:
        """The heartbeat timer: ping when idle, fail with 1011 when the ping goes unanswered."""
        manager = self._manager
        if self._finalized or self.state is not _OPEN or manager is None:
            return
        interval, timeout = manager.heartbeat, manager.heartbeat_timeout
        if not interval or timeout is None:
            return  # heartbeat turned off since this call was scheduled
        loop = manager._loop
        now = loop.now
        ping_sent = self._ping_sent
        if ping_sent and self._last_seen <= ping_sent:  # the ping is unanswered: no input since
            if now - ping_sent >= timeout:
                self._fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                return
            delay = ping_sent + timeout - now
        elif now - self._last_seen >= interval:
            self._ping_sent = now
            self._ping_timed(b"")
            if self._protocol.send(encode_frame(_PING, b"", mask=self.client)) == _FLUSH:
                loop.schedule_flush(self)
            delay = timeout
        else:
            self._ping_sent = 0.0  # any input proves the peer alive
            delay = interval - (now - self._last_seen)
        self._heartbeat_timer = loop.call_later(delay, self._heartbeat)

    def _in_force(self, name: str, value: Any) -> Any:
        # The one place of the precedence (see WebSocket): ``value`` (the instance's own), else the
        # class's, else the manager's; checked. For max_frame_size, also whether it follows max_message_size.
        if value is None:
            value = getattr(type(self), name)
        manager = self._manager
        if name == "max_frame_size":
            self._frame_size_follows = value is None and manager is not None and manager._frame_size_follows
            if self._frame_size_follows:
                return self._max_message_size
        if value is None:
            if manager is None:
                raise RuntimeError(f"{name}: no default to go back to while the connection is out of a manager")
            value = getattr(manager, name)
            if value is None:
                raise TypeError(f"the manager's {name} is None: no limit to apply")
        return _check_setting(name, value)

    def _set_setting(self, name: str, value: Any) -> None:
        # Any thread. Before the connection runs: the instance's own value (None: none). From _run() on:
        # the value in force, in the slot and in the protocol's limits (read at each frame and send).
        protocol: Optional[_Protocol] = getattr(self, "_protocol", None)  # (None before WebSocket.__init__ has run)
        if protocol is None or protocol.parser is None:
            setattr(self, "_" + name, value)
            if protocol is not None:
                protocol.max_buffered = self._provisional_max_buffered()
            return
        assert protocol.assembler is not None
        value = self._in_force(name, value)
        setattr(self, "_" + name, value)
        if name == "max_buffered":
            protocol.max_buffered = value
        elif name == "max_message_size":
            protocol.assembler.max_message_size = value
            if self._frame_size_follows:
                self._max_frame_size = protocol.parser.max_frame_size = value
        elif name == "max_frame_size":
            protocol.parser.max_frame_size = value

    def _on_read(self) -> None:
        loop = self._loop
        if self._finalized or loop is None or loop.thread_id != _get_ident():
            return  # a stale event for a connection closed or remove()d (or moved) earlier in this turn
        try:
            data = self.sock.recv(READ_SIZE)
        except _would_block():
            return
        except OSError as exc:
            # TLS's close_notify (SSLZeroReturnError) is an EOF. ssl is looked at on a TLS socket only:
            # a plain connection's reset must not import it (it may be out of descriptors to do so).
            if not (self._tls and isinstance(exc, ssl.SSLZeroReturnError)):
                self._finalize(f"connection lost: {exc}")
                return
            data = b""
        if not data:
            # EOF: the end of a close handshake, or a peer that vanished without one (1006).
            self._finalize("connection closed without a close frame")
            return
        self._last_seen = loop.now
        protocol = self._protocol
        if protocol.state < _CLOSED:
            self._receive(data)
        if protocol.over and self._events & selectors.EVENT_READ and not self._finalized:
            # The output backed up past max_buffered: read no more until it drains (_flush), so that
            # a peer that sends without reading (an echo's) cannot make us queue without bound.
            self._events = selectors.EVENT_WRITE
            loop.set_events(self.sock, selectors.EVENT_WRITE, self)
        if self._tls and not self._finalized and cast("ssl.SSLSocket", self.sock).pending():
            # TLS may hold decrypted bytes that no readiness event will announce.
            loop.read_again(self)

    def _receive(self, data: bytes) -> None:
        for event in self._protocol.receive(data):
            kind = type(event)
            if kind is str or kind is bytes:
                try:
                    self.received_message(event)  # type: ignore[arg-type]
                except Exception as exc:
                    self._callback_failed("received_message", exc)
            elif kind is Close:
                self._wind_down()  # the peer's close frame, or a violation: ours is queued
            elif event.opcode == _PING:  # type: ignore[union-attr]
                self._schedule_flush()  # its pong is queued
            else:
                self._ping_sent = 0.0
                self._pong_timed(event.payload)  # type: ignore[union-attr]
                try:
                    self.ponged(event.payload)  # type: ignore[union-attr]
                except Exception as exc:
                    self._callback_failed("ponged", exc)

    def _callback_failed(self, name: str, exc: Exception) -> None:
        if isinstance(exc, ConnectionClosed) and self.state > _OPEN:
            return  # a send() racing the close of its own connection: nothing is wrong
        logger.error("%s.%s raised; closing %r with 1011", type(self).__name__, name, self, exc_info=exc)
        # Details stay in the log: the peer only learns that something went wrong.
        self._fail(CloseCode.INTERNAL_ERROR, "internal error")

    def _arm_close_timer(self) -> None:
        manager = self._manager
        # Before add() there is no loop yet: _run() arms it then.
        if manager is not None and self._protocol.parser is not None and self._timer is None and not self._finalized:
            self._timer = manager._loop.call_later(cast(float, self._close_timeout), self._finalize, "close timeout")
        elif manager is not None and self._protocol.parser is None:  # close() before the 101 of manager.connect()?
            handshake = manager._client_handshake(self)
            if handshake is not None:
                handshake._abandon("closed by the application")

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): error close frame after what is queued, then close."""
        if self._protocol.fail(code, reason):
            self._wind_down()

    def _wind_down(self) -> None:
        """After the close frames: flush, half-close, wait for the peer's EOF (bounded by close_timeout)."""
        self._wake_senders()
        loop = self._loop
        if loop is None:
            return
        _cancel(self._timer)
        self._timer = loop.call_later(cast(float, self._close_timeout), self._finalize, "close timeout")
        loop.schedule_flush(self)

    def _flush(self) -> None:
        loop = self._loop
        protocol = self._protocol
        if self._finalized or loop is None or protocol.parser is None or loop.thread_id != _get_ident():
            return  # not running (yet), or no longer in this loop: _run() schedules the flush of what is queued
        error = None
        sock = self.sock
        with protocol.lock:
            out = protocol.out
            for _ in range(WRITES_PER_FLUSH):
                if not out:
                    break
                try:
                    sent = sock.send(out[0])
                except _would_block():
                    break
                except OSError as exc:
                    error = exc
                    break
                if not protocol.written(sent):
                    break
            waiting, drained = protocol.flush_ended()
        if error is not None:
            self._finalize(f"connection lost: {error}")
            return
        if protocol.over:
            # Backed up: write only, read again once drained (see _on_read). The peer reads what we
            # write: that proves it alive to the heartbeat, which cannot read its pongs meanwhile.
            events = selectors.EVENT_WRITE
            self._last_seen = loop.now
        else:
            events = selectors.EVENT_READ | selectors.EVENT_WRITE if waiting else selectors.EVENT_READ
        if events != self._events:
            self._events = events
            loop.set_events(sock, events, self)
        if drained:
            self._wake_senders()
            try:
                self.drained()
            except Exception as exc:
                self._callback_failed("drained", exc)
        if not waiting and protocol.state is _CLOSED and not self._shut_down:
            self._shut_down = True
            try:
                # Half-close, then read until the peer's EOF: closing with unread input would
                # send a RST that can destroy the close frame we just wrote.
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _on_write(self) -> None:
        manager = self._manager
        if self._protocol.parser is None and manager is not None:
            self._run(manager)  # add()ed from another thread: registered for this first EVENT_WRITE
        else:
            self._flush()

    def _finalize(self, reason: str = "") -> None:
        """Close the socket, forget the connection, call closed() once."""
        if self._finalized:
            return
        self._finalized = True
        protocol = self._protocol
        code, reason = protocol.end(reason)
        self._wake_senders()
        self.close_code = code
        self.close_reason = reason
        manager = self._manager
        if manager is not None:
            manager._forget(self)
        self._release()
        with contextlib.suppress(OSError):
            self.sock.close()
        if protocol.parser is not None:  # it was opened
            # A close handshake that ran its course is routine; anything else is worth a line at INFO,
            # but during a stop the manager counts it for one summary line instead.
            failed = protocol.failure is not None or code == CloseCode.ABNORMAL
            summarized = manager is not None and manager._count_end(self, failed, code, reason)
            if failed and not summarized:
                logger.info("%s failed: %d %r", self._describe(), code, reason)
            elif logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s %s: %d %r", self._describe(), "failed" if failed else "closed", code, reason)
            try:
                self.closed(code, reason)
            except Exception as exc:
                logger.error("%s.closed raised for %r", type(self).__name__, self, exc_info=exc)
            if self._redial is not None:  # a reconnecting client: maybe a new connection after a back-off
                self._redial.ended(self)


# The names of WebSocket's internals (methods and slots): a subclass may not define them (__init_subclass__).
_RESERVED_NAMES = frozenset(name for name in vars(WebSocket)
                            if name.startswith("_") and not (name.startswith("__") and name.endswith("__")))


###############################################################################
# Client: connect() ###########################################################
###############################################################################

MAX_REDIRECTS = 10  # 3xx answers followed by one opening handshake, as websockets does
# RFC 7231 6.4 and RFC 7538: the redirections that name the new location in Location.
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


class _ClientTarget(_NamedTuple):
    """Where a ``ws://`` / ``wss://`` URL points, checked (shared by both ways to connect)."""

    secure: bool
    host: str  # for name resolution and TLS's server_hostname
    port: int
    host_header: str  # the Host header: IPv6 literals bracketed, the port only when not the default
    path: str  # origin-form request target: path and query

    @property
    def url(self) -> str:
        return f"{'wss' if self.secure else 'ws'}://{self.host_header}{self.path}"

    def wrap(self, sock: socket.socket, ssl_context: Optional[ssl.SSLContext],
             do_handshake_on_connect: bool = True) -> socket.socket:
        """``sock``, made ready for the opening handshake: no Nagle delay, and TLS for ``wss://``."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self.secure:
            return sock
        context = ssl_context if ssl_context is not None else ssl.create_default_context()
        return context.wrap_socket(sock, server_hostname=self.host, do_handshake_on_connect=do_handshake_on_connect)


def _client_target(url: str) -> _ClientTarget:
    """Parse and check a client URL; raises :class:`InvalidURL`."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # e.g. an unbalanced [ in the host
        raise InvalidURL(f"invalid URL {url!r}: {exc}") from None
    if parts.scheme not in ("ws", "wss"):
        raise InvalidURL(f"not a ws:// or wss:// URL: {url!r}")
    secure = parts.scheme == "wss"
    try:
        port = parts.port or (443 if secure else 80)
    except ValueError:
        raise InvalidURL(f"invalid port in {url!r}") from None
    host = parts.hostname
    if not host:
        raise InvalidURL(f"no host in {url!r}")
    bracketed = _bracket(host)
    host_header = bracketed if port == (443 if secure else 80) else f"{bracketed}:{port}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if _FORBIDDEN_IN_VALUE.search(path) or " " in path:
        raise InvalidURL(f"invalid characters in the path of {url!r}")
    return _ClientTarget(secure, host, port, host_header, path)


def _redirected(target: _ClientTarget, error: HandshakeError, visited: List[str]) -> _ClientTarget:
    """Where a redirect answer sends the opening handshake next; re-raises ``error`` when it is none.

    ``visited`` holds the URLs tried so far, the first included. Raises
    :class:`HandshakeError` for a loop, more than :data:`MAX_REDIRECTS` hops,
    or a ``wss://`` URL sent to ``ws://`` (a downgrade to plain text).
    """
    response = error.response
    location = response.headers.get("Location") if response is not None and isinstance(
        response.headers, Headers) and error.status in _REDIRECT_STATUSES else None
    if not location:
        raise error

    def refuse(message: str) -> HandshakeError:
        return HandshakeError(message, error.status, error.headers, response=response)

    # Joined as http(s) URLs (urljoin knows their rules on every Python), answered as ws(s) ones.
    base = f"{'https' if target.secure else 'http'}://{target.host_header}{target.path}"
    scheme, separator, rest = urllib.parse.urljoin(base, location.strip()).partition("://")
    scheme = {"http": "ws", "https": "wss"}.get(scheme.lower(), scheme.lower())
    url = f"{scheme}://{rest}" if separator else location
    try:
        new_target = _client_target(url)
    except InvalidURL as exc:
        raise refuse(f"redirected to an unusable URL: {exc}") from None
    url = new_target.url
    if target.secure and not new_target.secure:
        raise refuse(f"redirect from {target.url} to {url} refused: wss:// to ws:// drops TLS")
    if url in visited:
        raise refuse(f"redirect loop: {url} again after {len(visited) - 1} redirect(s)")
    if len(visited) > MAX_REDIRECTS:
        raise refuse(f"more than {MAX_REDIRECTS} redirects (the last to {url})")
    visited.append(url)
    return new_target


# Credentials the application gave for the first server, kept from any other (as requests and browsers do).
_CREDENTIAL_HEADERS = frozenset({"authorization", "cookie"})


def _headers_for(first: _ClientTarget, target: _ClientTarget,
                 headers: Optional[Sequence[Tuple[str, str]]]) -> Optional[Sequence[Tuple[str, str]]]:
    """The application's headers for a request to ``target``, after redirects from ``first``."""
    if headers is None or first[:3] == target[:3]:  # same scheme, host and port
        return headers
    return [(name, value) for name, value in headers if name.lower() not in _CREDENTIAL_HEADERS]


# Proxies (HTTP CONNECT) --------------------------------------------------------

# What urllib.request.getproxies() reads for each kind of URL (lowercase first; secure: wss://).
_PROXY_VARIABLES = {True: ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"),
                    False: ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")}


class _Proxy:
    """An HTTP proxy that tunnels with CONNECT (RFC 7231 4.3.6)."""

    # Deliberate: plain slotted classes here and in _ClientOptions, not NamedTuples (0.1 ms each at import).
    __slots__ = ("host", "port", "authorization")

    def __init__(self, host: str, port: int, authorization: Optional[str]):
        self.host = host
        self.port = port
        self.authorization = authorization  # the Proxy-Authorization value, from the proxy URL's user and password


def _client_proxy(target: _ClientTarget, proxy: Union[str, bool, None]) -> Optional[_Proxy]:
    """The proxy to reach ``target`` through: ``proxy`` itself (a URL), or with ``True`` the one the
    environment names (``https_proxy`` for ``wss://``, ``http_proxy`` for ``ws://``, then
    ``all_proxy``; none when ``no_proxy`` covers the host), as urllib reads them. Raises
    :class:`InvalidURL` for a proxy that is not ``http://``."""
    if proxy is None or proxy is False:
        return None
    if proxy is True:
        # Deliberate: where urllib reads the environment only (not macOS, Windows), a look at the few
        # variables that matter (2 us) spares most connections getproxies() (60 us: all of os.environ).
        if sys.platform not in ("darwin", "win32") and not any(
                name in os.environ for name in _PROXY_VARIABLES[target.secure]):
            return None
        from urllib import request  # deliberate: only here, where it is needed (it imports http.client, email)
        proxies = request.getproxies()
        url = proxies.get("https" if target.secure else "http") or proxies.get("all")
        if not url or request.proxy_bypass(f"{_bracket(target.host)}:{target.port}"):
            return None
    else:
        url = proxy
    if "://" not in url:
        url = "http://" + url  # "host:port", as curl and requests read it
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or 80
    except ValueError as exc:
        raise InvalidURL(f"invalid proxy URL {url!r}: {exc}") from None
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise InvalidURL(f"unsupported proxy {url!r}: only http:// proxies (HTTP CONNECT) are supported")
    authorization = None
    if parts.username is not None:
        credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(credentials.encode()).decode("ascii")
    return _Proxy(parts.hostname, port, authorization)


def _read_answer(reader: HeadReader, data: bytes, eof: str, malformed: str) -> Optional[Tuple[Response, bytes, bytes]]:
    """What a client's request got back, sans I/O (a proxy's CONNECT, the opening handshake): feed ``data``
    (``b""`` at the peer's EOF) to ``reader``; ``None`` until the answer's head is complete, then the
    response, its head and the bytes after it. Raises :class:`HandshakeError` (no ``status``) with ``eof``
    at an EOF, or with ``malformed`` and why for a head that does not parse."""
    if not data:
        raise HandshakeError(eof, None)
    try:
        result = reader.feed(data)
    except HandshakeError as exc:
        raise HandshakeError(f"{malformed}: {exc}", None) from None
    if result is None:
        return None
    head, rest = result
    return parse_response(head), head, rest


class _ProxyTunnel:
    """A CONNECT through an HTTP proxy, sans I/O (shared by both ways to connect): its request, then the answer."""

    __slots__ = ("request", "reader")

    def __init__(self, target: _ClientTarget, proxy: _Proxy):
        authority = f"{_bracket(target.host)}:{target.port}"
        fields = [("Host", authority)]
        if proxy.authorization is not None:
            fields.append(("Proxy-Authorization", proxy.authorization))
        self.request = f"CONNECT {authority} HTTP/1.1\r\n{_header_lines(fields)}\r\n".encode("latin-1")
        self.reader = HeadReader()

    def feed(self, data: bytes) -> bool:
        """Feed what the proxy sent; True once the tunnel is open. Raises :class:`HandshakeError`
        (``status``: the proxy's) when it refuses or answers wrongly."""
        answer = _read_answer(self.reader, data, "the proxy closed the connection before answering CONNECT",
                              "malformed answer from the proxy")
        if answer is None:
            return False
        response, _, rest = answer
        if not 200 <= response.status < 300:
            raise HandshakeError(f"the proxy refused CONNECT: {response.status} {response.reason}".rstrip(),
                                 response.status, list(response.headers), response=response)
        if rest:  # the server speaks only after our request: this came from the proxy
            raise HandshakeError("the proxy sent data after its answer to CONNECT", None)
        return True


def _client_socket(target: _ClientTarget, proxy: Union[str, bool, None]) -> Tuple[Optional[_Proxy], Any, socket.socket]:
    """The proxy (or ``None``), the address and a non-blocking socket of the first hop (blocking: its
    name is resolved)."""
    chosen = _client_proxy(target, proxy)
    host, port = (chosen.host, chosen.port) if chosen is not None else (target.host, target.port)
    family, kind, proto, _, address = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return chosen, address, sock


# Reconnecting clients (the policy: _Redial runs it in the manager's loop) -------

# Close codes after which a reconnecting client connects again: gone away (the server restarts),
# no close frame at all (1006), and the server's own trouble (RFC 6455 7.4.1, IANA registry).
_RECONNECT_CODES = frozenset({CloseCode.GOING_AWAY, CloseCode.ABNORMAL, CloseCode.INTERNAL_ERROR,
                              CloseCode.SERVICE_RESTART, CloseCode.TRY_AGAIN_LATER, CloseCode.BAD_GATEWAY})


class Reconnect(_NamedTuple):
    """How a client of :meth:`WebSocketManager.connect` (``reconnect=``) reconnects: exponential back-off.

    The n-th wait in a row (n = 0, 1, ...) is based on
    ``min(max_delay, initial_delay * factor ** n)``: the first (n = 0) is
    drawn uniformly between 0 and ``initial_delay`` (so that clients dropped
    by one event spread out over it), each later one between ``1 - jitter``
    and 1 times its base. A connection that stayed open ``max_delay`` or
    longer sets n back to 0; with ``jitter=0`` every wait is exactly its base.
    """

    # Chosen by simulating a herd whose server comes back after 2 to 4.5 s: every client is back
    # within 8 s of it, at most a fifth of them in any 500 ms (websockets: 5 s, x1.618, 90 s cap).
    initial_delay: float = 3.0
    factor: float = 1.618
    max_delay: float = 60.0
    jitter: float = 0.5

    def delay(self, n: int) -> float:
        """The ``n``-th wait in a row, drawn as the class docstring says."""
        base = min(self.max_delay, self.initial_delay * self.factor ** min(n, 64))
        if not self.jitter:
            return base
        fraction = int.from_bytes(os.urandom(4), "big") / 2 ** 32  # uniform in [0, 1): no random import
        return base * fraction if n == 0 else base * (1 - self.jitter * fraction)


def _reconnect_policy(value: Union[bool, Reconnect, Tuple[float, ...], None]) -> Optional[Reconnect]:
    if value is None or value is False:
        return None
    policy = Reconnect() if value is True else Reconnect(*value)
    initial_delay, factor, max_delay, jitter = policy
    if not (0 < initial_delay <= max_delay and factor >= 1 and 0 <= jitter <= 1):
        raise ValueError(f"invalid {policy!r}: needs 0 < initial_delay <= max_delay, factor >= 1, 0 <= jitter <= 1")
    return policy


# The opening handshake, and connect() --------------------------------------

class _ClientOptions:
    """What :meth:`WebSocketManager.connect` was asked for: the same for each redirect and reconnection."""

    __slots__ = ("ssl_context", "settings", "subprotocols", "headers", "origin", "proxy", "timeout")

    def __init__(self, ssl_context: Optional[ssl.SSLContext], settings: Optional[Deflate],
                 subprotocols: Optional[Sequence[str]], headers: Optional[Sequence[Tuple[str, str]]],
                 origin: Optional[str], proxy: Union[str, bool, None], timeout: float):
        self.ssl_context = ssl_context
        self.settings = settings
        self.subprotocols = subprotocols
        self.headers = headers
        self.origin = origin
        self.proxy = proxy
        self.timeout = timeout


class _ClientOpening:
    """A client's opening handshake, sans I/O (shared by both ways to connect): its request, then the answer."""

    __slots__ = ("key", "subprotocols", "settings", "request", "reader")

    def __init__(self, target: _ClientTarget, settings: Optional[Deflate], subprotocols: Optional[Sequence[str]],
                 headers: Optional[Iterable[Tuple[str, str]]], origin: Optional[str]):
        self.key = new_key()
        self.subprotocols = subprotocols
        self.settings = settings
        if settings is not None:  # the permessage-deflate offer
            headers = [*(headers or ()), ("Sec-WebSocket-Extensions", encode_deflate_offer(settings))]
        self.request = encode_request(target.host_header, target.path, self.key, subprotocols=subprotocols,
                                      headers=headers, origin=origin)
        self.reader = HeadReader()

    def feed(self, data: bytes) -> Optional[Tuple[bytes, bytes, Optional[str], Optional[DeflateParams]]]:
        """Feed what the server sent (``b""`` at its EOF); raises :class:`HandshakeError`.

        Once the response head is complete and checked, returns it, the bytes
        after it, the subprotocol and the permessage-deflate parameters.
        """
        answer = _read_answer(self.reader, data, "connection closed during the handshake", "malformed response")
        if answer is None:
            return None
        response, head, rest = answer
        subprotocol = validate_response(response, self.key, self.subprotocols, self.settings)
        deflate = None
        if self.settings is not None and isinstance(response.headers, Headers):
            deflate = parse_deflate_response(response.headers.get("Sec-WebSocket-Extensions"), self.settings)
        return head, rest, subprotocol, deflate


@overload
def connect(url: str, *, timeout: float = 10.0,
            ssl_context: Optional[ssl.SSLContext] = None, subprotocols: Optional[Sequence[str]] = None,
            headers: Optional[Iterable[Tuple[str, str]]] = None, origin: Optional[str] = None,
            compression: Union[None, str, Deflate] = None, proxy: Union[str, bool, None] = True) -> WebSocket: ...


@overload
def connect(url: str, factory: Callable[..., _WebSocketT], *, timeout: float = 10.0,
            ssl_context: Optional[ssl.SSLContext] = None, subprotocols: Optional[Sequence[str]] = None,
            headers: Optional[Iterable[Tuple[str, str]]] = None, origin: Optional[str] = None,
            compression: Union[None, str, Deflate] = None, proxy: Union[str, bool, None] = True) -> _WebSocketT: ...


def connect(url: str, factory: Callable[..., WebSocket] = WebSocket, *, timeout: float = 10.0,
            ssl_context: Optional[ssl.SSLContext] = None, subprotocols: Optional[Sequence[str]] = None,
            headers: Optional[Iterable[Tuple[str, str]]] = None, origin: Optional[str] = None,
            compression: Union[None, str, Deflate] = None, proxy: Union[str, bool, None] = True) -> WebSocket:
    """Open a client connection to a ``ws://`` or ``wss://`` URL (blocking handshake).

    Returns a client-role connection (its frames are masked), ready for
    :meth:`WebSocketManager.add`. Bytes the server sent right after its 101
    are kept for the first read. ``compression="deflate"`` (or a
    :class:`Deflate`) offers permessage-deflate; an answer the offer does not
    allow fails the handshake. A redirect (301, 302, 303, 307, 308) is
    followed, up to :data:`MAX_REDIRECTS`, never from ``wss://`` to ``ws://``
    (``Authorization`` and ``Cookie`` of ``headers`` go to the first URL's
    scheme, host and port only); ``timeout`` bounds the whole opening,
    redirects included.

    ``proxy``: by default (``True``) the HTTP proxy the environment names
    (``https_proxy`` for ``wss://``, ``http_proxy`` for ``ws://``, then
    ``all_proxy``; ``no_proxy`` exempts hosts), as :mod:`urllib.request`
    reads them; a URL (``http://user:password@host:port``) for that proxy;
    ``None`` for none. The proxy is asked for a tunnel with CONNECT (with
    ``Proxy-Authorization: Basic`` when the URL has a user), and TLS for
    ``wss://`` runs inside it, end to end with the server.

    Raises :class:`HandshakeError` (with the server's, or the proxy's, HTTP
    ``status`` and ``headers``) when the server or the proxy refuses or
    answers wrongly, :class:`InvalidURL` (also a :class:`ValueError`) for a
    bad URL or proxy URL, and :class:`OSError` (``ssl.SSLError``,
    ``TimeoutError`` included) when the network or TLS fails.

    Any thread; it blocks that thread for the handshake (for many clients, or
    from a callback, use :meth:`WebSocketManager.connect`). Example:
    ``manager.add(connect("wss://example.com/chat", Chat, subprotocols=["chat.v1"]))``.
    """
    settings = _deflate_settings(compression)
    target = _client_target(url)
    if headers is not None:
        headers = list(headers)  # sent again after a redirect
    deadline = time.monotonic() + timeout
    visited = [target.url]
    first = target
    while True:
        try:
            return _connect_once(target, factory, deadline, ssl_context, settings, subprotocols,
                                 _headers_for(first, target, headers), origin, _client_proxy(target, proxy))
        except HandshakeError as exc:
            target = _redirected(target, exc, visited)


def _connect_once(target: _ClientTarget, factory: Callable[..., WebSocket], deadline: float,
                  ssl_context: Optional[ssl.SSLContext], settings: Optional[Deflate],
                  subprotocols: Optional[Sequence[str]], headers: Optional[Iterable[Tuple[str, str]]],
                  origin: Optional[str], proxy: Optional[_Proxy]) -> WebSocket:
    """One opening handshake of :func:`connect`, with no redirect followed."""

    def receive(sock: socket.socket) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("timed out waiting for the handshake response")
        sock.settimeout(remaining)
        return sock.recv(READ_SIZE)

    hop = proxy if proxy is not None else target
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise socket.timeout("timed out before the handshake (redirects)")
    try:
        sock = socket.create_connection((hop.host, hop.port), remaining)
    except OSError as exc:
        raise _connect_error(exc, (hop.host, hop.port)) from None
    try:
        if proxy is not None:
            tunnel = _ProxyTunnel(target, proxy)
            sock.sendall(tunnel.request)
            while not tunnel.feed(receive(sock)):
                pass
        sock = target.wrap(sock, ssl_context)
        opening = _ClientOpening(target, settings, subprotocols, headers, origin)
        sock.sendall(opening.request)
        peer = sock.getpeername()  # while the server answers
        peer_address = (sys.intern(peer[0]), *peer[1:])  # one host string for all its connections: 58 B each
        result = None
        while result is None:
            result = opening.feed(receive(sock))
        head, rest, subprotocol, deflate = result
        websocket = factory(sock, client=True, path=target.path, request_headers=opening.request,
                            response_headers=head, subprotocol=subprotocol,
                            peer_address=peer_address, extra_data=rest)
        websocket._enable_deflate(deflate, settings)
    except BaseException:
        sock.close()
        raise
    return websocket


###############################################################################
# WebSocketManager: the selector loop #########################################
###############################################################################

# The selector's handlers ----------------------------------------------------------
#
# Every object registered in the manager's loop (``SelectorKey.data``) is a _Handler: WebSocket,
# _Listener, _ServerHandshake, _ClientHandshake, _RedisConnection, _LoadReader and the _Loop itself (its
# waker). The loop calls _on_read() and _on_write() for readiness events, and _finalize() when one of
# them raised (see _Loop.crashed()). What a handler may call of the loop: the API of _Loop.

class _Handler(Protocol):
    """What the loop calls on an object registered in its selector."""

    @property
    def _finalized(self) -> bool:
        """Over: its events (stale ones in this turn) are ignored (a property here: a handler that stands
        in for another, the load generator's ``_LoadReader``, reads its client's)."""

    def _on_read(self) -> None: ...

    def _on_write(self) -> None: ...

    def _finalize(self, reason: str = "") -> None:
        """End it for good: unregister, close its socket, tell its owner; idempotent."""


class _Flushable(Protocol):
    """What the loop's flush queue takes (:meth:`_Loop.schedule_flush`)."""

    @property
    def manager(self) -> "Optional[WebSocketManager]":
        """The manager it belongs to: the flush is skipped once it is another (or none)."""

    def _flush(self) -> None:
        """Write what is queued, as far as the socket takes it now."""


class _Owner(Protocol):
    """All that listeners, handshakes, reconnecting clients and the WSGI hand-off use of the manager
    that owns them (typed so, mypy holds them to it): its loop and timeouts, and the calls by which
    they hand it a connection or a handshake, or give one up. All else they do goes through :class:`_Loop`."""

    _loop: "_Loop"
    close_timeout: float
    handshake_timeout: float

    def _start_handshake(self, listener: "_Listener", sock: socket.socket, address: Any) -> Any:
        """A listener accepted ``sock``: its server handshake begins."""

    def _dial(self, target: "_ClientTarget", factory: Callable[..., WebSocket], options: "_ClientOptions",
              redial: "Optional[_Redial]") -> "_ClientHandshake":
        """A reconnection's client handshake, made (and its name resolved) in the loop."""

    def _own(self, handshake: "_Handshake", websocket: Optional[WebSocket] = None) -> None:
        """Record a handshake in flight as owned (a client's: its connection too), for the shutdown."""

    def _admit(self, websocket: WebSocket) -> None:
        """A handshake's 101: its connection runs from now on."""

    def _disown(self, handshake: "_Handshake") -> None:
        """A handshake is over (its connection, if any, was admitted or has failed)."""

    def _refused_for_stop(self) -> None:
        """A handshake was refused because the manager stops: counted in the stop's summary line."""

    def _out_of_descriptors(self, exc: BaseException) -> bool:
        """Whether a connect() failed for want of descriptors (logged once per episode)."""

    def _ensure_running(self) -> None:
        """Start the loop unless it runs (the WSGI hand-off, from a host's thread)."""

    def add(self, websocket: WebSocket) -> None:
        """The public :meth:`WebSocketManager.add` (the WSGI hand-off's connections)."""


class _Loop:
    """The selector loop a manager owns: it runs what is registered in it, and nothing else.

    What a plug-in (a connection, a listener, a handshake, the Redis bridge, the load generator)
    may use of it, and all it uses: :meth:`watch`, :meth:`set_events` and :meth:`unwatch` (a
    :class:`_Handler` and its socket's events), :meth:`read_again` (TLS), :meth:`call_soon`,
    :meth:`call_threadsafe` and :meth:`call_later` (a handle for :func:`_cancel`),
    :meth:`schedule_flush` and :meth:`flush` (a :class:`_Flushable`), :meth:`on_stop` and
    :meth:`ignore_stop`, :meth:`in_loop`, and ``now``, ``stopping`` (read only). The owner
    (the manager) decides what runs and when it stops: :meth:`run_once`, :meth:`tell_stop`,
    :meth:`wake`, :meth:`call_from_signal`, :meth:`renew`, :meth:`close`. Loop thread only,
    unless a method says otherwise. The loop is its own waker's handler: other threads write a
    byte to end select().
    """

    _finalized = False  # as the waker's handler (see _Handler)

    def __init__(self, owner: Any, selector: Optional[selectors.BaseSelector] = None):
        self.owner = owner  # a _Flushable whose ``manager`` is no longer the owner is not flushed
        self.owns_selector = selector is None
        self.selector = selector if selector is not None else selectors.DefaultSelector()
        self.timers: List[List[Any]] = []  # heap of [when, sequence, function or None when cancelled, args]
        self.timer_sequence = 0
        self.calls: Deque[Tuple[Callable[..., Any], Tuple[Any, ...]]] = collections.deque()  # from other threads
        self.dirty: Deque[_Flushable] = collections.deque()  # handlers with output to flush
        self.ready: List[_Handler] = []  # TLS connections holding decrypted input
        self.stop_callbacks: Dict[Callable[[], Any], None] = {}  # see on_stop()
        self.now = time.monotonic()  # when this turn's select() returned
        self.thread_id: Optional[int] = None  # the thread that runs it, once it runs
        self.stopping = False  # set by the owner (any thread) as a stop begins: take nothing new in
        self.wake_pending = False
        self._open_waker()

    def _open_waker(self) -> None:
        self.waker_read, self.waker = socket.socketpair()
        self.waker_read.setblocking(False)
        self.waker.setblocking(False)
        self.selector.register(self.waker_read, selectors.EVENT_READ, self)

    # What a handler may call ---------------------------------------------------

    def watch(self, sock: Any, events: int, handler: _Handler) -> None:
        """Register ``sock`` (not watched yet) for ``events``, calling ``handler`` (cheaper than set_events).

        Also from another thread with an epoll selector, whose select() under way reports a socket
        registered ready (``add()`` relies on it)."""
        self.selector.register(sock, events, handler)

    def set_events(self, sock: Any, events: int, handler: _Handler) -> None:
        """Watch ``sock`` for ``events``, calling ``handler``, registering it if it is not yet."""
        try:
            # By descriptor: the KeyError of a socket not yet registered would format the socket's
            # repr, two system calls (getsockname, getpeername) per connection that joins.
            self.selector.modify(sock.fileno(), events, handler)
        except KeyError:
            self.selector.register(sock, events, handler)

    def unwatch(self, sock: Any) -> None:
        """Stop watching ``sock``, if watched at all (also after the loop ended)."""
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)

    def read_again(self, handler: _Handler) -> None:
        """Call ``handler._on_read()`` again, in this turn or the next (TLS holds input no event announces)."""
        self.ready.append(handler)

    def in_loop(self) -> bool:
        """Any thread: whether this is the loop's thread."""
        return self.thread_id == threading.get_ident()

    def call_soon(self, function: Callable[..., Any], *args: Any) -> None:
        """Any thread: call ``function(*args)`` in the loop's next turn."""
        self.calls.append((function, args))
        self.wake()

    def call_threadsafe(self, function: Callable[..., Any], *args: Any) -> None:
        """Any thread: call ``function(*args)`` now in the loop's thread, else in its next turn."""
        if self.thread_id == threading.get_ident():
            function(*args)
        else:
            self.call_soon(function, *args)

    def call_later(self, delay: float, function: Callable[..., Any], *args: Any) -> List[Any]:
        """Call ``function(*args)`` in ``delay`` seconds; returns the handle that :func:`_cancel` takes."""
        self.timer_sequence += 1
        handle = [time.monotonic() + delay, self.timer_sequence, function, args]
        heapq.heappush(self.timers, handle)
        return handle

    def schedule_flush(self, handler: _Flushable) -> None:
        """Any thread: call ``handler._flush()`` in the next turn (the caller queues it once until then)."""
        self.dirty.append(handler)
        if self.thread_id != threading.get_ident():
            self.wake()

    def on_stop(self, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` when the owner's stop begins (once; see :meth:`ignore_stop`)."""
        self.stop_callbacks[callback] = None

    def ignore_stop(self, callback: Callable[[], Any]) -> None:
        """Forget a callback of :meth:`on_stop` (its object ended first)."""
        self.stop_callbacks.pop(callback, None)

    # What the owner calls --------------------------------------------------------

    def tell_stop(self) -> None:
        """A stop begins: call (and forget) every callback of :meth:`on_stop`."""
        callbacks, self.stop_callbacks = self.stop_callbacks, {}
        for callback in callbacks:
            callback()

    def wake(self) -> None:
        """Any thread: end the select() under way (or the next one), once per turn."""
        if self.wake_pending:
            return
        self.wake_pending = True
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed (the loop is gone)
            self.waker.send(b"\0")

    def call_from_signal(self, function: Callable[..., Any], *args: Any) -> None:
        """The loop's thread, maybe in a signal handler: queue ``function(*args)`` and wake select()."""
        self.calls.append((function, args))
        with contextlib.suppress(OSError):
            self.waker.send(b"\0")  # not wake(): its pending flag may be mid-update in this very thread

    def run_once(self) -> None:
        """One turn: select(), then the handlers, the due timers, the queued calls and the flushes."""
        timers = self.timers
        while timers and timers[0][2] is None:
            # Cancelled (a handshake that completed, a close that finished): dropped now, so it
            # neither wakes the loop up later nor stays in memory until its time.
            heapq.heappop(timers)
        if self.calls or self.dirty or self.ready:
            timeout: Optional[float] = 0
        elif timers:
            timeout = max(0.0, timers[0][0] - time.monotonic())
        else:
            timeout = None
        events = self.selector.select(timeout)
        self.now = now = time.monotonic()
        for key, mask in events:
            handler = key.data
            try:
                if mask & selectors.EVENT_READ:
                    handler._on_read()
                if mask & selectors.EVENT_WRITE and not handler._finalized:
                    handler._on_write()
            except Exception as exc:
                self.crashed(handler, exc)
        if self.ready:
            ready = self.ready
            self.ready = []
            for handler in ready:
                try:
                    handler._on_read()
                except Exception as exc:
                    self.crashed(handler, exc)
        while timers and timers[0][0] <= now:
            _, _, function, args = heapq.heappop(timers)
            if function is not None:
                try:
                    function(*args)
                except Exception as exc:
                    self.crashed(getattr(function, "__self__", None), exc)
        calls = self.calls
        for _ in range(len(calls)):
            function, args = calls.popleft()
            try:
                function(*args)
            except Exception as exc:
                self.crashed(getattr(function, "__self__", None), exc)
        self.flush()

    def flush(self) -> None:
        """Flush the handlers queued by :meth:`schedule_flush` (any handler may ask for it between reads)."""
        dirty = self.dirty
        owner = self.owner
        # Bounded work: only the connections queued when the flushing starts, each once
        # (a handler queues itself when its output starts). What other threads queue
        # meanwhile waits for the next turn, after select() has served reads, timers and accepts.
        for _ in range(len(dirty)):
            handler = dirty.popleft()
            if handler.manager is not owner:
                continue  # remove()d since it was queued
            try:
                handler._flush()
            except Exception as exc:
                self.crashed(handler, exc)

    @staticmethod
    def crashed(handler: Any, exc: Exception) -> None:
        """A bug in wsmanager itself: it ends that one handler, never the loop."""
        logger.error("unexpected error in the wsmanager loop (handler %r)", handler, exc_info=exc)
        finalize = getattr(handler, "_finalize", None)
        if finalize is not None:
            try:
                finalize("internal error")
            except Exception:
                logger.exception("could not close %r", handler)

    def renew(self) -> None:
        """In a forked child, before the loop ever ran: a selector and a waker of its own, not the parent's."""
        self.selector.close()  # this process's copies only: the parent's stay open
        self.waker_read.close()
        self.waker.close()
        self.selector = selectors.DefaultSelector()
        self._open_waker()

    def close(self) -> None:
        """The end: drop what is queued, close the waker (and the selector, unless it was given)."""
        self.calls.clear()
        self.timers.clear()
        self.dirty.clear()
        self.unwatch(self.waker_read)
        self.waker_read.close()
        self.waker.close()
        if self.owns_selector:
            self.selector.close()

    # The waker's handler -----------------------------------------------------------

    def _on_read(self) -> None:
        try:
            # wake() writes one byte per wake-up (see wake_pending): one read nearly always drains it,
            # and a read that leaves a byte behind costs one more loop turn, not a lost wake-up.
            while len(self.waker_read.recv(4096)) == 4096:
                pass
        except _would_block():
            pass
        # Cleared after the drain (a byte sent meanwhile must not be swallowed while the
        # flag stays set) and before the queues are read (work queued before a skipped
        # wake-up is still seen in this turn).
        self.wake_pending = False

    def _on_write(self) -> None:
        pass

    def _finalize(self, reason: str = "") -> None:
        """Nothing: the waker lives as long as its loop, which closes it."""


class _Answer(_NamedTuple):
    """What the server's policy decided for one opening request (see :meth:`_Listener.accept`)."""

    response: Response  # a 101 to send, or the refusal (or page) that ends the connection
    why: str = ""  # for the log: why a refusal refuses
    deflate: Optional[DeflateParams] = None  # the permessage-deflate parameters a 101 agreed to
    subprotocol: Optional[str] = None  # the one a 101's Sec-WebSocket-Protocol names


ACCEPT_BATCH = 64  # connections accepted per readiness event of a listener
ACCEPT_BACKOFF = 0.5  # seconds a listener rests after EMFILE/ENFILE


class _Listener:
    """A listening socket (or, for accept(), just the settings) of a manager."""

    __slots__ = ("manager", "sock", "factory", "ssl_context", "subprotocols", "handshake", "max_connections",
                 "origins", "unix_path", "connections", "compression", "_count_lock", "_finalized", "_starved_since")

    def __init__(self, manager: _Owner, sock: Optional[socket.socket], factory: Callable[..., WebSocket],
                 ssl_context: Optional[ssl.SSLContext], subprotocols: Optional[Sequence[str]],
                 handshake: Optional[Callable[[Request], Any]], max_connections: Optional[int],
                 origins: Optional[Sequence[Optional[str]]], unix_path: Optional[str] = None,
                 compression: Optional[Deflate] = None):
        self.manager = manager
        self.sock = sock
        self.factory = factory
        self.ssl_context = ssl_context
        self.subprotocols = list(subprotocols or ())
        self.handshake = handshake
        self.max_connections = max_connections
        self.origins = None if origins is None else frozenset(origins)
        self.unix_path = unix_path
        self.connections = 0
        self.compression = compression
        # wsgi_app() counts from the host server's threads, the loop uncounts: one lock for both.
        self._count_lock = threading.Lock()
        self._finalized = False
        self._starved_since: Optional[float] = None  # when accept() ran out of descriptors, in an episode of it

    def accept(self, request: Request, peer: Any = None) -> Response:
        """The answer to an opening request, with no I/O: a 101, or the refusal to send.

        The one place for the server's rules, shared by :meth:`WebSocketManager.listen`,
        :meth:`~WebSocketManager.accept` and :meth:`~WebSocketManager.wsgi_app`: Origin
        (403), max_connections (503), the handshake hook, RFC 6455 validation, the
        subprotocol choice and permessage-deflate negotiation. A 101's headers are built
        here and nowhere else; the subprotocol is its ``Sec-WebSocket-Protocol`` header.
        ``peer`` is for the log.
        """
        return self._answer(request, peer).response

    def _answer(self, request: Request, peer: Any = None) -> "_Answer":
        """:meth:`accept`, with what the log and the connection to make need to know (an :class:`_Answer`)."""
        try:
            if self.origins is not None and request.origin not in self.origins:
                raise HandshakeError(f"origin {request.origin!r} not allowed", 403)
            if self.full():
                raise HandshakeError("too many connections", 503)
            chosen = None
            if self.handshake is not None:
                try:
                    chosen = self.handshake(request)
                except HandshakeError:
                    raise
                except Exception as exc:
                    logger.error("handshake hook raised for %s", peer, exc_info=exc)
                    raise HandshakeError("handshake hook failed", 500) from None
                if isinstance(chosen, Response):
                    if chosen.status == 101:  # a 101 without the accept key would be a lie
                        logger.error("handshake hook answered 101 itself; return None or a subprotocol")
                        raise HandshakeError("bad handshake hook answer", 500)
                    return _Answer(chosen, "answered by the handshake hook")
            key = validate_request(request)
            offered = request.subprotocols
            if chosen is None:
                subprotocol = next((name for name in self.subprotocols if name in offered), None)
            elif chosen in offered:
                subprotocol = chosen
            else:
                logger.error("handshake hook chose subprotocol %r, which the client did not offer", chosen)
                raise HandshakeError("bad subprotocol", 500)
        except HandshakeError as exc:
            return _Answer(Response(exc.status or 400, exc.headers), str(exc))
        fields = _switch_fields(key, subprotocol)
        deflate = None
        if self.compression is not None:
            extension, deflate = negotiate_deflate(request.headers.get("Sec-WebSocket-Extensions"), self.compression)
            if extension:
                fields.append(("Sec-WebSocket-Extensions", extension))
        return _Answer(Response(101, fields), "", deflate, subprotocol)

    def _make_connection(self, sock: socket.socket, request: Request, head: bytes, answer: "_Answer",
                         peer: Any, extra_data: bytes = b"") -> WebSocket:
        """The connection for a request accepted with ``answer``, its 101 queued first; any thread."""
        websocket = self.factory(sock, client=False, path=request.path, request_headers=head,
                                 subprotocol=answer.subprotocol, peer_address=peer,
                                 extra_data=extra_data)
        websocket._enable_deflate(answer.deflate, self.compression)
        # The 101 goes out first, through the connection's own buffer.
        websocket._queue_reply(_encode_switch(answer.response.headers), self)
        return websocket

    @property
    def loop(self) -> "_Loop":
        """Its manager's loop (a listening socket's: the settings alone need none)."""
        return self.manager._loop

    def full(self) -> bool:
        """Whether max_connections connections are open."""
        return self.max_connections is not None and self.connections >= self.max_connections

    def _claim(self) -> bool:
        """Count one more connection, unless full; any thread."""
        with self._count_lock:
            if self.full():
                return False
            self.connections += 1
            return True

    def _unclaim(self) -> None:
        with self._count_lock:
            self.connections -= 1

    def _on_read(self) -> None:
        if self._finalized:
            return  # closed by a stop earlier in this turn
        listening = cast(socket.socket, self.sock)  # (the settings of accept() have none: never in the selector)
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listening.accept()
            except _would_block():
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the backlog stays readable, so the listener leaves the
                    # selector for ACCEPT_BACKOFF instead of spinning, then tries again. One warning
                    # per episode (until an accept() succeeds), not one per try.
                    if self._starved_since is None:
                        self._starved_since = self.loop.now
                        logger.warning("accept() failed (%s); the listener rests %.1f s at a time until "
                                       "descriptors are free", exc, ACCEPT_BACKOFF)
                    else:
                        logger.debug("accept() failed again (%s); resting %.1f s", exc, ACCEPT_BACKOFF)
                    self.loop.unwatch(listening)
                    self.loop.call_later(ACCEPT_BACKOFF, self._resume)
                    return
                logger.debug("accept() failed: %s", exc)
                continue
            if self._starved_since is not None:
                logger.info("accept() works again after %.1f s out of descriptors", self.loop.now - self._starved_since)
                self._starved_since = None
            self.manager._start_handshake(self, sock, address)

    def _on_write(self) -> None:
        pass

    def _resume(self) -> None:
        """Loop thread: accept (listen(), or again after ACCEPT_BACKOFF) until the manager's stop."""
        if not self._finalized and self.sock is not None:
            self.loop.watch(self.sock, selectors.EVENT_READ, self)
            self.loop.on_stop(self._finalize)

    def _finalize(self, reason: str = "") -> None:
        if self._finalized or self.sock is None:
            return
        self._finalized = True
        self.loop.unwatch(self.sock)  # (its stop callback, if any, finds it finalized)
        self.sock.close()
        if self.unix_path:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)


class _Handshake:
    """What a connection before its 101 has in both roles: a deadline and a TLS handshake."""

    __slots__ = ("manager", "loop", "sock", "address", "timer", "tls_pending", "_finalized")
    _fail: Callable[[BaseException], None]  # each role's own: a failure of the socket or of TLS
    _refuse_for_stop: Callable[[], None]  # each role's own: what a stop does to it (see _Loop.on_stop)
    _finalize: Callable[..., None]  # each role's own: the shutdown's (see _Handler)
    reply: Optional[memoryview] = None  # a server's refusal being written, after which it closes

    def __init__(self, manager: _Owner, sock: socket.socket, address: Any):
        self.manager = manager
        self.loop = manager._loop
        self.sock = sock
        self.address = address
        self.timer: Any = None
        self.tls_pending = _is_tls(sock)
        self._finalized = False

    def _tls_handshake(self) -> bool:
        """One step of the TLS handshake: True once it is done (and the socket is watched for reading)."""
        try:
            waiting = _tls_step(self.sock)
        except (ssl.SSLError, OSError) as exc:  # a certificate that does not verify included
            self._fail(exc)
            return False
        self._set_events(waiting or selectors.EVENT_READ)
        self.tls_pending = bool(waiting)
        return not waiting

    def _set_events(self, events: int) -> None:
        self.loop.set_events(self.sock, events, cast(_Handler, self))

    def _send(self, data: memoryview) -> Optional[memoryview]:
        """Send what the socket takes of ``data`` now: the rest, or ``None`` when the socket failed (see _fail)."""
        try:
            sent = self.sock.send(data) if data else 0
        except _would_block():
            sent = 0
        except OSError as exc:
            self._fail(exc)
            return None
        return data[sent:]

    def _detach(self) -> None:
        self._finalized = True
        _cancel(self.timer)
        self.loop.ignore_stop(self._refuse_for_stop)
        self.manager._disown(self)


class _ServerHandshake(_Handshake):
    """A server connection before its 101: TLS handshake, request head, answer."""

    __slots__ = ("listener", "reader", "reply")

    def __init__(self, manager: _Owner, listener: _Listener, sock: socket.socket, address: Any):
        super().__init__(manager, sock, address)
        self.listener = listener
        self.reader = HeadReader()
        self.reply = None

    def _on_read(self) -> None:
        if self._finalized:
            return
        if self.tls_pending and not self._tls_handshake():
            return
        try:
            data = self.sock.recv(READ_SIZE)
        except _would_block():
            return
        except OSError:
            data = b""
        if not data:
            self._finalize()
            return
        if self.reply is None:  # else refused: the rest of the request is discarded until the peer's EOF
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            result = self.reader.feed(data)
            if result is None:
                if _is_tls(self.sock) and cast("ssl.SSLSocket", self.sock).pending():
                    self.loop.read_again(self)
                return
            head, rest = result
            if self.loop.stopping:
                raise HandshakeError("the server is shutting down", 503)
            request = parse_request(head)
        except HandshakeError as exc:
            self._reply_and_close(Response(exc.status or 400, exc.headers), str(exc))
            return
        listener = self.listener
        answer = listener._answer(request, self.address)
        if answer.response.status != 101:
            self._reply_and_close(answer.response, answer.why, upgrade=request.is_upgrade)
            return
        try:
            websocket = listener._make_connection(self.sock, request, head, answer, self.address, rest)
        except Exception as exc:
            logger.error("could not create the connection for %s", self.address, exc_info=exc)
            self._reply_and_close(Response(500), "the connection factory raised")
            return
        self._detach()
        listener._claim()  # checked by accept() in this same loop turn: it cannot be full here
        self.manager._admit(websocket)

    def _on_write(self) -> None:
        if self._finalized:
            return
        if self.tls_pending:
            if self._tls_handshake():
                self._on_read()
        elif self.reply is not None:
            self._write_reply(self.reply)

    def _fail(self, exc: BaseException) -> None:
        # Only the socket and the TLS handshake fail this way: the rest is answered with HTTP, or ends
        # at the peer's EOF.
        logger.debug("connection from %s failed: %s", self.address, exc)
        self._finalize()

    def _reply_and_close(self, response: Response, reason: str = "", *, upgrade: bool = True) -> None:
        """Answer with plain HTTP, then close once it is written and the peer is done.

        ``reason`` says why, for the log (the peer only sees the status);
        ``upgrade=False`` for a plain HTTP request that a handshake hook answered.
        """
        if self.reply is not None:
            return
        status = response.status
        if status == 503 and self.loop.stopping:
            self.manager._refused_for_stop()  # in the stop's summary line
        elif status >= 400 and upgrade:
            logger.info("refused handshake from %s: %d %s", self.address, status,
                        reason or response.reason or _REASON_PHRASES.get(status, ""))
        else:
            logger.debug("answered %s with HTTP %d", self.address, status)
        try:
            reply = encode_response(response)
        except ValueError as exc:
            logger.error("invalid handshake response: %s", exc)
            reply = encode_response(Response(500))
        self._write_reply(memoryview(reply))

    def _write_reply(self, reply: memoryview) -> None:
        rest = self._send(reply)
        if rest is None:
            return
        self.reply = rest
        if rest:
            self._set_events(selectors.EVENT_READ | selectors.EVENT_WRITE)
            return
        self._set_events(selectors.EVENT_READ)
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._finalize()
            return
        # Bounded wait for the peer's EOF, so our reply is not destroyed by a RST.
        _cancel(self.timer)
        self.timer = self.loop.call_later(self.manager.close_timeout, self._finalize)

    def _refuse_for_stop(self) -> None:
        """The manager is stopping: refuse with 503 now (a TLS handshake still going is just closed)."""
        if self._finalized or self.reply is not None:
            return
        if self.tls_pending:
            self._finalize()
        else:
            self._reply_and_close(Response(503))

    def _time_out(self) -> None:
        logger.info("handshake from %s timed out after %.1f s", self.address, self.manager.handshake_timeout)
        self._finalize()

    def _finalize(self, reason: str = "") -> None:
        if self._finalized:
            return
        self._detach()
        self.loop.unwatch(self.sock)
        self.sock.close()


def _ended_by(websocket: WebSocket) -> str:
    """Why a connection finalized before its opening handshake completed, for connect_failed()."""
    reason = websocket.close_reason
    return "terminated by the application" if reason == "terminated" else reason or "closed"


class _ClientHandshake(_Handshake):
    """A client connection before the server's 101: what :meth:`WebSocketManager.connect` runs in the loop.

    In order: the TCP connect (to the proxy, if any), the proxy's CONNECT tunnel, TLS for ``wss://``,
    the opening handshake; a redirect starts over with a new socket, within the same deadline.
    """

    __slots__ = ("websocket", "opening", "request", "connected", "target", "options", "tunnel", "visited", "redial")

    def __init__(self, manager: _Owner, websocket: WebSocket, address: Any, target: _ClientTarget,
                 proxy: Optional[_Proxy], opening: "_ClientOpening", options: _ClientOptions,
                 redial: Optional[_Redial] = None):
        super().__init__(manager, websocket.sock, address)
        self.websocket = websocket
        self.options = options
        self.redial = redial
        self.visited = [target.url]
        self._route(target, proxy, opening)

    def _route(self, target: _ClientTarget, proxy: Optional[_Proxy], opening: "_ClientOpening") -> None:
        self.target = target
        self.opening = opening
        self.tunnel = _ProxyTunnel(target, proxy) if proxy is not None else None
        self.request = memoryview(self.tunnel.request if self.tunnel is not None else b"")
        self.connected = False

    def _begin(self) -> None:
        """Loop thread: start the TCP connect (the socket is non-blocking)."""
        if self.websocket.terminated:
            self._abandon(_ended_by(self.websocket))  # before the loop got to it
            return
        if self.loop.stopping:
            self._fail(ManagerStopped("the manager is stopping"))
            return
        self.manager._own(self)  # (again for connect()'s, which it recorded at once: a set)
        self.loop.on_stop(self._refuse_for_stop)
        self.timer = self.loop.call_later(self.options.timeout, self._time_out)
        self._connect()

    def _connect(self) -> None:
        try:
            error = self.sock.connect_ex(self.address)
        except OSError as exc:
            self._fail(exc)
            return
        if error not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
            self._fail(_connect_error(OSError(error, os.strerror(error)), self.address))
            return
        self.loop.watch(self.sock, selectors.EVENT_WRITE, self)

    def _on_write(self) -> None:
        if self._finalized:
            return
        if not self.connected:
            error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self._fail(_connect_error(OSError(error, os.strerror(error)), self.address))
                return
            self.connected = True
            if self.tunnel is None:
                self._secure()
                return
        if self.tls_pending and not self._tls_handshake():
            return
        self._write_request()

    def _secure(self) -> None:
        """Connected (through the tunnel, if any): start TLS for ``wss://``, then send the opening request."""
        self.request = memoryview(self.opening.request)
        if not self.target.secure:
            self._write_request()
            return
        self.loop.unwatch(self.sock)
        try:
            # Wrapped only now, on the connected socket: inside the proxy's tunnel, TLS is with the server.
            self.sock = self.target.wrap(self.sock, self.options.ssl_context, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            self._fail(exc)
            return
        self.websocket._take_socket(self.sock)
        if self._tls_handshake():  # which watches the new socket
            self._write_request()

    def _on_read(self) -> None:
        if self._finalized:
            return
        if self.tls_pending:
            if self._tls_handshake():
                self._write_request()
            return
        if self.request or not self.connected:
            return  # a hang-up before the request is out: the write handler sees the error
        try:
            data = self.sock.recv(READ_SIZE)
            if self.tunnel is not None:
                if self.tunnel.feed(data):
                    self.tunnel = None
                    self._secure()
                return
            result = self.opening.feed(data)
        except _would_block():
            return
        except HandshakeError as exc:
            self._redirect(exc)  # or fails with it, when it is no redirect
            return
        except OSError as exc:
            self._fail(exc)
            return
        if result is not None:
            self._open(*result)
        elif _is_tls(self.sock) and cast("ssl.SSLSocket", self.sock).pending():
            self.loop.read_again(self)

    def _redirect(self, answer: HandshakeError) -> None:
        """Follow a redirect (fail with ``answer`` when it is none): a new socket (and route) to the new URL,
        the same connection and deadline."""
        options = self.options
        try:
            target = _redirected(self.target, answer, self.visited)
            first = _client_target(self.visited[0])
            opening = _ClientOpening(target, options.settings, options.subprotocols,
                                     _headers_for(first, target, options.headers), options.origin)
            # Another host is resolved here, in the loop (blocking): the caller resolved only the first.
            proxy, address, sock = _client_socket(target, options.proxy)
        except (HandshakeError, OSError, ValueError) as exc:
            self._fail(exc)
            return
        logger.debug("%s redirected (%s) to %s", self.websocket._describe(), answer.status, target.url)
        self.loop.unwatch(self.sock)
        self.sock.close()
        self.sock = sock
        self.address = address
        self.websocket._take_socket(sock, address, target.path, opening.request)
        self._route(target, proxy, opening)
        self._connect()

    def _write_request(self) -> None:
        rest = self._send(self.request)
        if rest is not None:
            self.request = rest
            self._set_events(selectors.EVENT_WRITE if rest else selectors.EVENT_READ)

    def _open(self, head: bytes, rest: bytes, subprotocol: Optional[str],
              deflate: Optional[DeflateParams]) -> None:
        websocket = self.websocket
        self._detach()
        if websocket.terminated:
            return  # terminate()d meanwhile
        websocket._take_response(head, rest, subprotocol, deflate, self.opening.settings)  # before opened()
        if self.redial is not None:
            self.redial.opened()
        self.manager._admit(websocket)  # the connection takes the selector registration over

    def _time_out(self) -> None:
        self._fail(socket.timeout(f"no WebSocket handshake with {self.target.url} within {self.options.timeout:g} s"))

    def _refuse_for_stop(self) -> None:
        self._fail(ManagerStopped("the manager stopped before the connection opened"))

    def _fail(self, exc: BaseException) -> None:
        if self._finalized:
            return
        self._detach()
        self.loop.unwatch(self.sock)
        self._report(exc)

    def _abandon(self, reason: str) -> None:
        """The connection was closed or terminated before the 101 (``reason`` says how): the handshake
        ends now, its timer with it, and connect_failed() says why instead of a timeout later."""
        if self._finalized:
            return
        self._detach()
        if self.websocket.terminated:
            # Inside the connection's _finalize(), which closes the socket only after this (or
            # before _begin(), when it is closed already): connect_failed() is promised a closed one.
            self.sock.close()
        else:
            self.loop.unwatch(self.sock)
        self._report(ConnectionClosed(f"{reason} before the opening handshake with {self.address!r} completed",
                                      CloseCode.ABNORMAL, reason))

    def _report(self, exc: BaseException) -> None:
        websocket = self.websocket
        if isinstance(exc, ManagerStopped):
            self.manager._refused_for_stop()  # in the stop's summary line
        elif not self.manager._out_of_descriptors(exc):  # which logs once per episode, not per connection
            logger.info("could not connect %s: %s", websocket._describe(), exc)
        websocket._finalize(f"could not connect: {exc}")  # closes the socket; closed() is not called
        try:
            websocket.connect_failed(exc)
        except Exception as error:
            logger.error("%s.connect_failed raised for %r", type(websocket).__name__, websocket, exc_info=error)
        if self.redial is not None:
            self.redial.failed(websocket, exc)

    def _finalize(self, reason: str = "") -> None:
        # The manager's shutdown, or an internal error (_Loop.crashed).
        if self.loop.stopping:
            self._refuse_for_stop()
        else:
            self._fail(WebSocketError(reason or "internal error"))


class _Redial:
    """A reconnecting client of :meth:`WebSocketManager.connect`: each of its connections (a fresh
    instance from the factory) that ends abnormally, or cannot be opened for a reason that may pass,
    is followed by a new attempt after a back-off. Loop thread only."""

    __slots__ = ("manager", "loop", "target", "factory", "options", "policy", "waits", "opens", "opened_at")

    def __init__(self, manager: _Owner, target: _ClientTarget, factory: Callable[..., WebSocket],
                 options: _ClientOptions, policy: Reconnect):
        self.manager = manager
        self.loop = manager._loop
        self.target = target
        self.factory = factory
        self.options = options
        self.policy = policy
        self.waits = 0  # waits in a row: the back-off's n
        self.opens = 0  # connections of this client that opened
        self.opened_at = 0.0

    def opened(self) -> None:
        self.opens += 1
        self.opened_at = time.monotonic()

    def ended(self, websocket: WebSocket) -> None:
        """An open connection ended (after its closed())."""
        if websocket.close_code not in _RECONNECT_CODES or not self._wanted(websocket):
            return
        if time.monotonic() - self.opened_at >= self.policy.max_delay:
            self.waits = 0  # it was stable: start the back-off again
        self._wait(websocket, f"closed with {websocket.close_code}")

    def failed(self, websocket: WebSocket, exc: BaseException) -> None:
        """An attempt could not open (after its connect_failed())."""
        if isinstance(exc, HandshakeError):
            transient = exc.status is None or exc.status >= 500  # no answer, or the server's trouble: 4xx is final
        else:  # the network, a timeout; a certificate that does not verify will not verify later either
            transient = isinstance(exc, OSError) and not isinstance(exc, ssl.SSLCertVerificationError)
        if transient and self._wanted(websocket):
            self._wait(websocket, "could not connect")

    def _wanted(self, websocket: WebSocket) -> bool:
        return websocket.reconnect is not None and websocket.manager is self.manager and not self.loop.stopping

    def _wait(self, last: WebSocket, why: str) -> None:
        """Attempt again after the back-off; ``last``, the connection that ended last: its close() ends the wait."""
        delay = self.policy.delay(self.waits)
        self.waits += 1
        logger.info("%s %s: reconnecting in %.2f s", last._describe(), why, delay)
        self.loop.call_later(delay, self._attempt, last)

    def _attempt(self, last: WebSocket) -> None:
        manager = self.manager
        if self.loop.stopping or last.reconnect is None:
            return  # stopping, or the application closed (or gave up) the connection it last had
        try:
            # The name is resolved again, here in the loop: a host that moved is found where it went.
            handshake = manager._dial(self.target, self.factory, self.options, self)
        except OSError as exc:  # the name does not resolve (now), out of descriptors
            self._wait(last, f"could not connect to {self.target.url} ({exc})")
            return
        except Exception as exc:
            logger.error("reconnecting to %s failed; giving up", self.target.url, exc_info=exc)
            return
        manager._own(handshake, handshake.websocket)  # its connection belongs to the manager from now on
        handshake._begin()


# The manager's life beyond its loop: modules, Ctrl-C, interpreter exit -----------------

def _import_loop_modules() -> None:
    """Import, as a manager is made, the lazily imported modules its work may need.

    Once the process is out of descriptors (EMFILE), no module can be imported: each is a
    file to open. A loop that first needed ``logging`` (any log line), ``hashlib`` and
    ``base64`` (a server handshake) or ``zlib`` (compression) then would fail and die, and
    a first :meth:`WebSocketManager.connect` that needed ``urllib.parse`` (the URL) or the
    ``idna`` codec (``getaddrinfo`` encodes a host name with it) would raise in the caller.
    ``ssl`` is not among them: a TLS socket exists only once ``ssl`` is imported.
    """
    base64.b64encode(hashlib.sha1(b"").digest())
    zlib.crc32(b"")
    urllib.parse.urlsplit("ws://localhost/")
    "localhost".encode("idna")
    logger.isEnabledFor(logging.DEBUG)  # makes the "wsmanager" logger


def _descriptors_exhausted(exc: OSError) -> Optional[OSError]:
    """The EMFILE (ENFILE, ENOBUFS) error behind ``exc`` if the process is out of descriptors, else None."""
    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS):
        return exc
    try:
        socket.socket().close()
    except OSError as probe:
        if probe.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS):
            return probe
    return None


def _on_sigint(callback: Callable[[], Any]) -> Optional[Callable[[], None]]:
    """Ctrl-C calls ``callback()`` instead of raising KeyboardInterrupt: only in the main thread, and
    only while SIGINT has Python's default handler (a program's own handler is left alone).
    Returns what puts the default handler back (``None`` when nothing was changed)."""
    try:
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return None

        def handler(signum: int, frame: Any) -> None:
            callback()

        signal.signal(signal.SIGINT, handler)
    except (ValueError, OSError):  # not the main thread of the main interpreter, or no signals here
        return None

    def restore() -> None:
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signal.SIGINT) is handler:
                signal.signal(signal.SIGINT, signal.default_int_handler)
    return restore


@contextlib.contextmanager
def _ctrl_c_stops_at_once(managers: Sequence["WebSocketManager"]) -> Iterator[None]:
    """While the block waits for graceful stops: Ctrl-C (in the main thread) makes them immediate,
    as a second Ctrl-C does, instead of raising KeyboardInterrupt in the middle of the wait."""
    def stop_now() -> None:
        for manager in managers:
            manager._stop_now()

    restore = _on_sigint(stop_now)
    try:
        yield
    finally:
        if restore is not None:
            restore()


# Managers running in a thread of their own (start()), for the exit hook: a strong reference
# is no leak, their thread holds one until the loop ends, when run() takes it out.
_started: Set["WebSocketManager"] = set()
_started_lock = threading.Lock()
_exit_hook: List[bool] = []  # [True] once registered: one hook for all managers


def _stop_at_exit(manager: "WebSocketManager") -> None:
    """Have ``manager`` stopped gracefully if the interpreter exits while its loop still runs."""
    with _started_lock:
        _started.add(manager)
        if _exit_hook:
            return
        _exit_hook.append(True)
    # Deliberate: threading's exit hooks (what concurrent.futures uses, CPython 3.9+) run as the
    # main thread ends, before non-daemon threads are waited for and before atexit: a thread
    # blocked on a connection is set free by its close, and logging still works. atexit (also
    # before daemon threads are frozen) where it is missing.
    try:
        threading._register_atexit(_stop_started_managers)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # missing, or the interpreter is exiting already
        import atexit
        atexit.register(_stop_started_managers)


def _stop_started_managers() -> None:
    """The exit hook: every manager still running in this process is stopped as by ``stop()``:
    1001 to every peer, whose answers are waited for up to its ``close_timeout``."""
    pid = os.getpid()
    with _started_lock:
        managers = [manager for manager in _started if manager._pid == pid and manager.running]
    if not managers:
        return
    with _ctrl_c_stops_at_once(managers):
        for manager in managers:
            with contextlib.suppress(Exception):
                manager.stop()
        # Bounded: a loop stuck in a callback must not hold the exit forever.
        deadline = time.monotonic() + max(manager.close_timeout for manager in managers) + 1.0
        for manager in managers:
            manager.join(max(0.0, deadline - time.monotonic()))


MAX_TOPIC_LENGTH = 1024  # characters in a topic: subscribe() and publish() refuse a longer one (ValueError)


class _Topics:
    """A manager's topics: which of its connections subscribe to what, and the bridge relaying them.

    The manager's topic methods delegate here, from any thread: one lock guards
    topic -> subscribers and the way back. A :class:`RedisBridge` attaches and
    detaches itself, hands what other processes publish to :meth:`deliver`, and
    hears of each topic that gets its first subscriber or loses its last.
    """

    def __init__(self, manager: "WebSocketManager"):
        self._manager = manager
        # topic -> its local subscribers (a dict: ordered and O(1) to leave), and the way back.
        self._subscribers: Dict[str, Dict[WebSocket, None]] = {}
        self._memberships: Dict[WebSocket, Set[str]] = {}
        self._lock = threading.Lock()
        self.bridge: Optional[RedisBridge] = None  # set by attach() and detach() only

    @staticmethod
    def _refuse(topic: object) -> NoReturn:
        """What a topic that fails the one test of :meth:`subscribe` and :meth:`publish` gets."""
        if type(topic) is not str:
            raise TypeError(f"a topic is a str, not {type(topic).__name__}")
        raise ValueError(f"a topic of {len(topic)} characters (at most {MAX_TOPIC_LENGTH})")

    def subscribe(self, websocket: WebSocket, topic: str) -> None:
        if type(topic) is not str or len(topic) > MAX_TOPIC_LENGTH:
            self._refuse(topic)
        if websocket.manager not in (self._manager, None):
            raise ValueError("the connection belongs to another manager")
        with self._lock:
            # The manager's _forget() drops the connection from its websockets before it calls leave():
            # either we see it gone, or leave() sees the subscription and takes it out again.
            if self._manager.websockets.get(websocket.fileno()) is not websocket:
                raise ConnectionClosed("cannot subscribe: the connection is not running in this manager")
            first = topic not in self._subscribers
            self._subscribers.setdefault(topic, {})[websocket] = None
            self._memberships.setdefault(websocket, set()).add(topic)
        bridge = self.bridge
        if first and bridge is not None:
            bridge._topic_changed(topic)

    def leave(self, websocket: WebSocket, topics: Optional[Iterable[str]] = None) -> None:
        """Take ``websocket`` out of ``topics`` (None: all of its own, as it goes)."""
        emptied = []
        with self._lock:
            own = self._memberships.get(websocket, set())
            for topic in tuple(own) if topics is None else own.intersection(topics):
                own.remove(topic)  # and the way there holds it too: both change under the lock
                members = self._subscribers[topic]
                del members[websocket]
                if not members:
                    del self._subscribers[topic]
                    emptied.append(topic)
            if not own:
                self._memberships.pop(websocket, None)
        bridge = self.bridge
        if bridge is not None:
            for topic in emptied:
                bridge._topic_changed(topic)

    def subscribers(self, topic: str) -> int:
        return len(self._subscribers.get(topic, ()))

    def topics(self, websocket: Optional[WebSocket] = None) -> List[str]:
        with self._lock:
            return list(self._subscribers if websocket is None else self._memberships.get(websocket, ()))

    def publish(self, topic: str, message: Union[str, bytes, bytearray, memoryview]) -> int:
        if type(topic) is not str or len(topic) > MAX_TOPIC_LENGTH:  # deliberate: one test inline, on the hot path
            self._refuse(topic)
        opcode, payload = _data_frame(message)
        bridge = self.bridge
        if bridge is not None:
            # Relayed first, under no lock of ours: the order in Redis is the order of publish()
            # calls of one thread, which is all "in publish order per publisher" promises.
            bridge._relay(topic, opcode, payload if type(payload) is bytes else bytes(payload))
        return self.deliver(topic, opcode, payload)

    def deliver(self, topic: str, opcode: int, payload: _BytesLike) -> int:
        """Local half of :meth:`publish` (and the arrival of a message from the bridge)."""
        with self._lock:
            subscribers = tuple(self._subscribers.get(topic, ()))
        return _queue_to_all(subscribers, opcode, payload) if subscribers else 0

    def attach(self, bridge: RedisBridge) -> None:
        with self._lock:
            if self.bridge is not None:
                raise RuntimeError("this manager is bridged already")
            self.bridge = bridge

    def detach(self, bridge: RedisBridge) -> None:
        """publish() is local only from now on (unless another bridge is attached since)."""
        with self._lock:
            if self.bridge is bridge:
                self.bridge = None


# listen() returns the kind of address it was given: (host, port) for (host, port), a path for a path.
_Address = TypeVar("_Address", Tuple[str, int], str)
_WebSocketT = TypeVar("_WebSocketT", bound=WebSocket)  # the factory's class, for connect()


class _Life(enum.IntEnum):
    """A manager's life, in order (the loop's thread and the start() thread are data, not states)."""

    IDLE = 0  # made; nothing runs yet
    RUNNING = 1  # run() turns the loop
    STOPPING = 2  # stop(): nothing new is taken in; the loop ends once every connection closed, or at the deadline
    INTERRUPTED = 3  # stopping after a Ctrl-C in run(): a second one ends the loop at once
    ENDING = 4  # stop(0), a second Ctrl-C, or a stop that is over: the loop ends after this turn
    CLOSED = 5  # the shutdown: everything closed; nothing is added, nothing runs again


# The manager's transition table: (life, event) -> next life, the only way WebSocketManager._life changes
# (WebSocketManager._become). An event missing for a state is ignored (a stop() while stopping: the
# second stop() only shortens the deadline). A stop() before run() is kept: run() then only ends it.
_LIFE = {
    (_Life.IDLE, "run"): _Life.RUNNING,
    (_Life.IDLE, "stop"): _Life.STOPPING,
    (_Life.RUNNING, "stop"): _Life.STOPPING,
    (_Life.RUNNING, "interrupt"): _Life.INTERRUPTED,  # Ctrl-C in run()
    (_Life.STOPPING, "interrupt"): _Life.INTERRUPTED,
    (_Life.INTERRUPTED, "interrupt"): _Life.ENDING,  # the second Ctrl-C
    (_Life.STOPPING, "over"): _Life.ENDING,  # every connection closed, or the stop's deadline passed
    (_Life.INTERRUPTED, "over"): _Life.ENDING,
    **{(life, "stop_now"): _Life.ENDING for life in (_Life.IDLE, _Life.RUNNING, _Life.STOPPING, _Life.INTERRUPTED)},
    **{(life, "shutdown"): _Life.CLOSED for life in _Life},  # run() ends (or raised): see _shutdown()
}


class WebSocketManager:
    """Runs many WebSocket connections, of either role, in one thread.

    ``add()`` connections made by :func:`connect` (or :meth:`connect` them
    without blocking), ``listen()`` for servers,
    then ``start()`` a background thread or ``run()`` in this one. As a
    context manager it starts on enter and, on exit, closes every
    connection (1001), waits up to ``close_timeout`` for them, stops and
    joins.

    Limits, each per connection: ``max_message_size`` (default 1 MiB) and
    ``max_frame_size`` (default: ``max_message_size``) on input,
    ``max_buffered`` (default 4 MiB), a high-water mark on unsent output (see
    :meth:`WebSocket.send` for who waits, who raises, who is dropped), ``close_timeout`` (5 s)
    for the close handshake, ``handshake_timeout`` (10 s) for a server
    handshake. ``heartbeat=N`` pings connections idle for N seconds and fails
    them with 1011 when nothing comes back within ``heartbeat_timeout``
    (default N).

    ``compression="deflate"`` (or a :class:`Deflate`) accepts
    permessage-deflate offers on every ``listen()`` and ``accept()`` that does
    not say otherwise; the default ``None`` declines them.
    """

    def __init__(self, *, selector: Optional[selectors.BaseSelector] = None, heartbeat: Optional[float] = None,
                 heartbeat_timeout: Optional[float] = None, close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT, max_buffered: int = DEFAULT_MAX_BUFFERED,
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE, max_frame_size: Optional[int] = None,
                 compression: Union[None, str, Deflate] = None):
        for name, value in (("close_timeout", close_timeout), ("max_buffered", max_buffered),
                            ("max_message_size", max_message_size), ("max_frame_size", max_frame_size)):
            if _check_setting(name, value) is None and name != "max_frame_size":
                raise TypeError(f"{name} must not be None")
        self.compression = _deflate_settings(compression)  # checked, like the settings, before a selector is made
        self._loop = _Loop(self, selector)  # what everything registered in the loop uses of it
        self.heartbeat = heartbeat
        self.heartbeat_timeout = heartbeat_timeout if heartbeat_timeout is not None else heartbeat
        self.close_timeout = close_timeout
        self.handshake_timeout = handshake_timeout
        self.max_buffered = max_buffered
        self.max_message_size = max_message_size
        self.max_frame_size = max_frame_size if max_frame_size is not None else max_message_size
        # Without an explicit max_frame_size, a connection's follows its own max_message_size.
        self._frame_size_follows = max_frame_size is None
        self._websockets: Dict[int, WebSocket] = {}
        self.websockets = types.MappingProxyType(self._websockets)
        self._topics = _Topics(self)
        # What the manager owns besides its connections: handshakes (a connect()'s from the call on,
        # before its loop turn begins it), listeners, and the sockets of accept() not yet adopted.
        self._handshakes: Set[_Handshake] = set()
        self._listeners: List[_Listener] = []
        self._adopting: Set[socket.socket] = set()
        self._life = _Life.IDLE  # changed by _become() only
        self._stop_deadline: Optional[float] = None  # of the graceful stop under way
        self._thread: Optional[threading.Thread] = None  # start()'s
        self._lock = threading.Lock()
        self._stop_outcomes: "collections.Counter[str]" = collections.Counter()  # how connections ended in a stop
        self._closing_all: Set[WebSocket] = set()  # closed by close_all() and not ended yet: their ends are summarized
        self._pid = os.getpid()  # a manager made before a fork (gunicorn --preload) is renewed: _ensure_running
        # A closed socket, made while descriptors are at hand: the socket of a connect() whose own
        # socket cannot be made (EMFILE), so that the connection exists to report its failure.
        self._no_socket = socket.socket()
        self._no_socket.close()
        self._connect_starved = False  # in an episode of connect() failing with EMFILE: see _out_of_descriptors
        _import_loop_modules()  # while descriptors are at hand, not when the loop first needs them

    # Connections ---------------------------------------------------------------

    def add(self, websocket: WebSocket) -> None:
        """Run ``websocket`` in this manager: registered, then ``opened()`` in the loop.

        Adding a connection this manager already runs does nothing. A
        connection taken out of a manager (this one or another) by
        :meth:`remove` goes on where it stopped: same state, parser, queued output and
        settings, and ``opened()`` is not called again (it runs once per
        connection). Raises :class:`ValueError` while another manager runs
        it, :class:`ConnectionClosed` once it is closed, :class:`ManagerStopped`
        once this manager is stopping. Any thread; ``opened()`` runs in the loop's.
        """
        with self._lock:  # either _shutdown() sees this connection, or we see it finished
            if websocket.terminated:
                raise websocket._closed_error("cannot add")
            manager = websocket.manager
            if manager is self:
                return
            if manager is not None:
                raise ValueError("the connection belongs to another manager")
            self._check_running(stopping=True)
            self._take(websocket)
            loop = self._loop
            if (websocket.state is State.CONNECTING and not loop.in_loop()
                    and isinstance(loop.selector, getattr(selectors, "EpollSelector", ()))):
                # Deliberate: a new connection's socket is writable at once, and epoll wakes a select()
                # under way for a socket registered ready: its first EVENT_WRITE runs it (_on_write),
                # with no byte through the waker (a write, a read and a loop turn of its own).
                with contextlib.suppress(KeyError, ValueError, OSError):  # else (closed, reused fd): as below
                    loop.watch(websocket.sock, selectors.EVENT_WRITE, websocket)
                    return
        self._loop.call_threadsafe(self._open, websocket)

    @overload
    def connect(self, url: str, *, ssl_context: Optional[ssl.SSLContext] = None,
                subprotocols: Optional[Sequence[str]] = None, headers: Optional[Iterable[Tuple[str, str]]] = None,
                origin: Optional[str] = None, compression: Union[None, str, Deflate] = None,
                timeout: Optional[float] = None, proxy: Union[str, bool, None] = True,
                reconnect: Union[bool, Reconnect, Tuple[float, ...]] = False) -> WebSocket: ...

    @overload
    def connect(self, url: str, factory: Callable[..., _WebSocketT], *, ssl_context: Optional[ssl.SSLContext] = None,
                subprotocols: Optional[Sequence[str]] = None, headers: Optional[Iterable[Tuple[str, str]]] = None,
                origin: Optional[str] = None, compression: Union[None, str, Deflate] = None,
                timeout: Optional[float] = None, proxy: Union[str, bool, None] = True,
                reconnect: Union[bool, Reconnect, Tuple[float, ...]] = False) -> _WebSocketT: ...

    def connect(self, url: str, factory: Callable[..., WebSocket] = WebSocket, *,
                ssl_context: Optional[ssl.SSLContext] = None, subprotocols: Optional[Sequence[str]] = None,
                headers: Optional[Iterable[Tuple[str, str]]] = None, origin: Optional[str] = None,
                compression: Union[None, str, Deflate] = None, timeout: Optional[float] = None,
                proxy: Union[str, bool, None] = True,
                reconnect: Union[bool, Reconnect, Tuple[float, ...]] = False) -> WebSocket:
        """Open a client connection without blocking: the connection is returned at once.

        The TCP connect, the proxy's tunnel, the TLS handshake and the opening
        handshake (redirects included) run in the loop, within ``timeout``
        (default: the manager's ``handshake_timeout``); then the connection
        opens here as if :meth:`add`-ed (``opened()``, with ``subprotocol``,
        ``response_headers`` and ``compression`` set). If any step fails, the
        socket is closed and ``connect_failed(exc)`` is called in the loop
        instead of ``opened()`` and ``closed()``: ``exc`` is a
        :class:`HandshakeError`, an :class:`OSError` (``ssl.SSLError`` and
        ``TimeoutError`` included), :class:`ManagerStopped`, or
        :class:`ConnectionClosed` at once when the connection's ``close()`` or
        ``terminate()`` ends the handshake. Messages sent meanwhile are
        queued, within ``max_buffered`` as :meth:`WebSocket.send` says, and
        go out once it opens.

        ``reconnect=True`` (or a :class:`Reconnect` with other delays) keeps
        the client connected: when a connection ends with 1001 from the
        server, 1006 (no close frame), 1011, 1012, 1013 or 1014, or an attempt
        fails on the network, a timeout or a 5xx answer, a new connection (a
        fresh instance from ``factory``, its ``reconnects`` counting those
        that opened before it) is attempted after the back-off, until one
        opens; ``opened()`` runs for each. It stops at a normal close (1000,
        any :meth:`WebSocket.close` or :meth:`WebSocket.terminate` of ours), a
        4xx answer, ``ws.reconnect = None``, or when the manager stops.

        Same options as :func:`connect` (``proxy`` included). Only the host name
        (the proxy's, with a proxy) is resolved here, in the caller (an IP
        address costs nothing); a redirect to another host and each reconnection
        resolve in the loop. Raises :class:`InvalidURL` for a bad URL or proxy
        URL, :class:`OSError` when the name does not resolve and
        :class:`ManagerStopped` once the manager is stopping. Any thread may call it.
        """
        target = _client_target(url)
        policy = _reconnect_policy(reconnect)
        if target.secure and ssl_context is None:
            ssl_context = ssl.create_default_context()  # made here once, not in the loop for each attempt
        options = _ClientOptions(ssl_context, _deflate_settings(compression), subprotocols,
                                 list(headers) if headers is not None else None, origin, proxy,
                                 self.handshake_timeout if timeout is None else timeout)
        redial = _Redial(self, target, factory, options, policy) if policy is not None else None
        failure: Optional[OSError] = None
        try:
            handshake = self._dial(target, factory, options, redial)
        except OSError as exc:
            # Out of descriptors or buffers (EMFILE, ENFILE, ENOBUFS; glibc's resolver, unable to open
            # its files, says a name is unknown): a failure to connect like any other, for connect_failed().
            failure = _descriptors_exhausted(exc)
            if failure is None:
                raise
            handshake = self._dial(target, factory, options, redial, unavailable=failure)
        else:
            self._connect_starved = False  # a socket again: a later EMFILE is a new episode
        websocket = handshake.websocket
        with self._lock:
            self._check_running(release=websocket.sock.close, stopping=True)
            # Owned by this manager from now: a send() queues (flushed once open), add() does nothing,
            # and a shutdown before the loop begins the handshake ends it (connect_failed()).
            self._own(handshake, websocket)
        if failure is None:
            self._loop.call_threadsafe(handshake._begin)
        else:  # in the loop, as any failure to connect: connect_failed(exc)
            self._loop.call_threadsafe(handshake._fail, failure)
        return websocket

    def _dial(self, target: _ClientTarget, factory: Callable[..., WebSocket], options: _ClientOptions,
              redial: Optional[_Redial], unavailable: Optional[OSError] = None) -> "_ClientHandshake":
        """A client connection and its handshake, ready to begin in the loop (its first hop resolved here).

        With ``unavailable`` (the process is out of descriptors), nothing is resolved and the
        connection gets a closed socket: it exists only to report ``unavailable`` to connect_failed().
        """
        if unavailable is None:
            proxy, address, sock = _client_socket(target, options.proxy)
        else:
            proxy, address, sock = None, (target.host, target.port), self._no_socket
        try:
            opening = _ClientOpening(target, options.settings, options.subprotocols, options.headers, options.origin)
            websocket = factory(sock, client=True, path=target.path, request_headers=opening.request,
                                peer_address=address)
            if redial is not None:
                websocket.reconnect = redial.policy
                websocket.reconnects = redial.opens
                websocket._redial = redial
            return _ClientHandshake(self, websocket, address, target, proxy, opening, options, redial)
        except BaseException:
            sock.close()
            raise

    def _out_of_descriptors(self, exc: BaseException) -> bool:
        """Loop thread: whether a connect() failed for want of descriptors (EMFILE, ENFILE, ENOBUFS);
        the first such failure of an episode (until a socket can be made again) logs a warning."""
        if not isinstance(exc, OSError) or exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS):
            return False
        if not self._connect_starved:
            self._connect_starved = True
            logger.warning("connect() failed (%s): until descriptors are free, each connection that cannot be "
                           "made goes to connect_failed() without a log line", exc)
        return True

    def remove(self, websocket: WebSocket) -> None:
        """Stop managing ``websocket`` without closing it (its socket is yours again).

        Nothing of the connection is lost: :meth:`add` it to this or another
        manager to run it again. Any thread: called from another thread while the loop
        runs, this returns once the loop has let go of the connection.
        """
        if self._loop.in_loop() or not self._turning():
            self._release(websocket)
            return
        released = threading.Event()
        self._loop.call_soon(self._release, websocket, released)
        while not released.wait(0.05):
            if not self._turning():  # the loop ended first: _shutdown() has dealt with the connection
                return

    def __len__(self) -> int:
        return len(self._websockets)

    def __iter__(self) -> Iterator[WebSocket]:
        return iter(tuple(self._websockets.values()))

    def __contains__(self, websocket: object) -> bool:
        return isinstance(websocket, WebSocket) and self._websockets.get(websocket.fileno()) is websocket

    def broadcast(self, message: Union[str, bytes, bytearray, memoryview]) -> int:
        """Queue ``message`` to every open connection; return how many took it.

        A publish to everyone, in this manager only (never relayed by a
        :meth:`bridge`): encoded once, the same bytes queued to every server
        connection (client connections need their own masks). With
        compression, it is compressed once for all the connections that keep
        no compression context (``server_no_context_takeover``, the default
        of :class:`Deflate`), and once per connection for the others. Any thread.
        """
        opcode, payload = _data_frame(message)
        return _queue_to_all(tuple(self._websockets.values()), opcode, payload)

    # Topics ----------------------------------------------------------------------

    def subscribe(self, websocket: WebSocket, topic: str) -> None:
        """Add ``websocket`` (one of this manager's connections) to ``topic``.

        Any thread. A connection leaves its topics by itself when it closes
        (or is :meth:`remove`\\ d). A topic is any ``str`` of at most
        ``MAX_TOPIC_LENGTH`` (1,024) characters, lone surrogates included (a
        peer's JSON can make them), with a :meth:`bridge` or without: through
        one, each topic has a Redis channel of its own. Raises
        :class:`TypeError` or :class:`ValueError` for any other topic,
        :class:`ConnectionClosed` for a connection that is over,
        :class:`ValueError` for one of another manager.
        """
        self._topics.subscribe(websocket, topic)

    def unsubscribe(self, websocket: WebSocket, topic: str) -> None:
        """Take ``websocket`` out of ``topic`` (nothing happens if it was not in). Any thread."""
        self._topics.leave(websocket, (topic,))

    def subscribers(self, topic: str) -> int:
        """How many of this manager's connections are subscribed to ``topic`` (any thread)."""
        return self._topics.subscribers(topic)

    def topics(self, websocket: Optional[WebSocket] = None) -> List[str]:
        """The topics with a local subscriber, or those of ``websocket`` (any thread)."""
        return self._topics.topics(websocket)

    def publish(self, topic: str, message: Union[str, bytes, bytearray, memoryview]) -> int:
        """Queue ``message`` to every subscriber of ``topic``; return how many took it.

        Any thread. The frame is encoded once and the same bytes are queued
        to every server connection; a subscriber whose queue would pass
        ``max_buffered`` is dropped as a slow consumer, never waited for.
        Cost: O(subscribers of the topic). With a :meth:`bridge`, the message
        also goes to Redis for the other processes and hosts; the count
        returned is of local deliveries only. Raises :class:`TypeError` or
        :class:`ValueError` for a topic that :meth:`subscribe` refuses.
        Example, in a callback: ``self.manager.publish("room:42", message)``.
        """
        return self._topics.publish(topic, message)

    def close_all(self, code: int = CloseCode.GOING_AWAY, reason: str = "Server is shutting down") -> None:
        """Start the close handshake on every connection.

        This alone does not stop the manager: listeners keep accepting (an
        application may close everyone and go on). ``close_all(code, reason)``
        then :meth:`stop` is a graceful stop with that code, as ``with manager:`` does.
        Any thread. Raises :class:`ValueError` for a code that may not be sent (1005,
        1006, 1015, out of range) or a reason longer than 123 bytes in UTF-8.
        """
        encode_close(code, reason)  # invalid arguments fail here, not once per connection
        websockets = tuple(self._websockets.values())
        with self._lock:
            # How these end goes into one summary line (a stop's, or when the last of them ends), not a
            # line each: a peer that answers before stop() is called is counted as one that answers after.
            self._closing_all.update(websockets)
        for websocket in websockets:
            websocket.close(code, reason)

    # Listening -----------------------------------------------------------------

    @overload
    def listen(self, address: _Address, factory: Callable[..., WebSocket] = ..., *,
               ssl_context: Optional[ssl.SSLContext] = ..., subprotocols: Optional[Sequence[str]] = ...,
               handshake: Optional[Callable[[Request], Any]] = ..., backlog: int = ...,
               max_connections: Optional[int] = ..., origins: Optional[Sequence[Optional[str]]] = ...,
               compression: Union[None, str, Deflate] = ...) -> _Address: ...

    @overload
    def listen(self, address: socket.socket, factory: Callable[..., WebSocket] = ..., *,
               ssl_context: Optional[ssl.SSLContext] = ..., subprotocols: Optional[Sequence[str]] = ...,
               handshake: Optional[Callable[[Request], Any]] = ..., backlog: int = ...,
               max_connections: Optional[int] = ..., origins: Optional[Sequence[Optional[str]]] = ...,
               compression: Union[None, str, Deflate] = ...) -> Union[Tuple[str, int], str]: ...

    def listen(self, address: Union[Tuple[str, int], str, socket.socket],
               factory: Callable[..., WebSocket] = WebSocket, *,
               ssl_context: Optional[ssl.SSLContext] = None, subprotocols: Optional[Sequence[str]] = None,
               handshake: Optional[Callable[[Request], Any]] = None, backlog: int = 1024,
               max_connections: Optional[int] = None, origins: Optional[Sequence[Optional[str]]] = None,
               compression: Union[None, str, Deflate] = "manager") -> Union[Tuple[str, int], str]:
        """Serve WebSocket connections on ``address``; return the bound address.

        ``address`` is ``(host, port)`` (port 0 picks a free one; IPv6 hosts
        work), a filesystem path for a Unix socket, or a socket that is bound
        and listening already (the manager owns it from then on: a
        :class:`Supervisor` worker's, an inherited one). ``factory`` makes
        each connection after its handshake. ``subprotocols`` lists the server's,
        in preference order. ``handshake(request)`` may inspect the
        :class:`Request` and return ``None`` to accept, a subprotocol name,
        or a :class:`Response` to answer with plain HTTP instead (a refusal
        such as ``Response(403)``, or a page); raising :class:`HandshakeError`
        refuses with its status. Past ``max_connections`` open connections,
        new handshakes get 503. With ``origins``, a request whose Origin is
        not listed gets 403 (list ``None`` to admit requests without one).
        ``compression``: ``"deflate"`` or a :class:`Deflate` accepts
        permessage-deflate offers, ``None`` declines them; by default the
        manager's ``compression`` applies. ``handshake`` and ``factory`` run
        in the loop thread.

        Any thread, before or while the loop runs. Raises :class:`OSError`
        when the address cannot be bound (in use, no permission) and
        :class:`ManagerStopped` once the manager is stopping.
        Example: ``host, port = manager.listen(("127.0.0.1", 0), Echo)``.
        """
        settings = self._compression_for(compression)
        unix_path = None
        if isinstance(address, socket.socket):
            sock = address  # bound and listening already (a worker's, an inherited or activated one)
        elif isinstance(address, (str, bytes, os.PathLike)):
            unix_path = os.fsdecode(address)
            sock = socket.create_server(unix_path, family=socket.AF_UNIX, backlog=backlog)
        else:
            host, port = address[0], address[1]
            family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
            sock = socket.create_server((host, port), family=family, backlog=backlog)
        sock.setblocking(False)
        listener = _Listener(self, sock, factory, ssl_context, subprotocols, handshake, max_connections,
                             origins, unix_path, settings)
        with self._lock:
            self._check_running(release=listener._finalize, stopping=True)
            self._listeners.append(listener)
        self._loop.call_threadsafe(listener._resume)
        if unix_path is None and sock.family == socket.AF_UNIX:
            return str(sock.getsockname())
        return unix_path if unix_path is not None else sock.getsockname()[:2]

    def bridge(self, url: str, *, prefix: str = "wsmanager:", ssl_context: Optional[ssl.SSLContext] = None,
               max_pending: int = DEFAULT_BRIDGE_MAX_PENDING) -> "RedisBridge":
        """Relay :meth:`publish` through Redis pub/sub; return the :class:`RedisBridge`.

        ``url`` is ``redis://[[user]:password@]host[:port][/db]``, or
        ``rediss://...`` for TLS (``ssl_context`` defaults to the system's
        trust store). Channels are named ``prefix + topic``. At most
        ``max_pending`` bytes of messages wait for Redis; past that, and
        while Redis is unreachable, messages are delivered locally only and
        counted in :attr:`RedisBridge.dropped`. One bridge per manager.
        Any thread. Raises :class:`ValueError` for a URL it cannot use,
        :class:`RuntimeError` when the manager is bridged already and
        :class:`ManagerStopped` once it is stopping; Redis being down is not
        an error (the bridge connects, and reconnects, in the loop).
        """
        bridge = RedisBridge(self, self._topics, url, prefix=prefix, ssl_context=ssl_context, max_pending=max_pending)
        with self._lock:
            self._check_running()
            self._topics.attach(bridge)
        self._loop.call_threadsafe(bridge._start)
        return bridge

    def accept(self, sock: socket.socket, request_head: bytes, factory: Callable[..., WebSocket] = WebSocket, *,
               subprotocols: Optional[Sequence[str]] = None, handshake: Optional[Callable[[Request], Any]] = None,
               compression: Union[None, str, Deflate] = "manager") -> None:
        """Adopt a connected socket whose HTTP upgrade request another server read.

        ``request_head`` is the raw request head (and anything read after
        it). wsmanager validates it, answers 101 (or the HTTP error) and runs
        the connection in its loop. The socket belongs to the manager from
        now on. ``compression`` as for :meth:`listen`. Any thread (the work is
        done in the loop); raises :class:`ManagerStopped` (and closes the
        socket) once the manager is stopping.
        """
        settings = self._compression_for(compression)
        listener = _Listener(self, None, factory, None, subprotocols, handshake, None, None, None, settings)
        with self._lock:
            self._check_running(release=sock.close)
            self._adopting.add(sock)  # owned from now: a shutdown before the loop adopts it closes it
        self._loop.call_threadsafe(self._adopt, listener, sock, request_head)

    def _compression_for(self, compression: Union[None, str, Deflate]) -> Optional[Deflate]:
        return self.compression if compression == "manager" else _deflate_settings(compression)

    def wsgi_app(self, factory: Callable[..., WebSocket], app: Optional["WSGIApplication"] = None, *,
                 subprotocols: Optional[Sequence[str]] = None,
                 handshake: Optional[Callable[[Request], Any]] = None,
                 origins: Optional[Sequence[Optional[str]]] = None,
                 max_connections: Optional[int] = None,
                 compression: Union[None, str, Deflate] = "manager") -> "WSGIApplication":
        """A WSGI application that hands WebSocket upgrade requests to this manager.

        An upgrade request gets the rules of :meth:`listen` (``subprotocols``,
        ``handshake``, ``origins``, ``max_connections``, ``compression``); when accepted, its
        socket is taken from the host server, the 101 is written by the
        manager's loop and ``factory`` makes the connection. Any other request
        goes to ``app`` (a Flask, Bottle or Django application), or gets
        ``426 Upgrade Required`` when ``app`` is None. Refusals are ordinary
        WSGI responses. Mount it at a path with the host's routing.

        The socket is found through what the server offers: wsgiref with
        :class:`WSGIRequestHandler`, gunicorn's sync and gthread workers,
        werkzeug's development server (``flask run``) and CherryPy's cheroot;
        any other server gets 501 and a warning in the log. The application
        may be called from any number of the server's threads; ``handshake``
        and ``factory`` run in the server's thread that calls it (a hook may
        block there, e.g. to look up a session), the connection's callbacks
        in the loop. The manager's loop is started (:meth:`start`) at the
        first WebSocket request when neither ``start()`` nor ``run()`` was
        called, so a forking server (gunicorn ``--workers N``, ``--preload``)
        gets one loop per worker process.

        Once the 101 is decided, the connection belongs to the WebSocket (RFC 7230
        6.7): what the server had read past the request head reaches the
        connection as its first bytes, and the server is left with EOF, so it
        never runs a request pipelined behind the upgrade. The connection's
        :attr:`WebSocket.environ` is the request's environ, without the
        server's socket and streams.
        """
        listener = _Listener(self, None, factory, None, subprotocols, handshake, max_connections, origins,
                             compression=self._compression_for(compression))
        return _WSGIHandOff(self, listener, app)

    def _ensure_running(self) -> None:
        """Start the loop unless started or run already (any thread); HandshakeError when it cannot run."""
        with self._lock:
            if self._life >= _Life.ENDING:
                raise HandshakeError("the WebSocket manager has stopped", 503)
            forked = self._pid != os.getpid()
            if self._thread is None and self._loop.thread_id is None:
                if forked:
                    # Made before a fork and never run (gunicorn --preload): its selector and waker are kernel
                    # objects shared with the parent and every sibling worker; this process needs its own.
                    if self._listeners or self._websockets or self._handshakes or not self._loop.owns_selector:
                        raise HandshakeError("the WebSocket manager was set up (listen, add or a selector) before "
                                             "this process forked: create it in the worker", 500)
                    self._loop.renew()
                    self._pid = os.getpid()
                self.start()
            elif forked:
                raise HandshakeError("the WebSocket manager was started before this process forked: "
                                     "start it in the worker, or let wsgi_app start it", 500)

    # Running -------------------------------------------------------------------

    def _become(self, event: str) -> None:
        # The only way _life changes (see _LIFE). The stop()s of other threads hold self._lock (add() and
        # listen() check the life under it); the loop's thread and stop(0) take no lock: a signal handler
        # (Ctrl-C, stop() from SIGTERM) may run them in a thread that holds it. Every transition goes
        # forward (the states are in order), so one that races another never undoes a later state.
        life = _LIFE.get((self._life, event))
        if life is not None and life > self._life:
            self._life = life
            self._loop.stopping = life >= _Life.STOPPING

    def start(self) -> None:
        """Run the loop in a background (daemon) thread.

        If the interpreter exits while it runs (the main thread ends, ``sys.exit()``, a WSGI
        host's worker process stops), the manager is first stopped as by :meth:`stop`: every
        connection gets a close frame (1001) and the peers' answers are waited for, up to
        ``close_timeout``. (A daemon thread would otherwise be frozen mid-close.)
        Raises :class:`RuntimeError` when the manager was started before.
        """
        if self._thread is not None:
            raise RuntimeError("the manager was already started")
        self._thread = threading.Thread(target=self.run, name="wsmanager", daemon=True)
        _stop_at_exit(self)
        self._thread.start()

    def run(self) -> None:
        """Run the loop in this thread until :meth:`stop`; then return.

        In the main thread, while SIGINT has Python's default handler, Ctrl-C stops
        the manager gracefully (as :meth:`stop`) and ``run()`` returns with no
        ``KeyboardInterrupt``; a second Ctrl-C stops it at once (as ``stop(0)``).
        """
        loop = self._loop
        if loop.thread_id is not None:
            raise RuntimeError("the manager runs only once")
        loop.thread_id = threading.get_ident()
        with self._lock:
            self._become("run")
        restore_sigint = None
        try:
            restore_sigint = _on_sigint(self._interrupted)
            ending = _Life.ENDING
            while self._life < ending:
                loop.run_once()
                deadline = self._stop_deadline
                if deadline is not None and (loop.now >= deadline or self._stopped_idle()):
                    self._become("over")
        finally:
            self._shutdown()
            if restore_sigint is not None:
                restore_sigint()
            with _started_lock:
                _started.discard(self)

    def stop(self, timeout: Optional[float] = None) -> None:
        """End the loop, from any thread or a callback; gracefully unless ``timeout`` is 0.

        A stop begins with this call: from then on no connection is taken in.
        Listeners stop accepting, handshakes in progress are refused with
        HTTP 503, and :meth:`add` and :meth:`listen` raise :class:`ManagerStopped`.
        Every connection still open is closed with 1001 (one already closing, by
        :meth:`close_all` for instance, keeps its own code), and the loop ends as
        soon as all have closed, or after ``timeout`` seconds (default:
        ``close_timeout``), terminating what is left (``closed()`` gets 1006).
        ``stop(0)`` ends the loop at once: every connection is terminated (1006).
        A second ``stop()`` may shorten the wait, never lengthen it. It does not
        wait: :meth:`join` does.
        """
        if timeout is None:
            timeout = self.close_timeout
        loop = self._loop
        if timeout <= 0:
            self._stop_now()
        elif loop.in_loop():
            # A callback, or a signal handler (SIGTERM) that interrupted this thread anywhere, select()
            # included: no lock (the interrupted code may hold it) and nothing done here. Queued, with a
            # wake-up, so that a select() that resumes after the handler returns at once.
            self._become("stop")
            loop.call_from_signal(self._stop_when_idle, timeout)
        else:
            with self._lock:
                self._become("stop")
            loop.call_soon(self._stop_when_idle, timeout)

    def _stop_now(self) -> None:
        # stop(0), also from a signal handler (a Ctrl-C in run() or in __exit__): a transition and a wake-up, no lock.
        self._become("stop_now")
        self._loop.wake()

    def _interrupted(self) -> None:
        # SIGINT while run() runs in the main thread (a signal handler: it runs between two
        # bytecodes of the loop, so it only changes the state and queues work).
        self._become("interrupt")
        if self._life is _Life.ENDING:  # the second Ctrl-C
            self._loop.wake()
        else:
            self._loop.call_from_signal(self._stop_on_interrupt)

    def _stop_on_interrupt(self) -> None:
        logger.info("interrupted: closing %d connection(s) with 1001 (Ctrl-C again to stop at once)",
                    len(self._websockets))
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the loop runs: started (or run) and not yet ended, its clean-up included. Any thread."""
        thread = self._thread
        return thread.is_alive() if thread is not None else self._turning()

    def _turning(self) -> bool:
        # Whether run() turns the loop (in some thread), and has not been told to end.
        return self._loop.thread_id is not None and self._life < _Life.ENDING

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait for the background thread to end (after a :meth:`stop`), at most ``timeout`` seconds.

        Any thread but the loop's own (a thread cannot wait for itself to end).
        """
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "WebSocketManager":
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """``close_all()`` (1001), a graceful ``stop()`` and ``join()``; Ctrl-C meanwhile stops at once."""
        with _ctrl_c_stops_at_once([self]):
            self.close_all()
            self.stop()
            self.join()


    # Connections' life cycle: taken in, opened, released, forgotten --------------

    def _take(self, websocket: WebSocket) -> None:
        self._websockets[websocket.fileno()] = websocket
        websocket._bind(self)

    def _open(self, websocket: WebSocket) -> None:
        websocket._run(self)

    # What listeners, handshakes and reconnections report (the _Owner interface) ---

    def _own(self, handshake: "_Handshake", websocket: Optional[WebSocket] = None) -> None:
        if websocket is not None:
            websocket._bind(self)
        self._handshakes.add(handshake)

    def _admit(self, websocket: WebSocket) -> None:
        self._take(websocket)
        self._open(websocket)

    def _disown(self, handshake: "_Handshake") -> None:
        self._handshakes.discard(handshake)

    def _refused_for_stop(self) -> None:
        self._stop_outcomes["refused handshakes"] += 1

    def _release(self, websocket: WebSocket, released: Optional[threading.Event] = None) -> None:
        if websocket.manager is self:
            self._forget(websocket)
            websocket._unbind()
            with self._lock:
                self._closing_all.discard(websocket)  # moved elsewhere: it ends in another manager's count
        if released is not None:
            released.set()

    def _forget(self, websocket: WebSocket) -> None:
        fd = websocket.fileno()
        handshake = None
        if self._websockets.get(fd) is websocket:
            del self._websockets[fd]
        elif self._handshakes:  # terminate() of a connect() in its handshake: it must not time out
            handshake = self._client_handshake(websocket)
        self._topics.leave(websocket)
        self._loop.unwatch(websocket.sock)
        if handshake is not None:
            handshake._abandon(_ended_by(websocket))

    def _client_handshake(self, websocket: WebSocket) -> "Optional[_ClientHandshake]":
        """Loop thread: the opening handshake of a :meth:`connect` in flight for ``websocket``, if any."""
        fd = websocket.fileno()
        if fd < 0:  # closed (the selector would search every registration for a closed socket)
            return None
        key = self._loop.selector.get_map().get(fd)
        handshake = key.data if key is not None else None
        return handshake if isinstance(handshake, _ClientHandshake) and handshake.websocket is websocket else None

    # Server handshakes ---------------------------------------------------------

    def _start_handshake(self, listener: _Listener, sock: socket.socket,
                         address: Any) -> Optional[_ServerHandshake]:
        try:
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            if listener.ssl_context is not None:
                sock = listener.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            logger.debug("could not set up a connection from %s: %s", address, exc)
            sock.close()
            return None
        handshake = _ServerHandshake(self, listener, sock, address)
        self._handshakes.add(handshake)
        loop = self._loop
        loop.watch(sock, selectors.EVENT_READ, handshake)
        loop.on_stop(handshake._refuse_for_stop)
        handshake.timer = loop.call_later(self.handshake_timeout, handshake._time_out)
        if handshake.tls_pending:
            handshake._tls_handshake()
        return handshake

    def _adopt(self, listener: _Listener, sock: socket.socket, request_head: bytes) -> None:
        self._adopting.discard(sock)
        try:
            peer = sock.getpeername()
        except OSError:
            peer = None
        handshake = self._start_handshake(listener, sock, peer)
        if handshake is not None:
            handshake._feed(request_head)
            if self._loop.stopping:  # a head still incomplete must not hold the stop until its deadline
                handshake._refuse_for_stop()

    # Shutdown --------------------------------------------------------------------

    def _stop_when_idle(self, timeout: float) -> None:
        if self._life is _Life.CLOSED:
            return  # stop() from a closed() that the shutdown itself calls: nothing left to wait for
        deadline = time.monotonic() + timeout
        if self._stop_deadline is not None and self._stop_deadline <= deadline:
            return  # a stop under way already ends sooner: a second stop() never lengthens it
        self._stop_deadline = deadline
        self._loop.call_later(timeout, lambda: None)  # make sure select() returns by the deadline
        self._loop.tell_stop()  # listeners stop accepting, handshakes under way are refused (503)
        for websocket in tuple(self._websockets.values()):
            websocket.close(CloseCode.GOING_AWAY)  # does nothing to a connection already closing

    def _stopped_idle(self) -> bool:
        # A refused handshake whose 503 is written only waits for the peer's EOF: it holds no stop.
        return not self._websockets and all(h.reply is not None and not h.reply for h in tuple(self._handshakes))

    def _check_running(self, release: Optional[Callable[[], Any]] = None, *, stopping: bool = False) -> None:
        # Under self._lock. After _shutdown() nothing is taken in (with ``stopping``, nothing once a
        # stop has begun either); release() frees what the caller made.
        life = self._life
        if life is _Life.CLOSED or (stopping and life >= _Life.STOPPING):
            if release is not None:
                release()
            raise ManagerStopped("the manager has stopped" if life is _Life.CLOSED else "the manager is stopping")

    def _count_end(self, websocket: WebSocket, failed: bool, code: int, reason: str) -> bool:
        """Loop thread: count how ``websocket`` ended for a summary line, during a stop or after
        :meth:`close_all`; whether it was counted (if not, its end is logged on its own)."""
        if not self._loop.stopping and websocket not in self._closing_all:
            return False  # unlocked: only the loop's thread takes connections out, and a stop is never undone
        with self._lock:
            closing = self._closing_all
            last_of_close_all = not self._loop.stopping and len(closing) == 1
            closing.discard(websocket)
        # The cut ones grouped by cause: "close timeout", "manager stopped", "1002 <reason>" ... (errno
        # texts cut at their colon, so that a thousand resets make one group).
        if not failed:
            outcome = "closed cleanly"
        elif code == CloseCode.ABNORMAL:
            outcome = "cut: " + (reason.partition(":")[0] or "no reason")
        else:
            outcome = f"cut: {code} {reason}".rstrip()
        self._stop_outcomes[outcome] += 1
        if last_of_close_all:  # close_all() with no stop after it: its summary comes now
            self._log_stop_summary("closed all")
        return True

    def _log_stop_summary(self, ended: str = "stopped") -> None:
        outcomes = self._stop_outcomes
        if not outcomes:
            return
        clean = outcomes.pop("closed cleanly", 0)
        refused = outcomes.pop("refused handshakes", 0)
        causes = sorted(((count, cause[5:]) for cause, count in outcomes.items()), reverse=True)
        cut = sum(count for count, _ in causes)
        shown = ", ".join(f"{cause}: {count}" for count, cause in causes[:4])
        if len(causes) > 4:
            shown += f", {len(causes) - 4} other cause(s): {sum(count for count, _ in causes[4:])}"
        logger.info("%s: %d connection(s) closed cleanly, %d cut%s%s", ended, clean, cut,
                    f" ({shown})" if cut else "",
                    f"; {refused} handshake(s) refused or abandoned" if refused else "")
        outcomes.clear()

    def _shutdown(self) -> None:
        # Closes what the manager owns, queued to open included (a connect() or accept() the loop has
        # not begun): what ends now is counted in the stop's summary, not logged one by one.
        with self._lock:
            self._become("shutdown")
        for websocket in tuple(self._websockets.values()):
            try:
                websocket._finalize("manager stopped")
            except Exception as exc:
                self._loop.crashed(None, exc)
        for handshake in tuple(self._handshakes):
            handshake._finalize("manager stopped")
        for listener in self._listeners:
            listener._finalize()
        for sock in self._adopting:
            sock.close()
        if self._topics.bridge is not None:
            self._topics.bridge._close()
        self._loop.close()
        self._log_stop_summary()


###############################################################################
# Integrations: WSGI servers ##################################################
###############################################################################

StartResponse = Callable[..., Callable[[bytes], Any]]
WSGIApplication = Callable[[Dict[str, Any], StartResponse], Iterable[bytes]]

# Where servers put the connection's socket in environ (wsmanager.socket: WSGIRequestHandler below).
_WSGI_SOCKET_KEYS = ("wsmanager.socket", "gunicorn.socket", "werkzeug.socket")
# RFC 7230 6.1; PEP 3333 forbids them in start_response (and wsgiref asserts).
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailers", "transfer-encoding", "upgrade"})


class _WSGIHandOff:
    """The application :meth:`WebSocketManager.wsgi_app` returns.

    A hand-off in five steps, all in the server's worker thread: decide with
    ``_Listener.accept`` (refusals are plain WSGI responses); duplicate the
    connection's descriptor, so the manager owns a socket of its own; answer
    ``101`` to the server through ``start_response``, which keeps its access
    log right; put a placeholder (a socketpair end, at EOF) on the server's
    descriptor number with ``dup2``, so that whatever the server does next
    (write its idea of a 101, drain, keep-alive, shutdown, close) lands there
    and never on the connection; empty the server's read-ahead buffer into the
    connection's first bytes, so that the server finds nothing but EOF to parse
    (RFC 7230 6.7). The real 101 is the first thing the manager's loop writes on
    the connection. Wherever it stops, one way back undoes what was taken.
    """

    def __init__(self, manager: _Owner, listener: _Listener, app: Optional[WSGIApplication]):
        self.manager = manager
        self.listener = listener
        self.app = app

    def __call__(self, environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if "websocket" not in _tokens(environ.get("HTTP_UPGRADE")):
            if self.app is not None:
                return self.app(environ, start_response)
            return self._refuse(environ, start_response, Response(426, _UPGRADE_REQUIRED))
        try:
            head = _environ_head(environ)
            request = parse_request(head)
        except HandshakeError as exc:
            return self._refuse(environ, start_response, Response(exc.status or 400, exc.headers))
        peer = _environ_peer(environ)
        answer = self.listener._answer(request, peer)
        if answer.response.status != 101:
            return self._refuse(environ, start_response, answer.response)
        if not self.listener._claim():
            return _wsgi_reply(start_response, Response(503))
        placeholder = None
        try:
            fd = _host_fd(environ)
            reader = _host_reader(environ, fd)
            self.manager._ensure_running()
            placeholder = _Placeholder(fd, reader)
            # Only stored (PEP 3333): what the server then writes goes to the placeholder.
            start_response("101 Switching Protocols", [])
            first_frames = placeholder.install()
            websocket = self.listener._make_connection(placeholder.connection, request, head, answer, peer,
                                                       first_frames)
            websocket.environ = _environ_without_io(environ)
            self.manager.add(websocket)
            return placeholder
        except Exception as exc:  # the one way back, from wherever the hand-off stopped
            self.listener._unclaim()
            if placeholder is None:  # nothing taken: the server answers on its connection, as it was
                if not isinstance(exc, (HandshakeError, OSError)):  # HandshakeError: no socket, no loop;
                    raise  # OSError: out of descriptors
                logger.error("wsgi_app cannot take the socket of %s from %s: %s", peer,
                             environ.get("SERVER_SOFTWARE", "this server"), exc)
                status = getattr(exc, "status", None) or 503
                return _wsgi_reply(start_response, Response(status, body=f"{exc}\n".encode()))
            if not placeholder.installed:  # start_response refused: a middleware around us answered already
                placeholder.close()
                logger.warning("WebSocket request %s was answered before wsgi_app: %s", request.path, exc)
                return []
            # The connection is ours and nothing was sent on it: the 101 becomes an error, in the server's
            # log (PEP 3333 exc_info) and to the client. add() refuses when the manager stopped meanwhile.
            status = 503 if isinstance(exc, WebSocketError) else 500
            if status == 500:
                logger.error("could not create the connection for %s", peer, exc_info=exc)
            start_response(_status_text(status), [], sys.exc_info())
            _answer_on(placeholder.connection, Response(status), self.manager.close_timeout)
            return placeholder

    def _refuse(self, environ: Dict[str, Any], start_response: StartResponse,
                response: Response) -> Iterable[bytes]:
        """Refuse through WSGI. PEP 3333 forbids hop-by-hop headers (426 names Upgrade): they go through
        the servers that send them, else on the connection itself when it can be taken (wsgiref with
        :class:`WSGIRequestHandler`, which asserts on them), else they are dropped."""
        if _sends_hop_by_hop(environ) or not any(name.lower() in _HOP_BY_HOP for name, _ in response.headers):
            return _wsgi_reply(start_response, response, hop_by_hop=True)
        try:
            fd = _host_fd(environ)
            placeholder = _Placeholder(fd, _host_reader(environ, fd))
        except (HandshakeError, OSError):
            return _wsgi_reply(start_response, response)
        try:
            start_response(_status_text(response.status, response.reason), [])
        except BaseException:
            placeholder.close()
            raise
        placeholder.install()  # what the client sent after this request gets no answer: never run it
        _answer_on(placeholder.connection, response, self.manager.close_timeout)
        return placeholder


# Bounds the emptying of the server's read-ahead buffer: each read returns what it holds, then b"" at EOF.
_MAX_BUFFERED_READS = 64


class _Placeholder:
    """What takes the connection's place in the server, and the empty body of a handed-off request.

    Made with the server's descriptor ``fd`` and read-ahead buffer ``reader`` (:func:`_host_fd`,
    :func:`_host_reader`): a socket of its own on the connection (a duplicate of ``fd``) and a
    socketpair, both made first, as they may fail (out of descriptors); :meth:`close` before
    :meth:`install` leaves the server's connection as it was. :meth:`install` puts one end of the
    pair on descriptor number ``fd`` (atomically: dup2) and shuts down the other's writing: from then
    on the server reads EOF there, right after what it has buffered, and what it writes lands in the
    pair; ``connection`` is then the caller's. The server closes its end when it is done with the
    request, and the body's close() the other.
    """

    def __init__(self, fd: int, reader: Any):
        self.fd, self.reader = fd, reader
        self.connection = socket.socket(fileno=os.dup(self.fd))
        self.installed = False
        try:
            self.end, self.peer = socket.socketpair()
        except BaseException:
            self.connection.close()
            raise

    def install(self) -> bytes:
        """Take the connection from the server; returns what the server had read ahead of it."""
        self.installed = True
        try:
            os.dup2(self.end.fileno(), self.fd, inheritable=False)
        finally:
            self.end.close()
        self.peer.shutdown(socket.SHUT_WR)
        # Every read returns buffered bytes, then EOF, never waits: the server is left nothing to parse.
        taken = bytearray()
        with contextlib.suppress(OSError, ValueError):  # a reader closed already holds nothing
            for _ in range(_MAX_BUFFERED_READS):
                data = self.reader.read()  # gunicorn's Unreader: its buffer, then one recv(); a file: to EOF
                if not data:
                    break
                taken += data
        return bytes(taken)

    def __iter__(self) -> Iterator[bytes]:
        return iter(())

    def close(self) -> None:
        self.end.close()
        self.peer.close()
        if not self.installed:
            self.connection.close()


def _answer_on(sock: socket.socket, response: Response, timeout: Optional[float]) -> None:
    """Write ``response`` on a socket taken from the server, then close it (a blocking write, bounded)."""
    with sock, contextlib.suppress(OSError):  # the client left: nothing to tell it
        sock.settimeout(timeout)
        sock.sendall(encode_response(response))
        sock.shutdown(socket.SHUT_WR)


def _host_fd(environ: Dict[str, Any]) -> int:
    """The descriptor of the request's connection, from what the server put in environ."""
    for key in _WSGI_SOCKET_KEYS:
        sock = environ.get(key)
        if sock is not None:
            if _is_tls(sock):
                raise HandshakeError(f"{key} is a TLS socket: its TLS session cannot be taken over", 501)
            fd = sock.fileno()
            break
    else:
        # cheroot (CherryPy) names no socket, but wsgi.input wraps the connection's reader.
        reader = getattr(environ.get("wsgi.input"), "rfile", None)
        if not _is_cheroot(environ) or reader is None or not hasattr(reader, "fileno"):
            raise HandshakeError("no socket in environ (wsgiref needs handler_class="
                                 "wsmanager.WSGIRequestHandler)", 501)
        if environ.get("HTTPS") == "on":
            raise HandshakeError("cheroot's TLS session cannot be taken over", 501)
        fd = reader.fileno()
    if fd < 0:
        raise HandshakeError("the connection's socket is already closed or taken", 500)
    return int(fd)


def _is_cheroot(environ: Dict[str, Any]) -> bool:
    return type(environ.get("wsgi.input")).__module__.startswith("cheroot.")


def _sends_hop_by_hop(environ: Dict[str, Any]) -> bool:
    """Whether the server sends the hop-by-hop headers of a response (gunicorn: ``Upgrade: websocket``)."""
    return "gunicorn.socket" in environ or "werkzeug.socket" in environ or _is_cheroot(environ)


def _host_reader(environ: Dict[str, Any], fd: int) -> Any:
    """The server's read-ahead buffer of the request's connection (anything with ``read()``).

    Servers read the connection in chunks: bytes the client sent after the request head may be in
    there, and gunicorn's gthread worker and cheroot, which keep a connection alive after a 101,
    would parse them as the next request. Found for each supported server (HandshakeError 501
    otherwise), and only if it reads from descriptor ``fd``: the hand-off must empty it.
    """
    stream = environ.get("wsgi.input")
    if environ.get("gunicorn.socket") is not None:
        # gunicorn: wsgi.input is a Body over a reader over the connection's Unreader.
        reader = getattr(getattr(stream, "reader", None), "unreader", None)
        source = getattr(reader, "sock", None)
    else:
        # cheroot: a KnownLengthRFile or ChunkedRFile over the connection's rfile; werkzeug: its rfile,
        # or a DechunkedInput over it; wsgiref (WSGIRequestHandler): the handler's rfile.
        reader = source = getattr(stream, "rfile", None) or getattr(stream, "_rfile", None) or stream
    try:
        ours = source is not None and source.fileno() == fd and callable(getattr(reader, "read", None))
    except (OSError, ValueError):  # io.UnsupportedOperation: a stream that is no connection's
        ours = False
    if not ours:
        raise HandshakeError("cannot find the server's read buffer of the connection (wsgi.input "
                             "replaced by a middleware?): bytes past the request could be run as HTTP", 501)
    return reader


# What WebSocket.environ leaves out: the server's I/O, which is the server's and ends with the request
# (and would keep its buffers alive as long as the connection): these keys (wsgi.early_hints writes a
# 103 on the connection: gunicorn), and any value whose type has one of these methods (sockets, files,
# streams).
_WSGI_IO_KEYS = frozenset({"wsgi.input", "wsgi.errors", "wsgi.file_wrapper", "wsgi.early_hints",
                           *_WSGI_SOCKET_KEYS})
_IO_METHODS = ("fileno", "read", "readline", "readinto", "write", "recv", "send", "makefile")


def _environ_without_io(environ: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of a WSGI environ for :attr:`WebSocket.environ`: every key but the server's I/O."""
    # The methods are looked up on the type: an instance's __getattr__ (a lazy session proxy) may do I/O.
    return {key: value for key, value in environ.items()
            if key not in _WSGI_IO_KEYS and not any(hasattr(type(value), name) for name in _IO_METHODS)}


def _environ_head(environ: Dict[str, Any]) -> bytes:
    """The request head, rebuilt from a WSGI environ (PEP 3333), for parse_request()."""
    target = environ.get("REQUEST_URI") or environ.get("RAW_URI")
    if not target:
        path = (environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")).encode("latin-1")
        query = environ.get("QUERY_STRING")
        target = urllib.parse.quote(path or b"/", safe="/:@!$&'()*+,;=~") + (f"?{query}" if query else "")
    fields = [(key[5:].replace("_", "-").title(), value) for key, value in environ.items()
              if key.startswith("HTTP_") and isinstance(value, str)]
    start = f"{environ.get('REQUEST_METHOD', 'GET')} {target} {environ.get('SERVER_PROTOCOL', 'HTTP/1.0')}"
    try:
        return f"{start}\r\n{_header_lines(fields)}\r\n".encode("latin-1")
    except ValueError as exc:  # includes UnicodeEncodeError
        raise HandshakeError(f"malformed request: {exc}", 400) from None


def _environ_peer(environ: Dict[str, Any]) -> Any:
    try:
        return environ["REMOTE_ADDR"], int(environ["REMOTE_PORT"])
    except (KeyError, ValueError):
        return environ.get("REMOTE_ADDR")


def _wsgi_reply(start_response: StartResponse, response: Response, *, hop_by_hop: bool = False) -> List[bytes]:
    """Answer ``response`` through WSGI; its hop-by-hop headers only if ``hop_by_hop``."""
    fields = [(name, value) for name, value in response.headers
              if hop_by_hop or name.lower() not in _HOP_BY_HOP]
    status, body = _complete_response(response, fields)
    start_response(status, fields)
    return [body]


if TYPE_CHECKING:  # to type checkers, the subclass made on first use (below) is its base: same interface
    from wsgiref.simple_server import WSGIRequestHandler


def __getattr__(name: str) -> Any:
    # wsgiref.simple_server brings http.server and email: it would make `import wsmanager`
    # a third slower for everyone, so WSGIRequestHandler is made on first use (PEP 562).
    if name != "WSGIRequestHandler":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from wsgiref import simple_server

    class WSGIRequestHandler(simple_server.WSGIRequestHandler):
        """wsgiref's request handler, with the connection's socket in ``environ["wsmanager.socket"]``
        for :meth:`WebSocketManager.wsgi_app` (as ws4py's ``ws4py.socket``)::

            server = wsgiref.simple_server.make_server(
                "127.0.0.1", 8000, manager.wsgi_app(Echo, app), handler_class=wsmanager.WSGIRequestHandler)

        With a ``socketserver.ThreadingMixIn`` server class each request runs in a thread of its own.
        """

        def get_environ(self) -> Dict[str, Any]:
            """wsgiref's environ, plus ``"wsmanager.socket"``: the connection's socket."""
            environ = super().get_environ()
            environ["wsmanager.socket"] = self.connection
            return environ

    WSGIRequestHandler.__module__ = __name__
    WSGIRequestHandler.__qualname__ = "WSGIRequestHandler"
    globals()[name] = WSGIRequestHandler
    return WSGIRequestHandler


###############################################################################
# Scaling out: a Redis pub/sub bridge and worker processes ####################
###############################################################################

BRIDGE_RECONNECT_DELAY = 0.1  # first wait before a reconnection; doubled per failure ...
BRIDGE_MAX_RECONNECT_DELAY = 5.0  # ... up to this
BRIDGE_CONNECT_TIMEOUT = 5.0  # TCP (and TLS) connection to Redis
BRIDGE_READS_PER_EVENT = 16  # the subscriber socket is drained this far per event: Redis never waits on us
BRIDGE_VALUES_PER_EVENT = 1024  # ... and at most this many RESP values parsed (a pub/sub message is 4)

_SUBSCRIBE_BATCH = 512  # channels per SUBSCRIBE command when (re)subscribing
# The replies the bridge reads are flat arrays of 3 (a pub/sub message or confirmation) and scalars:
# these bounds are far above them and keep a broken or hostile server from nesting replies without
# end or costing far more in Python objects than it sent in bytes.
_RESP_MAX_DEPTH = 32
_RESP_MAX_ELEMENTS = 1024  # array elements in one reply, nested ones included
_ORIGIN_SIZE = 8
_KIND_TO_OPCODE: Dict[int, Opcode] = {b"t"[0]: _TEXT, b"b"[0]: _BINARY}
_OPCODE_TO_KIND: Dict[int, bytes] = {_TEXT: b"t", _BINARY: b"b"}


class _RedisError(_NamedTuple):
    """An error reply of Redis (``-ERR ...``)."""

    message: str


def _resp_command(*arguments: bytes) -> bytes:
    """One command as a RESP2 array of bulk strings."""
    return b"*%d\r\n" % len(arguments) + b"".join(b"$%d\r\n%s\r\n" % (len(argument), argument)
                                                  for argument in arguments)


# A topic is any str, and each has a channel of its own. UTF-8 cannot carry a lone surrogate (which
# json.loads('"\\ud800"') makes): "surrogatepass" writes it in the 3-byte form, which valid UTF-8 never
# uses, so the mapping stays one to one and reads back the same on every bridge; a channel in valid
# UTF-8 (any other client's) reads as usual.
def _topic_channel(prefix: bytes, topic: str) -> bytes:
    return prefix + topic.encode("utf-8", "surrogatepass")


def _channel_topic(channel: bytes, prefix_size: int) -> str:
    return channel[prefix_size:].decode("utf-8", "surrogatepass")


class _RespViolation(ValueError):
    """A reply that breaks RESP2 or a limit; ``replies`` are the complete ones that came before it."""

    def __init__(self, message: str, replies: List[Any]):
        super().__init__(message)
        self.replies = replies


class _RespParser:
    """Incremental RESP2 reply parser: bytes in, complete replies out.

    Simple strings come out as ``str``, errors as :class:`_RedisError`,
    integers as ``int``, bulk strings as ``bytes`` (``None`` when null),
    arrays as ``list``. Linear in the bytes fed: a reply in progress is kept
    as far as it is parsed (its open arrays on a stack, no recursion), and
    only an unfinished line or bulk string waits in the buffer. Bounded: a
    reply of more than ``max_size`` bytes or ``max_elements`` array elements,
    or with arrays nested more than ``_RESP_MAX_DEPTH`` deep, is a violation
    (:class:`_RespViolation`, a :class:`ValueError`) as soon as it shows.
    """

    def __init__(self, max_size: int = DEFAULT_BRIDGE_MAX_MESSAGE, max_elements: int = _RESP_MAX_ELEMENTS):
        self.max_size = max_size
        self.max_elements = max_elements
        self.more = False  # the last feed() stopped at its limit: replies may be waiting (feed(b"") takes them)
        self.parsed = 0  # values parsed so far (each scalar, bulk string and array header is one)
        self.scanned = 0  # bytes looked at so far: linear means at most twice each (a CR before its LF)
        self._buffer = bytearray()  # from the start of the unfinished line or bulk string on
        self._scan_from = 0  # where to look for the CRLF of the unfinished line: none in its bytes before
        self._bulk = -1  # the length of the bulk string whose body is awaited, else -1
        self._stack: List[List[Any]] = []  # the open arrays of the reply in progress: [items, count still due]
        self._size = 0  # bytes of the reply in progress so far
        self._elements = 0  # array elements it announced so far

    def feed(self, data: bytes, limit: int = sys.maxsize) -> List[Any]:
        """Take ``data``; return the replies it completes, parsing at most ``limit`` values.

        Past the limit, :attr:`more` is set and the rest waits: ``feed(b"")`` goes on.

        Raises :class:`_RespViolation` with the replies completed before the violation.
        """
        buffer = self._buffer
        buffer += data
        end_of_data = len(buffer)
        replies: List[Any] = []
        stack = self._stack
        max_size = self.max_size
        # Deliberate: the state lives in locals during the loop (attribute look-ups would cost as much
        # as the parsing) and is stored back at the end.
        bulk, scan_from, size, elements, scanned = self._bulk, self._scan_from, self._size, self._elements, self.scanned
        position = spent = 0
        value: Any
        try:
            while position < end_of_data and spent < limit:
                spent += 1
                start = position
                if bulk < 0:
                    end = buffer.find(b"\r\n", scan_from)
                    if end < 0:
                        scanned += end_of_data - scan_from
                        # A CR may be waiting for its LF: that one byte is looked at again.
                        scan_from = max(position, end_of_data - 1)
                        if end_of_data - position > MAX_HEAD_SIZE:
                            raise ValueError("a RESP line without its end")
                        break
                    scanned += end + 2 - scan_from
                    kind = buffer[position]
                    position = scan_from = end + 2
                    if kind == 36:  # "$": a bulk string of this length; -1 is RESP2's null
                        bulk = int(buffer[start + 1:end])
                        if bulk < 0:
                            if bulk != -1:
                                raise ValueError(f"a RESP length of {bulk}")
                            value = None
                        else:
                            size += position - start
                            # Refused before its body comes: the buffer never holds more than max_size.
                            if size + bulk + 2 > max_size:
                                raise ValueError(f"a Redis reply of more than {max_size} bytes")
                            start = position
                    elif kind == 58:  # ":": integer
                        value = int(buffer[start + 1:end])
                    elif kind == 42:  # "*": an array of this many elements; -1 is RESP2's null
                        count = int(buffer[start + 1:end])
                        if count > 0:
                            size += position - start
                            elements += count
                            if elements > self.max_elements:
                                raise ValueError(f"a Redis reply of more than {self.max_elements} elements")
                            if len(stack) >= _RESP_MAX_DEPTH:
                                raise ValueError(f"RESP arrays nested more than {_RESP_MAX_DEPTH} deep")
                            stack.append([[], count])
                            continue
                        if count < -1:
                            raise ValueError(f"a RESP length of {count}")
                        value = [] if count == 0 else None
                    elif kind == 43:  # "+": simple string
                        value = buffer[start + 1:end].decode(errors="replace")
                    elif kind == 45:  # "-": error
                        value = _RedisError(buffer[start + 1:end].decode(errors="replace"))
                    else:
                        raise ValueError(f"not a RESP2 reply: {bytes(buffer[start:end])[:64]!r}")
                if bulk >= 0:  # its body, at once when it is here already
                    end = position + bulk
                    if end + 2 > end_of_data:
                        break
                    if buffer[end] != 13 or buffer[end + 1] != 10:  # CR LF
                        raise ValueError("a RESP bulk string longer than announced")
                    value = bytes(buffer[position:end])
                    position = scan_from = end + 2
                    scanned += position - start
                    bulk = -1
                size += position - start
                if size > max_size:
                    raise ValueError(f"a Redis reply of more than {max_size} bytes")
                while stack:  # the value may complete arrays, innermost first
                    array = stack[-1]
                    array[0].append(value)
                    array[1] -= 1
                    if array[1]:
                        break
                    value = stack.pop()[0]
                else:
                    replies.append(value)
                    size = elements = 0
        except ValueError as exc:  # int() of a malformed number included
            raise _RespViolation(str(exc), replies) from None
        finally:
            self._bulk, self._size, self._elements, self.scanned = bulk, size, elements, scanned
            self.parsed += spent
        self.more = spent >= limit and position < end_of_data
        # Deliberate: deleting from the front of a bytearray is cheap in CPython (it moves its start).
        del buffer[:position]
        self._scan_from = scan_from - position
        return replies


class _RedisConnection:
    """One non-blocking connection to Redis, a handler in the manager's selector.

    Connects (TCP, then TLS for ``rediss://``), then writes what the bridge
    queues and hands every reply to the bridge. Any failure ends it; the
    bridge makes a new one after a back-off.
    """

    __slots__ = ("bridge", "manager", "loop", "role", "sock", "parser", "_out", "_lock", "_scheduled", "_writing",
                 "_timer", "_finalized", "ready_since", "hello_pending", "complained", "_resume")

    def __init__(self, bridge: "RedisBridge", role: str, sock: socket.socket):
        self.bridge = bridge
        self.manager = bridge.manager  # for good (see :class:`_Flushable`)
        self.loop = bridge.loop
        self.role = role  # "publish" or "subscribe": a subscribed RESP connection can do nothing else
        self.sock = sock
        self.parser = _RespParser(bridge.max_message_size)
        self._out = bytearray()
        self._lock = threading.Lock()
        self._scheduled = False
        self._writing = True  # registered for EVENT_WRITE until connected
        self._timer = self.loop.call_later(BRIDGE_CONNECT_TIMEOUT, self._finalize, "connect timeout")  # ready by then
        self._resume: Optional[List[Any]] = None  # the timer of the next turn's read, while replies wait
        self._finalized = False
        self.ready_since: Optional[float] = None  # when it was connected (TLS included) and ready; None: not yet
        self.hello_pending = bool(bridge._hello)  # AUTH goes first: the first reply is its answer
        self.complained = False  # a skipped reply was logged at WARNING (the others go to DEBUG)

    @property
    def ready(self) -> bool:
        return self.ready_since is not None and not self._finalized

    def write(self, data: bytes) -> None:
        """Queue bytes (any thread); the loop writes them once connected."""
        with self._lock:
            self._out += data
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.schedule_flush(self)

    def pending(self) -> int:
        return len(self._out)

    def _on_read(self) -> None:
        if not self.ready:
            self._on_write()  # still connecting (_on_write ignores a finalized connection)
            return
        # One timer at most, not read_again(): this runs on readiness events and on its own re-reads, and a
        # re-read queued by each of them would pile up, one more every turn. This read does the queued one's work.
        _cancel(self._resume)
        self._resume = None
        parser = self.parser
        parsed_by = parser.parsed + BRIDGE_VALUES_PER_EVENT  # bounded work per event, as for every handler
        for _ in range(BRIDGE_READS_PER_EVENT):
            backlog = parser.more  # replies left over by that bound come before anything new is read
            try:
                data = b"" if backlog else self.sock.recv(READ_SIZE)
                if not data and not backlog:
                    raise ConnectionError("Redis closed the connection")
                replies = parser.feed(data, parsed_by - parser.parsed)
            except _would_block():
                break
            except _RespViolation as exc:  # not RESP, or past a limit: what came before it is good
                self.bridge._deliver_replies(self, exc.replies)
                self._finalize(str(exc))
                return
            except OSError as exc:
                self._finalize(str(exc) or type(exc).__name__)
                return
            self.bridge._deliver_replies(self, replies)
            if self._finalized:
                return
            # What this read queued goes to the subscribers' sockets before the next read: draining
            # Redis by the MiB would otherwise pile it up in their queues, past max_buffered.
            self.loop.flush()
            if parser.more or parser.parsed >= parsed_by:
                self._resume = self.loop.call_later(0, self._on_read)  # the rest in the next turn, after the others
                return
            if backlog:
                continue
            if len(data) < READ_SIZE and not (_is_tls(self.sock) and cast("ssl.SSLSocket", self.sock).pending()):
                break

    def _on_write(self) -> None:
        if self._finalized:
            return
        if self.ready_since is None:
            # Connected, or not? Then, for rediss://, the TLS handshake: one step per readiness event.
            error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self._finalize(os.strerror(error))
                return
            if _is_tls(self.sock):
                try:
                    waiting = _tls_step(self.sock)
                except (ssl.SSLError, OSError) as exc:
                    self._finalize(f"TLS handshake: {exc}")
                    return
                if waiting:
                    # Replies may arrive while a write is wanted: reading stays on.
                    self._set_events(waiting | selectors.EVENT_READ)
                    return
            self.ready_since = time.monotonic()
            _cancel(self._timer)
            self.bridge._connection_ready(self)
        self._flush()

    def _set_events(self, events: int) -> None:
        self._writing = bool(events & selectors.EVENT_WRITE)
        self.loop.set_events(self.sock, events, self)

    def _flush(self) -> None:
        if not self.ready:
            return
        error = None
        with self._lock:
            out = self._out
            try:
                for _ in range(WRITES_PER_FLUSH):
                    if not out:
                        break
                    sent = self.sock.send(out)
                    del out[:sent]
            except _would_block():
                pass
            except OSError as exc:
                error = exc
            waiting = bool(out)
            self._scheduled = waiting
        if error is not None:
            self._finalize(f"write failed: {error}")
            return
        if waiting != self._writing:
            self._set_events(selectors.EVENT_READ | selectors.EVENT_WRITE if waiting else selectors.EVENT_READ)

    def _finalize(self, reason: str = "") -> None:
        if self._finalized:
            return
        self._finalized = True
        _cancel(self._timer)
        _cancel(self._resume)
        self.loop.unwatch(self.sock)
        self.sock.close()
        self.bridge._connection_lost(self, reason)


def _parse_redis_url(url: str) -> Tuple[bool, str, int, int, Optional[str], Optional[str]]:
    """``redis[s]://[[user]:password@]host[:port][/db]`` -> (TLS, host, port, db, user, password)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a redis:// or rediss:// URL: {url!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"invalid port in {url!r}") from None
    database = parts.path.lstrip("/")
    if database and not database.isdigit():
        raise ValueError(f"invalid database number in {url!r}")
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    if password is None and username:  # redis://password@host, as redis-py reads it
        password, username = username, None
    return parts.scheme == "rediss", parts.hostname or "127.0.0.1", port, int(database or 0), username, password


class RedisBridge:
    """Relays a manager's :meth:`~WebSocketManager.publish` through Redis pub/sub.

    Made by :meth:`WebSocketManager.bridge`. Every message published on one
    manager reaches the subscribers of every bridged manager (other worker
    processes, other hosts) once: local subscribers at once, the others
    through the Redis channel ``prefix + topic``, in publish order per
    publisher. Each bridge tags what it publishes with its own ``origin``
    and ignores that tag when Redis echoes it back. A channel name is the
    topic in UTF-8, its lone surrogates (if any) in their 3-byte form
    (``"surrogatepass"``): every topic has a channel of its own.

    Two connections to Redis run in the manager's loop (no thread): one
    PUBLISHes, one SUBSCRIBEs to the channels of the topics that have a
    local subscriber (a subscribed connection may send nothing else). When
    Redis is unreachable, local publish/subscribe go on, the bridge
    reconnects with a back-off (0.1 s doubling to 5 s, started over once a
    connection lived 5 s) and re-subscribes;
    messages that could not be relayed are counted in :attr:`dropped` and
    logged. Like Redis pub/sub itself, delivery is at most once.

    Counters (read from any thread; they only go up): :attr:`relayed`
    (PUBLISHes Redis acknowledged), :attr:`received` (messages from other
    publishers handed to local subscribers), :attr:`dropped` (not relayed:
    Redis down, more than ``max_pending`` bytes waiting for it, refused by
    Redis, or in flight when the connection broke), :attr:`rejected`
    (replies skipped: malformed messages, messages on other channels, replies
    to no command sent; logged, the first at WARNING), :attr:`reconnections`.
    Each publish ends in ``relayed`` or ``dropped``, once. A reply that breaks
    RESP2 (or is past ``max_message_size`` bytes, 1,024 array elements or 32
    levels of nesting) ends that connection, after the replies before it.
    """

    def __init__(self, manager: "WebSocketManager", topics: _Topics, url: str, *, prefix: str = "wsmanager:",
                 ssl_context: Optional[ssl.SSLContext] = None, max_pending: int = DEFAULT_BRIDGE_MAX_PENDING,
                 max_message_size: int = DEFAULT_BRIDGE_MAX_MESSAGE):
        # Pub/sub channels are global to a Redis server: the database number is accepted and has no effect.
        secure, self.host, self.port, self.database, username, password = _parse_redis_url(url)
        credentials = [text.encode() for text in (username, password) if text is not None]
        self._hello = _resp_command(b"AUTH", *credentials) if credentials else b""  # first on each connection
        self.ssl_context = (ssl_context or ssl.create_default_context()) if secure else None
        self.manager = manager
        self.loop = manager._loop  # what the bridge and its connections use of the loop
        self._topics = topics  # the manager's: attached to by manager.bridge(), detached from by _close()
        self.prefix = prefix
        self._prefix_bytes = prefix.encode()
        self.max_pending = max_pending
        self.max_message_size = max_message_size
        self.origin = os.urandom(_ORIGIN_SIZE)
        self.relayed = self.received = self.dropped = self.rejected = self.reconnections = 0
        self._lock = threading.Lock()  # guards the publisher, _unacknowledged and the counters it touches
        self._publisher: Optional[_RedisConnection] = None  # set only while it is ready to take PUBLISHes
        self._unacknowledged = 0  # PUBLISHes written whose reply has not come
        self._connections: Dict[str, Optional[_RedisConnection]] = {"publish": None, "subscribe": None}
        self._delays = {"publish": 0.0, "subscribe": 0.0}  # the last wait (0: none since a connection lived)
        self._down_since: Dict[str, float] = {}  # role -> when it went down (absent: up, or on its first try)
        self._dropped_at_loss = 0
        self._channels: Set[str] = set()  # topics SUBSCRIBEd to (or asked for) on the current connection
        self._subscribed: Set[str] = set()  # topics Redis confirmed
        self._closed = False

    def __repr__(self) -> str:
        scheme = "rediss" if self.ssl_context is not None else "redis"
        return f"<RedisBridge {scheme}://{self.host}:{self.port} prefix={self.prefix!r}>"

    @property
    def connected(self) -> bool:
        """Whether both connections to Redis are up."""
        return all(connection is not None and connection.ready for connection in self._connections.values())

    @property
    def subscribed(self) -> FrozenSet[str]:
        """The topics whose Redis channel subscription Redis has confirmed."""
        return frozenset(self._subscribed)

    def stats(self) -> Dict[str, Any]:
        """The counters and state, as a dict (for a status page or a log line)."""
        return {"connected": self.connected, "relayed": self.relayed, "received": self.received,
                "dropped": self.dropped, "rejected": self.rejected, "reconnections": self.reconnections,
                "subscribed": sorted(self._subscribed)}

    def close(self) -> None:
        """Stop relaying and close the Redis connections (any thread). Topics stay local."""
        self._closed = True
        self.loop.call_threadsafe(self._close)

    # Any thread ----------------------------------------------------------------

    def _relay(self, topic: str, opcode: int, payload: bytes) -> None:
        channel = _topic_channel(self._prefix_bytes, topic)
        with self._lock:
            publisher = self._publisher
            if publisher is None or publisher.pending() > self.max_pending:
                self.dropped += 1
                return
            self._unacknowledged += 1
            # Deliberate: written while holding the lock, so that two threads' PUBLISHes cannot
            # swap places between the counter and the buffer.
            publisher.write(_resp_command(b"PUBLISH", channel, self.origin + _OPCODE_TO_KIND[opcode] + payload))

    def _topic_changed(self, topic: str) -> None:
        if not self._closed:
            self.loop.call_threadsafe(self._sync_topic, topic)

    # Loop thread ---------------------------------------------------------------

    def _start(self) -> None:
        for role in ("publish", "subscribe"):
            self._connect(role)

    def _connect(self, role: str) -> None:
        if self._closed:  # (the manager's shutdown closes the bridge, and the loop runs nothing after it)
            return
        try:
            # Resolving a name blocks the loop for as long as the resolver takes: give an
            # address, or a name /etc/hosts answers, for a bridge that reconnects quickly.
            family, kind, protocol, _, address = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, protocol)
        except OSError:
            self._retry(role)
            return
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            # Wrapped before connect_ex(), which then also sets up the TLS object for the handshake to come.
            sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host, do_handshake_on_connect=False)
        connection = _RedisConnection(self, role, sock)
        self._connections[role] = connection
        try:
            error = sock.connect_ex(address)
            if error not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConnectionError(os.strerror(error))
        except (OSError, ValueError) as exc:  # an SSLError included: for rediss://, it sets up the TLS object
            connection._finalize(str(exc) or type(exc).__name__)
            return
        self.loop.set_events(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, connection)

    def _connection_ready(self, connection: _RedisConnection) -> None:
        role = connection.role
        down_since = self._down_since.pop(role, None)
        # The back-off is not reset here: a connection that Redis ends at once (or that fails on what
        # it is sent first) would be retried every 0.1 s for ever. It is once one lived (_connection_lost).
        if connection.hello_pending:
            connection.write(self._hello)
        if role == "publish":
            with self._lock:  # (nothing is unacknowledged: see _connection_lost)
                self._publisher = connection
                news = f"{self.dropped - self._dropped_at_loss} message(s) could not be relayed"
        else:
            # Re-subscribe to every topic that has a local subscriber now.
            self._channels = set(self._topics.topics())  # (and _subscribed is empty: see _connection_lost)
            channels = [_topic_channel(self._prefix_bytes, topic) for topic in sorted(self._channels)]
            for start in range(0, len(channels), _SUBSCRIBE_BATCH):
                connection.write(_resp_command(b"SUBSCRIBE", *channels[start:start + _SUBSCRIBE_BATCH]))
            news = f"re-subscribed to {len(self._channels)} topic(s)"
        if down_since is not None:
            self.reconnections += 1
            logger.info("redis bridge: %s connection to %s:%d restored after %.1f s; %s", role, self.host,
                        self.port, time.monotonic() - down_since, news)
        else:
            logger.debug("redis bridge: %s connection to %s:%d up", role, self.host, self.port)

    def _connection_lost(self, connection: _RedisConnection, reason: str) -> None:
        role = connection.role
        if self._connections.get(role) is not connection:
            return
        self._connections[role] = None
        ready_since = connection.ready_since
        if ready_since is not None and time.monotonic() - ready_since >= BRIDGE_MAX_RECONNECT_DELAY:
            self._delays[role] = 0.0  # it lived: the next attempt comes quickly, and the back-off starts over
        if role == "publish":
            with self._lock:
                if role not in self._down_since:
                    self._dropped_at_loss = self.dropped
                self._publisher = None
                # Written but never acknowledged: maybe relayed, maybe not (at most once).
                self.dropped += self._unacknowledged
                self._unacknowledged = 0
        else:
            self._subscribed.clear()
            self._channels.clear()
        if self._closed:
            return
        if role not in self._down_since:
            logger.warning("redis bridge: %s connection to %s:%d %s (%s); local delivery goes on, reconnecting",
                           role, self.host, self.port, "lost" if ready_since is not None else "failed", reason)
        else:
            logger.debug("redis bridge: %s connection to %s:%d failed again (%s)", role, self.host, self.port,
                         reason)
        self._retry(role)

    def _retry(self, role: str) -> None:
        delay = self._delays[role]
        delay = BRIDGE_RECONNECT_DELAY if delay <= 0 else min(delay * 2, BRIDGE_MAX_RECONNECT_DELAY)
        self._delays[role] = delay
        self._down_since.setdefault(role, time.monotonic())
        self.loop.call_later(delay, self._connect, role)

    def _sync_topic(self, topic: str) -> None:
        # Reads the topics now, so that subscribe/unsubscribe races end where the topic stands.
        connection = self._connections["subscribe"]
        wanted = self._topics.subscribers(topic) > 0
        if connection is None or not connection.ready or wanted == (topic in self._channels):
            return
        self._channels ^= {topic}  # in if wanted, out if not: it was the other way round
        connection.write(_resp_command(b"SUBSCRIBE" if wanted else b"UNSUBSCRIBE",
                                       _topic_channel(self._prefix_bytes, topic)))

    # Every reply is used, or skipped and counted: a malformed one never ends the stream (a good
    # message behind it is not lost), and every counter only goes up and counts what it says.
    def _deliver_replies(self, connection: _RedisConnection, replies: List[Any]) -> None:
        refusal = None
        if connection.hello_pending and replies:
            connection.hello_pending = False
            answer = replies.pop(0)
            if isinstance(answer, _RedisError):
                if self._refuses(answer):
                    refusal = answer
            elif answer != "OK":
                self._skip(connection, answer, "not an answer to AUTH")
        if refusal is None:
            take = self._acknowledge if connection.role == "publish" else self._receive
            refusal = take(connection, replies)
        if refusal is not None:
            connection._finalize(f"authentication failed: {refusal.message}")

    def _acknowledge(self, connection: _RedisConnection, replies: List[Any]) -> Optional[_RedisError]:
        # RESP2 answers each command in turn, and only this thread takes from _unacknowledged (publish()
        # adds to it): that many PUBLISHes wait for these replies. A reply beyond them answers nothing.
        waiting = self._unacknowledged
        acknowledged = failed = 0
        refusal = None
        for reply in replies:
            if acknowledged + failed == waiting:
                self._skip(connection, reply, "no PUBLISH waits for a reply")
            elif type(reply) is int:
                acknowledged += 1  # how many subscribers Redis gave it to
            elif isinstance(reply, _RedisError):
                if self._refuses(reply):
                    refusal = reply  # this PUBLISH and those after it count as dropped when the connection ends
                    break
                failed += 1
            else:  # no answer to a PUBLISH: maybe relayed, maybe not (at most once)
                failed += 1
                self._complain(connection, reply, "not an answer to PUBLISH; counted in dropped")
        with self._lock:
            self._unacknowledged -= acknowledged + failed
            self.relayed += acknowledged
            self.dropped += failed
        return refusal

    def _receive(self, connection: _RedisConnection, replies: List[Any]) -> Optional[_RedisError]:
        prefix = self._prefix_bytes
        skip = len(prefix)
        deliver = self._topics.deliver
        for reply in replies:
            if type(reply) is not list or len(reply) != 3:
                if isinstance(reply, _RedisError):
                    if self._refuses(reply):
                        return reply
                    continue  # logged: an answer to a SUBSCRIBE of ours, not a message
                self._skip(connection, reply, "not a pub/sub message")
                continue
            # RESP2 pub/sub: ["message", channel, payload] and ["subscribe" or "unsubscribe", channel, count].
            kind, channel, data = reply
            if type(channel) is not bytes or not channel.startswith(prefix):
                self._skip(connection, reply, "not a channel of this bridge")
            elif kind == b"message":
                if type(data) is not bytes or len(data) <= _ORIGIN_SIZE:
                    self._skip(connection, reply, "not a message of a bridge")
                    continue
                if data[:_ORIGIN_SIZE] == self.origin:
                    continue  # our own message, already delivered locally
                opcode = _KIND_TO_OPCODE.get(data[_ORIGIN_SIZE])
                payload = data[_ORIGIN_SIZE + 1:]
                try:
                    topic = _channel_topic(channel, skip)
                    if opcode is _TEXT:
                        payload.decode()  # only valid UTF-8 is a text message
                except UnicodeDecodeError:
                    opcode = None
                if opcode is None:
                    self._skip(connection, reply, "not a message of a bridge")
                    continue
                self.received += 1
                deliver(topic, opcode, payload)
            elif kind == b"subscribe" or kind == b"unsubscribe":
                try:
                    topic = _channel_topic(channel, skip)
                except UnicodeDecodeError:
                    self._skip(connection, reply, "a channel that no topic has")
                    continue
                if kind == b"unsubscribe":
                    self._subscribed.discard(topic)
                elif topic in self._channels:  # else unsubscribed since: the confirmation of the UNSUBSCRIBE follows
                    self._subscribed.add(topic)
            else:
                self._skip(connection, reply, "not a pub/sub message")
        return None

    def _skip(self, connection: _RedisConnection, reply: Any, why: str) -> None:
        self.rejected += 1
        self._complain(connection, reply, why + "; counted in rejected")

    @staticmethod
    def _complain(connection: _RedisConnection, reply: Any, why: str) -> None:
        # A hostile server can send such replies by the million: one warning per connection, the rest in DEBUG.
        if isinstance(reply, (bytes, str, _RedisError)):
            shown = repr(reply[:80] if not isinstance(reply, _RedisError) else reply.message[:80])
        else:
            shown = f"an array of {len(reply)}" if type(reply) is list else repr(reply)
        level = logging.DEBUG if connection.complained else logging.WARNING
        connection.complained = True
        logger.log(level, "redis bridge: skipped a reply on the %s connection: %s (%s)", connection.role, shown, why)

    @staticmethod
    def _refuses(error: _RedisError) -> bool:
        """Log an error reply; whether it refuses our credentials (then the connection must end)."""
        logger.error("redis bridge: Redis answered %s", error.message)
        return error.message.startswith(("WRONGPASS", "NOAUTH", "ERR AUTH", "ERR invalid password"))

    def _close(self) -> None:
        self._closed = True
        self._topics.detach(self)
        for connection in list(self._connections.values()):
            if connection is not None:
                connection._finalize("bridge closed")


def _request_stop_on_signals(stop_requests: List[int], force: Callable[[int], Any]) -> Dict[int, Any]:
    """SIGINT and SIGTERM append to ``stop_requests``; a second one calls ``force(signum)``.
    Returns the handlers they replace."""

    def request_stop(signum: int, frame: Any) -> None:
        # A flag, not KeyboardInterrupt: raised inside Thread.join() that marks the loop
        # thread as ended while it still runs (CPython < 3.13), and the process would exit
        # in the middle of the close handshakes.
        if stop_requests:
            force(signum)
        stop_requests.append(signum)

    # SIGTERM: a service manager's stop is a Ctrl-C too.
    return {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}


class Supervisor:
    """Runs a server in ``workers`` forked processes sharing one port, and keeps them running.

    ``setup(manager, sock, index)`` runs in each worker, before its loop
    starts: it must ``manager.listen(sock, Factory, ...)`` (``sock`` is the
    worker's listening socket) and may do anything else a worker needs,
    such as ``manager.bridge(redis_url)`` so that workers share topics::

        def setup(manager, sock, index):
            manager.listen(sock, Chat)
            manager.bridge("redis://127.0.0.1:6379")

        wsmanager.Supervisor(("0.0.0.0", 9000), setup, workers=4).run()

    Where the OS has ``SO_REUSEPORT`` (Linux, the BSDs) every worker listens
    on a socket of its own and the kernel spreads connections over them;
    elsewhere the workers inherit one listening socket. A worker that dies is
    forked again after ``restart_delay`` seconds, doubled for each death
    within ``stable_after`` seconds of its start, up to ``max_restart_delay``.
    SIGINT or SIGTERM (or :meth:`stop`) makes every worker close its
    connections with 1001 and exit; :meth:`run` then returns 0. A second
    signal kills the workers at once and :meth:`run` returns 1. POSIX only
    (``os.fork``); call :meth:`run` from the main thread of a process that
    has started no other threads.
    """

    def __init__(self, address: Tuple[str, int], setup: Callable[[WebSocketManager, socket.socket, int], Any], *,
                 workers: int = 2, manager_options: Optional[Dict[str, Any]] = None, backlog: int = 1024,
                 reuse_port: Optional[bool] = None, restart_delay: float = 0.5, max_restart_delay: float = 30.0,
                 stable_after: float = 10.0):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.address = address
        self.setup = setup
        self.workers = workers
        self.manager_options = dict(manager_options or {})
        self.backlog = backlog
        self.reuse_port = hasattr(socket, "SO_REUSEPORT") if reuse_port is None else reuse_port
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self.stable_after = stable_after
        self.bound_address: Optional[Tuple[str, int]] = None
        self._pids: Dict[int, int] = {}  # pid -> worker index
        self._started: Dict[int, float] = {}  # worker index -> when it was last forked
        self._delays: Dict[int, float] = {}
        self._stop_requests: List[int] = []
        self._forced = False
        self._sock: Optional[socket.socket] = None

    @property
    def pids(self) -> Dict[int, int]:
        """Worker index -> pid, for the workers running now."""
        return {index: pid for pid, index in self._pids.items()}

    def stop(self) -> None:
        """Ask :meth:`run` to stop the workers (from a signal handler or another thread)."""
        self._stop_requests.append(0)

    def run(self) -> int:
        """Bind, fork the workers, restart those that die; return 0 after a stop (1 if forced)."""
        if not hasattr(os, "fork"):
            raise RuntimeError("Supervisor needs os.fork (POSIX)")

        def force(signum: int) -> None:
            self._forced = True
            logger.warning("second %s: forcing the exit (workers killed, connections dropped)",
                           signal.Signals(signum).name)
            for pid in list(self._pids):
                with contextlib.suppress(OSError):  # gone already
                    os.kill(pid, signal.SIGKILL)

        previous = _request_stop_on_signals(self._stop_requests, force)
        try:
            sock = self._bind()
            forks = [(0.0, index) for index in range(self.workers)]  # (when, worker index): every one now, at first
            while not self._stop_requests:
                forks.extend(self._reap())
                now = time.monotonic()
                for due, index in sorted(forks):
                    if due <= now:
                        forks.remove((due, index))
                        self._spawn(index, sock)
                time.sleep(0.05)
            return self._stop_workers()
        finally:
            if self._sock is not None:  # bound here, or by bind()
                self._sock.close()
                self._sock = None
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def bind(self) -> Tuple[str, int]:
        """Bind the port now (else :meth:`run` does); return the bound ``(host, port)``.

        Raises :class:`OSError` when the address is taken or not ours.
        """
        return cast(Tuple[str, int], self._bind().getsockname()[:2])

    def _bind(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        host, port = self.address
        family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            if not self.reuse_port:
                sock.listen(self.backlog)
            # With SO_REUSEPORT this socket never listens: it only holds the port between worker restarts.
        except BaseException:
            sock.close()
            raise
        self.bound_address = sock.getsockname()[:2]
        self._sock = sock
        return sock

    def _spawn(self, index: int, sock: socket.socket) -> None:
        # What the caller printed before run() goes out now, once: a copy of an unflushed buffer would
        # otherwise sit in every worker, and the caller's own line only show at its exit (stdout a pipe).
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # closed, or replaced by an object without flush()
                stream.flush()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the supervisor's code
            status = 1
            try:
                status = self._worker(index, sock)
            except BaseException:
                logger.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(status)
        self._pids[pid] = index
        self._started[index] = time.monotonic()
        logger.info("worker %d started (pid %d)", index, pid)

    def _reap(self) -> List[Tuple[float, int]]:
        restarts = []
        while self._pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            index = self._pids.pop(pid, None)
            if index is None:
                continue
            lived = time.monotonic() - self._started[index]
            delay = self._delays.get(index, 0.0)
            delay = self.restart_delay if lived >= self.stable_after or not delay else min(
                delay * 2, self.max_restart_delay)
            self._delays[index] = delay
            how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"exit status {os.waitstatus_to_exitcode(status)}")
            logger.warning("worker %d (pid %d) died (%s) after %.1f s; restarting it in %.1f s",
                           index, pid, how, lived, delay)
            restarts.append((time.monotonic() + delay, index))
        return restarts

    def _stop_workers(self) -> int:
        logger.info("stopping %d worker(s): their connections close with 1001", len(self._pids))
        for pid in list(self._pids):
            with contextlib.suppress(OSError):  # gone already
                os.kill(pid, signal.SIGTERM)
        close_timeout = float(self.manager_options.get("close_timeout", DEFAULT_CLOSE_TIMEOUT))
        deadline = time.monotonic() + close_timeout + 5.0
        while self._pids and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self._pids.pop(pid, None)
            else:
                time.sleep(0.02)
        for pid in list(self._pids):  # stuck past every timeout of its own
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        self._pids.clear()
        return 1 if self._forced else 0

    def _worker(self, index: int, inherited: socket.socket) -> int:
        # Ctrl-C in a terminal reaches the whole process group: the supervisor alone answers it
        # (with a SIGTERM to each worker), so a worker never sees two stop signals for one Ctrl-C.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop_requests: List[int] = []
        signal.signal(signal.SIGTERM, lambda signum, frame: stop_requests.append(signum))
        if self.reuse_port:
            inherited.close()
            sock = socket.create_server(self.bound_address or self.address, family=inherited.family,
                                        backlog=self.backlog, reuse_port=True)
        else:
            sock = inherited
        manager = WebSocketManager(**self.manager_options)
        self.setup(manager, sock, index)  # if it raises, the worker exits with status 1: what it opened goes with it
        with manager:  # on the way out: close_all() (1001), a graceful stop, join()
            logger.info("worker %d (pid %d) serving", index, os.getpid())
            supervisor = os.getppid()
            while not stop_requests and manager.running:
                if os.getppid() != supervisor:  # the supervisor was killed: no one would ever stop us
                    logger.warning("worker %d: the supervisor is gone; stopping", index)
                    break
                time.sleep(0.1)
            logger.info("worker %d: closing %d connection(s) with 1001", index, len(manager))
        return 0


###############################################################################
# Command line: python -m wsmanager ###########################################
###############################################################################

_CHAT_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>wsmanager chat</title>
<style>body{font:15px system-ui,sans-serif;max-width:40em;margin:2em auto}#log{list-style:none;padding:0}
#log li{padding:.2em 0;border-bottom:1px solid #eee}#status{color:#666}</style></head>
<body><h1>wsmanager chat</h1><p id="status">connecting&hellip;</p>
<form id="form"><input id="text" autocomplete="off" size="40" autofocus> <button>Send</button></form>
<ul id="log"></ul>
<script>
"use strict";
// Every message sent on /ws is published to all peers, this page included.
const scheme = location.protocol === "https:" ? "wss://" : "ws://";
const ws = new WebSocket(scheme + location.host + "/ws");
const log = document.getElementById("log"), status = document.getElementById("status");
const text = document.getElementById("text");
ws.onopen = () => {
  status.textContent = "connected";
  // ?say=... sends one message on open: handy for scripted checks of the demo.
  const say = new URLSearchParams(location.search).get("say");
  if (say) ws.send(say);
};
ws.onmessage = (event) => {
  const li = log.appendChild(document.createElement("li"));
  li.className = "message";
  li.textContent = event.data;
};
ws.onclose = (event) => { status.textContent = "closed (" + event.code + ")"; };
document.getElementById("form").onsubmit = (event) => {
  event.preventDefault();
  if (text.value) ws.send(text.value);
  text.value = "";
};
</script></body></html>
"""


_CHAT_TOPIC = "chat"


class _ChatPeer(WebSocket):
    """A peer of the demo chat: whatever it says is published to every peer (all workers, with Redis)."""

    worker = ""  # "worker N: " in front of its log lines when the chat runs in worker processes

    def opened(self) -> None:
        manager = cast(WebSocketManager, self.manager)  # the one running this callback
        manager.subscribe(self, _CHAT_TOPIC)
        logger.info("%s%s connected (%d connected)", self.worker, _format_peer(self.peer_address), len(manager))

    def received_message(self, message: Union[str, bytes]) -> None:
        cast(WebSocketManager, self.manager).publish(_CHAT_TOPIC, message)

    def closed(self, code: int, reason: str) -> None:
        manager = self.manager
        count = len(manager) if manager is not None else 0
        logger.info("%s%s disconnected: %d%s (%d connected)", self.worker, _format_peer(self.peer_address), code,
                    f" {reason}" if reason else "", count)


def _chat_log_filter(record: Any) -> bool:
    """The chat logs each disconnection itself, with the peers left: the library's own line for a chat
    peer that failed (1006, 1007...) would say it twice, naming a class the user never wrote."""
    args = record.args
    return not (record.funcName == "_finalize" and isinstance(args, tuple) and args and isinstance(args[0], str)
                and args[0].startswith(f"{_ChatPeer.__name__} "))


def _format_peer(address: Any) -> str:
    if isinstance(address, tuple):
        return f"{_bracket(address[0])}:{address[1]}"
    return str(address or "unix socket")


class _EchoPeer(WebSocket):
    """The demo's ``/echo``: every message straight back to its sender (the target of ``python -m wsmanager load``)."""

    def received_message(self, message: Union[str, bytes]) -> None:
        self.send(message)


def _chat_handshake(request: Request, stats: Callable[[], Dict[str, Any]]) -> Optional[Response]:
    # Only the page, /stats and the sockets exist: this is a handshake hook, not a web server.
    path = request.path.split("?", 1)[0]
    if request.is_upgrade:
        return None if path in ("/ws", "/echo") else Response(404)
    if path == "/" and request.method in ("GET", "HEAD"):
        body = _CHAT_PAGE.encode() if request.method == "GET" else b""
        return Response(200, [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store")], body)
    if path == "/stats" and request.method == "GET":
        import json
        return Response(200, [("Content-Type", "application/json"), ("Cache-Control", "no-store")],
                        json.dumps(stats()).encode())
    return Response(404)


def _chat_setup(redis: Optional[str]) -> Callable[[WebSocketManager, socket.socket, int], None]:
    """The chat's set-up of one manager: for a :class:`Supervisor` worker, or index -1 for the only process."""

    def setup(manager: WebSocketManager, sock: socket.socket, index: int) -> None:
        logger.addFilter(_chat_log_filter)  # once: the same function is not added twice
        bridge = manager.bridge(redis) if redis else None

        def stats() -> Dict[str, Any]:
            import statistics  # here, not at import: /stats alone needs it
            # Which process answered: with workers, the kernel picks one per connection.
            # The latency is the heartbeat's round trip: connections not pinged yet are left out.
            latencies = [websocket.latency for websocket in manager if websocket.latency]
            median = statistics.median(latencies) if latencies else None
            return {"worker": index if index >= 0 else None, "pid": os.getpid(), "connections": len(manager),
                    "subscribers": manager.subscribers(_CHAT_TOPIC),
                    "latency": {"median": median, "measured": len(latencies)},
                    "redis": bridge.stats() if bridge is not None else None}

        def factory(*args: Any, **kwargs: Any) -> WebSocket:
            if kwargs.get("path", "").split("?", 1)[0] == "/echo":
                return _EchoPeer(*args, **kwargs)
            peer = _ChatPeer(*args, **kwargs)
            if index >= 0:
                peer.worker = f"worker {index}: "
            return peer

        # Browsers offer permessage-deflate, and chat text compresses well.
        manager.listen(sock, factory, handshake=lambda request: _chat_handshake(request, stats),
                       compression="deflate")

    return setup


def _raise_descriptor_limit() -> None:
    """Lift the soft RLIMIT_NOFILE to the hard limit: every connection is a descriptor, and the common
    soft default (1024) would cap the demo near a thousand peers. The command line's own process
    only: the library never changes a process limit."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # macOS reports an unlimited hard limit that setrlimit() refuses: try the largest that it takes.
    for wanted in (hard, 2 ** 20, 2 ** 16, 10240) if hard == resource.RLIM_INFINITY else (hard,):
        if soft != resource.RLIM_INFINITY and soft >= wanted:
            return
        with contextlib.suppress(ValueError, OSError):  # refused: try the next
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            return


def _fail(message: str, status: int) -> int:
    """Print the command line's one-line error to stderr; returns the exit status."""
    print(f"wsmanager: {message}", file=sys.stderr)
    return status


def _serve(args: Any) -> int:
    if args.redis:
        try:
            _parse_redis_url(args.redis)  # a bad URL fails here, in one line, not in every worker
        except ValueError as exc:
            return _fail(str(exc), 2)
    if args.workers > 1:
        return _serve_workers(args)
    try:
        sock = socket.create_server((args.host, args.port),
                                    family=socket.AF_INET6 if ":" in args.host else socket.AF_INET, backlog=1024)
    except OSError as exc:
        return _fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", 1)
    host, port = sock.getsockname()[:2]
    manager = WebSocketManager(heartbeat=args.heartbeat or None)
    _chat_setup(args.redis)(manager, sock, -1)
    logger.info("chat on http://%s:%d/ (WebSocket at /ws%s); Ctrl-C to stop", _bracket(host), port,
                f", relayed through {args.redis}" if args.redis else "")
    stop_requests: List[int] = []

    def force(signum: int) -> None:
        logger.warning("second Ctrl-C: forcing the exit (%d connection(s) dropped without a close handshake)",
                       len(manager))
        logging.shutdown()
        os._exit(1)

    _request_stop_on_signals(stop_requests, force)
    with manager:  # on the way out: close_all() (1001), a graceful stop, join()
        while not stop_requests and manager.running:
            time.sleep(0.2)
        logger.info("closing %d connection(s) with 1001 (Ctrl-C again to force the exit)", len(manager))
    return 0


def _serve_workers(args: Any) -> int:
    supervisor = Supervisor((args.host, args.port), _chat_setup(args.redis), workers=args.workers,
                            manager_options={"heartbeat": args.heartbeat or None})
    try:
        host, port = supervisor.bind()
    except OSError as exc:
        return _fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", 1)
    logger.info("chat on http://%s:%d/ (WebSocket at /ws, %d workers%s); Ctrl-C to stop", _bracket(host), port,
                args.workers, f", relayed through {args.redis}" if args.redis else "")
    if not args.redis:
        logger.warning("%d workers without --redis: each worker is a chat of its own (peers on different "
                       "workers do not see each other)", args.workers)
    return supervisor.run()


class _ConsolePeer(WebSocket):
    """The interactive client: prints what arrives, while the user types."""

    show_binary_as_hex = False
    interactive = False  # stdin and stdout are a terminal: print above the line being typed

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.done = threading.Event()

    def received_message(self, message: Union[str, bytes]) -> None:
        if isinstance(message, str):
            line = message
        elif self.show_binary_as_hex:
            line = message.hex()
        else:
            line = f"<binary message, {len(message)} bytes>"
        self._print(f"< {line}", sys.stdout)

    def closed(self, code: int, reason: str) -> None:
        self._print(f"connection closed: {code} {reason}".rstrip(), sys.stderr)
        self.done.set()

    def _print(self, line: str, stream: Any) -> None:
        """Print ``line``; on a terminal where the user is typing, above the half-typed line, not glued to it."""
        if self.interactive:
            # Save the cursor, open a line above the input line (scrolling if at the bottom), write
            # there, then put the cursor back where the user was typing: the same VT100 moves as
            # websockets' interactive client. The last "down" is a no-op when the screen scrolled.
            line = f"\x1b7\n\x1b[A\x1b[L{line}\n\x1b8\x1b[B"
        else:
            line += "\n"
        stream.write(line)
        stream.flush()


def _client_ssl_context(args: Any) -> Optional[ssl.SSLContext]:
    """The TLS context of the ``connect`` and ``load`` commands: None for ws://; --insecure verifies nothing."""
    if not args.url.lower().startswith("wss:"):
        return None
    context = ssl.create_default_context()
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _connect(args: Any) -> int:
    # The client prints its own lines, above the one being typed; the library's INFO lines (a stop's
    # summary) would land on that line. Warnings still show.
    logger.setLevel(logging.WARNING)
    context = _client_ssl_context(args)
    try:
        peer = connect(args.url, _ConsolePeer, timeout=args.timeout, ssl_context=context,
                       subprotocols=args.subprotocol or None, headers=args.header, origin=args.origin)
    except ValueError as exc:  # InvalidURL, or a header value that cannot be sent
        return _fail(str(exc), 2)
    except HandshakeError as exc:
        return _fail(f"handshake with {args.url} failed: {exc}", 1)
    except OSError as exc:
        # A plain server answers a ClientHello with HTTP (or closes): OpenSSL then reports a record it
        # cannot parse, an EOF or a reset, never what the user did wrong (a refused certificate says so).
        plain = context is not None and isinstance(exc, (ssl.SSLError, ConnectionResetError, socket.timeout))
        hint = " (is the server speaking TLS?)" if plain and not isinstance(exc, ssl.SSLCertVerificationError) else ""
        return _fail(f"cannot connect to {args.url}: {exc}{hint}", 1)
    peer.show_binary_as_hex = args.binary
    peer.interactive = sys.stdin.isatty() and sys.stdout.isatty()
    print(f"connected to {args.url}" + (f" ({peer.subprotocol})" if peer.subprotocol else ""), file=sys.stderr)
    manager = WebSocketManager()
    manager.start()
    manager.add(peer)

    def type_lines() -> None:
        with contextlib.suppress(ConnectionClosed, ValueError, OSError, EOFError):
            if peer.interactive:
                with contextlib.suppress(ImportError):
                    import readline  # noqa: F401  (line editing and history for input())
                while True:
                    peer.send(input("> "))
            else:
                for line in sys.stdin:
                    peer.send(line.rstrip("\r\n"))
        peer.done.set()

    # readline puts the terminal in raw mode while it reads; when the peer ends the session in
    # the middle of a line, input() never returns to undo that: the mode is restored here.
    terminal_mode: Optional[List[Any]] = None
    if peer.interactive:
        with contextlib.suppress(ImportError, OSError, ValueError):  # not POSIX, or stdin is no terminal
            import termios
            terminal_mode = termios.tcgetattr(sys.stdin.fileno())
    threading.Thread(target=type_lines, name="stdin", daemon=True).start()
    with contextlib.suppress(KeyboardInterrupt):
        peer.done.wait()
    peer.close(CloseCode.NORMAL)  # nothing once closing
    manager.stop(manager.close_timeout + 1)  # ends as soon as the close handshake has, else terminates
    manager.join()
    if terminal_mode is not None:
        with contextlib.suppress(OSError):
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, terminal_mode)
        # The input line ("> " and what was half typed) will never be read: erase it, so the shell's
        # prompt takes its place instead of following a stray "> " under "connection closed".
        sys.stdout.write("\r\x1b[K")
        sys.stdout.flush()
    return 0 if peer.close_code in (CloseCode.NORMAL, CloseCode.GOING_AWAY) else 1


class _LoadClient(WebSocket):
    """A client of ``python -m wsmanager load``: keeps ``--in-flight`` messages (1 by default) waiting
    for their answer, sending the next as each comes back (the run, ``_LoadRun``, is set on the class).

    A load generator must cost less CPU per message than the server it loads, or it measures itself.
    So while the answers are exactly the frames an echo sends back, a :class:`_LoadReader` reads the
    socket in the connection's place and matches them as raw bytes, and the next message goes to
    the socket as a frame masked in advance (a fresh random key each, RFC 6455 5.3), skipping the
    parser and the write queue. The first byte that is anything else (a ping, a close, a frame cut
    over two reads, another answer) goes to the connection's own parser, and so does every byte
    after it: the reader hands the socket back for good, so the parser never sees a stream with a
    hole in it. No internal of WebSocket is redefined (they are reserved): the reader is a handler
    of its own in the manager's selector, and what the socket does not take at once is queued
    through the connection's ``_Protocol`` (``send``, ``send_first``) for the connection's flush.
    """

    run: "_LoadRun"
    sent_at: Deque[float]  # when each message waiting for its answer went out, oldest first (echoes keep order)
    left = 0  # messages still to send (-1: until the run's duration is over)
    done = False
    raw = False  # messages sent as frames masked in advance: a plain socket, no compression

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.dialed = time.monotonic()  # made by manager.connect() as it is called

    def opened(self) -> None:
        self.raw = self.compression is None and not _is_tls(self.sock)
        # Not when the 101 came with bytes after it (fed to the parser once opened() returns).
        if self.raw and not self._extra and self._loop is not None:
            _LoadReader(self, self._loop)
        self.run.opened(self)

    def received_message(self, message: Union[str, bytes]) -> None:
        self.run.answered(self, message)

    def connect_failed(self, exc: BaseException) -> None:
        self.run.failed(exc)

    def closed(self, code: int, reason: str) -> None:
        self.raw = False
        self.run.closed(self, code)

    def send_raw(self, count: int) -> None:
        """Write ``count`` messages as frames masked in advance, each with a write of its own as a real
        client's sends would be (one write for them all would hand the server fewer, fuller reads than
        real clients cause): straight to the socket while nothing is queued before them, else (and what
        the socket does not take) queued; dropped once the connection closes (``closed()`` counts it).
        Loop thread only: it writes as the connection's driver does."""
        protocol, run = self._protocol, self.run
        masked, send = run.masked, self.sock.send
        # Deliberate: no lock (it costs the generator 5 % of its CPU). Only the loop thread, this one,
        # writes to the socket, so nothing interleaves with these writes; a frame another thread queues
        # meanwhile (close_all()'s close frame) is whole and goes after them, and the rest of a partial
        # write is queued before it (queue_raw). Nothing here touches ``out`` but through _Protocol.
        if protocol.state is _OPEN and not protocol.out:
            for after in range(count - 1, -1, -1):  # the messages still to write after this one
                frame = masked.pop() if masked else run.frame()
                try:
                    sent = send(frame)
                except OSError:  # full, or lost: the queue's flush tells which
                    sent = 0
                if sent != len(frame):
                    self.queue_raw(frame + b"".join([run.frame() for _ in range(after)]), sent)
                    return
            return
        self.queue_raw(b"".join([run.frame() for _ in range(count)]), 0)

    def queue_raw(self, frames: bytes, sent: int) -> None:
        """Queue what :meth:`send_raw` did not write (``sent`` bytes of ``frames`` went to the socket)."""
        protocol = self._protocol
        if sent:
            # The rest of a frame partly written: before anything another thread queued since (a close frame).
            protocol.send_first(frames[sent:])
            status = _FLUSH
        else:
            status = protocol.send(frames)
        loop = self._loop
        if status == _FLUSH and loop is not None:
            loop.schedule_flush(self)


class _LoadReader:
    """The selector's handler of a :class:`_LoadClient`'s socket while its answers are plain echoes.

    Registered in the client's place when it opens (plain socket, no compression); the client's
    own handler, the :class:`WebSocket`, is put back the first time a read is anything but whole
    answers (see :meth:`_to_parser`), or whenever the connection changes its events itself (a
    write waiting): from then on every byte goes through the parser. The loop calls
    ``_on_read`` (and, per the handler protocol, ``_on_write``, ``_finalize``, ``_finalized``)."""

    __slots__ = ("client", "loop", "run", "sock")

    def __init__(self, client: _LoadClient, loop: _Loop):
        self.client = client
        self.loop = loop
        self.run = client.run
        self.sock = client.sock
        loop.set_events(self.sock, selectors.EVENT_READ, self)  # the events the client has: read only

    @property
    def _finalized(self) -> bool:
        return self.client.terminated

    def _finalize(self, reason: str = "") -> None:
        self.client._finalize(reason)

    def _on_write(self) -> None:  # (never registered for writes: the client re-registers itself for those)
        self.client._on_write()

    def _on_read(self) -> None:
        run = self.run
        try:
            data = self.sock.recv(run.read_size)
        except _would_block():
            return
        except OSError as exc:
            self.client._finalize(f"connection lost: {exc}")
            return
        client = self.client
        sent_at = client.sent_at
        if data != run.answer or not sent_at:  # not the usual read, one whole answer
            self._answers(data)
            return
        now = time.monotonic()
        run.round_trips.append(now - sent_at.popleft())
        run.last_answer = now
        left = client.left
        if not left or not run.sending:
            run.send_next(client, 1, now)  # every answer in, or the duration over: it closes
            return
        # The next message, _LoadRun.send_next() inlined.
        if left > 0:
            client.left = left - 1
        sent_at.append(now)
        client.send_raw(1)

    def _answers(self, data: bytes) -> None:
        """A read that is not one whole answer: a few whole answers back to back (``--in-flight``) are
        counted here; anything else goes to the parser (EOF ends the connection)."""
        client, run = self.client, self.run
        sent_at = client.sent_at
        count, cut = divmod(len(data), len(run.answer))
        if not data:
            client._finalize("connection closed without a close frame")
        elif cut or not count or count > len(sent_at) or not run.answers.startswith(data):
            self._to_parser(data)  # more answers than questions included: the parser's path tells what
        else:
            now = time.monotonic()
            run.round_trips.extend([now - sent_at.popleft() for _ in range(count)])
            run.last_answer = now
            run.send_next(client, count, now)

    def _to_parser(self, data: bytes) -> None:
        """Give the socket back to the client, for good, and ``data`` to its parser."""
        client = self.client
        if not client.terminated:
            # Read only: a change of events re-registers the client itself, so while this reader
            # is registered the client's events are EVENT_READ alone.
            self.loop.set_events(self.sock, selectors.EVENT_READ, client)
        if client.state is not _CLOSED:  # (nothing is fed after a failure: RFC 6455 5.5.1)
            client._receive(data)


def _percentiles(values: Sequence[float]) -> Optional[Dict[str, float]]:
    """p50, p90, p99 and max of ``values`` (nearest rank), in milliseconds; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    # Nearest rank: the smallest value with at least p % of them at or below it (ceil(n * p / 100)).
    figures = {f"p{percent}": ordered[max(0, -(-len(ordered) * percent // 100) - 1)] for percent in (50, 90, 99)}
    figures["max"] = ordered[-1]
    return {name: round(value * 1000, 3) for name, value in figures.items()}


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, HandshakeError):
        return f"handshake {exc.status}" if exc.status is not None else "handshake: no valid answer"
    return f"connect: {type(exc).__name__}"


class _LoadRun:
    """What ``python -m wsmanager load`` measures; its callbacks run in the manager's loop thread."""

    def __init__(self, clients: int, messages: int, size: int, in_flight: int = 1, text: bool = False):
        self.clients = clients
        self.messages = messages
        self.in_flight = in_flight
        self.size = size
        self.payload: Union[str, bytes] = "x" * size if text else os.urandom(size)
        payload = self.payload.encode() if isinstance(self.payload, str) else self.payload
        opcode = Opcode.TEXT if text else Opcode.BINARY
        self.answer = encode_frame(opcode, payload)  # what an echo sends back, byte for byte
        self.answers = self.answer * in_flight
        # Deliberate: no bigger read than the answers awaited (a small buffer costs less than 64 KiB); more
        # input (a ping, a close) waits for the next loop turn, its socket still readable.
        self.read_size = min(len(self.answers), READ_SIZE)
        unmasked = encode_frame(opcode, payload, mask=b"\0\0\0\0")  # the frame with a key of zeros
        self.masked: List[bytes] = []  # frames of the payload masked in advance, each used once, last first
        self._batch = max(1, min(1024, (1 << 20) // len(unmasked)))  # about 1 MiB of them at a time
        # A whole frame masked as one integer XOR: the key times a constant with a 1 at the key's place
        # and every 32 bits over the payload (lanes that cannot carry into each other) puts the key in
        # its field and repeats it over the payload; cut to the frame's length.
        key_at = len(unmasked) - size - 4
        self._frame_int = int.from_bytes(unmasked, "little")
        self._key_lanes = int.from_bytes(bytes(key_at) + b"\1\0\0\0" * (1 + (size + 3) // 4), "little")
        self._frame_length = len(unmasked)
        self.connect_times: List[float] = []
        self.round_trips: List[float] = []
        self.errors: Dict[str, int] = collections.Counter()
        self.finished = 0  # clients done: all answers in, failed, or closed
        self.sending = True  # False once the duration is over: clients stop after their current message
        self.first_send = 0.0
        self.last_answer = 0.0

    def opened(self, client: _LoadClient) -> None:
        now = time.monotonic()
        self.connect_times.append(now - client.dialed)
        client.left = self.messages if self.messages > 0 else -1
        client.sent_at = collections.deque()
        if not self.first_send:
            self.first_send = now
        self.send_next(client, self.in_flight, now)

    def answered(self, client: _LoadClient, message: Union[str, bytes]) -> None:
        """An answer that came through the connection's parser (see :class:`_LoadClient`)."""
        now = time.monotonic()
        if message != self.payload or not client.sent_at:
            self.errors["answer differs from the message"] += 1
            client.done = True  # counted here, not again as closed early
            client.close(CloseCode.POLICY_VIOLATION)
            return
        self.round_trips.append(now - client.sent_at.popleft())
        self.last_answer = now
        self.send_next(client, 1, now)

    def send_next(self, client: _LoadClient, count: int, now: float) -> None:
        """After ``count`` answers (or at the start), send up to as many messages; close once all answers are in."""
        left = client.left
        if left == 0 or not self.sending:
            if not client.sent_at and not client.done:  # every answer is in
                client.done = True
                client.close()
            return
        if left > 0:
            count = min(count, left)
            client.left = left - count
        client.sent_at.extend([now] * count)
        if client.raw:
            client.send_raw(count)
        else:
            for _ in range(count):
                client.send(self.payload)

    def frame(self) -> bytes:
        """A frame of the payload masked with a key of its own: RFC 6455 5.3's unpredictable keys, drawn
        from the OS's entropy source in batches (one system call for a batch)."""
        masked = self.masked
        if not masked:
            batch, frame, lanes, length = self._batch, self._frame_int, self._key_lanes, self._frame_length
            bits = (1 << (8 * length)) - 1
            # Deliberate: a batch in one comprehension, not a call per message.
            masked.extend([(frame ^ key * lanes & bits).to_bytes(length, "little")
                           for key in struct.unpack(f"<{batch}I", os.urandom(4 * batch))])
        return masked.pop()

    def failed(self, exc: BaseException) -> None:
        self.errors[_error_kind(exc)] += 1
        self.finished += 1

    def closed(self, client: _LoadClient, code: int) -> None:
        if not client.done:
            self.errors[f"closed {code} before its last answer"] += 1
        self.finished += 1

    def report(self, url: str, elapsed: float, cpu: float, rate: float, not_finished: int) -> Dict[str, Any]:
        if not_finished:
            self.errors["no answer before the end of the run"] += not_finished
        span = self.last_answer - self.first_send
        return {
            "url": url, "clients": self.clients, "messages": self.messages, "size": len(self.payload),
            "in_flight": self.in_flight,
            "rate": rate or None, "connected": len(self.connect_times),
            "connect_ms": _percentiles(self.connect_times), "round_trip_ms": _percentiles(self.round_trips),
            "answered": len(self.round_trips),
            "messages_per_second": round(len(self.round_trips) / span, 1) if span > 0 else None,
            "megabytes_per_second": round(len(self.round_trips) * self.size / span / 1e6, 3) if span > 0 else None,
            "seconds": round(elapsed, 3), "cpu_seconds": round(cpu, 3),
            "errors": dict(sorted(self.errors.items())),
        }


def _print_load_report(report: Dict[str, Any]) -> None:
    def row(name: str, figures: Optional[Dict[str, float]]) -> str:
        if figures is None:
            return f"{name:<17}-"
        return f"{name:<17}" + "  ".join(f"{key} {value:,.2f}" for key, value in figures.items())

    errors = report["errors"]
    print(f"{report['clients']:,} clients x {report['messages']:,} messages of {report['size']:,} B "
          + (f"({report['in_flight']} in flight) " if report["in_flight"] > 1 else "") +
          f"to {report['url']} in {report['seconds']:.2f} s (this process: {report['cpu_seconds']:.2f} s of CPU)")
    print(f"{'connected':<17}{report['connected']:,} of {report['clients']:,}")
    print(row("connect (ms)", report["connect_ms"]))
    print(row("round trip (ms)", report["round_trip_ms"]))
    throughput = report["messages_per_second"]
    print(f"{'throughput':<17}" + (f"{throughput:,.0f} messages/s ({report['megabytes_per_second']:.2f} MB/s "
                                   f"each way), {report['answered']:,} answered" if throughput else "-"))
    print(f"{'errors':<17}" + (", ".join(f"{count:,} {kind}" for kind, count in errors.items()) or "none"))


def _load(args: Any) -> int:
    try:
        _client_target(args.url)
    except InvalidURL as exc:
        return _fail(str(exc), 2)
    context = _client_ssl_context(args)
    run = _LoadClient.run = _LoadRun(args.clients, args.messages, args.size, args.in_flight, args.text)
    stop_requests: List[int] = []
    _request_stop_on_signals(stop_requests, lambda signum: os._exit(1))
    progress = sys.stderr.isatty() and not args.json
    manager = WebSocketManager(handshake_timeout=args.timeout, max_message_size=max(args.size, DEFAULT_MAX_MESSAGE_SIZE))
    # Deliberate: no cyclic garbage collection while the clients run. It would cost the generator some
    # 5 % of its CPU (the young connections traversed again and again), and the message path makes no
    # reference cycles: what waits for a collection is bounded by the number of clients.
    import gc
    gc.disable()
    cpu_before = time.process_time()
    started = time.monotonic()
    dialed = 0
    last_progress = 0.0
    stalled_since = started
    seen = (-1, -1)
    with manager:
        while not stop_requests:
            now = time.monotonic()
            if args.duration and run.sending and now - started >= args.duration:
                run.sending = False  # each client ends after its current message
                stalled_since = now
            due = args.clients if not args.rate else min(args.clients, int((now - started) * args.rate) + 1)
            while dialed < due and not stop_requests:
                try:
                    manager.connect(args.url, _LoadClient, ssl_context=context, timeout=args.timeout)
                except (OSError, ValueError) as exc:  # out of descriptors, the name does not resolve
                    run.failed(exc)
                dialed += 1
            if run.finished >= args.clients:
                break
            progress_now = (len(run.round_trips), run.finished)
            if progress_now != seen:
                seen, stalled_since = progress_now, now
            elif dialed >= args.clients and now - stalled_since > args.timeout:
                break  # nothing moved for a whole timeout: the rest never answered
            if progress and now - last_progress >= 0.5:
                last_progress = now
                sys.stderr.write(f"\r{len(run.connect_times):,}/{args.clients:,} connected, "
                                 f"{len(run.round_trips):,} answers, {sum(run.errors.values()):,} errors ")
                sys.stderr.flush()
            time.sleep(0.01 if args.rate and dialed < args.clients else 0.05)
        not_finished = args.clients - run.finished
        elapsed = time.monotonic() - started
        manager.close_all(CloseCode.NORMAL)
    if progress:
        sys.stderr.write("\r\x1b[K")
    cpu = time.process_time() - cpu_before
    gc.enable()
    report = run.report(args.url, elapsed, cpu, args.rate, not_finished)
    if args.json:
        import json
        print(json.dumps(report))
    else:
        _print_load_report(report)
    return 1 if report["errors"] or stop_requests else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m wsmanager [serve|connect|load] ...``; returns the exit status."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:  # one line, not a usage dump
            self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def header(text: str) -> Tuple[str, str]:  # "invalid header value: 'X-Token'"
        name, colon, value = text.partition(":")
        if not colon or not _TOKEN.match(name.strip()):
            raise ValueError(f"not NAME:VALUE: {text!r}")
        return name.strip(), value.strip()

    def port(text: str) -> int:  # named for argparse's message: "invalid port value: '70000'"
        number = int(text)
        if not 0 <= number <= 65535:
            raise ValueError(f"port {number} out of range")
        return number

    def positive(text: str) -> int:
        number = int(text)
        if number < 1:
            raise ValueError(f"{number} < 1")
        return number

    def workers(text: str) -> int:  # positive, named for argparse's message: "invalid workers value: '0'"
        return positive(text)

    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = Parser(prog="python -m wsmanager", formatter_class=formatter,
                    description="wsmanager demo: a broadcast chat server, an interactive client and a load test.")
    parser.add_argument("--version", action="version", version=f"wsmanager {__version__}")
    commands = parser.add_subparsers(dest="command", parser_class=Parser)
    serve = commands.add_parser("serve", formatter_class=formatter,
                                help="run the broadcast chat (the default command)",
                                description="Serve a chat page at / (and /stats) and publish every message sent on /ws "
                                            "to every peer; /echo sends every message back to its sender.")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=port, default=9000, help="port to listen on")
    serve.add_argument("--workers", type=workers, default=1,
                       help="worker processes sharing the port (SO_REUSEPORT where the OS has it); a worker that "
                            "dies is restarted. Without --redis each worker is a chat of its own")
    serve.add_argument("--redis", metavar="URL", default=None,
                       help="relay the chat through Redis pub/sub (redis://[:password@]host:port/db or rediss://), "
                            "so that every worker and every host running it shares one chat")
    serve.add_argument("--heartbeat", type=float, default=20.0, metavar="SECONDS",
                       help="ping connections idle this long, and drop those that do not answer within as long "
                            "(0: never); /stats shows the median round trip")
    client = commands.add_parser("connect", formatter_class=formatter, help="an interactive client",
                                 description="Send typed lines as text messages and print what arrives.")
    client.add_argument("url", help="ws:// or wss:// URL")
    client.add_argument("--binary", action="store_true", help="print binary messages as hex")
    client.add_argument("--insecure", action="store_true", help="do not verify the server's TLS certificate")
    client.add_argument("--subprotocol", action="append", metavar="NAME", help="offer a subprotocol (repeatable)")
    client.add_argument("--header", action="append", type=header, metavar="NAME:VALUE",
                        help="send this header with the handshake (repeatable)")
    client.add_argument("--origin", help="send this Origin header")
    client.add_argument("--timeout", type=float, default=10.0, help="handshake timeout in seconds")
    load = commands.add_parser("load", formatter_class=formatter, help="a load test of a WebSocket echo server",
                               description="Open N clients (through one manager) at R per second; each sends M "
                                           "messages of B bytes, sending the next as each answer comes back "
                                           "(K in flight: 1 by default). "
                                           "Reports connect times and round trips (p50, p90, p99, max), "
                                           "throughput and errors by kind. Against `serve`, use its /echo.")
    load.add_argument("url", help="ws:// or wss:// URL of an echo endpoint")
    load.add_argument("--clients", type=positive, default=100, metavar="N", help="clients to open")
    load.add_argument("--rate", type=float, default=1000.0, metavar="R",
                      help="clients opened per second (0: all at once)")
    load.add_argument("--messages", type=int, default=100, metavar="M",
                      help="messages per client (0: until --duration is over)")
    load.add_argument("--size", type=int, default=32, metavar="B", help="bytes per message (binary unless --text)")
    load.add_argument("--text", action="store_true", help="send text messages (of B ASCII characters)")
    load.add_argument("--in-flight", type=positive, default=1, metavar="K",
                      help="messages each client keeps waiting for their answer")
    load.add_argument("--duration", type=float, default=0.0, metavar="S",
                      help="stop sending after S seconds (0: when every client has sent its messages)")
    load.add_argument("--timeout", type=float, default=10.0, metavar="T",
                      help="handshake timeout; the run also ends when nothing moved for this long")
    load.add_argument("--insecure", action="store_true", help="do not verify the server's TLS certificate")
    load.add_argument("--json", action="store_true", help="print the report as one JSON object (for CI)")
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] not in ("serve", "connect", "load", "-h", "--help", "--version"):
        arguments.insert(0, "serve")
    args = parser.parse_args(arguments)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    _raise_descriptor_limit()
    if args.command == "load":
        if args.messages < 0 or args.size < 0 or args.rate < 0 or args.duration < 0 or args.timeout <= 0:
            parser.error("--messages, --size, --rate and --duration must not be negative, --timeout above 0")
        if args.messages == 0 and not args.duration:
            parser.error("--messages 0 sends until --duration is over: give a --duration")
        return _load(args)
    return _serve(args) if args.command == "serve" else _connect(args)


if __name__ == "__main__":
    sys.exit(main())
