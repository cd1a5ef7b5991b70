"""The paper's sampling variants and analyses, one job (config, workdir) per --mode.

Each job writes into <workdir>/analysis/<mode>/: a picture (PNG), a GIF where the result is a
sequence, and its numbers (NPZ or JSON). The sampling jobs restore the EMA parameters of the
newest checkpoint and run their chains jitted, split over the mesh's 'data' axis; psd and
prior_overlap read data only. Everything random follows from config.seed.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from matplotlib import cm
from matplotlib import colors
from matplotlib import ticker
from matplotlib.figure import Figure

from ihdm_jax import data
from ihdm_jax import heat
from ihdm_jax import images
from ihdm_jax import objective
from ihdm_jax import parallel
from ihdm_jax import sampling
from ihdm_jax import train
from ihdm_jax.analysis import probes
from ihdm_jax.analysis import spectra
from ihdm_jax.evaluation import likelihood
from ihdm_jax.models import unet

# Streams of the sampling key, so that prior draws and noise sequences never share numbers.
_PRIOR, _NOISE = 0, 1
_PAD = 2  # white pixels between tiles, as in images.grid


def _out_dir(workdir, mode):
    path = os.path.join(workdir, 'analysis', mode)
    if parallel.is_main_process():
        os.makedirs(path, exist_ok=True)
    return path


def _require_positive(config, *names):
    for name in names:
        value = config.analysis[name]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'config.analysis.{name}={value!r} must be a positive integer.')


def _levels(config, name):
    """The levels k = max(1, round(f K)) for the fractions f in config.analysis[name]."""
    fractions = tuple(config.analysis[name])
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f'config.analysis.{name}={fractions} must be fractions of K in (0, 1].')
    return [max(1, round(f * config.model.K)) for f in fractions]


def _times(config):
    m = config.model
    return np.asarray(heat.heat_times(m.K, m.blur_sigma_min, m.blur_sigma_max))


def _keys(config):
    """(prior key, noise key) split off the sampling key of config.seed."""
    key = train._keys(config)[2]
    return jax.random.fold_in(key, _PRIOR), jax.random.fold_in(key, _NOISE)


def _raw_keys(key, n):
    """n keys split off `key` as uint32 key data, so that they can be padded and sharded."""
    return np.asarray(jax.random.key_data(jax.random.split(key, n)))


def _scaled(source, indices):
    return source.load(np.asarray(indices)).astype(np.float32) / 255.0


def prior_states(config, source, n, key):
    """n draws u_K of the KDE prior (Sec. 3.2): training images picked with `key`, blurred to t_K,
    plus δ noise. Returns float32 numpy (n, H, W, C), the same on every process."""
    pick_key, noise_key = jax.random.split(key)
    x = _scaled(source, jax.random.randint(pick_key, (n,), 0, len(source)))
    return np.asarray(sampling.prior_sample(noise_key, x, _times(config)[-1],
                                            config.sampling.delta))


def _model(config, workdir, mesh):
    """(f(params, u, k), the newest checkpoint's EMA parameters on `mesh`, its step)."""
    params, step = train.restore_ema_params(config, workdir, mesh)
    graphdef = train.model_graphdef(config)
    logging.info('Analysing the EMA parameters of checkpoint %d in %s.', step, workdir)

    def f(params, u, k):
        return unet.apply(graphdef, params, u, k, train=False)
    return f, params, step


def _on_mesh(mesh, fn):
    """fn(replicated, batched) jitted on `mesh` as a function of numpy inputs and outputs.

    `replicated` (a pytree) goes whole to every device. The arrays in the tuple `batched` and
    every output are split over 'data' along their first axis; the batch is padded to a multiple
    of the device count (by repeating its last entry) and the outputs are cut back to it.
    """
    sharding = parallel.batch_sharding(mesh)
    jitted = jax.jit(fn, in_shardings=(parallel.replicated(mesh), sharding),
                     out_shardings=sharding)

    def to_mesh(x, size):
        x = np.asarray(x)
        x = np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])
        return parallel.to_global(x[parallel.local_rows(sharding, x.shape)], sharding, x.shape)

    def call(replicated, *batched):
        n = len(batched[0])
        size = -(-n // mesh.size) * mesh.size
        out = jitted(replicated, tuple(to_mesh(x, size) for x in batched))
        return jax.tree.map(lambda y: parallel.gather(y)[:n], out)
    return call


def _chains(config, mesh, f):
    """(params, u_K, raw noise keys) -> (u_0, trajectory (B, levels, H, W, C)): Alg. 2 from each
    u_K[b] with the noise sequence of key b over the mesh, recording the trajectory GIF's levels."""
    K, delta = config.model.K, config.sampling.delta

    def run(params, batched):
        u_K, raw_keys = batched
        noise = sampling.example_noise(jax.random.wrap_key_data(raw_keys), u_K.shape[1:])
        u0, trajectory = sampling.sample_with_noise(functools.partial(f, params), u_K, K, delta,
                                                    noise, _trajectory_levels(K))
        return u0, jnp.swapaxes(trajectory, 0, 1)
    return _on_mesh(mesh, run)


def _trajectory_levels(K):
    """The levels recorded for trajectory GIFs: train.GIF_FRAMES levels from K down to 0."""
    return tuple(np.unique(np.linspace(0, K, min(K + 1, train.GIF_FRAMES)).round()
                           .astype(int))[::-1])


def _tile_scale(image_size):
    return max(1, -(-images.MIN_TILE // image_size))


def _tile_centres(count, tile):
    return [_PAD + i * (tile + _PAD) + tile / 2 for i in range(count)]


def _save_canvas(path, canvas, title, xticks=(), yticks=()):
    """Writes a uint8 HWC picture at its own pixel size, titled, with (position, label) ticks."""
    height, width = canvas.shape[:2]
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas[..., 0] if canvas.shape[-1] == 1 else canvas, cmap='gray', vmin=0,
              vmax=255, interpolation='nearest')
    ax.set_title(title, fontsize=10)
    ax.set_xticks([p for p, _ in xticks], [label for _, label in xticks], fontsize=8)
    ax.set_yticks([p for p, _ in yticks], [label for _, label in yticks], fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.savefig(path, bbox_inches='tight', pad_inches=0.1)


def _save_trajectory_gif(path, trajectory, columns):
    """trajectory (B, levels, H, W, C) in [0, 1] as a GIF of grids, level K first."""
    frames = images.to_uint8(trajectory)
    images.save_gif(path, [images.grid(frames[:, i], columns) for i in range(frames.shape[1])])


def _plain_log_ticks(axis, low, high):
    """Ticks at 1, 2, 5 x 10^n between low and high on a log axis, labelled as plain numbers."""
    ticks = [m * 10.0**e for e in range(-4, 4) for m in (1, 2, 5) if low <= m * 10.0**e <= high]
    axis.set_ticks(ticks, [f'{v:g}' for v in ticks])
    axis.set_minor_formatter(ticker.NullFormatter())


def _write_json(path, values):
    with open(path, 'w') as f:
        json.dump(values, f, indent=1)


def same_init(config, workdir):
    """One prior draw u_K per row, an independent noise sequence in every column (Fig. 5b, 15).

    Writes same_init.png (each row: its u_K, then the samples), trajectory.gif (levels K..0)
    and same_init.npz: images (rows, columns, H, W, C) uint8, u_K (the state each chain started
    from, as its trajectory recorded it), noise_keys.
    """
    _require_positive(config, 'num_rows', 'num_columns')
    rows, columns = config.analysis.num_rows, config.analysis.num_columns
    mesh = parallel.make_mesh()
    f, params, step = _model(config, workdir, mesh)
    prior_key, noise_key = _keys(config)
    u_K = np.repeat(prior_states(config, data.make_source(config), rows, prior_key), columns,
                    axis=0)
    noise_keys = _raw_keys(noise_key, rows * columns)
    chains = _chains(config, mesh, f)
    u0, trajectory = chains(params, u_K, noise_keys)
    if not parallel.is_main_process():
        return
    out = _out_dir(workdir, 'same_init')
    samples = images.to_uint8(u0)
    shape = (rows, columns) + samples.shape[1:]
    np.savez(os.path.join(out, 'same_init.npz'), images=samples.reshape(shape),
             u_K=trajectory[:, 0].reshape(shape), noise_keys=noise_keys)
    starts = images.to_uint8(u_K[::columns])
    table = np.concatenate([starts[:, None], samples.reshape(shape)], axis=1)
    tile = samples.shape[1] * _tile_scale(samples.shape[1])
    xticks = list(zip(_tile_centres(columns + 1, tile), ['u_K'] + [''] * columns))
    _save_canvas(os.path.join(out, 'same_init.png'),
                 images.grid(table.reshape((-1,) + table.shape[2:]), columns + 1),
                 f'Same u_K per row, new noise per sample (checkpoint {step})', xticks)
    _save_trajectory_gif(os.path.join(out, 'trajectory.gif'), trajectory, columns)
    logging.info('same_init: %d x %d samples written to %s.', rows, columns, out)


def share_noise(config, workdir):
    """One noise sequence per row, one prior draw u_K per column (Fig. 7a).

    Sample (r, c) starts from u_K[c] and adds the noise sequence of row r, so a row shows how one
    noise sequence carves different prior states and a column how one state grows under
    different noise. Writes share_noise.png (top row: the u_K), trajectory.gif and
    share_noise.npz: images (rows, columns, H, W, C) uint8, u_K (columns, H, W, C), noise_keys
    (rows, 2).
    """
    _require_positive(config, 'num_rows', 'num_columns')
    rows, columns = config.analysis.num_rows, config.analysis.num_columns
    mesh = parallel.make_mesh()
    f, params, step = _model(config, workdir, mesh)
    prior_key, noise_key = _keys(config)
    u_K = prior_states(config, data.make_source(config), columns, prior_key)
    noise_keys = _raw_keys(noise_key, rows)
    chains = _chains(config, mesh, f)
    u0, trajectory = chains(params, np.tile(u_K, (rows, 1, 1, 1)),
                            np.repeat(noise_keys, columns, axis=0))
    if not parallel.is_main_process():
        return
    out = _out_dir(workdir, 'share_noise')
    samples = images.to_uint8(u0)
    np.savez(os.path.join(out, 'share_noise.npz'),
             images=samples.reshape((rows, columns) + samples.shape[1:]), u_K=u_K,
             noise_keys=noise_keys)
    tile = samples.shape[1] * _tile_scale(samples.shape[1])
    yticks = list(zip(_tile_centres(rows + 1, tile), ['u_K'] + [f'noise {r}' for r in range(rows)]))
    _save_canvas(os.path.join(out, 'share_noise.png'),
                 images.grid(np.concatenate([images.to_uint8(u_K), samples]), columns),
                 f'Same noise per row, same u_K per column (checkpoint {step})', yticks=yticks)
    _save_trajectory_gif(os.path.join(out, 'trajectory.gif'), trajectory, columns)
    logging.info('share_noise: %d x %d samples written to %s.', rows, columns, out)


def interpolate(config, workdir):
    """Samples between pairs of endpoints (App. D.2, Fig. 7b): u_K linearly, noise spherically.

    Writes interpolate.png (one row per pair, num_points frames from endpoint a to b),
    interpolate.gif (all pairs, sweeping a -> b) and interpolate.npz: images (pairs, points, H,
    W, C) uint8, u_K_a, u_K_b, noise_keys_a, noise_keys_b.
    """
    _require_positive(config, 'num_rows', 'num_points')
    pairs, points = config.analysis.num_rows, config.analysis.num_points
    if points < 2:
        raise ValueError(f'config.analysis.num_points={points} must be at least 2 (both '
                         'endpoints).')
    K, delta = config.model.K, config.sampling.delta
    mesh = parallel.make_mesh()
    f, params, step = _model(config, workdir, mesh)
    source = data.make_source(config)
    prior_key, noise_key = _keys(config)
    u_K_a = prior_states(config, source, pairs, jax.random.fold_in(prior_key, 0))
    u_K_b = prior_states(config, source, pairs, jax.random.fold_in(prior_key, 1))
    keys_a = _raw_keys(jax.random.fold_in(noise_key, 0), pairs)
    keys_b = _raw_keys(jax.random.fold_in(noise_key, 1), pairs)

    def run(params, batched):
        u_a, u_b, raw_a, raw_b = batched
        one = functools.partial(sampling.interpolate, functools.partial(f, params), K=K,
                                delta=delta, num_points=points)
        return jax.vmap(one)(u_a, u_b, jax.random.wrap_key_data(raw_a),
                             jax.random.wrap_key_data(raw_b))
    frames = _on_mesh(mesh, run)(params, u_K_a, u_K_b, keys_a, keys_b)
    if not parallel.is_main_process():
        return
    out = _out_dir(workdir, 'interpolate')
    frames = images.to_uint8(frames)
    np.savez(os.path.join(out, 'interpolate.npz'), images=frames, u_K_a=u_K_a, u_K_b=u_K_b,
             noise_keys_a=keys_a, noise_keys_b=keys_b)
    tile = frames.shape[2] * _tile_scale(frames.shape[2])
    weights = np.linspace(0, 1, points)
    xticks = list(zip(_tile_centres(points, tile), [f'{w:.2f}' for w in weights]))
    _save_canvas(os.path.join(out, 'interpolate.png'),
                 images.grid(frames.reshape((-1,) + frames.shape[2:]), points),
                 f'Interpolation a -> b, weight of b (checkpoint {step})', xticks)
    columns = int(np.ceil(np.sqrt(pairs)))
    images.save_gif(os.path.join(out, 'interpolate.gif'),
                    [images.grid(frames[:, i], columns) for i in range(points)], frame_ms=300)
    logging.info('interpolate: %d pairs x %d frames written to %s.', pairs, points, out)


def _split_levels(config):
    K = config.model.K
    fractions = tuple(config.analysis.split_fractions)
    levels = [round(f * K) for f in fractions]
    if not levels or levels != sorted(set(levels), reverse=True) or not 0 < levels[-1] <= \
            levels[0] < K:
        raise ValueError(f'config.analysis.split_fractions={fractions} must give distinct '
                         f'levels in 1..{K - 1}, descending (with K={K}: {levels}).')
    return levels


def _tree_canvas(rows, leaves, scale):
    """uint8 images of a tree's levels (row r: (n_r, H, W, C)) enlarged `scale` times, one row
    of tiles per level, each tile centred over its descendants in the last row."""
    _, height, width, channels = rows[0].shape
    height, width = height * scale, width * scale
    canvas = np.full((len(rows) * (height + _PAD) + _PAD, leaves * (width + _PAD) + _PAD,
                      channels), 255, np.uint8)
    for r, row in enumerate(rows):
        span = leaves * (width + _PAD) / len(row)
        top = _PAD + r * (height + _PAD)
        for i, image in enumerate(row):
            left = int(round(_PAD / 2 + (i + 0.5) * span - width / 2))
            canvas[top:top + height, left:left + width] = image.repeat(scale, 0).repeat(scale, 1)
    return canvas


def hierarchical(config, workdir):
    """Trees of samples (Fig. 5b): from one u_K per tree, every chain splits at the split levels
    into `branches` copies that continue with their own noise.

    Writes hierarchical.png (per tree one row per level: u_K, the chains at each split before
    they split, the final samples; each image centred over its descendants) and
    hierarchical.npz: u_K (trees, H, W, C), noise_keys, levels, and level_<k> (trees,
    chains, H, W, C) float32 for every split level k and 0.
    """
    _require_positive(config, 'num_trees', 'branches')
    splits = _split_levels(config)
    trees, branches = config.analysis.num_trees, config.analysis.branches
    K, delta = config.model.K, config.sampling.delta
    mesh = parallel.make_mesh()
    f, params, step = _model(config, workdir, mesh)
    prior_key, noise_key = _keys(config)
    u_K = prior_states(config, data.make_source(config), trees, prior_key)
    noise_keys = _raw_keys(noise_key, trees)

    def run(params, batched):
        u, raw = batched
        one = functools.partial(sampling.hierarchical, functools.partial(f, params), K=K,
                                delta=delta, splits=splits, branches=branches)
        return jax.vmap(lambda u, key: one(u, key=key))(u, jax.random.wrap_key_data(raw))
    states = _on_mesh(mesh, run)(params, u_K, noise_keys)
    if not parallel.is_main_process():
        return
    out = _out_dir(workdir, 'hierarchical')
    levels = splits + [0]
    np.savez(os.path.join(out, 'hierarchical.npz'), u_K=u_K, noise_keys=noise_keys,
             levels=np.array(levels), **{f'level_{k}': s for k, s in zip(levels, states)})
    leaves = branches ** len(splits)
    scale = _tile_scale(u_K.shape[1])
    tile = u_K.shape[1] * scale
    blocks, yticks = [], []
    for tree in range(trees):
        rows = [images.to_uint8(u_K[tree:tree + 1])] + [images.to_uint8(s[tree]) for s in states]
        top = sum(len(b) for b in blocks)
        yticks += [(top + c, f'k={k}') for c, k in zip(_tile_centres(len(rows), tile),
                                                       [K] + levels)]
        blocks.append(_tree_canvas(rows, leaves, scale))
        blocks.append(np.full((tile // 2,) + blocks[-1].shape[1:], 255, np.uint8))
    _save_canvas(os.path.join(out, 'hierarchical.png'), np.concatenate(blocks[:-1]),
                 f'Chains split in {branches} at k = {splits} (checkpoint {step})',
                 yticks=yticks)
    logging.info('hierarchical: %d trees of %d samples written to %s.', trees, leaves, out)


def nearest_neighbours(config, workdir):
    """Samples next to their Euclidean-nearest training images (App. D.4, Fig. 30).

    The samples are those of --mode=sample (the first num_rows of them). Writes nearest_neighbours.png
    (one row per sample: the sample, then its neighbours, nearest first) and
    nearest_neighbours.npz: images, neighbours (uint8), indices, distances (root sum of squares
    over pixels in [0, 1]).
    """
    _require_positive(config, 'num_rows', 'num_neighbours')
    rows, num = config.analysis.num_rows, config.analysis.num_neighbours
    mesh = parallel.make_mesh()
    parallel.check_divisible(config.sampling.batch_size, mesh, 'config.sampling.batch_size')
    params, step = train.restore_ema_params(config, workdir, mesh)
    loader = data.make_loader(config, parallel.batch_sharding(mesh), config.sampling.batch_size)
    sampler = train.make_sampler(config, train.model_graphdef(config), mesh)
    first_rows = config.copy_and_resolve_references()
    first_rows.sampling.num_samples = rows
    samples = train.draw_samples(first_rows, sampler, params, loader, train._keys(config)[2])
    if not parallel.is_main_process():
        return
    source = loader.source
    indices = probes.nearest_neighbours(samples / 255.0, _ScaledImages(source), num,
                                        chunk_size=1024)
    neighbours = source.load(indices.reshape(-1)).reshape((rows, num) + samples.shape[1:])
    distances = np.sqrt(np.sum(np.square(samples[:, None] / 255.0 - neighbours / 255.0),
                               axis=(2, 3, 4)))
    out = _out_dir(workdir, 'nearest_neighbours')
    np.savez(os.path.join(out, 'nearest_neighbours.npz'), images=samples, neighbours=neighbours,
             indices=indices, distances=distances)
    table = np.concatenate([samples[:, None], neighbours], axis=1)
    tile = samples.shape[1] * _tile_scale(samples.shape[1])
    xticks = list(zip(_tile_centres(num + 1, tile), ['sample'] + [str(i + 1) for i in range(num)]))
    _save_canvas(os.path.join(out, 'nearest_neighbours.png'),
                 images.grid(table.reshape((-1,) + table.shape[2:]), num + 1),
                 f'Samples (checkpoint {step}) and their nearest training images', xticks)
    logging.info('nearest_neighbours: %d samples written to %s.', rows, out)


class _ScaledImages:
    """A source's images as float32 in [0, 1], loaded one slice at a time."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, rows):
        return _scaled(self.source, np.arange(len(self.source))[rows])


def psd(config, workdir):
    """Power spectra under the heat and the diffusion forward processes (Sec. 3.3, Fig. 4) and
    the DCT energy of each frequency against σ_B (App. B.5, Fig. 9), for training images.

    Fig. 4: the radial PSD (App. B.6) of F(t_k) u0 at the levels of config.analysis.level_fractions
    and of the variance-preserving diffusion x/√ᾱ + √((1 − ᾱ)/ᾱ) ε at matched steps: ᾱ is chosen
    by spectra.matched_alpha_bar so that the diffusion's noise floor (1 − ᾱ)/ᾱ equals the data
    power at the lowest frequency the heat level has pushed below σ², i.e. both processes have
    lost the same frequencies. Fig. 9: the mean squared DCT coefficient of each frequency contour
    of F(t) u0 against σ_B = √(2t) over the schedule σ_B,1..σ_B,K, with the σ² line below which
    a frequency is lost in q(u_k | u0). Writes psd.png, energy_vs_blur.png and psd.json (the
    spectra, the matched ᾱ and the fitted power-law exponent α of the data, psd ∝ 1/f^α).
    """
    _require_positive(config, 'num_images')
    levels = _levels(config, 'level_fractions')
    source = data.make_source(config)
    n = min(config.analysis.num_images, len(source))
    prior_key, noise_key = _keys(config)
    x = _scaled(source, np.sort(np.asarray(jax.random.permutation(prior_key, len(source))[:n])))
    t = _times(config)
    sigma = config.model.sigma
    frequencies, data_psd = spectra.radial_psd(x)
    alpha = float(spectra.power_law_exponent(frequencies, data_psd))
    eps = jax.random.normal(noise_key, x.shape)
    blur = jax.jit(heat.heat_forward)
    curves = []
    for k in levels:
        _, heat_psd = spectra.radial_psd(blur(x, t[k]))
        alpha_bar = spectra.matched_alpha_bar(data_psd, heat_psd, sigma)
        noisy = spectra.diffusion_forward(x, eps, alpha_bar) / np.sqrt(alpha_bar)
        curves.append({'k': k, 'blur_sigma': float(np.sqrt(2 * t[k])), 'heat_psd': heat_psd,
                       'alpha_bar': alpha_bar, 'diffusion_psd': spectra.radial_psd(noisy)[1]})
    blur_sigmas = np.sqrt(2 * t[1:])
    _, energy = spectra.dct_energy_by_blur(x, blur_sigmas)
    if not parallel.is_main_process():
        return
    out = _out_dir(workdir, 'psd')
    listed = lambda a: [float(v) for v in a]  # noqa: E731
    _write_json(os.path.join(out, 'psd.json'), {
        'num_images': n, 'sigma': sigma, 'power_law_exponent': alpha,
        'frequencies': listed(frequencies), 'data_psd': listed(data_psd),
        'levels': [{key: listed(v) if isinstance(v, np.ndarray) else v for key, v in c.items()}
                   for c in curves],
        'blur_sigmas': listed(blur_sigmas), 'energy_by_blur': [listed(e) for e in energy]})
    _plot_psd(os.path.join(out, 'psd.png'), frequencies, data_psd, curves, sigma, n)
    _plot_energy(os.path.join(out, 'energy_vs_blur.png'), frequencies, data_psd, alpha,
                 blur_sigmas, energy, sigma, n)
    logging.info('psd: power-law exponent of the data PSD (psd ∝ 1/f^α, f ≤ 0.25 cycles/px) '
                 'α = %.3f; psd.png, energy_vs_blur.png and psd.json written to %s.', alpha, out)


def _plot_psd(path, frequencies, data_psd, curves, sigma, n):
    fig = Figure(figsize=(11, 4.5), dpi=100)
    heat_ax, diffusion_ax = fig.subplots(1, 2, sharey=True)
    shades = np.linspace(0.35, 1.0, len(curves))
    blues = [(0.1, 0.3 * s, s) for s in shades]
    reds = [(s, 0.25 * s, 0.1) for s in shades]
    for ax, name, colours in ((heat_ax, 'heat_psd', blues), (diffusion_ax, 'diffusion_psd', reds)):
        ax.loglog(frequencies, data_psd, 'k-', lw=2, label='data')
        for c, colour in zip(curves, colours):
            label = (f'k={c["k"]}, σ_B={c["blur_sigma"]:.2f}' if name == 'heat_psd' else
                     f'k={c["k"]}, ᾱ={c["alpha_bar"]:.4f}')
            ax.loglog(frequencies, c[name], color=colour, label=label)
        ax.set_xlabel('frequency (cycles per pixel)')
        _plain_log_ticks(ax.xaxis, frequencies[0], frequencies[-1])
        ax.grid(True, alpha=0.3)
    heat_ax.axhline(sigma**2, color='gray', ls='--', label=f'σ² = {sigma**2:g}')
    heat_ax.set_ylim(bottom=sigma**2 * 1e-3)  # far below σ² a frequency is lost anyway
    heat_ax.set_ylabel('power (mean squared DCT coefficient)')
    heat_ax.set_title('Heat: F(t_k) u0, approaches the data from below', fontsize=10)
    diffusion_ax.set_title('Diffusion at matched steps: x/√ᾱ + √((1−ᾱ)/ᾱ) ε, from above',
                           fontsize=10)
    heat_ax.legend(fontsize=7)
    diffusion_ax.legend(fontsize=7)
    fig.suptitle(f'Radial power spectral density of {n} training images (Fig. 4)')
    fig.savefig(path, bbox_inches='tight')


def _plot_energy(path, frequencies, data_psd, alpha, blur_sigmas, energy, sigma, n):
    fig = Figure(figsize=(11, 4.5), dpi=100)
    psd_ax, energy_ax = fig.subplots(1, 2)
    psd_ax.loglog(frequencies, data_psd, 'k.-', label='data')
    fit = frequencies <= 0.25
    scale = np.exp(np.mean(np.log(data_psd[fit]) + alpha * np.log(frequencies[fit])))
    psd_ax.loglog(frequencies[fit], scale * frequencies[fit] ** -alpha, 'C1--',
                  label=f'1/f^α fit (f ≤ 0.25), α={alpha:.2f}')
    psd_ax.set_xlabel('frequency (cycles per pixel)')
    _plain_log_ticks(psd_ax.xaxis, frequencies[0], frequencies[-1])
    psd_ax.set_ylabel('power (mean squared DCT coefficient)')
    psd_ax.set_title('1-D PSD of the data (σ_B = 0)', fontsize=10)
    psd_ax.legend(fontsize=8)
    shown = np.unique(np.geomspace(1, len(frequencies), min(len(frequencies), 24)).astype(int)) - 1
    cmap = colors.LinearSegmentedColormap.from_list('f', ['#08306b', '#6baed6', '#fd8d3c',
                                                          '#7f2704'])
    norm = colors.LogNorm(frequencies[0], frequencies[-1])
    for r in shown:
        energy_ax.loglog(blur_sigmas, energy[:, r], color=cmap(norm(frequencies[r])), lw=1)
    energy_ax.axhline(sigma**2, color='k', ls='--', label=f'σ² = {sigma**2:g}')
    energy_ax.set_xlabel('σ_B (pixels), the schedule σ_B,1..σ_B,K')
    _plain_log_ticks(energy_ax.xaxis, blur_sigmas[0], blur_sigmas[-1])
    energy_ax.set_ylabel('mean squared DCT coefficient')
    energy_ax.set_title('Energy of each frequency contour under the heat equation', fontsize=10)
    energy_ax.legend(fontsize=8, loc='lower left')
    energy_ax.set_ylim(bottom=max(energy.min(), sigma**2 * 1e-4))
    bar = fig.colorbar(cm.ScalarMappable(norm, cmap), ax=energy_ax,
                       label='frequency (cycles per pixel)')
    _plain_log_ticks(bar.ax.yaxis, frequencies[0], frequencies[-1])
    fig.suptitle(f'DCT energy against blur, {n} training images (Fig. 9)')
    fig.savefig(path, bbox_inches='tight')


def input_gradients(config, workdir):
    """∂μ(u_k, k)[pixel]/∂u_k at u_k = F(t_k) x for a training image x (Sec. 4, Fig. 8).

    For the output pixels of config.analysis.gradient_pixels (channel 0) and the levels of
    config.analysis.level_fractions: how the predicted mean at that pixel depends on every input
    pixel (of channel 0). Writes input_gradients.png (top row: the inputs u_k with the pixels
    marked; below, one row per pixel, symlog colours with linear range gradient_linthresh) and
    input_gradients.npz: gradients (pixels, levels, H, W, C), inputs, levels, pixels.
    """
    levels = _levels(config, 'level_fractions')
    size = config.data.image_size
    fractions = [tuple(p) for p in config.analysis.gradient_pixels]
    if not fractions or any(len(p) != 2 or not all(0 <= v < 1 for v in p) for p in fractions):
        raise ValueError(f'config.analysis.gradient_pixels={tuple(fractions)} must be (row, '
                         'column) pairs of fractions of the image size in [0, 1).')
    pixels = [(int(r * size), int(c * size)) for r, c in fractions]
    linthresh = config.analysis.gradient_linthresh
    if not linthresh > 0:
        raise ValueError(f'config.analysis.gradient_linthresh={linthresh} must be > 0.')
    mesh = parallel.make_mesh()
    f, params, step = _model(config, workdir, mesh)
    source = data.make_source(config)
    prior_key, _ = _keys(config)
    x = _scaled(source, jax.random.randint(prior_key, (1,), 0, len(source)))
    t = _times(config)

    @jax.jit
    def gradient(params, u, k, i, j):
        mu = lambda v: v + f(params, v, jnp.full((1,), k, jnp.int32))  # noqa: E731
        return probes.input_gradient(mu, u, (i, j, 0))

    inputs = np.stack([np.asarray(heat.heat_forward(x, t[k]))[0] for k in levels])
    grads = np.stack([[np.asarray(gradient(params, u[None], k, i, j))
                       for k, u in zip(levels, inputs)] for i, j in tqdm.tqdm(
                           pixels, desc='input gradients', disable=not parallel.is_main_process())])
    if not parallel.is_main_process():
        return
    out = _out_dir(workdir, 'input_gradients')
    np.savez(os.path.join(out, 'input_gradients.npz'), gradients=grads, inputs=inputs,
             levels=np.array(levels), pixels=np.array(pixels))
    _plot_gradients(os.path.join(out, 'input_gradients.png'), grads[..., 0], inputs, levels,
                    pixels, t, linthresh, step)
    logging.info('input_gradients: %d pixels x %d levels written to %s.', len(pixels),
                 len(levels), out)


def _plot_gradients(path, grads, inputs, levels, pixels, t, linthresh, step):
    rows, columns = len(pixels) + 1, len(levels)
    fig = Figure(figsize=(1.9 * columns + 1.2, 1.9 * rows + 0.6), dpi=100, layout='constrained')
    axes = fig.subplots(rows, columns, squeeze=False)
    limit = float(np.abs(grads).max())
    norm = colors.SymLogNorm(linthresh, vmin=-limit, vmax=limit, base=10)
    shown = None
    for col, k in enumerate(levels):
        image = np.clip(inputs[col], 0, 1)
        axes[0, col].imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap='gray',
                            vmin=0, vmax=1)
        axes[0, col].set_title(f'k={k}, σ_B={np.sqrt(2 * t[k]):.2f}', fontsize=9)
        for p, (i, j) in enumerate(pixels):
            axes[0, col].plot(j, i, 's', mfc='none', mec=f'C{p}', ms=5)
            shown = axes[p + 1, col].imshow(grads[p, col], cmap='RdBu_r', norm=norm)
            axes[p + 1, col].plot(j, i, 's', mfc='none', mec=f'C{p}', ms=5, alpha=0.6)
    for p, (i, j) in enumerate(pixels):
        axes[p + 1, 0].set_ylabel(f'pixel ({i}, {j})', fontsize=9, color=f'C{p}')
    axes[0, 0].set_ylabel('input u_k', fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=axes[1:].ravel().tolist(), shrink=0.8,
                 label=f'∂μ/∂u (symlog, linear below {linthresh:g})')
    fig.suptitle(f'Input gradients of the predicted mean μ(u_k, k) (checkpoint {step}, Fig. 8)')
    fig.savefig(path, bbox_inches='tight')


def prior_overlap(config, workdir):
    """Mean App. A.3 upper bound on L_K = D_KL[q(u_K | u0) ‖ p(u_K)] over the test set against
    σ_B,max (App. C.2, Fig. 12).

    For each σ_B,max of config.analysis.blur_sigma_maxes (t_K = σ_B,max²/2): the KDE prior of the
    blurred training set (bandwidth δ = config.sampling.delta) against q(u_K | u0) of every test
    image (std σ = config.model.sigma), images scaled to [0, 1]; the training set is taken
    config.evaluation.train_chunk images at a time. (--mode=eval bounds L_K the same way for
    dequantised test images at the model's own σ_B,max.) Writes prior_overlap.png (bits/dim
    against σ_B,max, the model's σ_B,max marked) and prior_overlap.json (nats per image and
    bits/dim).
    """
    maxes = [float(s) for s in config.analysis.blur_sigma_maxes]
    if not maxes or any(s <= 0 for s in maxes):
        raise ValueError(f'config.analysis.blur_sigma_maxes={tuple(maxes)} must be positive '
                         'blur widths in pixels.')
    chunk = config.evaluation.train_chunk
    if chunk < 1:
        raise ValueError(f'config.evaluation.train_chunk={chunk} must be >= 1.')
    mesh = parallel.make_mesh()
    source = data.make_source(config)
    test_source = data.make_source(config, split='test')
    test_x = _scaled(test_source, np.arange(len(test_source)))
    sigma, delta = config.model.sigma, config.sampling.delta

    def run(train, batched):
        train_images, t_K = train
        (test_x,) = batched
        blurred = heat.heat_forward(train_images.astype(jnp.float32) / 255.0, t_K)
        return objective.prior_kl_upper_bound(heat.heat_forward(test_x, t_K), blurred, sigma,
                                              delta)
    bound = _on_mesh(mesh, run)
    bounds, sizes = [[] for _ in maxes], []
    for start in tqdm.tqdm(range(0, len(source), chunk), desc='prior overlap', unit='chunk',
                           disable=not parallel.is_main_process()):
        x = source.load(np.arange(start, min(start + chunk, len(source))))
        x = parallel.to_global(x, parallel.replicated(mesh), x.shape)
        sizes.append(x.shape[0])
        for per_max, s in zip(bounds, maxes):
            per_max.append(bound((x, np.float32(s**2 / 2)), test_x))
    dims = int(np.prod(test_x.shape[1:]))
    results = []
    for s, per_max in zip(maxes, bounds):
        nats = float(np.mean(likelihood.merge_prior_bounds(per_max, sizes)))
        results.append({'blur_sigma_max': s, 'L_K_nats': nats,
                        'L_K_bits_per_dim': nats / (dims * np.log(2.0))})
    if not parallel.is_main_process():
        return
    out = _out_dir(workdir, 'prior_overlap')
    _write_json(os.path.join(out, 'prior_overlap.json'), {
        'num_train': len(source), 'num_test': len(test_source), 'sigma': sigma, 'delta': delta,
        'results': results})
    fig = Figure(figsize=(5.5, 4), dpi=100)
    ax = fig.subplots()
    ax.plot(maxes, [r['L_K_bits_per_dim'] for r in results], 'o-')
    ax.axvline(config.model.blur_sigma_max, color='gray', ls=':',
               label=f'this model: σ_B,max = {config.model.blur_sigma_max:g}')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xticks(maxes, [f'{s:g}' for s in maxes])
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel('σ_B,max (pixels)')
    ax.set_ylabel('mean L_K upper bound (bits/dim)')
    ax.set_title(f'Prior overlap: {len(test_source)} test images vs the blurred training set\n'
                 f'(σ = {sigma:g}, δ = {delta:g}; Fig. 12)', fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(os.path.join(out, 'prior_overlap.png'), bbox_inches='tight')
    logging.info('prior_overlap: %s written to %s.',
                 ', '.join(f'σ_B,max={r["blur_sigma_max"]:g}: {r["L_K_bits_per_dim"]:.4f} bits/dim'
                           for r in results), out)
