"""Reconstruction metrics (eval/recon.py): PSNR, SSIM, token usage, the report and the CLI."""
import json

import numpy as np
import pytest
import torch

from eval.recon import TokenUsage, evaluate, gaussian_window, psnr, ssim
from tokenizers_vis.base import Tokenizer
from zoo.tokens import Tokens, TokenSpec


def _ssim_numpy(x, y, size=11, sigma=1.5, k1=0.01, k2=0.03, L=1.0):
    """Direct SSIM: a 2-D Gaussian-weighted window at every valid position (no separable conv)."""
    from numpy.lib.stride_tricks import sliding_window_view

    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g)
    w /= w.sum()
    out = []
    for xi, yi in zip(x, y):  # images
        vals = []
        for xc, yc in zip(xi, yi):  # channels
            px, py = sliding_window_view(xc, (size, size)), sliding_window_view(yc, (size, size))
            mx, my = (px * w).sum((-1, -2)), (py * w).sum((-1, -2))
            vx = (px ** 2 * w).sum((-1, -2)) - mx ** 2
            vy = (py ** 2 * w).sum((-1, -2)) - my ** 2
            cxy = (px * py * w).sum((-1, -2)) - mx * my
            c1, c2 = (k1 * L) ** 2, (k2 * L) ** 2
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        out.append(np.mean(vals))
    return np.array(out)


def test_ssim_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 20, 17, generator=g, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = ssim(x, y)
    want = _ssim_numpy(x.numpy(), y.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    assert gaussian_window().sum().item() == pytest.approx(1.0)


def test_ssim_and_psnr_known_values():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))
    # constant images: the structure terms are 1, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.3, 0.7, 0.01 ** 2
    got = ssim(torch.full((1, 3, 12, 12), a), torch.full((1, 3, 12, 12), b))
    assert got.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)
    # more noise, lower SSIM
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    s = [ssim(x, (x + e * noise).clamp(0, 1)).mean().item() for e in (0.02, 0.1, 0.3)]
    assert s[0] > s[1] > s[2]
    # PSNR of a uniform error of 0.1 on [0, 1]: 20 dB
    assert psnr(x, x + 0.1).tolist() == pytest.approx([20.0] * 3)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_token_usage():
    spec = TokenSpec("discrete", "grid", (2, 2), vocab_size=8)
    u = TokenUsage(spec)
    u.update(Tokens(torch.tensor([[[0, 0], [1, 1]]]), spec))
    r = u.result()
    assert r["codebook_usage"] == 2 / 8 and r["codes_used"] == 2
    assert r["codebook_perplexity"] == pytest.approx(2.0)
    assert r["tokens_per_image"] == 4 and r["bits_per_image"] == 12
    bspec = TokenSpec("binary", "sequence", (4,), bits=3)
    u = TokenUsage(bspec)
    bits = torch.tensor([[[0, 1, 1], [0, 0, 1], [0, 1, 1], [0, 0, 1]]])  # bit 0 never set, bit 2 always
    u.update(Tokens(bits, bspec))
    r = u.result()
    assert r["bit_usage"] == pytest.approx(1 / 3) and r["bit_entropy"] == pytest.approx(1 / 3)
    assert r["unique_codes"] == 2 and r["bits_per_image"] == 12


class IdentityTokenizer(Tokenizer):
    """Continuous 'tokens' = the pixels: a lossless tokenizer (reconstruction is exact)."""

    def __init__(self, image_size: int = 32):
        super().__init__()
        self.image_size = image_size
        self.spec = TokenSpec("continuous", "grid", (image_size, image_size), dim=3)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def encode(self, images):
        return Tokens(self.check_images(images).permute(0, 2, 3, 1).contiguous(), self.spec)

    def decode(self, tokens):
        return tokens.data.permute(0, 3, 1, 2)


def test_lossless_tokenizer_is_perfect():
    r = evaluate(IdentityTokenizer(32), "shapes:test:40", batch_size=16)
    assert r["ssim"] == pytest.approx(1.0) and r["psnr"] > 100
    assert abs(r["shapes_rfid"]) < 1e-6 and "NOT comparable" in r["note"]
    assert r["usage"].startswith("n/a") and r["tokens_per_image"] == 32 * 32 and r["num_images"] == 40
    assert r["encode_ms_per_image"] >= 0 and r["decode_ms_per_image"] >= 0


def test_recon_cli_on_shipped_vq_tiny(tmp_path, capsys):
    from eval.cli import main

    out = tmp_path / "recon.json"
    assert main(["recon", "--tokenizer", "tokenizer/vq-tiny:shapes", "--data", "shapes:test:48", "--batch-size", "16",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    # a trained tokenizer: far better than chance, worse than lossless
    assert 18 < r["psnr"] < 100 and 0.5 < r["ssim"] < 1.0
    assert 0 < r["codebook_usage"] <= 1 and 1 < r["codebook_perplexity"] <= r["codes_used"]
    assert r["tokens_per_image"] == 64 and r["shapes_rfid"] > 0
    assert len(r["tokenizer_weights"]["sha256"]) == 64
    assert "Shapes-rFID" in capsys.readouterr().out
    # wrong resolution is refused with a clear message
    assert main(["recon", "--tokenizer", "tokenizer/vq-tiny:shapes", "--data", "shapes:test:4:res=32"]) == 2
    assert "takes 64x64" in capsys.readouterr().err
