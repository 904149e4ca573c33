/* _radix_native: the native core of tandem's KV indexer.
 *
 * Optional CPython extension (built by `pip install -e .` when a C compiler is present). It backs
 * tandem.kvbm.radix.NativeRadixTree, which keeps the per-worker bookkeeping (names, bit slots,
 * event ids, counters) in Python; the pure-Python tandem.kvbm.radix.PyRadixTree is the reference
 * and the fallback when this module is not built. Two parts:
 *
 * Table(words=1, seed=0)
 *   sequence hash (u64) -> the worker slots holding that block, as an open-addressing hash table
 *   (linear probing, backward-shift deletion, load factor at most 1/2, shrinks below 1/8).
 *   An entry is S = W + 1 u64 words, [key, mask[0], ..., mask[W-1]], so a probe reads one entry;
 *   worker slot s is bit s % 64 of mask[s / 64]. Bit 63 of mask[W-1] is not a slot: it flags a
 *   block stored as the start of a sequence (parent None), so a table of W words holds slots
 *   0 .. 64*W - 2 and widen() adds words. Key 0 marks an empty entry, so the block whose hash is
 *   0 lives in a side entry. A block nobody holds any more is deleted (with its start flag).
 *   Hashes are u64; a Python int outside that range is taken modulo 2**64. `seed` is mixed into
 *   the probe position (the caller passes a random one), so colliding keys cannot be chosen
 *   without knowing it.
 *
 *   dump() / load() copy every block out of / into a table in one call, as little-endian u64
 *   bytes (the indexer's snapshot format, tandem.protocol.messages.RadixTreeState).
 *
 * parse(payload)
 *   A strict parser for the msgpack KvEventBatch that tandem.protocol.messages.encode writes:
 *   {kind: "kv_events", worker_id, events: [{kind: "KvEvent", event_id, data: {kind, ...}}]}
 *   with data {kind: "stored", blocks: [{kind: "StoredBlock", block_hash, tokens_hash}],
 *   parent_hash?} | {kind: "removed", block_hashes} | {kind: "cleared"}. Returns
 *   (worker_id, [(event_id, kind 0|1|2, parent_hash | None, packed u64 hashes)]) where packed is
 *   bytes of native-order u64 (block hashes for stored, block_hashes for removed, empty for
 *   cleared), or None for anything else: other key orders of the data tag, unknown or duplicate
 *   keys, negative or non-integer numbers, other string encodings, trailing bytes, invalid UTF-8.
 *   The caller then decodes with msgspec, which accepts or rejects the payload; whatever parse
 *   accepts, msgspec decodes to the same values. Every length read is checked against the bytes
 *   left, so allocations are bounded by the payload size. Raises only MemoryError. The tags and
 *   field names are those of tandem.protocol.messages: if they drift, parse() answers None to
 *   everything (correct, only slower) and tests/unit/test_radix_native.py fails.
 *
 * Nothing here calls back into Python code while it holds a pointer into the table (arguments are
 * converted first; worker names are exact str), so a method cannot see the table change under it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define ROOTBIT ((uint64_t)1 << 63)
#define MIN_CAP ((Py_ssize_t)1 << 12)     /* entries; a power of two */
#define MAX_WORDS 16384                    /* mask words: 64 * 16384 - 1 worker slots */
#define MULT 0x9E3779B97F4A7C15ULL         /* 2**64 / golden ratio, odd */

#if defined(__GNUC__) || defined(__clang__)
#define CTZ64(d) __builtin_ctzll(d)
#else
static inline int CTZ64(uint64_t d) { /* d != 0 */
    int b = 0;
    while (!((d >> b) & 1)) b++;
    return b;
}
#endif

typedef struct {
    PyObject_HEAD
    uint64_t *e;         /* cap entries of S words; e[i * S] == 0: entry i is empty */
    Py_ssize_t cap;      /* power of two >= MIN_CAP */
    Py_ssize_t used;     /* entries in use in e (the side entry not counted) */
    uint64_t seed;
    int shift;           /* 64 - log2(cap) */
    int W, S;            /* mask words, entry words (W + 1) */
    int zero_used;       /* the side entry for key 0 is in use */
    uint64_t *zero;      /* side entry, S words */
    uint64_t *scratch;   /* 2 * W words, for find */
    PyObject **names;    /* 64 * W worker names (exact str) by slot, NULL where unset */
} Table;

static inline uint64_t load_u64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8); /* the buffer need not be aligned */
    return v;
}

/* Little-endian u64 (dump/load: the snapshot format is little-endian on every host). */
static inline uint64_t load_le64(const unsigned char *p) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return load_u64(p);
#else
    uint64_t v = 0;
    for (int k = 7; k >= 0; k--) v = (v << 8) | p[k];
    return v;
#endif
}

static inline void store_le64(unsigned char *p, uint64_t v) {
    for (int k = 0; k < 8; k++) p[k] = (unsigned char)(v >> (8 * k));
}

static inline Py_ssize_t home_of(uint64_t k, uint64_t seed, int shift) {
    return (Py_ssize_t)(((k ^ seed) * MULT) >> shift);
}

static int log2_of(Py_ssize_t cap) {
    int b = 0;
    while (((Py_ssize_t)1 << b) < cap) b++;
    return b;
}

static uint64_t *alloc_words(Py_ssize_t n) {
    if (n <= 0 || (size_t)n > PY_SSIZE_T_MAX / sizeof(uint64_t)) {
        PyErr_NoMemory();
        return NULL;
    }
    uint64_t *p = PyMem_Calloc((size_t)n, sizeof(uint64_t));
    if (!p) PyErr_NoMemory();
    return p;
}

