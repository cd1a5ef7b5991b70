"""The negative ELBO against a float64 brute-force computation and its invariance to the batch size
and the device count; --mode=eval, fid and sweep_delta end to end on conftest's checkpoint."""

import dataclasses
import json
import os
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest
import scipy.special
import scipy.stats
from conftest import TRAINED_STEP
from PIL import Image

from ihdm_jax import checkpoint
from ihdm_jax import data
from ihdm_jax import elbo
from ihdm_jax import errors
from ihdm_jax import heat
from ihdm_jax import parallel
from ihdm_jax import programs
from ihdm_jax import rng
from ihdm_jax import state as state_lib
from ihdm_jax.evaluation import frechet
from ihdm_jax.evaluation import likelihood
from ihdm_jax.jobs import evaluate
from ihdm_jax.models import unet

TRAIN_IMAGES = 8  # training digits of the end-to-end runs, to keep Inception on CPU short
DELTA = 0.0125


@pytest.fixture(scope='module')
def eval_config(config):
    config = config.copy_and_resolve_references()
    evaluation = config.evaluation
    evaluation.num_examples = 12  # not a multiple of the batch (8): the last batch is padded
    # One δ: every FID costs a 2048x2048 matrix square root (about 25 s on two cores).
    evaluation.deltas = (config.sampling.delta,)
    return config


@pytest.fixture(scope='module')
def digits_split(eval_config):
    """The digits' test and training splits as sources. 1500 is data.DIGITS_TRAIN, written out
    since small_train_split patches it for the jobs."""
    digits = data.digits_images(eval_config.data.image_size)
    return data.ArraySource(digits[1500:]), data.ArraySource(digits[:1500])


@pytest.fixture(scope='module')
def random_params(eval_config):
    """Random parameters (no initialiser to compile), so that the residual f shapes every term."""
    generator = np.random.default_rng(0)
    shapes = state_lib.abstract_params(eval_config, parallel.make_mesh())
    return jax.tree.map(lambda s: 0.1 * generator.standard_normal(s.shape).astype(s.dtype), shapes)


def _negative_elbo(config, digits_split, params, devices=None, batch_size=8):
    config = config.copy_and_resolve_references()
    config.evaluation.batch_size = batch_size
    mesh = parallel.make_mesh(devices)
    return dataclasses.asdict(elbo.NegativeElbo(config, mesh, *digits_split)(params, DELTA))


@pytest.fixture(scope='module')
def random_elbo(eval_config, digits_split, random_params):
    """NegativeElbo on all 8 devices, batches of 8 (12 examples: the second batch is padded)."""
    return _negative_elbo(eval_config, digits_split, random_params)


