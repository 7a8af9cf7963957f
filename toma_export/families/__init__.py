"""Model families: one module per family holds everything family-specific (the spec: loading, sizes,
graph I/O, loop, pipeline, the served call; the ToMA patch hooks; the benchmark block). Generic code asks
the family. Adding a family is one module and one line here."""
from ..toma.patch import register_family
from . import flux, sdxl
from .spec import ModelSpec, read_config

FAMILIES = {"flux": flux, "sdxl": sdxl}
for _name, _module in FAMILIES.items():
    register_family(_name, _module)


def specs() -> dict:
    """Every registered model name -> its spec: the networks, then their ControlNets."""
    from . import controlnet

    networks = {name: spec for module in FAMILIES.values() for name, spec in module.specs().items()}
    return {**networks, **controlnet.specs(networks)}


__all__ = ["FAMILIES", "ModelSpec", "read_config", "specs"]
