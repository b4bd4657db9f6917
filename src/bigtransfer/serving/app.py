"""The HTTP application: routes, the shared state behind them, and every error as one JSON line.

Stateless by design: a request carries everything it needs, so any number of replicas behind any
load balancer answer alike.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..inference.predictor import Predictor, load_predictor
from .batcher import Batcher
from .metrics import CONTENT_TYPE, Metrics, MetricsMiddleware
from .options import ServeOptions, read_api_key
from .requests import JSON, MULTIPART, ApiError, BodyLimit, decode, parse_top_k, read_uploads

log = logging.getLogger("bigtransfer.serve")
STATIC = Path(__file__).parent / "static"
RETRY_AFTER = {"Retry-After": "1"}


def build_predictor(options: ServeOptions) -> Predictor:
    """The model the server answers with: the same forward path as `bigtransfer predict` / `embed`."""
    return load_predictor(options.model, device=options.device, resolution=options.resolution, need_head=False,
                          backend=options.backend, precision=options.precision)


class ServingState:
    """What requests share: the model once loaded and warmed, the batcher, admission, the API key."""

    def __init__(self, options: ServeOptions, metrics: Metrics, load: Callable[[ServeOptions], Predictor]):
        self.options, self.metrics, self._load = options, metrics, load
        self.api_key = read_api_key(options.api_key_file) if options.api_key_file else None
        self.predictor: Predictor | None = None
        self.batcher: Batcher | None = None
        self.transform = None
        self.ready = False
        self.warmup_s: float | None = None
        self.in_flight = 0  # admitted and not yet answered
        self.en_route = 0  # admitted, still being read or decoded: the batcher waits only for these
        self.decoder = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                          thread_name_prefix="decode")

    # ------------------------------------------------------------------ life cycle
    def load(self) -> None:
        """Load the model, run it once at batch 1 and at --max-batch, then start the batcher."""
        predictor = self._load(self.options)
        if self.options.workers > 1:  # share the cores between batches running side by side
            torch.set_num_threads(max(1, torch.get_num_threads() // self.options.workers))
        started = time.perf_counter()
        kinds = ["embed"] if predictor.class_names is None else ["embed", "predict"]
        for size in sorted({1, self.options.max_batch}):  # first calls allocate and pick kernels
            blank = torch.zeros(size, 3, predictor.resolution, predictor.resolution)
            for kind in kinds:
                self._compute(predictor, kind, blank)
        self.warmup_s = time.perf_counter() - started
        self.predictor, self.transform = predictor, predictor.transform()
        self.batcher = Batcher(lambda kind, images: self._compute(predictor, kind, images),
                               max_batch=self.options.max_batch, timeout_s=self.options.batch_timeout_ms / 1000,
                               workers=self.options.workers, on_batch=self.metrics.batch_size.observe,
                               en_route=lambda: self.en_route)
        self.batcher.start()
        self.ready = True
        self.metrics.ready.set(1)

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.stop(self.options.grace_s)
        self.decoder.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _compute(predictor: Predictor, kind: str, images: torch.Tensor) -> torch.Tensor:
        rows = predictor.probabilities(images) if kind == "predict" else predictor.features(images)
        return rows.cpu()

    # ------------------------------------------------------------------ per request
    @asynccontextmanager
    async def admitted(self):
        """A place among the --max-queue requests in progress, or a 503 that says when to retry."""
        if not self.ready:
            raise ApiError(503, "loading", "the model is still loading; retry shortly", RETRY_AFTER)
        if self.in_flight >= self.options.max_queue:
            raise ApiError(503, "overloaded", f"the server is busy: {self.in_flight} requests in progress "
                                              "(--max-queue); retry shortly", RETRY_AFTER)
        self.in_flight += 1
        self.metrics.in_progress.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.in_progress.dec()

    async def run(self, kind: str, request: Request) -> tuple[list[str], torch.Tensor]:
        """The names of the request's images and the model's rows for them (probabilities or features)."""
        self.en_route += 1
        try:
            uploads = await self._read(request)
            images = await asyncio.get_running_loop().run_in_executor(self.decoder, self._decode_all, uploads)
        finally:
            self.en_route -= 1
        rows = await self.batcher.submit(kind, images)
        self.metrics.images.labels(kind).inc(len(uploads))
        return [u.name for u in uploads], rows

    async def _read(self, request: Request):
        """The request's uploads, refused (408) if the body is still arriving after --read-timeout."""
        seconds = self.options.read_timeout_s
        try:
            return await asyncio.wait_for(read_uploads(request, max_images=self.options.max_images,
                                                       limit=self.options.max_upload_bytes), seconds)
        except asyncio.TimeoutError:
            raise ApiError(408, "read_timeout", f"the request body took longer than {seconds:g} s to arrive "
                                                "(--read-timeout)") from None

    def _decode_all(self, uploads) -> torch.Tensor:
        return torch.stack([decode(upload, self.transform) for upload in uploads])

    async def check_key(self, request: Request) -> None:
        """401 unless the request carries the key (Authorization: Bearer KEY, or X-API-Key: KEY)."""
        if self.api_key is None:
            return
        given = request.headers.get("x-api-key")
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if given is None and scheme.lower() == "bearer":
            given = credentials.strip()
        if given is None or not hmac.compare_digest(given.encode("latin-1", "replace"), self.api_key):
            raise ApiError(401, "unauthorized", "a valid API key is needed: send 'Authorization: Bearer KEY' "
                                                "or 'X-API-Key: KEY'", {"WWW-Authenticate": "Bearer"})

    def model_fields(self) -> dict:
        p = self.predictor
        return {"model": p.name, "fingerprint": p.fingerprint}


