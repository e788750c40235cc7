"""The HTTP retrieval service (DESIGN.md, "HTTP service"): FastAPI app factory and ``recsys serve``.

Endpoints: GET /healthz, POST /recommend, GET /items/{item_id}/similar, POST /items (admin),
POST /events (admin), POST /admin/reload (admin), GET /readyz, GET /metrics (Prometheus text). Admin calls need
``Authorization: Bearer <RECSYS_ADMIN_TOKEN>``; the token is read once by ``serve`` and passed
in, and admin calls are refused (403) when there is none.

The live ``Recommender`` is one attribute: a reload builds the new one off to the side, then
swaps the reference, so a request that started on the old model and index finishes on them.
"""

import asyncio
import gc
import hmac
import json
import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
import polars as pl
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from recsys.errors import ConfigError, DataError, RecsysError, RunError
from recsys.events import COLUMNS as EVENT_COLUMNS
from recsys.events import EVENTS_DIR, EventLog, event_schema, read_events
from recsys.rundir import PUBLISHED_FILE, RunDir
from serving.batcher import MicroBatcher
from serving.live import LiveHistories
from serving.recommender import INT64_PATTERN, DuplicateItem, EventAhead, NewItem, Recommender, RequestError, UnknownItem, decode_image_base64

log = logging.getLogger("recsys.serve")
access_log = logging.getLogger("recsys.access")

MAX_ID_CHARS = 256  # string ids
MAX_JSON_INT = 2**53 - 1  # integer ids as JSON numbers (larger int64 ids go as text)
MAX_HISTORY = 1000  # request history ids accepted (the model keeps the last history_len)
MAX_NEW_ITEMS = 256  # items per POST /items
MAX_EVENTS = 10_000  # events per POST /events
MAX_TEXT_CHARS = 100_000
MAX_IMAGE_BASE64 = 8_000_000  # characters (~6 MB image)
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"  # what b64decode(validate=True) takes
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


# -- request and response models -------------------------------------------------------------
# Every limit and type a handler relies on is a pydantic constraint here, so /openapi.json is the
# contract the handlers enforce. Limits that depend on the run (id types, serve.max_k) come from
# the served run's ``Contract``; a reload to a run with another contract is refused.
def _unicode(text: str) -> str:
    """JSON admits lone surrogates; they are not text (polars and the log could not store them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("string holds a lone UTF-16 surrogate (not valid Unicode)") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


def _integral(value: Any) -> Any:
    """JSON Schema's "integer" includes 13.0; strict ints would refuse it (and must refuse "13" and true)."""
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2**64 else value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Contract:
    """What the request schema depends on in the served run."""

    user_ids_int: bool
    item_ids_int: bool
    max_k: int
    rating_range: tuple[float, float] | None = None  # events' ratings lie in it (None: the run has no rating head)

    @classmethod
    def of(cls, recommender: Recommender) -> "Contract":
        ratings = tuple(recommender.rating_range) if "rating" in recommender.model.spec.tasks else None
        return cls(recommender.user_ids_are_int, recommender.item_ids_are_int, recommender.cfg.serve.max_k, ratings)  # type: ignore[arg-type]


def id_type(integer: bool) -> Any:
    """A request id: for integer catalogues an int64 as text, or as a JSON integer within +-(2**53 - 1); else a string."""
    if integer:
        # As a JSON number only within +-(2**53 - 1), which every JSON parser and schema tool holds exactly (they
        # compare in doubles: near 2**63 they are 2048 apart); any int64 as text.
        return Annotated[int, Field(strict=True, ge=-MAX_JSON_INT, le=MAX_JSON_INT), BeforeValidator(_integral)] | Annotated[str, Field(pattern=INT64_PATTERN)]
    return Annotated[Text, Field(min_length=1, max_length=MAX_ID_CHARS)]


def path_id_type(integer: bool) -> Any:
    if integer:
        return Annotated[str, PathParam(pattern=INT64_PATTERN, description="an int64 item id")]
    return Annotated[Text, PathParam(min_length=1, max_length=MAX_ID_CHARS)]


@dataclass(frozen=True)
class RequestModels:
    recommend: type[BaseModel]
    add_items: type[BaseModel]
    events: type[BaseModel]
    item_path: Any  # the path parameter of /items/{item_id}/similar
    k_query: Any


