"""Evaluation jobs on the EMA parameters of the newest checkpoint, written to <workdir>/eval.

--mode=eval: the negative ELBO of the test split in bits/dim (Eq. 7 with the App. A.3 bound on
L_K), with its terms. --mode=fid: FID of EMA samples against the training set. --mode=sweep_delta:
both for each δ of config.evaluation.deltas, as in the paper's Fig. 11.

The ELBO's randomness is keyed by each test example's index (its dequantisation noise, and the
level k and noise ε of every pass), so the estimate does not depend on the batch size or on the
number of devices.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from ihdm_jax import data
from ihdm_jax import heat
from ihdm_jax import images
from ihdm_jax import objective
from ihdm_jax import parallel
from ihdm_jax import train
from ihdm_jax.evaluation import fid as fid_lib
from ihdm_jax.evaluation import likelihood as likelihood_lib
from ihdm_jax.models import unet

_ELBO_STREAM = 3  # the ELBO's key is fold_in(key(config.seed), _ELBO_STREAM)
GRID_SAMPLES = 64  # samples shown in fid_samples.png


def elbo_key(config):
    return jax.random.fold_in(jax.random.key(config.seed), _ELBO_STREAM)


def example_keys(key, index, num_passes):
    """(dequantisation key, (num_passes,) level keys) of the test example at position `index`."""
    keys = jax.random.split(jax.random.fold_in(key, index), num_passes + 1)
    return keys[0], keys[1:]


def _heat_times(config):
    return heat.heat_times(config.model.K, config.model.blur_sigma_min,
                           config.model.blur_sigma_max)


def make_level_step(config, graphdef, mesh):
    """The jitted (params, x, index, valid, delta, key) -> (sums, counts, u_K_mean) of one batch.

    x are uint8 test images (B, H, W, C), index their positions in the test split and valid
    False on padding rows. Example i is dequantised with its key and evaluated in each pass at
    one level by likelihood.level_pass. sums and counts, (K + 1,), add up all passes of the
    valid rows; u_K_mean = F(t_K) u0, (B, H, W, C), is the mean of q(u_K | u0) for the L_K bound.
    """
    t = _heat_times(config)
    sigma = config.model.sigma
    num_passes = config.evaluation.num_passes

    def step(params, x, index, valid, delta, key):
        def f(u, k):
            return unet.apply(graphdef, params, u, k, train=False)

        def example(x_i, index_i):
            dequant_key, pass_keys = example_keys(key, index_i, num_passes)
            u0 = likelihood_lib.dequantize(dequant_key, x_i[None])

            def one_pass(totals, pass_key):
                sums, counts = likelihood_lib.level_pass(f, u0, pass_key, t, sigma, delta)
                return (totals[0] + sums, totals[1] + counts), None

            zeros = jnp.zeros(t.shape, jnp.float32)
            (sums, counts), _ = jax.lax.scan(one_pass, (zeros, zeros), pass_keys)
            return sums, counts, heat.heat_forward(u0, t[-1])[0]

        sums, counts, u_K_mean = jax.vmap(example)(x, index)
        keep = valid[:, None]
        return (jnp.sum(jnp.where(keep, sums, 0.0), axis=0),
                jnp.sum(jnp.where(keep, counts, 0.0), axis=0), u_K_mean)

    batch, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    return jax.jit(step, in_shardings=(replicated, batch, batch, batch, replicated, replicated),
                   out_shardings=(replicated, replicated, batch))


def make_bound_step(config, mesh):
    """The jitted (u_K_mean, train_images, delta) -> App. A.3 bounds on L_K, (B,), against the
    uint8 training images given, blurred to level K."""
    t_K = _heat_times(config)[-1]
    sigma = config.model.sigma

    def step(u_K_mean, train_images, delta):
        blurred = heat.heat_forward(train_images.astype(jnp.float32) / 255.0, t_K)
        return objective.prior_kl_upper_bound(u_K_mean, blurred, sigma, delta)

    batch, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    return jax.jit(step, in_shardings=(batch, replicated, replicated), out_shardings=batch)


class NegativeElbo:
    """The negative ELBO of the test split for given parameters and δ (Eq. 7, bits/dim).

    Σ_k L_k and L_0 are Monte Carlo over k with config.evaluation.num_passes passes over the
    first config.evaluation.num_examples test images (0 = all), dequantised as (x·255 + U)/256;
    L_K is the App. A.3 bound against the whole blurred training set, config.evaluation.train_chunk
    images at a time.
    """

    def __init__(self, config, graphdef, mesh):
        evaluation = config.evaluation
        parallel.check_divisible(evaluation.batch_size, mesh, 'config.evaluation.batch_size')
        if evaluation.num_passes < 1:
            raise ValueError(f'config.evaluation.num_passes={evaluation.num_passes} must be >= 1.')
        if evaluation.num_examples < 0 or evaluation.train_chunk < 1:
            raise ValueError(f'config.evaluation.num_examples={evaluation.num_examples} must be '
                             f'>= 0 (0 = all) and train_chunk={evaluation.train_chunk} >= 1.')
        self.config = config
        self.test = data.make_source(config, 'test')
        self.train = data.make_source(config, 'train')
        self.num_examples = min(evaluation.num_examples or len(self.test), len(self.test))
        self.image_shape = (config.data.image_size, config.data.image_size,
                            config.data.num_channels)
        self.sharding = parallel.batch_sharding(mesh)
        self.replicated = parallel.replicated(mesh)
        self.level_step = make_level_step(config, graphdef, mesh)
        self.bound_step = make_bound_step(config, mesh)
        self.key = elbo_key(config)

    def _batches(self):
        """(x, index, valid) global arrays of the test examples, batch by batch."""
        size = self.config.evaluation.batch_size
        rows = parallel.local_rows(self.sharding, (size,) + self.image_shape)
        for start in range(0, self.num_examples, size):
            index = start + np.arange(size)
            valid = index < self.num_examples
            x = self.test.load(np.minimum(index, self.num_examples - 1)[rows])
            yield (parallel.to_global(x, self.sharding, (size,) + self.image_shape),
                   parallel.to_global(index[rows].astype(np.int32), self.sharding, (size,)),
                   parallel.to_global(valid[rows], self.sharding, (size,)))

    def _train_chunks(self):
        """The training images as replicated uint8 arrays of up to train_chunk images."""
        chunk = self.config.evaluation.train_chunk
        for start in range(0, len(self.train), chunk):
            x = self.train.load(np.arange(start, min(start + chunk, len(self.train))))
            yield parallel.to_global(x, self.replicated, x.shape)

    def __call__(self, params, delta: float) -> dict:
        """likelihood.assemble's dict (bits_per_dim, L_K, sum_L_k, L_0, nats_per_image,
        level_nats) plus num_examples and num_train."""
        if delta <= 0:
            raise ValueError(f'The ELBO needs δ > 0 (the std of p(u_{{k−1}} | u_k)), got {delta}.')
        delta = jnp.float32(delta)
        main = parallel.is_main_process()
        sums = counts = 0.0
        u_K_means, valid = [], []
        with tqdm.tqdm(total=self.num_examples, desc='ELBO levels', unit='image',
                       disable=not main) as bar:
            for x, index, is_valid in self._batches():
                batch_sums, batch_counts, u_K_mean = self.level_step(params, x, index, is_valid,
                                                                     delta, self.key)
                sums = sums + np.asarray(parallel.gather(batch_sums), np.float64)
                counts = counts + np.asarray(parallel.gather(batch_counts), np.float64)
                u_K_means.append(u_K_mean)
                valid.append(parallel.gather(is_valid))
                bar.update(int(np.sum(valid[-1])))
        bounds, sizes = [], []
        num_chunks = math.ceil(len(self.train) / self.config.evaluation.train_chunk)
        for chunk in tqdm.tqdm(self._train_chunks(), desc='ELBO L_K bound', unit='chunk',
                               total=num_chunks, disable=not main):
            bounds.append(np.concatenate([parallel.gather(self.bound_step(u, chunk, delta))
                                          for u in u_K_means]))
            sizes.append(chunk.shape[0])
        prior_bound = likelihood_lib.merge_prior_bounds(bounds, sizes)[np.concatenate(valid)]
        result = likelihood_lib.assemble(prior_bound, sums, counts, int(np.prod(self.image_shape)))
        result.update(num_examples=self.num_examples, num_train=len(self.train))
        return result


class _SourceImages:
    """A data source as the sequence of uint8 HWC images that fid.InceptionFeatures reads."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        return self.source.load(np.array([index]))[0]


