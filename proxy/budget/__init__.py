"""Publer's rate limit shared out: the share rule (pure) and the budget stores
(memory, Redis)."""
