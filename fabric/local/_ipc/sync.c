/* _sync: fabric's synchronization primitives on shared memory (being built). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "futex.h"

/* atomic_add_u32(buffer, offset, delta): add delta to the 32-bit word at offset.
 * Used for the block reference counts of _shm.py; seq_cst because it is rare
 * and orders the count against the block's reuse. */
static PyObject *
atomic_add_u32(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer view;
    Py_ssize_t offset;
    int delta;
    if (!PyArg_ParseTuple(args, "w*ni:atomic_add_u32", &view, &offset, &delta))
        return NULL;
    if (offset < 0 || offset % 4 != 0 || offset + 4 > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "offset out of range or misaligned");
        return NULL;
    }
    _Atomic uint32_t *word = (_Atomic uint32_t *)((char *)view.buf + offset);
    uint32_t now = atomic_fetch_add_explicit(word, (uint32_t)delta, memory_order_seq_cst) + (uint32_t)delta;
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(now);
}

static PyMethodDef methods[] = {
    {"atomic_add_u32", atomic_add_u32, METH_VARARGS, "Atomically add to a shared 32-bit word; return the new value."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_sync", NULL, 0, methods};

PyMODINIT_FUNC
PyInit__sync(void)
{
    return PyModule_Create(&module);
}