def test_negative_elbo_matches_brute_force(eval_config, digits_split, random_params, random_elbo):
    """Every level k = 1..K and L_K by the paper's formulas in float64, with the draws of the
    keys elbo.example_keys gives each example."""
    config, params, result = eval_config, random_params, random_elbo
    K, sigma, passes = config.model.K, config.model.sigma, config.evaluation.num_passes
    n = config.evaluation.num_examples
    t = np.asarray(
        heat.heat_times(K, config.model.blur_sigma_min, config.model.blur_sigma_max), np.float64
    )
    test_source, train_source = digits_split
    test_bytes = test_source.images[:n].astype(np.float64)
    train_bytes = train_source.images.astype(np.float64)
    key = rng.elbo_key(config.seed)
    u0, example, level, eps = [], [], [], []
    for i, x in enumerate(test_bytes):
        dequant_key, pass_keys = elbo.example_keys(key, i, passes)
        noise = np.asarray(jax.random.uniform(dequant_key, (1,) + x.shape), np.float64)[0]
        u0.append((x + noise) / 256)
        for p in range(passes):
            k, e = likelihood.draw_level(pass_keys[p], (1,) + x.shape, K)
            example.append(i)
            level.append(int(k[0]))
            eps.append(np.asarray(e[0], np.float64))
    u0, example, level = np.stack(u0), np.array(example), np.array(level)
    # û_k = F(t_k)u0 + σε and μ(û_k, k) for every draw, the network in one call.
    u_k = numpy_reference.heat(u0[example], t[level]) + sigma * np.stack(eps)
    graphdef = state_lib.model_graphdef(config)
    apply = jax.jit(lambda u, k: unet.apply(graphdef, params, u, k, train=False))
    mu = u_k + np.asarray(
        apply(jnp.asarray(u_k, jnp.float32), jnp.asarray(level, jnp.int32)), np.float64
    )

    level_means = []
    for k in range(1, K + 1):
        drawn = level == k
        assert drawn.any(), f'level {k} was never drawn: change the seed or the number of passes'
        u0_k = u0[example[drawn]]
        if k == 1:  # L_0 = −log N(u0 | μ(u_1, 1), δ²I), Eq. (11)
            terms = -scipy.stats.norm.logpdf(u0_k, loc=mu[drawn], scale=DELTA).sum(axis=(1, 2, 3))
        else:  # L_{k−1} = D_KL[N(F(t_{k−1})u0, σ²I) ‖ N(μ(u_k, k), δ²I)], pixel by pixel, Eq. (10)
            mean_q = numpy_reference.heat(u0_k, t[k - 1])
            kl = (
                np.log(DELTA / sigma)
                + (sigma**2 + (mean_q - mu[drawn]) ** 2) / (2 * DELTA**2)
                - 0.5
            )
            terms = kl.sum(axis=(1, 2, 3))
        level_means.append(terms.mean())

    # L_K ≤ log N_T − log Σ_i exp(−D_KL[N(F(t_K)u0, σ²I) ‖ N(F(t_K)x_i, δ²I)]), Eq. (41).
    d = u0[0].size
    blurred_train = numpy_reference.heat(train_bytes / 255.0, t[K]).reshape(len(train_bytes), -1)
    blurred_test = numpy_reference.heat(u0, t[K]).reshape(n, -1)
    sq = ((blurred_test[:, None] - blurred_train[None]) ** 2).sum(axis=-1)
    kl_K = d * (np.log(DELTA / sigma) + sigma**2 / (2 * DELTA**2) - 0.5) + sq / (2 * DELTA**2)
    l_K = np.log(len(train_bytes)) - scipy.special.logsumexp(-kl_K, axis=1)

    per_dim = 1 / (d * np.log(2))
    nats = l_K.mean() + sum(level_means)
    # Measured relative differences (float32 network and heat against float64): level_nats
    # 3.5e-7, L_K 8.6e-7, sum_L_k 3.8e-8, L_0 3.5e-7, nats_per_image and bits_per_dim 7.2e-8.
    np.testing.assert_allclose(result['level_nats'], level_means, rtol=2e-6)
    np.testing.assert_allclose(result['L_K'], l_K.mean() * per_dim, rtol=4e-6)
    np.testing.assert_allclose(result['sum_L_k'], sum(level_means[1:]) * per_dim, rtol=4e-7)
    np.testing.assert_allclose(result['L_0'], level_means[0] * per_dim, rtol=2e-6)
    np.testing.assert_allclose(result['nats_per_image'], nats, rtol=5e-7)
    np.testing.assert_allclose(result['bits_per_dim'], nats * per_dim + 8, rtol=5e-7)
    assert result['num_examples'] == n and result['num_train'] == len(train_bytes)


@pytest.mark.parametrize('devices, batch_size', [(1, 8), (1, 5)])
def test_negative_elbo_does_not_depend_on_batch_size_or_devices(
    eval_config, digits_split, random_params, random_elbo, devices, batch_size
):
    """Against 8 devices with batches of 8: one device (per-device batch 8 instead of 1), and one
    device with batches of 5 (12 = 5 + 5 + 2, the last padded)."""
    result = _negative_elbo(
        eval_config, digits_split, random_params, jax.devices()[:devices], batch_size
    )
    # Not bitwise: XLA's convolutions round differently at other per-device batch sizes.
    # Measured relative differences: at most 2.7e-7, for the totals and for a level's mean.
    for name in ('bits_per_dim', 'L_K', 'sum_L_k', 'L_0', 'nats_per_image'):
        assert result[name] == pytest.approx(random_elbo[name], rel=1e-6), name
    np.testing.assert_allclose(result['level_nats'], random_elbo['level_nats'], rtol=2e-6)


