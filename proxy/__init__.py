"""publer-proxy: a local reverse proxy that lets programs use the Publer API without its key."""

__version__ = "0.1.0"
