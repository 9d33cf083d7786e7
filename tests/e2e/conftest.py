"""End-to-end fixtures: see tests/helpers/fixtures.py."""

from tests.helpers.fixtures import agents, postgres, reg, relay, relay_env, service_factory, transport  # noqa: F401
