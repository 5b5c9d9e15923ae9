"""The policy as pure Python: no I/O here, so each rule can be read and tested in one place."""
