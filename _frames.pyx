# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cython frame codec ``tunnel._frames``: the same API and behaviour as ``tunnel.codec.pure``.

Frames (docs/PROTOCOL.md) and the WebSocket primitives (RFC 6455) the carrier needs, with the
header work done by C byte operations on the caller's buffer:

* ``FrameDecoder.feed`` reads headers straight from the fed buffer (a pointer, no struct
  calls), checks them before anything is allocated, and returns payloads wholly inside the
  chunk as memoryview slices of it (zero copy). DATA payloads that span chunks come out piece
  by piece (``PARTIAL`` on all but the last piece, FIN only on the last); other payloads that
  span chunks are assembled once into a ``bytes`` object of their declared size.
* ``ws_mask`` / ``ws_mask_join`` XOR eight bytes at a time.

Fast paths cover the inputs the tunnel uses: ``int`` arguments in range and buffers that are
``bytes``, ``bytearray`` or 1-D contiguous ``'B'`` memoryviews. The rest takes the twin's rules,
so that results and exceptions are the same in both: integers go through the same ``struct``
formats (``struct.error`` out of range, objects with ``__index__`` accepted), other buffers are
read as their bytes through ``memoryview(obj).cast("B")`` (TypeError for a non-buffer).
"""

from cpython.buffer cimport PyBUF_FORMAT, PyBUF_SIMPLE, PyBUF_STRIDES, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_CheckExact
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_Check
from cpython.number cimport PyNumber_Index
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, strcmp

import math
import struct

from tunnel.wire.constants import ALLOWED_FLAGS, HEADER_SIZE, MAX_GOAWAY_REASON, PARTIAL, FrameType
from tunnel.wire.errors import FrameTooLarge, ProtocolError

cdef extern from "Python.h":
    bint PyMemoryView_Check(object o)
    object PyMemoryView_FromObject(object o)

__all__ = [
    "HELLO_SIZE", "IMPLEMENTATION", "FrameDecoder", "encode_header", "encode_frame", "parse_u32",
    "encode_u32", "encode_hello", "parse_hello", "encode_goaway", "parse_goaway", "ws_mask",
    "ws_mask_join", "ws_mask_join_into", "encode_ws_header", "parse_ws_header",
]

IMPLEMENTATION = "cython"
HELLO_SIZE = 20

cdef enum:
    _HEADER_SIZE = 12
    _HELLO_SIZE = 20
    _MAX_TYPE = 7
    _GOAWAY_FIXED = 8
    _FLAG_FIN = 0x01
    _PARTIAL = 0x100

cdef int64_t _U32_MAX = 0xFFFFFFFF

# The twin's wire formats, for integers the fast paths do not take.
_HEADER = struct.Struct("!BBHII")
_U32 = struct.Struct("!I")
_GOAWAY = struct.Struct("!II")
_HELLO = struct.Struct("!BBHIIII")

assert HEADER_SIZE == _HEADER_SIZE and max(FrameType) == _MAX_TYPE and PARTIAL == _PARTIAL
assert _HEADER.size == _HEADER_SIZE and _HELLO.size == _HELLO_SIZE

cdef unsigned int _ALLOWED[_MAX_TYPE + 1]
for _t in range(_MAX_TYPE + 1):
    _ALLOWED[_t] = int(ALLOWED_FLAGS[FrameType(_t)])
cdef Py_ssize_t _GOAWAY_MAX = _GOAWAY_FIXED + MAX_GOAWAY_REASON


# --- small C helpers -------------------------------------------------------------------------

cdef inline uint32_t _be32(const unsigned char* p) noexcept nogil:
    return ((<uint32_t>p[0]) << 24) | ((<uint32_t>p[1]) << 16) | ((<uint32_t>p[2]) << 8) | p[3]


cdef inline void _put32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline bint _int_in(object o, int64_t hi, int64_t* out):
    """True and ``out`` set if ``o`` is an int in ``[0, hi]``; False (no error) otherwise."""
    cdef int overflow = 0
    cdef long long v
    if not PyLong_Check(o):
        return False
    v = PyLong_AsLongLongAndOverflow(o, &overflow)
    if overflow or v < 0 or v > hi:
        return False
    out[0] = v
    return True


cdef inline bint _u64(object o, uint64_t* out):
    """True and ``out`` set if ``o`` is an int in ``[0, 2**64)``; False otherwise."""
    if not PyLong_Check(o) or o < 0 or o > 0xFFFFFFFFFFFFFFFF:
        return False
    out[0] = <uint64_t>o
    return True


cdef int _acquire(object obj, Py_buffer* buf) except -1:
    """Acquire ``obj``'s bytes into ``buf``, the twin's way: ``bytes``, ``bytearray`` and 1-D
    contiguous ``'B'`` memoryviews directly, any other object through
    ``memoryview(obj).cast("B")`` (TypeError unless it is a C-contiguous buffer). The caller
    releases ``buf``."""
    if PyBytes_CheckExact(obj) or PyByteArray_CheckExact(obj):
        PyObject_GetBuffer(obj, buf, PyBUF_SIMPLE)
        return 0
    if PyMemoryView_Check(obj):
        PyObject_GetBuffer(obj, buf, PyBUF_FORMAT | PyBUF_STRIDES)
        if (buf.ndim == 1 and buf.itemsize == 1 and buf.format != NULL
                and strcmp(buf.format, b"B") == 0 and buf.strides[0] == 1):
            return 0
        PyBuffer_Release(buf)
    PyObject_GetBuffer(memoryview(obj).cast("B"), buf, PyBUF_SIMPLE)
    return 0


cdef bytes _mask_key(object key):
    """The 4-byte WebSocket mask key as bytes, the twin's way (ValueError for another length)."""
    cdef Py_buffer kbuf
    cdef Py_ssize_t n
    if PyBytes_CheckExact(key) and len(<bytes>key) == 4:
        return key
    _acquire(key, &kbuf)
    try:
        n = kbuf.len
        if n == 4:
            return PyBytes_FromStringAndSize(<const char*>kbuf.buf, 4)
    finally:
        PyBuffer_Release(&kbuf)
    raise ValueError(f"WebSocket mask key must be 4 bytes, got {n}")


