"""A rank's choices that need no model: compiling only where it pays."""

import pytest

from esmshard.rank import RankSettings, compile_mode


@pytest.mark.parametrize("setting, device, tokens, mode", [
    ("auto", "cuda", 100_000_000, "tuned"), ("auto", "cuda", 99_999_999, False), ("auto", "cpu", 10**9, False),
    ("tuned", "cuda", 10, "tuned"), (True, "cuda", 10, True), (False, "cuda", 10**9, False), ("tuned", "cpu", 10, False),
])
def test_compile_only_where_it_pays(setting, device, tokens, mode):
    assert compile_mode(RankSettings.from_config({"compile": setting}), device, tokens) == mode
