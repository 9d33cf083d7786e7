"""The chaos harness (tests/chaos/harness.py): random faults against a steady workload on a real cluster."""
