"""mmedit: exact, reversible neuron-level editing and unlearning for multimodal LLMs."""
from mmedit.errors import MmeditError

__version__ = "0.1.0"
# The distribution's name on PyPI (`pip install mmedit-unlearn`; the import name stays mmedit). "mmedit" on
# PyPI is OpenMMLab's image and video editing toolbox, which also imports as mmedit: one per environment.
DISTRIBUTION = "mmedit-unlearn"
__all__ = ["Delta", "MmeditError", "__version__", "load"]


def __getattr__(name: str):
    # Delta and load pull in torch; importing them on first use keeps `import mmedit` light.
    if name == "Delta":
        from mmedit.delta import Delta

        return Delta
    if name == "load":
        from mmedit.checkpoint import load

        return load
    raise AttributeError(f"module 'mmedit' has no attribute {name!r}")
