/* Bulk statements on a sqlite3.Connection's own SQLite handle.
 *
 * A flush writes 100k rows of eleven values with one statement run many times.
 * sqlite3's Connection.executemany spends about a third of that in Python's
 * per-row work (the iterator, a type dispatch per value, the GIL dropped and
 * taken per step); executemany here reads a batch of rows' values with the
 * GIL held, then binds and steps the batch without it, on the connection's
 * handle, inside the transaction the caller opened with that connection.
 *
 * The handle is the first field after the object header of sqlite3's
 * Connection (Modules/_sqlite/connection.h, unchanged since pysqlite), and
 * it is only usable if this module and sqlite3 call into the same SQLite
 * library: shares_library() checks that, once, and fastpath.py uses this
 * module only when it holds. Rows must be tuples of int, float, None, bytes
 * or str; anything else raises TypeError. As with sqlite3's executemany, an
 * error leaves the rows before it stepped: the caller's transaction rolls
 * them back.
 */
#define _GNU_SOURCE /* RTLD_NOLOAD */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <sqlite3.h>

#if PY_VERSION_HEX < 0x030B0000 || PY_VERSION_HEX >= 0x030E0000
#error "the layout of sqlite3.Connection is checked for Python 3.11 to 3.13 only"
#endif

typedef struct {
    PyObject_HEAD
    sqlite3 *db;
} ConnectionHead;

/* rows bound and stepped per release of the GIL */
enum { BATCH = 256 };

enum { V_NULL, V_INT, V_FLOAT, V_BLOB, V_TEXT };

typedef struct {
    int type;
    int size;
    union {
        sqlite3_int64 i;
        double d;
        const void *p;
    } u;
} Value;

static PyObject *connection_type;   /* sqlite3.Connection */
static PyObject *error_classes;     /* name -> sqlite3's exception class */

static PyObject *
error_class(int code)
{
    const char *name;
    switch (code & 0xFF) {
    case SQLITE_CONSTRAINT: name = "IntegrityError"; break;
    case SQLITE_MISMATCH: case SQLITE_TOOBIG: case SQLITE_RANGE: name = "DataError"; break;
    case SQLITE_INTERNAL: case SQLITE_NOTFOUND: name = "InternalError"; break;
    case SQLITE_MISUSE: name = "ProgrammingError"; break;
    case SQLITE_ERROR: case SQLITE_PERM: case SQLITE_ABORT: case SQLITE_BUSY:
    case SQLITE_LOCKED: case SQLITE_READONLY: case SQLITE_INTERRUPT: case SQLITE_IOERR:
    case SQLITE_FULL: case SQLITE_CANTOPEN: case SQLITE_PROTOCOL: case SQLITE_EMPTY:
    case SQLITE_SCHEMA: name = "OperationalError"; break;
    default: name = "DatabaseError";
    }
    return PyDict_GetItemString(error_classes, name);
}

/* sqlite3's exception for the handle's last error, with sqlite_errorcode as sqlite3 sets it. */
static PyObject *
raise_sqlite(sqlite3 *db, int rc)
{
    int code = sqlite3_extended_errcode(db);
    if ((code & 0xFF) != (rc & 0xFF))
        code = rc;
    if ((code & 0xFF) == SQLITE_NOMEM)
        return PyErr_NoMemory();  /* as sqlite3 raises it */
    PyObject *cls = error_class(code);
    PyObject *exc = PyObject_CallFunction(cls, "s", sqlite3_errmsg(db));
    if (exc == NULL)
        return NULL;
    PyObject *number = PyLong_FromLong(code);
    if (number != NULL && PyObject_SetAttrString(exc, "sqlite_errorcode", number) == 0)
        PyErr_SetObject(cls, exc);
    Py_XDECREF(number);
    Py_DECREF(exc);
    return NULL;
}