cdef void _mask(unsigned char* dst, const unsigned char* src, Py_ssize_t n,
                const unsigned char* key, Py_ssize_t phase) noexcept nogil:
    """``dst[i] = src[i] ^ key[(phase + i) % 4]``, eight bytes per step."""
    cdef unsigned char k[8]
    cdef uint64_t m, a, b, c, d
    cdef Py_ssize_t i = 0
    cdef int j
    for j in range(8):
        k[j] = key[(phase + j) & 3]
    memcpy(&m, k, 8)
    while i + 32 <= n:
        memcpy(&a, src + i, 8)
        memcpy(&b, src + i + 8, 8)
        memcpy(&c, src + i + 16, 8)
        memcpy(&d, src + i + 24, 8)
        a ^= m
        b ^= m
        c ^= m
        d ^= m
        memcpy(dst + i, &a, 8)
        memcpy(dst + i + 8, &b, 8)
        memcpy(dst + i + 16, &c, 8)
        memcpy(dst + i + 24, &d, 8)
        i += 32
    while i + 8 <= n:
        memcpy(&a, src + i, 8)
        a ^= m
        memcpy(dst + i, &a, 8)
        i += 8
    while i < n:
        dst[i] = src[i] ^ k[i & 3]
        i += 1


# --- frames ----------------------------------------------------------------------------------

def encode_header(frame_type, flags, stream_id, length):
    """The 12-byte header of a frame; send it followed by ``length`` payload bytes."""
    cdef int64_t t = 0, f = 0, s = 0, n = 0
    if not (_int_in(frame_type, 0xFF, &t) and _int_in(flags, 0xFF, &f)
            and _int_in(stream_id, _U32_MAX, &s) and _int_in(length, _U32_MAX, &n)):
        return _HEADER.pack(frame_type, flags, 0, stream_id, length)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _HEADER_SIZE)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    p[0] = <unsigned char>t
    p[1] = <unsigned char>f
    p[2] = 0
    p[3] = 0
    _put32(p + 4, <uint32_t>s)
    _put32(p + 8, <uint32_t>n)
    return out


