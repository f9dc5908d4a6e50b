"""Outside-CI check: ``zoo.convert.mar`` against LTH14/mar's own code (random weights, CPU).

Reference code: a checkout of https://github.com/LTH14/mar (written against fe470ac); its
``models/`` and ``diffusion/`` packages are imported unchanged. Made here, not in the checkout:
a ``scipy.stats`` stand-in when scipy is missing (``models/mar.py`` builds a truncnorm for
training only) and ``Tensor.cuda`` as a no-op (the reference hard-codes ``.cuda()``). Run
(arzoo venv, any cwd):

    OMP_NUM_THREADS=1 python tools/verify_convert/mar.py --ref PATH/TO/mar [--full]

Default: the KL-16 VAE on 64 px images and a reduced MAR (2+2 blocks x 128, 4x4 tokens, buffer 8,
diffusion MLP 2 x 256, 10 classes), converted in-process. ``--full``: KL-16 at 256 px and MAR-B
(208M) converted through the ``arzoo convert`` CLI (``python -m zoo convert``; about 2 GB of
files in a temporary folder, minutes on CPU). Prints max abs differences for KL encode/decode,
the MAR trunk, the diffusion MLP and full ``sample_tokens`` runs with shared orders and noise.
"""
import argparse
import importlib.machinery
import subprocess
import sys
import tempfile
import types
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the arzoo checkout
sys.path.insert(0, str(ROOT))

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--ref", required=True, type=Path, help="checkout of LTH14/mar (holds models/ and diffusion/)")
ap.add_argument("--full", action="store_true", help="KL-16 at 256 px and MAR-B via the arzoo CLI")
args = ap.parse_args()
REF = args.ref.resolve()
if not ((REF / "models" / "mar.py").is_file() and (REF / "diffusion" / "gaussian_diffusion.py").is_file()):
    sys.exit(f"{REF}: no models/mar.py or diffusion/ (expected a checkout of LTH14/mar)")
FULL = args.full

import generators  # noqa: E402,F401  (arzoo first: diffusers probes for scipy when imported)
import tokenizers_vis  # noqa: E402,F401

try:
    import scipy.stats  # noqa: F401
except ImportError:  # mar.py only builds a truncnorm for training; sampling never calls it
    scipy = types.ModuleType("scipy")
    stats = types.ModuleType("scipy.stats")
    stats.truncnorm = lambda *a, **k: None
    scipy.__spec__ = importlib.machinery.ModuleSpec("scipy", None)
    stats.__spec__ = importlib.machinery.ModuleSpec("scipy.stats", None)
    scipy.stats = stats
    sys.modules["scipy"], sys.modules["scipy.stats"] = scipy, stats

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

torch.Tensor.cuda = lambda self, *a, **k: self  # the reference hard-codes .cuda()

sys.path.insert(0, str(REF))
import diffusion.gaussian_diffusion as ref_gd  # noqa: E402
import models.diffloss as ref_dl  # noqa: E402
from models.mar import MAR as RefMAR, mar_base  # noqa: E402
from models.vae import AutoencoderKL  # noqa: E402

import generators.diffusion_head as dh  # noqa: E402
import generators.mar as gm  # noqa: E402
import zoo  # noqa: E402
from generators import SamplingConfig  # noqa: E402
from generators.base import Condition  # noqa: E402
from zoo.checkpoint import load_pretrained, load_state_strict  # noqa: E402
from zoo.convert import find, load_source  # noqa: E402
from zoo.convert.mar import convert_mar  # noqa: E402
from zoo.tokens import TokenSpec  # noqa: E402

_TMP = tempfile.TemporaryDirectory(prefix="verify_mar_")
OUT = _TMP.name
torch.manual_seed(0)


def perturb(m, std=0.02):
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * std)  # zero-initialised layers (adaLN, outputs) matter too


def report(name, a, b):
    d = (a.double() - b.double()).abs().max().item()
    print(f"{name}: max abs diff {d:.3e} (max |ref| {b.abs().max().item():.3e})")
    return d


def cli_convert(src, model, out):
    """``arzoo convert --from mar SRC --model MODEL --out OUT`` (``python -m zoo`` is the same CLI)."""
    subprocess.run([sys.executable, "-m", "zoo", "convert", "--from", "mar", src, "--model", model, "--out", out],
                   check=True, cwd=ROOT)


