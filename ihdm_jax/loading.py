"""A trained run as a Python object, for research code: `ihdm_jax.load(workdir)`.

model = ihdm_jax.load('runs/digits')
model.config                    # the run's config (from <workdir>/config.json)
model.f(u, k)                   # the EMA residual f(u, k); μ(u, k) = u + f(u, k)
model.sample(jax.random.key(0), 16)  # Alg. 2: float32 samples (16, H, W, C)
model.sample(key, 16, sampler='ddim', steps=10)  # another sampler (a heat_continuous run)
model.sample(key, 16, labels=[7] * 16, guidance=2.0)  # a conditional run: sevens, guided
model.restore(blurred, key, blur_sigma=2.0, num_samples=8)  # deblurring (docs/restoration.md)
"""

import jax
import numpy as np

from ihdm_jax import checkpoint
from ihdm_jax import data
from ihdm_jax import parallel
from ihdm_jax import programs
from ihdm_jax import restoration
from ihdm_jax import rng
from ihdm_jax import state as state_lib
from ihdm_jax import validation
from ihdm_jax import workdir as workdir_lib


class Model:
    """The EMA parameters of a run's newest checkpoint, with the run's config.

    f(u, k): the residual of the U-Net in inference mode, for NHWC float32 u and int32 k of
    shape (B,); pure and jit-able (it closes over the EMA parameters, which jit then embeds as
    constants: inside your own jit of a large model, use apply(params, u, k) with `params`
    passed as an argument). sample(key, num): Alg. 2 from the KDE prior over the training
    images, on a mesh of all devices, as --mode=sample draws. For a diffusion process
    (config.model.process, docs/processes.md) f is the ε-network with k = 1000·t (float32), and
    sample runs its ancestral sampler from N(0, V diag(c²) Vᵀ), as --mode=sample does.
    """

    def __init__(self, config, params, step: int, mesh):
        self.config = config
        self.params = params  # the EMA parameters, replicated over `mesh`
        self.step = step  # the checkpoint's training step
        self.mesh = mesh
        self.apply = programs.residual(state_lib.model_graphdef(config))
        self._f = jax.jit(self.apply)
        self._samplers = {}  # programs.Sampler by (sampler, steps, eta)
        self._source = None
        self._restorer = None  # the programs.Sampler of Model.restore

    def f(self, u, k, labels=None) -> jax.Array:
        """f(u, k) with the EMA parameters: float32 NHWC u, int32 k (B,) -> float32 like u;
        f(u, k, labels) for a conditional run, int32 labels (B,) in 0..num_classes (the last:
        no class)."""
        return self._f(self.params, u, k, labels)

    def sample(
        self,
        key,
        num: int,
        delta=None,
        sampler=None,
        steps=None,
        eta=None,
        labels=None,
        guidance=None,
    ) -> np.ndarray:
        """num samples u_0 of the run's sampler (Alg. 2 for the paper's heat process) as float32
        numpy (num, H, W, C), not clipped (images lie in about [0, 1]).

        The chains start from the process's prior (for the heat process u_K = F(t_K) x + δ ε,
        x training images picked by config.seed) and run on a mesh of all devices in batches
        of config.sampling.batch_size (a multiple of the device count). δ, the sampler, its
        steps and DDIM's η are config.sampling's unless given. The samples depend only on `key`
        (a jax.random.key), num and the config, and with key =
        ihdm_jax.rng.sample_key(config.seed) they are those of --mode=sample before rounding.
        The training images are read at the first call (config.data must point at them).

        A conditional run (config.model.num_classes > 0) draws sample i of class labels[i]
        (num class indices, −1 for none; default config.sampling.labels in turn, there () =
        every class) with classifier-free guidance of weight `guidance` (default
        config.sampling.guidance; 1 conditional, 0 unconditional).
        """
        if labels is not None or guidance is not None:
            num_classes = self.config.model.num_classes
            validation.require(
                num_classes,
                'labels and guidance are for conditional runs; this run is unconditional '
                '(config.model.num_classes=0).',
            )
        if labels is not None:
            labels = [int(c) for c in np.asarray(labels).reshape(-1)]
            validation.require(
                len(labels) == num,
                f'labels has {len(labels)} entries; expected one per sample ({num}).',
            )
            validation.check_labels(labels, num_classes, 'labels')
        if guidance is not None:
            validation.require(guidance >= 0, f'guidance={guidance} must be ≥ 0.')
        config = self.config.copy_and_resolve_references()
        for name, value in (('sampler', sampler), ('steps', steps), ('eta', eta)):
            if value is not None:
                config.sampling[name] = value
        s = config.sampling
        chosen = (s.sampler, s.steps, s.eta)
        if chosen not in self._samplers:
            validation.check_config(config)
            parallel.check_divisible(s.batch_size, 'config.sampling.batch_size')
            if self._source is None:
                data.check(config)
                self._source = data.make_source(config)
            self._samplers[chosen] = programs.Sampler(config, self.mesh)
        return (
            self._samplers[chosen]
            .draw(
                self.params,
                self._source,
                num,
                key,
                delta=delta,
                uint8=False,
                labels=labels,
                guidance=guidance,
            )
            .images
        )

    def restore(
        self,
        images,
        key,
        blur_sigma=0.0,
        upsample=1,
        noise=0.0,
        num_samples: int = 1,
        consistency=True,
    ) -> np.ndarray:
        """num_samples restorations of each degraded image (docs/restoration.md), as
        --mode=restore makes them: images (N, h, w, C), uint8 or float in [0, 1], blurred by a
        Gaussian of blur_sigma pixels or the block means of upsample x upsample pixels, with
        pixel noise of standard deviation `noise`. float32 numpy (N, num_samples, H, W, C), not
        clipped, by the run's sampler (a conditional run: given no class); they depend only on
        key, the images and the settings."""
        validation.require(num_samples >= 1, f'num_samples={num_samples} must be at least 1.')
        y = np.asarray(images)
        y = y / np.float32(255) if y.dtype == np.uint8 else y.astype(np.float32)
        size = (self.config.data.image_size,) * 2
        degradation = restoration.Degradation(size, float(blur_sigma), int(upsample), float(noise))
        degradation.check(y.shape, self.config.data.num_channels)
        if self._restorer is None:
            validation.check_config(self.config)
            parallel.check_divisible(self.config.sampling.batch_size, 'config.sampling.batch_size')
            self._restorer = programs.Sampler(self.config, self.mesh)
        out = self._restorer.restore(
            self.params,
            np.repeat(y, num_samples, axis=0),
            rng.example_keys(key, len(y) * num_samples),
            degradation,
            consistency,
        )
        return out.reshape((len(y), num_samples) + out.shape[1:])


def restore(config, workdir: str) -> Model:
    """The EMA parameters of the newest checkpoint in `workdir` for `config`, on a mesh of all
    devices (what every job that reads a trained model starts from)."""
    mesh = parallel.make_mesh()
    params, step = checkpoint.restore_ema_params(config, workdir, mesh)
    return Model(config, params, int(step), mesh)


def load(workdir: str) -> Model:
    """The run in `workdir`: its config.json and the EMA parameters of its newest checkpoint."""
    return restore(workdir_lib.read_config(workdir), workdir)
