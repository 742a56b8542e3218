"""SD KL-f8 VAE: exact key/shape match with the LDM layout, diffusers AutoencoderKL parity, frame helpers."""

import pytest
import torch

from checkpoint_fixtures import manifest, manifest_shapes
from kineflow.models import checkpoints
from kineflow.models.sd_vae import SDVAE, SDVAEConfig, config_from_state_dict, convert_state_dict
from kineflow.errors import KineFlowError, ModelFileError


def test_full_model_matches_the_ldm_checkpoint_layout():
    shapes = manifest_shapes("sd_vae_ldm")
    det = checkpoints.detect(shapes)
    assert (det.family, det.layout) == ("sd_vae", "ldm")
    internal = convert_state_dict(shapes, det.layout)
    config = config_from_state_dict(internal)
    assert config == SDVAEConfig.full()
    with torch.device("meta"):
        model = SDVAE(config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == internal
    assert sum(v.numel() for v in model.state_dict().values()) == manifest("sd_vae_ldm")["num_params"]


@pytest.fixture(scope="module")
def diffusers_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=16,
    ).eval()
    for p in vae.parameters():
        p.data.normal_(0, 0.05)
    return vae


def _old_attention_names(sd):
    """The pre-0.14 diffusers spelling of the mid-block attention (query/key/value/proj_attn)."""
    rename = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for k, v in sd.items():
        for new, old in rename.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        out[k] = v
    return out


@pytest.mark.parametrize("spelling", ["new", "old"])
def test_matches_diffusers_autoencoder(diffusers_vae, spelling):
    sd = diffusers_vae.state_dict()
    if spelling == "old":
        sd = _old_attention_names(sd)
        assert any(".query." in k for k in sd)
    internal = convert_state_dict(sd, "diffusers")
    assert internal["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    config = config_from_state_dict(internal)
    assert config == SDVAEConfig.tiny()
    model = SDVAE(config).eval()
    model.load_state_dict(internal)
    gen = torch.Generator().manual_seed(2)
    images, latents = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1, torch.randn(2, 4, 8, 8, generator=gen)
    with torch.no_grad():
        assert (model.encode(images).mean - diffusers_vae.encode(images).latent_dist.mean).abs().max() <= 1e-4
        assert (model.decode(latents) - diffusers_vae.decode(latents).sample).abs().max() <= 1e-4


def test_frame_helpers_equal_per_frame_coding():
    torch.manual_seed(0)
    model = SDVAE(SDVAEConfig.tiny()).eval()
    video = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = model.encode_frames(video, batch=2)
        assert latents.shape == (2, 4, 3, 8, 8)
        assert torch.allclose(latents[1, :, 2], model.encode_latents(video[1, :, 2][None])[0], atol=1e-5)
        decoded = model.decode_frames(latents, batch=4)
        assert decoded.shape == (2, 3, 3, 16, 16)
        assert torch.allclose(decoded[0, :, 1], model.decode_latents(latents[0, :, 1][None])[0], atol=1e-5)
        assert torch.allclose(decoded[1, :, 2], model.decode(latents[1, :, 2][None] / 0.18215)[0].clamp(-1, 1), atol=1e-5)


def test_bad_inputs_and_layouts_are_reported():
    model = SDVAE(SDVAEConfig.tiny())
    with pytest.raises(KineFlowError, match=r"expected latents \[B, 4, H, W\], found shape \[1, 16, 8, 8\]"):
        model.decode(torch.zeros(1, 16, 8, 8))
    with pytest.raises(KineFlowError, match="multiples of 2, found 15x16"):
        model.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ModelFileError, match="expected 'ldm' or 'diffusers'"):
        convert_state_dict({}, "original")