def convert_in_process(src, model_name, weights=None, **over):
    """What ``zoo.convert.convert`` does, with constructor overrides for the reduced configs."""
    conv = find("mar", model_name)
    model = zoo.create(model_name, **{**conv.overrides, **over})
    kw = {} if weights is None else {"weights": weights}
    load_state_strict(model, conv.fn(load_source(src), model, **kw), src)
    return model.eval()


# ---- KL-16 -------------------------------------------------------------------------------------
S = 256 if FULL else 64  # the reference network is resolution-agnostic; arzoo's is told the size
vae = AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4)).eval()
perturb(vae)
torch.save({"model": vae.state_dict()}, f"{OUT}/kl16.ckpt")
if FULL:
    cli_convert(f"{OUT}/kl16.ckpt", "tokenizer/kl-16", f"{OUT}/kl-16")
    tok = load_pretrained(f"{OUT}/kl-16").eval()
else:
    tok = convert_in_process(f"{OUT}/kl16.ckpt", "tokenizer/kl-16", image_size=S)
x = torch.rand(1, 3, S, S) * 2 - 1
with torch.no_grad():
    post = vae.encode(x)
    ref_tokens = post.mode() * 0.2325  # MAR: latents * vae_scale
    tokens = tok.encode(x)
    report(f"kl-16 {S}px encode (mode * 0.2325)", tokens.data.movedim(-1, 1), ref_tokens)
    report(f"kl-16 {S}px decode (MAR: vae.decode(tokens / 0.2325))", tok.decode(tokens), vae.decode(ref_tokens / 0.2325))
del vae, tok

# ---- MAR-B (--full) or a reduced MAR -----------------------------------------------------------
STEPS = "20"  # respaced DDPM steps for the sampling check (the paper uses 100; same code path)
if FULL:
    NAME, L, NUM_CLASSES, N_MASK = "MAR-B", 256, 1000, 180
    ref = mar_base(buffer_size=64, diffloss_d=6, diffloss_w=1024, num_sampling_steps=STEPS,
                   diffusion_batch_mul=4).eval()
else:
    NAME, L, NUM_CLASSES, N_MASK = "MAR (reduced)", 16, 10, 11
    ref = RefMAR(img_size=64, vae_stride=16, patch_size=1, encoder_embed_dim=128, encoder_depth=2,
                 encoder_num_heads=4, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6), class_num=NUM_CLASSES, buffer_size=8,
                 diffloss_d=2, diffloss_w=256, num_sampling_steps=STEPS, diffusion_batch_mul=4).eval()
    SMALL = dict(spec=TokenSpec("continuous", "grid", (4, 4), dim=16), num_classes=NUM_CLASSES, buffer_size=8,
                 dim=128, depth=2, heads=4, dec_dim=128, dec_depth=2, dec_heads=4, head_width=256, head_depth=2,
                 num_iter=4)
perturb(ref)
raw = {k: v.clone() for k, v in ref.state_dict().items()}
perturb(ref, 0.01)
ema = ref.state_dict()  # the reference evaluates with the EMA weights: make them the ones in `ref`
torch.save({"model": raw, "model_ema": ema, "optimizer": {"state": {}, "param_groups": []}, "epoch": 399,
            "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mar_base", cfg=2.9)},
           f"{OUT}/checkpoint-last.pth")
if FULL:
    cli_convert(f"{OUT}/checkpoint-last.pth", "generator/mar-b", f"{OUT}/mar-b")
    gen = load_pretrained(f"{OUT}/mar-b").eval()
    g_raw = convert_mar(f"{OUT}/checkpoint-last.pth", "generator/mar-b", ema=False)
else:
    gen = convert_in_process(f"{OUT}/checkpoint-last.pth", "generator/mar-b", **SMALL)
    g_raw = convert_in_process(f"{OUT}/checkpoint-last.pth", "generator/mar-b", weights="raw", **SMALL)
