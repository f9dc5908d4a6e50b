"""Fused sampling kernels (generators/kernels) against the torch reference (generators/sampling).

Without a GPU the Triton kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` is
set below (and stays set; nothing else uses Triton on a CPU machine). Triton reads it when
``@triton.jit`` decorates a function, including its own library functions at first import,
so when an earlier test module already imported Triton (torchvision does), the kernel tests
are run again in a fresh process by ``test_kernels_in_fresh_process`` (slow: ~45 s) and
skipped here. The interpreter costs ~0.1 s per chunk-pass, so the tests use few
chunks (large ``block``) and several rows per program; chunking, ragged tails and both
top-k selection paths (one row per program: ``tl.histogram``; several: one-hot) are still
covered.
"""
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from generators import kernels, sampling
from generators.kernels import pack_bits, philox_uniform, unpack_bits

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Triton picks interpreted versions of its own library at first import: if another test module
# imported it (torchvision does) before TRITON_INTERPRET was set, the kernel tests run in a
# fresh process instead (test_kernels_in_fresh_process).
IN_PROCESS = DEV == "cuda" or kernels.interpreter_ready()
needs_triton = pytest.mark.skipif(
    not (kernels.available() and IN_PROCESS),
    reason="triton is not importable" if not kernels.available() else
    "Triton was imported before TRITON_INTERPRET=1 in this process; run by test_kernels_in_fresh_process")
# the interpreter evaluates both sides of tl.where (e.g. -inf - -inf on masked lanes)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _fc(*a, **kw):
    from generators.kernels.categorical import fused_categorical
    return fused_categorical(*a, **kw)


def _logits(B, V, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    c = (torch.randn(B, V, generator=g) * scale).to(DEV)
    u = (torch.randn(B, V, generator=g) * scale).to(DEV)
    return c, u


def _order(z: torch.Tensor) -> torch.Tensor:
    """Indices of each row in the documented order: value descending, then index ascending."""
    return torch.sort(-z, dim=-1, stable=True).indices  # stable: ties keep index order


def _chi2_crit(df: int, z: float = 3.09) -> float:
    """0.999 quantile of chi-square(df) (Wilson–Hilferty approximation; no scipy here)."""
    a = 2.0 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


# ---- torch-only pieces -------------------------------------------------------------------
def test_pack_unpack_roundtrip():
    g = torch.Generator().manual_seed(0)
    for K in (1, 31, 32, 33, 96, 128):
        bits = torch.randint(0, 2, (3, 5, K), generator=g, dtype=torch.uint8)
        words = pack_bits(bits)
        assert words.dtype == torch.int32 and words.shape == (3, 5, (K + 31) // 32)
        assert torch.equal(unpack_bits(words, K), bits)
    one = torch.zeros(1, 40, dtype=torch.uint8)
    one[0, 31] = one[0, 33] = 1
    assert pack_bits(one).tolist() == [[-(2**31), 2]]  # LSB-first within each word
    with pytest.raises(ValueError, match="words"):
        unpack_bits(torch.zeros(1, 3, dtype=torch.int32), 128)


def test_philox_reference_is_a_keyed_stream():
    u = philox_uniform(5, [0, 1, 2], 9)
    assert u.shape == (3, 9) and float(u.min()) >= 0 and float(u.max()) < 1
    assert torch.equal(philox_uniform(5, [2, 0], 9), u[[2, 0]])  # row ids, not positions
    assert not torch.equal(philox_uniform(6, [0, 1, 2], 9), u)
    big = philox_uniform(1, torch.arange(64), 1000)
    assert abs(float(big.mean()) - 0.5) < 0.005 and abs(float(big.var()) - 1 / 12) < 0.003


def test_cpu_default_path_unchanged():
    """Without ``seed`` the CPU path is the exponential race on ``generator`` (shipped results rely on it)."""
    c, u = _logits(4, 50)
    c, u = c.cpu(), u.cpu()
    kw = {"uncond": u, "cfg": torch.tensor([1.0, 2.0, 3.0, 4.0]), "temperature": 0.9, "top_k": 20, "top_p": 0.8}
    got = sampling.sample_categorical(c, generator=torch.Generator().manual_seed(3), **kw)
    probs = sampling.categorical_probs(c, **kw)
    race = torch.empty_like(probs).exponential_(1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, (probs / race).argmax(-1))
    bits = sampling.sample_bits(c, uncond=u, cfg=2.0, generator=torch.Generator().manual_seed(4))
    p = torch.sigmoid(sampling.cfg_logits(c, u, 2.0))
    assert torch.equal(bits, (torch.rand(p.shape, generator=torch.Generator().manual_seed(4)) < p).to(torch.uint8))


def test_flow_step_reference():
    x, vc, vu = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    s, dt = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.1, 0.2, 0.3])
    want = x + dt.view(3, 1, 1) * (vu + s.view(3, 1, 1) * (vc - vu))
    torch.testing.assert_close(sampling.flow_step(x, vc, vu, s, dt), want)
    torch.testing.assert_close(sampling.flow_step(x, vc, dt=0.5), x + 0.5 * vc)
    assert sampling.flow_step(x.bfloat16(), vc.bfloat16(), dt=0.5).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="share one shape"):
        sampling.flow_step(x, vc[:2])


