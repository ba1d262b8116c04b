"""Core benchmark: compress / reconstruct against the I/O floor and a dense baseline.

Builds a Llama-2-7B-shaped PEFT LoRA adapter (r=16, fp16; q,k,v,o 4096x4096, gate,up 11008x4096,
down 4096x11008 in every layer; about 80 MB for 32 layers) in a temporary directory and, in one
run, measures

  io floor     safetensors load_file + save_file of the same adapter file (and + fsync)
  f64 floor    read every factor, widen to float64, form BᵀB and AAᵀ (+ UᵀB, AVᵀ for random
               outers) on compress's threads, stacked like compress: the arithmetic no float64
               method can skip
  compress     lora_convert.compress + lora_convert.save, outer svd and outer random
  reconstruct  lora_convert.load + reconstruct + save_adapter, from each compressed file
  cli          `lora-convert compress ... --outer random` once (wall clock, start-up included)
  baseline     materialise ΔW = B @ A (float32) + full torch.linalg.svd on one module of each
               shape, extrapolated to every module of the adapter

Every run is a fresh subprocess. Time is the operation alone (imports excluded), best of
--repeats, the operations taking turns so that load spikes on a shared machine hit all of them.
Peak RSS is the process's high-water mark above its own RSS right after importing torch +
lora_convert (Linux: the mark is reset there through /proc/self/clear_refs, so nothing from the
imports can hide the operation's memory). Everything except the baseline also runs on a
--small-layers adapter: memory streamed per module does not grow with the adapter.

    python benchmarks/bench_core.py --out benchmarks/results/core.txt
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 1e6
WEIGHTS = "adapter_model.safetensors"

# Llama-2-7B: hidden 4096, intermediate 11008. (out_features, in_features) of each target module.
SHAPES = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}
RANK, ALPHA = 16, 32
RANDOM_OUTER_DIM = 64  # lora_convert's default --outer-dim
BASELINE_SAMPLE = ["self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"]  # one module per shape
TARGET_VS_FLOOR, TARGET_SPEEDUP = 3.0, 100.0

OPERATIONS = [  # (result key, label)
    ("io_floor", "io floor: load_file + save_file"),
    ("io_floor_fsync", "io floor + fsync"),
    ("f64_floor", "float64 floor (c)"),
    ("f64_floor_random", "float64 floor + UᵀB, AVᵀ (c)"),
    ("compress_svd", "compress --outer svd"),
    ("compress_random", "compress --outer random"),
    ("reconstruct_svd", "reconstruct (svd file)"),
    ("reconstruct_random", "reconstruct (random file)"),
]


# ----------------------------------------------------------------------------- the adapter

def key(layer: int, module: str, factor: str) -> str:
    return f"base_model.model.model.layers.{layer}.{module}.lora_{factor}.weight"


def build_adapter(path: Path, layers: int, seed: int = 0) -> int:
    """Write a PEFT adapter directory with random fp16 factors; returns the weights file size."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    decay = torch.exp(-torch.arange(RANK, dtype=torch.float32) / 4)  # decaying spectrum of B @ A
    tensors = {}
    for layer in range(layers):
        for module, (out_f, in_f) in SHAPES.items():
            tensors[key(layer, module, "A")] = (torch.randn(RANK, in_f, generator=gen) / in_f**0.5).half()
            tensors[key(layer, module, "B")] = (torch.randn(out_f, RANK, generator=gen) * 0.02 * decay).half()
    path.mkdir(parents=True)
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
              "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": sorted(m.split(".")[-1] for m in SHAPES), "use_rslora": False,
              "modules_to_save": None, "inference_mode": True}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return (path / WEIGHTS).stat().st_size


# ----------------------------------------------------------------------------- worker (child process)

def _proc_status(field: str) -> int | None:
    """A field of /proc/self/status in bytes (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _maxrss_bytes(usage) -> int:
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def _reset_peak() -> int:
    """Reset the RSS high-water mark to the current RSS (Linux) and return the new baseline."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status("VmRSS")
    except OSError:
        return _maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF))


def _peak() -> int:
    return _proc_status("VmHWM") or _maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF))