class Fid:
    """FID of config.evaluation.fid_num_samples EMA samples against the training set's statistics.

    Built on every process with the resolved Inception weights file `weights`; the network and
    the statistics live on process 0, which alone computes FID. The training set's statistics are
    read from config.evaluation.fid_train_stats, by default
    <workdir>/eval/train_stats_<dataset>_<size>.npz, and computed and written there when missing.
    """

    def __init__(self, config, workdir, graphdef, mesh, weights):
        evaluation = config.evaluation
        if evaluation.fid_num_samples < 2:
            raise ValueError(f'config.evaluation.fid_num_samples={evaluation.fid_num_samples} '
                             'must be >= 2 (FID needs a covariance).')
        parallel.check_divisible(config.sampling.batch_size, mesh, 'config.sampling.batch_size')
        self.config, self.graphdef, self.mesh = config, graphdef, mesh
        self.loader = data.make_loader(config, parallel.batch_sharding(mesh),
                                       config.sampling.batch_size)
        self.stats_path = evaluation.fid_train_stats or os.path.join(
            workdir, 'eval', f'train_stats_{config.data.dataset}_{config.data.image_size}.npz')
        self.features = self.train_stats = None
        if parallel.is_main_process():
            self.features = fid_lib.InceptionFeatures(weights, evaluation.batch_size)
            self.train_stats = self._train_statistics()

    def _train_statistics(self):
        if os.path.exists(self.stats_path):
            logging.info('FID: training-set statistics from %s', self.stats_path)
            return fid_lib.load_statistics(self.stats_path)
        train_images = _SourceImages(data.make_source(self.config, 'train'))
        stats = fid_lib.statistics(self.features(train_images, description='FID training set'))
        os.makedirs(os.path.dirname(os.path.abspath(self.stats_path)), exist_ok=True)
        fid_lib.save_statistics(self.stats_path, *stats)
        logging.info('FID: statistics of %d training images written to %s', len(train_images),
                     self.stats_path)
        return stats

    def samples(self, params, delta: float) -> np.ndarray:
        """fid_num_samples uint8 EMA samples at sampling noise δ, on every process.

        Chunk c of config.sampling.batch_size samples starts from loader.prior_images(size, c)
        with key fold_in(sample key, c), as train.draw_samples draws them.
        """
        config = self.config.copy_and_resolve_references()
        config.sampling.delta = delta
        config.sampling.num_samples = config.evaluation.fid_num_samples
        sampler = train.make_sampler(config, self.graphdef, self.mesh)
        return train.draw_samples(config, sampler, params, self.loader, train._keys(config)[2],
                                  progress=f'FID samples (δ = {delta})')

    def __call__(self, samples: np.ndarray):
        """FID of uint8 samples against the training set; None on processes other than 0."""
        if self.features is None:
            return None
        stats = fid_lib.statistics(self.features(samples, description='FID samples'))
        return fid_lib.frechet_distance(*stats, *self.train_stats)


