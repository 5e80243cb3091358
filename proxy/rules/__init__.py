"""The decisions, pure: path safety, the scope map, policy, headers, refusals, and
what Publer's answers mean."""
