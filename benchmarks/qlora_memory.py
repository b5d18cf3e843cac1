"""QLoRA's memory row: one LoRA sft YAML run as 16-bit LoRA and as 4-bit QLoRA (bitsandbytes NF4, double
quantization, the compute dtype as quant storage), and the same QLoRA YAML through LLaMA-Factory, side by side in
one run, each in its own process.

    python -m benchmarks.qlora_memory                          # a 1.5B Llama-shaped random model (see below)
    python -m benchmarks.qlora_memory --quick                  # a 64-wide 2-layer model: checks the script runs
    python -m benchmarks.qlora_memory --peers-venv /work/lfenv # LLaMA-Factory from another venv (default .venv-peers)

The model. QLoRA saves memory on the weights only, so the comparison needs a model whose weights dominate the
process: the demo SmolLM2-135M holds 0.27 GB in bf16, less than the Python process around it (torch, transformers,
the tokenizer: about 1 GB) and than its activations at any useful cutoff, so 4-bit weights could not move its peak
much. Instead a Llama-shaped model is built from its config with random weights (the numbers measured do not depend
on what the weights are) and saved once to --model-dir: hidden 2048, 24 layers, MLP 8192, 32 heads / 8 KV heads
(Llama-3.2-1B's layer shape, 8 layers more), tied embeddings, with the demo model's tokenizer (49,152 tokens):
1.56B parameters, 1.46B of them in the Linear layers that bitsandbytes quantizes. A short cutoff and batch 1 keep
activations small beside the weights, and a few dozen examples keep a CPU run within minutes.

Measured per run: the whole process's peak RSS (ru_maxrss, by /usr/bin/time: a child forked straight from this
1 GB Python process would start its ru_maxrss at the parent's, which Linux carries across exec),
and the peak of its anonymous memory (RssAnon polled every 0.2 s: the part not backed by a file; the checkpoint's
safetensors pages read through mmap count in RSS while mapped but the kernel can drop them at any time); tokens/s =
real tokens (as zerotune's ChatML template renders the examples, the same count for every run) / the HF Trainer's
train_runtime, the same clock for both tools.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {  # name -> LlamaConfig fields
    "1.5b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=8),
    "quick": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
}


@dataclass
class Row:
    name: str
    tokens_per_second: float | None
    peak_rss_gb: float | None
    peak_anon_gb: float | None
    train_runtime_s: float | None
    wall_s: float
    error: str = ""


def build_model(shape: str, dest: Path) -> Path:
    """A random-weight Llama of SHAPES[shape] with the demo tokenizer, saved in bf16 (once: reused if present)."""
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trainer.demo import prepare

    tok = AutoTokenizer.from_pretrained(prepare(ROOT / "models" / "smollm2-135m-instruct"))
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=8192, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: a 1.5B model in fp32 would take 6 GB to write 3
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():  # transformers zeroes the pad token's row, here <|im_end|>'s: a zero row would make
        # zerotune train that stop token's rows (a trained checkpoint's is not zero), an extra no peer does
        emb = model.get_input_embeddings().weight
        emb[config.pad_token_id].normal_(0, config.initializer_range)
    tmp = dest.with_name(dest.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, dest)
    return dest


def _tree(pid: int) -> list[int]:
    """pid and its descendants (a launcher may run the trainer in a child)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return found


def _anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], env: dict) -> tuple[int, float, float, float, str]:
    """(exit code, wall s, peak RSS GB (ru_maxrss of the command and its waited-for descendants), peak anonymous RSS
    GB of the process tree (polled), output)."""
    log = tempfile.TemporaryFile(mode="w+")
    maxrss = tempfile.NamedTemporaryFile(mode="r", suffix=".maxrss")
    start = time.time()
    proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", maxrss.name, *cmd], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, **env})
    peak_anon = [0]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], sum(_anon_kb(p) for p in _tree(proc.pid)))
            done.wait(0.2)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    code = proc.wait()
    done.set()
    watcher.join()
    wall = time.time() - start
    log.seek(0)
    kb = int(maxrss.read().split()[-1])  # after "Command exited with non-zero status N" where it failed
    return code, wall, kb / 2**20, peak_anon[0] / 2**20, log.read()


def lf_yaml(model_dir: str, out: Path, args, bf16: bool, quantized: bool) -> dict:
    """One LLaMA-Factory YAML; zerotune reads it unchanged. QLoRA adds LLaMA-Factory's own keys, set to its defaults
    written out (bnb, nf4, double quantization)."""
    cfg = {"model_name_or_path": model_dir, "stage": "sft", "do_train": True, "finetuning_type": "lora",
           "lora_target": "all", "dataset": "alpaca_en_demo", "dataset_dir": str(ROOT / "examples/data"),
           "template": "chatml", "cutoff_len": args.cutoff, "max_samples": args.samples, "overwrite_cache": True,
           "per_device_train_batch_size": args.batch, "gradient_accumulation_steps": 1, "learning_rate": 1e-4,
           "num_train_epochs": 1.0, "bf16": bf16, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
           "overwrite_output_dir": True, "use_cpu": True, "output_dir": str(out)}
    if quantized:
        cfg.update(quantization_bit=4, quantization_method="bnb", quantization_type="nf4", double_quantization=True)
    return cfg


def _train_runtime(out: Path) -> float | None:
    for name in ("train_results.json", "all_results.json"):
        f = out / name
        if f.is_file() and "train_runtime" in (data := json.loads(f.read_text())):
            return float(data["train_runtime"])
    return None


