"""Chunked decoding along time equals whole-video decoding (issue 4: long videos, bounded memory)."""

from __future__ import annotations

import pytest
import torch

from components.config import VAEConfig
from components.vae import VideoVAE

CONFIGS = {
    "t4_s4_p2": VAEConfig(base_channels=8, latent_channels=4, time_down=4, space_down=4, patch=2),
    "t2_s8_p4": VAEConfig(base_channels=8, latent_channels=3, time_down=2, space_down=8, patch=4),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _vae(cfg: VAEConfig) -> VideoVAE:
    torch.manual_seed(0)
    vae = VideoVAE(cfg).eval()
    # Random init, scaled up so the decoder's temporal convs mix frames strongly.
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.mul_(1.5)
    return vae


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_chunked_decode_equals_whole_decode(name):
    vae = _vae(CONFIGS[name])
    z = torch.randn(2, vae.cfg.latent_channels, 7, 3, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = vae.decoder(z)  # unclamped: no pixel hides behind the clamp
        assert whole.shape[2] == 1 + 6 * vae.cfg.time_down
        for chunk in (1, 2, 3, 5, 7, 20):
            pieces = list(vae.decoder.stream(z, chunk))
            assert len(pieces) == -(-7 // chunk)
            assert torch.allclose(torch.cat(pieces, dim=2), whole, atol=1e-5), chunk
            assert torch.allclose(vae.decode(z, chunk_frames=chunk), vae.decode(z), atol=1e-5), chunk

        # The carried frames matter: the last latent frames decoded without the earlier ones (as
        # a chunk with no cache would be) give other pixels than in the whole video.
        td = vae.cfg.time_down
        alone = vae.decoder(z[:, :, 3:])[:, :, -2 * td:]
        assert not torch.allclose(alone, whole[:, :, -2 * td:], atol=1e-3)


def test_chunk_size_must_be_positive():
    vae = _vae(CONFIGS["t4_s4_p2"])
    with pytest.raises(ValueError, match="chunk_frames=0"):
        vae.decode(torch.zeros(1, 4, 2, 2, 2), chunk_frames=0)
