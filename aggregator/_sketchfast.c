/* The flush's per-series work in C (see sketch.py for the formats).
 *
 * sketch_bytes(values, low, high, inv_log_gamma, max_buckets) builds the
 * serialized sketch of an unsampled timer's values, as sketch.sketch_bytes
 * does: the same bucket for each value (the same libm log and ceil), the
 * buckets in the order their first value arrived, whole counts.
 *
 * merge_sketches(blobs, max_buckets) adds serialized sketches bucket by
 * bucket, as sketch._merge_small_sketches does: buckets in the order they
 * first appear, min of the mins, max of the maxes.
 *
 * merge_sets(blobs, limit) unions exact set states, as
 * sketch._merge_exact_sets does: the distinct members, sorted. Only for
 * ASCII members, whose byte order is Python's string order.
 *
 * window_rollups(...) makes aggregate.snapshot's rollups of one window,
 * unsorted: every counter and gauge, the unsampled timers (their values
 * packed, 8 bytes each: aggregate.pack_value) and the sets of
 * ASCII members within the exact limit, with the sketches and set states
 * above; it lists the keys of the other timers and sets for Python to make,
 * and returns None (Python makes them all) when a part of the window is not
 * in the form the aggregator keeps.
 *
 * window_rows(...) turns one window's rollups into the writer's rows, with
 * the series and metric ids of its cache, sorted as the b-tree is.
 *
 * fold_rows(...) folds one window's rows into the running columns of the
 * minute being filled, as storage._Pending.add does, when each of its series
 * has a column position already, and declines (None) anything else.
 *
 * merge_series(...) folds an ingest worker's window into the daemon's, as
 * aggregate._merge_series does, admitting each new series as
 * limits.Budget.admit would (calling it when a limit is reached).
 *
 * The first three return the very bytes of the Python path, or None where that path
 * must decide: a value that is not a finite float, a blob that is not the
 * plain form (every weight a whole number below 2**53, floats as float64,
 * canonical msgpack), more than max_buckets buckets for a sign, a member
 * that is not ASCII text, more than limit members. Python then
 * takes the slow path, which raises or folds as it always did.
 * tests/test_sketchfast.py holds the two paths to the same bytes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "_admission.h"

/* weights and their sums stay below this: a float holds them exactly */
#define EXACT_INT (INT64_C(1) << 53)

/* ------------------------------------------------------------ bucket maps */

/* An insertion-ordered map of bucket index -> whole weight. */
typedef struct {
    int64_t *index;
    int64_t *weight;
    Py_ssize_t *seen_in;   /* the blob (or value) that last added to the bucket */
    Py_ssize_t used;
    Py_ssize_t limit;      /* more buckets than this: Python decides (it folds them) */
    Py_ssize_t capacity;   /* of the three arrays above */
    int32_t *slots;        /* open addressing over positions; -1 marks empty */
    Py_ssize_t mask;       /* slot count - 1 */
} Buckets;

static void
buckets_free(Buckets *b)
{
    PyMem_Free(b->index);
    PyMem_Free(b->weight);
    PyMem_Free(b->seen_in);
    PyMem_Free(b->slots);
}

static int
buckets_init(Buckets *b, Py_ssize_t limit)
{
    memset(b, 0, sizeof(*b));
    b->limit = limit;
    b->capacity = 32;
    b->mask = 63;
    b->index = PyMem_Malloc(sizeof(int64_t) * (size_t)b->capacity);
    b->weight = PyMem_Malloc(sizeof(int64_t) * (size_t)b->capacity);
    b->seen_in = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)b->capacity);
    b->slots = PyMem_Malloc(sizeof(int32_t) * (size_t)(b->mask + 1));
    if (!b->index || !b->weight || !b->seen_in || !b->slots) {
        buckets_free(b);
        PyErr_NoMemory();
        return -1;
    }
    memset(b->slots, 0xff, sizeof(int32_t) * (size_t)(b->mask + 1));
    return 0;
}

static Py_ssize_t
slot_of(const Buckets *b, int64_t index)
{
    Py_ssize_t i = (Py_ssize_t)(((uint64_t)index * UINT64_C(0x9E3779B97F4A7C15)) >> 40) & b->mask;
    while (b->slots[i] >= 0 && b->index[b->slots[i]] != index)
        i = (i + 1) & b->mask;
    return i;
}

static int
buckets_grow(Buckets *b)
{
    Py_ssize_t capacity = b->capacity * 2;
    int64_t *index = PyMem_Realloc(b->index, sizeof(int64_t) * (size_t)capacity);
    if (index != NULL)
        b->index = index;
    int64_t *weight = PyMem_Realloc(b->weight, sizeof(int64_t) * (size_t)capacity);
    if (weight != NULL)
        b->weight = weight;
    Py_ssize_t *seen_in = PyMem_Realloc(b->seen_in, sizeof(Py_ssize_t) * (size_t)capacity);
    if (seen_in != NULL)
        b->seen_in = seen_in;
    int32_t *slots = PyMem_Malloc(sizeof(int32_t) * (size_t)(capacity * 2));
    if (!index || !weight || !seen_in || !slots) {
        PyMem_Free(slots);
        PyErr_NoMemory();
        return -1;
    }
    PyMem_Free(b->slots);
    b->slots = slots;
    b->capacity = capacity;
    b->mask = capacity * 2 - 1;
    memset(b->slots, 0xff, sizeof(int32_t) * (size_t)(capacity * 2));
    for (Py_ssize_t p = 0; p < b->used; p++)
        b->slots[slot_of(b, b->index[p])] = (int32_t)p;
    return 0;
}

/* Add weight to a bucket. 1: done; 0: not the plain form (a bucket twice in
 * one blob, a sum too big for a float, more buckets than the limit); -1: an
 * error is set. */
static int
buckets_add(Buckets *b, int64_t index, int64_t weight, Py_ssize_t blob)
{
    Py_ssize_t i = slot_of(b, index);
    int32_t p = b->slots[i];
    if (p >= 0) {
        if (b->seen_in[p] == blob)
            return 0; /* msgpack would keep the last of the two: Python decides */
        b->weight[p] += weight;
        b->seen_in[p] = blob;
        return b->weight[p] < EXACT_INT;
    }
    if (b->used == b->limit)
        return 0;
    if (b->used == b->capacity) {
        if (buckets_grow(b) < 0)
            return -1;
        i = slot_of(b, index);
    }
    p = (int32_t)b->used++;
    b->index[p] = index;
    b->weight[p] = weight;
    b->seen_in[p] = blob;
    b->slots[i] = p;
    return 1;
}

