/* bufferproxy.h: BufferProxy, a base class exporting another object's buffer. */
#ifndef FABRIC_BUFFERPROXY_H
#define FABRIC_BUFFERPROXY_H

#include <Python.h>

/* Add the BufferProxy type to module; 0, or -1 with an exception set. */
int bufferproxy_add(PyObject *module);

#endif /* FABRIC_BUFFERPROXY_H */
