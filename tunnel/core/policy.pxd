# Types for the compiled build of policy.py (see setup.py); policy.py is the source.

cpdef long long stream_credit(long long limit, long long consumed, long long window)
cpdef long long overdraft_credit(long long limit, long long received, long long consumed, long long window, long long room)
cpdef long long session_credit(long long limit, long long received, long long consumed, long long window)
cpdef long long tuned_window(long long window, long long max_window, long long consumed, double elapsed, rtt)


cdef class SendWatermarks:
    cdef public long long stream_high, stream_low, link_high, total
    cdef public bint link_full
    cdef public set paused

    cpdef add(self, stream, long long n)
    cpdef remove(self, stream, long long n)
    cpdef bint resumable(self, stream)
    cpdef list drained(self)
    cpdef forget(self, stream)
    cpdef clear(self)
    cdef _pause(self, stream)


cdef class LinkPolicy:
    cdef public object limits
    cdef public double last_received
    cdef public object rtt
    cdef public Py_ssize_t peer_streams
    cdef public bint goaway_sent
    cdef public object goaway_code
    cdef public bint goaway_received
    cdef public long long max_window
    cdef object _rtt_ping
    cdef double _rtt_next
    cdef double _last_ping
    cdef dict _pings
    cdef object _ping_counter
    cdef object _ping_rate, _churn_rate, _control_rate
    cdef readonly set _half_closed
    cdef object _half_close_at

    cpdef double next_deadline(self)
    cpdef bytes new_ping(self, double now)
    cpdef retune(self, stream, long long consumed, double now)
    cpdef bytes data_received(self, long long n, double now)
    cpdef bint drained(self, Py_ssize_t open_streams)
    cpdef half_closed(self, stream, double now)
    cpdef forget_half_closed(self, stream)
