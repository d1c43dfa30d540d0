/* limits.Budget.admit in C, for the two extensions that admit new series:
 * the per-line path (_fastpath.c: a series' first line in a window) and the
 * merge of the ingest workers' windows (_sketchfast.c: a series new to the
 * flush).
 *
 * The budget's count and limits are read once (admission_open), a series
 * that passes every check is counted here as admit counts it, and the
 * count is written back once (admission_close). A series that fails a
 * check goes to Budget.admit itself, which decides and records the drop
 * with its reason; so does everything not in the form the budget keeps.
 * Between open and close, no Python code may admit series on the same
 * budget: the caller closes before it runs any. */
#ifndef AGGREGATOR_ADMISSION_H
#define AGGREGATOR_ADMISSION_H

#include <Python.h>
#include <string.h>

typedef struct {
    PyObject *budget;  /* borrowed; Py_None: every series enters */
    PyObject *per_metric, *gauges_per_metric;
    long long created, persisted, max_series, max_per_metric, max_name, max_tags, max_tag;
} Admission;

static long long
admission_long_attr(PyObject *obj, const char *name)
{
    PyObject *value = PyObject_GetAttrString(obj, name);
    if (value == NULL)
        return -1;
    long long out = PyLong_AsLongLong(value);
    Py_DECREF(value);
    return out;
}

/* ``persisted``: the persisted gauges, as admit takes them (the caller may
 * change a->persisted between two series). */
static int
admission_open(Admission *a, PyObject *budget, long long persisted)
{
    memset(a, 0, sizeof(*a));
    a->budget = budget;
    a->persisted = persisted;
    if (budget == Py_None)
        return 0;
    PyObject *limits = PyObject_GetAttrString(budget, "limits");
    if (limits == NULL)
        return -1;
    a->max_series = admission_long_attr(limits, "max_series");
    a->max_per_metric = admission_long_attr(limits, "max_series_per_metric");
    a->max_name = admission_long_attr(limits, "max_name_length");
    a->max_tags = admission_long_attr(limits, "max_tags");
    a->max_tag = admission_long_attr(limits, "max_tag_length");
    Py_DECREF(limits);
    a->created = admission_long_attr(budget, "created");
    if (PyErr_Occurred())
        return -1;
    a->per_metric = PyObject_GetAttrString(budget, "per_metric");
    a->gauges_per_metric = PyObject_GetAttrString(budget, "gauges_per_metric");
    if (a->per_metric == NULL || a->gauges_per_metric == NULL)
        return -1;
    if (!PyDict_CheckExact(a->per_metric) || !PyDict_CheckExact(a->gauges_per_metric)) {
        PyErr_SetString(PyExc_TypeError, "admission: the budget's counts are not dicts");
        return -1;
    }
    return 0;
}

/* Writes the count back; call once after an open (also on an error). */
static int
admission_close(Admission *a)
{
    int rc = 0;
    if (a->budget != Py_None && a->per_metric != NULL) {
        PyObject *created = PyLong_FromLongLong(a->created);
        rc = (created == NULL || PyObject_SetAttrString(a->budget, "created", created) < 0)
                 ? -1 : 0;
        Py_XDECREF(created);
    }
    Py_CLEAR(a->per_metric);
    Py_CLEAR(a->gauges_per_metric);
    return rc;
}

static long long
admission_count_of(PyObject *counts, PyObject *name)
{
    PyObject *n = PyDict_GetItemWithError(counts, name);
    if (n == NULL)
        return PyErr_Occurred() ? -1 : 0;
    return PyLong_AsLongLong(n);
}

/* Does every check of Budget.admit pass?  1 yes, 0 no, -1 error; *mine is
 * the name's count so far (its persisted gauges' for a gauge). */
static int
admission_passes(Admission *a, PyObject *key, int gauge, long long *mine)
{
    if (!PyTuple_CheckExact(key) || PyTuple_GET_SIZE(key) != 3)
        return 0;
    PyObject *name = PyTuple_GET_ITEM(key, 0), *tags = PyTuple_GET_ITEM(key, 2);
    if (!PyUnicode_CheckExact(name) || !PyTuple_CheckExact(tags))
        return 0;
    if (a->created + a->persisted >= a->max_series)
        return 0;
    long long in_metric = admission_count_of(a->per_metric, name);
    if (in_metric == -1 && PyErr_Occurred())
        return -1;
    long long gauges = admission_count_of(a->gauges_per_metric, name);
    if (gauges == -1 && PyErr_Occurred())
        return -1;
    if (in_metric + gauges >= a->max_per_metric || PyUnicode_GET_LENGTH(name) > a->max_name
        || PyTuple_GET_SIZE(tags) > a->max_tags)
        return 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tags); i++) {
        PyObject *pair = PyTuple_GET_ITEM(tags, i);
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2
            || !PyUnicode_CheckExact(PyTuple_GET_ITEM(pair, 0))
            || !PyUnicode_CheckExact(PyTuple_GET_ITEM(pair, 1)))
            return 0;
        if (PyUnicode_GET_LENGTH(PyTuple_GET_ITEM(pair, 0))
                + PyUnicode_GET_LENGTH(PyTuple_GET_ITEM(pair, 1))
            >= a->max_tag)
            return 0;
    }
    *mine = gauge ? gauges : in_metric;
    return 1;
}

/* May the series ``key`` enter?  1, 0 or -1 (error).  ``gauge``: it becomes
 * one of the persisted gauges (Budget.admit's ``gauge``). */
static int
admit_series(Admission *a, PyObject *key, int gauge)
{
    if (a->budget == Py_None)
        return 1;
    long long mine = 0;
    int passes = admission_passes(a, key, gauge, &mine);
    if (passes < 0)
        return -1;
    if (passes) {
        PyObject *counts = gauge ? a->gauges_per_metric : a->per_metric;
        PyObject *count = PyLong_FromLongLong(mine + 1);
        if (count == NULL || PyDict_SetItem(counts, PyTuple_GET_ITEM(key, 0), count) < 0) {
            Py_XDECREF(count);
            return -1;
        }
        Py_DECREF(count);
        if (!gauge)
            a->created++;
        return 1;
    }
    /* admit decides, with the count as it stands */
    PyObject *created = PyLong_FromLongLong(a->created);
    if (created == NULL || PyObject_SetAttrString(a->budget, "created", created) < 0) {
        Py_XDECREF(created);
        return -1;
    }
    Py_DECREF(created);
    PyObject *name = PySequence_GetItem(key, 0), *tags = PySequence_GetItem(key, 2);
    PyObject *persisted = PyLong_FromLongLong(a->persisted), *answer = NULL;
    if (name != NULL && tags != NULL && persisted != NULL)
        answer = PyObject_CallMethod(a->budget, "admit", "OOOO", name, tags, persisted,
                                     gauge ? Py_True : Py_False);
    Py_XDECREF(name);
    Py_XDECREF(tags);
    Py_XDECREF(persisted);
    if (answer == NULL)
        return -1;
    int admitted = PyObject_IsTrue(answer);
    Py_DECREF(answer);
    a->created = admission_long_attr(a->budget, "created");
    return PyErr_Occurred() ? -1 : admitted;
}

#endif