def encode_frame(frame_type, flags, stream_id, payload=b""):
    """A whole small frame as one bytes object (control frames; DATA uses encode_header)."""
    cdef int64_t t = 0, f = 0, s = 0
    cdef Py_buffer buf
    cdef bytes out
    cdef unsigned char* p
    _acquire(payload, &buf)
    try:
        if not (_int_in(frame_type, 0xFF, &t) and _int_in(flags, 0xFF, &f)
                and _int_in(stream_id, _U32_MAX, &s) and buf.len <= _U32_MAX):
            return (_HEADER.pack(frame_type, flags, 0, stream_id, buf.len)
                    + PyBytes_FromStringAndSize(<const char*>buf.buf, buf.len))
        out = PyBytes_FromStringAndSize(NULL, _HEADER_SIZE + buf.len)
        p = <unsigned char*>PyBytes_AS_STRING(out)
        p[0] = <unsigned char>t
        p[1] = <unsigned char>f
        p[2] = 0
        p[3] = 0
        _put32(p + 4, <uint32_t>s)
        _put32(p + 8, <uint32_t>buf.len)
        memcpy(p + _HEADER_SIZE, buf.buf, buf.len)
        return out
    finally:
        PyBuffer_Release(&buf)


cdef class FrameDecoder:
    """Incremental frame decoder: ``feed`` bytes, get ``(type, flags, stream_id, payload)``.

    Any header error raises a :class:`ProtocolError` (``FrameTooLarge`` for a declared length
    above ``max_frame_size``, checked before anything is allocated); the decoder is then
    unusable and the link must close.
    """

    cdef object _max_obj          # max_frame_size as given
    cdef int64_t _limit           # the same as a C integer, clamped to [-1, 2**32]
    cdef unsigned char _head[_HEADER_SIZE]
    cdef Py_ssize_t _head_len     # partial header bytes held in _head
    cdef int _type                # type of the frame whose payload is pending, -1 between frames
    cdef unsigned int _flags
    cdef uint32_t _sid
    cdef int64_t _remaining       # payload bytes of the current frame not yet received
    cdef bytes _body              # assembly buffer for a non-DATA payload spanning chunks
    cdef Py_ssize_t _body_len
    cdef bint _failed
    cdef uint32_t _sid_c          # cache of the last stream id's int object (frames of one
    cdef object _sid_obj          # stream tend to come in runs)

    def __cinit__(self, *args, **kwargs):
        self._type = -1
        self._head_len = 0
        self._remaining = 0
        self._body = None
        self._body_len = 0
        self._failed = False
        self._limit = -1
        self._sid_c = 0
        self._sid_obj = 0

    def __init__(self, max_frame_size):
        self.max_frame_size = max_frame_size

    @property
    def max_frame_size(self):
        """Largest payload accepted; a longer declared length raises FrameTooLarge."""
        return self._max_obj

    @max_frame_size.setter
    def max_frame_size(self, value):
        # Lengths are u32, so "length > value" only depends on floor(value) clamped to
        # [-1, 2**32]; NaN compares false, so it admits everything (as in the twin).
        if value != value or value >= 0x100000000:
            limit = 0x100000000
        elif value < 0:
            limit = -1
        else:
            limit = math.floor(value)
        self._limit = limit
        self._max_obj = value

    @property
    def buffered(self):
        """Bytes held inside the decoder (partial header and partial control payload)."""
        return self._head_len + self._body_len

    cdef int _header_error(self, unsigned int ftype, unsigned int flags, unsigned int reserved,
                           uint32_t length) except -1:
        self._failed = True
        if ftype > _MAX_TYPE:
            raise ProtocolError(f"unknown frame type 0x{ftype:x}")
        if reserved:
            raise ProtocolError("reserved header bits set")
        if flags & ~_ALLOWED[ftype]:
            raise ProtocolError(f"flags 0x{flags:x} not allowed on {FrameType(ftype).name}")
        raise FrameTooLarge(f"frame of {length} bytes exceeds max_frame_size {self._max_obj}")

    def feed(self, data):
        """Decode what ``data`` completes; returns a list of ``(type, flags, stream_id,
        payload)`` tuples. Payloads are memoryviews of ``data`` except non-DATA payloads that
        spanned chunks (``bytes``)."""
        cdef object view
        cdef Py_buffer buf
        if self._failed:
            raise ProtocolError("decoder used after a protocol error")
        if PyMemoryView_Check(data):
            view = data if data.format == "B" else data.cast("B")
        elif PyBytes_CheckExact(data) or PyByteArray_CheckExact(data):
            view = PyMemoryView_FromObject(data)
        else:
            view = PyMemoryView_FromObject(data).cast("B")
        PyObject_GetBuffer(view, &buf, PyBUF_SIMPLE)
        try:
            return self._feed(view, <const unsigned char*>buf.buf, buf.len)
        finally:
            PyBuffer_Release(&buf)

    cdef list _feed(self, object view, const unsigned char* p, Py_ssize_t end):
        cdef list frames = []
        cdef Py_ssize_t pos = 0, take, avail
        cdef const unsigned char* hp
        cdef unsigned int ftype, flags, fl
        cdef uint32_t sid, length
        cdef int64_t limit = self._limit
        cdef unsigned char* body
        while pos < end:
            if self._type < 0:
                # Need a header.
                if self._head_len:
                    take = _HEADER_SIZE - self._head_len
                    if take > end - pos:
                        take = end - pos
                    memcpy(self._head + self._head_len, p + pos, take)
                    self._head_len += take
                    pos += take
                    if self._head_len < _HEADER_SIZE:
                        break
                    self._head_len = 0
                    hp = self._head
                elif end - pos >= _HEADER_SIZE:
                    hp = p + pos
                    pos += _HEADER_SIZE
                else:
                    memcpy(self._head, p + pos, end - pos)
                    self._head_len = end - pos
                    break
                ftype = hp[0]
                flags = hp[1]
                length = _be32(hp + 8)
                if (ftype > _MAX_TYPE or hp[2] or hp[3] or (flags & ~_ALLOWED[ftype])
                        or <int64_t>length > limit):
                    self._header_error(ftype, flags, (hp[2] << 8) | hp[3], length)
                sid = _be32(hp + 4)
                if sid != self._sid_c:
                    self._sid_c = sid
                    self._sid_obj = sid
                avail = end - pos
                if <Py_ssize_t>length <= avail:
                    # Whole payload in this chunk: zero-copy view.
                    frames.append((ftype, flags, self._sid_obj, view[pos:pos + length]))
                    pos += length
                    continue
                self._type = ftype
                self._flags = flags
                self._sid = sid
                self._remaining = length
                if ftype != 0:
                    self._body = PyBytes_FromStringAndSize(NULL, length)
                    self._body_len = 0
                continue
            # Inside a payload that spans chunks.
            take = end - pos
            if take > self._remaining:
                take = <Py_ssize_t>self._remaining
            self._remaining -= take
            if self._type == 0:
                if self._remaining == 0:
                    fl = self._flags
                else:
                    fl = (self._flags & ~_FLAG_FIN) | _PARTIAL
                frames.append((0, fl, self._sid, view[pos:pos + take]))
            else:
                body = <unsigned char*>PyBytes_AS_STRING(self._body)
                memcpy(body + self._body_len, p + pos, take)
                self._body_len += take
                if self._remaining == 0:
                    frames.append((self._type, self._flags, self._sid, self._body))
                    self._body = None
                    self._body_len = 0
            pos += take
            if self._remaining == 0:
                self._type = -1
        return frames


