"""The GPU check's throughput table: what a user would compare, on randomly initialised models built from config
(no download), written to a results folder.

Rows: a Llama-3.2-1B-shaped model (128k vocabulary, tied embeddings) and a Qwen3-0.6B-shaped one, bf16, cutoff
4096, on long-tailed example lengths (log-normal, median ~300 words, tail to the cutoff): full fine-tuning and
LoRA, packed vs padding-free, each attention path this machine has (auto = flash-attn or PyTorch's varlen_attn,
transformers' SDPA over packed rows, flash-attn's FA2 when installed), Liger on/off, one DPO row and one ZeRO-3 row.
Each row is one `zerotune train` process; tokens/s, MFU (against the device's bf16 peak) and peak memory are the
trainer's own log figures, the median over the steps after the first two. A row whose needs are missing (Liger,
DeepSpeed, flash-attn, a GPU) is listed with the reason, not run; rows stop when --budget seconds are spent.

    benchmarks/gpu_check.sh                              # the GPU tests, then this table
    python -m benchmarks.gpu_check --cpu-smoke --rows "llama full packed auto,llama dpo lora"   # the script on CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name: (model_type, hidden, layers, heads, kv heads, head_dim, intermediate, vocab)
    "llama": ("llama", 2048, 16, 32, 8, 64, 8192, 128256),  # Llama-3.2-1B's shape
    "qwen3": ("qwen3", 1024, 28, 16, 8, 128, 3072, 151936),  # Qwen3-0.6B's shape
}
SMOKE_MODELS = {"llama": ("llama", 64, 2, 4, 2, 16, 128, 512), "qwen3": ("qwen3", 64, 2, 4, 2, 16, 128, 512)}


@dataclass
class Row:
    name: str
    model: str
    keys: dict
    needs: tuple = ()  # "cuda", "liger", "deepspeed", "flash_attn"
    launcher: str = "plain"  # or "torchrun": one process under torch.distributed.run (DeepSpeed wants its env)


@dataclass
class Result:
    name: str
    status: str  # "ok", "failed", or why it did not run
    tokens_per_second: float | None = None
    mfu: float | None = None
    peak_memory_gb: float | None = None
    steps: int = 0
    engaged: list = field(default_factory=list)  # the log lines saying which paths and kernels ran


def rows() -> list[Row]:
    full, lora, packed = {"finetuning_type": "full"}, {"finetuning_type": "lora", "lora_target": "all"}, \
        {"packing": True}
    return [
        Row("llama full packed auto", "llama", {**full, **packed}),
        Row("llama full padding-free auto", "llama", {**full, "packing": False}),
        Row("llama full packed sdpa", "llama", {**full, **packed, "flash_attn": "sdpa"}),
        Row("llama full packed fa2", "llama", {**full, **packed, "flash_attn": "fa2"}, ("cuda", "flash_attn")),
        Row("llama full packed liger", "llama", {**full, **packed, "enable_liger_kernel": True}, ("cuda", "liger")),
        Row("llama lora packed auto", "llama", {**lora, **packed}),
        Row("llama lora padding-free auto", "llama", {**lora, "packing": False}),
        Row("llama lora packed liger", "llama", {**lora, **packed, "enable_liger_kernel": True}, ("cuda", "liger")),
        Row("qwen3 full packed auto", "qwen3", {**full, **packed}),
        Row("qwen3 lora packed auto", "qwen3", {**lora, **packed}),
        Row("llama dpo lora", "llama", {**lora, "stage": "dpo", "dataset": "pairs", "pref_beta": 0.1}),
        Row("llama full packed zero3", "llama", {**full, **packed, "deepspeed": str(ROOT / "ds_configs/ds_z3_config.json")},
            ("cuda", "deepspeed"), launcher="torchrun"),
    ]


def missing(needs: tuple) -> str:
    """'' when every need is met, else the first that is not."""
    import torch

    for need in needs:
        if need == "cuda" and not torch.cuda.is_available():
            return "needs a CUDA GPU"
        if need in ("liger", "deepspeed", "flash_attn"):
            module = {"liger": "liger_kernel"}.get(need, need)
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
    return ""


def build_model(name: str, spec: tuple, folder: Path) -> Path:
    """Random weights from config, saved in bf16 with the tests' small tokenizer (the vocabulary stays the model's)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import build_tokenizer

    model_type, hidden, layers, heads, kv, head_dim, inter, vocab = spec
    tok = build_tokenizer(folder)
    config = AutoConfig.for_model(model_type, vocab_size=max(vocab, len(tok)), hidden_size=hidden,
                                  intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                                  num_key_value_heads=kv, head_dim=head_dim, max_position_embeddings=8192,
                                  tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def long_tailed_words(rng: random.Random, limit: int) -> int:
    return max(4, min(limit, int(rng.lognormvariate(math.log(300), 1.0))))


def write_data(folder: Path, examples: int, cutoff: int, seed: int = 0) -> Path:
    """An alpaca file and a pairs file of long-tailed lengths (in words; the small tokenizer makes ~1.5 tokens a
    word), limited so that most examples fit the cutoff and a few are cut by it."""
    rng = random.Random(seed)
    words = ("the model learns from data and every token counts while long answers make the tail of the "
             "distribution that packing has to place well").split()

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))

    folder.mkdir(parents=True, exist_ok=True)
    sft = [{"instruction": text(rng.randint(5, 60)), "input": "", "output": text(long_tailed_words(rng, cutoff))}
           for _ in range(examples)]
    pairs = [{"instruction": text(long_tailed_words(rng, cutoff // 4)), "input": "",
              "chosen": text(long_tailed_words(rng, cutoff // 4)), "rejected": text(long_tailed_words(rng, cutoff // 4))}
             for _ in range(examples // 2)]
    (folder / "sft.json").write_text(json.dumps(sft))
    (folder / "pairs.json").write_text(json.dumps(pairs))
    (folder / "dataset_info.json").write_text(json.dumps({
        "sft": {"file_name": "sft.json"},
        "pairs": {"file_name": "pairs.json", "ranking": True,
                  "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}}}))
    return folder


def command(row: Row, model_dir: Path, data_dir: Path, out: Path, a) -> list[str]:
    keys = {"model_name_or_path": str(model_dir), "output_dir": str(out), "dataset": "sft",
            "dataset_dir": str(data_dir), "template": "chatml", "cutoff_len": a.cutoff, "max_steps": a.steps,
            "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no", "val_size": 0, "plot_loss": False,
            "per_device_train_batch_size": a.batch, "gradient_accumulation_steps": 1, "bf16": not a.cpu_smoke,
            "disable_tqdm": True, "report_to": "none", "num_train_epochs": 1000, "learning_rate": 1e-5,
            "enable_liger_kernel": False, "flash_attn": "auto", **row.keys}
    overrides = [f"{k}={'true' if v is True else 'false' if v is False else v}" for k, v in keys.items()]
    run = [sys.executable, "-m", "trainer.cli", "train", str(ROOT / "examples/sft_lora.yaml"), *overrides]
    if row.launcher == "torchrun":
        run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", *run[2:]]
    return run


def summarize(name: str, state: dict, stderr: str) -> Result:
    """The trainer's own per-step figures: median over the steps after the first two (compilation, allocator)."""
    logs = [e for e in state.get("log_history", []) if "tokens_per_second" in e]
    kept = logs[2:] or logs
    engaged = [line.split("] ", 1)[-1] for line in stderr.splitlines()
               if any(k in line for k in ("attention", "Attention", "Liger", "Loss:", "LoRA forward", "Lean",
                                          "flash-attn", "varlen", "Batches"))]
    if not kept:
        return Result(name, "failed: no step logged", engaged=engaged)
    return Result(name, "ok", statistics.median(e["tokens_per_second"] for e in kept),
                  statistics.median(e["mfu"] for e in kept), max(e["peak_memory_gb"] for e in kept), len(logs),
                  engaged)


def table(results: list[Result], header: str) -> str:
    lines = [header, "", "| row | tokens/s | MFU | peak memory (GB) | steps | status |", "|---|---:|---:|---:|---:|---|"]
    for r in results:
        tps = f"{r.tokens_per_second:,.0f}" if r.tokens_per_second is not None else "-"
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-"
        mem = f"{r.peak_memory_gb:.1f}" if r.peak_memory_gb is not None else "-"
        lines.append(f"| {r.name} | {tps} | {mfu} | {mem} | {r.steps} | {r.status} |")
    return "\n".join(lines) + "\n"


def versions() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"python": platform.python_version(),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "deepspeed", "liger-kernel", "triton",
                 "flash-attn", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--cutoff", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1, help="rows a step (packed rows of --cutoff tokens)")
    p.add_argument("--examples", type=int, default=1500)
    p.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    p.add_argument("--budget", type=float, default=390.0, help="seconds for the table; later rows are left out")
    p.add_argument("--out", default="", help="results folder (default benchmarks/results/gpu-check-<UTC time>)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models of the same kinds, fp32, to test the script")
    a = p.parse_args(argv)
    if a.cpu_smoke:
        a.cutoff, a.examples, a.steps = min(a.cutoff, 256), min(a.examples, 48), min(a.steps, 3)
    wanted = [r.strip() for r in a.rows.split(",") if r.strip()]
    chosen = [r for r in rows() if not wanted or r.name in wanted]
    unknown = set(wanted) - {r.name for r in chosen}
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; rows are: {', '.join(r.name for r in rows())}")
    out = Path(a.out or ROOT / "benchmarks/results" / time.strftime("gpu-check-%Y%m%d-%H%M%S", time.gmtime()))
    out.mkdir(parents=True, exist_ok=True)
    found = versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()), flush=True)
    work = Path(tempfile.mkdtemp(prefix="zerotune-gpu-check-"))
    data_dir = write_data(work / "data", a.examples, a.cutoff)
    specs = SMOKE_MODELS if a.cpu_smoke else MODELS
    built: dict[str, Path] = {}
    start, results = time.monotonic(), []
    for row in chosen:
        why = missing(tuple(n for n in row.needs if not (a.cpu_smoke and n == "cuda")) if a.cpu_smoke else row.needs)
        if a.cpu_smoke and row.launcher == "torchrun":
            why = why or "ZeRO-3 row: GPU only"
        if not why and time.monotonic() - start > a.budget:
            why = f"not run: the {a.budget:.0f} s budget was spent"
        if why:
            results.append(Result(row.name, why))
            print(f"{row.name}: {why}", flush=True)
            continue
        if row.model not in built:
            built[row.model] = build_model(row.model, specs[row.model], work / f"model-{row.model}")
        run_dir = work / row.name.replace(" ", "-")
        proc = subprocess.run(command(row, built[row.model], data_dir, run_dir, a), cwd=ROOT, capture_output=True,
                              text=True)
        state_file = run_dir / "trainer_state.json"
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        result = summarize(row.name, state, proc.stderr)
        if proc.returncode:
            result.status = f"failed (exit {proc.returncode}): " + (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
        results.append(result)
        print(f"{row.name}: {result.status}, {result.tokens_per_second} tokens/s, MFU {result.mfu}, "
              f"peak {result.peak_memory_gb} GB", flush=True)
    header = (f"# zerotune GPU check ({found['device']}; torch {found['torch']}, transformers {found['transformers']}; "
              f"cutoff {a.cutoff}, batch {a.batch}, {a.steps} steps a row{', CPU smoke' if a.cpu_smoke else ''})")
    text = table(results, header)
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"versions": found, "args": vars(a),
                                                  "results": [asdict(r) for r in results]}, indent=1))
    print(text)
    print(f"written to {out}")
    return 1 if any(r.status.startswith("failed") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
