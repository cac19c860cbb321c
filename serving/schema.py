"""Request limits of the text-to-video service: the one place they are written.

Static limits live on the request models (pydantic turns a violation into HTTP 400 naming the
field); what depends on the bundle being served (frame counts, the trained size) is checked by
`GenerateRequest.check_bundle`. The traffic limits below bound what a client can make the
service hold: body bytes, requests in flight, videos per forward pass.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from components.onnx_runtime import BundleInfo

MAX_PROMPT_CHARS = 500
MAX_SEED = 2**31 - 1
MAX_STEPS = 100
MAX_GUIDANCE = 20.0
FORMATS = ("mp4", "gif")
ASPECT_PATTERN = r"^[1-9][0-9]{0,2}:[1-9][0-9]{0,2}$"  # "W:H"; which ones a model offers is in its bundle

MAX_BODY_BYTES = 16 * 1024  # a full request is < 2 KB; larger bodies are 413 before parsing
MAX_CONCURRENCY = 64  # requests in flight per worker; more are 429 (BentoML traffic limit)
MAX_BATCH_SIZE = 8  # videos sampled together in one DiT call (bounds peak memory)
MAX_QUEUED = 256  # requests waiting for a batch (tasks included); more are 429
MAX_LATENCY_MS = 25  # how long the first request of a batch waits for company
MAX_LANES = 16  # batches running at once (one per CPU core by default; serving/batching.py)
REQUEST_TIMEOUT_S = 600


class _Strict(BaseModel):
    # strict: "5" is not a number and true is not 1; forbid: a misspelt key is an error, not a default
    model_config = ConfigDict(extra="forbid", strict=True)


def _not_blank(prompt: str) -> str:
    if not prompt.strip():
        raise ValueError("prompt is blank: describe the video to generate")
    return prompt


class GenerateRequest(_Strict):
    """Body of `POST /generate`. Omitted fields take the bundle's sampling defaults."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what the video shows")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS,
                                 description="what to steer away from (the unconditional branch of guidance)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="noise seed; same seed, same video")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="sampling steps")
    guidance: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False,
                                   description="classifier-free guidance scale")
    num_frames: int | None = Field(None, ge=1, description="1 + k*time_down, up to the bundle's maximum")
    size: int | None = Field(None, ge=1, description="square frame side in pixels: the bundle's trained size")
    aspect: str = Field("1:1", pattern=ASPECT_PATTERN,
                        description="width:height of one of the clip shapes the model trained on "
                                    "(GET /info lists them, e.g. 1:1, 5:3 landscape, 3:5 portrait)")
    format: Literal[FORMATS] = Field("mp4", description="mp4 (H.264) or gif")  # type: ignore[valid-type]
    expand: bool = Field(False, description="rewrite the prompt into a training-style caption first")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, prompt: str) -> str:
        return _not_blank(prompt)

    def check_bundle(self, info: BundleInfo) -> tuple[int, int]:
        """(height, width) to generate at; ValueError naming the field when the served bundle
        cannot honour the request."""
        if self.num_frames is not None:
            info.limits.check_frames(self.num_frames)
        height, width = info.size_for_aspect(self.aspect)
        if self.size is not None and (self.aspect != "1:1" or self.size != info.size):
            raise ValueError(f"size={self.size} is invalid: this model makes {info.size}x{info.size} square clips; "
                             f"omit size (or send {info.size} with aspect 1:1)")
        return height, width


class ExpandRequest(_Strict):
    """Body of `POST /expand`."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="a short user prompt")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, prompt: str) -> str:
        return _not_blank(prompt)