def run_operation(job: dict) -> dict:
    """Run one operation in this fresh process; time it and measure its peak RSS."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    import lora_convert.api as lc

    op, src, dst = job["op"], Path(job.get("src", ".")), Path(job.get("dst", "."))
    if op == "build":
        return {"bytes": build_adapter(dst, job["layers"])}
    if op.startswith("f64_floor"):
        floor_job = _f64_floor_job(src, random_outers=op.endswith("random"))
    base = _reset_peak()
    wall, cpu = time.perf_counter(), time.process_time()
    if op == "noop":
        pass
    elif op.startswith("f64_floor"):
        floor_job()
    elif op.startswith("io_floor"):
        save_file(load_file(src / WEIGHTS), dst / WEIGHTS)
        if op == "io_floor_fsync":
            fd = os.open(dst / WEIGHTS, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    elif op.startswith("compress_"):
        lc.save(lc.compress(lc.load_adapter(src), outer=op.removeprefix("compress_")), dst)
    elif op == "reconstruct":
        lc.save_adapter(lc.reconstruct(lc.load(src)), dst)
    elif op == "baseline":
        dtype = getattr(torch, job["dtype"])
        with safe_open(src / WEIGHTS, framework="pt") as fh:
            A = fh.get_tensor(key(0, job["module"], "A")).to(dtype)
            B = fh.get_tensor(key(0, job["module"], "B")).to(dtype)
        torch.linalg.svd(B @ A, full_matrices=False)
    else:
        raise ValueError(f"unknown operation {op!r}")
    return {"seconds": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
            "base_rss": base, "peak_above": _peak() - base,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def _f64_floor_job(src: Path, random_outers: bool):
    """The float64 work any method that works from the factors must do, done as cheaply as this
    machine allows and on compress's threads: read every factor, widen it to float64 and form
    BᵀB and AAᵀ; with `random_outers` also the projections UᵀB, AVᵀ onto a-column outers
    (generated before the clock starts). Same-shaped modules of a window are stacked, so each
    product is one large BLAS call, into buffers reused from window to window."""
    import torch

    from lora_convert.adapter import ordered_map
    from lora_convert.convert import WINDOW, _widen as widen, workers  # compress's own reused buffers
    from lora_convert.st import LazyTensors

    lazy = LazyTensors(src / WEIGHTS)
    names = sorted({k.rsplit(".lora_", 1)[0] for k in lazy.keys()})
    dims = {d for shape in SHAPES.values() for d in shape}
    outers = {d: torch.randn(d, RANDOM_OUTER_DIM, dtype=torch.float64) for d in dims} if random_outers else {}

    def stack(window: list[str]):
        B = [lazy.get(f"{n}.lora_B.weight") for n in window]
        A = [lazy.get(f"{n}.lora_A.weight") for n in window]
        Bt, A = widen("B", [b.T for b in B]), widen("A", A)
        products = [torch.bmm(Bt, Bt.transpose(1, 2)), torch.bmm(A, A.transpose(1, 2))]
        if outers:
            n, r, out_f = Bt.shape
            products += [Bt.reshape(n * r, out_f) @ outers[out_f], A.reshape(n * r, -1) @ outers[A.shape[2]]]
        return products

    def one(window: list[str]):
        by_shape: dict = {}
        for n in window:
            by_shape.setdefault((lazy.shape(f"{n}.lora_B.weight"), lazy.shape(f"{n}.lora_A.weight")), []).append(n)
        return [stack(group) for group in by_shape.values()]

    def run():
        for _ in ordered_map(one, [names[i:i + WINDOW] for i in range(0, len(names), WINDOW)], workers()):
            pass
    return run


# ----------------------------------------------------------------------------- driver

def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_child(job: dict) -> dict:
    """One operation in a fresh subprocess (its output path cleared first).

    Adds `maxrss`, the child's ru_maxrss from wait4. That is only meaningful because this
    driver never imports torch: a child's ru_maxrss also counts its parent's RSS at fork.
    """
    if "dst" in job:
        _remove(Path(job["dst"]))
        if job["op"].startswith("io_floor"):
            Path(job["dst"]).mkdir(parents=True)
    result = spawn([sys.executable, __file__, "--worker", json.dumps(job)])
    out = json.loads(result.pop("stdout").strip().splitlines()[-1])
    return {**out, **result}


def spawn(cmd: list[str]) -> dict:
    """Run `cmd`; its wall time, ru_maxrss (bytes) and stdout. Raises on failure."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=_child_env(), stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4, not wait: the child's own rusage
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{err.read()[-3000:]}")
        return {"wall": seconds, "maxrss": _maxrss_bytes(usage), "stdout": out.read()}


