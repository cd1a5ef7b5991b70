"""The paper's sampling variants, one job (config, workdir) per --mode: same_init, share_noise,
interpolate, hierarchical and delta_grid (Fig. 5b, 6, 7, 15; App. D.2).

Each writes into <workdir>/analysis/<mode>/ a picture (PNG), a GIF where the result is a
sequence, and its numbers (NPZ). The chains use the EMA parameters of the newest checkpoint and
run over the mesh; everything random follows from config.seed (rng.py).
"""

import functools
import os

import jax
import numpy as np
from absl import logging

from ihdm_jax import checkpoint
from ihdm_jax import data
from ihdm_jax import images
from ihdm_jax import outputs
from ihdm_jax import parallel
from ihdm_jax import plots
from ihdm_jax import programs
from ihdm_jax import rng
from ihdm_jax import sampling
from ihdm_jax import state as state_lib
from ihdm_jax import storage
from ihdm_jax import validation


def _require_positive(config, *names):
    for name in names:
        value = config.analysis[name]
        validation.require(isinstance(value, int) and value >= 1,
                           f'config.analysis.{name}={value!r} must be a positive integer.')


def split_levels(config):
    """The levels round(f K) of config.analysis.split_fractions, checked."""
    K = config.model.K
    fractions = tuple(config.analysis.split_fractions)
    levels = [round(f * K) for f in fractions]
    validation.require(
        levels and levels == sorted(set(levels), reverse=True) and 0 < levels[-1] <= levels[0] < K,
        f'config.analysis.split_fractions={fractions} must give distinct levels in 1..{K - 1}, '
        f'descending (with K={K}: {levels}).')
    return levels


def check_rows_columns(config):
    _require_positive(config, 'num_rows', 'num_columns')


def check_interpolate(config):
    _require_positive(config, 'num_rows', 'num_points')
    validation.require(config.analysis.num_points >= 2, f'config.analysis.num_points='
                       f'{config.analysis.num_points} must be at least 2 (both endpoints).')


def check_hierarchical(config):
    _require_positive(config, 'num_trees', 'branches')
    split_levels(config)


def check_delta_grid(config):
    _require_positive(config, 'num_rows')
    deltas = tuple(config.analysis.deltas)
    validation.require(deltas and all(d >= 0 for d in deltas),
                       f'config.analysis.deltas={deltas} must be values of δ ≥ 0.')


def _setup(config, workdir):
    """(mesh, sampler, EMA params, step, training source, prior key, noise key)."""
    mesh = parallel.make_mesh()
    params, step = checkpoint.restore_ema_params(config, workdir, mesh)
    logging.info('Analysing the EMA parameters of checkpoint %d in %s.', step, workdir)
    return (mesh, programs.Sampler(config, mesh), params, step, data.make_source(config),
            rng.analysis_key(config.seed, rng.ANALYSIS_PRIOR),
            rng.analysis_key(config.seed, rng.ANALYSIS_NOISE))


