"""What autograd keeps for backward, per token, in the decoder of the demo model with LoRA on all linear layers.

    python -m benchmarks.saved_activations [--model models/smollm2-135m-instruct] [--tokens 1024] [--fp32]

One packed row of four examples goes through the decoder (the loss head is left out: zerotune's chunked loss
keeps no logits) under bf16 autocast with bf16 frozen weights, as a LoRA run does, or in fp32 with --fp32.
Every tensor autograd saves is counted once by its storage. Three variants: transformers and PEFT as they
are; with zerotune's lean RMSNorm/SwiGLU; and with LoRA layers that skip PEFT's input cast under autocast.
"""

from __future__ import annotations

import argparse
import contextlib

import torch


def _model(path: str, dtype: torch.dtype, lean_ops: bool, lean_lora: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.model.lean_ops import apply_lean_ops, lean_lora_inputs

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    if lean_ops:
        apply_lean_ops(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if lean_lora:
        lean_lora_inputs(model)
    return model.train()


def saved_kib_per_token(model, tokens: int, autocast: bool) -> float:
    torch.manual_seed(0)
    ids = torch.randint(100, 10000, (1, tokens))
    positions = torch.arange(tokens).remainder(tokens // 4)[None]  # four examples, packed
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        model.get_base_model().model(input_ids=ids, position_ids=positions, use_cache=False)
    return sum(storages.values()) / tokens / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--fp32", action="store_true", help="fp32 weights and no autocast (CPUs without bf16)")
    args = parser.parse_args(argv)
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    print(f"| variant ({'fp32' if args.fp32 else 'bf16 autocast'}) | KiB kept per token |\n|---|---|")
    for name, ops, lora in (("transformers + PEFT as they are", False, False), ("+ lean RMSNorm/SwiGLU", True, False),
                            ("+ LoRA input cast skipped under autocast", True, True)):
        kib = saved_kib_per_token(_model(args.model, dtype, ops, lora), args.tokens, not args.fp32)
        print(f"| {name} | {kib:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
