"""benchmarks/memory_table.py: the published-size models' parameter counts (built on the meta device) match the
published sizes, and the table's figures match an independent computation from those counts (the ZeRO paper's
accounting: 2 + 2 + K bytes per parameter, K = 12 for AdamW in mixed precision)."""

from __future__ import annotations

import pytest

from benchmarks.memory_table import GIB, STRATEGIES, Counts, count, per_gpu, table

# published sizes (reference notes): minDALL-E 1.3B backbone (storydalle.md 2.1: ~1.29B), DALL-E Mega 2.6B
# (storydalle.md 2.3), AR-LDM ~1.5B (arldm.md 3.1); StoryDALL-E adds the story block and the cross-attention
# (minDALL-E: 28.3M + 132M) or condition layers (Mega: ~134M), and both keep a VQGAN (~76M) frozen
PUBLISHED = {"mindalle": (1.29e9, 1.53e9), "mega": (2.6e9, 2.80e9), "arldm": (1.5e9, 1.51e9)}


@pytest.fixture(scope="module")
def counts() -> dict[str, Counts]:
    return {m: count(m) for m in PUBLISHED}


def test_parameter_counts_match_the_published_sizes(counts):
    for model, (published, total) in PUBLISHED.items():
        c = counts[model]
        assert c.total == pytest.approx(total, rel=0.02), model
        assert published <= c.total <= published * 1.2, model  # the backbone plus the story parts
        assert 0 < c.frozen < 0.06 * c.total, model  # only the VQGAN / VAE is frozen in the published recipes
        assert 0 < c.largest_block < c.total and 0 < c.root < c.total


def test_table_matches_an_independent_computation():
    c = Counts("x", trainable=1_000_000_000, frozen=100_000_000, largest_block=50_000_000, root=200_000_000)
    P, T, N = 1.1e9, 1.0e9, 8
    expected = {  # bytes per GPU: (2 weights + 2 grads + 12 optimizer) per the ZeRO paper, bf16 weights of frozen too
        "ddp": 4 * P + 4 * T + 8 * T,
        "fsdp": (4 * P + 4 * P + 8 * T) / N,
        "deepspeed_zero2": 2 * P + (2 * T + 12 * T) / N,
        "deepspeed_zero3": (2 * P + 2 * T + 12 * T) / N,
        "deepspeed_zero3_offload": 0,
    }
    for strategy in STRATEGIES:
        assert per_gpu(c, strategy, N)["total"] == pytest.approx(expected[strategy] / GIB), strategy
    offload = per_gpu(c, "deepspeed_zero3_offload", N)
    assert offload["cpu_per_node"] == pytest.approx((2 * P + 16 * T) / GIB)
    assert per_gpu(c, "ddp", N, "32-true")["total"] == pytest.approx((4 * P + 12 * T) / GIB)
    assert per_gpu(c, "deepspeed_zero3", N, "32-true")["total"] == pytest.approx((4 * P + 12 * T) / N / GIB)
    with pytest.raises(ValueError):
        per_gpu(c, "zero4", N)


def test_markdown_table_has_every_model_and_strategy(counts):
    text = table(list(counts.values()), gpus=8, precision="bf16-mixed")
    assert "computed" in text and "activations excluded" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "B / " in line]
    assert len(rows) == len(PUBLISHED) * len(STRATEGIES)


# ------------------------------------------------------------------------------------------ saved-tensor counter

def linear_gelu_stack(widths, device="cpu"):
    import torch

    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(torch.nn.Linear(a, b, device=device))
        if i < len(widths) - 2:
            layers.append(torch.nn.GELU())
    return torch.nn.Sequential(*layers)


def hand_count(n, widths, act_bytes):
    """Linear saves its input (and its weight); GELU saves its input, the previous Linear's output, and hands a new
    tensor, the next Linear's input: per hidden width two n x d tensors, plus the stack's input."""
    return act_bytes * n * (widths[0] + 2 * sum(widths[1:-1]))


def test_ledger_counts_a_linear_gelu_stack_as_by_hand():
    import torch

    from benchmarks.memory_table import SavedTensorLedger

    n, widths = 3, [5, 7, 11, 2]
    stack = linear_gelu_stack(widths)
    ledger = SavedTensorLedger(stack.parameters())
    with ledger:
        loss = stack(torch.randn(n, widths[0])).sum()
    assert ledger.total("activations") == hand_count(n, widths, 4)
    # addmm saves a weight only for the gradient of its input, never the bias; the stack's input needs none
    weights = sum(4 * a * b for a, b in zip(widths[1:], widths[2:]))
    assert ledger.total("parameters") == weights and ledger.total("weight_copies") == 0
    loss.backward()  # the hooks hand back what they were given


def test_ledger_counts_a_storage_once_whatever_views_are_saved():
    import torch

    from benchmarks.memory_table import SavedTensorLedger

    x = torch.randn(4, 6, requires_grad=True)
    with SavedTensorLedger() as ledger:
        y = x * 2  # saves nothing (a constant factor)
        z = (y * y).sum() + (y[1:].exp()).sum()  # y twice, a view of y, and exp's result (its own storage)
    assert ledger.total("activations") == 4 * 24 + 4 * 18
    z.backward()


def test_cuda_autocast_model_on_meta_matches_cpu_autocast_on_real_tensors():
    """The stack's ops (linear, GELU) are on CPU and CUDA autocast's lists alike: CPU autocast on real tensors,
    counted by the same ledger, gives the bytes the model gives on meta tensors, and both are the hand count with
    bf16 activations plus one bf16 copy of each weight."""
    import torch

    from benchmarks.memory_table import SavedTensorLedger, make_cuda_execution_model, meta_autocast_accepted

    n, widths = 3, [5, 7, 11, 2]
    copies = sum(2 * a * b for a, b in zip(widths[1:], widths[2:]))  # as saved: not the first layer's
    real = linear_gelu_stack(widths)
    with SavedTensorLedger(real.parameters()) as cpu_ledger, torch.autocast("cpu", dtype=torch.bfloat16):
        real(torch.randn(n, widths[0])).float().sum()
    meta = linear_gelu_stack(widths, device="meta")
    meta_ledger = SavedTensorLedger(meta.parameters())
    mode = make_cuda_execution_model()(meta_ledger, torch.bfloat16)
    with meta_autocast_accepted(), torch.autocast("cpu", dtype=torch.bfloat16), mode, meta_ledger:
        meta(torch.randn(n, widths[0], device="meta")).float().sum()
    assert meta_ledger.total("activations") == hand_count(n, widths, 2)
    assert meta_ledger.total("weight_copies") == copies
    assert cpu_ledger.total("activations") == hand_count(n, widths, 2) + copies  # no model: copies unmarked


def test_attention_is_counted_as_the_memory_efficient_kernel():
    """q, k, v, the output (n x h x L x d each) and the fp32 log-sum-exp (n x h x L) for self-attention: no L x L
    matrix."""
    import torch
    import torch.nn.functional as F

    from benchmarks.memory_table import SavedTensorLedger, make_cuda_execution_model

    b, h, length, d = 2, 3, 64, 8
    q, k, v = (torch.randn(b, h, length, d, device="meta", requires_grad=True) for _ in range(3))
    ledger = SavedTensorLedger()
    with make_cuda_execution_model()(ledger, None), ledger:
        F.scaled_dot_product_attention(q, k, v)
    philox = 2 * 8  # the dropout RNG's seed and offset (int64 scalars)
    assert ledger.total("activations") == 4 * (4 * b * h * length * d + b * h * length) + philox
