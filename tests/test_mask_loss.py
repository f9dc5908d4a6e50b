"""eval.mask_loss: MAR's masked-token loss at fixed mask ratios."""
import pytest
import torch

import zoo
from eval.mask_loss import mask_loss


def _data(n=6):
    from eval.images import shapes_test_batch

    return shapes_test_batch(n)


def test_mask_loss_is_seeded_and_depends_on_the_ratio():
    torch.manual_seed(0)
    tok = zoo.create("tokenizer/kl-tiny").eval()
    gen = zoo.create("generator/mar-tiny", depth=1, head_depth=1, head_width=32)
    x, y = _data()
    a = mask_loss(gen, tok, x, y, [1.0, 0.1], draws=2, seed=3)
    b = mask_loss(gen, tok, x, y, [1.0, 0.1], draws=2, seed=3)
    assert a == b and set(a) == {1.0, 0.1}
    assert all(v > 0 for v in a.values()) and a[1.0] != a[0.1]


def test_mask_loss_refuses_himar():
    tok = zoo.create("tokenizer/kl-tiny").eval()
    x, y = _data(2)
    with pytest.raises(ValueError, match="HiMAR"):
        mask_loss(zoo.create("generator/himar-tiny"), tok, x, y, [0.5])
