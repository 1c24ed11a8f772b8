"""Datasets and the deterministic, checkpointable, process-sharded batch loader.

Sources are random-access (`len`, `source[i] -> (uint8 HWC image, int label)`):
  * `DigitsSource`: scikit-learn's bundled 8x8 handwritten digits (offline default);
  * `TfdsSource`: any tfds image-classification dataset through `tfds.data_source` (ArrayRecord,
    no TensorFlow at run time);
  * `FolderSource`: `root/<split>/<class>/*.{jpg,png,...}` for users' own images (or one
    class-per-folder root, with a held-out validation share).

`BatchLoader` makes batch `step` from (seed, step) alone: epoch = step // steps_per_epoch, the
epoch's order is a permutation seeded by (seed, epoch), and every example gets its own
augmentation generator seeded by (seed, step, position in the global batch). So the loader's
whole state is the next step number (saved with each checkpoint), results do not depend on the
number of grain workers or processes, and a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from pathlib import Path

import grain
import numpy as np

from natjax.models.preprocessing import open_image
from natjax.train import augment
from natjax.train.config import AugmentConfig, DataConfig

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DigitsSource:
    """scikit-learn's `load_digits` (1797 8x8 images, 10 classes) upsampled to `size`.

    A fixed seeded 80/20 split (1437 train / 360 validation), independent of the run's seed.
    """

    num_classes = 10
    classes = tuple(str(i) for i in range(10))

    def __init__(self, split: str, size: int = 32) -> None:
        from sklearn.datasets import load_digits

        if split not in ("train", "validation", "test"):
            raise ValueError(
                f"digits: split={split!r} is invalid; use train, validation or test (the same "
                "360 held-out digits as validation)."
            )
        d = load_digits()
        order = np.random.default_rng(1234).permutation(len(d.target))
        n_val = 360
        idx = order[n_val:] if split == "train" else order[:n_val]
        # 0..16 intensities -> 0..255, upsampled bilinearly so NAT's /4 stem sees real strokes.
        imgs = (d.images[idx] * (255.0 / 16.0)).round().astype(np.uint8)
        if size != 8:
            from PIL import Image

            imgs = np.stack(
                [
                    np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                    for im in imgs
                ]
            )
        self.images = np.repeat(imgs[..., None], 3, axis=-1)
        self.labels = d.target[idx].astype(np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


class TfdsSource:
    """A tfds dataset read through `tfds.data_source` (needs the dataset prepared in data_dir)."""

    def __init__(self, name: str, split: str, data_dir: str | None = None) -> None:
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as err:  # tfds raises its own DatasetNotFoundError subclasses.
            raise ValueError(f"data.dataset={name!r}: not a tfds dataset ({err}).") from None
        features = builder.info.features
        label = features["label"] if "label" in features.keys() else None  # noqa: SIM118
        if label is None or not hasattr(label, "num_classes"):
            raise ValueError(f"data.dataset={name!r} has no ClassLabel 'label' feature.")
        self.num_classes = int(label.num_classes)
        names = list(getattr(label, "names", None) or [])
        self.classes = tuple(names) if len(names) == self.num_classes else None
        try:
            # download=False: never fetch data at training time; prepare it beforehand.
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as err:
            raise ValueError(
                f"data.dataset={name!r} split={split!r}: cannot open with tfds.data_source in "
                f"data_dir={data_dir!r}; prepare it first in a random-access format, e.g. "
                f"`tfds build {name} --file_format=array_record --data_dir=DIR` ({err})"
            ) from None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        rec = self._source[int(i)]
        return np.asarray(rec["image"]), int(rec["label"])


# Folder datasets without a validation/ folder hold out this fraction of every class.
HELD_OUT_FRACTION = 0.1


def _held_out(files: list[Path], name: str, keep: bool) -> list[Path]:
    """The validation share of one class's files (`keep`), or the rest (train)."""
    n_val = max(1, round(HELD_OUT_FRACTION * len(files))) if len(files) >= 2 else 0
    seed = int.from_bytes(name.encode()[:16].ljust(16, b"\0"), "little")
    order = np.random.default_rng((20240, seed)).permutation(len(files))
    chosen = set(order[:n_val].tolist())
    return [f for i, f in enumerate(files) if (i in chosen) == keep]


