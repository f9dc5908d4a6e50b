"""Outside-CI check: LlamaGen's VQ-16 / GPT and NAR's GPT (the authors' code, random weights)
against arzoo after ``zoo.convert`` (``zoo/convert/llamagen.py``, ``zoo/convert/nar.py``).

Reference code (checkouts of the authors' repositories; the check was written against these commits):

    git clone https://github.com/FoundationVision/LlamaGen   # ce98ec4
    git clone https://github.com/ThisisBillhe/NAR            # 225c1fb

Files used: LlamaGen ``tokenizer/tokenizer_image/vq_model.py``, ``autoregressive/models/gpt.py``,
``utils/drop_path.py``; NAR ``NAR-images/autoregressive/models/gpt.py``. Run (arzoo venv, any cwd):

    OMP_NUM_THREADS=1 python tools/verify_convert/llamagen_nar.py --llamagen PATH/TO/LlamaGen --nar PATH/TO/NAR [--full]

Default: reduced configs (seconds on CPU); ``--full``: VQ-16 and GPT-B / NAR-B paper configs.
Prints the max abs differences (converted arzoo model vs reference) per check.
"""
import argparse
import importlib.util
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the arzoo checkout
sys.path.insert(0, str(ROOT))

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--llamagen", required=True, type=Path, help="checkout of FoundationVision/LlamaGen")
ap.add_argument("--nar", required=True, type=Path, help="checkout of ThisisBillhe/NAR (or its NAR-images/)")
ap.add_argument("--full", action="store_true", help="paper-size configs (VQ-16, GPT-B, NAR-B)")
ARGS = ap.parse_args()
FULL = ARGS.full
LLAMAGEN = ARGS.llamagen.resolve()
NAR = ARGS.nar.resolve()
if (NAR / "NAR-images").is_dir():
    NAR = NAR / "NAR-images"


def ref_file(root, rel):
    p = root / rel
    if not p.is_file():
        sys.exit(f"{p}: not found (expected a checkout of the reference repository)")
    return p


# Both gpt.py files do ``from utils.drop_path import DropPath``: bind ``utils`` to LlamaGen's
# utils/ folder (NAR-images/utils/drop_path.py is the same file) so that no other ``utils`` on
# sys.path is picked up.
_utils = types.ModuleType("utils")
_utils.__path__ = [str(ref_file(LLAMAGEN, "utils/drop_path.py").parent)]
sys.modules["utils"] = _utils


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


lg_vq = load("lg_vq", ref_file(LLAMAGEN, "tokenizer/tokenizer_image/vq_model.py"))
lg_gpt = load("lg_gpt", ref_file(LLAMAGEN, "autoregressive/models/gpt.py"))
nar_gpt = load("nar_gpt", ref_file(NAR, "autoregressive/models/gpt.py"))

import zoo  # noqa: E402
from generators.base import Condition  # noqa: E402
from zoo import convert  # noqa: E402
from zoo.checkpoint import load_state_strict  # noqa: E402
from zoo.tokens import Tokens  # noqa: E402


def via_file(ref_state, family, name, **over):
    """Save the reference state as LlamaGen does ({"model": sd}), convert via load_source."""
    with tempfile.TemporaryDirectory() as d:
        p = f"{d}/ref.pt"
        torch.save({"model": ref_state}, p)
        conv = convert.find(family, name)
        model = zoo.create(name, **{**conv.overrides, **over})
        state = conv.fn(convert.load_source(p), model)
        load_state_strict(model, state, p)
    return model.eval()


