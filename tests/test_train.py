"""The training state and step, sampling over a mesh, checkpoints, the train and sample jobs."""

import glob
import logging
import os
import re
import shutil
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import orbax.checkpoint as ocp
import pytest
from conftest import TRAINED_STEP
from PIL import Image
from tensorboardX.proto import event_pb2

from configs import tiny
from ihdm_jax import checkpoint
from ihdm_jax import data
from ihdm_jax import errors
from ihdm_jax import images
from ihdm_jax import parallel
from ihdm_jax import programs
from ihdm_jax import rng
from ihdm_jax import state as state_lib
from ihdm_jax import workdir as workdir_lib
from ihdm_jax.jobs import sample as sample_job
from ihdm_jax.jobs import train as train_job
from ihdm_jax.models import unet


@pytest.fixture(scope='module')
def meshes():
    return {n: parallel.make_mesh(jax.devices()[:n]) for n in (1, 8)}


@pytest.fixture(scope='module')
def source(config):
    return data.make_source(config)


@pytest.fixture(scope='module')
def steps(config, meshes):
    graphdef = state_lib.model_graphdef(config)
    return {n: programs.make_train_step(config, graphdef, m) for n, m in meshes.items()}


@pytest.fixture(scope='module')
def loaders(config, meshes, source):
    return {
        n: data.make_loader(config, source, parallel.batch_sharding(m)) for n, m in meshes.items()
    }


@pytest.fixture(scope='module')
def samplers(config, meshes):
    return {n: programs.Sampler(config, m) for n, m in meshes.items()}


def _host_copy(tree):
    """A numpy copy (on CPU, jax.device_get may alias device buffers and so block donation)."""
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _assert_trees_close(a, b, tol):
    a, b = jax.device_get(a), jax.device_get(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


def _assert_trees_equal(a, b):
    a, b = jax.device_get(a), jax.device_get(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def _trees_differ(a, b):
    return any(
        not np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)))
    )


def _restore(config, workdir, mesh):
    """(steps on disk, newest full TrainState) of a workdir."""
    manager = checkpoint.make_manager(str(workdir))
    try:
        state = checkpoint.restore_latest(manager, state_lib.abstract_state(config, mesh))
        return list(manager.all_steps()), state
    finally:
        manager.close()


@pytest.fixture(scope='module')
def trained_state(config, trained, meshes):
    """The full state of the conftest checkpoint (raw and EMA parameters differ), on 8 devices."""
    _, state = _restore(config, trained, meshes[8])
    return _host_copy(state)


