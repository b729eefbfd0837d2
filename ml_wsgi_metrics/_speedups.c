/* The per-request record of MetricsMiddleware, in C.
 *
 * Behaves exactly like ml_wsgi_metrics._response.PythonTimedResponse (the pure-Python
 * implementation, used when this module is not built); the tests run both. A request costs a
 * Python frame per step there; here start_response, the response iteration, close() and the
 * metric writes run without one. Writes hold the GIL throughout and no other code writes the
 * request metrics' cells, so they need no further lock.
 *
 * A cell is a (store, key) tuple: store[key] += amount adds to a metric value. A store that
 * is a memoryview of doubles (a slot file) is written in place; any other goes through
 * __getitem__/__setitem__ (see ml_wsgi_metrics/_series.py).
 *
 * The contract with the Python side: _speedups.pyi types what this module exports; the
 * docstring of ml_wsgi_metrics/_response.py lists every name read here by string (the
 * INTERN()s at the bottom), and tests/test_speedups.py checks that each exists there.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define KERNEL_X86_64 /* the numeric kernel in SSE2, and in AVX2 when the CPU has it */
#endif

/* Set by configure(): the Python side this record works with. */
static PyObject *storage_state;          /* _slots.State: .generation */
static PyObject *bound_model;            /* the ContextVar of the model a request used */
static PyObject *unmatched;              /* routes.UNMATCHED */
static PyObject *instrumentation_failed; /* f(record, stage, error) */
static PyObject *pass_file_function;     /* f(record, file) -> iterable */
static PyObject *mount_prefix_function;  /* f(mounts, base, script_name) -> prefix */
static PyObject *known_methods;          /* frozenset: the method label's closed set */
static PyObject *other_method;           /* the label of any other method */
static PyObject *request_key;            /* the environ key the record is kept under */

static PyObject *s_generation, *s_cell_generation, *s_refresh, *s_counts, *s_add_status,
    *s_duration, *s_request_size, *s_response_size, *s_in_progress, *s_routes, *s_route_series,
    *s_group_status_codes, *s_count_exception, *s_count_model_request, *s_close, *s_name,
    *s_route, *s_record, *s_status_500, *s_no_start_response, *s_xx, *s_empty,
    *s_request_method, *s_script_name, *s_content_length, *s_file_wrapper, *s_mount_prefixes;

typedef struct {
    PyObject_HEAD
    double start;
    PyObject *metrics;
    PyObject *method;
    PyObject *script_name;
    PyObject *request_length; /* CONTENT_LENGTH as given, parsed when recording */
    PyObject *start_response;
    PyObject *series;    /* NULL until the route is named */
    PyObject *status;    /* NULL: no start_response yet, or an exception (a 500) */
    PyObject *headers;
    PyObject *exception; /* the exception's class name, or NULL */
    PyObject *iterable;  /* NULL once closed */
    PyObject *iterator;  /* NULL until iterated */
    long long response_size;
} Record;

static double
now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* what time.perf_counter() reads on Linux */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* -- cells ------------------------------------------------------------------------------- */

static int
add_to_cell(PyObject *cell, double amount)
{
    if (!PyTuple_Check(cell) || PyTuple_GET_SIZE(cell) != 2) {
        PyErr_SetString(PyExc_TypeError, "a cell is a (store, key) tuple");
        return -1;
    }
    PyObject *store = PyTuple_GET_ITEM(cell, 0), *key = PyTuple_GET_ITEM(cell, 1);
    if (PyMemoryView_Check(store) && PyLong_CheckExact(key)) {
        Py_buffer view;
        if (PyObject_GetBuffer(store, &view, PyBUF_RECORDS) < 0) {
            return -1; /* released: the file was closed */
        }
        Py_ssize_t index = PyLong_AsSsize_t(key);
        int fits = view.itemsize == sizeof(double) && view.format != NULL &&
                   strcmp(view.format, "d") == 0 && index >= 0 &&
                   (index + 1) * (Py_ssize_t)sizeof(double) <= view.len;
        if (fits) {
            ((double *)view.buf)[index] += amount;
        }
        PyBuffer_Release(&view);
        if (fits) {
            return 0;
        }
        if (PyErr_Occurred()) {
            return -1;
        }
    }
    PyObject *value = PyObject_GetItem(store, key);
    if (value == NULL) {
        return -1;
    }
    double stored = PyFloat_AsDouble(value);
    Py_DECREF(value);
    if (stored == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    PyObject *result = PyFloat_FromDouble(stored + amount);
    if (result == NULL) {
        return -1;
    }
    int status = PyObject_SetItem(store, key, result);
    Py_DECREF(result);
    return status;
}

/* The series' cells, taken again if the storage moved since (a fork, a new slot). */
static int
fresh_cells(PyObject *series)
{
    PyObject *current = PyObject_GetAttr(storage_state, s_generation);
    if (current == NULL) {
        return -1;
    }
    PyObject *taken = PyObject_GetAttr(series, s_cell_generation);
    if (taken == NULL) {
        Py_DECREF(current);
        return -1;
    }
    int same = PyObject_RichCompareBool(current, taken, Py_EQ);
    Py_DECREF(current);
    Py_DECREF(taken);
    if (same < 0) {
        return -1;
    }
    if (!same) {
        PyObject *done = PyObject_CallMethodNoArgs(series, s_refresh);
        if (done == NULL) {
            return -1;
        }
        Py_DECREF(done);
    }
    return 0;
}

static int
add_to_series_cell(PyObject *series, PyObject *name, double amount)
{
    PyObject *cell = PyObject_GetAttr(series, name);
    if (cell == NULL) {
        return -1;
    }
    int status = add_to_cell(cell, amount);
    Py_DECREF(cell);
    return status;
}

/* Observe `amount` in a histogram given as (bounds, bucket cells, sum cell). */
static int
observe(PyObject *series, PyObject *name, double amount)
{
    PyObject *histogram = PyObject_GetAttr(series, name);
    if (histogram == NULL) {
        return -1;
    }
    int status = -1;
    if (!PyTuple_Check(histogram) || PyTuple_GET_SIZE(histogram) != 3) {
        PyErr_SetString(PyExc_TypeError, "a histogram is (bounds, buckets, sum)");
        goto done;
    }
    PyObject *bounds = PyTuple_GET_ITEM(histogram, 0);
    PyObject *buckets = PyTuple_GET_ITEM(histogram, 1);
    if (!PyTuple_Check(bounds) || !PyList_Check(buckets)) {
        PyErr_SetString(PyExc_TypeError, "histogram bounds are a tuple, buckets a list");
        goto done;
    }
    Py_ssize_t low = 0, high = PyTuple_GET_SIZE(bounds); /* bisect_left */
    while (low < high) {
        Py_ssize_t middle = (low + high) / 2;
        double bound = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, middle));
        if (bound == -1.0 && PyErr_Occurred()) {
            goto done;
        }
        if (bound < amount) {
            low = middle + 1;
        }
        else {
            high = middle;
        }
    }
    if (low >= PyList_GET_SIZE(buckets)) {
        PyErr_SetString(PyExc_IndexError, "no bucket for the observed value");
        goto done;
    }
    if (add_to_cell(PyTuple_GET_ITEM(histogram, 2), amount) < 0 ||
        add_to_cell(PyList_GET_ITEM(buckets, low), 1.0) < 0) {
        goto done;
    }
    status = 0;
done:
    Py_DECREF(histogram);
    return status;
}

/* RouteSeries.finished(), without its lock (see the top of this file). */
static int
series_finished(PyObject *series, PyObject *status, double duration, long long request_size,
                long long response_size, int was_started)
{
    if (!was_started && fresh_cells(series) < 0) { /* a started request's cells are fresh */
        return -1;
    }
    PyObject *counts = PyObject_GetAttr(series, s_counts);
    if (counts == NULL) {
        return -1;
    }
    PyObject *cell = PyDict_Check(counts) ? PyDict_GetItemWithError(counts, status) : NULL;
    Py_XINCREF(cell);
    Py_DECREF(counts);
    if (cell == NULL) {
        if (PyErr_Occurred()) {
            return -1;
        }
        /* A status first seen: its counter is created in Python, under the storage lock. */
        PyObject *added = PyObject_CallMethodOneArg(series, s_add_status, status);
        if (added == NULL) {
            return -1;
        }
        cell = added;
    }
    int failed = add_to_cell(cell, 1.0) < 0;
    Py_DECREF(cell);
    if (failed || observe(series, s_duration, duration) < 0 ||
        (request_size > 0 && observe(series, s_request_size, (double)request_size) < 0) ||
        observe(series, s_response_size, (double)response_size) < 0 ||
        (was_started && add_to_series_cell(series, s_in_progress, -1.0) < 0)) {
        return -1;
    }
    return 0;
}

/* -- the record ------------------------------------------------------------------------- */

/* Report an instrumentation error (the pending one) through the Python side; clears it. */
static void
report(Record *self, PyObject *stage)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (value != NULL && traceback != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    PyObject *done = PyObject_CallFunctionObjArgs(
        instrumentation_failed, (PyObject *)self, stage, value ? value : Py_None, NULL);
    if (done == NULL) {
        PyErr_WriteUnraisable((PyObject *)self);
    }
    Py_XDECREF(done);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
}

/* The pending exception is the app's: note its class name, as a 500. Keeps it pending. */
static void
note_exception(Record *self)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    if (type != NULL) {
        PyObject *name = PyObject_GetAttr(type, s_name);
        if (name == NULL) {
            PyErr_Clear();
        }
        Py_XSETREF(self->exception, name);
    }
    Py_CLEAR(self->status);
    PyErr_Restore(type, value, traceback);
}

static long long
parse_request_size(PyObject *length)
{
    if (length == NULL || !PyUnicode_Check(length) || PyUnicode_GET_LENGTH(length) == 0) {
        return 0;
    }
    PyObject *number = PyLong_FromUnicodeObject(length, 10);
    if (number == NULL) {
        PyErr_Clear();
        return 0;
    }
    long long size = PyLong_AsLongLong(number);
    Py_DECREF(number);
    if (size == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return size > 0 ? size : 0;
}

static PyObject *
status_label(Record *self)
{
    if (self->status == NULL || !PyUnicode_Check(self->status)) {
        return Py_NewRef(s_status_500);
    }
    PyObject *grouped = PyObject_GetAttr(self->metrics, s_group_status_codes);
    if (grouped == NULL) {
        return NULL;
    }
    int group = PyObject_IsTrue(grouped);
    Py_DECREF(grouped);
    if (group < 0) {
        return NULL;
    }
    Py_ssize_t length = PyUnicode_GET_LENGTH(self->status);
    if (group) {
        PyObject *first = PyUnicode_Substring(self->status, 0, length < 1 ? length : 1);
        if (first == NULL) {
            return NULL;
        }
        PyObject *label = PyUnicode_Concat(first, s_xx);
        Py_DECREF(first);
        return label;
    }
    return PyUnicode_Substring(self->status, 0, length < 3 ? length : 3);
}

/* Record the finished request once. Keeps a pending exception pending; never raises. */
static void
record(Record *self)
{
    double duration = now() - self->start;
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);

    PyObject *series = Py_XNewRef(self->series), *status = NULL;
    int was_started = series != NULL;
    if (series == NULL) {
        series = PyObject_CallMethodObjArgs(self->metrics, s_route_series, self->method,
                                            unmatched, NULL);
        if (series == NULL) {
            goto failed;
        }
    }
    status = status_label(self);
    if (status == NULL) {
        goto failed;
    }
    if (self->status == NULL) {
        PyObject *name = self->exception ? self->exception : s_no_start_response;
        PyObject *done =
            PyObject_CallMethodObjArgs(self->metrics, s_count_exception, series, name, NULL);
        if (done == NULL) {
            goto failed;
        }
        Py_DECREF(done);
    }
    if (series_finished(series, status, duration, parse_request_size(self->request_length),
                        self->response_size, was_started) < 0) {
        goto failed;
    }
    PyObject *model = NULL;
    if (PyContextVar_Get(bound_model, Py_None, &model) < 0) {
        goto failed;
    }
    if (model != Py_None) {
        PyObject *done = PyObject_CallMethodObjArgs(self->metrics, s_count_model_request, series,
                                                    status, model, NULL);
        Py_DECREF(model);
        if (done == NULL) {
            goto failed;
        }
        Py_DECREF(done);
    }
    else {
        Py_DECREF(model);
    }
    goto done;
failed:
    report(self, s_record);
done:
    Py_XDECREF(series);
    Py_XDECREF(status);
    PyErr_Restore(type, value, traceback);
}

/* environ.get(key) as a new reference, or NULL with an error set; `fallback` when absent. */
static PyObject *
environ_get(PyObject *environ, PyObject *key, PyObject *fallback)
{
    PyObject *value = PyDict_Check(environ) ? Py_XNewRef(PyDict_GetItemWithError(environ, key))
                                            : PyObject_GetItem(environ, key);
    if (value == NULL && (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_KeyError))) {
        PyErr_Clear();
        value = Py_XNewRef(fallback);
    }
    return value;
}

static int
Record_init(Record *self, PyObject *args, PyObject *kwargs)
{
    PyObject *metrics, *environ, *start_response;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "TimedResponse takes positional arguments only");
        return -1;
    }
    if (!PyArg_UnpackTuple(args, "TimedResponse", 3, 3, &metrics, &environ, &start_response)) {
        return -1;
    }
    self->start = now();
    PyObject *method = environ_get(environ, s_request_method, s_empty);
    if (method == NULL) {
        return -1;
    }
    int known = PyUnicode_Check(method) ? PySet_Contains(known_methods, method) : 0;
    if (known < 0) {
        Py_DECREF(method);
        return -1;
    }
    if (!known) {
        Py_SETREF(method, Py_NewRef(other_method));
    }
    Py_XSETREF(self->method, method);
    PyObject *script_name = environ_get(environ, s_script_name, s_empty);
    if (script_name == NULL) {
        return -1;
    }
    if (!PyUnicode_Check(script_name)) { /* a broken server's SCRIPT_NAME: no mount point */
        Py_SETREF(script_name, Py_NewRef(s_empty));
    }
    Py_XSETREF(self->script_name, script_name);
    Py_XSETREF(self->request_length, environ_get(environ, s_content_length, Py_None));
    if (self->request_length == NULL) {
        return -1;
    }
    Py_XSETREF(self->metrics, Py_NewRef(metrics));
    Py_XSETREF(self->start_response, Py_NewRef(start_response));
    Py_CLEAR(self->series);
    Py_CLEAR(self->status);
    Py_CLEAR(self->headers);
    Py_CLEAR(self->exception);
    Py_CLEAR(self->iterator);
    Py_XSETREF(self->iterable, PyTuple_New(0));
    self->response_size = 0;
    if (self->iterable == NULL || PyObject_SetItem(environ, request_key, (PyObject *)self) < 0) {
        return -1;
    }
    PyObject *model; /* a model bound by this thread's last request is not this one's */
    if (PyContextVar_Get(bound_model, Py_None, &model) < 0) {
        return -1;
    }
    int bound = model != Py_None;
    Py_DECREF(model);
    if (bound) {
        PyObject *token = PyContextVar_Set(bound_model, Py_None);
        Py_XDECREF(token);
        return token == NULL ? -1 : 0;
    }
    return 0;
}

