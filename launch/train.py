"""Entry point for the deepspeed / torchrun launchers:

    deepspeed --num_gpus 8 launch/train.py --config examples/sft_lora.yaml [key=value ...]
    torchrun --nproc_per_node 8 launch/train.py --config examples/sft_lora.yaml
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.cli import main  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the launcher")
    args, overrides = parser.parse_known_args()
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    sys.exit(main(["train", args.config, *overrides]))
