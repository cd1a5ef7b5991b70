"""The benchmarks' FLOP count, peak table and a tiny run of the training and sampling benchmark."""

import types

import jax
import jax.numpy as jnp
import pytest

from benchmarks import loader
from benchmarks import measure
from benchmarks import model
from benchmarks import profile
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
