"""Several Macs, one model: tensor, expert and pipeline parallelism on ``mx.distributed``.

``load_distributed(path, mode, group)`` loads this rank's share only; ``Model.shard(group, mode)``
splits a model already in memory. Every rank must run the same calls in the same order.
"""

from .expert import expert_range, shard_experts
from .loading import load_distributed, param_bytes
from .pipeline import PipelineModel, parse_split, shard_pipeline, split_layers
from .share import MODES, Layout, rank_bytes
from .sync import root_ints, root_tokens
from .tensor import check_tensor_split, shard_tensor, tensor_rank_counts

__all__ = ["MODES", "Layout", "PipelineModel", "check_tensor_split", "expert_range", "load_distributed",
           "param_bytes", "parse_split", "rank_bytes", "root_ints", "root_tokens", "shard_experts",
           "shard_pipeline", "shard_tensor", "split_layers", "tensor_rank_counts"]