static PyObject *
Record_respond(Record *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "respond(iterable, environ)");
        return NULL;
    }
    PyObject *file_wrapper = environ_get(args[1], s_file_wrapper, Py_None);
    if (file_wrapper == NULL) {
        return NULL;
    }
    int is_file = file_wrapper != Py_None && (PyObject *)Py_TYPE(args[0]) == file_wrapper;
    Py_DECREF(file_wrapper);
    if (is_file) { /* the server's sendfile: recorded when it closes the file */
        return PyObject_CallFunctionObjArgs(pass_file_function, (PyObject *)self, args[0], NULL);
    }
    Py_XSETREF(self->iterable, Py_NewRef(args[0]));
    return Py_NewRef(self);
}

static PyObject *
Record_start_response(Record *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t nkwargs = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    PyObject *exc_info = nargs == 3 ? args[2] : Py_None;
    int keyword_ok = nkwargs == 0 ||
                     (nkwargs == 1 && nargs == 2 &&
                      PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0),
                                                       "exc_info") == 0);
    if (nargs < 2 || nargs > 3 || !keyword_ok) {
        PyErr_SetString(PyExc_TypeError, "start_response(status, headers, exc_info=None)");
        return NULL;
    }
    if (nkwargs == 1) {
        exc_info = args[2]; /* keyword values follow the positional ones */
    }
    Py_XSETREF(self->status, Py_NewRef(args[0]));
    Py_XSETREF(self->headers, Py_NewRef(args[1]));
    PyObject *call_args[3] = {args[0], args[1], exc_info};
    return PyObject_Vectorcall(self->start_response, call_args, 3, NULL);
}

/* The route label: route, after the known mount prefix of script_name when that is not the
 * SCRIPT_NAME the request arrived with (routes.mount_prefix decides, as in Python). */
static PyObject *
route_label(Record *self, PyObject *route, PyObject *script_name)
{
    int same = script_name == Py_None
                   ? 1
                   : PyObject_RichCompareBool(script_name, self->script_name, Py_EQ);
    if (same != 0) {
        return same < 0 ? NULL : Py_NewRef(route);
    }
    PyObject *mounts = PyObject_GetAttr(self->metrics, s_mount_prefixes);
    if (mounts == NULL) {
        return NULL;
    }
    PyObject *prefix = PyObject_CallFunctionObjArgs(mount_prefix_function, mounts,
                                                    self->script_name, script_name, NULL);
    Py_DECREF(mounts);
    if (prefix == NULL) {
        return NULL;
    }
    PyObject *label = PyUnicode_Concat(prefix, route);
    Py_DECREF(prefix);
    return label;
}

static PyObject *
Record_set_route(Record *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "set_route(route, script_name=None)");
        return NULL;
    }
    if (self->series != NULL) {
        Py_RETURN_NONE;
    }
    if (!PyUnicode_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "a route is a string");
        report(self, s_route);
        Py_RETURN_NONE;
    }
    PyObject *route = route_label(self, args[0], nargs == 2 ? args[1] : Py_None);
    if (route == NULL) {
        report(self, s_route);
        Py_RETURN_NONE;
    }
    PyObject *series = NULL, *routes = PyObject_GetAttr(self->metrics, s_routes);
    if (routes != NULL) {
        PyObject *key = PyTuple_Pack(2, self->method, route);
        if (key != NULL && PyDict_Check(routes)) {
            series = Py_XNewRef(PyDict_GetItemWithError(routes, key));
        }
        Py_XDECREF(key);
        Py_DECREF(routes);
    }
    if (series == NULL && !PyErr_Occurred()) {
        series = PyObject_CallMethodObjArgs(self->metrics, s_route_series, self->method, route,
                                            NULL);
    }
    Py_DECREF(route);
    if (series == NULL || fresh_cells(series) < 0 ||
        add_to_series_cell(series, s_in_progress, 1.0) < 0) {
        Py_XDECREF(series);
        report(self, s_route);
        Py_RETURN_NONE;
    }
    self->series = series;
    Py_RETURN_NONE;
}

static PyObject *
Record_close(Record *self, PyObject *unused)
{
    PyObject *iterable = self->iterable;
    if (iterable == NULL) {
        Py_RETURN_NONE;
    }
    self->iterable = NULL;
    Py_CLEAR(self->iterator);
    int failed = 0;
    PyObject *close = PyObject_GetAttr(iterable, s_close);
    if (close == NULL) {
        failed = !PyErr_ExceptionMatches(PyExc_AttributeError);
        if (!failed) {
            PyErr_Clear();
        }
    }
    else {
        PyObject *done = PyObject_CallNoArgs(close);
        failed = done == NULL;
        Py_XDECREF(done);
        Py_DECREF(close);
    }
    Py_DECREF(iterable);
    if (failed) {
        note_exception(self);
    }
    record(self);
    if (failed) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
Record_failed(Record *self, PyObject *error)
{
    Py_XSETREF(self->exception, PyObject_GetAttr((PyObject *)Py_TYPE(error), s_name));
    if (self->exception == NULL) {
        PyErr_Clear();
    }
    Py_CLEAR(self->status);
    return Record_close(self, NULL);
}

static PyObject *
Record_next(Record *self)
{
    if (self->iterator == NULL) {
        if (self->iterable == NULL) {
            return NULL; /* closed */
        }
        self->iterator = PyObject_GetIter(self->iterable);
        if (self->iterator == NULL) {
            note_exception(self);
            return NULL;
        }
    }
    PyObject *chunk = PyIter_Next(self->iterator);
    if (chunk == NULL) {
        if (PyErr_Occurred()) {
            note_exception(self);
        }
        return NULL;
    }
    Py_ssize_t size = PyBytes_Check(chunk) ? PyBytes_GET_SIZE(chunk) : PyObject_Size(chunk);
    if (size < 0) {
        note_exception(self);
        Py_DECREF(chunk);
        return NULL;
    }
    self->response_size += size;
    return chunk;
}

static int
Record_traverse(Record *self, visitproc visit, void *arg)
{
    Py_VISIT(self->metrics);
    Py_VISIT(self->request_length);
    Py_VISIT(self->start_response);
    Py_VISIT(self->series);
    Py_VISIT(self->status);
    Py_VISIT(self->headers);
    Py_VISIT(self->iterable);
    Py_VISIT(self->iterator);
    return 0;
}

static int
Record_clear(Record *self)
{
    Py_CLEAR(self->metrics);
    Py_CLEAR(self->method);
    Py_CLEAR(self->script_name);
    Py_CLEAR(self->request_length);
    Py_CLEAR(self->start_response);
    Py_CLEAR(self->series);
    Py_CLEAR(self->status);
    Py_CLEAR(self->headers);
    Py_CLEAR(self->exception);
    Py_CLEAR(self->iterable);
    Py_CLEAR(self->iterator);
    return 0;
}

static void
Record_dealloc(Record *self)
{
    PyObject_GC_UnTrack(self);
    Record_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Record_methods[] = {
    {"start_response", (PyCFunction)(void (*)(void))Record_start_response,
     METH_FASTCALL | METH_KEYWORDS,
     "The start_response given to the app: notes the status, passes everything on."},
    {"set_route", (PyCFunction)(void (*)(void))Record_set_route, METH_FASTCALL,
     "set_route(route, script_name=None): name the matched route; first wins."},
    {"failed", (PyCFunction)Record_failed, METH_O,
     "The app raised instead of returning: record now, as a 500."},
    {"respond", (PyCFunction)(void (*)(void))Record_respond, METH_FASTCALL,
     "The iterable to give the server for the app's: this record, or a file wrapper."},
    {"close", (PyCFunction)Record_close, METH_NOARGS,
     "Close the app's iterable, then record the request (once)."},
    {NULL},
};

static PyMemberDef Record_members[] = {
    {"_iterable", T_OBJECT, offsetof(Record, iterable), 0, NULL},
    {"_headers", T_OBJECT, offsetof(Record, headers), READONLY, NULL},
    {"_series", T_OBJECT, offsetof(Record, series), READONLY, NULL},
    {"_metrics", T_OBJECT, offsetof(Record, metrics), READONLY, NULL},
    {"_response_size", T_LONGLONG, offsetof(Record, response_size), 0, NULL},
    {NULL},
};

static PyTypeObject RecordType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ml_wsgi_metrics._speedups.TimedResponse",
    .tp_doc = "One measured request, and the iterable handed back to the server (in C).",
    .tp_basicsize = sizeof(Record),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Record_init,
    .tp_dealloc = (destructor)Record_dealloc,
    .tp_traverse = (traverseproc)Record_traverse,
    .tp_clear = (inquiry)Record_clear,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)Record_next,
    .tp_methods = Record_methods,
    .tp_members = Record_members,
};

/* == model signals: the numeric kernel and bulk slot adds ==================================
 *
 * Used by ml_wsgi_metrics/_recorders.py (NumericBlock and the single-row path) and by
 * ml_wsgi_metrics/_series.py (SlotCells); the pure-Python fallbacks there compute the same
 * numbers. Nothing here reads a Python attribute by name.
 *
 * A block of numeric columns has, per column, the slots [bins (len(edges) + 1)..., missing,
 * out of range, positive sum, negative sum, sum of squares]. A value's bin is bisect_left on
 * its column's edges; NaN and infinities are missing and count nowhere else; out of range is
 * below the column's low or above its high; the sums add one column's values in row order,
 * as numpy's reduction along axis 0 of a C-ordered matrix does (the same doubles).
 *
 * Slots are written through cells (see the top of this file), one list per recorder, taken
 * lazily: a None cell is taken by calling take(value) (None value: a slot not recorded).
 * The caller holds the storage lock; writes hold the GIL throughout, except take().
 */

#define COMPARED_EDGES 16 /* up to this many edges, a value's bin is counted by comparisons */

typedef struct {
    PyObject_HEAD
    Py_ssize_t columns;
    Py_ssize_t slots;
    Py_ssize_t *offsets; /* columns + 1: column j's edges are edges[offsets[j]:offsets[j + 1]] */
    double *edges;
    double *low;
    double *high;
} NumericKernel;

/* The first slot of column j: its bins, then missing, out of range and the three sums. */
#define FIRST_SLOT(kernel, j) ((kernel)->offsets[j] + 6 * (j))

static Py_ssize_t
bisect_left(const double *edges, Py_ssize_t count, double value)
{
    if (count <= COMPARED_EDGES) {
        Py_ssize_t below = 0;
        for (Py_ssize_t i = 0; i < count; i++) {
            below += edges[i] < value;
        }
        return below;
    }
    Py_ssize_t low = 0, high = count;
    while (low < high) {
        Py_ssize_t middle = low + (high - low) / 2;
        if (edges[middle] < value) {
            low = middle + 1;
        }
        else {
            high = middle;
        }
    }
    return low;
}

/* Column j's sums (each in row order), missing and out of range values; returns how many
 * values are +inf. */
static Py_ssize_t
column_sums(const NumericKernel *kernel, Py_ssize_t j, const double *values, Py_ssize_t rows,
            double *extra)
{
    double low = kernel->low[j], high = kernel->high[j];
    double positive = 0.0, negative = 0.0, squares = 0.0;
    Py_ssize_t missing = 0, infinite = 0, outside = 0;
    for (Py_ssize_t i = 0; i < rows; i++) {
        double x = values[i];
        if (!isfinite(x)) {
            missing++;
            infinite += x > 0.0;
            continue;
        }
        outside += (x < low) | (x > high);
        positive += x > 0.0 ? x : 0.0; /* a sum plus zero is the same sum */
        negative -= x > 0.0 ? 0.0 : x;
        squares += x * x;
    }
    extra[0] = (double)missing;
    extra[1] = (double)outside;
    extra[2] = positive;
    extra[3] = negative;
    extra[4] = squares;
    return infinite;
}

#ifdef KERNEL_X86_64
static int has_avx2; /* set when the module is initialised */

/* count_above() of up to four edges in one pass (missing ones: +inf, above which is none). */
__attribute__((target("avx2"))) static void
count_above_four(const double *values, Py_ssize_t rows, const double *edges, Py_ssize_t count,
                 Py_ssize_t *above)
{
    double bound[4];
    for (int t = 0; t < 4; t++) {
        bound[t] = t < count ? edges[t] : Py_HUGE_VAL;
    }
    __m256d e0 = _mm256_set1_pd(bound[0]), e1 = _mm256_set1_pd(bound[1]);
    __m256d e2 = _mm256_set1_pd(bound[2]), e3 = _mm256_set1_pd(bound[3]);
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    Py_ssize_t i = 0;
    for (; i + 4 <= rows; i += 4) { /* a true comparison is -1 in its lane */
        __m256d x = _mm256_loadu_pd(values + i);
        a0 = _mm256_sub_epi64(a0, _mm256_castpd_si256(_mm256_cmp_pd(x, e0, _CMP_GT_OQ)));
        a1 = _mm256_sub_epi64(a1, _mm256_castpd_si256(_mm256_cmp_pd(x, e1, _CMP_GT_OQ)));
        a2 = _mm256_sub_epi64(a2, _mm256_castpd_si256(_mm256_cmp_pd(x, e2, _CMP_GT_OQ)));
        a3 = _mm256_sub_epi64(a3, _mm256_castpd_si256(_mm256_cmp_pd(x, e3, _CMP_GT_OQ)));
    }
    long long lanes[4][4];
    _mm256_storeu_si256((__m256i *)lanes[0], a0);
    _mm256_storeu_si256((__m256i *)lanes[1], a1);
    _mm256_storeu_si256((__m256i *)lanes[2], a2);
    _mm256_storeu_si256((__m256i *)lanes[3], a3);
    for (Py_ssize_t t = 0; t < count && t < 4; t++) {
        above[t] = (Py_ssize_t)(lanes[t][0] + lanes[t][1] + lanes[t][2] + lanes[t][3]);
        for (Py_ssize_t k = i; k < rows; k++) {
            above[t] += values[k] > bound[t];
        }
    }
}
#endif

/* How many values are above `edge` (NaN never is). */
static Py_ssize_t
count_above_one(const double *values, Py_ssize_t rows, double edge)
{
    Py_ssize_t i = 0, total = 0;
#ifdef KERNEL_X86_64
    __m128i above = _mm_setzero_si128();
    __m128d bound = _mm_set1_pd(edge);
    for (; i + 2 <= rows; i += 2) {
        __m128d greater = _mm_cmpgt_pd(_mm_loadu_pd(values + i), bound);
        above = _mm_sub_epi64(above, _mm_castpd_si128(greater));
    }
    long long lanes[2];
    _mm_storeu_si128((__m128i *)lanes, above);
    total = (Py_ssize_t)(lanes[0] + lanes[1]);
#endif
    for (; i < rows; i++) {
        total += values[i] > edge;
    }
    return total;
}

