"""Makes the vendored gguf-py folder installable with the appliance package (see ../README.md)."""
