"""DDPM (Ho et al. 2020) on the digits of configs/digits.py: the same data, U-Net, steps, batch
and optimiser, for a comparison on equal terms (docs/processes.md).

The process is Ho et al.'s (Sec. 4): T = 1000 levels, β linear from 1e-4 to 0.02, ε-prediction
with L_simple, ancestral sampling with the posterior variance. model.K is T here.
"""

from configs import digits


def get_config():
    config = digits.get_config()
    config.model.process = 'ddpm'
    config.model.K = 1000  # T (Ho et al., Sec. 4)
    config.model.beta_min = 1e-4
    config.model.beta_max = 0.02
    # One sample grid, at the end: a 1000-level chain of 64 samples takes minutes on a CPU.
    config.training.sampling_freq = 2000
    return config
