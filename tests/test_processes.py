"""The Gaussian forward processes diagonal in the DCT basis (ihdm_jax/diffusion.py) against
independent references: full-covariance numpy Gaussians in pixel space built from scipy's DCT,
Ho et al.'s Eq. (7), and the empirical spectrum of many draws."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft
import scipy.special
from conftest import write_checkpoint

from ihdm_jax import diffusion
from ihdm_jax import errors
from ihdm_jax import main
from ihdm_jax import processes
from ihdm_jax import workdir as workdir_lib

H = W = 4
D = H * W


def dct_basis(h, w):
    """V (D, D): column j is the pixel image of the j-th orthonormal DCT basis function, from
    scipy (so u = V ũ and ũ = Vᵀ u)."""
    eye = np.eye(h * w).reshape(h * w, h, w)
    return scipy.fft.idctn(eye, type=2, axes=(1, 2), norm='ortho').reshape(h * w, h * w).T


def eigenvalues(h, w):
    n, m = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
    return (np.pi**2 * (n**2 / h**2 + m**2 / w**2)).reshape(-1)


def cosine_np(t):
    b = np.arctan(np.exp(-5.0))
    a = np.arctan(np.exp(5.0)) - b
    logsnr = -2 * np.log(np.tan(a * t + b))
    return np.sqrt(scipy.special.expit(logsnr)), np.sqrt(scipy.special.expit(-logsnr))


def linear_np(T, beta_1, beta_T):
    return np.concatenate([[1.0], np.cumprod(1 - np.linspace(beta_1, beta_T, T))])


# Each process as (diffusion.Process, float64 (a_t, s_t) per frequency (D,) from the papers'
# formulas written out again in numpy).
T_SMALL = 4
BETAS = (0.05, 0.6)  # a few large steps, so that every term matters
SIGMA_B, D_MIN, GAMMA, C0 = 3.0, 0.001, 1.5, 0.5


def np_coefficients(kind, t):
    lam = eigenvalues(H, W)
    if kind == 'blurring':
        alpha, sigma = cosine_np(t)
        tau = (SIGMA_B * np.sin(np.pi * t / 2) ** 2) ** 2 / 2
        return alpha * ((1 - D_MIN) * np.exp(-lam * tau) + D_MIN), sigma * np.ones(D)
    alpha_bar = linear_np(T_SMALL, *BETAS)[int(round(t * T_SMALL))]
    c = np.ones(D)
    if kind == 'non_isotropic':
        c2 = (lam + C0) ** -GAMMA
        c = np.sqrt(c2 / c2.mean())
    return np.sqrt(alpha_bar) * np.ones(D), np.sqrt(1 - alpha_bar) * c


PROCESSES = {
    'ddpm': diffusion.ddpm(T_SMALL, *BETAS),
    'blurring': diffusion.blurring(T_SMALL, SIGMA_B, D_MIN),
    'non_isotropic': diffusion.non_isotropic(T_SMALL, GAMMA, C0, *BETAS),
}


def to_dct(u):
    """(D,) DCT coefficients of a (1, H, W, 1) image, in V's column order."""
    return np.asarray(u, np.float64).reshape(-1)


def pixel_image(v):
    return jnp.asarray(np.asarray(v, np.float32).reshape(1, H, W, 1))


def gaussian_conditional(mean_s, cov_s, A, cov_ts, u_t):
    """p(u_s | u_t) for u_s ~ N(mean_s, cov_s), u_t = A u_s + N(0, cov_ts): mean and cov."""
    cov_t = A @ cov_s @ A.T + cov_ts
    gain = cov_s @ A.T @ np.linalg.inv(cov_t)
    return mean_s + gain @ (u_t - A @ mean_s), cov_s - gain @ A @ cov_s


def gaussian_kl(m1, c1, m2, c2):
    inv = np.linalg.inv(c2)
    d = m2 - m1
    return 0.5 * (
        np.trace(inv @ c1)
        + d @ inv @ d
        - len(m1)
        + np.linalg.slogdet(c2)[1]
        - np.linalg.slogdet(c1)[1]
    )


def coeffs(process, t):
    a, s = diffusion.coefficients(process, jnp.full((1,), t), (1, H, W, 1))
    return np.asarray(a, np.float64).reshape(-1), np.asarray(s, np.float64).reshape(-1)


