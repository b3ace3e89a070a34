"""Lightning callbacks: the colocated vLLM rollout toggle, sample completions, the run report, the progress bar,
GC pauses kept out of the steps.
"""

from lightning_rl.callbacks.completions import CompletionSamples
from lightning_rl.callbacks.gc_pauses import FreezeLongLivedObjects
from lightning_rl.callbacks.progress import RLProgressBar
from lightning_rl.callbacks.report import RunReport
from lightning_rl.callbacks.vllm_rollout import VLLMRollout

__all__ = ["CompletionSamples", "FreezeLongLivedObjects", "RLProgressBar", "RunReport", "VLLMRollout"]