def parse_u32(payload):
    """The single u32 of a RESET or WINDOW_UPDATE payload."""
    cdef Py_buffer buf
    cdef uint32_t v
    _acquire(payload, &buf)
    try:
        if buf.len != 4:
            raise ProtocolError(f"expected a 4-byte payload, got {buf.len}")
        v = _be32(<const unsigned char*>buf.buf)
    finally:
        PyBuffer_Release(&buf)
    return v


def encode_u32(value):
    cdef int64_t v = 0
    if not _int_in(value, _U32_MAX, &v):
        return _U32.pack(value)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 4)
    _put32(<unsigned char*>PyBytes_AS_STRING(out), <uint32_t>v)
    return out


def encode_hello(min_version, max_version, stream_window, session_window, max_frame_size,
                 max_streams):
    cdef int64_t lo = 0, hi = 0, sw = 0, cw = 0, mfs = 0, ms = 0
    if not (_int_in(min_version, 0xFF, &lo) and _int_in(max_version, 0xFF, &hi)
            and _int_in(stream_window, _U32_MAX, &sw) and _int_in(session_window, _U32_MAX, &cw)
            and _int_in(max_frame_size, _U32_MAX, &mfs) and _int_in(max_streams, _U32_MAX, &ms)):
        return _HELLO.pack(min_version, max_version, 0, stream_window, session_window,
                           max_frame_size, max_streams)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _HELLO_SIZE)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    p[0] = <unsigned char>lo
    p[1] = <unsigned char>hi
    p[2] = 0
    p[3] = 0
    _put32(p + 4, <uint32_t>sw)
    _put32(p + 8, <uint32_t>cw)
    _put32(p + 12, <uint32_t>mfs)
    _put32(p + 16, <uint32_t>ms)
    return out


