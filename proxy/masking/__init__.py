"""What the proxy masks: secrets in its own output, and in Publer's responses."""
