# Types for the compiled build of wss.py (see setup.py); wss.py is the source.

cimport cython

from tunnel.carriers.websocket cimport WebSocketConnection, buffer_in_use


@cython.locals(pool=list, free=Py_ssize_t, i=Py_ssize_t, buf=bytearray)
cdef bytearray _read_buffer(Py_ssize_t size)


cdef class _WebSocketPipeBase:
    cdef public bint client
    cdef public object limits, transport, peer_address, forwarded_for, subprotocol, slot
    cdef object _handshake
    cdef WebSocketConnection _conn
    cdef object _receiver
    cdef readonly object _early
    cdef bint _write_paused, _lost, _lost_delivered, _closing
    cdef object _lost_exc, _error, _close_timer, _deadline, _tls_task, _pre_tls, _raw_early, _listener
    cdef object _rbuf
    cdef readonly object _loop, _ready

    @cython.locals(conn=WebSocketConnection, size=Py_ssize_t, out=list)
    cpdef write(self, buffers)
    @cython.locals(small=bint)
    cpdef get_buffer(self, Py_ssize_t sizehint)
    cpdef buffer_updated(self, Py_ssize_t nbytes)
    cpdef data_received(self, data)
    @cython.locals(conn=WebSocketConnection, pieces=list, out=list)
    cdef _feed(self, data)