/* The positive and negative bucket maps of one call, each of at most max_buckets. */
static int
buckets_pair_init(Buckets *positive, Buckets *negative, PyObject *max_buckets)
{
    Py_ssize_t limit = PyLong_AsSsize_t(max_buckets);
    if (limit == -1 && PyErr_Occurred())
        return -1;
    if (limit < 0 || limit > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "max_buckets must be 0..2**24");
        return -1;
    }
    if (buckets_init(positive, limit) < 0)
        return -1;
    if (buckets_init(negative, limit) < 0) {
        buckets_free(positive);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------ msgpack */

typedef struct {
    const unsigned char *at;
    const unsigned char *end;
} Reader;

static uint64_t
read_be(const unsigned char *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

/* An integer in any msgpack int form that fits int64. 1: read; 0: not one. */
static int
read_int(Reader *r, int64_t *out)
{
    if (r->at >= r->end)
        return 0;
    unsigned char tag = *r->at;
    int size;
    int is_signed;
    if (tag <= 0x7f || tag >= 0xe0) {
        *out = (int8_t)tag;
        r->at++;
        return 1;
    }
    switch (tag) {
    case 0xcc: size = 1; is_signed = 0; break;
    case 0xcd: size = 2; is_signed = 0; break;
    case 0xce: size = 4; is_signed = 0; break;
    case 0xcf: size = 8; is_signed = 0; break;
    case 0xd0: size = 1; is_signed = 1; break;
    case 0xd1: size = 2; is_signed = 1; break;
    case 0xd2: size = 4; is_signed = 1; break;
    case 0xd3: size = 8; is_signed = 1; break;
    default: return 0;
    }
    if (r->end - r->at < 1 + size)
        return 0;
    uint64_t raw = read_be(r->at + 1, size);
    r->at += 1 + size;
    if (!is_signed) {
        if (raw > (uint64_t)INT64_MAX)
            return 0;
        *out = (int64_t)raw;
    } else {
        int shift = 64 - 8 * size;
        *out = (int64_t)(raw << shift) >> shift;
    }
    return 1;
}

static int
read_float64(Reader *r, double *out)
{
    if (r->end - r->at < 9 || *r->at != 0xcb)
        return 0;
    uint64_t bits = read_be(r->at + 1, 8);
    memcpy(out, &bits, sizeof(bits));
    r->at += 9;
    return 1;
}

static int
read_map_size(Reader *r, Py_ssize_t *out)
{
    if (r->at >= r->end)
        return 0;
    unsigned char tag = *r->at;
    if ((tag & 0xf0) == 0x80) {
        *out = tag & 0x0f;
        r->at++;
        return 1;
    }
    int size = tag == 0xde ? 2 : tag == 0xdf ? 4 : 0;
    if (size == 0 || r->end - r->at < 1 + size)
        return 0;
    *out = (Py_ssize_t)read_be(r->at + 1, size);
    r->at += 1 + size;
    return 1;
}

static unsigned char *
write_be(unsigned char *p, uint64_t v, int n)
{
    for (int i = n - 1; i >= 0; i--) {
        p[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
    return p + n;
}

/* The smallest form, as msgpack's packer writes a Python int. */
static unsigned char *
write_int(unsigned char *p, int64_t v)
{
    if (v >= 0) {
        if (v < 0x80) {
            *p++ = (unsigned char)v;
        } else if (v < 0x100) {
            *p++ = 0xcc;
            p = write_be(p, (uint64_t)v, 1);
        } else if (v < 0x10000) {
            *p++ = 0xcd;
            p = write_be(p, (uint64_t)v, 2);
        } else if (v < INT64_C(0x100000000)) {
            *p++ = 0xce;
            p = write_be(p, (uint64_t)v, 4);
        } else {
            *p++ = 0xcf;
            p = write_be(p, (uint64_t)v, 8);
        }
    } else if (v >= -32) {
        *p++ = (unsigned char)(int8_t)v;
    } else if (v >= -128) {
        *p++ = 0xd0;
        p = write_be(p, (uint64_t)v, 1);
    } else if (v >= -32768) {
        *p++ = 0xd1;
        p = write_be(p, (uint64_t)v, 2);
    } else if (v >= INT64_C(-2147483648)) {
        *p++ = 0xd2;
        p = write_be(p, (uint64_t)v, 4);
    } else {
        *p++ = 0xd3;
        p = write_be(p, (uint64_t)v, 8);
    }
    return p;
}

static unsigned char *
write_float64(unsigned char *p, double v)
{
    uint64_t bits;
    memcpy(&bits, &v, sizeof(bits));
    *p++ = 0xcb;
    return write_be(p, bits, 8);
}

static unsigned char *
write_buckets(unsigned char *p, const Buckets *b)
{
    Py_ssize_t n = b->used;
    if (n < 16) {
        *p++ = (unsigned char)(0x80 | n);
    } else if (n < 0x10000) {
        *p++ = 0xde;
        p = write_be(p, (uint64_t)n, 2);
    } else {
        *p++ = 0xdf;
        p = write_be(p, (uint64_t)n, 4);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        p = write_int(p, b->index[i]);
        p = write_int(p, b->weight[i]);
    }
    return p;
}

/* msgpack [1, zero, low, high, positive, negative], as sketch.py packs it. */
static PyObject *
pack_sketch(int64_t zero, double low, double high, const Buckets *positive,
            const Buckets *negative)
{
    /* at most 9 bytes per int, 5 per map header */
    Py_ssize_t most = 1 + 1 + 9 + 9 + 9 + 2 * 5 + 18 * (positive->used + negative->used);
    PyObject *out = PyBytes_FromStringAndSize(NULL, most);
    if (out == NULL)
        return NULL;
    unsigned char *start = (unsigned char *)PyBytes_AS_STRING(out);
    unsigned char *p = start;
    *p++ = 0x96;
    *p++ = 0x01;
    p = write_int(p, zero);
    p = write_float64(p, low);
    p = write_float64(p, high);
    p = write_buckets(p, positive);
    p = write_buckets(p, negative);
    if (_PyBytes_Resize(&out, (Py_ssize_t)(p - start)) < 0)
        return NULL;
    return out;
}

/* ------------------------------------------------------------ sketch_bytes */

/* The sketch of n finite values in arrival order (the order of the buckets
 * in the bytes), or None where Python must build it. */
static PyObject *
values_sketch(const double *values, Py_ssize_t n, double low, double high, double inv_log_gamma,
              PyObject *max_buckets)
{
    Buckets positive, negative;
    if (buckets_pair_init(&positive, &negative, max_buckets) < 0)
        return NULL;
    PyObject *result = NULL;
    int64_t zero = 0;
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        double value = values[i];
        int done = 1;
        if (value > 0.0)
            done = buckets_add(&positive, (int64_t)ceil(log(value) * inv_log_gamma), 1, i);
        else if (value < 0.0)
            done = buckets_add(&negative, (int64_t)ceil(log(-value) * inv_log_gamma), 1, i);
        else
            zero++;
        if (done < 0)
            goto finally;
        if (done == 0)
            break;
    }
    if (i < n) {
        result = Py_NewRef(Py_None);
        goto finally;
    }
    result = pack_sketch(zero, low, high, &positive, &negative);
finally:
    buckets_free(&positive);
    buckets_free(&negative);
    return result;
}

static PyObject *
sketch_bytes(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "sketch_bytes(values, low, high, inv_log_gamma, max_buckets)");
        return NULL;
    }
    if (!PyFloat_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "inv_log_gamma must be a float");
        return NULL;
    }
    if (!PyList_Check(args[0]) || !PyFloat_CheckExact(args[1]) || !PyFloat_CheckExact(args[2]))
        Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(args[0]);
    double *values = PyMem_Malloc(sizeof(double) * (size_t)(n ? n : 1));
    if (values == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(args[0], i);
        if (!PyFloat_CheckExact(item) || !isfinite(PyFloat_AS_DOUBLE(item))) {
            PyMem_Free(values);
            Py_RETURN_NONE;
        }
        values[i] = PyFloat_AS_DOUBLE(item);
    }
    PyObject *sketch = values_sketch(values, n, PyFloat_AS_DOUBLE(args[1]),
                                     PyFloat_AS_DOUBLE(args[2]), PyFloat_AS_DOUBLE(args[3]),
                                     args[4]);
    PyMem_Free(values);
    return sketch;
}

/* ------------------------------------------------------------ merge_sketches */

/* Add one blob's buckets. 1: done; 0: not the plain form; -1: an error is set. */
static int
merge_map(Reader *r, Buckets *b, Py_ssize_t blob)
{
    Py_ssize_t size;
    if (!read_map_size(r, &size))
        return 0;
    for (Py_ssize_t k = 0; k < size; k++) {
        int64_t index, weight;
        if (!read_int(r, &index) || !read_int(r, &weight) || weight < 0 || weight >= EXACT_INT)
            return 0;
        int done = buckets_add(b, index, weight, blob);
        if (done <= 0)
            return done;
    }
    return 1;
}

/* Fold one blob in. 1: done; 0: not the plain form; -1: an error is set. */
static int
merge_blob(PyObject *blob, Py_ssize_t at, int64_t *zero, double *low, double *high,
           Buckets *positive, Buckets *negative)
{
    if (!PyBytes_Check(blob))
        return 0;
    Reader r = {(const unsigned char *)PyBytes_AS_STRING(blob),
                (const unsigned char *)PyBytes_AS_STRING(blob) + PyBytes_GET_SIZE(blob)};
    int64_t weight;
    double first, last;
    if (r.end - r.at < 2 || r.at[0] != 0x96 || r.at[1] != 0x01)
        return 0;
    r.at += 2;
    if (!read_int(&r, &weight) || weight < 0 || weight >= EXACT_INT)
        return 0;
    if (!read_float64(&r, &first) || !read_float64(&r, &last))
        return 0;
    *zero += weight;
    if (*zero >= EXACT_INT)
        return 0;
    if (first < *low)
        *low = first;
    if (last > *high)
        *high = last;
    int done = merge_map(&r, positive, at);
    if (done <= 0)
        return done;
    done = merge_map(&r, negative, at);
    if (done <= 0)
        return done;
    return r.at == r.end;
}

