"""The paper's sampling variants, one job (config, workdir) per --mode: same_init, share_noise,
interpolate, hierarchical and delta_grid (Fig. 5b, 6, 7, 15; App. D.2).

Each writes into <workdir>/analysis/<mode>/ a picture (PNG), a GIF where the result is a
sequence, and its numbers (NPZ). The chains use the EMA parameters of the newest checkpoint and
run over the mesh; everything random follows from config.seed (rng.py).
"""

import dataclasses
import functools
import os

import jax
import numpy as np
from absl import logging

from ihdm_jax import data
from ihdm_jax import images
from ihdm_jax import loading
from ihdm_jax import outputs
from ihdm_jax import parallel
from ihdm_jax import plots
from ihdm_jax import programs
from ihdm_jax import rng
from ihdm_jax import sampling
from ihdm_jax import storage
from ihdm_jax import validation


def _require_positive(config, *names):
    for name in names:
        value = config.analysis[name]
        validation.require(
            isinstance(value, int) and value >= 1,
            f'config.analysis.{name}={value!r} must be a positive integer.',
        )


def split_levels(config):
    """The grid points round(f N) of config.analysis.split_fractions for the sampler's N steps
    (config.sampling.steps, or every level: K), checked."""
    K = config.sampling.steps or config.model.K
    fractions = tuple(config.analysis.split_fractions)
    levels = [round(f * K) for f in fractions]
    validation.require(
        levels and levels == sorted(set(levels), reverse=True) and 0 < levels[-1] <= levels[0] < K,
        f'config.analysis.split_fractions={fractions} must give distinct grid points in '
        f'1..{K - 1}, descending (with {K} sampler steps: {levels}).',
    )
    return levels


def check_rows_columns(config):
    _require_positive(config, 'num_rows', 'num_columns')


def check_interpolate(config):
    validation.require_unconditional(config, 'interpolate')
    _require_positive(config, 'num_rows', 'num_points')
    validation.require(
        config.analysis.num_points >= 2,
        f'config.analysis.num_points='
        f'{config.analysis.num_points} must be at least 2 (both endpoints).',
    )


def check_hierarchical(config):
    validation.require_unconditional(config, 'hierarchical')
    _require_positive(config, 'num_trees', 'branches')
    split_levels(config)


def check_delta_grid(config):
    _require_positive(config, 'num_rows')
    deltas = tuple(config.analysis.deltas)
    validation.require(
        deltas and all(d >= 0 for d in deltas),
        f'config.analysis.deltas={deltas} must be values of δ ≥ 0.',
    )


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What every variant starts from: the trained model, its sampler, the training images and
    the analyses' prior and noise keys."""

    model: loading.Model
    sampler: programs.Sampler
    source: object
    prior_key: jax.Array
    noise_key: jax.Array


def _setup(config, workdir) -> _Setup:
    model = loading.restore(config, workdir)
    logging.info('Analysing the EMA parameters of checkpoint %d in %s.', model.step, workdir)
    return _Setup(
        model,
        programs.Sampler(config, model.mesh),
        data.make_source(config),
        rng.analysis_key(config.seed, rng.ANALYSIS_PRIOR),
        rng.analysis_key(config.seed, rng.ANALYSIS_NOISE),
    )


def same_init(config, workdir):
    """One prior draw u_K per row, an independent noise sequence in every column (Fig. 5b, 15).

    Writes same_init.png (each row: its u_K, then the samples), trajectory.gif (from the prior
    to the data) and same_init.npz: images (rows, columns, H, W, C) uint8, u_K (the state each
    chain started from, as its trajectory recorded it), noise_keys.
    """
    rows, columns = config.analysis.num_rows, config.analysis.num_columns
    s = _setup(config, workdir)
    labels = programs.sample_labels(config, rows)  # a conditional model: one class per row
    u_K = np.repeat(
        s.sampler.prior_states(s.source, rng.ANALYSIS_DRAW, rows, s.prior_key, labels=labels),
        columns,
        axis=0,
    )
    noise_keys = rng.example_keys(s.noise_key, rows * columns)
    u0, trajectory = s.sampler.chains(
        s.model.params,
        u_K,
        noise_keys,
        record=s.sampler.gif_points,
        labels=None if labels is None else np.repeat(labels, columns),
    )
    if not parallel.is_main_process():
        return
    out = outputs.folder(workdir, 'analysis', 'same_init')
    samples = images.to_uint8(u0).reshape((rows, columns) + u0.shape[1:])
    storage.save_npz(
        os.path.join(out, 'same_init.npz'),
        images=samples,
        u_K=trajectory[:, 0].reshape(samples.shape),
        noise_keys=noise_keys,
    )
    starts = images.to_uint8(s.sampler.process.to_image(u_K[::columns]))
    plots.save_table(
        os.path.join(out, 'same_init.png'),
        np.concatenate([starts[:, None], samples], axis=1),
        f'Same u_K per row, new noise per sample (checkpoint {s.model.step})',
        column_labels=['u_K'] + [''] * columns,
    )
    plots.save_trajectory_gif(os.path.join(out, 'trajectory.gif'), trajectory, columns)
    logging.info('same_init: %d x %d samples written to %s.', rows, columns, out)


