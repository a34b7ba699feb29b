/*
 * ipsecct.ipsec._esp: the native data path for established ESP SAs (issue 11).
 *
 * The protocol stays in Python (ipsecct.ipsec.engine); this module does the per-packet work of
 * SAs the engine hands it: AEAD seal and open with an OpenSSL EVP context keyed once per SA,
 * the sequence number (ESN), the anti-replay window (RFC 4303 3.4.3, RFC 6479 ring layout,
 * the same as ipsecct.ipsec.replay), counters and lifetimes, the inner header and selector
 * checks, and batched I/O (recvmmsg / sendmmsg on UDP, repeated read / write on a TUN device).
 *
 * Anything the C side cannot finish exactly as the Python reference would is handed back
 * unchanged ("punted"): unknown SPIs and flows, inactive (frozen) SAs, the packet that would
 * reach a lifetime or the sequence-number ceiling, packets above the path MTU, and every
 * drop the Python engine treats specially. Drops that are final (replay, ICV, padding,
 * malformed inner packet, selector mismatch, dummy packets) are counted here.
 *
 * Untrusted input: every length is checked before it is read; nothing here trusts a length
 * field of a packet without comparing it with the bytes received.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define ROUNDS 4 /* batches per call while they come full: fewer trips through the event loop */
#define BUFSZ 65600 /* an IP packet of 65535 octets plus ESP overhead */
#define TAG 16
#define MAX_RANGES 64

/* Drop codes: the order of ipsecct.ipsec.esp.Drop */
enum { D_NO_SA, D_REPLAY, D_ICV, D_PADDING, D_POLICY, D_LIFETIME, D_MALFORMED,
       D_SEQ_EXHAUSTED, D_DUMMY, D_MTU, N_DROPS };
/* the classes of what the forwarding thread hands up, each with its budget (up_budget) */
enum { UP_OWN, UP_ESP, UP_IKE, UP_INNER, N_UP };

#define PUNT (-1)
#define DELIVER (-2)
#define SIGNAL (-3)
#define NH_SIGNAL 253
#define NH_NONE 59

typedef struct {
    int version;
    uint8_t first[16]; /* big endian, IPv4 in the first 4 octets */
    uint8_t last[16];
} Range;

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *ctx;
    PyObject *owner;
    uint32_t spi;
    int outbound, esn, active, has_dest, sel_on;
    int touched; /* in the touched list (see touch()) */
    uint8_t salt[4];
    uint64_t seq;      /* outbound: last sequence number sent */
    uint64_t ceiling;  /* outbound: highest sequence number this side may send */
    uint64_t packets, bytes;
    uint64_t limit_packets, limit_bytes; /* punt the packet that would reach these */
    double deadline;                     /* punt at now >= deadline */
    uint32_t mtu, outer_overhead;        /* outbound: path MTU; outer IP (+UDP) header */
    uint32_t wsize, nblocks;
    uint64_t top;
    uint64_t *blocks;
    struct sockaddr_storage dest;
    socklen_t destlen;
    int sel_proto, ports_any;
    int lp_first, lp_last, rp_first, rp_last;
    Range *local; /* PyMem, nlocal entries (only SAs with selectors pay for them) */
    int nlocal;
    Range *remote;
    int nremote;
} SAObject;

static PyTypeObject SAType;

/* ---------------------------------------------------------------- SA life cycle */

static int
sa_init(SAObject *self, PyObject *args, PyObject *kwds)
{
    static char *kw[] = {"spi", "outbound", "alg", "key", "esn", "window", "owner", NULL};
    unsigned long spi;
    int outbound, alg, esn;
    unsigned int window;
    Py_buffer key;
    PyObject *owner;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "kpiy*pIO", kw, &spi, &outbound, &alg, &key,
                                     &esn, &window, &owner))
        return -1;
    const EVP_CIPHER *cipher = NULL;
    if (alg == 0) {
        if (key.len == 20)
            cipher = EVP_aes_128_gcm();
        else if (key.len == 28)
            cipher = EVP_aes_192_gcm();
        else if (key.len == 36)
            cipher = EVP_aes_256_gcm();
    } else if (alg == 1 && key.len == 36) {
        cipher = EVP_chacha20_poly1305();
    }
    if (cipher == NULL || spi > 0xFFFFFFFFUL || window > 65536 || window % 32) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "unsupported transform, key length, SPI or window");
        return -1;
    }
    if (self->ctx == NULL)
        self->ctx = EVP_CIPHER_CTX_new();
    if (self->ctx == NULL ||
        !EVP_CipherInit_ex(self->ctx, cipher, NULL, NULL, NULL, outbound ? 1 : 0) ||
        !EVP_CIPHER_CTX_ctrl(self->ctx, EVP_CTRL_AEAD_SET_IVLEN, 12, NULL) ||
        !EVP_CipherInit_ex(self->ctx, NULL, NULL, (const unsigned char *)key.buf, NULL,
                           outbound ? 1 : 0)) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL cipher setup failed");
        return -1;
    }
    memcpy(self->salt, (const uint8_t *)key.buf + key.len - 4, 4);
    PyBuffer_Release(&key);
    self->spi = (uint32_t)spi;
    self->outbound = outbound;
    self->esn = esn;
    self->wsize = window;
    self->nblocks = window ? (window + 63) / 64 + 1 : 0;
    PyMem_Free(self->blocks);
    self->blocks = NULL;
    if (self->nblocks) {
        self->blocks = PyMem_Calloc(self->nblocks, sizeof(uint64_t));
        if (self->blocks == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    self->top = 0;
    self->seq = 0;
    self->ceiling = 0;
    self->packets = self->bytes = 0;
    self->limit_packets = self->limit_bytes = UINT64_MAX;
    self->deadline = 1e300;
    self->mtu = 65535;
    self->outer_overhead = 28;
    self->active = 0;
    self->has_dest = 0;
    self->sel_on = 0;
    Py_INCREF(owner);
    Py_XSETREF(self->owner, owner);
    return 0;
}

static int
sa_traverse(SAObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->owner);
    return 0;
}

static int
sa_clear(SAObject *self)
{
    Py_CLEAR(self->owner);
    return 0;
}

/* Let go of the key material: the EVP context (freeing it cleanses the key schedule) and the
 * nonce salt (the last octets of the key). The SA can never be active again (set_active
 * refuses, seal and open punt); its state (seq, counters, window) stays readable. Done when
 * the SA leaves a table (the touched list may hold it a while longer: keys must not wait for
 * that) and at deallocation. */
static void
sa_wipe(SAObject *self)
{
    self->active = 0;
    if (self->ctx) {
        EVP_CIPHER_CTX_free(self->ctx);
        self->ctx = NULL;
    }
    OPENSSL_cleanse(self->salt, sizeof(self->salt));
}

