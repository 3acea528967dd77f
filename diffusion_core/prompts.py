"""AUTOMATIC1111's prompt syntax: emphasis, prompt editing, alternation and 75-token chunks, as pure functions.

In stable-diffusion-webui's syntax `(word)` multiplies a word's weight by 1.1, `[word]` divides it by 1.1 and
`(word:1.3)` sets it; `[from:to:when]` swaps text partway through sampling and `[a|b]` alternates it every step;
`BREAK` and prompts longer than 75 tokens split the text into chunks of 75 tokens, each encoded as its own 77-token
CLIP context. Semantics follow its modules/prompt_parser.py and modules/sd_hijack_clip.py, edge cases included.
The syntax is opt-in (`prompt_weighting=True`): by default a prompt is read literally, as diffusers reads it.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import partial
from typing import Callable

# ---------------------------------------------------------------------------------------------- emphasis

ROUND_MULTIPLIER = 1.1  # (x)
SQUARE_MULTIPLIER = 1 / 1.1  # [x]; A1111 multiplies by 1/1.1 rather than dividing, and floats keep the difference
BREAK_WEIGHT = -1.0  # marks a ("BREAK", -1) piece; inside brackets it is rescaled (to -1.1...) and so is a word

# A1111's tokens, tried in this order; ':1.3)' is a weight only while a '(' is open, otherwise it is text.
ATTENTION_TOKEN = re.compile(r"""
    \\[()\[\]\\]?                             # \( \) \[ \] \\ are literal; a lone backslash is dropped
  | [(\[]                                     # opening bracket
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)          # explicit weight, closing a round bracket
  | [)\]]                                     # closing bracket
  | [^\\()\[\]:]+                             # text
  | :                                         # a colon that is not a weight is text
