"""Sparse dictionaries read from disk: real SAELens and sparsify folders written here, their encodings checked
against an independent NumPy recomputation of each architecture, and every input error by its message."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ndx_pipeline.core.data import dictionaries
from ndx_pipeline.core.data.dictionaries import HOOKS, Dictionary, load_dictionary
from ndx_pipeline.core.errors import NdxInputError

D_IN, N = 16, 40
RTOL, ATOL = 1e-5, 1e-6


def _rng(seed=0):
    return np.random.default_rng(seed)


def _weights(seed=0, d_in=D_IN, n=N, d_out=None):
    rng = _rng(seed)
    d_out = d_in if d_out is None else d_out
    return {
        "W_enc": rng.normal(size=(d_in, n)).astype(np.float32) / np.sqrt(d_in),
        "b_enc": rng.normal(scale=0.3, size=n).astype(np.float32),
        "W_dec": rng.normal(size=(n, d_out)).astype(np.float32),
        "b_dec": rng.normal(scale=0.5, size=d_out).astype(np.float32),
        "threshold": np.abs(rng.normal(scale=0.3, size=n)).astype(np.float32) - 0.05,  # a few negative
    }


def _inputs(seed=1, shape=(3, 5)):
    return _rng(seed).normal(size=(*shape, D_IN)).astype(np.float32)


def write_saelens(folder, cfg, weights, keys=("W_enc", "b_enc", "W_dec", "b_dec"), dtype=torch.float32):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: torch.from_numpy(weights[k]).to(dtype) for k in keys}, str(folder / "sae_weights.safetensors"))
    return folder


def write_sparsify(folder, cfg, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, str(folder / "sae.safetensors"))
    return folder


def sparsify_tensors(seed=0, d_in=D_IN, n=N, d_out=None, skip=False):
    w = _weights(seed, d_in, n, d_out)
    out = {"encoder.weight": np.ascontiguousarray(w["W_enc"].T), "encoder.bias": w["b_enc"],
           "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    if skip:
        out["W_skip"] = np.zeros((d_in, d_in), dtype=np.float32)
    return out


def old_cfg(**extra):
    """A SAELens config as versions before 6 wrote it."""
    cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": N, "hook_name": "blocks.8.hook_resid_post",
           "hook_layer": 8, "activation_fn_str": "relu", "activation_fn_kwargs": {}, "apply_b_dec_to_input": True,
           "model_name": "gpt2-small", "normalize_activations": "none", "dtype": "float32"}
    cfg.update(extra)
    return cfg


def v6_cfg(architecture, hook="blocks.3.hook_mlp_out", **extra):
    """A SAELens config as version 6 writes it: the hook in metadata, no activation function."""
    cfg = {"architecture": architecture, "d_in": D_IN, "d_sae": N, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": "pythia-70m", "hook_name": hook, "sae_lens_version": "6.5.1"}}
    cfg.update(extra)
    return cfg


# Independent NumPy recomputations (float64) of what each library's encode returns.

def ref_pre(x, w, subtract_b_dec=True, scale=1.0):
    x = x.astype(np.float64) * scale
    if subtract_b_dec:
        x = x - w["b_dec"].astype(np.float64)
    return x @ w["W_enc"].astype(np.float64) + w["b_enc"].astype(np.float64)


def ref_relu(pre):
    return np.maximum(pre, 0.0)


def ref_jumprelu(pre, threshold):
    return np.where(pre > threshold.astype(np.float64), np.maximum(pre, 0.0), 0.0)


def ref_topk(pre, k):
    out = np.zeros_like(pre)
    flat, res = pre.reshape(-1, pre.shape[-1]), out.reshape(-1, pre.shape[-1])
    for row, dst in zip(flat, res):
        top = np.argsort(-row)[:k]
        dst[top] = np.maximum(row[top], 0.0)
    return out


def close(got, want):
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=RTOL, atol=ATOL)


# SAELens

def test_saelens_relu_before_v6(tmp_path):
    w = _weights()
    sae = load_dictionary(write_saelens(tmp_path / "sae", old_cfg(), w))
    assert (sae.format, sae.architecture, sae.d_in, sae.n_latents, sae.k) == ("saelens", "relu", D_IN, N, None)
    assert (sae.hook, sae.layer, sae.transcoder, sae.model) == ("resid_post", 8, False, "gpt2-small")
    x = _inputs()
    want = ref_relu(ref_pre(x, w))
    assert (want > 0).any() and (want == 0).any()
    got = sae.encode(torch.from_numpy(x))
    assert got.shape == (3, 5, N)
    close(got, want)
    close(sae.encode(torch.from_numpy(x), latents=[7, 2, 39]), want[..., [7, 2, 39]])
    close(sae.encode(torch.from_numpy(x[0, 0])), want[0, 0])  # a single vector


def test_saelens_without_b_dec_on_the_input(tmp_path):
    w = _weights(seed=3)
    sae = load_dictionary(write_saelens(tmp_path / "sae", old_cfg(apply_b_dec_to_input=False), w))
    assert not sae.b_dec_in.any()
    x = _inputs()
    close(sae.encode(torch.from_numpy(x)), ref_relu(ref_pre(x, w, subtract_b_dec=False)))


def test_saelens_jumprelu_v6(tmp_path):
    w = _weights(seed=4)
    sae = load_dictionary(write_saelens(tmp_path / "sae", v6_cfg("jumprelu"), w,
                                        keys=("W_enc", "b_enc", "W_dec", "b_dec", "threshold")))
    assert (sae.architecture, sae.hook, sae.layer, sae.model) == ("jumprelu", "mlp_out", 3, "pythia-70m")
    x = _inputs()
    want = ref_jumprelu(ref_pre(x, w), w["threshold"])
    # the gate removes some positive pre-activations that plain ReLU keeps
    assert ((ref_relu(ref_pre(x, w)) > 0) & (want == 0)).any()
    close(sae.encode(torch.from_numpy(x)), want)
    close(sae.encode(torch.from_numpy(x), latents=torch.tensor([0, 11, 5])), want[..., [0, 11, 5]])


def test_saelens_jumprelu_log_threshold(tmp_path):
    w = _weights(seed=5)
    w["log_threshold"] = np.log(np.abs(w["threshold"]) + 0.01).astype(np.float32)
    sae = load_dictionary(write_saelens(tmp_path / "sae", v6_cfg("jumprelu"), w,
                                        keys=("W_enc", "b_enc", "W_dec", "b_dec", "log_threshold")))
    x = _inputs()
    close(sae.encode(torch.from_numpy(x)), ref_jumprelu(ref_pre(x, w), np.exp(w["log_threshold"])))


@pytest.mark.parametrize("style", ["v5_activation_fn", "v6_top_level_k"])
def test_saelens_topk(tmp_path, style):
    w = _weights(seed=6)
    if style == "v5_activation_fn":
        cfg = old_cfg(activation_fn_str="topk", activation_fn_kwargs={"k": 4})
    else:
        cfg = v6_cfg("topk", k=4)
    sae = load_dictionary(write_saelens(tmp_path / "sae", cfg, w))
    assert (sae.architecture, sae.k) == ("topk", 4)
    x = _inputs(shape=(4, 6))
    want = ref_topk(ref_pre(x, w), 4)
    assert ((want > 0).sum(-1) <= 4).all() and ((want > 0).sum(-1) == 4).any()
    close(sae.encode(torch.from_numpy(x)), want)
    # columns are taken after the top k of all latents: a latent outside the top k reads 0 even when positive
    pre = ref_pre(x, w)
    outside = (pre > 0) & (want == 0)
    column = int(np.argwhere(outside.reshape(-1, N))[0][1])
    picked = [column, int(np.argmax(pre.reshape(-1, N)[0])), 1]
    got = sae.encode(torch.from_numpy(x), latents=picked)
    close(got, want[..., picked])
    assert (got[..., 0].numpy()[outside[..., column]] == 0).all()


def test_saelens_topk_rescaled_by_decoder_norm(tmp_path):
    w = _weights(seed=7)
    sae = load_dictionary(write_saelens(tmp_path / "sae", v6_cfg("topk", k=5, rescale_acts_by_decoder_norm=True), w))
    x = _inputs()
    pre = ref_pre(x, w) * np.linalg.norm(w["W_dec"].astype(np.float64), axis=-1)
    close(sae.encode(torch.from_numpy(x)), ref_topk(pre, 5))


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale"])
def test_saelens_runtime_input_normalization(tmp_path, norm):
    w = _weights(seed=8)
    sae = load_dictionary(write_saelens(tmp_path / "sae", old_cfg(normalize_activations=norm), w))
    assert sae.input_norm == norm
    x = _inputs().astype(np.float64)
    if norm == "layer_norm":
        centred = x - x.mean(-1, keepdims=True)
        xn = centred / (centred.std(-1, ddof=1, keepdims=True) + 1e-5)
    else:
        xn = x * np.sqrt(D_IN) / np.linalg.norm(x, axis=-1, keepdims=True)
    close(sae.encode(torch.from_numpy(x.astype(np.float32))), ref_relu(ref_pre(xn, w)))


def test_saelens_expected_average_scaling(tmp_path):
    w = _weights(seed=9)
    folder = write_saelens(tmp_path / "sae", v6_cfg("standard", normalize_activations="expected_average_only_in"), w)
    with pytest.raises(NdxInputError, match="expected_average_only_in.*activation_scaler.json"):
        load_dictionary(folder)
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.5}))
    x = _inputs()
    close(load_dictionary(folder).encode(torch.from_numpy(x)), ref_relu(ref_pre(x, w, scale=2.5)))


def test_saelens_transcoder(tmp_path):
    w = _weights(seed=10, d_out=24)
    cfg = v6_cfg("transcoder", hook="blocks.5.ln2.hook_normalized", d_out=24, apply_b_dec_to_input=False)
    tc = load_dictionary(write_saelens(tmp_path / "tc", cfg, w))
    assert (tc.transcoder, tc.architecture, tc.hook, tc.layer, tc.d_in) == (True, "relu", "mlp_in", 5, D_IN)
    assert not tc.b_dec_in.any()
    x = _inputs()
    close(tc.encode(torch.from_numpy(x)), ref_relu(ref_pre(x, w, subtract_b_dec=False)))
    jt = load_dictionary(write_saelens(tmp_path / "jt", {**cfg, "architecture": "jumprelu_skip_transcoder"}, w,
                                       keys=("W_enc", "b_enc", "W_dec", "b_dec", "threshold")))
    assert (jt.architecture, jt.transcoder) == ("jumprelu", True)
    close(jt.encode(torch.from_numpy(x)), ref_jumprelu(ref_pre(x, w, subtract_b_dec=False), w["threshold"]))


@pytest.mark.parametrize("hook_name, hook, layer", [
    ("blocks.0.hook_resid_pre", "resid_pre", 0),
    ("blocks.11.hook_resid_post", "resid_post", 11),
    ("blocks.2.hook_mlp_out", "mlp_out", 2),
    ("blocks.7.mlp.hook_post", "mlp_hidden", 7),
    ("blocks.4.ln2.hook_normalized", "mlp_in", 4),
    ("blocks.3.attn.hook_z", None, 3),
    ("blocks.6.hook_resid_mid", None, 6),
    ("hook_embed", None, None),
])
def test_saelens_hook_names(tmp_path, hook_name, hook, layer):
    cfg = old_cfg(hook_name=hook_name)
    del cfg["hook_layer"]
    sae = load_dictionary(write_saelens(tmp_path / "sae", cfg, _weights()))
    assert (sae.hook, sae.layer) == (hook, layer)


def test_saelens_oldest_keys_and_layer_fallback(tmp_path):
    cfg = old_cfg()
    del cfg["hook_name"], cfg["hook_layer"]
    cfg.update(hook_point="blocks.9.hook_resid_pre", hook_point_layer=9)
    sae = load_dictionary(write_saelens(tmp_path / "a", cfg, _weights()))
    assert (sae.hook, sae.layer) == ("resid_pre", 9)
    cfg = old_cfg(hook_name="hook_embed", hook_layer=0)
    sae = load_dictionary(write_saelens(tmp_path / "b", cfg, _weights()))
    assert (sae.hook, sae.layer) == (None, 0)


def test_half_precision_weights_and_inputs(tmp_path):
    w = _weights(seed=11)
    sae = load_dictionary(write_saelens(tmp_path / "sae", old_cfg(), w, dtype=torch.bfloat16))
    assert sae.W_enc.dtype == torch.float32
    x = torch.from_numpy(_inputs()).to(torch.bfloat16)
    rounded = {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in w.items()}
    close(sae.encode(x), ref_relu(ref_pre(x.float().numpy(), rounded)))


# sparsify

def sparsify_cfg(**extra):
    cfg = {"expansion_factor": 32, "normalize_decoder": True, "num_latents": N, "k": 5, "multi_topk": False,
           "skip_connection": False, "transcode": False, "d_in": D_IN}
    cfg.update(extra)
    return cfg


def test_sparsify_topk_sae(tmp_path):
    tensors = sparsify_tensors(seed=12)
    sae = load_dictionary(write_sparsify(tmp_path / "layers.6", sparsify_cfg(), tensors))
    assert (sae.format, sae.architecture, sae.k, sae.n_latents, sae.d_in) == ("sparsify", "topk", 5, N, D_IN)
    assert (sae.hook, sae.layer, sae.transcoder) == ("resid_post", 6, False)
    w = {"W_enc": tensors["encoder.weight"].T, "b_enc": tensors["encoder.bias"], "b_dec": tensors["b_dec"]}
    x = _inputs(shape=(2, 7))
    want = ref_topk(ref_relu(ref_pre(x, w)), 5)
    close(sae.encode(torch.from_numpy(x)), want)
    close(sae.encode(torch.from_numpy(x), latents=[39, 0, 17, 17]), want[..., [39, 0, 17, 17]])


def test_sparsify_topk_transcoder(tmp_path):
    tensors = sparsify_tensors(seed=13, skip=True)
    cfg = sparsify_cfg(transcode=True, skip_connection=True, k=6)
    tc = load_dictionary(write_sparsify(tmp_path / "model.layers.2.mlp", cfg, tensors))
    assert (tc.transcoder, tc.hook, tc.layer, tc.k) == (True, "mlp_in", 2, 6)
    assert not tc.b_dec_in.any()
    w = {"W_enc": tensors["encoder.weight"].T, "b_enc": tensors["encoder.bias"]}
    x = _inputs()
    want = ref_topk(ref_relu(ref_pre(x, w, subtract_b_dec=False)), 6)
    close(tc.encode(torch.from_numpy(x)), want)
    close(tc.encode(torch.from_numpy(x), latents=[3, 30]), want[..., [3, 30]])


@pytest.mark.parametrize("folder, transcode, hook, layer", [
    ("layers.6", False, "resid_post", 6),
    ("layers.6", True, "resid_pre", 6),
    ("layers.6.mlp", False, "mlp_out", 6),
    ("gpt_neox.layers.4.mlp", False, "mlp_out", 4),
    ("gpt_neox.layers.4.mlp", True, "mlp_in", 4),
    ("model.layers.12", False, "resid_post", 12),
    ("transformer.h.3", False, "resid_post", 3),
    ("layers.5.self_attn", False, None, 5),
    ("embed_tokens", False, None, None),
])
def test_sparsify_hookpoints(tmp_path, folder, transcode, hook, layer):
    tc = load_dictionary(write_sparsify(tmp_path / folder, sparsify_cfg(transcode=transcode), sparsify_tensors()))
    assert (tc.hook, tc.layer) == (hook, layer)


def test_sparsify_width_from_expansion_factor(tmp_path):
    tensors = sparsify_tensors(n=2 * D_IN)
    sae = load_dictionary(write_sparsify(tmp_path / "a" / "layers.1", sparsify_cfg(num_latents=0, expansion_factor=2),
                                         tensors))
    assert sae.n_latents == 2 * D_IN
    cfg = sparsify_cfg(num_latents=0, expansion_factor=3)
    with pytest.raises(NdxInputError, match=r"\[32, 16\].*48 latents"):
        load_dictionary(write_sparsify(tmp_path / "b" / "layers.1", cfg, tensors))


# Paths, overrides and the helpers

def test_path_may_be_folder_config_or_weights(tmp_path):
    folder = write_sparsify(tmp_path / "layers.3", sparsify_cfg(), sparsify_tensors())
    for given in (folder, folder / "cfg.json", folder / "sae.safetensors", str(folder)):
        sae = load_dictionary(given)
        assert (sae.path, sae.format, sae.layer) == (str(folder), "sparsify", 3)
    folder = write_saelens(tmp_path / "sl", old_cfg(), _weights())
    assert load_dictionary(folder / "sae_weights.safetensors").format == "saelens"


def test_overrides(tmp_path):
    folder = write_saelens(tmp_path / "sae", old_cfg(), _weights())
    sae = load_dictionary(folder, hook="mlp_out", layer=2)
    assert (sae.hook, sae.layer) == ("mlp_out", 2)
    unknown = load_dictionary(write_saelens(tmp_path / "z", old_cfg(hook_name="blocks.1.attn.hook_z"), _weights()))
    assert unknown.hook is None
    assert load_dictionary(unknown.path, hook="resid_pre").hook == "resid_pre"
    with pytest.raises(NdxInputError, match="hook 'mlp_post' is not known.*resid_pre"):
        load_dictionary(folder, hook="mlp_post")
    with pytest.raises(NdxInputError, match="layer must be a non-negative integer"):
        load_dictionary(folder, layer=-1)
    assert set(HOOKS) == {"resid_pre", "resid_post", "mlp_in", "mlp_out", "mlp_hidden"}


def test_describe_and_check_fits(tmp_path):
    sae = load_dictionary(write_sparsify(tmp_path / "layers.6.mlp", sparsify_cfg(transcode=True), sparsify_tensors()))
    line = sae.describe()
    for part in ("sparsify", "topk (k=5)", "transcoder", f"{N} latents", "mlp_in", "layer 6", str(sae.path)):
        assert part in line
    assert "\n" not in line
    sae.check_fits(D_IN, "the MLP input of model M")
    with pytest.raises(NdxInputError) as err:
        sae.check_fits(576, "the MLP input of model M")
    assert str(err.value) == f"dictionary {sae.path} reads {D_IN}-wide activations but the MLP input of model M " \
                             f"is 576 wide."
    assert "unknown hook of unknown layer" in Dictionary(
        path="p", format="saelens", architecture="relu", d_in=2, n_latents=3, layer=None, hook=None, k=None,
        transcoder=False, W_enc=torch.zeros(2, 3), b_enc=torch.zeros(3), b_dec_in=torch.zeros(2),
        threshold=None).describe()


@pytest.mark.parametrize("architecture", ["relu", "jumprelu", "topk"])
def test_sparse_entries_are_the_nonzero_latents(tmp_path, monkeypatch, architecture):
    """`encode_sparse` (what the extraction reads) gives exactly the nonzero activations of the independent
    recomputation, at their (window, position, latent), for all latents and for a chosen few (TopK choosing among all
    of them first), across chunks of rows and with the chunk buffer reused from call to call."""
    w = _weights(seed=15)
    keys = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if architecture == "jumprelu" else ())
    cfg = v6_cfg("topk", k=4) if architecture == "topk" else v6_cfg(architecture) if architecture == "jumprelu" \
        else old_cfg()
    sae = load_dictionary(write_saelens(tmp_path / "sae", cfg, w, keys=keys))
    pre = ref_pre(_inputs(shape=(4, 7)), w)
    want = {"relu": ref_relu(pre), "jumprelu": ref_jumprelu(pre, w["threshold"]),
            "topk": ref_topk(pre, 4)}[architecture]
    x = torch.from_numpy(_inputs(shape=(4, 7)))
    monkeypatch.setattr(dictionaries, "_CHUNK_ELEMENTS", N * 5)  # five rows at a time: 28 rows in 6 chunks
    chosen = [17, 3, 30, 8]
    for latents, expected in ((None, want), (chosen, want[..., chosen])):
        for _ in range(2):  # the second call reuses the buffer the first one left
            got = sae.encode_sparse(x, latents)
            assert (got.batch, got.positions, got.units) == expected.shape
            assert len(got.value) == (expected > 0).sum() and (got.value > 0).all()
            close(got.dense(), expected)
            np.testing.assert_array_equal(got.dense().numpy() > 0, expected > 0)


def test_weights_move_once_per_device_and_rows_are_chunked(tmp_path, monkeypatch):
    w = _weights(seed=14)
    sae = load_dictionary(write_saelens(tmp_path / "sae", v6_cfg("topk", k=3), w))
    x = _inputs(shape=(6, 9))
    whole = sae.encode(torch.from_numpy(x))
    cached = sae._on_device["cpu"]
    monkeypatch.setattr(dictionaries, "_CHUNK_ELEMENTS", N * 4)  # four rows at a time
    close(sae.encode(torch.from_numpy(x)), whole.numpy())
    close(sae.encode(torch.from_numpy(x), latents=[1, 2]), whole.numpy()[..., [1, 2]])
    assert sae._on_device["cpu"] is cached and len(sae._on_device) == 1
    close(whole, ref_topk(ref_pre(x, w), 3))


def test_encode_rejects_wrong_width_and_latents(tmp_path):
    sae = load_dictionary(write_saelens(tmp_path / "sae", old_cfg(), _weights()))
    with pytest.raises(NdxInputError, match=f"reads {D_IN}-wide activations but was given 15-wide"):
        sae.encode(torch.zeros(2, 15))
    with pytest.raises(NdxInputError, match=f"latents 0..{N - 1}, so latent {N} does not exist"):
        sae.encode(torch.zeros(2, D_IN), latents=[0, N])
    with pytest.raises(NdxInputError, match="latent -1 does not exist"):
        sae.encode(torch.zeros(2, D_IN), latents=[-1])
    with pytest.raises(NdxInputError, match="integer indices"):
        sae.encode(torch.zeros(2, D_IN), latents=torch.tensor([0.5]))
    assert sae.encode(torch.zeros(2, 3, D_IN), latents=[]).shape == (2, 3, 0)


# Input errors: one sentence naming the file and what is wrong

def test_missing_paths_and_files(tmp_path):
    with pytest.raises(NdxInputError, match="does not exist"):
        load_dictionary(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NdxInputError, match=r"empty has no cfg\.json\.$"):
        load_dictionary(tmp_path / "empty")
    for hookpoint in ("layers.0", "layers.1"):
        write_sparsify(tmp_path / "repo" / hookpoint, sparsify_cfg(), sparsify_tensors())
    with pytest.raises(NdxInputError, match=r"repo has no cfg\.json; it holds one folder per hookpoint "
                                            r"\(layers\.0, layers\.1\), so give one of them"):
        load_dictionary(tmp_path / "repo")
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "cfg.json").write_text("{}")
    with pytest.raises(NdxInputError, match="neither sae_weights.safetensors .SAELens. nor sae.safetensors"):
        load_dictionary(tmp_path / "cfg_only")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(NdxInputError, match="neither a folder, a cfg.json nor a .safetensors file"):
        load_dictionary(tmp_path / "notes.txt")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cfg.json").write_text("{not json")
    (tmp_path / "bad" / "sae.safetensors").write_bytes(b"garbage")
    with pytest.raises(NdxInputError, match=r"bad/cfg\.json is not readable JSON"):
        load_dictionary(tmp_path / "bad")
    (tmp_path / "bad" / "cfg.json").write_text(json.dumps(sparsify_cfg()))
    with pytest.raises(NdxInputError, match=r"bad/sae\.safetensors could not be read as safetensors"):
        load_dictionary(tmp_path / "bad")


def test_missing_tensor(tmp_path):
    folder = write_saelens(tmp_path / "sae", old_cfg(), _weights(), keys=("W_enc", "W_dec", "b_dec"))
    with pytest.raises(NdxInputError, match=r"sae_weights\.safetensors have no tensor 'b_enc' \(found: W_dec, "):
        load_dictionary(folder)
    folder = write_saelens(tmp_path / "j", v6_cfg("jumprelu"), _weights())
    with pytest.raises(NdxInputError, match="no tensor 'threshold' .a JumpReLU needs its thresholds."):
        load_dictionary(folder)
    tensors = sparsify_tensors()
    del tensors["b_dec"]
    with pytest.raises(NdxInputError, match="no tensor 'b_dec' .an autoencoder subtracts it from its input."):
        load_dictionary(write_sparsify(tmp_path / "layers.1", sparsify_cfg(), tensors))


def test_shapes_that_disagree(tmp_path):
    w = _weights()
    with pytest.raises(NdxInputError, match=r"'W_enc' of shape \[16, 40\], but cfg\.json says d_in=32"):
        load_dictionary(write_saelens(tmp_path / "a", old_cfg(d_in=32), w))
    with pytest.raises(NdxInputError, match=r"'W_enc' of shape \[16, 40\], but cfg\.json says d_sae=64"):
        load_dictionary(write_saelens(tmp_path / "b", old_cfg(d_sae=64), w))
    bad = dict(w, b_enc=w["b_enc"][:-1])
    with pytest.raises(NdxInputError, match=r"'b_enc' of shape \[39\], but W_enc of shape \[16, 40\] needs \[40\]"):
        load_dictionary(write_saelens(tmp_path / "c", old_cfg(), bad))
    bad = dict(w, b_dec=np.zeros(8, dtype=np.float32))
    with pytest.raises(NdxInputError, match=r"'b_dec' of shape \[8\], but a SAE with d_out=16 needs \[16\]"):
        load_dictionary(write_saelens(tmp_path / "d", old_cfg(), bad))
    bad = dict(w, threshold=np.zeros(3, dtype=np.float32))
    with pytest.raises(NdxInputError, match=r"'threshold' of shape \[3\], but a JumpReLU with 40 latents"):
        load_dictionary(write_saelens(tmp_path / "e", v6_cfg("jumprelu"), bad,
                                      keys=("W_enc", "b_enc", "W_dec", "b_dec", "threshold")))
    bad = dict(w, W_dec=np.zeros((N, 5), dtype=np.float32))
    with pytest.raises(NdxInputError, match=r"'W_dec' of shape \[40, 5\], but a decoder from 40 latents to 16"):
        load_dictionary(write_saelens(tmp_path / "f", old_cfg(), bad))
    with pytest.raises(NdxInputError, match=r"'encoder\.weight' of shape \[40, 16\], but cfg\.json says d_in=20"):
        load_dictionary(write_sparsify(tmp_path / "g" / "layers.0", sparsify_cfg(d_in=20), sparsify_tensors()))
    tensors = dict(sparsify_tensors(), **{"encoder.bias": np.zeros(7, dtype=np.float32)})
    with pytest.raises(NdxInputError, match=r"'encoder\.bias' of shape \[7\]"):
        load_dictionary(write_sparsify(tmp_path / "h" / "layers.0", sparsify_cfg(), tensors))
    tensors = dict(sparsify_tensors(), W_dec=np.zeros((N, 3), dtype=np.float32))
    with pytest.raises(NdxInputError, match=r"'W_dec' of shape \[40, 3\], but a SAE with 40 latents needs \[40, 16\]"):
        load_dictionary(write_sparsify(tmp_path / "i" / "layers.0", sparsify_cfg(), tensors))


def test_unsupported_architectures_and_activations(tmp_path):
    w = _weights()
    with pytest.raises(NdxInputError, match="SAELens architecture 'gated', which is not supported"):
        load_dictionary(write_saelens(tmp_path / "a", old_cfg(architecture="gated"), w))
    with pytest.raises(NdxInputError, match="batchtopk training checkpoint: save its inference form"):
        load_dictionary(write_saelens(tmp_path / "b", v6_cfg("batchtopk", k=4), w))
    with pytest.raises(NdxInputError, match="activation 'tanh-relu' for architecture 'standard', which is not"):
        load_dictionary(write_saelens(tmp_path / "c", old_cfg(activation_fn_str="tanh-relu"), w))
    with pytest.raises(NdxInputError, match="normalize_activations='whitening', which is not supported"):
        load_dictionary(write_saelens(tmp_path / "d", old_cfg(normalize_activations="whitening"), w))
    with pytest.raises(NdxInputError, match="sparsify activation 'groupmax', which is not supported"):
        load_dictionary(write_sparsify(tmp_path / "e" / "layers.0", sparsify_cfg(activation="groupmax"),
                                       sparsify_tensors()))
    with pytest.raises(NdxInputError, match="sets signed"):
        load_dictionary(write_sparsify(tmp_path / "f" / "layers.0", sparsify_cfg(signed=True), sparsify_tensors()))


def test_topk_needs_k(tmp_path):
    w = _weights()
    with pytest.raises(NdxInputError, match=r"cfg\.json describes a topk dictionary but gives no k\."):
        load_dictionary(write_saelens(tmp_path / "a", old_cfg(activation_fn_str="topk"), w))
    with pytest.raises(NdxInputError, match=r"gives k=0, not a whole number from 1 to 40 latents"):
        load_dictionary(write_saelens(tmp_path / "b", v6_cfg("topk", k=0), w))
    cfg = sparsify_cfg()
    del cfg["k"]
    with pytest.raises(NdxInputError, match="describes a sparsify topk dictionary but gives no k"):
        load_dictionary(write_sparsify(tmp_path / "c" / "layers.0", cfg, sparsify_tensors()))
    with pytest.raises(NdxInputError, match="gives k=99"):
        load_dictionary(write_sparsify(tmp_path / "d" / "layers.0", sparsify_cfg(k=99), sparsify_tensors()))


def test_non_finite_weights(tmp_path):
    w = _weights()
    w["W_enc"][3, 4] = np.nan
    with pytest.raises(NdxInputError, match=r"sae_weights\.safetensors hold non-finite values .inf or NaN. in 'W_enc'"):
        load_dictionary(write_saelens(tmp_path / "a", old_cfg(), w))
    tensors = sparsify_tensors()
    tensors["encoder.bias"][0] = np.inf
    with pytest.raises(NdxInputError, match=r"non-finite values .inf or NaN. in 'encoder\.bias'"):
        load_dictionary(write_sparsify(tmp_path / "b" / "layers.0", sparsify_cfg(), tensors))
