"""Wire-level tests of the API providers against a fake server on 127.0.0.1."""