""", re.X)
BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) pieces by its emphasis brackets, as A1111's parse_prompt_attention.

    Args:
        text: the prompt; unclosed brackets weight everything after them, `BREAK` becomes ("BREAK", -1.0).
    """
    _require_str(text, "prompt")
    pieces: list[list] = []  # [text, weight]; a closing bracket multiplies every piece since its opening
    open_at: dict[str, list[int]] = {"(": [], "[": []}  # index of the first piece inside each open bracket
    for match in ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match["weight"]
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token in ("(", "["):
            open_at[token].append(len(pieces))
        elif weight is not None and open_at["("]:
            _scale(pieces, open_at["("].pop(), _explicit_weight(weight, text))
        elif token == ")" and open_at["("]:
            _scale(pieces, open_at["("].pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_at["["]:
            _scale(pieces, open_at["["].pop(), SQUARE_MULTIPLIER)
        else:
            pieces += _split_at_breaks(token)
    # Unclosed brackets apply to the end of the prompt, all round ones first: float products depend on the order.
    for start in open_at["("]:
        _scale(pieces, start, ROUND_MULTIPLIER)
    for start in open_at["["]:
        _scale(pieces, start, SQUARE_MULTIPLIER)
    return _merge_equal_weights(pieces) or [("", 1.0)]


def _scale(pieces: list[list], start: int, multiplier: float) -> None:
    """Multiply the weights of pieces[start:] in place, as closing a bracket does."""
    for piece in pieces[start:]:
        piece[1] *= multiplier


def _explicit_weight(weight: str, prompt: str) -> float:
    """The number in `(x:1.3)`; A1111's pattern also admits '1.2.3' and '.', on which its float() fails."""
    try:
        return float(weight)
    except ValueError:
        raise ValueError(f"emphasis weight {weight!r} in prompt {prompt!r} is not a number; write it as in "
                         f"(word:1.3), (word:.5) or (word:-1)") from None


def _split_at_breaks(text: str) -> list[list]:
    """A text token's pieces, with a BREAK marker wherever the word BREAK stood."""
    parts = BREAK.split(text)
    pieces = [[parts[0], 1.0]]
    for part in parts[1:]:
        pieces += [["BREAK", BREAK_WEIGHT], [part, 1.0]]
    return pieces


def _merge_equal_weights(pieces: list[list]) -> list[tuple[str, float]]:
    """Join runs of neighbouring pieces whose weights are exactly equal."""
    return [("".join(text for text, _ in run), weight)
            for weight, run in itertools.groupby(pieces, key=lambda piece: piece[1])]


# ---------------------------------------------------------------------------------------- prompt editing

@dataclass(frozen=True)
class Edit:
    """`[before:after:when]`: before up to step `when`, after from then on; `[after:when]` has before None."""
    before: tuple | None
    after: tuple
    when: str  # the number as written: whether it has a '.' decides how it counts


@dataclass(frozen=True)
class Alternation:
    """`[a|b|c]`: option (step - 1) mod n at each step."""
    options: tuple


class Unparsable(Exception):
    """The prompt is outside A1111's editing grammar, so A1111 uses it as written."""


PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # text; a backslash escape stays verbatim for the emphasis parser
# `:when]` after the last colon: lark's SIGNED_NUMBER (ASCII digits, optional exponent) between optional spaces.
WHEN = re.compile(r"\s*(?P<when>[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*\]")
STRAY = "[]():"  # characters the grammar lets stand unmatched at the top level


class ScheduleParser:
    """Recursive descent over A1111's lark grammar for prompt editing (modules/prompt_parser.py).

    A bracket that opens a well-formed group is that group; one that does not is literal text. Where a group
    touches a stray bracket or colon, as in `[a:3]:`, A1111's Earley parser may read the group as literal text
    instead, and which reading it picks changes with Python's string hash seed; this parser always picks the group.
    """

    def __init__(self, text: str):
        self.text = text
        self.groups: dict[int, tuple[list, int] | None] = {}  # memo: each position is parsed once

    def parse(self) -> list:
        """The prompt as nodes (str, Edit, Alternation); raises Unparsable where A1111's parser raises LarkError."""
        nodes, i = [], 0
        while i < len(self.text):
            part, end = self.prompt(i)
            if end == i:  # a '|' outside [a|b], or a '\' before a newline or the end, is a syntax error
                if self.text[i] not in STRAY:
                    raise Unparsable(self.text)
                part, end = [self.text[i]], i + 1
            nodes += part
            i = end
        return nodes

    def prompt(self, i: int) -> tuple[list, int]:
        """Text and groups from i up to the first character that cannot continue them."""
        nodes = []
        while True:
            if match := PLAIN.match(self.text, i):
                nodes.append(match.group())
                i = match.end()
            elif group := self.group(i):
                nodes += group[0]
                i = group[1]
            else:
                return nodes, i

    def group(self, i: int) -> tuple[list, int] | None:
        """The group opening at i, (x) (x:y) [x] [a|b] [to:when] [from:to:when], and where it ends; else None."""
        if i not in self.groups:
            opener = self.text[i:i + 1]
            self.groups[i] = self.round(i) if opener == "(" else self.square(i) if opener == "[" else None
        return self.groups[i]

    def round(self, i: int) -> tuple[list, int] | None:
        """`(x)` or `(x:y)`, kept as text: emphasis is parse_prompt_attention's business."""
        inside, j = self.prompt(i + 1)
        if self.text.startswith(")", j):
            return ["(", *inside, ")"], j + 1
        if self.text.startswith(":", j):
            weight, k = self.prompt(j + 1)
            if self.text.startswith(")", k):
                return ["(", *inside, ":", *weight, ")"], k + 1
        return None

    def square(self, i: int) -> tuple[list, int] | None:
        """`[x]` (kept as text), `[a|b]` or an edit."""
        first, j = self.prompt(i + 1)
        if self.text.startswith("]", j):
            return ["[", *first, "]"], j + 1
        if self.text.startswith("|", j):
            return self.alternation(first, j)
        if self.text.startswith(":", j):
            return self.edit(first, j)
        return None

    def alternation(self, first: list, j: int) -> tuple[list, int] | None:
        """`[a|b|...]` from its first '|' at j; an option may be empty."""
        options = [tuple(first)]
        while self.text.startswith("|", j):
            option, j = self.prompt(j + 1)
            options.append(tuple(option))
        return ([Alternation(tuple(options))], j + 1) if self.text.startswith("]", j) else None

    def edit(self, first: list, j: int) -> tuple[list, int] | None:
        """`[to:when]` or `[from:to:when]` from the colon at j."""
        if when := WHEN.match(self.text, j + 1):
            return [Edit(None, tuple(first), when["when"])], when.end()
        second, k = self.prompt(j + 1)
        if self.text.startswith(":", k) and (when := WHEN.match(self.text, k + 1)):
            return [Edit(tuple(first), tuple(second), when["when"])], when.end()
        return None


def prompt_schedules(prompts: list[str], steps: int, hires_steps: int | None = None,
                     use_old_scheduling: bool = False) -> list[list[tuple[int, str]]]:
    """Each prompt's text over the sampling steps, as A1111's get_learned_conditioning_prompt_schedules.

    Args:
        prompts: prompts that may hold `[from:to:when]` edits and `[a|b]` alternations.
        steps: sampling steps; in an edit a `when` with a '.' is a fraction of them, one without is a step.
        hires_steps: steps of a hires-fix second pass to schedule instead; its `when` counts on from `steps`
            (a step number past `steps`, or a fraction past 1.0).
        use_old_scheduling: A1111 before 1.6: any `when` below 1 is a fraction, any other a step number.

    Returns:
        per prompt, (last step, text) pairs in step order; the text holds from the previous pair's step + 1.
    """
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}; wrap one prompt in "
                         f"a list")
    for prompt in prompts:
        _require_str(prompt, "each prompt")
    _require_steps(steps, "steps")
    if hires_steps is not None:
        _require_steps(hires_steps, "hires_steps")
    if hires_steps is None or use_old_scheduling:  # A1111's old scheduling ignores hires_steps
        total, end_of = steps, partial(edit_end_step, steps=steps, old=use_old_scheduling)
    else:
        total, end_of = hires_steps, partial(edit_end_step, steps=hires_steps, steps_before=steps)
    return [_schedule(prompt, total, end_of) for prompt in prompts]