/* Copy an entry of sS words into a zeroed one of dS >= sS words, moving the start flag. */
static void copy_entry(uint64_t *dst, int dS, const uint64_t *src, int sS) {
    memcpy(dst, src, sizeof(uint64_t) * (size_t)sS);
    dst[sS - 1] &= ~ROOTBIT;
    dst[dS - 1] |= src[sS - 1] & ROOTBIT;
}

/* Move every entry into a new array of newcap entries of newW + 1 words (newW >= W). On failure
 * the table is unchanged and MemoryError is set. Does not change t->W / t->S. */
static int rehash(Table *t, Py_ssize_t newcap, int newW) {
    int S = t->S, nS = newW + 1;
    if (newcap > PY_SSIZE_T_MAX / nS) {
        PyErr_NoMemory();
        return -1;
    }
    uint64_t *ne = alloc_words(newcap * nS);
    if (!ne) return -1;
    int nshift = 64 - log2_of(newcap);
    Py_ssize_t m = newcap - 1;
    for (Py_ssize_t i = 0; i < t->cap; i++) {
        const uint64_t *p = t->e + i * S;
        if (!p[0]) continue;
        Py_ssize_t j = home_of(p[0], t->seed, nshift);
        while (ne[j * nS]) j = (j + 1) & m;
        copy_entry(ne + j * nS, nS, p, S);
    }
    PyMem_Free(t->e);
    t->e = ne;
    t->cap = newcap;
    t->shift = nshift;
    return 0;
}

/* Make room for n more entries at load <= 1/2, so that inserting them cannot fail. */
static int reserve(Table *t, Py_ssize_t n) {
    if (n > PY_SSIZE_T_MAX / 4 - t->used) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t need = (t->used + n) * 2, cap = t->cap;
    if (need <= cap) return 0;
    while (cap < need) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    return rehash(t, cap, t->W);
}

/* Shrink when less than 1/8 full (to a load of 1/8 .. 1/4). Best effort: keeps the table as it is
 * if memory is short. */
static void maybe_shrink(Table *t) {
    Py_ssize_t cap = t->cap;
    while (cap > MIN_CAP && t->used * 8 < cap) cap /= 2;
    if (cap != t->cap && rehash(t, cap, t->W) < 0) PyErr_Clear();
}

static inline uint64_t *lookup(const Table *t, uint64_t k) {
    if (!k) return t->zero_used ? t->zero : NULL;
    int S = t->S;
    Py_ssize_t m = t->cap - 1, j = home_of(k, t->seed, t->shift);
    for (;;) { /* ends: the table always has empty entries */
        uint64_t *p = t->e + j * S;
        if (p[0] == k) return p;
        if (!p[0]) return NULL;
        j = (j + 1) & m;
    }
}

/* Only after reserve(): never fails. */
static inline uint64_t *lookup_or_insert(Table *t, uint64_t k) {
    int S = t->S;
    if (!k) {
        if (!t->zero_used) {
            memset(t->zero, 0, sizeof(uint64_t) * (size_t)S);
            t->zero_used = 1;
        }
        return t->zero;
    }
    Py_ssize_t m = t->cap - 1, j = home_of(k, t->seed, t->shift);
    for (;;) {
        uint64_t *p = t->e + j * S;
        if (p[0] == k) return p;
        if (!p[0]) {
            p[0] = k;
            t->used++;
            return p;
        }
        j = (j + 1) & m;
    }
}

static inline int nobody_holds(const uint64_t *p, int S) {
    for (int x = 1; x < S - 1; x++)
        if (p[x]) return 0;
    return !(p[S - 1] & ~ROOTBIT);
}

/* Delete the entry at p. Backward shift: each later entry of the probe run moves into the hole
 * when the hole lies on its probe path (between its home and where it is). */
static void delete_at(Table *t, uint64_t *p) {
    int S = t->S;
    if (p == t->zero) {
        memset(t->zero, 0, sizeof(uint64_t) * (size_t)S);
        t->zero_used = 0;
        return;
    }
    size_t m = (size_t)t->cap - 1, hole = (size_t)((p - t->e) / S), j = hole;
    for (;;) {
        j = (j + 1) & m;
        uint64_t *q = t->e + j * S;
        if (!q[0]) break;
        size_t h = (size_t)home_of(q[0], t->seed, t->shift);
        /* probe distances (cyclic): of q from its home, and of the hole back from q */
        if (((j - h) & m) >= ((j - hole) & m)) {
            memcpy(t->e + hole * S, q, sizeof(uint64_t) * (size_t)S);
            hole = j;
        }
    }
    memset(t->e + hole * S, 0, sizeof(uint64_t) * (size_t)S);
    t->used--;
}

/* ---------------------------------------------------------------------------- Table methods */

static PyObject *Table_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"words", "seed", NULL};
    int W = 1;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|iK:Table", kwlist, &W, &seed)) return NULL;
    if (W < 1 || W > MAX_WORDS) {
        PyErr_Format(PyExc_ValueError, "words must be 1..%d", MAX_WORDS);
        return NULL;
    }
    Table *t = (Table *)type->tp_alloc(type, 0);
    if (!t) return NULL;
    /* tp_alloc zeroed the struct: Table_dealloc copes with a partly built table */
    t->W = W;
    t->S = W + 1;
    t->seed = (uint64_t)seed;
    t->e = alloc_words(MIN_CAP * t->S);
    t->zero = alloc_words(t->S);
    t->scratch = alloc_words(2 * (Py_ssize_t)W);
    t->names = PyMem_Calloc((size_t)64 * (size_t)W, sizeof(PyObject *));
    if (!t->e || !t->zero || !t->scratch || !t->names) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        Py_DECREF(t);
        return NULL;
    }
    t->cap = MIN_CAP;
    t->shift = 64 - log2_of(MIN_CAP);
    return (PyObject *)t;
}

