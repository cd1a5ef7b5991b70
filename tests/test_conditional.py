"""Class-conditional models with classifier-free guidance (ihdm_jax/conditioning.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ihdm_jax import conditioning
from ihdm_jax import data
from ihdm_jax import errors
from ihdm_jax import loading
from ihdm_jax import main
from ihdm_jax import parallel
from ihdm_jax import processes
from ihdm_jax import programs
from ihdm_jax import rng
from ihdm_jax import validation
from ihdm_jax import workdir as workdir_lib
from ihdm_jax.models import unet
from tests.conftest import perturbed

NUM_CLASSES = 10


def _conditional(config, **model):
    config = config.copy_and_resolve_references()
    config.model.num_classes = NUM_CLASSES
    # Two channels per GroupNorm group: with one, the norm cancels the time and class
    # embedding (docs/processes.md).
    config.model.num_groups = 16
    for key, value in model.items():
        config.model[key] = value
    return config


def _toy_network(u, k, labels):
    """A residual that depends on u, k and the label in different ways per label."""
    scale = (labels.astype(jnp.float32) + 1.0)[:, None, None, None]
    level = jnp.asarray(k, jnp.float32)[:, None, None, None]
    return jnp.sin(scale * u + 0.01 * level) * 0.1 / scale


@pytest.mark.parametrize('process', ['heat', 'heat_continuous', 'ddpm', 'blurring'])
def test_the_guided_mean_is_the_float64_combination_of_both_means(config, process):
    """μ̃ = μ(u, k, ∅) + w (μ(u, k, c) − μ(u, k, ∅)) for every process: the mean of each
    process is affine in the network's output, so guiding f guides μ."""
    c = _conditional(config, process=process, K=10)
    proc = processes.from_config(c)
    u = jax.random.uniform(jax.random.key(1), (6, 8, 8, 1), jnp.float32, -1.0, 1.0)
    labels = jnp.array([0, 3, 9, 10, 5, 1], jnp.int32)  # 10: the null class
    w = 2.5

    def mean(f):
        return np.asarray(jax.jit(lambda u: proc.mean(f, u, 4))(u), np.float64)

    guided = mean(conditioning.guided(_toy_network, labels, NUM_CLASSES, w))
    with_label = mean(lambda u, k: _toy_network(u, k, labels))
    without = mean(lambda u, k: _toy_network(u, k, jnp.full_like(labels, NUM_CLASSES)))
    reference = without + w * (with_label - without)
    # float32 rounding of the means, which blurring's coefficients scale up
    np.testing.assert_allclose(guided, reference, atol=2e-6 * max(1.0, np.abs(reference).max()))
    assert np.abs(with_label - without).max() > 1e-3  # the label matters


def test_the_sampler_s_guided_network_and_labels(config):
    """The network inside Sampler.run (labels padded and sharded with the batch, −1 the null
    class) against the float64 combination of the U-Net's two outputs."""
    c = _conditional(config)
    graphdef, params = unet.init(c, rng.init_key(c.seed))
    params = perturbed(params, 3, 0.05)  # far from the zero-initialised output
    sampler = programs.Sampler(c, parallel.make_mesh())
    u = np.asarray(jax.random.uniform(jax.random.key(2), (5, 8, 8, 1)), np.float32)
    k = np.array([1, 4, 10, 7, 2], np.int32)
    labels = np.array([0, 3, -1, 9, 3])
    out = sampler.run(_network_of_chain, params, u, k, labels=labels, guidance=3.0)

    def apply(c_labels):
        return np.asarray(unet.apply(graphdef, params, u, k, train=False, labels=c_labels))

    with_label = apply(conditioning.network_labels(labels, NUM_CLASSES)).astype(np.float64)
    without = apply(np.full(5, NUM_CLASSES, np.int32)).astype(np.float64)
    np.testing.assert_allclose(out, without + 3.0 * (with_label - without), atol=1e-5)
    np.testing.assert_allclose(out[2], without[2], atol=1e-6)  # −1: no class, no guidance
    assert np.abs(with_label - without).max() > 1e-3


def _network_of_chain(chain, u, k):
    return chain.f(u, k)


