"""A1111's prompt syntax: emphasis, prompt editing and chunking equal stable-diffusion-webui's outputs.

Expected values are A1111's own: the doctests of modules/prompt_parser.py, copied as written, and outputs of
that module (lark 1.1.2, as A1111 pins it) for the further edge cases. Chunks are written out from A1111's
tokenize_line algorithm (modules/sd_hijack_clip.py) by hand.
"""
import math

import pytest

from diffusion_core.models.text_encoder import prompt_ids
from diffusion_core.prompts import (Chunk, edit_end_step, empty_chunk, pad_to_same_length, parse_prompt_attention,
                                    prompt_chunks, prompt_schedules)

# ------------------------------------------------------------------------------------------------- emphasis

ATTENTION_DOCTESTS = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]

ATTENTION_EDGE_CASES = [
    ("", [["", 1.0]]),
    ("((x))", [["x", 1.2100000000000002]]),
    ("[x]", [["x", 0.9090909090909091]]),
    ("[[x]]", [["x", 0.8264462809917354]]),
    ("(x:1.3)", [["x", 1.3]]),
    ("(x:.5)", [["x", 0.5]]),
    ("(x:-1)", [["x", -1.0]]),
    ("(x: 1.3 )", [["x", 1.3]]),
    ("(x:1e5)", [["x:1e5", 1.1]]),  # no exponents in a weight: ':1e5' is text, ')' an ordinary close
    ("(a:b)", [["a:b", 1.1]]),
    ("((a:1.5):2)", [["a", 3.0]]),
    ("(x)(y)", [["xy", 1.1]]),
    ("[(x)]", [["x", 1.0]]),
    ("[a(b]c)", [["a", 0.9090909090909091], ["b", 1.0], ["c", 1.1]]),  # round and square nest independently
    ("(a [b", [["a ", 1.1], ["b", 1.0]]),  # unclosed: round applied first, then square
    ("a)", [["a)", 1.0]]),
    ("a]", [["a]", 1.0]]),
    (":1.3) x", [[":1.3) x", 1.0]]),
    ("a\\b", [["ab", 1.0]]),  # a backslash that escapes nothing is dropped
    ("\\\\", [["\\", 1.0]]),
    ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    ("a\nBREAK\nb", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    ("BREAK", [["", 1.0], ["BREAK", -1], ["", 1.0]]),
    ("cat BREAK", [["cat", 1.0], ["BREAK", -1], ["", 1.0]]),
    ("aBREAK b", [["aBREAK b", 1.0]]),
    ("(a BREAK b)", [["a", 1.1], ["BREAK", -1.1], ["b", 1.1]]),  # the bracket scales the marker too
]


@pytest.mark.parametrize("prompt, expected", ATTENTION_DOCTESTS + ATTENTION_EDGE_CASES)
def test_parse_prompt_attention_equals_a1111(prompt, expected):
    pieces = parse_prompt_attention(prompt)
    assert [text for text, _ in pieces] == [text for text, _ in expected]
    for (_, weight), (_, want) in zip(pieces, expected):
        assert math.isclose(weight, want, rel_tol=0.0, abs_tol=1e-12)


def test_weights_are_a1111s_float_products_bit_for_bit():
    """Merging compares weights exactly, so the order of multiplication must be A1111's."""
    weights = [weight for _, weight in parse_prompt_attention(ATTENTION_DOCTESTS[-1][0])]
    assert weights == [1.0, 1.5730000000000004, 1.1, 1.0, 1.1, 0.55, 1.1, 1.4641000000000006, 1.1]


def test_weight_that_is_no_number_is_rejected():
    # A1111's pattern admits '1.2.3', on which its float() raises.
    with pytest.raises(ValueError, match="'1.2.3'.*not a number"):
        parse_prompt_attention("(x:1.2.3)")
    with pytest.raises(ValueError, match="prompt must be a string, got int"):
        parse_prompt_attention(3)


# ------------------------------------------------------------------------------------------ prompt editing

SCHEDULE_DOCTESTS = [  # g = lambda p: get_learned_conditioning_prompt_schedules([p], 10)[0]
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    # A1111's docstring also lists g("a [{b|d{:.5] c") == [[5, 'a  c'], [10, 'a {b|d{ c']] ("not handling this
    # right now"); A1111's own code returns the prompt as written (a '|' outside [a|b] is a syntax error), and
    # test_schedule_doctest_that_a1111_fails_gives_a1111s_output asserts what the code does.
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[1, "a"], [2, "(b:1.1)"], [3, "a"], [4, "(b:1.1)"], [5, "a"], [6, "(b:1.1)"], [7, "a"],
                     [8, "(b:1.1)"], [9, "a"], [10, "(b:1.1)"]]),
    ("[fe|]male", [[1, "female"], [2, "male"], [3, "female"], [4, "male"], [5, "female"], [6, "male"],
                   [7, "female"], [8, "male"], [9, "female"], [10, "male"]]),
    ("[fe|||]male", [[1, "female"], [2, "male"], [3, "male"], [4, "male"], [5, "female"], [6, "male"],
                     [7, "male"], [8, "male"], [9, "female"], [10, "male"]]),
]
HIRES_DOCTESTS = [  # g = lambda p: get_learned_conditioning_prompt_schedules([p], 10, 10)[0]
    ("a [b:.5] c", [[10, "a b c"]]),
    ("a [b:1.5] c", [[5, "a  c"], [10, "a b c"]]),
]

