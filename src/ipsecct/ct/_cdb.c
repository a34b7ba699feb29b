/* The strict IPsec SA context (CDB) reader in C (issue 11, the transfer path).
 *
 * read(data) checks one CDB's layout and canonical form exactly as the Python one-pass reader
 * (ipsecct.ct.context._read_python) does, and returns its fields as a flat tuple, or None for
 * anything that is not exactly what the writer makes. It knows no algorithm table and builds
 * no Python object but integers, bytes and tuples: the caller (context._read_native) checks
 * the algorithms and key lengths against the tables, shares the immutable parts and builds
 * the SA. The reference decoder names any fault; tests/test_context_fast.py holds this reader,
 * the Python reader and the reference to the same verdicts on hypothesis-made inputs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define CDB_UNIT 8
#define CDB_MAX (255 * CDB_UNIT)
#define FPT_IPSEC_SA 0x8001
#define VERSION 1
#define DEFAULT_WINDOW 64
#define DEFAULT_PMTU 1500
#define MAX_DURATION_MS ((UINT64_C(1) << 42) - 1)

/* presence-vector bits: bit b is 1 << (31 - b) (context.Bit) */
#define M(b) (UINT32_C(1) << (31 - (b)))
#define M_ESP_ENC M(0)
#define M_ESP_INTEG M(1)
#define M_AH_INTEG M(2)
#define M_SEQ M(3)
#define M_WINDOW M(4)
#define M_REPLAY M(5)
#define M_AGE M(6)
#define M_BYTES M(7)
#define M_PACKETS M(8)
#define M_SOFT_TIME M(9)
#define M_HARD_TIME M(12)
#define M_PMTU M(15)
#define M_PMTU_EXPIRY M(16)
#define M_UDP_ENCAP M(17)
#define M_SELECTORS M(18)
#define M_SEL_PROTOCOL M(19)
#define M_SEL_LOCAL_PORTS M(20)
#define M_SEL_REMOTE_PORTS M(21)
#define M_SEL_NAME M(22)
#define M_SEL_LABEL M(23)
#define M_SA_NAME M(24)
#define KNOWN_BITS (~UINT32_C(0) << (32 - 25))
#define M_SEL_PARTS (M_SEL_PROTOCOL | M_SEL_LOCAL_PORTS | M_SEL_REMOTE_PORTS | M_SEL_NAME | M_SEL_LABEL)
#define M_LIMITS (M(9) | M(10) | M(11) | M(12) | M(13) | M(14))

#define F_INBOUND (1u << 15)
#define F_IPV6 (1u << 14)
#define F_ESN (1u << 12)
#define F_DF_SHIFT 8
#define F_RESERVED 0x1Fu

