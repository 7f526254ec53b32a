"""The soak: mixed load with faults on a schedule (tests/soak/soak.py; `make soak`)."""
