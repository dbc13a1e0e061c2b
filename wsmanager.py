"""wsmanager: thousands of WebSocket connections in one thread.

A single file with no dependencies but the Python standard library (3.9+):
a strict RFC 6455 frame codec, the opening handshakes of both sides, and a
manager loop over :mod:`selectors` that runs server and client connections,
plain or TLS, in one thread. Copy ``wsmanager.py`` into your tree or
``pip install wsmanager``.

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

Layers, bottom up, each usable alone: the codec (:class:`FrameParser`,
:func:`encode_frame`, :class:`MessageAssembler`, close payloads,
permessage-deflate in :class:`PerMessageDeflate`), the
handshake (pure functions over bytes), the connection (:class:`WebSocket`)
and the manager (:class:`WebSocketManager`, :func:`connect`).
Run ``python -m wsmanager --help`` for the demo chat server and client.
"""

__version__ = "0.1.0"
__license__ = "MIT"

__all__ = [
    # constants and enums
    "Opcode", "CloseCode", "State", "DEFAULT_MAX_FRAME_SIZE", "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_BUFFERED", "MAX_HEAD_SIZE", "MAX_HEADER_LINES",
    # exceptions
    "WebSocketError", "ProtocolError", "HandshakeError", "ConnectionClosed",
    # codec
    "Frame", "Close", "apply_mask", "encode_frame", "FrameParser", "MessageAssembler",
    "encode_close", "parse_close", "Deflate", "DeflateParams", "PerMessageDeflate",
    # handshake
    "Headers", "Request", "Response", "HeadReader", "accept_key", "new_key",
    "build_request", "parse_request", "validate_request", "build_response", "encode_response",
    "parse_response", "validate_response", "parse_extensions", "negotiate_deflate", "deflate_offer",
    "accept_deflate_response",
    # connection and manager
    "WebSocket", "WebSocketManager", "connect",
]

import base64
import codecs
import collections
import contextlib
import enum
import errno
import hashlib
import heapq
import logging
import os
import re
import selectors
import socket
import ssl
import struct
import sys
import threading
import time
import types
import urllib.parse
import zlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

logger = logging.getLogger("wsmanager")


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

DEFAULT_MAX_FRAME_SIZE = 2 ** 20
DEFAULT_MAX_MESSAGE_SIZE = 2 ** 20
DEFAULT_MAX_BUFFERED = 4 * 2 ** 20
MAX_HEAD_SIZE = 16 * 1024
MAX_HEADER_LINES = 100
DEFAULT_CLOSE_TIMEOUT = 5.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
READ_SIZE = 64 * 1024  # bytes read per readiness event: bounds what one peer gets per loop turn
COALESCE_SIZE = 64 * 1024  # small frames queued back to back share one buffer (and one send) up to this
WRITES_PER_FLUSH = 16  # socket writes per connection per loop turn, so one fast reader cannot hog the loop
ACCEPT_BATCH = 64  # connections accepted per readiness event of a listener
ACCEPT_BACKOFF = 0.5  # seconds a listener rests after EMFILE/ENFILE

CONTROL_OPCODES = frozenset({Opcode.CLOSE, Opcode.PING, Opcode.PONG})
# A set makes `code in ...` fast. RFC 6455 7.4.2: 1004-1006 and 1015 must never be sent.
VALID_CLOSE_CODES = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015)) | frozenset(range(3000, 5000))

# RFC 6455 1.3: the GUID concatenated to Sec-WebSocket-Key.
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


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
    ``headers`` the extra headers to send. On the client side ``status`` is
    what the server answered (``None`` when its response was malformed) and
    ``response`` the parsed :class:`Response`, if any.
    """

    def __init__(self, message: str, status: Optional[int] = 400,
                 headers: Sequence[Tuple[str, str]] = (), response: "Optional[Response]" = None):
        super().__init__(message)
        self.status = status
        self.headers = list(headers)
        self.response = response


class ConnectionClosed(WebSocketError):
    """The connection is closing or closed: nothing more can be sent."""


###############################################################################
# Codec: masking, frames, close payloads, UTF-8 ###############################
###############################################################################

class Frame(NamedTuple):
    """One WebSocket frame, payload unmasked."""

    opcode: Opcode
    payload: bytes
    fin: bool = True
    rsv1: bool = False
    rsv2: bool = False
    rsv3: bool = False


class Close(NamedTuple):
    """A parsed close frame: ``code`` is 1005 when the frame carried none."""

    code: int
    reason: str


# One XOR table per key byte, for bytes.translate: 64 KiB built once.
_XOR_TABLES = [bytes(b ^ k for b in range(256)) for k in range(256)]
_TRANSLATE_THRESHOLD = 512  # below it one big-int XOR is faster; above, four strided translates


def apply_mask(data: bytes, key: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``key`` repeated (RFC 6455 5.3); masking and unmasking alike."""
    n = len(data)
    if n < _TRANSLATE_THRESHOLD:
        if not n:
            return b""
        # Deliberate: one arbitrary-precision XOR runs in C over the whole payload.
        repeated = (key * ((n + 3) >> 2))[:n]
        return (int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")).to_bytes(n, "little")
    # Deliberate: each of the four byte lanes is translated through its XOR table in C, in
    # place in one bytearray copy (strided slices of a bytearray are much faster than of bytes).
    out = bytearray(data)
    tables = _XOR_TABLES
    out[0::4] = out[0::4].translate(tables[key[0]])
    out[1::4] = out[1::4].translate(tables[key[1]])
    out[2::4] = out[2::4].translate(tables[key[2]])
    out[3::4] = out[3::4].translate(tables[key[3]])
    return bytes(out)


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


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True,
                 mask: Union[bool, bytes] = False, rsv1: bool = False) -> bytes:
    """Serialize one frame.

    ``mask=True`` draws a fresh random key (clients must mask, RFC 6455 5.3);
    ``mask=b"abcd"`` uses the given key. Raises :class:`ValueError` for an
    unknown opcode or a control frame that is fragmented or over 125 bytes.
    """
    n = len(payload)
    if n < 126 and fin and not mask and not rsv1 and 0 <= opcode <= 2:
        return _SHORT_HEADERS[opcode][n] + payload  # deliberate: the common server frame, one concat
    if opcode >= 8 and (n > 125 or not fin):
        if opcode not in CONTROL_OPCODES:
            raise ValueError(f"unknown opcode {opcode}")
        raise ValueError("control frames must be final and carry at most 125 bytes")
    if opcode not in _OPCODES_BY_VALUE:
        raise ValueError(f"unknown opcode {opcode}")
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
    if allow_rsv1 and first & 0x70 == 0x40 and _OPCODE_LIST[first & 0x0F] is not None:
        return ProtocolError(CloseCode.PROTOCOL_ERROR, "RSV1 set on a continuation or control frame")
    if first & 0x70:
        return ProtocolError(CloseCode.PROTOCOL_ERROR, "reserved bits set without a negotiated extension")
    return ProtocolError(CloseCode.PROTOCOL_ERROR, f"reserved opcode {first & 0x0F}")


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

    def feed(self, data: bytes) -> List[Frame]:
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
                    payload = apply_mask(data[start + 4:stop], key) if length else b""
                else:
                    stop = start + length
                    if stop > end:
                        break
                    payload = bytes(data[start:stop]) if type(data) is not bytes else data[start:stop]
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
        header = self._header_length(buf)
        if header is None:
            return None
        length = buf[1] & 0x7F
        if length == 126:
            length = (buf[2] << 8) | buf[3]
        elif length == 127:
            length = int.from_bytes(buf[2:10], "big")
        return _OPCODE_LIST[buf[0] & 0x0F], length

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
        chunk = buf[start:]
        self._peeked += len(chunk)
        if self.expect_masked and chunk:
            rotation = (start - header) & 3
            key = buf[header - 4:header]
            chunk = apply_mask(chunk, key[rotation:] + key[:rotation])
        return bytes(chunk)

    def _header_length(self, buf: bytes) -> Optional[int]:
        if len(buf) < 2:
            return None
        length = buf[1] & 0x7F
        header = 2 + (4 if self.expect_masked else 0) + (2 if length == 126 else 8 if length == 127 else 0)
        return header if len(buf) >= header else None


def _utf8_prefix_invalid(pending: bytes) -> bool:
    # CPython's incremental decoder rejects every invalid prefix at once except
    # ED A0..BF, the start of a UTF-16 surrogate: catch that one here to fail fast.
    return len(pending) >= 2 and pending[0] == 0xED and pending[1] >= 0xA0


