/*
 * bufferproxy.c: BufferProxy, a base class whose buffer is another object's.
 *
 * The synchronized Value/Array wrappers (fabric.local.sharedctypes) are
 * Python classes around a ctypes object in shared memory. On CPython 3.11 a
 * Python class cannot export a buffer (__buffer__ arrived in 3.12), but a
 * Python subclass of a C type inherits the C type's buffer slot. So the
 * wrappers derive from this type, keep the ctypes object in its `_obj` slot,
 * and memoryview(wrapper) / numpy.frombuffer(wrapper) get the ctypes
 * object's own buffer: a view of the shared memory, no copy. The view holds
 * a reference to the ctypes object itself (view->obj), so releasing it goes
 * to the ctypes object, and the proxy needs no release slot.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "bufferproxy.h"

typedef struct {
    PyObject_HEAD
    PyObject *obj; /* the object whose buffer this one exports */
} BufferProxy;

static int proxy_getbuffer(PyObject *self, Py_buffer *view, int flags)
{
    PyObject *obj = ((BufferProxy *)self)->obj;
    if (obj == NULL) {
        PyErr_Format(PyExc_TypeError, "%s wraps no object yet", Py_TYPE(self)->tp_name);
        return -1;
    }
    return PyObject_GetBuffer(obj, view, flags);
}

static int proxy_traverse(BufferProxy *self, visitproc visit, void *arg)
{
    Py_VISIT(self->obj);
    return 0;
}

static int proxy_clear(BufferProxy *self)
{
    Py_CLEAR(self->obj);
    return 0;
}

/* A Python subclass's own dealloc calls this one, then drops its reference
 * to the (heap) subclass: not ours to do. */
static void proxy_dealloc(BufferProxy *self)
{
    PyObject_GC_UnTrack(self);
    proxy_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyBufferProcs proxy_as_buffer = {.bf_getbuffer = proxy_getbuffer};

static PyMemberDef proxy_members[] = {
    {"_obj", T_OBJECT_EX, offsetof(BufferProxy, obj), 0, "The object whose buffer this one exports."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject BufferProxyType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fabric.local._ring.BufferProxy",
    .tp_basicsize = sizeof(BufferProxy),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A base class exporting the buffer of the object in its _obj slot.",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)proxy_dealloc,
    .tp_traverse = (traverseproc)proxy_traverse,
    .tp_clear = (inquiry)proxy_clear,
    .tp_members = proxy_members,
    .tp_as_buffer = &proxy_as_buffer,
};

int bufferproxy_add(PyObject *module)
{
    if (PyType_Ready(&BufferProxyType) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "BufferProxy", (PyObject *)&BufferProxyType);
}
