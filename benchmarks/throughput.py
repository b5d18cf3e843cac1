"""Throughput and memory, side by side in one run, on the same model, data and machine.

    python -m benchmarks.throughput                 # zerotune matrix on the SmolLM2 demo model
    python -m benchmarks.throughput --quick         # tiny random model, a few seconds a run
    python -m benchmarks.throughput --peers         # also LLaMA-Factory and TRL (make bench-peers installs them)

Every tool gets the same examples (alpaca_en_demo, the first --samples rows), the same template (ChatML),
cutoff, batch size, bf16 setting and one epoch, and otherwise runs as its users get it by default. bf16 is on
where the CPU has native bf16 (AVX512-BF16 or AMX) and off elsewhere: without it zerotune trains in fp32
anyway, and the peers' emulated bf16 autocast ran at minutes a step (LLaMA-Factory: 2 of 24 steps in 16
minutes on an AVX2-only EPYC). Two differences matter. LLaMA-Factory and TRL turn gradient checkpointing
on by default, zerotune decides it from a memory estimate (off when activations fit): the row "checkpointing
on" forces it on. And on CPU zerotune runs each batch as passes of one row with accumulated gradients
(forward_batch_size: auto; the same optimizer steps and gradient): the row "whole batch a pass" runs the
--batch rows at once, as the peers do. Real tokens are counted once, the same way for every tool: the non-pad tokens of the examples as zerotune's template renders them (the peers render the same
ChatML conversation). tokens/s = real tokens / the Trainer's train_runtime (each tool uses the HF Trainer,
so the clock covers the same loop: data, forward, backward, optimizer). Peak RSS is the command's own maximum
resident set (_run; not the benchmark process's, which exec would carry over). Startup is wall time minus
train_runtime: loading, tokenizing and setup before the first step.
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

ROOT = Path(__file__).resolve().parents[1]
PEERS_VENV = ROOT / ".venv-peers"


@dataclass
class Result:
    name: str
    tokens_per_second: float
    real_tokens: int
    padding_fraction: float | None
    peak_rss_gb: float
    startup_s: float
    train_runtime_s: float
    note: str = ""
    mfu: float | None = None  # zerotune's own per-step MFU (median over steps after the first)


def benchmark_model(quick: bool, work: Path) -> str:
    """The model every benchmark runs: the SmolLM2 demo model, or (quick) the tests' tiny random model."""
    if quick:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import build_tiny

        return str(build_tiny(work / "tiny-model"))
    from trainer.demo import prepare

    return str(prepare(ROOT / "models" / "smollm2-135m-instruct").resolve())


