"""Model merging: mergekit-compatible recipes merged in resident, reused buffers."""

from evo.merge.config import MergeConfig, ModelEntry
from evo.merge.engine import Merger, task_vectors
from evo.merge.io import load_model_dir, merge_to_dir
from evo.merge.registry import METHODS

__all__ = ["MergeConfig", "ModelEntry", "Merger", "task_vectors", "load_model_dir", "merge_to_dir", "METHODS"]
