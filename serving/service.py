"""BentoML service: `POST /generate` turns a prompt into an MP4, `GET /info` says what is served.

A thin adapter: request limits live in `serving/schema.py`, generation in
`components/onnx_runtime.py`. The bundle comes from `$ZOETROPE_BUNDLE` (a bundle folder) when
set, else from the model store's `zoetrope-t2v:latest`, which `bentoml build` packs into the Bento.

    bentoml serve serving.service:TextToVideo --port 3000
    curl -X POST localhost:3000/generate -H 'content-type: application/json' \
         -d '{"prompt": "a red circle bouncing"}' -o video.mp4
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import bentoml
from bentoml.exceptions import InvalidArgument
from bentoml.validators import ContentType
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from components.onnx_runtime import OnnxT2V
from components.video_io import encode_mp4
from serving.schema import GenerateRequest
from serving.store import MODEL_NAME

BUNDLE_ENV = "ZOETROPE_BUNDLE"


async def _info(_: Request) -> JSONResponse:
    return JSONResponse(bentoml.get_current_service().info())


# BentoML APIs are POST only; a GET route rides on a mounted Starlette app (matched passively,
# so it shadows nothing of BentoML's own routes).
info_app = Starlette(routes=[Route("/info", _info, methods=["GET"])])


class JSONBodyOnly:
    """415 for a non-JSON body on an API route.

    BentoML picks its parser by Content-Type, and its form parser turns a malformed body into a
    500; `curl -d` without a header sends a form. The APIs here take JSON only, so say so.
    """

    def __init__(self, app: ASGIApp, paths: tuple[str, ...] = ("/generate",)) -> None:
        self.app, self.paths = app, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            content_type = Headers(scope=scope).get("content-type", "application/json")
            media_type = content_type.split(";")[0].strip().lower()
            if media_type != "application/json":
                error = f"Content-Type {media_type!r} is not accepted: send JSON with Content-Type: application/json"
                await JSONResponse({"error": error}, status_code=415)(scope, receive, send)
                return
        await self.app(scope, receive, send)


@bentoml.asgi_app(info_app, path="/")
@bentoml.service(
    name="zoetrope",
    resources={"gpu": 1},  # a hint for deployment; on a host without GPUs it runs on CPU
    traffic={"timeout": 600, "max_concurrency": 4},
)
class TextToVideo:
    # Declared only when serving from the store: `bentoml build` then records and packs the
    # model, and BentoML resolves it before start-up (which would fail in a store without it).
    if not os.environ.get(BUNDLE_ENV):
        model = bentoml.models.BentoModel(f"{MODEL_NAME}:latest")

    def __init__(self) -> None:
        bundle = os.environ.get(BUNDLE_ENV)
        self.source = bundle if bundle else str(self.model.tag)
        self.pipeline = OnnxT2V(Path(bundle) if bundle else Path(self.model.path))

    @bentoml.api(route="/generate")
    def generate(self, request: GenerateRequest, /) -> Annotated[bytes, ContentType("video/mp4")]:
        """A prompt in, an H.264 MP4 out. Omitted fields take the bundle's sampling defaults."""
        try:
            request.check_bundle(self.pipeline.limits)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        frames = self.pipeline.generate(
            request.prompt,
            seed=0 if request.seed is None else request.seed,
            steps=request.steps,
            guidance=request.guidance,
            num_frames=request.num_frames,
        )  # uint8 (T, H, W, 3)
        return encode_mp4(frames, self.pipeline.fps)

    def info(self) -> dict:
        return {"source": self.source, **self.pipeline.describe()}


TextToVideo.add_asgi_middleware(JSONBodyOnly)
