"""Checkpoint conversion: Hugging Face key mapping (`natjax.convert.hf`), config.json translation
(`natjax.convert.hf_config`) and friends.

The PyTorch-free `.bin`/`.pth` reader, the original SHI-Labs layout and `from_pretrained` live in
sibling modules (`torch_zip`, `original`, `checkpoint`); import them directly.
"""

from natjax.convert.hf import (
    LoadResult,
    hf_to_nnx,
    key_table,
    kind_from_hf_keys,
    model_kind,
    nnx_to_hf,
)
from natjax.convert.hf_config import from_hf_config, kind_from_hf_config, to_hf_config

__all__ = [
    "LoadResult",
    "from_hf_config",
    "hf_to_nnx",
    "key_table",
    "kind_from_hf_config",
    "kind_from_hf_keys",
    "model_kind",
    "nnx_to_hf",
    "to_hf_config",
]
