"""Load time and peak memory of valid `.bin`/`.pth` checkpoints, reader of one tree vs another.

Files: the golden `nat_rand/pytorch_model.bin` and `dinat_rand/original.pth` (~100-125 small
tensors, 1.3-1.5 MB) and a synthetic `torch.save`-layout file of `--big-mib` MiB of float32
tensors (768x768 each, the size of a NAT-base MLP weight). Each round starts one child process per
tree (alternating, so machine load affects both alike); a child imports only the reader, loads
each file once to warm up, then times `--reps` loads of each. Prints the median over all rounds,
the ratio to the first tree, and each child's peak RSS (its
`VmHWM`).

    .venv/bin/python experiments/reader_load_speed.py --tree /work/main --tree .
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = [
    ROOT / "tests/data/models/nat_rand/pytorch_model.bin",
    ROOT / "tests/data/models/dinat_rand/original.pth",
]

CHILD = r"""
import json, sys, time, types
tree, reps, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
for name, sub in (("natjax", "natjax"), ("natjax.convert", "natjax/convert")):
    mod = types.ModuleType(name)
    mod.__path__ = [f"{tree}/{sub}"]
    sys.modules[name] = mod
from natjax.convert import torch_zip
out = {}
for f in files:
    torch_zip.load_torch_state_dict(f)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        state = torch_zip.load_torch_state_dict(f)
        times.append(time.perf_counter() - t)
        del state
    out[f] = times
# VmHWM: this process's own peak RSS (ru_maxrss would include the parent's, inherited via fork).
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"times": out, "hwm_mib": hwm / 1024}))
"""


def big_checkpoint(path: Path, mib: int) -> Path:
    """A torch.save-layout file of float32 768x768 tensors totalling about `mib` MiB."""
    sys.path.insert(0, str(ROOT))
    from natjax.convert.torch_save import save_torch_state_dict

    rng = np.random.default_rng(0)
    n = max(1, mib * 2**20 // (768 * 768 * 4))
    state = {f"layer{i}.weight": rng.standard_normal((768, 768), np.float32) for i in range(n)}
    save_torch_state_dict(state, path)
    return path


def run(tree: str, reps: int, files: list[str]) -> tuple[dict, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, tree, str(reps), *files],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    got = json.loads(out)
    return got["times"], got["hwm_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", help="source trees (first = baseline)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--big-mib", type=int, default=150)
    args = parser.parse_args()
    trees = [str(Path(t).resolve()) for t in (args.tree or ["."])]
    with tempfile.TemporaryDirectory() as tmp:
        big = big_checkpoint(Path(tmp) / "big.pth", args.big_mib)
        files = [str(p) for p in [*GOLDEN, big]]
        times = {t: {f: [] for f in files} for t in trees}
        rss = {t: [] for t in trees}
        for _ in range(args.rounds):
            for tree in trees:
                got, peak = run(tree, args.reps, files)
                rss[tree].append(peak)
                for f, ts in got.items():
                    times[tree][f].extend(ts)
        base = trees[0]
        print(f"{args.rounds} rounds x {args.reps} loads per tree; median ms (ratio to {base})")
        for f in files:
            size = Path(f).stat().st_size / 2**20
            line = f"{Path(f).parent.name + '/' + Path(f).name:34s} {size:7.1f} MiB"
            for tree in trees:
                med = statistics.median(times[tree][f]) * 1e3
                ratio = med / (statistics.median(times[base][f]) * 1e3)
                line += f" | {Path(tree).name}: {med:8.2f} ms ({ratio:4.2f}x)"
            print(line)
        line = f"{'peak RSS of a child (all files)':34s} {'':11s}"
        for tree in trees:
            line += f" | {Path(tree).name}: {statistics.median(rss[tree]):8.1f} MiB        "
        print(line)


if __name__ == "__main__":
    main()
