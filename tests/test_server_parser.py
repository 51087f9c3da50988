"""The streaming output parser: every split of the text gives the same reasoning, content and
tool calls, and the slips the model is known to make are tolerated."""

from __future__ import annotations

import json
import random

import pytest

from hunyuan_mlx.serve.parser import Delta, OutputParser, StopStrings


def parse_in_pieces(text: str, cuts: list[int], tools: bool) -> Delta:
    """Feed `text` cut at `cuts`, then finish; the whole reply."""
    parser = OutputParser(tools=tools)
    total = Delta()
    bounds = [0, *sorted(cuts), len(text)]
    for a, b in zip(bounds, bounds[1:]):
        total.extend(parser.feed(text[a:b]))
    total.extend(parser.finish())
    return total


def parse_every_way(text: str, tools: bool = False) -> tuple[str, str, list[tuple[str, dict]]]:
    """(reasoning, content, [(name, arguments)]) of `text`, checked identical whether it comes
    whole, one character at a time, or cut at random places."""
    rng = random.Random(0)
    splits = [[], list(range(1, len(text)))]
    splits += [rng.sample(range(1, len(text)), min(len(text) - 1, 5)) for _ in range(20)]
    results = []
    for cuts in splits:
        d = parse_in_pieces(text, cuts, tools)
        results.append(
            (d.reasoning, d.content, [(c.name, json.loads(c.arguments)) for c in d.tool_calls])
        )
    assert all(r == results[0] for r in results)
    return results[0]


CASES = [
    # (output, tools, reasoning, content, calls)
    (
        "<think>\nLet me see.\n</think>\n<answer>\nHello!\n</answer>",
        False,
        "Let me see.",
        "Hello!",
        [],
    ),
    ("<answer>\nHi there\n</answer>", False, "", "Hi there", []),
    ("Just text, no tags.", False, "", "Just text, no tags.", []),
    # <answer> leaking into the middle of a plain reply
    ("Sure.<answer> Here it is.</answer>", False, "", "Sure. Here it is.", []),
    # thinking closed by </answer> instead of </think>
    ("<think>hmm</answer>\n<answer>ok</answer>", False, "hmm", "ok", []),
    ("<think>hmm</answer>ok", False, "hmm", "ok", []),
    # thinking never closed, the answer opened
    ("<think>hmm<answer>ok</answer>", False, "hmm", "ok", []),
    # the first < of <answer> dropped
    ("<think>x</think>\nanswer>\nFine.\n</answer>", False, "x", "Fine.", []),
    ("answer>Fine.</answer>", False, "", "Fine.", []),
    # "answer" as an ordinary first word stays
    ("answer me this", False, "", "answer me this", []),
    # a leading 助手： in tool mode, with or without <answer>
    ("助手：你好！", True, "", "你好！", []),
    ("<think>t</think>\n<answer>\n助手：今天晴。\n</answer>", True, "t", "今天晴。", []),
    # ... but not outside tool mode
    ("助手：你好！", False, "", "助手：你好！", []),
    # tool calls
    (
        '<tool_calls>[{"name": "get_weather", "arguments": {"city": "北京"}}]</tool_calls>',
        True,
        "",
        "",
        [("get_weather", {"city": "北京"})],
    ),
    (
        '<think>need weather</think>\n<answer>\n<tool_calls>[{"name": "a", "arguments": {}}, '
        '{"name": "b", "arguments": {"x": [1, 2]}}]</tool_calls>\n</answer>',
        True,
        "need weather",
        "",
        [("a", {}), ("b", {"x": [1, 2]})],
    ),
    # text after the tool block
    (
        '<tool_calls>[{"name": "f", "arguments": {"q": 1}}]</tool_calls>\nCalling f now.',
        True,
        "",
        "Calling f now.",
        [("f", {"q": 1})],
    ),
    # a block that does not parse comes back as content, tags included
    (
        '<tool_calls>[{"name": "f", "arguments": {</tool_calls>',
        True,
        "",
        '<tool_calls>[{"name": "f", "arguments": {</tool_calls>',
        [],
    ),
    # an unclosed block that parses (generation ended before the closing tag)
    ('<tool_calls>[{"name": "f"}]', True, "", "", [("f", {})]),
    # tool tags outside tool mode are content
    (
        '<tool_calls>[{"name": "f"}]</tool_calls>',
        False,
        "",
        '<tool_calls>[{"name": "f"}]</tool_calls>',
        [],
    ),
    # thinking cut off by max_tokens
    ("<think>still thinking", False, "still thinking", "", []),
    ("<think", False, "", "<think", []),
]


@pytest.mark.parametrize("output,tools,reasoning,content,calls", CASES)
def test_every_split_parses_the_same(output, tools, reasoning, content, calls):
    assert parse_every_way(output, tools) == (reasoning, content, calls)


def test_tool_calls_have_unique_ids_and_running_indices():
    text = (
        '<tool_calls>[{"name": "a", "arguments": {}}]</tool_calls>'
        '<tool_calls>[{"name": "b", "arguments": {"k": "v"}}, {"name": "c"}]</tool_calls>'
    )
    calls = parse_in_pieces(text, list(range(1, len(text))), tools=True).tool_calls
    assert [c.index for c in calls] == [0, 1, 2]
    assert len({c.id for c in calls}) == 3
    assert [c.arguments for c in calls] == ["{}", '{"k": "v"}', "{}"]


def test_streamed_pieces_never_carry_a_partial_tag():
    text = "<think>abc</think>\n<answer>\nxyz\n</answer>"
    parser = OutputParser()
    pieces = [parser.feed(ch) for ch in text] + [parser.finish()]
    emitted = "".join(d.reasoning + d.content for d in pieces)
    assert emitted == "abcxyz"
    assert all("<" not in d.content + d.reasoning for d in pieces)


def test_stop_strings_cut_at_the_first_match_whatever_the_split():
    for cuts in ([], [3], [1, 2, 3, 4, 5, 6, 7, 8, 9]):
        stops = StopStrings(["END", "xyz"])
        text, stopped, out = "abcENxEND tail", False, ""
        bounds = [0, *cuts, len(text)]
        for a, b in zip(bounds, bounds[1:]):
            piece, stopped = stops.feed(text[a:b])
            out += piece
            if stopped:
                break
        assert (out, stopped) == ("abcENx", True)
    stops = StopStrings(["END"])
    assert stops.feed("abcEN") == ("abc", False)
    assert stops.flush() == "EN"
