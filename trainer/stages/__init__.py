"""Stage plugins: each stage is one file that registers a Stage; the runner looks it up here."""

from trainer.stages.base import STAGES, Stage, get_stage  # noqa: F401
from trainer.stages import sft  # noqa: F401  (registers sft and pt)
