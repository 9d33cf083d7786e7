# Types for the compiled build of session_link.py (see setup.py); session_link.py is the source.

cimport cython

from tunnel.core.session cimport Session


cdef class _SessionLinkBase


cdef class SessionLinkStream:
    cdef public object stream_id, metadata, handler
    cdef _SessionLinkBase _link
    cdef long long _unconsumed
    cdef bint _eof_sent, _done

    cpdef write(self, data)
    cpdef consume(self, long long n)
    cdef _release(self)


cdef class _SessionLinkBase:
    cdef object _loop
    cdef public object carrier
    cdef readonly object _pipe
    cdef object _limits
    cdef Session _session
    cdef object _dispatch_to
    cdef public object _handshake_release
    cdef dict _streams
    cdef object _flush_handle, _timer_handle, _timer_at, _abort_handle
    cdef bint _write_paused, _pipe_closing, _pipe_lost
    cdef object _ready, _closed

    cpdef pipe_data_received(self, data)
    @cython.locals(stream=SessionLinkStream, payloads=list, n=Py_ssize_t)
    cdef _deliver(self, list received)
    cdef _schedule_flush(self)
    @cython.locals(session=Session)
    cpdef _flush(self)
    cdef _cancel_timer(self)
    cdef _rearm_timer(self)
    @cython.locals(events=list)
    cdef _process_events(self)
    @cython.locals(stream=SessionLinkStream, n=Py_ssize_t)
    cpdef _dispatch(self, event)