def share_noise(config, workdir):
    """One noise sequence per row, one prior draw u_K per column (Fig. 7a).

    Sample (r, c) starts from u_K[c] and adds the noise sequence of row r, so a row shows how one
    noise sequence carves different prior states and a column how one state grows under
    different noise. Writes share_noise.png (top row: the u_K), trajectory.gif and
    share_noise.npz: images (rows, columns, H, W, C) uint8, u_K (columns, H, W, C), noise_keys
    (rows, 2).
    """
    rows, columns = config.analysis.num_rows, config.analysis.num_columns
    s = _setup(config, workdir)
    labels = programs.sample_labels(config, columns)  # a conditional model: one class per column
    u_K = s.sampler.prior_states(s.source, rng.ANALYSIS_DRAW, columns, s.prior_key, labels=labels)
    noise_keys = rng.example_keys(s.noise_key, rows)
    u0, trajectory = s.sampler.chains(
        s.model.params,
        np.tile(u_K, (rows, 1, 1, 1)),
        np.repeat(noise_keys, columns, axis=0),
        record=s.sampler.gif_points,
        labels=None if labels is None else np.tile(labels, rows),
    )
    if not parallel.is_main_process():
        return
    out = outputs.folder(workdir, 'analysis', 'share_noise')
    samples = images.to_uint8(u0).reshape((rows, columns) + u0.shape[1:])
    storage.save_npz(
        os.path.join(out, 'share_noise.npz'), images=samples, u_K=u_K, noise_keys=noise_keys
    )
    starts = images.to_uint8(s.sampler.process.to_image(u_K))
    plots.save_table(
        os.path.join(out, 'share_noise.png'),
        np.concatenate([starts[None], samples]),
        f'Same noise per row, same u_K per column (checkpoint {s.model.step})',
        row_labels=['u_K'] + [f'noise {r}' for r in range(rows)],
    )
    plots.save_trajectory_gif(os.path.join(out, 'trajectory.gif'), trajectory, columns)
    logging.info('share_noise: %d x %d samples written to %s.', rows, columns, out)


def _interpolate(points, chain, u_a, u_b, raw_a, raw_b):
    """The frames of each pair (sampling.interpolate, the start states mixed by the process)."""

    def one(u_a, u_b, key_a, key_b):
        return sampling.interpolate(chain, u_a, u_b, key_a, key_b, points, chain.process.mix_states)

    frames = jax.vmap(one)(
        u_a, u_b, jax.random.wrap_key_data(raw_a), jax.random.wrap_key_data(raw_b)
    )
    return chain.process.to_image(frames)


def interpolate(config, workdir):
    """Samples between pairs of endpoints (App. D.2, Fig. 7b): u_K as the process mixes its
    start states (linearly for the heat process, spherically for a diffusion process), the
    noise spherically.

    Writes interpolate.png (one row per pair, num_points frames from endpoint a to b),
    interpolate.gif (all pairs, sweeping a -> b) and interpolate.npz: images (pairs, points, H,
    W, C) uint8, u_K_a, u_K_b, noise_keys_a, noise_keys_b.
    """
    pairs, points = config.analysis.num_rows, config.analysis.num_points
    s = _setup(config, workdir)
    u_K_a = s.sampler.prior_states(
        s.source, rng.ANALYSIS_DRAW, pairs, jax.random.fold_in(s.prior_key, 0)
    )
    u_K_b = s.sampler.prior_states(
        s.source, rng.ANALYSIS_DRAW + 1, pairs, jax.random.fold_in(s.prior_key, 1)
    )
    keys_a = rng.example_keys(jax.random.fold_in(s.noise_key, 0), pairs)
    keys_b = rng.example_keys(jax.random.fold_in(s.noise_key, 1), pairs)
    frames = s.sampler.run(
        functools.partial(_interpolate, points), s.model.params, u_K_a, u_K_b, keys_a, keys_b
    )
    if not parallel.is_main_process():
        return
    out = outputs.folder(workdir, 'analysis', 'interpolate')
    frames = images.to_uint8(frames)
    storage.save_npz(
        os.path.join(out, 'interpolate.npz'),
        images=frames,
        u_K_a=u_K_a,
        u_K_b=u_K_b,
        noise_keys_a=keys_a,
        noise_keys_b=keys_b,
    )
    plots.save_table(
        os.path.join(out, 'interpolate.png'),
        frames,
        f'{config.model.process}: interpolation a -> b, weight of b (checkpoint {s.model.step})',
        column_labels=[f'{w:.2f}' for w in np.linspace(0, 1, points)],
    )
    columns = int(np.ceil(np.sqrt(pairs)))
    images.save_gif(
        os.path.join(out, 'interpolate.gif'),
        [images.grid(frames[:, i], columns) for i in range(points)],
        frame_ms=300,
    )
    logging.info('interpolate: %d pairs x %d frames written to %s.', pairs, points, out)


