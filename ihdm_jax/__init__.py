"""ihdm_jax: the Inverse Heat Dissipation Model in JAX/Flax."""


def load(workdir: str):
    """The trained run in `workdir` as an object with `config`, the EMA residual `f(u, k)` and
    `sample(key, num)` (see ihdm_jax.loading.Model)."""
    from ihdm_jax import loading  # imported on use: `import ihdm_jax` stays light

    return loading.load(workdir)