/* above[t]: how many values are above edges[t], for each of `count` edges. */
static void
count_above(const double *values, Py_ssize_t rows, const double *edges, Py_ssize_t count,
            Py_ssize_t *above)
{
#ifdef KERNEL_X86_64
    if (has_avx2) {
        for (Py_ssize_t t = 0; t < count; t += 4) {
            count_above_four(values, rows, edges + t, count - t, above + t);
        }
        return;
    }
#endif
    for (Py_ssize_t t = 0; t < count; t++) {
        above[t] = count_above_one(values, rows, edges[t]);
    }
}

/* Column j's bins: by comparisons with each edge when there are few (a pass per edge, no
 * branch), else by bisection. `finite` and `infinite` count its finite and +inf values. */
static void
column_bins(const NumericKernel *kernel, Py_ssize_t j, const double *values, Py_ssize_t rows,
            double finite, Py_ssize_t infinite, double *bins)
{
    const double *edges = kernel->edges + kernel->offsets[j];
    Py_ssize_t count = kernel->offsets[j + 1] - kernel->offsets[j];
    if (count <= COMPARED_EDGES) {
        Py_ssize_t counted[COMPARED_EDGES];
        count_above(values, rows, edges, count, counted);
        double previous = finite; /* values in bins from b on: those above edge b - 1 */
        for (Py_ssize_t b = 0; b < count; b++) {
            double above = (double)(counted[b] - infinite);
            if (!isfinite(edges[b])) { /* +inf: none above; -inf: all finite ones */
                above = edges[b] > 0 ? 0.0 : previous;
            }
            bins[b] = previous - above;
            previous = above;
        }
        bins[count] = previous;
        return;
    }
    for (Py_ssize_t b = 0; b <= count; b++) {
        bins[b] = 0.0;
    }
    for (Py_ssize_t i = 0; i < rows; i++) {
        if (isfinite(values[i])) {
            bins[bisect_left(edges, count, values[i])] += 1.0;
        }
    }
}

#ifdef KERNEL_X86_64
/* column_sums() of columns j to j + 3 at once, a column per lane (each sum still in row order);
 * `matrix` points at column j's first value. */
__attribute__((target("avx2"))) static void
four_column_sums(const NumericKernel *kernel, Py_ssize_t j, const char *matrix, Py_ssize_t rows,
                 Py_ssize_t row_stride, Py_ssize_t column_stride, double *out,
                 Py_ssize_t *infinite)
{
    const __m256d zero = _mm256_setzero_pd(), largest = _mm256_set1_pd(DBL_MAX);
    const __m256d sign = _mm256_set1_pd(-0.0);
    const __m256d low = _mm256_loadu_pd(kernel->low + j), high = _mm256_loadu_pd(kernel->high + j);
    __m256d positive = zero, negative = zero, squares = zero;
    __m256i finite_count = _mm256_setzero_si256(), outside = finite_count, above = finite_count;
    const Py_ssize_t c = column_stride;
    for (Py_ssize_t i = 0; i < rows; i++) {
        const char *row = matrix + i * row_stride;
        __m256d x = c == sizeof(double)
                        ? _mm256_loadu_pd((const double *)row)
                        : _mm256_set_pd(*(const double *)(row + 3 * c),
                                        *(const double *)(row + 2 * c),
                                        *(const double *)(row + c), *(const double *)row);
        /* lanes of comparisons are all ones when true: subtracting them counts */
        __m256d finite = _mm256_cmp_pd(_mm256_andnot_pd(sign, x), largest, _CMP_LE_OQ);
        __m256d v = _mm256_and_pd(x, finite); /* missing values add zero */
        __m256d out_of_range = _mm256_and_pd(
            finite, _mm256_or_pd(_mm256_cmp_pd(v, low, _CMP_LT_OQ),
                                 _mm256_cmp_pd(v, high, _CMP_GT_OQ)));
        finite_count = _mm256_sub_epi64(finite_count, _mm256_castpd_si256(finite));
        outside = _mm256_sub_epi64(outside, _mm256_castpd_si256(out_of_range));
        above = _mm256_sub_epi64(
            above, _mm256_castpd_si256(_mm256_cmp_pd(x, largest, _CMP_GT_OQ)));
        positive = _mm256_add_pd(positive, _mm256_max_pd(v, zero));
        negative = _mm256_sub_pd(negative, _mm256_min_pd(v, zero));
        squares = _mm256_add_pd(squares, _mm256_mul_pd(v, v));
    }
    double sums[3][4];
    long long counts[3][4];
    _mm256_storeu_pd(sums[0], positive);
    _mm256_storeu_pd(sums[1], negative);
    _mm256_storeu_pd(sums[2], squares);
    _mm256_storeu_si256((__m256i *)counts[0], finite_count);
    _mm256_storeu_si256((__m256i *)counts[1], outside);
    _mm256_storeu_si256((__m256i *)counts[2], above);
    for (int lane = 0; lane < 4; lane++) {
        Py_ssize_t column = j + lane;
        double *extra = out + FIRST_SLOT(kernel, column) + kernel->offsets[column + 1] -
                        kernel->offsets[column] + 1;
        extra[0] = (double)(rows - counts[0][lane]);
        extra[1] = (double)counts[1][lane];
        extra[2] = sums[0][lane];
        extra[3] = sums[1][lane];
        extra[4] = sums[2][lane];
        infinite[column] = (Py_ssize_t)counts[2][lane];
    }
}
#endif

/* Write every slot of a (rows, columns) matrix whose values are `row_stride` and
 * `column_stride` bytes apart. `scratch` holds a column (used when a column is not
 * contiguous) and `infinite` a count per column. */
static void
block_amounts(const NumericKernel *kernel, const char *matrix, Py_ssize_t rows,
              Py_ssize_t row_stride, Py_ssize_t column_stride, double *scratch,
              Py_ssize_t *infinite, double *out)
{
    Py_ssize_t summed = 0; /* columns whose sums are done */
#ifdef KERNEL_X86_64
    for (; has_avx2 && summed + 4 <= kernel->columns; summed += 4) {
        four_column_sums(kernel, summed, matrix + summed * column_stride, rows, row_stride,
                         column_stride, out, infinite);
    }
#endif
    for (Py_ssize_t j = 0; j < kernel->columns; j++) {
        const char *column = matrix + j * column_stride;
        const double *values = (const double *)column;
        if (row_stride != sizeof(double)) {
            for (Py_ssize_t i = 0; i < rows; i++) {
                scratch[i] = *(const double *)(column + i * row_stride);
            }
            values = scratch;
        }
        double *bins = out + FIRST_SLOT(kernel, j);
        double *extra = bins + kernel->offsets[j + 1] - kernel->offsets[j] + 1;
        if (j >= summed) {
            infinite[j] = column_sums(kernel, j, values, rows, extra);
        }
        column_bins(kernel, j, values, rows, (double)rows - extra[0], infinite[j], bins);
    }
}

/* A buffer of doubles (any strides): what a float64 numpy array exports. */
static int
get_doubles(PyObject *object, Py_buffer *view, int flags, int ndim, const char *what)
{
    if (PyObject_GetBuffer(object, view, flags | PyBUF_FORMAT | PyBUF_STRIDES) < 0) {
        return -1;
    }
    if (view->ndim != ndim || view->itemsize != sizeof(double) || view->format == NULL ||
        strcmp(view->format, "d") != 0) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "%s: a %d-dimensional array of float64", what, ndim);
        return -1;
    }
    return 0;
}

/* -- writing slots through cells -- */

typedef struct {
    Py_buffer view; /* the store last written in place; view.obj NULL when none is held */
} StoreCache;

static void
release_store(StoreCache *cache)
{
    if (cache->view.obj != NULL) {
        PyBuffer_Release(&cache->view);
        cache->view.obj = NULL;
    }
}

/* store[key] += amount for a dict (prometheus_client's in-memory value's attributes). */
static int
add_to_dict(PyObject *store, PyObject *key, double amount)
{
    PyObject *stored = PyDict_GetItemWithError(store, key); /* borrowed */
    if (stored == NULL || !PyFloat_CheckExact(stored)) {
        if (PyErr_Occurred()) {
            return -1;
        }
        PyObject *cell = PyTuple_Pack(2, store, key);
        int status = cell == NULL ? -1 : add_to_cell(cell, amount);
        Py_XDECREF(cell);
        return status;
    }
    PyObject *sum = PyFloat_FromDouble(PyFloat_AS_DOUBLE(stored) + amount);
    if (sum == NULL) {
        return -1;
    }
    int status = PyDict_SetItem(store, key, sum);
    Py_DECREF(sum);
    return status;
}

/* cells[index], taken first when it is None: a new reference, or NULL (an error set, or
 * none when the slot is not recorded). */
static PyObject *
slot_cell(StoreCache *cache, PyObject *cells, PyObject *values, PyObject *take,
          Py_ssize_t index)
{
    PyObject *cell = PyList_GET_ITEM(cells, index);
    if (cell != Py_None) {
        return Py_NewRef(cell);
    }
    PyObject *value = PyList_GET_ITEM(values, index);
    if (value == Py_None) {
        return NULL; /* a slot not recorded */
    }
    release_store(cache); /* take() runs Python code, which may close a file */
    Py_INCREF(value);
    cell = PyObject_CallOneArg(take, value);
    Py_DECREF(value);
    if (cell != NULL && index >= PyList_GET_SIZE(cells)) {
        Py_CLEAR(cell);
        PyErr_SetString(PyExc_RuntimeError, "the cells changed while a cell was taken");
    }
    if (cell != NULL) {
        PyList_SetItem(cells, index, Py_NewRef(cell)); /* steals one reference */
    }
    return cell;
}

/* Add to cells[index], taking the cell first when it is None, and once more when its file
 * was closed under it (take() reopens the value: see _series.take_cell). */
static int
add_to_slot(StoreCache *cache, PyObject *cells, PyObject *values, PyObject *take,
            Py_ssize_t index, double amount)
{
    for (int attempt = 0;; attempt++) {
        PyObject *cell = slot_cell(cache, cells, values, take, index);
        if (cell == NULL) {
            return PyErr_Occurred() ? -1 : 0;
        }
        int status = 0;
        if (!PyTuple_Check(cell) || PyTuple_GET_SIZE(cell) != 2) {
            PyErr_SetString(PyExc_TypeError, "a cell is a (store, key) tuple");
            status = -1;
        }
        else if (PyDict_CheckExact(PyTuple_GET_ITEM(cell, 0))) {
            status = add_to_dict(PyTuple_GET_ITEM(cell, 0), PyTuple_GET_ITEM(cell, 1), amount);
        }
        else if (!PyMemoryView_Check(PyTuple_GET_ITEM(cell, 0)) ||
                 !PyLong_CheckExact(PyTuple_GET_ITEM(cell, 1))) {
            status = add_to_cell(cell, amount);
        }
        else {
            PyObject *store = PyTuple_GET_ITEM(cell, 0);
            if (cache->view.obj != store) {
                release_store(cache);
                if (get_doubles(store, &cache->view, PyBUF_WRITABLE, 1, "a store") < 0) {
                    cache->view.obj = NULL;
                    status = -1;
                }
            }
            Py_ssize_t at = status < 0 ? -1 : PyLong_AsSsize_t(PyTuple_GET_ITEM(cell, 1));
            if (at >= 0 && at < cache->view.shape[0]) {
                *(double *)((char *)cache->view.buf + at * cache->view.strides[0]) += amount;
            }
            else if (status == 0) {
                if (!PyErr_Occurred()) {
                    PyErr_SetString(PyExc_IndexError, "a cell's key is outside its store");
                }
                status = -1;
            }
        }
        Py_DECREF(cell);
        if (status == 0 || attempt > 0 || !PyErr_ExceptionMatches(PyExc_ValueError)) {
            return status;
        }
        PyErr_Clear(); /* a released view: its file was closed, the cell is taken again */
        PyList_SetItem(cells, index, Py_NewRef(Py_None));
    }
}

static int
check_cells(PyObject *cells, PyObject *values, PyObject *take, Py_ssize_t slots)
{
    if (!PyList_CheckExact(cells) || !PyList_CheckExact(values) || !PyCallable_Check(take) ||
        PyList_GET_SIZE(cells) != slots || PyList_GET_SIZE(values) != slots) {
        PyErr_Format(PyExc_TypeError, "cells and values: two lists of %zd, take: a callable",
                     slots);
        return -1;
    }
    return 0;
}

/* add_amounts(cells, values, take, amounts): add each non-zero amount to its slot. */
static PyObject *
add_amounts(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "add_amounts(cells, values, take, amounts)");
        return NULL;
    }
    Py_buffer amounts;
    if (get_doubles(args[3], &amounts, PyBUF_SIMPLE, 1, "amounts") < 0) {
        return NULL;
    }
    int failed = check_cells(args[0], args[1], args[2], amounts.shape[0]) < 0;
    StoreCache cache = {.view = {.obj = NULL}};
    for (Py_ssize_t i = 0; !failed && i < amounts.shape[0]; i++) {
        double amount = *(const double *)((const char *)amounts.buf + i * amounts.strides[0]);
        if (amount != 0.0) {
            failed = add_to_slot(&cache, args[0], args[1], args[2], i, amount) < 0;
        }
    }
    release_store(&cache);
    PyBuffer_Release(&amounts);
    if (failed) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* -- the kernel type -- */

/* Copy each column's edges (sorted, no NaN), low and high into the kernel's arrays. */
static int
read_columns(NumericKernel *self, PyObject *columns, PyObject *lows, PyObject *highs,
             Py_ssize_t total)
{
    for (Py_ssize_t j = 0, at = 0; j < PySequence_Fast_GET_SIZE(columns); j++) {
        PyObject *column = PySequence_Fast(PySequence_Fast_GET_ITEM(columns, j), "edges");
        if (column == NULL) {
            return -1;
        }
        Py_ssize_t size = PySequence_Fast_GET_SIZE(column), first = at;
        for (Py_ssize_t i = 0; i < size && at < total; i++) {
            self->edges[at++] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(column, i));
        }
        Py_DECREF(column);
        self->offsets[j + 1] = at;
        self->low[j] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(lows, j));
        self->high[j] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(highs, j));
        if (PyErr_Occurred()) {
            return -1;
        }
        for (Py_ssize_t i = first; i < at; i++) {
            if (isnan(self->edges[i]) || (i > first && self->edges[i] < self->edges[i - 1])) {
                PyErr_SetString(PyExc_ValueError, "edges: sorted, without NaN");
                return -1;
            }
        }
    }
    return 0;
}

