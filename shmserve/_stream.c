/* The stream transports' ECHO loop (spec/PROTOCOL.md sections 5-6), in C11.
 *
 * shmserve/transports/stream.py reads packets into one buffer per connection and hands each
 * to the dispatcher. An ECHO's reply is its request, byte for byte (same length, same type,
 * same body), so this loop answers ECHO packets without entering Python: it waits for bytes
 * and writes each echo back with the GIL released, and returns as soon as the buffer holds
 * anything else for Python to handle (another type, a packet not yet complete, one larger than
 * the caller lets it answer), or the socket reports EOF or an error. The buffer then starts
 * at that packet, exactly as Python's own reads would have left it.
 *
 * The socket is blocking with SO_RCVTIMEO/SO_SNDTIMEO set by the caller, so a timeout here is
 * the EAGAIN the caller's own recv or send would have seen.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

#define PACKET_PREFIX 4 /* big-endian body length; the body starts with its type byte */
#define MSG_ECHO 0x00
#define STREAM_EOF (-1)

static uint32_t load_be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

/* 0 once all n bytes are sent, else the errno of the send that failed. */
static int send_all(int fd, const unsigned char *p, size_t n) {
    while (n) {
        ssize_t sent = send(fd, p, n, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        p += sent;
        n -= (size_t)sent;
    }
    return 0;
}

PyDoc_STRVAR(echo_doc,
"echo(fd, buffer, filled, largest) -> (filled, answered, error)\n\n"
"Answers the ECHO packets at the start of `buffer` (its first `filled` bytes are read from\n"
"socket `fd`) and those that arrive after them, one recv at a time while the buffer is\n"
"empty, until the buffer starts with a packet that is not an ECHO of at most `largest` body\n"
"bytes that is complete. Returns the bytes now buffered, the echoes answered, and 0, or\n"
"STREAM_EOF (the peer closed with nothing buffered), or the errno of the recv or send that\n"
"failed (EAGAIN: a socket timeout; EINTR: a signal for Python to handle).");

static PyObject *stream_echo(PyObject *Py_UNUSED(module), PyObject *args) {
    int fd;
    Py_buffer view;
    Py_ssize_t filled, largest;
    if (!PyArg_ParseTuple(args, "iw*nn", &fd, &view, &filled, &largest))
        return NULL;
    if (filled < 0 || filled > view.len || largest < 1) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "filled must be within the buffer, largest >= 1");
        return NULL;
    }
    unsigned char *buf = view.buf;
    size_t cap = (size_t)view.len, have = (size_t)filled;
    Py_ssize_t answered = 0;
    int error = 0;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        if (have > PACKET_PREFIX) {
            uint32_t length = load_be32(buf);
            size_t packet = PACKET_PREFIX + (size_t)length;
            if (length == 0 || buf[PACKET_PREFIX] != MSG_ECHO || length > (uint64_t)largest ||
                packet > cap || have < packet)
                break; /* Python's: another type, a length to refuse, or a partial packet */
            if ((error = send_all(fd, buf, packet)) != 0)
                break;
            answered++;
            have -= packet;
            memmove(buf, buf + packet, have); /* pipelined bytes move to the start */
            continue;
        }
        if (have)
            break; /* a partial prefix: its packet's clock is Python's */
        ssize_t got = recv(fd, buf, cap, 0);
        if (got > 0) {
            have = (size_t)got;
        } else {
            error = got == 0 ? STREAM_EOF : errno;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return Py_BuildValue("nni", (Py_ssize_t)have, answered, error);
}

static PyMethodDef module_methods[] = {
    {"echo", stream_echo, METH_VARARGS, echo_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef stream_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmserve._stream",
    .m_doc = "The stream transports' ECHO loop, answered without entering Python.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__stream(void) {
    PyObject *module = PyModule_Create(&stream_module);
    if (module && PyModule_AddIntConstant(module, "STREAM_EOF", STREAM_EOF) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
