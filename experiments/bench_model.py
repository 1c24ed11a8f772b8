"""Throughput of whole NAT/DiNAT models: inference and one SGD train step, images per second.

    python experiments/bench_model.py                          # NAT-Mini, NAT-Tiny, batch 8
    python experiments/bench_model.py --batch 2 --repeats 3    # quick CPU check
    python experiments/bench_model.py --models nat_mini,dinat_mini --dtype bfloat16 --batch 64

Each model is a preset (`natjax.models.PRESETS`) with random weights at `--size` x `--size`.
Inference is a jitted forward in eval mode; the train step is a jitted forward + backward +
`optax.sgd` update in training mode (dropout / drop path on). Both are timed as the median of
`--repeats` runs after one warm-up run (compilation excluded, reported separately). Prints the
command and a table; with `--json PATH` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from natjax.models import NatForImageClassification, count_params, get_config, list_presets


def _time(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds incl. compilation, median seconds of `repeats` later calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def bench(name: str, batch: int, size: int, dtype, repeats: int, implementation: str | None):
    """Benchmarks one preset; returns a dict of measurements."""
    config = get_config(name)
    model = NatForImageClassification(
        config, rngs=nnx.Rngs(0), dtype=dtype, attention_implementation=implementation
    )
    optimizer = nnx.Optimizer(model, optax.sgd(1e-3), wrt=nnx.Param)
    images = jax.random.normal(jax.random.key(1), (batch, size, size, config.num_channels), dtype)
    labels = jax.random.randint(jax.random.key(2), (batch,), 0, config.num_labels)
    rngs = nnx.Rngs(dropout=3)

    @nnx.jit
    def infer(model, images):
        return model(images).logits

    @nnx.jit
    def train_step(model, optimizer, images, labels, rngs):
        key = rngs.dropout()  # drawn outside `value_and_grad`: Rngs must not cross transforms

        def loss_fn(model):
            logits = model(images, deterministic=False, rngs=key).logits
            return optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), labels
            ).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    infer_first, infer_s = _time(lambda: infer(model, images), repeats)
    train_first, train_s = _time(
        lambda: train_step(model, optimizer, images, labels, rngs), repeats
    )
    return {
        "model": name,
        "params_m": count_params(config) / 1e6,
        "batch": batch,
        "size": size,
        "dtype": jnp.dtype(dtype).name,
        "infer_img_s": batch / infer_s,
        "train_img_s": batch / train_s,
        "infer_compile_s": infer_first - infer_s,
        "train_compile_s": train_first - train_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="nat_mini,nat_tiny", help="comma-separated presets")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--implementation", default=None, help="natjax.na2d backend")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in list_presets()]
    if unknown:
        parser.error(f"unknown presets {unknown}; choose from {list_presets()}")
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    print("$ python " + " ".join(["experiments/bench_model.py", *(argv or sys.argv[1:])]))
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    )
    rows = [
        bench(n, args.batch, args.size, dtype, args.repeats, args.implementation) for n in names
    ]
    print(
        "| model | params | batch | size | dtype | infer img/s | train img/s "
        "| compile s (infer/train) |"
    )
    print("|" + "---|" * 8)
    for r in rows:
        print(
            f"| {r['model']} | {r['params_m']:.1f}M | {r['batch']} | {r['size']} | {r['dtype']} "
            f"| {r['infer_img_s']:.2f} | {r['train_img_s']:.2f} "
            f"| {r['infer_compile_s']:.1f} / {r['train_compile_s']:.1f} |"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {"args": vars(args), "device": str(jax.devices()[0]), "rows": rows}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
