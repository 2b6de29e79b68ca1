"""Fixtures the integration modules share: the contract suite's buses (`make_bus`), so a
module that states one guarantee in depth runs on the same transports as the suite."""

from tests.integration.test_contract import make_bus

__all__ = ["make_bus"]
