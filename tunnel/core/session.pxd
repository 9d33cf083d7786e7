# Types for the compiled build of session.py (see setup.py); session.py is the source.

cimport cython

from tunnel.core.policy cimport SendWatermarks, overdraft_credit, session_credit, stream_credit
from tunnel.core.session_state cimport SessionState, StreamRecord


cdef class Session(SessionState):
    cdef list _handlers

    @cython.locals(ftype=int, flags=int, handlers=list)
    cpdef receive_data(self, data, double now)
    cpdef list pop_events(self)
    cpdef set_receiver(self, stream_id, receiver)
    @cython.locals(s=StreamRecord, streams=list, received=list)
    cpdef list pop_received(self)
    @cython.locals(n=Py_ssize_t, received=cython.longlong, s=StreamRecord)
    cpdef _on_data(self, int flags, sid, payload)
    @cython.locals(s=StreamRecord, window=cython.longlong, increment=cython.longlong)
    cpdef _on_window_update(self, int flags, sid, payload)
    cdef _enter_half_closed(self, StreamRecord s)
    cdef _drop_queue(self, StreamRecord s)
    cdef _forget(self, StreamRecord s)
    cdef _stream_error(self, StreamRecord s, code)
    cdef _check_drained(self)
    cdef _queue_control(self, bytes frame)
    cdef _queue_reply(self, bytes frame)
    @cython.locals(taken=Py_ssize_t, budget=double)
    cpdef list data_to_send(self, max_bytes=*)
    @cython.locals(s=StreamRecord, quantum=cython.longlong, max_frame=cython.longlong, watermarks=SendWatermarks,
                   now=double, sent_total=cython.longlong, allowance=cython.longlong, turn=cython.longlong,
                   sent=cython.longlong, fin_sent=bint, n=cython.longlong, size=Py_ssize_t)
    cdef _schedule(self, list out, double budget)
    cdef _check_session_low(self)
    @cython.locals(s=StreamRecord)
    cdef StreamRecord _stream_for_send(self, stream_id)
    @cython.locals(s=StreamRecord, n=Py_ssize_t)
    cpdef send_data(self, stream_id, data, bint end_stream=*)
    @cython.locals(s=StreamRecord)
    cpdef bint stream_paused(self, stream_id) except -1
    @cython.locals(s=StreamRecord, unconsumed=cython.longlong, credit=cython.longlong)
    cpdef consume(self, stream_id, long long n)
    cpdef credit_discarded(self, long long n)
    @cython.locals(credit=cython.longlong)
    cdef _credit_session(self, long long n)
    @cython.locals(credit=cython.longlong)
    cdef bint _grant_overdraft(self, StreamRecord s) except -1
    @cython.locals(s=StreamRecord)
    cdef _relieve_starved(self)
    cpdef next_timer(self)
