"""zerotune train | check | chat | export CFG [key=value ...] | zerotune version

`zerotune train` uses every visible device: with more than one CUDA device it starts one process per
device under torchrun (CUDA_VISIBLE_DEVICES narrows the set; NNODES, NODE_RANK, MASTER_ADDR and
MASTER_PORT spread it over nodes).
"""

from __future__ import annotations

import argparse
import os
import sys

from trainer import __version__
from trainer.errors import ConfigError

USAGE = """zerotune: fast, exact fine-tuning from one LLaMA-Factory style YAML.

commands:
  zerotune train CONFIG.yaml [key=value ...]   train (or, with do_train=false, evaluate)
  zerotune check CONFIG.yaml [key=value ...]   the resolved plan: world size, batch, packing, ZeRO memory
  zerotune chat CONFIG.yaml [--message TEXT]   talk to the model (+ adapter) through its template
  zerotune export CONFIG.yaml [key=value ...]  merge the adapter and write a model other tools serve (export_dir)
  zerotune version                             print the version

Any key of the YAML can be overridden on the command line, e.g.
  zerotune train examples/sft_lora.yaml learning_rate=1e-5 logging_steps=1
The same file runs under the DeepSpeed launcher:
  deepspeed launch/train.py --config examples/sft_lora.yaml
"""


def _distributed() -> bool:
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def _relaunch_under_torchrun(config: str, overrides: list[str], devices: int) -> int:
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run",
           "--nproc_per_node", os.environ.get("NPROC_PER_NODE", str(devices)),
           "--nnodes", os.environ.get("NNODES", "1"),
           "--node_rank", os.environ.get("NODE_RANK", "0"),
           "--master_addr", os.environ.get("MASTER_ADDR", "127.0.0.1"),
           "--master_port", os.environ.get("MASTER_PORT", "29500"),
           "-m", "trainer.cli", "train", config, *overrides]
    from trainer.engine.secrets import is_secret

    shown = [f"{a.split('=', 1)[0]}=<redacted>" if "=" in a and is_secret(a.split("=", 1)[0]) else a
             for a in cmd[1:]]
    print(f"[zerotune] {devices} devices visible: launching {' '.join(shown)}", file=sys.stderr)
    import signal

    child = subprocess.Popen(cmd)
    # Pass preemption signals on to torchrun (which passes them to every worker) and wait for the checkpoint.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    return child.wait()


def train(config: str, overrides: list[str]) -> int:
    from trainer.run import load_config

    if not _distributed():
        import torch

        devices = torch.cuda.device_count()
        if devices > 1 or int(os.environ.get("NNODES", "1")) > 1:
            # Validate here (fail fast), but without DeepSpeed: it would set up a process group of one.
            load_config(config, list(overrides) + ["deepspeed=null"])
            return _relaunch_under_torchrun(config, overrides, max(devices, 1))
    cfg = load_config(config, overrides)  # fail on bad keys before anything heavy starts
    from trainer.run import run

    run(cfg)
    _finish_distributed()
    return 0


