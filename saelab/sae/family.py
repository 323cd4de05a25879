"""An architecture whose class is chosen by its activation: ``Name(cfg)`` builds ``Name.by_activation[cfg.act_fn]``.

The transcoders (``transcoder``, ``skip-transcoder``) and the cross-layer transcoder each have one registry name and
one class per activation (topk, relu, jumprelu); the name's class holds ``by_activation``, and building it from a
config gives the class of that config's activation, so every loader (``SAE.blank``, ``SAE.from_weights``, the
trainer) needs the name only.
"""

from __future__ import annotations


class ByActivation:
    """Mixin of an architecture's name class: ``by_activation`` (its own dict) maps cfg.act_fn to its class."""

    by_activation: dict[str, type] = {}

    def __new__(cls, cfg=None, *args, **kwargs):
        return super().__new__(cls.concrete(cfg) if cfg is not None else cls)

    @classmethod
    def concrete(cls, cfg) -> type:
        """The class that ``cls(cfg)`` builds: the one of cfg.act_fn when cls is a name class, else cls itself."""
        return cls.by_activation[cfg.act_fn] if "by_activation" in cls.__dict__ else cls
