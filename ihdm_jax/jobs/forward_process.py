"""Analyses of the forward process on the data, one job (config, workdir) per --mode: psd
(Fig. 4, 9), frequency_partition (App. B.6, Fig. 10) and prior_overlap (App. C.2, Fig. 12),
written into <workdir>/analysis/<mode>/. They read no checkpoint."""

import os

import jax
import numpy as np
from absl import logging

from ihdm_jax import data
from ihdm_jax import elbo
from ihdm_jax import heat
from ihdm_jax import outputs
from ihdm_jax import parallel
from ihdm_jax import plots
from ihdm_jax import processes
from ihdm_jax import rng
from ihdm_jax import schedule as schedule_lib
from ihdm_jax import storage
from ihdm_jax import validation
from ihdm_jax.analysis import spectra


def check_psd(config):
    validation.require(
        config.analysis.num_images >= 1,
        f'config.analysis.num_images={config.analysis.num_images} must be at least 1.',
    )
    schedule_lib.analysis_levels(config)


def check_frequency_partition(config):
    validation.require(
        config.data.image_size >= 2,
        f'config.data.image_size={config.data.image_size}: the partition needs at least 2 px.',
    )


def check_prior_overlap(config):
    maxes = tuple(config.analysis.blur_sigma_maxes)
    validation.require(
        maxes and all(s > 0 for s in maxes),
        f'config.analysis.blur_sigma_maxes={maxes} must be positive blur widths in pixels.',
    )
    validation.require(
        config.evaluation.train_chunk >= 1,
        f'config.evaluation.train_chunk={config.evaluation.train_chunk} must be at least 1.',
    )
    data.check(config, 'test')


def psd(config, workdir):
    """Power spectra of training images under the forward process (Sec. 3.3, Fig. 4), and
    for a process that blurs by the heat equation the DCT energy of each frequency against σ_B
    (App. B.5, Fig. 9).

    Fig. 4: the radial PSD (App. B.6) of the process's states at the levels of
    config.analysis.level_fractions (processes.Process.psd_curves; for the heat process
    F(t_k) u0 beside the variance-preserving diffusion at matched steps, whose noise floor
    equals the data power at the lowest frequency the heat level has pushed below σ²). Fig. 9:
    the mean squared DCT coefficient of each frequency contour of F(t) u0 against σ_B = √(2t)
    over the schedule σ_B,1..σ_B,K, with the σ² line below which a frequency is lost in
    q(u_k | u0). Writes psd.png, psd.json (the spectra and the fitted power-law exponent α of
    the data, psd ∝ 1/f^α) and, for Fig. 9, energy_vs_blur.png.
    """
    levels = schedule_lib.analysis_levels(config)
    source = data.make_source(config)
    x = source.load(rng.subset(config.seed, config.analysis.num_images, len(source)))
    x = x.astype(np.float32) / 255.0
    n, sigma = len(x), config.model.sigma
    process = processes.from_config(config)
    frequencies, data_psd = spectra.radial_psd(x)
    alpha = float(spectra.power_law_exponent(frequencies, data_psd))
    eps = jax.random.normal(rng.analysis_key(config.seed, rng.ANALYSIS_NOISE), x.shape)
    curves = process.psd_curves(x, eps, levels)
    blur_sigmas = process.blur_sigmas()
    if blur_sigmas is not None:
        _, energy = spectra.dct_energy_by_blur(x, blur_sigmas)
    data.report_skipped(source)
    if not parallel.is_main_process():
        return
    out = outputs.folder(workdir, 'analysis', 'psd')
    listed = lambda a: [float(v) for v in a]  # noqa: E731
    outputs.write_json(
        os.path.join(out, 'psd.json'),
        {
            'process': config.model.process,
            'num_images': n,
            'sigma': sigma,
            'power_law_exponent': alpha,
            'frequencies': listed(frequencies),
            'data_psd': listed(data_psd),
            'levels': [
                {key: listed(v) if isinstance(v, np.ndarray) else v for key, v in c.items()}
                for c in curves
            ],
            **(
                {}
                if blur_sigmas is None
                else {
                    'blur_sigmas': listed(blur_sigmas),
                    'energy_by_blur': [listed(e) for e in energy],
                }
            ),
        },
    )
    plots.psd(
        os.path.join(out, 'psd.png'), frequencies, data_psd, curves, config.model.process, sigma, n
    )
    written = 'psd.png, psd.json'
    if blur_sigmas is not None:
        plots.energy_vs_blur(
            os.path.join(out, 'energy_vs_blur.png'),
            frequencies,
            data_psd,
            alpha,
            blur_sigmas,
            energy,
            sigma,
            n,
        )
        written += ', energy_vs_blur.png'
    logging.info(
        'psd: power-law exponent of the data PSD (psd ∝ 1/f^α, f ≤ 0.25 cycles/px) '
        'α = %.3f; %s written to %s.',
        alpha,
        written,
        out,
    )


