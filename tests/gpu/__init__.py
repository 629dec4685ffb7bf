# A package, so that these modules (gpu.conftest, gpu.helpers, ...) never clash with tests/conftest.py
# and tests/test_*.py, which pytest imports as top-level modules.