static PyObject *
merge_sketches(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "merge_sketches(blobs: list, max_buckets)");
        return NULL;
    }
    PyObject *blobs = args[0];
    Buckets positive, negative;
    if (buckets_pair_init(&positive, &negative, args[1]) < 0)
        return NULL;
    PyObject *result = NULL;
    int64_t zero = 0;
    double low = INFINITY, high = -INFINITY;
    int done = 1;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(blobs) && done > 0; i++)
        done = merge_blob(PyList_GET_ITEM(blobs, i), i, &zero, &low, &high, &positive, &negative);
    if (done < 0)
        goto finally;
    if (done == 0) {
        result = Py_NewRef(Py_None);
        goto finally;
    }
    result = pack_sketch(zero, low, high, &positive, &negative);
finally:
    buckets_free(&positive);
    buckets_free(&negative);
    return result;
}

/* ------------------------------------------------------------ merge_sets */

typedef struct {
    const unsigned char *text;
    Py_ssize_t len;
} Member;

static int
member_order(const void *a, const void *b)
{
    const Member *x = a, *y = b;
    int c = memcmp(x->text, y->text, (size_t)(x->len < y->len ? x->len : y->len));
    if (c != 0)
        return c;
    return x->len < y->len ? -1 : x->len > y->len;
}

static uint64_t
member_hash(const unsigned char *text, Py_ssize_t len)
{
    uint64_t h = UINT64_C(14695981039346656037);
    for (Py_ssize_t i = 0; i < len; i++)
        h = (h ^ text[i]) * UINT64_C(1099511628211);
    return h;
}

/* One ASCII str element. 1: read; 0: anything else (Python decides). */
static int
read_ascii_str(Reader *r, Member *out)
{
    if (r->at >= r->end)
        return 0;
    unsigned char tag = *r->at;
    Py_ssize_t len;
    int size = 0;
    if ((tag & 0xe0) == 0xa0)
        len = tag & 0x1f;
    else if (tag >= 0xd9 && tag <= 0xdb)
        size = 1 << (tag - 0xd9);
    else
        return 0;
    if (r->end - r->at < 1 + size)
        return 0;
    if (size)
        len = (Py_ssize_t)read_be(r->at + 1, size);
    r->at += 1 + size;
    if (r->end - r->at < len)
        return 0;
    for (Py_ssize_t i = 0; i < len; i++)
        if (r->at[i] >= 0x80)
            return 0; /* text order and byte order agree for ASCII only: Python sorts */
    out->text = r->at;
    out->len = len;
    r->at += len;
    return 1;
}

typedef struct {
    Member *members;     /* distinct, in first-seen order */
    Py_ssize_t used;
    Py_ssize_t limit;    /* more distinct members than this: Python decides */
    int32_t *slots;      /* open addressing over positions; -1 marks empty */
    Py_ssize_t mask;
} MemberSet;

/* 1: added or already there; 0: over the limit; -1: an error is set. */
static int
member_set_add(MemberSet *set, Member m)
{
    Py_ssize_t i = (Py_ssize_t)(member_hash(m.text, m.len) & (uint64_t)set->mask);
    for (;;) {
        int32_t p = set->slots[i];
        if (p < 0)
            break;
        Member *known = &set->members[p];
        if (known->len == m.len && memcmp(known->text, m.text, (size_t)m.len) == 0)
            return 1;
        i = (i + 1) & set->mask;
    }
    if (set->used == set->limit)
        return 0;
    set->members[set->used] = m;
    set->slots[i] = (int32_t)set->used++;
    return 1;
}

/* Fold one exact set blob in. 1: done; 0: not the plain form; -1: error set. */
static int
merge_set_blob(PyObject *blob, MemberSet *set)
{
    if (!PyBytes_Check(blob))
        return 0;
    Reader r = {(const unsigned char *)PyBytes_AS_STRING(blob),
                (const unsigned char *)PyBytes_AS_STRING(blob) + PyBytes_GET_SIZE(blob)};
    if (r.end - r.at < 4 || r.at[0] != 0x93 || r.at[1] != 0x01 || r.at[2] != 0x00)
        return 0;
    r.at += 3;
    unsigned char tag = *r.at;
    Py_ssize_t count;
    if ((tag & 0xf0) == 0x90) {
        count = tag & 0x0f;
        r.at++;
    } else if (tag == 0xdc || tag == 0xdd) {
        int size = tag == 0xdc ? 2 : 4;
        if (r.end - r.at < 1 + size)
            return 0;
        count = (Py_ssize_t)read_be(r.at + 1, size);
        r.at += 1 + size;
    } else {
        return 0;
    }
    for (Py_ssize_t k = 0; k < count; k++) {
        Member m;
        if (!read_ascii_str(&r, &m))
            return 0;
        int done = member_set_add(set, m);
        if (done <= 0)
            return done;
    }
    return r.at == r.end;
}

static unsigned char *
write_str(unsigned char *p, const Member *m)
{
    if (m->len < 32) {
        *p++ = (unsigned char)(0xa0 | m->len);
    } else if (m->len < 0x100) {
        *p++ = 0xd9;
        p = write_be(p, (uint64_t)m->len, 1);
    } else if (m->len < 0x10000) {
        *p++ = 0xda;
        p = write_be(p, (uint64_t)m->len, 2);
    } else {
        *p++ = 0xdb;
        p = write_be(p, (uint64_t)m->len, 4);
    }
    memcpy(p, m->text, (size_t)m->len);
    return p + m->len;
}

/* msgpack [1, 0, [members sorted]], as SetState.to_bytes packs an exact set. */
static PyObject *
pack_members(Member *members, Py_ssize_t n)
{
    qsort(members, (size_t)n, sizeof(Member), member_order);
    Py_ssize_t most = 3 + 5;
    for (Py_ssize_t i = 0; i < n; i++)
        most += 5 + members[i].len;
    PyObject *out = PyBytes_FromStringAndSize(NULL, most);
    if (out == NULL)
        return NULL;
    unsigned char *start = (unsigned char *)PyBytes_AS_STRING(out);
    unsigned char *p = start;
    *p++ = 0x93;
    *p++ = 0x01;
    *p++ = 0x00;
    if (n < 16) {
        *p++ = (unsigned char)(0x90 | n);
    } else if (n < 0x10000) {
        *p++ = 0xdc;
        p = write_be(p, (uint64_t)n, 2);
    } else {
        *p++ = 0xdd;
        p = write_be(p, (uint64_t)n, 4);
    }
    for (Py_ssize_t i = 0; i < n; i++)
        p = write_str(p, &members[i]);
    if (_PyBytes_Resize(&out, (Py_ssize_t)(p - start)) < 0)
        return NULL;
    return out;
}

static PyObject *
merge_sets(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "merge_sets(blobs: list, limit)");
        return NULL;
    }
    PyObject *blobs = args[0];
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    if (limit < 0 || limit > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "limit must be 0..2**24");
        return NULL;
    }
    MemberSet set = {NULL, 0, limit, NULL, 0};
    Py_ssize_t slots = 16;
    while (slots < 2 * (limit + 1))
        slots *= 2;
    set.mask = slots - 1;
    set.members = PyMem_Malloc(sizeof(Member) * (size_t)(limit + 1));
    set.slots = PyMem_Malloc(sizeof(int32_t) * (size_t)slots);
    PyObject *result = NULL;
    if (set.members == NULL || set.slots == NULL) {
        PyErr_NoMemory();
        goto finally;
    }
    memset(set.slots, 0xff, sizeof(int32_t) * (size_t)slots);
    int done = 1;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(blobs) && done > 0; i++)
        done = merge_set_blob(PyList_GET_ITEM(blobs, i), &set);
    if (done < 0)
        goto finally;
    if (done == 0) {
        result = Py_NewRef(Py_None);
        goto finally;
    }
    /* the members point into the blobs, which the list holds until we return */
    result = pack_members(set.members, set.used);
finally:
    PyMem_Free(set.members);
    PyMem_Free(set.slots);
    return result;
}

/* ------------------------------------------------------------ window_rollups */