@pytest.mark.parametrize('kind', sorted(PROCESSES))
def test_coefficients_are_the_papers(kind):
    for t in (0.25, 0.5, 1.0):
        a, s = coeffs(PROCESSES[kind], t)
        a_ref, s_ref = np_coefficients(kind, t)
        np.testing.assert_allclose(a, a_ref, rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(s, s_ref, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize('kind', sorted(PROCESSES))
def test_posterior_is_the_full_covariance_gaussian_conditional(kind):
    """q(u_s | u_t, u_0) from diffusion.posterior, taken to pixels, against conditioning the
    pixel-space Gaussians q(u_s | u_0) and q(u_t | u_s) with dense matrices."""
    V = dct_basis(H, W)
    generator = np.random.default_rng(0)
    u0, u_t = generator.uniform(-1, 1, D), generator.normal(size=D)
    s, t = 0.5, 0.75
    a_s, s_s = np_coefficients(kind, s)
    a_t, s_t = np_coefficients(kind, t)
    A = V @ np.diag(a_t / a_s) @ V.T
    cov_ts = V @ np.diag(s_t**2 - (a_t / a_s) ** 2 * s_s**2) @ V.T
    mean_ref, cov_ref = gaussian_conditional(
        V @ (a_s * (V.T @ u0)), V @ np.diag(s_s**2) @ V.T, A, cov_ts, u_t
    )
    coef_t, coef_0, var = (
        np.asarray(x, np.float64).reshape(-1)
        for x in diffusion.posterior(
            *diffusion.coefficients(PROCESSES[kind], jnp.full((1,), s), (1, H, W, 1)),
            *diffusion.coefficients(PROCESSES[kind], jnp.full((1,), t), (1, H, W, 1)),
        )
    )
    mean = V @ (coef_t * (V.T @ u_t) + coef_0 * (V.T @ u0))
    np.testing.assert_allclose(mean, mean_ref, atol=2e-5)
    np.testing.assert_allclose(V @ np.diag(var) @ V.T, cov_ref, atol=2e-5)


def test_ddpm_posterior_is_ho_eq7():
    """μ̃_t = √ᾱ_{t−1} β_t/(1 − ᾱ_t) x_0 + √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) x_t and
    β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) β_t, with Ho et al.'s T = 1000 linear schedule."""
    T = 1000
    process = diffusion.ddpm(T)
    betas = np.linspace(1e-4, 0.02, T)
    alpha_bar = np.cumprod(1 - betas)
    for i in (2, 10, 100, 500, 1000):
        beta, ab, ab_prev = betas[i - 1], alpha_bar[i - 1], alpha_bar[i - 2]
        coef_0_ref = np.sqrt(ab_prev) * beta / (1 - ab)
        coef_t_ref = np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
        var_ref = (1 - ab_prev) / (1 - ab) * beta
        a_s, s_s = diffusion.coefficients(process, jnp.full((1,), (i - 1) / T), (1, 2, 2, 1))
        a_t, s_t = diffusion.coefficients(process, jnp.full((1,), i / T), (1, 2, 2, 1))
        coef_t, coef_0, var = (
            float(np.asarray(x)[0, 0, 0, 0]) for x in diffusion.posterior(a_s, s_s, a_t, s_t)
        )
        # float32: σ²_{t|s} = s_t² − α² s_s² loses about 1e-7/β_t relative to cancellation.
        np.testing.assert_allclose(
            [coef_t, coef_0, var], [coef_t_ref, coef_0_ref, var_ref], rtol=2e-3
        )


def _eps_net(seed=3):
    """A fixed network far from zero: ε̂(u, t) = tanh(W u (1 + t)) per image, in jax and numpy."""
    W_ = np.random.default_rng(seed).normal(size=(D, D)) / np.sqrt(D)

    def jax_fn(u, t):
        flat = u.reshape(u.shape[0], -1) @ jnp.asarray(W_, jnp.float32).T
        return jnp.tanh(flat * (1 + t[:, None])).reshape(u.shape)

    def np_fn(u, t):
        return np.tanh((W_ @ u) * (1 + t))

    return jax_fn, np_fn


@pytest.mark.parametrize('kind', sorted(PROCESSES))
def test_clip_acts_on_the_blurred_prediction_of_the_data(kind):
    """model_mean(clip=True) against numpy with dense V: the model's ũ_0 enters as
    coef_0/d_s ⊙ Vᵀ clip(V(d_s ⊙ ũ_0)), d_s = a_s/α_s (1 without blurring: Ho et al.'s clip)."""
    V = dct_basis(H, W)
    jax_net, np_net = _eps_net()
    s, t = 0.5, 0.75
    u_t = 3.0 * np.random.default_rng(1).normal(size=D)
    a_s, s_s = np_coefficients(kind, s)
    a_t, s_t = np_coefficients(kind, t)
    d_s = a_s / cosine_np(s)[0] if kind == 'blurring' else np.ones(D)
    u0 = (V.T @ u_t - s_t * (V.T @ np_net(u_t, t))) / a_t
    alpha_ts = a_t / a_s
    sigma2_ts = s_t**2 - alpha_ts**2 * s_s**2

    def mean_ref(u0_used):
        return V @ (alpha_ts * s_s**2 / s_t**2 * (V.T @ u_t) + a_s * sigma2_ts / s_t**2 * u0_used)

    clipped = mean_ref(V.T @ np.clip(V @ (d_s * u0), -1, 1) / d_s)
    ones = jnp.ones((1,))
    mean = diffusion.model_mean(
        PROCESSES[kind], jax_net, pixel_image(u_t), t * ones, s * ones, clip=True
    )
    np.testing.assert_allclose(np.asarray(mean).reshape(-1), clipped, rtol=1e-4, atol=1e-4)
    assert np.abs(clipped - mean_ref(u0)).max() > 0.1  # the clip is active
    if kind == 'blurring':  # and differs from clipping ũ_0 itself
        assert np.abs(clipped - mean_ref(V.T @ np.clip(V @ u0, -1, 1))).max() > 0.1


def test_blurring_with_d_one_is_ddpm():
    """d_t ≡ 1 (d_min = 1) turns blurring into plain diffusion: every output equals DDPM's."""
    ddpm = diffusion.ddpm(T_SMALL, *BETAS)
    blur_one = dataclasses.replace(
        ddpm, blur=functools.partial(diffusion.blur_factor, blur_sigma_max=SIGMA_B, d_min=1.0)
    )
    blur_real = dataclasses.replace(
        ddpm, blur=functools.partial(diffusion.blur_factor, blur_sigma_max=SIGMA_B, d_min=D_MIN)
    )
    net, _ = _eps_net()
    key = jax.random.key(0)
    u0 = jax.random.uniform(key, (2, H, W, 1), minval=-1, maxval=1)
    eps = jax.random.normal(jax.random.key(1), u0.shape)
    t = jnp.array([0.5, 1.0])

    def outputs(p):
        return [
            diffusion.q_sample(p, u0, t, eps),
            diffusion.epsilon_loss(p, net, u0, key),
            diffusion.ancestral_step(p, net, u0, t, t - 0.25, eps),
            diffusion.prior_kl(p, u0),
            diffusion.level_term(p, net, u0, jnp.array([1, 3]), eps),
        ]

    for x, y in zip(outputs(blur_one), outputs(ddpm)):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(outputs(blur_real)[0], outputs(ddpm)[0], atol=1e-3)


def test_fewer_sampling_steps_skip_levels():
    """num_steps = 2 of 4 levels: two ancestral steps, t = 1 → 0.5 → 0 (the posterior between
    non-adjacent levels), with the noise of levels 2 and 1 and the model's u_0 clipped."""
    net, _ = _eps_net()
    u = jax.random.normal(jax.random.key(0), (2, H, W, 1))
    noise = lambda i: jax.random.normal(jax.random.fold_in(jax.random.key(1), i), u.shape)  # noqa: E731,E501
    for process in PROCESSES.values():
        out, _ = diffusion.sample_with_noise(process, net, u, noise, num_steps=2)
        ones = jnp.ones((2,))
        half = diffusion.ancestral_step(process, net, u, ones, 0.5 * ones, noise(2), clip=True)
        manual = diffusion.ancestral_step(
            process, net, half, 0.5 * ones, 0 * ones, noise(1), clip=True
        )
        np.testing.assert_allclose(out, manual, rtol=1e-4, atol=1e-5)
        assert np.abs(np.asarray(out)).max() <= 1.0 + 1e-6  # the clipped model u_0
        unclipped = diffusion.ancestral_step(process, net, half, 0.5 * ones, 0 * ones, noise(1))
        assert np.abs(np.asarray(unclipped)).max() > 1.5
        full, _ = diffusion.sample_with_noise(process, net, u, noise)
        assert np.abs(np.asarray(full) - np.asarray(out)).max() > 1e-2
    with pytest.raises(ValueError, match='3 steps do not divide the 4 levels'):
        diffusion.sample_with_noise(PROCESSES['ddpm'], net, u, noise, num_steps=3)


def test_non_isotropic_noise_has_the_requested_spectrum():
    """The empirical variance of scipy's DCT of many prior draws and of q(u_t | 0) draws is
    c(λ)² and σ_t² c(λ)², with c² ∝ (λ + c0)^(−γ) of mean 1."""
    h, w, n = 8, 8, 20000
    process = diffusion.non_isotropic(100, GAMMA, C0)
    lam = eigenvalues(h, w)
    c2 = (lam + C0) ** -GAMMA
    c2 = (c2 / c2.mean()).reshape(h, w)
    prior = np.asarray(diffusion.prior_sample(process, jax.random.key(0), (n, h, w, 1)))
    var = np.var(scipy.fft.dctn(prior[..., 0], axes=(1, 2), norm='ortho'), axis=0)
    # 20000 draws: the variance estimates have 1% std; 64 of them stay within 5%.
    np.testing.assert_allclose(var / c2, 1.0, atol=0.05)
    assert c2.max() / c2.min() > 10  # far from white
    t = 0.5
    drawn = diffusion.q_sample(
        process,
        jnp.zeros((n, h, w, 1)),
        jnp.full((n,), t),
        jax.random.normal(jax.random.key(1), (n, h, w, 1)),
    )
    var_t = np.var(scipy.fft.dctn(np.asarray(drawn)[..., 0], axes=(1, 2), norm='ortho'), axis=0)
    sigma2 = 1 - linear_np(100, 1e-4, 0.02)[50]
    np.testing.assert_allclose(var_t / (sigma2 * c2), 1.0, atol=0.05)


def brute_force_elbo(kind, x, eps):
    """Ho et al.'s Eq. (5) in float64 with dense pixel-space Gaussians: L_T + Σ_{i=2..N} L_{i−1}
    + L_0, for one image x (D,) in [−1, 1] and the noise eps[i] (D,) of each level i."""
    V = dct_basis(H, W)
    _, net = _eps_net()
    N = T_SMALL

    def mats(t):
        a, s = np_coefficients(kind, t)
        return V @ np.diag(a) @ V.T, V @ np.diag(s) @ V.T, a, s

    def u0_hat(t, u_t):
        A, S, _, _ = mats(t)
        return np.linalg.solve(A, u_t - S @ net(u_t, t))

    A1, S1, _, _ = mats(1.0)
    c2 = (eigenvalues(H, W) + C0) ** -GAMMA if kind == 'non_isotropic' else np.ones(D)
    total = gaussian_kl(A1 @ x, S1 @ S1, np.zeros(D), V @ np.diag(c2 / c2.mean()) @ V.T)
    for i in range(2, N + 1):
        t, s = i / N, (i - 1) / N
        A_t, S_t, a_t, s_t = mats(t)
        A_s, S_s, a_s, s_s = mats(s)
        u_t = A_t @ x + S_t @ eps[i]
        A = V @ np.diag(a_t / a_s) @ V.T
        cov_ts = V @ np.diag(s_t**2 - (a_t / a_s) ** 2 * s_s**2) @ V.T
        q_mean, q_cov = gaussian_conditional(A_s @ x, S_s @ S_s, A, cov_ts, u_t)
        p_mean, p_cov = gaussian_conditional(A_s @ u0_hat(t, u_t), S_s @ S_s, A, cov_ts, u_t)
        total += gaussian_kl(q_mean, q_cov, p_mean, p_cov)
    A_1, S_1, _, _ = mats(1 / N)
    u_1 = A_1 @ x + S_1 @ eps[1]
    mean, std = u0_hat(1 / N, u_1), np.sqrt(np.trace(S_1 @ S_1) / D)
    upper = np.where(x > 0.999, np.inf, (x - mean + 1 / 255) / std)
    lower = np.where(x < -0.999, -np.inf, (x - mean - 1 / 255) / std)
    return total - np.sum(np.log(scipy.special.ndtr(upper) - scipy.special.ndtr(lower)))


@pytest.mark.parametrize('kind', sorted(PROCESSES))
def test_elbo_is_the_brute_force_float64_sum(kind):
    process = PROCESSES[kind]
    net, _ = _eps_net()
    generator = np.random.default_rng(1)
    x = np.round(generator.uniform(0, 255, D)) / 127.5 - 1
    x[:2] = -1.0, 1.0  # both open-ended bins
    eps = generator.normal(size=(T_SMALL + 1, D))
    u0 = pixel_image(x)
    total = float(diffusion.prior_kl(process, u0)[0])
    for i in range(1, T_SMALL + 1):
        total += float(
            diffusion.level_term(process, net, u0, jnp.array([i]), pixel_image(eps[i]))[0]
        )
    reference = brute_force_elbo(kind, x, eps)
    assert reference > 10  # nats: every term is far from zero
    np.testing.assert_allclose(total, reference, rtol=1e-4)


def test_heat_process_is_ihdm(config):
    """The default process is heat, and its loss is objective.training_loss itself."""
    from ihdm_jax import objective
    from ihdm_jax import schedule

    assert config.model.process == 'heat'
    process = processes.from_config(config)
    assert isinstance(process, processes.Heat)
    s = schedule.from_config(config)
    f = lambda u, k: 0.1 * u * k[:, None, None, None]  # noqa: E731
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
    key = jax.random.key(1)
    assert float(process.loss(f, x, key)) == float(objective.training_loss(f, x, key, s.t, s.sigma))


def test_bad_process_and_heat_only_modes_are_refused(config):
    bad = config.copy_and_resolve_references()
    bad.model.process = 'ddim'
    with pytest.raises(errors.UserError, match="config.model.process='ddim'"):
        main.run(bad, 'train', '/nonexistent')
    steps = config.copy_and_resolve_references()
    steps.sampling.steps = 4
    with pytest.raises(errors.UserError, match='steps=4 must be 0 .all K levels. or a divisor'):
        main.run(steps, 'sample', '/nonexistent')
    ddpm = config.copy_and_resolve_references()
    ddpm.model.process = 'ddpm'
    ddpm.sampling.steps = 3
    with pytest.raises(errors.UserError, match='a divisor of K = 10'):
        main.run(ddpm, 'sample', '/nonexistent')
    ddpm.sampling.steps = 0
    for mode in (
        'sweep_delta',
        'delta_grid',
        'prior_overlap',
        'hierarchical',
        'trajectory_gradients',
    ):
        with pytest.raises(
            errors.UserError, match=f"--mode={mode} is not defined for config.model.process='ddpm'"
        ):
            main.run(ddpm, mode, '/nonexistent')
    sampler = config.copy_and_resolve_references()
    sampler.sampling.sampler = 'heun'
    with pytest.raises(
        errors.UserError, match="config.sampling.sampler='heun'; expected one of 'ancestral'"
    ):
        main.run(sampler, 'sample', '/nonexistent')
    sampler.sampling.sampler, sampler.sampling.eta = 'ddim', 1.5
    with pytest.raises(errors.UserError, match=r'config.sampling.eta=1.5 must lie in \[0, 1\]'):
        main.run(sampler, 'sample', '/nonexistent')
    sampler.sampling.eta, sampler.sampling.steps = 0.5, 5
    with pytest.raises(errors.UserError, match='steps between neighbouring levels of config'):
        main.run(sampler, 'sample', '/nonexistent')
    continuous = config.copy_and_resolve_references()
    continuous.model.process, continuous.sampling.steps = 'heat_continuous', -1
    with pytest.raises(errors.UserError, match='config.sampling.steps=-1 must be 0'):
        main.run(continuous, 'sample', '/nonexistent')


@pytest.fixture(scope='module')
def ddpm_config(config):
    ddpm = config.copy_and_resolve_references()
    ddpm.model.process = 'ddpm'
    ddpm.model.beta_max = 0.2  # K = 10 levels that end near N(0, I) (ᾱ_K = 0.28)
    a = ddpm.analysis
    a.num_rows, a.num_points, a.num_images = 2, 3, 16
    a.gradient_pixels = ((0.5, 0.5),)
    a.level_fractions = (0.1, 1.0)
    ddpm.evaluation.num_examples = 8
    ddpm.evaluation.num_passes = 2
    return ddpm


@pytest.fixture(scope='module')
def ddpm_workdir(ddpm_config, tmp_path_factory):
    """A DDPM workdir of configs/tiny.py (K = 10) whose checkpoint has parameters far from the
    zero-initialised output (ε̂ of order 1), written without training, as conftest.trained."""
    return write_checkpoint(ddpm_config, tmp_path_factory.mktemp('ddpm'), 3)


def test_diffusion_training_loss_is_l_simple_on_scaled_data(ddpm_config):
    """The train step's loss for a diffusion process (processes.Diffusion.loss): L_simple of
    the data scaled to [−1, 1], with the network given 1000·t (t = i/K on the grid)."""
    process = processes.from_config(ddpm_config)
    assert isinstance(process, processes.Diffusion)
    seen = []

    def f(u, k):
        seen.append(k)
        return 0.3 * u * k[:, None, None, None] / 1000

    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
    key = jax.random.key(1)
    loss = float(process.loss(f, x, key))
    t_key, eps_key = jax.random.split(key)
    t = diffusion.training_times(process.process, t_key, 4)
    eps = jax.random.normal(eps_key, x.shape)
    u_t = np.asarray(diffusion.q_sample(process.process, 2 * x - 1, t, eps))
    np.testing.assert_allclose(seen[0], 1000 * np.asarray(t))
    assert set(np.round(np.asarray(t) * 10, 6)) <= set(range(1, 11))
    reference = np.mean((np.asarray(eps) - 0.3 * u_t * np.asarray(t)[:, None, None, None]) ** 2)
    np.testing.assert_allclose(loss, reference, rtol=1e-5)


def test_ddpm_samples_like_heat(ddpm_config, ddpm_workdir):
    import os

    import PIL.Image

    main.run(ddpm_config, 'sample', ddpm_workdir)
    out = os.path.join(ddpm_workdir, 'samples')
    samples = np.load(os.path.join(out, 'samples.npz'))['images']
    assert samples.shape == (8, 8, 8, 1) and samples.dtype == np.uint8
    assert samples.std() > 10  # not a constant image
    gif = PIL.Image.open(os.path.join(out, 'trajectory.gif'))
    assert gif.n_frames == ddpm_config.model.K + 1  # levels K..0
    assert os.path.getsize(os.path.join(out, 'samples.png')) > 0


def test_ddpm_eval_prior_term_is_the_closed_form_kl(ddpm_config, ddpm_workdir):
    """L_T of --mode=eval against Σ_pixels KL(N(√ᾱ_T x, 1 − ᾱ_T) ‖ N(0, 1)) in float64 over
    the same test images; the total is the sum of its terms, with no +8."""
    import json
    import os

    from ihdm_jax import data

    main.run(ddpm_config, 'eval', ddpm_workdir)
    with open(os.path.join(ddpm_workdir, 'eval', 'likelihood.json')) as f:
        result = json.load(f)
    test = data.make_source(ddpm_config, 'test')
    x = test.load(np.arange(8)).astype(np.float64) / 127.5 - 1
    alpha_bar = linear_np(10, 1e-4, 0.2)[-1]
    var = 1 - alpha_bar
    kl = 0.5 * np.sum(var + alpha_bar * x**2 - 1 - np.log(var), axis=(1, 2, 3))
    dims = x[0].size
    np.testing.assert_allclose(result['L_K'], kl.mean() / (dims * np.log(2)), rtol=1e-5)
    assert result['bits_per_dim'] == pytest.approx(
        result['L_K'] + result['sum_L_k'] + result['L_0'], rel=1e-9
    )
    assert result['L_0'] > 0 and result['sum_L_k'] > 0
    assert os.path.exists(os.path.join(ddpm_workdir, 'eval', 'likelihood_levels.png'))


def test_ddpm_interpolation_ends_are_its_own_chains(ddpm_config, ddpm_workdir):
    """The end frames of --mode=interpolate are the sampler's chains from the end points."""
    import os

    from ihdm_jax import checkpoint
    from ihdm_jax import images
    from ihdm_jax import parallel
    from ihdm_jax import programs

    main.run(ddpm_config, 'interpolate', ddpm_workdir)
    out = np.load(os.path.join(ddpm_workdir, 'analysis', 'interpolate', 'interpolate.npz'))
    mesh = parallel.make_mesh()
    params, _ = checkpoint.restore_ema_params(ddpm_config, ddpm_workdir, mesh)
    sampler = programs.Sampler(ddpm_config, mesh)
    for end, name in ((0, 'a'), (-1, 'b')):
        chains = images.to_uint8(
            sampler.chains(params, out[f'u_K_{name}'], out[f'noise_keys_{name}']).final
        )
        assert np.abs(chains.astype(int) - out['images'][:, end]).max() <= 1
    assert not np.array_equal(out['images'][:, 0], out['images'][:, 1])


def test_ddpm_input_gradients_and_psd(ddpm_config, ddpm_workdir):
    import os

    main.run(ddpm_config, 'input_gradients', ddpm_workdir)
    main.run(ddpm_config, 'psd', ddpm_workdir)
    grads = np.load(
        os.path.join(ddpm_workdir, 'analysis', 'input_gradients', 'input_gradients.npz')
    )['gradients']
    assert grads.shape == (1, 2, 8, 8, 1) and np.all(np.isfinite(grads))
    assert np.abs(grads).max() > 0.01
    psd = os.path.join(ddpm_workdir, 'analysis', 'psd')
    assert os.path.exists(os.path.join(psd, 'psd.png'))
    import json

    with open(os.path.join(psd, 'psd.json')) as f:
        levels = json.load(f)['levels']
    # At k = K the state is mostly noise: its power exceeds the data's at high frequencies.
    assert levels[-1]['psd'][-1] > levels[0]['psd'][-1]


def test_workdirs_from_before_the_process_keys_still_match(config, tmp_path):
    """A config.json written before config.model.process and its keys existed reads as the
    heat process with the defaults, not as a different run."""
    import json

    workdir_lib.save_config(config, str(tmp_path))
    path = tmp_path / 'config.json'
    saved = json.loads(path.read_text())
    for key in ('process', 'beta_min', 'beta_max', 'blur_d_min', 'noise_gamma', 'noise_c0'):
        del saved['model'][key]
    path.write_text(json.dumps(saved))
    assert workdir_lib.config_differences(config, str(tmp_path), training=True) == []
    ddpm = config.copy_and_resolve_references()
    ddpm.model.process = 'ddpm'
    assert workdir_lib.config_differences(ddpm, str(tmp_path), training=True) == [
        ('model.process', 'heat', 'ddpm')
    ]


def test_eps_error_benchmark_reference_columns(ddpm_config, ddpm_workdir):
    """benchmarks/eps_error.py: one row per time; its best linear DC score a²v/(a²v + s²) and
    a_t against Ho et al.'s ᾱ table and scipy's DCT of the test digits."""
    from benchmarks import eps_error
    from ihdm_jax import data

    step, rows = eps_error.errors_by_time(ddpm_config, ddpm_workdir, [0.5, 1.0], 8)
    assert step == 3 and [row[0] for row in rows] == [0.5, 1.0]
    x = 2.0 * data.make_source(ddpm_config, 'test').load(np.arange(8)) / 255.0 - 1.0
    v = np.var(scipy.fft.dctn(x, axes=(1, 2), norm='ortho')[:, 0, 0, :])
    alpha_bar = linear_np(10, 1e-4, 0.2)
    for t, dc, linear, first, rings, a_low, a_high in rows:
        ab = alpha_bar[int(round(t * 10))]
        np.testing.assert_allclose(linear, ab * v / (ab * v + 1 - ab), rtol=1e-4)
        np.testing.assert_allclose([a_low, a_high], np.sqrt(ab), rtol=1e-6)
        assert all(np.isfinite([dc, first, *rings[:3]])) and np.isnan(rings[3])  # 8x8: r < 10
