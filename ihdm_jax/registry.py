"""Classes registered by name and chosen by a config key: the forward processes
(config.model.process) and the samplers (config.sampling.sampler)."""

from ihdm_jax import errors


class Registry:
    """The classes registered under their `name`, looked up by the config key `key` (e.g.
    'model.process')."""

    def __init__(self, key: str):
        self.key = key
        self.classes = {}

    def register(self, cls):
        """Class decorator: makes `cls` the class named cls.name."""
        self.classes[cls.name] = cls
        return cls

    def lookup(self, config):
        """The class that the config's value of `key` names (errors.UserError if none)."""
        section, field = self.key.split('.')
        name = config[section][field]
        if name not in self.classes:
            raise errors.UserError(
                f'config.{self.key}={name!r}; expected one of '
                f'{", ".join(repr(n) for n in self.classes)}.'
            )
        return self.classes[name]
