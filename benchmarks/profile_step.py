"""Where the time of a training step goes: torch.profiler over real zerotune steps, grouped by kind of work.

    python -m benchmarks.profile_step                  # bf16 LoRA (all linear) sft on the demo model
    python -m benchmarks.profile_step --full           # a bf16 full fine-tune of the same job
    python -m benchmarks.profile_step --quick          # the tiny test model (a smoke run, seconds)

The run is zerotune's own (trainer.run.run: the same data, collator, model wrapper, loss head and Trainer loop as
`zerotune train`) on alpaca_en_demo with cutoff 1024 and batch 4; the profiler records the steps after --warmup
(optimizer steps included) on the CPU. Self time of every op is grouped into matmuls, attention, the dtype casts
and copies, fills, softmax (the loss head's and attention's), other elementwise ops, the optimizer, and the rest,
per step. bf16 needs a CPU with native bf16 (AVX-512 BF16 or AMX); elsewhere the run says so and profiles fp32.
Writes benchmarks/results/profile_step[_full].md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GROUPS = [  # (group, substrings of op names); the first match wins
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int", "mkldnn_matmul")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("softmax", ("softmax", "logsumexp")),
    ("dtype casts and copies", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous",
                                "aten::cat", "aten::stack", "aten::index", "aten::gather", "aten::scatter")),
    ("fills", ("aten::zero_", "aten::fill_", "aten::zeros", "aten::ones", "aten::full", "aten::new_zeros")),
    ("optimizer", ("_foreach", "adam", "Optimizer", "clip_grad", "aten::norm", "linalg_vector_norm")),
    ("elementwise", ("aten::add", "aten::mul", "aten::sub", "aten::div", "aten::silu", "aten::rsqrt", "aten::pow",
                     "aten::mean", "aten::neg", "aten::exp", "aten::sum", "aten::where", "aten::sigmoid",
                     "aten::threshold", "aten::clamp", "aten::sqrt", "aten::cos", "aten::sin", "aten::maximum",
                     "aten::rms_norm", "aten::embedding", "aten::lt", "aten::gt", "aten::eq", "aten::ne")),
]


def group_of(name: str) -> str:
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "other"


def profiled_run(cfg: dict, warmup: int, steps: int):
    import torch

    from trainer.run import build_config
    from trainer.engine import trainer as engine
    from trainer.run import run

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    original = engine.ZeroTrainer.training_step
    seen = {"n": 0}

    def step(self, model, inputs, num_items_in_batch=None):
        seen["n"] += 1
        if seen["n"] == warmup + 1:
            profiler.__enter__()
        if seen["n"] == warmup + steps + 1:  # the window holds `steps` whole steps, optimizer steps included
            profiler.__exit__(None, None, None)
        return original(self, model, inputs, num_items_in_batch)

    engine.ZeroTrainer.training_step = step
    try:
        run(build_config({**cfg, "max_steps": warmup + steps + 1}))
    finally:
        engine.ZeroTrainer.training_step = original
    return profiler


def table(profiler, steps: int, title: str) -> str:
    per_group: dict[str, float] = defaultdict(float)
    per_op: dict[str, float] = defaultdict(float)
    for event in profiler.key_averages():
        ms = event.self_cpu_time_total / 1000 / steps
        per_group[group_of(event.key)] += ms
        per_op[event.key] += ms
    total = sum(per_group.values())
    lines = [f"### {title}", "", f"{total:.0f} ms of op self time a step ({steps} steps profiled).", "",
             "| kind of work | ms a step | share |", "|---|---|---|"]
    for group, ms in sorted(per_group.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {group} | {ms:.1f} | {100 * ms / total:.1f}% |")
    lines += ["", "| op | ms a step | share | kind |", "|---|---|---|---|"]
    for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:15]:
        lines.append(f"| `{op}` | {ms:.1f} | {100 * ms / total:.1f}% | {group_of(op)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    parser.add_argument("--quick", action="store_true", help="the tiny test model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from trainer.engine.hardware import cpu_supports_bf16

    work = Path(tempfile.mkdtemp(prefix="zerotune-profile-"))
    from benchmarks.throughput import benchmark_model

    model = benchmark_model(args.quick, work)
    bf16 = cpu_supports_bf16()
    if not bf16:
        print("This CPU has no native bf16: profiling fp32.", file=sys.stderr)
    kind = "full" if args.full else "lora"
    cfg = {"model_name_or_path": model, "stage": "sft", "do_train": True, "finetuning_type": kind,
           "lora_target": "all", "dataset": "alpaca_en_demo", "dataset_dir": str(ROOT / "examples/data"),
           "template": "chatml", "cutoff_len": 1024, "max_samples": 96, "per_device_train_batch_size": 4,
           "gradient_accumulation_steps": 1, "learning_rate": 1e-4, "bf16": bf16, "output_dir": str(work / "out"),
           "overwrite_output_dir": True, "overwrite_cache": True, "report_to": "none", "disable_tqdm": True,
           "save_strategy": "no", "logging_steps": 1000, "plot_loss": False}
    profiler = profiled_run(cfg, args.warmup, args.steps)
    title = f"{'bf16' if bf16 else 'fp32'} {kind} step, SmolLM2-135M, batch 4, cutoff 1024" if not args.quick \
        else f"{kind} step, tiny model"
    md = table(profiler, args.steps, title)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_step{'_full' if args.full else ''}{'_quick' if args.quick else ''}.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