def edit_end_step(when: str, steps: int, steps_before: int = 0, old: bool = False) -> int:
    """The last step of an edit's `from` text in a pass of `steps`, after a pass of `steps_before` (0 if none)."""
    value = float(when)
    if old:
        value = value * steps if value < 1 else value
    elif "." in when:
        value = (value - (1.0 if steps_before else 0.0)) * steps
    else:
        value = value - steps_before
    try:
        return min(steps, int(value))  # int() truncates towards zero: 0.29 · 100 = 28.999… is step 28
    except OverflowError:
        raise ValueError(f"prompt edit step {when!r} is too large; use a step number or a fraction") from None


def _schedule(prompt: str, steps: int, end_of: Callable[[str], int]) -> list[tuple[int, str]]:
    """One prompt's (last step, text) pairs; an unparsable prompt holds as written for every step."""
    try:
        nodes = ScheduleParser(prompt).parse()
    except Unparsable:
        return [(steps, prompt)]
    except RecursionError:
        raise ValueError(f"prompt opens brackets more than a few hundred deep, beyond what the parser follows: "
                         f"{prompt[:40]!r}...; escape literal brackets as \\( and \\[") from None
    ends = sorted({steps, *_change_steps(nodes, steps, end_of)})
    return [(step, _text_at(nodes, step, end_of)) for step in ends]


def _change_steps(nodes: tuple | list, steps: int, end_of: Callable[[str], int]) -> set[int]:
    """Steps after which some edit or alternation in nodes changes the text."""
    found: set[int] = set()
    for node in nodes:
        if isinstance(node, Edit):
            end = end_of(node.when)
            found |= {end} if end >= 1 else set()  # an edit that ends before step 1 shows `after` throughout
            found |= _change_steps((*(node.before or ()), *node.after), steps, end_of)
        elif isinstance(node, Alternation):
            found |= set(range(1, steps + 1))
            found |= _change_steps([n for option in node.options for n in option], steps, end_of)
    return found


def _text_at(nodes: tuple | list, step: int, end_of: Callable[[str], int]) -> str:
    """The prompt's text at a sampling step (counted from 1)."""
    parts = []
    for node in nodes:
        if isinstance(node, Edit):
            parts.append(_text_at(node.before or () if step <= end_of(node.when) else node.after, step, end_of))
        elif isinstance(node, Alternation):
            parts.append(_text_at(node.options[(step - 1) % len(node.options)], step, end_of))
        else:
            parts.append(node)
    return "".join(parts)


# ---------------------------------------------------------------------------------------------- chunking

CHUNK_LENGTH = 75  # prompt tokens per chunk; with BOS and EOS, CLIP's 77 positions
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack: how far back a comma may end a full chunk; 0 turns it off


@dataclass(frozen=True)
class Chunk:
    """One 77-token CLIP context, [BOS, 75 prompt tokens or padding, EOS], and each token's emphasis weight."""
    tokens: list[int]
    weights: list[float]


