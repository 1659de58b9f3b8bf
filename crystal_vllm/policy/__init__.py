"""Scoring and selection for KV-cache eviction: Crystal-KV and the baselines.

Pure torch on batched ``[rows, layers, kv_heads, slots]`` tensors; no vLLM import. See
``docs/algorithm.md`` for the algorithm and the decisions this package takes.
"""

from crystal_vllm.policy.allocator import allocate_budgets
from crystal_vllm.policy.base import UNBOUNDED, KVPolicy, PolicyState
from crystal_vllm.policy.baselines import FullPolicy, H2OPolicy, RandomPolicy, StreamingPolicy
from crystal_vllm.policy.configs import (
    PROMPT_MODES,
    CrystalConfig,
    FullConfig,
    H2OConfig,
    LRFUConfig,
    LRUConfig,
    PolicyConfig,
    RandomConfig,
    RKVConfig,
    SnapKVConfig,
    StreamingConfig,
)
from crystal_vllm.policy.lrfu import CrystalLitePolicy, CrystalPolicy, LRFUPolicy, LRUPolicy
from crystal_vllm.policy.registry import (
    POLICY_NAMES,
    make_policy,
    policy_class,
    policy_param_names,
)
from crystal_vllm.policy.topp import top_p_mask
from crystal_vllm.policy.windowed import RKVPolicy, SnapKVPolicy

__all__ = [
    "POLICY_NAMES",
    "PROMPT_MODES",
    "UNBOUNDED",
    "CrystalConfig",
    "CrystalLitePolicy",
    "CrystalPolicy",
    "FullConfig",
    "FullPolicy",
    "H2OConfig",
    "H2OPolicy",
    "KVPolicy",
    "LRFUConfig",
    "LRFUPolicy",
    "LRUConfig",
    "LRUPolicy",
    "PolicyConfig",
    "PolicyState",
    "RandomConfig",
    "RandomPolicy",
    "RKVConfig",
    "RKVPolicy",
    "SnapKVConfig",
    "SnapKVPolicy",
    "StreamingConfig",
    "StreamingPolicy",
    "allocate_budgets",
    "make_policy",
    "policy_class",
    "policy_param_names",
    "top_p_mask",
]
