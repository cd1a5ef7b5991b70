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

from ihdm_jax import diffusion
from ihdm_jax import heat
from ihdm_jax import objective
from ihdm_jax import parallel
from ihdm_jax import processes
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


class DiffusionNegativeElbo:
    """The negative ELBO of the test split in bits/dim for a process of diffusion.py (Ho et al.,
    Eq. 5): L_T exactly, L_0 the discretised decoder (Eq. 13), and Σ_{i=2..N} L_{i−1} estimated
    as (N − 1) times the mean of config.evaluation.num_passes draws i ~ U{2..N} per image.

    The data are the 8-bit test images scaled to [−1, 1] without dequantisation: the decoder
    gives each 8-bit value its probability, so bits/dim = nats/(D ln 2) with no +8. δ plays no
    part (the argument is kept so that jobs call both kinds alike).
    """

    def __init__(self, config, mesh, test_source, train_source):
        self.config, self.mesh = config, mesh
        self.test, self.train = test_source, train_source
        self.num_examples = min(config.evaluation.num_examples or len(test_source),
                                len(test_source))
        self.key = rng.elbo_key(config.seed)
        process = processes.diffusion_process(config)
        eps_fn = processes.Diffusion.eps_fn
        f = programs.residual(state_lib.model_graphdef(config))
        num_passes, N = config.evaluation.num_passes, process.num_levels

        def terms(replicated, batched):
            params, = replicated
            x, index = batched
            net = eps_fn(lambda u, k: f(params, u, k))

            def example(x_i, index_i):
                decoder_key, pass_keys = example_keys(self.key, index_i, num_passes)
                u0 = x_i[None].astype(jnp.float32) / 127.5 - 1.0

                def one_pass(totals, pass_key):
                    i_key, eps_key = jax.random.split(pass_key)
                    i = jax.random.randint(i_key, (1,), 2, N + 1)
                    eps = jax.random.normal(eps_key, u0.shape, jnp.float32)
                    kl = diffusion.level_kl(process, net, u0, i, eps)[0]
                    return (totals[0].at[i[0]].add(kl), totals[1].at[i[0]].add(1.0)), None

                zeros = jnp.zeros((N + 1,), jnp.float32)
                (sums, counts), _ = jax.lax.scan(one_pass, (zeros, zeros), pass_keys)
                l_0 = diffusion.decoder_nll(process, net, u0, jax.random.normal(
                    decoder_key, u0.shape, jnp.float32))[0]
                return sums, counts, l_0, diffusion.prior_kl(process, u0)[0]
            return jax.vmap(example)(x, index)
        self._terms = programs.on_mesh(mesh, terms)

    def __call__(self, params, delta: float = None) -> dict:
        """bits_per_dim and its terms L_K (= L_T), sum_L_k, L_0 in bits/dim, nats_per_image,
        level_nats (the mean L_{i−1} of each level i = 1..N that was drawn, None where none
        was; level 1 holds L_0), offset (0: no dequantisation), num_examples, num_train."""
        del delta
        size = self.config.evaluation.batch_size
        parts = []
        with tqdm.tqdm(total=self.num_examples, desc='ELBO', unit='image',
                       disable=not parallel.is_main_process()) as bar:
            for start in range(0, self.num_examples, size):
                valid = min(size, self.num_examples - start)
                index = np.minimum(start + np.arange(size), self.num_examples - 1)
                out = self._terms((params,), self.test.load(index), index.astype(np.int32))
                parts.append([np.asarray(o[:valid], np.float64) for o in out])
                bar.update(valid)
        sums, counts, l_0, l_T = (np.concatenate(p) for p in zip(*parts))
        sums, counts = sums.sum(axis=0), counts.sum(axis=0)
        N = len(sums) - 1
        sum_kl = (N - 1) * sums[2:].sum() / counts[2:].sum()
        dims = int(np.prod(self.test.load(np.arange(1)).shape[1:]))
        per_dim = 1.0 / (dims * np.log(2.0))
        nats = float(np.mean(l_T) + sum_kl + np.mean(l_0))
        level_nats = [float(np.mean(l_0))] + [
            float(s / c) if c else None for s, c in zip(sums[2:], counts[2:])]
        return {'bits_per_dim': float(diffusion.to_bits_per_dim(nats, dims)),
                'L_K': float(np.mean(l_T)) * per_dim, 'sum_L_k': float(sum_kl) * per_dim,
                'L_0': float(np.mean(l_0)) * per_dim, 'nats_per_image': nats,
                'level_nats': level_nats, 'offset': 0.0, 'num_examples': self.num_examples,
                'num_train': len(self.train)}


def negative_elbo(config, mesh, test_source, train_source):
    """NegativeElbo (heat) or DiffusionNegativeElbo for config.model.process."""
    kind = NegativeElbo if config.model.process == 'heat' else DiffusionNegativeElbo
    return kind(config, mesh, test_source, train_source)
