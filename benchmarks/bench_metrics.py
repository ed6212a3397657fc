"""Benchmark: scoring 2,000 generated digits on the CPU once the extractor is cached (target: within 10 s).

Printed next to a plain baseline measured in the same run on the same features: the Frechet distance computed the
way most FID code does it (pytorch-fid's `calculate_frechet_distance`: scipy.linalg.sqrtm of the covariance
product, real part taken), over the same 64 splits. The ratio is the figure to read (machines here are noisy); the
largest difference between the two FD values is printed as an agreement check.

    .venv/bin/python benchmarks/bench_metrics.py [--n 2000] [--repeats 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def sqrtm_fd(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """pytorch-fid's recipe, verbatim in substance: the plain baseline."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fd_over_splits(gen: np.ndarray, real: np.ndarray, splits) -> tuple[list[float], list[float]]:
    """The baseline: each FD computed on its own with scipy's sqrtm."""
    from gan_ray.eval.metrics import feature_stats

    values, floors = [], []
    for sp in splits:
        mu_r, cov_r = feature_stats(real[sp.ref])
        values.append(sqrtm_fd(*feature_stats(gen[sp.gen]), mu_r, cov_r))
        floors.append(sqrtm_fd(*feature_stats(real[sp.real]), mu_r, cov_r))
    return values, floors


def fd_ours(gen: np.ndarray, real: np.ndarray, splits) -> tuple[list[float], list[float]]:
    """gan-ray's metric, as the evaluation runs it (`metrics.fd` on a context)."""
    from gan_ray.eval.metrics import Embedded, EvalContext, fd

    out = []
    for sp in splits:  # one split at a time, to return per-split values for the agreement check
        ctx = EvalContext(Embedded(gen, None), Embedded(real, None), [sp], None, None, 0)
        r = fd(ctx)
        out.append((r["fd"], r["fd_floor"]))
    return [v for v, _ in out], [f for _, f in out]


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from gan_ray.eval.features import load_extractor
    from gan_ray.eval.metrics import Embedded, clear_references, evaluate_generator, make_splits
    from gan_ray.core.models import ModelSpec, build_generator
    from gan_ray.core.generator import Generator

    t0 = time.perf_counter()
    ex = load_extractor("digits")  # trains once if the cache is empty: not part of the timed figure
    setup_s = time.perf_counter() - t0
    spec = ModelSpec("mlp", 100, (1, 28, 28), 10)
    torch.manual_seed(0)
    gen = Generator(build_generator(spec), spec, {"dataset": "digits"})

    clear_references()  # cold: load the cached extractor from disk and embed the held-out set
    t0 = time.perf_counter()
    evaluate_generator(gen, "digits", n=args.n, seed=0)
    cold_s = time.perf_counter() - t0
    warm_s, result = timed(lambda: evaluate_generator(gen, "digits", n=args.n, seed=0), args.repeats)

    # The FD part alone, both ways, on identical features and splits.
    from gan_ray.eval.metrics import reference_for

    ref = reference_for("digits")
    feats = Embedded(*ex.embed(gen.generate(args.n, seed=0))).features
    splits = make_splits(len(ref.real), args.n, seed=0)
    ours_s, (ours_v, ours_f) = timed(lambda: fd_ours(feats, ref.real.features, splits), args.repeats)
    base_s, (base_v, base_f) = timed(lambda: fd_over_splits(feats, ref.real.features, splits), args.repeats)
    agreement = max(abs(a - b) / max(abs(b), 1e-9) for a, b in zip(ours_v + ours_f, base_v + base_f))
    report = {
        "n": args.n, "threads": torch.get_num_threads(), "extractor_setup_s": round(setup_s, 3),
        "evaluate_cold_s": round(cold_s, 3), "evaluate_warm_s": round(warm_s, 3), "target_s": 10.0,
        "fd_eigen_s": round(ours_s, 4), "fd_scipy_sqrtm_s": round(base_s, 4),
        "fd_speedup_vs_sqrtm": round(base_s / max(ours_s, 1e-9), 2), "fd_max_rel_diff": agreement,
        "fd": result["fd"], "fd_floor": result["fd_floor"], "fd_splits": len(splits),
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"scoring {args.n} generated digits on the CPU ({report['threads']} threads; extractor cached, "
          f"setup {setup_s:.1f}s)")
    print(f"  evaluate_generator, first call (load extractor, embed held-out): {cold_s:7.2f} s")
    print(f"  evaluate_generator, warm (median of {args.repeats}):                 {warm_s:7.2f} s   "
          f"target <= 10 s: {'OK' if cold_s <= 10 else 'MISSED'}")
    print(f"  FD over {len(splits)} splits, eigenvalue form (gan-ray): {ours_s * 1000:8.1f} ms")
    print(f"  FD over {len(splits)} splits, scipy.linalg.sqrtm (baseline): {base_s * 1000:8.1f} ms   "
          f"ratio baseline/gan-ray {report['fd_speedup_vs_sqrtm']:.2f}; values agree to {agreement:.1e} (relative)")


if __name__ == "__main__":
    main()
