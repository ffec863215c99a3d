"""wina: sparsity-ready checkpoints for Hugging Face causal LMs (WINA / TEAL activation sparsity)."""

__version__ = "0.1.0"

__all__ = ["load", "convert", "WinaError", "__version__"]

from .errors import WinaError


def load(path_or_id, sparsity=None, **kwargs):
    """Load an annotated checkpoint (directory or Hub id); see `wina.runtime.WinaModel.from_pretrained`."""
    from wina.runtime.wina_model import load as _load

    return _load(path_or_id, sparsity=sparsity, **kwargs)


def convert(model, out, options=None, overwrite=False):
    """Convert a model (Hub id, local dir or .gguf) into an annotated checkpoint; see `wina.convert.convert`."""
    from wina.convert.converter import convert as _convert

    return _convert(model, out, options=options, overwrite=overwrite)
