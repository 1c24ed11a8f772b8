"""Checkpoint sources that are not local paths: Hugging Face hub ids and published URLs.

Hub ids (`"shi-labs/nat-mini-in1k-224"`) are fetched with `huggingface_hub` into its normal cache
(`cache_dir=` or `HF_HUB_CACHE`), so a second call, or any call with `HF_HUB_OFFLINE=1`, reads
the cache without the network. Only the files a NAT checkpoint needs are fetched: `config.json`,
`preprocessor_config.json` when present, and the first weights file that exists in the order
`model.safetensors`, `model.safetensors.index.json` (+ its shards), `pytorch_model.bin`.

URLs (original SHI-Labs `.pth` files) are downloaded once into `<cache>/natjax/<sha256>/<name>`
and their sha256 checked before use.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import urllib.request
from pathlib import Path

from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors
from huggingface_hub import hf_hub_download

CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
# Weights files of a Hugging Face repo, in order of preference (safetensors never runs code).
HUB_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# owner/name as the hub spells repo ids (no leading dot or slash, one slash).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def is_repo_id(source: str | os.PathLike) -> bool:
    """True for strings shaped like a hub repo id ("owner/name") that are not local paths."""
    text = os.fspath(source)
    return bool(_REPO_ID.match(text)) and not Path(text).exists() and not text.endswith(".json")


def offline() -> bool:
    """`HF_HUB_OFFLINE` as set now (huggingface_hub reads it only at import)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(hub_constants.HF_HUB_OFFLINE)


def _unreachable(
    repo_id: str, revision: str | None, cache_dir, err: Exception
) -> FileNotFoundError:
    cache = cache_dir or hub_constants.HF_HUB_CACHE
    mode = "HF_HUB_OFFLINE is set" if offline() else "the Hub could not be reached"
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return FileNotFoundError(
        f"{repo_id!r} (revision {revision or 'main'}) is not a local path, not in the Hugging Face "
        f"cache {cache}, and {mode} ({type(err).__name__}: {reason}). Download it once with "
        f"network access (it is then cached and works with HF_HUB_OFFLINE=1), pass cache_dir= "
        "pointing at a cache that holds it, or pass a local checkpoint folder."
    )


def download_repo(
    repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Fetch (or find in the cache) the files of a NAT/DiNAT checkpoint on the hub.

    Args:
      repo_id: "owner/name".
      revision: branch, tag or commit (default "main").
      cache_dir: hub cache folder (default: huggingface_hub's, `HF_HUB_CACHE`).

    Returns:
      The snapshot folder holding `config.json` and the weights.

    Raises:
      FileNotFoundError: the repo, revision or files are neither reachable nor cached (one
        message saying what to do), or the repo has no NAT weights file.
    """
    local_only = offline()

    def get(name: str) -> Path:
        return Path(
            hf_hub_download(
                repo_id, name, revision=revision, cache_dir=cache_dir, local_files_only=local_only
            )
        )

    try:
        folder = get(CONFIG_NAME).parent
    except (hub_errors.HfHubHTTPError, hub_errors.OfflineModeIsEnabled, OSError) as err:
        raise _unreachable(repo_id, revision, cache_dir, err) from None
    for name in (PREPROCESSOR_NAME, *HUB_WEIGHTS):
        try:
            path = get(name)
        except hub_errors.LocalEntryNotFoundError as err:
            # Offline: not cached, try the next file. Online: the Hub went away mid-way.
            if local_only:
                continue
            raise _unreachable(repo_id, revision, cache_dir, err) from None
        except hub_errors.EntryNotFoundError:
            continue  # the repo has no such file (404)
        except (hub_errors.HfHubHTTPError, OSError) as err:
            raise _unreachable(repo_id, revision, cache_dir, err) from None
        if name == PREPROCESSOR_NAME:
            continue
        if name.endswith(".index.json"):
            for shard in sorted(set(_index_shards(path))):
                get(shard)
        return folder
    raise FileNotFoundError(
        f"{repo_id!r} (revision {revision or 'main'}) has none of {', '.join(HUB_WEIGHTS)}"
        + (" in the local cache (HF_HUB_OFFLINE is set)" if local_only else "")
    )


def _index_shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [str(name) for name in weight_map.values()]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{index}: not a safetensors index ({err})") from None


def download_url(url: str, sha256: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download `url` once into the cache and check its sha256.

    Args:
      url: the file's address (`https://...`; `file://` works too, e.g. for tests).
      sha256: expected hex digest.
      cache_dir: cache root (default: huggingface_hub's cache); files land in
        `<cache_dir>/natjax/<sha256>/<file name>`.

    Returns:
      The cached file.

    Raises:
      FileNotFoundError: not cached and the download failed (offline or unreachable).
      ValueError: the downloaded bytes do not have the expected sha256 (the file is discarded).
    """
    root = Path(cache_dir or hub_constants.HF_HUB_CACHE) / "natjax" / sha256
    target = root / (Path(urllib.request.url2pathname(url.rsplit("/", 1)[-1])).name or "weights")
    if target.is_file():
        return target
    if offline():
        raise FileNotFoundError(
            f"{url}: not in the cache {root} and HF_HUB_OFFLINE is set; download it once with "
            "network access, or pass the local file"
        )
    root.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=root, delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (fixed table)
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    tmp.write(chunk)
        except OSError as err:
            tmp.close()
            os.unlink(tmp.name)
            raise FileNotFoundError(f"{url}: download failed ({err})") from None
    if digest.hexdigest() != sha256.lower():
        os.unlink(tmp.name)
        raise ValueError(
            f"{url}: sha256 {digest.hexdigest()} does not match the expected {sha256}; the file "
            "was discarded"
        )
    shutil.move(tmp.name, target)
    return target