def test_enabled_for_rule(monkeypatch):
    fake_cuda = types.SimpleNamespace(is_cuda=True)
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert not kernels.enabled_for(fake_cuda)
    monkeypatch.setenv(kernels.ENV_SWITCH, "1")
    assert kernels.enabled_for(fake_cuda) == kernels.available()
    assert not kernels.enabled_for(torch.zeros(1))
    assert sampling._kernels_for(torch.zeros(1)) is None


# ---- kernels -----------------------------------------------------------------------------
@needs_triton
def test_kernel_uniforms_match_torch_philox():
    from generators.kernels.categorical import keyed_uniforms
    for seed in (0, 12345, 2**40 + 7):
        rows = torch.tensor([0, 3, 2**31 - 1, 77])
        got = keyed_uniforms(seed, 4, 70, rows=rows, device=DEV).cpu()
        assert torch.equal(got, philox_uniform(seed, rows, 70))


CONFIGS = [  # temperature, top_k, top_p, per-row cfg
    (1.0, 0, 1.0, False),
    (0.7, 10, 1.0, True),
    (1.3, 0, 0.8, True),
    (1.0, 40, 0.6, False),
    (0.9, 1, 1.0, True),
]


@needs_triton
@pytest.mark.parametrize("T,k,p,per_row", CONFIGS)
def test_probs_and_ids_match_reference(T, k, p, per_row):
    """Same distribution as the torch reference and, for the same keyed uniforms, the same ids."""
    B, V = 5, 200
    c, u = _logits(B, V, seed=1)
    cfg = torch.tensor([1.0, 2.0, 3.0, 0.5, 4.0], device=DEV) if per_row else 2.5
    kw = {"block": 128, "rows_per_program": 4}  # 2 chunks (ragged), 2 programs (ragged)
    ids, probs = _fc(c, u, cfg, T, k, p, seed=7, return_probs=True, **kw)
    ref = sampling.categorical_probs(c, uncond=u, cfg=cfg, temperature=T, top_k=k, top_p=p)
    assert torch.equal(probs > 0, ref > 0)
    torch.testing.assert_close(probs, ref, atol=1e-6, rtol=1e-5)
    ref_ids = sampling.sample_categorical(c, uncond=u, cfg=cfg, temperature=T, top_k=k, top_p=p, seed=7)
    assert torch.equal(ids, ref_ids)
    # the sampling-only path (rejection chain for top-p) draws the same ids
    assert torch.equal(_fc(c, u, cfg, T, k, p, seed=7, **kw), ref_ids)


@needs_triton
def test_one_row_per_program_histogram_path():
    """Long-row layout (one row per program, tl.histogram radix) on a 3-chunk row."""
    B, V = 2, 700
    c, u = _logits(B, V, seed=2)
    for k, p in ((37, 1.0), (300, 0.7)):
        ids, probs = _fc(c, u, 1.5, 1.0, k, p, seed=3, return_probs=True, block=256, rows_per_program=1)
        ref = sampling.categorical_probs(c, uncond=u, cfg=1.5, top_k=k, top_p=p)
        assert torch.equal(probs > 0, ref > 0)
        torch.testing.assert_close(probs, ref, atol=1e-6, rtol=1e-5)
        assert torch.equal(ids, sampling.sample_categorical(c, uncond=u, cfg=1.5, top_k=k, top_p=p, seed=3))


