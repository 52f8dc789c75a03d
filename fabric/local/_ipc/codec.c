/*
 * codec.c: pickle protocol 5 for small plain messages, without a Pickler
 * (see codec.h for the subset and why).
 */
#include "codec.h"

#include <stdint.h>
#include <string.h>

#define MAX_DEPTH 4   /* tuple nesting the encoder takes on */
#define MAX_STACK 64  /* decoder value stack */
#define MAX_MARKS 8   /* decoder MARK stack */

/* the pickle opcodes of the subset */
enum {
    OP_PROTO = 0x80, OP_FRAME = 0x95, OP_MEMOIZE = 0x94, OP_STOP = '.',
    OP_NONE = 'N', OP_TRUE = 0x88, OP_FALSE = 0x89,
    OP_BININT1 = 'K', OP_BININT2 = 'M', OP_BININT = 'J', OP_LONG1 = 0x8a,
    OP_BINFLOAT = 'G', OP_SHORT_UNICODE = 0x8c, OP_UNICODE = 'X',
    OP_SHORT_BYTES = 'C', OP_BYTES = 'B',
    OP_MARK = '(', OP_TUPLE = 't', OP_EMPTY_TUPLE = ')', OP_TUPLE1 = 0x85,
};

typedef struct {
    char *p, *end;
} out_t;

static inline int room(out_t *o, Py_ssize_t n) { return o->end - o->p >= n; }

/* little-endian unsigned integer of n bytes */
static inline void put_le(out_t *o, uint64_t v, int n)
{
    for (int i = 0; i < n; i++)
        *o->p++ = (char)(v >> (8 * i));
}

static inline uint64_t get_le(const unsigned char *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

/* A length-prefixed string: the short opcode (1-byte length) or the long one
 * (4-byte length), as pickle chooses. */
static int put_sized(out_t *o, int short_op, int long_op, const char *s, Py_ssize_t n)
{
    int small = n < 256;
    if (n > 0xffffffffLL || !room(o, 1 + (small ? 1 : 4) + n))
        return -1;
    *o->p++ = (char)(small ? short_op : long_op);
    put_le(o, (uint64_t)n, small ? 1 : 4);
    memcpy(o->p, s, (size_t)n);
    o->p += n;
    return 0;
}

static int put_long(out_t *o, PyObject *obj)
{
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow || !room(o, 10))
        return -1;
    if (v >= 0 && v < 256) {
        *o->p++ = OP_BININT1;
        put_le(o, (uint64_t)v, 1);
    } else if (v >= 0 && v < 65536) {
        *o->p++ = OP_BININT2;
        put_le(o, (uint64_t)v, 2);
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
        *o->p++ = OP_BININT;
        put_le(o, (uint64_t)v, 4);
    } else { /* LONG1 takes any width of little-endian two's complement */
        *o->p++ = (char)OP_LONG1;
        *o->p++ = 8;
        put_le(o, (uint64_t)v, 8);
    }
    return 0;
}

static int enc(PyObject *obj, out_t *o, int depth)
{
    if (!room(o, 1))
        return -1;
    if (obj == Py_None) {
        *o->p++ = OP_NONE;
        return 0;
    }
    if (PyBool_Check(obj)) {
        *o->p++ = (char)(obj == Py_True ? OP_TRUE : OP_FALSE);
        return 0;
    }
    if (PyLong_CheckExact(obj))
        return put_long(o, obj);
    if (PyFloat_CheckExact(obj)) {
        if (!room(o, 9))
            return -1;
        *o->p++ = OP_BINFLOAT;
        if (PyFloat_Pack8(PyFloat_AS_DOUBLE(obj), o->p, 0) < 0) { /* big-endian */
            PyErr_Clear();
            return -1;
        }
        o->p += 8;
        return 0;
    }
    if (PyUnicode_CheckExact(obj)) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(obj, &n);
        if (s == NULL) { /* lone surrogates: pickle's surrogatepass handles them */
            PyErr_Clear();
            return -1;
        }
        return put_sized(o, OP_SHORT_UNICODE, OP_UNICODE, s, n);
    }
    if (PyBytes_CheckExact(obj))
        return put_sized(o, OP_SHORT_BYTES, OP_BYTES, PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj));
    if (PyTuple_CheckExact(obj) && depth < MAX_DEPTH) {
        Py_ssize_t n = PyTuple_GET_SIZE(obj);
        if (n == 0) {
            *o->p++ = OP_EMPTY_TUPLE;
            return 0;
        }
        if (n > 3)
            *o->p++ = OP_MARK;
        for (Py_ssize_t i = 0; i < n; i++)
            if (enc(PyTuple_GET_ITEM(obj, i), o, depth + 1) < 0)
                return -1;
        if (!room(o, 1))
            return -1;
        *o->p++ = (char)(n > 3 ? OP_TUPLE : OP_TUPLE1 + (n - 1));
        return 0;
    }
    return -1;
}

