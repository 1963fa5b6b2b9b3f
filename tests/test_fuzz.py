"""`python -m fastconv.fuzz` on a fixed budget: every algorithm against naive on random calls and layouts
(the long budget is a command a person runs: see the README)."""
import io

import fastconv.fuzz


def test_the_fuzz_finds_nothing_on_a_fixed_budget():
    out = io.StringIO()
    failures = fastconv.fuzz.run(300, seed=1000, out=out)
    assert failures == [], out.getvalue()
    report = out.getvalue()
    assert "cython:direct" in report and "0 failures" in report


def test_a_layout_holds_the_same_values():
    import numpy as np

    a = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    for layout in fastconv.fuzz.LAYOUTS:
        view = fastconv.fuzz.laid_out(a, layout)
        np.testing.assert_array_equal(view, a)
    assert not fastconv.fuzz.laid_out(a, "misaligned").flags.aligned