FANTASY = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
           "[ in background:0.25] [shoddy:masterful:0.5]")
SCHEDULE_EDGE_CASES = [  # (prompt, (steps, hires_steps, use_old_scheduling), A1111's output)
    (FANTASY, (100, None, False),  # the example in prompt_parser.py's header comment
     [[25, "fantasy landscape with a mountain and an oak in foreground shoddy"],
      [50, "fantasy landscape with a lake and an oak in foreground in background shoddy"],
      [60, "fantasy landscape with a lake and an oak in foreground in background masterful"],
      [75, "fantasy landscape with a lake and an oak in background masterful"],
      [100, "fantasy landscape with a lake and a christmas tree in background masterful"]]),
    ("[a:b:1.0]", (10, None, False), [[10, "a"]]),  # a '.' makes it a fraction: 1.0 · 10 = step 10
    ("[a:b:1.0]", (10, None, True), [[1, "a"], [10, "b"]]),  # old scheduling: not < 1, so step 1
    ("[a:b:2.5]", (10, None, False), [[10, "a"]]),
    ("[a:b:2.5]", (10, None, True), [[2, "a"], [10, "b"]]),
    ("[a:b:0.29]", (100, None, False), [[28, "a"], [100, "b"]]),  # 0.29 · 100 = 28.999…, truncated
    ("[a:b:-1]", (10, None, False), [[10, "b"]]),
    ("[a:b:0]", (10, None, False), [[10, "b"]]),
    ("[a:b:1e1]", (20, None, False), [[10, "a"], [20, "b"]]),
    ("[a:b:1E-1]", (10, None, False), [[10, "b"]]),  # no '.': a step number, 0.1, truncated to 0
    ("[a:b:1E-1]", (10, None, True), [[1, "a"], [10, "b"]]),
    ("[a:b:2]", (1, None, False), [[1, "a"]]),
    ("[a:b:.5]", (3, None, False), [[1, "a"], [3, "b"]]),
    ("[a:b:2 ]", (4, None, False), [[2, "a"], [4, "b"]]),
    ("[a:b: 2 ]", (4, None, False), [[2, "a"], [4, "b"]]),
    ("[a:b:15]", (10, 10, False), [[5, "a"], [10, "b"]]),  # hires: step numbers count on from the first pass
    ("[a:b:5]", (10, 10, False), [[10, "b"]]),
    ("[a:b:5]", (10, 10, True), [[5, "a"], [10, "b"]]),  # old scheduling ignores hires_steps
    ("[a:b:1]", (3, 2, False), [[2, "b"]]),
    ("[a: b :1.5]", (4, 3, False), [[1, "a"], [3, " b "]]),
    ("[a|b|c]", (4, None, False), [[1, "a"], [2, "b"], [3, "c"], [4, "a"]]),
    ("[a:[b|c]:2]", (4, None, False), [[1, "a"], [2, "a"], [3, "b"], [4, "c"]]),
    ("[[a|b]:c:3]", (4, None, False), [[1, "a"], [2, "b"], [3, "a"], [4, "c"]]),
    ("(x:[a:b:2])", (4, None, False), [[2, "(x:a)"], [4, "(x:b)"]]),
    ("", (3, None, False), [[3, ""]]),
    ("\\[a:b:2]", (4, None, False), [[4, "\\[a:b:2]"]]),  # the escape stays for parse_prompt_attention
    ("\\\\[a:b:2]", (4, None, False), [[2, "\\\\a"], [4, "\\\\b"]]),
    ("a|b [c:2]", (10, None, False), [[10, "a|b [c:2]"]]),  # a stray '|' voids all editing
    ("a [c:2] d\\", (10, None, False), [[10, "a [c:2] d\\"]]),  # so does a trailing backslash
]


