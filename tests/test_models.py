"""timm-style tests over every registered model.

Tiny configs are built for real: forward + backward on CPU, and a save_pretrained /
from_pretrained round trip that must give identical outputs. Paper-size configs are built
on the meta device and their parameter counts checked against the paper's (within 5%).
"""
import pytest
import torch

import zoo
from zoo import registry
from zoo.tokens import random_tokens

TINY = [n for n in registry.list_models("*") if registry.entry(n).is_tiny]
PAPER = [n for n in registry.list_models("*") if registry.entry(n).paper_params]


def _outputs(model, seed=0):
    """Deterministic outputs of a model in eval mode, for comparisons."""
    g = torch.Generator().manual_seed(seed)
    model.eval()
    with torch.no_grad():
        if model.registry_name.startswith("tokenizer/"):
            x = model.example_images(2, g)
            tokens = model.encode(x)
            return [*(tokens.to_sequence().data.float(),), model.decode(tokens)]
        tokens = random_tokens(model.spec, 2, g)
        cond = model.example_condition(2, g)
        torch.manual_seed(seed)
        out = model.loss(tokens, cond)
        return [out["loss"]]


def test_registry_is_not_empty():
    assert TINY, "no tiny models registered"


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward(name):
    torch.manual_seed(0)
    model = zoo.create(name)
    model.train()
    g = torch.Generator().manual_seed(0)
    if name.startswith("tokenizer/"):
        x = model.example_images(2, g)
        recon, losses = model(x)
        assert recon.shape == x.shape
    else:
        losses = model.loss(random_tokens(model.spec, 2, g), model.example_condition(2, g))
    loss = losses["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads), "no gradient reached the parameters"


@pytest.mark.parametrize("name", TINY)
def test_save_load_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = zoo.create(name)
    model.save_pretrained(tmp_path / "ckpt")
    back = zoo.load_pretrained(tmp_path / "ckpt")
    assert type(back) is type(model) and back.registry_name == name
    assert back.config == model.config
    for a, b in zip(_outputs(model), _outputs(back)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", PAPER)
def test_paper_config_param_count(name):
    e = registry.entry(name)
    n = registry.info(name)["params"]
    assert abs(n / e.paper_params - 1) <= 0.05, f"{name}: {n / 1e6:.1f}M vs paper {e.paper_params / 1e6:.1f}M"


def test_info_has_spec_and_paper():
    for name in TINY:
        i = registry.info(name)
        assert i["params"] > 0 and i["spec"], name
