"""Peak memory of the eval transform on a thin image (issue 10 sec. 4): before and after.

    python experiments/preprocess_memory.py [--width 8000] [--repeats 3]

Writes a WIDTHx1 PNG (about 100 bytes), then in fresh child processes measures the peak
resident set (VmHWM, which excludes the parent) of: importing natjax and PIL and decoding the
file ("baseline"), the previous transform ("resize then crop": the whole image resized so its
shorter side is 256, then the centre 224x224 cropped; written out here because the library no
longer does it), and `natjax.preprocess` (crop located first, only it resampled). Prints the
median peak of each and the ratio to the baseline-subtracted previous transform.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, math, sys
from PIL import Image
import numpy as np
import natjax

def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

path, mode = sys.argv[1], sys.argv[2]
img = Image.open(path).convert("RGB")
if mode == "previous":
    size, crop_pct = 224, 0.875
    short = int(math.floor(size / crop_pct))
    w, h = img.size
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    big = img.resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    x = np.asarray(big.crop((left, top, left + size, top + size)), np.float32)
elif mode == "natjax":
    x = natjax.preprocess(path)
print(json.dumps({"peak_kib": peak_kib()}))
"""


def _peak(path: Path, mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])["peak_kib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "thin.png"
        Image.new("RGB", (args.width, 1), (200, 10, 10)).save(path)
        print(f"{args.width}x1 PNG: {path.stat().st_size} bytes; {args.repeats} runs each")
        peaks = {m: [_peak(path, m) for _ in range(args.repeats)]
                 for m in ("baseline", "previous", "natjax")}  # fmt: skip
    med = {m: statistics.median(v) / 1024 for m, v in peaks.items()}
    for mode, mib in med.items():
        extra = mib - med["baseline"]
        print(f"{mode:>9}: peak RSS {mib:8.1f} MiB  (+{extra:7.1f} MiB over baseline)")
    ratio = (med["previous"] - med["baseline"]) / max(med["natjax"] - med["baseline"], 0.1)
    print(f"previous / natjax extra memory: {ratio:.0f}x")


if __name__ == "__main__":
    main()