def last_error(log: str) -> str:
    """The exception line a failed run ended on (its last line naming an Error), for the table."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    named = [line for line in lines if "Error" in line or "error:" in line]
    return (named or lines or ["(no output)"])[-1][:300]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 64-wide 2-layer model: checks the script end to end")
    parser.add_argument("--model-dir", default=None, help="where the random model is saved once (default "
                        "/tmp/zerotune-qlora-bench-<shape>)")
    parser.add_argument("--samples", type=int, default=16, help="examples of alpaca_en_demo")
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--peers-venv", default=str(ROOT / ".venv-peers"),
                        help="a venv with llamafactory-cli and bitsandbytes (make bench-peers, then pip install "
                             "bitsandbytes there)")
    parser.add_argument("--no-peers", action="store_true", help="zerotune's runs only")
    parser.add_argument("--no-allocator-row", dest="allocator_row", action="store_false",
                        help="leave out the QLoRA row under glibc's malloc defaults")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from benchmarks.throughput import cpu_precision_line, real_token_count
    from trainer.engine.hardware import cpu_supports_bf16

    import yaml

    shape = "quick" if args.quick else "1.5b"
    model_dir = str(build_model(shape, Path(args.model_dir or f"/tmp/zerotune-qlora-bench-{shape}")))
    bf16 = cpu_supports_bf16()
    real_tokens, lengths = real_token_count(model_dir, args.samples, args.cutoff)
    print(f"model {model_dir}; {len(lengths)} examples, {real_tokens} real tokens, cutoff {args.cutoff}, batch "
          f"{args.batch}, bf16 {bf16}", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="zerotune-qlora-bench-"))
    lf_cli = Path(args.peers_venv) / "bin" / "llamafactory-cli"
    # The third zerotune row leaves glibc's malloc at its defaults (a MALLOC_ variable set to its default value:
    # zerotune then keeps the user's choice), against zerotune's kept-freed-memory setting on the CPU.
    glibc_defaults = {"MALLOC_TRIM_THRESHOLD_": "131072"}
    runs = [("zerotune LoRA, " + ("bf16" if bf16 else "fp32") + " weights", False, "zerotune", {}),
            ("zerotune QLoRA, 4-bit NF4", True, "zerotune", {}),
            ("zerotune QLoRA, 4-bit NF4, glibc malloc defaults", True, "zerotune", glibc_defaults)]
    if args.allocator_row is False:
        runs.pop()
    if not args.no_peers:
        runs.append(("LLaMA-Factory 0.9.5 QLoRA, 4-bit NF4", True, "lf", {}))
    rows: list[Row] = []
    for name, quantized, tool, extra_env in runs:
        out = work / name.split(",")[0].replace(" ", "_").replace(".", "") / (("q" if quantized else "b")
                                                                               + ("-glibc" if extra_env else ""))
        cfg_file = out.with_suffix(".yaml")
        cfg_file.parent.mkdir(parents=True, exist_ok=True)
        cfg_file.write_text(yaml.safe_dump(lf_yaml(model_dir, out, args, bf16, quantized)))
        if tool == "zerotune":
            cmd = [sys.executable, "-m", "trainer.cli", "train", str(cfg_file)]
            env = {"ZEROTUNE_CACHE": str(work / "cache"), **extra_env}
        elif lf_cli.exists():
            cmd = [str(lf_cli), "train", str(cfg_file)]
            env = {"HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1", "FORCE_TORCHRUN": "0",
                   "WANDB_DISABLED": "true"}
        else:
            rows.append(Row(name, None, None, None, None, 0.0, f"{lf_cli} not found (make bench-peers)"))
            continue
        code, wall, rss, anon, log = run_measured(cmd, env)
        (work / f"{out.parent.name}-{out.name}.log").write_text(log)
        runtime = _train_runtime(out)
        if code or runtime is None:
            rows.append(Row(name, None, rss, anon, None, wall, f"exit {code}: {last_error(log)}"))
        else:
            rows.append(Row(name, real_tokens / runtime, rss, anon, runtime, wall))
        print(f"  {name}: {rows[-1]}", file=sys.stderr)

    base = rows[0]
    lines = ["| run | peak RSS GB | vs 16-bit LoRA | peak anonymous GB | vs 16-bit LoRA | real tokens/s | "
             "vs LLaMA-Factory QLoRA |", "|---|---|---|---|---|---|---|"]
    lf = next((r for r in rows if r.name.startswith("LLaMA") and r.tokens_per_second), None)

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else ""

    for r in rows:
        if r.error and r.tokens_per_second is None:
            lines.append(f"| {r.name} | {'' if r.peak_rss_gb is None else f'{r.peak_rss_gb:.2f}'} | | | | "
                         f"failed: `{r.error}` | |")
            continue
        lines.append(f"| {r.name} | {r.peak_rss_gb:.2f} | {ratio(r.peak_rss_gb, base.peak_rss_gb)} | "
                     f"{r.peak_anon_gb:.2f} | {ratio(r.peak_anon_gb, base.peak_anon_gb)} | "
                     f"{r.tokens_per_second:.1f} | {ratio(r.tokens_per_second, lf and lf.tokens_per_second)} |")
    md = cpu_precision_line(bf16) + "\n\n" + "\n".join(lines)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "qlora_memory.json").write_text(json.dumps(
        {"model": model_dir, "shape": SHAPES[shape], "examples": len(lengths), "real_tokens": real_tokens,
         "cutoff": args.cutoff, "batch": args.batch, "bf16": bf16, "rows": [asdict(r) for r in rows]}, indent=1))
    (out_dir / "qlora_memory.md").write_text(md + "\n")
    print(md)
    print(f"logs kept in {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
