# Types for the compiled build of tcp.py (see setup.py); tcp.py is the source.

cimport cython

cdef Py_ssize_t _IOV_MAX

@cython.locals(size=Py_ssize_t, parts=list)
cdef bytes _joined(pieces, Py_ssize_t skip)


cdef class LinkBuffers:
    cdef public long long limit, held

    @cython.locals(held=cython.longlong)
    cpdef bint take(self, long long n) except -1
    cpdef release(self, long long n)


cdef class TcpBridge:
    cdef public object stream, transport
    cdef public LinkBuffers buffers
    cdef int _fd
    cdef list _pending
    cdef long long _unconsumed
    cdef bint _tcp_write_paused, _stream_eof, _tcp_eof, _done
    cdef public object on_done
    cdef public long long bytes_from_tcp, bytes_to_tcp
    cdef public object reset_code

    cpdef data_received(self, data)
    cdef bint _hold(self, long long n) except -1
    cdef _unhold(self, long long n)
    @cython.locals(n=Py_ssize_t, sent=Py_ssize_t, rest=Py_ssize_t)
    cdef _write_tcp(self, pieces)
    cpdef stream_data(self, data)
    @cython.locals(n=Py_ssize_t)
    cpdef stream_data_many(self, pieces)


cdef class _StreamSide:
    cdef public TcpBridge bridge

    cpdef data_received(self, data)
    cpdef data_received_many(self, pieces)
