"""BentoML service: text to video through ONNX Runtime, with adaptive batching and a task queue.

    POST /generate                       prompt -> MP4 or GIF (JSON body: serving/schema.py)
    POST /tasks/generate/submit          the same as a background task -> {"task_id": ...}
    GET  /tasks/generate/status?task_id= -> {"status": "in_progress" | "completed" | "failed", ...}
    GET  /tasks/generate/get?task_id=    -> the video
    POST /expand                         prompt -> {"caption": ...} (components/expand.py)
    GET  /readyz /info /metrics /docs.json, Swagger UI at /

A thin adapter: request limits live in `serving/schema.py`, batching in `serving/batching.py`,
generation in `components/onnx_runtime.py` (CUDA provider with IO binding where a GPU exists,
CPU otherwise). The bundle comes from `$ZOETROPE_BUNDLE` (a bundle folder) when set, else from
the model store's `zoetrope-t2v:latest` (imported from the MLflow registry by
`zoetrope import-model` or the pipeline's register stage), which `bentoml build` packs.

    bentoml serve serving.service:TextToVideo --port 3000
    curl -X POST localhost:3000/generate -H 'content-type: application/json' \\
         -d '{"prompt": "a red circle bouncing"}' -o video.mp4
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Sequence
from urllib.parse import quote

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, InvalidArgument
from bentoml.validators import ContentType
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from components.onnx_runtime import OnnxT2V, available_providers
from components.video_io import encode_gif, encode_mp4
from serving.batching import BatchKey, Batcher, Job, QueueFull
from serving.schema import (MAX_BATCH_SIZE, MAX_BODY_BYTES, MAX_CONCURRENCY, MAX_LANES, MAX_LATENCY_MS, MAX_QUEUED,
                            REQUEST_TIMEOUT_S, ExpandRequest, GenerateRequest)
from serving.store import MODEL_NAME

BUNDLE_ENV = "ZOETROPE_BUNDLE"
LANES_ENV = "ZOETROPE_SERVE_LANES"
MEDIA_TYPES = {"mp4": "video/mp4", "gif": "image/gif"}
TASK_ROUTE = "/tasks/generate"
JSON_ROUTES = ("/generate", "/expand", TASK_ROUTE, f"{TASK_ROUTE}/submit")

batch_size_histogram = bentoml.metrics.Histogram(
    name="zoetrope_generate_batch_size",
    documentation="Videos sampled together in one batched DiT loop",
    buckets=tuple(float(2**i) for i in range(MAX_BATCH_SIZE.bit_length() + 1)),
)


async def _info(_: Request) -> JSONResponse:
    return JSONResponse(bentoml.get_current_service().info())


# BentoML APIs are POST only; a GET route rides on a mounted Starlette app (matched passively,
# so it shadows nothing of BentoML's own routes).
info_app = Starlette(routes=[Route("/info", _info, methods=["GET"])])


class ExpandUnavailable(BentoMLException):
    error_code = HTTPStatus.NOT_IMPLEMENTED


@bentoml.asgi_app(info_app, path="/")
@bentoml.service(
    name="zoetrope",
    resources={"gpu": 1},  # a hint for deployment; on a host without GPUs it runs on CPU
    traffic={"timeout": REQUEST_TIMEOUT_S, "max_concurrency": MAX_CONCURRENCY},
)
class TextToVideo:
    # Declared only when serving from the store: `bentoml build` then records and packs the
    # model, and BentoML resolves it before start-up (which would fail in a store without it).
    if not os.environ.get(BUNDLE_ENV):
        model = bentoml.models.BentoModel(f"{MODEL_NAME}:latest")

    def __init__(self) -> None:
        self.ready = False
        bundle = os.environ.get(BUNDLE_ENV)
        self.source = bundle if bundle else str(self.model.tag)
        lanes, threads = serving_lanes(gpu="CUDAExecutionProvider" in available_providers())
        self.pipeline = OnnxT2V(Path(bundle) if bundle else Path(self.model.path), threads=threads)
        # A batching window pays only where a larger batch costs less per video: one lane (a GPU,
        # or a CPU lane with several threads). Single-threaded CPU lanes take what is queued at
        # once: waiting would idle a core for a batch that costs the same per video.
        window_ms = MAX_LATENCY_MS if lanes == 1 else 0.0
        self.batcher = Batcher(self._run_batch, MAX_BATCH_SIZE, window_ms,
                               on_batch=batch_size_histogram.observe, max_queued=MAX_QUEUED, lanes=lanes)
        # One real 1-step, 1-frame generation: the provider's kernels load now, and /readyz
        # says ready only once a forward pass has gone through every graph.
        self.pipeline.generate("warm-up", seed=0, steps=1, num_frames=1)
        self.ready = True

    def __is_ready__(self) -> bool:
        return self.ready

    # ---- APIs -----------------------------------------------------------------------------

    @bentoml.api(route="/generate")
    async def generate(self, request: GenerateRequest, /) -> Annotated[bytes, ContentType("video/mp4")]:
        """A prompt in, a video out (MP4 by default, GIF with "format": "gif").

        Omitted fields take the bundle's sampling defaults. With "expand": true the prompt is
        first rewritten by `POST /expand`'s expander; the prompt used is in the
        X-Zoetrope-Prompt header (URL-encoded).
        """
        return await self._video(request)

    @bentoml.task(route=TASK_ROUTE)
    async def generate_task(self, request: GenerateRequest, /) -> Annotated[bytes, ContentType("video/mp4")]:
        """`/generate` as a background task: submit, poll status, get the video."""
        return await self._video(request)

    @bentoml.api(route="/expand")
    async def expand(self, request: ExpandRequest, /) -> dict:
        """A short prompt -> {"prompt": ..., "caption": ...} in the training captions' wording."""
        try:
            result = await asyncio.to_thread(_run_expand, request.prompt)
        except ExpandUnavailable as exc:
            return _error(exc, HTTPStatus.NOT_IMPLEMENTED)
        return {"prompt": request.prompt, **result}

    # ---- helpers --------------------------------------------------------------------------

    def check(self, request: GenerateRequest) -> tuple[int, int]:
        """(height, width) to generate at; ValueError naming the field when this bundle cannot
        honour the request."""
        return request.check_bundle(self.pipeline.info)

    async def _video(self, request: GenerateRequest) -> Response:
        try:
            height, width = self.check(request)
        except ValueError as exc:
            return _error(exc, HTTPStatus.BAD_REQUEST)
        prompt = request.prompt
        if request.expand:
            try:
                prompt = (await asyncio.to_thread(_run_expand, prompt))["caption"]
            except ExpandUnavailable as exc:
                return _error(exc, HTTPStatus.NOT_IMPLEMENTED)
        info = self.pipeline.info
        key = BatchKey(steps=request.steps or info.steps, num_frames=request.num_frames or info.frames,
                       sampler=info.sampler, height=height, width=width)
        job = Job(prompt=prompt, negative_prompt=request.negative_prompt,
                  seed=0 if request.seed is None else request.seed,
                  guidance=info.guidance if request.guidance is None else request.guidance)
        try:
            frames = await self.batcher.submit(key, job)  # uint8 (T, H, W, 3)
        except QueueFull as exc:
            return _error(exc, HTTPStatus.TOO_MANY_REQUESTS)
        # Off the event loop; x264 on one thread: for clips this small its thread start-up costs
        # more than the encoding (4.3 against 6.3-7.1 ms a 17-frame 32x32 clip), and a batch's
        # videos are encoded concurrently anyway.
        encode = encode_gif if request.format == "gif" else functools.partial(encode_mp4, threads=1)
        data = await asyncio.to_thread(encode, frames, self.pipeline.fps)
        return Response(data, media_type=MEDIA_TYPES[request.format],
                        headers={"X-Zoetrope-Prompt": quote(prompt)})

    def _run_batch(self, key: BatchKey, jobs: Sequence[Job]) -> np.ndarray:
        return self.pipeline.generate_batch(
            [j.prompt for j in jobs], [j.seed for j in jobs], steps=key.steps,
            guidance=[j.guidance for j in jobs], num_frames=key.num_frames, sampler=key.sampler,
            negative_prompts=[j.negative_prompt for j in jobs], height=key.height, width=key.width,
        )

    def readiness(self) -> dict:
        return {"ready": self.ready, "model": self.source, "provider": self.pipeline.provider,
                "precision": self.pipeline.precision, "io_binding": self.pipeline.describe()["io_binding"]}

    def info(self) -> dict:
        recent = self.batcher.batch_sizes[-100:]
        return {"source": self.source, **self.pipeline.describe(),
                "aspects": {a: {"height": h, "width": w} for a, (h, w) in self.pipeline.info.aspects.items()},
                "batching": {"max_batch_size": self.batcher.max_batch_size, "lanes": self.batcher.lanes,
                             "queued": self.batcher.queued,
                             "recent_batch_sizes": recent}}


