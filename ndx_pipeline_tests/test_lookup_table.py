"""The token lookup table kept during extraction: per token id, counts and each neuron's activation sums, equal to
a brute force over every real token; padding never counts; stored keyed by token text."""

import numpy as np
import pytest
import torch

from ndx_pipeline.core.contract import TOKEN_TABLE_SCHEMA
from ndx_pipeline.core.data import forward_pass, record_frames, selection
from ndx_pipeline.core.data.subject_model import mlp_output_projections
from ndx_pipeline.core.data.windows import TokenTexts
from ndx_pipeline.core.models import special_token_wrap


def test_token_table_sums_and_counts_by_token_id():
    sel = selection.LayerSelection([0, 2], window_tokens=3, top_k=1, sample=np.array([], dtype=np.int64),
                                   token_vocab=np.array([7, 5, 9]))
    acts = torch.tensor([[[1.0, 0, 10.0], [2.0, 0, 20.0], [99.0, 0, 99.0]],
                         [[4.0, 0, 40.0], [8.0, 0, 80.0], [16.0, 0, 160.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])  # the 99s are padding
    ids = torch.tensor([[5, 7, 0], [7, 9, 5]])  # the padded id 0 is not in the vocabulary: ignored as padding
    acts = acts[..., [0, 2]]  # the selection is given its units' columns (UnitSet.encode picks them)
    sel.update(acts, mask, torch.tensor([0, 1]), ids)
    vocab, counts, sums = sel.token_table()
    assert vocab.tolist() == [5, 7, 9]
    assert counts.tolist() == [2, 2, 1]
    np.testing.assert_allclose(sums, [[1 + 16, 10 + 160], [2 + 4, 20 + 40], [8, 80]])
    with pytest.raises(ValueError, match="token ids"):
        sel.update(acts, mask, torch.tensor([2, 3]))


def test_selection_without_table_refuses_to_give_one():
    sel = selection.LayerSelection([0], window_tokens=2, top_k=1, sample=np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="no token table"):
        sel.token_table()


def test_token_table_frame_merges_ids_with_the_same_text():
    class Texts:
        def __call__(self, ids):
            return [{5: "a", 7: "b", 9: "a"}[int(i)] for i in ids]

    sel = selection.LayerSelection([0], window_tokens=2, top_k=1, sample=np.array([], dtype=np.int64),
                                   token_vocab=np.array([5, 7, 9, 11]))
    sel.update(torch.tensor([[[1.0], [2.0]], [[3.0], [5.0]]]), torch.ones(2, 2, dtype=torch.bool),
               torch.tensor([0, 1]), torch.tensor([[5, 7], [9, 9]]))
    sel.token_vocab = sel.token_vocab[:3]  # id 11 never occurs; rows with count 0 are dropped anyway
    sel.token_count, sel.token_sum = sel.token_count[:3], sel.token_sum[:3]
    frame = record_frames.token_table_frame(4, sel, Texts())
    assert frame.columns == list(TOKEN_TABLE_SCHEMA)
    got = {r["token"]: (r["count"], r["activation_sum"], r["mean_activation"]) for r in frame.iter_rows(named=True)}
    assert got == {"a": (3, 9.0, 3.0), "b": (1, 2.0, 2.0)}
    assert frame["layer"].to_list() == [4, 4] and frame["neuron"].to_list() == [0, 0]


def test_token_table_equals_brute_force(subject, small_windows):
    model, tok = subject
    neurons = [3, 700]
    selections, _ = forward_pass.extract(model, tok, small_windows, {1: neurons}, top_k=5, random_k=5, batch_size=5,
                                         token_table=True)
    prefix, _ = special_token_wrap(tok)
    proj = mlp_output_projections(model, [1])[1]
    sums, counts = {}, {}
    for w in range(len(small_windows)):
        ids = small_windows.ids[w, : small_windows.length[w]].tolist()
        seen = []
        handle = proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
        try:
            with torch.inference_mode():
                model(input_ids=torch.tensor([prefix + ids]))
        finally:
            handle.remove()
        vals = seen[0][0, len(prefix):, neurons].double().numpy()
        for i, t in enumerate(ids):
            sums[t] = sums.get(t, 0) + vals[i]
            counts[t] = counts.get(t, 0) + 1
    vocab, got_counts, got_sums = selections[1].token_table()
    assert sorted(vocab.tolist()) == sorted(counts)
    for row, t in enumerate(vocab.tolist()):
        assert got_counts[row] == counts[t]
        np.testing.assert_allclose(got_sums[row], sums[t], rtol=1e-4, atol=1e-4)
    frame = record_frames.token_table_frame(1, selections[1], TokenTexts(tok))
    assert frame.filter(frame["neuron"] == 3)["count"].sum() == small_windows.total_tokens
    total = frame.filter(frame["neuron"] == 700)["activation_sum"].sum()
    assert total / small_windows.total_tokens == pytest.approx(selections[1].moments()[0][1], rel=1e-6, abs=1e-9)
