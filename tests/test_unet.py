"""Tests for ihdm_jax.models.unet: architecture, initialisation, dropout, bf16 and gradients."""

import importlib
import math
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ihdm_jax.models import unet

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_NAMES = (
    'mnist',
    'cifar10',
    'afhq64',
    'afhq256',
    'ffhq128',
    'ffhq256',
    'lsun_church128',
    'tiny',
)
CIFAR10_PARAMETERS = 61_060_867
CIFAR10_AVGPOOL_PARAMETERS = 57_962_883


def get_config(name):
    return importlib.import_module(f'configs.{name}').get_config()


def abstract_split(config):
    model = nnx.eval_shape(lambda: unet.from_config(config, nnx.Rngs(0)))
    return nnx.split(model, nnx.Param)


def count(params):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def perturb(params, seed, scale=0.05):
    """Moves every parameter, zero-initialised ones included, off its initial value."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: np.asarray(p) + scale * rng.standard_normal(p.shape, np.float32), params
    )


@pytest.fixture(scope='module')
def tiny():
    """configs/tiny.py with a second level, attended: down- and upsampling and attention inside
    residual blocks are in the model."""
    config = get_config('tiny')
    config.model.channel_mult, config.model.attention_levels = (1, 2), (1,)
    graphdef, params = unet.init(config, jax.random.key(0))
    rng = np.random.default_rng(1)
    size, channels = config.data.image_size, config.data.num_channels
    x = rng.uniform(size=(4, size, size, channels)).astype(np.float32)
    k = np.array([1, 2, config.model.K // 2, config.model.K], np.int32)
    return config, graphdef, params, x, k


@pytest.fixture(scope='module')
def tiny_perturbed(tiny):
    return perturb(tiny[2], seed=2)


@pytest.fixture(scope='module')
def tiny_apply(tiny):
    """Jitted f for the tiny model: {train: fn(params, x, k, key)}."""
    graphdef = tiny[1]
    return {
        train: jax.jit(
            lambda p, x, k, key, train=train: unet.apply(graphdef, p, x, k, train=train, key=key)
        )
        for train in (False, True)
    }


def test_cifar10_parameter_count():
    _, params = abstract_split(get_config('cifar10'))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(params))
    assert count(params) == CIFAR10_PARAMETERS


def test_avgpool_has_no_resampling_convolutions():
    """'avgpool' is the original code's conv_resample=False: no conv after the upsampling
    either. The original U-Net so built has 57,962,883 parameters for CIFAR-10: the default's
    61,060,867 less 3 strided convs down and 3 convs up (128, 256, 256 channels each way)."""
    config = get_config('cifar10')
    config.model.downsample = 'avgpool'
    assert unet.summary(config).endswith(f'\nparameters: {CIFAR10_AVGPOOL_PARAMETERS}')
    _, pooled = abstract_split(config)
    paths = [path for path, _ in nnx.to_flat_state(pooled)]
    assert not [path for path in paths if path[0] in ('downsample', 'upsample')]


def test_avgpool_resampling_is_mean_and_repeat():
    x = np.random.default_rng(4).standard_normal((2, 4, 6, 3)).astype(np.float32)
    down = unet.Downsample(3, 'avgpool', dtype=jnp.float32, rngs=nnx.Rngs(0))(x)
    np.testing.assert_allclose(down, x.reshape(2, 2, 2, 3, 2, 3).mean(axis=(2, 4)), rtol=1e-6)
    up = unet.Upsample(3, 'avgpool', dtype=jnp.float32, rngs=nnx.Rngs(0))(x)
    assert np.array_equal(up, x.repeat(2, axis=1).repeat(2, axis=2))


def test_timestep_embedding_is_cos_then_sin_of_raw_level():
    k = np.array([0, 7, 200], np.int32)
    freqs = 10000.0 ** (-np.arange(4) / 4)
    expected = np.concatenate([np.cos(k[:, None] * freqs), np.sin(k[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(unet.timestep_embedding(k, 8), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_output_shape_matches_input(name):
    config = get_config(name)
    graphdef, params = abstract_split(config)
    size = config.data.image_size
    x = jax.ShapeDtypeStruct((1, size, size, config.data.num_channels), jnp.float32)
    k = jax.ShapeDtypeStruct((1,), jnp.int32)
    out = jax.eval_shape(lambda p, x, k: unet.apply(graphdef, p, x, k, train=False), params, x, k)
    assert out.shape == x.shape and out.dtype == jnp.float32


def test_tiny_is_exactly_zero_at_init(tiny, tiny_apply):
    _, _, params, x, k = tiny
    f = tiny_apply[False](params, x, k, jax.random.key(0))
    assert f.shape == x.shape and f.dtype == jnp.float32
    assert np.all(np.asarray(f) == 0.0)


def test_params_hold_only_param_variables(tiny):
    model = unet.from_config(tiny[0], nnx.Rngs(0))
    _, state = nnx.split(model)
    variables = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    assert variables and all(type(v) is nnx.Param for v in variables)


def test_dropout_only_in_training(tiny, tiny_perturbed, tiny_apply):
    _, graphdef, _, x, k = tiny
    params = tiny_perturbed
    key1, key2 = jax.random.key(10), jax.random.key(11)

    train1 = np.asarray(tiny_apply[True](params, x, k, key1))
    assert np.array_equal(train1, np.asarray(tiny_apply[True](params, x, k, key1)))
    train2 = np.asarray(tiny_apply[True](params, x, k, key2))
    assert np.abs(train1 - train2).max() > 1e-2 * np.abs(train1).max()

    eval1 = np.asarray(tiny_apply[False](params, x, k, key1))
    assert np.abs(eval1).max() > 0.0
    assert np.array_equal(eval1, np.asarray(tiny_apply[False](params, x, k, key2)))
    with pytest.raises(ValueError):
        unet.apply(graphdef, params, x, k, train=True)


def test_dropout_drops_the_rate_and_keeps_the_mean():
    x = jnp.ones((16, 64, 64, 16))  # 2**20 entries
    y = np.asarray(unet.dropout(x, 0.1, jax.random.key(3)))
    dropped = np.mean(y == 0)
    assert abs(dropped - 6554 / 2**16) < 4 * math.sqrt(0.09 / y.size)  # 4 standard errors
    np.testing.assert_array_equal(np.unique(y), [0.0, np.float32(2**16 / (2**16 - 6554))])
    assert abs(y.mean() - 1.0) < 4 * math.sqrt(0.09 / y.size) / 0.9
    assert unet.dropout(x, 0.0, None) is x


def test_group_norm_matches_numpy():
    x = np.random.default_rng(0).normal(3.0, 2.0, (2, 5, 6, 64)).astype(np.float32)
    norm = unet.GroupNorm(64, 32, dtype=jnp.float32)
    norm.scale[...] = jnp.linspace(0.5, 1.5, 64)
    norm.bias[...] = jnp.linspace(-1.0, 1.0, 64)
    groups = x.astype(np.float64).reshape(2, 5, 6, 32, 2)
    mean = groups.mean(axis=(1, 2, 4), keepdims=True)
    variance = ((groups - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    expected = ((groups - mean) / np.sqrt(variance + 1e-5)).reshape(x.shape)
    expected = expected * np.linspace(0.5, 1.5, 64) + np.linspace(-1.0, 1.0, 64)
    np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize('groups, blind', [(32, True), (16, False)])
def test_one_channel_per_group_cancels_the_time_embedding(tiny, groups, blind):
    """A residual block adds the time embedding as one constant per channel before its second
    GroupNorm, which removes each channel's mean when a group holds one channel: configs/tiny.py's
    32 channels in 32 groups give the same f(u, k) at every level (to float32 rounding; measured
    1.7e-6 on outputs up to 3.1), in 16 groups 1.0 apart."""
    config = tiny[0].copy_and_resolve_references()
    config.model.channel_mult, config.model.attention_levels = (1,), ()
    config.model.num_groups = groups
    graphdef, params = unet.init(config, jax.random.key(0))
    params = perturb(params, seed=3, scale=0.1)
    x = np.random.default_rng(4).uniform(size=(2, 8, 8, 1)).astype(np.float32)
    f = jax.jit(lambda k: unet.apply(graphdef, params, x, k, train=False))
    low, high = f(np.array([1, 1], np.int32)), f(np.array([900, 900], np.int32))
    assert np.abs(np.asarray(low)).max() > 0.5
    difference = np.abs(np.asarray(low) - np.asarray(high)).max()
    assert difference < 1e-5 if blind else difference > 0.1, difference


def test_bfloat16_matches_float32(tiny, tiny_perturbed, tiny_apply):
    config, _, _, x, k = tiny
    config = config.copy_and_resolve_references()
    config.model.dtype = 'bfloat16'
    graphdef_bf16, params_bf16 = unet.init(config, jax.random.key(0))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params_bf16))

    f32 = np.asarray(tiny_apply[False](tiny_perturbed, x, k, jax.random.key(0)))
    apply_bf16 = jax.jit(lambda p: unet.apply(graphdef_bf16, p, x, k, train=False))
    # Every convolution runs in bf16 except the first, which reads the float32 input unrounded.
    convolutions = [
        re.search(r':\s*\(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)', line).groups()
        for line in apply_bf16.lower(tiny_perturbed).as_text().splitlines()
        if 'stablehlo.convolution' in line
    ]
    assert convolutions[0] == ('f32', 'f32')
    assert set(convolutions[1:]) == {('bf16', 'bf16')}
    bf16 = apply_bf16(tiny_perturbed)
    assert bf16.dtype == jnp.float32
    bf16 = np.asarray(bf16)
    assert not np.array_equal(bf16, f32)
    assert np.linalg.norm(bf16 - f32) < 6e-2 * np.linalg.norm(f32)  # measured: 1.7%


def test_attention_is_single_head_softmax_attention():
    attn = unet.Attention(64, groups=32, dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    attn.proj.kernel[...] = rng.standard_normal(attn.proj.kernel.shape).astype(np.float32)
    x = rng.standard_normal((2, 4, 4, 64)).astype(np.float32)

    q, k, v = np.split(np.asarray(attn.qkv(attn.norm(x)), np.float64).reshape(2, 16, 192), 3, -1)
    logits = q @ k.transpose(0, 2, 1) / np.sqrt(64)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = x + np.asarray(attn.proj((weights @ v).reshape(2, 4, 4, 64).astype(np.float32)))
    np.testing.assert_allclose(np.asarray(attn(x)), expected, rtol=1e-4, atol=1e-4)


def test_gradient_matches_finite_difference(tiny, tiny_perturbed, tiny_apply):
    """Reverse-mode gradient of a training-mode loss against a central difference, in float32."""
    _, graphdef, _, x, k = tiny
    params = tiny_perturbed
    rng = np.random.default_rng(20)
    target = 0.1 * rng.standard_normal(x.shape).astype(np.float32)
    dropout_key = jax.random.key(21)

    def loss(p):
        f = unet.apply(graphdef, p, x, k, train=True, key=dropout_key)
        return jnp.mean((f - target) ** 2)

    grad = jax.jit(jax.grad(loss))(params)
    direction = jax.tree.map(lambda p: rng.standard_normal(p.shape), params)
    norm = math.sqrt(sum(np.sum(d**2) for d in jax.tree.leaves(direction)))
    direction = jax.tree.map(lambda d: d / norm, direction)
    analytic = sum(
        np.vdot(np.asarray(g, np.float64), d)
        for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction))
    )

    def loss_at(eps):
        shifted = jax.tree.map(lambda p, d: (p + eps * d).astype(np.float32), params, direction)
        f = np.asarray(tiny_apply[True](shifted, x, k, dropout_key), np.float64)
        return np.mean((f - target) ** 2)

    eps = 0.1
    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert abs(analytic) > 1e-4
    assert abs(numeric - analytic) < 2e-3 * abs(analytic)


def test_summary_command_prints_parameter_count():
    result = subprocess.run(
        [sys.executable, '-m', 'ihdm_jax.main', '--config=configs/cifar10.py', '--mode=summary'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    match = re.search(r'^parameters: (\d+)$', result.stdout, re.MULTILINE)
    assert match, result.stdout[-2000:]
    assert int(match.group(1)) == CIFAR10_PARAMETERS
    assert result.stdout.rstrip().endswith(match.group(0))
