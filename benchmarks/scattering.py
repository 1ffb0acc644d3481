"""Throughput and peak memory: kymatio ScatteringTorch2D vs scatgen FastScattering2D.

    python benchmarks/scattering.py                   # CPU, sizes 64 128, batches 16 64: a few minutes on 2 cores
    python benchmarks/scattering.py --quick           # size 64, batch 16
    python benchmarks/scattering.py --device cuda     # GPU, plus TF32 / bf16 variants
    python benchmarks/scattering.py --backward --sizes 64 --batches 64   # also forward + backward
    python benchmarks/scattering.py --repeats 9 --threads 1               # steadier on a shared machine

Input (B, 3, N, N), J=4, L=8 (as used by scatgen), both backends at the same batch. Each
(size, batch) starts one process per measured variant: kymatio and fast forward, and with
--backward forward plus backward of ‖S x‖² with respect to the images (what every refinement
step costs) for kymatio, for the fast backend through plain autograd (custom_backward=False)
and for its hand-written backward. Each process builds its module and runs one untimed
full-batch call (allocator, FFT plans); then the driver asks them in turn for one timed call
each, kymatio, fast, kymatio, fast, ..., --repeats rounds, so that a stall or a busy neighbour
hits one sample of one variant rather than a whole measurement, and a machine that changes
speed slows every variant alike. Throughput: images/s (one image = 3 maps) of the median call,
under torch.no_grad() for forwards; spread: (max − min) / median of the calls, flagged above
20%. Ratios are fast / kymatio of the medians. CPU peak memory is each process's ru_maxrss,
reported as growth over the RSS before the first call; on GPU it is the growth of
torch.cuda.max_memory_allocated.

kymatio is several times slower than the fast path on CPU (about 5 s a call at 128², batch 64
on 2 cores, by the figures in benchmarks/README.md), so batch 128 left the defaults;
--kymatio-max-batch caps its batch (its cost is linear in the batch: every op is batched) and
the tables say so where it applies.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
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
    from scatgen.scattering import FastScattering2D

    return FastScattering2D(J, (size, size), L, cache_dir=cache_dir, custom_backward=backend != "fast-autograd")


def worker(a: argparse.Namespace) -> None:
    """Build, warm up with one full-batch call and say so; then answer each line on stdin with a
    JSON line: 'time' (seconds of one call) or 'finish' (peak memory and the rest; then exit)."""
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
    t = time.perf_counter()
    run(x)  # warm-up: the allocator reaches its full-batch size, FFT plans are made
    print(json.dumps({"ready": True, "warmup_s": time.perf_counter() - t}), flush=True)
    for line in sys.stdin:
        if line.strip() == "time":
            t = time.perf_counter()
            run(x)
            print(json.dumps({"s": time.perf_counter() - t}), flush=True)
            continue
        if line.strip() != "finish":
            raise SystemExit(f"unknown command {line.strip()!r}")
        if cuda:
            peak = torch.cuda.max_memory_allocated() - mem0
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
        result = {"peak_mem_bytes": max(peak, 0), "build_s": build_s, "threads": torch.get_num_threads()}
        if a.check_error:
            # Max relative error vs float32 kymatio on the same device, on a few images.
            ref = _build("kymatio", a.J, a.L, a.size, a.cache_dir).to(device)
            xs = x[:4]
            with torch.no_grad():
                r = ref(xs).float()
            o = run(xs).float()
            result["max_rel_err"] = ((o - r).abs().max() / r.abs().max()).item()
            result["norm_rel_err"] = ((o - r).norm() / r.norm()).item()
        print(json.dumps(result), flush=True)
        return


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


SPREAD_FLAG = 0.2  # (max − min) / median above this: a stall or a neighbour moved the figure


class Worker:
    """One measured variant in its own process, asked for one timed call at a time."""

    def __init__(self, args: argparse.Namespace, label: str, **kw) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
        opts = dict(device=args.device, J=args.J, L=args.L, cache_dir=args.cache_dir, variant="fp32",
                    threads=args.threads, backward=False, check_error=False)
        opts.update(kw)
        for k, v in opts.items():
            if isinstance(v, bool):
                cmd += [f"--{k.replace('_', '-')}"] if v else []
            else:
                cmd += [f"--{k.replace('_', '-')}", str(v)]
        self.label, self.batch, self.cmd, self.times = label, opts["batch"], cmd, []
        self.errors = tempfile.TemporaryFile("w+")  # a file: a full pipe would block the worker
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors,
                                     text=True)

    def ask(self, command: str | None = None) -> dict:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.errors.seek(0)
            raise RuntimeError(f"worker {self.label} failed (status {self.proc.returncode}): {' '.join(self.cmd)}\n"
                               f"{self.errors.read()[-3000:]}")
        return json.loads(line)

    def time_one(self) -> None:
        self.times.append(self.ask("time")["s"])

    def finish(self) -> dict:
        result = self.ask("finish")
        self.close()
        ips = [self.batch / t for t in self.times]
        median = statistics.median(ips)
        result.update(times=self.times, images_per_s=median, spread=(max(ips) - min(ips)) / median,
                      batch=self.batch)
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.errors.close()


def measure_group(workers: dict[str, Worker], repeats: dict[str, int], optional: set[str]) -> dict[str, dict]:
    """Interleaved timing: every worker warms up, then each round times one call of each in turn.
    A worker in `optional` that fails is reported and left out; any other failure raises."""
    results: dict[str, dict] = {}
    live = dict(workers)
    try:
        def drop_or_raise(key: str, error: RuntimeError) -> None:
            if key not in optional:
                raise error
            print(f"  {key} failed: {str(error)[-500:]}", file=sys.stderr)
            live.pop(key).close()

        for key, w in list(live.items()):  # they built and warmed up at the same time (untimed)
            try:
                w.ask()
            except RuntimeError as e:
                drop_or_raise(key, e)
        for r in range(max(repeats.values())):
            for key, w in list(live.items()):
                if r < repeats[key]:
                    try:
                        w.time_one()
                    except RuntimeError as e:
                        drop_or_raise(key, e)
        for key, w in live.items():
            results[key] = w.finish()
    finally:
        for w in workers.values():
            w.close()
    return results


def cell(r: dict | None, sub: str = "") -> str:
    """'images/s (spread)', '!' where the spread is above SPREAD_FLAG."""
    if not r:
        return "-"
    flag = "!" if r["spread"] > SPREAD_FLAG else ""
    return f"{r['images_per_s']:.2f} ({r['spread']:.0%}{flag}){sub}"


def ratio(a: dict | None, b: dict | None) -> str:
    return f"{a['images_per_s'] / b['images_per_s']:.1f}x" if a and b else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    p.add_argument("--repeats", type=int, default=5, help="timed calls per variant, interleaved (at least 5 to "
                   "trust the spread)")
    p.add_argument("--J", type=int, default=4)
    p.add_argument("--L", type=int, default=8)
    p.add_argument("--kymatio-max-batch", type=int, default=None,
                   help="cap kymatio's batch to save time (default: the same batch as fast)")
    p.add_argument("--kymatio-repeats", type=int, default=None, help="default: --repeats")
    p.add_argument("--no-kymatio", action="store_true")
    p.add_argument("--no-lowp", action="store_true", help="CUDA: skip the TF32 / bf16 variants")
    p.add_argument("--quick", action="store_true", help="size 64, batch 16 only")
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
    p.add_argument("--check-error", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        worker(args)
        return

    # SIGTERM (timeout, kill) unwinds like Ctrl-C, so that the workers are stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    cuda = args.device.startswith("cuda")
    if args.quick:
        args.sizes, args.batches = [64], [16]
    krep = args.kymatio_repeats or args.repeats
    if min(args.repeats, krep) < 1 or min(args.batches) < 1 or (args.kymatio_max_batch or 1) < 1:
        p.error("--repeats, --kymatio-repeats, --batches and --kymatio-max-batch must be >= 1")
    kmax = args.kymatio_max_batch

    print(machine_info(args.device))
    if args.threads:
        print(f"workers use torch.set_num_threads({args.threads})")
    print(f"forward{' and forward + backward' if args.backward else ''}, J={args.J}, L={args.L}, input (B, 3, N, N) "
          f"float32, device {args.device}; median of {args.repeats} calls per variant (kymatio: {krep}), "
          f"interleaved, after one full-batch warm-up; (spread) = (max − min) / median, ! above "
          f"{SPREAD_FLAG:.0%}")
    if kmax and not args.no_kymatio and max(args.batches) > kmax:
        print(f"kymatio is timed at batch {kmax} where B is larger (--kymatio-max-batch, to save time: its "
              f"cost is linear in the batch); the tables say where")
    if min(args.repeats, krep) < 5:
        print("note: fewer than 5 calls per variant: the spread is a weak check")
    print(flush=True)

    rows, bwd_rows = [], []
    for size in args.sizes:
        for batch in args.batches:
            kb = min(batch, kmax) if kmax else batch
            specs: dict[str, dict] = {}  # in the order they are timed in each round
            if not args.no_kymatio:
                specs["kymatio"] = dict(backend="kymatio", batch=kb)
            specs["fast"] = dict(backend="fast", batch=batch)
            if args.backward:
                if not args.no_kymatio:
                    specs["kymatio f+b"] = dict(backend="kymatio", batch=kb, backward=True)
                specs["fast f+b autograd"] = dict(backend="fast-autograd", batch=batch, backward=True)
                specs["fast f+b custom"] = dict(backend="fast", batch=batch, backward=True)
            lowp = ("tf32", "bf16") if cuda and not args.no_lowp else ()
            for variant in lowp:
                specs[variant] = dict(backend="fast", batch=batch, variant=variant, check_error=True)
            workers = {}
            try:
                for key, spec in specs.items():
                    workers[key] = Worker(args, f"{key} N={size} B={spec['batch']}", size=size, **spec)
            except BaseException:
                for w in workers.values():
                    w.close()
                raise
            res = measure_group(workers, {k: krep if k.startswith("kymatio") else args.repeats for k in specs},
                                optional=set(lowp))
            kym = res.get("kymatio")
            rows.append((size, batch, "fp32", kb, kym, res["fast"]))
            if args.backward:
                bwd_rows.append((size, batch, kb, kym, res["fast"], res.get("kymatio f+b"), res["fast f+b autograd"],
                                 res["fast f+b custom"]))
            rows += [(size, batch, v, kb, kym, res[v]) for v in lowp if v in res]
            print(f"  done N={size} B={batch}", file=sys.stderr, flush=True)

    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    mem = "GPU peak alloc (MiB)" if cuda else "peak RSS growth (MiB)"
    flagged = {id(r): r for row in rows for r in row[4:] if r and r["spread"] > SPREAD_FLAG}
    print("images/s of the median call (spread); ratios fast / kymatio of the medians\n")
    print(f"| N | B | variant | kymatio img/s | fast img/s | fast / kymatio | kymatio {mem} | fast {mem} | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, batch, variant, kb, kym, fast in rows:
        sub = f", B={kb}" if kym and kb != batch else ""
        err = f"{fast['max_rel_err']:.1e}" if "max_rel_err" in fast else "-"
        print(f"| {size} | {batch} | {variant} | {cell(kym, sub)} | {cell(fast)} | {ratio(fast, kym)} | "
              f"{mib(kym['peak_mem_bytes']) + sub if kym else '-'} | {mib(fast['peak_mem_bytes'])} | {err} |")
    if bwd_rows:
        print("\nForward (fwd) and forward + backward (f+b) of ‖S x‖², images/s (spread); ratios fast / kymatio:")
        print("| N | B | kymatio fwd | fast fwd | fwd ratio | kymatio f+b | fast f+b autograd | fast f+b custom | "
              "autograd ratio | custom ratio | autograd f+b " + mem + " | custom f+b " + mem + " |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for size, batch, kb, kym, fast, kym_b, plain, custom in bwd_rows:
            sub = f", B={kb}" if kb != batch else ""
            flagged.update({id(r): r for r in (kym_b, plain, custom) if r and r["spread"] > SPREAD_FLAG})
            print(f"| {size} | {batch} | {cell(kym, sub)} | {cell(fast)} | {ratio(fast, kym)} | "
                  f"{cell(kym_b, sub)} | {cell(plain)} | {cell(custom)} | {ratio(plain, kym_b)} | "
                  f"{ratio(custom, kym_b)} | {mib(plain['peak_mem_bytes'])} | {mib(custom['peak_mem_bytes'])} |")
    if flagged:
        print(f"\n! {len(flagged)} measurement(s) spread above {SPREAD_FLAG:.0%}: something else took the processor "
              f"during some calls; rerun on a quiet machine, raise --repeats, or try --threads 1")
    else:
        print(f"\nevery measurement spread at most {SPREAD_FLAG:.0%}")
    if cuda and not args.no_lowp:
        print("\nLow-precision variants are recommended only where max rel err <= 1e-3:")
        for size, batch, variant, _, _, fast in rows:
            if variant != "fp32":
                ok = fast["max_rel_err"] <= 1e-3
                print(f"  N={size} B={batch} {variant}: {'OK' if ok else 'NOT recommended'} "
                      f"(max rel err {fast['max_rel_err']:.1e})")


if __name__ == "__main__":
    main()
