# The benchmark is run on purpose (python tests/bench/run.py), never by the test suite.
collect_ignore_glob = ["*"]