def test_merge_prior_bounds_equals_the_bound_of_the_whole_set():
    generator = np.random.default_rng(1)
    neg_kl = generator.normal(-50, 10, size=(3, 7))  # 3 examples, 7 training images
    whole = np.log(7) - scipy.special.logsumexp(neg_kl, axis=1)
    parts = [neg_kl[:, :2], neg_kl[:, 2:3], neg_kl[:, 3:]]
    bounds = [np.log(p.shape[1]) - scipy.special.logsumexp(p, axis=1) for p in parts]
    np.testing.assert_allclose(likelihood.merge_prior_bounds(bounds, [2, 1, 4]), whole, rtol=1e-12)


@pytest.fixture(scope='module')
def small_train_split():
    """The end-to-end jobs measure FID and L_K against TRAIN_IMAGES training digits."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, 'DIGITS_TRAIN', TRAIN_IMAGES)
        yield


@pytest.fixture(scope='module')
def workdir(trained, small_train_split, tmp_path_factory):
    """A copy of conftest's checkpoint, since the jobs write into their workdir."""
    path = tmp_path_factory.mktemp('evaluate') / 'run'
    shutil.copytree(trained, path)
    return path


@pytest.fixture(scope='module')
def ema_params(eval_config, trained):
    params, step = checkpoint.restore_ema_params(eval_config, str(trained), parallel.make_mesh())
    assert step == TRAINED_STEP
    return params


def _read(workdir, name):
    with open(workdir / 'eval' / name) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def likelihood_json(eval_config, workdir):
    evaluate.likelihood(eval_config, str(workdir))
    return _read(workdir, 'likelihood.json')


def test_eval_job_writes_the_elbo_of_the_ema_parameters(
    eval_config, workdir, trained, likelihood_json, ema_params
):
    saved, config = likelihood_json, eval_config
    mesh = parallel.make_mesh()
    test_source, train_source = data.make_source(config, 'test'), data.make_source(config)
    assert len(train_source) == TRAIN_IMAGES
    negative_elbo = elbo.NegativeElbo(config, mesh, test_source, train_source)
    expected = dataclasses.asdict(negative_elbo(ema_params, config.sampling.delta))
    for name in (
        'bits_per_dim',
        'L_K',
        'sum_L_k',
        'L_0',
        'nats_per_image',
        'level_nats',
        'num_examples',
        'num_train',
    ):
        assert saved[name] == expected[name], name
    manager = checkpoint.make_manager(str(trained))
    raw = checkpoint.restore_latest(manager, state_lib.abstract_state(config, mesh)).params
    manager.close()
    from_raw = negative_elbo(raw, config.sampling.delta)
    assert from_raw.L_K == expected['L_K']  # the prior term has no parameters
    assert abs(from_raw.sum_L_k - expected['sum_L_k']) > 1e-3 * abs(expected['sum_L_k'])

    assert saved['step'] == TRAINED_STEP and saved['split'] == 'test' and saved['delta'] == DELTA
    assert saved['num_examples'] == 12 and saved['num_train'] == TRAIN_IMAGES
    assert saved['evaluation']['num_passes'] == 5 and len(saved['level_nats']) == config.model.K
    np.testing.assert_allclose(
        saved['bits_per_dim'], 8 + saved['L_K'] + saved['sum_L_k'] + saved['L_0'], rtol=1e-12
    )
    assert Image.open(workdir / 'eval' / 'likelihood_levels.png').size[0] > 400


@pytest.fixture(scope='module')
def fid_config(eval_config, inception_weights):
    config = eval_config.copy_and_resolve_references()
    config.evaluation.inception_weights = inception_weights
    return config


@pytest.fixture(scope='module')
def fid_json(fid_config, workdir):
    """--mode=fid; it computes and caches the training set's statistics."""
    evaluate.fid(fid_config, str(workdir))
    return _read(workdir, 'fid.json')


