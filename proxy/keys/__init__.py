"""The keys the proxy holds: where they are read from, how they are refreshed, and
the HTTP clients that reach their sources."""