@pytest.mark.parametrize("prompt, expected", SCHEDULE_DOCTESTS)
def test_schedule_doctests(prompt, expected):
    assert prompt_schedules([prompt], 10) == [[tuple(pair) for pair in expected]]


def test_schedule_doctest_that_a1111_fails_gives_a1111s_output():
    assert prompt_schedules(["a [{b|d{:.5] c"], 10) == [[(10, "a [{b|d{:.5] c")]]


@pytest.mark.parametrize("prompt, expected", HIRES_DOCTESTS)
def test_hires_schedule_doctests(prompt, expected):
    assert prompt_schedules([prompt], 10, 10) == [[tuple(pair) for pair in expected]]


@pytest.mark.parametrize("prompt, args, expected", SCHEDULE_EDGE_CASES)
def test_schedule_edge_cases_equal_a1111(prompt, args, expected):
    steps, hires_steps, old = args
    assert prompt_schedules([prompt], steps, hires_steps, old) == [[tuple(pair) for pair in expected]]


def test_schedules_keep_prompt_order():
    assert prompt_schedules(["[a:b:1]", "c", "[a:b:1]"], 2) == [[(1, "a"), (2, "b")], [(2, "c")],
                                                                  [(1, "a"), (2, "b")]]


def test_edit_end_step_counts_as_a1111():
    assert edit_end_step("3", steps=10) == 3
    assert edit_end_step(".25", steps=10) == 2
    assert edit_end_step("0.25", steps=10, old=True) == 2
    assert edit_end_step("1.5", steps=10, steps_before=20) == 5
    assert edit_end_step("25", steps=10, steps_before=20) == 5


@pytest.mark.parametrize("prompts, steps, hires_steps, message", [
    ("a cat", 10, None, "prompts must be a list of strings, got str"),
    (["a cat", None], 10, None, "each prompt must be a string, got NoneType"),
    (["a cat"], 0, None, "steps must be an integer >= 1, got 0"),
    (["a cat"], 2.5, None, "steps must be an integer >= 1, got 2.5"),
    (["a cat"], 10, 0, "hires_steps must be an integer >= 1, got 0"),
])
def test_bad_schedule_input_is_rejected(prompts, steps, hires_steps, message):
    with pytest.raises(ValueError, match=message):
        prompt_schedules(prompts, steps, hires_steps)


def test_edit_step_too_large_is_rejected():
    with pytest.raises(ValueError, match="too large"):
        prompt_schedules(["[a:b:1e999]"], 10)


def test_brackets_nested_too_deep_are_rejected():
    assert prompt_schedules(["(" * 200 + "a"], 2) == [[(2, "(" * 200 + "a")]]
    with pytest.raises(ValueError, match="brackets more than a few hundred deep"):
        prompt_schedules(["(" * 1000 + "a"], 2)


# ------------------------------------------------------------------------------------------------ chunking

BOS, EOS = 49406, 49407  # CLIP's <|startoftext|> and <|endoftext|>; SD1 pads with EOS
CAT, DOG, COMMA, BREAK_WORD = 2368, 1929, 267, 2568


def tokenize(text: str) -> list[int]:
    return prompt_ids(text, EOS)


def chunks_of(prompt: str, pad: int = EOS, **kwargs) -> list[Chunk]:
    return prompt_chunks(parse_prompt_attention(prompt), tokenize, bos=BOS, eos=EOS, pad=pad, **kwargs)


def chunk(tokens: list[int], weights: list[float] | None = None, pad: int = EOS) -> Chunk:
    """A1111's chunk written out: BOS, the tokens, EOS, padding to 77; weight 1.0 outside the tokens."""
    weights = [1.0] * len(tokens) if weights is None else weights
    padding = 75 - len(tokens)
    return Chunk([BOS] + tokens + [EOS] + [pad] * padding, [1.0] + weights + [1.0] + [1.0] * padding)


def test_token_ids_the_chunk_tests_rely_on():
    assert [tokenize(word) for word in ["cat", "dog", ",", "BREAK"]] == [[CAT], [DOG], [COMMA], [BREAK_WORD]]