static int
NumericKernel_init(NumericKernel *self, PyObject *args, PyObject *kwargs)
{
    PyObject *edges, *low, *high;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "NumericKernel takes positional arguments only");
        return -1;
    }
    if (!PyArg_UnpackTuple(args, "NumericKernel", 3, 3, &edges, &low, &high) ||
        self->offsets != NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "NumericKernel is initialised once");
        }
        return -1;
    }
    int status = -1;
    PyObject *columns = PySequence_Fast(edges, "edges: a sequence of sequences of floats");
    PyObject *lows = PySequence_Fast(low, "low: a sequence of floats");
    PyObject *highs = PySequence_Fast(high, "high: a sequence of floats");
    if (columns == NULL || lows == NULL || highs == NULL) {
        goto done;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(columns), total = 0;
    if (PySequence_Fast_GET_SIZE(lows) != count || PySequence_Fast_GET_SIZE(highs) != count) {
        PyErr_SetString(PyExc_ValueError, "edges, low and high: one item per column");
        goto done;
    }
    for (Py_ssize_t j = 0; j < count; j++) {
        Py_ssize_t size = PyObject_Length(PySequence_Fast_GET_ITEM(columns, j));
        if (size < 0) {
            goto done;
        }
        total += size;
    }
    self->offsets = PyMem_Calloc(count + 1, sizeof(Py_ssize_t));
    self->edges = PyMem_Calloc(total + 1, sizeof(double));
    self->low = PyMem_Calloc(count + 1, sizeof(double));
    self->high = PyMem_Calloc(count + 1, sizeof(double));
    if (!self->offsets || !self->edges || !self->low || !self->high) {
        PyErr_NoMemory();
        goto done;
    }
    if (read_columns(self, columns, lows, highs, total) < 0) {
        goto done;
    }
    self->columns = count;
    self->slots = self->offsets[count] + 6 * count;
    status = 0;
done:
    Py_XDECREF(columns);
    Py_XDECREF(lows);
    Py_XDECREF(highs);
    return status;
}

static PyObject *
NumericKernel_amounts(NumericKernel *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "amounts(matrix, out)");
        return NULL;
    }
    Py_buffer matrix, out;
    if (get_doubles(args[0], &matrix, PyBUF_SIMPLE, 2, "matrix") < 0) {
        return NULL;
    }
    if (get_doubles(args[1], &out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS, 1, "out") < 0) {
        PyBuffer_Release(&matrix);
        return NULL;
    }
    int fits = matrix.shape[1] == self->columns && out.shape[0] == self->slots;
    double *scratch = NULL;
    Py_ssize_t *infinite = NULL;
    if (!fits) {
        PyErr_Format(PyExc_ValueError, "amounts: a matrix of %zd columns and %zd slots out",
                     self->columns, self->slots);
    }
    else {
        infinite = PyMem_Malloc((self->columns + 1) * sizeof(Py_ssize_t));
        scratch = PyMem_Malloc((matrix.shape[0] + 1) * sizeof(double));
        fits = infinite != NULL && scratch != NULL;
        if (!fits) {
            PyErr_NoMemory();
        }
    }
    if (fits) {
        block_amounts(self, matrix.buf, matrix.shape[0], matrix.strides[0], matrix.strides[1],
                      scratch, infinite, (double *)out.buf);
    }
    PyMem_Free(scratch);
    PyMem_Free(infinite);
    PyBuffer_Release(&matrix);
    PyBuffer_Release(&out);
    if (!fits) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* row.get(name): a new reference, NULL when absent (or with an error set). */
static PyObject *
row_get(PyObject *row, PyObject *name)
{
    if (PyDict_Check(row)) {
        return Py_XNewRef(PyDict_GetItemWithError(row, name));
    }
    PyObject *item = PyObject_GetItem(row, name);
    if (item == NULL && PyErr_ExceptionMatches(PyExc_KeyError)) {
        PyErr_Clear();
    }
    return item;
}

/* row.get(name) as a float, as _inputs.to_float reads it: anything not a number is NaN. */
static int
row_value(PyObject *row, PyObject *name, double *value)
{
    PyObject *item = row_get(row, name);
    if (item == NULL) {
        *value = Py_NAN;
        return PyErr_Occurred() ? -1 : 0;
    }
    PyObject *number = PyFloat_CheckExact(item) ? Py_NewRef(item) : PyNumber_Float(item);
    Py_DECREF(item);
    if (number == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError) &&
            !PyErr_ExceptionMatches(PyExc_ValueError)) {
            return -1;
        }
        PyErr_Clear();
        *value = Py_NAN;
        return 0;
    }
    *value = PyFloat_AS_DOUBLE(number);
    Py_DECREF(number);
    return 0;
}

/* The non-zero slots one value adds to, as (slot, amount) pairs; returns their number. */
static int
value_slots(const NumericKernel *self, Py_ssize_t j, double x, Py_ssize_t *slots,
            double *amounts)
{
    Py_ssize_t first = FIRST_SLOT(self, j), count = self->offsets[j + 1] - self->offsets[j];
    Py_ssize_t missing = first + count + 1;
    if (!isfinite(x)) {
        slots[0] = missing, amounts[0] = 1.0;
        return 1;
    }
    int n = 0;
    slots[n] = first + bisect_left(self->edges + self->offsets[j], count, x), amounts[n++] = 1.0;
    if (x < self->low[j] || x > self->high[j]) {
        slots[n] = missing + 1, amounts[n++] = 1.0;
    }
    if (x != 0.0) {
        slots[n] = x > 0.0 ? missing + 2 : missing + 3, amounts[n++] = x > 0.0 ? x : -x;
        slots[n] = missing + 4, amounts[n++] = x * x;
    }
    return n;
}

/* add_row(row, names, cells, values, take): record one row, a mapping of the column names. */
static PyObject *
NumericKernel_add_row(NumericKernel *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "add_row(row, names, cells, values, take)");
        return NULL;
    }
    PyObject *row = args[0], *names = args[1];
    if (!PyList_CheckExact(names) || PyList_GET_SIZE(names) != self->columns) {
        PyErr_Format(PyExc_TypeError, "names: a list of %zd names", self->columns);
        return NULL;
    }
    if (check_cells(args[2], args[3], args[4], self->slots) < 0) {
        return NULL;
    }
    double *row_values = PyMem_Malloc((self->columns + 1) * sizeof(double));
    if (row_values == NULL) {
        return PyErr_NoMemory();
    }
    int failed = 0; /* every value read first: a bad row raises before anything counts */
    for (Py_ssize_t j = 0; !failed && j < self->columns; j++) {
        failed = row_value(row, PyList_GET_ITEM(names, j), &row_values[j]) < 0;
    }
    StoreCache cache = {.view = {.obj = NULL}};
    for (Py_ssize_t j = 0; !failed && j < self->columns; j++) {
        Py_ssize_t slots[4];
        double amounts[4];
        int count = value_slots(self, j, row_values[j], slots, amounts);
        for (int i = 0; !failed && i < count; i++) {
            failed = add_to_slot(&cache, args[2], args[3], args[4], slots[i], amounts[i]) < 0;
        }
    }
    release_store(&cache);
    PyMem_Free(row_values);
    if (failed) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static void
NumericKernel_dealloc(NumericKernel *self)
{
    PyMem_Free(self->offsets);
    PyMem_Free(self->edges);
    PyMem_Free(self->low);
    PyMem_Free(self->high);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef NumericKernel_methods[] = {
    {"amounts", (PyCFunction)(void (*)(void))NumericKernel_amounts, METH_FASTCALL,
     "amounts(matrix, out): write each slot's amount for a (rows, columns) float64 matrix."},
    {"add_row", (PyCFunction)(void (*)(void))NumericKernel_add_row, METH_FASTCALL,
     "add_row(row, names, cells, values, take): add one row's amounts to the slots."},
    {NULL},
};

static PyMemberDef NumericKernel_members[] = {
    {"slots", T_PYSSIZET, offsetof(NumericKernel, slots), READONLY, NULL},
    {NULL},
};

static PyTypeObject NumericKernelType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ml_wsgi_metrics._speedups.NumericKernel",
    .tp_doc = "NumericKernel(edges, low, high): the slot amounts of a block of numeric columns.",
    .tp_basicsize = sizeof(NumericKernel),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)NumericKernel_init,
    .tp_dealloc = (destructor)NumericKernel_dealloc,
    .tp_methods = NumericKernel_methods,
    .tp_members = NumericKernel_members,
};

/* use_avx2(enabled): the kernel's AVX2 code on or off (on only when the CPU has it); returns
 * whether it was on. For tests of the code every CPU runs. */
static PyObject *
use_avx2(PyObject *module, PyObject *enabled)
{
    int on = PyObject_IsTrue(enabled);
    if (on < 0) {
        return NULL;
    }
#ifdef KERNEL_X86_64
    int was = has_avx2;
    has_avx2 = on && __builtin_cpu_supports("avx2");
    return PyBool_FromLong(was);
#else
    Py_RETURN_FALSE;
#endif
}

/* -- one row's categorical columns -- */

/* The code of row[name] in a vocabulary: an exact string found there, else code(value). */
static Py_ssize_t
category_code(PyObject *row, PyObject *name, PyObject *vocabulary, PyObject *code)
{
    PyObject *item = row_get(row, name);
    if (item == NULL && PyErr_Occurred()) {
        return -1;
    }
    item = item == NULL ? Py_NewRef(Py_None) : item;
    PyObject *found = PyUnicode_CheckExact(item) ? PyDict_GetItemWithError(vocabulary, item)
                                                 : NULL; /* borrowed */
    PyObject *result = found != NULL ? Py_NewRef(found)
                       : PyErr_Occurred() ? NULL
                                          : PyObject_CallOneArg(code, item);
    Py_DECREF(item);
    if (result == NULL) {
        return -1;
    }
    Py_ssize_t index = PyLong_Check(result) ? PyLong_AsSsize_t(result) : -1;
    Py_DECREF(result);
    if (index < 0 || index > PyDict_GET_SIZE(vocabulary) + 1) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "a category code outside its column's slots");
        }
        return -1;
    }
    return index;
}

/* add_categories(row, names, vocabularies, codes, firsts, cells, values, take): count one row
 * of categorical columns. Column j's slots start at firsts[j]: [categories..., unseen bin,
 * missing, unseen]; an unseen value counts in its bin and in the unseen counter. */
static PyObject *
add_categories(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "add_categories(row, names, vocabularies, codes, firsts, cells, values, "
                        "take)");
        return NULL;
    }
    PyObject *names = args[1], *vocabularies = args[2], *codes = args[3], *firsts = args[4];
    if (!PyList_CheckExact(names) || !PyList_CheckExact(vocabularies) ||
        !PyList_CheckExact(codes) || !PyList_CheckExact(firsts) ||
        PyList_GET_SIZE(vocabularies) != PyList_GET_SIZE(names) ||
        PyList_GET_SIZE(codes) != PyList_GET_SIZE(names) ||
        PyList_GET_SIZE(firsts) != PyList_GET_SIZE(names) || !PyList_CheckExact(args[5])) {
        PyErr_SetString(PyExc_TypeError, "names, vocabularies, codes, firsts: lists alike");
        return NULL;
    }
    Py_ssize_t columns = PyList_GET_SIZE(names), slots = PyList_GET_SIZE(args[5]);
    if (check_cells(args[5], args[6], args[7], slots) < 0) {
        return NULL;
    }
    Py_ssize_t *at = PyMem_Malloc((2 * columns + 1) * sizeof(Py_ssize_t));
    if (at == NULL) {
        return PyErr_NoMemory();
    }
    int failed = 0; /* every code found first: a bad row raises before anything counts */
    for (Py_ssize_t j = 0; !failed && j < columns; j++) {
        PyObject *vocabulary = PyList_GET_ITEM(vocabularies, j);
        Py_ssize_t first = PyLong_AsSsize_t(PyList_GET_ITEM(firsts, j));
        Py_ssize_t code = PyDict_Check(vocabulary)
                              ? category_code(args[0], PyList_GET_ITEM(names, j), vocabulary,
                                              PyList_GET_ITEM(codes, j))
                              : -1;
        Py_ssize_t unseen = PyDict_Check(vocabulary) ? PyDict_GET_SIZE(vocabulary) : 0;
        failed = code < 0 || first < 0 || first + unseen + 2 >= slots;
        if (failed && !PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "a column's slots outside the cells");
        }
        at[2 * j] = first + code;
        at[2 * j + 1] = code == unseen ? first + unseen + 2 : -1;
    }
    StoreCache cache = {.view = {.obj = NULL}};
    for (Py_ssize_t i = 0; !failed && i < 2 * columns; i++) {
        if (at[i] >= 0) {
            failed = add_to_slot(&cache, args[5], args[6], args[7], at[i], 1.0) < 0;
        }
    }
    release_store(&cache);
    PyMem_Free(at);
    if (failed) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* == end of model signals ================================================================== */

/* -- categorical counts (model signals' batch path) --------------------------------------
 *
 * A categorical column is counted per slot [categories..., unseen, missing], each value where
 * code(value) puts it (the single-row rule, CategoricalSeries.code), without hashing each
 * value: pandas and JSON hand over a fresh str object per row, and hashing it costs more than
 * comparing it. A CategoryTable (made once per column) keys its categories by length, kind and
 * last character; an exact str is compared with the candidates of its bucket by length, kind
 * and bytes (str equality: compact strings of equal text have equal kind and bytes). None and
 * float NaN are missing; any other value (str subclasses, numbers, bytes, pandas' NA...) goes
 * to code(value). The values are a list, a tuple, or an array of objects read through the
 * buffer protocol (numpy's dtype=object: no list is made); anything else is made a list first.
 *
 * A compact ASCII str, the common case, is found by its length instead (LengthEntry, below):
 * the per-value loop is what a batch's recording costs most, so it has no branch on the text
 * and reads only a few words of the object.
 *
 * CategoryCounter(vocabularies) holds one table per column, made when the model is
 * registered; its amounts() counts every column of a batch in one call.
 * count_categories(values, categories, code) counts one column with a table made for the call.
 */

typedef struct {
    Py_ssize_t length;
    int kind;
    const char *data;
    Py_ssize_t next; /* the next category in the same bucket, or -1 */
} Category;

/* A compact ASCII value of ``length`` characters (0-63) is found in the entry of that length:
 * entries[length + ((last >> sub_shift) & sub_mask) * LENGTHS], ``last`` its last 8 bytes, a
 * few bits of which choose among the categories of that length when several have it (sub_mask
 * 0 when none shares its length with another); by a hash of its length and last word when
 * SUB_BITS_MAX bits do not set them apart (slower: the entry waits for the word and the hash).
 * The entry holds what the value's words must be (LENGTH_WORDS of them, read where word_from says, cover every byte of a text of up to 32;
 * past 32, ``rest`` the others): the value is the entry's category when they all are, unseen
 * otherwise. The columns' values mix lengths at random ("No", "Yes", "No internet service"):
 * no branch depends on the length or the text, and the words are read from the length alone,
 * without waiting for the entry. Every word read is inside the object: a word of a text
 * shorter than 8 bytes starts in the object's header, whose bytes ``keep`` leaves out. */
#define LENGTHS 64
#define LENGTH_WORDS 4
#define SUB_BITS_MAX 4 /* at most 16 entries per length (64 KiB per column) */

typedef struct {
    uint64_t words[LENGTH_WORDS]; /* the category's words (word_from) */
    uint64_t keep;                /* the bits compared (0: any value of this length is unseen) */
    Py_ssize_t slot;              /* the category's slot, or unseen */
    const char *rest;             /* the bytes after the first 24 of a category over 32 */
    Py_ssize_t length;            /* the category's length (-1: none; 64 bytes in all) */
} LengthEntry;