def parse_hello(payload):
    """``(min_version, max_version, stream_window, session_window, max_frame_size,
    max_streams)``; extra trailing bytes are ignored for forward compatibility."""
    cdef Py_buffer buf
    cdef const unsigned char* p
    _acquire(payload, &buf)
    try:
        if buf.len < _HELLO_SIZE:
            raise ProtocolError(f"HELLO payload of {buf.len} bytes, expected at least {_HELLO_SIZE}")
        p = <const unsigned char*>buf.buf
        return (p[0], p[1], _be32(p + 4), _be32(p + 8), _be32(p + 12), _be32(p + 16))
    finally:
        PyBuffer_Release(&buf)


def encode_goaway(last_stream_id, code, reason=""):
    cdef int64_t last = 0, c = 0
    raw = reason.encode("utf-8")[:MAX_GOAWAY_REASON]
    if not (PyBytes_CheckExact(raw) and _int_in(last_stream_id, _U32_MAX, &last) and _int_in(code, _U32_MAX, &c)):
        return _GOAWAY.pack(last_stream_id, code) + raw
    cdef Py_ssize_t n = len(raw)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _GOAWAY_FIXED + n)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    _put32(p, <uint32_t>last)
    _put32(p + 4, <uint32_t>c)
    memcpy(p + _GOAWAY_FIXED, PyBytes_AS_STRING(raw), n)
    return out


def parse_goaway(payload):
    """``(last_stream_id, code, reason)``."""
    cdef Py_buffer buf
    cdef const unsigned char* p
    _acquire(payload, &buf)
    try:
        if not _GOAWAY_FIXED <= buf.len <= _GOAWAY_MAX:
            raise ProtocolError(f"GOAWAY payload of {buf.len} bytes")
        p = <const unsigned char*>buf.buf
        reason = PyUnicode_DecodeUTF8(<const char*>p + _GOAWAY_FIXED, buf.len - _GOAWAY_FIXED,
                                      "replace")
        return (_be32(p), _be32(p + 4), reason)
    finally:
        PyBuffer_Release(&buf)


# --- WebSocket primitives (RFC 6455) -----------------------------------------------------------

def ws_mask(data, key, offset=0):
    """XOR ``data`` with the 4-byte ``key``, starting at key position ``offset % 4``.
    Masking and unmasking are the same operation."""
    cdef Py_buffer dbuf
    cdef bytes out
    cdef unsigned char* dst
    cdef Py_ssize_t phase
    cdef bytes k = _mask_key(key)
    cdef const unsigned char* kp = <const unsigned char*>PyBytes_AS_STRING(k)
    _acquire(data, &dbuf)
    try:
        phase = (offset if PyLong_Check(offset) else PyNumber_Index(offset)) & 3
        if dbuf.len == 0:
            return b""
        out = PyBytes_FromStringAndSize(NULL, dbuf.len)
        dst = <unsigned char*>PyBytes_AS_STRING(out)
        if dbuf.len >= 65536:
            with nogil:
                _mask(dst, <const unsigned char*>dbuf.buf, dbuf.len, kp, phase)
        else:
            _mask(dst, <const unsigned char*>dbuf.buf, dbuf.len, kp, phase)
        return out
    finally:
        PyBuffer_Release(&dbuf)