/* What a window's rollups share: made once per call. */
typedef struct {
    PyTypeObject *rollup;    /* model.Rollup, a tuple subclass of 11 fields */
    PyObject *start;
    PyObject *one;           /* 1.0: the count of a gauge */
    PyObject *no_quantiles;  /* () */
    PyObject *percentiles;   /* tuple of floats */
    double inv_log_gamma;
    PyObject *max_buckets;
    Py_ssize_t set_limit;
    double rank_epsilon;
    PyObject *fsum;
    double *sorted;          /* scratch for a timer's values */
    double *spare;
    Py_ssize_t room;
    Member *members;         /* scratch for a set's members */
    Py_ssize_t member_room;
} Window;

/* A Rollup (name, type, tags, start, count, sum, min, max, last, state, quantiles);
 * steals the references to the six values. */
static PyObject *
new_rollup(Window *w, PyObject *key, PyObject *count, PyObject *sum, PyObject *low,
           PyObject *high, PyObject *last, PyObject *state, PyObject *quantiles)
{
    PyObject *fields[8] = {count, sum, low, high, last, state, quantiles, NULL};
    for (int i = 0; i < 7; i++) {
        if (fields[i] == NULL) {
            for (int j = 0; j < 7; j++)
                Py_XDECREF(fields[j]);
            return NULL;
        }
    }
    PyObject *r = w->rollup->tp_alloc(w->rollup, 11);
    if (r == NULL) {
        for (int j = 0; j < 7; j++)
            Py_DECREF(fields[j]);
        return NULL;
    }
    for (int i = 0; i < 3; i++)
        PyTuple_SET_ITEM(r, i, Py_NewRef(PyTuple_GET_ITEM(key, i)));
    PyTuple_SET_ITEM(r, 3, Py_NewRef(w->start));
    for (int i = 0; i < 7; i++)
        PyTuple_SET_ITEM(r, 4 + i, fields[i]);
    return r;
}

static int
append_new(PyObject *list, PyObject *item)
{
    if (item == NULL)
        return -1;
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

/* A (name, type, tags) key. */
static int
is_key(PyObject *key)
{
    return PyTuple_CheckExact(key) && PyTuple_GET_SIZE(key) == 3;
}

/* counters: key -> [sum, count]; the rollup is (count, sum, sum, sum, sum). */
static int
counter_rollups(Window *w, PyObject *counters, PyObject *out)
{
    Py_ssize_t pos = 0;
    PyObject *key, *acc;
    while (PyDict_Next(counters, &pos, &key, &acc)) {
        if (!is_key(key) || !PyList_CheckExact(acc) || PyList_GET_SIZE(acc) != 2)
            return 0;
        PyObject *total = PyList_GET_ITEM(acc, 0), *count = PyList_GET_ITEM(acc, 1);
        PyObject *r = new_rollup(w, key, Py_NewRef(count), Py_NewRef(total), Py_NewRef(total),
                                 Py_NewRef(total), Py_NewRef(total), Py_NewRef(Py_None),
                                 Py_NewRef(w->no_quantiles));
        if (append_new(out, r) < 0)
            return -1;
    }
    return 1;
}

/* Touched gauges ([last, low, high]), then the persisted ones not touched (flat). */
static int
gauge_rollups(Window *w, PyObject *gauges, PyObject *persisted, PyObject *out)
{
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(gauges, &pos, &key, &value)) {
        if (!is_key(key) || !PyList_CheckExact(value) || PyList_GET_SIZE(value) != 3)
            return 0;
        PyObject *last = PyList_GET_ITEM(value, 0);
        PyObject *r = new_rollup(w, key, Py_NewRef(w->one), Py_NewRef(last),
                                 Py_NewRef(PyList_GET_ITEM(value, 1)),
                                 Py_NewRef(PyList_GET_ITEM(value, 2)), Py_NewRef(last),
                                 Py_NewRef(Py_None), Py_NewRef(w->no_quantiles));
        if (append_new(out, r) < 0)
            return -1;
    }
    if (persisted == Py_None)
        return 1;
    pos = 0;
    while (PyDict_Next(persisted, &pos, &key, &value)) {
        if (!is_key(key))
            return 0;
        int touched = PyDict_Contains(gauges, key);
        if (touched < 0)
            return -1;
        if (touched)
            continue;
        PyObject *r = new_rollup(w, key, Py_NewRef(w->one), Py_NewRef(value), Py_NewRef(value),
                                 Py_NewRef(value), Py_NewRef(value), Py_NewRef(Py_None),
                                 Py_NewRef(w->no_quantiles));
        if (append_new(out, r) < 0)
            return -1;
    }
    return 1;
}

/* Sort v[0..n) as sorted() does: stable, by <. */
static void
stable_sort(double *v, double *spare, Py_ssize_t n)
{
    if (n <= 32) {
        for (Py_ssize_t i = 1; i < n; i++) {
            double x = v[i];
            Py_ssize_t j = i;
            while (j > 0 && x < v[j - 1]) {
                v[j] = v[j - 1];
                j--;
            }
            v[j] = x;
        }
        return;
    }
    Py_ssize_t half = n / 2;
    stable_sort(v, spare, half);
    stable_sort(v + half, spare, n - half);
    memcpy(spare, v, sizeof(double) * (size_t)half);
    Py_ssize_t i = 0, j = half, k = 0;
    while (i < half && j < n)
        v[k++] = v[j] < spare[i] ? v[j++] : spare[i++];
    while (i < half)
        v[k++] = spare[i++];
}

