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
#include <pthread.h>
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
    uint64_t id;  /* unique in the process: a hand-up of the forwarding thread names its SA by
                   * (spi, id), checked at the drain (see RawUp) */
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

/* ---------------------------------------------------------------- the data path's lock */

/*
 * The forwarding thread (Table.run) handles its batches WITHOUT the GIL. What it reads and
 * writes is guarded by one mutex, g_lock, of the process: the tables' C maps (SPI, flow and
 * relay: Map below), every SA's and relay's mutable state (seq, replay window, counters,
 * lifetimes, destination, selectors, active, the EVP context), the tables' counters and
 * their queues to Python, and the touched list. The thread holds it from a batch's first
 * lookup to its last send and while it queues the batch's hand-ups, so that a freeze (SA.active
 * = False) or a snapshot, which take it, land between two batches: once SA.active = False
 * returns, nothing sealed under that SA waits to be sent (the invariant: no (SPI, seq) twice
 * under one key).
 *
 * The order is the GIL, then g_lock. The thread never asks for the GIL while it holds g_lock
 * (it never asks for it at all between its start and its end). A GIL holder, while it holds
 * g_lock, runs no Python code and makes no Python object (a collection could run a finalizer
 * that takes g_lock again, or give the GIL to a thread that waits for g_lock): it copies what it
 * needs, unlocks, then builds objects and drops references. INCREFs are done under it (the GIL
 * is held); DECREFs after.
 */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t g_next_id;

static void fold_touched(void);

static inline void
lock(void)
{
    pthread_mutex_lock(&g_lock);
}

/* GIL held: the touched list's entries the thread added get their strong references first */
static inline void
unlock_gil(void)
{
    fold_touched();
    pthread_mutex_unlock(&g_lock);
}

/* the forwarding thread, without the GIL */
static inline void
unlock_nogil(void)
{
    pthread_mutex_unlock(&g_lock);
}

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
    uint32_t nblocks = window ? (window + 63) / 64 + 1 : 0;
    uint64_t *blocks = NULL;
    if (nblocks && (blocks = PyMem_Calloc(nblocks, sizeof(uint64_t))) == NULL) {
        PyBuffer_Release(&key);
        PyErr_NoMemory();
        return -1;
    }
    lock(); /* an SA initialised again may be in a table the forwarding thread reads */
    if (self->ctx == NULL)
        self->ctx = EVP_CIPHER_CTX_new();
    if (self->ctx == NULL ||
        !EVP_CipherInit_ex(self->ctx, cipher, NULL, NULL, NULL, outbound ? 1 : 0) ||
        !EVP_CIPHER_CTX_ctrl(self->ctx, EVP_CTRL_AEAD_SET_IVLEN, 12, NULL) ||
        !EVP_CipherInit_ex(self->ctx, NULL, NULL, (const unsigned char *)key.buf, NULL,
                           outbound ? 1 : 0)) {
        self->active = 0;
        unlock_gil();
        PyMem_Free(blocks);
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL cipher setup failed");
        return -1;
    }
    memcpy(self->salt, (const uint8_t *)key.buf + key.len - 4, 4);
    self->spi = (uint32_t)spi;
    self->outbound = outbound;
    self->esn = esn;
    self->wsize = window;
    self->nblocks = nblocks;
    uint64_t *old_blocks = self->blocks;
    self->blocks = blocks;
    self->id = ++g_next_id;
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
    unlock_gil();
    PyMem_Free(old_blocks);
    PyBuffer_Release(&key);
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
 * happens under g_lock; atomic, as activity() reads it without the lock. */
static uint64_t g_activity;

/* The touched list: each SA that counted a packet since the last take_touched(), once (its
 * `touched` flag), so that fail-over replication visits those SAs' tunnels only
 * (ct/failover.py, "the idle poll"). Bounded: an SA that does not fit is not listed and the
 * overflow flag tells the taker that some SA counted unlisted (it then walks every tunnel).
 * Under g_lock. Entries [0, g_nstrong) hold a strong reference; the ones after were appended
 * by the forwarding thread, which cannot INCREF without the GIL: their SAs are in a table's
 * map (which holds a reference) when appended, and every GIL holder folds (INCREFs them)
 * before it lets g_lock go (unlock_gil), in particular the one that takes an SA out of a
 * map: so no entry outlives its SA. */
#define TOUCHED_MAX 16384
static SAObject *g_touched[TOUCHED_MAX];
static Py_ssize_t g_ntouched, g_nstrong;
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
    g_touched[g_ntouched++] = s;
}

