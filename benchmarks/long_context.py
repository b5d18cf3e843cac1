"""Long context: the longest sequence a LoRA sft trains under a fixed memory cap per process, with sequence
parallelism off (N = 1: one process) and on (N processes sharing each row through DeepSpeed's Ulysses; N = the
smallest > 1 the model's heads allow: 2 for the quick model, 3 for SmolLM2-135M, whose 9 query / 3 key-value heads
Ulysses cannot split in 2), and the tokens/s of both at a length both can do.

    python -m benchmarks.long_context                 # SmolLM2-135M (make demo-model), cap 3 GiB a process
    python -m benchmarks.long_context --quick         # the tests' tiny random model: checks the script runs
    python -m benchmarks.long_context --cap-gb 4 --zero 3
    python -m benchmarks.long_context --lengths 2048 --sizes 1,3   # fixed probes, no search
    python -m benchmarks.long_context --tiled-mlp     # tiled_mlp: true in both (model/tiled_mlp.py)

Every run is the same YAML launched by the DeepSpeed launcher on CPU (gloo), ZeRO-2 by default (--zero 3), with
`--num_gpus N` and `sequence_parallel_size: N`: sft, LoRA, one example a step, padding-free, 2 steps, the example a
single long text (the demo set's answers concatenated) cut at the probed `cutoff_len`, so each step trains exactly
that many tokens. Gradient checkpointing is off in both (the row's activations are what sequence parallelism
divides). A run fits when it trains and the peak RSS of each of its processes (VmHWM, read by the process itself at
exit) stays under the cap; a run above it does not count, and one that passes the cap by KILL_MARGIN_GB is stopped
there (its peak is then the size it had reached).

The search per N: lengths double from --start until one does not fit, then --bisect halvings of the gap between
the last that fit and the first that did not (lengths on a multiple of 64). N > 1 starts at the longest length
N = 1 fit, so its first probe is the length both do and its tokens/s is measured there.
tokens/s = tokens trained (2 steps x length) / the HF Trainer's train_runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
MULTIPLE = 64
KILL_MARGIN_GB = 0.5  # a probe is stopped this far over the cap (it does not fit already)

# Runs launch/train.py in the worker and writes this process's peak RSS (VmHWM) at exit, one file a rank.
DRIVER = """
import atexit, os, runpy, sys
sys.path.insert(0, {root!r})

def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            kib = int(line.split()[1])
            rank = os.environ.get("RANK", "0")
            with open(os.path.join({rss_dir!r}, "rank" + rank), "w") as f:
                f.write(str(kib))

atexit.register(_peak)
_exit = os._exit

def _exit_after_peak(code):  # zerotune's distributed workers leave by os._exit, past atexit (trainer/cli.py)
    _peak()
    _exit(code)

os._exit = _exit_after_peak
sys.argv = [{script!r}] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass
class Probe:
    n: int
    length: int
    fits: bool
    peak_rss_gb: float | None  # the highest of the processes' peaks
    tokens_per_second: float | None
    wall_s: float
    error: str = ""


def search(fits: Callable[[int], bool], start: int, limit: int, bisect: int, multiple: int = MULTIPLE) -> int:
    """The longest length (a multiple of `multiple`, at most `limit`) that fits: doubling from `start` until one does
    not fit, then `bisect` halvings of the gap. 0 when even `start` does not fit."""
    best, bad = 0, None
    length = start
    while length <= limit:
        if not fits(length):
            bad = length
            break
        best = length
        if length == limit:
            break
        length = min(length * 2, limit)
    if bad is None or best == 0:
        return best
    for _ in range(bisect):
        mid = (best + bad) // 2 // multiple * multiple
        if mid <= best or mid >= bad:
            break
        if fits(mid):
            best = mid
        else:
            bad = mid
    return best


def table(n1: int, n2: int, at: int, speed1: float | None, speed2: float | None, cap: float, sp: int = 2) -> str:
    """The markdown table of the two searches (N = 1 and N = sp)."""
    ratio = f"{n2 / n1:.2f}x" if n1 else "?"
    fmt = (lambda s: f"{s:.1f}" if s else "?")
    return ("| sequence_parallel_size | processes | longest length under "
            f"{cap:g} GiB a process | vs N = 1 | tokens/s at {at} |\n|---|---|---|---|---|\n"
            f"| 1 | 1 | {n1} | 1.00x | {fmt(speed1)} |\n"
            f"| {sp} | {sp} | {n2} | {ratio} | {fmt(speed2)} |\n")