static int
reserve_values(Window *w, Py_ssize_t n)
{
    if (n <= w->room)
        return 0;
    Py_ssize_t room = n < 64 ? 64 : n;
    double *sorted = PyMem_Realloc(w->sorted, sizeof(double) * (size_t)room);
    if (sorted == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    w->sorted = sorted;
    double *spare = PyMem_Realloc(w->spare, sizeof(double) * (size_t)room);
    if (spare == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    w->spare = spare;
    w->room = room;
    return 0;
}

/* aggregate._rank: the nearest-rank index of percentile p among n values. */
static Py_ssize_t
rank_of(double p, Py_ssize_t n, double rank_epsilon)
{
    double at = ceil(p * (double)n / 100.0 * (1.0 - rank_epsilon));
    if (at < 1.0)
        at = 1.0;
    if (at > (double)n)
        at = (double)n;
    return (Py_ssize_t)at - 1;
}

/* math.fsum of n doubles, which raises as Python's would: through a
 * memoryview of them, which lives only for the call. */
static PyObject *
doubles_fsum(Window *w, double *values, Py_ssize_t n)
{
    Py_ssize_t itemsize = sizeof(double);
    Py_buffer buffer = {
        .buf = values, .len = n * itemsize, .readonly = 1, .itemsize = itemsize,
        .format = "d", .ndim = 1, .shape = &n, .strides = &itemsize,
    };
    PyObject *view = PyMemoryView_FromBuffer(&buffer);
    if (view == NULL)
        return NULL;
    PyObject *sum = PyObject_CallOneArg(w->fsum, view);
    Py_DECREF(view);
    return sum;
}

/* An unsampled timer (aggregate._timer_rollup) of packed values (aggregate.pack_value).
 * 1: appended; 0: Python makes it. */
static int
timer_rollup(Window *w, PyObject *key, PyObject *packed, PyObject *out)
{
    if (!PyByteArray_CheckExact(packed) || PyByteArray_GET_SIZE(packed) % sizeof(double))
        return 0;
    Py_ssize_t n = PyByteArray_GET_SIZE(packed) / (Py_ssize_t)sizeof(double);
    if (n == 0)
        return 0;
    if (reserve_values(w, n) < 0)
        return -1;
    double *v = w->sorted;
    memcpy(v, PyByteArray_AS_STRING(packed), sizeof(double) * (size_t)n);
    for (Py_ssize_t i = 0; i < n; i++)
        if (!isfinite(v[i]))
            return 0;
    double last = v[n - 1];
    stable_sort(v, w->spare, n);
    /* the sketch's buckets go in arrival order: from a second copy, in the spare room */
    memcpy(w->spare, PyByteArray_AS_STRING(packed), sizeof(double) * (size_t)n);
    PyObject *sketch = values_sketch(w->spare, n, v[0], v[n - 1], w->inv_log_gamma,
                                     w->max_buckets);
    if (sketch == NULL)
        return -1;
    if (sketch == Py_None) {
        Py_DECREF(sketch);
        return 0;
    }
    PyObject *sum = doubles_fsum(w, w->spare, n); /* in arrival order */
    Py_ssize_t m = PyTuple_GET_SIZE(w->percentiles);
    PyObject *quantiles = sum == NULL ? NULL : PyTuple_New(m);
    for (Py_ssize_t i = 0; quantiles != NULL && i < m; i++) {
        PyObject *p = PyTuple_GET_ITEM(w->percentiles, i);
        PyObject *pair = Py_BuildValue(
            "(Od)", p, v[rank_of(PyFloat_AS_DOUBLE(p), n, w->rank_epsilon)]);
        if (pair == NULL)
            Py_CLEAR(quantiles);
        else
            PyTuple_SET_ITEM(quantiles, i, pair);
    }
    if (quantiles == NULL) {
        Py_DECREF(sketch);
        Py_XDECREF(sum);
        return -1;
    }
    PyObject *r = new_rollup(w, key, PyFloat_FromDouble((double)n), sum, PyFloat_FromDouble(v[0]),
                             PyFloat_FromDouble(v[n - 1]),
                             PyFloat_FromDouble(last), sketch, quantiles);
    return append_new(out, r) < 0 ? -1 : 1;
}

/* A set of ASCII str members (snapshot's set rollup). 1: appended; 0: Python makes it. */
static int
set_rollup(Window *w, PyObject *key, PyObject *members, PyObject *out)
{
    if (!PySet_CheckExact(members))
        return 0;
    Py_ssize_t n = PySet_GET_SIZE(members);
    if (n > w->set_limit)
        return 0;
    if (n > w->member_room) {
        Member *room = PyMem_Realloc(w->members, sizeof(Member) * (size_t)n);
        if (room == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        w->members = room;
        w->member_room = n;
    }
    Py_ssize_t pos = 0, k = 0;
    PyObject *member;
    Py_hash_t hash;
    while (_PySet_NextEntry(members, &pos, &member, &hash)) {
        if (!PyUnicode_CheckExact(member) || !PyUnicode_IS_ASCII(member) || k == n)
            return 0;
        w->members[k].text = PyUnicode_DATA(member);
        w->members[k].len = PyUnicode_GET_LENGTH(member);
        k++;
    }
    if (k != n)
        return 0;
    PyObject *state = pack_members(w->members, n); /* the set holds the texts meanwhile */
    if (state == NULL)
        return -1;
    PyObject *size = PyFloat_FromDouble((double)n);
    if (size == NULL) {
        Py_DECREF(state);
        return -1;
    }
    PyObject *r = new_rollup(w, key, Py_NewRef(size), Py_NewRef(size), Py_NewRef(size),
                             Py_NewRef(size), size, state, Py_NewRef(w->no_quantiles));
    return append_new(out, r) < 0 ? -1 : 1;
}

/* Timers (or sets) into rollups; the keys of those Python must make go to `left`. */
static int
series_rollups(Window *w, PyObject *series, PyObject *weights, PyObject *out, PyObject *left,
               int (*make)(Window *, PyObject *, PyObject *, PyObject *))
{
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(series, &pos, &key, &value)) {
        if (!is_key(key))
            return 0;
        int done = 0;
        int weighted = weights == NULL ? 0 : PyDict_Contains(weights, key);
        if (weighted < 0)
            return -1;
        if (!weighted)
            done = make(w, key, value, out);
        if (done < 0)
            return -1;
        if (done == 0 && PyList_Append(left, key) < 0)
            return -1;
    }
    return 1;
}

static PyObject *
window_rollups(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError,
                        "window_rollups(rollup, start, percentiles, counters, gauges, persisted, "
                        "timers, weights, sets, (inv_log_gamma, max_buckets, set_limit, "
                        "rank_epsilon, fsum))");
        return NULL;
    }
    PyObject *constants = args[9];
    if (!PyType_Check(args[0]) || !PyType_IsSubtype((PyTypeObject *)args[0], &PyTuple_Type)
        || !PyTuple_CheckExact(args[2]) || !PyTuple_CheckExact(constants)
        || PyTuple_GET_SIZE(constants) != 5 || !PyFloat_CheckExact(PyTuple_GET_ITEM(constants, 0))
        || !PyFloat_CheckExact(PyTuple_GET_ITEM(constants, 3))) {
        PyErr_SetString(PyExc_TypeError, "window_rollups: bad arguments");
        return NULL;
    }
    for (int i = 3; i <= 8; i++) {
        if (i == 5 && args[i] == Py_None)
            continue;
        if (!PyDict_Check(args[i])) {
            PyErr_SetString(PyExc_TypeError, "window_rollups: the window's parts must be dicts");
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args[2]); i++) {
        if (!PyFloat_CheckExact(PyTuple_GET_ITEM(args[2], i))) {
            PyErr_SetString(PyExc_TypeError, "window_rollups: percentiles must be floats");
            return NULL;
        }
    }
    Window w = {(PyTypeObject *)args[0], args[1], NULL, NULL, args[2],
                PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(constants, 0)), PyTuple_GET_ITEM(constants, 1),
                PyLong_AsSsize_t(PyTuple_GET_ITEM(constants, 2)),
                PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(constants, 3)), PyTuple_GET_ITEM(constants, 4),
                NULL, NULL, 0, NULL, 0};
    if (w.set_limit == -1 && PyErr_Occurred())
        return NULL;
    PyObject *result = NULL, *out = NULL, *timers_left = NULL, *sets_left = NULL;
    w.one = PyFloat_FromDouble(1.0);
    w.no_quantiles = PyTuple_New(0);
    out = PyList_New(0);
    timers_left = PyList_New(0);
    sets_left = PyList_New(0);
    if (w.one == NULL || w.no_quantiles == NULL || out == NULL || timers_left == NULL
        || sets_left == NULL)
        goto finally;
    int done = counter_rollups(&w, args[3], out);
    if (done > 0)
        done = gauge_rollups(&w, args[4], args[5], out);
    if (done > 0)
        done = series_rollups(&w, args[6], args[7], out, timers_left, timer_rollup);
    if (done > 0)
        done = series_rollups(&w, args[8], NULL, out, sets_left, set_rollup);
    if (done < 0)
        goto finally;
    if (done == 0)
        result = Py_NewRef(Py_None);
    else
        result = PyTuple_Pack(3, out, timers_left, sets_left);
finally:
    Py_XDECREF(w.one);
    Py_XDECREF(w.no_quantiles);
    Py_XDECREF(out);
    Py_XDECREF(timers_left);
    Py_XDECREF(sets_left);
    PyMem_Free(w.sorted);
    PyMem_Free(w.spare);
    PyMem_Free(w.members);
    return result;
}

/* ------------------------------------------------------------ fold_rows */

/* The column position of a row's series (pos[series id] - 1), or -1 when it
 * has none or the row is not one this folds. */
static Py_ssize_t
fold_position(PyObject *row, const long long *pos, Py_ssize_t size, Py_ssize_t columns)
{
    if (!PyTuple_CheckExact(row) || PyTuple_GET_SIZE(row) < 10)
        return -1;
    PyObject *sid = PyTuple_GET_ITEM(row, 3);
    if (!PyLong_CheckExact(sid))
        return -1;
    int overflow = 0;
    long long id = PyLong_AsLongLongAndOverflow(sid, &overflow);
    if (overflow || id < 0 || id >= size)
        return -1;
    long long at = pos[id] - 1;
    return (at >= 0 && at < columns) ? (Py_ssize_t)at : -1;
}

/* A writable array of ``itemsize`` bytes an item in ``format``, into view;
 * -1 with TypeError naming ``what`` otherwise. */
static int
fold_column(PyObject *obj, Py_buffer *view, const char *format, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->itemsize != 8 || view->format == NULL || strcmp(view->format, format) != 0) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "fold_rows: %s is not an array('%s')", what, format);
        return -1;
    }
    return 0;
}

/* storage._Pending.add in C, for a window whose every series has a position
 * in the bucket's columns already (pos[series id] - 1), none of them twice,
 * and every count, sum, min and max of it a finite float. The count, sum,
 * min and max columns (array('d')) and the last column (a list) are updated
 * in place; the result is the window's states by position (None where a
 * series is not in it). Anything else is declined (None) before a column is
 * touched. */
