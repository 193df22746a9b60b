"""PromptUNet: a diffusers UNet with cached CLIP prompt states and classifier-free guidance, as
the ε-network of DDIMGaussian, with LoRA on its attention projections (tiny models built from
configs; no downloads)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import diffusers
import pytest
import torch
import transformers

from rtb_ray.config import AdapterConfig
from rtb_ray.learner import make_posterior
from rtb_ray.networks import LoRALinear, PromptUNet, own_state
from rtb_ray.transitions import DDIMGaussian

pytestmark = pytest.mark.usefixtures("one_thread")
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_prior(guidance_scale: float = 1.0) -> PromptUNet:
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        layers_per_block=1, cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=6))
    tokens = torch.tensor([[1, 5, 7, 2, 0, 0], [1, 9, 3, 2, 0, 0], [1, 2, 0, 0, 0, 0]])  # 2 + ∅
    with torch.no_grad():
        states = text(tokens).last_hidden_state
    return PromptUNet(unet, states, guidance_scale).eval().requires_grad_(False)


def test_guidance_is_the_classifier_free_combination():
    prior = tiny_prior(guidance_scale=3.0)
    x, t, ids = torch.randn(4, 3, 8, 8), torch.tensor([900, 500, 100, 0]), torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        eps = prior(x, t, ids[:, None])
        cond = prior.unet(x, t, encoder_hidden_states=prior.prompt_states[ids]).sample
        null = prior.unet(x, t, encoder_hidden_states=prior.prompt_states[[2] * 4]).sample
        torch.testing.assert_close(eps, null + 3.0 * (cond - null), rtol=1e-4, atol=1e-5)
        prior.guidance_scale = 1.0
        torch.testing.assert_close(prior(x, 250, ids), prior.unet(
            x, torch.full((4,), 250), encoder_hidden_states=prior.prompt_states[ids]).sample)
    with pytest.raises(ValueError, match=r"prompt id outside 0..2"):
        prior(x, t, torch.tensor([0, 1, 3, 0]))


def test_a_ddim_chain_of_the_unet_and_a_lora_posterior_that_publishes_adapters_only():
    prior = tiny_prior(guidance_scale=2.0)
    fam = DDIMGaussian.from_scheduler(diffusers.DDIMScheduler(clip_sample=False), 6, (3, 8, 8),
                                      min_std=0.02)
    posterior = make_posterior(prior, AdapterConfig(kind="lora", rank=2,
                                                    target_modules=ATTENTION)).train()
    adapted = [m for m in posterior.modules() if isinstance(m, LoRALinear)]
    attentions = [m for m in prior.modules() if type(m).__name__ == "Attention"]
    assert len(adapted) == 4 * len(attentions) > 0  # q, k, v and out of each
    cond = torch.tensor([0, 1, 0, 1])[:, None]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        states, log_behaviour = fam.sample(prior, 4, cond=cond, generator=gen)
        assert states.shape == (4, 7, 3, 8, 8)
        torch.testing.assert_close(fam.step_log_probs(prior, states, cond=cond).sum(1),
                                   log_behaviour, rtol=1e-4, atol=1e-2)
        # the posterior starts as the prior
        torch.testing.assert_close(fam.step_log_probs(posterior, states, cond=cond),
                                   fam.step_log_probs(prior, states, cond=cond))
    # a gradient reaches the adapters only, and what a worker receives is them alone
    fam.step_log_probs(posterior, states, cond=cond).sum().backward()
    assert all(m.lora_b.grad is not None and m.lora_b.grad.abs().sum() > 0 for m in adapted)
    assert not any(p.grad is not None for p in prior.parameters())
    own = own_state(posterior, prior)
    assert set(own) == {k for k in posterior.state_dict() if k.endswith(("lora_a", "lora_b"))}
    own_bytes = sum(v.numel() * v.element_size() for v in own.values())
    all_bytes = sum(v.numel() * v.element_size() for v in posterior.state_dict().values())
    assert own_bytes < 0.2 * all_bytes
