"""The benchmarks' FLOP count, peak table and a tiny run of the training and sampling benchmark;
how readme_figures reads README.md and a training run's log."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import loader
from benchmarks import measure
from benchmarks import model
from benchmarks import profile
from benchmarks import readme_figures
from benchmarks import speed
from configs import tiny
from ihdm_jax import parallel


def test_flops_of_a_matmul_is_2mkn():
    m, k, n = 24, 40, 56
    lowered = jax.jit(jnp.matmul).lower(jnp.ones((m, k)), jnp.ones((k, n)))
    assert measure.flops(lowered.compile()) == 2 * m * k * n
    assert measure.flops(lowered) == 2 * m * k * n


@pytest.mark.parametrize(
    'kind, dtype, peak',
    [
        ('NVIDIA H100 80GB HBM3', 'bfloat16', 989.4),
        ('NVIDIA H100 PCIe', 'bfloat16', 756.0),
        ('NVIDIA A100-SXM4-80GB', 'float32', 156.0),
        ('TPU v5 lite', 'bfloat16', 197.0),
        ('TPU v5', 'bfloat16', 459.0),
        ('cpu', 'float32', None),
    ],
)
def test_peak_tflops_matches_the_device_kind(kind, dtype, peak):
    assert measure.peak_tflops(types.SimpleNamespace(device_kind=kind), dtype) == peak


def test_peak_override_must_be_positive():
    cpu = jax.devices()[0]
    assert measure.peak_tflops(cpu, 'float32', 2.5) == 2.5
    with pytest.raises(ValueError, match='-1'):
        measure.peak_tflops(cpu, 'float32', -1.0)


def test_tiny_benchmark_runs_the_real_step_and_sampler():
    config = tiny.get_config()
    mesh = parallel.make_mesh(jax.devices()[:1])  # the programs test_train compiles too
    training, state = model.benchmark_training(config, mesh, steps=2, repeats=2, peak_tflops=1.0)
    assert int(state.step) == 1 + 2 * 2  # warm-up step, then two windows of two steps
    assert training['images_per_s'] == pytest.approx(
        config.training.batch_size / training['step_ms'] * 1e3
    )
    assert training['gflop_per_step_per_device'] > 0
    assert training['mfu'] == pytest.approx(training['tflops_per_s_per_device'] / 1.0)
    assert training['peak_bytes_in_use'] is None  # CPU devices do not report memory

    sampling = model.benchmark_sampling(config, mesh, state.params, repeats=1)
    assert sampling['num_samples'] == config.sampling.num_samples
    assert sampling['images_per_s'] > 0
    table = model.markdown('configs/tiny.py', measure.device_info(), training, sampling)
    assert '| 8 |' in table and 'of 1' in table


def test_profile_assigns_the_step_time_to_the_parts_of_the_model():
    config = tiny.get_config()  # dropout 0.1
    mesh = parallel.make_mesh(jax.devices()[:1])
    compiled, state, batch, key = speed.train_program(config, mesh)

    def step():
        nonlocal state
        state = jax.block_until_ready(compiled(state, batch, key)[0])

    parts = profile.breakdown(compiled, step, calls=1)
    for part in [
        ('convolutions', 'forward'),
        ('convolutions', 'backward'),
        ('GroupNorm', 'forward'),
        ('GroupNorm', 'backward'),
        ('dropout', 'forward'),
        ('attention', 'forward'),
        ('optimizer', 'forward'),
        ('EMA', 'forward'),
    ]:
        assert parts.get(part, 0) > 0, part
    total = parts.pop(('total', ''))
    assert total == pytest.approx(sum(parts.values()))
    assert parts.get(('other', ''), 0) < 0.1 * total
    table = profile.markdown({'step': {**parts, ('total', ''): total}})
    assert table.splitlines()[-1].startswith('| total |')


def test_loader_benchmark_reads_a_folder_of_jpegs_as_training_does(tmp_path):
    loader.write_jpegs(str(tmp_path), 8, 32)
    assert sorted(p.name for p in tmp_path.iterdir())[0] == '00000.jpg'
    config = tiny.get_config()
    config.data.dataset, config.data.num_channels = 'folder', 3
    config.data.data_dir = str(tmp_path)
    decoded, rows, skipped = loader.loader_images_per_s(config, str(tmp_path), 1, 1, False)
    cached, _, _ = loader.loader_images_per_s(config, str(tmp_path), 1, 1, True)
    assert (rows, skipped) == (config.training.batch_size, 0)
    assert decoded > 0 and cached > 0
    per_image = loader.step_gflop_per_image(config)
    config.training.batch_size = 16
    assert per_image > 0
    assert loader.step_gflop_per_image(config) == pytest.approx(per_image, rel=0.1)


# The lines of a --quick training run of configs/digits.py that readme_figures reads, as absl logs
# them (ihdm_jax/jobs/train.py), among others that it must pass over.
TRAIN_LOG = """\
I1201 14:50:31.201337 1393 train.py:296] Compiled the training step in 5.5 s.
I1201 14:50:32.004211 1393 train.py:132] step 10: loss 0.042540  grad_norm 0.5123  lr 5e-05  \
steps/s 13.59  ETA 0m01s
I1201 14:50:32.745102 1393 train.py:132] step 20: loss 0.038931  grad_norm 0.4410  lr 0.0001  \
steps/s 13.61  ETA 0m00s
I1201 14:50:36.750021 1393 train.py:150] step 20: EMA samples written to /tmp/d/samples/\
step_00000020.png (sampling: 4.0 s)
I1201 14:50:37.100000 1393 train.py:171] Steps 0 to 20 in 0m12s: training steps 1.5 s (13.59 \
steps/s), compilation 5.5 s, sampling 4.0 s, checkpoints 0.4 s.
"""


def test_readme_figures_reads_a_training_log():
    assert readme_figures.parse_train_log(TRAIN_LOG) == dict(
        loss_10=0.04254,
        loss_20=0.038931,
        train_s=1.5,
        steps_per_s=13.59,
        compile_s=5.5,
        sampling_s=4.0,
        grid_s=4.0,
    )
    with pytest.raises(ValueError, match='did the run finish'):
        readme_figures.parse_train_log(TRAIN_LOG.rsplit('I1201', 1)[0])


def test_readme_figures_finds_every_figure_that_readme_quotes():
    with open(os.path.join(measure.ROOT, 'README.md')) as fp:
        readme = readme_figures.readme_values(fp.read())
    keys = {key for figures in readme_figures.FIGURES.values() for key in figures}
    assert keys <= set(readme), f'README.md no longer matches: {sorted(keys - set(readme))}'
    assert sum(key.startswith('loss_') for key in readme) >= 2

    got = dict(readme_figures.parse_train_log(TRAIN_LOG), wall_s=130.4)
    table = readme_figures.rows({'loss_100': '0.0256'}, got, {'train': 'python -m ...'})
    assert ('training run, wall time', 'not found', '2 min 10 s', 'train') in table
    assert ('training steps/s', 'not found', '13.6', 'train') in table
    losses = [row for row in table if row[0].startswith('loss')]
    assert losses == [
        ('loss at step 10', '–', '0.0425', 'train'),
        ('loss at step 20', '–', '0.0389', 'train'),
        ('loss at step 100', '0.0256', '–', 'train'),
    ]
    assert {row[3] for row in table} == {'train'}  # only the parts that ran


def test_samplers_benchmark_reads_its_entries(config):
    from absl import app

    from benchmarks import samplers as samplers_benchmark
    from ihdm_jax import errors

    continuous = config.copy_and_resolve_references()
    continuous.model.process = 'heat_continuous'
    parsed = samplers_benchmark.parse_run('ddim:10:0.5', continuous)
    assert (parsed.sampling.sampler, parsed.sampling.steps, parsed.sampling.eta) == (
        'ddim',
        10,
        0.5,
    )
    assert samplers_benchmark.label(parsed) == 'ddim η=0.5'
    assert continuous.sampling.sampler == 'ancestral'  # the workdir's config is not changed
    assert samplers_benchmark.label(samplers_benchmark.parse_run('ancestral:0', config)) == (
        'ancestral'
    )
    with pytest.raises(app.UsageError, match="'ddim' is not SAMPLER:STEPS"):
        samplers_benchmark.parse_run('ddim', config)
    with pytest.raises(errors.UserError, match='a divisor of K = 10'):
        samplers_benchmark.parse_run('ancestral:3', config)  # the paper's model: divisors only


def test_restoration_benchmark_scores_its_rows_on_a_model(trained, tmp_path):
    """The rows of one degradation on four test digits of the tiny model: the input's scores
    are those of the rounded blur, Tikhonov's α is one of the grid's, and the model's rows have
    times and a spread."""
    import numpy as np

    from benchmarks import restoration as restoration_benchmark
    from ihdm_jax import data
    from ihdm_jax import loading
    from ihdm_jax import restoration
    from ihdm_jax.evaluation import quality

    model = loading.load(str(trained))
    x = data.make_source(model.config, 'test').load(np.arange(4)) / np.float32(255)
    x_train = data.make_source(model.config).load(np.arange(16)) / np.float32(255)
    rows, columns = restoration_benchmark.run(model, x, x_train, 'blur_1', {'blur_sigma': 1.0}, 2)
    y = restoration_benchmark.degraded(restoration.Degradation((8, 8), blur_sigma=1.0), x)
    assert rows['input']['psnr'] == pytest.approx(quality.psnr(y, x).mean(), rel=1e-12)
    (tikhonov,) = [name for name in rows if name.startswith('tikhonov')]
    assert float(tikhonov.split('= ')[1].rstrip(')')) in {
        float(f'{a:.1e}') for a in restoration_benchmark.ALPHAS
    }
    for name in ('model, one', 'model, one, no consistency'):
        assert rows[name]['seconds'] > 0
    assert rows['model, mean of 2']['spread'] > 0
    assert columns['restorations'].shape == (4, 2, 8, 8, 1)
    restoration_benchmark.picture(columns, str(tmp_path / 'blur_1.png'), 'blur_1', 2)
    assert (tmp_path / 'blur_1.png').stat().st_size > 0
    flat = np.full((1, 4, 4, 1), 0.25, np.float32)
    np.testing.assert_allclose(restoration_benchmark.bicubic(flat, 2), 0.25, atol=1e-6)


def test_processes_benchmark_counts_checkerboards_and_reads_its_entries():
    """A 0/255 checkerboard scores 255, a flat image 0 and a horizontal ramp of step 17 exactly
    (17 · 3 · 4 horizontal pairs + 0 vertical) / 24 = 8.5; no real 16x16 digit reaches the
    checkerboard threshold (measured maximum over the 1500 training digits: 34.94)."""
    from absl import app

    from benchmarks import processes
    from configs import digits
    from ihdm_jax import data

    checkerboard = (np.indices((6, 6)).sum(0) % 2 * 255).astype(np.uint8)
    flat = np.full((6, 6), 90, np.uint8)
    ramp = np.tile(np.arange(4, dtype=np.uint8) * 17, (4, 1))
    assert processes.neighbour_difference(np.stack([checkerboard, flat])[..., None]).tolist() == [
        255.0,
        0.0,
    ]
    assert processes.neighbour_difference(ramp[None, ..., None]).tolist() == [8.5]
    config = digits.get_config()
    source = data.make_source(config)
    real = processes.neighbour_difference(source.load(np.arange(len(source))))
    assert real.max() == pytest.approx(34.94, abs=0.005)
    assert processes.parse_run('blurring:16') == ('blurring', 16)
    for entry in ('blurring', 'vp:16', 'heat:0', 'heat:x'):
        with pytest.raises(app.UsageError, match=repr(entry)):
            processes.parse_run(entry)


def test_processes_benchmark_reads_a_finished_workdir_without_running_it(tmp_path, monkeypatch):
    """A workdir with processes_runs.json is scored from its outputs (no subprocess), and the
    table and picture are written from the rows."""
    import json

    from benchmarks import processes

    monkeypatch.setattr(measure, 'run_main', lambda args: pytest.fail(f'ran {args}'))
    workdir = tmp_path / 'blurring_32groups'
    (workdir / 'eval').mkdir(parents=True)
    runs = {'process': 'blurring', 'config': 'configs/digits_blurring.py', 'groups': 32}
    runs.update(commands=['python -m ihdm_jax.main ...'], train_wall_s=99.0)
    (workdir / processes.RUNS_FILE).write_text(json.dumps(runs))
    terms = dict(bits_per_dim=2.841, offset=0.0, L_K=0.0, sum_L_k=1.456, L_0=1.385)
    (workdir / 'eval' / 'likelihood.json').write_text(json.dumps(terms))
    (workdir / 'eval' / 'fid.json').write_text(
        json.dumps(dict(step=2000, fid=194.8, num_samples=4))
    )
    checkerboard = (np.indices((8, 8)).sum(0) % 2 * 255).astype(np.uint8)
    samples = np.stack([checkerboard, checkerboard, np.zeros((8, 8), np.uint8), checkerboard.T])
    np.savez(workdir / 'eval' / 'fid_samples.npz', images=samples[..., None])
    row, drawn = processes.measure_run('blurring', 32, str(tmp_path), 'stats.npz', quick=False)
    assert row['checkerboards'] == 0.75 and row['fid'] == 194.8 and row['step'] == 2000
    np.testing.assert_array_equal(drawn[..., 0], samples)
    assert '| blurring | configs/digits_blurring.py | 32 | 2000 | 99 s |' in processes.markdown(
        [row]
    )
    assert '| 194.80 | 75% |' in processes.markdown([row])
    processes.save_figure(str(tmp_path / 'processes.png'), [row], [drawn], 'title')
    assert (tmp_path / 'processes.png').stat().st_size > 0


def test_speed_rows_are_measured_by_the_given_code():
    """benchmarks.speed and benchmarks.original_speed share the rows: each row's config reaches
    the given measurement, and the chain gets half the windows."""
    seen = []

    def training(config, repeats):
        seen.append((config.model.dropout, config.data.image_size, repeats))
        return 12.5, 1000

    rows, lines = speed.measure_rows(
        ['small_nodropout', 'cifar10', 'chain', 'heat'],
        4,
        training=training,
        chain=lambda config, repeats: float(config.model.K * repeats),
        heat=lambda repeats: {32: 0.5, 64: 1.0, 128: 2.0},
    )
    assert seen == [(0.0, 28, 4), (0.1, 32, 4)]
    assert rows['chain'] == {'seconds': 200.0}
    assert rows['cifar10'] == {'step_ms': 12.5, 'parameters': 1000, 'batch': 8}
    assert (
        lines[-1]
        == '| heat operator F(t)u, batch 64 RGB, 32 / 64 / 128 px | 0.50 / 1.00 / 2.00 ms |'
    )
