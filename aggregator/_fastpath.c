/* The per-line hot path in C: lines the parser has already seen the shape of,
 * folded straight into the open window.
 *
 * A "route" says how to read a line without parsing it: for the text before
 * its first ':' (the head) and after the '|' that ends its values (the tail),
 * the series key, the type and the sample rate. The Python side learns a route
 * from the parser (Parser.route) after parsing a line the slow way; from then
 * on a line with the same head and tail costs a table lookup, a number
 * conversion and a dict update here. Everything else (a new shape, events,
 * packed values, a value that does not convert, a type the window does not
 * hold as expected) is handed, as the line's bytes, to the Python callable
 * `slow`, in order, so the window ends up exactly as the pure path leaves it.
 *
 * What is done here mirrors protocol._samples and Aggregator.add /
 * WorkerAggregator._add_gauge operation for operation (the same float
 * operations in the same order); tests/test_fastpath.py feeds both paths the
 * same lines and compares the windows.
 *
 * recv_batch reads up to a batch of datagrams with one recvmmsg(2) call,
 * where the pure listener makes one recv per datagram.
 */
#define _GNU_SOURCE /* recvmmsg */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include "_admission.h"

enum { KIND_COUNTER = 0, KIND_DISTRIBUTION = 1, KIND_GAUGE = 2, KIND_SET = 3 };

typedef struct {
    Py_hash_t hash;      /* of head and tail, never 0 */
    Py_hash_t key_hash;
    PyObject *key;       /* (name, type code, tags) */
    double rate;
    int kind;
    int head_len;
    int tail_len;
    char text[];         /* head then tail, not terminated */
} Route;

typedef struct {
    PyObject_HEAD
    Route **slots;       /* open addressing; NULL marks an empty slot */
    Py_ssize_t mask;     /* capacity - 1, capacity a power of two */
    Py_ssize_t used;
    Py_ssize_t limit;    /* routes kept before the table is emptied */
} Routes;

static Py_hash_t
route_hash(const char *head, Py_ssize_t head_len, const char *tail, Py_ssize_t tail_len)
{
    Py_hash_t h = _Py_HashBytes(head, head_len) * 1000003 ^ _Py_HashBytes(tail, tail_len);
    return h == 0 ? 1 : h;
}

static void
routes_empty(Routes *self)
{
    for (Py_ssize_t i = 0; i <= self->mask; i++) {
        Route *r = self->slots[i];
        if (r != NULL) {
            self->slots[i] = NULL;
            Py_DECREF(r->key);
            PyMem_Free(r);
        }
    }
    self->used = 0;
}

/* The slot of the route for (head, tail): holding it, or the empty one where it goes. */
static Route **
routes_find(Routes *self, Py_hash_t hash, const char *head, Py_ssize_t head_len,
            const char *tail, Py_ssize_t tail_len)
{
    Py_ssize_t i = (Py_ssize_t)((size_t)hash & (size_t)self->mask);
    for (;;) {
        Route *r = self->slots[i];
        if (r == NULL || (r->hash == hash && r->head_len == head_len && r->tail_len == tail_len
                          && memcmp(r->text, head, head_len) == 0
                          && memcmp(r->text + head_len, tail, tail_len) == 0))
            return &self->slots[i];
        i = (i + 1) & self->mask;
    }
}

static int
routes_init(Routes *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"limit", NULL};
    Py_ssize_t limit;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n", kwlist, &limit))
        return -1;
    if (limit < 1 || limit > ((Py_ssize_t)1 << 28)) {
        PyErr_SetString(PyExc_ValueError, "limit must be between 1 and 2**28");
        return -1;
    }
    Py_ssize_t capacity = 8;
    while (capacity < limit * 2)
        capacity <<= 1;
    if (self->slots != NULL) {
        routes_empty(self);
        PyMem_Free(self->slots);
    }
    self->slots = PyMem_Calloc((size_t)capacity, sizeof(Route *));
    if (self->slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->mask = capacity - 1;
    self->used = 0;
    self->limit = limit;
    return 0;
}

