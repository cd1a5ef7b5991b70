"""The training state: parameters, their EMA, the optimizer and its schedule.

The state is a plain pytree, replicated over the mesh; abstract versions of it (and of its EMA
parameters alone) are the targets that checkpoints restore into.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ihdm_jax import parallel
from ihdm_jax.models import unet


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # number of updates applied so far
    params: Any
    ema_params: Any
    opt_state: Any


def learning_rate(config):
    """Linear warm-up from 0 to config.optim.lr over config.optim.warmup steps, then constant."""
    if config.optim.warmup > 0:
        return optax.linear_schedule(0.0, config.optim.lr, config.optim.warmup)
    return optax.constant_schedule(config.optim.lr)


def make_optimizer(config) -> optax.GradientTransformation:
    """Global-norm gradient clipping, then Adam(0.9, 0.999, 1e-8) without weight decay."""
    return optax.chain(
        optax.clip_by_global_norm(config.optim.grad_clip),
        optax.adam(learning_rate(config), b1=0.9, b2=0.999, eps=1e-8),
    )


def ema_decay(ema_rate, step):
    """min(ema_rate, (1 + n) / (10 + n)) after n updates: a short memory early in training."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(ema_rate, (1.0 + step) / (10.0 + step))


def model_graphdef(config):
    """The U-Net's static structure, built without allocating parameters."""
    model = nnx.eval_shape(lambda: unet.from_config(config, nnx.Rngs(0)))
    graphdef, _ = nnx.split(model, nnx.Param)
    return graphdef


def _init_fn(config, tx):
    def init(key):
        _, params = unet.init(config, key)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=tx.init(params),
        )

    return init


def _on_mesh(shapes, mesh):
    replicated = parallel.replicated(mesh)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes
    )


def abstract_state(config, mesh) -> TrainState:
    """The TrainState as ShapeDtypeStructs, replicated over `mesh` (a restore target)."""
    return _on_mesh(
        jax.eval_shape(_init_fn(config, make_optimizer(config)), jax.random.key(0)), mesh
    )


def abstract_params(config, mesh):
    """The U-Net's parameters as ShapeDtypeStructs, replicated over `mesh` (the target of an
    EMA-only restore)."""
    return _on_mesh(jax.eval_shape(lambda key: unet.init(config, key)[1], jax.random.key(0)), mesh)


def init_state(config, mesh, key) -> TrainState:
    """A fresh TrainState created directly on `mesh`, replicated; ema_params a separate copy."""
    return jax.jit(
        _init_fn(config, make_optimizer(config)), out_shardings=parallel.replicated(mesh)
    )(key)