def test_learning_rate_warms_up_linearly_then_stays(config):
    schedule = state_lib.learning_rate(config)
    lr, warmup = config.optim.lr, config.optim.warmup
    np.testing.assert_allclose(
        [schedule(0), schedule(warmup // 2), schedule(warmup), schedule(100 * warmup)],
        [0.0, lr * (warmup // 2) / warmup, lr, lr],
        rtol=1e-6,
    )
    no_warmup = tiny.get_config()
    no_warmup.optim.warmup = 0
    assert float(state_lib.learning_rate(no_warmup)(0)) == pytest.approx(no_warmup.optim.lr)


def test_ema_decay_is_short_early():
    np.testing.assert_allclose(
        [state_lib.ema_decay(0.999, n) for n in (0, 10, 10_000)], [0.1, 11 / 20, 0.999], rtol=1e-6
    )


def test_init_state_is_replicated_with_a_separate_ema_copy(config, meshes):
    state = state_lib.init_state(config, meshes[8], rng.init_key(config.seed))
    assert int(state.step) == 0
    for p, e in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)):
        assert p.sharding.is_fully_replicated and len(p.sharding.device_set) == 8
        for ps, es in zip(p.addressable_shards, e.addressable_shards):
            assert ps.data.unsafe_buffer_pointer() != es.data.unsafe_buffer_pointer()
        np.testing.assert_array_equal(p, e)
    assert jax.tree.structure(state) == jax.tree.structure(
        state_lib.abstract_state(config, meshes[8])
    )


def test_sharded_step_matches_single_device(config, meshes, steps, loaders):
    key = rng.train_key(config.seed)
    initial = _host_copy(state_lib.init_state(config, meshes[8], rng.init_key(config.seed)))
    states, metrics = {}, {}
    for n in (1, 8):
        state = jax.device_put(initial, parallel.replicated(meshes[n]))
        first_param = jax.tree.leaves(state.params)[0]
        for step in range(2):
            state, metrics[n] = steps[n](state, loaders[n].batch(step), key)
        assert first_param.is_deleted()  # the old state was donated
        states[n] = state
    # The batch is reduced in another order over 8 devices. Measured: the states 7.3e-9 and
    # the metrics 1.3e-8 apart, relative to 1 + |value|.
    _assert_trees_close(states[1], states[8], tol=1e-6)
    _assert_trees_close(metrics[1], metrics[8], tol=1e-6)
    assert int(states[8].step) == 2
    assert float(metrics[8]['lr']) == pytest.approx(config.optim.lr / config.optim.warmup)
    assert float(metrics[8]['grad_norm']) > 0 and bool(metrics[8]['finite'])
    assert _trees_differ(initial.params, states[1].params)


def test_ema_follows_the_parameters_exactly(config, meshes, steps, loaders, trained_state):
    """Steps 8 and 9 from the conftest state, whose EMA is far from the raw parameters (the
    first step's learning rate is 0: its optimizer state is fresh)."""
    key = rng.train_key(config.seed)
    state, _ = steps[8](
        jax.device_put(trained_state, parallel.replicated(meshes[8])), loaders[8].batch(0), key
    )
    before = _host_copy(state)
    state, _ = steps[8](state, loaders[8].batch(1), key)
    step = TRAINED_STEP + 1
    decay = np.float32(min(config.model.ema_rate, (1 + step) / (10 + step)))
    weights = np.float64(decay), np.float64(np.float32(1) - decay)
    moved = 0
    for got, e0, p0, p1 in zip(
        *(
            jax.tree.leaves(jax.device_get(tree))
            for tree in (state.ema_params, before.ema_params, before.params, state.params)
        )
    ):
        terms = weights[0] * e0.astype(np.float64), weights[1] * p1.astype(np.float64)
        # Exact up to float32 rounding of the products and the sum (XLA fuses one product
        # into a multiply-add, so it differs from numpy's float32 result by a few ulp).
        bound = 2.0**-23 * (np.abs(terms[0]) + np.abs(terms[1]))
        assert np.all(np.abs(got - (terms[0] + terms[1])) <= bound)
        moved += np.sum(weights[1] * np.abs(p1 - p0) > bound)
    assert moved > 0  # the parameters moved, so an EMA of the old parameters would fail
    assert int(state.step) == TRAINED_STEP + 2


# The train job, run in-process: 4 steps straight, and 2 steps then 2 more resumed.


def _read_scalars(directory):
    """{tag: [(step, value)]} from TensorBoard event files, read as TFRecords by hand."""
    scalars = {}
    for path in sorted(glob.glob(os.path.join(directory, 'events.out.tfevents.*'))):
        with open(path, 'rb') as f:
            while header := f.read(12):
                (length,) = struct.unpack('<Q', header[:8])
                event = event_pb2.Event.FromString(f.read(length))
                f.read(4)
                for value in event.summary.value:
                    if value.HasField('simple_value'):
                        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def _run_config(config, n_iters):
    run_config = config.copy_and_resolve_references()
    run_config.training.n_iters = n_iters
    run_config.training.log_freq = 2
    run_config.training.sampling_freq = 4
    return run_config


@pytest.fixture(scope='module')
def runs(config, tmp_path_factory):
    straight = tmp_path_factory.mktemp('straight')
    train_job.train(_run_config(config, 4), str(straight))
    resumed = tmp_path_factory.mktemp('resumed')
    train_job.train(_run_config(config, 2), str(resumed))
    train_job.train(_run_config(config, 4), str(resumed))
    return straight, resumed


def test_resumed_run_repeats_the_uninterrupted_run(config, runs, meshes):
    straight, resumed = runs
    steps_straight, state_straight = _restore(config, straight, meshes[8])
    steps_resumed, state_resumed = _restore(config, resumed, meshes[8])
    assert steps_straight == [4] and steps_resumed == [2, 4]
    assert int(state_resumed.step) == 4
    _assert_trees_equal(state_straight, state_resumed)
    fresh = state_lib.init_state(config, meshes[8], rng.init_key(config.seed))
    assert _trees_differ(fresh.params, state_straight.params)
    assert _trees_differ(state_straight.params, state_straight.ema_params)


def test_training_logs_scalars_at_the_log_steps(config, runs):
    straight, resumed = runs
    assert os.path.exists(straight / 'config.json')
    logged = _read_scalars(straight / 'tensorboard')
    assert set(logged) == {'train/loss', 'train/lr', 'train/grad_norm', 'train/steps_per_s'}
    for values in logged.values():
        assert [step for step, _ in values] == [2, 4]
    # train/lr is the mean of the rates of the steps since the last log: steps 0, 1 and 2, 3.
    lr, warmup = config.optim.lr, config.optim.warmup
    np.testing.assert_allclose(
        [v for _, v in logged['train/lr']], [lr * 0.5 / warmup, lr * 2.5 / warmup], rtol=1e-6
    )
    assert all(np.isfinite(v) and v > 0 for _, v in logged['train/loss'])
    again = _read_scalars(resumed / 'tensorboard')
    assert [step for step, _ in again['train/loss']] == [2, 4]
    assert again['train/loss'] == logged['train/loss']


def test_training_writes_grids_of_ema_samples(config, runs, meshes, samplers, source):
    straight, resumed = runs
    assert sorted(os.listdir(straight / 'samples')) == ['step_00000004.png']
    assert sorted(os.listdir(resumed / 'samples')) == ['step_00000002.png', 'step_00000004.png']
    _, state = _restore(config, straight, meshes[8])
    expected = (
        samplers[8]
        .draw(state.ema_params, source, config.sampling.num_samples, rng.sample_key(config.seed))
        .images
    )
    for workdir in runs:
        grid = np.asarray(Image.open(workdir / 'samples' / 'step_00000004.png'))
        np.testing.assert_array_equal(grid, images.grid(expected)[..., 0])


def _scalar_steps_as_tensorboard_shows(directory, tag):
    """The steps of `tag` after TensorBoard's purge rule: a SessionLog START event at step P
    (tensorboardX's purge_step) hides the events of earlier files at steps >= P."""
    steps = []
    for path in sorted(glob.glob(os.path.join(directory, 'events.out.tfevents.*'))):
        with open(path, 'rb') as f:
            while header := f.read(12):
                (length,) = struct.unpack('<Q', header[:8])
                event = event_pb2.Event.FromString(f.read(length))
                f.read(4)
                if event.session_log.status == event_pb2.SessionLog.START:
                    steps = [step for step in steps if step < event.step]
                steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps


def test_retention_progress_phases_and_purged_events_of_a_resumed_run(
    config, runs, tmp_path, monkeypatch, caplog, capfd
):
    """A crash after the events of step 4 but before its checkpoint, resumed from step 2 with
    a checkpoint every step, the newest one kept and every 4th step: sampling at step 4 made
    10 s slower must not lower the logged steps/s of steps 5 and 6."""
    caplog.set_level(logging.INFO, logger='absl')
    workdir = tmp_path / 'run'
    shutil.copytree(runs[1], workdir)  # checkpoints 2 and 4, events at steps 2 and 4
    shutil.rmtree(workdir / 'checkpoints' / '4')
    draw, delays = programs.Sampler.draw, [10]

    def slow_draw(*args, **kwargs):
        time.sleep(delays.pop() if delays else 0)
        return draw(*args, **kwargs)

    monkeypatch.setattr(programs.Sampler, 'draw', slow_draw)
    run_config = _run_config(config, 6)
    run_config.training.snapshot_freq = 1
    run_config.training.max_to_keep = 1
    run_config.training.keep_period = 4
    train_job.train(run_config, str(workdir))

    assert checkpoint.steps_on_disk(str(workdir)) == [4, 6]
    loss = _read_scalars(workdir / 'tensorboard')['train/loss']
    assert [step for step, _ in loss] == [2, 4, 4, 6]  # step 4 logged by both launches
    assert _scalar_steps_as_tensorboard_shows(workdir / 'tensorboard', 'train/loss') == [2, 4, 6]

    lines = [r.getMessage() for r in caplog.records if r.pathname.endswith('train.py')]
    assert re.fullmatch(r'Compiled the training step in [\d.]+ s\.', lines[1]), lines
    rates = [
        float(m[1])
        for line in lines
        if (m := re.fullmatch(r'step 6: loss .* steps/s ([\d.]+)  ETA 0m00s', line))
    ]
    # Steps 5 and 6 came after 10 s of sampling at step 4: counted in, 2 steps / 10 s.
    assert len(rates) == 1 and rates[0] > 2 / 10, lines
    phases = re.fullmatch(
        r'Steps 2 to 6 in \S+: training steps [\d.]+ s \([\d.]+ steps/s\), '
        r'compilation ([\d.]+) s, sampling ([\d.]+) s, checkpoints [\d.]+ s\.',
        lines[-2],
    )
    assert phases and float(phases[2]) >= 10, lines
    assert lines[-1] == (
        f'Outputs in {workdir}: checkpoints/ (steps [4, 6]), samples/ (sample '
        f'grids), tensorboard/ (tensorboard --logdir {workdir}/tensorboard).'
    )
    assert '\r' not in capfd.readouterr().err  # no progress bar frames without a terminal


def test_checkpoint_manager_keeps_the_newest_and_every_mth_step(tmp_path):
    manager = checkpoint.make_manager(str(tmp_path), max_to_keep=2, keep_period=4)
    saver = checkpoint.Saver(manager)
    for step in range(1, 11):
        saver.save(step, {'x': np.arange(3) + step})
    saver.check(wait=True)
    manager.close()
    assert checkpoint.steps_on_disk(str(tmp_path)) == [4, 8, 9, 10]
    manager = checkpoint.make_manager(str(tmp_path))  # the default: the newest 3
    saver = checkpoint.Saver(manager)
    saver.save(11, {'x': np.arange(3)})
    saver.check(wait=True)
    manager.close()
    assert checkpoint.steps_on_disk(str(tmp_path)) == [9, 10, 11]


def test_checkpoints_of_orbax_standard_handler_still_restore(
    config, trained_state, meshes, tmp_path
):
    """Checkpoints written before each replicated array was written by one replica (with
    orbax's StandardSave) restore: the full state to resume, and the EMA parameters alone."""
    mesh = meshes[8]
    state = jax.device_put(trained_state, parallel.replicated(mesh))
    directory = tmp_path / 'checkpoints'
    with ocp.CheckpointManager(directory) as manager:
        manager.save(TRAINED_STEP, args=ocp.args.StandardSave(state))
    with checkpoint.make_manager(str(tmp_path)) as manager:
        restored = checkpoint.restore_latest(manager, state_lib.abstract_state(config, mesh))
    for x, y in zip(jax.tree.leaves(trained_state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(x, y)
    ema_params, step = checkpoint.restore_ema_params(config, str(tmp_path), mesh)
    assert step == TRAINED_STEP
    for x, y in zip(
        jax.tree.leaves(trained_state.ema_params), jax.tree.leaves(ema_params), strict=True
    ):
        np.testing.assert_array_equal(x, y)


# The sample job and EMA-only restores, from conftest's `trained` checkpoint.


def _alg2_reference(config, params, num):
    """The first `num` samples of chunk 0 as programs.Sampler.draw documents them, computed
    step by step: the prior with the float64 heat operator, then u ← u + f(u, k) + δ ε_k for
    k = K..1 (no noise at k = 1), ε_k of example b = normal(fold_in(key_b, k)). Returns the
    float states at levels K, K-1, ..., 0, shape (K + 1, num, H, W, C)."""
    K, delta, seed = config.model.K, config.sampling.delta, config.seed
    batch = config.sampling.batch_size
    prior_key, chain_key = jax.random.split(jax.random.fold_in(rng.sample_key(seed), 0))
    prior_keys = jax.random.wrap_key_data(rng.example_keys(prior_key, batch))[:num]
    chain_keys = jax.random.wrap_key_data(rng.example_keys(chain_key, batch))[:num]
    digits = data.digits_images(config.data.image_size)[: data.DIGITS_TRAIN]
    x = digits[rng.prior_picks(seed, 0, batch, len(digits))[:num]] / 255.0
    shape = x.shape[1:]
    t_K = config.model.blur_sigma_max**2 / 2
    prior_noise = np.stack([jax.random.normal(key, shape) for key in prior_keys])
    u = (numpy_reference.heat(x, t_K) + delta * prior_noise).astype(np.float32)
    graphdef = state_lib.model_graphdef(config)
    f = jax.jit(
        lambda u, k: unet.apply(graphdef, params, u, jnp.full((num,), k, jnp.int32), train=False)
    )
    states = [u]
    for k in range(K, 0, -1):
        u = np.asarray(u + f(u, k))
        if k > 1:
            u = u + delta * np.stack(
                [jax.random.normal(jax.random.fold_in(key, k), shape) for key in chain_keys]
            )
        states.append(u)
    return np.stack(states)


def _within_one_grey_level(a, b):
    return np.abs(a.astype(int) - b.astype(int)).max() <= 1


def _gif_frames(path):
    with Image.open(path) as gif:
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert('L')))
    return frames


def test_sample_job_draws_alg2_with_the_ema_parameters(config, trained, trained_state, tmp_path):
    workdir = tmp_path / 'run'
    shutil.copytree(trained, workdir)
    sample_job.sample(config, str(workdir))
    out = workdir / 'samples'
    samples = np.load(out / 'samples.npz')['images']
    assert samples.shape == (config.sampling.num_samples, 8, 8, 1) and samples.dtype == np.uint8

    reference = _alg2_reference(config, trained_state.ema_params, config.sampling.batch_size)
    assert _within_one_grey_level(samples, images.to_uint8(reference[-1]))
    # Samples of the raw parameters are far from these: the job must sample from the EMA.
    raw = _alg2_reference(config, trained_state.params, config.sampling.batch_size)
    assert not _within_one_grey_level(samples, images.to_uint8(raw[-1]))
    # ...and the test is not decided by pixels clipped to 0 or 255 alone.
    assert np.mean((samples > 0) & (samples < 255)) > 0.05

    levels = programs.trajectory_levels(config.model.K)
    frames = _gif_frames(out / 'trajectory.gif')
    assert len(frames) == len(levels)
    shown = reference[config.model.K - np.array(levels), : sample_job.GIF_EXAMPLES]
    for frame, states in zip(frames, shown):
        assert _within_one_grey_level(frame, images.grid(images.to_uint8(states))[..., 0])
    png = np.asarray(Image.open(out / 'samples.png'))
    np.testing.assert_array_equal(png, images.grid(samples)[..., 0])

    first = {name: (out / name).read_bytes() for name in ('samples.png', 'trajectory.gif')}
    sample_job.sample(config, str(workdir))
    np.testing.assert_array_equal(np.load(out / 'samples.npz')['images'], samples)
    for name, content in first.items():
        assert (out / name).read_bytes() == content, name


def test_restore_ema_params_reads_the_ema_parameters(config, trained, trained_state, meshes):
    params, step = checkpoint.restore_ema_params(config, str(trained), meshes[8])
    assert step == TRAINED_STEP
    assert jax.tree.structure(params) == jax.tree.structure(trained_state.params)
    for leaf in jax.tree.leaves(params):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
    _assert_trees_equal(params, trained_state.ema_params)
    assert _trees_differ(params, trained_state.params)


def test_sample_mode_needs_a_checkpoint(config, tmp_path, meshes):
    with pytest.raises(errors.UserError, match='does not exist: train first'):
        workdir_lib.check(config, str(tmp_path / 'missing'), 'trained')
    with pytest.raises(errors.UserError, match='holds no checkpoint: train first'):
        workdir_lib.check(config, str(tmp_path), 'trained')
    with pytest.raises(errors.UserError, match='train first'):
        checkpoint.restore_ema_params(config, str(tmp_path), meshes[8])


def test_sharded_sampling_matches_single_device(config, trained, meshes, samplers, source):
    params, _ = checkpoint.restore_ema_params(config, str(trained), meshes[8])
    params = jax.device_get(params)
    prior_key, chain_key = jax.random.split(rng.sample_key(config.seed))
    u_K = samplers[8].prior_states(source, 0, config.sampling.batch_size, prior_key)
    keys = rng.example_keys(chain_key, config.sampling.batch_size)
    out = {n: samplers[n].chains(params, u_K, keys).final for n in (1, 8)}
    assert out[8].shape == (8, 8, 8, 1) and np.std(out[8]) > 0.1
    # Not bit-identical: XLA picks other convolution and reduction strategies for a per-device
    # batch of 8 than of 1, so float sums are ordered differently. Over 20 key and image draws
    # with these parameters (samples up to ~11 in size) the largest |a - b| / (1 + |a|) was
    # 5.8e-5 (|a - b| up to 7.4e-5); the tolerance leaves a margin of about 4x.
    np.testing.assert_allclose(out[1], out[8], rtol=2.5e-4, atol=2.5e-4)
    # Padding does not change a chain: 5 chains (padded to 8 on the mesh) are the first 5.
    np.testing.assert_array_equal(samplers[8].chains(params, u_K[:5], keys[:5]).final, out[8][:5])
