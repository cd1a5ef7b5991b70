"""The U-Net f(u, k) of the paper (App. B.1), built as the original code builds it.

Improved-diffusion lineage: ResBlocks with an additive time embedding, single-head
self-attention at chosen levels and in the middle, every encoder output used as a skip.
The last convolutions of each residual branch and of the output are zero-initialised, so
f == 0 at initialisation and the prediction μ(u, k) = u + f(u, k) starts as the identity.
Other weights and biases follow PyTorch's default initialisation, as in the original code.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_EPS = 1e-5
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# PyTorch's default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def _torch_bias_init(fan_in):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _conv(in_ch, out_ch, kernel, *, dtype, rngs, stride=1, zero=False):
    pad = kernel // 2
    return nnx.Conv(
        in_ch,
        out_ch,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.zeros_init() if zero else _torch_kernel_init,
        bias_init=nnx.initializers.zeros_init() if zero else _torch_bias_init(in_ch * kernel**2),
        rngs=rngs,
    )


def _dense(in_features, out_features, *, dtype, rngs):
    return nnx.Linear(
        in_features,
        out_features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_torch_kernel_init,
        bias_init=_torch_bias_init(in_features),
        rngs=rngs,
    )


class GroupNorm(nnx.Module):
    """GroupNorm of `groups` groups, float32 statistics, the two-pass variance and PyTorch's ε.

    The same function and parameters (scale, bias) as nnx.GroupNorm(use_fast_variance=False),
    computed by reducing over the pixels per channel first and then averaging the channels of
    each group with a (C, C) matrix: XLA's CPU code runs this 4-9x faster than the reduction
    over groups of (pixels, channels) at once (docs/benchmarks.md).
    """

    def __init__(self, ch, groups, *, dtype):
        self.groups = groups
        self.scale = nnx.Param(jnp.ones((ch,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((ch,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x):
        b, height, width, ch = x.shape
        size = ch // self.groups
        group_mean = np.kron(
            np.eye(self.groups), np.full((size, size), 1.0 / (height * width * size))
        )

        def per_channel(pixel_sums):  # (B, C) sums over pixels -> (B, 1, 1, C) group means
            return jnp.dot(
                pixel_sums, group_mean.astype(np.float32), precision=jax.lax.Precision.HIGHEST
            )[:, None, None, :]

        x = x.astype(jnp.float32)
        centred = x - per_channel(jnp.sum(x, axis=(1, 2)))
        variance = per_channel(jnp.sum(jnp.square(centred), axis=(1, 2)))
        y = centred * (jax.lax.rsqrt(variance + _EPS) * self.scale[...]) + self.bias[...]
        return y.astype(self.dtype)


def _group_norm(ch, groups, *, dtype, rngs):
    del rngs  # no random initialisation
    return GroupNorm(ch, groups, dtype=dtype)


class _ParamKeys:
    """Stands in for nnx.Rngs when building layers: a 'params' stream from one key.

    nnx.Rngs stores its draw counter in a Variable, and under jit or eval_shape every draw
    then scans the whole trace so far (jax 0.10), which makes building the model quadratic
    in its size. Layers only call rngs.params(), so a Python counter does the same job.
    """

    def __init__(self, key):
        self._key = key
        self._count = 0

    def params(self):
        self._count += 1
        return jax.random.fold_in(self._key, self._count)


def timestep_embedding(k, dim, max_period=10000.0):
    """Sinusoidal embedding [cos | sin] of the raw integer level k, shape (B,) -> (B, dim)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = k.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def dropout(x, rate: float, key):
    """Zeroes each entry with probability `rate` (rounded to a multiple of 2^-16) and scales
    the others by the inverse of the exact keep probability. 16 random bits per entry: half the
    random-number work of jax.random.bernoulli, which draws 32."""
    if rate == 0:
        return x
    threshold = round(rate * 2**16)
    keep = jax.random.bits(key, x.shape, jnp.uint16) >= threshold
    return jnp.where(keep, x * (2**16 / (2**16 - threshold)), 0).astype(x.dtype)