_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


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
                return Close(*parse_close(payload))
            return frame
        if opcode:
            if self._opcode is not None:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "new message started inside a fragmented message")
            if frame.rsv1:
                return self._inflate(frame)
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
            return self._inflate(frame)
        buffer = self._buffer
        size = len(buffer) + len(payload)
        if size > self.max_message_size:
            raise self._too_big(size)
        decoder = self._decoder
        if decoder is not None:
            # Validated fragment by fragment (fail fast); decoded once, whole, at the end.
            try:
                decoder.decode(payload, frame.fin)
            except UnicodeDecodeError:
                raise ProtocolError(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message") from None
            if not frame.fin and _utf8_prefix_invalid(decoder.getstate()[0]):
                raise ProtocolError(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message")
        buffer += payload
        if not frame.fin:
            return None
        self._buffer = bytearray()
        self._opcode = self._decoder = None
        return buffer.decode() if decoder is not None else bytes(buffer)

    def _inflate(self, frame: Frame) -> Union[str, bytes, None]:
        # A frame of a compressed message (RFC 7692 6.2): inflated at most up to the limit,
        # so a small frame that would inflate to gigabytes fails with 1009 having held 1 byte
        # more than max_message_size, at most.
        deflate = self.deflate
        if deflate is None:
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "reserved bits set without a negotiated extension")
        opcode = frame.opcode
        buffer = self._buffer
        limit = self.max_message_size - len(buffer)
        data = deflate.decompress(frame.payload, frame.fin, limit)
        if len(data) > limit:
            raise self._too_big(len(buffer) + len(data))
        if opcode:
            if frame.fin:  # the whole message in one frame: the common case
                if opcode == _TEXT:
                    try:
                        return data.decode()
                    except UnicodeDecodeError:
                        raise ProtocolError(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message") from None
                return data
            self._opcode = opcode
            self._compressed = True
            self._decoder = _Utf8Decoder() if opcode == _TEXT else None
        decoder = self._decoder
        if decoder is not None:
            try:
                decoder.decode(data, frame.fin)
            except UnicodeDecodeError:
                raise ProtocolError(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message") from None
            if not frame.fin and _utf8_prefix_invalid(decoder.getstate()[0]):
                raise ProtocolError(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message")
        if not frame.fin:
            buffer += data
            return None
        self._opcode = self._decoder = None
        self._compressed = False
        if buffer:
            self._buffer = bytearray()
            buffer += data
            data = bytes(buffer)
        return data.decode() if decoder is not None else data  # validated above: decoding cannot fail

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
        try:
            decoder.decode(chunk, False)
        except UnicodeDecodeError:
            raise ProtocolError(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message") from None
        if _utf8_prefix_invalid(decoder.getstate()[0]):
            raise ProtocolError(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message")

    def _too_big(self, size: int) -> ProtocolError:
        return ProtocolError(CloseCode.MESSAGE_TOO_BIG,
                             f"message of {size} bytes exceeds the limit of {self.max_message_size}")


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


def parse_close(payload: bytes) -> Tuple[int, str]:
    """``(code, reason)`` from a close frame payload; ``(1005, "")`` when empty.

    Raises :class:`ProtocolError` 1002 for a 1-byte payload or an invalid
    code, 1007 for a reason that is not UTF-8.
    """
    if not payload:
        return CloseCode.NO_STATUS, ""
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
    return code, reason


# permessage-deflate (RFC 7692) -------------------------------------------------

# RFC 7692 7.2.1: a message is compressed with a sync flush, and these 4 bytes that end it are
# removed before sending; the receiver appends them again before inflating (7.2.2).
_DEFLATE_TAIL = b"\x00\x00\xff\xff"


class Deflate(NamedTuple):
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
    """

    server_no_context_takeover: bool = True
    client_no_context_takeover: bool = True
    server_max_window_bits: int = 15
    client_max_window_bits: int = 12
    level: int = 6
    mem_level: int = 8


class DeflateParams(NamedTuple):
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


# Compressors of messages sent without context takeover, one per thread and setting: each
# message ends with a full flush, which resets the compressor, so its output never refers
# to an earlier message and the same compressor serves every connection of that thread.
_thread_compressors = threading.local()


def _shared_compressor(key: Tuple[int, int, int]) -> Any:
    try:
        compressors = _thread_compressors.compressors
    except AttributeError:
        compressors = _thread_compressors.compressors = {}
    compressor = compressors.get(key)
    if compressor is None:
        wbits, level, mem_level = key
        compressor = compressors[key] = zlib.compressobj(level, zlib.DEFLATED, -wbits, mem_level)
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

    def __init__(self, params: DeflateParams, *, client: bool, level: int = 6, mem_level: int = 8):
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
        if self._send_wbits < 9:
            raise ValueError("zlib cannot compress with a window of 8 bits")
        self._level = level
        self._mem_level = mem_level
        # Messages that share this key compress to the same bytes: a broadcast compresses once.
        self.send_key: Optional[Tuple[int, int, int]] = None if send_keep else (self._send_wbits, level, mem_level)
        self.lock: Optional[threading.Lock] = threading.Lock() if send_keep else None
        self._compressor: Any = None
        self._decompressor: Any = None

    def compress(self, data: bytes) -> bytes:
        """The payload of a compressed message (sent with RSV1 on its first frame)."""
        key = self.send_key
        if key is not None:
            compressor = _shared_compressor(key)
            try:
                data = compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)
            except BaseException:
                del _thread_compressors.compressors[key]  # half used: its next output would be wrong
                raise
        else:
            compressor = self._compressor
            if compressor is None:
                compressor = self._compressor = zlib.compressobj(
                    self._level, zlib.DEFLATED, -self._send_wbits, self._mem_level)
            data = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
        return data[:-4]  # RFC 7692 7.2.1: remove the 00 00 ff ff tail

    def compress_fragments(self, chunks: Sequence[bytes]) -> List[bytes]:
        """Payloads of one compressed message sent in several frames, one per chunk."""
        key = self.send_key
        compressor = _shared_compressor(key) if key is not None else self._compressor
        if compressor is None:
            compressor = self._compressor = zlib.compressobj(
                self._level, zlib.DEFLATED, -self._send_wbits, self._mem_level)
        payloads = []
        try:
            for chunk in chunks[:-1]:
                # A sync flush per fragment: each frame carries whole deflate blocks.
                payloads.append(compressor.compress(chunk) + compressor.flush(zlib.Z_SYNC_FLUSH))
            last = compressor.compress(chunks[-1]) + compressor.flush(
                zlib.Z_FULL_FLUSH if key is not None else zlib.Z_SYNC_FLUSH)
        except BaseException:
            if key is not None:
                del _thread_compressors.compressors[key]
            raise
        payloads.append(last[:-4])
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
        if decompressor.eof:
            # The peer ended its deflate stream (a BFINAL block, RFC 7692 7.2.3.3): anything after it
            # but our tail is garbage, and the next message starts a new stream.
            if decompressor.unused_data not in (b"", _DEFLATE_TAIL):
                raise ProtocolError(CloseCode.INVALID_DATA, "data after the end of the compressed stream")
            if final:
                self._decompressor = None
        if final and not self._recv_keep:
            self._decompressor = None
        return out


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
        self._items.append((name, value))
        self._index.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """The field's value; repeated fields are joined with ", " (RFC 7230 3.2.2)."""
        values = self._index.get(name.lower())
        return ", ".join(values) if values else default

    def get_all(self, name: str) -> List[str]:
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


class Request(NamedTuple):
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
        return self.headers.get("Origin")


class Response(NamedTuple):
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


def _tokens(value: Optional[str]) -> set:
    return {token.lower() for token in _token_list(value)}


def accept_key(key: Union[str, bytes]) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2 step 5.4)."""
    if isinstance(key, str):
        key = key.encode("ascii")
    return base64.b64encode(hashlib.sha1(key + _ACCEPT_GUID).digest()).decode("ascii")


def new_key() -> str:
    """A fresh Sec-WebSocket-Key: base64 of 16 random bytes."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_FORBIDDEN_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _header_lines(headers: Iterable[Tuple[str, str]]) -> str:
    lines = []
    for name, value in headers:
        if not _TOKEN.match(name) or _FORBIDDEN_IN_VALUE.search(value):
            raise ValueError(f"invalid header field {name!r}: {value!r}")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)


class HeadReader:
    """Collects an HTTP head incrementally, bounded in size and lines.

    ``feed(data)`` returns ``None`` until the blank line that ends the head
    has arrived, then ``(head, rest)``: ``rest`` is what followed the head in
    the same input (the first WebSocket bytes) and must not be lost. Raises
    :class:`HandshakeError` 431 past ``max_size`` bytes or ``max_lines``
    header lines. Work is linear in the bytes fed.
    """

    __slots__ = ("max_size", "max_lines", "_buffer", "_scanned", "_lines")

    def __init__(self, max_size: int = MAX_HEAD_SIZE, max_lines: int = MAX_HEADER_LINES):
        self.max_size = max_size
        self.max_lines = max_lines
        self._buffer = bytearray()
        self._scanned = 0
        self._lines = 0

    def feed(self, data: bytes) -> Optional[Tuple[bytes, bytes]]:
        buf = self._buffer
        buf += data
        start = max(0, self._scanned - 2)
        # RFC 7230 3.5: a recipient MAY accept a bare LF as a line terminator.
        ends = [i for i in (buf.find(b"\n\r\n", start), buf.find(b"\n\n", start)) if i >= 0]
        if ends:
            end = min(ends)
            end += 3 if buf[end + 1] == 0x0D else 2
        else:
            end = len(buf)
        self._lines += buf.count(b"\n", self._scanned, end)
        self._scanned = end
        # The request line and the blank line are not header lines.
        if end > self.max_size or self._lines > self.max_lines + (2 if ends else 1):
            raise HandshakeError("request head too large", 431)
        if not ends:
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
        headers.add(name_text, value_text)
    return start, headers


_HTTP_VERSION = re.compile(r"HTTP/(\d)\.(\d)\Z")


def parse_request(head: bytes) -> Request:
    """Parse a request head (as returned by :class:`HeadReader`); syntax only.

    Raises :class:`HandshakeError` 400 when malformed, 505 for a version
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
        raise HandshakeError("request target must be a path", 400)
    return Request(method, path, version, headers)


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
    upgrade_headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13")]
    if not request.is_upgrade or "upgrade" not in _tokens(headers.get("Connection")):
        raise HandshakeError("not a WebSocket upgrade request", 426, upgrade_headers)
    if headers.get("Sec-WebSocket-Version") != "13":
        raise HandshakeError("unsupported Sec-WebSocket-Version", 426, upgrade_headers)
    if not headers.get("Host"):
        raise HandshakeError("missing Host header", 400)
    key = headers.get("Sec-WebSocket-Key", "")
    try:
        valid_key = len(key) == 24 and len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        valid_key = False
    if not valid_key:
        raise HandshakeError("invalid Sec-WebSocket-Key", 400)
    return key


def build_response(key: str, subprotocol: Optional[str] = None,
                   headers: Iterable[Tuple[str, str]] = ()) -> bytes:
    """The 101 Switching Protocols response for a validated request's key."""
    fields = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept_key(key))]
    if subprotocol:
        fields.append(("Sec-WebSocket-Protocol", subprotocol))
    fields.extend(headers)
    return f"HTTP/1.1 101 Switching Protocols\r\n{_header_lines(fields)}\r\n".encode("latin-1")


_REASON_PHRASES = {
    101: "Switching Protocols", 200: "OK", 204: "No Content", 301: "Moved Permanently", 302: "Found",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    426: "Upgrade Required", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}


def encode_response(response: Response) -> bytes:
    """Serialize a plain HTTP response (errors, or a page) that ends the connection."""
    status = response.status
    reason = response.reason or _REASON_PHRASES.get(status, "Unknown")
    body = response.body
    fields = list(response.headers)
    names = {name.lower() for name, _ in fields}
    if not body and status >= 400:
        body = f"{status} {reason}\n".encode()
    if "content-type" not in names:
        fields.append(("Content-Type", "text/plain; charset=utf-8"))
    fields.append(("Content-Length", str(len(body))))
    fields.append(("Connection", "close"))
    return f"HTTP/1.1 {status} {reason}\r\n{_header_lines(fields)}\r\n".encode("latin-1") + body


def build_request(host: str, path: str, key: str, *, subprotocols: Optional[Sequence[str]] = None,
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
    if headers:
        fields.extend(headers)
    return f"GET {path} HTTP/1.1\r\n{_header_lines(fields)}\r\n".encode("latin-1")


def parse_response(head: bytes) -> Response:
    """Parse a response head; raises :class:`HandshakeError` (status None) when malformed."""
    try:
        start, headers = _parse_head(head)
    except HandshakeError as exc:
        raise HandshakeError(f"malformed response: {exc}", None) from None
    version, _, rest = start.partition(" ")
    status_text, _, reason = rest.partition(" ")
    if not _HTTP_VERSION.match(version) or len(status_text) != 3 or not status_text.isdigit():
        raise HandshakeError(f"malformed status line {start[:80]!r}", None)
    return Response(int(status_text), headers, b"", reason)


def validate_response(response: Response, key: str, subprotocols: Optional[Sequence[str]] = None,
                      compression: Union[None, str, Deflate] = None) -> Optional[str]:
    """Check a server's answer to our handshake (RFC 6455 4.1); return the subprotocol it chose.

    ``compression`` is what the request offered (see :func:`deflate_offer`):
    an extension in the answer is accepted only if it is that one, with
    parameters RFC 7692 allows (:func:`accept_deflate_response`). Raises
    :class:`HandshakeError` whose ``status`` is the server's.
    """
    status = response.status
    headers = response.headers
    if status != 101:
        raise HandshakeError(f"server answered {status} {response.reason}".rstrip(), status, response=response)

    def fail(message: str) -> HandshakeError:
        return HandshakeError(message, status, response=response)

    if not isinstance(headers, Headers):
        headers = Headers(headers)
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
            accept_deflate_response(extensions, settings)
        except ValueError as exc:
            raise fail(str(exc)) from None
    chosen = headers.get("Sec-WebSocket-Protocol")
    if chosen is not None and chosen not in (subprotocols or ()):
        raise fail(f"server chose subprotocol {chosen!r} that was not offered")
    return chosen


# Sec-WebSocket-Extensions and permessage-deflate negotiation (RFC 7692 7.1) ---

_EXTENSION_PARAM = re.compile(r'\s*([^\s=;"]+)\s*(?:=\s*(?:"([^"]*)"|([^\s";]*)))?\s*\Z')
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
        if match is None or not _TOKEN.match(match.group(1)):
            raise ValueError(f"malformed extension parameter {raw.strip()[:60]!r}")
        value = match.group(2) if match.group(2) is not None else match.group(3)
        # RFC 6455 9.1: a quoted value must still be a token once unquoted.
        if value is not None and not _TOKEN.match(value):
            raise ValueError(f"malformed extension parameter {raw.strip()[:60]!r}")
        params.append((match.group(1), value))
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
    parts = ["permessage-deflate"]
    for name, value in params:
        parts.append(name if value is True else f"{name}={value}")
    return "; ".join(parts)


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


def deflate_offer(settings: Union[str, Deflate] = "deflate") -> str:
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


def accept_deflate_response(value: Optional[str], settings: Union[str, Deflate] = "deflate") -> Optional[DeflateParams]:
    """The client side of RFC 7692 negotiation: check the server's answer to :func:`deflate_offer`.

    Returns the agreed :class:`DeflateParams`, or ``None`` when the server
    declined (no Sec-WebSocket-Extensions). Raises :class:`ValueError` when
    the answer is malformed or not allowed by the offer; the client must
    then fail the handshake (RFC 7692 5).
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
    client_bits = answer.get("client_max_window_bits", deflate.client_max_window_bits)
    if client_bits > deflate.client_max_window_bits:
        raise ValueError(f"client_max_window_bits {client_bits} exceeds the {deflate.client_max_window_bits} offered")
    if client_bits < 9:
        raise ValueError("client_max_window_bits 8 is not supported (zlib cannot compress with 8)")
    return DeflateParams(server_no_context, client_no_context, server_bits, client_bits)


###############################################################################
# WebSocket: one connection ###################################################
###############################################################################

# h11-style transition table: (state, event) -> next state. An event missing
# for a state is ignored (e.g. a second close() while closing).
_TRANSITIONS = {
    (State.CONNECTING, "send_close"): State.CLOSING,  # close() before add(): sent once running
    (State.CONNECTING, "fail"): State.CLOSED,
    (State.OPEN, "send_close"): State.CLOSING,  # close(): our close frame queued, waiting for the peer's
    (State.OPEN, "receive_close"): State.CLOSED,  # peer closed first: echo queued
    (State.OPEN, "fail"): State.CLOSED,  # protocol violation / internal error: error close queued
    (State.CLOSING, "receive_close"): State.CLOSED,  # close handshake complete
    (State.CLOSING, "fail"): State.CLOSED,
}


def _data_frame(message: Union[str, bytes, bytearray, memoryview]) -> Tuple[Opcode, bytes]:
    if isinstance(message, str):
        return _TEXT, message.encode()
    if isinstance(message, (bytes, bytearray, memoryview)):
        return _BINARY, message
    raise TypeError(f"cannot send {type(message).__name__}: str, bytes or an iterable of them")


class WebSocket:
    """One WebSocket connection, server or client side.

    Subclass it and override the callbacks :meth:`opened`,
    :meth:`received_message`, :meth:`ponged` and :meth:`closed`; they run
    in the manager's loop thread. The actions :meth:`send`, :meth:`ping`,
    :meth:`close` and :meth:`terminate` may be called from any thread.

    Instances are made by :meth:`WebSocketManager.listen`, :func:`connect`
    and :meth:`WebSocketManager.accept`, and run once given to
    :meth:`WebSocketManager.add`. Limits left ``None`` take the manager's.
    """

    __slots__ = (
        "sock", "client", "peer_address", "path", "_request_headers", "_response_headers", "subprotocol",
        "close_code", "close_reason", "max_buffered", "max_message_size", "max_frame_size", "close_timeout",
        "state", "_parser", "_assembler", "_lock", "_out", "_buffered", "_scheduled", "_writing",
        "_manager", "_fd", "_extra", "_received_close", "_failure", "_finalized", "_timer", "_listener",
        "_last_seen", "_ping_sent", "_shut_down", "_tls", "_deflate", "__dict__", "__weakref__",
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
        self.max_buffered: Optional[int] = None
        self.max_message_size: Optional[int] = None
        self.max_frame_size: Optional[int] = None
        self.close_timeout: Optional[float] = None
        self.state = _CONNECTING
        self._parser: Any = None
        self._assembler: Any = None
        self._lock = threading.Lock()
        self._out: List[bytes] = []  # encoded frames waiting for the socket, in send() order
        self._buffered = 0
        self._scheduled = False  # a flush is due (queued to the manager, or waiting for EVENT_WRITE)
        self._writing = False  # registered for EVENT_WRITE
        self._manager: Any = None
        self._fd = sock.fileno()
        self._extra = extra_data  # bytes read along with the handshake: the first frames
        self._received_close: Optional[Close] = None
        self._failure: Optional[Tuple[int, str]] = None
        self._finalized = False
        self._timer: Any = None  # the close/linger deadline
        self._listener: Any = None
        self._last_seen = 0.0
        self._ping_sent = 0.0  # when the heartbeat ping went out; 0 when none is outstanding
        self._shut_down = False
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._deflate: Optional[PerMessageDeflate] = None  # set when permessage-deflate was negotiated

    # Callbacks ---------------------------------------------------------------

    def opened(self) -> None:
        """Called once, in the loop, before any message is delivered."""

    def received_message(self, message: Union[str, bytes]) -> None:
        """Called for each complete message: ``str`` for text, ``bytes`` for binary."""

    def ponged(self, payload: bytes) -> None:
        """Called for each pong received."""

    def closed(self, code: int, reason: str) -> None:
        """Called exactly once when the connection is over and its socket closed.

        ``code`` is the peer's close code (1005 if its close frame had
        none), the code we failed the connection with, or 1006 when no close
        frame was exchanged (peer vanished, timeout, slow consumer, stop).
        """

    # Actions -----------------------------------------------------------------

    def send(self, message: Union[str, bytes, bytearray, memoryview, Iterable[Union[str, bytes]]]) -> None:
        """Queue a message: ``str`` as text, bytes-like as binary, an iterable of
        chunks (all ``str`` or all bytes-like) as one fragmented message.

        Raises :class:`ConnectionClosed` once closing. When the queue would
        exceed ``max_buffered`` the connection is dropped as a slow consumer.
        With permessage-deflate negotiated, every message is compressed.
        """
        if self._deflate is not None:
            self._send_compressed(message)
            return
        kind = type(message)
        if kind is str:  # deliberate: exact-type fast paths for the common cases
            data = encode_frame(_TEXT, message.encode(), mask=self.client)
        elif kind is bytes:
            data = encode_frame(_BINARY, message, mask=self.client)
        elif isinstance(message, (str, bytes, bytearray, memoryview)):
            opcode, payload = _data_frame(message)
            data = encode_frame(opcode, payload, mask=self.client)
        else:
            data = self._encode_fragments(message)
            if not data:
                return
        if not self._queue(data):
            raise ConnectionClosed(f"cannot send: connection is {self.state.name}")

    def _encode_fragments(self, chunks: Iterable[Any]) -> bytes:
        # Encoded up front and queued as one piece, so that no other message
        # can slip between the fragments of this one.
        frames = []
        opcode: Optional[Opcode] = None
        previous: Any = None
        for chunk in chunks:
            chunk_opcode, payload = _data_frame(chunk)
            if opcode is None:
                opcode = chunk_opcode
            elif chunk_opcode is not opcode:
                raise TypeError("fragments of one message must be all str or all bytes-like")
            else:
                frames.append(encode_frame(_CONTINUATION if frames else opcode, previous,
                                           fin=False, mask=self.client))
            previous = payload
        if opcode is None:
            return b""
        frames.append(encode_frame(_CONTINUATION if frames else opcode, previous, mask=self.client))
        return b"".join(frames)

    def _send_compressed(self, message: Any) -> None:
        if isinstance(message, (str, bytes, bytearray, memoryview)):
            opcode, payload = _data_frame(message)
            queued = self._queue_message(opcode, payload)
        else:
            chunks = []
            opcode = None
            for chunk in message:
                chunk_opcode, payload = _data_frame(chunk)
                if opcode is None:
                    opcode = chunk_opcode
                elif chunk_opcode is not opcode:
                    raise TypeError("fragments of one message must be all str or all bytes-like")
                chunks.append(payload)
            if opcode is None:
                return
            queued = self._queue_compressed_fragments(opcode, chunks)
        if not queued:
            raise ConnectionClosed(f"cannot send: connection is {self.state.name}")

    def _queue_compressed_fragments(self, opcode: Opcode, chunks: List[bytes]) -> bool:
        deflate = self._deflate
        assert deflate is not None
        with deflate.lock or contextlib.nullcontext():
            payloads = deflate.compress_fragments(chunks)
            last = len(payloads) - 1
            # RFC 7692 6.1: RSV1 on the first frame of the message only.
            data = b"".join(encode_frame(_CONTINUATION if i else opcode, payload, fin=i == last,
                                         mask=self.client, rsv1=not i) for i, payload in enumerate(payloads))
            return self._queue(data)

    def _queue_message(self, opcode: Opcode, payload: bytes,
                       cache: Optional[Dict[Any, bytes]] = None) -> bool:
        """Encode one whole message for this connection and queue it; False once it no longer sends.

        ``cache`` (one dict per broadcast) lets connections that would send
        the same bytes share them: every uncompressed server connection, and
        every compressed one without context takeover and the same settings.
        """
        deflate = self._deflate
        client = self.client
        if deflate is None:
            if client:
                return self._queue(encode_frame(opcode, payload, mask=True))
            key: Any = None
        elif deflate.lock is not None:
            with deflate.lock:  # compressed in queue order: the peer inflates with the same context
                return self._queue(encode_frame(opcode, deflate.compress(payload), mask=client, rsv1=True))
        elif client:
            return self._queue(encode_frame(opcode, deflate.compress(payload), mask=True, rsv1=True))
        else:
            key = deflate.send_key
        data = cache.get(key) if cache is not None else None
        if data is None:
            if deflate is None:
                data = encode_frame(opcode, payload)
            else:
                data = encode_frame(opcode, deflate.compress(payload), rsv1=True)
            if cache is not None:
                cache[key] = data
        return self._queue(data)

    def _enable_deflate(self, params: DeflateParams, settings: Deflate) -> None:
        # Before add(): the parser and assembler made by _start() take it from here.
        self._deflate = PerMessageDeflate(params, client=self.client, level=settings.level,
                                          mem_level=settings.mem_level)

    def ping(self, payload: bytes = b"") -> None:
        """Queue a ping (at most 125 bytes); the pong comes to :meth:`ponged`."""
        if not self._queue(encode_frame(_PING, bytes(payload), mask=self.client)):
            raise ConnectionClosed(f"cannot ping: connection is {self.state.name}")

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the close handshake: everything queued before goes out first,
        then the close frame; the socket closes when the peer answers or
        after ``close_timeout``. Does nothing once closing."""
        payload = encode_close(code, reason)
        with self._lock:
            state = self.state
            if state > _OPEN:
                return
            # Queued and marked at once, so a send() after close() fails in any thread.
            self._append_close(payload)
            self.state = _TRANSITIONS[(state, "send_close")]
        self._schedule_flush()
        self._call_in_loop(self._arm_close_timer)

    def terminate(self) -> None:
        """Close the socket now, without a close handshake (``closed()`` gets 1006)."""
        self._call_in_loop(self._finalize, "terminated")

    # State -------------------------------------------------------------------

    @property
    def request_headers(self) -> Headers:
        """Headers of the opening request (for a client: the ones it sent)."""
        headers = self._request_headers
        if type(headers) is bytes:
            headers = self._request_headers = _parse_head(headers)[1]
        return headers

    @property
    def response_headers(self) -> Optional[Headers]:
        """Headers of the server's 101 response (client side only, else ``None``)."""
        headers = self._response_headers
        if type(headers) is bytes:
            headers = self._response_headers = _parse_head(headers)[1]
        return headers

    @property
    def compression(self) -> Optional[DeflateParams]:
        """What permessage-deflate negotiation agreed on, or ``None`` when messages go uncompressed."""
        deflate = self._deflate
        return deflate.params if deflate is not None else None

    @property
    def terminated(self) -> bool:
        """Whether the connection is over and its socket closed."""
        return self._finalized

    @property
    def buffered_amount(self) -> int:
        """Bytes queued but not yet written to the socket."""
        return self._buffered

    def fileno(self) -> int:
        return self._fd

    def __repr__(self) -> str:
        role = "client" if self.client else "server"
        return f"<{type(self).__name__} {role} {self.peer_address!r} {self.path!r} {self.state.name}>"

    # Internals: any thread -----------------------------------------------------

    def _queue(self, data: bytes) -> bool:
        """Append encoded frames to the write buffer; False when the connection no longer sends."""
        with self._lock:
            if self.state > _OPEN:
                return False
            size = self._buffered + len(data)
            limit = self.max_buffered
            overflow = limit is not None and size > limit
            if overflow:
                # uWebSockets' policy: a peer that does not read is dropped, not buffered for.
                self.state = _CLOSED
                self._failure = (CloseCode.ABNORMAL,
                                 f"slow consumer: more than {limit} bytes buffered (max_buffered)")
            else:
                out = self._out
                if out and len(data) < COALESCE_SIZE:
                    # Small frames share a buffer: thousands of tiny frames (a pong flood) would
                    # otherwise cost an object each, far more memory than max_buffered says.
                    last = out[-1]
                    kind = type(last)
                    if kind is bytearray and len(last) + len(data) <= COALESCE_SIZE:
                        last += data
                    elif kind is bytes and len(last) + len(data) <= COALESCE_SIZE:
                        out[-1] = bytearray(last) + data
                    else:
                        out.append(data)
                else:
                    out.append(data)
                self._buffered = size
                # _schedule_flush(), inlined: under the lock already taken, one lock per send.
                if self._scheduled:
                    return True
                self._scheduled = True
        if overflow:
            self._call_in_loop(self._finalize)
            return False
        manager = self._manager
        if manager is not None:
            manager._schedule_flush(self)
        return True

    def _schedule_flush(self) -> None:
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        manager = self._manager
        if manager is not None:
            manager._schedule_flush(self)

    def _call_in_loop(self, function: Callable[..., Any], *args: Any) -> None:
        manager = self._manager
        if manager is None or manager._in_loop():
            function(*args)
        else:
            manager._call_soon(function, *args)

    # Internals: loop thread only ---------------------------------------------

    def _start(self, manager: "WebSocketManager") -> None:
        self._manager = manager
        if self.max_buffered is None:
            self.max_buffered = manager.max_buffered
        if self.max_message_size is None:
            self.max_message_size = manager.max_message_size
        if self.max_frame_size is None:
            self.max_frame_size = manager.max_frame_size
        if self.close_timeout is None:
            self.close_timeout = manager.close_timeout
        deflate = self._deflate
        self._parser = FrameParser(expect_masked=not self.client, max_frame_size=self.max_frame_size,
                                   allow_rsv1=deflate is not None)
        self._assembler = MessageAssembler(max_message_size=self.max_message_size, deflate=deflate)
        self._last_seen = manager._now

    def _on_read(self) -> None:
        if self._finalized or self._manager is None:
            return  # a stale event for a connection closed or remove()d earlier in this turn
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except ssl.SSLZeroReturnError:
            data = b""
        except OSError as exc:
            self._finalize(f"connection lost: {exc}")
            return
        if not data:
            # EOF: the end of a close handshake, or a peer that vanished without one (1006).
            self._finalize("connection closed without a close frame")
            return
        manager = self._manager
        self._last_seen = manager._now
        if self.state < _CLOSED:
            self._receive(data)
        if self._tls and not self._finalized and self.sock.pending():
            # TLS may hold decrypted bytes that no readiness event will announce.
            manager._ready.append(self)

    def _receive(self, data: bytes) -> None:
        parser = self._parser
        assembler = self._assembler
        try:
            frames = parser.feed(data)
        except ProtocolError as exc:
            self._fail(exc.code, exc.reason)
            return
        for frame in frames:
            try:
                message = assembler.receive(frame)
            except ProtocolError as exc:
                self._fail(exc.code, exc.reason)
                return
            kind = type(message)
            if kind is str or kind is bytes:
                try:
                    self.received_message(message)
                except Exception as exc:
                    self._callback_failed("received_message", exc)
            elif kind is Close:
                self._on_close_frame(message)
            elif message is None:
                continue
            elif frame.opcode == _PING:
                # RFC 6455 5.5.2: answer a ping with a pong carrying the same payload.
                self._queue(encode_frame(_PONG, frame.payload, mask=self.client))
            else:
                self._ping_sent = 0.0
                try:
                    self.ponged(frame.payload)
                except Exception as exc:
                    self._callback_failed("ponged", exc)
            if self.state is _CLOSED:
                return  # RFC 6455 5.5.1: nothing after a close frame (or a failure) is processed
        if parser.error is not None:
            self._fail(parser.error.code, parser.error.reason)
            return
        pending = parser.pending()
        if pending is not None:
            try:
                if assembler.check_pending(*pending, parser.pending_rsv1()):
                    assembler.receive_partial(parser.read_partial(), starts_message=pending[0] == _TEXT)
            except ProtocolError as exc:
                self._fail(exc.code, exc.reason)

    def _callback_failed(self, name: str, exc: Exception) -> None:
        if isinstance(exc, ConnectionClosed) and self.state > _OPEN:
            return  # a send() racing the close of its own connection: nothing is wrong
        logger.error("%s.%s raised; closing %r with 1011", type(self).__name__, name, self, exc_info=exc)
        # Details stay in the log: the peer only learns that something went wrong.
        self._fail(CloseCode.INTERNAL_ERROR, "internal error")

    def _on_close_frame(self, close: Close) -> None:
        with self._lock:
            state = self.state
            if state is _CLOSED:
                return
            self._received_close = close
            if state <= _OPEN:
                # RFC 6455 5.5.1: "the endpoint MUST send a Close frame in response ...
                # typically echoing the status code it received." No code, no code back.
                payload = b"" if close.code == CloseCode.NO_STATUS else close.code.to_bytes(2, "big")
                self._append_close(payload)
            self.state = _TRANSITIONS[(state, "receive_close")]
        self._wind_down()

    def _arm_close_timer(self) -> None:
        manager = self._manager
        # Before add() there is no loop yet: _open() arms it then.
        if manager is not None and self._parser is not None and self._timer is None and not self._finalized:
            self._timer = manager._call_later(self.close_timeout, self._finalize, "close timeout")

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): error close frame after what is queued, then close."""
        with self._lock:
            state = self.state
            if state is _CLOSED:
                return
            self._failure = (code, reason)
            if state <= _OPEN:
                # Cut at 123 bytes without splitting a character: the reason must stay UTF-8.
                cut = reason.encode()[:123].decode(errors="ignore")
                self._append_close(encode_close(code, cut))
            self.state = _TRANSITIONS[(state, "fail")]
        self._wind_down()

    def _append_close(self, payload: bytes) -> None:
        # Under self._lock. A close frame is let past max_buffered so the handshake can finish.
        data = encode_frame(_CLOSE, payload, mask=self.client)
        self._out.append(data)
        self._buffered += len(data)

    def _wind_down(self) -> None:
        """After the close frames: flush, half-close, wait for the peer's EOF (bounded by close_timeout)."""
        manager = self._manager
        if manager is None:
            return
        if self._timer is not None:
            self._timer[2] = None
        self._timer = manager._call_later(self.close_timeout, self._finalize, "close timeout")
        self._schedule_flush()

    def _flush(self) -> None:
        if self._finalized or self._manager is None or self._parser is None:
            return  # not running (yet): _open() schedules the flush of what is queued
        error = None
        sock = self.sock
        with self._lock:
            out = self._out
            for _ in range(WRITES_PER_FLUSH):
                if not out:
                    break
                data = out[0]
                try:
                    sent = sock.send(data)
                except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    break
                except OSError as exc:
                    error = exc
                    break
                self._buffered -= sent
                if sent < len(data):
                    # A view, not a copy: the rest of a large frame is not copied per partial write.
                    out[0] = memoryview(data)[sent:]
                    break
                del out[0]
            waiting = bool(out)
            self._scheduled = waiting  # while waiting for EVENT_WRITE no further flush is queued
        if error is not None:
            self._finalize(f"connection lost: {error}")
            return
        if waiting != self._writing:
            self._writing = waiting
            events = selectors.EVENT_READ | selectors.EVENT_WRITE if waiting else selectors.EVENT_READ
            self._manager._selector.modify(sock, events, self)
        if not waiting and self.state is _CLOSED and not self._shut_down:
            self._shut_down = True
            try:
                # Half-close, then read until the peer's EOF: closing with unread input would
                # send a RST that can destroy the close frame we just wrote.
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    _on_write = _flush

    def _finalize(self, reason: str = "") -> None:
        """Close the socket, forget the connection, call closed() once."""
        if self._finalized:
            return
        self._finalized = True
        if self._timer is not None:
            self._timer[2] = None
            self._timer = None
        if self._failure is not None:
            code, reason = self._failure
        elif self._received_close is not None:
            code, reason = self._received_close
        else:
            code = CloseCode.ABNORMAL
        was_opened = self._parser is not None
        with self._lock:
            self.state = _CLOSED
            self._out.clear()
            self._buffered = 0
        self.close_code = code
        self.close_reason = reason
        manager = self._manager
        if manager is not None:
            manager._forget(self)
        try:
            self.sock.close()
        except OSError:
            pass
        if was_opened:
            try:
                self.closed(code, reason)
            except Exception as exc:
                logger.error("%s.closed raised for %r", type(self).__name__, self, exc_info=exc)


###############################################################################
# WebSocketManager: the selector loop #########################################
###############################################################################

class _Listener:
    """A listening socket (or, for accept(), just the settings) of a manager."""

    __slots__ = ("manager", "sock", "factory", "ssl_context", "subprotocols", "handshake", "max_connections",
                 "origins", "unix_path", "connections", "compression", "_finalized")

    def __init__(self, manager: "WebSocketManager", sock: Optional[socket.socket], factory: Callable[..., WebSocket],
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
        self._finalized = False

    def _on_read(self) -> None:
        manager = self.manager
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the backlog stays readable, so rest instead of spinning.
                    logger.warning("accept() failed (%s); pausing the listener for %.1f s", exc, ACCEPT_BACKOFF)
                    manager._selector.unregister(self.sock)
                    manager._call_later(ACCEPT_BACKOFF, self._resume)
                    return
                logger.debug("accept() failed: %s", exc)
                continue
            manager._start_handshake(self, sock, address)

    def _on_write(self) -> None:
        pass

    def _resume(self) -> None:
        if not self._finalized:
            self.manager._selector.register(self.sock, selectors.EVENT_READ, self)

    def _close(self) -> None:
        if self._finalized or self.sock is None:
            return
        self._finalized = True
        try:
            self.manager._selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass


class _ServerHandshake:
    """A server connection before its 101: TLS handshake, request head, answer."""

    __slots__ = ("manager", "listener", "sock", "address", "reader", "timer", "tls_pending", "reply", "_finalized")

    def __init__(self, manager: "WebSocketManager", listener: _Listener, sock: socket.socket, address: Any):
        self.manager = manager
        self.listener = listener
        self.sock = sock
        self.address = address
        self.reader = HeadReader()
        self.timer: Any = None
        self.tls_pending = isinstance(sock, ssl.SSLSocket)
        self.reply: Optional[memoryview] = None  # a refusal being written, after which we close
        self._finalized = False

    def _on_read(self) -> None:
        if self._finalized:
            return
        if self.tls_pending and not self._tls_handshake():
            return
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError:
            data = b""
        if not data:
            self._close()
            return
        if self.reply is None:  # else refused: the rest of the request is discarded until the peer's EOF
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            result = self.reader.feed(data)
        except HandshakeError as exc:
            self._reply_and_close(Response(exc.status or 400, exc.headers))
            return
        if result is not None:
            self.manager._complete_handshake(self, *result)
        elif isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            self.manager._ready.append(self)

    def _on_write(self) -> None:
        if self._finalized:
            return
        if self.tls_pending:
            if self._tls_handshake():
                self._on_read()
        elif self.reply is not None:
            self._write_reply()

    def _tls_handshake(self) -> bool:
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._set_events(selectors.EVENT_READ)
            return False
        except ssl.SSLWantWriteError:
            self._set_events(selectors.EVENT_WRITE)
            return False
        except (ssl.SSLError, OSError) as exc:
            logger.debug("TLS handshake with %s failed: %s", self.address, exc)
            self._close()
            return False
        self.tls_pending = False
        self._set_events(selectors.EVENT_READ)
        return True

    def _set_events(self, events: int) -> None:
        self.manager._selector.modify(self.sock, events, self)

    def _reply_and_close(self, response: Response) -> None:
        """Answer with plain HTTP, then close once it is written and the peer is done."""
        if self.reply is not None:
            return
        try:
            self.reply = memoryview(encode_response(response))
        except ValueError as exc:
            logger.error("invalid handshake response: %s", exc)
            self.reply = memoryview(encode_response(Response(500)))
        self._write_reply()

    def _write_reply(self) -> None:
        reply = self.reply
        try:
            sent = self.sock.send(reply) if reply else 0
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except OSError:
            self._close()
            return
        self.reply = reply = reply[sent:]
        if reply:
            self._set_events(selectors.EVENT_READ | selectors.EVENT_WRITE)
            return
        self._set_events(selectors.EVENT_READ)
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close()
            return
        # Bounded wait for the peer's EOF, so our reply is not destroyed by a RST.
        if self.timer is not None:
            self.timer[2] = None
        self.timer = self.manager._call_later(self.manager.close_timeout, self._close)

    def _detach(self) -> None:
        self._finalized = True
        if self.timer is not None:
            self.timer[2] = None
        self.manager._handshakes.discard(self)

    def _close(self) -> None:
        if self._finalized:
            return
        self._detach()
        try:
            self.manager._selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()

    _finalize = _close


class _Waker:
    """The read end of a socketpair: other threads write a byte to end select()."""

    __slots__ = ("manager", "sock", "_finalized")

    def __init__(self, manager: "WebSocketManager", sock: socket.socket):
        self.manager = manager
        self.sock = sock
        self._finalized = False

    def _on_read(self) -> None:
        try:
            while self.sock.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        # Cleared after the drain (a byte sent meanwhile must not be swallowed while the
        # flag stays set) and before the queues are read (work queued before a skipped
        # wake-up is still seen in this turn).
        self.manager._wake_pending = False

    def _on_write(self) -> None:
        pass


def _select_subprotocol(offered: Sequence[str], supported: Sequence[str]) -> Optional[str]:
    for subprotocol in supported:
        if subprotocol in offered:
            return subprotocol
    return None


class WebSocketManager:
    """Runs many WebSocket connections, of either role, in one thread.

    ``add()`` connections made by :func:`connect`, ``listen()`` for servers,
    then ``start()`` a background thread or ``run()`` in this one. As a
    context manager it starts on enter and, on exit, closes every
    connection (1001), waits up to ``close_timeout`` for them, stops and
    joins.

    Limits, each per connection: ``max_message_size`` (default 1 MiB) and
    ``max_frame_size`` (default: ``max_message_size``) on input,
    ``max_buffered`` (default 4 MiB) on unsent output, ``close_timeout`` (5 s)
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
        self.compression = _deflate_settings(compression)
        self._owns_selector = selector is None
        self._selector = selector if selector is not None else selectors.DefaultSelector()
        self.heartbeat = heartbeat
        self.heartbeat_timeout = heartbeat_timeout if heartbeat_timeout is not None else heartbeat
        self.close_timeout = close_timeout
        self.handshake_timeout = handshake_timeout
        self.max_buffered = max_buffered
        self.max_message_size = max_message_size
        self.max_frame_size = max_frame_size if max_frame_size is not None else max_message_size
        self._websockets: Dict[int, WebSocket] = {}
        self.websockets = types.MappingProxyType(self._websockets)
        self._handshakes: set = set()
        self._listeners: List[_Listener] = []
        self._timers: List[list] = []  # heap of [when, sequence, function or None when cancelled, args]
        self._timer_sequence = 0
        self._calls: collections.deque = collections.deque()  # (function, args) from other threads
        self._dirty: collections.deque = collections.deque()  # connections with output to flush
        self._ready: List[Any] = []  # TLS connections holding decrypted input
        self._now = time.monotonic()
        self._running = False
        self._stopped = False
        self._stop_deadline: Optional[float] = None
        self._thread: Optional[threading.Thread] = None
        self._thread_id: Optional[int] = None
        self._lock = threading.Lock()
        self._finished = False  # set by _shutdown(): nothing may be added from then on
        self._wake_pending = False
        waker_read, self._waker = socket.socketpair()
        waker_read.setblocking(False)
        self._waker.setblocking(False)
        self._selector.register(waker_read, selectors.EVENT_READ, _Waker(self, waker_read))
        self._waker_read = waker_read

    # Connections ---------------------------------------------------------------

    def add(self, websocket: WebSocket) -> None:
        """Run ``websocket`` in this manager: registered, then ``opened()`` in the loop."""
        if websocket._manager is not None and websocket._manager is not self:
            raise ValueError("the connection belongs to another manager")
        if websocket._finalized:
            raise ConnectionClosed("the connection is already closed")
        with self._lock:  # either _shutdown() sees this connection, or we see it finished
            self._check_running()
            self._websockets[websocket._fd] = websocket
            websocket._manager = self
        self._call_threadsafe(self._open, websocket)

    def remove(self, websocket: WebSocket) -> None:
        """Stop managing ``websocket`` without closing it (its socket is yours again)."""
        self._call_threadsafe(self._release, websocket)

    def __len__(self) -> int:
        return len(self._websockets)

    def __iter__(self) -> Iterator[WebSocket]:
        return iter(tuple(self._websockets.values()))

    def __contains__(self, websocket: object) -> bool:
        return isinstance(websocket, WebSocket) and self._websockets.get(websocket._fd) is websocket

    def broadcast(self, message: Union[str, bytes, bytearray, memoryview]) -> int:
        """Queue ``message`` to every open connection; return how many took it.

        The frame is encoded once and the same bytes queued to every server
        connection (client connections need their own masks). With
        compression, it is compressed once for all the connections that keep
        no compression context (``server_no_context_takeover``, the default
        of :class:`Deflate`), and once per connection for the others.
        """
        opcode, payload = _data_frame(message)
        frame = encode_frame(opcode, payload)
        shared: Dict[Any, bytes] = {None: frame}
        count = 0
        for websocket in tuple(self._websockets.values()):
            if websocket._deflate is None and not websocket.client:
                queued = websocket._queue(frame)
            else:
                queued = websocket._queue_message(opcode, payload, shared)
            if queued:
                count += 1
        return count

    def close_all(self, code: int = CloseCode.GOING_AWAY, reason: str = "Server is shutting down") -> None:
        """Start the close handshake on every connection."""
        encode_close(code, reason)  # invalid arguments fail here, not once per connection
        for websocket in tuple(self._websockets.values()):
            websocket.close(code, reason)

    # Listening -----------------------------------------------------------------

    def listen(self, address: Union[Tuple[str, int], str], factory: Callable[..., WebSocket] = WebSocket, *,
               ssl_context: Optional[ssl.SSLContext] = None, subprotocols: Optional[Sequence[str]] = None,
               handshake: Optional[Callable[[Request], Any]] = None, backlog: int = 1024,
               max_connections: Optional[int] = None, origins: Optional[Sequence[Optional[str]]] = None,
               compression: Union[None, str, Deflate] = "manager") -> Union[Tuple[str, int], str]:
        """Serve WebSocket connections on ``address``; return the bound address.

        ``address`` is ``(host, port)`` (port 0 picks a free one; IPv6 hosts
        work) or a filesystem path for a Unix socket. ``factory`` makes each
        connection after its handshake. ``subprotocols`` lists the server's,
        in preference order. ``handshake(request)`` may inspect the
        :class:`Request` and return ``None`` to accept, a subprotocol name,
        or a :class:`Response` to answer with plain HTTP instead (a refusal
        such as ``Response(403)``, or a page); raising :class:`HandshakeError`
        refuses with its status. Past ``max_connections`` open connections,
        new handshakes get 503. With ``origins``, a request whose Origin is
        not listed gets 403 (list ``None`` to admit requests without one).
        ``compression``: ``"deflate"`` or a :class:`Deflate` accepts
        permessage-deflate offers, ``None`` declines them; by default the
        manager's ``compression`` applies.
        """
        settings = self._compression_for(compression)
        unix_path = None
        if isinstance(address, (str, bytes, os.PathLike)):
            unix_path = os.fsdecode(address)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(unix_path)
                sock.listen(backlog)
            except OSError:
                sock.close()
                raise
        else:
            host, port = address[0], address[1]
            family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
            sock = socket.create_server((host, port), family=family, backlog=backlog)
        sock.setblocking(False)
        listener = _Listener(self, sock, factory, ssl_context, subprotocols, handshake, max_connections,
                             origins, unix_path, settings)
        with self._lock:
            self._check_running(release=listener._close)
            self._listeners.append(listener)
        self._call_threadsafe(self._selector.register, sock, selectors.EVENT_READ, listener)
        return unix_path if unix_path is not None else sock.getsockname()[:2]

    def accept(self, sock: socket.socket, request_head: bytes, factory: Callable[..., WebSocket] = WebSocket, *,
               subprotocols: Optional[Sequence[str]] = None, handshake: Optional[Callable[[Request], Any]] = None,
               compression: Union[None, str, Deflate] = "manager") -> None:
        """Adopt a connected socket whose HTTP upgrade request another server read.

        ``request_head`` is the raw request head (and anything read after
        it). wsmanager validates it, answers 101 (or the HTTP error) and runs
        the connection in its loop. The socket belongs to the manager from
        now on. ``compression`` as for :meth:`listen`.
        """
        settings = self._compression_for(compression)
        listener = _Listener(self, None, factory, None, subprotocols, handshake, None, None, None, settings)
        with self._lock:
            self._check_running(release=sock.close)
        self._call_threadsafe(self._adopt, listener, sock, request_head)

    def _compression_for(self, compression: Union[None, str, Deflate]) -> Optional[Deflate]:
        return self.compression if compression == "manager" else _deflate_settings(compression)

    # Running -------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop in a background thread."""
        if self._thread is not None:
            raise RuntimeError("the manager was already started")
        self._thread = threading.Thread(target=self.run, name="wsmanager", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Run the loop in this thread until :meth:`stop`."""
        if self._running or self._thread_id is not None:
            raise RuntimeError("the manager runs only once")
        self._thread_id = threading.get_ident()
        self._running = not self._stopped
        try:
            while self._running:
                self._run_once()
        finally:
            self._running = False
            self._shutdown()

    def stop(self, timeout: float = 0.0) -> None:
        """End the loop, from any thread or a callback; connections still open are terminated.

        With a ``timeout``, the loop first waits up to that long for the
        connections to finish closing (see :meth:`close_all`).
        """
        if timeout > 0:
            self._call_threadsafe(self._stop_when_idle, timeout)
            return
        self._stopped = True
        self._running = False
        self._wake()

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait for the background thread to end."""
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "WebSocketManager":
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close_all()
        self.stop(self.close_timeout)
        self.join()

    # The loop ------------------------------------------------------------------

    def _run_once(self) -> None:
        timers = self._timers
        while timers and timers[0][2] is None:
            # Cancelled (a handshake that completed, a close that finished): dropped now, so it
            # neither wakes the loop up later nor stays in memory until its time.
            heapq.heappop(timers)
        if self._calls or self._dirty or self._ready:
            timeout: Optional[float] = 0
        elif timers:
            timeout = max(0.0, timers[0][0] - time.monotonic())
        else:
            timeout = None
        events = self._selector.select(timeout)
        self._now = now = time.monotonic()
        for key, mask in events:
            handler = key.data
            try:
                if mask & selectors.EVENT_READ:
                    handler._on_read()
                if mask & selectors.EVENT_WRITE and not handler._finalized:
                    handler._on_write()
            except Exception as exc:
                self._crashed(handler, exc)
        if self._ready:
            ready = self._ready
            self._ready = []
            for handler in ready:
                try:
                    handler._on_read()
                except Exception as exc:
                    self._crashed(handler, exc)
        while timers and timers[0][0] <= now:
            _, _, function, args = heapq.heappop(timers)
            if function is not None:
                try:
                    function(*args)
                except Exception as exc:
                    self._crashed(getattr(function, "__self__", None), exc)
        calls = self._calls
        for _ in range(len(calls)):
            function, args = calls.popleft()
            try:
                function(*args)
            except Exception as exc:
                self._crashed(getattr(function, "__self__", None), exc)
        dirty = self._dirty
        while dirty:
            websocket = dirty.popleft()
            try:
                websocket._flush()
            except Exception as exc:
                self._crashed(websocket, exc)
        if self._stop_deadline is not None and (now >= self._stop_deadline or not (
                self._websockets or self._handshakes)):
            self._running = False

    def _crashed(self, handler: Any, exc: Exception) -> None:
        # A bug in wsmanager itself: it ends that one connection, never the loop.
        logger.error("unexpected error in the wsmanager loop (handler %r)", handler, exc_info=exc)
        finalize = getattr(handler, "_finalize", None)
        if finalize is not None:
            try:
                finalize("internal error")
            except Exception:
                logger.exception("could not close %r", handler)

    def _in_loop(self) -> bool:
        return self._thread_id == threading.get_ident()

    def _call_soon(self, function: Callable[..., Any], *args: Any) -> None:
        self._calls.append((function, args))
        self._wake()

    def _call_threadsafe(self, function: Callable[..., Any], *args: Any) -> None:
        if self._in_loop():
            function(*args)
        else:
            self._call_soon(function, *args)

    def _call_later(self, delay: float, function: Callable[..., Any], *args: Any) -> list:
        """Loop thread only. Returns a handle; set ``handle[2] = None`` to cancel."""
        self._timer_sequence += 1
        handle = [time.monotonic() + delay, self._timer_sequence, function, args]
        heapq.heappush(self._timers, handle)
        return handle

    def _schedule_flush(self, websocket: WebSocket) -> None:
        self._dirty.append(websocket)
        if self._thread_id != threading.get_ident():
            self._wake()

    def _wake(self) -> None:
        if self._wake_pending:
            return
        self._wake_pending = True
        try:
            self._waker.send(b"\0")
        except OSError:
            pass  # full (a wake-up is pending anyway) or closed (the loop is gone)

    def _open(self, websocket: WebSocket) -> None:
        if websocket._finalized:
            return
        websocket._start(self)
        sock = websocket.sock
        sock.setblocking(False)
        try:
            self._selector.modify(sock, selectors.EVENT_READ, websocket)  # from a server handshake
        except KeyError:
            self._selector.register(sock, selectors.EVENT_READ, websocket)
        with websocket._lock:
            if websocket.state is _CONNECTING:
                websocket.state = _OPEN
            closing = websocket.state is _CLOSING
        if closing:  # close() before add(): its timer starts now
            websocket._arm_close_timer()
        try:
            websocket.opened()
        except Exception as exc:
            websocket._callback_failed("opened", exc)
        with websocket._lock:
            pending_output = bool(websocket._out)
            websocket._scheduled = pending_output
        if pending_output:
            self._dirty.append(websocket)
        if self.heartbeat:
            self._call_later(self.heartbeat, self._heartbeat, websocket)
        extra = websocket._extra
        if extra and websocket.state < _CLOSED:
            websocket._extra = b""
            websocket._receive(extra)
        if websocket._tls and not websocket._finalized and sock.pending():
            self._ready.append(websocket)

    def _release(self, websocket: WebSocket) -> None:
        self._forget(websocket)
        websocket._manager = None
        websocket._scheduled = websocket._writing = False
        if websocket._timer is not None:
            websocket._timer[2] = None
            websocket._timer = None

    def _forget(self, websocket: WebSocket) -> None:
        if self._websockets.get(websocket._fd) is websocket:
            del self._websockets[websocket._fd]
        try:
            self._selector.unregister(websocket.sock)
        except (KeyError, ValueError):
            pass
        listener = websocket._listener
        if listener is not None:
            listener.connections -= 1
            websocket._listener = None

    def _heartbeat(self, websocket: WebSocket) -> None:
        if websocket._finalized or websocket.state is not _OPEN or websocket._manager is not self:
            return
        now = self._now
        if websocket._ping_sent:
            if websocket._last_seen > websocket._ping_sent:
                websocket._ping_sent = 0.0  # any input proves the peer alive
            elif now - websocket._ping_sent >= self.heartbeat_timeout:
                websocket._fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                return
            else:
                self._call_later(websocket._ping_sent + self.heartbeat_timeout - now, self._heartbeat, websocket)
                return
        idle = now - websocket._last_seen
        if idle >= self.heartbeat:
            websocket._ping_sent = now
            websocket._queue(encode_frame(_PING, b"", mask=websocket.client))
            self._call_later(self.heartbeat_timeout, self._heartbeat, websocket)
        else:
            self._call_later(self.heartbeat - idle, self._heartbeat, websocket)

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
        self._selector.register(sock, selectors.EVENT_READ, handshake)
        handshake.timer = self._call_later(self.handshake_timeout, handshake._close)
        if handshake.tls_pending:
            handshake._tls_handshake()
        return handshake

    def _adopt(self, listener: _Listener, sock: socket.socket, request_head: bytes) -> None:
        try:
            peer = sock.getpeername()
        except OSError:
            peer = None
        handshake = self._start_handshake(listener, sock, peer)
        if handshake is not None:
            handshake._feed(request_head)

    def _complete_handshake(self, handshake: _ServerHandshake, head: bytes, rest: bytes) -> None:
        listener = handshake.listener
        try:
            request = parse_request(head)
            if listener.origins is not None and request.origin not in listener.origins:
                raise HandshakeError(f"origin {request.origin!r} not allowed", 403)
            if listener.max_connections is not None and listener.connections >= listener.max_connections:
                raise HandshakeError("too many connections", 503)
            chosen = None
            if listener.handshake is not None:
                try:
                    chosen = listener.handshake(request)
                except HandshakeError:
                    raise
                except Exception as exc:
                    logger.error("handshake hook raised for %s", handshake.address, exc_info=exc)
                    raise HandshakeError("handshake hook failed", 500) from None
                if isinstance(chosen, Response):
                    handshake._reply_and_close(chosen)
                    return
            key = validate_request(request)
            offered = request.subprotocols
            if chosen is None:
                subprotocol = _select_subprotocol(offered, listener.subprotocols)
            elif chosen in offered:
                subprotocol = chosen
            else:
                logger.error("handshake hook chose subprotocol %r, which the client did not offer", chosen)
                raise HandshakeError("bad subprotocol", 500)
            extension, deflate = None, None
            if listener.compression is not None:
                extension, deflate = negotiate_deflate(request.headers.get("Sec-WebSocket-Extensions"),
                                                       listener.compression)
            response = build_response(key, subprotocol, [("Sec-WebSocket-Extensions", extension)] if extension else ())
            websocket = listener.factory(handshake.sock, client=False, path=request.path,
                                         request_headers=head, subprotocol=subprotocol,
                                         peer_address=handshake.address, extra_data=rest)
            if deflate is not None and listener.compression is not None:
                websocket._enable_deflate(deflate, listener.compression)
        except HandshakeError as exc:
            handshake._reply_and_close(Response(exc.status or 400, exc.headers))
            return
        except Exception as exc:
            logger.error("could not create the connection for %s", handshake.address, exc_info=exc)
            handshake._reply_and_close(Response(500))
            return
        handshake._detach()
        websocket._out.append(response)  # the 101 goes out first, through the connection's own buffer
        websocket._buffered = len(response)
        websocket._listener = listener
        listener.connections += 1
        self._websockets[websocket._fd] = websocket
        websocket._manager = self
        self._open(websocket)

    def _stop_when_idle(self, timeout: float) -> None:
        self._stop_deadline = time.monotonic() + timeout
        self._call_later(timeout, lambda: None)  # make sure select() returns by the deadline

    def _check_running(self, release: Optional[Callable[[], Any]] = None) -> None:
        # Under self._lock. After _shutdown() nothing is taken in; release() frees what the caller made.
        if self._finished:
            if release is not None:
                release()
            raise RuntimeError("the manager has stopped")

    def _shutdown(self) -> None:
        with self._lock:
            self._finished = True
        for websocket in tuple(self._websockets.values()):
            try:
                websocket._finalize("manager stopped")
            except Exception as exc:
                self._crashed(None, exc)
        for handshake in tuple(self._handshakes):
            handshake._close()
        for listener in self._listeners:
            listener._close()
        # Connections added after the loop ended must not leak either.
        for function, args in self._calls:
            if function == self._open:
                args[0]._finalize("manager stopped")
            elif function == self._adopt:
                args[1].close()
        self._calls.clear()
        self._timers.clear()
        self._dirty.clear()
        try:
            self._selector.unregister(self._waker_read)
        except (KeyError, ValueError):
            pass
        self._waker_read.close()
        self._waker.close()
        if self._owns_selector:
            self._selector.close()


###############################################################################
# Client: connect() ###########################################################
###############################################################################

def connect(url: str, factory: Callable[..., WebSocket] = WebSocket, *, timeout: float = 10.0,
            ssl_context: Optional[ssl.SSLContext] = None, subprotocols: Optional[Sequence[str]] = None,
            headers: Optional[Iterable[Tuple[str, str]]] = None, origin: Optional[str] = None,
            compression: Union[None, str, Deflate] = None) -> WebSocket:
    """Open a client connection to a ``ws://`` or ``wss://`` URL (blocking handshake).

    Returns a client-role connection (its frames are masked), ready for
    :meth:`WebSocketManager.add`. Bytes the server sent right after its 101
    are kept for the first read. ``compression="deflate"`` (or a
    :class:`Deflate`) offers permessage-deflate; an answer the offer does not
    allow fails the handshake. Raises :class:`HandshakeError` (with the
    server's HTTP ``status``), :class:`ValueError` for a bad URL, or
    :class:`OSError` when the connection fails.
    """
    settings = _deflate_settings(compression)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    secure = parts.scheme == "wss"
    try:
        port = parts.port or (443 if secure else 80)
    except ValueError:
        raise ValueError(f"invalid port in {url!r}") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in {url!r}")
    bracketed = f"[{host}]" if ":" in host else host
    host_header = bracketed if port == (443 if secure else 80) else f"{bracketed}:{port}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((host, port), timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if secure:
            context = ssl_context if ssl_context is not None else ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=host)
        key = new_key()
        if settings is not None:
            headers = [*(headers or ()), ("Sec-WebSocket-Extensions", deflate_offer(settings))]
        request = build_request(host_header, path, key, subprotocols=subprotocols, headers=headers, origin=origin)
        sock.sendall(request)
        reader = HeadReader()
        result = None
        while result is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("timed out waiting for the handshake response")
            sock.settimeout(remaining)
            data = sock.recv(READ_SIZE)
            if not data:
                raise HandshakeError("connection closed during the handshake", None)
            try:
                result = reader.feed(data)
            except HandshakeError:
                raise HandshakeError("response head too large", None) from None
        head, rest = result
        response = parse_response(head)
        subprotocol = validate_response(response, key, subprotocols, settings)
        deflate = None
        if settings is not None and isinstance(response.headers, Headers):
            deflate = accept_deflate_response(response.headers.get("Sec-WebSocket-Extensions"), settings)
        websocket = factory(sock, client=True, path=path, request_headers=request,
                            response_headers=head, subprotocol=subprotocol,
                            peer_address=sock.getpeername(), extra_data=rest)
        if deflate is not None and settings is not None:
            websocket._enable_deflate(deflate, settings)
    except BaseException:
        sock.close()
        raise
    return websocket


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
// Every message sent on /ws is broadcast to all peers, this page included.
const scheme = location.protocol === "https:" ? "wss://" : "ws://";
const ws = new WebSocket(scheme + location.host + "/ws");
const log = document.getElementById("log"), status = document.getElementById("status");
const text = document.getElementById("text");
function show(line, cls) {
  const li = document.createElement("li");
  li.textContent = line;
  li.className = cls;
  log.appendChild(li);
}
ws.onopen = () => {
  status.textContent = "connected";
  // ?say=... sends one message on open: handy for scripted checks of the demo.
  const say = new URLSearchParams(location.search).get("say");
  if (say) ws.send(say);
};
ws.onmessage = (event) => show(event.data, "message");
ws.onclose = (event) => { status.textContent = "closed (" + event.code + ")"; };
document.getElementById("form").onsubmit = (event) => {
  event.preventDefault();
  if (text.value) ws.send(text.value);
  text.value = "";
};
</script></body></html>
"""


class _ChatPeer(WebSocket):
    """A peer of the demo chat: whatever it says goes to everyone."""

    def opened(self) -> None:
        logger.info("%s connected (%d connected)", _format_peer(self.peer_address), len(self._manager))

    def received_message(self, message: Union[str, bytes]) -> None:
        self._manager.broadcast(message)

    def closed(self, code: int, reason: str) -> None:
        manager = self._manager
        count = len(manager) if manager is not None else 0
        logger.info("%s disconnected: %d%s (%d connected)", _format_peer(self.peer_address), code,
                    f" {reason}" if reason else "", count)


def _format_peer(address: Any) -> str:
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address or "unix socket")


def _chat_handshake(request: Request) -> Optional[Response]:
    # Only the page and the socket exist: this is a handshake hook, not a web server.
    path = request.path.split("?", 1)[0]
    if request.is_upgrade:
        return None if path == "/ws" else Response(404)
    if path == "/" and request.method in ("GET", "HEAD"):
        body = _CHAT_PAGE.encode() if request.method == "GET" else b""
        return Response(200, [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store")], body)
    return Response(404)


def _serve(args: Any) -> int:
    manager = WebSocketManager()
    try:
        host, port = manager.listen((args.host, args.port), _ChatPeer, handshake=_chat_handshake,
                                    compression="deflate")[:2]
    except OSError as exc:
        print(f"wsmanager: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        manager.stop()
        manager.run()  # a stopped manager runs no loop, only its clean-up: no descriptor leaks
        return 1
    display = f"[{host}]" if ":" in host else host
    logger.info("chat on http://%s:%d/ (WebSocket at /ws); Ctrl-C to stop", display, port)
    import signal
    stop_requests: List[int] = []

    def request_stop(signum: int, frame: Any) -> None:
        # A flag, not KeyboardInterrupt: raised inside Thread.join() that marks the loop
        # thread as ended while it still runs (CPython < 3.13), and the process would exit
        # in the middle of the close handshakes.
        stop_requests.append(signum)
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C quits at once

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)  # a service manager's stop is a Ctrl-C too
    manager.start()
    while not stop_requests and manager._thread.is_alive():
        time.sleep(0.2)
    logger.info("closing %d connection(s) with 1001", len(manager))
    manager.close_all(CloseCode.GOING_AWAY, "Server is shutting down")
    manager.stop(manager.close_timeout)
    manager.join()
    return 0


class _ConsolePeer(WebSocket):
    """The interactive client: prints what arrives, while the user types."""

    show_binary_as_hex = False

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
        print(f"< {line}", flush=True)

    def closed(self, code: int, reason: str) -> None:
        print(f"connection closed: {code} {reason}".rstrip(), file=sys.stderr, flush=True)
        self.done.set()


def _connect(args: Any) -> int:
    context = None
    if args.url.lower().startswith("wss:"):
        context = ssl.create_default_context()
        if args.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    try:
        peer = connect(args.url, _ConsolePeer, timeout=args.timeout, ssl_context=context,
                       subprotocols=args.subprotocol or None)
    except ValueError as exc:
        print(f"wsmanager: {exc}", file=sys.stderr)
        return 2
    except HandshakeError as exc:
        print(f"wsmanager: handshake with {args.url} failed: {exc}", file=sys.stderr)
        return 1
    except (OSError, ssl.SSLError) as exc:
        print(f"wsmanager: cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 1
    peer.show_binary_as_hex = args.binary
    print(f"connected to {args.url}" + (f" ({peer.subprotocol})" if peer.subprotocol else ""), file=sys.stderr)
    manager = WebSocketManager()
    manager.start()
    manager.add(peer)

    def type_lines() -> None:
        try:
            for line in sys.stdin:
                peer.send(line.rstrip("\r\n"))
        except (ConnectionClosed, ValueError, OSError):
            pass
        peer.done.set()

    threading.Thread(target=type_lines, name="stdin", daemon=True).start()
    try:
        peer.done.wait()
    except KeyboardInterrupt:
        pass
    if not peer.terminated:
        peer.close(CloseCode.NORMAL)
        deadline = time.monotonic() + manager.close_timeout + 1
        while not peer.terminated and time.monotonic() < deadline:
            time.sleep(0.01)
    manager.stop()
    manager.join()
    return 0 if peer.close_code in (CloseCode.NORMAL, CloseCode.GOING_AWAY) else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m wsmanager [serve|connect] ...``; returns the exit status."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # one line, not a usage dump
            self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def port(text: str) -> int:  # named for argparse's message: "invalid port value: '70000'"
        number = int(text)
        if not 0 <= number <= 65535:
            raise ValueError(f"port {number} out of range")
        return number

    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = Parser(prog="python -m wsmanager", formatter_class=formatter,
                    description="wsmanager demo: a broadcast chat server and an interactive client.")
    parser.add_argument("--version", action="version", version=f"wsmanager {__version__}")
    commands = parser.add_subparsers(dest="command", parser_class=Parser)
    serve = commands.add_parser("serve", formatter_class=formatter,
                                help="run the broadcast chat (the default command)",
                                description="Serve a chat page at / and broadcast every message sent on /ws.")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=port, default=9000, help="port to listen on")
    client = commands.add_parser("connect", formatter_class=formatter, help="an interactive client",
                                 description="Send typed lines as text messages and print what arrives.")
    client.add_argument("url", help="ws:// or wss:// URL")
    client.add_argument("--binary", action="store_true", help="print binary messages as hex")
    client.add_argument("--insecure", action="store_true", help="do not verify the server's TLS certificate")
    client.add_argument("--subprotocol", action="append", metavar="NAME", help="offer a subprotocol (repeatable)")
    client.add_argument("--timeout", type=float, default=10.0, help="handshake timeout in seconds")
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] not in ("serve", "connect", "-h", "--help", "--version"):
        arguments.insert(0, "serve")
    args = parser.parse_args(arguments)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return _serve(args) if args.command == "serve" else _connect(args)


if __name__ == "__main__":
    sys.exit(main())
