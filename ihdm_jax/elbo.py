"""The negative ELBO of a data set in bits/dim (Eq. 7 with the App. A.3 bound on L_K), over the
mesh.

The randomness of test example i (its dequantisation noise, and the level k and noise ε of
every pass) comes from fold_in(rng.elbo_key(seed), i), and the per-example terms are summed on
the host in example order, so the estimate does not depend on the batch size or the number of
devices (up to float32 rounding in the network: about 1e-7 relative).
"""

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from ihdm_jax import heat
from ihdm_jax import objective
from ihdm_jax import parallel
from ihdm_jax import programs
from ihdm_jax import rng
from ihdm_jax import schedule as schedule_lib
from ihdm_jax import state as state_lib
from ihdm_jax.evaluation import likelihood


def example_keys(key, index, num_passes):
    """(dequantisation key, (num_passes,) level keys) of the test example at position `index`."""
    keys = jax.random.split(jax.random.fold_in(key, index), num_passes + 1)
    return keys[0], keys[1:]


def prior_bounds(mesh, u_K_means: np.ndarray, train_source, t_K, sigma, delta,
                 chunk: int, progress='') -> np.ndarray:
    """The App. A.3 bounds on L_K (nats), (N,) float64, for means u_K_means = F(t_K) u0
    (N, H, W, C) of q(u_K | u0) against the whole training set blurred to t_K.

    The uint8 training images are read `chunk` at a time, each chunk replicated on every device
    and the examples split over the mesh; the chunks' bounds are merged exactly
    (likelihood.merge_prior_bounds).
    """
    def bound(replicated, batched):
        train_images, t_K, sigma, delta = replicated
        (u_K_mean,) = batched
        blurred = heat.heat_forward(train_images.astype(jnp.float32) / 255.0, t_K)
        return objective.prior_kl_upper_bound(u_K_mean, blurred, sigma, delta)
    program = programs.on_mesh(mesh, bound)
    scalars = tuple(jnp.float32(v) for v in (t_K, sigma, delta))
    bounds, sizes = [], []
    for start in tqdm.trange(0, len(train_source), chunk, desc=progress, unit='chunk',
                             disable=not progress or not parallel.is_main_process()):
        x = train_source.load(np.arange(start, min(start + chunk, len(train_source))))
        bounds.append(program((x,) + scalars, u_K_means))
        sizes.append(len(x))
    return likelihood.merge_prior_bounds(bounds, sizes)


class NegativeElbo:
    """The negative ELBO of the test split for given parameters and δ (Eq. 7, bits/dim).

    Σ_k L_k and L_0 are Monte Carlo over k with config.evaluation.num_passes passes over the
    first config.evaluation.num_examples test images (0 = all), dequantised as (x·255 + U)/256;
    L_K is the App. A.3 bound against the whole blurred training set, config.evaluation.train_chunk
    images at a time.
    """

    def __init__(self, config, mesh, test_source, train_source):
        self.config, self.mesh = config, mesh
        self.test, self.train = test_source, train_source
        self.num_examples = min(config.evaluation.num_examples or len(test_source),
                                len(test_source))
        self.schedule = schedule_lib.from_config(config)
        self.key = rng.elbo_key(config.seed)
        f = programs.residual(state_lib.model_graphdef(config))
        t, sigma, num_passes = self.schedule.t, self.schedule.sigma, config.evaluation.num_passes

        def levels(replicated, batched):
            params, delta = replicated
            x, index = batched

            def example(x_i, index_i):
                dequant_key, pass_keys = example_keys(self.key, index_i, num_passes)
                u0 = likelihood.dequantize(dequant_key, x_i[None])

                def one_pass(totals, pass_key):
                    sums, counts = likelihood.level_pass(lambda u, k: f(params, u, k), u0,
                                                         pass_key, t, sigma, delta)
                    return (totals[0] + sums, totals[1] + counts), None

                zeros = jnp.zeros(t.shape, jnp.float32)
                (sums, counts), _ = jax.lax.scan(one_pass, (zeros, zeros), pass_keys)
                return sums, counts, heat.heat_forward(u0, t[-1])[0]
            return jax.vmap(example)(x, index)
        self._levels = programs.on_mesh(mesh, levels)

    def __call__(self, params, delta: float) -> dict:
        """likelihood.assemble's dict (bits_per_dim, L_K, sum_L_k, L_0, nats_per_image,
        level_nats) plus num_examples and num_train."""
        size = self.config.evaluation.batch_size
        sums, counts, u_K_means = [], [], []
        main = parallel.is_main_process()
        with tqdm.tqdm(total=self.num_examples, desc='ELBO levels', unit='image',
                       disable=not main) as bar:
            for start in range(0, self.num_examples, size):
                # Whole batches (one compiled shape); the rows past the end are cut.
                valid = min(size, self.num_examples - start)
                index = np.minimum(start + np.arange(size), self.num_examples - 1)
                s, c, u = self._levels((params, jnp.float32(delta)), self.test.load(index),
                                       index.astype(np.int32))
                sums.append(s[:valid])
                counts.append(c[:valid])
                u_K_means.append(u[:valid])
                bar.update(valid)
        bounds = prior_bounds(self.mesh, np.concatenate(u_K_means), self.train,
                              self.schedule.t_K, self.schedule.sigma, delta,
                              self.config.evaluation.train_chunk, 'ELBO L_K bound')
        result = likelihood.assemble(
            bounds, np.concatenate(sums).astype(np.float64).sum(axis=0),
            np.concatenate(counts).astype(np.float64).sum(axis=0),
            int(np.prod(u_K_means[0].shape[1:])))
        result.update(num_examples=self.num_examples, num_train=len(self.train))
        return result
