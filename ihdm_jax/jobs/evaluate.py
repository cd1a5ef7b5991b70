"""Evaluation jobs on the EMA parameters of the newest checkpoint, written to <workdir>/eval.

--mode=eval: the negative ELBO of the test split in bits/dim (Eq. 7 with the App. A.3 bound on
L_K), with its terms. --mode=fid: FID of EMA samples against the reference images of
config.evaluation.fid_reference (the training set by default). --mode=sweep_delta: both for each
δ of config.evaluation.deltas, as in the paper's Fig. 11, and each sampler steps of
config.evaluation.sweep_steps.

A conditional model (config.model.num_classes > 0) is evaluated given the labels: --mode=eval
reports the negative ELBO of each test image given its label, and given the null class;
--mode=fid draws the classes of config.sampling.labels in turn (() = every class) at guidance
config.sampling.guidance and reports, besides the overall FID, each class's FID against the
training images of that class.
"""

import dataclasses
import hashlib
import io
import os

import numpy as np
from absl import logging

from ihdm_jax import data
from ihdm_jax import elbo
from ihdm_jax import errors
from ihdm_jax import images
from ihdm_jax import loading
from ihdm_jax import outputs
from ihdm_jax import parallel
from ihdm_jax import plots
from ihdm_jax import programs
from ihdm_jax import rng
from ihdm_jax import storage
from ihdm_jax import validation
from ihdm_jax.evaluation import frechet

GRID_SAMPLES = 64  # samples shown in fid_samples.png
WEIGHTS_FLAG = '--config.evaluation.inception_weights'


def _check_elbo(config, deltas):
    e = config.evaluation
    validation.require(
        e.num_passes >= 1, f'config.evaluation.num_passes={e.num_passes} must be at least 1.'
    )
    validation.require(
        e.num_examples >= 0,
        f'config.evaluation.num_examples={e.num_examples} must be ≥ 0 (0 = the whole test split).',
    )
    validation.require(
        e.train_chunk >= 1, f'config.evaluation.train_chunk={e.train_chunk} must be at least 1.'
    )
    validation.require(
        e.batch_size >= 1, f'config.evaluation.batch_size={e.batch_size} must be at least 1.'
    )
    validation.require(
        all(d > 0 for d in deltas),
        f'The ELBO needs δ > 0 (the std of p(u_{{k−1}} | u_k)), got {deltas}.',
    )
    data.check(config, 'test')


def _check_fid(config):
    e = config.evaluation
    validation.require(
        e.fid_num_samples >= 2,
        f'config.evaluation.fid_num_samples='
        f'{e.fid_num_samples} must be at least 2 (FID needs a covariance).',
    )
    reference = tuple(e.fid_reference)
    validation.require(
        reference and all(isinstance(r, str) and r for r in reference),
        f'config.evaluation.fid_reference={reference!r} must name the reference '
        "images: 'train', 'test' or folders of image files.",
    )
    for entry in reference:
        if entry in data.SPLITS:
            data.check(config, entry)
        else:
            validation.require(
                storage.isdir(entry) and data.image_files(entry),
                f'config.evaluation.fid_reference: {entry!r} is neither '
                "'train', 'test' nor a folder holding image files.",
            )
    validation.require(
        e.batch_size >= 1, f'config.evaluation.batch_size={e.batch_size} must be at least 1.'
    )
    parallel.check_divisible(config.sampling.batch_size, 'config.sampling.batch_size')
    frechet.resolve_weights(e.inception_weights or None, WEIGHTS_FLAG)


def check_eval(config):
    _check_elbo(config, (config.sampling.delta,))


def check_fid(config):
    _check_fid(config)


def check_sweep_delta(config):
    deltas = tuple(config.evaluation.deltas)
    validation.require(deltas, 'config.evaluation.deltas is empty; expected the values of δ.')
    _check_elbo(config, deltas)
    _check_fid(config)
    for steps in config.evaluation.sweep_steps:
        try:
            validation.check_config(_with_steps(config, steps))
        except errors.UserError as error:
            raise errors.UserError(f'config.evaluation.sweep_steps: {error}') from None


def _with_steps(config, steps: int):
    """`config` with config.sampling.steps = steps."""
    config = config.copy_and_resolve_references()
    config.sampling.steps = steps
    return config


class _ReferenceImages:
    """Data sources one after the other, as the sequence of uint8 HWC images that
    frechet.InceptionFeatures reads."""

    def __init__(self, sources):
        self.sources = sources
        self.starts = np.cumsum([0] + [len(source) for source in sources])

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, index):
        part = int(np.searchsorted(self.starts, index, side='right')) - 1
        return self.sources[part].load(np.array([index - self.starts[part]]))[0]


