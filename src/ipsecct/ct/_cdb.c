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
#include <math.h>
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


/* -- the writer -------------------------------------------------------------------------------
 * write(sa, now, seq, inbound, top, bitmap, sel_bits, sel_raw, name_raw, src, dst, v6, df_flags)
 * writes the CDB of ``sa`` exactly as context._write_python does, or returns None wherever
 * that would (a value the format cannot carry; encode() then lets the reference name it).
 * The caller passes what needs Python's own objects: the outbound number to send, the replay
 * snapshot, the encoded selector field and name, the address octets and the DF code. Every
 * other field is read here from the SA's attributes.
 */
static PyObject *s_protocol, *s_enc, *s_enc_key, *s_integ, *s_integ_key, *s_replay_window,
    *s_created, *s_counters, *s_bytes, *s_packets, *s_soft, *s_hard, *s_seconds, *s_path_mtu,
    *s_pmtu_expires, *s_encap, *s_sport, *s_dport, *s_mode, *s_esn, *s_overflow_permitted,
    *s_copy_dscp, *s_soft_fired, *s_dead, *s_rekey_requested, *s_spi;
static PyObject *transport_mode; /* Mode.TRANSPORT, given by setup() */

#define MAX_U64 UINT64_MAX
#define M_SOFT_BYTES M(10)
#define F_TRANSPORT (1u << 13)
#define F_OVERFLOW (1u << 11)
#define F_NO_DSCP_COPY (1u << 10)
#define F_SOFT_FIRED (1u << 7)
#define F_DEAD (1u << 6)
#define F_REKEY (1u << 5)

/* Whole milliseconds of a duration as the CDB carries it (context._ms): -1 if it cannot be. */
static int
ms_of(double s, uint64_t *out)
{
    if (!(s >= 0 && s < INFINITY))
        return -1;
    double r = nearbyint(s * 1000.0); /* ties to even, as Python's round() */
    if (!(r <= (double)MAX_DURATION_MS))
        return -1;
    *out = (uint64_t)r;
    return 0;
}

/* An attribute as an unsigned 64-bit integer: 1 if it is, 0 if out of range (or not an
 * integer), -1 on another error. */
static int
u64_of(PyObject *v, uint64_t *out)
{
    if (!PyLong_Check(v))
        return 0;
    unsigned long long x = PyLong_AsUnsignedLongLong(v); /* negative: OverflowError too */
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    *out = x;
    return 1;
}

static int
u64_attr(PyObject *o, PyObject *name, uint64_t *out)
{
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL)
        return -1;
    int r = u64_of(v, out);
    Py_DECREF(v);
    return r;
}

static int
bool_attr(PyObject *o, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL)
        return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

typedef struct {
    unsigned char buf[CDB_MAX + 64];
    Py_ssize_t len;
    int over;
} Out;

static void
put(Out *o, const void *p, Py_ssize_t k)
{
    if (o->over || o->len + k > (Py_ssize_t)sizeof(o->buf)) {
        o->over = 1;
        return;
    }
    memcpy(o->buf + o->len, p, (size_t)k);
    o->len += k;
}

static void
put_be(Out *o, uint64_t v, int k)
{
    unsigned char b[8];
    for (int i = k - 1; i >= 0; i--) {
        b[i] = (unsigned char)(v & 0xFF);
        v >>= 8;
    }
    put(o, b, k);
}

/* transform number and key (context._ALG_KEY + key): 0 refused, -1 error, 1 written */
static int
put_alg(Out *o, PyObject *sa, PyObject *alg_name, PyObject *key_name)
{
    uint64_t number;
    int r = u64_attr(sa, alg_name, &number);
    if (r <= 0)
        return r;
    PyObject *key = PyObject_GetAttr(sa, key_name);
    if (key == NULL)
        return -1;
    if (!PyBytes_Check(key) || number > 0xFFFF || PyBytes_GET_SIZE(key) > 255) {
        Py_DECREF(key);
        return 0;
    }
    put_be(o, number, 2);
    put_be(o, (uint64_t)PyBytes_GET_SIZE(key), 1);
    put(o, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key));
    Py_DECREF(key);
    return 1;
}

#define TRY(expr) \
    do { \
        int r_ = (expr); \
        if (r_ < 0) \
            goto error; \
        if (r_ == 0) \
            goto refuse; \
    } while (0)

