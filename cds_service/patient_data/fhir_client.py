"""FHIR R4 REST client for the hook's own data fetches: allow-list, deadline, concurrency, paging.

One :class:`FhirClient` lives for the whole worker process. It keeps one ``requests.Session``
(connection reuse: ~3x faster than a new connection per call) and one ``ThreadPoolExecutor`` so
that the searches of one hook run in parallel. The pool has ``max_workers`` threads for each hook
the process may answer at once (``concurrent_hooks``, the worker's threads): hooks waiting on a
server that does not answer cannot take the threads another hook's queries need. Every public call
takes an absolute deadline (a ``time.monotonic()`` value) and returns or raises by that deadline plus
:data:`DEADLINE_SLACK`; work still running after the deadline is abandoned (its result is dropped),
never waited for.

Everything that prevents the evaluation from getting complete data raises :class:`DataUnavailable`
(the route answers 412). Its ``reason`` is safe to log: it names the resource type and the failure
("Observation query (vitals): HTTP 500"), never the URL query (it holds the patient id), the access
token or other headers. A caller that is not trusted gets only :attr:`DataUnavailable.public_reason`
(the category): telling "connection failed" from "HTTP 404" from "timed out" would let anyone map
which hosts and ports answer HTTP behind the service.

Size: one hook's responses together (every query and page) may hold at most
``max_response_bytes`` (:class:`ByteBudget`); bodies are read as a stream and cut at the limit, so a
huge answer costs neither the memory nor the time of reading it whole.

Token safety: the bearer token is only sent to URLs inside ``base_url`` *and* inside an allowed
server (``allowed_servers``; when empty, any https server, and http servers only with
``allow_http``). A server that is not allowed is never contacted at all (:class:`ServerNotAllowed`),
redirects are never followed, ``next`` links leaving ``base_url`` are never followed, and the
session of its own keeps no cookies (so nothing learnt from one hook's server leaks into another's).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import http.cookiejar
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple, TypeVar
from urllib.parse import unquote, urljoin, urlsplit
from urllib.request import getproxies

import orjson
import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.utils import requote_uri, should_bypass_proxies

from .lean_json import STRUCT_TYPES, UNSET, LeanEntry, LeanResource, decode_search_page

__all__ = ["DEADLINE_SLACK", "ByteBudget", "DataUnavailable", "FhirClient", "ServerNotAllowed"]

logger = logging.getLogger(__name__)

#: How long after the deadline a public call may still take to return or raise (seconds).
DEADLINE_SLACK = 0.05
#: Body read size: the deadline is checked between reads, so a big slow body is cut off in time.
_CHUNK_BYTES = 256 * 1024
_ACCEPT = "application/fhir+json"
_USER_AGENT = "cds-septic-shock-trials fhir-client"
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: FHIR servers whose proxy choice is remembered (they are few: the allowed EHRs).
_MAX_ORIGINS = 64
#: The metrics label of a request whose resource type is not one the service asks for.
OTHER_RESOURCE_TYPE = "other"
#: What an untrusted caller is told when the FHIR server could not be used (details go to the log).
PUBLIC_FETCH_REASON = "the FHIR server could not be read in time"
PUBLIC_NOT_ALLOWED_REASON = "the fhirServer is not one this service is configured to use"

_T = TypeVar("_T")


class DataUnavailable(Exception):
    """Data the evaluation needs cannot be had (→ HTTP 412).

    ``reason`` is safe to log: no token, no patient id, no full URL query.
    """

    #: What the category is, for callers who may not see the details (see the module docstring).
    public_reason: str | None = None

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ServerNotAllowed(DataUnavailable):
    """The FHIR server named by the hook is not one this service may contact."""

    public_reason = PUBLIC_NOT_ALLOWED_REASON


class ByteBudget:
    """How many more response bytes one hook may read (thread-safe: its queries run in parallel)."""

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self._used = 0
        self._lock = threading.Lock()

    def take(self, count: int, label: str) -> None:
        with self._lock:
            self._used += count
            over = self._used > self.limit
        if over:
            raise DataUnavailable(f"{label}: FHIR responses over the limit of {self.limit} bytes")

    def check_announced(self, length: str | None, label: str) -> None:
        """Fail before reading when the announced Content-Length alone is over what is left."""
        try:
            announced = int(length) if length is not None else 0
        except ValueError:
            return
        with self._lock:
            over = self._used + announced > self.limit
        if over:
            raise DataUnavailable(f"{label}: FHIR responses over the limit of {self.limit} bytes")


def _origin_and_path(url: str) -> tuple[str, str, int | None, str]:
    """(scheme, host, effective port, path without trailing slash) of an absolute URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:  # a port that is not a number
        port = -1
    return scheme, (parts.hostname or "").lower(), port, parts.path.rstrip("/")