cdef Py_ssize_t _get_buffers(tuple items, Py_buffer* bufs, Py_ssize_t* held) except -1:
    """Export each item's bytes into ``bufs`` (``held`` counts the exports, for the caller to
    release, also after an error); returns their total length."""
    cdef Py_ssize_t i, total = 0
    for i in range(len(items)):
        item = items[i]
        try:
            PyObject_GetBuffer(item, &bufs[i], PyBUF_SIMPLE)
        except (TypeError, BufferError):
            raise TypeError(f"sequence item {i}: expected a bytes-like object, "
                            f"{type(item).__name__} found") from None
        held[0] += 1
        total += bufs[i].len
    return total


cdef void _mask_buffers(unsigned char* dst, Py_buffer* bufs, Py_ssize_t count,
                        const unsigned char* key) noexcept nogil:
    """The buffers joined into ``dst`` and masked, the key phase running on across them."""
    cdef Py_ssize_t i, pos = 0
    for i in range(count):
        _mask(dst + pos, <const unsigned char*>bufs[i].buf, bufs[i].len, key, pos & 3)
        pos += bufs[i].len


def ws_mask_join(buffers, key):
    """Concatenate ``buffers`` and mask the result in one pass (a client's outgoing message)."""
    cdef Py_buffer* bufs
    cdef Py_ssize_t count, held = 0, total = 0, i
    cdef bytes out, k
    cdef const unsigned char* kp
    cdef unsigned char* dst
    cdef tuple items
    # A tuple cannot change under us while the buffers are collected (tuple(t) is t).
    try:
        items = tuple(buffers)
    except TypeError:
        raise TypeError("can only join an iterable") from None
    count = len(items)
    bufs = <Py_buffer*>PyMem_Malloc(sizeof(Py_buffer) * (count if count else 1))
    if bufs == NULL:
        raise MemoryError()
    try:
        total = _get_buffers(items, bufs, &held)
        k = _mask_key(key)  # after the items, as the twin joins first
        kp = <const unsigned char*>PyBytes_AS_STRING(k)
        if total == 0:
            return b""
        out = PyBytes_FromStringAndSize(NULL, total)
        dst = <unsigned char*>PyBytes_AS_STRING(out)
        with nogil:
            _mask_buffers(dst, bufs, count, kp)
        return out
    finally:
        for i in range(held):
            PyBuffer_Release(&bufs[i])
        PyMem_Free(bufs)


def ws_mask_join_into(buffers, key, out):
    """``ws_mask_join(buffers, key)`` written into the bytearray ``out`` from its start;
    returns the byte count (ValueError if ``out`` is too small). No allocation."""
    cdef Py_buffer obuf
    cdef Py_buffer* bufs
    cdef Py_ssize_t count, held = 0, total = 0, i
    cdef bytes k
    cdef const unsigned char* kp
    cdef unsigned char* dst
    cdef tuple items
    try:
        items = tuple(buffers)
    except TypeError:
        raise TypeError("can only join an iterable") from None
    count = len(items)
    bufs = <Py_buffer*>PyMem_Malloc(sizeof(Py_buffer) * (count if count else 1))
    if bufs == NULL:
        raise MemoryError()
    try:
        total = _get_buffers(items, bufs, &held)
        k = _mask_key(key)
        kp = <const unsigned char*>PyBytes_AS_STRING(k)
        # Another writable buffer is written as its bytes, as in the twin (and with its errors).
        target = out if PyByteArray_CheckExact(out) else memoryview(out).cast("B")
        if total > len(target):
            raise ValueError("output buffer too small")
        if target is not out and target.readonly:
            raise TypeError("cannot modify read-only memory")
        if total == 0:
            return 0
        PyObject_GetBuffer(target, &obuf, PyBUF_SIMPLE)
        dst = <unsigned char*>obuf.buf
        with nogil:
            _mask_buffers(dst, bufs, count, kp)
        PyBuffer_Release(&obuf)
        return total
    finally:
        for i in range(held):
            PyBuffer_Release(&bufs[i])
        PyMem_Free(bufs)