static void Table_dealloc(Table *t) {
    if (t->names) {
        for (Py_ssize_t i = 0; i < (Py_ssize_t)64 * t->W; i++) Py_XDECREF(t->names[i]);
        PyMem_Free(t->names);
    }
    PyMem_Free(t->e);
    PyMem_Free(t->zero);
    PyMem_Free(t->scratch);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

/* A worker slot: an int in 0 .. 64*W - 2. */
static int get_slot(const Table *t, PyObject *o, int *slot) {
    if (!PyLong_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "slot must be an int");
        return -1;
    }
    int overflow;
    long s = PyLong_AsLongAndOverflow(o, &overflow);
    if (s == -1 && PyErr_Occurred()) return -1;
    if (overflow || s < 0 || s >= (long)64 * t->W - 1) {
        PyErr_SetString(PyExc_ValueError, "slot out of range (widen the table first)");
        return -1;
    }
    *slot = (int)s;
    return 0;
}

/* A block hash: any int, modulo 2**64. */
static int get_key(PyObject *o, uint64_t *k) {
    if (!PyLong_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "a block hash must be an int");
        return -1;
    }
    *k = (uint64_t)PyLong_AsUnsignedLongLongMask(o);
    if (*k == (uint64_t)-1 && PyErr_Occurred()) return -1;
    return 0;
}

/* A bytes-like object of packed u64. */
static int get_packed(PyObject *o, Py_buffer *b) {
    if (PyObject_GetBuffer(o, b, PyBUF_SIMPLE) < 0) return -1;
    if (b->len % 8) {
        PyBuffer_Release(b);
        PyErr_SetString(PyExc_ValueError, "packed hashes: length must be a multiple of 8");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(store_doc,
"store(slot, packed, root, parent) -> (added, parent_known)\n\n"
"Add the slot to each block of packed (u64 hashes); with root true the first one starts a\n"
"sequence. added: blocks that did not have the slot; parent_known: parent is None or a block\n"
"someone held before this call.");

static PyObject *Table_store(Table *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "store() takes 4 arguments (slot, packed, root, parent)");
        return NULL;
    }
    int root = PyObject_IsTrue(args[2]);
    if (root < 0) return NULL;
    uint64_t pk = 0;
    int has_parent = args[3] != Py_None;
    if (has_parent && get_key(args[3], &pk) < 0) return NULL;
    Py_buffer b;
    if (get_packed(args[1], &b) < 0) return NULL;
    int slot;
    Py_ssize_t n = b.len / 8;
    if (get_slot(t, args[0], &slot) < 0 || reserve(t, n) < 0) {
        PyBuffer_Release(&b);
        return NULL;
    }
    /* From here on nothing fails and no Python code runs. */
    int parent_known = !has_parent || lookup(t, pk) != NULL;
    int w = 1 + slot / 64, S = t->S;
    uint64_t bit = (uint64_t)1 << (slot % 64);
    const unsigned char *h = b.buf;
    Py_ssize_t added = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t *p = lookup_or_insert(t, load_u64(h + 8 * i));
        if (!(p[w] & bit)) {
            p[w] |= bit;
            added++;
        }
        if (root && i == 0) p[S - 1] |= ROOTBIT;
    }
    PyBuffer_Release(&b);
    return Py_BuildValue("(nO)", added, parent_known ? Py_True : Py_False);
}

PyDoc_STRVAR(remove_doc,
"remove(slot, packed) -> removed\n\n"
"Take the slot off each block of packed; returns how many had it. Blocks nobody holds are dropped.");

static PyObject *Table_remove(Table *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "remove() takes 2 arguments (slot, packed)");
        return NULL;
    }
    Py_buffer b;
    if (get_packed(args[1], &b) < 0) return NULL;
    int slot;
    if (get_slot(t, args[0], &slot) < 0) {
        PyBuffer_Release(&b);
        return NULL;
    }
    int w = 1 + slot / 64, S = t->S;
    uint64_t bit = (uint64_t)1 << (slot % 64);
    const unsigned char *h = b.buf;
    Py_ssize_t n = b.len / 8, removed = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t *p = lookup(t, load_u64(h + 8 * i));
        if (!p || !(p[w] & bit)) continue;
        p[w] &= ~bit;
        removed++;
        if (nobody_holds(p, S)) delete_at(t, p);
    }
    PyBuffer_Release(&b);
    maybe_shrink(t);
    return PyLong_FromSsize_t(removed);
}

PyDoc_STRVAR(clear_slot_doc, "clear_slot(slot) -> removed\n\nTake the slot off every block (scans the table).");

static PyObject *Table_clear_slot(Table *t, PyObject *arg) {
    int slot;
    if (get_slot(t, arg, &slot) < 0) return NULL;
    int w = 1 + slot / 64, S = t->S;
    uint64_t bit = (uint64_t)1 << (slot % 64);
    Py_ssize_t removed = 0;
    if (t->zero_used && (t->zero[w] & bit)) {
        t->zero[w] &= ~bit;
        removed++;
        if (nobody_holds(t->zero, S)) delete_at(t, t->zero);
    }
    for (Py_ssize_t i = 0; i < t->cap;) {
        uint64_t *p = t->e + i * S;
        if (p[0] && (p[w] & bit)) {
            p[w] &= ~bit;
            removed++;
            if (nobody_holds(p, S)) {
                /* A later entry (or, at the end of the table, an already scanned one from its
                 * start) may move into entry i: look at i again. */
                delete_at(t, p);
                continue;
            }
        }
        i++;
    }
    maybe_shrink(t);
    return PyLong_FromSsize_t(removed);
}