/* GIL and g_lock held */
static void
fold_touched(void)
{
    for (Py_ssize_t i = g_nstrong; i < g_ntouched; i++)
        Py_INCREF(g_touched[i]);
    g_nstrong = g_ntouched;
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
    lock();
    Py_ssize_t r = seal(self, in.buf, in.len, now, (uint8_t *)PyBytes_AS_STRING(res));
    unlock_gil();
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
    lock();
    int r = open_esp(self, buf, len, now, out, &olen);
    unlock_gil();
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

/* A copy of the SA's state, taken under g_lock in one go (an exact snapshot: the forwarding
 * thread counts between two batches only); blocks: PyMem, nblocks entries (NULL if none). */
typedef struct {
    uint64_t seq, packets, bytes, top;
    uint64_t *blocks;
    uint32_t nblocks;
} SAState;

static int
sa_state(SAObject *self, SAState *st)
{
    uint32_t nb = self->nblocks; /* fixed but by __init__, which allocates afresh: checked */
    st->blocks = nb ? PyMem_Malloc(nb * sizeof(uint64_t)) : NULL;
    if (nb && st->blocks == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    lock();
    if (self->nblocks != nb) {
        unlock_gil();
        PyMem_Free(st->blocks);
        return sa_state(self, st);
    }
    st->seq = self->seq;
    st->packets = self->packets;
    st->bytes = self->bytes;
    st->top = self->top;
    st->nblocks = nb;
    if (nb)
        memcpy(st->blocks, self->blocks, nb * sizeof(uint64_t));
    unlock_gil();
    return 0;
}

static PyObject *
sa_export(SAObject *self, PyObject *unused)
{
    SAState st;
    if (sa_state(self, &st) < 0)
        return NULL;
    PyObject *r = Py_BuildValue("(KKKKy#)", (unsigned long long)st.seq,
                                (unsigned long long)st.packets, (unsigned long long)st.bytes,
                                (unsigned long long)st.top,
                                st.blocks ? (const char *)st.blocks : "",
                                (Py_ssize_t)(st.nblocks * sizeof(uint64_t)));
    PyMem_Free(st.blocks);
    return r;
}

/* window() -> (top, [block, ...]): the replay window in ReplayWindow's own layout */
static PyObject *
sa_window(SAObject *self, PyObject *unused)
{
    SAState st;
    if (sa_state(self, &st) < 0)
        return NULL;
    PyObject *lst = PyList_New(st.nblocks);
    if (lst == NULL) {
        PyMem_Free(st.blocks);
        return NULL;
    }
    for (uint32_t i = 0; i < st.nblocks; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(st.blocks[i]);
        if (v == NULL) {
            Py_DECREF(lst);
            PyMem_Free(st.blocks);
            return NULL;
        }
        PyList_SET_ITEM(lst, i, v);
    }
    PyMem_Free(st.blocks);
    return Py_BuildValue("(KN)", (unsigned long long)st.top, lst);
}

static PyObject *
sa_load(SAObject *self, PyObject *args)
{
    unsigned long long seq, packets, bytes, top;
    Py_buffer blocks;
    if (!PyArg_ParseTuple(args, "KKKKy*", &seq, &packets, &bytes, &top, &blocks))
        return NULL;
    lock();
    if (blocks.len != (Py_ssize_t)(self->nblocks * sizeof(uint64_t))) {
        unlock_gil();
        PyBuffer_Release(&blocks);
        PyErr_SetString(PyExc_ValueError, "replay blocks do not fit the window");
        return NULL;
    }
    if (blocks.len)
        memcpy(self->blocks, blocks.buf, (size_t)blocks.len);
    self->seq = seq;
    self->packets = packets;
    self->bytes = bytes;
    self->top = top;
    unlock_gil();
    PyBuffer_Release(&blocks);
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
    lock();
    self->ceiling = ceiling;
    self->limit_packets = lp;
    self->limit_bytes = lb;
    self->deadline = deadline;
    self->mtu = mtu;
    self->outer_overhead = overhead;
    unlock_gil();
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
    struct sockaddr_storage dest;
    socklen_t destlen;
    int has = to_sockaddr(&dest, &destlen, &addr, port);
    PyBuffer_Release(&addr);
    lock();
    self->dest = dest;
    self->destlen = destlen;
    self->has_dest = has;
    unlock_gil();
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
        lock();
        self->sel_on = 0;
        unlock_gil();
        Py_RETURN_NONE;
    }
    PyObject *loc, *rem;
    int proto, ports_any, lpf, lpl, rpf, rpl;
    if (!PyArg_ParseTuple(args, "ipiiiiOO", &proto, &ports_any, &lpf, &lpl, &rpf, &rpl, &loc,
                          &rem))
        return NULL;
    /* parsed aside (Python code runs there), then swapped in under the lock */
    Range *local = NULL, *remote = NULL;
    int nlocal = 0, nremote = 0;
    if (parse_ranges(loc, &local, &nlocal) < 0 || parse_ranges(rem, &remote, &nremote) < 0) {
        PyMem_Free(local);
        PyMem_Free(remote);
        lock(); /* as before: a failed call leaves the check off */
        self->sel_on = 0;
        unlock_gil();
        return NULL;
    }
    lock();
    Range *old_local = self->local, *old_remote = self->remote;
    self->sel_proto = proto;
    self->ports_any = ports_any;
    self->lp_first = lpf;
    self->lp_last = lpl;
    self->rp_first = rpf;
    self->rp_last = rpl;
    self->local = local;
    self->nlocal = nlocal;
    self->remote = remote;
    self->nremote = nremote;
    self->sel_on = 1;
    unlock_gil();
    PyMem_Free(old_local);
    PyMem_Free(old_remote);
    Py_RETURN_NONE;
}

static PyObject *
sa_get_active(SAObject *self, void *c)
{
    lock();
    int a = self->active;
    unlock_gil();
    return PyBool_FromLong(a);
}

static int
sa_set_active(SAObject *self, PyObject *v, void *c)
{
    int b = v == NULL ? 0 : PyObject_IsTrue(v);
    if (b < 0)
        return -1;
    /* a freeze: between two batches of the forwarding thread (see g_lock) */
    lock();
    int gone = b && self->ctx == NULL;
    if (!gone)
        self->active = b;
    unlock_gil();
    if (gone) {
        PyErr_SetString(PyExc_ValueError, "this SA left the table: its keys are gone");
        return -1;
    }
    return 0;
}

/* keyed: does the object still hold key material (an EVP context or a salt not cleansed)? */
static PyObject *
sa_get_keyed(SAObject *self, void *c)
{
    uint8_t any = 0;
    lock();
    for (size_t i = 0; i < sizeof(self->salt); i++)
        any |= self->salt[i];
    int keyed = self->ctx != NULL || any != 0;
    unlock_gil();
    return PyBool_FromLong(keyed);
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

/* a field of the SA's state, read or written under g_lock (GIL held) */
static PyObject *
get_u64(const uint64_t *field)
{
    lock();
    uint64_t v = *field;
    unlock_gil();
    return PyLong_FromUnsignedLongLong(v);
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
    lock();
    *field = x;
    unlock_gil();
    return 0;
}

static PyObject *sa_get_ceiling(SAObject *self, void *c) { return get_u64(&self->ceiling); }
static PyObject *sa_get_seq(SAObject *self, void *c) { return get_u64(&self->seq); }
static int sa_set_seq(SAObject *self, PyObject *v, void *c) { return set_u64(&self->seq, v); }
static PyObject *sa_get_packets(SAObject *self, void *c) { return get_u64(&self->packets); }
static int sa_set_packets(SAObject *self, PyObject *v, void *c) { return set_u64(&self->packets, v); }
static PyObject *sa_get_bytes(SAObject *self, void *c) { return get_u64(&self->bytes); }
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
    uint64_t refused;
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
    lock(); /* relays in a table's map may take from it already */
    self->rate = rate;
    self->burst = burst;
    self->tokens = burst;
    self->last = 0;
    self->refused = 0;
    unlock_gil();
    return 0;
}

static PyObject *relay_cap_get_refused(RelayCapObject *self, void *c) { return get_u64(&self->refused); }
static PyObject *
relay_cap_get_rate(RelayCapObject *self, void *c)
{
    lock();
    double r = self->rate;
    unlock_gil();
    return PyFloat_FromDouble(r);
}
static PyObject *
relay_cap_get_burst(RelayCapObject *self, void *c)
{
    lock();
    double b = self->burst;
    unlock_gil();
    return PyFloat_FromDouble(b);
}

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
    uint64_t relayed, refused;
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
    struct sockaddr_storage dest;
    socklen_t destlen;
    int ok = to_sockaddr(&dest, &destlen, &addr, port);
    PyBuffer_Release(&addr);
    if (!ok || port == 0 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "relay: an address of 4 or 16 octets and a port");
        return -1;
    }
    if (!(rate > 0) || !(burst >= 1) || until != until) {
        PyErr_SetString(PyExc_ValueError, "relay: rate > 0, burst >= 1, a deadline");
        return -1;
    }
    lock(); /* it may be in a table's relay map already */
    self->dest = dest;
    self->destlen = destlen;
    self->until = until;
    self->rate = rate;
    self->burst = burst;
    self->tokens = burst;
    self->last = 0;
    self->relayed = self->refused = 0;
    RelayCapObject *old_cap = self->cap;
    self->cap = cap == Py_None ? NULL : (RelayCapObject *)Py_NewRef(cap);
    unlock_gil();
    Py_XDECREF(old_cap);
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
    lock();
    int r = relay_take(self, now);
    unlock_gil();
    if (r < 0)
        Py_RETURN_NONE;
    return PyBool_FromLong(r);
}

