"""ihdm_jax.load: a trained run as an object with its config, the EMA residual and sampling."""

import json

import jax
import numpy as np
import pytest
from conftest import TRAINED_STEP

import ihdm_jax
from ihdm_jax import checkpoint
from ihdm_jax import data
from ihdm_jax import errors
from ihdm_jax import parallel
from ihdm_jax import programs
from ihdm_jax import rng
from ihdm_jax import sampling
from ihdm_jax import state as state_lib
from ihdm_jax.models import unet


@pytest.fixture(scope='module')
def model(trained):
    return ihdm_jax.load(str(trained))


@pytest.fixture(scope='module')
def inputs(config):
    generator = np.random.default_rng(5)
    size, channels = config.data.image_size, config.data.num_channels
    u = generator.uniform(size=(3, size, size, channels)).astype(np.float32)
    return u, np.array([1, 4, config.model.K], np.int32)


@pytest.fixture(scope='module')
def ema_params(config, trained):
    return checkpoint.restore_ema_params(config, str(trained), parallel.make_mesh())[0]


def test_config_and_step_are_the_runs(model, config):
    assert json.loads(model.config.to_json()) == json.loads(config.to_json())
    assert model.config.model.channel_mult == config.model.channel_mult  # tuples, not lists
    assert model.config.analysis.gradient_pixels == config.analysis.gradient_pixels
    assert model.step == TRAINED_STEP


def test_f_is_the_ema_residual(model, config, trained, inputs, ema_params):
    u, k = inputs
    graphdef = state_lib.model_graphdef(config)
    apply = jax.jit(lambda p, u, k: unet.apply(graphdef, p, u, k, train=False))
    expected = np.asarray(apply(ema_params, u, k))
    np.testing.assert_array_equal(model.f(u, k), expected)
    # Compiled with the parameters as constants, XLA orders some sums differently (measured:
    # 1.3e-6, f up to 1.6).
    np.testing.assert_allclose(jax.jit(model.f)(u, k), expected, rtol=0, atol=1e-5)
    manager = checkpoint.make_manager(str(trained))
    try:
        raw = checkpoint.restore_latest(
            manager, state_lib.abstract_state(config, parallel.make_mesh())
        ).params
    finally:
        manager.close()
    # Not the raw parameters: their f differs by far more than the tolerance.
    assert np.abs(np.asarray(apply(raw, u, k)) - expected).max() > 0.05


def test_sample_is_alg2_with_the_ema_parameters(model, config, ema_params):
    key = jax.random.key(3)
    samples = model.sample(key, 5)
    size, channels = config.data.image_size, config.data.num_channels
    assert samples.shape == (5, size, size, channels) and samples.dtype == np.float32
    np.testing.assert_array_equal(model.sample(key, 5), samples)
    assert np.abs(model.sample(jax.random.key(4), 5) - samples).max() > 0.1

    # The first chunk by hand: the prior draw and the chains' keys of programs.Sampler.draw,
    # then Alg. 2 (sampling.sample_with_noise) with the EMA parameters.
    batch = config.sampling.batch_size
    prior_key, chain_key = jax.random.split(jax.random.fold_in(key, 0))
    u_K = programs.Sampler(config, parallel.make_mesh()).prior_states(
        data.make_source(config), 0, batch, prior_key
    )
    noise = sampling.example_noise(
        jax.random.wrap_key_data(rng.example_keys(chain_key, batch)), u_K.shape[1:]
    )
    graphdef = state_lib.model_graphdef(config)
    u_0, _ = jax.jit(
        lambda u: sampling.sample_with_noise(
            lambda x, k: unet.apply(graphdef, ema_params, x, k, train=False),
            u,
            config.model.K,
            config.sampling.delta,
            noise,
        )
    )(u_K)
    # Not bit-identical: the sampler runs the chains split over the 8 devices, which orders
    # float sums differently (measured: 5.8e-5 after the 10 levels, samples up to 7.8 in size;
    # test_train.py's sharded-sampling test measured up to 7.4e-5).
    np.testing.assert_allclose(samples, np.asarray(u_0)[:5], rtol=2.5e-4, atol=2.5e-4)


def test_a_folder_without_a_run_is_a_user_error(tmp_path):
    with pytest.raises(errors.UserError, match='is not a workdir of ihdm_jax'):
        ihdm_jax.load(str(tmp_path))
