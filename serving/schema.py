"""Request limits of the text-to-video service: the one place they are written.

Static limits live on `GenerateRequest` (pydantic turns a violation into HTTP 400 naming the
field); the frame count also depends on the bundle being served, checked by `check_bundle`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from components.onnx_runtime import Limits

MAX_PROMPT_CHARS = 500
MAX_SEED = 2**31 - 1
MAX_STEPS = 100
MAX_GUIDANCE = 20.0


class GenerateRequest(BaseModel):
    """Body of `POST /generate`. Omitted fields take the bundle's sampling defaults."""

    # strict: "5" is not a number and true is not 1; forbid: a misspelt key is an error, not a default
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what the video shows")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="noise seed; same seed, same video")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="sampling steps")
    guidance: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False,
                                   description="classifier-free guidance scale")
    num_frames: int | None = Field(None, ge=1, description="1 + k*time_down, up to the bundle's maximum")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt is blank: describe the video to generate")
        return prompt

    def check_bundle(self, limits: Limits) -> None:
        """Raise ValueError naming num_frames when the served bundle cannot make that many frames."""
        if self.num_frames is not None:
            limits.check_frames(self.num_frames)