static void
routes_dealloc(Routes *self)
{
    if (self->slots != NULL) {
        routes_empty(self);
        PyMem_Free(self->slots);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t
routes_len(Routes *self)
{
    return self->used;
}

static PyObject *
routes_learn(Routes *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "learn(head, tail, key, kind, rate)");
        return NULL;
    }
    PyObject *head = args[0], *tail = args[1], *key = args[2];
    if (!PyBytes_Check(head) || !PyBytes_Check(tail)) {
        PyErr_SetString(PyExc_TypeError, "head and tail must be bytes");
        return NULL;
    }
    if (!PyTuple_CheckExact(key) || PyTuple_GET_SIZE(key) != 3) {
        PyErr_SetString(PyExc_TypeError, "key must be a (name, type, tags) tuple");
        return NULL;
    }
    long kind = PyLong_AsLong(args[3]);
    if (kind == -1 && PyErr_Occurred())
        return NULL;
    if (kind < KIND_COUNTER || kind > KIND_SET) {
        PyErr_SetString(PyExc_ValueError, "kind must be 0..3");
        return NULL;
    }
    double rate = PyFloat_AsDouble(args[4]);
    if (rate == -1.0 && PyErr_Occurred())
        return NULL;
    Py_hash_t key_hash = PyObject_Hash(key);
    if (key_hash == -1)
        return NULL;
    const char *h = PyBytes_AS_STRING(head), *t = PyBytes_AS_STRING(tail);
    Py_ssize_t hl = PyBytes_GET_SIZE(head), tl = PyBytes_GET_SIZE(tail);
    if (hl > INT_MAX / 2 || tl > INT_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "head or tail too long");
        return NULL;
    }
    Py_hash_t hash = route_hash(h, hl, t, tl);
    Route **slot = routes_find(self, hash, h, hl, t, tl);
    if (*slot != NULL)
        Py_RETURN_FALSE; /* known: a route never changes */
    if (self->used >= self->limit) {
        /* bounded like the parser's caches: a flood of shapes cannot grow it */
        routes_empty(self);
        slot = routes_find(self, hash, h, hl, t, tl);
    }
    Route *r = PyMem_Malloc(sizeof(Route) + (size_t)(hl + tl));
    if (r == NULL)
        return PyErr_NoMemory();
    memcpy(r->text, h, hl);
    memcpy(r->text + hl, t, tl);
    r->hash = hash;
    r->head_len = (int)hl;
    r->tail_len = (int)tl;
    Py_INCREF(key);
    r->key = key;
    r->key_hash = key_hash;
    r->rate = rate;
    r->kind = (int)kind;
    *slot = r;
    self->used++;
    Py_RETURN_TRUE;
}

static PyObject *
routes_clear(Routes *self, PyObject *Py_UNUSED(ignored))
{
    routes_empty(self);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ feed */

typedef struct {
    PyObject *counters, *timers, *weights, *gauges, *sets, *persisted;
    PyObject *budget;    /* limits.Budget, or None */
    PyObject *slow;      /* slow(line: bytes) -> None */
    int gauge_deltas;
    int worker;          /* gauges as WorkerAggregator keeps them */
    PyObject *now;       /* float: WorkerAggregator.now */
    int admitting;       /* admission is open on the budget */
    Admission admission;
} Target;

/* 1: handled here; 0: hand the line to the slow path; -1: a Python error. */
typedef int Outcome;

/* Budget.admit(name, tags, persisted[, True]) for a series new to the window,
 * in C (_admission.h); the budget's count is read at the first such series
 * of a feed, and written back before the slow path runs and at the end. */
static int
admitted(Target *t, Route *r, Py_ssize_t persisted, int gauge)
{
    if (t->budget == Py_None)
        return 1;
    if (!t->admitting) {
        t->admitting = 1; /* feed_failed closes it if the open fails */
        if (admission_open(&t->admission, t->budget, persisted) < 0)
            return -1;
    }
    t->admission.persisted = persisted;
    return admit_series(&t->admission, r->key, gauge);
}

/* Ends an open admission: the count goes back to the budget. */
static int
admission_done(Target *t)
{
    if (!t->admitting)
        return 0;
    t->admitting = 0;
    return admission_close(&t->admission);
}

/* Replace list[i] with a new float; the list owns the new reference. */
static int
set_float(PyObject *list, Py_ssize_t i, double value)
{
    PyObject *f = PyFloat_FromDouble(value);
    if (f == NULL)
        return -1;
    PyObject *old = PyList_GET_ITEM(list, i);
    PyList_SET_ITEM(list, i, f);
    Py_DECREF(old);
    return 0;
}

/* A list of `n` exact floats, as the window keeps per series. */
static int
float_list(PyObject *list, Py_ssize_t n)
{
    if (!PyList_CheckExact(list) || PyList_GET_SIZE(list) != n)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (!PyFloat_CheckExact(PyList_GET_ITEM(list, i)))
            return 0;
    return 1;
}

static PyObject *
list_of(Py_ssize_t n, const double *values)
{
    PyObject *list = PyList_New(n);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *f = PyFloat_FromDouble(values[i]);
        if (f == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, f);
    }
    return list;
}

