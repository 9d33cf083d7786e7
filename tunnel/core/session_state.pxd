# Types for the compiled build of session_state.py (see setup.py); session_state.py is the source.

from tunnel.core.policy cimport LinkPolicy, SendWatermarks


cdef class StreamRecord:
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


cdef class SessionState:
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
