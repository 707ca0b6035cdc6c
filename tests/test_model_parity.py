"""Our forward equals transformers' AutoModelForCausalLM on the same random checkpoints (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from offload_runtime import loading
from offload_runtime.caches import FullCache

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 500000.0}
CASES = {
    "llama-mha": ("llama", dict(num_key_value_heads=4)),
    "llama-gqa": ("llama", dict(num_key_value_heads=2)),
    "llama-gqa4-tied": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama-linear": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "llama-dynamic": ("llama", dict(max_position_embeddings=32,
                                    rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
    "llama-yarn": ("llama", dict(max_position_embeddings=64, rope_parameters=YARN)),
    "llama-llama3": ("llama", dict(max_position_embeddings=128, rope_parameters=LLAMA3)),
    "mistral": ("mistral", dict()),
    "mistral-sliding": ("mistral", dict(sliding_window=12)),
    "qwen2": ("qwen2", dict()),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=1)),
}
SCHEDULE = [23, 6, 1, 1, 1, 4, 1, 1, 1, 1]  # a prefill, a block, single-token steps (46 tokens)


def _tokens(tokenizer, long_text, n):
    return tokenizer(long_text)["input_ids"][:n]


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, checkpoint, tokenizer, long_text):
    model_type, overrides = CASES[case]
    path = checkpoint(model_type, **overrides)
    ours = loading.load(str(path), torch.device("cpu"), with_tokenizer=False).model
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = _tokens(tokenizer, long_text, sum(SCHEDULE))

    # one shot, several lengths
    for n in (1, 7, 19):
        cache = FullCache(ours.cfg, "cpu", torch.float32)
        got = ours(torch.tensor(ids[:n]), cache)
        with torch.no_grad():
            want = ref(torch.tensor([ids[:n]])).logits[0]
        assert (got - want).abs().max().item() < 1e-4, (case, n)

    # a prefill followed by blocks and single-token steps; transformers runs the same schedule with its cache
    cache, past, start = FullCache(ours.cfg, "cpu", torch.float32), None, 0
    for n in SCHEDULE:
        chunk = ids[start:start + n]
        got = ours(torch.tensor(chunk), cache)
        with torch.no_grad():
            out = ref(torch.tensor([chunk]), past_key_values=past, use_cache=True)
        past, start = out.past_key_values, start + n
        diff = (got - out.logits[0]).abs().max().item()
        assert diff < 1e-4, (case, start, diff)
    assert cache.length == sum(SCHEDULE)


def test_logits_are_not_flat(checkpoint, tokenizer, long_text):
    """The larger init std gives peaked distributions (a check on the test models themselves)."""
    model = loading.load(str(checkpoint("llama")), torch.device("cpu"), with_tokenizer=False).model
    ids = _tokens(tokenizer, long_text, 30)
    probs = torch.softmax(model(torch.tensor(ids), FullCache(model.cfg, "cpu", torch.float32)), -1)
    assert probs.max(-1).values.mean() > 10 / probs.shape[-1]  # far from uniform (1 / vocab)


@pytest.mark.parametrize("case", ["llama-gqa", "llama-bias"])
def test_fused_projections_are_views_and_fall_back(case, checkpoint, tokenizer, long_text):
    """A loaded model's q/k/v and gate/up weights are views of one matrix each (held once); when a
    weight is replaced the layer goes back to its separate Linears and the logits stay the same."""
    model_type, overrides = CASES[case]
    model = loading.load(str(checkpoint(model_type, **overrides)), torch.device("cpu"), with_tokenizer=False).model
    ids = torch.tensor(_tokens(tokenizer, long_text, 9))
    fused_logits = model(ids, FullCache(model.cfg, "cpu", torch.float32))
    for layer in model.model.layers:
        for fused, linears in ((layer.self_attn.qkv, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                               (layer.mlp.gate_up, [layer.mlp.gate_proj, layer.mlp.up_proj])):
            assert fused is not None and fused.current(linears)
            assert fused.weight.shape[0] == sum(lin.weight.shape[0] for lin in linears)
            assert all(lin.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
                       for lin in linears)
            assert (fused.bias is not None) == (case == "llama-bias")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[1].mlp
    attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.clone(), requires_grad=False)
    assert not attn.qkv.current([attn.q_proj, attn.k_proj, attn.v_proj])
    replaced = torch.nn.Linear(mlp.up_proj.in_features, mlp.up_proj.out_features, bias=mlp.up_proj.bias is not None)
    replaced.load_state_dict(mlp.up_proj.state_dict())
    mlp.up_proj = replaced.requires_grad_(False)  # a new module over equal weights: not the fused one
    assert not mlp.gate_up.current([mlp.gate_proj, mlp.up_proj])
    separate_logits = model(ids, FullCache(model.cfg, "cpu", torch.float32))
    assert attn.qkv is None and mlp.gate_up is None  # the stale matrices were dropped, not kept alive
    assert (separate_logits - fused_logits).abs().max().item() < 1e-5
    attn.k_proj.weight.mul_(1.5)  # the separate Linear really is what runs now
    assert (model(ids, FullCache(model.cfg, "cpu", torch.float32)) - fused_logits).abs().max().item() > 1e-3


def test_fused_matrix_is_stale_for_a_parametrized_weight():
    """A parametrized Linear has no `weight` entry in `_parameters`: stale (separate Linears), not a KeyError."""
    from torch.nn.utils import parametrize

    from offload_runtime.fused import FusedLinear

    linears = [torch.nn.Linear(8, n, bias=False) for n in (4, 2)]
    fused = FusedLinear(linears)
    assert fused.current(linears)

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(linears[1], "weight", Double())
    assert not fused.current(linears)