PyDoc_STRVAR(set_name_doc, "set_name(slot, name)\n\nThe worker name (str, or None) find() reports for the slot.");

static PyObject *Table_set_name(Table *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_name() takes 2 arguments (slot, name)");
        return NULL;
    }
    int slot;
    if (get_slot(t, args[0], &slot) < 0) return NULL;
    PyObject *name = args[1];
    if (name != Py_None && !PyUnicode_CheckExact(name)) {
        PyErr_SetString(PyExc_TypeError, "name must be a str or None");
        return NULL;
    }
    PyObject *old = t->names[slot];
    t->names[slot] = name == Py_None ? NULL : Py_NewRef(name);
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

/* out[name of each slot in bits] = score. */
static int emit(const Table *t, PyObject *out, const uint64_t *bits, Py_ssize_t score) {
    PyObject *v = PyLong_FromSsize_t(score);
    if (!v) return -1;
    for (int x = 0; x < t->W; x++) {
        uint64_t d = bits[x];
        while (d) {
            int b = CTZ64(d);
            d &= d - 1;
            PyObject *name = t->names[(Py_ssize_t)x * 64 + b];
            if (!name) {
                PyErr_Format(PyExc_RuntimeError, "worker slot %d holds blocks but has no name", x * 64 + b);
                Py_DECREF(v);
                return -1;
            }
            if (PyDict_SetItem(out, name, v) < 0) {
                Py_DECREF(v);
                return -1;
            }
        }
    }
    Py_DECREF(v);
    return 0;
}

PyDoc_STRVAR(find_doc,
"find(hashes) -> {name: score}\n\n"
"For each worker, how many leading blocks of hashes (sequence hashes) it holds, contiguously from\n"
"the first, which must start a sequence; workers with 0 left out. Items that are not ints match\n"
"nothing.");

static PyObject *Table_find(Table *t, PyObject *seq) {
    PyObject *fast = PySequence_Fast(seq, "find() takes a sequence of block hashes");
    if (!fast) return NULL;
    PyObject *out = PyDict_New();
    if (!out) {
        Py_DECREF(fast);
        return NULL;
    }
    /* No Python code runs below: fast's items stay put. */
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    int W = t->W;
    uint64_t *acc = t->scratch, *nx = t->scratch + W;
    Py_ssize_t depth = 0; /* acc: workers holding every block before depth */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyLong_Check(items[i])) break;
        uint64_t k;
        if (get_key(items[i], &k) < 0) goto fail;
        const uint64_t *p = lookup(t, k);
        if (!p) break;
        if (i == 0) {
            if (!(p[W] & ROOTBIT)) break;
            memcpy(acc, p + 1, sizeof(uint64_t) * (size_t)W);
            acc[W - 1] &= ~ROOTBIT;
            depth = 1;
            continue;
        }
        int any = 0, changed = 0;
        for (int x = 0; x < W; x++) {
            nx[x] = acc[x] & p[1 + x];
            any |= nx[x] != 0;
            changed |= nx[x] != acc[x];
        }
        if (changed) {
            for (int x = 0; x < W; x++) nx[x] ^= acc[x]; /* nx: the workers dropping out here */
            if (emit(t, out, nx, depth) < 0) goto fail;
            for (int x = 0; x < W; x++) acc[x] ^= nx[x];
            if (!any) {
                depth = 0;
                break;
            }
        }
        depth++;
    }
    if (depth && emit(t, out, acc, depth) < 0) goto fail;
    Py_DECREF(fast);
    return out;
fail:
    Py_DECREF(fast);
    Py_DECREF(out);
    return NULL;
}

PyDoc_STRVAR(items_doc,
"items() -> [(hash, mask, root)]\n\n"
"Every block: its hash, the slots holding it as 8*W little-endian bytes (int.from_bytes(mask,\n"
"'little') is the bitmask), whether it starts a sequence. For integrity checks and tests.");

static PyObject *entry_item(const Table *t, const uint64_t *p) {
    int W = t->W;
    PyObject *mask = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)8 * W);
    if (!mask) return NULL;
    unsigned char *m = (unsigned char *)PyBytes_AS_STRING(mask);
    for (int x = 0; x < W; x++) {
        uint64_t v = p[1 + x];
        if (x == W - 1) v &= ~ROOTBIT;
        for (int k = 0; k < 8; k++) m[8 * x + k] = (unsigned char)(v >> (8 * k));
    }
    PyObject *key = PyLong_FromUnsignedLongLong(p[0]);
    if (!key) {
        Py_DECREF(mask);
        return NULL;
    }
    PyObject *it = PyTuple_Pack(3, key, mask, (p[W] & ROOTBIT) ? Py_True : Py_False);
    Py_DECREF(key);
    Py_DECREF(mask);
    return it;
}

