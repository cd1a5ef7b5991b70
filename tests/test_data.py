"""Data sources and the loader: determinism, sharding, preprocessing, tfds without TensorFlow."""

import io
import logging
import os
import sys
import tempfile

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits

from configs import tiny
from ihdm_jax import data
from ihdm_jax import errors
from ihdm_jax import parallel
from ihdm_jax import rng
from ihdm_jax import validation


@pytest.fixture(scope='module')
def sharding():
    return parallel.batch_sharding(parallel.make_mesh())


@pytest.fixture(scope='module')
def digits():
    return data.ArraySource(data.digits_images(16))


def _loader(source, sharding, seed=0, batch_size=24, random_flip=False):
    shape = source.load(np.zeros(1, np.int64)).shape[1:]
    return data.Loader(source, shape, batch_size, sharding, seed, random_flip)


def test_digits_images():
    images = data.digits_images(16)
    assert images.shape == (1797, 16, 16, 1) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() >= 250
    assert data.digits_images(8).max() == 255  # 16 levels map to 255 when not resized
    np.testing.assert_array_equal(
        data.digits_images(8)[..., 0], np.round(load_digits().images * (255 / 16))
    )


def test_batches_are_a_function_of_seed_and_step(digits, sharding):
    first, second = _loader(digits, sharding), _loader(digits, sharding)
    for step in (0, 7, 75, 1000):
        np.testing.assert_array_equal(first.batch_indices(step), second.batch_indices(step))
    other_seed = _loader(digits, sharding, seed=1)
    assert not np.array_equal(first.batch_indices(0), other_seed.batch_indices(0))


