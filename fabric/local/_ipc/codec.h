/*
 * codec.h: a pickle fast path for the small messages queues carry most.
 *
 * pickle.dumps/loads cost more than the ring itself for a small tuple: each
 * call builds a Pickler or Unpickler (a 4 KiB output buffer, a memo, a
 * stack). These two functions handle the subset None, bool, int (64-bit),
 * float, str, bytes and tuples of them (nested a few levels) directly in C.
 * The bytes written are ordinary pickle protocol 5 opcodes, so pickle.loads
 * reads them too, and codec_decode also reads what pickle.dumps writes for
 * such objects. Anything outside the subset is left to pickle: the encoder
 * then returns -1, the decoder NULL without an exception set.
 */
#ifndef FABRIC_CODEC_H
#define FABRIC_CODEC_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Encode obj into buf (at most cap bytes). Returns the length, or -1 when obj
 * is outside the subset or does not fit (no exception set either way). */
Py_ssize_t codec_encode(PyObject *obj, char *buf, Py_ssize_t cap);

/* Decode a pickle of n bytes. Returns a new reference; NULL with no
 * exception set when it uses opcodes outside the subset (the caller falls
 * back to pickle.loads), NULL with an exception set on a real error. */
PyObject *codec_decode(const char *p, Py_ssize_t n);

#endif /* FABRIC_CODEC_H */
