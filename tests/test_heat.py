"""The heat operator against scipy, a finite-difference Neumann solver and analytic identities."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest
import scipy.fft

from ihdm_jax import heat

SHAPES = [(2, 8, 8, 1), (1, 16, 12, 3), (3, 5, 7, 2), (1, 32, 32, 3)]


def _images(shape, seed=0):
    return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


@pytest.mark.parametrize('backend', heat.BACKENDS)
@pytest.mark.parametrize('shape', SHAPES)
def test_dct_matches_scipy(shape, backend):
    x = _images(shape)
    expected = scipy.fft.dctn(x.astype(np.float64), type=2, axes=(1, 2), norm='ortho')
    got = heat.dct_2d(x, backend)
    np.testing.assert_allclose(got, expected, atol=2e-5)
    np.testing.assert_allclose(heat.idct_2d(got, backend), x, atol=2e-5)


@pytest.mark.parametrize('shape', SHAPES)
def test_backends_agree(shape):
    x = _images(shape, seed=1)
    np.testing.assert_allclose(heat.dct_2d(x, 'fft'), heat.dct_2d(x, 'matmul'), atol=1e-5)
    t = np.linspace(0.1, 30.0, shape[0]).astype(np.float32)
    np.testing.assert_allclose(
        heat.heat_forward(x, t, 'fft'), heat.heat_forward(x, t, 'matmul'), atol=1e-5
    )


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="'fftw'"):
        heat.dct_2d(np.zeros((1, 4, 4, 1)), 'fftw')


@pytest.mark.parametrize('backend', heat.BACKENDS)
def test_heat_forward_matches_numpy_alg3(backend):
    u = _images((3, 16, 12, 3), seed=2)
    t = np.array([0.0, 1.5, 40.0], np.float32)
    np.testing.assert_allclose(
        heat.heat_forward(u, t, backend), numpy_reference.heat(u, t), atol=2e-5
    )
    np.testing.assert_allclose(
        heat.heat_forward(u, 2.0, backend), numpy_reference.heat(u, 2.0), atol=2e-5
    )


@pytest.mark.parametrize('backend', heat.BACKENDS)
def test_heat_preserves_channel_mean(backend):
    u = _images((2, 16, 16, 3), seed=3)
    out = heat.heat_forward(u, 7.3, backend)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), u.mean(axis=(1, 2)), atol=1e-6)


@pytest.mark.parametrize('backend', heat.BACKENDS)
def test_heat_semigroup(backend):
    u = _images((2, 16, 8, 2), seed=4)
    a, b = 0.7, 2.9
    composed = heat.heat_forward(heat.heat_forward(u, a, backend), b, backend)
    np.testing.assert_allclose(composed, heat.heat_forward(u, a + b, backend), atol=1e-5)


@pytest.mark.parametrize('backend', heat.BACKENDS)
def test_heat_tends_to_channel_mean(backend):
    u = _images((2, 16, 16, 3), seed=5)
    out = heat.heat_forward(u, 1e4, backend)
    np.testing.assert_allclose(
        out, np.broadcast_to(u.mean(axis=(1, 2), keepdims=True), u.shape), atol=1e-6
    )


def _finite_difference_heat(u, t, dt):
    """Explicit Euler on the 5-point Laplacian with reflecting (Neumann) ghost cells, float64."""
    u = u.astype(np.float64)
    for _ in range(int(round(t / dt))):
        p = np.pad(u, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='edge')
        lap = p[:, 2:, 1:-1] + p[:, :-2, 1:-1] + p[:, 1:-1, 2:] + p[:, 1:-1, :-2] - 4 * u
        u = u + dt * lap
    return u


@pytest.mark.parametrize('backend', heat.BACKENDS)
def test_heat_matches_finite_difference_solver_for_small_t(backend):
    # A smooth image (frequencies n, m < 3 on a 64 x 48 grid), where the 5-point Laplacian agrees
    # with the continuous one to a relative O((πn/H)²/12) < 2e-3.
    rng = np.random.default_rng(6)
    coeffs = np.zeros((1, 64, 48, 2))
    coeffs[:, :3, :3] = rng.normal(size=(1, 3, 3, 2))
    u = scipy.fft.idctn(coeffs, axes=(1, 2), norm='ortho').astype(np.float32)
    t = 2.0
    expected = _finite_difference_heat(u, t, dt=0.01)
    got = heat.heat_forward(u, t, backend)
    change = np.abs(expected - u).max()
    assert change > 1e-3  # the comparison is not trivially between two copies of u
    np.testing.assert_allclose(got, expected, atol=3e-3 * change)


def test_heat_forward_rejects_wrong_t_shape():
    with pytest.raises(ValueError, match=r'shape \(2,\)'):
        heat.heat_forward(np.zeros((2, 4, 4, 1)), np.zeros(3))


def test_blur_schedule():
    K, smin, smax = 200, 0.5, 24.0
    sigmas = np.asarray(heat.blur_sigmas(K, smin, smax))
    assert sigmas.shape == (K + 1,) and sigmas[0] == 0
    np.testing.assert_allclose(sigmas[1:], np.geomspace(smin, smax, K), rtol=1e-6)
    ratios = sigmas[2:] / sigmas[1:-1]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-5)  # constant rate of resolution loss
    np.testing.assert_allclose(heat.heat_times(K, smin, smax), sigmas**2 / 2, rtol=1e-6)
    np.testing.assert_allclose(heat.blur_sigmas(1, smin, smax), [0.0, smax])


@pytest.mark.parametrize('args', [(0, 0.5, 20.0), (10, 20.0, 20.0), (10, 0.0, 20.0), (2.5, 0.5, 2)])
def test_blur_schedule_rejects_bad_values(args):
    with pytest.raises(ValueError):
        heat.blur_sigmas(*args)


@pytest.mark.parametrize('backend', heat.BACKENDS)
def test_heat_forward_jits_and_differentiates(backend):
    u = jnp.asarray(_images((2, 8, 12, 1), seed=7))
    w = jnp.asarray(_images((2, 8, 12, 1), seed=8))
    t = jnp.array([0.3, 5.0])
    fwd = jax.jit(heat.heat_forward, static_argnums=2)
    np.testing.assert_allclose(fwd(u, t, backend), heat.heat_forward(u, t, backend), atol=1e-6)
    # F(t) = V exp(Λt) Vᵀ is symmetric, so ∇_u <w, F(t) u> = F(t) w.
    grad = jax.grad(lambda x: jnp.sum(w * heat.heat_forward(x, t, backend)))(u)
    np.testing.assert_allclose(grad, numpy_reference.heat(np.asarray(w), np.asarray(t)), atol=2e-5)
    # d/dt F(t)u = ΔF(t)u: check the time derivative against a central difference in float64.
    dt_grad = jax.grad(lambda s: jnp.sum(w[:1] * heat.heat_forward(u[:1], s, backend)))(2.0)
    w0, u0 = np.asarray(w[:1], np.float64), np.asarray(u[:1], np.float64)
    fd = (
        np.sum(w0 * numpy_reference.heat(u0, 2.0 + 1e-4))
        - np.sum(w0 * numpy_reference.heat(u0, 2.0 - 1e-4))
    ) / 2e-4
    np.testing.assert_allclose(dt_grad, fd, rtol=1e-3)