static PyObject *
fold_rows(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    static const char *names[5] = {"pos", "count", "sum", "min", "max"};
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "fold_rows(rows, pos, count, sum, min, max, last)");
        return NULL;
    }
    PyObject *rows = args[0], *last = args[6];
    if (!PyList_CheckExact(rows) || !PyList_CheckExact(last))
        Py_RETURN_NONE;
    Py_buffer view[5];
    int held = 0;
    PyObject *states = NULL;
    Py_ssize_t *at = NULL;
    unsigned char *taken = NULL;
    for (; held < 5; held++) {
        if (fold_column(args[1 + held], &view[held], held ? "d" : "q", names[held]) < 0)
            goto finally;
    }
    Py_ssize_t m = PyList_GET_SIZE(last);
    for (int k = 1; k < 5; k++) {
        if (view[k].len / 8 != m)
            goto decline;
    }
    const long long *pos = view[0].buf;
    double *column[4] = {view[1].buf, view[2].buf, view[3].buf, view[4].buf};
    Py_ssize_t size = view[0].len / 8, n = PyList_GET_SIZE(rows);
    at = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(n ? n : 1));
    taken = PyMem_Calloc((size_t)(m ? m : 1), 1);
    if (at == NULL || taken == NULL) {
        PyErr_NoMemory();
        goto finally;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *row = PyList_GET_ITEM(rows, i);
        Py_ssize_t p = fold_position(row, pos, size, m);
        if (p < 0 || taken[p])
            goto decline;
        taken[p] = 1;
        at[i] = p;
        for (int k = 0; k < 4; k++) {
            PyObject *fresh = PyTuple_GET_ITEM(row, 4 + k);
            if (!PyFloat_CheckExact(fresh) || !isfinite(PyFloat_AS_DOUBLE(fresh)))
                goto decline;
        }
    }
    states = PyList_New(m);
    if (states == NULL)
        goto finally;
    for (Py_ssize_t j = 0; j < m; j++)
        PyList_SET_ITEM(states, j, Py_NewRef(Py_None));
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *row = PyList_GET_ITEM(rows, i);
        Py_ssize_t p = at[i];
        column[0][p] += PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(row, 4));
        column[1][p] += PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(row, 5));
        /* min(a, b) and max(a, b): a unless b is strictly beyond it */
        double low = PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(row, 6));
        double high = PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(row, 7));
        if (low < column[2][p])
            column[2][p] = low;
        if (high > column[3][p])
            column[3][p] = high;
        PyObject *old = PyList_GET_ITEM(last, p);
        PyList_SET_ITEM(last, p, Py_NewRef(PyTuple_GET_ITEM(row, 8)));
        Py_DECREF(old);
        PyList_SET_ITEM(states, p, Py_NewRef(PyTuple_GET_ITEM(row, 9)));
        Py_DECREF(Py_None); /* the None it replaces */
    }
    goto finally;
decline:
    states = Py_NewRef(Py_None);
finally:
    while (held > 0)
        PyBuffer_Release(&view[--held]);
    PyMem_Free(at);
    PyMem_Free(taken);
    return states;
}

/* ------------------------------------------------------------ window_rows */

typedef struct {
    long long metric;
    long long series;
    Py_ssize_t at;       /* the rollup's position: equal ids keep the window's order */
    PyObject *ids;       /* (series id, metric id) of the cache */
} Placed;

static int
placed_order(const void *a, const void *b)
{
    const Placed *x = a, *y = b;
    if (x->metric != y->metric)
        return x->metric < y->metric ? -1 : 1;
    if (x->series != y->series)
        return x->series < y->series ? -1 : 1;
    return x->at < y->at ? -1 : x->at > y->at;
}

/* storage._Writer._write_rollups for one window: the _UPSERT row of each rollup,
 * (r0, ts, metric id, series id, count, sum, min, max, last, state, type), in
 * (metric id, series id) order; or, when the cache lacks some series, their
 * keys, in the window's order, for the writer to create. */
static PyObject *
window_rows(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyList_CheckExact(args[0]) || !PyDict_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "window_rows(rollups: list, series: dict, r0, ts)");
        return NULL;
    }
    PyObject *window = args[0], *series = args[1], *r0 = args[2], *ts = args[3];
    Py_ssize_t n = PyList_GET_SIZE(window);
    Placed *placed = PyMem_Malloc(sizeof(Placed) * (size_t)(n ? n : 1));
    if (placed == NULL)
        return PyErr_NoMemory();
    PyObject *missing = NULL, *rows = NULL, *result = NULL;
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *rollup = PyList_GET_ITEM(window, i);
        if (!PyTuple_Check(rollup) || PyTuple_GET_SIZE(rollup) < 10) {
            PyErr_SetString(PyExc_TypeError, "window_rows: a rollup is not a Rollup");
            goto finally;
        }
        PyObject *key = PyTuple_Pack(3, PyTuple_GET_ITEM(rollup, 0), PyTuple_GET_ITEM(rollup, 1),
                                     PyTuple_GET_ITEM(rollup, 2));
        if (key == NULL)
            goto finally;
        PyObject *ids = PyDict_GetItemWithError(series, key);
        if (ids == NULL) {
            if (PyErr_Occurred() || (missing == NULL && (missing = PyList_New(0)) == NULL)
                || PyList_Append(missing, key) < 0) {
                Py_DECREF(key);
                goto finally;
            }
            Py_DECREF(key);
            continue;
        }
        Py_DECREF(key);
        if (!PyTuple_CheckExact(ids) || PyTuple_GET_SIZE(ids) != 2) {
            PyErr_SetString(PyExc_TypeError, "window_rows: the cache holds (series id, metric id)");
            goto finally;
        }
        placed[k].series = PyLong_AsLongLong(PyTuple_GET_ITEM(ids, 0));
        placed[k].metric = PyLong_AsLongLong(PyTuple_GET_ITEM(ids, 1));
        if (PyErr_Occurred())
            goto finally;
        placed[k].at = i;
        placed[k].ids = Py_NewRef(ids);
        k++;
    }
    if (missing != NULL) {
        result = PyTuple_Pack(2, Py_None, missing);
        goto finally;
    }
    qsort(placed, (size_t)k, sizeof(Placed), placed_order);
    rows = PyList_New(k);
    if (rows == NULL)
        goto finally;
    for (Py_ssize_t j = 0; j < k; j++) {
        PyObject *rollup = PyList_GET_ITEM(window, placed[j].at);
        PyObject *row = PyTuple_New(11);
        if (row == NULL)
            goto finally;
        PyTuple_SET_ITEM(row, 0, Py_NewRef(r0));
        PyTuple_SET_ITEM(row, 1, Py_NewRef(ts));
        PyTuple_SET_ITEM(row, 2, Py_NewRef(PyTuple_GET_ITEM(placed[j].ids, 1)));
        PyTuple_SET_ITEM(row, 3, Py_NewRef(PyTuple_GET_ITEM(placed[j].ids, 0)));
        for (int c = 4; c < 10; c++)
            PyTuple_SET_ITEM(row, c, Py_NewRef(PyTuple_GET_ITEM(rollup, c)));
        PyTuple_SET_ITEM(row, 10, Py_NewRef(PyTuple_GET_ITEM(rollup, 1)));
        PyList_SET_ITEM(rows, j, row);
    }
    result = PyTuple_Pack(2, rows, Py_None);
finally:
    for (Py_ssize_t j = 0; j < k; j++)
        Py_DECREF(placed[j].ids);
    PyMem_Free(placed);
    Py_XDECREF(missing);
    Py_XDECREF(rows);
    return result;
}

/* ------------------------------------------------------------ workers' windows */

/* mine[i] += theirs[i] for the two accumulators of a counter */
static int
add_counter(PyObject *mine, PyObject *theirs)
{
    for (Py_ssize_t i = 0; i < 2; i++) {
        PyObject *a = PySequence_GetItem(mine, i), *b = PySequence_GetItem(theirs, i);
        PyObject *sum = (a != NULL && b != NULL) ? PyNumber_InPlaceAdd(a, b) : NULL;
        Py_XDECREF(a);
        Py_XDECREF(b);
        if (sum == NULL)
            return -1;
        int rc = PySequence_SetItem(mine, i, sum);
        Py_DECREF(sum);
        if (rc < 0)
            return -1;
    }
    return 0;
}

