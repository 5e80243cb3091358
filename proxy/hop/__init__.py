"""The hop to Publer: the services of one config generation, the forwarder, the
upstream client and the client's side of a request."""
