"""Root conftest: the test fleet's fixtures (tests/testbed) for every test module."""

pytest_plugins = ["tests.testbed.pytest_plugin"]