/* A float attribute (or an int): 1 and *out, 0 if None, -1 on error */
static int
float_or_none(PyObject *v, double *out)
{
    if (v == Py_None)
        return 0;
    double d = PyFloat_AsDouble(v);
    if (d == -1.0 && PyErr_Occurred())
        return -1;
    *out = d;
    return 1;
}

/* One lifetime's limits (time, bytes, packets) at bits m0, m0+1, m0+2: 1 done, 0 refused */
static int
put_lifetime(Out *o, uint32_t *pv, PyObject *sa, PyObject *name, int bit0)
{
    PyObject *lt = PyObject_GetAttr(sa, name);
    if (lt == NULL)
        return -1;
    int ret = -1;
    PyObject *sec = NULL, *nb = NULL, *np = NULL;
    if ((sec = PyObject_GetAttr(lt, s_seconds)) == NULL || (nb = PyObject_GetAttr(lt, s_bytes)) == NULL ||
        (np = PyObject_GetAttr(lt, s_packets)) == NULL)
        goto out;
    PyObject *vals[3] = {sec, nb, np};
    for (int i = 0; i < 3; i++) {
        if (vals[i] == Py_None)
            continue;
        uint64_t v;
        if (i == 0) {
            double d = 0;
            if (float_or_none(sec, &d) < 0)
                goto out;
            if (ms_of(d, &v) < 0) {
                ret = 0;
                goto out;
            }
        } else {
            int r = u64_of(vals[i], &v);
            if (r <= 0) {
                ret = r;
                goto out;
            }
        }
        *pv |= M(bit0 + i);
        put_be(o, v, 8);
    }
    ret = 1;
out:
    Py_XDECREF(sec);
    Py_XDECREF(nb);
    Py_XDECREF(np);
    Py_DECREF(lt);
    return ret;
}