def _error(exc: Exception, status: HTTPStatus) -> JSONResponse:
    # Returned, not raised: BentoML replaces the message of every 5xx it catches with a generic
    # one, and wraps a 4xx body in a list; a task whose response is >= 400 is marked failed.
    return JSONResponse({"error": str(exc)}, status_code=status)


def serving_lanes(gpu: bool) -> tuple[int, int | None]:
    """(lanes, ONNX Runtime intra-op threads per lane) for this host.

    `$ZOETROPE_SERVE_LANES` overrides; by default one single-threaded lane per CPU core this
    process may run on (see serving/batching.py for why), and one lane on a GPU, where batching,
    not more lanes, fills the device (threads None: ORT's choice for its few CPU-side ops).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    raw = os.environ.get(LANES_ENV, "").strip()
    if raw:
        try:
            lanes = int(raw)
        except ValueError:
            lanes = 0
        if not 1 <= lanes <= MAX_LANES:
            raise ValueError(f"{LANES_ENV}={raw!r} is invalid: use a whole number of lanes from 1 to {MAX_LANES} "
                             f"(this host has {cores} cores), or unset it for one per core")
    elif gpu:
        return 1, None
    else:
        lanes = min(cores, MAX_LANES)
    return lanes, max(1, cores // lanes)


def _run_expand(prompt: str) -> dict:
    """`components.expand.expand`, imported here so the service starts without it."""
    try:
        from components.expand import expand
    except ImportError as exc:
        raise ExpandUnavailable(f"prompt expansion is not installed in this build ({exc})") from None
    try:
        result = expand(prompt)
    except ValueError as exc:
        raise InvalidArgument(f"prompt: {exc}") from None
    if not isinstance(result, dict) or not isinstance(result.get("caption"), str):
        raise BentoMLException(f"expand() returned {type(result).__name__} without a 'caption' string")
    return result


# ---------------------------------------------------------------------------------------------
# Request guard: what BentoML lets through by default, answered here with a 4xx
# ---------------------------------------------------------------------------------------------


class RequestGuard:
    """ASGI middleware in front of the service's routes.

    - JSON only on the API routes (415 otherwise): BentoML picks its parser by Content-Type,
      and its form parser turns a malformed body into a 500; `curl -d` without a header sends
      a form.
    - Bodies over MAX_BODY_BYTES are 413, read no further: a client cannot make the server
      buffer gigabytes.
    - Task submission is validated before a task is queued, so a bad request is a 400 now,
      not a failed task later (BentoML queues any body), and refused with 429 while
      MAX_QUEUED requests wait: background tasks bypass BentoML's concurrency limit.
    - GET /readyz says, in JSON, whether the model is loaded and on which provider.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path == "/readyz" and method == "GET":
            await self._readyz(scope, receive, send)
            return
        if method != "POST" or path not in JSON_ROUTES:
            await self.app(scope, receive, send)
            return

        headers = Headers(scope=scope)
        media_type = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if media_type != "application/json":
            error = f"Content-Type {media_type!r} is not accepted: send JSON with Content-Type: application/json"
            await JSONResponse({"error": error}, status_code=415)(scope, receive, send)
            return
        too_large = JSONResponse({"error": f"request body over {MAX_BODY_BYTES} bytes: send a shorter prompt"},
                                 status_code=413)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            await too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if sum(map(len, chunks)) > MAX_BODY_BYTES:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if path == f"{TASK_ROUTE}/submit":
            service = bentoml.get_current_service()
            if service is not None and service.batcher.full():
                await JSONResponse({"error": "the task queue is full: retry later"}, status_code=429)(
                    scope, receive, send)
                return
            error = _submit_error(body)
            if error is not None:
                await JSONResponse(error, status_code=400)(scope, receive, send)
                return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _readyz(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = bentoml.get_current_service()
        if service is None or not getattr(service, "ready", False):
            await JSONResponse({"ready": False, "detail": "model loading"}, status_code=503)(scope, receive, send)
            return
        await JSONResponse(service.readiness())(scope, receive, send)


def _submit_error(body: bytes) -> dict | None:
    """The 400 body BentoML would send for this request on /generate, or None when it is valid."""
    try:
        request = GenerateRequest.model_validate_json(body)
        service = bentoml.get_current_service()
        if service is not None:
            service.check(request)
    except ValidationError as exc:
        return {"error": f"{exc.error_count()} validation error for {exc.title}",
                "detail": json.loads(exc.json(include_context=False, include_input=False, include_url=False))}
    except ValueError as exc:
        return {"error": str(exc)}
    return None


TextToVideo.add_asgi_middleware(RequestGuard)