def probe_table(probes: list[Probe], cap: float) -> str:
    """Every probe as a markdown row."""
    rows = [f"| {p.n} | {p.length} | {'yes' if p.fits else 'no'} | "
            f"{'?' if p.peak_rss_gb is None else f'{p.peak_rss_gb:.2f}'} | "
            f"{'?' if p.tokens_per_second is None else f'{p.tokens_per_second:.1f}'} |" for p in probes]
    return (f"| sequence_parallel_size | length | fits {cap:g} GiB | peak RSS GiB (highest process) | tokens/s |\n"
            "|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def smallest_degree(model_dir: str) -> int:
    """The smallest sequence_parallel_size > 1 the model's heads allow (Ulysses splits the heads: SmolLM2-135M's 9
    query / 3 key-value heads allow 3 and 9, not 2)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    return next(d for d in range(2, heads + 1) if heads % d == 0 and (kv % d == 0 or d % kv == 0))


def long_text(model_dir: str, tokens: int) -> str:
    """The demo set's answers concatenated until the text is at least `tokens` tokens long."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = json.loads((ROOT / "examples/data/alpaca_en_demo.json").read_text())
    parts, count = [], 0
    while count < tokens:
        for row in rows:
            parts.append(row["output"])
            count += len(tok(row["output"] + "\n\n")["input_ids"])
            if count >= tokens:
                break
    return "\n\n".join(parts)


def write_data(folder: Path, model_dir: str, tokens: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = long_text(model_dir, tokens)
    row = {"instruction": "Continue.", "input": "", "output": text}
    (folder / "long.json").write_text(json.dumps([row] * (STEPS + 2)))
    (folder / "dataset_info.json").write_text(json.dumps({"long": {"file_name": "long.json"}}))
    return folder


def group_rss_gb(pgid: int) -> float:
    """The largest resident set (GiB) among the live processes of a process group."""
    largest = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    largest = max(largest, int(line.split()[1]))
        except (OSError, ValueError, IndexError):  # the process ended while being read
            continue
    return largest / 2**20


def watch(proc: subprocess.Popen, stop_gb: float) -> float | None:
    """Waits for the probe; stops its whole process group once a process passes stop_gb (a run far over the cap
    is a 'does not fit' already, and N processes each far over it could exhaust a shared machine's memory).
    The size it passed, or None when it ended by itself."""
    import signal

    while proc.poll() is None:
        rss = group_rss_gb(proc.pid)
        if rss > stop_gb:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return rss
        time.sleep(0.5)
    return None


def probe(n: int, length: int, cfg: dict, work: Path, cap_gb: float) -> Probe:
    import yaml

    run = work / f"n{n}-{length}"
    rss_dir = run / "rss"
    rss_dir.mkdir(parents=True, exist_ok=True)
    driver = run / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), rss_dir=str(rss_dir), script=str(ROOT / "launch/train.py")))
    out = run / "out"
    cfg = {**cfg, "cutoff_len": length, "output_dir": str(out), "sequence_parallel_size": n}
    (run / "run.yaml").write_text(yaml.safe_dump(cfg))
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ZEROTUNE_CACHE": str(work / "cache")}
    start = time.time()
    log = run / "log.txt"
    with open(log, "w") as sink:
        proc = subprocess.Popen([launcher, "--num_gpus", str(n), "--master_port", str(29700 + os.getpid() % 500),
                                 str(driver), "--config", str(run / "run.yaml")], cwd=ROOT, stdout=sink,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        over = watch(proc, cap_gb + KILL_MARGIN_GB)
    wall = time.time() - start
    if over:
        return Probe(n, length, False, over, None, wall, f"stopped: a process passed {over:.2f} GiB")
    peaks = [int(f.read_text()) / 2**20 for f in rss_dir.iterdir()]
    peak = max(peaks) if len(peaks) == n else None
    if proc.returncode or peak is None:
        tail = log.read_text()[-1500:]
        return Probe(n, length, False, peak, None, wall, f"exit {proc.returncode}: {tail}")
    runtime = json.loads((out / "train_results.json").read_text())["train_runtime"]
    return Probe(n, length, peak <= cap_gb, peak, STEPS * length / runtime, wall)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tests' tiny random model, a low cap")
    parser.add_argument("--cap-gb", type=float, default=None, help="peak RSS cap per process, GiB (default 3; "
                                                                   "quick: 0.65)")
    parser.add_argument("--start", type=int, default=None, help="first length probed (default 512; quick 256)")
    parser.add_argument("--limit", type=int, default=None, help="longest length probed (default 16384; quick 8192)")
    parser.add_argument("--bisect", type=int, default=2, help="halvings after the doubling (default 2)")
    parser.add_argument("--zero", type=int, choices=(2, 3), default=2, help="ZeRO stage (default 2)")
    parser.add_argument("--lengths", default="", help="comma list: probe only these lengths (no search), at --sizes")
    parser.add_argument("--sizes", default="", help="with --lengths: the sequence_parallel_size values (default 1 and "
                                                    "--sp)")
    parser.add_argument("--sp", type=int, default=None, help="N compared with 1 (default: the smallest the model's "
                                                              "heads allow: 2 for the quick model, 3 for SmolLM2)")
    parser.add_argument("--tiled-mlp", action="store_true", help="tiled_mlp: true in every run, both N (the MLP's "
                                                                      "intermediates one shard at a time)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    cap = args.cap_gb or (0.65 if args.quick else 3.0)
    start = args.start or (256 if args.quick else 512)
    limit = args.limit or (8192 if args.quick else 16384)

    sys.path.insert(0, str(ROOT))
    from benchmarks.throughput import benchmark_model, cpu_precision_line
    from trainer.engine.hardware import cpu_supports_bf16

    work = Path(tempfile.mkdtemp(prefix="zerotune-long-"))
    model_dir = benchmark_model(args.quick, work)
    bf16 = cpu_supports_bf16()
    sp = args.sp or smallest_degree(model_dir)
    data = write_data(work / "data", model_dir, limit + 256)
    cfg = {"model_name_or_path": model_dir, "stage": "sft", "do_train": True, "finetuning_type": "lora",
           "lora_target": "all", "dataset": "long", "dataset_dir": str(data), "template": "chatml",
           "packing": False, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
           "max_steps": STEPS, "learning_rate": 1e-4, "bf16": bf16, "gradient_checkpointing": False,
           "deepspeed": str(ROOT / f"ds_configs/ds_z{args.zero}_config.json"), "overwrite_output_dir": True,
           "overwrite_cache": True, "report_to": "none", "disable_tqdm": True, "save_strategy": "no",
           "logging_steps": 1, **({"tiled_mlp": True} if args.tiled_mlp else {})}
    precision = cpu_precision_line(bf16)
    load = os.getloadavg()[0]
    print(precision, file=sys.stderr)
    print(f"load average at start: {load:.1f} on {os.cpu_count()} CPUs; cap {cap:g} GiB a process; ZeRO-{args.zero}; "
          f"N = 1 against N = {sp} (the smallest the model's heads allow); tiled MLP "
          f"{'on' if args.tiled_mlp else 'off'}", file=sys.stderr)

    probes: list[Probe] = []

    def fits(n: int) -> Callable[[int], bool]:
        def run(length: int) -> bool:
            p = probe(n, length, cfg, work, cap)
            probes.append(p)
            print(f"N={n} length {length}: {'fits' if p.fits else 'does not fit'} (peak "
                  f"{p.peak_rss_gb if p.peak_rss_gb is None else round(p.peak_rss_gb, 2)} GiB, "
                  f"{p.tokens_per_second and round(p.tokens_per_second, 1)} tokens/s, {p.wall_s:.0f} s)"
                  + (f"\n{p.error}" if p.error else ""), file=sys.stderr)
            return p.fits
        return run

    began = time.time()
    if args.lengths:  # fixed probes, e.g. to finish a search cut short on a busy machine
        for n in (int(v) for v in (args.sizes or f"1,{sp}").split(",")):
            for length in (int(v) for v in args.lengths.split(",")):
                fits(n)(length)
        print(probe_table(probes, cap))
        return 0
    n1 = search(fits(1), start, limit, args.bisect)
    n2 = search(fits(sp), max(n1, start), limit, args.bisect) if n1 else 0
    at = n1 or start

    def speed(n: int) -> float | None:
        return next((p.tokens_per_second for p in probes if p.n == n and p.length == at and p.fits), None)

    md = (f"{precision}\n\nLoad average at start {load:.1f} on {os.cpu_count()} CPUs; ZeRO-{args.zero}; "
          f"tiled MLP {'on' if args.tiled_mlp else 'off'}; "
          f"{'quick: tiny random model' if args.quick else 'SmolLM2-135M'}; {time.time() - began:.0f} s.\n\n"
          + table(n1, n2, at, speed(1), speed(sp), cap, sp) + "\n" + probe_table(probes, cap))
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_context.md").write_text(md)
    (out / "long_context.json").write_text(json.dumps(
        {"cap_gb": cap, "zero": args.zero, "quick": args.quick, "bf16": bf16, "tiled_mlp": args.tiled_mlp,
         "load_average": load,
         "longest": {"1": n1, str(sp): n2}, "compared_at": at, "probes": [asdict(p) for p in probes]}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