def measure(jobs: dict[str, dict], repeats: int) -> dict:
    """Each job `repeats` times, round-robin; best wall and CPU time, largest peak."""
    runs = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            runs[name].append(run_child(job))
    return {name: {"seconds": min(r["seconds"] for r in rs), "cpu": min(r["cpu"] for r in rs),
                   "peak_above": max(r["peak_above"] for r in rs), "base_rss": min(r["base_rss"] for r in rs),
                   "maxrss": min(r["maxrss"] for r in rs), "torch": rs[0]["torch"], "threads": rs[0]["threads"]}
            for name, rs in runs.items()}


def suite(src: Path, work: Path, repeats: int) -> dict:
    """The streamed operations (OPERATIONS) on one adapter."""
    jobs = {"noop": {"op": "noop"},
            "io_floor": {"op": "io_floor", "src": str(src), "dst": str(work / "io")},
            "io_floor_fsync": {"op": "io_floor_fsync", "src": str(src), "dst": str(work / "io")},
            "f64_floor": {"op": "f64_floor", "src": str(src)},
            "f64_floor_random": {"op": "f64_floor_random", "src": str(src)}}
    for outer in ("svd", "random"):
        mini = str(work / f"mini-{outer}")
        jobs[f"compress_{outer}"] = {"op": f"compress_{outer}", "src": str(src), "dst": mini}
        jobs[f"reconstruct_{outer}"] = {"op": "reconstruct", "src": mini, "dst": str(work / f"restored-{outer}")}
    return measure(jobs, repeats)


def baseline(src: Path, layers: int, dtype: str) -> dict:
    """Dense ΔW + SVD on one module per shape (one run each), extrapolated to all modules."""
    sample = {m: run_child({"op": "baseline", "src": str(src), "module": m, "dtype": dtype})
              for m in BASELINE_SAMPLE}
    by_shape = {SHAPES[m]: r["seconds"] for m, r in sample.items()}
    total = layers * sum(by_shape[shape] for shape in SHAPES.values())
    return {"sample": sample, "seconds": total, "peak_above": max(r["peak_above"] for r in sample.values())}


def cli_compress(src: Path, dst: Path, idle_maxrss: int) -> dict:
    """One `lora-convert compress` process: wall clock (start-up included); peak RSS = its
    ru_maxrss minus `idle_maxrss`, that of a process that only imports torch + lora_convert."""
    exe = shutil.which("lora-convert")
    _remove(dst)
    run = spawn(([exe] if exe else [sys.executable, "-m", "lora_convert.cli"])
                + ["compress", str(src), "-o", str(dst), "--outer", "random"])
    return {"seconds": run["wall"], "peak_above": run["maxrss"] - idle_maxrss,
            "command": "lora-convert compress <adapter> -o <out> --outer random"}


# ----------------------------------------------------------------------------- report