def randomize(m, gen):
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight") or "norm" in n.split(".")[-2]:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def check_vq(full):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if full:
        ref, over, S = lg_vq.VQ_16(), {}, 64  # paper VQ-16, 64 px inputs (4x4 tokens)
    else:
        ref = lg_vq.VQModel(lg_vq.ModelArgs(encoder_ch_mult=[1, 2, 2], decoder_ch_mult=[1, 2, 2], z_channels=64,
                                            codebook_size=512))
        over, S = dict(ch_mult=[1, 2, 2], z_channels=64, codebook_size=512), 32
    randomize(ref, gen)
    with torch.no_grad():  # keep codes l2-normalised (LlamaGen's init; any codebook works)
        ref.quantize.embedding.weight.copy_(torch.nn.functional.normalize(torch.randn(ref.quantize.embedding.weight.shape, generator=gen), dim=-1))
    ref.eval()
    m = via_file(ref.state_dict(), "llamagen", "tokenizer/vq-16", image_size=S, **over)
    x = torch.rand(4, 3, S, S, generator=gen) * 2 - 1
    with torch.no_grad():
        zq_r, _, (_, _, idx_r) = ref.encode(x)
        rec_r = ref.decode(zq_r)
        zq_a, idx_a, _ = m.quantize(x)
        rec_a = m.decode_latents(zq_a)
        z_r = ref.quant_conv(ref.encoder(x))
        z_a = m.quant_conv(m.encoder(x))
        dec_r = ref.decode_code(idx_r, shape=zq_r.shape)
        dec_a = m.decode(Tokens(idx_a, m.spec))
    same = (idx_r.view(idx_a.shape) == idx_a).float().mean().item()
    print(f"VQ ({'VQ-16 paper config' if full else 'reduced'}, {sum(p.numel() for p in ref.parameters())/1e6:.2f}M, "
          f"{S}px, {idx_a.numel()} tokens): ids equal {same*100:.1f}%; "
          f"pre-quant latents max|diff| {(z_r - z_a).abs().max():.2e}; z_q {(zq_r - zq_a).abs().max():.2e}; "
          f"recon max|diff| {(rec_r - rec_a).abs().max():.2e}; decode(ids) {(dec_r - dec_a).abs().max():.2e}")


def gpt_args(full, grid, **kw):
    base = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, block_size=grid * grid)
    if full:
        return dict(n_layer=12, n_head=12, dim=768, **base, **kw)
    return dict(n_layer=2, n_head=4, dim=128, vocab_size=512, num_classes=10, **base, **kw)


def arzoo_over(full, grid):
    from zoo.tokens import TokenSpec
    spec = TokenSpec("discrete", "grid", (grid, grid), vocab_size=16384 if full else 512)
    over = dict(spec=spec)
    if not full:
        over.update(dim=128, depth=2, heads=4, num_classes=10)
    return over


def ref_cached_gpt(ref, cls, seq, grid):
    """LlamaGen's generate path (prefill + one token per step) teacher-forced -> logits."""
    B, N = seq.shape
    ref.setup_caches(max_batch_size=B, max_seq_length=1 + N, dtype=torch.float32)
    out = [ref(None, cls, input_pos=torch.arange(0, 1))[0][:, -1]]
    for i in range(N - 1):
        out.append(ref(seq[:, i:i + 1], None, input_pos=torch.tensor([1 + i]))[0][:, -1])
    return torch.stack(out, 1)


def check_gpt(full):
    grid = 16 if full else 4
    gen = torch.Generator().manual_seed(1)
    ref = lg_gpt.Transformer(lg_gpt.ModelArgs(**gpt_args(full, grid)))
    randomize(ref, gen)
    ref.cls_embedding.dropout_prob = 0.0  # the table keeps its null row; no random label drop in train()
    m = via_file(ref.state_dict(), "llamagen", "generator/raster-ar-b", **arzoo_over(full, grid))
    V = ref.config.vocab_size
    B = 2
    seq = torch.randint(0, V, (B, grid * grid), generator=gen)
    cls = torch.randint(0, ref.config.num_classes, (B,), generator=gen)
    with torch.no_grad():
        ref.train()  # LlamaGen's full (teacher-forced) path; all dropouts are 0
        lr, _ = ref(seq[:, :-1], cls)
        ref.eval()
        lc = ref_cached_gpt(ref, cls, seq, grid)
        toks, cond = Tokens(seq.view(B, grid, grid), m.spec), Condition(labels=cls)
        la, lac = m.logits(toks, cond), m.cached_logits(toks, cond)
        m.transformer.rope.prefix = "none"  # arzoo's default: unrotated prefix
        ln = m.logits(toks, cond)
    print(f"GPT ({'GPT-B paper config' if full else 'reduced'}, {sum(p.numel() for p in ref.parameters())/1e6:.2f}M, "
          f"{grid}x{grid}): full-forward logits max|diff| {(lr - la).abs().max():.2e} "
          f"(|logits| max {lr.abs().max():.2f}); cached decode {(lc - lac).abs().max():.2e}; "
          f"ref full vs ref cached {(lr - lc).abs().max():.2e}; argmax equal {(lr.argmax(-1) == la.argmax(-1)).float().mean()*100:.1f}%; "
          f"with prefix_rope='none' instead: {(lr - ln).abs().max():.2e}")