@needs_triton
@pytest.mark.parametrize("rows_per_program", [1, 4])
def test_topk_keeps_exactly_k_with_ties(rows_per_program):
    """Integer logits (many ties): exactly k kept, ties at the boundary resolved by lowest index."""
    g = torch.Generator().manual_seed(0)
    z = torch.randint(-3, 4, (3, 150), generator=g).float().to(DEV)
    for k in (1, 7, 40, 149):
        _, probs = _fc(z, None, 1.0, 1.0, k, 1.0, seed=0, return_probs=True, block=256,
                       rows_per_program=rows_per_program)
        want = torch.zeros_like(z, dtype=torch.bool).scatter(1, _order(z)[:, :k], True)
        assert torch.equal(probs > 0, want), k
        assert (probs > 0).sum(1).tolist() == [k] * 3


@needs_triton
def test_topp_keeps_minimal_prefix_with_ties():
    g = torch.Generator().manual_seed(1)
    z = (torch.randint(-4, 3, (4, 120), generator=g).float() * 0.5).to(DEV)
    full = z.softmax(-1)
    for p in (0.05, 0.3, 0.75, 0.97):
        ids, probs = _fc(z, None, 1.0, 1.0, 0, p, seed=5, return_probs=True, block=128, rows_per_program=4)
        kept = probs > 0
        n = kept.sum(1)
        order = _order(z)
        for i in range(4):
            mass = full[i, order[i]].cumsum(0)
            # kept is the prefix of the documented order of length n, the shortest reaching p
            assert torch.equal(kept[i, order[i, : n[i]]], torch.ones(int(n[i]), dtype=torch.bool, device=DEV))
            assert mass[n[i] - 1] >= p - 1e-6
            assert n[i] == 1 or mass[n[i] - 2] < p + 1e-6
        assert bool(kept.gather(1, ids[:, None]).all())
        # the chain (no probabilities) samples from the same nucleus with the same noise
        assert torch.equal(_fc(z, None, 1.0, 1.0, 0, p, seed=5, block=128, rows_per_program=4), ids)


@needs_triton
def test_greedy_is_argmax_of_guided_logits():
    c, u = _logits(5, 90, seed=4)
    s = torch.tensor([0.0, 1.0, 2.0, 5.0, 1.5], device=DEV)
    got = _fc(c, u, s, 0.0, 5, 0.5, seed=0, block=64, rows_per_program=4)
    assert torch.equal(got, sampling.cfg_logits(c, u, s).argmax(-1))


@needs_triton
def test_rows_independent_of_batch_composition():
    c, u = _logits(6, 80, seed=5)
    ids = torch.arange(100, 106, device=DEV)
    for k, p in ((0, 1.0), (20, 0.8)):
        full = _fc(c, u, 2.0, 1.0, k, p, seed=9, rows=ids, block=128, rows_per_program=8)
        sub = [4, 1, 3]
        part = _fc(c[sub], u[sub], 2.0, 1.0, k, p, seed=9, rows=ids[sub], block=128, rows_per_program=2)
        assert torch.equal(full[sub], part)
        # ... and not a function of the position: other row ids give other draws
        other = _fc(c, u, 2.0, 1.0, k, p, seed=9, block=128, rows_per_program=8)
        assert not torch.equal(full, other)