static PyObject *
cdb_write(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "write() takes 13 arguments");
        return NULL;
    }
    if (transport_mode == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_cdb.setup() was not called");
        return NULL;
    }
    PyObject *sa = args[0], *top_o = args[4], *bitmap = args[5], *sel_raw = args[7],
             *name_raw = args[8], *src = args[9], *dst = args[10];
    double now = PyFloat_AsDouble(args[1]);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    int inbound = PyObject_IsTrue(args[3]), v6 = PyObject_IsTrue(args[11]);
    long sel_bits = PyLong_AsLong(args[6]), df_flags = PyLong_AsLong(args[12]);
    if (inbound < 0 || v6 < 0 || (sel_bits == -1 && PyErr_Occurred()) ||
        (df_flags == -1 && PyErr_Occurred()))
        return NULL;
    if (!PyBytes_Check(bitmap) || !PyBytes_Check(sel_raw) || !PyBytes_Check(name_raw) ||
        !PyBytes_Check(src) || !PyBytes_Check(dst)) {
        PyErr_SetString(PyExc_TypeError, "write(): octets expected");
        return NULL;
    }
    Out body = {.len = 0, .over = 0};
    uint32_t pv = 0;
    PyObject *v = NULL;
    uint64_t u;

    /* transforms and keys */
    uint64_t proto;
    TRY(u64_attr(sa, s_protocol, &proto));
    if (proto > 255)
        goto refuse;
    if (proto == 50) {
        pv = M_ESP_ENC;
        TRY(put_alg(&body, sa, s_enc, s_enc_key));
        uint64_t integ;
        TRY(u64_attr(sa, s_integ, &integ));
        if (integ != 0) { /* IntegAlg.NONE */
            pv |= M_ESP_INTEG;
            TRY(put_alg(&body, sa, s_integ, s_integ_key));
        }
    } else {
        pv = M_AH_INTEG;
        TRY(put_alg(&body, sa, s_integ, s_integ_key));
    }
    /* the outbound sequence number */
    if (!inbound) {
        int truth = PyObject_IsTrue(args[2]);
        if (truth < 0)
            goto error;
        if (truth) {
            TRY(u64_of(args[2], &u));
            if (u == 0)
                goto refuse;
            pv |= M_SEQ;
            put_be(&body, u, 8);
        }
    }
    /* window and anti-replay state */
    uint64_t window;
    TRY(u64_attr(sa, s_replay_window, &window));
    if (window != DEFAULT_WINDOW) {
        if (window > 0xFFFFFFFFu)
            goto refuse;
        pv |= M_WINDOW;
        put_be(&body, window, 4);
    }
    if (inbound) {
        int truth = PyObject_IsTrue(top_o);
        if (truth < 0)
            goto error;
        if (truth) {
            TRY(u64_of(top_o, &u));
            pv |= M_REPLAY;
            put_be(&body, u, 8);
            put(&body, PyBytes_AS_STRING(bitmap), PyBytes_GET_SIZE(bitmap));
        }
    }
    /* age and counters */
    double created = 0;
    if ((v = PyObject_GetAttr(sa, s_created)) == NULL)
        goto error;
    int r = float_or_none(v, &created);
    Py_CLEAR(v);
    if (r < 0)
        goto error;
    if (r == 0 || ms_of(now - created, &u) < 0)
        goto refuse;
    if (u) {
        pv |= M_AGE;
        put_be(&body, u, 8);
    }
    if ((v = PyObject_GetAttr(sa, s_counters)) == NULL)
        goto error;
    PyObject *cnames[2] = {s_bytes, s_packets};
    for (int i = 0; i < 2; i++) {
        PyObject *c = PyObject_GetAttr(v, cnames[i]);
        if (c == NULL)
            goto error;
        int truth = PyObject_IsTrue(c);
        if (truth > 0) {
            truth = u64_of(c, &u);
            if (truth == 1 && u == 0)
                truth = 0;
        } else if (truth == 0) {
            truth = 2; /* zero: absent */
        }
        Py_DECREF(c);
        if (truth < 0)
            goto error;
        if (truth == 0)
            goto refuse;
        if (truth == 1) {
            pv |= M(7 + i);
            put_be(&body, u, 8);
        }
    }
    Py_CLEAR(v);
    /* lifetimes */
    TRY(put_lifetime(&body, &pv, sa, s_soft, 9));
    TRY(put_lifetime(&body, &pv, sa, s_hard, 12));
    /* path MTU, its expiry, encapsulation */
    uint64_t pmtu;
    TRY(u64_attr(sa, s_path_mtu, &pmtu));
    if (pmtu != DEFAULT_PMTU) {
        if (pmtu > 0xFFFF)
            goto refuse;
        pv |= M_PMTU;
        put_be(&body, pmtu, 2);
    }
    if ((v = PyObject_GetAttr(sa, s_pmtu_expires)) == NULL)
        goto error;
    double exp = 0;
    r = float_or_none(v, &exp);
    Py_CLEAR(v);
    if (r < 0)
        goto error;
    if (r == 1) {
        double left = exp - now;
        if (isnan(left) || ms_of(left > 0 ? left : 0.0, &u) < 0)
            goto refuse;
        pv |= M_PMTU_EXPIRY;
        put_be(&body, u, 8);
    }
    if ((v = PyObject_GetAttr(sa, s_encap)) == NULL)
        goto error;
    if (v != Py_None) {
        uint64_t sport, dport;
        TRY(u64_attr(v, s_sport, &sport));
        TRY(u64_attr(v, s_dport, &dport));
        if (sport < 1 || sport > 65535 || dport < 1 || dport > 65535)
            goto refuse;
        pv |= M_UDP_ENCAP;
        put_be(&body, sport, 2);
        put_be(&body, dport, 2);
    }
    Py_CLEAR(v);
    /* selectors and name, encoded by the caller */
    if (PyBytes_GET_SIZE(sel_raw)) {
        pv |= (uint32_t)sel_bits;
        put(&body, PyBytes_AS_STRING(sel_raw), PyBytes_GET_SIZE(sel_raw));
    }
    if (PyBytes_GET_SIZE(name_raw)) {
        pv |= M_SA_NAME;
        put(&body, PyBytes_AS_STRING(name_raw), PyBytes_GET_SIZE(name_raw));
    }
    /* flags */
    unsigned flags = (inbound ? F_INBOUND : 0) | (v6 ? F_IPV6 : 0) | (unsigned)df_flags;
    if ((v = PyObject_GetAttr(sa, s_mode)) == NULL)
        goto error;
    if (v == transport_mode)
        flags |= F_TRANSPORT;
    Py_CLEAR(v);
    struct {
        PyObject **name;
        unsigned flag;
        int when;
    } bools[] = {
        {&s_esn, F_ESN, 1}, {&s_overflow_permitted, F_OVERFLOW, 1},
        {&s_copy_dscp, F_NO_DSCP_COPY, 0}, {&s_soft_fired, F_SOFT_FIRED, 1},
        {&s_dead, F_DEAD, 1}, {&s_rekey_requested, F_REKEY, 1},
    };
    for (size_t i = 0; i < sizeof(bools) / sizeof(bools[0]); i++) {
        int b = bool_attr(sa, *bools[i].name);
        if (b < 0)
            goto error;
        if (b == bools[i].when)
            flags |= bools[i].flag;
    }
    uint64_t spi;
    TRY(u64_attr(sa, s_spi, &spi));
    if (spi > 0xFFFFFFFFu)
        goto refuse;
    Py_ssize_t alen = PyBytes_GET_SIZE(src);
    if (PyBytes_GET_SIZE(dst) != alen || (alen != 4 && alen != 16) || body.over)
        goto refuse;
    Py_ssize_t used = 16 + 2 * alen + body.len;
    Py_ssize_t total = (used + CDB_UNIT - 1) / CDB_UNIT * CDB_UNIT;
    if (total > CDB_MAX)
        goto refuse;
    PyObject *res = PyBytes_FromStringAndSize(NULL, total);
    if (res == NULL)
        return NULL;
    unsigned char *d = (unsigned char *)PyBytes_AS_STRING(res);
    memset(d, 0, (size_t)total);
    d[0] = FPT_IPSEC_SA >> 8;
    d[1] = FPT_IPSEC_SA & 0xFF;
    d[2] = (unsigned char)(total / CDB_UNIT);
    d[3] = 0x80;
    d[4] = (unsigned char)(pv >> 24);
    d[5] = (unsigned char)(pv >> 16);
    d[6] = (unsigned char)(pv >> 8);
    d[7] = (unsigned char)pv;
    d[8] = VERSION;
    d[9] = (unsigned char)proto;
    d[10] = (unsigned char)(flags >> 8);
    d[11] = (unsigned char)flags;
    d[12] = (unsigned char)(spi >> 24);
    d[13] = (unsigned char)(spi >> 16);
    d[14] = (unsigned char)(spi >> 8);
    d[15] = (unsigned char)spi;
    memcpy(d + 16, PyBytes_AS_STRING(src), (size_t)alen);
    memcpy(d + 16 + alen, PyBytes_AS_STRING(dst), (size_t)alen);
    memcpy(d + 16 + 2 * alen, body.buf, (size_t)body.len);
    return res;