static PyObject *
relay_get_until(RelayObject *self, void *c)
{
    lock();
    double u = self->until;
    unlock_gil();
    return PyFloat_FromDouble(u);
}
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
    lock();
    self->until = d;
    unlock_gil();
    return 0;
}
static PyObject *relay_get_relayed(RelayObject *self, void *c) { return get_u64(&self->relayed); }
static PyObject *relay_get_refused(RelayObject *self, void *c) { return get_u64(&self->refused); }

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

/* ---------------------------------------------------------------- C maps */

/*
 * What the forwarding thread looks up without the GIL: a key of up to MAP_KEY octets (an SPI
 * as 4 octets big endian, or a flow key) -> an object (an SA or a Relay), open addressing with
 * linear probing, at most half full, deletion by backward shift (no tombstones). A map holds a
 * strong reference to each value: put INCREFs (GIL and g_lock held); what leaves is handed
 * back to the caller, who DECREFs it after unlock_gil. The hash is keyed with a random seed per
 * map (flow keys come from packets). Under g_lock.
 */
#define MAP_KEY 40

typedef struct {
    uint64_t h;
    PyObject *v; /* NULL: a free slot */
    uint8_t klen;
    uint8_t key[MAP_KEY];
} MapSlot;

typedef struct {
    MapSlot *slots;
    size_t cap, n; /* cap: 0 or a power of two */
    uint64_t seed;
} Map;

static uint64_t
mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static uint64_t
map_hash(const Map *m, const uint8_t *key, size_t klen)
{
    uint64_t h = mix64(m->seed ^ klen);
    size_t i = 0;
    for (; i + 8 <= klen; i += 8) {
        uint64_t w;
        memcpy(&w, key + i, 8);
        h = mix64(h ^ w);
    }
    if (i < klen) {
        uint64_t w = 0;
        memcpy(&w, key + i, klen - i);
        h = mix64(h ^ w ^ 0x8000000000000000ULL);
    }
    return h;
}

static void
map_seed(Map *m)
{
    if (getrandom(&m->seed, sizeof(m->seed), GRND_NONBLOCK) != (ssize_t)sizeof(m->seed)) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        m->seed = mix64((uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 32) ^ (uintptr_t)m);
    }
}

/* the slot of key, or NULL */
static MapSlot *
map_find(const Map *m, const uint8_t *key, size_t klen)
{
    if (m->n == 0 || klen > MAP_KEY)
        return NULL;
    uint64_t h = map_hash(m, key, klen);
    size_t mask = m->cap - 1;
    for (size_t j = h & mask;; j = (j + 1) & mask) {
        MapSlot *e = &m->slots[j];
        if (e->v == NULL)
            return NULL;
        if (e->h == h && e->klen == klen && memcmp(e->key, key, klen) == 0)
            return e;
    }
}

static PyObject *
map_get(const Map *m, const uint8_t *key, size_t klen)
{
    MapSlot *e = map_find(m, key, klen);
    return e != NULL ? e->v : NULL;
}

/* place a slot's content into a table with room (no duplicates) */
static void
map_place(MapSlot *slots, size_t cap, const MapSlot *src)
{
    size_t mask = cap - 1;
    size_t j = src->h & mask;
    while (slots[j].v != NULL)
        j = (j + 1) & mask;
    slots[j] = *src;
}

/* key -> v (a new strong reference). *old: the value it replaces (the caller's to DECREF
 * after unlock) or NULL. 0, or -1 without room (nothing changed; no exception set). */
static int
map_put(Map *m, const uint8_t *key, size_t klen, PyObject *v, PyObject **old)
{
    *old = NULL;
    if (klen > MAP_KEY)
        return -1;
    MapSlot *e = map_find(m, key, klen);
    if (e != NULL) {
        Py_INCREF(v);
        *old = e->v;
        e->v = v;
        return 0;
    }
    if (2 * (m->n + 1) > m->cap) {
        size_t cap = m->cap ? 2 * m->cap : 16;
        MapSlot *slots = PyMem_RawCalloc(cap, sizeof(MapSlot));
        if (slots == NULL)
            return -1;
        for (size_t i = 0; i < m->cap; i++)
            if (m->slots[i].v != NULL)
                map_place(slots, cap, &m->slots[i]);
        PyMem_RawFree(m->slots);
        m->slots = slots;
        m->cap = cap;
    }
    MapSlot ne;
    memset(&ne, 0, sizeof(ne));
    ne.h = map_hash(m, key, klen);
    ne.klen = (uint8_t)klen;
    memcpy(ne.key, key, klen);
    Py_INCREF(v);
    ne.v = v;
    map_place(m->slots, m->cap, &ne);
    m->n++;
    return 0;
}

