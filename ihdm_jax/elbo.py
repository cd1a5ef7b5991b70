"""The negative ELBO of a data set in bits/dim, over the mesh, for every process: the batch loop
here, the terms from the process (processes.Process.elbo_example and elbo_terms); for the heat
process Eq. 7 with the App. A.3 bound on L_K.

The randomness of test example i (its dequantisation noise or decoder draw, and the level and
noise of every pass) comes from fold_in(rng.elbo_key(seed), i), and the per-example terms are
combined on the host in example order, so the estimate does not depend on the batch size or the
number of devices (up to float32 rounding in the network: about 1e-7 relative).

A conditional model's ELBO is of log p(x | c): every test image is given its label (or the null
class, `null_class`), and the KDE prior's L_K is bounded against the training images of that
class (of all classes for the null class), the prior that sampling draws from.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from ihdm_jax import heat
from ihdm_jax import objective
from ihdm_jax import parallel
from ihdm_jax import processes
from ihdm_jax import programs
from ihdm_jax import rng
from ihdm_jax import state as state_lib
from ihdm_jax.evaluation import likelihood


def example_keys(key, index, num_passes):
    """(the example's own key, (num_passes,) pass keys) of the test example at `index`."""
    keys = jax.random.split(jax.random.fold_in(key, index), num_passes + 1)
    return keys[0], keys[1:]


def prior_bounds(
    mesh, u_K_means: np.ndarray, train_source, t_K, sigma, delta, chunk: int, progress=''
) -> np.ndarray:
    """The App. A.3 bounds on L_K (nats), (N,) float64, for means u_K_means = F(t_K) u0
    (N, H, W, C) of q(u_K | u0) against the whole training set blurred to t_K.

    The uint8 training images are read `chunk` at a time, each chunk replicated on every device
    and the examples split over the mesh; the chunks' bounds are merged exactly
    (likelihood.merge_prior_bounds).
    """

    def bound(replicated, batched):
        train_images, t_K, sigma, delta = replicated
        (u_K_mean,) = batched
        blurred = heat.heat_forward(train_images.astype(jnp.float32) / 255.0, t_K)
        return objective.prior_kl_upper_bound(u_K_mean, blurred, sigma, delta)

    program = programs.on_mesh(mesh, bound)
    scalars = tuple(jnp.float32(v) for v in (t_K, sigma, delta))
    bounds, sizes = [], []
    for start in tqdm.trange(
        0,
        len(train_source),
        chunk,
        desc=progress,
        unit='chunk',
        disable=not progress or not parallel.is_main_process(),
    ):
        x = train_source.load(np.arange(start, min(start + chunk, len(train_source))))
        bounds.append(program((x,) + scalars, u_K_means))
        sizes.append(len(x))
    return likelihood.merge_prior_bounds(bounds, sizes)


class _Subset:
    """The images of a source at `indices`, as a source."""

    def __init__(self, source, indices):
        self.source, self.indices = source, indices

    def __len__(self):
        return len(self.indices)

    def load(self, indices):
        return self.source.load(self.indices[indices])


def class_prior_bounds(u_K_means, labels, train_source, **kwargs) -> np.ndarray:
    """prior_bounds of each example against the training images of its class: the L_K of the
    KDE prior p(u_K | c) (conditioning.class_picks)."""
    bounds = np.empty(len(u_K_means), np.float64)
    for c in np.unique(labels):
        mine = labels == c
        members = np.flatnonzero(train_source.labels == c)
        bounds[mine] = prior_bounds(
            u_K_means=u_K_means[mine], train_source=_Subset(train_source, members), **kwargs
        )
    return bounds


@dataclasses.dataclass(frozen=True)
class Result:
    """The negative ELBO of a test set: bits_per_dim = offset + L_K + sum_L_k + L_0, the terms
    in bits/dim (offset 8 for dequantised data, 0 for a discrete likelihood); nats_per_image;
    level_nats, the mean term of each level k = 1..K in nats (level k holds L_{k−1}; None where
    no draw fell on it); the numbers of test and training images."""

    bits_per_dim: float
    L_K: float
    sum_L_k: float
    L_0: float
    nats_per_image: float
    level_nats: list
    offset: float
    num_examples: int
    num_train: int


class NegativeElbo:
    """The negative ELBO of the test split for given parameters and δ, in bits/dim.

    The process's terms of config.evaluation.num_passes passes over the first
    config.evaluation.num_examples test images (0 = all); a KDE prior's L_K is bounded against
    the whole training set, config.evaluation.train_chunk images at a time. A conditional model
    is given each test image's label, or with `null_class` the null class (module docstring).
    """

    def __init__(self, config, mesh, test_source, train_source, null_class=False):
        self.config, self.mesh = config, mesh
        self.test, self.train = test_source, train_source
        self.num_examples = min(
            config.evaluation.num_examples or len(test_source), len(test_source)
        )
        self.process = process = processes.from_config(config)
        key = rng.elbo_key(config.seed)
        f = programs.residual(state_lib.model_graphdef(config))
        num_passes = config.evaluation.num_passes
        self.null_class = null_class
        self.labels = None  # the network's label of each test image (conditional models)
        if config.model.num_classes:
            null = config.model.num_classes
            self.labels = np.full(len(test_source), null, np.int32)
            if not null_class:
                self.labels = test_source.labels.astype(np.int32)

        def terms(replicated, batched):
            params, delta = replicated
            x, index, *labels = batched

            def example(x_i, index_i, *label_i):
                example_key, pass_keys = example_keys(key, index_i, num_passes)
                label = label_i[0][None] if label_i else None
                return process.elbo_example(
                    lambda u, k: f(params, u, k, label), x_i[None], example_key, pass_keys, delta
                )

            return jax.vmap(example)(x, index, *labels)

        self._terms = programs.on_mesh(mesh, terms)

    def __call__(self, params, delta: float) -> Result:
        size = self.config.evaluation.batch_size
        parts = []
        with tqdm.tqdm(
            total=self.num_examples,
            desc='ELBO',
            unit='image',
            disable=not parallel.is_main_process(),
        ) as bar:
            for start in range(0, self.num_examples, size):
                # Whole batches (one compiled shape); the rows past the end are cut.
                valid = min(size, self.num_examples - start)
                index = np.minimum(start + np.arange(size), self.num_examples - 1)
                labels = () if self.labels is None else (self.labels[index],)
                out = self._terms(
                    (params, jnp.float32(delta)),
                    self.test.load(index),
                    index.astype(np.int32),
                    *labels,
                )
                parts.append([np.asarray(o[:valid], np.float64) for o in out])
                bar.update(valid)
        outputs = tuple(np.concatenate(p) for p in zip(*parts))
        kde_bound = functools.partial(
            prior_bounds,
            self.mesh,
            train_source=self.train,
            chunk=self.config.evaluation.train_chunk,
            progress='ELBO L_K bound',
        )
        if self.labels is not None and not self.null_class:
            kde_bound = functools.partial(
                class_prior_bounds,
                labels=self.labels[: self.num_examples],
                train_source=self.train,
                mesh=self.mesh,
                chunk=self.config.evaluation.train_chunk,
                progress='ELBO L_K bound',
            )
        terms = self.process.elbo_terms(outputs, delta, kde_bound)
        dims = int(np.prod(self.test.load(np.arange(1)).shape[1:]))
        per_dim = 1.0 / (dims * np.log(2.0))
        return Result(
            bits_per_dim=float(terms.nats / (dims * np.log(2.0)) + self.process.bits_offset),
            L_K=terms.L_K * per_dim,
            sum_L_k=terms.sum_L_k * per_dim,
            L_0=terms.L_0 * per_dim,
            nats_per_image=terms.nats,
            level_nats=terms.level_nats,
            offset=self.process.bits_offset,
            num_examples=self.num_examples,
            num_train=len(self.train),
        )
