"""`read_json_object`: the small JSON files natjax reads, with bounded size and nesting.

`config.json`, `model.safetensors.index.json` (natjax.convert) and `preprocessor_config.json`
(natjax.models.preprocessing) come from checkpoint folders, possibly hostile ones: every failure
is one ValueError, never a RecursionError from the parser or gigabytes read into memory.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

# A config.json is a few KB (an ImageNet-22k id2label ~1 MB), a shard index ~100 bytes per
# tensor: anything far larger is not one of them.
MAX_JSON_BYTES = 64 * 2**20
# JSON nesting deeper than this is refused before Python's recursion limit is reached.
MAX_JSON_DEPTH = 64


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a JSON object from a small UTF-8 file, every failure as one ValueError.

    Args:
      path: the file.

    Returns:
      The parsed dict.

    Raises:
      ValueError: file too large, not UTF-8, nested deeper than MAX_JSON_DEPTH, not JSON, or
        not an object (the message says which; the caller adds the file name).
    """
    size = os.path.getsize(path)
    if size > MAX_JSON_BYTES:
        raise ValueError(
            f"{size} bytes; natjax reads JSON files of at most {MAX_JSON_BYTES} bytes."
        )
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text (byte {err.start}).") from None
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested {depth} levels deep (at most {MAX_JSON_DEPTH}).")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err}).") from None
    if not isinstance(data, dict):
        raise ValueError("does not hold a JSON object.")
    return data


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def _json_depth(text: str) -> int:
    """Maximum bracket nesting outside strings (linear, no recursion)."""
    depth = deepest = 0
    for ch in _BRACKETS.findall(_JSON_STRING.sub("", text)):
        depth += 1 if ch in "[{" else -1
        deepest = max(deepest, depth)
    return deepest
