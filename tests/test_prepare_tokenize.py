"""Tokenizing pairs: chat template and plain paths, the prompt/completion boundary, truncation policies."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from dpokit.data.formats import Pair
from dpokit.data.tokenize import PairTokenizer, load_tokenizer, truncate_pair
from dpokit.fingerprint import tokenizer_fingerprint
from dpokit.errors import DpokitError

# A template whose generation prompt ends in a space: BPE then merges that space with the answer's
# first word ("assistant: " + "the" -> ":", " the"), so the prompt's ids are not a prefix.
SPACE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def pair(prompt="what is 2 plus 3?", chosen="2 plus 3 equals 5.", rejected="2 plus 3 equals 6.") -> Pair:
    return Pair(
        "data.jsonl line 1",
        "plain",
        [{"role": "user", "content": prompt}],
        [{"role": "assistant", "content": chosen}],
        [{"role": "assistant", "content": rejected}],
    )


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="module")
def plain_tokenizer(plain_tokenizer_dir):
    return load_tokenizer(str(plain_tokenizer_dir))


def ids_of(tokenizer, example: Pair, max_length=1024, max_prompt_length=512, overlength="truncate"):
    return PairTokenizer(tokenizer, max_length, max_prompt_length, overlength).tokenize([example])[0]


# ---------------------------------------------------------------------------------------------
# Chat template and plain paths


def test_chat_template_prompt_and_completions_match_apply_chat_template(chat_tokenizer):
    example = pair()
    ids = ids_of(chat_tokenizer, example)
    expected_prompt = chat_tokenizer.apply_chat_template(example.prompt, add_generation_prompt=True, tokenize=True)["input_ids"]
    expected_chosen = chat_tokenizer.apply_chat_template(example.prompt + example.chosen, tokenize=True)["input_ids"]
    assert ids.prompt_ids == list(expected_prompt)
    assert ids.prompt_ids + ids.chosen_ids == list(expected_chosen)
    assert ids.chosen_ids[-1] == chat_tokenizer.convert_tokens_to_ids("<|end|>")  # end of turn is a completion token
    assert chat_tokenizer.decode(ids.rejected_ids) == "2 plus 3 equals 6.<|end|>"
    assert not ids.retokenized and not ids.truncated


def test_without_a_chat_template_prompt_and_responses_are_concatenated_with_eos(plain_tokenizer):
    ids = ids_of(plain_tokenizer, pair())
    assert ids.prompt_ids == plain_tokenizer("what is 2 plus 3?")["input_ids"]
    assert ids.chosen_ids == plain_tokenizer("2 plus 3 equals 5.", add_special_tokens=False)["input_ids"] + [plain_tokenizer.eos_token_id]
    assert ids.rejected_ids[-1] == plain_tokenizer.eos_token_id


def test_plain_path_prompt_gets_the_tokenizers_own_special_tokens(plain_tokenizer_dir):
    from tokenizers import processors

    tokenizer = AutoTokenizer.from_pretrained(plain_tokenizer_dir)
    # A BOS-adding post-processor, as Llama-style tokenizers have (<|pad|> stands in for <s>).
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|pad|> $A", special_tokens=[("<|pad|>", 0)])
    ids = ids_of(tokenizer, pair())
    assert ids.prompt_ids[0] == 0 and ids.prompt_ids[1:] == tokenizer("what is 2 plus 3?", add_special_tokens=False)["input_ids"]
    assert 0 not in ids.chosen_ids


def test_plain_path_joins_turns_with_blank_lines(plain_tokenizer):
    example = pair()
    example.prompt = [{"role": "system", "content": "be brief"}] + example.prompt
    ids = ids_of(plain_tokenizer, example)
    assert plain_tokenizer.decode(ids.prompt_ids) == "be brief\n\nwhat is 2 plus 3?"


def test_chat_template_option_takes_text_or_a_file(plain_tokenizer_dir, tmp_path):
    from_text = load_tokenizer(str(plain_tokenizer_dir), SPACE_TEMPLATE)
    (tmp_path / "template.jinja").write_text(SPACE_TEMPLATE)
    from_file = load_tokenizer(str(plain_tokenizer_dir), str(tmp_path / "template.jinja"))
    assert from_text.chat_template == from_file.chat_template == SPACE_TEMPLATE
    assert from_text.decode(ids_of(from_text, pair()).prompt_ids) == "user: what is 2 plus 3?\nassistant: "


@pytest.mark.parametrize(
    "template, message",
    [
        ("no-such-template.jinja", "--chat-template 'no-such-template.jinja' is neither a file nor a Jinja template"),
        ("{% for m in messages %}", "the chat template does not render a user/assistant conversation"),
    ],
)
def test_bad_chat_templates_are_refused_up_front(plain_tokenizer_dir, template, message):
    with pytest.raises(DpokitError) as error:
        load_tokenizer(str(plain_tokenizer_dir), template)
    assert str(error.value).startswith(message)


def test_completion_is_retokenized_when_bpe_merges_across_the_prompt_boundary(plain_tokenizer_dir):
    tokenizer = load_tokenizer(str(plain_tokenizer_dir), SPACE_TEMPLATE)
    example = pair(chosen="the cat", rejected="a dog")
    ids = ids_of(tokenizer, example)
    joint = tokenizer(tokenizer.apply_chat_template(example.prompt + example.chosen, tokenize=False), add_special_tokens=False)["input_ids"]
    assert joint[: len(ids.prompt_ids)] != ids.prompt_ids  # the case really occurs with this template
    assert ids.retokenized
    assert ids.prompt_ids == tokenizer("user: what is 2 plus 3?\nassistant: ", add_special_tokens=False)["input_ids"]
    assert ids.chosen_ids == tokenizer("the cat\n", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids.prompt_ids + ids.chosen_ids) == "user: what is 2 plus 3?\nassistant: the cat\n"


def test_a_template_that_renders_the_prompt_differently_before_a_response_drops_the_row(plain_tokenizer_dir):
    template = (
        "{% if add_generation_prompt %}Q: {{ messages[-1]['content'] }}\nA:"
        "{% else %}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% endif %}"
    )
    ids = ids_of(load_tokenizer(str(plain_tokenizer_dir), template), pair())
    assert ids.dropped == "template_prompt_mismatch"


def test_a_row_the_template_refuses_is_dropped_with_the_templates_message(plain_tokenizer_dir):
    template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('system turns are not supported') }}{% endif %}"
        + SPACE_TEMPLATE
    )
    tokenizer = load_tokenizer(str(plain_tokenizer_dir), template)
    with_system = pair()
    with_system.prompt = [{"role": "system", "content": "be brief"}] + with_system.prompt
    results = PairTokenizer(tokenizer, 1024, 512, "truncate").tokenize([with_system, pair()])
    assert (results[0].dropped, results[0].detail) == ("template_error", "system turns are not supported")
    assert results[1].dropped is None


# ---------------------------------------------------------------------------------------------
# Truncation


def test_truncation_keeps_the_prompt_end_then_the_response_start():
    prompt, chosen, rejected = list(range(100, 110)), list(range(200, 220)), list(range(300, 303))
    # 10 + 20 > 12: the prompt keeps its last 4 tokens, then each response its first 12 - 4 = 8.
    assert truncate_pair(prompt, chosen, rejected, 12, 4) == (
        [106, 107, 108, 109],
        list(range(200, 208)),
        [300, 301, 302],
    )


def test_truncation_cuts_only_the_prompt_when_that_is_enough():
    prompt, chosen, rejected = list(range(10)), list(range(8)), list(range(3))
    assert truncate_pair(prompt, chosen, rejected, 12, 4) == ([6, 7, 8, 9], list(range(8)), [0, 1, 2])


def test_a_short_prompt_is_kept_and_responses_fill_the_rest():
    prompt, chosen, rejected = [1, 2, 3], list(range(20)), list(range(5))
    assert truncate_pair(prompt, chosen, rejected, 12, 4) == ([1, 2, 3], list(range(9)), list(range(5)))


def test_pairs_within_max_length_are_not_touched():
    assert truncate_pair([1] * 10, [2] * 2, [3] * 2, 12, 4) == ([1] * 10, [2] * 2, [3] * 2)


def test_truncate_policy_gives_exact_token_counts(chat_tokenizer):
    example = pair(prompt="what is " + "one plus " * 20 + "two?", chosen="it is " + "three " * 30 + ".", rejected="no.")
    full = ids_of(chat_tokenizer, example)
    assert (len(full.prompt_ids), len(full.chosen_ids), len(full.rejected_ids)) == (51, 36, 4)
    ids = ids_of(chat_tokenizer, example, max_length=40, max_prompt_length=24)
    assert ids.truncated
    assert ids.prompt_ids == full.prompt_ids[-24:]
    assert ids.chosen_ids == full.chosen_ids[:16]
    assert ids.rejected_ids == full.rejected_ids  # each side is checked on its own
    assert (len(ids.prompt_ids), len(ids.chosen_ids), len(ids.rejected_ids)) == (24, 16, 4)


def test_drop_policy_drops_overlength_pairs_and_explains(chat_tokenizer):
    example = pair(chosen="it is " + "three " * 30 + ".")
    full = ids_of(chat_tokenizer, example)
    ids = ids_of(chat_tokenizer, example, max_length=40, max_prompt_length=24, overlength="drop")
    assert ids.dropped == "overlength"
    total = len(full.prompt_ids) + len(full.chosen_ids)
    assert ids.detail == f"prompt {len(full.prompt_ids)} + chosen {len(full.chosen_ids)} = {total} tokens, over --max-length 40"
    assert ids_of(chat_tokenizer, pair(), max_length=40, max_prompt_length=24, overlength="drop").dropped is None


def test_truncation_to_an_empty_prompt_drops_the_row(chat_tokenizer):
    example = pair(chosen="it is " + "three " * 30 + ".")
    ids = ids_of(chat_tokenizer, example, max_length=20, max_prompt_length=0)
    assert ids.dropped == "empty_prompt_after_truncation"


def test_responses_identical_after_truncation_drop_the_row(chat_tokenizer):
    example = pair(chosen="three " * 30 + "yes.", rejected="three " * 30 + "no.")
    ids = ids_of(chat_tokenizer, example, max_length=30, max_prompt_length=10)
    assert ids.dropped == "identical_after_truncation"


@pytest.mark.parametrize(
    "max_length, max_prompt_length, overlength, message",
    [
        (10, 10, "truncate", "--max-prompt-length 10 must be at least 0 and below --max-length 10"),
        (10, 4, "cut", "--overlength 'cut' is not one of truncate, drop, error"),
    ],
)
def test_bad_length_settings_are_refused(chat_tokenizer, max_length, max_prompt_length, overlength, message):
    with pytest.raises(DpokitError) as error:
        PairTokenizer(chat_tokenizer, max_length, max_prompt_length, overlength)
    assert str(error.value).startswith(message)


def test_a_tokenizer_without_template_or_eos_is_refused(plain_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(plain_tokenizer_dir)
    tokenizer.eos_token = None
    with pytest.raises(DpokitError, match="no chat template and no EOS token"):
        PairTokenizer(tokenizer, 100, 50, "truncate")


# ---------------------------------------------------------------------------------------------
# Fingerprint


def test_tokenizer_fingerprint_is_stable_and_covers_the_chat_template(tokenizer_dir, plain_tokenizer_dir):
    chat = tokenizer_fingerprint(load_tokenizer(str(tokenizer_dir)))
    assert chat == tokenizer_fingerprint(load_tokenizer(str(tokenizer_dir)))
    assert chat != tokenizer_fingerprint(load_tokenizer(str(plain_tokenizer_dir)))
    assert chat != tokenizer_fingerprint(load_tokenizer(str(tokenizer_dir), SPACE_TEMPLATE))
