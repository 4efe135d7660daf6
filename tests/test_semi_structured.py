"""The opt-in 2:4 inference conversion: which weights count as 2:4, and what it refuses."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build

from optimum_statprune.semi_structured import is_two_four, to_semi_structured


def _naive_two_four(w: torch.Tensor) -> bool:
    for row in w.tolist():
        for g in range(0, len(row), 4):
            if sum(v != 0 for v in row[g : g + 4]) > 2:
                return False
    return True


@pytest.mark.parametrize("seed", range(6))
def test_is_two_four_matches_a_loop(seed):
    """2:4 weights by construction, and the same weights with one pruned entry revived in a random place."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 16, generator=g)
    keep = torch.rand(6, 4, 4, generator=g).argsort(-1)[..., :2]
    w = w * torch.zeros(6, 4, 4).scatter_(-1, keep, 1.0).reshape(6, 16)
    assert is_two_four(w) and _naive_two_four(w)
    zeros = (w == 0).nonzero()
    r, c = zeros[torch.randint(len(zeros), (1,), generator=g)].tolist()[0]
    w[r, c] = 1.0
    assert is_two_four(w) == _naive_two_four(w) is False


def test_is_two_four_edges():
    w = torch.tensor([[1.0, 2.0, 0.0, 0.0, 0.0, 3.0, 0.0, 4.0]])
    assert is_two_four(w)
    w[0, 2] = 5.0  # three nonzeros in the first group
    assert not is_two_four(w)
    assert not is_two_four(torch.zeros(2, 6))  # width not a multiple of 4


def _two_four_blocks(model) -> None:
    """Keep the 2 largest magnitudes of every 4 inputs in every linear of the decoder blocks."""
    with torch.no_grad():
        for layer in model.model.layers:
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear):
                    groups = m.weight.reshape(m.weight.shape[0], -1, 4)
                    keep = groups.abs().topk(2, dim=-1).indices
                    m.weight.copy_((groups * torch.zeros_like(groups).scatter_(-1, keep, 1.0)).reshape_as(m.weight))


def test_cpu_model_is_refused_with_the_fix():
    model = build("llama")
    _two_four_blocks(model)
    with pytest.raises(ValueError, match="float16 or bfloat16 on a CUDA device"):
        to_semi_structured(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured kernels need a GPU")
def test_dense_model_on_gpu_has_nothing_to_convert():
    model = build("llama").to("cuda", torch.float16)
    with pytest.raises(ValueError, match="no 2:4-sparse linear"):
        to_semi_structured(model)


def test_converted_linear_flattens_tokens_and_matches_linear():
    """The converted class's forward (one row per token) gives what ``nn.Linear`` gives on 1-, 2- and 3-D inputs."""
    from optimum_statprune.semi_structured import SemiStructuredLinear

    torch.manual_seed(0)
    dense = torch.nn.Linear(8, 6)
    converted = torch.nn.Linear(8, 6)
    converted.load_state_dict(dense.state_dict())
    converted.__class__ = SemiStructuredLinear
    for shape in [(8,), (5, 8), (3, 1, 8), (2, 7, 8)]:
        x = torch.randn(shape)
        torch.testing.assert_close(converted(x), dense(x), rtol=0, atol=0)


def test_converted_linear_returns_a_row_major_result(monkeypatch):
    """The sparse product comes back as a column-major view (the transpose of ``W @ x.T``); the converted
    linear hands the next layer a contiguous tensor. Emulated here with a linear that answers transposed."""
    from optimum_statprune.semi_structured import SemiStructuredLinear

    def transposed_linear(x, weight, bias=None):
        out = (weight @ x.T).T  # values of x @ W.T, laid out column-major as the sparse kernel leaves them
        return out if bias is None else out + bias

    monkeypatch.setattr(torch.nn.functional, "linear", transposed_linear)
    layer = torch.nn.Linear(8, 6, bias=False)
    layer.__class__ = SemiStructuredLinear
    x = torch.randn(2, 5, 8)
    out = layer(x)
    assert out.shape == (2, 5, 6) and out.is_contiguous()
    torch.testing.assert_close(out, x @ layer.weight.T)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured kernels need a GPU")
def test_converted_model_on_gpu_matches_its_dense_twin():
    """A small Llama (sizes the sparse kernels take) with 2:4 block linears: after conversion its logits match
    the dense 2:4 model's, every linear was converted, and each converted linear returns a contiguous tensor."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=128, max_position_embeddings=128)
    model = LlamaForCausalLM(config).to("cuda", torch.float16).eval()
    _two_four_blocks(model)
    ids = torch.randint(0, 128, (2, 64), device="cuda")
    with torch.no_grad():
        dense = model(ids).logits.float()
        converted = to_semi_structured(model)
        outputs = []
        hooks = [m.register_forward_hook(lambda m, a, out: outputs.append(out.is_contiguous()))
                 for m in model.modules() if type(m).__name__ == "SemiStructuredLinear"]
        sparse = model(ids).logits.float()
    for h in hooks:
        h.remove()
    assert len(converted) == 2 * 7 and len(outputs) == 2 * 7 and all(outputs)
    torch.testing.assert_close(sparse, dense, rtol=2e-2, atol=2e-2)