def request_models(contract: Contract) -> RequestModels:
    """The request models of a service over runs with ``contract``."""
    UserId, ItemId = id_type(contract.user_ids_int), id_type(contract.item_ids_int)
    K = Annotated[int, Field(strict=True, ge=1, le=contract.max_k, description="items wanted (at most serve.max_k)"), BeforeValidator(_integral)]  # Field first, or its limits leave the schema

    class RecommendRequest(Strict):
        user_id: UserId | None = None  # type: ignore[valid-type]
        history: list[ItemId] | None = Field(default=None, max_length=MAX_HISTORY)  # type: ignore[valid-type]
        k: K = 10  # type: ignore[valid-type]

    class NewItemRequest(Strict):
        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={"anyOf": [{"required": ["text"], "properties": {"text": {"type": "string"}}},
                                         {"required": ["image_base64"], "properties": {"image_base64": {"type": "string"}}}]},
        )  # fmt: skip
        item_id: ItemId  # type: ignore[valid-type]
        text: Annotated[Text, Field(min_length=1, max_length=MAX_TEXT_CHARS)] | None = None
        image_base64: Annotated[str, Field(min_length=4, max_length=MAX_IMAGE_BASE64, pattern=BASE64_PATTERN)] | None = None

        @model_validator(mode="after")
        def _has_content(self) -> "NewItemRequest":
            if self.text is None and self.image_base64 is None:
                raise ValueError("a new item needs text or image_base64")
            return self

    class AddItemsRequest(Strict):
        items: list[NewItemRequest] = Field(min_length=1, max_length=MAX_NEW_ITEMS)

    Binary = Annotated[int, Field(strict=True, ge=0, le=1), BeforeValidator(_integral)]

    lo, hi = contract.rating_range or (None, None)
    Rating = Annotated[float, Field(ge=lo, le=hi, allow_inf_nan=False, description="on the run's rating scale")]

    class EventRequest(Strict):
        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={"anyOf": [{"properties": {"conversion": {"enum": [0, None]}}}, {"properties": {"click": {"enum": [1, None]}}}]},
        )  # a conversion follows a click: no conversion, or a click (absent means 1); as anyOf, not "not", so generators need not filter
        user_id: UserId  # type: ignore[valid-type]
        item_id: ItemId  # type: ignore[valid-type]
        timestamp: Annotated[int, Field(strict=True, ge=0, le=MAX_JSON_INT, description="unix seconds"), BeforeValidator(_integral)]
        click: Binary | None = None  # type: ignore[valid-type]  # absent: 1 (an interaction)
        conversion: Binary | None = None  # type: ignore[valid-type]
        rating: Rating | None = None  # type: ignore[valid-type]

        @model_validator(mode="after")
        def _conversion_follows_click(self) -> "EventRequest":
            if self.conversion == 1 and self.click == 0:
                raise ValueError("conversion is 1 but click is 0: a conversion follows a click")
            return self

    class EventsRequest(Strict):
        events: list[EventRequest] = Field(min_length=1, max_length=MAX_EVENTS)

    return RequestModels(RecommendRequest, AddItemsRequest, EventsRequest, path_id_type(contract.item_ids_int), Annotated[int, Query(ge=1, le=contract.max_k)])


class RecommendedItem(BaseModel):
    item_id: str | int
    score: float
    p_click: float
    p_conversion: float | None
    p_ctcvr: float | None
    rating: float | None
    retrieval_score: float | None = None  # the towers' cosine (first stage)
    candidate_source: Literal["towers", "cooccurrence", "popular"] = "towers"  # the candidate source that proposed it


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    warnings: list[str]
    source: Literal["user", "history", "popular"]


class SimilarItem(BaseModel):
    item_id: str | int
    score: float


class SimilarResponse(BaseModel):
    items: list[SimilarItem]


class AddedItem(BaseModel):
    item_id: str | int
    faiss_id: int


class AddItemsResponse(BaseModel):
    added: list[AddedItem]
    count: int  # items in the index now
    warnings: list[str]


class EventsResponse(BaseModel):
    accepted: int  # events logged (RUN/events) and, the clicks among them, in the live histories
    live_users: int  # users with live events held in memory (serve.live_users at most)


