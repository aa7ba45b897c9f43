"""One batch over several boxes on Ray (the optional ``cluster`` extra; docs/cluster.md).

``auth``: the shared token. ``settings``: the ``[cluster]`` table as a run uses it.
``fingerprint``: what every node must hold to make the head's samples. ``runner``: the episode
runner that sends chunks to engines on the nodes (imports Ray). ``launch``: ``ray start`` and
``ray stop`` as ``appliance cluster start`` and ``stop`` run them.

Only ``runner`` imports Ray: a box without the extra never does.
"""
