"""SIGTERM / SIGINT (cluster preemption, Ctrl-C): finish the current step, save a checkpoint, stop.

The first signal only sets a flag; at the next optimizer-step boundary every process agrees on it
(one all-reduce of a scalar when distributed), the Trainer saves a checkpoint and the run ends with
exit status 128 + signal number and a line that says how to resume. A second signal is handled the
default way, so a stuck run can still be killed.
"""

from __future__ import annotations

import logging
import signal

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class Preempted(Exception):
    def __init__(self, signum: int, checkpoint: str | None):
        self.signum = signum
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        where = f"saved {checkpoint}" if checkpoint else "no checkpoint could be saved"
        super().__init__(f"stopped by {name}: {where}. Continue with resume_from_checkpoint: true.")


class GracefulStop(TrainerCallback):
    def __init__(self, accelerator=None):
        self.signum: int | None = None
        self.accelerator = accelerator
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        logger.warning("Received %s: saving a checkpoint at the end of this step, then stopping "
                       "(send it again to stop at once).", signal.Signals(signum).name)
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def _agreed(self) -> int:
        flag = self.signum or 0
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            t = torch.tensor([flag], device=self.accelerator.device)
            flag = int(self.accelerator.reduce(t, reduction="max").item())
            self.signum = self.signum or (flag or None)
        return flag

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed():
            control.should_save = True
            control.should_training_stop = True
        return control