def reference_parts(config) -> list:
    """config.evaluation.fid_reference as (label, split or None, folder or None) without repeats:
    a split of an image-folder data set is its folder, so a folder named twice is read once."""
    parts, seen = [], set()
    for entry in config.evaluation.fid_reference:
        split = entry if entry in data.SPLITS else None
        folder = (
            entry
            if split is None
            else (
                config.data[data.folder_key(split)]
                if config.data.dataset in data.FOLDER_DATASETS
                else None
            )
        )
        identity = (
            (folder if storage.is_remote(folder) else os.path.realpath(folder)) if folder else split
        )
        if identity in seen:
            continue
        seen.add(identity)
        label = split or (
            f'{os.path.basename(os.path.normpath(folder))}-'
            f'{hashlib.sha1(identity.encode()).hexdigest()[:8]}'
        )
        parts.append((label, split, folder if split is None else None))
    return parts


def class_features_path(config, workdir) -> str:
    """The cache of the Inception features and labels of the training images, from which
    the per-class FID of a conditional model takes each class's reference statistics: next to
    reference_stats_path."""
    stats_dir = storage.parent(reference_stats_path(config, workdir))
    return storage.join(
        stats_dir, f'train_features_{config.data.dataset}_{config.data.image_size}.npz'
    )


def reference_stats_path(config, workdir) -> str:
    """config.evaluation.fid_train_stats, or the cache file in <workdir>/eval/ that names the
    reference (ihdm_jax/defaults.py)."""
    if config.evaluation.fid_train_stats:
        return config.evaluation.fid_train_stats
    labels = [label for label, _, _ in reference_parts(config)]
    name = f'{config.data.dataset}_{config.data.image_size}'
    if labels == ['train']:
        return os.path.join(workdir, 'eval', f'train_stats_{name}.npz')
    return os.path.join(workdir, 'eval', f'reference_stats_{name}_{"+".join(labels)}.npz')


class FidEvaluator:
    """FID of config.evaluation.fid_num_samples EMA samples against reference statistics.

    The network and the statistics live on process 0, which alone computes FID. The reference
    images are those of config.evaluation.fid_reference (the training split by default); their
    statistics are read from reference_stats_path(config, workdir), and computed and written
    there when missing.
    """

    def __init__(self, config, workdir, mesh, source):
        self.config, self.source = config, source
        self.sampler = programs.Sampler(config, mesh)
        self.parts = reference_parts(config)
        self.stats_path = reference_stats_path(config, workdir)
        self.class_features_path = class_features_path(config, workdir)
        self.features = self.train_stats = None
        self.reference_sources = []
        if parallel.is_main_process():
            weights = frechet.resolve_weights(
                config.evaluation.inception_weights or None, WEIGHTS_FLAG
            )
            self.features = frechet.InceptionFeatures(weights, config.evaluation.batch_size)
            self.train_stats = self._reference_statistics()

    def describe(self) -> str:
        return ' + '.join(label if split else folder for label, split, folder in self.parts)

    def _reference_statistics(self):
        if storage.exists(self.stats_path):
            logging.info('FID: reference statistics (%s) from %s', self.describe(), self.stats_path)
            return frechet.load_statistics(self.stats_path)
        c = self.config
        self.reference_sources = [
            self.source
            if split == 'train'
            else data.make_source(c, split)
            if split
            else data.FolderSource(folder, c.data.image_size, c.data.num_channels)
            for _, split, folder in self.parts
        ]
        images = _ReferenceImages(self.reference_sources)
        stats = frechet.statistics(self.features(images, description='FID reference images'))
        storage.makedirs(storage.parent(self.stats_path))
        frechet.save_statistics(self.stats_path, *stats)
        logging.info(
            'FID: statistics of %d reference images (%s) written to %s',
            len(images),
            self.describe(),
            self.stats_path,
        )
        return stats

    def labels(self):
        """The labels of the samples (programs.sample_labels); None for an unconditional model."""
        return programs.sample_labels(self.config, self.config.evaluation.fid_num_samples)

    def samples(self, params, delta: float, labels=None, guidance=None, sampler=None) -> np.ndarray:
        """fid_num_samples uint8 EMA samples at δ, on every process; they begin with
        --mode=sample's samples (the same keys). A conditional model draws them given
        `labels` (default: self.labels()) at weight `guidance` (default: the config's).
        `sampler`: a programs.Sampler in place of the config's (sweep_delta's steps)."""
        return (
            (sampler or self.sampler)
            .draw(
                params,
                self.source,
                self.config.evaluation.fid_num_samples,
                rng.sample_key(self.config.seed),
                delta,
                progress=f'FID samples (δ = {delta})',
                labels=labels,
                guidance=guidance,
            )
            .images
        )

    def __call__(self, samples: np.ndarray):
        """FID of uint8 samples against the reference; None on processes other than 0."""
        return self.fid(self.sample_features(samples))

    def sample_features(self, samples: np.ndarray):
        """The Inception features of uint8 samples; None on processes other than 0."""
        return None if self.features is None else self.features(samples, description='FID samples')

    def fid(self, features):
        """FID of the samples' features against the reference; None for None."""
        if features is None:
            return None
        return frechet.frechet_distance(*frechet.statistics(features), *self.train_stats)

    def class_fid(self, features, labels) -> dict:
        """{class: FID of its samples' features against the training images of the class} for
        the classes (labels >= 0) with at least two samples; None for features None."""
        if features is None:
            return None
        train_features, train_labels = self._class_features()
        by_class = {}
        for c in np.unique(labels):
            mine = features[labels == c]
            if c >= 0 and len(mine) >= 2:
                by_class[int(c)] = frechet.frechet_distance(
                    *frechet.statistics(mine),
                    *frechet.statistics(train_features[train_labels == c]),
                )
        return by_class

    def _class_features(self):
        """The Inception features and labels of the training images (cached in
        class_features_path)."""
        path = self.class_features_path
        if storage.exists(path):
            with np.load(io.BytesIO(storage.read_bytes(path))) as cached:
                return cached['features'], cached['labels']
        features = self.features(
            _ReferenceImages([self.source]), description='FID features of the training images'
        )
        storage.makedirs(storage.parent(path))
        storage.save_npz(path, features=features, labels=self.source.labels)
        logging.info('FID: features of the training images by class written to %s', path)
        return features, self.source.labels