static int
dict_set_new(PyObject *dict, Route *r, PyObject *value)
{
    if (value == NULL)
        return -1;
    int rc = _PyDict_SetItem_KnownHash(dict, r->key, value, r->key_hash);
    Py_DECREF(value);
    return rc;
}

static Outcome
add_counter(Target *t, Route *r, double value)
{
    double rate = r->rate;
    PyObject *acc = _PyDict_GetItem_KnownHash(t->counters, r->key, r->key_hash);
    if (acc == NULL) {
        if (PyErr_Occurred())
            return -1;
        int ok = admitted(t, r, PyDict_GET_SIZE(t->persisted), 0);
        if (ok <= 0)
            return ok < 0 ? -1 : 1;
        double fresh[2];
        if (rate == 1.0) {
            fresh[0] = value;
            fresh[1] = 1.0;
        } else {
            fresh[0] = value / rate;
            fresh[1] = 1.0 / rate;
        }
        return dict_set_new(t->counters, r, list_of(2, fresh)) < 0 ? -1 : 1;
    }
    if (!float_list(acc, 2))
        return 0;
    double sum = PyFloat_AS_DOUBLE(PyList_GET_ITEM(acc, 0));
    double count = PyFloat_AS_DOUBLE(PyList_GET_ITEM(acc, 1));
    if (rate == 1.0) {
        sum += value;
        count += 1.0;
    } else {
        sum += value / rate;
        count += 1.0 / rate;
    }
    if (set_float(acc, 0, sum) < 0 || set_float(acc, 1, count) < 0)
        return -1;
    return 1;
}

/* aggregate._add_weight: the weight of the n-th value, earlier ones padded with 1.0. */
static int
add_weight(Target *t, Route *r, Py_ssize_t n, double weight)
{
    PyObject *column = _PyDict_GetItem_KnownHash(t->weights, r->key, r->key_hash);
    if (column == NULL) {
        if (PyErr_Occurred())
            return -1;
        column = PyList_New(0);
        if (column == NULL)
            return -1;
        int rc = _PyDict_SetItem_KnownHash(t->weights, r->key, column, r->key_hash);
        Py_DECREF(column); /* the dict holds it */
        if (rc < 0)
            return -1;
    }
    if (!PyList_Check(column)) {
        PyErr_SetString(PyExc_TypeError, "a weights entry is not a list");
        return -1;
    }
    while (PyList_GET_SIZE(column) < n - 1) {
        PyObject *one = PyFloat_FromDouble(1.0);
        if (one == NULL)
            return -1;
        int rc = PyList_Append(column, one);
        Py_DECREF(one);
        if (rc < 0)
            return -1;
    }
    PyObject *w = PyFloat_FromDouble(weight);
    if (w == NULL)
        return -1;
    int rc = PyList_Append(column, w);
    Py_DECREF(w);
    return rc;
}

