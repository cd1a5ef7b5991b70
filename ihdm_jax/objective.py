"""Training loss (Alg. 1) and the terms of the negative ELBO (Eqs. 7, 10, 11 and App. A.3).

`f` is the network residual: a callable f(u_k, k) -> array of u_k's shape with k an int32 array of
shape (B,); the model mean is μ(u_k, k) = u_k + f(u_k, k) (Eq. 8). `t` is the array of heat times
t_0..t_K from `heat.heat_times`, so K = len(t) − 1. Everything is float32.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ihdm_jax import heat

_HIGHEST = jax.lax.Precision.HIGHEST


def _sum_squares(x):
    return jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)))


def perturbed_level(u0, k, eps, t, sigma, backend='matmul'):
    """û_k = F(t_k) u0 + σε, a draw from q(u_k | u0) of Eq. (4) given the unit noise ε."""
    return heat.heat_forward(u0, t[k], backend) + sigma * eps


def alg1_loss(f, u0, k, eps, t, sigma, backend='matmul'):
    """Alg. 1 with the randomness given: ‖μ(û_k, k) − F(t_{k−1}) u0‖² summed over pixels.

    Args:
      f: the network residual, f(u, k).
      u0: data batch (B, H, W, C).
      k: levels, int32 (B,), each in 1..K.
      eps: standard normal noise, u0's shape (scaled by σ here).
      t: heat times t_0..t_K.
      sigma: training noise σ.
    Returns:
      The per-example squared errors, shape (B,).
    """
    u_k = perturbed_level(u0, k, eps, t, sigma, backend)
    target = heat.heat_forward(u0, t[k - 1], backend)
    return _sum_squares(u_k + f(u_k, k) - target)


def training_loss(f, u0, key, t, sigma, backend='matmul'):
    """Alg. 1 over a batch: k ~ U{1..K}, ε ~ N(0, I); the mean over the batch of the summed errors.

    k is uniform on {1, ..., K} as in the paper (the original code draws from {1, ..., K−1}).
    """
    k_key, eps_key = jax.random.split(key)
    K = t.shape[0] - 1
    k = jax.random.randint(k_key, (u0.shape[0],), 1, K + 1, dtype=jnp.int32)
    eps = jax.random.normal(eps_key, u0.shape, jnp.float32)
    return jnp.mean(alg1_loss(f, u0, k, eps, t, sigma, backend))


def x0_loss(f, u0, kappa, eps, time, sigma, backend='matmul'):
    """‖x̂_0(û_κ, κ) − u0‖² summed over pixels, x̂_0 = û_κ + f(û_κ, κ), û_κ = F(t(κ)) u0 + σε: the
    regression whose minimiser is the posterior mean E[u_0 | u_κ] at every level κ.

    Args:
      f: the network residual f(u, κ), κ float32 (B,).
      u0: data batch (B, H, W, C).
      kappa: continuous levels (B,).
      eps: standard normal noise, u0's shape.
      time: κ -> heat time t(κ) (heat.level_times).
      sigma: training noise σ.
    Returns:
      The per-example squared errors, shape (B,).
    """
    u_kappa = heat.heat_forward(u0, time(kappa), backend) + sigma * eps
    return _sum_squares(u_kappa + f(u_kappa, kappa) - u0)


def x0_training_loss(f, u0, key, time, K, sigma, backend='matmul'):
    """x0_loss over a batch with κ ~ U[1, K] (σ_B log-uniform between its ends, the paper's
    level schedule in the limit of many levels) and ε ~ N(0, I); the mean over the batch."""
    k_key, eps_key = jax.random.split(key)
    kappa = jax.random.uniform(k_key, (u0.shape[0],), jnp.float32, 1.0, float(K))
    eps = jax.random.normal(eps_key, u0.shape, jnp.float32)
    return jnp.mean(x0_loss(f, u0, kappa, eps, time, sigma, backend))


def gaussian_kl(mean_q, sigma_q, mean_p, sigma_p):
    """D_KL[N(mean_q, σ_q² I) ‖ N(mean_p, σ_p² I)] per example, in nats.

    = ½ (N σ_q²/σ_p² − N + ‖mean_q − mean_p‖²/σ_p² + 2N log(σ_p/σ_q)): the form of Eq. (10).
    """
    n = np.prod(mean_q.shape[1:])
    ratio = (sigma_q / sigma_p) ** 2
    return 0.5 * (n * ratio - n + _sum_squares(mean_q - mean_p) / sigma_p**2 - n * jnp.log(ratio))


def level_kl(mu, u0_blurred_prev, sigma, delta):
    """L_{k−1} = D_KL[q(u_{k−1} | u0) ‖ p_θ(u_{k−1} | u_k)] of Eq. (10), one MC sample of u_k.

    Args:
      mu: μ_θ(u_k, k), the model mean.
      u0_blurred_prev: F(t_{k−1}) u0, the mean of q(u_{k−1} | u0).
    """
    return gaussian_kl(u0_blurred_prev, sigma, mu, delta)


def reconstruction_nll(mu, u0, delta):
    """L_0 = −log p_θ(u0 | u1) = ‖μ_θ(u1, 1) − u0‖²/(2δ²) + N log(δ√(2π)) of Eq. (11)."""
    n = np.prod(u0.shape[1:])
    return _sum_squares(mu - u0) / (2 * delta**2) + n * jnp.log(delta * jnp.sqrt(2 * jnp.pi))


def level_term(f, u0, k, eps, t, sigma, delta, backend='matmul'):
    """One Monte-Carlo sample of the level-k term of Eq. (32), per example.

    L_{k−1} of Eq. (10) for k ≥ 2 and L_0 of Eq. (11) for k = 1 (u_0 is the data itself, not a
    noisy latent), each from one draw û_k = F(t_k) u0 + σε. Summing over k = 1..K gives the
    negative ELBO without L_K; K times its mean over uniform k estimates the same sum.
    """
    u_k = perturbed_level(u0, k, eps, t, sigma, backend)
    mu = u_k + f(u_k, k)
    kl = level_kl(mu, heat.heat_forward(u0, t[k - 1], backend), sigma, delta)
    return jnp.where(k == 1, reconstruction_nll(mu, u0, delta), kl)


def prior_kl_upper_bound(u_K_mean, train_u_K, sigma, delta, chunk_size=1024):
    """Upper bound on L_K = D_KL[q(u_K | u0) ‖ p(u_K)] for the KDE prior, App. A.3 (Eqs. 36-42).

    p(u_K) = (1/N_T) Σ_i N(u_K | u_K^i, δ²I) over the blurred training set. With the optimal
    φ_i of Eq. (42), the bound of Eq. (41) becomes

        L_K ≤ log N_T − log Σ_i exp(−D_KL[q(u_K | u0) ‖ N(u_K^i, δ²I)]),

    evaluated with a running log-sum-exp over chunks of the training set, so the full
    (B, N_T) distance matrix is never held.

    Args:
      u_K_mean: F(t_K) u0 for the evaluated examples, (B, H, W, C).
      train_u_K: the blurred training set F(t_K) x_i, (N_T, H, W, C).
      sigma: training noise σ (the std of q(u_K | u0)).
      delta: the KDE bandwidth δ.
      chunk_size: training examples per chunk.
    Returns:
      The bound per example, (B,), in nats.
    """
    n_train = train_u_K.shape[0]
    a = u_K_mean.reshape(u_K_mean.shape[0], -1).astype(jnp.float32)
    b = train_u_K.reshape(n_train, -1).astype(jnp.float32)
    # Centring keeps ‖a‖² + ‖b‖² − 2a·b accurate in float32: blurred images are nearly constant.
    centre = jnp.mean(b, axis=0)
    a, b = a - centre, b - centre
    n = a.shape[1]
    chunk_size = min(chunk_size, n_train)
    n_chunks = -(-n_train // chunk_size)
    b = jnp.pad(b, ((0, n_chunks * chunk_size - n_train), (0, 0)))
    valid = jnp.arange(n_chunks * chunk_size) < n_train
    a_sq = jnp.sum(a * a, axis=1, keepdims=True)
    const = 0.5 * (n * (sigma / delta) ** 2 - n + 2 * n * jnp.log(delta / sigma))

    def chunk_logsumexp(acc, chunk):
        b_chunk, valid_chunk = chunk
        dist = (
            a_sq
            + jnp.sum(b_chunk * b_chunk, axis=1)
            - 2 * jnp.matmul(a, b_chunk.T, precision=_HIGHEST)
        )
        neg_kl = -(const + 0.5 * jnp.maximum(dist, 0.0) / delta**2)
        neg_kl = jnp.where(valid_chunk, neg_kl, -jnp.inf)
        return jnp.logaddexp(acc, jax.nn.logsumexp(neg_kl, axis=1)), None

    chunks = (b.reshape(n_chunks, chunk_size, n), valid.reshape(n_chunks, chunk_size))
    init = jnp.full((a.shape[0],), -jnp.inf, jnp.float32)
    log_sum, _ = jax.lax.scan(chunk_logsumexp, init, chunks)
    return np.log(n_train) - log_sum
