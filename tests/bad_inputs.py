"""Bad-input tables (README, "Bad input"): every public module keeps a table of calls that must fail before any compute,
each with the error type and a fragment of the message a user sees.

    BAD = [bad(lambda: f(...), ValueError, "fragment", "id"), ...]

    @pytest.mark.parametrize("call, error, match", BAD)
    def test_bad_input(call, error, match):
        refused(call, error, match)

IEEE results that are the documented answer (inf, NaN in the same place, a dtype that comes back) are asserted
where they are computed, not here.
"""

import pytest

__all__ = ["bad", "refused"]


def bad(call, error, match: str, id: str):
    return pytest.param(call, error, match, id=id)


def refused(call, error, match: str) -> None:
    with pytest.raises(error, match=match):
        call()
