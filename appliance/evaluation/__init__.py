"""Evaluation: what synthetic defects are worth to a detector, measured on real defects.

``runner.evaluate`` trains the same small UNet (``unet.py``, ``train.py``) on each generator's
synthetic anomalies (``generators.py``: ours through the agent loop; ``baselines.py``: DRAEM,
CutPaste, and with few-shot real defects a copy-paste of them) and scores it on held-out normals
plus real defect photos (``data.py``) with pixel and image AUROC / AP / F1-max (``metrics.py``);
``generation_metrics.py`` measures the samples themselves and ``report.py`` writes the table
and figures; ``runner.evaluate_seeds`` repeats it per seed. ``appliance eval`` is the CLI.
"""