class FolderSource:
    """Your own images, one sub-folder per class; classes are the sorted sub-folder names.

    Layouts, in this order:
      * `root/<split>/<class>/<image>` (e.g. `train/` and `validation/`), used as they are;
      * `root/train/<class>/...` without the requested split, or `root/<class>/...` alone: a
        fixed `HELD_OUT_FRACTION` of each class (at least one image of classes with two or
        more) is the "validation" split and the rest "train" (chosen by a seeded permutation
        independent of the run's seed, so every run and resume sees the same split).

    Unreadable images (truncated, corrupt, empty, not really images) never stop a run: each is
    reported once by name with a warning and replaced by the next readable image of the
    dataset (deterministically, so resumed runs see the same batches); `skipped` lists them.
    Empty files are skipped at scan time.
    """

    def __init__(self, root: str, split: str) -> None:
        self.root = root
        base, held_out = self._layout(Path(root), split)
        where = f"data.dataset='folder:{root}'"
        self.classes = sorted(p.name for p in base.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"{where}: {str(base)!r} has no class folders.")
        self.num_classes = len(self.classes)
        found = []
        for c, name in enumerate(self.classes):
            files = [
                f for f in sorted((base / name).iterdir()) if f.suffix.lower() in _IMAGE_SUFFIXES
            ]
            if held_out:
                files = _held_out(files, name, keep=split != "train")
            found += [(f, c) for f in files]
        self.items = [(str(f), c) for f, c in found if f.stat().st_size > 0]
        self.skipped: dict[str, str] = {
            str(f): "empty file" for f, _ in found if f.stat().st_size == 0
        }
        if self.skipped:
            warnings.warn(
                f"{where}: skipping {len(self.skipped)} empty image "
                f"file(s) in {split}/, e.g. {next(iter(self.skipped))}.",
                stacklevel=2,
            )
        if not self.items:
            raise ValueError(f"{where}: no {split} images under {str(base)!r}.")

    @staticmethod
    def _layout(root: Path, split: str) -> tuple[Path, bool]:
        """(folder holding the class folders, whether `split` is carved out of it)."""
        where = f"data.dataset='folder:{root}'"
        if (root / split).is_dir():
            return root / split, False
        if split not in ("train", "validation"):
            raise FileNotFoundError(f"{where}: no folder {str(root / split)!r}.")
        if (root / "train").is_dir():
            return root / "train", True
        if not root.is_dir():
            raise FileNotFoundError(f"{where}: no folder {str(root)!r}.")
        return root, True

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, i: int) -> np.ndarray:
        # The decoder `natjax predict` uses: RGB, and images above its pixel cap are refused
        # before decoding (a 100-byte PNG can declare gigabytes of pixels).
        return np.asarray(open_image(self.items[i][0]))

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        for offset in range(len(self.items)):
            j = (i + offset) % len(self.items)
            path, label = self.items[j]
            if path in self.skipped:
                continue
            try:
                return self._read(j), label
            except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for bad files
                self.skipped[path] = f"{type(err).__name__}: {err}"
                warnings.warn(
                    f"data.dataset='folder:{self.root}': skipping unreadable image {path} "
                    f"({self.skipped[path][:200]}); {len(self.skipped)} skipped so far.",
                    stacklevel=2,
                )
        raise ValueError(f"data.dataset='folder:{self.root}': no readable image left.")


