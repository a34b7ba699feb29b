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
#include <structmember.h>
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
#define F_TRANSPORT (1u << 13)
#define F_OVERFLOW (1u << 11)
#define F_NO_DSCP_COPY (1u << 10)
#define F_SOFT_FIRED (1u << 7)
#define F_DEAD (1u << 6)
#define F_REKEY (1u << 5)
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

/* One CDB's fields, as cdb_parse found them (offsets into the CDB). */
typedef struct {
    uint32_t spi, pv, window;
    unsigned flags, proto;
    Py_ssize_t alen;
    uint64_t seq, top, age, nbytes, npackets, lim[6];
    int have_lim, lim_set[6];
    long pmtu, enc, integ;
    long long expiry, ports;
    Py_ssize_t enc_off, enc_len, integ_off, integ_len;
    Py_ssize_t bitmap_off, bitmap_len, sel_off, sel_len, name_off, name_len;
} Cdb;

/* Checks one CDB's layout and canonical form (everything but the algorithm tables and the
 * selector ranges' order): 1 and *c filled if it is exactly what the writer makes, else 0. */
static int
cdb_parse(const unsigned char *d, Py_ssize_t n, Cdb *c)
{
    Py_ssize_t pos;
    memset(c, 0, sizeof(*c));
    c->window = DEFAULT_WINDOW;
    c->pmtu = DEFAULT_PMTU;
    c->expiry = c->ports = -1;
    c->enc = c->integ = -1;
    c->bitmap_off = c->sel_off = c->name_off = -1;

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
    c->spi = spi;
    c->pv = pv;
    c->flags = flags;
    c->proto = proto;
    c->alen = alen;

    /* transforms and keys (the tables are checked by the caller) */
    if (proto == 50) {
        if ((pv & (M_AH_INTEG | M_ESP_ENC)) != M_ESP_ENC)
            goto refuse;
        NEED(3);
        c->enc = be16(d + pos);
        c->enc_len = d[pos + 2];
        c->enc_off = pos + 3;
        pos += 3;
        NEED(c->enc_len);
        pos += c->enc_len;
        if (pv & M_ESP_INTEG) {
            NEED(3);
            c->integ = be16(d + pos);
            c->integ_len = d[pos + 2];
            c->integ_off = pos + 3;
            pos += 3;
            NEED(c->integ_len);
            pos += c->integ_len;
        }
    } else if (proto == 51) {
        if ((pv & (M_AH_INTEG | M_ESP_ENC | M_ESP_INTEG)) != M_AH_INTEG)
            goto refuse;
        NEED(3);
        c->integ = be16(d + pos);
        c->integ_len = d[pos + 2];
        c->integ_off = pos + 3;
        pos += 3;
        NEED(c->integ_len);
        pos += c->integ_len;
    } else {
        goto refuse;
    }
    /* sequence number and anti-replay */
    if (pv & M_SEQ) {
        NEED(8);
        c->seq = be64(d + pos);
        pos += 8;
        if (inbound || c->seq == 0 || (!esn && c->seq > 0xFFFFFFFFu))
            goto refuse;
    }
    if (pv & M_WINDOW) {
        NEED(4);
        c->window = be32(d + pos);
        pos += 4;
        if (c->window == DEFAULT_WINDOW || c->window % 32 || c->window > CDB_MAX * 8)
            goto refuse;
    }
    if (pv & M_REPLAY) {
        NEED(8);
        c->top = be64(d + pos);
        if (!inbound || c->top == 0)
            goto refuse;
        pos += 8;
        c->bitmap_len = c->window / 8;
        NEED(c->bitmap_len);
        c->bitmap_off = pos;
        pos += c->bitmap_len;
    }
    /* age and counters: present only when not zero */
    if (pv & M_AGE) {
        NEED(8);
        c->age = be64(d + pos);
        pos += 8;
        if (c->age == 0 || c->age > MAX_DURATION_MS)
            goto refuse;
    }
    if (pv & M_BYTES) {
        NEED(8);
        c->nbytes = be64(d + pos);
        pos += 8;
        if (c->nbytes == 0)
            goto refuse;
    }
    if (pv & M_PACKETS) {
        NEED(8);
        c->npackets = be64(d + pos);
        pos += 8;
        if (c->npackets == 0)
            goto refuse;
    }
    /* lifetimes: soft time, bytes, packets, hard time, bytes, packets */
    if (pv & M_LIMITS) {
        c->have_lim = 1;
        for (int i = 0; i < 6; i++) {
            if (pv & M(9 + i)) {
                NEED(8);
                c->lim[i] = be64(d + pos);
                c->lim_set[i] = 1;
                pos += 8;
            }
        }
        if ((c->lim_set[0] && c->lim[0] > MAX_DURATION_MS) ||
            (c->lim_set[3] && c->lim[3] > MAX_DURATION_MS))
            goto refuse;
    }
    /* path MTU and encapsulation */
    if (pv & M_PMTU) {
        NEED(2);
        c->pmtu = be16(d + pos);
        pos += 2;
        if (c->pmtu == DEFAULT_PMTU || c->pmtu < 68)
            goto refuse;
    }
    if (pv & M_PMTU_EXPIRY) {
        NEED(8);
        uint64_t e = be64(d + pos);
        pos += 8;
        if (e > MAX_DURATION_MS)
            goto refuse;
        c->expiry = (long long)e;
    }
    if (pv & M_UDP_ENCAP) {
        NEED(4);
        if (be16(d + pos) == 0 || be16(d + pos + 2) == 0)
            goto refuse;
        c->ports = (long long)be32(d + pos);
        pos += 4;
    }
    /* selectors: the layout here; the caller checks the ranges when it builds them */
    if (pv & M_SELECTORS) {
        c->sel_off = pos;
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
        c->sel_len = pos - c->sel_off;
    } else if (pv & M_SEL_PARTS) {
        goto refuse;
    }
    if (pv & M_SA_NAME) {
        NEED(1);
        c->name_len = d[pos];
        if (c->name_len == 0)
            goto refuse;
        pos += 1;
        NEED(c->name_len);
        c->name_off = pos;
        pos += c->name_len;
    }
    /* what is left is padding: fewer than 8 octets, all zero */
    if (n - pos >= CDB_UNIT)
        goto refuse;
    for (Py_ssize_t i = pos; i < n; i++)
        if (d[i])
            goto refuse;
    return 1;
refuse:
    return 0;
}

