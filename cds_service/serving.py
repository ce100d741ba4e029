"""``cds-service serve``: the production server — gunicorn, its worker model, limits and logs.

Worker model (chosen by measurement; docs/deploy.md, "Worker model"): gunicorn **gthread**, one
worker process per core and ``server.threads`` threads in each.

* The screening is CPU-bound Python: one process per core is what uses every core. gevent workers
  were measured too: a worker runs its screenings one after another, and a long screening stalls
  every other connection of that worker; they gave fewer hooks per second than gthread here
  (``make probe PROBE_ARGS=--compare-workers``; the figures are in docs/deploy.md).
* A hook waiting for a slow FHIR server, and a slow client sending its request, each hold one
  thread, not a process: other hooks and ``/health`` are answered by the other threads. Sync workers
  (the previous model) gave a whole process to each, so two slow clients stopped the service.
* Threads are bounded, so a directly exposed service can still be exhausted by ``workers × threads``
  clients that never finish their headers. In production a buffering proxy (nginx, the documented
  topology) reads whole requests before they reach a thread; see docs/deploy.md.

The process-wide garbage-collector pause of a hook is counted across threads (protocol/api.py,
``GcPause``). gunicorn's own log lines go through the service's JSON log handler (with its
redaction), its own error pages are JSON OperationOutcomes, header limits let an oversized
``Authorization`` reach the service's own check, and no control socket is opened (each instance on a
host would otherwise share ``~/.gunicorn/gunicorn.ctl``).
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import sys
import tempfile
from typing import Any

import orjson
from gunicorn import glogging, util
from gunicorn.app.base import BaseApplication

from .app import create_app
from .base import metrics as prometheus
from .base.config import Settings, check_open_binding
from .base.errors import operation_outcome

log = logging.getLogger(__name__)

#: gunicorn's per-header-line limit: above the service's own 16 KiB ``Authorization`` check
#: (protocol/auth.py), so that such a header gets the service's JSON 401, not gunicorn's error.
HEADER_FIELD_LIMIT = 32 * 1024
#: The longest request line gunicorn accepts (its maximum).
REQUEST_LINE_LIMIT = 8190
WORKER_TIMEOUT_SECONDS = 30
KEEPALIVE_SECONDS = 5


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    """The gunicorn settings ``serve`` runs with (also what the tests and docs/deploy.md check)."""
    server = settings.section("server")
    return {
        "bind": f"{server['host']}:{server['port']}",
        "workers": settings.workers,
        "worker_class": "gthread",
        "threads": server["threads"],
        "worker_connections": 1000,
        "timeout": WORKER_TIMEOUT_SECONDS,
        "graceful_timeout": WORKER_TIMEOUT_SECONDS,
        "keepalive": KEEPALIVE_SECONDS,
        "limit_request_line": REQUEST_LINE_LIMIT,
        "limit_request_fields": 100,
        "limit_request_field_size": HEADER_FIELD_LIMIT,
        "accesslog": None,  # request URLs are not logged (the service logs what it does, without PHI)
        "errorlog": "-",
        "logger_class": JsonGunicornLogger,
        "preload_app": True,
        "control_socket_disable": True,
    }


class JsonGunicornLogger(glogging.Logger):  # type: ignore[misc]
    """gunicorn's error log, sent through the root logger: the service's JSON lines and redaction."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for handler in list(self.error_log.handlers):
            self.error_log.removeHandler(handler)
        self.error_log.propagate = True