def test_every_epoch_visits_each_image_once(digits, sharding):
    loader = _loader(digits, sharding)
    n = len(digits)
    steps = -(-2 * n // loader.batch_size) + 1
    stream = np.concatenate([loader.batch_indices(s) for s in range(steps)])
    for epoch in range(2):
        np.testing.assert_array_equal(np.sort(stream[epoch * n : (epoch + 1) * n]), np.arange(n))
    assert not np.array_equal(stream[:n], stream[n : 2 * n])


def test_global_batch_is_sharded_over_all_devices(digits, sharding):
    loader = _loader(digits, sharding)
    batch = loader.batch(5)
    assert isinstance(batch, jax.Array) and batch.shape == (24, 16, 16, 1)
    assert batch.dtype == np.float32 and len(batch.sharding.device_set) == 8
    assert {shard.data.shape[0] for shard in batch.addressable_shards} == {3}
    expected = digits.load(loader.batch_indices(5)) / 255.0
    np.testing.assert_allclose(np.asarray(batch), expected, rtol=1e-6)
    prefetched = loader.batches(4)
    for step in (4, 5, 6):
        np.testing.assert_array_equal(np.asarray(next(prefetched)), np.asarray(loader.batch(step)))
    prefetched.close()


def test_random_flips_are_deterministic(digits, sharding):
    plain = np.asarray(_loader(digits, sharding).batch(3))
    flipped = np.asarray(_loader(digits, sharding, random_flip=True).batch(3))
    mirrored = plain[:, :, ::-1]
    is_flipped = np.all(flipped == mirrored, axis=(1, 2, 3))
    assert np.all(is_flipped | np.all(flipped == plain, axis=(1, 2, 3)))
    asymmetric = ~np.all(plain == mirrored, axis=(1, 2, 3))
    assert 0 < np.sum(is_flipped & asymmetric) < np.sum(asymmetric)
    np.testing.assert_array_equal(
        flipped, np.asarray(_loader(digits, sharding, random_flip=True).batch(3))
    )


def test_prior_picks_are_fixed_per_seed_and_draw():
    picks = rng.prior_picks(0, 0, 64, 1500)
    assert picks.shape == (64,) and picks.min() >= 0 and picks.max() < 1500
    np.testing.assert_array_equal(picks, rng.prior_picks(0, 0, 64, 1500))
    assert not np.array_equal(picks, rng.prior_picks(0, 1, 64, 1500))
    assert not np.array_equal(picks, rng.prior_picks(1, 0, 64, 1500))
    assert len(np.unique(rng.prior_picks(0, 0, 10_000, 3))) == 3


def test_batch_size_must_split_over_devices(config):
    with pytest.raises(
        errors.UserError,
        match=r'=12 must be a multiple of the number of '
        r'devices \(8\)',
    ):
        parallel.check_divisible(12, 'config.training.batch_size')
    parallel.check_divisible(config.training.batch_size, 'config.training.batch_size')


def _save(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _halve(pixels):
    """A 2x2 box filter as PIL applies it to uint8 images: the columns are averaged in pairs and
    rounded (half up), then the rows of that result."""
    a = pixels.astype(np.int64)
    columns = (a[:, 0::2] + a[:, 1::2] + 1) // 2
    return ((columns[0::2] + columns[1::2] + 1) // 2).astype(np.uint8)


def _bicubic(pixels, width, height):
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    resized = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))
    return resized.reshape(height, width, pixels.shape[-1])


def test_folder_images_are_halved_resized_then_cropped_as_the_original_code_does(tmp_path):
    """Landscape RGB 96x160 to 10: halved to 48x80, 24x40 and 12x20 (12 < 2·10), resized to
    10x17 (the long side round(20·10/12)) and cropped at columns 3..12. Portrait grayscale
    100x60 to 8: halved to 50x30 and 25x15, resized to 13x8, cropped at rows 2..9. A square
    64x64 to 16: halved twice (32 ≥ 2·16), then kept."""
    generator = np.random.default_rng(0)
    wide = generator.integers(0, 256, (96, 160, 3), dtype=np.uint8)
    tall = generator.integers(0, 256, (100, 60, 1), dtype=np.uint8)
    square = generator.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    _save(tmp_path / 'wide' / 'cats' / 'a.png', wide)
    _save(tmp_path / 'tall' / 'b.png', tall[..., 0])
    _save(tmp_path / 'square' / 'c.png', square)

    source = data.FolderSource(str(tmp_path / 'wide'), 10, 3)
    expected = _bicubic(_halve(_halve(_halve(wide))), 17, 10)[:, 3:13]
    np.testing.assert_array_equal(source.load(np.array([0])), expected[None])
    gray = data.FolderSource(str(tmp_path / 'tall'), 8, 1).load(np.array([0]))
    expected = _bicubic(_halve(_halve(tall)), 8, 13)[2:10]
    np.testing.assert_array_equal(gray, expected[None])
    halved = data.FolderSource(str(tmp_path / 'square'), 16, 3).load(np.array([0]))
    np.testing.assert_array_equal(halved, _halve(_halve(square))[None])
    # Not the crop-then-resize of the tfds images: the 64 central columns of the wide image,
    # resized, differ.
    assert not np.array_equal(source.load(np.array([0]))[0], data.center_crop_resize(wide, 10))


def test_folder_source_reads_every_image_file_below_its_folder(tmp_path):
    _save(tmp_path / 'cats' / 'a.png', np.full((20, 30, 3), 90, np.uint8))
    _save(tmp_path / 'dogs' / 'b.jpg', np.full((40, 40, 3), 90, np.uint8))
    source = data.FolderSource(str(tmp_path), 16, 3)
    assert len(source) == 2
    images = source.load(np.array([0, 1]))
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert np.all(np.abs(images.astype(int) - 90) <= 2)
    gray = data.FolderSource(str(tmp_path), 8, 1).load(np.array([1]))
    assert gray.shape == (1, 8, 8, 1)
    assert not source.skipped


def test_prepared_images_are_cached_up_to_cache_mb(tmp_path):
    generator = np.random.default_rng(0)
    for i in range(3):
        _save(tmp_path / f'{i}.png', generator.integers(0, 256, (24, 20, 3), np.uint8))
    uncached = data.FolderSource(str(tmp_path), 8, 3).load(np.arange(3))
    cached = data.FolderSource(str(tmp_path), 8, 3, cache_mb=2 * 8 * 8 * 3 / 2**20)
    np.testing.assert_array_equal(cached.load(np.array([2, 0, 1])), uncached[[2, 0, 1]])
    assert sorted(cached.cache) == [0, 2]  # room for two 8x8x3 images
    for i in range(3):
        (tmp_path / f'{i}.png').unlink()
    np.testing.assert_array_equal(cached.load(np.array([0, 2])), uncached[[0, 2]])
    config = tiny.get_config()
    config.data.cache_mb = -1
    with pytest.raises(errors.UserError, match='config.data.cache_mb=-1 is negative'):
        validation.check_values(config)


def _folder_config(tmp_path, channels=1):
    config = tiny.get_config()
    config.data.dataset = 'afhq'
    config.data.num_channels = channels
    config.data.data_dir = str(tmp_path / 'train')
    return config


def test_check_names_bad_data_settings(tmp_path):
    config = tiny.get_config()
    data.check(config)
    config.data.dataset = 'imagenet'
    with pytest.raises(errors.UserError, match="dataset='imagenet' is not known"):
        data.check(config)
    config = tiny.get_config()
    config.data.num_channels = 3
    with pytest.raises(
        errors.UserError, match='num_channels=3 does not match digits, whose images have 1'
    ):
        data.check(config)
    config = tiny.get_config()
    config.data.dataset = 'cifar10'
    config.data.num_channels = 3
    with pytest.raises(errors.UserError, match='image_size=8 does not match cifar10'):
        data.check(config)

    config = _folder_config(tmp_path)
    config.data.data_dir = ''
    with pytest.raises(errors.UserError, match='set --config.data.data_dir'):
        data.check(config)
    config.data.data_dir = str(tmp_path / 'missing')
    with pytest.raises(errors.UserError, match='data_dir=.*missing.* does not exist'):
        data.check(config)
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'notes.txt').write_text('not an image')
    config.data.data_dir = str(tmp_path / 'empty')
    with pytest.raises(errors.UserError, match='data_dir=.*empty.* holds no image files'):
        data.check(config)