typedef struct {
    PyObject *texts;        /* the tuple of categories (holds their data) */
    LengthEntry *lengths;   /* LENGTHS << sub bits, or by hash (NULL: text_slot counts ASCII) */
    int sub_shift;
    uint64_t sub_mask;
    int hash_shift; /* entries by hash (hashed_entry) when not 0 */
    uint64_t hash_factor;
    int words; /* the words the longest category needs (1 up to 8 characters ... 4 past 24) */
    Category *categories;
    Py_ssize_t known;    /* slots: the categories, then unseen (known), missing (known + 1) */
    Py_ssize_t *buckets; /* the first category of each bucket, or -1 */
    size_t mask;         /* buckets - 1 */
} CategoryTable;

typedef struct {
    const CategoryTable *table;
    PyObject *code;     /* code(value) -> slot, for values other than str, None and NaN */
    Py_ssize_t *counts; /* per slot */
} SlotCounts;

static inline size_t
category_bucket(Py_ssize_t length, int kind, Py_UCS4 last, size_t mask)
{
    size_t key = ((size_t)length * 31u + (size_t)kind) * 131u + last;
    return (key ^ (key >> 11)) & mask;
}

static int
ready_text(PyObject *text)
{
#if PY_VERSION_HEX < 0x030C0000
    return PyUnicode_READY(text);
#else
    return 0;
#endif
}

/* Whether two runs of ``size`` bytes are equal: memcmp, inlined (a library call per row
 * for texts of a few bytes). */
static inline int
same_bytes(const char *a, const char *b, size_t size)
{
    uint64_t x, y;
    uint32_t u, v;
    if (size >= 8) {
        for (size_t at = 0; at + 8 < size; at += 8) {
            memcpy(&x, a + at, 8);
            memcpy(&y, b + at, 8);
            if (x != y) {
                return 0;
            }
        }
        memcpy(&x, a + size - 8, 8); /* the last 8 bytes, overlapping the loop's */
        memcpy(&y, b + size - 8, 8);
        return x == y;
    }
    if (size >= 4) {
        uint32_t s, t;
        memcpy(&u, a, 4);
        memcpy(&v, b, 4);
        memcpy(&s, a + size - 4, 4); /* the last 4 bytes, overlapping */
        memcpy(&t, b + size - 4, 4);
        return u == v && s == t;
    }
    for (size_t at = 0; at < size; at++) {
        if (a[at] != b[at]) {
            return 0;
        }
    }
    return 1;
}

/* The slot of a text of ``length`` characters of ``kind`` bytes each: its category's index,
 * or unseen. */
static inline Py_ssize_t
text_slot(const CategoryTable *table, Py_ssize_t length, int kind, const char *data,
          Py_UCS4 last)
{
    for (Py_ssize_t i = table->buckets[category_bucket(length, kind, last, table->mask)];
         i >= 0; i = table->categories[i].next) {
        const Category *category = &table->categories[i];
        if (category->length == length && category->kind == kind &&
            same_bytes(category->data, data, (size_t)length * (size_t)kind)) {
            return i;
        }
    }
    return table->known;
}