def _describe(config, step):
    return {
        'step': step,
        'dataset': config.data.dataset,
        'image_size': config.data.image_size,
        'process': config.model.process,
        'K': config.model.K,
        'sampler': config.sampling.sampler,
        'sampling_steps': config.sampling.steps,
        'sigma': config.model.sigma,
        'evaluation': config.evaluation.to_dict(),
    }


def _negative_elbo(config, mesh, null_class=False):
    return elbo.NegativeElbo(
        config, mesh, data.make_source(config, 'test'), data.make_source(config), null_class
    )


def likelihood(config, workdir: str):
    """--mode=eval: eval/likelihood.json (terms in bits/dim, level_nats, settings) and
    eval/likelihood_levels.png. A conditional model: given each image's label, and in
    likelihood.json's `null_class` given the null class."""
    model = loading.restore(config, workdir)
    negative_elbo = _negative_elbo(config, model.mesh)
    result = negative_elbo(model.params, config.sampling.delta)
    data.report_skipped(negative_elbo.test, negative_elbo.train)
    conditional = {}
    if config.model.num_classes:
        null = _negative_elbo(config, model.mesh, null_class=True)(
            model.params, config.sampling.delta
        )
        conditional = {'given': 'label', 'null_class': dataclasses.asdict(null)}
        logging.info('Negative ELBO given the null class: %.4f bits/dim', null.bits_per_dim)
    setting = (
        f'checkpoint {model.step}, {config.data.dataset} test split '
        f'({result.num_examples} images, {config.evaluation.num_passes} passes, '
        f'δ = {config.sampling.delta}{", given the labels" if conditional else ""})'
    )
    terms = (
        f'{result.bits_per_dim:.4f} bits/dim = {result.offset:g} + L_K {result.L_K:.4f} '
        f'+ Σ L_k {result.sum_L_k:.4f} + L_0 {result.L_0:.4f}'
    )
    logging.info('Negative ELBO, %s: %s', setting, terms)
    if not parallel.is_main_process():
        return result
    out = outputs.folder(workdir, 'eval')
    outputs.write_json(
        os.path.join(out, 'likelihood.json'),
        {
            **_describe(config, model.step),
            'split': 'test',
            'delta': config.sampling.delta,
            **dataclasses.asdict(result),
            **conditional,
        },
    )
    plots.likelihood_levels(
        os.path.join(out, 'likelihood_levels.png'), result, f'{setting}\n{terms}'
    )
    logging.info('Written to %s (likelihood.json, likelihood_levels.png).', out)
    return result


