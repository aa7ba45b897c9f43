"""Model weights, offline: the manifest, bundles, exports and the tiny test kit."""
