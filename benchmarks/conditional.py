"""Class-conditional digits against the guidance weight w: how often a classifier recognises the
asked-for class, and FID (docs/conditional.md).

  python -m benchmarks.conditional --workdir=runs/digits_conditional \
      --guidance=0,1,2,4 --reference_stats=FILE [--num_samples=1000] [--out=DIR]

The workdir holds a conditional digits run (configs/digits_conditional.py). For each w, the EMA
model draws --num_samples samples of every class in turn (100 of each class for 1000) as
--mode=fid draws them; two classifiers trained on the pixels of the 1500 training digits at
16x16 (scikit-learn's logistic regression and an RBF SVM; their accuracy on the 297 test digits
is printed) classify them, and --mode=fid's evaluator takes their FID against --reference_stats
(config.evaluation.fid_train_stats: written there first if the file does not exist). A last
row draws with the null class (labels −1: no guidance, the KDE prior over all training
digits). Prints a table and, with --out, writes
conditional.json, conditional.md and conditional_grid.png (one row per class, a block of
samples per w).
"""

import functools
import os
import types

import numpy as np
from absl import app
from absl import flags

from benchmarks import measure
from ihdm_jax import conditioning
from ihdm_jax import data
from ihdm_jax import images
from ihdm_jax import loading
from ihdm_jax import plots
from ihdm_jax import storage
from ihdm_jax import workdir as workdir_lib
from ihdm_jax.jobs import evaluate

GRID_COLUMNS = 6  # samples of each class shown per w


def _define_flags():
    """The command line's flags, defined only when this module runs as a script (so that the
    tests can import it next to ihdm_jax.main, which defines --workdir too)."""
    return types.SimpleNamespace(
        workdir=flags.DEFINE_string('workdir', None, 'The trained conditional workdir.'),
        guidance=flags.DEFINE_list('guidance', ['0', '1', '2', '4'], 'Guidance weights w.'),
        num=flags.DEFINE_integer('num_samples', 1000, 'Samples per w (classes in turn).'),
        stats=flags.DEFINE_string('reference_stats', None, 'Reference statistics (.npz).'),
        out=flags.DEFINE_string('out', None, 'Folder for the table and the grid.'),
    )


def classifiers(config) -> dict:
    """{name: (classifier, its accuracy on the 297 test digits)}: a logistic regression and an
    SVM (RBF kernel, C = 10) on the pixels (in [0, 1]) of the 1500 training digits at the
    config's size."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    pixels = data.digits_images(config.data.image_size).reshape(len(data.digits_labels()), -1)
    pixels = pixels.astype(np.float64) / 255.0
    labels = data.digits_labels()
    train = slice(data.DIGITS_TRAIN)
    test = slice(data.DIGITS_TRAIN, None)
    found = {}
    for name, model in (
        ('logistic regression', LogisticRegression(max_iter=2000)),
        ('SVM', SVC(C=10.0)),
    ):
        model.fit(pixels[train], labels[train])
        found[name] = (model, float(model.score(pixels[test], labels[test])))
    return found


def accuracy(model, samples, labels) -> float:
    """The fraction of uint8 samples that `model` classifies as their label."""
    pixels = samples.reshape(len(samples), -1).astype(np.float64) / 255.0
    return float(np.mean(model.predict(pixels) == labels))


def class_grid(samples, labels, num_classes, columns) -> np.ndarray:
    """The first `columns` samples of each class as a (classes, columns, H, W, C) table."""
    return np.stack([samples[labels == c][:columns] for c in range(num_classes)])


def save_figure(path, tables, weights, title):
    """The tables of the weights side by side, one row per class, labelled."""
    blocks = [images.grid(t.reshape((-1,) + t.shape[2:]), t.shape[1]) for t in tables]
    gap = np.full((blocks[0].shape[0], 3 * images.PAD * 4, blocks[0].shape[2]), 255, np.uint8)
    canvas = np.concatenate([part for block in blocks for part in (block, gap)][:-1], axis=1)
    width = blocks[0].shape[1] + gap.shape[1]
    size = tables[0].shape[2]
    plots.save_canvas(
        path,
        canvas,
        title,
        [(i * width + blocks[0].shape[1] / 2, f'w = {w:g}') for i, w in enumerate(weights)],
        list(zip(images.tile_centres(tables[0].shape[0], size), map(str, range(len(tables[0]))))),
    )


def main(argv, f):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    for name, flag in (('workdir', f.workdir), ('reference_stats', f.stats)):
        if not flag.value:
            raise app.UsageError(f'--{name} is required.')
    workdir = f.workdir.value
    config = workdir_lib.read_config(workdir)
    if config.data.dataset != 'digits' or not config.model.num_classes:
        raise app.UsageError(f'{workdir} is not a conditional digits run.')
    config.evaluation.fid_num_samples = f.num.value
    config.evaluation.fid_train_stats = f.stats.value
    model = loading.restore(config, workdir)
    source = data.make_source(config)
    evaluator = evaluate.FidEvaluator(config, workdir, model.mesh, source)
    found = classifiers(config)
    for name, (_, test_accuracy) in found.items():
        print(f'{name}: accuracy {test_accuracy:.3f} on the 297 test digits', flush=True)
    labels = evaluator.labels()
    rows, tables = [], []
    weights = [float(w) for w in f.guidance.value]
    for w in weights + [None]:
        row_labels = labels if w is not None else np.full_like(labels, conditioning.NULL)
        samples = evaluator.samples(model.params, config.sampling.delta, row_labels, w)
        fid = evaluator(samples)
        row = dict(guidance=w, fid=fid)
        if w is not None:
            row['accuracy'] = {
                name: accuracy(model, samples, labels) for name, (model, _) in found.items()
            }
            tables.append(class_grid(samples, labels, config.model.num_classes, GRID_COLUMNS))
        rows.append(row)
        print(row, flush=True)
    title = (
        f'{config.data.dataset}, checkpoint {model.step}: {f.num.value} samples per w '
        f'({f.num.value // config.model.num_classes} per class), δ = {config.sampling.delta}'
    )
    names = list(found)
    table = [
        f'{title}\n',
        '| guidance w | '
        + ' | '.join(f'accuracy: {n} ({100 * found[n][1]:.1f}% on real test digits)' for n in names)
        + ' | FID |',
        '|---:|' + '---:|' * (len(names) + 1),
    ] + [
        f'| {r["guidance"]:g} | '
        + ' | '.join(f'{100 * r["accuracy"][n]:.1f}%' for n in names)
        + f' | {r["fid"]:.2f} |'
        if r['guidance'] is not None
        else '| ∅ (no class) | ' + '– | ' * len(names) + f'{r["fid"]:.2f} |'
        for r in rows
    ]
    print('\n'.join(table))
    out = f.out.value
    if out:
        storage.makedirs(out)
        measure.write_json(
            os.path.join(out, 'conditional.json'),
            dict(
                **measure.device_info(),
                workdir=workdir,
                step=model.step,
                num_samples=f.num.value,
                classifier_test_accuracy={name: a for name, (_, a) in found.items()},
                rows=rows,
            ),
        )
        storage.write_text(os.path.join(out, 'conditional.md'), '\n'.join(table) + '\n')
        save_figure(os.path.join(out, 'conditional_grid.png'), tables, weights, title)


if __name__ == '__main__':
    app.run(functools.partial(main, f=_define_flags()))