def same_init(config, workdir):
    """One prior draw u_K per row, an independent noise sequence in every column (Fig. 5b, 15).

    Writes same_init.png (each row: its u_K, then the samples), trajectory.gif (levels K..0)
    and same_init.npz: images (rows, columns, H, W, C) uint8, u_K (the state each chain started
    from, as its trajectory recorded it), noise_keys.
    """
    rows, columns = config.analysis.num_rows, config.analysis.num_columns
    _, sampler, params, step, source, prior_key, noise_key = _setup(config, workdir)
    u_K = np.repeat(sampler.prior_states(source, rng.ANALYSIS_DRAW, rows, prior_key), columns,
                    axis=0)
    noise_keys = rng.example_keys(noise_key, rows * columns)
    u0, trajectory = sampler.chains(params, u_K, noise_keys, trajectory=True)
    if not parallel.is_main_process():
        return
    out = outputs.folder(workdir, 'analysis', 'same_init')
    samples = programs.to_uint8(u0)
    shape = (rows, columns) + samples.shape[1:]
    storage.save_npz(os.path.join(out, 'same_init.npz'), images=samples.reshape(shape),
                     u_K=trajectory[:, 0].reshape(shape), noise_keys=noise_keys)
    starts = programs.to_uint8(u_K[::columns])
    table = np.concatenate([starts[:, None], samples.reshape(shape)], axis=1)
    tile = samples.shape[1] * plots.tile_scale(samples.shape[1])
    xticks = list(zip(plots.tile_centres(columns + 1, tile), ['u_K'] + [''] * columns))
    plots.save_canvas(os.path.join(out, 'same_init.png'),
                      images.grid(table.reshape((-1,) + table.shape[2:]), columns + 1),
                      f'Same u_K per row, new noise per sample (checkpoint {step})', xticks)
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
    _, sampler, params, step, source, prior_key, noise_key = _setup(config, workdir)
    u_K = sampler.prior_states(source, rng.ANALYSIS_DRAW, columns, prior_key)
    noise_keys = rng.example_keys(noise_key, rows)
    u0, trajectory = sampler.chains(params, np.tile(u_K, (rows, 1, 1, 1)),
                                    np.repeat(noise_keys, columns, axis=0), trajectory=True)
    if not parallel.is_main_process():
        return
    out = outputs.folder(workdir, 'analysis', 'share_noise')
    samples = programs.to_uint8(u0)
    storage.save_npz(os.path.join(out, 'share_noise.npz'),
                     images=samples.reshape((rows, columns) + samples.shape[1:]), u_K=u_K,
                     noise_keys=noise_keys)
    tile = samples.shape[1] * plots.tile_scale(samples.shape[1])
    yticks = list(zip(plots.tile_centres(rows + 1, tile),
                      ['u_K'] + [f'noise {r}' for r in range(rows)]))
    plots.save_canvas(os.path.join(out, 'share_noise.png'),
                      images.grid(np.concatenate([programs.to_uint8(u_K), samples]), columns),
                      f'Same noise per row, same u_K per column (checkpoint {step})',
                      yticks=yticks)
    plots.save_trajectory_gif(os.path.join(out, 'trajectory.gif'), trajectory, columns)
    logging.info('share_noise: %d x %d samples written to %s.', rows, columns, out)