static void
sa_dealloc(SAObject *self)
{
    PyObject_GC_UnTrack(self);
    sa_clear(self);
    sa_wipe(self);
    PyMem_Free(self->blocks);
    PyMem_Free(self->local);
    PyMem_Free(self->remote);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ---------------------------------------------------------------- replay window */

static uint64_t
esn_infer(const SAObject *s, uint32_t lo)
{
    if (!s->esn)
        return lo;
    uint64_t tl = s->top & 0xFFFFFFFFu, th = s->top >> 32;
    uint64_t w = s->wsize ? s->wsize : (1ULL << 31);
    if (tl >= w - 1) {
        if ((uint64_t)lo < tl - w + 1 && th < 0xFFFFFFFFu)
            th++;
    } else {
        if ((uint64_t)lo >= ((tl - w + 1) & 0xFFFFFFFFu) && th > 0)
            th--;
    }
    return (th << 32) | lo;
}

static int
window_check(const SAObject *s, uint64_t seq)
{
    if (seq == 0)
        return 0;
    if (s->wsize == 0 || seq > s->top)
        return 1;
    if (s->top - seq >= s->wsize)
        return 0;
    return !((s->blocks[(seq >> 6) % s->nblocks] >> (seq & 63)) & 1);
}

static void
window_update(SAObject *s, uint64_t seq)
{
    if (s->wsize == 0) {
        if (seq > s->top)
            s->top = seq;
        return;
    }
    if (seq > s->top) {
        uint64_t tb = s->top >> 6, nb = seq >> 6;
        if (nb - tb >= s->nblocks)
            memset(s->blocks, 0, s->nblocks * sizeof(uint64_t));
        else
            for (uint64_t b = tb + 1; b <= nb; b++)
                s->blocks[b % s->nblocks] = 0;
        s->top = seq;
    }
    s->blocks[(seq >> 6) % s->nblocks] |= 1ULL << (seq & 63);
}

/* ---------------------------------------------------------------- AEAD */

static void
put32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static void
put64(uint8_t *p, uint64_t v)
{
    put32(p, (uint32_t)(v >> 32));
    put32(p + 4, (uint32_t)v);
}

static uint32_t
get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Every packet counted on any SA here (seal and open), for ``activity()``. Every count
 * happens with the GIL held (the SA's and the table's methods, and the forwarding thread's
 * batches, which take the GIL from the first read to the last send); atomic anyway, as it
 * is read without a lock by nothing else. */
static uint64_t g_activity;

/* The touched list: each SA that counted a packet since the last take_touched(), once (its
 * `touched` flag), with a strong reference, so that fail-over replication visits those SAs'
 * tunnels only (ct/failover.py, "the idle poll"). Bounded: an SA that does not fit is not
 * listed and the overflow flag tells the taker that some SA counted unlisted (it then
 * walks every tunnel). Appended to and taken only with the GIL held (see g_activity): no
 * lock. Appending makes no Python object (an INCREF only), so it keeps the batch rule
 * (no Python code runs between a batch's first seal and its last send). */
#define TOUCHED_MAX 16384
static SAObject *g_touched[TOUCHED_MAX];
static Py_ssize_t g_ntouched;
static int g_touched_overflow;

static inline void
touch(SAObject *s)
{
    if (s->touched)
        return;
    if (g_ntouched >= TOUCHED_MAX) {
        g_touched_overflow = 1;
        return;
    }
    s->touched = 1;
    Py_INCREF(s);
    g_touched[g_ntouched++] = s;
}

/* Seal ``inner`` (len n, IP version read from it) into out: SPI | seq | IV | ct | ICV.
 * Returns the ESP length, PUNT when the Python path must handle the packet. */
static Py_ssize_t
seal(SAObject *s, const uint8_t *inner, Py_ssize_t n, double now, uint8_t *out)
{
    if (!s->active || s->ctx == NULL || !s->outbound || n < 1 || n > 65535)
        return PUNT;
    int v = inner[0] >> 4;
    int nh = v == 4 ? 4 : v == 6 ? 41 : -1;
    if (nh < 0)
        return PUNT;
    uint64_t seq = s->seq + 1;
    if (seq > s->ceiling || seq == 0)
        return PUNT;
    if (s->packets + 1 >= s->limit_packets || s->bytes + (uint64_t)n >= s->limit_bytes ||
        now >= s->deadline)
        return PUNT;
    Py_ssize_t padlen = (-(n + 2)) & 3;
    Py_ssize_t ptlen = n + padlen + 2;
    Py_ssize_t total = 16 + ptlen + TAG;
    if ((uint64_t)total + s->outer_overhead > s->mtu)
        return PUNT;
    put32(out, s->spi);
    put32(out + 4, (uint32_t)seq);
    put64(out + 8, seq);
    uint8_t *pt = out + 16;
    memcpy(pt, inner, (size_t)n);
    for (Py_ssize_t i = 0; i < padlen; i++)
        pt[n + i] = (uint8_t)(i + 1);
    pt[n + padlen] = (uint8_t)padlen;
    pt[n + padlen + 1] = (uint8_t)nh;
    uint8_t nonce[12], aad[12];
    memcpy(nonce, s->salt, 4);
    put64(nonce + 4, seq);
    int aadlen = 8;
    put32(aad, s->spi);
    if (s->esn) {
        put64(aad + 4, seq);
        aadlen = 12;
    } else {
        put32(aad + 4, (uint32_t)seq);
    }
    int outl = 0, fl = 0;
    if (!EVP_CipherInit_ex(s->ctx, NULL, NULL, NULL, nonce, 1) ||
        !EVP_CipherUpdate(s->ctx, NULL, &outl, aad, aadlen) ||
        !EVP_CipherUpdate(s->ctx, pt, &outl, pt, (int)ptlen) ||
        !EVP_CipherFinal_ex(s->ctx, pt + outl, &fl) ||
        !EVP_CIPHER_CTX_ctrl(s->ctx, EVP_CTRL_AEAD_GET_TAG, TAG, pt + ptlen))
        return PUNT; /* nothing was consumed: the Python path reports it */
    s->seq = seq;
    s->packets++;
    __atomic_fetch_add(&g_activity, 1, __ATOMIC_RELAXED);
    touch(s);
    s->bytes += (uint64_t)n;
    return total;
}

static int
in_ranges(const Range *r, int nr, int version, const uint8_t *addr)
{
    size_t len = version == 4 ? 4 : 16;
    for (int i = 0; i < nr; i++)
        if (r[i].version == version && memcmp(r[i].first, addr, len) <= 0 &&
            memcmp(addr, r[i].last, len) <= 0)
            return 1;
    return 0;
}

/* The checks of processing.inner_packet: returns the inner length to deliver, or a drop. */
static Py_ssize_t
inner_check(const SAObject *s, int nh, const uint8_t *p, Py_ssize_t n, int *drop)
{
    Py_ssize_t hlen, total;
    int version, proto, fragment;
    const uint8_t *src, *dst;
    if (nh == 4) {
        if (n < 20 || p[0] >> 4 != 4) {
            *drop = D_MALFORMED;
            return -1;
        }
        hlen = (p[0] & 0x0F) * 4;
        total = (p[2] << 8) | p[3];
        if (hlen < 20 || total < hlen || total > n) {
            *drop = D_MALFORMED;
            return -1;
        }
        version = 4;
        proto = p[9];
        fragment = ((p[6] & 0x1F) << 8 | p[7]) != 0;
        src = p + 12;
        dst = p + 16;
    } else if (nh == 41) {
        if (n < 40 || p[0] >> 4 != 6) {
            *drop = D_MALFORMED;
            return -1;
        }
        hlen = 40;
        total = 40 + ((p[4] << 8) | p[5]);
        if (total > n) {
            *drop = D_MALFORMED;
            return -1;
        }
        version = 6;
        proto = p[6];
        fragment = 0;
        src = p + 8;
        dst = p + 24;
    } else {
        *drop = D_POLICY;
        return -1;
    }
    if (s->sel_on) {
        int have = 0, lport = 0, rport = 0;
        if (!fragment && total >= hlen + 4) {
            if (proto == 1 || proto == 58) {
                lport = p[hlen];
                rport = p[hlen + 1];
                have = 1;
            } else if (proto == 6 || proto == 17 || proto == 132) {
                lport = (p[hlen + 2] << 8) | p[hlen + 3];
                rport = (p[hlen] << 8) | p[hlen + 1];
                have = 1;
            }
        }
        int ok = (s->sel_proto == 0 || s->sel_proto == proto) &&
                 in_ranges(s->local, s->nlocal, version, dst) &&
                 in_ranges(s->remote, s->nremote, version, src);
        if (ok && !s->ports_any)
            ok = have && s->lp_first <= lport && lport <= s->lp_last && s->rp_first <= rport &&
                 rport <= s->rp_last;
        if (!ok) {
            *drop = D_POLICY;
            return -1;
        }
    }
    return total;
}

/* Verify and decrypt an ESP packet (SPI .. ICV, n >= 32) under the 64-bit sequence number
 * seq into out: 1 if authentic, 0 if not. */
static int
aead_open(SAObject *s, const uint8_t *pkt, Py_ssize_t n, uint64_t seq, uint8_t *out)
{
    uint8_t nonce[12], aad[12];
    memcpy(nonce, s->salt, 4);
    memcpy(nonce + 4, pkt + 8, 8);
    int aadlen = 8;
    memcpy(aad, pkt, 4);
    if (s->esn) {
        put64(aad + 4, seq);
        aadlen = 12;
    } else {
        memcpy(aad + 4, pkt + 4, 4);
    }
    Py_ssize_t ctlen = n - 16 - TAG;
    int outl = 0, fl = 0;
    return EVP_CipherInit_ex(s->ctx, NULL, NULL, NULL, nonce, 0) &&
           EVP_CIPHER_CTX_ctrl(s->ctx, EVP_CTRL_AEAD_SET_TAG, TAG, (void *)(pkt + n - TAG)) &&
           EVP_CipherUpdate(s->ctx, NULL, &outl, aad, aadlen) &&
           EVP_CipherUpdate(s->ctx, out, &outl, pkt + 16, (int)ctlen) &&
           EVP_CipherFinal_ex(s->ctx, out + outl, &fl) > 0;
}

/* Open an ESP packet (SPI .. ICV) into out (the padded plaintext's room).
 * Returns DELIVER (inner packet at out, *olen octets), SIGNAL (payload at out, *olen octets),
 * PUNT, or a drop code >= 0. */
static int
open_esp(SAObject *s, const uint8_t *pkt, Py_ssize_t n, double now, uint8_t *out,
         Py_ssize_t *olen)
{
    if (!s->active || s->ctx == NULL || s->outbound || n < 8)
        return PUNT;
    if (s->packets + 1 >= s->limit_packets || s->bytes + (uint64_t)n >= s->limit_bytes ||
        now >= s->deadline)
        return PUNT;
    uint64_t seq = esn_infer(s, get32(pkt + 4));
    if (seq <= s->top && !window_check(s, seq))
        return D_REPLAY;
    if (n < 32)
        return D_ICV;
    Py_ssize_t ctlen = n - 16 - TAG;
    if (!aead_open(s, pkt, n, seq, out)) {
        /* With ESN, low-order bits left of the window were read as the next 2^32 subspace
         * (RFC 4303 A2.2): authentic under the window's own subspace, the packet is too old
         * (a replay drop, as without ESN), not corrupted (esp.py: _too_old_or_icv). */
        if (s->esn && seq >> 32 > s->top >> 32 && aead_open(s, pkt, n, seq - (1ULL << 32), out))
            return D_REPLAY;
        return D_ICV;
    }
    window_update(s, seq);
    if (ctlen < 2)
        return D_PADDING;
    int padlen = out[ctlen - 2];
    if (ctlen - 2 - padlen < 0)
        return D_PADDING;
    for (int i = 0; i < padlen; i++)
        if (out[ctlen - 2 - padlen + i] != (uint8_t)(i + 1))
            return D_PADDING;
    Py_ssize_t end = ctlen - 2 - padlen;
    s->packets++;
    __atomic_fetch_add(&g_activity, 1, __ATOMIC_RELAXED);
    touch(s);
    s->bytes += (uint64_t)end;
    int nh = out[ctlen - 1];
    if (nh == NH_NONE)
        return D_DUMMY;
    if (nh == NH_SIGNAL) {
        *olen = end;
        return SIGNAL;
    }
    int drop = 0;
    Py_ssize_t total = inner_check(s, nh, out, end, &drop);
    if (total < 0)
        return drop;
    *olen = total;
    return DELIVER;
}

/* ---------------------------------------------------------------- SA methods */

static PyObject *drop_or_punt(int r)
{
    if (r == PUNT)
        Py_RETURN_NONE;
    return PyLong_FromLong(r);
}

static PyObject *
sa_seal(SAObject *self, PyObject *args)
{
    Py_buffer in;
    double now;
    if (!PyArg_ParseTuple(args, "y*d", &in, &now))
        return NULL;
    if (in.len > 65535) {
        PyBuffer_Release(&in);
        Py_RETURN_NONE;
    }
    PyObject *res = PyBytes_FromStringAndSize(NULL, in.len + 16 + 3 + 2 + TAG);
    if (res == NULL) {
        PyBuffer_Release(&in);
        return NULL;
    }
    Py_ssize_t r = seal(self, in.buf, in.len, now, (uint8_t *)PyBytes_AS_STRING(res));
    PyBuffer_Release(&in);
    if (r < 0) {
        Py_DECREF(res);
        Py_RETURN_NONE;
    }
    _PyBytes_Resize(&res, r);
    return res;
}

/* open(esp, now) -> None (punt) | int (drop) | bytes (inner packet) | (253, payload) */
static PyObject *
sa_open_common(SAObject *self, const uint8_t *buf, Py_ssize_t len, double now)
{
    uint8_t stackbuf[2048];
    uint8_t *out = len <= (Py_ssize_t)sizeof(stackbuf) ? stackbuf : PyMem_Malloc((size_t)len);
    if (out == NULL)
        return PyErr_NoMemory();
    Py_ssize_t olen = 0;
    int r = open_esp(self, buf, len, now, out, &olen);
    PyObject *res;
    if (r == DELIVER)
        res = PyBytes_FromStringAndSize((const char *)out, olen);
    else if (r == SIGNAL)
        res = Py_BuildValue("(iy#)", NH_SIGNAL, out, olen);
    else
        res = drop_or_punt(r);
    if (out != stackbuf)
        PyMem_Free(out);
    return res;
}

static PyObject *
sa_open(SAObject *self, PyObject *args)
{
    Py_buffer in;
    double now;
    if (!PyArg_ParseTuple(args, "y*d", &in, &now))
        return NULL;
    PyObject *res = sa_open_common(self, in.buf, in.len, now);
    PyBuffer_Release(&in);
    return res;
}

static PyObject *
sa_export(SAObject *self, PyObject *unused)
{
    return Py_BuildValue("(KKKKy#)", (unsigned long long)self->seq,
                         (unsigned long long)self->packets, (unsigned long long)self->bytes,
                         (unsigned long long)self->top,
                         self->blocks ? (const char *)self->blocks : "",
                         (Py_ssize_t)(self->nblocks * sizeof(uint64_t)));
}

/* window() -> (top, [block, ...]): the replay window in ReplayWindow's own layout */
static PyObject *
sa_window(SAObject *self, PyObject *unused)
{
    PyObject *lst = PyList_New(self->nblocks);
    if (lst == NULL)
        return NULL;
    for (uint32_t i = 0; i < self->nblocks; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(self->blocks[i]);
        if (v == NULL) {
            Py_DECREF(lst);
            return NULL;
        }
        PyList_SET_ITEM(lst, i, v);
    }
    return Py_BuildValue("(KN)", (unsigned long long)self->top, lst);
}

static PyObject *
sa_load(SAObject *self, PyObject *args)
{
    unsigned long long seq, packets, bytes, top;
    Py_buffer blocks;
    if (!PyArg_ParseTuple(args, "KKKKy*", &seq, &packets, &bytes, &top, &blocks))
        return NULL;
    if (blocks.len != (Py_ssize_t)(self->nblocks * sizeof(uint64_t))) {
        PyBuffer_Release(&blocks);
        PyErr_SetString(PyExc_ValueError, "replay blocks do not fit the window");
        return NULL;
    }
    if (blocks.len)
        memcpy(self->blocks, blocks.buf, (size_t)blocks.len);
    PyBuffer_Release(&blocks);
    self->seq = seq;
    self->packets = packets;
    self->bytes = bytes;
    self->top = top;
    Py_RETURN_NONE;
}

/* configure(ceiling, limit_packets, limit_bytes, deadline, mtu, outer_overhead) */
static PyObject *
sa_configure(SAObject *self, PyObject *args)
{
    unsigned long long ceiling, lp, lb;
    double deadline;
    unsigned int mtu, overhead;
    if (!PyArg_ParseTuple(args, "KKKdII", &ceiling, &lp, &lb, &deadline, &mtu, &overhead))
        return NULL;
    self->ceiling = ceiling;
    self->limit_packets = lp;
    self->limit_bytes = lb;
    self->deadline = deadline;
    self->mtu = mtu;
    self->outer_overhead = overhead;
    Py_RETURN_NONE;
}

/* dest := the address octets (4: IPv4, 16: IPv6) and port; 0 (dest cleared, destlen 0) for
 * any other length. */
static int
to_sockaddr(struct sockaddr_storage *dest, socklen_t *destlen, const Py_buffer *addr,
            unsigned int port)
{
    memset(dest, 0, sizeof(*dest));
    *destlen = 0;
    if (addr->len == 4) {
        struct sockaddr_in *a = (struct sockaddr_in *)dest;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        memcpy(&a->sin_addr, addr->buf, 4);
        *destlen = sizeof(*a);
        return 1;
    }
    if (addr->len == 16) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)dest;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        memcpy(&a->sin6_addr, addr->buf, 16);
        *destlen = sizeof(*a);
        return 1;
    }
    return 0;
}

