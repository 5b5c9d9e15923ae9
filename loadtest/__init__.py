"""Load tests (Locust), the data generator and the benchmark; see loadtest/README.md."""
