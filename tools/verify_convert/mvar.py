"""Outside-CI check: ``zoo/convert/mvar.py`` against CVL-UESTC/MVAR's own modules (random weights).

Reference code: a checkout of https://github.com/CVL-UESTC/MVAR (written against d0e035a; same
code as LabShuHangGU/MVAR); only its ``models/`` package is imported. Its ``utils.dist`` is
replaced by a CPU stub made here. MVAR imports NATTEN's ``na2d``; when ``natten`` is not
installed (it needs CUDA wheels) a stub with NATTEN's window rule is made here -- written from
NATTEN's ``get_window_start`` (window of position ``i`` on an axis of length ``n``, kernel
``k``, ``r = k // 2``: start ``max(i - r, 0) + (n - i - r - 1 if i + r >= n else 0)``), dense
masked attention, independent of arzoo's :mod:`generators.mvar_attention`. Run (arzoo venv,
any cwd):

    OMP_NUM_THREADS=1 python tools/verify_convert/mvar.py --ref PATH/TO/MVAR [--paper]

Default: ``generator/mvar-tiny`` exactly as registered (depth 6 x 128, 4 heads, 30 classes,
scales 1,2,3,4,6,8, 3x3 windows on 6x6 and 8x8 = MVAR ``kernel_size=3, refine_step=4``) on a
reduced VAR VQVAE (ch 32, 1024 codes of dim 16, 128 px). ``--paper``: VAR's
``vae_ch160v4096z32`` VQVAE and MVAR-d16 (310M, 7x7 windows on 13x13 and 16x16) at 256 px
(several GB of RAM, minutes on CPU). The reference is saved the way ``train.py`` saves it
(``{"epoch", "iter", "trainer": {"config", "mvar_wo_ddp"}, "args"}``) and converted with
``zoo.convert.convert`` (file -> ``torch.load(weights_only=True)`` -> strict fill).

Prints max abs differences (converted arzoo model vs reference) of the logits: teacher-forced
(MVAR's trainer chunks: scales ``0..S-3`` with the block-diagonal mask, then each spatial scale
alone through NATTEN), MVAR's sampling path (``autoregressive_infer``, fed the same ids) without
and with CFG (MVAR cfg 1.4 = arzoo cfg 2.4 linear), the null class, and the final f̂; then the
same file with VAR's block-causal mask buffer (what the fine-tuned releases hold).
"""
import argparse
import math
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the arzoo checkout
sys.path.insert(0, str(ROOT))

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--ref", required=True, type=Path, help="checkout of CVL-UESTC/MVAR (holds models/)")
ap.add_argument("--paper", action="store_true", help="paper-size VQVAE and MVAR-d16")
args = ap.parse_args()
REF = args.ref.resolve()
if not (REF / "models" / "mvar.py").is_file():
    sys.exit(f"{REF}: no models/mvar.py (expected a checkout of CVL-UESTC/MVAR)")

import zoo  # noqa: E402  (arzoo first: MVAR's checkout has a train.py that would shadow arzoo's train/)
from generators.base import Condition, SamplingConfig  # noqa: E402
from generators.sampling import cfg_logits  # noqa: E402
from zoo.convert import convert, find  # noqa: E402
from zoo.tokens import Tokens  # noqa: E402

# MVAR's models import ``from utils import dist`` (torch.distributed helpers); one CPU process
# needs only these.
_dist = types.ModuleType("utils.dist")
_dist.get_device = lambda: "cpu"
_dist.initialized = lambda: False
_utils = types.ModuleType("utils")
_utils.dist = _dist
sys.modules["utils"], sys.modules["utils.dist"] = _utils, _dist

try:
    import natten  # noqa: F401
    NATTEN = f"natten {getattr(natten, '__version__', '?')}"
except ImportError:
    def _start(i, n, k):  # NATTEN's get_window_start, dilation 1
        r = k // 2
        return max(i - r, 0) + (n - i - r - 1 if i + r >= n else 0)

    def na2d(query, key, value, kernel_size, dilation=1, scale=None, **kw):
        """NATTEN ``na2d`` (non-causal, dilation 1) on (B, H, W, heads, d) tensors, dense."""
        B, H, W, nh, d = query.shape
        k = int(kernel_size)
        if dilation != 1 or H < k or W < k or kw.get("is_causal"):
            raise NotImplementedError("the stub covers what MVAR calls: dilation 1, non-causal, map >= kernel")
        allow = torch.zeros(H, W, H, W, dtype=torch.bool)
        for i in range(H):
            si = _start(i, H, k)
            for j in range(W):
                sj = _start(j, W, k)
                allow[i, j, si:si + k, sj:sj + k] = True
        q, kk, v = (t.reshape(B, H * W, nh, d).transpose(1, 2).float() for t in (query, key, value))
        a = (q @ kk.transpose(-1, -2)) * (d ** -0.5 if scale is None else scale)
        a = a.masked_fill(~allow.view(H * W, H * W), float("-inf")).softmax(-1)
        return (a @ v).transpose(1, 2).reshape(B, H, W, nh, d).to(query.dtype)

    _natten = types.ModuleType("natten")
    _natten.na2d = na2d
    sys.modules["natten"] = _natten
    NATTEN = "stub (NATTEN's window rule, dense)"