def frequency_partition(config, workdir):
    """The equal-frequency contours over which the spectra are averaged (App. B.6, Fig. 10).

    Coefficient (n, m) of the 2-D DCT of an image_size² image belongs to contour ⌊2 size ρ⌋
    (spectra.frequency_rings, as radial_psd bins); radial_psd averages contours 1..size − 1 and
    leaves out the DC term and the corner beyond the last full ring. Writes
    frequency_partition.png (left, the contours; middle, the DCT power of one training image,
    the first prior draw's as in input_gradients, with the contour edges; right, its radial PSD)
    and frequency_partition.npz: rings (H, W) int, −1 where left out; frequencies (contour
    centres, cycles per pixel); image (H, W, C) uint8; power (H, W), the squared DCT
    coefficients of the image scaled to [0, 1], mean over channels; psd, its radial PSD.
    """
    size = config.data.image_size
    source = data.make_source(config)
    image = source.load(rng.prior_picks(config.seed, rng.ANALYSIS_DRAW, 1, len(source)))
    x = image.astype(np.float32) / 255.0
    power = np.mean(np.square(np.asarray(heat.dct_2d(x), np.float64)), axis=(0, 3))
    frequencies, psd = spectra.radial_psd(x)
    rings = spectra.frequency_rings(size, size)
    rings = np.where((rings >= 1) & (rings < size), rings, -1)
    data.report_skipped(source)
    if not parallel.is_main_process():
        return
    out = outputs.folder(workdir, 'analysis', 'frequency_partition')
    storage.save_npz(
        os.path.join(out, 'frequency_partition.npz'),
        rings=rings,
        frequencies=frequencies,
        image=image[0],
        power=power,
        psd=psd,
    )
    plots.frequency_partition(
        os.path.join(out, 'frequency_partition.png'), rings, power, frequencies, psd, image[0]
    )
    logging.info(
        'frequency_partition: %d contours of the %dx%d DCT written to %s.',
        size - 1,
        size,
        size,
        out,
    )


def prior_overlap(config, workdir):
    """Mean App. A.3 upper bound on L_K = D_KL[q(u_K | u0) ‖ p(u_K)] over the test set against
    σ_B,max (App. C.2, Fig. 12).

    For each σ_B,max of config.analysis.blur_sigma_maxes (t_K = σ_B,max²/2): the KDE prior of the
    blurred training set (bandwidth δ = config.sampling.delta) against q(u_K | u0) of every test
    image (std σ = config.model.sigma), images scaled to [0, 1]; the training set is taken
    config.evaluation.train_chunk images at a time (elbo.prior_bounds, as --mode=eval bounds
    L_K for dequantised test images at the model's own σ_B,max). Writes prior_overlap.png
    (bits/dim against σ_B,max, the model's σ_B,max marked) and prior_overlap.json (nats per
    image and bits/dim).
    """
    maxes = [float(s) for s in config.analysis.blur_sigma_maxes]
    mesh = parallel.make_mesh()
    source = data.make_source(config)
    test_source = data.make_source(config, split='test')
    test_x = test_source.load(np.arange(len(test_source))).astype(np.float32) / 255.0
    sigma, delta = config.model.sigma, config.sampling.delta
    blur = jax.jit(heat.heat_forward)
    dims = int(np.prod(test_x.shape[1:]))
    results = []
    for s in maxes:
        t_K = s**2 / 2
        bounds = elbo.prior_bounds(
            mesh,
            np.asarray(blur(test_x, t_K)),
            source,
            t_K,
            sigma,
            delta,
            config.evaluation.train_chunk,
            f'prior overlap σ_B,max={s:g}',
        )
        nats = float(np.mean(bounds))
        results.append(
            {'blur_sigma_max': s, 'L_K_nats': nats, 'L_K_bits_per_dim': nats / (dims * np.log(2.0))}
        )
    data.report_skipped(source, test_source)
    if not parallel.is_main_process():
        return
    out = outputs.folder(workdir, 'analysis', 'prior_overlap')
    outputs.write_json(
        os.path.join(out, 'prior_overlap.json'),
        {
            'num_train': len(source),
            'num_test': len(test_source),
            'sigma': sigma,
            'delta': delta,
            'results': results,
        },
    )
    plots.prior_overlap(
        os.path.join(out, 'prior_overlap.png'),
        maxes,
        results,
        config.model.blur_sigma_max,
        len(test_source),
        sigma,
        delta,
    )
    logging.info(
        'prior_overlap: %s written to %s.',
        ', '.join(
            f'σ_B,max={r["blur_sigma_max"]:g}: {r["L_K_bits_per_dim"]:.4f} bits/dim'
            for r in results
        ),
        out,
    )