/* The slot code(value) gives, checked to be one of the slots; -1 on error. */
static Py_ssize_t
coded_slot(const SlotCounts *counts, PyObject *value)
{
    Py_INCREF(value); /* code() runs Python code: it may drop what holds the value */
    PyObject *result = PyObject_CallOneArg(counts->code, value);
    Py_DECREF(value);
    if (result == NULL) {
        return -1;
    }
    Py_ssize_t slot = PyLong_AsSsize_t(result);
    Py_DECREF(result);
    if (slot == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (slot < 0 || slot > counts->table->known + 1) {
        PyErr_Format(PyExc_ValueError, "count_categories: code() gave %zd, not a slot", slot);
        return -1;
    }
    return slot;
}

/* The bits of PyASCIIObject.state that a compact ASCII str has set, to test them at once
 * (PyUnicode_IS_COMPACT_ASCII tests them one by one); the compiler folds it to a constant. */
static inline uint64_t
compact_ascii_bits(void)
{
    PyASCIIObject probe;
    uint64_t bits = 0;
    memset(&probe, 0, sizeof(probe));
    probe.state.compact = 1;
    probe.state.ascii = 1;
    memcpy(&bits, &probe.state, sizeof(probe.state) < 8 ? sizeof(probe.state) : 8);
    return bits;
}

static inline int
is_compact_ascii(const char *value, uint64_t bits)
{
    uint64_t state = 0;
    memcpy(&state, value + offsetof(PyASCIIObject, state),
           sizeof(((PyASCIIObject *)0)->state) < 8 ? sizeof(((PyASCIIObject *)0)->state) : 8);
    return (state & bits) == bits;
}

/* What count_ascii_run reads of a table, in locals: a store to the counts could be one to the
 * table as far as the compiler knows, and it would read them again for each value. */
typedef struct {
    const LengthEntry *entries;
    int sub_shift;
    uint64_t sub_mask;
    int hash_shift;
    uint64_t hash_factor;
    Py_ssize_t unseen;
} Lengths;

enum { BY_LENGTH, BY_SUB_BITS, BY_HASH }; /* how a value's entry is found */

/* The bytes of a text's last word that are its own (not the header's before a short one). */
static inline uint64_t
text_keep(Py_ssize_t length)
{
    return length >= 8 ? ~(uint64_t)0 : ~(~(uint64_t)0 >> (8 * (length & 7)));
}

/* The entry of a text by hash of its length and last word (``shift``: 64 - log2 entries;
 * ``factor`` odd). */
static inline size_t
hashed_entry(uint64_t last, Py_ssize_t length, uint64_t factor, int shift)
{
    uint64_t key = (last & text_keep(length)) ^ (uint64_t)length;
    return (size_t)((key * factor) >> shift);
}

/* Each word read costs a sixth of the loop's time (measured): a table reads only the words
 * its longest category needs (a value longer than that is unseen whatever its words are: no
 * entry of its length has a category). ``words`` and ``how`` are constants in each of the
 * loops count_ascii_run chooses from. */

/* Where word k of a text of ``length`` characters starts: at 0, 8, 16 and length - 8, none
 * past length - 8 (a shorter text: all at length - 8, in the header before it). From the
 * length, not the entry: one read fewer before the words can be read. */
static inline Py_ssize_t
word_from(Py_ssize_t length, int k)
{
    Py_ssize_t from = 8 * k;
    return k < LENGTH_WORDS - 1 && from < length - 8 ? from : length - 8;
}

static inline uint64_t
read_word(const char *text, Py_ssize_t length, int k)
{
    uint64_t word;
    memcpy(&word, text + word_from(length, k), 8);
    return word;
}

/* The slot of a compact ASCII str of ``length`` < LENGTHS characters (see LengthEntry). */
static inline Py_ssize_t
ascii_slot(const Lengths *table, const char *value, Py_ssize_t length, const int words,
           const int how)
{
    const char *text = value + sizeof(PyASCIIObject);
    uint64_t last = read_word(text, length, 3); /* a short text's: after the header's bytes */
    const LengthEntry *entry = &table->entries[length];
    if (how == BY_SUB_BITS) {
        entry += (Py_ssize_t)((last >> table->sub_shift) & table->sub_mask) * LENGTHS;
    }
    if (how == BY_HASH) {
        entry = &table->entries[hashed_entry(last, length, table->hash_factor, table->hash_shift)];
    }
    uint64_t diff = last ^ entry->words[3], other_length = 0;
    if (how == BY_HASH) { /* entries of several lengths share it */
        other_length = (uint64_t)(entry->length ^ length);
    }
    if (words >= 2) {
        diff |= read_word(text, length, 0) ^ entry->words[0];
    }
    if (words >= 3) {
        diff |= read_word(text, length, 1) ^ entry->words[1];
    }
    if (words >= 4) {
        diff |= read_word(text, length, 2) ^ entry->words[2];
    }
    Py_ssize_t slot = ((diff & entry->keep) | other_length) == 0 ? entry->slot : table->unseen;
    if (words >= 4 && length > 32 && slot != table->unseen && /* rare */
        !same_bytes(entry->rest, text + 24, (size_t)length - 32)) {
        return table->unseen;
    }
    return slot;
}

static inline Py_ssize_t
count_by_length(const Lengths *lengths, const char *item, Py_ssize_t n, Py_ssize_t stride,
                Py_ssize_t *counts, const int words, const int how)
{
    const uint64_t bits = compact_ascii_bits();
    PyTypeObject *const str = &PyUnicode_Type;
    Py_ssize_t i = 0;
    for (; i < n; i++, item += stride) {
        const char *value = *(const char *const *)item;
        if (value == NULL || Py_TYPE((PyObject *)value) != str ||
            !is_compact_ascii(value, bits)) {
            break;
        }
        Py_ssize_t length = ((const PyASCIIObject *)value)->length;
        if (length >= LENGTHS) {
            break;
        }
        counts[ascii_slot(lengths, value, length, words, how)]++;
    }
    return i;
}

/* The loops, one for each way to find an entry and count of words (constants in each). */
typedef Py_ssize_t (*CountLoop)(const Lengths *, const char *, Py_ssize_t, Py_ssize_t,
                                Py_ssize_t *);
#define COUNT_LOOP(name, words, how)                                                         \
    static Py_ssize_t name(const Lengths *lengths, const char *item, Py_ssize_t n,           \
                           Py_ssize_t stride, Py_ssize_t *counts)                           \
    {                                                                                        \
        return count_by_length(lengths, item, n, stride, counts, words, how);               \
    }
COUNT_LOOP(count_1_by_length, 1, BY_LENGTH)
COUNT_LOOP(count_2_by_length, 2, BY_LENGTH)
COUNT_LOOP(count_3_by_length, 3, BY_LENGTH)
COUNT_LOOP(count_4_by_length, 4, BY_LENGTH)
COUNT_LOOP(count_1_by_sub_bits, 1, BY_SUB_BITS)
COUNT_LOOP(count_2_by_sub_bits, 2, BY_SUB_BITS)
COUNT_LOOP(count_3_by_sub_bits, 3, BY_SUB_BITS)
COUNT_LOOP(count_4_by_sub_bits, 4, BY_SUB_BITS)
COUNT_LOOP(count_1_by_hash, 1, BY_HASH)
COUNT_LOOP(count_2_by_hash, 2, BY_HASH)
COUNT_LOOP(count_3_by_hash, 3, BY_HASH)
COUNT_LOOP(count_4_by_hash, 4, BY_HASH)
#undef COUNT_LOOP

static const CountLoop count_loops[3][LENGTH_WORDS] = {
    [BY_LENGTH] = {count_1_by_length, count_2_by_length, count_3_by_length, count_4_by_length},
    [BY_SUB_BITS] = {count_1_by_sub_bits, count_2_by_sub_bits, count_3_by_sub_bits,
                     count_4_by_sub_bits},
    [BY_HASH] = {count_1_by_hash, count_2_by_hash, count_3_by_hash, count_4_by_hash},
};

/* Count the compact ASCII str of fewer than LENGTHS characters from ``item`` on (at most n,
 * ``stride`` bytes apart) up to the first other value; returns how many were counted (0 when
 * the table has no entries: text_slot counts them). */
static Py_ssize_t
count_ascii_run(const CategoryTable *table, const char *item, Py_ssize_t n, Py_ssize_t stride,
                Py_ssize_t *counts)
{
    const Lengths lengths = {table->lengths,    table->sub_shift,   table->sub_mask,
                             table->hash_shift, table->hash_factor, table->known};
    if (lengths.entries == NULL) {
        return 0;
    }
    int how = table->hash_shift != 0 ? BY_HASH : table->sub_mask != 0 ? BY_SUB_BITS : BY_LENGTH;
    return count_loops[how][table->words - 1](&lengths, item, n, stride, counts);
}

/* The slot of a value other than a compact ASCII str; -1 with an exception set. */
static Py_ssize_t
other_slot(const SlotCounts *counts, PyObject *value)
{
    if (PyUnicode_CheckExact(value)) {
        if (ready_text(value) < 0) {
            return -1;
        }
        Py_ssize_t length = PyUnicode_GET_LENGTH(value);
        int kind = PyUnicode_KIND(value);
        const void *data = PyUnicode_DATA(value);
        Py_UCS4 last = length > 0 ? PyUnicode_READ(kind, data, length - 1) : 0;
        return text_slot(counts->table, length, kind, data, last);
    }
    if (value == Py_None || (PyFloat_CheckExact(value) && Py_IS_NAN(PyFloat_AS_DOUBLE(value)))) {
        return counts->table->known + 1;
    }
    return coded_slot(counts, value);
}

/* Count ``n`` values, ``stride`` bytes apart from ``item`` (``list``: the list they are in,
 * its size and items read again after code() ran); 0, or -1 with an exception set. */
static int
count_items(SlotCounts *counts, PyObject *list, const char *item, Py_ssize_t n,
            Py_ssize_t stride)
{
    Py_ssize_t *slots = counts->counts;
    for (Py_ssize_t i = 0; i < n; i++, item += stride) {
        Py_ssize_t run = count_ascii_run(counts->table, item, n - i, stride, slots);
        i += run, item += run * stride;
        if (i == n) {
            break;
        }
        PyObject *value = *(PyObject *const *)item;
        Py_ssize_t slot = other_slot(counts, value == NULL ? Py_None : value); /* numpy's None */
        if (slot < 0) {
            return -1;
        }
        if (list != NULL) { /* code() may have resized the list */
            n = PyList_GET_SIZE(list);
            item = (const char *)(PySequence_Fast_ITEMS(list) + i);
        }
        slots[slot]++;
    }
    return 0;
}

/* Count ``values`` in whichever form it comes; 0, or -1 with an exception set. */
static int
count_any(SlotCounts *counts, PyObject *values)
{
    if (PyList_CheckExact(values) || PyTuple_CheckExact(values)) {
        return count_items(counts, PyList_CheckExact(values) ? values : NULL,
                           (const char *)PySequence_Fast_ITEMS(values),
                           PySequence_Fast_GET_SIZE(values), sizeof(PyObject *));
    }
    Py_buffer view;
    if (PyObject_CheckBuffer(values) &&
        PyObject_GetBuffer(values, &view, PyBUF_STRIDES | PyBUF_FORMAT) == 0) {
        int objects = view.ndim == 1 && view.format != NULL && strcmp(view.format, "O") == 0 &&
                      view.itemsize == sizeof(PyObject *);
        /* exported: numpy resizes nothing meanwhile */
        int done = objects ? count_items(counts, NULL, view.buf, view.shape[0], view.strides[0])
                           : 0;
        PyBuffer_Release(&view);
        if (objects) {
            return done;
        }
    }
    PyErr_Clear(); /* not a buffer of objects: read as a sequence */
    PyObject *list = PySequence_List(values);
    if (list == NULL) {
        return -1;
    }
    int done = count_any(counts, list);
    Py_DECREF(list);
    return done;
}

/* Count ``values`` into ``slots`` (known + 2 of them). */
static int
count_slots(SlotCounts *counts, PyObject *values, Py_ssize_t *slots)
{
    memset(slots, 0, (size_t)(counts->table->known + 2) * sizeof(Py_ssize_t));
    counts->counts = slots;
    return count_any(counts, values);
}

/* Whether category ``i`` has entries by length: ASCII, shorter than LENGTHS. */
static int
has_length_entry(const CategoryTable *table, Py_ssize_t i)
{
    return table->categories[i].length < LENGTHS &&
           PyUnicode_IS_ASCII(PyTuple_GET_ITEM(table->texts, i));
}

/* Category ``i``'s text where a str object holds it, after a header of zeros. */
static void
text_image(const CategoryTable *table, Py_ssize_t i, char image[sizeof(PyASCIIObject) + LENGTHS])
{
    memset(image, 0, sizeof(PyASCIIObject) + LENGTHS);
    memcpy(image + sizeof(PyASCIIObject), table->categories[i].data,
           (size_t)table->categories[i].length);
}

static inline uint64_t
sub_group(const CategoryTable *table, uint64_t last)
{
    return (last >> table->sub_shift) & table->sub_mask;
}

/* Whether the table's sub bits set apart the categories of each length (bits of their texts,
 * not of the header before a short one). ``lasts``: each category's last 8 bytes. */
static int
sub_bits_apart(const CategoryTable *table, const uint64_t *lasts)
{
    for (Py_ssize_t i = 0; i < table->known; i++) {
        Py_ssize_t length = table->categories[i].length;
        for (Py_ssize_t j = i + 1; has_length_entry(table, i) && j < table->known; j++) {
            if (table->categories[j].length != length || !has_length_entry(table, j)) {
                continue;
            }
            int text_bits = 8 * (int)(length < 8 ? length : 8);
            if (table->sub_shift < 64 - text_bits ||
                sub_group(table, lasts[i]) == sub_group(table, lasts[j])) {
                return 0;
            }
        }
    }
    return 1;
}

/* The fewest sub bits (at most SUB_BITS_MAX) that set apart the categories of each length;
 * 0, or -1 when there are none. */
static int
choose_sub_bits(CategoryTable *table, const uint64_t *lasts)
{
    for (int bits = 0; bits <= SUB_BITS_MAX; bits++) {
        table->sub_mask = ((uint64_t)1 << bits) - 1;
        for (table->sub_shift = 0; table->sub_shift <= (bits == 0 ? 0 : 64 - bits);
             table->sub_shift++) {
            if (sub_bits_apart(table, lasts)) {
                return 0;
            }
        }
    }
    return -1;
}

/* The entry of category ``i``: the words that cover its text (see LengthEntry). */
static void
set_length_entry(const CategoryTable *table, Py_ssize_t i, LengthEntry *entry)
{
    char image[sizeof(PyASCIIObject) + LENGTHS];
    Py_ssize_t length = table->categories[i].length;
    text_image(table, i, image);
    for (int k = 0; k < LENGTH_WORDS; k++) {
        memcpy(&entry->words[k], image + sizeof(PyASCIIObject) + word_from(length, k), 8);
    }
    entry->keep = text_keep(length);
    entry->slot = i;
    entry->rest = length > 8 * LENGTH_WORDS ? table->categories[i].data + 24 : NULL;
    entry->length = length;
}

/* Fill ``count`` entries: every one unseen, then each category in the entries of its length
 * that its sub bits choose (all of them when no other category has its length). */
static void
fill_length_entries(CategoryTable *table, size_t count, const uint64_t *lasts)
{
    for (size_t e = 0; e < count; e++) {
        table->lengths[e] = (LengthEntry){.slot = table->known, .length = -1};
    }
    for (Py_ssize_t i = 0; i < table->known; i++) {
        Py_ssize_t length = table->categories[i].length, shared = 0;
        for (Py_ssize_t j = 0; j < table->known; j++) {
            shared |= j != i && table->categories[j].length == length && has_length_entry(table, j);
        }
        for (uint64_t group = 0; has_length_entry(table, i) && group <= table->sub_mask; group++) {
            if (!shared || group == sub_group(table, lasts[i])) {
                set_length_entry(table, i, &table->lengths[length + (Py_ssize_t)group * LENGTHS]);
            }
        }
    }
}

/* Fill ``count`` entries by hash; 1 when each category has one of its own, 0 when not. */
static int
fill_hashed_entries(CategoryTable *table, size_t count, const uint64_t *lasts)
{
    for (size_t e = 0; e < count; e++) {
        table->lengths[e] = (LengthEntry){.slot = table->known, .length = -1};
    }
    for (Py_ssize_t i = 0; i < table->known; i++) {
        if (!has_length_entry(table, i)) {
            continue;
        }
        Py_ssize_t length = table->categories[i].length;
        LengthEntry *entry =
            &table->lengths[hashed_entry(lasts[i], length, table->hash_factor, table->hash_shift)];
        if (entry->length >= 0) {
            return 0;
        }
        set_length_entry(table, i, entry);
    }
    return 1;
}

/* Entries by hash, as few as give each category one of its own with one of HASH_FACTORS
 * factors (at most 4096: none, the chained buckets serving, when those do not). 0, or -1 with
 * an exception set. */
#define HASH_FACTORS 32
static int
make_hashed_entries(CategoryTable *table, const uint64_t *lasts)
{
    for (int bits = 4; bits <= 12; bits++) {
        size_t count = (size_t)1 << bits;
        if (count < 2 * (size_t)table->known) {
            continue;
        }
        LengthEntry *entries = PyMem_Realloc(table->lengths, count * sizeof(LengthEntry));
        if (entries == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        table->lengths = entries;
        table->hash_shift = 64 - bits;
        table->hash_factor = 0x9E3779B97F4A7C15u;
        for (int tries = 0; tries < HASH_FACTORS; tries++) {
            if (fill_hashed_entries(table, count, lasts)) {
                return 0;
            }
            table->hash_factor = table->hash_factor * 6364136223846793005u + 2; /* odd */
        }
    }
    PyMem_Free(table->lengths);
    table->lengths = NULL;
    return 0;
}

/* The entries by length, or by hash when SUB_BITS_MAX bits do not set apart the categories
 * of each length (little-endian only: a short text's bytes are the last word's high ones).
 * 0, or -1 with an exception set. */
static int
make_length_entries(CategoryTable *table)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    char image[sizeof(PyASCIIObject) + LENGTHS];
    uint64_t *lasts = PyMem_Calloc((size_t)table->known + 1, sizeof(uint64_t));
    if (lasts == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    table->words = 1;
    for (Py_ssize_t i = 0; i < table->known; i++) {
        Py_ssize_t length = table->categories[i].length;
        if (has_length_entry(table, i)) {
            text_image(table, i, image);
            memcpy(&lasts[i], image + sizeof(PyASCIIObject) + length - 8, 8);
            int words = length <= 8 ? 1 : length <= 16 ? 2 : length <= 24 ? 3 : 4;
            table->words = words > table->words ? words : table->words;
        }
    }
    if (choose_sub_bits(table, lasts) == 0) {
        size_t count = (size_t)LENGTHS * (table->sub_mask + 1);
        table->lengths = PyMem_Malloc(count * sizeof(LengthEntry));
        if (table->lengths == NULL) {
            PyMem_Free(lasts);
            PyErr_NoMemory();
            return -1;
        }
        fill_length_entries(table, count, lasts);
    }
    else if (make_hashed_entries(table, lasts) < 0) {
        PyMem_Free(lasts);
        return -1;
    }
    PyMem_Free(lasts);
#endif
    return 0;
}

static void
clear_table(CategoryTable *table)
{
    PyMem_Free(table->lengths);
    table->lengths = NULL;
    PyMem_Free(table->categories);
    PyMem_Free(table->buckets);
    Py_CLEAR(table->texts);
    table->categories = NULL;
    table->buckets = NULL;
}

/* Make the table of ``texts`` (a tuple of exact str); 0, or -1 with an exception set. */
static int
make_table(CategoryTable *table, PyObject *texts)
{
    if (!PyTuple_CheckExact(texts)) {
        PyErr_SetString(PyExc_TypeError, "categories must be a tuple of str");
        return -1;
    }
    table->known = PyTuple_GET_SIZE(texts);
    table->mask = 15;
    while (table->mask + 1 < 4 * (size_t)table->known) {
        table->mask = table->mask * 2 + 1;
    }
    table->texts = Py_NewRef(texts);
    table->categories = PyMem_Calloc((size_t)table->known + 1, sizeof(Category));
    table->buckets = PyMem_Malloc((table->mask + 1) * sizeof(Py_ssize_t));
    if (table->categories == NULL || table->buckets == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t b = 0; b <= table->mask; b++) {
        table->buckets[b] = -1;
    }
    for (Py_ssize_t i = 0; i < table->known; i++) {
        PyObject *text = PyTuple_GET_ITEM(texts, i);
        if (!PyUnicode_CheckExact(text)) {
            PyErr_SetString(PyExc_TypeError, "categories must be str");
            return -1;
        }
        if (ready_text(text) < 0) {
            return -1;
        }
        Category *category = &table->categories[i];
        category->length = PyUnicode_GET_LENGTH(text);
        category->kind = PyUnicode_KIND(text);
        category->data = PyUnicode_DATA(text);
        Py_UCS4 last = category->length > 0
                           ? PyUnicode_READ(category->kind, category->data, category->length - 1)
                           : 0;
        size_t b = category_bucket(category->length, category->kind, last, table->mask);
        category->next = table->buckets[b];
        table->buckets[b] = i;
    }
    return make_length_entries(table);
}

static PyObject *
slot_counts_list(const Py_ssize_t *counts, Py_ssize_t slots)
{
    PyObject *result = PyList_New(slots);
    for (Py_ssize_t slot = 0; result != NULL && slot < slots; slot++) {
        PyObject *count = PyLong_FromSsize_t(counts[slot]);
        if (count == NULL) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, slot, count);
    }
    return result;
}

static PyObject *
count_categories(PyObject *module, PyObject *args)
{
    PyObject *values, *texts, *code, *result = NULL;
    if (!PyArg_UnpackTuple(args, "count_categories", 3, 3, &values, &texts, &code)) {
        return NULL;
    }
    CategoryTable table = {.texts = NULL};
    Py_ssize_t *slots = NULL;
    if (make_table(&table, texts) == 0) {
        slots = PyMem_Malloc((size_t)(table.known + 2) * sizeof(Py_ssize_t));
        SlotCounts counts = {.table = &table, .code = code};
        if (slots == NULL) {
            PyErr_NoMemory();
        }
        else if (count_slots(&counts, values, slots) == 0) {
            result = slot_counts_list(slots, table.known + 2);
        }
    }
    PyMem_Free(slots);
    clear_table(&table);
    return result;
}

/* -- CategoryCounter: every categorical column of a batch in one call -- */

typedef struct {
    PyObject_HEAD
    CategoryTable *tables;
    Py_ssize_t columns;
    Py_ssize_t slots;   /* in all: per column [categories..., unseen bin, missing, unseen] */
    Py_ssize_t deepest; /* the most slots of one column's counts */
} CategoryCounter;

static void
CategoryCounter_clear(CategoryCounter *self)
{
    for (Py_ssize_t j = 0; self->tables != NULL && j < self->columns; j++) {
        clear_table(&self->tables[j]);
    }
    PyMem_Free(self->tables);
    self->tables = NULL;
    self->columns = self->slots = self->deepest = 0;
}

static int
CategoryCounter_init(CategoryCounter *self, PyObject *args, PyObject *kwargs)
{
    PyObject *vocabularies;
    if (!PyArg_ParseTuple(args, "O!:CategoryCounter", &PyList_Type, &vocabularies)) {
        return -1;
    }
    CategoryCounter_clear(self);
    Py_ssize_t columns = PyList_GET_SIZE(vocabularies);
    self->tables = PyMem_Calloc((size_t)columns + 1, sizeof(CategoryTable));
    if (self->tables == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->columns = columns;
    for (Py_ssize_t j = 0; j < columns; j++) {
        if (make_table(&self->tables[j], PyList_GET_ITEM(vocabularies, j)) < 0) {
            CategoryCounter_clear(self);
            return -1;
        }
        self->slots += self->tables[j].known + 3;
        if (self->tables[j].known + 2 > self->deepest) {
            self->deepest = self->tables[j].known + 2;
        }
    }
    return 0;
}

/* Count column j's values into ``counts``; 0, or -1 with an exception set. */
static int
count_column(const CategoryCounter *self, Py_ssize_t j, PyObject *values, PyObject *code,
             Py_ssize_t rows, Py_ssize_t *counts)
{
    Py_ssize_t known = self->tables[j].known, total = 0;
    SlotCounts slot_counts = {.table = &self->tables[j], .code = code};
    if (count_slots(&slot_counts, values, counts) < 0) {
        return -1;
    }
    for (Py_ssize_t slot = 0; slot < known + 2; slot++) {
        total += counts[slot];
    }
    if (total != rows) {
        PyErr_Format(PyExc_ValueError, "expected %zd values per column, got %zd", rows, total);
        return -1;
    }
    return 0;
}

/* amounts(columns, codes, rows, out): add each column's counts to ``out`` (float64, one
 * amount per slot, the columns' slots in order); a column given as None is skipped. */
static PyObject *
CategoryCounter_amounts(CategoryCounter *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyList_CheckExact(args[0]) || !PyList_CheckExact(args[1]) ||
        PyList_GET_SIZE(args[0]) != self->columns || PyList_GET_SIZE(args[1]) != self->columns) {
        PyErr_Format(PyExc_TypeError, "amounts(columns, codes, rows, out): lists of %zd",
                     self->columns);
        return NULL;
    }
    Py_ssize_t rows = PyLong_AsSsize_t(args[2]);
    if (rows == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer out;
    if (get_doubles(args[3], &out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS, 1, "out") < 0) {
        return NULL;
    }
    Py_ssize_t *counts = PyMem_Malloc((size_t)self->deepest * sizeof(Py_ssize_t));
    int failed = counts == NULL;
    if (failed) {
        PyErr_NoMemory();
    }
    else if (out.shape[0] != self->slots) {
        PyErr_Format(PyExc_ValueError, "out: %zd slots, not %zd", out.shape[0], self->slots);
        failed = 1;
    }
    double *amounts = out.buf;
    for (Py_ssize_t j = 0, first = 0; !failed && j < self->columns; j++) {
        Py_ssize_t known = self->tables[j].known;
        if (PyList_GET_SIZE(args[0]) != self->columns || PyList_GET_SIZE(args[1]) != self->columns) {
            PyErr_SetString(PyExc_RuntimeError, "amounts: columns or codes changed size");
            failed = 1;
            break;
        }
        PyObject *values = PyList_GET_ITEM(args[0], j);
        if (values != Py_None) {
            PyObject *code = Py_NewRef(PyList_GET_ITEM(args[1], j)); /* code() may edit lists */
            Py_INCREF(values);
            failed = count_column(self, j, values, code, rows, counts) < 0;
            Py_DECREF(values);
            Py_DECREF(code);
            for (Py_ssize_t slot = 0; !failed && slot < known + 2; slot++) {
                amounts[first + slot] += (double)counts[slot];
            }
            amounts[first + known + 2] += failed ? 0.0 : (double)counts[known];
        }
        first += known + 3;
    }
    PyMem_Free(counts);
    PyBuffer_Release(&out);
    if (failed) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static void
CategoryCounter_dealloc(CategoryCounter *self)
{
    CategoryCounter_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef CategoryCounter_methods[] = {
    {"amounts", (PyCFunction)(void (*)(void))CategoryCounter_amounts, METH_FASTCALL,
     "amounts(columns, codes, rows, out): add each column's counts to its slots in out."},
    {NULL},
};

static PyMemberDef CategoryCounter_members[] = {
    {"slots", T_PYSSIZET, offsetof(CategoryCounter, slots), READONLY, NULL},
    {NULL},
};

static PyTypeObject CategoryCounterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ml_wsgi_metrics._speedups.CategoryCounter",
    .tp_doc = "CategoryCounter(vocabularies): the slot counts of a model's categorical columns.",
    .tp_basicsize = sizeof(CategoryCounter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)CategoryCounter_init,
    .tp_dealloc = (destructor)CategoryCounter_dealloc,
    .tp_methods = CategoryCounter_methods,
    .tp_members = CategoryCounter_members,
};

/* == predicted classes and their expected correctness (model signals' batch path) ==========
 *
 * count_classes(classes, scores, rows, labels, kinds, code, out) adds the rows of each class
 * slot [labels..., no class, unseen] (CompiledModel.classes) to ``out`` and returns the rows'
 * expected correctness, _expected's rule: by the kind of the row's slot, POSITIVE s, NEGATIVE
 * 1 - s, EITHER max(s, 1 - s), s the score clipped to [0, 1]; a non-finite score adds nothing.
 * Row i's term is added to lane i % 4, each lane from 0.0 in row order, then the sum is
 * (lane 0 + lane 1) + (lane 2 + lane 3): four additions in flight, not one, in an order numpy
 * follows too (_expected.ExpectedCorrect.amount, the pure-Python path, gives the same sum).
 *
 * Each row goes to the slot code(value) gives (CompiledModel.class_code): an exact str equal
 * to a label is that label's slot, None and float NaN are the no-class slot, anything else is
 * coded by code(value), once per distinct text (CLASS_EXTRAS of them, then once per row) or
 * per object (a cache by identity, which finds a list's repeated str objects too). ``classes`` is None (every row: no class), a list, or a
 * 1-d numpy array of str in native byte order, read in place: each row's UCS4 characters
 * compared with each label's, padded with zeros to the array's width. Rows are taken
 * CLASS_CHUNK at a time: their slots found first, then counted and their terms added.
 */

#define CLASS_EXTRAS 16  /* texts other than the labels remembered with their slot */
#define CLASS_OBJECTS 16 /* other objects remembered by identity (a power of 2) */
#define CLASS_CHUNK 256  /* rows whose slots are found before they are added (a multiple of 4) */

enum { CLASS_POSITIVE, CLASS_NEGATIVE, CLASS_EITHER }; /* _expected's kinds */

typedef struct {
    Py_ssize_t length;   /* characters */
    int kind;            /* bytes a character */
    const char *data;    /* the characters: a str's, a label's padded, or an array row's */
    Py_ssize_t slot;
    uint64_t head, tail; /* the first and last 8 bytes (4 when shorter; 0 when shorter yet) */
} ClassText;

typedef struct {
    PyObject *code;           /* code(value) -> slot */
    Py_ssize_t slots;         /* labels + 2 */
    Py_ssize_t no_class;      /* the no-class slot: after the labels' */
    double (*weights)[3];     /* per slot: 1.0 for its kind's term (s, 1 - s, max), else 0.0 */
    Py_ssize_t *counts;       /* per slot */
    ClassText *texts;         /* the labels, then the extra texts met */
    Py_ssize_t known, labels; /* texts in use; labels among them (the first ones) */
    PyObject *extras[CLASS_EXTRAS];   /* the extra texts' objects (a list's str), owned */
    PyObject *objects[CLASS_OBJECTS]; /* other values met, owned, and their slots */
    Py_ssize_t object_slots[CLASS_OBJECTS];
    const char *scores; /* NULL: no scores */
    Py_ssize_t score_stride;
    double lanes[4]; /* row i's term is added to lanes[i % 4] */
} ClassPass;

/* A text and its slot, its first and last bytes read as words. */
static inline ClassText
class_text(Py_ssize_t length, int kind, const char *data, Py_ssize_t slot)
{
    ClassText text = {length, kind, data, slot, 0, 0};
    size_t size = (size_t)length * (size_t)kind;
    if (size >= 8) {
        memcpy(&text.head, data, 8);
        memcpy(&text.tail, data + size - 8, 8);
    }
    else if (size >= 4) {
        uint32_t head, tail;
        memcpy(&head, data, 4);
        memcpy(&tail, data + size - 4, 4);
        text.head = head, text.tail = tail;
    }
    return text;
}

/* The expected correctness of a row of score ``s`` (0.0 when not finite), its kind's term
 * picked by weights rather than by a branch: x * 1.0 + 0.0 is x. The clip is SSE2's max and
 * min (-0.0 gives 0.0), as class_terms has it. */
static inline double
class_term(double s, const double *weight)
{
    if (!isfinite(s)) {
        return 0.0;
    }
    s = s > 0.0 ? s : 0.0;
    s = s < 1.0 ? s : 1.0;
    double other = 1.0 - s, larger = s > other ? s : other;
    return weight[0] * s + weight[1] * other + weight[2] * larger;
}

#ifdef KERNEL_X86_64
/* class_term() of two rows at once (SSE2), of weights ``a`` and ``b``. */
static inline __m128d
class_terms(__m128d s, const double *a, const double *b)
{
    const __m128d zero = _mm_setzero_pd(), one = _mm_set1_pd(1.0);
    __m128d finite = _mm_cmpeq_pd(_mm_sub_pd(s, s), zero); /* NaN and infinities: s - s is NaN */
    s = _mm_min_pd(_mm_max_pd(s, zero), one);
    __m128d other = _mm_sub_pd(one, s), larger = _mm_max_pd(s, other);
    __m128d picked = _mm_add_pd(_mm_mul_pd(_mm_set_pd(b[0], a[0]), s),
                                _mm_mul_pd(_mm_set_pd(b[1], a[1]), other));
    picked = _mm_add_pd(picked, _mm_mul_pd(_mm_set_pd(b[2], a[2]), larger));
    return _mm_and_pd(picked, finite);
}
#endif

/* Count ``n`` rows of slots ``row_slots`` (in 4 lanes of counts: no increment waits). */
static void
class_add_counts(ClassPass *pass, Py_ssize_t n, const int32_t *row_slots)
{
    Py_ssize_t *counts = pass->counts, slots = pass->slots, i = 0;
    for (; i + 4 <= n; i += 4) {
        counts[row_slots[i]]++;
        counts[slots + row_slots[i + 1]]++;
        counts[2 * slots + row_slots[i + 2]]++;
        counts[3 * slots + row_slots[i + 3]]++;
    }
    for (; i < n; i++) {
        counts[row_slots[i]]++;
    }
}

/* Count ``n`` rows from row ``first`` on (a multiple of 4), of slots ``row_slots``, and add
 * their terms to the lanes. */
static void
class_add(ClassPass *pass, Py_ssize_t first, Py_ssize_t n, const int32_t *row_slots)
{
    class_add_counts(pass, n, row_slots);
    if (pass->scores == NULL) {
        return;
    }
    Py_ssize_t stride = pass->score_stride, i = 0;
    const char *score = pass->scores + first * stride;
    double(*weights)[3] = pass->weights;
#ifdef KERNEL_X86_64
    __m128d lanes01 = _mm_loadu_pd(pass->lanes), lanes23 = _mm_loadu_pd(pass->lanes + 2);
    for (; i + 4 <= n; i += 4, score += 4 * stride) {
        const double *row = (const double *)score;
        __m128d s01 = _mm_set_pd(*(const double *)(score + stride), row[0]);
        __m128d s23 = _mm_set_pd(*(const double *)(score + 3 * stride),
                                 *(const double *)(score + 2 * stride));
        const int32_t *at = row_slots + i;
        lanes01 = _mm_add_pd(lanes01, class_terms(s01, weights[at[0]], weights[at[1]]));
        lanes23 = _mm_add_pd(lanes23, class_terms(s23, weights[at[2]], weights[at[3]]));
    }
    _mm_storeu_pd(pass->lanes, lanes01);
    _mm_storeu_pd(pass->lanes + 2, lanes23);
#endif
    for (; i < n; i++, score += stride) {
        pass->lanes[i & 3] += class_term(*(const double *)score, weights[row_slots[i]]);
    }
}

/* The slot code(value) gives, checked to be one of the slots; -1 with an exception set. */
static Py_ssize_t
class_coded(ClassPass *pass, PyObject *value)
{
    Py_INCREF(value); /* code() runs Python code: it may drop what holds the value */
    PyObject *result = PyObject_CallOneArg(pass->code, value);
    Py_DECREF(value);
    Py_ssize_t slot = result == NULL ? -1 : PyLong_AsSsize_t(result);
    Py_XDECREF(result);
    if (slot == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (slot < 0 || slot >= pass->slots) {
        PyErr_Format(PyExc_ValueError, "count_classes: code() gave %zd, not a slot", slot);
        return -1;
    }
    return slot;
}

/* The slot of a text (``length`` characters of ``kind`` bytes) among ``pass->texts``, or -1. */
static inline Py_ssize_t
class_text_slot(const ClassPass *pass, Py_ssize_t length, int kind, const char *data)
{
    for (Py_ssize_t t = 0; t < pass->known; t++) {
        const ClassText *text = &pass->texts[t];
        if (text->length == length && text->kind == kind &&
            same_bytes(text->data, data, (size_t)length * (size_t)kind)) {
            return text->slot;
        }
    }
    return -1;
}

/* Remember a text met (not a label) with its slot, while there is room. */
static void
class_remember(ClassPass *pass, PyObject *owner, Py_ssize_t length, int kind, const char *data,
               Py_ssize_t slot)
{
    Py_ssize_t extra = pass->known - pass->labels;
    if (extra < CLASS_EXTRAS) {
        pass->extras[extra] = Py_XNewRef(owner);
        pass->texts[pass->known++] = class_text(length, kind, data, slot);
    }
}

/* -- a list's rows -- */

/* The slot of a list's value; -1 with an exception set. An object met before is found by
 * identity (a str is kept while its entry is free: a model's predict() repeats a few objects,
 * JSON gives a new one a row). */
static Py_ssize_t
class_object_slot(ClassPass *pass, PyObject *value)
{
    size_t at = ((uintptr_t)value >> 4) & (CLASS_OBJECTS - 1);
    if (pass->objects[at] == value) {
        return pass->object_slots[at];
    }
    Py_ssize_t slot;
    if (PyUnicode_CheckExact(value)) {
        if (ready_text(value) < 0) {
            return -1;
        }
        Py_ssize_t length = PyUnicode_GET_LENGTH(value);
        int kind = PyUnicode_KIND(value);
        const char *data = PyUnicode_DATA(value);
        slot = class_text_slot(pass, length, kind, data);
        if (slot < 0 && (slot = class_coded(pass, value)) >= 0) {
            class_remember(pass, value, length, kind, data, slot);
        }
        if (slot >= 0 && pass->objects[at] == NULL) {
            pass->objects[at] = Py_NewRef(value), pass->object_slots[at] = slot;
        }
        return slot;
    }
    if (value == Py_None || (PyFloat_CheckExact(value) && isnan(PyFloat_AS_DOUBLE(value)))) {
        return pass->no_class;
    }
    if ((slot = class_coded(pass, value)) >= 0) {
        Py_XSETREF(pass->objects[at], Py_NewRef(value));
        pass->object_slots[at] = slot;
    }
    return slot;
}

/* The labels as texts (a list's rows are compared with them). */
static int
class_list_labels(ClassPass *pass, PyObject *labels)
{
    for (Py_ssize_t t = 0; t < PyTuple_GET_SIZE(labels); t++) {
        PyObject *label = PyTuple_GET_ITEM(labels, t);
        if (ready_text(label) < 0) {
            return -1;
        }
        pass->texts[t] = class_text(PyUnicode_GET_LENGTH(label), PyUnicode_KIND(label),
                                    PyUnicode_DATA(label), t);
    }
    pass->known = pass->labels = PyTuple_GET_SIZE(labels);
    return 0;
}

/* The slots of ``n`` rows of a list from row ``first`` on (its size read again after code()
 * ran: it may edit the list); 0, or -1 with an exception set. */
static int
class_list_slots(ClassPass *pass, PyObject *list, Py_ssize_t first, Py_ssize_t n,
                 int32_t *row_slots)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        if (first + i >= PyList_GET_SIZE(list)) {
            PyErr_SetString(PyExc_ValueError, "count_classes: fewer classes than rows");
            return -1;
        }
        PyObject *value = Py_NewRef(PyList_GET_ITEM(list, first + i)); /* code() may drop it */
        Py_ssize_t slot = class_object_slot(pass, value);
        Py_DECREF(value);
        if (slot < 0) {
            return -1;
        }
        row_slots[i] = (int32_t)slot;
    }
    return 0;
}

/* -- an array's rows -- */

typedef struct {
    const char *rows;    /* the first row */
    Py_ssize_t stride;   /* bytes from a row to the next */
    Py_ssize_t width;    /* bytes a row: 4 a character */
    Py_UCS4 *characters; /* scratch for one row */
} ClassArray;

/* The labels as rows of the array: each that fits the width, padded with zeros (one ending in
 * "\0" never equals a row: numpy reads trailing zeros as padding); ``padded`` holds them. */
static int
class_array_labels(ClassPass *pass, PyObject *labels, Py_ssize_t width, char *padded)
{
    pass->known = 0;
    for (Py_ssize_t t = 0; t < PyTuple_GET_SIZE(labels); t++) {
        PyObject *label = PyTuple_GET_ITEM(labels, t);
        if (ready_text(label) < 0) {
            return -1;
        }
        Py_ssize_t length = PyUnicode_GET_LENGTH(label);
        int kind = PyUnicode_KIND(label);
        const void *data = PyUnicode_DATA(label);
        if (length > width / 4 || (length > 0 && PyUnicode_READ(kind, data, length - 1) == 0)) {
            continue;
        }
        for (Py_ssize_t at = 0; at < length; at++) {
            Py_UCS4 character = PyUnicode_READ(kind, data, at);
            memcpy(padded + t * width + 4 * at, &character, 4);
        }
        pass->texts[pass->known++] = class_text(width / 4, 4, padded + t * width, t);
    }
    pass->labels = pass->known;
    return 0;
}

/* How many of ``n`` rows of 4 to 16 bytes from ``item`` on are among the texts (their first
 * and last bytes are the whole row), their slots written, up to the first that is not. */
static Py_ssize_t
class_short_rows(const ClassText *texts, Py_ssize_t known, const char *item,
                 const ClassArray *array, Py_ssize_t n, int32_t *row_slots)
{
    for (Py_ssize_t i = 0; i < n; i++, item += array->stride) {
        ClassText row = class_text(array->width / 4, 4, item, -1);
        Py_ssize_t t = 0;
        while (t < known && (texts[t].head != row.head || texts[t].tail != row.tail)) {
            t++;
        }
        if (t == known) {
            return i;
        }
        row_slots[i] = (int32_t)texts[t].slot;
    }
    return n;
}

/* The slot of an array row: among the texts, else code() of its str (trailing zeros are
 * padding), remembered; -1 with an exception set. */
static Py_ssize_t
class_array_row_slot(ClassPass *pass, const ClassArray *array, const char *item)
{
    Py_ssize_t length = array->width / 4;
    Py_ssize_t slot = class_text_slot(pass, length, 4, item);
    if (slot >= 0) {
        return slot;
    }
    memcpy(array->characters, item, (size_t)array->width);
    while (length > 0 && array->characters[length - 1] == 0) {
        length--;
    }
    PyObject *text = PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, array->characters, length);
    if (text == NULL) {
        return -1;
    }
    slot = class_coded(pass, text);
    Py_DECREF(text);
    if (slot >= 0) {
        class_remember(pass, NULL, array->width / 4, 4, item, slot);
    }
    return slot;
}

/* The slots of ``n`` rows of an array from row ``first`` on; 0, or -1 with an exception set. */
static int
class_array_slots(ClassPass *pass, const ClassArray *array, Py_ssize_t first, Py_ssize_t n,
                  int32_t *row_slots)
{
    const char *item = array->rows + first * array->stride;
    int short_rows = array->width >= 4 && array->width <= 16;
    for (Py_ssize_t i = 0; i < n; i++, item += array->stride) {
        if (short_rows) {
            Py_ssize_t done = class_short_rows(pass->texts, pass->known, item, array, n - i,
                                               row_slots + i);
            i += done, item += done * array->stride;
            if (i == n) {
                break;
            }
        }
        Py_ssize_t slot = class_array_row_slot(pass, array, item);
        if (slot < 0) {
            return -1;
        }
        row_slots[i] = (int32_t)slot;
    }
    return 0;
}

/* A 1-d array of str in native byte order ("<n>w"), exported by ``classes``; 0 when it is
 * not one (no exception set), 1 when ``view`` holds it, -1 with an exception set. */
static int
class_array_view(PyObject *classes, Py_buffer *view)
{
    if (!PyObject_CheckBuffer(classes)) {
        return 0;
    }
    if (PyObject_GetBuffer(classes, view, PyBUF_STRIDES | PyBUF_FORMAT) < 0) {
        return -1;
    }
    const char *format = view->format == NULL ? "" : view->format;
    while (*format >= '0' && *format <= '9') {
        format++;
    }
    if (view->ndim == 1 && view->itemsize % 4 == 0 && strcmp(format, "w") == 0) {
        return 1;
    }
    PyBuffer_Release(view);
    return 0;
}

/* -- the pass -- */

/* Count the rows of ``classes`` (None, a list, or ``array`` when it is an array). */
static int
class_count_rows(ClassPass *pass, PyObject *classes, const ClassArray *array, Py_ssize_t rows)
{
    int32_t row_slots[CLASS_CHUNK];
    for (Py_ssize_t first = 0; first < rows; first += CLASS_CHUNK) {
        Py_ssize_t n = rows - first < CLASS_CHUNK ? rows - first : CLASS_CHUNK;
        if (array != NULL) {
            if (class_array_slots(pass, array, first, n, row_slots) < 0) {
                return -1;
            }
        }
        else if (classes != Py_None) {
            if (class_list_slots(pass, classes, first, n, row_slots) < 0) {
                return -1;
            }
        }
        else {
            for (Py_ssize_t i = 0; i < n; i++) {
                row_slots[i] = (int32_t)pass->no_class;
            }
        }
        class_add(pass, first, n, row_slots);
    }
    return 0;
}

/* Count the rows of an array of str, read through ``view``. */
static int
class_count_array(ClassPass *pass, const Py_buffer *view, Py_ssize_t rows, PyObject *labels)
{
    if (view->shape[0] != rows) {
        PyErr_Format(PyExc_ValueError, "count_classes: %zd classes for %zd rows", view->shape[0],
                     rows);
        return -1;
    }
    Py_ssize_t width = view->itemsize, count = PyTuple_GET_SIZE(labels);
    char *padded = PyMem_Calloc((size_t)(count * width + width) + 4, 1);
    if (padded == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    ClassArray array = {view->buf, view->strides[0], width, (Py_UCS4 *)(padded + count * width)};
    int done = class_array_labels(pass, labels, width, padded) < 0 ? -1
               : class_count_rows(pass, NULL, &array, rows);
    PyMem_Free(padded);
    return done;
}

/* Count the rows of ``classes`` into ``pass``. */
static int
class_count_any(ClassPass *pass, PyObject *classes, Py_ssize_t rows, PyObject *labels)
{
    if (classes == Py_None) {
        return class_count_rows(pass, classes, NULL, rows);
    }
    if (PyList_CheckExact(classes)) {
        if (PyList_GET_SIZE(classes) != rows) {
            PyErr_Format(PyExc_ValueError, "count_classes: %zd classes for %zd rows",
                         PyList_GET_SIZE(classes), rows);
            return -1;
        }
        return class_list_labels(pass, labels) < 0 ? -1
                                                   : class_count_rows(pass, classes, NULL, rows);
    }
    Py_buffer view;
    int array = class_array_view(classes, &view);
    if (array == 0) {
        PyErr_SetString(PyExc_TypeError,
                        "count_classes: classes are None, a list or a 1-d array of str");
    }
    if (array <= 0) {
        return -1;
    }
    int done = class_count_array(pass, &view, rows, labels);
    PyBuffer_Release(&view);
    return done;
}

/* Each slot's weights, from ``kinds`` (a tuple of 0, 1 or 2 per slot); -1 with an exception
 * set. */
static int
class_weights(PyObject *kinds, double (*weights)[3], Py_ssize_t slots)
{
    if (!PyTuple_CheckExact(kinds) || PyTuple_GET_SIZE(kinds) != slots) {
        PyErr_Format(PyExc_TypeError, "count_classes: kinds, a tuple of %zd", slots);
        return -1;
    }
    for (Py_ssize_t slot = 0; slot < slots; slot++) {
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(kinds, slot));
        if (kind == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (kind < CLASS_POSITIVE || kind > CLASS_EITHER) {
            PyErr_Format(PyExc_ValueError, "count_classes: kind %ld", kind);
            return -1;
        }
        weights[slot][kind] = 1.0; /* the others stay 0.0 */
    }
    return 0;
}

static void
class_pass_clear(ClassPass *pass)
{
    for (Py_ssize_t extra = 0; extra < pass->known - pass->labels; extra++) {
        Py_XDECREF(pass->extras[extra]);
    }
    for (Py_ssize_t at = 0; at < CLASS_OBJECTS; at++) {
        Py_XDECREF(pass->objects[at]);
    }
    PyMem_Free(pass->counts);
    PyMem_Free(pass->weights);
    PyMem_Free(pass->texts);
}

/* The scores (None: none) and ``out``, checked; 0, or -1 with an exception set and nothing
 * held. */
static int
class_buffers(ClassPass *pass, PyObject *scores_object, Py_buffer *scores, PyObject *out_object,
              Py_buffer *out, Py_ssize_t rows)
{
    scores->obj = NULL;
    if (scores_object != Py_None) {
        if (get_doubles(scores_object, scores, PyBUF_SIMPLE, 1, "scores") < 0) {
            scores->obj = NULL;
            return -1;
        }
        if (scores->shape[0] != rows) {
            PyErr_Format(PyExc_ValueError, "count_classes: %zd scores for %zd rows",
                         scores->shape[0], rows);
            PyBuffer_Release(scores);
            return -1;
        }
        pass->scores = scores->buf, pass->score_stride = scores->strides[0];
    }
    if (get_doubles(out_object, out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS, 1, "out") == 0) {
        if (out->shape[0] == pass->slots) {
            return 0;
        }
        PyErr_Format(PyExc_ValueError, "out: %zd slots, not %zd", out->shape[0], pass->slots);
        PyBuffer_Release(out);
    }
    if (scores->obj != NULL) {
        PyBuffer_Release(scores);
    }
    return -1;
}

/* count_classes(classes, scores, rows, labels, kinds, code, out) -> the expected correct rows
 * (see the top of this section). */
static PyObject *
count_classes(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7 || !PyTuple_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "count_classes(classes, scores, rows, labels, kinds, code, out): labels "
                        "in a tuple");
        return NULL;
    }
    Py_ssize_t rows = PyLong_AsSsize_t(args[2]), labels = PyTuple_GET_SIZE(args[3]);
    if (rows == -1 && PyErr_Occurred()) {
        return NULL;
    }
    for (Py_ssize_t t = 0; t < labels; t++) {
        if (!PyUnicode_Check(PyTuple_GET_ITEM(args[3], t))) {
            PyErr_SetString(PyExc_TypeError, "count_classes: labels are str");
            return NULL;
        }
    }
    ClassPass pass = {.code = args[5], .slots = labels + 2, .no_class = labels};
    pass.counts = PyMem_Calloc((size_t)(4 * pass.slots), sizeof(Py_ssize_t));
    pass.weights = PyMem_Calloc((size_t)pass.slots, sizeof(double[3]));
    pass.texts = PyMem_Calloc((size_t)(labels + CLASS_EXTRAS), sizeof(ClassText));
    Py_buffer scores, out;
    int failed = pass.counts == NULL || pass.weights == NULL || pass.texts == NULL;
    if (failed) {
        PyErr_NoMemory();
    }
    failed = failed || class_weights(args[4], pass.weights, pass.slots) < 0 ||
             class_buffers(&pass, args[1], &scores, args[6], &out, rows) < 0;
    if (!failed) {
        failed = class_count_any(&pass, args[0], rows, args[3]) < 0;
        for (Py_ssize_t slot = 0; !failed && slot < pass.slots; slot++) {
            Py_ssize_t *counts = pass.counts, slots = pass.slots;
            ((double *)out.buf)[slot] += (double)(counts[slot] + counts[slots + slot] +
                                                  counts[2 * slots + slot] +
                                                  counts[3 * slots + slot]);
        }
        if (scores.obj != NULL) {
            PyBuffer_Release(&scores);
        }
        PyBuffer_Release(&out);
    }
    class_pass_clear(&pass);
    double *lanes = pass.lanes;
    return failed ? NULL : PyFloat_FromDouble((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]));
}