def interpolate(config, workdir):
    """Samples between pairs of endpoints (App. D.2, Fig. 7b): u_K linearly, noise spherically
    (for a diffusion process u_K spherically as well; processes.py).

    Writes interpolate.png (one row per pair, num_points frames from endpoint a to b),
    interpolate.gif (all pairs, sweeping a -> b) and interpolate.npz: images (pairs, points, H,
    W, C) uint8, u_K_a, u_K_b, noise_keys_a, noise_keys_b.
    """
    pairs, points = config.analysis.num_rows, config.analysis.num_points
    delta = config.sampling.delta
    mesh, sampler, params, step, source, prior_key, noise_key = _setup(config, workdir)
    u_K_a = sampler.prior_states(source, rng.ANALYSIS_DRAW, pairs,
                                 jax.random.fold_in(prior_key, 0))
    u_K_b = sampler.prior_states(source, rng.ANALYSIS_DRAW + 1, pairs,
                                 jax.random.fold_in(prior_key, 1))
    keys_a = rng.example_keys(jax.random.fold_in(noise_key, 0), pairs)
    keys_b = rng.example_keys(jax.random.fold_in(noise_key, 1), pairs)
    f = programs.residual(state_lib.model_graphdef(config))

    def run(params, batched):
        u_a, u_b, raw_a, raw_b = batched
        one = functools.partial(sampler.process.interpolate, functools.partial(f, params),
                                delta=delta, num_points=points)
        return jax.vmap(one)(u_a, u_b, jax.random.wrap_key_data(raw_a),
                             jax.random.wrap_key_data(raw_b))
    frames = programs.on_mesh(mesh, run)(params, u_K_a, u_K_b, keys_a, keys_b)
    if not parallel.is_main_process():
        return
    out = outputs.folder(workdir, 'analysis', 'interpolate')
    frames = programs.to_uint8(frames)
    storage.save_npz(os.path.join(out, 'interpolate.npz'), images=frames, u_K_a=u_K_a,
                     u_K_b=u_K_b, noise_keys_a=keys_a, noise_keys_b=keys_b)
    tile = frames.shape[2] * plots.tile_scale(frames.shape[2])
    weights = np.linspace(0, 1, points)
    xticks = list(zip(plots.tile_centres(points, tile), [f'{w:.2f}' for w in weights]))
    plots.save_canvas(os.path.join(out, 'interpolate.png'),
                      images.grid(frames.reshape((-1,) + frames.shape[2:]), points),
                      f'{config.model.process}: interpolation a -> b, weight of b '
                      f'(checkpoint {step})', xticks)
    columns = int(np.ceil(np.sqrt(pairs)))
    images.save_gif(os.path.join(out, 'interpolate.gif'),
                    [images.grid(frames[:, i], columns) for i in range(points)], frame_ms=300)
    logging.info('interpolate: %d pairs x %d frames written to %s.', pairs, points, out)


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
    K, delta = config.model.K, config.sampling.delta
    mesh, sampler, params, step, source, prior_key, noise_key = _setup(config, workdir)
    u_K = sampler.prior_states(source, rng.ANALYSIS_DRAW, trees, prior_key)
    noise_keys = rng.example_keys(noise_key, trees)
    f = programs.residual(state_lib.model_graphdef(config))

    def run(params, batched):
        u, raw = batched
        one = functools.partial(sampling.hierarchical, functools.partial(f, params), K=K,
                                delta=delta, splits=splits, branches=branches)
        return jax.vmap(lambda u, key: one(u, key=key))(u, jax.random.wrap_key_data(raw))
    states = programs.on_mesh(mesh, run)(params, u_K, noise_keys)
    if not parallel.is_main_process():
        return
    out = outputs.folder(workdir, 'analysis', 'hierarchical')
    levels = splits + [0]
    storage.save_npz(os.path.join(out, 'hierarchical.npz'), u_K=u_K, noise_keys=noise_keys,
                     levels=np.array(levels),
                     **{f'level_{k}': s for k, s in zip(levels, states)})
    leaves = branches ** len(splits)
    scale = plots.tile_scale(u_K.shape[1])
    tile = u_K.shape[1] * scale
    blocks, yticks = [], []
    for tree in range(trees):
        rows = [programs.to_uint8(u_K[tree:tree + 1])] + [programs.to_uint8(s[tree])
                                                          for s in states]
        top = sum(len(b) for b in blocks)
        yticks += [(top + c, f'k={k}') for c, k in zip(plots.tile_centres(len(rows), tile),
                                                       [K] + levels)]
        blocks.append(plots.tree_canvas(rows, leaves, scale))
        blocks.append(np.full((tile // 2,) + blocks[-1].shape[1:], 255, np.uint8))
    plots.save_canvas(os.path.join(out, 'hierarchical.png'), np.concatenate(blocks[:-1]),
                      f'Chains split in {branches} at k = {splits} (checkpoint {step})',
                      yticks=yticks)
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
    _, sampler, params, step, source, prior_key, noise_key = _setup(config, workdir)
    u_K = sampler.prior_states(source, rng.ANALYSIS_DRAW, rows, prior_key)
    noise_keys = rng.example_keys(noise_key, rows)
    samples = np.stack([programs.to_uint8(sampler.chains(params, u_K, noise_keys, delta))
                        for delta in deltas], axis=1)
    if not parallel.is_main_process():
        return
    out = outputs.folder(workdir, 'analysis', 'delta_grid')
    storage.save_npz(os.path.join(out, 'delta_grid.npz'), images=samples, deltas=np.array(deltas),
                     u_K=u_K, noise_keys=noise_keys)
    table = np.concatenate([programs.to_uint8(u_K)[:, None], samples], axis=1)
    tile = samples.shape[2] * plots.tile_scale(samples.shape[2])
    xticks = list(zip(plots.tile_centres(len(deltas) + 1, tile),
                      ['u_K'] + [f'δ={d:g}' for d in deltas]))
    plots.save_canvas(os.path.join(out, 'delta_grid.png'),
                      images.grid(table.reshape((-1,) + table.shape[2:]), len(deltas) + 1),
                      f'Same u_K and noise per row, δ per column (checkpoint {step}, '
                      f'σ = {config.model.sigma:g})', xticks)
    logging.info('delta_grid: %d rows x %d values of δ written to %s.', rows, len(deltas), out)