def _code_version() -> str:
    import lora_convert

    return f"lora_convert {lora_convert.__version__}"


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def render(args, env: dict, sizes: dict, results: dict, base: dict, cli: dict) -> str:
    small, big = args.small_layers, args.layers
    per_layer = len(SHAPES)
    largest_factors = max((o + i) * RANK * 2 for o, i in SHAPES.values())  # fp16 A + B
    # What compress holds for one module in float64: A, B and the outers U (out x a), V (b x in).
    working_set = {outer: max((o + i) * (RANK + a) * 8 for o, i in SHAPES.values())
                   for outer, a in (("svd", RANK), ("random", RANDOM_OUTER_DIM))}
    largest_delta = max(o * i for o, i in SHAPES.values()) * {"float32": 4, "float64": 8}[args.baseline_dtype]
    r = results[big]
    lines = [
        "lora_convert core benchmark",
        f"adapter    Llama-2-7B-shaped PEFT LoRA, r={RANK}, fp16; per layer q,k,v,o 4096x4096, "
        "gate,up 11008x4096, down 4096x11008",
        f"           {big} layers: {big * per_layer} modules, {sizes[big] / MB:.1f} MB;  "
        f"{small} layers: {small * per_layer} modules, {sizes[small] / MB:.1f} MB",
        f"largest    one module's factors (A+B fp16): {largest_factors / MB:.2f} MB;  "
        f"one dense ΔW (11008x4096 {args.baseline_dtype}): {largest_delta / MB:.1f} MB",
        f"           one module's float64 working set (A, B, U, V): {working_set['svd'] / MB:.1f} MB with svd "
        f"outers (a=b={RANK}), {working_set['random'] / MB:.1f} MB with random outers (a=b={RANDOM_OUTER_DIM})",
        f"machine    {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, python "
        f"{platform.python_version()}, torch {r['noop']['torch']} ({r['noop']['threads']} threads); "
        f"load average {env['load_before']:.1f} at start, {env['load_after']:.1f} at end",
        f"code       {env['revision']}",
        f"method     fresh subprocess per run; time = the operation only, best of {args.repeats} (wall) and",
        "           best CPU time (user+sys, all threads); peak = RSS high-water mark above the process's RSS",
        "           after importing torch + lora_convert "
        f"(that baseline: {r['noop']['base_rss'] / MB:.0f} MB)",
        "",
        f"{'':<34}{f'--- {small} layers ---':>32}{f'--- {big} layers ---':>32}",
        f"{'operation':<34}" + f"{'wall':>10}{'cpu':>10}{'peak RSS':>12}" * 2,
    ]
    for op, label in OPERATIONS:
        cells = "".join(f"{x['seconds']:>9.2f}s{x['cpu']:>9.2f}s{x['peak_above'] / MB:>9.1f} MB"
                        for x in (results[small][op], r[op]))
        lines.append(f"{label:<34}{cells}")
    lines.append(f"{'CLI compress --outer random (a)':<34}{'':>32}{cli['seconds']:>9.2f}s{'':>10}"
                 f"{cli['peak_above'] / MB:>9.1f} MB")
    lines.append(f"{f'baseline ΔW + SVD, extrapolated (b)':<34}{'':>32}{base['seconds']:>9.0f}s{'':>10}"
                 f"{base['peak_above'] / MB:>9.1f} MB")
    lines += ["",
              f"(a) `{cli['command']}` on the {big}-layer adapter, one run: wall clock",
              "    including interpreter start-up and imports; peak = the process's ru_maxrss minus that of",
              "    a process that only imports torch + lora_convert.",
              f"(b) {args.baseline_dtype} B @ A, then torch.linalg.svd(full_matrices=False); one run per shape, "
              f"x {big} layers:"]
    for m, x in base["sample"].items():
        o, i = SHAPES[m]
        count = sum(1 for s in SHAPES.values() if s == (o, i))
        lines.append(f"    {m:<18} {o:>5}x{i:<5} {x['seconds']:8.2f}s  (x{count} per layer)  "
                     f"peak {x['peak_above'] / MB:.0f} MB")
    lines += ["(c) the float64 work any method working from the factors must do, on compress's worker",
              "    threads: read each factor, widen it to float64, form BᵀB and AAᵀ; the random row adds the",
              f"    projections UᵀB, AVᵀ onto {RANDOM_OUTER_DIM}-column outers. No fit, no output, no checksums.",
              "    Done as cheaply as we know how: same-shaped modules of each window stacked, one BLAS call",
              "    per product, buffers reused (as compress itself works)."]

    floor, floor_fsync = r["io_floor"]["seconds"], r["io_floor_fsync"]["seconds"]
    lines += ["", f"ratios ({big} layers)                                    measured      target"]
    for outer in ("svd", "random"):
        ratio = r[f"compress_{outer}"]["seconds"] / floor
        lines.append(f"  compress {outer:<6} / io floor                    {ratio:9.1f}x      <= {TARGET_VS_FLOOR:.0f}x  "
                     f"{_verdict(ratio <= TARGET_VS_FLOOR)}   (/ floor+fsync: "
                     f"{r[f'compress_{outer}']['seconds'] / floor_fsync:.1f}x)")
    for outer, floor_op in (("svd", "f64_floor"), ("random", "f64_floor_random")):
        ratio = r[f"compress_{outer}"]["seconds"] / r[floor_op]["seconds"]
        lines.append(f"  compress {outer:<6} / its float64 floor (c)         {ratio:9.1f}x      (not a target)")
    for outer, floor_op in (("svd", "f64_floor"), ("random", "f64_floor_random")):
        ratio = r[floor_op]["seconds"] / floor
        label = f"{outer} float64 floor (c)"
        lines.append(f"  {label:<24} / io floor           {ratio:9.1f}x      "
                     "(not a target: the least any float64 method spends)")
    for outer in ("svd", "random"):
        speedup = base["seconds"] / r[f"compress_{outer}"]["seconds"]
        lines.append(f"  baseline / compress {outer:<6} (speedup)         {speedup:9.0f}x      >= "
                     f"{TARGET_SPEEDUP:.0f}x  {_verdict(speedup >= TARGET_SPEEDUP)}")
    for outer in ("svd", "random"):
        peak = r[f"compress_{outer}"]["peak_above"]
        lines.append(f"  compress {outer:<6} peak RSS / one module's factors {peak / largest_factors:7.0f}x"
                     f"      (/ its float64 working set: {peak / working_set[outer]:.1f}x; "
                     f"/ one dense ΔW: {peak / largest_delta:.2f}x)")
    lines += ["", f"peak RSS, {small} -> {big} layers ({big / small:.0f}x the adapter)"]
    for op, label in OPERATIONS:
        a, b = results[small][op]["peak_above"], r[op]["peak_above"]
        lines.append(f"  {label:<34}{a / MB:8.1f} MB -> {b / MB:6.1f} MB  ({(b - a) / MB:+.1f} MB)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32, help="layers of the main adapter (default 32, ~80 MB)")
    p.add_argument("--small-layers", type=int, default=8,
                   help="layers of the second adapter, to show that peak RSS does not grow (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="runs per operation, best time kept (default 3)")
    p.add_argument("--baseline-dtype", choices=["float32", "float64"], default="float32",
                   help="dtype of the dense baseline (default float32: the faster, so the conservative one)")
    p.add_argument("--out", type=Path, help="also write the report to this file")
    p.add_argument("--write-adapter", type=Path, metavar="DIR",
                   help="only write the --layers adapter to DIR (a new directory) and exit, e.g. to time "
                        "`lora-convert compress DIR ...` yourself")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(run_operation(json.loads(args.worker))))
        return
    if args.write_adapter:
        size = build_adapter(args.write_adapter, args.layers)
        print(f"wrote {args.write_adapter / WEIGHTS} ({size / MB:.1f} MB, {args.layers} layers)")
        return

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    env = {"revision": _code_version(), "load_before": os.getloadavg()[0]}
    sizes, results = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_core_") as tmp:
        tmp = Path(tmp)
        for layers in (args.small_layers, args.layers):
            src = tmp / f"adapter-{layers}"
            sizes[layers] = run_child({"op": "build", "dst": str(src), "layers": layers})["bytes"]
            say(f"{layers} layers: adapter {sizes[layers] / MB:.1f} MB; io floor, compress, reconstruct "
                f"x{args.repeats}")
            results[layers] = suite(src, tmp / f"work-{layers}", args.repeats)
        big = tmp / f"adapter-{args.layers}"
        say("CLI compress")
        cli = cli_compress(big, tmp / "cli-mini", results[args.layers]["noop"]["maxrss"])
        say(f"dense baseline on {len(BASELINE_SAMPLE)} modules (minutes)")
        base = baseline(big, args.layers, args.baseline_dtype)
    env["load_after"] = os.getloadavg()[0]

    text = render(args, env, sizes, results, base, cli)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