class ResBlock(nnx.Module):
    """GN-SiLU-conv, + Dense(SiLU(temb)), GN-SiLU-Dropout-conv(zero); identity or 1x1 skip."""

    def __init__(self, in_ch, out_ch, temb_ch, dropout, *, groups, dtype, rngs):
        self.norm1 = _group_norm(in_ch, groups, dtype=dtype, rngs=rngs)
        self.conv1 = _conv(in_ch, out_ch, 3, dtype=dtype, rngs=rngs)
        self.temb_proj = _dense(temb_ch, out_ch, dtype=dtype, rngs=rngs)
        self.norm2 = _group_norm(out_ch, groups, dtype=dtype, rngs=rngs)
        self.dropout_rate = dropout
        self.conv2 = _conv(out_ch, out_ch, 3, dtype=dtype, rngs=rngs, zero=True)
        self.skip = _conv(in_ch, out_ch, 1, dtype=dtype, rngs=rngs) if in_ch != out_ch else None

    def __call__(self, x, temb, *, train, key):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.temb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = jax.nn.silu(self.norm2(h))
        h = dropout(h, self.dropout_rate, key) if train else h
        h = self.conv2(h)
        return (x if self.skip is None else self.skip(x)) + h


class Attention(nnx.Module):
    """Single-head self-attention over all positions: GN, 1x1 qkv, softmax (f32), 1x1 proj."""

    def __init__(self, ch, *, groups, dtype, rngs):
        self.norm = _group_norm(ch, groups, dtype=dtype, rngs=rngs)
        self.qkv = _conv(ch, 3 * ch, 1, dtype=dtype, rngs=rngs)
        self.proj = _conv(ch, ch, 1, dtype=dtype, rngs=rngs, zero=True)

    def __call__(self, x):
        b, height, width, ch = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, height * width, 3, 1, ch)
        # The XLA implementation computes the softmax in float32 for any input dtype.
        h = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return x + self.proj(h.reshape(b, height, width, ch))


class ResAttnBlock(nnx.Module):
    """A ResBlock, followed by self-attention at attention levels."""

    def __init__(self, in_ch, out_ch, temb_ch, dropout, attention, *, groups, dtype, rngs):
        self.res = ResBlock(in_ch, out_ch, temb_ch, dropout, groups=groups, dtype=dtype, rngs=rngs)
        self.attn = Attention(out_ch, groups=groups, dtype=dtype, rngs=rngs) if attention else None

    def __call__(self, x, temb, *, train, key):
        h = self.res(x, temb, train=train, key=key)
        return h if self.attn is None else self.attn(h)