def _inside(url: str, base_url: str) -> bool:
    """True when ``url`` is ``base_url`` or below it (same scheme, host and port; path under it)."""
    scheme, host, port, path = _origin_and_path(url)
    b_scheme, b_host, b_port, b_path = _origin_and_path(base_url)
    if (scheme, host, port) != (b_scheme, b_host, b_port) or not host:
        return False
    # "Patient/../../admin" would be normalised by urllib3 (or the server) to a path outside the base.
    if any(unquote(segment) in (".", "..") for segment in path.split("/")):
        return False
    return path == b_path or path.startswith(b_path + "/")


def _resource_type(relative: str) -> str:
    """The resource type a relative FHIR URL is about, or "FHIR" when it does not look like one."""
    first = relative.lstrip("/").split("?", 1)[0].split("/", 1)[0]
    return first if _RESOURCE_TYPE.match(first) else "FHIR"


def _join(base_url: str, relative: str) -> str:
    return base_url.rstrip("/") + "/" + relative.lstrip("/")


def _next_link(bundle: dict[str, Any]) -> str | None:
    links = bundle.get("link")
    if not isinstance(links, list):
        return None
    for link in links:
        if isinstance(link, dict) and link.get("relation") == "next":
            url = link.get("url")
            return url if isinstance(url, str) and url else None
    return None


def _bundle_resources(bundle: dict[str, Any], label: str) -> list[dict[str, Any]]:
    """``entry[].resource`` of a searchset Bundle, without ``search.mode == "outcome"`` entries."""
    kind = bundle.get("resourceType")
    if kind == "OperationOutcome":
        codes = sorted(
            {
                str(issue.get("code"))
                for issue in bundle.get("issue") or []
                if isinstance(issue, dict) and isinstance(issue.get("code"), str)
            }
        )
        # Issue codes are a FHIR value set ("not-found", "forbidden"...); diagnostics may name the patient.
        detail = f" ({', '.join(codes)})" if codes else ""
        raise DataUnavailable(f"{label}: the server returned an OperationOutcome instead of a Bundle{detail}")
    if kind != "Bundle":
        shown = kind if isinstance(kind, str) and _RESOURCE_TYPE.match(kind) else "no resourceType"
        raise DataUnavailable(f"{label}: expected a Bundle, got {shown}")
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise DataUnavailable(f"{label}: malformed Bundle (entry is not a list)")
    resources: list[dict[str, Any]] = []
    for entry in entries:
        if type(entry) is LeanEntry:  # (a prefetch Bundle's first page, as the lean decode gives it)
            search, resource = entry.search, entry.resource
            if search is not UNSET and search.mode == "outcome":
                continue
        elif isinstance(entry, dict):
            search = entry.get("search")
            if isinstance(search, dict) and search.get("mode") == "outcome":
                continue
            resource = entry.get("resource")
        else:
            continue
        if isinstance(resource, dict | LeanResource):  # (a prefetch Bundle's bulk resources)
            resources.append(resource)
    return resources


#: What a connection the server closed gives a request sent on it before any answer came back.
_CLOSED_UNDER_US = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def _closed_before_answering(error: BaseException) -> bool:
    """True when ``error`` says the server closed the connection before answering the request (no
    status line came back). Connection refused, timeouts and bodies cut short are not this."""
    if not isinstance(error, requests.ConnectionError) or not error.args:
        return False
    cause = error.args[0]
    return isinstance(cause, urllib3.exceptions.ProtocolError) and any(
        isinstance(part, _CLOSED_UNDER_US) for part in cause.args
    )


