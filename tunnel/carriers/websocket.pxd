# Types for the compiled build of websocket.py (see setup.py); websocket.py is the source.

cimport cython

cdef bytes _key_pool
cdef Py_ssize_t _key_pos

@cython.locals(size=Py_ssize_t)
cpdef bint buffer_in_use(bytearray buf) except -1
@cython.locals(pos=Py_ssize_t)
cdef bytes _mask_key()


cdef class WebSocketConnection:
    cdef public bint client
    cdef public long long max_frame_size
    cdef public Py_ssize_t max_send
    cdef public object state
    cdef public object close_code, close_reason, failure
    cdef public bint close_sent, close_received
    cdef list _out
    cdef bytearray _head
    cdef long long _remaining
    cdef object _key
    cdef long long _offset
    cdef int _opcode
    cdef object _ctrl
    cdef bint _in_message, _data_op
    cdef list _mask_pool

    cpdef list data_to_send(self)
    @cython.locals(pieces=list, pos=Py_ssize_t, end=Py_ssize_t, take=Py_ssize_t)
    cpdef list receive_data(self, data)
    @cython.locals(old=Py_ssize_t, size=Py_ssize_t, length=cython.longlong, opcode=int, fin=bint)
    cdef Py_ssize_t _read_header(self, view, Py_ssize_t pos, Py_ssize_t end) except -1
    cdef _start_frame(self, bint fin, int opcode, long long length, key)
    @cython.locals(opcode=int)
    cdef _frame_done(self, list pieces)
    @cython.locals(total=Py_ssize_t, size=Py_ssize_t, limit=Py_ssize_t, start=Py_ssize_t, n=Py_ssize_t,
                   take=Py_ssize_t, out=list, group=list)
    cpdef list encode_messages(self, buffers)
    cdef list _encode_one(self, buffers, Py_ssize_t total)