/* key leaves the map if it maps to v (any value: v NULL); returns what left (the caller's
 * reference, to DECREF after unlock) or NULL */
static PyObject *
map_del(Map *m, const uint8_t *key, size_t klen, PyObject *v)
{
    MapSlot *e = map_find(m, key, klen);
    if (e == NULL || (v != NULL && e->v != v))
        return NULL;
    PyObject *gone = e->v;
    size_t mask = m->cap - 1, i = (size_t)(e - m->slots);
    /* backward shift: later slots of the run move up into the hole when they may */
    for (size_t j = (i + 1) & mask;; j = (j + 1) & mask) {
        MapSlot *f = &m->slots[j];
        if (f->v == NULL)
            break;
        size_t home = f->h & mask;
        /* f may fill the hole at i unless its home lies in (i, j] (cyclically) */
        if (((j - home) & mask) >= ((j - i) & mask)) {
            m->slots[i] = *f;
            i = j;
        }
    }
    memset(&m->slots[i], 0, sizeof(MapSlot));
    m->n--;
    return gone;
}

/* empties the map; returns its old slots (cap entries in *cap) for the caller to DECREF and
 * free after unlock (map_release) */
static MapSlot *
map_take(Map *m, size_t *cap)
{
    MapSlot *slots = m->slots;
    *cap = m->cap;
    m->slots = NULL;
    m->cap = m->n = 0;
    return slots;
}

/* GIL held, g_lock not: the references of slots taken by map_take */
static void
map_release(MapSlot *slots, size_t cap)
{
    for (size_t i = 0; i < cap; i++)
        Py_XDECREF(slots[i].v);
    PyMem_RawFree(slots);
}

static inline void
spi_key(uint32_t spi, uint8_t *k)
{
    put32(k, spi);
}

/* ---------------------------------------------------------------- the table */

/* A hand-up of the forwarding thread, in raw memory until drain() builds its Python object
 * (kinds as from_outer / from_inner return them). A signal (kind 3) names its SA by (spi, id):
 * the drain looks it up in the SPI map and hands up its owner if it is still that SA. */
typedef struct {
    int kind;
    int has_addr;
    Py_ssize_t len;
    uint32_t spi;
    uint64_t id;
    struct sockaddr_storage addr;
    uint8_t data[];
} RawUp;

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
    /* the same three in C, for lookups without the GIL (see Map): spis mirrors by_spi,
     * flows by_flow, relay_map relays. Changed only by GIL holders, under g_lock. */
    Map spis, flows, relay_map;
    uint8_t *in;       /* BATCH buffers of BUFSZ */
    uint8_t *out;
    unsigned long long in_packets, in_bytes, out_packets, out_bytes;
    unsigned long long drops[N_DROPS];
    /* the forwarding thread (run): what goes up to Python, bounded (up_limit items), with a
     * budget per class (see queue_up) counted in up_count since the last drain; raw memory
     * (q: nq of q_cap), under g_lock */
    RawUp **q;
    Py_ssize_t nq, q_cap;
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
    if (self->spis.seed == 0) { /* once: an initialised table's maps stay (their content) */
        map_seed(&self->spis);
        map_seed(&self->flows);
        map_seed(&self->relay_map);
    }
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
    /* the maps change only under the GIL (the thread reads them): no lock to read them here */
    const Map *maps[] = {&self->spis, &self->flows, &self->relay_map};
    for (int k = 0; k < 3; k++)
        for (size_t i = 0; i < maps[k]->cap; i++)
            Py_VISIT(maps[k]->slots[i].v);
    return 0;
}

static void
free_queue(RawUp **q, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        PyMem_RawFree(q[i]);
}

static int
table_clear(TableObject *self)
{
    size_t c1, c2, c3;
    lock();
    MapSlot *s1 = map_take(&self->spis, &c1), *s2 = map_take(&self->flows, &c2),
            *s3 = map_take(&self->relay_map, &c3);
    unlock_gil();
    map_release(s1, c1);
    map_release(s2, c2);
    map_release(s3, c3);
    Py_CLEAR(self->by_spi);
    Py_CLEAR(self->by_flow);
    Py_CLEAR(self->flows_of);
    Py_CLEAR(self->relays);
    return 0;
}

