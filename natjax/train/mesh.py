"""Device mesh ('data', 'fsdp', 'model') and parameter sharding rules.

Parameters are sharded by rules over the logical axis names the models attach to each
`nnx.Param` (`out_sharding` / `sharding_names` metadata):
  * logical names in `MODEL_AXIS_RULES` go to the 'model' axis (tensor parallelism) when it has
    more than one device and the dimension divides;
  * then FSDP (ZeRO-3 style) shards the largest remaining dimension that the 'fsdp' axis size
    divides — a rule on shapes, so it also covers parameters without names;
  * everything else is replicated.
The batch is split over ('data', 'fsdp') together, so FSDP devices also split the batch.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from natjax.train.config import MeshConfig

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
# Logical axis names (as used by the models) that tensor parallelism splits: attention heads
# and the MLP hidden dimension (Megatron-style column/row split).
MODEL_AXIS_RULES = ("heads", "mlp", "qkv", "hidden")


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """Builds the mesh; `data=-1` takes the devices left after fsdp x model.

    Raises:
      ValueError: if the sizes do not multiply to the device count.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    fixed = cfg.fsdp * cfg.model * (cfg.data if cfg.data > 0 else 1)
    if cfg.data == -1:
        if n % (cfg.fsdp * cfg.model):
            raise ValueError(
                f"mesh.fsdp={cfg.fsdp} x mesh.model={cfg.model} does not divide the {n} devices."
            )
        shape = (n // (cfg.fsdp * cfg.model), cfg.fsdp, cfg.model)
    else:
        if fixed != n:
            raise ValueError(
                f"mesh data={cfg.data} x fsdp={cfg.fsdp} x model={cfg.model} = {fixed} != "
                f"{n} devices (use mesh.data=-1 to fill)."
            )
        shape = (cfg.data, cfg.fsdp, cfg.model)
    # Auto axes: shardings are given at the jit boundary and XLA (GSPMD) propagates them
    # through the model, which needs no sharding annotations of its own.
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices
    )


def logical_names(variable: nnx.Variable) -> tuple | None:
    """The logical axis names a model attached to a parameter, if any."""
    meta = variable.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names is not None and not isinstance(names, jax.sharding.Sharding):
            return tuple(names)
    return None


def param_spec(shape: tuple[int, ...], names: tuple | None, mesh: jax.sharding.Mesh) -> P:
    """PartitionSpec for one parameter (see module docstring for the rules)."""
    spec: list = [None] * len(shape)
    model_size = mesh.shape["model"]
    if names is not None and model_size > 1 and len(names) == len(shape):
        for i, name in enumerate(names):
            if name in MODEL_AXIS_RULES and shape[i] % model_size == 0:
                spec[i] = "model"
                break
    fsdp = mesh.shape["fsdp"]
    if fsdp > 1:
        free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % fsdp == 0]
        if free:
            spec[max(free, key=lambda i: (shape[i], -i))] = "fsdp"
    return P(*spec)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """A NamedSharding per leaf of an nnx.State of Variables (same structure)."""

    def one(v):
        if isinstance(v, nnx.Variable):
            return NamedSharding(
                mesh, param_spec(tuple(v.get_value().shape), logical_names(v), mesh)
            )
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
    """Leading axis over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def like_params(tree, params, param_shardings, default: NamedSharding):
    """Shardings for an optimizer-state-like tree: a leaf whose path ends with a parameter's
    path and has its shape (Adam moments, EMA) gets that parameter's sharding, others `default`.
    """
    by_path = {
        tuple(path): (tuple(leaf.shape), sh)
        for (path, leaf), sh in zip(
            jax.tree_util.tree_flatten_with_path(params)[0],
            jax.tree.leaves(param_shardings),
            strict=True,
        )
    }

    def one(path, leaf):
        path = tuple(path)
        for start in range(len(path)):
            hit = by_path.get(path[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(one, tree)
