# Types for the compiled build of session.py (see setup.py); session.py is the source.

cimport cython

from tunnel.core.policy cimport LinkPolicy, SendWatermarks, session_credit, stream_credit


cdef class _Stream:
    cdef public object id
    cdef public bint local
    cdef public int state
    cdef public object queue
    cdef public long long buffered
    cdef public bint fin_pending
    cdef public long long send_window, recv_limit, received, consumed, window
    cdef public double epoch_at
    cdef public long long epoch_consumed
    cdef public bint scheduled, paused
    cdef public double last_activity
    cdef public long long turn_left
    cdef public object receiver
    cdef public list inbox


cdef class Session:
    cdef object _role
    cdef object _limits
    cdef double _now
    cdef int _local_parity
    cdef object _decoder
    cdef list _events
    cdef object _control
    cdef Py_ssize_t _control_bytes
    cdef readonly dict _streams
    cdef readonly object _active
    cdef readonly LinkPolicy _policy
    cdef readonly SendWatermarks _send
    cdef long long _next_local_id, _last_local_id, _last_peer_id
    cdef bint _hello_received
    cdef object _version
    cdef long long _peer_stream_window, _peer_max_frame, _send_session_window
    cdef long long _recv_limit, _recv_received, _recv_consumed
    cdef bint _closed
    cdef list _inbox_streams
    cdef public long long bytes_sent, bytes_received
    cdef list _handlers

    @cython.locals(ftype=int, flags=int, handlers=list)
    cpdef receive_data(self, data, double now)
    cpdef list pop_events(self)
    cpdef set_receiver(self, stream_id, receiver)
    @cython.locals(s=_Stream, streams=list, received=list)
    cpdef list pop_received(self)
    @cython.locals(n=Py_ssize_t, received=cython.longlong, s=_Stream)
    cpdef _on_data(self, int flags, sid, payload)
    @cython.locals(s=_Stream, window=cython.longlong, increment=cython.longlong)
    cpdef _on_window_update(self, int flags, sid, payload)
    cdef _enter_half_closed(self, _Stream s)
    cdef _drop_queue(self, _Stream s)
    cdef _forget(self, _Stream s)
    cdef _stream_error(self, _Stream s, code)
    cdef _check_drained(self)
    cdef _queue_control(self, bytes frame)
    cdef _queue_reply(self, bytes frame)
    @cython.locals(taken=Py_ssize_t, budget=double)
    cpdef list data_to_send(self, max_bytes=*)
    @cython.locals(s=_Stream, quantum=cython.longlong, max_frame=cython.longlong, watermarks=SendWatermarks,
                   now=double, sent_total=cython.longlong, allowance=cython.longlong, turn=cython.longlong,
                   sent=cython.longlong, fin_sent=bint, n=cython.longlong, size=Py_ssize_t)
    cdef _schedule(self, list out, double budget)
    cdef _check_session_low(self)
    @cython.locals(s=_Stream)
    cdef _Stream _stream_for_send(self, stream_id)
    @cython.locals(s=_Stream, n=Py_ssize_t)
    cpdef send_data(self, stream_id, data, bint end_stream=*)
    @cython.locals(s=_Stream)
    cpdef bint stream_paused(self, stream_id) except -1
    @cython.locals(s=_Stream, unconsumed=cython.longlong, credit=cython.longlong)
    cpdef consume(self, stream_id, long long n)
    @cython.locals(credit=cython.longlong)
    cdef _credit_session(self, long long n)
    cpdef next_timer(self)
