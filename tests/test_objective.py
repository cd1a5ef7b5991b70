"""Alg. 1 loss and ELBO terms against brute-force numpy and closed-form Gaussian identities."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest
import scipy.special
import scipy.stats

from ihdm_jax import objective

K, SIGMA, DELTA = 5, 0.01, 0.0125


def _times():
    s = np.exp(np.linspace(np.log(0.5), np.log(3.0), K))
    return np.concatenate([[0.0], s**2 / 2])


def _f_jax(u, k):
    return 0.1 * jnp.sin(3 * u) * k[:, None, None, None] - 0.05 * u


def _f_numpy(u, k):
    return 0.1 * np.sin(3 * u) * k[:, None, None, None] - 0.05 * u


@pytest.fixture(scope='module')
def data():
    rng = np.random.default_rng(0)
    u0 = rng.uniform(size=(4, 8, 6, 2)).astype(np.float32)
    k = np.array([1, 2, 5, 3], np.int32)
    eps = rng.normal(size=u0.shape).astype(np.float32)
    return u0, k, eps


def test_alg1_loss_equals_brute_force(data):
    u0, k, eps = data
    t = _times()
    expected = []
    for b in range(u0.shape[0]):  # one example at a time, as Alg. 1 is written
        x = u0[b : b + 1].astype(np.float64)
        u_hat = numpy_reference.heat(x, t[k[b]]) + SIGMA * eps[b : b + 1]
        mu = u_hat + _f_numpy(u_hat, k[b : b + 1])
        expected.append(np.sum((mu - numpy_reference.heat(x, t[k[b] - 1])) ** 2))
    got = objective.alg1_loss(_f_jax, u0, k, eps, jnp.asarray(t, jnp.float32), SIGMA)
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_training_loss_draws_k_from_1_to_K_and_is_the_batch_mean(data):
    u0, _, _ = data
    t = jnp.asarray(_times(), jnp.float32)
    seen = []

    def f_record(u, k):
        seen.append(k)
        return jnp.zeros_like(u)

    key = jax.random.key(3)
    loss = objective.training_loss(f_record, np.repeat(u0, 256, axis=0), key, t, SIGMA)
    ks = np.asarray(seen[0])
    assert set(ks.tolist()) == set(range(1, K + 1))
    # The loss is the batch mean of alg1_loss at the same draws (k and ε from the split key).
    k_key, eps_key = jax.random.split(key)
    big = np.repeat(u0, 256, axis=0)
    eps = jax.random.normal(eps_key, big.shape)
    per_example = objective.alg1_loss(lambda u, k: 0 * u, big, ks, eps, t, SIGMA)
    np.testing.assert_allclose(loss, np.mean(per_example), rtol=1e-5)


def test_training_loss_jits_and_differentiates(data):
    u0, _, _ = data
    t = jnp.asarray(_times(), jnp.float32)

    def loss(w, key):
        return objective.training_loss(lambda u, k: w * jnp.tanh(u), u0, key, t, SIGMA)

    key = jax.random.key(1)
    g = jax.jit(jax.grad(loss))(0.3, key)
    fd = (loss(0.3 + 1e-2, key) - loss(0.3 - 1e-2, key)) / 2e-2  # the loss is quadratic in w
    np.testing.assert_allclose(g, fd, rtol=1e-3)


def _kl_full_covariance(m0, s0, m1, s1):
    """KL between multivariate normals from the general formula with explicit matrices."""
    n = m0.size
    c0, c1 = s0**2 * np.eye(n), s1**2 * np.eye(n)
    c1_inv = np.linalg.inv(c1)
    d = (m1 - m0).ravel()
    return 0.5 * (
        np.trace(c1_inv @ c0)
        - n
        + d @ c1_inv @ d
        + np.linalg.slogdet(c1)[1]
        - np.linalg.slogdet(c0)[1]
    )


def test_level_kl_is_gaussian_kl(data):
    u0, _, eps = data
    mu = u0 + 0.02 * eps
    target = u0[::-1]
    got = objective.level_kl(jnp.asarray(mu), jnp.asarray(target), SIGMA, DELTA)
    expected = [_kl_full_covariance(target[b], SIGMA, mu[b], DELTA) for b in range(len(u0))]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_reconstruction_nll_is_gaussian_log_density(data):
    u0, _, eps = data
    mu = u0 + 0.01 * eps
    got = objective.reconstruction_nll(jnp.asarray(mu), jnp.asarray(u0), DELTA)
    expected = [
        -scipy.stats.multivariate_normal(mu[b].ravel().astype(np.float64), DELTA**2).logpdf(
            u0[b].ravel().astype(np.float64)
        )
        for b in range(len(u0))
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_level_term_uses_eq10_above_level_one_and_eq11_at_level_one(data):
    u0, k, eps = data
    t = _times()
    got = objective.level_term(_f_jax, u0, k, eps, jnp.asarray(t, jnp.float32), SIGMA, DELTA)
    for b in range(len(u0)):
        x = u0[b : b + 1].astype(np.float64)
        u_hat = numpy_reference.heat(x, t[k[b]]) + SIGMA * eps[b : b + 1]
        mu = u_hat + _f_numpy(u_hat, k[b : b + 1])
        if k[b] == 1:
            expected = -scipy.stats.multivariate_normal(mu.ravel(), DELTA**2).logpdf(x.ravel())
        else:
            expected = _kl_full_covariance(numpy_reference.heat(x, t[k[b] - 1]), SIGMA, mu, DELTA)
        np.testing.assert_allclose(got[b], expected, rtol=1e-4)


def _bound_brute_force(a, train, sigma, delta):
    """Eq. (41) at the optimal φ of Eq. (42), in float64, one pair at a time."""
    out = []
    for x in a:
        kls = np.array([_kl_full_covariance(x, sigma, y, delta) for y in train])
        phi = np.exp(-kls) / np.sum(np.exp(-kls))
        out.append(np.sum(phi * (kls + np.log(len(train)) + np.log(phi))))
    return np.array(out)


def test_prior_bound_equals_brute_force_formula():
    rng = np.random.default_rng(1)
    base = rng.uniform(size=(1, 4, 4, 1))
    train = base + 0.01 * rng.normal(size=(7, 4, 4, 1))
    test = base + 0.01 * rng.normal(size=(3, 4, 4, 1))
    expected = _bound_brute_force(test, train, SIGMA, DELTA)
    for chunk_size in (2, 3, 7, 100):  # uneven chunks exercise the padding
        got = objective.prior_kl_upper_bound(
            jnp.asarray(test, jnp.float32),
            jnp.asarray(train, jnp.float32),
            SIGMA,
            DELTA,
            chunk_size=chunk_size,
        )
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_prior_bound_is_above_monte_carlo_kl_to_the_kde():
    # Tiny dimension so that a Monte-Carlo estimate of the true KL to the KDE is accurate.
    rng = np.random.default_rng(2)
    d = 3
    sigma, delta = 0.01, 0.02
    train = rng.normal(scale=0.02, size=(5, d, 1, 1))
    test = rng.normal(scale=0.02, size=(4, d, 1, 1))
    bound = np.asarray(
        objective.prior_kl_upper_bound(
            jnp.asarray(test, jnp.float32), jnp.asarray(train, jnp.float32), sigma, delta
        )
    )
    flat_train = train.reshape(len(train), d)
    for b, x in enumerate(test.reshape(len(test), d)):
        z = x + sigma * rng.normal(size=(200_000, d))
        log_q = scipy.stats.multivariate_normal(x, sigma**2).logpdf(z)
        log_kernels = np.stack(
            [scipy.stats.multivariate_normal(y, delta**2).logpdf(z) for y in flat_train]
        )
        log_p = scipy.special.logsumexp(log_kernels, axis=0) - np.log(len(flat_train))
        terms = log_q - log_p
        mc, stderr = terms.mean(), terms.std() / np.sqrt(len(terms))
        assert bound[b] >= mc - 4 * stderr, (b, bound[b], mc)
        assert mc > 0.1  # the KL is not trivially zero here


def test_prior_bound_is_accurate_in_float32_at_cifar_scale():
    # Blurred CIFAR-sized points: nearly constant images far from the origin, close to each other.
    rng = np.random.default_rng(3)
    base = 0.5 + 0.1 * rng.normal(size=(1, 32, 32, 3))
    train = base + 0.003 * rng.normal(size=(50, 32, 32, 3))
    test = base + 0.003 * rng.normal(size=(4, 32, 32, 3))
    a, b = test.reshape(4, -1), train.reshape(50, -1)
    d2 = ((a[:, None] - b[None]) ** 2).sum(-1)
    n = a.shape[1]
    kl = 0.5 * (n * (SIGMA / DELTA) ** 2 - n + d2 / DELTA**2 + 2 * n * np.log(DELTA / SIGMA))
    expected = np.log(50) - scipy.special.logsumexp(-kl, axis=1)
    got = objective.prior_kl_upper_bound(
        jnp.asarray(test, jnp.float32), jnp.asarray(train, jnp.float32), SIGMA, DELTA, chunk_size=16
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4)