def test_digits_hold_out_their_last_297_images_for_testing():
    config = tiny.get_config()
    everything = data.digits_images(8)
    train = data.make_source(config, 'train')
    test = data.make_source(config, 'test')
    assert (len(train), len(test)) == (1500, 297)
    np.testing.assert_array_equal(train.load(np.arange(1500)), everything[:1500])
    np.testing.assert_array_equal(test.load(np.arange(297)), everything[1500:])


def test_image_folders_take_their_test_split_from_test_dir(tmp_path):
    _save(tmp_path / 'train' / 'a.png', np.full((8, 8, 3), 10, np.uint8))
    for name in ('b', 'c'):
        _save(tmp_path / 'test' / f'{name}.png', np.full((8, 8, 3), 200, np.uint8))
    config = _folder_config(tmp_path, channels=3)
    data.check(config, 'train')
    with pytest.raises(errors.UserError, match='set --config.data.test_dir'):
        data.check(config, 'test')
    config.data.test_dir = str(tmp_path / 'test')
    data.check(config, 'test')
    test = data.make_source(config, 'test')
    assert len(test) == 2 and test.load(np.array([1])).min() == 200
    assert len(data.make_source(config, 'train')) == 1
    config.data.test_dir = str(tmp_path / 'elsewhere')
    with pytest.raises(errors.UserError, match='test_dir=.*elsewhere.* does not exist'):
        data.check(config, 'test')
    data.check(config, 'train')


def _messages(caplog, level, text):
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


def _corrupt(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).bytes(300))


@pytest.fixture
def damaged(tmp_path):
    """train/: a.png (grey 10), b.png (corrupt), c.png (grey 30), d.png (grey 40), e.png
    (corrupt, the last file)."""
    for name, level in (('a', 10), ('c', 30), ('d', 40)):
        _save(tmp_path / 'train' / f'{name}.png', np.full((8, 8), level, np.uint8))
    _corrupt(tmp_path / 'train' / 'b.png', 0)
    _corrupt(tmp_path / 'train' / 'e.png', 1)
    return tmp_path