def test_label_dropout_replaces_labels_by_the_null_class_at_its_rate():
    labels = jnp.asarray(np.arange(200_000) % NUM_CLASSES, jnp.int32)
    dropped = np.asarray(conditioning.drop_labels(jax.random.key(0), labels, 0.15, NUM_CLASSES))
    null = dropped == NUM_CLASSES
    n = len(labels)
    assert abs(null.mean() - 0.15) < 5 * np.sqrt(0.15 * 0.85 / n)  # a 5σ binomial band
    np.testing.assert_array_equal(dropped[~null], np.asarray(labels)[~null])
    assert not np.any(
        np.asarray(conditioning.drop_labels(jax.random.key(0), labels, 0.0, 10)) == 10
    )


def test_the_class_prior_picks_training_images_of_the_class_uniformly():
    image_labels = np.array([0, 1, 1, 2, 1, 0, 2, 2, 2, 1])
    labels = np.array([1] * 4000 + [conditioning.NULL] * 4000)
    picks = conditioning.class_picks(np.random.default_rng(0), labels, image_labels)
    ones = picks[:4000]
    assert set(ones) == {1, 2, 4, 9}  # all the images of class 1, and only those
    counts = np.bincount(ones, minlength=10)[[1, 2, 4, 9]]
    assert np.abs(counts - 1000).max() < 5 * np.sqrt(1000 * 0.75)
    assert set(picks[4000:]) == set(range(10))  # no class: all images


def test_an_unconditional_u_net_keeps_its_parameters(config):
    """num_classes = 0 adds nothing; a conditional U-Net adds only the class embedding and
    draws every other parameter as the unconditional one does."""
    _, plain = unet.init(config, rng.init_key(0))
    _, conditional = unet.init(_conditional(config), rng.init_key(0))
    plain = dict(jax.tree_util.tree_flatten_with_path(plain)[0])
    conditional = dict(jax.tree_util.tree_flatten_with_path(conditional)[0])
    extra = set(conditional) - set(plain)
    assert set(plain) <= set(conditional)
    assert {str(path[0]) for path in extra} == {"['class_embed']"}
    assert conditional[next(iter(extra))].shape == (NUM_CLASSES + 1, 4 * 32)
    for path, value in plain.items():
        np.testing.assert_array_equal(value, conditional[path])


def _write_folder(root, classes, per_class=3):
    """Image j of class `name` has the value 30 · (the name's place in sorted order) + j."""
    for name in classes:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for j in range(per_class):
            pixels = np.full((8, 8), 30 * sorted(classes).index(name) + j, np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, name, f'{j}.png'))
    return str(root)


def _folder_config(config, folder, num_classes):
    c = config.copy_and_resolve_references()
    c.data.dataset, c.data.data_dir, c.model.num_classes = 'folder', folder, num_classes
    return c