class ReloadRequest(Strict):
    run: Annotated[Text, Field(min_length=1, max_length=4096)]


class StatusResponse(BaseModel):
    status: str
    run: str
    model_version: str
    index_type: str
    items: int


class ErrorResponse(BaseModel):
    detail: str | list[dict[str, Any]]  # a message, or pydantic's list of validation errors
    request_id: str | None = None  # on 500s: the id the log names the traceback by


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses a route can answer (all share ``ErrorResponse``)."""
    return {code: {"model": ErrorResponse} for code in (*codes, 500)}  # 400: a body that is not UTF-8 (FastAPI's own answer)


# -- metrics ---------------------------------------------------------------------------------
class LiveCollector:
    """What the live recommender holds, read at scrape time: index size and which model."""

    def __init__(self, service: "Service"):
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily]:
        recommender = self.service.recommender
        yield GaugeMetricFamily("recsys_index_items", "Items in the live FAISS index.", value=recommender.index.count)
        yield GaugeMetricFamily("recsys_live_users", "Users with live events in memory.", value=len(self.service.live))
        yield GaugeMetricFamily("recsys_live_users_evicted", "Live users evicted (least recently active) to stay within serve.live_users.", value=self.service.live.evicted)
        info = GaugeMetricFamily("recsys_model_info", "The live model and index.", labels=["version", "run", "index_type"])
        info.add_metric([recommender.model_version, str(recommender.run.root), recommender.index.kind], 1)
        yield info


class Metrics:
    """prometheus_client metrics of one app, in a registry of its own (two apps in a process never mix)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # CPU, memory, open files of this process
        PlatformCollector(registry=self.registry)
        self.requests = Counter("recsys_requests", "HTTP requests by endpoint, method and status.", ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("recsys_request_duration_seconds", "Request latency by endpoint.", ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.stages = Histogram("recsys_stage_duration_seconds", "Time in each /recommend pipeline stage.", ["stage"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.reloads = Counter("recsys_reloads", "Successful model and index swaps.", registry=self.registry)
        self.batch_size = Histogram("recsys_recommend_batch_size", "/recommend requests run together (serve.batch_max).", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.events = Counter("recsys_events_accepted", "Events POST /events logged and applied.", registry=self.registry)

    def watch(self, service: "Service") -> None:
        self.registry.register(LiveCollector(service))

    def request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def stage_times(self, timings_ms: dict[str, float], batch: int = 1) -> None:
        self.batch_size.observe(batch)
        for stage, ms in timings_ms.items():
            if stage != "total":
                self.stages.labels(stage).observe(ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class AccessLogMiddleware:
    """Pure ASGI: a request id, one JSON access-log line and the metrics per request (route template as label).

    An exception no handler mapped becomes a 500 whose body carries the request id; the traceback
    goes to the log under the same id, never to the client.
    """

    def __init__(self, app: Any, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = uuid.uuid4().hex[:16]
        status, response_started = 500, False

        async def send_and_record(message: dict) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except Exception:
            log.exception("request %s (%s %s) failed", request_id, scope["method"], scope["path"])
            if not response_started:
                body = {"detail": "internal error: the service logged it under this request id", "request_id": request_id}
                await JSONResponse(body, status_code=500)(scope, receive, send_and_record)
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"  # template, never the raw path
            self.metrics.request(endpoint, scope["method"], status, seconds)
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client") or ("", 0)
                access_log.info(json.dumps({
                    "ts": round(time.time(), 3), "method": scope["method"], "path": scope["path"], "endpoint": endpoint,
                    "status": status, "ms": round(1000 * seconds, 3), "client": client[0], "request_id": request_id,
                }))


class BodyLimitMiddleware:
    """Pure ASGI: a request body over ``max_bytes`` is refused with 413, by its Content-Length before
    anything is read, or (a chunked body) as soon as the bytes received pass the limit."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"request body over serve.max_body_bytes = {max_bytes} bytes"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"detail": self.message}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self.message)  # FastAPI passes an HTTPException from the body read through
            return message

        await self.app(scope, receive_within_limit, send)


def error_status(exc: RecsysError) -> int:
    """The HTTP status of a library error: the request's fault (4xx) or the service's state (503)."""
    if isinstance(exc, UnknownItem):
        return 404
    if isinstance(exc, (DuplicateItem, EventAhead)):
        return 409
    if isinstance(exc, (RequestError, DataError)):
        return 422
    if isinstance(exc, (ConfigError, RunError)):  # e.g. an encoder the run's config names but this host lacks
        return 503
    return 400


# -- the app ---------------------------------------------------------------------------------
class Service:
    """The live recommender, the one writer lock that adds and reloads share, and the swap.

    POST /items and /admin/reload each hold ``writer`` for their whole change, so an add that
    arrives during a reload waits and lands in the new run (or, past ``write_timeout_s``, is
    refused with 503): never in a recommender that is being replaced. Reads take no service lock.
    """

    def __init__(self, recommender: Recommender, runs_root: Path, write_timeout_s: float):
        self.recommender = recommender
        self.runs_root = runs_root  # resolved
        self.write_timeout_s = write_timeout_s
        self.writer = threading.Lock()
        self._reload_gate = threading.Lock()  # a second reload while one runs is refused, not queued
        serve = recommender.cfg.serve
        self.live = LiveHistories(recommender.history_len, serve.live_users)
        self.event_log = event_log_of(recommender)
        self._events = threading.Lock()  # log + live histories change together; a reload's swap holds it too
        self.live.add(*_live_clicks(read_events(self.event_log.directory, self.event_log.schema), recommender.behaviour.data_cut))  # a restart keeps the live histories

    def log_events(self, events: list[dict[str, Any]]) -> int:
        """Check, log durably (fsynced) and apply a batch of events to the live histories; returns how many."""
        with self._events:
            recommender = self.recommender
            columns = recommender.check_events(events)  # whole batch or nothing
            self.event_log.append(columns)
            clicked = [i for i, click in enumerate(columns["click"]) if click]
            self.live.add(*([columns[name][i] for i in clicked] for name in ("user_id", "item_id", "timestamp")))
            return len(events)

    @property
    def reloading(self) -> bool:
        return self._reload_gate.locked()

    @contextmanager
    def writing(self) -> Iterator[Recommender]:
        """Hold the writer lock; yields the live recommender (the one any change must land in)."""
        if not self.writer.acquire(timeout=self.write_timeout_s):
            raise HTTPException(503, f"the index is busy (a reload or another add) for over serve.write_timeout_s = {self.write_timeout_s} s: retry", headers={"Retry-After": "1"})
        try:
            yield self.recommender
        finally:
            self.writer.release()

    def resolve_run(self, raw: str) -> Path:
        """``raw`` (absolute, or relative to the runs root) resolved, symlinks and ``..`` included; refused unless under the runs root."""
        try:
            path = (self.runs_root / raw).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte: it names no run
            raise HTTPException(404, f"run {raw!r}: no run directory (the path cannot be resolved: {exc})") from None
        if not path.is_relative_to(self.runs_root):
            raise HTTPException(403, f"run {raw!r} resolves to {path}, outside serve.runs_root ({self.runs_root}): reload only loads runs under it")
        try:
            is_run = (path / "config.toml").is_file()
        except OSError as exc:  # e.g. a name longer than the file system allows: no such run either
            raise HTTPException(404, f"run {raw!r}: no run directory {path} ({exc.strerror})") from None
        if not is_run:
            raise HTTPException(404, f"run {raw!r}: no run directory {path} (no config.toml)")
        return path

    def follow(self, directory: Path, contract: Contract, stop: threading.Event, on_reload: Any = None) -> None:
        """Reload each run ``directory/published.json`` names (``recsys update --follow``) until ``stop`` is set.

        A run that cannot be loaded is logged and skipped (the live one stays) until the file names another.
        """
        poll_s = self.recommender.cfg.serve.follow_poll_s
        tried: str | None = None
        while not stop.wait(poll_s):
            try:
                target = json.loads((directory / PUBLISHED_FILE).read_text())["run"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not published yet, or being replaced (it is written atomically: the next look reads it whole)
            if target == tried or Path(target).resolve() == self.recommender.run.root.resolve():
                continue
            tried = target
            try:
                fresh = self.reload(target, contract)
            except Exception as exc:  # noqa: BLE001 (an HTTPException or a damaged run: the live one keeps serving)
                log.warning("follow: %s not loaded, still serving %s: %s", target, self.recommender.run.root, getattr(exc, "detail", exc))
                continue
            log.info("follow: now serving %s (model %s, %d items)", fresh.run.root, fresh.model_version, fresh.index.count)
            if on_reload is not None:
                on_reload()
            settle_heap()  # the replaced recommender is collected here, once, not by a later pause of some request

    def reload(self, raw: str, contract: Contract) -> Recommender:
        path = self.resolve_run(raw)  # before anything under it is opened
        if not self._reload_gate.acquire(blocking=False):
            raise HTTPException(409, "a reload is already in progress")
        try:
            return self._swap_in(path, contract)  # the caller then settles the heap (settle_heap), once it has counted the reload
        finally:
            self._reload_gate.release()

    def _swap_in(self, path: Path, contract: Contract) -> Recommender:
        with self.writing():
            fresh = Recommender.load(RunDir(path, self.recommender.run.overrides))  # the old one keeps serving reads meanwhile; `recsys serve --set` holds for the new run too
            fresh.adopt_encoders(self.recommender)  # the next add does not load them again
            if Contract.of(fresh) != contract:  # the published schema (id types, max_k) would no longer hold
                raise HTTPException(409, f"{path} takes other requests ({Contract.of(fresh)}) than the served schema ({contract}): restart the service on it")
            with self._events:  # no event lands in the old log after its news were carried over
                fresh_log = event_log_of(fresh)
                carried = _carry_events(self.event_log, fresh_log, fresh.behaviour.data_cut)
                self.recommender = fresh  # one reference swap: model and index change together
                self.event_log = fresh_log
                dropped = self.live.keep_after(fresh.behaviour.data_cut, fresh.history_len)
            log.info("reload of %s: %d events after its data carried into its event log, %d live clicks it holds dropped", path, carried, dropped)
            return fresh


def settle_heap() -> float:
    """Collect once, then move every object alive (the imported libraries, the loaded run) out of the collector's sight.

    A loaded service holds ~370k container objects, nearly all from its imports; a full collection
    of them took 159 ms (1M-item run, Intel Xeon), a pause that lands on whichever request
    allocates at that moment. Frozen, they are never traversed again (0.0 ms after). An earlier
    freeze is undone first, so a recommender replaced by a reload is collected here, not leaked.
    Returns the seconds the collection took.
    """
    gc.unfreeze()
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - started


def event_log_of(recommender: Recommender) -> EventLog:
    """The event log of the served run, typed by its ids."""
    schema = event_schema(pl.Int64 if recommender.user_ids_are_int else pl.String, pl.Int64 if recommender.item_ids_are_int else pl.String)
    return EventLog(recommender.run.root / EVENTS_DIR, schema, recommender.cfg.serve.events_segment_rows)


def _live_clicks(events: pl.DataFrame, cut: int) -> tuple[list[Any], list[Any], list[Any]]:
    """The clicks among logged events that came after a run's data: (users, items, timestamps)."""
    clicks = events.filter((pl.col("click") == 1) & (pl.col("timestamp") > cut))
    return clicks["user_id"].to_list(), clicks["item_id"].to_list(), clicks["timestamp"].to_list()


def _carry_events(old: EventLog, new: EventLog, cut: int) -> int:
    """Append to ``new`` the events of ``old`` after ``cut`` that it lacks (the next update trains on them); returns how many."""
    if old.directory.resolve() == new.directory.resolve():
        return 0
    news = read_events(old.directory, old.schema).filter(pl.col("timestamp") > cut)
    if news.is_empty():
        return 0
    news = news.join(read_events(new.directory, new.schema), on=list(EVENT_COLUMNS), how="anti", nulls_equal=True)  # a reload back and forth copies nothing twice
    if not news.is_empty():
        new.append({name: news[name].to_list() for name in EVENT_COLUMNS})
    return len(news)


def runs_root_of(run: RunDir) -> Path:
    """``serve.runs_root`` of the served run, resolved; "" means the run's parent directory."""
    configured = run.config().serve.runs_root
    return Path(configured).expanduser().resolve() if configured else run.root.resolve().parent


def create_app(run_dir: str | Path | RunDir, admin_token: str | None = None) -> FastAPI:
    """The service over one run directory (loaded now); admin endpoints need ``admin_token``."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    recommender = Recommender.load(run)
    service = Service(recommender, runs_root_of(run), recommender.cfg.serve.write_timeout_s)
    contract = Contract.of(service.recommender)
    models = request_models(contract)
    RecommendRequest, AddItemsRequest, EventsRequest = models.recommend, models.add_items, models.events
    ItemPath, KQuery = models.item_path, models.k_query
    metrics = Metrics()
    metrics.watch(service)
    serve_cfg = recommender.cfg.serve
    batcher = MicroBatcher(serve_cfg.batch_max, serve_cfg.batch_wait_ms, serve_cfg.batch_workers) if serve_cfg.batch_max > 1 else None
    app = FastAPI(title="recsys", description="Retrieval and ranking service", version="1")
    app.state.service = service
    app.state.contract = contract
    app.state.metrics = metrics
    bearer = HTTPBearer(auto_error=False, description="RECSYS_ADMIN_TOKEN")

    def require_admin(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        disabled = "" if admin_token else " (and admin endpoints are disabled here: start the service with RECSYS_ADMIN_TOKEN set)"
        if credentials is None or not credentials.credentials:  # no credentials: 401 either way, as HTTP has it
            raise HTTPException(401, f"admin endpoint: send 'Authorization: Bearer <token>'{disabled}", headers={"WWW-Authenticate": "Bearer"})
        if not admin_token:
            raise HTTPException(403, "admin endpoints are disabled: start the service with RECSYS_ADMIN_TOKEN set")
        if not hmac.compare_digest(credentials.credentials.strip().encode(), admin_token.encode()):
            raise HTTPException(403, "admin endpoint: wrong token")

    @app.exception_handler(RecsysError)
    async def recsys_error(request: Request, exc: RecsysError) -> JSONResponse:
        code = error_status(exc)
        if code >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": str(exc)}, status_code=code)

    def status(recommender: Recommender) -> StatusResponse:
        return StatusResponse(
            status="ok", run=str(recommender.run.root), model_version=recommender.model_version,
            index_type=recommender.index.kind, items=recommender.index.count,
        )

    @app.get("/healthz", response_model=StatusResponse, responses=errors())
    def healthz() -> StatusResponse:
        return status(service.recommender)

    @app.post("/recommend", response_model=RecommendResponse, responses=errors(400, 413, 422))
    async def recommend(body: RecommendRequest) -> RecommendResponse:  # type: ignore[valid-type]
        # On the event loop: the request's own checks and lookups are short, and awaiting the batcher's
        # future costs no thread of the pool (a pool thread per waiting request competed for the GIL).
        recommender = service.recommender  # one model + index for the whole request
        user = recommender.user_key(body.user_id) if body.user_id is not None else None
        live = service.live.items(user) if user is not None else []
        prepared = recommender.prepare(user_id=body.user_id, history=body.history, k=body.k, live=live)  # a bad request fails here, alone
        if batcher is not None:
            result = await asyncio.wrap_future(batcher.enqueue(recommender, prepared))
        else:
            result = (await run_in_threadpool(recommender.recommend_many, [prepared]))[0]
        metrics.stage_times(result.timings_ms, result.batch)
        return RecommendResponse(items=[RecommendedItem(**vars(item)) for item in result.items], warnings=result.warnings, source=result.source)

    @app.get("/items/{item_id}/similar", response_model=SimilarResponse, responses=errors(404, 422))
    def similar(item_id: ItemPath, k: KQuery = 10) -> SimilarResponse:  # type: ignore[valid-type]
        pairs = service.recommender.similar(item_id, k)
        return SimilarResponse(items=[SimilarItem(item_id=i, score=s) for i, s in pairs])

    @app.post("/items", response_model=AddItemsResponse, status_code=201, dependencies=[Depends(require_admin)], responses=errors(400, 401, 403, 409, 413, 422, 503))
    def add_items(body: AddItemsRequest) -> AddItemsResponse:  # type: ignore[valid-type]
        new_items = [NewItem(item.item_id, item.text, decode_image_base64(item.image_base64) if item.image_base64 else None) for item in body.items]
        with service.writing() as recommender:
            faiss_ids, warnings = recommender.add_items(new_items)
        added = [AddedItem(item_id=recommender.item_key(item.item_id), faiss_id=f) for item, f in zip(body.items, faiss_ids)]
        return AddItemsResponse(added=added, count=recommender.index.count, warnings=warnings)

    @app.post("/events", response_model=EventsResponse, dependencies=[Depends(require_admin)], responses=errors(400, 401, 403, 404, 409, 413, 422, 503))  # 404: an unknown item; 409: a timestamp ahead of the clock
    def events(body: EventsRequest) -> EventsResponse:  # type: ignore[valid-type]
        accepted = service.log_events([event.model_dump() for event in body.events])
        metrics.events.inc(accepted)
        return EventsResponse(accepted=accepted, live_users=len(service.live))

    @app.post("/admin/reload", response_model=StatusResponse, dependencies=[Depends(require_admin)], responses=errors(400, 401, 403, 404, 409, 413, 422, 503))  # 409: another reload, an incomplete run or another contract
    def reload(body: ReloadRequest) -> StatusResponse:
        try:
            fresh = service.reload(body.run, contract)
        except HTTPException:
            raise
        except Exception as exc:  # an incomplete or damaged run: the old one stays live
            if not isinstance(exc, RecsysError):
                log.exception("reload of %s failed", body.run)
            raise HTTPException(409, f"reload refused, still serving {service.recommender.run.root}: {exc}") from None
        metrics.reloads.inc()
        log.info("reloaded %s (model %s, %d items)", fresh.run.root, fresh.model_version, fresh.index.count)
        settle_heap()  # the replaced recommender is collected here, once, not by a later pause of some request
        return status(fresh)

    @app.get("/readyz", response_model=StatusResponse, responses=errors(503))
    def readyz() -> StatusResponse:
        if service.reloading:
            raise HTTPException(503, "reloading")
        return status(service.recommender)

    @app.get("/metrics", response_class=PlainTextResponse, responses=errors())
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodyLimitMiddleware, max_bytes=recommender.cfg.serve.max_body_bytes)
    app.add_middleware(AccessLogMiddleware, metrics=metrics)  # outermost: it sees the 413s too
    collect_s = settle_heap()
    log.info("heap settled: a full collection took %.1f ms; %d objects frozen, out of later collections", collect_s * 1e3, gc.get_freeze_count())
    return app


def _load_encoders(recommender: Recommender) -> None:
    try:
        recommender.load_encoders()
    except Exception as exc:  # noqa: BLE001 (e.g. weights not on this machine: the first POST /items says so with a 4xx)
        log.warning("encoders for POST /items not loaded at start (%s); the first add tries again", exc)


def configure_threads(threads: int) -> None:
    """Intra-op threads of torch and FAISS: requests run concurrently, each on few threads."""
    import faiss
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)


def serve(run: RunDir, host: str = "127.0.0.1", port: int = 8000, follow: Path | None = None) -> None:
    """``recsys serve``: load the run and serve it with uvicorn (JSON access logs on stderr).

    ``follow``: a ``recsys update --follow`` directory; each generation it publishes is reloaded.
    """
    import uvicorn

    cfg = run.config()
    configure_threads(cfg.serve.threads)
    admin_token = os.environ.get("RECSYS_ADMIN_TOKEN") or None  # read once, here
    if admin_token is None:
        log.warning("RECSYS_ADMIN_TOKEN is unset: POST /items, POST /events and /admin/reload are disabled")
    app = create_app(run, admin_token=admin_token)
    if admin_token is not None:  # adds are on: load their encoders now, in the background, not in the first POST /items
        threading.Thread(target=_load_encoders, args=(app.state.service.recommender,), name="encoders", daemon=True).start()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO if cfg.serve.access_log else logging.WARNING)
    access_log.propagate = False
    stop = threading.Event()
    if follow is not None:
        service = app.state.service
        threading.Thread(target=service.follow, args=(follow.resolve(), app.state.contract, stop, app.state.metrics.reloads.inc), name="follow", daemon=True).start()
    try:
        uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning")
    finally:
        stop.set()