def test_unreadable_images_are_replaced_by_the_next_readable_one(damaged, caplog, sharding):
    caplog.set_level(logging.INFO)
    config = _folder_config(damaged)
    data.check(config)
    source = data.make_source(config)
    assert source.paths == [str(damaged / 'train' / f'{c}.png') for c in 'abcde']
    # b is read as c, the next file; e, the last, as a (the order wraps around).
    in_place = np.array([10, 30, 30, 40, 10])
    levels = source.load(np.array([0, 1, 2, 3, 4, 1, 4, 1]))[:, 0, 0, 0]
    np.testing.assert_array_equal(levels, in_place[[0, 1, 2, 3, 4, 1, 4, 1]])
    assert sorted(os.path.basename(source.paths[i]) for i in source.skipped) == ['b.png', 'e.png']
    for name in ('b.png', 'e.png'):
        warnings = _messages(caplog, logging.WARNING, name)
        assert len(warnings) == 1 and 'cannot be read as an image' in warnings[0]

    loader = data.make_loader(config, data.make_source(config), sharding)
    for step in (0, 1, 2):
        expected = in_place[loader.batch_indices(step)] / 255.0
        np.testing.assert_allclose(np.asarray(loader.batch(step))[:, 0, 0, 0], expected, rtol=1e-6)
    assert len(_messages(caplog, logging.WARNING, 'b.png')) == 2  # once per source
    data.report_skipped(source, loader.source)
    assert _messages(caplog, logging.WARNING, '4 unreadable image file(s) were skipped')


def test_a_folder_of_unreadable_files_is_an_error(tmp_path):
    for i in range(3):
        _corrupt(tmp_path / f'{i}.png', i)
    source = data.FolderSource(str(tmp_path), 8, 1)
    with pytest.raises(errors.UserError, match='None of the 3 image files .* can be read'):
        source.load(np.array([1]))
    assert len(source.skipped) == 3


def test_gray_images_convert_to_rgb_with_one_log_line(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    for i in range(12):
        _save(tmp_path / f'{i:02d}.png', np.full((8, 8), 20 * i, np.uint8))
    source = data.FolderSource(str(tmp_path), 8, 3)
    images = source.load(np.arange(12))
    assert images.shape == (12, 8, 8, 3)
    np.testing.assert_array_equal(
        images,
        np.broadcast_to((20 * np.arange(12, dtype=np.uint8))[:, None, None, None], images.shape),
    )
    source.load(np.arange(12))
    assert len(_messages(caplog, logging.INFO, 'Converting images of mode L')) == 1


@pytest.mark.parametrize('name,size,channels', [('mnist', 28, 1), ('cifar10', 32, 3)])
def test_tfds_datasets_through_mock_data(sharding, name, size, channels):
    config = tiny.get_config()
    config.data.dataset = name
    config.data.image_size = size
    config.data.num_channels = channels
    with tfds.testing.mock_data(num_examples=20):
        loader = data.make_loader(config, data.make_source(config), sharding)
    assert len(loader.source) == 20
    batch = np.asarray(loader.batch(3))
    assert batch.shape == (8, size, size, channels) and batch.dtype == np.float32
    assert 0.0 <= batch.min() and batch.max() <= 1.0 and batch.std() > 0
    with tfds.testing.mock_data(num_examples=6):
        test = data.make_source(config, 'test')
    assert len(test) == 6 and test.examples.split == 'test'


class TinyPngImages(tfds.core.GeneratorBasedBuilder):
    """A prepared-offline tfds data set; PNG bytes keep its preparation free of TensorFlow."""

    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({'image': tfds.features.Image(shape=(12, 10, 3))}),
        )

    def _split_generators(self, dl_manager):
        return {'train': self._generate_examples()}

    def _generate_examples(self):
        for i in range(6):
            png = io.BytesIO()
            Image.fromarray(np.full((12, 10, 3), 40 * i, np.uint8)).save(png, format='PNG')
            yield i, {'image': png.getvalue()}


