"""Time one full policy step per policy on a steady-state cache.

One step = ``begin_step`` + insert one entry per head + ``observe`` every layer (per layer,
through ``state.layer(l)`` views, as the attention backend does, or all layers at once) +
``select_evictions`` + ``remove``. The cache starts full: every-step policies hold their
budget (``slots - 1``) and evict one entry per head per step; snapkv/rkv rows start at
random points of their ``buffer`` cycle, so a step compresses about ``1/buffer`` of the
heads, as in a running batch. Prints a markdown table of median / max milliseconds.

Example: ``python benchmarks/policy_step.py --threads 1 2``
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from crystal_vllm.policy import POLICY_NAMES, UNBOUNDED, KVPolicy, PolicyState, make_policy


def _steady_state(
    policy: KVPolicy, args: argparse.Namespace, g: torch.Generator
) -> tuple[PolicyState, torch.Tensor]:
    """A state whose heads are full up to their budget, with warm scores; and budgets."""
    r, n_layers, n_heads, s = args.rows, args.layers, args.kv_heads, args.slots
    if policy.max_resident(1) == UNBOUNDED:  # full: leave room for the timed steps
        budget, fill = s, torch.full((r,), s // 2)
    elif hasattr(policy.config, "buffer"):
        budget = s - policy.config.buffer
        fill = torch.randint(budget, s, (r,), generator=g)
    else:
        budget, fill = s - 1, torch.full((r,), s - 1)
    state = policy.init_state(r, n_layers, n_heads, s)
    rows = torch.arange(r)
    slot = torch.arange(s)
    new = (slot < fill.view(-1, 1)).view(r, 1, 1, s).expand(r, n_layers, n_heads, s).clone()
    # Scatter positions over slots so that slot order is not position order.
    positions = torch.stack([torch.randperm(s, generator=g) for _ in range(r)])
    positions = positions.view(r, 1, 1, s).expand_as(new).clone()
    policy.insert(state, rows, new, positions, prefill=True)
    for _ in range(max(policy.obs_window, 1)):
        policy.begin_step(state, rows)
        policy.observe(state, rows, _probs(state, args, g))
    policy.remove(state, rows, policy.select_evictions(state, rows, _budgets(budget, args)))
    return state, _budgets(budget, args)


def _budgets(budget: int, args: argparse.Namespace) -> torch.Tensor:
    return torch.full((args.rows, args.layers, args.kv_heads), budget)


def _probs(state: PolicyState, args: argparse.Namespace, g: torch.Generator) -> torch.Tensor:
    """Softmax attention over the valid slots for every query head."""
    logits = torch.randn(
        (args.rows, args.layers, args.kv_heads * args.group, args.slots), generator=g
    )
    mask = state.valid.repeat_interleave(args.group, dim=2)
    return torch.where(mask, logits * 3, -torch.inf).softmax(-1).nan_to_num(0.0)


def _new_entries(state: PolicyState) -> tuple[torch.Tensor, torch.Tensor]:
    """One new entry per head in its first free slot (the cache layer's job, not timed)."""
    free = ~state.valid
    slot = free.to(torch.int8).argmax(-1, keepdim=True)
    new = torch.zeros_like(free).scatter_(-1, slot, True)
    positions = (state.position.amax(-1, keepdim=True) + 1).expand_as(new).contiguous()
    return new, positions


def _step(
    policy: KVPolicy,
    state: PolicyState,
    budgets: torch.Tensor,
    probs: torch.Tensor,
    keys: torch.Tensor | None,
    per_layer: bool,
) -> float:
    """Run one step; returns the milliseconds spent in policy calls."""
    rows = torch.arange(state.num_rows)
    new, positions = _new_entries(state)
    start = time.perf_counter()
    policy.begin_step(state, rows)
    policy.insert(state, rows, new, positions)
    if per_layer:
        for layer in range(state.num_layers):
            policy.observe(state.layer(layer), rows, probs[:, layer : layer + 1])
    else:
        policy.observe(state, rows, probs)
    evict = policy.select_evictions(state, rows, budgets, keys)
    policy.remove(state, rows, evict)
    return (time.perf_counter() - start) * 1e3


def bench(name: str, args: argparse.Namespace, threads: int) -> tuple[float, float]:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    policy = make_policy(name)
    state, budgets = _steady_state(policy, args, g)
    probs = _probs(state, args, g)
    keys = None
    if policy.needs_keys:
        shape = (args.rows, args.layers, args.kv_heads, args.slots, args.head_dim)
        keys = torch.randn(shape, generator=g).to(torch.bfloat16)
    times = []
    for i in range(args.warmup + args.steps):
        ms = _step(policy, state, budgets, probs, keys, args.observe == "layer")
        if i >= args.warmup:
            times.append(ms)
    return statistics.median(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", nargs="+", default=list(POLICY_NAMES), choices=POLICY_NAMES)
    parser.add_argument("--rows", type=int, default=64, help="concurrent requests")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--group", type=int, default=3, help="query heads per KV head")
    parser.add_argument("--slots", type=int, default=1024, help="slots per head")
    parser.add_argument("--head-dim", type=int, default=64, help="key size (rkv only)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per policy")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--observe",
        choices=("layer", "all"),
        default="layer",
        help="observe through per-layer views (as the backend does) or all layers at once",
    )
    args = parser.parse_args()

    print(
        f"policy step: {args.rows} requests x {args.layers} layers x {args.kv_heads} KV heads "
        f"x {args.slots} slots, GQA {args.group}, observe={args.observe}; torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}, "
        f"median/max of {args.steps} steps after {args.warmup} warm-up\n"
    )
    header = "| policy | " + " | ".join(f"{t} thread(s): median ms (max)" for t in args.threads)
    print(header + " |")
    print("|---" * (len(args.threads) + 1) + "|")
    for name in args.policies:
        cells = []
        for threads in args.threads:
            median, worst = bench(name, args, threads)
            cells.append(f"{median:.0f} ({worst:.0f})")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