static PyObject *Table_items(Table *t, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    for (Py_ssize_t i = -1; i < t->cap; i++) {
        const uint64_t *p;
        if (i < 0) {
            if (!t->zero_used) continue;
            p = t->zero;
        } else {
            p = t->e + i * t->S;
            if (!p[0]) continue;
        }
        PyObject *it = entry_item(t, p);
        if (!it || PyList_Append(out, it) < 0) {
            Py_XDECREF(it);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(it);
    }
    return out;
}

PyDoc_STRVAR(dump_doc,
"dump() -> (hashes, masks, roots)\n\n"
"Every block, as bytes of little-endian u64: hashes (one per block), masks (W words per block, in\n"
"the same order, the sequence-start flag cleared: the slots holding it) and roots (the hashes of the\n"
"blocks that start a sequence). load() takes them back.");

static PyObject *Table_dump(Table *t, PyObject *Py_UNUSED(ignored)) {
    int W = t->W, S = t->S;
    Py_ssize_t n = t->used + t->zero_used, nroots = 0;
    for (Py_ssize_t i = 0; i < t->cap; i++) {
        const uint64_t *p = t->e + i * S;
        if (p[0] && (p[W] & ROOTBIT)) nroots++;
    }
    if (t->zero_used && (t->zero[W] & ROOTBIT)) nroots++;
    PyObject *hashes = PyBytes_FromStringAndSize(NULL, 8 * n);
    PyObject *masks = hashes ? PyBytes_FromStringAndSize(NULL, 8 * n * W) : NULL;
    PyObject *roots = masks ? PyBytes_FromStringAndSize(NULL, 8 * nroots) : NULL;
    if (!roots) {
        Py_XDECREF(hashes);
        Py_XDECREF(masks);
        return NULL;
    }
    unsigned char *h = (unsigned char *)PyBytes_AS_STRING(hashes);
    unsigned char *m = (unsigned char *)PyBytes_AS_STRING(masks);
    unsigned char *r = (unsigned char *)PyBytes_AS_STRING(roots);
    for (Py_ssize_t i = -1; i < t->cap; i++) {
        const uint64_t *p;
        if (i < 0) {
            if (!t->zero_used) continue;
            p = t->zero;
        } else {
            p = t->e + i * S;
            if (!p[0]) continue;
        }
        store_le64(h, p[0]);
        h += 8;
        for (int x = 0; x < W; x++, m += 8) store_le64(m, x == W - 1 ? p[1 + x] & ~ROOTBIT : p[1 + x]);
        if (p[W] & ROOTBIT) {
            store_le64(r, p[0]);
            r += 8;
        }
    }
    PyObject *out = PyTuple_Pack(3, hashes, masks, roots);
    Py_DECREF(hashes);
    Py_DECREF(masks);
    Py_DECREF(roots);
    return out;
}

/* Forget every block (load() failing half-way). */
static void clear_all(Table *t) {
    memset(t->e, 0, sizeof(uint64_t) * (size_t)t->cap * (size_t)t->S);
    t->used = 0;
    memset(t->zero, 0, sizeof(uint64_t) * (size_t)t->S);
    t->zero_used = 0;
    maybe_shrink(t);
}

PyDoc_STRVAR(load_doc,
"load(hashes, masks, words, roots) -> counts\n\n"
"Fill an empty table from dump()'s format: hashes and roots as little-endian u64 bytes, masks as\n"
"`words` little-endian u64 per block (words beyond this table's must be 0). Returns the blocks each\n"
"slot holds (a list of 64*W - 1 ints). ValueError, the table left empty, if the table holds blocks,\n"
"a length does not fit, a mask is 0 or sets a bit past the last slot, a hash repeats or a root is\n"
"not one of the hashes; MemoryError.");

static PyObject *Table_load(Table *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "load() takes 4 arguments (hashes, masks, words, roots)");
        return NULL;
    }
    if (t->used || t->zero_used) {
        PyErr_SetString(PyExc_ValueError, "load() needs an empty table");
        return NULL;
    }
    int overflow;
    long words = PyLong_AsLongAndOverflow(args[2], &overflow);
    if (words == -1 && PyErr_Occurred()) return NULL;
    if (overflow || words < 1 || words > MAX_WORDS) {
        PyErr_Format(PyExc_ValueError, "words must be 1..%d", MAX_WORDS);
        return NULL;
    }
    Py_buffer hb, mb, rb;
    if (PyObject_GetBuffer(args[0], &hb, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[1], &mb, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&hb);
        return NULL;
    }
    if (PyObject_GetBuffer(args[3], &rb, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&hb);
        PyBuffer_Release(&mb);
        return NULL;
    }
    PyObject *out = NULL;
    Py_ssize_t *counts = NULL;
    const char *err = NULL;
    Py_ssize_t n = hb.len / 8, nslots = (Py_ssize_t)64 * t->W - 1;
    if (hb.len % 8 || rb.len % 8 || mb.len % (8 * words) || mb.len / (8 * words) != n) {
        err = "hashes, masks or roots: lengths do not fit";
        goto done;
    }
    counts = PyMem_Calloc((size_t)nslots, sizeof(Py_ssize_t));
    if (!counts) {
        PyErr_NoMemory();
        goto done;
    }
    if (reserve(t, n) < 0) goto done;
    /* From here on no Python code runs until the table is complete (or cleared). */
    const unsigned char *h = hb.buf, *m = mb.buf, *r = rb.buf;
    int W = t->W;
    for (Py_ssize_t i = 0; i < n && !err; i++) {
        uint64_t k = load_le64(h + 8 * i);
        if (lookup(t, k)) {
            err = "a block hash repeats";
            break;
        }
        uint64_t *p = lookup_or_insert(t, k), any = 0;
        for (long x = 0; x < words; x++) {
            uint64_t v = load_le64(m + 8 * (i * words + x));
            any |= v;
            if (x < W) p[1 + x] = v;
            else if (v) err = "a mask sets a bit past the last slot";
        }
        if (!any) err = "a block is held by no slot";
        else if (p[W] & ROOTBIT) err = "a mask sets a bit past the last slot";
        for (int x = 0; x < W && !err; x++) {
            uint64_t d = p[1 + x];
            while (d) {
                counts[(Py_ssize_t)x * 64 + CTZ64(d)]++;
                d &= d - 1;
            }
        }
    }
    for (Py_ssize_t i = 0; i < rb.len / 8 && !err; i++) {
        uint64_t *p = lookup(t, load_le64(r + 8 * i));
        if (!p) err = "a sequence start is not one of the blocks";
        else p[W] |= ROOTBIT;
    }
    if (err) {
        clear_all(t);
        goto done;
    }
    out = PyList_New(nslots);
    if (!out) {
        clear_all(t);
        goto done;
    }
    for (Py_ssize_t s = 0; s < nslots; s++) {
        PyObject *v = PyLong_FromSsize_t(counts[s]);
        if (!v) {
            Py_CLEAR(out);
            clear_all(t);
            goto done;
        }
        PyList_SET_ITEM(out, s, v);
    }
