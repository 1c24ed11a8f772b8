"""Class names of a classifier: the config's `id2label`, ImageNet-1k's for 1000-class heads.

Checkpoints trained on ImageNet-1k sometimes ship no `id2label` (original SHI-Labs `.pth` files,
configs written by hand); their 1000 outputs follow the standard ILSVRC-2012 class order, so the
standard names are used. `imagenet1k_labels.txt` is that list, one name per line in class-index
order, taken from tensorflow-datasets' `IMAGENET_LABELS_LIST` (`datasets/siscore/labels.py`,
Apache-2.0; the same names and order as transformers' `utils/imagenet_classes.py`).
"""

from __future__ import annotations

import functools
import re
from importlib import resources

IMAGENET1K_CLASSES = 1000
# transformers' placeholder names when a config has no id2label.
_PLACEHOLDER = re.compile(r"LABEL_(\d+)$")


@functools.cache
def imagenet1k_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in class-index order."""
    text = resources.files("natjax.models").joinpath("imagenet1k_labels.txt").read_text("utf-8")
    names = tuple(line for line in text.splitlines() if line)
    assert len(names) == IMAGENET1K_CLASSES, len(names)
    return names


def _placeholders(labels) -> bool:
    return all(
        (m := _PLACEHOLDER.match(name)) is not None and int(m.group(1)) == i
        for i, name in enumerate(labels)
    )


def label_name(config, index: int) -> str:
    """The name of class `index` of `config`'s classifier.

    Args:
      config: a `NatConfig`.
      index: a class index in `[0, num_labels)`.

    Returns:
      `config.id2label[index]` when the config names its classes; the ImageNet-1k name when it
      has 1000 classes and no names (or only `LABEL_i` placeholders); else `"LABEL_<index>"`.
    """
    labels = config.id2label
    if labels and not (len(labels) == IMAGENET1K_CLASSES and _placeholders(labels)):
        return labels[index]
    if config.num_labels == IMAGENET1K_CLASSES:
        return imagenet1k_labels()[index]
    return f"LABEL_{index}"
