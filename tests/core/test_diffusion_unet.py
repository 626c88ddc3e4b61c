"""LoRMA on a real diffusion architecture: diffusers' UNet2DModel (built from a tiny config), adapted on its
convolutions and attention projections, trained a few steps as a DDPM noise predictor on real images
(scikit-learn's handwritten digits), saved, reloaded from disk and merged (docs/conv-and-embeddings.md)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="pip install 'lorma[diffusion]' (diffusers)")

# resnet convolutions (both sides under side="auto": conv1 changes the channel count) and attention projections
TARGETS = r".*(resnets\.\d+\.conv[12]|attentions\.\d+\.(to_q|to_k|to_v|to_out\.0))$"


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    )


def digits() -> torch.Tensor:
    """The 1,797 8x8 handwritten digits of scikit-learn (shipped with it), scaled to [-1, 1]: (n, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32)
    return (images / 8.0 - 1.0).unsqueeze(1)


@pytest.mark.slow
def test_lorma_trains_saves_reloads_and_merges_a_diffusers_unet(tmp_path: Path) -> None:
    from peft import PeftModel, get_peft_model

    from lorma import LormaConfig
    from lorma.layers.conv import Conv
    from lorma.layers.linear import Linear

    images = digits()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100)
    gen = torch.Generator().manual_seed(0)
    held_out = images[-64:]
    eval_noise = torch.randn(held_out.shape, generator=gen)
    eval_t = torch.randint(0, 100, (held_out.shape[0],), generator=gen)
    eval_x = scheduler.add_noise(held_out, eval_noise, eval_t)

    def eval_loss(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(eval_x, eval_t).sample, eval_noise).item()

    base = tiny_unet()
    base.save_pretrained(tmp_path / "unet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, LormaConfig(target_modules=TARGETS, r=4, alpha=8, side="auto"))
    convs = [m for m in model.modules() if isinstance(m, Conv)]
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(convs) == 16 and {m.side["default"] for m in convs} == {"pre", "post"}  # 8 resnets, 4 attentions
    assert len(linears) == 16
    before = eval_loss(model)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    train = images[:-64]
    model.train()
    for _ in range(60):
        batch = train[torch.randint(0, train.shape[0], (32,), generator=gen)]
        noise = torch.randn(batch.shape, generator=gen)
        t = torch.randint(0, 100, (batch.shape[0],), generator=gen)
        loss = torch.nn.functional.mse_loss(model(scheduler.add_noise(batch, noise, t), t).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    after = eval_loss(model)
    assert after < 0.8 * before, (before, after)

    print(f"held-out noise-prediction loss: {before:.4f} before, {after:.4f} after 60 steps")
    with torch.no_grad():
        expected = model(eval_x, eval_t).sample
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(diffusers.UNet2DModel.from_pretrained(tmp_path / "unet"),
                                         tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(eval_x, eval_t).sample, expected, atol=1e-5)
        merged = reloaded.merge_and_unload()
        assert not any(isinstance(m, Conv) for m in merged.modules())
        assert torch.allclose(merged(eval_x, eval_t).sample, expected, atol=1e-4)
