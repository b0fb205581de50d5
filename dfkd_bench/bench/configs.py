"""The configurations ``dfkd-bench bench`` times (one process, ``dfkd_bench.bench.benchmark``) and packs (several
processes, ``dfkd_bench.bench.pack``), and the randomly initialised teacher both use: speed does not
depend on the teacher's weights. Both benchmark modules import this one, not each other."""

from __future__ import annotations

from pathlib import Path

CONFIGS = {
    # CPU: the digits preset (LeNet-5 -> LeNet-5-half, 16x16, gen_tiny, batch 128, n_S 5, n_G 1)
    "cpu": dict(dataset="digits", teacher_arch="lenet5", student_arch="lenet5_half",
                overrides=dict(batch_size=128, student_steps=5, generator_steps=1)),
    # GPU: the paper's CIFAR WRN-40-2 -> WRN-16-2 setting
    "gpu": dict(dataset="cifar10", teacher_arch="wrn40_2", student_arch="wrn16_2",
                overrides=dict(batch_size=256, student_steps=60, generator_steps=3)),
}
# CHOSEN: the CPU fast path uses fused optimisers like a GPU run; CPU runs default to the
# unfused ones (fused_optimizer=auto) so that they reproduce the stored records bit for bit.
FAST = {"cpu": dict(fused_forward=True, amp="none", channels_last=True, fused_optimizer=True),
        "gpu": dict(fused_forward=True, amp="bf16", channels_last=True, fused_optimizer=True, cuda_graphs=True)}
# The plain path: fp32, eager, one forward per source, unfused optimisers, float32 memory.
# `deterministic` is process-wide in torch, so every variant of one benchmark shares it (auto).
REFERENCE = dict(fused_forward=False, amp="none", channels_last=False, compile=False, stage_buffer=False,
                 fused_optimizer=False, cuda_graphs=False)
METHODS = ("abm", "mem", "mad")


def random_teacher(arch: str, dataset: str, folder: Path) -> str:
    import torch

    from dfkd_bench.data.catalog import get_dataset_info
    from dfkd_bench.models import build_model
    from dfkd_bench.presets import get_preset

    info = get_dataset_info(dataset)
    torch.manual_seed(0)
    model = build_model(arch, info.num_classes, info.channels, get_preset(dataset).image_size)
    path = folder / f"random-{arch}.pt"
    torch.save(model.state_dict(), path)
    return str(path)
