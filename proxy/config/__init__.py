"""The settings model: every key of the config file, its default and its checks."""
