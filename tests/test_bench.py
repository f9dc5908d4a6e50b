"""The sampling benchmark tool runs on toy pairs and counts forward steps correctly.

Only correctness of the tool is tested here; benchmark numbers are never asserted.
"""
import json

import pytest
import torch
import torch.nn as nn

from eval import bench
from generators.base import Condition, Generator, SamplingConfig
from tokenizers_vis.base import Tokenizer
from zoo import registry
from zoo.tokens import IncompatibleTokens, Tokens, TokenSpec

TOK_A, TOK_B = "tokenizer/test-bench-a-tiny", "tokenizer/test-bench-b-tiny"
GEN_RASTER, GEN_DIAG = "generator/test-bench-raster-tiny", "generator/test-bench-diag-tiny"


class GreyTokenizer(Tokenizer):
    """n x n discrete tokens -> grey 2x2 patches; ``kind='continuous'`` emits a spec no toy accepts."""

    def __init__(self, grid: int = 3, vocab: int = 16, kind: str = "discrete"):
        super().__init__()
        self.spec = TokenSpec(kind, "grid", (grid, grid), vocab_size=vocab if kind == "discrete" else None,
                              dim=4 if kind == "continuous" else None)
        self.image_size = 2 * grid
        self.scale = nn.Parameter(torch.ones(()))

    def decode(self, tokens):
        ids = self.check_tokens(tokens).data.float()
        x = (ids / (self.spec.vocab_size - 1) * 2 - 1) * self.scale
        return x[:, None].expand(-1, 3, -1, -1).repeat_interleave(2, 2).repeat_interleave(2, 3)


def _need_discrete_grid(spec, who):
    spec.require(kind="discrete", layout="grid", who=who)