static PyObject *
sa_set_dest(SAObject *self, PyObject *args)
{
    Py_buffer addr;
    unsigned int port;
    if (!PyArg_ParseTuple(args, "y*I", &addr, &port))
        return NULL;
    self->has_dest = to_sockaddr(&self->dest, &self->destlen, &addr, port);
    PyBuffer_Release(&addr);
    Py_RETURN_NONE;
}

static int
parse_ranges(PyObject *seq, Range **outp, int *n)
{
    PyObject *fast = PySequence_Fast(seq, "ranges must be a sequence");
    if (fast == NULL)
        return -1;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(fast);
    if (len > MAX_RANGES) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "too many address ranges");
        return -1;
    }
    PyMem_Free(*outp);
    *n = 0;
    *outp = PyMem_Calloc(len ? (size_t)len : 1, sizeof(Range));
    if (*outp == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    Range *out = *outp;
    for (Py_ssize_t i = 0; i < len; i++) {
        int version;
        Py_buffer a, b;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "iy*y*", &version, &a, &b)) {
            Py_DECREF(fast);
            return -1;
        }
        size_t want = version == 4 ? 4 : 16;
        int ok = (version == 4 || version == 6) && (size_t)a.len == want && (size_t)b.len == want;
        if (ok) {
            out[i].version = version;
            memcpy(out[i].first, a.buf, want);
            memcpy(out[i].last, b.buf, want);
        }
        PyBuffer_Release(&a);
        PyBuffer_Release(&b);
        if (!ok) {
            Py_DECREF(fast);
            PyErr_SetString(PyExc_ValueError, "bad address range");
            return -1;
        }
    }
    *n = (int)len;
    Py_DECREF(fast);
    return 0;
}

/* set_selectors(None) or set_selectors(proto, ports_any, lp_first, lp_last, rp_first,
 * rp_last, local_ranges, remote_ranges) */
static PyObject *
sa_set_selectors(SAObject *self, PyObject *args)
{
    if (PyTuple_GET_SIZE(args) == 1 && PyTuple_GET_ITEM(args, 0) == Py_None) {
        self->sel_on = 0;
        Py_RETURN_NONE;
    }
    PyObject *loc, *rem;
    if (!PyArg_ParseTuple(args, "ipiiiiOO", &self->sel_proto, &self->ports_any, &self->lp_first,
                          &self->lp_last, &self->rp_first, &self->rp_last, &loc, &rem))
        return NULL;
    self->sel_on = 0;
    if (parse_ranges(loc, &self->local, &self->nlocal) < 0 ||
        parse_ranges(rem, &self->remote, &self->nremote) < 0)
        return NULL;
    self->sel_on = 1;
    Py_RETURN_NONE;
}

static PyObject *
sa_get_active(SAObject *self, void *c)
{
    return PyBool_FromLong(self->active);
}

static int
sa_set_active(SAObject *self, PyObject *v, void *c)
{
    int b = v == NULL ? 0 : PyObject_IsTrue(v);
    if (b < 0)
        return -1;
    if (b && self->ctx == NULL) {
        PyErr_SetString(PyExc_ValueError, "this SA left the table: its keys are gone");
        return -1;
    }
    self->active = b;
    return 0;
}

/* keyed: does the object still hold key material (an EVP context or a salt not cleansed)? */
static PyObject *
sa_get_keyed(SAObject *self, void *c)
{
    uint8_t any = 0;
    for (size_t i = 0; i < sizeof(self->salt); i++)
        any |= self->salt[i];
    return PyBool_FromLong(self->ctx != NULL || any != 0);
}

static PyObject *
sa_get_spi(SAObject *self, void *c)
{
    return PyLong_FromUnsignedLong(self->spi);
}

static PyObject *
sa_get_owner(SAObject *self, void *c)
{
    PyObject *o = self->owner ? self->owner : Py_None;
    Py_INCREF(o);
    return o;
}

static PyObject *
sa_get_ceiling(SAObject *self, void *c)
{
    return PyLong_FromUnsignedLongLong(self->ceiling);
}

static int
set_u64(uint64_t *field, PyObject *v)
{
    if (v == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete");
        return -1;
    }
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *field = x;
    return 0;
}

static PyObject *sa_get_seq(SAObject *self, void *c) { return PyLong_FromUnsignedLongLong(self->seq); }
static int sa_set_seq(SAObject *self, PyObject *v, void *c) { return set_u64(&self->seq, v); }
static PyObject *sa_get_packets(SAObject *self, void *c) { return PyLong_FromUnsignedLongLong(self->packets); }
static int sa_set_packets(SAObject *self, PyObject *v, void *c) { return set_u64(&self->packets, v); }
static PyObject *sa_get_bytes(SAObject *self, void *c) { return PyLong_FromUnsignedLongLong(self->bytes); }
static int sa_set_bytes(SAObject *self, PyObject *v, void *c) { return set_u64(&self->bytes, v); }

static PyMethodDef sa_methods[] = {
    {"seal", (PyCFunction)sa_seal, METH_VARARGS, "seal(inner, now) -> ESP packet | None"},
    {"open", (PyCFunction)sa_open, METH_VARARGS,
     "open(esp, now) -> inner packet | (253, payload) | drop code | None"},
    {"export", (PyCFunction)sa_export, METH_NOARGS,
     "(seq, packets, bytes, replay top, replay blocks)"},
    {"window", (PyCFunction)sa_window, METH_NOARGS, "(replay top, blocks)"},
    {"load", (PyCFunction)sa_load, METH_VARARGS, "load(seq, packets, bytes, top, blocks)"},
    {"configure", (PyCFunction)sa_configure, METH_VARARGS,
     "configure(ceiling, limit_packets, limit_bytes, deadline, mtu, outer_overhead)"},
    {"set_dest", (PyCFunction)sa_set_dest, METH_VARARGS, "set_dest(address octets, port)"},
    {"set_selectors", (PyCFunction)sa_set_selectors, METH_VARARGS, "inbound selector check"},
    {NULL},
};

static PyGetSetDef sa_getset[] = {
    {"active", (getter)sa_get_active, (setter)sa_set_active, "does C own the SA's state", NULL},
    {"keyed", (getter)sa_get_keyed, NULL, "does it still hold key material", NULL},
    {"spi", (getter)sa_get_spi, NULL, "SPI", NULL},
    {"owner", (getter)sa_get_owner, NULL, "the Python SA", NULL},
    {"ceiling", (getter)sa_get_ceiling, NULL, "highest sequence number C may send", NULL},
    {"seq", (getter)sa_get_seq, (setter)sa_set_seq, "last sequence number sent", NULL},
    {"packets", (getter)sa_get_packets, (setter)sa_set_packets, "packets counted", NULL},
    {"bytes", (getter)sa_get_bytes, (setter)sa_set_bytes, "payload octets counted", NULL},
    {NULL},
};

static PyTypeObject SAType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ipsecct.ipsec._esp.SA",
    .tp_basicsize = sizeof(SAObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Per-SA state of the native data path (no key material is readable).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)sa_init,
    .tp_dealloc = (destructor)sa_dealloc,
    .tp_traverse = (traverseproc)sa_traverse,
    .tp_clear = (inquiry)sa_clear,
    .tp_methods = sa_methods,
    .tp_getset = sa_getset,
};

/* ---------------------------------------------------------------- relays (moved tunnels) */

/*
 * A relay: where ESP under a moved tunnel's inbound SPI goes, unchanged, after its transfer
 * (the MN's packets that still reach this gateway after the cut): the target's outer
 * (NAT-T) address, until the end of the forwarding time, at most ``rate`` a second with a
 * burst of ``burst`` (a token bucket; what is over it is dropped and counted). The ESP is
 * authenticated by the target with the SA's key, which this gateway no longer holds: nothing
 * is opened or sealed here. ipsecct.ipsec.engine.RelayLimit is the Python reference of take().
 */
/*
 * The overall cap of a gateway's relays (ipsecct.ipsec.relay.RelayCap is its Python
 * reference): one token bucket that every Relay made with it takes from too, so that many
 * moved tunnels at once (a bulk transfer, then a flood under all their SPIs) relay at most
 * ``rate`` a second together, not that many times one tunnel's rate. What is over it is
 * dropped and counted here (``refused``).
 */
typedef struct {
    PyObject_HEAD
    double rate, burst, tokens, last;
    unsigned long long refused;
} RelayCapObject;

static PyTypeObject RelayCapType;

static int
relay_cap_init(RelayCapObject *self, PyObject *args, PyObject *kwds)
{
    double rate, burst;
    if (!PyArg_ParseTuple(args, "dd", &rate, &burst))
        return -1;
    if (!(rate > 0) || !(burst >= 1) || rate == INFINITY || burst == INFINITY) {
        PyErr_SetString(PyExc_ValueError, "relay cap: a finite rate > 0, burst >= 1");
        return -1;
    }
    self->rate = rate;
    self->burst = burst;
    self->tokens = burst;
    self->last = 0;
    self->refused = 0;
    return 0;
}

static PyObject *relay_cap_get_refused(RelayCapObject *self, void *c) { return PyLong_FromUnsignedLongLong(self->refused); }
static PyObject *relay_cap_get_rate(RelayCapObject *self, void *c) { return PyFloat_FromDouble(self->rate); }
static PyObject *relay_cap_get_burst(RelayCapObject *self, void *c) { return PyFloat_FromDouble(self->burst); }

static PyGetSetDef relay_cap_getset[] = {
    {"refused", (getter)relay_cap_get_refused, NULL, "datagrams dropped over the cap", NULL},
    {"rate", (getter)relay_cap_get_rate, NULL, "datagrams a second, all relays together", NULL},
    {"burst", (getter)relay_cap_get_burst, NULL, "the most at once", NULL},
    {NULL},
};

static PyTypeObject RelayCapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ipsecct.ipsec._esp.RelayCap",
    .tp_basicsize = sizeof(RelayCapObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "RelayCap(rate, burst): the overall cap of the relays made with it.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)relay_cap_init,
    .tp_getset = relay_cap_getset,
};

/* A token bucket's refill at now (both buckets: the same arithmetic as relay.py's _refill) */
static inline void
bucket_refill(double *tokens, double *last, double rate, double burst, double now)
{
    if (now > *last) {
        *tokens += (now - *last) * rate;
        if (*tokens > burst)
            *tokens = burst;
        *last = now;
    }
}

typedef struct {
    PyObject_HEAD
    struct sockaddr_storage dest;
    socklen_t destlen;
    double until, rate, burst, tokens, last;
    unsigned long long relayed, refused;
    RelayCapObject *cap; /* the overall cap (a strong reference), or NULL */
} RelayObject;

static PyTypeObject RelayType;

static void
relay_dealloc(RelayObject *self)
{
    Py_CLEAR(self->cap);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
relay_init(RelayObject *self, PyObject *args, PyObject *kwds)
{
    Py_buffer addr;
    unsigned int port;
    double until, rate, burst;
    PyObject *cap = Py_None;
    if (!PyArg_ParseTuple(args, "y*Iddd|O", &addr, &port, &until, &rate, &burst, &cap))
        return -1;
    if (cap != Py_None && !PyObject_TypeCheck(cap, &RelayCapType)) {
        PyBuffer_Release(&addr);
        PyErr_SetString(PyExc_TypeError, "relay: the cap is a RelayCap or None");
        return -1;
    }
    int ok = to_sockaddr(&self->dest, &self->destlen, &addr, port);
    PyBuffer_Release(&addr);
    if (!ok || port == 0 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "relay: an address of 4 or 16 octets and a port");
        return -1;
    }
    if (!(rate > 0) || !(burst >= 1) || until != until) {
        PyErr_SetString(PyExc_ValueError, "relay: rate > 0, burst >= 1, a deadline");
        return -1;
    }
    self->until = until;
    self->rate = rate;
    self->burst = burst;
    self->tokens = burst;
    self->last = 0;
    self->relayed = self->refused = 0;
    Py_XSETREF(self->cap, cap == Py_None ? NULL : (RelayCapObject *)Py_NewRef(cap));
    return 0;
}

/* 1: relay it; 0: over its own rate or the overall cap (dropped, counted: refused here or
 * in the cap); -1: at or past the end (handed up). A datagram dropped by one bucket takes
 * no token from the other. */
static int
relay_take(RelayObject *r, double now)
{
    if (!(now < r->until))
        return -1;
    RelayCapObject *c = r->cap;
    bucket_refill(&r->tokens, &r->last, r->rate, r->burst, now);
    if (c != NULL)
        bucket_refill(&c->tokens, &c->last, c->rate, c->burst, now);
    if (r->tokens < 1.0) {
        r->refused++;
        return 0;
    }
    if (c != NULL && c->tokens < 1.0) {
        c->refused++;
        return 0;
    }
    r->tokens -= 1.0;
    if (c != NULL)
        c->tokens -= 1.0;
    r->relayed++;
    return 1;
}

