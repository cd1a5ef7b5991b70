"""configs/digits.py with the heat process at continuous levels (model.process =
'heat_continuous'): the same U-Net, training and prior, the network estimating u_0 at any level
κ in [1, K], so that its samplers run any number of steps (docs/sampling.md)."""

from configs import digits


def get_config():
    config = digits.get_config()
    config.model.process = 'heat_continuous'
    return config