print("ema=False takes model:", torch.equal(g_raw.state_dict()["backbone.enc_pos"], raw["encoder_pos_embed_learned"]),
      "| default takes model_ema:", torch.equal(gen.state_dict()["backbone.enc_pos"], ema["encoder_pos_embed_learned"]))
del g_raw
print(f"converted {NAME} params:", gen.num_params(), "reference:", sum(p.numel() for p in ref.parameters()))
DEC = ref.decoder_embed.out_features

B = 2
tokens = torch.randn(B, L, 16)
orders = torch.stack([torch.randperm(L) for _ in range(B)])
mask = torch.zeros(B, L)
mask.scatter_(1, orders[:, :N_MASK], 1.0)
labels = torch.tensor([3, 977 if FULL else NUM_CLASSES - 1])
with torch.no_grad():
    for lab in (labels, None):
        emb = ref.class_emb(lab) if lab is not None else ref.fake_latent.repeat(B, 1)
        z_ref = ref.forward_mae_decoder(ref.forward_mae_encoder(tokens, mask, emb), mask)
        buf = gen.buffer(Condition(labels=lab), B) if lab is not None else gen.null_buffer(B)
        z = gen.backbone(gen.embed(tokens), buf, mask.bool())
        report(f"{NAME} trunk z ({'class' if lab is not None else 'null class'})", z, z_ref)
    xt, t, c = torch.randn(64, 16), torch.randint(0, 1000, (64,)), torch.randn(64, DEC)
    report(f"{NAME} diffusion MLP output", gen.head.net(xt, t, c), ref.diffloss.net(xt, t, c))

# ---- full sampling with shared orders and noise --------------------------------------------------
# Orders: both sides take the same permutations. Noise: arzoo draws one (M, C) tensor to start
# each head call and one per reverse step except t = 0; the reference draws the same start, one
# randn_like per step including t = 0 (multiplied by 0), and with CFG 2M rows of which only the
# conditional half matters. Record arzoo's draws and replay them into the reference.
T = int(STEPS)


class Replay:
    def __init__(self, draws):
        self.draws, self.n = list(draws), 0

    def start(self, *shape):
        self.n = 0
        return self.draws.pop(0)

    def like(self, x):
        self.n += 1
        if self.n == T:  # the t = 0 step: unused by the reference
            return torch.zeros_like(x)
        e = self.draws.pop(0)
        return torch.cat((e, e)) if x.shape[0] == 2 * e.shape[0] else e


def run_pair(cfg, sched, num_iter=4, bsz=1):
    sample_orders = orders[:bsz]
    log = []
    orig_randn, orig_orders = dh._randn, gm.random_orders

    def rec(shape, generator, device, dtype):
        e = orig_randn(shape, generator, device, dtype)
        log.append(e.clone())
        return e

    dh._randn, gm.random_orders = rec, (lambda b, n, g=None, device=None: sample_orders.clone())
    try:
        s = SamplingConfig(cfg=cfg, cfg_schedule=sched, extra={"num_iter": num_iter, "head_steps": T})
        ours = gen.generate(Condition(labels=labels[:bsz]), s).data
    finally:
        dh._randn, gm.random_orders = orig_randn, orig_orders
    rp = Replay(log)
    proxy_torch = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    proxy_torch.randn = rp.start
    proxy_th = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    proxy_th.randn_like = rp.like
    old_dl, old_gd = ref_dl.torch, ref_gd.th
    ref_dl.torch, ref_gd.th = proxy_torch, proxy_th
    ref.sample_orders = lambda b: sample_orders.clone()
    try:
        with torch.no_grad():
            theirs = ref.sample_tokens(bsz, num_iter=num_iter, cfg=cfg, cfg_schedule=sched, labels=labels[:bsz])
    finally:
        ref_dl.torch, ref_gd.th = old_dl, old_gd
    assert not rp.draws, f"{len(rp.draws)} noise draws left over"
    return report(f"{NAME} sample_tokens cfg={cfg} {sched} num_iter={num_iter} (DDPM {T} steps)",
                  ours.movedim(-1, 1), theirs)


run_pair(1.0, "linear")
run_pair(2.9, "linear")
gen.cfg_last_step = "full"
run_pair(2.9, "linear")  # arzoo's default last-step CFG: expected to differ
_TMP.cleanup()