static PyObject *
relay_take_py(RelayObject *self, PyObject *args)
{
    double now;
    if (!PyArg_ParseTuple(args, "d", &now))
        return NULL;
    int r = relay_take(self, now);
    if (r < 0)
        Py_RETURN_NONE;
    return PyBool_FromLong(r);
}

static PyObject *relay_get_until(RelayObject *self, void *c) { return PyFloat_FromDouble(self->until); }
static int
relay_set_until(RelayObject *self, PyObject *v, void *c)
{
    double d = v == NULL ? NAN : PyFloat_AsDouble(v);
    if (d == -1.0 && PyErr_Occurred())
        return -1;
    if (d != d) {
        PyErr_SetString(PyExc_ValueError, "relay: a deadline");
        return -1;
    }
    self->until = d;
    return 0;
}
static PyObject *relay_get_relayed(RelayObject *self, void *c) { return PyLong_FromUnsignedLongLong(self->relayed); }
static PyObject *relay_get_refused(RelayObject *self, void *c) { return PyLong_FromUnsignedLongLong(self->refused); }

static PyMethodDef relay_methods[] = {
    {"take", (PyCFunction)relay_take_py, METH_VARARGS,
     "take(now) -> True (relay it), False (over the rate, counted), None (past the end)"},
    {NULL},
};

