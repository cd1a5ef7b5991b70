"""The evaluation jobs: the ELBO against a float64 brute-force computation, and --mode=eval, fid and
sweep_delta end to end on a checkpoint of a one-step run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from PIL import Image

import numpy_reference
from configs import tiny
from ihdm_jax import data
from ihdm_jax import evaluate
from ihdm_jax import heat
from ihdm_jax import parallel
from ihdm_jax import train
from ihdm_jax.evaluation import fid
from ihdm_jax.evaluation import likelihood
from ihdm_jax.models import unet
from test_fid import weights  # noqa: F401  (the converted Inception weights, a fixture)

TRAIN_IMAGES = 8  # training digits of the end-to-end runs, to keep Inception on CPU short


@pytest.fixture(scope='module')
def config():
    config = tiny.get_config()
    evaluation = config.evaluation
    evaluation.num_examples = 12  # not a multiple of the batch (8): the last batch is padded
    # One δ: every FID costs a 2048x2048 matrix square root (about 25 s on two cores).
    evaluation.deltas = (config.sampling.delta,)
    return config


def test_negative_elbo_matches_brute_force(config):
    """Every level k = 1..K and L_K by the paper's formulas in float64, with the job's draws."""
    mesh = parallel.make_mesh()
    graphdef = train.model_graphdef(config)
    # Random parameters (no initialiser to compile), so that the residual f shapes every term.
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: unet.init(config, jax.random.key(0))[1])
    params = jax.tree.map(lambda s: 0.1 * rng.standard_normal(s.shape).astype(s.dtype), shapes)
    delta = 0.0125
    result = evaluate.NegativeElbo(config, graphdef, mesh)(
        jax.device_put(params, parallel.replicated(mesh)), delta)

    K, sigma, passes = config.model.K, config.model.sigma, config.evaluation.num_passes
    n = config.evaluation.num_examples
    t = np.asarray(heat.heat_times(K, config.model.blur_sigma_min, config.model.blur_sigma_max),
                   np.float64)
    digits = data.digits_images(8)
    test_bytes = digits[data.DIGITS_TRAIN:data.DIGITS_TRAIN + n]
    train_bytes = digits[:data.DIGITS_TRAIN]
    # The job's random numbers, drawn from the keys it gives example i.
    key = evaluate.elbo_key(config)
    u0, example, level, eps = [], [], [], []
    for i, x in enumerate(test_bytes):
        dequant_key, pass_keys = evaluate.example_keys(key, i, passes)
        noise = np.asarray(jax.random.uniform(dequant_key, (1,) + x.shape), np.float64)[0]
        u0.append((x + noise) / 256)  # (x·255 + U)/256 for x in [0, 1], i.e. (byte + U)/256
        for p in range(passes):
            k, e = likelihood.draw_level(pass_keys[p], (1,) + x.shape, K)
            example.append(i)
            level.append(int(k[0]))
            eps.append(np.asarray(e[0], np.float64))
    u0, example, level = np.stack(u0), np.array(example), np.array(level)
    # û_k = F(t_k)u0 + σε and μ(û_k, k) for every draw, the network in one call.
    u_k = numpy_reference.heat(u0[example], t[level]) + sigma * np.stack(eps)
    apply = jax.jit(lambda u, k: unet.apply(graphdef, params, u, k, train=False))
    mu = u_k + np.asarray(apply(jnp.asarray(u_k, jnp.float32), jnp.asarray(level, jnp.int32)),
                          np.float64)

    level_means = []
    for k in range(1, K + 1):
        drawn = level == k
        assert drawn.any(), f'level {k} was never drawn: change the seed or the number of passes'
        u0_k = u0[example[drawn]]
        if k == 1:  # L_0 = −log N(u0 | μ(u_1, 1), δ²I), Eq. (11)
            terms = -scipy.stats.norm.logpdf(u0_k, loc=mu[drawn], scale=delta).sum(axis=(1, 2, 3))
        else:  # L_{k−1} = D_KL[N(F(t_{k−1})u0, σ²I) ‖ N(μ(u_k, k), δ²I)], pixel by pixel, Eq. (10)
            mean_q = numpy_reference.heat(u0_k, t[k - 1])
            kl = (np.log(delta / sigma) + (sigma**2 + (mean_q - mu[drawn]) ** 2) / (2 * delta**2)
                  - 0.5)
            terms = kl.sum(axis=(1, 2, 3))
        level_means.append(terms.mean())

    # L_K ≤ log N_T − log Σ_i exp(−D_KL[N(F(t_K)u0, σ²I) ‖ N(F(t_K)x_i, δ²I)]), Eq. (41).
    d = u0[0].size
    blurred_train = numpy_reference.heat(train_bytes / 255.0, t[K]).reshape(len(train_bytes), -1)
    blurred_test = numpy_reference.heat(u0, t[K]).reshape(n, -1)
    sq = ((blurred_test[:, None] - blurred_train[None]) ** 2).sum(axis=-1)
    kl_K = d * (np.log(delta / sigma) + sigma**2 / (2 * delta**2) - 0.5) + sq / (2 * delta**2)
    l_K = np.log(len(train_bytes)) - scipy.special.logsumexp(-kl_K, axis=1)

    per_dim = 1 / (d * np.log(2))
    nats = l_K.mean() + sum(level_means)
    np.testing.assert_allclose(result['level_nats'], level_means, rtol=1e-4)
    np.testing.assert_allclose(result['L_K'], l_K.mean() * per_dim, rtol=1e-4)
    np.testing.assert_allclose(result['sum_L_k'], sum(level_means[1:]) * per_dim, rtol=1e-4)
    np.testing.assert_allclose(result['L_0'], level_means[0] * per_dim, rtol=1e-4)
    np.testing.assert_allclose(result['nats_per_image'], nats, rtol=1e-5)
    np.testing.assert_allclose(result['bits_per_dim'], nats * per_dim + 8, rtol=1e-6)
    assert result['num_examples'] == n and result['num_train'] == len(train_bytes)


def test_merge_prior_bounds_equals_the_bound_of_the_whole_set():
    rng = np.random.default_rng(1)
    neg_kl = rng.normal(-50, 10, size=(3, 7))  # 3 examples, 7 training images
    whole = np.log(7) - scipy.special.logsumexp(neg_kl, axis=1)
    parts = [neg_kl[:, :2], neg_kl[:, 2:3], neg_kl[:, 3:]]
    bounds = [np.log(p.shape[1]) - scipy.special.logsumexp(p, axis=1) for p in parts]
    np.testing.assert_allclose(likelihood.merge_prior_bounds(bounds, [2, 1, 4]), whole,
                               rtol=1e-12)


@pytest.fixture(scope='module')
def small_train_split():
    """The end-to-end tests train on, and measure FID and L_K against, TRAIN_IMAGES digits."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, 'DIGITS_TRAIN', TRAIN_IMAGES)
        yield


