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


# The first few-shot example and the target neuron, without the digest line: one common 0–10 scale over both
# excerpts of the target (m = 2.0), escaped newline and tab tokens.
FIRST_SHOT = (
    "Neuron 1\nActivations:\n<start>\nSalt\t0\n and\t10\n pepper\t0\n are\t0\n on\t0\n the\t0\n table\t0\n"
    ",\t0\n bread\t0\n and\t9\n butter\t0\n too\t0\n<end>\n\n"
    "The same excerpts again, listing only the tokens where the neuron fires:\n<start>\n and\t10\n and\t9\n<end>"
)
TARGET = "Neuron 5\nActivations:\n<start>\nx\t0\n =\t2\n 1\t10\n\\n\t0\n<end>\n<start>\nif\t0\n x\t0\n\\t\t0\ny\t0\n<end>"


def test_explainer_prompt_exact_text():
    messages = explainer_messages(EXCERPTS)
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * len(FEW_SHOTS) + ["user"]
    assert messages[0]["content"] == SYSTEM
    assert messages[1]["content"] == FIRST_SHOT + '\n\nStrongest tokens: "and"'
    assert messages[2]["content"] == 'Its main job is to detect the word "and".'
    assert messages[4]["content"] == 'Its main job is to detect month names such as "March" and "June".'
    # The digest lists tokens reaching half the strongest activation (" =" at 0.5 of 2.0 does not).
    assert messages[-1]["content"] == TARGET + '\n\nStrongest tokens: "1"'
    assert prompt_sha256(messages) == "b8c2661d283f13b3a11fefbe7a91811cf48fd350c8703763f1301a66557a3e22"


SYSTEM_WITHOUT_DIGEST = (
    "You are looking inside a language model at one neuron, a unit that fires on some pattern in text. You will see "
    "short excerpts of text, one token per line. After each token comes a tab and how strongly the neuron fires on "
    "that token, an integer from 0 (not at all) to 10 (as strongly as it ever does here). Finish the sentence about "
    "the neuron with a few words naming the tokens, or the kind of tokens, that make it fire."
)


def test_explainer_prompt_with_and_without_the_digest_exact_text():
    """digest=True is the prompt above; digest=False drops the "Strongest tokens" line from every user message
    (the few-shot examples' too) and the system text's sentence about it, and nothing else."""
    assert explainer_messages(EXCERPTS, digest=True) == explainer_messages(EXCERPTS)
    messages = explainer_messages(EXCERPTS, digest=False)
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * len(FEW_SHOTS) + ["user"]
    assert messages[0]["content"] == SYSTEM_WITHOUT_DIGEST
    assert messages[1]["content"] == FIRST_SHOT
    assert messages[2]["content"] == 'Its main job is to detect the word "and".'
    assert messages[-1]["content"] == TARGET
    assert not any("Strongest tokens" in m["content"] for m in messages)
    with_digest = explainer_messages(EXCERPTS)
    assert [m["content"] for m in messages[1:]] == [
        m["content"].split("\n\nStrongest tokens: ")[0] for m in with_digest[1:]]
    assert prompt_sha256(messages) == "734c303929461f1e11411e0acc8ea07d3675489c2f394a8b6cc54199fec7520b"


def test_explainer_prompt_with_the_output_tokens_exact_text():
    """quality.explainer_logits: the unit's output tokens (five each way, whitespace escaped) under the digest of the
    target neuron only, and one more sentence in the system text; every other message unchanged."""
    output = ([" the", "\n", " and", " of", " to", " a"], ["x", " y"])
    messages = explainer_messages(EXCERPTS, output=output)
    assert messages[0]["content"] == SYSTEM + (" Below that, the tokens the neuron's output makes more likely and "
                                               "less likely in the next position are listed; they may help, or not.")
    assert messages[-1]["content"] == TARGET + ('\n\nStrongest tokens: "1"\n'
                                                'Output makes more likely: "the", "\\n", "and", "of", "to"\n'
                                                'Output makes less likely: "x", "y"')
    assert messages[1:-1] == explainer_messages(EXCERPTS)[1:-1]
    assert explainer_messages(EXCERPTS, output=None) == explainer_messages(EXCERPTS)


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
    # issue 16 item 5: abbreviations, initials, decimals and file extensions do not end the sentence
    (" method names, e.g. Python and Ruby keywords.", "method names, e.g. Python and Ruby keywords"),
    (" U.S. states", "U.S. states"),
    (" U.S. State capitals", "U.S. State capitals"),
    (" names of U.S. states. This neuron also fires on cities.", "names of U.S. states"),
    (" programming languages, i.e. Python, Ruby", "programming languages, i.e. Python, Ruby"),
    (" Python vs. Ruby keywords", "Python vs. Ruby keywords"),
    (" the word for, a.k.a. The loop keyword", "the word for, a.k.a. The loop keyword"),
    (" books by J. K. Rowling", "books by J. K. Rowling"),
    (" version numbers like 3.5 and 2.7. Also dates.", "version numbers like 3.5 and 2.7"),
    (" file names ending in .py. Python files mostly", "file names ending in .py"),
    (" file extensions such as .py and .txt", "file extensions such as .py and .txt"),
    (" places in the U.S.", "places in the U.S."),
    (" keywords like if, for, etc.", "keywords like if, for, etc."),
    (" keywords like if, for, etc. This neuron also fires on commas.", "keywords like if, for, etc."),
    (" the letter A. This neuron also fires on B.", "the letter A"),
    (f"{LEAD_IN} the word 'the'.\nNeuron 5", "the word 'the'"),
    ('  "months"  ', "months"),
])
def test_parse_explanation(raw, parsed):
    assert parse_explanation(raw) == parsed


@pytest.mark.parametrize("raw", ["", "   \n", "<start>\nx\t0", "12 34"])
def test_parse_explanation_rejects_non_answers(raw):
    with pytest.raises(ExplanationParseError):
        parse_explanation(raw)


@pytest.mark.parametrize(("raw", "parsed"), [
    ("cities such as St. Louis and Paris.", "cities such as St. Louis and Paris"),
    ("company names such as Acme Inc. Apple and others", "company names such as Acme Inc. Apple and others"),
    ("names such as Martin Luther King Jr. Day", "names such as Martin Luther King Jr. Day"),
    ("titles such as Dr. Who", "titles such as Dr. Who"),
    ("matchups such as Python vs. Java", "matchups such as Python vs. Java"),
    ("places like Mt. Everest and Mt. Fuji. They are high", "places like Mt. Everest and Mt. Fuji"),
    ("firms such as Acme Corp. Widgets. The end", "firms such as Acme Corp. Widgets"),
    ("the word if. It also fires on else", "the word if"),  # a short word before a sentence's first word ends it
    ("the token The. It is common", "the token The"),
])
def test_abbreviations_by_their_shape_do_not_cut_an_explanation(raw, parsed):
    assert parse_explanation(raw) == parsed
