"""What only development and tests use: the Publer sandbox and the `dev` stack.

The runtime never imports this package, and the container image does not contain it.
"""