def _finish_distributed() -> None:
    """After a successful multi-process run only, end this worker without interpreter teardown.

    At teardown gloo's C++ worker threads can still own work objects whose tensors need the GIL to be
    freed, and the process aborts ("terminate called without an active exception", exit -6) after
    the run finished and saved: seen here in about 1 of 8 two-process runs without destroying the
    group, and once in CI with it (DeepSpeed keeps its own references to the groups). So: wait until
    every rank is done, destroy the group, finish what atexit handlers would (the W&B run, log and
    stdio buffers) and leave with os._exit(0). After a failure this is skipped: a rank may still be
    waiting in a collective, and the normal exit path reports the error."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    multi = dist.get_world_size() > 1
    dist.barrier()
    dist.destroy_process_group()
    if not multi:  # a group of one (DeepSpeed in one process, tests in-process): nothing to race
        return
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _leave_without_teardown(code: int) -> None:
    """A preempted multi-process run has saved its checkpoint together (every rank stopped at the same step and
    waited for the save); nothing collective is left. Leave now: at interpreter teardown gloo's threads can abort
    the process (exit -6, seen in CI on a preempted ZeRO-2 rank), and the launcher would report that instead of
    the preemption's 128 + signal."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=code)
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def check(config: str, overrides: list[str]) -> int:
    from trainer.run import load_config
    from trainer.plan import describe

    from trainer.options import parse_override, read_yaml

    raw = read_yaml(config)
    raw.update(parse_override(o) for o in overrides)
    # The plan needs no DeepSpeed engine; building one here would claim a process group of one (and sequence
    # parallelism, which needs DeepSpeed, is described from the YAML's value).
    sp = int(raw.get("sequence_parallel_size") or raw.get("cp_size") or 1)
    cfg = load_config(config, list(overrides) + ["overwrite_output_dir=true", "deepspeed=null",
                                                 "sequence_parallel_size=1", "cp_size=null"])
    print(describe(cfg, deepspeed=raw.get("deepspeed"), sequence_parallel=sp))
    return 0


def inference(command: str, config: str, overrides: list[str], message: str | None = None) -> int:
    from trainer.run import load_inference_config
    from trainer.run import setup_logging

    cfg = load_inference_config(config, overrides)
    setup_logging(True)
    from trainer import inference as serve

    if command == "chat":
        return serve.chat(cfg, message)
    print(serve.export(cfg))
    return 0


def _options_first(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """The command's own --options moved before its config and overrides, so that `chat cfg.yaml --message hi
    max_new_tokens=40` parses (argparse ends a list of positionals at the first option). Overrides may be written
    --key=value too, so only the command's named options move."""
    head, moved, rest, i = argv[:1], [], [], 1
    while i < len(argv):
        word = argv[i]
        if word in options and i + 1 < len(argv):
            moved += argv[i:i + 2]
            i += 2
            continue
        (moved if word.split("=", 1)[0] in options else rest).append(word)
        i += 1
    return head + moved + rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="zerotune", description=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p_train = sub.add_parser("train", help="train or evaluate from a YAML config")
    p_train.add_argument("config", help="YAML file in LLaMA-Factory's key vocabulary")
    p_train.add_argument("overrides", nargs="*", help="key=value pairs that override the YAML")
    p_check = sub.add_parser("check", help="print the resolved plan without training")
    p_check.add_argument("config")
    p_check.add_argument("overrides", nargs="*")
    p_chat = sub.add_parser("chat", help="talk to the model in the terminal (/clear, /exit)")
    p_chat.add_argument("config")
    p_chat.add_argument("overrides", nargs="*")
    p_chat.add_argument("--message", help="answer this one message and exit")
    p_export = sub.add_parser("export", help="merge adapters and write the model to export_dir")
    p_export.add_argument("config")
    p_export.add_argument("overrides", nargs="*")
    sub.add_parser("version", help="print the version")
    args = parser.parse_args(_options_first(argv, ("--message",)))
    if args.command == "version":
        print(f"zerotune {__version__}")
        return 0
    if args.command not in ("train", "check", "chat", "export"):
        parser.print_help()
        return 2
    from trainer.engine.signals import Preempted
    from trainer.errors import TrainingHalted

    try:
        if args.command == "check":
            return check(args.config, args.overrides)
        if args.command in ("chat", "export"):
            return inference(args.command, args.config, args.overrides, getattr(args, "message", None))
        return train(args.config, args.overrides)
    except ConfigError as err:
        print(f"zerotune: error: {err}", file=sys.stderr)
        return 2
    except TrainingHalted as err:
        print(f"zerotune: error: {err}", file=sys.stderr)
        return 1
    except Preempted as err:
        print(f"zerotune: {err}", file=sys.stderr)
        _leave_without_teardown(128 + err.signum)
        return 128 + err.signum


if __name__ == "__main__":
    sys.exit(main())