refuse:
    Py_XDECREF(v);
    Py_RETURN_NONE;
error:
    Py_XDECREF(v);
    return NULL;
}

static PyObject *
cdb_setup(PyObject *self, PyObject *arg)
{
    Py_XSETREF(transport_mode, Py_NewRef(arg));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"read", cdb_read, METH_O,
     "read(cdb) -> (spi, flags, proto, src, dst, enc, enc_key, integ, integ_key, seq, window, "
     "replay_top, replay_bitmap, age_ms, bytes, packets, limits, pmtu, pmtu_expiry_ms, "
     "encap_ports, selector_bits, selectors, name) | None"},
    {"write", (PyCFunction)(void (*)(void))cdb_write, METH_FASTCALL,
     "write(sa, now, seq, inbound, top, bitmap, sel_bits, sel_raw, name_raw, src, dst, v6, "
     "df_flags) -> CDB | None"},
    {"setup", cdb_setup, METH_O, "setup(Mode.TRANSPORT)"},
    {NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "ipsecct.ct._cdb",
    "The strict context (CDB) reader in C (see ipsecct.ct.context._read_native).", -1, methods,
};

PyMODINIT_FUNC
PyInit__cdb(void)
{
    struct {
        PyObject **var;
        const char *name;
    } names[] = {
        {&s_protocol, "protocol"}, {&s_enc, "enc"}, {&s_enc_key, "enc_key"},
        {&s_integ, "integ"}, {&s_integ_key, "integ_key"}, {&s_replay_window, "replay_window"},
        {&s_created, "created"}, {&s_counters, "counters"}, {&s_bytes, "bytes"},
        {&s_packets, "packets"}, {&s_soft, "soft"}, {&s_hard, "hard"}, {&s_seconds, "seconds"},
        {&s_path_mtu, "path_mtu"}, {&s_pmtu_expires, "pmtu_expires"}, {&s_encap, "encap"},
        {&s_sport, "sport"}, {&s_dport, "dport"}, {&s_mode, "mode"}, {&s_esn, "esn"},
        {&s_overflow_permitted, "overflow_permitted"}, {&s_copy_dscp, "copy_dscp"},
        {&s_soft_fired, "soft_fired"}, {&s_dead, "dead"},
        {&s_rekey_requested, "rekey_requested"}, {&s_spi, "spi"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].var == NULL && (*names[i].var = PyUnicode_InternFromString(names[i].name)) == NULL)
            return NULL;
    }
    return PyModule_Create(&moduledef);
}