@needs_triton
@pytest.mark.parametrize("k,p", [(0, 1.0), (8, 0.9)])
def test_sample_frequencies_chi_square(k, p):
    """Empirical frequencies over 3000 row ids (fixed seed) match the target distribution.

    Also checks the test has power: the same counts are rejected against a wrong target
    (the distribution at another temperature).
    """
    V, N = 12, 3000
    g = torch.Generator().manual_seed(7)
    c = torch.randn(1, V, generator=g).to(DEV)
    u = torch.randn(1, V, generator=g).to(DEV)
    C, U = c.expand(N, V), u.expand(N, V)
    ids = _fc(C, U, 1.5, 1.0, k, p, seed=2024, rows_per_program=1024)
    counts = torch.bincount(ids.cpu(), minlength=V).double()
    target = sampling.categorical_probs(c, uncond=u, cfg=1.5, top_k=k, top_p=p)[0].cpu().double()
    assert counts[target == 0].sum() == 0
    live = target > 0
    chi2 = float(((counts[live] - N * target[live]) ** 2 / (N * target[live])).sum())
    crit = _chi2_crit(int(live.sum()) - 1)
    assert chi2 < crit, (chi2, crit)
    wrong = sampling.categorical_probs(c, uncond=u, cfg=1.5, temperature=1.6, top_k=k, top_p=p)[0].cpu().double()
    wl = wrong > 0
    chi2_wrong = float(((counts[wl] - N * wrong[wl]) ** 2 / (N * wrong[wl])).sum()) + float(counts[~wl].sum()) * 1e3
    assert chi2_wrong > _chi2_crit(int(wl.sum()) - 1)


@needs_triton
def test_large_vocab_65536_and_fsq_64000():
    for V, cases in ((65536, ((0, 1.0), (2000, 1.0), (0, 0.9))), (64000, ((900, 0.96),))):
        c, u = _logits(2, V, seed=V)
        for k, p in cases:
            got = _fc(c, u, 2.0, 1.0, k, p, seed=11, block=32768)
            assert torch.equal(got, sampling.sample_categorical(c, uncond=u, cfg=2.0, top_k=k, top_p=p, seed=11))
    _, probs = _fc(c, u, 2.0, 1.0, 900, 0.96, seed=11, return_probs=True, block=32768)
    ref = sampling.categorical_probs(c, uncond=u, cfg=2.0, top_k=900, top_p=0.96)
    assert torch.equal(probs > 0, ref > 0)
    torch.testing.assert_close(probs, ref, atol=1e-6, rtol=1e-5)


@needs_triton
def test_input_errors():
    c, u = _logits(2, 10)
    with pytest.raises(ValueError, match="same shape"):
        _fc(c, u[:, :5], seed=0)
    with pytest.raises(ValueError, match="per-row CFG scale"):
        _fc(c, u, torch.ones(3), seed=0)
    with pytest.raises(ValueError, match="top_p"):
        _fc(c, u, 1.0, 1.0, 0, 0.0, seed=0)
    with pytest.raises(ValueError, match="rows"):
        _fc(c, u, seed=0, rows=torch.arange(3))


# ---- bits and flow -----------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("K", [1, 40, 96, 128])
def test_bits_match_reference_and_pack(K):
    from generators.kernels.bitwise import fused_bits
    c, u = _logits(6, K, seed=K)
    s = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 0.0], device=DEV)
    bits = fused_bits(c, u, s, 0.8, seed=21)
    assert bits.dtype == torch.uint8 and bits.shape == (6, K)
    assert torch.equal(bits, sampling.sample_bits(c, uncond=u, cfg=s, temperature=0.8, seed=21))
    words = fused_bits(c, u, s, 0.8, seed=21, packed=True)
    assert words.shape == (6, (K + 31) // 32) and torch.equal(unpack_bits(words, K), bits)
    greedy = fused_bits(c, u, s, 0.0, seed=21)
    assert torch.equal(greedy, (sampling.cfg_logits(c, u, s) > 0).to(torch.uint8))


@needs_triton
def test_bit_frequencies_match_sigmoid():
    from generators.kernels.bitwise import fused_bits
    N, K = 4000, 24
    g = torch.Generator().manual_seed(3)
    c = (torch.randn(1, K, generator=g) * 2).to(DEV)
    u = (torch.randn(1, K, generator=g) * 2).to(DEV)
    words = fused_bits(c.expand(N, K), u.expand(N, K), 1.5, 0.9, seed=99, packed=True)
    freq = unpack_bits(words, K).double().mean(0).cpu()
    p = torch.sigmoid(sampling.cfg_logits(c, u, 1.5) / 0.9)[0].double().cpu()
    sd = (p * (1 - p) / N).sqrt().clamp_min(1e-4)
    assert float(((freq - p) / sd).abs().max()) < 4.5
    assert float(((freq - torch.sigmoid(c[0].double().cpu())) / sd).abs().max()) > 4.5  # unguided: rejected


@needs_triton
def test_flow_kernel_matches_reference():
    from generators.kernels.flow import fused_flow_step
    g = torch.Generator().manual_seed(0)
    x, vc, vu = (torch.randn(4, 3, 5, generator=g).to(DEV) for _ in range(3))
    for cfg, dt in ((1.5, 0.1), (torch.tensor([1.0, 2, 3, 4], device=DEV), torch.tensor([0.1, 0.2, 0.3, 0.4], device=DEV))):
        got = fused_flow_step(x, vc, vu, cfg, dt, block=16)
        torch.testing.assert_close(got, sampling.flow_step(x, vc, vu, cfg, dt), atol=1e-6, rtol=1e-6)
    got = fused_flow_step(x.bfloat16(), vc.bfloat16(), None, 1.0, 0.5)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, sampling.flow_step(x.bfloat16(), vc.bfloat16(), dt=0.5))


