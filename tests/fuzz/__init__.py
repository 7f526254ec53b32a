"""The mixing fuzzer (issue 15, item 2): ``python -m tests.fuzz`` (``make fuzz``) for a long
run, tests/integration/test_fuzz_mix.py for the short one in the suite."""