def nar_train_mask(ref, B):
    L = ref.cls_token_num + ref.block_size
    mask = torch.tril(torch.ones(L, L, dtype=torch.bool))
    ref.setup_proximity_mask(mask[-ref.block_size:, -ref.block_size:], ref.block_size)
    return mask.unsqueeze(0).repeat(B, 1, 1)


def ref_cached_nar(ref, cls, seq, grid):
    """NAR's decode_n_tokens path, teacher-forced: returns logits (B, N, V) in raster order."""
    B, N = seq.shape
    ref.setup_caches(max_batch_size=B, max_seq_length=1 + N, dtype=torch.float32)
    out = torch.zeros(B, N, ref.vocab_size)
    out[:, 0] = ref(None, cls, input_pos=torch.arange(0, 1))[0][:, -1]
    for itera in range(1, 2 * grid - 1):
        fed = [i * grid + (itera - 1 - i) for i in range(grid) if 0 <= itera - 1 - i < grid]
        tgt = [i * grid + (itera - i) for i in range(grid) if 0 <= itera - i < grid]
        logits, _ = ref(seq[:, fed], None, input_pos=torch.tensor(fed) + 1, accept_first_last=itera < grid)
        out[:, tgt] = logits
    return out


def check_nar(full):
    grid = 16 if full else 4
    gen = torch.Generator().manual_seed(2)
    ref = nar_gpt.Transformer(nar_gpt.ModelArgs(**gpt_args(full, grid)))
    randomize(ref, gen)
    ref.cls_embedding.dropout_prob = 0.0
    m = via_file(ref.state_dict(), "nar", "generator/nar-b", **arzoo_over(full, grid))
    B = 2
    seq = torch.randint(0, ref.config.vocab_size, (B, grid * grid), generator=gen)
    cls = torch.randint(0, ref.config.num_classes, (B,), generator=gen)
    with torch.no_grad():
        ref.train()  # NAR's training forward: full sequence + proximity mask (dropouts 0)
        lr, _ = ref(seq, cls, mask=nar_train_mask(ref, B))
        ref.eval()
        lc = ref_cached_nar(ref, cls, seq, grid)
        toks, cond = Tokens(seq.view(B, grid, grid), m.spec), Condition(labels=cls)
        la, lac = m.logits(toks, cond), m.cached_logits(toks, cond)
        m.transformer.rope.prefix = m.below.rope.prefix = "none"
        ln = m.logits(toks, cond)
    print(f"NAR ({'NAR-B paper config' if full else 'reduced'}, {sum(p.numel() for p in ref.parameters())/1e6:.2f}M, "
          f"{grid}x{grid}): mixed logits max|diff| {(lr - la).abs().max():.2e} (|logits| max {lr.abs().max():.2f}); "
          f"cached diagonal decode {(lc - lac).abs().max():.2e}; ref full vs ref cached {(lr - lc).abs().max():.2e}; "
          f"with prefix_rope='none' instead: {(lr - ln).abs().max():.2e}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    check_vq(FULL)
    check_gpt(FULL)
    check_nar(FULL)
