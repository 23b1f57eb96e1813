"""Support code for the tests that drive whole training runs in subprocesses."""