class RasterToy(Generator):
    """One call of ``self.trunk`` per token, CFG batched into the same call: h*w steps."""

    def __init__(self, spec: TokenSpec = TokenSpec("discrete", "grid", (3, 3), vocab_size=8),
                 num_classes: int = 4):
        super().__init__()
        _need_discrete_grid(spec, "RasterToy")
        self.spec = spec
        self.cls = nn.Embedding(num_classes + 1, 8)
        self.trunk = nn.Linear(8, spec.vocab_size)

    @torch.no_grad()
    def generate(self, cond, sampling=None, generator=None):
        sampling = sampling or SamplingConfig()
        h, w = self.spec.shape
        x = self.cls(cond.labels.clamp(min=0))
        ids = []
        for _ in range(h * w):
            inp = torch.cat([x, torch.zeros_like(x)]) if sampling.cfg != 1 else x
            logits = self.trunk(inp)[: x.shape[0]]
            ids.append(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        return Tokens(torch.cat(ids, 1).reshape(-1, h, w), self.spec)


class DiagonalToy(Generator):
    """NAR-like: one pass through ``blocks`` per anti-diagonal (h+w-1 steps), no ``trunk`` attribute.

    The class embedding (called once) is larger than one block and the head (called 3x per step)
    is as large as one block, so only the ModuleList rule of ForwardCounter gives h+w-1.
    """

    def __init__(self, spec: TokenSpec = TokenSpec("discrete", "grid", (3, 3), vocab_size=12),
                 num_classes: int = 4):
        super().__init__()
        _need_discrete_grid(spec, "DiagonalToy")
        self.spec = spec
        self.cls = nn.Embedding(16, 8)  # 128 params > one block (72)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))  # 216 params in all
        self.head = nn.Linear(8, 8)

    @torch.no_grad()
    def generate(self, cond, sampling=None, generator=None):
        h, w = self.spec.shape
        x = self.cls(cond.labels.clamp(min=0))
        for _ in range(h + w - 1):
            for blk in self.blocks:
                x = torch.tanh(blk(x))
            for _ in range(3):
                x = self.head(x)
        ids = torch.randint(0, self.spec.vocab_size, (x.shape[0], h, w), generator=generator)
        return Tokens(ids, self.spec)


@pytest.fixture(scope="module", autouse=True)
def toys():
    registry._ensure_loaded()
    registry.register(TOK_A)(lambda **kw: GreyTokenizer(**{"kind": "continuous", **kw}))
    registry.register(TOK_B)(lambda **kw: GreyTokenizer(**kw))
    registry.register(GEN_RASTER)(lambda **kw: RasterToy(**kw))
    registry.register(GEN_DIAG)(lambda **kw: DiagonalToy(**kw))
    yield
    for n in (TOK_A, TOK_B, GEN_RASTER, GEN_DIAG):
        registry.unregister(n)


def test_counts_trunk_calls_and_writes_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc = bench.main(["--pair", GEN_RASTER, TOK_B, "--batch", "2", "--repeats", "1", "--device", "cpu",
                     "--cfg", "2.0", "--json", str(out)])
    assert rc == 0
    [row] = json.loads(out.read_text())
    assert row["forward_steps"] == 9 and row["counted_module"] == "trunk"  # 3x3 grid, CFG batched
    assert row["decode"] and row["images_per_s"] > 0 and row["peak_mib"] >= 0
    assert row["weights"] == "random"
    table = capsys.readouterr().out
    assert "random-init" in table and f"| {GEN_RASTER} | {TOK_B} |" in table


def test_grid_override_changes_step_count(tmp_path):
    out = tmp_path / "rows.json"
    assert bench.main(["--pair", GEN_RASTER, TOK_B, "--grid", "2x4", "--batch", "1", "--repeats", "1",
                       "--device", "cpu", "--json", str(out)]) == 0
    [row] = json.loads(out.read_text())
    assert row["forward_steps"] == 8 and row["decode"] is False  # tokenizer grid is 3x3


def test_heuristic_counts_block_stack_without_trunk():
    gen = DiagonalToy(TokenSpec("discrete", "grid", (4, 3), vocab_size=16))
    steps, counted = bench.count_forward_steps(gen, Condition(labels=torch.tensor([0, 1])))
    assert (steps, counted) == (4 + 3 - 1, "blocks[*]")


def test_default_pairs_pick_an_accepting_tokenizer():
    pairs, skipped = bench.default_pairs("generator/test-bench-*-tiny", "tokenizer/test-bench-*-tiny")
    # TOK_A (continuous) sorts first but neither toy accepts it; TOK_B's vocab differs from
    # both generators' default specs, so the pairing must come from building for TOK_B's spec.
    assert sorted(pairs) == [(GEN_DIAG, TOK_B), (GEN_RASTER, TOK_B)] and not skipped
    with pytest.raises(IncompatibleTokens):
        RasterToy(TokenSpec("continuous", "grid", (3, 3), dim=4))


def test_failing_pair_is_reported_not_fatal(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc = bench.main(["--pair", GEN_RASTER, TOK_A, "--pair", GEN_DIAG, TOK_B, "--batch", "1",
                     "--repeats", "1", "--device", "cpu", "--json", str(out)])
    assert rc == 1
    rows = json.loads(out.read_text())
    assert "IncompatibleTokens" in rows[0]["error"] and TOK_A in rows[0]["error"]
    assert rows[1]["forward_steps"] == 5
    assert "error:" in capsys.readouterr().out


def test_train_step_mode_runs_loss_and_backward(tmp_path, capsys, monkeypatch):
    """``--train-step`` measures loss + backward in train mode (gradients really flow)."""
    seen = {}
    orig = bench._load

    def spy_load(name, pretrained, **kw):
        model, w = orig(name, pretrained, **kw)
        if name.startswith("generator/"):
            seen["model"] = model
        return model, w

    monkeypatch.setattr(bench, "_load", spy_load)
    out = tmp_path / "train.json"
    rc = bench.main(["--train-step", "--pair", "generator/raster-ar-tiny", "tokenizer/vq-tiny",
                     "--batch", "2", "--repeats", "1", "--threads", "1", "--json", str(out)])
    assert rc == 0
    row = json.loads(out.read_text())[0]
    assert row["batch"] == 2 and row["seconds_per_step"] > 0 and row["peak_mib"] >= 0
    model = seen["model"]
    assert model.training
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert "Training-step benchmark" in capsys.readouterr().out


def test_parse_vary_is_a_cartesian_product_of_yaml_values():
    assert bench.parse_vary([]) == [{}]
    assert bench.parse_vary(["a=1,x", "b=true"]) == [{"a": 1, "b": True}, {"a": "x", "b": True}]
    with pytest.raises(ValueError, match="KEY=V1"):
        bench.parse_vary(["novalue"])


@pytest.mark.slow
def test_vary_sweeps_xar_entity_types(tmp_path):
    """One row per xAR entity type on kl-tiny's 8x8 grid: NFE = entities x flow steps (20)."""
    out = tmp_path / "rows.json"
    assert bench.main(["--pair", "generator/xar-tiny", "tokenizer/kl-tiny", "--vary", "entity=token,cell,image",
                       "--vary", "num_steps=2", "--batch", "1", "--repeats", "1", "--device", "cpu",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["overrides"]["entity"] for r in rows] == ["token", "cell", "image"]
    assert [r["forward_steps"] for r in rows] == [64 * 2, 16 * 2, 1 * 2]  # 1x1, 2x2 cells, whole image
    assert rows[0]["generator"] == "generator/xar-tiny[entity=token,num_steps=2]"
