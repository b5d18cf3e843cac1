"""Stage plugins: each stage is one file that registers a Stage class; the runner builds it from the config."""

from trainer.stages.base import STAGES, Stage, StageOutput, build_stage  # noqa: F401
from trainer.stages import grpo, kto, ppo, preference, reward, sft  # noqa: F401  (sft, pt, rm, dpo, orpo, kto, ppo, grpo)