static PyGetSetDef relay_getset[] = {
    {"until", (getter)relay_get_until, (setter)relay_set_until, "end of the forwarding time", NULL},
    {"relayed", (getter)relay_get_relayed, NULL, "datagrams relayed", NULL},
    {"refused", (getter)relay_get_refused, NULL, "datagrams dropped over the rate", NULL},
    {NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ipsecct.ipsec._esp.Relay",
    .tp_basicsize = sizeof(RelayObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Relay(address octets, port, until, rate, burst, cap=None): a moved tunnel's "
              "inbound ESP sent on, unchanged, to its new gateway.",
    .tp_dealloc = (destructor)relay_dealloc,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)relay_init,
    .tp_methods = relay_methods,
    .tp_getset = relay_getset,
};

/* ---------------------------------------------------------------- the table */

struct IkeSource {
    uint8_t addr[16]; /* IPv6, or IPv4 in its first 4 octets (v4 says which) */
    uint32_t gen, n;
    uint8_t v4;
};

typedef struct {
    PyObject_HEAD
    PyObject *by_spi;  /* int -> SA (inbound) */
    PyObject *by_flow; /* bytes -> SA (outbound) */
    /* SA -> its flow keys (the key while it is the only one, else a set): every (key, sa)
     * in by_flow has key in flows_of[sa], so that remove(sa) deletes its flows without
     * walking every flow. flows_of[sa] may also hold a key by_flow no longer maps to sa
     * (only after a failed allocation): remove checks. */
    PyObject *flows_of;
    PyObject *relays;  /* int -> Relay: moved tunnels' inbound SPIs (no SA here any more) */
    uint8_t *in;       /* BATCH buffers of BUFSZ */
    uint8_t *out;
    unsigned long long in_packets, in_bytes, out_packets, out_bytes;
    unsigned long long drops[N_DROPS];
    /* the forwarding thread (run): what goes up to Python, bounded (up_limit items), with a
     * budget per class (see append_up) counted in up_count since the last drain */
    PyObject *pending;
    Py_ssize_t up_limit;
    Py_ssize_t up_count[N_UP];
    /* IKE hand-ups per source address since the last drain (see ike_source_admit): an open
     * addressing table of ike_cap slots, a slot live when its gen is ike_gen (drain bumps
     * ike_gen: no clearing) */
    struct IkeSource *ike_src;
    size_t ike_cap;
    uint32_t ike_gen, ike_seed;
    unsigned long long up_dropped;
    unsigned long long up_dropped_by[N_UP];
    int running, fault, woken;
} TableObject;

static void ike_src_free(TableObject *self);

static PyTypeObject TableType;

static int
table_init(TableObject *self, PyObject *args, PyObject *kwds)
{
    if (!PyArg_ParseTuple(args, ""))
        return -1;
    Py_XSETREF(self->by_spi, PyDict_New());
    Py_XSETREF(self->by_flow, PyDict_New());
    Py_XSETREF(self->flows_of, PyDict_New());
    Py_XSETREF(self->relays, PyDict_New());
    if (self->by_spi == NULL || self->by_flow == NULL || self->flows_of == NULL
        || self->relays == NULL)
        return -1;
    if (self->in == NULL)
        self->in = PyMem_Malloc((size_t)BATCH * BUFSZ);
    if (self->out == NULL)
        self->out = PyMem_Malloc((size_t)BATCH * BUFSZ);
    if (self->in == NULL || self->out == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static int
table_traverse(TableObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->by_spi);
    Py_VISIT(self->by_flow);
    Py_VISIT(self->flows_of);
    Py_VISIT(self->relays);
    Py_VISIT(self->pending);
    return 0;
}

static int
table_clear(TableObject *self)
{
    Py_CLEAR(self->by_spi);
    Py_CLEAR(self->by_flow);
    Py_CLEAR(self->flows_of);
    Py_CLEAR(self->relays);
    Py_CLEAR(self->pending);
    return 0;
}

static void
table_dealloc(TableObject *self)
{
    PyObject_GC_UnTrack(self);
    table_clear(self);
    ike_src_free(self);
    PyMem_Free(self->in);
    PyMem_Free(self->out);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The flow key of engine.Engine._flow_key (plain IPv4 or IPv6 without extension headers):
 * protocol, addresses, ports or ICMP type and code. Returns its length, 0 for none. */
static int
flow_key(const uint8_t *p, Py_ssize_t n, uint8_t *key)
{
    if (n >= 24 && p[0] == 0x45) {
        if ((p[6] & 0x3F) || p[7] || ((p[2] << 8) | p[3]) != n)
            return 0;
        int proto = p[9];
        int len = proto == 6 || proto == 17 || proto == 132 ? 12 : proto == 1 ? 10 : 8;
        key[0] = (uint8_t)proto;
        memcpy(key + 1, p + 12, (size_t)len);
        return 1 + len;
    }
    if (n >= 44 && p[0] >> 4 == 6) {
        if (40 + ((p[4] << 8) | p[5]) != n)
            return 0;
        int nh = p[6];
        switch (nh) {
        case 0: case 43: case 44: case 50: case 51: case 60: case 135: case 139: case 140:
        case 253: case 254:
            return 0;
        default:
            break;
        }
        int len = nh == 6 || nh == 17 || nh == 132 ? 36 : nh == 1 || nh == 58 ? 34 : 32;
        key[0] = (uint8_t)nh;
        memcpy(key + 1, p + 8, (size_t)len);
        return 1 + len;
    }
    return 0;
}

static SAObject *
lookup_flow(TableObject *self, const uint8_t *p, Py_ssize_t n)
{
    uint8_t key[40];
    int kl = flow_key(p, n, key);
    if (kl == 0)
        return NULL;
    PyObject *k = PyBytes_FromStringAndSize((const char *)key, kl);
    if (k == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *sa = PyDict_GetItemWithError(self->by_flow, k);
    Py_DECREF(k);
    if (sa == NULL)
        PyErr_Clear();
    return (SAObject *)sa; /* borrowed */
}

/* The value a dict keyed by SPI holds for the ESP packet p's SPI (borrowed), or NULL: a
 * packet too short for an SPI, none, or no memory for the key (the packet then goes up). */
static PyObject *
by_spi_of(PyObject *dict, const uint8_t *p, Py_ssize_t n)
{
    if (n < 8)
        return NULL;
    PyObject *k = PyLong_FromUnsignedLong(get32(p));
    if (k == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *v = PyDict_GetItemWithError(dict, k);
    Py_DECREF(k);
    if (v == NULL)
        PyErr_Clear();
    return v;
}

static SAObject *
lookup_spi(TableObject *self, const uint8_t *p, Py_ssize_t n)
{
    return (SAObject *)by_spi_of(self->by_spi, p, n);
}

static RelayObject *
lookup_relay(TableObject *self, const uint8_t *p, Py_ssize_t n)
{
    if (self->relays == NULL || PyDict_GET_SIZE(self->relays) == 0)
        return NULL;
    return (RelayObject *)by_spi_of(self->relays, p, n);
}

/* relay(spi, Relay or None): ESP under ``spi`` that no SA here takes goes to the relay's
 * address (None: no more) */
static PyObject *
table_relay(TableObject *self, PyObject *args)
{
    unsigned long spi;
    PyObject *r;
    if (!PyArg_ParseTuple(args, "kO", &spi, &r))
        return NULL;
    if (r != Py_None && !PyObject_TypeCheck(r, &RelayType)) {
        PyErr_SetString(PyExc_TypeError, "relay(spi, Relay or None)");
        return NULL;
    }
    if (spi == 0 || spi > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_ValueError, "relay: an SPI of 1 to 2**32 - 1");
        return NULL;
    }
    PyObject *k = PyLong_FromUnsignedLong(spi);
    if (k == NULL)
        return NULL;
    int rc;
    if (r == Py_None) {
        rc = PyDict_DelItem(self->relays, k);
        if (rc < 0 && PyErr_ExceptionMatches(PyExc_KeyError)) {
            PyErr_Clear();
            rc = 0;
        }
    } else {
        rc = PyDict_SetItem(self->relays, k, r);
    }
    Py_DECREF(k);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
table_flow_key(TableObject *self, PyObject *args)
{
    Py_buffer in;
    if (!PyArg_ParseTuple(args, "y*", &in))
        return NULL;
    uint8_t key[40];
    int kl = flow_key(in.buf, in.len, key);
    PyBuffer_Release(&in);
    if (kl == 0)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)key, kl);
}

static void
forget_flows(TableObject *self)
{
    PyDict_Clear(self->by_flow);
    PyDict_Clear(self->flows_of);
}

/* Key ``key`` joins ``sa``'s flows in flows_of: the key itself while it is the only one (most
 * SAs carry one flow: no set made), a set from the second on. */
static int
flows_of_add(TableObject *self, PyObject *sa, PyObject *key)
{
    PyObject *cur = PyDict_GetItemWithError(self->flows_of, sa); /* borrowed */
    if (cur == NULL)
        return PyErr_Occurred() ? -1 : PyDict_SetItem(self->flows_of, sa, key);
    if (PyBytes_CheckExact(cur)) {
        if (PyBytes_GET_SIZE(cur) == PyBytes_GET_SIZE(key)
            && memcmp(PyBytes_AS_STRING(cur), PyBytes_AS_STRING(key),
                      (size_t)PyBytes_GET_SIZE(key)) == 0)
            return 0;
        PyObject *set = PySet_New(NULL);
        if (set == NULL || PySet_Add(set, cur) < 0 || PySet_Add(set, key) < 0
            || PyDict_SetItem(self->flows_of, sa, set) < 0) {
            Py_XDECREF(set);
            return -1;
        }
        Py_DECREF(set);
        return 0;
    }
    return PySet_Add(cur, key);
}

/* Key ``key`` left ``sa`` (another SA took it): out of sa's flows. Cannot fail (a failure
 * would leave it there, which remove tolerates). */
static void
flows_of_discard(TableObject *self, PyObject *sa, PyObject *key)
{
    PyObject *cur = PyDict_GetItemWithError(self->flows_of, sa);
    if (cur == NULL) {
        PyErr_Clear();
        return;
    }
    if (PyBytes_CheckExact(cur)) {
        if (PyBytes_GET_SIZE(cur) == PyBytes_GET_SIZE(key)
            && memcmp(PyBytes_AS_STRING(cur), PyBytes_AS_STRING(key),
                      (size_t)PyBytes_GET_SIZE(key)) == 0
            && PyDict_DelItem(self->flows_of, sa) < 0)
            PyErr_Clear();
        return;
    }
    if (PySet_Discard(cur, key) < 0)
        PyErr_Clear();
    else if (PySet_GET_SIZE(cur) == 0 && PyDict_DelItem(self->flows_of, sa) < 0)
        PyErr_Clear();
}

static PyObject *
table_add_flow(TableObject *self, PyObject *args)
{
    PyObject *key, *sa;
    if (!PyArg_ParseTuple(args, "SO!", &key, &SAType, &sa))
        return NULL;
    if (PyDict_GET_SIZE(self->by_flow) >= 65536)
        forget_flows(self);
    /* a plain bytes copy of a subclass: no Python code (__hash__, __eq__) runs in the dicts
     * and the sets */
    if (PyBytes_CheckExact(key))
        Py_INCREF(key);
    else if ((key = PyBytes_FromStringAndSize(PyBytes_AS_STRING(key),
                                              PyBytes_GET_SIZE(key))) == NULL)
        return NULL;
    PyObject *old = PyDict_GetItemWithError(self->by_flow, key); /* borrowed */
    if (old == sa || (old == NULL && PyErr_Occurred())) {
        Py_DECREF(key);
        if (old == sa)
            Py_RETURN_NONE;
        return NULL;
    }
    Py_XINCREF(old);
    /* sa's flows first: whatever fails after, no flow maps to an SA whose flows lack it */
    int r = flows_of_add(self, sa, key);
    if (r == 0)
        r = PyDict_SetItem(self->by_flow, key, sa);
    if (r == 0 && old != NULL)
        flows_of_discard(self, old, key);
    Py_XDECREF(old);
    Py_DECREF(key);
    if (r < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
table_clear_flows(TableObject *self, PyObject *unused)
{
    forget_flows(self);
    Py_RETURN_NONE;
}

static PyObject *
table_add_spi(TableObject *self, PyObject *args)
{
    PyObject *sa;
    if (!PyArg_ParseTuple(args, "O!", &SAType, &sa))
        return NULL;
    PyObject *k = PyLong_FromUnsignedLong(((SAObject *)sa)->spi);
    if (k == NULL)
        return NULL;
    int r = PyDict_SetItem(self->by_spi, k, sa);
    Py_DECREF(k);
    if (r < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* The flow ``key`` goes if it still names ``sa``. */
static int
drop_flow(TableObject *self, PyObject *sa, PyObject *key)
{
    PyObject *cur = PyDict_GetItemWithError(self->by_flow, key);
    if (cur == sa)
        return PyDict_DelItem(self->by_flow, key);
    return cur == NULL && PyErr_Occurred() ? -1 : 0;
}

static PyObject *
table_remove(TableObject *self, PyObject *args)
{
    PyObject *sa;
    if (!PyArg_ParseTuple(args, "O!", &SAType, &sa))
        return NULL;
    PyObject *k = PyLong_FromUnsignedLong(((SAObject *)sa)->spi);
    if (k == NULL)
        return NULL;
    PyObject *cur = PyDict_GetItemWithError(self->by_spi, k);
    if (cur == sa && PyDict_DelItem(self->by_spi, k) < 0) {
        Py_DECREF(k);
        return NULL;
    }
    Py_DECREF(k);
    PyErr_Clear();
    /* flows pointing at it: those flows_of lists (not a walk of every flow). Should a step fail
     * (memory), every flow goes: they are a cache the engine refills. */
    PyObject *keys = PyDict_GetItemWithError(self->flows_of, sa); /* a key or a set of them */
    if (keys != NULL) {
        Py_INCREF(keys);
        if (PyDict_DelItem(self->flows_of, sa) == 0) {
            if (PyBytes_CheckExact(keys))
                drop_flow(self, sa, keys);
            else {
                /* plain bytes (add_flow): no Python code runs while the set is walked */
                PyObject *it = PyObject_GetIter(keys), *key;
                while (it != NULL && (key = PyIter_Next(it)) != NULL) {
                    int r = drop_flow(self, sa, key);
                    Py_DECREF(key);
                    if (r < 0)
                        break;
                }
                Py_XDECREF(it);
            }
        }
        Py_DECREF(keys);
    }
    if (PyErr_Occurred()) {
        PyErr_Clear();
        forget_flows(self);
    }
    /* Out of the table, out of service: its keys go now, not when the touched list (or
     * anything else still holding the object) lets go of it. */
    sa_wipe((SAObject *)sa);
    Py_RETURN_NONE;
}

/* seal_flow(packet, now) -> (owner, esp) | None */
static PyObject *
table_seal_flow(TableObject *self, PyObject *args)
{
    Py_buffer in;
    double now;
    if (!PyArg_ParseTuple(args, "y*d", &in, &now))
        return NULL;
    SAObject *sa = lookup_flow(self, in.buf, in.len);
    if (sa == NULL || !sa->active || in.len > 65535) {
        PyBuffer_Release(&in);
        Py_RETURN_NONE;
    }
    Py_ssize_t r = seal(sa, in.buf, in.len, now, self->out);
    PyBuffer_Release(&in);
    if (r < 0)
        Py_RETURN_NONE;
    return Py_BuildValue("(Oy#)", sa->owner, self->out, r);
}

/* open_spi(esp, now) -> (owner, result) | None; result as SA.open */
static PyObject *
table_open_spi(TableObject *self, PyObject *args)
{
    Py_buffer in;
    double now;
    if (!PyArg_ParseTuple(args, "y*d", &in, &now))
        return NULL;
    SAObject *sa = lookup_spi(self, in.buf, in.len);
    if (sa == NULL || !sa->active) {
        PyBuffer_Release(&in);
        Py_RETURN_NONE;
    }
    Py_INCREF(sa);
    PyObject *r = sa_open_common(sa, in.buf, in.len, now);
    PyBuffer_Release(&in);
    PyObject *res = NULL;
    if (r == Py_None)
        res = r;
    else if (r != NULL) {
        res = PyTuple_Pack(2, sa->owner, r);
        Py_DECREF(r);
    }
    Py_DECREF(sa);
    return res;
}

static PyObject *
sockaddr_tuple(const struct sockaddr_storage *ss)
{
    char host[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
        return Py_BuildValue("(si)", host, ntohs(a->sin_port));
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
        return Py_BuildValue("(siII)", host, ntohs(a->sin6_port), ntohl(a->sin6_flowinfo),
                             a->sin6_scope_id);
    }
    return PyTuple_New(0);
}

/* The clock of a batch. A caller that passes NaN as `now` (the forwarding thread always; the
 * per-readiness calls when the engine runs on time.monotonic) has the batch read
 * CLOCK_MONOTONIC itself, after its packets were read: every deadline (a lifetime, the
 * fail-over lease's end, Engine.send_until) is then checked against a time no earlier than
 * the arrival of the packets it decides on, so a packet that reached the gateway at or after
 * the lease's end is never sealed (docs/cluster.md, "what the lease guarantees"). */
static double
monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.monotonic()'s clock */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline double
batch_now(double now)
{
    return now != now ? monotonic_now() : now; /* NaN: read the clock now */
}

/* A hand-up recorded during a batch and built into a Python object only after the batch's
 * sends: between the first seal or open of a batch and its last send no Python object is made,
 * so no Python code (a finalizer run by the garbage collector) can run and no other thread can
 * take the GIL in between. A freeze (SA.active = False, under the GIL) therefore lands between
 * two batches: once it returns, nothing sealed under that SA is still waiting to be sent. */
typedef struct {
    int kind, idx;   /* idx: the input slot (kinds 0, 1) or the output slot (kind 3) */
    Py_ssize_t len;
    SAObject *sa;    /* kind 3: a strong reference */
} Up;

/* The share of the forwarding thread's queue (up_limit items) a class of hand-ups may fill
 * between two drains. Punted datagrams, which anyone can send, have one each: ESP no SA in C
 * took (unknown SPIs from forged sources, per-source limits cannot help) a quarter, inner
 * packets of no C flow a quarter, IKE (the non-ESP marker: a burst of a thousand
 * IKE_SA_INITs and their cookies must fit) three eighths. Together never more than seven
 * eighths, so signals and the sends the kernel had no room for (UP_OWN, of our own SAs)
 * always find an eighth free, and a flood of junk ESP leaves IKE its whole share. */
static Py_ssize_t
up_budget(TableObject *self, int cls)
{
    Py_ssize_t l = self->up_limit, b;
    switch (cls) {
    case UP_ESP:
        b = l / 4;
        break;
    case UP_IKE:
        b = l * 3 / 8;
        break;
    case UP_INNER:
        b = l / 4;
        break;
    default: /* UP_OWN: only the whole queue's bound */
        return l;
    }
    return b > 0 ? b : 1;
}

/* One source address may fill an eighth of the IKE share between two drains (192 of 1,536
 * at the default 4,096): a host sending junk after the non-ESP marker (fake IKE, which only
 * the event loop can tell from IKE) no longer crowds every other host's IKE out of the
 * queue, while a NAT with many clients behind it still has room for a burst. Forged
 * sources are not held back by this (as ESP from them is not): the share's own bound. */
static Py_ssize_t
ike_per_source(TableObject *self)
{
    Py_ssize_t b = up_budget(self, UP_IKE) / 8;
    return b > 0 ? b : 1;
}

static void
ike_src_free(TableObject *self)
{
    PyMem_RawFree(self->ike_src);
    self->ike_src = NULL;
    self->ike_cap = 0;
}

/* Whether a datagram of the IKE class from ``src`` may go up: 0 when its source already
 * has its ike_per_source since the last drain, else counted and 1. No table (not running,
 * or it could not be allocated): 1, the class's share alone. */
static int
ike_source_admit(TableObject *self, const struct sockaddr_storage *src)
{
    if (self->ike_src == NULL || self->ike_cap == 0)
        return 1;
    uint8_t a[16] = {0};
    uint8_t v4;
    if (src->ss_family == AF_INET) {
        memcpy(a, &((const struct sockaddr_in *)src)->sin_addr, 4);
        v4 = 1;
    } else if (src->ss_family == AF_INET6) {
        memcpy(a, &((const struct sockaddr_in6 *)src)->sin6_addr, 16);
        v4 = 0;
    } else {
        return 1;
    }
    uint32_t h = self->ike_seed ^ v4;
    for (int i = 0; i < 16; i++)
        h = (h ^ a[i]) * 16777619u;
    h ^= h >> 15;
    size_t mask = self->ike_cap - 1;
    for (size_t k = 0, j = h & mask; k < self->ike_cap; k++, j = (j + 1) & mask) {
        struct IkeSource *e = &self->ike_src[j];
        if (e->gen != self->ike_gen) { /* a free slot: the source's first since the drain */
            memcpy(e->addr, a, 16);
            e->v4 = v4;
            e->gen = self->ike_gen;
            e->n = 1;
            return 1;
        }
        if (e->v4 == v4 && memcmp(e->addr, a, 16) == 0) {
            if ((Py_ssize_t)e->n >= ike_per_source(self))
                return 0;
            e->n++;
            return 1;
        }
    }
    return 1; /* full (cannot be: at most the IKE share's sources are in it) */
}

/* The class of a datagram from the outer side that goes up: the non-ESP marker (RFC 3948)
 * is IKE; anything else is ESP (or junk) no SA here took. */
static inline int
outer_class(const uint8_t *p, Py_ssize_t n)
{
    return n >= 4 && get32(p) == 0 ? UP_IKE : UP_ESP;
}

static int
append_up(TableObject *self, PyObject *up, PyObject *item, int cls,
          const struct sockaddr_storage *src)
{
    if (item == NULL)
        return -1;
    if (up == NULL) /* the forwarding thread: the pending list as it is now (see drain) */
        up = self->pending;
    if (up == self->pending && self->up_limit > 0 &&
        (PyList_GET_SIZE(up) >= self->up_limit || self->up_count[cls] >= up_budget(self, cls) ||
         (cls == UP_IKE && src != NULL && !ike_source_admit(self, src)))) {
        /* the queue to the Python side is bounded: what does not fit is dropped, counted */
        self->up_dropped++;
        self->up_dropped_by[cls]++;
        Py_DECREF(item);
        return 0;
    }
    int r = PyList_Append(up, item);
    Py_DECREF(item);
    if (r == 0 && up == self->pending)
        self->up_count[cls]++;
    return r;
}

/* Hand msgs[from..n) back to Python (kind 2: the outer socket, 4: the inner one): the
 * kernel had no room for them; Python queues them until the socket is writable. */
static int
give_back(TableObject *self, struct mmsghdr *msgs, struct iovec *iov, int from, int n,
          PyObject *up, int kind)
{
    for (int i = from; i < n; i++) {
        PyObject *addr = sockaddr_tuple((struct sockaddr_storage *)msgs[i].msg_hdr.msg_name);
        if (addr == NULL)
            return -1;
        PyObject *item = Py_BuildValue("(iy#N)", kind, iov[i].iov_base,
                                       (Py_ssize_t)iov[i].iov_len, addr);
        if (append_up(self, up, item, UP_OWN, NULL) < 0)
            return -1;
    }
    return 0;
}

static int
no_room(void)
{
    return errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS;
}

/* Send msgs[0..n) with sendmmsg; returns the index of the first message the kernel had no
 * room for (n: all went); other errors are dropped and counted in *failed. No Python here. */
static int
flush(int fd, struct mmsghdr *msgs, int n, unsigned long long *failed)
{
    int i = 0;
    while (i < n) {
        int r = sendmmsg(fd, msgs + i, (unsigned)(n - i), MSG_DONTWAIT);
        if (r > 0) {
            i += r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && no_room())
            return i;
        (*failed)++; /* this datagram is refused (e.g. unreachable): skip it */
        i++;
    }
    return n;
}

/* One batch from the inner side into ibuf; sealed packets go out from obuf. Returns the
 * number of packets read, -1 with an exception set. */
/* Fills one message of a sendmmsg batch: len octets at buf to dest (copied into slot when
 * slot is not NULL: the batch's own copy, as the send comes after the loop over the packets). */
static inline void
out_msg(struct mmsghdr *m, struct iovec *iov, void *buf, size_t len,
        struct sockaddr_storage *slot, const struct sockaddr_storage *dest, socklen_t destlen)
{
    memset(m, 0, sizeof(*m));
    iov->iov_base = buf;
    iov->iov_len = len;
    m->msg_hdr.msg_iov = iov;
    m->msg_hdr.msg_iovlen = 1;
    if (slot != NULL) {
        memcpy(slot, dest, sizeof(*slot));
        dest = slot;
    }
    m->msg_hdr.msg_name = (void *)dest;
    m->msg_hdr.msg_namelen = destlen;
}

static int
inner_batch(TableObject *self, uint8_t *ibuf, uint8_t *obuf, int in_fd, int is_tun, int out_fd,
            int max, double now, PyObject *up)
{
    struct mmsghdr rmsgs[BATCH], smsgs[BATCH];
    struct sockaddr_storage dests[BATCH];
    struct iovec riov[BATCH], siov[BATCH];
    Py_ssize_t lens[BATCH];
    int punts[BATCH], np = 0;
    int got = 0;
    if (is_tun) {
        while (got < max) {
            ssize_t r = read(in_fd, ibuf + (size_t)got * BUFSZ, 65535);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0)
                break;
            lens[got++] = r;
        }
    } else {
        memset(rmsgs, 0, sizeof(rmsgs[0]) * (size_t)max);
        for (int i = 0; i < max; i++) {
            riov[i].iov_base = ibuf + (size_t)i * BUFSZ;
            riov[i].iov_len = 65535;
            rmsgs[i].msg_hdr.msg_iov = &riov[i];
            rmsgs[i].msg_hdr.msg_iovlen = 1;
        }
        int r;
        do
            r = recvmmsg(in_fd, rmsgs, (unsigned)max, MSG_DONTWAIT, NULL);
        while (r < 0 && errno == EINTR);
        for (int i = 0; i < r; i++)
            lens[got++] = rmsgs[i].msg_len;
    }
    if (got > 0)
        now = batch_now(now);
    int ns = 0;
    unsigned long long failed = 0;
    for (int i = 0; i < got; i++) {
        const uint8_t *p = ibuf + (size_t)i * BUFSZ;
        SAObject *sa = lookup_flow(self, p, lens[i]);
        Py_ssize_t r = PUNT;
        if (sa != NULL && sa->has_dest)
            r = seal(sa, p, lens[i], now, obuf + (size_t)ns * BUFSZ);
        if (r < 0) {
            punts[np++] = i;
            continue;
        }
        self->out_packets++;
        self->out_bytes += (unsigned long long)lens[i];
        out_msg(&smsgs[ns], &siov[ns], obuf + (size_t)ns * BUFSZ, (size_t)r, &dests[ns],
                &sa->dest, sa->destlen);
        ns++;
    }
    int sent = ns ? flush(out_fd, smsgs, ns, &failed) : 0;
    /* the sends are done: now the Python objects */
    for (int j = 0; j < np; j++) {
        int i = punts[j];
        if (append_up(self, up, Py_BuildValue("(iy#)", 0, ibuf + (size_t)i * BUFSZ, lens[i]),
                      UP_INNER, NULL) < 0)
            return -1;
    }
    if (sent < ns && give_back(self, smsgs, siov, sent, ns, up, 2) < 0)
        return -1;
    return got;
}

/* One batch from an outer UDP socket into ibuf; inner packets are delivered from obuf (TUN
 * writes, or sendmmsg to inner_addr). Returns the number of datagrams read, -1 with an
 * exception set. */
static int
outer_batch(TableObject *self, uint8_t *ibuf, uint8_t *obuf, int out_fd, int in_fd, int is_tun,
            const struct sockaddr_storage *inner_addr, socklen_t inner_len, int max, double now,
            PyObject *up)
{
    struct mmsghdr rmsgs[BATCH], smsgs[BATCH], lmsgs[BATCH];
    struct iovec riov[BATCH], siov[BATCH], liov[BATCH];
    struct sockaddr_storage from[BATCH], ldest[BATCH];
    Up ups[BATCH];
    int nu = 0, nl = 0;
    memset(rmsgs, 0, sizeof(rmsgs[0]) * (size_t)max);
    for (int i = 0; i < max; i++) {
        riov[i].iov_base = ibuf + (size_t)i * BUFSZ;
        riov[i].iov_len = 65535;
        rmsgs[i].msg_hdr.msg_iov = &riov[i];
        rmsgs[i].msg_hdr.msg_iovlen = 1;
        rmsgs[i].msg_hdr.msg_name = &from[i];
        rmsgs[i].msg_hdr.msg_namelen = sizeof(from[i]);
    }
    int got;
    do
        got = recvmmsg(out_fd, rmsgs, (unsigned)max, MSG_DONTWAIT, NULL);
    while (got < 0 && errno == EINTR);
    if (got < 0)
        got = 0;
    if (got > 0)
        now = batch_now(now);
    int ns = 0;
    unsigned long long failed = 0;
    for (int i = 0; i < got; i++) {
        const uint8_t *p = ibuf + (size_t)i * BUFSZ;
        Py_ssize_t n = rmsgs[i].msg_len;
        if (n == 1 && p[0] == 0xFF)
            continue; /* NAT keep-alive (RFC 3948 2.3) */
        SAObject *sa = (n >= 8 && get32(p) != 0) ? lookup_spi(self, p, n) : NULL;
        /* output slot i: each input has its own, so a signal's payload stays until the end */
        uint8_t *o = obuf + (size_t)i * BUFSZ;
        Py_ssize_t olen = 0;
        int r = sa != NULL ? open_esp(sa, p, n, now, o, &olen) : PUNT;
        if (sa == NULL && n >= 8 && get32(p) != 0) {
            /* a moved tunnel's inbound SPI: on to its new gateway, unchanged, from here */
            RelayObject *rl = lookup_relay(self, p, n);
            int t = rl != NULL ? relay_take(rl, now) : -1;
            if (t == 0)
                continue; /* over its rate: dropped (counted in the relay) */
            if (t == 1) {
                out_msg(&lmsgs[nl], &liov[nl], (void *)p, (size_t)n, &ldest[nl], &rl->dest,
                        rl->destlen);
                nl++;
                continue;
            }
        }
        if (r == PUNT) {
            ups[nu++] = (Up){1, i, n, NULL};
        } else if (r == SIGNAL) {
            Py_INCREF(sa);
            ups[nu++] = (Up){3, i, olen, sa};
        } else if (r == DELIVER) {
            self->in_packets++;
            self->in_bytes += (unsigned long long)olen;
            if (is_tun) {
                ssize_t w;
                do
                    w = write(in_fd, o, (size_t)olen);
                while (w < 0 && errno == EINTR);
                if (w < 0)
                    failed++;
            } else {
                out_msg(&smsgs[ns], &siov[ns], o, (size_t)olen, NULL, inner_addr, inner_len);
                ns++;
            }
        } else {
            self->drops[r]++;
        }
    }
    int sent = ns ? flush(in_fd, smsgs, ns, &failed) : 0;
    int lsent = nl ? flush(out_fd, lmsgs, nl, &failed) : 0;
    /* the sends are done: now the Python objects */
    int err = 0;
    for (int j = 0; j < nu; j++) {
        Up *u = &ups[j];
        if (!err) {
            PyObject *addr = sockaddr_tuple(&from[u->idx]);
            PyObject *item = NULL;
            if (addr != NULL && u->kind == 1)
                item = Py_BuildValue("(iy#N)", 1, ibuf + (size_t)u->idx * BUFSZ, u->len, addr);
            else if (addr != NULL)
                item = Py_BuildValue("(iOy#N)", 3, u->sa->owner, obuf + (size_t)u->idx * BUFSZ,
                                     u->len, addr);
            int cls = u->kind == 1 ? outer_class(ibuf + (size_t)u->idx * BUFSZ, u->len) : UP_OWN;
            err = append_up(self, up, item, cls, &from[u->idx]) < 0;
        }
        Py_XDECREF(u->sa);
    }
    if (err)
        return -1;
    if (sent < ns && give_back(self, smsgs, siov, sent, ns, up, 4) < 0)
        return -1;
    if (lsent < nl && give_back(self, lmsgs, liov, lsent, nl, up, 2) < 0)
        return -1;
    return got;
}

/* from_inner(in_fd, in_is_tun, outer_fd, max, now) -> (list, count)
 * Reads up to max packets from the inner side (up to ROUNDS batches while they come full;
 * now NaN: each batch reads CLOCK_MONOTONIC after its packets, see batch_now);
 * sealed packets of known flows go out with sendmmsg; the rest come back as (0, packet),
 * unsent ESP as (2, esp, addr). */
static PyObject *
table_from_inner(TableObject *self, PyObject *args)
{
    int in_fd, is_tun, out_fd, max;
    double now;
    if (!PyArg_ParseTuple(args, "ipiid", &in_fd, &is_tun, &out_fd, &max, &now))
        return NULL;
    if (max < 1 || max > BATCH)
        max = BATCH;
    PyObject *up = PyList_New(0);
    if (up == NULL)
        return NULL;
    int total = 0;
    for (int round = 0; round < ROUNDS; round++) {
        int got = inner_batch(self, self->in, self->out, in_fd, is_tun, out_fd, max, now, up);
        if (got < 0) {
            Py_DECREF(up);
            return NULL;
        }
        total += got;
        if (got < max)
            break;
    }
    return Py_BuildValue("(Ni)", up, total);
}

static int
inner_dest(PyObject *idest, struct sockaddr_storage *inner_addr, socklen_t *inner_len)
{
    Py_buffer a;
    unsigned int port;
    memset(inner_addr, 0, sizeof(*inner_addr));
    *inner_len = 0;
    if (!PyArg_ParseTuple(idest, "y*I", &a, &port))
        return -1;
    if (a.len == 4) {
        struct sockaddr_in *s4 = (struct sockaddr_in *)inner_addr;
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)port);
        memcpy(&s4->sin_addr, a.buf, 4);
        *inner_len = sizeof(*s4);
    } else if (a.len == 16) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)inner_addr;
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)port);
        memcpy(&s6->sin6_addr, a.buf, 16);
        *inner_len = sizeof(*s6);
    }
    PyBuffer_Release(&a);
    if (*inner_len == 0) {
        PyErr_SetString(PyExc_ValueError, "inner destination must be 4 or 16 octets");
        return -1;
    }
    return 0;
}