/* Append a value to a series' packed values (aggregate.pack_value). */
static int
append_value(PyObject *values, double value)
{
    Py_ssize_t size = PyByteArray_GET_SIZE(values);
    if (PyByteArray_Resize(values, size + (Py_ssize_t)sizeof value) < 0)
        return -1;
    memcpy(PyByteArray_AS_STRING(values) + size, &value, sizeof value);
    return 0;
}

static Outcome
add_distribution(Target *t, Route *r, double value)
{
    PyObject *values = _PyDict_GetItem_KnownHash(t->timers, r->key, r->key_hash);
    if (values == NULL) {
        if (PyErr_Occurred())
            return -1;
        int ok = admitted(t, r, PyDict_GET_SIZE(t->persisted), 0);
        if (ok <= 0)
            return ok < 0 ? -1 : 1;
        values = PyByteArray_FromStringAndSize((const char *)&value, sizeof value);
        if (dict_set_new(t->timers, r, values) < 0)
            return -1;
        if (r->rate != 1.0)
            return add_weight(t, r, 1, 1.0 / r->rate) < 0 ? -1 : 1;
        return 1;
    }
    if (!PyByteArray_CheckExact(values))
        return 0;
    if (append_value(values, value) < 0)
        return -1;
    if (r->rate != 1.0) {
        Py_ssize_t n = PyByteArray_GET_SIZE(values) / (Py_ssize_t)sizeof value;
        return add_weight(t, r, n, 1.0 / r->rate) < 0 ? -1 : 1;
    }
    return 1;
}

/* Aggregator._add_gauge: the daemon keeps every gauge's value across windows. */
static Outcome
add_gauge(Target *t, Route *r, double value, int delta)
{
    PyObject *prior_obj = _PyDict_GetItem_KnownHash(t->persisted, r->key, r->key_hash);
    if (prior_obj == NULL && PyErr_Occurred())
        return -1;
    if (prior_obj != NULL && !PyFloat_CheckExact(prior_obj))
        return 0;
    PyObject *stats = _PyDict_GetItem_KnownHash(t->gauges, r->key, r->key_hash);
    if (stats == NULL && PyErr_Occurred())
        return -1;
    if (stats != NULL && !float_list(stats, 3))
        return 0;
    if (prior_obj == NULL) {
        int ok = admitted(t, r, PyDict_GET_SIZE(t->persisted), 1);
        if (ok <= 0)
            return ok < 0 ? -1 : 1;
    }
    double prior = prior_obj == NULL ? 0.0 : PyFloat_AS_DOUBLE(prior_obj);
    if (delta && t->gauge_deltas)
        value = (prior == 0.0 ? 0.0 : prior) + value; /* (prior or 0.0): -0.0 is falsy */
    PyObject *f = PyFloat_FromDouble(value);
    if (f == NULL)
        return -1;
    if (_PyDict_SetItem_KnownHash(t->persisted, r->key, f, r->key_hash) < 0) {
        Py_DECREF(f);
        return -1;
    }
    Py_DECREF(f);
    if (stats == NULL) {
        double fresh[3] = {value, value, value};
        if (prior_obj != NULL) {
            /* min(prior, value), max(prior, value): the first of equals wins */
            fresh[1] = value < prior ? value : prior;
            fresh[2] = value > prior ? value : prior;
        }
        return dict_set_new(t->gauges, r, list_of(3, fresh)) < 0 ? -1 : 1;
    }
    if (set_float(stats, 0, value) < 0)
        return -1;
    if (value < PyFloat_AS_DOUBLE(PyList_GET_ITEM(stats, 1)))
        return set_float(stats, 1, value) < 0 ? -1 : 1;
    if (value > PyFloat_AS_DOUBLE(PyList_GET_ITEM(stats, 2)))
        return set_float(stats, 2, value) < 0 ? -1 : 1;
    return 1;
}