done:
    if (err) PyErr_SetString(PyExc_ValueError, err);
    PyMem_Free(counts);
    PyBuffer_Release(&hb);
    PyBuffer_Release(&mb);
    PyBuffer_Release(&rb);
    return out;
}

PyDoc_STRVAR(widen_doc, "widen(words)\n\nUse that many mask words (>= the current number): room for 64*words - 1 slots.");

static PyObject *Table_widen(Table *t, PyObject *arg) {
    int overflow;
    long nw = PyLong_AsLongAndOverflow(arg, &overflow);
    if (nw == -1 && PyErr_Occurred()) return NULL;
    if (overflow || nw < t->W || nw > MAX_WORDS) {
        PyErr_Format(PyExc_ValueError, "words must be %d..%d", t->W, MAX_WORDS);
        return NULL;
    }
    if (nw == t->W) Py_RETURN_NONE;
    uint64_t *zero = alloc_words(nw + 1);
    uint64_t *scratch = zero ? alloc_words(2 * nw) : NULL;
    PyObject **names = scratch ? PyMem_Calloc((size_t)64 * (size_t)nw, sizeof(PyObject *)) : NULL;
    if (!names) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto fail;
    }
    if (rehash(t, t->cap, (int)nw) < 0) goto fail;
    /* Committed: nothing below fails. */
    copy_entry(zero, (int)nw + 1, t->zero, t->S);
    memcpy(names, t->names, sizeof(PyObject *) * (size_t)64 * (size_t)t->W); /* moves the refs */
    PyMem_Free(t->zero);
    PyMem_Free(t->scratch);
    PyMem_Free(t->names);
    t->zero = zero;
    t->scratch = scratch;
    t->names = names;
    t->W = (int)nw;
    t->S = (int)nw + 1;
    Py_RETURN_NONE;
fail:
    PyMem_Free(zero);
    PyMem_Free(scratch);
    PyMem_Free(names);
    return NULL;
}

static PyObject *Table_names(Table *t, PyObject *Py_UNUSED(ignored)) {
    Py_ssize_t n = (Py_ssize_t)64 * t->W - 1;
    PyObject *out = PyList_New(n);
    if (!out) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) PyList_SET_ITEM(out, i, Py_NewRef(t->names[i] ? t->names[i] : Py_None));
    return out;
}

static PyObject *Table_size(Table *t, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromSsize_t(t->used + t->zero_used);
}

static PyObject *Table_words(Table *t, PyObject *Py_UNUSED(ignored)) { return PyLong_FromLong(t->W); }

static PyObject *Table_capacity(Table *t, PyObject *Py_UNUSED(ignored)) { return PyLong_FromSsize_t(t->cap); }

static PyMethodDef Table_methods[] = {
    {"store", (PyCFunction)(void (*)(void))Table_store, METH_FASTCALL, store_doc},
    {"remove", (PyCFunction)(void (*)(void))Table_remove, METH_FASTCALL, remove_doc},
    {"clear_slot", (PyCFunction)Table_clear_slot, METH_O, clear_slot_doc},
    {"set_name", (PyCFunction)(void (*)(void))Table_set_name, METH_FASTCALL, set_name_doc},
    {"find", (PyCFunction)Table_find, METH_O, find_doc},
    {"items", (PyCFunction)Table_items, METH_NOARGS, items_doc},
    {"dump", (PyCFunction)Table_dump, METH_NOARGS, dump_doc},
    {"load", (PyCFunction)(void (*)(void))Table_load, METH_FASTCALL, load_doc},
    {"widen", (PyCFunction)Table_widen, METH_O, widen_doc},
    {"names", (PyCFunction)Table_names, METH_NOARGS, "names() -> the worker name of each slot (None: unset)"},
    {"size", (PyCFunction)Table_size, METH_NOARGS, "size() -> blocks held by at least one slot"},
    {"words", (PyCFunction)Table_words, METH_NOARGS, "words() -> mask words (64*words - 1 slots)"},
    {"capacity", (PyCFunction)Table_capacity, METH_NOARGS, "capacity() -> entries allocated"},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(Table_doc,
"Table(words=1, seed=0): sequence hash -> worker slots holding the block (see the module doc).");

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tandem.kvbm._radix_native.Table",
    .tp_basicsize = sizeof(Table),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = Table_doc,
    .tp_new = Table_new,
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_methods = Table_methods,
};

/* ------------------------------------------------------------------ strict msgpack parser */

typedef struct {
    const unsigned char *p, *end;
} Reader;

static inline size_t left(const Reader *r) { return (size_t)(r->end - r->p); }