def test_folder_classes_are_its_subfolders_and_kept_in_the_run_s_config(
    config, tmp_path, monkeypatch
):
    folder = _write_folder(tmp_path / 'train', ['dog', 'cat', 'wild'])
    c = _folder_config(config, folder, 3)
    data.check(c)
    data.resolve_classes(c)
    assert tuple(c.data.classes) == ('cat', 'dog', 'wild')
    source = data.make_source(c)
    np.testing.assert_array_equal(source.labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(source.load(np.array([3]))[0, 0, 0], [30])  # dog/0.png

    # Resume: the run's config.json keeps the names; a relaunch resolves the same ones, and its
    # batches carry the same labels.
    workdir = str(tmp_path / 'run')
    workdir_lib.save_config(c, workdir)
    saved = workdir_lib.read_config(workdir)
    assert tuple(saved.data.classes) == ('cat', 'dog', 'wild')
    relaunch = _folder_config(config, folder, 3)
    data.resolve_classes(relaunch)
    assert workdir_lib.config_differences(relaunch, workdir, training=True) == []
    sharding = parallel.batch_sharding(parallel.make_mesh())
    batches = [data.make_loader(s, data.make_source(s), sharding).batch(5) for s in (c, saved)]
    for images, labels in batches:
        np.testing.assert_array_equal(
            np.asarray(labels),
            source.labels[data.make_loader(c, source, sharding).batch_indices(5)],
        )
        np.testing.assert_array_equal(np.round(np.asarray(images)[:, 0, 0, 0] * 255) // 30, labels)
    np.testing.assert_array_equal(np.asarray(batches[0][0]), np.asarray(batches[1][0]))


def test_a_conditional_model_of_a_folder_needs_class_subfolders(config, tmp_path):
    flat = tmp_path / 'flat'
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(flat / 'a.png')
    with pytest.raises(errors.UserError, match='outside any subfolder'):
        data.check(_folder_config(config, str(flat), 2))
    data.check(_folder_config(config, str(flat), 0))  # unconditional: fine
    folder = _write_folder(tmp_path / 'two', ['a', 'b'])
    with pytest.raises(errors.UserError, match='num_classes=3 does not match'):
        data.check(_folder_config(config, folder, 3))
    renamed = _folder_config(config, folder, 2)
    renamed.data.classes = ('a', 'c')
    with pytest.raises(errors.UserError, match='differing: b'):
        data.check(renamed)


def test_bad_conditional_settings_are_named(config):
    for change, match in (
        (lambda c: setattr(c.sampling, 'labels', (1, 10)), r'labels=\(1, 10\)'),
        (lambda c: setattr(c.sampling, 'guidance', -1.0), 'guidance=-1.0'),
        (lambda c: setattr(c.training, 'label_dropout', 1.0), 'label_dropout=1.0'),
    ):
        c = _conditional(config)
        change(c)
        with pytest.raises(errors.UserError, match=match):
            validation.check_config(c)
    c = config.copy_and_resolve_references()
    c.sampling.labels = (1,)
    with pytest.raises(errors.UserError, match='for conditional models'):
        validation.check_config(c)
    c = _conditional(config)
    c.data.dataset, c.data.image_size = 'digits', 8
    c.model.num_classes = 3
    with pytest.raises(errors.UserError, match='10 classes'):
        data.check(c)


def test_tfds_labels(config):
    c = _conditional(config)
    c.data.dataset, c.data.image_size = 'mnist', 28
    with tfds.testing.mock_data(num_examples=12):
        source = data.make_source(c)
        labels = source.labels
    assert labels.shape == (12,) and labels.dtype == np.int32
    assert 0 <= labels.min() and labels.max() < NUM_CLASSES


def test_a_conditional_run_trains_samples_the_asked_classes_and_evaluates(config, tmp_path):
    """Training on the digits' labels, --mode=sample of the labels in turn (written with the
    samples), the API's labels and guidance, a variant, and --mode=eval given the label and
    given ∅."""
    c = _conditional(config)
    c.training.n_iters, c.training.snapshot_freq = 2, 2
    c.optim.lr, c.optim.warmup = 0.05, 0  # two large steps: f far from 0, labels that matter
    c.sampling.labels = (7, -1, 2)
    c.evaluation.num_examples, c.evaluation.num_passes = 8, 10
    workdir = str(tmp_path / 'run')
    main.run(c, 'train', workdir)
    main.run(c, 'sample', workdir)
    saved = np.load(os.path.join(workdir, 'samples', 'samples.npz'))
    np.testing.assert_array_equal(saved['labels'], [7, -1, 2, 7, -1, 2, 7, -1])
    model = loading.load(workdir)
    key = rng.sample_key(c.seed)
    floats = model.sample(key, 8, labels=saved['labels'])
    assert np.abs(np.round(np.clip(floats, 0, 1) * 255) - saved['images']).max() <= 1
    unguided = model.sample(key, 8, labels=saved['labels'], guidance=0.0)
    assert np.abs(unguided - floats).max() > 1e-4
    with pytest.raises(errors.UserError, match='class indices'):
        model.sample(key, 2, labels=[3, 12])
    restored = model.restore(np.clip(floats[:2], 0, 1), key, blur_sigma=1.0)  # given ∅
    assert restored.shape == (2, 1, 8, 8, 1) and np.isfinite(restored).all()
    c.analysis.num_rows, c.analysis.num_columns = 3, 2
    main.run(c, 'same_init', workdir)  # one class of sampling.labels per row
    rows = np.load(os.path.join(workdir, 'analysis', 'same_init', 'same_init.npz'))['images']
    assert rows.shape == (3, 2, 8, 8, 1)
    with pytest.raises(errors.UserError, match='not defined for a conditional model'):
        main.run(c, 'interpolate', workdir)
    main.run(c, 'eval', workdir)
    with open(os.path.join(workdir, 'eval', 'likelihood.json')) as f:
        result = json.load(f)
    assert result['given'] == 'label'
    assert result['bits_per_dim'] != result['null_class']['bits_per_dim']
    assert result['L_K'] != result['null_class']['L_K']  # the KDE prior of the class
