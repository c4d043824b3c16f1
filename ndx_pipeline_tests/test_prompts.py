"""Exact prompt text for fixed small inputs: a wording change must be deliberate (and changes code versions)."""

import pytest

from ndx_pipeline.core.method.explainer import (
    FEW_SHOTS,
    LEAD_IN,
    ExplanationParseError,
    digest,
    explainer_messages,
    neuron_block,
    parse_explanation,
    prompt_sha256,
    strongest_tokens,
)
from ndx_pipeline.core.method.simulator import simulation_prompt

EXCERPTS = [(["x", " =", " 1", "\n"], [0, 0.5, 2.0, -1]), (["if", " x", "\t", "y"], [0.1, 0, 0, 0])]

SYSTEM = (
    "You are looking inside a language model at one neuron, a unit that fires on some pattern in text. You will see "
    "short excerpts of text, one token per line. After each token comes a tab and how strongly the neuron fires on "
    "that token, an integer from 0 (not at all) to 10 (as strongly as it ever does here). Below the excerpts, the "
    "tokens with the highest values are listed again. Finish the sentence about the neuron with a few words naming "
    "the tokens, or the kind of tokens, that make it fire."
)


def test_explainer_prompt_exact_text():
    messages = explainer_messages(EXCERPTS)
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * len(FEW_SHOTS) + ["user"]
    assert messages[0]["content"] == SYSTEM
    assert messages[1]["content"] == (
        "Neuron 1\nActivations:\n<start>\nSalt\t0\n and\t10\n pepper\t0\n are\t0\n on\t0\n the\t0\n table\t0\n"
        ",\t0\n bread\t0\n and\t9\n butter\t0\n too\t0\n<end>\n\n"
        "The same excerpts again, listing only the tokens where the neuron fires:\n<start>\n and\t10\n and\t9\n<end>"
        '\n\nStrongest tokens: "and"'
    )
    assert messages[2]["content"] == 'Its main job is to detect the word "and".'
    assert messages[4]["content"] == 'Its main job is to detect month names such as "March" and "June".'
    # The target: one common 0–10 scale over both excerpts (m = 2.0), escaped newline and tab tokens; the digest
    # lists tokens reaching half the strongest activation (" =" at 0.5 of 2.0 does not).
    assert messages[-1]["content"] == (
        "Neuron 5\nActivations:\n<start>\nx\t0\n =\t2\n 1\t10\n\\n\t0\n<end>\n<start>\nif\t0\n x\t0\n\\t\t0\ny\t0\n"
        '<end>\n\nStrongest tokens: "1"'
    )
    assert prompt_sha256(messages) == "b8c2661d283f13b3a11fefbe7a91811cf48fd350c8703763f1301a66557a3e22"


def test_digest_lists_strongest_tokens_in_order_escaping_whitespace():
    shown = [(["a", " b", "\n", " b", "c"], [1.0, 4.0, 10.0, 9.0, 5.0]), (["d"], [-3.0])]
    assert digest(shown) == 'Strongest tokens: "\\n", "b", "c"'
    assert strongest_tokens(shown, 2) == ["\n", " b"]
    assert digest([(["a"], [0.0])]) == "Strongest tokens: (none)"


def test_sparse_excerpts_are_repeated_without_zero_lines():
    assert neuron_block([(["a", "b", "c", "d", "e", "f"], [0, 0, 0, 0, 0, 3.0])]) == (
        "<start>\na\t0\nb\t0\nc\t0\nd\t0\ne\t0\nf\t10\n<end>\n\n"
        "The same excerpts again, listing only the tokens where the neuron fires:\n<start>\nf\t10\n<end>"
    )


def test_simulator_prompt_exact_text_and_slots():
    prompt = simulation_prompt("closing brackets", ["f", "(", "x", ")\n"])
    assert prompt.text == (
        "Below, a description of one neuron in a language model is followed by text, one token per line. After each "
        "token comes a tab and how strongly the neuron fires on it, an integer from 0 (not at all) to 10 (as "
        "strongly as it ever fires). Most tokens get 0; the tokens that match the description get high values. "
        "Where the value is written as unknown, it is the one to predict.\n\n"
        'Neuron description: the word "and"\n<start>\nSalt\t0\n and\t10\n pepper\t0\n are\t0\n on\t0\n the\t0\n'
        " table\t0\n,\t0\n bread\t0\n and\t9\n butter\t0\n too\t0\n<end>\n\n"
        'Neuron description: month names such as "March" and "June"\n<start>\nWe\t0\n met\t0\n in\t0\n early\t1\n'
        " March\t10\n and\t0\n again\t0\n in\t1\n June\t9\n.\t0\n<end>\n\n"
        "Neuron description: closing brackets\n<start>\nf\tunknown\n(\tunknown\nx\tunknown\n)\\n\tunknown\n<end>"
    )
    # Every slot sits right after a tab and right before its placeholder.
    for offset in prompt.slot_offsets():
        assert prompt.text[offset - 1] == "\t" and prompt.text[offset:].startswith("unknown\n")
    assert len(prompt.slots) == 4


@pytest.mark.parametrize("raw, parsed", [
    (" closing brackets in code.", "closing brackets in code"),
    (' the word "and". This neuron also fires on the word or.', 'the word "and"'),  # a run-on: first sentence only
    (' "commas"', "commas"),
    (' month names such as "March" and "June".', 'month names such as "March" and "June"'),  # inner quotes kept
    (" method names, e.g. load and save", "method names, e.g. load and save"),
    (f"{LEAD_IN} the word 'the'.\nNeuron 5", "the word 'the'"),
    ('  "months"  ', "months"),
])
def test_parse_explanation(raw, parsed):
    assert parse_explanation(raw) == parsed


@pytest.mark.parametrize("raw", ["", "   \n", "<start>\nx\t0", "12 34"])
def test_parse_explanation_rejects_non_answers(raw):
    with pytest.raises(ExplanationParseError):
        parse_explanation(raw)