static int read_be(Reader *r, size_t k, uint64_t *v) {
    if (left(r) < k) return -1;
    uint64_t x = 0;
    for (size_t i = 0; i < k; i++) x = (x << 8) | r->p[i];
    r->p += k;
    *v = x;
    return 0;
}

/* A map (fixmap, map16, map32) or array (fixarray, array16, array32) header. */
static int read_header(Reader *r, int map, uint64_t *n) {
    if (!left(r)) return -1;
    unsigned char c = *r->p++;
    unsigned char fix = map ? 0x80 : 0x90, c16 = map ? 0xde : 0xdc, c32 = map ? 0xdf : 0xdd;
    if ((c & 0xf0) == fix) {
        *n = c & 0x0f;
        return 0;
    }
    if (c == c16) return read_be(r, 2, n);
    if (c == c32) return read_be(r, 4, n);
    return -1;
}

/* A str (fixstr, str8, str16, str32), its bytes checked to lie in the payload. */
static int read_str(Reader *r, const char **s, size_t *n) {
    if (!left(r)) return -1;
    unsigned char c = *r->p++;
    uint64_t len;
    if ((c & 0xe0) == 0xa0) len = c & 0x1f;
    else if (c == 0xd9) { if (read_be(r, 1, &len)) return -1; }
    else if (c == 0xda) { if (read_be(r, 2, &len)) return -1; }
    else if (c == 0xdb) { if (read_be(r, 4, &len)) return -1; }
    else return -1;
    if (left(r) < len) return -1;
    *s = (const char *)r->p;
    *n = (size_t)len;
    r->p += len;
    return 0;
}

/* A non-negative integer (positive fixint, uint8..uint64). */
static int read_uint(Reader *r, uint64_t *v) {
    if (!left(r)) return -1;
    unsigned char c = *r->p++;
    if (c < 0x80) {
        *v = c;
        return 0;
    }
    switch (c) {
    case 0xcc: return read_be(r, 1, v);
    case 0xcd: return read_be(r, 2, v);
    case 0xce: return read_be(r, 4, v);
    case 0xcf: return read_be(r, 8, v);
    default: return -1;
    }
}

static inline int str_is(const char *s, size_t n, const char *lit) {
    size_t k = strlen(lit);
    return n == k && memcmp(s, lit, k) == 0;
}

/* The next str equals lit. */
static inline int read_str_is(Reader *r, const char *lit) {
    const char *s;
    size_t n;
    return read_str(r, &s, &n) == 0 && str_is(s, n, lit);
}

/* Parse result codes: OK, BAIL (not understood: caller returns None), ERR (exception set). */
enum { OK = 0, BAIL = 1, ERR = 2 };

/* n u64 values written by each(), into a new bytes object. */
static int new_packed(uint64_t n, const Reader *r, size_t min_item_bytes, PyObject **out) {
    /* every item takes at least min_item_bytes of the payload: bounds the allocation */
    if (n > left(r) / min_item_bytes || n > (uint64_t)(PY_SSIZE_T_MAX / 8)) return BAIL;
    *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n * 8);
    return *out ? OK : ERR;
}

/* data of a KvStored: the fields after the tag. */
static int parse_stored(Reader *r, uint64_t nfields, PyObject **packed, PyObject **parent) {
    int have_blocks = 0, have_parent = 0;
    for (uint64_t f = 0; f < nfields; f++) {
        const char *s;
        size_t sl;
        if (read_str(r, &s, &sl)) return BAIL;
        if (!have_blocks && str_is(s, sl, "blocks")) {
            uint64_t nb;
            have_blocks = 1;
            if (read_header(r, 0, &nb)) return BAIL;
            /* a block: fixmap, three keys, the tag, two ints: far more than 16 bytes */
            int rc = new_packed(nb, r, 16, packed);
            if (rc != OK) return rc;
            unsigned char *o = (unsigned char *)PyBytes_AS_STRING(*packed);
            for (uint64_t x = 0; x < nb; x++) {
                uint64_t bm, hv = 0, tv = 0;
                int bk = 0, bh = 0, bt = 0;
                if (read_header(r, 1, &bm)) return BAIL;
                for (uint64_t y = 0; y < bm; y++) {
                    if (read_str(r, &s, &sl)) return BAIL;
                    if (!bk && str_is(s, sl, "kind")) {
                        if (!read_str_is(r, "StoredBlock")) return BAIL;
                        bk = 1;
                    } else if (!bh && str_is(s, sl, "block_hash")) {
                        if (read_uint(r, &hv)) return BAIL;
                        bh = 1;
                    } else if (!bt && str_is(s, sl, "tokens_hash")) {
                        if (read_uint(r, &tv)) return BAIL;
                        bt = 1;
                    } else {
                        return BAIL;
                    }
                }
                if (!(bk && bh && bt)) return BAIL;
                memcpy(o + 8 * x, &hv, 8);
            }
        } else if (!have_parent && str_is(s, sl, "parent_hash")) {
            have_parent = 1;
            if (left(r) && *r->p == 0xc0) {
                r->p++; /* nil: the default */
            } else {
                uint64_t pv;
                if (read_uint(r, &pv)) return BAIL;
                *parent = PyLong_FromUnsignedLongLong(pv);
                if (!*parent) return ERR;
            }
        } else {
            return BAIL;
        }
    }
    return have_blocks ? OK : BAIL;
}

/* data of a KvRemoved: the fields after the tag. */
static int parse_removed(Reader *r, uint64_t nfields, PyObject **packed) {
    if (nfields != 1) return BAIL;
    uint64_t nb;
    if (!read_str_is(r, "block_hashes") || read_header(r, 0, &nb)) return BAIL;
    int rc = new_packed(nb, r, 1, packed);
    if (rc != OK) return rc;
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(*packed);
    for (uint64_t x = 0; x < nb; x++) {
        uint64_t v;
        if (read_uint(r, &v)) return BAIL;
        memcpy(o + 8 * x, &v, 8);
    }
    return OK;
}