@pytest.fixture(scope='module')
def workdir(config, small_train_split, tmp_path_factory):
    """A one-step run; its EMA parameters are the initial ones (lr is 0 at step 0)."""
    path = tmp_path_factory.mktemp('evaluate')
    run = config.copy_and_resolve_references()
    run.training.n_iters = 1
    train.train_and_evaluate(run, str(path))
    return path


def test_eval_job_writes_the_terms_and_their_plot(config, workdir):
    result = evaluate.likelihood(config, str(workdir))
    with open(workdir / 'eval' / 'likelihood.json') as f:
        saved = json.load(f)
    assert saved['step'] == 1 and saved['split'] == 'test' and saved['delta'] == 0.0125
    assert saved['num_examples'] == 12 and saved['num_train'] == TRAIN_IMAGES
    assert saved['evaluation']['num_passes'] == 5 and len(saved['level_nats']) == config.model.K
    for name in ('bits_per_dim', 'L_K', 'sum_L_k', 'L_0', 'nats_per_image'):
        assert saved[name] == result[name]
    np.testing.assert_allclose(saved['bits_per_dim'],
                               8 + saved['L_K'] + saved['sum_L_k'] + saved['L_0'], rtol=1e-12)
    assert Image.open(workdir / 'eval' / 'likelihood_levels.png').size[0] > 400


@pytest.fixture(scope='module')
def fid_run(config, workdir, weights):  # noqa: F811
    """--mode=fid; it computes and caches the training set's statistics."""
    run = config.copy_and_resolve_references()
    run.evaluation.inception_weights = weights
    return run, evaluate.fid(run, str(workdir))


def test_fid_job_writes_value_samples_and_training_statistics(fid_run, workdir):
    _, value = fid_run
    with open(workdir / 'eval' / 'fid.json') as f:
        saved = json.load(f)
    assert saved['fid'] == value and np.isfinite(value) and value > 0
    assert saved['num_samples'] == 8 and saved['step'] == 1
    stats = workdir / 'eval' / 'train_stats_digits_8.npz'
    assert saved['train_stats'] == str(stats)
    mu, sigma = fid.load_statistics(str(stats))
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert np.linalg.matrix_rank(sigma, hermitian=True) == TRAIN_IMAGES - 1
    assert Image.open(workdir / 'eval' / 'fid_samples.png').size[0] > 64


def test_sweep_repeats_eval_and_fid_at_their_delta(config, fid_run, workdir):
    """At the configured δ the sweep gives the eval and fid jobs' numbers: the same keys and the
    cached training statistics."""
    run, fid_value = fid_run
    rows = evaluate.sweep_delta(run, str(workdir))
    with open(workdir / 'eval' / 'likelihood.json') as f:
        elbo = json.load(f)
    with open(workdir / 'eval' / 'sweep_delta.json') as f:
        saved = json.load(f)
    assert saved['results'] == rows and [row['delta'] for row in rows] == [0.0125]
    assert saved['step'] == 1 and saved['num_examples'] == 12
    for name in ('bits_per_dim', 'L_K', 'sum_L_k', 'L_0'):
        assert rows[0][name] == pytest.approx(elbo[name], rel=1e-12)
    assert rows[0]['fid'] == pytest.approx(fid_value, rel=1e-9)
    table = (workdir / 'eval' / 'sweep_delta.md').read_text().splitlines()
    assert table[0].startswith('| δ | bits/dim') and len(table) == 3
    assert table[2] == (f'| 0.0125 | {elbo["bits_per_dim"]:.4f} | {elbo["L_K"]:.4f} | '
                        f'{elbo["sum_L_k"]:.4f} | {elbo["L_0"]:.4f} | {fid_value:.2f} |')
    assert Image.open(workdir / 'eval' / 'sweep_delta.png').size[0] > 400


def test_fid_job_without_weights_fails_before_sampling(config, tmp_path):
    run = config.copy_and_resolve_references()
    run.evaluation.inception_weights = str(tmp_path / 'missing.npz')
    with pytest.raises(fid.InputError, match='Inception weights not found'):
        evaluate.fid(run, str(tmp_path))
    assert not (tmp_path / 'eval').exists()