/* One value of a row, read with the GIL held; 0, or -1 with an exception. */
static int
read_value(PyObject *o, Value *v)
{
    if (o == Py_None) {
        v->type = V_NULL;
    } else if (PyFloat_Check(o)) {
        v->type = V_FLOAT;
        v->u.d = PyFloat_AS_DOUBLE(o);
    } else if (PyLong_Check(o)) {
        v->type = V_INT;
        v->u.i = PyLong_AsLongLong(o);
        if (v->u.i == -1 && PyErr_Occurred())
            return -1;
    } else if (PyBytes_Check(o)) {
        if (PyBytes_GET_SIZE(o) > INT_MAX) {
            PyErr_SetString(PyExc_OverflowError, "BLOB longer than INT_MAX bytes");
            return -1;
        }
        v->type = V_BLOB;
        v->u.p = PyBytes_AS_STRING(o);
        v->size = (int)PyBytes_GET_SIZE(o);
    } else if (PyUnicode_Check(o)) {
        Py_ssize_t size;
        v->u.p = PyUnicode_AsUTF8AndSize(o, &size);
        if (v->u.p == NULL)
            return -1;
        if (size > INT_MAX) {
            PyErr_SetString(PyExc_OverflowError, "string longer than INT_MAX bytes");
            return -1;
        }
        v->type = V_TEXT;
        v->size = (int)size;
    } else {
        PyErr_Format(PyExc_TypeError, "a row value of type %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    return 0;
}

static int
bind_value(sqlite3_stmt *stmt, int i, const Value *v)
{
    switch (v->type) {
    case V_NULL: return sqlite3_bind_null(stmt, i);
    case V_INT: return sqlite3_bind_int64(stmt, i, v->u.i);
    case V_FLOAT: return sqlite3_bind_double(stmt, i, v->u.d);
    case V_BLOB: return sqlite3_bind_blob(stmt, i, v->u.p, v->size, SQLITE_STATIC);
    default: return sqlite3_bind_text(stmt, i, v->u.p, v->size, SQLITE_STATIC);
    }
}

/* Read rows [at, at + count) into values; -1 with an exception on a bad row. */
static int
read_batch(PyObject *rows, Py_ssize_t at, Py_ssize_t count, int width, Value *values)
{
    for (Py_ssize_t r = 0; r < count; r++) {
        PyObject *row = PyTuple_GET_ITEM(rows, at + r);
        if (!PyTuple_Check(row)) {
            PyErr_Format(PyExc_TypeError, "row %zd is a %.100s, not a tuple", at + r,
                         Py_TYPE(row)->tp_name);
            return -1;
        }
        if (PyTuple_GET_SIZE(row) != width) {
            PyErr_Format(PyExc_ValueError, "row %zd has %zd values, the statement takes %d",
                         at + r, PyTuple_GET_SIZE(row), width);
            return -1;
        }
        for (int c = 0; c < width; c++) {
            if (read_value(PyTuple_GET_ITEM(row, c), &values[r * width + c]) < 0)
                return -1;
        }
    }
    return 0;
}

/* Bind and step rows already read; SQLITE_DONE, or the first other result. */
static int
step_batch(sqlite3_stmt *stmt, Py_ssize_t count, int width, const Value *values)
{
    for (Py_ssize_t r = 0; r < count; r++) {
        for (int c = 0; c < width; c++) {
            int rc = bind_value(stmt, c + 1, &values[r * width + c]);
            if (rc != SQLITE_OK)
                return rc;
        }
        int rc = sqlite3_step(stmt);
        sqlite3_reset(stmt);
        if (rc != SQLITE_DONE)
            return rc == SQLITE_ROW ? SQLITE_MISUSE : rc;
    }
    return SQLITE_DONE;
}

static PyObject *
executemany(PyObject *module, PyObject *args)
{
    PyObject *conn, *list;
    const char *sql;
    if (!PyArg_ParseTuple(args, "OsO!:executemany", &conn, &sql, &PyList_Type, &list))
        return NULL;
    int is_connection = PyObject_IsInstance(conn, connection_type);
    if (is_connection <= 0) {
        if (is_connection == 0)
            PyErr_SetString(PyExc_TypeError, "conn must be a sqlite3.Connection");
        return NULL;
    }
    sqlite3 *db = ((ConnectionHead *)conn)->db;
    PyObject *programming = PyDict_GetItemString(error_classes, "ProgrammingError");
    if (db == NULL) {
        PyErr_SetString(programming, "Cannot operate on a closed database.");
        return NULL;
    }
    if (sqlite3_get_autocommit(db)) {
        /* each row would be a transaction of its own, and the flush not one */
        PyErr_SetString(programming, "executemany runs inside a transaction only");
        return NULL;
    }
    /* a tuple of the rows: their buffers stay alive while the GIL is away */
    PyObject *rows = PyList_AsTuple(list);
    if (rows == NULL)
        return NULL;
    sqlite3_stmt *stmt;
    int rc = sqlite3_prepare_v2(db, sql, -1, &stmt, NULL);
    if (rc != SQLITE_OK) {
        Py_DECREF(rows);
        return raise_sqlite(db, rc);
    }
    int width = sqlite3_bind_parameter_count(stmt);
    Py_ssize_t n = PyTuple_GET_SIZE(rows);
    Value *values = PyMem_Malloc(sizeof(Value) * BATCH * (width > 0 ? width : 1));
    if (values == NULL) {
        sqlite3_finalize(stmt);
        Py_DECREF(rows);
        return PyErr_NoMemory();
    }
    rc = SQLITE_DONE;
    int bad_row = 0;
    for (Py_ssize_t at = 0; at < n && rc == SQLITE_DONE; at += BATCH) {
        Py_ssize_t count = n - at < BATCH ? n - at : BATCH;
        if (read_batch(rows, at, count, width, values) < 0) {
            bad_row = 1;
            break;
        }
        Py_BEGIN_ALLOW_THREADS
        rc = step_batch(stmt, count, width, values);
        Py_END_ALLOW_THREADS
    }
    PyMem_Free(values);
    Py_DECREF(rows);
    if (!bad_row && rc != SQLITE_DONE)
        raise_sqlite(db, rc);
    sqlite3_finalize(stmt);
    if (bad_row || rc != SQLITE_DONE)
        return NULL;
    Py_RETURN_NONE;
}

/* Does the library this module calls resolve, for sqlite3's own extension
 * module at `path`, to the same sqlite3_libversion? */
static PyObject *
shares_library(PyObject *module, PyObject *args)
{
    const char *path;
    if (!PyArg_ParseTuple(args, "s:shares_library", &path))
        return NULL;
    void *handle = dlopen(path, RTLD_LAZY | RTLD_NOLOAD);
    if (handle == NULL)
        Py_RETURN_FALSE;
    void *theirs = dlsym(handle, "sqlite3_libversion");
    dlclose(handle);
    return PyBool_FromLong(theirs != NULL && theirs == (void *)sqlite3_libversion);
}

static PyMethodDef module_methods[] = {
    {"executemany", executemany, METH_VARARGS,
     "executemany(conn, sql, rows): run sql once per tuple of rows, inside conn's transaction."},
    {"shares_library", shares_library, METH_VARARGS,
     "shares_library(path): does the sqlite3 extension module at path use this SQLite?"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_sqlitefast", NULL, -1, module_methods,
};

PyMODINIT_FUNC
PyInit__sqlitefast(void)
{
    PyObject *sqlite3_module = PyImport_ImportModule("sqlite3");
    if (sqlite3_module == NULL)
        return NULL;
    connection_type = PyObject_GetAttrString(sqlite3_module, "Connection");
    error_classes = PyDict_New();
    static const char *names[] = {
        "IntegrityError", "DataError", "InternalError", "ProgrammingError",
        "OperationalError", "DatabaseError", NULL,
    };
    for (int i = 0; connection_type != NULL && error_classes != NULL && names[i]; i++) {
        PyObject *cls = PyObject_GetAttrString(sqlite3_module, names[i]);
        if (cls == NULL || PyDict_SetItemString(error_classes, names[i], cls) < 0) {
            Py_XDECREF(cls);
            Py_DECREF(sqlite3_module);
            return NULL;
        }
        Py_DECREF(cls);
    }
    Py_DECREF(sqlite3_module);
    if (connection_type == NULL || error_classes == NULL)
        return NULL;
    return PyModule_Create(&module_def);
}