def test_fid_job_measures_the_ema_samples_against_the_training_set(
    fid_config, workdir, fid_json, ema_params
):
    config, saved = fid_config, fid_json
    source = data.make_source(config)
    samples = (
        programs.Sampler(config, parallel.make_mesh())
        .draw(ema_params, source, config.evaluation.fid_num_samples, rng.sample_key(config.seed))
        .images
    )
    with np.load(workdir / 'eval' / 'fid_samples.npz') as saved_samples:
        assert list(saved_samples) == ['images']
        np.testing.assert_array_equal(saved_samples['images'], samples)
    features = frechet.InceptionFeatures(
        config.evaluation.inception_weights, config.evaluation.batch_size
    )
    sample_features = features(samples)
    train_features = features(source.load(np.arange(len(source))))
    mu, sigma = frechet.load_statistics(saved['train_stats'])
    expected_mu, expected_sigma = frechet.statistics(train_features)
    np.testing.assert_array_equal(mu, expected_mu)  # the same features: identical
    np.testing.assert_array_equal(sigma, expected_sigma)
    expected = numpy_reference.low_rank_fid(sample_features, train_features)
    assert saved['fid'] == pytest.approx(expected, rel=2e-7)  # measured 4.8e-8

    assert saved['num_samples'] == 8 and saved['step'] == TRAINED_STEP
    assert saved['delta'] == DELTA
    assert saved['train_stats'] == str(workdir / 'eval' / 'train_stats_digits_8.npz')
    assert np.linalg.matrix_rank(sigma, hermitian=True) == TRAIN_IMAGES - 1
    assert Image.open(workdir / 'eval' / 'fid_samples.png').size[0] > 64


def test_class_fid_measures_each_class_against_its_training_images(fid_config, workdir, fid_json):
    """Per-class FID of a conditional model from the cached training features (synthetic
    16-dimensional ones here): each class's samples against that class's training images,
    against the float64 reference; the null class and single samples left out."""
    evaluator = evaluate.FidEvaluator(fid_config, str(workdir), parallel.make_mesh(), None)
    generator = np.random.default_rng(7)
    train, train_labels = generator.normal(size=(20, 16)), np.arange(20) % 2
    np.savez(evaluator.class_features_path, features=train, labels=train_labels)
    features = generator.normal(0.3, 1.2, size=(7, 16))
    labels = np.array([0, 0, 0, 1, 1, -1, 2])
    by_class = evaluator.class_fid(features, labels)
    assert set(by_class) == {0, 1}
    for c in (0, 1):
        expected = numpy_reference.low_rank_fid(features[labels == c], train[train_labels == c])
        assert by_class[c] == pytest.approx(expected, rel=1e-6)


