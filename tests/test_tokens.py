"""The token contract: validation errors, lossless layout conversions, batch ops."""
import json

import pytest
import torch

from zoo.tokens import (IncompatibleTokens, TokenError, Tokens, TokenSpec, bits_to_groups,
                        groups_to_bits, random_tokens, spec_from_json, spec_to_json)

GRID = TokenSpec("discrete", "grid", (3, 4), vocab_size=10)
BIN = TokenSpec("binary", "grid", (2, 2), bits=128)
CONT = TokenSpec("continuous", "sequence", (5,), dim=3)
PYR = TokenSpec("discrete", "pyramid", [(1, 1), (2, 2), (3, 3)], vocab_size=7)
ALL = [GRID, BIN, CONT, PYR, TokenSpec("binary", "pyramid", [(1, 1), (2, 3)], bits=4),
       TokenSpec("continuous", "grid", (2, 2), dim=4), TokenSpec("discrete", "sequence", (8,), vocab_size=5, ordered=True)]


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.describe())
def test_sequence_round_trip_is_lossless(spec):
    t = random_tokens(spec, 3, torch.Generator().manual_seed(0))
    seq = t.to_sequence()
    assert seq.spec.layout == "sequence" and seq.data.shape[:2] == (3, spec.num_tokens)
    back = Tokens.from_sequence(seq.data, spec)
    assert back == t


def test_grid_to_sequence_is_row_major():
    data = torch.arange(12).reshape(1, 3, 4)
    seq = Tokens(data, TokenSpec("discrete", "grid", (3, 4), vocab_size=12)).to_sequence().data
    assert seq.tolist() == [list(range(12))]


def test_pyramid_offsets_and_flat_order():
    assert PYR.scale_offsets == (0, 1, 5, 14) and PYR.num_tokens == 14
    var = TokenSpec("discrete", "pyramid", [(p, p) for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)], vocab_size=4096)
    assert var.num_tokens == 680
    parts = [torch.full((2, h, w), i) for i, (h, w) in enumerate(PYR.shape)]
    flat = Tokens(parts, PYR).to_sequence().data
    assert flat[0].tolist() == [0, 1, 1, 1, 1] + [2] * 9


@pytest.mark.parametrize("data,match", [
    (torch.zeros(2, 3, 5, dtype=torch.long), r"expected shape \(B, 3, 4\), got \(2, 3, 5\)"),
    (torch.zeros(2, 3, 4), "integer ids, got dtype torch.float32"),
    (torch.full((2, 3, 4), 10), r"\[0, 10\), got values in \[10, 10\]"),
    (torch.full((2, 3, 4), -1), "got values in"),
])
def test_discrete_errors_say_expected_and_got(data, match):
    with pytest.raises(TokenError, match=match):
        Tokens(data, GRID)


def test_binary_errors():
    ok = torch.randint(0, 2, (1, 2, 2, 128), dtype=torch.uint8)
    Tokens(ok, BIN)
    Tokens(ok.bool(), BIN)
    bad = ok.clone()
    bad[0, 0, 0, 0] = 2
    with pytest.raises(TokenError, match=r"bits in \{0, 1\}, found 2"):
        Tokens(bad, BIN)
    with pytest.raises(TokenError, match="bool or integer bits"):
        Tokens(ok.float(), BIN)
    with pytest.raises(TokenError, match=r"\(B, 2, 2, 128\)"):
        Tokens(ok[..., :64], BIN)


def test_continuous_errors():
    x = torch.randn(2, 5, 3)
    Tokens(x, CONT)
    x[0, 0, 0] = float("nan")
    with pytest.raises(TokenError, match="finite"):
        Tokens(x, CONT)
    with pytest.raises(TokenError, match="floating point"):
        Tokens(torch.zeros(2, 5, 3, dtype=torch.long), CONT)


def test_pyramid_errors():
    parts = [torch.zeros(2, h, w, dtype=torch.long) for h, w in PYR.shape]
    with pytest.raises(TokenError, match="expected 3 scales"):
        Tokens(parts[:2], PYR)
    with pytest.raises(TokenError, match="batch size"):
        Tokens([parts[0], parts[1][:1], parts[2]], PYR)
    with pytest.raises(TokenError, match="at scale 1"):
        Tokens([parts[0], parts[2], parts[2]], PYR)
    with pytest.raises(TokenError, match="list of per-scale tensors"):
        Tokens(torch.zeros(2, 14, dtype=torch.long), PYR)
    with pytest.raises(TokenError, match=r"\(B, 14"):
        Tokens.from_sequence(torch.zeros(2, 13, dtype=torch.long), PYR)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="dense", layout="grid", shape=(2, 2), vocab_size=4), "kind must be one of"),
    (dict(kind="discrete", layout="grid", shape=(2,), vocab_size=4), "grid shape must have 2"),
    (dict(kind="discrete", layout="grid", shape=(2, 2)), "needs a positive vocab_size"),
    (dict(kind="binary", layout="grid", shape=(2, 2)), "needs a positive bits"),
    (dict(kind="discrete", layout="grid", shape=(2, 2), vocab_size=4, ordered=True), "ordered"),
    (dict(kind="discrete", layout="pyramid", shape=[(1, 1, 1)], vocab_size=4), "pyramid shape"),
])
def test_bad_specs(kwargs, match):
    with pytest.raises(TokenError, match=match):
        TokenSpec(**kwargs)


def test_batch_ops():
    g = torch.Generator().manual_seed(1)
    a, b = random_tokens(PYR, 3, g), random_tokens(PYR, 2, g)
    c = Tokens.cat([a, b])
    assert c.batch_size == 5 and c[3:] == b and c[:3] == a and c[0] == a[0]
    assert c[torch.tensor([4, 0])].data[0][0].equal(b.data[0][1])
    assert c.to(torch.device("cpu")) == c
    with pytest.raises(TokenError, match="different specs"):
        Tokens.cat([a, random_tokens(GRID, 1)])


def test_require_names_both_sides():
    with pytest.raises(IncompatibleTokens, match=r"generator/nar-tiny cannot take the tokens of tokenizer/x .*layout 'pyramid'"):
        PYR.require(layout="grid", who="generator/nar-tiny", source="tokenizer/x")
    with pytest.raises(IncompatibleTokens, match="ordered"):
        CONT.require(ordered=True)
    GRID.require(kind=("discrete", "binary"), layout="grid")


def test_spec_json_round_trip():
    cfg = {"spec": PYR, "n": [GRID, 3], "x": "y"}
    back = spec_from_json(json.loads(json.dumps(spec_to_json(cfg))))
    assert back == {"spec": PYR, "n": [GRID, 3], "x": "y"}


def test_bit_groups_round_trip_at_128_bits():
    bits = torch.randint(0, 2, (4, 6, 128), dtype=torch.uint8)
    ids = bits_to_groups(bits, 16)
    assert ids.shape == (4, 6, 8) and int(ids.max()) < 2 ** 16
    assert torch.equal(groups_to_bits(ids, 16), bits)
    # little-endian: bit b of a group has weight 2^b
    one = torch.zeros(1, 8, dtype=torch.uint8)
    one[0, 2] = 1
    assert bits_to_groups(one, 8).item() == 4
