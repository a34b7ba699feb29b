/* The IKE SA context's CDB scanner in C (issue 11, the transfer path).
 *
 * scan(cdb) is ipsecct.ikev2.context._scan: one CDB (header FPT(16) | Length(8, 8-octet
 * units) | Flags(8), then Tag(8) | Length(16) | Value items, tag 0 and zeros to the end) read
 * once, returned as (FPT, {tag: first value}, None or {tag: [every value]} for the tags that
 * come more than once), or None for anything context._parse refuses. It knows no item:
 * context._read checks them. tests/test_ikev2_context_fast.py holds it to the Python scanner
 * and tests/test_tlv_asan.py runs it under AddressSanitizer on a peer's octets.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *
tlv_scan(PyObject *self, PyObject *arg)
{
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "scan() takes bytes");
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    if (n < 4 || (Py_ssize_t)p[2] * 8 != n || p[3] != 0)
        Py_RETURN_NONE;
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    PyObject *multi = NULL, *tag = NULL, *v = NULL, *fpt = NULL, *out;
    Py_ssize_t pos = 4;
    while (pos < n) {
        if (p[pos] == 0) { /* the end of the items: zeros only after it */
            for (Py_ssize_t i = pos; i < n; i++) {
                if (p[i] != 0)
                    goto refuse;
            }
            break;
        }
        if (pos + 3 > n)
            goto refuse;
        Py_ssize_t end = pos + 3 + (Py_ssize_t)(p[pos + 1] << 8 | p[pos + 2]);
        if (end > n)
            goto refuse;
        tag = PyLong_FromLong(p[pos]);
        if (tag == NULL)
            goto error;
        v = PyBytes_FromStringAndSize((const char *)p + pos + 3, end - pos - 3);
        if (v == NULL)
            goto error;
        PyObject *first = PyDict_GetItemWithError(d, tag); /* borrowed */
        if (first != NULL) {
            if (multi == NULL && (multi = PyDict_New()) == NULL)
                goto error;
            PyObject *all = PyDict_GetItemWithError(multi, tag); /* borrowed */
            if (all == NULL) {
                if (PyErr_Occurred())
                    goto error;
                all = PyList_New(1);
                if (all == NULL)
                    goto error;
                PyList_SET_ITEM(all, 0, Py_NewRef(first));
                int r = PyDict_SetItem(multi, tag, all);
                Py_DECREF(all); /* multi holds it */
                if (r < 0)
                    goto error;
            }
            if (PyList_Append(all, v) < 0)
                goto error;
        } else if (PyErr_Occurred() || PyDict_SetItem(d, tag, v) < 0) {
            goto error;
        }
        Py_CLEAR(tag);
        Py_CLEAR(v);
        pos = end;
    }
    fpt = PyLong_FromLong((long)(p[0] << 8 | p[1]));
    if (fpt == NULL)
        goto error;
    out = PyTuple_Pack(3, fpt, d, multi != NULL ? multi : Py_None);
    Py_DECREF(fpt);
    Py_DECREF(d);
    Py_XDECREF(multi);
    return out;
refuse:
    Py_DECREF(d);
    Py_XDECREF(multi);
    Py_XDECREF(tag);
    Py_XDECREF(v);
    Py_RETURN_NONE;
error:
    Py_DECREF(d);
    Py_XDECREF(multi);
    Py_XDECREF(tag);
    Py_XDECREF(v);
    return NULL;
}

static PyMethodDef methods[] = {
    {"scan", tlv_scan, METH_O,
     "scan(cdb) -> (fpt, {tag: value}, None | {tag: [values]}) | None"},
    {NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "ipsecct.ikev2._tlv",
    "The IKE SA context's CDB scanner in C (see ipsecct.ikev2.context._scan).", -1, methods,
};

PyMODINIT_FUNC
PyInit__tlv(void)
{
    return PyModule_Create(&moduledef);
}