/* == end of predicted classes ============================================================== */

/* -- the module ------------------------------------------------------------------------- */

static PyObject *
configure(PyObject *module, PyObject *args)
{
    PyObject *state, *context_var, *unmatched_label, *failed, *pass_file, *mount_prefix,
        *methods, *other, *key;
    if (!PyArg_UnpackTuple(args, "configure", 9, 9, &state, &context_var, &unmatched_label,
                           &failed, &pass_file, &mount_prefix, &methods, &other, &key)) {
        return NULL;
    }
    if (!PyContextVar_CheckExact(context_var) || !PyFrozenSet_Check(methods)) {
        PyErr_SetString(PyExc_TypeError, "configure: a ContextVar, and methods in a frozenset");
        return NULL;
    }
    Py_XSETREF(known_methods, Py_NewRef(methods));
    Py_XSETREF(other_method, Py_NewRef(other));
    Py_XSETREF(request_key, Py_NewRef(key));
    Py_XSETREF(storage_state, Py_NewRef(state));
    Py_XSETREF(bound_model, Py_NewRef(context_var));
    Py_XSETREF(unmatched, Py_NewRef(unmatched_label));
    Py_XSETREF(instrumentation_failed, Py_NewRef(failed));
    Py_XSETREF(pass_file_function, Py_NewRef(pass_file));
    Py_XSETREF(mount_prefix_function, Py_NewRef(mount_prefix));
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(storage_state, model_var, unmatched, instrumentation_failed, pass_file, "
     "mount_prefix, methods, other_method, request_key)"},
    {"add_amounts", (PyCFunction)(void (*)(void))add_amounts, METH_FASTCALL,
     "add_amounts(cells, values, take, amounts): add each non-zero amount to its slot."},
    {"add_categories", (PyCFunction)(void (*)(void))add_categories, METH_FASTCALL,
     "add_categories(row, names, vocabularies, codes, firsts, cells, values, take): count one "
     "row of categorical columns."},
    {"use_avx2", use_avx2, METH_O,
     "use_avx2(enabled): the kernel's AVX2 code on or off; returns whether it was on."},
    {"count_categories", count_categories, METH_VARARGS,
     "count_categories(values, categories, code) -> counts per [categories..., unseen, "
     "missing]"},
    {"count_classes", (PyCFunction)(void (*)(void))count_classes, METH_FASTCALL,
     "count_classes(classes, scores, rows, labels, kinds, code, out) -> expected correct rows"},
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, .m_name = "ml_wsgi_metrics._speedups",
    .m_doc = "The per-request record of MetricsMiddleware, in C.", .m_size = -1,
    .m_methods = module_methods,
};

