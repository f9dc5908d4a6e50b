"""Outside-CI check: ``zoo/convert/var.py`` against FoundationVision/VAR's own modules (random weights).

Reference code: a checkout of https://github.com/FoundationVision/VAR (written against 78b9539);
only its ``models/`` package is imported. VAR's ``dist`` module is replaced by a CPU stub made
here, so the checkout's ``dist.py`` is not needed. Run (arzoo venv, any cwd):

    OMP_NUM_THREADS=1 python tools/verify_convert/var.py --ref PATH/TO/VAR [--paper]

Default: a reduced VQVAE (ch 32, 4 scales, 64 px) and a depth-2 VAR; ``--paper``: the released
``vae_ch160v4096z32`` VQVAE and VAR-d16 (310M) at 256 px (several GB of RAM, minutes on CPU).
Prints the max abs differences (converted arzoo models vs reference) for encoder features, ids,
f_hat / reconstructions and the VAR logits (teacher-forced, cached, null class).
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
ap.add_argument("--ref", required=True, type=Path, help="checkout of FoundationVision/VAR (holds models/)")
ap.add_argument("--paper", action="store_true", help="paper-size VQVAE and VAR-d16")
args = ap.parse_args()
REF = args.ref.resolve()
if not (REF / "models" / "var.py").is_file():
    sys.exit(f"{REF}: no models/var.py (expected a checkout of FoundationVision/VAR)")

# VAR's models import a top-level ``dist`` (its torch.distributed helpers); a single CPU process
# needs only these two functions.
_dist = types.ModuleType("dist")
_dist.get_device = lambda: "cpu"
_dist.initialized = lambda: False
sys.modules["dist"] = _dist
sys.path.insert(0, str(REF))

torch.manual_seed(0)
from models.var import VAR  # noqa: E402
from models.vqvae import VQVAE  # noqa: E402

import zoo  # noqa: E402
from generators.base import Condition  # noqa: E402
from zoo.checkpoint import load_state_strict  # noqa: E402
from zoo.convert import find, load_source  # noqa: E402
from zoo.tokens import Tokens  # noqa: E402

paper = args.paper
if paper:
    vcfg = dict(vocab_size=4096, z_channels=32, ch=160, v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    img, depth, classes = 256, 16, 1000
    tov = {}
    gov = {}
else:
    vcfg = dict(vocab_size=512, z_channels=16, ch=32, v_patch_nums=(1, 2, 3, 4))
    img, depth, classes = 64, 2, 10
    tov = dict(image_size=64, ch=32, z_channels=16, codebook_size=512, codebook_dim=16, scales=[1, 2, 3, 4])
    gov = dict(depth=2, num_classes=10, cvae=16)


def randomize(m, std=0.05):
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith('scale_mul_1H11'):
                p.copy_(math.log(4.0) + 0.3 * torch.randn_like(p))
            elif p.dim() == 1 and ('norm' in n) and n.endswith('weight'):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, std)


tmp = tempfile.TemporaryDirectory(prefix="verify_var_")
vae_pth, var_pth, tokdir = f"{tmp.name}/vae.pth", f"{tmp.name}/var.pth", f"{tmp.name}/tok_ckpt"

ref_vae = VQVAE(test_mode=True, **vcfg).eval()
randomize(ref_vae)
with torch.no_grad():
    ref_vae.quantize.embedding.weight.normal_(0, 0.5)   # codes on the scale of the features
torch.save(ref_vae.state_dict(), vae_pth)

tok = zoo.create('tokenizer/msvq-var', **tov).eval()
conv = find('var', 'tokenizer/msvq-var')
load_state_strict(tok, conv.fn(load_source(vae_pth), tok), 'vae.pth')

x = torch.rand(2, 3, img, img) * 2 - 1
with torch.no_grad():
    f_ref = ref_vae.quant_conv(ref_vae.encoder(x))
    f_me = tok.quant_conv(tok.encoder(x))
    print('encoder f max|diff|', (f_ref - f_me).abs().max().item(), ' |f| max', f_ref.abs().max().item())
    ids_ref = ref_vae.img_to_idxBl(x)
    ids_me = [t.flatten(1) for t in tok.encode(x).data]
    agree = [(a == b).float().mean().item() for a, b in zip(ids_ref, ids_me)]
    print('ids agreement per scale', agree)
    # decode the reference ids with both (no clamp on either side)
    fhat_ref = ref_vae.quantize.embed_to_fhat([ref_vae.quantize.embedding(i).transpose(1, 2).reshape(2, vcfg['z_channels'], p, p)
                                               for i, p in zip(ids_ref, vcfg['v_patch_nums'])], all_to_max_scale=True, last_one=True)
    rec_ref = ref_vae.decoder(ref_vae.post_quant_conv(fhat_ref))
    toks = Tokens([i.view(2, p, p) for i, p in zip(ids_ref, vcfg['v_patch_nums'])], tok.spec)
    fhat_me = tok.quantizer.indices_to_fhat(list(toks.data))
    rec_me = tok.decode(toks)
    print('fhat max|diff|', (fhat_ref - fhat_me).abs().max().item(), ' recon max|diff|', (rec_ref - rec_me).abs().max().item(),
          ' |recon| max', rec_ref.abs().max().item())
    # full-path recon of the images
    rr = ref_vae.img_to_reconstructed_img(x, last_one=True)
    print('img->recon (ref clamps) max|diff|', (rr - tok.decode(tok.encode(x)).clamp(-1, 1)).abs().max().item())

tok.save_pretrained(tokdir)

ref_var = VAR(ref_vae, num_classes=classes, depth=depth, embed_dim=64 * depth, num_heads=depth, norm_eps=1e-6,
              attn_l2_norm=True, cond_drop_rate=0.0, patch_nums=vcfg['v_patch_nums'], drop_path_rate=0.0,
              flash_if_available=False, fused_if_available=False).eval()
randomize(ref_var, 0.05)
torch.save(ref_var.state_dict(), var_pth)
print('VAR reference tensors:', len(ref_var.state_dict()), 'params', sum(p.numel() for p in ref_var.parameters()))

gconv = find('var', 'generator/var-d16')
assert gconv.needs_tokenizer
gen = zoo.create('generator/var-d16', spec=tok.spec, **{**gconv.overrides, **gov}).eval()
load_state_strict(gen, gconv.fn(load_source(var_pth), gen, tokenizer=tok), 'var.pth')
print('arzoo params', sum(p.numel() for p in gen.parameters() if p.requires_grad))

labels = torch.tensor([3, classes - 1])
with torch.no_grad():
    ids = ids_ref if not paper else [torch.randint(0, vcfg['vocab_size'], (2, p * p)) for p in vcfg['v_patch_nums']]
    lg_ref = ref_var(labels, ref_vae.quantize.idxBl_to_var_input(ids))
    toks = Tokens([i.view(2, p, p) for i, p in zip(ids, vcfg['v_patch_nums'])], gen.spec)
    lg_me = gen.logits(toks, Condition(labels=labels))
    lg_cache = gen.cached_logits(toks, Condition(labels=labels))
    lg_null_ref = ref_var(torch.full((2,), classes), ref_vae.quantize.idxBl_to_var_input(ids))
    lg_null_me = gen.logits(toks, Condition(labels=torch.tensor([-1, -1])))
print('logits max|diff|', (lg_ref - lg_me).abs().max().item(), ' cached', (lg_ref - lg_cache).abs().max().item(),
      ' null-class', (lg_null_ref - lg_null_me).abs().max().item(), ' |logits| max', lg_ref.abs().max().item(),
      ' argmax agreement', (lg_ref.argmax(-1) == lg_me.argmax(-1)).float().mean().item())
tmp.cleanup()