static int
merge_window_counters(PyObject *counters, PyObject *part, Admission *a)
{
    Py_ssize_t pos = 0;
    PyObject *key, *acc;
    while (PyDict_Next(part, &pos, &key, &acc)) {
        PyObject *mine = PyDict_GetItemWithError(counters, key);
        if (mine != NULL) {
            Py_INCREF(mine);
            int rc = add_counter(mine, acc);
            Py_DECREF(mine);
            if (rc < 0)
                return -1;
            continue;
        }
        int admitted = PyErr_Occurred() ? -1 : admit_series(a, key, 0);
        if (admitted < 0 || (admitted && PyDict_SetItem(counters, key, acc) < 0))
            return -1;
    }
    return 0;
}

/* weights[key] = ours (or none), padded with 1.0 to the values held, then theirs */
static int
join_weights(PyObject *weights, PyObject *key, PyObject *ours, PyObject *theirs, Py_ssize_t held)
{
    PyObject *column = (ours != NULL && PyObject_IsTrue(ours) == 1) ? PySequence_List(ours)
                                                                    : PyList_New(0);
    if (column == NULL)
        return -1;
    PyObject *one = PyFloat_FromDouble(1.0);
    int rc = one == NULL ? -1 : 0;
    while (rc == 0 && PyList_GET_SIZE(column) < held)
        rc = PyList_Append(column, one);
    Py_XDECREF(one);
    if (rc == 0 && theirs != NULL && PyObject_IsTrue(theirs) == 1) {
        PyObject *joined = PySequence_InPlaceConcat(column, theirs);
        rc = joined == NULL ? -1 : 0;
        Py_XDECREF(joined);
    }
    if (rc == 0)
        rc = PyDict_SetItem(weights, key, column);
    Py_DECREF(column);
    return rc;
}

static int
merge_window_timers(PyObject *timers, PyObject *weights, PyObject *part, PyObject *part_weights,
             Admission *a)
{
    Py_ssize_t pos = 0;
    PyObject *key, *values;
    while (PyDict_Next(part, &pos, &key, &values)) {
        PyObject *mine = PyDict_GetItemWithError(timers, key);
        if (mine == NULL && PyErr_Occurred())
            return -1;
        PyObject *theirs = PyDict_GetItemWithError(part_weights, key);
        if (theirs == NULL && PyErr_Occurred())
            return -1;
        if (mine == NULL) {
            int admitted = admit_series(a, key, 0);
            if (admitted < 0
                || (admitted
                    && (PyDict_SetItem(timers, key, values) < 0
                        || (theirs != NULL && PyDict_SetItem(weights, key, theirs) < 0))))
                return -1;
            continue;
        }
        PyObject *ours = PyDict_GetItemWithError(weights, key);
        if (ours == NULL && PyErr_Occurred())
            return -1;
        Py_INCREF(mine);
        int rc = 0;
        if (ours != NULL || theirs != NULL) {
            Py_XINCREF(ours);
            Py_ssize_t held = PyObject_Length(mine);
            held = held < 0 ? -1 : held / (Py_ssize_t)sizeof(double); /* packed values */
            rc = held < 0 ? -1 : join_weights(weights, key, ours, theirs, held);
            Py_XDECREF(ours);
        }
        PyObject *joined = rc < 0 ? NULL : PySequence_InPlaceConcat(mine, values);
        Py_DECREF(mine);
        if (joined == NULL)
            return -1;
        Py_DECREF(joined);
    }
    return 0;
}

static int
merge_window_sets(PyObject *sets, PyObject *part, Admission *a)
{
    Py_ssize_t pos = 0;
    PyObject *key, *members;
    while (PyDict_Next(part, &pos, &key, &members)) {
        PyObject *mine = PyDict_GetItemWithError(sets, key);
        if (mine != NULL) {
            PyObject *joined = PyNumber_InPlaceOr(mine, members);  /* a new reference */
            if (joined == NULL)
                return -1;
            Py_DECREF(joined);
            continue;
        }
        int admitted = PyErr_Occurred() ? -1 : admit_series(a, key, 0);
        if (admitted < 0 || (admitted && PyDict_SetItem(sets, key, members) < 0))
            return -1;
    }
    return 0;
}

/* aggregate._merge_series: a worker window's counters, timers and sets into
 * the daemon's window, each series new to it admitted by the budget. */
static PyObject *
merge_series(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "merge_series(target, part, budget, persisted)");
        return NULL;
    }
    static const char *names[] = {"counters", "timers", "weights", "sets"};
    PyObject *target[4] = {NULL}, *part[4] = {NULL}, *result = NULL;
    Admission a;
    long long persisted = PyLong_AsLongLong(args[3]);
    if (persisted == -1 && PyErr_Occurred())
        return NULL;
    if (admission_open(&a, args[2], persisted) < 0)
        goto finally;
    for (int i = 0; i < 4; i++) {
        target[i] = PyObject_GetAttrString(args[0], names[i]);
        part[i] = PyObject_GetAttrString(args[1], names[i]);
        if (target[i] == NULL || part[i] == NULL)
            goto finally;
        if (!PyDict_CheckExact(target[i]) || !PyDict_CheckExact(part[i])) {
            PyErr_SetString(PyExc_TypeError, "merge_series: a window's series are not dicts");
            goto finally;
        }
    }
    if (merge_window_counters(target[0], part[0], &a) == 0
        && merge_window_timers(target[1], target[2], part[1], part[2], &a) == 0
        && merge_window_sets(target[3], part[3], &a) == 0)
        result = Py_NewRef(Py_None);
finally:
    if (admission_close(&a) < 0)
        Py_CLEAR(result);
    for (int i = 0; i < 4; i++) {
        Py_XDECREF(target[i]);
        Py_XDECREF(part[i]);
    }
    return result;
}

/* ------------------------------------------------------------ gauge reports */

/* One gauge's reports, each [at, value, low, high] (see WorkerAggregator),
 * read as doubles; ``at`` < 0 marks a window of deltas only. */
typedef struct {
    double at, value, low, high;
} GaugeReport;