# --------------------------------------------------------------------------- the documented shapes
class Error(BaseModel):
    error: str


class Ranked(BaseModel):
    label: str
    probability: float


class ImagePrediction(BaseModel):
    image: str
    predictions: list[Ranked]


class PredictAnswer(BaseModel):
    model: str
    fingerprint: str | None
    multi_label: bool
    results: list[ImagePrediction]
    latency_ms: float


class ImageEmbedding(BaseModel):
    image: str
    embedding: list[float]


class EmbedAnswer(BaseModel):
    model: str
    fingerprint: str | None
    dimension: int
    results: list[ImageEmbedding]
    latency_ms: float


IMAGES_BODY = {"requestBody": {"required": True, "content": {
    MULTIPART: {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "one or more image files (repeat the field)"}}}},
    JSON: {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "byte"},
                   "description": "base64-encoded image files"}}}},
}}}
ERRORS = {status: {"model": Error, "description": what} for status, what in (
    (400, "a malformed request or an unreadable image"), (401, "a missing or wrong API key"),
    (413, "a body over --max-upload-mb or an image over the pixel limit"),
    (415, "a Content-Type other than multipart/form-data or application/json"),
    (503, "loading, or more than --max-queue requests in progress; see Retry-After"))}


# --------------------------------------------------------------------------- the application
def create_app(options: ServeOptions, *, load: Callable[[ServeOptions], Predictor] = build_predictor,
               on_ready: Callable[[ServingState], None] | None = None,
               on_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The server's ASGI app; the model loads and warms up in the background once the app starts
    (`on_ready` then, or `on_failure` with the error)."""
    from ..version import __version__

    metrics = Metrics()
    state = ServingState(options, metrics, load)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.get_running_loop().run_in_executor(None, state.load)
        loading.add_done_callback(lambda done: _loaded(done, state, on_ready, on_failure))
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, state.stop)

    app = FastAPI(title="bigtransfer serve", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, description="Top-k classes (POST /predict) and pre-logit features (POST /embed) "
                                              "of a BiT model; every error is {\"error\": \"one line\"}.")
    app.state.serving = state
    _add_error_handlers(app, metrics)
    app.add_middleware(BodyLimit, limit=options.max_upload_bytes,
                       on_refused=lambda: metrics.errors.labels("too_large").inc())
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    authorized = [Depends(state.check_key)]
    top_k_query = Query(None, description="how many classes to answer with (default 5)")

    @app.post("/predict", dependencies=authorized, openapi_extra=IMAGES_BODY, response_model=PredictAnswer,
              responses=ERRORS, summary="Top-k classes of one or more images")
    async def predict(request: Request, top_k: str | None = top_k_query):
        started = time.perf_counter()
        async with state.admitted():
            predictor = state.predictor
            if predictor.class_names is None:
                raise ApiError(400, "no_head", f"{predictor.name} has no classification head; POST /embed")
            k = parse_top_k(top_k, len(predictor.class_names))
            names, rows = await state.run("predict", request)
            ranked = predictor.top_k(rows, k)
            return JSONResponse({**state.model_fields(), "multi_label": predictor.multi_label,
                                 "results": [{"image": n, "predictions": r} for n, r in zip(names, ranked)],
                                 "latency_ms": round((time.perf_counter() - started) * 1000, 2)})

    @app.post("/embed", dependencies=authorized, openapi_extra=IMAGES_BODY, response_model=EmbedAnswer,
              responses=ERRORS, summary="Pre-logit features (the BiT representation) of one or more images")
    async def embed(request: Request):
        started = time.perf_counter()
        async with state.admitted():
            names, rows = await state.run("embed", request)
            return JSONResponse({**state.model_fields(), "dimension": int(rows.shape[1]),
                                 "results": [{"image": n, "embedding": r} for n, r in zip(names, rows.tolist())],
                                 "latency_ms": round((time.perf_counter() - started) * 1000, 2)})

    @app.get("/health", summary="200 once the model is loaded and warmed up, 503 before")
    async def health():
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503, headers=RETRY_AFTER)
        p = state.predictor
        return {"status": "ready", **state.model_fields(), "resolution": p.resolution,
                "classes": None if p.class_names is None else len(p.class_names), "device": str(p.device),
                "max_batch": options.max_batch, "warmup_s": round(state.warmup_s, 3)}

    @app.get("/metrics", dependencies=authorized, summary="Prometheus metrics")
    async def prometheus_metrics():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _loaded(done: asyncio.Future, state: ServingState, on_ready, on_failure) -> None:
    error = None if done.cancelled() else done.exception()
    if error is None and on_ready is not None:
        on_ready(state)
    elif error is not None and on_failure is not None:
        on_failure(error)
    elif error is not None:
        log.error("the model could not be loaded: %s", error)


def _add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every error a client sees is {"error": "one line"}, counted by kind; never a traceback."""

    def answer(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
        metrics.errors.labels(kind).inc()
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return answer(err.status, err.kind, err.message, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        where = f"{request.method} {request.url.path[:200]}"
        if err.status_code == 404:
            return answer(404, "not_found", f"no such route: {where} (the routes are in /openapi.json)")
        if err.status_code == 405:
            return answer(405, "method_not_allowed", f"method not allowed: {where}", err.headers)
        return answer(err.status_code, f"http_{err.status_code}", " ".join(str(err.detail).split()), err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return answer(400, "bad_request", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception):
        log.error("internal error answering %s %s", request.method, request.url.path, exc_info=err)
        return answer(500, "internal", "internal error; the server has logged it")
