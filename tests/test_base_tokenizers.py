"""The base tokenizers built on the quantizer library: msvq (VAR pyramid), kl (continuous), bsq/lfq (binary)."""
import pytest
import torch

import zoo
from zoo import registry
from zoo.tokens import Tokens, TokenError

torch.set_num_threads(1)


def _model(name, **kw):
    torch.manual_seed(0)
    m = zoo.create(name, **kw)
    m.eval()
    return m


def _images(m, b=2, seed=0):
    return m.example_images(b, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["tokenizer/msvq-tiny", "tokenizer/kl-tiny",
                                  "tokenizer/bsq-tiny", "tokenizer/lfq-tiny"])
def test_encode_decode_shapes_and_determinism(name):
    m = _model(name)
    x = _images(m, 3)
    with torch.no_grad():
        tok = m.encode(x)
        assert tok.spec == m.spec and tok.batch_size == 3
        tok.validate()  # raises TokenError if the data do not fit the spec
        Tokens.from_sequence(tok.to_sequence().data, m.spec)  # flat round trip is valid too
        a, b = m.decode(tok), m.decode(tok)
    assert a.shape == x.shape and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_msvq_pyramid_tokens():
    m = _model("tokenizer/msvq-tiny")
    scales = [1, 2, 3, 4, 6, 8]
    assert m.spec.layout == "pyramid" and m.spec.shape == tuple((p, p) for p in scales)
    assert m.spec.num_tokens == sum(p * p for p in scales) == 130
    with torch.no_grad():
        tok = m.encode(_images(m))
        assert [tuple(t.shape) for t in tok.data] == [(2, p, p) for p in scales]
        assert all(t.dtype == torch.int64 and t.min() >= 0 and t.max() < 1024 for t in tok.data)
        assert tok.to_sequence().data.shape == (2, 130)
        # decode reads every scale: changing the finest scale's ids changes the image
        other = [t.clone() for t in tok.data]
        other[-1] = (other[-1] + 1) % 1024
        assert not torch.equal(m.decode(tok), m.decode(Tokens(other, m.spec)))
        with pytest.raises(ValueError, match="expects tokens"):
            m.decode(Tokens(tok.data[0], zoo.tokens.TokenSpec("discrete", "grid", (1, 1), vocab_size=1024)))


def test_msvq_last_scale_must_match_latent():
    with pytest.raises(ValueError, match="last scale must equal"):
        zoo.create("tokenizer/msvq-tiny", scales=[1, 2, 4])


def test_kl_encode_is_deterministic_and_forward_samples():
    m = _model("tokenizer/kl-tiny")
    x = _images(m)
    with torch.no_grad():
        t1, t2 = m.encode(x), m.encode(x)
        assert t1.spec.kind == "continuous" and t1.data.shape == (2, 8, 8, 8)
        torch.testing.assert_close(t1.data, t2.data, rtol=0, atol=0)
        # encode is the posterior mode (times scale_factor): it equals the posterior mean
        post = m.quantizer.posterior(m.encoder(x))
        torch.testing.assert_close(t1.data, post.mean.movedim(1, -1) * m.quantizer.scale_factor)
        r1, l1 = m(x)
        r2, _ = m(x)
        assert not torch.equal(r1, r2), "forward should sample the posterior"
        r3, _ = m(x, sample=False)
        torch.testing.assert_close(r3, m.decode(t1), rtol=1e-5, atol=1e-5)
    assert l1["kl"] > 0 and torch.isfinite(l1["loss"])


def test_kl_scale_factor_round_trip():
    m = _model("tokenizer/kl-tiny", scale_factor=0.5)
    base = _model("tokenizer/kl-tiny")
    x = _images(m)
    with torch.no_grad():
        torch.testing.assert_close(m.encode(x).data, 0.5 * base.encode(x).data)
        torch.testing.assert_close(m.decode(m.encode(x)), base.decode(base.encode(x)))


@pytest.mark.parametrize("name,mode", [("tokenizer/bsq-tiny", "bsq"), ("tokenizer/lfq-tiny", "lfq")])
def test_binary_tokens_are_bits(name, mode):
    m = _model(name)
    assert m.quantizer.mode == mode and m.spec.bits == 32 and m.spec.shape == (8, 8)
    with torch.no_grad():
        tok = m.encode(_images(m, 4))
        assert tok.data.dtype == torch.uint8 and tok.data.shape == (4, 8, 8, 32)
        assert set(tok.data.unique().tolist()) == {0, 1}
        # flipping bits changes the decoded image (the bits are the code)
        flipped = Tokens(1 - tok.data, m.spec)
        assert not torch.allclose(m.decode(tok), m.decode(flipped))
    with pytest.raises(TokenError):
        Tokens(tok.data * 2, m.spec)


def test_bsq_temperature_is_set_for_32_bits():
    assert registry.build_meta("tokenizer/bsq-tiny").quantizer.inv_temperature == 32.0


@pytest.mark.parametrize("name", ["tokenizer/msvq-tiny", "tokenizer/kl-tiny", "tokenizer/bsq-tiny"])
def test_wrong_image_size_raises(name):
    m = _model(name)
    with pytest.raises(ValueError, match="expected 64x64 images, got 32x32"):
        m.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="expected 64x64"):
        m(torch.zeros(1, 3, 48, 48))


@pytest.mark.parametrize("name,lo,hi", [("tokenizer/msvq-var", 100e6, 120e6),
                                        ("tokenizer/kl-16", 60e6, 80e6)])
def test_paper_configs_build_on_meta(name, lo, hi):
    m = registry.build_meta(name)
    assert all(p.device.type == "meta" for p in m.parameters())
    n = registry.info(name)["params"]
    print(f"{name}: {n / 1e6:.2f}M params")
    assert lo < n < hi
    assert m.image_size == 256 and m.downsample == 16


def test_msvq_var_spec_is_680_tokens():
    m = registry.build_meta("tokenizer/msvq-var")
    assert m.spec.num_tokens == 680 and m.spec.vocab_size == 4096
