/* _ring: placeholder module, replaced by the real implementation. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "futex.h"

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ring", NULL, 0, NULL};

PyMODINIT_FUNC
PyInit__ring(void)
{
    return PyModule_Create(&module);
}
