"""HA test clusters (fixtures.py), the Patroni harness (patroni.py) and its end-to-end run."""