/* One KvEvent map -> (event_id, kind, parent, packed) in *out. */
static int parse_event(Reader *r, PyObject **out) {
    uint64_t nfields, event_id = 0;
    int have_tag = 0, have_id = 0, kind = -1, rc = BAIL;
    PyObject *parent = NULL, *packed = NULL, *eid = NULL;
    if (read_header(r, 1, &nfields)) return BAIL;
    for (uint64_t f = 0; f < nfields; f++) {
        const char *s;
        size_t sl;
        if (read_str(r, &s, &sl)) goto done;
        if (!have_tag && str_is(s, sl, "kind")) {
            if (!read_str_is(r, "KvEvent")) goto done;
            have_tag = 1;
        } else if (!have_id && str_is(s, sl, "event_id")) {
            if (read_uint(r, &event_id)) goto done;
            have_id = 1;
        } else if (kind < 0 && str_is(s, sl, "data")) {
            uint64_t dm;
            if (read_header(r, 1, &dm) || dm == 0) goto done;
            if (!read_str_is(r, "kind") || read_str(r, &s, &sl)) goto done; /* the tag comes first */
            if (str_is(s, sl, "stored")) {
                kind = 0;
                rc = parse_stored(r, dm - 1, &packed, &parent);
            } else if (str_is(s, sl, "removed")) {
                kind = 1;
                rc = parse_removed(r, dm - 1, &packed);
            } else if (str_is(s, sl, "cleared")) {
                kind = 2;
                rc = dm == 1 ? OK : BAIL;
            }
            if (kind < 0 || rc != OK) goto done;
            rc = BAIL;
        } else {
            goto done;
        }
    }
    if (!(have_tag && have_id && kind >= 0)) goto done;
    if (!packed && !(packed = PyBytes_FromStringAndSize(NULL, 0))) {
        rc = ERR;
        goto done;
    }
    eid = PyLong_FromUnsignedLongLong(event_id);
    if (!eid) {
        rc = ERR;
        goto done;
    }
    *out = Py_BuildValue("(OiOO)", eid, kind, parent ? parent : Py_None, packed);
    rc = *out ? OK : ERR;
done:
    Py_XDECREF(eid);
    Py_XDECREF(parent);
    Py_XDECREF(packed);
    return rc;
}

static int parse_batch(Reader *r, PyObject **worker, PyObject **events) {
    uint64_t nfields;
    int have_tag = 0;
    if (read_header(r, 1, &nfields)) return BAIL;
    for (uint64_t f = 0; f < nfields; f++) {
        const char *s;
        size_t sl;
        if (read_str(r, &s, &sl)) return BAIL;
        if (!have_tag && str_is(s, sl, "kind")) {
            if (!read_str_is(r, "kv_events")) return BAIL;
            have_tag = 1;
        } else if (!*worker && str_is(s, sl, "worker_id")) {
            if (read_str(r, &s, &sl) || sl > PY_SSIZE_T_MAX) return BAIL;
            *worker = PyUnicode_DecodeUTF8(s, (Py_ssize_t)sl, "strict");
            if (!*worker) {
                if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) return ERR;
                PyErr_Clear();
                return BAIL;
            }
        } else if (!*events && str_is(s, sl, "events")) {
            uint64_t ne;
            if (read_header(r, 0, &ne)) return BAIL;
            /* an event takes more than 8 bytes of the payload: bounds the list */
            if (ne > left(r) / 8) return BAIL;
            *events = PyList_New((Py_ssize_t)ne);
            if (!*events) return ERR;
            for (uint64_t e = 0; e < ne; e++) {
                PyObject *ev = NULL;
                int rc = parse_event(r, &ev);
                if (rc != OK) return rc; /* the list's unset items are NULL: freed fine */
                PyList_SET_ITEM(*events, (Py_ssize_t)e, ev);
            }
        } else {
            return BAIL;
        }
    }
    if (!have_tag || !*worker || !*events || r->p != r->end) return BAIL;
    return OK;
}

PyDoc_STRVAR(parse_doc,
"parse(payload) -> (worker_id, [(event_id, kind, parent_hash, packed)]) | None\n\n"
"Strict parser for the msgpack KvEventBatch tandem's encoder writes; kind 0 stored, 1 removed,\n"
"2 cleared; packed: native-order u64 hashes. None for anything else (decode it with msgspec).");

static PyObject *parse(PyObject *Py_UNUSED(module), PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    Reader r = {(const unsigned char *)b.buf, (const unsigned char *)b.buf + b.len};
    PyObject *worker = NULL, *events = NULL, *res = NULL;
    int rc = parse_batch(&r, &worker, &events);
    PyBuffer_Release(&b);
    if (rc == OK) res = PyTuple_Pack(2, worker, events);
    Py_XDECREF(worker);
    Py_XDECREF(events);
    if (rc == ERR) return NULL;
    if (rc == BAIL) Py_RETURN_NONE;
    return res;
}

/* ------------------------------------------------------------------------------- module */

static PyMethodDef module_methods[] = {
    {"parse", parse, METH_O, parse_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(module_doc, "Native core of tandem's KV indexer: the block table and a KvEventBatch parser.");

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "tandem.kvbm._radix_native", module_doc, -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__radix_native(void) {
    if (PyType_Ready(&TableType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Table", (PyObject *)&TableType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