Py_ssize_t codec_encode(PyObject *obj, char *buf, Py_ssize_t cap)
{
    out_t o = {buf, buf + cap};
    if (!room(&o, 2))
        return -1;
    *o.p++ = (char)OP_PROTO;
    *o.p++ = 5;
    if (enc(obj, &o, 0) < 0 || !room(&o, 1))
        return -1;
    *o.p++ = OP_STOP;
    return o.p - buf;
}

/* ------------------------------------------------------------------ */

/* The object for one scalar opcode at p (its argument bytes follow it), or
 * NULL; *used is the argument length. NULL with no exception: not ours. */
static PyObject *scalar(unsigned op, const unsigned char *p, const unsigned char *end, Py_ssize_t *used)
{
    Py_ssize_t avail = end - p, n;
    *used = 0;
    switch (op) {
    case OP_NONE:
        return Py_NewRef(Py_None);
    case OP_TRUE:
        return Py_NewRef(Py_True);
    case OP_FALSE:
        return Py_NewRef(Py_False);
    case OP_BININT1:
    case OP_BININT2:
        n = op == OP_BININT1 ? 1 : 2;
        if (avail < n)
            return NULL;
        *used = n;
        return PyLong_FromUnsignedLong((unsigned long)get_le(p, (int)n));
    case OP_BININT:
        if (avail < 4)
            return NULL;
        *used = 4;
        return PyLong_FromLong((int32_t)(uint32_t)get_le(p, 4));
    case OP_LONG1:
        if (avail < 1 || p[0] > 8 || avail < 1 + p[0])
            return NULL;
        n = p[0];
        *used = 1 + n;
        if (n == 0)
            return PyLong_FromLong(0);
        {
            /* sign-extend n little-endian bytes */
            uint64_t v = get_le(p + 1, (int)n);
            if (n < 8 && (p[n] & 0x80))
                v |= ~0ULL << (8 * n);
            return PyLong_FromLongLong((long long)v);
        }
    case OP_BINFLOAT: {
        if (avail < 8)
            return NULL;
        double d = PyFloat_Unpack8((const char *)p, 0);
        if (d == -1.0 && PyErr_Occurred())
            return NULL;
        *used = 8;
        return PyFloat_FromDouble(d);
    }
    case OP_SHORT_UNICODE:
    case OP_UNICODE:
    case OP_SHORT_BYTES:
    case OP_BYTES: {
        int w = op == OP_SHORT_UNICODE || op == OP_SHORT_BYTES ? 1 : 4;
        if (avail < w)
            return NULL;
        n = (Py_ssize_t)get_le(p, w);
        if (avail - w < n)
            return NULL;
        *used = w + n;
        if (op == OP_SHORT_BYTES || op == OP_BYTES)
            return PyBytes_FromStringAndSize((const char *)p + w, n);
        return PyUnicode_DecodeUTF8((const char *)p + w, n, "surrogatepass");
    }
    default:
        return NULL;
    }
}

PyObject *codec_decode(const char *buf, Py_ssize_t len)
{
    const unsigned char *p = (const unsigned char *)buf, *end = p + len;
    PyObject *stack[MAX_STACK];
    int sp = 0, marks[MAX_MARKS], mp = 0;
    if (len < 3 || p[0] != OP_PROTO || p[1] > 5)
        return NULL;
    p += 2;
    while (p < end) {
        unsigned op = *p++;
        PyObject *obj;
        Py_ssize_t k = 0;
        switch (op) {
        case OP_FRAME: /* 8-byte frame length: the frame is the rest of the buffer */
            if (end - p < 8)
                goto fail;
            p += 8;
            continue;
        case OP_MEMOIZE: /* no memo GETs in the subset, so nothing to remember */
            continue;
        case OP_MARK:
            if (mp == MAX_MARKS)
                goto fail;
            marks[mp++] = sp;
            continue;
        case OP_STOP:
            if (sp != 1 || mp != 0 || p != end)
                goto fail;
            return stack[0];
        case OP_EMPTY_TUPLE:
            obj = PyTuple_New(0);
            break;
        case OP_TUPLE1:
        case OP_TUPLE1 + 1:
        case OP_TUPLE1 + 2:
        case OP_TUPLE:
            if (op == OP_TUPLE) {
                if (mp == 0)
                    goto fail;
                k = sp - marks[--mp];
            } else {
                k = op - OP_TUPLE1 + 1;
                if (sp - k < (mp ? marks[mp - 1] : 0))
                    goto fail;
            }
            obj = PyTuple_New(k);
            if (obj == NULL)
                goto fail;
            sp -= (int)k;
            for (Py_ssize_t i = 0; i < k; i++) /* the tuple takes the references */
                PyTuple_SET_ITEM(obj, i, stack[sp + i]);
            break;
        default: {
            Py_ssize_t used;
            obj = scalar(op, p, end, &used);
            if (obj == NULL && !PyErr_Occurred())
                goto fail;
            p += used;
        }
        }
        if (obj == NULL)
            goto fail;
        if (sp == MAX_STACK) {
            Py_DECREF(obj);
            goto fail;
        }
        stack[sp++] = obj;
    }
fail: /* an exception is set only on a real error */
    while (sp > 0)
        Py_DECREF(stack[--sp]);
    return NULL;
}
