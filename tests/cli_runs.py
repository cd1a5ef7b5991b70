"""The runs of every --mode of `python -m ihdm_jax.main` that test_cli.py checks, started in
the background when the session starts (conftest's command_line_runs).

Each mode runs on its own copy of conftest's trained workdir, with analysis and evaluation
settings made tiny; what the modes compute is tested in test_analysis_jobs.py and
test_evaluate.py.
"""

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np

from conftest import ROOT

# mode -> the files it writes, relative to the workdir (summary writes none: it prints).
MODES = {
    'sample': ['samples/samples.npz', 'samples/samples.png', 'samples/trajectory.gif'],
    'eval': ['eval/likelihood.json', 'eval/likelihood_levels.png'],
    'fid': ['eval/fid.json', 'eval/fid_samples.png'],
    'sweep_delta': ['eval/sweep_delta.json', 'eval/sweep_delta.md', 'eval/sweep_delta.png'],
    'same_init': ['analysis/same_init/same_init.npz', 'analysis/same_init/same_init.png',
                  'analysis/same_init/trajectory.gif'],
    'share_noise': ['analysis/share_noise/share_noise.npz', 'analysis/share_noise/share_noise.png',
                    'analysis/share_noise/trajectory.gif'],
    'interpolate': ['analysis/interpolate/interpolate.npz', 'analysis/interpolate/interpolate.png',
                    'analysis/interpolate/interpolate.gif'],
    'hierarchical': ['analysis/hierarchical/hierarchical.npz',
                     'analysis/hierarchical/hierarchical.png'],
    'delta_grid': ['analysis/delta_grid/delta_grid.npz', 'analysis/delta_grid/delta_grid.png'],
    'input_gradients': ['analysis/input_gradients/input_gradients.npz',
                        'analysis/input_gradients/input_gradients.png'],
    'trajectory_gradients': ['analysis/trajectory_gradients/trajectory_gradients.npz',
                             'analysis/trajectory_gradients/trajectory_gradients.png'],
    'nearest_neighbours': ['analysis/nearest_neighbours/nearest_neighbours.npz',
                           'analysis/nearest_neighbours/nearest_neighbours.png'],
    'psd': ['analysis/psd/psd.json', 'analysis/psd/psd.png', 'analysis/psd/energy_vs_blur.png'],
    'prior_overlap': ['analysis/prior_overlap/prior_overlap.json',
                      'analysis/prior_overlap/prior_overlap.png'],
    'frequency_partition': ['analysis/frequency_partition/frequency_partition.npz',
                            'analysis/frequency_partition/frequency_partition.png'],
    'summary': [],
}
FID_MODES = ('fid', 'sweep_delta')
TINY = {
    'sampling.num_samples': 8,
    'evaluation.num_examples': 16, 'evaluation.num_passes': 5,
    'evaluation.fid_num_samples': 8, 'evaluation.deltas': (0.0125, 0.015),
    'analysis.num_rows': 2, 'analysis.num_columns': 2, 'analysis.num_points': 3,
    'analysis.num_trees': 1, 'analysis.split_fractions': (0.5,), 'analysis.branches': 2,
    'analysis.level_fractions': (0.5, 1.0), 'analysis.num_images': 16,
    'analysis.gradient_pixels': ((0.5, 0.5),), 'analysis.blur_sigma_maxes': (1.0, 4.0),
    'analysis.num_neighbours': 2, 'analysis.deltas': (0.0, 0.0125),
}
# One device: these runs test the command line, not sharding.
ENV = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}


def files(folder):
    """{relative path: sha256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in pathlib.Path(folder).rglob('*') if p.is_file()}


def _run_mode(base, trained, mode, settings):
    """Runs `mode` on a copy of the trained workdir: (result, workdir, its files before)."""
    workdir = base / mode
    shutil.copytree(trained, workdir)
    before = files(workdir)
    command = [sys.executable, '-m', 'ihdm_jax.main', '--config=configs/tiny.py',
               f'--workdir={workdir}', f'--mode={mode}']
    command += [f'--config.{key}={value}' for key, value in {**TINY, **settings}.items()]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=600)
    return result, workdir, before


def start(pool, base, trained, weights):
    """Starts every mode in MODES in `pool`; returns a function that waits for them and returns
    mode -> (result, workdir, files before).

    The FID modes run last, one after the other (the second loads the Inception network the
    first compiled), with `weights` (a future of the converted Inception weights); they read
    the training set's FID statistics from a file (the identity covariance) instead of
    computing them."""
    stats = base / 'train_stats.npz'
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))

    def fid_runs():
        settings = {'evaluation.inception_weights': weights.result(),
                    'evaluation.fid_train_stats': stats}
        return [_run_mode(base, trained, mode, settings) for mode in FID_MODES]

    others = {mode: pool.submit(_run_mode, base, trained, mode, {})
              for mode in MODES if mode not in FID_MODES}
    fid = pool.submit(fid_runs)
    return lambda: {**{mode: future.result() for mode, future in others.items()},
                    **dict(zip(FID_MODES, fid.result()))}