/* from_outer(outer_fd, inner_fd, inner_is_tun, inner_dest (octets, port) or None, max, now)
 * -> (list, count) (now NaN: as from_inner). Datagrams from the outer UDP socket: ESP of known, active SAs is opened
 * and delivered (TUN writes, or sendmmsg to inner_dest); keep-alives are ignored; the rest
 * comes back as (1, datagram, addr), signals as (3, owner, payload, addr), inner packets the
 * inner socket had no room for as (4, packet, addr). */
static PyObject *
table_from_outer(TableObject *self, PyObject *args)
{
    int out_fd, in_fd, is_tun, max;
    PyObject *idest;
    double now;
    if (!PyArg_ParseTuple(args, "iipOid", &out_fd, &in_fd, &is_tun, &idest, &max, &now))
        return NULL;
    if (max < 1 || max > BATCH)
        max = BATCH;
    struct sockaddr_storage inner_addr;
    socklen_t inner_len = 0;
    memset(&inner_addr, 0, sizeof(inner_addr));
    if (!is_tun && inner_dest(idest, &inner_addr, &inner_len) < 0)
        return NULL;
    PyObject *up = PyList_New(0);
    if (up == NULL)
        return NULL;
    int total = 0;
    for (int round = 0; round < ROUNDS; round++) {
        int got = outer_batch(self, self->in, self->out, out_fd, in_fd, is_tun, &inner_addr,
                              inner_len, max, now, up);
        if (got < 0) {
            Py_DECREF(up);
            return NULL;
        }
        total += got;
        if (got < max)
            break;
    }
    return Py_BuildValue("(Ni)", up, total);
}