# ---- dispatch through generators.sampling ------------------------------------------------
@needs_triton
def test_sampling_dispatch_routes_to_kernels(monkeypatch):
    """Force the fused path for these tensors (on CPU through the interpreter) and check the plumbing:
    leading dims, per-row CFG of the batch dim, keyed seed, generator-drawn seed."""
    B, L, V = 2, 3, 40
    c, u = _logits(B * L, V, seed=8)
    c, u = c.reshape(B, L, V), u.reshape(B, L, V)
    s = torch.tensor([1.0, 3.0], device=DEV)
    kw = {"uncond": u, "cfg": s, "temperature": 0.8, "top_k": 10, "top_p": 0.9}
    want = sampling.sample_categorical(c, seed=4, **kw)  # torch keyed reference
    calls = []

    def fake(t):
        calls.append(t.shape)
        return kernels

    monkeypatch.setattr(sampling, "_kernels_for", fake)
    got = sampling.sample_categorical(c, seed=4, **kw)
    assert calls and got.shape == (B, L) and torch.equal(got, want)
    g1 = sampling.sample_categorical(c, generator=torch.Generator(DEV).manual_seed(1), **kw)
    g2 = sampling.sample_categorical(c, generator=torch.Generator(DEV).manual_seed(1), **kw)
    assert torch.equal(g1, g2)
    monkeypatch.setattr(sampling, "_kernels_for", lambda t: None)
    bits_want = sampling.sample_bits(c[..., :20], uncond=u[..., :20], cfg=s, seed=6)
    flow_want = sampling.flow_step(c, u, None, 1.0, 0.25)
    monkeypatch.setattr(sampling, "_kernels_for", fake)
    assert torch.equal(sampling.sample_bits(c[..., :20], uncond=u[..., :20], cfg=s, seed=6), bits_want)
    torch.testing.assert_close(sampling.flow_step(c, u, None, 1.0, 0.25), flow_want)


# ---- benchmark tool (numbers only on a GPU; here only its CPU behaviour) -------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_bench_kernels_without_gpu(capsys):
    from eval import bench, bench_kernels
    assert bench.main(["--kernels", "--batch", "8"]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert bench_kernels.main(["--settings", "nope"]) == 2
    assert bench_kernels.hbm_peak_gbs("NVIDIA H100 80GB HBM3") == 3350.0
    assert bench_kernels.hbm_peak_gbs("NVIDIA H200") == 4800.0


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter smoke mode is for machines without a GPU")
def test_bench_kernels_interpreter_smoke(capsys):
    from eval import bench_kernels
    assert bench_kernels.main(["--interpret", "--settings", "topk_topp"]) == 0
    assert "fused == torch reference ids: 4/4" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not kernels.available(), reason="triton is not importable")
@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests ran in this process")
def test_kernels_in_fresh_process():
    """Run this file's kernel tests in a new interpreter with TRITON_INTERPRET=1 set from the start."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-x",
                           "-p", "no:cacheprovider", "-k", "not test_kernels_in_fresh_process"],
                          check=False, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, proc.stdout[-2000:]