def prompt_chunks(pieces: list[tuple[str, float]], tokenize: Callable[[str], list[int | tuple[int, ...]]], *,
                  bos: int, eos: int, pad: int, comma_backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """Weighted pieces as 77-token chunks, as A1111's FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line.

    A chunk closes at 75 tokens, or at a ("BREAK", -1) piece. When one fills up within `comma_backtrack` tokens
    of its last comma, the tokens after that comma move to the next chunk, so a phrase is not cut in two.

    Args:
        pieces: (text, weight) pairs, as parse_prompt_attention returns; each text is tokenized on its own.
        tokenize: text -> token ids without BOS/EOS; the id of "," marks commas. A tuple of ids in that list is a
            textual-inversion embedding's, which A1111 keeps whole: if it does not fit, the chunk closes early.
        bos, eos, pad: CLIP's start, end and padding ids (SD1 pads with EOS, SD2 with 0).
        comma_backtrack: A1111's comma_padding_backtrack setting (default 20); 0 turns it off.
    """
    if comma_backtrack < 0:
        raise ValueError(f"comma_backtrack must be >= 0 (0 turns it off), got {comma_backtrack}")
    comma_ids = tokenize(",")
    comma = comma_ids[0] if len(comma_ids) == 1 else None
    chunks: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1  # index in `tokens` of the current chunk's last comma; -1 for none
    for text, weight in pieces:
        _require_str(text, "each piece's text")
        if text == "BREAK" and weight == BREAK_WEIGHT:
            chunks.append(_close(tokens, weights, bos, eos, pad))
            tokens, weights, last_comma = [], [], -1
            continue
        for token in tokenize(text):
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK_LENGTH and last_comma != -1 and len(tokens) - last_comma <= comma_backtrack:
                cut = last_comma + 1
                chunks.append(_close(tokens[:cut], weights[:cut], bos, eos, pad))
                tokens, weights, last_comma = tokens[cut:], weights[cut:], -1
            ids = [token] if isinstance(token, int) else list(token)  # an embedding's ids stay in one chunk
            if len(ids) > CHUNK_LENGTH:
                raise ValueError(f"an embedding of {len(ids)} vectors does not fit in a chunk of {CHUNK_LENGTH} tokens")
            if len(tokens) == CHUNK_LENGTH or len(tokens) + len(ids) > CHUNK_LENGTH:
                chunks.append(_close(tokens, weights, bos, eos, pad))
                tokens, weights, last_comma = [], [], -1  # so a comma that opens a chunk is not counted
            tokens += ids
            weights += [weight] * len(ids)
    if tokens or not chunks:  # an empty prompt is still one chunk
        chunks.append(_close(tokens, weights, bos, eos, pad))
    return chunks


def _close(tokens: list[int], weights: list[float], bos: int, eos: int, pad: int) -> Chunk:
    """[BOS, tokens, EOS, pad...] to 77 ids, weight 1.0 on all but the prompt's tokens.

    A1111 pads with EOS and then, for SD2 whose pad differs, overwrites everything after the first EOS with pad;
    this writes that result directly.
    """
    padding = CHUNK_LENGTH - len(tokens)
    return Chunk([bos, *tokens, eos] + [pad] * padding, [1.0, *weights, 1.0] + [1.0] * padding)


def empty_chunk(*, bos: int, eos: int, pad: int) -> Chunk:
    """The chunk of an empty prompt (A1111's empty_chunk): [BOS, EOS, pad...], all weights 1.0."""
    return _close([], [], bos, eos, pad)


def pad_to_same_length(prompt: list[Chunk], negative: list[Chunk], *, bos: int, eos: int,
                       pad: int) -> tuple[list[Chunk], list[Chunk]]:
    """Append empty chunks to the shorter list so both encode to contexts of the same length.

    A1111 does this within one batch of texts (sd_hijack_clip's forward), and between prompt and negative prompt
    when its "Pad prompt/negative prompt" setting is on; with it off, its default, it runs the UNet once per length.
    """
    n = max(len(prompt), len(negative))
    empty = empty_chunk(bos=bos, eos=eos, pad=pad)
    return prompt + [empty] * (n - len(prompt)), negative + [empty] * (n - len(negative))


# ------------------------------------------------------------------------------------------------ checks

def _require_str(value: object, name: str) -> None:
    """Reject a value that is not a string, saying what was given instead."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__} {value!r}")


def _require_steps(value: object, name: str) -> None:
    """Reject a step count that is not an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