def encode_ws_header(opcode, fin, length, mask_key=None):
    """A WebSocket frame header (RFC 6455 section 5.2) for a payload of ``length`` bytes;
    ``mask_key``, if given, must be 4 bytes long (ValueError)."""
    cdef int64_t op = 0
    cdef uint64_t n = 0
    cdef unsigned char h[14]
    cdef Py_ssize_t size
    cdef unsigned char mask_bit
    cdef int i
    if mask_key is not None:
        mask_key = _mask_key(mask_key)
    if not (_int_in(opcode, 0xFF, &op) and _u64(length, &n)):
        return _ws_header_checked(opcode, fin, length, mask_key)
    mask_bit = 0 if mask_key is None else 0x80
    h[0] = (0x80 if fin else 0) | <unsigned char>op
    if n < 126:
        h[1] = mask_bit | <unsigned char>n
        size = 2
    elif n < 65536:
        h[1] = mask_bit | 126
        h[2] = (n >> 8) & 0xFF
        h[3] = n & 0xFF
        size = 4
    else:
        h[1] = mask_bit | 127
        for i in range(8):
            h[2 + i] = (n >> (56 - 8 * i)) & 0xFF
        size = 10
    if mask_key is not None:
        memcpy(h + size, PyBytes_AS_STRING(mask_key), 4)
        size += 4
    return PyBytes_FromStringAndSize(<char*>h, size)


cdef bytes _ws_header_checked(opcode, fin, length, bytes mask_key):
    """``encode_ws_header`` for integers out of range or of other types, with the twin's
    operations, so that the error (struct.error, TypeError) is the same."""
    first = (0x80 if fin else 0) | PyNumber_Index(opcode)
    length = PyNumber_Index(length)
    mask_bit = 0x80 if mask_key is not None else 0
    if length < 126:
        head = struct.pack("!BB", first, mask_bit | length)
    elif length < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, length)
    return head + mask_key if mask_key is not None else head


def parse_ws_header(buf, offset=0):
    """Parse a WebSocket frame header at ``buf[offset:]``.

    Returns None if the header is not complete yet, else ``(fin, opcode, length, mask_key,
    header_size)`` with ``mask_key`` None for an unmasked frame. Raises ProtocolError for set
    RSV bits, a fragmented or oversized (> 125 bytes) control frame, or a 64-bit length with
    its top bit set. A negative ``offset`` is a ValueError.
    """
    cdef Py_buffer b
    cdef int64_t off = 0
    cdef Py_ssize_t avail, size
    cdef const unsigned char* p
    cdef unsigned int b0, b1, opcode
    cdef uint64_t length
    cdef bint fin
    cdef int i
    _acquire(buf, &b)
    try:
        if not _int_in(offset, 0x7FFFFFFFFFFFFFFF, &off):
            offset = PyNumber_Index(offset)
            if offset < 0:
                raise ValueError(f"negative offset {offset}")
            if not _int_in(offset, 0x7FFFFFFFFFFFFFFF, &off):
                return None  # past the end of any buffer
        if off >= b.len:
            return None
        avail = b.len - <Py_ssize_t>off
        if avail < 2:
            return None
        p = <const unsigned char*>b.buf + off
        b0 = p[0]
        b1 = p[1]
        if b0 & 0x70:
            raise ProtocolError("WebSocket RSV bits set without a negotiated extension")
        fin = (b0 & 0x80) != 0
        opcode = b0 & 0x0F
        length = b1 & 0x7F
        size = 2
        if length == 126:
            if avail < 4:
                return None
            length = (<uint64_t>p[2] << 8) | p[3]
            size = 4
        elif length == 127:
            if avail < 10:
                return None
            length = 0
            for i in range(8):
                length = (length << 8) | p[2 + i]
            if length >> 63:
                raise ProtocolError("WebSocket frame length has its top bit set")
            size = 10
        if opcode >= 8 and (length > 125 or not fin):
            raise ProtocolError("WebSocket control frame fragmented or longer than 125 bytes")
        key = None
        if b1 & 0x80:
            if avail < size + 4:
                return None
            key = PyBytes_FromStringAndSize(<const char*>p + size, 4)
            size += 4
        return (fin, opcode, length, key, size)
    finally:
        PyBuffer_Release(&b)
