"""Train-step throughput and peak memory of NAT variants, with and without the input pipeline.

  python experiments/bench_train.py                                  # nat_mini, nat_tiny @ 224
  python experiments/bench_train.py --presets nat_mini --batch 8 --steps 5 --image-size 224

"step only" feeds one pre-made device batch repeatedly (pure compute); "with data" runs the
real host pipeline (synthetic uint8 JPEG-free images through random-resized-crop, flip and
RandAugment m9 in `--workers` grain processes) plus host-to-device transfer. Peak memory is the
device allocator's peak where the backend reports it (GPU), else the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import numpy as np

from natjax.train import config as C
from natjax.train import data as data_lib
from natjax.train import mesh as mesh_lib
from natjax.train.state import Trainer


class SyntheticSource:
    """Random uint8 images of a typical ImageNet size (so host augmentation cost is realistic)."""

    num_classes = 1000

    def __init__(self, n: int, size: tuple[int, int] = (375, 500)) -> None:
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, (8, *size, 3), dtype=np.uint8)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.images[i % 8], i % 1000


def peak_memory_mb() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(preset: str, batch: int, size: int, steps: int, workers: int, dtype: str) -> dict:
    cfg = C.TrainConfig(
        model=C.ModelConfig(preset=preset, overrides=(("drop_path_rate", 0.2),), dtype=dtype),
        data=C.DataConfig(
            dataset="synthetic", image_size=size, batch_size=batch, num_workers=workers
        ),
        augment=C.AugmentConfig(randaugment_m=9, mixup=0.8, cutmix=1.0, erase_prob=0.25),
    )
    mesh = mesh_lib.make_mesh(cfg.mesh)
    src = SyntheticSource(batch * (steps + 2))
    loader = data_lib.BatchLoader(src, cfg.data, cfg.augment, seed=0)
    trainer = Trainer(cfg, mesh, src.num_classes, loader.steps_per_epoch)
    batch0 = loader.batch(0)
    t0 = time.perf_counter()
    jax.block_until_ready(trainer.step(batch0, 0))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
        m = trainer.step(batch0, s)
    jax.block_until_ready(m)
    step_only = steps * batch / (time.perf_counter() - t0)
    it = loader.iterate(1, steps + 1)
    next(it)  # start the workers outside the timing
    t0 = time.perf_counter()
    for s in range(2, steps + 1):
        m = trainer.step(next(it), s)
    jax.block_until_ready(m)
    with_data = (steps - 1) * batch / (time.perf_counter() - t0)
    return {
        "preset": preset,
        "image_size": size,
        "batch": batch,
        "dtype": dtype,
        "device": jax.devices()[0].device_kind,
        "compile_s": round(compile_s, 1),
        "step_only_img_s": round(step_only, 2),
        "with_data_img_s": round(with_data, 2),
        "peak_mem_mb": round(peak_memory_mb(), 0),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["nat_mini", "nat_tiny"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    for preset in args.presets:
        out = bench(preset, args.batch, args.image_size, args.steps, args.workers, args.dtype)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