def _restore(config, workdir):
    """(mesh, graphdef, EMA params, step) of the newest checkpoint in `workdir`."""
    mesh = parallel.make_mesh()
    params, step = train.restore_ema_params(config, workdir, mesh)
    return mesh, train.model_graphdef(config), params, step


def _inception_weights(config):
    """The Inception weights file, resolved before anything else so that a missing one fails
    before any sampling."""
    return fid_lib.resolve_weights(config.evaluation.inception_weights or None)


def _eval_dir(workdir):
    path = os.path.join(workdir, 'eval')
    os.makedirs(path, exist_ok=True)
    return path


def _write_json(path, content):
    with open(path, 'w') as f:
        json.dump(content, f, indent=2)
        f.write('\n')


def _describe(config, step):
    return {'step': step, 'dataset': config.data.dataset, 'image_size': config.data.image_size,
            'K': config.model.K, 'sigma': config.model.sigma,
            'evaluation': config.evaluation.to_dict()}


def _plot_levels(path, result, title):
    """Left, the terms L_1..L_{K−1} of Eq. (7) in nats per image; right, L_K (its App. A.3 bound),
    Σ L_k and L_0 in bits/dim."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    levels = np.asarray(result['level_nats'])  # level k holds L_{k−1}
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4), width_ratios=(3, 1))
    left.plot(np.arange(1, len(levels)), levels[1:], '.-')
    left.set_xlabel('j')
    left.set_ylabel('$L_j$ (Eq. 10), nats per image')
    left.grid(alpha=0.3)
    names = ('L_K', 'sum_L_k', 'L_0')
    values = [result[name] for name in names]
    bars = right.bar(['$L_K$', '$\\Sigma L_k$', '$L_0$'], values, color=['C2', 'C0', 'C1'])
    right.bar_label(bars, fmt='%.3f', fontsize=8)
    right.axhline(0.0, color='black', linewidth=0.8)
    right.set_ylabel('bits/dim (total = 8 + sum)')
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def likelihood(config, workdir: str):
    """--mode=eval: eval/likelihood.json (terms in bits/dim, level_nats, settings) and
    eval/likelihood_levels.png."""
    mesh, graphdef, params, step = _restore(config, workdir)
    result = NegativeElbo(config, graphdef, mesh)(params, config.sampling.delta)
    setting = (f'checkpoint {step}, {config.data.dataset} test split ({result["num_examples"]} '
               f'images, {config.evaluation.num_passes} passes, δ = {config.sampling.delta})')
    terms = (f'{result["bits_per_dim"]:.4f} bits/dim = 8 + L_K {result["L_K"]:.4f} '
             f'+ Σ L_k {result["sum_L_k"]:.4f} + L_0 {result["L_0"]:.4f}')
    logging.info('Negative ELBO, %s: %s', setting, terms)
    if not parallel.is_main_process():
        return result
    out = _eval_dir(workdir)
    _write_json(os.path.join(out, 'likelihood.json'),
                {**_describe(config, step), 'split': 'test', 'delta': config.sampling.delta,
                 **result})
    _plot_levels(os.path.join(out, 'likelihood_levels.png'), result, f'{setting}\n{terms}')
    logging.info('Written to %s (likelihood.json, likelihood_levels.png).', out)
    return result


def fid(config, workdir: str):
    """--mode=fid: eval/fid.json and eval/fid_samples.png."""
    weights = _inception_weights(config)
    mesh, graphdef, params, step = _restore(config, workdir)
    fid_job = Fid(config, workdir, graphdef, mesh, weights)
    samples = fid_job.samples(params, config.sampling.delta)
    value = fid_job(samples)
    if not parallel.is_main_process():
        return value
    logging.info('FID of %d samples of checkpoint %d (δ = %g) against the training set: %.4f',
                 len(samples), step, config.sampling.delta, value)
    out = _eval_dir(workdir)
    _write_json(os.path.join(out, 'fid.json'),
                {**_describe(config, step), 'delta': config.sampling.delta, 'fid': value,
                 'num_samples': len(samples), 'train_stats': fid_job.stats_path})
    images.save_grid(os.path.join(out, 'fid_samples.png'), samples[:GRID_SAMPLES])
    logging.info('Written to %s (fid.json, fid_samples.png).', out)
    return value


def _plot_sweep(path, rows, title):
    """Bits/dim and FID against δ, side by side, as in the paper's Fig. 11."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    deltas = [row['delta'] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(deltas, [row['bits_per_dim'] for row in rows], 'o-')
    left.set_ylabel('negative ELBO (bits/dim)')
    right.plot(deltas, [row['fid'] for row in rows], 'o-', color='C1')
    right.set_ylabel('FID')
    for ax in (left, right):
        ax.set_xlabel('δ')
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_delta(config, workdir: str):
    """--mode=sweep_delta: the negative ELBO and FID for each δ in config.evaluation.deltas;
    eval/sweep_delta.json, eval/sweep_delta.md and eval/sweep_delta.png."""
    deltas = tuple(config.evaluation.deltas)
    if not deltas or min(deltas) <= 0:
        raise ValueError(f'config.evaluation.deltas={deltas} must be positive values.')
    weights = _inception_weights(config)
    mesh, graphdef, params, step = _restore(config, workdir)
    fid_job = Fid(config, workdir, graphdef, mesh, weights)
    elbo = NegativeElbo(config, graphdef, mesh)
    rows = []
    for delta in deltas:
        result = elbo(params, delta)
        row = {'delta': delta, **{name: result[name] for name in
                                  ('bits_per_dim', 'L_K', 'sum_L_k', 'L_0')}}
        row['fid'] = fid_job(fid_job.samples(params, delta))
        rows.append(row)
        logging.info('δ = %g: %.4f bits/dim, FID %s', delta, row['bits_per_dim'], row['fid'])
    if not parallel.is_main_process():
        return rows
    out = _eval_dir(workdir)
    _write_json(os.path.join(out, 'sweep_delta.json'),
                {**_describe(config, step), 'split': 'test', 'num_examples': elbo.num_examples,
                 'results': rows})
    lines = ['| δ | bits/dim | L_K | Σ L_k | L_0 | FID |', '|---|---|---|---|---|---|']
    lines += [f'| {row["delta"]:g} | {row["bits_per_dim"]:.4f} | {row["L_K"]:.4f} | '
              f'{row["sum_L_k"]:.4f} | {row["L_0"]:.4f} | {row["fid"]:.2f} |' for row in rows]
    with open(os.path.join(out, 'sweep_delta.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    title = (f'{config.data.dataset}, checkpoint {step}: ELBO on {elbo.num_examples} test '
             f'images, FID of {config.evaluation.fid_num_samples} samples')
    _plot_sweep(os.path.join(out, 'sweep_delta.png'), rows, title)
    logging.info('Sweep over δ written to %s (sweep_delta.json, .md, .png):\n%s', out,
                 '\n'.join(lines))
    return rows
