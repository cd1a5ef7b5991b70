"""configs/digits.py as a class-conditional model: the ten digits, classifier-free guidance.

The U-Net adds a class embedding (ten digits and the null class) to its time embedding; training
replaces the label by the null class with probability 0.2 (Ho & Salimans found 0.1-0.2 best).
Sampling draws every class in turn at guidance weight w = 4, from the KDE prior over the
training digits of the sample's class (docs/conditional.md).
"""

from configs import digits


def get_config():
    config = digits.get_config()
    config.model.num_classes = 10
    config.training.label_dropout = 0.2
    config.sampling.guidance = 4.0
    return config