def _json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's own error answer (a malformed request, a header over the limits…) as an
    OperationOutcome. Only the status reason is returned: ``mesg`` may echo the request."""
    body = orjson.dumps(operation_outcome(int(status_int), f"{reason}: the request was not accepted"))
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/fhir+json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


def use_json_error_pages() -> None:
    """Make gunicorn write its error pages as JSON (its workers call ``gunicorn.util.write_error``)."""
    util.write_error = _json_error


class _Server(BaseApplication):  # type: ignore[misc]
    def __init__(self, app: Any, options: dict[str, Any], on_exit: Any) -> None:
        self._app = app
        self._options = options
        self._on_exit = on_exit
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)
        self.cfg.set("child_exit", lambda _arbiter, worker: prometheus.mark_process_dead(worker.pid))
        if self._on_exit is not None:
            self.cfg.set("on_exit", lambda _arbiter: self._on_exit())

    def load(self) -> Any:
        return self._app


def open_store_before_fork(app: Any) -> None:
    """Open the store (and apply its migrations) once, here, before the workers fork: otherwise each
    worker's first hook opens it inside the hook's short store budget and shows its cards without the
    silence check. A store that cannot be reached now is not fatal (cards are still answered): the
    workers keep trying, and the log says so."""
    try:
        app.extensions["cds"].store  # noqa: B018 - the property opens it
    except Exception:
        log.exception("store unavailable at start-up: the workers will keep trying")


#: glibc ``mallopt`` parameters (malloc.h) and the values ``keep_freed_memory`` sets.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
#: Free memory at the top of the heap is given back to the kernel only beyond this much.
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024
#: Allocations from this size up get their own mapping (glibc's largest allowed value on 64 bits).
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
#: malloc arenas per process: the GIL serialises Python's allocations anyway, and each arena keeps
#: its own freed memory, so few arenas bound what the process keeps.
ARENA_MAX = 2


def keep_freed_memory() -> bool:
    """Let a worker keep the memory a hook frees (up to ``TRIM_THRESHOLD_BYTES`` per arena, in
    ``ARENA_MAX`` arenas) for the next hook, instead of giving it back to the kernel at once.

    A hook decodes, reads and frees a few MB. With glibc's defaults (a 128 KiB trim threshold that
    adapts, eight arenas per core) a worker gave most of that back after each hook and took it again
    at the next one: ~580 page faults and ~2 ms of kernel time per hook at 1 000 Observations
    (docs/performance.md). Set in the master before it forks; the workers inherit it. Only on
    glibc (False elsewhere: the defaults stay)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(
        mallopt(parameter, value) == 1
        for parameter, value in (
            (M_ARENA_MAX, ARENA_MAX),
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        )
    )


def serve(settings: Settings) -> int:
    """Build the app in this process, then fork the workers and serve in the foreground."""
    check_open_binding(settings)  # before anything starts: a ConfigError names the way out
    # Aggregate /metrics across gunicorn workers: file-backed values, switched on before the app (and
    # its metrics) exist and before the workers fork. prometheus-client picked its value class when it
    # was imported, so setting the environment variable alone is not enough. A directory we create is
    # removed at exit; a given one ($PROMETHEUS_MULTIPROC_DIR) is emptied of old files.
    given_dir = os.environ.get(prometheus.MULTIPROC_ENV) or ""
    metrics_dir = prometheus.enable_multiprocess(
        given_dir or tempfile.mkdtemp(prefix="cds-metrics-"), wipe=True
    )
    app = create_app(settings)  # loads and validates every knowledge file before any worker starts
    open_store_before_fork(app)
    # Objects created at start-up live for the worker's lifetime: keep them out of GC scans.
    gc.collect()
    gc.freeze()
    if not keep_freed_memory():
        log.info("malloc tuning not applied (not glibc): freed memory goes back to the kernel at once")
    use_json_error_pages()
    options = gunicorn_options(settings)
    server = settings.section("server")
    print(
        f"cds-service: serving on http://{server['host']}:{server['port']}/cds-services with "
        f"{options['workers']} workers × {options['threads']} threads ({settings.source})",
        file=sys.stderr,
    )
    on_exit = None if given_dir else (lambda: shutil.rmtree(metrics_dir, ignore_errors=True))
    _Server(app, options, on_exit).run()
    return 0
