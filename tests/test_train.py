"""The training step, sampling over a mesh, checkpoints, resumption and the sample job."""

import glob
import os
import struct

import jax
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from configs import tiny
from ihdm_jax import checkpoint
from ihdm_jax import data
from ihdm_jax import parallel
from ihdm_jax import train
from ihdm_jax import validation


@pytest.fixture(scope='session')
def config():
    return tiny.get_config()


@pytest.fixture(scope='session')
def parts(config):
    """Optimizer, model structure and, per mesh (1 device, 8 devices), the step and sampler."""
    tx = train.make_optimizer(config)
    graphdef = train.model_graphdef(config)
    meshes = {n: parallel.make_mesh(jax.devices()[:n]) for n in (1, 8)}
    return {
        'tx': tx,
        'meshes': meshes,
        'steps': {n: train.make_train_step(config, graphdef, tx, m) for n, m in meshes.items()},
        'samplers': {n: train.make_sampler(config, graphdef, m) for n, m in meshes.items()},
        'loaders': {n: data.make_loader(config, parallel.batch_sharding(m))
                    for n, m in meshes.items()},
    }


def _host_copy(tree):
    """A numpy copy (on CPU, jax.device_get may alias device buffers and so block donation)."""
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _assert_trees_close(a, b, tol=1e-5):
    a, b = jax.device_get(a), jax.device_get(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


def test_learning_rate_warms_up_linearly_then_stays(config):
    schedule = train.learning_rate(config)
    lr, warmup = config.optim.lr, config.optim.warmup
    np.testing.assert_allclose([schedule(0), schedule(warmup // 2), schedule(warmup),
                                schedule(100 * warmup)],
                               [0.0, lr * (warmup // 2) / warmup, lr, lr], rtol=1e-6)
    no_warmup = tiny.get_config()
    no_warmup.optim.warmup = 0
    assert float(train.learning_rate(no_warmup)(0)) == pytest.approx(no_warmup.optim.lr)


def test_ema_decay_is_short_early():
    np.testing.assert_allclose([train.ema_decay(0.999, n) for n in (0, 10, 10_000)],
                               [0.1, 11 / 20, 0.999], rtol=1e-6)


def test_init_state_is_replicated_with_a_separate_ema_copy(config, parts):
    state = train.init_state(config, parts['tx'], parts['meshes'][8], jax.random.key(0))
    assert int(state.step) == 0
    for p, e in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)):
        assert p.sharding.is_fully_replicated and len(p.sharding.device_set) == 8
        for ps, es in zip(p.addressable_shards, e.addressable_shards):
            assert ps.data.unsafe_buffer_pointer() != es.data.unsafe_buffer_pointer()
        np.testing.assert_array_equal(p, e)


def test_sharded_step_matches_single_device(config, parts):
    key = jax.random.key(3)
    initial = _host_copy(train.init_state(config, parts['tx'], parts['meshes'][8],
                                          jax.random.key(0)))
    states, metrics = {}, {}
    for n in (1, 8):
        state = jax.device_put(initial, parallel.replicated(parts['meshes'][n]))
        first_param = jax.tree.leaves(state.params)[0]
        for step in range(2):
            state, metrics[n] = parts['steps'][n](state, parts['loaders'][n].batch(step), key)
        assert first_param.is_deleted()  # the old state was donated
        states[n] = state
    _assert_trees_close(states[1], states[8])
    _assert_trees_close(metrics[1], metrics[8])
    assert int(states[8].step) == 2
    assert float(metrics[8]['lr']) == pytest.approx(config.optim.lr / config.optim.warmup)
    assert float(metrics[8]['grad_norm']) > 0
    changed = [not np.allclose(b, a) for b, a in zip(jax.tree.leaves(initial.params),
                                                     jax.tree.leaves(states[1].params))]
    assert any(changed)


def test_ema_follows_the_parameters(config, parts):
    state = train.init_state(config, parts['tx'], parts['meshes'][8], jax.random.key(0))
    params0 = _host_copy(state.params)
    state, _ = parts['steps'][8](state, parts['loaders'][8].batch(0), jax.random.key(3))
    decay = 0.1  # min(ema_rate, (1 + 0) / (10 + 0))
    expected = jax.tree.map(lambda p0, p1: decay * p0 + (1 - decay) * p1, params0,
                            jax.device_get(state.params))
    _assert_trees_close(state.ema_params, expected, tol=1e-6)


def test_sharded_sampling_matches_single_device(config, parts):
    state = train.init_state(config, parts['tx'], parts['meshes'][8], jax.random.key(0))
    params = _host_copy(state.params)
    # A random (not zero-initialised) residual so that the network shapes the samples.
    params = jax.tree.map(lambda p: p + 0.01 * np.random.default_rng(0).standard_normal(p.shape)
                          .astype(p.dtype), params)
    key = jax.random.key(7)
    out = {}
    for n in (1, 8):
        x = parts['loaders'][n].prior_images(config.sampling.batch_size, 0)
        on_mesh = jax.device_put(params, parallel.replicated(parts['meshes'][n]))
        out[n] = np.asarray(parts['samplers'][n](on_mesh, x, key))
    assert out[8].shape == (8, 8, 8, 1)
    np.testing.assert_allclose(out[1], out[8], rtol=1e-5, atol=1e-5)
    assert np.std(out[8]) > 0.01


def _read_scalars(directory):
    """{tag: [(step, value)]} from TensorBoard event files, read as TFRecords by hand."""
    scalars = {}
    for path in glob.glob(os.path.join(directory, 'events.out.tfevents.*')):
        with open(path, 'rb') as f:
            while header := f.read(12):
                (length,) = struct.unpack('<Q', header[:8])
                event = event_pb2.Event.FromString(f.read(length))
                f.read(4)
                for value in event.summary.value:
                    if value.HasField('simple_value'):
                        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.fixture(scope='session')
def trained(config, tmp_path_factory):
    """A 4-step run in one go, and the same run as 2 steps and a resumed 2 more."""
    def run(workdir, n_iters):
        run_config = config.copy_and_resolve_references()
        run_config.training.n_iters = n_iters
        run_config.training.log_freq = 2
        run_config.training.sampling_freq = 4
        train.train_and_evaluate(run_config, str(workdir))

    straight = tmp_path_factory.mktemp('straight')
    run(straight, 4)
    resumed = tmp_path_factory.mktemp('resumed')
    run(resumed, 2)
    run(resumed, 4)
    return straight, resumed


def _restore(config, workdir):
    mesh = parallel.make_mesh()
    manager = checkpoint.make_manager(str(workdir))
    steps = manager.all_steps()
    state = checkpoint.restore_latest(
        manager, train.abstract_state(config, train.make_optimizer(config), mesh))
    manager.close()
    return steps, state


def test_resumed_run_repeats_the_uninterrupted_run(config, trained):
    straight, resumed = trained
    steps_straight, state_straight = _restore(config, straight)
    steps_resumed, state_resumed = _restore(config, resumed)
    assert list(steps_straight) == [4] and list(steps_resumed) == [2, 4]
    assert int(state_resumed.step) == 4
    _assert_trees_close(state_straight, state_resumed, tol=1e-6)


def test_training_writes_config_logs_and_samples(config, trained):
    straight, _ = trained
    assert os.path.exists(straight / 'config.json')
    scalars = _read_scalars(straight / 'tensorboard')
    assert {'train/loss', 'train/lr', 'train/grad_norm', 'train/steps_per_s'} <= set(scalars)
    assert [step for step, _ in scalars['train/loss']] == [2, 4]
    grid = Image.open(straight / 'samples' / 'step_00000004.png')
    assert grid.size[0] > 8 * 8


def test_sample_mode_is_reproducible(config, trained):
    straight, _ = trained
    train.sample_and_save(config, str(straight))
    out = straight / 'samples'
    first = np.load(out / 'samples.npz')['images']
    assert first.shape == (config.sampling.num_samples, 8, 8, 1) and first.dtype == np.uint8
    gif = Image.open(out / 'trajectory.gif')
    assert gif.n_frames == config.model.K + 1
    assert Image.open(out / 'samples.png').size[0] > 8 * 8
    train.sample_and_save(config, str(straight))
    np.testing.assert_array_equal(np.load(out / 'samples.npz')['images'], first)


def test_sample_mode_needs_a_checkpoint(config, tmp_path):
    with pytest.raises(validation.UserError, match='train first'):
        train.sample_and_save(config, str(tmp_path))
