"""Pictures of results: plots with matplotlib's Figure API (no global pyplot state) and titled
image grids."""

import numpy as np
from matplotlib import cm
from matplotlib import collections
from matplotlib import colors
from matplotlib import ticker
from matplotlib.figure import Figure

from ihdm_jax import images
from ihdm_jax import storage


def _save(fig, path, **kwargs):
    """Writes a matplotlib figure in the format of the path's suffix."""
    storage.write_with(path, fig.savefig, format=str(path).rsplit('.', 1)[-1], **kwargs)


def save_canvas(path, canvas, title, xticks=(), yticks=()):
    """Writes a uint8 HWC picture at its own pixel size, titled, with (position, label) ticks."""
    height, width = canvas.shape[:2]
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(
        canvas[..., 0] if canvas.shape[-1] == 1 else canvas,
        cmap='gray',
        vmin=0,
        vmax=255,
        interpolation='nearest',
    )
    ax.set_title(title, fontsize=10)
    ax.set_xticks([p for p, _ in xticks], [label for _, label in xticks], fontsize=8)
    ax.set_yticks([p for p, _ in yticks], [label for _, label in yticks], fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    _save(fig, path, bbox_inches='tight', pad_inches=0.1)


def save_table(path, table, title, column_labels=(), row_labels=()):
    """uint8 images (rows, columns, H, W, C) as a titled grid, labelled under the first row's
    images and beside the first column's."""
    rows, columns, size = table.shape[:3]
    save_canvas(
        path,
        images.grid(table.reshape((-1,) + table.shape[2:]), columns),
        title,
        list(zip(images.tile_centres(columns, size), column_labels)),
        list(zip(images.tile_centres(rows, size), row_labels)),
    )


def save_trajectory_gif(path, trajectory, columns):
    """trajectory (B, levels, H, W, C) in [0, 1] as a GIF of grids, level K first."""
    frames = images.to_uint8(trajectory)
    images.save_gif(path, [images.grid(frames[:, i], columns) for i in range(frames.shape[1])])


def _plain_log_ticks(axis, low, high):
    """Ticks at 1, 2, 5 x 10^n between low and high on a log axis, labelled as plain numbers."""
    ticks = [m * 10.0**e for e in range(-4, 4) for m in (1, 2, 5) if low <= m * 10.0**e <= high]
    axis.set_ticks(ticks, [f'{v:g}' for v in ticks])
    axis.set_minor_formatter(ticker.NullFormatter())


def tree_canvas(rows, leaves, scale):
    """uint8 images of a tree's levels (row r: (n_r, H, W, C)) enlarged `scale` times, one row
    of tiles per level, each tile centred over its descendants in the last row."""
    _, height, width, channels = rows[0].shape
    height, width = height * scale, width * scale
    pad = images.PAD
    canvas = np.full(
        (len(rows) * (height + pad) + pad, leaves * (width + pad) + pad, channels), 255, np.uint8
    )
    for r, row in enumerate(rows):
        span = leaves * (width + pad) / len(row)
        top = pad + r * (height + pad)
        for i, image in enumerate(row):
            left = int(round(pad / 2 + (i + 0.5) * span - width / 2))
            canvas[top : top + height, left : left + width] = image.repeat(scale, 0).repeat(
                scale, 1
            )
    return canvas


def psd(path, frequencies, data_psd, curves, process, sigma, n):
    """The radial PSD of the states of processes.Process.psd_curves, one curve per level: for
    the heat process (curves with 'heat_psd') beside the diffusion at matched steps, for a
    diffusion process (curves with 'psd') alone."""
    heat = 'heat_psd' in curves[0]
    fig = Figure(figsize=(11, 4.5) if heat else (5.8, 4.5), dpi=100)
    axes = fig.subplots(1, 2, sharey=True) if heat else [fig.subplots()]
    shades = np.linspace(0.35, 1.0, len(curves))
    blues = [(0.1, 0.3 * s, s) for s in shades]
    reds = [(s, 0.25 * s, 0.1) for s in shades]
    if heat:
        panels = [
            ('heat_psd', blues, lambda c: f'k={c["k"]}, σ_B={c["blur_sigma"]:.2f}'),
            ('diffusion_psd', reds, lambda c: f'k={c["k"]}, ᾱ={c["alpha_bar"]:.4f}'),
        ]
    else:
        panels = [('psd', reds, lambda c: f'k={c["k"]}, t={c["t"]:.3g}, α={c["alpha"]:.3f}')]
    for ax, (name, colours, label) in zip(axes, panels):
        ax.loglog(frequencies, data_psd, 'k-', lw=2, label='data')
        for c, colour in zip(curves, colours):
            ax.loglog(frequencies, c[name], color=colour, label=label(c))
        ax.set_xlabel('frequency (cycles per pixel)')
        _plain_log_ticks(ax.xaxis, frequencies[0], frequencies[-1])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel('power (mean squared DCT coefficient)')
    if heat:
        axes[0].axhline(sigma**2, color='gray', ls='--', label=f'σ² = {sigma**2:g}')
        axes[0].set_ylim(bottom=sigma**2 * 1e-3)  # far below σ² a frequency is lost anyway
        axes[0].set_title('Heat: F(t_k) u0, approaches the data from below', fontsize=10)
        axes[1].set_title(
            'Diffusion at matched steps: x/√ᾱ + √((1−ᾱ)/ᾱ) ε, from above', fontsize=10
        )
        axes[0].legend(fontsize=7)
    else:
        axes[0].set_title(
            f'{process}: u_k/(2α_k), a draw of q(u_k | 2x − 1) at the data scale', fontsize=10
        )
    fig.suptitle(f'Radial power spectral density of {n} training images (Fig. 4)')
    _save(fig, path, bbox_inches='tight')


def energy_vs_blur(path, frequencies, data_psd, alpha, blur_sigmas, energy, sigma, n):
    fig = Figure(figsize=(11, 4.5), dpi=100)
    psd_ax, energy_ax = fig.subplots(1, 2)
    psd_ax.loglog(frequencies, data_psd, 'k.-', label='data')
    fit = frequencies <= 0.25
    scale = np.exp(np.mean(np.log(data_psd[fit]) + alpha * np.log(frequencies[fit])))
    psd_ax.loglog(
        frequencies[fit],
        scale * frequencies[fit] ** -alpha,
        'C1--',
        label=f'1/f^α fit (f ≤ 0.25), α={alpha:.2f}',
    )
    psd_ax.set_xlabel('frequency (cycles per pixel)')
    _plain_log_ticks(psd_ax.xaxis, frequencies[0], frequencies[-1])
    psd_ax.set_ylabel('power (mean squared DCT coefficient)')
    psd_ax.set_title('1-D PSD of the data (σ_B = 0)', fontsize=10)
    psd_ax.legend(fontsize=8)
    shown = np.unique(np.geomspace(1, len(frequencies), min(len(frequencies), 24)).astype(int)) - 1
    cmap = colors.LinearSegmentedColormap.from_list(
        'f', ['#08306b', '#6baed6', '#fd8d3c', '#7f2704']
    )
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
    bar = fig.colorbar(
        cm.ScalarMappable(norm, cmap), ax=energy_ax, label='frequency (cycles per pixel)'
    )
    _plain_log_ticks(bar.ax.yaxis, frequencies[0], frequencies[-1])
    fig.suptitle(f'DCT energy against blur, {n} training images (Fig. 9)')
    _save(fig, path, bbox_inches='tight')


def input_gradients(path, grads, inputs, levels, pixels, labels, linthresh, step, process):
    rows, columns = len(pixels) + 1, len(levels)
    fig = Figure(figsize=(1.9 * columns + 1.2, 1.9 * rows + 0.6), dpi=100, layout='constrained')
    axes = fig.subplots(rows, columns, squeeze=False)
    limit = float(np.abs(grads).max())
    norm = colors.SymLogNorm(linthresh, vmin=-limit, vmax=limit, base=10)
    shown = None
    for col, k in enumerate(levels):
        image = np.clip(inputs[col], 0, 1)
        axes[0, col].imshow(
            image[..., 0] if image.shape[-1] == 1 else image, cmap='gray', vmin=0, vmax=1
        )
        axes[0, col].set_title(labels[col], fontsize=9)
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
    fig.colorbar(
        shown,
        ax=axes[1:].ravel().tolist(),
        shrink=0.8,
        label=f'∂μ/∂u (symlog, linear below {linthresh:g})',
    )
    fig.suptitle(
        f'{process}: input gradients of the predicted mean μ(u_k, k) (checkpoint {step}, Fig. 8)'
    )
    _save(fig, path, bbox_inches='tight')


def trajectory_gradients(path, grads, states, levels, pixel, t, linthresh, step, sigma, delta):
    """Per chain a row of states u_k (level K first) and a row of ∂μ(u_k, k)[pixel]/∂u_k."""
    chains, columns = grads.shape[:2]
    fig = Figure(figsize=(1.9 * columns + 1.4, 3.8 * chains + 0.7), dpi=100, layout='constrained')
    axes = fig.subplots(2 * chains, columns, squeeze=False)
    limit = float(np.abs(grads).max())
    norm = colors.SymLogNorm(linthresh, vmin=-limit, vmax=limit, base=10)
    i, j = pixel
    shown = None
    for c in range(chains):
        for col, k in enumerate(levels):
            image = np.clip(states[c, col], 0, 1)
            top, bottom = axes[2 * c, col], axes[2 * c + 1, col]
            top.imshow(
                image[..., 0] if image.shape[-1] == 1 else image, cmap='gray', vmin=0, vmax=1
            )
            top.plot(j, i, 's', mfc='none', mec='red', ms=5)
            shown = bottom.imshow(grads[c, col], cmap='RdBu_r', norm=norm)
            bottom.plot(j, i, 's', mfc='none', mec='black', ms=5, alpha=0.6)
            if c == 0:
                top.set_title(f'k={k}, σ_B={np.sqrt(2 * t[k]):.2f}', fontsize=9)
        axes[2 * c, 0].set_ylabel(f'chain {c}: u_k', fontsize=9)
        axes[2 * c + 1, 0].set_ylabel('∂μ(u_k, k)/∂u_k', fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(
        shown,
        ax=axes[1::2].ravel().tolist(),
        shrink=min(0.8, 1.2 / chains),
        label=f'gradient of the pixel ({i}, {j}), symlog, linear below {linthresh:g}',
    )
    fig.suptitle(
        f'Input gradients along generated trajectories (checkpoint {step}, σ = '
        f'{sigma:g}, δ = {delta:g}; Fig. 8 right, 13b)'
    )
    _save(fig, path, bbox_inches='tight')


def _contour_edges(ax, rings, colour):
    """The cell edges between DCT coefficients of different contours."""
    h, w = rings.shape
    segments = [
        [(m + 0.5, n - 0.5), (m + 0.5, n + 0.5)]
        for n in range(h)
        for m in range(w - 1)
        if rings[n, m] != rings[n, m + 1]
    ]
    segments += [
        [(m - 0.5, n + 0.5), (m + 0.5, n + 0.5)]
        for n in range(h - 1)
        for m in range(w)
        if rings[n, m] != rings[n + 1, m]
    ]
    ax.add_collection(collections.LineCollection(segments, colors=colour, linewidths=0.8))


def frequency_partition(path, rings, power, frequencies, psd, image):
    """The example image, the contours of its DCT, its DCT power with the contour edges and the
    radial PSD (Fig. 10)."""
    h, w = rings.shape
    fig = Figure(figsize=(17, 4.2), dpi=100, layout='constrained')
    image_ax, ring_ax, power_ax, psd_ax = fig.subplots(1, 4, width_ratios=(0.7, 1, 1, 1))
    image_ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap='gray', vmin=0, vmax=255)
    image_ax.set_title('training image', fontsize=10)
    image_ax.set_xticks([])
    image_ax.set_yticks([])
    count = int(rings.max())
    hues = [c for i, c in enumerate(cm.tab20.colors) if i not in (14, 15)]  # no greys
    palette = colors.ListedColormap([hues[r % len(hues)] for r in range(count)]).with_extremes(
        bad='0.85'
    )
    ring_ax.imshow(
        np.ma.masked_less(rings, 1),
        cmap=palette,
        vmin=0.5,
        vmax=count + 0.5,
        interpolation='nearest',
    )
    _contour_edges(ring_ax, rings, 'k')
    n, m = np.indices(rings.shape)
    for r in range(1, count + 1, max(1, count // 12)):
        cells = np.flatnonzero(rings == r)
        best = cells[np.argmin(np.abs(n.flat[cells] - m.flat[cells]))]
        ring_ax.text(m.flat[best], n.flat[best], str(r), fontsize=7, ha='center', va='center')
    ring_ax.set_title(
        f'contour r = ⌊2·{max(h, w)}·ρ⌋ of each coefficient (grey: left out)', fontsize=10
    )
    shown = power_ax.imshow(
        np.log10(np.maximum(power, 1e-12)), cmap='viridis', interpolation='nearest'
    )
    _contour_edges(power_ax, rings, 'w')
    fig.colorbar(shown, ax=power_ax, label='log10 squared DCT coefficient')
    power_ax.set_title('DCT power of the image, with the contours', fontsize=10)
    for ax in (ring_ax, power_ax):
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_xlabel('m (horizontal frequency index)')
        ax.set_ylabel('n (vertical frequency index)')
    psd_ax.loglog(frequencies, psd, 'k.-')
    psd_ax.set_xlabel('frequency (r + 0.5) / (2 size), cycles per pixel')
    _plain_log_ticks(psd_ax.xaxis, frequencies[0], frequencies[-1])
    psd_ax.set_ylabel('mean squared coefficient on the contour')
    psd_ax.set_title('radial PSD: one point per contour', fontsize=10)
    psd_ax.grid(True, alpha=0.3)
    fig.suptitle(
        'Partition of the DCT frequencies into equal-frequency contours (App. B.6, Fig. 10)'
    )
    _save(fig, path, bbox_inches='tight')


def likelihood_levels(path, result, title):
    """Left, the terms L_1..L_{K−1} of Eq. (7) in nats per image; right, L_K (its App. A.3 bound),
    Σ L_k and L_0 in bits/dim."""
    # Level k holds L_{k−1}; a level that no Monte-Carlo draw reached is None (a gap).
    levels = np.asarray([np.nan if v is None else v for v in result.level_nats], float)
    fig = Figure(figsize=(9, 4))
    left, right = fig.subplots(1, 2, width_ratios=(3, 1))
    left.plot(np.arange(1, len(levels)), levels[1:], '.-')
    left.set_xlabel('j')
    left.set_ylabel('$L_j$ (Eq. 10), nats per image')
    left.grid(alpha=0.3)
    names = ('L_K', 'sum_L_k', 'L_0')
    values = [getattr(result, name) for name in names]
    bars = right.bar(['$L_K$', '$\\Sigma L_k$', '$L_0$'], values, color=['C2', 'C0', 'C1'])
    right.bar_label(bars, fmt='%.3f', fontsize=8)
    right.axhline(0.0, color='black', linewidth=0.8)
    right.set_ylabel(f'bits/dim (total = {result.offset:g} + sum)')
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path, dpi=120)


def sweep_delta(path, rows, title):
    """Bits/dim and FID against δ, side by side, as in the paper's Fig. 11; a line for each
    sampler steps."""
    fig = Figure(figsize=(9, 3.5))
    left, right = fig.subplots(1, 2)
    for steps in dict.fromkeys(row['steps'] for row in rows):
        mine = [row for row in rows if row['steps'] == steps]
        deltas = [row['delta'] for row in mine]
        label = f'{steps} steps'
        left.plot(deltas, [row['bits_per_dim'] for row in mine], 'o-', label=label)
        right.plot(deltas, [row['fid'] for row in mine], 'o-', label=label)
    left.set_ylabel('negative ELBO (bits/dim)')
    right.set_ylabel('FID')
    for ax in (left, right):
        ax.set_xlabel('δ')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path, dpi=120)


def prior_overlap(path, maxes, results, model_max, num_test, sigma, delta):
    """Mean L_K bound (bits/dim) against σ_B,max, log-log, the model's σ_B,max marked (Fig. 12)."""
    fig = Figure(figsize=(5.5, 4), dpi=100)
    ax = fig.subplots()
    ax.plot(maxes, [r['L_K_bits_per_dim'] for r in results], 'o-')
    ax.axvline(model_max, color='gray', ls=':', label=f'this model: σ_B,max = {model_max:g}')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xticks(maxes, [f'{s:g}' for s in maxes])
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel('σ_B,max (pixels)')
    ax.set_ylabel('mean L_K upper bound (bits/dim)')
    ax.set_title(
        f'Prior overlap: {num_test} test images vs the blurred training set\n'
        f'(σ = {sigma:g}, δ = {delta:g}; Fig. 12)',
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path, bbox_inches='tight')