class Downsample(nnx.Module):
    """Halves the resolution: strided 3x3 conv ('conv') or 2x2 average pooling ('avgpool')."""

    def __init__(self, ch, mode, *, dtype, rngs):
        if mode not in ('conv', 'avgpool'):
            raise ValueError(f"downsample must be 'conv' or 'avgpool', got {mode!r}")
        self.conv = _conv(ch, ch, 3, dtype=dtype, rngs=rngs, stride=2) if mode == 'conv' else None

    def __call__(self, x):
        if self.conv is not None:
            return self.conv(x)
        b, height, width, ch = x.shape
        return x.reshape(b, height // 2, 2, width // 2, 2, ch).mean(axis=(2, 4))


class Upsample(nnx.Module):
    """Nearest-neighbour x2 upsampling, followed by a 3x3 conv in 'conv' mode only: 'avgpool'
    is the original code's conv_resample=False, which has no convolution on either side."""

    def __init__(self, ch, mode, *, dtype, rngs):
        self.conv = _conv(ch, ch, 3, dtype=dtype, rngs=rngs) if mode == 'conv' else None

    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return x if self.conv is None else self.conv(x)


class UNet(nnx.Module):
    """f(u, k): NHWC images and int32 levels (B,) -> float32 array shaped like u; with
    num_classes > 0, f(u, k, c) for labels c (B,) in 0..num_classes, num_classes being the null
    class ∅ (ihdm_jax/conditioning.py).

    Level i of the U-Net works at resolution image_size / 2**i with
    model_channels * channel_mult[i] channels; attention_levels lists level indices; every
    GroupNorm has num_groups groups. A class embedding (num_classes + 1 vectors) is added to
    the time embedding, as in ADM and Ho & Salimans; it exists only when num_classes > 0, so an
    unconditional U-Net has the parameters of the original code. dtype ('float32' |
    'bfloat16') is the compute dtype of every layer but the input convolution (always float32);
    parameters are always float32.
    """

    def __init__(
        self,
        *,
        num_channels,
        model_channels,
        channel_mult,
        num_res_blocks,
        attention_levels,
        dropout,
        downsample,
        num_groups,
        dtype,
        rngs,
        num_classes=0,
    ):
        if dtype not in _DTYPES:
            raise ValueError(f'dtype must be one of {sorted(_DTYPES)}, got {dtype!r}')
        num_levels = len(channel_mult)
        if any(not 0 <= level < num_levels for level in attention_levels):
            raise ValueError(f'attention_levels {attention_levels} outside 0..{num_levels - 1}')
        dtype = _DTYPES[dtype]
        rngs = _ParamKeys(rngs.params())
        self.model_channels = model_channels
        temb_ch = 4 * model_channels
        level_ch = [model_channels * mult for mult in channel_mult]

        def block(in_ch, level):
            return ResAttnBlock(
                in_ch,
                level_ch[level],
                temb_ch,
                dropout,
                level in attention_levels,
                groups=num_groups,
                dtype=dtype,
                rngs=rngs,
            )

        self.temb_dense1 = _dense(model_channels, temb_ch, dtype=dtype, rngs=rngs)
        self.temb_dense2 = _dense(temb_ch, temb_ch, dtype=dtype, rngs=rngs)
        # The stem reads the float32 input in float32: rounded to bf16 (8 significant bits, a
        # spacing of 2^-8 near 1), u_k would lose detail at the scale of the training noise σ,
        # and trained digits models lost 1.2% of loss from that alone (docs/benchmarks.md).
        self.stem = _conv(num_channels, level_ch[0], 3, dtype=jnp.float32, rngs=rngs)
        self.compute_dtype = dtype

        ch = level_ch[0]
        skip_ch = [ch]
        encoder, downsamplers = [], []
        for level in range(num_levels):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(block(ch, level))
                ch = level_ch[level]
                skip_ch.append(ch)
            encoder.append(nnx.List(blocks))
            if level < num_levels - 1:
                downsamplers.append(Downsample(ch, downsample, dtype=dtype, rngs=rngs))
                skip_ch.append(ch)
        self.encoder = nnx.List(encoder)
        self.downsample = nnx.List(downsamplers)

        self.mid_res1 = ResBlock(
            ch, ch, temb_ch, dropout, groups=num_groups, dtype=dtype, rngs=rngs
        )
        self.mid_attn = Attention(ch, groups=num_groups, dtype=dtype, rngs=rngs)
        self.mid_res2 = ResBlock(
            ch, ch, temb_ch, dropout, groups=num_groups, dtype=dtype, rngs=rngs
        )

        decoder, upsamplers = {}, {}
        for level in reversed(range(num_levels)):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(block(ch + skip_ch.pop(), level))
                ch = level_ch[level]
            decoder[level] = nnx.List(blocks)
            if level > 0:
                upsamplers[level] = Upsample(ch, downsample, dtype=dtype, rngs=rngs)
        # decoder[i] and upsample[i - 1] belong to level i.
        self.decoder = nnx.List([decoder[level] for level in range(num_levels)])
        self.upsample = nnx.List([upsamplers[level] for level in range(1, num_levels)])

        self.out_norm = _group_norm(ch, num_groups, dtype=dtype, rngs=rngs)
        self.out_conv = _conv(ch, num_channels, 3, dtype=dtype, rngs=rngs, zero=True)
        # Built last, so that the other layers draw the keys of an unconditional U-Net.
        self.class_embed = (
            nnx.Embed(num_classes + 1, temb_ch, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
            if num_classes
            else None
        )

    def __call__(self, x, k, *, labels=None, train=False, rngs=None):
        """labels: int32 (B,), required by a conditional U-Net and refused by an unconditional
        one; rngs: nnx.Rngs with a 'dropout' stream, required when train=True."""
        if (labels is None) != (self.class_embed is None):
            raise ValueError(
                'A conditional U-Net (num_classes > 0) needs labels; an unconditional one takes '
                f'none (labels {"missing" if labels is None else "given"}).'
            )
        if train:
            if rngs is None:
                raise ValueError('UNet(train=True) needs rngs with a dropout stream.')
            num_blocks = 2 + sum(len(blocks) for blocks in (*self.encoder, *self.decoder))
            keys = iter(jax.random.split(rngs.dropout(), num_blocks))
        else:
            keys = itertools.repeat(None)

        temb = timestep_embedding(k, self.model_channels)
        temb = self.temb_dense2(jax.nn.silu(self.temb_dense1(temb)))
        if self.class_embed is not None:
            temb = temb + self.class_embed(labels)

        h = self.stem(x).astype(self.compute_dtype)
        skips = [h]
        for level, blocks in enumerate(self.encoder):
            for blk in blocks:
                h = blk(h, temb, train=train, key=next(keys))
                skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                skips.append(h)

        h = self.mid_res1(h, temb, train=train, key=next(keys))
        h = self.mid_attn(h)
        h = self.mid_res2(h, temb, train=train, key=next(keys))

        for level in reversed(range(len(self.decoder))):
            for blk in self.decoder[level]:
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = blk(h, temb, train=train, key=next(keys))
            if level > 0:
                h = self.upsample[level - 1](h)

        h = self.out_conv(jax.nn.silu(self.out_norm(h)))
        return h.astype(jnp.float32)


def from_config(config, rngs):
    """Builds the UNet of config.model for config.data.num_channels channels."""
    m = config.model
    return UNet(
        num_channels=config.data.num_channels,
        model_channels=m.model_channels,
        channel_mult=tuple(m.channel_mult),
        num_res_blocks=m.num_res_blocks,
        attention_levels=tuple(m.attention_levels),
        dropout=m.dropout,
        downsample=m.downsample,
        num_groups=m.num_groups,
        dtype=m.dtype,
        rngs=rngs,
        num_classes=m.num_classes,
    )


def init(config, key):
    """Returns (graphdef, params); params is an nnx.State holding only nnx.Param."""
    model = from_config(config, nnx.Rngs(params=key))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def apply(graphdef, params, x, k, *, train, key=None, labels=None):
    """f(x, k) (f(x, k, labels) for a conditional model) for the split model; key is the
    dropout key, required when train=True."""
    model = nnx.merge(graphdef, params)
    rngs = None if key is None else nnx.Rngs(dropout=key)
    return model(x, k, labels=labels, train=train, rngs=rngs)


_TOP_ORDER = (
    'temb_dense1',
    'temb_dense2',
    'class_embed',
    'stem',
    'encoder',
    'mid_res1',
    'mid_attn',
    'mid_res2',
    'decoder',
    'out_norm',
    'out_conv',
)
_INNER_ORDER = (
    'res',
    'attn',
    'norm1',
    'conv1',
    'temb_proj',
    'norm2',
    'conv2',
    'skip',
    'norm',
    'qkv',
    'proj',
    'conv',
    'kernel',
    'embedding',
    'scale',
    'bias',
)


def _forward_key(path):
    """Sort key listing parameter paths in the order the forward pass uses them."""
    head = path[0]
    if head in ('encoder', 'downsample'):
        stage = (_TOP_ORDER.index('encoder'), path[1], head == 'downsample')
    elif head in ('decoder', 'upsample'):
        level = path[1] + (head == 'upsample')
        stage = (_TOP_ORDER.index('decoder'), -level, head == 'upsample')
    else:
        stage = (_TOP_ORDER.index(head),)
    return stage, [p if isinstance(p, int) else _INNER_ORDER.index(p) for p in path[1:]]


def summary(config):
    """Per-module parameter shapes, input/output shapes and the parameter count, abstractly."""
    model = nnx.eval_shape(lambda: from_config(config, nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)

    size = config.data.image_size
    x = jax.ShapeDtypeStruct((1, size, size, config.data.num_channels), jnp.float32)
    k = jax.ShapeDtypeStruct((1,), jnp.int32)
    labels = jnp.zeros((1,), jnp.int32) if config.model.num_classes else None
    out = jax.eval_shape(
        lambda p, x, k: apply(graphdef, p, x, k, train=False, labels=labels), params, x, k
    )

    modules = {}
    for path, value in sorted(nnx.to_flat_state(params), key=lambda item: _forward_key(item[0])):
        modules.setdefault('.'.join(map(str, path[:-1])), []).append((path[-1], value.shape))
    rows = [
        (
            name,
            '  '.join(f'{leaf} {shape}' for leaf, shape in leaves),
            sum(math.prod(shape) for _, shape in leaves),
        )
        for name, leaves in modules.items()
    ]
    total = sum(count for _, _, count in rows)

    width_name = max(len('module'), *(len(r[0]) for r in rows))
    width_shapes = max(len('parameter shapes'), *(len(r[1]) for r in rows))
    lines = [
        f'UNet: input {x.shape} {x.dtype}, k {k.shape} {k.dtype} -> f {out.shape} {out.dtype}',
        f'compute dtype {config.model.dtype}, parameters float32',
        '',
        f'{"module":<{width_name}}  {"parameter shapes":<{width_shapes}}  {"count":>12}',
    ]
    lines += [
        f'{name:<{width_name}}  {shapes:<{width_shapes}}  {count:>12,}'
        for name, shapes, count in rows
    ]
    lines.append(f'parameters: {total}')
    return '\n'.join(lines)