def _read_body(response: requests.Response, deadline: float, label: str, budget: ByteBudget) -> bytes:
    """The (decoded) body, read piece by piece with the deadline and the size budget checked between
    pieces (decoded bytes count: a small compressed body cannot expand past the limit).

    ``read1`` returns whatever one socket read gives, so a server trickling its body a few bytes at a
    time cannot keep the worker thread past the deadline (``iter_content`` would block until a whole
    chunk has arrived). urllib3 < 2.3 has no ``read1``: fall back to ``iter_content`` there.
    """
    budget.check_announced(response.headers.get("Content-Length"), label)
    chunks: list[bytes] = []
    read1 = getattr(response.raw, "read1", None)
    pieces = iter(lambda: read1(_CHUNK_BYTES, decode_content=True), b"") if read1 else None
    for chunk in pieces or response.iter_content(_CHUNK_BYTES):
        budget.take(len(chunk), label)
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise DataUnavailable(f"{label}: deadline exceeded")
    return b"".join(chunks)


class _PrefetchPaging(NamedTuple):
    """A prefetch Bundle to complete: its own resources, its next link, the URLs already read (its
    ``self`` link), the resource type its requests are labelled with, and their label."""

    first: list[dict[str, Any]]
    next_url: str | None
    seen: set[str]
    kind: str
    label: str