def test_tfds_source_reads_array_record_without_tensorflow(tmp_path):
    TinyPngImages(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
    source = data.TfdsSource('tiny_png_images', str(tmp_path), 8)
    images = source.load(np.arange(6))
    assert images.shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(np.sort(images[:, 0, 0, 0]), 40 * np.arange(6))
    assert 'tensorflow' not in sys.modules


class FakeMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """MNIST as tfds would prepare it, 16 examples made here instead of downloaded (PNG bytes
    keep the preparation free of TensorFlow); counts its preparations."""

    name = 'mnist'
    VERSION = tfds.core.Version('3.0.1')
    prepared = 0

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    'image': tfds.features.Image(shape=(28, 28, 1)),
                    'label': tfds.features.ClassLabel(num_classes=10),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        FakeMnist.prepared += 1
        return {'train': self._generate_examples(16), 'test': self._generate_examples(4)}

    def _generate_examples(self, count):
        for i in range(count):
            png = io.BytesIO()
            Image.fromarray(np.full((28, 28), 15 * i, np.uint8)).save(png, format='PNG')
            yield i, {'image': png.getvalue(), 'label': i % 10}


def _mnist_config(data_dir):
    config = tiny.get_config()
    config.data.dataset, config.data.image_size = 'mnist', 28
    config.data.data_dir = str(data_dir)
    config.analysis.num_images = 8
    return config


def test_without_the_prepare_extra_an_unprepared_tfds_set_names_the_command(tmp_path, monkeypatch):
    from ihdm_jax import main

    monkeypatch.setattr(data, 'PREPARE_PACKAGE', 'a_package_that_is_not_installed')
    monkeypatch.setattr(
        data,
        'tfds_builder',
        lambda name, data_dir: FakeMnist(data_dir=data_dir, file_format='array_record'),
    )
    with pytest.raises(errors.UserError) as refused:
        main.run(_mnist_config(tmp_path / 'tfds'), 'train', str(tmp_path / 'run'))
    assert str(refused.value) == (
        f"The tfds data set 'mnist' is not prepared in {tmp_path / 'tfds' / 'mnist' / '3.0.1'}, "
        'and preparing it needs a_package_that_is_not_installed. Install it in this repository '
        "with `python -m pip install -e '.[prepare]'`; the first run then downloads and prepares "
        'the data set itself. (Or prepare it on another machine and set --config.data.data_dir '
        'to its tfds data directory.)'
    )
    assert not (tmp_path / 'run').exists() and not (tmp_path / 'tfds').exists()


def test_with_the_prepare_extra_the_first_run_prepares_the_data_once(tmp_path, monkeypatch):
    from ihdm_jax import main

    monkeypatch.setattr(data, 'PREPARE_PACKAGE', 'numpy')  # stands in for TensorFlow
    monkeypatch.setattr(
        data,
        'tfds_builder',
        lambda name, data_dir: FakeMnist(data_dir=data_dir, file_format='array_record'),
    )
    FakeMnist.prepared = 0
    config = _mnist_config(tmp_path / 'tfds')
    main.run(config, 'psd', str(tmp_path / 'run'))
    assert FakeMnist.prepared == 1
    assert (tmp_path / 'run' / 'analysis' / 'psd' / 'psd.png').is_file()
    data.prepare(config)
    assert FakeMnist.prepared == 1
    train, test = data.make_source(config), data.make_source(config, 'test')
    assert (len(train), len(test)) == (16, 4)
    np.testing.assert_array_equal(
        np.sort(train.load(np.arange(16))[:, 0, 0, 0]), 15 * np.arange(16)
    )
    assert 'tensorflow' not in sys.modules


def test_a_tfds_set_for_a_gs_data_dir_is_prepared_locally_and_copied_there(
    tmp_path, monkeypatch, fake_gcs
):
    monkeypatch.setattr(data, 'PREPARE_PACKAGE', 'numpy')  # stands in for TensorFlow
    monkeypatch.setattr(
        data,
        'tfds_builder',
        lambda name, data_dir: FakeMnist(data_dir=data_dir, file_format='array_record'),
    )
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
    FakeMnist.prepared = 0
    config = _mnist_config('gs://bucket/tfds')
    data.check(config)
    data.prepare(config)
    assert FakeMnist.prepared == 1 and not list(tmp_path.glob('*/mnist'))  # removed
    remote = sorted(path.removeprefix('gs://bucket/tfds/mnist/3.0.1/') for path in fake_gcs)
    assert remote == [
        'dataset_info.json',
        'features.json',
        'mnist-test.array_record-00000-of-00001',
        'mnist-train.array_record-00000-of-00001',
    ]
    assert list(fake_gcs)[-1].endswith('dataset_info.json')
    assert FakeMnist(data_dir='gs://bucket/tfds').is_prepared()
    data.prepare(config)
    assert FakeMnist.prepared == 1