static PyObject *
cdb_read(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *d = view.buf;
    PyObject *ret = NULL;
    Cdb c;
    if (!cdb_parse(d, view.len, &c)) {
        ret = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *limits;
    if (c.have_lim) {
        limits = PyTuple_New(6);
        if (limits == NULL)
            goto done;
        for (int i = 0; i < 6; i++) {
            PyObject *v;
            if (c.lim_set[i]) {
                v = PyLong_FromUnsignedLongLong(c.lim[i]);
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
        (unsigned long)c.spi, c.flags, c.proto,
        (const char *)d + 16, c.alen, (const char *)d + 16 + c.alen, c.alen,
        c.enc, (const char *)d + c.enc_off, c.enc_len,
        c.integ, (const char *)d + c.integ_off, c.integ_len,
        (unsigned long long)c.seq, (unsigned long)c.window, (unsigned long long)c.top,
        c.bitmap_off < 0 ? Py_NewRef(Py_None)
                         : PyBytes_FromStringAndSize((const char *)d + c.bitmap_off, c.bitmap_len),
        (unsigned long long)c.age, (unsigned long long)c.nbytes, (unsigned long long)c.npackets,
        limits, c.pmtu, c.expiry, c.ports, (unsigned int)(c.pv & M_SEL_PARTS),
        c.sel_off < 0 ? Py_NewRef(Py_None)
                      : PyBytes_FromStringAndSize((const char *)d + c.sel_off, c.sel_len),
        c.name_off < 0 ? Py_NewRef(Py_None)
                       : PyBytes_FromStringAndSize((const char *)d + c.name_off, c.name_len));
done:
    PyBuffer_Release(&view);
    return ret;
}


/* -- the SA built in C --------------------------------------------------------------------------
 * decode(data, now) reads one CDB as read() does, checks its algorithms against the tables and
 * makes the SecurityAssociation itself: the object allocated and its slots filled, as
 * context._read_python's constructor call and SecurityAssociation.__post_init__ would (the
 * reader has checked everything __post_init__ checks), with its ReplayWindow and, for the AEAD
 * transforms, its AeadTransform made the same way. The shared parts (addresses, selectors,
 * lifetimes, encapsulation ports) come from context's caches, and from its Python helpers on a
 * miss; a non-AEAD transform from transforms.make_transform; a replay state is restored by
 * ReplayWindow.restore. Everything is given by setup_decoder() (context._setup_native).
 * Returns the SA, or None for anything the Python reader refuses (tests/test_context_fast.py
 * holds the two, and the reference, to the same SAs and verdicts).
 */
enum {
    SA_NATIVE, SA_SPI, SA_DIRECTION, SA_SRC, SA_DST, SA_PROTOCOL, SA_MODE, SA_ENC, SA_ENC_KEY,
    SA_INTEG, SA_INTEG_KEY, SA_ESN, SA_REPLAY_WINDOW, SA_SEQ, SA_SEQ_CEILING, SA_SEQ_LOW_WATER,
    SA_SEQ_RESERVE_PENDING, SA_OVERFLOW_PERMITTED, SA_SOFT, SA_HARD, SA_PATH_MTU,
    SA_PMTU_EXPIRES, SA_DF, SA_COPY_DSCP, SA_ENCAP, SA_SELECTORS, SA_NAME, SA_CREATED,
    SA_COUNTERS, SA_SOFT_FIRED, SA_DEAD, SA_REKEY_REQUESTED, SA_DECRYPT_ONLY, SA_EVENTS,
    SA_LIMITS_UNSET, SA_WINDOW, SA_TRANSFORM, SA_N
};
static const char *const sa_fields[SA_N] = {
    "native", "spi", "direction", "src", "dst", "protocol", "mode", "enc", "enc_key", "integ",
    "integ_key", "esn", "replay_window", "seq", "seq_ceiling", "seq_low_water",
    "seq_reserve_pending", "overflow_permitted", "soft", "hard", "path_mtu", "pmtu_expires", "df",
    "copy_dscp", "encap", "selectors", "name", "created", "counters", "soft_fired", "dead",
    "rekey_requested", "decrypt_only", "events", "_limits_unset", "_window", "_transform",
};
enum { W_BLOCKS, W_NBLOCKS, W_ESN, W_SIZE, W_TOP, W_N };
static const char *const window_fields[W_N] = {"_blocks", "_nblocks", "esn", "size", "top"};
enum { T_BLOCK, T_ICV_LEN, T_IV_LEN, T_ALG, T_CIPHER_KEY, T_SALT, T_N };
static const char *const aead_fields[T_N] = {
    "block", "icv_len", "iv_len", "_alg", "_cipher_key", "_salt",
};
enum { C_PACKETS, C_BYTES, C_N };
static const char *const counters_fields[C_N] = {"packets", "bytes"};

static struct {
    int ready;
    PyTypeObject *sa_type, *window_type, *aead_type, *counters_type;
    Py_ssize_t sa_off[SA_N], window_off[W_N], aead_off[T_N], counters_off[C_N];
    PyObject *directions[2], *modes[2], *df[3], *esp, *ah, *integ_none, *enc_null, *max_seq;
    PyObject *enc_table;   /* {number: (EncAlg, key lengths, aead, block, iv_len, icv_len)} */
    PyObject *integ_table; /* {number: (IntegAlg, key length)} */
    PyObject *addresses, *address;         /* cache {octets: address}, and its maker */
    PyObject *selectors, *build_selectors; /* cache {(bits, octets): Selectors}, maker */
    PyObject *encaps, *encap;              /* cache {ports: UdpEncap}, maker */
    PyObject *lifetime, *no_limit;         /* _lifetime(time_ms, bytes, packets), Lifetime() */
    PyObject *make_transform;              /* for ESP without an AEAD transform */
    PyObject *refusals;                    /* the exceptions that mean "refuse" */
} B;

/* The offset of a plain object slot, from its member descriptor: -1 (and an error) if not. */
static Py_ssize_t
slot_offset(PyObject *descr, const char *name)
{
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyErr_Format(PyExc_TypeError, "setup_decoder: %s is not a slot", name);
        return -1;
    }
    PyMemberDef *m = ((PyMemberDescrObject *)descr)->d_member;
    if (m->type != T_OBJECT_EX || (m->flags & READONLY)) {
        PyErr_Format(PyExc_TypeError, "setup_decoder: %s is not a writable object slot", name);
        return -1;
    }
    return m->offset;
}

/* The offsets of ``names`` in ``type``: looked up in ``slots`` (a dict) if given, else as the
 * type's attributes. */
static int
slot_offsets(PyObject *type, PyObject *slots, const char *const *names, int n, Py_ssize_t *out)
{
    for (int i = 0; i < n; i++) {
        PyObject *d;
        if (slots != NULL) {
            d = Py_XNewRef(PyDict_GetItemString(slots, names[i]));
        } else {
            d = PyObject_GetAttrString(type, names[i]);
            if (d == NULL)
                return -1;
        }
        out[i] = slot_offset(d, names[i]);
        Py_XDECREF(d);
        if (out[i] < 0)
            return -1;
    }
    return 0;
}

static PyObject *
config_item(PyObject *config, const char *key)
{
    PyObject *v = PyDict_GetItemString(config, key);
    if (v == NULL)
        PyErr_Format(PyExc_KeyError, "setup_decoder: %s missing", key);
    return Py_XNewRef(v);
}

static int
config_items(PyObject *config, const char *key, PyObject **out, Py_ssize_t n)
{
    PyObject *t = PyDict_GetItemString(config, key);
    if (t == NULL || !PyTuple_Check(t) || PyTuple_GET_SIZE(t) != n) {
        PyErr_Format(PyExc_TypeError, "setup_decoder: %s must be a tuple of %zd", key, n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = Py_NewRef(PyTuple_GET_ITEM(t, i));
    return 0;
}

static PyObject *
cdb_setup_decoder(PyObject *self, PyObject *config)
{
    if (!PyDict_Check(config)) {
        PyErr_SetString(PyExc_TypeError, "setup_decoder(config: dict)");
        return NULL;
    }
    if (B.ready) { /* once per module object (a second call changes nothing) */
        Py_RETURN_NONE;
    }
    PyObject *sa_slots = PyDict_GetItemString(config, "sa_slots");
    if (sa_slots == NULL || !PyDict_Check(sa_slots)) {
        PyErr_SetString(PyExc_TypeError, "setup_decoder: sa_slots must be a dict");
        return NULL;
    }
    PyObject **objs[] = {
        (PyObject **)&B.sa_type, (PyObject **)&B.window_type, (PyObject **)&B.aead_type,
        (PyObject **)&B.counters_type, &B.esp, &B.ah, &B.integ_none, &B.enc_null, &B.max_seq,
        &B.enc_table, &B.integ_table, &B.addresses, &B.address, &B.selectors,
        &B.build_selectors, &B.encaps, &B.encap, &B.lifetime, &B.no_limit, &B.make_transform,
        &B.refusals,
    };
    const char *keys[] = {
        "sa_type", "window_type", "aead_type", "counters_type", "esp", "ah", "integ_none",
        "enc_null", "max_seq", "enc_table", "integ_table", "addresses", "address", "selectors",
        "build_selectors", "encaps", "encap", "lifetime", "no_limit", "make_transform",
        "refusals",
    };
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        if ((*objs[i] = config_item(config, keys[i])) == NULL)
            return NULL;
    }
    PyTypeObject *types[] = {B.sa_type, B.window_type, B.aead_type, B.counters_type};
    for (int i = 0; i < 4; i++) {
        if (!PyType_Check(types[i])) {
            PyErr_SetString(PyExc_TypeError, "setup_decoder: a type expected");
            return NULL;
        }
    }
    if (!PyDict_Check(B.enc_table) || !PyDict_Check(B.integ_table) ||
        !PyDict_Check(B.addresses) || !PyDict_Check(B.selectors) || !PyDict_Check(B.encaps)) {
        PyErr_SetString(PyExc_TypeError, "setup_decoder: tables and caches must be dicts");
        return NULL;
    }
    if (config_items(config, "directions", B.directions, 2) < 0 ||
        config_items(config, "modes", B.modes, 2) < 0 || config_items(config, "df", B.df, 3) < 0)
        return NULL;
    if (slot_offsets((PyObject *)B.sa_type, sa_slots, sa_fields, SA_N, B.sa_off) < 0 ||
        slot_offsets((PyObject *)B.window_type, NULL, window_fields, W_N, B.window_off) < 0 ||
        slot_offsets((PyObject *)B.aead_type, NULL, aead_fields, T_N, B.aead_off) < 0 ||
        slot_offsets((PyObject *)B.counters_type, NULL, counters_fields, C_N, B.counters_off) < 0)
        return NULL;
    B.ready = 1;
    Py_RETURN_NONE;
}

/* A new object of ``type`` with its slots (at ``off``) set to ``vals`` (references stolen,
 * each one set), or NULL (the references released). */
static PyObject *
filled(PyTypeObject *type, const Py_ssize_t *off, PyObject **vals, int n)
{
    PyObject *o = type->tp_alloc(type, 0);
    if (o == NULL) {
        for (int i = 0; i < n; i++)
            Py_DECREF(vals[i]);
        return NULL;
    }
    for (int i = 0; i < n; i++)
        *(PyObject **)((char *)o + off[i]) = vals[i];
    return o;
}

/* The value of a cache, or what ``make(*args)`` makes on a miss (NULL on error). */
static PyObject *
cached(PyObject *cache, PyObject *key, PyObject *make, PyObject *const *args, size_t nargs)
{
    PyObject *v = PyDict_GetItemWithError(cache, key);
    if (v != NULL)
        return Py_NewRef(v);
    if (PyErr_Occurred())
        return NULL;
    return PyObject_Vectorcall(make, args, nargs, NULL);
}

static PyObject *
address_of(const unsigned char *p, Py_ssize_t alen)
{
    PyObject *raw = PyBytes_FromStringAndSize((const char *)p, alen);
    if (raw == NULL)
        return NULL;
    PyObject *a = cached(B.addresses, raw, B.address, &raw, 1);
    Py_DECREF(raw);
    return a;
}

static PyObject *
u64_or_none(int set, uint64_t v)
{
    return set ? PyLong_FromUnsignedLongLong(v) : Py_NewRef(Py_None);
}

static PyObject *
lifetime_of(const Cdb *c, int first)
{
    PyObject *args[3];
    for (int i = 0; i < 3; i++) {
        if ((args[i] = u64_or_none(c->lim_set[first + i], c->lim[first + i])) == NULL) {
            while (i--)
                Py_DECREF(args[i]);
            return NULL;
        }
    }
    PyObject *lt = PyObject_Vectorcall(B.lifetime, args, 3, NULL);
    for (int i = 0; i < 3; i++)
        Py_DECREF(args[i]);
    return lt;
}

/* Is ``n`` one of the integers of the tuple ``lengths``? */
static int
length_in(Py_ssize_t n, PyObject *lengths)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(lengths); i++) {
        if (PyLong_AsSsize_t(PyTuple_GET_ITEM(lengths, i)) == n)
            return 1;
    }
    return 0;
}

static PyObject *
table_entry(PyObject *table, long number)
{
    PyObject *k = PyLong_FromLong(number);
    if (k == NULL)
        return NULL;
    PyObject *e = PyDict_GetItemWithError(table, k);
    Py_DECREF(k);
    return e; /* borrowed; NULL without an error: not in the table */
}

static PyObject *
new_window(uint32_t size, int esn)
{
    Py_ssize_t nblocks = size ? (size + 63) / 64 + 1 : 0;
    PyObject *vals[W_N] = {PyList_New(nblocks), PyLong_FromSsize_t(nblocks),
                           PyBool_FromLong(esn), PyLong_FromUnsignedLong(size), PyLong_FromLong(0)};
    for (int i = 0; i < W_N; i++) {
        if (vals[i] == NULL) {
            for (int j = 0; j < W_N; j++)
                Py_XDECREF(vals[j]);
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < nblocks; i++)
        PyList_SET_ITEM(vals[W_BLOCKS], i, PyLong_FromLong(0)); /* a cached small int */
    return filled(B.window_type, B.window_off, vals, W_N);
}

static PyObject *
new_aead(PyObject *info, PyObject *alg, const unsigned char *key, Py_ssize_t klen)
{
    PyObject *vals[T_N] = {
        Py_NewRef(PyTuple_GET_ITEM(info, 3)), Py_NewRef(PyTuple_GET_ITEM(info, 5)),
        Py_NewRef(PyTuple_GET_ITEM(info, 4)), Py_NewRef(alg),
        PyBytes_FromStringAndSize((const char *)key, klen - 4),
        PyBytes_FromStringAndSize((const char *)key + klen - 4, 4),
    };
    if (vals[T_CIPHER_KEY] == NULL || vals[T_SALT] == NULL) {
        for (int i = 0; i < T_N; i++)
            Py_XDECREF(vals[i]);
        return NULL;
    }
    return filled(B.aead_type, B.aead_off, vals, T_N);
}

static PyObject *
cdb_decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "decode() takes 2 arguments");
        return NULL;
    }
    if (!B.ready) {
        PyErr_SetString(PyExc_RuntimeError, "_cdb.setup_decoder() was not called");
        return NULL;
    }
    double now = PyFloat_AsDouble(args[1]);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *d = view.buf;
    PyObject *v[SA_N] = {NULL};
    PyObject *sa = NULL, *ret = NULL;
    Cdb c;
    if (!cdb_parse(d, view.len, &c))
        goto refuse;

    /* transforms and keys, against the tables */
    int aead = 0;
    PyObject *enc_info = NULL;
    if (c.proto == 50) {
        if ((enc_info = table_entry(B.enc_table, c.enc)) == NULL)
            goto missing;
        if (!length_in(c.enc_len, PyTuple_GET_ITEM(enc_info, 1)))
            goto refuse;
        aead = PyObject_IsTrue(PyTuple_GET_ITEM(enc_info, 2));
        v[SA_ENC] = Py_NewRef(PyTuple_GET_ITEM(enc_info, 0));
        v[SA_ENC_KEY] = PyBytes_FromStringAndSize((const char *)d + c.enc_off, c.enc_len);
        if (c.integ >= 0) {
            PyObject *ii = table_entry(B.integ_table, c.integ);
            if (ii == NULL)
                goto missing;
            if (aead || PyLong_AsSsize_t(PyTuple_GET_ITEM(ii, 1)) != c.integ_len)
                goto refuse;
            v[SA_INTEG] = Py_NewRef(PyTuple_GET_ITEM(ii, 0));
            v[SA_INTEG_KEY] = PyBytes_FromStringAndSize((const char *)d + c.integ_off, c.integ_len);
        } else if (!aead) {
            goto refuse;
        } else {
            v[SA_INTEG] = Py_NewRef(B.integ_none);
            v[SA_INTEG_KEY] = PyBytes_FromStringAndSize(NULL, 0);
        }
        v[SA_PROTOCOL] = Py_NewRef(B.esp);
    } else {
        PyObject *ii = table_entry(B.integ_table, c.integ);
        if (ii == NULL)
            goto missing;
        if (PyLong_AsSsize_t(PyTuple_GET_ITEM(ii, 1)) != c.integ_len)
            goto refuse;
        v[SA_ENC] = Py_NewRef(B.enc_null);
        v[SA_ENC_KEY] = PyBytes_FromStringAndSize(NULL, 0);
        v[SA_INTEG] = Py_NewRef(PyTuple_GET_ITEM(ii, 0));
        v[SA_INTEG_KEY] = PyBytes_FromStringAndSize((const char *)d + c.integ_off, c.integ_len);
        v[SA_PROTOCOL] = Py_NewRef(B.ah);
    }
    if (v[SA_ENC_KEY] == NULL || v[SA_INTEG_KEY] == NULL)
        goto error;
    /* the shared parts */
    unsigned flags = c.flags;
    int esn = (flags & F_ESN) != 0;
    if ((v[SA_SRC] = address_of(d + 16, c.alen)) == NULL ||
        (v[SA_DST] = address_of(d + 16 + c.alen, c.alen)) == NULL)
        goto error;
    if (c.have_lim) {
        if ((v[SA_SOFT] = lifetime_of(&c, 0)) == NULL || (v[SA_HARD] = lifetime_of(&c, 3)) == NULL)
            goto error;
    } else {
        v[SA_SOFT] = Py_NewRef(B.no_limit);
        v[SA_HARD] = Py_NewRef(B.no_limit);
    }
    if (c.ports >= 0) {
        PyObject *k = PyLong_FromLongLong(c.ports);
        if (k == NULL)
            goto error;
        v[SA_ENCAP] = cached(B.encaps, k, B.encap, &k, 1);
        Py_DECREF(k);
        if (v[SA_ENCAP] == NULL)
            goto error;
    } else {
        v[SA_ENCAP] = Py_NewRef(Py_None);
    }
    if (c.sel_off >= 0) {
        PyObject *k = Py_BuildValue("(Iy#)", (unsigned int)(c.pv & M_SEL_PARTS),
                                    (const char *)d + c.sel_off, c.sel_len);
        if (k == NULL)
            goto error;
        PyObject *kargs[2] = {PyTuple_GET_ITEM(k, 0), PyTuple_GET_ITEM(k, 1)};
        v[SA_SELECTORS] = cached(B.selectors, k, B.build_selectors, kargs, 2);
        Py_DECREF(k);
        if (v[SA_SELECTORS] == NULL)
            goto error;
        if (v[SA_SELECTORS] == Py_None) /* a reversed range */
            goto refuse;
    } else {
        v[SA_SELECTORS] = Py_NewRef(Py_None);
    }
    if (c.name_off >= 0)
        v[SA_NAME] = PyUnicode_DecodeUTF8((const char *)d + c.name_off, c.name_len, NULL);
    else
        v[SA_NAME] = PyUnicode_FromStringAndSize(NULL, 0);
    if (v[SA_NAME] == NULL)
        goto error;
    /* the replay window and the transform (__post_init__) */
    if ((v[SA_WINDOW] = new_window(c.window, esn)) == NULL)
        goto error;
    if (c.proto != 50) {
        v[SA_TRANSFORM] = Py_NewRef(Py_None);
    } else if (aead) {
        v[SA_TRANSFORM] = new_aead(enc_info, v[SA_ENC], d + c.enc_off, c.enc_len);
    } else {
        PyObject *targs[4] = {v[SA_ENC], v[SA_ENC_KEY], v[SA_INTEG], v[SA_INTEG_KEY]};
        v[SA_TRANSFORM] = PyObject_Vectorcall(B.make_transform, targs, 4, NULL);
    }
    if (v[SA_TRANSFORM] == NULL)
        goto error;
    /* the counters */
    PyObject *cv[C_N] = {PyLong_FromUnsignedLongLong(c.npackets),
                         PyLong_FromUnsignedLongLong(c.nbytes)};
    if (cv[0] == NULL || cv[1] == NULL) {
        Py_XDECREF(cv[0]);
        Py_XDECREF(cv[1]);
        goto error;
    }
    if ((v[SA_COUNTERS] = filled(B.counters_type, B.counters_off, cv, C_N)) == NULL)
        goto error;
    /* the plain fields */
    v[SA_NATIVE] = Py_NewRef(Py_None);
    v[SA_SPI] = PyLong_FromUnsignedLong(c.spi);
    v[SA_DIRECTION] = Py_NewRef(B.directions[(flags & F_INBOUND) != 0]);
    v[SA_MODE] = Py_NewRef(B.modes[(flags & F_TRANSPORT) != 0]);
    v[SA_ESN] = PyBool_FromLong(esn);
    v[SA_REPLAY_WINDOW] = PyLong_FromUnsignedLong(c.window);
    v[SA_SEQ] = PyLong_FromUnsignedLongLong(c.seq);
    v[SA_SEQ_CEILING] = Py_NewRef(B.max_seq);
    v[SA_SEQ_LOW_WATER] = Py_NewRef(B.max_seq);
    v[SA_SEQ_RESERVE_PENDING] = Py_NewRef(Py_False);
    v[SA_OVERFLOW_PERMITTED] = PyBool_FromLong((flags & F_OVERFLOW) != 0);
    v[SA_PATH_MTU] = PyLong_FromLong(c.pmtu);
    v[SA_PMTU_EXPIRES] = c.expiry < 0 ? Py_NewRef(Py_None)
                                      : PyFloat_FromDouble(now + (double)c.expiry / 1000.0);
    v[SA_DF] = Py_NewRef(B.df[(flags >> F_DF_SHIFT) & 3]);
    v[SA_COPY_DSCP] = PyBool_FromLong((flags & F_NO_DSCP_COPY) == 0);
    v[SA_CREATED] = PyFloat_FromDouble(now - (double)c.age / 1000.0);
    v[SA_SOFT_FIRED] = PyBool_FromLong((flags & F_SOFT_FIRED) != 0);
    v[SA_DEAD] = PyBool_FromLong((flags & F_DEAD) != 0);
    v[SA_REKEY_REQUESTED] = PyBool_FromLong((flags & F_REKEY) != 0);
    v[SA_DECRYPT_ONLY] = Py_NewRef(Py_False);
    v[SA_EVENTS] = PyList_New(0);
    int unset = 1; /* both lifetimes unlimited: none of their six limits is set */
    for (int i = 0; i < 6; i++)
        unset &= !c.lim_set[i];
    v[SA_LIMITS_UNSET] = PyBool_FromLong(unset);
    for (int i = 0; i < SA_N; i++) {
        if (v[i] == NULL)
            goto error;
    }
    sa = filled(B.sa_type, B.sa_off, v, SA_N);
    memset(v, 0, sizeof(v)); /* stolen (or released) by filled() */
    if (sa == NULL)
        goto error;
    if (c.bitmap_off >= 0) { /* the replay state: ReplayWindow.restore checks and loads it */
        PyObject *window = *(PyObject **)((char *)sa + B.sa_off[SA_WINDOW]);
        PyObject *r = PyObject_CallMethod(window, "restore", "Ky#", (unsigned long long)c.top,
                                          (const char *)d + c.bitmap_off, c.bitmap_len);
        if (r == NULL)
            goto error;
        Py_DECREF(r);
    }
    ret = sa;
    sa = NULL;
    goto done;
