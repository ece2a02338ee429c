"""selfreward.policy.cpu_lora: the grouped CPU LoRA ops give vLLM's results, and the policy server
(real vLLM on CPU, tiny model, an adapter) runs them in its engine process."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

from selfreward.policy import cpu_lora, vllm_main  # noqa: E402

CASES = [
    ("one adapter", lambda n: torch.zeros(n, dtype=torch.long)),
    ("mixed, with -1", lambda n: torch.randint(-1, 3, (n,), generator=torch.Generator().manual_seed(1))),
    ("no tokens", lambda n: torch.zeros(0, dtype=torch.long)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_grouped_ops_equal_vllms(dtype: torch.dtype, case) -> None:
    g = torch.Generator().manual_seed(0)
    _, make_indices = case
    idx = make_indices(37)
    n = idx.numel()
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.0, "rtol": 0.0}
    x = torch.randn(n, 24, generator=g).to(dtype)
    a = torch.randn(3, 1, 8, 24, generator=g).to(dtype)  # shrink: (slots, 1, rank, in)
    b = torch.randn(3, 40, 8, generator=g).to(dtype)  # expand: (slots, out, rank), 3-d as vLLM may pass
    z = torch.randn(n, 8, generator=g).to(dtype)
    for scaling in (1.0, 0.5):
        want, got = torch.zeros(n, 8, dtype=dtype), torch.zeros(n, 8, dtype=dtype)
        lora_ops.bgmv_shrink(x, a, want, idx, scaling)
        cpu_lora.bgmv_shrink(x, a, got, idx, scaling)
        torch.testing.assert_close(got, want, **tol)
    for add in (False, True):
        base = torch.randn(n, 44, generator=g).to(dtype)  # wider than the adapter's out: padding
        want, got = base.clone(), base.clone()
        lora_ops.bgmv_expand(z, b, want, idx, add)
        cpu_lora.bgmv_expand(z, b, got, idx, add)
        torch.testing.assert_close(got, want, **tol)
        want, got = base.clone(), base.clone()
        lora_ops.bgmv_expand_slice(z, b, want, idx, 2, 40, add)
        cpu_lora.bgmv_expand_slice(z, b, got, idx, 2, 40, add)
        torch.testing.assert_close(got, want, **tol)
    assert vllm_main.GROUPED_CPU_LORA_ENV == cpu_lora.ENV  # the entry point's copy of the name


def test_install_replaces_the_ops_where_vllm_looks_them_up(monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm.lora.ops.torch_ops as pkg
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    for module in (lora_ops, pkg, punica_cpu):
        for name in cpu_lora.REPLACED:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    cpu_lora.install()
    assert punica_cpu.bgmv_shrink is cpu_lora.bgmv_shrink and punica_cpu.bgmv_expand is cpu_lora.bgmv_expand
    assert (
        lora_ops.bgmv_expand_slice is cpu_lora.bgmv_expand_slice and pkg.bgmv_shrink is cpu_lora.bgmv_shrink
    )
    # vLLM's prefill op calls the bgmv op through its module: the grouped one now
    x, a = torch.randn(5, 24), torch.randn(2, 1, 8, 24)
    out = torch.zeros(5, 8)
    lora_ops.sgmv_shrink(x, a, out, torch.tensor([0]), torch.tensor([5]), torch.tensor([1]), 1, 5, 5, 1.0)
    torch.testing.assert_close(out, x @ a[1, 0].T)
