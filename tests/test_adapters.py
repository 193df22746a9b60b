"""LoRA adapters on chosen modules: TimeMLP, nn.MultiheadAttention, GPT-2's Conv1D, and the
attention projections of a diffusers UNet, all built from configs (no downloads)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # the tiny models below come from configs, never the Hub

import diffusers
import pytest
import torch
import transformers
from torch import Tensor, nn

from rtb_ray.networks import LoRALinear, TimeMLP, add_lora


def lora_layers(net: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in net.named_modules() if isinstance(m, LoRALinear)}


def test_time_mlp_default_targets_wrap_every_linear_and_train_only_the_adapters():
    torch.manual_seed(0)
    net = TimeMLP(dim=3, num_steps=8, hidden=16, depth=2, time_features=8, cond_dim=2)
    # a fresh TimeMLP has a zero last layer (output zero whatever the adapters do): give it
    # weights, as a pretrained prior has, so that "equal at init" says something
    nn.init.normal_(net.trunk[-1].weight, std=0.5)
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    x, k, c = torch.randn(10, 3), torch.randint(0, 8, (10,)), torch.randn(10, 2)
    before = net(x, k, c).detach()

    assert add_lora(net, rank=2, alpha=4.0) == len(linears) == 7
    assert sorted(lora_layers(net)) == sorted(linears)
    torch.testing.assert_close(net(x, k, c), before, rtol=0, atol=0)
    # the state-dict layout every copy of the posterior relies on
    assert {"input.base.weight", "input.base.bias", "input.lora_a", "input.lora_b",
            "cond_input.base.weight"} <= set(net.state_dict())
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for n in trainable)

    state = {n: t.clone() for n, t in net.state_dict().items()}
    # every parameter goes to the optimiser: the frozen ones must stay put by themselves
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):  # the second step moves lora_a too (its gradient is zero while B is)
        opt.zero_grad()
        (net(x, k, c) - 1.0).square().mean().backward()
        opt.step()
    changed = {n for n, t in net.state_dict().items() if not torch.equal(t, state[n])}
    assert changed and all(n.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for n in changed)
    assert {"trunk.5.lora_a", "trunk.5.lora_b", "input.lora_b"} <= changed


class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, num_heads=2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        return self.attn(h, h, h, need_weights=False)[0]


def test_default_targets_leave_multihead_attention_as_it_is():
    torch.manual_seed(0)
    net = WithAttention().eval()
    x = torch.randn(2, 5, 8)
    before = net(x).detach()
    assert add_lora(net, rank=2, alpha=2.0) == 1
    assert list(lora_layers(net)) == ["proj"]
    assert type(net.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    # not bit-equal: with its inputs now needing grad, MHA leaves its fused inference path
    torch.testing.assert_close(net(x), before)


def test_targeting_a_linear_inside_multihead_attention_is_refused_untouched():
    net = WithAttention()
    with pytest.raises(ValueError, match=r"'attn\.out_proj' is inside nn\.MultiheadAttention"):
        add_lora(net, rank=2, alpha=2.0, target_modules=["attn.out_proj"])
    with pytest.raises(ValueError, match=r"'attn' is a MultiheadAttention, which LoRA cannot"):
        add_lora(net, rank=2, alpha=2.0, target_modules=["attn"])
    assert not lora_layers(net)  # checked before anything was wrapped
    assert all(p.requires_grad for p in net.parameters())


def test_unknown_pattern_and_empty_targets_are_refused():
    net = TimeMLP(dim=2, num_steps=4, hidden=8, time_features=4)
    with pytest.raises(ValueError, match=r"^adapter\.target_modules: 'foo' matches no module "
                                         r"of the network$"):
        add_lora(net, rank=2, alpha=2.0, target_modules=["input", "foo"])
    with pytest.raises(ValueError, match="empty"):
        add_lora(net, rank=2, alpha=2.0, target_modules=[])
    with pytest.raises(ValueError, match="nothing to adapt"):
        add_lora(nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU()), rank=2, alpha=2.0)
    assert not lora_layers(net)


def test_patterns_match_paths_suffixes_and_globs():
    net = nn.ModuleDict({"prior": TimeMLP(dim=2, num_steps=4, hidden=8, depth=2,
                                          time_features=4)})
    # a suffix ends at a dot: "2" would match time_branch.2 (Linear) and trunk.2 (GELU)
    with pytest.raises(ValueError, match=r"'prior\.trunk\.2' is a GELU.*matched by '2'"):
        add_lora(net, rank=2, alpha=2.0, target_modules=["2"])
    # a whole path, a dotted suffix, and globs (the trunk's Linear layers are 1, 3, 5); a
    # layer matched twice is wrapped once
    n = add_lora(net, rank=2, alpha=2.0, target_modules=[
        "prior.input", "time_branch.0", "prior.trunk.[135]", "*_branch.[02]"])
    assert n == 6
    assert sorted(lora_layers(net)) == [f"prior.{n}" for n in (
        "input", "time_branch.0", "time_branch.2", "trunk.1", "trunk.3", "trunk.5")]
    with pytest.raises(ValueError, match=r"'prior\.input' already has a LoRA adapter"):
        add_lora(net, rank=2, alpha=2.0, target_modules=["input"])


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32,
                                     n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_conv1d_layers_are_adapted_and_trained():
    model = tiny_gpt2()
    ids = torch.randint(0, 32, (2, 6))
    before = model(ids).logits.detach()

    assert add_lora(model, rank=2, alpha=4.0, target_modules=["c_attn"]) == model.config.n_layer
    wrapped = lora_layers(model)
    assert list(wrapped) == ["transformer.h.0.attn.c_attn"]
    assert type(wrapped["transformer.h.0.attn.c_attn"].base).__name__ == "Conv1D"
    assert (wrapped["transformer.h.0.attn.c_attn"].in_features,
            wrapped["transformer.h.0.attn.c_attn"].out_features) == (16, 48)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)

    model(ids).logits.logsumexp(-1).mean().backward()
    layer = wrapped["transformer.h.0.attn.c_attn"]
    assert layer.lora_b.grad is not None and layer.lora_b.grad.abs().sum() > 0
    assert layer.base.weight.grad is None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"transformer.h.0.attn.c_attn.lora_a",
                         "transformer.h.0.attn.c_attn.lora_b"}


def test_gpt2_default_targets_include_its_conv1d_layers():
    model = tiny_gpt2()
    # c_attn, c_proj (attention), c_fc, c_proj (MLP): all Conv1D; and lm_head, a Linear
    assert add_lora(model, rank=2, alpha=2.0) == 5
    assert "lm_head" in lora_layers(model)
    assert add_lora(tiny_gpt2(), rank=2, alpha=2.0, target_modules=["*.attn.c_*"]) == 2


def tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def test_unet_attention_projections_are_adapted_and_nothing_else():
    unet = tiny_unet()
    projections = sorted(n for n, _ in unet.named_modules()
                         if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")
                         or n.endswith(".to_out.0"))
    x, t, context = torch.randn(2, 1, 8, 8), torch.tensor([3, 7]), torch.randn(2, 4, 16)
    with torch.no_grad():
        before = unet(x, t, context).sample

    n = add_lora(unet, rank=2, alpha=4.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    assert n == len(projections) > 0
    assert sorted(lora_layers(unet)) == projections
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context).sample, before, rtol=0, atol=0)
    unet(x, t, context).sample.square().mean().backward()
    assert all(m.lora_b.grad is not None for m in lora_layers(unet).values())


def test_unet_conv2d_target_is_refused_naming_its_path():
    unet = tiny_unet()
    with pytest.raises(ValueError, match=r"^adapter\.target_modules: 'conv_in' is a Conv2d, "
                                         r"which LoRA cannot wrap \(it wraps Linear and Conv1D "
                                         r"layers\)$"):
        add_lora(unet, rank=2, alpha=2.0, target_modules=["to_q", "conv_in"])
    # a whole block, matched by a suffix: the message names the path and the pattern
    with pytest.raises(ValueError, match=r"'down_blocks\.0\.attentions\.0\.transformer_blocks"
                                         r"\.0\.attn1' is an Attention.*matched by 'attn1'"):
        add_lora(unet, rank=2, alpha=2.0, target_modules=["attn1"])
    assert not lora_layers(unet)


def test_a_lora_posterior_shares_the_prior_and_publishes_only_its_adapters():
    """make_posterior with LoRA: one frozen base in memory (the prior's tensors), and own_state
    (what workers receive and checkpoints hold) is the adapters alone; a whole state dict, as
    checkpoints held before, still loads; another network's weights are refused."""
    from pipelines.t2i_gauss import Config, make_task
    from rtb_ray.config import AdapterConfig
    from rtb_ray.learner import make_posterior
    from rtb_ray.networks import load_own_state, own_state

    torch.manual_seed(0)
    prior = TimeMLP(dim=3, num_steps=8, hidden=16, depth=1, time_features=8).requires_grad_(False)
    nn.init.normal_(prior.trunk[-1].weight, std=0.5)
    posterior = make_posterior(prior, AdapterConfig(kind="lora", rank=2))
    assert posterior.input.base.weight is prior.input.weight  # shared, not copied
    assert not any(p.requires_grad for p in prior.parameters())
    own = own_state(posterior, prior)
    assert set(own) == {f"{n}.{w}" for n in lora_layers(posterior) for w in ("lora_a", "lora_b")}

    with torch.no_grad():  # "train": move every adapter
        for name, p in posterior.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    x, k = torch.randn(5, 3), torch.randint(0, 8, (5,))
    other = make_posterior(prior, AdapterConfig(kind="lora", rank=2))
    load_own_state(other, prior, own_state(posterior, prior))
    torch.testing.assert_close(other(x, k), posterior(x, k))
    fresh = make_posterior(prior, AdapterConfig(kind="lora", rank=2))
    load_own_state(fresh, prior, posterior.state_dict())  # the whole dict: adapters taken
    torch.testing.assert_close(fresh(x, k), posterior(x, k))
    assert prior.input.weight is fresh.input.base.weight  # and the base left as it was
    with pytest.raises(ValueError, match="weights of another network"):
        load_own_state(make_posterior(prior, AdapterConfig(kind="lora", rank=4)), prior, own)
    with pytest.raises(ValueError, match="weights of another network"):
        load_own_state(make_posterior(prior, AdapterConfig()), prior, own)

    # a full fine-tune shares nothing: its whole state; a residual posterior: its correction
    assert set(own_state(make_posterior(prior, AdapterConfig()), prior)) == set(prior.state_dict())
    task = make_task(Config(channels=1, size=4, rank=1, component_stds=[1.0], num_steps=4))
    t2i_prior = task.prior()
    residual = make_posterior(t2i_prior, AdapterConfig(), task)
    assert set(own_state(residual, t2i_prior)) == {f"correction.{k}" for k in
                                                    residual.correction.state_dict()}
