"""vLLM's CPU LoRA ops, grouped by adapter (`policy.grouped_cpu_lora`, on by default).

vLLM 0.32 serves LoRA on CPU through `vllm.lora.ops.torch_ops` (PunicaWrapperCPU): each of
`bgmv_shrink`, `bgmv_expand` and `bgmv_expand_slice` first gathers one copy of the adapter's
weight matrix per token (`lora_weights[token_lora_indices]`, a tokens x out x rank tensor) and
then multiplies token by token (`einsum("bi, boi -> bo")`). A prefill of 2,048 tokens through
one SmolLM2-135M MLP projection (576 -> 1536, rank 16) copies 100 MB for it; measured on this
2-core machine, bf16: 170 ms for the shrink and expand of one module against 23 ms for the
base layer's own matmul, which made judging with an adapter about 6 times slower than with
the base model (docs/policy.md). Prefill-heavy work, such as logprob judging (a long rubric,
one verdict token), is hit hardest.

The replacements here compute the same products with one matrix multiplication per distinct
adapter in the batch (usually one: a judgment batch asks one adapter), on the weights as they
are, with the same dtype casts, the same index semantics (a token's index picks
`lora_weights[index]`, -1 included, as indexing does in the originals) and the same writes into
the output tensor. `install()` puts them into vLLM's modules; `selfreward.policy.vllm_main`
calls it in the server process (and in the processes it spawns) when
SELFREWARD_GROUPED_CPU_LORA=1, which the launcher sets from the config. GPU platforms do not
use these ops (their punica kernels are Triton), so installing them changes nothing there.
"""

from __future__ import annotations

from typing import Any

ENV = "SELFREWARD_GROUPED_CPU_LORA"
IN_USE = "selfreward: grouped CPU LoRA ops in use"  # logged once per process, at the first call
_announced = False


def _products(inputs: Any, lora_weights: Any, dtype: Any, indices: Any) -> Any:
    """(tokens, out): row b = lora_weights[indices[b]] @ inputs[b], in `dtype`."""
    import torch

    global _announced
    if not _announced:
        _announced = True
        import os
        import sys

        print(f"{IN_USE} (pid {os.getpid()})", file=sys.stderr, flush=True)

    weights = lora_weights.squeeze(dim=1) if lora_weights.dim() == 4 else lora_weights
    x = inputs.to(dtype=dtype)
    if indices.numel() == 0:
        return x.new_zeros((0, weights.shape[1]))
    adapters = torch.unique(indices).tolist()
    if len(adapters) == 1:
        return x @ weights[adapters[0]].to(dtype=dtype).T
    out = x.new_empty((x.shape[0], weights.shape[1]))
    for k in adapters:
        rows = indices == k
        out[rows] = x[rows] @ weights[k].to(dtype=dtype).T
    return out


def bgmv_shrink(
    inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any, scaling: float = 1.0
) -> None:
    outputs = _products(inputs, lora_b_weights, output_tensor.dtype, lora_indices_tensor)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(
    inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any, add_inputs: bool = True
) -> None:
    outputs = _products(inputs, lora_b_weights, output_tensor.dtype, lora_indices_tensor)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # LoRA adapter and model may add different amounts of padding to output
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    lora_indices_tensor: Any,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    outputs = _products(inputs, lora_b_weights, output_tensor.dtype, lora_indices_tensor)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


REPLACED = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}


def install() -> list[str]:
    """Replace vLLM's CPU LoRA ops by the grouped ones where vLLM looks them up: the ops module
    (its sgmv_* prefill ops call the bgmv_* ones through it), the package that re-exports them
    and PunicaWrapperCPU's module, which imported them by name. Returns the modules patched."""
    import importlib

    patched = []
    for name in (
        "vllm.lora.ops.torch_ops.lora_ops",
        "vllm.lora.ops.torch_ops",
        "vllm.lora.punica_wrapper.punica_cpu",
    ):
        module = importlib.import_module(name)
        for attr, fn in REPLACED.items():
            if hasattr(module, attr):
                setattr(module, attr, fn)
        patched.append(name)
    return patched