static uint16_t
be16(const unsigned char *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

static uint32_t
be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t
be64(const unsigned char *p)
{
    return (uint64_t)be32(p) << 32 | be32(p + 4);
}

/* Bounds: every read goes through NEED; anything past the end refuses the CDB. */
#define NEED(k) \
    do { \
        if ((Py_ssize_t)(k) > n - pos) \
            goto refuse; \
    } while (0)

static PyObject *
cdb_read(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *d = view.buf;
    Py_ssize_t n = view.len, pos;
    PyObject *ret = NULL;

    uint64_t seq = 0, top = 0, age = 0, nbytes = 0, npackets = 0, lim[6] = {0};
    uint32_t window = DEFAULT_WINDOW;
    int have_lim = 0, lim_set[6] = {0};
    long pmtu = DEFAULT_PMTU;
    long long expiry = -1, ports = -1;
    long enc = -1, integ = -1;
    Py_ssize_t enc_off = 0, enc_len = 0, integ_off = 0, integ_len = 0;
    Py_ssize_t bitmap_off = -1, bitmap_len = 0, sel_off = -1, sel_len = 0, name_off = -1;
    Py_ssize_t name_len = 0;

    if (n < 24 || n % CDB_UNIT || (Py_ssize_t)d[2] * CDB_UNIT != n || d[3] != 0x80)
        goto refuse;
    unsigned flags = be16(d + 10);
    int v6 = (flags & F_IPV6) != 0;
    Py_ssize_t alen = v6 ? 16 : 4;
    pos = 16 + 2 * alen;
    if (pos > n)
        goto refuse;
    unsigned fpt = be16(d), version = d[8], proto = d[9];
    uint32_t pv = be32(d + 4), spi = be32(d + 12);
    if (fpt != FPT_IPSEC_SA || (pv & ~KNOWN_BITS) || version != VERSION ||
        (flags & F_RESERVED) || spi < 256)
        goto refuse;
    if (((flags >> F_DF_SHIFT) & 3) == 3)
        goto refuse;
    int inbound = (flags & F_INBOUND) != 0, esn = (flags & F_ESN) != 0;

    /* transforms and keys (the tables are checked by the caller) */
    if (proto == 50) {
        if ((pv & (M_AH_INTEG | M_ESP_ENC)) != M_ESP_ENC)
            goto refuse;
        NEED(3);
        enc = be16(d + pos);
        enc_len = d[pos + 2];
        enc_off = pos + 3;
        pos += 3;
        NEED(enc_len);
        pos += enc_len;
        if (pv & M_ESP_INTEG) {
            NEED(3);
            integ = be16(d + pos);
            integ_len = d[pos + 2];
            integ_off = pos + 3;
            pos += 3;
            NEED(integ_len);
            pos += integ_len;
        }
    } else if (proto == 51) {
        if ((pv & (M_AH_INTEG | M_ESP_ENC | M_ESP_INTEG)) != M_AH_INTEG)
            goto refuse;
        NEED(3);
        integ = be16(d + pos);
        integ_len = d[pos + 2];
        integ_off = pos + 3;
        pos += 3;
        NEED(integ_len);
        pos += integ_len;
    } else {
        goto refuse;
    }
    /* sequence number and anti-replay */
    if (pv & M_SEQ) {
        NEED(8);
        seq = be64(d + pos);
        pos += 8;
        if (inbound || seq == 0 || (!esn && seq > 0xFFFFFFFFu))
            goto refuse;
    }
    if (pv & M_WINDOW) {
        NEED(4);
        window = be32(d + pos);
        pos += 4;
        if (window == DEFAULT_WINDOW || window % 32 || window > CDB_MAX * 8)
            goto refuse;
    }
    if (pv & M_REPLAY) {
        NEED(8);
        top = be64(d + pos);
        if (!inbound || top == 0)
            goto refuse;
        pos += 8;
        bitmap_len = window / 8;
        NEED(bitmap_len);
        bitmap_off = pos;
        pos += bitmap_len;
    }
    /* age and counters: present only when not zero */
    if (pv & M_AGE) {
        NEED(8);
        age = be64(d + pos);
        pos += 8;
        if (age == 0 || age > MAX_DURATION_MS)
            goto refuse;
    }
    if (pv & M_BYTES) {
        NEED(8);
        nbytes = be64(d + pos);
        pos += 8;
        if (nbytes == 0)
            goto refuse;
    }
    if (pv & M_PACKETS) {
        NEED(8);
        npackets = be64(d + pos);
        pos += 8;
        if (npackets == 0)
            goto refuse;
    }
    /* lifetimes: soft time, bytes, packets, hard time, bytes, packets */
    if (pv & M_LIMITS) {
        have_lim = 1;
        for (int i = 0; i < 6; i++) {
            if (pv & M(9 + i)) {
                NEED(8);
                lim[i] = be64(d + pos);
                lim_set[i] = 1;
                pos += 8;
            }
        }
        if ((lim_set[0] && lim[0] > MAX_DURATION_MS) || (lim_set[3] && lim[3] > MAX_DURATION_MS))
            goto refuse;
    }
    /* path MTU and encapsulation */
    if (pv & M_PMTU) {
        NEED(2);
        pmtu = be16(d + pos);
        pos += 2;
        if (pmtu == DEFAULT_PMTU || pmtu < 68)
            goto refuse;
    }
    if (pv & M_PMTU_EXPIRY) {
        NEED(8);
        uint64_t e = be64(d + pos);
        pos += 8;
        if (e > MAX_DURATION_MS)
            goto refuse;
        expiry = (long long)e;
    }
    if (pv & M_UDP_ENCAP) {
        NEED(4);
        if (be16(d + pos) == 0 || be16(d + pos + 2) == 0)
            goto refuse;
        ports = (long long)be32(d + pos);
        pos += 4;
    }
    /* selectors: the layout here; the caller checks the ranges when it builds them */
    if (pv & M_SELECTORS) {
        sel_off = pos;
        NEED(2);
        int nranges = d[pos] + d[pos + 1];
        if (!d[pos] || !d[pos + 1])
            goto refuse;
        pos += 2;
        for (int i = 0; i < nranges; i++) {
            NEED(1);
            unsigned fam = d[pos];
            Py_ssize_t a = fam == 4 ? 4 : fam == 6 ? 16 : 0;
            if (!a)
                goto refuse;
            pos += 1;
            NEED(2 * a);
            pos += 2 * a;
        }
        if (pv & M_SEL_PROTOCOL) {
            NEED(1);
            if (d[pos] == 0) /* ANY is carried by absence */
                goto refuse;
            pos += 1;
        }
        for (int i = 0; i < 2; i++) {
            if (pv & (i ? M_SEL_REMOTE_PORTS : M_SEL_LOCAL_PORTS)) {
                NEED(4);
                unsigned first = be16(d + pos), last = be16(d + pos + 2);
                pos += 4;
                if (first > last || (first == 0 && last == 65535))
                    goto refuse;
            }
        }
        for (int i = 0; i < 2; i++) {
            if (pv & (i ? M_SEL_LABEL : M_SEL_NAME)) {
                NEED(1);
                Py_ssize_t tlen = d[pos];
                if (tlen == 0)
                    goto refuse;
                pos += 1;
                NEED(tlen);
                pos += tlen;
            }
        }
        sel_len = pos - sel_off;
    } else if (pv & M_SEL_PARTS) {
        goto refuse;
    }
    if (pv & M_SA_NAME) {
        NEED(1);
        name_len = d[pos];
        if (name_len == 0)
            goto refuse;
        pos += 1;
        NEED(name_len);
        name_off = pos;
        pos += name_len;
    }
    /* what is left is padding: fewer than 8 octets, all zero */
    if (n - pos >= CDB_UNIT)
        goto refuse;
    for (Py_ssize_t i = pos; i < n; i++)
        if (d[i])
            goto refuse;

    PyObject *limits;
    if (have_lim) {
        limits = PyTuple_New(6);
        if (limits == NULL)
            goto done;
        for (int i = 0; i < 6; i++) {
            PyObject *v;
            if (lim_set[i]) {
                v = PyLong_FromUnsignedLongLong(lim[i]);
                if (v == NULL) {
                    Py_DECREF(limits);
                    goto done;
                }
            } else {
                v = Py_NewRef(Py_None);
            }
            PyTuple_SET_ITEM(limits, i, v);
        }
    } else {
        limits = Py_NewRef(Py_None);
    }
    ret = Py_BuildValue(
        "(kIIy#y#ly#ly#KkKNKKKNlLLINN)",
        (unsigned long)spi, flags, proto,
        (const char *)d + 16, alen, (const char *)d + 16 + alen, alen,
        enc, (const char *)d + enc_off, enc_len,
        integ, (const char *)d + integ_off, integ_len,
        (unsigned long long)seq, (unsigned long)window, (unsigned long long)top,
        bitmap_off < 0 ? Py_NewRef(Py_None)
                       : PyBytes_FromStringAndSize((const char *)d + bitmap_off, bitmap_len),
        (unsigned long long)age, (unsigned long long)nbytes, (unsigned long long)npackets,
        limits, pmtu, expiry, ports, (unsigned int)(pv & M_SEL_PARTS),
        sel_off < 0 ? Py_NewRef(Py_None)
                    : PyBytes_FromStringAndSize((const char *)d + sel_off, sel_len),
        name_off < 0 ? Py_NewRef(Py_None)
                     : PyBytes_FromStringAndSize((const char *)d + name_off, name_len));
    goto done;
refuse:
    ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&view);
    return ret;
}

static PyMethodDef methods[] = {
    {"read", cdb_read, METH_O,
     "read(cdb) -> (spi, flags, proto, src, dst, enc, enc_key, integ, integ_key, seq, window, "
     "replay_top, replay_bitmap, age_ms, bytes, packets, limits, pmtu, pmtu_expiry_ms, "
     "encap_ports, selector_bits, selectors, name) | None"},
    {NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "ipsecct.ct._cdb",
    "The strict context (CDB) reader in C (see ipsecct.ct.context._read_native).", -1, methods,
};

PyMODINIT_FUNC
PyInit__cdb(void)
{
    return PyModule_Create(&moduledef);
}
