"""Where requests arrive: the strict HTTP/1.1 server, the ASGI dispatch, and the
process's signals."""