#define INTERN(variable, text)                                                               \
    if ((variable = PyUnicode_InternFromString(text)) == NULL) {                             \
        return NULL;                                                                         \
    }

PyMODINIT_FUNC
PyInit__speedups(void)
{
    INTERN(s_generation, "generation");
    INTERN(s_cell_generation, "_generation");
    INTERN(s_refresh, "refresh");
    INTERN(s_counts, "_counts");
    INTERN(s_add_status, "_add_status");
    INTERN(s_duration, "_duration");
    INTERN(s_request_size, "_request_size");
    INTERN(s_response_size, "_response_size");
    INTERN(s_in_progress, "_in_progress");
    INTERN(s_routes, "routes");
    INTERN(s_route_series, "route_series");
    INTERN(s_group_status_codes, "group_status_codes");
    INTERN(s_count_exception, "count_exception");
    INTERN(s_count_model_request, "count_model_request");
    INTERN(s_close, "close");
    INTERN(s_name, "__name__");
    INTERN(s_route, "route");
    INTERN(s_record, "record");
    INTERN(s_status_500, "500");
    INTERN(s_no_start_response, "NoStartResponse");
    INTERN(s_xx, "xx");
    INTERN(s_empty, "");
    INTERN(s_request_method, "REQUEST_METHOD");
    INTERN(s_script_name, "SCRIPT_NAME");
    INTERN(s_content_length, "CONTENT_LENGTH");
    INTERN(s_file_wrapper, "wsgi.file_wrapper");
    INTERN(s_mount_prefixes, "mount_prefixes");
    if (PyType_Ready(&RecordType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
#ifdef KERNEL_X86_64
    __builtin_cpu_init();
    has_avx2 = __builtin_cpu_supports("avx2");
#endif
    if (PyType_Ready(&CategoryCounterType) < 0 ||
        PyModule_AddObjectRef(module, "CategoryCounter", (PyObject *)&CategoryCounterType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    if (PyType_Ready(&NumericKernelType) < 0 ||
        PyModule_AddObjectRef(module, "NumericKernel", (PyObject *)&NumericKernelType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "TimedResponse", (PyObject *)&RecordType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