static void
table_dealloc(TableObject *self)
{
    PyObject_GC_UnTrack(self);
    table_clear(self);
    free_queue(self->q, self->nq);
    PyMem_RawFree(self->q);
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

/* The lookups of a batch (g_lock held, or the GIL: see Map): no Python. Borrowed. */
static SAObject *
lookup_flow(TableObject *self, const uint8_t *p, Py_ssize_t n)
{
    uint8_t key[40];
    int kl = flow_key(p, n, key);
    if (kl == 0)
        return NULL;
    return (SAObject *)map_get(&self->flows, key, (size_t)kl);
}

/* by the ESP packet p's SPI; NULL for a packet too short for one */
static SAObject *
lookup_spi(TableObject *self, const uint8_t *p, Py_ssize_t n)
{
    return n < 8 ? NULL : (SAObject *)map_get(&self->spis, p, 4);
}

static RelayObject *
lookup_relay(TableObject *self, const uint8_t *p, Py_ssize_t n)
{
    return n < 8 ? NULL : (RelayObject *)map_get(&self->relay_map, p, 4);
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
    uint8_t key[4];
    spi_key((uint32_t)spi, key);
    PyObject *old = NULL;
    int rc;
    if (r == Py_None) {
        lock();
        old = map_del(&self->relay_map, key, 4, NULL);
        unlock_gil();
        rc = PyDict_DelItem(self->relays, k);
        if (rc < 0 && PyErr_ExceptionMatches(PyExc_KeyError)) {
            PyErr_Clear();
            rc = 0;
        }
    } else {
        rc = PyDict_SetItem(self->relays, k, r);
        if (rc == 0) {
            lock();
            rc = map_put(&self->relay_map, key, 4, r, &old);
            unlock_gil();
            if (rc < 0)
                PyErr_NoMemory();
        }
    }
    Py_XDECREF(old);
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
    size_t cap;
    lock();
    MapSlot *slots = map_take(&self->flows, &cap);
    unlock_gil();
    map_release(slots, cap);
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
    PyObject *replaced = NULL;
    if (r == 0) { /* the C map follows by_flow (no room: the flow is the Python path's) */
        lock();
        if (map_put(&self->flows, (const uint8_t *)PyBytes_AS_STRING(key),
                    (size_t)PyBytes_GET_SIZE(key), sa, &replaced) < 0)
            replaced = map_del(&self->flows, (const uint8_t *)PyBytes_AS_STRING(key),
                               (size_t)PyBytes_GET_SIZE(key), NULL);
        unlock_gil();
    }
    Py_XDECREF(replaced);
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
    uint32_t spi = ((SAObject *)sa)->spi;
    PyObject *k = PyLong_FromUnsignedLong(spi);
    if (k == NULL)
        return NULL;
    int r = PyDict_SetItem(self->by_spi, k, sa);
    Py_DECREF(k);
    if (r < 0)
        return NULL;
    uint8_t key[4];
    spi_key(spi, key);
    PyObject *old = NULL;
    lock();
    r = map_put(&self->spis, key, 4, sa, &old);
    if (r < 0) /* no room: the SPI is the Python path's (not an older SA's) */
        old = map_del(&self->spis, key, 4, NULL);
    unlock_gil();
    Py_XDECREF(old);
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
    /* Out of the C maps and keyless in one step under g_lock: between two batches of the
     * forwarding thread, which cannot find it after. The flow keys that may name it
     * (flows_of) are copied before the lock; without memory for that, every flow goes. */
    uint32_t spi = ((SAObject *)sa)->spi;
    PyObject *fk = PyDict_GetItemWithError(self->flows_of, sa), *klist = NULL;
    if (fk != NULL)
        klist = PyBytes_CheckExact(fk) ? PyTuple_Pack(1, fk) : PySequence_Tuple(fk);
    Py_ssize_t nk = klist != NULL ? PyTuple_GET_SIZE(klist) : 0;
    PyObject **gone = PyMem_Malloc((size_t)(nk + 1) * sizeof(PyObject *));
    int lost = PyErr_Occurred() != NULL || gone == NULL;
    PyErr_Clear();
    uint8_t skey[4];
    spi_key(spi, skey);
    Py_ssize_t ng = 0;
    lock();
    PyObject *gspi = map_del(&self->spis, skey, 4, sa);
    for (Py_ssize_t i = 0; gone != NULL && i < nk; i++) {
        PyObject *kb = PyTuple_GET_ITEM(klist, i);
        PyObject *g = PyBytes_CheckExact(kb)
                          ? map_del(&self->flows, (const uint8_t *)PyBytes_AS_STRING(kb),
                                    (size_t)PyBytes_GET_SIZE(kb), sa)
                          : NULL;
        if (g != NULL)
            gone[ng++] = g;
    }
    /* Out of the table, out of service: its keys go now, not when the touched list (or
     * anything else still holding the object) lets go of it. */
    sa_wipe((SAObject *)sa);
    unlock_gil();
    Py_XDECREF(gspi);
    for (Py_ssize_t i = 0; i < ng; i++)
        Py_DECREF(gone[i]);
    PyMem_Free(gone);
    Py_XDECREF(klist);
    if (lost)
        forget_flows(self);
    PyObject *k = PyLong_FromUnsignedLong(spi);
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
    if (in.len > 65535) {
        PyBuffer_Release(&in);
        Py_RETURN_NONE;
    }
    PyObject *owner = NULL;
    lock();
    SAObject *sa = lookup_flow(self, in.buf, in.len);
    Py_ssize_t r = sa != NULL ? seal(sa, in.buf, in.len, now, self->out) : PUNT;
    if (r >= 0) {
        owner = sa->owner != NULL ? sa->owner : Py_None;
        Py_INCREF(owner);
    }
    unlock_gil();
    PyBuffer_Release(&in);
    if (r < 0)
        Py_RETURN_NONE;
    PyObject *res = Py_BuildValue("(Oy#)", owner, self->out, r);
    Py_DECREF(owner);
    return res;
}

/* open_spi(esp, now) -> (owner, result) | None; result as SA.open */
static PyObject *
table_open_spi(TableObject *self, PyObject *args)
{
    Py_buffer in;
    double now;
    if (!PyArg_ParseTuple(args, "y*d", &in, &now))
        return NULL;
    /* the map changes only under the GIL, which this holds: the lookup needs no lock, and
     * the reference keeps the SA; open_esp punts an inactive one */
    SAObject *sa = lookup_spi(self, in.buf, in.len);
    if (sa == NULL) {
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

/* A hand-up recorded during a batch, under g_lock, from the batch's own buffers: the
 * forwarding thread copies it into its queue (queue_up) before it lets the lock go; the
 * event loop's calls (from_outer, from_inner) build its Python object after (ups_build). A
 * batch holds g_lock from its first lookup to its last send, so a freeze (SA.active = False,
 * under g_lock) lands between two batches: once it returns, nothing sealed under that SA is
 * still waiting to be sent. */
typedef struct {
    int kind, cls;
    const uint8_t *buf;
    Py_ssize_t len;
    const struct sockaddr_storage *addr; /* kinds 1-4 */
    SAObject *sa;                        /* kind 3 */
    PyObject *owner;                     /* kind 3, the event loop's calls: a new reference */
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

/* The forwarding thread's queue (g_lock held, no GIL): a copy of the hand-up, if its class's
 * budget, its source's (IKE) and the whole queue's bound let it in; else dropped, counted. */
static void
queue_up(TableObject *self, const Up *u)
{
    int cls = u->cls;
    RawUp *r = NULL;
    if (self->nq >= self->up_limit || self->nq >= self->q_cap ||
        self->up_count[cls] >= up_budget(self, cls) ||
        (cls == UP_IKE && u->addr != NULL && !ike_source_admit(self, u->addr)) ||
        (r = PyMem_RawMalloc(sizeof(RawUp) + (size_t)u->len)) == NULL) {
        /* the queue to the Python side is bounded: what does not fit is dropped, counted */
        self->up_dropped++;
        self->up_dropped_by[cls]++;
        return;
    }
    r->kind = u->kind;
    r->len = u->len;
    r->has_addr = u->addr != NULL;
    if (u->addr != NULL)
        memcpy(&r->addr, u->addr, sizeof(r->addr));
    r->spi = u->sa != NULL ? u->sa->spi : 0;
    r->id = u->sa != NULL ? u->sa->id : 0;
    memcpy(r->data, u->buf, (size_t)u->len);
    self->q[self->nq++] = r;
    self->up_count[cls]++;
}

/* A batch's hand-ups, g_lock held: queued (the thread), or the signals' owners referenced
 * (the event loop's calls, which hold the GIL) for ups_build after the unlock. */
static void
ups_hold(TableObject *self, Up *ups, int nu, int thread)
{
    for (int i = 0; i < nu; i++) {
        if (thread) {
            queue_up(self, &ups[i]);
        } else if (ups[i].kind == 3) {
            PyObject *o = ups[i].sa->owner != NULL ? ups[i].sa->owner : Py_None;
            Py_INCREF(o);
            ups[i].owner = o;
        }
    }
}

/* the Python object of a hand-up: (0, packet), (1|2|4, datagram, addr), (3, owner, payload,
 * addr) */
static PyObject *
up_item(int kind, const uint8_t *buf, Py_ssize_t len, const struct sockaddr_storage *addr,
        PyObject *owner)
{
    if (kind == 0)
        return Py_BuildValue("(iy#)", 0, buf, len);
    PyObject *a = addr != NULL ? sockaddr_tuple(addr) : PyTuple_New(0);
    if (a == NULL)
        return NULL;
    if (kind == 3)
        return Py_BuildValue("(iOy#N)", 3, owner, buf, len, a);
    return Py_BuildValue("(iy#N)", kind, buf, len, a);
}

/* GIL held, g_lock not: the hand-ups of an event loop's call into its list, in order. */
static int
ups_build(Up *ups, int nu, PyObject *up)
{
    int err = 0;
    for (int i = 0; i < nu; i++) {
        Up *u = &ups[i];
        if (!err) {
            PyObject *item = up_item(u->kind, u->buf, u->len, u->addr, u->owner);
            err = item == NULL || PyList_Append(up, item) < 0;
            Py_XDECREF(item);
        }
        Py_XDECREF(u->owner);
    }
    return err ? -1 : 0;
}

/* msgs[from..n): the kernel had no room for them; Python queues them until the socket is
 * writable (kind 2: the outer socket, 4: the inner one). */
static int
give_back(Up *ups, int nu, struct mmsghdr *msgs, struct iovec *iov, int from, int n, int kind)
{
    for (int i = from; i < n; i++)
        ups[nu++] = (Up){kind, UP_OWN, iov[i].iov_base, (Py_ssize_t)iov[i].iov_len,
                         (const struct sockaddr_storage *)msgs[i].msg_hdr.msg_name, NULL, NULL};
    return nu;
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

/* One batch from the inner side into ibuf; sealed packets go out from obuf. up: the event
 * loop's list (GIL held), or NULL: the forwarding thread (no GIL; hand-ups to its queue).
 * Returns the number of packets read, -1 with an exception set (the event loop's only). */
static int
inner_batch(TableObject *self, uint8_t *ibuf, uint8_t *obuf, int in_fd, int is_tun, int out_fd,
            int max, double now, PyObject *up)
{
    struct mmsghdr rmsgs[BATCH], smsgs[BATCH];
    struct sockaddr_storage dests[BATCH];
    struct iovec riov[BATCH], siov[BATCH];
    Py_ssize_t lens[BATCH];
    Up ups[BATCH];
    int nu = 0;
    int got = 0;
    /* the read too under the lock: whoever sees the socket empty and then takes the lock
     * knows that every packet it held has been handled */
    lock();
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
    if (got == 0) {
        if (up == NULL)
            unlock_nogil();
        else
            unlock_gil();
        return 0;
    }
    now = batch_now(now); /* after the packets were read */
    int ns = 0;
    unsigned long long failed = 0;
    for (int i = 0; i < got; i++) {
        const uint8_t *p = ibuf + (size_t)i * BUFSZ;
        SAObject *sa = lookup_flow(self, p, lens[i]);
        Py_ssize_t r = PUNT;
        if (sa != NULL && sa->has_dest)
            r = seal(sa, p, lens[i], now, obuf + (size_t)ns * BUFSZ);
        if (r < 0) {
            ups[nu++] = (Up){0, UP_INNER, p, lens[i], NULL, NULL, NULL};
            continue;
        }
        self->out_packets++;
        self->out_bytes += (unsigned long long)lens[i];
        out_msg(&smsgs[ns], &siov[ns], obuf + (size_t)ns * BUFSZ, (size_t)r, &dests[ns],
                &sa->dest, sa->destlen);
        ns++;
    }
    int sent = ns ? flush(out_fd, smsgs, ns, &failed) : 0;
    nu = give_back(ups, nu, smsgs, siov, sent, ns, 2);
    ups_hold(self, ups, nu, up == NULL);
    if (up == NULL) {
        unlock_nogil();
        return got;
    }
    unlock_gil();
    /* the sends are done and the lock is free: now the Python objects */
    return ups_build(ups, nu, up) < 0 ? -1 : got;
}

/* One batch from an outer UDP socket into ibuf; inner packets are delivered from obuf (TUN
 * writes, or sendmmsg to inner_addr). up: as inner_batch. Returns the number of datagrams
 * read, -1 with an exception set (the event loop's only). */
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
    lock(); /* the read too (see inner_batch) */
    do
        got = recvmmsg(out_fd, rmsgs, (unsigned)max, MSG_DONTWAIT, NULL);
    while (got < 0 && errno == EINTR);
    if (got <= 0) {
        if (up == NULL)
            unlock_nogil();
        else
            unlock_gil();
        return 0;
    }
    now = batch_now(now); /* after the datagrams were read */
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
            ups[nu++] = (Up){1, outer_class(p, n), p, n, &from[i], NULL, NULL};
        } else if (r == SIGNAL) {
            ups[nu++] = (Up){3, UP_OWN, o, olen, &from[i], sa, NULL};
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
    nu = give_back(ups, nu, smsgs, siov, sent, ns, 4);
    nu = give_back(ups, nu, lmsgs, liov, lsent, nl, 2);
    ups_hold(self, ups, nu, up == NULL);
    if (up == NULL) {
        unlock_nogil();
        return got;
    }
    unlock_gil();
    /* the sends are done and the lock is free: now the Python objects */
    return ups_build(ups, nu, up) < 0 ? -1 : got;
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
 * The forwarding loop of established SAs, for a thread of its own: it runs WITHOUT the GIL from
 * its start to its end (a Python thread busy in the event loop never delays a batch) and
 * handles each ready socket's batch (up to ROUNDS x BATCH packets) under g_lock, exactly as
 * from_outer / from_inner do, with buffers of its own. What goes up to Python is copied into
 * a bounded queue (max_pending; beyond it dropped and counted) that drain() takes, and wake_fd
 * (an eventfd the event loop watches) is written when the queue stops being empty, and every
 * STATS_WAKE seconds while counters wait to be folded. Returns when stop_fd becomes readable
 * (or raises, after a fault). */
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
    lock();
    int already = self->running;
    unlock_gil();
    if (already) {
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
    Py_ssize_t limit = max_pending > 0 ? max_pending : 1;
    /* the IKE sources' table: twice the IKE share's slots (a source is in it only once one of
     * its datagrams went up), at most half full */
    size_t cap = 16;
    {
        Py_ssize_t l = limit * 3 / 8;
        while (cap < 2 * (size_t)(l > 0 ? l : 1))
            cap <<= 1;
    }
    uint8_t *ibuf = PyMem_RawMalloc((size_t)BATCH * BUFSZ);
    uint8_t *obuf = PyMem_RawMalloc((size_t)BATCH * BUFSZ);
    struct IkeSource *src = PyMem_RawCalloc(cap, sizeof(*src));
    RawUp **q = PyMem_RawMalloc((size_t)limit * sizeof(RawUp *));
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int failure = 0, err_no = 0; /* 1: epoll (err_no), 2: a fault injected */
    if (ibuf == NULL || obuf == NULL || q == NULL || ep < 0) {
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
    uint32_t seed;
    if (getrandom(&seed, sizeof(seed), GRND_NONBLOCK) != (ssize_t)sizeof(seed))
        seed = (uint32_t)(monotonic_now() * 1e9);
    lock();
    if (self->running) { /* another thread's run() came first */
        unlock_gil();
        PyErr_SetString(PyExc_RuntimeError, "the forwarding loop already runs");
        PyMem_RawFree(ibuf);
        PyMem_RawFree(obuf);
        PyMem_RawFree(src);
        PyMem_RawFree(q);
        close(ep);
        return NULL;
    }
    /* the queue: what an earlier run left waits for its drain (it fits: cut to the new bound
     * otherwise, the rest dropped and counted) */
    RawUp **oldq = self->q;
    Py_ssize_t keep = self->nq < limit ? self->nq : limit;
    if (keep)
        memcpy(q, oldq, (size_t)keep * sizeof(RawUp *));
    for (Py_ssize_t i = keep; i < self->nq; i++) {
        PyMem_RawFree(oldq[i]);
        self->up_dropped++;
        self->up_dropped_by[UP_OWN]++;
    }
    self->q = q;
    self->nq = keep;
    self->q_cap = limit;
    q = NULL;
    struct IkeSource *oldsrc = self->ike_src;
    self->ike_src = src;
    self->ike_cap = src != NULL ? cap : 0;
    src = NULL;
    self->ike_gen = 1;
    self->ike_seed = seed;
    self->up_limit = limit;
    self->running = 1;
    unlock_gil();
    PyMem_RawFree(oldq);
    PyMem_RawFree(oldsrc);
    Py_BEGIN_ALLOW_THREADS
    double last_wake = monotonic_now(), last_data = 0;
    for (;;) {
        struct epoll_event evs[MAX_OUTER + 2];
        int n = epoll_wait(ep, evs, MAX_OUTER + 2, (int)(STATS_WAKE * 1000));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            failure = 1;
            err_no = errno;
            break;
        }
        /* Busy: the previous wake-up came less than 4 pauses ago. Let a batch gather for one
         * pause (a sleep, no CPU) before reading: fewer wake-ups and context switches per
         * packet. Traffic that comes slower than that (a ping) is never delayed. */
        double woke = monotonic_now();
        if (coalesce_us > 0 && n > 0 && woke - last_data < 4e-6 * coalesce_us) {
            struct timespec ts = {0, (long)coalesce_us * 1000};
            nanosleep(&ts, NULL);
        }
        if (n > 0)
            last_data = woke;
        lock();
        int fault = self->fault;
        self->fault = 0;
        unlock_nogil();
        if (fault) {
            failure = 2;
            break;
        }
        double now = monotonic_now();
        int stop = 0;
        for (int i = 0; i < n; i++) {
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
                if (got < BATCH)
                    break;
            }
        }
        /* one wake-up per drain: drain() clears `woken` under g_lock */
        lock();
        int wake = (!self->woken && self->nq > 0) ||
                   (now - last_wake >= STATS_WAKE && counted_anything(self));
        if (wake)
            self->woken = 1;
        unlock_nogil();
        if (wake) {
            uint64_t one = 1;
            ssize_t w = write(wake_fd, &one, sizeof(one));
            (void)w; /* EAGAIN: the counter is already huge, a wake-up is pending anyway */
            last_wake = now;
        }
        if (stop)
            break;
    }
    Py_END_ALLOW_THREADS
    if (failure == 1) {
        errno = err_no;
        PyErr_SetFromErrno(PyExc_OSError);
    } else if (failure == 2) {
        PyErr_SetString(PyExc_RuntimeError, "fault injected into the forwarding loop");
    }
out:
    lock();
    self->running = 0;
    self->up_limit = 0;
    struct IkeSource *gone = self->ike_src;
    self->ike_src = NULL;
    self->ike_cap = 0;
    unlock_gil();
    PyMem_RawFree(gone);
    PyMem_RawFree(src);
    PyMem_RawFree(q);
    if (ep >= 0)
        close(ep);
    PyMem_RawFree(ibuf);
    PyMem_RawFree(obuf);
    if (!PyErr_Occurred())
        Py_RETURN_NONE;
    {
        uint64_t one = 1; /* the Python side learns of the end through the failure itself */
        ssize_t w = write(wake_fd, &one, sizeof(one));
        (void)w;
    }
    return NULL;
}

/* drain(wake_fd) -> list: what the forwarding loop handed up since the last call, in order
 * (items as from_outer / from_inner return them). Reads the eventfd first, then takes the
 * queue under g_lock: an item queued after this call wakes the loop again. A signal whose SA
 * left the table meanwhile is dropped (counted with the queue's own drops). */
static PyObject *
table_drain(TableObject *self, PyObject *args)
{
    int wake_fd;
    if (!PyArg_ParseTuple(args, "i", &wake_fd))
        return NULL;
    uint64_t v;
    ssize_t r = read(wake_fd, &v, sizeof(v));
    (void)r;
    PyObject *lst = PyList_New(0);
    if (lst == NULL)
        return NULL;
    RawUp **taken = NULL;
    PyObject **owners = NULL;
    lock();
    Py_ssize_t n = self->nq;
    if (n > 0) {
        taken = PyMem_RawMalloc((size_t)n * sizeof(*taken));
        owners = PyMem_RawCalloc((size_t)n, sizeof(*owners));
        if (taken == NULL || owners == NULL) {
            unlock_gil();
            PyMem_RawFree(taken);
            PyMem_RawFree(owners);
            Py_DECREF(lst);
            return PyErr_NoMemory();
        }
        memcpy(taken, self->q, (size_t)n * sizeof(*taken));
        self->nq = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (taken[i]->kind != 3)
                continue;
            uint8_t key[4];
            spi_key(taken[i]->spi, key);
            SAObject *sa = (SAObject *)map_get(&self->spis, key, 4);
            if (sa != NULL && sa->id == taken[i]->id) {
                owners[i] = sa->owner != NULL ? sa->owner : Py_None;
                Py_INCREF(owners[i]);
            } else {
                self->up_dropped++;
                self->up_dropped_by[UP_OWN]++;
            }
        }
    }
    memset(self->up_count, 0, sizeof(self->up_count));
    if (++self->ike_gen == 0) { /* every source's count starts again (wrapped: clear) */
        if (self->ike_src != NULL)
            memset(self->ike_src, 0, self->ike_cap * sizeof(*self->ike_src));
        self->ike_gen = 1;
    }
    self->woken = 0;
    unlock_gil();
    int err = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        RawUp *u = taken[i];
        if (!err && (u->kind != 3 || owners[i] != NULL)) {
            PyObject *item = up_item(u->kind, u->data, u->len, u->has_addr ? &u->addr : NULL,
                                     owners[i]);
            err = item == NULL || PyList_Append(lst, item) < 0;
            Py_XDECREF(item);
        }
        Py_XDECREF(owners[i]);
        PyMem_RawFree(u);
    }
    PyMem_RawFree(taken);
    PyMem_RawFree(owners);
    if (err) {
        Py_DECREF(lst);
        return NULL;
    }
    return lst;
}

/* _inject_fault(): the next wake-up of the forwarding loop raises (tests only) */
static PyObject *
table_inject_fault(TableObject *self, PyObject *unused)
{
    lock();
    self->fault = 1;
    unlock_gil();
    Py_RETURN_NONE;
}

static PyObject *
table_get_running(TableObject *self, void *c)
{
    lock();
    int r = self->running;
    unlock_gil();
    return PyBool_FromLong(r);
}

static PyObject *
table_get_up_dropped(TableObject *self, void *c)
{
    lock();
    unsigned long long d = self->up_dropped;
    unlock_gil();
    return PyLong_FromUnsignedLongLong(d);
}

static PyObject *
table_get_up_dropped_by(TableObject *self, void *c)
{
    unsigned long long by[N_UP];
    lock();
    memcpy(by, self->up_dropped_by, sizeof(by));
    unlock_gil();
    return Py_BuildValue("{sKsKsKsK}", "own", by[UP_OWN], "esp", by[UP_ESP], "ike", by[UP_IKE],
                         "inner", by[UP_INNER]);
}

/* take_stats() -> (in_packets, in_bytes, out_packets, out_bytes, drops tuple); resets them
 * (taken in one go under g_lock: between two batches; given back should the result fail) */
static PyObject *
table_take_stats(TableObject *self, PyObject *unused)
{
    unsigned long long c[4], drops[N_DROPS];
    lock();
    c[0] = self->in_packets;
    c[1] = self->in_bytes;
    c[2] = self->out_packets;
    c[3] = self->out_bytes;
    memcpy(drops, self->drops, sizeof(drops));
    self->in_packets = self->in_bytes = self->out_packets = self->out_bytes = 0;
    memset(self->drops, 0, sizeof(self->drops));
    unlock_gil();
    PyObject *d = PyTuple_New(N_DROPS), *res = NULL;
    for (int i = 0; d != NULL && i < N_DROPS; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(drops[i]);
        if (v == NULL) {
            Py_CLEAR(d);
            break;
        }
        PyTuple_SET_ITEM(d, i, v);
    }
    if (d != NULL)
        res = Py_BuildValue("(KKKKN)", c[0], c[1], c[2], c[3], d);
    if (res == NULL) {
        lock();
        self->in_packets += c[0];
        self->in_bytes += c[1];
        self->out_packets += c[2];
        self->out_bytes += c[3];
        for (int i = 0; i < N_DROPS; i++)
            self->drops[i] += drops[i];
        unlock_gil();
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
    if (Py_IS_TYPE(c, &SAType)) {
        lock();
        int a = ((SAObject *)c)->active != 0;
        unlock_gil();
        return a;
    }
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
        return get_u64(field[0] == 's' ? &sa->seq : field[0] == 'p' ? &sa->packets : &sa->bytes);
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
 * under g_lock, before anything that could run Python code (a DECREF may finalize an SA, an
 * allocation may collect); the forwarding thread appends afresh meanwhile. */
static PyObject *
module_take_touched(PyObject *m, PyObject *noargs)
{
    PyObject *owners = PyList_New(0);
    if (owners == NULL)
        return NULL;
    lock();
    fold_touched(); /* every entry a strong reference: ours once copied */
    Py_ssize_t n = g_ntouched;
    SAObject **taken = PyMem_RawMalloc((size_t)(n > 0 ? n : 1) * sizeof(*taken));
    if (taken == NULL) {
        unlock_gil();
        Py_DECREF(owners);
        return PyErr_NoMemory();
    }
    memcpy(taken, g_touched, (size_t)n * sizeof(*taken));
    int overflowed = g_touched_overflow;
    g_ntouched = g_nstrong = 0;
    g_touched_overflow = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        taken[i]->touched = 0;
    unlock_gil();
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