def test_sweep_repeats_eval_and_fid_at_their_delta(fid_config, workdir, likelihood_json, fid_json):
    """At the configured δ the sweep gives the eval and fid jobs' numbers: the same keys and the
    cached training statistics."""
    elbo_saved, fid_value = likelihood_json, fid_json['fid']
    evaluate.sweep_delta(fid_config, str(workdir))
    saved = _read(workdir, 'sweep_delta.json')
    rows = saved['results']
    assert [row['delta'] for row in rows] == [DELTA]
    assert saved['step'] == TRAINED_STEP and saved['num_examples'] == 12
    for name in ('bits_per_dim', 'L_K', 'sum_L_k', 'L_0'):
        assert rows[0][name] == elbo_saved[name], name
    assert rows[0]['fid'] == fid_value
    K = fid_config.model.K
    assert rows[0]['steps'] == K  # config.sampling.steps = 0: every level
    table = (workdir / 'eval' / 'sweep_delta.md').read_text().splitlines()
    assert table[0].startswith('| steps | δ | bits/dim') and len(table) == 3
    assert table[2] == (
        f'| {K} | 0.0125 | {elbo_saved["bits_per_dim"]:.4f} | {elbo_saved["L_K"]:.4f} '
        f'| {elbo_saved["sum_L_k"]:.4f} | {elbo_saved["L_0"]:.4f} | '
        f'{fid_value:.2f} |'
    )
    assert Image.open(workdir / 'eval' / 'sweep_delta.png').size[0] > 400

    # Also over steps: Alg. 2 on every second level gives other samples, the same ELBO (the
    # paper's model takes its K levels), and the first row is the sweep above.
    config = fid_config.copy_and_resolve_references()
    config.evaluation.sweep_steps = (0, K // 2)
    evaluate.check_sweep_delta(config)
    evaluate.sweep_delta(config, str(workdir))
    stepped = _read(workdir, 'sweep_delta.json')['results']
    assert stepped[0] == rows[0]
    assert stepped[1]['steps'] == K // 2 and stepped[1]['fid'] != rows[0]['fid']
    assert stepped[1]['bits_per_dim'] == rows[0]['bits_per_dim']
    config.evaluation.sweep_steps = (3,)
    with pytest.raises(errors.UserError, match='sweep_steps: config.sampling.steps=3'):
        evaluate.check_sweep_delta(config)


def test_fid_check_without_weights_names_the_config_flag(eval_config, tmp_path):
    config = eval_config.copy_and_resolve_references()
    missing = tmp_path / 'missing.npz'
    config.evaluation.inception_weights = str(missing)
    with pytest.raises(errors.UserError, match=f'not found at {missing}') as raised:
        evaluate.check_fid(config)
    assert '--config.evaluation.inception_weights=PATH' in str(raised.value)


class _PixelFeatures:
    """Stands in for Inception: an image's pixels are its features, so the statistics show which
    images went into them."""

    calls = 0

    def __init__(self, weights, batch_size):
        del weights, batch_size

    def __call__(self, images, description=''):
        _PixelFeatures.calls += 1
        return np.stack([np.asarray(images[i], np.float64).reshape(-1) for i in range(len(images))])


def test_fid_reference_statistics_are_those_of_the_named_images_once_each(
    eval_config, tmp_path, monkeypatch
):
    monkeypatch.setattr(frechet, 'resolve_weights', lambda path, flag: path)
    monkeypatch.setattr(frechet, 'InceptionFeatures', _PixelFeatures)
    extra = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    for i, image in enumerate(extra):
        _save_png(tmp_path / 'extra' / f'{i}.png', image[..., 0])
    config = eval_config.copy_and_resolve_references()
    config.evaluation.fid_reference = ('train', 'test', str(tmp_path / 'extra'), 'train')
    evaluate.check_fid(config)
    run = tmp_path / 'run'
    evaluator = evaluate.FidEvaluator(
        config, str(run), parallel.make_mesh(), data.make_source(config)
    )
    # Both digit splits are all 1797 digits, wherever they are split; 'train' counts once.
    images = np.concatenate([data.digits_images(8), extra]).reshape(1800, -1).astype(np.float64)
    centred = images - images.mean(axis=0)
    mu, sigma = evaluator.train_stats
    np.testing.assert_allclose(mu, images.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, centred.T @ centred / 1799, rtol=1e-9, atol=1e-9)
    path = pathlib.Path(evaluator.stats_path)
    assert path.parent == run / 'eval' and path.exists()
    assert re.fullmatch(r'reference_stats_digits_8_train\+test\+extra-[0-9a-f]{8}\.npz', path.name)
    assert evaluator.describe() == f'train + test + {tmp_path / "extra"}'
    # Read back, not computed again.
    calls = _PixelFeatures.calls
    again = evaluate.FidEvaluator(config, str(run), parallel.make_mesh(), data.make_source(config))
    assert _PixelFeatures.calls == calls and again.stats_path == str(path)
    np.testing.assert_array_equal(again.train_stats[1], sigma)


def test_fid_reference_splits_of_one_folder_are_read_once(eval_config, tmp_path):
    _save_png(tmp_path / 'all' / 'a.png', np.zeros((8, 8), np.uint8))
    config = eval_config.copy_and_resolve_references()
    config.data.dataset = 'ffhq'
    config.data.data_dir = str(tmp_path / 'all')
    config.data.test_dir = str(tmp_path / 'all') + '/'
    config.evaluation.fid_reference = ('train', 'test')
    assert evaluate.reference_parts(config) == [('train', 'train', None)]
    assert evaluate.reference_stats_path(config, 'w') == os.path.join(
        'w', 'eval', 'train_stats_ffhq_8.npz'
    )
    config.data.test_dir = str(tmp_path / 'other')
    config.evaluation.fid_reference = ('train', str(tmp_path / 'missing'))
    with pytest.raises(
        errors.UserError,
        match="'.*missing' is neither 'train', 'test' nor a folder holding image files",
    ):
        evaluate.check_fid(config)
    config.evaluation.fid_reference = ('train', 'test')
    with pytest.raises(errors.UserError, match='test_dir=.*other.* does not exist'):
        evaluate.check_fid(config)


def _save_png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
