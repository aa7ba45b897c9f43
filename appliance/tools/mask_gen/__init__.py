"""MG, mask generation: the pixel mask of the defect in the accepted image.

Backends: ``difference`` (``difference``: the renderer's footprint refined against the pixels
that changed) and ``metauas-onnx`` (``metauas``: MetaUAS through onnxruntime).
"""
