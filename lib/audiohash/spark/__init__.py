"""The Spark layer: the only package besides jobs/ that imports pyspark or delta.

It moves Arrow batches between Delta tables and the pure core (audio, features, quantizers,
ranking); no logic of its own beyond planning the distributed steps.
"""