def _hierarchical(splits, branches, chain, u_K, raw_keys):
    """Each tree of sampling.hierarchical, its segments the sampler's chain."""

    def segment(u, noise, start, stop):
        return chain(u, noise, start=start, stop=stop)[0]

    def one(u, key):
        return sampling.hierarchical(segment, u, chain.method.steps, key, splits, branches)

    return jax.vmap(one)(u_K, jax.random.wrap_key_data(raw_keys))


def hierarchical(config, workdir):
    """Trees of samples (Fig. 5b): from one u_K per tree, every chain splits at the split levels
    into `branches` copies that continue with their own noise.

    Writes hierarchical.png (per tree one row per level: u_K, the chains at each split before
    they split, the final samples; each image centred over its descendants) and
    hierarchical.npz: u_K (trees, H, W, C), noise_keys, levels, and level_<k> (trees,
    chains, H, W, C) float32 for every split level k and 0.
    """
    splits = split_levels(config)
    trees, branches = config.analysis.num_trees, config.analysis.branches
    s = _setup(config, workdir)
    K = s.sampler.steps
    u_K = s.sampler.prior_states(s.source, rng.ANALYSIS_DRAW, trees, s.prior_key)
    noise_keys = rng.example_keys(s.noise_key, trees)
    states = s.sampler.run(
        functools.partial(_hierarchical, tuple(splits), branches), s.model.params, u_K, noise_keys
    )
    if not parallel.is_main_process():
        return
    out = outputs.folder(workdir, 'analysis', 'hierarchical')
    levels = splits + [0]
    storage.save_npz(
        os.path.join(out, 'hierarchical.npz'),
        u_K=u_K,
        noise_keys=noise_keys,
        levels=np.array(levels),
        **{f'level_{k}': state for k, state in zip(levels, states)},
    )
    leaves = branches ** len(splits)
    size = u_K.shape[1]
    blocks, yticks = [], []
    for tree in range(trees):
        rows = [images.to_uint8(u_K[tree : tree + 1])] + [
            images.to_uint8(state[tree]) for state in states
        ]
        top = sum(len(b) for b in blocks)
        yticks += [
            (top + c, f'k={k}') for c, k in zip(images.tile_centres(len(rows), size), [K] + levels)
        ]
        blocks.append(plots.tree_canvas(rows, leaves, images.tile_scale(size)))
        blocks.append(
            np.full((size * images.tile_scale(size) // 2,) + blocks[-1].shape[1:], 255, np.uint8)
        )
    plots.save_canvas(
        os.path.join(out, 'hierarchical.png'),
        np.concatenate(blocks[:-1]),
        f'Chains split in {branches} at k = {splits} (checkpoint {s.model.step})',
        yticks=yticks,
    )
    logging.info('hierarchical: %d trees of %d samples written to %s.', trees, leaves, out)


def delta_grid(config, workdir):
    """Samples from the same starting points over the δ of config.analysis.deltas (Fig. 6).

    Row r: every column starts from the prior draw u_K[r] (drawn once, at config.sampling.delta)
    and adds the noise sequence of noise_keys[r], scaled by the column's δ; only δ differs
    along a row. Writes delta_grid.png (first column u_K, then one column per δ) and
    delta_grid.npz: images (rows, deltas, H, W, C) uint8, deltas, u_K (rows, H, W, C) float32,
    noise_keys (rows, 2).
    """
    rows = config.analysis.num_rows
    deltas = [float(d) for d in config.analysis.deltas]
    s = _setup(config, workdir)
    labels = programs.sample_labels(config, rows)  # a conditional model: one class per row
    u_K = s.sampler.prior_states(s.source, rng.ANALYSIS_DRAW, rows, s.prior_key, labels=labels)
    noise_keys = rng.example_keys(s.noise_key, rows)
    samples = np.stack(
        [
            images.to_uint8(
                s.sampler.chains(s.model.params, u_K, noise_keys, delta, labels=labels).final
            )
            for delta in deltas
        ],
        axis=1,
    )
    if not parallel.is_main_process():
        return
    out = outputs.folder(workdir, 'analysis', 'delta_grid')
    storage.save_npz(
        os.path.join(out, 'delta_grid.npz'),
        images=samples,
        deltas=np.array(deltas),
        u_K=u_K,
        noise_keys=noise_keys,
    )
    plots.save_table(
        os.path.join(out, 'delta_grid.png'),
        np.concatenate([images.to_uint8(u_K)[:, None], samples], axis=1),
        f'Same u_K and noise per row, δ per column (checkpoint {s.model.step}, '
        f'σ = {config.model.sigma:g})',
        column_labels=['u_K'] + [f'δ={d:g}' for d in deltas],
    )
    logging.info('delta_grid: %d rows x %d values of δ written to %s.', rows, len(deltas), out)