static int
read_gauge_report(PyObject *entry, GaugeReport *out)
{
    if (!PyList_CheckExact(entry) || PyList_GET_SIZE(entry) != 4) {
        PyErr_SetString(PyExc_TypeError, "resolve_gauges: a report is not [at, value, low, high]");
        return -1;
    }
    double *fields[4] = {&out->at, &out->value, &out->low, &out->high};
    for (Py_ssize_t i = 0; i < 4; i++) {
        *fields[i] = PyFloat_AsDouble(PyList_GET_ITEM(entry, i));
        if (*fields[i] == -1.0 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

/* math.fsum of the reports' deltas, as _resolve_gauges sums them: fsum of
 * none is 0.0 and of one is it plus 0.0 (-0.0 becomes 0.0); two or more go
 * to math.fsum itself, for its exact sum and its errors. */
static int
sum_deltas(const GaugeReport *reports, Py_ssize_t n, PyObject *fsum, double *out)
{
    Py_ssize_t deltas = 0, last = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (reports[i].at < 0.0) {
            deltas++;
            last = i;
        }
    if (deltas < 2) {
        *out = deltas ? reports[last].value + 0.0 : 0.0;
        return 0;
    }
    PyObject *values = PyList_New(0);
    int rc = values == NULL ? -1 : 0;
    for (Py_ssize_t i = 0; rc == 0 && i < n; i++)
        if (reports[i].at < 0.0) {
            PyObject *v = PyFloat_FromDouble(reports[i].value);
            rc = (v == NULL || PyList_Append(values, v) < 0) ? -1 : 0;
            Py_XDECREF(v);
        }
    PyObject *sum = rc == 0 ? PyObject_CallOneArg(fsum, values) : NULL;
    Py_XDECREF(values);
    if (sum == NULL)
        return -1;
    *out = PyFloat_AsDouble(sum);
    Py_DECREF(sum);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

/* x[1] and x[2] of a held gauge's [last, min, max] */
static int
read_low_high(PyObject *stats, double *low, double *high)
{
    PyObject *a = PySequence_GetItem(stats, 1), *b = PySequence_GetItem(stats, 2);
    int rc = (a == NULL || b == NULL) ? -1 : 0;
    if (rc == 0) {
        *low = PyFloat_AsDouble(a);
        *high = PyFloat_AsDouble(b);
        rc = PyErr_Occurred() ? -1 : 0;
    }
    Py_XDECREF(a);
    Py_XDECREF(b);
    return rc;
}

/* gauges[key] = [value, low, high]; persisted[key] = moved[key] = value */
static int
store_gauge(PyObject *gauges, PyObject *persisted, PyObject *moved, PyObject *key, double value,
            double low, double high)
{
    PyObject *v = PyFloat_FromDouble(value);
    PyObject *stats = v == NULL ? NULL : Py_BuildValue("[Odd]", v, low, high);
    int rc = (stats == NULL || PyDict_SetItem(gauges, key, stats) < 0
              || PyDict_SetItem(persisted, key, v) < 0 || PyDict_SetItem(moved, key, v) < 0)
                 ? -1 : 0;
    Py_XDECREF(stats);
    Py_XDECREF(v);
    return rc;
}

/* aggregate._resolve_gauges for one gauge: its reports, in the workers' order. */
static int
resolve_gauge(PyObject *gauges, PyObject *persisted, PyObject *moved, PyObject *key,
              const GaugeReport *reports, Py_ssize_t n, Admission *a, PyObject *fsum)
{
    PyObject *held = PyDict_GetItemWithError(persisted, key);
    if (held == NULL && PyErr_Occurred())
        return -1;
    double base = 0.0;
    if (held != NULL) {
        base = PyFloat_AsDouble(held);
        if (base == -1.0 && PyErr_Occurred())
            return -1;
    } else {
        a->persisted = PyDict_GET_SIZE(persisted);
        int admitted = admit_series(a, key, 1);
        if (admitted <= 0)
            return admitted;
    }
    double deltas;
    if (sum_deltas(reports, n, fsum, &deltas) < 0)
        return -1;
    /* the latest absolute report (the first of the latest), if any */
    Py_ssize_t latest = -1;
    for (Py_ssize_t i = 0; i < n; i++)
        if (reports[i].at >= 0.0 && (latest < 0 || reports[i].at > reports[latest].at))
            latest = i;
    int absolute = latest >= 0;
    double value = (absolute ? reports[latest].value : base) + deltas, low = value, high = value;
    /* min(value, *lows) and max(value, *highs), NaN and all, as Python orders
     * them: the absolute reports' extremes, or with none, every report's
     * moved by the held value (base + -0.0 is 0.0, so never add 0.0 to the
     * absolute ones) */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (absolute && !(reports[i].at >= 0.0))
            continue;
        double lo = absolute ? reports[i].low : base + reports[i].low;
        double hi = absolute ? reports[i].high : base + reports[i].high;
        if (lo < low)
            low = lo;
        if (hi > high)
            high = hi;
    }
    PyObject *stats = PyDict_GetItemWithError(gauges, key);
    if (stats == NULL && PyErr_Occurred())
        return -1;
    if (stats != NULL || held != NULL) {
        double lo = base, hi = base;
        if (stats != NULL && read_low_high(stats, &lo, &hi) < 0)
            return -1;
        if (lo < low)
            low = lo;
        if (hi > high)
            high = hi;
    }
    return store_gauge(gauges, persisted, moved, key, value, low, high);
}

/* aggregate._resolve_gauges: the gauges of the workers' open windows (one
 * dict per worker, in order) applied to the daemon's open window. Each key
 * is resolved where it first appears, with the reports of the workers
 * after that one. */
static PyObject *
resolve_gauges(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "resolve_gauges(gauges, persisted, reports, budget, fsum)");
        return NULL;
    }
    PyObject *gauges = args[0], *persisted = args[1], *parts = args[2], *fsum = args[4];
    if (!PyDict_CheckExact(gauges) || !PyDict_CheckExact(persisted) || !PyList_CheckExact(parts)) {
        PyErr_SetString(PyExc_TypeError, "resolve_gauges: gauges and persisted are dicts, "
                                         "reports a list");
        return NULL;
    }
    Py_ssize_t workers = PyList_GET_SIZE(parts);
    for (Py_ssize_t i = 0; i < workers; i++)
        if (!PyDict_CheckExact(PyList_GET_ITEM(parts, i))) {
            PyErr_SetString(PyExc_TypeError, "resolve_gauges: a worker's reports are not a dict");
            return NULL;
        }
    GaugeReport *reports = PyMem_New(GaugeReport, workers > 0 ? workers : 1);
    PyObject *moved = PyDict_New();
    Admission a;
    int rc = (reports == NULL || moved == NULL) ? -1 : 0;
    if (rc == 0)
        rc = admission_open(&a, args[3], PyDict_GET_SIZE(persisted));
    for (Py_ssize_t i = 0; rc == 0 && i < workers; i++) {
        PyObject *part = PyList_GET_ITEM(parts, i), *key, *entry;
        Py_ssize_t pos = 0;
        while (rc == 0 && PyDict_Next(part, &pos, &key, &entry)) {
            int seen = 0;  /* resolved already, with an earlier worker's reports */
            for (Py_ssize_t j = 0; rc == 0 && !seen && j < i; j++) {
                seen = PyDict_Contains(PyList_GET_ITEM(parts, j), key);
                rc = seen < 0 ? -1 : 0;
            }
            if (rc < 0 || seen)
                continue;
            Py_ssize_t n = 0;
            rc = read_gauge_report(entry, &reports[n++]);
            for (Py_ssize_t j = i + 1; rc == 0 && j < workers; j++) {
                PyObject *other = PyDict_GetItemWithError(PyList_GET_ITEM(parts, j), key);
                if (other != NULL)
                    rc = read_gauge_report(other, &reports[n++]);
                else if (PyErr_Occurred())
                    rc = -1;
            }
            if (rc == 0)
                rc = resolve_gauge(gauges, persisted, moved, key, reports, n, &a, fsum);
        }
    }
    if (reports != NULL && moved != NULL && admission_close(&a) < 0)
        rc = -1;
    PyMem_Free(reports);
    if (rc < 0) {
        Py_XDECREF(moved);
        return NULL;
    }
    return moved;
}

static PyMethodDef module_methods[] = {
    {"sketch_bytes", (PyCFunction)(void (*)(void))sketch_bytes, METH_FASTCALL,
     "sketch_bytes(values, low, high, inv_log_gamma, max_buckets) -> bytes or None: "
     "sketch.sketch_bytes of an unsampled timer's values."},
    {"merge_sketches", (PyCFunction)(void (*)(void))merge_sketches, METH_FASTCALL,
     "merge_sketches(blobs, max_buckets) -> bytes or None: the merged serialized sketch."},
    {"merge_sets", (PyCFunction)(void (*)(void))merge_sets, METH_FASTCALL,
     "merge_sets(blobs, limit) -> bytes or None: the union of exact set states of ASCII "
     "members, while it has at most limit members."},
    {"window_rollups", (PyCFunction)(void (*)(void))window_rollups, METH_FASTCALL,
     "window_rollups(rollup, start, percentiles, counters, gauges, persisted, timers, weights, "
     "sets, constants) -> (rollups, timer keys left, set keys left), or None: "
     "aggregate.snapshot's rollups, unsorted."},
    {"window_rows", (PyCFunction)(void (*)(void))window_rows, METH_FASTCALL,
     "window_rows(rollups, series, r0, ts) -> (rows, None) or (None, keys the cache lacks): "
     "the _UPSERT rows of one window, in (metric id, series id) order."},
    {"fold_rows", (PyCFunction)(void (*)(void))fold_rows, METH_FASTCALL,
     "fold_rows(rows, pos, count, sum, min, max, last) -> states or None: "
     "storage._Pending.add, the columns updated in place, for series with positions."},
    {"merge_series", (PyCFunction)(void (*)(void))merge_series, METH_FASTCALL,
     "merge_series(target, part, budget, persisted) -> None: aggregate._merge_series, "
     "a worker window's counters, timers and sets into the daemon's, under the budget."},
    {"resolve_gauges", (PyCFunction)(void (*)(void))resolve_gauges, METH_FASTCALL,
     "resolve_gauges(gauges, persisted, reports, budget, fsum) -> moved: "
     "aggregate._resolve_gauges, the workers' gauge reports applied to the open window."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef sketchfast_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aggregator._sketchfast",
    .m_doc = "The flush's sketch serialization and merging in C (see sketch.py).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__sketchfast(void)
{
    return PyModule_Create(&sketchfast_module);
}
