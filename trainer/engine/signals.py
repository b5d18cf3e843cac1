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


# ---- the DeepSpeed launcher going away ---------------------------------------------------------------------------
# SIGTERM to the `deepspeed` runner alone (a scheduler or container runtime that signals only the main process)
# ends the runner without passing the signal on: its per-node `deepspeed.launcher.launch` and the workers would
# train on, orphaned and unsaved, until something kills them without warning. So each worker watches the
# DeepSpeed processes above it and, when one of them is gone, stops exactly as on SIGTERM.
POLL_SECONDS = 1.0


def _stat(pid: int) -> list[str] | None:
    try:
        text = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # the fields after the command name (which may hold spaces)


def _alive(pid: int, start: str) -> bool:
    """The same process (not a later one with a reused pid), and not a zombie waiting to be reaped."""
    fields = _stat(pid)
    return fields is not None and fields[19] == start and fields[0] not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        return [p for p in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0") if p]
    except OSError:
        return []


def _is_deepspeed_launcher(cmd: list[str]) -> bool:
    import os

    runner = len(cmd) > 1 and os.path.basename(cmd[1]) == "deepspeed" or bool(cmd) and os.path.basename(cmd[0]) == \
        "deepspeed"
    return runner or "deepspeed.launcher.launch" in cmd or "deepspeed.launcher.runner" in cmd


def launcher_ancestors() -> list[tuple[int, str]]:
    """(pid, start time) of the DeepSpeed runner and launcher processes above this one (none outside DeepSpeed)."""
    import os

    found, pid = [], os.getppid()
    while pid > 1:
        fields = _stat(pid)
        if fields is None:
            break
        if _is_deepspeed_launcher(_cmdline(pid)):
            found.append((pid, fields[19]))  # field 22 of /proc/pid/stat: start time (pids are reused)
        pid = int(fields[1])
    return found


class LauncherWatch:
    """A daemon thread that sends this process SIGTERM once a DeepSpeed launcher above it has exited."""

    def __init__(self, ancestors: list[tuple[int, str]] | None = None):
        import threading

        self.ancestors = launcher_ancestors() if ancestors is None else ancestors
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zerotune-launcher-watch", daemon=True)

    def start(self) -> "LauncherWatch":
        if self.ancestors:
            logger.info("Watching the DeepSpeed launcher (pids %s): if it exits, this process saves a checkpoint and "
                        "stops as on SIGTERM.", ", ".join(str(p) for p, _ in self.ancestors))
            self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        import os

        while not self._done.wait(POLL_SECONDS):
            gone = [pid for pid, start in self.ancestors if not _alive(pid, start)]
            if gone:
                logger.warning("The DeepSpeed launcher (pid %s) has exited without stopping this worker: saving a "
                               "checkpoint and stopping as on SIGTERM.", gone[0])
                os.kill(os.getpid(), signal.SIGTERM)
                return
