"""Tokenizing pairs: chat template and plain paths, the prompt/completion boundary, truncation policies."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from dpokit.data.formats import Pair
from dpokit.data.tokenize import LengthLimits, PairTokenizer, TokenizedPair, load_tokenizer
from dpokit.errors import DpokitError
from dpokit.fingerprint import tokenizer_fingerprint

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


def ids_of(tokenizer, example: Pair, separator="\n\n", **limits):
    return PairTokenizer(tokenizer, LengthLimits(**limits), separator).tokenize([example])[0]


# ---------------------------------------------------------------------------------------------
# Chat template and plain paths


def test_chat_template_prompt_and_completions_match_apply_chat_template(chat_tokenizer):
    example = pair()
    ids = ids_of(chat_tokenizer, example)
    expected_prompt = chat_tokenizer.apply_chat_template(example.prompt, add_generation_prompt=True, tokenize=True)[
        "input_ids"
    ]
    expected_chosen = chat_tokenizer.apply_chat_template(example.prompt + example.chosen, tokenize=True)["input_ids"]
    assert ids.prompt_ids == list(expected_prompt)
    assert ids.prompt_ids + ids.chosen_ids == list(expected_chosen)
    assert ids.chosen_ids[-1] == chat_tokenizer.convert_tokens_to_ids("<|end|>")  # end of turn is a completion token
    assert chat_tokenizer.decode(ids.rejected_ids) == "2 plus 3 equals 6.<|end|>"
    assert not ids.retokenized and not ids.truncated


def test_without_a_chat_template_prompt_separator_and_responses_are_concatenated_with_eos(plain_tokenizer):
    ids = ids_of(plain_tokenizer, pair())
    assert ids.prompt_ids == plain_tokenizer("what is 2 plus 3?\n\n")["input_ids"]
    assert ids.chosen_ids == plain_tokenizer("2 plus 3 equals 5.", add_special_tokens=False)["input_ids"] + [
        plain_tokenizer.eos_token_id
    ]
    assert ids.rejected_ids[-1] == plain_tokenizer.eos_token_id


def test_plain_path_prompt_gets_the_tokenizers_own_special_tokens(plain_tokenizer_dir):
    from tokenizers import processors

    tokenizer = AutoTokenizer.from_pretrained(plain_tokenizer_dir)
    # A BOS-adding post-processor, as Llama-style tokenizers have (<|pad|> stands in for <s>).
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|pad|> $A", special_tokens=[("<|pad|>", 0)]
    )
    ids = ids_of(tokenizer, pair())
    assert (
        ids.prompt_ids[0] == 0
        and ids.prompt_ids[1:] == tokenizer("what is 2 plus 3?\n\n", add_special_tokens=False)["input_ids"]
    )
    assert 0 not in ids.chosen_ids


def test_plain_path_joins_turns_with_blank_lines(plain_tokenizer):
    example = pair()
    example.prompt = [{"role": "system", "content": "be brief"}] + example.prompt
    ids = ids_of(plain_tokenizer, example)
    assert plain_tokenizer.decode(ids.prompt_ids) == "be brief\n\nwhat is 2 plus 3?\n\n"


@pytest.mark.parametrize(
    "prompt, chosen, rejected, separator, joined",
    [
        ("Human: hi\n\nAssistant:", " hello.", " go away.", "\n\n", "Human: hi\n\nAssistant: hello."),  # HH style
        ("question:\n", "yes.", "no.", "\n\n", "question:\nyes."),  # the prompt ends in whitespace
        ("question?", "yes.", " no.", "\n\n", "question?\n\nyes."),  # only one reply starts with a space
        ("question?", "yes.", "no.", " ", "question? yes."),  # --separator ' '
        ("question?", "yes.", "no.", "", "question?yes."),  # --separator ''
    ],
)
def test_plain_path_separates_prompt_and_reply_unless_whitespace_already_does(
    plain_tokenizer, prompt, chosen, rejected, separator, joined
):
    ids = ids_of(plain_tokenizer, pair(prompt, chosen, rejected), separator=separator)
    assert plain_tokenizer.decode(ids.prompt_ids + ids.chosen_ids[:-1]) == joined
    assert plain_tokenizer.decode(ids.chosen_ids[:-1]) == chosen  # the separator belongs to the prompt


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
    joint = tokenizer(
        tokenizer.apply_chat_template(example.prompt + example.chosen, tokenize=False), add_special_tokens=False
    )["input_ids"]
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
    results = PairTokenizer(tokenizer, LengthLimits()).tokenize([with_system, pair()])
    assert (results[0].dropped, results[0].detail) == ("template_error", "system turns are not supported")
    assert results[1].dropped is None


# ---------------------------------------------------------------------------------------------
# Templates of the shape real models ship (simplified to their structure)

TEMPLATES = {
    "llama3": (
        "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
        "2 plus 3 equals 5.<|eot_id|>",
    ),
    "qwen2.5": (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. "
        "You are a helpful assistant.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "2 plus 3 equals 5.<|im_end|>\n",
    ),
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "2 plus 3 equals 5.<|im_end|>\n",
    ),
    "gemma": (  # no system role (folded into the first user turn), roles must alternate, "model" for assistant
        "<bos>{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
        "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
        "{% for m in turns %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ (first if loop.first else '') + m['content'] | trim }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
        "2 plus 3 equals 5.<end_of_turn>\n",
    ),
    "mistral": (  # the reply follows "[/INST]" after a space and ends in </s>; no generation prompt
        "<s>{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + '</s>' }}{% endif %}{% endfor %}",
        " 2 plus 3 equals 5.</s>",
    ),
    "reasoning": (  # the generation prompt opens a <think> block the rendered conversation does not have
        "{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}"
        "{% elif m['role'] == 'assistant' %}<|Assistant|>{{ m['content'] }}<|end_of_sentence|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}",
        "2 plus 3 equals 5.<|end_of_sentence|>",
    ),
}


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_of_real_model_shapes_keep_their_rows_and_split_at_the_reply(plain_tokenizer_dir, name):
    template, chosen_text = TEMPLATES[name]
    tokenizer = load_tokenizer(str(plain_tokenizer_dir), template)
    example = pair()
    ids = ids_of(tokenizer, example)
    assert ids.dropped is None
    conversation = tokenizer.apply_chat_template(example.prompt + example.chosen, tokenize=False)
    assert tokenizer.decode(ids.prompt_ids + ids.chosen_ids) == conversation  # the exact text, nothing lost
    assert tokenizer.decode(ids.chosen_ids) == chosen_text  # the reply and its end of turn, nothing of the prompt
    assert ids.template_common_prefix == (name == "reasoning")
    if name == "reasoning":
        assert tokenizer.decode(ids.prompt_ids) == "<|User|>what is 2 plus 3?<|Assistant|>"


def test_gemma_shaped_template_folds_a_system_turn_and_a_broken_alternation_is_a_template_error(plain_tokenizer_dir):
    tokenizer = load_tokenizer(str(plain_tokenizer_dir), TEMPLATES["gemma"][0])
    with_system = pair()
    with_system.prompt = [{"role": "system", "content": "be brief"}] + with_system.prompt
    assert tokenizer.decode(ids_of(tokenizer, with_system).prompt_ids) == (
        "<bos><start_of_turn>user\nbe brief\n\nwhat is 2 plus 3?<end_of_turn>\n<start_of_turn>model\n"
    )
    two_users = pair()
    two_users.prompt = two_users.prompt * 2
    ids = ids_of(tokenizer, two_users)
    assert (ids.dropped, ids.detail) == (
        "template_error",
        "Conversation roles must alternate user/assistant/user/assistant/...",
    )


# ---------------------------------------------------------------------------------------------
# Truncation


def fitted(tokenizer, prompt, chosen, rejected, **limits) -> TokenizedPair:
    """Token ids put through the length limits as `PairTokenizer.tokenize` puts every pair."""
    return PairTokenizer(tokenizer, LengthLimits(**limits)).fitted(
        TokenizedPair(prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected)
    )


def cut(tokenizer, prompt, chosen, rejected, **limits):
    t = fitted(tokenizer, prompt, chosen, rejected, **limits)
    return t.prompt_ids, t.chosen_ids, t.rejected_ids


P10, C20, R3 = list(range(100, 110)), list(range(200, 220)), list(range(300, 303))


def test_keep_start_keeps_the_whole_prompt_and_cuts_the_completions_ends(plain_tokenizer):
    # 10 + 20 > 12: the prompt stays, each completion keeps its first 12 - 10 = 2 tokens (TRL's default).
    assert cut(plain_tokenizer, P10, C20, R3, max_length=12) == (P10, C20[:2], R3[:2])


def test_keep_end_cuts_the_prompts_start_down_to_half_of_max_length_then_the_completions(plain_tokenizer):
    # excess 18; the prompt may lose at most 10 - 12 // 2 = 4 tokens, then completions keep 12 - 6 = 6.
    assert cut(plain_tokenizer, P10, C20, R3, max_length=12, truncation="keep_end") == (P10[4:], C20[:6], R3)


def test_keep_end_cuts_the_prompt_only_as_much_as_needed(plain_tokenizer):
    assert cut(plain_tokenizer, P10, C20[:5], R3, max_length=12, truncation="keep_end") == (P10[3:], C20[:5], R3)


def test_keep_end_with_max_prompt_length_is_the_original_dpo_rule(plain_tokenizer):
    # The prompt keeps its last 4 tokens, then each response its first 12 - 4 = 8 (as the DPO paper's code).
    limits = dict(max_length=12, max_prompt_length=4, truncation="keep_end")
    assert cut(plain_tokenizer, P10, C20, R3, **limits) == (P10[-4:], C20[:8], R3)


def test_max_prompt_length_caps_every_prompt_from_the_end_truncation_names(plain_tokenizer):
    assert cut(plain_tokenizer, P10, R3, C20[:3], max_length=100, max_prompt_length=4) == (P10[:4], R3, C20[:3])
    limits = dict(max_length=100, max_prompt_length=4, truncation="keep_end")
    assert cut(plain_tokenizer, P10, R3, C20[:3], **limits) == (P10[-4:], R3, C20[:3])


def test_max_completion_length_caps_every_completion_at_its_start(plain_tokenizer):
    t = fitted(plain_tokenizer, P10, C20, R3, max_length=100, max_completion_length=5)
    assert (t.prompt_ids, t.chosen_ids, t.rejected_ids) == (P10, C20[:5], R3)
    assert (t.truncated_prompt, t.truncated_completion, t.dropped) == (False, True, None)


def test_pairs_within_the_limits_are_not_touched(plain_tokenizer):
    t = fitted(plain_tokenizer, [1] * 10, [2] * 2, [3] * 2, max_length=12)
    assert (t.prompt_ids, t.chosen_ids, t.rejected_ids) == ([1] * 10, [2] * 2, [3] * 2)
    assert (t.truncated_prompt, t.truncated_completion, t.dropped) == (False, False, None)


def test_truncate_policy_gives_exact_token_counts(chat_tokenizer):
    example = pair(prompt="what is " + "one plus " * 20 + "two?", chosen="it is " + "three " * 30 + ".", rejected="no.")
    full = ids_of(chat_tokenizer, example)
    assert (len(full.prompt_ids), len(full.chosen_ids), len(full.rejected_ids)) == (51, 36, 4)
    ids = ids_of(chat_tokenizer, example, max_length=60)  # keep_start: the prompt whole, chosen's first 9
    assert (ids.prompt_ids, ids.chosen_ids, ids.rejected_ids) == (
        full.prompt_ids,
        full.chosen_ids[:9],
        full.rejected_ids,
    )
    assert (ids.truncated_prompt, ids.truncated_completion) == (False, True)
    ids = ids_of(chat_tokenizer, example, max_length=40, max_prompt_length=24, truncation="keep_end")
    assert (ids.truncated_prompt, ids.truncated_completion) == (True, True)
    assert ids.prompt_ids == full.prompt_ids[-24:]
    assert ids.chosen_ids == full.chosen_ids[:16]
    assert ids.rejected_ids == full.rejected_ids  # each side is checked on its own


def test_keep_start_drops_a_pair_whose_prompt_leaves_no_room_and_says_what_to_do(chat_tokenizer):
    example = pair(prompt="what is " + "one plus " * 20 + "two?")
    ids = ids_of(chat_tokenizer, example, max_length=40)
    assert ids.dropped == "prompt_over_max_length"
    assert ids.detail == (
        "the prompt's 51 tokens leave no room for a completion under --max-length 40; "
        "raise it, set --max-prompt-length, or use --truncation keep_end"
    )
    assert ids_of(chat_tokenizer, example, max_length=40, truncation="keep_end").dropped is None


def test_drop_policy_drops_overlength_pairs_and_explains(chat_tokenizer):
    example = pair(chosen="it is " + "three " * 30 + ".")
    full = ids_of(chat_tokenizer, example)
    ids = ids_of(chat_tokenizer, example, max_length=40, overlength="drop")
    assert ids.dropped == "overlength"
    total = len(full.prompt_ids) + len(full.chosen_ids)
    assert (
        ids.detail
        == f"prompt {len(full.prompt_ids)} + chosen {len(full.chosen_ids)} = {total} tokens, over --max-length 40"
    )
    assert ids_of(chat_tokenizer, pair(), max_length=40, overlength="drop").dropped is None
    # the caps are asked for explicitly, so they apply first: capped, the pair fits and is kept
    capped = ids_of(chat_tokenizer, example, max_length=40, max_completion_length=8, overlength="drop")
    assert capped.dropped is None and capped.chosen_ids == full.chosen_ids[:8]


def test_responses_identical_after_truncation_drop_the_row(chat_tokenizer):
    example = pair(chosen="three " * 30 + "yes.", rejected="three " * 30 + "no.")
    ids = ids_of(chat_tokenizer, example, max_length=30, max_prompt_length=10, truncation="keep_end")
    assert ids.dropped == "identical_after_truncation"


@pytest.mark.parametrize(
    "limits, message",
    [
        (dict(max_length=10, max_prompt_length=10), "--max-prompt-length 10 must be below --max-length 10"),
        (dict(max_length=10, max_prompt_length=0), "--max-prompt-length 0 must be at least 1"),
        (dict(max_length=10, max_completion_length=0), "--max-completion-length 0 must be at least 1"),
        (dict(max_length=1), "--max-length 1 leaves no room for a prompt and a completion"),
        (dict(overlength="cut"), "--overlength 'cut' is not one of truncate, drop, error"),
        (dict(truncation="middle"), "--truncation 'middle' is not one of keep_start, keep_end"),
    ],
)
def test_bad_length_settings_are_refused_in_one_line(limits, message):
    with pytest.raises(DpokitError) as error:
        LengthLimits(**limits)
    assert str(error.value).startswith(message)


def test_a_lone_max_length_is_a_valid_setting():
    assert LengthLimits(max_length=256).max_prompt_length is None


def test_a_tokenizer_without_template_or_eos_is_refused(plain_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(plain_tokenizer_dir)
    tokenizer.eos_token = None
    with pytest.raises(DpokitError, match="no chat template and no EOS token"):
        PairTokenizer(tokenizer, LengthLimits(100))


# ---------------------------------------------------------------------------------------------
# Fingerprint


def test_tokenizer_fingerprint_is_stable_and_covers_the_chat_template(tokenizer_dir, plain_tokenizer_dir):
    chat = tokenizer_fingerprint(load_tokenizer(str(tokenizer_dir)))
    assert chat == tokenizer_fingerprint(load_tokenizer(str(tokenizer_dir)))
    assert chat != tokenizer_fingerprint(load_tokenizer(str(plain_tokenizer_dir)))
    assert chat != tokenizer_fingerprint(load_tokenizer(str(tokenizer_dir), SPACE_TEMPLATE))