# Linux keeps a process's peak RSS across exec, so a command forked from this benchmark (a GB once it has loaded
# transformers) would report at least the benchmark's own peak. A small Python started first forks the command and
# writes down the command's own peak (KiB), as /usr/bin/time does.
_PEAK_OF_CHILD = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[int, float, float, str]:
    """(exit code, wall seconds, peak RSS GB of the command itself, combined output)."""
    start = time.time()
    log = tempfile.TemporaryFile(mode="w+")
    with tempfile.NamedTemporaryFile(mode="r", suffix=".maxrss") as peak:
        proc = subprocess.run([sys.executable, "-c", _PEAK_OF_CHILD, peak.name, *map(str, cmd)], cwd=cwd,
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        kib = int(peak.read() or 0)
    wall = time.time() - start
    log.seek(0)
    return proc.returncode, wall, kib / 2**20, log.read()


def _train_runtime(output_dir: Path) -> float:
    for name in ("train_results.json", "all_results.json"):
        f = output_dir / name
        if f.is_file():
            data = json.loads(f.read_text())
            if "train_runtime" in data:
                return float(data["train_runtime"])
    raise RuntimeError(f"no train_runtime in {output_dir}")


def real_token_count(model_dir: str, samples: int, cutoff: int) -> tuple[int, int]:
    """(real tokens, example lengths) of the benchmark set, as zerotune's ChatML template renders them."""
    from transformers import AutoTokenizer

    from trainer.data.options import DataArguments
    from trainer.data.processing import tokenized_dataset
    from trainer.data.templates import get_template

    tok = AutoTokenizer.from_pretrained(model_dir)
    args = DataArguments(dataset_dir=str(ROOT / "examples/data"), cutoff_len=cutoff, max_samples=samples,
                         tokenized_cache_dir=tempfile.mkdtemp())
    data, _ = tokenized_dataset(["alpaca_en_demo"], args, "supervised", tok, get_template("chatml", tok), True)
    return sum(data["length"]), list(data["length"])


def zerotune_runs(model_dir: str, common: dict, quick: bool) -> dict[str, dict]:
    base = {"model_name_or_path": model_dir, "stage": "sft", "do_train": True, "dataset": "alpaca_en_demo",
            "dataset_dir": str(ROOT / "examples/data"), "template": "chatml", "overwrite_output_dir": True,
            "overwrite_cache": True, "report_to": "none", "disable_tqdm": True, "save_strategy": "no",
            "logging_steps": 1, **common}
    runs = {
        "zerotune lora packed": {"finetuning_type": "lora", "packing": True},
        "zerotune lora packed, whole batch a pass": {"finetuning_type": "lora", "packing": True,
                                                     "forward_batch_size": common["per_device_train_batch_size"]},
        "zerotune lora packed, checkpointing on": {"finetuning_type": "lora", "packing": True,
                                                   "gradient_checkpointing": True},
        # The sft default: LLaMA-Factory's steps (the same examples in each), each micro-batch without padding.
        "zerotune lora padding-free": {"finetuning_type": "lora", "packing": False},
        "zerotune lora padding-free, whole batch a pass": {"finetuning_type": "lora", "packing": False,
                                                           "forward_batch_size": common["per_device_train_batch_size"]},
        # Padded batches as the peers run them (one example a pass would leave no padding to measure).
        "zerotune lora padded": {"finetuning_type": "lora", "packing": False, "padding_free": False,
                                 "forward_batch_size": common["per_device_train_batch_size"]},
        "zerotune lora packed, full logits": {"finetuning_type": "lora", "packing": True, "chunked_loss": False},
        "zerotune full packed": {"finetuning_type": "full", "packing": True},
    }
    return {name: {**base, **extra} for name, extra in runs.items()}


def median_mfu(output_dir: Path) -> float | None:
    """Median of the per-step MFU zerotune logged, leaving out the first step (warm-up)."""
    import statistics

    state = json.loads((output_dir / "trainer_state.json").read_text())
    values = [e["mfu"] for e in state["log_history"] if "mfu" in e][1:]
    return statistics.median(values) if values else None


def run_zerotune(name: str, cfg: dict, work: Path) -> tuple[float, float, float, float | None, str]:
    out = work / name.replace(" ", "_").replace(",", "")
    cfg = {**cfg, "output_dir": str(out)}
    cfg_file = work / f"{out.name}.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump(cfg))
    code, wall, rss, log = _run([sys.executable, "-m", "trainer.cli", "train", str(cfg_file)], ROOT,
                                {"ZEROTUNE_CACHE": str(work / "cache")})
    if code:
        raise RuntimeError(f"{name} failed:\n{log[-3000:]}")
    runtime = _train_runtime(out)
    padding = json.loads((out / "train_results.json").read_text()).get("padding_fraction")
    return runtime, wall, rss, padding, median_mfu(out)


def estimated_padding(lengths: list[int], batch: int, seed: int = 42) -> float:
    """Padding share of unpacked batches in random order, each padded to its longest example."""
    import random

    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    slots = sum(batch * max(lengths[i] for i in order[k:k + batch]) for k in range(0, len(order), batch))
    return 1 - sum(lengths) / slots


def peer_runs(model_dir: str, common: dict, work: Path) -> dict[str, tuple[list[str], Path]]:
    """LLaMA-Factory (as configured by default and with neat_packing) and TRL's SFTTrainer (packing off/on)."""
    python = PEERS_VENV / "bin" / "python"
    runs = {}
    lf_base = {"model_name_or_path": model_dir, "stage": "sft", "do_train": True, "finetuning_type": "lora",
               "lora_target": "all", "dataset": "alpaca_en_demo", "dataset_dir": str(ROOT / "examples/data"),
               "template": "chatml", "cutoff_len": common["cutoff_len"], "max_samples": common["max_samples"],
               "overwrite_cache": True, "per_device_train_batch_size": common["per_device_train_batch_size"],
               "gradient_accumulation_steps": 1, "learning_rate": common["learning_rate"], "num_train_epochs": 1.0,
               "bf16": common["bf16"], "logging_steps": 1000, "save_strategy": "no", "report_to": "none",
               "overwrite_output_dir": True, "use_cpu": True}
    import yaml

    for label, extra in (("LLaMA-Factory default", {}), ("LLaMA-Factory neat_packing", {"neat_packing": True,
                                                                                         "packing": True})):
        out = work / label.replace(" ", "_")
        cfg_file = work / f"{out.name}.yaml"
        cfg_file.write_text(yaml.safe_dump({**lf_base, **extra, "output_dir": str(out)}))
        runs[label] = ([str(PEERS_VENV / "bin" / "llamafactory-cli"), "train", str(cfg_file)], out)
    for label, packing in (("TRL SFTTrainer", False), ("TRL SFTTrainer packing", True)):
        out = work / label.replace(" ", "_")
        runs[label] = ([str(python), str(ROOT / "benchmarks" / "trl_sft.py"), "--model", model_dir, "--out", str(out),
                        "--samples", str(common["max_samples"]), "--cutoff", str(common["cutoff_len"]),
                        "--batch", str(common["per_device_train_batch_size"]), "--lr", str(common["learning_rate"])]
                       + (["--packing"] if packing else []) + (["--bf16"] if common["bf16"] else []), out)
    return runs


def table(results: list[Result], baseline: str | None) -> str:
    base = next((r for r in results if r.name == baseline), None)
    lines = ["| run | real tokens/s | vs LLaMA-Factory default | padding | peak RSS GB | startup s | MFU |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r.tokens_per_second / base.tokens_per_second:.2f}x" if base else "n/a"
        pad = f"{100 * r.padding_fraction:.1f}%" if r.padding_fraction is not None else "?"
        lines.append(f"| {r.name} | {r.tokens_per_second:.1f} | {ratio} | {pad} | {r.peak_rss_gb:.2f} | "
                     f"{r.startup_s:.1f} | {'' if r.mfu is None else f'{100 * r.mfu:.0f}%'} |")
    return "\n".join(lines)


def cpu_precision_line(bf16: bool) -> str:
    """What this CPU can do in bf16, printed beside the table: the figures are bf16 ones only where it is native."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    native = [flag for flag in ("amx_bf16", "avx512_bf16") if flag in info.split()]
    if native:
        return f"CPU: {name}; native bf16: yes ({', '.join(native)}); every run trains in {'bf16' if bf16 else 'fp32'}."
    return (f"CPU: {name}; native bf16: no (neither AVX512-BF16 nor AMX); every run trains in fp32, so these are fp32 "
            "figures: the bf16 ones need a CPU with native bf16.")


def bar_chart(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.5 * len(results) + 1.5))
    names = [r.name for r in results][::-1]
    ax.barh(names, [r.tokens_per_second for r in results][::-1], color="#1f77b4")
    ax.set_xlabel("real tokens / s (higher is better)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def write_results(out: str, name: str, table_md: str, payload: dict, rows: list) -> Path:
    """<out>/<name>.md (the table, also printed) and <name>.json (payload and each row): every benchmark's output."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({**payload, "results": [asdict(r) for r in rows]}, indent=1))
    (out_dir / f"{name}.md").write_text(table_md + "\n")
    print(table_md)
    return out_dir


def run_filter(only: str):
    """The `--only` option of every benchmark: a comma list of run names to keep, each matched as a substring of
    the name, or exactly when it starts with "=" (one row whose name is a prefix of others')."""
    keys = [k.strip() for k in only.split(",") if k.strip()]
    return lambda name: not keys or any(name == k[1:] if k.startswith("=") else k in name for k in keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny random model and a handful of examples")
    parser.add_argument("--peers", action="store_true", help="also run LLaMA-Factory and TRL from .venv-peers")
    parser.add_argument("--samples", type=int, default=None, help="examples of alpaca_en_demo (default 96; quick 8)")
    parser.add_argument("--cutoff", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--only", default="", help="comma list of run names to keep (substring; =name exact)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from trainer.engine.hardware import cpu_supports_bf16

    work = Path(tempfile.mkdtemp(prefix="zerotune-bench-"))
    model_dir = benchmark_model(args.quick, work)
    samples = args.samples or (8 if args.quick else 96)
    common = {"cutoff_len": args.cutoff, "max_samples": samples, "per_device_train_batch_size": args.batch,
              "gradient_accumulation_steps": 1, "learning_rate": 1e-4, "num_train_epochs": 1,
              "bf16": cpu_supports_bf16()}
    real_tokens, lengths = real_token_count(model_dir, samples, args.cutoff)
    examples = len(lengths)
    print(f"benchmark set: {examples} examples, {real_tokens} real tokens, cutoff {args.cutoff}, batch {args.batch}, "
          f"bf16 {common['bf16']}", file=sys.stderr)
    wanted = run_filter(args.only)

    results: list[Result] = []
    for name, cfg in zerotune_runs(model_dir, common, args.quick).items():
        if not wanted(name):
            continue
        runtime, wall, rss, padding, mfu = run_zerotune(name, cfg, work)
        results.append(Result(name, real_tokens / runtime, real_tokens, padding, rss, wall - runtime, runtime,
                              mfu=mfu))
        print(f"  {name}: {real_tokens / runtime:.1f} tokens/s", file=sys.stderr)
    if args.peers:
        if not (PEERS_VENV / "bin" / "llamafactory-cli").exists():
            print("peers are not installed: run `make bench-peers` first", file=sys.stderr)
            return 2
        for name, (cmd, out) in peer_runs(model_dir, common, work).items():
            if not wanted(name):
                continue
            code, wall, rss, log = _run(cmd, ROOT, {"HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1",
                                                    "FORCE_TORCHRUN": "0", "WANDB_DISABLED": "true"})
            if code:
                print(f"  {name} failed:\n{log[-2000:]}", file=sys.stderr)
                continue
            runtime = _train_runtime(out)
            packed = "packing" in name
            padding = None if packed else estimated_padding(lengths, args.batch)
            results.append(Result(name, real_tokens / runtime, real_tokens, padding, rss, wall - runtime, runtime,
                                  note="" if packed else "padding estimated"))
            print(f"  {name}: {real_tokens / runtime:.1f} tokens/s", file=sys.stderr)

    md = cpu_precision_line(common["bf16"]) + "\n\n" + table(results, "LLaMA-Factory default")
    out_dir = write_results(args.out, "throughput", md, {"model": model_dir, "examples": examples,
                                                         "real_tokens": real_tokens, "settings": common}, results)
    bar_chart(results, out_dir / "throughput.png")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
