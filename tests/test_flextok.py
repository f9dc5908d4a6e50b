"""FlexTok ordered 1D tokenizer (tokenizers_vis/flextok.py): causal registers, nested dropout,
prefix decoding, FSQ vocabulary, paper configs, training, checkpoints."""
import pytest
import torch
from torch import nn

import zoo
from tokenizers_vis.flextok import FlexTok, causal_last_mask, powers_of_two, prefix_metrics
from zoo.data.shapes import ShapesDataset
from zoo.tokens import Tokens

SMALL = dict(image_size=32, patch_size=8, num_registers=8, enc_dim=32, enc_depth=2, enc_heads=2,
             dec_dim=32, dec_depth=1, dec_heads=2, ffn_multiple=16, levels=[5, 4, 3], decoder="direct")


def small(**kw) -> FlexTok:
    torch.manual_seed(0)
    m = FlexTok(**{**SMALL, **kw})
    nn.init.normal_(m.to_pixels.weight, std=0.05)  # the output layer starts at zero: make decodes differ
    return m


def shapes(n=4, res=32, num_objects=(1, 4)):
    ds = ShapesDataset(resolution=res, num_objects=num_objects, length=n)
    return torch.stack([ds[i]["image"] for i in range(n)])


def test_causal_last_mask_definition():
    m = causal_last_mask(3, 3)
    want = torch.tensor([[1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 1, 0],
                         [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, want)


def test_registers_are_causal_and_patches_never_see_registers():
    m = small().eval()
    x = shapes(2)
    with torch.no_grad():
        base_p, base_r = m.encoder_forward(x)
        for j in range(m.num_registers):
            regs = m.registers.detach().clone()
            regs[j] += 3.0 * torch.randn(regs.shape[1])
            p, r = m.encoder_forward(x, registers=regs)
            torch.testing.assert_close(p, base_p, rtol=0, atol=1e-6)          # patches see no register
            torch.testing.assert_close(r[:, :j], base_r[:, :j], rtol=0, atol=1e-6)  # registers < j unchanged
            assert (r[:, j] - base_r[:, j]).abs().max() > 1e-3                # register j itself changes
            if j + 1 < m.num_registers:
                assert (r[:, j + 1:] - base_r[:, j + 1:]).abs().max() > 1e-4  # later registers see it


def test_prefix_ids_equal_truncated_encoding():
    m = small().eval()
    x = shapes(4)
    ids = m.encode(x).data
    assert ids.shape == (4, 8) and ids.dtype == torch.long
    for k in range(1, m.num_registers + 1):
        # only k registers in the encoder: the first k ids, whatever the decoder later uses
        assert torch.equal(m.encode_ids(x, k), ids[:, :k])


def test_nested_dropout_keeps_a_power_of_two_prefix():
    m = small()
    g = torch.Generator().manual_seed(0)
    keep = m.sample_keep(2000, generator=g)
    assert set(keep.tolist()) == {1, 2, 4, 8}
    assert abs((keep == 1).float().mean().item() - 0.25) < 0.05      # uniform over the powers of two
    codes = m.quantizer.indices_to_codes(torch.randint(m.spec.vocab_size, (4, 8)))
    keep = torch.tensor([1, 2, 4, 8])
    slots = m.decoder_registers(codes, keep)
    full = m.decoder_registers(codes)
    masked = m.mask_token + m.register_pos
    for b, k in enumerate(keep.tolist()):
        torch.testing.assert_close(slots[b, :k], full[b, :k])
        torch.testing.assert_close(slots[b, k:], masked[k:])
    uniform = FlexTok(**{**SMALL, "keep_mode": "uniform", "min_keep": 3})
    assert set(uniform.sample_keep(500).tolist()) == set(range(3, 9))
    assert set(FlexTok(**{**SMALL, "keep_mode": "none"}).sample_keep(50).tolist()) == {8}
    assert powers_of_two(1, 32) == [1, 2, 4, 8, 16, 32] and powers_of_two(3, 20) == [4, 8, 16]
    with pytest.raises(ValueError, match="power-of-two"):
        FlexTok(**{**SMALL, "num_registers": 6})


def test_training_dropout_is_inference_prefix_decoding(monkeypatch):
    # a training forward that keeps k registers reconstructs exactly what decode_prefix(ids[:, :k]) gives
    m = small().train()
    x = shapes(3)
    ids = m.encode(x).data
    for k in (1, 4):
        monkeypatch.setattr(m, "sample_keep", lambda B, device=None, k=k: torch.full((B,), k))
        recon, losses = m(x)
        assert losses["keep_mean"] == k
        torch.testing.assert_close(recon.clamp(-1, 1), m.decode_prefix(ids[:, :k]), rtol=0, atol=1e-5)


def test_decode_prefix_every_power_of_two_and_full_decode():
    m = small().eval()
    x = shapes(3)
    tok = m.encode(x)
    outs = {}
    for k in powers_of_two(1, m.num_registers):
        y = m.decode_prefix(tok.data[:, :k])
        assert y.shape == (3, 3, 32, 32) and torch.isfinite(y).all() and y.abs().max() <= 1
        outs[k] = y
    torch.testing.assert_close(m.decode(tok), outs[8], rtol=0, atol=0)
    assert (outs[1] - outs[8]).abs().max() > 1e-3  # the mask token is not a code: prefixes differ
    # later ids only matter when decoded: a prefix ignores whatever follows it
    other = tok.data.clone()
    other[:, 2:] = (other[:, 2:] + 1) % m.spec.vocab_size
    torch.testing.assert_close(m.decode_prefix(other[:, :2]), outs[2], rtol=0, atol=0)
    for bad in (tok.data[:, :0], torch.cat((tok.data, tok.data[:, :1]), 1), tok.data.float(),
                torch.full((1, 2), m.spec.vocab_size)):
        with pytest.raises(ValueError):
            m.decode_prefix(bad)


def test_spec_fsq_vocabulary_and_ordered():
    m = zoo.create("tokenizer/flextok-tiny")
    assert m.spec.kind == "discrete" and m.spec.layout == "sequence" and m.spec.ordered
    assert m.spec.shape == (32,) and m.spec.vocab_size == 8 * 5 * 5 * 5 == 1000
    assert m.quantizer.codebook_size == 1000
    x = shapes(2, res=64)
    ids = m.encode(x).data
    assert int(ids.min()) >= 0 and int(ids.max()) < 1000
    # every id round-trips through the FSQ grid
    all_ids = torch.arange(1000)
    assert torch.equal(m.quantizer.codes_to_indices(m.quantizer.indices_to_codes(all_ids)), all_ids)


@pytest.mark.parametrize("name, enc, dec", [("tokenizer/flextok-d12-d12", 12, 12),
                                            ("tokenizer/flextok-d18-d18", 18, 18),
                                            ("tokenizer/flextok-d18-d28", 18, 28)])
def test_paper_configs_build_on_meta(name, enc, dec):
    m = zoo.registry.build_meta(name)
    assert isinstance(m, FlexTok) and m.decoder_kind == "flow"
    assert len(m.encoder.layers) == enc and len(m.decoder.layers) == dec
    assert m.encoder.dim == 64 * enc and m.decoder.dim == 64 * dec and m.encoder.head_dim == 64
    assert m.image_size == 256 and m.num_registers == 256 and m.num_patches == 256
    assert m.spec.vocab_size == 64000 and m.quantizer.levels == [8, 8, 8, 5, 5, 5] and m.spec.ordered
    assert zoo.registry.info(name)["spec"] == "discrete/sequence(ordered) 256 V=64000"


def _loss_at(m, x, seed=0):
    torch.manual_seed(seed)
    return m(x)[1]["loss"]


@pytest.mark.parametrize("decoder", ["direct", "flow"])
def test_a_few_training_steps_lower_the_loss(decoder):
    m = small(decoder=decoder, cond_dropout=0.0).train()
    x = shapes(8)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    with torch.no_grad():
        before = _loss_at(m, x).item()
    for step in range(25):
        loss = _loss_at(m, x, seed=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = _loss_at(m, x).item()
    # the flow target eps - x is mostly noise: its loss falls more slowly than the pixel MSE
    assert after < (0.7 if decoder == "direct" else 0.92) * before, (before, after)


def test_flow_decoder_guidance_steps_and_seed(monkeypatch):
    m = small(decoder="flow", sample_steps=3).eval()
    x = shapes(2)
    tok = m.encode(x)
    rows = []
    orig = m.velocity
    monkeypatch.setattr(m, "velocity", lambda x_t, t, regs: rows.append(x_t.shape[0]) or orig(x_t, t, regs))
    a = m.decode(tok)
    assert rows == [4, 4, 4]                        # 3 Euler steps, conditional + null batch (CFG on)
    rows.clear()
    m.decode_prefix(tok.data[:, :2], steps=2, guidance_scale=1.0)
    assert rows == [2, 2]                           # no guidance: no unconditional branch
    torch.testing.assert_close(a, m.decode(tok), rtol=0, atol=0)  # seeded by sample_seed
    b = m.decode(tok, generator=torch.Generator().manual_seed(5))
    assert (a - b).abs().max() > 1e-4
    # the unconditional branch: the null condition in every register slot
    codes = m.quantizer.indices_to_codes(tok.data)
    null = m.decoder_registers(codes, null=torch.tensor([True, False]))
    torch.testing.assert_close(null[0], (m.null_register + m.register_pos).detach())
    torch.testing.assert_close(null[1], m.decoder_registers(codes)[1])


def test_checkpoint_round_trip(tmp_path):
    m = zoo.create("tokenizer/flextok-tiny").eval()
    nn.init.normal_(m.to_pixels.weight, std=0.05)
    m.save_pretrained(tmp_path / "ft")
    back = zoo.load_pretrained(tmp_path / "ft").eval()
    assert type(back) is FlexTok and back.config == m.config and back.registry_name == "tokenizer/flextok-tiny"
    x = shapes(2, res=64)
    tok = m.encode(x)
    assert back.encode(x) == tok
    for k in (1, 32):
        torch.testing.assert_close(back.decode_prefix(tok.data[:, :k]), m.decode_prefix(tok.data[:, :k]),
                                   rtol=0, atol=0)


def test_prefix_metrics_table():
    m = small().eval()
    x = shapes(3)
    table = prefix_metrics(m, x, batch_size=2)
    assert sorted(table) == [1, 2, 4, 8]
    full = m.decode(m.encode(x))
    mse = ((x - full) / 2).pow(2).flatten(1).mean(1)
    assert abs(table[8]["psnr"] - float((10 * torch.log10(1 / mse)).mean())) < 1e-3
    assert table[1]["attribute_agreement"]["images"] == 3


def test_encode_checks_inputs_and_decode_checks_tokens():
    m = small()
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        m.encode(torch.rand(1, 3, 32, 32) * 255)
    with pytest.raises(ValueError):
        m.decode(Tokens(torch.zeros(1, 4, dtype=torch.long), m.spec))