class FhirClient:
    """Fetches FHIR data for hooks from the hook's ``fhirServer`` within a deadline.

    ``fhir`` is ``settings.section("fhir")``: ``allowed_servers``, ``allow_http``,
    ``deadline_seconds``, ``lookback_hours``, ``page_size``, ``max_pages``, ``max_workers``,
    ``max_response_bytes``. Thread-safe: concurrent hooks may share one client. Safe across
    ``fork()`` too: a child process gets a fresh session and pool on first use.

    ``on_query`` gets the resource type of the request the service made (from its own query, never
    from the response or a ``next`` link), or ``"other"`` when that type is not in
    ``resource_types`` (the types the service asks for): metrics labels stay a fixed set.
    """

    def __init__(
        self,
        fhir: dict[str, Any],
        session: requests.Session | None = None,
        on_query: Callable[[str, float, bool], None] | None = None,
        resource_types: Collection[str] | None = None,
        concurrent_hooks: int = 1,
    ) -> None:
        #: Called after every HTTP request with (resource type, seconds, ok) — e.g. ``Metrics.fhir_query``.
        self.on_query = on_query
        self.resource_types = frozenset(resource_types) if resource_types is not None else None
        self.max_response_bytes: int = int(fhir.get("max_response_bytes", 32 * 1024 * 1024))
        self.allowed_servers: list[str] = [str(url).rstrip("/") for url in fhir.get("allowed_servers") or []]
        self.allow_http: bool = bool(fhir.get("allow_http", False))
        self.deadline_seconds: float = float(fhir.get("deadline_seconds", 3.0))
        self.lookback_hours: float = float(fhir.get("lookback_hours", 72))
        self.page_size: int = int(fhir.get("page_size", 1000))
        self.max_pages: int = int(fhir.get("max_pages", 20))
        self.max_workers: int = int(fhir.get("max_workers", 8))
        self.pool_threads = self.max_workers * max(1, int(concurrent_hooks))
        self._given_session = session
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._session = session or self._new_session()
        self._executor = self._new_executor()

    # -- lifetime -----------------------------------------------------------------------------

    def _new_session(self) -> requests.Session:
        session = requests.Session()
        # Keep a connection per host for every request the pool's threads can make at once: with
        # fewer, the connections above the limit are closed after each use and the next hooks
        # open new ones (requests' default keeps 10; several hooks each run max_workers searches).
        adapter = HTTPAdapter(pool_connections=16, pool_maxsize=max(10, self.pool_threads))
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        session.headers["User-Agent"] = _USER_AGENT
        # No cookies: one shared session serves many users' hooks.
        session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        # The environment is read here, once, not by requests on every request (proxy variables,
        # NO_PROXY, ~/.netrc: ~0.5 ms of CPU per request, a third of a search's cost in the
        # client, paid again for each of a hook's searches while they are being sent). Proxies
        # (HTTPS_PROXY, NO_PROXY, ...) and the CA bundle (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE) mean
        # what they mean to requests; ~/.netrc is never used: no credentials from a file are sent
        # to a server a hook names.
        session.trust_env = False
        session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        self._env_proxies = {key: url for key, url in getproxies().items() if key != "no"}
        self._no_proxy = getproxies().get("no")
        self._proxies_by_origin: dict[tuple[str, str, int | None], dict[str, str]] = {}
        # Every GET this session sends is this one with its URL (and token) put in: prepared once,
        # copied per request (see `_send_get`).
        self._prepared_get = requests.PreparedRequest()
        self._prepared_get.prepare(
            method="GET", url="http://fhir.invalid/", headers={**session.headers, "Accept": _ACCEPT}
        )
        return session

    def _proxies_for(self, url: str) -> dict[str, str]:
        """The proxies requests would use for ``url`` from the environment read at start-up
        (``{}``: none, or the host is in NO_PROXY), worked out once per scheme, host and port."""
        if not self._env_proxies:
            return {}
        scheme, host, port, _ = _origin_and_path(url)
        origin = (scheme, host, port)
        proxies = self._proxies_by_origin.get(origin)
        if proxies is None:
            bypass = should_bypass_proxies(url, no_proxy=self._no_proxy)
            proxies = {} if bypass else dict(self._env_proxies)
            if len(self._proxies_by_origin) >= _MAX_ORIGINS:  # hooks name servers: keep it bounded
                self._proxies_by_origin.clear()
            self._proxies_by_origin[origin] = proxies
        return proxies

    def _new_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        # Threads are started on demand, up to the limit.
        return concurrent.futures.ThreadPoolExecutor(max_workers=self.pool_threads, thread_name_prefix="fhir")

    def _pool(self) -> tuple[requests.Session, concurrent.futures.ThreadPoolExecutor]:
        """The session and executor of this process (rebuilt once after a fork: threads do not survive it)."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._session = self._given_session or self._new_session()
                    self._executor = self._new_executor()
                    self._pid = os.getpid()
        return self._session, self._executor

    def close(self) -> None:
        """Stop the pool (queued work is cancelled, running requests are abandoned) and the session."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._given_session is None:
            self._session.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- allow-list ----------------------------------------------------------------------------

    def check_server(self, base_url: str) -> None:
        """Raise :class:`ServerNotAllowed` unless ``base_url`` is a FHIR base this service may contact."""
        try:
            parts = urlsplit(base_url)
            parts.port  # noqa: B018 - raises ValueError on a non-numeric port
        except ValueError:
            raise self._fail(ServerNotAllowed("fhirServer is not a valid URL")) from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise self._fail(ServerNotAllowed("fhirServer is not an absolute http(s) URL"))
        if parts.username is not None or parts.password is not None:
            raise self._fail(ServerNotAllowed("fhirServer must not carry credentials"))
        if parts.query or parts.fragment:
            raise self._fail(ServerNotAllowed("fhirServer must be a base URL (no query or fragment)"))
        if scheme == "http" and not self.allow_http:
            raise self._fail(ServerNotAllowed("fhirServer uses plain http, which is not allowed"))
        if self.allowed_servers and not any(_inside(base_url, allowed) for allowed in self.allowed_servers):
            # The host is configuration-independent public information; the path could be anything.
            raise self._fail(
                ServerNotAllowed(f"fhirServer {scheme}://{parts.hostname} is not an allowed server")
            )

    def _token_allowed(self, url: str) -> bool:
        """True when the bearer token may be sent to ``url`` (which must already be inside base_url)."""
        if self.allowed_servers:
            return any(_inside(url, allowed) for allowed in self.allowed_servers)
        scheme = urlsplit(url).scheme.lower()
        return scheme == "https" or (scheme == "http" and self.allow_http)

    # -- public calls -------------------------------------------------------------------------

    def search_many(
        self,
        base_url: str,
        token: str | None,
        queries: dict[str, str],
        deadline: float,
        *,
        single_page: Collection[str] = (),
        budget: ByteBudget | None = None,
        follow: Mapping[str, tuple[dict[str, Any], str]] | None = None,
        lean: bool = False,
    ) -> dict[str, list[dict[str, Any]]]:
        """Run every search concurrently, following ``next`` links; key -> resources (all pages).

        ``queries`` maps a key to a search relative to ``base_url``, e.g.
        ``"Observation?patient=123&code=http://loinc.org|2524-7&date=ge2026-11-18T00:00:00Z"``.
        Values must already be URL-safe: a ``+`` in a time-zone offset must be written ``%2B``.
        Keys in ``single_page`` get their first page only (``_sort=-date&_count=N``: "the latest N").
        ``follow`` maps other keys to (prefetch Bundle, resource type asked for): each gets what
        :meth:`follow_next` would give, its pages read alongside the searches rather than after them.
        Raises :class:`DataUnavailable` as soon as one search fails, or at the deadline. ``budget``
        (default: a new one of ``max_response_bytes``) is shared by every response read.
        ``lean``: the Observations and MedicationAdministrations of Observation and administration
        searches come as :class:`~.lean_json.LeanResource` Structs, as in a prefetch Bundle decoded
        with the hook request (what gathering gives extraction); otherwise every resource is a dict.
        """
        self.check_server(base_url)
        if not queries and not follow:
            return {}
        budget = budget or self.new_budget()
        _, executor = self._pool()
        futures: dict[str, concurrent.futures.Future[list[dict[str, Any]]]] = {}
        labels: dict[str, str] = {}
        ready: dict[str, list[dict[str, Any]]] = {}  # prefetch Bundles with no next page
        for key, (bundle, resource_type) in (follow or {}).items():
            paging = self._prefetch_paging(bundle, resource_type)
            if paging.next_url is None:
                ready[key] = paging.first
                continue
            labels[key] = paging.label
            futures[key] = executor.submit(self._after_first_page, paging, base_url, token, deadline, budget)
        for key, query in queries.items():
            kind = _resource_type(query)
            labels[key] = f"{kind} query ({key})"
            futures[key] = executor.submit(
                self._follow,
                base_url,
                token,
                base_url,
                _join(base_url, query),
                deadline,
                labels[key],
                set(),
                pages=0,
                page_limit=1 if key in single_page else None,
                budget=budget,
                kind=kind,
                lean=lean and kind in STRUCT_TYPES,
            )
        done, pending = concurrent.futures.wait(
            futures.values(),
            timeout=max(0.0, deadline - time.monotonic()) + DEADLINE_SLACK,
            return_when=concurrent.futures.FIRST_EXCEPTION,
        )
        failed = [key for key, future in futures.items() if future in done and future.exception() is not None]
        if failed or pending:
            for future in pending:
                future.cancel()  # queued work is dropped; running work is abandoned
            if failed:
                error = futures[failed[0]].exception()
                if isinstance(error, DataUnavailable):
                    raise self._fail(error)
                raise error  # type: ignore[misc]  # a bug, not a data problem: let it be a 500
            late = ", ".join(labels[key] for key, future in futures.items() if future in pending)
            raise self._fail(DataUnavailable(f"deadline exceeded waiting for {late}"))
        results = {key: future.result() for key, future in futures.items()}
        return {key: ready[key] if key in ready else results[key] for key in [*(follow or {}), *queries]}

    def follow_next(
        self,
        base_url: str,
        token: str | None,
        bundle: dict[str, Any],
        deadline: float,
        resource_type: str = "FHIR",
        budget: ByteBudget | None = None,
    ) -> list[dict[str, Any]]:
        """All resources of a (prefetch) searchset Bundle: its own plus those of its ``next`` pages.

        ``resource_type`` is what the service asked for with this prefetch key (the label of the
        requests in logs and metrics; the Bundle's own content, sent by the caller, is not used).
        """
        self.check_server(base_url)
        paging = self._prefetch_paging(bundle, resource_type)
        if paging.next_url is None:
            return paging.first
        spent = budget or self.new_budget()
        return self._run(
            lambda: self._after_first_page(paging, base_url, token, deadline, spent), deadline, paging.label
        )

    def _prefetch_paging(self, bundle: dict[str, Any], resource_type: str) -> _PrefetchPaging:
        try:
            first = _bundle_resources(bundle, "prefetch Bundle")
        except DataUnavailable as error:
            raise self._fail(error) from None
        kind = resource_type if _RESOURCE_TYPE.match(resource_type) else "FHIR"
        seen: set[str] = set()
        for link in bundle.get("link") or []:
            if isinstance(link, dict) and link.get("relation") == "self" and isinstance(link.get("url"), str):
                seen.add(requote_uri(link["url"]))
        return _PrefetchPaging(first, _next_link(bundle), seen, kind, f"{kind} prefetch paging")

    def _after_first_page(
        self, paging: _PrefetchPaging, base_url: str, token: str | None, deadline: float, budget: ByteBudget
    ) -> list[dict[str, Any]]:
        """The first page's resources and those of every page after it."""
        assert paging.next_url is not None
        rest = self._follow(
            base_url,
            token,
            base_url,
            paging.next_url,
            deadline,
            paging.label,
            paging.seen,
            pages=1,
            budget=budget,
            kind=paging.kind,
        )
        return paging.first + rest

    def read(
        self, base_url: str, token: str | None, path: str, deadline: float, budget: ByteBudget | None = None
    ) -> dict[str, Any]:
        """Read one resource, e.g. ``path="Patient/123"``."""
        self.check_server(base_url)
        kind = _resource_type(path)
        label = f"{kind} read"
        url = _join(base_url, path)
        budget = budget or self.new_budget()
        resource = self._run(
            lambda: self._get_json(url, base_url, token, deadline, label, budget, kind), deadline, label
        )
        if resource.get("resourceType") != kind and kind != "FHIR":
            shown = resource.get("resourceType")
            shown = shown if isinstance(shown, str) and _RESOURCE_TYPE.match(shown) else "no resourceType"
            raise self._fail(DataUnavailable(f"{label}: expected a {kind}, got {shown}"))
        return resource

    # -- internals ----------------------------------------------------------------------------

    def new_budget(self) -> ByteBudget:
        """A byte budget of ``max_response_bytes``: one per hook, shared by all its reads."""
        return ByteBudget(self.max_response_bytes)

    def _fail(self, error: DataUnavailable) -> DataUnavailable:
        logger.warning("FHIR data unavailable: %s", error.reason)
        if error.public_reason is None:
            error.public_reason = PUBLIC_FETCH_REASON
        return error

    def _run(self, work: Callable[[], _T], deadline: float, label: str) -> _T:
        """Run ``work`` in the pool and wait for it no longer than the deadline."""
        _, executor = self._pool()
        future = executor.submit(work)
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()) + DEADLINE_SLACK)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise self._fail(DataUnavailable(f"{label}: deadline exceeded")) from None
        except DataUnavailable as error:
            raise self._fail(error) from None

    def _follow(
        self,
        base_url: str,
        token: str | None,
        current_url: str,
        url: str,
        deadline: float,
        label: str,
        seen: set[str],
        pages: int,
        page_limit: int | None = None,
        budget: ByteBudget | None = None,
        kind: str = "FHIR",
        lean: bool = False,
    ) -> list[dict[str, Any]]:
        """Fetch ``url`` and every following ``next`` page; ``pages`` = pages already read.

        With ``page_limit``, stop quietly after that many pages (the caller asked for a first page).
        ``lean``: decode the pages with :func:`~.lean_json.decode_search_page`.
        """
        budget = budget or self.new_budget()
        resources: list[dict[str, Any]] = []
        next_url: str | None = url
        while next_url is not None and (page_limit is None or pages < page_limit):
            absolute = urljoin(current_url, next_url)  # FHIR says absolute; tolerate relative links
            if not _inside(absolute, base_url):
                raise DataUnavailable(
                    f"{label}: a next link leaves the FHIR server base URL and was not followed;"
                    " results would be incomplete"
                )
            key = requote_uri(absolute)
            if key in seen:
                raise DataUnavailable(f"{label}: next links loop back to an earlier page")
            if pages >= self.max_pages:
                raise DataUnavailable(
                    f"{label}: more than {self.max_pages} pages; results would be incomplete"
                )
            seen.add(key)
            page_label = label if pages == 0 else f"{label} page {pages + 1}"
            bundle = self._get_json(absolute, base_url, token, deadline, page_label, budget, kind, lean)
            resources.extend(_bundle_resources(bundle, page_label))
            pages += 1
            current_url = absolute
            next_url = _next_link(bundle)
        return resources

    def _get_json(
        self,
        url: str,
        base_url: str,
        token: str | None,
        deadline: float,
        label: str,
        budget: ByteBudget,
        kind: str,
        lean: bool = False,
    ) -> dict[str, Any]:
        """:meth:`_fetch_json`, reported to ``on_query`` (resource type, seconds, ok) when set.

        ``kind`` is the resource type of the service's own query.
        """
        if self.on_query is None:
            return self._fetch_json(url, base_url, token, deadline, label, budget, lean)
        started = time.monotonic()
        ok = False
        try:
            document = self._fetch_json(url, base_url, token, deadline, label, budget, lean)
            ok = True
            return document
        finally:
            try:
                self.on_query(self._metric_label(kind), time.monotonic() - started, ok)
            except Exception as error:  # metrics must never break a fetch
                logger.warning("FHIR query callback failed (%s)", type(error).__name__)

    def _metric_label(self, kind: str) -> str:
        if self.resource_types is None:
            return kind if _RESOURCE_TYPE.match(kind) else "FHIR"
        return kind if kind in self.resource_types else OTHER_RESOURCE_TYPE

    def _send_get(
        self, session: requests.Session, url: str, authorization: str | None, timeout: float
    ) -> requests.Response:
        """GET ``url`` on ``session``: streamed, redirects not followed, proxies as the environment
        said at start-up (see :meth:`_new_session`).

        On the client's own session the request is a copy of one prepared at start-up, with its URL
        (requoted, as requests would) and the token put in, sent with ``Session.send``.
        ``Session.get`` would prepare it anew each time, merging the session's headers, cookies,
        auth and environment, none of which changes: ~0.18 ms of CPU per request against ~0.03,
        for the nine or so requests a hook makes while its searches run (issue 17). What goes on
        the wire is the same, except that no user:password in a ``next`` link becomes an
        Authorization header (the allow-list already refuses a base URL that carries one).
        """
        if session is self._given_session:
            headers = {"Accept": _ACCEPT}
            if authorization:
                headers["Authorization"] = authorization
            return session.get(
                url, headers=headers, timeout=(timeout, timeout), stream=True, allow_redirects=False
            )
        prepared = self._prepared_get.copy()
        prepared.url = requote_uri(url)
        if authorization:
            prepared.headers["Authorization"] = authorization
        return session.send(
            prepared,
            timeout=(timeout, timeout),
            stream=True,
            allow_redirects=False,
            proxies=self._proxies_for(url),
            verify=session.verify,
            cert=None,
        )

    def _fetch_json(
        self,
        url: str,
        base_url: str,
        token: str | None,
        deadline: float,
        label: str,
        budget: ByteBudget,
        lean: bool = False,
    ) -> dict[str, Any]:
        """GET one URL inside ``base_url`` and decode its JSON object, all within the deadline.

        ``lean``: a page of an Observation or administration search, decoded as the same search's
        prefetch Bundle is (:func:`~.lean_json.decode_search_page`), in full when not in its shapes.
        """
        if not _inside(url, base_url):
            raise DataUnavailable(f"{label}: URL outside the FHIR server base URL")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DataUnavailable(f"{label}: deadline exceeded")
        authorization = f"Bearer {token}" if token and self._token_allowed(url) else None
        session, _ = self._pool()
        for attempt in range(2):
            try:
                with self._send_get(session, url, authorization, remaining) as response:
                    if not 200 <= response.status_code < 300:
                        note = " (redirects are not followed)" if 300 <= response.status_code < 400 else ""
                        raise DataUnavailable(f"{label}: HTTP {response.status_code}{note}")
                    body = _read_body(response, deadline, label, budget)
                break
            except (requests.RequestException, urllib3.exceptions.HTTPError) as error:
                remaining = deadline - time.monotonic()
                if attempt == 0 and remaining > 0 and _closed_before_answering(error):
                    # A kept-alive connection the server closed as this request went out (its idle
                    # timeout ended at that moment): any HTTP client sends an idempotent GET once
                    # more, on a new connection. The pool has already dropped the closed one.
                    logger.info("%s: the FHIR server closed a kept-alive connection; sent again", label)
                    continue
                if remaining <= 0 or isinstance(error, requests.Timeout):
                    raise DataUnavailable(f"{label}: timed out at the deadline") from None
                if isinstance(error, requests.ConnectionError):
                    raise DataUnavailable(f"{label}: connection failed") from None
                raise DataUnavailable(f"{label}: request failed ({type(error).__name__})") from None
        document = decode_search_page(body) if lean else None
        if document is not None:
            return document
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise DataUnavailable(f"{label}: malformed JSON") from None
        if not isinstance(document, dict):
            raise DataUnavailable(f"{label}: malformed response (not a JSON object)")
        return document
