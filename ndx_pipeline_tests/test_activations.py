"""Activation records on the real bundled model: stored top windows equal a brute force, values equal a fresh
forward pass, moments equal numpy, the random sample follows its seed, and nothing above the deepest requested
layer is computed."""

import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch

from ndx_pipeline.core.data import forward_pass, record_frames, selection
from ndx_pipeline.core.data.subject_model import mlp_output_projections
from ndx_pipeline.core.data.windows import TokenTexts
from ndx_pipeline.core.models import special_token_wrap

LAYERS = {0: [3, 250, 1000], 2: [7, 1535]}


class AllSeen(Exception):
    """Raised by a forward hook once every module asked for has been seen: the layers after them need not run (a
    causal model's earlier layers never read later ones, so what was seen is what the whole pass would have given)."""


def hooked_pass(model, input_ids, modules: dict) -> dict:
    """{name: tensor}: the input ("in") or output ("out") of each named module (`modules`: name → (module, side)) in
    one forward pass over `input_ids`, by hooks registered here; the pass stops once every one has been seen."""
    seen = {}

    def keep(name, x):
        seen.setdefault(name, x.clone())
        if len(seen) == len(modules):
            raise AllSeen

    handles = []
    for name, (module, side) in modules.items():
        if side == "in":
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: keep(name, a[0])))
        else:
            handles.append(module.register_forward_hook(
                lambda m, a, o, name=name: keep(name, o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.inference_mode():
            model(input_ids=input_ids)
    except AllSeen:
        pass
    finally:
        for h in handles:
            h.remove()
    assert set(seen) == set(modules)
    return seen


def fresh_activations(model, tokenizer, ids, layers):
    """A new forward pass of one window alone: {layer: [tokens, all neurons]} at each MLP output projection (the pass
    stopped once every layer asked for has been seen)."""
    prefix, suffix = special_token_wrap(tokenizer)
    seen = hooked_pass(model, torch.tensor([prefix + list(ids) + suffix]),
                       {layer: (proj, "in") for layer, proj in mlp_output_projections(model, list(layers)).items()})
    return {layer: x[0, len(prefix) : len(prefix) + len(ids)].float().numpy() for layer, x in seen.items()}


@pytest.fixture(scope="module")
def extracted(subject, small_windows):
    model, tok = subject
    selections, stats = forward_pass.extract(model, tok, small_windows, LAYERS, top_k=20, random_k=20, seed=5,
                                             batch_size=7)
    return selections, stats


@pytest.fixture(scope="module")
def brute(subject, small_windows):
    model, tok = subject
    out = {layer: [] for layer in LAYERS}
    for w in range(len(small_windows)):
        fresh = fresh_activations(model, tok, small_windows.ids[w, : small_windows.length[w]], LAYERS)
        for layer, neurons in LAYERS.items():
            out[layer].append(fresh[layer][:, neurons])
    return out


def test_windows_never_cross_documents(small_windows, small_docs, subject):
    _, tok = subject
    texts = dict(zip(small_docs["doc_id"], small_docs["text"]))
    for w in range(len(small_windows)):
        doc = small_windows.doc_ids[small_windows.doc_index[w]]
        enc = tok(texts[doc], add_special_tokens=False)["input_ids"]
        start, n = small_windows.token_start[w], small_windows.length[w]
        assert enc[start : start + n] == small_windows.ids[w, :n].tolist()
        assert n == 64 or start + n == len(enc)


def test_top_windows_equal_brute_force(extracted, brute):
    selections, _ = extracted
    for layer, neurons in LAYERS.items():
        sel = selections[layer]
        for i, neuron in enumerate(neurons):
            maxima = np.array([a[:, i].max() for a in brute[layer]])
            order = sorted(range(len(maxima)), key=lambda w: (-maxima[w], w))[:20]
            stored = sel.top_window[i].tolist()
            assert stored[0] == order[0]
            assert set(stored) == set(order), (layer, neuron)
            np.testing.assert_allclose(sel.top_max[i].numpy(), maxima[order], rtol=1e-4, atol=1e-4)
            for rank, w in enumerate(stored):
                n = len(brute[layer][w])
                np.testing.assert_allclose(sel.top_acts[i, rank, :n].numpy(), brute[layer][w][:, i], rtol=1e-4,
                                           atol=1e-4)


def test_moments_equal_numpy(extracted, brute):
    selections, stats = extracted
    for layer, neurons in LAYERS.items():
        allv = np.concatenate(brute[layer], axis=0).astype(np.float64)
        mean, var, mx = selections[layer].moments()
        np.testing.assert_allclose(mean, allv.mean(axis=0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(var, allv.var(axis=0), rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(mx, allv.max(axis=0), rtol=1e-4, atol=1e-5)
        assert selections[layer].count == stats.tokens == sum(len(a) for a in brute[layer])


def test_random_sample_follows_the_seed(extracted, brute, small_windows):
    selections, _ = extracted
    sample = selections[0].sample
    assert sample.tolist() == selection.random_windows(len(small_windows), 20, 5).tolist()
    assert sample.tolist() != selection.random_windows(len(small_windows), 20, 6).tolist()
    assert len(set(sample.tolist())) == len(sample)
    for slot, w in enumerate(sample):
        n = len(brute[0][w])
        np.testing.assert_allclose(selections[0].sample_acts[:, slot, :n].numpy().T, brute[0][w], rtol=1e-4,
                                   atol=1e-4)


def test_stored_records_recompute_from_the_document(extracted, subject, small_windows, small_docs):
    """Take stored rows, re-encode their document text, slice at token_start and run a fresh forward."""
    model, tok = subject
    selections, _ = extracted
    frame = record_frames.records_frame(2, selections[2], small_windows, TokenTexts(tok))
    assert set(frame["kind"].unique()) == {"top", "random"}
    # every row: as many activations as tokens, and its max_activation the largest of them
    assert frame["activations"].list.len().equals(frame["tokens"].list.len())
    assert frame["max_activation"].equals(frame["activations"].list.max(), check_names=False)
    assert (frame["tokens"].list.len() < small_windows.window_tokens).any()  # windows cut short at a document's end
    texts = dict(zip(small_docs["doc_id"], small_docs["text"]))
    for row in frame.filter(frame["rank"].is_in([0, 7])).iter_rows(named=True):
        enc = tok(texts[row["doc_id"]], add_special_tokens=False)["input_ids"]
        ids = enc[row["token_start"] : row["token_start"] + len(row["tokens"])]
        assert [tok.decode([i]) for i in ids] == row["tokens"]
        fresh = fresh_activations(model, tok, ids, [2])[2][:, row["neuron"]]
        np.testing.assert_allclose(np.array(row["activations"]), fresh, rtol=1e-4, atol=1e-4)
        assert row["max_activation"] == pytest.approx(max(row["activations"]))
        assert texts[row["doc_id"]][row["char_start"] : row["char_end"]] == "".join(row["tokens"])


def test_forward_stops_after_the_deepest_requested_layer(subject, small_windows):
    model, tok = subject
    from ndx_pipeline.core.data.subject_model import transformer_blocks

    _, blocks = transformer_blocks(model, model.config.num_hidden_layers)
    calls = []
    handle = blocks[3].register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        forward_pass.extract(model, tok, small_windows, {2: [0]}, top_k=5, random_k=5, batch_size=64)
    finally:
        handle.remove()
    assert calls == []


@pytest.fixture(params=["compiled", "torch"])
def selection_path(request, monkeypatch):
    """Selections made in the test take the compiled update (dense units on the CPU) or the torch one (GPUs, sparse
    units): each test that asks for this fixture runs on both."""
    monkeypatch.setattr(selection, "COMPILED_ON_CPU", request.param == "compiled")
    return request.param


def test_the_compiled_update_keeps_what_the_torch_update_keeps(subject, small_windows, monkeypatch):
    """On the real model, every neuron of two layers on both sides, with quantile samples and the token table: the
    compiled update keeps the same top windows and activations, random and quantile samples, maxima and token table
    as the torch update, exactly; the moments agree within float32 rounding (summed per window, not per batch)."""
    from ndx_pipeline.core.data.units import MlpNeurons

    model, tok = subject
    units = {layer: MlpNeurons(layer, range(1536), "both") for layer in (0, 2)}
    runs = {}
    for compiled in (True, False):
        monkeypatch.setattr(selection, "COMPILED_ON_CPU", compiled)
        runs[compiled], _ = forward_pass.extract(model, tok, small_windows, units, top_k=20, random_k=20, seed=5,
                                                 batch_size=7, quantile_k=3, token_table=True)
    for layer in units:
        fast, reference = runs[True][layer], runs[False][layer]
        assert fast.compiled and not reference.compiled
        for name in ("top_max", "top_window", "top_acts", "sample_acts", "max", "q_seen", "token_count", "token_sum"):
            assert torch.equal(getattr(fast, name), getattr(reference, name)), name
        for got, want in zip(fast.quantile_samples(), reference.quantile_samples()):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(fast.moments(), reference.moments()):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        assert fast.count == reference.count
        assert (fast.top_window >= 0).float().mean() > 0.9 and (fast.q_window >= 0).any()


def test_the_compiled_update_works_where_no_cache_can_be_written():
    """Installed read-only (an image whose package folder and home cannot be written), numba finds nowhere to cache
    the compiled update: the module still imports, and the update compiles in the process."""
    code = (
        "from numba.core import caching\n"
        "caching.CacheImpl._locator_classes = []  # numba's answer where no folder can be written\n"
        "import numpy as np, torch\n"
        "from ndx_pipeline.core.data import selection\n"
        "sel = selection.LayerSelection([0, 1], window_tokens=3, top_k=1, sample=np.array([], dtype=np.int64))\n"
        "sel.update(torch.tensor([[[1.0, -1.0], [2.0, 0.5], [0.0, 0.0]]]), torch.tensor([[True, True, False]]),\n"
        "           torch.tensor([4]))\n"
        "print(sel.compiled, sel.top_window.tolist(), sel.top_acts.tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[0] == "True [[4], [4]] [[[1.0, 2.0, 0.0]], [[-1.0, 0.5, 0.0]]]"


def test_ties_go_to_the_lower_window_index(selection_path):
    sel = selection.LayerSelection([0], window_tokens=2, top_k=3, sample=np.array([], dtype=np.int64))
    acts = torch.tensor([[[1.0], [0.0]], [[2.0], [0.0]], [[1.0], [0.0]]])  # windows 0, 1, 2: maxima 1, 2, 1
    mask = torch.ones(3, 2, dtype=torch.bool)
    sel.update(acts, mask, torch.tensor([0, 1, 2]))
    sel.update(torch.tensor([[[2.0], [1.0]]]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([3]))
    sel.update(torch.tensor([[[1.0], [0.0]]]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([4]))
    sel.finalize()
    assert sel.top_window[0].tolist() == [1, 3, 0]


def test_ties_resolve_the_same_whatever_order_the_windows_come_in(selection_path):
    """With quantile samples the pilot windows go first, so windows arrive out of index order; a tie must still go
    to the lower window index."""
    sel = selection.LayerSelection([0], window_tokens=1, top_k=2, sample=np.array([], dtype=np.int64))
    for w, v in [(5, 1.0), (9, 3.0), (2, 1.0), (7, 1.0), (0, 0.5)]:
        sel.update(torch.tensor([[[v]]]), torch.ones(1, 1, dtype=torch.bool), torch.tensor([w]))
    sel.finalize()
    assert sel.top_window[0].tolist() == [9, 2]


@pytest.fixture(scope="module")
def with_quantiles(subject, small_windows):
    model, tok = subject
    return forward_pass.extract(model, tok, small_windows, LAYERS, top_k=20, random_k=20, seed=5, batch_size=7,
                                quantile_k=3)


def test_quantile_samples_follow_pilot_boundaries_and_brute_force(with_quantiles, extracted, brute, small_windows):
    selections, stats = with_quantiles
    pilot = set(selection.pilot_windows(len(small_windows), 5).tolist())
    assert 0 < len(pilot) <= len(small_windows) // 2
    for layer, neurons in LAYERS.items():
        sel = selections[layer]
        windows, acts, bounds, seen = sel.quantile_samples()
        # the top windows and moments are those of the plain pass: the pilot-first order changes nothing there
        assert sel.top_window.tolist() == extracted[0][layer].top_window.tolist()
        np.testing.assert_allclose(sel.moments()[0], extracted[0][layer].moments()[0], rtol=1e-5, atol=1e-7)
        for i, _ in enumerate(neurons):
            maxima = np.array([a[:, i].max() for a in brute[layer]])
            np.testing.assert_allclose(bounds[i], np.quantile(maxima[sorted(pilot)], selection.QUANTILE_LEVELS),
                                       rtol=1e-4, atol=1e-4)
            others = np.array([w for w in range(len(maxima)) if w not in pilot])
            bucket_of = np.searchsorted(bounds[i], maxima[others], side="right")
            for bucket in range(len(selection.QUANTILE_LEVELS) + 1):
                members = set(others[bucket_of == bucket].tolist())
                assert seen[i, bucket] == len(members)
                kept = [int(w) for w in windows[i, bucket] if w >= 0]
                assert len(kept) == min(3, len(members)) and set(kept) <= members and kept == sorted(kept)
                for slot, w in enumerate(kept):
                    n = len(brute[layer][w])
                    np.testing.assert_allclose(acts[i, bucket, slot, :n], brute[layer][w][:, i], rtol=1e-4,
                                               atol=1e-4)


def test_quantile_samples_follow_the_seed_and_reach_the_records(subject, small_windows, with_quantiles):
    model, tok = subject
    again, _ = forward_pass.extract(model, tok, small_windows, {0: LAYERS[0]}, top_k=20, random_k=20, seed=5,
                                    batch_size=7, quantile_k=3)
    assert again[0].quantile_samples()[0].tolist() == with_quantiles[0][0].quantile_samples()[0].tolist()
    frame = record_frames.records_frame(0, with_quantiles[0][0], small_windows, TokenTexts(tok))
    kinds = set(frame["kind"].unique())
    assert {"top", "random"} <= kinds and kinds - {"top", "random"} <= {f"quantile_{b}" for b in range(5)}
    assert "quantile_0" in kinds and len(kinds) >= 4


def test_quantile_samples_are_uniform_over_their_bucket(selection_path):
    """Each bucket's sample is a uniform draw of `quantile_k` of its windows, whatever their order or batch: 4000
    units with the same activations draw independent samples, so each window of a bucket is kept by about
    units × k / members of them. Windows arrive several per batch (buckets with free slots fill from one batch)."""
    units, t, k, batch, n_windows = 4000, 2, 2, 5, 80
    rng = np.random.default_rng(3)
    maxima = rng.permutation(n_windows).astype(np.float32)  # window w's max, the same for every unit
    sel = selection.LayerSelection(range(units), window_tokens=t, top_k=1, sample=np.array([0]), quantile_k=k, seed=9)
    pilot = 2
    for number, b0 in enumerate(range(0, n_windows, batch)):
        if number == pilot:
            sel.end_pilot()
        index = torch.arange(b0, b0 + batch)
        acts = torch.tensor(maxima[b0 : b0 + batch])[:, None, None].expand(batch, t, units).contiguous()
        sel.update(acts, torch.ones(batch, t, dtype=torch.bool), index)
    windows, _, bounds, seen = sel.quantile_samples()
    later = np.arange(pilot * batch, n_windows)
    bucket_of = np.searchsorted(bounds[0], maxima[later], side="right")
    checked = 0
    for bucket in range(len(selection.QUANTILE_LEVELS) + 1):
        members = later[bucket_of == bucket]
        assert (seen[:, bucket] == len(members)).all()
        if len(members) <= k:  # every member kept by every unit
            assert all(sorted(w[w >= 0].tolist()) == sorted(members.tolist()) for w in windows[:, bucket])
            continue
        kept = np.bincount(windows[:, bucket].reshape(-1), minlength=n_windows)[members]
        expected = units * k / len(members)
        assert kept.sum() == units * k
        chi2 = ((kept - expected) ** 2 / expected).sum()  # ~ chi-square, len(members) - 1 degrees of freedom
        dof = len(members) - 1
        assert chi2 < dof + 6 * np.sqrt(2 * dof), (bucket, kept.tolist())
        checked += 1
    assert checked >= 2


def test_row_quantiles_equal_torch_quantile_to_the_bit():
    """The compiled path's quantile boundaries (selection, not sorting) equal torch.quantile's exactly, as the two
    update paths must bucket every window alike: rows of every length from 1, ties (rounded values, zero rows, ReLU
    halves), infinities and NaN (its row all NaN)."""
    rng = np.random.default_rng(0)
    levels = torch.tensor(selection.QUANTILE_LEVELS, dtype=torch.float32)
    for trial in range(40):
        m = int(rng.integers(1, 1500)) if trial else 1
        x = torch.from_numpy(rng.standard_normal((64, m)).astype(np.float32) * 3)
        if trial % 2:
            x = x.round()
        if trial % 3 == 0:
            x = torch.relu(x)
        if trial % 5 == 0:
            x[:20] = 0.0
        if trial % 7 == 0:
            x[3, 0], x[4, -1], x[5, 0] = float("nan"), float("inf"), float("-inf")
        want, got = torch.quantile(x, levels, dim=1).T, selection.row_quantiles(x, levels)
        assert torch.equal(got.isnan(), want.isnan()), trial
        assert torch.equal(got.nan_to_num(0.0, 1e30, -1e30), want.nan_to_num(0.0, 1e30, -1e30)), trial


def test_keep_smallest_keeps_each_rows_k_smallest_keys():
    """The merge behind the top windows and the quantile samples, against sorting: rows with no, one and several
    entering windows, free slots (equal keys) and windows that are no candidates."""
    rng = np.random.default_rng(0)
    k, n_b, rows = 4, 6, 3000
    kept = rng.integers(0, 1000, (rows, k))
    kept[rng.random((rows, k)) < 0.2] = selection.EMPTY_PRIORITY  # free slots
    batch = rng.integers(0, 1400, (rows, n_b))
    batch[rng.random((rows, n_b)) < 0.3] = selection.NEVER_ENTERS
    for r in range(rows):  # keys distinct within a row, except free slots and non-candidates
        values = rng.permutation(5000)[: k + n_b]
        kept[r] = np.where(kept[r] == selection.EMPTY_PRIORITY, kept[r], values[:k])
        batch[r] = np.where(batch[r] == selection.NEVER_ENTERS, batch[r], values[k:])
    key = torch.tensor(np.hstack([kept, batch]))
    row, slot, b, weakest = selection.keep_smallest(key, k)  # an entering window takes a slot of its own row
    after = key[:, :k].clone()
    after[row, slot] = key[row, k + b]
    expected = np.sort(np.hstack([kept, batch]), axis=1)[:, :k]
    np.testing.assert_array_equal(np.sort(after.numpy(), axis=1), expected)
    np.testing.assert_array_equal(key.gather(1, weakest[:, None]).squeeze(1).numpy(), expected[:, -1])
    entering = np.bincount(row.numpy(), minlength=rows)
    assert {0, 1} < set(entering.tolist()) and entering.max() > 2


def test_padding_never_enters_statistics(selection_path):
    sel = selection.LayerSelection([0], window_tokens=3, top_k=1, sample=np.array([0]))
    acts = torch.tensor([[[-5.0], [-6.0], [99.0]]])
    mask = torch.tensor([[True, True, False]])
    sel.update(acts, mask, torch.tensor([0]))
    sel.finalize()
    mean, var, mx = sel.moments()
    assert sel.count == 2 and mean[0] == pytest.approx(-5.5) and mx[0] == -5.0
    # the padded 99 does not make the unit fire there: no top window (a window enters only where the unit fired)
    assert sel.top_window[0, 0] == -1 and not sel.fired()[0]
    sel.update(torch.tensor([[[2.0], [-1.0], [99.0]]]), mask, torch.tensor([1]))
    sel.finalize()
    assert sel.top_window[0, 0] == 1 and sel.top_max[0, 0] == 2.0


def test_a_window_enters_the_top_windows_only_where_the_unit_fired(selection_path):
    """A unit silent (max ≤ 0) in a window never keeps it among its top ones, even with slots free; the windows where
    it fired are kept by (max desc, window asc) as before."""
    sel = selection.LayerSelection([0, 1], window_tokens=2, top_k=3, sample=np.array([], dtype=np.int64))
    acts = torch.tensor([[[0.0, -1.0], [0.0, -2.0]], [[0.5, 0.0], [0.0, 0.0]], [[-3.0, 0.0], [0.0, 0.0]],
                         [[0.0, 0.0], [0.7, 0.0]]])  # windows 0..3: unit 0 fires in 1 and 3, unit 1 in none
    sel.update(acts, torch.ones(4, 2, dtype=torch.bool), torch.arange(4))
    sel.finalize()
    assert sel.top_window.tolist() == [[3, 1, -1], [-1, -1, -1]]
    assert sel.top_acts[0, 0].tolist() == [0.0, pytest.approx(0.7)] and sel.fired().tolist() == [True, False]


def test_corpus_shorter_than_top_k_is_a_clear_error(subject, small_windows):
    from ndx_pipeline.core.errors import NdxInputError

    model, tok = subject
    with pytest.raises(NdxInputError, match="fewer than top_k=500"):
        forward_pass.extract(model, tok, small_windows, {0: [1]}, top_k=500)


def test_a_mirrored_selection_equals_selecting_on_both_signs(selection_path):
    """Both sides of a neuron (`MlpNeurons(..., "both")`) are selected from the positive half alone: the kept windows,
    activations, quantile samples, maxima and token table equal those of a plain selection given [x, -x], exactly
    (the moments within float32 rounding).
    On the torch path, 1100 neurons × 8 windows a batch take the transposed gather early in the pass and the strided
    one later; one window in each batch is shorter than the width."""
    rng = np.random.default_rng(3)
    n, t, n_windows, batch = 1100, 6, 96, 8
    ids = list(range(n)) + [-1 - i for i in range(n)]
    x = torch.tensor(rng.standard_normal((n_windows, t, n)), dtype=torch.float32)
    token_ids = torch.tensor(rng.integers(0, 40, (n_windows, t)))
    args = dict(window_tokens=t, top_k=4, sample=np.array([5, 17, 60]), token_vocab=np.arange(40), quantile_k=2,
                seed=1)
    plain, mirrored = selection.LayerSelection(ids, **args), selection.LayerSelection(ids, mirrored=True, **args)
    pilot = 2  # batches that set the quantile boundaries
    for b, b0 in enumerate(range(0, n_windows, batch)):
        if b == pilot:
            plain.end_pilot(), mirrored.end_pilot()
        mask = torch.ones(batch, t, dtype=torch.bool)
        mask[0, t - 2:] = False
        index = torch.arange(b0, b0 + batch)
        plain.update(torch.cat([x[index], -x[index]], dim=-1), mask, index, token_ids[index])
        mirrored.update(x[index], mask, index, token_ids[index])
    for sel in (plain, mirrored):
        sel.finalize()
    for name in ("top_max", "top_window", "top_acts", "sample_acts", "max", "q_window", "q_acts", "q_seen",
                 "q_bounds", "token_count"):
        assert torch.equal(getattr(plain, name), getattr(mirrored, name)), name
    for name in ("sum", "sumsq"):  # float32 per-batch sums: the reduction's blocking depends on the width read
        torch.testing.assert_close(getattr(plain, name), getattr(mirrored, name), rtol=1e-6, atol=1e-5)
    for a, b in zip(plain.token_table(), mirrored.token_table()):
        np.testing.assert_array_equal(a, b)
    assert plain.count == mirrored.count and (mirrored.top_window >= 0).all()


def test_a_nonnegative_selection_from_nonzero_entries_equals_the_dense_one(selection_path):
    """Sparse nonnegative units (dictionary latents): a nonnegative selection given the dense batch keeps exactly
    what a plain one keeps, and one given only the nonzero entries (`SparseActivations`, as dictionary latents are
    read) the same windows, activations, samples, quantile samples and token table too (its moments summed in
    float64, the plain one's in float32 per batch, or per window on the compiled path); it ignores an entry at a
    padding position."""
    from ndx_pipeline.core.data.selection import SparseActivations

    rng = np.random.default_rng(4)
    n, t, n_windows, batch = 900, 5, 64, 8
    x = torch.tensor(rng.standard_normal((n_windows, t, n)), dtype=torch.float32)
    x = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.03, x.abs(), 0.0)
    token_ids = torch.tensor(rng.integers(0, 30, (n_windows, t)))
    args = dict(window_tokens=t, top_k=3, sample=np.array([2, 40]), quantile_k=2, seed=2, token_vocab=np.arange(30))
    plain, silent_written, entries = (selection.LayerSelection(range(n), nonnegative=nonneg, **args)
                                      for nonneg in (False, True, True))
    for b, b0 in enumerate(range(0, n_windows, batch)):
        if b == 2:
            for sel in (plain, silent_written, entries):
                sel.end_pilot()
        index = torch.arange(b0, b0 + batch)
        mask = torch.ones(batch, t, dtype=torch.bool)
        mask[1, t - 1] = False  # a window one token short: its last position is padding
        real = torch.where(mask[..., None], x[index], 0.0)
        for sel in (plain, silent_written):
            sel.update(real, mask, index, token_ids[index])
        window, position, unit = x[index].nonzero(as_tuple=True)  # with the entries at the padding position
        entries.update(SparseActivations(window, position, unit, x[index][window, position, unit], batch, t, n),
                       mask, index, token_ids[index])
    for sel in (plain, silent_written, entries):
        sel.finalize()
    assert (plain.q_window >= 0).sum() > n  # silent windows were sampled: the path under test ran
    for other in (silent_written, entries):
        for name in ("top_max", "top_window", "top_acts", "sample_acts", "q_seen", "max", "token_count"):
            assert torch.equal(getattr(plain, name), getattr(other, name)), name
        for got, want in zip(other.quantile_samples(), plain.quantile_samples()):  # slots ordered by window
            np.testing.assert_array_equal(got, want)
        for name in ("sum", "sumsq", "token_sum"):
            torch.testing.assert_close(getattr(plain, name), getattr(other, name), rtol=1e-6, atol=1e-5)
        assert other.count == plain.count
    assert torch.equal(plain.sum, silent_written.sum)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-cpu-path", "torch-path"])
def test_a_unit_whose_activations_are_not_finite_fails_alone(compiled, small_docs, monkeypatch):
    """A neuron whose up-projection row is +inf: its activation is ±inf or NaN on every token. It was stored as one
    `dead` record (max −inf, mean NaN) and reported as a unit that never fired; on the torch path its NaN also
    reached the others' selection arithmetic. Now: one `failed` record saying why, on both paths, and the other
    units' records exactly as without the broken one."""
    from ndx_pipeline.core import stages, validation
    from ndx_pipeline.core.contract import FAILED_UNIT

    real = stages.load_subject_model

    def broken(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)
        with torch.no_grad():
            model.layers[0].mlp.up_proj.weight[77] = float("inf")
        return model, tokenizer

    monkeypatch.setattr(selection, "COMPILED_ON_CPU", compiled)
    settings = dict(neurons=[5, 77, 300], window_tokens=24, top_k=5, random_k=3, quantile_k=2)
    clean = stages.activation_records(small_docs, None, [0], **settings)
    monkeypatch.setattr(stages, "load_subject_model", broken)
    said = []
    found = stages.activation_records(small_docs, None, [0], log=said.append, **settings)
    layer = found.layers[0]
    total = found.stats.tokens
    first = layer.records.filter(pl.col("neuron") == 77)["window_index"][0]
    assert layer.failed == {77: f"activation not finite on {total} tokens, first in window {first}"}
    assert layer.dead == 0
    bad = layer.records.filter(pl.col("neuron") == 77)
    assert bad["kind"].to_list() == [FAILED_UNIT] and bad["error"][0].startswith(f"activation not finite on {total}")
    assert bad["window_index"][0] >= 0 and np.isnan(bad["neuron_mean"][0]) and bad["tokens"][0] is None
    assert any("1 of 3 units had activations that are not finite" in line for line in said)
    assert not any("never fired" in line for line in said)
    def others(records):  # (the token texts as text: each frame holds them as an Enum of its own rows' texts)
        return records.filter(pl.col("neuron") != 77).with_columns(pl.col("tokens").cast(pl.List(pl.String)))

    assert others(layer.records).equals(others(clean.layers[0].records))
    assert validation.record_counts(layer.records, [5, 77, 300], 5, 3)[0]
    assert sorted(stages.top_excerpts(layer.records, 2, 1, 1)["neuron"].unique()) == [5, 300]
