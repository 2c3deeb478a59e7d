"""Reference implementations that deformjax's ops are checked and timed against, shared by `tests/` and
`experiments/`.

This package sits outside the package and outside pytest's `testpaths`, so `--doctest-modules` never imports it:
a module here may import an optional dependency (torch) at module level. Import it from the tests that use it
after `pytest.importorskip`, and from a benchmark inside a `try` that runs without it.
"""