missing:
    if (PyErr_Occurred())
        goto error;
refuse:
    ret = Py_NewRef(Py_None);
    goto done;
error:
    if (PyErr_Occurred() && PyErr_GivenExceptionMatches(PyErr_Occurred(), B.refusals)) {
        PyErr_Clear();
        ret = Py_NewRef(Py_None);
    }
done:
    for (int i = 0; i < SA_N; i++)
        Py_XDECREF(v[i]);
    Py_XDECREF(sa);
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
    {"decode", (PyCFunction)(void (*)(void))cdb_decode, METH_FASTCALL,
     "decode(cdb, now) -> SecurityAssociation | None"},
    {"setup_decoder", cdb_setup_decoder, METH_O, "setup_decoder(config: dict)"},
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
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    PyObject *fields = PyTuple_New(SA_N); /* what decode() fills: context checks it at import */
    if (fields == NULL)
        goto fail;
    for (int i = 0; i < SA_N; i++) {
        PyObject *f = PyUnicode_FromString(sa_fields[i]);
        if (f == NULL) {
            Py_DECREF(fields);
            goto fail;
        }
        PyTuple_SET_ITEM(fields, i, f);
    }
    if (PyModule_AddObject(m, "SA_FIELDS", fields) < 0) {
        Py_DECREF(fields);
        goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