def test_empty_prompt_is_one_chunk_of_padding():
    assert chunks_of("") == [Chunk([BOS] + [EOS] * 76, [1.0] * 77)]
    assert chunks_of("", pad=0) == [Chunk([BOS, EOS] + [0] * 75, [1.0] * 77)]  # SD2: pad after the first EOS


def test_100_tokens_make_two_chunks():
    chunks = chunks_of("cat dog " * 50)
    assert chunks == [Chunk([BOS] + [CAT, DOG] * 37 + [CAT] + [EOS], [1.0] * 77),
                      Chunk([BOS] + [DOG] + [CAT, DOG] * 12 + [EOS] * 51, [1.0] * 77)]
    assert all(len(c.tokens) == len(c.weights) == 77 for c in chunks)


def test_comma_within_20_tokens_of_a_full_chunk_moves_the_rest_on():
    # The comma is token 61 (index 60): when a 76th token comes, 75 - 60 = 15 <= 20, so the 14 dogs after it move.
    chunks = chunks_of("cat " * 60 + ", " + "dog " * 20)
    assert chunks == [chunk([CAT] * 60 + [COMMA]), chunk([DOG] * 20)]


def test_comma_exactly_20_tokens_back_still_moves():
    chunks = chunks_of("cat " * 55 + ", " + "dog " * 25)  # comma at index 55: 75 - 55 = 20
    assert chunks == [chunk([CAT] * 55 + [COMMA]), chunk([DOG] * 25)]


def test_comma_21_tokens_back_does_not_move():
    chunks = chunks_of("cat " * 54 + ", " + "dog " * 25)  # comma at index 54: 75 - 54 = 21 > 20
    assert chunks == [chunk([CAT] * 54 + [COMMA] + [DOG] * 20), chunk([DOG] * 5)]


def test_chunk_that_fills_exactly_does_not_backtrack():
    # Backtracking waits for a 76th token; a prompt of exactly 75 stays one chunk.
    assert chunks_of("cat " * 60 + ", " + "dog " * 14) == [chunk([CAT] * 60 + [COMMA] + [DOG] * 14)]


def test_comma_backtrack_zero_turns_it_off():
    chunks = chunks_of("cat " * 60 + ", " + "dog " * 20, comma_backtrack=0)
    assert chunks == [chunk([CAT] * 60 + [COMMA] + [DOG] * 14), chunk([DOG] * 6)]


def test_break_closes_a_chunk_early():
    assert chunks_of("cat BREAK dog") == [chunk([CAT]), chunk([DOG])]
    assert chunks_of("BREAK cat") == [chunk([]), chunk([CAT])]  # even an empty chunk
    assert chunks_of("cat BREAK") == [chunk([CAT])]  # nothing follows, so no second chunk


def test_break_inside_brackets_is_a_weighted_word():
    # The bracket scales the marker's -1 to -1.1, so A1111 no longer sees a BREAK and encodes the word.
    assert chunks_of("(cat BREAK dog)") == [chunk([CAT, BREAK_WORD, DOG], [1.1, -1.1, 1.1])]


def test_weights_follow_each_token():
    chunks = chunks_of("a (cat:1.5) [dog], cat")
    assert chunks == [chunk([320, CAT, DOG, COMMA, CAT], [1.0, 1.5, 1 / 1.1, 1.0, 1.0])]


def test_weights_move_with_backtracked_tokens():
    chunks = chunks_of("cat " * 60 + ", " + "(dog:1.3) " * 20)
    assert chunks == [chunk([CAT] * 60 + [COMMA]), chunk([DOG] * 20, [1.3] * 20)]


def test_sd2_padding_follows_the_first_eos():
    assert chunks_of("cat", pad=0) == [chunk([CAT], pad=0)]
    assert chunks_of("cat", pad=0)[0].tokens[:4] == [BOS, CAT, EOS, 0]


def test_pad_to_same_length_appends_empty_chunks():
    long, short = chunks_of("cat dog " * 50), chunks_of("dog")
    empty = empty_chunk(bos=BOS, eos=EOS, pad=EOS)
    assert empty == chunks_of("")[0]
    assert pad_to_same_length(long, short, bos=BOS, eos=EOS, pad=EOS) == (long, short + [empty])
    assert pad_to_same_length(short, long, bos=BOS, eos=EOS, pad=EOS) == (short + [empty], long)
    assert pad_to_same_length(short, short, bos=BOS, eos=EOS, pad=EOS) == (short, short)
