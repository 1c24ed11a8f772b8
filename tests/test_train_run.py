"""What a training run leaves and how it stops: the deployable model (EMA weights), --init-from
(architecture from the checkpoint, short mismatch errors), Ctrl-C during compilation, the
training extra (missing packages named), the eval table, packaged recipes."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

from natjax.train import config as C
from natjax.train.defaults import load_config

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = (
    "model.overrides={'embed_dim': 16, 'depths': (1, 1), 'num_heads': (1, 2), 'kernel_size': 3}"
)
TINY = [TINY_MODEL, "model.dtype=float32", "data.digits_size=16", "data.image_size=16",
        "data.batch_size=8", "run.progress=false"]  # fmt: skip


def _tiny_trainer(*extra: str, class_names=None):
    from natjax.train import mesh as mesh_lib
    from natjax.train.state import Trainer

    cfg = C.apply_overrides(load_config(None), [*TINY, *extra])
    mesh = mesh_lib.make_mesh(cfg.mesh)
    return cfg, Trainer(cfg, mesh, 10, steps_per_epoch=10, class_names=class_names)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ------------------------------------------------------------------------- deployable model


def test_deployable_model_holds_the_ema_weights_and_class_names(tmp_path):
    import jax
    from flax import nnx

    import natjax
    from natjax.train.deploy import write_deployable

    names = tuple(f"class {c}" for c in "abcdefghij")
    cfg, trainer = _tiny_trainer("optim.ema_decay=0.9", class_names=names)
    # EMA and weights differ (as after training), so the test sees which one was written.
    trainer.state["ema"] = jax.tree.map(lambda x: x * 0.5 + 0.25, trainer.state["params"])
    assert write_deployable(trainer, tmp_path, cfg.data, use_ema=True) == tmp_path
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".deploy_")]  # moved
    model = natjax.from_pretrained(tmp_path)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    want = jax.device_get(trainer.state["ema"])
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert model.config.id2label == names
    assert model.preprocessing.size == (16, 16) and model.preprocessing.crop_pct == 1.0
    write_deployable(trainer, tmp_path, cfg.data, use_ema=False)
    plain = nnx.to_pure_dict(nnx.state(natjax.from_pretrained(tmp_path), nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, plain, jax.device_get(trainer.state["params"]))


# -------------------------------------------------------------------------------- init-from


def _pretrained(tmp_path: Path, num_labels: int, **fields) -> Path:
    import dataclasses

    from flax import nnx

    import natjax
    from natjax.train.state import nat_config

    cfg = C.apply_overrides(load_config(None), TINY)
    config = dataclasses.replace(nat_config(cfg, num_labels), **fields)
    model = natjax.NatForImageClassification(config, rngs=nnx.Rngs(7))
    return natjax.save_pretrained(model, tmp_path / "pre")


def test_init_from_takes_the_checkpoints_architecture(tmp_path):
    from natjax.train.init_from import with_checkpoint_architecture
    from natjax.train.state import nat_config

    src = _pretrained(tmp_path, 5, embed_dim=24, num_heads=(2, 4), mlp_ratio=2.5)
    messages = []
    # The run names another architecture (the digits default's); the checkpoint's wins, and
    # the run's own override (drop-path) stays on top of it.
    base = C.apply_overrides(load_config(None), ["model.overrides={'drop_path_rate': 0.05}"])
    cfg = with_checkpoint_architecture(
        C.apply_overrides(base, [f"run.init_from={src}"]), messages.append
    )
    config = nat_config(cfg, 10)
    assert (config.embed_dim, config.num_heads, config.depths) == (24, (2, 4), (1, 1))
    assert config.mlp_ratio == 2.5 and config.drop_path_rate == 0.05
    assert config.num_labels == 10  # from the dataset, not the checkpoint's 5
    assert "drop_path_rate" in messages[0]
    # Stored in train_config.json, the architecture survives a JSON round trip (resume, eval).
    again = C.from_dict(json.loads(json.dumps(C.to_dict(cfg))))
    assert nat_config(again, 10) == config
    assert with_checkpoint_architecture(base, messages.append) is base  # no init_from: as is
    with pytest.raises(ValueError, match=r"run.init_from='.*nowhere'"):
        with_checkpoint_architecture(
            C.apply_overrides(base, [f"run.init_from={tmp_path / 'nowhere'}"]), print
        )


def test_init_from_mismatch_is_one_short_error(tmp_path):
    from natjax.train.init_from import load_pretrained_params

    src = _pretrained(tmp_path, 10, embed_dim=24, num_heads=(2, 4))
    _, trainer = _tiny_trainer()  # embed 16: every trunk tensor differs
    with pytest.raises(ValueError) as info:
        load_pretrained_params(trainer, str(src), print)
    message = str(info.value)
    assert len(message) < 1200 and "\n" not in message, message
    assert re.search(r"\(\d+ tensors of the run missing or reshaped, 0 checkpoint", message)
    assert re.search(r"; \+\d+ more\. Drop the model.overrides", message)
    assert message.count("run (") == 5  # the first five mismatches, each with both shapes


# ---------------------------------------------------------------------------------- signals


def test_sigint_while_compiling_exits_130_at_once_without_traceback(tmp_path):
    """Ctrl-C during the first step's compilation: nothing to save, exit 130 right away."""
    script = (
        "import os, signal, sys\n"
        "from natjax.train import state as _state\n"
        "_step = _state.Trainer.step\n"
        "def _step0(self, batch, step):\n"
        "    os.kill(os.getpid(), signal.SIGINT)  # as the compilation starts\n"
        "    return _step(self, batch, step)\n"
        "_state.Trainer.step = _step0\n"
        "from natjax.cli import main\n"
        f"sys.exit(main({['train', '--workdir', str(tmp_path)] + [a for s in TINY for a in ('--set', s)]!r}))\n"  # noqa: E501
    )
    p = subprocess.run(
        [sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 130, p.stderr[-3000:]
    assert "SIGINT: exiting now (nothing to save" in p.stderr
    assert "Traceback" not in p.stderr and "Segmentation" not in p.stderr
    assert not (tmp_path / "metrics.jsonl").read_text().strip()  # not one step recorded
    assert not [d for d in (tmp_path / "checkpoints").iterdir() if d.name.isdigit()]


def test_exit_status_of_signals():
    from natjax.train.interrupt import exit_status

    assert exit_status(signal.SIGINT) == 130 and exit_status(signal.SIGTERM) == 143


# -------------------------------------------------------------------------------- packaging


def test_base_install_has_no_training_stack():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    heavy = (
        "optax",
        "orbax-checkpoint",
        "grain",
        "tensorflow-datasets",
        "scikit-learn",
        "matplotlib",
    )

    def names(requirements):
        return [re.split(r"[<>=\[ ~!]", d, maxsplit=1)[0] for d in requirements]

    base = names(meta["dependencies"])
    assert not [n for n in base if n in heavy], base
    extra = names(meta["optional-dependencies"]["train"])
    assert set(heavy) <= set(extra), extra
    assert any("natjax[train]" in d for d in meta["optional-dependencies"]["test"])
    assert "'.[train,test]'" in (ROOT / "Makefile").read_text()
    assert "build/" in (ROOT / ".gitignore").read_text().split()
    from natjax.train import TRAINING_MODULES

    # The import names checked at run time cover the extra (orbax-checkpoint -> orbax...).
    assert len(TRAINING_MODULES) == len(extra)


def test_without_the_training_extra_models_work_and_train_names_the_extra(tmp_path):
    # As if grain and scikit-learn were not installed (None in sys.modules blocks the import).
    # optax and orbax-checkpoint cannot be left out: flax itself requires (and imports) them.
    script = (
        "import sys\n"
        "sys.modules['grain'] = None\n"
        "sys.modules['sklearn'] = None\n"
        "import natjax\n"
        "heavy = ('grain', 'tensorflow_datasets', 'sklearn', 'matplotlib')\n"
        "loaded = [m for m in heavy if sys.modules.get(m) is not None]\n"
        "assert not loaded, loaded\n"
        "assert natjax.get_config('nat_mini').embed_dim == 64\n"
        "from natjax.cli import main\n"
        f"sys.exit(main(['train', '--workdir', {str(tmp_path)!r}]))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 2, p.stderr[-3000:]
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "missing here: grain, sklearn" in err and "pip install 'natjax[train]'" in err


# ------------------------------------------------------------------------------------- eval


def test_eval_table_and_top5_only_above_five_classes():
    from natjax.train.evaluate import format_table

    table = format_table(
        {"top1": 0.5, "top5": 0.75, "loss": 1.25, "count": 40, "num_classes": 10}, "title"
    )
    lines = table.splitlines()
    assert lines[0] == "title" and set(lines[1]) == {"-"}
    assert [line.split()[0] for line in lines[2:]] == ["images", "classes", "top-1", "top-5",
                                                       "loss"]  # fmt: skip
    assert "50.00 %" in lines[4] and "75.00 %" in lines[5]
    assert len({len(line) for line in lines[2:]}) == 1  # aligned columns
    small = format_table({"top1": 1.0, "loss": 0.1, "count": 4, "num_classes": 3}, "t")
    assert "top-5" not in small


# ---------------------------------------------------------------------------------- recipes


def test_every_recipe_loads_by_name_and_is_packaged():
    import setuptools

    from natjax.train import recipes

    shipped = {p.stem for p in (ROOT / "experiments" / "configs").glob("*.py")} - {"in1k_recipe"}
    assert set(recipes.names()) == shipped
    for name in recipes.names():
        cfg = recipes.load(name)
        assert isinstance(cfg, C.TrainConfig), name
        # The experiment file and the packaged recipe are the same config.
        assert load_config(ROOT / "experiments" / "configs" / f"{name}.py") == cfg, name
    assert recipes.load("nat_tiny_in1k").model.preset == "nat_tiny"
    with pytest.raises(ValueError, match=r"--config 'nat_tiny_in1kk'.*did you mean nat_tiny_in1k"):
        recipes.load("nat_tiny_in1kk")
    # They are modules of the natjax package, so every install (wheel, non-editable) has them.
    packages = setuptools.find_packages(str(ROOT), include=["natjax*"])
    assert "natjax.train.recipes" in packages
    assert (ROOT / "natjax" / "train" / "recipes" / "__init__.py").is_file()


def test_finetune_defaults_fit_a_small_machine():
    from natjax.train import recipes

    cfg = recipes.load("finetune")
    assert cfg.data.batch_size <= 32 and cfg.data.num_workers <= (os.cpu_count() or 1)
    # The peak learning rate at the recipe's own batch size (no linear down-scaling to ~0).
    assert cfg.optim.lr * cfg.data.batch_size / cfg.optim.base_batch_size >= 1e-4


# ------------------------------------------------------------------------- folder datasets


def _class_folders(root: Path, counts: dict[str, int], size: int = 24) -> None:
    """Flat images of one colour per class (learnable in a few steps)."""
    from PIL import Image

    colours = [(220, 40, 40), (40, 40, 220), (40, 200, 40)]
    rng = np.random.default_rng(0)
    for (name, n), colour in zip(counts.items(), colours, strict=False):
        (root / name).mkdir(parents=True)
        for i in range(n):
            noise = rng.integers(-20, 21, (size, size, 3))
            pixels = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")


def test_single_class_per_folder_root_gets_a_validation_split(tmp_path):
    from natjax.train.data import make_source

    _class_folders(tmp_path, {"cat": 20, "dog": 11, "eel": 1})
    cfg = C.DataConfig(dataset=f"folder:{tmp_path}")
    train, val = make_source(cfg, "train"), make_source(cfg, "validation")
    assert train.classes == val.classes == ["cat", "dog", "eel"]
    per_class = lambda src: [sum(1 for _, c in src.items if c == k) for k in range(3)]  # noqa: E731
    assert per_class(val) == [2, 1, 0] and per_class(train) == [18, 10, 1]
    assert not {p for p, _ in train.items} & {p for p, _ in val.items}
    again = make_source(cfg, "validation")
    assert again.items == val.items  # the same split every time
    with pytest.raises(FileNotFoundError, match="no folder"):
        make_source(cfg, "test")


def test_finetune_journey_on_a_folder_then_predict(tmp_path):
    """README's journey offline: a pretrained folder (here a tiny random one), `natjax train
    --config finetune --init-from` on one class-per-folder root with the recipe's defaults
    (batch 32, its learning rate), then `natjax predict --model WORKDIR`."""
    src = _pretrained(tmp_path, 1000)  # an "ImageNet" head: replaced by a 2-class one
    data = tmp_path / "pets"
    _class_folders(data, {"cat": 24, "dog": 24}, size=40)
    workdir = tmp_path / "run"
    args = ["train", "--config", "finetune", "--init-from", str(src), "--workdir", str(workdir)]
    for s in (f"data.dataset=folder:{data}", "data.image_size=32", "data.num_workers=0",
              "model.dtype=float32", "run.progress=false", "run.log_every=1"):  # fmt: skip
        args += ["--set", s]
    script = f"import sys\nfrom natjax.cli import main\nsys.exit(main({args!r}))\n"
    p = subprocess.run(
        [sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "its architecture" in p.stderr and "fresh classifier head" in p.stderr
    from natjax.train import metrics

    train = [r for r in metrics.read_jsonl(workdir / "metrics.jsonl") if r["split"] == "train"]
    assert len(train) >= 10
    first, last = train[0]["loss"], train[-1]["loss"]
    assert last < first - 0.1, (first, last)  # the recipe's learning rate moves the loss
    evals = [r for r in metrics.read_jsonl(workdir / "metrics.jsonl") if r["split"] == "eval"]
    assert evals[-1]["count"] == 4 and "top5" not in evals[-1]  # held-out 10 %; 2 classes
    image = data / "dog" / "000.png"
    predict = ["predict", "--model", str(workdir), str(image), "--top-k", "2"]
    script = f"import sys\nfrom natjax.cli import main\nsys.exit(main({predict!r}))\n"
    p = subprocess.run(
        [sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"1\. \d\.\d{4}  (cat|dog) \(\d\)", p.stdout), p.stdout


# --------------------------------------------------------------------------------- progress


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_progress_on_a_terminal_and_in_a_log():
    from natjax.train.progress import Progress

    metrics = {"loss": 1.5, "accuracy": 0.25, "lr": 1e-3}
    tty = _Stream(True)
    p = Progress(True, stream=tty)
    with p.compiling("the train step"):
        time.sleep(1.3)  # the elapsed time ticks once a second while compiling
    assert "compiling the train step... 1 s" in tty.getvalue()
    assert re.search(r"\rcompiled the train step in 1\.\d s\n", tty.getvalue())
    p.start(1, 10)  # timing starts after the compiling step
    time.sleep(0.05)
    ips, eta = p.rate(5, 16, 10)
    assert 0 < ips < 16 * 4 / 0.05 and 0 < eta < 1.0  # excludes the 1.3 s compilation
    p.update(5, 10, 0.5, metrics, ips, eta)
    p.message("eval @ step 5")
    p.close()
    out = tty.getvalue()
    assert "img/s" in out and "ETA 0:00:00" in out and "loss 1.5000" in out and "5/10" in out
    assert "eval @ step 5\n" in out
    log = _Stream(False)
    p = Progress(True, stream=log)
    with p.compiling("the train step"):
        pass
    p.start(1, 10)
    p.update(4, 10, 0.4, metrics, 100.0, 6.0)
    lines = log.getvalue().splitlines()
    assert lines[0] == "compiling the train step..." and lines[1].startswith("compiled the")
    assert lines[2].startswith("step 4/10 [ 40%] ep 0.4 | loss 1.5000") and "\r" not in lines[2]
    quiet = _Stream(False)
    Progress(False, stream=quiet).update(4, 10, 0.4, metrics, 100.0, 6.0)
    assert quiet.getvalue() == ""


# ---------------------------------------------------------------------- never hang, one line


def test_checkpoint_write_failure_mid_run_exits_2_without_hanging(tmp_path):
    """A full disk at the first checkpoint (stand-in: orbax's save raises ENOSPC): one line,
    status 2, and the process ends (orbax's threads are closed)."""
    script = (
        "import sys, orbax.checkpoint as ocp\n"
        "def full(*a, **k):\n"
        "    raise OSError(28, 'No space left on device')\n"
        "ocp.CheckpointManager.save = full\n"
        "from natjax.cli import main\n"
        f"sys.exit(main({['train', '--workdir', str(tmp_path), '--max-steps', '2'] + [a for s in [*TINY, 'run.checkpoint_every=1'] for a in ('--set', s)]!r}))\n"  # noqa: E501
    )
    p = subprocess.run(
        [sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("natjax train: error: cannot write checkpoint step 1") and (
        "No space left on device" in last
    ), p.stderr[-3000:]
    assert "Traceback" not in p.stderr


def test_folder_images_over_the_pixel_cap_are_skipped(tmp_path):
    from PIL import Image

    from natjax.models.preprocessing import MAX_PIXELS
    from natjax.train.data import make_source

    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "train" / cls / "ok.png")
    # A few KB on disk, over 64 Mpx decoded: refused before decoding, like `natjax predict`.
    Image.new("1", (9000, MAX_PIXELS // 9000 + 1)).save(tmp_path / "train" / "a" / "huge.png")
    src = make_source(C.DataConfig(dataset=f"folder:{tmp_path}"), "train")
    huge = [i for i, (p, _) in enumerate(src.items) if p.endswith("huge.png")][0]
    with pytest.warns(UserWarning, match=r"huge.png .*exceeds max_pixels"):
        image, _ = src[huge]
    assert image.shape == (8, 8, 3)
