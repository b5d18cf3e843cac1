"""Optional kernels prove themselves once at start: a flash-attn that is missing its distribution (FlashAttention-4
borrowing the name), or whose kernel raises, is left out with the reason instead of crashing the first forward; the
probe runs once per process however many layers ask; Liger's patch gets only the arguments its signature takes."""

import importlib.machinery
import importlib.metadata
import sys
import types

import torch

import flash_standin
from trainer.model import kernels


def _module(varlen):
    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.flash_attn_varlen_func = varlen
    return module


def _release(monkeypatch, release):
    real = importlib.metadata.version

    def version(name):
        if name == "flash-attn":
            if release is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return release
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)


def test_a_healthy_flash_attn_is_used_and_its_release_decides_the_alignment(monkeypatch):
    for release, right in (("2.6.3", True), ("2.0.9", False)):
        monkeypatch.setitem(sys.modules, "flash_attn", flash_standin.flash_attn_module(release))
        _release(monkeypatch, release)
        status = kernels._probe_flash("cpu")
        assert status.usable and status.bottom_right is right and release in status.why


def test_a_flash_attn_whose_kernel_raises_is_left_out_with_the_reason(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setitem(sys.modules, "flash_attn", _module(broken))
    _release(monkeypatch, "2.7.4")
    status = kernels._probe_flash("cpu")
    assert not status.usable and "flash-attn 2.7.4 failed a smoke call" in status.why
    assert "no kernel image" in status.why


def test_a_flash_attn_module_without_its_distribution_is_not_taken_for_fa2(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", _module(flash_standin.flash_attn_varlen_func))
    _release(monkeypatch, None)  # FlashAttention-4: version("flash-attn") raises
    status = kernels._probe_flash("cpu")
    assert not status.usable and "FlashAttention-4" in status.why


def test_the_probe_runs_once_however_many_layers_ask(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "_probe_flash", lambda device: calls.append(device) or kernels.FlashStatus(False))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kernels.flash_status.cache_clear()
    try:
        for _ in range(24):  # the segment path asks at every layer of every forward
            kernels._flash_fits(torch.zeros(1))
            kernels.has_flash_attn()
        assert calls == ["cuda"]
    finally:
        kernels.flash_status.cache_clear()


def test_liger_patch_arguments_follow_the_patch_signature():
    def llama_patch(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True, swiglu=True,
                    model=None):
        pass

    def gemma_patch(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True, geglu=True,
                    model=None):
        pass

    assert kernels.liger_patch_arguments(llama_patch) == dict(rope=True, rms_norm=True, swiglu=True,
                                                              cross_entropy=False, fused_linear_cross_entropy=False)
    gemma = kernels.liger_patch_arguments(gemma_patch)
    assert gemma["geglu"] is True and "swiglu" not in gemma and gemma["fused_linear_cross_entropy"] is False


def test_a_liger_that_does_not_import_is_a_reason(monkeypatch):
    module = types.ModuleType("liger_kernel")
    module.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None)
    module.__path__ = []
    monkeypatch.setitem(sys.modules, "liger_kernel", module)
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "0.8.5" if n == "liger-kernel" else real(n))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)  # `import liger_kernel.transformers` fails
    problem = kernels._probe_liger()
    assert problem.startswith("liger-kernel does not import")