/* ---------------------------------------------------------------- the forwarding thread */

#define MAX_OUTER 4
#define EV_STOP 0xFFFFu
#define EV_INNER 0xFFFEu
#define STATS_WAKE 0.5 /* seconds: the Python side folds the counters at least this often */

static int
counted_anything(const TableObject *self)
{
    if (self->in_packets || self->out_packets)
        return 1;
    for (int i = 0; i < N_DROPS; i++)
        if (self->drops[i])
            return 1;
    return 0;
}

/* run(outer_fds, inner_fd, inner_is_tun, inner_dest or None, wake_fd, stop_fd, max_pending,
 *     coalesce_us=0)
 *
 * The forwarding loop of established SAs, for a thread of its own: it sleeps in epoll with
 * the GIL released and handles each ready socket's batch (up to ROUNDS x BATCH packets) with
 * the GIL held, exactly as from_outer / from_inner do, with buffers of its own. What goes up to
 * Python is appended to a bounded list (max_pending; beyond it dropped and counted) that
 * drain() takes, and wake_fd (an eventfd the event loop watches) is written when the list
 * stops being empty, and every STATS_WAKE seconds while counters wait to be folded. Returns
 * when stop_fd becomes readable (or raises, after a fault). */
static PyObject *
table_run(TableObject *self, PyObject *args)
{
    PyObject *ofds, *idest;
    int in_fd, is_tun, wake_fd, stop_fd;
    Py_ssize_t max_pending;
    int coalesce_us = 0;
    if (!PyArg_ParseTuple(args, "OipOiin|i", &ofds, &in_fd, &is_tun, &idest, &wake_fd, &stop_fd,
                          &max_pending, &coalesce_us))
        return NULL;
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "the forwarding loop already runs");
        return NULL;
    }
    int outer[MAX_OUTER], nouter = 0;
    PyObject *fast = PySequence_Fast(ofds, "outer_fds must be a sequence");
    if (fast == NULL)
        return NULL;
    Py_ssize_t nfd = PySequence_Fast_GET_SIZE(fast);
    if (nfd < 1 || nfd > MAX_OUTER) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "one to four outer sockets");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nfd; i++) {
        long fd = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if (fd == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return NULL;
        }
        outer[nouter++] = (int)fd;
    }
    Py_DECREF(fast);
    struct sockaddr_storage inner_addr;
    socklen_t inner_len = 0;
    memset(&inner_addr, 0, sizeof(inner_addr));
    if (!is_tun && inner_dest(idest, &inner_addr, &inner_len) < 0)
        return NULL;
    uint8_t *ibuf = PyMem_RawMalloc((size_t)BATCH * BUFSZ);
    uint8_t *obuf = PyMem_RawMalloc((size_t)BATCH * BUFSZ);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ibuf == NULL || obuf == NULL || ep < 0) {
        if (ep < 0)
            PyErr_SetFromErrno(PyExc_OSError);
        else
            PyErr_NoMemory();
        goto out;
    }
    struct epoll_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN;
    ev.data.u32 = EV_STOP;
    int bad = epoll_ctl(ep, EPOLL_CTL_ADD, stop_fd, &ev) < 0;
    ev.data.u32 = EV_INNER;
    bad = bad || epoll_ctl(ep, EPOLL_CTL_ADD, in_fd, &ev) < 0;
    for (int i = 0; i < nouter && !bad; i++) {
        ev.data.u32 = (uint32_t)i;
        bad = epoll_ctl(ep, EPOLL_CTL_ADD, outer[i], &ev) < 0;
    }
    if (bad) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto out;
    }
    if (self->pending == NULL && (self->pending = PyList_New(0)) == NULL)
        goto out;
    self->running = 1;
    self->up_limit = max_pending > 0 ? max_pending : 1;
    {
        /* the IKE sources' table: twice the IKE share's slots (a source is in it only once
         * one of its datagrams went up), at most half full */
        size_t cap = 16;
        while (cap < 2 * (size_t)up_budget(self, UP_IKE))
            cap <<= 1;
        PyMem_RawFree(self->ike_src);
        self->ike_src = PyMem_RawCalloc(cap, sizeof(*self->ike_src));
        self->ike_cap = self->ike_src != NULL ? cap : 0;
        self->ike_gen = 1;
        if (getrandom(&self->ike_seed, sizeof(self->ike_seed), GRND_NONBLOCK) !=
            (ssize_t)sizeof(self->ike_seed))
            self->ike_seed = (uint32_t)(monotonic_now() * 1e9);
    }
    double last_wake = monotonic_now(), last_data = 0;
    for (;;) {
        struct epoll_event evs[MAX_OUTER + 2];
        int n;
        Py_BEGIN_ALLOW_THREADS
        n = epoll_wait(ep, evs, MAX_OUTER + 2, (int)(STATS_WAKE * 1000));
        Py_END_ALLOW_THREADS
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            break;
        }
        /* Busy: the previous wake-up came less than 4 pauses ago. Let a batch gather for one
         * pause (a sleep, no CPU) before reading: fewer wake-ups and context switches per
         * packet. Traffic that comes slower than that (a ping) is never delayed. */
        double woke = monotonic_now();
        if (coalesce_us > 0 && n > 0 && woke - last_data < 4e-6 * coalesce_us) {
            struct timespec ts = {0, (long)coalesce_us * 1000};
            Py_BEGIN_ALLOW_THREADS
            nanosleep(&ts, NULL);
            Py_END_ALLOW_THREADS
        }
        if (n > 0)
            last_data = woke;
        if (self->fault) {
            self->fault = 0;
            PyErr_SetString(PyExc_RuntimeError, "fault injected into the forwarding loop");
            break;
        }
        double now = monotonic_now();
        int stop = 0, err = 0;
        for (int i = 0; i < n && !err; i++) {
            uint32_t u = evs[i].data.u32;
            if (u == EV_STOP) {
                stop = 1;
                continue;
            }
            /* one call's worth: up to ROUNDS batches while they come full */
            for (int round = 0; round < ROUNDS; round++) {
                int got;
                /* each batch reads the clock after its packets (NaN: batch_now) */
                if (u == EV_INNER)
                    got = inner_batch(self, ibuf, obuf, in_fd, is_tun, outer[0], BATCH, NAN,
                                      NULL);
                else
                    got = outer_batch(self, ibuf, obuf, outer[u], in_fd, is_tun, &inner_addr,
                                      inner_len, BATCH, NAN, NULL);
                if (got < 0)
                    err = 1;
                if (got < BATCH)
                    break;
            }
        }
        if (err)
            break;
        /* one wake-up per drain: drain() clears `woken` under the GIL */
        int wake = (!self->woken && PyList_GET_SIZE(self->pending) > 0) ||
                   (now - last_wake >= STATS_WAKE && counted_anything(self));
        if (wake) {
            self->woken = 1;
            uint64_t one = 1;
            ssize_t w = write(wake_fd, &one, sizeof(one));
            (void)w; /* EAGAIN: the counter is already huge, a wake-up is pending anyway */
            last_wake = now;
        }
        if (stop) {
            self->running = 0;
            self->up_limit = 0;
            close(ep);
            PyMem_RawFree(ibuf);
            PyMem_RawFree(obuf);
            ike_src_free(self);
            Py_RETURN_NONE;
        }
    }
out:
    self->running = 0;
    self->up_limit = 0;
    if (ep >= 0)
        close(ep);
    PyMem_RawFree(ibuf);
    PyMem_RawFree(obuf);
    ike_src_free(self);
    {
        uint64_t one = 1; /* the Python side learns of the end through the failure itself */
        ssize_t w = write(wake_fd, &one, sizeof(one));
        (void)w;
    }
    return NULL;
}

/* drain(wake_fd) -> list: what the forwarding loop handed up since the last call, in order
 * (items as from_outer / from_inner return them). Reads the eventfd first, then takes the
 * list, both under the GIL: an item appended after this call wakes the loop again. */
static PyObject *
table_drain(TableObject *self, PyObject *args)
{
    int wake_fd;
    if (!PyArg_ParseTuple(args, "i", &wake_fd))
        return NULL;
    uint64_t v;
    ssize_t r = read(wake_fd, &v, sizeof(v));
    (void)r;
    PyObject *fresh = PyList_New(0);
    if (fresh == NULL)
        return NULL;
    PyObject *old = self->pending;
    self->pending = fresh;
    memset(self->up_count, 0, sizeof(self->up_count));
    if (++self->ike_gen == 0) { /* every source's count starts again (wrapped: clear) */
        if (self->ike_src != NULL)
            memset(self->ike_src, 0, self->ike_cap * sizeof(*self->ike_src));
        self->ike_gen = 1;
    }
    self->woken = 0;
    if (old == NULL)
        return PyList_New(0);
    return old;
}

/* _inject_fault(): the next wake-up of the forwarding loop raises (tests only) */
static PyObject *
table_inject_fault(TableObject *self, PyObject *unused)
{
    self->fault = 1;
    Py_RETURN_NONE;
}

static PyObject *
table_get_running(TableObject *self, void *c)
{
    return PyBool_FromLong(self->running);
}

static PyObject *
table_get_up_dropped(TableObject *self, void *c)
{
    return PyLong_FromUnsignedLongLong(self->up_dropped);
}

static PyObject *
table_get_up_dropped_by(TableObject *self, void *c)
{
    return Py_BuildValue("{sKsKsKsK}", "own", self->up_dropped_by[UP_OWN], "esp",
                         self->up_dropped_by[UP_ESP], "ike", self->up_dropped_by[UP_IKE],
                         "inner", self->up_dropped_by[UP_INNER]);
}

/* take_stats() -> (in_packets, in_bytes, out_packets, out_bytes, drops tuple); resets them */
static PyObject *
table_take_stats(TableObject *self, PyObject *unused)
{
    PyObject *d = PyTuple_New(N_DROPS);
    if (d == NULL)
        return NULL;
    for (int i = 0; i < N_DROPS; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(self->drops[i]);
        if (v == NULL) {
            Py_DECREF(d);
            return NULL;
        }
        PyTuple_SET_ITEM(d, i, v);
    }
    PyObject *res = Py_BuildValue("(KKKKN)", self->in_packets, self->in_bytes,
                                  self->out_packets, self->out_bytes, d);
    if (res != NULL) {
        self->in_packets = self->in_bytes = self->out_packets = self->out_bytes = 0;
        memset(self->drops, 0, sizeof(self->drops));
    }
    return res;
}

static PyObject *
table_sizes(TableObject *self, PyObject *unused)
{
    return Py_BuildValue("(nn)", PyDict_GET_SIZE(self->by_spi), PyDict_GET_SIZE(self->by_flow));
}

static PyMethodDef table_methods[] = {
    {"flow_key", (PyCFunction)table_flow_key, METH_VARARGS, "the flow key of a packet"},
    {"add_flow", (PyCFunction)table_add_flow, METH_VARARGS, "add_flow(key, sa)"},
    {"clear_flows", (PyCFunction)table_clear_flows, METH_NOARGS, "forget every flow"},
    {"add_spi", (PyCFunction)table_add_spi, METH_VARARGS, "add_spi(inbound sa)"},
    {"remove", (PyCFunction)table_remove, METH_VARARGS, "remove(sa): its SPI and flows"},
    {"seal_flow", (PyCFunction)table_seal_flow, METH_VARARGS, "seal_flow(packet, now)"},
    {"open_spi", (PyCFunction)table_open_spi, METH_VARARGS, "open_spi(esp, now)"},
    {"from_inner", (PyCFunction)table_from_inner, METH_VARARGS, "batch from the inner side"},
    {"from_outer", (PyCFunction)table_from_outer, METH_VARARGS, "batch from the outer side"},
    {"take_stats", (PyCFunction)table_take_stats, METH_NOARGS, "counters since last call"},
    {"sizes", (PyCFunction)table_sizes, METH_NOARGS, "(SPIs, flows)"},
    {"relay", (PyCFunction)table_relay, METH_VARARGS, "relay(spi, Relay or None)"},
    {"run", (PyCFunction)table_run, METH_VARARGS,
     "run(outer_fds, inner_fd, inner_is_tun, inner_dest, wake_fd, stop_fd, max_pending)"},
    {"drain", (PyCFunction)table_drain, METH_VARARGS, "drain(wake_fd) -> handed-up items"},
    {"_inject_fault", (PyCFunction)table_inject_fault, METH_NOARGS, "tests only"},
    {NULL},
};