def fid(config, workdir: str):
    """--mode=fid: eval/fid.json (with the reference and its statistics file), the samples behind
    it as eval/fid_samples.npz (with their labels for a conditional model) and the first of them
    as eval/fid_samples.png."""
    model = loading.restore(config, workdir)
    evaluator = FidEvaluator(config, workdir, model.mesh, data.make_source(config))
    labels = evaluator.labels()
    samples = evaluator.samples(model.params, config.sampling.delta, labels)
    features = evaluator.sample_features(samples)
    value = evaluator.fid(features)
    class_fid = None if labels is None else evaluator.class_fid(features, labels)
    data.report_skipped(evaluator.source, *evaluator.reference_sources)
    if not parallel.is_main_process():
        return value
    logging.info(
        'FID of %d samples of checkpoint %d (δ = %g%s) against %s: %.4f',
        len(samples),
        model.step,
        config.sampling.delta,
        '' if labels is None else f', guidance w = {config.sampling.guidance:g}',
        evaluator.describe(),
        value,
    )
    conditional = {}
    if labels is not None:
        conditional = {'guidance': config.sampling.guidance, 'class_fid': class_fid}
        logging.info(
            'FID by class (against the training images of each class): %s',
            ', '.join(f'{c}: {v:.2f}' for c, v in class_fid.items()),
        )
    out = outputs.folder(workdir, 'eval')
    outputs.write_json(
        os.path.join(out, 'fid.json'),
        {
            **_describe(config, model.step),
            'delta': config.sampling.delta,
            'fid': value,
            'num_samples': len(samples),
            'reference': evaluator.describe(),
            'train_stats': evaluator.stats_path,
            **conditional,
        },
    )
    storage.save_npz(
        os.path.join(out, 'fid_samples.npz'),
        images=samples,
        **({} if labels is None else {'labels': labels}),
    )
    images.save_grid(os.path.join(out, 'fid_samples.png'), samples[:GRID_SAMPLES])
    logging.info('Written to %s (fid.json, fid_samples.npz, fid_samples.png).', out)
    return value


def sweep_delta(config, workdir: str):
    """--mode=sweep_delta: the negative ELBO and FID for each δ in config.evaluation.deltas,
    and for each sampler steps of config.evaluation.sweep_steps (() = config.sampling.steps);
    eval/sweep_delta.json, eval/sweep_delta.md and eval/sweep_delta.png."""
    model = loading.restore(config, workdir)
    evaluator = FidEvaluator(config, workdir, model.mesh, data.make_source(config))
    rows = []
    for steps in tuple(config.evaluation.sweep_steps) or (config.sampling.steps,):
        stepped = _with_steps(config, steps)
        sampler = programs.Sampler(stepped, model.mesh)
        negative_elbo = _negative_elbo(stepped, model.mesh)
        for delta in config.evaluation.deltas:
            result = negative_elbo(model.params, delta)
            row = {
                'steps': sampler.steps,
                'delta': delta,
                **{
                    name: getattr(result, name)
                    for name in ('bits_per_dim', 'L_K', 'sum_L_k', 'L_0')
                },
            }
            row['fid'] = evaluator(evaluator.samples(model.params, delta, sampler=sampler))
            rows.append(row)
            logging.info(
                '%d steps, δ = %g: %.4f bits/dim, FID %s',
                sampler.steps,
                delta,
                row['bits_per_dim'],
                row['fid'],
            )
    data.report_skipped(
        evaluator.source, *evaluator.reference_sources, negative_elbo.test, negative_elbo.train
    )
    if not parallel.is_main_process():
        return rows
    out = outputs.folder(workdir, 'eval')
    outputs.write_json(
        os.path.join(out, 'sweep_delta.json'),
        {
            **_describe(config, model.step),
            'split': 'test',
            'num_examples': negative_elbo.num_examples,
            'results': rows,
        },
    )
    lines = [
        '| steps | δ | bits/dim | L_K | Σ L_k | L_0 | FID |',
        '|---|---|---|---|---|---|---|',
    ]
    lines += [
        f'| {row["steps"]} | {row["delta"]:g} | {row["bits_per_dim"]:.4f} | {row["L_K"]:.4f} | '
        f'{row["sum_L_k"]:.4f} | {row["L_0"]:.4f} | {row["fid"]:.2f} |'
        for row in rows
    ]
    storage.write_text(storage.join(out, 'sweep_delta.md'), '\n'.join(lines) + '\n')
    title = (
        f'{config.data.dataset}, checkpoint {model.step}: ELBO on {negative_elbo.num_examples} '
        f'test images, FID of {config.evaluation.fid_num_samples} samples'
    )
    plots.sweep_delta(os.path.join(out, 'sweep_delta.png'), rows, title)
    logging.info(
        'Sweep over δ written to %s (sweep_delta.json, .md, .png):\n%s', out, '\n'.join(lines)
    )
    return rows