def make_source(cfg: DataConfig, split: str):
    """The source named by `cfg.dataset` for `split`."""
    if cfg.dataset == "digits":
        return DigitsSource(split, cfg.digits_size)
    if cfg.dataset.startswith("folder:"):
        return FolderSource(cfg.dataset[len("folder:") :], split)
    return TfdsSource(cfg.dataset, split, cfg.data_dir)


def _process_slice(global_batch: int, process_index: int, process_count: int) -> slice:
    if global_batch % process_count:
        raise ValueError(
            f"batch size {global_batch} must be divisible by the process count {process_count}."
        )
    local = global_batch // process_count
    return slice(process_index * local, (process_index + 1) * local)


def _prefetch(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    """Runs `ds` in `num_workers` grain worker processes (0: in this process)."""
    if num_workers <= 0:
        return ds
    from absl import flags

    # grain reads absl flags in its workers; natjax is not an absl app, so mark them parsed.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


class BatchLoader:
    """Training batches as a pure function of the step (see module docstring).

    Args:
      source: a random-access source.
      cfg: data config (batch_size is global).
      aug: augmentation config.
      seed: run seed.
      process_index, process_count: this host's share of each global batch.
    """

    def __init__(
        self,
        source,
        cfg: DataConfig,
        aug: AugmentConfig,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ) -> None:
        self.source, self.cfg, self.aug, self.seed = source, cfg, aug, seed
        self.steps_per_epoch = len(source) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data.batch_size={cfg.batch_size} exceeds the {len(source)} training examples."
            )
        self._slice = _process_slice(cfg.batch_size, process_index, process_count)

    @functools.lru_cache(maxsize=2)  # noqa: B019 (two epochs at most are live at once)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(len(self.source))

    def indices(self, step: int) -> np.ndarray:
        """Global example indices of batch `step`."""
        epoch, b = divmod(step, self.steps_per_epoch)
        bs = self.cfg.batch_size
        return self._order(epoch)[b * bs : (b + 1) * bs]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's share of global batch `step`: uint8 images and int32 labels."""
        idx = self.indices(step)
        positions = range(len(idx))[self._slice]
        images, labels = [], []
        for pos in positions:
            img, label = self.source[int(idx[pos])]
            rng = np.random.default_rng((self.seed, step, pos))
            images.append(augment.train_transform(img, rng, self.cfg.image_size, self.aug))
            labels.append(label)
        return {"image": np.stack(images), "label": np.asarray(labels, np.int32)}

    def iterate(self, start_step: int, end_step: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches start_step..end_step-1 through grain (worker processes if num_workers > 0)."""
        ds = grain.MapDataset.range(start_step, end_step).map(self.batch).to_iter_dataset()
        return iter(_prefetch(ds, self.cfg.num_workers))


class EvalLoader:
    """Evaluation batches in order, the last one padded; `mask` marks real examples."""

    def __init__(self, source, cfg: DataConfig, process_index: int = 0, process_count: int = 1):
        self.source, self.cfg = source, cfg
        self.num_batches = -(-len(source) // cfg.eval_batch_size)
        self._slice = _process_slice(cfg.eval_batch_size, process_index, process_count)

    def batch(self, b: int) -> dict[str, np.ndarray]:
        bs = self.cfg.eval_batch_size
        positions = range(b * bs, (b + 1) * bs)[self._slice]
        size = self.cfg.image_size
        images = np.zeros((len(positions), size, size, 3), np.uint8)
        labels = np.zeros((len(positions),), np.int32)
        mask = np.zeros((len(positions),), bool)
        for j, i in enumerate(positions):
            if i < len(self.source):
                img, label = self.source[i]
                images[j] = augment.eval_transform(img, size, self.cfg.crop_pct)
                labels[j], mask[j] = label, True
        return {"image": images, "label": labels, "mask": mask}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        ds = grain.MapDataset.range(self.num_batches).map(self.batch).to_iter_dataset()
        return iter(_prefetch(ds, self.cfg.num_workers))