static PyGetSetDef table_getset[] = {
    {"running", (getter)table_get_running, NULL, "does the forwarding loop run", NULL},
    {"up_dropped", (getter)table_get_up_dropped, NULL,
     "items the forwarding loop dropped because its queue to Python was full", NULL},
    {"up_dropped_by", (getter)table_get_up_dropped_by, NULL,
     "up_dropped by class: own (signals, no room), esp (punted ESP), ike, inner", NULL},
    {NULL},
};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ipsecct.ipsec._esp.Table",
    .tp_basicsize = sizeof(TableObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "SA table of the native data path: inbound by SPI, outbound by flow.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)table_init,
    .tp_dealloc = (destructor)table_dealloc,
    .tp_traverse = (traverseproc)table_traverse,
    .tp_clear = (inquiry)table_clear,
    .tp_methods = table_methods,
    .tp_getset = table_getset,
};

/* ---------------------------------------------------------------- read-through attributes */

/*
 * SecurityAssociation.seq and .counters once the native path is there
 * (ipsecct.ipsec.sad.install_read_through): what its Python properties do, as a descriptor
 * in C. While an SA's C object is active it holds the exact sequence number and counters:
 * reads come from it (the counters copied into the SA's Counters object), writes go to it
 * and to the slot. Otherwise the slot's value. A bulk transfer reads ``seq`` about a dozen
 * times per SA, each a Python-level call through a property.
 */
typedef struct {
    PyObject_HEAD
    PyTypeObject *owner;   /* SecurityAssociation */
    PyObject *name;        /* "seq" or "counters" */
    Py_ssize_t value_off;  /* the field's slot */
    Py_ssize_t native_off; /* the slot "native": None or the SA's C object */
    int counters;
} RTObject;

static PyTypeObject RTType;

static int
rt_slot(PyObject *d, PyTypeObject **owner, Py_ssize_t *off)
{
    if (!Py_IS_TYPE(d, &PyMemberDescr_Type)) {
        PyErr_SetString(PyExc_TypeError, "read_through: expected a slot's member descriptor");
        return -1;
    }
    PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
    if (m->type != T_OBJECT_EX || (m->flags & READONLY)) {
        PyErr_SetString(PyExc_TypeError, "read_through: not a writable object slot");
        return -1;
    }
    *owner = PyDescr_TYPE(d);
    *off = m->offset;
    return 0;
}

/* Is the SA's C object ``c`` (a new reference or NULL) active: 1, 0, or -1 on an error. */
static int
rt_active(PyObject *c)
{
    if (c == NULL || c == Py_None)
        return 0;
    if (Py_IS_TYPE(c, &SAType))
        return ((SAObject *)c)->active != 0;
    PyObject *a = PyObject_GetAttrString(c, "active");
    if (a == NULL)
        return -1;
    int r = PyObject_IsTrue(a);
    Py_DECREF(a);
    return r;
}

static PyObject *
rt_native(RTObject *self, PyObject *obj)
{
    PyObject *c = *(PyObject **)((char *)obj + self->native_off);
    Py_XINCREF(c);
    return c;
}

static int
rt_check(RTObject *self, PyObject *obj)
{
    if (!PyObject_TypeCheck(obj, self->owner)) {
        PyErr_Format(PyExc_TypeError, "descriptor '%U' for '%s' objects doesn't apply to a '%s'",
                     self->name, self->owner->tp_name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    return 0;
}

/* c.<field> (seq: as a Python int), whatever c's type. */
static PyObject *
rt_read(PyObject *c, const char *field)
{
    if (Py_IS_TYPE(c, &SAType)) {
        SAObject *sa = (SAObject *)c;
        uint64_t v = field[0] == 's' ? sa->seq : field[0] == 'p' ? sa->packets : sa->bytes;
        return PyLong_FromUnsignedLongLong(v);
    }
    PyObject *v = PyObject_GetAttrString(c, field);
    if (v == NULL || field[0] != 's')
        return v;
    PyObject *r = PyNumber_Long(v); /* int(c.seq), as the property */
    Py_DECREF(v);
    return r;
}

/* c.<field> = v, whatever c's type. */
static int
rt_write(PyObject *c, const char *field, PyObject *v)
{
    if (Py_IS_TYPE(c, &SAType)) {
        SAObject *sa = (SAObject *)c;
        return set_u64(field[0] == 's' ? &sa->seq : field[0] == 'p' ? &sa->packets : &sa->bytes,
                       v);
    }
    return PyObject_SetAttrString(c, field, v);
}

static PyObject *
rt_get(RTObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL) {
        Py_INCREF(self);
        return (PyObject *)self;
    }
    if (rt_check(self, obj) < 0)
        return NULL;
    PyObject *c = rt_native(self, obj);
    int active = rt_active(c);
    PyObject *out = NULL;
    if (active < 0)
        goto done;
    if (!self->counters && active) {
        out = rt_read(c, "seq");
        goto done;
    }
    out = *(PyObject **)((char *)obj + self->value_off);
    if (out == NULL) {
        PyErr_SetObject(PyExc_AttributeError, self->name);
        goto done;
    }
    Py_INCREF(out);
    if (self->counters && active) {
        const char *fields[] = {"packets", "bytes"};
        for (int i = 0; i < 2; i++) {
            PyObject *v = rt_read(c, fields[i]);
            if (v == NULL || PyObject_SetAttrString(out, fields[i], v) < 0) {
                Py_XDECREF(v);
                Py_CLEAR(out);
                goto done;
            }
            Py_DECREF(v);
        }
    }
done:
    Py_XDECREF(c);
    return out;
}

static int
rt_set(RTObject *self, PyObject *obj, PyObject *value)
{
    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "can't delete attribute '%U'", self->name);
        return -1;
    }
    if (rt_check(self, obj) < 0)
        return -1;
    PyObject *c = rt_native(self, obj);
    int active = rt_active(c), r = -1;
    if (active < 0)
        goto done;
    if (active && !self->counters && rt_write(c, "seq", value) < 0)
        goto done;
    if (active && self->counters) {
        const char *fields[] = {"packets", "bytes"};
        for (int i = 0; i < 2; i++) {
            PyObject *v = PyObject_GetAttrString(value, fields[i]);
            if (v == NULL)
                goto done;
            int w = rt_write(c, fields[i], v);
            Py_DECREF(v);
            if (w < 0)
                goto done;
        }
    }
    PyObject **slot = (PyObject **)((char *)obj + self->value_off);
    PyObject *old = *slot;
    Py_INCREF(value);
    *slot = value;
    Py_XDECREF(old);
    r = 0;
done:
    Py_XDECREF(c);
    return r;
}

static int
rt_traverse(RTObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->owner);
    return 0;
}

static int
rt_clear(RTObject *self)
{
    Py_CLEAR(self->owner);
    return 0;
}

static void
rt_dealloc(RTObject *self)
{
    PyObject_GC_UnTrack(self);
    rt_clear(self);
    Py_XDECREF(self->name);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject RTType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ipsecct.ipsec._esp.ReadThrough",
    .tp_basicsize = sizeof(RTObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "seq or counters of a SecurityAssociation, read through its active C object",
    .tp_dealloc = (destructor)rt_dealloc,
    .tp_traverse = (traverseproc)rt_traverse,
    .tp_clear = (inquiry)rt_clear,
    .tp_descr_get = (descrgetfunc)rt_get,
    .tp_descr_set = (descrsetfunc)rt_set,
};

static PyObject *
module_read_through(PyObject *m, PyObject *args)
{
    PyObject *name, *value_slot, *native_slot;
    if (!PyArg_ParseTuple(args, "UOO", &name, &value_slot, &native_slot))
        return NULL;
    int counters = PyUnicode_CompareWithASCIIString(name, "counters") == 0;
    if (!counters && PyUnicode_CompareWithASCIIString(name, "seq") != 0) {
        PyErr_SetString(PyExc_ValueError, "read_through: 'seq' or 'counters'");
        return NULL;
    }
    PyTypeObject *owner, *owner2;
    Py_ssize_t value_off, native_off;
    if (rt_slot(value_slot, &owner, &value_off) < 0 || rt_slot(native_slot, &owner2, &native_off) < 0)
        return NULL;
    if (owner != owner2) {
        PyErr_SetString(PyExc_TypeError, "read_through: the slots of two classes");
        return NULL;
    }
    RTObject *self = PyObject_GC_New(RTObject, &RTType);
    if (self == NULL)
        return NULL;
    Py_INCREF(owner);
    Py_INCREF(name);
    self->owner = owner;
    self->name = name;
    self->value_off = value_off;
    self->native_off = native_off;
    self->counters = counters;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PyObject *
module_activity(PyObject *m, PyObject *noargs)
{
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&g_activity, __ATOMIC_RELAXED));
}

/* take_touched() -> (owners, overflowed): the owner of each SA that counted a packet since the
 * last call (each once; an SA without an owner is left out), and whether some SA counted
 * without being listed (the list was full). Empties the list. The list is copied and emptied
 * before anything that could run Python code (a DECREF may finalize an SA, an allocation may
 * collect): that code may let the forwarding thread run a batch, which appends afresh. */
static PyObject *
module_take_touched(PyObject *m, PyObject *noargs)
{
    PyObject *owners = PyList_New(0);
    if (owners == NULL)
        return NULL;
    Py_ssize_t n = g_ntouched;
    SAObject **taken = NULL;
    if (n > 0) {
        taken = PyMem_RawMalloc((size_t)n * sizeof(*taken));
        if (taken == NULL) {
            Py_DECREF(owners);
            return PyErr_NoMemory();
        }
        memcpy(taken, g_touched, (size_t)n * sizeof(*taken));
    }
    int overflowed = g_touched_overflow;
    g_ntouched = 0;
    g_touched_overflow = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        taken[i]->touched = 0;
    /* no Python code has run since the copy: appending (a realloc) runs none either */
    int err = 0;
    for (Py_ssize_t i = 0; i < n && !err; i++) {
        PyObject *o = taken[i]->owner;
        if (o != NULL && o != Py_None && PyList_Append(owners, o) < 0)
            err = 1;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        Py_DECREF(taken[i]);
    PyMem_RawFree(taken);
    if (err) {
        Py_DECREF(owners);
        return NULL;
    }
    return Py_BuildValue("(NO)", owners, overflowed ? Py_True : Py_False);
}

static PyMethodDef module_methods[] = {
    {"activity", module_activity, METH_NOARGS,
     "packets counted on every SA since the module was loaded (seal and open)"},
    {"read_through", module_read_through, METH_VARARGS,
     "read_through(name, value slot, native slot): SecurityAssociation's seq or counters"},
    {"take_touched", module_take_touched, METH_NOARGS,
     "take_touched() -> (owners of the SAs that counted since the last call, overflowed)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "ipsecct.ipsec._esp",
    "Native ESP data path for established AEAD SAs (see ipsecct.ipsec.native).", -1,
    module_methods,
};

PyMODINIT_FUNC
PyInit__esp(void)
{
    if (PyType_Ready(&SAType) < 0 || PyType_Ready(&TableType) < 0 || PyType_Ready(&RTType) < 0
        || PyType_Ready(&RelayType) < 0 || PyType_Ready(&RelayCapType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    Py_INCREF(&SAType);
    Py_INCREF(&TableType);
    Py_INCREF(&RelayType);
    Py_INCREF(&RelayCapType);
    if (PyModule_AddObject(m, "SA", (PyObject *)&SAType) < 0 ||
        PyModule_AddObject(m, "Table", (PyObject *)&TableType) < 0 ||
        PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0 ||
        PyModule_AddObject(m, "RelayCap", (PyObject *)&RelayCapType) < 0 ||
        PyModule_AddIntConstant(m, "BATCH", BATCH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
