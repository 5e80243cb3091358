"""What the proxy records: the access log and its one writer, the audit chain, the
activity the status page shows, metrics, request ids and the log set-up."""
