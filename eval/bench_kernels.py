"""``python -m eval.bench --kernels``: fused sampling kernels vs torch, side by side.

For every batch ``B`` and vocabulary ``V`` (default B in {64, 512, 2048} x V in {4096, 16384,
65536}) and every sampling setting (``plain``: CFG + temperature; ``topk``; ``topp``;
``topk_topp``), one run times

fused
    ``generators.kernels.fused_categorical`` (one Triton kernel),
unfused
    the usual torch sequence: CFG, temperature, ``torch.topk`` + scatter, ``torch.sort`` +
    softmax + cumsum + scatter for top-p, softmax, ``torch.multinomial``,
compiled
    ``torch.compile`` of the torch reference (the ops of ``generators.sampling``:
    ``cfg_logits`` + ``filter_logits`` + softmax + exponential race),
flashinfer
    ``flashinfer.sampling`` where it imports (CFG done in torch first),

and reports µs/call (median of ``triton.testing.do_bench``, which flushes L2 between calls)
and the achieved bandwidth ``bytes / time`` where ``bytes`` is the compulsory traffic
(read cond + uncond logits once, write the ids), also as a fraction of the GPU's HBM peak
(table below by device name, or ``--peak-gbs``). Goal of issue 6: >= 3x unfused at
B=512, V=16384 and >= 70% of HBM peak.

Logits are ``randn * 3`` (a moderately peaked softmax, like a trained head's); the top-p
chain's extra passes and the radix early exit depend on that shape.

Without CUDA this prints that a GPU is needed and exits 0; ``--interpret`` instead runs a
tiny smoke test of the same code path in Triton's CPU interpreter (timings meaningless).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

# HBM peak (GB/s) by a substring of torch.cuda.get_device_name(); first match wins
HBM_PEAK_GBS = [
    ("GH200", 4000.0),  # 96 GB HBM3 part
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5 80GB HBM3 ("NVIDIA H100 80GB HBM3")
    ("H800", 3350.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40GB parts
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("RTX 4090", 1008.0),
]

SETTINGS = {  # name -> (top_k, top_p)
    "plain": (0, 1.0),
    "topk": (900, 1.0),
    "topp": (0, 0.9),
    "topk_topp": (900, 0.96),  # VAR's defaults
}


def hbm_peak_gbs(name: str) -> float | None:
    for key, gbs in HBM_PEAK_GBS:
        if key.lower() in name.lower():
            return gbs
    return None


# ---- the contenders ----------------------------------------------------------------------
def unfused_torch(c, u, s, temperature, top_k, top_p):
    """What a generator without fused kernels does: one torch op per step, multinomial draw."""
    z = (u + s * (c - u)).float() / temperature
    if 0 < top_k < z.shape[-1]:
        vals, idx = torch.topk(z, top_k, dim=-1)
        z = torch.full_like(z, float("-inf")).scatter(-1, idx, vals)
    if top_p < 1.0:
        sz, order = torch.sort(z, dim=-1, descending=True)
        probs = sz.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False
        z = z.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(z.softmax(-1), 1).squeeze(-1)


def reference(c, u, s, temperature, top_k, top_p):
    """The torch reference of ``generators.sampling`` (exponential race instead of multinomial)."""
    from generators.sampling import cfg_logits, filter_logits
    probs = filter_logits(cfg_logits(c, u, s).float() / temperature, top_k, top_p).softmax(-1)
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


def _flashinfer():
    try:
        import flashinfer.sampling as fs
    except Exception:  # noqa: BLE001  (absent or broken: skip the column)
        return None
    return fs


def flashinfer_call(fs, c, u, s, temperature, top_k, top_p):
    z = (u + s * (c - u)).float() / temperature
    if top_k > 0 or top_p < 1.0:
        return fs.top_k_top_p_sampling_from_logits(z, top_k if top_k > 0 else z.shape[-1], top_p)
    return fs.sampling_from_probs(z.softmax(-1))


# ---- driver ------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arzoo bench --kernels",
                                description="fused Triton sampling kernels vs unfused / compiled torch")
    p.add_argument("--batch", type=_ints, default=[64, 512, 2048], help="comma-separated batch sizes")
    p.add_argument("--vocab", type=_ints, default=[4096, 16384, 65536], help="comma-separated vocab sizes")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {list(SETTINGS)}")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="logits dtype")
    p.add_argument("--cfg", type=float, default=2.0, help="guidance scale (uncond logits always read)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--peak-gbs", type=float, default=None, help="HBM peak in GB/s (default: table by device)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time per cell (ms)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--interpret", action="store_true", help="CPU smoke run in Triton's interpreter")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the rows as JSON")
    return p


def _check(c, u, s, args, top_k, top_p) -> str:
    """Fused ids vs the torch keyed reference on the same uniforms (first 64 rows)."""
    from generators.kernels import fused_categorical
    from generators.sampling import sample_categorical
    n = min(64, c.shape[0])
    got = fused_categorical(c[:n], u[:n], s, args.temperature, top_k, top_p, seed=1234)
    os.environ["ARZOO_KERNELS"] = "0"
    try:
        want = sample_categorical(c[:n], uncond=u[:n], cfg=s, temperature=args.temperature, top_k=top_k,
                                  top_p=top_p, seed=1234)
    finally:
        os.environ.pop("ARZOO_KERNELS", None)
    return f"{int((got == want).sum())}/{n}"


def _interpret_smoke(args) -> int:
    os.environ["TRITON_INTERPRET"] = "1"
    from generators.kernels import available, interpreter_ready
    if not available():
        print("bench --kernels --interpret: triton is not importable", file=sys.stderr)
        return 1
    if not interpreter_ready():
        print("bench --kernels --interpret: Triton was imported before TRITON_INTERPRET=1 was set in this "
              "process; run `TRITON_INTERPRET=1 python -m eval.bench --kernels --interpret`", file=sys.stderr)
        return 1
    g = torch.Generator().manual_seed(0)
    B, V = 4, 256
    c = torch.randn(B, V, generator=g) * 3
    u = torch.randn(B, V, generator=g) * 3
    names = [n for n in args.settings.split(",") if n]
    for name in names:
        top_k, top_p = SETTINGS[name]
        top_k = min(top_k, V // 4)
        print(f"interpreter smoke  B={B} V={V} {name:<10} fused == torch reference ids: "
              f"{_check(c, u, args.cfg, args, top_k, top_p)}")
    print("(interpreter run: checks the code path only; timings need a CUDA GPU)")
    return 0


def _row(B, V, name, method, us, nbytes, peak, base_us):
    gbs = nbytes / (us * 1e-6) / 1e9 if us else None
    return {"B": B, "V": V, "setting": name, "method": method, "us": us, "GB/s": gbs,
            "frac_peak": gbs / peak if (gbs and peak) else None,
            "speedup_vs_unfused": base_us / us if (us and base_us) else None}


def format_table(rows) -> str:
    head = f"{'B':>5} {'V':>6} {'setting':<10} {'method':<10} {'us/call':>9} {'GB/s':>7} {'%HBM':>6} {'x unfused':>9}"
    out = [head, "-" * len(head)]
    for r in rows:
        if r.get("error"):
            out.append(f"{r['B']:>5} {r['V']:>6} {r['setting']:<10} {r['method']:<10} error: {r['error']}")
            continue
        pct = f"{100 * r['frac_peak']:.0f}%" if r["frac_peak"] is not None else "n/a"
        sp = f"{r['speedup_vs_unfused']:.2f}" if r["speedup_vs_unfused"] is not None else ""
        out.append(f"{r['B']:>5} {r['V']:>6} {r['setting']:<10} {r['method']:<10} {r['us']:>9.1f} "
                   f"{r['GB/s']:>7.0f} {pct:>6} {sp:>9}")
    return "\n".join(out)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    bad = [n for n in args.settings.split(",") if n and n not in SETTINGS]
    if bad:
        print(f"bench --kernels: unknown settings {bad}; choose from {list(SETTINGS)}", file=sys.stderr)
        return 2
    if args.interpret:
        return _interpret_smoke(args)
    if not torch.cuda.is_available():
        print("bench --kernels: needs a CUDA GPU (none found); run with --interpret for a CPU smoke test "
              "of the kernel code path")
        return 0
    from generators.kernels import available, fused_categorical
    if not available():
        print("bench --kernels: triton is not importable", file=sys.stderr)
        return 1
    import triton.testing

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak = args.peak_gbs or hbm_peak_gbs(name)
    dtype = getattr(torch, args.dtype)
    fs = _flashinfer()
    compiled = None
    if not args.no_compile:
        # static graph for the first shape, then one dynamic-shape graph per setting (top_k/top_p are constants)
        cfg_mod = torch._dynamo.config
        limit = "recompile_limit" if hasattr(cfg_mod, "recompile_limit") else "cache_size_limit"
        setattr(cfg_mod, limit, max(getattr(cfg_mod, limit), 64))
        compiled = torch.compile(reference)
    print(f"device: {name}; HBM peak: {f'{peak:.0f} GB/s' if peak else 'unknown (pass --peak-gbs)'}; "
          f"logits {args.dtype}; cfg {args.cfg}; T {args.temperature}; flashinfer: {'yes' if fs else 'not installed'}")
    rows, checks = [], []
    for V in args.vocab:
        for B in args.batch:
            g = torch.Generator(dev).manual_seed(0)
            c = (torch.randn(B, V, generator=g, device=dev) * 3).to(dtype)
            u = (torch.randn(B, V, generator=g, device=dev) * 3).to(dtype)
            seed = torch.tensor([1], device=dev, dtype=torch.int64)
            nbytes = 2 * c.numel() * c.element_size() + B * 8
            for sname in [n for n in args.settings.split(",") if n]:
                top_k, top_p = SETTINGS[sname]
                top_k = top_k if top_k < V else 0
                checks.append(f"B={B} V={V} {sname}: {_check(c, u, args.cfg, args, top_k, top_p)}")
                call = (c, u, args.cfg, args.temperature, top_k, top_p)
                fns = {
                    "fused": lambda a=call, sd=seed: fused_categorical(*a, seed=sd),
                    "unfused": lambda a=call: unfused_torch(*a),
                }
                if compiled is not None:
                    fns["compiled"] = lambda a=call: compiled(*a)
                if fs is not None:
                    fns["flashinfer"] = lambda a=call: flashinfer_call(fs, *a)
                times = {}
                for method, fn in fns.items():
                    try:
                        times[method] = 1e3 * triton.testing.do_bench(fn, rep=args.rep_ms, return_mode="median")
                    except Exception as e:  # noqa: BLE001  (one failing column must not hide the others)
                        rows.append({"B": B, "V": V, "setting": sname, "method": method,
                                     "error": f"{type(e).__name__}: {str(e)[:80]}"})
                base = times.get("unfused")
                for method, us in times.items():
                    rows.append(_row(B, V, sname, method, us, nbytes, peak, base))
            del c, u
            torch.cuda.empty_cache()
    print(format_table(rows))
    print("\nfused == torch keyed reference (same seed, first 64 rows): " + "; ".join(checks))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "peak_gbs": peak, "dtype": args.dtype, "rows": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
