"""Loss kernels: per-token log-probs and entropy from hidden states, without full logits.

Packaged as ``lightning_rl.kernels``. No Lightning import here: the kernels are plain torch
(and Triton, where available) so they can be tested and benchmarked on their own.

Imports inside this folder are relative and pull in nothing but torch: run from a checkout's root,
this folder is importable as a top-level ``kernels``, which transformers imports while probing for
the unrelated ``kernels`` package; it must then load cleanly (and, having no ``__version__``, read
as "not that package"). Where that package is installed (transformers 5.25 and newer require it),
the folder hands the top-level name over to it (:mod:`._shadowing`).
"""

from pathlib import Path

from ._shadowing import installed_package_for_top_level_name

if __name__ != "kernels" or installed_package_for_top_level_name(__name__, Path(__file__).parent) is None:
    from .reference import token_logprobs_entropy_reference

    __all__ = ["token_logprobs_entropy_reference"]
