"""The typed parameters of the dashboard's Run form: the knobs people change, as `--set` overrides.

Prefect turns a pydantic model into a validated form in the UI: a negative step count or an
unknown model preset is refused before a run starts. Every field defaults to None, meaning "the
profile's value from params.yaml" (params.yaml stays the one owner of numbers); a value set in
the form becomes one `section.key=value` override, recorded with the run like `--set` is.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

# Mirrors components.dit.DIT_PRESETS (a test checks they agree); spelt out so the deploy
# process builds the form without importing torch.
DitPreset = Literal["tiny", "small", "base"]

# form field -> params.yaml key
OVERRIDE_KEYS: dict[str, str] = {
    "dit_preset": "dit.preset",
    "dit_steps": "dit.steps",
    "dit_lr": "dit.lr",
    "vae_steps": "vae.steps",
    "vae_lr": "vae.lr",
    "caption_steps": "caption.steps",
    "gate_vae_psnr_min": "gates.vae_psnr_min",
    "gate_caption_accuracy_min": "gates.caption_accuracy_min",
    "gate_adherence_color_min": "gates.adherence_color_min",
    "gate_adherence_shape_min": "gates.adherence_shape_min",
    "gate_adherence_motion_min": "gates.adherence_motion_min",
}

_FRACTION = dict(ge=0.0, le=1.0)


class Knobs(BaseModel):
    """Values that override the chosen profile for one run; leave a field empty to keep it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dit_preset: Optional[DitPreset] = Field(None, description="DiT size preset (dit.preset)")
    dit_steps: Optional[int] = Field(None, ge=1, description="DiT optimizer steps (dit.steps)")
    dit_lr: Optional[float] = Field(None, gt=0.0, lt=1.0, description="DiT peak learning rate (dit.lr)")
    vae_steps: Optional[int] = Field(None, ge=1, description="VAE optimizer steps (vae.steps)")
    vae_lr: Optional[float] = Field(None, gt=0.0, lt=1.0, description="VAE peak learning rate (vae.lr)")
    caption_steps: Optional[int] = Field(None, ge=1, description="captioner steps (caption.steps)")
    gate_vae_psnr_min: Optional[float] = Field(None, ge=0.0, description="VAE PSNR gate, dB")
    gate_caption_accuracy_min: Optional[float] = Field(None, **_FRACTION, description="captioner gate")
    gate_adherence_color_min: Optional[float] = Field(None, **_FRACTION, description="colour adherence gate")
    gate_adherence_shape_min: Optional[float] = Field(None, **_FRACTION, description="shape adherence gate")
    gate_adherence_motion_min: Optional[float] = Field(None, **_FRACTION, description="motion adherence gate")
    extra: list[str] = Field(
        default_factory=list,
        description="any other params.yaml value, one `section.key=value` each (e.g. sample.steps=8)",
    )

    def overrides(self) -> list[str]:
        """The `--set` overrides these knobs stand for, form fields first, in a stable order."""
        out = [f"{key}={getattr(self, name)}" for name, key in OVERRIDE_KEYS.items()
               if getattr(self, name) is not None]
        return out + list(self.extra)
