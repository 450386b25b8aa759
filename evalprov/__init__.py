"""evalprov: declarative provisioning for LLM evaluation on bare-metal GPU fleets."""

__version__ = "0.1.0"
