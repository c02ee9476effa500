"""µP (variants/mup.py): the init, lr multipliers, attention scale and output multiplier of every part against
Tensor Programs V's table worked out by hand for one case, and µP at its base width being SP exactly."""
import math
from functools import partial

import pytest
import torch

from conftest import compose, tiny_model
from runner.build import check_model_config
from runner.optim import build_optimizer
from variants import MoE, MultiHeadLatentAttention

# The case worked by hand: d_model 256 over base_width 64, so m = 4; 2 layers, 4 heads (head_dim 64, base 16).
M, LAYERS, STD = 4, 2, 0.02
HIDDEN_STD, RESIDUAL_STD = STD / 2, STD / math.sqrt(2 * LAYERS) / 2  # std / sqrt(m)
EXPECTED = {  # name suffix -> (init std, lr multiplier)
    "attn.q_proj.weight": (HIDDEN_STD, 1 / 4), "attn.k_proj.weight": (HIDDEN_STD, 1 / 4),
    "attn.o_proj.weight": (RESIDUAL_STD, 1 / 4), "ffn.gate_proj.weight": (HIDDEN_STD, 1 / 4),
    "ffn.down_proj.weight": (RESIDUAL_STD, 1 / 4),
    "embed.weight": (STD, 1.0), "lm_head.weight": (STD, 1.0),  # the head: logits x 1/4 instead
    "ffn.router.weight": (STD / 4, 1 / 4),  # an output: std / m, lr / m
    "ffn.experts.0.up_proj.weight": (HIDDEN_STD, 1 / 4),
    "attn.kv_down.weight": (STD / 4, 1 / 4), "attn.kv_up.weight": (STD, 1.0),  # MLA's latent: fixed size
    "attn.k_rope_proj.weight": (HIDDEN_STD, 1 / 4),
}


def mup_model(d_model=256, parametrization="mup", **kwargs):
    return tiny_model(d_model=d_model, n_layers=LAYERS, n_heads=4, vocab_size=512, parametrization=parametrization,
                      base_width=64, **kwargs).train()


@pytest.mark.parametrize("parts", ["dense", "moe_mla"])
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_init_stds_and_group_lrs_follow_the_mup_table(parts, optimizer):
    options = {"ffn": partial(MoE, n_experts=2, top_k=1), "attention_cls": MultiHeadLatentAttention,
               "attention_options": {"kv_lora_rank": 32}} if parts == "moe_mla" else {}
    model = mup_model(**options)
    cfg = compose([f"train/optimizer={optimizer}"]).train
    opt = build_optimizer(cfg, model, "cpu")
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    seen = 0
    for name, p in model.named_parameters():
        if p.ndim == 1:  # norm gains: ones, lr unchanged
            assert torch.equal(p, torch.ones_like(p)) and lr_of[id(p)] == 3e-3, name
            continue
        key = next((k for k in EXPECTED if name.endswith(k)), None)
        if key is None:
            continue
        std, lr_mult = EXPECTED[key]
        seen += 1
        assert p.std().item() == pytest.approx(std, rel=0.08), name
        base_lr = 0.01 if optimizer == "muon" and name.startswith("blocks.") else 3e-3
        assert lr_of[id(p)] == pytest.approx(base_lr * lr_mult, rel=1e-12), name
    assert seen >= 6


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_attention_scale_is_one_over_d_head_and_logits_carry_one_over_m(attention):
    """The same weights in an SP model whose attention scale is set by hand to sqrt(base d_head) / d_head
    give µP's logits times m."""
    options = {"attention_cls": MultiHeadLatentAttention, "attention_options": {"rope_head_dim": 64}} \
        if attention == "mla" else {}
    mup = mup_model(**options).eval()
    sp = mup_model(parametrization="sp", **options).eval()
    sp.load_state_dict(mup.state_dict())
    width = 64 + (64 if attention == "mla" else 0)  # the query-key product's width; at base, a quarter of it
    for attn in sp.attention_modules():
        attn.softmax_scale = math.sqrt(width / M) / width
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(mup(ids) * M, sp(ids), rtol=1e-5, atol=1e-5)


def test_mup_at_its_base_width_is_sp_exactly():
    sp = tiny_model(seed=3).train()
    mup = tiny_model(seed=3, parametrization="mup", base_width=32).train()  # tiny_model's d_model is 32
    for (name, a), b in zip(sp.named_parameters(), mup.parameters()):
        assert torch.equal(a, b), name
    cfg = compose().train
    lrs = [[g["lr"] for g in build_optimizer(cfg, m, "cpu").param_groups] for m in (sp, mup)]
    assert lrs[0] == lrs[1]
    ids = torch.randint(0, 61, (2, 16))
    assert torch.equal(sp.loss(ids, ids), mup.loss(ids, ids))


def test_a_bad_parametrization_is_a_config_error_naming_the_key():
    cfg = compose(["model.parametrization=mu", "model.d_model=32", "model.n_heads=2"])
    with pytest.raises(ValueError, match=r"model.parametrization='mu'"):
        check_model_config(cfg.model)
    cfg = compose(["model.parametrization=mup", "model.base_width=0"])
    with pytest.raises(ValueError, match=r"model.base_width=0"):
        check_model_config(cfg.model)


def test_sp_reproduces_the_old_recipe_loss_curve_exactly():
    """parametrization=sp through build_optimizer against the recipe as it was before optimizers were parts,
    spelled out here: AdamW over (matrices but embeddings: decay 0.1; the rest: 0), lr 3e-3, betas (0.9, 0.95)."""
    def old_recipe(model):
        embeddings = {id(model.embed.weight)}
        params = list(model.parameters())
        decay = [p for p in params if p.ndim >= 2 and id(p) not in embeddings]
        rest = [p for p in params if not (p.ndim >= 2 and id(p) not in embeddings)]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                 lr=3e-3, betas=(0.9, 0.95), fused=True)  # fused on a CPU, as the Trainer's

    ids = torch.randint(0, 61, (4, 16))
    curves = []
    for make in (old_recipe, lambda m: build_optimizer(compose(["model.parametrization=sp"]).train, m, "cpu")):
        model = tiny_model(seed=5, parametrization="sp").train()
        opt = make(model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
        losses = []
        for _ in range(5):
            loss = model.loss(ids, ids)
            loss.backward()
            opt.step(), sched.step(), opt.zero_grad()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0] == curves[1]
