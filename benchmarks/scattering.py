"""Throughput and peak memory: kymatio ScatteringTorch2D vs scatgen FastScattering2D.

    python benchmarks/scattering.py                   # CPU, sizes 64 128, batches 16 64 128
    python benchmarks/scattering.py --quick           # one short configuration
    python benchmarks/scattering.py --device cuda     # GPU, plus TF32 / bf16 variants
    python benchmarks/scattering.py --backward --sizes 64 --batches 64   # also forward + backward

Input (B, 3, N, N), J=4, L=8 (as used by scatgen). Every (backend, size, batch) runs
in a fresh subprocess, so CPU peak memory is that process's ru_maxrss (reported as
growth over the RSS before the first forward); on GPU it is the growth of
torch.cuda.max_memory_allocated. Throughput: images/s (one image = 3 maps), median
of --repeats timed forwards after one warm-up forward, under torch.no_grad().

--backward adds, in the same run, forward plus backward of ‖S x‖² with respect to the
images (what every refinement step costs) for kymatio, for the fast backend through
plain autograd (custom_backward=False) and for its hand-written backward, with the
ratios to kymatio's forward plus backward.

kymatio is several times slower than the fast path on CPU, so there it is timed on a
sub-batch of --kymatio-max-batch images (its cost is linear in the batch: every op is
batched) and the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------- worker


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build(backend: str, J: int, L: int, size: int, cache_dir: str):
    """backend: kymatio | fast | fast-autograd (the fast forward, differentiated by plain autograd)."""
    if backend == "kymatio":
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

        return ScatteringTorch2D(J=J, shape=(size, size), L=L, max_order=2)
    from scatgen.scattering_fast import FastScattering2D

    return FastScattering2D(J, (size, size), L, cache_dir=cache_dir, custom_backward=backend != "fast-autograd")


def worker(a: argparse.Namespace) -> dict:
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    variant = a.variant  # fp32 | tf32 | bf16 (fast on CUDA only)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = variant == "tf32"
        torch.backends.cudnn.allow_tf32 = variant == "tf32"
    t0 = time.perf_counter()
    module = _build(a.backend, a.J, a.L, a.size, a.cache_dir).to(device)
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(a.batch, 3, a.size, a.size, generator=gen).to(device)

    def run(inp):
        if a.backward:
            inp = inp.detach().requires_grad_(True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant == "bf16"):
                out = module(inp)
            out.float().square().sum().backward()
            out = out.detach()
        else:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant == "bf16"):
                out = module(inp)
        if cuda:
            torch.cuda.synchronize()
        return out

    rss0 = _rss_bytes()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        mem0 = torch.cuda.memory_allocated()
    run(x[: a.warmup_batch] if a.warmup_batch else x)  # warm-up (allocator, FFT plans)
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - mem0
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    result = {
        "images_per_s": a.batch / statistics.median(times),
        "times": times,
        "peak_mem_bytes": max(peak, 0),
        "build_s": build_s,
        "threads": torch.get_num_threads(),
    }
    if a.check_error:
        # Max relative error vs float32 kymatio on the same device, on a few images.
        ref = _build("kymatio", a.J, a.L, a.size, a.cache_dir).to(device)
        xs = x[:4]
        with torch.no_grad():
            r = ref(xs).float()
        o = run(xs).float()
        result["max_rel_err"] = ((o - r).abs().max() / r.abs().max()).item()
        result["norm_rel_err"] = ((o - r).norm() / r.norm()).item()
    return result


# ----------------------------------------------------------------------------- driver


def machine_info(device: str) -> str:
    import torch

    from scatgen.evaluation import cpu_or_gpu_name

    lines = [f"python {platform.python_version()}, torch {torch.__version__}"]
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    lines.append(
        f"CPU: {cpu_or_gpu_name(torch.device('cpu'))} (driver), {ncpu} cores usable, "
        f"load average {', '.join(f'{v:.1f}' for v in load)}"
    )
    if device.startswith("cuda") and torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name(0)}")
    return "\n".join(lines)


def run_worker(args: argparse.Namespace, **kw) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    opts = dict(device=args.device, J=args.J, L=args.L, cache_dir=args.cache_dir, variant="fp32", warmup_batch=0,
                threads=args.threads, backward=False)
    opts.update(kw)
    for k, v in opts.items():
        if isinstance(v, bool):
            cmd += [f"--{k.replace('_', '-')}"] if v else []
        else:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64, 128])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--J", type=int, default=4)
    p.add_argument("--L", type=int, default=8)
    p.add_argument("--kymatio-max-batch", type=int, default=None, help="CPU default 16; CUDA default: no cap")
    p.add_argument("--kymatio-repeats", type=int, default=None, help="CPU default 2")
    p.add_argument("--no-kymatio", action="store_true")
    p.add_argument("--no-lowp", action="store_true", help="CUDA: skip the TF32 / bf16 variants")
    p.add_argument("--quick", action="store_true", help="size 64, batch 16, 1 repeat")
    p.add_argument("--backward", action="store_true",
                   help="also time forward plus backward: kymatio, fast (autograd), fast (custom backward)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads in each worker (0: torch's default). On a shared, "
                   "oversubscribed CPU, 1 thread gives far more stable numbers than OpenMP's spinning")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "scatgen-filter-cache"))
    # worker-only options
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="fast", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--warmup-batch", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--check-error", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        print(json.dumps(worker(args)))
        return

    cuda = args.device.startswith("cuda")
    if args.quick:
        args.sizes, args.batches, args.repeats = [64], [16], 1
    kmax = args.kymatio_max_batch or (None if cuda else (4 if args.quick else 16))
    krep = args.kymatio_repeats or (args.repeats if cuda else min(args.repeats, 2))

    print(machine_info(args.device))
    if args.threads:
        print(f"workers use torch.set_num_threads({args.threads})")
    print(f"forward{' and forward + backward' if args.backward else ''}, "
          f"J={args.J}, L={args.L}, input (B, 3, N, N) float32, device {args.device}, "
          f"median of {args.repeats} (kymatio: {krep}) after a warm-up\n", flush=True)

    rows, bwd_rows = [], []
    for size in args.sizes:
        kym_cache: dict[tuple[int, bool], dict] = {}
        for batch in args.batches:
            kb = min(batch, kmax) if kmax else batch
            for backward in (False, True) if args.backward else (False,):
                if not args.no_kymatio and (kb, backward) not in kym_cache:
                    kym_cache[kb, backward] = run_worker(args, backend="kymatio", size=size, batch=kb, repeats=krep,
                                                         warmup_batch=1 if not cuda else 0, backward=backward)
            fast = run_worker(args, backend="fast", size=size, batch=batch, repeats=args.repeats)
            kym = kym_cache.get((kb, False))
            rows.append((size, batch, "fp32", kb, kym, fast))
            if args.backward:
                plain = run_worker(args, backend="fast-autograd", size=size, batch=batch, repeats=args.repeats,
                                   backward=True)
                custom = run_worker(args, backend="fast", size=size, batch=batch, repeats=args.repeats,
                                    backward=True)
                bwd_rows.append((size, batch, kb, kym, fast, kym_cache.get((kb, True)), plain, custom))
            if cuda and not args.no_lowp:
                for variant in ("tf32", "bf16"):
                    try:
                        res = run_worker(args, backend="fast", size=size, batch=batch, repeats=args.repeats,
                                         variant=variant, check_error=True)
                    except RuntimeError as e:  # report and go on with the other rows
                        print(f"  {variant} failed: {str(e)[-500:]}", file=sys.stderr)
                        continue
                    rows.append((size, batch, variant, kb, kym, res))
            print(f"  done N={size} B={batch}", file=sys.stderr, flush=True)

    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    mem = "GPU peak alloc (MiB)" if cuda else "peak RSS growth (MiB)"
    print(f"| N | B | variant | kymatio img/s | fast img/s | fast / kymatio | kymatio {mem} | fast {mem} | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, batch, variant, kb, kym, fast in rows:
        k_ips = f"{kym['images_per_s']:.2f}" + (f" (B={kb})" if kb != batch else "") if kym else "-"
        ratio = f"{fast['images_per_s'] / kym['images_per_s']:.1f}x" if kym else "-"
        err = f"{fast['max_rel_err']:.1e}" if "max_rel_err" in fast else "-"
        print(f"| {size} | {batch} | {variant} | {k_ips} | {fast['images_per_s']:.1f} | {ratio} | "
              f"{mib(kym['peak_mem_bytes']) + (f' (B={kb})' if kb != batch else '') if kym else '-'} | "
              f"{mib(fast['peak_mem_bytes'])} | {err} |")
    if bwd_rows:
        print("\nForward (fwd) and forward + backward (f+b) of ‖S x‖², images/s; ratios to kymatio in this run:")
        print("| N | B | kymatio fwd | fast fwd | fwd ratio | kymatio f+b | fast f+b autograd | fast f+b custom | "
              "autograd ratio | custom ratio | autograd f+b " + mem + " | custom f+b " + mem + " |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for size, batch, kb, kym, fast, kym_b, plain, custom in bwd_rows:
            ips = lambda r: f"{r['images_per_s']:.2f}" if r else "-"  # noqa: E731
            ratio = lambda a, b: f"{a['images_per_s'] / b['images_per_s']:.1f}x" if a and b else "-"  # noqa: E731
            sub = f" (B={kb})" if kb != batch else ""
            print(f"| {size} | {batch} | {ips(kym)}{sub if kym else ''} | {ips(fast)} | {ratio(fast, kym)} | "
                  f"{ips(kym_b)}{sub if kym_b else ''} | {ips(plain)} | {ips(custom)} | {ratio(plain, kym_b)} | "
                  f"{ratio(custom, kym_b)} | {mib(plain['peak_mem_bytes'])} | {mib(custom['peak_mem_bytes'])} |")
    if cuda and not args.no_lowp:
        print("\nLow-precision variants are recommended only where max rel err <= 1e-3:")
        for size, batch, variant, _, _, fast in rows:
            if variant != "fp32":
                ok = fast["max_rel_err"] <= 1e-3
                print(f"  N={size} B={batch} {variant}: {'OK' if ok else 'NOT recommended'} "
                      f"(max rel err {fast['max_rel_err']:.1e})")


if __name__ == "__main__":
    main()