/* WorkerAggregator._add_gauge: [at, value, low, high] per gauge of the window. */
static Outcome
add_worker_gauge(Target *t, Route *r, double value, int delta)
{
    PyObject *entry = _PyDict_GetItem_KnownHash(t->gauges, r->key, r->key_hash);
    if (entry == NULL) {
        if (PyErr_Occurred())
            return -1;
        int ok = admitted(t, r, 0, 0);
        if (ok <= 0)
            return ok < 0 ? -1 : 1;
    } else if (!float_list(entry, 4)) {
        return 0;
    }
    double now = PyFloat_AS_DOUBLE(t->now);
    if (delta && t->gauge_deltas) {
        if (entry == NULL) {
            double fresh[4] = {-1.0, value, value < 0.0 ? value : 0.0, value > 0.0 ? value : 0.0};
            return dict_set_new(t->gauges, r, list_of(4, fresh)) < 0 ? -1 : 1;
        }
        value += PyFloat_AS_DOUBLE(PyList_GET_ITEM(entry, 1));
    } else if (entry == NULL || PyFloat_AS_DOUBLE(PyList_GET_ITEM(entry, 0)) < 0.0) {
        double fresh[4] = {now, value, value, value};
        return dict_set_new(t->gauges, r, list_of(4, fresh)) < 0 ? -1 : 1;
    } else if (set_float(entry, 0, now) < 0) {
        return -1;
    }
    if (set_float(entry, 1, value) < 0)
        return -1;
    if (value < PyFloat_AS_DOUBLE(PyList_GET_ITEM(entry, 2)))
        return set_float(entry, 2, value) < 0 ? -1 : 1;
    if (value > PyFloat_AS_DOUBLE(PyList_GET_ITEM(entry, 3)))
        return set_float(entry, 3, value) < 0 ? -1 : 1;
    return 1;
}

static Outcome
add_member(Target *t, Route *r, const char *text, Py_ssize_t len)
{
    PyObject *member = PyUnicode_DecodeUTF8(text, len, NULL);
    if (member == NULL) {
        PyErr_Clear(); /* not UTF-8: the slow path counts the bad line */
        return 0;
    }
    PyObject *members = _PyDict_GetItem_KnownHash(t->sets, r->key, r->key_hash);
    int rc;
    if (members == NULL) {
        if (PyErr_Occurred()) {
            Py_DECREF(member);
            return -1;
        }
        int ok = admitted(t, r, PyDict_GET_SIZE(t->persisted), 0);
        if (ok <= 0) {
            Py_DECREF(member);
            return ok < 0 ? -1 : 1;
        }
        PyObject *fresh = PySet_New(NULL);
        if (fresh == NULL || PySet_Add(fresh, member) < 0) {
            Py_XDECREF(fresh);
            Py_DECREF(member);
            return -1;
        }
        Py_DECREF(member);
        return dict_set_new(t->sets, r, fresh) < 0 ? -1 : 1;
    }
    if (!PySet_CheckExact(members)) {
        Py_DECREF(member);
        return 0;
    }
    rc = PySet_Add(members, member);
    Py_DECREF(member);
    return rc < 0 ? -1 : 1;
}

/* protocol._samples' number rule: only "0123456789.eE+-", float() of that,
 * finite. Anything else (packed values, a bad number) goes the slow way. */
