"""Test harness shared by unit and e2e tests: real servers on 127.0.0.1."""
