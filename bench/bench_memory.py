"""Peak memory of making a GPTQ candidate of the default model, with the baseline loaded in fp32
and in bf16 (quality_gate.verified_against), each in a fresh process, from two checkpoints: the
packaged default (a Q4_1 GGUF dequantized to a float32 safetensors cache) and a bf16 safetensors
copy of it (what a bf16 release is; made once under the quantgate cache).

For each row it prints: the model's parameter bytes; how far loading raised the peak resident
memory above the process before it (load +MB: a float32 copy made on the way shows here); the
resident memory before make_candidate (weights paged in, kernels warmed up on a 2-layer model);
the peak while make_candidate runs (a copy of the baseline, then the layer-by-layer driver:
methods/calibrate.py); and the driver's working set — that peak minus the memory before it and
the copy — beside the formula the calibrate module states. Peaks are the process's VmHWM, reset
(/proc/self/clear_refs) before each phase.

    python bench/bench_memory.py                          # 128 windows of 256 tokens (the default)
    python bench/bench_memory.py --samples 8 --seq-len 64 # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODEL = "smollm2-135m-instruct"


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def driver_formula(cfg, samples: int, seq_len: int, elem: int, micro_batch: int) -> int:
    """The calibrate module's formula for GPTQ on a Llama-layout block, bytes."""
    d, inter, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or d // heads
    activations = 2 * samples * seq_len * d * elem
    hessians = 4 * (d * d + (heads * hd) ** 2 + d * d + inter * inter)  # qkv, o, gate/up, down groups
    micro = micro_batch * seq_len * max(d, inter) * elem * 3 + micro_batch * heads * seq_len * seq_len * elem
    weight = 3 * max(inter * d, d * d) * 4
    return activations + hessians + micro + weight


def _warm_up(config, precision: str) -> None:
    """GPTQ once on a 2-layer model of the same kind and width (random weights), so that code
    pages and allocator pools that the first run brings in are resident before measuring."""
    import copy

    import torch
    import transformers

    from quantgate.methods.apply import make_candidate
    from quantgate.methods.calibrate import CalibrationSet
    from quantgate.methods.registry import candidate
    from quantgate.models.arch import arch_for
    from quantgate.models.load import PRECISIONS

    small = copy.deepcopy(config)
    small.num_hidden_layers, small.vocab_size = 2, 512
    model = transformers.AutoModelForCausalLM.from_config(small).to(PRECISIONS[precision]).eval()
    windows = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    make_candidate(model, arch_for(model), candidate(method="gptq", bits=4, group_size=64),
                   CalibrationSet(windows, "warm-up", "-"))


def bf16_checkpoint() -> str:
    """A bf16 safetensors copy of the default model (made once, beside the cached models)."""
    import torch

    from quantgate.models.load import cache_root, load_baseline

    folder = cache_root() / "bench" / f"{MODEL}-bf16"
    if not (folder / "model.safetensors").is_file():
        base = load_baseline(MODEL)
        base.model.to(torch.bfloat16).save_pretrained(folder)
        base.tokenizer.save_pretrained(folder)
    return str(folder)


def child(base: str, precision: str, samples: int, seq_len: int) -> dict:
    import torch

    from quantgate.config import CalibrationConfig
    from quantgate.methods.apply import make_candidate
    from quantgate.methods.calibrate import MICRO_BATCH, calibration_set
    from quantgate.methods.registry import candidate
    from quantgate.models.load import load_baseline

    torch.set_num_threads(1)
    _reset_peak()
    before_load = _rss("VmRSS")
    baseline = load_baseline(base, precision)
    load_peak = _rss("VmHWM")
    params = {id(p): p for p in baseline.model.parameters()}.values()
    model_bytes = sum(p.numel() * p.element_size() for p in params)
    for p in params:  # page in weights a memory-mapped checkpoint has not read yet
        p.detach().sum()
    calib = calibration_set(baseline.tokenizer, CalibrationConfig(samples=samples, seq_len=seq_len), [])
    _warm_up(baseline.model.config, precision)  # libraries and kernels loaded on first use are not the driver's
    before = _rss("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    make_candidate(baseline.model, baseline.arch, candidate(method="gptq", bits=4, group_size=64), calib)
    seconds = time.perf_counter() - t0
    peak = _rss("VmHWM")
    elem = next(iter(params)).element_size()
    return dict(precision=precision, model_bytes=model_bytes, load_growth=load_peak - before_load, before=before,
                make_peak=peak, driver=peak - before - model_bytes,
                formula=driver_formula(baseline.model.config, samples, seq_len, elem, MICRO_BATCH),
                seconds=seconds, load=os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--checkpoints", nargs="+", default=["fp32", "bf16"], help="fp32: the packaged default's "
                    "float32 cache; bf16: a bf16 safetensors copy")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.samples, args.seq_len)))
        return
    mb = 1e6
    print(f"GPTQ w4 g64 on {MODEL}: {args.samples} calibration windows of {args.seq_len} tokens, 1 thread")
    print(f"{'checkpoint':>10} {'precision':>9} {'params MB':>9} {'load +MB':>8} {'RSS before':>10} {'make peak':>9} "
          f"{'driver MB':>9} {'formula MB':>10} {'seconds':>7}  load average")
    for checkpoint in args.checkpoints:
        base = MODEL if checkpoint == "fp32" else bf16_checkpoint()
        for precision in args.precisions:
            _row(checkpoint, base, precision, args)


def _row(checkpoint: str, base: str, precision: str, args: argparse.Namespace) -> None:
    mb = 1e6
    out = subprocess.run([sys.executable, __file__, "--child", base, precision, "--samples", str(args.samples),
                          "--seq-len", str(args.seq_len)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{checkpoint:>10} {r['precision']:>9} {r['model_bytes'] / mb:>9.1f} {r['load_growth'] / mb:>8.1f} "
          f"{r['before'] / mb:>10.1f} "
          f"{r['make_peak'] / mb:>9.1f} {r['driver'] / mb:>9.1f} {r['formula'] / mb:>10.1f} {r['seconds']:>7.1f}  "
          + " ".join(f"{x:.2f}" for x in r["load"]))


if __name__ == "__main__":
    main()