sys.path.append(str(REF))
torch.manual_seed(0)
import models.mvar as ref_mvar_module  # noqa: E402
from models.mvar import MVAR  # noqa: E402
from models.vqvae import VQVAE  # noqa: E402

paper = args.paper
if paper:
    pns = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    vcfg = dict(vocab_size=4096, z_channels=32, ch=160, v_patch_nums=pns)
    name, depth, width, heads, classes, kernel, refine = "generator/mvar-d16", 16, 1024, 16, 1000, 7, 8
    tov = {}
else:
    pns = (1, 2, 3, 4, 6, 8)
    vcfg = dict(vocab_size=1024, z_channels=16, ch=32, v_patch_nums=pns)
    name, depth, width, heads, classes, kernel, refine = "generator/mvar-tiny", 6, 128, 4, 30, 3, 4
    tov = dict(image_size=128, ch=32, z_channels=16, codebook_size=1024, codebook_dim=16, scales=list(pns))
S, V = len(pns), vcfg["vocab_size"]
print(f"reference: {REF} | NATTEN: {NATTEN} | {name} | scales {pns}, kernel {kernel}, refine_step {refine}")


def randomize(m, std=0.05):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("scale_mul_1H11"):
                p.copy_(math.log(4.0) + 0.3 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1 and "norm" in n and n.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


tmp = tempfile.TemporaryDirectory(prefix="verify_mvar_")
vae_pth, mvar_pth, ft_pth, tokdir = (f"{tmp.name}/{n}" for n in ("vae.pth", "mvar.pth", "mvar_ft.pth", "tok"))

ref_vae = VQVAE(test_mode=True, **vcfg).eval()
randomize(ref_vae)
with torch.no_grad():
    ref_vae.quantize.embedding.weight.normal_(0, 0.5)
torch.save(ref_vae.state_dict(), vae_pth)
tok = convert("var", vae_pth, "tokenizer/msvq-var", tokdir) if not tov else None
if tok is None:  # the reduced VQVAE: build msvq-var at the reduced size, fill it, save it
    from zoo.checkpoint import load_state_strict
    from zoo.convert import load_source

    tok = zoo.create("tokenizer/msvq-var", **tov)
    load_state_strict(tok, find("var", "tokenizer/msvq-var").fn(load_source(vae_pth), tok), vae_pth)
    tok.save_pretrained(tokdir)
tok.eval()

ref = MVAR(ref_vae, num_classes=classes, depth=depth, embed_dim=width, num_heads=heads, norm_eps=1e-6,
           cond_drop_rate=0.0, attn_l2_norm=True, patch_nums=pns, drop_path_rate=0.0, flash_if_available=False,
           fused_if_available=False, kernel_size=kernel, refine_step=refine).eval()
randomize(ref)
sd = ref.state_dict()
print("MVAR reference tensors:", len(sd), " params", sum(p.numel() for p in ref.parameters()))
args_plain = {"depth": depth, "patch_nums": pns, "kernel_size": kernel, "refine_step": refine, "anorm": True,
              "saln": False, "pn": "_".join(map(str, pns))}
torch.save({"epoch": 1, "iter": 0, "args": args_plain,
            "trainer": {"config": {"patch_nums": pns, "resos": tuple(16 * p for p in pns), "label_smooth": 0.0},
                        "mvar_wo_ddp": sd}}, mvar_pth)

gen = convert("mvar", mvar_pth, name, tokenizer=tokdir).eval()
print("arzoo params", sum(p.numel() for p in gen.parameters() if p.requires_grad), " mode", gen.mode,
      " kernel", gen.kernel, " spatial scales", sorted(gen.spatial))

B = 2
labels = torch.tensor([3, classes - 1])
g = torch.Generator().manual_seed(3)
ids = [torch.randint(0, V, (B, p * p), generator=g) for p in pns]
toks = Tokens([i.view(B, p, p) for i, p in zip(ids, pns)], gen.spec)
ends = [0]
for p in pns:
    ends.append(ends[-1] + p * p)


def ref_teacher_forced(lab):
    """MVAR's trainer chunks: scales 0..refine-1 with the mask buffer, then each later scale alone (NATTEN)."""
    x = ref_vae.quantize.idxBl_to_mvar_input(ids)
    first = ends[1]
    out = [ref(label_B=lab, x_BlCv_wo_first_l=x[:, :ends[refine] - first], L_bg=0, L_ed=ends[refine])]
    for s in range(refine, S):
        out.append(ref(label_B=lab, x_BlCv_wo_first_l=x[:, ends[s] - first:ends[s + 1] - first], L_bg=ends[s],
                       L_ed=ends[s + 1], using_nattn=True))
    return torch.cat(out, 1)


def ref_sampling(lab, cfg):
    """MVAR's autoregressive_infer fed ``ids`` (its sampler replaced): per-step (guided) logits, f̂."""
    seen = []

    def fake_sample(logits_BlV, rng=None, top_k=0, top_p=0.0, num_samples=1):
        s = len(seen)
        seen.append(logits_BlV.clone())
        return ids[s][:, :, None]

    orig = ref_mvar_module.sample_with_top_k_top_p_
    ref_mvar_module.sample_with_top_k_top_p_ = fake_sample
    try:
        fhat = ref.autoregressive_infer(B=B, label_B=lab, cfg=cfg, top_k=0, top_p=0.0)
    finally:
        ref_mvar_module.sample_with_top_k_top_p_ = orig
    return torch.cat(seen, 1), fhat


def arzoo_guided(cond, cfg):
    """arzoo's generate fed ``ids``: the guided logits its head would sample from, per step."""
    seen = []

    def fake_sample(logits, *, uncond=None, cfg=1.0, **kw):
        s = len(seen)
        seen.append(cfg_logits(logits, uncond, cfg) if uncond is not None else logits)
        return ids[s]

    head_sample = gen.head.sample
    gen.head.sample = fake_sample
    try:
        gen.generate(cond, SamplingConfig(cfg=cfg, cfg_schedule="linear"))
    finally:
        gen.head.sample = head_sample
    return torch.cat(seen, 1)


def d(a, b):
    return f"{(a - b).abs().max().item():.2e}"


with torch.no_grad():
    cond = Condition(labels=labels)
    lg_ref = ref_teacher_forced(labels)
    lg_me = gen.logits(toks, cond)
    lg_dense = gen.logits(toks, cond, dense=True)
    samp_ref, fhat_ref = ref_sampling(labels, 1.0)
    lg_cache = gen.cached_logits(toks, cond)
    guided_ref, _ = ref_sampling(labels, 1.4)
    guided_me = arzoo_guided(cond, 2.4)
    null_ref = ref_teacher_forced(torch.full((B,), classes))
    null_me = gen.logits(toks, Condition(labels=torch.tensor([-1, -1])))
    fhat_me = tok.quantizer.indices_to_fhat([i.view(B, p, p) for i, p in zip(ids, pns)])
    print(f"|logits| max {lg_ref.abs().max().item():.2f}")
    print("teacher-forced (MVAR trainer chunks) vs arzoo logits:", d(lg_ref, lg_me),
          " dense-mask path", d(lg_ref, lg_dense),
          " argmax agreement", (lg_ref.argmax(-1) == lg_me.argmax(-1)).float().mean().item())
    print("MVAR sampling path (cfg 1) vs arzoo cached_logits:", d(samp_ref, lg_cache),
          " vs arzoo teacher-forced", d(samp_ref, lg_me))
    print("MVAR sampling cfg 1.4 vs arzoo generate cfg 2.4 linear (guided logits):", d(guided_ref, guided_me))
    print("null class, teacher-forced:", d(null_ref, null_me), " final f̂:", d(fhat_ref, fhat_me))

    # the fine-tuned releases: MVAR loaded var_d*.pth with strict=True, so its mask buffer is VAR's
    lv = gen.levels()
    var_mask = torch.where(lv[None, :] <= lv[:, None], 0.0, float("-inf"))[None, None]
    torch.save({"mvar_wo_ddp": {**sd, "attn_bias_for_masking": var_mask}}, ft_pth)
    gen_ft = convert("mvar", ft_pth, name, tokenizer=tokdir).eval()
    same = all(torch.equal(a, b) for a, b in zip(gen.state_dict().values(), gen_ft.state_dict().values()))
    ref.attn_bias_for_masking.copy_(var_mask)
    lg_ref_ft = ref_teacher_forced(labels)
    print("file with VAR's mask buffer (fine-tuned releases): converted state identical:", same,
          "| arzoo vs MVAR sampling path", d(samp_ref, gen_ft.logits(toks, cond)),
          "| MVAR forward() with that buffer vs its own sampling path, scales 0..S-3 (expected to differ)",
          d(lg_ref_ft[:, :ends[refine]], samp_ref[:, :ends[refine]]))
tmp.cleanup()
