"""Slot-MLLM slot tokenizer (tokenizers_vis/slot.py): slot attention, shared-codebook RVQ, serialisation."""
import pytest
import torch
from test_seed import FakeTeacher, count_unet_calls, grads_of, images

import zoo
from tokenizers_vis.slot import SlotTokenizer
from zoo.checkpoint import load_pretrained

SMALL = {"image_size": 64, "teacher": "none", "context_dim": 16, "context_pos": True, "num_slots": 5, "dim": 32,
         "depth": 2, "heads": 4, "cross_attention_freq": 1, "ffn_hidden": None, "ffn_multiple": 16,
         "num_levels": 4, "codebook_size": 64, "codebook_dim": 8, "recon_depth": 1, "gen_down": 4, "gen_dim": 32,
         "text_dim": 32, "text_depth": 1, "itc_dim": 16, "decoder_size": 32, "decoder_channels": [16, 32],
         "decoder_layers": 1, "decoder_attn_levels": 1, "decoder_heads": 2, "sample_steps": 3}


def small_slot(**kw):
    torch.manual_seed(0)
    m = SlotTokenizer(**{**SMALL, **kw})
    m.teacher.set(FakeTeacher())
    return m


def test_slot_attention_sums_to_one_over_slots_per_patch():
    m = small_slot().eval()
    m.slots(images(3))
    maps = m.slot_attention()
    assert len(maps) == 2                                   # cross_attention_freq=1, depth=2
    for a in maps:
        assert a.shape == (3, 4, 5, 64)                     # (B, heads, slots, 8x8 patches)
        torch.testing.assert_close(a.sum(2), torch.ones(3, 4, 64))


def test_rvq_ids_share_one_codebook_and_sum_to_z_q():
    m = small_slot().eval()
    q = m.slots(images(3))
    z_q, ids, _ = m.quantize(q)
    assert ids.shape == (3, 5, 4) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 64
    rvq = m.quantizer
    assert rvq.shared_codebook and len(rvq.quantizers) == 1
    assert all(rvq.level(d) is rvq.level(0) for d in range(4))
    codebook = rvq.level(0).codebook()
    torch.testing.assert_close(z_q, codebook[ids].sum(2))   # sum over the 4 levels of one codebook
    assert not torch.allclose(z_q, codebook[ids[..., 0]])   # the later levels do contribute
    assert len(torch.unique(ids)) > 1


def test_serialisation_is_slot_major_level_minor():
    m = small_slot().eval()
    x = images(2)
    ids = m.encode_ids(x)
    tok = m.encode(x)
    assert tok.data.shape == (2, 20) and tok.spec.vocab_size == 64 and not tok.spec.ordered
    for n in range(5):
        for d in range(4):
            assert torch.equal(tok.data[:, n * 4 + d], ids[:, n, d])
    assert torch.equal(m.tokens_to_ids(tok), ids)


def test_stage1_continuous_slots_train_qformer_and_decoder_not_the_codebook():
    m = small_slot(stage=1).train()
    recon, losses = m(images(4), captions=["a red circle", "a blue square", "a red circle", "two squares"])
    assert recon.shape == (4, 3, 64, 64) and {"itc", "gen_mse", "diffusion"} <= set(losses)
    assert "vq" not in losses
    losses["loss"].backward()
    assert grads_of(m, "qformer") and grads_of(m, "decoder") and grads_of(m, "text_encoder")
    assert not grads_of(m, "quantizer") and not grads_of(m, "recon_head")


def test_stage2_quantises_with_a_frozen_qformer():
    m = small_slot(stage=2).train()
    _, losses = m(images(4))
    assert {"vq", "rec_mse", "gen_mse", "diffusion"} <= set(losses)
    losses["loss"].backward()
    assert grads_of(m, "quantizer") and grads_of(m, "recon_head") and grads_of(m, "decoder")
    assert not grads_of(m, "qformer")


def test_joint_stage_reaches_the_qformer_through_the_quantiser():
    m = small_slot(stage=0).train()
    _, losses = m(images(4))
    losses["loss"].backward()
    assert grads_of(m, "qformer") and grads_of(m, "quantizer") and grads_of(m, "decoder")
    with pytest.raises(ValueError, match="stage"):
        small_slot(stage=4)


def test_stage3_trains_only_the_decoder_on_the_tokens_condition():
    m = small_slot(stage=3).train()
    x = images(4)
    recon, losses = m(x)
    assert set(losses) == {"diffusion", "loss"} and recon.shape == (4, 3, 64, 64)
    losses["loss"].backward()
    assert grads_of(m, "decoder")
    assert not grads_of(m, "qformer") and not grads_of(m, "quantizer") and not grads_of(m, "recon_head")
    # the condition it trains on is decode()'s condition for the same image's tokens
    torch.manual_seed(0)
    a = m.decoder.loss(m._to_decoder_res(x), m.decoder_condition(m.encode(x)))[0]
    torch.manual_seed(0)
    b = m(x)[1]["diffusion"]
    assert torch.allclose(a, b)


def test_decode_seeded_and_step_count(tmp_path):
    m = small_slot().eval()
    x = images(2)
    tok = m.encode(x)
    calls = count_unet_calls(m.decoder)
    a = m.decode(tok, steps=3, sampler="ddpm")
    assert len(calls) == 3 and a.shape == (2, 3, 64, 64)
    torch.testing.assert_close(a, m.decode(tok, steps=3, sampler="ddpm"), rtol=0, atol=0)
    m.save_pretrained(tmp_path / "slot")
    back = load_pretrained(tmp_path / "slot")
    back.teacher.set(m.teacher.model)
    assert back.encode(x) == tok
    torch.testing.assert_close(back.decode(tok), m.decode(tok), rtol=0, atol=0)


def test_registered_configs():
    m = zoo.create("tokenizer/slot-tiny")
    assert m.num_params() < 3e6 and m.spec.shape == (8 * 4,)
    info = zoo.registry.info("tokenizer/slot-blip2")
    assert info["spec"] == "discrete/sequence 128 V=8192"