static int
wire_number(const char *text, Py_ssize_t len, double *out)
{
    for (Py_ssize_t i = 0; i < len; i++) {
        char c = text[i];
        if (!((c >= '0' && c <= '9') || c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-'))
            return 0;
    }
    char buf[64];
    if (len >= (Py_ssize_t)sizeof(buf))
        return 0;
    memcpy(buf, text, len);
    buf[len] = '\0';
    char *end;
    double value = PyOS_string_to_double(buf, &end, NULL);
    if (value == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (end != buf + len || !isfinite(value))
        return 0;
    *out = value;
    return 1;
}

static Outcome
fast_line(Routes *self, Target *t, const char *line, Py_ssize_t len)
{
    if (line[len - 1] == '\r')
        len--;
    if (len == 0)
        return 0;
    if (line[0] == '_' && len >= 3
        && (memcmp(line, "_e{", 3) == 0 || (len >= 4 && memcmp(line, "_sc|", 4) == 0)))
        return 0;
    const char *colon = memchr(line, ':', (size_t)len);
    if (colon == NULL)
        return 0;
    const char *values = colon + 1;
    const char *end = line + len;
    const char *bar = memchr(values, '|', (size_t)(end - values));
    if (bar == NULL || bar == values)
        return 0;
    const char *tail = bar + 1;
    Py_ssize_t head_len = colon - line, tail_len = end - tail, values_len = bar - values;
    Route *r = *routes_find(self, route_hash(line, head_len, tail, tail_len), line, head_len,
                            tail, tail_len);
    if (r == NULL)
        return 0;
    if (r->kind == KIND_SET)
        return add_member(t, r, values, values_len);
    double value;
    if (!wire_number(values, values_len, &value))
        return 0;
    switch (r->kind) {
    case KIND_COUNTER:
        return add_counter(t, r, value);
    case KIND_DISTRIBUTION:
        return add_distribution(t, r, value);
    default: {
        int delta = values[0] == '+' || values[0] == '-';
        return t->worker ? add_worker_gauge(t, r, value, delta) : add_gauge(t, r, value, delta);
    }
    }
}

static int
slow_line(Target *t, const char *line, Py_ssize_t len)
{
    if (admission_done(t) < 0) /* the slow path admits on the same budget */
        return -1;
    PyObject *bytes = PyBytes_FromStringAndSize(line, len);
    if (bytes == NULL)
        return -1;
    PyObject *result = PyObject_CallOneArg(t->slow, bytes);
    Py_DECREF(bytes);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* Closes the admission after an error, keeping that error. */
static PyObject *
feed_failed(Target *t)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    if (admission_done(t) < 0)
        PyErr_Clear();
    PyErr_Restore(type, value, traceback);
    return NULL;
}

static PyObject *
routes_feed(Routes *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError,
                        "feed(chunks, counters, timers, weights, gauges, sets, persisted, "
                        "budget, gauge_deltas, worker, now, slow)");
        return NULL;
    }
    PyObject *chunks = args[0];
    Target t = {args[1], args[2], args[3], args[4], args[5], args[6], args[7], args[11],
                PyObject_IsTrue(args[8]), PyObject_IsTrue(args[9]), args[10], 0, {0}};
    if (!PyList_Check(chunks)) {
        PyErr_SetString(PyExc_TypeError, "chunks must be a list of bytes");
        return NULL;
    }
    for (int i = 1; i <= 6; i++) {
        if (!PyDict_Check(args[i])) {
            PyErr_SetString(PyExc_TypeError, "the window's parts must be dicts");
            return NULL;
        }
    }
    if (t.worker && !PyFloat_CheckExact(t.now)) {
        PyErr_SetString(PyExc_TypeError, "now must be a float");
        return NULL;
    }
    Py_ssize_t lines = 0;
    for (Py_ssize_t c = 0; c < PyList_GET_SIZE(chunks); c++) {
        PyObject *chunk = PyList_GET_ITEM(chunks, c);
        if (!PyBytes_Check(chunk)) {
            PyErr_SetString(PyExc_TypeError, "chunks must be a list of bytes");
            return feed_failed(&t);
        }
        Py_INCREF(chunk); /* a slow call may drop the list's reference */
        const char *at = PyBytes_AS_STRING(chunk);
        const char *stop = at + PyBytes_GET_SIZE(chunk);
        while (at < stop) {
            const char *newline = memchr(at, '\n', (size_t)(stop - at));
            const char *end = newline == NULL ? stop : newline;
            Py_ssize_t len = end - at;
            if (len > 0 && !(len == 1 && at[0] == '\r')) {
                Outcome done = fast_line(self, &t, at, len);
                if (done == 0)
                    done = slow_line(&t, at, len);
                else if (done == 1)
                    lines++;
                if (done < 0) {
                    Py_DECREF(chunk);
                    return feed_failed(&t);
                }
            }
            at = end + 1;
        }
        Py_DECREF(chunk);
    }
    if (admission_done(&t) < 0)
        return NULL;
    return PyLong_FromSsize_t(lines);
}

/* ------------------------------------------------------------ recv_batch */

/* One buffer per process, grown to count * (limit + 1): only the event loop
 * thread reads sockets, and untouched pages of it cost no memory. */
static char *recv_buffer;
static size_t recv_buffer_size;

static PyObject *
recv_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "recv_batch(fd, count, limit)");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    Py_ssize_t count = PyLong_AsSsize_t(args[1]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT_MAX || count < 1 || count > 1024 || limit < 1 || limit > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "fd >= 0, count 1..1024 and limit 1..2**24");
        return NULL;
    }
    size_t slot = (size_t)limit + 1; /* one byte more: a bigger datagram shows */
    size_t need = slot * (size_t)count;
    if (need > recv_buffer_size) {
        char *grown = PyMem_RawRealloc(recv_buffer, need);
        if (grown == NULL)
            return PyErr_NoMemory();
        recv_buffer = grown;
        recv_buffer_size = need;
    }
    struct mmsghdr msgs[1024];
    struct iovec iovs[1024];
    for (Py_ssize_t i = 0; i < count; i++) {
        iovs[i].iov_base = recv_buffer + slot * (size_t)i;
        iovs[i].iov_len = slot;
        memset(&msgs[i].msg_hdr, 0, sizeof(msgs[i].msg_hdr));
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    int got;
    do {
        got = recvmmsg((int)fd, msgs, (unsigned int)count, MSG_DONTWAIT, NULL);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            got = 0;
        else
            return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *datagrams = PyList_New(0);
    if (datagrams == NULL)
        return NULL;
    Py_ssize_t bytes = 0, too_large = 0;
    for (int i = 0; i < got; i++) {
        size_t len = msgs[i].msg_len;
        bytes += (Py_ssize_t)len;
        if (len > (size_t)limit) {
            too_large++;
            continue;
        }
        PyObject *data = PyBytes_FromStringAndSize(iovs[i].iov_base, (Py_ssize_t)len);
        if (data == NULL || PyList_Append(datagrams, data) < 0) {
            Py_XDECREF(data);
            Py_DECREF(datagrams);
            return NULL;
        }
        Py_DECREF(data);
    }
    return Py_BuildValue("(Nnnn)", datagrams, (Py_ssize_t)got, bytes, too_large);
}

static PyMethodDef module_methods[] = {
    {"recv_batch", (PyCFunction)(void (*)(void))recv_batch, METH_FASTCALL,
     "recv_batch(fd, count, limit) -> (datagrams, packets, bytes, too_large): up to count "
     "datagrams in one recvmmsg call; those over limit bytes are counted, not returned."},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef routes_methods[] = {
    {"learn", (PyCFunction)(void (*)(void))routes_learn, METH_FASTCALL,
     "learn(head, tail, key, kind, rate): remember how lines of this shape read; "
     "True if the shape was new."},
    {"feed", (PyCFunction)(void (*)(void))routes_feed, METH_FASTCALL,
     "feed(chunks, counters, timers, weights, gauges, sets, persisted, budget, gauge_deltas, "
     "worker, now, slow) -> lines handled here (each one sample)."},
    {"clear", (PyCFunction)routes_clear, METH_NOARGS, "Forget every route."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods routes_as_sequence = {
    .sq_length = (lenfunc)routes_len,
};

static PyTypeObject RoutesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "aggregator._fastpath.Routes",
    .tp_basicsize = sizeof(Routes),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Routes(limit): line shapes and the series they feed, at most `limit` of them.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)routes_init,
    .tp_dealloc = (destructor)routes_dealloc,
    .tp_methods = routes_methods,
    .tp_as_sequence = &routes_as_sequence,
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aggregator._fastpath",
    .m_doc = "The per-line hot path for line shapes the parser has seen (see fastpath.py).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    if (PyType_Ready(&RoutesType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&fastpath_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&RoutesType);
    if (PyModule_AddObject(module, "Routes", (PyObject *)&RoutesType) < 0) {
        Py_DECREF(&RoutesType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
